// Named secrets end to end (docs/secrets.md): a Python "SDK" inside reads its key from the
// environment and gets only a placeholder; the proxy puts the real value on requests to the
// secret's hosts, refuses the placeholder anywhere else, and scrubs the value out of whatever an
// echoing upstream sends back (plain, chunked, compressed, split across TCP writes). Loopback
// upstreams only, under real-looking names through `upstream.resolve`. Every refusal asserts the
// upstream saw nothing; every injection asserts the sandbox never could see the value.
import { spawn } from 'node:child_process'
import { readdirSync, readFileSync, statSync, writeFileSync } from 'node:fs'
import https from 'node:https'
import type { IncomingMessage, ServerResponse } from 'node:http'
import type { AddressInfo, Socket } from 'node:net'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import zlib from 'node:zlib'
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest'

import { getOrCreateSandbox, type Sandbox, type SandboxEvent } from '../index.js'
import { rejection, useTempHome } from './helpers/home.js'
import { makeTestCA, type TestCA } from './helpers/upstreams.js'

const home = useTempHome()
const VALUE = 'sk-live-SECRETS-SPEC-0123456789abcdef'
const ROTATED = 'sk-live-ROTATED-SPEC-fedcba9876543210'
const GH_VALUE = 'ghp_SECRETS_SPEC_basic_0123456789'
const PLACEHOLDER = /^hive_ph_[a-z2-7]{32}$/
const root = fileURLToPath(new URL('..', import.meta.url))

interface EchoHit {
  path: string
  query: string
  headers: Record<string, string | string[] | undefined>
  body: string
}

interface Echo {
  addr: string
  hits: EchoHit[]
  close: () => Promise<void>
}

/** An HTTPS upstream that answers with the request it saw (headers, URL, body) in the body and
 * the Authorization header in a response header, in the form the path asks for. */
async function echoUpstream(ca: TestCA): Promise<Echo> {
  const hits: EchoHit[] = []
  const sockets = new Set<Socket>()
  const server = https.createServer({ cert: ca.certPem + ca.caPem, key: ca.keyPem }, (req: IncomingMessage, res: ServerResponse) => {
    const chunks: Buffer[] = []
    req.on('data', (c: Buffer) => chunks.push(c))
    req.on('end', () => {
      const [path, query = ''] = (req.url ?? '/').split('?')
      const hit = { path, query, headers: { ...req.headers }, body: Buffer.concat(chunks).toString('latin1') }
      hits.push(hit)
      if (path.endsWith('/info/refs') && !req.headers.authorization) {
        res.writeHead(401, { 'www-authenticate': 'Basic realm="git"', 'content-length': '0' })
        res.end()
        return
      }
      const payload = Buffer.from(JSON.stringify({ echo: hit }))
      const head: Record<string, string> = { 'content-type': 'application/json', 'x-echo-authorization': String(req.headers.authorization ?? '') }
      const mode = path.split('/')[1]
      if (mode === 'gzip' || mode === 'br' || mode === 'deflate') {
        const packed = mode === 'gzip' ? zlib.gzipSync(payload) : mode === 'br' ? zlib.brotliCompressSync(payload) : zlib.deflateSync(payload)
        res.writeHead(200, { ...head, 'content-encoding': mode, 'content-length': String(packed.length) })
        res.end(packed)
      } else if (mode === 'chunked') {
        res.writeHead(200, head)
        const third = Math.ceil(payload.length / 3)
        res.write(payload.subarray(0, third))
        res.write(payload.subarray(third, 2 * third))
        res.end(payload.subarray(2 * third))
      } else if (mode === 'split') {
        // Two TCP writes with a pause between, cut at the offset the path names (relative to
        // where the value starts in the body, so the cut falls inside it).
        const at = payload.indexOf(VALUE)
        const cut = Math.max(1, Math.min(payload.length - 1, (at < 0 ? 0 : at) + Number(path.split('/')[2] ?? 0)))
        res.writeHead(200, { ...head, 'content-length': String(payload.length) })
        res.flushHeaders()
        res.write(payload.subarray(0, cut))
        setTimeout(() => res.end(payload.subarray(cut)), 30)
      } else {
        res.writeHead(200, { ...head, 'content-length': String(payload.length) })
        res.end(payload)
      }
    })
  })
  server.on('secureConnection', (s: Socket) => {
    s.setNoDelay(true)
    sockets.add(s)
    s.on('close', () => sockets.delete(s))
  })
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  const { port } = server.address() as AddressInfo
  return {
    addr: `127.0.0.1:${port}`,
    hits,
    close: () =>
      new Promise<void>((resolve) => {
        for (const s of sockets) s.destroy()
        server.close(() => resolve())
      }),
  }
}

