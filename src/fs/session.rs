//! The FUSE server: answers the kernel's requests for one mount, deciding every request on the
//! node's *current* path and doing the I/O through [`Source`].
//!
//! 1. Node ids name paths, not files: the table maps a node id to `(parent node, name)`, so a
//!    node's path is rebuilt on every request and follows renames of any of its ancestors. A host
//!    change behind the server's back (rename, replace) only makes a node name its old path, which
//!    is decided and resolved again like any other path.
//! 2. Every request decides the path it touches ([`Acl::decide`]) *before* any I/O and refuses
//!    with `ENOENT` (hidden) or `EACCES` (present, not permitted), emitting `fs.denied`; with
//!    `audit` every permitted mutation emits `fs.access`.
//! 3. A directory rename walks the moved subtree first and is refused if any entry would gain
//!    access under its new name (renames are serialized so two of them cannot interleave).
//! 4. Open files keep their real fd (opened by path, decided at open, as POSIX does); with kernel
//!    passthrough available (root only) reads and writes then bypass the server entirely.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use fuser::{
    AccessFlags, BackingId, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen,
    ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use parking_lot::Mutex;
use rustix::fs::{AtFlags, FileType as RawType, Mode, OFlags, Stat, Timespec, Timestamps};
use serde_json::{Map, Value};

use super::acl::{rank, Acl, Decision};
use super::cache::{Kernel, LONG_TTL, SHORT_TTL};
use super::dirfds::DirFds;
use super::ids::IdMap;
use super::listing::Listings;
use super::ops::{clear_set_id_of, set_id_cleared, split, Source};
use super::watch::{Batch, Watch};
use super::{field, op, EventSink};
use crate::events::kind;

/// Whether a `SETATTR` must clear set-id bits (`FUSE_HANDLE_KILLPRIV_V2`). The kernel asks for it
/// (`FATTR_KILL_SUIDGID`) on every change of owner of a non-directory and on every truncation by
/// a caller without `CAP_FSETID`; and it sends a `SETATTR` that changes nothing where it would
/// have cleared them itself before (`file_remove_privs` ahead of a passthrough write, which runs
/// with the server's credentials and keeps the bits; `chown(f, -1, -1)`). fuser 0.18 does not
/// pass `FATTR_KILL_SUIDGID` on, so these cases clear whether or not the caller holds
/// `CAP_FSETID`: a sandboxed process, in its own user namespace, never does, so this is exactly
/// what the kernel asks for it.
///
/// # Security
///
/// A set-user-id file of the host that a sandboxed process rewrites must not keep running with
/// its owner's rights; clearing is never skipped where the kernel used to clear.
fn clears_set_id(owner: bool, size: Option<u64>, mode: Option<u32>, times: bool) -> bool {
    owner || size.is_some() || (mode.is_none() && !times)
}

/// Whether `attr` may be cached at all: a file with several names (hard links) is not, since
/// each name is its own node here and a write through one must show in a `stat` or read through
/// another at once.
fn cacheable(attr: &FileAttr) -> bool {
    !(attr.kind == FileType::RegularFile && attr.nlink > 1)
}

/// Cache time of an entry (and its attributes) in a directory whose entries may be cached long
/// (`long`) or not.
fn ttl(long: bool, attr: &FileAttr) -> Duration {
    if !cacheable(attr) {
        Duration::ZERO
    } else if long {
        LONG_TTL
    } else {
        SHORT_TTL
    }
}

/// Node id of a node whose path no longer exists (unlinked or replaced).
const DETACHED: u64 = 0;

/// Most entries a directory rename may move before it is refused with `EXDEV` (tools such as
/// `mv` then copy file by file, each copy decided on its own).
const RENAME_WALK_LIMIT: usize = 100_000;

/// Open flags of regular files: no `FLUSH` on close (writes reach the source synchronously, so
/// there is nothing to flush).
const FILE_OPEN_FLAGS: FopenFlags = FopenFlags::FOPEN_NOFLUSH;

/// Smallest file (at open) served by kernel passthrough: below it, registering a backing file
/// costs more than the round trips it saves. A file created for writing is always passthrough
/// (where available): it is about to be written, perhaps at length (writing 100 MiB into a new
/// file measured 0.8x a bind mount with it, 1.8x without).
const PASSTHROUGH_MIN_SIZE: u64 = 1 << 20;

#[derive(Debug)]
struct Node {
    parent: u64,
    /// Shared with the parent's entry in [`Nodes::children`]: one allocation per node.
    name: Arc<OsStr>,
    lookups: u64,
    kind: FileType,
    /// A directory whose changes by the host are reported (its entries may be cached long).
    watched: bool,
    /// Whether watching it was tried.
    watch_tried: bool,
}

/// Node id <-> path table.
#[derive(Debug)]
struct Nodes {
    nodes: IdMap<Node>,
    /// Per parent node, its children by name. Nested so that a name is found by `&OsStr`
    /// without building an owned key, and hashed (SipHash: the names come from the sandbox and
    /// the host) without the parent id.
    children: IdMap<HashMap<Arc<OsStr>, u64>>,
    next: u64,
}

impl Nodes {
    fn new() -> Nodes {
        let mut nodes = IdMap::default();
        nodes.insert(
            INodeNo::ROOT.0,
            Node {
                parent: DETACHED,
                name: Arc::from(OsStr::new("")),
                lookups: 1,
                kind: FileType::Directory,
                watched: false,
                watch_tried: false,
            },
        );
        Nodes {
            nodes,
            children: IdMap::default(),
            next: INodeNo::ROOT.0 + 1,
        }
    }

    /// The path of `ino` relative to the source, or `None` once it is detached.
    fn rel(&self, ino: u64) -> Option<PathBuf> {
        let mut names = Vec::new();
        let mut current = ino;
        while current != INodeNo::ROOT.0 {
            let node = self.nodes.get(&current)?;
            if node.parent == DETACHED || names.len() > 4096 {
                return None;
            }
            names.push(&*node.name);
            current = node.parent;
        }
        Some(names.iter().rev().collect())
    }

    /// The node for `parent/name` after a successful lookup; a new id when the kind changed.
    fn remember(&mut self, parent: u64, name: &OsStr, kind: FileType) -> u64 {
        let ino = self.next;
        let dir = self.children.entry(parent).or_default();
        // One hash of the name when it is known; a new name is hashed again to insert it.
        let name = match dir.get_key_value(name) {
            Some((key, &known)) => {
                if let Some(node) = self.nodes.get_mut(&known) {
                    if node.kind == kind {
                        node.lookups += 1;
                        return known;
                    }
                    // Replaced by another kind: the old node is detached, the name gets a new id.
                    node.parent = DETACHED;
                }
                let key = key.clone();
                dir.insert(key.clone(), ino);
                key
            }
            None => {
                let key: Arc<OsStr> = Arc::from(name);
                dir.insert(key.clone(), ino);
                key
            }
        };
        self.next += 1;
        self.nodes.insert(
            ino,
            Node {
                parent,
                name,
                lookups: 1,
                kind,
                watched: false,
                watch_tried: false,
            },
        );
        ino
    }

    fn child(&self, parent: u64, name: &OsStr) -> Option<u64> {
        self.children.get(&parent)?.get(name).copied()
    }

    /// Removes `parent/name` from the children table; returns the node it named.
    fn unlink(&mut self, parent: u64, name: &OsStr) -> Option<u64> {
        let dir = self.children.get_mut(&parent)?;
        let ino = dir.remove(name);
        if dir.is_empty() {
            self.children.remove(&parent);
        }
        ino
    }

    /// Names node `ino` `parent/name` (in the children table and in the node).
    fn link(&mut self, parent: u64, name: &OsStr, ino: u64) {
        let name: Arc<OsStr> = Arc::from(name);
        self.children
            .entry(parent)
            .or_default()
            .insert(name.clone(), ino);
        if let Some(node) = self.nodes.get_mut(&ino) {
            node.parent = parent;
            node.name = name;
        }
    }

    fn detach(&mut self, ino: u64) {
        let Some(node) = self.nodes.get_mut(&ino) else {
            return;
        };
        if node.parent != DETACHED {
            let (parent, name) = (node.parent, node.name.clone());
            node.parent = DETACHED;
            self.unlink(parent, &name);
        }
    }

