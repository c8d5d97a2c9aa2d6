//! The running part of a sandbox on Linux: its namespaces (started on first use), the processes
//! in them, and the `process.start` / `process.exit` events (docs/processes.md).
//!
//! 1. The first spawn starts the namespaces from the config in force: one mount per `local`
//!    mount (data in `source` or `<sandbox dir>/fs/<mount>`), the CA bundle (system roots + the
//!    sandbox CA) and the proxy listener, which the engine then serves. A mount whose ACLs are
//!    plain `<dir>/**` trees is one bind per granted subtree; one that needs per-file decisions is a
//!    FUSE mount the launcher hands over and [`serve_fuse`] serves with its ACLs.
//! 2. Every spawn gets a fresh environment: [`linux::default_env`] plus what the caller adds;
//!    nothing of the host program's environment.
//! 3. The transparent path ([`Transparent`]): the DNS responder on the DNS sockets init made, and
//!    the capture listeners (80, 443 and every allow rule's ports, [`capture_ports`]) served by
//!    the engine with [`transparent_target`]; `applyConfig` adds and stops capture listeners as
//!    the rules' ports change.
//! 4. A config whose `fs` differs from the one the namespaces were started with stops them (their
//!    processes are killed): the next spawn starts new ones, so looser mounts never stay in force.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Map};

use super::linux::capture::{self, CaptureListeners};
use super::linux::limits::{Hits, SandboxLimits};
use super::linux::{
    self, BindMount, ExitStatus, LaunchSpec, ProcessHandle, ProcessSpec, SandboxHost,
    SandboxProcess, Subtree,
};
use crate::attribution::Attribution;
use crate::config::{Config, FsAccess, FsMount, RuleAccess};
use crate::dns::{self, DnsResponder, NameTable};
use crate::error::{HiveError, Result};
use crate::events::{kind, EventBus};
use crate::fs::{AclFs, FsHandle};
use crate::policy::PolicyCell;
use crate::proxy::{Engine, ListenerHandle, TransparentTarget};

/// Where the proxy listens inside every sandbox.
pub const PROXY_PORT: u16 = 3128;

/// System CA bundles, first found wins; the sandbox CA is appended to it.
const SYSTEM_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
    "/etc/ssl/ca-bundle.pem",
];

/// Running namespaces, the `fs` config they were started with and the FUSE servers of its
/// per-file mounts.
pub struct Runtime {
    pub host: SandboxHost,
    pub fs: Vec<FsMount>,
    /// The transparent path: DNS responder and capture listeners.
    pub net: Transparent,
    pub servers: Vec<FsHandle>,
}

/// Ports captured whatever the rules say: plain HTTP and HTTPS.
pub const ALWAYS_CAPTURED: [u16; 2] = [80, 443];

