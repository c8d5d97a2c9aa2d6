#!/usr/bin/env node
// The `hive` command (docs/cli.md): plain JavaScript over the package's public API, so a sandbox
// run from a shell is the same engine, policy and audit log as one run from a program.
'use strict'

const { createReadStream, existsSync, readdirSync, readFileSync, statSync } = require('node:fs')
const { constants, homedir } = require('node:os')
const { dirname, isAbsolute, join, resolve } = require('node:path')
const { parseArgs } = require('node:util')

// Exit codes of hive itself; a command run by `hive run` exits with its own code (or 128 + signal).
const EXIT_USAGE = 2
const EXIT_ERROR = 125

const HELP = {
  main: `Usage: hive <command> [options]

Run commands in a local Linux sandbox whose network egress and file access follow a policy.

Commands:
  run      run a command in a sandbox
  events   print a sandbox's audit log
  ls       list the sandboxes under the hive home
  rm       remove a sandbox and its data

hive <command> --help shows a command's options. Docs: docs/cli.md in the package.`,
  run: `Usage: hive run [options] -- COMMAND [ARGS...]

Runs COMMAND in a sandbox, streams its stdin, stdout and stderr, and exits with its exit code
(128 + the signal number if a signal ended it). Prints one line per denied request to stderr.

Options:
  --config FILE         a SandboxConfig JSON file; "$env:NAME" strings are read from the environment
  --allow HOST[:PORT]   allow a host (and only that port), after the config file's rules; repeatable
  --mount SRC:DST[:ro]  mount host folder SRC at DST inside (read-only with :ro); repeatable
  --name NAME           the sandbox's name: its audit log and data stay under the hive home
                        (default: a temporary sandbox, removed when the command ends)
  --env K=V             set an environment variable inside; repeatable
  --verbose             print every egress decision, not only denials
  -h, --help            show this help

Exit codes: the command's own; 2 for a usage error; 125 when hive itself fails (the message says
which HIVE_* error); 127 when the command cannot be found.`,
  events: `Usage: hive events NAME [--follow] [--since start|ID] [--json]

Prints a sandbox's audit log (<hive home>/sandboxes/NAME/audit.jsonl), one line per event.

Options:
  --since start|ID  start after this event id (default: start, the whole log; with --follow: now)
  --follow, -f      keep printing events as they are appended (also across rotation)
  --json            print each event as its JSON line
  -h, --help        show this help`,
  ls: `Usage: hive ls [--json]

Lists the sandboxes under the hive home with the size of their data and their last activity.

Options:
  --json      one JSON object per sandbox
  -h, --help  show this help`,
  rm: `Usage: hive rm NAME...

Removes sandboxes and their data (audit log, CA, the data of their local mounts under the hive home).
Host folders mounted with a source are not touched.

Options:
  -h, --help  show this help`,
}

class UsageError extends Error {}

function hiveHome() {
  const env = (key) => (process.env[key] ? process.env[key] : undefined)
  if (env('HIVE_HOME')) return env('HIVE_HOME')
  if (env('XDG_DATA_HOME')) return join(env('XDG_DATA_HOME'), 'hive')
  return join(env('HOME') || homedir(), '.local', 'share', 'hive')
}

function parse(command, argv, options) {
  try {
    return parseArgs({ args: argv, options: { ...options, help: { type: 'boolean', short: 'h' } }, allowPositionals: true, strict: true })
  } catch (error) {
    throw new UsageError(`${error.message}\n\n${HELP[command]}`)
  }
}

function configError(message) {
  const error = new Error(message)
  error.code = 'HIVE_INVALID_CONFIG'
  return error
}

