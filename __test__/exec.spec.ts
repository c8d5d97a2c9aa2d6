// Sandboxed processes (SPEC §1 exec/spawn, §4; issue 4), as users run them and as an attacker
// inside would try to get out. Run by CI as root and again as an unprivileged user.
import { spawn as hostSpawn, spawnSync } from 'node:child_process'
import { randomBytes } from 'node:crypto'
import { existsSync, readdirSync, readFileSync } from 'node:fs'
import http from 'node:http'
import type { AddressInfo } from 'node:net'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'

import { getOrCreateSandbox, type Sandbox, type SandboxEvent } from '../index.js'
import { gitServer, type GitServer } from './helpers/git.js'
import { useTempHome } from './helpers/home.js'
import { httpsUpstream, makeTestCA, type TestCA, type Upstream } from './helpers/upstreams.js'

const home = useTempHome()
const entry = fileURLToPath(new URL('../index.js', import.meta.url))
const SECRET = 'sk-live-SANDBOX-SECRET-9f8e7d'
const whoami = process.getuid?.() === 0 ? 'root' : 'unprivileged'

let ca: TestCA
let api: Upstream
let git: GitServer
let sandbox: Sandbox

/** `upstream` mapping the real-looking names to the loopback servers. */
const upstream = () => ({
  resolve: { 'api.github.com:443': api.addr, 'api.finnhub.io:443': api.addr, 'pypi.org:443': api.addr, 'git.example.com:443': git.addr },
  ca: [ca.caPem],
})

beforeAll(async () => {
  ca = makeTestCA(['api.github.com', 'api.finnhub.io', 'pypi.org', 'git.example.com'])
  api = await httpsUpstream(ca)
  git = await gitServer(ca, 'hello', 'README', 'hello from git\n')
  sandbox = await getOrCreateSandbox('exec', {
    fs: [{ backend: 'local', mount: '/workspace' }],
    egress: [
      { access: 'allow', host: 'api.github.com', methods: ['GET'] },
      { access: 'allow', host: 'api.finnhub.io', override: { headers: { 'X-Finnhub-Token': SECRET } } },
      { access: 'allow', host: 'git.example.com' },
    ],
    upstream: upstream(),
  })
})

afterAll(async () => {
  await sandbox?.close()
  await Promise.all([api?.close(), git?.close()])
  home.cleanup()
})