/** The "SDK": reads OPENAI_API_KEY (or GITHUB_TOKEN for basic), calls the URL with it, and prints
 * what it had and what it got. */
const CLIENT = String.raw`
import base64, json, os, sys, urllib.error, urllib.request
url, mode = sys.argv[1], sys.argv[2]
key = os.environ.get("OPENAI_API_KEY", "")
headers = {"Accept-Encoding": "gzip, br, deflate"}
if mode == "bearer":
    headers["Authorization"] = "Bearer " + key
elif mode == "basic":
    token = os.environ["GITHUB_TOKEN"]
    headers["Authorization"] = "Basic " + base64.b64encode(("x-access-token:" + token).encode()).decode()
elif mode == "query":
    url += ("&" if "?" in url else "?") + "api_key=" + key
elif mode == "body":
    pass
data = ("{\"key\": \"" + key + "\"}").encode() if mode == "body" else None
req = urllib.request.Request(url, headers=headers, data=data)
try:
    r = urllib.request.urlopen(req, timeout=15)
    status, body, rh = r.status, r.read(), dict(r.headers)
except urllib.error.HTTPError as e:
    status, body, rh = e.code, e.read(), dict(e.headers)
environ = open("/proc/self/environ", "rb").read().decode("latin1")
print(json.dumps({"key": key, "status": status, "body": body.decode("latin1"), "headers": rh, "environ": environ}))
`

let ca: TestCA
let openai: Echo
let other: Echo
let github: Echo
let sandbox: Sandbox
const seenEvents: SandboxEvent[] = []
const outputs: string[] = []

function config(extra: Record<string, unknown> = {}) {
  return {
    secrets: {
      OPENAI_KEY: { value: VALUE, hosts: ['api.openai.com'] },
      GH_TOKEN: { value: GH_VALUE, hosts: ['github.com'] },
    },
    env: { OPENAI_API_KEY: '{{secrets.OPENAI_KEY}}', GITHUB_TOKEN: '{{secrets.GH_TOKEN}}' },
    egress: [
      { access: 'allow', host: 'api.openai.com' },
      { access: 'allow', host: 'other.example' },
      { access: 'allow', host: 'github.com' },
    ],
    upstream: {
      resolve: { 'api.openai.com:443': openai.addr, 'other.example:443': other.addr, 'github.com:443': github.addr },
      ca: [ca.caPem],
    },
    ...extra,
  }
}

interface ClientResult {
  key: string
  status: number
  body: string
  headers: Record<string, string>
  environ: string
}

async function client(url: string, mode = 'bearer'): Promise<ClientResult> {
  const r = await sandbox.exec(['python3', '-c', CLIENT, url, mode])
  outputs.push(r.stdout, r.stderr)
  expect(r.stderr).toBe('')
  expect(r.exitCode).toBe(0)
  return JSON.parse(r.stdout) as ClientResult
}

/** Events emitted while `fn` runs, of the given types. */
async function eventsDuring(types: string[], fn: () => Promise<void>, ms = 1000): Promise<SandboxEvent[]> {
  const stream = sandbox.getEventsStream()
  const seen: SandboxEvent[] = []
  const it = stream[Symbol.asyncIterator]()
  const reading = (async () => {
    for (;;) {
      const next = await it.next()
      if (next.done) break
      seenEvents.push(next.value)
      if (types.includes(next.value.type)) seen.push(next.value)
    }
  })()
  await fn()
  await new Promise((r) => setTimeout(r, ms))
  await it.return?.()
  await Promise.race([reading, new Promise((r) => setTimeout(r, 100))])
  return seen
}

beforeAll(async () => {
  ca = makeTestCA(['api.openai.com', 'other.example', 'github.com'])
  openai = await echoUpstream(ca)
  other = await echoUpstream(ca)
  github = await echoUpstream(ca)
  sandbox = await getOrCreateSandbox('secrets-e2e', config() as never)
})

afterEach(async () => {
  for (const u of [openai, other, github]) u.hits.length = 0
  await sandbox.applyConfig(config() as never)
})

afterAll(async () => {
  await sandbox?.close()
  await Promise.all([openai?.close(), other?.close(), github?.close()])
  home.cleanup()
})

