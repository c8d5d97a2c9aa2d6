//! Which process inside a sandbox opened a connection or sent a DNS query
//! (docs/audit-log.md#attribution): `pid`, `command` and `execId` on `egress.request`,
//! `egress.response` and `dns.query`.
//!
//! The proxy and the DNS responder hold the server side of sockets that live in the sandbox's
//! network namespace; the peer's address names the client socket there. For one peer:
//! 1. the candidates: the process trees of the exec roots, newest first (execs are children of the
//!    host process, not of init), then init's tree (orphans), walked through
//!    `/proc/<pid>/task/<tid>/children`, one tree after the other, parents before children;
//! 2. the owner: the first candidate with a socket fd whose local address is the peer's (and, for
//!    TCP, whose remote address is the proxy's side). Each socket fd of a candidate is borrowed
//!    with `pidfd_getfd` and asked `getsockname` / `getpeername`, and hive's copy is closed at
//!    once. Where the kernel refuses `pidfd_getfd` (before Linux 5.6, or a ptrace policy), the
//!    socket's inode is read from `/proc/<init>/net/{tcp,tcp6,udp,udp6}` and the candidates'
//!    `/proc/<pid>/fd` links are compared with it: the same answer, but reading the TCP tables
//!    walks the host's whole TCP hash (10–30 ms per lookup on a large host);
//! 3. pid and session as the sandbox numbers them (`NSpid`, `NSsid` of `/proc/<pid>/status` at
//!    the sandbox's PID-namespace level), the same numbers `process.start` and `stats().processes`
//!    show; `command` from `/proc/<pid>/cmdline`;
//! 4. `execId`: the exec whose root process is the session leader (every exec's root calls
//!    `setsid`), else the first exec root on the parent chain (a process that started its own
//!    session).
//!
//! The proxy resolves a connection once, at its first event ([`PeerOrigin`]); a DNS query is
//! resolved when it is answered (its event is emitted before the answer goes out). Lookups run
//! on tokio's blocking pool, at most [`MAX_LOOKUPS_AT_ONCE`] in the process at a time, never on
//! the async workers that serve every sandbox's proxy and DNS. Nothing here ever fails a request: an owner that cannot be found
//! (the process exited, `/proc` unreadable) leaves the fields out. Cost: about 0.6 ms per new
//! connection in a debug build on a loaded two-core host, 0.85 ms with 20 other execs running (docs/decisions.md#process-attribution-config-hash-report-mode-and-onunmatched-2026-12-02).
//!
//! # Security
//! The sandbox cannot choose what is recorded except by being the process that sent the bytes.
//! A socket borrowed with `pidfd_getfd` is only asked for its addresses; nothing is read from or
//! written to it. `command` is the process's argv, which the sandbox controls: treat it as
//! untrusted text.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, OnceLock};

use parking_lot::{Mutex, RwLock};
use serde_json::{Map, Value};

/// Field names attribution adds to events.
pub mod field {
    pub const PID: &str = "pid";
    pub const COMMAND: &str = "command";
    pub const EXEC_ID: &str = "execId";
}

/// The process behind a connection or query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// Pid inside the sandbox.
    pub pid: i32,
    /// argv (untrusted: the sandbox chose it).
    pub command: Vec<String>,
    /// The `exec` / `spawn` call the process descends from, when known.
    pub exec_id: Option<Arc<str>>,
}

impl Origin {
    /// Adds `pid`, `command` and (when known) `execId` to an event's fields.
    pub fn insert_fields(&self, fields: &mut Map<String, Value>) {
        fields.insert(field::PID.into(), self.pid.into());
        fields.insert(
            field::COMMAND.into(),
            Value::Array(self.command.iter().map(|a| a.as_str().into()).collect()),
        );
        if let Some(id) = &self.exec_id {
            fields.insert(field::EXEC_ID.into(), Value::String(id.to_string()));
        }
    }
}

/// The running namespaces attribution reads through.
#[derive(Debug, Clone, Copy)]
struct Namespaces {
    /// init's pid on the host.
    init: i32,
    /// Index of the sandbox's PID namespace in `NSpid` lines.
    level: usize,
    /// Inode of the sandbox's PID namespace (`/proc/<pid>/ns/pid`), to tell a live exec root
    /// from a host process that reused its number.
    pid_ns: u64,
}

/// One sandbox's attribution state: its namespaces while they run, and the exec roots.
#[derive(Debug, Default)]
pub struct Attribution {
    namespaces: RwLock<Option<Namespaces>>,
    /// Exec root pid (inside) -> exec id and the root's host pid.
    execs: Mutex<HashMap<i32, ExecRoot>>,
}

