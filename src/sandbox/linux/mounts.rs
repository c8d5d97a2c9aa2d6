//! The sandbox's filesystem, built by init in its new mount namespace (child side).
//!
//! 1. Make every mount private, so nothing propagates back to the host.
//! 2. Open every bind source (`O_PATH`) *before* covering anything: a source under the host's
//!    `/tmp` stays reachable although the staging tmpfs goes on top of `/tmp`. The fds must be
//!    opened here, not in the parent: `open_tree` only clones mounts of the caller's own mount
//!    namespace.
//! 3. Mount a tmpfs on `/tmp` as the staging root and `chdir` into it; build relative to it:
//!    read-only binds of `/usr /bin /sbin /lib*` (symlinks such as `/bin -> usr/bin` recreated as
//!    symlinks) and `/etc`; tmpfs `/tmp` and `/root` (the sandbox's `HOME`); a minimal `/dev`;
//!    a fresh `/proc` with `/proc/sys` and friends read-only; `/run/hive` with the CA bundle; the
//!    configured mounts as the parent planned them ([`super::plan::PlannedMount`]: a whole
//!    source, one subtree of a source, or only a mount point).
//! 4. `pivot_root(".", ".")`, detach the old root.
//! 5. With the new root in place (so absolute symlinks resolve inside): hide the `/etc` secrets
//!    the parent found, bind the CA bundle over the distribution bundle paths that exist.
//! 6. [`etc_files`]: the generated `/etc/resolv.conf` and `/etc/hosts` (transparent networking).
//! 7. init then adds the Landlock rules ([`landlock_rules`]) and makes `/` read-only
//!    ([`root_read_only`]).
//!
//! A mount with per-file ACLs is not bound: init opens `/dev/fuse` before it drops the
//! host's uid ([`open_fuse`]), mounts it at the target in step 3 and hands the fd to the host,
//! which serves it (`crate::fs::AclFs`) over the source. The host does not serve it before init
//! has finished, so no setup step may touch the mount: its Landlock rule is added without a
//! `stat`, and no other mount may be nested in it (the plan refuses).
//!
//! Binds use the new mount API: `open_tree(OPEN_TREE_CLONE | AT_RECURSIVE)` makes a detached
//! copy, `mount_setattr` sets read-only/nosuid/nodev on the whole copy *before* it is attached
//! (no window where it is writable, and unlike `MS_REMOUNT` it leaves the flags the kernel locks in
//! a user namespace alone), then `move_mount` attaches it.

use std::ffi::CStr;

use super::child::{check, check_i, errno, write_file, CResult, Fail, Stage};
use super::landlock::{self, ALL, IOCTL_DEV, READ_DIR, READ_EXEC, READ_FILE, WRITE_FILE};
use super::plan::{EtcTarget, InitPlan, SystemEntry, HIDDEN_DIR, HIDDEN_FILE};

const OPEN_TREE_CLONE: libc::c_uint = 1;
const AT_EMPTY_PATH: libc::c_uint = 0x1000;
const AT_RECURSIVE: libc::c_uint = 0x8000;
const AT_SYMLINK_NOFOLLOW: libc::c_uint = 0x100;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;
const MOVE_MOUNT_T_SYMLINKS: libc::c_uint = 0x10;
const MOUNT_ATTR_RDONLY: u64 = 0x1;
const MOUNT_ATTR_NOSUID: u64 = 0x2;
const MOUNT_ATTR_NODEV: u64 = 0x4;
const MOUNT_ATTR_NOEXEC: u64 = 0x8;

const RO: u64 = MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV;
const RW: u64 = MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV;

