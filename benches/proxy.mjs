// Proxy benchmark: a native load generator in its own process (`oha`) against nginx on loopback,
// each scenario measured directly and through `sandbox.proxy()` in the same run. Neither nginx nor
// hive's intercepting side resumes a TLS session (HIVE_BENCH_NO_RESUMPTION), so every new
// connection is a full handshake on both paths. Prints cores,
// load average, requests/s and latency with their ratio to direct, errors, the hive process's CPU
// time per request, and its RSS before, at the peak of and 30 s after the c1000 run. The "bare
// relay (floor)" rows send the same load through crates/floor-relay, a TLS-intercepting relay
// with nothing of hive's in it (two heads parsed, two reads and two writes per request), so that
// hive's CPU per request reads against what any such relay costs on this machine. The "squid
// opaque tunnel" row sends the passthrough row's load through squid's CONNECT tunnel (squid from
// PATH or /usr/sbin, else `apt-get install -y squid` when root; skipped without it), the
// reference issue 13 names for passthrough, with squid's CPU time per request.
//
//   node benches/proxy.mjs [seconds-per-scenario] [name filter]   (build the addon first: npm run build)
//   BENCH_ROUNDS=3 node benches/proxy.mjs    (each scenario 3 times; the median round is shown)
//   BENCH_PERF=/tmp/perf node benches/proxy.mjs 5 c256   (`perf record -g` of hive's process during
//   each "via" run, one file per scenario and round; build with `--profile profiling` for symbols;
//   BENCH_PERF_CALLGRAPH=dwarf for stacks through libc; BENCH_PERF_STAT=raw_syscalls:sys_enter,...
//   for `perf stat` counts of those events instead of a profile, of hive's process alone (not oha);
//   BENCH_PERF_INTERVAL_MS=1000 for counts per second)
//
// Tools: `oha` from PATH or ~/.cache/hive-bench/bin, else installed there from crates.io
// (`cargo install oha --locked`, minutes on 2 cores); nginx from PATH or /usr/sbin, else
// `apt-get install -y nginx-light` when running as root.
import { execFileSync, spawn, spawnSync } from 'node:child_process'
import { randomBytes } from 'node:crypto'
import { chmodSync, existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import net from 'node:net'
import os, { homedir, tmpdir } from 'node:os'
import { join } from 'node:path'
import { setTimeout as sleep } from 'node:timers/promises'
import { fileURLToPath } from 'node:url'
import { benchHome } from './lib/home.mjs'

const HOST = 'bench.hive.test'
/** Allowed by a `tls: "passthrough"` rule. */
const PASS_HOST = 'pass.hive.test'
/** Allowed by a rule that injects a header (`override`), so its responses are scrubbed too. */
const INJECT_HOST = 'api.hive.test'
const MIB = 1024 * 1024
/** The passthrough row's load through squid's opaque CONNECT tunnel instead of hive. */
const SQUID_ROW = 'HTTPS keep-alive c32, squid opaque tunnel (passthrough reference)'
const SECONDS = Number(process.argv[2] ?? process.env.BENCH_SECONDS ?? 5)
const ONLY = process.argv[3]
const SETTLE_SECONDS = 30
// Rounds per scenario (direct, then via, alternately); the round with the median ratio is shown,
// with the range of the ratios. This machine's load moves single runs a lot.
const ROUNDS = Math.max(1, Math.floor(Number(process.env.BENCH_ROUNDS ?? 1)) || 1)
const CACHE = join(homedir(), '.cache', 'hive-bench')

// ---------------------------------------------------------------------------------------------
// Tools

function which(name, extra = []) {
  for (const dir of [...(process.env.PATH ?? '').split(':'), ...extra]) {
    if (dir && existsSync(join(dir, name))) return join(dir, name)
  }
  return null
}

function ensureOha() {
  const found = which('oha', [join(CACHE, 'bin')])
  if (found) return found
  console.error(`installing oha into ${CACHE} (cargo install oha --locked; takes minutes)…`)
  const r = spawnSync('cargo', ['install', 'oha', '--locked', '--root', CACHE], { stdio: 'inherit' })
  if (r.status !== 0) throw new Error('cargo install oha failed; install it and put it on PATH')
  return join(CACHE, 'bin', 'oha')
}

function ensureNginx() {
  const found = which('nginx', ['/usr/sbin'])
  if (found) return found
  if (process.getuid?.() === 0) {
    console.error('installing nginx-light (apt-get)…')
    spawnSync('apt-get', ['install', '-y', 'nginx-light'], { stdio: 'inherit', env: { ...process.env, DEBIAN_FRONTEND: 'noninteractive' } })
    const again = which('nginx', ['/usr/sbin'])
    if (again) return again
  }
  throw new Error('nginx not found: apt-get install -y nginx-light')
}

function freePort() {
  return new Promise((resolve, reject) => {
    const s = net.createServer()
    s.once('error', reject)
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address()
      s.close(() => resolve(port))
    })
  })
}

