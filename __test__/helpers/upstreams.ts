// Real upstream servers on 127.0.0.1:0 for the proxy tests: HTTP, HTTPS (HTTP/1.1 with a WebSocket
// echo) and h2, each with a certificate from a throwaway test CA (made with the openssl CLI), and
// clients that speak through a proxy URL: CONNECT + TLS sessions, WebSocket frames, h2.
import { execFileSync } from 'node:child_process'
import { createHash, randomBytes } from 'node:crypto'
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import http, { type IncomingHttpHeaders, type IncomingMessage, type ServerResponse } from 'node:http'
import http2 from 'node:http2'
import https from 'node:https'
import type { AddressInfo } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import tls from 'node:tls'

/** One request an upstream saw. */
export interface Hit {
  host: string
  method: string
  path: string
  headers: IncomingHttpHeaders
  httpVersion: string
}

export interface Upstream {
  /** `127.0.0.1:<port>`, for `upstream.resolve`. */
  addr: string
  port: number
  hits: Hit[]
  /** Lets `/stream` send its second chunk. */
  release: () => void
  close: () => Promise<void>
}

export interface TestCA {
  caPem: string
  certPem: string
  keyPem: string
}

/** A test CA and a leaf for `names` (DNS SANs), made with the openssl CLI. */
export function makeTestCA(names: string[]): TestCA {
  const dir = mkdtempSync(join(tmpdir(), 'hive-upstream-ca-'))
  const run = (...args: string[]) => execFileSync('openssl', args, { cwd: dir, stdio: 'pipe' })
  try {
    run('req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-days', '2',
      '-subj', '/CN=hive test upstream CA', '-keyout', 'ca.key', '-out', 'ca.pem',
      '-addext', 'basicConstraints=critical,CA:TRUE', '-addext', 'keyUsage=critical,keyCertSign,cRLSign')
    run('req', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-subj', '/CN=upstream',
      '-keyout', 'leaf.key', '-out', 'leaf.csr')
    writeFileSync(join(dir, 'ext.cnf'),
      `subjectAltName=${names.map((n) => `DNS:${n}`).join(',')}\nextendedKeyUsage=serverAuth\n`)
    run('x509', '-req', '-in', 'leaf.csr', '-CA', 'ca.pem', '-CAkey', 'ca.key', '-CAcreateserial', '-days', '2',
      '-extfile', 'ext.cnf', '-out', 'leaf.pem')
    return {
      caPem: readFileSync(join(dir, 'ca.pem'), 'utf8'),
      certPem: readFileSync(join(dir, 'leaf.pem'), 'utf8'),
      keyPem: readFileSync(join(dir, 'leaf.key'), 'utf8'),
    }
  } finally {
    rmSync(dir, { recursive: true, force: true })
  }
}

function record(hits: Hit[], req: IncomingMessage | http2.Http2ServerRequest): void {
  const authority = (req.headers[':authority'] as string | undefined) ?? req.headers.host ?? ''
  hits.push({
    host: authority.replace(/:\d+$/, ''),
    method: req.method ?? '',
    path: (req.url ?? '').split('?')[0],
    headers: { ...req.headers },
    httpVersion: req.httpVersion,
  })
}

function handler(hits: Hit[], released: { wait: Promise<void> }) {
  return (req: IncomingMessage | http2.Http2ServerRequest, res: ServerResponse | http2.Http2ServerResponse) => {
    record(hits, req)
    const path = (req.url ?? '').split('?')[0]
    if (path === '/stream') {
      res.writeHead(200, { 'content-type': 'text/plain' })
      res.write('first\n')
      void released.wait.then(() => res.end('second\n'))
      return
    }
    if (path.startsWith('/bytes/')) {
      const n = Number(path.slice('/bytes/'.length))
      res.writeHead(200, { 'content-type': 'application/octet-stream', 'content-length': String(n) })
      res.end(Buffer.alloc(n, 0x61))
      return
    }
    // Drain a request body, then answer with what was seen.
    let size = 0
    req.on('data', (c: Buffer) => (size += c.length))
    req.on('end', () => {
      const body = `ok ${path}${size ? ` ${size}` : ''}`
      res.writeHead(200, { 'content-type': 'text/plain', 'content-length': String(Buffer.byteLength(body)) })
      res.end(body)
    })
  }
}

