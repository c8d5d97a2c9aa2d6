//! The hive home: `HIVE_HOME`, else `$XDG_DATA_HOME/hive`, else `~/.local/share/hive` (README.md#api).

use std::os::unix::fs::DirBuilderExt;
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
