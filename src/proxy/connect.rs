//! `CONNECT` tunnels and transparent connections (docs/network-access.md): decide host:port
//! first, answer `200`, take the upgraded stream and sniff its first bytes:
//!
//! 1. A TLS ClientHello (`0x16`) is intercepted ([`intercept`](super::intercept)): every request
//!    inside is decided on its own.
//! 2. Plain HTTP is served the same way, request by request.
//! 3. Anything else (or silence for [`SNIFF_TIMEOUT`], a server-speaks-first protocol) becomes a
//!    raw TCP tunnel only when, decided again at that moment, the first rule matching host and
//!    port allows raw TCP (no `methods`, `paths` or `override`); otherwise the tunnel is closed
//!    and a denial recorded with scheme `tcp`.
//!
//! A tunnel the policy denies (or whose host cannot be reached) is accepted all the same and run
//! as a *refused* tunnel ([`Refusal`]): TLS is terminated with a leaf for the SNI (or the CONNECT
//! name, an IP SAN for addresses), and every request inside is answered `403` (or `502`) with its
//! real method and path, so the agent reads why. Nothing is resolved on the host and nothing is
//! sent upstream for it.
//!
//! # Security
//! A raw tunnel is never opened for a host whose rule inspects HTTP or injects credentials, so
//! those rules cannot be bypassed by speaking something other than HTTP. A refused tunnel never
//! reaches the gate again: no later request on it can be allowed.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::policy::{reason, Access, Decision, Scheme};

use super::audit::{Auditor, Subject};
use super::deny::{self, ProxyBody, UpstreamFailure};
use super::gate::{self, Ask, Outcome};
use super::http::{split_authority, Tunnel};
use super::listener::{serve_connection, Conn};
use super::{intercept, passthrough, HEADER_READ_TIMEOUT, SNIFF_TIMEOUT};

/// The first byte of a TLS handshake record.
const TLS_HANDSHAKE: u8 = 0x16;
/// The `method` recorded for tunnel-level decisions.
const CONNECT: &str = "CONNECT";

/// How long a refused tunnel to a web port ([`WEB_PORTS`]) waits for the client's first bytes
/// (TLS and HTTP clients speak at once); on other ports it waits [`SNIFF_TIMEOUT`], so that a
/// server-speaks-first client (ssh, smtp) is closed and recorded as `tcp` soon.
pub const REFUSED_SNIFF_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// Ports where a refused tunnel expects HTTP or TLS.
const WEB_PORTS: [u16; 4] = [80, 443, 8080, 8443];

/// Why a tunnel is accepted only to explain itself: every request inside is answered with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The policy (or a gate guard) denied host:port: `403`.
    Denied(Decision),
    /// The policy allowed it but the upstream cannot be reached: `502`.
    Unreachable(Decision, UpstreamFailure),
}

impl Refusal {
    fn decision(&self) -> &Decision {
        match self {
            Refusal::Denied(d) | Refusal::Unreachable(d, _) => d,
        }
    }
}

/// Handles a `CONNECT` request on a proxy connection: the tunnel is accepted whatever the
/// decision (a refused one answers each request inside with the reason).
pub async fn handle(conn: Conn, mut req: Request<Incoming>) -> Response<ProxyBody> {
    let Some(authority) = req.uri().authority().map(|a| a.as_str().to_string()) else {
        return deny::bad_request("CONNECT needs a host:port target");
    };
    let Some((host, Some(port))) = split_authority(&authority) else {
        return deny::bad_request("CONNECT needs a host:port target");
    };
    let engine = &conn.engine;
    let compiled = engine.cell.load_full();
    let (raw_tunnel, refusal) =
        match gate::check(engine, &compiled, &host, port, Ask::Connect).await {
            Outcome::Denied(decision) => (false, Some(Refusal::Denied(decision))),
            Outcome::Unreachable(decision, failure) => {
                (false, Some(Refusal::Unreachable(decision, failure)))
            }
            Outcome::Allowed { raw_tunnel, .. } => (raw_tunnel, None),
        };
    let on_upgrade = hyper::upgrade::on(&mut req);
    let task_conn = conn.clone();
    conn.ctl.spawn(async move {
        if let Ok(upgraded) = on_upgrade.await {
            tunnel(
                task_conn,
                TokioIo::new(upgraded),
                host,
                port,
                raw_tunnel,
                refusal,
            )
            .await;
        }
    });
    Response::new(deny::empty_body())
}