    /// Drops `count` lookups of `ino`; returns the node once none is left.
    fn forget(&mut self, ino: u64, count: u64) -> Option<Node> {
        if ino == INodeNo::ROOT.0 {
            return None;
        }
        let gone = match self.nodes.get_mut(&ino) {
            Some(node) => {
                node.lookups = node.lookups.saturating_sub(count);
                node.lookups == 0
            }
            None => false,
        };
        if gone {
            self.detach(ino);
            return self.nodes.remove(&ino);
        }
        None
    }

    /// Whether the entries of directory `ino` (and their attributes) may be cached long.
    fn watched(&self, ino: u64) -> bool {
        self.nodes.get(&ino).is_some_and(|node| node.watched)
    }

    /// Records a rename that succeeded on disk.
    fn renamed(&mut self, from: (u64, &OsStr), to: (u64, &OsStr), exchange: bool) {
        let moving = self.unlink(from.0, from.1);
        let target = self.unlink(to.0, to.1);
        if let Some(ino) = target {
            if exchange {
                self.link(from.0, from.1, ino);
            } else if let Some(node) = self.nodes.get_mut(&ino) {
                node.parent = DETACHED;
            }
        }
        if let Some(ino) = moving {
            self.link(to.0, to.1, ino);
        }
    }
}

/// A path both ways: relative to the source, and absolute inside the sandbox.
#[derive(Debug, Clone)]
struct Located {
    rel: PathBuf,
    /// Absolute path inside the sandbox, as decided.
    raw: Vec<u8>,
}

impl Located {
    /// The path inside the sandbox for events (not UTF-8 parts replaced); built only for an
    /// event, not for every request.
    fn path(&self) -> std::borrow::Cow<'_, str> {
        String::from_utf8_lossy(&self.raw)
    }
}

/// What a request needs from the path it touches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Need {
    /// Visible: lookup, getattr, listing (a traversable directory suffices).
    See,
    /// Readable: open for reading, readlink.
    Read,
    /// Writable, on an existing node: hidden -> `ENOENT`, visible -> `EACCES`.
    Write,
    /// Writable, for a name being created: always `EACCES`, so a refusal never tells whether a
    /// hidden file of that name exists.
    Create,
}

/// What a `setattr` asks to change.
#[derive(Debug)]
struct AttrChange {
    mode: Option<u32>,
    /// `chown`: only to the current owner (what `tar`, `cp -p` as root ask); anything else is
    /// refused with `EPERM`.
    uid: Option<u32>,
    gid: Option<u32>,
    size: Option<u64>,
    atime: Option<TimeOrNow>,
    mtime: Option<TimeOrNow>,
    fh: Option<FileHandle>,
}

#[derive(Debug)]
struct OpenFile {
    fd: OwnedFd,
    ino: u64,
    /// Keeps the kernel's passthrough backing alive while the file is open; `None`: reads and
    /// writes come through the server.
    backing: Option<Arc<BackingId>>,
}

/// The I/O mode of one inode's open files.
#[derive(Debug, Default)]
struct InodeIo {
    /// Opens served through the server.
    cached: usize,
    /// The passthrough backing shared by the inode's passthrough opens.
    backing: Weak<BackingId>,
}

#[derive(Debug)]
struct DirEntryOut {
    name: OsString,
    ino: u64,
    kind: FileType,
}

#[derive(Debug)]
enum Handle {
    File(Arc<OpenFile>),
    Dir(Arc<DirHandle>),
}

/// An open directory. Its listing is decided at the first `READDIR` on it, not at `opendir`:
/// when the kernel answers from a listing it keeps (`FOPEN_CACHE_DIR`), no `READDIR` comes, and
/// the open costs the server no listing and no decisions (a repeated `git status` opens every
/// directory of the work tree).
#[derive(Debug)]
struct DirHandle {
    /// The generation of [`Listings`] read at `opendir`. The listing is decided under the rules
    /// in force at the first `READDIR`, so under this generation or a newer one: never older,
    /// which is what the rules of [`Listings`] need.
    generation: u64,
    entries: OnceLock<Arc<Vec<DirEntryOut>>>,
}

/// What the server shares with the threads outside its request loop: `applyConfig` (new rules)
/// and the watcher (changes by the host).
pub(crate) struct Shared {
    acl: ArcSwap<Acl>,
    audit: AtomicBool,
    nodes: Mutex<Nodes>,
    /// Notifications to the kernel, once the connection is up.
    kernel: OnceLock<Kernel>,
    /// Whether entries may be cached long (the kernel can be told to forget them all at once,
    /// and a watcher reports the host's changes); else everything keeps [`SHORT_TTL`].
    long: AtomicBool,
    watch: OnceLock<Watch>,
    /// Set once the watch budget ran out (reported once).
    budget_spent: AtomicBool,
    /// The kernel's FUSE protocol minor version (from `init`).
    minor: std::sync::atomic::AtomicU32,
    /// Directory listings the kernel keeps.
    listings: Listings,
    /// Kept fds of watched source directories.
    dirs: DirFds,
    events: Arc<dyn EventSink>,
    /// `WRITE` requests served (writes through kernel passthrough never reach the server).
    served_writes: AtomicU64,
    /// Directory listings read from the source and decided.
    decided_listings: AtomicU64,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").finish_non_exhaustive()
    }
}

impl Shared {
    /// How many `WRITE` requests the server has served.
    pub(crate) fn served_writes(&self) -> u64 {
        self.served_writes.load(Ordering::Relaxed)
    }

    /// How many directory listings the server has read from the source and decided.
    pub(crate) fn decided_listings(&self) -> u64 {
        self.decided_listings.load(Ordering::Relaxed)
    }

    /// Puts new rules in force: every request from now on is decided by `acl`, and the kernel
    /// forgets every entry it cached (they are looked up, and so decided, again).
    pub(crate) fn reconfigure(&self, acl: Acl, audit: bool) {
        self.acl.store(Arc::new(acl));
        self.audit.store(audit, Ordering::Relaxed);
        self.forget_entries();
    }

    /// Makes the kernel look every cached entry up again before using it.
    fn forget_entries(&self) {
        self.listings.changed();
        self.dirs.clear();
        if let Some(kernel) = self.kernel.get() {
            if let Err(err) = kernel.inc_epoch() {
                tracing::debug!(%err, "FUSE epoch increment refused");
            }
        }
    }

    /// Makes the kernel fetch the attributes of `ino` again (its cached pages stay).
    fn forget_attrs(&self, ino: u64) {
        if let Some(kernel) = self.kernel.get() {
            if let Err(err) = kernel.inval_inode(ino, false) {
                tracing::debug!(%err, "FUSE attribute invalidation refused");
            }
        }
    }

    #[cfg(test)]
    pub(crate) fn kept_dir_fds(&self) -> usize {
        self.dirs.len()
    }

    /// Whether entries and attributes may be cached long.
    pub(crate) fn long(&self) -> bool {
        self.long.load(Ordering::Relaxed)
    }

    /// Whether the kernel can be told to forget every entry at once (Linux 6.16+).
    pub(crate) fn epoch_supported(&self) -> bool {
        self.minor.load(Ordering::Relaxed) >= super::cache::EPOCH_MINOR
    }

    /// Notifications go to `kernel` from now on.
    pub(crate) fn set_kernel(&self, kernel: Kernel) {
        let _ = self.kernel.set(kernel);
    }

    /// Starts long caching, with `watch` reporting the host's changes below the source's root
    /// `root` (an fd open for reading); needs [`Self::set_kernel`] first.
    pub(crate) fn start_long(&self, watch: Watch, root: &OwnedFd) -> bool {
        use std::os::fd::AsFd;
        if self.kernel.get().is_none() || !watch.add_dir(INodeNo::ROOT.0, root.as_fd()) {
            return false;
        }
        let _ = self.watch.set(watch);
        if let Some(root) = self.nodes.lock().nodes.get_mut(&INodeNo::ROOT.0) {
            root.watched = true;
            root.watch_tried = true;
        }
        self.long.store(true, Ordering::Relaxed);
        true
    }

