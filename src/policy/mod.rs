//! The compiled egress policy: `decide(&Request) -> Decision` (docs/network-access.md). Pure: no I/O, no clock.
//!
//! A [`Policy`] is compiled once per applied config and shared read-only by every connection.
//!
//! How a decision is made:
//! 1. the request host is checked to be normalized (and normalized if not, so a caller that forgot
//!    cannot make a deny rule miss an `API.Example.COM.` spelling);
//! 2. the host index (`index.rs`) yields the buckets of rules whose host pattern matches: the
//!    exact bucket, one suffix bucket per label suffix, one network bucket per prefix length for
//!    the host's IP literal and the connect address, and the `*` list;
//! 3. each bucket is scanned in rule order up to its first full match (ports, methods, paths), and
//!    only below the best index found so far; the smallest index wins, as if every rule had been
//!    tried in order;
//! 4. the request path is normalized at most once, and only when a candidate rule has `paths`;
//!    when it is already normal no allocation happens.

mod explain;
mod index;
mod paths;

use std::borrow::Cow;
use std::net::IpAddr;

use crate::config::{host_ip, is_normalized_host, PathGlob};
use crate::config::{normalize_host, Config, EgressRule, Mode, RuleAccess};
use index::HostIndex;
use paths::PathReadings;

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
    /// The request named a host that is not a valid hostname or IP literal.
    pub const INVALID_HOST: &str = "invalid-host";
    /// An allow rule's `paths` match the path as written but not as every common server reads it
    /// (`/v1/..;/admin`, `/v1/..%2fadmin`), and no later rule allowed it.
    pub const PATH_AMBIGUOUS: &str = "path-ambiguous";
    /// A method-override header (`X-HTTP-Method-Override`, `X-HTTP-Method`, `X-Method-Override`)
    /// or `_method` query parameter names a method the policy denies.
    pub const METHOD_OVERRIDE: &str = "method-override";
    /// A protocol upgrade the rule cannot inspect: anything but WebSocket under a rule with
    /// `methods`, `paths` or `override`.
    pub const UPGRADE: &str = "upgrade";
    /// `TRACE` or `TRACK` under an override rule (the upstream would echo the credential back).
    pub const TRACE_WITH_CREDENTIALS: &str = "trace-with-credentials";
    /// No rule matched, but an allow rule names the host: its `methods` do not hold the method.
    pub const METHOD: &str = "method";
    /// No rule matched, but an allow rule names the host: its `paths` do not match the path.
    pub const PATH: &str = "path";
    /// No rule matched, but an allow rule names the host: its `ports` do not hold the port.
    pub const PORT: &str = "port";
    /// No rule matched and the `onUnmatched` callback decided.
    pub const CALLBACK: &str = "callback";
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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
    /// Allowed only because report mode let a denial through ([`Policy::apply_mode`]).
    pub would_deny: bool,
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
    /// The sandbox's mode (a rule's own `mode` wins for decisions it makes).
    mode: Mode,
    /// Per rule: a deny rule's `paths` in folded case (see [`paths`]); `None` otherwise.
    folded: Vec<Option<Vec<PathGlob>>>,
    index: HostIndex,
}

/// "No rule found" in first-match scans.
const NONE: usize = usize::MAX;

impl Policy {
    /// Compiles the egress rules of a validated config.
    pub fn compile(config: &Config) -> Policy {
        Policy {
            mode: config.mode,
            ..Policy::from_rules(config.egress.clone())
        }
    }

    /// Compiles a list of validated rules.
    pub fn from_rules(rules: Vec<EgressRule>) -> Policy {
        let index = HostIndex::build(&rules);
        let folded = rules
            .iter()
            .map(|r| match r.access {
                RuleAccess::Deny => paths::folded_globs(r),
                RuleAccess::Allow => None,
            })
            .collect();
        Policy {
            rules,
            mode: Mode::Enforce,
            folded,
            index,
        }
    }

    /// Decides one HTTP request: first matching rule wins, no match is denied (`no-rule`). An allow
    /// by an override rule over `Scheme::Http` without `allowPlaintext` is denied
    /// (`plaintext-credentials`), and so is `TRACE` / `TRACK` under an override rule
    /// (`trace-with-credentials`: the upstream would echo the injected header back).
    ///
    /// A host that is not a valid hostname or IP literal is denied (`invalid-host`). With
    /// `Scheme::Tcp` (bytes that are not HTTP) the method and path are ignored and the request is
    /// allowed only as a raw tunnel (see [`Policy::decide_connect`]); when the first rule matching
    /// host and port inspects HTTP, it is denied with `not-http`.
    ///
    /// # Security
    /// Paths are compared after [`crate::config::normalize_path`], so `/v1/../admin`,
    /// `/v1/%2e%2e/admin` and `//admin` all meet a rule on `/admin/**`; and under every common
    /// server reading of the path (module `paths`): a deny rule matches if any reading matches,
    /// an allow rule only if all do (else, with no later rule allowing, `path-ambiguous`).
    pub fn decide(&self, request: &Request<'_>) -> Decision {
        let Some(host) = normalized(request.host) else {
            return Decision::denied(None, reason::INVALID_HOST);
        };
        if request.scheme == Scheme::Tcp {
            return self.decide_tcp(&host, request.port, request.ip);
        }
        let mut path = PathReadings::new(request.path);
        let mut best = NONE;
        let mut ambiguous = NONE;
        let ips = addresses(&host, request.ip);
        self.index.for_each_bucket(&host, ips, |bucket| {
            self.first_full_match(bucket, request, &mut path, &mut best, &mut ambiguous)
        });
        let Some(rule) = self.rules.get(best) else {
            if ambiguous != NONE {
                return Decision::denied(Some(ambiguous), reason::PATH_AMBIGUOUS);
            }
            return self.nearest_miss(&host, request, ips);
        };
        match rule.access {
            RuleAccess::Deny => Decision::denied(Some(best), reason::RULE),
            RuleAccess::Allow
                if request.scheme == Scheme::Http
                    && rule.override_.as_ref().is_some_and(|o| !o.allow_plaintext) =>
            {
                Decision::denied(Some(best), reason::PLAINTEXT_CREDENTIALS)
            }
            RuleAccess::Allow if rule.override_.is_some() && is_trace(request.method) => {
                Decision::denied(Some(best), reason::TRACE_WITH_CREDENTIALS)
            }
            RuleAccess::Allow => Decision::allowed(best),
        }
    }

