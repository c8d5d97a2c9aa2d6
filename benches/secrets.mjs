// Named-secrets benchmark (docs/secrets.md): what placeholder substitution and response scrubbing
// cost against the plain intercepted path, measured in the same run through `sandbox.proxy()`
// (HTTPS, intercepted) to a loopback upstream in a child process. Two sandboxes with the same
// rule: one without secrets (plain intercepted), one whose request carries a placeholder in
// `Authorization` (substituted, and the response scrubbed). Rounds alternate between the two to
// spread machine noise. Prints a markdown table with the ratios.
//
//   node benches/secrets.mjs [seconds-per-measurement]   (build the addon first: npm run build)
import { fork } from 'node:child_process'
import https from 'node:https'
import net from 'node:net'
import os from 'node:os'
import tls from 'node:tls'
import { fileURLToPath } from 'node:url'
import zlib from 'node:zlib'

import { makeCA } from './lib/certs.mjs'
import { benchHome } from './lib/home.mjs'

const HOST = 'api.bench.test'
const MIB = 1024 * 1024
const SECONDS = Number(process.argv[2] ?? 3)
const ROUNDS = 2
const VALUE = 'sk-bench-0123456789abcdef0123456789abcdef'

/** The upstream: `/` a short answer, `/mib` 1 MiB of JSON-ish text, `/mib-gz` the same gzipped. */
async function upstream() {
  const { certPem, keyPem } = JSON.parse(process.env.BENCH_TLS)
  const line = '{"id":"chatcmpl-bench","object":"chat.completion","content":"lorem ipsum dolor sit amet"}\n'
  const mib = Buffer.from(line.repeat(Math.ceil(MIB / line.length)).slice(0, MIB))
  const gz = zlib.gzipSync(mib, { level: 6 })
  const server = https.createServer({ cert: certPem, key: keyPem }, (req, res) => {
    req.resume()
    req.on('end', () => {
      if (req.url === '/mib') {
        res.writeHead(200, { 'content-type': 'application/json', 'content-length': String(mib.length) })
        res.end(mib)
      } else if (req.url === '/mib-gz') {
        res.writeHead(200, { 'content-type': 'application/json', 'content-encoding': 'gzip', 'content-length': String(gz.length) })
        res.end(gz)
      } else {
        res.writeHead(200, { 'content-type': 'application/json', 'content-length': '11' })
        res.end('{"ok":true}')
      }
    })
  })
  server.keepAliveTimeout = 60_000
  await new Promise((r) => server.listen(0, '127.0.0.1', r))
  process.send({ https: server.address().port })
}

/** An https.Agent that opens each connection with CONNECT through the proxy, then TLS. */
class TunnelAgent extends https.Agent {
  constructor(proxyPort, auth, ca, options) {
    super(options)
    Object.assign(this, { proxyPort, auth, proxyCa: ca })
  }
  createConnection(options, callback) {
    const socket = net.connect({ host: '127.0.0.1', port: this.proxyPort, noDelay: true })
    socket.once('error', callback)
    socket.once('connect', () =>
      socket.write(`CONNECT ${HOST}:443 HTTP/1.1\r\nHost: ${HOST}:443\r\nProxy-Authorization: ${this.auth}\r\n\r\n`),
    )
    let head = ''
    const onData = (chunk) => {
      head += chunk.toString('latin1')
      if (!head.includes('\r\n\r\n')) return
      socket.off('data', onData)
      socket.off('error', callback)
      if (!head.startsWith('HTTP/1.1 200')) return callback(new Error(`CONNECT: ${head.split('\r\n')[0]}`))
      const t = tls.connect({ socket, servername: HOST, ca: this.proxyCa, ALPNProtocols: ['http/1.1'] })
      t.once('secureConnect', () => callback(null, t))
      t.once('error', callback)
    }
    socket.on('data', onData)
  }
}

function once(options) {
  return new Promise((resolve, reject) => {
    const start = process.hrtime.bigint()
    const req = https.request(options, (res) => {
      let bytes = 0
      res.on('data', (c) => (bytes += c.length))
      res.on('end', () => {
        if (res.statusCode !== 200) return reject(new Error(`status ${res.statusCode}`))
        resolve({ ns: Number(process.hrtime.bigint() - start), bytes })
      })
    })
    req.on('error', reject)
    req.end()
  })
}

async function measure(connections, request) {
  const latencies = []
  let bytes = 0
  const deadline = Date.now() + SECONDS * 1000
  const started = process.hrtime.bigint()
  await Promise.all(
    Array.from({ length: connections }, async () => {
      while (Date.now() < deadline) {
        const r = await request()
        latencies.push(r.ns)
        bytes += r.bytes
      }
    }),
  )
  const secs = Number(process.hrtime.bigint() - started) / 1e9
  latencies.sort((a, b) => a - b)
  const pct = (p) => latencies[Math.min(latencies.length - 1, Math.floor(latencies.length * p))] / 1e6
  return { rps: latencies.length / secs, p50: pct(0.5), p99: pct(0.99), mibs: bytes / MIB / secs }
}

