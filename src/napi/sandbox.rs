//! `getOrCreateSandbox`, `deleteSandbox` and the `Sandbox` class.

use std::sync::Arc;

use napi::bindgen_prelude::*;
use napi::threadsafe_function::ThreadsafeFunction;
use napi_derive::napi;
use serde_json::Value;

use super::error::{to_napi, IntoNapi};
use super::events::{EventStream, EventsStreamOptions};
#[cfg(target_os = "linux")]
use super::process::{NativeProcess, NativeSpawnOptions};
use crate::error::HiveError;
use crate::policy::Scheme;
use crate::sandbox as core;
use crate::sandbox::DryRunRequest;

/// What the `onUnmatched` callback is given (index.js wraps the user's callback so that it always
/// returns a Promise and never throws).
#[napi(object)]
pub struct UnmatchedRequest {
    pub host: String,
    pub port: u32,
    pub method: String,
    pub path: String,
    pub scheme: String,
    pub pid: Option<i32>,
    pub command: Option<Vec<String>>,
    pub exec_id: Option<String>,
}

/// The wrapped callback: resolves to the answer as JSON. Weak: it never keeps Node alive.
type UnmatchedCallback =
    ThreadsafeFunction<UnmatchedRequest, Promise<Value>, UnmatchedRequest, Status, false, true>;

/// Returns the live sandbox of this name in this process (applying `config` to it when given), or
/// opens it: its data, CA and audit log persist under the hive home.
/// `onUnmatched` (set, replaced or, when absent, removed by every call) is asked about requests
/// no rule matches (docs/network-access.md#asking-about-unmatched-requests).
#[napi(
    ts_args_type = "name: string, config?: SandboxConfig, options?: SandboxOptions",
    ts_return_type = "Promise<Sandbox>"
)]
pub fn get_or_create_sandbox(
    env: &Env,
    name: String,
    config: Option<Value>,
    on_unmatched: Option<UnmatchedCallback>,
    on_unmatched_timeout_ms: Option<f64>,
) -> Result<PromiseRaw<'_, Sandbox>> {
    let owner = super::owner_of(env);
    let timeout = match on_unmatched_timeout_ms {
        None => None,
        Some(ms) if ms.is_finite() && ms >= 1.0 => {
            Some(std::time::Duration::from_millis(ms as u64))
        }
        Some(ms) => {
            let message = format!(
                "options.onUnmatchedTimeoutMs: expected a number of milliseconds >= 1, got {ms}"
            );
            return Err(to_napi(HiveError::InvalidArgument(message)));
        }
    };
    let ask = on_unmatched.map(|callback| -> crate::proxy::ask::AskFn {
        let callback = Arc::new(callback);
        Arc::new(move |request| {
            let callback = callback.clone();
            Box::pin(async move {
                let origin = request.origin.as_deref();
                let request = UnmatchedRequest {
                    host: request.host,
                    port: u32::from(request.port),
                    method: request.method,
                    path: request.path,
                    scheme: request.scheme.as_str().to_owned(),
                    pid: origin.map(|o| o.pid),
                    command: origin.map(|o| o.command.clone()),
                    exec_id: origin.and_then(|o| o.exec_id.as_deref().map(str::to_owned)),
                };
                let promise = callback.call_async_catch(request).await.ok()?;
                let answer = promise.await.ok()?;
                crate::proxy::ask::parse_answer(&answer)
            })
        })
    });
    env.spawn_future(async move {
        let inner = core::get_or_create_for(name, config, owner).await.napi()?;
        inner.set_on_unmatched(ask, timeout).napi()?;
        Ok(Sandbox { inner })
    })
}

/// Closes the live sandbox of this name, if any, and removes its data from the hive home.
#[napi]
pub async fn delete_sandbox(name: String) -> Result<()> {
    core::delete(name).await.napi()
}

/// A request for [`Sandbox::decide`].
#[napi(object)]
pub struct DecideRequest {
    pub host: String,
    pub port: Option<i64>,
    pub method: Option<String>,
    /// The request path, query string allowed (it is ignored).
    pub path: Option<String>,
    #[napi(ts_type = "'http' | 'https'")]
    pub scheme: Option<String>,
}