/// The ports whose connections to any address are captured inside: 80, 443 and every port an
/// allow rule names, sorted, without the proxy's and the DNS responder's own ports.
pub fn capture_ports(config: &Config) -> Vec<u16> {
    let mut ports: Vec<u16> = ALWAYS_CAPTURED.to_vec();
    for rule in &config.egress {
        if rule.access == RuleAccess::Allow {
            ports.extend(rule.ports.iter().flatten().copied());
        }
    }
    ports.retain(|p| *p != PROXY_PORT && *p != capture::DNS_PORT);
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// Maps the local address a captured connection dialled to the host and port it meant: a
/// sandbox-local address from the DNS responder to its name (an unknown one to `None`, which
/// closes the connection; one of a denied name to that name, refused), the sandbox's own loopback to `None`, any other address to its IP
/// literal, decided like a CONNECT to that address.
///
/// # Security
/// The sandbox's loopback (`127.0.0.0/8`, `::1`) is its own: mapping it to the host's loopback
/// would let a sandbox reach host services by dialling `127.0.0.1:<captured port>`.
pub fn transparent_target(names: Arc<NameTable>) -> TransparentTarget {
    Arc::new(move |local: SocketAddr| {
        let ip = match local.ip() {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        if dns::names::is_mapped_range(ip) || dns::names::is_denied_range(ip) {
            return names
                .target_for(ip)
                .map(|(name, refused)| (name, local.port(), refused));
        }
        if ip.is_loopback() || ip.is_unspecified() {
            return None;
        }
        Some((ip.to_string(), local.port(), false))
    })
}

/// One sandbox's transparent path (docs/network-access.md#dns-and-transparent-capture): its [`NameTable`], the [`DnsResponder`]
/// serving the DNS sockets, and the capture listeners the engine serves, by port. Dropping it
/// stops the responder and the listeners.
pub struct Transparent {
    names: Arc<NameTable>,
    dns: Arc<DnsResponder>,
    listeners: BTreeMap<u16, Vec<ListenerHandle>>,
}

impl Transparent {
    /// Serves what init handed over ([`linux::Handover`]): the DNS sockets with a new responder, the capture listeners
    /// with `engine`. Must run within a tokio runtime.
    pub fn start(
        name: &str,
        cell: &Arc<PolicyCell>,
        events: &Arc<EventBus>,
        engine: &Arc<Engine>,
        (dns_udp, dns_tcp, captured): (
            Option<std::net::UdpSocket>,
            Option<std::net::TcpListener>,
            CaptureListeners,
        ),
        wanted: &[u16],
    ) -> Result<Transparent> {
        let names = Arc::new(NameTable::new());
        let dns = Arc::new(
            DnsResponder::new(name.to_owned(), cell.clone(), events.clone(), names.clone())
                .with_attribution(engine.attribution().clone()),
        );
        let mut net = Transparent {
            names,
            dns,
            listeners: BTreeMap::new(),
        };
        if let Some(udp) = dns_udp {
            net.dns.serve_udp(udp)?;
        }
        if let Some(tcp) = dns_tcp {
            net.dns.serve_tcp(tcp)?;
        }
        net.serve(engine, captured)?;
        net.warn_missing(name, wanted);
        Ok(net)
    }

    /// Makes the captured ports follow `wanted` (after `applyConfig`): a new port gets listeners
    /// made inside the running sandbox, a port no longer wanted stops accepting. Blocking (the
    /// launcher thread creates the sockets); must run within a tokio runtime.
    pub fn sync_ports(&mut self, host: &SandboxHost, engine: &Arc<Engine>, wanted: &[u16]) {
        let removed: Vec<u16> = self
            .listeners
            .keys()
            .copied()
            .filter(|p| !wanted.contains(p))
            .collect();
        for port in removed {
            for handle in self.listeners.remove(&port).into_iter().flatten() {
                handle.stop();
            }
        }
        let added: Vec<u16> = wanted
            .iter()
            .copied()
            .filter(|p| !self.listeners.contains_key(p))
            .collect();
        if added.is_empty() {
            return;
        }
        let opened = host
            .open_capture_listeners(added.clone())
            .and_then(|listeners| self.serve(engine, listeners));
        if let Err(e) = opened {
            tracing::warn!(sandbox = %host.name(), error = %e, ports = ?added, "opening capture listeners");
        }
        self.warn_missing(host.name(), &added);
    }

    fn serve(&mut self, engine: &Arc<Engine>, listeners: CaptureListeners) -> Result<()> {
        for (port, listener) in listeners {
            let handle = engine
                .serve_transparent_listener(listener, transparent_target(self.names.clone()))?;
            self.listeners.entry(port).or_default().push(handle);
        }
        Ok(())
    }

    fn warn_missing(&self, sandbox: &str, wanted: &[u16]) {
        let missing: Vec<u16> = wanted
            .iter()
            .copied()
            .filter(|p| !self.listeners.contains_key(p))
            .collect();
        if !missing.is_empty() {
            tracing::warn!(sandbox = %sandbox, ports = ?missing, "these ports could not be captured (in use inside the sandbox?)");
        }
    }
}

impl Drop for Transparent {
    fn drop(&mut self) {
        self.dns.shutdown();
        for handle in self.listeners.values().flatten() {
            handle.stop();
        }
    }
}

/// How long [`Runtime::stop`] waits for a FUSE server to notice its mount is gone.
const SERVER_STOP_TIMEOUT: Duration = Duration::from_secs(5);

impl Runtime {
    /// Kills the sandbox's processes, releases its namespaces (which unmounts its FUSE mounts)
    /// and waits for the FUSE servers to end. Blocking.
    pub fn stop(self) {
        let Runtime { host, servers, .. } = self;
        host.close();
        // The host's namespace fds keep the mount namespace, and with it the FUSE mounts, alive.
        drop(host);
        let deadline = Instant::now() + SERVER_STOP_TIMEOUT;
        for server in servers {
            while !server.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if server.is_finished() {
                if let Err(e) = server.join() {
                    tracing::warn!(error = %e, "a FUSE server ended with an error");
                }
            } else {
                tracing::warn!("a FUSE server did not stop after its sandbox closed");
            }
        }
    }
}

/// Builds the launch spec for a sandbox from its `fs` config. Blocking (creates folders).
///
/// # Errors
/// `HIVE_FS_UNENFORCEABLE` (with a hint) when a mount needs per-file enforcement and this
/// process cannot open `/dev/fuse` (docs/file-access.md: never silently enforce less).
pub fn launch_spec(
    name: &str,
    dir: &Path,
    fs: &[FsMount],
    ca_pem: &str,
    capture_ports: Vec<u16>,
) -> Result<LaunchSpec> {
    crate::fs::require_enforceable(fs)?;
    let mut mounts = Vec::with_capacity(fs.len());
    for mount in fs {
        let access = mount_access(mount);
        let source = source_of(dir, mount);
        if mount.source.is_none() {
            std::fs::create_dir_all(&source)
                .map_err(|e| HiveError::io(format!("creating {}", source.display()), e))?;
        }
        let (writable, subtrees, fuse) = match access {
            MountAccess::PerFile => (true, None, true),
            MountAccess::Bind { writable, subtrees } => {
                for tree in subtrees.iter().flatten() {
                    create_subtree(&source, &mount.mount, &tree.path);
                }
                (writable, subtrees, false)
            }
        };
        mounts.push(BindMount {
            source,
            target: mount.mount.clone(),
            writable,
            subtrees,
            fuse,
        });
    }
    let mut bundle = SYSTEM_BUNDLES
        .iter()
        .find_map(|path| std::fs::read(path).ok())
        .unwrap_or_default();
    if !bundle.is_empty() && !bundle.ends_with(b"\n") {
        bundle.push(b'\n');
    }
    bundle.extend_from_slice(ca_pem.as_bytes());
    Ok(LaunchSpec {
        name: name.to_owned(),
        mounts,
        ca_bundle_pem: bundle,
        proxy_port: PROXY_PORT,
        capture_ports,
    })
}

/// Serves every FUSE connection the launcher handed over with the ACLs of its mount (docs/security.md):
/// refusals (and, with `audit`, accesses) go to `events`. Files show as owned by the sandbox's
/// root. Blocking (opens the sources).
pub fn serve_fuse(
    dir: &Path,
    fs: &[FsMount],
    fuse: Vec<(String, OwnedFd)>,
    events: &Arc<EventBus>,
) -> Result<Vec<FsHandle>> {
    let mut servers = Vec::with_capacity(fuse.len());
    for (target, fd) in fuse {
        let mount = fs.iter().find(|m| m.mount == target).ok_or_else(|| {
            HiveError::Internal(format!(
                "a FUSE connection for {target}, which is no fs mount"
            ))
        })?;
        let source = source_of(dir, mount);
        let source_dir = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC)
            .open(&source)
            .map_err(|e| HiveError::io(format!("opening {}", source.display()), e))?;
        let server = AclFs::new(mount, OwnedFd::from(source_dir), events.clone())?
            .present_owner(0, 0)
            .serve(fd)?;
        servers.push(server);
    }
    Ok(servers)
}

/// Puts a new `fs` config in force in running namespaces without restarting them, where only the
/// rules of FUSE-served mounts changed (and they stay FUSE-served): their servers decide by the
/// new rules from now on and the kernel forgets what it cached. `false`: the namespaces must be
/// restarted (a mount was added, removed, moved, or changes how it is enforced).
pub fn reconfigure_fuse(running: &mut Runtime, fs: &[FsMount]) -> bool {
    let same_layout = running.fs.len() == fs.len()
        && running.fs.iter().zip(fs).all(|(old, new)| {
            old.backend == new.backend
                && old.mount == new.mount
                && old.source == new.source
                && (old == new
                    || (mount_access(old) == MountAccess::PerFile
                        && mount_access(new) == MountAccess::PerFile))
        });
    if !same_layout {
        return false;
    }
    for mount in fs
        .iter()
        .filter(|m| mount_access(m) == MountAccess::PerFile)
    {
        let Some(server) = running.servers.iter().find(|s| s.mount() == mount.mount) else {
            return false;
        };
        server.reconfigure(mount);
    }
    running.fs = fs.to_vec();
    true
}

/// The host directory holding a mount's data: `source`, or `<sandbox dir>/fs/<mount>`.
fn source_of(dir: &Path, mount: &FsMount) -> PathBuf {
    match &mount.source {
        Some(source) => source.clone(),
        None => default_source(dir, &mount.mount),
    }
}

/// `<sandbox dir>/fs/<mount without its leading slash>`.
fn default_source(dir: &Path, mount: &str) -> PathBuf {
    dir.join("fs").join(mount.trim_start_matches('/'))
}

/// How a mount's ACLs are enforced.
#[derive(Debug, Clone, PartialEq, Eq)]
enum MountAccess {
    /// Binds: `None`, the whole mount, read-write (no `acls`); `Some`, only these subtrees, each
    /// read-only unless `rw` (plain `<dir>/**` rules that never nest with different accesses, so
    /// first-match equals the union of the subtrees; `writable` is then unused).
    Bind {
        writable: bool,
        subtrees: Option<Vec<Subtree>>,
    },
    /// Served over FUSE by the host, deciding every request.
    PerFile,
}

/// Which layer enforces a mount's ACLs: per-file where [`crate::fs::needs_per_file_enforcement`]
/// says so, else binds of the granted subtrees.
fn mount_access(mount: &FsMount) -> MountAccess {
    if crate::fs::needs_per_file_enforcement(mount) {
        return MountAccess::PerFile;
    }
    let Some(acls) = &mount.acls else {
        return MountAccess::Bind {
            writable: true,
            subtrees: None,
        };
    };
    let subtrees: Vec<Subtree> = acls
        .iter()
        .filter(|acl| acl.access != FsAccess::None)
        .map(|acl| Subtree {
            path: acl
                .path
                .as_str()
                .strip_suffix("/**")
                .unwrap_or(acl.path.as_str())
                .to_owned(),
            writable: acl.access == FsAccess::Rw,
        })
        .collect();
    MountAccess::Bind {
        writable: subtrees.iter().any(|t| t.writable),
        subtrees: Some(subtrees),
    }
}

/// Creates a granted subtree that does not exist yet in the source, so it can be bound. Nothing is created through a symlink or over a file (the sandbox may have
/// planted them); the subtree then simply grants nothing.
fn create_subtree(source: &Path, mount: &str, path: &str) {
    let Some(rel) = path.strip_prefix(mount) else {
        return;
    };
    let mut at = source.to_path_buf();
    for part in rel.split('/').filter(|p| !p.is_empty()) {
        at.push(part);
        match std::fs::symlink_metadata(&at) {
            Ok(meta) if meta.is_dir() => continue,
            Ok(_) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if std::fs::create_dir(&at).is_err() {
                    return;
                }
            }
            Err(_) => return,
        }
    }
}

