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
use linux_raw_sys::net as n;

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

/// An optional C string as a syscall argument (NULL for `None`).
fn opt_ptr(s: Option<&CStr>) -> usize {
    s.map_or(0, |s| s.as_ptr() as usize)
}

/// `openat(dir, path, flags, mode)`.
pub fn openat(dir: i32, path: &CStr, flags: u32, mode: u32) -> SysResult<i32> {
    // SAFETY: path is NUL-terminated; the kernel reads up to the NUL.
    unsafe {
        sys(
            g::__NR_openat,
            [
                dir as usize,
                path.as_ptr() as usize,
                flags as usize,
                mode as usize,
                0,
                0,
            ],
        )
    }
    .map(|v| v as i32)
}

/// `openat2(dir, path, how)`.
pub fn openat2(dir: i32, path: &CStr, how: &g::open_how) -> SysResult<i32> {
    // SAFETY: path is NUL-terminated; `how` is a valid open_how of the size passed.
    unsafe {
        sys(
            g::__NR_openat2,
            [
                dir as usize,
                path.as_ptr() as usize,
                how as *const g::open_how as usize,
                core::mem::size_of::<g::open_how>(),
                0,
                0,
            ],
        )
    }
    .map(|v| v as i32)
}

/// `mkdirat(dir, path, mode)`.
pub fn mkdirat(dir: i32, path: &CStr, mode: u32) -> SysResult {
    // SAFETY: path is NUL-terminated.
    unsafe {
        sys(
            g::__NR_mkdirat,
            [dir as usize, path.as_ptr() as usize, mode as usize, 0, 0, 0],
        )
    }
}

/// `symlinkat(target, dir, link)`.
pub fn symlinkat(target: &CStr, dir: i32, link: &CStr) -> SysResult {
    // SAFETY: both paths are NUL-terminated.
    unsafe {
        sys(
            g::__NR_symlinkat,
            [
                target.as_ptr() as usize,
                dir as usize,
                link.as_ptr() as usize,
                0,
                0,
                0,
            ],
        )
    }
}

/// The file type bits (`st_mode & S_IFMT`) of `dir`/`path` through `statx` (the same call on
/// every architecture; `flags`: `AT_SYMLINK_NOFOLLOW` for `lstat`, `AT_EMPTY_PATH` with an
/// empty path for `fstat`).
pub fn file_type_at(dir: i32, path: &CStr, flags: u32) -> SysResult<u32> {
    let mut st = core::mem::MaybeUninit::<g::statx>::zeroed();
    // SAFETY: path is NUL-terminated; `st` is writable for a whole struct statx.
    unsafe {
        sys(
            g::__NR_statx,
            [
                dir as usize,
                path.as_ptr() as usize,
                flags as usize,
                g::STATX_TYPE as usize,
                st.as_mut_ptr() as usize,
                0,
            ],
        )
    }?;
    // SAFETY: zero-initialised plain integers (the kernel filled what it knows).
    let st = unsafe { st.assume_init() };
    Ok(u32::from(st.stx_mode) & g::S_IFMT)
}

/// `mount(source, target, fstype, flags, data)`.
pub fn mount(
    source: Option<&CStr>,
    target: &CStr,
    fstype: Option<&CStr>,
    flags: u32,
    data: Option<&CStr>,
) -> SysResult {
    // SAFETY: every pointer is NULL or a NUL-terminated string (`data` is read as a string by
    // the file systems used here: tmpfs, devpts, proc, fuse).
    unsafe {
        sys(
            g::__NR_mount,
            [
                opt_ptr(source),
                target.as_ptr() as usize,
                opt_ptr(fstype),
                flags as usize,
                opt_ptr(data),
                0,
            ],
        )
    }
}

/// `umount2(target, flags)`.
pub fn umount2(target: &CStr, flags: u32) -> SysResult {
    // SAFETY: target is NUL-terminated.
    unsafe {
        sys(
            g::__NR_umount2,
            [target.as_ptr() as usize, flags as usize, 0, 0, 0, 0],
        )
    }
}

/// `pivot_root(new_root, put_old)`.
pub fn pivot_root(new_root: &CStr, put_old: &CStr) -> SysResult {
    // SAFETY: both paths are NUL-terminated.
    unsafe {
        sys(
            g::__NR_pivot_root,
            [
                new_root.as_ptr() as usize,
                put_old.as_ptr() as usize,
                0,
                0,
                0,
                0,
            ],
        )
    }
}

/// `open_tree(dir, path, flags)`: a detached copy of a mount (with `OPEN_TREE_CLONE`).
pub fn open_tree(dir: i32, path: &CStr, flags: u32) -> SysResult<i32> {
    // SAFETY: path is NUL-terminated.
    unsafe {
        sys(
            g::__NR_open_tree,
            [
                dir as usize,
                path.as_ptr() as usize,
                flags as usize,
                0,
                0,
                0,
            ],
        )
    }
    .map(|v| v as i32)
}

