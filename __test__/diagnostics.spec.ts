// Diagnostics (issue 2 §6): tracing is off by default, HIVE_LOG turns it on, on stderr, and no
// level ever prints a secret.
import { spawnSync } from 'node:child_process'
import { afterAll, describe, expect, it } from 'vitest'
import { fileURLToPath } from 'node:url'

import { useTempHome } from './helpers/home.js'

const home = useTempHome()
afterAll(() => home.cleanup())

const entry = fileURLToPath(new URL('../index.js', import.meta.url))
const SECRET = 'sk-trace-SECRET-31337'
const script = `
  const { getOrCreateSandbox } = require(${JSON.stringify(entry)});
  (async () => {
    const sandbox = await getOrCreateSandbox('traced', {
      egress: [{ access: 'allow', host: 'api.finnhub.io', override: { headers: { 'X-Token': ${JSON.stringify(SECRET)} } } }],
    });
    await sandbox.applyConfig({ ...(await sandbox.getConfig()), egress: [] });
    await sandbox.applyConfig({ egress: [{ access: 'allow', host: 'x.example', override: { headers: { 'X-Token': ${JSON.stringify(SECRET)} } } }] });
    await sandbox.close();
  })();
`

function run(log: string | undefined) {
  const env: NodeJS.ProcessEnv = { ...process.env, HIVE_HOME: home.dir }
  delete env.HIVE_LOG
  if (log !== undefined) env.HIVE_LOG = log
  return spawnSync(process.execPath, ['-e', script], { env, encoding: 'utf8', timeout: 20_000 })
}

describe('HIVE_LOG', () => {
  it('is silent by default', () => {
    const result = run(undefined)
    expect(result.status).toBe(0)
    expect(result.stderr).toBe('')
  })

  it('writes diagnostics to stderr at trace level without a secret', () => {
    const result = run('trace')
    expect(result.status).toBe(0)
    expect(result.stderr).toMatch(/config\.applied/)
    expect(result.stderr).not.toContain(SECRET)
    expect(result.stdout).not.toContain(SECRET)
  })
})
