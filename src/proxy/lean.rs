//! The lean HTTP/1.1 path: the most common request an agent sends (an HTTP/1.1 `GET`, `HEAD` or
//! `OPTIONS` without a body, allowed by a rule that injects nothing, in a sandbox without named
//! secrets) is parsed with `httparse` and relayed over an upstream connection this client
//! connection keeps, without hyper's per-request machinery on either leg (docs/decisions.md,
//! "Lean HTTP/1.1 path"). Anything else, from the first request that is not such a request, is
//! handed to hyper with the bytes already read ([`Prefixed`]), before anything about that request
//! was decided, emitted or sent.
//!
//! Decisions, events and denials are the ones [`http::forward`](super::http::forward) makes: the
//! same gate ([`gate::check_from`]), the same [`Auditor`] and the same [`deny`] answers.
//!
//! # Security
//! - A request is taken only when its framing leaves nothing to interpret: no body, no
//!   `Content-Length`, no `Transfer-Encoding`, no `Upgrade` or `Expect`, `Connection` at most
//!   `keep-alive` or `close`, no method-override header or `_method` parameter. Everything else
//!   (including every malformed head, which hyper answers with `400`) goes to hyper.
//! - A response's framing is read strictly: `Transfer-Encoding` ending in `chunked` is decoded and
//!   encoded again (extensions and trailers dropped); differing `Content-Length` values fail the
//!   exchange (`502`); a body without either is read to the end and the client connection closed
//!   after it. Hop-by-hop headers are removed both ways ([`headers::strip_hop_by_hop`]).
//! - Upstream connections speak HTTP/1.1 only (the h1 connector: no h2 by ALPN) and connect to
//!   the addresses the gate pinned, as hyper's client does.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Response, StatusCode};
use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::config::normalize_host;
use crate::policy::{reason, Access, Decision, Scheme};

use super::audit::{Auditor, Exchange, Subject};
use super::connect::Prefixed;
use super::deny::{self, ProxyBody, UpstreamFailure};
use super::gate::{self, Ask, Outcome};
use super::headers;
use super::http::{default_port, split_authority, upstream_uri, Tunnel};
use super::listener::Conn;
use super::upstream::{LeanKey, LeanStream, UpstreamClient};
use super::{HEADER_READ_TIMEOUT, MAX_HEADER_BYTES};

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

/// The connection's upstream leg, kept between its requests.
struct Kept {
    key: LeanKey,
    stream: LeanStream,
    client: Arc<UpstreamClient>,
}

/// A request head the lean path may take, owned.
struct Head {
    method: Method,
    /// The request target as sent (absolute-form on a proxy connection, origin-form in a tunnel).
    target: String,
    headers: HeaderMap,
    /// The client asked to close after this exchange.
    close: bool,
}

/// Serves requests on `io` while they are lean requests; see the module docs.
pub async fn serve<I>(mut io: I, conn: &Conn, tunnel: Option<&Tunnel>) -> Served<I>
where
    I: AsyncRead + AsyncWrite + Unpin + Send,
{
    if !connection_is_lean(tunnel) {
        return Served::Handoff(Prefixed::new(Bytes::new(), io));
    }
    let mut buf = BytesMut::with_capacity(8 * 1024);
    let mut kept: Option<Kept> = None;
    let mut out: Vec<u8> = Vec::with_capacity(4 * 1024);
    let mut draining = std::pin::pin!(conn.ctl.reached(super::listener::Phase::Draining));
    loop {
        // No new request once the listener is closing (hyper's graceful shutdown does the same).
        if conn.ctl.is_closed() {
            give_back(kept);
            return Served::Done;
        }
        // The next head: wait for it, unless the listener is closing.
        match read_head(&mut io, &mut buf, &mut draining).await {
            HeadRead::Complete => {}
            HeadRead::Handoff => break,
            HeadRead::Closed => {
                give_back(kept);
                return Served::Done;
            }
        }
        let Some((head, head_len)) = parse_request(&buf) else {
            break;
        };
        let Some(target) = lean_target(conn, tunnel, &head) else {
            break;
        };
        let compiled = conn.engine.cell.load_full();
        if !compiled.secrets.is_empty() {
            break;
        }
        if !plainly_allowed(&compiled.policy, &head, &target) {
            break;
        }
        // From here this request is the lean path's.
        buf.advance(head_len);
        conn.engine
            .lean_requests
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let _busy = conn.idle.busy();
        let keep_open = exchange(&mut io, conn, &compiled, head, &target, &mut kept, &mut out)
            .await
            .unwrap_or(false);
        if !keep_open {
            give_back(kept);
            let _ = io.shutdown().await;
            return Served::Done;
        }
    }
    give_back(kept);
    Served::Handoff(Prefixed::new(buf.freeze(), io))
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

/// The head at the start of `buf`, if it is one the lean path may take; with its length.
fn parse_request(buf: &[u8]) -> Option<(Head, usize)> {
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
        _ => return None,
    };
    let mut headers = HeaderMap::with_capacity(req.headers.len());
    let mut close = false;
    for h in req.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes()).ok()?;
        let value = HeaderValue::from_bytes(h.value).ok()?;
        if name == header::CONNECTION {
            match value.as_bytes() {
                v if v.eq_ignore_ascii_case(b"keep-alive") => {}
                v if v.eq_ignore_ascii_case(b"close") => close = true,
                _ => return None,
            }
        } else if name == header::CONTENT_LENGTH
            || name == header::TRANSFER_ENCODING
            || name == header::UPGRADE
            || name == header::EXPECT
            || name == header::TE
            || name == header::TRAILER
            || name.as_str() == "http2-settings"
        {
            return None;
        }
        headers.append(name, value);
    }
    Some((
        Head {
            method,
            target: req.path?.to_owned(),
            headers,
            close,
        },
        len,
    ))
}

