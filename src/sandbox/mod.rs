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
//! 4. A sandbox's folder is locked (a record lock on `<folder>/lock`) while it is open, so a second
//!    process opening the same name gets `HIVE_SANDBOX_BUSY` naming the holder's pid instead of
//!    writing a second stream of ids into the same audit log.
//! 5. Each Node environment (the main thread, each worker thread) is an [`Owner`]: the registry
//!    remembers which owners got each sandbox, and when an environment exits
//!    ([`release_owner`]) only the sandboxes no other environment holds are closed.

mod ask;
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

use std::collections::{HashMap, HashSet};
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
    /// The placeholders of named secrets, one per name for the sandbox's lifetime
    /// (docs/secrets.md#placeholders).
    placeholders: crate::secrets::Placeholders,
    /// The namespaces and their processes, started by the first spawn.
    #[cfg(target_os = "linux")]
    runtime: tokio::sync::Mutex<Option<runtime::Runtime>>,
    /// Serializes `applyConfig` calls so `config.applied` events follow the order of the swaps.
    apply_lock: parking_lot::Mutex<()>,
    closed: AtomicBool,
    instance: u64,
    /// The lock on the sandbox's folder, released when it closes.
    folder_lock: parking_lot::Mutex<Option<home::FolderLock>>,
    /// The async runtime it was opened on, to finish a close started outside it.
    runtime_handle: Option<tokio::runtime::Handle>,
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

/// A Node environment (the main thread or a worker thread) that holds sandboxes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Owner(u64);

impl Owner {
    /// A new owner, for an environment that has just loaded the addon.
    pub fn register() -> Owner {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let owner = Owner(NEXT.fetch_add(1, Ordering::Relaxed));
        LIVE_OWNERS.lock().insert(owner);
        owner
    }
}

/// One registry entry: the sandbox and the environments that got it.
struct Entry {
    sandbox: Arc<Sandbox>,
    owners: HashSet<Owner>,
}

/// Live sandboxes of this process, by name. Held only briefly, never across an `await`, so an
/// environment's cleanup can always take it.
static REGISTRY: LazyLock<parking_lot::Mutex<HashMap<String, Entry>>> =
    LazyLock::new(Default::default);

/// Serializes opening, so two calls for one name never open it twice.
static OPENING: LazyLock<tokio::sync::Mutex<()>> = LazyLock::new(Default::default);

/// Environments that have not exited.
static LIVE_OWNERS: LazyLock<parking_lot::Mutex<HashSet<Owner>>> = LazyLock::new(Default::default);

/// `getOrCreateSandbox(name, config?)` (README.md#api), for no particular environment.
pub async fn get_or_create(name: String, config: Option<Value>) -> Result<Arc<Sandbox>> {
    get_or_create_for(name, config, None).await
}

/// `getOrCreateSandbox(name, config?)` (README.md#api) called from `owner`'s environment. Blocking
/// file work runs off the async workers.
pub async fn get_or_create_for(
    name: String,
    config: Option<Value>,
    owner: Option<Owner>,
) -> Result<Arc<Sandbox>> {
    validate_name(&name)?;
    let config = match config.as_ref().map(Config::from_json).transpose() {
        Ok(config) => config,
        // The `"[redacted]"` marker of a named secret is valid over the live sandbox's config
        // (docs/secrets.md#round-trip); for a new sandbox the first error stands.
        Err(error) => {
            let live = REGISTRY
                .lock()
                .get(&name)
                .filter(|entry| !entry.sandbox.is_closed())
                .map(|entry| entry.sandbox.cell.load().config.clone());
            match (live, &config) {
                (Some(live), Some(value)) => Some(Config::from_json_over(value, &live)?),
                _ => return Err(error),
            }
        }
    };
    if let Some(config) = config.clone() {
        blocking(move || config.check_host_paths()).await?;
    }
    let _opening = OPENING.lock().await;
    let live = REGISTRY.lock().get_mut(&name).and_then(|entry| {
        if entry.sandbox.is_closed() {
            return None;
        }
        entry.owners.extend(owner);
        Some(entry.sandbox.clone())
    });
    if let Some(live) = live {
        if let Some(config) = config {
            let sandbox = live.clone();
            blocking(move || sandbox.swap_config(config)).await?;
        }
        return Ok(live);
    }
    let home = hive_home()?;
    let runtime = tokio::runtime::Handle::try_current().ok();
    let sandbox =
        blocking(move || Sandbox::open(name, &home, config.unwrap_or_default(), runtime)).await?;
    REGISTRY.lock().insert(
        sandbox.name.clone(),
        Entry {
            sandbox: sandbox.clone(),
            owners: owner.into_iter().collect(),
        },
    );
    // The environment may have exited while the sandbox opened: nobody can use it then.
    if owner.is_some_and(|owner| !LIVE_OWNERS.lock().contains(&owner)) {
        release_owner_sandboxes(owner);
    }
    Ok(sandbox)
}

