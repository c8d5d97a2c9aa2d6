//! Diagnostics (docs/security.md#diagnostics): `tracing` to stderr, and the warnings a sandbox
//! gives about degradations that weaken nothing but matter.
//!
//! 1. `HIVE_LOG` sets the log filter, off when unset. A bare level (`HIVE_LOG=debug`) means hive's
//!    own targets at that level and every dependency (rustls, h2, hyper) at `warn`; anything else
//!    is the full `RUST_LOG` syntax (`HIVE_LOG=hive::proxy=trace,rustls=debug`) and taken as
//!    written. An invalid value is reported once on stderr and `warn` used instead. Colours only
//!    when stderr is a terminal, so a log redirected to a file holds no escape codes.
//! 2. [`warning`] emits a `sandbox.warning` event `{ code, message }` and writes one line to
//!    stderr (unless `HIVE_LOG=off`), whatever the log filter: a Landlock ABI lower than the one
//!    hive uses fully, root's mounts without idmapping, FUSE without kernel passthrough.
//!    Degradations found where no event bus is at hand (the launcher) are [`defer`]red under the
//!    sandbox's name and emitted by [`take_deferred`] once the sandbox has started.
//!
//! # Security
//! Nothing logged at any level carries a secret: override header values are [`crate::config::Secret`],
//! whose `Debug`/`Display` print `[redacted]`. Warning messages are fixed text plus names.

use std::io::IsTerminal;
use std::sync::Once;

use parking_lot::Mutex;
use serde_json::{Map, Value};

use crate::events::{kind, EventBus};

/// The crates whose targets a bare `HIVE_LOG` level applies to.
const OWN_TARGETS: [&str; 2] = ["hive", "hive_launcher"];

/// Stable codes of `sandbox.warning` events (docs/audit-log.md#sandboxwarning).
pub mod code {
    /// The kernel's Landlock ABI is lower than the one hive uses fully (some scoping is missing).
    pub const LANDLOCK_ABI_LOW: &str = "HIVE_LANDLOCK_ABI_LOW";
    /// The kernel has no Landlock: the sandbox runs without its file-system scoping layer.
    pub const LANDLOCK_UNAVAILABLE: &str = "HIVE_LANDLOCK_UNAVAILABLE";
    /// Run as root, a mount could not be idmapped: the sandbox's root is host root (without
    /// capabilities) instead of `nobody`.
    pub const IDMAP_FALLBACK: &str = "HIVE_IDMAP_FALLBACK";
    /// FUSE kernel passthrough is not available: every read and write of a per-file mount goes
    /// through hive's server (slower, not weaker).
    pub const FS_PASSTHROUGH_UNAVAILABLE: &str = "HIVE_FS_PASSTHROUGH_UNAVAILABLE";
}

/// The Landlock ABI whose rights and scopes hive uses fully (abstract-socket and signal scoping).
pub const IDEAL_LANDLOCK_ABI: i32 = 6;

/// Installs the subscriber once per process, if `HIVE_LOG` is set.
#[cfg_attr(test, allow(dead_code))]
pub fn init_from_env() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let Ok(value) = std::env::var("HIVE_LOG") else {
            return;
        };
        let filter = match filter_for(&value) {
            Ok(filter) => filter,
            Err(()) => {
                eprintln!(
                    "hive: HIVE_LOG={value:?} is no log level (error, warn, info, debug, trace, off) \
                     or RUST_LOG filter; logging warnings only"
                );
                tracing_subscriber::EnvFilter::new("warn")
            }
        };
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
            .with_target(true)
            .try_init();
    });
}

/// The filter `HIVE_LOG=value` means (see the module steps); `Err` for an invalid value.
fn filter_for(value: &str) -> Result<tracing_subscriber::EnvFilter, ()> {
    tracing_subscriber::EnvFilter::try_new(directives_for(value)?).map_err(|_| ())
}

/// The `RUST_LOG` directives of `HIVE_LOG=value`.
fn directives_for(value: &str) -> Result<String, ()> {
    let value = value.trim();
    let level = value.to_ascii_lowercase();
    if matches!(
        level.as_str(),
        "error" | "warn" | "info" | "debug" | "trace" | "off"
    ) {
        let deps = if level == "off" { "off" } else { "warn" };
        let own: Vec<String> = OWN_TARGETS.iter().map(|t| format!("{t}={level}")).collect();
        return Ok(format!("{deps},{}", own.join(",")));
    }
    // Full syntax: every directive must parse (EnvFilter::try_new skips bad ones silently).
    if value.is_empty() {
        return Err(());
    }
    for directive in value.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        // A bare word parses as a target name; here it is meant as a level, so it must be one.
        let bare = !directive.contains(['=', '[']);
        let level = directive
            .parse::<tracing::level_filters::LevelFilter>()
            .is_ok();
        if bare && !level {
            return Err(());
        }
        directive
            .parse::<tracing_subscriber::filter::Directive>()
            .map_err(|_| ())?;
    }
    Ok(value.to_string())
}

