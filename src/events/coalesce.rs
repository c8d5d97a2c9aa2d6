//! Keeps a flood of denials from flooding the audit log (docs/audit-log.md#repeated-denials).
//!
//! A sandbox can cause denials as fast as it can make requests or DNS queries; written one line
//! each, they would rotate every earlier event (an allowed request, a config change) out of the
//! log within seconds. The [`Coalescer`] sits in front of the bus's id counter and decides, for
//! each event, what is actually emitted:
//! 1. Only *denials* are ever held back: `egress.request` and `dns.query` with
//!    `access: "denied"`, and `fs.denied`. Every other event is emitted as it comes, after
//!    whatever the coalescer held (so the log stays in order).
//! 2. **Identical repeats** are counted instead of emitted. Two denials are identical when their
//!    type and *every* field are equal (for `egress.request`: host, port, method, path, scheme,
//!    access, rule, reason, via, injectedHeaders; for `dns.query`: name, qtype, access; for
//!    `fs.denied`: path, operation, rule). The first of a run is emitted at once; the repeats are
//!    emitted as one event when a different event arrives or [`WINDOW`] after the run started:
//!    the same type and fields plus `count` (how many denials it stands for), `firstTime` and
//!    `lastTime`, with `time` = `lastTime`. A single repeat is emitted as itself.
//! 3. **A budget** bounds the rest: distinct denials take one token each from a bucket of
//!    [`BURST`] tokens refilled at [`RATE`] per second. Without a token, a denial is only counted;
//!    the counts are emitted as one `events.suppressed` event (`count`, `firstTime`, `lastTime`,
//!    `types: { <type>: n }`) before the next event that is emitted, or after [`WINDOW`].
//!
//! Everything here runs under the bus lock, so ids stay unique and in emission order; held events
//! get their id when they are emitted.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{Map, Value};

use super::{kind, FIELD_COUNT};

/// How long repeats and suppressed denials are held at most before their summary is emitted.
pub const WINDOW: Duration = Duration::from_millis(500);
/// Distinct denials emitted one by one in a burst.
pub const BURST: f64 = 1000.0;
/// Distinct denials per second emitted one by one once the burst is spent.
pub const RATE: f64 = 100.0;

/// `firstTime`: when the first event a summary stands for happened.
pub const FIELD_FIRST_TIME: &str = "firstTime";
/// `lastTime`: when the last event a summary stands for happened.
pub const FIELD_LAST_TIME: &str = "lastTime";
/// `types` of `events.suppressed`: how many denials of each type it stands for.
pub const FIELD_TYPES: &str = "types";

/// An event to emit: type, fields and its `time`.
#[derive(Debug, Clone, PartialEq)]
pub struct Held {
    pub kind: String,
    pub fields: Map<String, Value>,
    pub time: String,
}

/// A run of identical denials after the first one, which was emitted.
#[derive(Debug)]
struct Run {
    kind: String,
    fields: Map<String, Value>,
    started: Instant,
    repeats: u64,
    first_time: String,
    last_time: String,
}

/// Denials counted without a token.
#[derive(Debug)]
struct Suppressed {
    started: Instant,
    count: u64,
    first_time: String,
    last_time: String,
    types: BTreeMap<String, u64>,
}

/// The coalescing state of one bus (see the module docs).
#[derive(Debug)]
pub struct Coalescer {
    run: Option<Run>,
    suppressed: Option<Suppressed>,
    tokens: f64,
    refilled: Instant,
}

impl Default for Coalescer {
    fn default() -> Self {
        Coalescer {
            run: None,
            suppressed: None,
            tokens: BURST,
            refilled: Instant::now(),
        }
    }
}

/// Whether an event is a denial the coalescer may hold back.
pub fn is_denial(kind: &str, fields: &Map<String, Value>) -> bool {
    match kind {
        kind::FS_DENIED => true,
        kind::EGRESS_REQUEST | kind::DNS_QUERY => {
            fields.get("access").and_then(Value::as_str) == Some("denied")
        }
        _ => false,
    }
}