/// `move_mount(from_dir, from_path, to_dir, to_path, flags)`.
pub fn move_mount(
    from_dir: i32,
    from_path: &CStr,
    to_dir: i32,
    to_path: &CStr,
    flags: u32,
) -> SysResult {
    // SAFETY: both paths are NUL-terminated.
    unsafe {
        sys(
            g::__NR_move_mount,
            [
                from_dir as usize,
                from_path.as_ptr() as usize,
                to_dir as usize,
                to_path.as_ptr() as usize,
                flags as usize,
                0,
            ],
        )
    }
}

/// `mount_setattr(dir, path, flags, attr)`.
pub fn mount_setattr(dir: i32, path: &CStr, flags: u32, attr: &g::mount_attr) -> SysResult {
    // SAFETY: path is NUL-terminated; attr is a valid mount_attr of the size passed.
    unsafe {
        sys(
            g::__NR_mount_setattr,
            [
                dir as usize,
                path.as_ptr() as usize,
                flags as usize,
                attr as *const g::mount_attr as usize,
                core::mem::size_of::<g::mount_attr>(),
                0,
            ],
        )
    }
}

/// `sethostname(name)`.
pub fn sethostname(name: &[u8]) -> SysResult {
    // SAFETY: name is valid for reads of name.len() bytes.
    unsafe {
        sys(
            g::__NR_sethostname,
            [name.as_ptr() as usize, name.len(), 0, 0, 0, 0],
        )
    }
}

/// Whether the peer of the socket `fd` has hung up (`ppoll` for `POLLRDHUP` without waiting).
pub fn peer_hung_up(fd: i32) -> bool {
    let mut pfd = g::pollfd {
        fd,
        events: g::POLLRDHUP as i16,
        revents: 0,
    };
    let zero = g::__kernel_timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: one writable pollfd, a readable timeout, no signal mask.
    let r = unsafe {
        sys(
            g::__NR_ppoll,
            [
                &mut pfd as *mut g::pollfd as usize,
                1,
                &zero as *const g::__kernel_timespec as usize,
                0,
                8,
                0,
            ],
        )
    };
    matches!(r, Ok(n) if n != 0) && i32::from(pfd.revents) & (g::POLLHUP | g::POLLRDHUP) as i32 != 0
}

/// `socket(domain, type | SOCK_CLOEXEC, protocol)` (`SOCK_CLOEXEC` is `O_CLOEXEC` on every
/// architecture hive supports).
pub fn socket_cloexec(domain: u32, kind: u32, protocol: u32) -> SysResult<i32> {
    // SAFETY: no pointers.
    unsafe {
        sys(
            g::__NR_socket,
            [
                domain as usize,
                (kind | g::O_CLOEXEC) as usize,
                protocol as usize,
                0,
                0,
                0,
            ],
        )
    }
    .map(|v| v as i32)
}

/// `setsockopt(fd, level, name, &value, 4)` for an `int` option.
pub fn setsockopt_int(fd: i32, level: u32, name: u32, value: i32) -> SysResult {
    // SAFETY: value is a readable int of the size passed.
    unsafe {
        sys(
            g::__NR_setsockopt,
            [
                fd as usize,
                level as usize,
                name as usize,
                &value as *const i32 as usize,
                core::mem::size_of::<i32>(),
                0,
            ],
        )
    }
}

/// `bind(fd, addr)` to an IPv4 address.
pub fn bind_v4(fd: i32, addr: &n::sockaddr_in) -> SysResult {
    // SAFETY: addr is a readable sockaddr_in of the size passed.
    unsafe {
        sys(
            g::__NR_bind,
            [
                fd as usize,
                addr as *const n::sockaddr_in as usize,
                core::mem::size_of::<n::sockaddr_in>(),
                0,
                0,
                0,
            ],
        )
    }
}

/// `bind(fd, addr)` to an IPv6 address.
pub fn bind_v6(fd: i32, addr: &n::sockaddr_in6) -> SysResult {
    // SAFETY: addr is a readable sockaddr_in6 of the size passed.
    unsafe {
        sys(
            g::__NR_bind,
            [
                fd as usize,
                addr as *const n::sockaddr_in6 as usize,
                core::mem::size_of::<n::sockaddr_in6>(),
                0,
                0,
                0,
            ],
        )
    }
}

/// `listen(fd, backlog)`.
pub fn listen(fd: i32, backlog: u32) -> SysResult {
    // SAFETY: no pointers.
    unsafe { sys(g::__NR_listen, [fd as usize, backlog as usize, 0, 0, 0, 0]) }
}

/// `send(fd, buf, 0)`.
pub fn send(fd: i32, buf: &[u8]) -> SysResult {
    // SAFETY: buf is readable for buf.len() bytes; no address.
    unsafe {
        sys(
            g::__NR_sendto,
            [fd as usize, buf.as_ptr() as usize, buf.len(), 0, 0, 0],
        )
    }
}