/// The complete environment of a process: the sandbox defaults, then the caller's additions.
pub fn process_env(extra: &[(String, String)]) -> Vec<(String, String)> {
    let mut env = linux::default_env(PROXY_PORT);
    for (key, value) in extra {
        match env.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = value.clone(),
            None => env.push((key.clone(), value.clone())),
        }
    }
    env
}

/// Spawns `spec`, records it as the root of exec `exec_id` for attribution
/// (docs/audit-log.md#attribution) and emits `process.start`.
pub async fn spawn(
    host: &SandboxHost,
    events: &EventBus,
    spec: ProcessSpec,
    (attribution, exec_id): (&Attribution, &Arc<str>),
) -> Result<SandboxProcess> {
    let command = spec.argv.clone();
    let process = host.spawn_async(spec).await?;
    attribution.register_exec(process.pid, process.host_pid(), exec_id.clone());
    let mut fields = Map::new();
    fields.insert("pid".into(), json!(process.pid));
    fields.insert("command".into(), json!(command));
    fields.insert("execId".into(), json!(&**exec_id));
    events.emit(kind::PROCESS_START, fields);
    Ok(process)
}

/// Emits `process.exit` for a finished process; `reason` is `"oom"` when the sandbox's memory
/// limit killed it.
pub fn emit_exit(
    events: &EventBus,
    (pid, exec_id): (i32, &str),
    command: &[String],
    status: ExitStatus,
    reason: Option<&str>,
) {
    let mut fields = Map::new();
    fields.insert("pid".into(), json!(pid));
    fields.insert("command".into(), json!(command));
    fields.insert("execId".into(), json!(exec_id));
    fields.insert("exitCode".into(), json!(status.code));
    fields.insert("signal".into(), json!(status.signal.map(signal_name)));
    if let Some(reason) = reason {
        fields.insert("reason".into(), json!(reason));
    }
    events.emit(kind::PROCESS_EXIT, fields);
}

