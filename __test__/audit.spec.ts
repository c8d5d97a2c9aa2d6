// Audit that explains itself (docs/audit-log.md, docs/network-access.md): which process made a
// request (pid, command, execId), which config decided it (configHash, config.applied), which
// condition failed (method/path/port), report mode, and the onUnmatched callback. Loopback only:
// real-looking names are mapped to loopback servers with `upstream.resolve`. Run by CI as root and
// again as an unprivileged user.
import http from 'node:http'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'

import { getOrCreateSandbox, type Sandbox, type SandboxEvent } from '../index.js'
import { useTempHome } from './helpers/home.js'
import { httpUpstream, httpsUpstream, makeTestCA, session, tlsThrough, type TestCA, type Upstream } from './helpers/upstreams.js'

const home = useTempHome()
const SECRET = 'sk-AUDIT-REPORT-SECRET-77aa'

let ca: TestCA
let api: Upstream
let plain: Upstream

type Ev = SandboxEvent & Record<string, unknown>

/** Every event of `sandbox` from now on, collected in the background. */
function collect(sandbox: Sandbox) {
  const seen: Ev[] = []
  const stream = sandbox.getEventsStream()
  const it = stream[Symbol.asyncIterator]()
  let stopped = false
  const reading = (async () => {
    while (!stopped) {
      const next = await it.next()
      if (next.done) return
      seen.push(next.value as Ev)
    }
  })()
  return {
    seen,
    /** Waits until `count` events match (or 5 s pass), then returns those that match. */
    async waitFor(pred: (e: Ev) => boolean, count = 1, ms = 5000): Promise<Ev[]> {
      const deadline = Date.now() + ms
      while (seen.filter(pred).length < count && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20))
      return seen.filter(pred)
    },
    async stop() {
      stopped = true
      await it.return?.()
      await Promise.race([reading, new Promise((r) => setTimeout(r, 200))])
    },
  }
}

const resolveAll = (names: string[]) => {
  const resolve: Record<string, string> = {}
  for (const name of names) {
    resolve[`${name}:443`] = api.addr
    resolve[`${name}:80`] = plain.addr
  }
  return { resolve, ca: [ca.caPem] }
}

/** A plain-HTTP request through a host-side `sandbox.proxy()` URL (absolute form). */
function viaProxy(proxyUrl: string, target: string, method = 'GET'): Promise<{ status: number; body: string; ms: number }> {
  const proxy = new URL(proxyUrl)
  const auth = Buffer.from(`${decodeURIComponent(proxy.username)}:${decodeURIComponent(proxy.password)}`).toString('base64')
  const start = performance.now()
  return new Promise((resolve, reject) => {
    const req = http.request(
      { host: proxy.hostname, port: Number(proxy.port), method, path: target, headers: { 'proxy-authorization': `Basic ${auth}` }, agent: false },
      (res) => {
        let body = ''
        res.setEncoding('utf8')
        res.on('data', (c) => (body += c))
        res.on('end', () => resolve({ status: res.statusCode ?? 0, body, ms: performance.now() - start }))
      },
    )
    req.on('error', reject)
    req.end()
  })
}

beforeAll(async () => {
  ca = makeTestCA(['api.github.com', 'api.example.com', 'unlisted.example', 'ask.example', 'remember.example', 'slow.example', 'fast.example'])
  api = await httpsUpstream(ca)
  plain = await httpUpstream()
})

afterAll(async () => {
  await api?.close()
  await plain?.close()
  home.cleanup()
})

