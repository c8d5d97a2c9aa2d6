//! The sandbox's side of `onUnmatched` (docs/network-access.md#asking-about-unmatched-requests):
//! installing the handler in the proxy and appending the rule of a `remember: "sandbox"` answer;
//! and the ids of execs (docs/audit-log.md#attribution).

use std::sync::{Arc, Weak};
use std::time::Duration;

use super::Sandbox;
use crate::config::{EgressRule, HostPattern, RuleAccess};
use crate::error::{HiveError, Result};
use crate::policy::{reason, Access};
use crate::proxy::ask::{AskFn, RememberFn, Unmatched, DEFAULT_TIMEOUT, MAX_TIMEOUT};

/// A new exec id: 16 random hex digits (unique across runs, so ids in one audit log never repeat).
pub fn new_exec_id() -> Result<Arc<str>> {
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes).map_err(|e| HiveError::Internal(format!("getrandom: {e}")))?;
    Ok(bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>()
        .into())
}

impl Sandbox {
    /// Installs `ask` as the `onUnmatched` handler with the bound `timeout` (default
    /// [`DEFAULT_TIMEOUT`]), or removes the handler with `None`.
    ///
    /// # Errors
    /// `HIVE_INVALID_ARGUMENT` for a bound of zero or over [`MAX_TIMEOUT`].
    pub fn set_on_unmatched(
        self: &Arc<Self>,
        ask: Option<AskFn>,
        timeout: Option<Duration>,
    ) -> Result<()> {
        let timeout = timeout.unwrap_or(DEFAULT_TIMEOUT);
        if timeout.is_zero() || timeout > MAX_TIMEOUT {
            return Err(HiveError::InvalidArgument(format!(
                "options.onUnmatchedTimeoutMs: expected 1 to {} milliseconds, got {}",
                MAX_TIMEOUT.as_millis(),
                timeout.as_millis()
            )));
        }
        let Some(ask) = ask else {
            self.engine.set_unmatched(None);
            return Ok(());
        };
        let sandbox: Weak<Sandbox> = Arc::downgrade(self);
        let remember: RememberFn = Arc::new(move |host, port, access| {
            let sandbox = sandbox.clone();
            Box::pin(async move {
                let Some(sandbox) = sandbox.upgrade() else {
                    return;
                };
                let done =
                    tokio::task::spawn_blocking(move || sandbox.remember(&host, port, access))
                        .await;
                if let Ok(Err(e)) = done {
                    tracing::warn!(error = %e, "onUnmatched: the remembered rule was not added");
                }
            })
        });
        self.engine.set_unmatched(Some(Unmatched {
            ask,
            timeout,
            remember,
        }));
        Ok(())
    }

    /// Appends `{ access, host, ports: [port] }` unless a rule already decides host:port (another
    /// request remembered it first). Blocking.
    fn remember(&self, host: &str, port: u16, access: Access) -> Result<()> {
        self.ensure_open()?;
        let _order = self.apply_lock.lock();
        let current = self.cell.load_full();
        let decided = current.policy.decide_connect(host, port, None).decision;
        if decided.reason != reason::NO_RULE {
            return Ok(());
        }
        let host = HostPattern::parse(host).map_err(HiveError::InvalidArgument)?;
        let mut config = (*current.config).clone();
        config.egress.push(EgressRule {
            access: match access {
                Access::Allowed => RuleAccess::Allow,
                Access::Denied => RuleAccess::Deny,
            },
            host,
            ports: Some(vec![port]),
            methods: None,
            paths: None,
            override_: None,
            mode: None,
            tls: Default::default(),
        });
        self.swap_config_locked(config)
    }
}