    /// Waits up to `timeout` for the host's changes and makes the kernel forget what they made
    /// wrong; `false` once the watcher failed (the caller falls back to short cache times).
    pub(crate) fn serve_changes(&self, timeout: Duration) -> bool {
        let (Some(watch), Some(kernel)) = (self.watch.get(), self.kernel.get()) else {
            return false;
        };
        match watch.next(timeout) {
            Ok(batch) => {
                self.apply_changes(kernel, batch);
                true
            }
            Err(err) => {
                tracing::warn!(%err, "FUSE watcher failed; short cache times from now on");
                self.long.store(false, Ordering::Relaxed);
                self.forget_entries();
                false
            }
        }
    }

    /// Emits a `sandbox.warning` (and its stderr line).
    pub(crate) fn warn(&self, code: &str, message: &str) {
        let mut fields = Map::new();
        fields.insert("code".into(), Value::String(code.to_owned()));
        fields.insert("message".into(), Value::String(message.to_owned()));
        self.events.emit(kind::SANDBOX_WARNING, fields);
        crate::diagnostics::stderr_line(None, code, message);
    }

    /// The mount path inside the sandbox.
    pub(crate) fn mount(&self) -> String {
        self.acl.load().mount().to_owned()
    }

    fn apply_changes(&self, kernel: &Kernel, batch: Batch) {
        let mut names_changed = batch.overflow;
        for change in &batch.changes {
            let mut results = Vec::with_capacity(2);
            match &change.name {
                None => results.push(kernel.inval_inode(change.dir, false)),
                Some(name) => {
                    if change.entry {
                        names_changed = true;
                        results.push(kernel.inval_entry(change.dir, name));
                    }
                    let child = self.nodes.lock().child(change.dir, name);
                    if let (true, Some(child)) = (change.content || change.entry, child) {
                        results.push(kernel.inval_inode(child, true));
                    }
                }
            }
            for err in results.into_iter().filter_map(|r| r.err()) {
                tracing::debug!(%err, "FUSE invalidation refused");
            }
        }
        if batch.overflow {
            let all: Vec<u64> = self.nodes.lock().nodes.keys().copied().collect();
            for ino in all {
                let _ = kernel.inval_inode(ino, true);
            }
        }
        if names_changed {
            // A lookup answered just before the change may still be on its way into the cache:
            // the epoch makes the kernel ask again (docs/decisions.md, file caching).
            self.forget_entries();
        }
    }
}

/// The FUSE file system of one mount.
pub(crate) struct Server {
    shared: Arc<Shared>,
    source: Source,
    events: Arc<dyn EventSink>,
    handles: Mutex<IdMap<Handle>>,
    next_fh: AtomicU64,
    rename_lock: Mutex<()>,
    passthrough_wanted: bool,
    passthrough: Arc<AtomicBool>,
    io: Mutex<IdMap<InodeIo>>,
    /// `(uid, gid)` every file is shown as owned by (in the mount's user namespace).
    owner: Option<(u32, u32)>,
}

fn errno(err: rustix::io::Errno) -> Errno {
    Errno::from_i32(err.raw_os_error())
}

fn file_type(kind: RawType) -> FileType {
    match kind {
        RawType::Directory => FileType::Directory,
        RawType::Symlink => FileType::Symlink,
        RawType::Fifo => FileType::NamedPipe,
        RawType::Socket => FileType::Socket,
        RawType::CharacterDevice => FileType::CharDevice,
        RawType::BlockDevice => FileType::BlockDevice,
        _ => FileType::RegularFile,
    }
}

fn time(secs: i64, nsecs: i64) -> SystemTime {
    let nanos = u32::try_from(nsecs).unwrap_or(0);
    if secs >= 0 {
        UNIX_EPOCH + Duration::new(secs as u64, nanos)
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()) + Duration::from_nanos(nanos.into())
    }
}

fn attr(ino: u64, st: &Stat) -> FileAttr {
    let mtime = time(st.st_mtime, st.st_mtime_nsec as i64);
    FileAttr {
        ino: INodeNo(ino),
        size: st.st_size as u64,
        blocks: st.st_blocks as u64,
        atime: time(st.st_atime, st.st_atime_nsec as i64),
        mtime,
        ctime: time(st.st_ctime, st.st_ctime_nsec as i64),
        crtime: mtime,
        kind: file_type(RawType::from_raw_mode(st.st_mode)),
        perm: (st.st_mode & 0o7777) as u16,
        nlink: st.st_nlink as u32,
        uid: st.st_uid,
        gid: st.st_gid,
        rdev: st.st_rdev as u32,
        blksize: st.st_blksize as u32,
        flags: 0,
    }
}

/// The attributes of a negative entry (node id 0: "no such name").
fn negative_attr() -> FileAttr {
    FileAttr {
        ino: INodeNo(0),
        size: 0,
        blocks: 0,
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind: FileType::RegularFile,
        perm: 0,
        nlink: 0,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 0,
        flags: 0,
    }
}

fn timespec(time: Option<TimeOrNow>) -> Timespec {
    match time {
        None => Timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        Some(TimeOrNow::Now) => Timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_NOW,
        },
        Some(TimeOrNow::SpecificTime(t)) => match t.duration_since(UNIX_EPOCH) {
            Ok(d) => Timespec {
                tv_sec: d.as_secs() as i64,
                tv_nsec: i64::from(d.subsec_nanos()),
            },
            Err(before) => Timespec {
                tv_sec: -(before.duration().as_secs() as i64),
                tv_nsec: 0,
            },
        },
    }
}

impl Server {
    pub(crate) fn new(
        acl: Acl,
        source: Source,
        events: Arc<dyn EventSink>,
        audit: bool,
        passthrough: bool,
    ) -> Server {
        Server {
            shared: Arc::new(Shared {
                acl: ArcSwap::from_pointee(acl),
                audit: AtomicBool::new(audit),
                nodes: Mutex::new(Nodes::new()),
                kernel: OnceLock::new(),
                long: AtomicBool::new(false),
                watch: OnceLock::new(),
                budget_spent: AtomicBool::new(false),
                minor: std::sync::atomic::AtomicU32::new(0),
                listings: Listings::default(),
                dirs: DirFds::default(),
                events: events.clone(),
                served_writes: AtomicU64::new(0),
                decided_listings: AtomicU64::new(0),
            }),
            source,
            events,
            handles: Mutex::new(IdMap::default()),
            next_fh: AtomicU64::new(1),
            rename_lock: Mutex::new(()),
            passthrough_wanted: passthrough,
            passthrough: Arc::new(AtomicBool::new(false)),
            io: Mutex::new(IdMap::default()),
            owner: None,
        }
    }

    /// The state shared with `applyConfig` and the watcher.
    pub(crate) fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    /// The source's root, open for reading (for the watcher's first mark).
    pub(crate) fn source_root(&self) -> Result<OwnedFd, rustix::io::Errno> {
        self.source.open(
            Path::new(""),
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NONBLOCK,
            Mode::empty(),
        )
    }

    fn acl(&self) -> arc_swap::Guard<Arc<Acl>> {
        self.shared.acl.load()
    }

    /// Cache time of the entry `attr` in directory `parent`, and of its attributes.
    fn ttl_in(&self, parent: u64, attr: &FileAttr) -> Duration {
        ttl(self.long_in(parent), attr)
    }

    /// Whether entries of directory `parent` may be cached long.
    fn long_in(&self, parent: u64) -> bool {
        self.shared.long() && self.shared.nodes.lock().watched(parent)
    }

    /// Cache time of the attributes of node `ino`.
    fn ttl_of(&self, ino: u64, attr: &FileAttr) -> Duration {
        let parent = self.shared.nodes.lock().nodes.get(&ino).map(|n| n.parent);
        match parent {
            Some(parent) if parent != DETACHED => self.ttl_in(parent, attr),
            _ if cacheable(attr) => SHORT_TTL,
            _ => Duration::ZERO,
        }
    }

    /// Cache time of "no such name" in directory `parent` (zero: not cached).
    fn negative_ttl(&self, parent: u64) -> Duration {
        if self.shared.long() && self.shared.nodes.lock().watched(parent) {
            LONG_TTL
        } else {
            Duration::ZERO
        }
    }

