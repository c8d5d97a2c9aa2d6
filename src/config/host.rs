//! Host patterns of egress rules (`api.github.com`, `*.pypi.org`, `*`, `10.0.0.0/8`) and host
//! normalization (case, trailing dot, IDN to punycode).
//!
//! Rule hosts and request hosts go through the same normalization ([`normalize_host`]) so that a
//! comparison is always between two canonical forms (docs/network-access.md):
//! 1. one trailing dot is removed (`API.GITHUB.COM.` is `api.github.com`);
//! 2. IP literals (IPv6 with or without brackets) become their canonical text (`::1`);
//! 3. names go through UTS #46 (lowercase, IDN to punycode) and must then be LDH labels of at most
//!    63 bytes, at most 253 bytes in total;
//! 4. a name whose last label is numeric (`127.1`, `0x7f.1`) is refused: resolvers read such names
//!    as IPv4 addresses in shorthand, so matching them as names would let an address slip past an
//!    IP rule.

use std::net::IpAddr;

use idna::uts46::{AsciiDenyList, DnsLength, Hyphens, Uts46};

/// Longest hostname in bytes (RFC 1035 §2.3.4, without the trailing dot).
const MAX_HOST_LEN: usize = 253;
/// Longest label in bytes (RFC 1035 §2.3.4).
const MAX_LABEL_LEN: usize = 63;

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
    ///
    /// # Security
    /// Wildcards are accepted only as `*` or a leading `*.` over a name of at least two labels:
    /// `*.com` would allow most of the internet, and `api.*.com` / `*api.com` have no meaning a
    /// reader could agree on. A CIDR block with host bits set (`10.0.0.1/8`) is refused rather than
    /// silently widened to its network.
    pub fn parse(raw: &str) -> Result<HostPattern, String> {
        const FORMS: &str =
            "use a hostname (api.example.com), *.example.com, *, an IP address or a CIDR block";
        if raw.is_empty() {
            return Err(format!("expected a host, got an empty string; {FORMS}"));
        }
        if raw == "*" {
            return Ok(HostPattern::Any);
        }
        if let Some(hint) = url_hint(raw) {
            return Err(hint);
        }
        if let Some((addr, prefix)) = raw.split_once('/') {
            return parse_cidr(raw, addr, prefix);
        }
        if let Some(hint) = port_hint(raw) {
            return Err(hint);
        }
        if let Some(apex) = raw.strip_prefix("*.") {
            if apex.contains('*') {
                return Err(format!(
                    "{} has more than one wildcard; {FORMS}",
                    quote(raw)
                ));
            }
            if parse_ip(apex).is_some() {
                return Err(format!(
                    "{} puts a wildcard over an IP address; use a CIDR block such as 10.0.0.0/8",
                    quote(raw)
                ));
            }
            let apex = normalize_name(apex)
                .map_err(|why| format!("{} is not a valid host: {why}", quote(raw)))?;
            if !apex.contains('.') {
                return Err(format!(
                    "{} puts a wildcard over a top-level domain, which would allow far more than \
                     intended; name the domain, e.g. *.example.{apex}",
                    quote(raw)
                ));
            }
            return Ok(HostPattern::Suffix(apex));
        }
        if raw.contains('*') {
            return Err(format!(
                "{} has a wildcard in the wrong place; a wildcard may only be the whole host (*) or \
                 the first label (*.example.com)",
                quote(raw)
            ));
        }
        if let Some(ip) = parse_ip(raw) {
            return Ok(HostPattern::Net(ipnet::IpNet::from(ip)));
        }
        if raw.contains(':') || raw.starts_with('[') {
            return Err(format!(
                "{} is not a valid IP address; write IPv6 addresses like 2001:db8::1 or [2001:db8::1], \
                 without a port or zone",
                quote(raw)
            ));
        }
        normalize_name(raw)
            .map(HostPattern::Exact)
            .map_err(|why| format!("{} is not a valid host: {why}; {FORMS}", quote(raw)))
    }

    /// Whether a request to `host` (normalized, see [`normalize_host`]) connecting to `ip` matches.
    ///
    /// `Suffix` matches the apex and any subdomain at a label boundary (`evilpypi.org` does not
    /// match `*.pypi.org`). `Net` matches when `host` is an IP literal inside the block or `ip` is.
    pub fn matches(&self, host: &str, ip: Option<IpAddr>) -> bool {
        match self {
            HostPattern::Any => true,
            HostPattern::Exact(name) => host == name,
            HostPattern::Suffix(apex) => suffix_matches(apex, host),
            HostPattern::Net(net) => {
                host_ip(host).is_some_and(|a| net.contains(&a))
                    || ip.is_some_and(|a| net.contains(&a.to_canonical()))
            }
        }
    }
}

