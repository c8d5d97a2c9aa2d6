//! The `hive-init` executable (built from `crates/launcher` by `build.rs`), embedded in the addon
//! and handed to the kernel as a sealed memfd (parent side).
//!
//! 1. Once per process ([`init_image`]): `memfd_create("hive-init", MFD_CLOEXEC |
//!    MFD_ALLOW_SEALING | MFD_EXEC)` (without `MFD_EXEC` on kernels before 6.3, which refuse the
//!    flag), write the bytes, then seal it against every change (`F_SEAL_SEAL | SHRINK | GROW |
//!    WRITE`, and `EXEC` where known).
//! 2. Every sandbox's setup child and every spawn helper `execveat`s that fd
//!    (`hive_launcher::stub`), so no page of the host's memory survives into a sandbox.
//!
//! # Security
//! One fd serves every sandbox of the process, so it must be immutable: the seals make a write,
//! truncate or mode change fail even through `/proc/<pid>/fd`, and the fd is close-on-exec, so no
//! other program the host runs inherits it. A memfd is not on any file system, so a `noexec`
//! `/tmp` does not stop it; `vm.memfd_noexec = 2` does, and then sandboxes fail to start with a
//! message naming that setting.

use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::OnceLock;

use crate::error::{HiveError, Result};

/// The executable, as built for this target.
pub(crate) const HIVE_INIT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/hive-init"));

const MFD_EXEC: libc::c_uint = 0x10;
const F_SEAL_EXEC: libc::c_int = 0x20;

/// The sealed memfd holding [`HIVE_INIT`], created on first use.
pub(crate) fn init_image() -> Result<RawFd> {
    static IMAGE: OnceLock<std::result::Result<OwnedFd, String>> = OnceLock::new();
    IMAGE
        .get_or_init(|| sealed_memfd(HIVE_INIT, c"hive-init", true).map_err(|e| e.to_string()))
        .as_ref()
        .map(|fd| fd.as_raw_fd())
        .map_err(|e| HiveError::Internal(format!("creating the hive-init memfd: {e}")))
}

/// A close-on-exec memfd named `name` holding `bytes`, sealed against any change; `executable`
/// asks for `MFD_EXEC` where the kernel knows the flag.
pub(crate) fn sealed_memfd(
    bytes: &[u8],
    name: &std::ffi::CStr,
    executable: bool,
) -> std::io::Result<OwnedFd> {
    let create = |flags: libc::c_uint| {
        // SAFETY: plain syscall with a valid C string.
        unsafe { libc::memfd_create(name.as_ptr(), flags) }
    };
    let base = libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING;
    let mut fd = if executable {
        create(base | MFD_EXEC)
    } else {
        -1
    };
    if fd < 0 {
        fd = create(base);
    }
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh fd we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    std::fs::File::from(fd.try_clone()?).write_all(bytes)?;
    let seals = libc::F_SEAL_SEAL | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE;
    let seal = |s: libc::c_int| {
        // SAFETY: plain fcntl on our fd.
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, s) }
    };
    if seal(seals | F_SEAL_EXEC) < 0 {
        // Kernels before 6.3 do not know F_SEAL_EXEC.
        if seal(seals) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(fd)
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn the_image_is_a_small_static_executable_sealed_against_changes() {
        assert!(HIVE_INIT.starts_with(b"\x7fELF"));
        assert!(HIVE_INIT.len() < 64 * 1024, "{} bytes", HIVE_INIT.len());
        let fd = init_image().expect("memfd");
        // SAFETY: plain fcntl.
        let seals = unsafe { libc::fcntl(fd, libc::F_GET_SEALS) };
        assert_eq!(
            seals & (libc::F_SEAL_WRITE | libc::F_SEAL_SEAL),
            libc::F_SEAL_WRITE | libc::F_SEAL_SEAL
        );
        let write = std::fs::OpenOptions::new()
            .write(true)
            .open(format!("/proc/self/fd/{fd}"))
            .and_then(|mut f| f.write_all(b"x"));
        assert!(write.is_err(), "a sealed image cannot be rewritten");
    }
}