function makeCerts(dir) {
  const run = (...args) => execFileSync('openssl', args, { cwd: dir, stdio: 'pipe' })
  run('req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-days', '2',
    '-subj', '/CN=hive bench CA', '-keyout', 'ca.key', '-out', 'ca.pem',
    '-addext', 'basicConstraints=critical,CA:TRUE', '-addext', 'keyUsage=critical,keyCertSign,cRLSign')
  run('req', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-subj', '/CN=bench',
    '-keyout', 'leaf.key', '-out', 'leaf.csr')
  writeFileSync(join(dir, 'ext.cnf'), `subjectAltName=DNS:${HOST},DNS:${PASS_HOST},DNS:${INJECT_HOST}\nextendedKeyUsage=serverAuth\n`)
  run('x509', '-req', '-in', 'leaf.csr', '-CA', 'ca.pem', '-CAkey', 'ca.key', '-CAcreateserial', '-days', '2',
    '-extfile', 'ext.cnf', '-out', 'leaf.pem')
  writeFileSync(join(dir, 'chain.pem'), readFileSync(join(dir, 'leaf.pem'), 'utf8') + readFileSync(join(dir, 'ca.pem'), 'utf8'))
  return readFileSync(join(dir, 'ca.pem'), 'utf8')
}

async function startNginx(bin, dir, ports) {
  writeFileSync(join(dir, 'mib'), Buffer.alloc(MIB, 0x61))
  const root = process.getuid?.() === 0
  writeFileSync(join(dir, 'nginx.conf'), `
${root ? 'user root;' : ''}
daemon off;
worker_processes 2;
worker_rlimit_nofile 20000;
pid ${dir}/nginx.pid;
error_log ${dir}/error.log warn;
events { worker_connections 8192; }
http {
  access_log off;
  client_body_temp_path ${dir}/tmp-body;
  proxy_temp_path ${dir}/tmp-proxy;
  fastcgi_temp_path ${dir}/tmp-fastcgi;
  uwsgi_temp_path ${dir}/tmp-uwsgi;
  scgi_temp_path ${dir}/tmp-scgi;
  keepalive_requests 10000000;
  keepalive_timeout 120s;
  sendfile on;
  server {
    listen 127.0.0.1:${ports.http};
    listen 127.0.0.1:${ports.https} ssl http2;
    ssl_certificate ${dir}/chain.pem;
    ssl_certificate_key ${dir}/leaf.key;
    # Debian's nginx 1.22 offers TLS 1.3 only when named; real APIs speak it, so both legs do.
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_session_cache off;
    ssl_session_tickets off;
    location = / { default_type application/octet-stream; return 200 "ok"; }
    location = /mib { default_type application/octet-stream; alias ${dir}/mib; }
  }
}
`)
  const child = spawn(bin, ['-c', join(dir, 'nginx.conf'), '-p', dir], { stdio: ['ignore', 'inherit', 'inherit'] })
  for (let i = 0; i < 100; i++) {
    if (await new Promise((r) => net.connect(ports.http, '127.0.0.1').once('connect', function () { this.destroy(); r(true) }).once('error', () => r(false)))) {
      return child
    }
    if (child.exitCode !== null) break
    await sleep(50)
  }
  child.kill()
  throw new Error(`nginx did not start (see ${dir}/error.log)`)
}

