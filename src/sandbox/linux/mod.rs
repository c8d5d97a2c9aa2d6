//! The Linux launcher: runs commands inside a sandbox's own namespaces, confined, with the network
//! failing closed (docs/security.md).
//!
//! # Shape
//! ```text
//! host process (multi-threaded; Node)
//!  ├─ launcher thread (one per process, lives forever; every clone happens here)
//!  ├─ sandbox init   PID 1 in NEWUSER|NEWNS|NEWPID|NEWNET|NEWIPC|NEWUTS|NEWCGROUP: `hive-init init`
//!  └─ workload       (one per spawn) in init's namespaces, a direct child of the host process,
//!                    started by `hive-init spawn`
//! ```
//! `hive-init` is a static executable of a few kB (`crates/launcher`, `#![no_std]`), embedded in
//! the addon and executed from a sealed memfd ([`image`]). Every process inside a sandbox is an
//! exec'd program: no page of the host's memory, argv or environment exists in the sandbox's PID
//! namespace, on any architecture.
//!
//! # How a sandbox starts ([`SandboxHost::start`])
//! 1. On the launcher thread: create the Landlock ruleset, resolve the [`plan::InitPlan`] (system
//!    dirs, `/etc` secrets, mounts), make a control socketpair; the `hive-init` memfd and the
//!    seccomp image exist once per process.
//! 2. `clone` the setup child with every namespace, `CLONE_VM` and `CLONE_PIDFD`: it runs in the
//!    host's memory on a stack of its own (`SetupStack`, with every signal blocked), so no page
//!    table is copied whatever the size of the host's heap. The parent opens its namespace fds,
//!    writes `uid_map` and `gid_map` (see *Identity*; `setgroups=deny` first when unprivileged)
//!    and sends "go".
//!    **After clone, before "go"** is where per-sandbox host-side set-up belongs (the child waits
//!    on the control socket; e.g. placing its pid into a cgroup): see `start_on_launcher`.
//! 3. The child sets up `lo`, the proxy listener, the capture routes, DNS sockets and capture
//!    listeners of the transparent path, the filesystem and the Landlock rules
//!    (`hive_launcher::setup`, `#![no_std]` without `alloc`, reading a borrowed view of the plan,
//!    [`plan::SetupView`]) and sends the sockets back over `SCM_RIGHTS`
//!    ([`Handover`]), after the `/dev/fuse` fd of each mount that needs per-file ACLs
//!    ([`BindMount::fuse`]): the host serves those ([`Handover::fuse`]; nothing inside may touch
//!    them before). Ports added later get capture listeners from a setns helper
//!    ([`SandboxHost::open_capture_listeners`]).
//! 4. It executes `hive-init init` (`hive_launcher::stub::exec_init`), which tells the host it
//!    runs and reaps orphans as PID 1 (`hive_launcher::init`).
//!
//! # How a process is spawned ([`SandboxHost::spawn`])
//! 1. On the launcher thread: the shim's argument list (the command's argv, cwd and candidate
//!    paths, [`CommandStrings::shim_argv`]) and environment, stdio pipes, an exec-status pipe and a
//!    pid pipe, all `O_CLOEXEC`.
//! 2. Start a helper with `CLONE_VM | CLONE_VFORK` (like `posix_spawn`: no copy of the host's page
//!    tables, all signals blocked) that only moves the fds into fixed slots and executes
//!    `hive-init spawn` (`hive_launcher::stub::exec_spawn_shim`): nothing of the host's memory
//!    goes further.
//! 3. The shim joins init's namespaces through the `/proc/<init>/ns/*` fds the parent opened at
//!    start (user namespace first, PID namespace last) and forks the workload with
//!    `CLONE_PARENT`, so the workload is a child of the host process inside the sandbox's PID
//!    namespace; it reports the workload's pid and exits.
//! 4. The workload confines itself (`hive_launcher::spawn`: new session and process group, cwd,
//!    every capability dropped, no_new_privs, Landlock, fds closed at exec, seccomp) and execs.
//!    The exec-status pipe tells the launcher "exec happened" (EOF) or which step failed.
//! 5. The parent opens a pidfd for it; [`SandboxProcess::wait`] waits on that pidfd with tokio's
//!    `AsyncFd` and reads the status with `waitid(P_PIDFD)`.
//!
//! Why a spawn shim and not "init forks on request": the workload stays a child of the host, so
//! its exit status comes straight from the kernel (no status protocol); init stays a trivial
//! reaper that never parses a request from anyone; and a failure in one spawn cannot take the
//! sandbox's PID 1 down. The price is one `execveat` of a 6 kB static program per spawn.
//!
//! # Lifetime
//! `close()` sends SIGKILL to init; the kernel then kills every process of the PID namespace.
//! The launcher reaps the workloads (init's exit waits for them) and init. The host dying kills
//! init through `PR_SET_PDEATHSIG`, set from the launcher thread (PDEATHSIG follows the thread
//! that forked, which is why that thread never exits, even when a job panics) and kept across
//! the exec of `hive-init`. An idle sandbox costs init's few pages. No host state is left: the
//! namespaces disappear with their last process and fd; there are no interfaces, rules or
//! mounts on the host.
//!
//! # Identity
//! Inside, everything runs as uid/gid 0 of the sandbox's user namespace, the only id mapped
//! (files of other owners show as `nobody`):
//! - Unprivileged: 0 is the caller's uid/gid; files written to a writable mount belong to the
//!   user running hive.
//! - Root: 0 is host uid/gid [`idmap::ROOT_MAPPED_ID`] (`nobody`), never host root. The
//!   configured mounts are idmapped ([`idmap`]), so host-root-owned data appears owned by the
//!   sandbox's root and files the sandbox writes land owned by host root, the user running hive.
//!   Only if the filesystem of a mount cannot be idmapped does the launcher fall back to mapping
//!   0 to host root (logged as a warning); that root has no capability, `/proc/sys` is read-only,
//!   and `/etc` files that are not world-readable are hidden, because DAC would otherwise let it
//!   read them as their owner.
//!
//! # Security
//! See `hive_launcher::spawn` for the confinement order. Until its exec the setup child runs in
//! the host's memory; no other process exists in the sandbox by then, and a host process that
//! could read it must be allowed to ptrace the host (as root, the child's uid is host 65534, but
//! ptrace of it needs `CAP_SYS_PTRACE` over its user namespace). It shares the memory's dumpable
//! flag (`SetupChild` restores it); its code makes raw syscalls only, so it touches no
//! thread-local state such as `errno`.
//! Spawns join the namespaces through fds the parent opened before "go".

pub mod capture;
pub mod cgroup;
pub(crate) mod etc_scan;
#[cfg(test)]
mod fuse_tests;
pub(crate) mod idmap;
pub(crate) mod image;
pub(crate) mod landlock;
pub mod limits;
pub(crate) mod netns;
pub(crate) mod plan;
mod reach;
pub(crate) mod seccomp;
#[cfg(test)]
mod tests;

use std::fmt;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::{mpsc, Arc, Mutex, OnceLock};

use crate::error::{HiveError, Result};
use hive_launcher::stub::{slot, ShimExec};
use hive_launcher::{decode_report, Stage};
use plan::{ptr_array, CommandStrings, InitPlan, SetupView, NS_FLAGS};

/// Where the sandbox's CA bundle (system roots + sandbox CA) is, inside the sandbox.
pub const CA_BUNDLE_PATH: &str = "/run/hive/ca-bundle.pem";

/// `HOME` inside the sandbox: a private tmpfs shared by the sandbox's processes.
pub const SANDBOX_HOME: &str = "/root";