impl Coalescer {
    /// Takes one event that happened at `now` (`time`): pushes onto `out` what must be emitted,
    /// in order (held summaries first, then the event itself unless it was held). Returns the
    /// fields back when the event itself is held.
    pub fn admit(
        &mut self,
        kind: &str,
        fields: Map<String, Value>,
        now: Instant,
        time: &str,
        out: &mut Vec<Held>,
    ) -> Option<Map<String, Value>> {
        if !is_denial(kind, &fields) {
            self.pass(out);
            out.push(Held {
                kind: kind.to_owned(),
                fields,
                time: time.to_owned(),
            });
            return None;
        }
        if let Some(run) = self
            .run
            .as_mut()
            .filter(|run| run.kind == kind && run.fields == fields)
        {
            if run.repeats == 0 {
                run.first_time = time.to_owned();
            }
            run.repeats += 1;
            run.last_time = time.to_owned();
            return Some(fields);
        }
        self.flush_run(out);
        self.run = None;
        self.refill(now);
        if self.tokens < 1.0 {
            let s = self.suppressed.get_or_insert_with(|| Suppressed {
                started: now,
                count: 0,
                first_time: time.to_owned(),
                last_time: String::new(),
                types: BTreeMap::new(),
            });
            s.count += 1;
            s.last_time = time.to_owned();
            *s.types.entry(kind.to_owned()).or_default() += 1;
            return Some(fields);
        }
        self.tokens -= 1.0;
        self.flush_suppressed(out);
        self.run = Some(Run {
            kind: kind.to_owned(),
            fields: fields.clone(),
            started: now,
            repeats: 0,
            first_time: String::new(),
            last_time: String::new(),
        });
        out.push(Held {
            kind: kind.to_owned(),
            fields,
            time: time.to_owned(),
        });
        None
    }

    /// Emits what has been held for [`WINDOW`] or longer (called on a timer while
    /// [`is_holding`](Self::is_holding)).
    pub fn expire(&mut self, now: Instant, out: &mut Vec<Held>) {
        if let Some(run) = &mut self.run {
            if now.duration_since(run.started) >= WINDOW {
                if run.repeats == 0 {
                    self.run = None;
                } else {
                    self.flush_run(out);
                    if let Some(run) = &mut self.run {
                        // The run goes on: later repeats are counted in the next window.
                        run.started = now;
                    }
                }
            }
        }
        if self
            .suppressed
            .as_ref()
            .is_some_and(|s| now.duration_since(s.started) >= WINDOW)
        {
            self.flush_suppressed(out);
        }
    }

    /// Emits everything held (the bus is closing).
    pub fn flush(&mut self, out: &mut Vec<Held>) {
        self.flush_run(out);
        self.run = None;
        self.flush_suppressed(out);
    }

    /// Lets an event that is not a denial through: pushes onto `out` what must be emitted before
    /// it (the run's repeats, the suppressed count) and ends the run. [`admit`](Self::admit) does
    /// the same for such an event; this is for events whose fields are not a map yet.
    pub fn pass(&mut self, out: &mut Vec<Held>) {
        self.flush_run(out);
        self.run = None;
        self.flush_suppressed(out);
    }

    /// Whether anything is held or a run is open (the writer then ticks to call `expire`).
    pub fn is_holding(&self) -> bool {
        self.run.is_some() || self.suppressed.is_some()
    }

    /// Emits the run's repeats (if any) and resets its count; the run itself stays open.
    fn flush_run(&mut self, out: &mut Vec<Held>) {
        let Some(run) = &mut self.run else {
            return;
        };
        if run.repeats == 0 {
            return;
        }
        let mut fields = run.fields.clone();
        if run.repeats > 1 {
            fields.insert(FIELD_COUNT.into(), Value::from(run.repeats));
            fields.insert(FIELD_FIRST_TIME.into(), Value::from(run.first_time.clone()));
            fields.insert(FIELD_LAST_TIME.into(), Value::from(run.last_time.clone()));
        }
        out.push(Held {
            kind: run.kind.clone(),
            fields,
            time: std::mem::take(&mut run.last_time),
        });
        run.repeats = 0;
    }

