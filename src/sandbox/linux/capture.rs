//! Transparent capture inside the sandbox's network namespace (docs/network-access.md#dns-and-transparent-capture).
//!
//! Clients that ignore proxy variables (Node's `fetch`, Go, raw sockets) still reach the policy:
//! 1. init adds two local routes in the namespace's `local` table, `local 0.0.0.0/0 dev lo` and
//!    `local ::/0 dev lo` ([`local_routes`], rtnetlink over a raw `NETLINK_ROUTE` socket, built on
//!    the stack): every address is then "this host", so a connection to any address lands on
//!    whatever listens on that port inside, and a port nothing listens on answers `RST` at once
//!    (`ECONNREFUSED`) instead of `ENETUNREACH`; UDP to any port but DNS gets port-unreachable.
//! 2. init creates the DNS sockets on `127.0.0.1:53` (UDP and TCP, [`dns_sockets`]) and one capture
//!    listener per port on `0.0.0.0` and `[::]` (`IPV6_V6ONLY`, [`capture_listeners`]): 80, 443
//!    and every port an allow rule names. Each fd goes to the parent in its own message tagged with
//!    its [`FdKind`] and port; the parent serves them (the DNS responder, the proxy's transparent
//!    listeners), so the listener a connection arrives on identifies the sandbox.
//! 3. A port added later by `applyConfig` gets its listeners from a short-lived helper
//!    ([`open_capture_listeners`]): cloned from the launcher thread like the spawn helper, it joins
//!    the sandbox's user and network namespaces (which grants it the capabilities to bind ports
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

use super::child::{check_i, errno, CResult, Fail, Stage};
use super::netns;
use crate::error::{HiveError, Result};

/// What an fd message carries (its first payload word is `FD_MESSAGE + kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub(crate) enum FdKind {
    DnsUdp = 1,
    DnsTcp = 2,
    CaptureV4 = 3,
    CaptureV6 = 4,
}

/// Base of the first payload word of an fd message; status reports use [`Stage`] values (< 256).
pub(crate) const FD_MESSAGE: u32 = 0x1000;

impl FdKind {
    /// Decodes the first payload word of a message; `None` for a status report.
    pub(crate) fn from_word(word: u32) -> Option<FdKind> {
        match word.checked_sub(FD_MESSAGE)? {
            1 => Some(FdKind::DnsUdp),
            2 => Some(FdKind::DnsTcp),
            3 => Some(FdKind::CaptureV4),
            4 => Some(FdKind::CaptureV6),
            _ => None,
        }
    }
}

/// The DNS port inside every sandbox.
pub const DNS_PORT: u16 = 53;

const RTM_NEWROUTE: u16 = 24;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_REPLACE: u16 = 0x100;
const NLM_F_CREATE: u16 = 0x400;
const NLMSG_ERROR: u16 = 2;
const RT_TABLE_LOCAL: u8 = 255;
const RTPROT_BOOT: u8 = 3;
const RT_SCOPE_HOST: u8 = 254;
const RTN_LOCAL: u8 = 2;
const RTA_OIF: u16 = 4;

/// `RTM_NEWROUTE` for `local <any>/0 dev <ifindex> table local`: header (16) + rtmsg (12) +
/// `RTA_OIF` (8).
fn route_message(family: u8, ifindex: u32, seq: u32) -> [u8; 36] {
    let mut m = [0u8; 36];
    m[0..4].copy_from_slice(&36u32.to_ne_bytes());
    m[4..6].copy_from_slice(&RTM_NEWROUTE.to_ne_bytes());
    let flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE;
    m[6..8].copy_from_slice(&flags.to_ne_bytes());
    m[8..12].copy_from_slice(&seq.to_ne_bytes());
    // rtmsg: family, dst_len 0, src_len 0, tos 0, table, protocol, scope, type, flags 0.
    m[16] = family;
    m[20] = RT_TABLE_LOCAL;
    m[21] = RTPROT_BOOT;
    m[22] = RT_SCOPE_HOST;
    m[23] = RTN_LOCAL;
    m[28..30].copy_from_slice(&8u16.to_ne_bytes());
    m[30..32].copy_from_slice(&RTA_OIF.to_ne_bytes());
    m[32..36].copy_from_slice(&ifindex.to_ne_bytes());
    m
}

