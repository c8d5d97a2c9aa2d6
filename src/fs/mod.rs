//! Mounts and per-file ACL enforcement (docs/file-access.md): a FUSE file system served
//! by the host process that decides every request on its path and does the real I/O itself below
//! a directory fd of the mount's source.
//!
//! # Semantics
//!
//! - `access` is `rw`, `r` or `none`. ACL paths are absolute paths inside the sandbox; the first
//!   matching rule wins; with `acls` present an unmatched path has no access; without `acls` the
//!   whole mount is `rw` ([`acl`]).
//! - `r` allows lookup, `stat`, opening for reading, listing and `readlink`. `rw` adds create,
//!   write, truncate, `mkdir`, rename, unlink, `rmdir`, hard and symbolic links, `chmod` and
//!   `utimens`. `chown` to anyone but the current owner is refused (`EPERM`): the server writes as
//!   the host program, and file ownership stays the host's. Extended attributes are not served
//!   (`EOPNOTSUPP`).
//! - **`none` hides the path**: lookups answer `ENOENT` and listings leave it out, whether or not
//!   the file exists. A path that is visible but not writable answers `EACCES` to a write.
//!   Creating a name (create, `mkdir`, `mknod`, `symlink`, the new name of a `link` or `rename`)
//!   that is not `rw` always answers `EACCES`, so a refusal never tells whether a hidden file of
//!   that name exists.
//! - A directory that no rule matches but that leads to an allowed subtree (`/workspace/a` for a
//!   rule `/workspace/a/b/**`) stays traversable: it can be looked up and listed, and its listing
//!   shows only what is visible. The mount root is always traversable.
//! - Decisions are made on the node's *current* path at every request, never from a snapshot:
//!   files that exist at start, files the sandbox creates and files the host creates in the
//!   source later are decided the same way.
//! - An operation on two paths (rename, link) needs `rw` on both; a link also needs `rw` on the
//!   existing file (a read-only file must not gain a writable name). A directory rename is refused
//!   if any entry below it would gain access under its new name (`mv a b` with
//!   `/workspace/a/private/**` hidden), or moves more than 100 000 entries (`EXDEV`; `mv` then
//!   copies file by file). Because the kernel resolves the sandbox's symlinks through lookups, a
//!   symlink to a hidden file is decided on the target's own path.
//! - Every refusal emits `fs.denied { path, operation, rule }` (rule: index of the deciding ACL,
//!   or `null` when none matched). With `audit: true` every permitted write (once per open for
//!   writing), create, `mkdir`, `mknod`, `symlink`, link, rename (with `newPath`), unlink, `rmdir`
//!   and attribute change emits `fs.access { path, operation }`.
//!
//! # Layers
//!
//! [`needs_per_file_enforcement`] says whether a mount needs this FUSE layer at all: plain
//! `prefix/**` rules are enforced by the launcher's binds (only the granted subtrees are mounted,
//! read-only for `r`) at no runtime cost. Where
//! the layer is needed and [`fuse_available`] is false, the sandbox must refuse to start
//! (`HIVE_FS_UNENFORCEABLE`); it never silently enforces less.
//!
//! # Serving
//!
//! The `fuser` crate (0.18, no libfuse) speaks the kernel protocol over a `/dev/fuse` fd that
//! someone else mounted ([`fuser::Session::from_fd`]): the sandbox's init mounts, the host serves.
//! The server runs on its own threads until the file system is unmounted (the sandbox's mount
//! namespace goes away, or `umount`). Where the kernel offers FUSE passthrough and the server may
//! use it (`CAP_SYS_ADMIN` in the initial user namespace, i.e. root), files of 1 MiB or more are
//! backed by the real file once opened, and their reads and writes skip the server (the decision
//! was made at open, as for any open file).
//!
//! The kernel caches entries (including "no such name", for names that do not exist or are
//! hidden) and attributes for a day where it is told of every change that could make them wrong
//! ([`cache`]): new rules (`applyConfig`, [`FsHandle::reconfigure`]) and a directory rename that
//! changes what moved entries may do make it forget every cached entry at once (connection
//! epoch, Linux 6.16+), and a watcher on the source ([`watch`], fanotify) reports the host's
//! creates, deletes, renames, writes and attribute changes. Elsewhere (an older kernel, no
//! fanotify, a directory beyond the watch budget) entries and attributes are cached for 1 s and
//! failed lookups not at all, and a `sandbox.warning` (`HIVE_FS_CACHE_SHORT`) says so. A file
//! with several hard links is never cached (each name is its own node here, and a write through
//! one must show through the others at once). No decision depends on the cache: every request
//! that reaches the server (open, readdir, readlink, create, …) is decided again on the node's
//! current path. Because repeated lookups of a hidden name are answered by the kernel, they are
//! reported (`fs.denied`) once per cache lifetime, not once per attempt. The kernel also keeps the
//! listings of watched directories ([`listing`]); a listing decided before any of those changes is
//! neither kept nor read.
//!
//! For a sandbox, the launcher mounts `/dev/fuse` with
//! `fd=N,rootmode=40000,user_id=0,group_id=0,allow_other` and `MS_NOSUID | MS_NODEV` (no
//! `default_permissions`: the server decides), passes the fd to the host over `SCM_RIGHTS`, and
//! serves it with [`AclFs::present_owner`]`(0, 0)` so the sandbox user owns what it sees.