// ---------------------------------------------------------------------------------------------
// Measuring

/** Runs oha; resolves with requests/s, latency, errors and requests counted. */
function oha(bin, args) {
  return new Promise((resolve, reject) => {
    const child = spawn(bin, ['--no-tui', '--output-format', 'json', '-w', '-z', `${SECONDS}s`, ...args], {
      stdio: ['ignore', 'pipe', 'pipe'],
    })
    let out = ''
    let err = ''
    child.stdout.on('data', (c) => (out += c))
    child.stderr.on('data', (c) => (err += c))
    child.once('error', reject)
    child.once('exit', (code) => {
      if (code !== 0) return reject(new Error(`oha exited ${code}: ${err.trim().slice(0, 500)}`))
      const j = JSON.parse(out)
      const sum = (o) => Object.values(o ?? {}).reduce((a, b) => a + b, 0)
      const statuses = j.statusCodeDistribution ?? {}
      const ok = statuses['200'] ?? 0
      const errors = sum(j.errorDistribution) + (sum(statuses) - ok)
      resolve({
        rps: ok / j.summary.total,
        requests: sum(statuses),
        errors,
        errorKinds: [...Object.keys(j.errorDistribution ?? {}), ...Object.keys(statuses).filter((s) => s !== '200').map((s) => `status ${s}`)].slice(0, 2).join('; '),
        p50: j.metrics?.latency_ms?.p50 ?? (j.latencyPercentiles?.p50 ?? 0) * 1000,
        p99: j.metrics?.latency_ms?.p99 ?? (j.latencyPercentiles?.p99 ?? 0) * 1000,
        mibs: j.summary.sizePerSec / MIB,
      })
    })
  })
}

const rssMib = () => process.memoryUsage.rss() / MIB

// ---------------------------------------------------------------------------------------------
// The floor: crates/floor-relay, a bare TLS-intercepting relay (two heads parsed, two reads and
// two writes per request, nothing else), measured like hive so that hive's CPU per request reads
// against what any intercepting relay costs on this machine in the same minutes.

const ROOT = fileURLToPath(new URL('..', import.meta.url))

/** Builds and starts the floor relay in front of nginx; resolves with its port and pid. */
async function startFloor(ports) {
  const built = spawnSync('cargo', ['build', '--release', '--quiet', '-p', 'hive-floor-relay'], { cwd: ROOT, stdio: 'inherit' })
  if (built.status !== 0) throw new Error('cargo build -p hive-floor-relay failed')
  const bin = join(process.env.CARGO_TARGET_DIR ?? join(ROOT, 'target'), 'release', 'hive-floor-relay')
  const child = spawn(bin, [String(ports.http), String(ports.https)], { stdio: ['ignore', 'pipe', 'inherit'] })
  const port = await new Promise((resolve, reject) => {
    let out = ''
    child.stdout.on('data', (c) => {
      out += c
      if (out.includes('\n')) resolve(Number(out.trim()))
    })
    child.once('error', reject)
    child.once('exit', (code) => reject(new Error(`hive-floor-relay exited ${code}`)))
  })
  return { port, pid: child.pid, stop: () => child.kill() }
}

const CLK_TCK = Number(spawnSync('getconf', ['CLK_TCK']).stdout?.toString().trim()) || 100

/** A process's CPU time (user + system) in µs, from /proc. */
function cpuUsOf(pid) {
  // Fields after the command's closing parenthesis; utime and stime are the 12th and 13th.
  const stat = readFileSync(`/proc/${pid}/stat`, 'utf8')
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ')
  return ((Number(fields[11]) + Number(fields[12])) * 1e6) / CLK_TCK
}

/** Runs oha through the floor relay, with the relay's CPU time per request. */
async function viaFloor(bin, args, floor) {
  const before = cpuUsOf(floor.pid)
  const r = await oha(bin, args)
  return { ...r, cpuUs: (cpuUsOf(floor.pid) - before) / Math.max(1, r.requests), peak: 0 }
}

