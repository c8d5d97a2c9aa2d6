//! The lean HTTP/1.1 path: the requests an agent sends most (an HTTP/1.1 `GET`, `HEAD` or
//! `OPTIONS` without a body, or a `POST`, `PUT`, `PATCH` or `DELETE` with a body of at most
//! 64 KiB, stated by its length or chunked, allowed by a rule) are parsed with `httparse` and
//! relayed over an upstream connection taken from the lean pool for the exchange, without hyper's
//! per-request machinery on either leg and without a header map: heads are filtered from the
//! parsed bytes into the outgoing ones (docs/decisions.md, "Lean HTTP/1.1 path", "Lean path,
//! second pass", "Secrets on the lean path" and "Request bodies on the lean path"). Anything else,
//! from the first request that is not such a request, is handed to hyper with the bytes already
//! read ([`Prefixed`]), before anything about that request was decided, emitted or sent.
//!
//! Decisions, events and denials are the ones [`http::forward`](super::http::forward) makes: the
//! same gate ([`gate::check_from`]), the same [`Auditor`] and the same [`deny`] answers. A request
//! on an idle connection last used under the same rules is decided by the policy alone: the gate
//! checked and pinned that connection's addresses when it was opened, and nothing is resolved or
//! connected now.
//!
//! # Security
//! - A request is taken only when its framing leaves nothing to interpret: a body only on a
//!   method that carries one, stated by one `Content-Length` of digits (at most [`MAX_BODY`]) or
//!   by one `Transfer-Encoding: chunked` (and no `Content-Length`), no `Upgrade` or `Expect`,
//!   `Connection` at most `keep-alive` or `close`, no method-override header or `_method`
//!   parameter. Everything else (including every malformed head, which hyper answers with `400`)
//!   goes to hyper.
//! - A body is read whole before the request is decided, so that a refused request leaves the
//!   connection in step; it is searched for placeholders as hyper's path searches its first
//!   64 KiB. A chunked body is taken only strictly framed (hex sizes, no extensions, no
//!   trailers, at most [`MAX_BODY`] decoded; else hyper's, with every byte) and goes upstream
//!   decoded, with a `Content-Length` (as hyper's path sends a body it read whole to search). A
//!   request with a body or of an unsafe method is never sent twice, and a pooled connection is
//!   checked before it carries one ([`was_closed`]).
//! - A response's framing is read strictly: `Transfer-Encoding` ending in `chunked` is decoded and
//!   encoded again (extensions and trailers dropped); differing `Content-Length` values fail the
//!   exchange (`502`); a body without either is read to the end and the client connection closed
//!   after it. Hop-by-hop headers are removed both ways ([`headers::strip_hop_by_hop`]).
//! - Secrets are applied as on hyper's path, with the same functions: placeholders found in the
//!   head (as they are, percent-decoded, inside `Basic`) and refused where their secret may not
//!   go, then substituted; an override's names removed and its values (inline, or templates
//!   rendered) added; `Accept-Encoding` narrowed to what the scrubber decodes; the response
//!   scrubbed ([`Scan`]: headers, then the body decoded and delivered chunked; a coding it cannot
//!   read is a `502`). The head holding the values is zeroed once sent.
//! - Upstream connections speak HTTP/1.1 only (the h1 connector: no h2 by ALPN) and connect to
//!   the addresses the gate pinned, as hyper's client does. The pool belongs to the client for the
//!   `upstream` section in force: a changed section (another mapping, other roots) never reuses a
//!   connection opened under the old one.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::header::{HeaderMap, HeaderValue};
use http::{Method, Response, StatusCode};
use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::config::{normalize_host, OverrideValue};
use crate::policy::{reason, Access, Compiled, Decision, Scheme};

use super::audit::{Auditor, Exchange, Subject};
use super::connect::Prefixed;
use super::deny::{self, ProxyBody, UpstreamFailure};
use super::gate::{self, Ask, Outcome};
use super::headers;
use super::http::{default_port, split_authority, upstream_uri, Tunnel};
use super::listener::Conn;
use super::scrub::{self, Scan};
use super::substitute;
use super::upstream::{LeanKey, LeanStream, UpstreamClient};
use super::{HEADER_READ_TIMEOUT, MAX_HEADER_BYTES};
use crate::secrets::scrub::Patterns;

/// Most header lines a lean request or response may have (more: hyper takes the request, and a
/// response fails the exchange).
const MAX_HEADERS: usize = 100;

/// What [`serve`] leaves to the caller.
pub enum Served<I> {
    /// The connection is finished (closed, failed, or asked to close).
    Done,
    /// Serve the rest with hyper: the stream, replaying the bytes already read from it.
    Handoff(Prefixed<I>),
}

/// An idle upstream connection taken from the pool for one exchange.
struct Taken {
    stream: LeanStream,
    client: Arc<UpstreamClient>,
    /// The rules its last request was decided under: while they are the ones in force, a request
    /// to the same target is decided by the policy alone, on this connection.
    decided: Arc<Compiled>,
}

/// A request the lean path may take, read from the head at the start of the read buffer.
struct Request {
    method: Method,
    target: Target,
    /// The client asked to close after this exchange.
    close: bool,
    /// Length of the head.
    len: usize,
    /// Length of the body (`Content-Length`; at most [`MAX_BODY`], and only for methods that
    /// carry one).
    body_len: usize,
    /// The body is `Transfer-Encoding: chunked` (then `body_len` is 0): decoded whole by
    /// [`read_chunked`] and sent on with a `Content-Length`.
    chunked: bool,
}

/// Longest request body the lean path takes: it is read whole before the request is decided
/// (as hyper's path reads up to the first 64 KiB to search it for placeholders), so a refused
/// request leaves the connection in step and a pooled connection can be checked before it is
/// used for a request that cannot be sent twice. Longer bodies, and bodies not all there within
/// [`BODY_WAIT`], are hyper's, which streams them.
const MAX_BODY: usize = 64 * 1024;

/// How long the lean path waits for the rest of a body before handing the request to hyper.
const BODY_WAIT: Duration = Duration::from_secs(2);

/// Where a lean request goes.
struct Target {
    host: String,
    port: u16,
    scheme: Scheme,
    /// Path and query as sent (starts with `/`).
    path_and_query: String,
}

/// Per-connection buffers, reused from one request to the next.
struct Buffers {
    /// Bytes read from the client.
    read: BytesMut,
    /// The request head as it goes upstream, then what goes to the client.
    out: Vec<u8>,
    /// Bytes read from the upstream.
    rest: BytesMut,
}

/// Serves requests on `io` while they are lean requests; see the module docs.
pub async fn serve<I>(mut io: I, conn: &Conn, tunnel: Option<&Tunnel>) -> Served<I>
where
    I: AsyncRead + AsyncWrite + Unpin + Send,
{
    if !connection_is_lean(tunnel) {
        return Served::Handoff(Prefixed::new(Bytes::new(), io));
    }
    let mut bufs = Buffers {
        read: BytesMut::with_capacity(8 * 1024),
        out: Vec::with_capacity(4 * 1024),
        rest: BytesMut::new(),
    };
    // The last request's target, kept so that the next one to it needs no new key.
    let mut key: Option<LeanKey> = None;
    let mut draining = std::pin::pin!(conn.ctl.reached(super::listener::Phase::Draining));
    loop {
        // No new request once the listener is closing (hyper's graceful shutdown does the same).
        if conn.ctl.is_closed() {
            return Served::Done;
        }
        // The next head: wait for it, unless the listener is closing.
        match read_head(&mut io, &mut bufs.read, &mut draining).await {
            HeadRead::Complete => {}
            HeadRead::Handoff => break,
            HeadRead::Closed => return Served::Done,
        }
        let credential = conn.ctl.credential.as_ref();
        let Some(request) = parse_request(&bufs.read, credential, tunnel, &mut bufs.out) else {
            break;
        };
        // The body's bytes as they came (`raw`), and as they go on.
        let mut decoded = None;
        let raw = if request.chunked {
            match read_chunked(&mut io, &mut bufs.read, request.len).await {
                Chunked::Complete { raw, body } => {
                    decoded = Some(body);
                    raw
                }
                Chunked::Handoff => break,
                Chunked::Closed => return Served::Done,
            }
        } else {
            if request.body_len > 0 {
                match read_body(&mut io, &mut bufs.read, request.len + request.body_len).await {
                    HeadRead::Complete => {}
                    HeadRead::Handoff => break,
                    HeadRead::Closed => return Served::Done,
                }
            }
            request.body_len
        };
        let compiled = conn.engine.cell.load_full();
        let Some(decision) = plainly_allowed(&compiled.policy, &request) else {
            break;
        };
        // From here this request is the lean path's.
        bufs.read.advance(request.len);
        let raw = bufs.read.split_to(raw).freeze();
        let body = match decoded {
            Some(body) => {
                state_length(&mut bufs.out, body.len());
                body
            }
            None => raw,
        };
        conn.engine
            .lean_requests
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let _busy = conn.idle.busy();
        let exchanged = exchange(
            &mut io, conn, &compiled, request, body, decision, &mut key, &mut bufs,
        );
        if !exchanged.await.unwrap_or(false) {
            let _ = io.shutdown().await;
            return Served::Done;
        }
    }
    Served::Handoff(Prefixed::new(bufs.read.freeze(), io))
}

/// Whether requests on this connection may take the lean path at all: not in a tunnel that
/// refuses everything or whose TLS name disagrees with its target (hyper's path answers those).
fn connection_is_lean(tunnel: Option<&Tunnel>) -> bool {
    tunnel.is_none_or(|t| t.refusal.is_none() && t.sni_mismatch.is_none())
}

enum HeadRead {
    Complete,
    Handoff,
    Closed,
}

/// Reads until `buf` holds a complete request head (or hyper should take over).
async fn read_head<I>(
    io: &mut I,
    buf: &mut BytesMut,
    draining: &mut std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
) -> HeadRead
where
    I: AsyncRead + Unpin,
{
    let mut deadline: Option<tokio::time::Instant> = None;
    loop {
        if !buf.is_empty() {
            match head_complete(buf) {
                Some(true) => return HeadRead::Complete,
                Some(false) if buf.len() < MAX_HEADER_BYTES => {}
                // Malformed or too large: hyper answers it.
                _ => return HeadRead::Handoff,
            }
        }
        if buf.capacity() - buf.len() < 1024 {
            buf.reserve(4 * 1024);
        }
        let read = match deadline {
            // Idle between requests: the socket's idle timeout applies; a closing listener ends
            // the connection here (hyper's graceful shutdown does the same).
            None => tokio::select! {
                biased;
                _ = draining.as_mut() => return HeadRead::Closed,
                read = io.read_buf(buf) => read,
            },
            // A head has begun: it must be complete within the header timeout.
            Some(at) => match tokio::time::timeout_at(at, io.read_buf(buf)).await {
                Ok(read) => read,
                Err(_) => return HeadRead::Closed,
            },
        };
        match read {
            Ok(0) | Err(_) => return HeadRead::Closed,
            Ok(_) => {}
        }
        if deadline.is_none() {
            deadline = Some(tokio::time::Instant::now() + HEADER_READ_TIMEOUT);
        }
    }
}