pub mod acl;
mod cache;
mod dirfds;
mod ids;
mod listing;
mod ops;
mod session;
#[cfg(test)]
mod tests;
mod watch;

use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use serde_json::{Map, Value};

use crate::config::{FsBackend, FsMount};
use crate::error::{HiveError, Result};
use crate::events::EventBus;

pub use acl::{needs_per_file_enforcement, per_file_reason, Acl, Decision};

/// Field names of `fs.denied` / `fs.access` events.
pub mod field {
    /// Absolute path inside the sandbox.
    pub const PATH: &str = "path";
    /// What was attempted ([`super::op`]).
    pub const OPERATION: &str = "operation";
    /// Index of the deciding ACL, or `null`.
    pub const RULE: &str = "rule";
    /// The destination of a rename (in `fs.access`).
    pub const NEW_PATH: &str = "newPath";
}

/// Operation names carried in `fs.denied` / `fs.access` events.
pub mod op {
    pub const LOOKUP: &str = "lookup";
    pub const GETATTR: &str = "getattr";
    pub const ACCESS: &str = "access";
    pub const READDIR: &str = "readdir";
    pub const READLINK: &str = "readlink";
    pub const OPEN: &str = "open";
    /// An open for writing (`fs.access`, once per open).
    pub const WRITE: &str = "write";
    pub const CREATE: &str = "create";
    pub const MKDIR: &str = "mkdir";
    pub const MKNOD: &str = "mknod";
    pub const SYMLINK: &str = "symlink";
    pub const LINK: &str = "link";
    pub const RENAME: &str = "rename";
    pub const UNLINK: &str = "unlink";
    pub const RMDIR: &str = "rmdir";
    pub const TRUNCATE: &str = "truncate";
    pub const CHMOD: &str = "chmod";
    pub const CHOWN: &str = "chown";
    pub const UTIMENS: &str = "utimens";
}

/// Codes of the `sandbox.warning` events the file system emits.
pub mod warning {
    /// Entries and attributes of a mount (or some of its directories) are cached for 1 s only,
    /// because changes by the host cannot be watched there or the kernel cannot be told to forget
    /// cached entries at once (docs/decisions.md, file caching).
    pub const FS_CACHE_SHORT: &str = "HIVE_FS_CACHE_SHORT";
}

/// Where the server's events go (the sandbox's [`EventBus`]; tests collect them directly).
pub(crate) trait EventSink: Send + Sync {
    fn emit(&self, kind: &str, fields: Map<String, Value>);
}

