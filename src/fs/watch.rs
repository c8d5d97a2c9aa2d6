//! Hears of changes the host makes in a mount's source, so the kernel may cache entries and
//! attributes for long ([`super::cache`]).
//!
//! 1. One fanotify group per mount, reporting the directory and the name of each change
//!    (`FAN_REPORT_DFID_NAME`) and, where permitted, the thread that made it (`FAN_REPORT_TID`).
//! 2. Every directory the kernel has looked up gets an inode mark ([`Watch::add_dir`]) *before*
//!    the lookup is answered, so no change below it after that can go unheard. A directory is
//!    known by its file handle; events for directories no node stands for are ignored.
//! 3. Marks are bounded ([`MARK_BUDGET`] per mount): a directory beyond it, or one that cannot be
//!    marked, is not watched, and its entries keep the short cache time.
//! 4. Changes made by the server's own threads are skipped (the kernel already knows them); a
//!    queue overflow reports everything as changed.

use std::cell::Cell;
use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::time::Duration;

use parking_lot::Mutex;

/// Most directories one mount's watcher marks.
pub const MARK_BUDGET: usize = 16_384;

/// How long the watcher waits after a first event for more to read at once: a host change
/// shows inside at most this much later (still "within milliseconds", docs/file-access.md).
const LINGER: Duration = Duration::from_millis(5);

/// What the events ask for: names appearing, vanishing and moving in a marked directory, and
/// content or attribute changes of its entries (and of itself).
const MASK: u64 = libc::FAN_CREATE
    | libc::FAN_DELETE
    | libc::FAN_MOVED_FROM
    | libc::FAN_MOVED_TO
    | libc::FAN_MODIFY
    | libc::FAN_ATTRIB
    | libc::FAN_ONDIR
    | libc::FAN_EVENT_ON_CHILD;

/// Events that change which names exist.
const ENTRY_EVENTS: u64 =
    libc::FAN_CREATE | libc::FAN_DELETE | libc::FAN_MOVED_FROM | libc::FAN_MOVED_TO;

/// A directory's identity: its file handle (type and bytes).
type Key = (i32, Vec<u8>);

/// What happened to one name of a watched directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// Node id of the directory.
    pub dir: u64,
    /// The name (`None`: the directory itself).
    pub name: Option<OsString>,
    /// The name appeared, vanished or moved.
    pub entry: bool,
    /// Its content or attributes changed (one event may say both).
    pub content: bool,
}

/// What one read of the queue reported.
#[derive(Debug, Default)]
pub struct Batch {
    pub changes: Vec<Change>,
    /// Events were lost: anything may have changed.
    pub overflow: bool,
}

#[derive(Debug, Default)]
struct Dirs {
    by_key: HashMap<Key, u64>,
    by_ino: HashMap<u64, Key>,
    /// Handles marked so far (marks are never removed; the budget counts them).
    marked: HashSet<Key>,
}

/// One mount's watcher.
#[derive(Debug)]
pub struct Watch {
    fan: OwnedFd,
    dirs: Mutex<Dirs>,
    /// Thread ids of the server (`None`: events carry no thread id, nothing is skipped).
    own: Option<Mutex<HashSet<i32>>>,
    budget: usize,
}

thread_local! {
    static REGISTERED: Cell<bool> = const { Cell::new(false) };
}

