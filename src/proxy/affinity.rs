//! Connection affinity: each client connection keeps the HTTP/1.1 upstream connection its last
//! request used, and sends its next request to the same place on it, instead of checking a
//! connection out of the shared pool for every request (docs/decisions.md, "Proxy CPU per
//! request").
//!
//! 1. [`Affinity`] lives as long as one served client connection (plain, or decrypted from a
//!    tunnel). A request takes the connection it holds when scheme, host, port and upstream
//!    client all match; else one from the client's [`IdlePool`]; else it connects.
//! 2. A fresh connection that negotiates h2 (ALPN) is not kept: the host is remembered as h2
//!    and its requests go to the shared pooled client, which multiplexes them on one connection.
//! 3. When the client connection ends, its upstream connection goes back to the idle pool for
//!    the next client connection (so a client that opens a connection per request still reuses
//!    upstream connections and their TLS sessions). Idle connections close after
//!    [`POOL_IDLE_TIMEOUT`]; at most [`MAX_IDLE_PER_HOST`] are kept per host.
//! 4. A request that a reused connection could not even start sending (the upstream closed it
//!    while idle) is sent again on another; one that was sent is never repeated.
//!
//! # Security
//! A connection is reused only for the exact scheme, host and port it was opened for, under the
//! same `upstream` config (roots, pins), as the shared pool does: the connect itself goes through
//! the same pinned, timed connector.

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use http::{header, HeaderValue, Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::client::legacy::connect::Connection;
use parking_lot::Mutex;
use tokio::time::Instant;
use tower_service::Service;

use crate::policy::Scheme;

use super::deny::{BoxError, ProxyBody};
use super::POOL_IDLE_TIMEOUT;

/// Most idle connections kept per host (see `POOL_MAX_IDLE_PER_HOST` in upstream.rs: a bound on
/// a burst's leftovers, not on use).
pub const MAX_IDLE_PER_HOST: usize = 4096;
/// How often idle connections past [`POOL_IDLE_TIMEOUT`] are closed.
const SWEEP_EVERY: Duration = Duration::from_secs(2);

/// Where a connection goes: scheme, host (normalized) and port.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Key {
    pub https: bool,
    pub host: Box<str>,
    pub port: u16,
}

impl Key {
    pub fn new(scheme: Scheme, host: &str, port: u16) -> Key {
        Key {
            https: scheme == Scheme::Https,
            host: host.into(),
            port,
        }
    }

    fn is(&self, scheme: Scheme, host: &str, port: u16) -> bool {
        self.https == (scheme == Scheme::Https) && self.port == port && &*self.host == host
    }
}

/// The upstream connection one client connection holds (see the module docs).
#[derive(Default)]
pub struct Affinity {
    held: Mutex<Option<Held>>,
}

struct Held {
    pool: Arc<IdlePool>,
    key: Key,
    sender: SendRequest<ProxyBody>,
}

impl Affinity {
    /// Takes the held connection if it goes to `scheme://host:port` through `pool`.
    fn take(&self, pool: &Arc<IdlePool>, scheme: Scheme, host: &str, port: u16) -> Option<Held> {
        let mut held = self.held.lock();
        match held.as_ref() {
            Some(h) if Arc::ptr_eq(&h.pool, pool) && h.key.is(scheme, host, port) => held.take(),
            _ => None,
        }
    }

    /// Holds `next`; a connection held before (to elsewhere) goes to its idle pool.
    fn keep(&self, next: Held) {
        let before = self.held.lock().replace(next);
        if let Some(before) = before {
            before.pool.put(before.key, before.sender);
        }
    }
}

impl Drop for Affinity {
    fn drop(&mut self) {
        if let Some(held) = self.held.get_mut().take() {
            held.pool.put(held.key, held.sender);
        }
    }
}

/// A connection put back, and when.
type IdleConnection = (SendRequest<ProxyBody>, Instant);

/// Idle HTTP/1.1 connections of one upstream client, and the hosts that answered with h2.
#[derive(Default)]
pub struct IdlePool {
    idle: Mutex<HashMap<Key, Vec<IdleConnection>>>,
    h2: Mutex<HashMap<Key, Instant>>,
}