    fn flush_suppressed(&mut self, out: &mut Vec<Held>) {
        let Some(s) = self.suppressed.take() else {
            return;
        };
        let mut fields = Map::new();
        fields.insert(FIELD_COUNT.into(), Value::from(s.count));
        fields.insert(FIELD_FIRST_TIME.into(), Value::from(s.first_time));
        fields.insert(FIELD_LAST_TIME.into(), Value::from(s.last_time.clone()));
        let types = s
            .types
            .into_iter()
            .map(|(k, n)| (k, Value::from(n)))
            .collect();
        fields.insert(FIELD_TYPES.into(), Value::Object(types));
        out.push(Held {
            kind: kind::EVENTS_SUPPRESSED.into(),
            fields,
            time: s.last_time,
        });
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * RATE).min(BURST);
        self.refilled = now;
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn denied_dns(name: &str) -> Map<String, Value> {
        json!({ "name": name, "qtype": "A", "access": "denied" })
            .as_object()
            .cloned()
            .unwrap()
    }

    fn allowed_request(host: &str) -> Map<String, Value> {
        json!({ "host": host, "port": 443, "access": "allowed" })
            .as_object()
            .cloned()
            .unwrap()
    }

    /// Admits `(kind, fields)` at `t0 + ms` and returns what was emitted, as (kind, count).
    fn admit(
        c: &mut Coalescer,
        t0: Instant,
        ms: u64,
        kind: &str,
        fields: Map<String, Value>,
    ) -> Vec<(String, Option<u64>)> {
        let mut out = Vec::new();
        let time = format!("t{ms}");
        c.admit(
            kind,
            fields,
            t0 + Duration::from_millis(ms),
            &time,
            &mut out,
        );
        summarize(out)
    }

    fn summarize(out: Vec<Held>) -> Vec<(String, Option<u64>)> {
        out.into_iter()
            .map(|h| (h.kind, h.fields.get(FIELD_COUNT).and_then(Value::as_u64)))
            .collect()
    }

    fn one(kind: &str, count: Option<u64>) -> Vec<(String, Option<u64>)> {
        vec![(kind.to_owned(), count)]
    }

    #[test]
    fn what_counts_as_a_denial() {
        for (kind, fields, want) in [
            (kind::DNS_QUERY, json!({"access": "denied"}), true),
            (kind::EGRESS_REQUEST, json!({"access": "denied"}), true),
            (kind::EGRESS_REQUEST, json!({"access": "allowed"}), false),
            (kind::FS_DENIED, json!({"path": "/w/x"}), true),
            (kind::FS_ACCESS, json!({"path": "/w/x"}), false),
            (kind::CONFIG_APPLIED, json!({"access": "denied"}), false),
        ] {
            assert_eq!(
                is_denial(kind, fields.as_object().unwrap()),
                want,
                "{kind} {fields}"
            );
        }
    }

    #[test]
    fn identical_denials_become_the_first_then_one_counted_event() {
        let (mut c, t0) = (Coalescer::default(), Instant::now());
        assert_eq!(
            admit(&mut c, t0, 0, kind::DNS_QUERY, denied_dns("x")),
            one(kind::DNS_QUERY, None)
        );
        for ms in 1..=5 {
            assert_eq!(
                admit(&mut c, t0, ms, kind::DNS_QUERY, denied_dns("x")),
                vec![],
                "held"
            );
        }
        let mut out = Vec::new();
        c.admit(kind::CONFIG_APPLIED, Map::new(), t0, "t9", &mut out);
        assert_eq!(out.len(), 2, "{out:?}");
        assert_eq!(out[0].kind, kind::DNS_QUERY);
        assert_eq!(out[0].fields[FIELD_COUNT], json!(5));
        assert_eq!(out[0].fields[FIELD_FIRST_TIME], json!("t1"));
        assert_eq!(out[0].fields[FIELD_LAST_TIME], json!("t5"));
        assert_eq!(out[0].time, "t5");
        assert_eq!(out[0].fields["name"], json!("x"), "same fields");
        assert_eq!(
            out[1].kind,
            kind::CONFIG_APPLIED,
            "then the event that ended the run"
        );
    }

