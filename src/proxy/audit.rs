//! The proxy's audit events (docs/audit-log.md): field names in one place, `egress.request` at decision time
//! and `egress.response` when an allowed exchange ends.
//!
//! 1. [`Auditor::request`] emits `egress.request` for every decision and, for allowed ones,
//!    returns an [`Exchange`] that remembers the event id and the start time.
//! 2. The exchange's byte counters are shared with the counting bodies ([`CountingBody`]) and
//!    tunnels; when the last holder drops the [`Exchange`] (response body finished or abandoned,
//!    tunnel closed), `egress.response` is emitted exactly once.
//!
//! # Security
//! Only header *names* are recorded; query strings are cut from paths before they get here.

use std::pin::Pin;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use serde::ser::SerializeMap;
use serde_json::Map;

use crate::attribution::{self, Origin};
use crate::events::{kind, EgressTotals, Entries, EventBus, TypedFields};
use crate::policy::{Access, Decision, Scheme};

use super::deny::UpstreamFailure;
use super::Via;

/// Field names of `egress.request` and `egress.response` (camelCase, as JS sees them).
pub mod field {
    pub const HOST: &str = "host";
    pub const PORT: &str = "port";
    pub const METHOD: &str = "method";
    pub const PATH: &str = "path";
    pub const SCHEME: &str = "scheme";
    pub const ACCESS: &str = "access";
    pub const RULE: &str = "rule";
    pub const REASON: &str = "reason";
    pub const VIA: &str = "via";
    pub const INJECTED_HEADERS: &str = "injectedHeaders";
    pub const REQUEST_ID: &str = "requestId";
    pub const STATUS: &str = "status";
    pub const BYTES_IN: &str = "bytesIn";
    pub const BYTES_OUT: &str = "bytesOut";
    pub const DURATION_MS: &str = "durationMs";
    pub const CONFIG_HASH: &str = "configHash";
    pub const WOULD_DENY: &str = "wouldDeny";
    pub const CAUSE: &str = "cause";
    pub const DETAIL: &str = "detail";
    /// Only on passed-through TLS connections: `"passthrough"`.
    pub const TLS: &str = "tls";
}

/// What one decision was about, for its `egress.request` event.
#[derive(Debug, Clone)]
pub struct Subject<'a> {
    pub host: &'a str,
    pub port: u16,
    pub method: &'a str,
    /// Path without the query string.
    pub path: &'a str,
    pub scheme: Scheme,
    pub via: Via,
    /// The process inside that sent it ([`crate::attribution`]), when known.
    pub origin: Option<Arc<Origin>>,
    /// The content hash of the config decided under (`configHash`).
    pub config_hash: Option<Arc<str>>,
}

/// Emits the proxy's events into a sandbox's bus.
#[derive(Clone)]
pub struct Auditor {
    events: Arc<EventBus>,
}

impl Auditor {
    pub fn new(events: Arc<EventBus>) -> Self {
        Auditor { events }
    }

    /// Emits `egress.request`; for an allowed decision returns the exchange to finish later.
    pub fn request(
        &self,
        subject: &Subject<'_>,
        decision: &Decision,
        injected: &[http::HeaderName],
    ) -> Option<Exchange> {
        tracing::debug!(
            host = subject.host,
            port = subject.port,
            method = subject.method,
            access = decision.access.as_str(),
            reason = decision.reason,
            via = subject.via.as_str(),
            "egress decision"
        );
        let request_id = self.events.emit_typed(&RequestFields {
            subject,
            decision,
            injected,
        });
        (decision.access == Access::Allowed).then(|| Exchange {
            inner: Arc::new(ExchangeInner {
                events: self.events.clone(),
                request_id,
                origin: subject.origin.clone(),
                start: Instant::now(),
                status: AtomicU16::new(0),
                bytes_in: AtomicU64::new(0),
                bytes_out: AtomicU64::new(0),
            }),
        })
    }
}

