//! `hive-init init`: PID 1 of a sandbox once its setup is done.
//!
//! 1. The setup child (a clone of the host running [`crate::setup`]) finishes the
//!    namespaces, mounts and listeners, then executes this program from the sealed memfd with the
//!    control socket as fd 0 ([`crate::stub::exec_init`]). The exec replaces the copy of the
//!    host's memory with this program's few pages.
//! 2. It tells the host it runs ([`Stage::InitReady`] on fd 0), then closes every fd: it holds
//!    nothing of the host, not even the control socket.
//! 3. It makes itself non-dumpable (its `/proc` files are then root-only and ptrace needs
//!    `CAP_SYS_PTRACE`, which no workload has) and reaps orphans forever: `SIGCHLD` stays blocked
//!    and is taken synchronously, so no handler ever runs.
//!
//! `PR_SET_PDEATHSIG` survives the exec: the host's death still kills init, and with it the
//! whole PID namespace.

use crate::stage::{encode_report, Stage};
use crate::sys;

/// The reaper. Never returns.
pub fn reaper_main() -> ! {
    sys::write_all(0, &encode_report(Stage::InitReady, 0));
    let _ = sys::close_range(0, u32::MAX, 0);
    let _ = sys::prctl(sys::PR_SET_DUMPABLE, 0, 0);
    let chld = sys::sigbit(sys::SIGCHLD);
    // Inherited mask: everything blocked by the launcher; keep it so, SIGCHLD included.
    let _ = sys::sigprocmask(sys::SIG_BLOCK, chld);
    loop {
        while matches!(sys::reap_any_nohang(), Ok(pid) if pid > 0) {}
        let _ = sys::sigwait(chld);
    }
}
