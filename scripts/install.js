// `npm install` hook: builds the addon from source in a checkout (debug, as the tests use), and does
// nothing where a prebuilt binary is present (an installed package, or HIVE_SKIP_BUILD=1).
'use strict'
const { existsSync, readdirSync } = require('node:fs')
const { join } = require('node:path')
const { spawnSync } = require('node:child_process')

const root = join(__dirname, '..')
const prebuilt = readdirSync(root).some((f) => /^hive\..*\.node$/.test(f))
if (process.env.HIVE_SKIP_BUILD === '1' || prebuilt || !existsSync(join(root, 'Cargo.toml'))) process.exit(0)

const napi = join(root, 'node_modules', '.bin', 'napi')
if (!existsSync(napi)) {
  console.error('hive: no prebuilt binary for this platform and no @napi-rs/cli to build one')
  process.exit(1)
}
const args = ['build', '--platform', '--js', 'binding.js', '--dts', 'index.d.ts']
if (process.env.HIVE_BUILD_RELEASE === '1') args.push('--release')
const result = spawnSync(napi, args, { cwd: root, stdio: 'inherit' })
process.exit(result.status ?? 1)