/// The root process of one exec.
#[derive(Debug, Clone)]
struct ExecRoot {
    id: Arc<str>,
    /// Its pid on the host: execs are children of the host process, not of init, so their trees
    /// are walked from here.
    host_pid: i32,
}

/// Most exec roots remembered (pids inside are bounded anyway; this bounds a long-lived sandbox
/// that has had its PID namespace replaced many times).
const MAX_EXECS: usize = 65_536;
/// Longest parent chain followed.
const MAX_DEPTH: usize = 64;

/// Transport of the socket to attribute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Tcp,
    Udp,
}

impl Attribution {
    /// New, with no namespaces yet.
    pub fn new() -> Arc<Attribution> {
        Arc::new(Attribution::default())
    }

    /// The namespaces now running, by init's host pid (`None`: stopped). Exec roots of earlier
    /// namespaces are forgotten.
    pub fn set_init(&self, init_host_pid: Option<i32>) {
        let ns = init_host_pid.map(|init| Namespaces {
            init,
            level: read_status(init)
                .map(|s| s.nspid.len().saturating_sub(1))
                .unwrap_or(1),
            pid_ns: pid_namespace(init).unwrap_or(0),
        });
        *self.namespaces.write() = ns;
        self.execs.lock().clear();
    }

    /// Records that `pid` (inside; `host_pid` on the host) is the root process of exec `id`.
    pub fn register_exec(&self, pid: i32, host_pid: i32, id: Arc<str>) {
        let mut execs = self.execs.lock();
        if execs.len() >= MAX_EXECS {
            execs.clear();
        }
        execs.insert(pid, ExecRoot { id, host_pid });
    }

    /// The exec `pid` (inside) is the root of, if it is one.
    pub fn exec_of_root(&self, pid: i32) -> Option<Arc<str>> {
        self.execs.lock().get(&pid).map(|r| r.id.clone())
    }

    /// The process that owns the sandbox-side socket `peer` (connected to `local`, for TCP).
    /// Blocking (reads `/proc`; tens to hundreds of microseconds).
    pub fn lookup(
        &self,
        transport: Transport,
        peer: SocketAddr,
        local: SocketAddr,
    ) -> Option<Origin> {
        if switched_off() {
            return None;
        }
        let ns = (*self.namespaces.read())?;
        // Live exec roots, newest first (the likeliest senders), then init's tree (orphans).
        let mut roots = self.live_roots(ns);
        roots.sort_unstable_by(|a, b| b.cmp(a));
        roots.push(ns.init);
        let want = Endpoints::new(transport, peer, local);
        let mut refused = false;
        let owner = find_owner(&roots, |pid| match holds_endpoints(pid, &want) {
            Ok(found) => found,
            Err(()) => {
                refused = true;
                false
            }
        });
        let owner = match owner {
            Some(owner) => owner,
            // Without pidfd_getfd (Linux < 5.6, or a ptrace policy that forbids it): the slow way.
            None if refused => {
                let inode = socket_inode(ns.init, transport, peer, local)?;
                let target = format!("socket:[{inode}]");
                find_owner(&roots, |pid| holds(pid, &target))?
            }
            None => return None,
        };
        let status = read_status(owner)?;
        let pid = *status.nspid.get(ns.level)?;
        let command = read_command(owner);
        let exec_id = self.exec_of(ns, &status);
        Some(Origin {
            pid,
            command,
            exec_id,
        })
    }

    /// Host pids of the exec roots still running in the sandbox; roots found gone are marked so
    /// that later lookups skip them without a syscall (their ids stay for session lookups).
    fn live_roots(&self, ns: Namespaces) -> Vec<i32> {
        let mut execs = self.execs.lock();
        let mut live = Vec::new();
        for root in execs.values_mut().filter(|r| r.host_pid > 0) {
            if pid_namespace(root.host_pid) == Some(ns.pid_ns) {
                live.push(root.host_pid);
            } else {
                root.host_pid = 0;
            }
        }
        live
    }

    /// The exec of a process: its session's, else the first exec root among its ancestors.
    fn exec_of(&self, ns: Namespaces, status: &Status) -> Option<Arc<str>> {
        let execs = self.execs.lock();
        if let Some(root) = status.nssid.get(ns.level).and_then(|sid| execs.get(sid)) {
            return Some(root.id.clone());
        }
        if let Some(root) = status.nspid.get(ns.level).and_then(|pid| execs.get(pid)) {
            return Some(root.id.clone());
        }
        drop(execs);
        let mut parent = status.ppid;
        for _ in 0..MAX_DEPTH {
            if parent <= 1 || parent == ns.init {
                return None;
            }
            let up = read_status(parent)?;
            if let Some(id) = up
                .nspid
                .get(ns.level)
                .and_then(|pid| self.exec_of_root(*pid))
            {
                return Some(id);
            }
            parent = up.ppid;
        }
        None
    }
}