/// The errno of a netlink ack (`0` = success), or `None` if `buf` is no `NLMSG_ERROR`.
fn ack_errno(buf: &[u8]) -> Option<i32> {
    let kind = u16::from_ne_bytes([*buf.get(4)?, *buf.get(5)?]);
    if kind != NLMSG_ERROR {
        return None;
    }
    let e = i32::from_ne_bytes([*buf.get(16)?, *buf.get(17)?, *buf.get(18)?, *buf.get(19)?]);
    Some(-e)
}

/// Adds `local 0.0.0.0/0 dev lo` and `local ::/0 dev lo` (child side, needs `CAP_NET_ADMIN` in
/// the namespace's user namespace). A failing IPv6 route is ignored (IPv6 then has no route at
/// all and fails closed).
pub(crate) unsafe fn local_routes(lo_index: u32) -> CResult {
    let sock = check_i(
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        ),
        Stage::Routes,
    )?;
    let r = (|| {
        for (seq, family) in [(1u32, libc::AF_INET as u8), (2, libc::AF_INET6 as u8)] {
            let msg = route_message(family, lo_index, seq);
            if libc::send(sock, msg.as_ptr().cast(), msg.len(), 0) < 0 {
                return Err(Fail {
                    stage: Stage::Routes,
                    errno: errno(),
                });
            }
            let mut buf = [0u8; 512];
            let n = libc::recv(sock, buf.as_mut_ptr().cast(), buf.len(), 0);
            if n < 0 {
                return Err(Fail {
                    stage: Stage::Routes,
                    errno: errno(),
                });
            }
            let got = buf.get(..n as usize).unwrap_or(&[]);
            match ack_errno(got) {
                Some(0) => {}
                // IPv6 disabled (boot parameter, sysctl): IPv4 capture still holds, and IPv6
                // stays without any route, so it fails closed (`ENETUNREACH`).
                Some(_) if family == libc::AF_INET6 as u8 => {}
                Some(e) => {
                    return Err(Fail {
                        stage: Stage::Routes,
                        errno: e,
                    })
                }
                None => {
                    return Err(Fail {
                        stage: Stage::Routes,
                        errno: libc::EPROTO,
                    })
                }
            }
        }
        Ok(())
    })();
    libc::close(sock);
    r
}

unsafe fn set_int(fd: RawFd, level: libc::c_int, name: libc::c_int, value: libc::c_int) -> bool {
    libc::setsockopt(
        fd,
        level,
        name,
        (&value as *const libc::c_int).cast(),
        std::mem::size_of::<libc::c_int>() as libc::socklen_t,
    ) == 0
}

