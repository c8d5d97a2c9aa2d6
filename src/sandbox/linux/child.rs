//! Code that runs in the sandbox's setup child after `clone` (a copy of the host process): the
//! helpers [`super::init`], [`super::mounts`], [`super::netns`] and [`super::capture`] share.
//!
//! It runs in a child of a multi-threaded process, so it follows async-signal-safe rules:
//! 1. No allocation, no locks, no `std::io`, no formatting: only raw syscalls (`libc` wrappers that
//!    are single syscalls, or `libc::syscall`) on data the parent prepared ([`super::plan`]).
//! 2. Nothing may panic or unwind: no indexing that can go out of bounds, no `unwrap`. Every step
//!    returns [`Fail`] (a stage code and an errno, plain data), and the entry points report it as
//!    one fixed-size message to the parent and `_exit`.
//! 3. No code path returns into the caller's frames: every entry point ends in `_exit` or an exec.
//!
//! The spawn path no longer runs here: the spawn helper executes `hive-init spawn` at once, and
//! the workload's confinement lives in the `hive-launcher` crate (`hive_launcher::spawn`), where
//! `no_std` makes the compiler enforce these rules. This setup code is what is left to move there.

use std::ffi::CStr;

pub(crate) use hive_launcher::{decode_report, encode_report, Stage};

/// A failed step after `clone`: which step ([`Stage`]) and the errno it got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Fail {
    pub stage: Stage,
    pub errno: i32,
}

/// Result type of child-side steps.
pub(crate) type CResult<T = ()> = Result<T, Fail>;

/// The calling thread's errno.
pub(crate) fn errno() -> i32 {
    // SAFETY: __errno_location returns a valid thread-local pointer.
    unsafe { *libc::__errno_location() }
}

/// Turns a `-1` return into a [`Fail`] at `stage`.
pub(crate) fn check(ret: libc::c_long, stage: Stage) -> CResult<libc::c_long> {
    if ret < 0 {
        Err(Fail {
            stage,
            errno: errno(),
        })
    } else {
        Ok(ret)
    }
}

/// Same as [`check`] for `c_int` returns.
pub(crate) fn check_i(ret: libc::c_int, stage: Stage) -> CResult<libc::c_int> {
    check(ret as libc::c_long, stage).map(|v| v as libc::c_int)
}

/// Switches to uid/gid 0 of the current user namespace and drops supplementary groups where
/// `setgroups` is allowed (root parents leave it allowed; unprivileged ones must deny it, and
/// then the caller's own groups stay).
///
/// Raw syscalls on purpose: glibc's `setresuid` & co. broadcast the change to every thread it
/// believes exists (SETXID), and after `clone` from a multi-threaded parent those threads do not
/// exist: the call would wait for them forever.
pub(crate) unsafe fn become_sandbox_root() -> CResult {
    libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>());
    check(libc::syscall(libc::SYS_setresgid, 0, 0, 0), Stage::Identity)?;
    check(libc::syscall(libc::SYS_setresuid, 0, 0, 0), Stage::Identity)?;
    Ok(())
}

/// Writes `data` into a new file `path` (relative to the cwd) with `mode`.
pub(crate) unsafe fn write_file(path: &CStr, data: &[u8], mode: libc::mode_t) -> CResult {
    let fd = check_i(
        libc::open(
            path.as_ptr(),
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_CLOEXEC,
            mode as libc::c_uint,
        ),
        Stage::WriteFile,
    )?;
    let mut rest = data;
    while !rest.is_empty() {
        let n = libc::write(fd, rest.as_ptr().cast(), rest.len());
        if n < 0 {
            let e = errno();
            if e == libc::EINTR {
                continue;
            }
            libc::close(fd);
            return Err(Fail {
                stage: Stage::WriteFile,
                errno: e,
            });
        }
        rest = rest.get(n as usize..).unwrap_or(&[]);
    }
    libc::close(fd);
    Ok(())
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn report_round_trips() {
        for (stage, errno) in [
            (Stage::Ok, 0),
            (Stage::Exec, libc::ENOENT),
            (Stage::LoopbackUp, libc::EPERM),
            (Stage::Setsid, 1),
        ] {
            assert_eq!(decode_report(&encode_report(stage, errno)), (stage, errno));
        }
    }

    #[test]
    fn unknown_stage_decodes_to_unknown() {
        assert_eq!(Stage::from_u32(9999), Stage::Unknown);
    }
}
