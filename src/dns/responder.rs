//! The DNS responder of one sandbox: UDP and TCP port 53 inside its network namespace, answered
//! from the policy alone (SPEC §4, issue 5).
//!
//! For each packet:
//! 1. [`wire::parse_query`] reads it; a short packet or a response is dropped, anything malformed
//!    gets `FORMERR`, another opcode `NOTIMP`, a class other than IN `REFUSED`, an EDNS version
//!    other than 0 `BADVERS`.
//! 2. `localhost` and its subdomains answer `127.0.0.1` / `::1` (RFC 6761 §6.3).
//! 3. A reverse name (`y.x.1.127.in-addr.arpa`, or the `ip6.arpa` form of the IPv6 range) answers
//!    PTR with the name mapped to that address, if the policy still could allow it.
//! 4. Any other name is normalized and, if some allow rule of the policy in force *now* could match
//!    it ([`Policy::could_allow_host`], loaded from the cell per query, so `applyConfig` takes
//!    effect at once), A gets its mapped address from the [`NameTable`] with a TTL of
//!    [`ANSWER_TTL`] seconds, AAAA an empty answer (or the mapped IPv6 address when enabled with
//!    [`DnsResponder::with_ipv6_answers`]), every other type an empty answer. Otherwise: NXDOMAIN.
//! 5. Every answered question except `localhost` emits a `dns.query` event `{ name, qtype, access }`.
//!
//! TCP (RFC 7766): each message carries a 2-byte length; up to [`TCP_MAX_CONNECTIONS`] at once,
//! each closed after [`TCP_IDLE_TIMEOUT`] without a complete query.
//!
//! # Security
//!
//! The responder never forwards a query and never resolves a name: nothing a sandbox puts in a
//! name (`<secret>.attacker.example`) leaves the machine, and no answer depends on the outside
//! world. Negative answers carry no SOA, so resolvers do not cache them (RFC 2308 §5) and a name
//! allowed by `applyConfig` resolves on the next query. Every byte is untrusted: see [`wire`].

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{watch, Semaphore};

use super::names::NameTable;
use super::wire::{self, rcode, rtype, Answer, Query, RData, Reject};
use super::{field, ANSWER_TTL};
use crate::config::normalize_host;
use crate::error::{HiveError, Result};
use crate::events::{kind, EventBus};
use crate::policy::{Access, PolicyCell};

/// Most TCP connections served at once; more are closed on accept.
pub const TCP_MAX_CONNECTIONS: usize = 32;
/// A TCP connection is closed when a whole query has not arrived within this long.
pub const TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most time spent writing one TCP response to a client that does not read.
const TCP_WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Receive buffer: the largest UDP payload.
const UDP_BUFFER: usize = 65_535;

/// The transport a query arrived on; it decides how large a response may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

/// One sandbox's DNS responder. Build it with [`DnsResponder::new`], wrap it in an `Arc`, and hand
/// it the sockets created inside the sandbox's network namespace.
pub struct DnsResponder {
    sandbox: String,
    cell: Arc<PolicyCell>,
    events: Arc<EventBus>,
    names: Arc<NameTable>,
    ipv6_answers: bool,
    stop: watch::Sender<bool>,
    tcp_slots: Arc<Semaphore>,
}

impl std::fmt::Debug for DnsResponder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DnsResponder")
            .field("sandbox", &self.sandbox)
            .field("names", &self.names.len())
            .field("ipv6_answers", &self.ipv6_answers)
            .field("stopped", &*self.stop.borrow())
            .finish()
    }
}

/// What the responder decided for one question.
struct Outcome {
    rcode: u16,
    answers: Vec<Answer>,
    /// `Some(access)` when a `dns.query` event is due, with the name it shows.
    event: Option<(String, Access)>,
}

impl Outcome {
    fn answer(answers: Vec<Answer>, event: Option<(String, Access)>) -> Outcome {
        Outcome {
            rcode: rcode::NOERROR,
            answers,
            event,
        }
    }

    fn denied(rcode: u16, name: String) -> Outcome {
        Outcome {
            rcode,
            answers: Vec::new(),
            event: Some((name, Access::Denied)),
        }
    }
}

impl DnsResponder {
    /// A responder for `sandbox` answering from the policy in `cell`, emitting `dns.query` on
    /// `events` and mapping names in `names` (which the proxy's transparent listeners share).
    pub fn new(
        sandbox: String,
        cell: Arc<PolicyCell>,
        events: Arc<EventBus>,
        names: Arc<NameTable>,
    ) -> DnsResponder {
        DnsResponder {
            sandbox,
            cell,
            events,
            names,
            ipv6_answers: false,
            stop: watch::Sender::new(false),
            tcp_slots: Arc::new(Semaphore::new(TCP_MAX_CONNECTIONS)),
        }
    }

    /// Whether AAAA queries for an allowed name get the mapped `fd68:6976:65::/96` address
    /// (default `false`: an empty answer, so clients connect over IPv4). Turn it on only when the
    /// transparent listeners also capture IPv6.
    pub fn with_ipv6_answers(mut self, enabled: bool) -> DnsResponder {
        self.ipv6_answers = enabled;
        self
    }

