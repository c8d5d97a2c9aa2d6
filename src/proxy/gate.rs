//! The decision pipeline every request and tunnel goes through (docs/network-access.md):
//!
//! 1. Policy first: `decide` (or `decide_connect`) with the address when it is already known (an IP
//!    literal, an `upstream.resolve` entry, or — only when some rule is an IP/CIDR rule
//!    ([`Policy::uses_addresses`](crate::policy::Policy::uses_addresses)) *and* a host-name rule
//!    could allow the name ([`Policy::could_resolve_name`](crate::policy::Policy::could_resolve_name),
//!    the test the in-sandbox DNS responder uses) — a DNS answer, of which only the address
//!    decided on is kept). A name no host-name rule could allow is decided without resolving it.
//!    Every method a method-override header or `_method` parameter names is decided too.
//! 2. Resolution: `upstream.resolve` overrides; else the literal; else DNS (cached briefly).
//! 3. Proxy-loop guard: an address equal to one of the listeners of any engine in this process is
//!    refused (nothing is added to the forwarded request to detect loops).
//! 4. Private-address guard: resolved addresses that are private or special are dropped unless an
//!    allow rule naming them would itself allow this request on this port
//!    ([`Policy::exempts_address`](crate::policy::Policy::exempts_address)) or `upstream.resolve`
//!    mapped the name; none left is a `private-address` denial.
//! 5. The surviving addresses are pinned for the upstream connector.
//!
//! # Security
//! Step 1 keeps attacker-chosen names (`<secret>.attacker.example`) off the host's resolver (DNS
//! exfiltration) when only IP/CIDR rules could match them. Step 4 stops a public name that
//! resolves inside (SSRF, DNS rebinding); pinning stops a second resolution from changing the
//! answer between the check and the connect.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use crate::policy::{reason, Access, Compiled, Decision, Policy, Request};

use super::deny::UpstreamFailure;
use super::upstream::UpstreamClient;
use super::Engine;

/// Reason of a refusal because the upstream client could not be built.
pub const UPSTREAM_UNAVAILABLE: &str = "upstream-unavailable";

/// What is being decided.
#[derive(Debug, Clone, Copy)]
pub enum Ask<'a> {
    /// One HTTP request, and the methods its method-override headers or `_method` parameter name.
    Request(Request<'a>, &'a [String]),
    /// A tunnel to host:port (CONNECT, transparent).
    Connect,
}

/// The outcome of [`check`].
pub enum Outcome {
    /// Refused; the decision carries the reason.
    Denied(Decision),
    /// The policy allowed it but the name could not be resolved or the client not be built.
    Unreachable(Decision, UpstreamFailure),
    /// Allowed: connect to `addrs` (already pinned in `client`).
    Allowed {
        decision: Decision,
        /// For [`Ask::Connect`]: whether non-HTTP bytes may pass.
        raw_tunnel: bool,
        addrs: Arc<[SocketAddr]>,
        client: Arc<UpstreamClient>,
    },
}

/// A denial with a fixed reason and no deciding rule.
pub const fn denied(reason: &'static str) -> Decision {
    Decision::denied(None, reason)
}

/// Runs the pipeline for `host` (normalized) and `port` against `compiled`.
pub async fn check(
    engine: &Engine,
    compiled: &Compiled,
    host: &str,
    port: u16,
    ask: Ask<'_>,
) -> Outcome {
    check_from(engine, compiled, host, port, ask, None).await
}

