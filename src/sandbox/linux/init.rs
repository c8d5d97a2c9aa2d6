//! The sandbox's setup child: PID 1 of its PID namespace, created by `clone` with all the
//! namespaces and `CLONE_VM` (it runs in the host's memory, on a stack of its own, like a
//! `vfork` child) until it executes `hive-init init`.
//!
//! 1. Sets `PR_SET_PDEATHSIG(SIGKILL)`: the launcher thread that cloned it lives as long as the
//!    host process, so the host's death kills init, and with it (the kernel kills a PID
//!    namespace whose init dies) every process of the sandbox.
//! 2. Waits for the parent's "go" (sent once `uid_map`/`gid_map` are written). EOF means the
//!    parent died before step 1 took effect: exit. Switches to the sandbox's uid/gid 0 (which
//!    clears PDEATHSIG, so it is set again).
//! 3. Hostname, `lo` up, the proxy listener ([`super::netns`]); the capture routes, DNS sockets
//!    and capture listeners ([`super::capture`], each fd sent at once); the filesystem
//!    ([`super::mounts`]) with the generated `/etc/resolv.conf` and `/etc/hosts`; the Landlock
//!    rules.
//! 4. Hands over each FUSE connection it mounted (one `FuseHandover` message per mount, see
//!    [`super::mounts`]) and reports success with the listener attached.
//! 5. Executes `hive-init init` from the sealed memfd ([`super::image`],
//!    `hive_launcher::stub::exec_init`) with only the control socket open: the copy of the host's
//!    memory is gone, and PID 1 is now a reaper of a few kB (`hive_launcher::init`) that says
//!    "init runs" once and closes the socket. Orphans of the sandbox are re-parented to it.
//!
//! No process of the sandbox exists before step 5 (workloads start once the host has the final
//! report and init's message), so none can see the copy of the host's memory. The workloads are
//! not init's children (see [`super`] for why); it only reaps orphans.

use super::capture;
use super::child::{check, CResult, Fail, Stage};
use super::mounts;
use super::netns;
use super::plan::InitPlan;

/// `clone` entry point of the setup child (on the launcher's stack for it, sharing the host's
/// memory): `arg` is the launcher's `*mut InitPlan`.
pub(crate) extern "C" fn init_entry(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: arg is the launcher's InitPlan, which it leaves to this child (untouched and
    // alive) until the child has exec'd or died.
    unsafe { init_main(&mut *(arg as *mut InitPlan)) }
}

/// Entry point in the child after `clone`. Never returns.
///
/// # Safety
/// Only call in the freshly cloned child.
pub(crate) unsafe fn init_main(plan: &mut InitPlan) -> ! {
    let ctrl = plan.ctrl;
    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
    // The host's signal handlers (Node's, libuv's) must never run here (every signal is also
    // blocked until the exec). Raw rt_sigaction: no errno write (glibc's signal() fails with
    // EINVAL on its reserved signals), since errno is shared with the launcher thread.
    let _ = hive_launcher::sys::reset_signal_dispositions();
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
    // The sandbox's cgroups, before anything is charged (see SandboxLimits::init_join_files):
    // `0` moves the writer, this single-threaded child.
    for fd in plan.cgroup_join.iter().copied().filter(|fd| *fd >= 0) {
        if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
            report_and_exit(
                ctrl,
                Fail {
                    stage: Stage::Limits,
                    errno: super::child::errno(),
                },
            );
        }
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
    // No PR_SET_DUMPABLE here: this child shares the host's memory (CLONE_VM), and dumpability
    // belongs to the memory, so it would change the host process. Nothing of the sandbox runs
    // before the exec; hive-init then makes its own memory non-dumpable.
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
    // Become hive-init (PID 1 stays PID 1 across the exec): nothing of the host's memory or
    // fds survives; the control socket becomes its fd 0 for one "init runs" message.
    let _ = hive_launcher::stub::exec_init(plan.image, ctrl);
    libc::_exit(1)
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
