// The release workflow (.github/workflows/release.yml) cannot run here; this checks what can go
// wrong before it ever runs: it parses as YAML (and passes actionlint where that is installed), it
// builds and tests every target of package.json `napi.targets` (arm64 included), and it publishes
// through napi's own steps only after the tests.
import { spawnSync } from 'node:child_process'
import { readFileSync } from 'node:fs'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { load } from 'js-yaml'
import { describe, expect, it } from 'vitest'

const root = fileURLToPath(new URL('..', import.meta.url))
const file = join(root, '.github/workflows/release.yml')
const text = readFileSync(file, 'utf8')
const targets: string[] = JSON.parse(readFileSync(join(root, 'package.json'), 'utf8')).napi.targets

interface Step {
  name?: string
  run?: string
  uses?: string
  if?: string
}
interface Job {
  needs?: string[]
  strategy?: { matrix: { settings?: Record<string, string>[]; target?: string[]; node?: string[] } }
  steps: Step[]
}
const workflow = load(text) as { on: unknown; jobs: Record<string, Job> }

describe('release.yml', () => {
  it('parses, with build, test and publish jobs', () => {
    expect(Object.keys(workflow.jobs)).toEqual(['build', 'test-linux-binding', 'publish'])
    for (const [name, job] of Object.entries(workflow.jobs)) {
      expect(job.steps.length, name).toBeGreaterThan(2)
      for (const step of job.steps) expect(step.run !== undefined || step.uses !== undefined, `${name}: ${JSON.stringify(step)}`).toBe(true)
    }
  })

  it('passes actionlint, where installed', (ctx) => {
    const lint = spawnSync('actionlint', [file], { encoding: 'utf8' })
    if (lint.error) ctx.skip('actionlint is not installed (it is a Go program: go install github.com/rhysd/actionlint/cmd/actionlint@latest)')
    expect(lint.stdout + lint.stderr).toBe('')
    expect(lint.status).toBe(0)
  })

  it('builds every napi target, gnu ones against the glibc baseline', () => {
    const settings = workflow.jobs.build.strategy?.matrix.settings ?? []
    expect(settings.map((s) => s.target).sort()).toEqual([...targets].sort())
    for (const s of settings) expect(s.zig_target).toBe(s.target.endsWith('-gnu') ? `${s.target}.2.17` : s.target)
    const steps = workflow.jobs.build.steps.map((s) => s.run ?? '').join('\n')
    expect(steps).toContain('napi build --platform --release -x --target ${{ matrix.settings.zig_target }}')
    expect(steps).toContain('pip install --user ziglang')
    expect(steps).toContain("objdump -T")
  })

  it('tests every target, arm64 on an arm64 runner, musl on Alpine', () => {
    const test = workflow.jobs['test-linux-binding']
    expect(test.needs).toEqual(['build'])
    expect([...(test.strategy?.matrix.target ?? [])].sort()).toEqual([...targets].sort())
    expect(text).toContain("contains(matrix.target, 'aarch64') && 'ubuntu-24.04-arm'")
    expect(text).toContain('node:${{ matrix.node }}-alpine')
  })

  it('publishes after the tests with napi create-npm-dirs and artifacts (prepublishOnly adds the optional dependencies)', () => {
    const publish = workflow.jobs.publish
    expect(publish.needs).toEqual(['test-linux-binding'])
    const runs = publish.steps.map((s) => s.run ?? '')
    const order = ['npx napi create-npm-dirs', 'npx napi artifacts', 'npm publish --access public'].map((cmd) => runs.findIndex((r) => r.includes(cmd)))
    expect(order.every((i) => i >= 0)).toBe(true)
    expect([...order].sort((a, b) => a - b)).toEqual(order)
    expect(JSON.parse(readFileSync(join(root, 'package.json'), 'utf8')).scripts.prepublishOnly).toBe('napi pre-publish -t npm')
  })

  it('refers only to matrix keys that exist', () => {
    const keys = new Set((workflow.jobs.build.strategy?.matrix.settings ?? []).flatMap((s) => Object.keys(s)))
    for (const m of text.matchAll(/matrix\.settings\.([a-z_]+)/g)) expect(keys.has(m[1]), m[1]).toBe(true)
  })
})
