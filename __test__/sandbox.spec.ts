// The Sandbox API as a user drives it (SPEC §1): names, the per-process registry, declarative
// config, getConfig/applyConfig semantics, close, delete, the hive home and the CA.
import { existsSync, readFileSync, statSync } from 'node:fs'
import { join } from 'node:path'
import { afterAll, describe, expect, it } from 'vitest'

import { deleteSandbox, getOrCreateSandbox } from '../index.js'
import { rejection, useTempHome } from './helpers/home.js'

const home = useTempHome()
afterAll(() => home.cleanup())

describe('names', () => {
  const bad: [string, unknown][] = [
    ['empty', ''],
    ['64 characters', 'x'.repeat(64)],
    ['leading dot', '.hidden'],
    ['leading dash', '-rf'],
    ['path traversal', '../escape'],
    ['slash', 'a/b'],
    ['space', 'a b'],
    ['non-ASCII', 'sandbox-ü'],
    ['not a string', 42],
    ['undefined', undefined],
  ]
  for (const [what, name] of bad) {
    it(`rejects a name that is ${what} with HIVE_INVALID_NAME`, async () => {
      const error = await rejection(getOrCreateSandbox(name as string))
      expect(error.code).toBe('HIVE_INVALID_NAME')
    })
  }

  it('creates nothing on disk for a rejected name', async () => {
    await rejection(getOrCreateSandbox('../escape'))
    expect(existsSync(join(home.dir, 'escape'))).toBe(false)
    expect(existsSync(join(home.dir, 'sandboxes', '..', 'escape'))).toBe(false)
  })
})

describe('getOrCreateSandbox', () => {
  it('returns the same live sandbox for the same name within a process', async () => {
    const a = await getOrCreateSandbox('same-name')
    const b = await getOrCreateSandbox('same-name')
    expect(b).toBe(a)
    await a.close()
  })

  it('starts a new sandbox with the empty config (all egress denied)', async () => {
    const sandbox = await getOrCreateSandbox('starts-empty')
    const config = await sandbox.getConfig()
    expect(config.egress).toEqual([])
    expect(config.fs).toEqual([])
    await sandbox.close()
  })

  it('applies the config given to a live sandbox (declarative: tighter rules replace looser ones)', async () => {
    const loose = await getOrCreateSandbox('declarative', { egress: [{ access: 'allow', host: '*' }] })
    const tight = await getOrCreateSandbox('declarative', { egress: [{ access: 'allow', host: 'api.github.com', methods: ['GET'] }] })
    expect(tight).toBe(loose)
    const config = await tight.getConfig()
    expect(config.egress).toEqual([{ access: 'allow', host: 'api.github.com', methods: ['GET'] }])
    await tight.close()
  })

  it('returns a live sandbox unchanged when config is omitted', async () => {
    const sandbox = await getOrCreateSandbox('unchanged', { egress: [{ access: 'allow', host: 'pypi.org' }] })
    const again = await getOrCreateSandbox('unchanged')
    expect((await again.getConfig()).egress).toEqual([{ access: 'allow', host: 'pypi.org' }])
    await sandbox.close()
  })

  it('rejects an invalid config and leaves a live sandbox as it was', async () => {
    const sandbox = await getOrCreateSandbox('keeps-config', { egress: [{ access: 'allow', host: 'pypi.org' }] })
    const error = await rejection(getOrCreateSandbox('keeps-config', { egress: [{ access: 'allow', host: 'pypi.org', ports: [70000] }] }))
    expect(error.code).toBe('HIVE_INVALID_CONFIG')
    expect((await sandbox.getConfig()).egress).toEqual([{ access: 'allow', host: 'pypi.org' }])
    await sandbox.close()
  })

  it('creates nothing on disk for a new sandbox whose config is invalid', async () => {
    const error = await rejection(getOrCreateSandbox('never-created', { egres: [] } as never))
    expect(error.code).toBe('HIVE_INVALID_CONFIG')
    expect(existsSync(join(home.dir, 'sandboxes', 'never-created'))).toBe(false)
  })

  it('opens a new sandbox under the same name after close()', async () => {
    const first = await getOrCreateSandbox('reopened')
    await first.close()
    const second = await getOrCreateSandbox('reopened')
    expect(second).not.toBe(first)
    expect(second.closed).toBe(false)
    await second.close()
  })
})