/// [`check`] for a request from a known process (told to the `onUnmatched` callback).
///
/// A tunnel no rule matches is, with an `onUnmatched` handler, `Allowed` with no addresses and
/// no raw tunnel: nothing is resolved, and each request inside is asked about ([`super::ask`]).
pub async fn check_from(
    engine: &Engine,
    compiled: &Compiled,
    host: &str,
    port: u16,
    ask: Ask<'_>,
    origin: Option<Arc<crate::attribution::Origin>>,
) -> Outcome {
    let policy = &compiled.policy;
    let client = match engine.upstream.get(&compiled.config) {
        Ok(client) => client,
        // Only reachable if validated `upstream.ca` roots stopped parsing; refuse, never crash.
        Err(_) => return Outcome::Denied(denied(UPSTREAM_UNAVAILABLE)),
    };
    let literal: Option<IpAddr> = host.parse().ok();
    let mapped: Option<SocketAddr> = compiled
        .config
        .upstream
        .resolve
        .get(&(host.to_string(), port))
        .copied();

    // 1. Decide, resolving first only when an IP/CIDR rule needs the address.
    let mut resolved: Option<Arc<[SocketAddr]>> = None;
    let mut ip = literal.or(mapped.map(|a| a.ip()));
    if ip.is_none() && policy.uses_addresses() && policy.could_resolve_name(host) {
        if let Ok(addrs) = client.resolve(engine.resolver.as_ref(), host, port).await {
            // The decision holds for the address it saw: connect to that one only.
            if let Some(first) = addrs.first().copied() {
                ip = Some(first.ip());
                resolved = Some(Arc::from([first]));
            }
        }
    }
    let (decision, raw_tunnel) = match ask {
        Ask::Request(request, overrides) => {
            let request = Request { ip, ..request };
            (decide_with_overrides(policy, &request, overrides), false)
        }
        Ask::Connect => {
            let c = policy.decide_connect(host, port, ip);
            (c.decision, c.raw_tunnel)
        }
    };
    // Report mode (docs/network-access.md#report-mode): a policy denial goes on, marked; a raw
    // tunnel only where no rule that inspects HTTP decided.
    let mut decision = policy.apply_mode(decision);
    let raw_tunnel = match decision.would_deny {
        true => decision.rule.is_none_or(|i| !policy.inspects_http(i)),
        false => raw_tunnel,
    };
    if decision.access == Access::Denied && decision.reason == reason::NO_RULE {
        if let Some(unmatched) = engine.unmatched.load_full() {
            match ask {
                Ask::Connect => {
                    return Outcome::Allowed {
                        decision: Decision {
                            access: Access::Allowed,
                            ..decision
                        },
                        raw_tunnel: false,
                        addrs: Arc::from([]),
                        client,
                    }
                }
                Ask::Request(request, _) => {
                    decision = unmatched
                        .decide(super::ask::UnmatchedRequest {
                            host: host.to_owned(),
                            port,
                            method: request.method.to_owned(),
                            path: super::audit::strip_query(request.path).to_owned(),
                            scheme: request.scheme,
                            origin,
                        })
                        .await;
                }
            }
        }
    }
    if decision.access == Access::Denied {
        return Outcome::Denied(decision);
    }

    // 2. Resolve.
    let addrs: Arc<[SocketAddr]> = if let Some(m) = mapped {
        Arc::from([m])
    } else if let Some(l) = literal {
        Arc::from([SocketAddr::new(l, port)])
    } else if let Some(r) = resolved {
        r
    } else {
        match client.resolve(engine.resolver.as_ref(), host, port).await {
            Ok(r) => r,
            Err(_) => return Outcome::Unreachable(decision, UpstreamFailure::Resolve),
        }
    };

    // 3. Proxy loop (listeners are bound to loopback or sandbox-local addresses, all special:
    //    skip the lookup for public targets).
    if addrs.iter().any(|a| is_special(a.ip())) {
        let own = super::listener::process_listener_addrs();
        if addrs.iter().any(|a| is_own_listener(a, &own)) {
            return Outcome::Denied(denied(reason::PROXY_LOOP));
        }
    }

    // 4. Private and special addresses.
    let addrs: Arc<[SocketAddr]> = if mapped.is_some() {
        addrs
    } else {
        let request = match ask {
            Ask::Request(request, _) => Some(request),
            Ask::Connect => None,
        };
        let kept: Vec<SocketAddr> = addrs
            .iter()
            .copied()
            .filter(|a| {
                !is_special(a.ip()) || policy.exempts_address(a.ip(), port, request.as_ref())
            })
            .collect();
        if kept.is_empty() {
            return Outcome::Denied(denied(reason::PRIVATE_ADDRESS));
        }
        kept.into()
    };

    // 5. Pin.
    client.pin(host, port, addrs.clone());
    Outcome::Allowed {
        decision,
        raw_tunnel,
        addrs,
        client,
    }
}

/// Decides `request`, then (when allowed) every method in `overrides` in its place: one denied
/// method denies the request as `method-override`, naming the rule that denied it.
///
/// # Security
/// A server honouring `X-HTTP-Method-Override: DELETE` runs a DELETE whatever the request line
/// says, so a rule restricting methods must hold for that method too.
fn decide_with_overrides(policy: &Policy, request: &Request<'_>, overrides: &[String]) -> Decision {
    let decision = policy.decide(request);
    if decision.access == Access::Denied {
        return decision;
    }
    for method in overrides {
        let other = policy.decide(&Request { method, ..*request });
        if other.access == Access::Denied {
            return Decision::denied(other.rule.or(decision.rule), reason::METHOD_OVERRIDE);
        }
    }
    decision
}

