//! TLS passthrough (docs/network-access.md#tls-passthrough): a tunnel whose rule says
//! `tls: "passthrough"` relays the TLS bytes unopened, so the client talks to the upstream's own
//! certificate (pinning works) and may present its own (mTLS).
//!
//! 1. Only a tunnel that starts with a TLS record, whose CONNECT (or transparent) target was allowed
//!    by a rule that allows raw bytes (no `methods`, `paths`, `override`), and only while some rule
//!    of the config in force says `passthrough`, gets here; everything else is intercepted as
//!    before, at no extra cost.
//! 2. Read the whole ClientHello (bounded in time and size) and take its SNI. An SNI naming
//!    another host than the target is not passed through: interception then refuses every
//!    request on it (`host-mismatch`), so an allowed target cannot front for another name.
//! 3. Decide the target again, against the policy in force now: the deciding rule must still be a
//!    passthrough rule, else the tunnel is intercepted.
//! 4. Record one `egress.request` (`scheme: "https"`, `method` and `path` null,
//!    `tls: "passthrough"`), connect to the checked addresses, replay the ClientHello and relay
//!    both ways until either side closes, with `splice(2)` where both ends are sockets
//!    ([`splice`](super::splice)); `egress.response` carries the byte counts.
//!
//! # Security
//! Nothing inside a passed-through connection is seen: no per-request decision, audit or
//! credential injection. Validation keeps `methods`, `paths` and `override` off passthrough
//! rules, and the policy only lets raw bytes through when the first rule matching host and port
//! is that rule, so a passthrough rule cannot bypass a rule that inspects HTTP.

use std::sync::Arc;

use bytes::BytesMut;
use http::StatusCode;
use serde_json::{Map, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};

use crate::config::{normalize_host, TlsMode};
use crate::events::kind;
use crate::policy::{Access, Compiled, Decision, Scheme};

use super::audit::{field, Exchange};
use super::connect::{connect_any, Prefixed, Refusal};
use super::gate::{self, Ask, Outcome};
use super::listener::Conn;
use super::{intercept, TLS_HANDSHAKE_TIMEOUT};

/// Largest ClientHello read before deciding (a TLS record is at most 16 KiB plus its header;
/// post-quantum key shares make hellos of a few KiB common).
const MAX_HELLO_BYTES: usize = 32 * 1024;
/// The `tls` value of a passed-through connection's `egress.request`.
const PASSTHROUGH: &str = TlsMode::Passthrough.as_str();

/// Serves a tunnel that starts with a TLS record: passed through when a passthrough rule decides
/// it (see the module doc), else intercepted.
pub async fn serve_or_intercept<I>(
    conn: Conn,
    io: Prefixed<I>,
    host: String,
    port: u16,
    raw_allowed: bool,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let compiled = conn.engine.cell.load_full();
    if !raw_allowed || !has_passthrough_rule(&compiled) {
        return intercept::serve(conn, io, Arc::from(host.as_str()), port, None).await;
    }
    let Some((sni, io)) = read_client_hello(io).await else {
        return;
    };
    if sni.as_deref().is_some_and(|sni| sni != host) {
        return intercept::serve(conn, io, Arc::from(host.as_str()), port, None).await;
    }
    let engine = &conn.engine;
    let (decision, addrs) = match gate::check(engine, &compiled, &host, port, Ask::Connect).await {
        Outcome::Allowed {
            decision,
            raw_tunnel: true,
            addrs,
            ..
        } if rule_passes_through(&compiled, &decision) => (decision, addrs),
        Outcome::Allowed { .. } => {
            return intercept::serve(conn, io, Arc::from(host.as_str()), port, None).await;
        }
        // Refused now (the policy changed since the tunnel opened): explained inside TLS like any
        // refused tunnel.
        Outcome::Denied(decision) => {
            let refusal = Some(Refusal::Denied(decision));
            return intercept::serve(conn, io, Arc::from(host.as_str()), port, refusal).await;
        }
        Outcome::Unreachable(decision, failure) => {
            let refusal = Some(Refusal::Unreachable(decision, failure));
            return intercept::serve(conn, io, Arc::from(host.as_str()), port, refusal).await;
        }
    };
    let Some(exchange) = audit(&conn, &host, port, &decision).await else {
        return;
    };
    let upstream = match connect_any(&addrs, compiled.config.upstream.connect_timeout).await {
        Ok(stream) => stream,
        Err(e) => {
            let failure = super::upstream::classify(&e);
            exchange.fail(failure, &host, port, &super::audit::error_chain(&e));
            return;
        }
    };
    exchange.set_status(StatusCode::OK.as_u16());
    let moved = super::splice::relay(io, upstream, engine.limits.idle).await;
    exchange.add_out(moved.out);
    exchange.add_in(moved.inn);
}