describe('attribution', () => {
  let sandbox: Sandbox
  beforeAll(async () => {
    sandbox = await getOrCreateSandbox('audit-attribution', {
      egress: [{ access: 'allow', host: 'api.github.com' }],
      upstream: resolveAll(['api.github.com']),
    })
  })
  afterAll(async () => sandbox?.close())

  it('two concurrent execs: each request carries the pid, command and execId of the process that sent it', async () => {
    const events = collect(sandbox)
    const before = api.hits.length
    const curl = (path: string) => ['curl', '-s', '-o', '/dev/null', '-w', '%{http_code}', `https://api.github.com${path}`]
    // A: curl is the exec's root process. B: curl is a child of a shell (found through the session).
    const [a, b] = await Promise.all([
      sandbox.exec(curl('/from-a')),
      sandbox.exec(['sh', '-c', `${curl('/from-b').join(' ')}; echo " done"`]),
    ])
    expect(a.stdout).toBe('200')
    expect(b.stdout.trim()).toBe('200 done')
    expect(api.hits.length - before).toBe(2)
    expect(a.execId).toMatch(/^[0-9a-f]{16}$/)
    expect(b.execId).not.toBe(a.execId)

    const requests = await events.waitFor((e) => e.type === 'egress.request' && String(e.path).startsWith('/from-'), 2)
    const responses = await events.waitFor((e) => e.type === 'egress.response', 2)
    const starts = await events.waitFor((e) => e.type === 'process.start', 2)
    const exits = await events.waitFor((e) => e.type === 'process.exit', 2)
    await events.stop()

    const startOf = (execId: string) => starts.find((e) => e.execId === execId)!
    const reqA = requests.find((e) => e.path === '/from-a')!
    const reqB = requests.find((e) => e.path === '/from-b')!
    // A's curl is the process `process.start` reported.
    expect(reqA).toMatchObject({ access: 'allowed', execId: a.execId, pid: startOf(a.execId).pid })
    expect(reqA.command).toEqual(curl('/from-a'))
    // B's curl is another process of B's exec, numbered inside the sandbox like `process.start`.
    expect(reqB).toMatchObject({ access: 'allowed', execId: b.execId })
    expect((reqB.command as string[])[0]).toBe('curl')
    expect(reqB.command).toContain('https://api.github.com/from-b')
    expect(reqB.pid).not.toBe(startOf(b.execId).pid)
    expect(startOf(b.execId).command).toEqual(['sh', '-c', expect.stringContaining('/from-b')])
    // process.exit and egress.response carry the same ids.
    expect(exits.map((e) => e.execId).sort()).toEqual([a.execId, b.execId].sort())
    for (const req of [reqA, reqB]) {
      const res = responses.find((e) => e.requestId === req.id)!
      expect(res).toMatchObject({ pid: req.pid, execId: req.execId })
    }
  })

  it('a captured connection (no proxy variables) is attributed too', async () => {
    const events = collect(sandbox)
    const noProxy = { HTTPS_PROXY: '', https_proxy: '', HTTP_PROXY: '', http_proxy: '', ALL_PROXY: '', all_proxy: '' }
    const r = await sandbox.exec(['curl', '-s', '-o', '/dev/null', '-w', '%{http_code}', 'https://api.github.com/captured'], { env: noProxy })
    expect(r.stdout).toBe('200')
    const [req] = await events.waitFor((e) => e.type === 'egress.request' && e.path === '/captured')
    const [start] = await events.waitFor((e) => e.type === 'process.start' && e.execId === r.execId)
    await events.stop()
    expect(req).toMatchObject({ via: 'transparent', access: 'allowed', pid: start.pid, execId: r.execId })
  })

  it('dns.query names the process that asked', async () => {
    const events = collect(sandbox)
    const code = "import socket; print(socket.getaddrinfo('api.github.com', 443, socket.AF_INET)[0][4][0])"
    const r = await sandbox.exec(['python3', '-c', code])
    expect(r.exitCode).toBe(0)
    const [query] = await events.waitFor((e) => e.type === 'dns.query' && e.name === 'api.github.com')
    const [start] = await events.waitFor((e) => e.type === 'process.start' && e.execId === r.execId)
    await events.stop()
    expect(query).toMatchObject({ access: 'allowed', pid: start.pid, execId: r.execId })
    expect(query.command).toEqual(['python3', '-c', code])
  })

  it('the host-side proxy has no process to attribute', async () => {
    const events = collect(sandbox)
    const proxy = await sandbox.proxy()
    try {
      expect((await viaProxy(proxy.url, 'http://api.github.com/host-side')).status).toBe(200)
    } finally {
      await proxy.close()
    }
    const [req] = await events.waitFor((e) => e.type === 'egress.request' && e.path === '/host-side')
    await events.stop()
    expect(req).toMatchObject({ via: 'host', access: 'allowed' })
    expect(req.pid).toBeUndefined()
    expect(req.execId).toBeUndefined()
  })
})