/// The outcome of [`Sandbox::decide`].
#[napi(object)]
pub struct DecisionResult {
    #[napi(ts_type = "'allowed' | 'denied'")]
    pub access: String,
    /// Index of the deciding rule, `null` when none matched.
    pub rule: Either<u32, Null>,
    /// `"rule"`, `"no-rule"`, `"method"`, `"path"`, `"port"`, `"plaintext-credentials"`, …
    pub reason: String,
    /// Present (true) when report mode allowed what the policy would deny.
    pub would_deny: Option<bool>,
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

    /// Identifies the engine-side sandbox behind this handle (the JS entry keeps one object per
    /// live sandbox with it).
    #[napi(getter)]
    pub fn instance_id(&self) -> f64 {
        self.inner.instance_id() as f64
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

    /// Decides a request against the rules in force, without sending it or emitting an event: a dry
    /// run to check a policy. `port` defaults to 443 for https and 80 for http, `method` to GET,
    /// `path` to `/`.
    #[napi]
    pub fn decide(&self, request: DecideRequest) -> Result<DecisionResult> {
        let scheme = match request.scheme.as_deref() {
            None | Some("https") => Scheme::Https,
            Some("http") => Scheme::Http,
            Some(other) => {
                let message =
                    format!("request.scheme: expected \"http\" or \"https\", got {other:?}");
                return Err(to_napi(HiveError::InvalidArgument(message)));
            }
        };
        let default_port = if scheme == Scheme::Http { 80 } else { 443 };
        let port = match request.port {
            None => default_port,
            Some(p) if (1..=65535).contains(&p) => p as u16,
            Some(p) => {
                let message = format!("request.port: expected an integer from 1 to 65535, got {p}");
                return Err(to_napi(HiveError::InvalidArgument(message)));
            }
        };
        let decision = self
            .inner
            .decide(&DryRunRequest {
                host: request.host,
                port,
                method: request.method.unwrap_or_else(|| "GET".into()),
                path: request.path.unwrap_or_else(|| "/".into()),
                scheme,
            })
            .napi()?;
        Ok(DecisionResult {
            access: decision.access.as_str().to_owned(),
            rule: decision
                .rule
                .map_or(Either::B(Null), |r| Either::A(r as u32)),
            reason: decision.reason.to_owned(),
            would_deny: decision.would_deny.then_some(true),
        })
    }

    /// An independent subscriber to the sandbox's events, from now (or replaying the audit log
    /// first with `since`). Use it with `for await`; `break` unsubscribes.
    #[napi]
    pub fn get_events_stream(&self, options: Option<EventsStreamOptions>) -> Result<EventStream> {
        EventStream::subscribe(&self.inner, options)
    }

    /// Opens a host-side loopback proxy listener for this sandbox's policy, for clients that run
    /// outside a hive sandbox. Its `url` carries a random credential; `ca` is the CA to trust.
    #[napi]
    pub async fn proxy(&self) -> Result<HostProxy> {
        let listener = self.inner.open_proxy().await.napi()?;
        Ok(HostProxy {
            inner: Arc::new(listener),
        })
    }

    /// Internal: starts a process (see `exec` / `spawn` in index.js).
    #[cfg(target_os = "linux")]
    #[napi(skip_typescript)]
    pub async fn spawn_native(
        &self,
        argv: Vec<String>,
        options: Option<NativeSpawnOptions>,
    ) -> Result<NativeProcess> {
        let (cwd, env) = match options {
            Some(o) => (
                o.cwd,
                o.env.map(|e| e.into_iter().collect()).unwrap_or_default(),
            ),
            None => (None, Vec::new()),
        };
        let spawned = self.inner.spawn(argv, env, cwd).await.napi()?;
        Ok(NativeProcess::new(spawned))
    }

    /// Usage of the whole sandbox (all its processes together), its processes and its egress
    /// totals; cheap enough to poll every second. Zero and empty before the first `exec`.
    #[cfg(target_os = "linux")]
    #[napi]
    pub async fn stats(&self) -> Result<SandboxStats> {
        let inner = self.inner.clone();
        let stats = tokio::task::spawn_blocking(move || inner.stats())
            .await
            .map_err(|e| Error::from_reason(format!("stats task failed: {e}")))?;
        Ok(SandboxStats::from(stats))
    }

    /// Stops the sandbox's processes and listeners and ends its event streams; its data stays.
    #[napi]
    pub async fn close(&self) -> Result<()> {
        self.inner.close().await;
        Ok(())
    }
}

/// The host-side proxy listener of `sandbox.proxy()`.
#[napi]
pub struct HostProxy {
    inner: Arc<crate::proxy::HostListener>,
}

#[napi]
impl HostProxy {
    /// `http://hive:<token>@127.0.0.1:<port>`: the credential keeps other local processes out.
    #[napi(getter)]
    pub fn url(&self) -> String {
        self.inner.url.clone()
    }

