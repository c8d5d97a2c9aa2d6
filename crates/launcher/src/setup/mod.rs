//! The sandbox's setup child: PID 1 of its PID namespace, created by the addon with `clone`, all
//! the namespaces and `CLONE_VM` (it runs in the host's memory, on a stack of its own, like a
//! `vfork` child) until it executes `hive-init init` ([`crate::stub::exec_init`]).
//!
//! The addon resolves everything on the host first (its `InitPlan`, with `Vec`s and `CString`s)
//! and lends this code a borrowed view of it, a [`Plan`]: slices, `&CStr`s, fds and flags, plus
//! two scratch arrays for the fds the child opens. Nothing here allocates, takes a lock or
//! touches thread-local state (`errno` included: [`crate::sys`] decodes the kernel's return
//! value), so running in the memory of a multi-threaded host is safe.
//!
//! Steps ([`run`]):
//! 1. `PR_SET_PDEATHSIG(SIGKILL)`: the launcher thread that cloned it lives as long as the host
//!    process, so the host's death kills init, and with it (the kernel kills a PID namespace
//!    whose init dies) every process of the sandbox. Signal dispositions reset (the host's
//!    handlers must never run here; every signal also stays blocked until the exec).
//! 2. Waits for the parent's "go" (sent once `uid_map`/`gid_map` are written). EOF means the
//!    parent died before step 1 took effect: exit. Joins the sandbox's cgroups, opens
//!    `/dev/fuse` while still the host's uid, switches to the sandbox's uid/gid 0 (which clears
//!    PDEATHSIG, so it is set again, and the parent's liveness checked).
//! 3. Hostname, `lo` up, the proxy listener ([`net`]); the capture routes, DNS sockets and
//!    capture listeners ([`net`], each fd sent at once); the filesystem ([`fs`]) with the
//!    generated `/etc/resolv.conf` and `/etc/hosts`; the Landlock rules; `/` read-only.
//! 4. Hands over each FUSE connection it mounted (one [`Stage::FuseHandover`] message per mount,
//!    in mount order) and reports success with the proxy listener attached.
//! 5. Executes `hive-init init` with only the control socket open: the copy of the host's memory
//!    is gone, and PID 1 is now a reaper of a few kB ([`crate::init`]).
//!
//! Every failure is one report ([`Stage`] + errno) on the control socket, then `exit(1)`.
//!
//! # Security
//! No process of the sandbox exists before step 5 (workloads start once the host has the final
//! report and init's message), so none can see the copy of the host's memory; after the exec
//! nothing of it is left. The host's death before step 1 took effect is seen as EOF on the
//! control socket, after the uid switch by a hang-up check, so the child never outlives the host
//! unnoticed. Everything that could leak the host's state stays out: no signal handler of the
//! host runs here (dispositions reset, signals blocked), no fd but the plan's survives the exec.

use core::ffi::CStr;

use crate::stage::{encode_report, Stage};
use crate::sys::{self, Errno};

pub mod fs;
pub mod net;

pub use net::{capture_helper, CaptureHelper, FdKind, DNS_PORT, FD_MESSAGE};

/// A failed step: which step and the errno it got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fail {
    /// The step.
    pub stage: Stage,
    /// The kernel's error number.
    pub errno: i32,
}

/// Result of a setup step.
pub type SetupResult<T = ()> = Result<T, Fail>;

/// Attaches a [`Stage`] to a syscall's error.
trait At<T> {
    fn at(self, stage: Stage) -> SetupResult<T>;
}

impl<T> At<T> for Result<T, Errno> {
    fn at(self, stage: Stage) -> SetupResult<T> {
        self.map_err(|Errno(errno)| Fail { stage, errno })
    }
}

/// C strings laid end to end, each with its NUL (`"a\0a/b\0"`): a list of paths in one borrowed
/// buffer, so a list inside a list element needs no allocation of its own.
#[derive(Debug, Clone, Copy, Default)]
pub struct CStrs<'a>(&'a [u8]);