    /// Watches the new directory node `ino` (before its lookup is answered), so its entries may
    /// be cached long.
    fn watch_dir(&self, ino: u64) {
        let Some(watch) = self.shared.watch.get() else {
            return;
        };
        let rel = {
            let mut nodes = self.shared.nodes.lock();
            match nodes.nodes.get_mut(&ino) {
                Some(node) if !node.watch_tried => node.watch_tried = true,
                _ => return,
            }
            nodes.rel(ino)
        };
        let Some(rel) = rel else { return };
        let watched = self
            .source
            .open(
                &rel,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NONBLOCK,
                Mode::empty(),
            )
            .is_ok_and(|dir| watch.add_dir(ino, std::os::fd::AsFd::as_fd(&dir)));
        if watched {
            if let Some(node) = self.shared.nodes.lock().nodes.get_mut(&ino) {
                node.watched = true;
            }
        } else if !self.shared.budget_spent.swap(true, Ordering::Relaxed) {
            // An unwatched directory's renames by the host go unheard: keep no fd from now on.
            self.shared.dirs.clear();
            self.shared.warn(
                super::warning::FS_CACHE_SHORT,
                &format!(
                    "{}: some directories cannot be watched for changes by the host (at most {} \
                     per mount); their entries are cached for {} s only",
                    self.acl().mount(),
                    super::watch::MARK_BUDGET,
                    SHORT_TTL.as_secs()
                ),
            );
        }
    }

    /// Shows every file as owned by `uid:gid` (ids as the mount's user namespace sees them).
    pub(crate) fn present_owner(&mut self, uid: u32, gid: u32) {
        self.owner = Some((uid, gid));
    }

    /// The attributes of `st` under node id `ino`, with the presented owner.
    fn attr(&self, ino: u64, st: &Stat) -> FileAttr {
        let mut attr = attr(ino, st);
        if let Some((uid, gid)) = self.owner {
            attr.uid = uid;
            attr.gid = gid;
        }
        attr
    }

    /// Set once the kernel accepted passthrough; cleared if registering a backing file fails.
    pub(crate) fn passthrough_flag(&self) -> Arc<AtomicBool> {
        self.passthrough.clone()
    }

    pub(crate) fn disable_passthrough(&mut self) {
        self.passthrough_wanted = false;
    }

    /// The path inside the sandbox of `rel`, as bytes (file names need not be UTF-8).
    fn sandbox_path(&self, rel: &Path) -> Vec<u8> {
        let mut path = self.acl().mount().as_bytes().to_vec();
        for component in rel.iter() {
            path.push(b'/');
            path.extend_from_slice(component.as_bytes());
        }
        path
    }

    fn located(&self, rel: PathBuf) -> Located {
        let raw = self.sandbox_path(&rel);
        Located { raw, rel }
    }

    fn locate(&self, ino: INodeNo) -> Result<Located, Errno> {
        self.serving();
        let rel = self.shared.nodes.lock().rel(ino.0).ok_or(Errno::ENOENT)?;
        Ok(self.located(rel))
    }

    fn child(&self, parent: &Located, name: &OsStr) -> Result<Located, Errno> {
        let bytes = name.as_bytes();
        if bytes.is_empty() || bytes == b"." || bytes == b".." || bytes.contains(&b'/') {
            return Err(Errno::EINVAL);
        }
        // The parent's sandbox path plus `/name`: what `sandbox_path` of the joined path gives,
        // without walking the parent's components again.
        let mut raw = Vec::with_capacity(parent.raw.len() + 1 + bytes.len());
        raw.extend_from_slice(&parent.raw);
        raw.push(b'/');
        raw.extend_from_slice(bytes);
        Ok(Located {
            rel: parent.rel.join(name),
            raw,
        })
    }

    /// Marks the calling thread as the server's: the watcher does not report its changes back.
    fn serving(&self) {
        if let Some(watch) = self.shared.watch.get() {
            watch.serving_thread();
        }
    }

    fn emit(&self, kind: &str, path: &str, operation: &str, extra: Option<(&str, Value)>) {
        let mut fields = Map::new();
        fields.insert(field::PATH.into(), Value::String(path.to_owned()));
        fields.insert(field::OPERATION.into(), Value::String(operation.to_owned()));
        if let Some((name, value)) = extra {
            fields.insert(name.into(), value);
        }
        self.events.emit(kind, fields);
    }

    fn deny(&self, path: &str, operation: &str, decision: &Decision, err: Errno) -> Errno {
        let rule = decision.rule.map_or(Value::Null, Value::from);
        self.emit(kind::FS_DENIED, path, operation, Some((field::RULE, rule)));
        err
    }

    fn audit(&self, path: &str, operation: &str, new_path: Option<&str>) {
        if self.shared.audit.load(Ordering::Relaxed) {
            let extra = new_path.map(|p| (field::NEW_PATH, Value::String(p.to_owned())));
            self.emit(kind::FS_ACCESS, path, operation, extra);
        }
    }

    /// Decides `loc` for `need`; a refusal emits `fs.denied` for `operation`.
    fn check(&self, loc: &Located, operation: &str, need: Need) -> Result<Decision, Errno> {
        let acl = self.acl();
        let decision = acl.decide_raw(&loc.raw);
        let visible = acl.visible_raw(&loc.raw, &decision);
        let refusal = match need {
            Need::See if visible => None,
            Need::Read if decision.can_read() => None,
            Need::Write | Need::Create if decision.can_write() => None,
            Need::Create => Some(Errno::EACCES),
            _ if visible => Some(Errno::EACCES),
            _ => Some(Errno::ENOENT),
        };
        match refusal {
            None => Ok(decision),
            // Creating over an existing hidden name: the kernel's lookup of that name, which
            // always comes first (a refused lookup leaves no cached entry), already reported it;
            // one refused system call, one event.
            Some(err)
                if need == Need::Create && !visible && self.source.lstat(&loc.rel).is_ok() =>
            {
                Err(err)
            }
            Some(err) => Err(self.deny(&loc.path(), operation, &decision, err)),
        }
    }

    /// The parent directory of a request, which must be visible.
    fn parent(&self, ino: INodeNo, operation: &str) -> Result<Located, Errno> {
        let loc = self.locate(ino)?;
        if !loc.rel.as_os_str().is_empty() {
            self.check(&loc, operation, Need::See)?;
        }
        Ok(loc)
    }

    fn stat_entry(&self, parent: INodeNo, name: &OsStr, loc: &Located) -> Result<FileAttr, Errno> {
        let st = self.source.lstat(&loc.rel).map_err(errno)?;
        Ok(self.entry(parent, name, &st))
    }

    /// Remembers `parent/name` (stat `st`) and returns its attributes under its node id.
    fn entry(&self, parent: INodeNo, name: &OsStr, st: &Stat) -> FileAttr {
        let kind = file_type(RawType::from_raw_mode(st.st_mode));
        let ino = self.shared.nodes.lock().remember(parent.0, name, kind);
        if kind == FileType::Directory {
            self.watch_dir(ino);
        }
        self.attr(ino, st)
    }

    /// An `O_PATH` fd of the directory node `ino` at `rel`: the kept one where the directory's
    /// changes by the host are heard ([`DirFds`]), else a new one.
    fn dir_fd(&self, ino: u64, rel: &Path) -> Result<Arc<OwnedFd>, Errno> {
        let keepable = self.shared.long() && !self.shared.budget_spent.load(Ordering::Relaxed);
        if keepable {
            if let Some(fd) = self.shared.dirs.get(ino) {
                return Ok(fd);
            }
        }
        let generation = self.shared.dirs.generation();
        let fd = Arc::new(self.source.dir(rel).map_err(errno)?);
        if keepable {
            // A rename by the sandbox may have moved the node since `rel` was read; it clears the
            // kept fds after updating the nodes, so either the generation or the path tells.
            let nodes = self.shared.nodes.lock();
            if nodes.watched(ino) && nodes.rel(ino).as_deref() == Some(rel) {
                self.shared.dirs.keep(ino, fd.clone(), generation);
            }
        }
        Ok(fd)
    }

