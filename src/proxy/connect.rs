//! `CONNECT` tunnels (docs/network-access.md): decide host:port first (`403` before any TLS), answer `200`, take
//! the upgraded stream and sniff its first bytes:
//!
//! 1. A TLS ClientHello (`0x16`) is intercepted ([`intercept`](super::intercept)): every request
//!    inside is decided on its own.
//! 2. Anything else (or silence for [`SNIFF_TIMEOUT`], a server-speaks-first protocol) becomes a
//!    raw TCP tunnel only when, decided again at that moment, the first rule matching host and
//!    port allows raw TCP (no `methods`, `paths` or `override`); otherwise the tunnel is closed
//!    and a `not-http` denial recorded.
//!
//! # Security
//! A raw tunnel is never opened for a host whose rule inspects HTTP or injects credentials, so
//! those rules cannot be bypassed by speaking something other than HTTP.

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

use crate::policy::{reason, Access, Scheme};

use super::audit::{Auditor, Subject};
use super::deny::{self, ProxyBody};
use super::gate::{self, Ask, Outcome};
use super::http::{split_authority, Tunnel};
use super::listener::{serve_connection, Conn};
use super::{passthrough, HEADER_READ_TIMEOUT, SNIFF_TIMEOUT, UPSTREAM_CONNECT_TIMEOUT};

/// The first byte of a TLS handshake record.
const TLS_HANDSHAKE: u8 = 0x16;
/// The `method` recorded for tunnel-level decisions.
const CONNECT: &str = "CONNECT";

/// How a tunnel request is recorded: method `CONNECT`, no path, scheme `https` on 443, else `tcp`.
fn tunnel_subject(host: &str, port: u16, via: crate::proxy::Via) -> Subject<'_> {
    let scheme = if port == 443 {
        Scheme::Https
    } else {
        Scheme::Tcp
    };
    Subject {
        host,
        port,
        method: CONNECT,
        path: "",
        scheme,
        via,
    }
}

/// Handles a `CONNECT` request on a proxy connection.
pub async fn handle(conn: Conn, mut req: Request<Incoming>) -> Response<ProxyBody> {
    let Some(authority) = req.uri().authority().map(|a| a.as_str().to_string()) else {
        return deny::bad_request("CONNECT needs a host:port target");
    };
    let Some((host, Some(port))) = split_authority(&authority) else {
        return deny::bad_request("CONNECT needs a host:port target");
    };
    let engine = &conn.engine;
    let compiled = engine.cell.load_full();
    let subject = tunnel_subject(&host, port, conn.via());
    match gate::check(engine, &compiled, &host, port, Ask::Connect).await {
        Outcome::Denied(decision) => {
            Auditor::new(engine.events.clone()).request(&subject, &decision, &[]);
            deny::forbidden(decision.reason, &host, CONNECT, "")
        }
        Outcome::Unreachable(decision, failure) => {
            if let Some(ex) = Auditor::new(engine.events.clone()).request(&subject, &decision, &[])
            {
                ex.set_status(StatusCode::BAD_GATEWAY.as_u16());
            }
            deny::bad_gateway(failure, &host)
        }
        Outcome::Allowed { raw_tunnel, .. } => {
            let on_upgrade = hyper::upgrade::on(&mut req);
            let task_conn = conn.clone();
            conn.ctl.spawn(async move {
                if let Ok(upgraded) = on_upgrade.await {
                    tunnel(task_conn, TokioIo::new(upgraded), host, port, raw_tunnel).await;
                }
            });
            Response::new(deny::empty_body())
        }
    }
}

/// Handles a transparent connection meant for host:port: decided like a `CONNECT` (a denial
/// closes the connection), then run as a tunnel.
pub async fn transparent<I>(conn: Conn, stream: I, host: String, port: u16)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Some(host) = crate::config::normalize_host(&host) else {
        return;
    };
    let engine = &conn.engine;
    let compiled = engine.cell.load_full();
    let subject = tunnel_subject(&host, port, conn.via());
    match gate::check(engine, &compiled, &host, port, Ask::Connect).await {
        Outcome::Allowed { raw_tunnel, .. } => tunnel(conn, stream, host, port, raw_tunnel).await,
        Outcome::Denied(decision) => {
            Auditor::new(engine.events.clone()).request(&subject, &decision, &[]);
        }
        Outcome::Unreachable(decision, _) => {
            if let Some(ex) = Auditor::new(engine.events.clone()).request(&subject, &decision, &[])
            {
                ex.set_status(StatusCode::BAD_GATEWAY.as_u16());
            }
        }
    }
}

/// Runs an accepted tunnel: intercept TLS, else a raw tunnel where allowed.
pub async fn tunnel<I>(conn: Conn, mut io: I, host: String, port: u16, raw_allowed: bool)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let wait = if raw_allowed {
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
            passthrough::serve_or_intercept(conn, prefixed, host, port, raw_allowed).await;
        }
        // Plain HTTP inside the tunnel (CONNECT to port 80, transparent port 80): every request
        // is decided like an absolute-form one.
        Ok(Ok(_)) if looks_like_http(&prefixed.prefix) => {
            let tunnel = Tunnel {
                host: Arc::from(host.as_str()),
                port,
                sni_mismatch: None,
                scheme: Scheme::Http,
            };
            serve_connection(prefixed, conn, Some(tunnel)).await;
        }
        // Other bytes, or silence from a server-speaks-first protocol.
        Ok(Ok(_)) | Err(_) => raw(conn, prefixed, &host, port).await,
    }
}

/// Whether `prefix` starts like an HTTP/1.x request line (`TOKEN SP`).
pub(super) fn looks_like_http(prefix: &[u8]) -> bool {
    let token = prefix.iter().take_while(|b| b.is_ascii_uppercase()).count();
    (3..=16).contains(&token) && prefix.get(token) == Some(&b' ')
}

/// Decides a raw TCP tunnel now and, if allowed, splices it to the upstream.
async fn raw<I>(conn: Conn, mut io: Prefixed<I>, host: &str, port: u16)
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
    };
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
        Outcome::Unreachable(decision, _) => {
            if let Some(ex) = auditor.request(&subject, &decision, &[]) {
                ex.set_status(StatusCode::BAD_GATEWAY.as_u16());
            }
            return;
        }
    };
    debug_assert_eq!(decision.access, Access::Allowed);
    let Some(exchange) = auditor.request(&subject, &decision, &[]) else {
        return;
    };
    let Some(mut upstream) = connect_any(&addrs).await else {
        exchange.set_status(StatusCode::BAD_GATEWAY.as_u16());
        return;
    };
    exchange.set_status(StatusCode::OK.as_u16());
    if let Ok((out, inn)) = tokio::io::copy_bidirectional(&mut io, &mut upstream).await {
        exchange.add_out(out);
        exchange.add_in(inn);
    }
}

/// Connects to the first reachable checked address.
pub async fn connect_any(addrs: &[SocketAddr]) -> Option<TcpStream> {
    for addr in addrs {
        if let Ok(Ok(stream)) =
            tokio::time::timeout(UPSTREAM_CONNECT_TIMEOUT, TcpStream::connect(addr)).await
        {
            let _ = stream.set_nodelay(true);
            return Some(stream);
        }
    }
    None
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
