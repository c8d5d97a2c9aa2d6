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

const { Sandbox, EventStream, HostProxy } = binding
HostProxy.prototype.close = wrapAsync(HostProxy.prototype.close)
for (const method of ['getConfig', 'applyConfig', 'close', 'proxy']) {
  Sandbox.prototype[method] = wrapAsync(Sandbox.prototype[method])
}
Sandbox.prototype.getEventsStream = wrapSync(Sandbox.prototype.getEventsStream)
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

async function getOrCreateSandbox(name, config) {
  checkName(name)
  const sandbox = await nativeGetOrCreate(name, config)
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
