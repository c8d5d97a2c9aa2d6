//! The native half of `sandbox.exec` / `sandbox.spawn`: a spawned process as raw stdio fds (which
//! `index.js` turns into Node streams on libuv, so the main thread never blocks on them), `wait()`
//! and `kill()`. Not public API: `index.js` builds `SandboxProcess` and `exec` on top of it.

use std::collections::HashMap;
use std::os::fd::IntoRawFd;
use std::sync::Arc;

use napi::bindgen_prelude::*;
use napi_derive::napi;

use super::error::IntoNapi;
use crate::sandbox::Spawned;

/// Options the JS layer passes down.
#[napi(object)]
pub struct NativeSpawnOptions {
    pub cwd: Option<String>,
    pub env: Option<HashMap<String, String>>,
}

/// How a process ended.
#[napi(object)]
pub struct NativeExit {
    pub exit_code: Either<i32, Null>,
    pub signal: Either<String, Null>,
}

/// A spawned process. Internal: use `sandbox.spawn()` / `sandbox.exec()`.
#[napi]
pub struct NativeProcess {
    spawned: Arc<Spawned>,
    stdio: parking_lot::Mutex<Option<[i32; 3]>>,
}

impl NativeProcess {
    pub(super) fn new(spawned: Spawned) -> Self {
        let stdio = spawned
            .take_stdio()
            .map(|[i, o, e]| [i.into_raw_fd(), o.into_raw_fd(), e.into_raw_fd()]);
        NativeProcess {
            spawned: Arc::new(spawned),
            stdio: parking_lot::Mutex::new(stdio),
        }
    }
}

#[napi]
impl NativeProcess {
    /// The pid inside the sandbox.
    #[napi(getter)]
    pub fn pid(&self) -> i32 {
        self.spawned.pid()
    }

    /// The exec id its events carry (`execId`).
    #[napi(getter)]
    pub fn exec_id(&self) -> String {
        self.spawned.exec_id().to_owned()
    }

    /// `[stdin, stdout, stderr]` fds, handed over once: the caller owns (and closes) them.
    #[napi]
    pub fn take_stdio(&self) -> Option<Vec<i32>> {
        self.stdio.lock().take().map(Vec::from)
    }

    /// Resolves when the process has ended.
    #[napi]
    pub async fn wait(&self) -> Result<NativeExit> {
        let status = self.spawned.wait().await.napi()?;
        Ok(NativeExit {
            exit_code: status.code.map_or(Either::B(Null), Either::A),
            signal: status.signal.map_or(Either::B(Null), |s| {
                Either::A(crate::sandbox::signal_name(s))
            }),
        })
    }

    /// Once the process ended and its output was read to the end: closes its pidfd now rather
    /// than when this object is collected. A no-op before the process ended.
    #[napi]
    pub fn release(&self) {
        self.spawned.release();
    }

    /// Sends a signal (`"SIGTERM"` by default); a process that already ended is not an error.
    #[napi]
    pub fn kill(&self, signal: Option<String>) -> Result<()> {
        self.spawned
            .kill(signal.as_deref().unwrap_or("SIGTERM"))
            .napi()
    }
}
