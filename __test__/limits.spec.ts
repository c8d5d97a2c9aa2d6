// Resource limits and stats (docs/decisions.md#resource-limits): a fork bomb and a memory hog stay
// inside their sandbox, limits the host cannot enforce are refused, and stats() reports usage.
// Run by CI as root (cgroups) and again as an unprivileged user (RLIMIT_NPROC for pids; memory
// and cpu need a cgroup, so there they are refused with HIVE_LIMITS_UNENFORCEABLE).
import { spawnSync } from 'node:child_process'
import { readdirSync, readFileSync } from 'node:fs'
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest'

import { getOrCreateSandbox, type Sandbox, type SandboxEvent } from '../index.js'
import { rejection, useTempHome } from './helpers/home.js'
import { httpUpstream, type Upstream } from './helpers/upstreams.js'

const home = useTempHome()
const root = process.getuid?.() === 0
const whoami = root ? 'root' : 'unprivileged'
const MiB = 1024 * 1024
const open: Sandbox[] = []
let api: Upstream

async function sandbox(name: string, config: Parameters<typeof getOrCreateSandbox>[1]): Promise<Sandbox> {
  const s = await getOrCreateSandbox(name, config)
  open.push(s)
  return s
}

/** Collects the sandbox's events from now on. */
function collect(s: Sandbox): SandboxEvent[] {
  const events: SandboxEvent[] = []
  void (async () => {
    for await (const e of s.getEventsStream()) events.push(e)
  })()
  return events
}

/** Host processes whose command line contains `marker` (any uid: /proc/<pid>/cmdline is world-readable). */
function hostProcessesWith(marker: string): number[] {
  const found: number[] = []
  for (const entry of readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue
    try {
      if (readFileSync(`/proc/${entry}/cmdline`, 'utf8').includes(marker)) found.push(Number(entry))
    } catch {
      // exited meanwhile
    }
  }
  return found
}

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms))

beforeAll(async () => {
  api = await httpUpstream()
})

afterEach(async () => {
  delete process.env.HIVE_TEST_DISABLE_CGROUPS
  await Promise.all(open.splice(0).map((s) => s.close()))
})

afterAll(async () => {
  await api?.close()
  home.cleanup()
})