/// An allowed exchange in flight; `egress.response` is emitted when the last clone drops.
#[derive(Clone)]
pub struct Exchange {
    inner: Arc<ExchangeInner>,
}

struct ExchangeInner {
    events: Arc<EventBus>,
    request_id: String,
    origin: Option<Arc<Origin>>,
    start: Instant,
    status: AtomicU16,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
}

impl Exchange {
    /// An exchange for the `egress.request` event `request_id` emitted just now (for events built
    /// outside [`Auditor::request`], such as a passed-through TLS connection's).
    pub fn started(
        events: Arc<EventBus>,
        request_id: String,
        origin: Option<Arc<Origin>>,
    ) -> Exchange {
        Exchange {
            inner: Arc::new(ExchangeInner {
                events,
                request_id,
                origin,
                start: Instant::now(),
                status: AtomicU16::new(0),
                bytes_in: AtomicU64::new(0),
                bytes_out: AtomicU64::new(0),
            }),
        }
    }

    /// Records the status answered to the sandbox.
    pub fn set_status(&self, status: u16) {
        self.inner.status.store(status, Ordering::Relaxed);
    }

    /// Adds bytes received from the upstream.
    pub fn add_in(&self, n: u64) {
        self.inner.bytes_in.fetch_add(n, Ordering::Relaxed);
    }

    /// Adds bytes sent to the upstream.
    pub fn add_out(&self, n: u64) {
        self.inner.bytes_out.fetch_add(n, Ordering::Relaxed);
    }

    /// Records an upstream failure: the status answered (`502`/`504`) and an `egress.error` event
    /// `{ requestId, host, port, cause, detail }` (docs/audit-log.md). `detail` is error text from
    /// the connector or resolver, never request content.
    pub fn fail(&self, failure: UpstreamFailure, host: &str, port: u16, detail: &str) {
        self.set_status(failure.status().as_u16());
        let mut f = Map::new();
        f.insert(
            field::REQUEST_ID.into(),
            self.inner.request_id.clone().into(),
        );
        f.insert(field::HOST.into(), host.into());
        f.insert(field::PORT.into(), port.into());
        f.insert(field::CAUSE.into(), failure.cause().into());
        let detail: String = detail.chars().take(MAX_DETAIL_CHARS).collect();
        tracing::debug!(host, port, cause = failure.cause(), %detail, "upstream failure");
        f.insert(field::DETAIL.into(), detail.into());
        if let Some(origin) = &self.inner.origin {
            origin.insert_fields(&mut f);
        }
        self.inner.events.emit(kind::EGRESS_ERROR, f);
    }
}

/// Longest `detail` of an `egress.error` event.
const MAX_DETAIL_CHARS: usize = 300;

/// The messages of an error and its sources, joined by `": "` (for `egress.error` details).
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur = Some(err);
    while let Some(e) = cur {
        let text = e.to_string();
        if !parts.iter().any(|p| p == &text) {
            parts.push(text);
        }
        cur = e.source();
    }
    parts.join(": ")
}

impl Drop for ExchangeInner {
    fn drop(&mut self) {
        let ms = self.start.elapsed().as_secs_f64() * 1000.0;
        self.events.emit_typed(&ResponseFields {
            request_id: &self.request_id,
            origin: self.origin.as_deref(),
            status: self.status.load(Ordering::Relaxed),
            bytes_in: self.bytes_in.load(Ordering::Relaxed),
            bytes_out: self.bytes_out.load(Ordering::Relaxed),
            duration_ms: (ms * 1000.0).round() / 1000.0,
        });
    }
}

/// `egress.request`'s fields, written straight into the log line (see [`TypedFields`]).
struct RequestFields<'a> {
    subject: &'a Subject<'a>,
    decision: &'a Decision,
    injected: &'a [http::HeaderName],
}

