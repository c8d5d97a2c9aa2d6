// Proxy benchmark, "Node client" view: Node's own http/https client runs as one JS thread inside
// the proxy's process against a Node upstream, and resumes TLS sessions. It flatters the proxy
// (the load generator is slow and shares the process): see benches/proxy.mjs (oha against nginx)
// for the numbers that compare with other proxies. Loopback only, each scenario measured directly
// and through `sandbox.proxy()` in the same run. Prints a markdown table: requests/s, p50/p99
// latency and MiB/s, each with its ratio to direct.
//
//   node benches/proxy_node.mjs [seconds-per-scenario]   (build the addon first: npm run build)
import { fork } from 'node:child_process'
import http from 'node:http'
import https from 'node:https'
import net from 'node:net'
import os from 'node:os'
import tls from 'node:tls'
import { fileURLToPath } from 'node:url'

import { makeCA } from './lib/certs.mjs'
import { benchHome } from './lib/home.mjs'

const HOST = 'bench.hive.test'
const MIB = 1024 * 1024
const SECONDS = Number(process.argv[2] ?? 3)
/** Optional substring filter on scenario names (third argument). */
const ONLY = process.argv[3]

// ---------------------------------------------------------------------------------------------
// Upstream child process

// ---------------------------------------------------------------------------------------------
// Clients

/** An https.Agent that opens each connection with CONNECT through the proxy, then TLS. */
class TunnelAgent extends https.Agent {
  constructor(proxyPort, auth, ca, options) {
    super(options)
    this.proxyPort = proxyPort
    this.auth = auth
    this.proxyCa = ca
  }
  createConnection(options, callback) {
    // A raw CONNECT (as curl writes it), then TLS over the same socket.
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
      // Resume TLS sessions the way https.Agent does for direct connections, so both sides of the
      // comparison do the same kind of handshake.
      const key = options._agentKey
      const t = tls.connect({ socket, servername: HOST, ca: this.proxyCa, ALPNProtocols: ['http/1.1'], session: this._getSession(key) })
      t.on('session', (s) => this._cacheSession(key, s))
      t.once('secureConnect', () => callback(null, t))
      t.once('error', callback)
    }
    socket.on('data', onData)
  }
}

