//! The real I/O of the ACL file system, always relative to a directory fd of the source.
//!
//! Every path the server touches is a relative path below the source (`""` is the source itself)
//! resolved by `openat2` with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS`;
//! operations on a name (`mkdir`, `unlink`, `rename`, `link`, `symlink`, `readlink`, `utimens`,
//! `chmod`) run on a parent fd opened that way with a single-component name and never follow a
//! trailing symlink.
//!
//! # Security
//!
//! The server runs with the host program's credentials (often root), so it must never be talked
//! into touching a file outside the source: a symlink (`escape -> /etc`), a `..` or a symlink the
//! host or the sandbox swaps in between a check and the use all make `openat2` fail (`EXDEV` /
//! `ELOOP`) instead of resolving. The kernel resolves the sandbox's own symlinks through FUSE
//! lookups, so the server never needs to follow one. Created files never get set-id bits and
//! ownership never changes (`chown` is refused), so the sandbox cannot plant a set-uid-root binary
//! on the host; a set-id file of the host loses its bits when the sandbox writes, truncates or
//! chowns it ([`Source::clear_set_id`]), since the server's own writes, with the host program's
//! credentials, would keep them.

use std::ffi::{CString, OsStr, OsString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{
    AtFlags, Dir, FileType as RawType, Mode, OFlags, RenameFlags, ResolveFlags, Stat, StatVfs,
    Timestamps,
};
use rustix::io::Errno;

/// How every path below the source is resolved.
const RESOLVE: ResolveFlags = ResolveFlags::BENEATH
    .union(ResolveFlags::NO_SYMLINKS)
    .union(ResolveFlags::NO_MAGICLINKS);

/// Mode bits a created or chmod-ed file may carry: permissions and sticky, never set-id.
const MODE_MASK: u32 = 0o1777;

/// Open flags forwarded from the sandbox's `open`/`create` to the real file.
const FORWARDED_OPEN_FLAGS: OFlags = OFlags::ACCMODE
    .union(OFlags::APPEND)
    .union(OFlags::TRUNC)
    .union(OFlags::SYNC)
    .union(OFlags::DSYNC)
    .union(OFlags::EXCL);

/// One source directory, held by an `O_PATH` fd.
#[derive(Debug)]
pub struct Source {
    root: OwnedFd,
}

/// One directory entry read from the source.
#[derive(Debug, Clone)]
pub struct RawEntry {
    pub name: OsString,
    pub ino: u64,
    pub kind: RawType,
}

/// `rel` as a path argument for `*at` calls (`.` for the source itself).
fn arg(rel: &Path) -> &Path {
    if rel.as_os_str().is_empty() {
        Path::new(".")
    } else {
        rel
    }
}

impl Source {
    /// Wraps an fd of the source directory (any mode; `O_PATH` suffices).
    pub fn new(root: OwnedFd) -> Result<Source, Errno> {
        let st = rustix::fs::fstat(&root)?;
        if RawType::from_raw_mode(st.st_mode) != RawType::Directory {
            return Err(Errno::NOTDIR);
        }
        Ok(Source { root })
    }

    /// Opens `rel` below the source with `flags` (never following any symlink).
    pub fn open(&self, rel: &Path, flags: OFlags, mode: Mode) -> Result<OwnedFd, Errno> {
        // openat2 refuses O_PATH combined with anything but O_DIRECTORY / O_NOFOLLOW / O_CLOEXEC.
        let extra = if flags.contains(OFlags::PATH) {
            OFlags::CLOEXEC | OFlags::NOFOLLOW
        } else {
            OFlags::CLOEXEC | OFlags::NOFOLLOW | OFlags::NOCTTY
        };
        rustix::fs::openat2(&self.root, arg(rel), flags | extra, mode, RESOLVE)
    }

    /// An `O_PATH` fd of the directory `rel`.
    pub fn dir(&self, rel: &Path) -> Result<OwnedFd, Errno> {
        self.open(rel, OFlags::PATH | OFlags::DIRECTORY, Mode::empty())
    }

    /// `lstat` of `rel`.
    pub fn lstat(&self, rel: &Path) -> Result<Stat, Errno> {
        if rel.as_os_str().is_empty() {
            return rustix::fs::fstat(&self.root);
        }
        let fd = self.open(rel, OFlags::PATH, Mode::empty())?;
        rustix::fs::fstat(fd)
    }

    /// Opens the regular file `rel` for I/O with the sandbox's `flags` (filtered).
    pub fn open_file(&self, rel: &Path, flags: i32) -> Result<OwnedFd, Errno> {
        let flags = OFlags::from_bits_retain(flags as u32) & FORWARDED_OPEN_FLAGS;
        let flags = flags.difference(OFlags::EXCL);
        let fd = self.open(rel, flags | OFlags::NONBLOCK, Mode::empty())?;
        if RawType::from_raw_mode(rustix::fs::fstat(&fd)?.st_mode) != RawType::RegularFile {
            return Err(Errno::ACCESS);
        }
        Ok(fd)
    }

    /// Creates (or, without `O_EXCL`, opens) the regular file `parent/name`.
    pub fn create(
        &self,
        parent: &Path,
        name: &OsStr,
        flags: i32,
        mode: u32,
    ) -> Result<OwnedFd, Errno> {
        let flags = OFlags::from_bits_retain(flags as u32) & FORWARDED_OPEN_FLAGS;
        self.open(
            &parent.join(name),
            flags | OFlags::CREATE,
            Mode::from_raw_mode(mode & MODE_MASK),
        )
    }

    /// `mkdir parent/name`.
    pub fn mkdir(&self, parent: &Path, name: &OsStr, mode: u32) -> Result<(), Errno> {
        let dir = self.dir(parent)?;
        rustix::fs::mkdirat(dir, name, Mode::from_raw_mode(mode & MODE_MASK))
    }

    /// `mknod parent/name` for a regular file, FIFO or socket; devices are refused (`EPERM`).
    pub fn mknod(&self, parent: &Path, name: &OsStr, mode: u32) -> Result<(), Errno> {
        let kind = RawType::from_raw_mode(mode);
        if !matches!(kind, RawType::RegularFile | RawType::Fifo | RawType::Socket) {
            return Err(Errno::PERM);
        }
        let dir = self.dir(parent)?;
        rustix::fs::mknodat(dir, name, kind, Mode::from_raw_mode(mode & MODE_MASK), 0)
    }

    /// `symlink target parent/name` (the target is stored, never followed by the server).
    pub fn symlink(&self, target: &Path, parent: &Path, name: &OsStr) -> Result<(), Errno> {
        let dir = self.dir(parent)?;
        rustix::fs::symlinkat(target, dir, name)
    }

    /// `link old_parent/old_name new_parent/new_name` (a trailing symlink is linked, not followed).
    pub fn link(
        &self,
        old_parent: &Path,
        old_name: &OsStr,
        new_parent: &Path,
        new_name: &OsStr,
    ) -> Result<(), Errno> {
        let old_dir = self.dir(old_parent)?;
        let new_dir = self.dir(new_parent)?;
        rustix::fs::linkat(old_dir, old_name, new_dir, new_name, AtFlags::empty())
    }

    /// `unlink` (or, with `dir`, `rmdir`) `parent/name`.
    pub fn remove(&self, parent: &Path, name: &OsStr, dir: bool) -> Result<(), Errno> {
        let parent_fd = self.dir(parent)?;
        let flags = if dir {
            AtFlags::REMOVEDIR
        } else {
            AtFlags::empty()
        };
        rustix::fs::unlinkat(parent_fd, name, flags)
    }

    /// `renameat2(old_parent/old_name, new_parent/new_name, flags)`.
    pub fn rename(
        &self,
        old_parent: &Path,
        old_name: &OsStr,
        new_parent: &Path,
        new_name: &OsStr,
        flags: u32,
    ) -> Result<(), Errno> {
        let old_dir = self.dir(old_parent)?;
        let new_dir = self.dir(new_parent)?;
        rustix::fs::renameat_with(
            old_dir,
            old_name,
            new_dir,
            new_name,
            RenameFlags::from_bits_retain(flags),
        )
    }

    /// The target of the symlink `rel`.
    pub fn readlink(&self, rel: &Path) -> Result<Vec<u8>, Errno> {
        let (parent, name) = split(rel)?;
        let dir = self.dir(parent)?;
        Ok(rustix::fs::readlinkat(dir, name, Vec::new())?.into_bytes())
    }

    /// The entries of the directory `rel`, without `.` and `..`.
    pub fn list(&self, rel: &Path) -> Result<Vec<RawEntry>, Errno> {
        let fd = self.open(rel, OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty())?;
        let mut entries = Vec::new();
        for entry in Dir::new(fd)? {
            let entry = entry?;
            let name = entry.file_name().to_bytes();
            if name == b"." || name == b".." {
                continue;
            }
            entries.push(RawEntry {
                name: OsStr::from_bytes(name).to_owned(),
                ino: entry.ino(),
                kind: entry.file_type(),
            });
        }
        Ok(entries)
    }

    /// `chmod rel` without following a trailing symlink (symlinks: `EOPNOTSUPP`).
    pub fn chmod(&self, rel: &Path, mode: u32) -> Result<(), Errno> {
        let fd = self.open(rel, OFlags::PATH, Mode::empty())?;
        match fchmodat2_empty_path(fd.as_fd(), mode & MODE_MASK) {
            Err(Errno::NOSYS) => {
                // Kernels before 6.6: reopen for real; symlinks and devices stay refused.
                let kind = RawType::from_raw_mode(rustix::fs::fstat(&fd)?.st_mode);
                if !matches!(kind, RawType::RegularFile | RawType::Directory) {
                    return Err(Errno::OPNOTSUPP);
                }
                let real = self.open(rel, OFlags::RDONLY | OFlags::NONBLOCK, Mode::empty())?;
                rustix::fs::fchmod(real, Mode::from_raw_mode(mode & MODE_MASK))
            }
            other => other,
        }
    }

    /// Clears the set-id bits that a write, a truncation or a change of owner clears (see
    /// [`set_id_cleared`]) on the regular file `rel`, never following a trailing symlink; other
    /// kinds of file are left alone. Returns whether a bit was cleared (see [`permitted`] for
    /// `EPERM`).
    pub fn clear_set_id(&self, rel: &Path) -> Result<bool, Errno> {
        let fd = self.open(rel, OFlags::PATH, Mode::empty())?;
        let st = rustix::fs::fstat(&fd)?;
        let Some(mode) = set_id_cleared(&st) else {
            return Ok(false);
        };
        match fchmodat2_empty_path(fd.as_fd(), mode) {
            Err(Errno::NOSYS) => {
                let real = self.open(rel, OFlags::RDONLY | OFlags::NONBLOCK, Mode::empty())?;
                clear_set_id_of(&real)
            }
            other => permitted(other.map(|()| true)),
        }
    }

    /// `utimensat(rel, AT_SYMLINK_NOFOLLOW)`.
    pub fn utimens(&self, rel: &Path, times: &Timestamps) -> Result<(), Errno> {
        if rel.as_os_str().is_empty() {
            let fd = self.open(rel, OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty())?;
            return rustix::fs::futimens(fd, times);
        }
        let (parent, name) = split(rel)?;
        let dir = self.dir(parent)?;
        rustix::fs::utimensat(dir, name, times, AtFlags::SYMLINK_NOFOLLOW)
    }

    /// `truncate rel size` (regular files only).
    pub fn truncate(&self, rel: &Path, size: u64) -> Result<(), Errno> {
        let fd = self.open_file(rel, libc_flags(OFlags::WRONLY))?;
        rustix::fs::ftruncate(fd, size)
    }

    /// `statvfs` of the source.
    pub fn statfs(&self) -> Result<StatVfs, Errno> {
        rustix::fs::fstatvfs(&self.root)
    }

    /// Walks the directory `rel` (not following symlinks) and calls `visit` with the path of every
    /// entry relative to `rel`; stops with `Err(EXDEV)` after `limit` entries, or at the first
    /// `Some` that `visit` returns.
    pub fn walk<T>(
        &self,
        rel: &Path,
        limit: usize,
        mut visit: impl FnMut(&Path) -> Option<T>,
    ) -> Result<Option<T>, Errno> {
        let mut stack = vec![PathBuf::new()];
        let mut seen = 0usize;
        while let Some(suffix) = stack.pop() {
            for entry in self.list(&rel.join(&suffix))? {
                seen += 1;
                if seen > limit {
                    return Err(Errno::XDEV);
                }
                let path = suffix.join(&entry.name);
                if let Some(found) = visit(&path) {
                    return Ok(Some(found));
                }
                let kind = if entry.kind == RawType::Unknown {
                    RawType::from_raw_mode(self.lstat(&rel.join(&path))?.st_mode)
                } else {
                    entry.kind
                };
                if kind == RawType::Directory {
                    stack.push(path);
                }
            }
        }
        Ok(None)
    }
}

/// The mode a regular file with `st` is left with after a write, a truncation or a change of
/// owner, if that clears anything: set-user-id is cleared, and set-group-id when group execute is
/// set (without it the bit marks mandatory locking and stays). These are the bits the kernel's FUSE
/// module cleared itself (a `GETATTR`, then a `SETATTR` of the mode; `fuse_setattr` in
/// `fs/fuse/dir.c`) before the server took the job over with `FUSE_HANDLE_KILLPRIV_V2`.
pub fn set_id_cleared(st: &Stat) -> Option<u32> {
    let mode = st.st_mode;
    if RawType::from_raw_mode(mode) != RawType::RegularFile {
        return None;
    }
    let mut cleared = mode & 0o7777 & !libc::S_ISUID;
    if mode & (libc::S_ISGID | libc::S_IXGRP) == libc::S_ISGID | libc::S_IXGRP {
        cleared &= !libc::S_ISGID;
    }
    (cleared != mode & 0o7777).then_some(cleared)
}

/// [`Source::clear_set_id`] on a file open for I/O (the server's own fd of a sandbox's open).
pub fn clear_set_id_of(fd: &OwnedFd) -> Result<bool, Errno> {
    let st = rustix::fs::fstat(fd)?;
    match set_id_cleared(&st) {
        Some(mode) => permitted(rustix::fs::fchmod(fd, Mode::from_raw_mode(mode)).map(|()| true)),
        None => Ok(false),
    }
}

/// A clearing refused with `EPERM` is not an error: only a server that neither owns the file nor
/// holds `CAP_FOWNER` gets it, so one without `CAP_FSETID` either, and the kernel clears the bits
/// itself when such a server writes to, truncates or extends the file (as for any writer
/// without `CAP_FSETID`), before the data changes. Refusing the sandbox's write instead would
/// break writes a plain mount allows (a group-writable set-group-id file of another user).
fn permitted(cleared: Result<bool, Errno>) -> Result<bool, Errno> {
    match cleared {
        Err(Errno::PERM) => Ok(false),
        other => other,
    }
}

/// `fchmodat2(fd, "", mode, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW)` (Linux 6.6+).
fn fchmodat2_empty_path(fd: BorrowedFd<'_>, mode: u32) -> Result<(), Errno> {
    use std::os::fd::AsRawFd;
    const SYS_FCHMODAT2: libc::c_long = 452;
    let empty = CString::default();
    // SAFETY: plain syscall with a valid fd, a NUL-terminated empty path and integer arguments.
    let ret = unsafe {
        libc::syscall(
            SYS_FCHMODAT2,
            fd.as_raw_fd(),
            empty.as_ptr(),
            mode as libc::c_uint,
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if ret == 0 {
        Ok(())
    } else {
        Err(Errno::from_raw_os_error(
            std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO),
        ))
    }
}

fn libc_flags(flags: OFlags) -> i32 {
    flags.bits() as i32
}

/// Splits a non-empty relative path into its parent and last component.
pub fn split(rel: &Path) -> Result<(&Path, &OsStr), Errno> {
    match (rel.parent(), rel.file_name()) {
        (Some(parent), Some(name)) => Ok((parent, name)),
        _ => Err(Errno::INVAL),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn source() -> (tempfile::TempDir, Source) {
        let dir = tempfile::tempdir().expect("tempdir");
        let fd = rustix::fs::open(
            dir.path(),
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .expect("open source");
        (dir, Source::new(fd).expect("source"))
    }

    #[test]
    fn resolution_never_leaves_the_source() {
        let (dir, src) = source();
        std::fs::create_dir(dir.path().join("d")).expect("mkdir");
        std::fs::write(dir.path().join("d/f"), b"x").expect("write");
        symlink("/etc", dir.path().join("escape")).expect("symlink");
        symlink("d", dir.path().join("inside")).expect("symlink");
        let cases: &[(&str, Option<Errno>)] = &[
            ("d/f", None),
            // an absolute symlink out of the tree
            ("escape/passwd", Some(Errno::XDEV)),
            // a symlink inside the tree is not followed by the server either
            ("inside/f", Some(Errno::LOOP)),
            // dot-dot out of the source
            ("../etc/passwd", Some(Errno::XDEV)),
            ("d/../../etc/passwd", Some(Errno::XDEV)),
            // a trailing symlink is not opened for I/O
            ("escape", Some(Errno::LOOP)),
        ];
        for (rel, err) in cases {
            let got = src.open_file(Path::new(rel), 0).err();
            match err {
                None => assert_eq!(got, None, "{rel}"),
                // RESOLVE_BENEATH answers EXDEV, RESOLVE_NO_SYMLINKS ELOOP; either refuses
                Some(_) => assert!(
                    matches!(got, Some(Errno::XDEV) | Some(Errno::LOOP)),
                    "{rel}: {got:?}"
                ),
            }
        }
    }

    #[test]
    fn created_files_never_carry_set_id_bits() {
        let (dir, src) = source();
        drop(
            src.create(Path::new(""), OsStr::new("f"), libc::O_WRONLY, 0o6755)
                .expect("create"),
        );
        src.mkdir(Path::new(""), OsStr::new("d"), 0o2777)
            .expect("mkdir");
        src.chmod(Path::new("f"), 0o4755).expect("chmod");
        for name in ["f", "d"] {
            let mode = std::fs::metadata(dir.path().join(name)).expect("stat");
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(mode.permissions().mode() & 0o6000, 0, "{name}");
        }
    }

    #[test]
    fn clearing_set_id_bits_follows_the_kernels_rule() {
        use std::os::unix::fs::PermissionsExt;
        let (dir, src) = source();
        let cases: &[(u32, u32)] = &[
            // set-user-id: always cleared
            (0o4755, 0o755),
            (0o4644, 0o644),
            // set-group-id with group execute: cleared
            (0o2755, 0o755),
            (0o6711, 0o711),
            // set-group-id without group execute (mandatory locking mark): kept
            (0o2745, 0o2745),
            (0o6745, 0o2745),
            // nothing to clear; sticky stays
            (0o755, 0o755),
            (0o1755, 0o1755),
        ];
        for (i, (before, after)) in cases.iter().enumerate() {
            for by_fd in [false, true] {
                let name = format!("f{i}{by_fd}");
                let path = dir.path().join(&name);
                std::fs::write(&path, b"x").expect("write");
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(*before))
                    .expect("chmod");
                let cleared = if by_fd {
                    let fd = src.open_file(Path::new(&name), libc::O_RDWR).expect("open");
                    clear_set_id_of(&fd).expect("clear")
                } else {
                    src.clear_set_id(Path::new(&name)).expect("clear")
                };
                let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
                assert_eq!(mode & 0o7777, *after, "{before:o} by fd: {by_fd}");
                assert_eq!(cleared, before != after, "{before:o} by fd: {by_fd}");
            }
        }
        // a directory's set-group-id (inheritance of the group) is never touched
        std::fs::create_dir(dir.path().join("d")).expect("mkdir");
        std::fs::set_permissions(
            dir.path().join("d"),
            std::fs::Permissions::from_mode(0o2775),
        )
        .expect("chmod");
        assert!(!src.clear_set_id(Path::new("d")).expect("clear"));
    }

    #[test]
    fn chmod_of_a_symlink_is_refused_not_followed() {
        let (dir, src) = source();
        std::fs::write(dir.path().join("t"), b"x").expect("write");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path().join("t"), std::fs::Permissions::from_mode(0o600))
            .expect("chmod");
        symlink("t", dir.path().join("l")).expect("symlink");
        assert!(src.chmod(Path::new("l"), 0o777).is_err());
        let mode = std::fs::metadata(dir.path().join("t")).expect("stat");
        assert_eq!(mode.permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn devices_cannot_be_made() {
        let (_dir, src) = source();
        let cases: &[(u32, bool)] = &[
            (libc::S_IFREG | 0o644, true),
            (libc::S_IFIFO | 0o644, true),
            (libc::S_IFCHR | 0o644, false),
            (libc::S_IFBLK | 0o644, false),
        ];
        for (i, (mode, ok)) in cases.iter().enumerate() {
            let name = format!("n{i}");
            assert_eq!(
                src.mknod(Path::new(""), OsStr::new(&name), *mode).is_ok(),
                *ok,
                "{mode:o}"
            );
        }
    }
}
