// The user docs as a reader meets them: every relative link and anchor resolves inside the
// published package, every anchor the sources cite exists, every JavaScript block is a file under
// examples/ that runs (offline: names mapped to a loopback upstream) and type-checks with
// `tsc --strict`, and every JSON block is a config that the schema and the validator accept.
import { execFile, execFileSync, spawnSync } from 'node:child_process'
import { promisify } from 'node:util'
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { dirname, join, normalize } from 'node:path'
import { fileURLToPath } from 'node:url'
import Ajv from 'ajv'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'

import { deleteSandbox, getOrCreateSandbox } from '../index.js'
import { httpsUpstream, makeTestCA, type Upstream } from './helpers/upstreams'

const execFileAsync = promisify(execFile)
const root = fileURLToPath(new URL('..', import.meta.url))
const read = (file: string) => readFileSync(join(root, file), 'utf8')

const packaged: string[] = JSON.parse(execFileSync('npm', ['pack', '--dry-run', '--json', '--ignore-scripts'], { cwd: root, encoding: 'utf8' }))[0].files.map(
  (f: { path: string }) => f.path,
)
const docs = packaged.filter((f) => f.endsWith('.md'))

/** GitHub's heading anchors: lowercase, punctuation dropped, spaces to hyphens, repeats numbered. */
function anchorsOf(markdown: string): Set<string> {
  const anchors = new Set<string>()
  const seen = new Map<string, number>()
  for (const line of markdown.replace(/^```[\s\S]*?^```/gm, '').split('\n')) {
    const heading = /^#{1,6}\s+(.*)$/.exec(line)
    if (!heading) continue
    const slug = heading[1]
      .trim()
      .toLowerCase()
      .replace(/[^\p{L}\p{N}\s_-]/gu, '')
      .replace(/\s/g, '-')
    const n = seen.get(slug) ?? 0
    seen.set(slug, n + 1)
    anchors.add(n === 0 ? slug : `${slug}-${n}`)
  }
  return anchors
}

