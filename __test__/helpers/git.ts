// A loopback HTTPS git server: `git http-backend` behind a Node HTTPS server (CGI), serving one
// bare repository with one commit.
import { execFileSync, spawn } from 'node:child_process'
import { mkdtempSync, rmSync } from 'node:fs'
import https from 'node:https'
import type { AddressInfo } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

import type { TestCA } from './upstreams.js'

export interface GitServer {
  addr: string
  hits: number
  close: () => Promise<void>
}

export async function gitServer(ca: TestCA, repo: string, file: string, content: string): Promise<GitServer> {
  const root = mkdtempSync(join(tmpdir(), 'hive-git-'))
  const work = join(root, 'work')
  const git = (cwd: string, ...args: string[]) => execFileSync('git', args, { cwd, stdio: 'pipe' })
  execFileSync('mkdir', ['-p', work])
  git(work, 'init', '-q', '-b', 'main')
  execFileSync('sh', ['-c', `printf '%s' "$1" > "$2"`, 'sh', content, join(work, file)])
  git(work, 'add', file)
  git(work, '-c', 'user.name=t', '-c', 'user.email=t@t', 'commit', '-q', '-m', 'init')
  git(root, 'clone', '-q', '--bare', work, join(root, `${repo}.git`))
  const state = { hits: 0 }
  const server = https.createServer({ cert: ca.certPem + ca.caPem, key: ca.keyPem }, (req, res) => {
    state.hits++
    const [path, query = ''] = (req.url ?? '/').split('?')
    const cgi = spawn('git', ['http-backend'], {
      env: {
        GIT_PROJECT_ROOT: root,
        GIT_HTTP_EXPORT_ALL: '1',
        PATH_INFO: path,
        QUERY_STRING: query,
        REQUEST_METHOD: req.method ?? 'GET',
        CONTENT_TYPE: req.headers['content-type'] ?? '',
        PATH: process.env.PATH,
      },
    })
    req.pipe(cgi.stdin)
    let head = Buffer.alloc(0)
    let headerDone = false
    cgi.stdout.on('data', (chunk: Buffer) => {
      if (headerDone) return void res.write(chunk)
      head = Buffer.concat([head, chunk])
      const end = head.indexOf('\r\n\r\n')
      if (end < 0) return
      headerDone = true
      let status = 200
      for (const line of head.subarray(0, end).toString().split('\r\n')) {
        const [name, ...rest] = line.split(':')
        const value = rest.join(':').trim()
        if (name.toLowerCase() === 'status') status = Number.parseInt(value, 10)
        else res.setHeader(name, value)
      }
      res.writeHead(status)
      res.write(head.subarray(end + 4))
    })
    cgi.stdout.on('end', () => res.end())
  })
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  const { port } = server.address() as AddressInfo
  return {
    addr: `127.0.0.1:${port}`,
    get hits() {
      return state.hits
    },
    close: () =>
      new Promise<void>((resolve) => {
        server.closeAllConnections()
        server.close(() => {
          rmSync(root, { recursive: true, force: true })
          resolve()
        })
      }),
  }
}
