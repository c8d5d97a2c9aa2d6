//! The secrets under the host's `/etc` that a sandbox hides ([`hidden`]), scanned once and then
//! reused for as long as nothing under `/etc` changed.
//!
//! The scan ([`scan`]) walks `/etc` without following symlinks and lists files that are not
//! world-readable (shadow, gshadow, their `-` backups, ssh host keys, TLS private keys...) and
//! directories that are not world-searchable: the sandbox's root could otherwise read them as
//! their owner (the fallback where it is host root) or through the caller's groups (unprivileged).
//! It costs a `stat` of every entry (about 1,200 on a Debian host: ~2-4 ms, the largest part of a
//! sandbox's cold start), so its result is cached per process.
//!
//! # Invalidation
//! Every directory the scan visited is watched with inotify (`IN_ATTRIB`, which a directory watch
//! also reports for the entries inside it, plus creations, deletions, moves and the directory's
//! own removal). Before the cache is used, the inotify fd is read without blocking: any event, or a
//! queue overflow, means "rescan". So a `chmod`, `chown`, new file or rename under `/etc` is seen
//! by the next sandbox start, as with a scan per start. Where inotify is unavailable (or the watch
//! limit is reached) nothing is cached and every start scans. Not seen: a mode change made through
//! a hard link outside `/etc` (inotify reports it to the other path's directory only) and a mount
//! over a directory under `/etc`.
//!
//! # Security
//! A snapshot at sandbox start: a secret created later under `/etc` is not hidden in a sandbox
//! already running. Where hive runs unprivileged or as root with idmapped mounts, DAC keeps the
//! sandbox out of files it may not read anyway; the list is defence in depth there.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::plan::Hidden;
use crate::error::{HiveError, Result};

/// How deep the scan descends below `/etc`.
const MAX_DEPTH: usize = 8;
/// Most directories watched (far above a normal `/etc`: ~150 on Debian); beyond, no cache.
const MAX_WATCHED: usize = 4096;

/// A secret found under `/etc`: path and whether it is a directory.
#[derive(Clone)]
struct Found {
    path: CString,
    is_dir: bool,
}

struct Cache {
    found: Vec<Found>,
    /// Watches every directory the scan visited; readable once something changed.
    inotify: OwnedFd,
}

static CACHE: std::sync::Mutex<Option<Cache>> = std::sync::Mutex::new(None);

/// The secrets under `/etc` to hide in a new sandbox (see the module doc).
pub(crate) fn hidden() -> Result<Vec<Hidden>> {
    let mut cache = CACHE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let fresh = cache.as_ref().is_some_and(|c| unchanged(&c.inotify));
    if !fresh {
        *cache = None;
        let (found, dirs) = scan(Path::new("/etc"))?;
        let inotify = watch(&dirs);
        *cache = inotify.map(|inotify| Cache {
            found: found.clone(),
            inotify,
        });
        return Ok(found.into_iter().map(Found::into_hidden).collect());
    }
    Ok(cache
        .as_ref()
        .map(|c| c.found.iter().cloned().map(Found::into_hidden).collect())
        .unwrap_or_default())
}

impl Found {
    fn into_hidden(self) -> Hidden {
        Hidden {
            path: self.path,
            is_dir: self.is_dir,
        }
    }
}

/// Walks `root`: the secrets, and every directory visited (`root` included).
fn scan(root: &Path) -> Result<(Vec<Found>, Vec<PathBuf>)> {
    let mut found = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    let mut next = 0;
    let mut depth_of = vec![0usize];
    while let Some(dir) = dirs.get(next).cloned() {
        let depth = depth_of.get(next).copied().unwrap_or(MAX_DEPTH);
        next += 1;
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(meta) = entry.path().symlink_metadata() else {
                continue;
            };
            let mode = meta.permissions().mode();
            let path = entry.path();
            if meta.is_file() && mode & 0o004 == 0 {
                found.push(Found {
                    path: cstring(&path)?,
                    is_dir: false,
                });
            } else if meta.is_dir() {
                if mode & 0o005 != 0o005 {
                    found.push(Found {
                        path: cstring(&path)?,
                        is_dir: true,
                    });
                } else if depth < MAX_DEPTH {
                    dirs.push(path);
                    depth_of.push(depth + 1);
                }
            }
        }
    }
    Ok((found, dirs))
}

