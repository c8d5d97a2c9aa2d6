//! `getOrCreateSandbox`, `deleteSandbox` and the `Sandbox` class.

use std::sync::Arc;

use napi::bindgen_prelude::*;
use napi_derive::napi;
use serde_json::Value;

use super::error::IntoNapi;
use super::events::{EventStream, EventsStreamOptions};
use crate::sandbox as core;

/// Returns the live sandbox of this name in this process (applying `config` to it when given), or
/// opens it: its data, CA and audit log persist under the hive home.
#[napi(ts_args_type = "name: string, config?: SandboxConfig")]
pub async fn get_or_create_sandbox(name: String, config: Option<Value>) -> Result<Sandbox> {
    let inner = core::get_or_create(name, config).await.napi()?;
    Ok(Sandbox { inner })
}

/// Closes the live sandbox of this name, if any, and removes its data from the hive home.
#[napi]
pub async fn delete_sandbox(name: String) -> Result<()> {
    core::delete(name).await.napi()
}

/// A sandbox: its policy, its event stream and (on Linux) its processes.
#[napi]
pub struct Sandbox {
    inner: Arc<core::Sandbox>,
}

#[napi]
impl Sandbox {
    /// The sandbox's name.
    #[napi(getter)]
    pub fn name(&self) -> String {
        self.inner.name().to_owned()
    }

    /// Whether `close()` has been called.
    #[napi(getter)]
    pub fn closed(&self) -> bool {
        self.inner.is_closed()
    }

    /// The sandbox CA certificate (PEM) that clients of its proxy trust. The key never leaves Rust.
    #[napi(getter)]
    pub fn ca_certificate(&self) -> String {
        self.inner.ca().cert_pem().to_owned()
    }

    /// The config in force: normalized, deep-copied, override header values as `"[redacted]"`.
    #[napi(ts_return_type = "Promise<SandboxConfig>")]
    pub async fn get_config(&self) -> Result<Value> {
        Ok(self.inner.config_json())
    }

    /// Validates the whole config (nothing changes on error), then swaps it in atomically.
    #[napi(ts_args_type = "config: SandboxConfig")]
    pub async fn apply_config(&self, config: Value) -> Result<()> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || inner.apply_config(&config))
            .await
            .map_err(|e| Error::from_reason(format!("applyConfig task failed: {e}")))?
            .napi()
    }

    /// An independent subscriber to the sandbox's events, from now (or replaying the audit log
    /// first with `since`). Use it with `for await`; `break` unsubscribes.
    #[napi]
    pub fn get_events_stream(&self, options: Option<EventsStreamOptions>) -> Result<EventStream> {
        EventStream::subscribe(&self.inner, options)
    }

    /// Stops the sandbox's processes and listeners and ends its event streams; its data stays.
    #[napi]
    pub async fn close(&self) -> Result<()> {
        self.inner.close().await;
        Ok(())
    }
}
