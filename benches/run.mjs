// `npm run bench`: every benchmark, each printing a markdown table with its baseline measured in
// the same run. Rust benchmarks build with the bench profile (optimized, LTO off).
import { spawnSync } from 'node:child_process'
import { existsSync } from 'node:fs'
import { fileURLToPath } from 'node:url'

const root = fileURLToPath(new URL('..', import.meta.url))
const only = process.argv[2]

function step(name, cmd, args) {
  if (only && only !== name) return
  console.log(`\n## ${name}\n`)
  const result = spawnSync(cmd, args, { cwd: root, stdio: 'inherit' })
  if (result.status !== 0) process.exit(result.status ?? 1)
}

// The JS benchmarks load the addon: build it in release first (tests rebuild debug).
if (!only || (only !== 'policy' && only !== 'fs')) step('build (release)', 'npm', ['run', '--silent', 'build'])
step('policy', 'cargo', ['bench', '--quiet', '--bench', 'policy'])
// File ACL overhead (issue 6): the same workloads in one sandbox on a FUSE mount with ACLs and on
// a plain bind mount (an ignored Rust test, optimized; needs a usable /dev/fuse, else it says so).
step('fs', 'cargo', [
  'test', '--quiet', '--profile', 'bench', '--lib', 'bench_sandboxed_fs', '--', '--ignored', '--nocapture',
])
for (const [name, file] of [
  ['proxy', 'benches/proxy.mjs'],
  ['sandbox', 'benches/sandbox.mjs'],
  ['secrets', 'benches/secrets.mjs'],
]) {
  if (existsSync(new URL(`../${file}`, import.meta.url))) step(name, process.execPath, [file])
}