function releasable(): { released: { wait: Promise<void> }; release: () => void } {
  let release!: () => void
  const wait = new Promise<void>((resolve) => (release = resolve))
  return { released: { wait }, release }
}

async function listen(server: http.Server | https.Server | http2.Http2SecureServer, hits: Hit[], release: () => void): Promise<Upstream> {
  const sockets = new Set<import('node:net').Socket>()
  server.on('connection', (s) => {
    sockets.add(s)
    s.on('close', () => sockets.delete(s))
  })
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  const { port } = server.address() as AddressInfo
  return {
    addr: `127.0.0.1:${port}`,
    port,
    hits,
    release,
    close: () =>
      new Promise<void>((resolve) => {
        release()
        for (const s of sockets) s.destroy()
        server.close(() => resolve())
      }),
  }
}

/** A plain HTTP upstream. */
export async function httpUpstream(): Promise<Upstream> {
  const hits: Hit[] = []
  const { released, release } = releasable()
  return listen(http.createServer(handler(hits, released)), hits, release)
}

/** An HTTPS (HTTP/1.1) upstream that also echoes WebSocket frames on `/ws`. */
export async function httpsUpstream(ca: TestCA): Promise<Upstream> {
  const hits: Hit[] = []
  const { released, release } = releasable()
  const server = https.createServer({ cert: ca.certPem + ca.caPem, key: ca.keyPem }, handler(hits, released))
  server.on('upgrade', (req: IncomingMessage, socket: import('node:stream').Duplex) => {
    record(hits, req)
    const accept = createHash('sha1')
      .update(`${req.headers['sec-websocket-key']}258EAFA5-E914-47DA-95CA-C5AB0DC85B11`)
      .digest('base64')
    socket.write(`HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ${accept}\r\n\r\n`)
    let buf = Buffer.alloc(0)
    socket.on('data', (chunk: Buffer) => {
      buf = Buffer.concat([buf, chunk])
      for (let frame = decodeFrame(buf); frame; frame = decodeFrame(buf)) {
        buf = buf.subarray(frame.length)
        socket.write(encodeFrame(frame.payload, false))
      }
    })
  })
  return listen(server, hits, release)
}

/** An h2-only upstream. */
export async function h2Upstream(ca: TestCA): Promise<Upstream> {
  const hits: Hit[] = []
  const { released, release } = releasable()
  const server = http2.createSecureServer({ cert: ca.certPem + ca.caPem, key: ca.keyPem, allowHTTP1: false }, handler(hits, released))
  return listen(server, hits, release)
}

// ---------------------------------------------------------------------------------------------
// Clients through the proxy

export interface ProxyTarget {
  /** `http://hive:<token>@127.0.0.1:<port>` */
  url: string
  /** CA (PEM) the proxy's leaf certificates chain to. */
  ca: string
}

function proxyParts(proxyUrl: string): { port: number; auth: string | undefined } {
  const u = new URL(proxyUrl)
  const auth = u.username ? `Basic ${Buffer.from(`${decodeURIComponent(u.username)}:${decodeURIComponent(u.password)}`).toString('base64')}` : undefined
  return { port: Number(u.port), auth }
}

/** Opens a CONNECT tunnel; resolves with the raw socket, or rejects with the status code. */
export function connectTunnel(proxyUrl: string, target: string): Promise<import('node:net').Socket> {
  const { port, auth } = proxyParts(proxyUrl)
  return new Promise((resolve, reject) => {
    const req = http.request({ host: '127.0.0.1', port, method: 'CONNECT', path: target, headers: auth ? { 'proxy-authorization': auth } : {} })
    req.on('connect', (res, socket) => {
      if (res.statusCode === 200) resolve(socket)
      else {
        socket.destroy()
        reject(Object.assign(new Error(`CONNECT ${target}: ${res.statusCode}`), { status: res.statusCode, headers: res.headers }))
      }
    })
    req.on('error', reject)
    req.end()
  })
}