#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// `mount_setattr(dirfd, path, flags, {attr_set: set})`.
unsafe fn set_attr(dirfd: libc::c_int, path: &CStr, flags: libc::c_uint, set: u64) -> libc::c_long {
    let attr = MountAttr {
        attr_set: set,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    libc::syscall(
        libc::SYS_mount_setattr,
        dirfd,
        path.as_ptr(),
        flags,
        &attr as *const MountAttr,
        std::mem::size_of::<MountAttr>(),
    )
}

/// Clones the mount at `src_dirfd`/`src` (empty path: the fd itself), sets `attrs` on the copy
/// and attaches it at `dst` (relative to the cwd).
unsafe fn bind(
    src_dirfd: libc::c_int,
    src: &CStr,
    dst: &CStr,
    recursive: bool,
    attrs: u64,
    follow_dst_symlinks: bool,
    stage: Stage,
) -> CResult {
    let mut flags = OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint;
    if src.is_empty() {
        flags |= AT_EMPTY_PATH;
    } else {
        flags |= AT_SYMLINK_NOFOLLOW;
    }
    if recursive {
        flags |= AT_RECURSIVE;
    }
    let tree = check(
        libc::syscall(libc::SYS_open_tree, src_dirfd, src.as_ptr(), flags),
        stage,
    )? as libc::c_int;
    let r = (|| {
        let rec = if recursive { AT_RECURSIVE } else { 0 };
        check(set_attr(tree, c"", AT_EMPTY_PATH | rec, attrs), stage)?;
        let mut mflags = MOVE_MOUNT_F_EMPTY_PATH;
        if follow_dst_symlinks {
            mflags |= MOVE_MOUNT_T_SYMLINKS;
        }
        check(
            libc::syscall(
                libc::SYS_move_mount,
                tree,
                c"".as_ptr(),
                libc::AT_FDCWD,
                dst.as_ptr(),
                mflags,
            ),
            stage,
        )?;
        Ok(())
    })();
    libc::close(tree);
    r
}

unsafe fn mkdir(path: &CStr, mode: libc::mode_t, stage: Stage) -> CResult {
    if libc::mkdir(path.as_ptr(), mode) < 0 && errno() != libc::EEXIST {
        return Err(Fail {
            stage,
            errno: errno(),
        });
    }
    Ok(())
}

unsafe fn touch(path: &CStr, mode: libc::mode_t, stage: Stage) -> CResult {
    let fd = libc::open(
        path.as_ptr(),
        libc::O_WRONLY | libc::O_CREAT | libc::O_CLOEXEC | libc::O_NOFOLLOW,
        mode as libc::c_uint,
    );
    if fd < 0 {
        return Err(Fail {
            stage,
            errno: errno(),
        });
    }
    libc::close(fd);
    Ok(())
}

unsafe fn mount_fs(
    fstype: &CStr,
    target: &CStr,
    flags: libc::c_ulong,
    data: &CStr,
    stage: Stage,
) -> CResult {
    check_i(
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags,
            data.as_ptr().cast(),
        ),
        stage,
    )?;
    Ok(())
}

/// `open(path, O_PATH)` with `RESOLVE_NO_SYMLINKS`: a configured source's path is canonical
/// when planned, so a symlink found on the way now was swapped in since, and the start fails.
unsafe fn open_no_symlinks(path: &CStr) -> CResult<libc::c_int> {
    #[repr(C)]
    struct OpenHow {
        flags: u64,
        mode: u64,
        resolve: u64,
    }
    const RESOLVE_NO_SYMLINKS: u64 = 0x04;
    let how = OpenHow {
        flags: (libc::O_PATH | libc::O_CLOEXEC) as u64,
        mode: 0,
        resolve: RESOLVE_NO_SYMLINKS,
    };
    check(
        libc::syscall(
            libc::SYS_openat2,
            libc::AT_FDCWD,
            path.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        ),
        Stage::OpenSource,
    )
    .map(|fd| fd as libc::c_int)
}

unsafe fn open_path(path: &CStr) -> CResult<libc::c_int> {
    check_i(
        libc::open(path.as_ptr(), libc::O_PATH | libc::O_CLOEXEC),
        Stage::OpenSource,
    )
}