/// Emits `limit.exceeded` for what [`SandboxLimits::check`] found (docs/audit-log.md): which
/// limit, and the process when known.
pub fn emit_limit_hits(events: &EventBus, hits: &Hits, process: Option<(i32, &[String])>) {
    let emit = |limit: &str, count: u64, process: Option<(i32, &[String])>| {
        let mut fields = Map::new();
        fields.insert("limit".into(), json!(limit));
        if let Some((pid, command)) = process {
            fields.insert("pid".into(), json!(pid));
            fields.insert("command".into(), json!(command));
        }
        fields.insert("count".into(), json!(count));
        events.emit(kind::LIMIT_EXCEEDED, fields);
    };
    if hits.oom_this {
        emit("memoryBytes", 1, process);
    }
    if hits.oom_others > 0 {
        emit("memoryBytes", hits.oom_others, None);
    }
    if hits.pids_max > 0 {
        emit("pids", hits.pids_max, None);
    }
}

/// Signal names as Node spells them.
const SIGNALS: &[(i32, &str)] = &[
    (libc::SIGHUP, "SIGHUP"),
    (libc::SIGINT, "SIGINT"),
    (libc::SIGQUIT, "SIGQUIT"),
    (libc::SIGILL, "SIGILL"),
    (libc::SIGTRAP, "SIGTRAP"),
    (libc::SIGABRT, "SIGABRT"),
    (libc::SIGBUS, "SIGBUS"),
    (libc::SIGFPE, "SIGFPE"),
    (libc::SIGKILL, "SIGKILL"),
    (libc::SIGUSR1, "SIGUSR1"),
    (libc::SIGSEGV, "SIGSEGV"),
    (libc::SIGUSR2, "SIGUSR2"),
    (libc::SIGPIPE, "SIGPIPE"),
    (libc::SIGALRM, "SIGALRM"),
    (libc::SIGTERM, "SIGTERM"),
    (libc::SIGCHLD, "SIGCHLD"),
    (libc::SIGCONT, "SIGCONT"),
    (libc::SIGSTOP, "SIGSTOP"),
    (libc::SIGTSTP, "SIGTSTP"),
    (libc::SIGTTIN, "SIGTTIN"),
    (libc::SIGTTOU, "SIGTTOU"),
    (libc::SIGXCPU, "SIGXCPU"),
    (libc::SIGXFSZ, "SIGXFSZ"),
    (libc::SIGSYS, "SIGSYS"),
];