/// Lookups running at once, process-wide. Each reads `/proc` on tokio's blocking pool, never on
/// an async worker: a sandbox opening connections or sending queries as fast as it can would
/// otherwise hold the workers every sandbox's proxy and DNS responder run on (a lookup is about
/// 0.6 ms, 10-30 ms without `pidfd_getfd`).
const MAX_LOOKUPS_AT_ONCE: usize = 4;
static LOOKUPS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(MAX_LOOKUPS_AT_ONCE);

impl Attribution {
    /// [`Attribution::lookup`] on the blocking pool, at most [`MAX_LOOKUPS_AT_ONCE`] at a time
    /// in the process.
    pub async fn lookup_off_worker(
        self: &Arc<Self>,
        transport: Transport,
        peer: SocketAddr,
        local: SocketAddr,
    ) -> Option<Origin> {
        if switched_off() {
            return None;
        }
        let permit = LOOKUPS.acquire().await.ok()?;
        let this = self.clone();
        // The permit goes with the lookup: a caller that stops waiting (its connection closed)
        // does not free a slot while the scan still runs.
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            this.lookup(transport, peer, local)
        })
        .await
        .ok()
        .flatten()
    }
}

/// A connection's peer, resolved to its [`Origin`] at most once.
#[derive(Debug)]
pub struct PeerOrigin {
    peer: SocketAddr,
    local: SocketAddr,
    attribution: Option<Arc<Attribution>>,
    resolved: tokio::sync::OnceCell<Option<Arc<Origin>>>,
}

impl PeerOrigin {
    /// A TCP peer of a listener inside the sandbox.
    pub fn new(attribution: Arc<Attribution>, peer: SocketAddr, local: SocketAddr) -> PeerOrigin {
        PeerOrigin {
            peer,
            local,
            attribution: Some(attribution),
            resolved: tokio::sync::OnceCell::new(),
        }
    }

    /// A peer outside any sandbox (the host-side listener): never attributed.
    pub fn none() -> PeerOrigin {
        let unspecified = SocketAddr::new(IpAddr::from([0, 0, 0, 0]), 0);
        PeerOrigin {
            peer: unspecified,
            local: unspecified,
            attribution: None,
            resolved: tokio::sync::OnceCell::const_new_with(None),
        }
    }

    /// The origin, looked up (off the async workers) on the first call; later calls, and
    /// calls racing the first, get its answer.
    pub async fn get(&self) -> Option<Arc<Origin>> {
        self.resolved
            .get_or_init(|| async {
                let attribution = self.attribution.as_ref()?;
                let start = std::time::Instant::now();
                let origin = attribution
                    .lookup_off_worker(Transport::Tcp, self.peer, self.local)
                    .await;
                tracing::debug!(
                    micros = start.elapsed().as_micros() as u64,
                    found = origin.is_some(),
                    "connection attributed"
                );
                origin.map(Arc::new)
            })
            .await
            .clone()
    }
}

/// `HIVE_BENCH_NO_ATTRIBUTION=1` (read once): no lookups, so `benches/connections.mjs` can
/// measure what attribution costs per connection.
fn switched_off() -> bool {
    static OFF: OnceLock<bool> = OnceLock::new();
    *OFF.get_or_init(|| std::env::var_os("HIVE_BENCH_NO_ATTRIBUTION").is_some_and(|v| v == "1"))
}

// ----- /proc -----

/// What attribution reads of `/proc/<pid>/status`.
struct Status {
    nspid: Vec<i32>,
    nssid: Vec<i32>,
    ppid: i32,
}

