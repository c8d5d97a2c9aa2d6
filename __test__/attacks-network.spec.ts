// Network attacks on the egress proxy, each named after the bypass it closes (docs/decisions.md
// "Proxy hardening"): curl and python inside a real sandbox, through its proxy, against loopback
// upstreams (real-looking names mapped with `upstream.resolve`; `localhost` where the proxy must
// resolve a name itself). Every denial asserts the upstream saw nothing. Run by CI as root and
// again as an unprivileged user.
import { createServer, type IncomingMessage, request, type Server } from 'node:http'
import type { AddressInfo } from 'node:net'
import type { Duplex } from 'node:stream'
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest'

import { getOrCreateSandbox, type Sandbox } from '../index.js'
import { useTempHome } from './helpers/home.js'
import { httpsUpstream, makeTestCA, type Hit, type TestCA, type Upstream } from './helpers/upstreams.js'

const home = useTempHome()
const SECRET = 'attack-SECRET-7f1e-never-echoed'

/** A plain HTTP upstream that records every request and switches protocol (101) for any
 * `Upgrade`, then echoes raw bytes: what an upstream that honours `h2c` looks like to a smuggler. */
async function switchingUpstream(): Promise<{ server: Server; port: number; hits: Hit[] }> {
  const hits: Hit[] = []
  const record = (req: IncomingMessage) =>
    hits.push({ host: req.headers.host ?? '', method: req.method ?? '', path: req.url ?? '', headers: { ...req.headers }, httpVersion: req.httpVersion })
  const server = createServer((req, res) => {
    record(req)
    res.end(`ok ${req.url}`)
  })
  server.on('upgrade', (req: IncomingMessage, socket: Duplex) => {
    record(req)
    socket.write(`HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: ${req.headers.upgrade}\r\n\r\n`)
    socket.on('data', (b: Buffer) => socket.write(b))
  })
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r))
  return { server, port: (server.address() as AddressInfo).port, hits }
}

describe('network attacks through the sandbox proxy', () => {
  let sandbox: Sandbox
  let ca: TestCA
  let tlsUp: Upstream
  let up: Awaited<ReturnType<typeof switchingUpstream>>
  const hits = () => up.hits.length + tlsUp.hits.length

  const apply = (egress: object[]) =>
    sandbox.applyConfig({
      egress,
      upstream: {
        resolve: { 'pypi.org:80': `127.0.0.1:${up.port}`, 'api.github.com:443': tlsUp.addr },
        ca: [ca.caPem],
      },
    } as never)
  /** curl through the proxy (also for `localhost`, which NO_PROXY would send direct). */
  const curl = async (...args: string[]) => {
    const r = await sandbox.exec(['curl', '-sS', '--noproxy', '', '-m', '5', '-o', '/dev/null', '-D', '-', '-w', '%{http_code}', ...args])
    return { status: Number(r.stdout.trim().split('\n').pop()), head: r.stdout }
  }
  /** Writes `head` to the proxy and prints what comes back until it pauses for half a second. */
  const rawProxy = async (head: string) => {
    const code = `import os,socket
p=os.environ["HTTP_PROXY"].rsplit(":",1)
s=socket.create_connection((p[0].split("//")[-1],int(p[1])),3)
s.sendall(${JSON.stringify(head)}.encode())
s.settimeout(0.5)
d=b""
try:
  while True:
    c=s.recv(4096)
    if not c: break
    d+=c
except OSError: pass
print(d.decode(errors="replace"))`
    const r = await sandbox.exec(['python3', '-c', code])
    return { status: Number(r.stdout.split(' ')[1]), text: r.stdout }
  }

  beforeAll(async () => {
    ca = makeTestCA(['api.github.com'])
    tlsUp = await httpsUpstream(ca)
    up = await switchingUpstream()
    sandbox = await getOrCreateSandbox('attacks-network')
  })

  afterEach(() => {
    up.hits.length = 0
    tlsUp.hits.length = 0
  })

  afterAll(async () => {
    await sandbox?.close()
    await tlsUp?.close()
    up?.server.close()
    home.cleanup()
  })

  it('SSRF through the address exemption: a rule naming loopback for port 22 opens no other port', async () => {
    await apply([
      { access: 'deny', host: '127.0.0.0/8', ports: [22] },
      { access: 'allow', host: 'localhost' },
    ])
    const r = await curl(`http://localhost:${up.port}/internal`)
    expect(r.status).toBe(403)
    expect(r.head.toLowerCase()).toContain('x-hive-denied: private-address')
    await apply([
      { access: 'allow', host: '127.0.0.1', ports: [9] },
      { access: 'allow', host: 'localhost' },
    ])
    expect((await curl(`http://localhost:${up.port}/internal`)).status).toBe(403)
    expect(hits()).toBe(0)
  })

  it('DNS exfiltration through the proxy: a name only a CIDR rule could allow is not resolved', async () => {
    // Resolving `localhost` would give 127.0.0.1, which the rule allows: a 403 shows no lookup.
    await apply([{ access: 'allow', host: '127.0.0.0/8' }])
    const r = await curl(`http://localhost:${up.port}/x`)
    expect(r.status).toBe(403)
    expect(r.head.toLowerCase()).toContain('x-hive-denied: no-rule')
    expect(hits()).toBe(0)
  })

  it('path interpretation: allow-with-paths and deny-with-paths hold under every server reading', async () => {
    await apply([
      { access: 'deny', host: 'pypi.org', paths: ['/admin/**'] },
      { access: 'allow', host: 'pypi.org', methods: ['GET'], paths: ['/v1/**'] },
    ])
    for (const path of ['/v1/..;/admin/x', '/v1/..%2fadmin/x', '/v1/..\\admin\\x', '/admin;x/s', '/admin%2fs', '/ADMIN/s']) {
      const r = await curl('--path-as-is', `http://pypi.org${path}`)
      expect(r.status, path).toBe(403)
    }
    expect(hits()).toBe(0)
    expect((await curl('http://pypi.org/v1/x')).status).toBe(200)
  })

  it('upgrade smuggling: h2c is stripped, and only WebSocket may switch under a rule with paths', async () => {
    await apply([{ access: 'allow', host: 'pypi.org', paths: ['/v1/**'] }])
    const h2c = await rawProxy('GET http://pypi.org/v1/x HTTP/1.1\r\nHost: pypi.org\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n')
    expect(h2c.status, h2c.text).toBe(200)
    expect(up.hits.map((h) => h.headers.upgrade)).toEqual([undefined])
    up.hits.length = 0
    const other = await rawProxy('GET http://pypi.org/v1/x HTTP/1.1\r\nHost: pypi.org\r\nConnection: Upgrade\r\nUpgrade: smuggle\r\n\r\n')
    expect(other.status, other.text).toBe(403)
    expect(other.text.toLowerCase()).toContain('x-hive-denied: upgrade')
    expect(hits()).toBe(0)
  })

  it('method override: a GET-only rule decides the method the override names', async () => {
    await apply([{ access: 'allow', host: 'pypi.org', methods: ['GET'] }])
    for (const args of [['-H', 'X-HTTP-Method-Override: DELETE'], ['-H', 'X-HTTP-Method: PUT'], ['-H', 'X-Method-Override: PATCH'], []]) {
      const url = args.length ? 'http://pypi.org/x' : 'http://pypi.org/x?_method=DELETE'
      const r = await curl(...args, url)
      expect(r.status, args.join(' ')).toBe(403)
      expect(r.head.toLowerCase()).toContain('x-hive-denied: method-override')
    }
    expect(hits()).toBe(0)
  })

  it('TRACE with a credential is refused on an override rule', async () => {
    await apply([{ access: 'allow', host: 'api.github.com', override: { headers: { 'X-Key': SECRET } } }])
    for (const method of ['TRACE', 'TRACK']) {
      const r = await curl('-X', method, 'https://api.github.com/')
      expect(r.status, method).toBe(403)
      expect(r.head).not.toContain(SECRET)
    }
    expect(hits()).toBe(0)
  })

  it('the loop nonce: no header sent upstream names hive', async () => {
    await apply([{ access: 'allow', host: 'pypi.org' }, { access: 'allow', host: 'api.github.com' }])
    expect((await curl('http://pypi.org/a')).status).toBe(200)
    expect((await curl('https://api.github.com/b')).status).toBe(200)
    const seen = [...up.hits, ...tlsUp.hits]
    expect(seen).toHaveLength(2)
    for (const hit of seen) {
      for (const [name, value] of Object.entries(hit.headers)) {
        expect(`${name}: ${value}`.toLowerCase()).not.toContain('hive')
      }
    }
  })
})

