//! Audit events: the [`Event`] shape, the per-sandbox [`EventBus`] that fans them out to
//! subscribers, and the JSON Lines audit log that persists and replays them (SPEC §3).

use std::path::Path;
use std::sync::Arc;

use serde_json::{Map, Value};

use crate::error::Result;

/// Event type names (SPEC §3).
pub mod kind {
    pub const EGRESS_REQUEST: &str = "egress.request";
    pub const EGRESS_RESPONSE: &str = "egress.response";
    pub const DNS_QUERY: &str = "dns.query";
    pub const CONFIG_APPLIED: &str = "config.applied";
    pub const PROCESS_START: &str = "process.start";
    pub const PROCESS_EXIT: &str = "process.exit";
    pub const FS_DENIED: &str = "fs.denied";
    pub const FS_ACCESS: &str = "fs.access";
    pub const SANDBOX_CREATED: &str = "sandbox.created";
    pub const SANDBOX_CLOSED: &str = "sandbox.closed";
    pub const EVENTS_DROPPED: &str = "events.dropped";
}

/// Default per-subscriber buffer (SPEC §1).
pub const DEFAULT_BUFFER: usize = 10_000;

/// One audit event. Serialized flat: `{ id, type, time, sandbox, ...fields }`.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Unique within the sandbox; ids sort (as strings) in emission order, across restarts.
    pub id: String,
    pub kind: String,
    /// RFC 3339, UTC.
    pub time: String,
    pub sandbox: String,
    /// The type-specific fields (camelCase names, as JS sees them).
    pub fields: Map<String, Value>,
}

impl Event {
    /// The flat JSON object JS sees and the audit log stores.
    pub fn to_json(&self) -> Value {
        todo!()
    }
}

/// Where a subscription starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Since {
    /// Live events only, from the moment of subscribing.
    Now,
    /// Replay the whole persisted log first.
    Start,
    /// Replay events after this id first.
    After(String),
}

/// The per-sandbox event bus and audit log.
pub struct EventBus {
    _private: (),
}

/// One subscriber's stream.
pub struct Subscription {
    _private: (),
}

impl EventBus {
    /// Opens (creating if needed) the audit log at `<dir>/audit.jsonl` and continues its id sequence.
    pub fn open(sandbox: &str, dir: &Path) -> Result<Arc<EventBus>> {
        let _ = (sandbox, dir);
        todo!()
    }

    /// Stamps, persists and fans out one event; returns it. Never blocks on a subscriber.
    pub fn emit(&self, kind: &str, fields: Map<String, Value>) -> Event {
        let _ = (kind, fields);
        todo!()
    }

    /// A new subscriber with a bounded buffer of `buffer` events.
    pub fn subscribe(self: &Arc<Self>, since: Since, buffer: usize) -> Result<Subscription> {
        let _ = (since, buffer);
        todo!()
    }

    /// Ends every subscription (after it has drained what it holds).
    pub fn close(&self) {
        todo!()
    }
}

impl Subscription {
    /// The next event; `None` once the bus is closed and the buffer drained.
    pub async fn next(&self) -> Option<Event> {
        todo!()
    }

    /// Unsubscribes now (JS `break`).
    pub fn unsubscribe(&self) {
        todo!()
    }
}