describe(`limits (${whoami})`, () => {
  it('a fork bomb with pids: 256 is contained; the host keeps serving; close() leaves nothing', async () => {
    const marker = `hive-fork-bomb-${process.pid}-${Date.now()}`
    const s = await sandbox('bomb', { limits: { pids: 256 } })
    const events = collect(s)
    // Safety first (the machine is shared): a bounded fork loop must hit the limit before the
    // unbounded bomb is started.
    const probe = await s.exec(['sh', '-c', 'i=0; while [ $i -lt 400 ]; do sleep 5 >/dev/null 2>&1 & i=$((i+1)); done; echo all forked'], {
      timeoutMs: 10_000,
    })
    expect(probe.stderr).toMatch(/fork/i)
    expect(probe.stdout).not.toContain('all forked')
    const probed = await s.stats()
    expect(probed.pids).toBeLessThanOrEqual(256)
    expect(probed.processes.length).toBeGreaterThan(100)
    await s.close()

    const bomb = await sandbox('bomb', { limits: { pids: 256 } })
    const bombEvents = collect(bomb)
    // The top bash returns at once; its descendants keep forking in the background (stdio
    // redirected first, so that none of them holds the exec's output pipes open).
    await bomb.exec(['bash', '-c', `exec >/dev/null 2>&1; :(){ :|:& };: # ${marker}`], { timeoutMs: 5_000 })
    const deadline = Date.now() + 3_000
    while (Date.now() < deadline) {
      // The host process keeps serving: a loopback request answers promptly.
      const started = Date.now()
      const res = await fetch(`http://${api.addr}/alive`, { signal: AbortSignal.timeout(5_000) })
      expect(res.status).toBe(200)
      await res.text()
      expect(Date.now() - started).toBeLessThan(2_000)
      const stats = await bomb.stats()
      expect(stats.pids).toBeLessThanOrEqual(256)
      await sleep(250)
    }
    expect(hostProcessesWith(marker).length).toBeGreaterThan(10)
    expect(hostProcessesWith(marker).length).toBeLessThanOrEqual(256)
    if (root) {
      // The pids cgroup counts refused forks.
      expect(bombEvents.some((e) => e.type === 'limit.exceeded' && e.limit === 'pids')).toBe(true)
    }
    const closing = Date.now()
    await bomb.close()
    expect(Date.now() - closing).toBeLessThan(2_000)
    expect(hostProcessesWith(marker)).toEqual([])
    expect(events.filter((e) => e.type === 'process.exit').length).toBeGreaterThan(0)
  }, 60_000)

  it('a memory hog with memoryBytes: 256 MiB is OOM-killed and process.exit says why', async () => {
    if (spawnSync('python3', ['-c', 'pass']).status !== 0) {
      const hint = 'python3 is missing: apt-get install -y python3'
      if (process.env.CI) throw new Error(hint)
      console.warn(`skipped: ${hint}`)
      return
    }
    const s = await sandbox('hog', { limits: { memoryBytes: 256 * MiB } })
    const events = collect(s)
    const run = s.exec(['python3', '-c', 'a = bytearray(2**31); print("survived")'], { timeoutMs: 20_000 })
    if (!root) {
      // No memory cgroup this user may create on this host: refused, never run unbounded.
      const error = await rejection(run)
      if (error.code === 'HIVE_LIMITS_UNENFORCEABLE') {
        expect(error.message).toContain('limits.memoryBytes')
        return
      }
      throw error
    }
    const r = await run
    expect(r.signal).toBe('SIGKILL')
    expect(r.stdout).not.toContain('survived')
    await sleep(100)
    const exit = events.find((e) => e.type === 'process.exit' && (e.command as string[])[0] === 'python3')
    expect(exit).toMatchObject({ reason: 'oom', signal: 'SIGKILL' })
    expect(events).toContainEqual(expect.objectContaining({ type: 'limit.exceeded', limit: 'memoryBytes', pid: exit!.pid }))
    // The sandbox (and the host) carry on.
    expect((await s.exec(['echo', 'still here'])).stdout).toBe('still here\n')
    const stats = await s.stats()
    expect(stats.memoryPeakBytes).toBeGreaterThan(200 * MiB)
    expect(stats.memoryPeakBytes).toBeLessThanOrEqual(256 * MiB)
  }, 60_000)

  it('cpus: 0.2 holds a busy loop to about a fifth of a core', async () => {
    const s = await sandbox('cpu', { limits: { cpus: 0.2 } })
    const run = s.exec(['timeout', '2', 'sh', '-c', 'while :; do :; done'], { timeoutMs: 10_000 })
    if (!root) {
      const error = await rejection(run)
      if (error.code === 'HIVE_LIMITS_UNENFORCEABLE') {
        expect(error.message).toContain('limits.cpus')
        return
      }
      throw error
    }
    expect((await run).exitCode).toBe(124)
    const { cpuUserMs, cpuSystemMs } = await s.stats()
    expect(cpuUserMs + cpuSystemMs).toBeGreaterThan(0)
    // 2 s at 0.2 CPUs is 400 ms; unbounded it would be up to 2000 ms.
    expect(cpuUserMs + cpuSystemMs).toBeLessThan(700)
  }, 30_000)

  it('an ordinary exit has no reason', async () => {
    const s = await sandbox('plain', {})
    const events = collect(s)
    expect((await s.exec(['sh', '-c', 'kill -9 $$'])).signal).toBe('SIGKILL')
    await sleep(100)
    const exit = events.find((e) => e.type === 'process.exit')
    expect(exit).toBeDefined()
    expect(exit).not.toHaveProperty('reason')
  })

  it('without any cgroup (test switch), memory and cpu limits are refused with HIVE_LIMITS_UNENFORCEABLE', async () => {
    process.env.HIVE_TEST_DISABLE_CGROUPS = '1'
    const s = await sandbox('nocgroup', { limits: { memoryBytes: 256 * MiB, cpus: 1 } })
    const error = await rejection(s.exec(['true']))
    expect(error.code).toBe('HIVE_LIMITS_UNENFORCEABLE')
    expect(error.message).toContain('limits.memoryBytes')
    expect(error.message).toContain('limits.cpus')
    // spawn() reports it through wait(); nothing ran.
    const spawned = s.spawn(['sh', '-c', 'echo ran'])
    expect((await rejection(spawned.wait())).code).toBe('HIVE_LIMITS_UNENFORCEABLE')
    expect(spawned.pid).toBeUndefined()
    // Omitted limits never refuse: defaults apply only where a mechanism exists.
    const plain = await sandbox('nocgroup-plain', {})
    expect((await plain.exec(['echo', 'ok'])).stdout).toBe('ok\n')
    // Per-process limits need no cgroup.
    const files = await sandbox('nocgroup-files', { limits: { openFiles: 64, fileSizeBytes: 4096 } })
    const r = await files.exec(['sh', '-c', 'ulimit -n; ulimit -f; head -c 8192 /dev/zero > /tmp/big; echo $?; wc -c < /tmp/big'])
    const [nofile, fsize, status, size] = r.stdout.trim().split('\n')
    expect(nofile).toBe('64')
    expect(fsize).toBe('8') // 512-byte blocks
    expect(status).not.toBe('0')
    expect(size).toBe('4096')
  })

  it('validates limits like the rest of the config, and getConfig shows them', async () => {
    const error = await rejection(getOrCreateSandbox('badlimits', { limits: { pids: 'many', memoryBytes: 10 } } as never))
    expect(error.code).toBe('HIVE_INVALID_CONFIG')
    expect(error.issues?.map((i) => i.path).sort()).toEqual(['limits.memoryBytes', 'limits.pids'])
    const s = await sandbox('shown', { limits: { pids: 300, cpus: 1.5 } })
    expect((await s.getConfig()).limits).toEqual({ pids: 300, cpus: 1.5 })
  })

  it('applyConfig changes pids while the sandbox runs', async () => {
    const s = await sandbox('change', { limits: { pids: 512 } })
    const fork40 = ['sh', '-c', 'i=0; while [ $i -lt 40 ]; do sleep 2 & i=$((i+1)); done; echo forked']
    expect((await s.exec(fork40, { timeoutMs: 10_000 })).stdout).toContain('forked')
    await s.applyConfig({ limits: { pids: 16 } })
    await sleep(2_100) // the first sleeps end
    const r = await s.exec(fork40, { timeoutMs: 10_000 })
    expect(r.stderr).toMatch(/fork/i)
    expect(r.stdout).not.toContain('forked')
  }, 30_000)
})

