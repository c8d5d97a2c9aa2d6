// The offline demo: an agent's policy, some requests decided against it, and the audit events.
// Everything stays on this machine.
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

import { deleteSandbox, getOrCreateSandbox } from '../index.js'

process.env.HIVE_HOME ??= mkdtempSync(join(tmpdir(), 'hive-demo-'))
const KEY = 'demo-key-never-shown'

const sandbox = await getOrCreateSandbox('demo', {
  egress: [
    { access: 'deny', host: 'api.github.com', paths: ['/admin/**'] },
    { access: 'allow', host: 'api.github.com', methods: ['GET'] },
    { access: 'allow', host: 'api.finnhub.io', override: { headers: { 'X-Finnhub-Token': KEY } } },
    { access: 'allow', host: '*.pypi.org', ports: [443] },
  ],
})

// Print events as they stream, until the sandbox closes.
const printer = (async () => {
  for await (const event of sandbox.getEventsStream({ since: 'start' })) {
    const { id, type, time, sandbox: _name, ...fields } = event
    console.log(`event ${id} ${type.padEnd(15)} ${JSON.stringify(fields)}`)
  }
})()

console.log('config in force (secrets redacted):')
console.log(JSON.stringify((await sandbox.getConfig()).egress, null, 2))

const requests = [
  { host: 'api.github.com', method: 'GET', path: '/zen' },
  { host: 'api.github.com', method: 'POST', path: '/repos' },
  { host: 'api.github.com', method: 'GET', path: '/v1/../admin/users' },
  { host: 'api.finnhub.io', path: '/api/v1/quote?symbol=AAPL' },
  { host: 'api.finnhub.io', scheme: 'http', path: '/api/v1/quote' },
  { host: 'files.pypi.org', path: '/packages/x.whl' },
  { host: 'evilpypi.org', path: '/' },
]
console.log('\ndecisions:')
for (const request of requests) {
  const { access, rule, reason } = sandbox.decide(request)
  const url = `${request.scheme ?? 'https'}://${request.host}${request.path}`
  console.log(`  ${(request.method ?? 'GET').padEnd(4)} ${url.padEnd(50)} ${access.padEnd(7)} rule=${rule} ${reason}`)
}

console.log('\ntightening the policy at runtime:')
await sandbox.applyConfig({ ...(await sandbox.getConfig()), egress: [] })
console.log(`  GET https://api.github.com/zen -> ${sandbox.decide({ host: 'api.github.com', path: '/zen' }).access}`)

console.log('\naudit events:')
await sandbox.close()
await printer
await deleteSandbox('demo')
if (process.env.HIVE_HOME.includes('hive-demo-')) rmSync(process.env.HIVE_HOME, { recursive: true, force: true })
