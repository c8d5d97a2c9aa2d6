// The JSON Schema that ships for SandboxConfig (schema/sandbox-config.schema.json) against the
// validator it describes: the same keys at every level, and samples generated from one rich valid
// config (every leaf given a wrong type, every object given an unknown key) that both reject, the
// validator naming the field. The validator checks more than a schema can (host patterns, globs,
// addresses); the invalid fixtures that only it rejects are listed by name.
import { readFileSync } from 'node:fs'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import Ajv from 'ajv'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'

import { deleteSandbox, getOrCreateSandbox, type Sandbox, type SandboxConfig } from '../index.js'
import { rejection, useTempHome } from './helpers/home'
import { makeTestCA } from './helpers/upstreams'

const root = fileURLToPath(new URL('..', import.meta.url))
const schema = JSON.parse(readFileSync(join(root, 'schema/sandbox-config.schema.json'), 'utf8'))
const validate = new Ajv({ allErrors: true, strict: true }).compile(schema)
const home = useTempHome()

type Json = null | boolean | number | string | Json[] | { [key: string]: Json }

describe('keys', () => {
  // The validator's lists of known keys (src/config/validate.rs) and where each sits in the schema.
  const where: Record<string, Record<string, unknown>> = {
    ROOT_KEYS: schema.properties,
    RULE_KEYS: schema.definitions.egressRule.properties,
    OVERRIDE_KEYS: schema.definitions.egressRule.properties.override.properties,
    UPSTREAM_KEYS: schema.properties.upstream.properties,
    AUDIT_KEYS: schema.properties.audit.properties,
    LIMIT_KEYS: schema.properties.limits.properties,
    SECRET_KEYS: schema.properties.secrets.additionalProperties.oneOf[1].properties,
    FS_KEYS: schema.definitions.fsMount.properties,
    ACL_KEYS: schema.definitions.fsMount.properties.acls.items.properties,
  }
  const source = readFileSync(join(root, 'src/config/validate.rs'), 'utf8')
  const lists = [...source.matchAll(/const ([A-Z_]+_KEYS): &\[&str\] = &\[([^\]]*)\]/g)].map((m) => ({
    name: m[1],
    keys: [...m[2].matchAll(/"([^"]+)"/g)].map((k) => k[1]).sort(),
  }))

  it('finds the validator key lists', () => {
    expect(lists.length).toBeGreaterThanOrEqual(6)
  })

  it.each(lists.map((l) => [l.name, l.keys] as const))('%s: the schema has the same keys', (name, keys) => {
    expect(where[name], `${name} is new in validate.rs: add its keys to schema/sandbox-config.schema.json and here`).toBeDefined()
    expect(Object.keys(where[name]).filter((k) => k !== '$schema').sort()).toEqual(keys)
  })
})

