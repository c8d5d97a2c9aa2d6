//! The compiled egress policy: `decide(&Request) -> Decision` (SPEC §2). Pure: no I/O, no clock.
//!
//! A [`Policy`] is compiled once per applied config and shared read-only by every connection.

use std::net::IpAddr;

use crate::config::{Config, EgressRule};

/// Fixed reason strings of decisions and `egress.request` events.
pub mod reason {
    /// A rule decided (allow or deny).
    pub const RULE: &str = "rule";
    /// No rule matched: default deny.
    pub const NO_RULE: &str = "no-rule";
    /// An override rule matched a plain-HTTP request without `allowPlaintext`.
    pub const PLAINTEXT_CREDENTIALS: &str = "plaintext-credentials";
    /// The name resolved to a private or special address no rule names.
    pub const PRIVATE_ADDRESS: &str = "private-address";
    /// SNI, CONNECT target and `Host` disagree.
    pub const HOST_MISMATCH: &str = "host-mismatch";
    /// The request was aimed at the proxy itself.
    pub const PROXY_LOOP: &str = "proxy-loop";
    /// Non-HTTP bytes on a tunnel whose rule inspects HTTP (methods, paths or override).
    pub const NOT_HTTP: &str = "not-http";
}

/// The outcome of a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Allowed,
    Denied,
}

impl Access {
    /// `"allowed"` / `"denied"`, as in events.
    pub const fn as_str(self) -> &'static str {
        match self {
            Access::Allowed => "allowed",
            Access::Denied => "denied",
        }
    }
}

/// The scheme a request arrived with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Http,
    Https,
    Tcp,
}

impl Scheme {
    /// `"http"`, `"https"` or `"tcp"`, as in events.
    pub const fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
            Scheme::Tcp => "tcp",
        }
    }
}

/// What the proxy knows about one HTTP request when it decides.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// Normalized host (see [`crate::config::normalize_host`]).
    pub host: &'a str,
    pub port: u16,
    /// Method as sent; compared case-insensitively.
    pub method: &'a str,
    /// Raw request path (may carry a query string); normalized inside `decide`.
    pub path: &'a str,
    pub scheme: Scheme,
    /// The address the proxy will connect to, when known (for IP/CIDR rules).
    pub ip: Option<IpAddr>,
}

/// A decision: access, the index of the deciding rule, and a fixed reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub access: Access,
    pub rule: Option<usize>,
    pub reason: &'static str,
}

/// The answer to "could any request to host:port be allowed?" (asked before accepting a CONNECT
/// or a transparent connection).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectDecision {
    /// Denied when no request to host:port could be allowed; `rule` is the deciding rule if any.
    pub decision: Decision,
    /// Whether non-HTTP bytes may pass as a raw tunnel: the first rule matching host and port is an
    /// allow rule without `methods`, `paths` or `override`.
    pub raw_tunnel: bool,
}

/// A compiled rule set.
#[derive(Debug, Clone)]
pub struct Policy {
    rules: Vec<EgressRule>,
}

impl Policy {
    /// Compiles the egress rules of a validated config.
    pub fn compile(config: &Config) -> Policy {
        Policy {
            rules: config.egress.clone(),
        }
    }

    /// Decides one HTTP request: first matching rule wins, no match is denied (`no-rule`). An allow
    /// by an override rule over `Scheme::Http` without `allowPlaintext` is denied
    /// (`plaintext-credentials`).
    pub fn decide(&self, request: &Request<'_>) -> Decision {
        let _ = request;
        todo!()
    }

    /// Decides whether a tunnel to host:port may be opened.
    pub fn decide_connect(&self, host: &str, port: u16, ip: Option<IpAddr>) -> ConnectDecision {
        let _ = (host, port, ip);
        todo!()
    }

    /// Whether some rule names `ip` explicitly by an IP literal or CIDR host (which lifts the
    /// private-address refusal for that address).
    pub fn names_address(&self, ip: IpAddr) -> bool {
        let _ = ip;
        todo!()
    }

    /// Whether some allow rule's host could match `host` (used by the DNS responder).
    pub fn could_allow_host(&self, host: &str) -> bool {
        let _ = host;
        todo!()
    }

    /// The rule at `index` (for its override headers).
    pub fn rule(&self, index: usize) -> Option<&EgressRule> {
        self.rules.get(index)
    }

    /// The number of rules.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// Whether there are no rules (everything is denied).
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }
}

/// A config together with its compiled policy: what is in force, swapped atomically as a whole
/// by `applyConfig` (SPEC §1) and read by every decision.
#[derive(Debug)]
pub struct Compiled {
    pub config: std::sync::Arc<Config>,
    pub policy: Policy,
}

impl Compiled {
    /// Compiles a validated config.
    pub fn new(config: Config) -> Compiled {
        let policy = Policy::compile(&config);
        Compiled {
            config: std::sync::Arc::new(config),
            policy,
        }
    }
}

/// The cell holding what is in force; shared by the sandbox (writer) and the proxy (readers).
pub type PolicyCell = arc_swap::ArcSwap<Compiled>;
