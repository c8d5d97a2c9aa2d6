// Kills reach every process a command started (docs/processes.md), also those that left its
// session and process group (setsid, a double fork): timeoutMs, an aborted signal, maxBuffer and
// kill() leave none of them running, and exec settles right after its deadline with the output so
// far. Each case runs twice: with the sandbox's cgroups where this host gives them (root here: a
// cgroup per command) and with cgroups switched off (the command's first process is a subreaper
// and the host kills its tree). CI runs it as root and as an unprivileged user.
import { readdirSync } from 'node:fs'
import { afterAll, describe, expect, it } from 'vitest'

import { getOrCreateSandbox, type Sandbox } from '../index.js'
import { useTempHome } from './helpers/home.js'

const home = useTempHome()
const whoami = process.getuid?.() === 0 ? 'root' : 'unprivileged'
const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms))

afterAll(() => {
  home.cleanup()
})

/** Processes of the sandbox whose command contains `marker`. */
async function running(s: Sandbox, marker: string): Promise<string[]> {
  return (await s.stats()).processes.map((p) => p.command.join(' ')).filter((c) => c.includes(marker))
}

/** [`running`], waiting up to 1 s for none to be left. */
async function left(s: Sandbox, marker: string): Promise<string[]> {
  const deadline = Date.now() + 1000
  for (;;) {
    const found = await running(s, marker)
    if (found.length === 0 || Date.now() > deadline) return found
    await sleep(20)
  }
}

// A daemon in its own session with its output elsewhere, and a double-forked python daemon
// that keeps the pipes open: neither is in the command's process group.
const setsidSleep = (marker: string) => `setsid sleep ${marker} >/dev/null 2>&1 & `
const pythonDaemon = (marker: string) =>
  `python3 -c 'import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n        time.sleep(30)\n' ${marker} & `

for (const mode of ['cgroups where available', 'no cgroups']) {
  describe(`kills reach processes that left the command's session (${whoami}, ${mode})`, () => {
    let s: Sandbox
    let n = 0
    // A sleep duration of about 30 s that names the test: `30.<pid>00<n>`.
    const marker = () => `30.${process.pid}00${n++}`

    it('starts the sandbox', async () => {
      if (mode === 'no cgroups') process.env.HIVE_TEST_DISABLE_CGROUPS = '1'
      try {
        s = await getOrCreateSandbox(`kill-reach-${mode === 'no cgroups' ? 'plain' : 'cgroup'}`, {})
        expect((await s.exec(['true'])).exitCode).toBe(0)
      } finally {
        delete process.env.HIVE_TEST_DISABLE_CGROUPS
      }
    })

    afterAll(async () => {
      await s?.close()
    })

    it('timeoutMs kills a setsid daemon and a double-forked one, and settles within 100 ms of the deadline', async () => {
      const m = marker()
      const t = Date.now()
      const r = await s.exec(`echo before; ${setsidSleep(m)}${pythonDaemon(m)}sleep 5; echo x`, { timeoutMs: 300 })
      const late = Date.now() - t - 300
      expect(r).toMatchObject({ exitCode: null, signal: 'SIGKILL', timedOut: true, stdout: 'before\n' })
      // 100 ms is the contract; the margin absorbs a loaded 2-core CI machine.
      expect(late).toBeLessThan(250)
      expect(await left(s, m)).toEqual([])
    })

    it('an aborted signal kills them too', async () => {
      const m = marker()
      const controller = new AbortController()
      setTimeout(() => controller.abort(), 300)
      const t = Date.now()
      await expect(s.exec(`${setsidSleep(m)}${pythonDaemon(m)}sleep 5`, { signal: controller.signal })).rejects.toMatchObject({ name: 'AbortError' })
      expect(Date.now() - t - 300).toBeLessThan(250)
      expect(await left(s, m)).toEqual([])
    })

    it('maxBuffer kills them too', async () => {
      const m = marker()
      await expect(s.exec(`${setsidSleep(m)}${pythonDaemon(m)}sleep 0.2; yes`, { maxBuffer: 1000 })).rejects.toMatchObject({ code: 'HIVE_MAX_BUFFER' })
      expect(await left(s, m)).toEqual([])
    })

    it('kill() signals every process of the command, the daemons included', async () => {
      const m = marker()
      const child = s.spawn(`${setsidSleep(m)}sleep ${m} & wait`)
      // Wait for both sleeps to have exec'd (a forked shell or `setsid` not yet exec'd also
      // carries the marker for a moment).
      const sleeps = async () => (await running(s, m)).filter((c) => c === `sleep ${m}`)
      const deadline = Date.now() + 2000
      while ((await sleeps()).length < 2 && Date.now() < deadline) await sleep(20)
      expect(await sleeps()).toHaveLength(2)
      child.kill('SIGTERM')
      expect(await child.wait()).toEqual({ exitCode: null, signal: 'SIGTERM' })
      expect(await left(s, m)).toEqual([])
    })
  })
}

describe(`finished processes release their descriptors (${whoami})`, () => {
  it('pidfds and pipes are closed once a process ended and its output was read, without a GC', async () => {
    const s = await getOrCreateSandbox('kill-reach-fds', {})
    try {
      await s.exec(['true'])
      const fds = () => readdirSync('/proc/self/fd').length
      const before = fds()
      for (let i = 0; i < 20; i++) await s.exec(['sh', '-c', 'echo out; echo err >&2'])
      const p = s.spawn(['echo', 'spawned'])
      p.stdout.resume()
      p.stderr.resume()
      await p.wait()
      await sleep(50)
      // 21 processes held 4 fds each (pidfd, stdin, stdout, stderr) until collected before.
      expect(fds() - before).toBeLessThan(8)
    } finally {
      await s.close()
    }
  })
})
