//! Landlock for the workload: which trees it may touch and how, plus abstract-socket and signal
//! scoping.
//!
//! 1. The parent creates the ruleset ([`create_ruleset`]): it handles every filesystem right the
//!    running kernel's ABI knows (best effort: older ABIs simply handle fewer rights) and, on ABI
//!    ≥ 6, scopes abstract unix sockets and signals.
//! 2. The setup child, after mounting and `pivot_root`, adds one rule per tree using the paths
//!    *inside* the sandbox (`hive_launcher::setup::fs::landlock_rules`). Landlock binds rules to
//!    inodes, so rules for the fresh `/proc`, `/tmp` and `/dev` cannot be made from host paths;
//!    doing all of them in the child keeps one path.
//!    The ruleset fd is shared with the parent, so the rules land in the object the parent keeps.
//! 3. Each workload calls `landlock_restrict_self` with it before exec (the spawn shim,
//!    `hive_launcher::spawn`, which receives the ruleset fd).
//!
//! Raw syscalls instead of the `landlock` crate: steps 2 and 3 run after `clone` and must not
//! allocate; the rights are the uapi's (`hive_launcher::setup::fs::rights`, from
//! `linux-raw-sys`).
//!
//! # Security
//! TCP port rules (ABI ≥ 4) are deliberately not used: the network namespace already has no route
//! anywhere, and a connect-port allow list cannot tell loopback peers apart, so it would only break
//! processes of one sandbox talking to each other over loopback. Scoping means
//! processes spawned separately into one sandbox cannot signal each other or connect to each
//! other's abstract unix sockets (each spawn is its own Landlock domain); pathname sockets in `/tmp`
//! work.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};

#[cfg(test)]
use hive_launcher::setup::fs::rights::READ_EXEC;
use hive_launcher::setup::fs::rights::{ABI1_ALL, IOCTL_DEV, REFER, TRUNCATE};

const SCOPE_ABSTRACT_UNIX_SOCKET: u64 = 1 << 0;
const SCOPE_SIGNAL: u64 = 1 << 1;

/// A created ruleset: the fd and the filesystem rights it handles.
pub(crate) struct Ruleset {
    pub fd: OwnedFd,
    pub handled_fs: u64,
}

/// The running kernel's Landlock ABI version, or `None` without Landlock.
pub(crate) fn abi_version() -> Option<i32> {
    const LANDLOCK_CREATE_RULESET_VERSION: libc::c_uint = 1;
    // SAFETY: a NULL attr with size 0 and the VERSION flag only queries.
    let v = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<u8>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    (v > 0).then_some(v as i32)
}

/// The filesystem rights ABI `abi` knows.
pub(crate) fn fs_rights(abi: i32) -> u64 {
    let mut r = ABI1_ALL;
    if abi >= 2 {
        r |= REFER;
    }
    if abi >= 3 {
        r |= TRUNCATE;
    }
    if abi >= 5 {
        r |= IOCTL_DEV;
    }
    r
}

/// Makes the launcher behave as on a kernel without Landlock (tests of the fail-closed path).
pub(crate) const DISABLE_ENV: &str = "HIVE_TEST_DISABLE_LANDLOCK";
/// Makes the launcher use at most this Landlock ABI (tests of older kernels, e.g. `1`: no
/// truncate and no refer right).
pub(crate) const ABI_ENV: &str = "HIVE_TEST_LANDLOCK_ABI";

/// The ABI the launcher uses: the kernel's, unless [`DISABLE_ENV`] is `1` (none) or [`ABI_ENV`]
/// asks for a lower one. Neither can give more than the kernel has, and nothing the file ACLs
/// promise depends on Landlock (docs/isolation.md), so a switch left set only costs the scoping.
pub(crate) fn launcher_abi() -> Option<i32> {
    if std::env::var(DISABLE_ENV).is_ok_and(|v| v == "1") {
        return None;
    }
    let kernel = abi_version()?;
    let wanted = std::env::var(ABI_ENV)
        .ok()
        .and_then(|v| v.parse::<i32>().ok())
        .filter(|abi| *abi >= 1);
    Some(wanted.map_or(kernel, |abi| abi.min(kernel)))
}

/// Creates the ruleset (parent side). `Ok(None)` when the kernel has no Landlock (or
/// [`DISABLE_ENV`] says to behave so).
pub(crate) fn create_ruleset() -> std::io::Result<Option<Ruleset>> {
    let Some(abi) = launcher_abi() else {
        return Ok(None);
    };
    #[repr(C)]
    struct Attr {
        handled_access_fs: u64,
        handled_access_net: u64,
        scoped: u64,
    }
    let handled_fs = fs_rights(abi);
    let attr = Attr {
        handled_access_fs: handled_fs,
        handled_access_net: 0,
        scoped: if abi >= 6 {
            SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL
        } else {
            0
        },
    };
    let size = if abi >= 6 { 24 } else { 8 };
    // SAFETY: attr is valid for `size` bytes.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            &attr as *const Attr,
            size as usize,
            0u32,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the syscall returned a new fd we own.
    Ok(Some(Ruleset {
        fd: unsafe { OwnedFd::from_raw_fd(fd as RawFd) },
        handled_fs,
    }))
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn rights_grow_with_the_abi() {
        for (abi, has_refer, has_truncate, has_ioctl) in [
            (1, false, false, false),
            (2, true, false, false),
            (3, true, true, false),
            (4, true, true, false),
            (5, true, true, true),
            (7, true, true, true),
        ] {
            let r = fs_rights(abi);
            assert_eq!(r & REFER != 0, has_refer, "abi {abi}");
            assert_eq!(r & TRUNCATE != 0, has_truncate, "abi {abi}");
            assert_eq!(r & IOCTL_DEV != 0, has_ioctl, "abi {abi}");
            assert_eq!(r & READ_EXEC, READ_EXEC, "abi {abi}");
        }
    }
}
