// Denials people can act on (docs/network-access.md#what-a-denial-looks-like): every real client
// inside a sandbox, through the proxy variables or transparently, gets a 403 that names the method
// and path of its request, and the event stream records that method and path; upstream failures
// get a 502/504 naming the cause, with an egress.error event. Loopback only: real-looking names
// are mapped to loopback servers with `upstream.resolve`. Run by CI as root and unprivileged.
import { execFileSync } from 'node:child_process'
import { createServer, type Server } from 'node:net'
import type { AddressInfo } from 'node:net'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'

import { getOrCreateSandbox, type Sandbox, type SandboxEvent } from '../index.js'
import { useTempHome } from './helpers/home.js'
import { httpsUpstream, makeTestCA, type TestCA, type Upstream } from './helpers/upstreams.js'

const home = useTempHome()
const whoami = process.getuid?.() === 0 ? 'root' : 'unprivileged'
const NO_PROXY_ENV = { HTTPS_PROXY: '', https_proxy: '', HTTP_PROXY: '', http_proxy: '', ALL_PROXY: '', all_proxy: '' }

/** Whether a client is installed; a missing one skips its test with the install command. */
function has(cmd: string, ...args: string[]): boolean {
  try {
    execFileSync(cmd, args, { stdio: 'ignore' })
    return true
  } catch {
    return false
  }
}
const CURL = has('curl', '--version')
const GIT = has('git', '--version')
const REQUESTS = has('python3', '-c', 'import requests')
const CURL_H2 = CURL && execFileSync('curl', ['--version'], { encoding: 'utf8' }).includes('HTTP2')

let ca: TestCA
let api: Upstream
let closed: Server
let closedAddr: string
let closedHits = 0
let sandbox: Sandbox
const events: SandboxEvent[] = []
let reading: Promise<void>

const run = (argv: string[], env: Record<string, string> = {}) => sandbox.exec(argv, { env })

/** The egress events emitted while `action` ran (after a short settling wait). */
async function during(action: () => Promise<void>): Promise<SandboxEvent[]> {
  const from = events.length
  await action()
  await new Promise((r) => setTimeout(r, 300))
  return events.slice(from)
}

/** Asserts an `egress.request` denial of exactly this method and path is among `seen`. */
function expectDenied(seen: SandboxEvent[], host: string, method: string, path: string, via?: string): void {
  expect(seen).toContainEqual(expect.objectContaining({ type: 'egress.request', access: 'denied', host, method, path, ...(via ? { via } : {}) }))
}

beforeAll(async () => {
  ca = makeTestCA(['api.github.com'])
  api = await httpsUpstream(ca)
  // A port that accepts nothing: bound and closed again.
  closed = createServer(() => closedHits++)
  await new Promise<void>((resolve) => closed.listen(0, '127.0.0.1', resolve))
  closedAddr = `127.0.0.1:${(closed.address() as AddressInfo).port}`
  await new Promise((r) => closed.close(r))
  sandbox = await getOrCreateSandbox('denials', {
    egress: [
      { access: 'allow', host: 'api.github.com' },
      { access: 'allow', host: 'closed.example' },
      { access: 'allow', host: 'nowhere.invalid' },
    ],
    upstream: { resolve: { 'api.github.com:443': api.addr, 'closed.example:443': closedAddr }, ca: [ca.caPem] },
  })
  const stream = sandbox.getEventsStream()
  reading = (async () => {
    for await (const e of stream) if (e.type.startsWith('egress.')) events.push(e)
  })()
})

afterAll(async () => {
  await sandbox?.close()
  await reading
  await api?.close()
  home.cleanup()
})

