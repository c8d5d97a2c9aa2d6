//! The egress proxy (docs/network-access.md, docs/audit-log.md): one [`Engine`] per sandbox decides every outbound
//! request against the policy in force, injects the sandbox's credentials on allowed requests that
//! leave over verified TLS, and records every decision as an audit event.
//!
//! How a connection flows:
//! 1. A listener ([`Engine::serve_sandbox_listener`] or [`Engine::open_host_listener`]) accepts a
//!    TCP connection (within that listener's budget and, for listeners inside the sandbox, the
//!    sandbox's budget: [`Limits`]) and serves it with hyper (HTTP/1.1 and h2, upgrades on) under
//!    a header-read timeout, a header-size limit and an idle timeout ([`listener`], [`idle`]).
//! 2. Each request is dispatched ([`http`]): on the host listener the per-listener credential is
//!    checked first (`407` without it). Absolute-form requests are decided and forwarded; `CONNECT`
//!    is decided for host:port before anything else ([`connect`]); a refused one is still accepted
//!    so that every request inside gets its `403` (or `502`) with method and path.
//! 3. An accepted tunnel is sniffed: TLS is terminated with a leaf for the SNI signed by the
//!    sandbox CA, and the decrypted requests are served again and decided one by one
//!    ([`intercept`]); other bytes become a raw TCP tunnel only where the policy allows it.
//! 4. Every decision goes through [`gate`]: policy first, then resolution (`upstream.resolve` or
//!    DNS) with the private-address and proxy-loop guards; the checked addresses are pinned so the
//!    upstream connector connects exactly there ([`upstream`]).
//! 5. Allowed requests are rewritten ([`headers`]: hop-by-hop headers stripped, overrides set) and
//!    sent through the pooled upstream client; bodies stream both ways and are counted, and the
//!    `egress.response` event is emitted when the exchange ends ([`audit`]).
//!
//! Denials and failures are answered by [`deny`] with fixed text (no secrets, no internals).
//!
//! Event conventions (docs/audit-log.md): a denied `CONNECT` or transparent connection is accepted
//! and each request inside recorded with its real method, path and scheme; bytes that are neither
//! TLS nor HTTP (and raw tunnels) are recorded with method `CONNECT`, an empty path and scheme
//! `tcp`. `bytesOut` counts body bytes the sandbox sent upstream, `bytesIn` body bytes
//! the upstream sent back (for tunnels and WebSockets: every byte each way).

pub mod ask;
mod audit;
mod connect;
mod deny;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
mod gate;
mod headers;
mod http;
mod idle;
mod intercept;
mod lean;
mod listener;
mod memory;
mod passthrough;
mod resend;
mod scrub;
mod splice;
mod substitute;
mod upstream;

#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::Semaphore;

use crate::error::{HiveError, Result};
use crate::events::EventBus;
use crate::policy::PolicyCell;
use crate::tls::CertificateAuthority;

use listener::ListenerCtl;

/// How long a client may take to send a complete request head (slowloris guard).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a TLS handshake may take, on either leg.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long connecting to an upstream may take (TCP connect plus TLS handshake).
pub const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request head accepted (HTTP/1.1 read buffer; h2 header list size).
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// Most connections one listener inside the sandbox (proxy or transparent) serves at once.
pub const MAX_LISTENER_CONNECTIONS: usize = 768;
/// Most connections the listeners inside one sandbox serve at once together (lowered when the
/// process may open few file descriptors: see [`Limits::default`]).
pub const MAX_SANDBOX_CONNECTIONS: usize = 1024;
/// Most connections one host-side `sandbox.proxy()` listener serves at once (its own budget:
/// the sandbox cannot use it up; lowered like the sandbox's when descriptors are few). Clients
/// past it wait in the listen backlog behind keep-alive connections that may never close, so it
/// is sized for a thousand concurrent clients of the (trusted) host application.
pub const MAX_HOST_CONNECTIONS: usize = 1024;
/// How long an accepted connection may move no byte either way (keep-alive HTTP, intercepted TLS,
/// tunnels, WebSockets) while no request on it waits for an upstream.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// Connection budgets and the idle timeout of one engine. Clients over a budget wait in the
/// listen backlog until a connection of that listener (or sandbox) closes.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Per listener inside the sandbox.
    pub listener: usize,
    /// All listeners inside the sandbox together.
    pub sandbox: usize,
    /// Per host-side listener.
    pub host: usize,
    pub idle: Duration,
}

