// The `hive` command as a user runs it: a child process, real curl inside a sandbox, a loopback
// HTTPS upstream that real-looking names are mapped to by `upstream.resolve` in a config file;
// exit codes, the denied line on stderr, the audit log commands and `--help`.
import { spawn } from 'node:child_process'
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest'

import { httpsUpstream, makeTestCA, type TestCA, type Upstream } from './helpers/upstreams'

const root = fileURLToPath(new URL('..', import.meta.url))
const bin = join(root, 'bin', 'hive.js')
const scratch = mkdtempSync(join(tmpdir(), 'hive-cli-'))
const home = join(scratch, 'home')

interface Run {
  status: number | null
  stdout: string
  stderr: string
}

/** Runs `hive ARGS` as a child process (asynchronously: the upstream lives in this process). */
function hive(args: string[], options: { input?: string; env?: Record<string, string> } = {}): Promise<Run> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [bin, ...args], { cwd: scratch, env: { ...process.env, HIVE_HOME: home, ...options.env } })
    let stdout = ''
    let stderr = ''
    child.stdout.on('data', (d) => (stdout += d))
    child.stderr.on('data', (d) => (stderr += d))
    child.on('error', reject)
    child.on('close', (status) => resolve({ status, stdout, stderr }))
    child.stdin.end(options.input ?? '')
  })
}

let ca: TestCA
let upstream: Upstream
let config: string

beforeAll(async () => {
  ca = makeTestCA(['api.github.com', 'github.com'])
  upstream = await httpsUpstream(ca)
  config = join(scratch, 'hive.json')
  const resolve = { 'api.github.com:443': upstream.addr, 'github.com:443': upstream.addr }
  writeFileSync(config, JSON.stringify({ $schema: '../schema/sandbox-config.schema.json', upstream: { resolve, ca: [ca.caPem] } }))
})
beforeEach(() => {
  upstream.hits.length = 0
})
afterAll(async () => {
  await upstream.close()
  rmSync(scratch, { recursive: true, force: true })
})