/// Hint attached to `HIVE_USERNS_UNAVAILABLE`.
pub const USERNS_HINT: &str = "user namespaces are unavailable or restricted on this host. On \
Ubuntu 23.10+ the AppArmor setting kernel.apparmor_restrict_unprivileged_userns=1 creates them \
without capabilities: add an AppArmor profile allowing `userns` for the node binary, or set the \
sysctl to 0. Also check kernel.unprivileged_userns_clone=1 and user.max_user_namespaces > 0. hive \
never runs a command unconfined";

/// What a sandbox is made of.
#[derive(Clone)]
pub struct LaunchSpec {
    /// Sandbox name; also its hostname.
    pub name: String,
    /// The configured `local` fs mounts.
    pub mounts: Vec<BindMount>,
    /// System roots + the sandbox CA, PEM; bound over the distribution bundle paths.
    pub ca_bundle_pem: Vec<u8>,
    /// Port of the proxy listener created on 127.0.0.1 inside the sandbox (3128).
    pub proxy_port: u16,
    /// Ports whose connections to any address are captured ([`capture`]): 80, 443 and every
    /// port an allow rule names. Empty: nothing captured (a connection anywhere is refused).
    pub capture_ports: Vec<u16>,
}

impl fmt::Debug for LaunchSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LaunchSpec")
            .field("name", &self.name)
            .field("mounts", &self.mounts)
            .field(
                "ca_bundle_pem",
                &format_args!("{} bytes", self.ca_bundle_pem.len()),
            )
            .field("proxy_port", &self.proxy_port)
            .field("capture_ports", &self.capture_ports)
            .finish()
    }
}

/// One host directory (or file) bound into the sandbox, or served into it over FUSE.
#[derive(Debug, Clone, Default)]
pub struct BindMount {
    /// Host path (must exist).
    pub source: PathBuf,
    /// Absolute path inside the sandbox, e.g. `/workspace`; not inside `/usr`, `/etc`, `/proc`,
    /// `/dev`, `/run` or the other directories the sandbox provides.
    pub target: String,
    /// Read-write if true, else read-only.
    pub writable: bool,
    /// `None`: the whole mount, with `writable` access. `Some`: only these subtrees (each under
    /// `target`) are shown, each bound read-only unless it is writable; everything else in the
    /// mount does not exist inside (the directories on the way to a subtree are empty
    /// directories of the read-only root). `writable` is then ignored.
    pub subtrees: Option<Vec<Subtree>>,
    /// Per-file enforcement: init mounts a FUSE file system at `target` instead of binding
    /// `source`, and hands its `/dev/fuse` fd over ([`Handover::fuse`]) for the host to serve
    /// (`crate::fs::AclFs`) over `source`. `writable` and `subtrees` are then ignored: the server
    /// decides every access.
    pub fuse: bool,
}

/// A subtree of a bind mount the workload may access ([`BindMount::subtrees`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subtree {
    /// Absolute path inside the sandbox, under the mount's target.
    pub path: String,
    /// Read-write if true, else read-only.
    pub writable: bool,
}

/// One command to run.
#[derive(Debug, Clone)]
pub struct ProcessSpec {
    /// Command and arguments; `argv[0]` without a `/` is looked up in the env's `PATH`.
    pub argv: Vec<String>,
    /// The complete environment (see [`default_env`]); nothing of the host's leaks in.
    pub env: Vec<(String, String)>,
    /// Working directory inside the sandbox (absolute); `/` if `None`.
    pub cwd: Option<String>,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitStatus {
    /// Exit code, if it exited.
    pub code: Option<i32>,
    /// Signal number, if a signal killed it.
    pub signal: Option<i32>,
}

/// What a sandbox's init created inside its namespaces and handed to the host over `SCM_RIGHTS`,
/// for the host to serve.
#[derive(Debug)]
pub struct Handover {
    /// The proxy listener on `127.0.0.1:<proxy_port>` inside (blocking mode).
    pub proxy: std::net::TcpListener,
    /// The DNS responder's UDP socket on `127.0.0.1:53` inside (blocking mode).
    pub dns_udp: Option<std::net::UdpSocket>,
    /// The DNS responder's TCP listener on `127.0.0.1:53` inside (blocking mode).
    pub dns_tcp: Option<std::net::TcpListener>,
    /// Capture listeners on `0.0.0.0` and `[::]`, by port (blocking mode); ports that could not
    /// be bound are missing.
    pub transparent: capture::CaptureListeners,
    /// One `/dev/fuse` fd per [`BindMount::fuse`] mount, with its target: mounted inside, not yet
    /// served. Until the host serves it, any access to that mount inside blocks.
    pub fuse: Vec<(String, OwnedFd)>,
}

/// One sandbox's namespaces and init (PID 1).
///
/// Dropping it closes it ([`SandboxHost::close`]).
pub struct SandboxHost {
    inner: Arc<HostInner>,
}

struct HostInner {
    name: String,
    /// init's pid in the host's PID namespace.
    init_pid: i32,
    /// Inode of the sandbox's PID namespace (`/proc/<pid>/ns/pid`).
    pid_ns: u64,
    init_pidfd: OwnedFd,
    /// `/proc/<init>/ns/*`, in [`plan::NS_ORDER`].
    ns_fds: Vec<OwnedFd>,
    landlock: Option<OwnedFd>,
    /// The sandbox's cgroups and rlimits.
    limits: Arc<limits::SandboxLimits>,
    state: Mutex<HostState>,
}

struct HostState {
    closed: bool,
    procs: Vec<Arc<ProcState>>,
}

/// A running (or finished) sandboxed process.
pub struct SandboxProcess {
    /// Pid inside the sandbox's PID namespace.
    pub pid: i32,
    /// Write end of its stdin pipe.
    pub stdin: Option<OwnedFd>,
    /// Read end of its stdout pipe.
    pub stdout: OwnedFd,
    /// Read end of its stderr pipe.
    pub stderr: OwnedFd,
    handle: ProcessHandle,
}

/// Waiting for and signalling a sandboxed process, apart from its stdio
/// ([`SandboxProcess::into_parts`]); [`SandboxProcess`] derefs to it.
#[derive(Clone)]
pub struct ProcessHandle {
    state: Arc<ProcState>,
}

struct ProcState {
    /// Closed by [`ProcessHandle::release`] once the process is reaped.
    pidfd: Mutex<Option<OwnedFd>>,
    /// The workload's pid in the host's PID namespace (also its process group and session).
    host_pid: i32,
    status: Mutex<Option<ExitStatus>>,
    /// The command's own cgroup, where the sandbox has cgroups.
    exec_cgroup: Option<cgroup::ExecCgroup>,
}

impl fmt::Debug for SandboxProcess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SandboxProcess")
            .field("pid", &self.pid)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for SandboxHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SandboxHost")
            .field("name", &self.inner.name)
            .finish_non_exhaustive()
    }
}

// ----- the launcher thread -----

type Job = Box<dyn FnOnce() + Send>;

fn launcher() -> Result<&'static Mutex<mpsc::Sender<Job>>> {
    static LAUNCHER: OnceLock<Mutex<mpsc::Sender<Job>>> = OnceLock::new();
    if let Some(l) = LAUNCHER.get() {
        return Ok(l);
    }
    let (tx, rx) = mpsc::channel::<Job>();
    std::thread::Builder::new()
        .name("hive-launcher".into())
        .spawn(move || {
            // Lives as long as the process: PR_SET_PDEATHSIG of every init follows this thread.
            // A panicking job must not end this thread: that would fire every init's PDEATHSIG.
            // It blocks every signal for its life (the process's other threads take them), so
            // every clone happens with signals blocked and none of its calls is interrupted.
            // SAFETY: plain signal-mask change of this thread.
            unsafe {
                let mut all: libc::sigset_t = std::mem::zeroed();
                libc::sigfillset(&mut all);
                libc::pthread_sigmask(libc::SIG_SETMASK, &all, std::ptr::null_mut());
            }
            while let Ok(job) = rx.recv() {
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
            }
        })
        .map_err(|e| HiveError::io("starting the launcher thread", e))?;
    // A racing caller may have won; its thread then serves everyone and ours idles on recv.
    Ok(LAUNCHER.get_or_init(|| Mutex::new(tx)))
}