describe('config.applied and denial reasons', () => {
  let sandbox: Sandbox
  afterAll(async () => sandbox?.close())

  it('config.applied carries the redacted config and its hash; every egress.request carries the hash', async () => {
    const config = {
      egress: [{ access: 'allow', host: 'api.example.com', methods: ['GET', 'POST'], override: { headers: { 'X-Api-Key': SECRET } } }],
      upstream: resolveAll(['api.example.com']),
    }
    sandbox = await getOrCreateSandbox('audit-config', config)
    const events = collect(sandbox)
    await sandbox.applyConfig(config)
    const [applied] = await events.waitFor((e) => e.type === 'config.applied')
    expect(applied.configHash).toMatch(/^[0-9a-f]{16}$/)
    expect(applied.config).toEqual(await sandbox.getConfig())
    expect(JSON.stringify(applied)).not.toContain(SECRET)

    const proxy = await sandbox.proxy()
    try {
      const before = plain.hits.length
      expect((await viaProxy(proxy.url, 'http://api.example.com/x', 'DELETE')).status).toBe(403)
      expect(plain.hits.length).toBe(before)
      const [denied] = await events.waitFor((e) => e.type === 'egress.request' && e.method === 'DELETE')
      // The rule named the host; the method is what failed.
      expect(denied).toMatchObject({ access: 'denied', reason: 'method', rule: 0, configHash: applied.configHash })
      expect(sandbox.decide({ host: 'api.example.com', method: 'DELETE' })).toMatchObject({ access: 'denied', reason: 'method', rule: 0 })
      expect(sandbox.decide({ host: 'other.example', method: 'DELETE' })).toMatchObject({ access: 'denied', reason: 'no-rule', rule: null })

      // A new config, a new hash, and the next decision carries it.
      await sandbox.applyConfig({ ...config, egress: [{ access: 'allow', host: 'api.example.com', ports: [8443] }] })
      const applied2 = (await events.waitFor((e) => e.type === 'config.applied', 2))[1]
      expect(applied2.configHash).not.toBe(applied.configHash)
      expect((await viaProxy(proxy.url, 'http://api.example.com/y')).status).toBe(403)
      const [port] = await events.waitFor((e) => e.type === 'egress.request' && e.path === '/y')
      expect(port).toMatchObject({ access: 'denied', reason: 'port', rule: 0, configHash: applied2.configHash })
      expect(plain.hits.length).toBe(before)
    } finally {
      await proxy.close()
      await events.stop()
    }
  })
})

describe('report mode', () => {
  let sandbox: Sandbox
  afterAll(async () => sandbox?.close())

  it('a request the policy would deny reaches the upstream, recorded allowed with wouldDeny; no injection under a report rule', async () => {
    sandbox = await getOrCreateSandbox('audit-report', {
      mode: 'report',
      egress: [
        { access: 'allow', host: 'api.example.com', mode: 'report', override: { headers: { 'X-Api-Key': SECRET } } },
        { access: 'deny', host: 'blocked.example', mode: 'enforce' },
      ],
      upstream: resolveAll(['api.example.com', 'unlisted.example', 'blocked.example']),
    })
    expect((await sandbox.getConfig()).mode).toBe('report')
    const events = collect(sandbox)
    const proxy = await sandbox.proxy()
    try {
      const before = plain.hits.length
      expect(await viaProxy(proxy.url, 'http://unlisted.example/would-deny')).toMatchObject({ status: 200, body: 'ok /would-deny' })
      expect(plain.hits.length).toBe(before + 1)
      const [req] = await events.waitFor((e) => e.type === 'egress.request' && e.path === '/would-deny')
      expect(req).toMatchObject({ access: 'allowed', wouldDeny: true, reason: 'no-rule', rule: null })

      // A rule in report mode never injects, even where it allows.
      const tls = session(await tlsThrough(proxy, 'api.example.com'))
      expect((await tls.request('GET', '/no-inject', { host: 'api.example.com' })).status).toBe(200)
      tls.close()
      expect(api.hits.at(-1)).toMatchObject({ path: '/no-inject' })
      expect(api.hits.at(-1)!.headers['x-api-key']).toBeUndefined()

      // A rule that says enforce holds.
      expect((await viaProxy(proxy.url, 'http://blocked.example/held')).status).toBe(403)
      expect(plain.hits.length).toBe(before + 1)
      const [held] = await events.waitFor((e) => e.type === 'egress.request' && e.path === '/held')
      expect(held).toMatchObject({ access: 'denied', reason: 'rule', rule: 1 })
      expect(held.wouldDeny).toBeUndefined()
      expect(sandbox.decide({ host: 'unlisted.example' })).toMatchObject({ access: 'allowed', wouldDeny: true, reason: 'no-rule' })
    } finally {
      await proxy.close()
      await events.stop()
    }
  })
})