impl Default for Limits {
    /// The constants above, with the sandbox budget capped at a quarter of what the process's
    /// file-descriptor limit allows (each connection may hold up to three: the client socket, the
    /// upstream socket and a pooled spare), so one sandbox cannot take the descriptors every
    /// other sandbox in the process needs.
    fn default() -> Limits {
        let mut nofile = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes the struct it is given.
        let soft = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut nofile) } == 0 {
            usize::try_from(nofile.rlim_cur).unwrap_or(usize::MAX)
        } else {
            1024
        };
        let share = (soft.saturating_sub(256) / 3 / 4).max(64);
        let sandbox = MAX_SANDBOX_CONNECTIONS.min(share);
        Limits {
            listener: MAX_LISTENER_CONNECTIONS.min(sandbox),
            sandbox,
            host: MAX_HOST_CONNECTIONS.min(share),
            idle: IDLE_TIMEOUT,
        }
    }
}
/// How long [`Engine::shutdown`] and [`HostListener::close`] let in-flight exchanges finish.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);
/// How long an accepted tunnel whose rule allows raw TCP waits for the client's first bytes before
/// treating it as a server-speaks-first protocol (ssh, smtp) and opening a raw tunnel.
pub const SNIFF_TIMEOUT: Duration = Duration::from_secs(1);
/// How long pooled upstream connections stay idle before they are closed (docs/decisions.md,
/// "Proxy performance"): long enough for a client's next request in a conversation, short enough
/// that a burst's leftovers (a thousand TLS connections' buffers) are gone within half a minute.
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(12);

/// Which listener a request came through, as recorded in events (`via`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// The proxy listener inside the sandbox (`HTTP_PROXY`).
    Proxy,
    /// A transparent listener inside the sandbox (clients that ignore proxy variables).
    Transparent,
    /// The host-side listener of `sandbox.proxy()`.
    Host,
}

impl Via {
    /// `"proxy"`, `"transparent"` or `"host"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Via::Proxy => "proxy",
            Via::Transparent => "transparent",
            Via::Host => "host",
        }
    }
}

/// Maps a transparent connection, by the sandbox-local address it dialed, to the host name (as
/// the sandbox asked DNS for it) and port the client meant, and whether that name was answered as
/// denied (the connection is then refused request by request); `None` closes the connection.
pub type TransparentTarget = Arc<dyn Fn(SocketAddr) -> Option<(String, u16, bool)> + Send + Sync>;

/// The egress proxy of one sandbox: serves any number of listeners against the policy in the
/// shared [`PolicyCell`].
///
/// # Security
/// Every request is decided against `cell.load()` at the moment it arrives, so `applyConfig`
/// takes effect on open keep-alive and intercepted connections too. Override header values are
/// only read through [`crate::config::Secret::expose`] when writing the upstream request.
pub struct Engine {
    sandbox: String,
    cell: Arc<PolicyCell>,
    events: Arc<EventBus>,
    ca: Arc<CertificateAuthority>,
    /// Every name lookup goes through this (the system resolver; tests count lookups).
    resolver: Arc<dyn upstream::Resolve>,
    upstream: upstream::UpstreamCache,
    listeners: Mutex<Vec<Arc<ListenerCtl>>>,
    limits: Limits,
    /// The budget all listeners inside the sandbox share.
    sandbox_connections: Arc<Semaphore>,
    /// Which process inside opened a connection (docs/audit-log.md#attribution).
    attribution: Arc<crate::attribution::Attribution>,
    /// Asked about requests no rule matches (`onUnmatched`), when set.
    unmatched: arc_swap::ArcSwapOption<ask::Unmatched>,
    /// Requests the lean path took ([`lean`]), for tests and diagnostics.
    lean_requests: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("sandbox", &self.sandbox)
            .finish_non_exhaustive()
    }
}