describe('placeholders', () => {
  it('gives the SDK a placeholder; the upstream sees the value; env, /proc/self/environ and the response hold only the placeholder', async () => {
    let r!: ClientResult
    const events = await eventsDuring(['secret.scrubbed'], async () => {
      r = await client('https://api.openai.com/v1/models')
    })
    expect(r.key).toMatch(PLACEHOLDER)
    expect(r.status).toBe(200)
    expect(openai.hits).toHaveLength(1)
    expect(openai.hits[0].headers.authorization).toBe(`Bearer ${VALUE}`)
    expect(r.environ).toContain(`OPENAI_API_KEY=${r.key}`)
    // The echo of the Authorization header comes back with the placeholder in its place.
    expect(JSON.parse(r.body).echo.headers.authorization).toBe(`Bearer ${r.key}`)
    expect(r.headers['x-echo-authorization'] ?? r.headers['X-Echo-Authorization']).toBe(`Bearer ${r.key}`)
    expect(JSON.stringify(r)).not.toContain(VALUE)
    expect(events).toEqual([expect.objectContaining({ type: 'secret.scrubbed', secret: 'OPENAI_KEY', host: 'api.openai.com', count: 2 })])
  }, 60_000)

  it('keeps the placeholder across execs, different from another sandbox', async () => {
    const a = await client('https://api.openai.com/v1/a')
    const b = await client('https://api.openai.com/v1/b')
    expect(a.key).toBe(b.key)
    const second = await getOrCreateSandbox('secrets-e2e-other', { secrets: { OPENAI_KEY: VALUE }, env: { K: '{{secrets.OPENAI_KEY}}' }, egress: [{ access: 'allow', host: 'api.openai.com', override: { headers: { 'X-Key': '{{secrets.OPENAI_KEY}}' } } }] } as never)
    try {
      const r = await second.exec(['sh', '-c', 'printf %s "$K"'])
      expect(r.stdout).toMatch(PLACEHOLDER)
      expect(r.stdout).not.toBe(a.key)
    } finally {
      await second.close()
    }
  }, 60_000)

  it('refuses the placeholder on the way to another allowed host (403, secret.blocked); that upstream sees nothing', async () => {
    let r!: ClientResult
    const events = await eventsDuring(['secret.blocked', 'egress.request'], async () => {
      r = await client('https://other.example/v1/models')
    })
    expect(r.status).toBe(403)
    expect(r.headers['x-hive-denied'] ?? r.headers['X-Hive-Denied']).toBe('secret-blocked')
    expect(other.hits).toHaveLength(0)
    expect(events).toContainEqual(expect.objectContaining({ type: 'secret.blocked', secret: 'OPENAI_KEY', host: 'other.example', where: 'header' }))
    expect(events).toContainEqual(expect.objectContaining({ type: 'egress.request', access: 'denied', reason: 'secret-blocked', host: 'other.example' }))
  }, 60_000)

  it('never injects a template into a request to a host outside the secret\'s hosts, whatever the rule says', async () => {
    await sandbox.applyConfig(config({
      egress: [{ access: 'allow', host: 'other.example', override: { headers: { Authorization: 'Bearer {{secrets.OPENAI_KEY}}' } } }],
      env: {},
    }) as never)
    const events = await eventsDuring(['secret.blocked'], async () => {
      const r = await sandbox.exec(['curl', '-s', '-o', '/dev/null', '-w', '%{http_code}', 'https://other.example/v1/models'])
      expect(r.stdout).toBe('403')
    })
    expect(events).toEqual([expect.objectContaining({ secret: 'OPENAI_KEY', host: 'other.example', where: 'override' })])
    expect(other.hits).toHaveLength(0)
  }, 60_000)

  it('refuses the placeholder in the URL query and in the body of a request to another host', async () => {
    for (const mode of ['query', 'body']) {
      const events = await eventsDuring(['secret.blocked'], async () => {
        const r = await client('https://other.example/v1/x', mode)
        expect(r.status).toBe(403)
      })
      expect(events).toEqual([expect.objectContaining({ secret: 'OPENAI_KEY', host: 'other.example', where: mode === 'query' ? 'url' : 'body' })])
    }
    expect(other.hits).toHaveLength(0)
  }, 60_000)

  it('substitutes the value into the URL query for the secret\'s host', async () => {
    const r = await client('https://api.openai.com/v1/q?x=1', 'query')
    expect(r.status).toBe(200)
    expect(openai.hits[0].query).toBe(`x=1&api_key=${VALUE}`)
    expect(JSON.stringify(r)).not.toContain(VALUE)
  }, 60_000)

  it('substitutes a placeholder inside a Basic credential (the git-over-HTTPS pattern)', async () => {
    const r = await client('https://github.com/o/r.git/info/refs?service=git-upload-pack', 'basic')
    expect(r.status).toBe(200)
    const sent = String(github.hits[0].headers.authorization)
    expect(Buffer.from(sent.replace(/^Basic /, ''), 'base64').toString()).toBe(`x-access-token:${GH_VALUE}`)
    expect(JSON.stringify(r)).not.toContain(GH_VALUE)
  }, 60_000)

  it('lets git itself fetch with the placeholder as its password', async () => {
    const r = await sandbox.exec(['sh', '-c', 'git -c credential.helper= ls-remote "https://x-access-token:$GITHUB_TOKEN@github.com/o/r.git" 2>&1; true'])
    outputs.push(r.stdout, r.stderr)
    const withAuth = github.hits.filter((h) => h.headers.authorization)
    expect(withAuth.length).toBeGreaterThan(0)
    expect(Buffer.from(String(withAuth[0].headers.authorization).replace(/^Basic /, ''), 'base64').toString()).toBe(`x-access-token:${GH_VALUE}`)
    expect(r.stdout + r.stderr).not.toContain(GH_VALUE)
  }, 60_000)
})