/// Handles a transparent connection meant for host:port: decided like a `CONNECT`, then run as a
/// tunnel (a refused one answers each request inside with the reason). `refused` marks a
/// connection to a name the DNS responder already answered as denied.
pub async fn transparent<I>(conn: Conn, stream: I, host: String, port: u16, refused: bool)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Some(host) = crate::config::normalize_host(&host) else {
        return;
    };
    if refused {
        let refusal = Refusal::Denied(gate::denied(reason::NO_RULE));
        return tunnel(conn, stream, host, port, false, Some(refusal)).await;
    }
    let engine = &conn.engine;
    let compiled = engine.cell.load_full();
    match gate::check(engine, &compiled, &host, port, Ask::Connect).await {
        Outcome::Allowed { raw_tunnel, .. } => {
            tunnel(conn, stream, host, port, raw_tunnel, None).await
        }
        Outcome::Denied(decision) => {
            tunnel(
                conn,
                stream,
                host,
                port,
                false,
                Some(Refusal::Denied(decision)),
            )
            .await
        }
        Outcome::Unreachable(decision, failure) => {
            let refusal = Refusal::Unreachable(decision, failure);
            tunnel(conn, stream, host, port, false, Some(refusal)).await
        }
    }
}

/// Runs an accepted tunnel: intercept TLS, serve HTTP, else a raw tunnel where allowed.
pub async fn tunnel<I>(
    conn: Conn,
    mut io: I,
    host: String,
    port: u16,
    raw_allowed: bool,
    refusal: Option<Refusal>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let wait = if raw_allowed {
        SNIFF_TIMEOUT
    } else if refusal.is_some() && WEB_PORTS.contains(&port) {
        REFUSED_SNIFF_TIMEOUT
    } else if refusal.is_some() {
        SNIFF_TIMEOUT
    } else {
        HEADER_READ_TIMEOUT
    };
    let mut first = BytesMut::with_capacity(4096);
    let sniffed = tokio::time::timeout(wait, io.read_buf(&mut first)).await;
    let prefixed = Prefixed {
        prefix: first.freeze(),
        inner: io,
    };
    match sniffed {
        Ok(Ok(0)) | Ok(Err(_)) => {}
        Ok(Ok(_)) if prefixed.prefix[0] == TLS_HANDSHAKE => {
            if refusal.is_some() {
                intercept::serve(conn, prefixed, Arc::from(host.as_str()), port, refusal).await;
            } else {
                passthrough::serve_or_intercept(conn, prefixed, host, port, raw_allowed).await;
            }
        }
        // Plain HTTP inside the tunnel (CONNECT to port 80, transparent port 80): every request
        // is decided like an absolute-form one.
        Ok(Ok(_)) if looks_like_http(&prefixed.prefix) => {
            let tunnel = Tunnel {
                host: Arc::from(host.as_str()),
                port,
                sni_mismatch: None,
                scheme: Scheme::Http,
                refusal,
            };
            serve_connection(prefixed, conn, Some(tunnel)).await;
        }
        // Other bytes, or silence from a server-speaks-first protocol.
        Ok(Ok(_)) | Err(_) => raw(conn, prefixed, &host, port, refusal).await,
    }
}

/// Answers one request inside a refused tunnel: `403` (or `502`) with its real method and path,
/// recorded as such. The request's own policy decision supplies the reason when it denies (it
/// explains better: a method or path), else the tunnel's; nothing is resolved or sent upstream.
pub async fn refuse_request(
    conn: &Conn,
    tunnel: &Tunnel,
    refusal: &Refusal,
    method: &str,
    path_and_query: &str,
) -> Response<ProxyBody> {
    let path = path_and_query.split('?').next().unwrap_or("/");
    let compiled = conn.engine.cell.load_full();
    let subject = Subject {
        host: &tunnel.host,
        port: tunnel.port,
        method,
        path,
        scheme: tunnel.scheme,
        via: conn.via(),
        origin: conn.origin().await,
        config_hash: Some(compiled.hash.clone()),
    };
    let auditor = Auditor::new(conn.engine.events.clone());
    match refusal {
        Refusal::Denied(connect) => {
            let own = compiled.policy.decide(&crate::policy::Request {
                host: &tunnel.host,
                port: tunnel.port,
                method,
                path: path_and_query,
                scheme: tunnel.scheme,
                ip: tunnel.host.parse().ok(),
            });
            let decision = if own.access == Access::Denied {
                own
            } else {
                *connect
            };
            auditor.request(&subject, &decision, &[]);
            deny::forbidden(decision.reason, &tunnel.host, method, path)
        }
        Refusal::Unreachable(decision, failure) => {
            if let Some(ex) = auditor.request(&subject, decision, &[]) {
                ex.fail(*failure, &tunnel.host, tunnel.port, failure.describe());
            }
            deny::bad_gateway(*failure, &tunnel.host, method, path)
        }
    }
}

