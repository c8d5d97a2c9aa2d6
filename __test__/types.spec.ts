// What a TypeScript or ESM user leans on: ESM and CommonJS export the same names, `HiveError["code"]`
// lists every code the sources throw, and `SandboxEvent` narrows on `type` (a wrong field access
// does not compile).
import { execFileSync, spawnSync } from 'node:child_process'
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { afterAll, describe, expect, it } from 'vitest'

const root = fileURLToPath(new URL('..', import.meta.url))
const read = (file: string) => readFileSync(join(root, file), 'utf8')

describe('exports', () => {
  // Node itself resolves `hive` (the package's own name, from its folder), as a user's code would.
  const node = (code: string) => JSON.parse(execFileSync(process.execPath, ['--input-type=module', '-e', code], { cwd: root, encoding: 'utf8' }))

  it('ESM and CommonJS export the same names, as the same objects', () => {
    const { esm, cjs, same } = node(`
      import { createRequire } from 'node:module'
      const cjs = createRequire(process.cwd() + '/')('hive')
      const esm = await import('hive')
      const names = Object.keys(esm).filter((k) => k !== 'default')
      console.log(JSON.stringify({ esm: names.sort(), cjs: Object.keys(cjs).sort(), same: names.every((k) => esm[k] === cjs[k]) && esm.default === cjs }))`)
    expect(esm).toEqual(cjs)
    expect(cjs).toEqual(['EventStream', 'Sandbox', 'SandboxProcess', 'deleteSandbox', 'getOrCreateSandbox'])
    expect(same).toBe(true)
  })
})

describe('HiveError["code"]', () => {
  // Names the sources read from the environment are settings, not error codes; so are the codes of
  // `sandbox.warning` events and the embedded init image's constant.
  const settings = (name: string) =>
    ['HIVE_HOME', 'HIVE_LOG', 'HIVE_FS_NO_WATCH', 'HIVE_FS_CACHE_SHORT', 'HIVE_INIT'].includes(name) ||
    ['HIVE_LANDLOCK_ABI_LOW', 'HIVE_LANDLOCK_UNAVAILABLE', 'HIVE_IDMAP_FALLBACK', 'HIVE_FS_PASSTHROUGH_UNAVAILABLE'].includes(name) ||
    /^HIVE_(TEST|BENCH|FS_BENCH|FS_PROFILE)_/.test(name)
  const sources = execFileSync('git', ['ls-files', 'src', 'index.js', 'process.js', 'bin'], { cwd: root, encoding: 'utf8' })
    .split('\n')
    .filter((f) => /\.(rs|js)$/.test(f))
  const thrown = new Set(sources.flatMap((f) => [...read(f).matchAll(/\bHIVE_[A-Z_]+[A-Z]\b/g)].map((m) => m[0])).filter((n) => !settings(n)))
  const typed = (() => {
    const body = /export interface HiveError extends Error \{\s*code:([^}]*?)\n\s*\/\*\*/.exec(read('index.d.ts'))
    return new Set([...(body?.[1] ?? '').matchAll(/'(HIVE_[A-Z_]+)'/g)].map((m) => m[1]))
  })()

  it('lists every code found in the sources', () => {
    expect(thrown.size).toBeGreaterThanOrEqual(8)
    expect([...thrown].filter((code) => !typed.has(code)).sort()).toEqual([])
  })

  it('lists the codes other parts of the engine define', () => {
    for (const code of ['HIVE_SANDBOX_BUSY', 'HIVE_LIMITS_UNENFORCEABLE', 'HIVE_UNSUPPORTED_PLATFORM', 'HIVE_BINDING_NOT_FOUND']) expect(typed.has(code), code).toBe(true)
  })

  it('every code is in the README table', () => {
    const readme = read('README.md')
    expect([...typed].filter((code) => !readme.includes(`| \`${code}\` |`)).sort()).toEqual([])
  })
})

describe('SandboxEvent', () => {
  const dir = mkdtempSync(join(tmpdir(), 'hive-types-'))
  afterAll(() => rmSync(dir, { recursive: true, force: true }))

  function tsc(code: string): string {
    writeFileSync(join(dir, 'check.ts'), code)
    writeFileSync(
      join(dir, 'tsconfig.json'),
      JSON.stringify({
        compilerOptions: { strict: true, noEmit: true, module: 'nodenext', moduleResolution: 'nodenext', target: 'es2022', types: ['node'], typeRoots: [join(root, 'node_modules', '@types')], paths: { hive: [join(root, 'index.d.ts')] } },
        files: ['check.ts'],
      }),
    )
    const result = spawnSync(join(root, 'node_modules', '.bin', 'tsc'), ['-p', dir], { encoding: 'utf8' })
    return result.stdout + result.stderr
  }

  it('narrows on type: each event has exactly its fields', () => {
    const errors = tsc(`
      import type { SandboxEvent, SandboxEventType } from 'hive'
      export function describe(e: SandboxEvent): string {
        switch (e.type) {
          case 'egress.request': return e.host.toLowerCase() + e.port.toFixed() + e.method + e.path + e.scheme + e.access + (e.rule ?? -1) + e.reason + e.via + e.injectedHeaders.join()
          case 'egress.response': return e.requestId + e.status + e.bytesIn + e.bytesOut + e.durationMs
          case 'egress.error': return e.requestId + e.host + e.port + e.cause + e.detail
          case 'dns.query': return e.name + e.qtype + e.access
          case 'config.applied': return String(e.egressRules + e.fsMounts)
          case 'process.start': return e.pid + e.command.join(' ')
          case 'process.exit': return e.pid + e.command.join(' ') + (e.exitCode ?? e.signal)
          case 'fs.denied': return e.path + e.operation + (e.rule ?? -1)
          case 'fs.access': return e.path + e.operation + (e.newPath ?? '')
          case 'secret.blocked': return e.secret + e.host + e.where
          case 'secret.scrubbed': return e.secret + e.host + e.count
          case 'limit.exceeded': return e.limit + (e.pid ?? '')
          case 'sandbox.warning': return e.code + e.message
          case 'sandbox.created': case 'sandbox.closed': return e.id + e.time + e.sandbox
          case 'events.dropped': return String(e.count)
          case 'events.suppressed': return e.count + JSON.stringify(e.types) + e.firstTime + e.lastTime
          default: { const never: never = e; return never }
        }
      }
      const all: SandboxEventType[] = ['egress.request', 'egress.response', 'egress.error', 'dns.query', 'config.applied', 'process.start', 'process.exit', 'fs.denied', 'fs.access', 'secret.blocked', 'secret.scrubbed', 'limit.exceeded', 'sandbox.warning', 'sandbox.created', 'sandbox.closed', 'events.dropped', 'events.suppressed']
      console.log(all)
    `)
    expect(errors).toBe('')
  }, 120_000)

  it('rejects a field of another event type', () => {
    const errors = tsc(`
      import type { SandboxEvent } from 'hive'
      export function f(e: SandboxEvent): void {
        if (e.type === 'egress.response') console.log(e.host)
        if (e.type === 'process.exit') console.log(e.path)
        console.log(e.host)
      }
    `)
    expect(errors).toMatch(/check\.ts\(4,.*Property 'host' does not exist/)
    expect(errors).toMatch(/check\.ts\(5,.*Property 'path' does not exist/)
    expect(errors).toMatch(/check\.ts\(6,.*Property 'host' does not exist/)
  }, 120_000)
})
