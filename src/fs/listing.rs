//! Which directory listings the kernel may keep (`FOPEN_CACHE_DIR`), so that listing a directory
//! again (`git status`, `ls`, a second `find`) costs no `READDIR` round trip (its `opendir` and
//! `releasedir` still reach the server, which then neither reads the source nor decides).
//!
//! A listing holds only the entries the rules let the sandbox see, decided at the handle's first
//! `READDIR` on the rules then in force (so under the generation read at its `opendir` or a newer
//! one, never an older one: all the rules below need). A kept listing is wrong once the rules
//! change or the host adds, removes or renames a name. The kernel forgets a kept listing by itself
//! when the sandbox changes the directory through the mount; for everything else a *generation*
//! counts the changes ([`Listings::changed`], bumped wherever every cached entry is forgotten),
//! and:
//!
//! 1. a directory opened under an older generation than the current one never reads or fills
//!    the kernel's listing (its own listing may be stale, and the kernel fills the cache from
//!    the handle's replies);
//! 2. while such a handle is open, no handle of that directory uses the kernel's listing (the old
//!    handle may still be filling it; the fill ends before its `releasedir` reaches the server);
//! 3. the first open under a new generation makes the kernel drop the kept listing
//!    (`FUSE_NOTIFY_INVAL_INODE` with its pages, before the `opendir` is answered) and starts a
//!    new one.
//!
//! Only directories whose changes by the host are watched keep their listings.

use std::sync::atomic::{AtomicU64, Ordering};

use fuser::FopenFlags;
use parking_lot::Mutex;

use super::ids::IdMap;

#[derive(Debug, Default)]
struct Dir {
    /// The generation of the listing the kernel keeps, once one was started.
    kept: Option<u64>,
    /// Generations of the directory's open handles.
    open: Vec<u64>,
}

/// Kept listings of one mount.
#[derive(Debug, Default)]
pub(crate) struct Listings {
    generation: AtomicU64,
    dirs: Mutex<IdMap<Dir>>,
}

impl Listings {
    /// Every kept listing may be wrong from now on.
    pub(crate) fn changed(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// The current generation; read it before deciding a listing.
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// Registers an open of directory `ino` whose listing was decided under `generation`;
    /// returns its open flags. `keepable`: the directory is watched. `drop_kept` makes the
    /// kernel drop the directory's kept listing, and must have done so when it returns `true`.
    pub(crate) fn open(
        &self,
        ino: u64,
        generation: u64,
        keepable: bool,
        drop_kept: impl FnOnce() -> bool,
    ) -> FopenFlags {
        let mut dirs = self.dirs.lock();
        let dir = dirs.entry(ino).or_default();
        dir.open.push(generation);
        let current = self.generation();
        if !keepable || generation != current || dir.open.iter().any(|&g| g != generation) {
            return FopenFlags::empty();
        }
        if dir.kept != Some(generation) {
            // Nothing else can fill it now: every open handle is of this generation. (A
            // directory new to the kernel has no listing to drop.)
            if dir.kept.is_some() && !drop_kept() {
                return FopenFlags::empty();
            }
            dir.kept = Some(generation);
        }
        FopenFlags::FOPEN_CACHE_DIR | FopenFlags::FOPEN_KEEP_CACHE
    }

    /// Forgets an open of `ino` made under `generation`.
    pub(crate) fn release(&self, ino: u64, generation: u64) {
        let mut dirs = self.dirs.lock();
        if let Some(dir) = dirs.get_mut(&ino) {
            if let Some(at) = dir.open.iter().position(|&g| g == generation) {
                dir.open.swap_remove(at);
            }
        }
    }

    /// The kernel forgot directory `ino` (its kept listing went with it; node ids are never
    /// reused).
    pub(crate) fn forget(&self, ino: u64) {
        self.dirs.lock().remove(&ino);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEEP: FopenFlags = FopenFlags::FOPEN_CACHE_DIR.union(FopenFlags::FOPEN_KEEP_CACHE);

    #[test]
    fn a_listing_is_kept_only_while_no_older_listing_can_fill_it() {
        let listings = Listings::default();
        let drops = std::cell::Cell::new(0);
        let open = |ino, generation, keepable| {
            listings.open(ino, generation, keepable, || {
                drops.set(drops.get() + 1);
                true
            })
        };
        // first open: nothing kept yet, nothing to drop; the kernel keeps this listing
        assert_eq!(open(1, 0, true), KEEP);
        assert_eq!(drops.get(), 0);
        // same generation again: kept, nothing dropped
        assert_eq!(open(1, 0, true), KEEP);
        assert_eq!(drops.get(), 0);
        // an unwatched directory never keeps its listing
        assert_eq!(open(2, 0, false), FopenFlags::empty());
        // the rules change while two handles of generation 0 are open
        listings.changed();
        // a listing decided before the change is not kept
        assert_eq!(open(1, 0, true), FopenFlags::empty());
        // a new listing is not kept while handles of the old generation are open
        assert_eq!(open(1, 1, true), FopenFlags::empty());
        for _ in 0..3 {
            listings.release(1, 0);
        }
        // all old handles are gone: the kept listing is dropped once, then kept again (handles
        // of the current generation do not stand in the way)
        assert_eq!(open(1, 1, true), KEEP);
        assert_eq!(drops.get(), 1);
        assert_eq!(open(1, 1, true), KEEP);
        assert_eq!(drops.get(), 1);
        // when the kernel cannot be told to drop it, the listing is not kept
        for _ in 0..3 {
            listings.release(1, 1);
        }
        listings.changed();
        assert_eq!(listings.open(1, 2, true, || false), FopenFlags::empty());
    }
}