/// Steps 1–5 of the module doc. On return the cwd is the new `/`.
pub(crate) unsafe fn build_root(plan: &mut InitPlan) -> CResult {
    // 1. Private propagation.
    check_i(
        libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ),
        Stage::MountPrivate,
    )?;
    // 2. Sources, in the order of `plan.source_fds`: system dirs, /etc, dev nodes, mounts.
    let mut fds = plan.source_fds.iter_mut();
    for entry in &plan.system {
        if let SystemEntry::Dir { host, .. } = entry {
            if let Some(slot) = fds.next() {
                *slot = open_path(host)?;
            }
        }
    }
    let etc_fd = open_path(&plan.etc_host)?;
    for ((host, _), slot) in plan.dev_host.iter().zip(&mut fds) {
        *slot = open_path(host)?;
    }
    for (m, slot) in plan.mounts.iter().zip(&mut fds) {
        if m.tree < 0 && m.binds_source() {
            *slot = open_no_symlinks(&m.source)?;
        }
    }
    // 3. Staging root.
    mount_fs(
        c"tmpfs",
        c"/tmp",
        libc::MS_NOSUID | libc::MS_NODEV,
        c"mode=0755",
        Stage::MountRoot,
    )?;
    check_i(libc::chdir(c"/tmp".as_ptr()), Stage::MountRoot)?;
    let mut fds = plan.source_fds.iter();
    for entry in &plan.system {
        match entry {
            SystemEntry::Dir { name, .. } => {
                let fd = fds.next().copied().unwrap_or(-1);
                mkdir(name, 0o755, Stage::BindSystem)?;
                bind(fd, c"", name, true, RO, false, Stage::BindSystem)?;
            }
            SystemEntry::Symlink { name, target } => {
                check_i(
                    libc::symlink(target.as_ptr(), name.as_ptr()),
                    Stage::BindSystem,
                )?;
            }
        }
    }
    mkdir(c"etc", 0o755, Stage::BindSystem)?;
    bind(etc_fd, c"", c"etc", true, RO, false, Stage::BindSystem)?;
    libc::close(etc_fd);
    for dir in [c"tmp", c"root", c"run", c"run/hive", c"dev", c"proc"] {
        mkdir(dir, 0o755, Stage::MountTmpfs)?;
    }
    let (nosuid_nodev, nosuid_noexec) = (
        libc::MS_NOSUID | libc::MS_NODEV,
        libc::MS_NOSUID | libc::MS_NOEXEC,
    );
    mount_fs(
        c"tmpfs",
        c"tmp",
        nosuid_nodev,
        c"mode=1777",
        Stage::MountTmpfs,
    )?;
    mount_fs(
        c"tmpfs",
        c"root",
        nosuid_nodev,
        c"mode=0700",
        Stage::MountTmpfs,
    )?;
    // /dev: a tmpfs with the host's harmless nodes, a private devpts and shm.
    mount_fs(
        c"tmpfs",
        c"dev",
        nosuid_noexec,
        c"mode=0755",
        Stage::MountDev,
    )?;
    for (_, rel) in plan.dev_host.iter() {
        let fd = fds.next().copied().unwrap_or(-1);
        touch(rel, 0o666, Stage::MountDev)?;
        bind(
            fd,
            c"",
            rel,
            false,
            MOUNT_ATTR_NOSUID | MOUNT_ATTR_NOEXEC,
            false,
            Stage::MountDev,
        )?;
    }
    mkdir(c"dev/pts", 0o755, Stage::MountDev)?;
    mount_fs(
        c"devpts",
        c"dev/pts",
        nosuid_noexec,
        c"newinstance,ptmxmode=0666,mode=0620",
        Stage::MountDev,
    )?;
    mkdir(c"dev/shm", 0o1777, Stage::MountDev)?;
    mount_fs(
        c"tmpfs",
        c"dev/shm",
        nosuid_nodev,
        c"mode=1777",
        Stage::MountDev,
    )?;
    for (target, link) in [
        (c"pts/ptmx", c"dev/ptmx"),
        (c"/proc/self/fd", c"dev/fd"),
        (c"/proc/self/fd/0", c"dev/stdin"),
        (c"/proc/self/fd/1", c"dev/stdout"),
        (c"/proc/self/fd/2", c"dev/stderr"),
    ] {
        check_i(
            libc::symlink(target.as_ptr(), link.as_ptr()),
            Stage::MountDev,
        )?;
    }
    check(
        set_attr(libc::AT_FDCWD, c"dev", 0, MOUNT_ATTR_RDONLY),
        Stage::MountDev,
    )?;
    // /proc of the new PID namespace; the kernel-wide knobs read-only.
    mount_fs(
        c"proc",
        c"proc",
        nosuid_nodev | libc::MS_NOEXEC,
        c"",
        Stage::MountProc,
    )?;
    for sub in [c"proc/sys", c"proc/sysrq-trigger", c"proc/irq", c"proc/bus"] {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::lstat(sub.as_ptr(), &mut st) == 0 {
            bind(
                libc::AT_FDCWD,
                sub,
                sub,
                true,
                RO | MOUNT_ATTR_NOEXEC,
                false,
                Stage::MountProc,
            )?;
        }
    }
    // /run/hive: the CA bundle and the masks used to hide secrets.
    let ca = &plan.ca_bundle_rel;
    write_file(ca, &plan.ca_bundle, 0o444)?;
    write_file(HIDDEN_FILE, &[], 0)?;
    mkdir(HIDDEN_DIR, 0, Stage::WriteFile)?;
    // Configured mounts, parents first.
    for m in plan.mounts.iter() {
        let fd = fds.next().copied().unwrap_or(-1);
        for d in &m.mkdirs {
            mkdir(d, 0o755, Stage::BindConfigured)?;
        }
        if m.is_file {
            touch(&m.target_rel, 0o644, Stage::BindConfigured)?;
        }
        if m.fuse {
            mount_fuse(m.fuse_fd, &m.target_rel)?;
        } else if m.placeholder {
            // Only the mount point: nothing of the source is shown there.
        } else if m.tree >= 0 {
            // Idmapped by the parent, flags already set: attach as is.
            check(
                libc::syscall(
                    libc::SYS_move_mount,
                    m.tree,
                    c"".as_ptr(),
                    libc::AT_FDCWD,
                    m.target_rel.as_ptr(),
                    MOVE_MOUNT_F_EMPTY_PATH,
                ),
                Stage::BindConfigured,
            )?;
            libc::close(m.tree);
        } else {
            let attrs = if m.writable { RW } else { RO };
            bind(
                fd,
                c"",
                &m.target_rel,
                true,
                attrs,
                false,
                Stage::BindConfigured,
            )?;
        }
    }
    for fd in plan.source_fds.iter() {
        if *fd >= 0 {
            libc::close(*fd);
        }
    }
    // 4. Switch roots.
    check(
        libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()),
        Stage::PivotRoot,
    )?;
    check_i(
        libc::umount2(c".".as_ptr(), libc::MNT_DETACH),
        Stage::PivotRoot,
    )?;
    check_i(libc::chdir(c"/".as_ptr()), Stage::PivotRoot)?;
    // 5. Secrets and CA bundle, resolved inside the new root.
    for h in plan.hidden.iter() {
        let src = if h.is_dir { HIDDEN_DIR } else { HIDDEN_FILE };
        let mut st: libc::stat = std::mem::zeroed();
        if libc::lstat(h.path.as_ptr(), &mut st) == 0 {
            bind(
                libc::AT_FDCWD,
                src,
                &h.path,
                false,
                RO | MOUNT_ATTR_NOEXEC,
                false,
                Stage::HideSecret,
            )?;
        }
    }
    for target in plan.ca_targets.iter() {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::stat(target.as_ptr(), &mut st) == 0 && st.st_mode & libc::S_IFMT == libc::S_IFREG {
            bind(
                libc::AT_FDCWD,
                ca,
                target,
                false,
                RO | MOUNT_ATTR_NOEXEC,
                true,
                Stage::BindCaBundle,
            )?;
        }
    }
    Ok(())
}

