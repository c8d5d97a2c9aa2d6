//! Listeners: the accept loop, per-connection serving with hyper (HTTP/1.1 + h2, upgrades), the
//! connection limit, and graceful draining.
//!
//! 1. The accept loop takes a permit of the listener's own budget, and for listeners inside the
//!    sandbox one of the sandbox's budget, before each accept ([`Limits`](super::Limits)): the
//!    sandbox cannot starve the host-side listener, nor one of its listeners all the others.
//!    Every accepted socket gets the idle timeout ([`Idle`]).
//! 2. Every connection and every tunnel spawned from it runs through [`ListenerCtl::spawn`], which
//!    counts it as active and cuts it when the listener is killed.
//! 3. [`ListenerCtl::close`]: stop accepting and ask connections to finish (hyper's graceful
//!    shutdown: no new requests, in-flight ones complete); after
//!    [`DRAIN_TIMEOUT`](super::DRAIN_TIMEOUT), or as soon as nothing is active, cut the rest.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use super::idle::{Idle, IdleState};
use super::{
    connect, http, Engine, TransparentTarget, Via, DRAIN_TIMEOUT, HEADER_READ_TIMEOUT,
    MAX_HEADER_BYTES,
};
use crate::attribution::PeerOrigin;

/// Lifecycle of a listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    Running,
    Draining,
    Killed,
}

/// Shared control block of one listener and everything spawned from its connections.
pub struct ListenerCtl {
    pub local: SocketAddr,
    pub via: Via,
    /// The expected `Proxy-Authorization` value (host listener only).
    pub credential: Option<::http::HeaderValue>,
    /// This listener's connection budget.
    budget: Arc<Semaphore>,
    phase: watch::Sender<Phase>,
    active: AtomicUsize,
    idle: Notify,
    closed: AtomicBool,
}

impl ListenerCtl {
    pub fn new(
        local: SocketAddr,
        via: Via,
        credential: Option<::http::HeaderValue>,
        budget: usize,
    ) -> Arc<Self> {
        Arc::new(ListenerCtl {
            local,
            via,
            credential,
            budget: Arc::new(Semaphore::new(budget)),
            phase: watch::channel(Phase::Running).0,
            active: AtomicUsize::new(0),
            idle: Notify::new(),
            closed: AtomicBool::new(false),
        })
    }

    /// Whether close has begun.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Resolves once the listener reaches `phase` (or later).
    pub fn reached(&self, phase: Phase) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.phase.subscribe();
        async move {
            let _ = rx.wait_for(|p| *p >= phase).await;
        }
    }

    /// Runs `fut` as an active task of this listener: counted for draining, cut when killed.
    pub fn spawn<F>(self: &Arc<Self>, fut: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.active.fetch_add(1, Ordering::AcqRel);
        super::memory::opened();
        let guard = ActiveGuard(self.clone());
        let killed = self.reached(Phase::Killed);
        tokio::spawn(async move {
            let _guard = guard;
            tokio::select! {
                _ = fut => {}
                _ = killed => {}
            }
        });
    }

    /// Stops accepting and asks connections to finish. Idempotent.
    pub fn begin_close(&self) {
        self.closed.store(true, Ordering::Release);
        self.phase.send_if_modified(|p| {
            if *p == Phase::Running {
                *p = Phase::Draining;
                true
            } else {
                false
            }
        });
    }

    /// Waits until nothing is active or `deadline` passes, then cuts what is left.
    pub async fn finish_close(&self, deadline: Instant) {
        loop {
            let notified = self.idle.notified();
            if self.active.load(Ordering::Acquire) == 0 {
                break;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                break;
            }
        }
        self.phase.send_replace(Phase::Killed);
    }

    /// [`begin_close`](Self::begin_close) then [`finish_close`](Self::finish_close) with the
    /// default drain timeout.
    pub async fn close(&self) {
        self.begin_close();
        self.finish_close(Instant::now() + DRAIN_TIMEOUT).await;
    }
}

