//! The sandbox's init: PID 1 of its PID namespace, created by `clone3` with all the namespaces.
//!
//! 1. Sets `PR_SET_PDEATHSIG(SIGKILL)`: the launcher thread that cloned it lives as long as the
//!    host process, so the host's death kills init, and with it (the kernel kills a PID
//!    namespace whose init dies) every process of the sandbox.
//! 2. Waits for the parent's "go" (sent once `uid_map`/`gid_map` are written). EOF means the
//!    parent died before step 1 took effect: exit. Switches to the sandbox's uid/gid 0 (which
//!    clears PDEATHSIG, so it is set again) and makes itself non-dumpable: its memory is a copy of
//!    the host's.
//! 3. Hostname, `lo` up, the proxy listener ([`super::netns`]); the capture routes, DNS sockets
//!    and capture listeners ([`super::capture`], each fd sent at once); the filesystem
//!    ([`super::mounts`]) with the generated `/etc/resolv.conf` and `/etc/hosts`; the Landlock
//!    rules.
//! 4. Hands over each FUSE connection it mounted (one `FuseHandover` message per mount, see
//!    [`super::mounts`]), reports success with the listener attached, closes every fd it holds,
//!    and becomes a
//!    reaper: orphans of the sandbox are re-parented to it and must not stay zombies. On x86_64
//!    it first unmaps the host's memory it was cloned with ([`reap_forever`]).
//!
//! init never execs: it is a copy of the host process with a tiny, allocation-free loop. The
//! workloads are not its children (see [`super`] for why); it only reaps orphans.

use super::capture;
use super::child::{check, CResult, Fail, Stage};
use super::mounts;
use super::netns;
use super::plan::InitPlan;

/// Entry point in the child after `clone3`. Never returns.
///
/// # Safety
/// Only call in the freshly cloned child.
pub(crate) unsafe fn init_main(plan: &mut InitPlan) -> ! {
    let ctrl = plan.ctrl;
    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
    // The host's signal handlers (Node's, libuv's) must never run in this copy.
    for sig in 1..=64 {
        if sig != libc::SIGKILL && sig != libc::SIGSTOP {
            libc::signal(sig, libc::SIG_DFL);
        }
    }
    let mut go = [0u8; 1];
    let n = loop {
        let n = libc::read(ctrl, go.as_mut_ptr().cast(), 1);
        if n >= 0 || super::child::errno() != libc::EINTR {
            break n;
        }
    };
    if n != 1 {
        libc::_exit(1);
    }
    // Still the host's uid: the only moment init can open a root-only /dev/fuse (see
    // mounts::open_fuse).
    if let Err(f) = mounts::open_fuse(plan) {
        report_and_exit(ctrl, f);
    }
    if let Err(f) = super::child::become_sandbox_root() {
        report_and_exit(ctrl, f);
    }
    // A credential change clears the parent-death signal: set it again, then make sure the
    // parent did not die in between (getppid() is 0 across the PID namespace boundary, so ask
    // the control socket: the parent's end closes when it dies).
    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
    let mut pfd = libc::pollfd {
        fd: ctrl,
        events: libc::POLLRDHUP,
        revents: 0,
    };
    if libc::poll(&mut pfd, 1, 0) != 0 && pfd.revents & (libc::POLLHUP | libc::POLLRDHUP) != 0 {
        libc::_exit(1);
    }
    // init is a copy of the host process's memory at clone time (secrets included): make its
    // /proc files root-only and ptrace impossible without CAP_SYS_PTRACE in the host's userns.
    libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
    match setup(plan) {
        Ok(listener) => {
            // FUSE connections first, one message each; the final report ends the handover.
            for (i, m) in plan.mounts.iter().enumerate().filter(|(_, m)| m.fuse) {
                let sent = netns::send_report(ctrl, Stage::FuseHandover, i as i32, Some(m.fuse_fd));
                if let Err(f) = sent {
                    report_and_exit(ctrl, f);
                }
            }
            if let Err(f) = netns::send_report(ctrl, Stage::Ok, 0, Some(listener)) {
                report_and_exit(ctrl, f);
            }
        }
        Err(f) => report_and_exit(ctrl, f),
    }
    // Hold nothing of the host: not its fds, not the control socket, not the listener.
    libc::syscall(libc::SYS_close_range, 0u32, libc::c_uint::MAX, 0u32);
    reap_forever()
}

