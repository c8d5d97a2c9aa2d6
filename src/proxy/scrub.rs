//! Response scrubbing (docs/secrets.md#response-scrubbing): a response to a request that carried
//! a secret (injected by an override, or substituted for a placeholder) is delivered with every
//! occurrence of a secret value replaced, in its headers and its body.
//!
//! How a response is handled:
//! 1. Header values are scrubbed in place.
//! 2. A body in `gzip`, `deflate`, `br` or `zstd` is decoded as it streams ([`Decoder`]) and
//!    delivered decoded: `Content-Encoding` is removed. Any other coding cannot be scanned, so the
//!    response is refused with `502`.
//! 3. `Content-Length` is removed (a replacement may differ in length; the body is then chunked)
//!    and the body is scrubbed chunk by chunk with a bounded carry-over ([`Scrubber`]).
//! 4. When the body ends (or is dropped), one `secret.scrubbed` event per secret found records the
//!    host and how many occurrences were replaced.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http_body::{Body, Frame, SizeHint};
use serde_json::{json, Map};

use crate::events::{kind, EventBus};
use crate::secrets::scrub::{Patterns, Scrubber};
use crate::secrets::{Decoder, Encoding};

use super::deny::BoxError;

/// The codings a scrubbed request may ask for: those [`Decoder`] reads.
const DECODABLE: [&str; 5] = ["gzip", "x-gzip", "deflate", "br", "zstd"];

/// Narrows the request's `Accept-Encoding` to codings the scrubber can decode, so the response
/// can be scanned.
pub fn limit_accept_encoding(headers: &mut http::HeaderMap) {
    let Some(value) = headers.get(header::ACCEPT_ENCODING) else {
        return;
    };
    let narrowed = HeaderValue::from_str(&decodable_codings(value.as_bytes()))
        .unwrap_or(HeaderValue::from_static("identity"));
    headers.insert(header::ACCEPT_ENCODING, narrowed);
}

/// An `Accept-Encoding` value narrowed to the codings [`Decoder`] reads (with their weights), or
/// `identity` when none is left.
pub fn decodable_codings(value: &[u8]) -> String {
    let kept: Vec<&str> = std::str::from_utf8(value)
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|c| {
            let name = c.split(';').next().unwrap_or("").trim();
            c.bytes().all(|b| b == b'\t' || (0x20..0x7f).contains(&b))
                && (DECODABLE.iter().any(|d| d.eq_ignore_ascii_case(name))
                    || name.eq_ignore_ascii_case("identity"))
        })
        .collect();
    if kept.is_empty() {
        "identity".to_owned()
    } else {
        kept.join(", ")
    }
}

/// The coding of a response body from all its `Content-Encoding` values: `Err` when it is one
/// the scrubber cannot decode, or codings are stacked (in one value or over several).
pub fn body_encoding<'a>(
    mut values: impl Iterator<Item = &'a [u8]>,
) -> Result<Option<Encoding>, ()> {
    let first = Encoding::parse(values.next()).map_err(|_| ())?;
    match values.next() {
        None => Ok(first),
        // A second line: stacked codings, unless every line names none.
        Some(value) => match (first, Encoding::parse(Some(value))) {
            (None, Ok(None)) => body_encoding(values),
            _ => Err(()),
        },
    }
}

/// Where the `secret.scrubbed` events of one response go.
pub struct Report {
    pub events: Arc<EventBus>,
    pub host: String,
}

/// Scrubs the response head and wraps its body; `Err(())` when the body's coding cannot be
/// decoded (answer `502`). `body_follows`: false for a `HEAD` request or a status without body.
pub fn response<B>(
    parts: &mut http::response::Parts,
    body: B,
    patterns: Arc<Patterns>,
    report: Report,
    body_follows: bool,
) -> Result<Scrubbed<B>, ()> {
    let mut counts = vec![0u64; patterns.len()];
    for value in parts.headers.values_mut() {
        if patterns.is_match(value.as_bytes()) {
            let new = patterns.replace_all(value.as_bytes(), &mut counts);
            *value = HeaderValue::from_bytes(&new).unwrap_or(HeaderValue::from_static(""));
        }
    }
    let encoding = if body_follows {
        let values = parts.headers.get_all(header::CONTENT_ENCODING);
        let encoding = body_encoding(values.iter().map(HeaderValue::as_bytes))?;
        parts.headers.remove(header::CONTENT_ENCODING);
        parts.headers.remove(header::CONTENT_LENGTH);
        encoding
    } else {
        None
    };
    Ok(Scrubbed {
        inner: body,
        scan: Scan::new(patterns, &counts, encoding, report)?,
        trailers: None,
        done: false,
    })
}