    fn file(&self, fh: FileHandle) -> Result<Arc<OpenFile>, Errno> {
        self.serving();
        match self.handles.lock().get(&fh.0) {
            Some(Handle::File(file)) => Ok(file.clone()),
            _ => Err(Errno::EBADF),
        }
    }

    fn insert_handle(&self, handle: Handle) -> FileHandle {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles.lock().insert(fh, handle);
        FileHandle(fh)
    }

    /// Chooses the I/O mode of a new open of `ino` (size `size`): kernel passthrough for files of
    /// at least [`PASSTHROUGH_MIN_SIZE`] where available, else reads and writes through the
    /// server. The kernel refuses (`EIO`) to mix both modes on one inode, so an inode keeps the
    /// mode of its open files: every open of a passthrough inode shares its backing, and an inode
    /// with cached opens is not switched.
    fn open_mode(
        &self,
        ino: u64,
        size: u64,
        fd: &OwnedFd,
        open_backing: impl FnOnce(&OwnedFd) -> std::io::Result<BackingId>,
    ) -> Option<Arc<BackingId>> {
        let mut io = self.io.lock();
        let entry = io.entry(ino).or_default();
        if let Some(existing) = entry.backing.upgrade() {
            return Some(existing);
        }
        if entry.cached == 0
            && size >= PASSTHROUGH_MIN_SIZE
            && self.passthrough.load(Ordering::Relaxed)
        {
            match open_backing(fd) {
                Ok(id) => {
                    let id = Arc::new(id);
                    entry.backing = Arc::downgrade(&id);
                    return Some(id);
                }
                Err(err) => {
                    self.passthrough.store(false, Ordering::Relaxed);
                    self.shared.warn(
                        crate::diagnostics::code::FS_PASSTHROUGH_UNAVAILABLE,
                        &format!(
                            "FUSE passthrough is unavailable ({err}); {} serves every read and \
                             write itself (slower, not weaker)",
                            self.shared.mount()
                        ),
                    );
                }
            }
        }
        entry.cached += 1;
        None
    }

    /// Forgets an open of `ino` that was `cached` (after its handle is dropped).
    fn closed(&self, ino: u64, cached: bool) {
        let mut io = self.io.lock();
        if let Some(entry) = io.get_mut(&ino) {
            if cached {
                entry.cached = entry.cached.saturating_sub(1);
            }
            if entry.cached == 0 && entry.backing.strong_count() == 0 {
                io.remove(&ino);
            }
        }
    }

    fn open_handle(&self, ino: u64, fd: OwnedFd, backing: Option<Arc<BackingId>>) -> FileHandle {
        self.insert_handle(Handle::File(Arc::new(OpenFile { fd, ino, backing })))
    }

    /// Refuses a directory rename that would give any entry below it more access under its new
    /// name than it has now (`mv a b` must not expose `a/private/**` as `b/private/**`). Returns
    /// whether any entry below would be decided differently under its new name (it may then have
    /// been cached with what its old name allowed).
    fn check_subtree_move(&self, from: &Located, to: &Located) -> Result<bool, Errno> {
        let acl = self.acl();
        if !acl.has_rules() {
            return Ok(false);
        }
        let mut differs = false;
        let offending = self
            .source
            .walk(&from.rel, RENAME_WALK_LIMIT, |suffix| {
                let old = self.sandbox_path(&from.rel.join(suffix));
                let new = self.sandbox_path(&to.rel.join(suffix));
                let before = acl.decide_raw(&old);
                let after = acl.decide_raw(&new);
                differs |= before.access != after.access
                    || acl.visible_raw(&old, &before) != acl.visible_raw(&new, &after);
                (rank(after.access) > rank(before.access)).then_some((old, before))
            })
            .map_err(errno)?;
        match offending {
            None => Ok(differs),
            Some((old, before)) => {
                let old = String::from_utf8_lossy(&old);
                Err(self.deny(&old, op::RENAME, &before, Errno::EACCES))
            }
        }
    }

    /// Answers an open; `rewrite`: opened for writing with `O_TRUNC`, so (like a created file)
    /// about to be written from empty, and passthrough whatever size it will reach.
    fn reply_open(&self, ino: INodeNo, fd: OwnedFd, rewrite: bool, reply: ReplyOpen) {
        let size = rustix::fs::fstat(&fd).map_or(0, |st| st.st_size as u64);
        let size = if rewrite {
            size.max(PASSTHROUGH_MIN_SIZE)
        } else {
            size
        };
        let backing = self.open_mode(ino.0, size, &fd, |fd| reply.open_backing(fd));
        let fh = self.open_handle(ino.0, fd, backing.clone());
        match backing {
            Some(id) => reply.opened_passthrough(fh, FILE_OPEN_FLAGS, &id),
            None => reply.opened(fh, FILE_OPEN_FLAGS),
        }
    }

    fn do_setattr(&self, ino: INodeNo, change: AttrChange) -> Result<FileAttr, Errno> {
        let AttrChange {
            mode,
            uid,
            gid,
            size,
            atime,
            mtime,
            fh,
        } = change;
        let owner = uid.is_some() || gid.is_some();
        let loc = self.locate(ino)?;
        let operation = if size.is_some() {
            op::TRUNCATE
        } else if mode.is_some() {
            op::CHMOD
        } else if owner {
            op::CHOWN
        } else {
            op::UTIMENS
        };
        self.check(&loc, operation, Need::Write)?;
        // What the file was before an owner change (whose set-id bits it may have to lose).
        let mut before = None;
        if owner {
            // The server writes as the host program; ownership stays the host's.
            let st = self.source.lstat(&loc.rel).map_err(errno)?;
            let current = self.attr(ino.0, &st);
            if uid.is_some_and(|uid| uid != current.uid)
                || gid.is_some_and(|gid| gid != current.gid)
            {
                return Err(Errno::EPERM);
            }
            before = Some(st);
        }
        // The open file a truncation names (it must exist); otherwise any handle passed along.
        let file = match fh {
            Some(fh) if size.is_some() => Some(self.file(fh)?),
            Some(fh) => self.file(fh).ok(),
            None => None,
        };
        if let Some(size) = size {
            match &file {
                Some(file) => rustix::fs::ftruncate(&file.fd, size).map_err(errno)?,
                None => self.source.truncate(&loc.rel, size).map_err(errno)?,
            }
        }
        if clears_set_id(owner, size, mode, atime.is_some() || mtime.is_some())
            && before
                .as_ref()
                .is_none_or(|st| set_id_cleared(st).is_some())
        {
            match &file {
                Some(file) => clear_set_id_of(&file.fd).map_err(errno)?,
                None => self.source.clear_set_id(&loc.rel).map_err(errno)?,
            };
        }
        if let Some(mode) = mode {
            self.source.chmod(&loc.rel, mode).map_err(errno)?;
        }
        if atime.is_some() || mtime.is_some() {
            let times = Timestamps {
                last_access: timespec(atime),
                last_modification: timespec(mtime),
            };
            self.source.utimens(&loc.rel, &times).map_err(errno)?;
        }
        self.audit(&loc.path(), operation, None);
        let st = self.source.lstat(&loc.rel).map_err(errno)?;
        Ok(self.attr(ino.0, &st))
    }

    fn do_create_node(
        &self,
        parent: INodeNo,
        name: &OsStr,
        operation: &str,
        make: impl FnOnce(&Path) -> Result<(), rustix::io::Errno>,
    ) -> Result<FileAttr, Errno> {
        let dir = self.parent(parent, operation)?;
        let loc = self.child(&dir, name)?;
        self.check(&loc, operation, Need::Create)?;
        make(&dir.rel).map_err(errno)?;
        self.audit(&loc.path(), operation, None);
        self.stat_entry(parent, name, &loc)
    }

