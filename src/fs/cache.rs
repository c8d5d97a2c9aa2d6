//! How long the kernel may cache what the server answered, and telling it to forget.
//!
//! 1. Entries (name -> node, and "no such name") and attributes are cached for a long time
//!    ([`LONG_TTL`]) where the server hears of every change that could make them wrong:
//!    - a policy change (`applyConfig`) increments the connection's *epoch*
//!      (`FUSE_NOTIFY_INC_EPOCH`, Linux 6.16+): every entry the kernel holds, and every entry a
//!      lookup in flight at that moment will add, is looked up again before it is used;
//!    - the host changing the source is reported by the watcher ([`super::watch`]), which
//!      invalidates the names and inodes concerned (`FUSE_NOTIFY_INVAL_ENTRY`,
//!      `FUSE_NOTIFY_INVAL_INODE`) and, for names that appeared, vanished or moved, increments
//!      the epoch as well, so a lookup answered just before the change cannot leave a stale
//!      entry behind;
//!    - a directory rename by the sandbox that changes what any moved entry may do increments
//!      the epoch.
//! 2. Where either is missing (an older kernel, no watcher, a directory beyond the watch budget)
//!    entries and attributes keep the short [`SHORT_TTL`] and failed lookups are not cached.
//!
//! Notifications are written on a duplicate of the `/dev/fuse` fd; none takes a lock the server
//! could be holding, so they may be sent from any thread.

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::time::Duration;

/// Cache time where every change is reported.
pub const LONG_TTL: Duration = Duration::from_secs(24 * 60 * 60);

/// Cache time where a change may go unreported.
pub const SHORT_TTL: Duration = Duration::from_secs(1);

/// First FUSE protocol minor version with `FUSE_NOTIFY_INC_EPOCH`.
pub const EPOCH_MINOR: u32 = 44;

const NOTIFY_INVAL_INODE: i32 = 2;
const NOTIFY_INVAL_ENTRY: i32 = 3;
const NOTIFY_INC_EPOCH: i32 = 8;

/// The notification side of one FUSE connection.
#[derive(Debug)]
pub struct Kernel {
    dev: OwnedFd,
}

impl Kernel {
    /// Notifications over `dev` (a duplicate of the connection's `/dev/fuse` fd).
    pub fn new(dev: OwnedFd) -> Kernel {
        Kernel { dev }
    }

    /// Every cached entry of the mount must be looked up again before use.
    pub fn inc_epoch(&self) -> io::Result<()> {
        self.send(NOTIFY_INC_EPOCH, &[])
    }

    /// Forgets the entry `parent/name` (positive or negative) and the parent's attributes.
    pub fn inval_entry(&self, parent: u64, name: &OsStr) -> io::Result<()> {
        let name = name.as_bytes();
        let mut body = Vec::with_capacity(16 + name.len() + 1);
        body.extend_from_slice(&parent.to_ne_bytes());
        body.extend_from_slice(&(name.len() as u32).to_ne_bytes());
        body.extend_from_slice(&0u32.to_ne_bytes());
        body.extend_from_slice(name);
        body.push(0);
        self.send(NOTIFY_INVAL_ENTRY, &body)
    }

    /// Forgets the attributes of `ino` and, with `data`, its cached pages.
    pub fn inval_inode(&self, ino: u64, data: bool) -> io::Result<()> {
        let offset: i64 = if data { 0 } else { -1 };
        let mut body = Vec::with_capacity(24);
        body.extend_from_slice(&ino.to_ne_bytes());
        body.extend_from_slice(&offset.to_ne_bytes());
        body.extend_from_slice(&0i64.to_ne_bytes());
        self.send(NOTIFY_INVAL_INODE, &body)
    }

    fn send(&self, code: i32, body: &[u8]) -> io::Result<()> {
        // struct fuse_out_header { len, error (the notification code), unique (0) }
        let len = 16 + body.len();
        let mut message = Vec::with_capacity(len);
        message.extend_from_slice(&(len as u32).to_ne_bytes());
        message.extend_from_slice(&code.to_ne_bytes());
        message.extend_from_slice(&0u64.to_ne_bytes());
        message.extend_from_slice(body);
        match rustix::io::write(self.dev.as_fd(), &message) {
            Ok(_) => Ok(()),
            // Nothing cached under that name or node: nothing to forget.
            Err(rustix::io::Errno::NOENT) => Ok(()),
            Err(err) => Err(err.into()),
        }
    }
}
