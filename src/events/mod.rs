//! Audit events: the [`Event`] shape, the per-sandbox [`EventBus`] that fans them out to
//! subscribers, and the JSON Lines audit log that persists and replays them (docs/audit-log.md).
//!
//! How [`EventBus::emit`] works, all under one short lock so the log is strictly ordered:
//! 1. the [`Coalescer`](coalesce::Coalescer) decides what is emitted: every event but repeated or
//!    excessive denials, which it holds and summarizes (see `coalesce.rs`);
//! 2. each emitted event takes the next id: a `u64` sequence rendered as 16 zero-padded digits,
//!    so string order is emission order; it continues after the last id in the log across
//!    restarts;
//! 3. it is stamped with the time (RFC 3339 UTC, milliseconds) and the sandbox name;
//! 4. it is rendered once, as its JSON line, which is handed to the bus's writer thread (see
//!    `writer.rs`, which batches the writes, and `log.rs` for rotation); a write error is logged
//!    and does not stop the event;
//! 5. a copy, sharing the fields and that rendering (see `fields.rs`), is pushed into every live
//!    subscriber's bounded buffer (never waiting, see `subscription.rs`); the JS stream hands
//!    the rendering on, so JS sees byte for byte what the log holds.
//!
//! The events of every proxied request ([`EventBus::emit_typed`]) skip the map: their typed
//! fields are serialized straight into the line, and the map is parsed from it only if a Rust
//! reader asks for it.
//!
//! # Security
//! Events carry only the fields docs/audit-log.md lists: header *names*, never values, and never query strings.
//! The callers build the fields; this module adds nothing but id, type, time and sandbox (and the
//! counts of a coalesced summary).

mod coalesce;
mod fields;
mod log;
mod subscription;
mod writer;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde_json::{Map, Value};

use crate::config::AuditRetention;
use crate::error::{HiveError, Result};
use coalesce::{Coalescer, Held};
use log::{AuditLog, LogReader};
use subscription::Live;
use writer::{Msg, Shared};

pub use coalesce::{FIELD_FIRST_TIME, FIELD_LAST_TIME, FIELD_TYPES};
pub use fields::Fields;
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
/// The number of events a summary stands for (`events.dropped`, `events.suppressed`, coalesced
/// denials).
pub const FIELD_COUNT: &str = "count";

/// How long a close or a replay waits for the writer to catch up before going on without it.
const WRITE_WAIT: Duration = Duration::from_secs(10);

/// Event type names (docs/audit-log.md).
pub mod kind {
    pub const EGRESS_REQUEST: &str = "egress.request";
    pub const EGRESS_RESPONSE: &str = "egress.response";
    /// An allowed request the upstream could not serve: `{ requestId, host, port, cause, detail }`.
    pub const EGRESS_ERROR: &str = "egress.error";
    pub const DNS_QUERY: &str = "dns.query";
    pub const CONFIG_APPLIED: &str = "config.applied";
    pub const PROCESS_START: &str = "process.start";
    pub const PROCESS_EXIT: &str = "process.exit";
    pub const FS_DENIED: &str = "fs.denied";
    pub const FS_ACCESS: &str = "fs.access";
    pub const SANDBOX_CREATED: &str = "sandbox.created";
    pub const SANDBOX_CLOSED: &str = "sandbox.closed";
    /// A degradation that weakens nothing but matters: `{ code, message }`.
    pub const SANDBOX_WARNING: &str = "sandbox.warning";
    pub const EVENTS_DROPPED: &str = "events.dropped";
    pub const EVENTS_SUPPRESSED: &str = "events.suppressed";
    pub const LIMIT_EXCEEDED: &str = "limit.exceeded";
    /// A request refused for carrying a secret's placeholder: `{ secret, host, where }`.
    pub const SECRET_BLOCKED: &str = "secret.blocked";
    /// Secret values replaced in a response: `{ secret, host, count }`.
    pub const SECRET_SCRUBBED: &str = "secret.scrubbed";
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
                self.count_request(fields.get("access").and_then(Value::as_str) == Some("denied"))
            }
            kind::EGRESS_RESPONSE => self.count_response(number("bytesIn"), number("bytesOut")),
            _ => {}
        }
    }

    /// Counts one `egress.request`.
    pub fn count_request(&mut self, denied: bool) {
        self.requests += 1;
        self.denied += u64::from(denied);
    }

    /// Counts one `egress.response`.
    pub fn count_response(&mut self, bytes_in: u64, bytes_out: u64) {
        self.bytes_in += bytes_in;
        self.bytes_out += bytes_out;
    }
}

/// Default per-subscriber buffer (README.md#api).
pub const DEFAULT_BUFFER: usize = 10_000;

