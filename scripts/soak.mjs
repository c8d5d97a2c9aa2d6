#!/usr/bin/env node
// Soak: 8 sandboxes for N minutes (default 10) with mixed allowed and denied traffic, exec churn and
// an applyConfig every second, all against a loopback upstream started here. It prints the host
// process's file descriptors and RSS each minute and checks, at the end:
//   - descriptors: never above 200 per sandbox while it runs (each sandbox's upstream pool keeps up
//     to 64 idle connections, two descriptors each here because the upstream lives in this
//     process), and back within 16 of the start once the sandboxes are closed and a GC ran (no
//     leak);
//   - RSS: at most 50 % above the value after the first minute;
//   - no error other than the expected denials (every allowed request 200, every denied one 403);
//   - every allowed request is in the sandbox's audit log (an allowed `egress.request` event with
//     its path).
// Exits 1 on any violation. Loopback only; not part of `npm test`. SOAK_DEBUG=1 also prints what
// the descriptors left after close are (pipes, pidfds, sockets, files).
//
//   node --expose-gc scripts/soak.mjs [--minutes N] [--sandboxes N]
import { createServer } from 'node:http'
import { mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { parseArgs } from 'node:util'

const { values } = parseArgs({
  options: { minutes: { type: 'string', default: '10' }, sandboxes: { type: 'string', default: '8' } },
})
const minutes = Number(values.minutes)
const count = Number(values.sandboxes)
if (!(minutes > 0) || !(count > 0)) {
  console.error('usage: node scripts/soak.mjs [--minutes N] [--sandboxes N]')
  process.exit(2)
}

const home = mkdtempSync(join(tmpdir(), 'hive-soak-'))
process.env.HIVE_HOME = home
const { getOrCreateSandbox, deleteSandbox } = await import('../index.mjs')

// The upstream: counts what it served, by path.
const served = new Map()
const upstream = createServer((req, res) => {
  served.set(req.url, (served.get(req.url) ?? 0) + 1)
  res.end('ok\n')
})
await new Promise((resolve) => upstream.listen(0, '127.0.0.1', resolve))
const port = upstream.address().port

const config = (extra) => ({
  egress: [
    { access: 'allow', host: 'allowed.test', ports: [80], methods: ['GET'] },
    ...(extra ? [{ access: 'allow', host: 'extra.test' }] : []),
  ],
  upstream: { resolve: { 'allowed.test:80': `127.0.0.1:${port}` } },
})

const fds = () => readdirSync('/proc/self/fd').length
const rss = () => Math.round(process.memoryUsage().rss / 2 ** 20)
const samples = [{ minute: 0, fds: fds(), rssMiB: rss(), execs: 0, allowed: 0, denied: 0, errors: 0 }]
const stats = { execs: 0, allowed: 0, denied: 0, errors: 0, applies: 0 }
const errors = []
const allowedPaths = new Map() // sandbox name -> paths that were answered 200

const sandboxes = []
for (let i = 0; i < count; i++) {
  const name = `soak-${i}`
  sandboxes.push(await getOrCreateSandbox(name, config(false)))
  allowedPaths.set(name, [])
}

const deadline = Date.now() + minutes * 60_000
let seq = 0

// One worker per sandbox: a command that makes one allowed and one denied request, again and again.
async function churn(sandbox, index) {
  const name = `soak-${index}`
  while (Date.now() < deadline) {
    const id = `${index}-${seq++}`
    const script =
      `curl -s -o /dev/null -w '%{http_code}\\n' http://allowed.test/ok/${id}; ` +
      `curl -s -o /dev/null -w '%{http_code}\\n' http://denied.test/no/${id}`
    try {
      const { exitCode, stdout, stderr } = await sandbox.exec(script, { timeoutMs: 30_000 })
      stats.execs += 1
      const [allowed, denied] = stdout.trim().split('\n')
      if (exitCode !== 0 || allowed !== '200' || denied !== '403') {
        stats.errors += 1
        errors.push(`${name} ${id}: exit ${exitCode}, codes ${JSON.stringify(stdout)} ${stderr.slice(0, 200)}`)
      } else {
        stats.allowed += 1
        stats.denied += 1
        allowedPaths.get(name).push(`/ok/${id}`)
      }
    } catch (e) {
      stats.errors += 1
      errors.push(`${name} ${id}: ${e.code ?? ''} ${e.message}`)
    }
  }
}

// applyConfig every second on every sandbox, alternating two configs.
const applier = setInterval(() => {
  const extra = stats.applies % 2 === 0
  stats.applies += 1
  for (const [i, sandbox] of sandboxes.entries()) {
    sandbox.applyConfig(config(extra)).catch((e) => {
      stats.errors += 1
      errors.push(`soak-${i} applyConfig: ${e.code ?? ''} ${e.message}`)
    })
  }
}, 1000)

const sampler = setInterval(() => {
  samples.push({ minute: samples.length, fds: fds(), rssMiB: rss(), ...pick(stats) })
  console.log(row(samples.at(-1)))
}, 60_000)

function pick({ execs, allowed, denied, errors }) {
  return { execs, allowed, denied, errors }
}
function row(s) {
  return `| ${s.minute} | ${s.fds} | ${s.rssMiB} | ${s.execs} | ${s.allowed} | ${s.denied} | ${s.errors} |`
}

console.log(`soak: ${count} sandboxes, ${minutes} min, upstream 127.0.0.1:${port}, load ${readFileSync('/proc/loadavg', 'utf8').trim()}`)
console.log('| minute | fds | RSS MiB | execs | allowed | denied | errors |')
console.log('| --- | --- | --- | --- | --- | --- | --- |')
console.log(row(samples[0]))
await Promise.all(sandboxes.map((s, i) => churn(s, i)))
clearInterval(applier)
clearInterval(sampler)
await new Promise((resolve) => setTimeout(resolve, 1500)) // the last applyConfig calls settle
const end = { minute: 'end', fds: fds(), rssMiB: rss(), ...pick(stats) }
console.log(row(end))

// Every allowed request in its sandbox's audit log (read after close, when the log is complete).
for (const sandbox of sandboxes) await sandbox.close()
await new Promise((resolve) => setTimeout(resolve, 1000)) // the upstream sees its sockets close
// A finished process releases its pidfd and pipes once its output was read to the end (no GC
// needed: the check holds without --expose-gc too); the GC only settles other handles.
globalThis.gc?.()
await new Promise((resolve) => setTimeout(resolve, 500))
globalThis.gc?.()
const closedFds = fds()
console.log(`fds after close: ${closedFds}`)
if (process.env.SOAK_DEBUG) {
  const { readlinkSync } = await import('node:fs')
  const kinds = {}
  for (const fd of readdirSync('/proc/self/fd')) { try { const k = readlinkSync(`/proc/self/fd/${fd}`).replace(/\d+/g, 'N'); kinds[k] = (kinds[k] ?? 0) + 1 } catch {} }
  console.log(kinds)
  for (const wait of [6000]) { await new Promise((r) => setTimeout(r, wait)); console.log(`fds ${wait} ms later: ${fds()}`) }
  upstream.closeAllConnections?.()
  await new Promise((r) => setTimeout(r, 500)); console.log(`fds after the upstream drops its connections: ${fds()}`)
}
let missing = 0
for (const [name, paths] of allowedPaths) {
  const dir = join(home, 'sandboxes', name)
  const logged = new Set()
  for (const file of readdirSync(dir).filter((f) => f.startsWith('audit.jsonl'))) {
    for (const line of readFileSync(join(dir, file), 'utf8').split('\n')) {
      if (!line) continue
      const e = JSON.parse(line)
      if (e.type === 'egress.request' && e.access === 'allowed') logged.add(e.path)
    }
  }
  const absent = paths.filter((p) => !logged.has(p))
  missing += absent.length
  if (absent.length) errors.push(`${name}: ${absent.length} allowed requests not in the audit log, e.g. ${absent[0]}`)
}
const upstreamSawDenied = [...served.keys()].filter((p) => p.startsWith('/no/')).length

const warm = samples[1] ?? samples[0]
const peakFds = Math.max(...samples.map((s) => s.fds), end.fds)
const checks = [
  [`peak fds while running (${peakFds}) <= 200 per sandbox (${200 * count})`, peakFds <= 200 * count],
  [`fds after close (${closedFds}) <= at start (${samples[0].fds}) + 16`, closedFds <= samples[0].fds + 16],
  [`RSS at end (${end.rssMiB} MiB) <= 1.5 x after warm-up (${warm.rssMiB} MiB)`, end.rssMiB <= warm.rssMiB * 1.5],
  [`no errors other than the expected denials (${stats.errors})`, stats.errors === 0],
  [`every allowed request in the audit log (${missing} missing of ${stats.allowed})`, missing === 0],
  [`the upstream saw no denied request (${upstreamSawDenied})`, upstreamSawDenied === 0],
  [`applyConfig calls: ${stats.applies}`, stats.applies > 0],
]
for (const [what, ok] of checks) console.log(`${ok ? 'ok  ' : 'FAIL'} ${what}`)
for (const e of errors.slice(0, 20)) console.log(`  ${e}`)

for (let i = 0; i < count; i++) await deleteSandbox(`soak-${i}`)
upstream.close()
rmSync(home, { recursive: true, force: true })
process.exit(checks.every(([, ok]) => ok) ? 0 : 1)
