//! `HiveError`, the one error type of the engine, and the stable `HIVE_*` codes it maps to.
//!
//! The code is API (JS code branches on `err.code`); the message text is not.

use std::fmt;

/// One problem found in a config: where (`egress[2].ports[0]`) and what was wrong, with a hint.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ConfigIssue {
    /// Field path in JS notation, e.g. `egress[2].ports[0]` (empty for the root).
    pub path: String,
    /// What was wrong and what to do; never contains a secret value.
    pub message: String,
}

impl ConfigIssue {
    /// A problem at `path`.
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "config: {}", self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Stable error codes, part of the public API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorCode {
    InvalidConfig,
    InvalidName,
    InvalidArgument,
    UnsupportedPlatform,
    UsernsUnavailable,
    FsUnenforceable,
    LimitsUnenforceable,
    SpawnFailed,
    SandboxClosed,
    SandboxBusy,
    Internal,
}

impl ErrorCode {
    /// The `HIVE_*` string JS sees as `err.code`.
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidConfig => "HIVE_INVALID_CONFIG",
            ErrorCode::InvalidName => "HIVE_INVALID_NAME",
            ErrorCode::InvalidArgument => "HIVE_INVALID_ARGUMENT",
            ErrorCode::UnsupportedPlatform => "HIVE_UNSUPPORTED_PLATFORM",
            ErrorCode::UsernsUnavailable => "HIVE_USERNS_UNAVAILABLE",
            ErrorCode::FsUnenforceable => "HIVE_FS_UNENFORCEABLE",
            ErrorCode::LimitsUnenforceable => "HIVE_LIMITS_UNENFORCEABLE",
            ErrorCode::SpawnFailed => "HIVE_SPAWN_FAILED",
            ErrorCode::SandboxClosed => "HIVE_SANDBOX_CLOSED",
            ErrorCode::SandboxBusy => "HIVE_SANDBOX_BUSY",
            ErrorCode::Internal => "HIVE_INTERNAL",
        }
    }
}

/// Every error the engine returns.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HiveError {
    /// The config had one or more problems; all of them are listed.
    #[error("invalid sandbox config: {}", join_issues(.0))]
    InvalidConfig(Vec<ConfigIssue>),
    #[error("invalid sandbox name {0}: use 1-63 characters of [A-Za-z0-9._-], not starting with '.' or '-'")]
    InvalidName(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    UnsupportedPlatform(String),
    #[error("{0}")]
    UsernsUnavailable(String),
    #[error("{0}")]
    FsUnenforceable(String),
    /// A configured resource limit has no mechanism on this host (docs/decisions.md#resource-limits).
    #[error("{0}")]
    LimitsUnenforceable(String),
    #[error("{0}")]
    SpawnFailed(String),
    #[error("sandbox {0:?} is closed")]
    SandboxClosed(String),
    /// Another process (or another open in this one) has the sandbox's folder locked.
    #[error("sandbox {name:?} is {}", busy_holder(*.pid))]
    SandboxBusy { name: String, pid: Option<u32> },
    #[error("internal error: {0}")]
    Internal(String),
    #[error("I/O error: {context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

/// Who holds a busy sandbox, for its message.
fn busy_holder(pid: Option<u32>) -> String {
    match pid {
        Some(pid) if pid == std::process::id() => {
            format!("still open in this process (pid {pid}): await close() before opening it again")
        }
        Some(pid) => {
            format!("in use by another process (pid {pid}); close it there or use another name")
        }
        None => "in use by another process (pid unknown); close it there or use another name"
            .to_string(),
    }
}

fn join_issues(issues: &[ConfigIssue]) -> String {
    issues
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

impl HiveError {
    /// The stable code of this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            HiveError::InvalidConfig(_) => ErrorCode::InvalidConfig,
            HiveError::InvalidName(_) => ErrorCode::InvalidName,
            HiveError::InvalidArgument(_) => ErrorCode::InvalidArgument,
            HiveError::UnsupportedPlatform(_) => ErrorCode::UnsupportedPlatform,
            HiveError::UsernsUnavailable(_) => ErrorCode::UsernsUnavailable,
            HiveError::FsUnenforceable(_) => ErrorCode::FsUnenforceable,
            HiveError::LimitsUnenforceable(_) => ErrorCode::LimitsUnenforceable,
            HiveError::SpawnFailed(_) => ErrorCode::SpawnFailed,
            HiveError::SandboxClosed(_) => ErrorCode::SandboxClosed,
            HiveError::SandboxBusy { .. } => ErrorCode::SandboxBusy,
            HiveError::Internal(_) | HiveError::Io { .. } => ErrorCode::Internal,
        }
    }

    /// The config issues, for `InvalidConfig`; empty otherwise.
    pub fn issues(&self) -> &[ConfigIssue] {
        match self {
            HiveError::InvalidConfig(issues) => issues,
            _ => &[],
        }
    }

    /// Wraps an I/O error with what was being done.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        HiveError::Io {
            context: context.into(),
            source,
        }
    }
}

/// Result alias used throughout the engine.
pub type Result<T, E = HiveError> = std::result::Result<T, E>;
