//! TLS interception of an accepted tunnel (docs/network-access.md#https):
//!
//! 1. Read the ClientHello (bounded by [`TLS_HANDSHAKE_TIMEOUT`]) for its SNI and ALPN offer.
//! 2. Terminate TLS with the sandbox CA's leaf for the SNI (or the CONNECT host when there is no
//!    SNI), choosing `http/1.1` when the client offers it and `h2` when it offers only that: the
//!    lean path serves HTTP/1.1 at about half the CPU per request of hyper's h2 server and client
//!    (docs/decisions.md, "Intercepted TLS prefers HTTP/1.1").
//! 3. Serve the decrypted stream with hyper again; every request inside is decided on its own
//!    ([`http`](super::http)), against the policy in force when it arrives.
//!
//! A refused tunnel ([`Refusal`]) is intercepted the same way, so that each request inside gets
//! its `403`/`502` with its method and path; its leaf names the SNI the client sent.
//!
//! # Security
//! When the SNI names another host than the CONNECT target the handshake still completes (so the
//! client can read the reason), but every request on that connection is refused as
//! `host-mismatch`: an allowed CONNECT cannot front for another name.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::LazyConfigAcceptor;

use crate::config::normalize_host;
use crate::policy::Scheme;

use super::connect::Refusal;
use super::http::Tunnel;
use super::listener::{serve_connection, Conn};
use super::TLS_HANDSHAKE_TIMEOUT;

/// ALPN protocols the interception side can speak, the one it prefers first.
const SUPPORTED_ALPN: [&[u8]; 2] = [b"http/1.1", b"h2"];

/// Terminates TLS on `io` and serves the requests inside; returns when the connection ends.
pub fn serve<I>(
    conn: Conn,
    io: I,
    host: Arc<str>,
    port: u16,
    refusal: Option<Refusal>,
) -> Pin<Box<dyn Future<Output = ()> + Send>>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    Box::pin(serve_inner(conn, io, host, port, refusal))
}

async fn serve_inner<I>(conn: Conn, io: I, host: Arc<str>, port: u16, refusal: Option<Refusal>)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let acceptor = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), io);
    let start = match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor).await {
        Ok(Ok(start)) => start,
        _ => return,
    };
    let hello = start.client_hello();
    let sni = hello.server_name().and_then(normalize_host);
    // rustls picks the first of these that the client offered: ours is the order that counts.
    let alpn: Vec<&[u8]> = match hello.alpn() {
        Some(offered) => {
            let offered: Vec<&[u8]> = offered.collect();
            let supported = SUPPORTED_ALPN.into_iter();
            supported.filter(|p| offered.contains(p)).collect()
        }
        None => Vec::new(),
    };
    // In a refused transparent tunnel every request is refused whatever it names, and the name
    // may only be the DNS responder's: the client's SNI is taken as the host it meant.
    let host = match (&refusal, &sni) {
        (Some(_), Some(sni)) if conn.via() == super::Via::Transparent => Arc::from(sni.as_str()),
        _ => host,
    };
    let sni_mismatch = sni.as_deref().filter(|s| *s != &*host).map(Arc::from);
    let cert_host = sni.as_deref().unwrap_or(&host);
    let config = match conn.engine.ca.server_config(cert_host, &alpn) {
        Ok(config) => config,
        Err(e) => {
            tracing::warn!(host = %cert_host, error = %e, "minting a leaf certificate failed");
            return;
        }
    };
    let tls = match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, start.into_stream(config)).await {
        Ok(Ok(tls)) => tls,
        _ => return,
    };
    let tunnel = Tunnel {
        host,
        port,
        sni_mismatch,
        scheme: Scheme::Https,
        refusal,
    };
    serve_connection(tls, conn, Some(tunnel)).await;
}