function linksOf(markdown: string): string[] {
  const text = markdown.replace(/^```[\s\S]*?^```/gm, '').replace(/`[^`\n]*`/g, '')
  return [...text.matchAll(/\]\(([^)\s]+)\)/g)].map((m) => m[1])
}

/** Resolves `file#anchor` from a doc; returns what is wrong, or null. */
function brokenLink(from: string, link: string): string | null {
  if (/^[a-z]+:/i.test(link)) return `${link}: points outside the package`
  const [path, anchor] = link.split('#')
  const target = path === '' ? from : normalize(join(dirname(from), path))
  if (target.startsWith('..')) return `${link}: outside the package`
  const isDir = packaged.some((f) => f.startsWith(`${target}/`))
  if (!packaged.includes(target) && !isDir) return `${link}: ${target} is not in the package`
  if (anchor !== undefined && !anchorsOf(read(target)).has(anchor)) return `${link}: no heading #${anchor} in ${target}`
  return null
}

function blocksOf(markdown: string): { lang: string; code: string }[] {
  return [...markdown.matchAll(/^```(\w*)\n([\s\S]*?)^```/gm)].map((m) => ({ lang: m[1], code: m[2] }))
}

const examples = readdirSync(join(root, 'examples')).filter((f) => f.endsWith('.mjs') && f !== 'demo.mjs')

describe('links', () => {
  it('the package ships the README, the docs and the license', () => {
    for (const f of ['README.md', 'LICENSE', 'docs/network-access.md', 'docs/file-access.md', 'docs/audit-log.md', 'docs/processes.md', 'docs/security.md', 'docs/cli.md', 'docs/decisions.md']) {
      expect(packaged).toContain(f)
    }
  })

  it.each(docs)('every link in %s resolves inside the package', (doc) => {
    const broken = linksOf(read(doc))
      .map((link) => brokenLink(doc, link))
      .filter(Boolean)
    expect(broken).toEqual([])
  })

  it('every docs page and anchor the comments in the sources cite exists', () => {
    const sources = execFileSync('git', ['ls-files', 'src', 'index.js', 'process.js', 'bin'], { cwd: root, encoding: 'utf8' }).split('\n').filter(Boolean)
    const cited = new Set<string>()
    for (const file of sources) {
      const comments = read(file)
        .split('\n')
        .filter((line) => /^\s*(\/\/|\/\*|\*)/.test(line) || /\s\/\/ /.test(line))
        .join('\n')
      for (const m of comments.matchAll(/(?<![\w/.-])((?:docs\/[a-z-]+|README)\.md)(#[a-z0-9-]+)?/g)) cited.add(m[0])
    }
    expect(cited.size).toBeGreaterThan(10)
    const broken = [...cited].map((link) => brokenLink('', link)).filter(Boolean)
    expect(broken).toEqual([])
  })

  it('a broken anchor is caught (the check can fail)', () => {
    expect(brokenLink('README.md', 'docs/audit-log.md#no-such-heading')).toMatch(/no heading/)
    expect(brokenLink('README.md', '../shared/SPEC.md')).toMatch(/outside/)
    expect(brokenLink('README.md', 'https://example.com/')).toMatch(/outside/)
  })
})

describe('code blocks', () => {
  const blocks = docs.flatMap((doc) => blocksOf(read(doc)).map((b) => ({ doc, ...b })))

  it('every JavaScript block is a file under examples/', () => {
    const files = new Map(examples.map((f) => [read(`examples/${f}`), f]))
    const js = blocks.filter((b) => ['js', 'javascript', 'mjs', 'ts', 'typescript'].includes(b.lang))
    expect(js.length).toBeGreaterThanOrEqual(5)
    const orphans = js.filter((b) => !files.has(b.code)).map((b) => `${b.doc}: a ${b.lang} block that is no file under examples/: ${b.code.slice(0, 80)}`)
    expect(orphans).toEqual([])
    const used = new Set(js.map((b) => files.get(b.code)))
    expect(examples.filter((f) => !used.has(f))).toEqual([])
  })

  it('every block has a language', () => {
    expect(blocks.filter((b) => b.lang === '').map((b) => `${b.doc}: ${b.code.slice(0, 60)}`)).toEqual([])
  })

  it('every JSON block is a config the schema and the validator accept', async () => {
    const validate = new Ajv({ allErrors: true }).compile(JSON.parse(read('schema/sandbox-config.schema.json')))
    const json = blocks.filter((b) => b.lang === 'json')
    expect(json.length).toBeGreaterThanOrEqual(2)
    const home = mkdtempSync(join(tmpdir(), 'hive-docs-'))
    process.env.HIVE_HOME = home
    try {
      for (const block of json) {
        const config = JSON.parse(block.code)
        expect(validate(config), `${block.doc}: ${JSON.stringify(validate.errors)}`).toBe(true)
        // What `hive run --config` does before applying it: drop $schema, read $env: strings.
        const { $schema: _schema, ...rest } = config
        const applied = JSON.parse(JSON.stringify(rest).replace(/"\$env:[A-Z_]+"/g, '"from-the-environment"').replace(/"source":"\."/g, `"source":${JSON.stringify(home)}`))
        const sandbox = await getOrCreateSandbox('docs-json', applied)
        await sandbox.close()
        await deleteSandbox('docs-json')
      }
    } finally {
      rmSync(home, { recursive: true, force: true })
    }
  })

  it('the examples type-check with tsc --strict', () => {
    const tsc = spawnSync(join(root, 'node_modules', '.bin', 'tsc'), ['-p', 'examples'], { cwd: root, encoding: 'utf8' })
    expect(tsc.stdout + tsc.stderr).toBe('')
    expect(tsc.status).toBe(0)
  }, 120_000)
})

describe('the examples run', () => {
  const names = ['api.github.com', 'api.example.com', 'pypi.org', 'upload.pypi.org']
  let upstream: Upstream
  let scratch: string
  let caFile: string

  beforeAll(async () => {
    const ca = makeTestCA(names)
    upstream = await httpsUpstream(ca)
    scratch = mkdtempSync(join(tmpdir(), 'hive-examples-'))
    caFile = join(scratch, 'upstream-ca.pem')
    writeFileSync(caFile, ca.caPem)
  })
  afterAll(async () => {
    await upstream.close()
    rmSync(scratch, { recursive: true, force: true })
  })

  // Asynchronously: the upstream answers from this process's event loop.
  async function run(example: string): Promise<string> {
    const { stdout, stderr } = await execFileAsync(process.execPath, ['--require', join(root, '__test__/helpers/offline-examples.cjs'), join(root, 'examples', example)], {
      cwd: root,
      encoding: 'utf8',
      timeout: 60_000,
      env: { ...process.env, HIVE_HOME: join(scratch, example), HIVE_EXAMPLES_UPSTREAM: upstream.addr, HIVE_EXAMPLES_CA: caFile },
    })
    expect(stderr).toBe('')
    return stdout
  }

  it('quick-start.mjs: GET allowed, POST denied, both recorded', async () => {
    upstream.hits.length = 0
    const out = await run('quick-start.mjs')
    expect(out).toContain('api.github.com: 0 ok /zen')
    expect(out).toContain('allowed GET api.github.com/zen rule')
    expect(out).toContain('denied POST api.github.com/gists')
    expect(upstream.hits.map((h) => `${h.method} ${h.path}`)).toEqual(['GET /zen'])
  }, 60_000)

  it('network-access.mjs: decide, injection, applyConfig, sandbox.proxy()', async () => {
    upstream.hits.length = 0
    const out = await run('network-access.mjs')
    expect(out).toContain("{ access: 'denied', rule: 0, reason: 'rule' }")
    expect(out.split('\n')[1]).toMatch(/^\{ access: 'denied', rule: (null|2), reason: '(no-rule|method)' \}$/)
    expect(out).toContain('ok /v1/models')
    expect(out).toContain("after applyConfig: hive: GET api.example.com/v1/models denied by this sandbox's egress policy (no rule matches host api.example.com)")
    expect(out).toContain('through sandbox.proxy(): ok /zen')
    // The credential reached the upstream once; the request after applyConfig never did.
    const models = upstream.hits.filter((h) => h.path === '/v1/models')
    expect(models.map((h) => h.headers.authorization)).toEqual(['Bearer test-token'])
  }, 60_000)

  it('file-access.mjs: hidden, read-only and writable paths', async (ctx) => {
    if (!existsSync('/dev/fuse') || process.getuid?.() !== 0) ctx.skip('per-file rules need a usable /dev/fuse (root here); docs/file-access.md#when-hive-refuses')
    const out = await run('file-access.mjs')
    expect(out.split('\n')[0]).toBe('docs') // `ls -A` shows no .env
    expect(out).toContain('No such file or directory')
    expect(out).toContain('Permission denied')
    expect(out).toContain('done')
    expect(out).toContain('denied: ')
  }, 60_000)

  it('audit-log.mjs: live denials and a replay', async () => {
    const out = await run('audit-log.mjs')
    expect(out).toMatch(/denied while running: \[ 'GET example\.com\/' \]/)
    expect(out).toMatch(/last event id replayed: 0{10}\d{6}/)
  }, 60_000)

  it('processes.mjs: exec, stdin, timeout, spawn', async () => {
    const out = await run('processes.mjs')
    expect(out).toContain('0 a.txt')
    expect(out).toContain('SHOUT')
    expect(out).toContain('timed out: true SIGKILL')
    expect(out).toContain('from the server: hello')
    expect(out).toContain("{ exitCode: null, signal: 'SIGTERM' }")
  }, 60_000)
})

// The examples are all run: a new one needs its own case above.
it('every example has a test', () => {
  const source = readFileSync(fileURLToPath(import.meta.url), 'utf8')
  expect(examples.filter((f) => !source.includes(`await run('${f}')`))).toEqual([])
})
