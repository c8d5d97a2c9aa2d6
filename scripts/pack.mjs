#!/usr/bin/env node
// Packs the npm tarballs the way a release publishes them, without touching the checkout:
//   node scripts/pack.mjs --out DIR [--node PLATFORM=FILE]... [--strip]
// 1. copies package.json, what its `files` lists, README.md and npm/ into a staging folder;
// 2. writes `optionalDependencies` on every platform package (the folders under npm/, one per
//    `napi.targets` entry, made by `napi create-npm-dirs`) at the root's version: what
//    `napi pre-publish` writes at release time, which needs every platform's binary at hand;
// 3. `npm pack`s the main package (JavaScript, types, docs, CLI, schema; no `.node`);
// 4. for each `--node PLATFORM=FILE`, puts FILE into npm/PLATFORM (stripped with `strip` first when
//    `--strip` is given: CI packs its debug build this way) and `npm pack`s that platform package.
// Prints a JSON summary: { main, platforms: { PLATFORM: { tarball, binaryBytes } } }.
import { execFileSync } from 'node:child_process'
import { cpSync, existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { dirname, join, resolve } from 'node:path'
import { fileURLToPath } from 'node:url'
import { parseArgs } from 'node:util'

const root = resolve(dirname(fileURLToPath(import.meta.url)), '..')
const { values } = parseArgs({
  options: {
    out: { type: 'string' },
    node: { type: 'string', multiple: true, default: [] },
    strip: { type: 'boolean', default: false },
  },
})
if (!values.out) {
  console.error('usage: node scripts/pack.mjs --out DIR [--node PLATFORM=FILE]... [--strip]')
  process.exit(2)
}
const out = resolve(values.out)
mkdirSync(out, { recursive: true })

const pkg = JSON.parse(readFileSync(join(root, 'package.json'), 'utf8'))
const stage = mkdtempSync(join(tmpdir(), 'hive-stage-'))
try {
  for (const entry of ['package.json', 'README.md', 'npm', ...pkg.files]) {
    // `docs/*.md` style globs: copy the top folder, npm applies the pattern when packing.
    const path = entry.split('/')[0]
    if (existsSync(join(root, path))) cpSync(join(root, path), join(stage, path), { recursive: true })
  }
  rmSync(join(stage, 'npm'), { recursive: true, force: true })
  cpSync(join(root, 'npm'), join(stage, 'npm'), {
    recursive: true,
    filter: (src) => !src.endsWith('.node'),
  })
  const optionalDependencies = {}
  for (const platform of readdirSync(join(stage, 'npm')).sort()) {
    const sub = JSON.parse(readFileSync(join(stage, 'npm', platform, 'package.json'), 'utf8'))
    if (sub.version !== pkg.version) throw new Error(`npm/${platform}: version ${sub.version}, the root is ${pkg.version} (run npx napi version)`)
    optionalDependencies[sub.name] = pkg.version
  }
  writeFileSync(join(stage, 'package.json'), `${JSON.stringify({ ...pkg, optionalDependencies }, null, 2)}\n`)

  const pack = (cwd) => JSON.parse(execFileSync('npm', ['pack', '--json', '--pack-destination', out], { cwd, encoding: 'utf8', stdio: ['ignore', 'pipe', 'inherit'] }))[0].filename
  const summary = { main: join(out, pack(stage)), platforms: {} }
  for (const spec of values.node) {
    const [platform, file] = spec.split('=')
    const dir = join(stage, 'npm', platform)
    if (!existsSync(dir) || !file) throw new Error(`--node ${spec}: expected PLATFORM=FILE with PLATFORM one of ${pkg.napi.targets.join(', ')} as a folder under npm/`)
    const binary = join(dir, `${pkg.napi.binaryName}.${platform}.node`)
    cpSync(resolve(file), binary)
    if (values.strip) execFileSync('strip', ['--strip-unneeded', binary])
    summary.platforms[platform] = { tarball: join(out, pack(dir)), binaryBytes: statSync(binary).size }
  }
  console.log(JSON.stringify(summary, null, 2))
} finally {
  rmSync(stage, { recursive: true, force: true })
}