/// Reads until `buf` holds `total` bytes (a head and its body); [`HeadRead::Handoff`] when they
/// are not all there within [`BODY_WAIT`] (hyper then streams the rest).
async fn read_body<I>(io: &mut I, buf: &mut BytesMut, total: usize) -> HeadRead
where
    I: AsyncRead + Unpin,
{
    let deadline = tokio::time::Instant::now() + BODY_WAIT;
    if buf.capacity() < total {
        buf.reserve(total - buf.len());
    }
    while buf.len() < total {
        match tokio::time::timeout_at(deadline, io.read_buf(buf)).await {
            Ok(Ok(0) | Err(_)) => return HeadRead::Closed,
            Ok(Ok(_)) => {}
            Err(_) => return HeadRead::Handoff,
        }
    }
    HeadRead::Complete
}

/// What [`read_chunked`] found.
enum Chunked {
    /// The whole body: `raw` bytes after the head, `body` once decoded.
    Complete { raw: usize, body: Bytes },
    /// Not a body the lean path takes, or not all there within [`BODY_WAIT`]: hyper's.
    Handoff,
    /// The client closed the connection or failed.
    Closed,
}

/// Most bytes a chunked body may take on the wire before the lean path hands it to hyper: room for
/// [`MAX_BODY`] decoded bytes in small chunks, not for padding without end.
const MAX_CHUNKED_RAW: usize = 4 * MAX_BODY;

/// Most hex digits of a chunk size the lean path reads (64 KiB needs 5).
const MAX_SIZE_DIGITS: usize = 8;

/// Reads and decodes the chunked body that follows the `head` bytes at the start of `buf`, leaving
/// `buf` as read (hyper replays it all on a hand-off). Taken only as strictly framed: sizes of hex
/// digits ended by CRLF, no extensions, each chunk's data ended by CRLF, the last chunk followed
/// by CRLF (no trailers), at most [`MAX_BODY`] decoded bytes.
async fn read_chunked<I>(io: &mut I, buf: &mut BytesMut, head: usize) -> Chunked
where
    I: AsyncRead + Unpin,
{
    let deadline = tokio::time::Instant::now() + BODY_WAIT;
    let mut body = BytesMut::new();
    let mut at = head;
    loop {
        match next_chunk(&buf[at..]) {
            ChunkStep::Data { start, len } => {
                if body.len() + len > MAX_BODY {
                    return Chunked::Handoff;
                }
                body.extend_from_slice(&buf[at + start..at + start + len]);
                at += start + len + 2;
                continue;
            }
            ChunkStep::Last(len) => {
                return Chunked::Complete {
                    raw: at + len - head,
                    body: body.freeze(),
                }
            }
            ChunkStep::Refused => return Chunked::Handoff,
            ChunkStep::Partial => {}
        }
        if buf.len() - head >= MAX_CHUNKED_RAW {
            return Chunked::Handoff;
        }
        if buf.capacity() - buf.len() < 4 * 1024 {
            buf.reserve(16 * 1024);
        }
        match tokio::time::timeout_at(deadline, io.read_buf(buf)).await {
            Ok(Ok(0) | Err(_)) => return Chunked::Closed,
            Ok(Ok(_)) => {}
            Err(_) => return Chunked::Handoff,
        }
    }
}

/// One step of [`read_chunked`] over the bytes from a chunk's start.
#[derive(Debug, PartialEq, Eq)]
enum ChunkStep {
    /// A chunk whose `len` data bytes start at `start` (the CRLF after them checked).
    Data { start: usize, len: usize },
    /// The last chunk and the empty trailer section: `len` bytes in all.
    Last(usize),
    /// More bytes are needed.
    Partial,
    /// Framing the lean path does not take.
    Refused,
}

/// Reads the framing of the chunk at the start of `bytes` (see [`read_chunked`]).
fn next_chunk(bytes: &[u8]) -> ChunkStep {
    let digits = bytes.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits > MAX_SIZE_DIGITS {
        return ChunkStep::Refused;
    }
    let Some(after) = bytes.get(digits..digits + 2) else {
        // All hex so far (or a lone CR): wait for the rest of the line.
        let rest = &bytes[digits..];
        return if rest.is_empty() || rest == b"\r" {
            ChunkStep::Partial
        } else {
            ChunkStep::Refused
        };
    };
    if digits == 0 || after != b"\r\n" {
        return ChunkStep::Refused;
    }
    let Ok(size) = usize::from_str_radix(
        std::str::from_utf8(&bytes[..digits]).unwrap_or_default(),
        16,
    ) else {
        return ChunkStep::Refused;
    };
    let start = digits + 2;
    if size > MAX_BODY {
        return ChunkStep::Refused;
    }
    // The data, or for the last chunk nothing, then CRLF.
    match bytes.get(start + size..start + size + 2) {
        Some(b"\r\n") if size == 0 => ChunkStep::Last(start + 2),
        Some(b"\r\n") => ChunkStep::Data { start, len: size },
        Some(_) => ChunkStep::Refused,
        None if bytes.len() == start + size + 1 && bytes[start + size] != b'\r' => {
            ChunkStep::Refused
        }
        None => ChunkStep::Partial,
    }
}

/// Adds `Content-Length: len` to the request head in `out` (before its blank line).
fn state_length(out: &mut Vec<u8>, len: usize) {
    out.truncate(out.len() - 2);
    write_header(out, b"content-length", len.to_string().as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// `Some(true)` when `buf` starts with a complete request head, `Some(false)` when it needs more
/// bytes, `None` when it is not a head httparse reads.
fn head_complete(buf: &[u8]) -> Option<bool> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Complete(_)) => Some(true),
        Ok(httparse::Status::Partial) => Some(false),
        Err(_) => None,
    }
}

/// Header names that make a request hyper's: framing to interpret, a protocol change, or a
/// method override (which the gate must decide too). `Transfer-Encoding` is the lean path's only
/// when it is one `chunked` ([`parse_request`]).
const NOT_LEAN: [&str; 8] = [
    "upgrade",
    "expect",
    "te",
    "trailer",
    "http2-settings",
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
];

/// Hop-by-hop headers never relayed ([`headers::strip_hop_by_hop`]'s fixed list; the others
/// are [`NOT_LEAN`] in a request and handled by the framing in a response).
const HOP_BY_HOP: [&str; 5] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "proxy-authenticate",
];

fn named(name: &str, names: &[&str]) -> bool {
    names.iter().any(|n| n.eq_ignore_ascii_case(name))
}

/// A header value as text, when it is visible ASCII (what [`HeaderValue::to_str`] accepts).
fn text(value: &[u8]) -> Option<&str> {
    if value
        .iter()
        .all(|&b| b == b'\t' || (0x20..0x7f).contains(&b))
    {
        std::str::from_utf8(value).ok()
    } else {
        None
    }
}