/// Runs `f` on the launcher thread and blocks until it returns.
fn on_launcher<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    let (tx, rx) = mpsc::sync_channel(1);
    let job: Job = Box::new(move || {
        let _ = tx.send(f());
    });
    launcher()?
        .lock()
        .map_err(|_| HiveError::Internal("launcher lock poisoned".into()))?
        .send(job)
        .map_err(|_| HiveError::Internal("launcher thread is gone".into()))?;
    rx.recv()
        .map_err(|_| HiveError::Internal("launcher dropped a job".into()))?
}

// ----- small syscall helpers (parent side) -----

fn last_err(context: &str) -> HiveError {
    HiveError::io(context, std::io::Error::last_os_error())
}

fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    let mut fds = [-1; 2];
    // SAFETY: fds is a valid 2-element array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(last_err("pipe2"));
    }
    // SAFETY: pipe2 returned two fresh fds.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Reads up to `buf.len()` bytes until EOF; returns how many.
fn read_full(fd: RawFd, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        let rest = &mut buf[got..];
        // SAFETY: rest is a valid buffer.
        let n = unsafe { libc::read(fd, rest.as_mut_ptr().cast(), rest.len()) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            break;
        }
        got += n as usize;
    }
    Ok(got)
}

fn waitid_pidfd(pidfd: RawFd, flags: libc::c_int) -> std::io::Result<Option<ExitStatus>> {
    loop {
        // SAFETY: siginfo_t is plain data.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: valid pointers; P_PIDFD = 3.
        let r = unsafe { libc::waitid(libc::P_PIDFD, pidfd as libc::id_t, &mut info, flags) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        // SAFETY: waitid filled info (si_pid 0 means nothing to report with WNOHANG).
        let (pid, status) = unsafe { (info.si_pid(), info.si_status()) };
        if pid == 0 {
            return Ok(None);
        }
        return Ok(Some(match info.si_code {
            libc::CLD_EXITED => ExitStatus {
                code: Some(status),
                signal: None,
            },
            _ => ExitStatus {
                code: None,
                signal: Some(status),
            },
        }));
    }
}

/// Runs `clone` (`f`, returning the raw result) with every signal blocked on this thread, like
/// `posix_spawn`: the host's handlers must never run in a child, which inherits the mask and
/// keeps it until its exec (the exec'd program unblocks what it needs). The mask is restored in
/// the parent only: a fork-style child returns from `f` with 0 and must not restore it.
fn with_signals_blocked(f: impl FnOnce() -> libc::c_long) -> libc::c_long {
    // SAFETY: plain signal-mask manipulation of the calling thread.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
        let r = f();
        if r != 0 {
            libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        }
        r
    }
}

fn pidfd_send_signal(pidfd: RawFd, signal: i32) -> std::io::Result<()> {
    pidfd_send_signal_flags(pidfd, signal, 0)
}

/// `PIDFD_SIGNAL_PROCESS_GROUP` (`linux/pidfd.h`, Linux 6.9): signal the pidfd's process group.
const PIDFD_SIGNAL_PROCESS_GROUP: u32 = 1 << 2;

fn pidfd_send_signal_flags(pidfd: RawFd, signal: i32, flags: u32) -> std::io::Result<()> {
    // SAFETY: plain syscall.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd,
            signal,
            std::ptr::null::<u8>(),
            flags,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn userns_error(detail: String) -> HiveError {
    HiveError::UsernsUnavailable(format!("{USERNS_HINT} ({detail})"))
}

fn errno_text(errno: i32) -> String {
    std::io::Error::from_raw_os_error(errno).to_string()
}

// ----- start -----

impl SandboxHost {
    /// Creates the sandbox's namespaces and init; returns what init created inside for the host
    /// to serve ([`Handover`]: the proxy listener, blocking mode).
    ///
    /// Blocks for the setup (a few milliseconds); call it from `spawn_blocking` in async code.
    ///
    /// # Errors
    /// `HIVE_USERNS_UNAVAILABLE` (with [`USERNS_HINT`]) when the kernel refuses the namespaces
    /// or their setup; `HIVE_INVALID_ARGUMENT` for a bad mount target; I/O errors for a missing
    /// mount source.
    pub fn start(spec: LaunchSpec) -> Result<(SandboxHost, Handover)> {
        Self::start_with_limits(spec, crate::config::Limits::default())
    }

    /// [`SandboxHost::start`] with resource limits for the whole sandbox ([`limits`]).
    ///
    /// # Errors
    /// Those of `start`, and `HIVE_LIMITS_UNENFORCEABLE` when a given limit has no mechanism here.
    pub fn start_with_limits(
        spec: LaunchSpec,
        limits: crate::config::Limits,
    ) -> Result<(SandboxHost, Handover)> {
        on_launcher(move || start_on_launcher(&spec, &limits))
    }

    /// The sandbox's limits: usage, hits, changes ([`limits::SandboxLimits`]).
    pub fn limits(&self) -> &Arc<limits::SandboxLimits> {
        &self.inner.limits
    }

    /// Spawns a process in the sandbox. Blocks until it has exec'd (or failed to), a few
    /// milliseconds; see [`SandboxHost::spawn_async`].
    ///
    /// # Errors
    /// `HIVE_SPAWN_FAILED` when the command cannot be found or executed (with the reason),
    /// `HIVE_SANDBOX_CLOSED` after [`SandboxHost::close`], `HIVE_INVALID_ARGUMENT` for an empty
    /// command, a NUL byte, a relative cwd.
    pub fn spawn(&self, p: ProcessSpec) -> Result<SandboxProcess> {
        let cmd = CommandStrings::build(&p)?;
        let inner = self.inner.clone();
        on_launcher(move || spawn_on_launcher(&inner, cmd, &p))
    }

    /// [`SandboxHost::spawn`] without blocking the calling tokio worker.
    pub async fn spawn_async(&self, p: ProcessSpec) -> Result<SandboxProcess> {
        let cmd = CommandStrings::build(&p)?;
        let inner = self.inner.clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = tx.send(spawn_on_launcher(&inner, cmd, &p));
        });
        launcher()?
            .lock()
            .map_err(|_| HiveError::Internal("launcher lock poisoned".into()))?
            .send(job)
            .map_err(|_| HiveError::Internal("launcher thread is gone".into()))?;
        rx.await
            .map_err(|_| HiveError::Internal("launcher dropped a job".into()))?
    }

    /// Kills every process of the sandbox (init dies, so the PID namespace dies) and reaps them.
    /// Idempotent. Blocks until they are gone (they are SIGKILLed, so this is quick).
    pub fn close(&self) {
        let inner = self.inner.clone();
        let r = on_launcher(move || {
            close_on_launcher(&inner);
            Ok(())
        });
        if let Err(e) = r {
            tracing::warn!(sandbox = %self.inner.name, error = %e, "closing the sandbox");
        }
    }

    /// Creates capture listeners (`0.0.0.0` and `[::]`) for `ports` inside the running sandbox,
    /// through a short-lived helper that joins its user and network namespaces
    /// ([`capture::open_capture_listeners`]); ports that cannot be bound are missing from the
    /// result. Blocks for a millisecond or so.
    ///
    /// # Errors
    /// `HIVE_SANDBOX_CLOSED` after [`SandboxHost::close`]; an internal error if the helper fails.
    pub fn open_capture_listeners(&self, ports: Vec<u16>) -> Result<capture::CaptureListeners> {
        let inner = self.inner.clone();
        on_launcher(move || {
            if inner.state.lock().map(|s| s.closed).unwrap_or(true) {
                return Err(HiveError::SandboxClosed(inner.name.clone()));
            }
            let fd = |i: usize| inner.ns_fds.get(i).map(|f| f.as_raw_fd()).unwrap_or(-1);
            capture::open_capture_listeners(fd(0), fd(2), &ports)
        })
    }

    /// The sandbox name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// init's pid as the host sees it (for diagnostics and tests).
    pub fn init_host_pid(&self) -> i32 {
        self.inner.init_pid
    }

    /// The inode number of the sandbox's PID namespace: every process of the sandbox has
    /// `/proc/<pid>/ns/pid` -> `pid:[<this>]` (for diagnostics and tests).
    pub fn pid_namespace_id(&self) -> u64 {
        self.inner.pid_ns
    }
}

