//! Sending a request again when the upstream refused it unprocessed (hyper's path).
//!
//! An HTTP/2 upstream may stop taking streams at any time: a server closing a connection after so
//! many requests (nginx's `keepalive_requests`), restarting, or judging the traffic a flood sends
//! `GOAWAY`, and every stream above the frame's last stream id was never processed (RFC 9113
//! §6.8). A stream may also be reset with `REFUSED_STREAM`, which says the same (§8.7). Both may
//! be sent again on another connection. hyper's client cannot do it for HTTP/2 (the request is
//! gone once handed to the connection), and before this every such request ended in a `502`.
//!
//! 1. A body of known length up to [`MAX_BODY`] is read whole first, within [`BODY_WAIT`] (as the
//!    lean path reads its bodies), so that it can be sent again; longer or streamed bodies, a body
//!    announced with `Expect` (the upstream decides whether it is wanted) and upgrades are sent as
//!    they come, once.
//! 2. [`Resend`] keeps a copy of the rewritten head and the body's frames.
//! 3. A request that failed with an error [`unprocessed`] recognises is sent again, on whatever
//!    connection the pool gives (a connection that went away is not given again), at most
//!    [`MAX_RESENDS`] times and within the request's response deadline.
//! 4. A refused request hive does not send again (a streamed body, or refused each time) is
//!    refused in turn to a client that sent it over HTTP/2 ([`Refused`]), so that the client may
//!    send it again itself; an HTTP/1.1 client gets a `502`.
//!
//! # Security
//! Only what the upstream declared unprocessed is sent again: a request it may have acted on (a
//! stream at or below a `GOAWAY`'s last id, a reset of another kind, a connection lost) fails with
//! `502` as before. The copy lives as long as the request and holds nothing the request itself
//! does not.

use std::collections::VecDeque;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Uri, Version};
use http_body::Frame;
use http_body_util::BodyExt;

use super::deny::{BoxError, ProxyBody};
use super::substitute::Prefixed;

/// Longest body read whole so that its request can be sent again.
pub const MAX_BODY: u64 = 64 * 1024;
/// How long a client may take to send such a body before it is streamed (and sent once).
pub const BODY_WAIT: Duration = Duration::from_secs(2);
/// Most times one request is sent again.
pub const MAX_RESENDS: usize = 3;

/// A request, as rewritten for the upstream, that can be sent again.
pub struct Resend {
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
    frames: VecDeque<Frame<Bytes>>,
    /// Body bytes (for `bytesOut`).
    pub body_len: u64,
}

impl Resend {
    /// A copy of `head` and `body`, when the whole body is in memory.
    pub fn new<B>(head: &http::request::Parts, body: &Prefixed<B>) -> Option<Resend>
    where
        B: http_body::Body<Data = Bytes> + Unpin,
    {
        let frames = body.copy_whole()?;
        let body_len = frames
            .iter()
            .filter_map(Frame::data_ref)
            .map(|d| d.len() as u64)
            .sum();
        Some(Resend {
            method: head.method.clone(),
            uri: head.uri.clone(),
            version: head.version,
            headers: head.headers.clone(),
            frames,
            body_len,
        })
    }

    /// The request, once more.
    pub fn request(&self) -> Request<ProxyBody> {
        let mut req = Request::new(
            Prefixed::<http_body_util::Empty<Bytes>>::frames(copy(&self.frames))
                .map_err(|never| -> BoxError { match never {} })
                .boxed_unsync(),
        );
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.uri.clone();
        *req.version_mut() = self.version;
        *req.headers_mut() = self.headers.clone();
        req
    }
}

/// A copy of each frame (data and trailers).
pub fn copy(frames: &VecDeque<Frame<Bytes>>) -> VecDeque<Frame<Bytes>> {
    frames
        .iter()
        .map(|f| match (f.data_ref(), f.trailers_ref()) {
            (Some(data), _) => Frame::data(data.clone()),
            (None, Some(trailers)) => Frame::trailers(trailers.clone()),
            (None, None) => Frame::data(Bytes::new()),
        })
        .collect()
}

/// Marks the `502` of a request the upstream refused unprocessed and hive did not send again. A
/// client that sent it over HTTP/2 gets its stream reset with `REFUSED_STREAM` instead, which
/// tells it the request was not processed and may be sent again (curl, browsers and gRPC do so
/// on their own); an HTTP/1.1 client, which has no such answer, gets the `502`.
#[derive(Debug, Clone, Copy)]
pub struct Refused;

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the upstream refused the request without processing it")
    }
}

impl std::error::Error for Refused {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        static REFUSED: std::sync::OnceLock<h2::Error> = std::sync::OnceLock::new();
        Some(REFUSED.get_or_init(|| h2::Reason::REFUSED_STREAM.into()))
    }
}

/// Whether a request failed because the upstream refused it without processing it: its HTTP/2
/// stream was above the last stream id of a `GOAWAY` the upstream sent (or was opened after it),
/// or the upstream reset it with `REFUSED_STREAM`.
pub fn unprocessed(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            return h2.is_remote()
                && (h2.is_go_away() || h2.reason() == Some(h2::Reason::REFUSED_STREAM));
        }
        cur = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_refusal_from_the_upstream_counts_as_unprocessed() {
        // Errors h2 makes itself, or that say nothing of processing, are not refusals.
        let local = h2::Error::from(h2::Reason::REFUSED_STREAM);
        assert!(!unprocessed(&local));
        let io = std::io::Error::new(std::io::ErrorKind::BrokenPipe, "gone");
        assert!(!unprocessed(&io));
    }

    #[test]
    fn a_copy_keeps_data_and_trailers_in_order() {
        let mut trailers = HeaderMap::new();
        trailers.insert("x-sum", "1".parse().unwrap());
        let frames: VecDeque<_> = [
            Frame::data(Bytes::from_static(b"ab")),
            Frame::data(Bytes::from_static(b"c")),
            Frame::trailers(trailers.clone()),
        ]
        .into();
        let copied = copy(&frames);
        assert_eq!(copied.len(), 3);
        assert_eq!(copied[0].data_ref().unwrap(), "ab");
        assert_eq!(copied[1].data_ref().unwrap(), "c");
        assert_eq!(copied[2].trailers_ref(), Some(&trailers));
    }
}
