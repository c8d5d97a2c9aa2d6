//! Sandboxes: the per-name registry, the hive home on disk, and each sandbox's lifecycle.
//!
//! 1. [`get_or_create`] validates the name and config first (nothing is created for bad input),
//!    then returns the live sandbox of that name in this process, applying the config to it
//!    (declarative: re-running a script with tighter rules never leaves looser ones in force), or
//!    opens a new one: its folder `<hive home>/sandboxes/<name>/`, its CA and its audit log.
//! 2. [`Sandbox::apply_config`] validates, then swaps the compiled policy atomically and emits
//!    `config.applied`.
//! 3. [`Sandbox::close`] ends event streams and stops everything the sandbox runs; its data stays.
//!    [`delete`] also removes the folder.

mod home;
#[cfg(target_os = "linux")]
pub mod linux;
mod name;
#[cfg(target_os = "linux")]
mod runtime;

pub use home::hive_home;
pub use name::validate_name;
#[cfg(target_os = "linux")]
pub use runtime::{signal_name, Spawned};

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};

use arc_swap::ArcSwap;
use serde_json::{json, Map, Value};

use crate::config::normalize_host;
use crate::config::Config;
use crate::error::{HiveError, Result};
use crate::events::{kind, EventBus, Since, Subscription};
use crate::policy::{Compiled, Decision, PolicyCell, Request, Scheme};
use crate::proxy::{Engine, HostListener};
use crate::tls::CertificateAuthority;

/// One sandbox, shared by every handle to it within this process.
pub struct Sandbox {
    name: String,
    dir: PathBuf,
    cell: Arc<PolicyCell>,
    events: Arc<EventBus>,
    ca: Arc<CertificateAuthority>,
    engine: Arc<Engine>,
    /// The namespaces and their processes, started by the first spawn.
    #[cfg(target_os = "linux")]
    runtime: tokio::sync::Mutex<Option<runtime::Runtime>>,
    /// Serializes `applyConfig` calls so `config.applied` events follow the order of the swaps.
    apply_lock: parking_lot::Mutex<()>,
    closed: AtomicBool,
    instance: u64,
}

static NEXT_INSTANCE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

impl std::fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sandbox")
            .field("name", &self.name)
            .field("dir", &self.dir)
            .field("closed", &self.is_closed())
            .finish_non_exhaustive()
    }
}

/// What `stats()` returns.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    /// Memory, CPU, tasks and processes of the whole sandbox.
    #[cfg(target_os = "linux")]
    pub usage: linux::limits::Usage,
    /// Egress totals since the sandbox was opened in this process.
    pub egress: crate::events::EgressTotals,
}

/// A request to decide without sending it ([`Sandbox::decide`]).
#[derive(Debug, Clone)]
pub struct DryRunRequest {
    pub host: String,
    pub port: u16,
    pub method: String,
    pub path: String,
    pub scheme: Scheme,
}

/// Live sandboxes of this process, by name.
static REGISTRY: LazyLock<tokio::sync::Mutex<HashMap<String, Arc<Sandbox>>>> =
    LazyLock::new(Default::default);

/// `getOrCreateSandbox(name, config?)` (README.md#api). Blocking file work runs off the async workers.
pub async fn get_or_create(name: String, config: Option<Value>) -> Result<Arc<Sandbox>> {
    validate_name(&name)?;
    let config = config.map(|value| Config::from_json(&value)).transpose()?;
    let mut registry = REGISTRY.lock().await;
    if let Some(live) = registry.get(&name).filter(|sandbox| !sandbox.is_closed()) {
        let live = live.clone();
        drop(registry);
        if let Some(config) = config {
            let sandbox = live.clone();
            blocking(move || sandbox.swap_config(config)).await?;
        }
        return Ok(live);
    }
    let home = hive_home()?;
    let sandbox = blocking(move || Sandbox::open(name, &home, config.unwrap_or_default())).await?;
    registry.insert(sandbox.name.clone(), sandbox.clone());
    Ok(sandbox)
}