/// Whether `host` is `apex` or a subdomain of it at a label boundary.
pub(crate) fn suffix_matches(apex: &str, host: &str) -> bool {
    match host.len().checked_sub(apex.len()) {
        Some(0) => host == apex,
        Some(cut) => host.as_bytes()[cut - 1] == b'.' && host.ends_with(apex),
        None => false,
    }
}

/// The canonical IP address a normalized host names, if it is an IP literal.
pub(crate) fn host_ip(host: &str) -> Option<IpAddr> {
    // Cheap filter: normalized names always contain a letter or hyphen before any parse attempt
    // would succeed, and IP literals start with a hex digit or ':'.
    let first = *host.as_bytes().first()?;
    if !(first.is_ascii_hexdigit() || first == b':') {
        return None;
    }
    host.parse::<IpAddr>().ok().map(|ip| ip.to_canonical())
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
    if let Some(ip) = parse_ip(raw) {
        return Some(ip.to_string());
    }
    if raw.contains(':') || raw.starts_with('[') {
        return None;
    }
    normalize_name(raw).ok()
}

/// Whether `host` is already in the form [`normalize_host`] returns, judged cheaply and
/// conservatively (false means "normalize it", never "invalid").
pub(crate) fn is_normalized_host(host: &str) -> bool {
    let bytes = host.as_bytes();
    if bytes.is_empty() || bytes.len() > MAX_HOST_LEN || host.contains("xn--") {
        // `xn--` labels must be validated by UTS #46.
        return false;
    }
    if !bytes
        .iter()
        .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.'))
    {
        return false; // IPv6 literals, uppercase, IDNs and junk take the slow path
    }
    if !host
        .split('.')
        .all(|label| !label.is_empty() && label.len() <= MAX_LABEL_LEN)
    {
        return false;
    }
    // A numeric last label is fine only in a canonical dotted quad.
    !last_label_is_numeric(host) || host.parse::<std::net::Ipv4Addr>().is_ok()
}

/// Parses an IP literal: IPv4 dotted quad, IPv6 with or without brackets (no zone, no port).
/// IPv4-mapped IPv6 addresses come back as IPv4.
fn parse_ip(raw: &str) -> Option<IpAddr> {
    let inner = raw
        .strip_prefix('[')
        .and_then(|r| r.strip_suffix(']'))
        .unwrap_or(raw);
    let ip: IpAddr = inner.parse().ok()?;
    if inner.len() != raw.len() && !ip.is_ipv6() {
        return None; // `[1.2.3.4]` is not a valid host
    }
    Some(ip.to_canonical())
}

/// The message for a URL given as a host (`https://api.github.com`, `api.github.com/v1`): a
/// scheme, or a `/` after something that is not an IP address followed by anything but a prefix
/// length. `None` when `raw` is not URL-like.
fn url_hint(raw: &str) -> Option<String> {
    let rest = match raw.split_once("://") {
        Some((_, rest)) => rest,
        None => {
            let (addr, prefix) = raw.split_once('/')?;
            let is_prefix = !prefix.is_empty() && prefix.bytes().all(|b| b.is_ascii_digit());
            if is_prefix || parse_ip(addr).is_some() {
                return None;
            }
            raw
        }
    };
    let (authority, path) = match rest.split_once('/') {
        Some((authority, path)) => (authority, format!("/{path}")),
        None => (rest, String::new()),
    };
    let authority = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    let mut fix = format!("write host: {}", quote(authority));
    if let Some((host, port)) = split_port(authority) {
        fix = format!("write host: {} and ports: [{port}]", quote(host));
    }
    if !path.is_empty() && path != "/" {
        fix.push_str(&format!(
            " and put the path in paths, e.g. [{}]",
            quote(&format!("{}/**", path.trim_end_matches('/')))
        ));
    }
    Some(format!(
        "{} is a URL; expected a host, not a URL: {fix}",
        quote(raw)
    ))
}

