//! Code that runs after `clone`: the sandbox init's setup, the spawn helper and the workload.
//!
//! Everything here runs in a child of a multi-threaded process, so it follows async-signal-safe
//! rules:
//! 1. No allocation, no locks, no `std::io`, no formatting: only raw syscalls (`libc` wrappers that
//!    are single syscalls, or `libc::syscall`) on data the parent prepared ([`super::plan`]).
//! 2. Nothing may panic or unwind: no indexing that can go out of bounds, no `unwrap`. Every step
//!    returns [`Fail`] (a stage code and an errno, plain data), and the entry points report it as
//!    one fixed-size message to the parent and `_exit`.
//! 3. No code path returns into the caller's frames: every entry point ends in `_exit` or `execve`.
//!
//! # Security
//! The order in [`workload_main`] is what makes the confinement hold: `no_new_privs`, Landlock,
//! the capability drop and seccomp all happen after the last step that needs a capability and
//! before `execve`, so the program the caller named never runs with any privilege in the sandbox's
//! user namespace (isolation.md §3c: a capable process can remount a read-only bind read-write).
//!
//! The helper and the workload share the host's memory until `execve` (`CLONE_VM`, like
//! `posix_spawn`). Other processes of the sandbox cannot read it meanwhile: ptrace access
//! (`/proc/<pid>/mem`, `process_vm_readv`) needs a superset of the target's capabilities until the
//! drop, and Landlock (entered before the drop) denies it across domains after. On a kernel
//! without Landlock and with Yama's `ptrace_scope` at 0, the few syscalls between the drop and
//! `execve` remain a window.

use std::ffi::CStr;
use std::os::fd::RawFd;

use super::landlock;
use super::plan::{SpawnPlan, NS_ORDER};
use super::seccomp;

/// A failed step after `clone`: which step ([`Stage`]) and the errno it got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Fail {
    pub stage: Stage,
    pub errno: i32,
}

/// The steps a child can fail in; the numeric value crosses the process boundary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub(crate) enum Stage {
    Ok = 0,
    Handshake = 1,
    Hostname = 2,
    LoopbackUp = 3,
    Listener = 4,
    MountPrivate = 5,
    OpenSource = 6,
    MountRoot = 7,
    BindSystem = 8,
    MountTmpfs = 9,
    MountDev = 10,
    MountProc = 11,
    WriteFile = 12,
    BindConfigured = 13,
    PivotRoot = 14,
    HideSecret = 15,
    BindCaBundle = 16,
    LandlockRule = 17,
    RemountRootRo = 18,
    SendListener = 19,
    Setns = 20,
    Fork = 21,
    Stdio = 22,
    Chdir = 23,
    Signals = 24,
    Capabilities = 25,
    NoNewPrivs = 26,
    Landlock = 27,
    Seccomp = 28,
    CloseFds = 29,
    Exec = 30,
    Setsid = 31,
    Identity = 32,
    OpenFuse = 33,
    MountFuse = 34,
    /// Not a failure: one FUSE fd handed over before the final report (errno field: mount index).
    FuseHandover = 35,
    Routes = 36,
    DnsSocket = 37,
    /// Joining the sandbox's cgroups or setting its rlimits (limits.rs).
    Limits = 38,
    Unknown = 255,
}

impl Stage {
    /// Decodes a stage code received from a child.
    pub(crate) fn from_u32(v: u32) -> Stage {
        const ALL: [Stage; 39] = [
            Stage::Ok,
            Stage::Handshake,
            Stage::Hostname,
            Stage::LoopbackUp,
            Stage::Listener,
            Stage::MountPrivate,
            Stage::OpenSource,
            Stage::MountRoot,
            Stage::BindSystem,
            Stage::MountTmpfs,
            Stage::MountDev,
            Stage::MountProc,
            Stage::WriteFile,
            Stage::BindConfigured,
            Stage::PivotRoot,
            Stage::HideSecret,
            Stage::BindCaBundle,
            Stage::LandlockRule,
            Stage::RemountRootRo,
            Stage::SendListener,
            Stage::Setns,
            Stage::Fork,
            Stage::Stdio,
            Stage::Chdir,
            Stage::Signals,
            Stage::Capabilities,
            Stage::NoNewPrivs,
            Stage::Landlock,
            Stage::Seccomp,
            Stage::CloseFds,
            Stage::Exec,
            Stage::Setsid,
            Stage::Identity,
            Stage::OpenFuse,
            Stage::MountFuse,
            Stage::FuseHandover,
            Stage::Routes,
            Stage::DnsSocket,
            Stage::Limits,
        ];
        ALL.iter()
            .copied()
            .find(|s| *s as u32 == v)
            .unwrap_or(Stage::Unknown)
    }