/// The request whose head starts `buf`, when the lean path may take it on this connection;
/// then `out` holds its head as it goes upstream: origin-form, `Host` from the target, hop-by-hop
/// headers removed (as [`headers::strip_hop_by_hop`] leaves a request hyper's client sends).
/// No header map is built: names and values are relayed as httparse validated them.
fn parse_request(
    buf: &[u8],
    credential: Option<&HeaderValue>,
    tunnel: Option<&Tunnel>,
    out: &mut Vec<u8>,
) -> Option<Request> {
    let mut raw = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut raw);
    let httparse::Status::Complete(len) = req.parse(buf).ok()? else {
        return None;
    };
    if req.version != Some(1) {
        return None;
    }
    let method = match req.method? {
        "GET" => Method::GET,
        "HEAD" => Method::HEAD,
        "OPTIONS" => Method::OPTIONS,
        "POST" => Method::POST,
        "PUT" => Method::PUT,
        "PATCH" => Method::PATCH,
        "DELETE" => Method::DELETE,
        _ => return None,
    };
    // A body only where the method carries one, stated by one `Content-Length` of digits.
    let may_have_body = !matches!(method, Method::GET | Method::HEAD | Method::OPTIONS);
    let mut body_len: Option<usize> = None;
    let mut chunked = false;
    let mut close = false;
    let mut host: Option<&[u8]> = None;
    let mut hosts = 0;
    let mut credentialed = credential.is_none();
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("connection") {
            match h.value {
                v if v.eq_ignore_ascii_case(b"keep-alive") => {}
                v if v.eq_ignore_ascii_case(b"close") => close = true,
                _ => return None,
            }
        } else if named(h.name, &NOT_LEAN) {
            return None;
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            // Exactly one `chunked`: no other coding, no list, no second line.
            if !may_have_body || chunked || !h.value.eq_ignore_ascii_case(b"chunked") {
                return None;
            }
            chunked = true;
        } else if h.name.eq_ignore_ascii_case("content-length") {
            let digits = h.value;
            if !may_have_body
                || body_len.is_some()
                || digits.is_empty()
                || digits.len() > 6
                || !digits.iter().all(u8::is_ascii_digit)
            {
                return None;
            }
            let len: usize = std::str::from_utf8(digits).ok()?.parse().ok()?;
            if len > MAX_BODY {
                return None;
            }
            body_len = Some(len);
        } else if h.name.eq_ignore_ascii_case("host") {
            hosts += 1;
            host = Some(h.value);
        } else if h.name.eq_ignore_ascii_case("proxy-authorization") {
            if let Some(expected) = credential {
                credentialed |= headers::credential_matches(h.value, expected);
            }
        }
    }
    // Both framings: hyper's (a request smuggler's favourite).
    if chunked && body_len.is_some() {
        return None;
    }
    let path = req.path?;
    let target = match tunnel {
        None => {
            if !credentialed {
                return None;
            }
            let uri: http::Uri = path.parse().ok()?;
            if uri.scheme_str() != Some("http") {
                return None;
            }
            let host = normalize_host(uri.host()?)?;
            let port = uri.port_u16().unwrap_or(default_port(Scheme::Http));
            let path_and_query = uri.path_and_query().map_or("/", |p| p.as_str());
            if !path_and_query.starts_with('/') {
                return None;
            }
            Target {
                host,
                port,
                scheme: Scheme::Http,
                path_and_query: path_and_query.to_owned(),
            }
        }
        Some(tunnel) => {
            // Origin-form only, and a target hyper would have parsed (else its `400`).
            if !path.starts_with('/') || http::uri::PathAndQuery::try_from(path).is_err() {
                return None;
            }
            if hosts != 1 {
                return None;
            }
            let (named_host, named_port) = split_authority(text(host?)?)?;
            if named_host != *tunnel.host || named_port.is_some_and(|p| p != tunnel.port) {
                return None;
            }
            Target {
                host: tunnel.host.to_string(),
                port: tunnel.port,
                scheme: tunnel.scheme,
                path_and_query: path.to_owned(),
            }
        }
    };
    if query_overrides_method(&target.path_and_query) {
        return None;
    }

    out.clear();
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.path_and_query.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    if target.host.contains(':') {
        out.push(b'[');
        out.extend_from_slice(target.host.as_bytes());
        out.push(b']');
    } else {
        out.extend_from_slice(target.host.as_bytes());
    }
    if target.port != default_port(target.scheme) {
        out.push(b':');
        out.extend_from_slice(target.port.to_string().as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    for h in req.headers.iter() {
        // `Connection: close` names a header `close`, removed as hop-by-hop. A chunked body
        // goes on with a `Content-Length` (added once it is decoded).
        if named(h.name, &HOP_BY_HOP)
            || h.name.eq_ignore_ascii_case("host")
            || (close && h.name.eq_ignore_ascii_case("close"))
            || h.name.eq_ignore_ascii_case("transfer-encoding")
        {
            continue;
        }
        write_header(out, h.name.as_bytes(), h.value);
    }
    out.extend_from_slice(b"\r\n");
    Some(Request {
        method,
        target,
        close,
        len,
        body_len: body_len.unwrap_or(0),
        chunked,
    })
}

/// Whether the query names a method to run instead (`_method`, as [`headers::override_methods`]
/// reads it): such a request is hyper's, where the gate decides that method too.
fn query_overrides_method(path_and_query: &str) -> bool {
    path_and_query.split_once('?').is_some_and(|(_, query)| {
        !headers::override_methods(&HeaderMap::new(), Some(query)).is_ok_and(|m| m.is_empty())
    })
}

/// The header values of the upstream head in `out` (as [`parse_request`] wrote it), but `Host`'s:
/// the ones hyper's path searches for placeholders (it has removed `Host` by then).
fn header_values(out: &[u8]) -> impl Iterator<Item = &[u8]> {
    let lines = head_lines(out).1;
    lines
        .filter(|(name, _)| !name.eq_ignore_ascii_case(b"host"))
        .map(|(_, value)| value)
}

/// The request line and the header lines (name, value) of a head [`parse_request`] wrote:
/// `name: value` lines ending in CRLF, then an empty line.
fn head_lines(head: &[u8]) -> (&[u8], impl Iterator<Item = (&[u8], &[u8])>) {
    let mut lines = head
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let request_line = lines.next().unwrap_or_default();
    let headers = lines.take_while(|l| !l.is_empty()).map(|line| {
        let colon = line.iter().position(|&b| b == b':').unwrap_or(line.len());
        (&line[..colon], line.get(colon + 2..).unwrap_or_default())
    });
    (request_line, headers)
}

/// How [`rewrite_head`] changes an upstream head for secrets.
struct Rewrite<'a> {
    /// Substitute the placeholders of these named secrets (in header values and the query).
    secrets: Option<&'a crate::secrets::Table>,
    /// The override's names: the sandbox's own headers of these names are not sent.
    dropped: &'a [(http::HeaderName, OverrideValue)],
    /// The override's headers, as they are sent.
    added: &'a [(http::HeaderName, HeaderValue)],
    /// Narrow `Accept-Encoding` to the codings the scrubber decodes.
    narrow: bool,
}

/// Rewrites the upstream head in `out` as hyper's path changes its header map: placeholders
/// substituted ([`substitute::head`]), the override's names removed and its values added
/// ([`headers::inject`]), `Accept-Encoding` narrowed ([`scrub::limit_accept_encoding`]: the
/// first value read, one header written).
fn rewrite_head(out: &mut Vec<u8>, how: &Rewrite<'_>) {
    let head = std::mem::replace(out, Vec::with_capacity(out.capacity()));
    let (request_line, lines) = head_lines(&head);
    // `METHOD target HTTP/1.1`: only the target's query can change.
    let target = request_line
        .split(|&b| b == b' ')
        .nth(1)
        .and_then(|t| std::str::from_utf8(t).ok());
    let substituted = how
        .secrets
        .zip(target)
        .and_then(|(table, target)| substitute::substitute_target(table, target));
    match (&substituted, target) {
        (Some(new), Some(target)) => {
            let method_len = request_line.len() - target.len() - " HTTP/1.1".len();
            out.extend_from_slice(&request_line[..method_len]);
            out.extend_from_slice(new.as_bytes());
            out.extend_from_slice(b" HTTP/1.1");
        }
        _ => out.extend_from_slice(request_line),
    }
    out.extend_from_slice(b"\r\n");
    let mut accept: Option<&[u8]> = None;
    for (name, value) in lines {
        let dropped = how.dropped.iter();
        if dropped
            .map(|(n, _)| n.as_str().as_bytes())
            .any(|n| n.eq_ignore_ascii_case(name))
        {
            continue;
        }
        if how.narrow && name.eq_ignore_ascii_case(b"accept-encoding") {
            accept.get_or_insert(value);
            continue;
        }
        // A substituted value that would not be a valid header value is not sent substituted
        // (as on hyper's path, where it would not become a `HeaderValue`).
        let new = how
            .secrets
            .filter(|_| !name.eq_ignore_ascii_case(b"host"))
            .and_then(|table| substitute::substitute_header(table, value))
            .filter(|new| HeaderValue::from_bytes(new).is_ok());
        write_header(out, name, new.as_deref().map_or(value, |v| &v[..]));
    }
    if let Some(value) = accept {
        write_header(
            out,
            b"accept-encoding",
            scrub::decodable_codings(value).as_bytes(),
        );
    }
    for (name, value) in how.added {
        write_header(out, name.as_str().as_bytes(), value.as_bytes());
    }
    out.extend_from_slice(b"\r\n");
}

/// The policy's decision when it alone allows the request by a rule the lean path serves
/// ([`lean_rule`]), so that the gate either allows it the same way or refuses it for the address
/// (answered here like hyper's path would). Requests the policy decides with addresses, in report
/// mode, or by asking are not lean.
fn plainly_allowed(policy: &crate::policy::Policy, request: &Request) -> Option<Decision> {
    if policy.uses_addresses() {
        return None;
    }
    let target = &request.target;
    let decision = policy.apply_mode(policy.decide(&crate::policy::Request {
        host: &target.host,
        port: target.port,
        method: request.method.as_str(),
        path: &target.path_and_query,
        scheme: target.scheme,
        ip: None,
    }));
    lean_rule(policy, &decision).then_some(decision)
}

/// Whether `decision` allows by a rule (with or without an override: the lean path applies it
/// and scrubs the response as hyper's path does).
fn lean_rule(policy: &crate::policy::Policy, decision: &Decision) -> bool {
    decision.access == Access::Allowed
        && !decision.would_deny
        && decision.rule.and_then(|i| policy.rule(i)).is_some()
}

