//! Kept `O_PATH` fds of source directories, so that a lookup or a listing in a directory the
//! server already resolved costs one `fstatat` of a single name, not `openat2` + `fstat` +
//! `close` of the whole relative path (docs/decisions.md, "FUSE server cost per round trip").
//!
//! A kept fd follows its directory, while a node's path follows what the server knows: the
//! sandbox's own renames (the node moves with the directory, so both agree) and the host's
//! changes as the watcher reports them. An fd is therefore kept only for a directory whose
//! changes by the host are watched, and every kept fd is dropped wherever every cached entry is
//! forgotten (new rules, a name the host adds, removes or renames, a watcher overflow): the
//! window in which a kept fd may lag behind the host is the window in which the kernel's own
//! cached entries lag too. A *generation* makes an fd opened before such a drop never kept
//! after it. Names are single components (never `.`, `..` or with a `/`) resolved without
//! following a symlink, so a kept fd never lets a request leave its directory.

use std::os::fd::OwnedFd;
use std::sync::Arc;

use parking_lot::Mutex;

use super::ids::IdMap;

/// Most fds kept per mount (the host program's fd limit is shared with everything else it does);
/// when full, all are dropped and the cache fills again.
pub(crate) const KEPT_MAX: usize = 128;

#[derive(Debug, Default)]
struct Kept {
    generation: u64,
    fds: IdMap<Arc<OwnedFd>>,
}

/// The kept directory fds of one mount, by node id.
#[derive(Debug, Default)]
pub(crate) struct DirFds {
    kept: Mutex<Kept>,
}

impl DirFds {
    /// The kept fd of directory node `ino`.
    pub(crate) fn get(&self, ino: u64) -> Option<Arc<OwnedFd>> {
        self.kept.lock().fds.get(&ino).cloned()
    }

    /// The generation to read before opening an fd to [`Self::keep`].
    pub(crate) fn generation(&self) -> u64 {
        self.kept.lock().generation
    }

    /// Keeps `fd` for `ino` unless everything was dropped since `generation` was read.
    pub(crate) fn keep(&self, ino: u64, fd: Arc<OwnedFd>, generation: u64) {
        let mut kept = self.kept.lock();
        if kept.generation != generation {
            return;
        }
        if kept.fds.len() >= KEPT_MAX {
            kept.fds.clear();
        }
        kept.fds.insert(ino, fd);
    }

    /// Drops the fd of `ino` (a directory forgotten, removed or replaced).
    pub(crate) fn remove(&self, ino: u64) {
        self.kept.lock().fds.remove(&ino);
    }

    /// Drops every kept fd; an fd opened before this call is never kept.
    pub(crate) fn clear(&self) {
        let mut kept = self.kept.lock();
        kept.generation += 1;
        kept.fds.clear();
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.kept.lock().fds.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fd() -> Arc<OwnedFd> {
        Arc::new(OwnedFd::from(std::fs::File::open("/").expect("open /")))
    }

    #[test]
    fn an_fd_opened_before_a_clear_is_never_kept() {
        let dirs = DirFds::default();
        let before = dirs.generation();
        dirs.clear();
        dirs.keep(7, fd(), before);
        assert!(dirs.get(7).is_none());
        dirs.keep(7, fd(), dirs.generation());
        assert!(dirs.get(7).is_some());
        dirs.clear();
        assert!(dirs.get(7).is_none());
    }

    #[test]
    fn the_cache_stays_bounded() {
        let dirs = DirFds::default();
        for ino in 0..(KEPT_MAX as u64 * 3) {
            dirs.keep(ino, fd(), dirs.generation());
            assert!(dirs.len() <= KEPT_MAX);
        }
    }
}
