// A throwaway CA and a leaf for `hosts`, made with openssl, for the benchmarks' loopback HTTPS
// upstreams: `{ caPem, certPem (leaf + CA), keyPem }`.
import { execFileSync } from 'node:child_process'
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

export function makeCA(...hosts) {
  const dir = mkdtempSync(join(tmpdir(), 'hive-bench-ca-'))
  const run = (...args) => execFileSync('openssl', args, { cwd: dir, stdio: 'pipe' })
  try {
    run('req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-days', '2',
      '-subj', '/CN=hive bench CA', '-keyout', 'ca.key', '-out', 'ca.pem',
      '-addext', 'basicConstraints=critical,CA:TRUE', '-addext', 'keyUsage=critical,keyCertSign,cRLSign')
    run('req', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-subj', '/CN=bench',
      '-keyout', 'leaf.key', '-out', 'leaf.csr')
    const names = hosts.map((h) => `DNS:${h}`).join(',')
    writeFileSync(join(dir, 'ext.cnf'), `subjectAltName=${names}\nextendedKeyUsage=serverAuth\n`)
    run('x509', '-req', '-in', 'leaf.csr', '-CA', 'ca.pem', '-CAkey', 'ca.key', '-CAcreateserial', '-days', '2',
      '-extfile', 'ext.cnf', '-out', 'leaf.pem')
    const read = (f) => readFileSync(join(dir, f), 'utf8')
    return { caPem: read('ca.pem'), certPem: read('leaf.pem') + read('ca.pem'), keyPem: read('leaf.key') }
  } finally {
    rmSync(dir, { recursive: true, force: true })
  }
}
