// File ACLs in real sandboxes (SPEC §4 "Filesystem", issue 6), attacked from inside the way a
// process would try to reach a file it must not. Run by CI as root and again as an unprivileged
// user: where this process cannot open /dev/fuse, per-file rules cannot be enforced and the
// sandbox must refuse to run (HIVE_FS_UNENFORCEABLE), never enforce less.
import { closeSync, existsSync, mkdirSync, mkdtempSync, openSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
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

  it('still runs plain subtree rules (bind + Landlock)', async () => {
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
