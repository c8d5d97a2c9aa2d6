// The package entry: the native binding (binding.js, generated) plus the little that napi cannot
// express. Engine errors arrive encoded in the message (see src/napi/error.rs); here they become
// Errors with an exact `code` and, for config errors, `issues`.
'use strict'

const processes = require('./process.js')

const MARKER = '\u0001hive-error:'

function hiveError(code, message, issues) {
  const error = new Error(message)
  error.code = code
  if (issues && issues.length > 0) error.issues = issues
  return error
}

// The platforms a prebuilt binary is published for (package.json `napi.targets`), as
// `<platform>-<arch>-<libc>`; each is the optional dependency `hive-<that>`.
const SUPPORTED = ['linux-x64-gnu', 'linux-arm64-gnu', 'linux-x64-musl', 'linux-arm64-musl']

function libcOf() {
  if (process.platform !== 'linux') return 'none'
  const { glibcVersionRuntime } = process.report.getReport().header
  return glibcVersionRuntime ? 'gnu' : 'musl'
}

// The generated loader (binding.js) ends with napi's generic advice about an npm bug, also where no
// binary exists for this platform at all; say which case this is (README.md#requirements).
function loadBinding() {
  try {
    return require('./binding.js')
  } catch (cause) {
    const libc = libcOf()
    const target = `${process.platform}-${process.arch}-${libc}`
    const libcName = { gnu: 'glibc', musl: 'musl', none: 'no Linux libc' }[libc]
    const error = SUPPORTED.includes(target)
      ? hiveError(
          'HIVE_BINDING_NOT_FOUND',
          `hive's native binary for ${target} did not load: install the optional dependency hive-${target} (npm installs it unless optional dependencies are omitted)`,
        )
      : hiveError(
          'HIVE_UNSUPPORTED_PLATFORM',
          `hive has no native binary for platform ${process.platform}, arch ${process.arch}, libc ${libcName}; supported: ${SUPPORTED.join(', ')}`,
        )
    error.cause = cause
    throw error
  }
}

const binding = loadBinding()

function decode(error) {
  if (error && typeof error.message === 'string' && error.message.startsWith(MARKER)) {
    try {
      const { code, message, issues } = JSON.parse(error.message.slice(MARKER.length))
      const decoded = hiveError(code, message, issues)
      decoded.stack = `${decoded.name}: ${message}\n${(error.stack || '').split('\n').slice(1).join('\n')}`
      return decoded
    } catch {
      return error
    }
  }
  return error
}

function wrapAsync(fn) {
  return function (...args) {
    try {
      return fn.apply(this, args).catch((error) => {
        throw decode(error)
      })
    } catch (error) {
      return Promise.reject(decode(error))
    }
  }
}

function wrapSync(fn) {
  return function (...args) {
    try {
      return fn.apply(this, args)
    } catch (error) {
      throw decode(error)
    }
  }
}