// Replaces every string "$env:NAME" with that environment variable; names every missing one.
function resolveEnv(value, path, missing) {
  if (typeof value === 'string') {
    const match = /^\$env:(.*)$/.exec(value)
    if (!match) return value
    const name = match[1]
    if (process.env[name] === undefined) missing.push(`${path || '(config)'}: environment variable ${name} is not set`)
    return process.env[name]
  }
  if (Array.isArray(value)) return value.map((v, i) => resolveEnv(v, `${path}[${i}]`, missing))
  if (value && typeof value === 'object') {
    return Object.fromEntries(Object.entries(value).map(([k, v]) => [k, resolveEnv(v, path ? `${path}.${k}` : k, missing)]))
  }
  return value
}

function readConfig(file) {
  let text
  try {
    text = readFileSync(file, 'utf8')
  } catch (error) {
    throw configError(`${file}: cannot read it (${error.code || error.message})`)
  }
  let config
  try {
    config = JSON.parse(text)
  } catch (error) {
    throw configError(`${file}: not valid JSON: ${error.message}`)
  }
  if (!config || typeof config !== 'object' || Array.isArray(config)) throw configError(`${file}: expected a JSON object (a SandboxConfig)`)
  // `$schema` lets editors validate the file (package file schema/sandbox-config.schema.json); hive ignores it.
  delete config.$schema
  const missing = []
  config = resolveEnv(config, '', missing)
  if (missing.length > 0) throw configError(missing.join('; '))
  // A relative mount source is relative to the config file, as a user reading the file expects.
  if (Array.isArray(config.fs)) {
    const base = dirname(resolve(file))
    for (const mount of config.fs) {
      if (mount && typeof mount.source === 'string' && !isAbsolute(mount.source)) mount.source = resolve(base, mount.source)
    }
  }
  return config
}

function parseAllow(spec) {
  // HOST, HOST:PORT, [IPv6]:PORT; an IPv6 literal or CIDR without brackets has no port.
  let host = spec
  let port
  const bracketed = /^\[([^\]]+)\](?::(\d+))?$/.exec(spec)
  if (bracketed) {
    host = bracketed[1]
    port = bracketed[2]
  } else if (spec.split(':').length === 2) {
    ;[host, port] = spec.split(':')
  }
  if (!host) throw new UsageError(`--allow ${spec}: expected HOST or HOST:PORT`)
  const rule = { access: 'allow', host }
  if (port !== undefined) {
    if (!/^\d+$/.test(port)) throw new UsageError(`--allow ${spec}: the port must be a number`)
    rule.ports = [Number(port)]
  }
  return rule
}

function parseMount(spec) {
  const parts = spec.split(':')
  const ro = parts.length === 3 && parts[2] === 'ro'
  if (!(parts.length === 2 || ro) || !parts[0] || !parts[1]) throw new UsageError(`--mount ${spec}: expected SRC:DST or SRC:DST:ro`)
  const [source, mount] = parts
  if (!isAbsolute(mount)) throw new UsageError(`--mount ${spec}: DST must be an absolute path inside the sandbox`)
  const entry = { backend: 'local', mount, source: resolve(source) }
  if (ro) entry.acls = [{ path: `${mount.replace(/\/+$/, '')}/**`, access: 'r' }]
  return entry
}

function parseEnv(spec) {
  const at = spec.indexOf('=')
  if (at <= 0) throw new UsageError(`--env ${spec}: expected K=V`)
  return [spec.slice(0, at), spec.slice(at + 1)]
}

const REASONS = { 'no-rule': 'no rule', 'plaintext-credentials': 'credentials over plain HTTP', 'private-address': 'private address', 'host-mismatch': 'host mismatch' }

// `hive: denied GET github.com/path (no rule)`: one line per decision, for stderr.
function describeRequest(e) {
  const defaultPort = (e.scheme === 'https' && e.port === 443) || (e.scheme === 'http' && e.port === 80)
  const where = `${e.host}${defaultPort ? '' : `:${e.port}`}`
  const what = e.scheme === 'tcp' ? `tcp ${where}` : `${e.method} ${where}${e.path}`
  let why = REASONS[e.reason] || e.reason
  if (e.rule !== null && e.rule !== undefined) why = `${why}, rule ${e.rule}`
  return `hive: ${e.access} ${what} (${why})`
}