describe('connection budgets', () => {
  let a: Sandbox
  let b: Sandbox
  let up: Awaited<ReturnType<typeof switchingUpstream>>

  beforeAll(async () => {
    up = await switchingUpstream()
    const config = { egress: [{ access: 'allow', host: 'pypi.org' }], upstream: { resolve: { 'pypi.org:80': `127.0.0.1:${up.port}` } } }
    a = await getOrCreateSandbox('attacks-budget-a', config as never)
    b = await getOrCreateSandbox('attacks-budget-b', config as never)
  })

  afterAll(async () => {
    await Promise.all([a?.close(), b?.close()])
    up?.server.close()
  })

  it('a sandbox holding 5 000 connections to its proxy stops neither another sandbox nor its own host listener', async () => {
    const holder = a.spawn(['python3', '-c', `import os,resource,socket,time
_,hard=resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE,(hard,hard))
h,p=os.environ["HTTP_PROXY"].split("//")[-1].rsplit(":",1)
held=[]
for _ in range(min(5000,hard-64)):
  c=socket.socket();c.setblocking(False);c.connect_ex((h,int(p)));held.append(c)
open("/tmp/held","w").write(str(len(held)))
time.sleep(60)`])
    try {
      let held = ''
      for (let i = 0; i < 100 && !held; i++) {
        held = (await a.exec(['sh', '-c', 'cat /tmp/held 2>/dev/null || true'])).stdout.trim()
        if (!held) await new Promise((r) => setTimeout(r, 100))
      }
      expect(Number(held)).toBeGreaterThanOrEqual(4000)
      const other = await b.exec(['curl', '-sS', '-m', '5', '-o', '/dev/null', '-w', '%{http_code}', 'http://pypi.org/other'])
      expect(other.stdout).toBe('200')
      const proxy = await a.proxy()
      try {
        const { hostname, port, username, password } = new URL(proxy.url)
        const status = await new Promise<number>((resolve, reject) => {
          const req = request({ host: hostname, port: Number(port), path: 'http://pypi.org/host', headers: { host: 'pypi.org', 'proxy-authorization': `Basic ${Buffer.from(`${username}:${password}`).toString('base64')}` }, timeout: 5000 }, (res) => {
            res.resume()
            resolve(res.statusCode ?? 0)
          })
          req.on('timeout', () => req.destroy(new Error('the host listener did not answer')))
          req.on('error', reject)
          req.end()
        })
        expect(status).toBe(200)
      } finally {
        await proxy.close()
      }
    } finally {
      holder.kill()
      await holder.wait()
    }
  })
})