    /// The sandbox CA certificate (PEM) that clients must trust for HTTPS.
    #[napi(getter)]
    pub fn ca(&self) -> String {
        self.inner.ca.clone()
    }

    /// Stops accepting and drains this listener's connections. Idempotent.
    #[napi]
    pub async fn close(&self) -> Result<()> {
        self.inner.close().await;
        Ok(())
    }
}

/// What `sandbox.stats()` returns.
#[napi(object)]
pub struct SandboxStats {
    /// Memory in use by the sandbox (its cgroup's count: anonymous memory, page cache, tmpfs;
    /// without a memory cgroup, the resident memory of its live processes).
    pub memory_bytes: f64,
    /// The most `memoryBytes` has been.
    pub memory_peak_bytes: f64,
    /// CPU time in user mode, all processes together.
    pub cpu_user_ms: f64,
    /// CPU time in the kernel, all processes together.
    pub cpu_system_ms: f64,
    /// Tasks (processes and threads) counted against `limits.pids`, the sandbox's init included.
    pub pids: u32,
    /// The sandbox's processes (init excluded), by pid.
    pub processes: Vec<SandboxProcessInfo>,
    /// What the sandbox sent through hive's proxy since it was opened in this process.
    pub egress: EgressStats,
}

/// One process of [`SandboxStats`].
#[napi(object)]
pub struct SandboxProcessInfo {
    /// The pid inside the sandbox.
    pub pid: i32,
    /// Its argv.
    pub command: Vec<String>,
    /// RFC 3339 (10 ms resolution).
    pub started_at: String,
}

/// Egress totals of [`SandboxStats`].
#[napi(object)]
pub struct EgressStats {
    /// Requests decided.
    pub requests: f64,
    /// Requests denied.
    pub denied: f64,
    /// Body bytes received from upstreams.
    pub bytes_in: f64,
    /// Body bytes sent upstream.
    pub bytes_out: f64,
}

#[cfg(target_os = "linux")]
impl From<core::Stats> for SandboxStats {
    fn from(s: core::Stats) -> Self {
        let u = s.usage;
        SandboxStats {
            memory_bytes: u.memory_bytes as f64,
            memory_peak_bytes: u.memory_peak_bytes as f64,
            cpu_user_ms: u.cpu_user_ms as f64,
            cpu_system_ms: u.cpu_system_ms as f64,
            pids: u32::try_from(u.pids).unwrap_or(u32::MAX),
            processes: u
                .processes
                .into_iter()
                .map(|p| SandboxProcessInfo {
                    pid: p.pid,
                    command: p.command,
                    started_at: crate::events::format_time_ms(p.started_at_ms),
                })
                .collect(),
            egress: EgressStats {
                requests: s.egress.requests as f64,
                denied: s.egress.denied as f64,
                bytes_in: s.egress.bytes_in as f64,
                bytes_out: s.egress.bytes_out as f64,
            },
        }
    }
}