impl EventSink for EventBus {
    fn emit(&self, kind: &str, fields: Map<String, Value>) {
        EventBus::emit(self, kind, fields);
    }
}

/// The ACL file system of one mount, ready to serve.
pub struct AclFs {
    server: session::Server,
    /// Whether the host's changes to the source are watched (long kernel caches).
    watch: bool,
}

impl std::fmt::Debug for AclFs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AclFs").finish_non_exhaustive()
    }
}

/// A running server; the file system is served until it is unmounted.
#[derive(Debug)]
pub struct FsHandle {
    thread: JoinHandle<std::io::Result<()>>,
    passthrough: Arc<AtomicBool>,
    shared: Arc<session::Shared>,
}

impl FsHandle {
    /// Whether opened files are served by kernel passthrough (reads and writes skip the server).
    pub fn passthrough(&self) -> bool {
        self.passthrough.load(Ordering::Relaxed)
    }

    /// How many `WRITE` requests the server has served; writes through kernel passthrough are
    /// not among them.
    pub fn served_writes(&self) -> u64 {
        self.shared.served_writes()
    }

    /// How many directory listings the server has read from the source and decided; a listing
    /// the kernel keeps is shown again without one.
    pub fn decided_listings(&self) -> u64 {
        self.shared.decided_listings()
    }

    /// Whether the kernel caches entries and attributes long (changes are reported to it).
    pub fn long_cache(&self) -> bool {
        self.shared.long()
    }

    /// The mount path inside the sandbox this server serves.
    pub fn mount(&self) -> String {
        self.shared.mount()
    }

    /// Puts `mount`'s ACLs and `audit` in force for every request from now on; the kernel forgets
    /// what it cached under the old rules (docs/file-access.md).
    pub fn reconfigure(&self, mount: &FsMount) {
        self.shared.reconfigure(Acl::new(mount), mount.audit);
    }

    /// How many source directory fds the server keeps.
    #[cfg(test)]
    pub(crate) fn kept_dir_fds(&self) -> usize {
        self.shared.kept_dir_fds()
    }

    /// Whether the server has stopped (the file system was unmounted or the connection aborted).
    pub fn is_finished(&self) -> bool {
        self.thread.is_finished()
    }

    /// Waits for the server to stop; call after unmounting.
    pub fn join(self) -> Result<()> {
        match self.thread.join() {
            Ok(result) => result.map_err(|err| HiveError::io("FUSE session", err)),
            Err(_) => Err(HiveError::Internal(
                "the FUSE server thread panicked".into(),
            )),
        }
    }
}

/// Worker threads reading `/dev/fuse` (each with its own cloned fd).
const SERVER_THREADS: usize = 4;

/// Set (to anything) in the host's environment, the sandboxes' FUSE mounts do not watch their
/// sources and keep the short cache times (for tests of that fallback).
pub const NO_WATCH_ENV: &str = "HIVE_FS_NO_WATCH";

impl AclFs {
    /// A server for `mount` over `source_dir` (an `O_PATH | O_DIRECTORY` fd of the source), whose
    /// refusals and audit events go to `events`.
    pub fn new(mount: &FsMount, source_dir: OwnedFd, events: Arc<EventBus>) -> Result<Self> {
        let fs = Self::with_sink(mount, source_dir, events)?;
        Ok(if std::env::var_os(NO_WATCH_ENV).is_some() {
            fs.without_watch()
        } else {
            fs
        })
    }

    pub(crate) fn with_sink(
        mount: &FsMount,
        source_dir: OwnedFd,
        events: Arc<dyn EventSink>,
    ) -> Result<Self> {
        match mount.backend {
            FsBackend::Local => {}
        }
        let source = ops::Source::new(source_dir).map_err(|err| {
            HiveError::io(
                format!("source of the mount {}", mount.mount),
                std::io::Error::from(err),
            )
        })?;
        let server = session::Server::new(Acl::new(mount), source, events, mount.audit, true);
        Ok(AclFs {
            server,
            watch: true,
        })
    }