// ---------------------------------------------------------------------------------------------
// The passthrough reference: squid relaying CONNECT tunnels opaquely, one process (`-N`), no
// cache, no logs, measured like the floor relay (its process's CPU time per request).

function ensureSquid() {
  const found = which('squid', ['/usr/sbin'])
  if (found || process.getuid?.() !== 0) return found
  console.error('installing squid (apt-get)…')
  spawnSync('apt-get', ['install', '-y', '--no-install-recommends', 'squid'], { stdio: 'inherit', env: { ...process.env, DEBIAN_FRONTEND: 'noninteractive' } })
  return which('squid', ['/usr/sbin'])
}

/** Starts squid on a free loopback port; resolves with its port, pid and stopper, or `{ failed }`. */
async function startSquid() {
  const bin = ensureSquid()
  if (!bin) return { failed: 'squid not found: apt-get install -y squid' }
  // Run as root, squid drops to its own user, which must write its log and pid here: a folder of
  // its own, not inside the one holding the bench CA's key.
  const home = mkdtempSync(join(tmpdir(), 'hive-bench-squid-'))
  chmodSync(home, 0o777)
  const port = await freePort()
  writeFileSync(join(home, 'squid.conf'), `
http_port 127.0.0.1:${port}
http_access allow all
cache deny all
cache_mem 0 MB
access_log none
cache_store_log none
cache_log ${home}/cache.log
pid_filename ${home}/squid.pid
coredump_dir ${home}
pinger_enable off
max_filedescriptors 20000
shutdown_lifetime 0 seconds
`)
  // Its log is in cache.log; on exit it prints resource usage to stderr.
  const child = spawn(bin, ['-N', '-f', join(home, 'squid.conf')], { stdio: 'ignore' })
  const stop = () => {
    child.kill()
    rmSync(home, { recursive: true, force: true })
  }
  for (let i = 0; i < 100; i++) {
    if (await new Promise((r) => net.connect(port, '127.0.0.1').once('connect', function () { this.destroy(); r(true) }).once('error', () => r(false)))) {
      return { port, pid: child.pid, stop }
    }
    if (child.exitCode !== null) break
    await sleep(50)
  }
  const log = existsSync(join(home, 'cache.log')) ? readFileSync(join(home, 'cache.log'), 'utf8').trim().split('\n').slice(-3).join(' / ') : ''
  stop()
  return { failed: `squid did not start: ${log}` }
}

/** Reads the sandbox's events until stopped; `stop()` resolves with how many requests it saw. */
function streamEvents(sandbox) {
  const stream = sandbox.getEventsStream()[Symbol.asyncIterator]()
  const seen = { requests: 0 }
  const done = (async () => {
    for (let r = await stream.next(); !r.done; r = await stream.next()) {
      if (r.value.type === 'egress.request') seen.requests++
    }
  })()
  return {
    async stop() {
      // Let the tail of the run reach the subscriber before it stops.
      await sleep(200)
      await stream.return()
      await done
      return seen
    },
  }
}

/**
 * Starts `perf record` of this process when BENCH_PERF names a folder, or `perf stat` of the
 * events BENCH_PERF_STAT lists (e.g. `raw_syscalls:sys_enter,context-switches`); returns its stopper.
 */
async function startPerf(label) {
  const dir = process.env.BENCH_PERF
  if (!dir) return async () => {}
  const base = join(dir, label.replace(/[^a-z0-9]+/gi, '-'))
  // BENCH_PERF_CALLGRAPH=dwarf for whole stacks through libc (malloc, memmove), at a higher cost.
  const graph = process.env.BENCH_PERF_CALLGRAPH ? ['--call-graph', process.env.BENCH_PERF_CALLGRAPH] : ['-g']
  const args = process.env.BENCH_PERF_STAT
    ? ['stat', '--no-inherit', ...(process.env.BENCH_PERF_INTERVAL_MS ? ['-I', process.env.BENCH_PERF_INTERVAL_MS] : []),
        '-e', process.env.BENCH_PERF_STAT, '-p', String(process.pid), '-o', `${base}.stat`]
    // `--no-inherit` in both: without it the oha child spawned during the run is recorded too.
    : ['record', '-q', '--no-inherit', '-F', '1999', ...graph, '-p', String(process.pid), '-o', `${base}.data`]
  const perf = spawn('perf', args, { stdio: 'ignore' })
  await sleep(300)
  return () => new Promise((resolve) => {
    perf.once('exit', resolve)
    perf.kill('SIGINT')
  })
}