/// One audit event. Serialized flat: `{ id, type, time, sandbox, ...fields }`.
///
/// An event the bus published to subscribers carries its rendering (see [`Fields`]): its header
/// fields are not to be changed afterwards, or [`to_line`](Self::to_line) would still write the
/// old ones.
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
    /// The type-specific fields (camelCase names, as JS sees them). Shared: every subscriber
    /// gets the same fields.
    pub fields: Fields,
}

impl Event {
    /// The flat JSON object JS sees and the audit log stores. The header fields win over any
    /// type-specific field of the same name.
    pub fn to_json(&self) -> Value {
        self.clone().into_json()
    }

    /// [`to_json`](Self::to_json), taking the fields without a copy when no one else holds them.
    pub fn into_json(self) -> Value {
        let mut object = self.fields.into_map();
        object.insert(FIELD_ID.into(), Value::String(self.id));
        object.insert(FIELD_TYPE.into(), Value::String(self.kind));
        object.insert(FIELD_TIME.into(), Value::String(self.time));
        object.insert(FIELD_SANDBOX.into(), Value::String(self.sandbox));
        Value::Object(object)
    }

    /// [`to_json`](Self::to_json) serialized (same keys, same sorted order): the event's log
    /// line without the newline. An event the bus published to subscribers was rendered once,
    /// when it got its id, and is not serialized again.
    pub fn to_line(&self) -> Vec<u8> {
        let mut line = Vec::with_capacity(320);
        self.write_line(&mut line);
        line
    }

    /// Appends [`to_line`](Self::to_line) to `out`.
    pub fn write_line(&self, out: &mut Vec<u8>) {
        if let Some(rendered) = self.fields.rendered() {
            out.extend_from_slice(rendered);
            return;
        }
        let start = out.len();
        if serde_json::to_writer(&mut *out, &Flat(self)).is_err() {
            out.truncate(start);
            out.extend_from_slice(self.to_json().to_string().as_bytes());
        }
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
            fields: fields.into(),
        })
    }
}

/// An event as its flat JSON object: the header fields merged into the (sorted) fields, winning
/// over fields of the same name, exactly as [`Event::to_json`] builds it.
struct Flat<'a>(&'a Event);

impl serde::Serialize for Flat<'_> {
    fn serialize<S: serde::Serializer>(
        &self,
        serializer: S,
    ) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let e = self.0;
        let mut headers = [
            (FIELD_ID, e.id.as_str()),
            (FIELD_SANDBOX, e.sandbox.as_str()),
            (FIELD_TIME, e.time.as_str()),
            (FIELD_TYPE, e.kind.as_str()),
        ];
        headers.sort_unstable_by_key(|(name, _)| *name);
        let mut headers = headers.into_iter().peekable();
        let mut map = serializer.serialize_map(None)?;
        for (name, value) in e.fields.iter() {
            while let Some((h, v)) = headers.next_if(|(h, _)| *h < name.as_str()) {
                map.serialize_entry(h, v)?;
            }
            if headers.peek().is_some_and(|(h, _)| *h == name.as_str()) {
                continue;
            }
            map.serialize_entry(name, value)?;
        }
        for (h, v) in headers {
            map.serialize_entry(h, v)?;
        }
        map.end()
    }
}

/// The fields of an event type emitted on every proxied request, kept as typed values and
/// serialized straight into the event's log line (see [`EventBus::emit_typed`]): no map of
/// owned names and values is built unless a subscriber or the coalescer needs one.
pub trait TypedFields {
    /// The event type.
    const KIND: &'static str;

    /// Writes the fields through `entries`, in ascending key order (the order of a
    /// [`Map`]'s keys, so the line is byte for byte what the map would have written).
    fn write<M: serde::ser::SerializeMap>(
        &self,
        entries: &mut Entries<'_, M>,
    ) -> Result<(), M::Error>;

    /// Whether the coalescer may hold this event back (a denial); such events go through the
    /// map path.
    fn is_denial(&self) -> bool;

    /// Adds this event to the egress totals.
    fn count(&self, totals: &mut EgressTotals);
}

/// Serializes map entries in ascending key order, with an event's header fields (`id`,
/// `sandbox`, `time`, `type`) merged in at their places, as [`Event::to_line`] orders them.
pub struct Entries<'h, M> {
    map: M,
    header: std::iter::Peekable<std::array::IntoIter<(&'static str, &'h str), 4>>,
    #[cfg(debug_assertions)]
    last: &'static str,
}

impl<'h, M: serde::ser::SerializeMap> Entries<'h, M> {
    fn new(map: M, header: Option<[(&'static str, &'h str); 4]>) -> Self {
        let mut header = header.unwrap_or([("", ""); 4]);
        header.sort_unstable_by_key(|(name, _)| *name);
        let mut header = header.into_iter().peekable();
        // No header: the four empty names sort first and are skipped here.
        while header.next_if(|(name, _)| name.is_empty()).is_some() {}
        Entries {
            map,
            header,
            #[cfg(debug_assertions)]
            last: "",
        }
    }

