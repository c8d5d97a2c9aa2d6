//! A small typed syscall layer: raw `syscall` instructions (no libc, so no `errno` in thread-local
//! storage and nothing that could take a lock or allocate), numbers and constants from
//! `linux-raw-sys` (the kernel's uapi headers), and one function per call the launcher makes.
//!
//! Every wrapper returns `Result<usize, Errno>`: the kernel reports an error as a return value
//! in `-4095..=-1`, which is decoded here instead of being stored anywhere.
//!
//! # Security
//! Code that runs in a `CLONE_VM` child of the host shares the host thread's thread-local storage
//! (the child has no TLS of its own): libc's wrappers would write `errno` there, racing with the
//! host. These wrappers touch no memory but their arguments.

use core::arch::asm;
use core::ffi::CStr;

use linux_raw_sys::errno as e;
use linux_raw_sys::general as g;

/// An error number from the kernel (`EPERM`, `ENOENT`, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Errno(pub i32);

/// What every wrapper returns.
pub type SysResult<T = usize> = Result<T, Errno>;

/// Decodes a raw return value.
fn check(ret: isize) -> SysResult {
    if (-4095..0).contains(&ret) {
        Err(Errno(-ret as i32))
    } else {
        Ok(ret as usize)
    }
}

/// Issues syscall `nr` with six arguments (unused ones are ignored by the kernel).
///
/// # Safety
/// The arguments must be what syscall `nr` expects: pointers valid for the access the kernel
/// makes through them, for as long as it makes it.
#[inline(always)]
pub unsafe fn syscall6(nr: u32, a: [usize; 6]) -> isize {
    let ret: isize;
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the caller passes a valid syscall; rcx and r11 are clobbered by `syscall`.
    unsafe {
        asm!(
            "syscall",
            inlateout("rax") nr as isize => ret,
            in("rdi") a[0], in("rsi") a[1], in("rdx") a[2],
            in("r10") a[3], in("r8") a[4], in("r9") a[5],
            lateout("rcx") _, lateout("r11") _,
            options(nostack),
        );
    }
    #[cfg(target_arch = "aarch64")]
    // SAFETY: the caller passes a valid syscall; `svc 0` clobbers only x0.
    unsafe {
        asm!(
            "svc 0",
            in("x8") nr as usize,
            inlateout("x0") a[0] as isize => ret,
            in("x1") a[1], in("x2") a[2], in("x3") a[3], in("x4") a[4], in("x5") a[5],
            options(nostack),
        );
    }
    #[cfg(target_arch = "riscv64")]
    // SAFETY: the caller passes a valid syscall; `ecall` clobbers only a0.
    unsafe {
        asm!(
            "ecall",
            in("a7") nr as usize,
            inlateout("a0") a[0] as isize => ret,
            in("a1") a[1], in("a2") a[2], in("a3") a[3], in("a4") a[4], in("a5") a[5],
            options(nostack),
        );
    }
    ret
}

/// [`syscall6`], decoded.
///
/// # Safety
/// As [`syscall6`].
#[inline(always)]
unsafe fn sys(nr: u32, a: [usize; 6]) -> SysResult {
    // SAFETY: forwarded to the caller.
    check(unsafe { syscall6(nr, a) })
}

/// `write(fd, buf)`.
pub fn write(fd: i32, buf: &[u8]) -> SysResult {
    // SAFETY: buf is valid for reads of buf.len() bytes.
    unsafe {
        sys(
            g::__NR_write,
            [fd as usize, buf.as_ptr() as usize, buf.len(), 0, 0, 0],
        )
    }
}

/// `read(fd, buf)`.
pub fn read(fd: i32, buf: &mut [u8]) -> SysResult {
    // SAFETY: buf is valid for writes of buf.len() bytes.
    unsafe {
        sys(
            g::__NR_read,
            [fd as usize, buf.as_mut_ptr() as usize, buf.len(), 0, 0, 0],
        )
    }
}