/// `host:port` (or `[v6]:port`) with a numeric port, as `(host, port)`.
fn split_port(raw: &str) -> Option<(&str, u16)> {
    let (host, port) = raw.rsplit_once(':')?;
    if host.is_empty() || port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let port = port.parse::<u16>().ok()?;
    // A bare IPv6 address (`2001:db8::1`) is not a host with a port.
    if host.contains(':') && !(host.starts_with('[') && host.ends_with(']')) {
        return None;
    }
    Some((host, port))
}

/// The message for a host with a port (`x:443`, `[::1]:443`): ports go in `ports`.
fn port_hint(raw: &str) -> Option<String> {
    let (host, port) = split_port(raw)?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    Some(format!(
        "{} has a port; put the port in ports: host: {}, ports: [{port}]",
        quote(raw),
        quote(host)
    ))
}

/// A CIDR block `addr/prefix`, refused when host bits are set.
fn parse_cidr(raw: &str, addr: &str, prefix: &str) -> Result<HostPattern, String> {
    let Some(ip) = parse_ip(addr) else {
        return Err(format!(
            "{} is not a valid CIDR block: {} is not an IP address; write e.g. 10.0.0.0/8 or 2001:db8::/32",
            quote(raw),
            quote(addr)
        ));
    };
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let len = match prefix.parse::<u8>() {
        Ok(len) if len <= max && prefix.bytes().all(|b| b.is_ascii_digit()) => len,
        _ => {
            return Err(format!(
            "{} is not a valid CIDR block: the prefix length must be an integer from 0 to {max}",
            quote(raw)
        ))
        }
    };
    let net = ipnet::IpNet::new(ip, len)
        .map_err(|e| format!("{} is not a valid CIDR block: {e}", quote(raw)))?;
    if net.trunc() != net {
        return Err(format!(
            "{} has host bits set; did you mean {}?",
            quote(raw),
            net.trunc()
        ));
    }
    Ok(HostPattern::Net(net))
}

/// Normalizes a DNS name (not an IP literal): one trailing dot removed, UTS #46 mapping (lowercase,
/// IDN to punycode), then LDH labels and lengths checked. The error says why.
fn normalize_name(raw: &str) -> Result<String, String> {
    let name = raw.strip_suffix('.').unwrap_or(raw);
    if name.is_empty() {
        return Err("the name is empty".into());
    }
    let ascii = Uts46::new()
        .to_ascii(
            name.as_bytes(),
            AsciiDenyList::STD3,
            Hyphens::Allow,
            DnsLength::Ignore,
        )
        .map_err(|_| {
            "it is not a valid domain name (letters, digits, hyphens and dots; IDNs are accepted)"
                .to_string()
        })?;
    let ascii = ascii.into_owned();
    if ascii.len() > MAX_HOST_LEN {
        return Err(format!("the name is longer than {MAX_HOST_LEN} bytes"));
    }
    for label in ascii.split('.') {
        if label.is_empty() {
            return Err("the name has an empty label (two dots in a row or a leading dot)".into());
        }
        if label.len() > MAX_LABEL_LEN {
            return Err(format!("a label is longer than {MAX_LABEL_LEN} bytes"));
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err("labels may only hold letters, digits and hyphens".into());
        }
    }
    if last_label_is_numeric(&ascii) {
        return Err(
            "the last label is numeric, which resolvers read as an IPv4 address; write the address \
             as a dotted quad (10.0.0.1)"
                .into(),
        );
    }
    Ok(ascii)
}

/// Whether the last label is all digits or `0x` hex: the WHATWG URL parser and `inet_aton` read
/// such names (`127.1`, `0x7f.1`, `2130706433`) as IPv4 addresses.
fn last_label_is_numeric(name: &str) -> bool {
    let last = name.rsplit('.').next().unwrap_or(name);
    let hex = last.strip_prefix("0x").or_else(|| last.strip_prefix("0X"));
    match hex {
        Some(digits) => digits.bytes().all(|b| b.is_ascii_hexdigit()),
        None => !last.is_empty() && last.bytes().all(|b| b.is_ascii_digit()),
    }
}

