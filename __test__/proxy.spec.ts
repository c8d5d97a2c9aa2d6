// The egress proxy end to end (SPEC §2, §3; issue 3) through `sandbox.proxy()`, with real clients
// (curl, Node https/http2, undici's ProxyAgent, Python requests) against real loopback upstreams
// reached under real-looking names through `upstream.resolve`. Every denial asserts zero upstream
// hits.
import { execFile } from 'node:child_process'
import { readFileSync, writeFileSync } from 'node:fs'
import http2 from 'node:http2'
import https from 'node:https'
import { join } from 'node:path'
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest'

import { getOrCreateSandbox, type Sandbox, type SandboxEvent } from '../index.js'
import { useTempHome } from './helpers/home.js'
import {
  decodeFrame,
  encodeFrame,
  h2Upstream,
  httpsUpstream,
  httpUpstream,
  makeTestCA,
  session,
  tlsThrough,
  type Upstream,
} from './helpers/upstreams.js'

const home = useTempHome()
const NAMES = ['api.github.com', 'pypi.org', 'files.pypi.org', 'evilpypi.org']
const H2_NAME = 'api.anthropic.com'
const SECRET = 'sk-live-0123456789abcdef-never-visible'

let upstreamCA: ReturnType<typeof makeTestCA>
let plain: Upstream
let tlsUp: Upstream
let h2: Upstream
let sandbox: Sandbox
let proxy: { url: string; ca: string; close(): Promise<void> }
let caFile: string

/** `upstream` section mapping every test name to the loopback upstreams. */
function upstreamSection(extra: Record<string, string> = {}) {
  const resolve: Record<string, string> = {}
  for (const name of NAMES) {
    resolve[`${name}:80`] = plain.addr
    resolve[`${name}:443`] = tlsUp.addr
  }
  resolve[`${H2_NAME}:443`] = h2.addr
  return { resolve: { ...resolve, ...extra }, ca: [upstreamCA.caPem] }
}

async function apply(egress: unknown[], extra: Record<string, string> = {}): Promise<void> {
  await sandbox.applyConfig({ egress, upstream: upstreamSection(extra) } as never)
}

const totalHits = () => plain.hits.length + tlsUp.hits.length + h2.hits.length

beforeAll(async () => {
  upstreamCA = makeTestCA([...NAMES, H2_NAME])
  plain = await httpUpstream()
  tlsUp = await httpsUpstream(upstreamCA)
  h2 = await h2Upstream(upstreamCA)
  sandbox = await getOrCreateSandbox('proxy-e2e')
  proxy = await sandbox.proxy()
  caFile = join(home.dir, 'sandbox-ca.pem')
  writeFileSync(caFile, proxy.ca)
})

afterEach(() => {
  for (const u of [plain, tlsUp, h2]) u.hits.length = 0
})

afterAll(async () => {
  await proxy?.close()
  await sandbox?.close()
  await Promise.all([plain?.close(), tlsUp?.close(), h2?.close()])
  home.cleanup()
})

/** Events emitted while `fn` runs (collected until `count` arrived or 2 s passed). */
async function eventsDuring(count: number, fn: () => Promise<void>): Promise<SandboxEvent[]> {
  const stream = sandbox.getEventsStream()
  const seen: SandboxEvent[] = []
  const reading = (async () => {
    for await (const e of stream) {
      if (e.type.startsWith('egress.')) seen.push(e)
      if (seen.length >= count) break
    }
  })()
  await fn()
  await Promise.race([reading, new Promise((r) => setTimeout(r, 2000))])
  return seen
}

/** Runs a command without blocking the event loop (the upstreams live in this process). */
function run(cmd: string, args: string[]): Promise<{ stdout: string; stderr: string; exit: number }> {
  return new Promise((resolve) => {
    execFile(cmd, args, { encoding: 'utf8', timeout: 20_000 }, (error, stdout, stderr) => {
      const exit = error ? (typeof error.code === 'number' ? error.code : -1) : 0
      resolve({ stdout, stderr, exit })
    })
  })
}

async function curl(args: string[]): Promise<{ status: number; body: string; exit: number; stderr: string }> {
  const r = await run('curl', ['-s', '-S', '--max-time', '10', '-o', '-', '-w', '\n%{http_code}', ...args])
  const cut = r.stdout.lastIndexOf('\n')
  return { body: r.stdout.slice(0, cut), status: Number(r.stdout.slice(cut + 1)), exit: r.exit, stderr: r.stderr }
}