fn read_status(host_pid: i32) -> Option<Status> {
    let text = std::fs::read_to_string(format!("/proc/{host_pid}/status")).ok()?;
    let numbers = |name: &str| -> Vec<i32> {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| {
                v.split_whitespace()
                    .filter_map(|n| n.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    };
    let nspid = numbers("NSpid:");
    if nspid.is_empty() {
        return None;
    }
    Some(Status {
        nssid: numbers("NSsid:"),
        ppid: numbers("PPid:").first().copied().unwrap_or(0),
        nspid,
    })
}

/// The inode of `host_pid`'s PID namespace.
fn pid_namespace(host_pid: i32) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(format!("/proc/{host_pid}/ns/pid"))
        .ok()
        .map(|m| m.ino())
}

fn read_command(host_pid: i32) -> Vec<String> {
    let raw = std::fs::read(format!("/proc/{host_pid}/cmdline")).unwrap_or_default();
    raw.split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

/// `addr` as `/proc/net/{tcp,udp}*` prints it: the address as 32-bit words in host byte order,
/// each `%08X`, then `:%04X` port.
fn proc_net_addr(addr: SocketAddr) -> String {
    let words: Vec<u32> = match addr.ip() {
        IpAddr::V4(v4) => vec![u32::from_ne_bytes(v4.octets())],
        IpAddr::V6(v6) => v6
            .octets()
            .chunks_exact(4)
            .map(|c| u32::from_ne_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
    };
    let mut out: String = words.iter().map(|w| format!("{w:08X}")).collect();
    out.push_str(&format!(":{:04X}", addr.port()));
    out
}

/// The inode of the socket whose local address is `peer` (and, for TCP, remote `local`) in the
/// network namespace of `init`.
fn socket_inode(
    init: i32,
    transport: Transport,
    peer: SocketAddr,
    local: SocketAddr,
) -> Option<u64> {
    let files: &[&str] = match (transport, peer.ip()) {
        (Transport::Tcp, IpAddr::V4(_)) => &["tcp", "tcp6"],
        (Transport::Tcp, IpAddr::V6(_)) => &["tcp6", "tcp"],
        (Transport::Udp, IpAddr::V4(_)) => &["udp", "udp6"],
        (Transport::Udp, IpAddr::V6(_)) => &["udp6", "udp"],
    };
    let want_local = proc_net_addr(peer);
    let want_remote = proc_net_addr(local);
    for file in files {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{init}/net/{file}")) else {
            continue;
        };
        if let Some(inode) = find_inode(
            &text,
            &want_local,
            transport.eq(&Transport::Tcp).then_some(&want_remote),
        ) {
            return Some(inode);
        }
    }
    None
}

/// The inode on the first line of a `/proc/net/*` table with `local` (and `remote`, if given).
fn find_inode(table: &str, local: &str, remote: Option<&String>) -> Option<u64> {
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let matches =
            f.get(1) == Some(&local) && remote.is_none_or(|r| f.get(2) == Some(&r.as_str()));
        if !matches {
            return None;
        }
        f.get(9)?.parse().ok().filter(|inode| *inode != 0)
    })
}

/// The first process `is_owner` accepts in the trees under `roots`, one tree after the other (the
/// last root is init, which itself is not searched; within a tree, parents before children).
fn find_owner(roots: &[i32], mut is_owner: impl FnMut(i32) -> bool) -> Option<i32> {
    let (init, execs) = roots.split_last()?;
    let mut seen = std::collections::HashSet::new();
    let trees = execs
        .iter()
        .map(|root| vec![*root])
        .chain(std::iter::once(children(*init)));
    for tree in trees {
        let mut queue = std::collections::VecDeque::from(tree);
        while let Some(pid) = queue.pop_front() {
            if !seen.insert(pid) || seen.len() > 65_536 {
                continue;
            }
            if is_owner(pid) {
                return Some(pid);
            }
            queue.extend(children(pid));
        }
    }
    None
}

/// The addresses of the sandbox-side socket to find, canonical (IPv4-mapped IPv6 as IPv4).
struct Endpoints {
    transport: Transport,
    /// Its local address (the peer the proxy or responder saw).
    local: SocketAddr,
    /// For TCP, its remote address (the proxy's side).
    remote: Option<SocketAddr>,
}

impl Endpoints {
    fn new(transport: Transport, peer: SocketAddr, local: SocketAddr) -> Endpoints {
        Endpoints {
            transport,
            local: canonical(peer),
            remote: (transport == Transport::Tcp).then(|| canonical(local)),
        }
    }
}

fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// Whether `pid` holds a socket with the addresses in `want`: each of its socket fds is borrowed
/// with `pidfd_getfd` (hive's copy is closed at once; the process's socket is untouched) and asked
/// for its addresses. `Err` when the kernel refuses `pidfd_getfd`.
///
/// Reading `/proc/<pid>/net/tcp` instead walks the host's whole TCP hash table (10–30 ms on a
/// large host), which is why this is the first choice.
fn holds_endpoints(pid: i32, want: &Endpoints) -> Result<bool, ()> {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Ok(false);
    };
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0u32) };
    if raw < 0 {
        return Ok(false);
    }
    // SAFETY: `raw` is a new fd owned by nobody else.
    let pidfd = unsafe { OwnedFd::from_raw_fd(raw as RawFd) };
    for fd in fds.flatten() {
        let Ok(link) = std::fs::read_link(fd.path()) else {
            continue;
        };
        if !link.as_os_str().as_encoded_bytes().starts_with(b"socket:[") {
            continue;
        }
        let Some(number) = fd
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<RawFd>().ok())
        else {
            continue;
        };
        // SAFETY: pidfd_getfd takes a pidfd, a target fd number and flags (0); it returns a new
        // fd or -1.
        let dup = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), number, 0u32) };
        if dup < 0 {
            match std::io::Error::last_os_error().raw_os_error() {
                Some(libc::EPERM) | Some(libc::ENOSYS) => return Err(()),
                _ => continue,
            }
        }
        // SAFETY: `dup` is a new fd owned by nobody else; dropping the wrapper closes it.
        let dup = unsafe { OwnedFd::from_raw_fd(dup as RawFd) };
        if socket_matches(dup, want) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Whether a socket has the addresses in `want` (any socket type answers getsockname, so the std
/// wrappers serve only to ask; the fd is closed on return).
fn socket_matches(fd: OwnedFd, want: &Endpoints) -> bool {
    match want.transport {
        Transport::Tcp => {
            let socket = std::net::TcpStream::from(fd);
            socket
                .local_addr()
                .is_ok_and(|a| canonical(a) == want.local)
                && socket
                    .peer_addr()
                    .is_ok_and(|a| Some(canonical(a)) == want.remote)
        }
        Transport::Udp => {
            let socket = std::net::UdpSocket::from(fd);
            socket
                .local_addr()
                .is_ok_and(|a| canonical(a) == want.local)
        }
    }
}

/// Children of every thread of `pid`.
fn children(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for task in tasks.flatten() {
        let path = task.path().join("children");
        if let Ok(text) = std::fs::read_to_string(path) {
            out.extend(
                text.split_whitespace()
                    .filter_map(|p| p.parse::<i32>().ok()),
            );
        }
    }
    out
}

/// Whether `pid` has an fd that is `target` (`socket:[inode]`).
fn holds(pid: i32, target: &str) -> bool {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten()
        .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|link| link.as_os_str() == target))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn proc_net_addresses_are_printed_like_the_kernel_does() {
        let v4: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let v6: SocketAddr = "[::1]:53".parse().unwrap();
        if cfg!(target_endian = "little") {
            assert_eq!(proc_net_addr(v4), "0100007F:1F90");
            assert_eq!(proc_net_addr(v6), "00000000000000000000000001000000:0035");
        }
    }

    #[test]
    fn find_inode_matches_local_and_remote() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
            0: 0100007F:0C38 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 111 1\n\
            1: 0100007F:9C40 0100007F:0C38 01 00000000:00000000 00:00000000 00000000     0        0 222 1\n\
            2: 0100007F:0C38 0100007F:9C40 01 00000000:00000000 00:00000000 00000000     0        0 333 1\n";
        let remote = "0100007F:0C38".to_string();
        assert_eq!(find_inode(table, "0100007F:9C40", Some(&remote)), Some(222));
        assert_eq!(find_inode(table, "0100007F:9C40", None), Some(222));
        assert_eq!(find_inode(table, "0100007F:9C41", Some(&remote)), None);
    }

    // The whole lookup against this test process: a loopback connection's client side is ours.
    #[test]
    fn a_connection_is_attributed_to_the_process_holding_its_socket() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, peer) = listener.accept().unwrap();
        let me = std::process::id() as i32;
        let inode = socket_inode(me, Transport::Tcp, peer, server.local_addr().unwrap()).unwrap();
        assert!(holds(me, &format!("socket:[{inode}]")));
        let want = Endpoints::new(Transport::Tcp, peer, server.local_addr().unwrap());
        assert_eq!(holds_endpoints(me, &want), Ok(true));
        let other = Endpoints::new(Transport::Tcp, server.local_addr().unwrap(), peer);
        assert_eq!(
            holds_endpoints(me, &other),
            Ok(true),
            "the server side is ours too"
        );
        let nobody = Endpoints::new(Transport::Tcp, "127.0.0.1:1".parse().unwrap(), peer);
        assert_eq!(holds_endpoints(me, &nobody), Ok(false));
        let status = read_status(me).unwrap();
        assert_eq!(status.nspid.first(), Some(&me));
        assert!(!read_command(me).is_empty());
        drop(client);
    }
}
