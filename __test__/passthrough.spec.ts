// TLS passthrough per rule (docs/network-access.md#tls-passthrough): curl with a pinned public key
// and curl presenting a client certificate (mTLS) work through a `tls: "passthrough"` rule and fail,
// visibly, through an intercepting one, against real loopback HTTPS servers reached through
// `sandbox.proxy()` under real-looking names (`upstream.resolve`).
import { execFile, execFileSync } from 'node:child_process'
import { createHash, X509Certificate } from 'node:crypto'
import { mkdtempSync, readFileSync, writeFileSync } from 'node:fs'
import https from 'node:https'
import type { AddressInfo } from 'node:net'
import { join } from 'node:path'
import type { TLSSocket } from 'node:tls'
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest'

import { getOrCreateSandbox, type Sandbox, type SandboxEvent } from '../index.js'
import { useTempHome } from './helpers/home.js'
import { makeTestCA, type TestCA } from './helpers/upstreams.js'

const home = useTempHome()
const PINNED = 'pinned.example.com'
const MTLS = 'mtls.example.com'
/** Both servers again, under a name whose rule intercepts. */
const PINNED_INTERCEPTED = 'pinned-intercepted.example.com'
const MTLS_INTERCEPTED = 'mtls-intercepted.example.com'

interface Server {
  port: number
  /** Requests that reached the handler (after a completed handshake). */
  hits: string[]
  close(): Promise<void>
}

let serverCA: TestCA
let clientDir: string
let pinned: Server
let mtls: Server
let sandbox: Sandbox
let proxy: { url: string; ca: string; close(): Promise<void> }
let files: { serverCa: string; proxyCa: string; clientCert: string; clientKey: string; pin: string }

/** An HTTPS server answering `ok <client certificate CN or "-">`. */
async function server(options: https.ServerOptions): Promise<Server> {
  const hits: string[] = []
  const s = https.createServer({ cert: serverCA.certPem + serverCA.caPem, key: serverCA.keyPem, ...options }, (req, res) => {
    const peer = (req.socket as TLSSocket).getPeerCertificate()
    const cn = peer && 'subject' in peer && peer.subject ? peer.subject.CN : '-'
    hits.push(req.url ?? '')
    res.end(`ok ${cn}`)
  })
  await new Promise<void>((r) => s.listen(0, '127.0.0.1', r))
  return {
    port: (s.address() as AddressInfo).port,
    hits,
    close: () => new Promise<void>((r) => { s.closeAllConnections(); s.close(() => r()) }),
  }
}

/** A client CA and a client certificate (CN `sandbox-client`) signed by it, as files. */
function makeClientCert(dir: string): { ca: string; cert: string; key: string } {
  const run = (...args: string[]) => execFileSync('openssl', args, { cwd: dir, stdio: 'pipe' })
  run('req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-days', '2',
    '-subj', '/CN=hive test client CA', '-keyout', 'client-ca.key', '-out', 'client-ca.pem',
    '-addext', 'basicConstraints=critical,CA:TRUE', '-addext', 'keyUsage=critical,keyCertSign')
  run('req', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-subj', '/CN=sandbox-client',
    '-keyout', 'client.key', '-out', 'client.csr')
  writeFileSync(join(dir, 'client.cnf'), 'extendedKeyUsage=clientAuth\n')
  run('x509', '-req', '-in', 'client.csr', '-CA', 'client-ca.pem', '-CAkey', 'client-ca.key', '-CAcreateserial',
    '-days', '2', '-extfile', 'client.cnf', '-out', 'client.pem')
  return { ca: join(dir, 'client-ca.pem'), cert: join(dir, 'client.pem'), key: join(dir, 'client.key') }
}

/** curl's `--pinnedpubkey` form of a certificate's public key: `sha256//<base64 SPKI digest>`. */
function pinOf(certPem: string): string {
  const spki = new X509Certificate(certPem).publicKey.export({ type: 'spki', format: 'der' })
  return `sha256//${createHash('sha256').update(spki).digest('base64')}`
}

function curl(args: string[]): Promise<{ status: number; body: string; exit: number; stderr: string }> {
  return new Promise((resolve) => {
    execFile('curl', ['-s', '-S', '--max-time', '10', '--proxy', proxy.url, '-o', '-', '-w', '\n%{http_code}', ...args],
      { encoding: 'utf8', timeout: 20_000 }, (error, stdout, stderr) => {
        const cut = stdout.lastIndexOf('\n')
        resolve({
          body: stdout.slice(0, cut),
          status: Number(stdout.slice(cut + 1)),
          exit: error ? (typeof error.code === 'number' ? error.code : -1) : 0,
          stderr,
        })
      })
  })
}

/** The `egress.*` events emitted while `fn` runs (until `count` arrived or 2 s passed). */
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

