//! Decisions that explain themselves and report mode (docs/network-access.md#what-a-denial-looks-like,
//! docs/network-access.md#report-mode).
//!
//! 1. A request no rule matched is denied `no-rule` only when no allow rule names its host;
//!    otherwise the reason is the condition the closest allow rule failed (`port`, `method` or
//!    `path`), and `rule` is that rule. Closest: the rule that got furthest through the checks
//!    (port, then method, then path); among equals the first in rule order.
//! 2. [`Policy::apply_mode`] turns a policy denial into an allowed decision marked `would_deny`
//!    when the deciding rule (or, without one or without its own `mode`, the sandbox) is in
//!    report mode. Only the reasons in [`RELAXABLE`] are policy decisions; every other denial is a
//!    built-in guard and holds in report mode too.
//!
//! # Security
//! Report mode relaxes policy decisions, never the guards: private addresses (SSRF), proxy loops,
//! host mismatches (domain fronting), invalid hosts, non-HTTP bytes under a rule that inspects
//! HTTP, uninspectable upgrades and the credential guards (`plaintext-credentials`,
//! `trace-with-credentials`) are refused in either mode. Override headers are only set on an
//! allowed decision that is not `would_deny`, under a rule not itself in report mode
//! ([`Policy::may_inject`]).

use std::net::IpAddr;

use super::{method_matches, port_matches, reason, Access, Decision, Policy, Request, NONE};
use crate::config::{Mode, RuleAccess};

/// The denial reasons report mode lets through: those a rule (or the lack of one) decided.
pub const RELAXABLE: &[&str] = &[
    reason::RULE,
    reason::NO_RULE,
    reason::METHOD,
    reason::PATH,
    reason::PORT,
    reason::PATH_AMBIGUOUS,
    reason::METHOD_OVERRIDE,
];

impl Policy {
    /// The denial of a request no rule matched (step 1 of the module doc).
    pub(super) fn nearest_miss(
        &self,
        host: &str,
        request: &Request<'_>,
        ips: [Option<IpAddr>; 2],
    ) -> Decision {
        // (how far the rule got: 0 port failed, 1 method failed, 2 path failed; rule index)
        let mut best: Option<(u8, usize)> = None;
        self.index.for_each_bucket(host, ips, |bucket| {
            for &i in bucket {
                let rule = &self.rules[i];
                if rule.access != RuleAccess::Allow {
                    continue;
                }
                let depth = if !port_matches(rule, request.port) {
                    0
                } else if !method_matches(rule, request.method) {
                    1
                } else {
                    2
                };
                if best.is_none_or(|(d, j)| depth > d || (depth == d && i < j)) {
                    best = Some((depth, i));
                }
            }
        });
        match best {
            None => Decision::denied(None, reason::NO_RULE),
            Some((0, i)) => Decision::denied(Some(i), reason::PORT),
            Some((1, i)) => Decision::denied(Some(i), reason::METHOD),
            Some((_, i)) => Decision::denied(Some(i), reason::PATH),
        }
    }

    /// The denial of a tunnel no rule matched: `port` with the first allow rule naming the host
    /// on another port, else `no-rule`.
    pub(super) fn nearest_port_miss(&self, host: &str, ip: Option<IpAddr>) -> Decision {
        let mut first = NONE;
        self.index
            .for_each_bucket(host, super::addresses(host, ip), |bucket| {
                if let Some(&i) = bucket
                    .iter()
                    .find(|&&i| self.rules[i].access == RuleAccess::Allow)
                {
                    first = first.min(i);
                }
            });
        if first == NONE {
            Decision::denied(None, reason::NO_RULE)
        } else {
            Decision::denied(Some(first), reason::PORT)
        }
    }

    /// The mode a decision by `rule` is in: the rule's own `mode`, else the sandbox's.
    pub fn mode_of(&self, rule: Option<usize>) -> Mode {
        rule.and_then(|i| self.rules.get(i))
            .and_then(|r| r.mode)
            .unwrap_or(self.mode)
    }

    /// The sandbox's mode.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// `decision` as enforced: a policy denial (one of [`RELAXABLE`]) in report mode becomes an
    /// allowed decision with `would_deny` set, same rule and reason.
    pub fn apply_mode(&self, decision: Decision) -> Decision {
        if decision.access == Access::Denied
            && RELAXABLE.contains(&decision.reason)
            && self.mode_of(decision.rule) == Mode::Report
        {
            return Decision {
                access: Access::Allowed,
                would_deny: true,
                ..decision
            };
        }
        decision
    }

    /// Whether override headers may be set on a request under `decision`: allowed by a rule,
    /// not only by report mode, and that rule not itself in report mode.
    pub fn may_inject(&self, decision: &Decision) -> bool {
        decision.access == Access::Allowed
            && !decision.would_deny
            && decision
                .rule
                .and_then(|i| self.rules.get(i))
                .is_some_and(|r| r.access == RuleAccess::Allow && r.mode != Some(Mode::Report))
    }
}

