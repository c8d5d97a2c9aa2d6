//! Host patterns of egress rules (`api.github.com`, `*.pypi.org`, `*`, `10.0.0.0/8`) and host
//! normalization (case, trailing dot, IDN to punycode).

use std::net::IpAddr;

/// A validated `host` of an egress rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    /// `*`: every host.
    Any,
    /// An exact, normalized hostname.
    Exact(String),
    /// `*.example.com`: the apex `example.com` and every subdomain; holds the normalized apex.
    Suffix(String),
    /// An IP literal or CIDR block, matched against the address the proxy connects to.
    Net(ipnet::IpNet),
}

impl HostPattern {
    /// Parses a rule's `host`; the error says what is wrong and how to fix it.
    pub fn parse(raw: &str) -> Result<HostPattern, String> {
        let _ = raw;
        todo!()
    }

    /// Whether a request to `host` (normalized, see [`normalize_host`]) connecting to `ip` matches.
    pub fn matches(&self, host: &str, ip: Option<IpAddr>) -> bool {
        let _ = (host, ip);
        todo!()
    }
}

impl std::fmt::Display for HostPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HostPattern::Any => f.write_str("*"),
            HostPattern::Exact(h) => f.write_str(h),
            HostPattern::Suffix(h) => write!(f, "*.{h}"),
            HostPattern::Net(n) if n.prefix_len() == n.max_prefix_len() => {
                write!(f, "{}", n.addr())
            }
            HostPattern::Net(n) => write!(f, "{n}"),
        }
    }
}

/// Normalizes a hostname from a request: lowercase, one trailing dot removed, IDN to punycode,
/// brackets stripped from IPv6 literals. `None` when it is not a valid hostname or IP literal.
pub fn normalize_host(raw: &str) -> Option<String> {
    let _ = raw;
    todo!()
}
