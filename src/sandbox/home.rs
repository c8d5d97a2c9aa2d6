//! The hive home: `HIVE_HOME`, else `$XDG_DATA_HOME/hive`, else `~/.local/share/hive` (README.md#api).

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
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

/// An exclusive lock on a sandbox's folder: a POSIX record lock (`fcntl(F_SETLK)`, whole file)
/// on `<folder>/lock`, which holds the holder's pid. Released when dropped (or when the process
/// dies: the kernel drops a process's record locks, so a crash never leaves a stale lock).
///
/// Not `flock`: an `flock` belongs to the open file, so every child cloned while it is held
/// (a spawn helper before its exec, any `fork`) holds it too, and a `close()` followed at once by
/// a reopen or `deleteSandbox` found its own sandbox busy. A record lock belongs to the process
/// (its file table) and is not inherited. Record locks are shared by the process's threads and
/// dropped by the close of *any* fd of the file, so within the process the set of held lock files
/// ([`HELD`], by device and inode: one folder may be named by several paths) decides, and the
/// file is opened only by the one acquire that goes on to lock it.
#[derive(Debug)]
pub struct FolderLock {
    file: Option<File>,
    id: (u64, u64),
}

/// Lock files (device, inode) this process holds.
static HELD: std::sync::Mutex<Vec<(u64, u64)>> = std::sync::Mutex::new(Vec::new());

fn held() -> std::sync::MutexGuard<'static, Vec<(u64, u64)>> {
    HELD.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl FolderLock {
    /// Takes the lock on `dir` (which must exist) without waiting; a lock held elsewhere is
    /// `HIVE_SANDBOX_BUSY` naming the holder's pid, and so is a second acquire in this process.
    pub fn acquire(dir: &Path, name: &str) -> Result<FolderLock> {
        let path = dir.join(LOCK_FILE);
        let busy = |pid: Option<u32>| HiveError::SandboxBusy {
            name: name.to_owned(),
            pid,
        };
        let in_process = || busy(Some(std::process::id()));
        let mut held = held();
        // Before opening: closing a second fd of a file this process has locked would unlock it.
        if let Ok(meta) = std::fs::symlink_metadata(&path) {
            if held.contains(&(meta.dev(), meta.ino())) {
                return Err(in_process());
            }
        }
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|e| HiveError::io(format!("opening {}", path.display()), e))?;
        let meta = file
            .metadata()
            .map_err(|e| HiveError::io(format!("reading {}", path.display()), e))?;
        let id = (meta.dev(), meta.ino());
        if held.contains(&id) {
            // The path now names a lock file this process holds (swapped in since the check):
            // closing this fd would unlock it, so the fd is left open.
            std::mem::forget(file);
            return Err(in_process());
        }
        // SAFETY: an all-zero flock is a valid value; the fields that matter are set below.
        let mut whole: libc::flock = unsafe { std::mem::zeroed() };
        whole.l_type = libc::F_WRLCK as libc::c_short;
        whole.l_whence = libc::SEEK_SET as libc::c_short;
        // SAFETY: F_SETLK on an fd we own with a valid flock.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETLK, &whole) } != 0 {
            let e = std::io::Error::last_os_error();
            if !matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EACCES)) {
                return Err(HiveError::io(format!("locking {}", path.display()), e));
            }
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            return Err(busy(text.trim().parse().ok()));
        }
        let pid = std::process::id().to_string();
        let write = |file: &mut File| -> std::io::Result<()> {
            file.set_len(0)?;
            file.rewind()?;
            file.write_all(pid.as_bytes())
        };
        write(&mut file).map_err(|e| HiveError::io(format!("writing {}", path.display()), e))?;
        held.push(id);
        Ok(FolderLock {
            file: Some(file),
            id,
        })
    }
}

impl Drop for FolderLock {
    fn drop(&mut self) {
        let mut held = held();
        // Closing the file releases the record lock; only then may another acquire open it.
        drop(self.file.take());
        held.retain(|id| *id != self.id);
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

    #[test]
    fn the_same_folder_by_another_path_is_busy_in_this_process_too() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("sb");
        std::fs::create_dir(&real).unwrap();
        let alias = dir.path().join("alias");
        std::os::unix::fs::symlink(&real, &alias).unwrap();
        let held = FolderLock::acquire(&real, "sb").expect("first lock");
        let err = FolderLock::acquire(&alias, "sb").expect_err("the same folder again");
        assert_eq!(err.code(), crate::error::ErrorCode::SandboxBusy);
        drop(held);
        FolderLock::acquire(&alias, "sb").expect("free again once released");
    }

    /// A child cloned while the lock is held (a spawn helper before its exec) keeps a copy of
    /// the lock's fd; the lock must not go with it, or a close-and-reopen finds itself busy.
    #[test]
    fn a_child_holding_a_copy_of_the_fd_does_not_hold_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let held = FolderLock::acquire(dir.path(), "sb").expect("first lock");
        // SAFETY: the child only sleeps and exits (async-signal-safe), with the parent's fds.
        let child = unsafe { libc::fork() };
        assert!(child >= 0);
        if child == 0 {
            // SAFETY: async-signal-safe calls only, then exit without unwinding.
            unsafe {
                libc::sleep(3);
                libc::_exit(0);
            }
        }
        drop(held);
        let again = FolderLock::acquire(dir.path(), "sb");
        // SAFETY: reaping our own child.
        unsafe {
            libc::kill(child, libc::SIGKILL);
            libc::waitpid(child, std::ptr::null_mut(), 0);
        }
        again.expect("the lock went with the parent's drop, not with the child's copy");
    }
}