    /// Turns kernel passthrough off (it is tried by default and used where the kernel allows it).
    pub fn without_passthrough(mut self) -> Self {
        self.server.disable_passthrough();
        self
    }

    /// Does not watch the source: the kernel caches entries and attributes for 1 s only.
    pub fn without_watch(mut self) -> Self {
        self.watch = false;
        self
    }

    /// Shows every file as owned by `uid:gid`, ids as the mount's user namespace sees them (the
    /// sandbox user, so tools that check ownership, such as git's `safe.directory`, accept the
    /// tree). Without it, files show their owners in the source, which a sandbox's user namespace
    /// maps to other ids or to the overflow id.
    pub fn present_owner(mut self, uid: u32, gid: u32) -> Self {
        self.server.present_owner(uid, gid);
        self
    }

    /// Serves FUSE requests on an already-opened-and-mounted `/dev/fuse` fd until the file system
    /// is unmounted; runs on its own threads and returns at once.
    pub fn serve(self, fuse_fd: OwnedFd) -> Result<FsHandle> {
        let AclFs { server, watch } = self;
        let passthrough = server.passthrough_flag();
        let shared = server.shared();
        let notify = fuse_fd
            .try_clone()
            .map_err(|err| HiveError::io("duplicating the /dev/fuse fd", err))?;
        let root = server.source_root().ok();
        let state = shared.clone();
        let thread = std::thread::Builder::new()
            .name("hive-fs".into())
            .spawn(move || {
                let mut config = fuser::Config::default();
                config.acl = fuser::SessionACL::All;
                config.n_threads = Some(SERVER_THREADS);
                config.clone_fd = true;
                let session =
                    fuser::Session::from_fd(server, fuse_fd, fuser::SessionACL::All, config)?;
                let stop = Arc::new(AtomicBool::new(false));
                let watcher = start_caching(&state, notify, root, watch, &stop);
                let result = session.run();
                stop.store(true, Ordering::Relaxed);
                if let Some(watcher) = watcher {
                    let _ = watcher.join();
                }
                result
            })
            .map_err(|err| HiveError::io("starting the FUSE server", err))?;
        Ok(FsHandle {
            thread,
            passthrough,
            shared,
        })
    }
}

/// After the handshake: sets up notifications and, where possible, the watcher that lets the
/// kernel cache long; reports (`sandbox.warning`) when the mount keeps short cache times.
fn start_caching(
    shared: &Arc<session::Shared>,
    notify: OwnedFd,
    root: Option<OwnedFd>,
    watch: bool,
    stop: &Arc<AtomicBool>,
) -> Option<JoinHandle<()>> {
    let short = |why: String| {
        shared.warn(
            warning::FS_CACHE_SHORT,
            &format!(
                "{}: {why}; entries and attributes are cached for 1 s, so a change the host \
                 makes in the source may take up to 1 s to show inside",
                shared.mount()
            ),
        );
        None
    };
    if !shared.epoch_supported() {
        return short(
            "this kernel cannot be told to forget cached entries at once (Linux 6.16+ can)".into(),
        );
    }
    shared.set_kernel(cache::Kernel::new(notify));
    if !watch {
        return short("watching the source is turned off".into());
    }
    let watcher = match watch::Watch::new() {
        Ok(watcher) => watcher,
        Err(err) => return short(format!("the source cannot be watched (fanotify: {err})")),
    };
    let Some(root) = root else {
        return short("the source cannot be opened for watching".into());
    };
    if !shared.start_long(watcher, &root) {
        return short("the source cannot be watched (fanotify mark refused)".into());
    }
    let (shared, stop) = (shared.clone(), stop.clone());
    std::thread::Builder::new()
        .name("hive-fs-watch".into())
        .spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if !shared.serve_changes(std::time::Duration::from_millis(200)) {
                    break;
                }
            }
        })
        .ok()
}