/// `deleteSandbox(name)`: closes the live sandbox of that name, if any, and removes its data.
pub async fn delete(name: String) -> Result<()> {
    validate_name(&name)?;
    let live = REGISTRY.lock().await.remove(&name);
    if let Some(sandbox) = live {
        sandbox.close().await;
    }
    let dir = sandbox_dir(&hive_home()?, &name);
    blocking(move || match std::fs::remove_dir_all(&dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(HiveError::io(format!("removing {}", dir.display()), e)),
    })
    .await
}

/// Closes every live sandbox (process exit).
pub fn close_all() {
    let sandboxes: Vec<_> = match REGISTRY.try_lock() {
        Ok(mut registry) => registry.drain().map(|(_, s)| s).collect(),
        Err(_) => return,
    };
    for sandbox in sandboxes {
        sandbox.close_now();
    }
}

fn sandbox_dir(home: &Path, name: &str) -> PathBuf {
    home.join("sandboxes").join(name)
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| HiveError::Internal(format!("background task failed: {e}")))?
}

impl Sandbox {
    /// Opens (creating on first use) the sandbox's folder, CA and audit log, then applies `config`.
    fn open(name: String, home: &Path, config: Config) -> Result<Arc<Sandbox>> {
        let dir = sandbox_dir(home, &name);
        home::create_private_dir(&dir)?;
        let events = EventBus::open(&name, &dir)?;
        let ca = Arc::new(CertificateAuthority::load_or_create(&dir, &name)?);
        let cell = Arc::new(ArcSwap::from_pointee(Compiled::new(Config::default())));
        let engine = Engine::new(name.clone(), cell.clone(), events.clone(), ca.clone());
        let sandbox = Arc::new(Sandbox {
            cell,
            engine,
            #[cfg(target_os = "linux")]
            runtime: tokio::sync::Mutex::new(None),
            name,
            dir,
            events,
            ca,
            apply_lock: parking_lot::Mutex::new(()),
            closed: AtomicBool::new(false),
            instance: NEXT_INSTANCE.fetch_add(1, Ordering::Relaxed),
        });
        sandbox.emit(kind::SANDBOX_CREATED, Map::new());
        sandbox.swap_config(config)?;
        Ok(sandbox)
    }

    /// Unique per sandbox opened in this process.
    pub fn instance_id(&self) -> u64 {
        self.instance
    }

    /// The sandbox's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The sandbox's folder under the hive home.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The config in force, normalized, secrets redacted (`getConfig()`).
    pub fn config_json(&self) -> Value {
        self.cell.load().config.to_json()
    }

    /// What is in force, shared with the proxy.
    pub fn policy_cell(&self) -> &Arc<PolicyCell> {
        &self.cell
    }

    /// The event bus.
    pub fn events(&self) -> &Arc<EventBus> {
        &self.events
    }

    /// The sandbox CA.
    pub fn ca(&self) -> &Arc<CertificateAuthority> {
        &self.ca
    }

    /// `applyConfig`: validates the whole config (nothing changes on error), then swaps it in.
    pub fn apply_config(&self, value: &Value) -> Result<()> {
        let config = Config::from_json(value)?;
        self.swap_config(config)
    }

    fn swap_config(&self, config: Config) -> Result<()> {
        self.ensure_open()?;
        let _order = self.apply_lock.lock();
        #[cfg(target_os = "linux")]
        self.stop_if_mounts_changed(&config.fs);
        #[cfg(target_os = "linux")]
        self.update_limits(&config.limits);
        let (egress_rules, fs_mounts) = (config.egress.len(), config.fs.len());
        #[cfg(target_os = "linux")]
        let capture_ports = runtime::capture_ports(&config);
        self.cell.store(Arc::new(Compiled::new(config)));
        #[cfg(target_os = "linux")]
        self.sync_capture_ports(&capture_ports);
        let mut fields = Map::new();
        fields.insert("egressRules".into(), json!(egress_rules));
        fields.insert("fsMounts".into(), json!(fs_mounts));
        self.emit(kind::CONFIG_APPLIED, fields);
        Ok(())
    }

