//! The sandbox's filesystem, built by the setup child in its new mount namespace. Runs between
//! `clone` and `exec` in the host's memory ([`super`]): allocation-free, raw syscalls only.
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
//!    configured mounts as the parent planned them ([`Mount`]: a whole source, one subtree of a
//!    source, or only a mount point).
//! 4. `pivot_root(".", ".")`, detach the old root.
//! 5. With the new root in place (so absolute symlinks resolve inside): hide the `/etc` secrets
//!    the parent found, bind the CA bundle over the distribution bundle paths that exist.
//! 6. [`etc_files`]: the generated `/etc/resolv.conf` and `/etc/hosts` (transparent networking).
//! 7. The Landlock rules ([`landlock_rules`]), then `/` read-only ([`root_read_only`]).
//!
//! A mount with per-file ACLs is not bound: the child opens `/dev/fuse` before it drops the
//! host's uid ([`open_fuse`]), mounts it at the target in step 3 and hands the fd to the host,
//! which serves it over the source. The host does not serve it before the setup is done, so no
//! step may touch the mount: its Landlock rule is added without a `stat`, and no other mount may
//! be nested in it (the parent's plan refuses).
//!
//! Binds use the new mount API: `open_tree(OPEN_TREE_CLONE | AT_RECURSIVE)` makes a detached
//! copy, `mount_setattr` sets read-only/nosuid/nodev on the whole copy *before* it is attached
//! (no window where it is writable, and unlike `MS_REMOUNT` it leaves the flags the kernel locks
//! in a user namespace alone), then `move_mount` attaches it.

use core::ffi::CStr;

use linux_raw_sys::general as g;
use linux_raw_sys::landlock as ll;

use super::{At, EtcFile, EtcTarget, Fail, Mount, Plan, SetupResult, SystemEntry};
use super::{HIDDEN_DIR, HIDDEN_FILE};
use crate::stage::Stage;
use crate::sys::{self, Errno};

const CWD: i32 = g::AT_FDCWD;

const MOUNT_ATTR_RDONLY: u64 = g::MOUNT_ATTR_RDONLY as u64;
const MOUNT_ATTR_NOSUID: u64 = g::MOUNT_ATTR_NOSUID as u64;
const MOUNT_ATTR_NODEV: u64 = g::MOUNT_ATTR_NODEV as u64;
const MOUNT_ATTR_NOEXEC: u64 = g::MOUNT_ATTR_NOEXEC as u64;
const RO: u64 = MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV;
const RW: u64 = MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV;

/// Landlock filesystem rights (`LANDLOCK_ACCESS_FS_*`) the rules and the addon use.
pub mod rights {
    use linux_raw_sys::landlock as ll;

    /// Execute a file.
    pub const EXECUTE: u64 = ll::LANDLOCK_ACCESS_FS_EXECUTE as u64;
    /// Open a file for writing.
    pub const WRITE_FILE: u64 = ll::LANDLOCK_ACCESS_FS_WRITE_FILE as u64;
    /// Open a file for reading.
    pub const READ_FILE: u64 = ll::LANDLOCK_ACCESS_FS_READ_FILE as u64;
    /// List a directory.
    pub const READ_DIR: u64 = ll::LANDLOCK_ACCESS_FS_READ_DIR as u64;
    /// Every right of ABI 1 (execute .. make_sym).
    pub const ABI1_ALL: u64 = (ll::LANDLOCK_ACCESS_FS_MAKE_SYM as u64) * 2 - 1;
    /// Link or rename across directories (ABI 2).
    pub const REFER: u64 = ll::LANDLOCK_ACCESS_FS_REFER as u64;
    /// Truncate a file (ABI 3).
    pub const TRUNCATE: u64 = ll::LANDLOCK_ACCESS_FS_TRUNCATE as u64;
    /// `ioctl` on a device (ABI 5).
    pub const IOCTL_DEV: u64 = ll::LANDLOCK_ACCESS_FS_IOCTL_DEV as u64;
    /// Rights valid on a rule whose parent is a file rather than a directory.
    pub const FILE_RIGHTS: u64 = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV;
    /// Read-only tree (system dirs, read-only mounts).
    pub const READ_EXEC: u64 = EXECUTE | READ_FILE | READ_DIR;
    /// Everything (writable mounts, `/tmp`): masked down to what the ruleset handles.
    pub const ALL: u64 = u64::MAX;
}

