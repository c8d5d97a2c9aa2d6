// Sandbox start latency: exec(["true"]) in a running hive sandbox (warm) and as the first exec of a
// new sandbox (cold: namespaces, init, mounts), vs a plain child_process.spawn of `true` and vs
// bubblewrap when installed (`bwrap --unshare-all --ro-bind / / --dev /dev --proc /proc true`,
// which creates its namespaces every time), measured in the same run; plus the memory of an idle
// sandbox. Prints a markdown table.
import { spawn, spawnSync } from 'node:child_process'
import { mkdtempSync, readFileSync, readdirSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

import { getOrCreateSandbox } from '../index.js'

const RUNS = Number(process.env.BENCH_RUNS ?? 100)
const home = mkdtempSync(join(tmpdir(), 'hive-bench-'))
process.env.HIVE_HOME = home

function stats(samples) {
  const sorted = [...samples].sort((a, b) => a - b)
  const at = (q) => sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))]
  return { median: at(0.5), p90: at(0.9) }
}

/** Median/p90 of `fn`'s duration, or of the milliseconds it returns when `timesItself`. */
async function measure(fn, timesItself = false) {
  for (let i = 0; i < 5; i++) await fn() // warm-up
  const samples = []
  for (let i = 0; i < RUNS; i++) {
    const start = process.hrtime.bigint()
    const own = await fn()
    samples.push(timesItself ? own : Number(process.hrtime.bigint() - start) / 1e6)
  }
  return stats(samples)
}

const plain = () =>
  new Promise((resolve, reject) => spawn('true', { stdio: 'ignore' }).on('exit', resolve).on('error', reject))
const bwrapPath = spawnSync('sh', ['-c', 'command -v bwrap'], { encoding: 'utf8' }).stdout.trim()
const bwrap = () =>
  new Promise((resolve, reject) =>
    spawn(bwrapPath, ['--unshare-all', '--ro-bind', '/', '/', '--dev', '/dev', '--proc', '/proc', 'true'], { stdio: 'ignore' })
      .on('exit', resolve)
      .on('error', reject),
  )

const sandbox = await getOrCreateSandbox('bench')
const first = process.hrtime.bigint()
await sandbox.exec(['true'])
const coldMs = Number(process.hrtime.bigint() - first) / 1e6

const rows = [['hive `exec(["true"])`, warm (running sandbox)', await measure(() => sandbox.exec(['true']))]]
rows.push(['`child_process.spawn("true")`', await measure(plain)])
if (bwrapPath) rows.push(['`bwrap --unshare-all --ro-bind / / --dev /dev --proc /proc true`', await measure(bwrap)])
// Cold: a new sandbox's first exec (namespaces, init, mounts, listeners), then close.
let coldRun = 0
rows.push([
  'hive first `exec(["true"])` of a new sandbox, cold',
  await measure(async () => {
    const s = await getOrCreateSandbox(`bench-cold-${coldRun++}`)
    const start = process.hrtime.bigint()
    await s.exec(['true'])
    const ms = Number(process.hrtime.bigint() - start) / 1e6
    await s.close()
    return ms
  }, true),
])

// Memory of the idle sandbox: the RSS of its processes (init) as the host sees them.
function sandboxRssKiB() {
  let total = 0
  for (const pid of readdirSync('/proc').filter((p) => /^\d+$/.test(p))) {
    try {
      const status = readFileSync(`/proc/${pid}/status`, 'utf8')
      const ppid = Number(/PPid:\s+(\d+)/.exec(status)?.[1])
      if (ppid === process.pid && /NSpid:\s+\d+\s+1\b/.test(status)) total += Number(/VmRSS:\s+(\d+)/.exec(status)?.[1] ?? 0)
    } catch {}
  }
  return total
}
const rssBefore = process.memoryUsage().rss
const idle = sandboxRssKiB()

const base = rows[1][1].median
console.log(`runs: ${RUNS} each (after 5 warm-up runs); first exec, which starts the namespaces: ${coldMs.toFixed(2)} ms\n`)
console.log('| command | median ms | p90 ms | median vs plain spawn |')
console.log('| --- | ---: | ---: | ---: |')
for (const [name, s] of rows) console.log(`| ${name} | ${s.median.toFixed(2)} | ${s.p90.toFixed(2)} | ${(s.median / base).toFixed(2)}× |`)
if (bwrapPath) {
  const bw = rows[2][1].median
  console.log(`\nwarm hive / bwrap: ${(rows[0][1].median / bw).toFixed(2)}×; cold hive / bwrap: ${(rows.at(-1)[1].median / bw).toFixed(2)}×`)
}
console.log(`hive median - plain spawn median: ${(rows[0][1].median - base).toFixed(2)} ms`)
console.log(`idle sandbox: init RSS ${idle} KiB (host Node RSS ${(rssBefore / 1048576).toFixed(1)} MiB)`)

await sandbox.close()
rmSync(home, { recursive: true, force: true })