/// `9` -> `"SIGKILL"`; unknown numbers as `"SIG<n>"`.
pub fn signal_name(signal: i32) -> String {
    SIGNALS
        .iter()
        .find(|(n, _)| *n == signal)
        .map_or_else(|| format!("SIG{signal}"), |(_, name)| (*name).to_owned())
}

/// `"SIGTERM"`, `"TERM"` or `"15"` -> 15.
pub fn parse_signal(signal: &str) -> Result<i32> {
    if let Ok(n) = signal.parse::<i32>() {
        if (1..=64).contains(&n) {
            return Ok(n);
        }
    }
    let upper = signal.to_ascii_uppercase();
    let name = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    SIGNALS
        .iter()
        .find(|(_, known)| *known == name)
        .map(|(n, _)| *n)
        .ok_or_else(|| HiveError::InvalidArgument(format!("signal: unknown signal {signal:?}")))
}

/// A spawned process as the API layer sees it: stdio to hand over once, a shared exit status
/// (also reported as `process.exit` whether or not anyone waits), and `kill`.
pub struct Spawned {
    pid: i32,
    exec_id: Arc<str>,
    stdio: parking_lot::Mutex<Option<[std::os::fd::OwnedFd; 3]>>,
    process: ProcessHandle,
    /// Where `kill` runs (see there).
    runtime: tokio::runtime::Handle,
    exit: tokio::sync::watch::Receiver<Option<std::result::Result<ExitStatus, String>>>,
}

