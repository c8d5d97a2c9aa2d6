//! [`Secret`]: a credential value that never prints.

use std::fmt;

/// An override header value. `Debug` and `Display` print `[redacted]`.
///
/// # Security
/// Secrets must never reach logs, events, errors or disk (docs/network-access.md). The only way to the bytes is
/// [`Secret::expose`], used where the header is written to the upstream request.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(http::HeaderValue);

impl Secret {
    /// Wraps a header value already checked for CR, LF and NUL.
    pub fn new(value: http::HeaderValue) -> Self {
        let mut value = value;
        value.set_sensitive(true);
        Secret(value)
    }

    /// The value, for writing into an upstream request only.
    pub fn expose(&self) -> &http::HeaderValue {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(super::REDACTED)
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(super::REDACTED)
    }
}

/// A named secret's value (`secrets.NAME`): text held only in Rust memory and wiped when dropped.
/// `Debug` and `Display` print `[redacted]`.
///
/// # Security
/// Never rendered by `getConfig()`, never in a message (docs/secrets.md). The bytes are reached
/// only through [`SecretValue::expose`], where a header is rendered for the upstream or the
/// response scrubber is built.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretValue(zeroize::Zeroizing<String>);

impl SecretValue {
    /// Wraps a value already checked for CR, LF, NUL and control characters.
    pub fn new(value: String) -> Self {
        SecretValue(zeroize::Zeroizing::new(value))
    }

    /// The value, for the upstream request and the response scrubber only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(super::REDACTED)
    }
}

impl fmt::Display for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(super::REDACTED)
    }
}