/** GET through the proxy with Node's https over a CONNECT tunnel. */
async function nodeGet(host: string, path: string, headers: Record<string, string> = {}): Promise<{ status: number; body: string; headers: Record<string, unknown> }> {
  let socket
  try {
    socket = await tlsThrough(proxy, host)
  } catch (e) {
    return { status: (e as { status: number }).status, body: '', headers: (e as { headers: Record<string, unknown> }).headers }
  }
  return new Promise((resolve, reject) => {
    const req = https.request({ host, path, headers, createConnection: () => socket, port: 443 }, (res) => {
      let body = ''
      res.setEncoding('utf8')
      res.on('data', (c) => (body += c))
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body, headers: res.headers }))
    })
    req.on('error', reject)
    req.end()
  })
}

describe('real clients', () => {
  it('curl: HTTPS through CONNECT with --cacert, plain HTTP, and a 403 inside TLS for a denied host', async () => {
    await apply([{ access: 'allow', host: 'api.github.com' }, { access: 'allow', host: 'pypi.org' }])
    const ok = await curl(['--proxy', proxy.url, '--cacert', caFile, 'https://api.github.com/zen'])
    expect(ok).toMatchObject({ status: 200, body: 'ok /zen' })
    expect(await curl(['--proxy', proxy.url, 'http://pypi.org/simple/'])).toMatchObject({ status: 200, body: 'ok /simple/' })
    expect(totalHits()).toBe(2)

    const denied = await curl(['--proxy', proxy.url, '--cacert', caFile, 'https://evilpypi.org/login'])
    expect(denied.exit).toBe(0)
    expect(denied.status).toBe(403)
    expect(denied.body).toBe("hive: GET evilpypi.org/login denied by this sandbox's egress policy (no rule matches host evilpypi.org)\n")
    expect(totalHits()).toBe(2)
  })

  it('curl: the host listener answers 407 without its credential', async () => {
    await apply([{ access: 'allow', host: '*' }])
    const bare = new URL(proxy.url)
    const noAuth = `http://${bare.host}`
    expect((await curl(['--proxy', noAuth, 'http://pypi.org/'])).status).toBe(407)
    expect((await curl(['--proxy', `http://hive:wrong@${bare.host}`, 'http://pypi.org/'])).status).toBe(407)
    expect(totalHits()).toBe(0)
  })

  it('Node: https over a CONNECT tunnel and undici ProxyAgent', async () => {
    await apply([{ access: 'allow', host: 'api.github.com' }])
    expect(await nodeGet('api.github.com', '/zen')).toMatchObject({ status: 200, body: 'ok /zen' })
    const undici = await import('undici').catch(() => null)
    if (!undici) {
      console.warn('undici is not installed: skipping its ProxyAgent case')
      return
    }
    const dispatcher = new undici.ProxyAgent({ uri: proxy.url, requestTls: { ca: proxy.ca } })
    const res = await undici.request('https://api.github.com/octocat', { dispatcher })
    expect(res.statusCode).toBe(200)
    expect(await res.body.text()).toBe('ok /octocat')
    const denied = await undici.request('https://pypi.org/simple/', { dispatcher })
    expect(denied.statusCode).toBe(403)
    expect(await denied.body.text()).toMatch(/^hive: GET pypi\.org\/simple\/ denied/)
    await dispatcher.close()
    expect(tlsUp.hits.map((h) => h.path)).toEqual(['/zen', '/octocat'])
  })

  it('Python requests: proxies + verify', async () => {
    await apply([{ access: 'allow', host: '*.pypi.org' }])
    const script = `
import json, sys, requests
proxies = {"http": sys.argv[1], "https": sys.argv[1]}
out = []
for url in ["https://pypi.org/simple/", "https://files.pypi.org/packages/x.whl", "http://pypi.org/simple/"]:
    r = requests.get(url, proxies=proxies, verify=sys.argv[2], timeout=10)
    out.append([r.status_code, r.text])
r = requests.get("https://evilpypi.org/x", proxies=proxies, verify=sys.argv[2], timeout=10)
out.append([r.status_code, r.reason, r.text.split(" (")[0]])
print(json.dumps(out))
`
    const r = await run('python3', ['-c', script, proxy.url, caFile])
    expect(r.exit, r.stderr).toBe(0)
    expect(JSON.parse(r.stdout)).toEqual([
      [200, 'ok /simple/'],
      [200, 'ok /packages/x.whl'],
      [200, 'ok /simple/'],
      [403, 'Blocked by hive egress policy', "hive: GET evilpypi.org/x denied by this sandbox's egress policy"],
    ])
    expect(tlsUp.hits.filter((h) => h.host === 'evilpypi.org')).toHaveLength(0)
  })
})