describe(`exec and spawn (${whoami})`, () => {
  it('runs argv and collects output and the exit code', async () => {
    const r = await sandbox.exec(['sh', '-c', 'echo out; echo err >&2; exit 3'])
    expect(r).toEqual({ exitCode: 3, signal: null, stdout: 'out\n', stderr: 'err\n', execId: expect.stringMatching(/^[0-9a-f]{16}$/) })
  })

  it('runs a string through /bin/sh -c, and a missing command exits 127', async () => {
    expect((await sandbox.exec('echo $((6 * 7))')).stdout).toBe('42\n')
    expect((await sandbox.exec('no-such-command-xyz')).exitCode).toBe(127)
  })

  it('rejects a missing argv[0] with HIVE_SPAWN_FAILED', async () => {
    await expect(sandbox.exec(['no-such-command-xyz'])).rejects.toMatchObject({ code: 'HIVE_SPAWN_FAILED' })
  })

  it('passes stdin, cwd and env', async () => {
    const r = await sandbox.exec(['sh', '-c', 'cat; pwd; echo $GREETING'], { stdin: 'in\n', cwd: '/tmp', env: { GREETING: 'hi' } })
    expect(r.stdout).toBe('in\n/tmp\nhi\n')
  })

  it('kills on timeoutMs, on an abort signal and past maxBuffer', async () => {
    const timed = await sandbox.exec(['sleep', '30'], { timeoutMs: 200 })
    expect(timed).toMatchObject({ exitCode: null, signal: 'SIGKILL', timedOut: true })
    const controller = new AbortController()
    setTimeout(() => controller.abort(), 100)
    await expect(sandbox.exec(['sleep', '30'], { signal: controller.signal })).rejects.toMatchObject({ name: 'AbortError' })
    await expect(sandbox.exec(['sh', '-c', 'yes | head -c 100000'], { maxBuffer: 1000 })).rejects.toMatchObject({ code: 'HIVE_MAX_BUFFER' })
  })

  it('streams with spawn and reports process.start / process.exit', async () => {
    const events = sandbox.getEventsStream()
    const child = sandbox.spawn(['cat'])
    const chunks: string[] = []
    child.stdout.on('data', (c: Buffer) => chunks.push(String(c)))
    const drained = new Promise((resolve) => child.stdout.once('end', resolve))
    child.stdin.write('ping\n')
    child.stdin.end()
    expect(await child.wait()).toEqual({ exitCode: 0, signal: null })
    await drained // wait() is the exit; the pipe may still hold output
    expect(chunks.join('')).toBe('ping\n')
    const seen: SandboxEvent[] = []
    for await (const e of events) {
      seen.push(e)
      if (e.type === 'process.exit') break
    }
    expect(seen.map((e) => e.type)).toEqual(['process.start', 'process.exit'])
    expect(seen[1]).toMatchObject({ pid: child.pid, command: ['cat'], exitCode: 0, signal: null })
  })

  it('kill() ends a spawned process with the signal', async () => {
    const child = sandbox.spawn(['sleep', '30'])
    await new Promise((r) => setTimeout(r, 100))
    child.kill('SIGTERM')
    expect(await child.wait()).toEqual({ exitCode: null, signal: 'SIGTERM' })
  })

  it('builds the environment from scratch: nothing of the host leaks in', async () => {
    process.env.HIVE_TEST_HOST_ONLY = 'leak'
    const env = (await sandbox.exec(['env'])).stdout
    delete process.env.HIVE_TEST_HOST_ONLY
    expect(env).not.toContain('leak')
    expect(env).toContain('HTTPS_PROXY=http://127.0.0.1:3128')
    expect(env).toContain('SSL_CERT_FILE=')
  })

  it('lets two processes of one sandbox talk over its loopback', async () => {
    const server = sandbox.spawn(['python3', '-c', 'import socket;s=socket.socket();s.bind(("127.0.0.1",9099));s.listen();c,_=s.accept();c.sendall(b"hello-peer");c.close()'])
    await new Promise((r) => setTimeout(r, 300))
    const r = await sandbox.exec(['python3', '-c', 'import socket;s=socket.create_connection(("127.0.0.1",9099));print(s.recv(100).decode())'])
    expect(r.stdout.trim()).toBe('hello-peer')
    expect((await server.wait()).exitCode).toBe(0)
  })
})

describe(`kills reach every process of a command (${whoami})`, () => {
  let kills: Sandbox
  beforeAll(async () => {
    kills = await getOrCreateSandbox('exec-kills', {})
  })
  afterAll(async () => {
    await kills?.close()
  })

  /** How many `sleep` processes exist in the sandbox, waiting up to 2 s for the count to reach 0. */
  const sleepsLeft = async (): Promise<number> => {
    const deadline = Date.now() + 2000
    for (;;) {
      const r = await kills.exec(['sh', '-c', 'cat /proc/[0-9]*/comm 2>/dev/null'])
      const n = r.stdout.split('\n').filter((c) => c === 'sleep').length
      if (n === 0 || Date.now() > deadline) return n
      await new Promise((resolve) => setTimeout(resolve, 50))
    }
  }

  it('timeoutMs kills the shell and its sleep, settles at once and keeps the output so far', async () => {
    const t = Date.now()
    const r = await kills.exec('echo before; sleep 5; echo x', { timeoutMs: 300 })
    expect(Date.now() - t).toBeLessThan(1000)
    expect(r).toMatchObject({ exitCode: null, signal: 'SIGKILL', timedOut: true, stdout: 'before\n' })
    expect(await sleepsLeft()).toBe(0)
  })

  it('an aborted signal kills the shell and its sleep and settles at once', async () => {
    const controller = new AbortController()
    setTimeout(() => controller.abort(), 300)
    const t = Date.now()
    await expect(kills.exec('sleep 5; echo x', { signal: controller.signal })).rejects.toMatchObject({ name: 'AbortError' })
    expect(Date.now() - t).toBeLessThan(1000)
    expect(await sleepsLeft()).toBe(0)
  })

  it('a sleep with its output redirected or in the background does not outlive a timed-out exec', async () => {
    for (const command of ['sleep 3 >/dev/null 2>&1; echo x', 'sleep 3 >/dev/null 2>&1 & sleep 3 >/dev/null 2>&1 & wait']) {
      const t = Date.now()
      const r = await kills.exec(command, { timeoutMs: 300 })
      expect(Date.now() - t).toBeLessThan(1000)
      expect(r.timedOut).toBe(true)
      expect(await sleepsLeft()).toBe(0)
    }
  })

  it('maxBuffer and kill() stop every process of the command', async () => {
    const t = Date.now()
    await expect(kills.exec('sleep 5 & yes', { maxBuffer: 1000 })).rejects.toMatchObject({ code: 'HIVE_MAX_BUFFER' })
    expect(Date.now() - t).toBeLessThan(1000)
    expect(await sleepsLeft()).toBe(0)
    const child = kills.spawn('sleep 30 & sleep 30 & wait')
    await new Promise((resolve) => setTimeout(resolve, 200))
    child.kill('SIGTERM')
    expect(await child.wait()).toEqual({ exitCode: null, signal: 'SIGTERM' })
    expect(await sleepsLeft()).toBe(0)
  })
})

