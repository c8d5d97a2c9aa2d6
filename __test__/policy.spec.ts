// The rule engine through the public API (SPEC §2), with sandbox.decide(): a dry run that sends
// nothing. The full table of cases lives in the Rust unit tests of src/policy.
import { afterAll, beforeAll, describe, expect, it } from 'vitest'

import { getOrCreateSandbox, type Sandbox } from '../index.js'
import { useTempHome } from './helpers/home.js'

const home = useTempHome()
let sandbox: Sandbox
beforeAll(async () => {
  sandbox = await getOrCreateSandbox('policy', {
    egress: [
      { access: 'deny', host: 'api.github.com', paths: ['/admin/**'] },
      { access: 'allow', host: 'api.github.com', methods: ['GET', 'POST'] },
      { access: 'allow', host: 'pypi.org', ports: [443] },
      { access: 'allow', host: '*.pythonhosted.org' },
      { access: 'allow', host: 'api.example.com', paths: ['/v1/*'] },
      { access: 'allow', host: 'api.finnhub.io', override: { headers: { 'X-Finnhub-Token': 'k' } } },
      { access: 'allow', host: '10.1.0.0/16' },
    ],
  })
})
afterAll(async () => {
  await sandbox.close()
  home.cleanup()
})

const cases: [string, Parameters<Sandbox['decide']>[0], string, number | null, string][] = [
  // [what, request, access, rule, reason]
  ['an allowed GET', { host: 'api.github.com', path: '/zen' }, 'allowed', 1, 'rule'],
  ['host case and trailing dot', { host: 'API.GITHUB.COM.', path: '/zen' }, 'allowed', 1, 'rule'],
  ['a method the rule does not list', { host: 'api.github.com', method: 'delete' }, 'denied', 1, 'method'],
  ['method case', { host: 'api.github.com', method: 'post' }, 'allowed', 1, 'rule'],
  ['deny before allow', { host: 'api.github.com', path: '/admin/users' }, 'denied', 0, 'rule'],
  ['dot segments cannot dodge a deny', { host: 'api.github.com', path: '/v1/../admin/x' }, 'denied', 0, 'rule'],
  ['encoded dot segments cannot dodge a deny', { host: 'api.github.com', path: '/v1/%2e%2e/admin/x' }, 'denied', 0, 'rule'],
  ['a suffix attack on an exact host', { host: 'api.github.com.evil.com' }, 'denied', null, 'no-rule'],
  ['the port a rule names', { host: 'pypi.org', port: 443 }, 'allowed', 2, 'rule'],
  ['another port', { host: 'pypi.org', port: 8443 }, 'denied', 2, 'port'],
  ['a wildcard apex', { host: 'pythonhosted.org' }, 'allowed', 3, 'rule'],
  ['a wildcard subdomain at depth', { host: 'a.b.files.pythonhosted.org' }, 'allowed', 3, 'rule'],
  ['a look-alike of a wildcard', { host: 'evilpythonhosted.org' }, 'denied', null, 'no-rule'],
  ['a path glob within one segment', { host: 'api.example.com', path: '/v1/models?x=1' }, 'allowed', 4, 'rule'],
  ['a path glob does not cross segments', { host: 'api.example.com', path: '/v1/a/b' }, 'denied', 4, 'path'],
  ['credentials over TLS', { host: 'api.finnhub.io', path: '/api/v1/quote' }, 'allowed', 5, 'rule'],
  ['credentials over plain HTTP', { host: 'api.finnhub.io', scheme: 'http' }, 'denied', 5, 'plaintext-credentials'],
  ['an address in a CIDR rule', { host: '10.1.2.3', scheme: 'http' }, 'allowed', 6, 'rule'],
  ['an address outside it', { host: '10.2.0.1', scheme: 'http' }, 'denied', null, 'no-rule'],
  ['an unknown host (default deny)', { host: 'example.org' }, 'denied', null, 'no-rule'],
]

describe('decide', () => {
  for (const [what, request, access, rule, reason] of cases) {
    it(`${what}: ${access}`, () => {
      expect(sandbox.decide(request)).toEqual({ access, rule, reason })
    })
  }

  it('follows applyConfig at once', async () => {
    const other = await getOrCreateSandbox('policy-swap', { egress: [{ access: 'allow', host: '*' }] })
    expect(other.decide({ host: 'example.org' }).access).toBe('allowed')
    await other.applyConfig({ egress: [] })
    expect(other.decide({ host: 'example.org' })).toEqual({ access: 'denied', rule: null, reason: 'no-rule' })
    await other.close()
  })

  it('rejects a malformed request with HIVE_INVALID_ARGUMENT', () => {
    expect(() => sandbox.decide({ host: 'not a host' })).toThrow(expect.objectContaining({ code: 'HIVE_INVALID_ARGUMENT' }))
  })
})