describe(`stats (${whoami})`, () => {
  it('reports memory, cpu, tasks and the processes running, and egress totals', async () => {
    const s = await sandbox('stats', {
      egress: [{ access: 'allow', host: 'api.example.com' }],
      upstream: { resolve: { [`api.example.com:${api.port}`]: api.addr } },
    })
    const before = await s.stats()
    expect(before).toEqual({
      memoryBytes: 0,
      memoryPeakBytes: 0,
      cpuUserMs: 0,
      cpuSystemMs: 0,
      pids: 0,
      processes: [],
      egress: { requests: 0, denied: 0, bytesIn: 0, bytesOut: 0 },
    })
    const hits = api.hits.length
    expect((await s.exec(['curl', '-s', `http://api.example.com:${api.port}/stats`])).stdout).toBe('ok /stats')
    expect((await s.exec(['curl', '-s', '-o', '/dev/null', '-w', '%{http_code}', `http://denied.example.com:${api.port}/`])).stdout).toBe('403')
    expect(api.hits.length).toBe(hits + 1)
    const started = Date.now()
    const p = s.spawn(['sh', '-c', 'i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; exec sleep 30'])
    await sleep(500)
    const stats = await s.stats()
    expect(stats.memoryBytes).toBeGreaterThan(0)
    expect(stats.memoryPeakBytes).toBeGreaterThanOrEqual(stats.memoryBytes)
    expect(stats.cpuUserMs + stats.cpuSystemMs).toBeGreaterThan(0)
    expect(stats.pids).toBeGreaterThanOrEqual(1)
    expect(stats.processes).toEqual([{ pid: p.pid, command: ['sleep', '30'], startedAt: expect.any(String) }])
    const at = Date.parse(stats.processes[0].startedAt)
    expect(at).toBeGreaterThan(started - 2_000)
    expect(at).toBeLessThan(Date.now() + 1_000)
    expect(stats.egress).toMatchObject({ requests: 2, denied: 1 })
    expect(stats.egress.bytesIn).toBeGreaterThan(0)
    // Cheap enough to poll once a second.
    const t = performance.now()
    for (let i = 0; i < 10; i++) await s.stats()
    expect((performance.now() - t) / 10).toBeLessThan(50)
    p.kill('SIGKILL')
    await p.wait()
    expect((await s.stats()).processes).toEqual([])
  })
})