impl IdlePool {
    /// A new pool, with a task that closes expired connections while the pool lives (when a
    /// runtime is there to run it; otherwise expiry happens on use only).
    pub fn new() -> Arc<IdlePool> {
        let pool = Arc::new(IdlePool::default());
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(sweep(Arc::downgrade(&pool)));
        }
        pool
    }

    /// The most recently used idle connection to `key` that can take a request now.
    fn checkout(&self, key: &Key) -> Option<SendRequest<ProxyBody>> {
        let mut idle = self.idle.lock();
        let list = idle.get_mut(key)?;
        let now = Instant::now();
        while let Some((sender, since)) = list.pop() {
            if sender.is_ready() && now.duration_since(since) < POOL_IDLE_TIMEOUT {
                return Some(sender);
            }
        }
        idle.remove(key);
        None
    }

    /// Returns a connection after use (dropped, and so closed, if it cannot take another).
    fn put(&self, key: Key, sender: SendRequest<ProxyBody>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock();
        let list = idle.entry(key).or_default();
        if list.len() >= MAX_IDLE_PER_HOST {
            list.remove(0);
        }
        list.push((sender, Instant::now()));
    }

    /// Closes the connections idle for longer than [`POOL_IDLE_TIMEOUT`], and forgets h2 hosts
    /// after as long.
    fn expire(&self) {
        self.expire_at(Instant::now());
    }

    fn expire_at(&self, now: Instant) {
        let fresh = |since: &Instant| now.duration_since(*since) < POOL_IDLE_TIMEOUT;
        let expired: Vec<_> = {
            let mut idle = self.idle.lock();
            let mut expired = Vec::new();
            idle.retain(|_, list| {
                let keep_from = list.partition_point(|(_, since)| !fresh(since));
                expired.extend(list.drain(..keep_from));
                list.retain(|(sender, _)| !sender.is_closed());
                !list.is_empty()
            });
            expired
        };
        // Dropped outside the lock: each drop ends a connection task.
        drop(expired);
        self.h2.lock().retain(|_, since| fresh(since));
    }

    fn is_h2(&self, key: &Key) -> bool {
        self.h2.lock().contains_key(key)
    }

    fn mark_h2(&self, key: Key) {
        self.h2.lock().insert(key, Instant::now());
    }

    /// How many idle connections are kept (all hosts).
    #[cfg(test)]
    pub fn idle_count(&self) -> usize {
        self.idle.lock().values().map(Vec::len).sum()
    }
}

async fn sweep(pool: Weak<IdlePool>) {
    loop {
        tokio::time::sleep(SWEEP_EVERY).await;
        match pool.upgrade() {
            Some(pool) => pool.expire(),
            None => return,
        }
    }
}

/// What [`send`] did with a request.
pub enum Sent {
    /// Answered over an HTTP/1.1 connection of the affinity.
    Answered(Response<Incoming>),
    /// The host speaks h2: send `request` (unchanged) through the shared pooled client.
    UsePool(Request<ProxyBody>),
}

/// Sends `request` (absolute URI, no `Host`) over the connection `affinity` holds for its target,
/// an idle one, or a new one from `connector`.
pub async fn send<C>(
    affinity: &Affinity,
    pool: &Arc<IdlePool>,
    connector: &C,
    scheme: Scheme,
    host: &str,
    port: u16,
    request: Request<ProxyBody>,
) -> Result<Sent, BoxError>
where
    C: Service<Uri> + Clone + Send + 'static,
    C::Response: Connection + hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    C::Error: Into<BoxError>,
    C::Future: Send + 'static,
{
    let key = Key::new(scheme, host, port);
    if pool.is_h2(&key) {
        return Ok(Sent::UsePool(request));
    }
    let absolute = request.uri().clone();
    let mut request = to_origin_form(request)?;
    let mut reused = affinity
        .take(pool, scheme, host, port)
        .map(|held| held.sender);
    loop {
        let Some(mut sender) = reused.take().or_else(|| pool.checkout(&key)) else {
            break;
        };
        if sender.ready().await.is_err() {
            continue;
        }
        match sender.try_send_request(request).await {
            Ok(response) => {
                affinity.keep(Held {
                    pool: pool.clone(),
                    key,
                    sender,
                });
                return Ok(Sent::Answered(response));
            }
            Err(mut failed) => match failed.take_message() {
                // Not sent at all: the connection had closed; try another.
                Some(unsent) => request = unsent,
                None => return Err(failed.into_error().into()),
            },
        }
    }

    let io = connector
        .clone()
        .call(absolute.clone())
        .await
        .map_err(Into::into)?;
    if io.connected().is_negotiated_h2() {
        pool.mark_h2(key);
        let (mut parts, body) = request.into_parts();
        parts.uri = absolute;
        parts.headers.remove(header::HOST);
        return Ok(Sent::UsePool(Request::from_parts(parts, body)));
    }
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let response = sender.send_request(request).await?;
    affinity.keep(Held {
        pool: pool.clone(),
        key,
        sender,
    });
    Ok(Sent::Answered(response))
}