/// Whether any rule of the config in force passes TLS through (else nothing here is needed).
fn has_passthrough_rule(compiled: &Compiled) -> bool {
    compiled
        .config
        .egress
        .iter()
        .any(|r| r.tls == TlsMode::Passthrough)
}

/// Whether the rule that allowed `decision` passes TLS through.
fn rule_passes_through(compiled: &Compiled, decision: &Decision) -> bool {
    decision.access == Access::Allowed
        && decision
            .rule
            .and_then(|r| compiled.policy.rule(r))
            .is_some_and(|r| r.tls == TlsMode::Passthrough)
}

/// Reads until the ClientHello is complete; returns its SNI (normalized; `None` when it names no
/// host) and a stream that replays everything read. `None`: not a ClientHello, too large, too
/// slow, or the client left.
async fn read_client_hello<I>(mut io: I) -> Option<(Option<String>, Prefixed<I>)>
where
    I: AsyncRead + Unpin,
{
    let mut buf = BytesMut::with_capacity(4096);
    let mut acceptor = rustls::server::Acceptor::default();
    let mut fed = 0;
    let sni = tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, async {
        loop {
            if buf.len() >= MAX_HELLO_BYTES || io.read_buf(&mut buf).await.ok()? == 0 {
                return None;
            }
            while fed < buf.len() {
                let mut rest = &buf[fed..];
                match acceptor.read_tls(&mut rest) {
                    Ok(0) | Err(_) => return None,
                    Ok(n) => fed += n,
                }
            }
            match acceptor.accept() {
                Ok(Some(accepted)) => {
                    return Some(
                        accepted
                            .client_hello()
                            .server_name()
                            .and_then(normalize_host),
                    );
                }
                Ok(None) => {}
                Err(_) => return None,
            }
        }
    })
    .await
    .ok()??;
    Some((sni, Prefixed::new(buf.freeze(), io)))
}