async function run(argv) {
  const { values, positionals } = parse('run', argv, {
    config: { type: 'string' },
    allow: { type: 'string', multiple: true, default: [] },
    mount: { type: 'string', multiple: true, default: [] },
    name: { type: 'string' },
    env: { type: 'string', multiple: true, default: [] },
    verbose: { type: 'boolean', default: false },
  })
  if (values.help) return help('run')
  if (positionals.length === 0) throw new UsageError(`hive run needs a command after --\n\n${HELP.run}`)
  const config = values.config ? readConfig(values.config) : {}
  const allows = values.allow.map(parseAllow)
  if (allows.length > 0) config.egress = [...(Array.isArray(config.egress) ? config.egress : []), ...allows]
  const mounts = values.mount.map(parseMount)
  if (mounts.length > 0) config.fs = [...(Array.isArray(config.fs) ? config.fs : []), ...mounts]
  const env = Object.fromEntries(values.env.map(parseEnv))

  const hive = require('../index.js')
  const temporary = values.name === undefined
  const name = temporary ? `run-${process.pid}-${Date.now().toString(36)}` : values.name
  const sandbox = await hive.getOrCreateSandbox(name, config)
  try {
    // Subscribe before the command starts, so no decision is missed.
    const events = sandbox.getEventsStream()
    const deniedNames = new Set()
    const printed = (async () => {
      for await (const e of events) {
        if (e.type === 'egress.request' && (values.verbose || e.access === 'denied')) process.stderr.write(`${describeRequest(e)}\n`)
        else if (e.type === 'fs.denied') process.stderr.write(`hive: denied ${e.operation} ${e.path} (file access)\n`)
        else if (e.type === 'dns.query') {
          // A name no rule could allow never resolves; say so once per name (A and AAAA both ask).
          const name = e.host ?? e.name
          if (values.verbose) process.stderr.write(`hive: dns ${e.access} ${name} ${e.qtype}\n`)
          else if (e.access === 'denied' && !deniedNames.has(name)) process.stderr.write(`hive: denied dns ${name} (no rule)\n`)
          if (e.access === 'denied') deniedNames.add(name)
        }
        else if (e.type === 'sandbox.warning') process.stderr.write(`hive: warning: ${e.message}\n`)
      }
    })()
    const child = sandbox.spawn(positionals, { env })
    process.stdin.pipe(child.stdin)
    child.stdout.pipe(process.stdout)
    child.stderr.pipe(process.stderr)
    const forward = (signal) => child.kill(signal)
    for (const signal of ['SIGINT', 'SIGTERM', 'SIGHUP']) process.on(signal, forward)
    const streamsDone = Promise.all([child.stdout, child.stderr].map((s) => new Promise((r) => s.once('end', r).once('close', r))))
    const { exitCode, signal } = await child.wait()
    // A process it left running in the background may hold the pipes open: give the output a
    // moment to drain, then closing the sandbox stops that process and ends the pipes.
    await Promise.race([streamsDone, new Promise((r) => setTimeout(r, 1000).unref())])
    process.stdin.unpipe(child.stdin)
    process.stdin.destroy()
    for (const s of ['SIGINT', 'SIGTERM', 'SIGHUP']) process.off(s, forward)
    await sandbox.close() // ends the event stream once it has delivered what was emitted
    await Promise.all([printed, streamsDone])
    return exitCode ?? 128 + (constants.signals[signal] || 0)
  } finally {
    if (temporary) await hive.deleteSandbox(name)
    else if (!sandbox.closed) await sandbox.close()
  }
}