impl TypedFields for RequestFields<'_> {
    const KIND: &'static str = kind::EGRESS_REQUEST;

    fn write<M: SerializeMap>(&self, e: &mut Entries<'_, M>) -> Result<(), M::Error> {
        let (subject, decision) = (self.subject, self.decision);
        let origin = subject.origin.as_deref();
        e.entry(field::ACCESS, decision.access.as_str())?;
        if let Some(origin) = origin {
            e.entry(attribution::field::COMMAND, &origin.command)?;
        }
        if let Some(hash) = &subject.config_hash {
            e.entry(field::CONFIG_HASH, &**hash)?;
        }
        if let Some(id) = origin.and_then(|o| o.exec_id.as_deref()) {
            e.entry(attribution::field::EXEC_ID, id)?;
        }
        e.entry(field::HOST, subject.host)?;
        e.entry(field::INJECTED_HEADERS, &HeaderNames(self.injected))?;
        e.entry(field::METHOD, subject.method)?;
        e.entry(field::PATH, strip_query(subject.path))?;
        if let Some(origin) = origin {
            e.entry(attribution::field::PID, &origin.pid)?;
        }
        e.entry(field::PORT, &subject.port)?;
        e.entry(field::REASON, decision.reason)?;
        e.entry(field::RULE, &decision.rule)?;
        e.entry(field::SCHEME, subject.scheme.as_str())?;
        e.entry(field::VIA, subject.via.as_str())?;
        if decision.would_deny {
            e.entry(field::WOULD_DENY, &true)?;
        }
        Ok(())
    }

    fn is_denial(&self) -> bool {
        self.decision.access == Access::Denied
    }

    fn count(&self, totals: &mut EgressTotals) {
        totals.count_request(self.is_denial());
    }
}

/// Header names as a JSON array of strings.
struct HeaderNames<'a>(&'a [http::HeaderName]);

impl serde::Serialize for HeaderNames<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter().map(http::HeaderName::as_str))
    }
}

/// `egress.response`'s fields, written straight into the log line (see [`TypedFields`]).
struct ResponseFields<'a> {
    request_id: &'a str,
    origin: Option<&'a Origin>,
    status: u16,
    bytes_in: u64,
    bytes_out: u64,
    duration_ms: f64,
}

impl TypedFields for ResponseFields<'_> {
    const KIND: &'static str = kind::EGRESS_RESPONSE;

    fn write<M: SerializeMap>(&self, e: &mut Entries<'_, M>) -> Result<(), M::Error> {
        e.entry(field::BYTES_IN, &self.bytes_in)?;
        e.entry(field::BYTES_OUT, &self.bytes_out)?;
        if let Some(origin) = self.origin {
            e.entry(attribution::field::COMMAND, &origin.command)?;
        }
        // As a JSON number, like `Value::from(f64)` (`null` if not finite).
        e.entry(field::DURATION_MS, &self.duration_ms)?;
        if let Some(id) = self.origin.and_then(|o| o.exec_id.as_deref()) {
            e.entry(attribution::field::EXEC_ID, id)?;
        }
        if let Some(origin) = self.origin {
            e.entry(attribution::field::PID, &origin.pid)?;
        }
        e.entry(field::REQUEST_ID, self.request_id)?;
        e.entry(field::STATUS, &self.status)
    }

    fn is_denial(&self) -> bool {
        false
    }

    fn count(&self, totals: &mut EgressTotals) {
        totals.count_response(self.bytes_in, self.bytes_out);
    }
}

/// Which way a [`CountingBody`] counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Sandbox -> upstream (`bytesOut`).
    Out,
    /// Upstream -> sandbox (`bytesIn`).
    In,
}

/// A body that streams through unchanged, adding its data bytes to an [`Exchange`] and holding
/// the exchange open until the body is finished or dropped.
pub struct CountingBody<B> {
    inner: B,
    exchange: Option<Exchange>,
    direction: Direction,
}

