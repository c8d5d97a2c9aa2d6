// The package as users install it: the main tarball (JavaScript, types, docs, CLI; no binary, no
// install script) plus the platform tarball npm picks through optionalDependencies, installed into
// an empty folder with no Rust toolchain on PATH, then used through ESM, CommonJS, TypeScript and
// the `hive` command, down to a command in a real sandbox.
//
// Which tarballs: `npm run pack:local` sets HIVE_PACKED to its summary of release tarballs; without
// it (CI, `npm test`) the test packs the debug binary it has, stripped, the same way
// (scripts/pack.mjs), because a release build takes longer than CI can spend.
import { execFileSync, spawnSync } from 'node:child_process'
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { delimiter, dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'

const root = fileURLToPath(new URL('..', import.meta.url))
const pkg = JSON.parse(readFileSync(join(root, 'package.json'), 'utf8'))
const scratch = mkdtempSync(join(tmpdir(), 'hive-pack-'))
const project = join(scratch, 'project')
const home = join(scratch, 'home')
const GLIBC_BASELINE = '2.17'
const RELEASE_BINARY = join(root, 'target', 'pack', 'linux-x64-gnu', 'hive.linux-x64-gnu.node')

interface Summary {
  main: string
  platforms: Record<string, { tarball: string; binaryBytes: number }>
}
const release = process.env.HIVE_PACKED !== undefined
let summary: Summary

// PATH without any folder that holds cargo or rustc: what a user without Rust has.
const noRustPath = [...new Set([dirname(process.execPath), ...(process.env.PATH ?? '').split(delimiter)])]
  .filter((dir) => dir && !existsSync(join(dir, 'cargo')) && !existsSync(join(dir, 'rustc')))
  .join(delimiter)
const userEnv = { ...process.env, PATH: noRustPath, HIVE_HOME: home, CARGO_HOME: '/nonexistent', RUSTUP_HOME: '/nonexistent' }
const run = (cmd: string, args: string[], cwd = project) => execFileSync(cmd, args, { cwd, encoding: 'utf8', env: userEnv, stdio: ['ignore', 'pipe', 'pipe'] })
const files = (tarball: string) => execFileSync('tar', ['tzf', tarball], { encoding: 'utf8' }).split('\n').filter(Boolean)
const packageJsonOf = (tarball: string) => JSON.parse(execFileSync('tar', ['xzOf', tarball, 'package/package.json'], { encoding: 'utf8' }))

beforeAll(() => {
  if (release) {
    summary = JSON.parse(readFileSync(process.env.HIVE_PACKED as string, 'utf8'))
  } else {
    const binary = join(root, 'hive.linux-x64-gnu.node')
    if (!existsSync(binary)) throw new Error('no hive.linux-x64-gnu.node: run npm run build:debug first')
    const out = execFileSync(process.execPath, [join(root, 'scripts/pack.mjs'), '--out', join(scratch, 'tarballs'), '--node', `linux-x64-gnu=${binary}`, '--strip'], { encoding: 'utf8' })
    summary = JSON.parse(out)
  }
  mkdirSync(project)
  writeFileSync(join(project, 'package.json'), JSON.stringify({ name: 'user-project', version: '1.0.0', private: true }))
  run('npm', ['install', '--offline', '--no-audit', '--no-fund', summary.main, summary.platforms['linux-x64-gnu'].tarball])
}, 180_000)
afterAll(() => rmSync(scratch, { recursive: true, force: true }))

describe('the tarballs', () => {
  it('the main tarball has no binary and no install script, and ships docs, CLI, schema and license', () => {
    const names = files(summary.main)
    expect(names.filter((f) => f.endsWith('.node'))).toEqual([])
    const manifest = packageJsonOf(summary.main)
    for (const hook of ['preinstall', 'install', 'postinstall', 'prepare']) expect(manifest.scripts?.[hook]).toBeUndefined()
    for (const f of ['index.js', 'index.mjs', 'index.d.ts', 'binding.js', 'process.js', 'bin/hive.js', 'schema/sandbox-config.schema.json', 'LICENSE', 'README.md', 'docs/network-access.md', 'docs/audit-log.md']) {
      expect(names).toContain(`package/${f}`)
    }
    expect(names.filter((f) => f.startsWith('package/scripts/') || f.startsWith('package/src/'))).toEqual([])
  })

  it('lists one optional dependency per target, all at the package version', () => {
    const { optionalDependencies, version } = packageJsonOf(summary.main)
    expect(optionalDependencies).toEqual({
      'hive-linux-arm64-gnu': version,
      'hive-linux-arm64-musl': version,
      'hive-linux-x64-gnu': version,
      'hive-linux-x64-musl': version,
    })
    expect(pkg.napi.targets).toHaveLength(4)
  })

  it('the platform tarball holds the binary, its manifest, README and LICENSE only', () => {
    const { tarball } = summary.platforms['linux-x64-gnu']
    expect(files(tarball).sort()).toEqual(['package/LICENSE', 'package/README.md', 'package/hive.linux-x64-gnu.node', 'package/package.json'])
    const manifest = packageJsonOf(tarball)
    expect(manifest).toMatchObject({ name: 'hive-linux-x64-gnu', version: pkg.version, os: ['linux'], cpu: ['x64'], libc: ['glibc'] })
  })

  it('the release binary is stripped and under 15 MB', (ctx) => {
    if (!release) ctx.skip('CI packs its debug build; npm run pack:local checks the release binary')
    for (const [platform, { binaryBytes }] of Object.entries(summary.platforms)) {
      expect(binaryBytes, platform).toBeLessThan(15 * 1024 * 1024)
    }
    const symbols = execFileSync('readelf', ['-S', RELEASE_BINARY], { encoding: 'utf8' })
    expect(symbols).not.toMatch(/\.debug_info|\.symtab/)
  })

  it(`the x64 gnu release binary needs no glibc symbol newer than ${GLIBC_BASELINE}`, (ctx) => {
    if (!existsSync(RELEASE_BINARY)) ctx.skip(`no release binary at ${RELEASE_BINARY}: npm run pack:local builds one (CI does not, to stay within its time)`)
    const versions = [...execFileSync('objdump', ['-T', RELEASE_BINARY], { encoding: 'utf8' }).matchAll(/GLIBC_([0-9.]+)/g)].map((m) => m[1])
    expect(versions.length).toBeGreaterThan(10)
    const newer = versions.filter((v) => v.localeCompare(GLIBC_BASELINE, undefined, { numeric: true }) > 0)
    expect([...new Set(newer)]).toEqual([])
  })
})

describe('installed without Rust', () => {
  it('has no cargo or rustc on PATH', () => {
    for (const tool of ['cargo', 'rustc']) expect(spawnSync('sh', ['-c', `command -v ${tool}`], { env: userEnv }).status).not.toBe(0)
  })

  it('runs a command in a sandbox through require', () => {
    writeFileSync(
      join(project, 'cjs.cjs'),
      `const { getOrCreateSandbox, deleteSandbox } = require('hive')
       getOrCreateSandbox('cjs').then(async (s) => {
         const r = await s.exec(['true'])
         console.log(r.exitCode)
         await deleteSandbox('cjs')
       })`,
    )
    expect(run('node', ['cjs.cjs']).trim()).toBe('0')
  }, 60_000)

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

  it('installs the hive command', () => {
    expect(run(join(project, 'node_modules', '.bin', 'hive'), ['run', '--', 'sh', '-c', 'echo inside']).trim()).toBe('inside')
  }, 60_000)

  it('ships types that a strict TypeScript user compiles against', () => {
    writeFileSync(
      join(project, 'user.ts'),
      `import { getOrCreateSandbox, type SandboxConfig, type SandboxEvent, type HiveError } from 'hive'
       const config: SandboxConfig = { egress: [{ access: 'allow', host: 'pypi.org', ports: [443] }] }
       export async function main(): Promise<void> {
         const sandbox = await getOrCreateSandbox('typed', config)
         const current: SandboxConfig = await sandbox.getConfig()
         await sandbox.applyConfig({ ...current, egress: [] })
         for await (const event of sandbox.getEventsStream({ since: 'start' })) {
           const e: SandboxEvent = event
           if (e.type === 'egress.request' && e.access === 'denied') console.log(e.host.toUpperCase(), e.rule ?? 'no rule')
           break
         }
         const code: HiveError['code'] = 'HIVE_INVALID_CONFIG'
         console.log(code)
         await sandbox[Symbol.asyncDispose]()
       }`,
    )
    writeFileSync(
      join(project, 'tsconfig.json'),
      JSON.stringify({ compilerOptions: { strict: true, noEmit: true, module: 'nodenext', moduleResolution: 'nodenext', target: 'es2022', skipLibCheck: false, types: ['node'], typeRoots: [join(root, 'node_modules', '@types')] }, files: ['user.ts'] }),
    )
    const tsc = spawnSync(join(root, 'node_modules', '.bin', 'tsc'), ['-p', 'tsconfig.json'], { cwd: project, encoding: 'utf8' })
    expect(tsc.stdout).toBe('')
    expect(tsc.status).toBe(0)
  }, 120_000)
})

describe('where no binary applies', () => {
  it('names the platform, the libc and the supported list (HIVE_UNSUPPORTED_PLATFORM)', () => {
    const probe = (fake: string) =>
      JSON.parse(run('node', ['-e', `${fake}; try { require('hive') } catch (e) { console.log(JSON.stringify({ code: e.code, message: e.message })) }`]))
    const darwin = probe(`Object.defineProperty(process, 'platform', { value: 'darwin' }); Object.defineProperty(process, 'arch', { value: 'arm64' })`)
    expect(darwin.code).toBe('HIVE_UNSUPPORTED_PLATFORM')
    expect(darwin.message).toContain('platform darwin, arch arm64, libc no Linux libc')
    expect(darwin.message).toContain('linux-x64-gnu, linux-arm64-gnu, linux-x64-musl, linux-arm64-musl')
    const ppc = probe(`Object.defineProperty(process, 'arch', { value: 'ppc64' })`)
    expect(ppc.code).toBe('HIVE_UNSUPPORTED_PLATFORM')
    expect(ppc.message).toContain('platform linux, arch ppc64, libc glibc')
  })

  it('says which package is missing on a supported platform (HIVE_BINDING_NOT_FOUND)', () => {
    const bare = join(scratch, 'bare')
    mkdirSync(bare)
    writeFileSync(join(bare, 'package.json'), JSON.stringify({ name: 'bare', version: '1.0.0', private: true }))
    run('npm', ['install', '--offline', '--no-audit', '--no-fund', '--omit=optional', summary.main], bare)
    const out = run('node', ['-e', `try { require('hive') } catch (e) { console.log(e.code, e.message) }`], bare)
    expect(out).toMatch(/^HIVE_BINDING_NOT_FOUND .*hive-linux-x64-gnu/)
  }, 60_000)
})