/// A user-supplied string for a message: JSON-quoted (so control characters show escaped) and cut
/// to a readable length.
pub(crate) fn quote(raw: &str) -> String {
    const MAX: usize = 80;
    let cut = if raw.len() > MAX {
        let mut end = MAX;
        while !raw.is_char_boundary(end) {
            end -= 1;
        }
        &raw[..end]
    } else {
        raw
    };
    let mut out = serde_json::Value::String(cut.to_string()).to_string();
    if cut.len() < raw.len() {
        out.push('…');
    }
    out
}

#[cfg(test)]
#[rustfmt::skip]
mod tests {
    use super::*;

    fn net(s: &str) -> HostPattern {
        HostPattern::Net(s.parse().unwrap())
    }

    // Rule host parsing: accepted forms and their normal form.
    #[test]
    fn parse_accepts() {
        let cases: &[(&str, HostPattern)] = &[
            ("*", HostPattern::Any),
            ("api.github.com", HostPattern::Exact("api.github.com".into())),
            ("API.GitHub.COM", HostPattern::Exact("api.github.com".into())),
            ("api.github.com.", HostPattern::Exact("api.github.com".into())),
            ("localhost", HostPattern::Exact("localhost".into())),
            ("bücher.example", HostPattern::Exact("xn--bcher-kva.example".into())),
            ("xn--bcher-kva.example", HostPattern::Exact("xn--bcher-kva.example".into())),
            ("*.pypi.org", HostPattern::Suffix("pypi.org".into())),
            ("*.PyPI.org.", HostPattern::Suffix("pypi.org".into())),
            ("*.co.uk", HostPattern::Suffix("co.uk".into())),
            ("10.0.0.1", net("10.0.0.1/32")),
            ("10.0.0.0/8", net("10.0.0.0/8")),
            ("0.0.0.0/0", net("0.0.0.0/0")),
            ("::1", net("::1/128")),
            ("[::1]", net("::1/128")),
            ("2001:db8::/32", net("2001:db8::/32")),
            ("[2001:db8::]/32", net("2001:db8::/32")),
            ("::ffff:10.0.0.1", net("10.0.0.1/32")),
        ];
        for (raw, want) in cases {
            assert_eq!(HostPattern::parse(raw).as_ref(), Ok(want), "{raw}");
        }
    }

    // Rule host parsing: rejected forms, with a word the message must contain.
    #[test]
    fn parse_rejects() {
        let cases: &[(&str, &str)] = &[
            ("", "empty"),
            ("*.com", "top-level"),
            ("*.", "not a valid host"),
            ("api.*.com", "wrong place"),
            ("*api.com", "wrong place"),
            ("api.com*", "wrong place"),
            ("**.example.com", "wrong place"),
            ("*.*.example.com", "more than one"),
            ("*.10.0.0.1", "IP address"),
            ("10.0.0.1/8", "did you mean 10.0.0.0/8"),
            ("2001:db8::1/32", "did you mean 2001:db8::/32"),
            ("10.0.0.0/33", "prefix length"),
            ("10.0.0.0/", "prefix length"),
            ("10.0.0.0/+8", "prefix length"),
            ("example.com/8", "not an IP address"),
            ("api..github.com", "empty label"),
            (".github.com", "empty label"),
            ("api.github.com..", "empty label"),
            ("api_x.github.com", "not a valid domain name"),
            ("api github.com", "not a valid domain name"),
            ("example.com:443", "put the port in ports"),
            ("x:443", "put the port in ports"),
            ("[::1]:443", "put the port in ports"),
            ("10.0.0.1:80", "put the port in ports"),
            ("https://api.github.com", "a host, not a URL"),
            ("http://api.github.com:8080/v1/x", "ports: [8080]"),
            ("api.github.com/v1", "a host, not a URL"),
            ("api.github.com/", "a host, not a URL"),
            ("user@api.github.com/x", "a host, not a URL"),
            ("[example.com]", "not a valid IP address"),
            ("fe80::1%eth0", "not a valid IP address"),
            ("127.1", "numeric"),
            ("0x7f.1", "numeric"),
            ("2130706433", "numeric"),
            ("010.0.0.1", "numeric"),
        ];
        for (raw, want) in cases {
            let err = HostPattern::parse(raw).expect_err(raw);
            assert!(err.contains(want), "{raw}: {err}");
        }
        let long_label = format!("{}.com", "a".repeat(64));
        assert!(HostPattern::parse(&long_label).unwrap_err().contains("63"));
        let long_name = format!("{}com", "abcdefghi.".repeat(26));
        assert!(HostPattern::parse(&long_name).unwrap_err().contains("253"));
    }