struct ActiveGuard(Arc<ListenerCtl>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        super::memory::closed();
        if self.0.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// Every listener of every engine in this process, for the proxy-loop guard.
static LISTENERS: parking_lot::Mutex<Vec<std::sync::Weak<ListenerCtl>>> =
    parking_lot::Mutex::new(Vec::new());

/// Adds `ctl` to the process-wide list the loop guard reads (dropped listeners are pruned here).
pub fn register(ctl: &Arc<ListenerCtl>) {
    let mut all = LISTENERS.lock();
    all.retain(|l| l.strong_count() > 0);
    all.push(Arc::downgrade(ctl));
}

/// The addresses of every open listener of any engine in this process (for the proxy-loop guard).
///
/// Transparent listeners are left out: they listen on `0.0.0.0` / `[::]` inside a sandbox's own
/// network namespace, and counting them would refuse every upstream on the host's loopback that
/// shares a captured port (80, 443, ...).
///
/// # Security
/// A request aimed at one of these would come straight back into a hive proxy (this sandbox's or
/// another's), looping until connections run out. Checking the connect address instead of
/// marking forwarded requests keeps upstreams from learning that hive sits in front of them.
pub fn process_listener_addrs() -> Vec<SocketAddr> {
    LISTENERS
        .lock()
        .iter()
        .filter_map(std::sync::Weak::upgrade)
        .filter(|l| !l.is_closed() && l.via != Via::Transparent)
        .map(|l| l.local)
        .collect()
}

/// What a request handler knows about the connection it arrived on.
#[derive(Clone)]
pub struct Conn {
    pub engine: Arc<Engine>,
    pub ctl: Arc<ListenerCtl>,
    /// The connection's slots in its listener's and its sandbox's budgets, held by every clone
    /// (so also by tunnels and upgrades spawned from the connection).
    pub _permits: Arc<(OwnedSemaphorePermit, Option<OwnedSemaphorePermit>)>,
    /// The accepted socket's activity (requests waiting for an upstream mark it busy).
    pub idle: Arc<IdleState>,
    /// The process inside that opened the connection, looked up once.
    pub peer: Arc<crate::attribution::PeerOrigin>,
}

impl Conn {
    pub fn via(&self) -> Via {
        self.ctl.via
    }

    /// The process inside the sandbox that opened this connection, when it can be found
    /// (docs/audit-log.md#attribution). The first call reads `/proc` (off the async workers);
    /// later ones are free.
    pub async fn origin(&self) -> Option<Arc<crate::attribution::Origin>> {
        self.peer.get().await
    }
}

/// The hyper server settings shared by listeners and intercepted TLS connections.
pub fn server_builder() -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_HEADER_BYTES)
        .keep_alive(true)
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEADER_BYTES as u32)
        .enable_connect_protocol();
    builder
}

/// Serves one connection (a TCP stream, or decrypted TLS) until it ends, draining on close.
pub async fn serve_connection<I>(io: I, conn: Conn, tunnel: Option<http::Tunnel>)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    // Plain HTTP/1.1 requests first take the lean path; hyper serves the rest of the connection
    // from the first request that is not one.
    let io = match super::lean::serve(io, &conn, tunnel.as_ref()).await {
        super::lean::Served::Done => return,
        super::lean::Served::Handoff(io) => io,
    };
    let draining = conn.ctl.reached(Phase::Draining);
    // Over TLS, a vectored write of head and body would become one TLS record (one seal, one
    // header) per slice: flatten them into one buffer first. Plain TCP keeps writev.
    let tls = tunnel
        .as_ref()
        .is_some_and(|t| t.scheme == crate::policy::Scheme::Https);
    let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let conn = conn.clone();
        let tunnel = tunnel.clone();
        async move {
            let _busy = conn.idle.busy();
            let h2 = req.version() == hyper::Version::HTTP_2;
            let res = http::handle(conn, tunnel, req).await;
            // hyper resets the stream with the reason an error carries (`REFUSED_STREAM`).
            match res.extensions().get::<super::resend::Refused>() {
                Some(refused) if h2 => Err(*refused),
                _ => Ok(res),
            }
        }
    });
    let mut builder = server_builder();
    if tls {
        builder.http1().writev(false);
    }
    let served = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(served);
    tokio::select! {
        _ = served.as_mut() => return,
        _ = draining => {}
    }
    served.as_mut().graceful_shutdown();
    let _ = served.await;
}

/// Accepts on `listener` until the listener is closed.
pub fn spawn_accept_loop(
    engine: Arc<Engine>,
    listener: tokio::net::TcpListener,
    ctl: Arc<ListenerCtl>,
    transparent: Option<TransparentTarget>,
) {
    let draining = ctl.reached(Phase::Draining);
    tokio::spawn(async move {
        tokio::pin!(draining);
        loop {
            let permit = tokio::select! {
                _ = &mut draining => break,
                permit = ctl.budget.clone().acquire_owned() => match permit {
                    Ok(p) => p,
                    Err(_) => break,
                },
            };
            let sandbox_permit = match ctl.via {
                Via::Host => None,
                Via::Proxy | Via::Transparent => tokio::select! {
                    _ = &mut draining => break,
                    permit = engine.sandbox_connections.clone().acquire_owned() => match permit {
                        Ok(p) => Some(p),
                        Err(_) => break,
                    },
                },
            };
            let accepted = tokio::select! {
                _ = &mut draining => break,
                accepted = listener.accept() => accepted,
            };
            let (stream, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "proxy accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let local = stream.local_addr().ok();
            let stream = Idle::new(stream, engine.limits.idle);
            let conn = Conn {
                engine: engine.clone(),
                ctl: ctl.clone(),
                _permits: Arc::new((permit, sandbox_permit)),
                idle: stream.state(),
                peer: Arc::new(match (ctl.via, local) {
                    (Via::Proxy | Via::Transparent, Some(local)) => {
                        PeerOrigin::new(engine.attribution.clone(), peer, local)
                    }
                    _ => PeerOrigin::none(),
                }),
            };
            match &transparent {
                None => ctl.spawn(serve_connection(stream, conn, None)),
                Some(target) => {
                    if let Some((host, port, refused)) = local.and_then(|local| target(local)) {
                        ctl.spawn(connect::transparent(conn, stream, host, port, refused));
                    }
                }
            }
        }
    });
}