/** Runs oha through the proxy, with this process's CPU time and RSS peak over the run. */
async function viaProxy(bin, args, streamFrom, label) {
  const stopPerf = await startPerf(label)
  const cpu = process.cpuUsage()
  let peak = rssMib()
  const sampler = setInterval(() => (peak = Math.max(peak, rssMib())), 100)
  try {
    const subscriber = streamFrom ? streamEvents(streamFrom) : null
    const r = await oha(bin, args)
    if (subscriber) {
      // Counted in the CPU time: the subscriber's work on the last events too.
      const seen = await subscriber.stop()
      // A subscriber that fell behind sees `events.dropped` instead of some events.
      if (seen.requests < r.requests) r.note = `subscriber saw ${seen.requests} of ${r.requests} requests`
    }
    const used = process.cpuUsage(cpu)
    return { ...r, cpuUs: (used.user + used.system) / Math.max(1, r.requests), peak: Math.max(peak, rssMib()) }
  } finally {
    clearInterval(sampler)
    await stopPerf()
  }
}

// ---------------------------------------------------------------------------------------------

async function main() {
  const ohaBin = ensureOha()
  const nginxBin = ensureNginx()
  const dir = mkdtempSync(join(tmpdir(), 'hive-bench-nginx-'))
  const ca = makeCerts(dir)
  const ports = { http: await freePort(), https: await freePort() }
  const nginx = await startNginx(nginxBin, dir, ports)
  let floor = null
  let squid = null
  // Also on a throw: nginx's child handle would keep this process alive.
  const stop = () => {
    floor?.stop?.()
    squid?.stop?.()
    nginx.kill()
    rmSync(dir, { recursive: true, force: true })
  }
  process.on('exit', stop)
  try {
    // Without the floor, the rest is still measured (its rows say why they failed).
    floor = await startFloor(ports).catch((e) => ({ failed: e.message }))
    squid = !ONLY || SQUID_ROW.includes(ONLY) ? await startSquid() : null
    if (squid?.failed) console.error(`${squid.failed}; skipping the squid row`)
    await measure({ ohaBin, ports, ca, floor, squid: squid?.failed ? null : squid })
  } finally {
    stop()
  }
}