    /// What the step does, for error messages built in the parent.
    pub(crate) fn describe(self) -> &'static str {
        match self {
            Stage::Ok => "ok",
            Stage::Handshake => "waiting for the parent",
            Stage::Hostname => "setting the hostname",
            Stage::LoopbackUp => "bringing up the loopback interface",
            Stage::Listener => "creating the proxy listener",
            Stage::MountPrivate => "making mounts private",
            Stage::OpenSource => "opening a mount source",
            Stage::MountRoot => "mounting the root tmpfs",
            Stage::BindSystem => "binding a system directory",
            Stage::MountTmpfs => "mounting a tmpfs",
            Stage::MountDev => "setting up /dev",
            Stage::MountProc => "mounting /proc",
            Stage::WriteFile => "writing a generated file",
            Stage::BindConfigured => "binding a configured mount",
            Stage::PivotRoot => "pivot_root",
            Stage::HideSecret => "hiding a secret file",
            Stage::BindCaBundle => "binding the CA bundle",
            Stage::LandlockRule => "adding a Landlock rule",
            Stage::RemountRootRo => "making / read-only",
            Stage::SendListener => "handing over the proxy listener",
            Stage::Setns => "joining the sandbox namespaces",
            Stage::Fork => "forking into the sandbox",
            Stage::Stdio => "setting up stdio",
            Stage::Chdir => "changing to the working directory",
            Stage::Signals => "resetting signal handlers",
            Stage::Capabilities => "dropping capabilities",
            Stage::NoNewPrivs => "setting no_new_privs",
            Stage::Landlock => "applying Landlock",
            Stage::Seccomp => "applying the seccomp filter",
            Stage::CloseFds => "closing inherited file descriptors",
            Stage::Exec => "executing the command",
            Stage::Setsid => "starting a new session",
            Stage::Identity => "switching to the sandbox's uid/gid 0",
            Stage::OpenFuse => "opening /dev/fuse",
            Stage::MountFuse => "mounting a FUSE file system",
            Stage::FuseHandover => "handing over a FUSE connection",
            Stage::Routes => "adding the capture routes",
            Stage::DnsSocket => "creating the DNS sockets",
            Stage::Limits => "applying the sandbox's resource limits",
            Stage::Unknown => "an unknown step",
        }
    }
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

/// Encodes a stage/errno report: 8 bytes, little endian.
pub(crate) fn encode_report(stage: Stage, errno: i32) -> [u8; 8] {
    let s = (stage as u32).to_le_bytes();
    let e = errno.to_le_bytes();
    [s[0], s[1], s[2], s[3], e[0], e[1], e[2], e[3]]
}

/// Decodes a report made by [`encode_report`].
pub(crate) fn decode_report(buf: &[u8; 8]) -> (Stage, i32) {
    let stage = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]);
    let errno = i32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
    (Stage::from_u32(stage), errno)
}

/// Writes all of `buf` to `fd`, ignoring errors (the reader sees a short message or EOF).
pub(crate) fn write_all(fd: RawFd, mut buf: &[u8]) {
    while !buf.is_empty() {
        // SAFETY: buf is a valid slice.
        let n = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
        if n < 0 {
            if errno() == libc::EINTR {
                continue;
            }
            return;
        }
        let n = n as usize;
        buf = buf.get(n..).unwrap_or(&[]);
    }
}

/// Reports `fail` on `fd` and exits. Never returns, never unwinds.
pub(crate) fn die(fd: RawFd, fail: Fail) -> ! {
    write_all(fd, &encode_report(fail.stage, fail.errno));
    // SAFETY: _exit is always safe to call.
    unsafe { libc::_exit(127) }
}

/// `clone3` with `flags` (no shared VM: fork semantics). Returns 0 in the child and the pid
/// (in the caller's pid namespace) in the parent; with `pidfd` set, `CLONE_PIDFD` fills it.
///
/// # Safety
/// Forks the calling (multi-threaded) process: the child must only run code from this module.
pub(crate) unsafe fn clone3(
    flags: u64,
    exit_signal: u64,
    pidfd: Option<&mut libc::c_int>,
) -> libc::c_long {
    #[repr(C)]
    struct CloneArgs {
        flags: u64,
        pidfd: u64,
        child_tid: u64,
        parent_tid: u64,
        exit_signal: u64,
        stack: u64,
        stack_size: u64,
        tls: u64,
    }
    let mut flags = flags;
    let pidfd_ptr = match pidfd {
        Some(p) => {
            flags |= libc::CLONE_PIDFD as u64;
            p as *mut libc::c_int as u64
        }
        None => 0,
    };
    let args = CloneArgs {
        flags,
        pidfd: pidfd_ptr,
        child_tid: 0,
        parent_tid: 0,
        exit_signal,
        stack: 0,
        stack_size: 0,
        tls: 0,
    };
    libc::syscall(
        libc::SYS_clone3,
        &args as *const CloneArgs,
        std::mem::size_of::<CloneArgs>(),
    )
}