/// Where a lean request goes.
struct Target {
    host: String,
    port: u16,
    scheme: Scheme,
    /// Path and query as sent.
    path_and_query: String,
}

/// The target of `head`, when the lean path may take it on this connection.
fn lean_target(conn: &Conn, tunnel: Option<&Tunnel>, head: &Head) -> Option<Target> {
    let query = head.target.split_once('?').map(|(_, q)| q);
    if !headers::override_methods(&head.headers, query)
        .ok()?
        .is_empty()
    {
        return None;
    }
    match tunnel {
        None => {
            if let Some(expected) = &conn.ctl.credential {
                if !headers::has_credential(&head.headers, expected) {
                    return None;
                }
            }
            let uri: http::Uri = head.target.parse().ok()?;
            if uri.scheme_str() != Some("http") {
                return None;
            }
            let host = normalize_host(uri.host()?)?;
            let port = uri.port_u16().unwrap_or(default_port(Scheme::Http));
            let path_and_query = uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
            Some(Target {
                host,
                port,
                scheme: Scheme::Http,
                path_and_query,
            })
        }
        Some(tunnel) => {
            // Origin-form only, and a target hyper would have parsed (else its `400`).
            if !head.target.starts_with('/')
                || http::uri::PathAndQuery::try_from(head.target.as_str()).is_err()
            {
                return None;
            }
            let mut hosts = head.headers.get_all(header::HOST).iter();
            let (Some(named), None) = (hosts.next(), hosts.next()) else {
                return None;
            };
            let (named_host, named_port) = split_authority(named.to_str().ok()?)?;
            if named_host != *tunnel.host || named_port.is_some_and(|p| p != tunnel.port) {
                return None;
            }
            Some(Target {
                host: tunnel.host.to_string(),
                port: tunnel.port,
                scheme: tunnel.scheme,
                path_and_query: head.target.clone(),
            })
        }
    }
}

/// Whether the policy alone allows the request by a rule that injects nothing, so that the gate
/// either allows it the same way or refuses it for the address (answered here like hyper's path
/// would). Requests the policy decides with addresses, in report mode, or by asking are not lean.
fn plainly_allowed(policy: &crate::policy::Policy, head: &Head, target: &Target) -> bool {
    if policy.uses_addresses() {
        return false;
    }
    let decision = policy.apply_mode(policy.decide(&crate::policy::Request {
        host: &target.host,
        port: target.port,
        method: head.method.as_str(),
        path: &target.path_and_query,
        scheme: target.scheme,
        ip: None,
    }));
    no_injection(policy, &decision)
}

fn no_injection(policy: &crate::policy::Policy, decision: &Decision) -> bool {
    decision.access == Access::Allowed
        && !decision.would_deny
        && decision
            .rule
            .and_then(|i| policy.rule(i))
            .is_some_and(|r| r.override_.is_none())
}