    // Request host normalization.
    #[test]
    fn normalize() {
        let cases: &[(&str, Option<&str>)] = &[
            ("api.github.com", Some("api.github.com")),
            ("API.GITHUB.COM.", Some("api.github.com")),
            ("Bücher.Example", Some("xn--bcher-kva.example")),
            ("[::1]", Some("::1")),
            ("::1", Some("::1")),
            ("[0:0::1]", Some("::1")),
            ("[::ffff:127.0.0.1]", Some("127.0.0.1")),
            ("127.0.0.1", Some("127.0.0.1")),
            ("api.github.com..", None),
            ("", None),
            (".", None),
            ("a b", None),
            ("127.1", None),
            ("[127.0.0.1]", None),
            ("[::1]:443", None),
            ("evil.com\r\nx", None),
        ];
        for (raw, want) in cases {
            assert_eq!(normalize_host(raw).as_deref(), *want, "{raw:?}");
        }
    }

    // The fast "already normalized" check must never say yes to something normalize would change.
    #[test]
    fn normalized_check_is_conservative() {
        let cases = [
            "api.github.com", "API.github.com", "api.github.com.", "::1", "0:0::1", "127.0.0.1",
            "127.1", "xn--bcher-kva.example", "a..b", "[::1]", "bücher.example", "_x.com", "",
        ];
        for raw in cases {
            if is_normalized_host(raw) {
                assert_eq!(normalize_host(raw).as_deref(), Some(raw), "{raw:?}");
            }
        }
        assert!(is_normalized_host("api.github.com"));
        assert!(is_normalized_host("10.0.0.1"));
        assert!(!is_normalized_host("API.github.com"));
    }

    // Matching a pattern against a normalized request host and the connect address.
    #[test]
    fn matches() {
        let v4: IpAddr = "10.1.2.3".parse().unwrap();
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().unwrap();
        let cases: &[(&str, &str, Option<IpAddr>, bool)] = &[
            ("*", "anything.example", None, true),
            ("api.github.com", "api.github.com", None, true),
            ("api.github.com", "api.github.com.evil.com", None, false),
            ("api.github.com", "github.com", None, false),
            ("*.github.com", "github.com", None, true),
            ("*.github.com", "api.github.com", None, true),
            ("*.github.com", "a.b.github.com", None, true),
            ("*.github.com", "evilgithub.com", None, false),
            ("*.pypi.org", "evilpypi.org", None, false),
            ("*.github.com", "github.com.evil.com", None, false),
            ("10.0.0.0/8", "10.9.9.9", None, true),
            ("10.0.0.0/8", "11.0.0.1", None, false),
            ("10.0.0.0/8", "internal.corp", Some(v4), true),
            ("10.0.0.0/8", "internal.corp", Some(mapped), true),
            ("10.0.0.0/8", "internal.corp", None, false),
            ("2001:db8::/32", "2001:db8::5", None, true),
            ("2001:db8::/32", "2001:db9::5", None, false),
            ("::1", "::1", None, true),
            ("10.1.2.3", "10.1.2.3", None, true),
            ("10.1.2.3", "evil.com", None, false),
        ];
        for (pattern, host, ip, want) in cases {
            let p = HostPattern::parse(pattern).unwrap();
            assert_eq!(p.matches(host, *ip), *want, "{pattern} vs {host} ({ip:?})");
        }
    }

    // Display renders a form that parses back to the same pattern.
    #[test]
    fn display_round_trips() {
        for raw in ["*", "api.github.com", "*.pypi.org", "10.0.0.1", "10.0.0.0/8", "::1", "2001:db8::/32"] {
            let p = HostPattern::parse(raw).unwrap();
            assert_eq!(HostPattern::parse(&p.to_string()).unwrap(), p, "{raw}");
        }
    }

    // Messages quote the input safely.
    #[test]
    fn quote_escapes_and_cuts() {
        assert_eq!(quote("a\r\nb"), "\"a\\r\\nb\"");
        assert!(quote(&"x".repeat(200)).ends_with('…'));
    }
}