/// A socket of `kind` (`SOCK_STREAM` listening, or `SOCK_DGRAM`) bound to `127.0.0.1:port`,
/// `0.0.0.0:port` (`any`) or `[::]:port` (`v6`, `IPV6_V6ONLY`). Returns the errno on failure.
pub(crate) unsafe fn bound_socket(
    kind: libc::c_int,
    v6: bool,
    any: bool,
    port: u16,
) -> Result<RawFd, i32> {
    let family = if v6 { libc::AF_INET6 } else { libc::AF_INET };
    let fd = libc::socket(family, kind | libc::SOCK_CLOEXEC, 0);
    if fd < 0 {
        return Err(errno());
    }
    let fail = |fd: RawFd| {
        let e = errno();
        libc::close(fd);
        Err(e)
    };
    if kind == libc::SOCK_STREAM && !set_int(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1) {
        return fail(fd);
    }
    let r = if v6 {
        if !set_int(fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 1) {
            return fail(fd);
        }
        let mut addr: libc::sockaddr_in6 = std::mem::zeroed();
        addr.sin6_family = libc::AF_INET6 as libc::sa_family_t;
        addr.sin6_port = port.to_be();
        libc::bind(
            fd,
            (&addr as *const libc::sockaddr_in6).cast(),
            std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
        )
    } else {
        let mut addr: libc::sockaddr_in = std::mem::zeroed();
        addr.sin_family = libc::AF_INET as libc::sa_family_t;
        addr.sin_port = port.to_be();
        let ip = if any { [0, 0, 0, 0] } else { [127, 0, 0, 1] };
        addr.sin_addr.s_addr = u32::from_be_bytes(ip).to_be();
        libc::bind(
            fd,
            (&addr as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return fail(fd);
    }
    if kind == libc::SOCK_STREAM && libc::listen(fd, 1024) < 0 {
        return fail(fd);
    }
    Ok(fd)
}

/// Creates the DNS sockets on `127.0.0.1:53` and sends them over `ctrl` (child side).
pub(crate) unsafe fn dns_sockets(ctrl: RawFd) -> CResult {
    for (kind, fd_kind) in [
        (libc::SOCK_DGRAM, FdKind::DnsUdp),
        (libc::SOCK_STREAM, FdKind::DnsTcp),
    ] {
        let fd = bound_socket(kind, false, false, DNS_PORT).map_err(|errno| Fail {
            stage: Stage::DnsSocket,
            errno,
        })?;
        let sent = netns::send_fd(ctrl, fd_kind, DNS_PORT, fd);
        libc::close(fd);
        sent?;
    }
    Ok(())
}

/// Creates the capture listeners for `ports` (IPv4 and IPv6) and sends each over `ctrl`; a
/// port that cannot be bound is skipped (child side, no allocation).
pub(crate) unsafe fn capture_listeners(ctrl: RawFd, ports: &[u16]) -> CResult {
    for &port in ports {
        for (v6, kind) in [(false, FdKind::CaptureV4), (true, FdKind::CaptureV6)] {
            if let Ok(fd) = bound_socket(libc::SOCK_STREAM, v6, true, port) {
                let sent = netns::send_fd(ctrl, kind, port, fd);
                libc::close(fd);
                sent?;
            }
        }
    }
    Ok(())
}

/// Capture listeners received from a sandbox, by port (blocking mode).
pub type CaptureListeners = Vec<(u16, std::net::TcpListener)>;

/// What the capture helper needs; plain data read by the helper (it shares the parent's memory).
struct HelperPlan<'a> {
    userns: RawFd,
    netns: RawFd,
    ctrl: RawFd,
    ports: &'a [u16],
}

extern "C" fn helper_entry(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: arg is the launcher's &HelperPlan, alive while the launcher waits (CLONE_VFORK).
    unsafe {
        let plan = &*(arg as *const HelperPlan);
        if libc::syscall(libc::SYS_setns, plan.userns, libc::CLONE_NEWUSER) < 0
            || libc::syscall(libc::SYS_setns, plan.netns, libc::CLONE_NEWNET) < 0
        {
            let _ = netns::send_report(plan.ctrl, Stage::Setns, errno(), None);
            libc::_exit(1);
        }
        let code = match capture_listeners(plan.ctrl, plan.ports) {
            Ok(()) => 0,
            Err(f) => {
                let _ = netns::send_report(plan.ctrl, f.stage, f.errno, None);
                1
            }
        };
        libc::_exit(code)
    }
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
    let plan = HelperPlan {
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
    // SAFETY: the child runs only helper_entry (allocation-free, never returns) on its own stack;
    // CLONE_VFORK keeps `plan` and `stack` alive until it exits.
    let pid = super::with_signals_blocked(|| unsafe {
        libc::clone(
            helper_entry,
            stack_top as *mut libc::c_void,
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            &plan as *const HelperPlan as *mut libc::c_void,
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
                        let (stage, errno) = super::child::decode_report(&buf);
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

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn route_messages_have_the_rtnetlink_layout() {
        for (family, ifindex) in [(libc::AF_INET as u8, 1u32), (libc::AF_INET6 as u8, 7)] {
            let m = route_message(family, ifindex, 9);
            assert_eq!(u32::from_ne_bytes([m[0], m[1], m[2], m[3]]), 36);
            assert_eq!(u16::from_ne_bytes([m[4], m[5]]), RTM_NEWROUTE);
            assert_eq!(
                (m[16], m[17], m[20], m[22], m[23]),
                (family, 0, 255, 254, 2)
            );
            assert_eq!(u32::from_ne_bytes([m[32], m[33], m[34], m[35]]), ifindex);
        }
    }

    #[test]
    fn acks_decode() {
        let mut ok = [0u8; 36];
        ok[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        let mut eperm = ok;
        eperm[16..20].copy_from_slice(&(-libc::EPERM).to_ne_bytes());
        let mut other = ok;
        other[4..6].copy_from_slice(&3u16.to_ne_bytes());
        for (buf, want) in [
            (&ok[..], Some(0)),
            (&eperm[..], Some(libc::EPERM)),
            (&other[..], None),
            (&ok[..10], None),
        ] {
            assert_eq!(ack_errno(buf), want);
        }
    }

    #[test]
    fn fd_kinds_round_trip() {
        for kind in [
            FdKind::DnsUdp,
            FdKind::DnsTcp,
            FdKind::CaptureV4,
            FdKind::CaptureV6,
        ] {
            assert_eq!(FdKind::from_word(FD_MESSAGE + kind as u32), Some(kind));
        }
        assert_eq!(FdKind::from_word(0), None);
        assert_eq!(FdKind::from_word(FD_MESSAGE + 9), None);
    }
}