/// `recv(fd, buf, 0)`.
pub fn recv(fd: i32, buf: &mut [u8]) -> SysResult {
    // SAFETY: buf is writable for buf.len() bytes; no address is asked for.
    unsafe {
        sys(
            g::__NR_recvfrom,
            [fd as usize, buf.as_mut_ptr() as usize, buf.len(), 0, 0, 0],
        )
    }
}

/// `ioctl(fd, request, ifr)` for the `SIOC*IF*` requests, which read and write one `ifreq`.
pub fn ioctl_ifreq(fd: i32, request: u32, ifr: &mut n::ifreq) -> SysResult {
    // SAFETY: ifr is a valid, writable struct ifreq, which is all these requests access.
    unsafe {
        sys(
            g::__NR_ioctl,
            [
                fd as usize,
                request as usize,
                ifr as *mut n::ifreq as usize,
                0,
                0,
                0,
            ],
        )
    }
}

/// Control-message space for one fd (`CMSG_SPACE(sizeof(int))` on a 64-bit target): the header
/// (16 bytes), the fd, padding to 8 bytes.
#[repr(C)]
struct FdCmsg {
    hdr: n::cmsghdr,
    fd: i32,
    pad: i32,
}

const _: () = assert!(core::mem::size_of::<n::cmsghdr>() == 16);
const _: () = assert!(core::mem::size_of::<FdCmsg>() == 24);

/// `sendmsg(sock, {payload}, MSG_NOSIGNAL)` with `fd` attached (`SCM_RIGHTS`) when given; retries
/// `EINTR`.
pub fn send_with_fd(sock: i32, payload: &[u8], fd: Option<i32>) -> SysResult {
    let mut iov = g::iovec {
        iov_base: payload.as_ptr() as *mut core::ffi::c_void,
        iov_len: payload.len() as _,
    };
    let mut cmsg = FdCmsg {
        hdr: n::cmsghdr {
            // CMSG_LEN(sizeof(int)): the header and the fd, without the trailing padding.
            cmsg_len: core::mem::size_of::<n::cmsghdr>() + core::mem::size_of::<i32>(),
            cmsg_level: n::SOL_SOCKET as i32,
            cmsg_type: n::SCM_RIGHTS as i32,
        },
        fd: fd.unwrap_or(-1),
        pad: 0,
    };
    let (control, control_len) = match fd {
        Some(_) => (
            &mut cmsg as *mut FdCmsg as *mut core::ffi::c_void,
            core::mem::size_of::<FdCmsg>(),
        ),
        None => (core::ptr::null_mut(), 0),
    };
    let msg = n::msghdr {
        msg_name: core::ptr::null_mut(),
        msg_namelen: 0,
        msg_iov: (&mut iov as *mut g::iovec).cast(),
        msg_iovlen: 1,
        msg_control: control,
        msg_controllen: control_len,
        msg_flags: 0,
    };
    loop {
        // SAFETY: msg points at one iovec over `payload` and, with an fd, at one well-formed
        // SCM_RIGHTS control message; all of them outlive the call.
        let r = unsafe {
            sys(
                g::__NR_sendmsg,
                [
                    sock as usize,
                    &msg as *const n::msghdr as usize,
                    n::MSG_NOSIGNAL as usize,
                    0,
                    0,
                    0,
                ],
            )
        };
        match r {
            Err(Errno(e)) if e == e::EINTR as i32 => {}
            r => return r,
        }
    }
}

/// `landlock_add_rule(ruleset, LANDLOCK_RULE_PATH_BENEATH, attr, 0)`.
pub fn landlock_add_path_rule(
    ruleset: i32,
    attr: &linux_raw_sys::landlock::landlock_path_beneath_attr,
) -> SysResult {
    // SAFETY: attr is a valid, readable path-beneath rule.
    unsafe {
        sys(
            g::__NR_landlock_add_rule,
            [
                ruleset as usize,
                linux_raw_sys::landlock::landlock_rule_type::LANDLOCK_RULE_PATH_BENEATH as usize,
                attr as *const _ as usize,
                0,
                0,
                0,
            ],
        )
    }
}

/// Bit of signal `sig` in a 64-signal set.
pub const fn sigbit(sig: u32) -> u64 {
    1 << (sig - 1)
}

pub use e::{
    E2BIG, EACCES, EBADF, EEXIST, EINTR, EINVAL, EIO, ELOOP, ENAMETOOLONG, ENOENT, ENOSYS, ENOTDIR,
    EPERM, EPROTO,
};
pub use g::{
    CLONE_NEWCGROUP, CLONE_NEWIPC, CLONE_NEWNET, CLONE_NEWNS, CLONE_NEWPID, CLONE_NEWUSER,
    CLONE_NEWUTS, CLONE_PARENT, SIGCHLD, SIGKILL, SIG_BLOCK, SIG_SETMASK,
};
pub use linux_raw_sys::prctl::{
    PR_CAPBSET_DROP, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, PR_SET_CHILD_SUBREAPER,
    PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS, PR_SET_PDEATHSIG, PR_SET_SECUREBITS,
};
