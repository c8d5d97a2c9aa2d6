//! The upstream leg: one pooled hyper-util client per applied `upstream` config, verifying TLS with
//! rustls (ring) against webpki roots + the system roots + `upstream.ca`, HTTP/1.1 and h2 by ALPN.
//!
//! 1. [`UpstreamCache::get`] returns the client for the `upstream` section in force, building a new
//!    one (new roots, new pool) when `applyConfig` changed it.
//! 2. [`gate`](super::gate) resolves and checks a target's addresses, then [`UpstreamClient::pin`]s
//!    them; the client's connector ([`PinnedConnector`]) connects only to pinned addresses and never
//!    resolves on its own.
//! 3. TLS gets the requested host name as SNI and for verification (hyper-rustls takes it from the
//!    URI), whatever address the name was pinned to.
//! 4. The pool grows with demand and shrinks by time ([`POOL_MAX_IDLE_PER_HOST`],
//!    [`POOL_IDLE_TIMEOUT`]).
//!
//! # Security
//! Connecting to the address that was checked (instead of resolving again in the connector) closes
//! the DNS-rebinding window between the private-address check and the connect.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use parking_lot::Mutex;
use rustls::pki_types::CertificateDer;
use tokio::net::TcpStream;

use crate::config::{Config, Upstream};
use crate::error::{HiveError, Result};

use super::deny::{ProxyBody, UpstreamFailure};
use super::{POOL_IDLE_TIMEOUT, UPSTREAM_CONNECT_TIMEOUT};

/// How many distinct host:port pins and DNS answers are remembered.
const PIN_CAPACITY: u64 = 10_000;
/// How long an unused pin is kept (every decision reads it, which keeps it alive).
const PIN_TTL: Duration = Duration::from_secs(300);
/// How long a DNS answer is reused.
const DNS_TTL: Duration = Duration::from_secs(30);
/// Most idle pooled connections kept per upstream host. The pool sizes itself to demand: every
/// request that finds no idle connection opens one, and every connection goes back to the pool when
/// its exchange ends, so as many stay as were in use at the busiest moment; each closes after
/// [`POOL_IDLE_TIMEOUT`] unused. This cap only bounds a burst's leftovers (a few file descriptors
/// each), and is well above what the proxy's listeners let be active at once, so that a busy host
/// never has connections closed after use and reopened (a TLS handshake each) while busy.
const POOL_MAX_IDLE_PER_HOST: usize = 4096;

type Pins = moka::sync::Cache<(String, u16), Arc<[SocketAddr]>>;

/// An upstream connection of the lean path. Boxed: the TLS state is kilobytes, and the
/// connection moves between the pool and each exchange's futures on every request.
pub type LeanStream = Box<TokioIo<MaybeHttpsStream<TokioIo<TcpStream>>>>;

/// An idle lean connection: when it went idle, the stream, and the rules its last request was
/// decided under.
type IdleLean = (std::time::Instant, LeanStream, Arc<crate::policy::Compiled>);

/// Idle connections of the lean path, per target, newest last (the next request takes the one
/// used last, whose state is still in the CPU's caches). Each closes after
/// [`POOL_IDLE_TIMEOUT`] unused: a sweeper runs while any is kept (as hyper's pool does), so a
/// burst's connections do not stay open, and in memory, after the burst.
#[derive(Default)]
pub struct LeanPool {
    idle: Mutex<std::collections::HashMap<LeanKey, Vec<IdleLean>>>,
    sweeping: std::sync::atomic::AtomicBool,
}

impl LeanPool {
    fn take(&self, key: &LeanKey) -> Option<(LeanStream, Arc<crate::policy::Compiled>)> {
        let mut idle = self.idle.lock();
        let list = idle.get_mut(key)?;
        let now = std::time::Instant::now();
        while let Some((since, stream, decided)) = list.pop() {
            if now.duration_since(since) < POOL_IDLE_TIMEOUT {
                return Some((stream, decided));
            }
        }
        None
    }

