//! Asking the host program about requests no rule matches (`onUnmatched`,
//! docs/network-access.md#asking-about-unmatched-requests).
//!
//! 1. A request the policy denies with `no-rule` (after report mode, which lets it through without
//!    asking) is held while [`Unmatched::decide`] asks; a tunnel (`CONNECT`, transparent) to such a
//!    host is opened without asking and without resolving the name, so that each request inside
//!    is asked about with its real method and path.
//! 2. The answer is awaited on the request's own task for at most the bound (default
//!    [`DEFAULT_TIMEOUT`]); no answer in time, an error, or an answer that is not one of the
//!    accepted shapes ([`parse_answer`]) is a denial. Requests waiting do not hold up others.
//! 3. `remember: "sandbox"` appends a rule `{ access, host, ports: [port] }` through the sandbox
//!    (visible in `getConfig()`, recorded by `config.applied`) before the request goes on.
//!
//! Every decision made here is recorded with `reason: "callback"` and no rule.
//!
//! # Security
//! The answer only replaces the `no-rule` denial: the built-in guards (private addresses, proxy
//! loops) still run after an allow, and no override headers are set (no rule allowed it).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use crate::attribution::Origin;
use crate::policy::{reason, Access, Decision, Scheme};

/// How long a request waits for the answer when the bound is not given.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest bound accepted (a held request also holds a connection slot).
pub const MAX_TIMEOUT: Duration = Duration::from_secs(600);

/// What the callback is told about a request.
#[derive(Debug, Clone)]
pub struct UnmatchedRequest {
    pub host: String,
    pub port: u16,
    pub method: String,
    /// Without the query string.
    pub path: String,
    pub scheme: Scheme,
    pub origin: Option<Arc<Origin>>,
}

/// Whether an answer also holds for later requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Remember {
    /// This request only.
    Once,
    /// A rule is appended to the sandbox's config.
    Sandbox,
}

/// A valid answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answer {
    pub access: Access,
    pub remember: Remember,
}

/// A boxed future, as the callback returns it.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;
/// Asks the host program; `None` when it threw or answered something invalid.
pub type AskFn = Arc<dyn Fn(UnmatchedRequest) -> BoxFuture<Option<Answer>> + Send + Sync>;
/// Appends a rule for host:port (the sandbox does it; resolves once it is in force).
pub type RememberFn = Arc<dyn Fn(String, u16, Access) -> BoxFuture<()> + Send + Sync>;

/// The `onUnmatched` handler of one sandbox.
#[derive(Clone)]
pub struct Unmatched {
    pub ask: AskFn,
    pub timeout: Duration,
    pub remember: RememberFn,
}

impl std::fmt::Debug for Unmatched {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Unmatched")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Unmatched {
    /// Asks about `request` and returns the decision (step 2 and 3 of the module doc).
    pub async fn decide(&self, request: UnmatchedRequest) -> Decision {
        let (host, port) = (request.host.clone(), request.port);
        let answer = tokio::time::timeout(self.timeout, (self.ask)(request))
            .await
            .ok()
            .flatten();
        let Some(answer) = answer else {
            return Decision::denied(None, reason::CALLBACK);
        };
        if answer.remember == Remember::Sandbox {
            (self.remember)(host, port, answer.access).await;
        }
        Decision {
            access: answer.access,
            rule: None,
            reason: reason::CALLBACK,
            would_deny: false,
        }
    }
}

/// An answer from its JSON form: `"allow"`, `"deny"`, or `{ access: "allow" | "deny", remember?:
/// "once" | "sandbox" }`. Anything else is `None` (a denial).
pub fn parse_answer(value: &Value) -> Option<Answer> {
    let access = |s: &str| match s {
        "allow" => Some(Access::Allowed),
        "deny" => Some(Access::Denied),
        _ => None,
    };
    match value {
        Value::String(s) => Some(Answer {
            access: access(s)?,
            remember: Remember::Once,
        }),
        Value::Object(map) => {
            if map.keys().any(|k| k != "access" && k != "remember") {
                return None;
            }
            let remember = match map.get("remember") {
                None | Some(Value::Null) => Remember::Once,
                Some(Value::String(s)) if s == "once" => Remember::Once,
                Some(Value::String(s)) if s == "sandbox" => Remember::Sandbox,
                Some(_) => return None,
            };
            Some(Answer {
                access: access(map.get("access")?.as_str()?)?,
                remember,
            })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn answers() {
        let allow = |remember| {
            Some(Answer {
                access: Access::Allowed,
                remember,
            })
        };
        let deny = |remember| {
            Some(Answer {
                access: Access::Denied,
                remember,
            })
        };
        let cases = [
            (json!("allow"), allow(Remember::Once)),
            (json!("deny"), deny(Remember::Once)),
            (json!({ "access": "allow" }), allow(Remember::Once)),
            (
                json!({ "access": "allow", "remember": "sandbox" }),
                allow(Remember::Sandbox),
            ),
            (
                json!({ "access": "deny", "remember": "once" }),
                deny(Remember::Once),
            ),
            (json!("ALLOW"), None),
            (json!("yes"), None),
            (json!(true), None),
            (json!(null), None),
            (json!({ "access": "allow", "remember": "forever" }), None),
            (json!({ "access": "allow", "extra": 1 }), None),
            (json!({ "remember": "sandbox" }), None),
            (json!(["allow"]), None),
        ];
        for (value, want) in cases {
            assert_eq!(parse_answer(&value), want, "{value}");
        }
    }

    #[tokio::test]
    async fn no_answer_in_time_is_a_denial() {
        let never: AskFn = Arc::new(|_| Box::pin(std::future::pending()));
        let remember: RememberFn = Arc::new(|_, _, _| Box::pin(async {}));
        let unmatched = Unmatched {
            ask: never,
            timeout: Duration::from_millis(20),
            remember,
        };
        let request = UnmatchedRequest {
            host: "a.example".into(),
            port: 443,
            method: "GET".into(),
            path: "/".into(),
            scheme: Scheme::Https,
            origin: None,
        };
        let d = unmatched.decide(request).await;
        assert_eq!((d.access, d.reason), (Access::Denied, reason::CALLBACK));
    }
}