describe(`as users run it (${whoami})`, () => {
  it('curl reaches an allowed host through the proxy, with the sandbox CA trusted', async () => {
    const r = await sandbox.exec(['curl', '-sS', 'https://api.github.com/zen'])
    expect(r.stdout).toBe('ok /zen')
    expect(api.hits.at(-1)).toMatchObject({ host: 'api.github.com', method: 'GET', path: '/zen' })
  })

  it('curl is refused by the rules, and the upstream sees nothing', async () => {
    const before = api.hits.length
    const post = await sandbox.exec(['curl', '-sS', '-X', 'POST', '-o', '/dev/null', '-w', '%{http_code}', 'https://api.github.com/repos'])
    expect(post.stdout).toBe('403')
    const other = await sandbox.exec(['curl', '-sS', 'https://pypi.org/simple/'])
    expect(other.stdout).toMatch(/^hive: GET pypi\.org\/simple\/ denied by this sandbox's egress policy/)
    expect(api.hits.length).toBe(before)
  })

  it('Python requests works through the proxy', async () => {
    const r = await sandbox.exec(['python3', '-c', 'import requests; print(requests.get("https://api.github.com/zen").text)'])
    expect(r.stderr).toBe('')
    expect(r.stdout.trim()).toBe('ok /zen')
  })

  it('git clones over HTTPS from a loopback git server', async () => {
    const r = await sandbox.exec(['sh', '-c', 'cd /tmp && git clone -q https://git.example.com/hello.git && cat hello/README'])
    expect(r.stderr).toBe('')
    expect(r.stdout).toBe('hello from git\n')
    expect(git.hits).toBeGreaterThan(0)
  })
})

describe(`escapes (${whoami})`, () => {
  it('cannot reach 192.0.2.1 without the proxy (hive answers 403 at once)', async () => {
    const started = Date.now()
    const r = await sandbox.exec(['curl', '-sS', '--noproxy', '*', '-m', '5', '-w', '\n%{http_code}', 'http://192.0.2.1/'])
    expect(r.stdout).toMatch(/^hive: GET 192\.0\.2\.1\/ denied .*\n403$/s)
    expect(Date.now() - started).toBeLessThan(2000)
  })

  it("cannot reach a service on the host's loopback", async () => {
    let hits = 0
    const server = http.createServer((_req, res) => (hits++, res.end('host')))
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
    const { port } = server.address() as AddressInfo
    const direct = await sandbox.exec(['curl', '-sS', '--noproxy', '*', '-m', '3', `http://127.0.0.1:${port}/`])
    const viaProxy = await sandbox.exec(['curl', '-sS', '-m', '3', `http://127.0.0.1:${port}/`])
    server.close()
    expect(direct.exitCode).not.toBe(0)
    expect(viaProxy.stdout).not.toBe('host')
    expect(hits).toBe(0)
  })

  it('cannot see host processes nor read the host program through /proc', async () => {
    const r = await sandbox.exec(['sh', '-c', 'ls /proc | grep -E "^[0-9]+$" | wc -l; cat /proc/1/cmdline | tr "\\0" " "'])
    const [count] = r.stdout.split('\n')
    expect(Number(count)).toBeLessThan(10)
    const host = await sandbox.exec(['sh', '-c', `cat /proc/${process.pid}/environ; kill -0 ${process.pid}`])
    expect(host.exitCode).not.toBe(0)
    expect(host.stdout).toBe('')
  })

  it("cannot read the host's home, the hive home, the CA key or /etc/shadow", async () => {
    const keyPath = join(home.dir, 'sandboxes', 'exec', 'ca.key')
    expect(existsSync(keyPath)).toBe(true)
    for (const file of ['/etc/shadow', '/etc/gshadow', keyPath, '/root/.bashrc']) {
      expect((await sandbox.exec(['cat', file])).stdout, file).toBe('')
    }
    for (const dir of [home.dir, '/home', join(home.dir, 'sandboxes')]) {
      expect((await sandbox.exec(['ls', '-A', dir])).stdout, dir).toBe('')
    }
  })

  it('cannot remount read-only mounts, unmount anything or create namespaces', async () => {
    for (const cmd of ['mount -o remount,rw /usr', 'mount -o remount,bind,rw /usr', 'umount /proc', 'umount -l /workspace', 'unshare -U true', 'unshare -rm true']) {
      const r = await sandbox.exec(['sh', '-c', cmd])
      expect(r.exitCode, cmd).not.toBe(0)
    }
  })

  it('cannot write outside the writable mounts', async () => {
    for (const path of ['/usr/hive-x', '/etc/hive-x', '/hive-x', '/bin/hive-x']) {
      const r = await sandbox.exec(['sh', '-c', `echo x > ${path}`])
      expect(r.exitCode, path).not.toBe(0)
    }
    expect((await sandbox.exec(['sh', '-c', 'echo x > /tmp/ok && echo x > /workspace/ok'])).exitCode).toBe(0)
  })

  it('never shows an injected credential inside: env, files, /proc, responses', async () => {
    const before = api.hits.length
    const r = await sandbox.exec(['sh', '-c', [
      'curl -sS -i https://api.finnhub.io/api/v1/quote',
      'env',
      'cat /proc/1/environ /proc/self/environ /proc/*/cmdline 2>/dev/null',
      'grep -rs sk-live /etc/hive /run /tmp /root /workspace 2>/dev/null',
    ].join('; ')])
    expect(api.hits.length).toBe(before + 1)
    expect(api.hits.at(-1)!.headers['x-finnhub-token']).toBe(SECRET)
    expect(r.stdout).toContain('ok /api/v1/quote')
    expect(r.stdout + r.stderr).not.toContain(SECRET)
  })

  it("no page of the host's heap is readable inside, in any process's /proc/<pid>/mem", async () => {
    // A secret in this Node process's heap (a string and a buffer) before the sandbox starts.
    const secret = `hive-heap-secret-${randomBytes(8).toString('hex')}`
    const held = [secret.split('').join(''), Buffer.from(secret)]
    const heap = await getOrCreateSandbox('exec-heap', {})
    try {
      // The scanner gets the secret hex-encoded (so its own argv does not hold it) and skips its
      // own memory for it; a marker it decodes into its own memory proves the reading works.
      const scan = [
        'import os, sys',
        'secret, marker = bytes.fromhex(sys.argv[1]), bytes.fromhex(sys.argv[2])',
        'found, seen_self, regions = [], False, 0',
        'for p in [p for p in os.listdir("/proc") if p.isdigit()]:',
        '    try:',
        '        maps = open(f"/proc/{p}/maps").read().splitlines()',
        '        mem = open(f"/proc/{p}/mem", "rb", 0)',
        '    except OSError:',
        '        continue',
        '    for line in maps:',
        '        span, perms = line.split()[:2]',
        '        if perms[0] != "r":',
        '            continue',
        '        start, end = (int(x, 16) for x in span.split("-"))',
        '        try:',
        '            mem.seek(start)',
        '            data = mem.read(end - start)',
        '        except (OSError, ValueError, OverflowError):',
        '            continue',
        '        regions += 1',
        '        if int(p) == os.getpid():',
        '            seen_self = seen_self or marker in data',
        '        elif secret in data:',
        '            found.append(p)',
        'print(found, seen_self, regions > 0)',
      ].join('\n')
      const marker = Buffer.from(`marker-${randomBytes(4).toString('hex')}`).toString('hex')
      const spawned = [heap.spawn(['sleep', '2']), heap.spawn(['sh', '-c', 'sleep 2'])]
      const r = await heap.exec(['/usr/bin/python3', '-c', scan, Buffer.from(secret).toString('hex'), marker])
      for (const c of spawned) c.kill('SIGKILL')
      expect(r.stdout).toBe('[] True True\n')
      expect(held[1].toString()).toBe(secret)
    } finally {
      await heap.close()
    }
  })

  it("a host started with --api-key=SECRET that keeps spawning never shows it in any /proc/<pid>/cmdline or environ inside", async () => {
    const secret = `SECRET-${randomBytes(8).toString('hex')}`
    const watch = [
      'import os, sys',
      'secret = bytes.fromhex(sys.argv[1])',
      'hits, pids = 0, set()',
      'while not os.path.exists("/tmp/stop"):',
      '    for p in [p for p in os.listdir("/proc") if p.isdigit()]:',
      '        for f in ("cmdline", "environ"):',
      '            try:',
      '                data = open(f"/proc/{p}/{f}", "rb").read()',
      '            except OSError:',
      '                continue',
      '            pids.add(p)',
      '            hits += secret in data',
      'print(hits, len(pids) >= 20)',
    ].join('\n')
    const script = `
      const { getOrCreateSandbox } = require(${JSON.stringify(entry)});
      (async () => {
        const s = await getOrCreateSandbox('exec-argv');
        const watcher = s.exec(['/usr/bin/python3', '-c', ${JSON.stringify(watch)}, ${JSON.stringify(Buffer.from(secret).toString('hex'))}], { timeoutMs: 60000 });
        await new Promise((r) => setTimeout(r, 300));
        for (let i = 0; i < 100; i++) await Promise.all([s.exec(['true']), s.exec(['sh', '-c', 'true'])]);
        await s.exec(['touch', '/tmp/stop']);
        console.log((await watcher).stdout.trim());
        await s.close();
      })();
    `
    const child = hostSpawn(process.execPath, ['-e', script, '--', `--api-key=${secret}`], {
      env: { ...process.env, HIVE_HOME: home.dir, HIVE_TEST_API_KEY: secret },
      stdio: ['ignore', 'pipe', 'inherit'],
    })
    let out = ''
    child.stdout!.on('data', (c: Buffer) => (out += String(c)))
    await new Promise((r) => child.once('exit', r))
    expect(out.trim()).toBe('0 True')
  }, 60000)

  it('killing the host node process (SIGKILL) leaves no sandboxed process alive', async () => {
    const marker = String(900000 + Math.floor(Math.random() * 99999))
    const script = `
      const { getOrCreateSandbox } = require(${JSON.stringify(entry)});
      (async () => {
        const s = await getOrCreateSandbox('orphan');
        s.spawn(['sleep', '${marker}']);
        await new Promise((r) => setTimeout(r, 300));
        console.log('ready');
        setInterval(() => {}, 1000);
      })();
    `
    const child = hostSpawn(process.execPath, ['-e', script], { env: { ...process.env, HIVE_HOME: home.dir }, stdio: ['ignore', 'pipe', 'inherit'] })
    await new Promise<void>((resolve) => child.stdout!.once('data', () => resolve()))
    const sleeping = () =>
      readdirSync('/proc').filter((p) => /^\d+$/.test(p)).some((p) => {
        try {
          return readFileSync(`/proc/${p}/cmdline`, 'utf8').includes(marker)
        } catch {
          return false
        }
      })
    expect(sleeping()).toBe(true)
    child.kill('SIGKILL')
    await new Promise((r) => child.once('exit', r))
    await new Promise((r) => setTimeout(r, 500))
    expect(sleeping()).toBe(false)
  })

  it('keeps /workspace data across close() and a new process', async () => {
    const write = `
      const { getOrCreateSandbox } = require(${JSON.stringify(entry)});
      (async () => {
        const s = await getOrCreateSandbox('persist', { fs: [{ backend: 'local', mount: '/workspace' }] });
        const mode = process.argv[1];
        const r = mode === 'write' ? await s.exec(['sh', '-c', 'echo kept > /workspace/data.txt']) : await s.exec(['cat', '/workspace/data.txt']);
        process.stdout.write(r.stdout);
        await s.close();
      })();
    `
    const run = (mode: string) => spawnSync(process.execPath, ['-e', write, mode], { env: { ...process.env, HIVE_HOME: home.dir }, encoding: 'utf8', timeout: 20_000 })
    expect(run('write').status).toBe(0)
    expect(run('read').stdout).toBe('kept\n')
  })
})
