//! The sandbox config: JSON input from JS -> validated [`Config`], and back (normalized, redacted).
//!
//! This module is the single place where untrusted input becomes typed values (README.md#api and docs/):
//! 1. [`Config::from_json`] walks the raw `serde_json::Value` by hand so that it can report *every*
//!    problem at once, each with its field path (`egress[2].ports[0]`) and a hint, and reject unknown
//!    keys (a typo must not silently widen or drop a rule).
//! 2. Values are normalized on the way in (hosts lowercased and punycoded, methods uppercased).
//! 3. [`Config::to_json`] renders the normalized config for `getConfig()`, with every secret replaced
//!    by [`REDACTED`].
//!
//! Optional keys given as `null` count as absent (JS `undefined` arrives as `null`, so
//! `{ ...rule, override: undefined }` works); required keys given as `null` are missing.

mod digest;
mod host;
mod path_glob;
mod render;
mod secret;
mod template;
mod validate;

pub use digest::{canonical_json, content_hash};
pub use host::{normalize_host, HostPattern};
pub use path_glob::{normalize_path, PathGlob};
pub(crate) use path_glob::{plain_glob_form, push_normalized as push_glob_form};
pub use secret::{Secret, SecretValue};
pub use template::{is_secret_name, Part, Template};

pub(crate) use host::{host_ip, is_normalized_host};
pub(crate) use path_glob::normalize_path_cow;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;

use crate::error::Result;

/// What `getConfig()` shows in place of a secret; `applyConfig` rejects it (README.md#api).
pub const REDACTED: &str = "[redacted]";

/// A validated sandbox config.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Config {
    /// File system mounts, in the order given.
    pub fs: Vec<FsMount>,
    /// Egress rules, in order; the first match decides (docs/network-access.md).
    pub egress: Vec<EgressRule>,
    /// How the proxy reaches upstreams (never changes a decision).
    pub upstream: Upstream,
    /// How much of the audit log is kept on disk (docs/audit-log.md).
    pub audit: AuditRetention,
    /// Resource limits for the whole sandbox (docs/decisions.md#resource-limits).
    pub limits: Limits,
    /// Whether policy denials are enforced or only reported (docs/network-access.md#report-mode).
    pub mode: Mode,
    /// Named secrets (docs/secrets.md), by name.
    pub secrets: BTreeMap<String, NamedSecret>,
    /// Environment variables of every process, in the order given; `{{secrets.NAME}}` in a value
    /// becomes the secret's placeholder (docs/secrets.md#placeholders).
    pub env: Vec<(String, Template)>,
}

/// `mode`, of the sandbox and of a rule: `enforce` (the default) or `report`, where a request the
/// policy would deny is let through and recorded with `wouldDeny: true`
/// (docs/network-access.md#report-mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    #[default]
    Enforce,
    Report,
}

impl Mode {
    /// `"enforce"` / `"report"`, as in configs.
    pub const fn as_str(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Report => "report",
        }
    }
}

/// One `secrets` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct NamedSecret {
    /// The value (never rendered).
    pub value: SecretValue,
    /// Where the value may be sent; `None`: the hosts of the rules whose override references it.
    pub hosts: Option<Vec<HostPattern>>,
}

/// An override header's value: the seed's inline secret, or a template over named secrets.
#[derive(Debug, Clone, PartialEq)]
pub enum OverrideValue {
    /// A literal value, itself a secret (rendered as `[redacted]`).
    Inline(Secret),
    /// `"Bearer {{secrets.NAME}}"`: not secret itself (rendered verbatim).
    Template(Template),
}

/// `audit`: the audit log's retention. The log is `audit.jsonl`, rotated when a write would take
/// it past `max_bytes`, with the `keep` most recent rotated files (`audit.jsonl.1` newest).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditRetention {
    /// Rotation threshold of `audit.jsonl`, in bytes.
    pub max_bytes: u64,
    /// How many rotated files are kept (`0`: none, the log restarts empty at each rotation).
    pub keep: u32,
}