/// Emits a `sandbox.warning` `{ code, message }` into `events` and writes one line to stderr
/// (unless `HIVE_LOG=off`).
pub fn warning(events: &EventBus, code: &str, message: &str) {
    let mut fields = Map::new();
    fields.insert("code".into(), Value::String(code.to_owned()));
    fields.insert("message".into(), Value::String(message.to_owned()));
    events.emit(kind::SANDBOX_WARNING, fields);
    stderr_line(Some(events.sandbox()), code, message);
}

/// The stderr line of a `sandbox.warning` (unless `HIVE_LOG=off`).
pub fn stderr_line(sandbox: Option<&str>, code: &str, message: &str) {
    if std::env::var("HIVE_LOG").is_ok_and(|v| v.trim().eq_ignore_ascii_case("off")) {
        return;
    }
    match sandbox {
        Some(name) => eprintln!("hive: warning: sandbox {name}: {message} ({code})"),
        None => eprintln!("hive: warning: {message} ({code})"),
    }
}

/// Degradations found while starting a sandbox, by sandbox name, until it emits them.
static DEFERRED: Mutex<Vec<(String, &'static str, String)>> = Mutex::new(Vec::new());
/// Most deferred warnings kept (a sandbox that never takes them cannot grow the list).
const MAX_DEFERRED: usize = 64;

/// Keeps a warning for `sandbox` until [`take_deferred`] (for code without an event bus).
pub fn defer(sandbox: &str, code: &'static str, message: impl Into<String>) {
    let mut deferred = DEFERRED.lock();
    if deferred.len() < MAX_DEFERRED {
        deferred.push((sandbox.to_owned(), code, message.into()));
    }
}

/// Emits the warnings deferred for `events`' sandbox, and the Landlock check of `landlock_abi`
/// (the ABI the launcher used; `None`: no Landlock).
pub fn take_deferred(events: &EventBus, landlock_abi: Option<i32>) {
    let mine: Vec<(&'static str, String)> = {
        let mut deferred = DEFERRED.lock();
        let (mine, rest): (Vec<_>, Vec<_>) = deferred
            .drain(..)
            .partition(|(name, _, _)| name == events.sandbox());
        *deferred = rest;
        mine.into_iter().map(|(_, c, m)| (c, m)).collect()
    };
    match landlock_abi {
        None => warning(
            events,
            code::LANDLOCK_UNAVAILABLE,
            "this kernel has no Landlock: the sandbox runs without its file-system scoping layer \
             (the mount namespace and per-file rules still hold)",
        ),
        Some(abi) if abi < IDEAL_LANDLOCK_ABI => warning(
            events,
            code::LANDLOCK_ABI_LOW,
            &format!(
                "this kernel's Landlock ABI is {abi}, lower than {IDEAL_LANDLOCK_ABI}: some of its \
                 scoping (abstract sockets and signals from ABI 6, ioctl from 5, truncate from 3) \
                 is missing"
            ),
        ),
        Some(_) => {}
    }
    for (code, message) in mine {
        warning(events, code, &message);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::Since;

    #[test]
    fn hive_log_values() {
        let cases: &[(&str, Option<&str>)] = &[
            ("debug", Some("warn,hive=debug,hive_launcher=debug")),
            ("DEBUG ", Some("warn,hive=debug,hive_launcher=debug")),
            ("trace", Some("warn,hive=trace,hive_launcher=trace")),
            ("off", Some("off,hive=off,hive_launcher=off")),
            (
                "hive::proxy=trace,rustls=debug",
                Some("hive::proxy=trace,rustls=debug"),
            ),
            ("info,h2=off", Some("info,h2=off")),
            ("verbose", None),
            ("hive=loud", None),
            ("", None),
        ];
        for (value, want) in cases {
            assert_eq!(directives_for(value).ok().as_deref(), *want, "{value:?}");
            assert_eq!(filter_for(value).is_ok(), want.is_some(), "{value:?}");
        }
    }

    #[tokio::test]
    async fn deferred_warnings_go_to_their_sandbox_with_the_landlock_check() {
        let dir = tempfile::tempdir().unwrap();
        let events = EventBus::open("diag-a", dir.path()).unwrap();
        let sub = events.subscribe(Since::Now, 100).unwrap();
        defer("diag-b", code::IDMAP_FALLBACK, "other sandbox");
        defer("diag-a", code::IDMAP_FALLBACK, "mine");
        take_deferred(&events, Some(4));
        take_deferred(&events, Some(IDEAL_LANDLOCK_ABI));
        let mut got = Vec::new();
        while let Ok(Some(e)) =
            tokio::time::timeout(std::time::Duration::from_millis(200), sub.next()).await
        {
            let s = |k: &str| e.fields[k].as_str().unwrap().to_string();
            got.push((e.kind.clone(), s("code"), s("message")));
        }
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(got[0].1, code::LANDLOCK_ABI_LOW);
        assert!(got[0].2.contains("ABI is 4"), "{}", got[0].2);
        assert_eq!(
            got[1],
            (
                kind::SANDBOX_WARNING.to_string(),
                code::IDMAP_FALLBACK.to_string(),
                "mine".to_string()
            )
        );
        // The other sandbox's warning waits for it.
        assert!(DEFERRED
            .lock()
            .iter()
            .any(|(n, _, m)| n == "diag-b" && m == "other sandbox"));
        DEFERRED.lock().retain(|(n, _, _)| n != "diag-b");
    }
}