/// Whether `addr` is one of `own` (a listener on an unspecified address covers every loopback
/// address on its port).
fn is_own_listener(addr: &SocketAddr, own: &[SocketAddr]) -> bool {
    own.iter().any(|l| {
        l == addr
            || (l.port() == addr.port()
                && (l.ip().is_unspecified() || addr.ip().is_unspecified())
                && (addr.ip().is_loopback() || addr.ip().is_unspecified()))
    })
}

/// Whether `ip` is private or special-purpose: loopback, RFC 1918, link-local (incl.
/// 169.254.169.254), CGNAT 100.64/10, ULA fc00::/7, multicast, unspecified, broadcast, reserved,
/// and the IPv4-mapped / NAT64 forms of those.
pub fn is_special(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_special_v4(v4),
        IpAddr::V6(v6) => is_special_v6(v6),
    }
}

fn is_special_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_multicast()
        || ip.is_broadcast()
        || a == 0 // "this network", incl. 0.0.0.0
        || (a == 100 && (b & 0xc0) == 64) // CGNAT 100.64.0.0/10
        || (a == 192 && b == 0 && c == 0) // IETF protocol assignments 192.0.0.0/24
        || (a == 198 && (b & 0xfe) == 18) // benchmarking 198.18.0.0/15
        || a >= 240 // reserved 240.0.0.0/4
}

fn is_special_v6(ip: Ipv6Addr) -> bool {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return is_special_v4(v4);
    }
    let s = ip.segments();
    // NAT64 well-known prefix 64:ff9b::/96 carries an IPv4 address.
    if s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0, 0, 0, 0] {
        let v4 = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
        return is_special_v4(v4);
    }
    ip.is_loopback()
        || ip.is_unspecified()
        || ip.is_multicast()
        || (s[0] & 0xfe00) == 0xfc00 // ULA fc00::/7
        || (s[0] & 0xffc0) == 0xfe80 // link-local fe80::/10
        || (s[0] & 0xffc0) == 0xfec0 // site-local fec0::/10 (deprecated)
        || (s[0..6] == [0, 0, 0, 0, 0, 0]) // IPv4-compatible ::a.b.c.d (deprecated)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_special_cases() {
        let cases = [
            // loopback
            ("127.0.0.1", true),
            ("127.255.0.9", true),
            ("::1", true),
            // RFC 1918
            ("10.1.2.3", true),
            ("172.16.0.1", true),
            ("172.31.255.255", true),
            ("172.32.0.1", false),
            ("192.168.1.1", true),
            // link-local, cloud metadata
            ("169.254.169.254", true),
            ("fe80::1", true),
            // CGNAT
            ("100.64.0.1", true),
            ("100.127.255.255", true),
            ("100.128.0.1", false),
            // ULA
            ("fc00::1", true),
            ("fd12:3456::1", true),
            // multicast, unspecified, broadcast, reserved
            ("224.0.0.1", true),
            ("ff02::1", true),
            ("0.0.0.0", true),
            ("::", true),
            ("255.255.255.255", true),
            ("240.0.0.1", true),
            // mapped forms
            ("::ffff:127.0.0.1", true),
            ("::ffff:10.0.0.1", true),
            ("::ffff:8.8.8.8", false),
            ("64:ff9b::a9fe:a9fe", true),
            ("64:ff9b::808:808", false),
            // public
            ("8.8.8.8", false),
            ("140.82.112.3", false),
            ("2606:4700::1111", false),
        ];
        for (ip, want) in cases {
            let parsed: IpAddr = ip.parse().expect(ip);
            assert_eq!(is_special(parsed), want, "{ip}");
        }
    }

    #[test]
    fn own_listener_cases() {
        let own: Vec<SocketAddr> = vec![
            "127.0.0.1:3128".parse().unwrap(),
            "0.0.0.0:8080".parse().unwrap(),
        ];
        let cases = [
            ("127.0.0.1:3128", true),
            ("127.0.0.1:3129", false),
            ("127.0.0.2:8080", true),
            ("0.0.0.0:3128", true),
            ("0.0.0.0:8080", true),
            ("10.0.0.1:8080", false),
        ];
        for (addr, want) in cases {
            assert_eq!(
                is_own_listener(&addr.parse().unwrap(), &own),
                want,
                "{addr}"
            );
        }
    }
}