describe(`a denied request is a 403 naming its method and path (${whoami})`, () => {
  it.skipIf(!CURL)(`curl through the proxy, HTTP/1.1 and h2${CURL ? '' : ' (skipped: apt-get install curl)'}`, async () => {
    const seen = await during(async () => {
      const h1 = await run(['curl', '-sS', '--http1.1', '-i', '--suppress-connect-headers', 'https://github.com/login'])
      expect(h1.stdout).toMatch(/^HTTP\/1\.1 403 Blocked by hive egress policy\r\n/)
      expect(h1.stdout).toMatch(/\r\nx-hive-denied: no-rule\r\n/i)
      expect(h1.stdout).toContain("\r\n\r\nhive: GET github.com/login denied by this sandbox's egress policy (no rule matches host github.com)\n")
      if (CURL_H2) {
        // curl offers h2 and http/1.1; hive picks HTTP/1.1 (h2-only clients get h2: proxy.spec).
        const h2 = await run(['curl', '-sS', '--http2', '-X', 'DELETE', '-w', '\n%{http_version} %{http_code}', 'https://github.com/repos/x'])
        expect(h2.stdout).toBe("hive: DELETE github.com/repos/x denied by this sandbox's egress policy (no rule matches host github.com)\n\n1.1 403")
      }
      const plain = await run(['curl', '-sS', '-w', '%{http_code}', 'http://github.com/plain'])
      expect(plain.stdout).toMatch(/^hive: GET github\.com\/plain denied .*\n403$/)
    })
    expectDenied(seen, 'github.com', 'GET', '/login', 'proxy')
    if (CURL_H2) expectDenied(seen, 'github.com', 'DELETE', '/repos/x', 'proxy')
    expectDenied(seen, 'github.com', 'GET', '/plain', 'proxy')
    expect(seen.filter((e) => e.type === 'egress.request' && e.method === 'CONNECT')).toEqual([])
    expect(api.hits).toEqual([])
  })

  it.skipIf(!REQUESTS)(`Python requests with and without the proxy variables${REQUESTS ? '' : ' (skipped: apt-get install python3-requests)'}`, async () => {
    const script = (trustEnv: boolean) =>
      `import os,requests\ns=requests.Session()\ns.trust_env=${trustEnv ? 'True' : 'False'}\nr=s.post("https://pypi.org/upload/", data=b"x", verify=os.environ["SSL_CERT_FILE"], timeout=10)\nprint(r.status_code, r.reason, r.headers["x-hive-denied"], r.text, end="")`
    const seen = await during(async () => {
      const proxied = await run(['python3', '-c', script(true)])
      expect(proxied.stderr).toBe('')
      expect(proxied.stdout).toBe("403 Blocked by hive egress policy no-rule hive: POST pypi.org/upload/ denied by this sandbox's egress policy (no rule matches host pypi.org)\n")
      const direct = await run(['python3', '-c', script(false)], NO_PROXY_ENV)
      expect(direct.stderr).toBe('')
      expect(direct.stdout).toBe(proxied.stdout)
    })
    expectDenied(seen, 'pypi.org', 'POST', '/upload/', 'proxy')
    expectDenied(seen, 'pypi.org', 'POST', '/upload/', 'transparent')
    expect(api.hits).toEqual([])
  })

  it("Node's fetch with no proxy variables (transparent capture)", async () => {
    const seen = await during(async () => {
      const r = await run(['node', '-e', "fetch('https://registry.npmjs.org/left-pad?x=1').then(async r => console.log(r.status, r.headers.get('x-hive-denied'), await r.text()), e => { console.error(String(e.cause ?? e)); process.exit(3) })"], NO_PROXY_ENV)
      expect(r.stderr).toBe('')
      expect(r.stdout).toBe("403 no-rule hive: GET registry.npmjs.org/left-pad denied by this sandbox's egress policy (no rule matches host registry.npmjs.org)\n\n")
    })
    expectDenied(seen, 'registry.npmjs.org', 'GET', '/left-pad', 'transparent')
    expect(api.hits).toEqual([])
  })

  it.skipIf(!GIT)(`git shows hive's body in its error${GIT ? '' : ' (skipped: apt-get install git)'}`, async () => {
    const seen = await during(async () => {
      const r = await run(['git', 'clone', '-q', 'https://github.com/acme/secret.git', '/tmp/secret'])
      expect(r.exitCode).not.toBe(0)
      expect(r.stderr).toContain("hive: GET github.com/acme/secret.git/info/refs denied by this sandbox's egress policy (no rule matches host github.com)")
      expect(r.stderr).toContain('403')
    })
    expectDenied(seen, 'github.com', 'GET', '/acme/secret.git/info/refs', 'proxy')
    expect(api.hits).toEqual([])
  })

  it('an allowed request still reaches its upstream (the tests above can fail)', async () => {
    const r = await run(['node', '-e', "fetch('https://api.github.com/zen').then(async r => console.log(r.status, await r.text()))"], NO_PROXY_ENV)
    expect(r.stdout.trim()).toBe('200 ok /zen')
    expect(api.hits.map((h) => h.path)).toEqual(['/zen'])
    api.hits.length = 0
  })
})