impl std::fmt::Debug for Spawned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spawned")
            .field("pid", &self.pid)
            .finish_non_exhaustive()
    }
}

impl Spawned {
    /// Wraps a process just spawned; a task waits for it, checks the sandbox's limits and emits
    /// `limit.exceeded` and `process.exit`.
    pub fn watch(
        process: SandboxProcess,
        (command, exec_id): (Vec<String>, Arc<str>),
        events: std::sync::Arc<EventBus>,
        limits: Arc<SandboxLimits>,
    ) -> Result<Spawned> {
        let pid = process.pid;
        // The fds move on (to the caller, who closes them), so none stays open here.
        let (process, stdin, stdout, stderr) = process.into_parts();
        let stdin =
            stdin.ok_or_else(|| HiveError::Internal("spawned process has no stdin pipe".into()))?;
        let stdio = [stdin, stdout, stderr];
        let (tx, exit) = tokio::sync::watch::channel(None);
        let waited = process.clone();
        let id = exec_id.clone();
        tokio::spawn(async move {
            let status = waited.wait().await;
            if let Ok(status) = &status {
                let hits = limits.check(status.signal);
                emit_limit_hits(&events, &hits, Some((pid, &command)));
                let reason = hits.oom_this.then_some("oom");
                emit_exit(&events, (pid, &id), &command, *status, reason);
            }
            let _ = tx.send(Some(status.map_err(|e| e.to_string())));
        });
        Ok(Spawned {
            pid,
            exec_id,
            stdio: parking_lot::Mutex::new(Some(stdio)),
            process,
            runtime: tokio::runtime::Handle::current(),
            exit,
        })
    }

    /// The pid inside the sandbox.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The id `process.start`, `process.exit` and the egress events of this exec carry.
    pub fn exec_id(&self) -> &str {
        &self.exec_id
    }

    /// `[stdin (write end), stdout, stderr (read ends)]`, once.
    pub fn take_stdio(&self) -> Option<[std::os::fd::OwnedFd; 3]> {
        self.stdio.lock().take()
    }

    /// Resolves when the process has ended.
    pub async fn wait(&self) -> Result<ExitStatus> {
        let mut exit = self.exit.clone();
        let done = exit
            .wait_for(Option::is_some)
            .await
            .map_err(|_| HiveError::Internal("the process watcher stopped".into()))?;
        match done.as_ref() {
            Some(Ok(status)) => Ok(*status),
            Some(Err(e)) => Err(HiveError::Internal(format!("waiting for the process: {e}"))),
            None => Err(HiveError::Internal("the process watcher stopped".into())),
        }
    }

    /// Sends a signal by name or number. Reaching every process of the command can take a few
    /// milliseconds without a cgroup (a walk of its process tree until none is left), so that
    /// runs on a blocking thread, never the caller's (the JS main thread). A SIGKILL there ends
    /// the command's first process last, so `wait()` resolves once the rest are gone.
    pub fn kill(&self, signal: &str) -> Result<()> {
        let signal = parse_signal(signal)?;
        let process = self.process.clone();
        self.runtime.spawn_blocking(move || {
            if let Err(e) = process.kill(signal) {
                tracing::debug!(error = %e, "signalling a process");
            }
        });
        Ok(())
    }