impl Drop for SandboxHost {
    fn drop(&mut self) {
        self.close();
    }
}

fn start_on_launcher(
    spec: &LaunchSpec,
    limits: &crate::config::Limits,
) -> Result<(SandboxHost, Handover)> {
    let t0 = std::time::Instant::now();
    let ruleset = landlock::create_ruleset()
        .map_err(|e| HiveError::io("creating the Landlock ruleset", e))?;
    if ruleset.is_none() {
        // File ACLs hold without it (binds and FUSE enforce them); what is lost is the
        // scoping between separate execs (docs/isolation.md "Honest limits").
        tracing::warn!(sandbox = %spec.name, "Landlock is unavailable: processes of separate execs can signal each other and reach each other's abstract unix sockets");
    }
    // Both once per process; made here so a failure shows at the sandbox's start.
    seccomp::image_fd()?;
    let image = image::init_image()?;
    let mut pair = [-1; 2];
    // SAFETY: pair is a valid 2-element array.
    if unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            pair.as_mut_ptr(),
        )
    } < 0
    {
        return Err(last_err("socketpair"));
    }
    // SAFETY: fresh fds.
    let (ours, theirs) = unsafe { (OwnedFd::from_raw_fd(pair[0]), OwnedFd::from_raw_fd(pair[1])) };
    let (ll_fd, ll_fs) = match &ruleset {
        Some(r) => (r.fd.as_raw_fd(), r.handled_fs),
        None => (-1, 0),
    };
    let mut plan = InitPlan::build(spec, theirs.as_raw_fd(), ll_fd, ll_fs)?;
    plan.image = image;
    let t_plan = t0.elapsed();
    // SAFETY: trivial getters.
    let (mut uid, mut gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    // Kept open until init has inherited them (dropped when this function returns).
    let mut _trees: Vec<OwnedFd> = Vec::new();
    if uid == 0 {
        match idmapped_trees(&plan) {
            Ok(t) => {
                let bound = plan.mounts.iter_mut().filter(|m| m.binds_source());
                for (m, tree) in bound.zip(&t) {
                    m.tree = tree.as_raw_fd();
                }
                _trees = t;
                (uid, gid) = (idmap::ROOT_MAPPED_ID, idmap::ROOT_MAPPED_ID);
            }
            Err(e) => crate::diagnostics::defer(
                &spec.name,
                crate::diagnostics::code::IDMAP_FALLBACK,
                format!(
                    "a mount could not be idmapped ({e}): the sandbox's root is host root \
                     (without capabilities) instead of nobody"
                ),
            ),
        }
    }
    // What the parent needs of the plan while the child runs, copied out first: from the clone
    // until the child has exec'd, the plan belongs to the child.
    let mut fuse_targets: Vec<Option<String>> = plan
        .mounts
        .iter()
        .map(|m| {
            m.fuse
                .then(|| format!("/{}", m.target_rel.to_string_lossy()))
        })
        .collect();
    let fuse_count = fuse_targets.iter().flatten().count();
    let t_idmap = t0.elapsed();
    // Limits before the clone (a refusal costs no child); init joins the cgroups itself after
    // "go". RLIMIT_NPROC binds the sandbox only if its root is not host root.
    let mut limits = limits::SandboxLimits::prepare(limits, uid != 0)?;
    plan.cgroup_join = limits.init_join_files();
    let t_limits = t0.elapsed();
    // The setup child's borrowed view of the plan (`hive_launcher::setup::Plan`); declared
    // before the clone, so it outlives the child's use of it on every path (see the SAFETY note).
    let mut view = SetupView::new(&plan);
    let mut setup_plan = view.plan();
    let stack = SetupStack::new()?;
    // SAFETY: plain prctl query.
    let dumpable_before = unsafe { libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) };
    let plan_ptr: *mut hive_launcher::setup::Plan = &mut setup_plan;
    let mut pidfd: libc::c_int = -1;
    // The setup child shares this process's memory (CLONE_VM: no copy of the host's page tables,
    // whatever the size of its heap) until it executes hive-init.
    // SAFETY: the child runs only `setup_entry` (`hive_launcher::setup::run`: `no_std` without
    // `alloc`, raw syscalls that touch no thread-local state, never returns; it ends in
    // execveat or exit_group) on `stack`, with `setup_plan` (and the `view` and `plan` it
    // borrows) as its only data, which this function neither touches nor frees until the child
    // has exec'd or died: every path below returns through `fail`, which kills and reaps it,
    // or after its "init runs" message, and the `SetupChild` guard (declared after these, so
    // dropped first) kills and reaps it on a panic.
    let pid = with_signals_blocked(|| unsafe {
        libc::clone(
            setup_entry,
            stack.top(),
            NS_FLAGS | libc::CLONE_VM | libc::CLONE_PIDFD | libc::SIGCHLD,
            plan_ptr.cast(),
            &mut pidfd as *mut libc::c_int,
        ) as libc::c_long
    });
    if pid < 0 {
        let e = std::io::Error::last_os_error();
        return Err(match e.raw_os_error() {
            Some(libc::EPERM | libc::ENOSPC | libc::EUSERS | libc::EINVAL | libc::EACCES) => {
                userns_error(format!("clone of the sandbox init failed: {e}"))
            }
            _ => HiveError::io("clone of the sandbox init", e),
        });
    }
    // SAFETY: CLONE_PIDFD filled a fresh fd.
    let init_pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    // Declared after the pidfd, so dropped before it closes.
    let mut setup_child = SetupChild {
        pidfd: init_pidfd.as_raw_fd(),
        armed: true,
        dumpable_before,
    };
    drop(theirs);
    let fail = |err: HiveError| -> HiveError {
        let _ = pidfd_send_signal(init_pidfd.as_raw_fd(), libc::SIGKILL);
        let _ = waitid_pidfd(init_pidfd.as_raw_fd(), libc::WEXITED);
        err
    };
    let t_clone = t0.elapsed();
    limits.attach(pid as i32);
    let limits = Arc::new(limits);
    // Opened before "go", while the child is still the host's uid.
    let ns_fds = match open_namespaces(pid as i32) {
        Ok(fds) => fds,
        Err(e) => return Err(fail(e)),
    };
    let pid_ns = ns_fds
        .last()
        .and_then(|f| std::fs::File::from(f.try_clone().ok()?).metadata().ok())
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
        .unwrap_or(0);
    if let Err(e) = write_id_maps(pid as i32, uid, gid) {
        return Err(fail(e));
    }
    let t_go = t0.elapsed();
    // ---- After clone, before "go": the child waits on the control socket and nothing of the
    // sandbox runs yet. Host-side set-up of the new sandbox (its cgroup: move `pid` there) goes
    // here; on failure return `Err(fail(e))`, which kills and reaps the child. ----
    // "go"
    // SAFETY: writing one byte from a valid buffer.
    if unsafe { libc::write(ours.as_raw_fd(), b"g".as_ptr().cast(), 1) } != 1 {
        return Err(fail(last_err("starting the sandbox init")));
    }
    // Room for every capture listener the child may hand over (it does not touch the heap, so
    // this is only to allocate once).
    let mut handed = Handed {
        transparent: Vec::with_capacity(2 * spec.capture_ports.len()),
        ..Handed::default()
    };
    let mut fuse = Vec::with_capacity(fuse_count);
    let listener = loop {
        let report = match netns::recv_report(ours.as_raw_fd()) {
            Ok(r) => r,
            Err(e) => return Err(fail(HiveError::io("reading the sandbox init's report", e))),
        };
        let Some((buf, fd)) = report else {
            let status = waitid_pidfd(init_pidfd.as_raw_fd(), libc::WEXITED)
                .ok()
                .flatten();
            return Err(HiveError::Internal(format!(
                "sandbox init exited during setup: {status:?}"
            )));
        };
        if handed.take(&buf, fd) {
            continue;
        }
        let (stage, errno) = decode_report(&buf);
        match (stage, handed.last_fd.take()) {
            (Stage::FuseHandover, Some(fd)) => {
                match usize::try_from(errno)
                    .ok()
                    .and_then(|i| fuse_targets.get_mut(i))
                    .and_then(Option::take)
                {
                    Some(target) => fuse.push((target, fd)),
                    _ => {
                        return Err(fail(HiveError::Internal(format!(
                            "sandbox init handed over a FUSE connection for mount {errno}"
                        ))))
                    }
                }
            }
            (Stage::Ok, Some(_)) if fuse.len() != fuse_count => {
                return Err(fail(HiveError::Internal(
                    "sandbox init did not hand over every FUSE connection".into(),
                )))
            }
            (Stage::Ok, Some(fd)) => break std::net::TcpListener::from(fd),
            _ => return Err(fail(init_error(stage, errno))),
        }
    };
    let t_setup = t0.elapsed();
    // The setup child executes hive-init, whose first message says it runs.
    match netns::recv_report(ours.as_raw_fd()) {
        Ok(Some((buf, _))) => match decode_report(&buf) {
            (Stage::InitReady, _) => {}
            (stage, errno) => return Err(fail(init_error(stage, errno))),
        },
        Ok(None) => {
            return Err(fail(HiveError::Internal(
                "sandbox init exited instead of executing hive-init".into(),
            )))
        }
        Err(e) => return Err(fail(HiveError::io("reading the sandbox init's report", e))),
    }
    let us = |d: std::time::Duration| d.as_micros() as u64;
    // Where a cold start's time goes (cumulative microseconds; docs/decisions.md has a table).
    tracing::debug!(
        sandbox = %spec.name,
        plan_us = us(t_plan),
        idmap_us = us(t_idmap),
        cgroups_us = us(t_limits),
        clone_us = us(t_clone),
        id_maps_us = us(t_go),
        setup_us = us(t_setup),
        init_exec_us = us(t0.elapsed()),
        "sandbox started"
    );
    // hive-init runs: the child no longer uses `plan` or `stack`.
    setup_child.armed = false;
    drop(setup_child);
    drop(stack);
    let inner = HostInner {
        name: spec.name.clone(),
        init_pid: pid as i32,
        pid_ns,
        init_pidfd,
        ns_fds,
        landlock: ruleset.map(|r| r.fd),
        limits,
        state: Mutex::new(HostState {
            closed: false,
            procs: Vec::new(),
        }),
    };
    Ok((
        SandboxHost {
            inner: Arc::new(inner),
        },
        Handover {
            proxy: listener,
            dns_udp: handed.dns_udp,
            dns_tcp: handed.dns_tcp,
            transparent: handed.transparent,
            fuse,
        },
    ))
}