impl<'a> CStrs<'a> {
    /// The list stored in `packed`; `None` unless it is empty or ends with a NUL.
    pub fn new(packed: &'a [u8]) -> Option<CStrs<'a>> {
        (packed.is_empty() || packed.last() == Some(&0)).then_some(CStrs(packed))
    }

    /// The strings, in order.
    pub fn iter(self) -> impl Iterator<Item = &'a CStr> {
        let mut rest = self.0;
        core::iter::from_fn(move || {
            let s = CStr::from_bytes_until_nul(rest).ok()?;
            rest = rest.get(s.to_bytes().len() + 1..).unwrap_or(&[]);
            Some(s)
        })
    }
}

/// One top-level system entry of the new root.
#[derive(Debug, Clone, Copy)]
pub enum SystemEntry<'a> {
    /// A directory bound read-only: its name relative to the new root, its absolute host path.
    Dir {
        /// E.g. `usr`.
        name: &'a CStr,
        /// E.g. `/usr`.
        host: &'a CStr,
    },
    /// A symlink recreated as is.
    Symlink {
        /// E.g. `bin`.
        name: &'a CStr,
        /// E.g. `usr/bin`.
        target: &'a CStr,
    },
}

/// A device node bound from the host's `/dev`.
#[derive(Debug, Clone, Copy)]
pub struct DevNode<'a> {
    /// `/dev/null`.
    pub host: &'a CStr,
    /// `dev/null` (relative to the new root).
    pub rel: &'a CStr,
}

/// One configured mount as the addon planned it: the whole source, one subtree of it, or only a
/// mount point.
#[derive(Debug, Clone, Copy)]
pub struct Mount<'a> {
    /// Host path, canonical: opened with `RESOLVE_NO_SYMLINKS`, so a symlink swapped in since
    /// planning fails the start.
    pub source: &'a CStr,
    /// Target relative to the new root, e.g. `workspace/src`.
    pub target_rel: &'a CStr,
    /// Directories to create (relative), parents first.
    pub mkdirs: CStrs<'a>,
    /// The source is a regular file (the target is created as an empty file).
    pub is_file: bool,
    /// Bound read-write (else read-only).
    pub writable: bool,
    /// A detached idmapped tree of `source` made by the parent, or -1.
    pub tree: i32,
    /// Only the mount point is made.
    pub placeholder: bool,
    /// Served over FUSE by the host: nothing is bound.
    pub fuse: bool,
}

impl Mount<'_> {
    /// Whether `source` (or the parent's idmapped tree of it) is bound at the target.
    pub fn binds_source(&self) -> bool {
        !self.fuse && !self.placeholder
    }
}

/// A secret to hide: absolute path inside the sandbox and whether it is a directory.
#[derive(Debug, Clone, Copy)]
pub struct Hidden<'a> {
    /// E.g. `/etc/shadow`.
    pub path: &'a CStr,
    /// Covered by an empty directory rather than an empty file.
    pub is_dir: bool,
}

/// A file generated under `/run/hive` and shown at an `/etc` path.
#[derive(Debug, Clone, Copy)]
pub struct EtcFile<'a> {
    /// Where it is written, relative to the new root (`run/hive/resolv.conf`).
    pub staged: &'a CStr,
    /// The same, absolute (a symlink target).
    pub staged_abs: &'a CStr,
    /// Its contents.
    pub data: &'a [u8],
    /// How it is shown.
    pub target: EtcTarget<'a>,
}

/// How an [`EtcFile`] is shown.
#[derive(Debug, Clone, Copy)]
pub enum EtcTarget<'a> {
    /// Bound over this absolute path (where it is a regular file inside, symlinks followed).
    Bind(&'a CStr),
    /// A symlink at `link` (absolute) to the staged file, after creating `mkdirs` (absolute).
    Symlink {
        /// Parents of `link`, outermost first.
        mkdirs: CStrs<'a>,
        /// Where the host's `/etc` entry points.
        link: &'a CStr,
    },
    /// Not shown.
    Skip,
}