impl Watch {
    /// A new fanotify group, or why there is none (older kernel, not permitted).
    pub fn new() -> io::Result<Watch> {
        let base = libc::FAN_CLASS_NOTIF | libc::FAN_CLOEXEC | libc::FAN_REPORT_DFID_NAME;
        let flags = (libc::O_RDONLY | libc::O_CLOEXEC) as libc::c_uint;
        // SAFETY: plain syscall with integer arguments.
        let mut fd = unsafe { libc::fanotify_init(base | libc::FAN_REPORT_TID, flags) };
        let with_tid = fd >= 0;
        if !with_tid {
            // SAFETY: as above.
            fd = unsafe { libc::fanotify_init(base, flags) };
        }
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fanotify_init returned a new fd that nothing else owns.
        let fan = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Watch {
            fan,
            dirs: Mutex::new(Dirs::default()),
            own: with_tid.then(|| Mutex::new(HashSet::new())),
            budget: MARK_BUDGET,
        })
    }

    /// Records the calling thread as one of the server's (its changes are not reported back).
    pub fn serving_thread(&self) {
        let Some(own) = &self.own else { return };
        REGISTERED.with(|done| {
            if !done.get() {
                own.lock()
                    .insert(rustix::thread::gettid().as_raw_nonzero().get());
                done.set(true);
            }
        });
    }

    /// Watches the directory `dir` (an fd open for reading) as node `ino`; `false` when it cannot
    /// be watched (its entries must then keep the short cache time).
    pub fn add_dir(&self, ino: u64, dir: BorrowedFd<'_>) -> bool {
        let Ok(key) = handle(dir) else {
            return false;
        };
        let mut dirs = self.dirs.lock();
        if !dirs.marked.contains(&key) {
            if dirs.marked.len() >= self.budget {
                return false;
            }
            let flags = libc::FAN_MARK_ADD | libc::FAN_MARK_ONLYDIR;
            // SAFETY: plain syscall; a NULL path marks the object `dir` refers to.
            let ret = unsafe {
                libc::fanotify_mark(
                    self.fan.as_raw_fd(),
                    flags,
                    MASK,
                    dir.as_raw_fd(),
                    std::ptr::null(),
                )
            };
            if ret != 0 {
                return false;
            }
            dirs.marked.insert(key.clone());
        }
        if let Some(old) = dirs.by_ino.insert(ino, key.clone()) {
            dirs.by_key.remove(&old);
        }
        if let Some(previous) = dirs.by_key.insert(key, ino) {
            if previous != ino {
                dirs.by_ino.remove(&previous);
            }
        }
        true
    }

    /// The node `ino` is gone: its directory's events are ignored from now on.
    pub fn forget_dir(&self, ino: u64) {
        let mut dirs = self.dirs.lock();
        if let Some(key) = dirs.by_ino.remove(&ino) {
            if dirs.by_key.get(&key) == Some(&ino) {
                dirs.by_key.remove(&key);
            }
        }
    }

    /// Waits up to `timeout` for events and returns what they report (empty on timeout).
    pub fn next(&self, timeout: Duration) -> io::Result<Batch> {
        let mut fds = [rustix::event::PollFd::new(
            &self.fan,
            rustix::event::PollFlags::IN,
        )];
        let timeout = rustix::event::Timespec {
            tv_sec: timeout.as_secs() as i64,
            tv_nsec: i64::from(timeout.subsec_nanos()),
        };
        match rustix::event::poll(&mut fds, Some(&timeout)) {
            Ok(0) | Err(rustix::io::Errno::INTR) => return Ok(Batch::default()),
            Ok(_) => {}
            Err(err) => return Err(err.into()),
        }
        // The server's own changes are queued too (and skipped below): gathering what arrives
        // meanwhile wakes this thread once per burst instead of once per create or chmod.
        std::thread::sleep(LINGER);
        let mut buf = vec![0u8; 64 * 1024];
        let n = match rustix::io::read(self.fan.as_fd(), &mut buf) {
            Ok(n) => n,
            Err(rustix::io::Errno::INTR | rustix::io::Errno::AGAIN) => 0,
            Err(err) => return Err(err.into()),
        };
        Ok(self.parse(&buf[..n]))
    }

    fn parse(&self, mut buf: &[u8]) -> Batch {
        let mut batch = Batch::default();
        let own = self.own.as_ref().map(|own| own.lock().clone());
        let dirs = self.dirs.lock();
        while buf.len() >= 24 {
            let event_len = u32_at(buf, 0) as usize;
            let metadata_len = u16::from_ne_bytes([buf[6], buf[7]]) as usize;
            if event_len < 24 || event_len > buf.len() || metadata_len > event_len {
                break;
            }
            let mask = u64::from_ne_bytes(buf[8..16].try_into().unwrap_or([0; 8]));
            let pid = u32_at(buf, 20) as i32;
            let event = &buf[..event_len];
            buf = &buf[event_len..];
            if mask & libc::FAN_Q_OVERFLOW != 0 {
                batch.overflow = true;
                continue;
            }
            if own.as_ref().is_some_and(|own| own.contains(&pid)) {
                continue;
            }
            let mut info = &event[metadata_len..];
            while info.len() >= 4 {
                let kind = info[0];
                let len = u16::from_ne_bytes([info[2], info[3]]) as usize;
                if len < 4 || len > info.len() {
                    break;
                }
                let record = &info[..len];
                info = &info[len..];
                if !matches!(
                    kind,
                    libc::FAN_EVENT_INFO_TYPE_DFID_NAME
                        | libc::FAN_EVENT_INFO_TYPE_DFID
                        | libc::FAN_EVENT_INFO_TYPE_OLD_DFID_NAME
                        | libc::FAN_EVENT_INFO_TYPE_NEW_DFID_NAME
                ) {
                    continue;
                }
                // header (4), fsid (8), handle_bytes (4), handle_type (4), handle, name
                if record.len() < 20 {
                    continue;
                }
                let bytes = u32_at(record, 12) as usize;
                let handle_type = u32_at(record, 16) as i32;
                let Some(handle) = record.get(20..20 + bytes) else {
                    continue;
                };
                let Some(&dir) = dirs.by_key.get(&(handle_type, handle.to_vec())) else {
                    continue;
                };
                let rest = &record[20 + bytes..];
                let name = rest.split(|b| *b == 0).next().unwrap_or_default();
                let name =
                    (!name.is_empty() && name != b".").then(|| OsStr::from_bytes(name).to_owned());
                batch.changes.push(Change {
                    dir,
                    name,
                    entry: mask & ENTRY_EVENTS != 0,
                    content: mask & (libc::FAN_MODIFY | libc::FAN_ATTRIB) != 0,
                });
            }
        }
        batch
    }
}