/// `clone` entry point of the sandbox's setup child: `arg` is the launcher's
/// `*mut hive_launcher::setup::Plan`.
extern "C" fn setup_entry(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: this is the freshly cloned setup child (only `start_on_launcher` passes this entry
    // to clone), and `arg` is the plan it lends the child, untouched and alive until the child
    // has exec'd or died.
    unsafe { hive_launcher::setup::run(&mut *(arg as *mut hive_launcher::setup::Plan)) }
}

/// The setup child's stack: anonymous memory with a guard page below it (an overflow faults
/// instead of writing into the host's memory, which the child shares).
struct SetupStack {
    base: *mut libc::c_void,
    len: usize,
}

impl SetupStack {
    const SIZE: usize = 256 * 1024;
    const GUARD: usize = 64 * 1024;

    fn new() -> Result<SetupStack> {
        let len = Self::SIZE + Self::GUARD;
        // SAFETY: a fresh anonymous private mapping; no existing memory is affected.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(last_err("mapping the setup child's stack"));
        }
        let stack = SetupStack { base, len };
        // SAFETY: the lowest GUARD bytes of our own fresh mapping.
        if unsafe { libc::mprotect(base, Self::GUARD, libc::PROT_NONE) } < 0 {
            return Err(last_err("guarding the setup child's stack"));
        }
        Ok(stack)
    }

    /// The initial stack pointer (stacks grow down), 16-byte aligned.
    fn top(&self) -> *mut libc::c_void {
        ((self.base as usize + self.len) & !0xf) as *mut libc::c_void
    }
}

impl Drop for SetupStack {
    fn drop(&mut self) {
        // SAFETY: our own mapping; the child that used it has exec'd or is gone (see callers).
        unsafe { libc::munmap(self.base, self.len) };
    }
}

/// What must happen once the setup child no longer runs in the host's memory, on every path:
/// kill and reap it if it has not exec'd (a panic between its clone and its exec; it must never
/// run on a freed stack), then give the host process back its dumpability. The child's switch
/// to the sandbox's uid (as root: host uid 65534) makes the kernel clear the dumpable flag of
/// the memory it shares with the host, which would leave the host without core dumps.
struct SetupChild {
    pidfd: RawFd,
    /// Still running in the host's memory: kill it on drop.
    armed: bool,
    dumpable_before: libc::c_int,
}

impl Drop for SetupChild {
    fn drop(&mut self) {
        if self.armed {
            let _ = pidfd_send_signal(self.pidfd, libc::SIGKILL);
            let _ = waitid_pidfd(self.pidfd, libc::WEXITED);
        }
        if self.dumpable_before == 1 {
            // SAFETY: plain prctl of this process; the child no longer shares its memory.
            unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 1, 0, 0, 0) };
        }
    }
}

/// The fds init sends before its final report ([`capture::FdKind`]).
#[derive(Default)]
struct Handed {
    dns_udp: Option<std::net::UdpSocket>,
    dns_tcp: Option<std::net::TcpListener>,
    transparent: capture::CaptureListeners,
    /// The fd attached to the final report (the proxy listener).
    last_fd: Option<OwnedFd>,
}

impl Handed {
    /// Keeps an fd message's fd; `false` (keeping a report's fd in `last_fd`) for a report.
    fn take(&mut self, buf: &[u8; 8], fd: Option<OwnedFd>) -> bool {
        let word = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]);
        let port = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]) as u16;
        let Some(kind) = capture::FdKind::from_word(word) else {
            self.last_fd = fd;
            return false;
        };
        if let Some(fd) = fd {
            match kind {
                capture::FdKind::DnsUdp => self.dns_udp = Some(fd.into()),
                capture::FdKind::DnsTcp => self.dns_tcp = Some(fd.into()),
                capture::FdKind::CaptureV4 | capture::FdKind::CaptureV6 => {
                    self.transparent.push((port, fd.into()))
                }
            }
        }
        true
    }
}