    /// Scans one bucket (rule order) below `best` for the first rule matching port, method and
    /// path; notes in `ambiguous` an allow rule passed over only because the path is ambiguous.
    fn first_full_match(
        &self,
        bucket: &[usize],
        request: &Request<'_>,
        path: &mut PathReadings<'_>,
        best: &mut usize,
        ambiguous: &mut usize,
    ) {
        for &i in bucket {
            if i >= *best {
                break;
            }
            let rule = &self.rules[i];
            if !port_matches(rule, request.port) || !method_matches(rule, request.method) {
                continue;
            }
            if path.rule_matches(rule, self.folded[i].as_deref()) {
                *best = i;
                break;
            }
            if rule.access == RuleAccess::Allow && path.plain_matches(rule) {
                *ambiguous = (*ambiguous).min(i);
            }
        }
    }

    /// Whether a private or special address `ip` may be connected to for this request: an allow
    /// rule naming that address (an IP literal or CIDR host containing it) would itself allow it.
    /// With `request` (an HTTP request) the first IP/CIDR rule containing `ip` that matches the
    /// port, method and path must be an allow rule; without (a tunnel, whose requests are decided
    /// one by one later) an allow rule on that port must come before every IP/CIDR deny rule on
    /// that port with neither `methods` nor `paths`. IPv4-mapped IPv6 addresses count as IPv4.
    ///
    /// # Security
    /// Only `Net` hosts count: `*` and host names do not name private addresses
    /// (docs/network-access.md#private-addresses, SSRF). Naming the address is not enough: a
    /// `deny 127.0.0.0/8 ports:[22]` or an `allow 127.0.0.1 ports:[9]` rule must not open every
    /// other port of the host's loopback to a name that resolves there.
    pub fn exempts_address(&self, ip: IpAddr, port: u16, request: Option<&Request<'_>>) -> bool {
        let ip = ip.to_canonical();
        match request {
            Some(request) => {
                let mut path = PathReadings::new(request.path);
                let (mut best, mut ambiguous) = (NONE, NONE);
                let request = Request { port, ..*request };
                self.index.for_each_net_bucket(ip, &mut |bucket| {
                    self.first_full_match(bucket, &request, &mut path, &mut best, &mut ambiguous)
                });
                self.rules
                    .get(best)
                    .is_some_and(|r| r.access == RuleAccess::Allow)
            }
            None => {
                let (mut first_allow, mut first_deny) = (NONE, NONE);
                self.index.for_each_net_bucket(ip, &mut |bucket| {
                    for &i in bucket {
                        let rule = &self.rules[i];
                        if !port_matches(rule, port) {
                            continue;
                        }
                        match rule.access {
                            RuleAccess::Allow => first_allow = first_allow.min(i),
                            RuleAccess::Deny if !inspects_request(rule) => {
                                first_deny = first_deny.min(i)
                            }
                            RuleAccess::Deny => {}
                        }
                    }
                });
                first_allow < first_deny
            }
        }
    }

    /// Decides whether a tunnel to host:port may be opened.
    ///
    /// Allowed when some allow rule matching host and port (ignoring methods and paths) comes
    /// before every unconditional deny (a deny matching host and port with neither `methods` nor
    /// `paths`); the rule is that allow rule. Denied by such a deny, the rule is the deny; denied for
    /// lack of an allow rule, the rule is `None` and the reason `no-rule`. Each request inside the
    /// tunnel is then decided with [`Policy::decide`].
    pub fn decide_connect(&self, host: &str, port: u16, ip: Option<IpAddr>) -> ConnectDecision {
        let Some(host) = normalized(host) else {
            return ConnectDecision {
                decision: Decision::denied(None, reason::INVALID_HOST),
                raw_tunnel: false,
            };
        };
        let scan = self.scan_connect(&host, port, ip);
        let decision = if scan.first_allow < scan.first_deny {
            Decision::allowed(scan.first_allow)
        } else if scan.first_deny != NONE {
            Decision::denied(Some(scan.first_deny), reason::RULE)
        } else {
            self.nearest_port_miss(&host, ip)
        };
        let raw_tunnel = decision.access == Access::Allowed
            && scan.first == scan.first_allow
            && self
                .rules
                .get(scan.first)
                .is_some_and(|r| !inspects_http(r));
        ConnectDecision {
            decision,
            raw_tunnel,
        }
    }

    /// Whether some allow rule's host could match `host` (used by the DNS responder).
    ///
    /// Ports, methods and paths are ignored, and an IP/CIDR allow rule could match any name (it
    /// matches the address the name resolves to). `false` when the host is invalid or when a deny
    /// rule with no `ports`, `methods` or `paths` names the host before any such allow rule, so
    /// denied names get NXDOMAIN.
    pub fn could_allow_host(&self, host: &str) -> bool {
        self.could_allow(host, true)
    }

    /// Whether a *name* should resolve in the sandbox's DNS responder: like
    /// [`Policy::could_allow_host`], but only host-name rules (exact, `*.suffix`, `*`) count.
    ///
    /// # Security
    /// A name reachable only through an IP/CIDR allow rule does not resolve: resolving it would
    /// make the proxy look up attacker-chosen names (`<secret>.attacker.example`) on the host's
    /// resolver, which is DNS exfiltration. An IP literal asked as a name still counts when an
    /// IP/CIDR rule names it (nothing is looked up for it).
    pub fn could_resolve_name(&self, host: &str) -> bool {
        self.could_allow(host, false)
    }

