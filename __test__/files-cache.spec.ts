// Kernel caching of FUSE-served mounts (docs/decisions.md, "File caching"): entries and attributes
// are cached long, and still a policy change or a change the host makes in the source shows
// inside at once. Run as root and unprivileged; where this process cannot open /dev/fuse the
// per-file mounts are refused (files.spec.ts checks that) and these tests skip.
import { closeSync, mkdtempSync, openSync, renameSync, rmSync, unlinkSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { createInterface } from 'node:readline'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'

import { getOrCreateSandbox, type Sandbox, type SandboxConfig, type SandboxEvent } from '../index.js'
import { useTempHome } from './helpers/home.js'

const home = useTempHome()
const whoami = process.getuid?.() === 0 ? 'root' : 'unprivileged'

function fuseUsable(): boolean {
  try {
    closeSync(openSync('/dev/fuse', 'r+'))
    return true
  } catch {
    return false
  }
}
const fuse = fuseUsable()

/** `.env` hidden (so the mount is FUSE-served), everything else writable. */
const OPEN = [
  { path: '/workspace/**/*.env', access: 'none' },
  { path: '/workspace/**', access: 'rw' },
] as const

let src: string
const config = (acls: readonly { path: string; access: string }[]): SandboxConfig => ({
  fs: [{ backend: 'local', mount: '/workspace', source: src, acls: acls.map((a) => ({ ...a })) as SandboxConfig['fs'][number]['acls'] }],
})

beforeAll(() => {
  src = mkdtempSync(join(tmpdir(), 'hive-files-cache-'))
  writeFileSync(join(src, 'x.pem'), 'key\n')
  writeFileSync(join(src, 'notes.txt'), 'notes\n')
  writeFileSync(join(src, 'old.txt'), 'old\n')
})

afterAll(() => {
  rmSync(src, { recursive: true, force: true })
  home.cleanup()
})

/**
 * A python process inside that waits, for each line `appear|vanish <path>` it reads, until the
 * path exists (or not), polling every millisecond, and prints how many ms that took.
 */
const WAITER = `
import os, sys, time
for line in sys.stdin:
    what, path = line.split()
    start = time.monotonic()
    while os.path.lexists(path) != (what == "appear"):
        if time.monotonic() - start > 5:
            break
        time.sleep(0.001)
    print(round((time.monotonic() - start) * 1000), flush=True)
`

/** Starts [WAITER]; `wait(what, path)` resolves with the ms it took to see the change. */
function waiter(sandbox: Sandbox): { wait: (what: 'appear' | 'vanish', path: string) => Promise<number>; stop: () => Promise<void> } {
  const child = sandbox.spawn(['python3', '-c', WAITER])
  const lines = createInterface({ input: child.stdout })[Symbol.asyncIterator]()
  return {
    wait: async (what, path) => {
      child.stdin.write(`${what} ${path}\n`)
      const line = await lines.next()
      return Number(line.value)
    },
    stop: async () => {
      child.stdin.end()
      await child.wait()
    },
  }
}

describe.skipIf(!fuse)(`kernel caching of FUSE mounts (${whoami})`, () => {
  let sandbox: Sandbox
  const warnings: SandboxEvent[] = []
  beforeAll(async () => {
    sandbox = await getOrCreateSandbox('files-cache', config(OPEN))
    const stream = sandbox.getEventsStream()
    void (async () => {
      for await (const e of stream) if (e.type === 'sandbox.warning') warnings.push(e)
    })()
  })
  afterAll(async () => {
    await sandbox?.close()
  })

  it('applyConfig hiding *.pem makes a cached stat fail at once, and a new r rule refuses writes at once', async () => {
    // a process that stats x.pem in a loop (warm cache) and reports when it vanishes
    const probe = sandbox.spawn([
      'python3',
      '-c',
      'import os, time\nos.stat("/workspace/x.pem")\nprint("warm", flush=True)\nwhile True:\n    try: os.stat("/workspace/x.pem")\n    except FileNotFoundError: break\nprint(time.time(), flush=True)',
    ])
    const lines = createInterface({ input: probe.stdout })[Symbol.asyncIterator]()
    expect((await lines.next()).value).toBe('warm')
    await sandbox.applyConfig(config([{ path: '/workspace/**/*.pem', access: 'none' }, ...OPEN]))
    const applied = Date.now() / 1000
    const gone = Number((await lines.next()).value)
    // the same process saw it vanish (the namespaces were not restarted), within 50 ms
    expect(gone - applied).toBeLessThan(0.05)
    await probe.wait()
    const stat = await sandbox.exec(['sh', '-c', 'stat /workspace/x.pem 2>&1; ls /workspace'])
    expect(stat.stdout).toContain('No such file')
    expect(stat.stdout).not.toContain('x.pem\n')

    const before = await sandbox.exec(['sh', '-c', 'echo more >> /workspace/notes.txt && echo wrote'])
    expect(before.stdout).toBe('wrote\n')
    await sandbox.applyConfig(config([{ path: '/workspace/**/*.env', access: 'none' }, { path: '/workspace/**', access: 'r' }]))
    const after = await sandbox.exec(['sh', '-c', 'echo again >> /workspace/notes.txt 2>&1 || echo refused; cat /workspace/notes.txt'])
    expect(after.stdout).toContain('refused')
    expect(after.stdout).toContain('notes\nmore\n')
    await sandbox.applyConfig(config(OPEN))
  })

  it('a file the host creates, deletes or renames shows inside within 100 ms', async () => {
    const w = waiter(sandbox)
    // cache the names first: the old file positively, the new one as "no such name"
    const warm = await sandbox.exec(['sh', '-c', 'cat /workspace/old.txt; ls /workspace/new.txt 2>&1'])
    expect(warm.stdout).toContain('No such file')
    writeFileSync(join(src, 'new.txt'), 'new\n')
    expect(await w.wait('appear', '/workspace/new.txt')).toBeLessThan(100)
    unlinkSync(join(src, 'new.txt'))
    expect(await w.wait('vanish', '/workspace/new.txt')).toBeLessThan(100)
    renameSync(join(src, 'old.txt'), join(src, 'moved.txt'))
    expect(await w.wait('vanish', '/workspace/old.txt')).toBeLessThan(100)
    expect(await w.wait('appear', '/workspace/moved.txt')).toBeLessThan(100)
    renameSync(join(src, 'moved.txt'), join(src, 'old.txt'))
    expect(await w.wait('appear', '/workspace/old.txt')).toBeLessThan(100)
    await w.stop()
    expect(warnings).toEqual([])
  })
})

describe.skipIf(!fuse)(`kernel caching without the watcher (${whoami})`, () => {
  let sandbox: Sandbox
  const warnings: SandboxEvent[] = []
  beforeAll(async () => {
    process.env.HIVE_FS_NO_WATCH = '1'
    sandbox = await getOrCreateSandbox('files-cache-short', config(OPEN))
    const stream = sandbox.getEventsStream()
    void (async () => {
      for await (const e of stream) if (e.type === 'sandbox.warning') warnings.push(e)
    })()
    await sandbox.exec(['true']) // the namespaces (and the FUSE server) start here
    delete process.env.HIVE_FS_NO_WATCH
  })
  afterAll(async () => {
    delete process.env.HIVE_FS_NO_WATCH
    await sandbox?.close()
  })

  it('host changes show within the short TTL, and a sandbox.warning says so', async () => {
    const w = waiter(sandbox)
    await sandbox.exec(['cat', '/workspace/notes.txt'])
    writeFileSync(join(src, 'short.txt'), 'x\n')
    // failed lookups are not cached without the watcher: a create shows at once
    expect(await w.wait('appear', '/workspace/short.txt')).toBeLessThan(100)
    unlinkSync(join(src, 'short.txt'))
    expect(await w.wait('vanish', '/workspace/short.txt')).toBeLessThan(1300)
    await w.stop()
    expect(warnings.map((e) => e.code)).toContain('HIVE_FS_CACHE_SHORT')
    expect(String(warnings[0]?.message)).toContain('/workspace')
  })
})
