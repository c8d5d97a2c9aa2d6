//! Diagnostics: `tracing` to stderr, off unless `HIVE_LOG` is set (`HIVE_LOG=debug`,
//! `HIVE_LOG=hive::proxy=trace`, the `RUST_LOG` syntax).
//!
//! # Security
//! Nothing logged at any level carries a secret: override header values are [`crate::config::Secret`],
//! whose `Debug`/`Display` print `[redacted]`.

/// Installs the subscriber once, if `HIVE_LOG` is set.
#[cfg_attr(test, allow(dead_code))]
pub fn init_from_env() {
    let Ok(filter) = std::env::var("HIVE_LOG") else {
        return;
    };
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(true)
        .try_init();
}
