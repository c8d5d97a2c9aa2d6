// Bad input (SPEC §5): every malformed config rejects with HIVE_INVALID_CONFIG and an issue at the
// right field path; every problem is reported at once; a secret is never echoed.
import { readFileSync } from 'node:fs'
import { afterAll, describe, expect, it } from 'vitest'

import { getOrCreateSandbox } from '../index.js'
import { rejection, useTempHome } from './helpers/home.js'

const home = useTempHome()
afterAll(() => home.cleanup())

interface Fixture {
  name: string
  config: unknown
  path: string
}
const fixtures: Fixture[] = JSON.parse(readFileSync(new URL('./fixtures/invalid-configs.json', import.meta.url), 'utf8'))

describe('malformed configs', () => {
  it('has at least 25 fixtures', () => {
    expect(fixtures.length).toBeGreaterThanOrEqual(25)
  })

  for (const fixture of fixtures) {
    it(`rejects ${fixture.name} at ${fixture.path}`, async () => {
      const error = await rejection(getOrCreateSandbox('fixtures', fixture.config as never))
      expect(error.code).toBe('HIVE_INVALID_CONFIG')
      expect(error.issues!.map((issue) => issue.path)).toContain(fixture.path)
      expect(error.message).toContain(fixture.path)
    })
  }

  it('reports every problem at once, each with its path', async () => {
    const error = await rejection(
      getOrCreateSandbox('fixtures', {
        egress: [
          { access: 'allow', host: 'api.github.com', ports: [70000] },
          { access: 'maybe', host: 'pypi.org' },
          { access: 'allow', host: 'api.*.com' },
        ],
      } as never),
    )
    expect(error.issues!.map((issue) => issue.path)).toEqual(['egress[0].ports[0]', 'egress[1].access', 'egress[2].host'])
    expect(error.message).toContain('70000')
  })

  it('never echoes a secret, even in a header value that is itself invalid', async () => {
    const secret = 'sk-live-7f3a9c1e5b'
    const error = await rejection(
      getOrCreateSandbox('fixtures', {
        egress: [{ access: 'allow', host: 'api.finnhub.io', override: { headers: { 'X-Token': `${secret}\r\nX-Evil: 1` } } }],
      }),
    )
    expect(error.code).toBe('HIVE_INVALID_CONFIG')
    expect(error.issues!.map((issue) => issue.path)).toEqual(['egress[0].override.headers["X-Token"]'])
    expect(error.message).not.toContain(secret)
    expect(JSON.stringify(error.issues)).not.toContain(secret)
    expect(String(error.stack)).not.toContain(secret)
  })

  it('accepts every form the SPEC shows', async () => {
    const sandbox = await getOrCreateSandbox('spec-example', {
      fs: [{ backend: 'local', mount: '/workspace', acls: [{ path: '/workspace/**', access: 'rw' }] }],
      egress: [
        { access: 'allow', host: 'api.anthropic.com' },
        { access: 'allow', host: 'pypi.org', ports: [443] },
        { access: 'allow', host: 'api.github.com', methods: ['GET', 'POST'] },
        { access: 'allow', host: 'api.example.com', paths: ['/v1/*'] },
        { access: 'allow', host: 'api.finnhub.io', override: { headers: { 'X-Finnhub-Token': 'key' } } },
        { access: 'deny', host: '10.0.0.0/8' },
        { access: 'deny', host: '2001:db8::/32' },
        { access: 'allow', host: '*.pypi.org' },
        { access: 'allow', host: '*' },
      ],
    })
    expect((await sandbox.getConfig()).egress).toHaveLength(9)
    await sandbox.close()
  })
})