/// Writes the generated `/etc/resolv.conf` and `/etc/hosts` under `/run/hive` and shows them at
/// their `/etc` paths (cwd is the new `/`, not yet read-only): bound over the host's file, or,
/// where the host's entry is a symlink into `/run`, as a symlink created at its target.
pub(crate) unsafe fn etc_files(plan: &InitPlan) -> CResult {
    for file in plan.etc_files.iter() {
        write_file(&file.staged, &file.data, 0o444)?;
        match &file.target {
            EtcTarget::Bind(target) => {
                let mut st: libc::stat = std::mem::zeroed();
                if libc::stat(target.as_ptr(), &mut st) == 0
                    && st.st_mode & libc::S_IFMT == libc::S_IFREG
                {
                    bind(
                        libc::AT_FDCWD,
                        &file.staged,
                        target,
                        false,
                        RO | MOUNT_ATTR_NOEXEC,
                        true,
                        Stage::WriteFile,
                    )?;
                }
            }
            EtcTarget::Symlink { mkdirs, link } => {
                for d in mkdirs.iter() {
                    mkdir(d, 0o755, Stage::WriteFile)?;
                }
                check_i(
                    libc::symlink(file.staged_abs.as_ptr(), link.as_ptr()),
                    Stage::WriteFile,
                )?;
            }
            EtcTarget::Skip => {}
        }
    }
    Ok(())
}

