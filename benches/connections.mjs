// Per-connection costs seen by a client inside a sandbox (docs/network-access.md,
// docs/audit-log.md#attribution): a Python client in the sandbox opens fresh HTTPS connections one
// after another, without proxy variables (transparent capture, hive's DNS), each carrying one GET,
// to
//   - an allowed name (intercepted, forwarded to a loopback HTTPS upstream in another process), and
//   - a name no rule allows (hive completes the TLS handshake itself and answers 403 inside),
// once with attribution (every new connection mapped to its process) and once with it switched
// off (`HIVE_BENCH_NO_ATTRIBUTION=1`), each in a fresh Node process. The differences are the cost
// of attribution per connection and of explaining a denied HTTPS connection.
//
//   node benches/connections.mjs [connections-per-measurement]   (build the addon first: npm run build)
import { fork } from 'node:child_process'
import { mkdtempSync, rmSync } from 'node:fs'
import https from 'node:https'
import os, { tmpdir } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'

import { makeCA } from './lib/certs.mjs'

const HOST = 'api.bench.test'
const DENIED = 'denied.bench.test'
const COUNT = Number(process.argv[2] ?? 300)
const ROUNDS = 2

/** The upstream, in its own process: a short answer to everything. */
function upstream() {
  const { certPem, keyPem } = JSON.parse(process.env.BENCH_TLS)
  const server = https.createServer({ cert: certPem, key: keyPem }, (req, res) => {
    req.resume()
    req.on('end', () => res.end('{"ok":true}'))
  })
  server.listen(0, '127.0.0.1', () => process.send(server.address().port))
}

// Fresh connection per request, sequential; prints the mean microseconds of each target.
const CLIENT = `
import http.client, os, ssl, sys, time
ctx = ssl.create_default_context(cafile=os.environ["SSL_CERT_FILE"])
count = int(sys.argv[1])
for host in sys.argv[2:]:
    for warm in (True, False):
        n = 20 if warm else count
        t = time.perf_counter()
        for _ in range(n):
            c = http.client.HTTPSConnection(host, 443, context=ctx, timeout=10)
            c.request("GET", "/v1/x")
            r = c.getresponse(); r.read(); c.close()
        if not warm:
            print(host, r.status, round((time.perf_counter() - t) / n * 1e6))
`

/** One measurement process: a sandbox, the client, the means as JSON on stdout. */
async function measure() {
  const { getOrCreateSandbox } = await import('../index.js')
  const { caPem, port } = JSON.parse(process.env.BENCH_MEASURE)
  const home = mkdtempSync(join(tmpdir(), 'hive-bench-home-'))
  process.env.HIVE_HOME = home
  const sandbox = await getOrCreateSandbox(`bench-conn-${process.pid}`, {
    egress: [{ access: 'allow', host: HOST }],
    upstream: { resolve: { [`${HOST}:443`]: `127.0.0.1:${port}` }, ca: [caPem] },
  })
  try {
    const r = await sandbox.exec(['python3', '-c', CLIENT, String(COUNT), HOST, DENIED])
    if (r.exitCode !== 0) throw new Error(`client failed: ${r.stderr}`)
    const out = {}
    for (const line of r.stdout.trim().split('\n')) {
      const [host, status, micros] = line.split(' ')
      out[host] = { status: Number(status), micros: Number(micros) }
    }
    process.stdout.write(JSON.stringify(out))
  } finally {
    await sandbox.close()
    rmSync(home, { recursive: true, force: true })
  }
}

/** Starts the upstream process; resolves with it and its port. */
function startUpstream(tls) {
  return new Promise((resolve, reject) => {
    const proc = fork(fileURLToPath(import.meta.url), [], {
      env: { ...process.env, BENCH_ROLE: 'upstream', BENCH_TLS: JSON.stringify(tls) },
      stdio: ['ignore', 'inherit', 'inherit', 'ipc'],
    })
    proc.once('message', (port) => resolve({ proc, port }))
    proc.once('exit', (code) => reject(new Error(`upstream exited (${code})`)))
  })
}

/** One measurement in a fresh Node process; resolves with its means. */
function measureIn(env) {
  return new Promise((resolve, reject) => {
    const proc = fork(fileURLToPath(import.meta.url), [String(COUNT)], {
      env: { ...process.env, ...env },
      stdio: ['ignore', 'pipe', 'inherit', 'ipc'],
    })
    let out = ''
    proc.stdout.on('data', (d) => (out += d))
    proc.once('exit', (code) => (code === 0 ? resolve(JSON.parse(out)) : reject(new Error(`measurement exited (${code})`))))
  })
}

async function main() {
  const tls = makeCA(HOST)
  const { proc: upstreamProc, port } = await startUpstream(tls)
  const measure = { BENCH_ROLE: 'measure', BENCH_MEASURE: JSON.stringify({ caPem: tls.caPem, port }) }
  const runs = { on: [], off: [] }
  try {
    for (let round = 0; round < ROUNDS; round++) {
      runs.on.push(await measureIn({ ...measure, HIVE_BENCH_NO_ATTRIBUTION: '0' }))
      runs.off.push(await measureIn({ ...measure, HIVE_BENCH_NO_ATTRIBUTION: '1' }))
    }
  } finally {
    upstreamProc.kill()
  }
  const best = (list, host) => Math.min(...list.map((r) => r[host].micros))
  const status = (host) => runs.on[0][host].status
  const load = os.loadavg().map((l) => l.toFixed(2)).join(' ')
  console.log(`${os.cpus().length} cores, load average ${load}; ${COUNT} sequential new HTTPS connections per target from Python inside a sandbox (transparent capture), best of ${ROUNDS}\n`)
  console.log('| target | status | µs per connection, attribution on | attribution off | attribution cost |')
  console.log('| --- | ---: | ---: | ---: | ---: |')
  for (const [label, host] of [['allowed (forwarded upstream)', HOST], ['denied (403 inside TLS, nothing upstream)', DENIED]]) {
    const on = best(runs.on, host)
    const off = best(runs.off, host)
    console.log(`| ${label} | ${status(host)} | ${on} | ${off} | ${on - off} |`)
  }
  if (status(HOST) !== 200 || status(DENIED) !== 403) {
    console.error('unexpected status: the allowed target must answer 200 and the denied one 403')
    process.exitCode = 1
  }
}

if (process.env.BENCH_ROLE === 'upstream') upstream()
else if (process.env.BENCH_ROLE === 'measure') await measure()
else await main()
