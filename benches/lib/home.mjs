// The benchmarks' HIVE_HOME: the caller's when set, else a temporary one removed when the process
// exits (a proxy run writes hundreds of MB of audit log there).
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

export function benchHome() {
  if (process.env.HIVE_HOME) return process.env.HIVE_HOME
  const home = mkdtempSync(join(tmpdir(), 'hive-bench-'))
  process.env.HIVE_HOME = home
  process.on('exit', () => rmSync(home, { recursive: true, force: true }))
  return home
}