/// Refuses (`HIVE_FS_UNENFORCEABLE`, with a hint) when some mount needs per-file enforcement and
/// this process cannot open `/dev/fuse` (docs/file-access.md: never silently enforce less).
pub fn require_enforceable(mounts: &[FsMount]) -> Result<()> {
    match unenforceable(mounts, fuse_available()) {
        Some(err) => Err(err),
        None => Ok(()),
    }
}

fn unenforceable(mounts: &[FsMount], fuse: bool) -> Option<HiveError> {
    if fuse {
        return None;
    }
    let problems: Vec<String> = mounts
        .iter()
        .enumerate()
        .filter_map(|(i, mount)| {
            per_file_reason(mount).map(|why| format!("fs[{i}] ({}): {why}", mount.mount))
        })
        .collect();
    (!problems.is_empty()).then(|| {
        HiveError::FsUnenforceable(format!(
            "{} needs per-file enforcement through FUSE, and this process cannot open /dev/fuse; \
             make /dev/fuse usable (many hosts ship it 0666; here it is not), run as root, or use \
             only plain \"<dir>/**\" rules without audit",
            problems.join("; ")
        ))
    })
}

/// Whether this process can open `/dev/fuse` (needed for per-file enforcement).
pub fn fuse_available() -> bool {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/fuse")
        .is_ok()
}

/// Opens `/dev/fuse` and mounts it on `target` (`nosuid,nodev`, `allow_other`, no
/// `default_permissions`: the server decides every access itself). Needs `CAP_SYS_ADMIN`; used by
/// tests and benchmarks on the host. The launcher mounts inside the sandbox the same way.
pub fn mount_fuse_on(target: &Path) -> Result<OwnedFd> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/fuse")
        .map_err(|err| HiveError::io("opening /dev/fuse", err))?;
    let fd = OwnedFd::from(file);
    let options = format!(
        "fd={},rootmode=40000,user_id={},group_id={},allow_other",
        fd.as_raw_fd(),
        rustix::process::geteuid().as_raw(),
        rustix::process::getegid().as_raw(),
    );
    let options_c = std::ffi::CString::new(options)
        .map_err(|_| HiveError::Internal("mount options hold a NUL".into()))?;
    rustix::mount::mount(
        "hive",
        target,
        "fuse.hive",
        rustix::mount::MountFlags::NOSUID | rustix::mount::MountFlags::NODEV,
        Some(options_c.as_c_str()),
    )
    .map_err(|err| {
        HiveError::io(
            format!("mounting FUSE on {}", target.display()),
            std::io::Error::from(err),
        )
    })?;
    Ok(fd)
}

#[cfg(test)]
mod enforceable_tests {
    use super::*;
    use crate::config::FsAccess;
    use crate::error::ErrorCode;
    use crate::fs::tests::fs_mount;

    #[test]
    fn unenforceable_rules_refuse_to_start_without_fuse() {
        let env_rule: &[(&str, FsAccess)] = &[("/workspace/**/*.env", FsAccess::None)];
        let plain: &[(&str, FsAccess)] = &[("/workspace/**", FsAccess::Rw)];
        let cases: &[(Vec<FsMount>, bool, Option<&str>)] = &[
            // needs FUSE, FUSE missing: refused, naming the rule
            (
                vec![fs_mount(Some(env_rule), false)],
                false,
                Some("acls[0]"),
            ),
            // audit needs FUSE too
            (vec![fs_mount(None, true)], false, Some("audit")),
            // FUSE present: fine
            (vec![fs_mount(Some(env_rule), false)], true, None),
            // plain rules never need it
            (
                vec![fs_mount(Some(plain), false), fs_mount(None, false)],
                false,
                None,
            ),
        ];
        for (mounts, fuse, expected) in cases {
            let got = unenforceable(mounts, *fuse);
            match (got, expected) {
                (None, None) => {}
                (Some(err), Some(part)) => {
                    assert_eq!(err.code(), ErrorCode::FsUnenforceable);
                    assert!(err.to_string().contains(part), "{err}");
                }
                (got, expected) => panic!("{got:?} vs {expected:?}"),
            }
        }
    }
}
