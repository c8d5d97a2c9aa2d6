// `npm run bench`: every benchmark, each printing a markdown table with its baseline measured in
// the same run. Every part runs even when an earlier one fails; the failures are listed at the end
// (and the exit status is 1). Rust benchmarks build the plain engine (`--no-default-features`, no
// napi symbols) with the bench profile (optimized, LTO off).
//
//   npm run bench [-- <part>]     parts: build, policy, fs, proxy, proxy-node, sandbox, secrets, connections
import { spawnSync } from 'node:child_process'
import { existsSync } from 'node:fs'
import os from 'node:os'
import { fileURLToPath } from 'node:url'

const root = fileURLToPath(new URL('..', import.meta.url))
const only = process.argv[2]
const failed = []

function step(name, cmd, args) {
  if (only && only !== name) return true
  console.log(`\n## ${name}\n`)
  const result = spawnSync(cmd, args, { cwd: root, stdio: 'inherit' })
  if (result.status === 0) return true
  const why = result.error ? result.error.message : `exit status ${result.status ?? result.signal}`
  console.log(`\n**${name} failed** (${why})`)
  failed.push(`${name}: ${why}`)
  return false
}

const load = () => os.loadavg().map((l) => l.toFixed(2)).join(' ')
console.log(`${os.cpus().length} cores (${os.cpus()[0]?.model ?? 'unknown'}), load average ${load()} at start`)

// The JS benchmarks load the addon: build it in release first (tests rebuild debug).
const needsAddon = !only || ['build', 'proxy', 'proxy-node', 'sandbox', 'secrets', 'connections'].includes(only)
const built = needsAddon ? step('build', 'npm', ['run', '--silent', 'build']) : true
step('policy', 'cargo', ['bench', '--quiet', '--no-default-features', '--bench', 'policy'])
// File ACL overhead: the same workloads in one sandbox on a FUSE mount with ACLs and on a plain
// bind mount (an ignored Rust test, optimized; needs a usable /dev/fuse, else it says so).
step('fs', 'cargo', [
  'test', '--quiet', '--no-default-features', '--profile', 'bench', '--lib', 'bench_sandboxed_fs', '--',
  '--ignored', '--nocapture',
])
for (const [name, file] of [
  // oha (its own process) against nginx, direct and through hive.
  ['proxy', 'benches/proxy.mjs'],
  // The older view: Node's own client in the proxy's process against a Node upstream.
  ['proxy-node', 'benches/proxy_node.mjs'],
  ['sandbox', 'benches/sandbox.mjs'],
  ['secrets', 'benches/secrets.mjs'],
  // Per-connection costs inside a sandbox: attribution, and a denied HTTPS connection's 403.
  ['connections', 'benches/connections.mjs'],
]) {
  if (!existsSync(new URL(`../${file}`, import.meta.url))) continue
  if (!built) {
    if (!only || only === name) failed.push(`${name}: skipped, the release addon did not build`)
    continue
  }
  step(name, process.execPath, [file])
}

console.log(`\nload average ${load()} at end`)
if (failed.length > 0) {
  console.log(`\n## failures\n\n${failed.map((f) => `- ${f}`).join('\n')}`)
  process.exitCode = 1
}