/// The request as sent on an HTTP/1.1 connection to an origin: the path in the request line and
/// the authority in `Host` (the default port left out), as the pooled client writes it.
fn to_origin_form(request: Request<ProxyBody>) -> Result<Request<ProxyBody>, BoxError> {
    let (mut parts, body) = request.into_parts();
    let authority = parts
        .uri
        .authority()
        .ok_or("request URI without authority")?;
    let default_port = if parts.uri.scheme_str() == Some("https") {
        443
    } else {
        80
    };
    let host = match authority.port_u16() {
        Some(port) if port != default_port => HeaderValue::from_str(authority.as_str())?,
        _ => HeaderValue::from_str(authority.host())?,
    };
    parts.headers.insert(header::HOST, host);
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    parts.uri = Uri::try_from(path)?;
    Ok(Request::from_parts(parts, body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn request(uri: &str) -> Request<ProxyBody> {
        Request::get(uri)
            .body(super::super::deny::empty_body())
            .unwrap()
    }

    #[test]
    fn origin_form_keeps_the_path_and_names_the_authority_in_host() {
        let cases = [
            ("http://pypi.org/simple/?q=1", "/simple/?q=1", "pypi.org"),
            ("http://pypi.org:8080/", "/", "pypi.org:8080"),
            ("https://api.github.com:443/zen", "/zen", "api.github.com"),
            ("http://[::1]:81/x", "/x", "[::1]:81"),
        ];
        for (uri, path, host) in cases {
            let r = to_origin_form(request(uri)).unwrap();
            assert_eq!(r.uri().to_string(), path, "{uri}");
            assert_eq!(r.headers()[header::HOST], host, "{uri}");
        }
    }

    /// A loopback HTTP/1.1 server that answers every request with how many requests its
    /// connection has carried, and counts connections.
    async fn counting_server(
        keep_alive: bool,
    ) -> (std::net::SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let counted = connections.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                let served = Arc::new(AtomicUsize::new(0));
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |_req| {
                        let n = served.fetch_add(1, Ordering::SeqCst) + 1;
                        async move {
                            Ok::<_, std::convert::Infallible>(Response::new(
                                http_body_util::Full::new(bytes::Bytes::from(n.to_string())),
                            ))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .keep_alive(keep_alive)
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        (addr, connections)
    }

    #[derive(Clone)]
    struct Plain;

    impl Service<Uri> for Plain {
        type Response = hyper_util::rt::TokioIo<tokio::net::TcpStream>;
        type Error = std::io::Error;
        type Future = std::pin::Pin<
            Box<dyn std::future::Future<Output = std::io::Result<Self::Response>> + Send>,
        >;
        fn poll_ready(
            &mut self,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn call(&mut self, uri: Uri) -> Self::Future {
            let addr = format!("127.0.0.1:{}", uri.port_u16().unwrap());
            Box::pin(async move {
                Ok(hyper_util::rt::TokioIo::new(
                    tokio::net::TcpStream::connect(addr).await?,
                ))
            })
        }
    }

    async fn get(affinity: &Affinity, pool: &Arc<IdlePool>, port: u16) -> String {
        let uri = format!("http://up.test:{port}/");
        match send(
            affinity,
            pool,
            &Plain,
            Scheme::Http,
            "up.test",
            port,
            request(&uri),
        )
        .await
        .unwrap()
        {
            Sent::Answered(r) => {
                let body = r.into_body().collect().await.unwrap().to_bytes();
                String::from_utf8(body.to_vec()).unwrap()
            }
            Sent::UsePool(_) => panic!("not h2"),
        }
    }

    #[tokio::test]
    async fn a_client_connection_reuses_its_upstream_connection_and_hands_it_on() {
        use std::sync::atomic::Ordering;
        let (addr, connections) = counting_server(true).await;
        let pool = IdlePool::new();
        let first = Affinity::default();
        assert_eq!(get(&first, &pool, addr.port()).await, "1");
        assert_eq!(get(&first, &pool, addr.port()).await, "2");
        assert_eq!(connections.load(Ordering::SeqCst), 1);
        // Two client connections at once need two upstream connections.
        let second = Affinity::default();
        assert_eq!(get(&second, &pool, addr.port()).await, "1");
        assert_eq!(connections.load(Ordering::SeqCst), 2);
        // A client connection that ends hands its connection to the next one.
        drop(first);
        assert_eq!(pool.idle_count(), 1);
        let third = Affinity::default();
        assert_eq!(get(&third, &pool, addr.port()).await, "3");
        assert_eq!(connections.load(Ordering::SeqCst), 2);
        assert_eq!(pool.idle_count(), 0);
    }

    #[tokio::test]
    async fn a_connection_the_upstream_closes_is_replaced() {
        use std::sync::atomic::Ordering;
        let (addr, connections) = counting_server(false).await;
        let pool = IdlePool::new();
        let affinity = Affinity::default();
        for _ in 0..3 {
            assert_eq!(get(&affinity, &pool, addr.port()).await, "1");
        }
        assert_eq!(connections.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn an_expired_idle_connection_is_closed_and_replaced() {
        use std::sync::atomic::Ordering;
        let (addr, connections) = counting_server(true).await;
        let pool = IdlePool::new();
        let affinity = Affinity::default();
        assert_eq!(get(&affinity, &pool, addr.port()).await, "1");
        // Another port: the held connection goes idle.
        let (other, _) = counting_server(true).await;
        assert_eq!(get(&affinity, &pool, other.port()).await, "1");
        assert_eq!(pool.idle_count(), 1);
        assert_eq!(connections.load(Ordering::SeqCst), 1);
        // Expired: closed by the pool, never reused.
        pool.expire_at(Instant::now() + POOL_IDLE_TIMEOUT + Duration::from_secs(1));
        assert_eq!(pool.idle_count(), 0);
        assert_eq!(get(&affinity, &pool, addr.port()).await, "1");
        assert_eq!(connections.load(Ordering::SeqCst), 2);
    }
}