describe('getConfig / applyConfig', () => {
  it('normalizes hosts and methods', async () => {
    const sandbox = await getOrCreateSandbox('normalized', {
      egress: [{ access: 'allow', host: 'API.GitHub.COM.', methods: ['get', 'Post'] }],
    })
    const [rule] = (await sandbox.getConfig()).egress!
    expect(rule.host).toBe('api.github.com')
    expect(rule.methods).toEqual(['GET', 'POST'])
    await sandbox.close()
  })

  it('returns a deep copy: mutating it changes nothing until applyConfig', async () => {
    const sandbox = await getOrCreateSandbox('deep-copy', { egress: [{ access: 'allow', host: 'pypi.org', ports: [443] }] })
    const config = await sandbox.getConfig()
    config.egress![0].host = 'evil.example'
    config.egress![0].ports!.push(22)
    expect((await sandbox.getConfig()).egress).toEqual([{ access: 'allow', host: 'pypi.org', ports: [443] }])
    await sandbox.close()
  })

  it('never returns a secret: override values come back as "[redacted]"', async () => {
    const secret = 'sk-live-SECRET-1234567890'
    const sandbox = await getOrCreateSandbox('redacted', {
      egress: [{ access: 'allow', host: 'api.finnhub.io', override: { headers: { 'X-Finnhub-Token': secret } } }],
    })
    const config = await sandbox.getConfig()
    expect(JSON.stringify(config)).not.toContain(secret)
    expect(config.egress![0].override!.headers).toEqual({ 'x-finnhub-token': '[redacted]' })
    await sandbox.close()
  })

  it('rejects the "[redacted]" marker so a round trip cannot replace a key with it', async () => {
    const sandbox = await getOrCreateSandbox('marker', {
      egress: [{ access: 'allow', host: 'api.finnhub.io', override: { headers: { 'X-Finnhub-Token': 'k' } } }],
    })
    const error = await rejection(sandbox.applyConfig(await sandbox.getConfig()))
    expect(error.code).toBe('HIVE_INVALID_CONFIG')
    expect(error.issues!.map((i) => i.path)).toContain('egress[0].override.headers["x-finnhub-token"]')
    expect(error.message).toMatch(/secret/i)
    await sandbox.close()
  })

  it('supports the documented pattern applyConfig({ ...(await getConfig()), egress })', async () => {
    const sandbox = await getOrCreateSandbox('spread-pattern', {
      egress: [{ access: 'allow', host: 'api.finnhub.io', override: { headers: { 'X-Finnhub-Token': 'k' } } }],
      upstream: { resolve: { 'api.github.com:443': '127.0.0.1:8443' } },
    })
    await sandbox.applyConfig({ ...(await sandbox.getConfig()), egress: [{ access: 'allow', host: '*' }] })
    const config = await sandbox.getConfig()
    expect(config.egress).toEqual([{ access: 'allow', host: '*' }])
    expect(config.upstream!.resolve).toEqual({ 'api.github.com:443': '127.0.0.1:8443' })
    await sandbox.close()
  })

  it('changes nothing when any part of the config is invalid', async () => {
    const sandbox = await getOrCreateSandbox('atomic', { egress: [{ access: 'allow', host: 'pypi.org' }] })
    const error = await rejection(
      sandbox.applyConfig({ egress: [{ access: 'allow', host: 'api.github.com' }, { access: 'allow', host: '*.com' }] }),
    )
    expect(error.code).toBe('HIVE_INVALID_CONFIG')
    expect(error.issues!.map((i) => i.path)).toEqual(['egress[1].host'])
    expect((await sandbox.getConfig()).egress).toEqual([{ access: 'allow', host: 'pypi.org' }])
    await sandbox.close()
  })

  it('rejects calls on a closed sandbox with HIVE_SANDBOX_CLOSED', async () => {
    const sandbox = await getOrCreateSandbox('closed-calls')
    await sandbox.close()
    const error = await rejection(sandbox.applyConfig({ egress: [] }))
    expect(error.code).toBe('HIVE_SANDBOX_CLOSED')
  })
})

describe('lifecycle and data', () => {
  it('keeps a folder per sandbox under HIVE_HOME with its audit log and CA', async () => {
    const sandbox = await getOrCreateSandbox('on-disk')
    const dir = join(home.dir, 'sandboxes', 'on-disk')
    expect(existsSync(join(dir, 'audit.jsonl'))).toBe(true)
    expect(readFileSync(join(dir, 'ca.pem'), 'utf8')).toBe(sandbox.caCertificate)
    expect(statSync(join(dir, 'ca.key')).mode & 0o777).toBe(0o600)
    await sandbox.close()
  })

  it('exposes the CA certificate but never its private key', async () => {
    const sandbox = await getOrCreateSandbox('ca-pem')
    expect(sandbox.caCertificate).toMatch(/^-----BEGIN CERTIFICATE-----/)
    expect(sandbox.caCertificate).not.toContain('PRIVATE KEY')
    expect(JSON.stringify(await sandbox.getConfig())).not.toContain('PRIVATE KEY')
    await sandbox.close()
  })

  it('keeps the same CA when the sandbox is opened again', async () => {
    const first = await getOrCreateSandbox('same-ca')
    const pem = first.caCertificate
    await first.close()
    const second = await getOrCreateSandbox('same-ca')
    expect(second.caCertificate).toBe(pem)
    await second.close()
  })

  it('closes with Symbol.asyncDispose', async () => {
    let sandbox
    {
      sandbox = await getOrCreateSandbox('disposed')
      await sandbox[Symbol.asyncDispose]()
    }
    expect(sandbox.closed).toBe(true)
  })

  it('deleteSandbox closes the live sandbox and removes its data', async () => {
    const sandbox = await getOrCreateSandbox('deleted')
    const dir = join(home.dir, 'sandboxes', 'deleted')
    expect(existsSync(dir)).toBe(true)
    await deleteSandbox('deleted')
    expect(sandbox.closed).toBe(true)
    expect(existsSync(dir)).toBe(false)
  })

  it('deleteSandbox of an unknown name succeeds and validates the name', async () => {
    await deleteSandbox('never-existed')
    expect((await rejection(deleteSandbox('../x'))).code).toBe('HIVE_INVALID_NAME')
  })
})