/// The spawn helper: cloned from the launcher thread with `CLONE_VM | CLONE_VFORK` (it runs on
/// its own stack in the host's memory while the launcher thread waits), joins the sandbox's
/// namespaces and starts the workload as a sibling (`CLONE_PARENT`), so the workload is a direct
/// child of the host process (real exit status through `waitid`) while living in the sandbox's
/// PID namespace.
///
/// Writes the workload's pid (host view) to `plan.pid_pipe` and exits.
///
/// # Safety
/// Only call in a freshly forked child; never returns.
pub(crate) unsafe fn helper_main(plan: &SpawnPlan) -> ! {
    // Limits: join the sandbox's cgroups so the workload starts in them (limits.rs).
    if let Err(fail) = super::limits::join_cgroups(&plan.limits) {
        die(plan.err_pipe_w, fail);
    }
    // One namespace at a time, user namespace first: joining it grants the capabilities the
    // other joins need. The fds were opened by the parent before init made itself non-dumpable.
    for (fd, (_, nstype)) in plan.ns_fds.iter().zip(NS_ORDER.iter()) {
        if libc::syscall(libc::SYS_setns, *fd, *nstype) < 0 {
            die(
                plan.err_pipe_w,
                Fail {
                    stage: Stage::Setns,
                    errno: errno(),
                },
            );
        }
    }
    // The pid namespace switch applies to our children: start the workload in it, as a child of
    // our parent (the host process). CLONE_VM | CLONE_VFORK (like posix_spawn): the workload
    // borrows our memory until it execs instead of copying the page tables of what is a copy of
    // the whole host (Node's heap). It runs on the stack the parent allocated in the plan.
    let stack_top = plan.workload_stack.as_ptr().add(plan.workload_stack.len()) as usize & !0xf;
    let pid = libc::clone(
        workload_entry,
        stack_top as *mut libc::c_void,
        libc::CLONE_VM | libc::CLONE_VFORK | libc::CLONE_PARENT,
        plan as *const SpawnPlan as *mut libc::c_void,
    );
    if pid < 0 {
        die(
            plan.err_pipe_w,
            Fail {
                stage: Stage::Fork,
                errno: errno(),
            },
        );
    }
    write_all(plan.pid_pipe_w, &(pid as i32).to_le_bytes());
    libc::_exit(0)
}

/// `clone` entry point of the spawn helper (on its own stack, sharing the host's memory).
pub(crate) extern "C" fn helper_entry(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: arg is the launcher's &SpawnPlan, alive while the launcher waits (CLONE_VFORK).
    unsafe { helper_main(&*(arg as *const SpawnPlan)) }
}

/// `clone` entry point of the workload (on its own stack, sharing the helper's memory).
extern "C" fn workload_entry(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: arg is the helper's &SpawnPlan, alive while the helper waits (CLONE_VFORK).
    unsafe { workload_main(&*(arg as *const SpawnPlan)) }
}

/// The workload: confines itself, then `execve`s the command. On failure reports on the
/// error pipe (`O_CLOEXEC`, so a successful exec closes it and the parent reads EOF).
///
/// # Safety
/// Only call in a freshly forked child; never returns.
pub(crate) unsafe fn workload_main(plan: &SpawnPlan) -> ! {
    let fail = match confine(plan) {
        Ok(()) => exec(plan),
        Err(f) => f,
    };
    die(plan.err_pipe_w, fail)
}