/// Decides and relays one request whose upstream head is in `bufs.out`; `Ok(true)` when the
/// client connection stays open.
///
/// `decision` is the policy's ([`plainly_allowed`]). When an idle upstream connection to the same
/// target was last used under the same rules, it is the request's decision: that connection's
/// addresses were checked and pinned when it was opened, and nothing is resolved or connected now
/// (hyper's pooled connections are reused the same way). Otherwise the gate decides, as on
/// hyper's path.
#[allow(clippy::too_many_arguments)]
async fn exchange<I>(
    io: &mut I,
    conn: &Conn,
    compiled: &Arc<Compiled>,
    request: Request,
    body: Bytes,
    decision: Decision,
    last_key: &mut Option<LeanKey>,
    bufs: &mut Buffers,
) -> Result<bool, ()>
where
    I: AsyncRead + AsyncWrite + Unpin + Send,
{
    let engine = &conn.engine;
    let auditor = Auditor::new(engine.events.clone());
    let target = &request.target;
    let host = target.host.as_str();
    let port = target.port;
    let method = request.method.as_str();
    let event_path = super::audit::strip_query(&target.path_and_query);
    let subject = Subject {
        host,
        port,
        method,
        path: event_path,
        scheme: target.scheme,
        via: conn.via(),
        origin: conn.origin().await,
        config_hash: Some(compiled.hash.clone()),
    };
    let is_head = request.method == Method::HEAD;
    let close = request.close;
    let out = &mut bufs.out;
    let key = match last_key {
        Some(k) if k.port == port && k.scheme == target.scheme && *k.host == *host => k.clone(),
        _ => last_key
            .insert(LeanKey {
                scheme: target.scheme,
                host: Arc::from(host),
                port,
            })
            .clone(),
    };
    // The idle connection to the target used last, from the client for the `upstream` in force.
    let mut taken = engine
        .upstream
        .get(&compiled.config)
        .ok()
        .and_then(|client| {
            let (stream, decided) = client.lean_take(&key)?;
            Some(Taken {
                stream,
                client,
                decided,
            })
        });
    let (decision, client) = match &taken {
        Some(t) if Arc::ptr_eq(&t.decided, compiled) => (decision, t.client.clone()),
        _ => {
            let ask = crate::policy::Request {
                host,
                port,
                method,
                path: &target.path_and_query,
                scheme: target.scheme,
                ip: None,
            };
            let origin = subject.origin.clone();
            let outcome =
                gate::check_from(engine, compiled, host, port, Ask::Request(ask, &[]), origin);
            let outcome = outcome.await;
            // The idle connection serves the request only if it is the allowing client's.
            let same_client = match &outcome {
                Outcome::Allowed { client, .. } => taken
                    .as_ref()
                    .is_some_and(|t| Arc::ptr_eq(&t.client, client)),
                _ => false,
            };
            if !same_client {
                give_back(&key, taken.take());
            }
            match outcome {
                Outcome::Denied(decision) => {
                    auditor.request(&subject, &decision, &[]);
                    let res = deny::forbidden(decision.reason, host, method, event_path);
                    return answer(io, res, is_head, close, out).await;
                }
                Outcome::Unreachable(decision, failure) => {
                    if let Some(ex) = auditor.request(&subject, &decision, &[]) {
                        ex.fail(failure, host, port, failure.describe());
                    }
                    let res = deny::bad_gateway(failure, host, method, event_path);
                    return answer(io, res, is_head, close, out).await;
                }
                Outcome::Allowed {
                    decision, client, ..
                } if lean_rule(&compiled.policy, &decision) => (decision, client),
                Outcome::Allowed { decision, .. } => {
                    // The gate decided otherwise than the policy alone (it should not): fail closed.
                    let decision = Decision::denied(decision.rule, reason::NO_RULE);
                    auditor.request(&subject, &decision, &[]);
                    let res = deny::forbidden(decision.reason, host, method, event_path);
                    give_back(&key, taken.take());
                    return answer(io, res, is_head, close, out).await;
                }
            }
        }
    };
    // Secrets, as on hyper's path (`http::forward`): placeholders in the head substituted where
    // they may go (refused anywhere else), then the override's headers set.
    let over = decision
        .rule
        .filter(|_| compiled.policy.may_inject(&decision))
        .and_then(|i| compiled.policy.rule(i))
        .and_then(|r| r.override_.as_ref());
    let may_send = target.scheme == Scheme::Https || over.is_some_and(|o| o.allow_plaintext);
    let over = over.filter(|_| may_send);
    let secrets = &compiled.secrets;
    let values = header_values(out);
    let checked =
        substitute::find_placeholders(secrets, host, may_send, values, &target.path_and_query)
            .and_then(|substituted| {
                if body.is_empty() || !substitute::body_needs_scan(secrets, host, may_send) {
                    return Ok(substituted);
                }
                let seen = &body[..body.len().min(substitute::BODY_SCAN_BYTES)];
                substitute::check_body(secrets, host, may_send, seen).map(|()| substituted)
            })
            .map_err(|blocked| substitute::report_blocked(&engine.events, host, &blocked))
            .and_then(|substituted| match over {
                Some(over) => substitute::check_override(secrets, &engine.events, over, host)
                    .map(|()| substituted),
                None => Ok(substituted),
            });
    let Ok(substituted) = checked else {
        give_back(&key, taken);
        let decision = gate::denied(substitute::SECRET_BLOCKED);
        auditor.request(&subject, &decision, &[]);
        let res = deny::forbidden(decision.reason, host, method, event_path);
        return answer(io, res, is_head, close, out).await;
    };
    let added: Vec<(http::HeaderName, HeaderValue)> = over
        .iter()
        .flat_map(|o| &o.headers)
        .filter_map(|(name, value)| Some((name.clone(), headers::override_value(value, secrets)?)))
        .collect();
    let injected: Vec<http::HeaderName> = added.iter().map(|(name, _)| name.clone()).collect();
    let patterns = (substituted || !injected.is_empty())
        .then(|| secrets.patterns().cloned())
        .flatten();
    let rewritten = substituted || over.is_some();
    if rewritten {
        let rewrite = Rewrite {
            secrets: substituted.then_some(&**secrets),
            dropped: over.map_or(&[], |o| &o.headers[..]),
            added: &added,
            narrow: patterns.is_some(),
        };
        rewrite_head(out, &rewrite);
    }
    let Some(exchange) = auditor.request(&subject, &decision, &injected) else {
        give_back(&key, taken);
        let res = deny::forbidden(decision.reason, host, method, event_path);
        return answer(io, res, is_head, close, out).await;
    };

    out.extend_from_slice(&body);
    let timeout = compiled.config.upstream.response_timeout;
    let reused = taken.map(|t| t.stream);
    // Only a request without a body, of a safe method, is sent again on a new connection.
    let once = !body.is_empty() || !request.method.is_safe();
    let sent = send(reused, once, &client, target, out, &mut bufs.rest, timeout).await;
    if rewritten {
        // The values sent are not left in the connection's buffer.
        out.fill(0);
    }
    let up = match sent {
        Ok(up) => {
            exchange.add_out(body.len() as u64);
            up
        }
        Err(failure) => {
            bufs.rest.clear();
            exchange.fail(failure.0, host, port, &failure.1);
            let res = deny::bad_gateway(failure.0, host, method, event_path);
            return answer(io, res, is_head, close, out).await;
        }
    };
    let asked = Asked {
        host,
        port,
        method,
        path: event_path,
        is_head,
        close,
    };
    let scrubbing = patterns.map(|patterns| {
        let report = scrub::Report {
            events: engine.events.clone(),
            host: host.to_owned(),
        };
        (patterns, report)
    });
    let relayed = relay(io, &asked, up, &exchange, out, &mut bufs.rest, scrubbing);
    let (open, clean) = relayed.await;
    match clean {
        Some(stream) => client.lean_put(key, stream, compiled.clone()),
        None => bufs.rest.clear(),
    }
    open
}

/// An upstream connection whose final response head is at the start of the read buffer.
struct Upstream {
    /// Length of the response head.
    head_len: usize,
    stream: LeanStream,
}

/// Writes the request in `out` upstream and reads the response head into `rest`, on the idle
/// connection `reused` or a new one. A connection that was reused and fails before any response
/// byte is replaced once, unless the request must go `once` (a body, or a method not safe to
/// repeat): then a reused connection is checked first, and not used if its upstream closed it
/// while it was idle.
async fn send(
    reused: Option<LeanStream>,
    once: bool,
    client: &UpstreamClient,
    target: &Target,
    out: &[u8],
    rest: &mut BytesMut,
    timeout: Duration,
) -> Result<Upstream, (UpstreamFailure, String)> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut reused = reused;
    if once && reused.as_mut().is_some_and(was_closed) {
        reused = None;
    }
    loop {
        let was_reused = reused.is_some();
        let mut stream = match reused.take() {
            Some(s) => s,
            None => {
                let (scheme, host, port) = (target.scheme, &target.host, target.port);
                let Some(uri) = upstream_uri(scheme, host, port, &target.path_and_query) else {
                    let detail = "the request target cannot be forwarded".to_owned();
                    return Err((UpstreamFailure::Exchange, detail));
                };
                client.lean_connect(uri).await.map_err(|e| {
                    (
                        super::upstream::classify(&*e),
                        super::audit::error_chain(&*e),
                    )
                })?
            }
        };
        rest.clear();
        if rest.capacity() < 1024 {
            rest.reserve(8 * 1024);
        }
        let head = async {
            stream.write_all(out).await?;
            stream.flush().await?;
            read_response_head(&mut stream, rest).await
        };
        match tokio::time::timeout_at(deadline, head).await {
            Ok(Ok(Some(head_len))) => return Ok(Upstream { head_len, stream }),
            Ok(Ok(None)) => {
                return Err((
                    UpstreamFailure::Exchange,
                    "malformed response head".to_owned(),
                ))
            }
            Ok(Err(_)) if was_reused && rest.is_empty() && !once => continue,
            Ok(Err(e)) => return Err((super::upstream::classify(&e), e.to_string())),
            Err(_) => {
                return Err((
                    UpstreamFailure::ResponseTimeout,
                    format!(
                        "no response head within upstream.responseTimeoutMs ({} ms)",
                        timeout.as_millis()
                    ),
                ))
            }
        }
    }
}

/// Whether an idle connection was closed by its upstream (or sent something unasked) while it
/// waited in the pool: one poll of its read side, which does not wait.
fn was_closed(stream: &mut LeanStream) -> bool {
    let mut byte = [0u8; 1];
    let mut buf = tokio::io::ReadBuf::new(&mut byte);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    let polled = std::pin::Pin::new(&mut **stream).poll_read(&mut cx, &mut buf);
    !polled.is_pending()
}

/// Reads until `buf` starts with a final response head (informational `1xx` heads are skipped)
/// and returns its length; `Ok(None)` when what arrived is not a response head the lean path
/// relays (`101`, malformed, too large).
async fn read_response_head(
    stream: &mut LeanStream,
    buf: &mut BytesMut,
) -> std::io::Result<Option<usize>> {
    loop {
        let parsed = {
            let mut raw = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut res = httparse::Response::new(&mut raw);
            match res.parse(buf) {
                Ok(httparse::Status::Complete(len)) => {
                    if res.version != Some(1) && res.version != Some(0) {
                        return Ok(None);
                    }
                    match res.code.and_then(|c| StatusCode::from_u16(c).ok()) {
                        Some(status) => Some((len, status)),
                        None => return Ok(None),
                    }
                }
                Ok(httparse::Status::Partial) if buf.len() < MAX_HEADER_BYTES => None,
                _ => return Ok(None),
            }
        };
        match parsed {
            Some((_, StatusCode::SWITCHING_PROTOCOLS)) => return Ok(None),
            Some((len, status)) if status.is_informational() => buf.advance(len),
            Some((len, _)) => return Ok(Some(len)),
            None => {
                if buf.capacity() - buf.len() < 1024 {
                    buf.reserve(8 * 1024);
                }
                if stream.read_buf(buf).await? == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
            }
        }
    }
}

/// What the client asked, as the answer needs it.
struct Asked<'a> {
    host: &'a str,
    port: u16,
    method: &'a str,
    /// The path without the query (as events and denials show it).
    path: &'a str,
    is_head: bool,
    /// The client asked to close after this exchange.
    close: bool,
}

/// How a response body ends.
#[derive(Debug, PartialEq)]
enum Framing {
    None,
    Length(u64),
    Chunked,
    /// At the end of the upstream connection.
    Close,
}

/// The framing of a response (RFC 9112 §6.3), or `None` when its lengths disagree.
fn response_framing(
    status: u16,
    is_head: bool,
    headers: &[httparse::Header<'_>],
) -> Option<Framing> {
    if is_head || status == 204 || status == 304 {
        return Some(Framing::None);
    }
    let mut last_coding: Option<&str> = None;
    for h in headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("transfer-encoding"))
    {
        let mut codings = text(h.value)?.split(',').map(str::trim);
        if let Some(last) = codings.rfind(|c| !c.is_empty()) {
            last_coding = Some(last);
        }
    }
    if let Some(last) = last_coding {
        return Some(if last.eq_ignore_ascii_case("chunked") {
            Framing::Chunked
        } else {
            Framing::Close
        });
    }
    let mut length: Option<u64> = None;
    for h in headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("content-length"))
    {
        for part in text(h.value)?.split(',') {
            let part = part.trim();
            if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            let n: u64 = part.parse().ok()?;
            if length.is_some_and(|l| l != n) {
                return None;
            }
            length = Some(n);
        }
    }
    Some(length.map_or(Framing::Close, Framing::Length))
}