/// Opens init's namespaces in [`plan::NS_ORDER`].
fn open_namespaces(pid: i32) -> Result<Vec<OwnedFd>> {
    plan::NS_ORDER
        .iter()
        .map(|(name, _)| {
            let path = format!("/proc/{pid}/ns/{name}");
            std::fs::File::open(&path)
                .map(OwnedFd::from)
                .map_err(|e| HiveError::io(format!("opening {path}"), e))
        })
        .collect()
}

/// One idmapped tree per configured mount (root only), all or nothing.
fn idmapped_trees(plan: &InitPlan) -> std::io::Result<Vec<OwnedFd>> {
    if !plan.mounts.iter().any(|m| m.binds_source()) {
        return Ok(Vec::new());
    }
    // One mapping namespace serves every sandbox of the process (it only describes the mapping;
    // making one costs a clone and two writes).
    static USERNS: Mutex<Option<Arc<OwnedFd>>> = Mutex::new(None);
    let userns = {
        let mut cached = USERNS
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match &*cached {
            Some(fd) => fd.clone(),
            None => {
                let fd = Arc::new(idmap::mapping_userns(idmap::ROOT_MAPPED_ID)?);
                *cached = Some(fd.clone());
                fd
            }
        }
    };
    plan.mounts
        .iter()
        .filter(|m| m.binds_source())
        .map(|m| idmap::idmapped_tree(&m.source, &userns, m.writable))
        .collect()
}

/// Maps inside uid/gid 0 to `uid`/`gid` on the host (the only ids inside).
fn write_id_maps(pid: i32, uid: u32, gid: u32) -> Result<()> {
    let write = |file: &str, data: String| -> Result<()> {
        let path = format!("/proc/{pid}/{file}");
        std::fs::write(&path, data).map_err(|e| {
            if matches!(e.raw_os_error(), Some(libc::EPERM | libc::EACCES)) {
                userns_error(format!("writing {path}: {e}"))
            } else {
                HiveError::io(format!("writing {path}"), e)
            }
        })
    };
    // Required before an unprivileged gid_map; root keeps `allow` so init and the workloads
    // can drop root's supplementary groups (they hold no capability to call it again).
    // SAFETY: trivial getter.
    if unsafe { libc::geteuid() } != 0 {
        write("setgroups", "deny".into())?;
    }
    write("uid_map", format!("0 {uid} 1\n"))?;
    write("gid_map", format!("0 {gid} 1\n"))?;
    Ok(())
}

fn init_error(stage: Stage, errno: i32) -> HiveError {
    let detail = format!(
        "sandbox setup failed while {}: {}",
        stage.describe(),
        errno_text(errno)
    );
    if matches!(stage, Stage::OpenFuse | Stage::MountFuse) {
        return HiveError::FsUnenforceable(format!(
            "{detail}; a mount needs per-file enforcement through FUSE and the sandbox cannot \
             mount it: make /dev/fuse usable (many hosts ship it 0666), run as root, or use only \
             plain \"<dir>/**\" rules without audit"
        ));
    }
    let privileged = matches!(errno, libc::EPERM | libc::EACCES);
    let setup = (stage as u32) <= (Stage::PivotRoot as u32);
    if privileged && setup {
        userns_error(detail)
    } else {
        HiveError::Internal(detail)
    }
}

// ----- spawn -----

fn spawn_on_launcher(
    inner: &HostInner,
    cmd: CommandStrings,
    p: &ProcessSpec,
) -> Result<SandboxProcess> {
    {
        let mut st = inner
            .state
            .lock()
            .map_err(|_| HiveError::Internal("host state poisoned".into()))?;
        if st.closed {
            return Err(HiveError::SandboxClosed(inner.name.clone()));
        }
        // Reap what already exited so the list does not grow with dropped processes.
        st.procs
            .retain(|s| !matches!(s.reap(libc::WNOHANG), Ok(Some(_)) | Err(_)));
    }
    let (stdin_r, stdin_w) = pipe()?;
    let (stdout_r, stdout_w) = pipe()?;
    let (stderr_r, stderr_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    let (pid_r, pid_w) = pipe()?;
    let landlock = inner.landlock.as_ref().map(|f| f.as_raw_fd());
    // `_exec_procs` backs a cgroup slot of `child_limits` until the shim has joined it.
    let (child_limits, exec_cgroup) = inner.limits.command();
    let (exec_cgroup, _exec_procs) = exec_cgroup.unzip();
    let shim_argv = cmd.shim_argv(landlock.is_some(), &child_limits.rlimits);
    let argv_ptrs = ptr_array(&shim_argv);
    let envp_ptrs = ptr_array(&cmd.envp);
    let mut fds = [-1; slot::COUNT];
    fds[slot::STDIO as usize] = stdin_r.as_raw_fd();
    fds[slot::STDIO as usize + 1] = stdout_w.as_raw_fd();
    fds[slot::STDIO as usize + 2] = stderr_w.as_raw_fd();
    fds[slot::ERR as usize] = err_w.as_raw_fd();
    fds[slot::PID as usize] = pid_w.as_raw_fd();
    for (i, fd) in inner.ns_fds.iter().enumerate() {
        fds[slot::NS as usize + i] = fd.as_raw_fd();
    }
    fds[slot::LANDLOCK as usize] = landlock.unwrap_or(-1);
    fds[slot::SECCOMP as usize] = seccomp::image_fd()?;
    for (i, fd) in child_limits.cgroup_procs.iter().enumerate() {
        fds[slot::CGROUPS as usize + i] = *fd;
    }
    fds[slot::CGROUP_INTO as usize] = child_limits.cgroup_into;
    let shim = ShimExec {
        image: image::init_image()?,
        fds,
        argv: argv_ptrs.as_ptr().cast(),
        envp: envp_ptrs.as_ptr().cast(),
    };
    // The helper borrows this process's memory (CLONE_VM | CLONE_VFORK, like posix_spawn: no copy
    // of the host's page tables) only until it executes `hive-init spawn`; this thread waits until
    // then. Nothing of the host reaches the sandbox: the workload is forked by that program.
    let mut helper_stack = vec![0u8; HELPER_STACK];
    let stack_top = (helper_stack.as_mut_ptr() as usize + helper_stack.len()) & !0xf;
    // SAFETY: the child runs only spawn_helper_entry (hive_launcher::stub::exec_spawn_shim:
    // allocation-free, raw syscalls, never returns) on its own stack; CLONE_VFORK keeps `shim`,
    // the strings it points at and the stack alive until the child has exec'd or exited.
    let helper = with_signals_blocked(|| unsafe {
        libc::clone(
            spawn_helper_entry,
            stack_top as *mut libc::c_void,
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            &shim as *const ShimExec as *mut libc::c_void,
        ) as libc::c_long
    }) as libc::c_int;
    drop(helper_stack);
    if helper < 0 {
        return Err(last_err("forking the spawn helper"));
    }
    drop((stdin_r, stdout_w, stderr_w, err_w, pid_w));
    let mut pid_buf = [0u8; 4];
    let got = read_full(pid_r.as_raw_fd(), &mut pid_buf)
        .map_err(|e| HiveError::io("reading the workload pid", e))?;
    let mut status = 0;
    // SAFETY: reaping our own helper.
    unsafe { libc::waitpid(helper as libc::pid_t, &mut status, 0) };
    let mut report = [0u8; 8];
    if got != 4 {
        let n = read_full(err_r.as_raw_fd(), &mut report).unwrap_or(0);
        return Err(if n == 8 {
            let (stage, errno) = decode_report(&report);
            spawn_error(inner, p, stage, errno)
        } else {
            HiveError::Internal(format!("spawn helper failed (wait status {status:#x})"))
        });
    }
    let host_pid = i32::from_le_bytes(pid_buf);
    // SAFETY: plain syscall; the pid is our unreaped child, so it cannot be reused.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, host_pid, 0u32) };
    if pidfd < 0 {
        return Err(last_err("pidfd_open"));
    }
    // SAFETY: fresh fd.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as RawFd) };
    let inner_pid = sandbox_pid(host_pid).unwrap_or(0);
    let state = Arc::new(ProcState {
        pidfd: Mutex::new(Some(pidfd)),
        host_pid,
        status: Mutex::new(None),
        exec_cgroup,
    });
    let n = read_full(err_r.as_raw_fd(), &mut report)
        .map_err(|e| HiveError::io("reading the exec status", e))?;
    if n == 8 {
        let _ = state.reap(libc::WEXITED);
        let (stage, errno) = decode_report(&report);
        return Err(spawn_error(inner, p, stage, errno));
    }
    inner
        .state
        .lock()
        .map_err(|_| HiveError::Internal("host state poisoned".into()))?
        .procs
        .push(state.clone());
    Ok(SandboxProcess {
        pid: inner_pid,
        stdin: Some(stdin_w),
        stdout: stdout_r,
        stderr: stderr_r,
        handle: ProcessHandle { state },
    })
}

/// Starts, once per process and on a background thread, the part of a sandbox's start that
/// depends on no config: the scan of `/etc` ([`etc_scan`]), the cgroup hierarchies, and the
/// hive-init and seccomp images. The first sandbox's start then finds them ready (or waits for
/// the thread's result rather than doing the work twice).
pub fn prewarm() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = std::thread::Builder::new()
            .name("hive-prewarm".into())
            .spawn(|| {
                let _ = etc_scan::hidden();
                let _ = cgroup::hierarchies();
                let _ = image::init_image();
                let _ = seccomp::image_fd();
            });
    });
}