    /// One entry; `key` must sort after the previous one.
    pub fn entry<V: serde::Serialize + ?Sized>(
        &mut self,
        key: &'static str,
        value: &V,
    ) -> Result<(), M::Error> {
        #[cfg(debug_assertions)]
        {
            assert!(
                self.last < key,
                "typed event keys out of order: {} then {key}",
                self.last
            );
            self.last = key;
        }
        while let Some((name, v)) = self.header.next_if(|(name, _)| *name < key) {
            self.map.serialize_entry(name, v)?;
        }
        debug_assert!(
            self.header.peek().is_none_or(|(name, _)| *name != key),
            "typed event field {key} is named like a header field"
        );
        self.map.serialize_entry(key, value)
    }

    fn end(mut self) -> Result<M::Ok, M::Error> {
        for (name, v) in self.header.by_ref() {
            self.map.serialize_entry(name, v)?;
        }
        self.map.end()
    }
}

/// A typed event's fields with (for its log line) or without (for its map) the header fields.
struct TypedLine<'a, T> {
    fields: &'a T,
    header: Option<[(&'static str, &'a str); 4]>,
}

impl<T: TypedFields> serde::Serialize for TypedLine<'_, T> {
    fn serialize<S: serde::Serializer>(
        &self,
        serializer: S,
    ) -> std::result::Result<S::Ok, S::Error> {
        let mut entries = Entries::new(serializer.serialize_map(None)?, self.header);
        self.fields.write(&mut entries)?;
        entries.end()
    }
}

/// A typed event's log line (without the newline): what [`Event::to_line`] writes for the same
/// event with [`typed_to_map`]'s fields. `None` only if serializing failed.
pub fn typed_line<T: TypedFields>(
    fields: &T,
    id: &str,
    sandbox: &str,
    time: &str,
) -> Option<Vec<u8>> {
    let header = [
        (FIELD_ID, id),
        (FIELD_SANDBOX, sandbox),
        (FIELD_TIME, time),
        (FIELD_TYPE, T::KIND),
    ];
    let mut line = Vec::with_capacity(320);
    let typed = TypedLine {
        fields,
        header: Some(header),
    };
    serde_json::to_writer(&mut line, &typed).ok()?;
    Some(line)
}