/// Decides and relays one request; `Ok(true)` when the client connection stays open.
async fn exchange<I>(
    io: &mut I,
    conn: &Conn,
    compiled: &crate::policy::Compiled,
    mut head: Head,
    target: &Target,
    kept: &mut Option<Kept>,
    out: &mut Vec<u8>,
) -> Result<bool, ()>
where
    I: AsyncRead + AsyncWrite + Unpin + Send,
{
    let engine = &conn.engine;
    let auditor = Auditor::new(engine.events.clone());
    let host = target.host.as_str();
    let port = target.port;
    let method = head.method.as_str();
    let event_path = target
        .path_and_query
        .split('?')
        .next()
        .unwrap_or("/")
        .to_owned();
    let subject = Subject {
        host,
        port,
        method,
        path: &event_path,
        scheme: target.scheme,
        via: conn.via(),
        origin: conn.origin().await,
        config_hash: Some(compiled.hash.clone()),
    };
    let is_head = head.method == Method::HEAD;
    let request = crate::policy::Request {
        host,
        port,
        method,
        path: &target.path_and_query,
        scheme: target.scheme,
        ip: None,
    };
    let outcome = gate::check_from(
        engine,
        compiled,
        host,
        port,
        Ask::Request(request, &[]),
        subject.origin.clone(),
    )
    .await;
    let (decision, client) = match outcome {
        Outcome::Denied(decision) => {
            auditor.request(&subject, &decision, &[]);
            let res = deny::forbidden(decision.reason, host, method, &event_path);
            return answer(io, res, is_head, head.close, out).await;
        }
        Outcome::Unreachable(decision, failure) => {
            if let Some(ex) = auditor.request(&subject, &decision, &[]) {
                ex.fail(failure, host, port, failure.describe());
            }
            let res = deny::bad_gateway(failure, host, method, &event_path);
            return answer(io, res, is_head, head.close, out).await;
        }
        Outcome::Allowed {
            decision, client, ..
        } => (decision, client),
    };
    if !no_injection(&compiled.policy, &decision) {
        // The gate decided otherwise than the policy alone (it should not): fail closed.
        let decision = Decision::denied(decision.rule, reason::NO_RULE);
        auditor.request(&subject, &decision, &[]);
        let res = deny::forbidden(decision.reason, host, method, &event_path);
        return answer(io, res, is_head, head.close, out).await;
    }
    let Some(exchange) = auditor.request(&subject, &decision, &[]) else {
        let res = deny::forbidden(decision.reason, host, method, &event_path);
        return answer(io, res, is_head, head.close, out).await;
    };
    let Some(uri) = upstream_uri(target.scheme, host, port, &target.path_and_query) else {
        exchange.set_status(400);
        let res = deny::bad_request("the request target cannot be forwarded");
        return answer(io, res, is_head, head.close, out).await;
    };

    // The request as hyper's client would send it: origin-form, `Host` from the URI.
    headers::strip_hop_by_hop(&mut head.headers, false);
    head.headers.remove(header::HOST);
    out.clear();
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(uri.path_and_query().map_or("/", |p| p.as_str()).as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    out.extend_from_slice(uri.host().unwrap_or(host).as_bytes());
    if port != default_port(target.scheme) {
        out.put_slice(format!(":{port}").as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    write_headers(out, &head.headers);
    out.extend_from_slice(b"\r\n");

    let key = LeanKey {
        scheme: target.scheme,
        host: Arc::from(host),
        port,
    };
    let timeout = compiled.config.upstream.response_timeout;
    let response = match send(kept, &client, &key, &uri, out, timeout).await {
        Ok(response) => response,
        Err(failure) => {
            exchange.fail(failure.0, host, port, &failure.1);
            let res = deny::bad_gateway(failure.0, host, method, &event_path);
            return answer(io, res, is_head, head.close, out).await;
        }
    };
    let asked = Asked {
        method,
        path: &event_path,
        is_head,
        close: head.close,
    };
    relay(io, kept, &asked, response, &exchange, out).await
}

/// A response head read from the upstream, and where its body is.
struct Upstream {
    status: StatusCode,
    reason: Option<String>,
    headers: HeaderMap,
    /// Bytes read past the head.
    rest: BytesMut,
    stream: LeanStream,
    key: LeanKey,
    client: Arc<UpstreamClient>,
}

/// Writes the request in `out` to the kept upstream connection (or a pooled or new one) and reads
/// the response head. A connection that was reused and fails before any response byte is
/// replaced once (the request has no body, and its method is safe to repeat).
async fn send(
    kept: &mut Option<Kept>,
    client: &Arc<UpstreamClient>,
    key: &LeanKey,
    uri: &http::Uri,
    out: &[u8],
    timeout: Duration,
) -> Result<Upstream, (UpstreamFailure, String)> {
    let mut reused = match kept.take() {
        Some(k) if k.key == *key && Arc::ptr_eq(&k.client, client) => Some(k.stream),
        other => {
            give_back(other);
            client.lean_take(key)
        }
    };
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let was_reused = reused.is_some();
        let mut stream = match reused.take() {
            Some(s) => s,
            None => client.lean_connect(uri.clone()).await.map_err(|e| {
                (
                    super::upstream::classify(&*e),
                    super::audit::error_chain(&*e),
                )
            })?,
        };
        let mut rest = BytesMut::with_capacity(8 * 1024);
        let head = async {
            stream.write_all(out).await?;
            stream.flush().await?;
            read_response_head(&mut stream, &mut rest).await
        };
        match tokio::time::timeout_at(deadline, head).await {
            Ok(Ok(Some((status, reason, headers)))) => {
                return Ok(Upstream {
                    status,
                    reason,
                    headers,
                    rest,
                    stream,
                    key: key.clone(),
                    client: client.clone(),
                })
            }
            Ok(Ok(None)) => {
                return Err((
                    UpstreamFailure::Exchange,
                    "malformed response head".to_owned(),
                ))
            }
            Ok(Err(_)) if was_reused && rest.is_empty() => continue,
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

/// Reads a final response head (informational `1xx` heads are skipped); `Ok(None)` when what
/// arrived is not a response head the lean path relays (`101`, malformed, too large).
async fn read_response_head(
    stream: &mut LeanStream,
    buf: &mut BytesMut,
) -> std::io::Result<Option<(StatusCode, Option<String>, HeaderMap)>> {
    loop {
        let parsed = {
            let mut raw = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut res = httparse::Response::new(&mut raw);
            match res.parse(buf) {
                Ok(httparse::Status::Complete(len)) => {
                    let Some(status) = res.code.and_then(|c| StatusCode::from_u16(c).ok()) else {
                        return Ok(None);
                    };
                    if res.version != Some(1) && res.version != Some(0) {
                        return Ok(None);
                    }
                    let mut headers = HeaderMap::with_capacity(res.headers.len());
                    for h in res.headers.iter() {
                        let (Ok(name), Ok(value)) = (
                            HeaderName::from_bytes(h.name.as_bytes()),
                            HeaderValue::from_bytes(h.value),
                        ) else {
                            return Ok(None);
                        };
                        headers.append(name, value);
                    }
                    let reason = res.reason.filter(|r| !r.is_empty()).map(str::to_owned);
                    Some((len, status, reason, headers))
                }
                Ok(httparse::Status::Partial) if buf.len() < MAX_HEADER_BYTES => None,
                _ => return Ok(None),
            }
        };
        match parsed {
            Some((len, status, _, _)) if status.is_informational() => {
                if status == StatusCode::SWITCHING_PROTOCOLS {
                    return Ok(None);
                }
                buf.advance(len);
            }
            Some((len, status, reason, headers)) => {
                buf.advance(len);
                return Ok(Some((status, reason, headers)));
            }
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
    method: &'a str,
    /// The path without the query (as events and denials show it).
    path: &'a str,
    is_head: bool,
    /// The client asked to close after this exchange.
    close: bool,
}

/// How a response body ends.
enum Framing {
    None,
    Length(u64),
    Chunked,
    /// At the end of the upstream connection.
    Close,
}

/// The framing of a response (RFC 9112 §6.3), or `None` when its lengths disagree.
fn response_framing(status: StatusCode, is_head: bool, headers: &HeaderMap) -> Option<Framing> {
    if is_head || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        return Some(Framing::None);
    }
    let codings: Vec<&str> = headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .map(|v| v.to_str().ok())
        .collect::<Option<Vec<&str>>>()?
        .into_iter()
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .collect();
    if let Some(last) = codings.last() {
        return Some(if last.eq_ignore_ascii_case("chunked") {
            Framing::Chunked
        } else {
            Framing::Close
        });
    }
    let mut length: Option<u64> = None;
    for value in headers.get_all(header::CONTENT_LENGTH) {
        for part in value.to_str().ok()?.split(',') {
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

/// Answers the client with the upstream's response and relays its body; keeps the upstream
/// connection for the next request when the exchange left it clean.
async fn relay<I>(
    io: &mut I,
    kept: &mut Option<Kept>,
    asked: &Asked<'_>,
    mut up: Upstream,
    exchange: &Exchange,
    out: &mut Vec<u8>,
) -> Result<bool, ()>
where
    I: AsyncWrite + Unpin,
{
    let (is_head, client_close) = (asked.is_head, asked.close);
    let Some(framing) = response_framing(up.status, is_head, &up.headers) else {
        let failure = UpstreamFailure::Exchange;
        let detail = "conflicting Content-Length values in the response";
        exchange.fail(failure, &up.key.host, up.key.port, detail);
        let res = deny::bad_gateway(failure, &up.key.host, asked.method, asked.path);
        return answer(io, res, is_head, client_close, out).await;
    };
    let upstream_close = up
        .headers
        .get_all(header::CONNECTION)
        .iter()
        .any(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
    headers::strip_hop_by_hop(&mut up.headers, false);
    let close = client_close || matches!(framing, Framing::Close);
    match framing {
        Framing::Chunked | Framing::Close => {
            up.headers.remove(header::CONTENT_LENGTH);
        }
        // One value, however the upstream repeated it.
        Framing::Length(n) => {
            up.headers
                .insert(header::CONTENT_LENGTH, HeaderValue::from(n));
        }
        Framing::None => {}
    }
    exchange.set_status(up.status.as_u16());

    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(up.status.as_str().as_bytes());
    out.push(b' ');
    let reason = up
        .reason
        .as_deref()
        .or(up.status.canonical_reason())
        .unwrap_or("");
    out.extend_from_slice(reason.as_bytes());
    out.extend_from_slice(b"\r\n");
    write_headers(out, &up.headers);
    if matches!(framing, Framing::Chunked) {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");

    let clean = match framing {
        Framing::None => write_all(io, out).await.map(|()| true),
        Framing::Length(n) => copy_length(io, &mut up, n, exchange, out).await,
        Framing::Chunked => copy_chunked(io, &mut up, exchange, out).await,
        Framing::Close => copy_to_end(io, &mut up, exchange, out)
            .await
            .map(|()| false),
    };
    let clean = clean.map_err(|_| ())?;
    if clean && !upstream_close && up.rest.is_empty() {
        *kept = Some(Kept {
            key: up.key,
            stream: up.stream,
            client: up.client,
        });
    }
    Ok(!close)
}

async fn write_all<I: AsyncWrite + Unpin>(io: &mut I, out: &mut Vec<u8>) -> std::io::Result<()> {
    io.write_all(out).await?;
    io.flush().await?;
    out.clear();
    Ok(())
}

/// Reads more of the upstream body into `up.rest`; an early end is an error.
async fn fill(up: &mut Upstream) -> std::io::Result<()> {
    if up.rest.capacity() - up.rest.len() < 1024 {
        up.rest.reserve(16 * 1024);
    }
    if up.stream.read_buf(&mut up.rest).await? == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

/// Most chunked body bytes gathered before they are written to the client.
const FLUSH_AT: usize = 64 * 1024;

async fn copy_length<I: AsyncWrite + Unpin>(
    io: &mut I,
    up: &mut Upstream,
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
    up: &mut Upstream,
    exchange: &Exchange,
    out: &mut Vec<u8>,
) -> std::io::Result<()> {
    exchange.add_in(up.rest.len() as u64);
    out.extend_from_slice(&up.rest);
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
        io.write_all(&up.rest).await?;
        up.rest.clear();
    }
}

/// Bytes read from the upstream at once while relaying a long body.
const LARGE_READ: usize = 64 * 1024;

/// [`fill`] with room for [`LARGE_READ`] bytes.
async fn fill_large(up: &mut Upstream) -> std::io::Result<()> {
    if up.rest.is_empty() && up.rest.capacity() < LARGE_READ {
        up.rest = BytesMut::with_capacity(LARGE_READ);
    } else if up.rest.capacity() - up.rest.len() < LARGE_READ / 2 {
        up.rest.reserve(LARGE_READ);
    }
    if up.stream.read_buf(&mut up.rest).await? == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

/// Longest chunk-size line (with extensions) or trailer line accepted.
const MAX_CHUNK_LINE: usize = 4 * 1024;

/// Takes one CRLF-terminated line from `up.rest` (without the CRLF), reading as needed.
async fn line(up: &mut Upstream) -> std::io::Result<Bytes> {
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
    up: &mut Upstream,
    exchange: &Exchange,
    out: &mut Vec<u8>,
) -> std::io::Result<bool> {
    let invalid = || std::io::Error::from(std::io::ErrorKind::InvalidData);
    loop {
        let size_line = line(up).await?;
        let digits = size_line
            .split(|&b| b == b';')
            .next()
            .unwrap_or_default()
            .trim_ascii();
        if digits.is_empty() || digits.len() > 16 || !digits.iter().all(u8::is_ascii_hexdigit) {
            return Err(invalid());
        }
        let size = u64::from_str_radix(std::str::from_utf8(digits).map_err(|_| invalid())?, 16)
            .map_err(|_| invalid())?;
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
            return Err(invalid());
        }
        out.extend_from_slice(b"\r\n");
        if up.rest.is_empty() {
            // Whatever is gathered goes out before waiting for the next chunk.
            write_all(io, out).await?;
        }
    }
}

fn write_headers(out: &mut Vec<u8>, headers: &HeaderMap) {
    for (name, value) in headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
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

/// Returns a kept upstream connection to its client's pool.
fn give_back(kept: Option<Kept>) {
    if let Some(k) = kept {
        k.client.lean_put(k.key, k.stream);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(text: &str) -> Option<Head> {
        parse_request(text.as_bytes()).map(|(h, len)| {
            assert_eq!(len, text.len());
            h
        })
    }

    #[test]
    fn only_bodyless_safe_requests_with_plain_framing_are_lean() {
        let lean = |t: &str| head(t).is_some();
        assert!(lean("GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\n\r\n"));
        assert!(lean("HEAD / HTTP/1.1\r\nHost: a.test\r\n\r\n"));
        assert!(lean("OPTIONS / HTTP/1.1\r\nConnection: keep-alive\r\n\r\n"));
        assert!(
            head("GET / HTTP/1.1\r\nConnection: Close\r\n\r\n")
                .unwrap()
                .close
        );
        // a body, or any framing to interpret: hyper decides
        assert!(!lean("POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n"));
        assert!(!lean("GET / HTTP/1.1\r\nContent-Length: 5\r\n\r\n"));
        assert!(!lean(
            "GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        ));
        assert!(!lean(
            "GET / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
        ));
        assert!(!lean(
            "GET / HTTP/1.1\r\nConnection: upgrade\r\nUpgrade: h2c\r\n\r\n"
        ));
        assert!(!lean(
            "GET / HTTP/1.1\r\nConnection: keep-alive, x-drop\r\n\r\n"
        ));
        assert!(!lean("GET / HTTP/1.1\r\nExpect: 100-continue\r\n\r\n"));
        assert!(!lean("GET / HTTP/1.1\r\nTE: trailers\r\n\r\n"));
        assert!(!lean("GET / HTTP/1.0\r\n\r\n"));
        assert!(!lean("DELETE / HTTP/1.1\r\n\r\n"));
        assert!(!lean("CONNECT a.test:443 HTTP/1.1\r\n\r\n"));
        assert!(!lean("GET / HTTP/1.1\r\nBad Name: x\r\n\r\n"));
        assert!(!lean("GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n"));
    }

    #[test]
    fn response_framing_is_read_strictly() {
        let framing = |status: u16, is_head: bool, pairs: &[(&str, &str)]| {
            let mut h = HeaderMap::new();
            for (n, v) in pairs {
                h.append(
                    HeaderName::from_bytes(n.as_bytes()).unwrap(),
                    HeaderValue::from_str(v).unwrap(),
                );
            }
            match response_framing(StatusCode::from_u16(status).unwrap(), is_head, &h) {
                None => "invalid".to_string(),
                Some(Framing::None) => "none".to_string(),
                Some(Framing::Length(n)) => format!("length {n}"),
                Some(Framing::Chunked) => "chunked".to_string(),
                Some(Framing::Close) => "close".to_string(),
            }
        };
        assert_eq!(
            framing(200, false, &[("content-length", "12")]),
            "length 12"
        );
        assert_eq!(
            framing(200, false, &[("content-length", "3, 3")]),
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
            framing(200, false, &[("transfer-encoding", "gzip, chunked")]),
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
}