    fn put(pool: &Arc<LeanPool>, key: LeanKey, idle: IdleLean) {
        {
            let mut lists = pool.idle.lock();
            let list = lists.entry(key).or_default();
            if list.len() >= POOL_MAX_IDLE_PER_HOST {
                return;
            }
            list.push(idle);
        }
        if !pool
            .sweeping
            .swap(true, std::sync::atomic::Ordering::AcqRel)
        {
            let weak = Arc::downgrade(pool);
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(POOL_IDLE_TIMEOUT / 4).await;
                    let Some(pool) = weak.upgrade() else { return };
                    if pool.sweep() == 0 {
                        pool.sweeping
                            .store(false, std::sync::atomic::Ordering::Release);
                        // A put since the count: it saw `sweeping` set and spawned nothing.
                        if pool.idle.lock().values().all(Vec::is_empty)
                            || pool
                                .sweeping
                                .swap(true, std::sync::atomic::Ordering::AcqRel)
                        {
                            return;
                        }
                    }
                }
            });
        }
    }

    /// Closes expired connections; returns how many are left.
    fn sweep(&self) -> usize {
        let now = std::time::Instant::now();
        let mut idle = self.idle.lock();
        idle.retain(|_, list| {
            list.retain(|(since, ..)| now.duration_since(*since) < POOL_IDLE_TIMEOUT);
            !list.is_empty()
        });
        idle.values().map(Vec::len).sum()
    }
}

/// The target a lean connection is kept for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LeanKey {
    pub scheme: crate::policy::Scheme,
    pub host: Arc<str>,
    pub port: u16,
}
type Connector = TimeoutConnector<HttpsConnector<PinnedConnector>>;

/// The clients for the `upstream` section in force, rebuilt when it changes.
#[derive(Default)]
pub struct UpstreamCache {
    current: Mutex<Option<(Arc<Config>, Arc<UpstreamClient>)>>,
}

impl UpstreamCache {
    /// The client for `config.upstream`; reuses the current one while `upstream` is unchanged.
    pub fn get(&self, config: &Arc<Config>) -> Result<Arc<UpstreamClient>> {
        let mut current = self.current.lock();
        if let Some((cfg, client)) = current.as_ref() {
            if Arc::ptr_eq(cfg, config) {
                return Ok(client.clone());
            }
            if cfg.upstream == config.upstream {
                let client = client.clone();
                *current = Some((config.clone(), client.clone()));
                return Ok(client);
            }
        }
        let client = Arc::new(UpstreamClient::new(&config.upstream)?);
        *current = Some((config.clone(), client.clone()));
        Ok(client)
    }
}

/// A pooled client plus the pins and DNS cache its connector reads.
pub struct UpstreamClient {
    /// HTTP/1.1 and h2 (by ALPN).
    client: Client<Connector, ProxyBody>,
    /// HTTP/1.1 only, for the lean path's own connections ([`super::lean`]).
    h1_connector: Connector,
    /// Idle connections of the lean path ([`super::lean`]).
    lean_idle: Arc<LeanPool>,
    /// HTTP/1.1 only, for `Upgrade` requests (WebSocket over h2 needs extended CONNECT).
    h1_client: Client<Connector, ProxyBody>,
    pins: Pins,
    dns: Pins,
}

impl UpstreamClient {
    fn new(upstream: &Upstream) -> Result<UpstreamClient> {
        let roots = Arc::new(root_store(&upstream.ca)?);
        let pins: Pins = moka::sync::Cache::builder()
            .max_capacity(PIN_CAPACITY)
            .time_to_idle(PIN_TTL)
            .build();
        let dns: Pins = moka::sync::Cache::builder()
            .max_capacity(PIN_CAPACITY)
            .time_to_live(DNS_TTL)
            .build();
        let pinned = PinnedConnector { pins: pins.clone() };

        let both = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(client_config(roots.clone())?)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(pinned.clone());
        let h1 = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(client_config(roots)?)
            .https_or_http()
            .enable_http1()
            .wrap_connector(pinned);

        let mut builder = Client::builder(TokioExecutor::new());
        builder
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_max_idle_per_host(POOL_MAX_IDLE_PER_HOST)
            .set_host(true);
        let h1_connector = TimeoutConnector(h1, upstream.connect_timeout);
        Ok(UpstreamClient {
            client: builder.build(TimeoutConnector(both, upstream.connect_timeout)),
            h1_client: builder.build(h1_connector.clone()),
            h1_connector,
            lean_idle: Arc::default(),
            pins,
            dns,
        })
    }

    /// The client for a request (`upgrade`: HTTP/1.1 only).
    pub fn client(&self, upgrade: bool) -> &Client<Connector, ProxyBody> {
        if upgrade {
            &self.h1_client
        } else {
            &self.client
        }
    }

    /// A new HTTP/1.1 connection to `uri`'s host (pinned addresses only, TLS for `https`).
    pub async fn lean_connect(
        &self,
        uri: Uri,
    ) -> std::result::Result<LeanStream, Box<dyn std::error::Error + Send + Sync>> {
        let mut connector = self.h1_connector.clone();
        let stream = tower_service::Service::call(&mut connector, uri).await?;
        Ok(Box::new(TokioIo::new(stream)))
    }