unsafe fn report_and_exit(ctrl: libc::c_int, f: Fail) -> ! {
    let _ = netns::send_report(ctrl, f.stage, f.errno, None);
    libc::_exit(1)
}

/// Step 3; returns the listener fd.
unsafe fn setup(plan: &mut InitPlan) -> CResult<libc::c_int> {
    check(
        libc::sethostname(plan.hostname.as_ptr().cast(), plan.hostname.len()) as libc::c_long,
        Stage::Hostname,
    )?;
    let lo = netns::loopback_up()?;
    let listener = netns::proxy_listener(plan.proxy_port)?;
    capture::local_routes(lo)?;
    capture::dns_sockets(plan.ctrl)?;
    capture::capture_listeners(plan.ctrl, &plan.capture_ports)?;
    mounts::build_root(plan)?;
    mounts::etc_files(plan)?;
    mounts::landlock_rules(plan)?;
    mounts::root_read_only()?;
    Ok(listener)
}

/// Reaps every child that exits, forever. SIGCHLD is blocked and waited for synchronously, so
/// no handler runs.
///
/// On x86_64 it first gives back the host's memory: init is a copy-on-write copy of the host
/// process, and every page the host rewrites afterwards would otherwise stay pinned in init
/// (measured: a 200 MB host heap rewritten after start = 200 MB more in use, per sandbox). It
/// unmaps every mapping except its stack (which also holds its TLS and rseq area: init was cloned
/// from a non-main thread) and the code of [`unmap_and_reap`], then loops on raw syscalls.
unsafe fn reap_forever() -> ! {
    let mut set: libc::sigset_t = std::mem::zeroed();
    libc::sigemptyset(&mut set);
    libc::sigaddset(&mut set, libc::SIGCHLD);
    libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    #[cfg(target_arch = "x86_64")]
    {
        let mut ranges = [[0u64; 2]; MAX_RANGES];
        let code = unmap_and_reap as *const () as usize as u64;
        let stack = &ranges as *const _ as u64;
        if let Some(n) = collect_unmappable(&mut ranges, code, stack) {
            unmap_and_reap(ranges.as_ptr(), n);
        }
    }
    loop {
        while libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) > 0 {}
        let mut info: libc::siginfo_t = std::mem::zeroed();
        libc::sigwaitinfo(&set, &mut info);
    }
}

#[cfg(target_arch = "x86_64")]
const MAX_RANGES: usize = 4096;

/// Reads `/proc/self/maps` (allocation-free) and fills `out` with `[start, len]` of every mapping
/// except the ones containing `code` or `stack` and the kernel's special ones (`[vdso]`,
/// `[vvar]`, `[vsyscall]`). `None` if anything is unexpected: then nothing is unmapped.
#[cfg(target_arch = "x86_64")]
unsafe fn collect_unmappable(
    out: &mut [[u64; 2]; MAX_RANGES],
    code: u64,
    stack: u64,
) -> Option<usize> {
    let fd = libc::open(
        c"/proc/self/maps".as_ptr(),
        libc::O_RDONLY | libc::O_CLOEXEC,
    );
    if fd < 0 {
        return None;
    }
    let mut n = 0usize;
    let mut kept_code = false;
    let mut kept_stack = false;
    let mut buf = [0u8; 8192];
    let mut line = [0u8; 512];
    let mut len = 0usize;
    let mut ok = true;
    'read: loop {
        let got = libc::read(fd, buf.as_mut_ptr().cast(), buf.len());
        if got < 0 {
            ok = false;
            break;
        }
        if got == 0 {
            break;
        }
        for &b in buf.get(..got as usize).unwrap_or(&[]) {
            if b != b'\n' {
                if let Some(slot) = line.get_mut(len) {
                    *slot = b;
                }
                len += 1;
                continue;
            }
            let l = line.get(..len.min(line.len())).unwrap_or(&[]);
            len = 0;
            let Some((start, end)) = parse_range(l) else {
                ok = false;
                break 'read;
            };
            if l.windows(2).any(|w| w == b"[v") {
                continue;
            }
            let has = |a: u64| start <= a && a < end;
            if has(code) {
                kept_code = true;
                continue;
            }
            if has(stack) {
                kept_stack = true;
                continue;
            }
            let Some(slot) = out.get_mut(n) else {
                ok = false;
                break 'read;
            };
            *slot = [start, end - start];
            n += 1;
        }
    }
    libc::close(fd);
    (ok && kept_code && kept_stack).then_some(n)
}