/// Stack of the spawn helper, which only moves fds and calls `execveat`.
const HELPER_STACK: usize = 64 * 1024;

/// `clone` entry point of the spawn helper.
extern "C" fn spawn_helper_entry(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: arg is the launcher's &ShimExec, alive while the launcher waits (CLONE_VFORK); its
    // argv/envp arrays are NULL-terminated over live CStrings.
    unsafe { hive_launcher::stub::exec_spawn_shim(&*(arg as *const ShimExec)) }
}

/// The pid inside the sandbox: the last `NSpid` entry of `/proc/<pid>/status`.
fn sandbox_pid(host_pid: i32) -> Option<i32> {
    let status = std::fs::read_to_string(format!("/proc/{host_pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("NSpid:"))?;
    line.split_whitespace().last()?.parse().ok()
}

fn spawn_error(inner: &HostInner, p: &ProcessSpec, stage: Stage, errno: i32) -> HiveError {
    let argv0 = p.argv.first().map(String::as_str).unwrap_or("");
    match (stage, errno) {
        (Stage::Exec, libc::ENOENT) => HiveError::SpawnFailed(format!(
            "command not found in the sandbox: {argv0:?}{}",
            if argv0.contains('/') {
                String::new()
            } else {
                " (searched PATH)".into()
            }
        )),
        (Stage::Exec, libc::EACCES) => HiveError::SpawnFailed(format!(
            "permission denied executing {argv0:?} in the sandbox"
        )),
        (Stage::Chdir, _) => HiveError::SpawnFailed(format!(
            "cannot change to the working directory {:?} in the sandbox: {}",
            p.cwd.as_deref().unwrap_or("/"),
            errno_text(errno)
        )),
        (Stage::Setns | Stage::Fork, libc::ENOMEM | libc::ESRCH | libc::EINVAL) => {
            HiveError::SandboxClosed(inner.name.clone())
        }
        _ => HiveError::SpawnFailed(format!(
            "starting {argv0:?} failed while {}: {}",
            stage.describe(),
            errno_text(errno)
        )),
    }
}

// ----- close -----

fn close_on_launcher(inner: &HostInner) {
    let procs = {
        let Ok(mut st) = inner.state.lock() else {
            return;
        };
        if st.closed {
            return;
        }
        st.closed = true;
        std::mem::take(&mut st.procs)
    };
    // init dies => the kernel SIGKILLs the whole PID namespace; init's exit then waits until
    // the workloads (our children) are reaped, so reap them before init.
    let _ = pidfd_send_signal(inner.init_pidfd.as_raw_fd(), libc::SIGKILL);
    for p in procs {
        let _ = p.reap(libc::WEXITED);
    }
    let _ = waitid_pidfd(inner.init_pidfd.as_raw_fd(), libc::WEXITED);
    inner.limits.close();
}

// ----- processes -----

impl ProcState {
    /// Reaps (`flags` = `WEXITED` [| `WNOHANG`]) unless already reaped; returns the status.
    fn reap(&self, flags: libc::c_int) -> std::io::Result<Option<ExitStatus>> {
        let mut st = self
            .status
            .lock()
            .map_err(|_| std::io::Error::other("status poisoned"))?;
        if let Some(s) = *st {
            return Ok(Some(s));
        }
        let got = waitid_pidfd(self.raw_pidfd(), flags | libc::WEXITED)?;
        if got.is_some() {
            *st = got;
        }
        Ok(got)
    }

    /// The pidfd, or -1 once released (only after the process was reaped, when nothing waits
    /// on it any more).
    fn raw_pidfd(&self) -> RawFd {
        self.pidfd
            .lock()
            .ok()
            .and_then(|fd| fd.as_ref().map(AsRawFd::as_raw_fd))
            .unwrap_or(-1)
    }
}

/// Keeps the pidfd open for as long as tokio watches it.
struct WatchedPidfd(Arc<ProcState>);

impl AsRawFd for WatchedPidfd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.raw_pidfd()
    }
}

impl SandboxProcess {
    /// The handle and the stdio fds (`stdin`, `stdout`, `stderr`), apart: the fds can then be
    /// handed on and closed while the handle still waits and signals.
    pub fn into_parts(self) -> (ProcessHandle, Option<OwnedFd>, OwnedFd, OwnedFd) {
        (self.handle, self.stdin, self.stdout, self.stderr)
    }
}

impl std::ops::Deref for SandboxProcess {
    type Target = ProcessHandle;

    fn deref(&self) -> &ProcessHandle {
        &self.handle
    }
}