function formatEvent(e) {
  const { id, type, time } = e
  let detail
  switch (type) {
    case 'egress.request':
      detail = describeRequest(e).replace(/^hive: /, '')
      break
    case 'egress.response':
      detail = `${e.status} for ${e.requestId}, ${e.bytesIn} bytes in, ${e.bytesOut} out, ${e.durationMs} ms`
      break
    case 'process.start':
      detail = `pid ${e.pid}: ${e.command.join(' ')}`
      break
    case 'process.exit':
      detail = `pid ${e.pid}: ${e.signal ? e.signal : `exit ${e.exitCode}`}`
      break
    case 'dns.query':
      detail = `${e.access} ${e.name ?? e.host} ${e.qtype}`
      break
    case 'fs.denied':
    case 'fs.access':
      detail = `${e.operation} ${e.path}${e.newPath ? ` -> ${e.newPath}` : ''}`
      break
    default: {
      const rest = { ...e }
      for (const k of ['id', 'type', 'time', 'sandbox']) delete rest[k]
      detail = Object.keys(rest).length > 0 ? JSON.stringify(rest) : ''
    }
  }
  return `${time} ${id} ${type} ${detail}`.trimEnd()
}

function sandboxDir(name) {
  if (!/^[A-Za-z0-9_][A-Za-z0-9._-]{0,62}$/.test(name)) {
    const error = new Error(`sandbox name must be 1-63 characters of [A-Za-z0-9._-], not starting with . or -; got ${JSON.stringify(name)}`)
    error.code = 'HIVE_INVALID_NAME'
    throw error
  }
  return join(hiveHome(), 'sandboxes', name)
}

function noSuchSandbox(name) {
  const error = new Error(`no sandbox named ${name} under ${hiveHome()}`)
  error.code = 'HIVE_INVALID_ARGUMENT'
  return error
}

// Reads whole JSON lines from `file` starting at byte `offset`; returns the new offset.
async function readLines(file, offset, onEvent) {
  if (!existsSync(file)) return offset
  const size = statSync(file).size
  if (size <= offset) return offset
  let pending = ''
  let consumed = offset
  for await (const chunk of createReadStream(file, { start: offset, end: size - 1, encoding: 'utf8' })) {
    pending += chunk
    let newline
    while ((newline = pending.indexOf('\n')) >= 0) {
      const line = pending.slice(0, newline)
      pending = pending.slice(newline + 1)
      consumed += Buffer.byteLength(line) + 1
      try {
        onEvent(JSON.parse(line), line)
      } catch {
        // A line that is not JSON (a torn write) is skipped, as replay does.
      }
    }
  }
  return consumed
}

async function events(argv) {
  const { values, positionals } = parse('events', argv, {
    follow: { type: 'boolean', short: 'f', default: false },
    since: { type: 'string' },
    json: { type: 'boolean', default: false },
  })
  if (values.help) return help('events')
  if (positionals.length !== 1) throw new UsageError(`hive events needs one sandbox name\n\n${HELP.events}`)
  const dir = sandboxDir(positionals[0])
  if (!existsSync(dir)) throw noSuchSandbox(positionals[0])
  const log = join(dir, 'audit.jsonl')
  const rotated = join(dir, 'audit.jsonl.1')
  const since = values.since ?? (values.follow ? 'now' : 'start')
  let last = since === 'start' || since === 'now' ? '' : since
  const print = (event, line) => {
    if (typeof event.id !== 'string' || event.id <= last) return
    last = event.id
    process.stdout.write(`${values.json ? line : formatEvent(event)}\n`)
  }
  let offset = 0
  if (since === 'now') {
    offset = existsSync(log) ? statSync(log).size : 0
  } else {
    await readLines(rotated, 0, print)
    offset = await readLines(log, 0, print)
  }
  if (!values.follow) return 0
  let inode = existsSync(log) ? statSync(log).ino : 0
  const stop = new Promise((r) => {
    process.once('SIGINT', r)
    process.once('SIGTERM', r)
  })
  for (;;) {
    const tick = new Promise((r) => setTimeout(r, 200, 'tick'))
    if ((await Promise.race([tick, stop])) !== 'tick') return 0
    const now = existsSync(log) ? statSync(log) : null
    if (now && (now.ino !== inode || now.size < offset)) {
      // Rotated: finish the old file (now audit.jsonl.1), then read the new one from its start.
      await readLines(rotated, offset, print)
      inode = now.ino
      offset = 0
    }
    offset = await readLines(log, offset, print)
  }
}