describe('hive run', () => {
  it('runs curl against an allowed host and exits with its code', async () => {
    const r = await hive(['run', '--config', config, '--allow', 'api.github.com', '--', 'curl', '-s', 'https://api.github.com/zen'])
    expect(r).toMatchObject({ status: 0, stdout: 'ok /zen', stderr: '' })
    expect(upstream.hits.map((h) => `${h.method} ${h.host}${h.path}`)).toEqual(['GET api.github.com/zen'])
  }, 60_000)

  it('prints a denied line for a host no rule names, and exits non-zero', async () => {
    const r = await hive(['run', '--config', config, '--allow', 'api.github.com', '--', 'curl', '-sf', 'https://github.com/login'])
    expect(r.status).not.toBe(0)
    expect(r.stderr).toMatch(/^hive: denied (CONNECT github\.com|GET github\.com\/login) \(no rule\)$/m)
    expect(upstream.hits).toEqual([])
  }, 60_000)

  it('prints one denied line for a name no rule allows, looked up by a client that ignores the proxy variables', async () => {
    const r = await hive(['run', '--config', config, '--allow', 'api.github.com', '--', 'curl', '-s', '--noproxy', '*', 'https://github.com/login'])
    // The name resolves to a local address whose connections get the proxy's 403.
    expect(r.status).toBe(0)
    expect(r.stdout).toMatch(/^hive: GET github\.com\/login denied by this sandbox's egress policy/)
    expect(r.stderr.match(/^hive: denied dns github\.com \(no rule\)$/gm)).toHaveLength(1)
    expect(r.stderr).toMatch(/^hive: denied GET github\.com\/login \(no rule\)$/m)
    expect(upstream.hits).toEqual([])
  }, 60_000)

  it('prints a denied line with the method and path for a request the proxy sees', async () => {
    const r = await hive(['run', '--config', config, '--allow', 'api.github.com:443', '--', 'curl', '-sf', '-X', 'POST', 'https://api.github.com/gists'])
    expect(r.status).toBe(0) // the method is allowed: no methods on an --allow rule
    expect(upstream.hits.map((h) => h.method)).toEqual(['POST'])
    writeFileSync(join(scratch, 'get-only.json'), JSON.stringify({ ...JSON.parse(readFileSync(config, 'utf8')), egress: [{ access: 'allow', host: 'api.github.com', methods: ['GET'] }] }))
    upstream.hits.length = 0
    const denied = await hive(['run', '--config', join(scratch, 'get-only.json'), '--', 'curl', '-sf', '-X', 'POST', 'https://api.github.com/gists'])
    expect(denied.status).toBe(22) // curl -f: the proxy's 403
    expect(denied.stderr).toMatch(/^hive: denied POST api\.github\.com\/gists \(/m)
    expect(upstream.hits).toEqual([])
  }, 60_000)

  it('--verbose prints every decision', async () => {
    const r = await hive(['run', '--verbose', '--config', config, '--allow', 'api.github.com', '--', 'curl', '-s', 'https://api.github.com/zen'])
    expect(r.stderr).toMatch(/^hive: allowed GET api\.github\.com\/zen \(rule, rule 0\)$/m)
  }, 60_000)

  it('"$env:NAME" in the config reads the environment; the upstream sees the header, the sandbox never does', async () => {
    const withSecret = join(scratch, 'secret.json')
    writeFileSync(
      withSecret,
      JSON.stringify({ ...JSON.parse(readFileSync(config, 'utf8')), egress: [{ access: 'allow', host: 'api.github.com', override: { headers: { Authorization: '$env:GH_AUTH' } } }] }),
    )
    const r = await hive(['run', '--config', withSecret, '--', 'sh', '-c', 'curl -s https://api.github.com/user; env | grep -c cli-secret-value || true'], { env: { GH_AUTH: 'token cli-secret-value' } })
    expect(r.stdout).toBe('ok /user0\n')
    expect(upstream.hits.map((h) => h.headers.authorization)).toEqual(['token cli-secret-value'])
    expect(r.stderr).not.toContain('cli-secret-value')
  }, 60_000)

  it('a missing "$env:NAME" variable is an error naming it', async () => {
    writeFileSync(join(scratch, 'missing.json'), JSON.stringify({ egress: [{ access: 'allow', host: 'a.example', override: { headers: { 'X-Key': '$env:HIVE_TEST_NOT_SET' } } }] }))
    const r = await hive(['run', '--config', join(scratch, 'missing.json'), '--', 'true'])
    expect(r.status).toBe(125)
    expect(r.stderr).toBe('hive: HIVE_INVALID_CONFIG: egress[0].override.headers.X-Key: environment variable HIVE_TEST_NOT_SET is not set\n')
  })

  it('exit codes: the command own, 128 + signal, 127 not found, 2 usage, 125 invalid config', async () => {
    expect((await hive(['run', '--', 'sh', '-c', 'exit 7'])).status).toBe(7)
    expect((await hive(['run', '--', 'sh', '-c', 'kill -TERM $$'])).status).toBe(143)
    const missing = await hive(['run', '--', 'no-such-command-here'])
    expect(missing.status).toBe(127)
    expect(missing.stderr).toMatch(/^hive: HIVE_SPAWN_FAILED: /)
    const usage = await hive(['run'])
    expect(usage.status).toBe(2)
    expect(usage.stderr).toContain('Usage: hive run')
    const bad = await hive(['run', '--allow', 'a.example:99999', '--', 'true'])
    expect(bad.status).toBe(125)
    expect(bad.stderr).toMatch(/^hive: HIVE_INVALID_CONFIG: .*egress\[0\]\.ports\[0\]: expected an integer from 1 to 65535, got 99999/)
    expect((await hive(['run', '--bogus', '--', 'true'])).status).toBe(2)
  }, 90_000)

  it('streams stdin and stdout, sets --env, mounts --mount (read-only with :ro)', async () => {
    const data = join(scratch, 'data')
    mkdirSync(data, { recursive: true })
    writeFileSync(join(data, 'in.txt'), 'from the host\n')
    const r = await hive(['run', '--env', 'GREETING=hi there', '--mount', `${data}:/data:ro`, '--', 'sh', '-c', 'cat; echo "$GREETING"; cat /data/in.txt; echo x > /data/new.txt'], { input: 'piped in\n' })
    expect(r.stdout).toBe('piped in\nhi there\nfrom the host\n')
    expect(r.stderr).toMatch(/Read-only file system|Permission denied/)
    expect(r.status).not.toBe(0)
    const rw = await hive(['run', '--mount', `${data}:/data`, '--', 'sh', '-c', 'echo written > /data/new.txt'])
    expect(rw.status).toBe(0)
    expect(readFileSync(join(data, 'new.txt'), 'utf8')).toBe('written\n')
  }, 60_000)

  it('returns when the command exits, even if it left a process holding its output open', async () => {
    const start = Date.now()
    const r = await hive(['run', '--', 'sh', '-c', 'sleep 60 & echo started'])
    expect(r).toMatchObject({ status: 0, stdout: 'started\n' })
    expect(Date.now() - start).toBeLessThan(30_000)
  }, 60_000)

  it('a temporary sandbox leaves nothing under the hive home', async () => {
    await hive(['run', '--', 'true'])
    expect((await hive(['ls', '--json'])).stdout.split('\n').filter((l) => l.includes('"run-'))).toEqual([])
  }, 60_000)
})

describe('hive events, ls, rm', () => {
  it('a named sandbox keeps its audit log: events, --json, --since, ls and rm', async () => {
    expect((await hive(['run', '--name', 'kept', '--', 'sh', '-c', 'echo one'])).stdout).toBe('one\n')
    const text = await hive(['events', 'kept'])
    expect(text.status).toBe(0)
    expect(text.stdout).toMatch(/^\S+Z 0000000000000001 sandbox\.created$/m)
    expect(text.stdout).toMatch(/ process\.start pid \d+: sh -c echo one$/m)
    const json = (await hive(['events', 'kept', '--json'])).stdout.trim().split('\n').map((l) => JSON.parse(l))
    expect(json.map((e) => e.type)).toEqual(['sandbox.created', 'config.applied', 'process.start', 'process.exit', 'sandbox.closed'])
    const since = (await hive(['events', 'kept', '--json', '--since', json[2].id])).stdout.trim().split('\n').map((l) => JSON.parse(l).type)
    expect(since).toEqual(['process.exit', 'sandbox.closed'])

    const ls = await hive(['ls'])
    expect(ls.stdout).toMatch(/^NAME +SIZE +LAST ACTIVITY$/m)
    expect(ls.stdout).toMatch(/^kept +[\d.]+ (B|KiB) +\d{4}-\d\d-\d\dT/m)

    expect((await hive(['rm', 'kept'])).status).toBe(0)
    expect((await hive(['ls'])).stdout).not.toContain('kept')
    const again = await hive(['rm', 'kept'])
    expect(again.status).toBe(125)
    expect(again.stderr).toContain('no sandbox named kept')
    expect((await hive(['events', 'nope'])).status).toBe(125)
  }, 90_000)

  it('--follow prints events another process appends', async () => {
    await hive(['run', '--name', 'followed', '--', 'true'])
    const follower = spawn(process.execPath, [bin, 'events', 'followed', '--follow'], { env: { ...process.env, HIVE_HOME: home } })
    let seen = ''
    follower.stdout.on('data', (d) => (seen += d))
    await new Promise((r) => setTimeout(r, 500))
    expect(seen).toBe('') // --follow alone starts at the end
    await hive(['run', '--name', 'followed', '--', 'sh', '-c', 'echo followed'])
    for (let i = 0; i < 50 && !seen.includes('sandbox.closed'); i++) await new Promise((r) => setTimeout(r, 100))
    follower.kill('SIGINT')
    expect(seen).toMatch(/process\.start pid \d+: sh -c echo followed/)
    expect(seen).not.toContain('0000000000000001 ')
    await hive(['rm', 'followed'])
  }, 60_000)
})

describe('--help', () => {
  it.each([[[]], [['--help']], [['run', '--help']], [['events', '--help']], [['ls', '--help']], [['rm', '--help']]])('hive %j prints usage and exits 0', async (args) => {
    const r = await hive(args)
    expect(r.status).toBe(0)
    expect(r.stdout).toMatch(/^Usage: hive/)
  })

  it('an unknown command is a usage error', async () => {
    const r = await hive(['frobnicate'])
    expect(r.status).toBe(2)
    expect(r.stderr).toContain('unknown command "frobnicate"')
  })
})
