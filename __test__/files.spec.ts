// File ACLs in real sandboxes (README "File access", docs/isolation.md), attacked from inside the way a
// process would try to reach a file it must not. Run by CI as root and again as an unprivileged
// user: where this process cannot open /dev/fuse, per-file rules cannot be enforced and the
// sandbox must refuse to run (HIVE_FS_UNENFORCEABLE), never enforce less.
import { closeSync, existsSync, lstatSync, mkdirSync, mkdtempSync, openSync, readdirSync, readFileSync, readlinkSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'

import { getOrCreateSandbox, type Sandbox, type SandboxConfig, type SandboxEvent } from '../index.js'
import { useTempHome } from './helpers/home.js'

const home = useTempHome()
const whoami = process.getuid?.() === 0 ? 'root' : 'unprivileged'

/** Whether this process can open /dev/fuse (per-file enforcement needs it). */
function fuseUsable(): boolean {
  try {
    closeSync(openSync('/dev/fuse', 'r+'))
    return true
  } catch {
    return false
  }
}
const fuse = fuseUsable()
const NO_FUSE = `skipped: this process (${whoami}) cannot open /dev/fuse, so per-file ACLs cannot be enforced here`

/** The issue's rules: `.env` files hidden everywhere, docs read-only, the rest writable. */
const ACLS = [
  { path: '/workspace/**/*.env', access: 'none' },
  { path: '/workspace/docs/**', access: 'r' },
  { path: '/workspace/**', access: 'rw' },
] as const
const RULE_ENV = 0
const RULE_DOCS = 1

let src: string
const config = (): SandboxConfig => ({
  fs: [
    { backend: 'local', mount: '/workspace', source: src, acls: [...ACLS] },
    { backend: 'local', mount: '/scratch' },
  ],
})

beforeAll(() => {
  src = mkdtempSync(join(tmpdir(), 'hive-files-'))
  writeFileSync(join(src, 'secret.env'), 'API_KEY=hunter2\n')
  mkdirSync(join(src, 'docs'))
  writeFileSync(join(src, 'docs', 'guide.md'), '# guide\n')
  mkdirSync(join(src, 'src'))
  writeFileSync(join(src, 'src', 'main.rs'), 'fn main() {}\n')
})

afterAll(() => {
  rmSync(src, { recursive: true, force: true })
  home.cleanup()
})

/** Every fs.denied event seen by [attempt] so far. */
const reported: SandboxEvent[] = []

/** Runs `script` (stderr folded into stdout) and returns the fs.denied events it caused. */
async function attempt(sandbox: Sandbox, script: string): Promise<{ exitCode: number | null; out: string; denied: SandboxEvent[] }> {
  const stream = sandbox.getEventsStream()
  const r = await sandbox.exec(['sh', '-c', `exec 2>&1; ${script}`])
  // A marker process: every fs.denied of the attempt was emitted before its exit.
  await sandbox.exec(['true'])
  const denied: SandboxEvent[] = []
  for await (const e of stream) {
    if (e.type === 'fs.denied') {
      denied.push(e)
      reported.push(e)
    }
    if (e.type === 'process.exit' && Array.isArray(e.command) && e.command[0] === 'true') break
  }
  return { exitCode: r.exitCode, out: r.stdout, denied }
}

describe.skipIf(fuse)(`file ACLs without a usable /dev/fuse (${whoami})${fuse ? ' (skipped: /dev/fuse is usable here)' : ''}`, () => {
  it('refuses to run a sandbox whose ACLs need per-file enforcement: HIVE_FS_UNENFORCEABLE', async () => {
    const sandbox = await getOrCreateSandbox('files-unenforceable', config())
    await expect(sandbox.exec(['true'])).rejects.toMatchObject({ code: 'HIVE_FS_UNENFORCEABLE' })
    await sandbox.close()
  })

  it('still runs plain subtree rules (bind mounts)', async () => {
    const sandbox = await getOrCreateSandbox('files-plain', {
      fs: [{ backend: 'local', mount: '/workspace', source: src, acls: [{ path: '/workspace/docs/**', access: 'r' }] }],
    })
    const r = await sandbox.exec(['sh', '-c', 'cat /workspace/docs/guide.md; echo x > /workspace/docs/guide.md || echo refused'])
    expect(r.stdout).toBe('# guide\nrefused\n')
    expect(readFileSync(join(src, 'docs', 'guide.md'), 'utf8')).toBe('# guide\n')
    await sandbox.close()
  })
})

describe.skipIf(!fuse)(`file ACLs (${whoami})${fuse ? '' : ` (${NO_FUSE})`}`, () => {
  let sandbox: Sandbox
  beforeAll(async () => {
    sandbox = await getOrCreateSandbox('files', config())
  })
  afterAll(async () => {
    await sandbox?.close()
  })

  it('cannot read a .env that existed at start', async () => {
    const r = await attempt(sandbox, 'cat /workspace/secret.env; ls -a /workspace')
    expect(r.out).toContain('No such file')
    expect(r.out).not.toContain('hunter2')
    expect(r.out).not.toContain('secret.env\n')
    expect(r.denied).toContainEqual(expect.objectContaining({ path: '/workspace/secret.env', rule: RULE_ENV }))
  })

  it('cannot read a .env the host creates after start', async () => {
    writeFileSync(join(src, 'src', 'late.env'), 'LATE=1\n')
    const r = await attempt(sandbox, 'cat /workspace/src/late.env')
    expect(r.exitCode).not.toBe(0)
    expect(r.out).not.toContain('LATE')
    expect(r.denied).toContainEqual(expect.objectContaining({ path: '/workspace/src/late.env', rule: RULE_ENV }))
  })

  it('cannot create a .env', async () => {
    const r = await attempt(sandbox, 'echo X=1 > /workspace/src/new.env')
    expect(r.exitCode).not.toBe(0)
    expect(existsSync(join(src, 'src', 'new.env'))).toBe(false)
    expect(r.denied).toContainEqual(expect.objectContaining({ path: '/workspace/src/new.env', operation: 'create', rule: RULE_ENV }))
  })

  it.each([
    ['mv secret.env notes.txt', 'cd /workspace && mv secret.env notes.txt'],
    ['ln secret.env x', 'cd /workspace && ln secret.env x'],
    ['a symlink', 'cd /workspace && ln -s secret.env link && cat link'],
    ['../ from another mount', 'cat /scratch/../workspace/secret.env'],
  ])('cannot reach a denied file by %s', async (_name, script) => {
    const r = await attempt(sandbox, script)
    expect(r.exitCode).not.toBe(0)
    expect(r.out).not.toContain('hunter2')
    // The kernel caches the refusal ("no such name") of a hidden name until the rules change, so
    // the lookup reaching hive (and its event) may have come from an earlier attempt.
    expect(reported).toContainEqual(expect.objectContaining({ path: '/workspace/secret.env', rule: RULE_ENV }))
    expect(existsSync(join(src, 'notes.txt')) || existsSync(join(src, 'x'))).toBe(false)
    expect(readFileSync(join(src, 'secret.env'), 'utf8')).toBe('API_KEY=hunter2\n')
  })

  it('can read but not write, create, delete or rename under /workspace/docs', async () => {
    const read = await sandbox.exec(['sh', '-c', 'cat /workspace/docs/guide.md && ls /workspace/docs'])
    expect(read.stdout).toBe('# guide\nguide.md\n')
    for (const [script, path, operation] of [
      ['echo more >> /workspace/docs/guide.md', '/workspace/docs/guide.md', 'open'],
      ['touch /workspace/docs/new.md', '/workspace/docs/new.md', 'create'],
      ['rm -f /workspace/docs/guide.md', '/workspace/docs/guide.md', 'unlink'],
      ['mv /workspace/docs/guide.md /workspace/docs/g2.md', '/workspace/docs/guide.md', 'rename'],
    ]) {
      const r = await attempt(sandbox, script)
      expect(r.exitCode, script).not.toBe(0)
      expect(r.denied, script).toContainEqual(expect.objectContaining({ path, operation, rule: RULE_DOCS }))
    }
    expect(readdirSync(join(src, 'docs'))).toEqual(['guide.md'])
    expect(readFileSync(join(src, 'docs', 'guide.md'), 'utf8')).toBe('# guide\n')
  })

  it('can do everything elsewhere under /workspace, and the data persists across close()', async () => {
    const r = await attempt(
      sandbox,
      'cd /workspace && mkdir -p out/deep && echo one > out/deep/a.txt && mv out/deep/a.txt out/b.txt && ln out/b.txt out/c.txt && echo two >> out/b.txt && chmod 600 out/b.txt && rm src/main.rs && cat out/c.txt',
    )
    expect(r).toMatchObject({ exitCode: 0, out: 'one\ntwo\n', denied: [] })
    await sandbox.close()
    expect(readFileSync(join(src, 'out', 'b.txt'), 'utf8')).toBe('one\ntwo\n')
    expect(existsSync(join(src, 'src', 'main.rs'))).toBe(false)
    sandbox = await getOrCreateSandbox('files', config())
    expect((await sandbox.exec(['cat', '/workspace/out/c.txt'])).stdout).toBe('one\ntwo\n')
  })

  it('a mount without acls is fully writable', async () => {
    const r = await sandbox.exec(['sh', '-c', 'cd /scratch && echo hi > f && mkdir d && mv f d/ && ln -s d/f l && cat l && rm l d/f && rmdir d && echo ok'])
    expect(r).toMatchObject({ exitCode: 0, stdout: 'hi\nok\n' })
  })

  it('a path under no mount is not visible', async () => {
    const r = await sandbox.exec(['sh', '-c', `ls ${src}; ls /home/*; cat /etc/shadow; ls ${home.dir}`])
    expect(r.stdout).toBe('')
    expect(r.stderr).not.toContain('hunter2')
  })
})

// Every operation the docs list for an access level, attempted on each level in each enforcement
// mode: bind mounts (with Landlock, with Landlock disabled, with only Landlock ABI 1) and FUSE.
// One sandbox and one exec per mode: a Python script inside tries everything and reports errnos.
const LEVEL_DIRS = { rw: '/ws/a', r: '/ws/b', none: '/ws/c', unmatched: '/ws' } as const
type Level = keyof typeof LEVEL_DIRS
/** The rules of the table: `a` writable, `b` read-only, `c` hidden, the rest (the mount root's files) unmatched. */
const TABLE_ACLS = [
  { path: '/ws/a/**', access: 'rw' },
  { path: '/ws/b/**', access: 'r' },
  { path: '/ws/c/**', access: 'none' },
] as const
/** Forces the FUSE layer without changing any decision: a glob rule no file matches. */
const FORCE_FUSE = { path: '/ws/**/*.never-matches', access: 'none' } as const

/** [attack, the Python statement run with `d` = the level's directory]. */
const ATTACKS: [string, string][] = [
  ['read a file', "open(d + '/f.txt').read()"],
  ['list the directory', 'os.listdir(d)'],
  ['append to a file', "os.write(os.open(d + '/f.txt', os.O_WRONLY | os.O_APPEND), b'x')"],
  ['create a file', "open(d + '/new.txt', 'x').close()"],
  ['unlink a file', "os.unlink(d + '/gone.txt')"],
  ['rename a file', "os.rename(d + '/moved.txt', d + '/moved2.txt')"],
  ['chmod 666 a file', "os.chmod(d + '/f.txt', 0o666)"],
  ['chmod 777 the directory', 'os.chmod(d, 0o777)'],
  ['chown a file to its owner', "os.chown(d + '/f.txt', 0, 0)"],
  ['touch -d 2001-01-01 a file (utime)', "os.utime(d + '/f.txt', (978307200, 978307200))"],
  ['utime the directory', 'os.utime(d, (978307200, 978307200))'],
  ['setxattr user.* on a file', "os.setxattr(d + '/f.txt', 'user.hive', b'1')"],
  ['truncate a file', "os.truncate(d + '/f.txt', 0)"],
  ['mkdir', "os.mkdir(d + '/newdir')"],
  ['rmdir', "os.rmdir(d + '/sub')"],
  ['symlink', "os.symlink('f.txt', d + '/newlink')"],
  ['hard link', "os.link(d + '/f.txt', d + '/newhard')"],
]
/** [attack, Python statement]: carrying an `r` or hidden file into the `rw` subtree to change it there. */
const CROSS_ATTACKS: [string, string][] = [
  ['hard link an r file into rw, then chmod it', "os.link('/ws/b/f.txt', '/ws/a/stolen'); os.chmod('/ws/a/stolen', 0o666)"],
  ['rename an r file into rw', "os.rename('/ws/b/moved.txt', '/ws/a/stolen2')"],
  ['chmod an r file through a symlink in rw', "os.symlink('/ws/b/f.txt', '/ws/a/via'); os.chmod('/ws/a/via', 0o666)"],
  ['utime an r file through a symlink in rw', "os.symlink('/ws/b/f.txt', '/ws/a/via2'); os.utime('/ws/a/via2', (978307200, 978307200))"],
  ['hard link a hidden file into rw', "os.link('/ws/c/f.txt', '/ws/a/stolen3')"],
  ['hard link an unmatched file into rw', "os.link('/ws/f.txt', '/ws/a/stolen4')"],
]

/** Attacks that create a name: refused (EACCES, EROFS) in a visible directory that is not writable. */
const CREATES = new Set(['create a file', 'mkdir', 'symlink'])
/** Attacks that remove a name: in a read-only directory the kernel answers EROFS before it looks the name up. */
const REMOVES = new Set(['unlink a file', 'rename a file', 'rmdir'])

const ATTACK_SCRIPT = `
import ctypes, errno, json, os, sys
def attempt(fn):
    try:
        fn()
        return 'ok'
    except OSError as e:
        return 'EOPNOTSUPP' if e.errno == errno.EOPNOTSUPP else errno.errorcode.get(e.errno, str(e.errno))
levels, attacks = json.loads(sys.argv[1]), json.loads(sys.argv[2])
out = {level: {attack: attempt(lambda: exec(stmt, {'os': os, 'd': d})) for attack, stmt in attacks} for level, d in levels.items()}
def reparent():
    os.makedirs('/tmp/p/x', exist_ok=True)
    os.makedirs('/tmp/p/y', exist_ok=True)
    open('/tmp/p/x/f', 'w').close()
    os.rename('/tmp/p/x/f', '/tmp/p/y/f')
out['cross'] = {attack: attempt(lambda: exec(stmt, {'os': os})) for attack, stmt in json.loads(sys.argv[3])}
out['probes'] = {
    # landlock_create_ruleset(NULL, 0, VERSION): the kernel's ABI, whatever the launcher used
    'kernelAbi': max(ctypes.CDLL(None).syscall(444, None, 0, 1), 0),
    # only Landlock refuses this (procfs is mounted read-write and the file is our own)
    'procComm': attempt(lambda: open('/proc/self/comm', 'w').write('x')),
    # Landlock ABI 1 refuses every rename into another directory
    'reparent': attempt(reparent),
    'rootListing': sorted(os.listdir('/ws')),
}
print(json.dumps(out))
`

type Snapshot = Map<string, string>
/** Type, mode, size, owner, mtime and content of everything under `dir` (xattrs: see the setxattr errno). */
function snapshot(dir: string, rel = ''): Snapshot {
  const out: Snapshot = new Map()
  const st = lstatSync(join(dir, rel))
  const content = st.isFile() ? readFileSync(join(dir, rel), 'utf8') : st.isSymbolicLink() ? readlinkSync(join(dir, rel)) : ''
  out.set(rel || '.', JSON.stringify([st.mode, st.size, st.uid, st.gid, Number(st.mtimeMs), content]))
  if (st.isDirectory()) {
    for (const name of readdirSync(join(dir, rel)).sort()) {
      for (const [k, v] of snapshot(dir, rel ? `${rel}/${name}` : name)) out.set(k, v)
    }
  }
  return out
}

function seedTable(dir: string): void {
  for (const sub of ['a', 'b', 'c', '.']) {
    mkdirSync(join(dir, sub, 'sub'), { recursive: true })
    writeFileSync(join(dir, sub, 'f.txt'), `${sub} original\n`)
    writeFileSync(join(dir, sub, 'gone.txt'), 'x\n')
    writeFileSync(join(dir, sub, 'moved.txt'), 'x\n')
  }
}

const VARIANTS = [
  { mode: 'bind + Landlock', env: {}, perFile: false },
  { mode: 'bind, Landlock disabled (HIVE_TEST_DISABLE_LANDLOCK=1)', env: { HIVE_TEST_DISABLE_LANDLOCK: '1' }, perFile: false },
  { mode: 'bind, Landlock ABI 1 (HIVE_TEST_LANDLOCK_ABI=1: no truncate or refer right)', env: { HIVE_TEST_LANDLOCK_ABI: '1' }, perFile: false },
  { mode: 'FUSE', env: {}, perFile: true },
] as const

for (const variant of VARIANTS) {
  const skip = variant.perFile && !fuse
  describe.skipIf(skip)(`every operation on every access level: ${variant.mode} (${whoami})${skip ? ` (${NO_FUSE})` : ''}`, () => {
    let dir: string
    let before: Snapshot
    let after: Snapshot
    let results: Record<Level | 'cross', Record<string, string>> & { probes: { kernelAbi: number; procComm: string; reparent: string; rootListing: string[] } }
    beforeAll(async () => {
      dir = mkdtempSync(join(tmpdir(), 'hive-table-'))
      seedTable(dir)
      before = snapshot(dir)
      const acls = variant.perFile ? [FORCE_FUSE, ...TABLE_ACLS] : [...TABLE_ACLS]
      const name = `files-table-${VARIANTS.indexOf(variant)}`
      const sandbox = await getOrCreateSandbox(name, { fs: [{ backend: 'local', mount: '/ws', source: dir, acls }] })
      // The switches are read when the sandbox's namespaces start: at its first exec.
      Object.assign(process.env, variant.env)
      try {
        const r = await sandbox.exec(['python3', '-c', ATTACK_SCRIPT, JSON.stringify(LEVEL_DIRS), JSON.stringify(ATTACKS), JSON.stringify(CROSS_ATTACKS)])
        expect(r.stderr).toBe('')
        results = JSON.parse(r.stdout)
      } finally {
        for (const key of Object.keys(variant.env)) delete process.env[key]
        await sandbox.close()
      }
      after = snapshot(dir)
    })
    afterAll(() => {
      if (dir) rmSync(dir, { recursive: true, force: true })
    })

    it.each(ATTACKS.map(([attack]) => attack))('%s: allowed on rw; refused on r; hidden on none and unmatched', (attack) => {
      const got = (level: Level) => results[level][attack]
      const refused = attack.startsWith('setxattr') ? ['EACCES', 'EROFS', 'EPERM', 'EOPNOTSUPP'] : ['EACCES', 'EROFS', 'EPERM']
      // rw: everything (extended attributes are not served over FUSE, and some host filesystems lack them)
      expect(got('rw'), 'rw').toBe(attack.startsWith('setxattr') && (variant.perFile || got('rw') === 'EOPNOTSUPP') ? 'EOPNOTSUPP' : 'ok')
      // r: reads only
      if (attack === 'read a file' || attack === 'list the directory') expect(got('r'), 'r').toBe('ok')
      else expect(refused, `r: ${got('r')}`).toContain(got('r'))
      // none: the directory and everything in it do not exist
      expect(got('none'), 'none').toBe('ENOENT')
      // unmatched: the mount root is traversable and lists only what is visible; its files do not
      // exist (over bind mounts the root is a read-only directory of the sandbox's own)
      if (attack === 'list the directory') expect(got('unmatched'), 'unmatched').toBe('ok')
      else if (CREATES.has(attack) || attack.endsWith('the directory')) expect(refused, `unmatched: ${got('unmatched')}`).toContain(got('unmatched'))
      else expect(got('unmatched'), 'unmatched').toBe(REMOVES.has(attack) && !variant.perFile ? 'EROFS' : 'ENOENT')
    })

    it.each(CROSS_ATTACKS.map(([attack]) => attack))('%s: refused', (attack) => {
      expect(['EACCES', 'EROFS', 'EPERM', 'EXDEV', 'ENOENT'], results.cross[attack]).toContain(results.cross[attack])
    })

    it('left everything but the rw subtree untouched on the host', () => {
      const outside = (snap: Snapshot) => [...snap].filter(([path]) => path !== 'a' && !path.startsWith('a/'))
      expect(outside(after)).toEqual(outside(before))
      expect(after.get('a/new.txt')).toBeDefined()
    })

    it('the mount root lists only the visible names', () => {
      expect(results.probes.rootListing).toEqual(['a', 'b'])
    })

    it.skipIf(variant.perFile)('the Landlock switch took effect', () => {
      const { kernelAbi, procComm, reparent } = results.probes
      const landlock = kernelAbi > 0 && !('HIVE_TEST_DISABLE_LANDLOCK' in variant.env)
      expect(procComm, 'only Landlock refuses writing /proc/self/comm').toBe(landlock ? 'EACCES' : 'ok')
      expect(reparent, 'Landlock ABI 1 refuses renames into another directory').toBe(landlock && 'HIVE_TEST_LANDLOCK_ABI' in variant.env ? 'EXDEV' : 'ok')
    })
  })
}
