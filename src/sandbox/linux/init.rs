//! The sandbox's init: PID 1 of its PID namespace, created by `clone3` with all the namespaces.
//!
//! 1. Sets `PR_SET_PDEATHSIG(SIGKILL)`: the launcher thread that cloned it lives as long as the
//!    host process, so the host's death kills init, and with it (the kernel kills a PID
//!    namespace whose init dies) every process of the sandbox.
//! 2. Waits for the parent's "go" (sent once `uid_map`/`gid_map` are written). EOF means the
//!    parent died before step 1 took effect: exit.
//! 3. Hostname, `lo` up, the proxy listener ([`super::netns`]); the filesystem
//!    ([`super::mounts`]); the Landlock rules.
//! 4. Reports success with the listener attached, closes every fd it holds, and becomes a
//!    reaper: orphans of the sandbox are re-parented to it and must not stay zombies.
//!
//! init never execs: it is a copy of the host process with a tiny, allocation-free loop. The
//! workloads are not its children (see [`super`] for why); it only reaps orphans.

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
    match setup(plan) {
        Ok(listener) => {
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
    netns::loopback_up()?;
    let listener = netns::proxy_listener(plan.proxy_port)?;
    mounts::build_root(plan)?;
    mounts::landlock_rules(plan)?;
    mounts::root_read_only()?;
    Ok(listener)
}

/// Reaps every child that exits, forever. SIGCHLD is blocked and waited for synchronously, so
/// no handler runs.
unsafe fn reap_forever() -> ! {
    let mut set: libc::sigset_t = std::mem::zeroed();
    libc::sigemptyset(&mut set);
    libc::sigaddset(&mut set, libc::SIGCHLD);
    libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    loop {
        while libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) > 0 {}
        let mut info: libc::siginfo_t = std::mem::zeroed();
        libc::sigwaitinfo(&set, &mut info);
    }
}