    fn could_allow(&self, host: &str, nets_match_names: bool) -> bool {
        let Some(host) = normalized(host) else {
            return false;
        };
        let literal = host_ip(&host);
        // A name may resolve into any block, so an IP/CIDR allow rule could allow it.
        let mut first_allow = match literal {
            None if nets_match_names => self.index.first_net_allow().unwrap_or(NONE),
            _ => NONE,
        };
        let mut first_deny = NONE;
        self.index
            .for_each_bucket(&host, [literal, None], |bucket| {
                for &i in bucket {
                    if i >= first_allow && i >= first_deny {
                        break;
                    }
                    let rule = &self.rules[i];
                    match rule.access {
                        RuleAccess::Allow => first_allow = first_allow.min(i),
                        RuleAccess::Deny
                            if rule.ports.is_none()
                                && !inspects_request(rule)
                                && self.mode_of(Some(i)) == Mode::Enforce =>
                        {
                            first_deny = first_deny.min(i)
                        }
                        RuleAccess::Deny => {}
                    }
                }
            });
        // In report mode a name no rule allows is let through too (docs/network-access.md#report-mode).
        first_allow < first_deny || (self.mode == Mode::Report && first_deny == NONE)
    }

    /// Whether some rule has an IP/CIDR host, so that a decision may depend on the address the
    /// proxy connects to.
    ///
    /// # Security
    /// With such rules, a request for a name must be decided with [`Request::ip`] set to the
    /// address actually connected to (resolve first, then decide): `deny 10.0.0.0/8` followed by
    /// `allow *` only holds if the deny sees the resolved address.
    pub fn uses_addresses(&self) -> bool {
        self.index.has_nets()
    }

    /// Whether the rule at `index` looks at HTTP (`methods`, `paths` or `override`), so that
    /// bytes it cannot parse must not follow an allowed request (upgrades, raw tunnels).
    pub fn inspects_http(&self, index: usize) -> bool {
        self.rules.get(index).is_some_and(inspects_http)
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

    /// `decide` for non-HTTP bytes: only a raw tunnel may carry them.
    fn decide_tcp(&self, host: &str, port: u16, ip: Option<IpAddr>) -> Decision {
        let connect = self.decide_connect(host, port, ip);
        match connect.decision.access {
            Access::Allowed if !connect.raw_tunnel => {
                let first = self.scan_connect(host, port, ip).first;
                Decision::denied(Some(first), reason::NOT_HTTP)
            }
            _ => connect.decision,
        }
    }

    /// First rules matching host and port, ignoring methods and paths.
    fn scan_connect(&self, host: &str, port: u16, ip: Option<IpAddr>) -> ConnectScan {
        let ips = addresses(host, ip);
        let mut scan = ConnectScan {
            first: NONE,
            first_allow: NONE,
            first_deny: NONE,
        };
        self.index.for_each_bucket(host, ips, |bucket| {
            for &i in bucket {
                if i >= scan.first && i >= scan.first_allow && i >= scan.first_deny {
                    break;
                }
                let rule = &self.rules[i];
                if !port_matches(rule, port) {
                    continue;
                }
                scan.first = scan.first.min(i);
                match rule.access {
                    RuleAccess::Allow => scan.first_allow = scan.first_allow.min(i),
                    RuleAccess::Deny if !inspects_request(rule) => {
                        scan.first_deny = scan.first_deny.min(i)
                    }
                    RuleAccess::Deny => {}
                }
            }
        });
        scan
    }
}

/// Result of [`Policy::scan_connect`]; [`NONE`] where no rule was found.
struct ConnectScan {
    /// The first rule matching host and port.
    first: usize,
    /// The first allow rule matching host and port.
    first_allow: usize,
    /// The first deny rule matching host and port with neither methods nor paths.
    first_deny: usize,
}

impl Decision {
    fn allowed(rule: usize) -> Decision {
        Decision {
            access: Access::Allowed,
            rule: Some(rule),
            reason: reason::RULE,
            would_deny: false,
        }
    }

    /// A denial by `rule` (if any) for `reason`.
    pub const fn denied(rule: Option<usize>, reason: &'static str) -> Decision {
        Decision {
            access: Access::Denied,
            rule,
            reason,
            would_deny: false,
        }
    }
}

/// The host in normal form: borrowed when it already is (the proxy normalizes up front), `None`
/// when it is not a valid host.
fn normalized(host: &str) -> Option<Cow<'_, str>> {
    if is_normalized_host(host) {
        Some(Cow::Borrowed(host))
    } else {
        normalize_host(host).map(Cow::Owned)
    }
}

/// The addresses IP/CIDR rules are matched against: the host's own if it is an IP literal, and
/// the address the proxy connects to (when known and different), both canonical.
fn addresses(host: &str, connect: Option<IpAddr>) -> [Option<IpAddr>; 2] {
    let literal = host_ip(host);
    let connect = connect
        .map(|ip| ip.to_canonical())
        .filter(|ip| Some(*ip) != literal);
    [literal, connect]
}

fn port_matches(rule: &EgressRule, port: u16) -> bool {
    rule.ports
        .as_ref()
        .is_none_or(|ports| ports.contains(&port))
}

fn method_matches(rule: &EgressRule, method: &str) -> bool {
    rule.methods
        .as_ref()
        .is_none_or(|methods| methods.iter().any(|m| m.eq_ignore_ascii_case(method)))
}

/// `TRACE` or `TRACK` (compared case-insensitively, like every method).
fn is_trace(method: &str) -> bool {
    method.eq_ignore_ascii_case("TRACE") || method.eq_ignore_ascii_case("TRACK")
}

/// Whether a rule looks at methods or paths.
fn inspects_request(rule: &EgressRule) -> bool {
    rule.methods.is_some() || rule.paths.is_some()
}

/// Whether a rule needs to see HTTP: methods, paths or override headers.
fn inspects_http(rule: &EgressRule) -> bool {
    inspects_request(rule) || rule.override_.is_some()
}

/// A config together with its compiled policy: what is in force, swapped atomically as a whole
/// by `applyConfig` (README.md#api) and read by every decision.
#[derive(Debug)]
pub struct Compiled {
    pub config: std::sync::Arc<Config>,
    pub policy: Policy,
    /// The config as `getConfig()` shows it (secrets redacted), for `config.applied`.
    pub rendered: serde_json::Value,
    /// [`crate::config::content_hash`] of `rendered`: `configHash` in events.
    pub hash: std::sync::Arc<str>,
    /// Named secrets with the sandbox's placeholders (docs/secrets.md); empty until
    /// [`Compiled::with_secrets`].
    pub secrets: std::sync::Arc<crate::secrets::Table>,
}

