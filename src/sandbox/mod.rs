//! Sandbox registry and lifecycle.
