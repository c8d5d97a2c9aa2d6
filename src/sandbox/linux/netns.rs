//! The sandbox's network: `lo` only, the proxy listener created inside, fd passing.
//!
//! 1. init brings `lo` up with `SIOCSIFFLAGS` (the kernel then assigns 127.0.0.1/8 and ::1);
//!    there is no other interface and no route, so a direct connection fails at once with
//!    `ENETUNREACH`, and the host's loopback is another namespace's.
//! 2. init binds `127.0.0.1:<proxy_port>` inside the namespace and sends the fd to the parent
//!    over the control socket (`SCM_RIGHTS`) together with its status report.
//! 3. The parent receives it ([`recv_report`]) and hands it to the proxy; the listener a
//!    connection arrives on identifies the sandbox.
//! 4. The transparent path ([`super::capture`]) adds local routes, the DNS sockets and the capture
//!    listeners; each of their fds travels in its own message ([`send_fd`]) before the final
//!    status report.
//!
//! # Security
//! `lo` up returning `EPERM` is how Ubuntu's AppArmor user-namespace restriction shows (the userns
//! is created but holds no capabilities): the parent turns it into `HIVE_USERNS_UNAVAILABLE`.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};

use super::capture::{FdKind, FD_MESSAGE};
use super::child::{check_i, encode_report, errno, CResult, Fail, Stage};

/// Brings the loopback interface up (child side); returns its interface index.
pub(crate) unsafe fn loopback_up() -> CResult<u32> {
    let sock = check_i(
        libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0),
        Stage::LoopbackUp,
    )?;
    let mut req: libc::ifreq = std::mem::zeroed();
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0".iter()) {
        *dst = *src as libc::c_char;
    }
    let r = (|| {
        check_i(
            libc::ioctl(sock, libc::SIOCGIFFLAGS as _, &mut req),
            Stage::LoopbackUp,
        )?;
        req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        check_i(
            libc::ioctl(sock, libc::SIOCSIFFLAGS as _, &req),
            Stage::LoopbackUp,
        )?;
        check_i(
            libc::ioctl(sock, libc::SIOCGIFINDEX as _, &mut req),
            Stage::LoopbackUp,
        )?;
        Ok(req.ifr_ifru.ifru_ifindex as u32)
    })();
    libc::close(sock);
    r
}

/// Binds and listens on `127.0.0.1:port` (child side). Returns the fd.
pub(crate) unsafe fn proxy_listener(port: u16) -> CResult<RawFd> {
    let fd = check_i(
        libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0),
        Stage::Listener,
    )?;
    let one: libc::c_int = 1;
    check_i(
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        ),
        Stage::Listener,
    )?;
    let mut addr: libc::sockaddr_in = std::mem::zeroed();
    addr.sin_family = libc::AF_INET as libc::sa_family_t;
    addr.sin_port = port.to_be();
    addr.sin_addr.s_addr = u32::from_be_bytes([127, 0, 0, 1]).to_be();
    check_i(
        libc::bind(
            fd,
            (&addr as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        ),
        Stage::Listener,
    )?;
    check_i(libc::listen(fd, 1024), Stage::Listener)?;
    Ok(fd)
}

/// Control-message buffer big enough for one fd, aligned for `cmsghdr`.
#[repr(C, align(8))]
struct CmsgBuf([u8; 64]);

/// Sends a status report, with `fd` attached when given (child side; no allocation).
pub(crate) unsafe fn send_report(
    sock: RawFd,
    stage: Stage,
    err: i32,
    fd: Option<RawFd>,
) -> CResult {
    send_message(sock, encode_report(stage, err), fd)
}

/// Sends one fd created for the capture path, tagged with its kind and port (see
/// [`super::capture`]; child side, no allocation).
pub(crate) unsafe fn send_fd(sock: RawFd, kind: FdKind, port: u16, fd: RawFd) -> CResult {
    let word = (FD_MESSAGE + kind as u32).to_le_bytes();
    let port = u32::from(port).to_le_bytes();
    let payload = [
        word[0], word[1], word[2], word[3], port[0], port[1], port[2], port[3],
    ];
    send_message(sock, payload, Some(fd))
}

unsafe fn send_message(sock: RawFd, payload: [u8; 8], fd: Option<RawFd>) -> CResult {
    let mut iov = libc::iovec {
        iov_base: payload.as_ptr() as *mut libc::c_void,
        iov_len: payload.len(),
    };
    let mut cbuf = CmsgBuf([0; 64]);
    let mut msg: libc::msghdr = std::mem::zeroed();
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if let Some(fd) = fd {
        let space = libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) as usize;
        msg.msg_control = cbuf.0.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        if cmsg.is_null() {
            return Err(Fail {
                stage: Stage::SendListener,
                errno: libc::EINVAL,
            });
        }
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg) as *mut RawFd, fd);
    }
    loop {
        if libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL) >= 0 {
            return Ok(());
        }
        if errno() != libc::EINTR {
            return Err(Fail {
                stage: Stage::SendListener,
                errno: errno(),
            });
        }
    }
}

/// Receives a report and an optional fd (parent side, blocking). `Ok(None)` on EOF.
pub(crate) fn recv_report(sock: RawFd) -> std::io::Result<Option<([u8; 8], Option<OwnedFd>)>> {
    let mut payload = [0u8; 8];
    let mut iov = libc::iovec {
        iov_base: payload.as_mut_ptr().cast(),
        iov_len: payload.len(),
    };
    let mut cbuf = CmsgBuf([0; 64]);
    // SAFETY: msghdr is plain data; all pointers reference live locals.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.0.as_mut_ptr().cast();
        msg.msg_controllen = cbuf.0.len() as _;
        let n = loop {
            let n = libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC);
            if n >= 0 {
                break n;
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
        };
        let mut fd = None;
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let raw = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg) as *const RawFd);
                fd = Some(OwnedFd::from_raw_fd(raw));
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
        if n == 0 {
            return Ok(None);
        }
        if (n as usize) < payload.len() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "short report",
            ));
        }
        Ok(Some((payload, fd)))
    }
}
