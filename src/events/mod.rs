//! Audit events: the [`Event`] shape, the per-sandbox [`EventBus`] that fans them out to
//! subscribers, and the JSON Lines audit log that persists and replays them (docs/audit-log.md).
//!
//! How [`EventBus::emit`] works, all under one short lock so the log is strictly ordered:
//! 1. take the next id: a `u64` sequence rendered as 16 zero-padded digits, so string order is
//!    emission order; it continues after the last id in the log across restarts;
//! 2. stamp the time (RFC 3339 UTC, milliseconds) and the sandbox name;
//! 3. append the event as one JSON line to `<dir>/audit.jsonl` (see `log.rs` for rotation); a write
//!    error is logged and does not stop the event;
//! 4. push a copy into every live subscriber's bounded buffer (never waiting, see
//!    `subscription.rs`).
//!
//! # Security
//! Events carry only the fields docs/audit-log.md lists: header *names*, never values, and never query strings.
//! The callers build the fields; this module adds nothing but id, type, time and sandbox.

mod log;
mod subscription;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use parking_lot::Mutex;
use serde_json::{Map, Value};

use crate::error::Result;
use log::{AuditLog, LogReader};
use subscription::Live;

pub use log::{LOG_FILE, ROTATED_FILE, ROTATE_BYTES};
pub use subscription::Subscription;

/// The event id field (docs/audit-log.md).
pub const FIELD_ID: &str = "id";
/// The event type field (`kind` in Rust).
pub const FIELD_TYPE: &str = "type";
/// The RFC 3339 time field.
pub const FIELD_TIME: &str = "time";
/// The sandbox name field.
pub const FIELD_SANDBOX: &str = "sandbox";
/// The `events.dropped` field with the number of events lost.
pub const FIELD_COUNT: &str = "count";

/// Event type names (docs/audit-log.md).
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
    pub const LIMIT_EXCEEDED: &str = "limit.exceeded";
}

/// Egress totals of a sandbox since it was opened in this process (`stats().egress`), counted
/// from the `egress.request` and `egress.response` events as they pass the bus.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EgressTotals {
    /// Requests decided (allowed and denied).
    pub requests: u64,
    /// Requests denied.
    pub denied: u64,
    /// Body bytes received from upstreams.
    pub bytes_in: u64,
    /// Body bytes sent to upstreams.
    pub bytes_out: u64,
}

impl EgressTotals {
    fn count(&mut self, kind: &str, fields: &Map<String, Value>) {
        let number = |name: &str| fields.get(name).and_then(Value::as_u64).unwrap_or(0);
        match kind {
            kind::EGRESS_REQUEST => {
                self.requests += 1;
                if fields.get("access").and_then(Value::as_str) == Some("denied") {
                    self.denied += 1;
                }
            }
            kind::EGRESS_RESPONSE => {
                self.bytes_in += number("bytesIn");
                self.bytes_out += number("bytesOut");
            }
            _ => {}
        }
    }
}

/// Default per-subscriber buffer (README.md#api).
pub const DEFAULT_BUFFER: usize = 10_000;

/// One audit event. Serialized flat: `{ id, type, time, sandbox, ...fields }`.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Unique within the sandbox; ids sort (as strings) in emission order, across restarts.
    pub id: String,
    /// The event type (`type` in JSON), one of [`kind`].
    pub kind: String,
    /// RFC 3339, UTC.
    pub time: String,
    /// The sandbox's name.
    pub sandbox: String,
    /// The type-specific fields (camelCase names, as JS sees them).
    pub fields: Map<String, Value>,
}

impl Event {
    /// The flat JSON object JS sees and the audit log stores. The header fields win over any
    /// type-specific field of the same name.
    pub fn to_json(&self) -> Value {
        let mut object = self.fields.clone();
        object.insert(FIELD_ID.into(), Value::String(self.id.clone()));
        object.insert(FIELD_TYPE.into(), Value::String(self.kind.clone()));
        object.insert(FIELD_TIME.into(), Value::String(self.time.clone()));
        object.insert(FIELD_SANDBOX.into(), Value::String(self.sandbox.clone()));
        Value::Object(object)
    }

