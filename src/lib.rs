//! hive: local Linux sandboxes whose egress, credentials and file access follow a policy.
pub mod error;