async function measure({ ohaBin, ports, ca, floor, squid }) {

  benchHome()
  // nginx resumes no session; hive's intercepting side must not either, or the new-connection row
  // compares full handshakes with resumed ones.
  process.env.HIVE_BENCH_NO_RESUMPTION = '1'
  const { getOrCreateSandbox } = await import('../index.js')
  const resolve = {
    [`${HOST}:80`]: `127.0.0.1:${ports.http}`,
    [`${HOST}:443`]: `127.0.0.1:${ports.https}`,
    [`${PASS_HOST}:443`]: `127.0.0.1:${ports.https}`,
    [`${INJECT_HOST}:443`]: `127.0.0.1:${ports.https}`,
  }
  // The injected value is random per run: it is a secret to hive (scrubbed from responses).
  const token = randomBytes(24).toString('hex')
  const egress = [
    { access: 'allow', host: HOST },
    { access: 'allow', host: INJECT_HOST, override: { headers: { 'X-Api-Key': token } } },
  ]
  let passthrough = true
  let sandbox
  try {
    sandbox = await getOrCreateSandbox('bench-proxy-oha', {
      egress: [...egress, { access: 'allow', host: PASS_HOST, tls: 'passthrough' }],
      upstream: { resolve, ca: [ca] },
    })
  } catch (e) {
    // An addon without passthrough rules: measure the rest.
    console.error(`no passthrough rule (${e.code ?? e.message}); skipping the passthrough row`)
    passthrough = false
    sandbox = await getOrCreateSandbox('bench-proxy-oha-intercept', { egress, upstream: { resolve, ca: [ca] } })
  }
  const proxy = await sandbox.proxy()
  const url = new URL(proxy.url)
  const auth = `Proxy-Authorization: Basic ${Buffer.from(`${decodeURIComponent(url.username)}:${decodeURIComponent(url.password)}`).toString('base64')}`
  const via = ['-x', `http://127.0.0.1:${url.port}`, '--proxy-header', auth, '--no-pre-lookup', '--insecure']
  const viaFloorRelay = (args) => {
    if (floor.failed) throw new Error(`no floor relay: ${floor.failed}`)
    return viaFloor(ohaBin, ['-x', `http://127.0.0.1:${floor.port}`, '--no-pre-lookup', '--insecure', ...args], floor)
  }
  // A second sandbox with a named secret for INJECT_HOST: oha sends its placeholder, as an SDK
  // inside would (read from the sandbox's env), and hive substitutes the value. Set up on first
  // use, so that a machine where sandboxes cannot start still measures the other rows.
  let secrets = null
  const viaSecrets = async () => {
    if (secrets) return secrets.args
    const box = await getOrCreateSandbox('bench-proxy-oha-secrets', {
      secrets: { API_KEY: { value: randomBytes(24).toString('hex'), hosts: [INJECT_HOST] } },
      env: { API_KEY: '{{secrets.API_KEY}}' },
      egress: [{ access: 'allow', host: INJECT_HOST }],
      upstream: { resolve, ca: [ca] },
    })
    secrets = { box }
    const placeholder = (await box.exec(['sh', '-c', 'printf %s "$API_KEY"'])).stdout
    if (!/^hive_ph_[a-z2-7]{32}$/.test(placeholder)) throw new Error(`no placeholder from the sandbox's env: ${placeholder}`)
    secrets.proxy = await box.proxy()
    const u = new URL(secrets.proxy.url)
    const basic = Buffer.from(`${decodeURIComponent(u.username)}:${decodeURIComponent(u.password)}`).toString('base64')
    secrets.args = ['-x', `http://127.0.0.1:${u.port}`, '--proxy-header', `Proxy-Authorization: Basic ${basic}`,
      '--no-pre-lookup', '--insecure', '-H', `Authorization: Bearer ${placeholder}`]
    return secrets.args
  }
  const direct = (scheme) => [
    '--insecure',
    '--connect-to', `${HOST}:${scheme === 'https' ? 443 : 80}:127.0.0.1:${scheme === 'https' ? ports.https : ports.http}`,
  ]

  // [name, connections, url, scheme, extra oha args, options]; `stream`: a JS subscriber reads
  // every event while oha runs (what a user watching the audit stream pays); `floor`: through
  // the floor relay instead of hive; `secrets`: through the sandbox with a named secret.
  const scenarios = [
    ['plain HTTP keep-alive c32', 32, `http://${HOST}/`, 'http', []],
    ['plain HTTP keep-alive c32, bare relay (floor)', 32, `http://${HOST}/`, 'http', [], { floor: true }],
    ['plain HTTP keep-alive c32, events streamed to JS', 32, `http://${HOST}/`, 'http', [], { stream: true }],
    ['HTTPS keep-alive c32 (intercepted)', 32, `https://${HOST}/`, 'https', []],
    ['HTTPS keep-alive c32, bare relay (floor)', 32, `https://${HOST}/`, 'https', [], { floor: true }],
    ['HTTPS keep-alive c32, header injected (override)', 32, `https://${INJECT_HOST}/`, 'https', []],
    ['HTTPS keep-alive c32, placeholder substituted (named secret)', 32, `https://${INJECT_HOST}/`, 'https', [], { secrets: true }],
    // A client that speaks only HTTP/2 (gRPC-like): hyper's h2 server and client.
    ['HTTPS keep-alive c32, HTTP/2-only client (intercepted)', 32, `https://${HOST}/`, 'https', ['--http2', '-p', '1']],
    // An agent's most common call: a JSON body POSTed to an API.
    ['HTTPS keep-alive c32, POST 1 KiB JSON (intercepted)', 32, `https://${HOST}/`, 'https', ['-m', 'POST', '-T', 'application/json', '-d', JSON.stringify({ model: 'm', input: 'x'.repeat(1000) })]],
    // The same body from an HTTP/2-only client: hyper's path, and HTTP/2 to nginx, whose flood
    // check sends GOAWAY every few seconds under this load (refused streams are sent again).
    ['HTTPS keep-alive c32, HTTP/2-only client, POST 1 KiB JSON (intercepted)', 32, `https://${HOST}/`, 'https', ['--http2', '-p', '1', '-m', 'POST', '-T', 'application/json', '-d', JSON.stringify({ model: 'm', input: 'x'.repeat(1000) })]],
    // The same body sent chunked (Node's http.request without a length, streamed uploads).
    ['HTTPS keep-alive c32, POST 1 KiB JSON chunked (intercepted)', 32, `https://${HOST}/`, 'https', ['-m', 'POST', '-T', 'application/json', '-H', 'Transfer-Encoding: chunked', '-d', JSON.stringify({ model: 'm', input: 'x'.repeat(1000) })]],
    ['HTTPS keep-alive c256 (intercepted)', 256, `https://${HOST}/`, 'https', []],
    ['HTTPS keep-alive c256, bare relay (floor)', 256, `https://${HOST}/`, 'https', [], { floor: true }],
    ...(passthrough ? [['HTTPS keep-alive c32 (passthrough)', 32, `https://${PASS_HOST}/`, 'https', []]] : []),
    // The same bytes through squid (its CONNECT names nginx's address: squid resolves on its own).
    ...(squid ? [[SQUID_ROW, 32, `https://${HOST}/`, 'https', [], { squid: true }]] : []),
    ['HTTPS new connection per request c8 (intercepted)', 8, `https://${HOST}/`, 'https', ['--disable-keepalive']],
    ['HTTPS 1 MiB c4 (intercepted)', 4, `https://${HOST}/mib`, 'https', []],
    // Last of hive's rows: the memory columns are read around it.
    ['HTTPS keep-alive c1000 (intercepted)', 1000, `https://${HOST}/`, 'https', []],
    ['HTTPS keep-alive c1000, bare relay (floor)', 1000, `https://${HOST}/`, 'https', [], { floor: true }],
  ]

  const rssStart = rssMib()
  const rows = []
  const memory = {}
  for (const [name, conns, target, scheme, extra, options] of scenarios) {
    if (ONLY && !name.includes(ONLY)) continue
    // Hive's c1000 row, around which the memory columns are read (not the floor's).
    const c1000 = conns === 1000 && !options?.floor
    const load = os.loadavg()[0]
    try {
      const directUrl = target.replace(PASS_HOST, HOST).replace(INJECT_HOST, HOST)
      const runs = []
      for (let round = 0; round < ROUNDS; round++) {
        const d = await oha(ohaBin, ['-c', String(conns), ...direct(scheme), ...extra, directUrl])
        // The memory columns: around the first c1000 round, before any other c1000 load.
        const first = c1000 && round === 0
        if (first) memory.before = rssMib()
        const through = options?.secrets ? await viaSecrets() : via
        const v = options?.floor
          ? await viaFloorRelay(['-c', String(conns), ...extra, target])
          : options?.squid
          ? await viaFloor(ohaBin, ['-x', `http://127.0.0.1:${squid.port}`, '--insecure', '-c', String(conns), ...extra, `https://127.0.0.1:${ports.https}/`], squid)
          : await viaProxy(ohaBin, ['-c', String(conns), ...through, ...extra, target], options?.stream && sandbox, `${name} ${round}`)
        if (first) {
          memory.peak = v.peak
          await sleep(SETTLE_SECONDS * 1000)
          memory.after = rssMib()
        }
        runs.push({ d, v, ratio: v.rps / d.rps })
      }
      runs.sort((a, b) => a.ratio - b.ratio)
      const { d, v } = runs[Math.floor(runs.length / 2)]
      rows.push({ name, d, v, load, range: [runs[0].ratio, runs[runs.length - 1].ratio] })
    } catch (e) {
      rows.push({ name, failed: e.message, load })
    }
    console.error(`done: ${name}`)
  }

  const f = (n, d = 0) => (Number.isFinite(n) ? n.toFixed(d) : '-')
  console.log(
    `oha ${execFileSync(ohaBin, ['--version']).toString().trim().split(' ').pop()} (own process) against nginx ` +
      `(TLS sessions not resumed by nginx), loopback, ${SECONDS} s per measurement, ${os.cpus().length} cores, ` +
      `load average ${os.loadavg().map((l) => l.toFixed(2)).join(' ')}; "via" = through sandbox.proxy(); ` +
      (ROUNDS > 1 ? `${ROUNDS} rounds per scenario, the median round shown (ratio range in brackets); ` : '') +
      `CPU = hive process CPU time / requests through it; "bare relay (floor)" rows go through ` +
      `crates/floor-relay instead (its CPU time), the least any relay parsing HTTP costs here` +
      (squid ? `; the squid row through squid ${execFileSync(which('squid', ['/usr/sbin']), ['-v']).toString().split('\n')[0].split(' ').pop()} (its CPU time)` : '') +
      '.\n',
  )
  console.log('| scenario | load 1m | direct req/s | via req/s | ratio | direct p50/p99 ms | via p50/p99 ms | via errors | CPU µs/req | direct MiB/s | via MiB/s |')
  console.log('| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |')
  for (const { name, d, v, load, failed, range } of rows) {
    if (failed) {
      console.log(`| ${name} | ${f(load, 2)} | failed: ${failed.replace(/\|/g, '/')} | | | | | | | | |`)
      continue
    }
    const errs =
      (v.errors + d.errors > 0 ? `${v.errors} (direct ${d.errors}) ${v.errorKinds}` : '0') + (v.note ? ` (${v.note})` : '')
    console.log(
      `| ${name} | ${f(load, 2)} | ${f(d.rps)} | ${f(v.rps)} | ${f(v.rps / d.rps, 2)}×${ROUNDS > 1 ? ` (${f(range[0], 2)}–${f(range[1], 2)})` : ''} | ${f(d.p50, 2)}/${f(d.p99, 2)} | ${f(v.p50, 2)}/${f(v.p99, 2)} | ${errs} | ${f(v.cpuUs, 1)} | ${f(d.mibs, 1)} | ${f(v.mibs, 1)} |`,
    )
  }
  const cpuOf = (name) => rows.find((r) => r.name === name && !r.failed)?.v.cpuUs
  const overFloor = [
    ['plain HTTP c32', 'plain HTTP keep-alive c32'],
    ['HTTPS c32', 'HTTPS keep-alive c32 (intercepted)'],
    ['HTTPS c256', 'HTTPS keep-alive c256 (intercepted)'],
    ['HTTPS c1000', 'HTTPS keep-alive c1000 (intercepted)'],
  ]
    .map(([what, hive]) => [what, cpuOf(hive), cpuOf(`${hive.replace(' (intercepted)', '')}, bare relay (floor)`)])
    .filter(([, hive, bare]) => hive && bare)
    .map(([what, hive, bare]) => `${what} ${f(hive, 1)} µs against ${f(bare, 1)} (${f(hive / bare, 2)}×)`)
  if (overFloor.length) console.log(`\nCPU per keep-alive request, hive against the bare relay: ${overFloor.join('; ')}.`)
  if (memory.before !== undefined) {
    console.log(
      `\nhive process RSS: ${f(rssStart)} MiB at start, ${f(memory.before)} MiB before the c1000 run, ` +
        `${f(memory.peak)} MiB at its peak, ${f(memory.after)} MiB ${SETTLE_SECONDS} s after ` +
        `(${f((memory.after / memory.before - 1) * 100)} % of before).`,
    )
  }
  await proxy.close()
  await sandbox.close()
  await secrets?.proxy?.close()
  await secrets?.box.close()
  if (rows.some((r) => r.failed)) process.exitCode = 1
}

await main()