describe('onUnmatched', () => {
  const sandboxes: Sandbox[] = []
  afterAll(async () => {
    for (const s of sandboxes) await s.close()
  })

  async function open(name: string, onUnmatched: (req: Record<string, unknown>) => unknown, onUnmatchedTimeoutMs?: number) {
    const sandbox = await getOrCreateSandbox(
      name,
      {
        egress: [{ access: 'allow', host: 'fast.example' }],
        upstream: resolveAll(['fast.example', 'ask.example', 'remember.example', 'slow.example']),
      },
      { onUnmatched: onUnmatched as never, onUnmatchedTimeoutMs },
    )
    sandboxes.push(sandbox)
    return sandbox
  }

  it('allow once, deny, and garbage: each request is asked about and recorded with reason callback', async () => {
    const asked: Record<string, unknown>[] = []
    const answers: unknown[] = ['allow', 'deny', 'maybe', { access: 'allow', remember: 'forever' }]
    const sandbox = await open('audit-ask', async (req) => {
      asked.push(req)
      if (answers.length === 1) throw new Error('the callback fails')
      return answers.shift()
    })
    const events = collect(sandbox)
    const proxy = await sandbox.proxy()
    try {
      const before = plain.hits.length
      expect((await viaProxy(proxy.url, 'http://ask.example/one')).status).toBe(200)
      expect(plain.hits.length).toBe(before + 1)
      expect((await viaProxy(proxy.url, 'http://ask.example/two')).status).toBe(403)
      expect((await viaProxy(proxy.url, 'http://ask.example/three')).status).toBe(403)
      expect((await viaProxy(proxy.url, 'http://ask.example/four', 'POST')).status).toBe(403)
      expect(plain.hits.length).toBe(before + 1)
      expect(asked.map((r) => r.path)).toEqual(['/one', '/two', '/three', '/four'])
      expect(asked[3]).toMatchObject({ host: 'ask.example', port: 80, method: 'POST', scheme: 'http' })
      const reqs = await events.waitFor((e) => e.type === 'egress.request' && e.host === 'ask.example', 4)
      expect(reqs.map((e) => [e.path, e.access, e.reason, e.rule])).toEqual([
        ['/one', 'allowed', 'callback', null],
        ['/two', 'denied', 'callback', null],
        ['/three', 'denied', 'callback', null],
        ['/four', 'denied', 'callback', null],
      ])
      // Allowed hosts are never asked about.
      expect((await viaProxy(proxy.url, 'http://fast.example/x')).status).toBe(200)
      expect(asked).toHaveLength(4)
    } finally {
      await proxy.close()
      await events.stop()
    }
  })

  it('remember: "sandbox" appends a rule visible in getConfig, and later requests are not asked about', async () => {
    let calls = 0
    const sandbox = await open('audit-remember', async () => {
      calls++
      return { access: 'allow', remember: 'sandbox' }
    })
    const proxy = await sandbox.proxy()
    try {
      expect((await viaProxy(proxy.url, 'http://remember.example/a')).status).toBe(200)
      expect((await sandbox.getConfig()).egress.at(-1)).toEqual({ access: 'allow', host: 'remember.example', ports: [80] })
      expect((await viaProxy(proxy.url, 'http://remember.example/b')).status).toBe(200)
      expect(calls).toBe(1)
      expect(sandbox.decide({ host: 'remember.example', scheme: 'http' })).toMatchObject({ access: 'allowed', reason: 'rule', rule: 1 })
    } finally {
      await proxy.close()
    }
  })

  it('a callback that never answers: the request is denied after the bound', async () => {
    const sandbox = await open('audit-never', () => new Promise(() => {}), 300)
    const proxy = await sandbox.proxy()
    try {
      const before = plain.hits.length
      const r = await viaProxy(proxy.url, 'http://ask.example/never')
      expect(r.status).toBe(403)
      expect(r.ms).toBeGreaterThanOrEqual(290)
      expect(r.ms).toBeLessThan(3000)
      expect(plain.hits.length).toBe(before)
    } finally {
      await proxy.close()
    }
  })

  it('100 requests waiting on a slow callback do not delay an allowed request by more than 50 ms', async () => {
    let asked = 0
    const sandbox = await open('audit-slow', () => {
      asked++
      return new Promise((r) => setTimeout(() => r('deny'), 5000))
    })
    const proxy = await sandbox.proxy()
    const median = (xs: number[]) => xs.sort((a, b) => a - b)[Math.floor(xs.length / 2)]
    const timed = async () => {
      const ms: number[] = []
      for (let i = 0; i < 15; i++) {
        const r = await viaProxy(proxy.url, 'http://fast.example/fast')
        expect(r.status).toBe(200)
        ms.push(r.ms)
      }
      return median(ms)
    }
    try {
      const baseline = await timed()
      const before = plain.hits.length
      const waiting = Array.from({ length: 100 }, (_, i) => viaProxy(proxy.url, `http://slow.example/${i}`))
      // Measure while all 100 are held (each has reached the callback), not while they connect.
      const deadline = Date.now() + 5000
      while (asked < 100 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 10))
      expect(asked).toBe(100)
      const during = await timed()
      expect(asked).toBe(100)
      const slow = await Promise.all(waiting)
      expect(slow.every((r) => r.status === 403)).toBe(true)
      expect(plain.hits.filter((h) => h.host === 'slow.example')).toHaveLength(0)
      expect(plain.hits.length - before).toBe(15)
      console.log(`[onUnmatched] allowed request, median of 15: ${baseline.toFixed(1)} ms alone, ${during.toFixed(1)} ms with 100 held`)
      expect(during - baseline).toBeLessThan(50)
    } finally {
      await proxy.close()
    }
  })
})