/// Adds the Landlock rules for the tree [`build_root`] made (cwd is the new `/`).
pub(crate) unsafe fn landlock_rules(plan: &InitPlan) -> CResult {
    let (fd, handled) = (plan.landlock_fd, plan.landlock_fs);
    if fd < 0 {
        return Ok(());
    }
    let dev_rw = READ_FILE | WRITE_FILE | IOCTL_DEV;
    landlock::add_rule(fd, handled, c"/", READ_DIR)?;
    for entry in &plan.system {
        if let SystemEntry::Dir { name, .. } = entry {
            landlock::add_rule(fd, handled, name, READ_EXEC)?;
        }
    }
    landlock::add_rule(fd, handled, c"etc", READ_FILE | READ_DIR)?;
    landlock::add_rule(fd, handled, c"run/hive", READ_FILE | READ_DIR)?;
    landlock::add_rule(fd, handled, c"proc", READ_FILE | READ_DIR)?;
    for dir in [c"tmp", c"root", c"dev/shm"] {
        landlock::add_rule(fd, handled, dir, ALL)?;
    }
    landlock::add_rule(fd, handled, c"dev", READ_DIR)?;
    for (_, rel) in plan.dev_host.iter() {
        landlock::add_rule(fd, handled, rel, dev_rw)?;
    }
    landlock::add_rule(fd, handled, c"dev/pts", dev_rw | READ_DIR)?;
    for m in plan.mounts.iter() {
        if m.fuse {
            // The server decides every access; Landlock only keeps the mount itself usable.
            landlock::add_dir_rule(fd, handled, &m.target_rel, ALL)?;
        } else if m.binds_source() {
            let access = if m.writable { ALL } else { READ_EXEC };
            landlock::add_rule(fd, handled, &m.target_rel, access)?;
        }
    }
    Ok(())
}