/// `deleteSandbox(name)`: closes the live sandbox of that name, if any, and removes its data.
/// A sandbox another process has open is refused with `HIVE_SANDBOX_BUSY`.
pub async fn delete(name: String) -> Result<()> {
    validate_name(&name)?;
    let live = REGISTRY.lock().remove(&name);
    if let Some(entry) = live {
        entry.sandbox.close().await;
    }
    let dir = sandbox_dir(&hive_home()?, &name);
    blocking(move || {
        let _lock = match home::FolderLock::acquire(&dir, &name) {
            Err(e) if e.code() == crate::error::ErrorCode::SandboxBusy => return Err(e),
            // A folder that does not exist (or cannot be locked) has nothing to protect.
            other => other.ok(),
        };
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(HiveError::io(format!("removing {}", dir.display()), e)),
        }
    })
    .await
}

/// An environment exited: closes the sandboxes that no other environment holds. Never waits
/// for a process: a sandbox busy starting one finishes closing on the async runtime.
pub fn release_owner(owner: Owner) {
    LIVE_OWNERS.lock().remove(&owner);
    release_owner_sandboxes(Some(owner));
}

fn release_owner_sandboxes(owner: Option<Owner>) {
    let Some(owner) = owner else {
        return;
    };
    let orphans: Vec<Arc<Sandbox>> = {
        let mut registry = REGISTRY.lock();
        let mut orphans = Vec::new();
        registry.retain(|_, entry| {
            if !entry.owners.remove(&owner) || !entry.owners.is_empty() {
                return true;
            }
            orphans.push(entry.sandbox.clone());
            false
        });
        orphans
    };
    for sandbox in orphans {
        sandbox.close_detached();
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
    fn open(
        name: String,
        home: &Path,
        config: Config,
        runtime_handle: Option<tokio::runtime::Handle>,
    ) -> Result<Arc<Sandbox>> {
        #[cfg(target_os = "linux")]
        linux::prewarm();
        let dir = sandbox_dir(home, &name);
        home::create_private_dir(&dir)?;
        let folder_lock = home::FolderLock::acquire(&dir, &name)?;
        let events = EventBus::open_with(&name, &dir, config.audit)?;
        let ca = Arc::new(CertificateAuthority::load_or_create(&dir, &name)?);
        let cell = Arc::new(ArcSwap::from_pointee(Compiled::new(Config::default())));
        let engine = Engine::new(name.clone(), cell.clone(), events.clone(), ca.clone());
        let sandbox = Arc::new(Sandbox {
            cell,
            engine,
            placeholders: Default::default(),
            #[cfg(target_os = "linux")]
            runtime: tokio::sync::Mutex::new(None),
            name,
            dir,
            events,
            ca,
            apply_lock: parking_lot::Mutex::new(()),
            closed: AtomicBool::new(false),
            instance: NEXT_INSTANCE.fetch_add(1, Ordering::Relaxed),
            folder_lock: parking_lot::Mutex::new(Some(folder_lock)),
            runtime_handle,
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
        let config = Config::from_json_over(value, &self.cell.load().config)?;
        config.check_host_paths()?;
        self.swap_config(config)
    }

    fn swap_config(&self, config: Config) -> Result<()> {
        self.ensure_open()?;
        let _order = self.apply_lock.lock();
        self.swap_config_locked(config)
    }

    /// [`Sandbox::swap_config`] for a caller holding `apply_lock`.
    fn swap_config_locked(&self, config: Config) -> Result<()> {
        #[cfg(target_os = "linux")]
        self.stop_if_mounts_changed(&config.fs);
        #[cfg(target_os = "linux")]
        self.update_limits(&config.limits);
        let (egress_rules, fs_mounts) = (config.egress.len(), config.fs.len());
        self.events.set_retention(config.audit);
        #[cfg(target_os = "linux")]
        let capture_ports = runtime::capture_ports(&config);
        let compiled = Arc::new(Compiled::with_secrets(config, &self.placeholders));
        self.cell.store(compiled.clone());
        #[cfg(target_os = "linux")]
        self.sync_capture_ports(&capture_ports);
        let mut fields = Map::new();
        fields.insert("egressRules".into(), json!(egress_rules));
        fields.insert("fsMounts".into(), json!(fs_mounts));
        // The redacted config and its hash: a rule index in a later event reads against this.
        fields.insert("configHash".into(), json!(&*compiled.hash));
        fields.insert("config".into(), compiled.rendered.clone());
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
        let decision = compiled.policy.decide(&Request {
            host: &host,
            port: request.port,
            method: &request.method,
            path: &request.path,
            scheme: request.scheme,
            ip: host.parse().ok(),
        });
        Ok(compiled.policy.apply_mode(decision))
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
                crate::diagnostics::take_deferred(&self.events, linux::landlock::launcher_abi());
                self.engine.serve_sandbox_listener(handover.proxy)?;
                self.engine
                    .attribution()
                    .set_init(Some(host.init_host_pid()));
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
        let env = {
            let compiled = self.cell.load();
            crate::secrets::process_env(&compiled.secrets, &compiled.config.env, &env)?
        };
        let spec = linux::ProcessSpec {
            argv: argv.clone(),
            env: runtime::process_env(&env),
            cwd,
        };
        let exec_id = ask::new_exec_id()?;
        let process = runtime::spawn(
            &runtime.host,
            &self.events,
            spec,
            (self.engine.attribution(), &exec_id),
        )
        .await?;
        Spawned::watch(
            process,
            (argv, exec_id),
            self.events.clone(),
            runtime.host.limits().clone(),
        )
    }

    /// A config whose mounts differ from those the namespaces run with stops them, so looser
    /// mounts never stay in force; the next spawn starts fresh ones. Only the rules of FUSE-served
    /// mounts changing is applied in place instead. Called from blocking context.
    #[cfg(target_os = "linux")]
    fn stop_if_mounts_changed(&self, fs: &[crate::config::FsMount]) {
        let mut slot = self.runtime.blocking_lock();
        if slot.as_ref().is_some_and(|running| running.fs != fs) {
            if slot
                .as_mut()
                .is_some_and(|running| runtime::reconfigure_fuse(running, fs))
            {
                return;
            }
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
        let events = self.events.clone();
        self.emit(kind::SANDBOX_CLOSED, Map::new());
        events.close();
        let _ = tokio::task::spawn_blocking(move || events.sync()).await;
        self.folder_lock.lock().take();
    }

    /// Closes from outside the async runtime (an environment's exit), without waiting for a
    /// lock: processes are killed and the log written now, listeners drain on the runtime. If a
    /// spawn holds the namespaces, the whole close runs on the runtime instead.
    fn close_detached(self: &Arc<Self>) {
        #[cfg(target_os = "linux")]
        let Ok(mut slot) = self.runtime.try_lock() else {
            match &self.runtime_handle {
                Some(handle) => {
                    let sandbox = self.clone();
                    handle.spawn(async move { sandbox.close().await });
                }
                None => {
                    tracing::warn!(sandbox = %self.name, "cannot close: its namespaces are busy")
                }
            }
            return;
        };
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        #[cfg(target_os = "linux")]
        if let Some(runtime) = slot.take() {
            runtime.stop();
        }
        #[cfg(target_os = "linux")]
        drop(slot);
        if let Some(handle) = &self.runtime_handle {
            let engine = self.engine.clone();
            handle.spawn(async move { engine.shutdown().await });
        }
        self.finish_close();
    }

    /// Emits `sandbox.closed`, ends the streams, waits until the log holds everything, then
    /// unlocks the folder for other processes. Blocking (briefly).
    fn finish_close(&self) {
        self.emit(kind::SANDBOX_CLOSED, Map::new());
        self.events.close();
        self.events.sync();
        self.folder_lock.lock().take();
    }
}