/** A TLS session through the proxy to `host:443` (trusting the proxy CA). */
export async function tlsThrough(proxy: ProxyTarget, host: string, alpn = ['http/1.1'], servername = host): Promise<tls.TLSSocket> {
  const socket = await connectTunnel(proxy.url, `${host}:443`)
  return new Promise((resolve, reject) => {
    const t = tls.connect({ socket, servername, ca: proxy.ca, ALPNProtocols: alpn }, () => resolve(t))
    t.on('error', reject)
  })
}

export interface SimpleResponse {
  status: number
  headers: Record<string, string>
  body: string
}

/**
 * A keep-alive HTTP/1.1 session over one socket: each `request` writes a request and reads one
 * response (Content-Length framing, which every upstream here and every proxy answer uses).
 */
export function session(socket: import('node:stream').Duplex) {
  let buf = Buffer.alloc(0)
  let waiter: (() => void) | undefined
  let ended = false
  socket.on('data', (c: Buffer) => {
    buf = Buffer.concat([buf, c])
    waiter?.()
  })
  socket.on('close', () => {
    ended = true
    waiter?.()
  })
  const more = () => new Promise<void>((resolve) => (waiter = resolve))
  return {
    async request(method: string, path: string, headers: Record<string, string>, body = ''): Promise<SimpleResponse> {
      const lines = Object.entries({ ...headers, 'content-length': String(Buffer.byteLength(body)) }).map(([k, v]) => `${k}: ${v}\r\n`)
      socket.write(`${method} ${path} HTTP/1.1\r\n${lines.join('')}\r\n${body}`)
      for (;;) {
        const end = buf.indexOf('\r\n\r\n')
        if (end >= 0) {
          const head = buf.subarray(0, end).toString('latin1').split('\r\n')
          const status = Number(head[0].split(' ')[1])
          const h: Record<string, string> = {}
          for (const line of head.slice(1)) {
            const i = line.indexOf(':')
            h[line.slice(0, i).trim().toLowerCase()] = line.slice(i + 1).trim()
          }
          const len = Number(h['content-length'] ?? 0)
          if (buf.length >= end + 4 + len) {
            const out = buf.subarray(end + 4, end + 4 + len).toString()
            buf = buf.subarray(end + 4 + len)
            return { status, headers: h, body: out }
          }
        }
        if (ended) throw new Error('connection closed before a full response')
        await more()
      }
    },
    close: () => socket.destroy(),
  }
}

// ---------------------------------------------------------------------------------------------
// WebSocket frames (RFC 6455 §5.2), text only, payloads < 64 KiB

export function encodeFrame(payload: Buffer, mask: boolean): Buffer {
  const len = payload.length
  const head = len < 126 ? Buffer.from([0x81, (mask ? 0x80 : 0) | len]) : Buffer.from([0x81, (mask ? 0x80 : 0) | 126, len >> 8, len & 0xff])
  if (!mask) return Buffer.concat([head, payload])
  const key = randomBytes(4)
  const masked = Buffer.from(payload.map((b, i) => b ^ key[i % 4]))
  return Buffer.concat([head, key, masked])
}

export function decodeFrame(buf: Buffer): { payload: Buffer; length: number } | undefined {
  if (buf.length < 2) return undefined
  const masked = (buf[1] & 0x80) !== 0
  let len = buf[1] & 0x7f
  let off = 2
  if (len === 126) {
    if (buf.length < 4) return undefined
    len = buf.readUInt16BE(2)
    off = 4
  }
  const keyOff = off
  if (masked) off += 4
  if (buf.length < off + len) return undefined
  let payload = Buffer.from(buf.subarray(off, off + len))
  if (masked) payload = Buffer.from(payload.map((b, i) => b ^ buf[keyOff + (i % 4)]))
  return { payload, length: off + len }
}