describe('egress rules (SPEC §2 examples)', () => {
  // [name, egress rules, host, method, path, expected status, expected X-Hive-Denied]
  const cases: [string, unknown[], string, string, string, number, string?][] = [
    ['default deny', [], 'api.github.com', 'GET', '/zen', 403, 'no-rule'],
    ['* allows every host', [{ access: 'allow', host: '*' }], 'files.pypi.org', 'GET', '/x', 200],
    ['*.pypi.org covers the apex', [{ access: 'allow', host: '*.pypi.org' }], 'pypi.org', 'GET', '/simple/', 200],
    ['*.pypi.org covers subdomains', [{ access: 'allow', host: '*.pypi.org' }], 'files.pypi.org', 'GET', '/x', 200],
    ['*.pypi.org is not evilpypi.org', [{ access: 'allow', host: '*.pypi.org' }], 'evilpypi.org', 'GET', '/', 403, 'no-rule'],
    ['ports: 443 allowed', [{ access: 'allow', host: 'pypi.org', ports: [443] }], 'pypi.org', 'GET', '/', 200],
    ['ports: 8443 only', [{ access: 'allow', host: 'pypi.org', ports: [8443] }], 'pypi.org', 'GET', '/', 403, 'port'],
    ['methods: GET allowed', [{ access: 'allow', host: 'api.github.com', methods: ['GET', 'POST'] }], 'api.github.com', 'POST', '/repos', 200],
    ['methods: DELETE denied', [{ access: 'allow', host: 'api.github.com', methods: ['GET', 'POST'] }], 'api.github.com', 'DELETE', '/repos/x', 403, 'method'],
    ['paths: /v1/* matches one segment', [{ access: 'allow', host: 'api.github.com', paths: ['/v1/*'] }], 'api.github.com', 'GET', '/v1/models', 200],
    ['paths: /v1/* not two', [{ access: 'allow', host: 'api.github.com', paths: ['/v1/*'] }], 'api.github.com', 'GET', '/v1/a/b', 403, 'path'],
    ['paths: dot segments removed', [{ access: 'allow', host: 'api.github.com', paths: ['/v1/**'] }], 'api.github.com', 'GET', '/v1/../admin', 403, 'path'],
    ['first match: deny before allow', [{ access: 'deny', host: 'api.github.com', paths: ['/admin/**'] }, { access: 'allow', host: '*' }], 'api.github.com', 'GET', '/admin/users', 403, 'rule'],
    ['first match: allow after a non-matching deny', [{ access: 'deny', host: 'api.github.com', paths: ['/admin/**'] }, { access: 'allow', host: '*' }], 'api.github.com', 'GET', '/zen', 200],
  ]
  for (const [name, egress, host, method, path, status, reason] of cases) {
    it(name, async () => {
      await apply(egress)
      let res
      try {
        const s = session(await tlsThrough(proxy, host))
        res = await s.request(method, path, { host })
        s.close()
      } catch (e) {
        res = { status: (e as { status: number }).status, headers: (e as { headers: Record<string, string> }).headers ?? {}, body: '' }
      }
      expect(res.status).toBe(status)
      if (reason) {
        expect(res.headers['x-hive-denied']).toBe(reason)
        expect(totalHits()).toBe(0)
      } else {
        expect(tlsUp.hits).toHaveLength(1)
        expect(tlsUp.hits[0]).toMatchObject({ host, method })
      }
    })
  }
})

describe('credentials', () => {
  it('injects the override header over verified TLS, replacing a forged one, and never shows it', async () => {
    await apply([{ access: 'allow', host: 'api.github.com', override: { headers: { Authorization: `Bearer ${SECRET}` } } }])
    const events = await eventsDuring(2, async () => {
      const res = await nodeGet('api.github.com', '/user', { authorization: 'Bearer forged' })
      expect(res.status).toBe(200)
      expect(JSON.stringify(res)).not.toContain(SECRET)
    })
    expect(tlsUp.hits[0].headers.authorization).toBe(`Bearer ${SECRET}`)
    const request = events.find((e) => e.type === 'egress.request')
    expect(request).toMatchObject({ access: 'allowed', injectedHeaders: ['authorization'], via: 'host', scheme: 'https' })
    expect(JSON.stringify(events)).not.toContain(SECRET)
    expect(JSON.stringify(await sandbox.getConfig())).not.toContain(SECRET)
  })

  it('denies an override rule over plain HTTP (plaintext-credentials)', async () => {
    await apply([{ access: 'allow', host: 'pypi.org', override: { headers: { 'X-Token': SECRET } } }])
    const r = await curl(['--proxy', proxy.url, '-D', '-', 'http://pypi.org/simple/'])
    expect(r.status).toBe(403)
    expect(r.body).toMatch(/x-hive-denied: plaintext-credentials/i)
    expect(r.body).not.toContain(SECRET)
    expect(totalHits()).toBe(0)
  })
})

