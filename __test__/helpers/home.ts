// A fresh hive home per test file, removed afterwards.
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

export function useTempHome(): { dir: string; cleanup: () => void } {
  const dir = mkdtempSync(join(tmpdir(), 'hive-test-'))
  process.env.HIVE_HOME = dir
  return { dir, cleanup: () => rmSync(dir, { recursive: true, force: true }) }
}

/** Asserts a promise rejects with a hive error of this code; returns the error. */
export async function rejection(promise: Promise<unknown>): Promise<Error & { code?: string; issues?: { path: string; message: string }[] }> {
  try {
    await promise
  } catch (error) {
    return error as Error & { code?: string }
  }
  throw new Error('expected a rejection')
}
