// ESM entry: the same objects as the CommonJS entry.
import hive from './index.js'

export const { getOrCreateSandbox, deleteSandbox, Sandbox, EventStream } = hive
export default hive