use rights::{ALL, FILE_RIGHTS, IOCTL_DEV, READ_DIR, READ_EXEC, READ_FILE, WRITE_FILE};

/// `mount_setattr(dir, path, flags, {attr_set: set})`.
fn set_attr(dir: i32, path: &CStr, flags: u32, set: u64) -> Result<usize, Errno> {
    let attr = g::mount_attr {
        attr_set: set,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    sys::mount_setattr(dir, path, flags, &attr)
}

/// Clones the mount at `src_dir`/`src` (empty path: the fd itself), sets `attrs` on the copy
/// and attaches it at `dst` (relative to the cwd).
fn bind(
    src_dir: i32,
    src: &CStr,
    dst: &CStr,
    recursive: bool,
    attrs: u64,
    follow_dst_symlinks: bool,
    stage: Stage,
) -> SetupResult {
    let mut flags = g::OPEN_TREE_CLONE | g::OPEN_TREE_CLOEXEC;
    if src.is_empty() {
        flags |= g::AT_EMPTY_PATH;
    } else {
        flags |= g::AT_SYMLINK_NOFOLLOW;
    }
    if recursive {
        flags |= g::AT_RECURSIVE;
    }
    let tree = sys::open_tree(src_dir, src, flags).at(stage)?;
    let rec = if recursive { g::AT_RECURSIVE } else { 0 };
    let mut mflags = g::MOVE_MOUNT_F_EMPTY_PATH;
    if follow_dst_symlinks {
        mflags |= g::MOVE_MOUNT_T_SYMLINKS;
    }
    let r = set_attr(tree, c"", g::AT_EMPTY_PATH | rec, attrs)
        .and_then(|_| sys::move_mount(tree, c"", CWD, dst, mflags))
        .at(stage);
    let _ = sys::close(tree);
    r.map(|_| ())
}

fn mkdir(path: &CStr, mode: u32, stage: Stage) -> SetupResult {
    match sys::mkdirat(CWD, path, mode) {
        Err(Errno(e)) if e != sys::EEXIST as i32 => Err(Fail { stage, errno: e }),
        _ => Ok(()),
    }
}

fn touch(path: &CStr, mode: u32, stage: Stage) -> SetupResult {
    let flags = g::O_WRONLY | g::O_CREAT | g::O_CLOEXEC | g::O_NOFOLLOW;
    let fd = sys::openat(CWD, path, flags, mode).at(stage)?;
    let _ = sys::close(fd);
    Ok(())
}

fn mount_fs(fstype: &CStr, target: &CStr, flags: u32, data: &CStr, stage: Stage) -> SetupResult {
    sys::mount(Some(fstype), target, Some(fstype), flags, Some(data)).at(stage)?;
    Ok(())
}

fn symlink(target: &CStr, link: &CStr, stage: Stage) -> SetupResult {
    sys::symlinkat(target, CWD, link).at(stage)?;
    Ok(())
}

/// Whether `path` exists (not following a final symlink), like `lstat(path) == 0`.
fn exists(path: &CStr) -> bool {
    sys::file_type_at(CWD, path, g::AT_SYMLINK_NOFOLLOW).is_ok()
}

/// Whether `path` (symlinks followed) is a regular file.
fn is_regular_file(path: &CStr) -> bool {
    sys::file_type_at(CWD, path, 0) == Ok(g::S_IFREG)
}

/// `open(path, O_PATH)` with `RESOLVE_NO_SYMLINKS`: a configured source's path is canonical
/// when planned, so a symlink found on the way now was swapped in since, and the start fails.
fn open_no_symlinks(path: &CStr) -> SetupResult<i32> {
    let how = g::open_how {
        flags: u64::from(g::O_PATH | g::O_CLOEXEC),
        mode: 0,
        resolve: u64::from(g::RESOLVE_NO_SYMLINKS),
    };
    sys::openat2(CWD, path, &how).at(Stage::OpenSource)
}

fn open_path(path: &CStr) -> SetupResult<i32> {
    sys::openat(CWD, path, g::O_PATH | g::O_CLOEXEC, 0).at(Stage::OpenSource)
}

/// Writes `data` into a new file `path` (relative to the cwd) with `mode`.
fn write_file(path: &CStr, data: &[u8], mode: u32) -> SetupResult {
    let flags = g::O_WRONLY | g::O_CREAT | g::O_EXCL | g::O_CLOEXEC;
    let fd = sys::openat(CWD, path, flags, mode).at(Stage::WriteFile)?;
    let mut rest = data;
    while !rest.is_empty() {
        match sys::write(fd, rest) {
            Ok(n) => rest = rest.get(n..).unwrap_or(&[]),
            Err(Errno(e)) if e == sys::EINTR as i32 => {}
            Err(Errno(e)) => {
                let _ = sys::close(fd);
                return Err(Fail {
                    stage: Stage::WriteFile,
                    errno: e,
                });
            }
        }
    }
    let _ = sys::close(fd);
    Ok(())
}

/// Steps 1–5 of the module doc. On return the cwd is the new `/`.
pub fn build_root(plan: &mut Plan<'_>) -> SetupResult {
    // 1. Private propagation.
    sys::mount(None, c"/", None, g::MS_REC | g::MS_PRIVATE, None).at(Stage::MountPrivate)?;
    // 2. Sources, in the order of `source_fds`: system dirs, dev nodes, mounts.
    let mut slots = plan.source_fds.iter_mut();
    for entry in plan.system {
        if let SystemEntry::Dir { host, .. } = entry {
            if let Some(slot) = slots.next() {
                *slot = open_path(host)?;
            }
        }
    }
    let etc_fd = open_path(plan.etc_host)?;
    for (dev, slot) in plan.dev_nodes.iter().zip(&mut slots) {
        *slot = open_path(dev.host)?;
    }
    for (m, slot) in plan.mounts.iter().zip(&mut slots) {
        if m.tree < 0 && m.binds_source() {
            *slot = open_no_symlinks(m.source)?;
        }
    }
    // 3. Staging root.
    let (nosuid_nodev, nosuid_noexec) = (g::MS_NOSUID | g::MS_NODEV, g::MS_NOSUID | g::MS_NOEXEC);
    mount_fs(
        c"tmpfs",
        c"/tmp",
        nosuid_nodev,
        c"mode=0755",
        Stage::MountRoot,
    )?;
    sys::chdir_cstr(c"/tmp").at(Stage::MountRoot)?;
    let mut fds = plan.source_fds.iter().copied();
    for entry in plan.system {
        match entry {
            SystemEntry::Dir { name, .. } => {
                let fd = fds.next().unwrap_or(-1);
                mkdir(name, 0o755, Stage::BindSystem)?;
                bind(fd, c"", name, true, RO, false, Stage::BindSystem)?;
            }
            SystemEntry::Symlink { name, target } => symlink(target, name, Stage::BindSystem)?,
        }
    }
    mkdir(c"etc", 0o755, Stage::BindSystem)?;
    bind(etc_fd, c"", c"etc", true, RO, false, Stage::BindSystem)?;
    let _ = sys::close(etc_fd);
    for dir in [c"tmp", c"root", c"run", c"run/hive", c"dev", c"proc"] {
        mkdir(dir, 0o755, Stage::MountTmpfs)?;
    }
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
    for dev in plan.dev_nodes {
        let fd = fds.next().unwrap_or(-1);
        touch(dev.rel, 0o666, Stage::MountDev)?;
        let attrs = MOUNT_ATTR_NOSUID | MOUNT_ATTR_NOEXEC;
        bind(fd, c"", dev.rel, false, attrs, false, Stage::MountDev)?;
    }
    mkdir(c"dev/pts", 0o755, Stage::MountDev)?;
    let devpts = c"newinstance,ptmxmode=0666,mode=0620";
    mount_fs(
        c"devpts",
        c"dev/pts",
        nosuid_noexec,
        devpts,
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
        symlink(target, link, Stage::MountDev)?;
    }
    set_attr(CWD, c"dev", 0, MOUNT_ATTR_RDONLY).at(Stage::MountDev)?;
    // /proc of the new PID namespace; the kernel-wide knobs read-only.
    let proc_flags = nosuid_nodev | g::MS_NOEXEC;
    mount_fs(c"proc", c"proc", proc_flags, c"", Stage::MountProc)?;
    for sub in [c"proc/sys", c"proc/sysrq-trigger", c"proc/irq", c"proc/bus"] {
        if exists(sub) {
            let attrs = RO | MOUNT_ATTR_NOEXEC;
            bind(CWD, sub, sub, true, attrs, false, Stage::MountProc)?;
        }
    }
    // /run/hive: the CA bundle and the masks used to hide secrets.
    write_file(plan.ca_bundle_rel, plan.ca_bundle, 0o444)?;
    write_file(HIDDEN_FILE, &[], 0)?;
    mkdir(HIDDEN_DIR, 0, Stage::WriteFile)?;
    // Configured mounts, parents first.
    for (m, fuse_fd) in plan.mounts.iter().zip(plan.fuse_fds.iter().copied()) {
        let fd = fds.next().unwrap_or(-1);
        configured_mount(m, fd, fuse_fd)?;
    }
    for fd in plan.source_fds.iter().copied().filter(|fd| *fd >= 0) {
        let _ = sys::close(fd);
    }
    // 4. Switch roots.
    sys::pivot_root(c".", c".").at(Stage::PivotRoot)?;
    sys::umount2(c".", g::MNT_DETACH).at(Stage::PivotRoot)?;
    sys::chdir_cstr(c"/").at(Stage::PivotRoot)?;
    // 5. Secrets and CA bundle, resolved inside the new root.
    for h in plan.hidden {
        let src = if h.is_dir { HIDDEN_DIR } else { HIDDEN_FILE };
        if exists(h.path) {
            let attrs = RO | MOUNT_ATTR_NOEXEC;
            bind(CWD, src, h.path, false, attrs, false, Stage::HideSecret)?;
        }
    }
    for target in plan.ca_targets {
        if is_regular_file(target) {
            let (ca, attrs) = (plan.ca_bundle_rel, RO | MOUNT_ATTR_NOEXEC);
            bind(CWD, ca, target, false, attrs, true, Stage::BindCaBundle)?;
        }
    }
    Ok(())
}

/// One configured mount: its mount point, then the FUSE connection, the idmapped tree, the
/// source (`fd`) or nothing (a placeholder).
fn configured_mount(m: &Mount<'_>, fd: i32, fuse_fd: i32) -> SetupResult {
    for d in m.mkdirs.iter() {
        mkdir(d, 0o755, Stage::BindConfigured)?;
    }
    if m.is_file {
        touch(m.target_rel, 0o644, Stage::BindConfigured)?;
    }
    if m.fuse {
        mount_fuse(fuse_fd, m.target_rel)?;
    } else if m.placeholder {
        // Only the mount point: nothing of the source is shown there.
    } else if m.tree >= 0 {
        // Idmapped by the parent, flags already set: attach as is (this child's copy of the fd
        // is closed after; the parent keeps its own).
        let flags = g::MOVE_MOUNT_F_EMPTY_PATH;
        sys::move_mount(m.tree, c"", CWD, m.target_rel, flags).at(Stage::BindConfigured)?;
        let _ = sys::close(m.tree);
    } else {
        let attrs = if m.writable { RW } else { RO };
        bind(
            fd,
            c"",
            m.target_rel,
            true,
            attrs,
            false,
            Stage::BindConfigured,
        )?;
    }
    Ok(())
}

/// Writes the generated `/etc/resolv.conf` and `/etc/hosts` under `/run/hive` and shows them at
/// their `/etc` paths (cwd is the new `/`, not yet read-only): bound over the host's file, or,
/// where the host's entry is a symlink into `/run`, as a symlink created at its target.
pub fn etc_files(files: &[EtcFile<'_>]) -> SetupResult {
    for file in files {
        write_file(file.staged, file.data, 0o444)?;
        match file.target {
            EtcTarget::Bind(target) => {
                if is_regular_file(target) {
                    let attrs = RO | MOUNT_ATTR_NOEXEC;
                    bind(
                        CWD,
                        file.staged,
                        target,
                        false,
                        attrs,
                        true,
                        Stage::WriteFile,
                    )?;
                }
            }
            EtcTarget::Symlink { mkdirs, link } => {
                for d in mkdirs.iter() {
                    mkdir(d, 0o755, Stage::WriteFile)?;
                }
                symlink(file.staged_abs, link, Stage::WriteFile)?;
            }
            EtcTarget::Skip => {}
        }
    }
    Ok(())
}

/// Adds the Landlock rules for the tree [`build_root`] made (cwd is the new `/`). The ruleset
/// fd is shared with the parent, so the rules land in the object the parent keeps and hands
/// to every spawn.
pub fn landlock_rules(plan: &Plan<'_>) -> SetupResult {
    let (fd, handled) = (plan.landlock_fd, plan.landlock_fs);
    if fd < 0 {
        return Ok(());
    }
    let rule = |path: &CStr, access: u64| add_rule(fd, handled, path, access, false);
    let dev_rw = READ_FILE | WRITE_FILE | IOCTL_DEV;
    rule(c"/", READ_DIR)?;
    for entry in plan.system {
        if let SystemEntry::Dir { name, .. } = entry {
            rule(name, READ_EXEC)?;
        }
    }
    rule(c"etc", READ_FILE | READ_DIR)?;
    rule(c"run/hive", READ_FILE | READ_DIR)?;
    rule(c"proc", READ_FILE | READ_DIR)?;
    for dir in [c"tmp", c"root", c"dev/shm"] {
        rule(dir, ALL)?;
    }
    rule(c"dev", READ_DIR)?;
    for dev in plan.dev_nodes {
        rule(dev.rel, dev_rw)?;
    }
    rule(c"dev/pts", dev_rw | READ_DIR)?;
    for m in plan.mounts {
        if m.fuse {
            // The server decides every access; Landlock only keeps the mount itself usable. No
            // `stat`: the mount is not served yet, a request would wait forever (opening with
            // `O_PATH` sends none).
            add_rule(fd, handled, m.target_rel, ALL, true)?;
        } else if m.binds_source() {
            rule(m.target_rel, if m.writable { ALL } else { READ_EXEC })?;
        }
    }
    Ok(())
}

/// Adds a rule granting `access` (masked to `handled`, and to file rights on a file) beneath
/// `path`. A path that does not exist is skipped.
fn add_rule(ruleset: i32, handled: u64, path: &CStr, access: u64, known_dir: bool) -> SetupResult {
    let Ok(fd) = sys::openat(CWD, path, g::O_PATH | g::O_CLOEXEC, 0) else {
        return Ok(());
    };
    let r = add_rule_at(ruleset, handled, fd, access, known_dir);
    let _ = sys::close(fd);
    r
}

fn add_rule_at(ruleset: i32, handled: u64, fd: i32, access: u64, known_dir: bool) -> SetupResult {
    let mut allowed = access & handled;
    if !known_dir {
        let kind = sys::file_type_at(fd, c"", g::AT_EMPTY_PATH).at(Stage::LandlockRule)?;
        if kind != g::S_IFDIR {
            allowed &= FILE_RIGHTS;
        }
    }
    let attr = ll::landlock_path_beneath_attr {
        allowed_access: allowed,
        parent_fd: fd,
    };
    sys::landlock_add_path_rule(ruleset, &attr).at(Stage::LandlockRule)?;
    Ok(())
}

/// Opens `/dev/fuse` once per FUSE mount into `fuse_fds` (same index as `mounts`), *before*
/// the switch to the sandbox's uid 0.
///
/// The kernel only mounts a FUSE fd opened in the mount's own user namespace, and `/dev/fuse` is
/// often `0600 root`: as root, the child still holds the host's uid here (owner match, no
/// capability needed); unprivileged, this works where `/dev/fuse` is usable by the caller. The
/// parent checked that FUSE is available first, so a failure here is reported as unenforceable.
pub fn open_fuse(mounts: &[Mount<'_>], fuse_fds: &mut [i32]) -> SetupResult {
    for (_, slot) in mounts
        .iter()
        .zip(fuse_fds.iter_mut())
        .filter(|(m, _)| m.fuse)
    {
        *slot = sys::openat(CWD, c"/dev/fuse", g::O_RDWR | g::O_CLOEXEC, 0).at(Stage::OpenFuse)?;
    }
    Ok(())
}

/// Options of a sandbox FUSE mount after `fd=<n>`: the sandbox's root owns the connection and
/// every process of the sandbox may use it; no `default_permissions` (the server decides).
const FUSE_OPTIONS_TAIL: &[u8] = b",rootmode=40000,user_id=0,group_id=0,allow_other\0";

/// Mounts the FUSE connection `fuse_fd` at `target` (relative to the cwd), `nosuid,nodev`.
/// Nothing may touch the mount afterwards until the host serves it: any request would wait.
fn mount_fuse(fuse_fd: i32, target: &CStr) -> SetupResult {
    let invalid = Fail {
        stage: Stage::MountFuse,
        errno: sys::EINVAL as i32,
    };
    let mut data = [0u8; 96];
    let len = fuse_options(fuse_fd, &mut data).ok_or(invalid)?;
    let data = CStr::from_bytes_with_nul(data.get(..len).unwrap_or(&[])).map_err(|_| invalid)?;
    let flags = g::MS_NOSUID | g::MS_NODEV;
    sys::mount(Some(c"hive"), target, Some(c"fuse.hive"), flags, Some(data))
        .at(Stage::MountFuse)?;
    Ok(())
}

/// Writes `fd=<fd>` + [`FUSE_OPTIONS_TAIL`] into `out`; the length with the NUL, or `None` if it
/// does not fit or `fd` is negative.
fn fuse_options(fd: i32, out: &mut [u8]) -> Option<usize> {
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
pub fn root_read_only() -> SetupResult {
    set_attr(CWD, c"/", 0, MOUNT_ATTR_RDONLY).at(Stage::RemountRootRo)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fuse_options_are_written_without_allocating() {
        let tail = ",rootmode=40000,user_id=0,group_id=0,allow_other";
        for (fd, digits) in [
            (0, Some("0")),
            (7, Some("7")),
            (1234, Some("1234")),
            (-1, None),
        ] {
            let mut buf = [0u8; 96];
            let got = fuse_options(fd, &mut buf)
                .map(|len| CStr::from_bytes_with_nul(&buf[..len]).expect("NUL-terminated"));
            let got = got.map(|s| s.to_bytes());
            match digits {
                Some(d) => {
                    let want = [b"fd=".as_slice(), d.as_bytes(), tail.as_bytes()];
                    let want_len: usize = want.iter().map(|p| p.len()).sum();
                    let got = got.expect("fits");
                    assert_eq!(got.len(), want_len, "{fd}");
                    let mut at = 0;
                    for part in want {
                        assert_eq!(&got[at..at + part.len()], part, "{fd}");
                        at += part.len();
                    }
                }
                None => assert!(got.is_none(), "{fd}"),
            }
        }
        let mut small = [0u8; 8];
        assert_eq!(fuse_options(1, &mut small), None);
    }

    #[test]
    fn abi1_covers_execute_to_make_sym() {
        assert_eq!(rights::ABI1_ALL, (1 << 13) - 1);
        assert_eq!(rights::REFER, 1 << 13);
        assert_eq!(rights::TRUNCATE, 1 << 14);
        assert_eq!(rights::IOCTL_DEV, 1 << 15);
    }
}