describe('response scrubbing', () => {
  for (const mode of ['plain', 'chunked', 'gzip', 'br', 'deflate', 'split/0', 'split/1', 'split/7', 'split/20']) {
    it(`never delivers the value echoed back (${mode})`, async () => {
      const r = await client(`https://api.openai.com/${mode}`)
      expect(r.status).toBe(200)
      expect(openai.hits[0].headers.authorization).toBe(`Bearer ${VALUE}`)
      expect(r.body).not.toContain(VALUE)
      const echoed = JSON.parse(r.body).echo
      expect(echoed.headers.authorization).toBe(`Bearer ${r.key}`)
      // Delivered decoded, with the coding header gone.
      expect(Object.keys(r.headers).map((h) => h.toLowerCase())).not.toContain('content-encoding')
    }, 60_000)
  }

  it('scrubs a value injected by a template override, as [redacted] for an inline one', async () => {
    await sandbox.applyConfig(config({
      egress: [
        { access: 'allow', host: 'api.openai.com', override: { headers: { Authorization: 'Bearer {{secrets.OPENAI_KEY}}', 'X-Inline': 'inline-secret-value-42' } } },
      ],
      env: {},
    }) as never)
    const r = await sandbox.exec(['curl', '-s', '--compressed', 'https://api.openai.com/gzip'])
    outputs.push(r.stdout, r.stderr)
    expect(openai.hits[0].headers.authorization).toBe(`Bearer ${VALUE}`)
    expect(openai.hits[0].headers['x-inline']).toBe('inline-secret-value-42')
    const echoed = JSON.parse(r.stdout).echo
    expect(echoed.headers.authorization).toMatch(/^Bearer hive_ph_[a-z2-7]{32}$/)
    expect(echoed.headers['x-inline']).toBe('[redacted]')
    expect(r.stdout).not.toContain(VALUE)
    expect(r.stdout).not.toContain('inline-secret-value-42')
  }, 60_000)
})