    fn do_rename(
        &self,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
    ) -> Result<(), Errno> {
        let from_dir = self.parent(parent, op::RENAME)?;
        let to_dir = self.parent(newparent, op::RENAME)?;
        let from = self.child(&from_dir, name)?;
        let to = self.child(&to_dir, newname)?;
        if flags.contains(RenameFlags::RENAME_WHITEOUT) {
            // An overlayfs whiteout is a device node; the sandbox gets none.
            return Err(Errno::EINVAL);
        }
        let exchange = flags.contains(RenameFlags::RENAME_EXCHANGE);
        self.check(&from, op::RENAME, Need::Write)?;
        self.check(
            &to,
            op::RENAME,
            if exchange { Need::Write } else { Need::Create },
        )?;
        let _serialized = self.rename_lock.lock();
        let from_is_dir =
            self.source.lstat(&from.rel).map_err(errno)?.st_mode & libc::S_IFMT == libc::S_IFDIR;
        let mut differs = false;
        if from_is_dir {
            differs |= self.check_subtree_move(&from, &to)?;
        }
        let mut to_is_dir = false;
        if exchange {
            to_is_dir =
                self.source.lstat(&to.rel).map_err(errno)?.st_mode & libc::S_IFMT == libc::S_IFDIR;
            if to_is_dir {
                differs |= self.check_subtree_move(&to, &from)?;
            }
        }
        self.source
            .rename(&from_dir.rel, name, &to_dir.rel, newname, flags.bits())
            .map_err(errno)?;
        self.shared
            .nodes
            .lock()
            .renamed((parent.0, name), (newparent.0, newname), exchange);
        if from_is_dir || to_is_dir {
            // Directories changed paths (or one was replaced): kept fds are looked up again.
            self.shared.dirs.clear();
        }
        if differs {
            // The kernel moves the cached entries below along with the directory; they were
            // cached with what their old names allowed.
            self.shared.forget_entries();
        }
        self.audit(&from.path(), op::RENAME, Some(&to.path()));
        Ok(())
    }

    /// Opens directory `ino` (if the sandbox may see it) and returns its handle and open flags;
    /// the listing is decided later, by [`Server::listing`].
    fn do_opendir(&self, ino: INodeNo) -> Result<(FileHandle, FopenFlags), Errno> {
        // Read before anything is decided: a change from now on makes this handle old.
        let generation = self.shared.listings.generation();
        let loc = self.locate(ino)?;
        if !loc.rel.as_os_str().is_empty() {
            self.check(&loc, op::READDIR, Need::See)?;
        }
        let fh = self.insert_handle(Handle::Dir(Arc::new(DirHandle {
            generation,
            entries: OnceLock::new(),
        })));
        let keepable = self.shared.long() && self.shared.nodes.lock().watched(ino.0);
        let flags = self.shared.listings.open(ino.0, generation, keepable, || {
            match self.shared.kernel.get() {
                Some(kernel) => kernel.inval_inode(ino.0, true).is_ok(),
                None => false,
            }
        });
        Ok((fh, flags))
    }

    /// The listing of the directory open as `fh`, decided at its first `READDIR` on the rules
    /// then in force: only the entries the sandbox may see, with `.` and `..`.
    fn listing(&self, ino: INodeNo, fh: FileHandle) -> Result<Arc<Vec<DirEntryOut>>, Errno> {
        let dir = match self.handles.lock().get(&fh.0) {
            Some(Handle::Dir(dir)) => dir.clone(),
            _ => return Err(Errno::EBADF),
        };
        if let Some(entries) = dir.entries.get() {
            return Ok(entries.clone());
        }
        let loc = self.locate(ino)?;
        // Seen again under the rules and at the path of now: the directory may have moved, or
        // the rules changed, since `opendir`.
        if !loc.rel.as_os_str().is_empty() {
            self.check(&loc, op::READDIR, Need::See)?;
        }
        let raw = self.source.list(&loc.rel).map_err(errno)?;
        self.shared.decided_listings.fetch_add(1, Ordering::Relaxed);
        let mut entries = Vec::with_capacity(raw.len() + 2);
        entries.push(DirEntryOut {
            name: ".".into(),
            ino: ino.0,
            kind: FileType::Directory,
        });
        entries.push(DirEntryOut {
            name: "..".into(),
            ino: ino.0,
            kind: FileType::Directory,
        });
        let acl = self.acl();
        // Each entry's path is the directory's plus `/name`, built in one reused buffer.
        let mut path = loc.raw;
        let dir_len = path.len();
        for entry in raw {
            path.truncate(dir_len);
            path.push(b'/');
            path.extend_from_slice(entry.name.as_bytes());
            let decision = acl.decide_raw(&path);
            if acl.visible_raw(&path, &decision) {
                entries.push(DirEntryOut {
                    name: entry.name,
                    ino: entry.ino,
                    kind: file_type(entry.kind),
                });
            }
        }
        // Two `READDIR`s of one handle at once (rare: the kernel serializes `getdents` per open
        // file) both decide; the first decision is the handle's listing.
        Ok(dir.entries.get_or_init(|| Arc::new(entries)).clone())
    }
}

