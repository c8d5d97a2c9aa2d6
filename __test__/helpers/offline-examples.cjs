// Preloaded (node --require) when a test runs the docs' examples: keeps their traffic on this
// machine. Every exact host an example's egress rules name is mapped with `upstream.resolve`
// (ports 443 and 80) to the loopback HTTPS upstream the test started, and its test CA is added with
// `upstream.ca`. Nothing else changes: the engine, the proxy, the policy and the sandbox are real,
// and a host no rule names is never mapped (it is denied before any lookup).
'use strict'
const { readFileSync } = require('node:fs')
const hive = require('../../index.js')

const addr = process.env.HIVE_EXAMPLES_UPSTREAM
const ca = readFileSync(process.env.HIVE_EXAMPLES_CA, 'utf8')

function offline(config) {
  if (!config || config.upstream) return config
  const resolve = {}
  for (const rule of config.egress || []) {
    if (/^[a-z0-9.-]+$/i.test(rule.host)) {
      resolve[`${rule.host}:443`] = addr
      resolve[`${rule.host}:80`] = addr
    }
  }
  return { ...config, upstream: { resolve, ca: [ca] } }
}

const getOrCreateSandbox = hive.getOrCreateSandbox
hive.getOrCreateSandbox = (name, config) => getOrCreateSandbox(name, offline(config))
const applyConfig = hive.Sandbox.prototype.applyConfig
hive.Sandbox.prototype.applyConfig = function (config) {
  return applyConfig.call(this, offline(config))
}
