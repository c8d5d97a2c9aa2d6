//! The parent's end of the control socket the setup child (`hive_launcher::setup`) reports on.
//!
//! The child sets up the sandbox's network (`lo` only, the proxy listener created inside, the
//! capture routes, DNS sockets and capture listeners: `hive_launcher::setup::net`) and sends each
//! socket over the control socket (`SCM_RIGHTS`): one message per capture fd, tagged with its
//! kind and port ([`super::capture::FdKind`]), then the final status report with the proxy
//! listener attached. [`recv_report`] receives them; the listener a connection arrives on
//! identifies the sandbox.
//!
//! # Security
//! `lo` up returning `EPERM` is how Ubuntu's AppArmor user-namespace restriction shows (the userns
//! is created but holds no capabilities): the parent turns it into `HIVE_USERNS_UNAVAILABLE`.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// Control-message buffer big enough for one fd, aligned for `cmsghdr`.
#[repr(C, align(8))]
struct CmsgBuf([u8; 64]);

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