describe('config', () => {
  it('round-trips named secrets and templates through getConfig() with the spread pattern, keeping the values', async () => {
    await sandbox.applyConfig(config({
      egress: [{ access: 'allow', host: 'api.openai.com', override: { headers: { Authorization: 'Bearer {{secrets.OPENAI_KEY}}' } } }],
    }) as never)
    const cfg = await sandbox.getConfig()
    expect(JSON.stringify(cfg)).not.toContain(VALUE)
    expect(cfg.secrets).toEqual({ OPENAI_KEY: { value: '[redacted]', hosts: ['api.openai.com'] }, GH_TOKEN: { value: '[redacted]', hosts: ['github.com'] } })
    expect(cfg.egress?.[0].override?.headers.authorization).toBe('Bearer {{secrets.OPENAI_KEY}}')
    await sandbox.applyConfig({ ...cfg, egress: [...(cfg.egress ?? []), { access: 'allow', host: 'other.example' }] })
    // getOrCreateSandbox on the live sandbox applies the same way.
    expect(await getOrCreateSandbox('secrets-e2e', await sandbox.getConfig())).toBe(sandbox)
    const r = await sandbox.exec(['curl', '-s', 'https://api.openai.com/v1/models'])
    expect(r.exitCode).toBe(0)
    expect(openai.hits[0].headers.authorization).toBe(`Bearer ${VALUE}`)
  }, 60_000)

  it('still refuses the spread pattern over an inline override value, naming the field', async () => {
    await sandbox.applyConfig(config({ egress: [{ access: 'allow', host: 'api.openai.com', override: { headers: { 'X-Finnhub-Token': VALUE } } }] }) as never)
    const cfg = await sandbox.getConfig()
    const err = await rejection(sandbox.applyConfig({ ...cfg, egress: [...(cfg.egress ?? []), { access: 'allow', host: 'other.example' }] }))
    expect(err.code).toBe('HIVE_INVALID_CONFIG')
    expect(err.issues?.map((i) => i.path)).toEqual(['egress[0].override.headers["x-finnhub-token"]'])
    expect(err.message).not.toContain(VALUE)
  })

  it('rejects a template naming an unknown secret, and the marker for a new name, with the field path', async () => {
    const err = await rejection(sandbox.applyConfig(config({
      secrets: { OPENAI_KEY: VALUE, NEW_ONE: '[redacted]' },
      egress: [{ access: 'allow', host: 'a.example', override: { headers: { Authorization: 'Bearer {{secrets.NOPE}}' } } }],
      env: { X: '{{secrets.ALSO_NOPE}}' },
    }) as never))
    expect(err.code).toBe('HIVE_INVALID_CONFIG')
    expect(err.issues?.map((i) => i.path).sort()).toEqual(['egress[0].override.headers["Authorization"]', 'env["X"]', 'secrets["NEW_ONE"]'])
    expect(err.message).not.toContain(VALUE)
  })

  it('applies a rotated value from the next request, with the same placeholder', async () => {
    const before = await client('https://api.openai.com/v1/a')
    const cfg = await sandbox.getConfig()
    await sandbox.applyConfig({ ...cfg, secrets: { ...cfg.secrets, OPENAI_KEY: { value: ROTATED, hosts: ['api.openai.com'] } } })
    const after = await client('https://api.openai.com/v1/b')
    expect(after.key).toBe(before.key)
    expect(openai.hits.map((h) => h.headers.authorization)).toEqual([`Bearer ${VALUE}`, `Bearer ${ROTATED}`])
    expect(JSON.stringify(after)).not.toContain(ROTATED)
  }, 60_000)
})

describe('leaks', () => {
  it('never prints a value with HIVE_LOG=trace (the hive CLI over the same engine)', async () => {
    const cfgFile = join(home.dir, 'trace.json')
    writeFileSync(cfgFile, JSON.stringify({
      ...config(),
      secrets: { OPENAI_KEY: { value: '$env:TRACE_SECRET', hosts: ['api.openai.com'] } },
      env: { OPENAI_API_KEY: '{{secrets.OPENAI_KEY}}' },
    }))
    const run = await new Promise<{ status: number | null; stdout: string; stderr: string }>((resolve, reject) => {
      const child = spawn(process.execPath, [join(root, 'bin', 'hive.js'), 'run', '--config', cfgFile, '--', 'python3', '-c', CLIENT, 'https://api.openai.com/gzip', 'bearer'], {
        env: { ...process.env, HIVE_HOME: join(home.dir, 'trace-home'), HIVE_LOG: 'trace', TRACE_SECRET: VALUE },
      })
      let stdout = ''
      let stderr = ''
      child.stdout.on('data', (d) => (stdout += d))
      child.stderr.on('data', (d) => (stderr += d))
      child.on('error', reject)
      child.on('close', (status) => resolve({ status, stdout, stderr }))
      child.stdin.end()
    })
    expect(run.status).toBe(0)
    expect(openai.hits[0].headers.authorization).toBe(`Bearer ${VALUE}`)
    expect(run.stderr.length).toBeGreaterThan(1000) // trace output was on
    expect(run.stderr).not.toContain(VALUE)
    expect(run.stdout).not.toContain(VALUE)
  }, 60_000)
  it('never writes a value to the audit log, events, errors or the hive home', async () => {
    const files: string[] = []
    const walk = (dir: string) => {
      for (const name of readdirSync(dir)) {
        const path = join(dir, name)
        const st = statSync(path)
        if (st.isDirectory()) walk(path)
        else if (st.isFile() && st.size < 64 * 1024 * 1024) files.push(path)
      }
    }
    walk(home.dir)
    expect(files.some((f) => f.endsWith('audit.jsonl'))).toBe(true)
    for (const value of [VALUE, ROTATED, GH_VALUE, 'inline-secret-value-42']) {
      for (const f of files) expect(readFileSync(f).includes(value), f).toBe(false)
      expect(JSON.stringify(seenEvents)).not.toContain(value)
      for (const o of outputs) expect(o).not.toContain(value)
    }
    expect(seenEvents.length).toBeGreaterThan(0)
  })

})
