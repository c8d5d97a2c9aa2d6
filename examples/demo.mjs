// The offline demo of hive's main job: an agent's commands run in a sandbox whose egress follows a
// policy, with a credential injected on the way out that the agent never sees, and every decision
// streamed as an audit event. All traffic stays on this machine: "api.github.com" and
// "api.finnhub.io" are mapped to a loopback HTTPS server with `upstream.resolve`.
import { execFileSync } from 'node:child_process'
import { mkdtempSync, readFileSync, rmSync } from 'node:fs'
import https from 'node:https'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

import { deleteSandbox, getOrCreateSandbox } from '../index.js'

const scratch = mkdtempSync(join(tmpdir(), 'hive-demo-'))
process.env.HIVE_HOME ??= join(scratch, 'home')
const KEY = 'demo-secret-key-the-agent-never-sees'

// A loopback "internet": one HTTPS server, its certificate from a throwaway CA.
function testCA() {
  const run = (...args) => execFileSync('openssl', args, { cwd: scratch, stdio: 'pipe' })
  run('req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-days', '1', '-subj', '/CN=demo CA',
    '-keyout', 'ca.key', '-out', 'ca.pem', '-addext', 'basicConstraints=critical,CA:TRUE', '-addext', 'keyUsage=critical,keyCertSign')
  run('req', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-subj', '/CN=demo', '-keyout', 'leaf.key', '-out', 'leaf.csr')
  execFileSync('sh', ['-c', 'printf "subjectAltName=DNS:api.github.com,DNS:api.finnhub.io\\n" > ext.cnf'], { cwd: scratch })
  run('x509', '-req', '-in', 'leaf.csr', '-CA', 'ca.pem', '-CAkey', 'ca.key', '-CAcreateserial', '-days', '1', '-extfile', 'ext.cnf', '-out', 'leaf.pem')
  const read = (f) => readFileSync(join(scratch, f), 'utf8')
  return { ca: read('ca.pem'), cert: read('leaf.pem'), key: read('leaf.key') }
}
const pki = testCA()
const server = https.createServer({ cert: pki.cert, key: pki.key }, (req, res) => {
  const token = req.headers['x-finnhub-token']
  const body = req.url.startsWith('/api/v1/quote')
    ? JSON.stringify({ symbol: 'AAPL', price: 123.45, authorized: token === KEY })
    : 'Design for failure.'
  res.end(`${body}\n`)
})
await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve))
const upstreamAddr = `127.0.0.1:${server.address().port}`

const sandbox = await getOrCreateSandbox('demo', {
  fs: [{ backend: 'local', mount: '/workspace' }],
  egress: [
    { access: 'allow', host: 'api.github.com', methods: ['GET'] },
    { access: 'allow', host: 'api.finnhub.io', override: { headers: { 'X-Finnhub-Token': KEY } } },
  ],
  upstream: { resolve: { 'api.github.com:443': upstreamAddr, 'api.finnhub.io:443': upstreamAddr }, ca: [pki.ca] },
})

// Print the audit events as they stream, until the sandbox closes.
const printer = (async () => {
  for await (const event of sandbox.getEventsStream()) {
    const { id, type, time: _t, sandbox: _s, ...fields } = event
    console.log(`    [event ${id.replace(/^0+/, '')}] ${type} ${JSON.stringify(fields)}`)
  }
})()
const pause = () => new Promise((resolve) => setTimeout(resolve, 50))

async function run(title, command) {
  console.log(`\n$ ${title}`)
  const { exitCode, stdout, stderr } = await sandbox.exec(['sh', '-c', command])
  for (const line of `${stdout}${stderr}`.trimEnd().split('\n')) console.log(`  ${line}`)
  console.log(`  (exit ${exitCode})`)
  await pause()
}

console.log('config in force (secrets redacted):', JSON.stringify((await sandbox.getConfig()).egress))
await run('allowed: GET https://api.github.com/zen', 'curl -sS https://api.github.com/zen')
await run('denied by method: POST https://api.github.com/repos', 'curl -sS -X POST https://api.github.com/repos')
await run('denied, no rule: https://example.org (the agent gets a clear 403)', 'curl -sS -o /dev/null -w "%{http_code} %header{x-hive-denied}\\n" https://example.org/')
await run('credential injected on the way out', 'curl -sS "https://api.finnhub.io/api/v1/quote?symbol=AAPL"')
await run('...and invisible inside', 'env | grep -ci finnhub; grep -rsc demo-secret /run /etc /tmp /workspace | grep -v ":0" || echo "no trace of the key"')
await run('no way around the proxy', 'curl -sS --noproxy "*" -m 3 https://api.github.com/zen')

console.log('\ntightening the policy at runtime: applyConfig({ ...config, egress: [] })')
await sandbox.applyConfig({ ...(await sandbox.getConfig()), egress: [] })
await pause()
await run('now denied: GET https://api.github.com/zen', 'curl -sS -o /dev/null -w "%{http_code}\\n" https://api.github.com/zen')

await sandbox.close()
await printer
await deleteSandbox('demo')
server.close()
rmSync(scratch, { recursive: true, force: true })