// A config as the engine can take it: a copy made only of JSON values (plain objects, arrays,
// strings, finite numbers, booleans, null), or a HIVE_INVALID_CONFIG listing every value that is
// none of these, with its path. napi would otherwise reject some of them with an error that has no
// code (NaN, BigInt, a getter that throws, a cycle) and silently drop others (an `undefined`
// header value, from an unset environment variable). Paths are written as the engine writes them.
function toPlainConfig(config) {
  if (config === undefined) return undefined
  const issues = []
  const ancestors = new Set()
  const isIdentifier = (key) => /^[A-Za-z_$][A-Za-z0-9_$]*$/.test(key)
  const keyPath = (parent, key, data) =>
    !data && isIdentifier(key) ? (parent ? `${parent}.${key}` : key) : `${parent}[${JSON.stringify(key)}]`
  // Keys of these objects are data (header names, "host:port"), not field names.
  const isDataMap = (path) => /^egress\[\d+\]\.override\.headers$/.test(path) || path === 'upstream.resolve'
  const isHeaderValue = (path) => /^egress\[\d+\]\.override\.headers\[/.test(path)
  const typeOf = (value) => {
    if (value === null) return 'null'
    if (typeof value === 'bigint') return 'a BigInt'
    if (typeof value === 'function') return 'a function'
    if (typeof value === 'symbol') return 'a symbol'
    if (typeof value === 'number') return String(value)
    return typeof value
  }
  const walk = (value, path) => {
    switch (typeof value) {
      case 'string':
      case 'boolean':
        return value
      case 'number':
        if (Number.isFinite(value)) return value
        issues.push({ path, message: `expected a finite number, got ${typeOf(value)}` })
        return undefined
      case 'undefined':
        issues.push({
          path,
          message: isHeaderValue(path)
            ? 'expected a string, got undefined (is the environment variable set?)'
            : 'expected a value, got undefined',
        })
        return undefined
      case 'object':
        break
      default:
        issues.push({ path, message: `expected a JSON value (object, array, string, number, boolean or null), got ${typeOf(value)}` })
        return undefined
    }
    if (value === null) return null
    if (ancestors.has(value)) {
      issues.push({ path, message: 'refers back to an object that contains it (a cycle); pass a tree of plain values' })
      return undefined
    }
    const isArray = Array.isArray(value)
    const proto = Object.getPrototypeOf(value)
    if (!isArray && proto !== Object.prototype && proto !== null) {
      const name = (proto && proto.constructor && proto.constructor.name) || 'object'
      issues.push({ path, message: `expected a plain object, got ${name === 'Object' ? 'an object with a custom prototype' : `a ${name}`}` })
      return undefined
    }
    ancestors.add(value)
    try {
      if (isArray) {
        const out = []
        for (let i = 0; i < value.length; i++) {
          const itemPath = `${path}[${i}]`
          let item
          try {
            item = value[i]
          } catch {
            issues.push({ path: itemPath, message: 'reading it threw an error' })
            continue
          }
          out.push(walk(item, itemPath))
        }
        return out
      }
      const out = {}
      const dataKeys = isDataMap(path)
      for (const key of Object.keys(value)) {
        const childPath = keyPath(path, key, dataKeys)
        let item
        try {
          item = value[key]
        } catch {
          issues.push({ path: childPath, message: 'reading it threw an error (a getter that throws?)' })
          continue
        }
        // An absent optional field may be written as `undefined` (`{ ...rule, ports: undefined }`);
        // a header value may not: it would silently drop the credential.
        if (item === undefined && !isHeaderValue(childPath)) continue
        out[key] = walk(item, childPath)
      }
      return out
    } catch {
      issues.push({ path, message: 'cannot be read (a revoked Proxy?)' })
      return undefined
    } finally {
      ancestors.delete(value)
    }
  }
  const plain = walk(config, '')
  if (issues.length > 0) {
    const where = (issue) => (issue.path ? `${issue.path}: ${issue.message}` : `config: ${issue.message}`)
    throw hiveError('HIVE_INVALID_CONFIG', `invalid sandbox config: ${issues.map(where).join('; ')}`, issues)
  }
  return plain
}

// `const { url, ca, close } = await sandbox.proxy()` must work: `close` is bound to its listener.
function bindProxy(proxy) {
  proxy.close = HostProxy.prototype.close.bind(proxy)
  return proxy
}

const { Sandbox, EventStream, HostProxy } = binding
HostProxy.prototype.close = wrapAsync(HostProxy.prototype.close)
for (const method of ['getConfig', 'applyConfig', 'close', 'proxy']) {
  Sandbox.prototype[method] = wrapAsync(Sandbox.prototype[method])
}
const nativeApplyConfig = Sandbox.prototype.applyConfig
Sandbox.prototype.applyConfig = async function (config) {
  return nativeApplyConfig.call(this, toPlainConfig(config))
}
const nativeProxy = Sandbox.prototype.proxy
Sandbox.prototype.proxy = async function () {
  return bindProxy(await nativeProxy.call(this))
}
const nativeGetEventsStream = wrapSync(Sandbox.prototype.getEventsStream)
Sandbox.prototype.getEventsStream = function (options) {
  const stream = nativeGetEventsStream.call(this, options)
  // napi puts its generator on each instance, not on the prototype.
  Object.defineProperty(stream, Symbol.asyncIterator, { value: batchedEvents, configurable: true, writable: true })
  return stream
}
// Events cross from Rust in batches, each the text of a JSON array, instead of one promise and one
// object built property by property per event (the native generator napi declares): a subscriber
// keeps up with a busy proxy. The batch belongs to the stream, so every iterator of one stream
// reads the same sequence as before; calls to next() are served in order; return() ends the stream
// at once, also while a next() waits. A next() that finds an event of the batch ready, with no
// earlier call still waiting, hands it over at once: a subscriber that keeps up takes nearly every
// event that way, without the promises of the queue.
const BATCH = Symbol('hive.eventBatch')
function batchedEvents() {
  const stream = this
  const state = (stream[BATCH] ??= { events: [], at: 0, ended: false, queue: Promise.resolve(), waiting: 0 })
  const settled = () => {
    state.waiting--
  }
  const done = { done: true, value: undefined }
  const pull = async () => {
    while (state.at >= state.events.length) {
      if (state.ended) return done
      const text = await stream.nextBatch()
      if (state.ended) return done
      if (text === null) {
        state.ended = true
        return done
      }
      state.events = JSON.parse(text)
      state.at = 0
    }
    const value = state.events[state.at]
    state.events[state.at++] = undefined
    return { done: false, value }
  }
  const end = () => {
    state.ended = true
    state.events = []
    state.at = 0
    stream.unsubscribe()
  }
  return {
    next() {
      if (state.waiting === 0 && state.at < state.events.length) {
        const value = state.events[state.at]
        state.events[state.at++] = undefined
        return Promise.resolve({ done: false, value })
      }
      state.waiting++
      const result = state.queue.then(pull)
      state.queue = result.then(settled, settled)
      return result
    },
    async return(value) {
      end()
      return { done: true, value }
    },
    async throw(error) {
      end()
      throw error
    },
    [Symbol.asyncIterator]() {
      return this
    },
  }
}
Sandbox.prototype.decide = wrapSync(Sandbox.prototype.decide)
const asyncDispose = Symbol.asyncDispose ?? Symbol.for('nodejs.asyncDispose')
Sandbox.prototype[asyncDispose] = function () {
  return this.close()
}
const nativeSpawn =
  process.platform === 'linux'
    ? wrapAsync(Sandbox.prototype.spawnNative)
    : () => Promise.reject(hiveError('HIVE_UNSUPPORTED_PLATFORM', `exec and spawn need Linux; this is ${process.platform}`))
Sandbox.prototype.spawn = function (command, options) {
  return processes.spawn(this, nativeSpawn, command, options)
}
Sandbox.prototype.exec = function (command, options) {
  return processes.exec(this, nativeSpawn, command, options)
}
const nativeClose = Sandbox.prototype.close
Sandbox.prototype.close = async function () {
  await nativeClose.call(this)
  if (live.get(this.name) === this) live.delete(this.name)
}

function checkName(name) {
  if (typeof name !== 'string') {
    throw hiveError('HIVE_INVALID_NAME', `sandbox name must be a string, got ${name === null ? 'null' : typeof name}`)
  }
}

const nativeGetOrCreate = wrapAsync(binding.getOrCreateSandbox)
const nativeDelete = wrapAsync(binding.deleteSandbox)

// The same live sandbox object per name within a process (README.md#api): the native call returns a new
// wrapper each time, so keep the first wrapper of each live engine-side sandbox.
const live = new Map()

// `onUnmatched` as the native side calls it: always a Promise, never a throw; the answer reduced to
// plain JSON (anything else becomes null, which the native side treats as a denial).
function wrapOnUnmatched(onUnmatched) {
  const plain = (answer) => {
    if (typeof answer === 'string') return answer
    if (answer !== null && typeof answer === 'object') {
      const out = { access: answer.access }
      if (answer.remember !== undefined) out.remember = answer.remember
      return typeof out.access === 'string' && (out.remember === undefined || typeof out.remember === 'string') ? out : null
    }
    return null
  }
  return (request) => {
    try {
      return Promise.resolve(onUnmatched(request)).then(plain, () => null)
    } catch {
      return Promise.resolve(null)
    }
  }
}

async function getOrCreateSandbox(name, config, options) {
  checkName(name)
  if (options !== undefined && (options === null || typeof options !== 'object')) {
    throw hiveError('HIVE_INVALID_ARGUMENT', 'options: expected an object such as { onUnmatched }')
  }
  const { onUnmatched, onUnmatchedTimeoutMs } = options ?? {}
  if (onUnmatched !== undefined && typeof onUnmatched !== 'function') {
    throw hiveError('HIVE_INVALID_ARGUMENT', 'options.onUnmatched: expected an async function (request) => "allow" | "deny" | { access, remember }')
  }
  if (onUnmatchedTimeoutMs !== undefined && !(Number.isFinite(onUnmatchedTimeoutMs) && onUnmatchedTimeoutMs >= 1)) {
    throw hiveError('HIVE_INVALID_ARGUMENT', 'options.onUnmatchedTimeoutMs: expected a number of milliseconds >= 1')
  }
  const sandbox = await nativeGetOrCreate(
    name,
    toPlainConfig(config),
    onUnmatched === undefined ? undefined : wrapOnUnmatched(onUnmatched),
    onUnmatchedTimeoutMs,
  )
  const known = live.get(name)
  if (known && !known.closed && known.instanceId === sandbox.instanceId) return known
  live.set(name, sandbox)
  return sandbox
}

async function deleteSandbox(name) {
  checkName(name)
  await nativeDelete(name)
  live.delete(name)
}

module.exports.getOrCreateSandbox = getOrCreateSandbox
module.exports.deleteSandbox = deleteSandbox
module.exports.Sandbox = Sandbox
module.exports.EventStream = EventStream
module.exports.SandboxProcess = processes.SandboxProcess
