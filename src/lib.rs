//! hive: local Linux sandboxes whose network egress, injected credentials and file access follow a
//! policy the host program states and changes at runtime, with every decision streamed as an audit
//! event.
//!
//! Dependencies point one way: `napi -> sandbox, proxy -> policy, tls, events -> config -> error`.
//! Everything below [`napi`](mod@napi) is plain Rust and runs under `cargo test`.

pub mod attribution;
pub mod config;
#[cfg_attr(not(feature = "napi"), allow(dead_code))]
mod diagnostics;
pub mod dns;
pub mod error;
pub mod events;
pub mod fs;
pub mod policy;
pub mod proxy;
pub mod sandbox;
pub mod secrets;
pub mod tls;

#[cfg(feature = "napi")]
mod napi;

pub use config::Config;
pub use error::{ConfigIssue, ErrorCode, HiveError, Result};
pub use policy::{Decision, Policy};