describe(`an upstream failure is a 502 naming the cause, with an egress.error event (${whoami})`, () => {
  it.skipIf(!CURL)(`a closed port and a name nothing resolves${CURL ? '' : ' (skipped: apt-get install curl)'}`, async () => {
    const seen = await during(async () => {
      const refused = await run(['curl', '-sS', '-i', '--http1.1', '--suppress-connect-headers', 'https://closed.example/v1/x'])
      expect(refused.stdout).toMatch(/^HTTP\/1\.1 502 Upstream refused the connection\r\n/)
      expect(refused.stdout).toMatch(/\r\nx-hive-upstream-error: refused\r\n/i)
      expect(refused.stdout).toContain('hive: GET closed.example/v1/x failed upstream (refused): the upstream refused the connection\n')
      const dns = await run(['curl', '-sS', '-w', '\n%{http_code}', 'https://nowhere.invalid/y'])
      expect(dns.stdout).toMatch(/^hive: GET nowhere\.invalid\/y failed upstream \(dns\): .*\n502$/s)
    })
    const errors = seen.filter((e) => e.type === 'egress.error')
    expect(errors).toEqual([
      expect.objectContaining({ host: 'closed.example', port: 443, cause: 'refused' }),
      expect.objectContaining({ host: 'nowhere.invalid', port: 443, cause: 'dns' }),
    ])
    for (const error of errors) {
      if (error.type !== 'egress.error') continue
      const request = seen.find((e) => e.id === error.requestId)
      expect(request).toMatchObject({ type: 'egress.request', access: 'allowed', host: error.host })
      expect(error.detail.length).toBeGreaterThan(0)
    }
    expect(closedHits).toBe(0)
  })
})

// An agent resolving endless random names (a DNS exfiltration attempt, or a crawler) must not grow
// the host process: denied names live in a bounded ring (docs/network-access.md#dns-and-transparent-capture).
// The Rust test `a_million_denied_names_stay_bounded` inserts one million; here a real resolver loop
// inside the sandbox runs for a time budget (2 shared cores: as many names as fit).
const FLOOD_BUDGET_S = 20
// About what 100 000 names would take in an unbounded table: a leak of names shows; GC noise does not.
const FLOOD_RSS_LIMIT_MB = 16

describe(`random names resolved inside a sandbox keep the host's memory bounded (${whoami})`, () => {
  it(`resolves up to 1 000 000 random names in ${FLOOD_BUDGET_S} s; RSS grows less than ${FLOOD_RSS_LIMIT_MB} MB`, async () => {
    const flood = await getOrCreateSandbox('dns-flood', { egress: [{ access: 'allow', host: 'api.github.com' }] })
    try {
      // Raw UDP queries, 64 in flight, each for a fresh random name; prints answered and denied-range answers.
      const script = (seconds: number, limit: number) => `import os,socket,struct,time
u=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);u.settimeout(2)
end=time.monotonic()+${seconds};sent=answered=ring=0
def q(i,name):
    return struct.pack(">HHHHHH",i&0xffff,0x0100,1,0,0,0)+b"".join(bytes([len(l)])+l for l in name.split(b"."))+b"\\0"+struct.pack(">HH",1,1)
while sent<${limit} and time.monotonic()<end:
    for _ in range(64):
        u.sendto(q(sent,os.urandom(8).hex().encode()+b".exfil.example"),("127.0.0.1",53));sent+=1
    for _ in range(64):
        try:
            r=u.recv(512)
        except socket.timeout:
            break
        answered+=1
        if r[-4:-2]==bytes([127,2]): ring+=1
print(sent,answered,ring)`
      const warm = await flood.exec(['python3', '-c', script(60, 20_000)])
      expect(warm.stderr).toBe('')
      global.gc?.()
      const before = process.memoryUsage().rss
      const started = Date.now()
      const r = await flood.exec(['python3', '-c', script(FLOOD_BUDGET_S, 1_000_000)], { timeout: (FLOOD_BUDGET_S + 30) * 1000 })
      const seconds = (Date.now() - started) / 1000
      expect(r.stderr).toBe('')
      const [sent, answered, ring] = r.stdout.trim().split(' ').map(Number)
      global.gc?.()
      const grownMb = (process.memoryUsage().rss - before) / 2 ** 20
      console.log(`[dns-flood] ${sent} random names in ${seconds.toFixed(1)} s (${Math.round(sent / seconds)}/s), ${answered} answered, ${ring} in 127.2/16; RSS +${grownMb.toFixed(1)} MB`)
      expect(sent).toBeGreaterThan(20_000)
      expect(answered).toBeGreaterThan(sent * 0.9)
      expect(ring).toBe(answered)
      expect(grownMb).toBeLessThan(FLOOD_RSS_LIMIT_MB)
    } finally {
      await flood.close()
    }
  }, 120_000)
})
