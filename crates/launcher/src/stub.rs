//! The last steps before `hive-init` runs: code the addon calls in a child right after `clone`.
//!
//! Both stubs put file descriptors where `hive-init` expects them and `execveat` the sealed memfd
//! holding it. They run in a child that shares the host's memory (`CLONE_VM | CLONE_VFORK`, the
//! spawn helper) or is a copy of it (the sandbox's setup child), so they allocate nothing, take no
//! lock, touch no thread-local state and never return.
//!
//! File descriptors are first copied above [`HIGH`] (close-on-exec), then `dup3`'d into their
//! slots: a source already sitting in a slot another one needs is never clobbered. Every other
//! descriptor the child inherited from the host is closed before the exec.

use crate::stage::{encode_report, Stage};
use crate::sys::{self, StrArray};

/// Copies are made at or above this descriptor number.
const HIGH: i32 = 64;

/// Descriptor slots of the spawn shim ([`crate::spawn`]).
pub mod slot {
    /// The workload's stdin (read end), stdout and stderr (write ends): 0, 1, 2.
    pub const STDIO: i32 = 0;
    /// Exec-status pipe (write end): a report on failure, EOF once the workload has exec'd.
    pub const ERR: i32 = 3;
    /// The workload's pid (host view), 4 bytes little endian.
    pub const PID: i32 = 4;
    /// The sandbox's namespaces, user namespace first, PID namespace last (7 fds).
    pub const NS: i32 = 5;
    /// How many namespace fds follow [`NS`].
    pub const NS_COUNT: i32 = 7;
    /// The Landlock ruleset, when the shim's flags say there is one.
    pub const LANDLOCK: i32 = 12;
    /// The seccomp programs ([`crate::spawn::SeccompImage`]).
    pub const SECCOMP: i32 = 13;
    /// A file of each sandbox cgroup the shim joins by writing `0` to it, open for writing:
    /// `tasks` on cgroup v1 (moves only the writing thread, which the single-threaded shim is,
    /// without the kernel's global migration lock), else `cgroup.procs`. Unused slots stay
    /// closed.
    pub const CGROUPS: i32 = 14;
    /// How many cgroup slots follow [`CGROUPS`].
    pub const CGROUPS_COUNT: i32 = 6;
    /// The command's own cgroup v2 directory (`O_DIRECTORY`), which the workload is forked into
    /// (`clone3` with `CLONE_INTO_CGROUP`), or closed.
    pub const CGROUP_INTO: i32 = 20;
    /// Number of slots the host fills (0 ..= 20).
    pub const COUNT: usize = 21;
    /// The `hive-init` image itself, close-on-exec.
    pub const IMAGE: i32 = 21;
}

/// What [`exec_spawn_shim`] needs, prepared by the parent before `clone`.
pub struct ShimExec {
    /// The sealed memfd holding `hive-init`.
    pub image: i32,
    /// The parent's descriptor for each slot of [`slot`] (`-1`: leave the slot closed).
    pub fds: [i32; slot::COUNT],
    /// `hive-init spawn ...` ([`crate::spawn`] documents the layout).
    pub argv: StrArray,
    /// The workload's environment.
    pub envp: StrArray,
}

