import { defineConfig } from 'vitest/config'

export default defineConfig({
  test: {
    include: ['__test__/**/*.spec.ts'],
    // Each file in its own process: the addon keeps a per-process sandbox registry.
    pool: 'forks',
    testTimeout: 30_000,
    hookTimeout: 30_000,
    // The machine has 2 cores; sandboxes, proxies and upstreams share them.
    maxWorkers: 2,
  },
})