    /// The inverse of [`to_json`](Self::to_json); `None` unless the header fields are strings.
    pub fn from_json(value: Value) -> Option<Event> {
        let Value::Object(mut fields) = value else {
            return None;
        };
        let mut take = |name: &str| match fields.remove(name) {
            Some(Value::String(s)) => Some(s),
            _ => None,
        };
        let id = take(FIELD_ID)?;
        let kind = take(FIELD_TYPE)?;
        let time = take(FIELD_TIME)?;
        let sandbox = take(FIELD_SANDBOX)?;
        Some(Event {
            id,
            kind,
            time,
            sandbox,
            fields,
        })
    }
}

/// Renders the fields as JSON only when a `debug!` is actually recorded.
struct FieldsDisplay<'a>(&'a Map<String, Value>);

impl std::fmt::Display for FieldsDisplay<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match serde_json::to_string(self.0) {
            Ok(json) => f.write_str(&json),
            Err(_) => f.write_str("{}"),
        }
    }
}

/// Renders a sequence number as an event id (16 zero-padded digits, so ids sort as strings).
fn format_id(seq: u64) -> String {
    format!("{seq:016}")
}

/// The current time, RFC 3339 UTC with milliseconds (`2026-12-01T07:19:10.123Z`).
fn now_rfc3339() -> String {
    const FORMAT: &[time::format_description::BorrowedFormatItem<'static>] = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    time::OffsetDateTime::now_utc()
        .format(FORMAT)
        .unwrap_or_else(|_| String::from("1970-01-01T00:00:00.000Z"))
}

/// Milliseconds since the Unix epoch as RFC 3339 UTC with milliseconds, like event times.
pub fn format_time_ms(ms: u64) -> String {
    const FORMAT: &[time::format_description::BorrowedFormatItem<'static>] = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(FORMAT).ok())
        .unwrap_or_else(|| String::from("1970-01-01T00:00:00.000Z"))
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
    sandbox: String,
    state: Mutex<BusState>,
}

struct BusState {
    /// The sequence number of the last id handed out.
    last_seq: u64,
    log: AuditLog,
    subscribers: HashMap<u64, Arc<Live>>,
    next_key: u64,
    closed: bool,
    egress: EgressTotals,
}

impl EventBus {
    /// Opens (creating if needed) the audit log at `<dir>/audit.jsonl` and continues its id sequence.
    pub fn open(sandbox: &str, dir: &Path) -> Result<Arc<EventBus>> {
        Self::open_with(sandbox, dir, ROTATE_BYTES)
    }

    /// [`open`](Self::open) with a chosen rotation threshold in bytes (tests use small ones).
    pub fn open_with(sandbox: &str, dir: &Path, rotate_bytes: u64) -> Result<Arc<EventBus>> {
        let (log, last_seq) = AuditLog::open(dir, rotate_bytes)?;
        Ok(Arc::new(EventBus {
            sandbox: sandbox.to_owned(),
            state: Mutex::new(BusState {
                last_seq,
                log,
                subscribers: HashMap::new(),
                next_key: 0,
                closed: false,
                egress: EgressTotals::default(),
            }),
        }))
    }

    /// The sandbox name stamped on every event.
    pub fn sandbox(&self) -> &str {
        &self.sandbox
    }

    /// Stamps, persists and fans out one event; returns it. Never blocks on a subscriber.
    pub fn emit(&self, kind: &str, fields: Map<String, Value>) -> Event {
        let event = {
            let mut state = self.state.lock();
            state.egress.count(kind, &fields);
            state.last_seq += 1;
            let event = Event {
                id: format_id(state.last_seq),
                kind: kind.to_owned(),
                time: now_rfc3339(),
                sandbox: self.sandbox.clone(),
                fields,
            };
            let mut line = event.to_json().to_string().into_bytes();
            line.push(b'\n');
            if let Err(e) = state.log.append(&line) {
                tracing::warn!(id = %event.id, error = %e, "cannot write audit log");
            }
            for live in state.subscribers.values() {
                live.push(event.clone());
            }
            event
        };
        tracing::debug!(
            id = %event.id,
            kind = %event.kind,
            sandbox = %event.sandbox,
            fields = %FieldsDisplay(&event.fields),
            "event"
        );
        event
    }

    /// A new subscriber with a bounded buffer of `buffer` events (at least 1). Does no file I/O:
    /// a replay (`Since::Start`, `Since::After`) happens in the first `next()`. After
    /// [`close`](Self::close) the subscription still replays, then ends.
    pub fn subscribe(self: &Arc<Self>, since: Since, buffer: usize) -> Result<Subscription> {
        let mut state = self.state.lock();
        let live = Arc::new(Live::new(buffer, state.closed));
        let key = state.next_key;
        state.next_key += 1;
        if !state.closed {
            state.subscribers.insert(key, live.clone());
        }
        let until = format_id(state.last_seq + 1);
        drop(state);
        let after = match since {
            Since::Now => None,
            Since::Start => Some(None),
            Since::After(id) => Some(Some(id)),
        };
        Ok(Subscription::new(self.clone(), key, live, after, until))
    }

    /// Ends every subscription (after it has drained what it holds). Events emitted later are
    /// still persisted.
    pub fn close(&self) {
        let mut state = self.state.lock();
        state.closed = true;
        for (_, live) in state.subscribers.drain() {
            live.close();
        }
    }

    /// Egress totals so far (see [`EgressTotals`]).
    pub fn egress_totals(&self) -> EgressTotals {
        self.state.lock().egress
    }

    /// How many subscribers are live.
    pub fn subscriber_count(&self) -> usize {
        self.state.lock().subscribers.len()
    }

    fn remove_subscriber(&self, key: u64) {
        self.state.lock().subscribers.remove(&key);
    }

    /// Opens the log files for a replay, under the lock so no rotation happens in between.
    fn log_reader(&self) -> LogReader {
        self.state.lock().log.reader()
    }
}

impl std::fmt::Debug for EventBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventBus")
            .field("sandbox", &self.sandbox)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::future::Future;
    use std::time::Duration;

    use serde_json::json;

    use super::*;

    const WAIT: Duration = Duration::from_secs(5);

    fn fields(n: u64) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("n".into(), json!(n));
        m
    }

    fn emit_n(bus: &EventBus, range: std::ops::Range<u64>) -> Vec<Event> {
        range
            .map(|n| bus.emit(kind::DNS_QUERY, fields(n)))
            .collect()
    }

    async fn next(sub: &Subscription) -> Option<Event> {
        tokio::time::timeout(WAIT, sub.next())
            .await
            .expect("next() timed out")
    }

    async fn take(sub: &Subscription, n: usize) -> Vec<Event> {
        let mut out = Vec::new();
        for _ in 0..n {
            out.push(next(sub).await.expect("stream ended early"));
        }
        out
    }

    fn ids(events: &[Event]) -> Vec<String> {
        events.iter().map(|e| e.id.clone()).collect()
    }

    fn log_lines(dir: &Path, file: &str) -> Vec<Event> {
        fs::read_to_string(dir.join(file))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| log::parse_line(l.as_bytes()))
            .collect()
    }

    // --- egress totals ---

    #[test]
    fn egress_totals_count_requests_denials_and_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let bus = EventBus::open("t", dir.path()).unwrap();
        let obj = |v: Value| v.as_object().unwrap().clone();
        bus.emit(kind::EGRESS_REQUEST, obj(json!({ "access": "allowed" })));
        bus.emit(kind::EGRESS_REQUEST, obj(json!({ "access": "denied" })));
        bus.emit(
            kind::EGRESS_RESPONSE,
            obj(json!({ "bytesIn": 100, "bytesOut": 7 })),
        );
        bus.emit(kind::DNS_QUERY, obj(json!({ "access": "denied" })));
        assert_eq!(
            bus.egress_totals(),
            EgressTotals {
                requests: 2,
                denied: 1,
                bytes_in: 100,
                bytes_out: 7
            }
        );
    }

    // --- the event shape ---

    #[test]
    fn to_json_is_flat_and_round_trips() {
        let event = Event {
            id: format_id(7),
            kind: kind::EGRESS_REQUEST.into(),
            time: "2026-12-01T00:00:00.000Z".into(),
            sandbox: "sb".into(),
            fields: json!({"host": "example.com", "id": "spoofed"})
                .as_object()
                .cloned()
                .unwrap(),
        };
        let value = event.to_json();
        assert_eq!(value["id"], "0000000000000007", "header wins over a field");
        assert_eq!(value["type"], "egress.request");
        assert_eq!(value["sandbox"], "sb");
        assert_eq!(value["host"], "example.com");
        let back = Event::from_json(value).unwrap();
        assert_eq!(back.fields.get("host"), Some(&json!("example.com")));
        assert_eq!(back.id, event.id);
    }

    #[test]
    fn from_json_rejects_malformed() {
        for (case, value) in [
            ("not an object", json!([1])),
            ("no id", json!({"type": "a", "time": "t", "sandbox": "s"})),
            (
                "numeric id",
                json!({"id": 1, "type": "a", "time": "t", "sandbox": "s"}),
            ),
            ("no sandbox", json!({"id": "1", "type": "a", "time": "t"})),
        ] {
            assert!(Event::from_json(value).is_none(), "{case}");
        }
    }

    #[test]
    fn ids_and_times_have_fixed_shapes() {
        assert_eq!(format_id(1), "0000000000000001");
        assert!(
            format_id(9) < format_id(10),
            "string order is numeric order"
        );
        let t = now_rfc3339();
        assert_eq!(t.len(), "2026-12-01T07:19:10.123Z".len(), "{t}");
        assert!(t.ends_with('Z') && t.as_bytes()[19] == b'.', "{t}");
    }

    // --- fan-out ---

    #[tokio::test]
    async fn two_subscribers_each_see_every_event() {
        let dir = tempfile::tempdir().unwrap();
        let bus = EventBus::open("sb", dir.path()).unwrap();
        let a = bus.subscribe(Since::Now, DEFAULT_BUFFER).unwrap();
        let b = bus.subscribe(Since::Now, DEFAULT_BUFFER).unwrap();
        let sent = emit_n(&bus, 0..5);
        assert_eq!(take(&a, 5).await, sent);
        assert_eq!(take(&b, 5).await, sent);
        assert_eq!(sent[0].sandbox, "sb");
    }

    #[tokio::test]
    async fn since_now_sees_only_later_events() {
        let dir = tempfile::tempdir().unwrap();
        let bus = EventBus::open("sb", dir.path()).unwrap();
        emit_n(&bus, 0..3);
        let sub = bus.subscribe(Since::Now, DEFAULT_BUFFER).unwrap();
        let later = emit_n(&bus, 3..4);
        assert_eq!(take(&sub, 1).await, later);
    }

    // --- ids and the log ---

    #[tokio::test]
    async fn ids_are_ordered_and_continue_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let first = emit_n(&EventBus::open("sb", dir.path()).unwrap(), 0..3);
        let second = emit_n(&EventBus::open("sb", dir.path()).unwrap(), 3..5);
        let all: Vec<_> = first.into_iter().chain(second).collect();
        assert_eq!(
            ids(&all),
            (1..=5).map(format_id).collect::<Vec<_>>(),
            "continues after the last persisted id"
        );
        assert_eq!(
            log_lines(dir.path(), LOG_FILE),
            all,
            "the log holds every event"
        );
    }

    #[tokio::test]
    async fn reopen_continues_from_rotated_file_when_current_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        emit_n(&EventBus::open("sb", dir.path()).unwrap(), 0..4);
        fs::rename(dir.path().join(LOG_FILE), dir.path().join(ROTATED_FILE)).unwrap();
        let bus = EventBus::open("sb", dir.path()).unwrap();
        assert_eq!(bus.emit(kind::DNS_QUERY, fields(0)).id, format_id(5));
    }

    #[tokio::test]
    async fn reopen_after_partial_line_keeps_records_separate() {
        let dir = tempfile::tempdir().unwrap();
        emit_n(&EventBus::open("sb", dir.path()).unwrap(), 0..2);
        // A crash mid-write left half a line.
        let mut log = fs::read(dir.path().join(LOG_FILE)).unwrap();
        log.extend_from_slice(b"{\"id\":\"00000000000");
        fs::write(dir.path().join(LOG_FILE), log).unwrap();
        let bus = EventBus::open("sb", dir.path()).unwrap();
        let third = bus.emit(kind::DNS_QUERY, fields(2));
        assert_eq!(third.id, format_id(3));
        let replayed = log_lines(dir.path(), LOG_FILE);
        assert_eq!(
            ids(&replayed),
            [1, 2, 3].map(format_id),
            "partial line skipped"
        );
    }

    #[test]
    fn last_id_is_found_beyond_the_first_tail_window() {
        let dir = tempfile::tempdir().unwrap();
        let bus = EventBus::open("sb", dir.path()).unwrap();
        let mut big = Map::new();
        big.insert("pad".into(), json!("x".repeat(200 * 1024)));
        bus.emit(kind::DNS_QUERY, big);
        drop(bus);
        let bus = EventBus::open("sb", dir.path()).unwrap();
        assert_eq!(bus.emit(kind::DNS_QUERY, fields(0)).id, format_id(2));
    }

    #[test]
    fn concurrent_emitters_keep_the_log_strictly_ordered() {
        let dir = tempfile::tempdir().unwrap();
        let bus = EventBus::open("sb", dir.path()).unwrap();
        std::thread::scope(|scope| {
            for t in 0..4 {
                let bus = &bus;
                scope.spawn(move || emit_n(bus, t * 1000..t * 1000 + 250));
            }
        });
        let logged = log_lines(dir.path(), LOG_FILE);
        assert_eq!(ids(&logged), (1..=1000).map(format_id).collect::<Vec<_>>());
    }

    // --- replay ---

    #[tokio::test]
    async fn replay_from_start_then_live_without_duplicates() {
        let dir = tempfile::tempdir().unwrap();
        let bus = EventBus::open("sb", dir.path()).unwrap();
        let old = emit_n(&bus, 0..3);
        let sub = bus.subscribe(Since::Start, DEFAULT_BUFFER).unwrap();
        // Emitted after subscribing but before the replay ran: must come exactly once.
        let live = emit_n(&bus, 3..5);
        let got = take(&sub, 5).await;
        assert_eq!(got, old.into_iter().chain(live).collect::<Vec<_>>());
        let more = emit_n(&bus, 5..6);
        assert_eq!(take(&sub, 1).await, more);
    }

    #[tokio::test]
    async fn replay_after_id_then_live() {
        let ids_from = |from: u64| (from..=5).map(format_id).collect::<Vec<_>>();
        for (case, after, want) in [
            ("known id", format_id(2), ids_from(3)),
            ("first id", format_id(1), ids_from(2)),
            ("last id", format_id(5), vec![]),
            (
                "unknown id between two",
                format!("{}x", format_id(2)),
                ids_from(3),
            ),
            ("unknown id before all", String::new(), ids_from(1)),
            ("unknown id after all", format_id(99), vec![]),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let bus = EventBus::open("sb", dir.path()).unwrap();
            emit_n(&bus, 0..5);
            let sub = bus.subscribe(Since::After(after), DEFAULT_BUFFER).unwrap();
            let live = bus.emit(kind::DNS_QUERY, fields(99));
            let mut want = want;
            want.push(live.id.clone());
            let got = take(&sub, want.len()).await;
            assert_eq!(ids(&got), want, "{case}");
        }
    }

    #[tokio::test]
    async fn replay_spans_the_rotated_file() {
        let dir = tempfile::tempdir().unwrap();
        let bus = EventBus::open_with("sb", dir.path(), 600).unwrap();
        let sent = emit_n(&bus, 0..20);
        assert!(dir.path().join(ROTATED_FILE).exists(), "rotated");
        let current = log_lines(dir.path(), LOG_FILE);
        let rotated = log_lines(dir.path(), ROTATED_FILE);
        assert!(!current.is_empty() && !rotated.is_empty());
        assert!(fs::metadata(dir.path().join(LOG_FILE)).unwrap().len() <= 600);
        assert!(
            rotated.last().unwrap().id < current[0].id,
            "ordered across files"
        );
        assert_eq!(current.last().unwrap(), sent.last().unwrap());

        let kept = rotated.len() + current.len();
        let sub = bus.subscribe(Since::Start, DEFAULT_BUFFER).unwrap();
        let live = emit_n(&bus, 20..21);
        let got = take(&sub, kept + 1).await;
        let mut want: Vec<_> = rotated.into_iter().chain(current).collect();
        want.extend(live);
        assert_eq!(got, want);
    }

    #[tokio::test]
    async fn replay_longer_than_a_batch_and_buffer() {
        let dir = tempfile::tempdir().unwrap();
        let bus = EventBus::open("sb", dir.path()).unwrap();
        let old = emit_n(&bus, 0..1200);
        let sub = bus.subscribe(Since::Start, 4).unwrap();
        let got = take(&sub, 1200).await;
        assert_eq!(
            ids(&got),
            ids(&old),
            "replay is not limited by the live buffer"
        );
    }

    #[tokio::test]
    async fn subscribe_after_close_replays_then_ends() {
        let dir = tempfile::tempdir().unwrap();
        let bus = EventBus::open("sb", dir.path()).unwrap();
        let old = emit_n(&bus, 0..2);
        bus.close();
        let sub = bus.subscribe(Since::Start, DEFAULT_BUFFER).unwrap();
        assert_eq!(take(&sub, 2).await, old);
        assert_eq!(next(&sub).await, None);
    }

    // --- slow subscribers ---

    #[tokio::test]
    async fn full_buffer_drops_oldest_and_reports_once() {
        let dir = tempfile::tempdir().unwrap();
        let bus = EventBus::open("sb", dir.path()).unwrap();
        let sub = bus.subscribe(Since::Now, 3).unwrap();
        let sent = emit_n(&bus, 0..10);
        let dropped = next(&sub).await.unwrap();
        assert_eq!(dropped.kind, kind::EVENTS_DROPPED);
        assert_eq!(dropped.fields.get(FIELD_COUNT), Some(&json!(7)));
        assert_eq!(dropped.id, sent[6].id, "sorts before the first kept event");
        assert_eq!(
            take(&sub, 3).await,
            sent[7..].to_vec(),
            "the newest are kept"
        );
        let more = emit_n(&bus, 10..11);
        assert_eq!(take(&sub, 1).await, more, "only one events.dropped per gap");
        assert_eq!(log_lines(dir.path(), LOG_FILE).len(), 11, "not persisted");
    }

    // --- ending ---

    #[tokio::test]
    async fn close_drains_then_ends_streams() {
        let dir = tempfile::tempdir().unwrap();
        let bus = EventBus::open("sb", dir.path()).unwrap();
        let sub = bus.subscribe(Since::Now, DEFAULT_BUFFER).unwrap();
        let waiting = bus.subscribe(Since::Now, DEFAULT_BUFFER).unwrap();
        let pending = tokio::spawn(async move { waiting.next().await });
        tokio::task::yield_now().await;
        let sent = emit_n(&bus, 0..2);
        bus.close();
        assert_eq!(take(&sub, 2).await, sent);
        assert_eq!(next(&sub).await, None);
        let first = tokio::time::timeout(WAIT, pending).await.unwrap().unwrap();
        assert_eq!(first, Some(sent[0].clone()));
        assert_eq!(bus.subscriber_count(), 0);
    }

    #[tokio::test]
    async fn unsubscribe_ends_the_stream_and_removes_it() {
        let dir = tempfile::tempdir().unwrap();
        let bus = EventBus::open("sb", dir.path()).unwrap();
        let sub = Arc::new(bus.subscribe(Since::Now, DEFAULT_BUFFER).unwrap());
        let dropped = bus.subscribe(Since::Now, DEFAULT_BUFFER).unwrap();
        assert_eq!(bus.subscriber_count(), 2);
        drop(dropped);
        assert_eq!(bus.subscriber_count(), 1, "dropping unsubscribes");
        let waiter = {
            let sub = sub.clone();
            tokio::spawn(async move { sub.next().await })
        };
        tokio::task::yield_now().await;
        sub.unsubscribe();
        assert_eq!(
            tokio::time::timeout(WAIT, waiter).await.unwrap().unwrap(),
            None
        );
        emit_n(&bus, 0..1);
        assert_eq!(next(&sub).await, None);
        assert_eq!(bus.subscriber_count(), 0);
    }

    #[tokio::test]
    async fn cancelled_next_loses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let bus = EventBus::open("sb", dir.path()).unwrap();
        let old = emit_n(&bus, 0..3);
        let sub = bus.subscribe(Since::Start, DEFAULT_BUFFER).unwrap();
        // Cancel while the replay batch is in flight (one poll, then drop)...
        let polled = poll_once(&sub);
        let mut got: Vec<Event> = polled.into_iter().flatten().collect();
        got.extend(take(&sub, 3 - got.len()).await);
        assert_eq!(got, old);
        // ...and while waiting for a live event.
        assert_eq!(poll_once(&sub), None, "nothing live yet");
        let live = emit_n(&bus, 3..4);
        assert_eq!(take(&sub, 1).await, live);
    }

    /// Polls `next()` once with a no-op waker, then drops the future (as napi may).
    fn poll_once(sub: &Subscription) -> Option<Option<Event>> {
        let mut future = std::pin::pin!(sub.next());
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        match future.as_mut().poll(&mut cx) {
            std::task::Poll::Ready(event) => Some(event),
            std::task::Poll::Pending => None,
        }
    }

    #[tokio::test]
    async fn write_errors_do_not_stop_fan_out() {
        let dir = tempfile::tempdir().unwrap();
        let bus = EventBus::open_with("sb", dir.path(), 200).unwrap();
        let sub = bus.subscribe(Since::Now, DEFAULT_BUFFER).unwrap();
        emit_n(&bus, 0..1);
        // Make rotation and reopen fail: the log path becomes a directory.
        fs::remove_file(dir.path().join(LOG_FILE)).unwrap();
        fs::create_dir(dir.path().join(LOG_FILE)).unwrap();
        fs::create_dir(dir.path().join(ROTATED_FILE)).unwrap();
        fs::write(dir.path().join(ROTATED_FILE).join("x"), "keep").unwrap();
        let sent = emit_n(&bus, 1..6);
        let got = take(&sub, 6).await;
        assert_eq!(ids(&got[1..]), ids(&sent));
    }
}
