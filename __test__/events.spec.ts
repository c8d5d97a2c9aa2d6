// The event stream and the audit log (SPEC §1 getEventsStream, §3).
import { spawnSync } from 'node:child_process'
import { readFileSync } from 'node:fs'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { afterAll, describe, expect, it } from 'vitest'

import { getOrCreateSandbox, type Sandbox, type SandboxEvent } from '../index.js'
import { useTempHome } from './helpers/home.js'

const home = useTempHome()
afterAll(() => home.cleanup())

/** Reads events until `count` arrived or the stream ended. */
async function take(stream: AsyncIterable<SandboxEvent>, count: number): Promise<SandboxEvent[]> {
  const events: SandboxEvent[] = []
  if (count === 0) return events
  for await (const event of stream) {
    events.push(event)
    if (events.length === count) break
  }
  return events
}

async function applyRules(sandbox: Sandbox, n: number): Promise<void> {
  for (let i = 0; i < n; i++) await sandbox.applyConfig({ egress: [{ access: 'allow', host: `h${i}.example.com` }] })
}

describe('getEventsStream', () => {
  it('is returned synchronously and is async-iterable', async () => {
    const sandbox = await getOrCreateSandbox('sync-stream')
    const stream = sandbox.getEventsStream()
    expect(typeof stream[Symbol.asyncIterator]).toBe('function')
    expect(stream).not.toBeInstanceOf(Promise)
    await sandbox.close()
  })

  it('gives each subscriber every event from the moment it subscribed', async () => {
    const sandbox = await getOrCreateSandbox('two-subscribers')
    const a = sandbox.getEventsStream()
    const b = sandbox.getEventsStream()
    await applyRules(sandbox, 3)
    const late = sandbox.getEventsStream()
    await applyRules(sandbox, 1)
    const [fromA, fromB, fromLate] = await Promise.all([take(a, 4), take(b, 4), take(late, 1)])
    expect(fromA.map((e) => e.type)).toEqual(Array(4).fill('config.applied'))
    expect(fromB.map((e) => e.id)).toEqual(fromA.map((e) => e.id))
    expect(fromLate[0].id).toBe(fromA[3].id)
    await sandbox.close()
  })

  it('stamps events with id, type, time and sandbox, and ids are ordered', async () => {
    const sandbox = await getOrCreateSandbox('event-shape')
    const stream = sandbox.getEventsStream()
    await sandbox.applyConfig({ fs: [], egress: [{ access: 'allow', host: 'pypi.org' }, { access: 'deny', host: '*' }] })
    await applyRules(sandbox, 1)
    const [first, second] = await take(stream, 2)
    expect(first).toMatchObject({ type: 'config.applied', sandbox: 'event-shape', egressRules: 2, fsMounts: 0 })
    expect(new Date(first.time).toISOString()).toBeTruthy()
    expect(first.time).toMatch(/^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)$/)
    expect(second.id > first.id).toBe(true)
    await sandbox.close()
  })

  it('ends every stream when the sandbox is closed', async () => {
    const sandbox = await getOrCreateSandbox('ends-on-close')
    const stream = sandbox.getEventsStream()
    const drained = (async () => {
      const seen: string[] = []
      for await (const event of stream) seen.push(event.type)
      return seen
    })()
    await sandbox.close()
    expect(await drained).toEqual(['sandbox.closed'])
  })

  it('unsubscribes on break', async () => {
    const sandbox = await getOrCreateSandbox('break-unsubscribes')
    const stream = sandbox.getEventsStream()
    await applyRules(sandbox, 2)
    for await (const _event of stream) break
    const next = await stream[Symbol.asyncIterator]().next()
    expect(next.done).toBe(true)
    await sandbox.close()
  })

  it('delivers a burst larger than one batch in order and without loss', async () => {
    const sandbox = await getOrCreateSandbox('burst')
    const stream = sandbox.getEventsStream()
    // Queued natively before the first read: they cross into JS 256 at a time.
    await applyRules(sandbox, 600)
    const events = await take(stream, 600)
    expect(events.map((e) => e.type)).toEqual(Array(600).fill('config.applied'))
    const ids = events.map((e) => e.id)
    expect(new Set(ids).size).toBe(600)
    expect([...ids].sort()).toEqual(ids)
    await sandbox.close()
  })

  it('serves next() calls in order, shares one stream between its iterators, and return() ends a waiting next()', async () => {
    const sandbox = await getOrCreateSandbox('iterator-protocol')
    const stream = sandbox.getEventsStream()
    await applyRules(sandbox, 4)
    const a = stream[Symbol.asyncIterator]()
    const [first, second, third] = await Promise.all([a.next(), a.next(), a.next()])
    expect([first, second, third].map((r) => r.done)).toEqual([false, false, false])
    expect(first.value.id < second.value.id && second.value.id < third.value.id).toBe(true)
    // A second iterator of the same stream continues where the first stopped.
    const b = stream[Symbol.asyncIterator]()
    const fourth = await b.next()
    expect(fourth.value.id > third.value.id).toBe(true)
    // Nothing more is coming: this next() waits until return() ends the stream.
    const waiting = b.next()
    expect(await b.return(undefined)).toEqual({ done: true, value: undefined })
    expect(await waiting).toEqual({ done: true, value: undefined })
    expect((await a.next()).done).toBe(true)
    await sandbox.close()
  })

  it('drops the oldest events of a slow subscriber and says how many, once', async () => {
    const sandbox = await getOrCreateSandbox('slow-subscriber')
    const stream = sandbox.getEventsStream({ buffer: 5 })
    await applyRules(sandbox, 12)
    const events = await take(stream, 6)
    expect(events[0]).toMatchObject({ type: 'events.dropped', count: 7 })
    expect(events.slice(1).map((e) => e.type)).toEqual(Array(5).fill('config.applied'))
    await sandbox.close()
  })

  it('replays the persisted audit log with since: "start", then continues live', async () => {
    const sandbox = await getOrCreateSandbox('replay-start')
    await applyRules(sandbox, 2)
    await sandbox.close()
    const reopened = await getOrCreateSandbox('replay-start')
    const stream = reopened.getEventsStream({ since: 'start' })
    await applyRules(reopened, 1)
    const events = await take(stream, 8)
    expect(events.map((e) => e.type)).toEqual([
      'sandbox.created',
      'config.applied',
      'config.applied',
      'config.applied',
      'sandbox.closed',
      'sandbox.created',
      'config.applied',
      'config.applied', // live, after the replay
    ])
    const ids = events.map((e) => e.id)
    expect([...ids].sort()).toEqual(ids)
    expect(new Set(ids).size).toBe(ids.length)
    await reopened.close()
  })

  it('replays what followed a given event id', async () => {
    const sandbox = await getOrCreateSandbox('replay-since-id')
    const stream = sandbox.getEventsStream()
    await applyRules(sandbox, 3)
    const [first] = await take(stream, 1)
    const replay = sandbox.getEventsStream({ since: first.id })
    const events = await take(replay, 2)
    expect(events.every((e) => e.id > first.id)).toBe(true)
    expect(events.map((e) => e.type)).toEqual(['config.applied', 'config.applied'])
    await sandbox.close()
  })

  it('appends every event to <home>/sandboxes/<name>/audit.jsonl', async () => {
    const sandbox = await getOrCreateSandbox('audit-log')
    await applyRules(sandbox, 2)
    await sandbox.close()
    const lines = readFileSync(join(home.dir, 'sandboxes', 'audit-log', 'audit.jsonl'), 'utf8').trim().split('\n')
    const events = lines.map((line) => JSON.parse(line))
    expect(events.map((e) => e.type)).toEqual(['sandbox.created', 'config.applied', 'config.applied', 'config.applied', 'sandbox.closed'])
    expect(events.every((e) => e.sandbox === 'audit-log')).toBe(true)
  })

  it('never writes a secret to the audit log', async () => {
    const secret = 'sk-audit-SECRET-42'
    const sandbox = await getOrCreateSandbox('audit-secret', {
      egress: [{ access: 'allow', host: 'api.finnhub.io', override: { headers: { 'X-Token': secret } } }],
    })
    await sandbox.close()
    const dir = join(home.dir, 'sandboxes', 'audit-secret')
    expect(readFileSync(join(dir, 'audit.jsonl'), 'utf8')).not.toContain(secret)
  })
})

describe('process lifetime', () => {
  it('lets a script that creates a sandbox and finishes exit', () => {
    const script = `
      const { getOrCreateSandbox } = require(${JSON.stringify(fileURLToPath(new URL('../index.js', import.meta.url)))});
      (async () => {
        const sandbox = await getOrCreateSandbox('exits', { egress: [{ access: 'allow', host: 'pypi.org' }] });
        sandbox.getEventsStream();
        await sandbox.applyConfig({ egress: [] });
        console.log('done');
      })();
    `
    const started = Date.now()
    const result = spawnSync(process.execPath, ['-e', script], { env: { ...process.env, HIVE_HOME: home.dir }, timeout: 10_000, encoding: 'utf8' })
    expect(result.signal).toBeNull()
    expect(result.status).toBe(0)
    expect(result.stdout.trim()).toBe('done')
    expect(Date.now() - started).toBeLessThan(10_000)
  })
})