/// Parses the `start-end` hex pair at the head of a maps line.
#[cfg(target_arch = "x86_64")]
fn parse_range(l: &[u8]) -> Option<(u64, u64)> {
    let mut vals = [0u64; 2];
    let mut i = 0;
    for &b in l {
        let d = match b {
            b'0'..=b'9' => b - b'0',
            b'a'..=b'f' => b - b'a' + 10,
            b'-' if i == 0 => {
                i = 1;
                continue;
            }
            b' ' if i == 1 => return (vals[1] > vals[0]).then_some((vals[0], vals[1])),
            _ => return None,
        };
        vals[i] = vals[i].checked_mul(16)?.checked_add(d as u64)?;
    }
    None
}

/// Unmaps `n` `[start, len]` ranges, then reaps children forever; raw `syscall` instructions
/// only, since libc is among what gets unmapped. Only its own code page and the stack remain.
#[cfg(target_arch = "x86_64")]
#[inline(never)]
unsafe extern "C" fn unmap_and_reap(ranges: *const [u64; 2], n: usize) -> ! {
    std::arch::asm!(
        // munmap(ranges[i][0], ranges[i][1]) for each range
        "2:",
        "test r13, r13",
        "jz 3f",
        "mov rdi, [r12]",
        "mov rsi, [r12 + 8]",
        "mov eax, 11",
        "syscall",
        "add r12, 16",
        "dec r13",
        "jmp 2b",
        "3:",
        // sigset {SIGCHLD} at [rsp], siginfo at [rsp + 16]
        "sub rsp, 160",
        "and rsp, -16",
        "mov qword ptr [rsp], 0x10000",
        "4:",
        // while wait4(-1, NULL, WNOHANG, NULL) > 0
        "mov eax, 61",
        "mov rdi, -1",
        "xor esi, esi",
        "mov edx, 1",
        "xor r10d, r10d",
        "syscall",
        "test rax, rax",
        "jg 4b",
        // rt_sigtimedwait(&set, &info, NULL, 8)
        "mov eax, 128",
        "mov rdi, rsp",
        "lea rsi, [rsp + 16]",
        "xor edx, edx",
        "mov r10d, 8",
        "syscall",
        "jmp 4b",
        in("r12") ranges,
        in("r13") n,
        options(noreturn)
    );
}

#[cfg(all(test, target_arch = "x86_64"))]
mod unit {
    use super::parse_range;

    #[test]
    fn maps_lines_parse() {
        for (line, want) in [
            (
                &b"7f00-7f10 r-xp 00000000 fd:00 1 /lib/x.so"[..],
                Some((0x7f00, 0x7f10)),
            ),
            (
                b"ffffffffff600000-ffffffffff601000 --xp 0 0:0 0 [vsyscall]",
                Some((0xffffffffff600000, 0xffffffffff601000)),
            ),
            (b"garbage", None),
            (b"10-5 rw-p", None),
            (b"", None),
        ] {
            assert_eq!(parse_range(line), want);
        }
    }
}
