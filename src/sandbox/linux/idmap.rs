//! Idmapped mounts, so that a sandbox started by root does not run as host root (parent side).
//!
//! Run as root, the sandbox's uid/gid 0 is mapped to [`ROOT_MAPPED_ID`] (`nobody`) on the host
//! instead of host root. The configured mounts then would be owned by an id the sandbox does not
//! have, so each is cloned as a detached mount tree and given an idmapping (`mount_setattr` with
//! `MOUNT_ATTR_IDMAP`):
//! 1. A throwaway user namespace maps 0 to [`ROOT_MAPPED_ID`] (a short-lived child holds it while
//!    the parent opens `/proc/<pid>/ns/user`).
//! 2. `open_tree(source, OPEN_TREE_CLONE | AT_RECURSIVE)` in the host's mount namespace, then
//!    `mount_setattr(IDMAP | NOSUID | NODEV [| RDONLY])` with that namespace.
//! 3. init inherits the tree fds and `move_mount`s them into the sandbox (`hive_launcher::setup::fs`).
//!
//! Effect: a file owned by host root appears owned by the sandbox's root, and a file the sandbox
//! creates lands on disk owned by host root, the user running hive. Both steps need
//! `CAP_SYS_ADMIN` over the filesystem's superblock, so only root gets this; a filesystem without
//! idmap support (e.g. some FUSE or network filesystems) makes the launcher fall back to mapping
//! 0 to host root (see [`super`]).
//!
//! # Security
//! With the mapping, the sandbox's processes are `nobody` on the host: files outside the mounts
//! that only root may read (`/etc/shadow`, ...) are out of reach by DAC, not just hidden.

use std::ffi::CStr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// Host uid and gid the sandbox's root becomes when hive runs as root.
pub const ROOT_MAPPED_ID: u32 = 65534;

const OPEN_TREE_CLONE: libc::c_uint = 1;
const AT_RECURSIVE: libc::c_uint = 0x8000;
const AT_EMPTY_PATH: libc::c_uint = 0x1000;
const MOUNT_ATTR_RDONLY: u64 = 0x1;
const MOUNT_ATTR_NOSUID: u64 = 0x2;
const MOUNT_ATTR_NODEV: u64 = 0x4;
const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;

/// A user namespace whose only mapping is 0 -> `id` (uid and gid), as an fd.
pub(crate) fn mapping_userns(id: u32) -> std::io::Result<OwnedFd> {
    let mut fds = [-1; 2];
    // SAFETY: valid array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fresh fds.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // The child shares this process's memory (CLONE_VM: no copy of the host's page tables) and
    // runs only hive_launcher::stub::hold_until_eof (raw syscalls, no TLS) on its own stack.
    let mut stack = vec![0u8; 16 * 1024];
    let stack_top = (stack.as_mut_ptr() as usize + stack.len()) & !0xf;
    let fds_arg = (r.as_raw_fd() as u32 as u64) | ((w.as_raw_fd() as u32 as u64) << 32);
    // SAFETY: the child runs hold_until_eof on `stack`, which lives until the child is reaped
    // below; signals stay blocked in it, so none of the host's handlers runs there.
    let pid = super::with_signals_blocked(|| unsafe {
        libc::clone(
            hive_launcher::stub::hold_until_eof,
            stack_top as *mut libc::c_void,
            libc::CLONE_VM | libc::CLONE_NEWUSER | libc::SIGCHLD,
            fds_arg as usize as *mut libc::c_void,
        ) as libc::c_long
    });
    if pid < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let result = (|| {
        std::fs::write(format!("/proc/{pid}/uid_map"), format!("0 {id} 1\n"))?;
        std::fs::write(format!("/proc/{pid}/gid_map"), format!("0 {id} 1\n"))?;
        let ns = std::fs::File::open(format!("/proc/{pid}/ns/user"))?;
        Ok(OwnedFd::from(ns))
    })();
    drop(w);
    drop(r);
    let mut status = 0;
    // SAFETY: reaping our own child.
    unsafe { libc::waitpid(pid as libc::pid_t, &mut status, 0) };
    drop(stack);
    result
}

/// A detached, idmapped copy of the mount tree at `source` (a canonical path: a symlink on the
/// way, swapped in since it was planned, fails it).
pub(crate) fn idmapped_tree(
    source: &CStr,
    userns: &OwnedFd,
    writable: bool,
) -> std::io::Result<OwnedFd> {
    use rustix::fs::{openat2, Mode, OFlags, ResolveFlags};
    let at = openat2(
        rustix::fs::CWD,
        source,
        OFlags::PATH | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::NO_SYMLINKS,
    )?;
    let flags = OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint | AT_RECURSIVE | AT_EMPTY_PATH;
    // SAFETY: plain syscall on a valid fd with an empty path.
    let tree = unsafe { libc::syscall(libc::SYS_open_tree, at.as_raw_fd(), c"".as_ptr(), flags) };
    if tree < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fresh fd.
    let tree = unsafe { OwnedFd::from_raw_fd(tree as i32) };
    #[repr(C)]
    struct MountAttr {
        attr_set: u64,
        attr_clr: u64,
        propagation: u64,
        userns_fd: u64,
    }
    let mut set = MOUNT_ATTR_IDMAP | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV;
    if !writable {
        set |= MOUNT_ATTR_RDONLY;
    }
    let attr = MountAttr {
        attr_set: set,
        attr_clr: 0,
        propagation: 0,
        userns_fd: userns.as_raw_fd() as u64,
    };
    // SAFETY: valid fd, empty path, attr valid for its size.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            c"".as_ptr(),
            AT_EMPTY_PATH | AT_RECURSIVE,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(tree)
}
