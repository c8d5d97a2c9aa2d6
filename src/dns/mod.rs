//! The policy-aware DNS responder served inside each sandbox (docs/network-access.md#dns-and-transparent-capture).
//!
//! Clients that ignore proxy variables (Node's `fetch`, Go, raw sockets) resolve names through
//! `/etc/resolv.conf`, which points at this responder on port 53 inside the sandbox's network
//! namespace. It answers from the policy alone and never forwards a query:
//! - [`wire`]: DNS messages (RFC 1035), parsed and built by hand, every byte treated as hostile;
//! - [`names`]: the [`NameTable`] mapping each name some rule could allow to a stable
//!   sandbox-local address in `127.1.0.0/16` (and `fd68:6976:65::/96`) and back, which the
//!   proxy's transparent listeners use to learn the name of a connection; denied names get an
//!   address from a bounded ring in `127.2.0.0/16`, whose connections are answered `403`;
//! - [`responder`]: the [`DnsResponder`] serving UDP and TCP and emitting `dns.query` events.
//!
//! No DNS crate is used: the responder needs one question in and a handful of record types out,
//! and a hand-written, bounds-checked parser of a few hundred lines is easier to audit than a
//! general one.

pub mod names;
pub mod responder;
pub mod wire;

pub use names::NameTable;
pub use responder::{DnsResponder, Transport};

/// TTL of every positive answer, in seconds: short, so that a name the policy stops allowing is
/// not used from a cache for long (the proxy still decides every connection).
pub const ANSWER_TTL: u32 = 5;

/// Field names of the `dns.query` event (docs/audit-log.md).
pub mod field {
    /// The queried name, normalized; names that are no hostname in presentation form (`\DDD`).
    /// The same field name as in `egress.request`, so one filter on `host` sees both.
    pub const HOST: &str = "host";
    /// The same as [`HOST`] (the field's first name, kept for existing readers).
    pub const NAME: &str = "name";
    /// The query type mnemonic: `"A"`, `"AAAA"`, `"PTR"`, … or `"TYPE<n>"`.
    pub const QTYPE: &str = "qtype";
    /// `"allowed"` or `"denied"`.
    pub const ACCESS: &str = "access";
}