/// A typed event's fields as a map (for subscribers, the coalescer and debug logs).
pub fn typed_to_map<T: TypedFields>(fields: &T) -> Map<String, Value> {
    match serde_json::to_value(TypedLine {
        fields,
        header: None,
    }) {
        Ok(Value::Object(map)) => map,
        _ => Map::new(),
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
/// By hand: `format!` was a tenth of an event's cost.
fn format_id(seq: u64) -> String {
    let mut digits = [b'0'; 20];
    let mut n = seq;
    let mut at = digits.len();
    while n > 0 {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
    }
    let from = at.min(digits.len() - 16);
    digits[from..].iter().map(|&b| char::from(b)).collect()
}

/// The current time, RFC 3339 UTC with milliseconds (`2026-12-01T07:19:10.123Z`).
fn now_rfc3339() -> String {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    format_time_ms(ms)
}

/// The last instant [`format_time_ms`] renders (9999-12-31T23:59:59.999Z); later ones render as
/// the epoch, as RFC 3339's four-digit years require.
const MAX_TIME_MS: u64 = 253_402_300_799_999;

/// Milliseconds since the Unix epoch as RFC 3339 UTC with milliseconds, like event times. By hand
/// (days to a civil date, then fixed-width digits): the `time` crate's formatter was a tenth of
/// an event's cost.
pub fn format_time_ms(ms: u64) -> String {
    let ms = if ms > MAX_TIME_MS { 0 } else { ms };
    let secs = ms / 1000;
    let (year, month, day) = civil_from_days(secs / 86_400);
    let of_day = secs % 86_400;
    let mut out = String::with_capacity(24);
    let mut put = |n: u64, width: u32, after: char| {
        for place in (0..width).rev() {
            out.push(char::from(b'0' + (n / 10u64.pow(place) % 10) as u8));
        }
        out.push(after);
    };
    put(year, 4, '-');
    put(month, 2, '-');
    put(day, 2, 'T');
    put(of_day / 3600, 2, ':');
    put(of_day / 60 % 60, 2, ':');
    put(of_day % 60, 2, '.');
    put(ms % 1000, 3, 'Z');
    out
}

/// (year, month, day) of a day count since 1970-01-01 (proleptic Gregorian; Howard Hinnant's
/// `civil_from_days`, for days ≥ 0).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
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
    /// The log and the writer's progress, shared with the writer thread.
    shared: Arc<Shared>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

struct BusState {
    /// The sequence number of the last id handed out.
    last_seq: u64,
    /// `None` once the bus is being dropped.
    writer: Option<mpsc::Sender<Msg>>,
    coalescer: Coalescer,
    subscribers: HashMap<u64, Arc<Live>>,
    next_key: u64,
    closed: bool,
    egress: EgressTotals,
}

impl EventBus {
    /// Opens (creating if needed) the audit log at `<dir>/audit.jsonl` and continues its id sequence.
    pub fn open(sandbox: &str, dir: &Path) -> Result<Arc<EventBus>> {
        Self::open_with(sandbox, dir, AuditRetention::default())
    }

    /// [`open`](Self::open) with a chosen retention (tests use small ones).
    pub fn open_with(
        sandbox: &str,
        dir: &Path,
        retention: AuditRetention,
    ) -> Result<Arc<EventBus>> {
        let (log, last_seq) = AuditLog::open(dir, retention)?;
        let shared = Arc::new(Shared::new(log, last_seq));
        let (tx, rx) = mpsc::channel();
        let mut spawned = None;
        let bus = Arc::new_cyclic(|weak| {
            spawned = Some(writer::spawn(sandbox, shared.clone(), rx, weak.clone()));
            EventBus {
                sandbox: sandbox.to_owned(),
                state: Mutex::new(BusState {
                    last_seq,
                    writer: Some(tx),
                    coalescer: Coalescer::default(),
                    subscribers: HashMap::new(),
                    next_key: 0,
                    closed: false,
                    egress: EgressTotals::default(),
                }),
                shared,
                writer: Mutex::new(None),
            }
        });
        match spawned {
            Some(Ok(handle)) => *bus.writer.lock() = Some(handle),
            Some(Err(e)) => return Err(HiveError::io("starting the audit log writer", e)),
            None => return Err(HiveError::Internal("audit log writer not started".into())),
        }
        Ok(bus)
    }

    /// The sandbox name stamped on every event.
    pub fn sandbox(&self) -> &str {
        &self.sandbox
    }

    /// Changes the audit log's retention (`audit` in the config) from the next write.
    pub fn set_retention(&self, retention: AuditRetention) {
        self.shared.set_retention(retention);
    }

    /// Stamps, persists and fans out one event; returns it. Never blocks on a subscriber or on
    /// the disk.
    ///
    /// A denial the coalescer holds back (a repeat, or one over the budget) is returned with an
    /// empty `id`: it is not emitted as an event of its own but counted in a later summary.
    pub fn emit(&self, kind: &str, fields: Map<String, Value>) -> Event {
        let time = now_rfc3339();
        let (held, mut emitted) = {
            let mut state = self.state.lock();
            state.egress.count(kind, &fields);
            let mut out = Vec::with_capacity(1);
            let held = state
                .coalescer
                .admit(kind, fields, Instant::now(), &time, &mut out);
            let emitted: Vec<Event> = out
                .into_iter()
                .map(|event| self.publish(&mut state, event))
                .collect();
            self.update_holding(&state);
            (held, emitted)
        };
        for event in &emitted {
            tracing::debug!(
                id = %event.id,
                kind = %event.kind,
                sandbox = %event.sandbox,
                fields = %FieldsDisplay(&event.fields),
                "event"
            );
        }
        match (held, emitted.pop()) {
            (None, Some(event)) => event,
            (held, _) => Event {
                id: String::new(),
                kind: kind.to_owned(),
                time,
                sandbox: self.sandbox.clone(),
                fields: held.unwrap_or_default().into(),
            },
        }
    }

    /// [`emit`](Self::emit) for an event type with [`TypedFields`]; returns the event's id (empty
    /// when the coalescer held it back). Unless it is a denial or `debug` logging is on, the
    /// fields are serialized straight into the log line, and live subscribers get an event that
    /// carries that line, its map left to be parsed if someone reads it (see [`Fields`]).
    pub fn emit_typed<T: TypedFields>(&self, fields: &T) -> String {
        if fields.is_denial() || tracing::enabled!(tracing::Level::DEBUG) {
            return self.emit(T::KIND, typed_to_map(fields)).id;
        }
        let time = now_rfc3339();
        let mut state = self.state.lock();
        fields.count(&mut state.egress);
        let mut before = Vec::new();
        state.coalescer.pass(&mut before);
        for held in before {
            self.publish(&mut state, held);
        }
        state.last_seq += 1;
        let id = format_id(state.last_seq);
        if let Some(mut line) = typed_line(fields, &id, &self.sandbox, &time) {
            if state.subscribers.is_empty() {
                line.push(b'\n');
                self.send_line(&state, &id, line);
            } else {
                let rendered: Arc<[u8]> = Arc::from(line);
                self.send_rendered(&state, &id, rendered.clone());
                let event = Event {
                    id: id.clone(),
                    kind: T::KIND.to_owned(),
                    time,
                    sandbox: self.sandbox.clone(),
                    fields: Fields::from_rendered(rendered),
                };
                self.fan_out(&state, event);
            }
        }
        self.update_holding(&state);
        id
    }

    /// Hands one event's line (ending with a newline) to the writer thread.
    fn send_line(&self, state: &BusState, id: &str, line: Vec<u8>) {
        self.send(state, id, Msg::Line(state.last_seq, line));
    }

    /// Hands one event's rendering (its line without the newline) to the writer thread.
    fn send_rendered(&self, state: &BusState, id: &str, rendered: Arc<[u8]>) {
        self.send(state, id, Msg::Rendered(state.last_seq, rendered));
    }

    fn send(&self, state: &BusState, id: &str, msg: Msg) {
        let sent = state.writer.as_ref().is_some_and(|tx| tx.send(msg).is_ok());
        if !sent {
            tracing::warn!(%id, "cannot write audit log: its writer has stopped");
        }
    }

    /// Pushes one published event into every live subscriber's buffer; the last one gets the
    /// event itself, the others a copy.
    fn fan_out(&self, state: &BusState, event: Event) {
        let mut lives = state.subscribers.values().peekable();
        while let Some(live) = lives.next() {
            if lives.peek().is_some() {
                live.push(event.clone());
            } else {
                live.push(event);
                return;
            }
        }
    }

    /// Gives one emitted event its id, hands its line to the writer and fans it out; with
    /// subscribers, the event keeps its rendering, which they share with the writer.
    fn publish(&self, state: &mut BusState, held: Held) -> Event {
        state.last_seq += 1;
        let mut event = Event {
            id: format_id(state.last_seq),
            kind: held.kind,
            time: held.time,
            sandbox: self.sandbox.clone(),
            fields: held.fields.into(),
        };
        let mut line = event.to_line();
        if state.subscribers.is_empty() {
            line.push(b'\n');
            self.send_line(state, &event.id, line);
        } else {
            let rendered: Arc<[u8]> = Arc::from(line);
            self.send_rendered(state, &event.id, rendered.clone());
            event.fields = event.fields.with_rendered(rendered);
            self.fan_out(state, event.clone());
        }
        event
    }

    /// Tells the writer whether the coalescer holds anything (so that it ticks).
    fn update_holding(&self, state: &BusState) {
        let holding = state.coalescer.is_holding();
        let was = self.shared.holding.swap(holding, Ordering::AcqRel);
        if holding && !was {
            if let Some(tx) = &state.writer {
                let _ = tx.send(Msg::Wake);
            }
        }
    }

    /// Emits what the coalescer has held long enough (the writer calls it on its tick).
    fn expire_held(&self) {
        let mut state = self.state.lock();
        let mut out = Vec::new();
        state.coalescer.expire(Instant::now(), &mut out);
        for held in out {
            self.publish(&mut state, held);
        }
        self.update_holding(&state);
    }

    /// Emits everything the coalescer holds, then waits (bounded) until the log holds every
    /// event emitted so far. Blocking: call it off the async workers.
    pub fn sync(&self) {
        let last = {
            let mut state = self.state.lock();
            let mut out = Vec::new();
            state.coalescer.flush(&mut out);
            for held in out {
                self.publish(&mut state, held);
            }
            self.update_holding(&state);
            state.last_seq
        };
        self.hurry_writer();
        if !self.shared.wait(last, WRITE_WAIT) {
            tracing::warn!(sandbox = %self.sandbox, "audit log writer is behind");
        }
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
        let mut out = Vec::new();
        state.coalescer.flush(&mut out);
        for held in out {
            self.publish(&mut state, held);
        }
        self.update_holding(&state);
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

    /// Cuts the writer's linger short: someone waits for what is queued.
    fn hurry_writer(&self) {
        if let Some(handle) = self.writer.lock().as_ref() {
            handle.thread().unpark();
        }
    }

    fn remove_subscriber(&self, key: u64) {
        self.state.lock().subscribers.remove(&key);
    }

    /// Opens the log files for a replay once the writer has written every event emitted so far
    /// (a replay must not miss what is still queued). Blocking.
    fn log_reader(&self) -> LogReader {
        let last = self.state.lock().last_seq;
        self.hurry_writer();
        if !self.shared.wait(last, WRITE_WAIT) {
            tracing::warn!(sandbox = %self.sandbox, "audit log writer is behind; the replay may miss events");
        }
        self.shared.reader()
    }
}

impl Drop for EventBus {
    /// Emits what the coalescer holds, then lets the writer finish the queue and waits for it
    /// (unless this runs on the writer thread itself).
    fn drop(&mut self) {
        let state = self.state.get_mut();
        let mut out = Vec::new();
        state.coalescer.flush(&mut out);
        let mut state = std::mem::replace(
            state,
            BusState {
                last_seq: 0,
                writer: None,
                coalescer: Coalescer::default(),
                subscribers: HashMap::new(),
                next_key: 0,
                closed: true,
                egress: EgressTotals::default(),
            },
        );
        for held in out {
            self.publish(&mut state, held);
        }
        drop(state);
        if let Some(handle) = self.writer.get_mut().take() {
            if handle.thread().id() != std::thread::current().id() {
                handle.thread().unpark();
                let _ = handle.join();
            }
        }
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

    fn retention(max_bytes: u64, keep: u32) -> AuditRetention {
        AuditRetention { max_bytes, keep }
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
    fn a_log_line_is_the_flat_object_serialized() {
        let fields = json!({
            "a": 1, "host": "x", "id": "forged", "injectedHeaders": ["h"], "port": 443,
            "sandbox": "forged", "status": null, "time": 0, "type": "forged", "zz": { "k": [1, 2] },
        });
        let event = Event {
            id: "0000000000000007".into(),
            kind: kind::EGRESS_REQUEST.into(),
            time: "2026-12-02T00:00:00.000Z".into(),
            sandbox: "s\"q".into(),
            fields: fields.as_object().unwrap().clone().into(),
        };
        assert_eq!(
            String::from_utf8(event.to_line()).unwrap(),
            event.to_json().to_string()
        );
        let bare = Event {
            fields: Map::new().into(),
            ..event.clone()
        };
        assert_eq!(
            String::from_utf8(bare.to_line()).unwrap(),
            bare.to_json().to_string()
        );
    }

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
                .unwrap()
                .into(),
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
        assert_eq!(format_id(u64::MAX), u64::MAX.to_string());
        assert_eq!(format_id(0), "0000000000000000");
    }

    #[test]
    fn times_match_the_time_crates_rendering() {
        const FORMAT: &[time::format_description::BorrowedFormatItem<'static>] = time::macros::format_description!(
            "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
        );
        let oracle = |ms: u64| {
            time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
                .ok()
                .and_then(|t| t.format(FORMAT).ok())
                .unwrap_or_else(|| String::from("1970-01-01T00:00:00.000Z"))
        };
        let mut cases = vec![
            0,
            951_782_400_000,   // 2000-02-29
            951_868_799_999,   // 2000-02-29T23:59:59.999
            4_107_542_400_000, // 2100-03-01
            1_798_761_599_999, // 2026-12-31T23:59:59.999
            MAX_TIME_MS,
        ];
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            cases.push(x % (MAX_TIME_MS + 1));
        }
        for ms in cases {
            assert_eq!(format_time_ms(ms), oracle(ms), "{ms}");
        }
        assert_eq!(format_time_ms(MAX_TIME_MS + 1), "1970-01-01T00:00:00.000Z");
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
        bus.sync();
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
        bus.sync();
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
        let bus = EventBus::open_with("sb", dir.path(), retention(600, 1)).unwrap();
        let sent = emit_n(&bus, 0..20);
        bus.sync();
        assert!(dir.path().join(ROTATED_FILE).exists(), "rotated");
        bus.sync();
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

    // --- typed events ---

    /// An `egress.response`-like typed event for the tests.
    struct Response {
        bytes_in: u64,
        host: &'static str,
    }

    impl TypedFields for Response {
        const KIND: &'static str = kind::EGRESS_RESPONSE;

        fn write<M: serde::ser::SerializeMap>(
            &self,
            entries: &mut Entries<'_, M>,
        ) -> Result<(), M::Error> {
            entries.entry("bytesIn", &self.bytes_in)?;
            entries.entry("host", self.host)
        }

        fn is_denial(&self) -> bool {
            false
        }

        fn count(&self, totals: &mut EgressTotals) {
            totals.count_response(self.bytes_in, 0);
        }
    }

    /// Typed events reach live subscribers as the very line the log holds, without a map built
    /// for them; their fields, when read, are the log's; ids stay in emission order among
    /// untyped events; a replay writes the same bytes.
    #[tokio::test]
    async fn a_typed_event_reaches_subscribers_as_its_log_line_without_a_map() {
        let dir = tempfile::tempdir().unwrap();
        let bus = EventBus::open("sb", dir.path()).unwrap();
        let a = bus.subscribe(Since::Now, DEFAULT_BUFFER).unwrap();
        let b = bus.subscribe(Since::Now, DEFAULT_BUFFER).unwrap();
        let mut want = Vec::new();
        for n in 0..3 {
            want.push(bus.emit_typed(&Response {
                bytes_in: n,
                host: "h\"\u{e9}\n.test",
            }));
            want.push(bus.emit(kind::DNS_QUERY, fields(n)).id);
        }
        let live = take(&a, 6).await;
        assert_eq!(ids(&live), want, "in emission order");
        assert_eq!(take(&b, 6).await, live, "every subscriber gets the same");
        for event in live.iter().step_by(2) {
            assert!(!event.fields.is_parsed(), "no map on the way");
        }
        bus.sync();
        let log = fs::read_to_string(dir.path().join(LOG_FILE)).unwrap();
        let log: Vec<&str> = log.lines().collect();
        assert_eq!(log.len(), 6);
        for (event, line) in live.iter().zip(&log) {
            assert_eq!(String::from_utf8(event.to_line()).unwrap(), *line);
        }
        let typed = &live[2];
        assert_eq!(
            Value::Object((*typed.fields).clone()),
            json!({ "bytesIn": 1, "host": "h\"\u{e9}\n.test" })
        );
        assert_eq!(log_lines(dir.path(), LOG_FILE), live, "field for field");
        assert_eq!(
            bus.egress_totals().bytes_in,
            3,
            "counted with subscribers too"
        );

        let replay = bus.subscribe(Since::Start, DEFAULT_BUFFER).unwrap();
        for (event, line) in take(&replay, 6).await.iter().zip(&log) {
            assert_eq!(String::from_utf8(event.to_line()).unwrap(), *line);
        }
    }

    // --- flooding the log with denials ---

    fn denied_dns(name: &str) -> Map<String, Value> {
        json!({ "name": name, "qtype": "A", "access": "denied" })
            .as_object()
            .cloned()
            .unwrap()
    }

    fn allowed_request() -> Map<String, Value> {
        json!({ "host": "api.example.com", "port": 443, "method": "GET", "path": "/v1/x",
                "access": "allowed", "rule": 0, "reason": "rule" })
        .as_object()
        .cloned()
        .unwrap()
    }

    /// Every event in the kept files, oldest first.
    fn kept_events(dir: &Path, keep: u32) -> Vec<Event> {
        let mut files: Vec<String> = (1..=keep)
            .rev()
            .map(|n| format!("{LOG_FILE}.{n}"))
            .collect();
        files.push(LOG_FILE.into());
        files.iter().flat_map(|f| log_lines(dir, f)).collect()
    }

    /// A flood of denied DNS queries (identical, or each with its own name) after one allowed
    /// request and one config change: 160 MB (identical) or 40 MB (distinct) of events
    /// written one by one, against a 1 MiB log with one rotated file.
    fn flood_after_evidence(distinct: bool) {
        let dir = tempfile::tempdir().unwrap();
        let bus = EventBus::open_with("sb", dir.path(), retention(1 << 20, 1)).unwrap();
        let allowed = bus.emit(kind::EGRESS_REQUEST, allowed_request());
        let applied = bus.emit(kind::CONFIG_APPLIED, fields(1));
        let n = if distinct { 300_000 } else { 1_200_000 };
        for i in 0..n {
            let name = if distinct {
                format!("{i}.exfil.attacker.example")
            } else {
                "attacker.example".into()
            };
            bus.emit(kind::DNS_QUERY, denied_dns(&name));
        }
        bus.sync();
        let kept = kept_events(dir.path(), 1);
        for evidence in [&allowed, &applied] {
            assert!(
                kept.iter().any(|e| e.id == evidence.id),
                "{} rotated away",
                evidence.kind
            );
        }
        let denials: u64 = kept
            .iter()
            .filter(|e| e.kind == kind::DNS_QUERY || e.kind == kind::EVENTS_SUPPRESSED)
            .map(|e| {
                e.fields
                    .get(FIELD_COUNT)
                    .and_then(Value::as_u64)
                    .unwrap_or(1)
            })
            .sum();
        assert_eq!(denials, n, "every denial is counted in the log");
        assert!(
            !dir.path().join(ROTATED_FILE).exists(),
            "nothing needed rotating"
        );
    }

    #[test]
    fn a_flood_of_identical_denials_does_not_rotate_away_an_allowed_request() {
        flood_after_evidence(false);
    }

    #[test]
    fn a_flood_of_distinct_denials_does_not_rotate_away_an_allowed_request() {
        flood_after_evidence(true);
    }

    #[tokio::test]
    async fn coalesced_denials_reach_subscribers_in_order_with_unique_ids() {
        let dir = tempfile::tempdir().unwrap();
        let bus = EventBus::open("sb", dir.path()).unwrap();
        let sub = bus.subscribe(Since::Now, DEFAULT_BUFFER).unwrap();
        let first = bus.emit(kind::DNS_QUERY, denied_dns("x"));
        let held: Vec<Event> = (0..4)
            .map(|_| bus.emit(kind::DNS_QUERY, denied_dns("x")))
            .collect();
        assert!(held.iter().all(|e| e.id.is_empty()), "repeats are held");
        let allowed = bus.emit(kind::EGRESS_REQUEST, allowed_request());
        let got = take(&sub, 3).await;
        assert_eq!(got[0], first);
        assert_eq!(got[1].kind, kind::DNS_QUERY);
        assert_eq!(got[1].fields.get(FIELD_COUNT), Some(&json!(4)));
        assert!(
            got[1].fields.contains_key(FIELD_FIRST_TIME)
                && got[1].fields.contains_key(FIELD_LAST_TIME)
        );
        assert_eq!(got[2], allowed);
        assert!(
            got[0].id < got[1].id && got[1].id < got[2].id,
            "{:?}",
            ids(&got)
        );
        bus.sync();
        assert_eq!(
            log_lines(dir.path(), LOG_FILE),
            got,
            "the log holds what subscribers saw"
        );
    }

    #[tokio::test]
    async fn held_repeats_are_emitted_after_a_short_window_without_another_event() {
        let dir = tempfile::tempdir().unwrap();
        let bus = EventBus::open("sb", dir.path()).unwrap();
        let sub = bus.subscribe(Since::Now, DEFAULT_BUFFER).unwrap();
        for _ in 0..3 {
            bus.emit(kind::DNS_QUERY, denied_dns("x"));
        }
        let got = take(&sub, 2).await;
        assert_eq!(got[1].fields.get(FIELD_COUNT), Some(&json!(2)));
    }

    #[test]
    fn retention_keeps_the_configured_number_of_rotated_files() {
        let dir = tempfile::tempdir().unwrap();
        let bus = EventBus::open_with("sb", dir.path(), retention(600, 3)).unwrap();
        emit_n(&bus, 0..60);
        bus.sync();
        let exists = |n: u32| dir.path().join(format!("{LOG_FILE}.{n}")).exists();
        assert!(exists(1) && exists(2) && exists(3) && !exists(4));
        let kept = kept_events(dir.path(), 3);
        assert_eq!(kept.last().unwrap().id, format_id(60));
        assert!(
            kept.windows(2).all(|w| w[0].id < w[1].id),
            "ordered across files"
        );
        bus.set_retention(retention(600, 1));
        emit_n(&bus, 60..70);
        bus.sync();
        assert!(
            exists(1) && !exists(2) && !exists(3),
            "a smaller keep prunes at the next rotation"
        );
        bus.set_retention(retention(600, 0));
        emit_n(&bus, 70..80);
        bus.sync();
        assert!(!exists(1), "keep 0 keeps no rotated file");
        assert!(!log_lines(dir.path(), LOG_FILE).is_empty());
    }

    #[test]
    fn a_batch_is_split_where_the_rotation_falls() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = AuditLog::open(dir.path(), retention(100, 1)).unwrap();
        let line = |c: char| format!("{}\n", c.to_string().repeat(39));
        log.append(format!("{}{}{}", line('a'), line('b'), line('c')).as_bytes())
            .unwrap();
        let current = fs::read_to_string(dir.path().join(LOG_FILE)).unwrap();
        let rotated = fs::read_to_string(dir.path().join(ROTATED_FILE)).unwrap();
        assert_eq!(rotated, format!("{}{}", line('a'), line('b')));
        assert_eq!(current, line('c'));
        // A line longer than the threshold gets a file of its own.
        log.append(format!("{}{}", "x".repeat(150), "\n").as_bytes())
            .unwrap();
        assert_eq!(
            fs::read_to_string(dir.path().join(LOG_FILE)).unwrap().len(),
            151
        );
    }

    /// Throughput of `emit` on the calling thread and until the log holds everything:
    /// `cargo test --lib bench_emit -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn bench_emit() {
        type Make = fn(u64) -> Map<String, Value>;
        let cases: [(&str, Make); 3] = [
            ("allowed, all written", |i| {
                let mut f = allowed_request();
                f.insert("path".into(), json!(format!("/v1/{i}")));
                f
            }),
            ("identical denials", |_| denied_dns("attacker.example")),
            ("distinct denials", |i| {
                denied_dns(&format!("{i}.attacker.example"))
            }),
        ];
        println!("| events | case | emit (calling thread) | until written |");
        println!("|---|---|---|---|");
        for (case, make) in cases {
            let dir = tempfile::tempdir().unwrap();
            let bus = EventBus::open("sb", dir.path()).unwrap();
            let n = 200_000;
            let start = std::time::Instant::now();
            for i in 0..n {
                bus.emit(kind::DNS_QUERY, make(i));
            }
            let emitted = start.elapsed();
            bus.sync();
            let written = start.elapsed();
            let rate = |d: Duration| format!("{:.0} k/s", n as f64 / d.as_secs_f64() / 1000.0);
            println!("| {n} | {case} | {} | {} |", rate(emitted), rate(written));
        }
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
        bus.sync();
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
        let bus = EventBus::open_with("sb", dir.path(), retention(200, 1)).unwrap();
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