#[cfg(test)]
#[rustfmt::skip]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::policy::Scheme;
    use serde_json::{json, Value};

    fn policy(config: Value) -> Policy {
        Policy::compile(&Config::from_json(&config).unwrap())
    }

    fn get<'a>(host: &'a str, port: u16, method: &'a str, path: &'a str) -> Request<'a> {
        Request { host, port, method, path, scheme: Scheme::Https, ip: None }
    }

    // Which condition failed: (request, rule, reason).
    #[test]
    fn denials_name_the_condition_the_closest_rule_failed() {
        let p = policy(json!({ "egress": [
            { "access": "allow", "host": "a.example", "ports": [8443] },                         // 0
            { "access": "allow", "host": "a.example", "methods": ["GET", "POST"] },               // 1
            { "access": "allow", "host": "b.example", "methods": ["GET"], "paths": ["/v1/**"] }, // 2
            { "access": "deny", "host": "c.example", "methods": ["POST"] },                      // 3
            { "access": "allow", "host": "d.example", "ports": [22] },                           // 4
        ]}));
        let cases: &[(Request<'_>, Option<usize>, &str)] = &[
            (get("a.example", 443, "DELETE", "/"), Some(1), reason::METHOD),
            (get("a.example", 443, "GET", "/"), Some(1), reason::RULE),
            (get("b.example", 443, "GET", "/v2/x"), Some(2), reason::PATH),
            (get("b.example", 443, "PUT", "/v1/x"), Some(2), reason::METHOD),
            (get("d.example", 443, "GET", "/"), Some(4), reason::PORT),
            (get("c.example", 443, "GET", "/"), None, reason::NO_RULE),
            (get("z.example", 443, "GET", "/"), None, reason::NO_RULE),
        ];
        for (request, rule, why) in cases {
            let d = p.decide(request);
            assert_eq!((d.rule, d.reason), (*rule, *why), "{request:?}");
        }
        let c = p.decide_connect("d.example", 443, None).decision;
        assert_eq!((c.access, c.rule, c.reason), (Access::Denied, Some(4), reason::PORT));
        let c = p.decide_connect("z.example", 443, None).decision;
        assert_eq!((c.rule, c.reason), (None, reason::NO_RULE));
    }

    // Report mode: (config, request, access, would_deny, may inject).
    #[test]
    fn report_mode_relaxes_policy_denials_only() {
        let over = json!({ "headers": { "X-Key": "k" } });
        let cases: &[(Value, Request<'_>, Access, bool, bool)] = &[
            // The sandbox in report mode: denials pass, marked.
            (json!({ "mode": "report", "egress": [] }), get("a.example", 443, "GET", "/"), Access::Allowed, true, false),
            (json!({ "mode": "report", "egress": [{ "access": "allow", "host": "a.example", "methods": ["GET"], "override": over }] }),
                get("a.example", 443, "DELETE", "/"), Access::Allowed, true, false),
            // A real allow in a report sandbox still injects.
            (json!({ "mode": "report", "egress": [{ "access": "allow", "host": "a.example", "override": over }] }),
                get("a.example", 443, "GET", "/"), Access::Allowed, false, true),
            // An enforcing rule in a report sandbox holds.
            (json!({ "mode": "report", "egress": [{ "access": "deny", "host": "a.example", "mode": "enforce" }] }),
                get("a.example", 443, "GET", "/"), Access::Denied, false, false),
            // A rule in report mode in an enforcing sandbox: its denials pass, its allows never inject.
            (json!({ "egress": [{ "access": "deny", "host": "a.example", "mode": "report" }] }),
                get("a.example", 443, "GET", "/"), Access::Allowed, true, false),
            (json!({ "egress": [{ "access": "allow", "host": "a.example", "mode": "report", "override": over }] }),
                get("a.example", 443, "GET", "/"), Access::Allowed, false, false),
            (json!({ "egress": [{ "access": "allow", "host": "a.example", "mode": "report", "methods": ["GET"] }] }),
                get("a.example", 443, "POST", "/"), Access::Allowed, true, false),
            // Enforce: unchanged.
            (json!({ "egress": [] }), get("a.example", 443, "GET", "/"), Access::Denied, false, false),
            // Guards hold in report mode.
            (json!({ "mode": "report", "egress": [{ "access": "allow", "host": "a.example", "override": over }] }),
                get("a.example", 443, "TRACE", "/"), Access::Denied, false, false),
            (json!({ "mode": "report", "egress": [] }), get("bad host", 443, "GET", "/"), Access::Denied, false, false),
        ];
        for (config, request, access, would_deny, inject) in cases {
            let p = policy(config.clone());
            let d = p.apply_mode(p.decide(request));
            assert_eq!((d.access, d.would_deny, p.may_inject(&d)), (*access, *would_deny, *inject), "{config} {request:?}");
        }
        let denied = Decision::denied(None, reason::PRIVATE_ADDRESS);
        assert_eq!(policy(json!({ "mode": "report" })).apply_mode(denied), denied);
    }

    // Report mode lets the DNS responder answer names no rule allows (the proxy records them).
    #[test]
    fn report_mode_resolves_unmatched_names_but_not_enforced_denials() {
        let p = policy(json!({ "mode": "report", "egress": [{ "access": "deny", "host": "evil.example", "mode": "enforce" }] }));
        assert!(p.could_resolve_name("any.example"));
        assert!(!p.could_resolve_name("evil.example"));
        assert!(!policy(json!({ "egress": [] })).could_resolve_name("any.example"));
    }
}