/// Emits the connection's one `egress.request`; for an allowed decision returns its exchange.
async fn audit(conn: &Conn, host: &str, port: u16, decision: &Decision) -> Option<Exchange> {
    let events = &conn.engine.events;
    let mut f = Map::new();
    f.insert(field::HOST.into(), host.into());
    f.insert(field::PORT.into(), port.into());
    f.insert(field::METHOD.into(), Value::Null);
    f.insert(field::PATH.into(), Value::Null);
    f.insert(field::SCHEME.into(), Scheme::Https.as_str().into());
    f.insert(field::ACCESS.into(), decision.access.as_str().into());
    f.insert(
        field::RULE.into(),
        decision.rule.map_or(Value::Null, |r| r.into()),
    );
    f.insert(field::REASON.into(), decision.reason.into());
    if decision.would_deny {
        f.insert(field::WOULD_DENY.into(), true.into());
    }
    f.insert(field::VIA.into(), conn.via().as_str().into());
    f.insert(
        field::CONFIG_HASH.into(),
        conn.engine.cell.load().hash.to_string().into(),
    );
    let origin = conn.origin().await;
    if let Some(origin) = &origin {
        origin.insert_fields(&mut f);
    }
    f.insert(field::INJECTED_HEADERS.into(), Value::Array(Vec::new()));
    f.insert(field::TLS.into(), PASSTHROUGH.into());
    tracing::debug!(
        host,
        port,
        access = decision.access.as_str(),
        reason = decision.reason,
        "egress decision (tls passthrough)"
    );
    let event = events.emit(kind::EGRESS_REQUEST, f);
    (decision.access == Access::Allowed)
        .then(|| Exchange::started(events.clone(), event.id, origin))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// A real ClientHello, as rustls writes it, for `name`.
    fn client_hello(name: &str) -> Vec<u8> {
        let roots = rustls::RootCertStore::empty();
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from(name.to_string()).expect("name");
        let mut client = rustls::ClientConnection::new(Arc::new(config), name).expect("client");
        let mut out = Vec::new();
        client.write_tls(&mut out).expect("hello");
        out
    }

    #[tokio::test]
    async fn client_hello_sni_is_read_across_reads_and_replayed() {
        let hello = client_hello("API.Example.com");
        let (a, mut b) = tokio::io::duplex(64 * 1024);
        let (first, rest) = hello.split_at(7);
        let (first, rest) = (first.to_vec(), rest.to_vec());
        let writer = tokio::spawn(async move {
            b.write_all(&first).await.unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            b.write_all(&rest).await.unwrap();
            b.write_all(b"after").await.unwrap();
            drop(b);
        });
        let (sni, mut replay) = read_client_hello(a).await.expect("hello");
        writer.await.unwrap();
        assert_eq!(sni.as_deref(), Some("api.example.com"));
        let mut all = Vec::new();
        replay.read_to_end(&mut all).await.unwrap();
        assert_eq!(&all[..hello.len()], &hello[..]);
        assert_eq!(&all[hello.len()..], b"after");
    }

    #[tokio::test]
    async fn not_a_client_hello_is_refused() {
        for bytes in [
            &b"\x16\x03\x01\x00\x05hello"[..],
            &b"GET / HTTP/1.1\r\n\r\n"[..],
        ] {
            let (a, mut b) = tokio::io::duplex(1024);
            b.write_all(bytes).await.unwrap();
            drop(b);
            assert!(read_client_hello(a).await.is_none(), "{bytes:?}");
        }
    }

    // -----------------------------------------------------------------------------------------
    // The relay, through the engine

    use crate::config::Config;
    use crate::events::{EventBus, Since};
    use crate::policy::PolicyCell;
    use crate::proxy::splice::tests::{counts, exchange, pattern};
    use crate::proxy::Engine;
    use crate::tls::CertificateAuthority;
    use serde_json::json;
    use tokio::net::{TcpListener, TcpStream};

    /// An engine whose one rule passes `pass.test:443` through to `server`.
    struct Passing {
        engine: Arc<Engine>,
        /// Its proxy listener, or (`transparent`) a transparent listener meaning `pass.test:443`.
        proxy: std::net::SocketAddr,
        events: crate::events::Subscription,
        _dir: tempfile::TempDir,
    }

    fn passing(server: std::net::SocketAddr, transparent: bool) -> Passing {
        let dir = tempfile::tempdir().unwrap();
        let events = EventBus::open("splice-test", dir.path()).unwrap();
        let subscription = events.subscribe(Since::Now, 10_000).unwrap();
        let ca = Arc::new(CertificateAuthority::load_or_create(dir.path(), "splice-test").unwrap());
        let config = Config::from_json(&json!({
            "egress": [{ "access": "allow", "host": "pass.test", "tls": "passthrough" }],
            "upstream": { "resolve": { "pass.test:443": server.to_string() } },
        }))
        .unwrap();
        let cell = Arc::new(PolicyCell::from_pointee(Compiled::new(config)));
        let engine = Engine::new("splice-test".into(), cell, events, ca);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let proxy = listener.local_addr().unwrap();
        if transparent {
            let target: super::super::TransparentTarget =
                Arc::new(|_| Some(("pass.test".to_string(), 443, false)));
            engine.serve_transparent_listener(listener, target).unwrap();
        } else {
            engine.serve_sandbox_listener(listener).unwrap();
        }
        Passing {
            engine,
            proxy,
            events: subscription,
            _dir: dir,
        }
    }

    /// Reads a response head; returns it and whatever came behind it.
    async fn read_head(client: &mut TcpStream) -> (String, Vec<u8>) {
        let mut head = Vec::new();
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let mut chunk = [0u8; 4096];
            let n = client.read(&mut chunk).await.unwrap();
            assert!(n > 0, "the proxy closed before answering");
            head.extend_from_slice(&chunk[..n]);
        }
        let end = head.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        let rest = head.split_off(end);
        (String::from_utf8_lossy(&head).into_owned(), rest)
    }

    const CONNECT_HEAD: &[u8] = b"CONNECT pass.test:443 HTTP/1.1\r\nHost: pass.test:443\r\n\r\n";

    /// Passes `pass.test:443` through to an upstream that takes `down` and answers `up`; checks
    /// both arrive byte for byte, were spliced socket to socket, and are counted in
    /// `egress.response`. The client connects through a `CONNECT` (sending the ClientHello and
    /// more right behind its head, so hyper reads some of it) or a transparent listener.
    async fn passed_through_both_ways(transparent: bool) {
        let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let Passing {
            engine,
            proxy,
            events: subscription,
            _dir,
        } = passing(server.local_addr().unwrap(), transparent);

        let hello = client_hello("pass.test");
        let up = pattern(5 << 20, 11);
        let down = pattern(4 << 20, 12);
        let before = counts();
        let answer = down.clone();
        let server = tokio::spawn(async move {
            let (stream, _) = server.accept().await.unwrap();
            exchange(stream, answer).await
        });

        let mut client = TcpStream::connect(proxy).await.unwrap();
        let mut first = Vec::new();
        if !transparent {
            first.extend_from_slice(CONNECT_HEAD);
        }
        first.extend_from_slice(&hello);
        first.extend_from_slice(&up[..10_000]);
        client.write_all(&first).await.unwrap();
        let mut at_client = Vec::new();
        if !transparent {
            let (head, rest) = read_head(&mut client).await;
            assert!(head.starts_with("HTTP/1.1 200"), "{head}");
            at_client = rest;
        }
        at_client.extend(exchange(client, up[10_000..].to_vec()).await);
        let at_server = server.await.unwrap();

        assert!(
            at_server[..hello.len()] == hello[..],
            "the ClientHello first"
        );
        assert!(
            at_server[hello.len()..] == up[..],
            "client to server, byte for byte"
        );
        assert!(at_client == down, "server to client, byte for byte");
        let after = counts();
        assert_eq!(after.sockets, before.sockets + 1, "socket to socket");
        assert_eq!(after.copied, before.copied, "not by the copy loop");
        assert!(
            after.spliced - before.spliced > (up.len() + down.len()) / 2,
            "most spliced"
        );

        let response = loop {
            let event =
                tokio::time::timeout(std::time::Duration::from_secs(10), subscription.next())
                    .await
                    .expect("egress.response within 10 s")
                    .expect("event");
            if event.kind == kind::EGRESS_RESPONSE {
                break event;
            }
        };
        let bytes = |name: &str| response.fields.get(name).and_then(Value::as_u64);
        assert_eq!(
            bytes(field::BYTES_OUT),
            Some((hello.len() + up.len()) as u64)
        );
        assert_eq!(bytes(field::BYTES_IN), Some(down.len() as u64));
        engine.shutdown().await;
    }

    #[tokio::test]
    async fn a_connect_tunnel_is_spliced_byte_for_byte_and_counted() {
        passed_through_both_ways(false).await;
    }

    #[tokio::test]
    async fn a_transparent_connection_is_spliced_byte_for_byte_and_counted() {
        passed_through_both_ways(true).await;
    }

    #[tokio::test]
    async fn shutting_the_engine_down_closes_a_passed_through_connection() {
        let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let p = passing(server.local_addr().unwrap(), false);
        let start = counts();
        let hello = client_hello("pass.test");
        let mut client = TcpStream::connect(p.proxy).await.unwrap();
        client.write_all(CONNECT_HEAD).await.unwrap();
        let (head, _) = read_head(&mut client).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        client.write_all(&hello).await.unwrap();
        let (mut upstream, _) = server.accept().await.unwrap();
        let mut got = vec![0u8; hello.len() + 1];
        client.write_all(b"x").await.unwrap();
        upstream.read_exact(&mut got).await.unwrap();
        assert_eq!(got.last(), Some(&b'x'), "the relay runs");
        assert_eq!(counts().sockets, start.sockets + 1, "socket to socket");

        let limit = std::time::Duration::from_secs(10);
        tokio::time::timeout(limit, p.engine.shutdown())
            .await
            .expect("shutdown within 10 s");
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(limit, client.read_to_end(&mut rest)).await;
        assert!(closed.is_ok() && rest.is_empty(), "the client's end closed");
        let closed = tokio::time::timeout(limit, upstream.read_to_end(&mut rest)).await;
        assert!(
            closed.is_ok() && rest.is_empty(),
            "the upstream's end closed"
        );
    }
}