/// Whether `prefix` starts like an HTTP/1.x request line (`TOKEN SP`).
pub(super) fn looks_like_http(prefix: &[u8]) -> bool {
    let token = prefix.iter().take_while(|b| b.is_ascii_uppercase()).count();
    (3..=16).contains(&token) && prefix.get(token) == Some(&b' ')
}

/// Decides a raw TCP tunnel now and, if allowed, splices it to the upstream. A refused tunnel is
/// recorded (scheme `tcp`) and closed.
async fn raw<I>(conn: Conn, mut io: Prefixed<I>, host: &str, port: u16, refusal: Option<Refusal>)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let engine = &conn.engine;
    let auditor = Auditor::new(engine.events.clone());
    let compiled = engine.cell.load_full();
    let subject = Subject {
        host,
        port,
        method: CONNECT,
        path: "",
        scheme: Scheme::Tcp,
        via: conn.via(),
        origin: conn.origin().await,
        config_hash: Some(compiled.hash.clone()),
    };
    if let Some(refusal) = refusal {
        let decision = *refusal.decision();
        if let Some(ex) = auditor.request(&subject, &decision, &[]) {
            if let Refusal::Unreachable(_, failure) = refusal {
                ex.fail(failure, host, port, failure.describe());
            }
        }
        return;
    }
    let compiled = engine.cell.load_full();
    let (decision, addrs) = match gate::check(engine, &compiled, host, port, Ask::Connect).await {
        Outcome::Allowed {
            decision,
            raw_tunnel: true,
            addrs,
            ..
        } => (decision, addrs),
        Outcome::Allowed { .. } => {
            auditor.request(&subject, &gate::denied(reason::NOT_HTTP), &[]);
            return;
        }
        Outcome::Denied(decision) => {
            auditor.request(&subject, &decision, &[]);
            return;
        }
        Outcome::Unreachable(decision, failure) => {
            if let Some(ex) = auditor.request(&subject, &decision, &[]) {
                ex.fail(failure, host, port, failure.describe());
            }
            return;
        }
    };
    debug_assert_eq!(decision.access, Access::Allowed);
    let Some(exchange) = auditor.request(&subject, &decision, &[]) else {
        return;
    };
    let timeout = compiled.config.upstream.connect_timeout;
    let mut upstream = match connect_any(&addrs, timeout).await {
        Ok(stream) => stream,
        Err(e) => {
            let failure = super::upstream::classify(&e);
            exchange.fail(failure, host, port, &super::audit::error_chain(&e));
            return;
        }
    };
    exchange.set_status(StatusCode::OK.as_u16());
    if let Ok((out, inn)) = tokio::io::copy_bidirectional(&mut io, &mut upstream).await {
        exchange.add_out(out);
        exchange.add_in(inn);
    }
}

/// Connects to the first reachable checked address within `timeout` each; the last error when
/// none is.
pub async fn connect_any(
    addrs: &[SocketAddr],
    timeout: std::time::Duration,
) -> std::io::Result<TcpStream> {
    let mut last = std::io::Error::from(std::io::ErrorKind::AddrNotAvailable);
    for addr in addrs {
        match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                return Ok(stream);
            }
            Ok(Err(e)) => last = e,
            Err(_) => last = std::io::ErrorKind::TimedOut.into(),
        }
    }
    Err(last)
}

/// A stream that first replays bytes already read from it (the sniffed prefix).
pub struct Prefixed<I> {
    prefix: Bytes,
    inner: I,
}

impl<I> Prefixed<I> {
    /// `inner`, replaying `prefix` first.
    pub fn new(prefix: Bytes, inner: I) -> Self {
        Prefixed { prefix, inner }
    }

    /// The bytes not replayed yet, and the stream under them.
    pub fn into_parts(self) -> (Bytes, I) {
        (self.prefix, self.inner)
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Prefixed<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Prefixed<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[test]
    fn looks_like_http_cases() {
        let cases: [(&[u8], bool); 7] = [
            (b"GET / HTTP/1.1\r\n", true),
            (b"OPTIONS * HTTP/1.1", true),
            (b"PROPFIND /x", true),
            (b"SSH-2.0-OpenSSH", false),
            (b"\x16\x03\x01", false),
            (b"get / HTTP/1.1", false),
            (b"GE", false),
        ];
        for (prefix, want) in cases {
            assert_eq!(looks_like_http(prefix), want, "{prefix:?}");
        }
    }

    #[tokio::test]
    async fn prefixed_replays_then_reads_through() {
        let (a, mut b) = tokio::io::duplex(64);
        let mut p = Prefixed {
            prefix: Bytes::from_static(b"\x16\x03"),
            inner: a,
        };
        b.write_all(b"rest").await.unwrap();
        drop(b);
        let mut all = Vec::new();
        p.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, b"\x16\x03rest");
    }
}