    /// The newest idle lean connection to `key` that has not expired, with the rules its last
    /// request was decided under.
    pub fn lean_take(&self, key: &LeanKey) -> Option<(LeanStream, Arc<crate::policy::Compiled>)> {
        self.lean_idle.take(key)
    }

    /// Keeps an idle lean connection for the next request to `key`; `decided` are the rules its
    /// last request was decided under.
    pub fn lean_put(
        &self,
        key: LeanKey,
        stream: LeanStream,
        decided: Arc<crate::policy::Compiled>,
    ) {
        let idle = (std::time::Instant::now(), stream, decided);
        LeanPool::put(&self.lean_idle, key, idle);
    }

    /// Pins the checked addresses of host:port for the next connects.
    pub fn pin(&self, host: &str, port: u16, addrs: Arc<[SocketAddr]>) {
        let key = (host.to_string(), port);
        // Re-pinning the same answer on every request would churn the cache: skip it.
        if self.pins.get(&key).is_some_and(|pinned| pinned == addrs) {
            return;
        }
        self.pins.insert(key, addrs);
    }

    /// Resolves host:port through `resolver` (the system resolver outside tests), with a short
    /// cache.
    pub async fn resolve(
        &self,
        resolver: &dyn Resolve,
        host: &str,
        port: u16,
    ) -> std::io::Result<Arc<[SocketAddr]>> {
        let key = (host.to_string(), port);
        if let Some(hit) = self.dns.get(&key) {
            return Ok(hit);
        }
        let found: Vec<SocketAddr> =
            tokio::time::timeout(UPSTREAM_CONNECT_TIMEOUT, resolver.lookup(host, port))
                .await
                .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "dns timeout"))??;
        if found.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no addresses",
            ));
        }
        let found: Arc<[SocketAddr]> = found.into();
        self.dns.insert(key, found.clone());
        Ok(found)
    }
}

/// A name lookup: the only way the proxy asks any resolver about a name.
pub trait Resolve: Send + Sync {
    /// The addresses of host:port.
    fn lookup(
        &self,
        host: &str,
        port: u16,
    ) -> Pin<Box<dyn Future<Output = std::io::Result<Vec<SocketAddr>>> + Send>>;
}

/// The host's resolver (`getaddrinfo` on a blocking thread, through tokio).
pub struct SystemResolver;

impl Resolve for SystemResolver {
    fn lookup(
        &self,
        host: &str,
        port: u16,
    ) -> Pin<Box<dyn Future<Output = std::io::Result<Vec<SocketAddr>>> + Send>> {
        let host = host.to_string();
        Box::pin(async move { Ok(tokio::net::lookup_host((host, port)).await?.collect()) })
    }
}

/// Opens TCP connections to pinned addresses only.
#[derive(Clone)]
pub struct PinnedConnector {
    pins: Pins,
}

impl tower_service::Service<Uri> for PinnedConnector {
    type Response = TokioIo<TcpStream>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let host = uri
            .host()
            .unwrap_or("")
            .trim_start_matches('[')
            .trim_end_matches(']');
        let port = uri
            .port_u16()
            .unwrap_or(if uri.scheme_str() == Some("https") {
                443
            } else {
                80
            });
        let addrs = self.pins.get(&(host.to_ascii_lowercase(), port));
        Box::pin(async move {
            let addrs = addrs.ok_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::AddrNotAvailable, "no checked address")
            })?;
            let mut last = None;
            for addr in addrs.iter() {
                match tokio::time::timeout(UPSTREAM_CONNECT_TIMEOUT, TcpStream::connect(addr)).await
                {
                    Ok(Ok(stream)) => {
                        let _ = stream.set_nodelay(true);
                        return Ok(TokioIo::new(stream));
                    }
                    Ok(Err(e)) => last = Some(e),
                    Err(_) => last = Some(std::io::ErrorKind::TimedOut.into()),
                }
            }
            Err(last.unwrap_or_else(|| std::io::ErrorKind::AddrNotAvailable.into()))
        })
    }
}

/// Bounds TCP connect plus TLS handshake (`upstream.connectTimeoutMs`).
#[derive(Clone)]
pub struct TimeoutConnector<C>(C, Duration);