impl AuditRetention {
    /// Default rotation threshold: 64 MiB.
    pub const DEFAULT_MAX_BYTES: u64 = 64 * 1024 * 1024;
    /// Default number of rotated files kept.
    pub const DEFAULT_KEEP: u32 = 1;
    /// Smallest accepted `maxBytes`: below this a single large event would rotate on every write.
    pub const MIN_MAX_BYTES: u64 = 64 * 1024;
    /// Largest accepted `keep`.
    pub const MAX_KEEP: u32 = 100;
}

impl Default for AuditRetention {
    fn default() -> Self {
        AuditRetention {
            max_bytes: Self::DEFAULT_MAX_BYTES,
            keep: Self::DEFAULT_KEEP,
        }
    }
}

/// `limits`: bounds on the sandbox's processes, all of them together unless noted. `None`: not
/// given (a default may apply where the host has a mechanism; an omitted limit never causes a
/// rejection).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Limits {
    /// Memory of all processes together (anonymous memory, page cache and tmpfs), in bytes.
    pub memory_bytes: Option<u64>,
    /// Processes and threads alive at once.
    pub pids: Option<u64>,
    /// CPU time per wall-clock time (`1.5`: one and a half cores).
    pub cpus: Option<f64>,
    /// Open file descriptors, per process (`RLIMIT_NOFILE`).
    pub open_files: Option<u64>,
    /// Largest file a process may write, in bytes (`RLIMIT_FSIZE`).
    pub file_size_bytes: Option<u64>,
    /// Disk written through the sandbox's writable mounts, in bytes.
    pub disk_bytes: Option<u64>,
}

impl Limits {
    /// Whether no limit is given.
    pub fn is_empty(&self) -> bool {
        *self == Limits::default()
    }
}

/// `allow` or `deny`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuleAccess {
    Allow,
    Deny,
}

/// One validated egress rule.
#[derive(Debug, Clone, PartialEq)]
pub struct EgressRule {
    pub access: RuleAccess,
    pub host: HostPattern,
    /// `None`: any port.
    pub ports: Option<Vec<u16>>,
    /// Uppercased method names; `None`: any method.
    pub methods: Option<Vec<String>>,
    /// `None`: any path.
    pub paths: Option<Vec<PathGlob>>,
    /// Only on `allow` rules.
    pub override_: Option<Override>,
    /// `None`: the sandbox's mode.
    pub mode: Option<Mode>,
    /// How TLS through this rule is handled (`tls`; only `allow` rules may pass it through).
    pub tls: TlsMode,
}

/// `tls` on an egress rule (docs/network-access.md#tls-passthrough).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum TlsMode {
    /// Terminate TLS with the sandbox CA and decide every request inside (the default).
    #[default]
    Intercept,
    /// Relay the TLS bytes unopened to the upstream, decided once on the SNI and the tunnel's
    /// target: the client sees the upstream's own certificate and may present its own (mTLS), but
    /// hive sees no method, path or header, so the rule can carry no `methods`, `paths` or
    /// `override`.
    Passthrough,
}

impl TlsMode {
    /// The config and event spelling.
    pub const fn as_str(self) -> &'static str {
        match self {
            TlsMode::Intercept => "intercept",
            TlsMode::Passthrough => "passthrough",
        }
    }
}

/// Headers set on every request a rule allows.
#[derive(Debug, Clone, PartialEq)]
pub struct Override {
    /// (lowercased header name, value), in the order given.
    pub headers: Vec<(http::HeaderName, OverrideValue)>,
    /// Allow injection over plain HTTP (default false: such requests are denied).
    pub allow_plaintext: bool,
}

/// `upstream`: resolve overrides, extra CA roots and timeouts.
#[derive(Debug, Clone, PartialEq)]
pub struct Upstream {
    /// `"host:port"` (host normalized) -> address the proxy connects to instead of resolving.
    pub resolve: HashMap<(String, u16), SocketAddr>,
    /// Extra PEM roots trusted upstream, as given (validated to parse as certificates).
    pub ca: Vec<String>,
    /// `connectTimeoutMs`: TCP connect plus TLS handshake to an upstream (`504` after it).
    pub connect_timeout: std::time::Duration,
    /// `responseTimeoutMs`: from sending a request until the response head arrives (`504`).
    pub response_timeout: std::time::Duration,
}