function sizeOf(path) {
  const st = statSync(path, { throwIfNoEntry: false })
  if (!st) return 0
  if (!st.isDirectory()) return st.size
  return readdirSync(path).reduce((sum, entry) => sum + sizeOf(join(path, entry)), 0)
}

function lastActivity(dir) {
  const times = ['audit.jsonl', '.'].map((f) => statSync(join(dir, f), { throwIfNoEntry: false })).filter(Boolean)
  return new Date(Math.max(...times.map((s) => s.mtimeMs)))
}

function human(bytes) {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB']
  let i = 0
  while (bytes >= 1024 && i < units.length - 1) {
    bytes /= 1024
    i += 1
  }
  return `${i === 0 ? bytes : bytes.toFixed(1)} ${units[i]}`
}

function ls(argv) {
  const { values, positionals } = parse('ls', argv, { json: { type: 'boolean', default: false } })
  if (values.help) return help('ls')
  if (positionals.length > 0) throw new UsageError(`hive ls takes no arguments\n\n${HELP.ls}`)
  const root = join(hiveHome(), 'sandboxes')
  const names = existsSync(root) ? readdirSync(root).filter((n) => statSync(join(root, n)).isDirectory()).sort() : []
  const rows = names.map((name) => ({ name, bytes: sizeOf(join(root, name)), lastActivity: lastActivity(join(root, name)).toISOString() }))
  if (values.json) {
    for (const row of rows) process.stdout.write(`${JSON.stringify(row)}\n`)
    return 0
  }
  const table = [['NAME', 'SIZE', 'LAST ACTIVITY'], ...rows.map((r) => [r.name, human(r.bytes), r.lastActivity])]
  const widths = table[0].map((_, c) => Math.max(...table.map((row) => row[c].length)))
  for (const row of table) process.stdout.write(`${row.map((cell, c) => cell.padEnd(widths[c])).join('  ').trimEnd()}\n`)
  return 0
}

async function rm(argv) {
  const { values, positionals } = parse('rm', argv, {})
  if (values.help) return help('rm')
  if (positionals.length === 0) throw new UsageError(`hive rm needs a sandbox name\n\n${HELP.rm}`)
  for (const name of positionals) if (!existsSync(sandboxDir(name))) throw noSuchSandbox(name)
  const hive = require('../index.js')
  for (const name of positionals) await hive.deleteSandbox(name)
  return 0
}

function help(command) {
  process.stdout.write(`${HELP[command]}\n`)
  return 0
}

const COMMANDS = { run, events, ls, rm }

async function main(argv) {
  const [command, ...rest] = argv
  if (command === undefined || command === '-h' || command === '--help' || command === 'help') return help('main')
  const handler = COMMANDS[command]
  if (!handler) throw new UsageError(`unknown command ${JSON.stringify(command)}\n\n${HELP.main}`)
  return handler(rest)
}

main(process.argv.slice(2)).then(
  (code) => {
    process.exitCode = code
  },
  (error) => {
    if (error instanceof UsageError) {
      process.stderr.write(`hive: ${error.message}\n`)
      process.exitCode = EXIT_USAGE
      return
    }
    const code = error && error.code
    process.stderr.write(`hive: ${code ? `${code}: ` : ''}${error && error.message}\n`)
    process.exitCode = code === 'HIVE_SPAWN_FAILED' ? 127 : EXIT_ERROR
  },
)