/// A response head as it goes to the client.
struct ResponseHead {
    status: u16,
    /// How the upstream's body ends (a scrubbed body goes to the client chunked, unless it ends
    /// with the connection).
    framing: Framing,
    /// The upstream asked to close after this response.
    upstream_close: bool,
    /// When scrubbing: how many of each value the head's values held, and the body's coding.
    scrubbed: Option<(Vec<u64>, BodyCoding)>,
}

/// A response body's coding (`Err`: one the scrubber cannot decode).
type BodyCoding = Result<Option<crate::secrets::Encoding>, ()>;

/// Writes the client's response head into `out` from the upstream's head (`head`, complete):
/// hop-by-hop headers and those `Connection` names removed, as [`headers::strip_hop_by_hop`]
/// does, and the framing stated once. `None` when the head cannot be relayed (its lengths
/// disagree, or it does not parse again).
///
/// With `patterns` (the request carried a secret), header values are scrubbed and a body that
/// follows loses `Content-Encoding` and `Content-Length` (it is delivered decoded and chunked),
/// as [`scrub::response`] does on hyper's path.
fn response_head(
    head: &[u8],
    is_head: bool,
    client_close: bool,
    out: &mut Vec<u8>,
    patterns: Option<&Patterns>,
) -> Option<ResponseHead> {
    let mut raw = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut res = httparse::Response::new(&mut raw);
    let httparse::Status::Complete(_) = res.parse(head).ok()? else {
        return None;
    };
    // Three digits, 100 to 999 (read_response_head checked it too).
    let status = StatusCode::from_u16(res.code?).ok()?.as_u16();
    let framing = response_framing(status, is_head, res.headers)?;
    let mut upstream_close = false;
    let mut te_trailers = false;
    // Names `Connection` lists (hop-by-hop too); a value that is not text names nothing.
    let mut listed: Vec<&str> = Vec::new();
    for h in res.headers.iter() {
        if h.name.eq_ignore_ascii_case("connection") {
            upstream_close |= h.value.eq_ignore_ascii_case(b"close");
            if let Some(v) = text(h.value) {
                listed.extend(v.split(',').map(str::trim));
            }
        } else if h.name.eq_ignore_ascii_case("te") {
            te_trailers |= text(h.value).is_some_and(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
            });
        }
    }
    let close = client_close || framing == Framing::Close;
    let body_follows = framing != Framing::None;
    let encoding = match patterns {
        Some(_) if body_follows => {
            let codings = res.headers.iter();
            let codings = codings.filter(|h| h.name.eq_ignore_ascii_case("content-encoding"));
            scrub::body_encoding(codings.map(|h| h.value))
        }
        _ => Ok(None),
    };
    let mut counts = vec![0u64; patterns.map_or(0, Patterns::len)];

    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.to_string().as_bytes());
    out.push(b' ');
    let reason = res
        .reason
        .filter(|r| !r.is_empty())
        .or_else(|| StatusCode::from_u16(status).ok()?.canonical_reason())
        .unwrap_or("");
    out.extend_from_slice(reason.as_bytes());
    out.extend_from_slice(b"\r\n");
    for h in res.headers.iter() {
        let name = h.name;
        let framing_header = name.eq_ignore_ascii_case("transfer-encoding")
            || (name.eq_ignore_ascii_case("content-length") && framing != Framing::None);
        // A scrubbed body is delivered decoded, its length unknown.
        let decoded = patterns.is_some()
            && body_follows
            && (name.eq_ignore_ascii_case("content-encoding")
                || name.eq_ignore_ascii_case("content-length"));
        if framing_header
            || decoded
            || named(name, &HOP_BY_HOP)
            || named(name, &["te", "trailer", "upgrade"])
            || listed.iter().any(|l| l.eq_ignore_ascii_case(name))
        {
            continue;
        }
        match patterns {
            Some(p) if p.is_match(h.value) => {
                write_header(out, name.as_bytes(), &p.replace_all(h.value, &mut counts));
            }
            _ => write_header(out, name.as_bytes(), h.value),
        }
    }
    if te_trailers {
        out.extend_from_slice(b"te: trailers\r\n");
    }
    match framing {
        Framing::Length(_) | Framing::Chunked if patterns.is_some() => {
            out.extend_from_slice(b"transfer-encoding: chunked\r\n");
        }
        Framing::Length(n) => {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(n.to_string().as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        Framing::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        Framing::None | Framing::Close => {}
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    Some(ResponseHead {
        status,
        framing,
        upstream_close,
        scrubbed: patterns.map(|_| (counts, encoding)),
    })
}

/// Answers the client with the upstream's response (its head at the start of `rest`) and relays
/// its body; keeps the upstream connection for the next request when the exchange left it clean.
///
/// Returns whether the client connection stays open, and the upstream connection when it is
/// clean for another request.
async fn relay<I>(
    io: &mut I,
    asked: &Asked<'_>,
    up: Upstream,
    exchange: &Exchange,
    out: &mut Vec<u8>,
    rest: &mut BytesMut,
    scrubbing: Option<(Arc<Patterns>, scrub::Report)>,
) -> (Result<bool, ()>, Option<LeanStream>)
where
    I: AsyncWrite + Unpin,
{
    let (is_head, client_close) = (asked.is_head, asked.close);
    let patterns = scrubbing.as_ref().map(|(p, _)| &**p);
    let Some(head) = response_head(&rest[..up.head_len], is_head, client_close, out, patterns)
    else {
        let failure = UpstreamFailure::Exchange;
        let detail = "conflicting Content-Length values in the response";
        exchange.fail(failure, asked.host, asked.port, detail);
        let res = deny::bad_gateway(failure, asked.host, asked.method, asked.path);
        return (answer(io, res, is_head, client_close, out).await, None);
    };
    // The body's scan, started from what the head held (`Err`: a coding it cannot read).
    let scan = match (scrubbing, head.scrubbed) {
        (Some((patterns, report)), Some((counts, encoding))) => {
            let scan = encoding.and_then(|e| Scan::new(patterns, &counts, e, report));
            let Ok(scan) = scan else {
                let failure = UpstreamFailure::Exchange;
                let detail = "response content encoding hive cannot scan for secrets";
                exchange.fail(failure, asked.host, asked.port, detail);
                let res = deny::bad_gateway(failure, asked.host, asked.method, asked.path);
                return (answer(io, res, is_head, client_close, out).await, None);
            };
            Some(scan)
        }
        _ => None,
    };
    rest.advance(up.head_len);
    exchange.set_status(head.status);
    let close = client_close || head.framing == Framing::Close;
    let mut body = Body {
        stream: up.stream,
        rest,
    };
    let clean = match (head.framing, scan) {
        (Framing::None, _) => write_all(io, out).await.map(|()| true),
        (framing, Some(mut scan)) => {
            copy_scrubbed(io, &mut body, framing, exchange, out, &mut scan).await
        }
        (Framing::Length(n), None) => copy_length(io, &mut body, n, exchange, out).await,
        (Framing::Chunked, None) => copy_chunked(io, &mut body, exchange, out).await,
        (Framing::Close, None) => copy_to_end(io, &mut body, exchange, out)
            .await
            .map(|()| false),
    };
    match clean {
        Ok(true) if !head.upstream_close && body.rest.is_empty() => (Ok(!close), Some(body.stream)),
        Ok(_) => (Ok(!close), None),
        Err(_) => (Err(()), None),
    }
}

/// A response body being read: the upstream connection and what was read past the head.
struct Body<'a> {
    stream: LeanStream,
    rest: &'a mut BytesMut,
}

async fn write_all<I: AsyncWrite + Unpin>(io: &mut I, out: &mut Vec<u8>) -> std::io::Result<()> {
    io.write_all(out).await?;
    io.flush().await?;
    out.clear();
    Ok(())
}

/// Reads more of the upstream body into `up.rest`; an early end is an error.
async fn fill(up: &mut Body<'_>) -> std::io::Result<()> {
    if up.rest.capacity() - up.rest.len() < 1024 {
        up.rest.reserve(16 * 1024);
    }
    if up.stream.read_buf(&mut *up.rest).await? == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

/// Most chunked body bytes gathered before they are written to the client.
const FLUSH_AT: usize = 64 * 1024;

async fn copy_length<I: AsyncWrite + Unpin>(
    io: &mut I,
    up: &mut Body<'_>,
    mut left: u64,
    exchange: &Exchange,
    out: &mut Vec<u8>,
) -> std::io::Result<bool> {
    // The head and what already arrived go out in one write (the whole answer, mostly).
    let take = (up.rest.len() as u64).min(left) as usize;
    out.extend_from_slice(&up.rest[..take]);
    up.rest.advance(take);
    exchange.add_in(take as u64);
    left -= take as u64;
    write_all(io, out).await?;
    // A long body: read into the buffer and write from it, no copy.
    while left > 0 {
        fill_large(up).await?;
        let take = (up.rest.len() as u64).min(left) as usize;
        io.write_all(&up.rest[..take]).await?;
        up.rest.advance(take);
        exchange.add_in(take as u64);
        left -= take as u64;
    }
    io.flush().await?;
    Ok(true)
}

async fn copy_to_end<I: AsyncWrite + Unpin>(
    io: &mut I,
    up: &mut Body<'_>,
    exchange: &Exchange,
    out: &mut Vec<u8>,
) -> std::io::Result<()> {
    exchange.add_in(up.rest.len() as u64);
    out.extend_from_slice(up.rest);
    up.rest.clear();
    write_all(io, out).await?;
    loop {
        match fill_large(up).await {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                io.flush().await?;
                return Ok(());
            }
            Err(e) => return Err(e),
        }
        exchange.add_in(up.rest.len() as u64);
        io.write_all(up.rest).await?;
        up.rest.clear();
    }
}

/// Bytes read from the upstream at once while relaying a long body.
const LARGE_READ: usize = 64 * 1024;

/// [`fill`] with room for [`LARGE_READ`] bytes.
async fn fill_large(up: &mut Body<'_>) -> std::io::Result<()> {
    if up.rest.is_empty() && up.rest.capacity() < LARGE_READ {
        *up.rest = BytesMut::with_capacity(LARGE_READ);
    } else if up.rest.capacity() - up.rest.len() < LARGE_READ / 2 {
        up.rest.reserve(LARGE_READ);
    }
    if up.stream.read_buf(&mut *up.rest).await? == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

/// Longest chunk-size line (with extensions) or trailer line accepted.
const MAX_CHUNK_LINE: usize = 4 * 1024;

/// Takes one CRLF-terminated line from `up.rest` (without the CRLF), reading as needed.
async fn line(up: &mut Body<'_>) -> std::io::Result<Bytes> {
    loop {
        if let Some(at) = up.rest.windows(2).position(|w| w == b"\r\n") {
            let line = up.rest.split_to(at).freeze();
            up.rest.advance(2);
            return Ok(line);
        }
        if up.rest.len() > MAX_CHUNK_LINE {
            return Err(std::io::ErrorKind::InvalidData.into());
        }
        fill(up).await?;
    }
}

async fn copy_chunked<I: AsyncWrite + Unpin>(
    io: &mut I,
    up: &mut Body<'_>,
    exchange: &Exchange,
    out: &mut Vec<u8>,
) -> std::io::Result<bool> {
    loop {
        let size = chunk_size(&line(up).await?)?;
        if size == 0 {
            // Trailers are dropped, as hyper's path does for a client that did not ask for them.
            while !line(up).await?.is_empty() {}
            out.extend_from_slice(b"0\r\n\r\n");
            write_all(io, out).await?;
            return Ok(true);
        }
        out.put_slice(format!("{size:x}\r\n").as_bytes());
        let mut left = size;
        while left > 0 {
            if up.rest.is_empty() {
                if out.len() >= FLUSH_AT {
                    write_all(io, out).await?;
                }
                fill(up).await?;
            }
            let take = (up.rest.len() as u64).min(left) as usize;
            out.extend_from_slice(&up.rest[..take]);
            up.rest.advance(take);
            exchange.add_in(take as u64);
            left -= take as u64;
        }
        if !line(up).await?.is_empty() {
            return Err(std::io::ErrorKind::InvalidData.into());
        }
        out.extend_from_slice(b"\r\n");
        if up.rest.is_empty() {
            // Whatever is gathered goes out before waiting for the next chunk.
            write_all(io, out).await?;
        }
    }
}

/// The size a chunk-size line states (extensions ignored).
fn chunk_size(line: &[u8]) -> std::io::Result<u64> {
    let invalid = || std::io::Error::from(std::io::ErrorKind::InvalidData);
    let digits = line
        .split(|&b| b == b';')
        .next()
        .unwrap_or_default()
        .trim_ascii();
    if digits.is_empty() || digits.len() > 16 || !digits.iter().all(u8::is_ascii_hexdigit) {
        return Err(invalid());
    }
    u64::from_str_radix(std::str::from_utf8(digits).map_err(|_| invalid())?, 16)
        .map_err(|_| invalid())
}

/// Relays a body through `scan` (decoded, then scrubbed), read by the upstream's `framing` and
/// delivered chunked, or to the end of the client connection for a body that ends with the
/// upstream's. What is scanned goes out before each wait for more, so a streamed answer streams.
/// An error (a decoding one included) leaves the client a truncated response, never unscanned
/// bytes. `Ok(true)` when the upstream connection is clean for another request.
async fn copy_scrubbed<I: AsyncWrite + Unpin>(
    io: &mut I,
    up: &mut Body<'_>,
    framing: Framing,
    exchange: &Exchange,
    out: &mut Vec<u8>,
    scan: &mut Scan,
) -> std::io::Result<bool> {
    let chunked = framing != Framing::Close;
    let mut plain = Vec::new();
    // Scans up to `left` bytes of what was read, into `out` as a chunk; returns how many.
    let mut scan_some = |up: &mut Body<'_>, left: u64, out: &mut Vec<u8>| {
        let take = (up.rest.len() as u64).min(left) as usize;
        scan.feed(&up.rest[..take], &mut plain)?;
        up.rest.advance(take);
        exchange.add_in(take as u64);
        put_chunk(out, &mut plain, chunked);
        std::io::Result::Ok(take as u64)
    };
    match framing {
        Framing::None => {}
        Framing::Length(mut left) => {
            while left > 0 {
                if up.rest.is_empty() {
                    deliver(io, out).await?;
                    fill(up).await?;
                }
                left -= scan_some(up, left, out)?;
            }
        }
        Framing::Chunked => loop {
            let size = chunk_size(&line(up).await?)?;
            if size == 0 {
                // Trailers are dropped, as for a body relayed unscanned.
                while !line(up).await?.is_empty() {}
                break;
            }
            let mut left = size;
            while left > 0 {
                if up.rest.is_empty() {
                    deliver(io, out).await?;
                    fill(up).await?;
                }
                left -= scan_some(up, left, out)?;
            }
            if !line(up).await?.is_empty() {
                return Err(std::io::ErrorKind::InvalidData.into());
            }
        },
        Framing::Close => loop {
            if up.rest.is_empty() {
                deliver(io, out).await?;
                match fill(up).await {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
                    Err(e) => return Err(e),
                }
            }
            scan_some(up, u64::MAX, out)?;
        },
    }
    scan.end(&mut plain)?;
    put_chunk(out, &mut plain, chunked);
    if chunked {
        out.extend_from_slice(b"0\r\n\r\n");
    }
    write_all(io, out).await?;
    Ok(chunked)
}

/// Appends `data` (then emptied) to `out`, as one chunk when `chunked`.
fn put_chunk(out: &mut Vec<u8>, data: &mut Vec<u8>, chunked: bool) {
    if data.is_empty() {
        return;
    }
    if chunked {
        out.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
    }
    out.extend_from_slice(data);
    if chunked {
        out.extend_from_slice(b"\r\n");
    }
    data.clear();
}

/// Writes what `out` holds, if anything.
async fn deliver<I: AsyncWrite + Unpin>(io: &mut I, out: &mut Vec<u8>) -> std::io::Result<()> {
    if out.is_empty() {
        return Ok(());
    }
    write_all(io, out).await
}

fn write_headers(out: &mut Vec<u8>, headers: &HeaderMap) {
    for (name, value) in headers {
        write_header(out, name.as_str().as_bytes(), value.as_bytes());
    }
}

fn write_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Writes one of the proxy's own answers ([`deny`]); `Ok(true)` when the connection stays open.
async fn answer<I: AsyncWrite + Unpin>(
    io: &mut I,
    res: Response<ProxyBody>,
    is_head: bool,
    close: bool,
    out: &mut Vec<u8>,
) -> Result<bool, ()> {
    let (parts, body) = res.into_parts();
    let body = body.collect().await.map_err(|_| ())?.to_bytes();
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(parts.status.as_str().as_bytes());
    out.push(b' ');
    match parts.extensions.get::<hyper::ext::ReasonPhrase>() {
        Some(phrase) => out.extend_from_slice(phrase.as_bytes()),
        None => out.extend_from_slice(parts.status.canonical_reason().unwrap_or("").as_bytes()),
    }
    out.extend_from_slice(b"\r\n");
    write_headers(out, &parts.headers);
    out.put_slice(format!("content-length: {}\r\n", body.len()).as_bytes());
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if !is_head {
        out.extend_from_slice(&body);
    }
    write_all(io, out).await.map_err(|_| ())?;
    Ok(!close)
}

/// The lean path's byte handling of one exchange, for the fuzz target `lean_heads`: `request`
/// through [`parse_request`] (as a proxy request, then in an HTTPS tunnel to `a.test`) and
/// [`rewrite_head`] (substituting `table`'s placeholders, an override dropping and adding
/// `x-key`), `response` through [`response_head`] with and without `table`'s patterns. Panics if
/// what it writes is not a complete head of the same request (method, target up to the query) or
/// a complete response head, or if a CR or LF got into a header value.
#[cfg(feature = "fuzzing")]
pub(super) fn fuzz_heads(request: &[u8], response: &[u8], table: &crate::secrets::Table) {
    let tunnel = Tunnel {
        host: Arc::from("a.test"),
        port: 443,
        scheme: Scheme::Https,
        sni_mismatch: None,
        refusal: None,
    };
    for tunnel in [None, Some(&tunnel)] {
        let mut out = Vec::new();
        let Some(parsed) = parse_request(request, None, tunnel, &mut out) else {
            continue;
        };
        assert!(parsed.len <= request.len() && parsed.body_len <= MAX_BODY);
        assert!(!(parsed.chunked && parsed.body_len > 0));
        if parsed.chunked {
            // Every chunk read lies inside the input.
            let mut at = parsed.len;
            loop {
                match next_chunk(&request[at..]) {
                    ChunkStep::Data { start, len } => {
                        assert!(at + start + len + 2 <= request.len());
                        at += start + len + 2;
                    }
                    ChunkStep::Last(len) => {
                        assert!(at + len <= request.len());
                        break;
                    }
                    ChunkStep::Partial | ChunkStep::Refused => break,
                }
            }
        }
        let dropped = [(
            http::HeaderName::from_static("x-key"),
            OverrideValue::Template(
                crate::config::Template::parse("k {{secrets.KEY}}").expect("a template"),
            ),
        )];
        let added = [(
            http::HeaderName::from_static("x-key"),
            HeaderValue::from_static("added"),
        )];
        let how = Rewrite {
            secrets: Some(table),
            dropped: &dropped,
            added: &added,
            narrow: true,
        };
        rewrite_head(&mut out, &how);
        let mut raw = [httparse::EMPTY_HEADER; MAX_HEADERS + 2];
        let mut again = httparse::Request::new(&mut raw);
        let Ok(httparse::Status::Complete(len)) = again.parse(&out) else {
            panic!(
                "the rewritten head does not parse: {:?}",
                String::from_utf8_lossy(&out)
            );
        };
        assert_eq!(len, out.len(), "one head, nothing after it");
        assert_eq!(again.method, Some(parsed.method.as_str()));
        let path = |t: &str| t.split('?').next().unwrap_or("").to_owned();
        let target = &parsed.target.path_and_query;
        assert_eq!(again.path.map(path), Some(path(target)));
        let keys = again
            .headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case("x-key"));
        assert_eq!(keys.map(|h| h.value).collect::<Vec<_>>(), [b"added"]);
    }
    for patterns in [None, table.patterns().map(|p| &**p)] {
        for (is_head, close) in [(false, false), (true, true)] {
            let mut out = Vec::new();
            if response_head(response, is_head, close, &mut out, patterns).is_none() {
                continue;
            }
            let mut raw = [httparse::EMPTY_HEADER; MAX_HEADERS + 4];
            let mut again = httparse::Response::new(&mut raw);
            let Ok(httparse::Status::Complete(len)) = again.parse(&out) else {
                panic!(
                    "the client's head does not parse: {:?}",
                    String::from_utf8_lossy(&out)
                );
            };
            assert_eq!(len, out.len(), "one head, nothing after it");
        }
    }
}

