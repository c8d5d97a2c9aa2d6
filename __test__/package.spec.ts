// The package as users install it: `npm pack`, install the tarball into a fresh project, then
// import it with ESM and CommonJS, and type-check a TypeScript user of it.
import { execFileSync } from 'node:child_process'
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'

const root = fileURLToPath(new URL('..', import.meta.url))
const project = mkdtempSync(join(tmpdir(), 'hive-pack-'))
const home = join(project, 'home')
const run = (cmd: string, args: string[]) =>
  execFileSync(cmd, args, { cwd: project, encoding: 'utf8', env: { ...process.env, HIVE_HOME: home }, stdio: ['ignore', 'pipe', 'pipe'] })

beforeAll(() => {
  const packed = JSON.parse(execFileSync('npm', ['pack', '--json', '--pack-destination', project], { cwd: root, encoding: 'utf8' }))
  writeFileSync(join(project, 'package.json'), JSON.stringify({ name: 'user-project', version: '1.0.0', private: true }))
  run('npm', ['install', '--offline', '--no-audit', '--no-fund', join(project, packed[0].filename)])
}, 120_000)
afterAll(() => rmSync(project, { recursive: true, force: true }))

describe('the packed package', () => {
  it('works with import', () => {
    writeFileSync(
      join(project, 'esm.mjs'),
      `import { getOrCreateSandbox, deleteSandbox } from 'hive'
       const sandbox = await getOrCreateSandbox('esm', { egress: [{ access: 'allow', host: 'API.github.com' }] })
       console.log((await sandbox.getConfig()).egress[0].host)
       await deleteSandbox('esm')`,
    )
    expect(run('node', ['esm.mjs']).trim()).toBe('api.github.com')
  })

  it('works with require', () => {
    writeFileSync(
      join(project, 'cjs.cjs'),
      `const { getOrCreateSandbox } = require('hive')
       getOrCreateSandbox('bad name').catch((e) => console.log(e.code))`,
    )
    expect(run('node', ['cjs.cjs']).trim()).toBe('HIVE_INVALID_NAME')
  })

  it('ships types that a strict TypeScript user compiles against', () => {
    writeFileSync(
      join(project, 'user.ts'),
      `import { getOrCreateSandbox, type SandboxConfig, type SandboxEvent } from 'hive'
       const config: SandboxConfig = { egress: [{ access: 'allow', host: 'pypi.org', ports: [443] }] }
       export async function main(): Promise<void> {
         const sandbox = await getOrCreateSandbox('typed', config)
         const current: SandboxConfig = await sandbox.getConfig()
         await sandbox.applyConfig({ ...current, egress: [] })
         for await (const event of sandbox.getEventsStream({ since: 'start' })) {
           const e: SandboxEvent = event
           if (e.type === 'egress.request' && e.access === 'denied') console.log(e.host)
           break
         }
         await sandbox[Symbol.asyncDispose]()
       }`,
    )
    writeFileSync(
      join(project, 'tsconfig.json'),
      JSON.stringify({ compilerOptions: { strict: true, noEmit: true, module: 'nodenext', moduleResolution: 'nodenext', target: 'es2022', skipLibCheck: false, types: ['node'], typeRoots: [join(root, 'node_modules', '@types')] }, files: ['user.ts'] }),
    )
    const tsc = join(root, 'node_modules', '.bin', 'tsc')
    expect(() => run(tsc, ['-p', 'tsconfig.json'])).not.toThrow()
  })
})