/// Confinement steps, in order (see the module doc).
unsafe fn confine(plan: &SpawnPlan) -> CResult {
    // 1. Signals: the launcher blocked them all before cloning (the host's handlers must never
    //    run here: until exec this process shares the host's memory). Reset every disposition
    //    (Rust and Node ignore SIGPIPE, and ignored dispositions survive execve), then unblock.
    for sig in 1..=64 {
        if sig != libc::SIGKILL && sig != libc::SIGSTOP {
            libc::signal(sig, libc::SIG_DFL);
        }
    }
    let mut set: libc::sigset_t = std::mem::zeroed();
    libc::sigemptyset(&mut set);
    check_i(
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut()),
        Stage::Signals,
    )?;
    // 2. New session: no controlling terminal, so TIOCSTI has nothing to inject into.
    check_i(libc::setsid(), Stage::Setsid)?;
    // 3. stdio: move the pipe ends high first so dup2 cannot clobber one with another.
    let mut high = [-1; 3];
    for (slot, fd) in high.iter_mut().zip(plan.stdio.iter()) {
        *slot = check_i(libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, 10), Stage::Stdio)?;
    }
    for (target, fd) in high.iter().enumerate() {
        check_i(libc::dup2(*fd, target as libc::c_int), Stage::Stdio)?;
    }
    // 4. Working directory (inside the sandbox's mount namespace; setns put us at its root).
    check_i(libc::chdir(plan.cwd.as_ptr()), Stage::Chdir)?;
    // 5. Identity: uid/gid 0 of the sandbox (setns keeps the host ids, which may be unmapped).
    become_sandbox_root()?;
    // 5b. Limits: the planned rlimits, after the uid switch (limits.rs).
    super::limits::apply_rlimits(&plan.limits)?;
    // 6. no_new_privs: no setuid gains; required for seccomp.
    check_i(
        libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0),
        Stage::NoNewPrivs,
    )?;
    // 7. Landlock (ruleset completed by init with the sandbox-side paths), *before* the
    //    capability drop: until exec this process shares the host's memory, and another sandboxed
    //    process may only ptrace-access it (/proc/<pid>/mem) if its capabilities are a superset
    //    (false while we still hold ours) and Landlock allows it (never, once we are in our own
    //    domain). This order leaves no window between the two.
    if plan.landlock_fd >= 0 {
        landlock::restrict_self(plan.landlock_fd)?;
    }
    // 8. Capabilities: lock root's special treatment off, empty every set.
    drop_capabilities()?;
    // 9. Every inherited fd above 2 is closed at exec (CLOEXEC keeps the error pipe until then).
    let ret = libc::syscall(
        libc::SYS_close_range,
        3 as libc::c_uint,
        libc::c_uint::MAX,
        libc::CLOSE_RANGE_CLOEXEC as libc::c_uint,
    );
    check(ret, Stage::CloseFds)?;
    // 10. seccomp last: from here on only execve, write and _exit are needed.
    seccomp::apply(plan.seccomp)?;
    Ok(())
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

/// Empties the bounding, ambient, inheritable, permitted and effective sets and locks the
/// securebits so that uid 0 (inside) gains nothing at execve.
unsafe fn drop_capabilities() -> CResult {
    const SECBIT_NOROOT: libc::c_ulong = 1 << 0;
    const SECBIT_NOROOT_LOCKED: libc::c_ulong = 1 << 1;
    const SECBIT_NO_SETUID_FIXUP: libc::c_ulong = 1 << 2;
    const SECBIT_NO_SETUID_FIXUP_LOCKED: libc::c_ulong = 1 << 3;
    const SECBIT_KEEP_CAPS_LOCKED: libc::c_ulong = 1 << 5;
    const SECBIT_NO_CAP_AMBIENT_RAISE: libc::c_ulong = 1 << 6;
    const SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED: libc::c_ulong = 1 << 7;
    let bits = SECBIT_NOROOT
        | SECBIT_NOROOT_LOCKED
        | SECBIT_NO_SETUID_FIXUP
        | SECBIT_NO_SETUID_FIXUP_LOCKED
        | SECBIT_KEEP_CAPS_LOCKED
        | SECBIT_NO_CAP_AMBIENT_RAISE
        | SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED;
    check_i(
        libc::prctl(libc::PR_SET_SECUREBITS, bits, 0, 0, 0),
        Stage::Capabilities,
    )?;
    check_i(
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        ),
        Stage::Capabilities,
    )?;
    for cap in 0..64 {
        if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) < 0 && errno() != libc::EINVAL {
            return Err(Fail {
                stage: Stage::Capabilities,
                errno: errno(),
            });
        }
    }
    #[repr(C)]
    struct CapHeader {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    struct CapData {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
    let header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [
        CapData {
            effective: 0,
            permitted: 0,
            inheritable: 0,
        },
        CapData {
            effective: 0,
            permitted: 0,
            inheritable: 0,
        },
    ];
    check(
        libc::syscall(libc::SYS_capset, &header, data.as_ptr()),
        Stage::Capabilities,
    )?;
    Ok(())
}

/// `execve` of the command: the parent resolved the candidate paths (argv[0] itself if it has a
/// slash, else each `PATH` entry joined with it); try them in order like `execvp`.
unsafe fn exec(plan: &SpawnPlan) -> Fail {
    let mut last = libc::ENOENT;
    let mut seen_eacces = false;
    for candidate in plan.exec_candidates.iter() {
        libc::execve(
            candidate.as_ptr(),
            plan.argv_ptrs.as_ptr(),
            plan.envp_ptrs.as_ptr(),
        );
        let e = errno();
        match e {
            libc::ENOENT | libc::ENOTDIR | libc::ELOOP | libc::ENAMETOOLONG => {}
            libc::EACCES => seen_eacces = true,
            _ => {
                return Fail {
                    stage: Stage::Exec,
                    errno: e,
                }
            }
        }
        last = e;
    }
    if seen_eacces {
        last = libc::EACCES;
    }
    Fail {
        stage: Stage::Exec,
        errno: last,
    }
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