function once(mod, options) {
  return new Promise((resolve, reject) => {
    const start = process.hrtime.bigint()
    const req = mod.request(options, (res) => {
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

/** Runs `connections` sequential loops of `request()` for SECONDS; returns the stats. */
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

// ---------------------------------------------------------------------------------------------

async function main() {
  const { getOrCreateSandbox } = await import('../index.js')
  benchHome()
  const ca = makeCA(HOST)
  const child = fork(fileURLToPath(import.meta.url), ['--upstream'], {
    env: { ...process.env, BENCH_TLS: JSON.stringify(ca) },
    stdio: 'inherit',
  })
  process.on('exit', () => child.kill())
  const ports = await new Promise((r) => child.once('message', r))

  const sandbox = await getOrCreateSandbox('bench-proxy', {
    egress: [{ access: 'allow', host: HOST }],
    upstream: {
      resolve: { [`${HOST}:80`]: `127.0.0.1:${ports.http}`, [`${HOST}:443`]: `127.0.0.1:${ports.https}` },
      ca: [ca.caPem],
    },
  })
  const proxy = await sandbox.proxy()
  const url = new URL(proxy.url)
  const auth = `Basic ${Buffer.from(`${url.username}:${url.password}`).toString('base64')}`
  const proxyPort = Number(url.port)

  const httpVia = (path, agent) => () =>
    once(http, { host: '127.0.0.1', port: proxyPort, path: `http://${HOST}${path}`, agent, headers: { host: HOST, 'proxy-authorization': auth } })
  const httpDirect = (path, agent) => () =>
    once(http, { host: '127.0.0.1', port: ports.http, path, agent, headers: { host: HOST } })
  const httpsVia = (path, agent) => () => once(https, { host: HOST, port: 443, path, agent })
  const httpsDirect = (path, agent) => () =>
    once(https, { host: '127.0.0.1', port: ports.https, servername: HOST, path, agent, headers: { host: HOST } })

  const keepAlive = (n) => ({ keepAlive: true, maxSockets: n, maxFreeSockets: n })
  const scenarios = [
    ['plain HTTP keep-alive, 1 conn', 1, '/', 'http', keepAlive(1)],
    ['plain HTTP keep-alive, 32 conns', 32, '/', 'http', keepAlive(32)],
    ['HTTPS keep-alive, 1 conn', 1, '/', 'https', keepAlive(1)],
    ['HTTPS keep-alive, 32 conns', 32, '/', 'https', keepAlive(32)],
    ['HTTPS new connection per request, 1 at a time', 1, '/', 'https', { keepAlive: false }],
    ['HTTPS new connection per request, 8 at once', 8, '/', 'https', { keepAlive: false }],
    ['plain HTTP 1 MiB, 4 conns', 4, '/mib', 'http', keepAlive(4)],
    ['HTTPS 1 MiB, 4 conns', 4, '/mib', 'https', keepAlive(4)],
  ]

  const rows = []
  for (const [name, conns, path, scheme, agentOptions] of scenarios) {
    if (ONLY && !name.includes(ONLY)) continue
    let direct
    let via
    if (scheme === 'http') {
      direct = await measure(conns, httpDirect(path, new http.Agent(agentOptions)))
      via = await measure(conns, httpVia(path, new http.Agent(agentOptions)))
    } else {
      direct = await measure(conns, httpsDirect(path, new https.Agent({ ...agentOptions, ca: ca.caPem })))
      via = await measure(conns, httpsVia(path, new TunnelAgent(proxyPort, auth, proxy.ca, agentOptions)))
    }
    rows.push([name, direct, via])
    console.error(`done: ${name}`)
  }

  const f = (n, d = 0) => n.toFixed(d)
  const load = os.loadavg().map((l) => l.toFixed(2)).join(' ')
  console.log(`Node client view (load generator inside the proxy's process, TLS sessions resumed). Loopback, ${SECONDS} s per measurement, Node ${process.version}, ${os.cpus().length} cores, load average ${load}; "via" = through sandbox.proxy() (intercepted for HTTPS).\n`)
  console.log('| scenario | direct req/s | via req/s | ratio | direct p50/p99 ms | via p50/p99 ms | direct MiB/s | via MiB/s | MiB/s ratio |')
  console.log('| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |')
  for (const [name, d, v] of rows) {
    console.log(
      `| ${name} | ${f(d.rps)} | ${f(v.rps)} | ${f(v.rps / d.rps, 2)}× | ${f(d.p50, 2)}/${f(d.p99, 2)} | ${f(v.p50, 2)}/${f(v.p99, 2)} | ${f(d.mibs, 1)} | ${f(v.mibs, 1)} | ${f(v.mibs / d.mibs, 2)}× |`,
    )
  }

  await proxy.close()
  await sandbox.close()
  child.kill()
}

if (process.argv[2] === '--upstream') {
  await upstream()
} else {
  await main()
}

async function upstream() {
  const { certPem, keyPem } = JSON.parse(process.env.BENCH_TLS)
  const big = Buffer.alloc(MIB, 0x61)
  const small = Buffer.from('ok')
  const handler = (req, res) => {
    const body = req.url.startsWith('/mib') ? big : small
    res.writeHead(200, { 'content-type': 'application/octet-stream', 'content-length': body.length })
    res.end(body)
  }
  const plain = http.createServer({ keepAliveTimeout: 60_000 }, handler)
  const secure = https.createServer({ cert: certPem, key: keyPem, keepAliveTimeout: 60_000 }, handler)
  await new Promise((r) => plain.listen(0, '127.0.0.1', r))
  await new Promise((r) => secure.listen(0, '127.0.0.1', r))
  process.send({ http: plain.address().port, https: secure.address().port })
  process.on('disconnect', () => process.exit(0))
}