impl<B> CountingBody<B> {
    pub fn new(inner: B, exchange: Option<Exchange>, direction: Direction) -> Self {
        CountingBody {
            inner,
            exchange,
            direction,
        }
    }
}

impl<B> Body for CountingBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(data), Some(ex)) = (frame.data_ref(), &this.exchange) {
                    let n = data.len() as u64;
                    match this.direction {
                        Direction::In => ex.add_in(n),
                        Direction::Out => ex.add_out(n),
                    }
                }
            }
            // Finished (or failed): release the exchange so the response event goes out now.
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => this.exchange = None,
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The path without its query string (queries may carry tokens, so events never record them).
pub fn strip_query(path: &str) -> &str {
    path.split_once('?').map_or(path, |(p, _)| p)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::events::{typed_line, typed_to_map, Event, Since};
    use crate::policy::reason;

    fn origin(exec_id: Option<&str>) -> Arc<Origin> {
        Arc::new(Origin {
            pid: 7,
            command: vec!["curl".into(), "-s".into(), "say \"hi\"\n".into()],
            exec_id: exec_id.map(Arc::from),
        })
    }

    /// The line a typed event writes is byte for byte the line its map would write, for every
    /// combination of optional fields (so the key order and the header merge are right).
    #[test]
    fn typed_events_write_the_lines_their_maps_would() {
        let line_of_map = |kind: &str, fields: Map<String, serde_json::Value>| {
            Event {
                id: "0000000000000042".into(),
                kind: kind.into(),
                time: "2026-12-02T23:00:00.000Z".into(),
                sandbox: "sb".into(),
                fields: fields.into(),
            }
            .to_line()
        };
        let injected = [
            http::HeaderName::from_static("authorization"),
            http::HeaderName::from_static("x-key"),
        ];
        let origins = [None, Some(origin(None)), Some(origin(Some("exec-1")))];
        let decisions = [
            Decision {
                access: Access::Allowed,
                rule: Some(3),
                reason: reason::RULE,
                would_deny: false,
            },
            Decision {
                access: Access::Allowed,
                rule: None,
                reason: reason::NO_RULE,
                would_deny: true,
            },
            Decision {
                access: Access::Denied,
                rule: Some(0),
                reason: reason::RULE,
                would_deny: false,
            },
        ];
        for origin in &origins {
            for hash in [None, Some(Arc::from("c0ffee"))] {
                for decision in &decisions {
                    for injected in [&injected[..], &[]] {
                        let subject = Subject {
                            host: "api.example.com",
                            port: 443,
                            method: "GET",
                            path: "/a/\"b\"?token=secret",
                            scheme: Scheme::Https,
                            via: Via::Proxy,
                            origin: origin.clone(),
                            config_hash: hash.clone(),
                        };
                        let fields = RequestFields {
                            subject: &subject,
                            decision,
                            injected,
                        };
                        let line = typed_line(
                            &fields,
                            "0000000000000042",
                            "sb",
                            "2026-12-02T23:00:00.000Z",
                        );
                        let want = line_of_map(kind::EGRESS_REQUEST, typed_to_map(&fields));
                        assert_eq!(
                            line.as_deref(),
                            Some(&want[..]),
                            "{}",
                            String::from_utf8_lossy(&want)
                        );
                        assert!(
                            !String::from_utf8_lossy(&want).contains("secret"),
                            "no query string"
                        );
                    }
                }
            }
            for duration_ms in [0.0, 1.5, 12.345, 1e-3, f64::NAN] {
                let fields = ResponseFields {
                    request_id: "0000000000000041",
                    origin: origin.as_deref(),
                    status: 200,
                    bytes_in: 1 << 40,
                    bytes_out: 0,
                    duration_ms,
                };
                let line = typed_line(
                    &fields,
                    "0000000000000042",
                    "sb",
                    "2026-12-02T23:00:00.000Z",
                );
                let want = line_of_map(kind::EGRESS_RESPONSE, typed_to_map(&fields));
                assert_eq!(
                    line.as_deref(),
                    Some(&want[..]),
                    "{}",
                    String::from_utf8_lossy(&want)
                );
            }
        }
    }

    /// What the typed fields say, as docs/audit-log.md lists them.
    #[test]
    fn typed_request_fields_are_the_documented_ones() {
        let subject = Subject {
            host: "api.example.com",
            port: 443,
            method: "POST",
            path: "/v1/x?key=1",
            scheme: Scheme::Https,
            via: Via::Transparent,
            origin: Some(origin(Some("exec-1"))),
            config_hash: Some(Arc::from("c0ffee")),
        };
        let decision = Decision {
            access: Access::Allowed,
            rule: Some(2),
            reason: reason::RULE,
            would_deny: true,
        };
        let injected = [http::HeaderName::from_static("x-key")];
        let fields = RequestFields {
            subject: &subject,
            decision: &decision,
            injected: &injected,
        };
        assert_eq!(
            serde_json::Value::Object(typed_to_map(&fields)),
            json!({
                "access": "allowed", "command": ["curl", "-s", "say \"hi\"\n"], "configHash": "c0ffee",
                "execId": "exec-1", "host": "api.example.com", "injectedHeaders": ["x-key"],
                "method": "POST", "path": "/v1/x", "pid": 7, "port": 443, "reason": "rule", "rule": 2,
                "scheme": "https", "via": "transparent", "wouldDeny": true,
            })
        );
    }

    /// Without a subscriber the typed line goes to the log as is; a replay reads back the event
    /// a subscriber would have seen live, and the totals count it.
    #[tokio::test]
    async fn a_typed_event_without_subscribers_replays_like_a_live_one() {
        let dir = tempfile::tempdir().unwrap();
        let bus = EventBus::open("sb", dir.path()).unwrap();
        let subject = Subject {
            host: "h.test",
            port: 80,
            method: "GET",
            path: "/",
            scheme: Scheme::Http,
            via: Via::Proxy,
            origin: Some(origin(None)),
            config_hash: None,
        };
        let decision = Decision {
            access: Access::Allowed,
            rule: Some(0),
            reason: reason::RULE,
            would_deny: false,
        };
        let exchange = Auditor::new(bus.clone())
            .request(&subject, &decision, &[])
            .unwrap();
        exchange.set_status(204);
        exchange.add_in(5);
        exchange.add_out(3);
        drop(exchange);
        let live = bus.subscribe(Since::Now, 10).unwrap();
        Auditor::new(bus.clone())
            .request(&subject, &decision, &[])
            .unwrap();
        let live = live.next().await.unwrap();

        let replay = bus.subscribe(Since::Start, 10).unwrap();
        let request = replay.next().await.unwrap();
        let response = replay.next().await.unwrap();
        assert_eq!(request.kind, kind::EGRESS_REQUEST);
        assert_eq!(
            request.fields, live.fields,
            "the same fields as a live event"
        );
        assert_eq!(response.kind, kind::EGRESS_RESPONSE);
        assert_eq!(response.fields[field::REQUEST_ID], json!(request.id));
        assert_eq!(response.fields[field::STATUS], json!(204));
        assert_eq!(
            (
                response.fields[field::BYTES_IN].clone(),
                response.fields[field::BYTES_OUT].clone()
            ),
            (json!(5), json!(3))
        );
        let totals = bus.egress_totals();
        assert_eq!(
            (
                totals.requests,
                totals.denied,
                totals.bytes_in,
                totals.bytes_out
            ),
            (2, 0, 5, 3)
        );
    }

    #[test]
    fn strip_query_cases() {
        let cases = [
            ("/", "/"),
            ("/zen", "/zen"),
            ("/search?q=secret", "/search"),
            ("/a?b?c", "/a"),
            ("", ""),
        ];
        for (input, want) in cases {
            assert_eq!(strip_query(input), want, "{input}");
        }
    }
}
