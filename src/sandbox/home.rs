//! The hive home: `HIVE_HOME`, else `$XDG_DATA_HOME/hive`, else `~/.local/share/hive` (README.md#api).

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::error::{HiveError, Result};

/// The hive home folder, read from the environment at each call.
pub fn hive_home() -> Result<PathBuf> {
    let from_env = |key: &str| {
        std::env::var_os(key)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(home) = from_env("HIVE_HOME") {
        return Ok(home);
    }
    if let Some(data) = from_env("XDG_DATA_HOME") {
        return Ok(data.join("hive"));
    }
    if let Some(home) = from_env("HOME") {
        return Ok(home.join(".local/share/hive"));
    }
    Err(HiveError::InvalidArgument(
        "cannot find the hive home: set HIVE_HOME (or XDG_DATA_HOME or HOME)".into(),
    ))
}

/// Creates `dir` and its parents; the leaf is mode 0700 (it holds the CA key and the audit log).
pub fn create_private_dir(dir: &Path) -> Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| HiveError::io(format!("creating {}", dir.display()), e))
}

/// File name of a sandbox folder's lock.
pub const LOCK_FILE: &str = "lock";

/// An exclusive lock on a sandbox's folder: `flock(LOCK_EX)` on `<folder>/lock`, which holds the
/// holder's pid. Released when dropped (or when the process dies: the kernel drops `flock`s with
/// their file, so a crash never leaves a stale lock).
#[derive(Debug)]
pub struct FolderLock {
    _file: File,
}

impl FolderLock {
    /// Takes the lock on `dir` (which must exist) without waiting; a lock held elsewhere is
    /// `HIVE_SANDBOX_BUSY` naming the holder's pid. The lock is per open file, so a second open
    /// in this process is refused too.
    pub fn acquire(dir: &Path, name: &str) -> Result<FolderLock> {
        let path = dir.join(LOCK_FILE);
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|e| HiveError::io(format!("opening {}", path.display()), e))?;
        // SAFETY: flock on an fd we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(HiveError::io(format!("locking {}", path.display()), e));
            }
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            return Err(HiveError::SandboxBusy {
                name: name.to_owned(),
                pid: text.trim().parse().ok(),
            });
        }
        let pid = std::process::id().to_string();
        let write = |file: &mut File| -> std::io::Result<()> {
            file.set_len(0)?;
            file.rewind()?;
            file.write_all(pid.as_bytes())
        };
        write(&mut file).map_err(|e| HiveError::io(format!("writing {}", path.display()), e))?;
        Ok(FolderLock { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_open_of_a_locked_sandbox_is_busy_and_names_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let held = FolderLock::acquire(dir.path(), "sb").expect("first lock");
        let err = FolderLock::acquire(dir.path(), "sb").expect_err("second lock");
        assert_eq!(err.code(), crate::error::ErrorCode::SandboxBusy);
        let message = err.to_string();
        assert!(
            message.contains(&format!("pid {}", std::process::id())),
            "{message}"
        );
        drop(held);
        FolderLock::acquire(dir.path(), "sb").expect("free again once released");
    }
}