    /// Closes the pidfd of a process that ended (see [`ProcessHandle::release`]); the caller
    /// calls it once the output was read to its end.
    pub fn release(&self) {
        self.process.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals() {
        assert_eq!(signal_name(9), "SIGKILL");
        assert_eq!(signal_name(15), "SIGTERM");
        assert_eq!(signal_name(99), "SIG99");
        assert_eq!(parse_signal("SIGTERM").unwrap(), 15);
        assert_eq!(parse_signal("term").unwrap(), 15);
        assert_eq!(parse_signal("9").unwrap(), 9);
        assert!(parse_signal("SIGNOPE").is_err());
        assert!(parse_signal("0").is_err());
    }

    fn mount(acls: Option<&[(&str, FsAccess)]>, audit: bool) -> FsMount {
        FsMount {
            backend: crate::config::FsBackend::Local,
            mount: "/workspace".into(),
            source: None,
            acls: acls.map(|acls| {
                acls.iter()
                    .map(|(path, access)| crate::config::FsAcl {
                        path: crate::config::PathGlob::parse(path).expect("valid glob"),
                        access: *access,
                    })
                    .collect()
            }),
            audit,
        }
    }

    fn bind(writable: bool, subtrees: Option<&[(&str, bool)]>) -> MountAccess {
        MountAccess::Bind {
            writable,
            subtrees: subtrees.map(|s| {
                s.iter()
                    .map(|(path, writable)| Subtree {
                        path: (*path).into(),
                        writable: *writable,
                    })
                    .collect()
            }),
        }
    }

    #[test]
    fn each_mount_gets_the_cheapest_layer_that_enforces_its_acls_exactly() {
        use FsAccess::{None as Hidden, Rw, R};
        type Acls<'a> = Option<&'a [(&'a str, FsAccess)]>;
        let cases: &[(Acls, bool, MountAccess)] = &[
            // no acls: the whole mount, read-write
            (None, false, bind(true, None)),
            // one whole-mount rule
            (
                Some(&[("/workspace/**", Rw)]),
                false,
                bind(true, Some(&[("/workspace", true)])),
            ),
            (
                Some(&[("/workspace/**", R)]),
                false,
                bind(false, Some(&[("/workspace", false)])),
            ),
            // disjoint subtrees: a bind per subtree, `none` grants nothing
            (
                Some(&[
                    ("/workspace/a/**", R),
                    ("/workspace/b/**", Rw),
                    ("/workspace/c/**", Hidden),
                ]),
                false,
                bind(
                    true,
                    Some(&[("/workspace/a", false), ("/workspace/b", true)]),
                ),
            ),
            // per-file: globs that are not subtrees, nesting with different accesses, audit
            (
                Some(&[("/workspace/**/*.env", Hidden), ("/workspace/**", Rw)]),
                false,
                MountAccess::PerFile,
            ),
            (
                Some(&[("/workspace/docs/**", R), ("/workspace/**", Rw)]),
                false,
                MountAccess::PerFile,
            ),
            (None, true, MountAccess::PerFile),
        ];
        for (acls, audit, want) in cases {
            assert_eq!(
                &mount_access(&mount(*acls, *audit)),
                want,
                "{acls:?} audit={audit}"
            );
        }
    }

    #[test]
    fn per_file_mounts_are_refused_without_fuse_and_planned_with_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let env: &[(&str, FsAccess)] = &[("/workspace/**/*.env", FsAccess::None)];
        let got = launch_spec("t", dir.path(), &[mount(Some(env), false)], "", Vec::new());
        if crate::fs::fuse_available() {
            let spec = got.expect("planned");
            assert!(spec.mounts[0].fuse);
        } else {
            let err = got.expect_err("refused");
            assert_eq!(err.code(), crate::ErrorCode::FsUnenforceable);
        }
    }

    #[test]
    fn granted_subtrees_are_created_but_never_through_a_symlink() {
        let src = tempfile::tempdir().expect("tempdir");
        let outside = tempfile::tempdir().expect("tempdir");
        std::os::unix::fs::symlink(outside.path(), src.path().join("link")).expect("link");
        create_subtree(src.path(), "/workspace", "/workspace/a/b");
        create_subtree(src.path(), "/workspace", "/workspace/link/x");
        assert!(src.path().join("a/b").is_dir());
        assert!(!outside.path().join("x").exists());
    }

    #[test]
    fn env_is_built_from_scratch_and_caller_values_win() {
        let env = process_env(&[
            ("FOO".into(), "bar".into()),
            ("TERM".into(), "xterm".into()),
        ]);
        let get = |k: &str| {
            env.iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(get("FOO"), Some("bar"));
        assert_eq!(get("TERM"), Some("xterm"));
        assert_eq!(get("HTTPS_PROXY"), Some("http://127.0.0.1:3128"));
        assert_eq!(get("USER"), None);
    }
}