/// The scan of one response body: decoded (if needed) and scrubbed as it streams; the
/// `secret.scrubbed` events go out when it ends, or when it is dropped before.
pub struct Scan {
    scrubber: Scrubber,
    decoder: Option<Decoder>,
    report: Option<Report>,
}

impl Scan {
    /// A scan of a body in `encoding`, counting what the head's scrubbing found (`counts`, one
    /// slot per pattern); `Err(())` when the decoder cannot start.
    pub fn new(
        patterns: Arc<Patterns>,
        counts: &[u64],
        encoding: Option<Encoding>,
        report: Report,
    ) -> Result<Scan, ()> {
        let mut scrubber = Scrubber::new(patterns);
        scrubber.add_counts(counts);
        let decoder = match encoding {
            Some(e) => Some(Decoder::new(e).map_err(|_| ())?),
            None => None,
        };
        Ok(Scan {
            scrubber,
            decoder,
            report: Some(report),
        })
    }

    /// Decodes (if needed) and scrubs one chunk of the upstream's body into `out`.
    pub fn feed(&mut self, data: &[u8], out: &mut Vec<u8>) -> std::io::Result<()> {
        let scrubber = &mut self.scrubber;
        match &mut self.decoder {
            Some(d) => d.push(data, &mut |plain| scrubber.push(plain, out)),
            None => {
                scrubber.push(data, out);
                Ok(())
            }
        }
    }

    /// Ends the body: flushes the decoder and the carry into `out`, and reports. A decoding
    /// error is returned after the report (the sandbox must see a truncated response, never
    /// unscanned bytes).
    pub fn end(&mut self, out: &mut Vec<u8>) -> std::io::Result<()> {
        let scrubber = &mut self.scrubber;
        let ended = match &mut self.decoder {
            Some(d) => d.finish(&mut |plain| scrubber.push(plain, out)),
            None => Ok(()),
        };
        if ended.is_ok() {
            scrubber.finish(out);
        }
        self.report();
        ended
    }

    /// Emits the `secret.scrubbed` events, once.
    pub fn report(&mut self) {
        let Some(report) = self.report.take() else {
            return;
        };
        for (secret, count) in self.scrubber.found() {
            let mut fields = Map::new();
            fields.insert("secret".into(), json!(&*secret));
            fields.insert("host".into(), json!(report.host));
            fields.insert("count".into(), json!(count));
            report.events.emit(kind::SECRET_SCRUBBED, fields);
        }
    }
}

impl Drop for Scan {
    fn drop(&mut self) {
        self.report();
    }
}

/// A response body being scrubbed.
pub struct Scrubbed<B> {
    inner: B,
    scan: Scan,
    trailers: Option<http::HeaderMap>,
    done: bool,
}

impl<B> Body for Scrubbed<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            if this.done {
                if let Some(trailers) = this.trailers.take() {
                    return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                }
                return Poll::Ready(None);
            }
            let mut out = Vec::new();
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Err(e))) => {
                    this.done = true;
                    this.scan.report();
                    return Poll::Ready(Some(Err(e.into())));
                }
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        if let Err(e) = this.scan.feed(&data, &mut out) {
                            this.done = true;
                            this.scan.report();
                            return Poll::Ready(Some(Err(Box::new(e))));
                        }
                    }
                    Err(frame) => {
                        // Trailers end the body: flush first, send them after.
                        this.trailers = frame.into_trailers().ok();
                        if let Err(e) = this.finish_into(&mut out) {
                            this.trailers = None;
                            return Poll::Ready(Some(Err(e)));
                        }
                    }
                },
                Poll::Ready(None) => {
                    if let Err(e) = this.finish_into(&mut out) {
                        return Poll::Ready(Some(Err(e)));
                    }
                }
            }
            if !out.is_empty() {
                return Poll::Ready(Some(Ok(Frame::data(Bytes::from(out)))));
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::new()
    }
}

impl<B> Scrubbed<B> {
    /// Ends the body: flushes, reports, and marks it done. A decoding error becomes the body's
    /// error (the sandbox sees a truncated response, never unscanned bytes).
    fn finish_into(&mut self, out: &mut Vec<u8>) -> Result<(), BoxError> {
        self.done = true;
        self.scan.end(out).map_err(|e| Box::new(e) as BoxError)
    }
}
