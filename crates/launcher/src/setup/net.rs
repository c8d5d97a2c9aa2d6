//! The sandbox's network, made by the setup child inside its new network namespace: `lo` up, the
//! proxy listener, the transparent capture (routes, DNS sockets, capture listeners), and the fd
//! passing that hands the sockets to the host over the control socket (`SCM_RIGHTS`). Runs
//! between `clone` and `exec` in the host's memory ([`super`]): allocation-free, raw syscalls
//! only.
//!
//! 1. `lo` up with `SIOCSIFFLAGS` (the kernel then assigns 127.0.0.1/8 and ::1); there is no other
//!    interface, so a direct connection has nowhere to go, and the host's loopback is another
//!    namespace's.
//! 2. The proxy listener on `127.0.0.1:<proxy_port>`, attached to the final report.
//! 3. Two local routes in the namespace's `local` table, `local 0.0.0.0/0 dev lo` and
//!    `local ::/0 dev lo` ([`local_routes`], rtnetlink over a raw `NETLINK_ROUTE` socket, built on
//!    the stack): every address is then "this host", so a connection to any address lands on
//!    whatever listens on that port inside, and a port nothing listens on answers `RST` at once
//!    (`ECONNREFUSED`); UDP to any port but DNS gets port-unreachable.
//! 4. The DNS sockets on `127.0.0.1:53` (UDP and TCP, [`dns_sockets`]) and one capture listener
//!    per port on `0.0.0.0` and `[::]` (`IPV6_V6ONLY`, [`capture_listeners`]). Each fd goes to the
//!    parent in its own message tagged with its [`FdKind`] and port.
//! 5. A port added later gets its listeners from a short-lived helper ([`capture_helper`]) that
//!    joins the sandbox's user and network namespaces and does step 4's capture part.
//!
//! A capture port that cannot be bound (already taken by the proxy or DNS socket, IPv6 disabled)
//! is skipped; the parent compares what arrived with what it asked for.
//!
//! # Security
//! `lo` up returning `EPERM` is how Ubuntu's AppArmor user-namespace restriction shows (the userns
//! is created but holds no capabilities): the parent turns it into `HIVE_USERNS_UNAVAILABLE`.

use linux_raw_sys::ioctl::{SIOCGIFFLAGS, SIOCGIFINDEX, SIOCSIFFLAGS};
use linux_raw_sys::net as n;
use linux_raw_sys::netlink as nl;

use super::{At, Fail, SetupResult};
use crate::stage::{encode_report, Stage};
use crate::sys::{self, Errno};

/// What an fd message carries (its first payload word is [`FD_MESSAGE`] + kind).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum FdKind {
    /// The DNS responder's UDP socket.
    DnsUdp = 1,
    /// The DNS responder's TCP listener.
    DnsTcp = 2,
    /// A capture listener on `0.0.0.0`.
    CaptureV4 = 3,
    /// A capture listener on `[::]`.
    CaptureV6 = 4,
}

/// Base of the first payload word of an fd message; status reports use [`Stage`] values (< 256).
pub const FD_MESSAGE: u32 = 0x1000;