impl ProcessHandle {
    /// Waits for the process to end without blocking a tokio worker (pidfd + `AsyncFd`).
    ///
    /// # Errors
    /// An I/O error if called outside a tokio runtime or if the kernel refuses `waitid`.
    pub async fn wait(&self) -> Result<ExitStatus> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(HiveError::Internal(
                "SandboxProcess::wait needs a tokio runtime".into(),
            ));
        }
        // SAFETY: the pidfd is owned by the ProcState the AsyncFd holds, so it stays open and
        // unchanged for the AsyncFd's lifetime.
        let afd = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(
                WatchedPidfd(self.state.clone()),
                tokio::io::Interest::READABLE,
            )
        }
        .map_err(|e| HiveError::io("watching the process", e.into()))?;
        loop {
            if let Some(s) = self
                .state
                .reap(libc::WNOHANG)
                .map_err(|e| HiveError::io("waitid", e))?
            {
                return Ok(s);
            }
            let mut guard = afd
                .readable()
                .await
                .map_err(|e| HiveError::io("watching the process", e))?;
            if let Some(s) = self
                .state
                .reap(libc::WNOHANG)
                .map_err(|e| HiveError::io("waitid", e))?
            {
                return Ok(s);
            }
            guard.clear_ready();
        }
    }

    /// The process's pid in the host's PID namespace (for attribution, docs/audit-log.md#attribution).
    pub fn host_pid(&self) -> i32 {
        self.state.host_pid
    }

    /// The status if the process has ended, without waiting.
    pub fn try_wait(&self) -> Result<Option<ExitStatus>> {
        self.state
            .reap(libc::WNOHANG)
            .map_err(|e| HiveError::io("waitid", e))
    }

    /// Once the process was reaped: closes its pidfd and removes its cgroup if nothing is left in
    /// it, instead of when the last handle goes. Later `kill`s still reach what is left in its
    /// cgroup; without one there is nothing left to reach (the caller releases after the output
    /// ended, so no process of the command holds its pipes). A no-op before the reap.
    pub fn release(&self) {
        let Ok(status) = self.state.status.lock() else {
            return;
        };
        if status.is_none() {
            return;
        }
        if let Ok(mut pidfd) = self.state.pidfd.lock() {
            pidfd.take();
        }
        if let Some(cg) = &self.state.exec_cgroup {
            cg.remove_if_empty();
        }
    }

    /// Sends `signal` to every process of the command (docs/processes.md). A command whose
    /// processes all ended is not an error.
    ///
    /// 1. With a cgroup of its own: to every process in it (SIGKILL: `cgroup.kill` on v2), which
    ///    holds everything the command started, whatever session, group or parent it took, also
    ///    after the first process ended.
    /// 2. Else, while the first process is unreaped: to its tree of descendants ([`reach`]; it is
    ///    a subreaper, so orphans of the command stay in that tree), then to its process group.
    ///    The group is named by the leader's pidfd (`PIDFD_SIGNAL_PROCESS_GROUP`, Linux 6.9),
    ///    which stays right after the leader was reaped and its number reused. Older kernels get
    ///    the group by number only while the leader is unreaped (its number cannot be reused
    ///    then), else the leader alone.
    pub fn kill(&self, signal: i32) -> Result<()> {
        // Holding the status lock keeps a concurrent `reap` from freeing the number meanwhile.
        let status = self
            .state
            .status
            .lock()
            .map_err(|_| HiveError::Internal("status poisoned".into()))?;
        let pidfd_slot = self
            .state
            .pidfd
            .lock()
            .map_err(|_| HiveError::Internal("pidfd poisoned".into()))?;
        let pidfd = pidfd_slot.as_ref().map(AsRawFd::as_raw_fd);
        if let Some(cg) = &self.state.exec_cgroup {
            // The first process first: a shell waiting for its children would otherwise see
            // them end and exit 0 before its own signal arrives.
            let first = match pidfd {
                Some(fd) if status.is_none() && signal != libc::SIGKILL => {
                    pidfd_send_signal(fd, signal)
                        .ok()
                        .map(|()| self.state.host_pid)
                }
                _ => None,
            };
            cg.signal(signal, first);
            return Ok(());
        }
        let Some(pidfd) = pidfd else {
            return Ok(()); // released: ended, output drained
        };
        if status.is_none() {
            reach::signal_tree(pidfd, self.state.host_pid, signal);
        }
        let sent = |r: std::io::Result<()>| match r {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Ok(()),
            Err(e) => Err(HiveError::io("sending a signal", e)),
        };
        match pidfd_send_signal_flags(pidfd, signal, PIDFD_SIGNAL_PROCESS_GROUP) {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
            r => return sent(r),
        }
        if status.is_none() {
            // SAFETY: plain syscall; the group's leader is our unreaped child.
            if unsafe { libc::kill(-self.state.host_pid, signal) } == 0 {
                return Ok(());
            }
        }
        sent(pidfd_send_signal(pidfd, signal))
    }
}

/// The default environment inside a sandbox (docs/security.md): `PATH`, `HOME`, `LANG`, `TERM`, the
/// proxy variables pointing at `127.0.0.1:<proxy_port>` (upper and lower case), `NO_PROXY` for
/// loopback, and every CA variable pointing at [`CA_BUNDLE_PATH`].
pub fn default_env(proxy_port: u16) -> Vec<(String, String)> {
    let proxy = format!("http://127.0.0.1:{proxy_port}");
    let no_proxy = "localhost,127.0.0.1,::1";
    let mut env = vec![
        ("PATH".to_string(), plan::DEFAULT_PATH.to_string()),
        ("HOME".to_string(), SANDBOX_HOME.to_string()),
        ("LANG".to_string(), "C.UTF-8".to_string()),
        ("TERM".to_string(), "dumb".to_string()),
    ];
    for key in ["HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"] {
        env.push((key.to_string(), proxy.clone()));
        env.push((key.to_ascii_lowercase(), proxy.clone()));
    }
    env.push(("NO_PROXY".to_string(), no_proxy.to_string()));
    env.push(("no_proxy".to_string(), no_proxy.to_string()));
    for key in [
        "SSL_CERT_FILE",
        "NODE_EXTRA_CA_CERTS",
        "REQUESTS_CA_BUNDLE",
        "CURL_CA_BUNDLE",
        "GIT_SSL_CAINFO",
        "PIP_CERT",
        "CARGO_HTTP_CAINFO",
        "DENO_CERT",
        "AWS_CA_BUNDLE",
    ] {
        env.push((key.to_string(), CA_BUNDLE_PATH.to_string()));
    }
    env
}

#[cfg(test)]
mod unit {
    use super::*;
    use crate::ErrorCode;

    #[test]
    fn init_failures_map_to_stable_codes() {
        for (stage, errno, code) in [
            // Ubuntu's AppArmor restriction: the userns exists but holds no capability.
            (Stage::LoopbackUp, libc::EPERM, ErrorCode::UsernsUnavailable),
            (Stage::Hostname, libc::EPERM, ErrorCode::UsernsUnavailable),
            (
                Stage::MountPrivate,
                libc::EACCES,
                ErrorCode::UsernsUnavailable,
            ),
            (Stage::PivotRoot, libc::EPERM, ErrorCode::UsernsUnavailable),
            // Anything else is a bug or a host problem, not a policy refusal.
            (Stage::Listener, libc::EADDRINUSE, ErrorCode::Internal),
            (Stage::LandlockRule, libc::EPERM, ErrorCode::Internal),
            (Stage::WriteFile, libc::ENOSPC, ErrorCode::Internal),
            // Per-file enforcement the sandbox cannot set up is never silently dropped.
            (Stage::OpenFuse, libc::EACCES, ErrorCode::FsUnenforceable),
            (Stage::MountFuse, libc::EPERM, ErrorCode::FsUnenforceable),
        ] {
            assert_eq!(init_error(stage, errno).code(), code, "{stage:?} {errno}");
        }
    }

    #[test]
    fn userns_errors_carry_the_hint() {
        let e = init_error(Stage::LoopbackUp, libc::EPERM);
        assert!(
            e.to_string()
                .contains("apparmor_restrict_unprivileged_userns"),
            "{e}"
        );
    }

    #[test]
    fn default_env_points_every_client_at_the_proxy_and_the_ca() {
        let env = default_env(3128);
        let get = |k: &str| {
            env.iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.as_str())
        };
        for k in [
            "HTTP_PROXY",
            "HTTPS_PROXY",
            "ALL_PROXY",
            "http_proxy",
            "https_proxy",
            "all_proxy",
        ] {
            assert_eq!(get(k), Some("http://127.0.0.1:3128"), "{k}");
        }
        for k in ["NO_PROXY", "no_proxy"] {
            assert_eq!(get(k), Some("localhost,127.0.0.1,::1"), "{k}");
        }
        for k in [
            "SSL_CERT_FILE",
            "NODE_EXTRA_CA_CERTS",
            "REQUESTS_CA_BUNDLE",
            "CURL_CA_BUNDLE",
            "GIT_SSL_CAINFO",
            "PIP_CERT",
            "CARGO_HTTP_CAINFO",
            "DENO_CERT",
            "AWS_CA_BUNDLE",
        ] {
            assert_eq!(get(k), Some(CA_BUNDLE_PATH), "{k}");
        }
        assert_eq!(get("HOME"), Some(SANDBOX_HOME));
        assert!(get("SSL_CERT_DIR").is_none());
    }
}