/// Relative (to the new root) path of the mode-000 file bound over secrets.
pub const HIDDEN_FILE: &CStr = c"run/hive/.hidden";
/// Relative path of the mode-000 directory bound over secret directories.
pub const HIDDEN_DIR: &CStr = c"run/hive/.hidden.d";

/// Everything the setup child needs, borrowed from the addon's plan; the addon does not touch
/// it (nor what it borrows) from the `clone` until the child has exec'd or died.
#[derive(Debug)]
pub struct Plan<'a> {
    /// The sandbox's hostname (at most 64 bytes).
    pub hostname: &'a [u8],
    /// Port of the proxy listener on `127.0.0.1` inside.
    pub proxy_port: u16,
    /// The child's end of the control socket (`SOCK_SEQPACKET`).
    pub ctrl: i32,
    /// Landlock ruleset fd (shared object with the parent), or -1 without Landlock.
    pub landlock_fd: i32,
    /// Landlock filesystem rights the ruleset handles.
    pub landlock_fs: u64,
    /// System directories and symlinks of the new root.
    pub system: &'a [SystemEntry<'a>],
    /// `/etc`.
    pub etc_host: &'a CStr,
    /// Device nodes.
    pub dev_nodes: &'a [DevNode<'a>],
    /// Configured mounts, parents first.
    pub mounts: &'a [Mount<'a>],
    /// Secrets under `/etc` to cover.
    pub hidden: &'a [Hidden<'a>],
    /// The sandbox's CA bundle (PEM).
    pub ca_bundle: &'a [u8],
    /// Where it is written, relative to the new root.
    pub ca_bundle_rel: &'a CStr,
    /// Distribution CA bundle paths it is bound over where they exist inside.
    pub ca_targets: &'a [&'a CStr],
    /// Ports captured on `0.0.0.0` and `[::]` ([`net::capture_listeners`]).
    pub capture_ports: &'a [u16],
    /// Generated `/etc/resolv.conf` and `/etc/hosts`.
    pub etc_files: &'a [EtcFile<'a>],
    /// The sealed `hive-init` memfd executed at the end.
    pub image: i32,
    /// Files the child joins the sandbox's cgroups through by writing `0` (-1: unused).
    pub cgroup_join: &'a [i32],
    /// Scratch for the source fds the child opens: one per `system` directory, one spare, one
    /// per device node, one per mount (`-1` initially).
    pub source_fds: &'a mut [i32],
    /// Scratch for the `/dev/fuse` fd of each mount (same index as `mounts`; `-1` initially).
    pub fuse_fds: &'a mut [i32],
}