impl Compiled {
    /// Compiles a validated config.
    pub fn new(config: Config) -> Compiled {
        let policy = Policy::compile(&config);
        let rendered = config.to_json();
        let hash = crate::config::content_hash(&rendered).into();
        Compiled {
            config: std::sync::Arc::new(config),
            policy,
            rendered,
            hash,
            secrets: Default::default(),
        }
    }

    /// Compiles a validated config with its secrets table over a sandbox's `placeholders`.
    pub fn with_secrets(config: Config, placeholders: &crate::secrets::Placeholders) -> Compiled {
        let table = crate::secrets::Table::build(&config, placeholders);
        Compiled {
            secrets: std::sync::Arc::new(table),
            ..Compiled::new(config)
        }
    }
}

/// The cell holding what is in force; shared by the sandbox (writer) and the proxy (readers).
pub type PolicyCell = arc_swap::ArcSwap<Compiled>;

#[cfg(test)]
#[rustfmt::skip]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn policy(egress: Value) -> Policy {
        Policy::compile(&Config::from_json(&json!({ "egress": egress })).unwrap())
    }

    const A: Access = Access::Allowed;
    const D: Access = Access::Denied;
    const HTTP: Scheme = Scheme::Http;
    const HTTPS: Scheme = Scheme::Https;
    const TCP: Scheme = Scheme::Tcp;

    /// (host, port, method, path, scheme, connect ip) -> (access, rule, reason)
    type Case<'a> = (
        &'a str,
        u16,
        &'a str,
        &'a str,
        Scheme,
        Option<&'a str>,
        Access,
        Option<usize>,
        &'static str,
    );

    fn check(egress: Value, cases: &[Case<'_>]) {
        let p = policy(egress.clone());
        for &(host, port, method, path, scheme, ip, access, rule, why) in cases {
            let ip = ip.map(|s| s.parse().unwrap());
            let request = Request {
                host,
                port,
                method,
                path,
                scheme,
                ip,
            };
            let got = p.decide(&request);
            assert_eq!(
                got,
                Decision {
                    access,
                    rule,
                    reason: why,
                    would_deny: false,
                },
                "{egress}\n  {request:?}"
            );
        }
    }

    // The README's example config, request by request.
    #[test]
    fn spec_example() {
        check(
            json!([
                { "access": "allow", "host": "api.anthropic.com" },
                { "access": "allow", "host": "pypi.org", "ports": [443] },
                { "access": "allow", "host": "api.github.com", "methods": ["GET", "POST"] },
                { "access": "allow", "host": "api.example.com", "paths": ["/v1/*"] },
                { "access": "allow", "host": "api.finnhub.io", "override": { "headers": { "X-Finnhub-Token": "k" } } },
            ]),
            &[
                ("api.anthropic.com", 443, "POST", "/v1/messages", HTTPS, None, A, Some(0), reason::RULE),
                ("api.anthropic.com", 8443, "GET", "/", HTTPS, None, A, Some(0), reason::RULE), // ports default: any
                ("pypi.org", 443, "GET", "/simple/", HTTPS, None, A, Some(1), reason::RULE),
                ("pypi.org", 80, "GET", "/simple/", HTTP, None, D, Some(1), reason::PORT),
                ("api.github.com", 443, "GET", "/zen", HTTPS, None, A, Some(2), reason::RULE),
                ("api.github.com", 443, "get", "/zen", HTTPS, None, A, Some(2), reason::RULE), // method case
                ("api.github.com", 443, "Post", "/repos", HTTPS, None, A, Some(2), reason::RULE),
                ("api.github.com", 443, "DELETE", "/repos/x", HTTPS, None, D, Some(2), reason::METHOD),
                ("API.GITHUB.COM.", 443, "GET", "/zen", HTTPS, None, A, Some(2), reason::RULE),
                ("api.github.com.evil.com", 443, "GET", "/zen", HTTPS, None, D, None, reason::NO_RULE),
                ("github.com", 443, "GET", "/", HTTPS, None, D, None, reason::NO_RULE),
                ("api.example.com", 443, "GET", "/v1/models", HTTPS, None, A, Some(3), reason::RULE),
                ("api.example.com", 443, "GET", "/v1/models?key=1", HTTPS, None, A, Some(3), reason::RULE),
                ("api.example.com", 443, "GET", "/v1/a/b", HTTPS, None, D, Some(3), reason::PATH),
                ("api.example.com", 443, "GET", "/v1/../admin", HTTPS, None, D, Some(3), reason::PATH),
                ("api.example.com", 443, "GET", "/v1/%2e%2e/admin", HTTPS, None, D, Some(3), reason::PATH),
                ("api.example.com", 443, "GET", "/v1//x", HTTPS, None, A, Some(3), reason::RULE),
                ("api.example.com", 443, "GET", "/admin/../v1/x", HTTPS, None, A, Some(3), reason::RULE),
                ("api.finnhub.io", 443, "GET", "/api/v1/quote", HTTPS, None, A, Some(4), reason::RULE),
                ("api.finnhub.io", 80, "GET", "/api/v1/quote", HTTP, None, D, Some(4), reason::PLAINTEXT_CREDENTIALS),
                ("unknown.example.org", 443, "GET", "/", HTTPS, None, D, None, reason::NO_RULE),
                ("not a host", 443, "GET", "/", HTTPS, None, D, None, reason::INVALID_HOST),
                ("127.1", 80, "GET", "/", HTTP, None, D, None, reason::INVALID_HOST),
            ],
        );
    }

    // Empty egress denies everything.
    #[test]
    fn empty_denies_all() {
        check(
            json!([]),
            &[(
                "api.github.com",
                443,
                "GET",
                "/",
                HTTPS,
                None,
                D,
                None,
                reason::NO_RULE,
            )],
        );
        let p = policy(json!([]));
        assert!(p.is_empty());
        assert!(!p.could_allow_host("api.github.com"));
        assert_eq!(
            p.decide_connect("a.com", 443, None).decision,
            Decision::denied(None, reason::NO_RULE)
        );
    }

    // Wildcards: apex and subdomains at a label boundary, nothing else.
    #[test]
    fn wildcard_hosts() {
        check(
            json!([{ "access": "allow", "host": "*.github.com" }, { "access": "allow", "host": "*.pypi.org", "ports": [443] }]),
            &[
                ("github.com", 443, "GET", "/", HTTPS, None, A, Some(0), reason::RULE),
                ("api.github.com", 443, "GET", "/", HTTPS, None, A, Some(0), reason::RULE),
                ("a.b.c.github.com", 443, "GET", "/", HTTPS, None, A, Some(0), reason::RULE),
                ("evilgithub.com", 443, "GET", "/", HTTPS, None, D, None, reason::NO_RULE),
                ("github.com.evil.com", 443, "GET", "/", HTTPS, None, D, None, reason::NO_RULE),
                ("evilpypi.org", 443, "GET", "/", HTTPS, None, D, None, reason::NO_RULE),
                ("files.pypi.org", 443, "GET", "/", HTTPS, None, A, Some(1), reason::RULE),
                ("files.pypi.org", 80, "GET", "/", HTTP, None, D, Some(1), reason::PORT),
            ],
        );
    }

    // First match wins: order decides between deny and allow.
    #[test]
    fn first_match_wins() {
        check(
            json!([
                { "access": "deny", "host": "api.github.com", "paths": ["/admin/**"] },
                { "access": "deny", "host": "*.github.com", "methods": ["DELETE"] },
                { "access": "allow", "host": "*.github.com" },
            ]),
            &[
                ("api.github.com", 443, "GET", "/admin/users", HTTPS, None, D, Some(0), reason::RULE),
                ("api.github.com", 443, "GET", "/admin", HTTPS, None, D, Some(0), reason::RULE),
                ("api.github.com", 443, "GET", "//admin/users", HTTPS, None, D, Some(0), reason::RULE),
                ("api.github.com", 443, "GET", "/v1/../admin/x", HTTPS, None, D, Some(0), reason::RULE),
                ("api.github.com", 443, "GET", "/%61dmin/x", HTTPS, None, D, Some(0), reason::RULE),
                ("api.github.com", 443, "GET", "/./admin/x", HTTPS, None, D, Some(0), reason::RULE),
                ("api.github.com", 443, "GET", "/administrator", HTTPS, None, A, Some(2), reason::RULE),
                // A deny rule's paths match case-insensitively (a server may fold case).
                ("api.github.com", 443, "GET", "/Admin/x", HTTPS, None, D, Some(0), reason::RULE),
                ("api.github.com", 443, "delete", "/repos/x", HTTPS, None, D, Some(1), reason::RULE),
                ("github.com", 443, "GET", "/admin/x", HTTPS, None, A, Some(2), reason::RULE),
            ],
        );
        check(
            json!([{ "access": "allow", "host": "*" }, { "access": "deny", "host": "evil.com" }]),
            &[(
                "evil.com",
                443,
                "GET",
                "/",
                HTTPS,
                None,
                A,
                Some(0),
                reason::RULE,
            )],
        );
        check(
            json!([{ "access": "deny", "host": "evil.com" }, { "access": "allow", "host": "*" }]),
            &[
                ("evil.com", 443, "GET", "/", HTTPS, None, D, Some(0), reason::RULE),
                ("EVIL.com.", 443, "GET", "/", HTTPS, None, D, Some(0), reason::RULE),
                ("good.com", 443, "GET", "/", HTTPS, None, A, Some(1), reason::RULE),
            ],
        );
    }

    // IP literals and CIDR blocks match the host literal or the connect address.
    #[test]
    fn ip_and_cidr() {
        check(
            json!([
                { "access": "deny", "host": "10.0.0.66" },
                { "access": "allow", "host": "10.0.0.0/8" },
                { "access": "allow", "host": "2001:db8::/32", "ports": [443] },
                { "access": "allow", "host": "::1" },
            ]),
            &[
                ("10.1.2.3", 80, "GET", "/", HTTP, None, A, Some(1), reason::RULE),
                ("10.0.0.66", 80, "GET", "/", HTTP, None, D, Some(0), reason::RULE),
                ("internal.corp", 80, "GET", "/", HTTP, Some("10.1.2.3"), A, Some(1), reason::RULE),
                ("internal.corp", 80, "GET", "/", HTTP, Some("::ffff:10.1.2.3"), A, Some(1), reason::RULE),
                ("internal.corp", 80, "GET", "/", HTTP, Some("10.0.0.66"), D, Some(0), reason::RULE),
                ("internal.corp", 80, "GET", "/", HTTP, Some("11.0.0.1"), D, None, reason::NO_RULE),
                ("internal.corp", 80, "GET", "/", HTTP, None, D, None, reason::NO_RULE),
                ("11.0.0.1", 80, "GET", "/", HTTP, None, D, None, reason::NO_RULE),
                ("[2001:db8::1]", 443, "GET", "/", HTTPS, None, A, Some(2), reason::RULE),
                ("2001:db8::1", 443, "GET", "/", HTTPS, None, A, Some(2), reason::RULE),
                ("2001:db8::1", 80, "GET", "/", HTTP, None, D, Some(2), reason::PORT),
                ("2001:db9::1", 443, "GET", "/", HTTPS, None, D, None, reason::NO_RULE),
                ("[::1]", 80, "GET", "/", HTTP, None, A, Some(3), reason::RULE),
                ("[0:0::1]", 80, "GET", "/", HTTP, None, A, Some(3), reason::RULE),
            ],
        );
    }

    // IDNs compare in punycode, whatever spelling the rule or the request uses.
    #[test]
    fn idn_hosts() {
        check(
            json!([{ "access": "allow", "host": "Bücher.example" }]),
            &[
                ("bücher.example", 443, "GET", "/", HTTPS, None, A, Some(0), reason::RULE),
                ("BÜCHER.EXAMPLE.", 443, "GET", "/", HTTPS, None, A, Some(0), reason::RULE),
                ("xn--bcher-kva.example", 443, "GET", "/", HTTPS, None, A, Some(0), reason::RULE),
                ("bucher.example", 443, "GET", "/", HTTPS, None, D, None, reason::NO_RULE),
            ],
        );
    }

    // Credentials only over TLS unless allowPlaintext; non-override rules are unaffected.
    #[test]
    fn plaintext_credentials() {
        check(
            json!([
                { "access": "allow", "host": "a.example.com", "override": { "headers": { "X-Key": "k" } } },
                { "access": "allow", "host": "b.example.com", "override": { "headers": { "X-Key": "k" }, "allowPlaintext": true } },
                { "access": "allow", "host": "c.example.com" },
            ]),
            &[
                ("a.example.com", 80, "GET", "/", HTTP, None, D, Some(0), reason::PLAINTEXT_CREDENTIALS),
                ("a.example.com", 443, "GET", "/", HTTPS, None, A, Some(0), reason::RULE),
                ("b.example.com", 80, "GET", "/", HTTP, None, A, Some(1), reason::RULE),
                ("c.example.com", 80, "GET", "/", HTTP, None, A, Some(2), reason::RULE),
            ],
        );
    }

    // Non-HTTP bytes (Scheme::Tcp) pass only where the first matching rule inspects nothing.
    #[test]
    fn tcp_requests() {
        check(
            json!([
                { "access": "allow", "host": "git.example.com", "ports": [22] },
                { "access": "allow", "host": "api.example.com", "methods": ["GET"] },
                { "access": "deny", "host": "x.example.com", "paths": ["/admin/**"] },
                { "access": "allow", "host": "x.example.com" },
            ]),
            &[
                ("git.example.com", 22, "", "", TCP, None, A, Some(0), reason::RULE),
                ("git.example.com", 23, "", "", TCP, None, D, Some(0), reason::PORT),
                ("api.example.com", 443, "", "", TCP, None, D, Some(1), reason::NOT_HTTP),
                ("x.example.com", 443, "", "", TCP, None, D, Some(2), reason::NOT_HTTP),
            ],
        );
    }

    // decide_connect: (host, port, ip) -> (access, rule, reason, raw_tunnel).
    #[test]
    fn connect() {
        type ConnectCase<'a> = (
            &'a str,
            u16,
            Option<&'a str>,
            Access,
            Option<usize>,
            &'static str,
            bool,
        );
        let p = policy(json!([
            { "access": "allow", "host": "github.com" },                                        // 0
            { "access": "allow", "host": "api.github.com", "methods": ["GET"] },                // 1
            { "access": "allow", "host": "api.finnhub.io", "override": { "headers": { "X-K": "k" } } }, // 2
            { "access": "deny", "host": "a.example.com", "methods": ["POST"] },                 // 3
            { "access": "allow", "host": "a.example.com" },                                     // 4
            { "access": "deny", "host": "b.example.com" },                                      // 5
            { "access": "allow", "host": "b.example.com" },                                     // 6
            { "access": "deny", "host": "c.example.com", "ports": [22] },                       // 7
            { "access": "allow", "host": "c.example.com" },                                     // 8
            { "access": "allow", "host": "d.example.com", "ports": [443] },                     // 9
            { "access": "allow", "host": "e.example.com", "paths": ["/x"] },                    // 10
            { "access": "allow", "host": "10.0.0.0/8" },                                        // 11
            { "access": "deny", "host": "f.example.com", "methods": ["GET"] },                  // 12
        ]));
        let cases: &[ConnectCase<'_>] = &[
            ("github.com", 22, None, A, Some(0), reason::RULE, true),
            ("GitHub.com.", 22, None, A, Some(0), reason::RULE, true),
            ("api.github.com", 443, None, A, Some(1), reason::RULE, false),
            ("api.finnhub.io", 443, None, A, Some(2), reason::RULE, false),
            ("a.example.com", 443, None, A, Some(4), reason::RULE, false),
            ("b.example.com", 443, None, D, Some(5), reason::RULE, false),
            ("c.example.com", 22, None, D, Some(7), reason::RULE, false),
            ("c.example.com", 443, None, A, Some(8), reason::RULE, true),
            ("d.example.com", 443, None, A, Some(9), reason::RULE, true),
            ("d.example.com", 22, None, D, Some(9), reason::PORT, false),
            ("e.example.com", 443, None, A, Some(10), reason::RULE, false),
            ("internal.corp", 5432, Some("10.0.0.5"), A, Some(11), reason::RULE, true),
            ("internal.corp", 5432, None, D, None, reason::NO_RULE, false),
            ("f.example.com", 443, None, D, None, reason::NO_RULE, false),
            ("nope.example.com", 443, None, D, None, reason::NO_RULE, false),
            ("bad host", 443, None, D, None, reason::INVALID_HOST, false),
        ];
        for &(host, port, ip, access, rule, why, raw) in cases {
            let got = p.decide_connect(host, port, ip.map(|s| s.parse().unwrap()));
            assert_eq!(
                got,
                ConnectDecision {
                    decision: Decision {
                        access,
                        rule,
                        reason: why,
                        would_deny: false,
                    },
                    raw_tunnel: raw
                },
                "{host}:{port}"
            );
        }
    }

    // exempts_address: only an allow rule naming the address, on that port, for that request.
    #[test]
    fn exempts_address() {
        let p = policy(json!([
            { "access": "allow", "host": "*" },
            { "access": "allow", "host": "10.0.0.0/8" },
            { "access": "deny", "host": "169.254.169.254" },
            { "access": "allow", "host": "fd00::/8" },
        ]));
        let cases: &[(&str, bool)] = &[
            ("10.1.1.1", true),
            ("::ffff:10.1.1.1", true),
            ("169.254.169.254", false),
            ("fd12::1", true),
            ("192.168.1.1", false),
            ("127.0.0.1", false),
            ("::1", false),
        ];
        for &(ip, want) in cases {
            let get = Request { host: "x.example", port: 80, method: "GET", path: "/", scheme: HTTP, ip: None };
            assert_eq!(p.exempts_address(ip.parse().unwrap(), 80, None), want, "{ip}");
            assert_eq!(p.exempts_address(ip.parse().unwrap(), 80, Some(&get)), want, "{ip}");
        }
        assert!(!policy(json!([{ "access": "allow", "host": "*" }]))
            .exempts_address("127.0.0.1".parse().unwrap(), 80, None));
    }

    // SSRF through the address exemption: a rule that names loopback for another access, another
    // port, another method or another path does not open the rest of the host's loopback.
    #[test]
    fn ssrf_through_the_address_exemption() {
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        let req = |method, path| Request { host: "x.attacker.example", port: 8080, method, path, scheme: HTTP, ip: None };
        type Case<'a> = (Value, u16, Option<(&'a str, &'a str)>, bool);
        let cases: &[Case<'_>] = &[
            (json!([{ "access": "deny", "host": "127.0.0.0/8", "ports": [22] }, { "access": "allow", "host": "*.attacker.example" }]), 8080, None, false),
            (json!([{ "access": "deny", "host": "127.0.0.0/8", "ports": [22] }, { "access": "allow", "host": "*.attacker.example" }]), 8080, Some(("GET", "/")), false),
            (json!([{ "access": "allow", "host": "127.0.0.1", "ports": [9] }, { "access": "allow", "host": "*" }]), 8080, Some(("GET", "/")), false),
            (json!([{ "access": "allow", "host": "127.0.0.1", "ports": [9] }]), 9, Some(("GET", "/")), true),
            (json!([{ "access": "allow", "host": "127.0.0.1", "ports": [9] }]), 9, None, true),
            (json!([{ "access": "allow", "host": "127.0.0.0/8", "methods": ["GET"] }]), 8080, Some(("POST", "/")), false),
            (json!([{ "access": "allow", "host": "127.0.0.0/8", "methods": ["GET"] }]), 8080, Some(("GET", "/")), true),
            (json!([{ "access": "allow", "host": "127.0.0.0/8", "paths": ["/ok/**"] }]), 8080, Some(("GET", "/admin")), false),
            (json!([{ "access": "allow", "host": "127.0.0.0/8", "paths": ["/ok/**"] }]), 8080, Some(("GET", "/ok/x")), true),
            (json!([{ "access": "deny", "host": "127.0.0.1" }, { "access": "allow", "host": "127.0.0.0/8" }]), 8080, None, false),
            (json!([{ "access": "deny", "host": "127.0.0.1", "methods": ["POST"] }, { "access": "allow", "host": "127.0.0.0/8" }]), 8080, None, true),
        ];
        for (rules, port, request, want) in cases {
            let p = policy(rules.clone());
            let request = request.map(|(m, path)| req(m, path));
            assert_eq!(p.exempts_address(lo, *port, request.as_ref()), *want, "{rules} {port} {request:?}");
        }
    }

    // Decide on what is forwarded: the path as any common server reads it.
    #[test]
    fn path_interpretation() {
        check(
            json!([{ "access": "allow", "host": "a.example", "methods": ["GET"], "paths": ["/v1/**"] }]),
            &[
                ("a.example", 443, "GET", "/v1/x", HTTPS, None, A, Some(0), reason::RULE),
                ("a.example", 443, "GET", "/v1/x;jsessionid=1", HTTPS, None, A, Some(0), reason::RULE),
                ("a.example", 443, "GET", "/v1/..;/admin/x", HTTPS, None, D, Some(0), reason::PATH_AMBIGUOUS),
                ("a.example", 443, "GET", "/v1/..%2fadmin/x", HTTPS, None, D, Some(0), reason::PATH_AMBIGUOUS),
                ("a.example", 443, "GET", "/v1/..%2Fadmin/x", HTTPS, None, D, Some(0), reason::PATH_AMBIGUOUS),
                ("a.example", 443, "GET", "/v1/..\\admin\\x", HTTPS, None, D, Some(0), reason::PATH_AMBIGUOUS),
                ("a.example", 443, "GET", "/v1/..%5cadmin/x", HTTPS, None, D, Some(0), reason::PATH_AMBIGUOUS),
                ("a.example", 443, "GET", "/v1/..%252fadmin/x", HTTPS, None, D, Some(0), reason::PATH_AMBIGUOUS),
                ("a.example", 443, "GET", "/admin/x", HTTPS, None, D, Some(0), reason::PATH),
            ],
        );
        check(
            json!([{ "access": "deny", "host": "a.example", "paths": ["/admin/**"] }, { "access": "allow", "host": "a.example" }]),
            &[
                ("a.example", 443, "GET", "/admin;x/s", HTTPS, None, D, Some(0), reason::RULE),
                ("a.example", 443, "GET", "/admin%2fs", HTTPS, None, D, Some(0), reason::RULE),
                ("a.example", 443, "GET", "/admin%5Cs", HTTPS, None, D, Some(0), reason::RULE),
                ("a.example", 443, "GET", "/admin%252fs", HTTPS, None, D, Some(0), reason::RULE),
                ("a.example", 443, "GET", "/%2561dmin/s", HTTPS, None, D, Some(0), reason::RULE),
                ("a.example", 443, "GET", "/ADMIN/s", HTTPS, None, D, Some(0), reason::RULE),
                ("a.example", 443, "GET", "/Admin;x%2F..%2Fy/s", HTTPS, None, D, Some(0), reason::RULE),
                ("a.example", 443, "GET", "/x/..;/admin/s", HTTPS, None, D, Some(0), reason::RULE),
                ("a.example", 443, "GET", "/administrator", HTTPS, None, A, Some(1), reason::RULE),
                ("a.example", 443, "GET", "/x/admin/s", HTTPS, None, A, Some(1), reason::RULE),
            ],
        );
        // An ambiguous path that a later rule allows as a whole is allowed by that rule.
        check(
            json!([{ "access": "allow", "host": "a.example", "paths": ["/v1/**"] }, { "access": "allow", "host": "a.example", "paths": ["/**"] }]),
            &[("a.example", 443, "GET", "/v1/..;/admin/x", HTTPS, None, A, Some(1), reason::RULE)],
        );
        // Upper-case globs in deny rules fold too.
        check(
            json!([{ "access": "deny", "host": "a.example", "paths": ["/Admin/**"] }, { "access": "allow", "host": "a.example" }]),
            &[("a.example", 443, "GET", "/aDMIN/s", HTTPS, None, D, Some(0), reason::RULE)],
        );
    }

    // TRACE with a credential: refused on override rules, allowed elsewhere.
    #[test]
    fn trace_with_a_credential() {
        check(
            json!([
                { "access": "allow", "host": "a.example", "override": { "headers": { "X-Key": "k" } } },
                { "access": "allow", "host": "b.example" },
            ]),
            &[
                ("a.example", 443, "TRACE", "/", HTTPS, None, D, Some(0), reason::TRACE_WITH_CREDENTIALS),
                ("a.example", 443, "track", "/", HTTPS, None, D, Some(0), reason::TRACE_WITH_CREDENTIALS),
                ("a.example", 443, "GET", "/", HTTPS, None, A, Some(0), reason::RULE),
                ("b.example", 443, "TRACE", "/", HTTPS, None, A, Some(1), reason::RULE),
            ],
        );
    }

    // could_allow_host: (rules, host, expected).
    #[test]
    fn could_allow_host() {
        let cases: &[(Value, &str, bool)] = &[
            (json!([{ "access": "allow", "host": "*.github.com" }]), "api.github.com", true),
            (json!([{ "access": "allow", "host": "*.github.com" }]), "API.GitHub.com.", true),
            (json!([{ "access": "allow", "host": "*.github.com" }]), "evilgithub.com", false),
            (json!([{ "access": "allow", "host": "a.com", "ports": [22], "methods": ["GET"] }]), "a.com", true),
            (json!([{ "access": "deny", "host": "evil.com" }, { "access": "allow", "host": "*" }]), "evil.com", false),
            (json!([{ "access": "deny", "host": "evil.com" }, { "access": "allow", "host": "*" }]), "good.com", true),
            (json!([{ "access": "deny", "host": "*.evil.com" }, { "access": "allow", "host": "*" }]), "x.evil.com", false),
            (json!([{ "access": "deny", "host": "evil.com", "methods": ["POST"] }, { "access": "allow", "host": "*" }]), "evil.com", true),
            (json!([{ "access": "deny", "host": "evil.com", "ports": [443] }, { "access": "allow", "host": "*" }]), "evil.com", true),
            (json!([{ "access": "allow", "host": "*" }, { "access": "deny", "host": "evil.com" }]), "evil.com", true),
            (json!([{ "access": "allow", "host": "10.0.0.0/8" }]), "internal.corp", true),
            (json!([{ "access": "allow", "host": "10.0.0.0/8" }]), "10.0.0.1", true),
            (json!([{ "access": "allow", "host": "10.0.0.0/8" }]), "11.0.0.1", false),
            (json!([{ "access": "deny", "host": "a.com" }]), "a.com", false),
            (json!([{ "access": "allow", "host": "a.com" }]), "b.com", false),
            (json!([{ "access": "allow", "host": "*" }]), "bad host", false),
        ];
        for (rules, host, want) in cases {
            // Names resolve through host-name rules only (no DNS exfiltration: docs/network-access.md#dns-and-transparent-capture).
            let name_rule = !(rules.to_string().contains("10.0.0.0/8"));
            let p = policy(rules.clone());
            assert_eq!(
                p.could_resolve_name(host),
                *want && (name_rule || host.parse::<std::net::IpAddr>().is_ok()),
                "could_resolve_name {rules} {host}"
            );
        }
        for (egress, host, want) in cases {
            assert_eq!(
                policy(egress.clone()).could_allow_host(host),
                *want,
                "{egress} {host}"
            );
        }
    }

    // The index must give exactly what a linear first-match scan gives.
    #[test]
    fn index_agrees_with_linear_scan() {
        let hosts = [
            "a.com",
            "b.a.com",
            "c.b.a.com",
            "x.org",
            "a.x.org",
            "10.0.0.1",
            "10.9.9.9",
            "ab.com",
            "2001:db8::1",
            "::1",
        ];
        let patterns = [
            "a.com",
            "*.a.com",
            "b.a.com",
            "*.x.org",
            "x.org",
            "*",
            "10.0.0.0/8",
            "10.0.0.1",
            "*.b.a.com",
            "2001:db8::/32",
            "::1",
            "10.0.0.0/31",
            "0.0.0.0/0",
        ];
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        for _ in 0..200 {
            let rules: Vec<Value> = (0..next(12))
                .map(|_| {
                    let access = ["allow", "deny"][next(2)];
                    let mut r = json!({ "access": access, "host": patterns[next(patterns.len())] });
                    if next(3) == 0 {
                        r["ports"] = json!(vec![[80, 443][next(2)]]);
                    }
                    if next(3) == 0 {
                        r["methods"] = json!(vec![["GET", "POST"][next(2)]]);
                    }
                    if next(3) == 0 {
                        r["paths"] = json!(vec![["/v1/**", "/admin/*"][next(2)]]);
                    }
                    r
                })
                .collect();
            let p = policy(Value::Array(rules));
            for host in hosts {
                for (port, method, path) in [
                    (80, "GET", "/v1/x"),
                    (443, "POST", "/admin/y"),
                    (443, "GET", "/"),
                ] {
                    let ip = [
                        None,
                        Some("10.0.0.1"),
                        Some("::ffff:10.0.0.7"),
                        Some("2001:db8::9"),
                    ][next(4)]
                    .map(|s| s.parse().unwrap());
                    let want = p.rules.iter().position(|r| {
                        r.host.matches(host, ip)
                            && port_matches(r, port)
                            && method_matches(r, method)
                            && r.paths
                                .as_ref()
                                .is_none_or(|g| g.iter().any(|g| g.matches(path)))
                    });
                    let got = p.decide(&Request {
                        host,
                        port,
                        method,
                        path,
                        scheme: HTTPS,
                        ip,
                    });
                    // A near miss (`method`, `path`, `port`) names the closest rule without it deciding.
                    let decided = got.rule.filter(|_| !matches!(got.reason, reason::METHOD | reason::PATH | reason::PORT));
                    assert_eq!(decided, want, "{host} {port} {method} {path} {ip:?}");
                }
            }
        }
    }
}