describe('the audit stream', () => {
  it('streams each egress event to JS exactly as its audit log line holds it, key for key', async () => {
    await apply([{ access: 'allow', host: 'pypi.org' }])
    const events = await eventsDuring(2, async () => {
      const r = await curl(['--proxy', proxy.url, 'http://pypi.org/simple/?q=1'])
      expect(r.status).toBe(200)
    })
    expect(events.map((e) => e.type)).toEqual(['egress.request', 'egress.response'])
    const log = join(home.dir, 'sandboxes', 'proxy-e2e', 'audit.jsonl')
    // The writer batches its writes: wait until the log holds both events.
    const logged = async (): Promise<Record<string, string>> => {
      for (let i = 0; i < 100; i++) {
        const byId: Record<string, string> = {}
        for (const line of readFileSync(log, 'utf8').split('\n')) {
          const id = line && (JSON.parse(line) as SandboxEvent).id
          if (id && events.some((e) => e.id === id)) byId[id] = line
        }
        if (Object.keys(byId).length === events.length) return byId
        await new Promise((r) => setTimeout(r, 20))
      }
      throw new Error('the audit log never held the streamed events')
    }
    const lines = await logged()
    for (const event of events) {
      expect(JSON.stringify(event)).toBe(JSON.stringify(JSON.parse(lines[event.id])))
    }
    expect(events[0]).toMatchObject({ host: 'pypi.org', path: '/simple/', access: 'allowed' })
    expect(events[1]).toMatchObject({ requestId: events[0].id, status: 200 })
  })
})

describe('fronting, SSRF and failures', () => {
  it('refuses a Host that names another host than the tunnel (host-mismatch)', async () => {
    await apply([{ access: 'allow', host: 'pypi.org' }, { access: 'allow', host: 'evilpypi.org' }])
    const s = session(await tlsThrough(proxy, 'pypi.org'))
    const res = await s.request('GET', '/', { host: 'evilpypi.org' })
    s.close()
    expect(res.status).toBe(403)
    expect(res.headers['x-hive-denied']).toBe('host-mismatch')
    expect(totalHits()).toBe(0)
  })

  it('refuses a name or literal that is a private address unless a rule names it', async () => {
    await apply([{ access: 'allow', host: '*' }])
    const literal = await curl(['--proxy', proxy.url, '-D', '-', `http://${plain.addr}/`])
    expect(literal.status).toBe(403)
    expect(literal.body).toMatch(/x-hive-denied: private-address/i)
    const named = await curl(['--proxy', proxy.url, '-D', '-', `http://localhost:${plain.port}/`])
    expect(named.status).toBe(403)
    expect(totalHits()).toBe(0)
    await apply([{ access: 'allow', host: '127.0.0.1' }])
    expect((await curl(['--proxy', proxy.url, `http://${plain.addr}/`])).status).toBe(200)
  })

  it('answers 502 naming the cause when the upstream refuses', async () => {
    await apply([{ access: 'allow', host: 'pypi.org' }], { 'pypi.org:80': '127.0.0.1:9' })
    const r = await curl(['--proxy', proxy.url, 'http://pypi.org/'])
    expect(r.status).toBe(502)
    expect(r.body).toMatch(/refused/)
  })
})