/// `pread64(fd, buf, offset)`: reads without moving the file offset, which is shared by every
/// process holding the same open file.
pub fn pread(fd: i32, buf: &mut [u8], offset: usize) -> SysResult {
    // SAFETY: buf is valid for writes of buf.len() bytes.
    unsafe {
        sys(
            g::__NR_pread64,
            [
                fd as usize,
                buf.as_mut_ptr() as usize,
                buf.len(),
                offset,
                0,
                0,
            ],
        )
    }
}

/// Writes all of `buf`, retrying short writes and `EINTR`; errors are dropped (the reader then
/// sees a short message or EOF).
pub fn write_all(fd: i32, mut buf: &[u8]) {
    while !buf.is_empty() {
        match write(fd, buf) {
            Ok(0) => return,
            Ok(n) => buf = buf.get(n..).unwrap_or(&[]),
            Err(Errno(e)) if e == e::EINTR as i32 => {}
            Err(_) => return,
        }
    }
}

/// Reads from offset 0 until `buf` is full or EOF ([`pread`]); returns how many bytes arrived.
pub fn pread_full(fd: i32, buf: &mut [u8]) -> SysResult {
    let mut got = 0;
    while let Some(rest) = buf.get_mut(got..).filter(|r| !r.is_empty()) {
        match pread(fd, rest, got) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(Errno(e)) if e == e::EINTR as i32 => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// `close(fd)`.
pub fn close(fd: i32) -> SysResult {
    // SAFETY: no pointers.
    unsafe { sys(g::__NR_close, [fd as usize, 0, 0, 0, 0, 0]) }
}

/// `CLOSE_RANGE_CLOEXEC` (`linux/close_range.h`): mark instead of close.
pub const CLOSE_RANGE_CLOEXEC: u32 = 1 << 2;

/// `close_range(first, last, flags)`.
pub fn close_range(first: u32, last: u32, flags: u32) -> SysResult {
    // SAFETY: no pointers.
    unsafe {
        sys(
            g::__NR_close_range,
            [first as usize, last as usize, flags as usize, 0, 0, 0],
        )
    }
}

/// `fcntl(fd, F_DUPFD_CLOEXEC, min)`: a close-on-exec copy of `fd` at `min` or above.
pub fn dup_cloexec_above(fd: i32, min: i32) -> SysResult<i32> {
    // SAFETY: no pointers.
    unsafe {
        sys(
            g::__NR_fcntl,
            [
                fd as usize,
                g::F_DUPFD_CLOEXEC as usize,
                min as usize,
                0,
                0,
                0,
            ],
        )
    }
    .map(|v| v as i32)
}

/// `fcntl(fd, F_SETFD, FD_CLOEXEC)`.
pub fn set_cloexec(fd: i32) -> SysResult {
    // SAFETY: no pointers.
    unsafe {
        sys(
            g::__NR_fcntl,
            [
                fd as usize,
                g::F_SETFD as usize,
                g::FD_CLOEXEC as usize,
                0,
                0,
                0,
            ],
        )
    }
}

/// `dup3(old, new, flags)` (`flags` 0 or `O_CLOEXEC`).
pub fn dup3(old: i32, new: i32, flags: u32) -> SysResult {
    // SAFETY: no pointers.
    unsafe {
        sys(
            g::__NR_dup3,
            [old as usize, new as usize, flags as usize, 0, 0, 0],
        )
    }
}

/// `O_CLOEXEC`, for [`dup3`].
pub const O_CLOEXEC: u32 = g::O_CLOEXEC;

/// A NULL-terminated array of pointers to NUL-terminated strings (`argv`, `envp`).
pub type StrArray = *const *const u8;

/// `execveat(dirfd, "", argv, envp, AT_EMPTY_PATH)`: executes the file `dirfd` refers to.
/// Returns only on failure.
///
/// # Safety
/// `argv` and `envp` must be valid NULL-terminated arrays of NUL-terminated strings.
pub unsafe fn execveat_fd(fd: i32, argv: StrArray, envp: StrArray) -> Errno {
    let empty = c"";
    // SAFETY: the caller vouches for argv/envp; the path is a valid empty C string.
    let r = unsafe {
        sys(
            g::__NR_execveat,
            [
                fd as usize,
                empty.as_ptr() as usize,
                argv as usize,
                envp as usize,
                g::AT_EMPTY_PATH as usize,
                0,
            ],
        )
    };
    r.err().unwrap_or(Errno(e::EINVAL as i32))
}

/// `execve(path, argv, envp)`. Returns only on failure.
///
/// # Safety
/// `path` must be a NUL-terminated string; `argv` and `envp` as in [`execveat_fd`].
pub unsafe fn execve(path: *const u8, argv: StrArray, envp: StrArray) -> Errno {
    // SAFETY: forwarded to the caller.
    let r = unsafe {
        sys(
            g::__NR_execve,
            [path as usize, argv as usize, envp as usize, 0, 0, 0],
        )
    };
    r.err().unwrap_or(Errno(e::EINVAL as i32))
}

/// `exit_group(code)`.
pub fn exit(code: i32) -> ! {
    loop {
        // SAFETY: no pointers; does not return.
        unsafe {
            syscall6(g::__NR_exit_group, [code as usize, 0, 0, 0, 0, 0]);
        }
    }
}

/// `setns(fd, nstype)`.
pub fn setns(fd: i32, nstype: u32) -> SysResult {
    // SAFETY: no pointers.
    unsafe { sys(g::__NR_setns, [fd as usize, nstype as usize, 0, 0, 0, 0]) }
}

/// A fork: `clone(flags)` without a new stack or `CLONE_VM`, so the child runs on a copy of the
/// caller's memory. Returns 0 in the child and the child's pid (in the caller's PID namespace)
/// in the parent.
///
/// Safe for this crate's single-threaded, lock-free programs: the child's copy holds no lock
/// another thread could own.
pub fn fork(flags: u32) -> SysResult<i32> {
    // Argument order differs between architectures after `flags` and the stack, all zero here.
    // SAFETY: no pointers; without CLONE_VM the child has its own copy of the stack.
    unsafe { sys(g::__NR_clone, [flags as usize, 0, 0, 0, 0, 0]) }.map(|v| v as i32)
}

/// `clone3` like [`fork`] (`flags` without an exit signal: used with `CLONE_PARENT`), the child
/// starting in the cgroup v2 directory `cgroup_dir` (`CLONE_INTO_CGROUP`, Linux 5.7): no
/// migration, so none of the global lock a write to `cgroup.procs` takes.
///
/// Safe for this crate's single-threaded, lock-free programs, as [`fork`].
pub fn fork_into_cgroup(flags: u32, cgroup_dir: i32) -> SysResult<i32> {
    let args = g::clone_args {
        flags: u64::from(flags) | g::CLONE_INTO_CGROUP,
        pidfd: 0,
        child_tid: 0,
        parent_tid: 0,
        exit_signal: 0,
        stack: 0,
        stack_size: 0,
        tls: 0,
        set_tid: 0,
        set_tid_size: 0,
        cgroup: cgroup_dir as u64,
    };
    // SAFETY: `args` is a valid clone_args of the size passed; no stack is given, so the child
    // runs on its own copy of the caller's stack (no CLONE_VM), as after fork.
    unsafe {
        sys(
            g::__NR_clone3,
            [
                &args as *const g::clone_args as usize,
                core::mem::size_of::<g::clone_args>(),
                0,
                0,
                0,
                0,
            ],
        )
    }
    .map(|v| v as i32)
}

/// `openat(dir, path, O_WRONLY | O_CLOEXEC)`.
pub fn open_write_at(dir: i32, path: &CStr) -> SysResult<i32> {
    // SAFETY: path is NUL-terminated; the kernel reads up to the NUL.
    unsafe {
        sys(
            g::__NR_openat,
            [
                dir as usize,
                path.as_ptr() as usize,
                (g::O_WRONLY | g::O_CLOEXEC) as usize,
                0,
                0,
                0,
            ],
        )
    }
    .map(|v| v as i32)
}

/// `setsid()`.
pub fn setsid() -> SysResult {
    // SAFETY: no pointers.
    unsafe { sys(g::__NR_setsid, [0; 6]) }
}

/// `chdir(path)`.
pub fn chdir(path: *const u8) -> SysResult {
    // SAFETY: path is a NUL-terminated string taken from the process's argv (see callers) or a
    // literal; the kernel reads up to the NUL.
    unsafe { sys(g::__NR_chdir, [path as usize, 0, 0, 0, 0, 0]) }
}

/// `chdir` to a literal path.
pub fn chdir_cstr(path: &CStr) -> SysResult {
    chdir(path.as_ptr().cast())
}

/// `setgroups(0, NULL)`: drops supplementary groups (refused where `setgroups` is denied).
pub fn clear_groups() -> SysResult {
    // SAFETY: an empty list.
    unsafe { sys(g::__NR_setgroups, [0; 6]) }
}

/// `setresgid(gid, gid, gid)`.
pub fn setresgid(gid: u32) -> SysResult {
    let gid = gid as usize;
    // SAFETY: no pointers.
    unsafe { sys(g::__NR_setresgid, [gid, gid, gid, 0, 0, 0]) }
}

/// `prlimit64(0, resource, new, old)` on the calling process: sets soft and hard limit to
/// `value`, never above the hard limit it had.
pub fn lower_rlimit(resource: u32, value: u64) -> SysResult {
    let mut old = [0u64; 2];
    // SAFETY: `old` is a writable `struct rlimit64` (two u64); no new limit is passed.
    unsafe {
        sys(
            g::__NR_prlimit64,
            [0, resource as usize, 0, old.as_mut_ptr() as usize, 0, 0],
        )
    }?;
    let v = value.min(old[1]);
    let new = [v, v];
    // SAFETY: `new` is a readable `struct rlimit64`; the old limit is not asked for.
    unsafe {
        sys(
            g::__NR_prlimit64,
            [0, resource as usize, new.as_ptr() as usize, 0, 0, 0],
        )
    }
}

/// `setresuid(uid, uid, uid)`.
pub fn setresuid(uid: u32) -> SysResult {
    let uid = uid as usize;
    // SAFETY: no pointers.
    unsafe { sys(g::__NR_setresuid, [uid, uid, uid, 0, 0, 0]) }
}

/// `prctl(option, arg2, arg3)` for the options whose arguments are plain integers.
pub fn prctl(option: u32, arg2: usize, arg3: usize) -> SysResult {
    // SAFETY: only called with integer-argument options (see callers).
    unsafe { sys(g::__NR_prctl, [option as usize, arg2, arg3, 0, 0, 0]) }
}

/// Clears every capability set of the calling thread (`capset` v3 with all zeros).
pub fn capset_empty() -> SysResult {
    let header = g::__user_cap_header_struct {
        version: g::_LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let zero = g::__user_cap_data_struct {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    };
    let data = [zero, zero];
    // SAFETY: header and the two data structs (v3 takes two) are valid for the kernel's reads.
    unsafe {
        sys(
            g::__NR_capset,
            [
                &header as *const _ as usize,
                data.as_ptr() as usize,
                0,
                0,
                0,
                0,
            ],
        )
    }
}

/// `landlock_restrict_self(ruleset, 0)`.
pub fn landlock_restrict_self(ruleset: i32) -> SysResult {
    // SAFETY: no pointers.
    unsafe {
        sys(
            g::__NR_landlock_restrict_self,
            [ruleset as usize, 0, 0, 0, 0, 0],
        )
    }
}

/// One BPF instruction (`struct sock_filter`).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct SockFilter {
    /// Opcode.
    pub code: u16,
    /// Jump if true.
    pub jt: u8,
    /// Jump if false.
    pub jf: u8,
    /// Operand.
    pub k: u32,
}

/// `seccomp(SECCOMP_SET_MODE_FILTER, 0, {len, filter})`.
pub fn seccomp_filter(filter: &[SockFilter]) -> SysResult {
    #[repr(C)]
    struct Fprog {
        len: u16,
        filter: *const SockFilter,
    }
    let len = u16::try_from(filter.len()).map_err(|_| Errno(e::EINVAL as i32))?;
    let prog = Fprog {
        len,
        filter: filter.as_ptr(),
    };
    // SAFETY: prog points at `len` instructions that outlive the call (the kernel copies them).
    unsafe {
        sys(
            g::__NR_seccomp,
            [
                linux_raw_sys::ptrace::SECCOMP_SET_MODE_FILTER as usize,
                0,
                &prog as *const Fprog as usize,
                0,
                0,
                0,
            ],
        )
    }
}

/// Resets the disposition of every catchable signal to `SIG_DFL` (an ignored disposition, such
/// as the `SIGPIPE` Node and Rust set, survives `execve`).
pub fn reset_signal_dispositions() -> SysResult {
    // `struct sigaction` with SIG_DFL (0), no flags, an empty mask: all zeros on every
    // architecture, whatever the field order.
    let act = [0usize; 4];
    for sig in 1..=64u32 {
        if sig == g::SIGKILL || sig == g::SIGSTOP {
            continue;
        }
        // SAFETY: act is a valid, zeroed `struct sigaction` (at least as large as the kernel's).
        unsafe {
            sys(
                g::__NR_rt_sigaction,
                [sig as usize, act.as_ptr() as usize, 0, 8, 0, 0],
            )
        }?;
    }
    Ok(0)
}

/// `rt_sigprocmask(how, &set, NULL)` on a 64-signal set.
pub fn sigprocmask(how: u32, set: u64) -> SysResult {
    // SAFETY: set is a valid 8-byte sigset; no old set is requested.
    unsafe {
        sys(
            g::__NR_rt_sigprocmask,
            [how as usize, &set as *const u64 as usize, 0, 8, 0, 0],
        )
    }
}

/// Waits (without a timeout) until a signal of `set` is pending and takes it.
pub fn sigwait(set: u64) -> SysResult {
    // SAFETY: set is a valid 8-byte sigset; no siginfo or timeout is passed.
    unsafe {
        sys(
            g::__NR_rt_sigtimedwait,
            [&set as *const u64 as usize, 0, 0, 8, 0, 0],
        )
    }
}

/// Reaps one exited child (any, `__WALL`) without blocking; `Ok(0)` if none has exited.
pub fn reap_any_nohang() -> SysResult {
    let any = -1isize as usize;
    // SAFETY: no status or rusage pointer is passed.
    unsafe {
        sys(
            g::__NR_wait4,
            [any, 0, (g::WNOHANG | g::__WALL) as usize, 0, 0, 0],
        )
    }
}

/// Bit of signal `sig` in a 64-signal set.
pub const fn sigbit(sig: u32) -> u64 {
    1 << (sig - 1)
}

pub use e::{
    E2BIG, EACCES, EBADF, EINTR, EINVAL, EIO, ELOOP, ENAMETOOLONG, ENOENT, ENOSYS, ENOTDIR, EPERM,
};
pub use g::{
    CLONE_NEWCGROUP, CLONE_NEWIPC, CLONE_NEWNET, CLONE_NEWNS, CLONE_NEWPID, CLONE_NEWUSER,
    CLONE_NEWUTS, CLONE_PARENT, SIGCHLD, SIG_BLOCK, SIG_SETMASK,
};
pub use linux_raw_sys::prctl::{
    PR_CAPBSET_DROP, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, PR_SET_CHILD_SUBREAPER,
    PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS, PR_SET_PDEATHSIG, PR_SET_SECUREBITS,
};