beforeAll(async () => {
  serverCA = makeTestCA([PINNED, MTLS, PINNED_INTERCEPTED, MTLS_INTERCEPTED])
  clientDir = mkdtempSync(join(home.dir, 'client-'))
  const client = makeClientCert(clientDir)
  pinned = await server({})
  mtls = await server({ requestCert: true, rejectUnauthorized: true, ca: readFileSync(client.ca, 'utf8') })
  sandbox = await getOrCreateSandbox('passthrough', {
    egress: [
      { access: 'allow', host: PINNED, ports: [443], tls: 'passthrough' },
      { access: 'allow', host: MTLS, tls: 'passthrough' },
      { access: 'allow', host: PINNED_INTERCEPTED },
      { access: 'allow', host: MTLS_INTERCEPTED, tls: 'intercept' },
    ],
    upstream: {
      resolve: {
        [`${PINNED}:443`]: `127.0.0.1:${pinned.port}`,
        [`${PINNED_INTERCEPTED}:443`]: `127.0.0.1:${pinned.port}`,
        [`${MTLS}:443`]: `127.0.0.1:${mtls.port}`,
        [`${MTLS_INTERCEPTED}:443`]: `127.0.0.1:${mtls.port}`,
      },
      ca: [serverCA.caPem],
    },
  })
  proxy = await sandbox.proxy()
  files = {
    serverCa: join(clientDir, 'server-ca.pem'),
    proxyCa: join(clientDir, 'proxy-ca.pem'),
    clientCert: client.cert,
    clientKey: client.key,
    pin: pinOf(serverCA.certPem),
  }
  writeFileSync(files.serverCa, serverCA.caPem)
  writeFileSync(files.proxyCa, proxy.ca)
})

beforeEach(() => {
  pinned.hits.length = 0
  mtls.hits.length = 0
})

afterAll(async () => {
  await proxy?.close()
  await sandbox?.close()
  await Promise.all([pinned?.close(), mtls?.close()])
  home.cleanup()
})

describe('tls: "passthrough"', () => {
  it('a client pinning the upstream key gets through, and the connection is audited once without method or path', async () => {
    let r: Awaited<ReturnType<typeof curl>> | undefined
    const events = await eventsDuring(2, async () => {
      r = await curl(['--cacert', files.serverCa, '--pinnedpubkey', files.pin, `https://${PINNED}/secret/path?q=1`])
    })
    expect(r, r?.stderr).toMatchObject({ exit: 0, status: 200, body: 'ok -' })
    expect(pinned.hits).toEqual(['/secret/path?q=1'])
    const request = events.find((e) => e.type === 'egress.request')
    expect(request).toMatchObject({
      host: PINNED, port: 443, scheme: 'https', method: null, path: null, tls: 'passthrough',
      access: 'allowed', rule: 0, via: 'host', injectedHeaders: [],
    })
    const response = events.find((e) => e.type === 'egress.response') as SandboxEvent & { bytesIn: number; bytesOut: number }
    expect(response).toMatchObject({ requestId: request?.id, status: 200 })
    expect(response.bytesIn).toBeGreaterThan(500) // the server's certificate chain came through
    expect(response.bytesOut).toBeGreaterThan(100)
  })

  it('a client presenting a certificate (mTLS) gets through, the upstream seeing that certificate', async () => {
    const r = await curl(['--cacert', files.serverCa, '--cert', files.clientCert, '--key', files.clientKey, `https://${MTLS}/whoami`])
    expect(r, r.stderr).toMatchObject({ exit: 0, status: 200, body: 'ok sandbox-client' })
    expect(mtls.hits).toEqual(['/whoami'])
  })

  it('an SNI naming another host than the CONNECT target is not passed through', async () => {
    // CONNECT to the passthrough host, TLS for another name: intercepted, refused as host-mismatch.
    const r = await curl(['--cacert', files.proxyCa, '--connect-to', `${PINNED_INTERCEPTED}:443:${PINNED}:443`, `https://${PINNED_INTERCEPTED}/`])
    expect(r.status).toBe(403)
    expect(pinned.hits).toEqual([])
  })
})

describe('the same clients through an intercepting rule', () => {
  it('the pinned client refuses the sandbox CA certificate; the upstream sees nothing', async () => {
    const r = await curl(['--cacert', files.proxyCa, '--pinnedpubkey', files.pin, `https://${PINNED_INTERCEPTED}/secret`])
    expect(r.exit).toBe(90) // CURLE_SSL_PINNEDPUBKEYNOTMATCH
    expect(r.stderr).toMatch(/public key does not match pinned/i)
    expect(pinned.hits).toEqual([])
  })

  it('the mTLS client gets a 502: the proxy has no client certificate to present; the upstream sees no request', async () => {
    const r = await curl(['--cacert', files.proxyCa, '--cert', files.clientCert, '--key', files.clientKey, `https://${MTLS_INTERCEPTED}/whoami`])
    expect(r.status).toBe(502)
    expect(mtls.hits).toEqual([])
  })
})