describe('applyConfig and long exchanges', () => {
  it('switches rules mid keep-alive on an intercepted connection', async () => {
    await apply([{ access: 'allow', host: 'api.github.com' }])
    const s = session(await tlsThrough(proxy, 'api.github.com'))
    expect((await s.request('GET', '/zen', { host: 'api.github.com' })).status).toBe(200)
    await apply([])
    const denied = await s.request('GET', '/zen', { host: 'api.github.com' })
    expect(denied.status).toBe(403)
    expect(denied.headers['x-hive-denied']).toBe('no-rule')
    await apply([{ access: 'allow', host: '*' }])
    expect((await s.request('GET', '/again', { host: 'api.github.com' })).status).toBe(200)
    s.close()
    expect(tlsUp.hits.map((h) => h.path)).toEqual(['/zen', '/again'])
  })

  it('lets a streaming response that was allowed finish after applyConfig denies everything', async () => {
    await apply([{ access: 'allow', host: 'api.github.com' }])
    const socket = await tlsThrough(proxy, 'api.github.com')
    const body = await new Promise<string>((resolve, reject) => {
      const req = https.request({ host: 'api.github.com', path: '/stream', createConnection: () => socket, port: 443 }, (res) => {
        let text = ''
        res.setEncoding('utf8')
        res.on('data', (c: string) => {
          text += c
          if (text === 'first\n') void apply([]).then(() => tlsUp.release())
        })
        res.on('end', () => resolve(text))
      })
      req.on('error', reject)
      req.end()
    })
    expect(body).toBe('first\nsecond\n')
  })

  it('carries a WebSocket echo through the intercepted path', async () => {
    await apply([{ access: 'allow', host: 'api.github.com' }])
    const socket = await tlsThrough(proxy, 'api.github.com')
    const key = Buffer.from('0123456789abcdef').toString('base64')
    socket.write(`GET /ws HTTP/1.1\r\nHost: api.github.com\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: ${key}\r\nSec-WebSocket-Version: 13\r\n\r\n`)
    let buf = Buffer.alloc(0)
    const reply = await new Promise<{ head: string; echo: string }>((resolve) => {
      let head = ''
      socket.on('data', (c: Buffer) => {
        buf = Buffer.concat([buf, c])
        if (!head) {
          const end = buf.indexOf('\r\n\r\n')
          if (end < 0) return
          head = buf.subarray(0, end).toString()
          buf = buf.subarray(end + 4)
          socket.write(encodeFrame(Buffer.from('hello through hive'), true))
        }
        const frame = decodeFrame(buf)
        if (frame) resolve({ head, echo: frame.payload.toString() })
      })
    })
    socket.destroy()
    expect(reply.head).toMatch(/^HTTP\/1\.1 101/)
    expect(reply.head.toLowerCase()).toContain('sec-websocket-accept')
    expect(reply.echo).toBe('hello through hive')
  })

  it('answers a client that offers h2 and HTTP/1.1 (curl, git) in HTTP/1.1, and one that offers only h2 in h2', async () => {
    await apply([{ access: 'allow', host: H2_NAME }])
    const both = await tlsThrough(proxy, H2_NAME, ['h2', 'http/1.1'])
    expect(both.alpnProtocol).toBe('http/1.1')
    both.destroy()
    const only = await tlsThrough(proxy, H2_NAME, ['h2'])
    expect(only.alpnProtocol).toBe('h2')
    only.destroy()
  })

  it('speaks HTTP/2 on both legs to an h2 upstream', async () => {
    await apply([{ access: 'allow', host: H2_NAME }])
    const socket = await tlsThrough(proxy, H2_NAME, ['h2'])
    expect(socket.alpnProtocol).toBe('h2')
    const client = http2.connect(`https://${H2_NAME}`, { createConnection: () => socket, port: 443 })
    const res = await new Promise<{ status: number; body: string }>((resolve, reject) => {
      const req = client.request({ ':path': '/v1/messages', ':method': 'GET' })
      let status = 0
      let body = ''
      req.on('response', (h) => (status = Number(h[':status'])))
      req.setEncoding('utf8')
      req.on('data', (c: string) => (body += c))
      req.on('end', () => resolve({ status, body }))
      req.on('error', reject)
      req.end()
    })
    client.close()
    expect(res).toEqual({ status: 200, body: 'ok /v1/messages' })
    expect(h2.hits[0].httpVersion).toBe('2.0')
  })

  /** Node's own HTTP/2 server (nghttp2) that refuses its first stream with REFUSED_STREAM, as a
   * busy server does, and echoes the body of later ones. */
  async function refusingH2Upstream() {
    const server = http2.createSecureServer({ cert: upstreamCA.certPem + upstreamCA.caPem, key: upstreamCA.keyPem })
    const sessions: http2.ServerHttp2Session[] = []
    const up = { addr: '', refused: 0, bodies: [] as string[] }
    server.on('session', (s) => sessions.push(s))
    server.on('stream', (stream) => {
      stream.on('error', () => {})
      if (up.refused === 0) {
        up.refused++
        stream.close(http2.constants.NGHTTP2_REFUSED_STREAM)
        return
      }
      let body = ''
      stream.setEncoding('utf8')
      stream.on('data', (c: string) => (body += c))
      stream.on('end', () => {
        up.bodies.push(body)
        stream.respond({ ':status': 200 })
        stream.end(body)
      })
    })
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
    up.addr = `127.0.0.1:${(server.address() as import('node:net').AddressInfo).port}`
    const close = async () => {
      for (const s of sessions) s.destroy()
      await new Promise((r) => server.close(r))
    }
    return { up, close }
  }

  /** A POST of `chunks` from Node's http2 client through the proxy; `length` states their size. */
  async function h2Post(chunks: string[], length: boolean): Promise<{ status: number; body: string; rstCode: number }> {
    const socket = await tlsThrough(proxy, H2_NAME, ['h2'])
    const client = http2.connect(`https://${H2_NAME}`, { createConnection: () => socket, port: 443 })
    const size = chunks.join('').length
    const req = client.request({ ':path': '/v1/messages', ':method': 'POST', ...(length ? { 'content-length': String(size) } : {}) })
    const res = await new Promise<{ status: number; body: string; rstCode: number }>((resolve) => {
      let status = 0
      let body = ''
      req.on('response', (h) => (status = Number(h[':status'])))
      req.setEncoding('utf8')
      req.on('data', (c: string) => (body += c))
      req.on('error', () => {})
      req.on('close', () => resolve({ status, body, rstCode: req.rstCode ?? 0 }))
      for (const c of chunks) req.write(c)
      req.end()
    })
    client.close()
    return res
  }

  it('sends a request again, body and all, when an h2 upstream refuses it unprocessed', async () => {
    // (The GOAWAY case is tested in Rust and by the bench against nginx: Node's `goaway(code, 0)`
    // cannot name stream 0.)
    const { up, close } = await refusingH2Upstream()
    try {
      await apply([{ access: 'allow', host: H2_NAME }], { [`${H2_NAME}:443`]: up.addr })
      const payload = JSON.stringify({ model: 'm', messages: [{ role: 'user', content: 'hi' }] })
      const events = await eventsDuring(2, async () => {
        expect(await h2Post([payload], true)).toEqual({ status: 200, body: payload, rstCode: 0 })
      })
      expect(up.refused).toBe(1)
      expect(up.bodies).toEqual([payload])
      expect(events.map((e) => e.type)).toEqual(['egress.request', 'egress.response'])
      expect(events[1]).toMatchObject({ status: 200, bytesOut: payload.length })
    } finally {
      await close()
    }
  })

  it('passes the refusal on to an h2 client when the body streamed and cannot be sent again', async () => {
    const { up, close } = await refusingH2Upstream()
    try {
      await apply([{ access: 'allow', host: H2_NAME }], { [`${H2_NAME}:443`]: up.addr })
      const res = await h2Post(['part one, ', 'part two'], false)
      expect(res.rstCode).toBe(http2.constants.NGHTTP2_REFUSED_STREAM)
      expect(up).toMatchObject({ refused: 1, bodies: [] })
    } finally {
      await close()
    }
  })
})

describe('events', () => {
  it('records egress.request at decision time and egress.response when the exchange ends', async () => {
    await apply([{ access: 'allow', host: 'pypi.org' }])
    const events = await eventsDuring(3, async () => {
      expect((await curl(['--proxy', proxy.url, 'http://pypi.org/simple/?token=abc'])).status).toBe(200)
      expect((await curl(['--proxy', proxy.url, 'http://evilpypi.org/'])).status).toBe(403)
    })
    const [req, res, denied] = events
    expect(req).toMatchObject({
      type: 'egress.request', host: 'pypi.org', port: 80, method: 'GET', path: '/simple/', scheme: 'http',
      access: 'allowed', rule: 0, reason: 'rule', via: 'host', injectedHeaders: [],
    })
    expect(res).toMatchObject({ type: 'egress.response', requestId: req.id, status: 200, bytesIn: 'ok /simple/'.length, bytesOut: 0 })
    expect(typeof (res as { durationMs: unknown }).durationMs).toBe('number')
    expect(denied).toMatchObject({ type: 'egress.request', host: 'evilpypi.org', access: 'denied', rule: null, reason: 'no-rule' })
    expect(JSON.stringify(events)).not.toContain('token=abc')
  })
})