/// Returns an idle connection that was taken and not used to its client's pool.
fn give_back(key: &LeanKey, taken: Option<Taken>) {
    if let Some(t) = taken {
        t.client.lean_put(key.clone(), t.stream, t.decided);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The request and the head it sends upstream, for a head read on a proxy connection
    /// without a credential.
    fn lean(text: &str) -> Option<(Request, String)> {
        let mut out = Vec::new();
        parse_request(text.as_bytes(), None, None, &mut out).map(|r| {
            assert_eq!(r.len, text.len());
            (r, String::from_utf8(out).unwrap())
        })
    }

    fn tunnel(host: &str, port: u16, scheme: Scheme) -> Tunnel {
        Tunnel {
            host: Arc::from(host),
            port,
            sni_mismatch: None,
            scheme,
            refusal: None,
        }
    }

    #[test]
    fn only_requests_with_plain_framing_are_lean() {
        let is_lean = |t: &str| lean(t).is_some();
        assert!(is_lean(
            "GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\n\r\n"
        ));
        assert!(is_lean("HEAD http://a.test/ HTTP/1.1\r\n\r\n"));
        assert!(is_lean(
            "OPTIONS http://a.test/x HTTP/1.1\r\nConnection: keep-alive\r\n\r\n"
        ));
        let (closing, _) =
            lean("GET http://a.test/ HTTP/1.1\r\nConnection: Close\r\n\r\n").unwrap();
        assert!(closing.close);
        // a body stated by one Content-Length, up to 64 KiB, on a method that carries one
        for (text, len) in [
            (
                "POST http://a.test/ HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
                0,
            ),
            (
                "PUT http://a.test/ HTTP/1.1\r\ncontent-length: 65536\r\n\r\n",
                65536,
            ),
            (
                "PATCH http://a.test/ HTTP/1.1\r\nContent-Length: 2\r\n\r\n",
                2,
            ),
            ("DELETE http://a.test/ HTTP/1.1\r\n\r\n", 0),
        ] {
            let (request, out) = lean(text).unwrap();
            assert_eq!(
                (request.body_len, request.chunked),
                (len, false),
                "{text:?}"
            );
            // The framing goes upstream as it was stated.
            let stated = |t: &str| t.to_ascii_lowercase().contains("content-length");
            assert_eq!(stated(&out), stated(text), "{text:?}");
        }
        // or by one `chunked`: decoded, then sent with a length (added once it is known)
        for text in [
            "POST http://a.test/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "PUT http://a.test/ HTTP/1.1\r\ntransfer-encoding: Chunked\r\nx-a: 1\r\n\r\n",
        ] {
            let (request, out) = lean(text).unwrap();
            assert_eq!((request.body_len, request.chunked), (0, true), "{text:?}");
            assert!(
                !out.to_ascii_lowercase().contains("transfer-encoding"),
                "{out:?}"
            );
        }
        // any other body, or any framing to interpret: hyper decides
        let not_lean = [
            "POST http://a.test/ HTTP/1.1\r\nContent-Length: 65537\r\n\r\n",
            "POST http://a.test/ HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n",
            "POST http://a.test/ HTTP/1.1\r\nContent-Length: 2, 2\r\n\r\n",
            "POST http://a.test/ HTTP/1.1\r\nContent-Length: +2\r\n\r\n",
            "POST http://a.test/ HTTP/1.1\r\nContent-Length: 0000002\r\n\r\n",
            "POST http://a.test/ HTTP/1.1\r\nContent-Length: \r\n\r\n",
            "POST http://a.test/ HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            "POST http://a.test/ HTTP/1.1\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
            "POST http://a.test/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST http://a.test/ HTTP/1.1\r\nTransfer-Encoding: identity\r\n\r\n",
            "POST http://a.test/ HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST http://a.test/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
            "POST http://a.test/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTrailer: x-sum\r\n\r\n",
            "POST http://a.test/ HTTP/1.1\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n",
            "TRACE http://a.test/ HTTP/1.1\r\n\r\n",
            "GET http://a.test/ HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
            "GET http://a.test/ HTTP/1.1\r\nContent-Length: 5\r\n\r\n",
            "GET http://a.test/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET http://a.test/ HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET http://a.test/ HTTP/1.1\r\nConnection: upgrade\r\nUpgrade: h2c\r\n\r\n",
            "GET http://a.test/ HTTP/1.1\r\nConnection: keep-alive, x-drop\r\n\r\n",
            "GET http://a.test/ HTTP/1.1\r\nExpect: 100-continue\r\n\r\n",
            "GET http://a.test/ HTTP/1.1\r\nTE: trailers\r\n\r\n",
            "GET http://a.test/ HTTP/1.0\r\n\r\n",
            "CONNECT a.test:443 HTTP/1.1\r\n\r\n",
            "GET http://a.test/ HTTP/1.1\r\nBad Name: x\r\n\r\n",
            "GET http://a.test/ HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n",
            // a method override: the gate must decide that method too
            "GET http://a.test/ HTTP/1.1\r\nX-HTTP-Method-Override: DELETE\r\n\r\n",
            "GET http://a.test/?_method=DELETE HTTP/1.1\r\n\r\n",
            "GET http://a.test/?_%6Dethod=DELETE HTTP/1.1\r\n\r\n",
            // not absolute-form on a proxy connection, or not http
            "GET / HTTP/1.1\r\nHost: a.test\r\n\r\n",
            "GET https://a.test/ HTTP/1.1\r\n\r\n",
        ];
        for text in not_lean {
            assert!(!is_lean(text), "{text:?} went lean");
        }
    }

    #[test]
    fn the_upstream_head_is_origin_form_without_hop_by_hop_headers() {
        let (request, out) = lean(concat!(
            "GET http://A.test:8080/p?q=1 HTTP/1.1\r\n",
            "Host: elsewhere.test\r\n",
            "Accept: */*\r\n",
            "Proxy-Authorization: Basic eA==\r\n",
            "Keep-Alive: 5\r\n",
            "Proxy-Connection: keep-alive\r\n",
            "Connection: close\r\n",
            "Close: x\r\n",
            "X-Trace: a b\r\n",
            "\r\n"
        ))
        .unwrap();
        assert_eq!(request.target.host, "a.test");
        assert_eq!(request.target.port, 8080);
        assert_eq!(request.target.path_and_query, "/p?q=1");
        assert_eq!(
            out,
            "GET /p?q=1 HTTP/1.1\r\nhost: a.test:8080\r\nAccept: */*\r\nX-Trace: a b\r\n\r\n"
        );
        let (_, out) = lean("GET http://[::1]/ HTTP/1.1\r\n\r\n").unwrap();
        assert_eq!(out, "GET / HTTP/1.1\r\nhost: [::1]\r\n\r\n");
    }

    #[test]
    fn a_chunked_request_body_is_taken_only_as_strictly_framed() {
        use ChunkStep::*;
        assert_eq!(next_chunk(b"5\r\nhello\r\n"), Data { start: 3, len: 5 });
        assert_eq!(
            next_chunk(b"00A\r\n0123456789\r\n0"),
            Data { start: 5, len: 10 }
        );
        assert_eq!(next_chunk(b"0\r\n\r\n"), Last(5));
        assert_eq!(next_chunk(b"0000\r\n\r\nGET"), Last(8));
        for partial in [
            "",
            "5",
            "5\r",
            "5\r\n",
            "5\r\nhel",
            "5\r\nhello",
            "5\r\nhello\r",
            "0\r\n",
            "0\r\n\r",
            "1000",
        ] {
            assert_eq!(next_chunk(partial.as_bytes()), Partial, "{partial:?}");
        }
        for refused in [
            "\r\n",                 // no size
            "5;ext=1\r\nhello\r\n", // an extension
            "5 \r\nhello\r\n",      // whitespace
            "5\nhello\r\n",         // a bare LF
            "-5\r\nhello\r\n",
            "0x5\r\nhello\r\n",
            "5\r\nhello!\r\n", // more data than stated
            "5\r\nhelloX",
            "0\r\nx-sum: 1\r\n\r\n", // a trailer
            "0\r\nx",
            "000000001\r\nx\r\n", // nine digits
            "10001\r\n",          // one chunk over 64 KiB
        ] {
            assert_eq!(next_chunk(refused.as_bytes()), Refused, "{refused:?}");
        }
    }

    #[tokio::test]
    async fn a_chunked_body_is_read_whole_and_decoded_or_handed_to_hyper() {
        // `wire` already read after a 4-byte head, then the two parts as two reads, then the end.
        let read = |wire: &'static [u8], first: &'static [u8], second: &'static [u8]| {
            let mut io = AsyncReadExt::chain(first, second);
            let mut buf = BytesMut::from(wire);
            async move {
                let got = read_chunked(&mut io, &mut buf, 4).await;
                (got, buf)
            }
        };
        // Split across reads, with the next request behind it.
        let (got, buf) = read(b"HEAD5\r\nhel", b"lo\r\n2\r", b"\n, \r\n0\r\n\r\nNEXT").await;
        let Chunked::Complete { raw, body } = got else {
            panic!("not complete");
        };
        assert_eq!(&body[..], b"hello, ");
        assert_eq!(&buf[4 + raw..], b"NEXT");
        // Over 64 KiB decoded, in chunks that each fit: hyper's, with every byte still in `buf`.
        let wire: &'static [u8] = Box::leak(
            [
                &b"HEAD"[..],
                &b"8000\r\n"[..],
                &[b'a'; 0x8000],
                b"\r\n",
                b"8000\r\n",
                &[b'b'; 0x8000],
                b"\r\n",
                b"1\r\nc\r\n0\r\n\r\n",
            ]
            .concat()
            .into_boxed_slice(),
        );
        let (got, buf) = read(wire, b"", b"").await;
        assert!(matches!(got, Chunked::Handoff));
        assert_eq!(&buf[..], wire);
        // A trailer: hyper's.
        let (got, _) = read(b"HEAD1\r\nx\r\n0\r\nx-sum: 1\r\n\r\n", b"", b"").await;
        assert!(matches!(got, Chunked::Handoff));
        // The client gone mid-body.
        let (got, _) = read(b"HEAD5\r\nhe", b"", b"").await;
        assert!(matches!(got, Chunked::Closed));
    }

    #[test]
    fn a_proxy_connection_with_a_credential_needs_it_on_every_request() {
        let expected = HeaderValue::from_static("Basic aGl2ZTpzM2NyZXQ=");
        let parse = |text: &str| {
            parse_request(text.as_bytes(), Some(&expected), None, &mut Vec::new()).is_some()
        };
        assert!(parse(
            "GET http://a.test/ HTTP/1.1\r\nProxy-Authorization: Basic aGl2ZTpzM2NyZXQ=\r\n\r\n"
        ));
        assert!(parse(
            "GET http://a.test/ HTTP/1.1\r\nProxy-Authorization: basic aGl2ZTpzM2NyZXQ=\r\n\r\n"
        ));
        assert!(!parse("GET http://a.test/ HTTP/1.1\r\n\r\n"));
        assert!(!parse(
            "GET http://a.test/ HTTP/1.1\r\nProxy-Authorization: Basic aGl2ZTpzM2NyZXQ\r\n\r\n"
        ));
        assert!(!parse(
            "GET http://a.test/ HTTP/1.1\r\nProxy-Authorization: Basic aGl2ZTpzM2NyZXP=\r\n\r\n"
        ));
    }

    #[test]
    fn a_tunnel_takes_origin_form_requests_for_its_own_host() {
        let https = tunnel("a.test", 443, Scheme::Https);
        let parse = |text: &str, t: &Tunnel| {
            let mut out = Vec::new();
            parse_request(text.as_bytes(), None, Some(t), &mut out)
                .map(|r| (r.target.scheme, String::from_utf8(out).unwrap()))
        };
        assert_eq!(
            parse("GET /x HTTP/1.1\r\nHost: a.test\r\n\r\n", &https),
            Some((
                Scheme::Https,
                "GET /x HTTP/1.1\r\nhost: a.test\r\n\r\n".to_owned()
            ))
        );
        assert!(parse("GET /x HTTP/1.1\r\nHost: a.test:443\r\n\r\n", &https).is_some());
        assert!(parse("GET /x HTTP/1.1\r\nHost: b.test\r\n\r\n", &https).is_none());
        assert!(parse("GET /x HTTP/1.1\r\nHost: a.test:8443\r\n\r\n", &https).is_none());
        assert!(parse("GET /x HTTP/1.1\r\n\r\n", &https).is_none());
        assert!(parse(
            "GET /x HTTP/1.1\r\nHost: a.test\r\nHost: a.test\r\n\r\n",
            &https
        )
        .is_none());
        assert!(parse(
            "GET http://a.test/x HTTP/1.1\r\nHost: a.test\r\n\r\n",
            &https
        )
        .is_none());
        let plain = tunnel("a.test", 8080, Scheme::Http);
        assert_eq!(
            parse("GET / HTTP/1.1\r\nHost: a.test:8080\r\n\r\n", &plain),
            Some((
                Scheme::Http,
                "GET / HTTP/1.1\r\nhost: a.test:8080\r\n\r\n".to_owned()
            ))
        );
    }

    /// A head: its first line, then these headers.
    fn head_text(first: &str, pairs: &[(&str, &str)]) -> String {
        let mut head = format!("{first}\r\n");
        for (n, v) in pairs {
            head.push_str(&format!("{n}: {v}\r\n"));
        }
        head + "\r\n"
    }

    /// The headers of a head written by the lean path, names lowercased, sorted, without `own`
    /// (a header the lean path writes itself).
    fn relayed(head: &[u8], own: &str) -> Vec<(String, String)> {
        let text = String::from_utf8(head.to_vec()).unwrap();
        let mut lines: Vec<(String, String)> = text
            .split("\r\n")
            .skip(1)
            .take_while(|l| !l.is_empty())
            .map(|l| {
                let (n, v) = l.split_once(": ").unwrap();
                (n.to_ascii_lowercase(), v.to_owned())
            })
            .filter(|(n, _)| n != own)
            .collect();
        lines.sort();
        lines
    }

    /// The same headers after hyper's path: a map, [`headers::strip_hop_by_hop`], and `drop`.
    fn stripped(pairs: &[(&str, &str)], drop: &[&str]) -> Vec<(String, String)> {
        let mut map = HeaderMap::new();
        for (n, v) in pairs {
            map.append(
                http::header::HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        headers::strip_hop_by_hop(&mut map, false);
        for name in drop {
            map.remove(*name);
        }
        let mut out: Vec<(String, String)> = map
            .iter()
            .map(|(n, v)| (n.as_str().to_owned(), v.to_str().unwrap().to_owned()))
            .collect();
        out.sort();
        out
    }

    /// The raw filters must remove what [`headers::strip_hop_by_hop`] removes on hyper's path,
    /// no more and no less, or the two paths would relay different headers.
    #[test]
    fn the_byte_filters_remove_what_hypers_path_removes() {
        let request: &[(&str, &str)] = &[
            ("Accept", "*/*"),
            ("Connection", "close"),
            ("Close", "x"),
            ("Keep-Alive", "5"),
            ("Proxy-Connection", "keep-alive"),
            ("Proxy-Authorization", "Basic eA=="),
            ("Proxy-Authenticate", "Basic"),
            ("X-A", "1"),
            ("x-a", "2"),
            ("User-Agent", "curl/8"),
        ];
        let head = head_text("GET http://a.test/ HTTP/1.1", request);
        let mut out = Vec::new();
        parse_request(head.as_bytes(), None, None, &mut out).unwrap();
        // `Host` is written by the lean path itself, from the target
        assert_eq!(relayed(&out, "host"), stripped(request, &["host"]));

        let response: &[(&str, &str)] = &[
            ("Content-Type", "text/plain"),
            ("Connection", "keep-alive, X-Hop, content-type"),
            ("X-Hop", "1"),
            ("Keep-Alive", "timeout=5"),
            ("Proxy-Connection", "keep-alive"),
            ("Proxy-Authenticate", "Basic"),
            ("TE", "gzip, trailers"),
            ("Trailer", "x"),
            ("Upgrade", "h2c"),
            ("Set-Cookie", "a=1"),
            ("Set-Cookie", "b=2"),
            ("Content-Length", "0"),
        ];
        let head = head_text("HTTP/1.1 200 OK", response);
        let mut out = Vec::new();
        response_head(head.as_bytes(), false, false, &mut out, None).unwrap();
        // the framing is stated by the lean path itself
        let expected = stripped(response, &["content-length"]);
        assert_eq!(relayed(&out, "content-length"), expected);
    }

    /// The framing of a response with these headers, as text.
    fn framing(status: u16, is_head: bool, pairs: &[(&str, &str)]) -> String {
        let headers: Vec<httparse::Header> = pairs
            .iter()
            .map(|(name, value)| httparse::Header {
                name,
                value: value.as_bytes(),
            })
            .collect();
        match response_framing(status, is_head, &headers) {
            None => "invalid".to_string(),
            Some(Framing::None) => "none".to_string(),
            Some(Framing::Length(n)) => format!("length {n}"),
            Some(Framing::Chunked) => "chunked".to_string(),
            Some(Framing::Close) => "close".to_string(),
        }
    }

    #[test]
    fn response_framing_is_read_strictly() {
        assert_eq!(
            framing(200, false, &[("content-length", "12")]),
            "length 12"
        );
        assert_eq!(
            framing(200, false, &[("Content-Length", "3, 3")]),
            "length 3"
        );
        assert_eq!(
            framing(
                200,
                false,
                &[("content-length", "3"), ("content-length", "4")]
            ),
            "invalid"
        );
        assert_eq!(framing(200, false, &[("content-length", "+3")]), "invalid");
        assert_eq!(framing(200, false, &[("content-length", "-1")]), "invalid");
        // Transfer-Encoding wins over Content-Length; a final coding other than chunked reads
        // to the end of the connection
        assert_eq!(
            framing(
                200,
                false,
                &[("transfer-encoding", "chunked"), ("content-length", "3")]
            ),
            "chunked"
        );
        assert_eq!(
            framing(200, false, &[("Transfer-Encoding", "gzip, chunked")]),
            "chunked"
        );
        assert_eq!(
            framing(
                200,
                false,
                &[
                    ("transfer-encoding", "gzip"),
                    ("transfer-encoding", "chunked")
                ]
            ),
            "chunked"
        );
        assert_eq!(
            framing(200, false, &[("transfer-encoding", "chunked, gzip")]),
            "close"
        );
        assert_eq!(framing(200, false, &[]), "close");
        assert_eq!(framing(200, true, &[("content-length", "12")]), "none");
        assert_eq!(framing(204, false, &[("content-length", "12")]), "none");
        assert_eq!(
            framing(304, false, &[("transfer-encoding", "chunked")]),
            "none"
        );
    }

    #[test]
    fn the_client_head_drops_hop_by_hop_headers_and_states_the_framing_once() {
        let relay = |head: &str, is_head: bool, client_close: bool| {
            let mut out = Vec::new();
            response_head(head.as_bytes(), is_head, client_close, &mut out, None)
                .map(|h| (h.status, h.upstream_close, String::from_utf8(out).unwrap()))
        };
        let head = concat!(
            "HTTP/1.1 200 Fine\r\n",
            "Content-Type: text/plain\r\n",
            "Content-Length: 3, 3\r\n",
            "Connection: keep-alive, X-Hop\r\n",
            "X-Hop: 1\r\n",
            "Keep-Alive: timeout=5\r\n",
            "Proxy-Authenticate: Basic\r\n",
            "Upgrade: h2c\r\n",
            "Trailer: x\r\n",
            "\r\n"
        );
        assert_eq!(
            relay(head, false, false),
            Some((
                200,
                false,
                "HTTP/1.1 200 Fine\r\nContent-Type: text/plain\r\ncontent-length: 3\r\n\r\n"
                    .to_owned()
            ))
        );
        // a HEAD answer keeps its length as sent; a client that asked to close is told so
        assert_eq!(
            relay("HTTP/1.1 200 \r\nContent-Length: 9\r\n\r\n", true, true)
                .unwrap()
                .2,
            "HTTP/1.1 200 OK\r\nContent-Length: 9\r\nconnection: close\r\n\r\n"
        );
        // chunked goes out chunked; a body to the end of the connection closes the client's
        assert_eq!(
            relay(
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\nContent-Length: 4\r\n\r\n",
                false,
                false
            )
            .unwrap()
            .2,
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
        );
        assert_eq!(
            relay("HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n", false, false),
            Some((
                200,
                true,
                "HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n".to_owned()
            ))
        );
        assert!(relay(
            "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            false,
            false
        )
        .is_none());
    }
}
