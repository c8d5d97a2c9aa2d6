// ESM entry: the same objects as the CommonJS entry (a test compares the two lists of names).
import hive from './index.js'

export const { getOrCreateSandbox, deleteSandbox, Sandbox, EventStream, SandboxProcess } = hive
export default hive