/// Lays out the descriptors and executes the spawn shim. On failure a report goes to the
/// exec-status pipe and the child exits with 127.
///
/// # Safety
/// Only in a child that will never return to the caller's frames (a `clone` entry point);
/// `p.argv` and `p.envp` must be valid NULL-terminated string arrays.
pub unsafe fn exec_spawn_shim(p: &ShimExec) -> ! {
    let report_to = |fd: i32, stage: Stage, e: sys::Errno| -> ! {
        sys::write_all(fd, &encode_report(stage, e.0));
        sys::exit(127)
    };
    let mut high = [-1i32; slot::COUNT];
    for (h, fd) in high.iter_mut().zip(p.fds.iter()) {
        if *fd >= 0 {
            match sys::dup_cloexec_above(*fd, HIGH) {
                Ok(copy) => *h = copy,
                Err(e) => report_to(p.fds[slot::ERR as usize], Stage::SpawnPlan, e),
            }
        }
    }
    let err = high[slot::ERR as usize];
    let image = match sys::dup_cloexec_above(p.image, HIGH) {
        Ok(fd) => fd,
        Err(e) => report_to(err, Stage::ExecInit, e),
    };
    for (target, h) in (0i32..).zip(high.iter()) {
        let r = if *h >= 0 {
            sys::dup3(*h, target, 0)
        } else {
            // Nothing of the host may sit in an unused slot.
            Ok(sys::close(target).unwrap_or(0))
        };
        if let Err(e) = r {
            report_to(err, Stage::SpawnPlan, e);
        }
    }
    if let Err(e) = sys::dup3(image, slot::IMAGE, sys::O_CLOEXEC) {
        report_to(err, Stage::ExecInit, e);
    }
    let _ = sys::close_range(slot::IMAGE as u32 + 1, u32::MAX, 0);
    // SAFETY: the caller vouches for argv and envp.
    let e = unsafe { sys::execveat_fd(slot::IMAGE, p.argv, p.envp) };
    report_to(slot::ERR, Stage::ExecInit, e)
}

/// Executes `hive-init init` with the control socket `ctrl` as fd 0 and nothing else open: the
/// sandbox's setup child becomes its PID 1 ([`crate::init`]). Returns only on failure, after
/// reporting it on `ctrl`.
///
/// # Safety
/// Only in the sandbox's setup child, after its last use of anything but `image` and `ctrl`.
pub unsafe fn exec_init(image: i32, ctrl: i32) -> sys::Errno {
    let fail = |fd: i32, e: sys::Errno| {
        sys::write_all(fd, &encode_report(Stage::ExecInit, e.0));
        e
    };
    let (ctrl_high, image_high) = match (
        sys::dup_cloexec_above(ctrl, HIGH),
        sys::dup_cloexec_above(image, HIGH),
    ) {
        (Ok(c), Ok(i)) => (c, i),
        (Err(e), _) | (_, Err(e)) => return fail(ctrl, e),
    };
    if let Err(e) = sys::dup3(ctrl_high, 0, 0) {
        return fail(ctrl, e);
    }
    if let Err(e) = sys::dup3(image_high, 3, sys::O_CLOEXEC) {
        return fail(0, e);
    }
    let _ = sys::close_range(1, 2, 0);
    let _ = sys::close_range(4, u32::MAX, 0);
    let argv = [
        c"hive-init".as_ptr().cast::<u8>(),
        c"init".as_ptr().cast::<u8>(),
        core::ptr::null(),
    ];
    let envp = [core::ptr::null::<u8>()];
    // SAFETY: both arrays are NULL-terminated and point at static C strings.
    let e = unsafe { sys::execveat_fd(3, argv.as_ptr(), envp.as_ptr()) };
    fail(0, e)
}

/// `clone` entry point of a child that only holds a namespace open for the parent: it closes
/// `write_fd`, waits for EOF on `read_fd` (the parent closes its write end when done) and exits.
/// `arg` packs the two fds: `read_fd | write_fd << 32`.
///
/// Raw syscalls only, no thread-local state: safe in a `CLONE_VM` child that runs while the
/// parent thread goes on (the parent writes the namespace's id maps meanwhile).
///
/// Meant only as the entry point of a `clone`d child (on a stack that outlives it): it never
/// returns, and it closes the fd it is given.
pub extern "C" fn hold_until_eof(arg: *mut core::ffi::c_void) -> i32 {
    let packed = arg as usize as u64;
    let read_fd = (packed & 0xffff_ffff) as i32;
    let write_fd = (packed >> 32) as i32;
    let _ = sys::close(write_fd);
    let mut byte = [0u8; 1];
    while let Err(sys::Errno(e)) = sys::read(read_fd, &mut byte) {
        if e != sys::EINTR as i32 {
            break;
        }
    }
    sys::exit(0)
}
