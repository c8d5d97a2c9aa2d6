//! The `hive-init` executable (built from `crates/launcher` by `build.rs`), embedded in the addon
//! and handed to the kernel as a sealed memfd (parent side).
//!
//! 1. Once per process ([`init_image`]): `memfd_create("hive-init", MFD_CLOEXEC |
//!    MFD_ALLOW_SEALING | MFD_EXEC)` (without `MFD_EXEC` on kernels before 6.3, which refuse the
//!    flag), write the bytes, then seal it against every change (`F_SEAL_SEAL | SHRINK | GROW |
//!    WRITE`, and `EXEC` where known), and run it once to check the kernel executes it. Where it
//!    does not (`vm.memfd_noexec = 2`), an unlinked, read-only temporary file in a directory that
//!    allows exec takes its place ([`unlinked_copy`]).
//! 2. Every sandbox's setup child and every spawn helper `execveat`s that fd
//!    (`hive_launcher::stub`), so no page of the host's memory survives into a sandbox.
//!
//! # Security
//! One fd serves every sandbox of the process, so it must be immutable: the seals make a write,
//! truncate or mode change fail even through `/proc/<pid>/fd`, and the fd is close-on-exec, so no
//! other program the host runs inherits it. A memfd is not on any file system, so a `noexec`
//! `/tmp` does not stop it; `vm.memfd_noexec = 2` does, and then the fallback copy is used, or,
//! where every temporary directory is `noexec` too, sandboxes fail to start with a message naming
//! both.

use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::OnceLock;

use crate::error::{HiveError, Result};

/// The executable, as built for this target.
pub(crate) const HIVE_INIT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/hive-init"));

const MFD_EXEC: libc::c_uint = 0x10;
const F_SEAL_EXEC: libc::c_int = 0x20;

/// The executable image of [`HIVE_INIT`], made on first use: the sealed memfd, or where memfds
/// may not be executed (`vm.memfd_noexec = 2`) an unlinked read-only temporary file
/// ([`unlinked_copy`]), as runc does.
pub(crate) fn init_image() -> Result<RawFd> {
    static IMAGE: OnceLock<std::result::Result<OwnedFd, String>> = OnceLock::new();
    IMAGE
        .get_or_init(|| executable_image(true))
        .as_ref()
        .map(|fd| fd.as_raw_fd())
        .map_err(|e| HiveError::Internal(format!("cannot execute hive-init: {e}")))
}

/// Directories tried for the unlinked copy, in order.
const COPY_DIRS: &[&str] = &["/dev/shm", "/tmp", "/var/tmp", "/run/user"];

/// [`init_image`]'s work; `try_memfd: false` goes straight to the fallback (tests).
fn executable_image(try_memfd: bool) -> std::result::Result<OwnedFd, String> {
    let mut tried = Vec::new();
    if try_memfd {
        match sealed_memfd(HIVE_INIT, c"hive-init", true).and_then(|fd| runs(&fd).map(|()| fd)) {
            Ok(fd) => return Ok(fd),
            Err(e) => tried.push(format!("memfd: {e}")),
        }
    }
    let mut dirs: Vec<std::path::PathBuf> = std::env::var_os("TMPDIR")
        .map(std::path::PathBuf::from)
        .into_iter()
        .collect();
    dirs.extend(COPY_DIRS.iter().map(std::path::PathBuf::from));
    for dir in dirs {
        match unlinked_copy(&dir, HIVE_INIT).and_then(|fd| runs(&fd).map(|()| fd)) {
            Ok(fd) => return Ok(fd),
            Err(e) => tried.push(format!("{}: {e}", dir.display())),
        }
    }
    Err(format!(
        "no executable copy could be made ({}); memfds are not executable where \
         vm.memfd_noexec = 2, and temporary directories mounted noexec refuse it",
        tried.join("; ")
    ))
}

/// Checks the kernel executes `image`: `hive-init` started without a role exits with 2.
fn runs(image: &OwnedFd) -> std::io::Result<()> {
    let status = std::process::Command::new(format!("/proc/self/fd/{}", image.as_raw_fd()))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()?;
    if status.code() == Some(2) {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "hive-init exited with {status}"
        )))
    }
}

/// A read-only, close-on-exec fd of a copy of `bytes` in `dir` that has no name: an `O_TMPFILE`
/// file, or a file created with a random name and unlinked at once. It is reopened read-only
/// through `/proc/self/fd` (the kernel refuses to execute a file open for writing) and the
/// writable fd is closed.
///
/// # Security
/// Unlike the sealed memfd, such a file could be reopened for writing through
/// `/proc/<host pid>/fd` by a process allowed to do that, which is one allowed to ptrace the host
/// process anyway; sandboxed processes cannot see the host's pid.
fn unlinked_copy(dir: &std::path::Path, bytes: &[u8]) -> std::io::Result<OwnedFd> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmpfile = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .mode(0o500)
        .custom_flags(libc::O_TMPFILE | libc::O_CLOEXEC)
        .open(dir);
    let (mut file, named) = match tmpfile {
        Ok(f) => (f, None),
        Err(_) => {
            let mut suffix = [0u8; 8];
            getrandom::fill(&mut suffix).map_err(|e| std::io::Error::other(e.to_string()))?;
            let hex: String = suffix.iter().map(|b| format!("{b:02x}")).collect();
            let path = dir.join(format!(".hive-init-{hex}"));
            let f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o500)
                .custom_flags(libc::O_CLOEXEC)
                .open(&path)?;
            (f, Some(path))
        }
    };
    let written = file.write_all(bytes);
    let reopened = written.and_then(|()| {
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(format!("/proc/self/fd/{}", file.as_raw_fd()))
    });
    if let Some(path) = named {
        let _ = std::fs::remove_file(path);
    }
    Ok(OwnedFd::from(reopened?))
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
    fn without_an_executable_memfd_an_unlinked_read_only_copy_runs() {
        let fd = executable_image(false).expect("a temporary directory allows exec");
        let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).expect("link");
        assert!(
            link.to_string_lossy().ends_with("(deleted)"),
            "the copy has no name: {link:?}"
        );
        // SAFETY: plain fcntl on our fd.
        let mode = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) } & libc::O_ACCMODE;
        assert_eq!(mode, libc::O_RDONLY, "only a read-only fd is kept");
        runs(&fd).expect("the kernel executes the copy");
    }

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