/// Opens `/dev/fuse` once per FUSE mount (init, *before* it switches to the sandbox's uid 0).
///
/// The kernel only mounts a FUSE fd opened in the mount's own user namespace, and `/dev/fuse` is
/// often `0600 root`: as root, init still holds the host's uid here (owner match, no capability
/// needed); unprivileged, this works where `/dev/fuse` is usable by the caller. The parent checked
/// [`crate::fs::fuse_available`] first, so a failure here is reported as unenforceable.
pub(crate) unsafe fn open_fuse(plan: &mut InitPlan) -> CResult {
    for m in plan.mounts.iter_mut().filter(|m| m.fuse) {
        m.fuse_fd = check_i(
            libc::open(c"/dev/fuse".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC),
            Stage::OpenFuse,
        )?;
    }
    Ok(())
}

/// Options of a sandbox FUSE mount after `fd=<n>`: the sandbox's root owns the connection and
/// every process of the sandbox may use it; no `default_permissions` (the server decides).
const FUSE_OPTIONS_TAIL: &[u8] = b",rootmode=40000,user_id=0,group_id=0,allow_other\0";

/// Mounts the FUSE connection `fuse_fd` at `target` (relative to the cwd), `nosuid,nodev`.
/// Nothing may touch the mount afterwards until the host serves it: any request would wait.
unsafe fn mount_fuse(fuse_fd: libc::c_int, target: &CStr) -> CResult {
    let mut data = [0u8; 96];
    let len = fuse_options(fuse_fd, &mut data).ok_or(Fail {
        stage: Stage::MountFuse,
        errno: libc::EINVAL,
    })?;
    let data = CStr::from_bytes_with_nul(data.get(..len).unwrap_or(&[])).map_err(|_| Fail {
        stage: Stage::MountFuse,
        errno: libc::EINVAL,
    })?;
    check_i(
        libc::mount(
            c"hive".as_ptr(),
            target.as_ptr(),
            c"fuse.hive".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV,
            data.as_ptr().cast(),
        ),
        Stage::MountFuse,
    )?;
    Ok(())
}

/// Writes `fd=<fd>` + [`FUSE_OPTIONS_TAIL`] into `out` without allocating; the length with the
/// NUL, or `None` if it does not fit or `fd` is negative.
fn fuse_options(fd: libc::c_int, out: &mut [u8]) -> Option<usize> {
    let mut digits = [0u8; 10];
    let mut n = u32::try_from(fd).ok()?;
    let mut count = 0;
    loop {
        *digits.get_mut(count)? = b'0' + (n % 10) as u8;
        count += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let mut len = 0;
    let mut push = |b: u8| -> Option<()> {
        *out.get_mut(len)? = b;
        len += 1;
        Some(())
    };
    for b in b"fd=" {
        push(*b)?;
    }
    for i in (0..count).rev() {
        push(*digits.get(i)?)?;
    }
    for b in FUSE_OPTIONS_TAIL {
        push(*b)?;
    }
    Some(len)
}

/// Makes the root tmpfs read-only (the submounts keep their own flags).
pub(crate) unsafe fn root_read_only() -> CResult {
    check(
        set_attr(libc::AT_FDCWD, c"/", 0, MOUNT_ATTR_RDONLY),
        Stage::RemountRootRo,
    )?;
    Ok(())
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn fuse_options_are_written_without_allocating() {
        for (fd, want) in [
            (
                0,
                Some("fd=0,rootmode=40000,user_id=0,group_id=0,allow_other"),
            ),
            (
                7,
                Some("fd=7,rootmode=40000,user_id=0,group_id=0,allow_other"),
            ),
            (
                1234,
                Some("fd=1234,rootmode=40000,user_id=0,group_id=0,allow_other"),
            ),
            (-1, None),
        ] {
            let mut buf = [0u8; 96];
            let got = fuse_options(fd, &mut buf).map(|len| {
                CStr::from_bytes_with_nul(&buf[..len])
                    .expect("NUL-terminated")
                    .to_str()
                    .expect("ascii")
                    .to_owned()
            });
            assert_eq!(got.as_deref(), want, "{fd}");
        }
        let mut small = [0u8; 8];
        assert_eq!(fuse_options(1, &mut small), None);
    }
}