fn u32_at(buf: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(buf[at..at + 4].try_into().unwrap_or([0; 4]))
}

/// The file handle of `dir` (`name_to_handle_at(dir, "", AT_EMPTY_PATH)`).
fn handle(dir: BorrowedFd<'_>) -> io::Result<Key> {
    const MAX_HANDLE_SZ: usize = 128;
    // struct file_handle { u32 handle_bytes; i32 handle_type; u8 f_handle[] }, 4-byte aligned
    let mut buf = [0u32; 2 + MAX_HANDLE_SZ / 4];
    buf[0] = MAX_HANDLE_SZ as u32;
    let mut mount_id: libc::c_int = 0;
    // SAFETY: `buf` is a writable, aligned file_handle with room for MAX_HANDLE_SZ bytes; the path
    // is a NUL-terminated empty string.
    let ret = unsafe {
        libc::name_to_handle_at(
            dir.as_raw_fd(),
            c"".as_ptr(),
            buf.as_mut_ptr().cast(),
            &mut mount_id,
            libc::AT_EMPTY_PATH,
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    let bytes = (buf[0] as usize).min(MAX_HANDLE_SZ);
    let handle_type = buf[1] as i32;
    let raw: Vec<u8> = buf[2..].iter().flat_map(|w| w.to_ne_bytes()).collect();
    Ok((handle_type, raw[..bytes].to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Collects changes until `want` holds or 2 s pass.
    fn wait_for(watch: &Watch, want: impl Fn(&[Change]) -> bool) -> Vec<Change> {
        let mut seen = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while std::time::Instant::now() < deadline && !want(&seen) {
            let batch = watch.next(Duration::from_millis(50)).expect("read events");
            seen.extend(batch.changes);
        }
        seen
    }

    #[test]
    fn host_changes_in_a_marked_directory_are_reported_with_their_names() {
        let Ok(watch) = Watch::new() else {
            eprintln!("skipped: fanotify is not available to this process");
            return;
        };
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("old"), b"x").expect("seed");
        let fd = std::fs::File::open(dir.path()).expect("open dir");
        assert!(watch.add_dir(7, fd.as_fd()));
        // a thread that is not the server's: every change is reported
        std::thread::scope(|s| {
            s.spawn(|| {
                std::fs::write(dir.path().join("new"), b"x").expect("create");
                std::fs::rename(dir.path().join("old"), dir.path().join("moved")).expect("mv");
                std::fs::write(dir.path().join("new"), b"xy").expect("modify");
            });
        });
        let name = |n: &str| Some(OsString::from(n));
        let seen = wait_for(&watch, |seen| {
            seen.iter().any(|c| c.name == name("moved")) && seen.iter().any(|c| c.content)
        });
        for (what, entry, content) in [("old", true, false), ("moved", true, false)] {
            assert!(
                seen.iter().any(|c| c.dir == 7
                    && c.name == name(what)
                    && c.entry == entry
                    && c.content == content),
                "{what}: {seen:?}"
            );
        }
        // (the kernel may merge the create and the writes of `new` into one event)
        assert!(seen.iter().any(|c| c.name == name("new") && c.entry));
        assert!(seen.iter().any(|c| c.name == name("new") && c.content));
        // changes by a thread registered as the server's are skipped
        if watch.own.is_some() {
            watch.serving_thread();
            std::fs::write(dir.path().join("mine"), b"x").expect("create");
            let seen = wait_for(&watch, |_| false);
            assert!(!seen.iter().any(|c| c.name == name("mine")), "{seen:?}");
        }
        // a forgotten directory reports nothing
        watch.forget_dir(7);
        std::thread::scope(|s| {
            s.spawn(|| std::fs::write(dir.path().join("later"), b"x").expect("create"));
        });
        let seen = wait_for(&watch, |_| false);
        assert!(seen.is_empty(), "{seen:?}");
    }
}
