//! The running part of a sandbox on Linux: its namespaces (started on first use), the processes
//! in them, and the `process.start` / `process.exit` events (SPEC §1 exec/spawn, §4).
//!
//! 1. The first spawn starts the namespaces from the config in force: one bind per `local` mount
//!    (data in `source` or `<sandbox dir>/fs/<mount>`), the CA bundle (system roots + the sandbox
//!    CA) and the proxy listener, which the engine then serves.
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
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{json, Map};

use super::linux::capture::{self, CaptureListeners};
use super::linux::{
    self, BindMount, ExitStatus, LaunchSpec, ProcessSpec, SandboxHost, SandboxProcess,
};
use crate::config::{Config, FsAccess, FsMount, RuleAccess};
use crate::dns::{self, DnsResponder, NameTable};
use crate::error::{HiveError, Result};
use crate::events::{kind, EventBus};
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

/// Running namespaces and the `fs` config they were started with.
pub struct Runtime {
    pub host: SandboxHost,
    pub fs: Vec<FsMount>,
    /// The transparent path: DNS responder and capture listeners.
    pub net: Transparent,
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
/// closes the connection), the sandbox's own loopback to `None`, any other address to its IP
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
        if dns::names::is_mapped_range(ip) {
            return names.name_for(ip).map(|name| (name, local.port()));
        }
        if ip.is_loopback() || ip.is_unspecified() {
            return None;
        }
        Some((ip.to_string(), local.port()))
    })
}

/// One sandbox's transparent path (SPEC §4 "Network"): its [`NameTable`], the [`DnsResponder`]
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
        let dns = Arc::new(DnsResponder::new(
            name.to_owned(),
            cell.clone(),
            events.clone(),
            names.clone(),
        ));
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

/// Builds the launch spec for a sandbox from its `fs` config. Blocking (creates folders).
pub fn launch_spec(
    name: &str,
    dir: &Path,
    fs: &[FsMount],
    ca_pem: &str,
    capture_ports: Vec<u16>,
) -> Result<LaunchSpec> {
    let mut mounts = Vec::with_capacity(fs.len());
    for mount in fs {
        let writable = mount_access(mount)?;
        let source = match &mount.source {
            Some(source) => source.clone(),
            None => default_source(dir, &mount.mount),
        };
        if mount.source.is_none() {
            std::fs::create_dir_all(&source)
                .map_err(|e| HiveError::io(format!("creating {}", source.display()), e))?;
        }
        mounts.push(BindMount {
            source,
            target: mount.mount.clone(),
            writable,
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

/// `<sandbox dir>/fs/<mount without its leading slash>`.
fn default_source(dir: &Path, mount: &str) -> PathBuf {
    dir.join("fs").join(mount.trim_start_matches('/'))
}

/// Whether a mount is writable, from its ACLs. Mount-level enforcement only covers ACLs that are
/// the whole mount (`<mount>/**` or the mount itself) with one access; anything finer needs the
/// per-file layer, and hive never silently enforces less (SPEC §4).
fn mount_access(mount: &FsMount) -> Result<bool> {
    let Some(acls) = &mount.acls else {
        return Ok(true);
    };
    let whole = format!("{}/**", mount.mount);
    let first = acls.first().map(|acl| (acl.path.as_str(), acl.access));
    match first {
        Some((path, FsAccess::Rw)) if path == whole || path == mount.mount => Ok(true),
        Some((path, FsAccess::R)) if path == whole || path == mount.mount => Ok(false),
        _ => Err(HiveError::FsUnenforceable(format!(
            "fs mount {}: these acls need per-file enforcement, which this version of hive cannot \
             provide yet; use a single {{ path: \"{whole}\", access: \"rw\" | \"r\" }} per mount",
            mount.mount
        ))),
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

/// Spawns `spec` and emits `process.start`.
pub async fn spawn(
    host: &SandboxHost,
    events: &EventBus,
    spec: ProcessSpec,
) -> Result<SandboxProcess> {
    let command = spec.argv.clone();
    let process = host.spawn_async(spec).await?;
    let mut fields = Map::new();
    fields.insert("pid".into(), json!(process.pid));
    fields.insert("command".into(), json!(command));
    events.emit(kind::PROCESS_START, fields);
    Ok(process)
}

/// Emits `process.exit` for a finished process.
pub fn emit_exit(events: &EventBus, pid: i32, command: &[String], status: ExitStatus) {
    let mut fields = Map::new();
    fields.insert("pid".into(), json!(pid));
    fields.insert("command".into(), json!(command));
    fields.insert("exitCode".into(), json!(status.code));
    fields.insert("signal".into(), json!(status.signal.map(signal_name)));
    events.emit(kind::PROCESS_EXIT, fields);
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
    stdio: parking_lot::Mutex<Option<[std::os::fd::OwnedFd; 3]>>,
    process: std::sync::Arc<SandboxProcess>,
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
    /// Wraps a process just spawned; a task waits for it and emits `process.exit`.
    pub fn watch(
        mut process: SandboxProcess,
        command: Vec<String>,
        events: std::sync::Arc<EventBus>,
    ) -> Result<Spawned> {
        let stdin = process
            .stdin
            .take()
            .ok_or_else(|| HiveError::Internal("spawned process has no stdin pipe".into()))?;
        let dup = |fd: &std::os::fd::OwnedFd| {
            fd.try_clone()
                .map_err(|e| HiveError::io("duplicating a stdio pipe", e))
        };
        let stdio = [stdin, dup(&process.stdout)?, dup(&process.stderr)?];
        let pid = process.pid;
        let process = std::sync::Arc::new(process);
        let (tx, exit) = tokio::sync::watch::channel(None);
        let waited = process.clone();
        tokio::spawn(async move {
            let status = waited.wait().await;
            if let Ok(status) = &status {
                emit_exit(&events, pid, &command, *status);
            }
            let _ = tx.send(Some(status.map_err(|e| e.to_string())));
        });
        Ok(Spawned {
            pid,
            stdio: parking_lot::Mutex::new(Some(stdio)),
            process,
            exit,
        })
    }

    /// The pid inside the sandbox.
    pub fn pid(&self) -> i32 {
        self.pid
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

    /// Sends a signal by name or number.
    pub fn kill(&self, signal: &str) -> Result<()> {
        self.process.kill(parse_signal(signal)?)
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