impl Engine {
    /// An engine for `sandbox`, deciding against `cell`, emitting into `events` and minting leaf
    /// certificates from `ca`. Serves nothing until a listener is added.
    pub fn new(
        sandbox: String,
        cell: Arc<PolicyCell>,
        events: Arc<EventBus>,
        ca: Arc<CertificateAuthority>,
    ) -> Arc<Engine> {
        Engine::with_options(
            sandbox,
            cell,
            events,
            ca,
            Arc::new(upstream::SystemResolver),
            Limits::default(),
        )
    }

    /// [`Engine::new`] with another resolver for names and other limits.
    pub(crate) fn with_options(
        sandbox: String,
        cell: Arc<PolicyCell>,
        events: Arc<EventBus>,
        ca: Arc<CertificateAuthority>,
        resolver: Arc<dyn upstream::Resolve>,
        limits: Limits,
    ) -> Arc<Engine> {
        Arc::new(Engine {
            sandbox,
            cell,
            events,
            ca,
            resolver,
            upstream: upstream::UpstreamCache::default(),
            listeners: Mutex::new(Vec::new()),
            limits,
            sandbox_connections: Arc::new(Semaphore::new(limits.sandbox)),
            attribution: crate::attribution::Attribution::new(),
            unmatched: arc_swap::ArcSwapOption::empty(),
            lean_requests: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// How many requests the lean HTTP/1.1 path has taken ([`lean`]).
    pub fn lean_requests(&self) -> u64 {
        self.lean_requests
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The attribution state the sandbox updates as its namespaces and execs start.
    pub fn attribution(&self) -> &Arc<crate::attribution::Attribution> {
        &self.attribution
    }

    /// Sets (or with `None` clears) the handler asked about requests no rule matches.
    pub fn set_unmatched(&self, unmatched: Option<ask::Unmatched>) {
        self.unmatched.store(unmatched.map(Arc::new));
    }

    /// The sandbox this engine serves.
    pub fn sandbox(&self) -> &str {
        &self.sandbox
    }

    /// Serves a listener the launcher created inside the sandbox's network namespace (no
    /// credential; events say `via: "proxy"`). Must be called within a tokio runtime; returns at
    /// once and accepts on a task until [`Engine::shutdown`].
    pub fn serve_sandbox_listener(self: &Arc<Self>, listener: std::net::TcpListener) -> Result<()> {
        listener
            .set_nonblocking(true)
            .map_err(|e| HiveError::io("making the proxy listener non-blocking", e))?;
        let listener = tokio::net::TcpListener::from_std(listener)
            .map_err(|e| HiveError::io("registering the proxy listener", e))?;
        self.start_listener(listener, Via::Proxy, None, None)?;
        Ok(())
    }

    /// Serves a transparent listener inside the sandbox (clients that ignore proxy variables,
    /// docs/security.md): each connection is mapped to the name and port it meant by `target`, decided like
    /// a `CONNECT` to that host:port, then intercepted (TLS), served as HTTP, or tunnelled raw
    /// where the policy allows raw TCP. Events say `via: "transparent"`.
    ///
    /// The returned handle stops this listener alone ([`ListenerHandle::stop`]), e.g. when
    /// `applyConfig` removes the last rule naming its port; [`Engine::shutdown`] stops it too.
    pub fn serve_transparent_listener(
        self: &Arc<Self>,
        listener: std::net::TcpListener,
        target: TransparentTarget,
    ) -> Result<ListenerHandle> {
        listener
            .set_nonblocking(true)
            .map_err(|e| HiveError::io("making a transparent listener non-blocking", e))?;
        let listener = tokio::net::TcpListener::from_std(listener)
            .map_err(|e| HiveError::io("registering a transparent listener", e))?;
        let ctl = self.start_listener(listener, Via::Transparent, None, Some(target))?;
        Ok(ListenerHandle(ctl))
    }

    /// Opens the host-side listener of `sandbox.proxy()` on `127.0.0.1:0` with a fresh random
    /// credential (128 bits).
    ///
    /// # Security
    /// Any local process can connect to a loopback port; the credential in the returned URL keeps
    /// the sandbox's injected credentials from being borrowed by them (`407` without it).
    pub async fn open_host_listener(self: &Arc<Self>) -> Result<HostListener> {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .map_err(|e| HiveError::io("binding the host proxy listener", e))?;
        let token = random_hex(16)?;
        let port = listener
            .local_addr()
            .map_err(|e| HiveError::io("reading the host proxy listener address", e))?
            .port();
        let credential = Some(headers::basic_credential(&token));
        let ctl = self.start_listener(listener, Via::Host, credential, None)?;
        Ok(HostListener {
            url: format!("http://{}:{token}@127.0.0.1:{port}", headers::PROXY_USER),
            ca: self.ca.cert_pem().to_string(),
            ctl,
        })
    }

    /// Stops every listener and lets in-flight exchanges finish for up to [`DRAIN_TIMEOUT`], then
    /// cuts what is left and returns.
    pub async fn shutdown(&self) {
        let listeners: Vec<_> = std::mem::take(&mut *self.listeners.lock());
        let deadline = tokio::time::Instant::now() + DRAIN_TIMEOUT;
        for ctl in &listeners {
            ctl.begin_close();
        }
        for ctl in &listeners {
            ctl.finish_close(deadline).await;
        }
    }

    fn start_listener(
        self: &Arc<Self>,
        listener: tokio::net::TcpListener,
        via: Via,
        credential: Option<::http::HeaderValue>,
        transparent: Option<TransparentTarget>,
    ) -> Result<Arc<ListenerCtl>> {
        let local = listener
            .local_addr()
            .map_err(|e| HiveError::io("reading the proxy listener address", e))?;
        let budget = match via {
            Via::Host => self.limits.host,
            Via::Proxy | Via::Transparent => self.limits.listener,
        };
        let ctl = ListenerCtl::new(local, via, credential, budget);
        listener::register(&ctl);
        self.listeners.lock().push(ctl.clone());
        listener::spawn_accept_loop(self.clone(), listener, ctl.clone(), transparent);
        Ok(ctl)
    }
}

/// One listener served by an [`Engine`] (see [`Engine::serve_transparent_listener`]).
pub struct ListenerHandle(Arc<ListenerCtl>);

impl std::fmt::Debug for ListenerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ListenerHandle")
            .field("addr", &self.0.local)
            .finish_non_exhaustive()
    }
}

impl ListenerHandle {
    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.0.local
    }

    /// Stops accepting at once (the socket closes, so new connections are refused); connections
    /// already accepted finish their current exchange. Idempotent.
    pub fn stop(&self) {
        self.0.begin_close();
    }
}

/// The host-side listener of `sandbox.proxy()`.
pub struct HostListener {
    /// `http://hive:<token>@127.0.0.1:<port>`.
    pub url: String,
    /// The sandbox CA certificate (PEM) clients must trust for HTTPS.
    pub ca: String,
    ctl: Arc<ListenerCtl>,
}

impl std::fmt::Debug for HostListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL carries the credential.
        f.debug_struct("HostListener")
            .field("addr", &self.ctl.local)
            .finish_non_exhaustive()
    }
}

impl HostListener {
    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.ctl.local
    }

    /// Stops accepting and drains this listener's connections (bounded by [`DRAIN_TIMEOUT`]).
    /// Idempotent.
    pub async fn close(&self) {
        self.ctl.close().await;
    }
}

/// `n` random bytes from the OS, hex-encoded.
fn random_hex(n: usize) -> Result<String> {
    let mut bytes = vec![0u8; n];
    getrandom::fill(&mut bytes).map_err(|e| HiveError::Internal(format!("getrandom: {e}")))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}