describe('generated samples', () => {
  let valid: SandboxConfig & { [key: string]: Json }
  let sandbox: Sandbox

  beforeAll(async () => {
    valid = {
      egress: [
        { access: 'allow', host: 'api.example.com', ports: [443], methods: ['GET'], paths: ['/v1/**'], override: { headers: { Authorization: 'Bearer x' }, allowPlaintext: false }, tls: 'intercept' },
        { access: 'deny', host: '*' },
      ],
      fs: [{ backend: 'local', mount: '/workspace', source: home.dir, acls: [{ path: '/workspace/**', access: 'rw' }], audit: false }],
      upstream: { resolve: { 'api.example.com:443': '127.0.0.1:8443' }, ca: [makeTestCA(['api.example.com']).caPem] },
      audit: { maxBytes: 1048576, keep: 2 },
      limits: { pids: 256, openFiles: 1024 },
    }
    sandbox = await getOrCreateSandbox('schema', valid)
  })
  afterAll(async () => {
    await deleteSandbox('schema')
    home.cleanup()
  })

  // Every value in the config with its field path as the validator writes it: `a.b[0]`, and
  // `headers["Name"]` for keys that are data.
  function* leaves(value: Json, path: string, dataKeys = false): Generator<[string, Json, string[]]> {
    if (path !== '') yield [path, value, []]
    if (Array.isArray(value)) {
      for (const [i, v] of value.entries()) yield* leaves(v, `${path}[${i}]`)
    } else if (value && typeof value === 'object') {
      for (const [k, v] of Object.entries(value)) {
        const child = dataKeys ? `${path}[${JSON.stringify(k)}]` : path ? `${path}.${k}` : k
        yield* leaves(v, child, k === 'headers' || k === 'resolve')
      }
    }
  }

  function setAt(config: Json, path: string, value: Json): Json {
    const copy = structuredClone(config)
    const steps = [...path.matchAll(/\["([^"]+)"\]|\[(\d+)\]|\.?([A-Za-z$]+)/g)].map((m) => m[1] ?? (m[2] !== undefined ? Number(m[2]) : m[3]))
    let at = copy as Record<string | number, Json>
    for (const step of steps.slice(0, -1)) at = at[step] as Record<string | number, Json>
    at[steps[steps.length - 1]] = value
    return copy
  }

  const wrongType = (v: Json): Json => (typeof v === 'string' ? 42 : typeof v === 'number' ? 'x' : typeof v === 'boolean' ? 'yes' : Array.isArray(v) ? { not: 'a list' } : 'not an object')

  it('the valid sample passes both', () => {
    expect(validate(valid), JSON.stringify(validate.errors)).toBe(true)
  })

  it('a wrong type anywhere is rejected by both, the validator naming the field', async () => {
    let checked = 0
    for (const [path, value] of leaves(valid, '')) {
      const sample = setAt(valid, path, wrongType(value))
      expect(validate(sample), `schema accepted ${path} = ${JSON.stringify(wrongType(value))}`).toBe(false)
      const error = await rejection(sandbox.applyConfig(sample as SandboxConfig))
      expect(error.code, path).toBe('HIVE_INVALID_CONFIG')
      expect(error.issues?.map((i) => i.path), path).toContain(path)
      checked += 1
    }
    expect(checked).toBeGreaterThan(25)
  }, 60_000)

  it('an unknown key in any object is rejected by both', async () => {
    let checked = 0
    for (const [path, value] of [['', valid] as [string, Json, string[]], ...leaves(valid, '')]) {
      if (!value || typeof value !== 'object' || Array.isArray(value) || /headers$|resolve$/.test(path)) continue
      const sample = setAt(valid, path ? `${path}.unknownKey` : 'unknownKey', true)
      expect(validate(sample), `schema accepted ${path}.unknownKey`).toBe(false)
      const error = await rejection(sandbox.applyConfig(sample as SandboxConfig))
      expect(error.issues?.map((i) => i.path)).toContain(path ? `${path}.unknownKey` : 'unknownKey')
      checked += 1
    }
    expect(checked).toBe(9)
  })

  it('the invalid fixtures: the schema rejects all but those only the validator can judge', () => {
    const fixtures: { name: string; config: Json }[] = JSON.parse(readFileSync(join(root, '__test__/fixtures/invalid-configs.json'), 'utf8'))
    // Host syntax, path normalization, forbidden header names, secrets, addresses, PEM contents and
    // mount placement need the validator's own knowledge.
    const onlyTheValidator = [
      'wildcard over a top-level domain (*.com)', 'wildcard in the middle (api.*.com)', 'wildcard glued to a label (*api.com)',
      'host with an empty label', 'host label longer than 63', 'host with a port', 'numeric host (IPv4 shorthand)',
      'CIDR with host bits set', 'CIDR prefix too long', 'CIDR over a hostname',
      'path with ** inside a segment', 'path with a query string', 'path with a dot segment',
      'Host header override', 'Content-Length header override', 'Transfer-Encoding header override', 'Connection header override',
      'Proxy-Authorization header override', 'Upgrade header override', '[redacted] marker as a header value',
      'bad resolve key (no port)', 'bad resolve key (unbracketed IPv6)', 'bad resolve value (hostname)', 'bad resolve value (no port)',
      'ca not PEM', 'ca PEM with a corrupt certificate',
      'mount over /', 'mount under /proc', 'mount over /etc', 'mount under /lib64', 'mount with ..', 'two equal mounts', 'nested mounts',
      'relative source', 'acl outside its mount', 'acl glob reaching beside its mount',
      'template naming an unknown secret', 'env placeholder of a secret that may go nowhere', '[redacted] marker for a new secret',
    ]
    expect(fixtures.filter((f) => validate(f.config)).map((f) => f.name)).toEqual(onlyTheValidator)
    expect(fixtures.length - onlyTheValidator.length).toBeGreaterThanOrEqual(30)
  })
})
