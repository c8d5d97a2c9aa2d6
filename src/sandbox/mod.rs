//! Sandbox registry and lifecycle.
#[cfg(target_os = "linux")]
pub mod linux;