    #[test]
    fn a_single_repeat_is_emitted_as_itself() {
        let (mut c, t0) = (Coalescer::default(), Instant::now());
        admit(&mut c, t0, 0, kind::DNS_QUERY, denied_dns("x"));
        admit(&mut c, t0, 1, kind::DNS_QUERY, denied_dns("x"));
        let mut out = Vec::new();
        c.flush(&mut out);
        assert_eq!(
            out,
            vec![Held {
                kind: kind::DNS_QUERY.into(),
                fields: denied_dns("x"),
                time: "t1".into()
            }]
        );
    }

    #[test]
    fn a_denial_differing_in_any_field_is_not_a_repeat() {
        let (mut c, t0) = (Coalescer::default(), Instant::now());
        let mut other_type = denied_dns("x");
        other_type.insert("qtype".into(), json!("AAAA"));
        admit(&mut c, t0, 0, kind::DNS_QUERY, denied_dns("x"));
        assert_eq!(
            admit(&mut c, t0, 1, kind::DNS_QUERY, other_type),
            one(kind::DNS_QUERY, None)
        );
        assert_eq!(
            admit(&mut c, t0, 2, kind::DNS_QUERY, denied_dns("y")),
            one(kind::DNS_QUERY, None)
        );
        assert_eq!(
            admit(&mut c, t0, 3, kind::FS_DENIED, denied_dns("y")),
            one(kind::FS_DENIED, None)
        );
    }

    #[test]
    fn allowed_events_are_never_held() {
        let (mut c, t0) = (Coalescer::default(), Instant::now());
        for ms in 0..3 {
            let got = admit(
                &mut c,
                t0,
                ms,
                kind::EGRESS_REQUEST,
                allowed_request("a.example"),
            );
            assert_eq!(got, one(kind::EGRESS_REQUEST, None));
        }
    }

    #[test]
    fn a_long_run_is_summarized_once_per_window() {
        let (mut c, t0) = (Coalescer::default(), Instant::now());
        admit(&mut c, t0, 0, kind::DNS_QUERY, denied_dns("x"));
        for ms in 1..=10 {
            admit(&mut c, t0, ms, kind::DNS_QUERY, denied_dns("x"));
        }
        let mut out = Vec::new();
        c.expire(t0 + WINDOW / 2, &mut out);
        assert!(out.is_empty(), "not yet");
        c.expire(t0 + WINDOW, &mut out);
        assert_eq!(summarize(out), one(kind::DNS_QUERY, Some(10)));
        // The run goes on in the next window; a quiet window then closes it.
        admit(&mut c, t0, 1001, kind::DNS_QUERY, denied_dns("x"));
        admit(&mut c, t0, 1002, kind::DNS_QUERY, denied_dns("x"));
        let mut out = Vec::new();
        c.expire(t0 + WINDOW * 2, &mut out);
        assert_eq!(summarize(out), one(kind::DNS_QUERY, Some(2)));
        let mut out = Vec::new();
        c.expire(t0 + WINDOW * 3, &mut out);
        assert!(out.is_empty() && !c.is_holding());
    }

    #[test]
    fn distinct_denials_beyond_the_budget_are_counted_in_one_event() {
        let (mut c, t0) = (Coalescer::default(), Instant::now());
        let mut emitted = 0;
        let flood = BURST as u64 + 500;
        for i in 0..flood {
            emitted += admit(
                &mut c,
                t0,
                0,
                kind::DNS_QUERY,
                denied_dns(&format!("{i}.x")),
            )
            .len();
        }
        assert_eq!(emitted, BURST as usize, "the burst is emitted one by one");
        let mut out = Vec::new();
        c.admit(
            kind::EGRESS_REQUEST,
            allowed_request("a"),
            t0,
            "t",
            &mut out,
        );
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].kind, kind::EVENTS_SUPPRESSED);
        assert_eq!(out[0].fields[FIELD_COUNT], json!(500));
        assert_eq!(out[0].fields[FIELD_TYPES], json!({ "dns.query": 500 }));
        assert_eq!(
            out[1].kind,
            kind::EGRESS_REQUEST,
            "the allowed request is never held"
        );
        // Tokens come back with time.
        let later = admit(&mut c, t0, 1000, kind::DNS_QUERY, denied_dns("new.x"));
        assert_eq!(later, one(kind::DNS_QUERY, None));
    }
}