    /// The name table this responder fills.
    pub fn names(&self) -> &Arc<NameTable> {
        &self.names
    }

    /// Serves queries on a bound UDP socket until [`DnsResponder::shutdown`]. Must be called
    /// within a tokio runtime; returns once the serving task is spawned.
    pub fn serve_udp(self: &Arc<Self>, socket: std::net::UdpSocket) -> Result<()> {
        socket
            .set_nonblocking(true)
            .map_err(|e| HiveError::io("dns: set UDP socket non-blocking", e))?;
        let runtime = runtime()?;
        let _guard = runtime.enter();
        let socket = tokio::net::UdpSocket::from_std(socket)
            .map_err(|e| HiveError::io("dns: register UDP socket", e))?;
        let this = self.clone();
        let mut stop = self.stop.subscribe();
        runtime.spawn(async move {
            tokio::select! {
                _ = stop.wait_for(|stopped| *stopped) => {}
                () = this.udp_loop(socket) => {}
            }
        });
        Ok(())
    }

    /// Serves queries on a bound, listening TCP socket until [`DnsResponder::shutdown`]. Must be
    /// called within a tokio runtime; returns once the accepting task is spawned.
    pub fn serve_tcp(self: &Arc<Self>, listener: std::net::TcpListener) -> Result<()> {
        listener
            .set_nonblocking(true)
            .map_err(|e| HiveError::io("dns: set TCP listener non-blocking", e))?;
        let runtime = runtime()?;
        let _guard = runtime.enter();
        let listener = tokio::net::TcpListener::from_std(listener)
            .map_err(|e| HiveError::io("dns: register TCP listener", e))?;
        let this = self.clone();
        let mut stop = self.stop.subscribe();
        runtime.spawn(async move {
            tokio::select! {
                _ = stop.wait_for(|stopped| *stopped) => {}
                () = this.tcp_accept_loop(listener) => {}
            }
        });
        Ok(())
    }

    /// Stops serving: the sockets close and open TCP connections end. Idempotent; serving a socket
    /// afterwards closes it at once.
    pub fn shutdown(&self) {
        self.stop.send_replace(true);
    }

    /// The response to one packet, or `None` when it is not answered (see the module steps).
    pub fn answer(&self, packet: &[u8], transport: Transport) -> Option<Vec<u8>> {
        let query = match wire::parse_query(packet) {
            Ok(query) => query,
            Err(Reject::Ignore) => return None,
            Err(Reject::Error(reply)) => return Some(wire::encode_error(&reply)),
        };
        let limit = match transport {
            Transport::Udp => query.udp_limit(),
            Transport::Tcp => wire::TCP_LIMIT,
        };
        let outcome = self.decide(&query);
        if let Some((name, access)) = outcome.event {
            self.emit(name, query.question.qtype, access);
        }
        Some(wire::encode_response(
            &query,
            outcome.rcode,
            &outcome.answers,
            limit,
        ))
    }

    fn decide(&self, query: &Query) -> Outcome {
        let question = &query.question;
        let shown = || question.name.to_presentation();
        if query.edns.is_some_and(|edns| edns.version != 0) {
            return Outcome {
                rcode: rcode::BADVERS,
                answers: Vec::new(),
                event: None,
            };
        }
        if question.qclass != wire::class::IN {
            return Outcome::denied(rcode::REFUSED, shown());
        }
        let Some(plain) = question.name.to_hostname() else {
            return Outcome::denied(rcode::NXDOMAIN, shown());
        };
        if let Some(ip) = question.name.reverse_address() {
            return self.reverse(question.qtype, ip, plain);
        }
        let Some(host) = normalize_host(&plain) else {
            return Outcome::denied(rcode::NXDOMAIN, plain);
        };
        if host == "localhost" || host.ends_with(".localhost") {
            let answers = match question.qtype {
                rtype::A | rtype::ANY => vec![a_record(Ipv4Addr::LOCALHOST)],
                rtype::AAAA => vec![aaaa_record(Ipv6Addr::LOCALHOST)],
                _ => Vec::new(),
            };
            return Outcome::answer(answers, None);
        }
        let compiled = self.cell.load();
        if !compiled.policy.could_allow_host(&host) {
            return Outcome::denied(rcode::NXDOMAIN, host);
        }
        let mapped = match question.qtype {
            rtype::A | rtype::ANY => self.names.address_for(&host).map(|ip| vec![a_record(ip)]),
            rtype::AAAA if self.ipv6_answers => self
                .names
                .address_v6_for(&host)
                .map(|ip| vec![aaaa_record(ip)]),
            _ => Some(Vec::new()),
        };
        match mapped {
            Some(answers) => Outcome::answer(answers, Some((host, Access::Allowed))),
            None => {
                tracing::warn!(
                    sandbox = %self.sandbox,
                    name = %host,
                    "dns: name table full ({} names); answering SERVFAIL",
                    self.names.len()
                );
                Outcome {
                    rcode: rcode::SERVFAIL,
                    answers: Vec::new(),
                    event: Some((host, Access::Denied)),
                }
            }
        }
    }