impl<C> tower_service::Service<Uri> for TimeoutConnector<C>
where
    C: tower_service::Service<Uri, Response = MaybeHttpsStream<TokioIo<TcpStream>>>
        + Send
        + 'static,
    C::Future: Send + 'static,
    C::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = MaybeHttpsStream<TokioIo<TcpStream>>;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let fut = self.0.call(uri);
        let limit = self.1;
        Box::pin(async move {
            match tokio::time::timeout(limit, fut).await {
                Ok(res) => res.map_err(Into::into),
                Err(_) => Err(Box::new(std::io::Error::from(std::io::ErrorKind::TimedOut)) as _),
            }
        })
    }
}

/// The rustls client config (ring provider) over `roots`.
fn client_config(roots: Arc<rustls::RootCertStore>) -> Result<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| HiveError::Internal(format!("rustls protocol versions: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// webpki roots + system roots (loaded once per process) + the config's extra PEM roots.
fn root_store(extra: &[String]) -> Result<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    for cert in native_roots() {
        // A broken system root is skipped, as every TLS client does.
        let _ = roots.add(cert.clone());
    }
    for pem in extra {
        for cert in rustls_pemfile::certs(&mut pem.as_bytes()) {
            let cert = cert.map_err(|e| HiveError::Internal(format!("upstream.ca: {e}")))?;
            roots
                .add(cert)
                .map_err(|e| HiveError::Internal(format!("upstream.ca: {e}")))?;
        }
    }
    Ok(roots)
}

fn native_roots() -> &'static [CertificateDer<'static>] {
    static ROOTS: OnceLock<Vec<CertificateDer<'static>>> = OnceLock::new();
    ROOTS.get_or_init(|| rustls_native_certs::load_native_certs().certs)
}

/// Classifies a client error for the `502` body by walking its source chain.
pub fn classify(err: &(dyn std::error::Error + 'static)) -> UpstreamFailure {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return classify_tls(tls);
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            match io.kind() {
                std::io::ErrorKind::TimedOut => return UpstreamFailure::Timeout,
                std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::ConnectionAborted
                | std::io::ErrorKind::BrokenPipe => return UpstreamFailure::Exchange,
                std::io::ErrorKind::ConnectionRefused
                | std::io::ErrorKind::AddrNotAvailable
                | std::io::ErrorKind::NetworkUnreachable
                | std::io::ErrorKind::HostUnreachable => return UpstreamFailure::ConnectRefused,
                _ => {}
            }
            if let Some(inner) = io.get_ref() {
                // `io::Error::source` skips the wrapped error itself, so descend by hand.
                cur = Some(inner as &(dyn std::error::Error + 'static));
                continue;
            }
        }
        cur = e.source();
    }
    UpstreamFailure::Exchange
}

fn classify_tls(err: &rustls::Error) -> UpstreamFailure {
    match err {
        rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented => {
            UpstreamFailure::TlsVerification
        }
        _ => UpstreamFailure::TlsHandshake,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classify_cases() {
        let io = |k: std::io::ErrorKind| -> Box<dyn std::error::Error + Send + Sync> {
            Box::new(std::io::Error::from(k))
        };
        let tls_bad = Box::new(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        ));
        // tokio-rustls inside hyper-rustls: io::Error(Other, io::Error(InvalidData, rustls::Error)).
        let nested = Box::new(std::io::Error::other(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::BadSignature),
        )));
        let cases: Vec<(Box<dyn std::error::Error + Send + Sync>, UpstreamFailure)> = vec![
            (nested, UpstreamFailure::TlsVerification),
            (
                io(std::io::ErrorKind::ConnectionRefused),
                UpstreamFailure::ConnectRefused,
            ),
            (io(std::io::ErrorKind::TimedOut), UpstreamFailure::Timeout),
            (tls_bad, UpstreamFailure::TlsVerification),
            (
                Box::new(rustls::Error::HandshakeNotComplete),
                UpstreamFailure::TlsHandshake,
            ),
            (
                io(std::io::ErrorKind::UnexpectedEof),
                UpstreamFailure::Exchange,
            ),
        ];
        for (err, want) in cases {
            assert_eq!(classify(err.as_ref()), want, "{err}");
        }
    }

    #[test]
    fn extra_roots_are_added_and_bad_pem_rejected() {
        let base = root_store(&[]).expect("roots").len();
        let ca = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        let key = rcgen::KeyPair::generate().expect("key");
        let mut ca = ca;
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let pem = ca.self_signed(&key).expect("cert").pem();
        assert_eq!(root_store(&[pem]).expect("roots").len(), base + 1);
        let broken = "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n".to_string();
        assert!(root_store(&[broken]).is_err());
    }
}