    /// Decides a request against the rules in force without sending anything or emitting an event
    /// (a dry run for tests, demos and policy reviews).
    pub fn decide(&self, request: &DryRunRequest) -> Result<Decision> {
        let host = normalize_host(&request.host).ok_or_else(|| {
            HiveError::InvalidArgument(format!(
                "request.host: {:?} is not a hostname or IP address",
                request.host
            ))
        })?;
        let compiled = self.cell.load();
        Ok(compiled.policy.decide(&Request {
            host: &host,
            port: request.port,
            method: &request.method,
            path: &request.path,
            scheme: request.scheme,
            ip: host.parse().ok(),
        }))
    }

    /// A new event subscriber (`getEventsStream`). Does no file I/O.
    pub fn subscribe(&self, since: Since, buffer: usize) -> Result<Subscription> {
        self.events.subscribe(since, buffer)
    }

    /// Emits one event on this sandbox's bus.
    pub fn emit(&self, kind: &str, fields: Map<String, Value>) {
        self.events.emit(kind, fields);
    }

    /// Whether `close()` has run.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    fn ensure_open(&self) -> Result<()> {
        if self.is_closed() {
            return Err(HiveError::SandboxClosed(self.name.clone()));
        }
        Ok(())
    }

    /// Runs a command in the sandbox, starting its namespaces on first use (docs/processes.md).
    #[cfg(target_os = "linux")]
    pub async fn spawn(
        &self,
        argv: Vec<String>,
        env: Vec<(String, String)>,
        cwd: Option<String>,
    ) -> Result<Spawned> {
        self.ensure_open()?;
        let mut slot = self.runtime.lock().await;
        self.ensure_open()?;
        let fs = self.cell.load().config.fs.clone();
        if slot.as_ref().is_some_and(|running| running.fs != fs) {
            if let Some(stale) = slot.take() {
                blocking(move || {
                    stale.stop();
                    Ok(())
                })
                .await?;
            }
        }
        let runtime = match slot.as_mut() {
            Some(runtime) => runtime,
            None => {
                let (name, dir, ca_pem, mounts) = (
                    self.name.clone(),
                    self.dir.clone(),
                    self.ca.cert_pem().to_owned(),
                    fs.clone(),
                );
                let ports = runtime::capture_ports(&self.cell.load().config);
                let limits = self.cell.load().config.limits.clone();
                let wanted = ports.clone();
                let events = self.events.clone();
                let (host, handover, servers) = blocking(move || {
                    let spec = runtime::launch_spec(&name, &dir, &mounts, &ca_pem, ports)?;
                    let (host, mut handover) = linux::SandboxHost::start_with_limits(spec, limits)?;
                    let fuse = std::mem::take(&mut handover.fuse);
                    match runtime::serve_fuse(&dir, &mounts, fuse, &events) {
                        Ok(servers) => Ok((host, handover, servers)),
                        Err(e) => {
                            host.close();
                            Err(e)
                        }
                    }
                })
                .await?;
                self.engine.serve_sandbox_listener(handover.proxy)?;
                let net = runtime::Transparent::start(
                    &self.name,
                    &self.cell,
                    &self.events,
                    &self.engine,
                    (handover.dns_udp, handover.dns_tcp, handover.transparent),
                    &wanted,
                )?;
                slot.insert(runtime::Runtime {
                    host,
                    fs,
                    net,
                    servers,
                })
            }
        };
        let spec = linux::ProcessSpec {
            argv: argv.clone(),
            env: runtime::process_env(&env),
            cwd,
        };
        let process = runtime::spawn(&runtime.host, &self.events, spec).await?;
        Spawned::watch(
            process,
            argv,
            self.events.clone(),
            runtime.host.limits().clone(),
        )
    }

    /// A config whose mounts differ from those the namespaces run with stops them, so looser
    /// mounts never stay in force; the next spawn starts fresh ones. Called from blocking context.
    #[cfg(target_os = "linux")]
    fn stop_if_mounts_changed(&self, fs: &[crate::config::FsMount]) {
        let mut slot = self.runtime.blocking_lock();
        if slot.as_ref().is_some_and(|running| running.fs != fs) {
            if let Some(stale) = slot.take() {
                stale.stop();
            }
        }
    }

    /// Running processes get the new limits in place (cgroup writes; rlimits for later spawns).
    /// Limits that cannot change in place (a mechanism this sandbox lacks, a value the kernel
    /// refuses) stop the namespaces like changed mounts do: the next spawn starts fresh ones
    /// under the new limits, or is refused with `HIVE_LIMITS_UNENFORCEABLE`. Blocking.
    #[cfg(target_os = "linux")]
    fn update_limits(&self, limits: &crate::config::Limits) {
        let mut slot = self.runtime.blocking_lock();
        let Some(running) = slot.as_ref() else {
            return;
        };
        if let Err(e) = running.host.limits().update(limits) {
            tracing::warn!(sandbox = %self.name, error = %e, "new limits need a restart: stopping the sandbox's processes");
            if let Some(stale) = slot.take() {
                stale.stop();
            }
        }
    }

    /// `stats()`: usage of the whole sandbox, its processes, and its egress totals. Zero usage
    /// and no processes before the first spawn and after close. Blocking (reads `/proc` and
    /// cgroup files; well under a millisecond with a cgroup).
    pub fn stats(&self) -> Stats {
        Stats {
            #[cfg(target_os = "linux")]
            usage: self.usage(),
            egress: self.events.egress_totals(),
        }
    }

    #[cfg(target_os = "linux")]
    fn usage(&self) -> linux::limits::Usage {
        let slot = self.runtime.blocking_lock();
        let Some(running) = slot.as_ref() else {
            return Default::default();
        };
        let limits = running.host.limits();
        let hits = limits.check(None);
        runtime::emit_limit_hits(&self.events, &hits, None);
        limits.usage()
    }

    /// Captured ports follow the rules in force (called from blocking context, after the swap).
    #[cfg(target_os = "linux")]
    fn sync_capture_ports(&self, ports: &[u16]) {
        let mut slot = self.runtime.blocking_lock();
        if let Some(running) = slot.as_mut() {
            running.net.sync_ports(&running.host, &self.engine, ports);
        }
    }

    /// `sandbox.proxy()`: a host-side loopback listener for this sandbox's policy, with its own
    /// credential (docs/network-access.md).
    pub async fn open_proxy(&self) -> Result<HostListener> {
        self.ensure_open()?;
        self.engine.open_host_listener().await
    }

    /// `close()`: stops the sandbox's processes and listeners and ends its event streams. Its data
    /// stays. Idempotent.
    pub async fn close(&self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        #[cfg(target_os = "linux")]
        if let Some(runtime) = self.runtime.lock().await.take() {
            let _ = tokio::task::spawn_blocking(move || runtime.stop()).await;
        }
        self.engine.shutdown().await;
        self.finish_close();
    }

    /// Closes without waiting (process exit): processes are killed, listeners dropped.
    fn close_now(&self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        #[cfg(target_os = "linux")]
        if let Ok(mut runtime) = self.runtime.try_lock() {
            if let Some(runtime) = runtime.take() {
                runtime.stop();
            }
        }
        self.finish_close();
    }

    fn finish_close(&self) {
        self.emit(kind::SANDBOX_CLOSED, Map::new());
        self.events.close();
    }
}