/** The mean of each field over several measurements. */
function mean(runs) {
  const out = {}
  for (const k of Object.keys(runs[0])) out[k] = runs.reduce((s, r) => s + r[k], 0) / runs.length
  return out
}

async function main() {
  const { getOrCreateSandbox } = await import('../index.js')
  benchHome()
  const ca = makeCA(HOST)
  const child = fork(fileURLToPath(import.meta.url), ['--upstream'], { env: { ...process.env, BENCH_TLS: JSON.stringify(ca) }, stdio: 'inherit' })
  process.on('exit', () => child.kill())
  const ports = await new Promise((r) => child.once('message', r))
  const upstreamConfig = { resolve: { [`${HOST}:443`]: `127.0.0.1:${ports.https}` }, ca: [ca.caPem] }

  const plain = await getOrCreateSandbox('bench-secrets-plain', { egress: [{ access: 'allow', host: HOST }], upstream: upstreamConfig })
  const secret = await getOrCreateSandbox('bench-secrets-on', {
    secrets: { API_KEY: { value: VALUE, hosts: [HOST] } },
    env: { API_KEY: '{{secrets.API_KEY}}' },
    egress: [{ access: 'allow', host: HOST }],
    upstream: upstreamConfig,
  })
  // The placeholder, as a process inside sees it.
  const placeholder = (await secret.exec(['sh', '-c', 'printf %s "$API_KEY"'])).stdout
  if (!/^hive_ph_[a-z2-7]{32}$/.test(placeholder)) throw new Error(`no placeholder: ${placeholder}`)

  const via = async (sandbox) => {
    const proxy = await sandbox.proxy()
    const url = new URL(proxy.url)
    return { proxy, auth: `Basic ${Buffer.from(`${url.username}:${url.password}`).toString('base64')}`, port: Number(url.port) }
  }
  const [p, s] = [await via(plain), await via(secret)]
  const keepAlive = (n) => ({ keepAlive: true, maxSockets: n, maxFreeSockets: n })
  const request = (target, path, conns, headers) => {
    const agent = new TunnelAgent(target.port, target.auth, target.proxy.ca, keepAlive(conns))
    return () => once({ host: HOST, port: 443, path, agent, headers })
  }

  const scenarios = [
    ['small request, 1 conn: substitution', 1, '/'],
    ['small request, 8 conns: substitution', 8, '/'],
    ['1 MiB identity, 4 conns: scrubbing', 4, '/mib'],
    ['1 MiB gzip, 4 conns: decode + scrubbing', 4, '/mib-gz'],
  ]
  const rows = []
  for (const [name, conns, path] of scenarios) {
    const base = []
    const withSecret = []
    const plainReq = request(p, path, conns, { authorization: 'Bearer not-a-placeholder-0000000000000000000' })
    const secretReq = request(s, path, conns, { authorization: `Bearer ${placeholder}`, 'accept-encoding': 'gzip' })
    for (let round = 0; round < ROUNDS; round++) {
      base.push(await measure(conns, plainReq))
      withSecret.push(await measure(conns, secretReq))
    }
    rows.push([name, mean(base), mean(withSecret)])
    console.error(`done: ${name}`)
  }

  const f = (n, d = 0) => n.toFixed(d)
  const load = os.loadavg().map((l) => l.toFixed(2)).join(' ')
  console.log(`Loopback HTTPS through sandbox.proxy() (intercepted), ${ROUNDS} alternating rounds of ${SECONDS} s, Node ${process.version}, ${os.cpus().length} cores, load average ${load}. "plain" = the same rule without secrets; "secret" = the request carries a placeholder (substituted; the response scrubbed, a gzip body decoded and delivered decoded).\n`)
  console.log('| scenario | plain req/s | secret req/s | ratio | plain p50/p99 ms | secret p50/p99 ms | plain MiB/s | secret MiB/s |')
  console.log('| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |')
  for (const [name, b, v] of rows) {
    console.log(`| ${name} | ${f(b.rps)} | ${f(v.rps)} | ${f(v.rps / b.rps, 2)}× | ${f(b.p50, 2)}/${f(b.p99, 2)} | ${f(v.p50, 2)}/${f(v.p99, 2)} | ${f(b.mibs, 1)} | ${f(v.mibs, 1)} |`)
  }
  for (const t of [p, s]) await t.proxy.close()
  await plain.close()
  await secret.close()
  child.kill()
}

if (process.argv[2] === '--upstream') {
  await upstream()
} else {
  await main()
}