    /// A reverse lookup: PTR with the mapped name while the policy could still allow it.
    fn reverse(&self, qtype: u16, ip: IpAddr, reverse_name: String) -> Outcome {
        let target = if ip.is_loopback() && !super::names::is_mapped_range(ip) {
            (ip == IpAddr::V4(Ipv4Addr::LOCALHOST) || ip == IpAddr::V6(Ipv6Addr::LOCALHOST))
                .then(|| "localhost".to_owned())
        } else {
            self.names
                .name_for(ip)
                .filter(|name| self.cell.load().policy.could_allow_host(name))
        };
        let Some(target) = target else {
            return Outcome::denied(rcode::NXDOMAIN, reverse_name);
        };
        let event = (target != "localhost").then_some((reverse_name, Access::Allowed));
        if qtype != rtype::PTR && qtype != rtype::ANY {
            return Outcome::answer(Vec::new(), event);
        }
        match wire::Name::from_dotted(&target) {
            Some(name) => Outcome::answer(
                vec![Answer {
                    ttl: ANSWER_TTL,
                    data: RData::Ptr(name),
                }],
                event,
            ),
            None => Outcome {
                rcode: rcode::SERVFAIL,
                answers: Vec::new(),
                event,
            },
        }
    }

    fn emit(&self, name: String, qtype: u16, access: Access) {
        let mut fields = Map::new();
        fields.insert(field::NAME.to_owned(), Value::String(name));
        fields.insert(
            field::QTYPE.to_owned(),
            Value::String(wire::qtype_name(qtype)),
        );
        fields.insert(
            field::ACCESS.to_owned(),
            Value::String(access.as_str().to_owned()),
        );
        self.events.emit(kind::DNS_QUERY, fields);
    }

    async fn udp_loop(self: Arc<Self>, socket: tokio::net::UdpSocket) {
        let mut buf = vec![0u8; UDP_BUFFER];
        loop {
            let (len, peer) = match socket.recv_from(&mut buf).await {
                Ok(got) => got,
                Err(e) if transient(&e) => continue,
                Err(e) => {
                    tracing::warn!(sandbox = %self.sandbox, error = %e, "dns: UDP socket failed; stopping");
                    return;
                }
            };
            let Some(response) = buf.get(..len).and_then(|p| self.answer(p, Transport::Udp)) else {
                continue;
            };
            if let Err(e) = socket.send_to(&response, peer).await {
                tracing::debug!(sandbox = %self.sandbox, error = %e, "dns: UDP reply not sent");
            }
        }
    }

    async fn tcp_accept_loop(self: Arc<Self>, listener: tokio::net::TcpListener) {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) if transient(&e) => continue,
                Err(e) => {
                    // EMFILE and the like: back off instead of spinning.
                    tracing::warn!(sandbox = %self.sandbox, error = %e, "dns: TCP accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(permit) = self.tcp_slots.clone().try_acquire_owned() else {
                tracing::debug!(sandbox = %self.sandbox, "dns: too many TCP connections; closing one");
                continue;
            };
            let this = self.clone();
            let mut stop = self.stop.subscribe();
            tokio::spawn(async move {
                let _permit = permit;
                tokio::select! {
                    _ = stop.wait_for(|stopped| *stopped) => {}
                    () = this.tcp_connection(stream) => {}
                }
            });
        }
    }

    async fn tcp_connection(&self, mut stream: tokio::net::TcpStream) {
        let mut buf = Vec::new();
        loop {
            let read = tokio::time::timeout(TCP_IDLE_TIMEOUT, async {
                let len = usize::from(stream.read_u16().await?);
                buf.resize(len, 0);
                stream.read_exact(&mut buf).await?;
                std::io::Result::Ok(len)
            })
            .await;
            let Ok(Ok(len)) = read else {
                return;
            };
            if len == 0 {
                return;
            }
            let Some(response) = self.answer(&buf, Transport::Tcp) else {
                continue;
            };
            let Ok(prefix) = u16::try_from(response.len()) else {
                return;
            };
            let mut framed = Vec::with_capacity(response.len() + 2);
            framed.extend_from_slice(&prefix.to_be_bytes());
            framed.extend_from_slice(&response);
            let written = tokio::time::timeout(TCP_WRITE_TIMEOUT, stream.write_all(&framed)).await;
            if !matches!(written, Ok(Ok(()))) {
                return;
            }
        }
    }
}

fn a_record(ip: Ipv4Addr) -> Answer {
    Answer {
        ttl: ANSWER_TTL,
        data: RData::A(ip),
    }
}

fn aaaa_record(ip: Ipv6Addr) -> Answer {
    Answer {
        ttl: ANSWER_TTL,
        data: RData::Aaaa(ip),
    }
}

fn runtime() -> Result<tokio::runtime::Handle> {
    tokio::runtime::Handle::try_current()
        .map_err(|_| HiveError::Internal("dns: serve_* called outside a tokio runtime".into()))
}

/// Errors after which a socket is still usable: an ICMP error from an earlier reply, a peer that
/// reset before accept, an interrupted call.
fn transient(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionRefused | ConnectionReset | ConnectionAborted | Interrupted | WouldBlock
    )
}