impl Filesystem for Server {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        self.shared
            .minor
            .store(config.kernel_abi().1, Ordering::Relaxed);
        // Lookups in one directory may run in parallel (the server's tables are locked), and
        // `open(O_TRUNC)` arrives as one request (decided as a write) instead of open + setattr.
        // With READDIRPLUS (adaptive) a listing carries each entry's attributes, so `ls -l`,
        // `find` or `git status` do not look every entry up again. With HANDLE_KILLPRIV_V2 the
        // server clears set-id bits on writes, truncations and changes of owner itself (see
        // `clear_set_id`), so the kernel no longer fetches the mode (a `GETATTR`) before every
        // `chown` (one round trip per file of an unpack as root).
        for wanted in [
            InitFlags::FUSE_PARALLEL_DIROPS,
            InitFlags::FUSE_ATOMIC_O_TRUNC,
            InitFlags::FUSE_DO_READDIRPLUS,
            InitFlags::FUSE_READDIRPLUS_AUTO,
            InitFlags::FUSE_HANDLE_KILLPRIV_V2,
        ] {
            if config.capabilities().contains(wanted) {
                let _ = config.add_capabilities(wanted);
            }
        }
        if self.passthrough_wanted && config.capabilities().contains(InitFlags::FUSE_PASSTHROUGH) {
            let stacked = config
                .set_max_stack_depth(2)
                .or_else(|nearest| config.set_max_stack_depth(nearest));
            if stacked.is_ok() && config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok() {
                self.passthrough.store(true, Ordering::Relaxed);
            }
        } else if self.passthrough_wanted {
            self.shared.warn(
                crate::diagnostics::code::FS_PASSTHROUGH_UNAVAILABLE,
                &format!(
                    "this kernel offers no FUSE passthrough; {} serves every read and write \
                     itself (slower, not weaker)",
                    self.shared.mount()
                ),
            );
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        // The error, and whether it says "no such name" about this very name (cacheable).
        let result = (|| -> Result<FileAttr, (Errno, bool)> {
            let dir = self.parent(parent, op::LOOKUP).map_err(|e| (e, false))?;
            let loc = self.child(&dir, name).map_err(|e| (e, false))?;
            let dir_fd = self.dir_fd(parent.0, &dir.rel).map_err(|e| (e, false))?;
            // Stat first: a name that does not exist is a plain ENOENT, not a refusal. `name` is
            // one component (checked by `child`) and a trailing symlink is not followed.
            let st = rustix::fs::statat(&*dir_fd, name, AtFlags::SYMLINK_NOFOLLOW)
                .map_err(|err| (errno(err), true))?;
            self.check(&loc, op::LOOKUP, Need::See)
                .map_err(|err| (err, true))?;
            Ok(self.entry(parent, name, &st))
        })();
        match result {
            Ok(attr) => reply.entry(&self.ttl_in(parent.0, &attr), &attr, Generation(0)),
            // A name that does not exist, or is hidden, in a watched directory: the kernel may
            // answer "no such name" itself until told otherwise (a host create, new rules).
            Err((err, true)) if err.code() == Errno::ENOENT.code() => {
                let ttl = self.negative_ttl(parent.0);
                if ttl.is_zero() {
                    reply.error(err);
                } else {
                    reply.entry(&ttl, &negative_attr(), Generation(0));
                }
            }
            Err((err, _)) => reply.error(err),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        let gone = self.shared.nodes.lock().forget(ino.0, nlookup);
        if gone
            .as_ref()
            .is_some_and(|node| node.kind == FileType::Directory)
        {
            self.shared.listings.forget(ino.0);
            self.shared.dirs.remove(ino.0);
        }
        if let (Some(node), Some(watch)) = (gone, self.shared.watch.get()) {
            if node.watched {
                watch.forget_dir(ino.0);
            }
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        let result = (|| {
            if let Some(fh) = fh {
                if let Ok(file) = self.file(fh) {
                    let st = rustix::fs::fstat(&file.fd).map_err(errno)?;
                    return Ok(self.attr(ino.0, &st));
                }
            }
            let loc = self.locate(ino)?;
            if !loc.rel.as_os_str().is_empty() {
                self.check(&loc, op::GETATTR, Need::See)?;
            }
            let st = self.source.lstat(&loc.rel).map_err(errno)?;
            Ok(self.attr(ino.0, &st))
        })();
        match result {
            Ok(attr) => reply.attr(&self.ttl_of(ino.0, &attr), &attr),
            Err(err) => reply.error(err),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let change = AttrChange {
            mode,
            uid,
            gid,
            size,
            atime,
            mtime,
            fh,
        };
        match self.do_setattr(ino, change) {
            Ok(attr) => reply.attr(&self.ttl_of(ino.0, &attr), &attr),
            Err(err) => reply.error(err),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let result = (|| {
            let loc = self.locate(ino)?;
            self.check(&loc, op::READLINK, Need::Read)?;
            self.source.readlink(&loc.rel).map_err(errno)
        })();
        match result {
            Ok(target) => reply.data(&target),
            Err(err) => reply.error(err),
        }
    }

    fn mknod(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        let result = self.do_create_node(parent, name, op::MKNOD, |dir| {
            self.source.mknod(dir, name, mode & !umask)
        });
        match result {
            Ok(attr) => reply.entry(&self.ttl_in(parent.0, &attr), &attr, Generation(0)),
            Err(err) => reply.error(err),
        }
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let result = self.do_create_node(parent, name, op::MKDIR, |dir| {
            self.source.mkdir(dir, name, mode & !umask)
        });
        match result {
            Ok(attr) => reply.entry(&self.ttl_in(parent.0, &attr), &attr, Generation(0)),
            Err(err) => reply.error(err),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(self.remove(parent, name, false), reply);
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(self.remove(parent, name, true), reply);
    }

    fn symlink(
        &self,
        _req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let result = self.do_create_node(parent, link_name, op::SYMLINK, |dir| {
            self.source.symlink(target, dir, link_name)
        });
        match result {
            Ok(attr) => reply.entry(&self.ttl_in(parent.0, &attr), &attr, Generation(0)),
            Err(err) => reply.error(err),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply_empty(
            self.do_rename(parent, name, newparent, newname, flags),
            reply,
        );
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let result = (|| {
            let from = self.locate(ino)?;
            // Linking gives the file a second name with that name's access, so the file itself
            // must already be writable (a read-only file must not gain a writable name).
            self.check(&from, op::LINK, Need::Write)?;
            let (from_parent, from_name) = split(&from.rel).map_err(errno)?;
            let attr = self.do_create_node(newparent, newname, op::LINK, |dir| {
                self.source.link(from_parent, from_name, dir, newname)
            })?;
            Ok(attr)
        })();
        match result {
            Ok(attr) => {
                // The existing name is its own node, cached as a file with one link: it must not
                // be cached any more (a write through the new name must show through it at once).
                // The kernel must have forgotten its attributes before the link returns, so the
                // notifications go out before the reply (the kernel handles a notification
                // within the write that sends it); neither takes a lock the kernel holds during
                // a link, and a getattr answered meanwhile with the old attributes is dropped by
                // the kernel (its attribute version predates the invalidation).
                self.shared.forget_attrs(ino.0);
                self.shared.forget_entries();
                reply.entry(&self.ttl_in(newparent.0, &attr), &attr, Generation(0));
            }
            Err(err) => reply.error(err),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let result = (|| {
            let loc = self.locate(ino)?;
            let writes =
                (flags.0 & libc::O_ACCMODE) != libc::O_RDONLY || flags.0 & libc::O_TRUNC != 0;
            let need = if writes { Need::Write } else { Need::Read };
            self.check(&loc, op::OPEN, need)?;
            let fd = self.source.open_file(&loc.rel, flags.0).map_err(errno)?;
            if writes {
                if flags.0 & libc::O_TRUNC != 0 {
                    // The kernel asks for this (`FUSE_OPEN_KILL_SUIDGID`) for every caller without
                    // `CAP_FSETID`, which a sandboxed process never has; the server's own
                    // truncation (with the host program's credentials) kept the bits.
                    clear_set_id_of(&fd).map_err(errno)?;
                }
                self.audit(&loc.path(), op::WRITE, None);
            }
            Ok(fd)
        })();
        match result {
            Ok(fd) => {
                let rewrite =
                    flags.0 & libc::O_TRUNC != 0 && flags.0 & libc::O_ACCMODE != libc::O_RDONLY;
                self.reply_open(ino, fd, rewrite, reply)
            }
            Err(err) => reply.error(err),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let result = (|| {
            let file = self.file(fh)?;
            let mut buf = vec![0u8; size as usize];
            let mut filled = 0;
            while filled < buf.len() {
                let n = rustix::io::pread(&file.fd, &mut buf[filled..], offset + filled as u64)
                    .map_err(errno)?;
                if n == 0 {
                    break;
                }
                filled += n;
            }
            buf.truncate(filled);
            Ok(buf)
        })();
        match result {
            Ok(data) => reply.data(&data),
            Err(err) => reply.error(err),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        self.shared.served_writes.fetch_add(1, Ordering::Relaxed);
        // Only files opened for writing (decided rw at open) hold a writable fd.
        let result = (|| {
            let file = self.file(fh)?;
            if write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID) {
                // The writer has no `CAP_FSETID`; the server's own `pwrite` (with the host
                // program's credentials) would keep the bits.
                clear_set_id_of(&file.fd).map_err(errno)?;
            }
            let mut written = 0;
            while written < data.len() {
                let n = rustix::io::pwrite(&file.fd, &data[written..], offset + written as u64)
                    .map_err(errno)?;
                if n == 0 {
                    break;
                }
                written += n;
            }
            Ok(written as u32)
        })();
        match result {
            Ok(n) => reply.written(n),
            Err(err) => reply.error(err),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let handle = self.handles.lock().remove(&fh.0);
        if let Some(Handle::File(file)) = handle {
            let (ino, cached) = (file.ino, file.backing.is_none());
            drop(file);
            self.closed(ino, cached);
        }
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let result = self.file(fh).and_then(|file| {
            if datasync {
                rustix::fs::fdatasync(&file.fd).map_err(errno)
            } else {
                rustix::fs::fsync(&file.fd).map_err(errno)
            }
        });
        reply_empty(result, reply);
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.do_opendir(ino) {
            Ok((fh, flags)) => reply.opened(fh, flags),
            Err(err) => reply.error(err),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let entries = match self.listing(ino, fh) {
            Ok(entries) => entries,
            Err(err) => return reply.error(err),
        };
        for (index, entry) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(
                INodeNo(entry.ino),
                index as u64 + 1,
                entry.kind,
                &entry.name,
            ) {
                break;
            }
        }
        reply.ok();
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        // Only visible entries are in the listing.
        let entries = match self.listing(ino, fh) {
            Ok(entries) => entries,
            Err(err) => return reply.error(err),
        };
        let dir = match self
            .locate(ino)
            .and_then(|dir| self.dir_fd(ino.0, &dir.rel))
        {
            Ok(dir) => dir,
            Err(err) => return reply.error(err),
        };
        // Read once per reply, not per entry (the directory's watch only ever starts, and a
        // watcher failure that ends long caching also makes the kernel forget every entry).
        let long = self.long_in(ino.0);
        for (index, entry) in entries.iter().enumerate().skip(offset as usize) {
            let next = index as u64 + 1;
            let dots = entry.name == "." || entry.name == "..";
            let name: &OsStr = if dots { OsStr::new("") } else { &entry.name };
            let Ok(st) =
                rustix::fs::statat(&*dir, name, AtFlags::SYMLINK_NOFOLLOW | AtFlags::EMPTY_PATH)
            else {
                continue; // gone since opendir
            };
            if dots {
                // The kernel takes no reference for `.` and `..`.
                let attr = self.attr(ino.0, &st);
                if reply.add(
                    ino,
                    next,
                    &entry.name,
                    &self.ttl_of(ino.0, &attr),
                    &attr,
                    Generation(0),
                ) {
                    break;
                }
                continue;
            }
            // Every other entry counts as a lookup of its node, unless it does not fit.
            let attr = self.entry(ino, &entry.name, &st);
            if reply.add(
                attr.ino,
                next,
                &entry.name,
                &ttl(long, &attr),
                &attr,
                Generation(0),
            ) {
                self.shared.nodes.lock().forget(attr.ino.0, 1);
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        let handle = self.handles.lock().remove(&fh.0);
        if let Some(Handle::Dir(dir)) = handle {
            self.shared.listings.release(ino.0, dir.generation);
        }
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self.source.statfs() {
            Ok(s) => reply.statfs(
                s.f_blocks,
                s.f_bfree,
                s.f_bavail,
                s.f_files,
                s.f_ffree,
                s.f_bsize as u32,
                s.f_namemax as u32,
                s.f_frsize as u32,
            ),
            Err(err) => reply.error(errno(err)),
        }
    }

    // Extended attributes are not served. `ENOSYS` makes the kernel stop asking for the whole
    // connection (and answer `EOPNOTSUPP` itself), which also spares a round trip per write for
    // `security.capability`.
    fn setxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::ENOSYS);
    }

    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: ReplyXattr,
    ) {
        reply.error(Errno::ENOSYS);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, _size: u32, reply: ReplyXattr) {
        reply.error(Errno::ENOSYS);
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::ENOSYS);
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        let result = (|| {
            let loc = self.locate(ino)?;
            if loc.rel.as_os_str().is_empty() && !mask.contains(AccessFlags::W_OK) {
                return Ok(());
            }
            let need = if mask.contains(AccessFlags::W_OK) {
                Need::Write
            } else if mask.contains(AccessFlags::R_OK) {
                Need::Read
            } else {
                Need::See
            };
            self.check(&loc, op::ACCESS, need).map(|_| ())
        })();
        reply_empty(result, reply);
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let result = (|| {
            let dir = self.parent(parent, op::CREATE)?;
            let loc = self.child(&dir, name)?;
            self.check(&loc, op::CREATE, Need::Create)?;
            let fd = self
                .source
                .create(&dir.rel, name, flags, mode & !umask)
                .map_err(errno)?;
            self.audit(&loc.path(), op::CREATE, None);
            let mut st = rustix::fs::fstat(&fd).map_err(errno)?;
            if flags & libc::O_TRUNC != 0 && set_id_cleared(&st).is_some() {
                // An existing file opened with `O_TRUNC` (a new one never has set-id bits): as
                // in `open`.
                clear_set_id_of(&fd).map_err(errno)?;
                st = rustix::fs::fstat(&fd).map_err(errno)?;
            }
            Ok((self.entry(parent, name, &st), fd))
        })();
        match result {
            Ok((attr, fd)) => {
                // A file created for writing is about to be written: with passthrough its
                // writes skip the server, whatever size it will reach.
                let writes = flags & libc::O_ACCMODE != libc::O_RDONLY;
                let size = if writes {
                    attr.size.max(PASSTHROUGH_MIN_SIZE)
                } else {
                    attr.size
                };
                let backing = self.open_mode(attr.ino.0, size, &fd, |fd| reply.open_backing(fd));
                let fh = self.open_handle(attr.ino.0, fd, backing.clone());
                match backing {
                    Some(id) => reply.created_passthrough(
                        &self.ttl_in(parent.0, &attr),
                        &attr,
                        Generation(0),
                        fh,
                        FILE_OPEN_FLAGS,
                        &id,
                    ),
                    None => reply.created(
                        &self.ttl_in(parent.0, &attr),
                        &attr,
                        Generation(0),
                        fh,
                        FILE_OPEN_FLAGS,
                    ),
                }
            }
            Err(err) => reply.error(err),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let result = self.file(fh).and_then(|file| {
            let flags = rustix::fs::FallocateFlags::from_bits_retain(mode as u32);
            rustix::fs::fallocate(&file.fd, flags, offset, length).map_err(errno)
        });
        reply_empty(result, reply);
    }
}

impl Server {
    fn remove(&self, parent: INodeNo, name: &OsStr, dir: bool) -> Result<(), Errno> {
        let operation = if dir { op::RMDIR } else { op::UNLINK };
        let parent_loc = self.parent(parent, operation)?;
        let loc = self.child(&parent_loc, name)?;
        self.check(&loc, operation, Need::Write)?;
        self.source
            .remove(&parent_loc.rel, name, dir)
            .map_err(errno)?;
        let mut nodes = self.shared.nodes.lock();
        if let Some(ino) = nodes.child(parent.0, name) {
            nodes.detach(ino);
        }
        drop(nodes);
        self.audit(&loc.path(), operation, None);
        Ok(())
    }
}

fn reply_empty(result: Result<(), Errno>, reply: ReplyEmpty) {
    match result {
        Ok(()) => reply.ok(),
        Err(err) => reply.error(err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn setattrs_that_clear_set_id_bits() {
        let now = true;
        // (what, owner, size, mode, times, clears)
        type Case = (&'static str, bool, Option<u64>, Option<u32>, bool, bool);
        let cases: &[Case] = &[
            ("chown", true, None, None, false, true),
            ("truncate", false, Some(0), None, false, true),
            ("ftruncate", false, Some(7), None, false, true),
            // a SETATTR that changes nothing: file_remove_privs, chown(-1, -1)
            ("nothing", false, None, None, false, true),
            ("chmod", false, None, Some(0o755), false, false),
            ("utimens", false, None, None, now, false),
        ];
        for (what, owner, size, mode, times, clears) in cases {
            assert_eq!(
                clears_set_id(*owner, *size, *mode, *times),
                *clears,
                "{what}"
            );
        }
    }

    #[test]
    fn node_paths_follow_renames() {
        let mut nodes = Nodes::new();
        let a = nodes.remember(1, OsStr::new("a"), FileType::Directory);
        let f = nodes.remember(a, OsStr::new("f"), FileType::RegularFile);
        type Step<'a> = &'a dyn Fn(&mut Nodes);
        let cases: &[(&str, Step, u64, Option<&str>)] = &[
            ("initial", &|_| {}, f, Some("a/f")),
            // the parent directory moves: the child's path follows
            (
                "dir renamed",
                &|n| n.renamed((1, OsStr::new("a")), (1, OsStr::new("b")), false),
                f,
                Some("b/f"),
            ),
            // a rename over the file detaches it
            (
                "overwritten",
                &|n| {
                    let g = n.remember(1, OsStr::new("g"), FileType::RegularFile);
                    n.renamed((1, OsStr::new("g")), (a, OsStr::new("f")), false);
                    assert_eq!(n.rel(g).as_deref(), Some(Path::new("b/f")));
                },
                f,
                None,
            ),
        ];
        for (name, step, ino, rel) in cases {
            step(&mut nodes);
            assert_eq!(nodes.rel(*ino).as_deref(), rel.map(Path::new), "{name}");
        }
    }

    #[test]
    fn node_ids_are_stable_per_path_and_kind() {
        let mut nodes = Nodes::new();
        let a = nodes.remember(1, OsStr::new("a"), FileType::RegularFile);
        assert_eq!(nodes.remember(1, OsStr::new("a"), FileType::RegularFile), a);
        // replaced by a directory on the host: a new id, the old one detached
        let b = nodes.remember(1, OsStr::new("a"), FileType::Directory);
        assert_ne!(a, b);
        assert_eq!(nodes.rel(a), None);
        // forgetting every lookup drops the node
        nodes.forget(b, 1);
        assert_eq!(nodes.rel(b), None);
        assert_eq!(nodes.child(1, OsStr::new("a")), None);
    }
}
