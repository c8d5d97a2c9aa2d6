//! Transparent capture inside the sandbox's network namespace (docs/network-access.md#dns-and-transparent-capture).
//!
//! Clients that ignore proxy variables (Node's `fetch`, Go, raw sockets) still reach the policy:
//! 1. The setup child (`hive_launcher::setup::net`) adds two local routes in the namespace's
//!    `local` table, `local 0.0.0.0/0 dev lo` and `local ::/0 dev lo` (rtnetlink over a raw
//!    `NETLINK_ROUTE` socket, built on the stack): every address is then "this host", so a connection to any address lands on
//!    whatever listens on that port inside, and a port nothing listens on answers `RST` at once
//!    (`ECONNREFUSED`) instead of `ENETUNREACH`; UDP to any port but DNS gets port-unreachable.
//! 2. It creates the DNS sockets on `127.0.0.1:53` (UDP and TCP) and one capture listener per
//!    port on `0.0.0.0` and `[::]` (`IPV6_V6ONLY`): 80, 443
//!    and every port an allow rule names. Each fd goes to the parent in its own message tagged with
//!    its [`FdKind`] and port; the parent serves them (the DNS responder, the proxy's transparent
//!    listeners), so the listener a connection arrives on identifies the sandbox.
//! 3. A port added later by `applyConfig` gets its listeners from a short-lived helper
//!    ([`open_capture_listeners`]): cloned from the launcher thread like the spawn helper, it runs
//!    `hive_launcher::setup::capture_helper`, which joins the sandbox's user and network namespaces (which grants it the capabilities to bind ports
//!    below 1024 there), creates the sockets, sends them back over a socketpair and exits. A
//!    reader thread receives them while it runs, so any number of ports fits through the socket.
//!
//! A capture port that cannot be bound (already taken by the proxy or DNS socket, IPv6 disabled)
//! is skipped; the parent compares what arrived with what it asked for and logs the difference.
//!
//! # Security
//! The address the sandbox dialled is never used as a destination by itself: the proxy maps a
//! sandbox-local address back to a name (or takes an IP literal at face value and decides it like
//! any CONNECT to that address), and connects from the host after its own decision. The routes
//! exist only inside the sandbox's namespace and vanish with it; the workload holds no capability
//! to change them (and seccomp refuses it netlink sockets).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use hive_launcher::setup::CaptureHelper;
pub(crate) use hive_launcher::setup::FdKind;
pub use hive_launcher::setup::DNS_PORT;

use super::netns;
use crate::error::{HiveError, Result};

/// Capture listeners received from a sandbox, by port (blocking mode).
pub type CaptureListeners = Vec<(u16, std::net::TcpListener)>;

/// `clone` entry point of the capture helper: `arg` is the launcher's `&CaptureHelper`.
extern "C" fn helper_entry(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: this is the freshly cloned helper (only `open_capture_listeners` passes this entry
    // to clone), and `arg` is its CaptureHelper, alive while the launcher waits (CLONE_VFORK).
    unsafe { hive_launcher::setup::capture_helper(&*(arg as *const CaptureHelper)) }
}

/// Creates capture listeners for `ports` inside the network namespace `netns` (owned by the user
/// namespace `userns`) through a short-lived helper; returns those that could be bound. Runs on
/// the launcher thread.
pub(crate) fn open_capture_listeners(
    userns: RawFd,
    netns_fd: RawFd,
    ports: &[u16],
) -> Result<CaptureListeners> {
    let mut pair = [-1; 2];
    // SAFETY: pair is a valid 2-element array.
    if unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            pair.as_mut_ptr(),
        )
    } < 0
    {
        return Err(HiveError::io("socketpair", std::io::Error::last_os_error()));
    }
    // SAFETY: fresh fds.
    let (ours, theirs) = unsafe { (OwnedFd::from_raw_fd(pair[0]), OwnedFd::from_raw_fd(pair[1])) };
    let plan = CaptureHelper {
        userns,
        netns: netns_fd,
        ctrl: theirs.as_raw_fd(),
        ports,
    };
    // The helper sends two messages per port; a socket buffer holds a few hundred, and the
    // launcher thread is suspended until the helper exits (CLONE_VFORK). So another thread reads
    // while it runs: otherwise a config with many new ports would block the launcher for good.
    let reader = std::thread::Builder::new()
        .name("hive-capture-fds".into())
        .spawn(move || receive_listeners(&ours))
        .map_err(|e| HiveError::io("starting the capture fd reader", e))?;
    let mut stack = vec![0u8; 64 * 1024];
    let stack_top = (stack.as_mut_ptr() as usize + stack.len()) & !0xf;
    // SAFETY: the child runs only helper_entry (`hive_launcher::setup::capture_helper`: no_std
    // without alloc, raw syscalls, never returns) on its own stack;
    // CLONE_VFORK keeps `plan` and `stack` alive until it exits.
    let pid = super::with_signals_blocked(|| unsafe {
        libc::clone(
            helper_entry,
            stack_top as *mut libc::c_void,
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            &plan as *const CaptureHelper as *mut libc::c_void,
        ) as libc::c_long
    }) as libc::c_int;
    drop(stack);
    let forked = if pid < 0 {
        Err(HiveError::io(
            "forking the capture helper",
            std::io::Error::last_os_error(),
        ))
    } else {
        let mut status = 0;
        // SAFETY: reaping our own helper.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        Ok(())
    };
    // The helper's copy is closed; closing ours ends the reader's stream.
    drop(theirs);
    let received = reader
        .join()
        .map_err(|_| HiveError::Internal("the capture fd reader panicked".into()))?;
    forked?;
    received
}

/// Reads the helper's messages until every sender has closed the socket: the listeners, or the
/// helper's failure report. Keeps reading after a failure so the helper never blocks on a full
/// socket.
fn receive_listeners(ours: &OwnedFd) -> Result<CaptureListeners> {
    let mut out = Vec::new();
    let mut failure = None;
    loop {
        match netns::recv_report(ours.as_raw_fd()) {
            Ok(None) => break,
            Ok(Some((buf, fd))) => {
                let word = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]);
                match (FdKind::from_word(word), fd) {
                    (Some(FdKind::CaptureV4 | FdKind::CaptureV6), Some(fd)) => {
                        let port = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]) as u16;
                        out.push((port, std::net::TcpListener::from(fd)));
                    }
                    _ if failure.is_some() => {}
                    _ => {
                        let (stage, errno) = hive_launcher::decode_report(&buf);
                        failure = Some(HiveError::Internal(format!(
                            "capture helper failed while {}: {}",
                            stage.describe(),
                            super::errno_text(errno)
                        )));
                    }
                }
            }
            Err(e) => {
                failure.get_or_insert(HiveError::io("receiving capture listeners", e));
                break;
            }
        }
    }
    match failure {
        Some(e) => Err(e),
        None => Ok(out),
    }
}