/// The setup child's whole life. Never returns.
///
/// # Safety
/// Only in the freshly cloned setup child (it ends in `execveat` or `exit_group`, never
/// returning into the caller's frames), with `plan` and everything it borrows left alone by
/// every other thread until then.
pub unsafe fn run(plan: &mut Plan<'_>) -> ! {
    let ctrl = plan.ctrl;
    let _ = sys::prctl(sys::PR_SET_PDEATHSIG, sys::SIGKILL as usize, 0);
    // The host's signal handlers (Node's, libuv's) must never run here (every signal is also
    // blocked until the exec).
    let _ = sys::reset_signal_dispositions();
    let mut go = [0u8; 1];
    let n = loop {
        match sys::read(ctrl, &mut go) {
            Err(Errno(e)) if e == sys::EINTR as i32 => {}
            r => break r,
        }
    };
    if n != Ok(1) {
        sys::exit(1);
    }
    // The sandbox's cgroups, before anything is charged: `0` moves the writer, this
    // single-threaded child.
    for fd in plan.cgroup_join.iter().copied().filter(|fd| *fd >= 0) {
        match sys::write(fd, b"0") {
            Ok(1) => {}
            Ok(_) => report_and_exit(ctrl, Stage::Limits, 0),
            Err(Errno(e)) => report_and_exit(ctrl, Stage::Limits, e),
        }
    }
    // Still the host's uid: the only moment init can open a root-only /dev/fuse.
    if let Err(f) = fs::open_fuse(plan.mounts, plan.fuse_fds) {
        report_and_exit(ctrl, f.stage, f.errno);
    }
    if let Err(f) = become_sandbox_root() {
        report_and_exit(ctrl, f.stage, f.errno);
    }
    // A credential change clears the parent-death signal: set it again, then make sure the
    // parent did not die in between (getppid() is 0 across the PID namespace boundary, so ask
    // the control socket: the parent's end closes when it dies).
    let _ = sys::prctl(sys::PR_SET_PDEATHSIG, sys::SIGKILL as usize, 0);
    if sys::peer_hung_up(ctrl) {
        sys::exit(1);
    }
    // No PR_SET_DUMPABLE here: this child shares the host's memory (CLONE_VM), and dumpability
    // belongs to the memory, so it would change the host process. Nothing of the sandbox runs
    // before the exec; hive-init then makes its own memory non-dumpable.
    match setup(plan) {
        Ok(listener) => {
            // FUSE connections first, one message each; the final report ends the handover.
            let fuse = plan.mounts.iter().zip(plan.fuse_fds.iter()).enumerate();
            for (i, (_, fd)) in fuse.filter(|(_, (m, _))| m.fuse) {
                let sent = net::send_report(ctrl, Stage::FuseHandover, i as i32, Some(*fd));
                if let Err(f) = sent {
                    report_and_exit(ctrl, f.stage, f.errno);
                }
            }
            if let Err(f) = net::send_report(ctrl, Stage::Ok, 0, Some(listener)) {
                report_and_exit(ctrl, f.stage, f.errno);
            }
        }
        Err(f) => report_and_exit(ctrl, f.stage, f.errno),
    }
    // Become hive-init (PID 1 stays PID 1 across the exec): nothing of the host's memory or
    // fds survives; the control socket becomes its fd 0 for one "init runs" message.
    // SAFETY: the last use of anything but `image` and `ctrl`.
    let _ = unsafe { crate::stub::exec_init(plan.image, ctrl) };
    sys::exit(1)
}

/// Sends a failure report and exits.
fn report_and_exit(ctrl: i32, stage: Stage, errno: i32) -> ! {
    let _ = sys::send_with_fd(ctrl, &encode_report(stage, errno), None);
    sys::exit(1)
}

/// Step 3; returns the proxy listener's fd.
fn setup(plan: &mut Plan<'_>) -> SetupResult<i32> {
    sys::sethostname(plan.hostname).at(Stage::Hostname)?;
    let lo = net::loopback_up()?;
    let listener = net::proxy_listener(plan.proxy_port)?;
    net::local_routes(lo)?;
    net::dns_sockets(plan.ctrl)?;
    net::capture_listeners(plan.ctrl, plan.capture_ports)?;
    fs::build_root(plan)?;
    fs::etc_files(plan.etc_files)?;
    fs::landlock_rules(plan)?;
    fs::root_read_only()?;
    Ok(listener)
}

/// Switches to uid/gid 0 of the current user namespace and drops supplementary groups where
/// `setgroups` is allowed (root parents leave it allowed; unprivileged ones must deny it, and
/// then the caller's own groups stay).
///
/// Raw syscalls: glibc's `setresuid` & co. broadcast the change to every thread it believes
/// exists, and after `clone` from a multi-threaded parent those threads do not exist here.
fn become_sandbox_root() -> SetupResult {
    let _ = sys::clear_groups();
    sys::setresgid(0).at(Stage::Identity)?;
    sys::setresuid(0).at(Stage::Identity)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_strings_iterate_in_order() {
        let list = CStrs::new(b"a\0a/b\0a/b/c\0").expect("NUL-terminated");
        let mut it = list.iter();
        assert_eq!(it.next(), Some(c"a"));
        assert_eq!(it.next(), Some(c"a/b"));
        assert_eq!(it.next(), Some(c"a/b/c"));
        assert_eq!(it.next(), None);
        assert_eq!(CStrs::new(b"").map(|l| l.iter().count()), Some(0));
        assert!(CStrs::new(b"a\0b").is_none());
    }
}
