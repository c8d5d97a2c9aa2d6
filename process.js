// sandbox.spawn / sandbox.exec (README.md#api) over the native process: stdio fds become Node streams on
// libuv (net.Socket over a pipe fd), so nothing here blocks the main thread.
'use strict'

const net = require('node:net')
const { PassThrough } = require('node:stream')

const DEFAULT_MAX_BUFFER = 16 * 1024 * 1024
// After exec kills a command, how long it still waits for output in flight before it settles: a
// process that left the command's process group (setsid) may hold the pipes open for ever.
const SETTLE_AFTER_KILL_MS = 50
const kCloseStdio = Symbol('closeStdio')

function argvOf(command) {
  if (typeof command === 'string') return ['/bin/sh', '-c', command]
  if (Array.isArray(command) && command.length > 0 && command.every((a) => typeof a === 'string')) return command
  const error = new TypeError('command: expected a string or a non-empty array of strings')
  error.code = 'HIVE_INVALID_ARGUMENT'
  throw error
}

function invalid(message) {
  const error = new TypeError(message)
  error.code = 'HIVE_INVALID_ARGUMENT'
  return error
}

function nativeOptions(options) {
  const { cwd, env } = options
  if (cwd !== undefined && typeof cwd !== 'string') throw invalid('options.cwd: expected a string')
  if (env !== undefined && (env === null || typeof env !== 'object')) throw invalid('options.env: expected an object of strings')
  const strings = env ? Object.fromEntries(Object.entries(env).map(([k, v]) => [k, String(v)])) : undefined
  return { cwd, env: strings }
}

/** A process running in a sandbox: `pid`, `stdin`, `stdout`, `stderr`, `wait()`, `kill()`. */
class SandboxProcess {
  #native = null
  #killed = null
  #sockets = []
  #started

  constructor(started) {
    this.pid = undefined
    this.execId = undefined
    this.stdin = new PassThrough()
    this.stdout = new PassThrough()
    this.stderr = new PassThrough()
    this.#started = started.then((native) => {
      this.#native = native
      this.pid = native.pid
      this.execId = native.execId
      const [stdinFd, stdoutFd, stderrFd] = native.takeStdio()
      const stdin = new net.Socket({ fd: stdinFd, readable: false, writable: true })
      stdin.on('error', () => {}) // EPIPE when the process exits without reading its input
      this.stdin.pipe(stdin)
      const stdout = new net.Socket({ fd: stdoutFd, readable: true, writable: false })
      const stderr = new net.Socket({ fd: stderrFd, readable: true, writable: false })
      stdout.pipe(this.stdout)
      stderr.pipe(this.stderr)
      this.#sockets = [stdin, stdout, stderr]
      if (this.#killed) native.kill(this.#killed)
      // Once the process ended and its output was read to the end, close the pipes and the
      // pidfd now instead of when this object is collected.
      const done = (socket) => new Promise((resolve) => socket.once('end', resolve).once('close', resolve))
      Promise.all([native.wait(), done(stdout), done(stderr)]).then(
        () => {
          for (const socket of this.#sockets) socket.destroy()
          native.release()
        },
        () => {},
      )
      return native
    })
    this.#started.catch((error) => {
      this.stdout.end()
      this.stderr.end()
      this.stdin.destroy()
      return error
    })
  }

  /** Resolves with `{ exitCode, signal }` when the process has ended. */
  async wait() {
    const native = await this.#started
    return native.wait()
  }

  /** Sends a signal (default `"SIGTERM"`) to every process of the command (its process group). */
  kill(signal = 'SIGTERM') {
    if (this.#native) this.#native.kill(String(signal))
    else this.#killed = String(signal)
  }

  /** Stops reading the pipes and ends the streams (exec, after a kill). */
  [kCloseStdio]() {
    for (const socket of this.#sockets) socket.destroy()
    this.stdout.end()
    this.stderr.end()
  }
}

function spawn(sandbox, nativeSpawn, command, options = {}) {
  const argv = argvOf(command)
  return new SandboxProcess(nativeSpawn.call(sandbox, argv, nativeOptions(options)))
}

async function exec(sandbox, nativeSpawn, command, options = {}) {
  const { stdin, timeoutMs, signal, maxBuffer = DEFAULT_MAX_BUFFER } = options
  if (timeoutMs !== undefined && !(Number.isFinite(timeoutMs) && timeoutMs > 0)) throw invalid('options.timeoutMs: expected a positive number')
  if (!(Number.isFinite(maxBuffer) && maxBuffer > 0)) throw invalid('options.maxBuffer: expected a positive number')
  if (stdin !== undefined && typeof stdin !== 'string' && !(stdin instanceof Uint8Array)) {
    throw invalid('options.stdin: expected a string or a Uint8Array')
  }
  signal?.throwIfAborted()
  const child = spawn(sandbox, nativeSpawn, command, options)
  const out = { stdout: [], stderr: [], size: 0 }
  let failure = null
  let killed = false
  const killAll = () => {
    killed = true
    child.kill('SIGKILL')
  }
  const collect = (name) => (chunk) => {
    out.size += chunk.length
    if (out.size > maxBuffer && !failure) {
      failure = Object.assign(new RangeError(`exec: output exceeded maxBuffer (${maxBuffer} bytes)`), { code: 'HIVE_MAX_BUFFER' })
      killAll()
      return
    }
    if (!failure) out[name].push(chunk)
  }
  child.stdout.on('data', collect('stdout'))
  child.stderr.on('data', collect('stderr'))
  const ended = (stream) => new Promise((resolve) => stream.once('end', resolve).once('close', resolve))
  // Listen for the ends now: output can be fully read before the exit status arrives.
  const drained = Promise.all([ended(child.stdout), ended(child.stderr)])
  child.stdin.end(stdin === undefined ? undefined : Buffer.from(stdin))

  let timedOut = false
  const timer = timeoutMs === undefined ? null : setTimeout(() => ((timedOut = true), killAll()), timeoutMs)
  const onAbort = () => {
    failure ??= signal.reason ?? Object.assign(new Error('The operation was aborted'), { name: 'AbortError', code: 'ABORT_ERR' })
    killAll()
  }
  signal?.addEventListener('abort', onAbort, { once: true })
  try {
    const status = await child.wait()
    if (killed) {
      // Everything in the command's process group died with it; keep what already arrived.
      let settle
      await Promise.race([drained, new Promise((resolve) => (settle = setTimeout(resolve, SETTLE_AFTER_KILL_MS)))])
      clearTimeout(settle)
      child[kCloseStdio]()
    } else {
      await drained
    }
    if (failure) throw failure
    const result = {
      exitCode: status.exitCode,
      signal: status.signal,
      stdout: Buffer.concat(out.stdout).toString('utf8'),
      stderr: Buffer.concat(out.stderr).toString('utf8'),
      execId: child.execId,
    }
    if (timedOut) result.timedOut = true
    return result
  } finally {
    if (timer) clearTimeout(timer)
    signal?.removeEventListener('abort', onAbort)
  }
}

module.exports = { SandboxProcess, spawn, exec }