impl FdKind {
    /// Decodes the first payload word of a message; `None` for a status report.
    pub fn from_word(word: u32) -> Option<FdKind> {
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

/// Sends a status report, with `fd` attached when given.
pub fn send_report(sock: i32, stage: Stage, err: i32, fd: Option<i32>) -> SetupResult {
    sys::send_with_fd(sock, &encode_report(stage, err), fd).at(Stage::SendListener)?;
    Ok(())
}

/// Sends one fd of the capture path, tagged with its kind and port.
pub fn send_fd(sock: i32, kind: FdKind, port: u16, fd: i32) -> SetupResult {
    let word = (FD_MESSAGE + kind as u32).to_le_bytes();
    let port = u32::from(port).to_le_bytes();
    let payload = [
        word[0], word[1], word[2], word[3], port[0], port[1], port[2], port[3],
    ];
    sys::send_with_fd(sock, &payload, Some(fd)).at(Stage::SendListener)?;
    Ok(())
}

/// Brings the loopback interface up; returns its interface index.
pub fn loopback_up() -> SetupResult<u32> {
    let sock = sys::socket_cloexec(n::AF_INET, n::SOCK_DGRAM, 0).at(Stage::LoopbackUp)?;
    let r = loopback_up_with(sock);
    let _ = sys::close(sock);
    r
}

fn loopback_up_with(sock: i32) -> SetupResult<u32> {
    let mut name = [0 as core::ffi::c_char; 16];
    for (dst, src) in name.iter_mut().zip(b"lo") {
        *dst = *src as core::ffi::c_char;
    }
    let mut req = n::ifreq {
        ifr_ifrn: n::ifreq__bindgen_ty_1 { ifrn_name: name },
        // The largest member, zeroed (the old libc code zeroed the whole struct).
        ifr_ifru: n::ifreq__bindgen_ty_2 {
            ifru_map: n::ifmap {
                mem_start: 0,
                mem_end: 0,
                base_addr: 0,
                irq: 0,
                dma: 0,
                port: 0,
            },
        },
    };
    sys::ioctl_ifreq(sock, SIOCGIFFLAGS, &mut req).at(Stage::LoopbackUp)?;
    // SAFETY: SIOCGIFFLAGS filled `ifru_flags` (a plain integer; every bit pattern is valid).
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    let up = (n::net_device_flags::IFF_UP as u32 | n::net_device_flags::IFF_RUNNING as u32) as i16;
    req.ifr_ifru.ifru_flags = flags | up;
    sys::ioctl_ifreq(sock, SIOCSIFFLAGS, &mut req).at(Stage::LoopbackUp)?;
    sys::ioctl_ifreq(sock, SIOCGIFINDEX, &mut req).at(Stage::LoopbackUp)?;
    // SAFETY: SIOCGIFINDEX filled `ifru_ivalue` (a plain integer).
    Ok(unsafe { req.ifr_ifru.ifru_ivalue } as u32)
}

/// `127.0.0.1:port` (`any`: `0.0.0.0:port`).
fn v4(port: u16, any: bool) -> n::sockaddr_in {
    let ip = if any { [0, 0, 0, 0] } else { [127, 0, 0, 1] };
    n::sockaddr_in {
        sin_family: n::AF_INET as _,
        sin_port: port.to_be(),
        sin_addr: n::in_addr {
            s_addr: u32::from_be_bytes(ip).to_be(),
        },
        __pad: [0; 8],
    }
}

/// Binds and listens on `127.0.0.1:port`; returns the fd.
pub fn proxy_listener(port: u16) -> SetupResult<i32> {
    let fd = sys::socket_cloexec(n::AF_INET, n::SOCK_STREAM, 0).at(Stage::Listener)?;
    sys::setsockopt_int(fd, n::SOL_SOCKET, n::SO_REUSEADDR, 1).at(Stage::Listener)?;
    sys::bind_v4(fd, &v4(port, false)).at(Stage::Listener)?;
    sys::listen(fd, 1024).at(Stage::Listener)?;
    Ok(fd)
}

const RTM_NEWROUTE: u16 = nl::RTM_NEWROUTE as u16;
const NLMSG_ERROR: u16 = nl::NLMSG_ERROR as u16;
const RTA_OIF: u16 = nl::rtattr_type_t::RTA_OIF as u16;

/// `RTM_NEWROUTE` for `local <any>/0 dev <ifindex> table local`: header (16) + rtmsg (12) +
/// `RTA_OIF` (8).
fn route_message(family: u8, ifindex: u32, seq: u32) -> [u8; 36] {
    let flags = (nl::NLM_F_REQUEST | nl::NLM_F_ACK | nl::NLM_F_CREATE | nl::NLM_F_REPLACE) as u16;
    let len = 36u32.to_ne_bytes();
    let kind = RTM_NEWROUTE.to_ne_bytes();
    let flags = flags.to_ne_bytes();
    let seq = seq.to_ne_bytes();
    let attr_len = 8u16.to_ne_bytes();
    let attr = RTA_OIF.to_ne_bytes();
    let ifindex = ifindex.to_ne_bytes();
    [
        // nlmsghdr: len, type, flags, seq, pid 0.
        len[0],
        len[1],
        len[2],
        len[3],
        kind[0],
        kind[1],
        flags[0],
        flags[1],
        seq[0],
        seq[1],
        seq[2],
        seq[3],
        0,
        0,
        0,
        0,
        // rtmsg: family, dst_len 0, src_len 0, tos 0, table, protocol, scope, type, flags 0.
        family,
        0,
        0,
        0,
        nl::rt_class_t::RT_TABLE_LOCAL as u8,
        nl::RTPROT_BOOT as u8,
        nl::rt_scope_t::RT_SCOPE_HOST as u8,
        nl::RTN_LOCAL as u8,
        0,
        0,
        0,
        0,
        // rtattr RTA_OIF: len 8, type, the interface index.
        attr_len[0],
        attr_len[1],
        attr[0],
        attr[1],
        ifindex[0],
        ifindex[1],
        ifindex[2],
        ifindex[3],
    ]
}

/// The errno of a netlink ack (`0` = success), or `None` if `buf` is no `NLMSG_ERROR`.
fn ack_errno(buf: &[u8]) -> Option<i32> {
    let kind = u16::from_ne_bytes([*buf.get(4)?, *buf.get(5)?]);
    if kind != NLMSG_ERROR {
        return None;
    }
    let e = i32::from_ne_bytes([*buf.get(16)?, *buf.get(17)?, *buf.get(18)?, *buf.get(19)?]);
    Some(e.wrapping_neg())
}

/// Adds `local 0.0.0.0/0 dev lo` and `local ::/0 dev lo` (needs `CAP_NET_ADMIN` in the
/// namespace's user namespace). A failing IPv6 route is ignored (IPv6 then has no route at all
/// and fails closed).
pub fn local_routes(lo_index: u32) -> SetupResult {
    let sock =
        sys::socket_cloexec(n::AF_NETLINK, n::SOCK_RAW, nl::NETLINK_ROUTE).at(Stage::Routes)?;
    let r = local_routes_with(sock, lo_index);
    let _ = sys::close(sock);
    r
}

fn local_routes_with(sock: i32, lo_index: u32) -> SetupResult {
    for (seq, family) in [(1u32, n::AF_INET as u8), (2, n::AF_INET6 as u8)] {
        let msg = route_message(family, lo_index, seq);
        sys::send(sock, &msg).at(Stage::Routes)?;
        let mut buf = [0u8; 512];
        let got = sys::recv(sock, &mut buf).at(Stage::Routes)?;
        match ack_errno(buf.get(..got).unwrap_or(&[])) {
            Some(0) => {}
            // IPv6 disabled (boot parameter, sysctl): IPv4 capture still holds, and IPv6 stays
            // without any route, so it fails closed (`ENETUNREACH`).
            Some(_) if family == n::AF_INET6 as u8 => {}
            Some(errno) => {
                return Err(Fail {
                    stage: Stage::Routes,
                    errno,
                })
            }
            None => {
                return Err(Fail {
                    stage: Stage::Routes,
                    errno: sys::EPROTO as i32,
                })
            }
        }
    }
    Ok(())
}

/// A socket of `kind` (`SOCK_STREAM` listening, or `SOCK_DGRAM`) bound to `127.0.0.1:port`,
/// `0.0.0.0:port` (`any`) or `[::]:port` (`v6`, `IPV6_V6ONLY`).
fn bound_socket(kind: u32, v6: bool, any: bool, port: u16) -> Result<i32, Errno> {
    let family = if v6 { n::AF_INET6 } else { n::AF_INET };
    let fd = sys::socket_cloexec(family, kind, 0)?;
    let r = bind_and_listen(fd, kind, v6, any, port);
    if r.is_err() {
        let _ = sys::close(fd);
    }
    r.map(|_| fd)
}

fn bind_and_listen(fd: i32, kind: u32, v6: bool, any: bool, port: u16) -> Result<(), Errno> {
    let stream = kind == n::SOCK_STREAM;
    if stream {
        sys::setsockopt_int(fd, n::SOL_SOCKET, n::SO_REUSEADDR, 1)?;
    }
    if v6 {
        let ipv6 = n::IPPROTO_IPV6 as u32;
        sys::setsockopt_int(fd, ipv6, n::IPV6_V6ONLY, 1)?;
        let addr = n::sockaddr_in6 {
            sin6_family: n::AF_INET6 as _,
            sin6_port: port.to_be(),
            sin6_flowinfo: 0,
            sin6_addr: n::in6_addr {
                in6_u: n::in6_addr__bindgen_ty_1 { u6_addr8: [0; 16] },
            },
            sin6_scope_id: 0,
        };
        sys::bind_v6(fd, &addr)?;
    } else {
        sys::bind_v4(fd, &v4(port, any))?;
    }
    if stream {
        sys::listen(fd, 1024)?;
    }
    Ok(())
}

/// Creates the DNS sockets on `127.0.0.1:53` and sends them over `ctrl`.
pub fn dns_sockets(ctrl: i32) -> SetupResult {
    for (kind, fd_kind) in [
        (n::SOCK_DGRAM, FdKind::DnsUdp),
        (n::SOCK_STREAM, FdKind::DnsTcp),
    ] {
        let fd = bound_socket(kind, false, false, DNS_PORT).at(Stage::DnsSocket)?;
        let sent = send_fd(ctrl, fd_kind, DNS_PORT, fd);
        let _ = sys::close(fd);
        sent?;
    }
    Ok(())
}

/// Creates the capture listeners for `ports` (IPv4 and IPv6) and sends each over `ctrl`; a port
/// that cannot be bound is skipped.
pub fn capture_listeners(ctrl: i32, ports: &[u16]) -> SetupResult {
    for &port in ports {
        for (v6, kind) in [(false, FdKind::CaptureV4), (true, FdKind::CaptureV6)] {
            if let Ok(fd) = bound_socket(n::SOCK_STREAM, v6, true, port) {
                let sent = send_fd(ctrl, kind, port, fd);
                let _ = sys::close(fd);
                sent?;
            }
        }
    }
    Ok(())
}

/// What the capture helper needs, prepared by the parent.
#[derive(Debug)]
pub struct CaptureHelper<'a> {
    /// The sandbox's user namespace.
    pub userns: i32,
    /// The sandbox's network namespace.
    pub netns: i32,
    /// Where the listeners (or a failure report) go.
    pub ctrl: i32,
    /// The ports to capture.
    pub ports: &'a [u16],
}

/// The capture helper's whole life (a `CLONE_VM | CLONE_VFORK` child of the launcher thread):
/// joins the sandbox's user namespace (which grants it the capabilities to bind ports below 1024
/// in the network namespace it owns) and network namespace, sends the capture listeners for
/// `h.ports` over `h.ctrl` and exits (0, or 1 after a failure report). Never returns.
///
/// # Safety
/// Only in a freshly cloned child, which must never return into the caller's frames.
pub unsafe fn capture_helper(h: &CaptureHelper<'_>) -> ! {
    let joined = sys::setns(h.userns, sys::CLONE_NEWUSER)
        .and_then(|_| sys::setns(h.netns, sys::CLONE_NEWNET));
    if let Err(Errno(e)) = joined {
        let _ = send_report(h.ctrl, Stage::Setns, e, None);
        sys::exit(1);
    }
    match capture_listeners(h.ctrl, h.ports) {
        Ok(()) => sys::exit(0),
        Err(f) => {
            let _ = send_report(h.ctrl, f.stage, f.errno, None);
            sys::exit(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_messages_have_the_rtnetlink_layout() {
        for (family, ifindex) in [(n::AF_INET as u8, 1u32), (n::AF_INET6 as u8, 7)] {
            let m = route_message(family, ifindex, 9);
            assert_eq!(u32::from_ne_bytes([m[0], m[1], m[2], m[3]]), 36);
            assert_eq!(u16::from_ne_bytes([m[4], m[5]]), 24);
            assert_eq!(u16::from_ne_bytes([m[6], m[7]]), 0x1 | 0x4 | 0x100 | 0x400);
            assert_eq!(u32::from_ne_bytes([m[8], m[9], m[10], m[11]]), 9);
            assert_eq!(
                (m[16], m[17], m[20], m[21], m[22], m[23]),
                (family, 0, 255, 3, 254, 2)
            );
            assert_eq!((m[28], m[30]), (8, 4));
            assert_eq!(u32::from_ne_bytes([m[32], m[33], m[34], m[35]]), ifindex);
        }
    }

    #[test]
    fn acks_decode() {
        let mut ok = [0u8; 36];
        ok[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        let mut eperm = ok;
        eperm[16..20].copy_from_slice(&(-1i32).to_ne_bytes());
        let mut other = ok;
        other[4..6].copy_from_slice(&3u16.to_ne_bytes());
        for (buf, want) in [
            (&ok[..], Some(0)),
            (&eperm[..], Some(1)),
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