impl Upstream {
    /// Default of `upstream.connectTimeoutMs`.
    pub const DEFAULT_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
    /// Default of `upstream.responseTimeoutMs`: long enough for slow APIs that answer only when
    /// done (model completions), short enough that a hung upstream is reported.
    pub const DEFAULT_RESPONSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);
    /// Largest value of either timeout, in milliseconds (one hour).
    pub const MAX_TIMEOUT_MS: u64 = 3_600_000;
}

impl Default for Upstream {
    fn default() -> Upstream {
        Upstream {
            resolve: HashMap::new(),
            ca: Vec::new(),
            connect_timeout: Upstream::DEFAULT_CONNECT_TIMEOUT,
            response_timeout: Upstream::DEFAULT_RESPONSE_TIMEOUT,
        }
    }
}

/// One `fs` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct FsMount {
    /// Only `local` exists today.
    pub backend: FsBackend,
    /// Absolute, normalized path inside the sandbox (not `/`, not under `/proc`, `/dev`, …).
    pub mount: String,
    /// Host directory holding the data; `None`: `<hive home>/sandboxes/<name>/fs/<mount>`.
    pub source: Option<PathBuf>,
    /// `None`: the whole mount is rw. `Some`: first match wins, unmatched paths have no access.
    pub acls: Option<Vec<FsAcl>>,
    /// Emit `fs.access` events for writes, creates, renames and deletes.
    pub audit: bool,
}

/// File system backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsBackend {
    Local,
}

/// One ACL entry of a mount.
#[derive(Debug, Clone, PartialEq)]
pub struct FsAcl {
    pub path: PathGlob,
    pub access: FsAccess,
}

/// `rw`, `r` or `none`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsAccess {
    Rw,
    R,
    None,
}

impl Config {
    /// Validates a config given as JSON (`null` means the empty config). Every problem found is
    /// reported in one [`crate::HiveError::InvalidConfig`].
    pub fn from_json(value: &serde_json::Value) -> Result<Config> {
        validate::config(value, None)
    }

    /// Like [`Config::from_json`], for `applyConfig` over `previous`: a secret given as the
    /// `"[redacted]"` marker keeps the value it has in `previous` (docs/secrets.md#round-trip).
    pub fn from_json_over(value: &serde_json::Value, previous: &Config) -> Result<Config> {
        validate::config(value, Some(previous))
    }

    /// Checks what validation cannot see without touching the host: every `fs[].source` must be
    /// an existing directory (a typo would otherwise fail only at the first `exec`). Reads file
    /// metadata, so call it off the Node main thread.
    pub fn check_host_paths(&self) -> Result<()> {
        let mut issues = Vec::new();
        for (i, mount) in self.fs.iter().enumerate() {
            let Some(source) = &mount.source else {
                continue;
            };
            let problem = match std::fs::metadata(source) {
                Ok(meta) if meta.is_dir() => continue,
                Ok(_) => "is not a directory",
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => "does not exist",
                Err(_) => "cannot be read",
            };
            issues.push(crate::error::ConfigIssue::new(
                format!("fs[{i}].source"),
                format!(
                    "{} {problem}; create the directory or fix the path",
                    host::quote(&source.to_string_lossy())
                ),
            ));
        }
        if issues.is_empty() {
            Ok(())
        } else {
            Err(crate::error::HiveError::InvalidConfig(issues))
        }
    }

    /// The normalized config as JSON, secrets replaced by [`REDACTED`].
    ///
    /// The result is valid input to [`Config::from_json`]: without override headers,
    /// `from_json(&c.to_json())` gives back `c`.
    pub fn to_json(&self) -> serde_json::Value {
        render::config(self)
    }
}
