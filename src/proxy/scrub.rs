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
    let kept: Vec<String> = String::from_utf8_lossy(value.as_bytes())
        .split(',')
        .map(str::trim)
        .filter(|c| {
            let name = c
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase();
            DECODABLE.contains(&name.as_str()) || name == "identity"
        })
        .map(str::to_string)
        .collect();
    match HeaderValue::from_str(&kept.join(", ")) {
        Ok(v) if !kept.is_empty() => {
            headers.insert(header::ACCEPT_ENCODING, v);
        }
        _ => {
            headers.insert(
                header::ACCEPT_ENCODING,
                HeaderValue::from_static("identity"),
            );
        }
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
    let mut scrubber = Scrubber::new(patterns);
    scrubber.add_counts(&counts);
    let decoder = if body_follows {
        let encoding = Encoding::parse(
            parts
                .headers
                .get(header::CONTENT_ENCODING)
                .map(|v| v.as_bytes()),
        )
        .map_err(|_| ())?;
        parts.headers.remove(header::CONTENT_ENCODING);
        parts.headers.remove(header::CONTENT_LENGTH);
        match encoding {
            Some(e) => Some(Decoder::new(e).map_err(|_| ())?),
            None => None,
        }
    } else {
        None
    };
    Ok(Scrubbed {
        inner: body,
        scrubber,
        decoder,
        report: Some(report),
        trailers: None,
        done: false,
    })
}

/// A response body being scrubbed.
pub struct Scrubbed<B> {
    inner: B,
    scrubber: Scrubber,
    decoder: Option<Decoder>,
    report: Option<Report>,
    trailers: Option<http::HeaderMap>,
    done: bool,
}

impl<B> Scrubbed<B> {
    /// Emits the `secret.scrubbed` events, once.
    fn report(&mut self) {
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

    /// Decodes (if needed) and scrubs one chunk of the upstream's body.
    fn feed(&mut self, data: &[u8], out: &mut Vec<u8>) -> std::io::Result<()> {
        let scrubber = &mut self.scrubber;
        match &mut self.decoder {
            Some(d) => d.push(data, &mut |plain| scrubber.push(plain, out)),
            None => {
                scrubber.push(data, out);
                Ok(())
            }
        }
    }

    /// Flushes the decoder and the carry at the end of the body.
    fn end(&mut self, out: &mut Vec<u8>) -> std::io::Result<()> {
        let scrubber = &mut self.scrubber;
        if let Some(d) = &mut self.decoder {
            d.finish(&mut |plain| scrubber.push(plain, out))?;
        }
        scrubber.finish(out);
        Ok(())
    }
}

impl<B> Drop for Scrubbed<B> {
    fn drop(&mut self) {
        self.report();
    }
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
                    this.report();
                    return Poll::Ready(Some(Err(e.into())));
                }
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        if let Err(e) = this.feed(&data, &mut out) {
                            this.done = true;
                            this.report();
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
        let ended = self.end(out);
        self.report();
        ended.map_err(|e| Box::new(e) as BoxError)
    }
}
