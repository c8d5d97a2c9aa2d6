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
use serde_json::{Map, Value};

use crate::attribution::Origin;
use crate::events::{kind, EventBus};
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
        let mut f = Map::new();
        f.insert(field::HOST.into(), subject.host.into());
        f.insert(field::PORT.into(), subject.port.into());
        f.insert(field::METHOD.into(), subject.method.into());
        f.insert(field::PATH.into(), strip_query(subject.path).into());
        f.insert(field::SCHEME.into(), subject.scheme.as_str().into());
        f.insert(field::ACCESS.into(), decision.access.as_str().into());
        f.insert(
            field::RULE.into(),
            decision.rule.map_or(Value::Null, |r| r.into()),
        );
        f.insert(field::REASON.into(), decision.reason.into());
        if decision.would_deny {
            f.insert(field::WOULD_DENY.into(), true.into());
        }
        f.insert(field::VIA.into(), subject.via.as_str().into());
        if let Some(hash) = &subject.config_hash {
            f.insert(field::CONFIG_HASH.into(), hash.to_string().into());
        }
        if let Some(origin) = &subject.origin {
            origin.insert_fields(&mut f);
        }
        let names = injected
            .iter()
            .map(|n| Value::from(n.as_str()))
            .collect::<Vec<_>>();
        f.insert(field::INJECTED_HEADERS.into(), Value::Array(names));
        tracing::debug!(
            host = subject.host,
            port = subject.port,
            method = subject.method,
            access = decision.access.as_str(),
            reason = decision.reason,
            via = subject.via.as_str(),
            "egress decision"
        );
        let event = self.events.emit(kind::EGRESS_REQUEST, f);
        (decision.access == Access::Allowed).then(|| Exchange {
            inner: Arc::new(ExchangeInner {
                events: self.events.clone(),
                request_id: event.id,
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
        let mut f = Map::new();
        f.insert(field::REQUEST_ID.into(), self.request_id.clone().into());
        if let Some(origin) = &self.origin {
            origin.insert_fields(&mut f);
        }
        f.insert(
            field::STATUS.into(),
            self.status.load(Ordering::Relaxed).into(),
        );
        f.insert(
            field::BYTES_IN.into(),
            self.bytes_in.load(Ordering::Relaxed).into(),
        );
        f.insert(
            field::BYTES_OUT.into(),
            self.bytes_out.load(Ordering::Relaxed).into(),
        );
        let ms = self.start.elapsed().as_secs_f64() * 1000.0;
        f.insert(
            field::DURATION_MS.into(),
            ((ms * 1000.0).round() / 1000.0).into(),
        );
        self.events.emit(kind::EGRESS_RESPONSE, f);
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
    use super::*;

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