fn cstring(p: &Path) -> Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| HiveError::Internal(format!("path with a NUL byte: {}", p.display())))
}

/// An inotify fd watching `dirs`, or `None` where that is not possible (then nothing is cached).
fn watch(dirs: &[PathBuf]) -> Option<OwnedFd> {
    if dirs.len() > MAX_WATCHED {
        return None;
    }
    // SAFETY: plain syscall.
    let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
    if fd < 0 {
        return None;
    }
    // SAFETY: a fresh fd we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mask = libc::IN_ATTRIB
        | libc::IN_CREATE
        | libc::IN_DELETE
        | libc::IN_MOVED_FROM
        | libc::IN_MOVED_TO
        | libc::IN_DELETE_SELF
        | libc::IN_MOVE_SELF
        | libc::IN_DONT_FOLLOW
        | libc::IN_ONLYDIR;
    for dir in dirs {
        let path = cstring(dir).ok()?;
        // SAFETY: valid fd and NUL-terminated path.
        if unsafe { libc::inotify_add_watch(fd.as_raw_fd(), path.as_ptr(), mask) } < 0 {
            return None;
        }
    }
    Some(fd)
}

/// Whether no event arrived on `inotify` (an event, an overflow or an error: changed).
fn unchanged(inotify: &OwnedFd) -> bool {
    let mut buf = [0u8; 4096];
    // SAFETY: valid buffer of that length.
    let n = unsafe { libc::read(inotify.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    n < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EAGAIN)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(found: &[Found], root: &Path) -> Vec<String> {
        let mut v: Vec<String> = found
            .iter()
            .map(|f| {
                let p = PathBuf::from(std::ffi::OsStr::from_bytes(f.path.as_bytes()));
                p.strip_prefix(root).unwrap().display().to_string()
            })
            .collect();
        v.sort();
        v
    }

    #[test]
    fn finds_unreadable_files_and_unsearchable_dirs_and_sees_later_changes() {
        let root = std::env::temp_dir().join(format!("hive-etc-scan-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("ssl/private")).unwrap();
        std::fs::create_dir_all(root.join("open/deeper")).unwrap();
        std::fs::write(root.join("passwd"), "x").unwrap();
        std::fs::write(root.join("shadow"), "x").unwrap();
        std::fs::write(root.join("open/deeper/key"), "x").unwrap();
        let mode = |p: &str, m: u32| {
            std::fs::set_permissions(root.join(p), std::fs::Permissions::from_mode(m)).unwrap()
        };
        mode("passwd", 0o644);
        mode("shadow", 0o640);
        mode("open/deeper/key", 0o644);
        mode("ssl/private", 0o700);
        let (found, dirs) = scan(&root).unwrap();
        assert_eq!(names(&found, &root), ["shadow", "ssl/private"]);
        let inotify = watch(&dirs).expect("inotify");
        assert!(unchanged(&inotify));
        // A mode change deep inside (the directory's own mtime does not change) is seen.
        mode("open/deeper/key", 0o600);
        assert!(!unchanged(&inotify));
        let (found, dirs) = scan(&root).unwrap();
        assert_eq!(
            names(&found, &root),
            ["open/deeper/key", "shadow", "ssl/private"]
        );
        // So is a new file.
        let inotify = watch(&dirs).expect("inotify");
        std::fs::write(root.join("open/new"), "x").unwrap();
        assert!(!unchanged(&inotify));
        mode("ssl/private", 0o755);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
