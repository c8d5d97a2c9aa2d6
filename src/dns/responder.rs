//! The DNS responder of one sandbox: UDP and TCP port 53 inside its network namespace, answered
//! from the policy alone (docs/network-access.md#dns-and-transparent-capture).
//!
//! For each packet:
//! 1. [`wire::parse_query`] reads it: a short packet or a response is dropped, anything malformed
//!    gets `FORMERR`, another opcode `NOTIMP`. An EDNS version other than 0 gets `BADVERS`, a class
//!    other than IN `REFUSED`, a name that is no hostname (a byte outside letters, digits, `-`,
//!    `_`) NXDOMAIN.
//! 2. A reverse name (`y.x.1.127.in-addr.arpa`, or the `ip6.arpa` form of the IPv6 range) answers
//!    PTR with the name mapped to that address, while the policy could still allow that name.
//! 3. `localhost` and its subdomains answer `127.0.0.1` / `::1` (RFC 6761 §6.3).
//! 4. Any other name is normalized and, if some allow rule of the policy in force *now* could
//!    match it through a host-name rule ([`crate::policy::Policy::could_resolve_name`]: an
//!    IP/CIDR rule never makes a name resolvable), the policy loaded from the cell for
//!    each query, so `applyConfig` takes effect at once), A gets its mapped address from the
//!    [`NameTable`] with a TTL of [`ANSWER_TTL`] seconds, AAAA an empty answer (or the mapped IPv6
//!    address, see [`DnsResponder::with_ipv6_answers`]), every other type an empty answer.
//!    Otherwise (a name the policy denies) A gets an address from the table's ring of denied names
//!    ([`NameTable::denied_address_for`]), which transparent listeners answer with `403` and the
//!    request's method and path; other types an empty answer. A full table gets `SERVFAIL` and a
//!    warning in the log.
//! 5. Every query answered by these steps emits one `dns.query` event `{ host, name, qtype, access }`
//!    (`name` = `host`),
//!    except those dropped or answered `FORMERR`, `NOTIMP` or `BADVERS`, `localhost` and the
//!    loopback reverse names.
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

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{watch, Semaphore};

use super::names::NameTable;
use super::wire::{self, rcode, rtype, Answer, Query, RData, Reject};
use super::{field, ANSWER_TTL};
use crate::attribution::{Attribution, Origin};
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
    tcp_idle_timeout: Duration,
    stop: watch::Sender<bool>,
    tcp_slots: Arc<Semaphore>,
    /// Names the asking process in `dns.query` (docs/audit-log.md#attribution), when set.
    attribution: Option<Arc<Attribution>>,
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
/// A query decided, whose event is still to be recorded.
struct Decided {
    query: wire::Query,
    outcome: Outcome,
    limit: usize,
}

/// What [`DnsResponder::decide_packet`] leaves to do.
enum Step {
    /// Send this (or nothing).
    Reply(Option<Vec<u8>>),
    /// Record the event, then answer.
    Record(Decided),
}

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
            tcp_idle_timeout: TCP_IDLE_TIMEOUT,
            stop: watch::Sender::new(false),
            tcp_slots: Arc::new(Semaphore::new(TCP_MAX_CONNECTIONS)),
            attribution: None,
        }
    }

    /// Adds `pid`, `command` and `execId` of the asking process to `dns.query` events.
    pub fn with_attribution(mut self, attribution: Arc<Attribution>) -> DnsResponder {
        self.attribution = Some(attribution);
        self
    }

    /// Whether AAAA queries for an allowed name get the mapped `fd68:6976:65::/96` address
    /// (default `false`: an empty answer, so clients connect over IPv4). Turn it on only when the
    /// transparent listeners also capture IPv6.
    pub fn with_ipv6_answers(mut self, enabled: bool) -> DnsResponder {
        self.ipv6_answers = enabled;
        self
    }

    /// How long a TCP connection may wait for its next whole query (default
    /// [`TCP_IDLE_TIMEOUT`]).
    pub fn with_tcp_idle_timeout(mut self, timeout: Duration) -> DnsResponder {
        self.tcp_idle_timeout = timeout;
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
        match self.decide_packet(packet, transport) {
            Step::Reply(reply) => reply,
            Step::Record(decided) => Some(self.record_and_encode(decided, None)),
        }
    }

    /// [`DnsResponder::answer`] for a query from `peer` (the client's address) to `local`: the
    /// event names the process that sent it, looked up (off the async workers) only when an
    /// event is due, and emitted before the answer goes out.
    pub async fn answer_from(
        &self,
        packet: &[u8],
        transport: Transport,
        from: Option<(SocketAddr, SocketAddr)>,
    ) -> Option<Vec<u8>> {
        let decided = match self.decide_packet(packet, transport) {
            Step::Reply(reply) => return reply,
            Step::Record(decided) => decided,
        };
        let origin = match (&self.attribution, from) {
            (Some(attribution), Some((peer, local))) => {
                let kind = match transport {
                    Transport::Udp => crate::attribution::Transport::Udp,
                    Transport::Tcp => crate::attribution::Transport::Tcp,
                };
                attribution.lookup_off_worker(kind, peer, local).await
            }
            _ => None,
        };
        Some(self.record_and_encode(decided, origin.as_ref()))
    }

    /// Parses and decides one query: the reply when no event is due (or the packet is not a
    /// query), else what is needed to record it and answer.
    fn decide_packet(&self, packet: &[u8], transport: Transport) -> Step {
        let query = match wire::parse_query(packet) {
            Ok(query) => query,
            Err(Reject::Ignore) => return Step::Reply(None),
            Err(Reject::Error(reply)) => return Step::Reply(Some(wire::encode_error(&reply))),
        };
        let limit = match transport {
            Transport::Udp => query.udp_limit(),
            Transport::Tcp => wire::TCP_LIMIT,
        };
        let outcome = self.decide(&query);
        if outcome.event.is_none() {
            return Step::Reply(Some(wire::encode_response(
                &query,
                outcome.rcode,
                &outcome.answers,
                limit,
            )));
        }
        Step::Record(Decided {
            query,
            outcome,
            limit,
        })
    }

    /// Emits the decided query's `dns.query` event, then encodes its answer.
    fn record_and_encode(&self, decided: Decided, origin: Option<&Origin>) -> Vec<u8> {
        let Decided {
            query,
            outcome,
            limit,
        } = decided;
        if let Some((name, access)) = outcome.event {
            self.emit(name, query.question.qtype, access, origin);
        }
        wire::encode_response(&query, outcome.rcode, &outcome.answers, limit)
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
        if !compiled.policy.could_resolve_name(&host) {
            // Denied: a local address that leads to the proxy's `403` (HTTP clients read why);
            // nothing is looked up anywhere.
            let answers = match question.qtype {
                rtype::A | rtype::ANY => self
                    .names
                    .denied_address_for(&host)
                    .map_or_else(Vec::new, |ip| vec![a_record(ip)]),
                _ => Vec::new(),
            };
            return Outcome {
                rcode: rcode::NOERROR,
                answers,
                event: Some((host, Access::Denied)),
            };
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
                .filter(|name| self.cell.load().policy.could_resolve_name(name))
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

    fn emit(&self, name: String, qtype: u16, access: Access, origin: Option<&Origin>) {
        let mut fields = Map::new();
        fields.insert(field::HOST.to_owned(), Value::String(name.clone()));
        fields.insert(field::NAME.to_owned(), Value::String(name));
        fields.insert(
            field::QTYPE.to_owned(),
            Value::String(wire::qtype_name(qtype)),
        );
        fields.insert(
            field::ACCESS.to_owned(),
            Value::String(access.as_str().to_owned()),
        );
        if let Some(origin) = origin {
            origin.insert_fields(&mut fields);
        }
        self.events.emit(kind::DNS_QUERY, fields);
    }

    async fn udp_loop(self: Arc<Self>, socket: tokio::net::UdpSocket) {
        let mut buf = vec![0u8; UDP_BUFFER];
        let local = socket.local_addr().ok();
        loop {
            let (len, peer) = match socket.recv_from(&mut buf).await {
                Ok(got) => got,
                Err(e) if transient(&e) => continue,
                Err(e) => {
                    tracing::warn!(sandbox = %self.sandbox, error = %e, "dns: UDP socket failed; stopping");
                    return;
                }
            };
            let from = local.map(|local| (peer, local));
            let Some(packet) = buf.get(..len) else {
                continue;
            };
            let Some(response) = self.answer_from(packet, Transport::Udp, from).await else {
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
        let from = stream.peer_addr().ok().zip(stream.local_addr().ok());
        loop {
            let read = tokio::time::timeout(self.tcp_idle_timeout, async {
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
            let Some(response) = self.answer_from(&buf, Transport::Tcp, from).await else {
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

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;
    use crate::config::{Config, EgressRule, HostPattern, RuleAccess};
    use crate::dns::wire::{encode_query, parse_response, Name, ParsedResponse};
    use crate::events::{Event, Since, Subscription};
    use crate::policy::Compiled;

    const WAIT: Duration = Duration::from_secs(2);

    /// A config allowing each host (`*`, `*.apex` or an exact name) on any port.
    fn allowing(hosts: &[&str]) -> Config {
        let egress = hosts
            .iter()
            .map(|host| EgressRule {
                access: RuleAccess::Allow,
                host: match *host {
                    "*" => HostPattern::Any,
                    h if h.parse::<ipnet::IpNet>().is_ok() => {
                        HostPattern::Net(h.parse().expect("checked"))
                    }
                    h => match h.strip_prefix("*.") {
                        Some(apex) => HostPattern::Suffix(apex.to_owned()),
                        None => HostPattern::Exact(h.to_owned()),
                    },
                },
                ports: None,
                methods: None,
                paths: None,
                override_: None,
                mode: None,
                tls: Default::default(),
            })
            .collect();
        Config {
            egress,
            ..Config::default()
        }
    }

    struct Harness {
        responder: Arc<DnsResponder>,
        cell: Arc<PolicyCell>,
        names: Arc<NameTable>,
        events: Subscription,
        udp: SocketAddr,
        tcp: SocketAddr,
        _dir: tempfile::TempDir,
    }

    impl Harness {
        async fn start(hosts: &[&str]) -> Harness {
            Harness::with(hosts, NameTable::new(), |r| r).await
        }

        async fn with(
            hosts: &[&str],
            names: NameTable,
            build: impl FnOnce(DnsResponder) -> DnsResponder,
        ) -> Harness {
            let dir = tempfile::tempdir().expect("tempdir");
            let events = EventBus::open("dns-test", dir.path()).expect("event bus");
            let subscription = events.subscribe(Since::Now, 1000).expect("subscribe");
            let cell = Arc::new(PolicyCell::from_pointee(Compiled::new(allowing(hosts))));
            let names = Arc::new(names);
            let responder = Arc::new(build(DnsResponder::new(
                "dns-test".into(),
                cell.clone(),
                events,
                names.clone(),
            )));
            let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind udp");
            let tcp = std::net::TcpListener::bind("127.0.0.1:0").expect("bind tcp");
            let (udp_addr, tcp_addr) = (
                udp.local_addr().expect("udp addr"),
                tcp.local_addr().expect("tcp addr"),
            );
            responder.serve_udp(udp).expect("serve udp");
            responder.serve_tcp(tcp).expect("serve tcp");
            Harness {
                responder,
                cell,
                names,
                events: subscription,
                udp: udp_addr,
                tcp: tcp_addr,
                _dir: dir,
            }
        }

        fn apply(&self, hosts: &[&str]) {
            self.cell.store(Arc::new(Compiled::new(allowing(hosts))));
        }

        async fn udp(&self, name: &str, qtype: u16) -> ParsedResponse {
            let raw = udp_exchange(self.udp, &query(name, qtype))
                .await
                .expect("a UDP answer");
            parse_response(&raw).expect("a well-formed response")
        }

        async fn tcp(&self, name: &str, qtype: u16) -> ParsedResponse {
            let raw = tcp_exchange(self.tcp, &query(name, qtype)).await;
            parse_response(&raw.expect("a TCP answer")).expect("a well-formed response")
        }

        /// The events emitted so far (waiting briefly for stragglers).
        async fn events(&self) -> Vec<Event> {
            let mut out = Vec::new();
            while let Ok(Some(event)) =
                tokio::time::timeout(Duration::from_millis(150), self.events.next()).await
            {
                out.push(event);
            }
            out
        }
    }

    fn query(name: &str, qtype: u16) -> Vec<u8> {
        encode_query(
            0x4242,
            &Name::from_dotted(name).expect("test name"),
            qtype,
            None,
        )
    }

    async fn udp_exchange(server: SocketAddr, bytes: &[u8]) -> Option<Vec<u8>> {
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.ok()?;
        socket.send_to(bytes, server).await.ok()?;
        let mut buf = vec![0; 65_535];
        let (len, _) = tokio::time::timeout(Duration::from_millis(500), socket.recv_from(&mut buf))
            .await
            .ok()?
            .ok()?;
        buf.truncate(len);
        Some(buf)
    }

    async fn tcp_exchange(server: SocketAddr, bytes: &[u8]) -> Option<Vec<u8>> {
        let mut stream = tokio::net::TcpStream::connect(server).await.ok()?;
        let len = u16::try_from(bytes.len()).ok()?;
        stream.write_all(&len.to_be_bytes()).await.ok()?;
        stream.write_all(bytes).await.ok()?;
        read_framed(&mut stream).await
    }

    async fn read_framed(stream: &mut tokio::net::TcpStream) -> Option<Vec<u8>> {
        tokio::time::timeout(WAIT, async {
            let len = stream.read_u16().await.ok()?;
            let mut buf = vec![0; usize::from(len)];
            stream.read_exact(&mut buf).await.ok()?;
            Some(buf)
        })
        .await
        .ok()?
    }

    fn only_a(response: &ParsedResponse) -> Ipv4Addr {
        match response.answers.as_slice() {
            [(rtype::A, ttl, data)] => {
                assert_eq!(*ttl, ANSWER_TTL);
                let octets: [u8; 4] = data.as_slice().try_into().expect("4 bytes");
                Ipv4Addr::from(octets)
            }
            other => panic!("expected one A record, got {other:?}"),
        }
    }

    /// The address of a denied name: NOERROR and one A record in the ring's range.
    fn denied_a(response: &ParsedResponse) -> Ipv4Addr {
        assert_eq!(response.rcode, rcode::NOERROR);
        let ip = only_a(response);
        assert!(super::super::names::is_denied_range(ip.into()), "{ip}");
        ip
    }

    fn dns_event(event: &Event) -> (&str, &str, &str) {
        assert_eq!(event.kind, kind::DNS_QUERY);
        let get = |key: &str| event.fields.get(key).and_then(Value::as_str).unwrap_or("");
        assert_eq!(
            get(field::HOST),
            get(field::NAME),
            "host and its alias agree"
        );
        (get(field::NAME), get(field::QTYPE), get(field::ACCESS))
    }

    // Allowed names.

    #[tokio::test]
    async fn allowed_name_gets_a_stable_sandbox_local_address() {
        let h = Harness::start(&["api.github.com"]).await;
        let first = h.udp("api.github.com", rtype::A).await;
        assert_eq!(first.rcode, rcode::NOERROR);
        let ip = only_a(&first);
        assert_eq!(ip.octets()[..2], [127, 1]);
        assert_eq!(only_a(&h.udp("api.github.com", rtype::A).await), ip);
        assert_eq!(only_a(&h.tcp("api.github.com", rtype::A).await), ip);
        assert_eq!(
            h.names.name_for(IpAddr::V4(ip)).as_deref(),
            Some("api.github.com")
        );
        let events = h.events().await;
        assert_eq!(events.len(), 3);
        assert!(events
            .iter()
            .all(|e| dns_event(e) == ("api.github.com", "A", "allowed")));
    }

    #[tokio::test]
    async fn names_are_matched_case_insensitively_and_echoed_as_sent() {
        let h = Harness::start(&["api.github.com"]).await;
        let lower = only_a(&h.udp("api.github.com", rtype::A).await);
        let mixed = h.udp("ApI.GitHub.COM.", rtype::A).await;
        assert_eq!(only_a(&mixed), lower);
        let echoed = mixed.question.expect("question").name.to_presentation();
        assert_eq!(echoed, "ApI.GitHub.COM");
    }

    #[tokio::test]
    async fn other_types_of_an_allowed_name_get_empty_answers() {
        let h = Harness::start(&["api.github.com"]).await;
        for qtype in [rtype::AAAA, rtype::MX, rtype::TXT, rtype::HTTPS] {
            let r = h.udp("api.github.com", qtype).await;
            assert_eq!((r.rcode, r.answers.len()), (rcode::NOERROR, 0), "{qtype}");
        }
        let qtypes: Vec<String> = h
            .events()
            .await
            .iter()
            .map(|e| dns_event(e).1.to_owned())
            .collect();
        assert_eq!(qtypes, ["AAAA", "MX", "TXT", "HTTPS"]);
    }

    #[tokio::test]
    async fn aaaa_gets_the_mapped_ipv6_address_when_enabled() {
        let h = Harness::with(&["api.github.com"], NameTable::new(), |r| {
            r.with_ipv6_answers(true)
        })
        .await;
        let v4 = only_a(&h.udp("api.github.com", rtype::A).await);
        let r = h.udp("api.github.com", rtype::AAAA).await;
        let [(rtype::AAAA, _, data)] = r.answers.as_slice() else {
            panic!("expected one AAAA, got {:?}", r.answers);
        };
        let octets: [u8; 16] = data.as_slice().try_into().expect("16 bytes");
        let v6 = Ipv6Addr::from(octets);
        assert_eq!(v6.segments()[..3], [0xfd68, 0x6976, 0x65]);
        assert_eq!(
            h.names.name_for(IpAddr::V6(v6)),
            h.names.name_for(v4.into())
        );
    }

    #[tokio::test]
    async fn wildcard_rules_allow_the_apex_and_subdomains_only() {
        let h = Harness::start(&["*.example.com"]).await;
        let cases: &[(&str, bool)] = &[
            ("example.com", true),
            ("a.example.com", true),
            ("a.b.c.example.com", true),
            ("notexample.com", false),
            ("example.com.evil.net", false),
        ];
        for (name, allowed) in cases {
            let r = h.udp(name, rtype::A).await;
            assert_eq!(r.rcode, rcode::NOERROR, "{name}");
            let denied = super::super::names::is_denied_range(only_a(&r).into());
            assert_eq!(denied, !allowed, "{name}");
        }
    }

    #[tokio::test]
    async fn ip_literal_names_map_like_any_other_name() {
        // A literal the policy allows gets a mapped address, so the proxy still learns the host
        // from the address and never trusts the one dialled.
        let h = Harness::start(&["api.github.com", "192.0.2.0/24"]).await;
        let ip = only_a(&h.udp("192.0.2.7", rtype::A).await);
        assert_eq!(h.names.name_for(ip.into()).as_deref(), Some("192.0.2.7"));
    }

    #[tokio::test]
    async fn a_cidr_rule_never_makes_a_name_resolvable() {
        // Resolving it would make the proxy look up attacker-chosen names: exfiltration.
        let h = Harness::start(&["10.0.0.0/8"]).await;
        denied_a(&h.udp("c2VjcmV0.attacker.example", rtype::A).await);
        assert!(h.names.is_empty());
        let literal = only_a(&h.udp("10.1.2.3", rtype::A).await);
        assert_eq!(
            h.names.name_for(literal.into()).as_deref(),
            Some("10.1.2.3")
        );
    }

    #[tokio::test]
    async fn localhost_is_loopback_without_events() {
        let h = Harness::start(&[]).await;
        let a = h.udp("localhost", rtype::A).await;
        assert_eq!(only_a(&a), Ipv4Addr::LOCALHOST);
        let aaaa = h.udp("LOCALHOST.", rtype::AAAA).await;
        assert_eq!(
            aaaa.answers,
            vec![(
                rtype::AAAA,
                ANSWER_TTL,
                Ipv6Addr::LOCALHOST.octets().to_vec()
            )]
        );
        assert!(h.events().await.is_empty());
    }

    #[tokio::test]
    async fn reverse_lookups_name_mapped_addresses_only() {
        let h = Harness::start(&["api.github.com"]).await;
        let [_, _, c, d] = only_a(&h.udp("api.github.com", rtype::A).await).octets();
        let ptr = h
            .udp(&format!("{d}.{c}.1.127.in-addr.arpa"), rtype::PTR)
            .await;
        let expected = Name::from_dotted("api.github.com").expect("name");
        assert_eq!(
            ptr.answers,
            vec![(rtype::PTR, ANSWER_TTL, expected.wire().to_vec())]
        );
        let unknown = h.udp("9.9.1.127.in-addr.arpa", rtype::PTR).await;
        assert_eq!(unknown.rcode, rcode::NXDOMAIN);
        let outside = h.udp("1.2.0.192.in-addr.arpa", rtype::PTR).await;
        assert_eq!(outside.rcode, rcode::NXDOMAIN);
        // Once the policy no longer allows the name, its reverse name is gone too.
        h.apply(&[]);
        let gone = h
            .udp(&format!("{d}.{c}.1.127.in-addr.arpa"), rtype::PTR)
            .await;
        assert_eq!(gone.rcode, rcode::NXDOMAIN);
    }

    // Denied names.

    #[tokio::test]
    async fn denied_name_gets_a_refused_address_and_one_denied_event() {
        let h = Harness::start(&["api.github.com"]).await;
        let ip = denied_a(&h.udp("evil.example", rtype::A).await);
        // AAAA and other types of a denied name: empty answers.
        let aaaa = h.udp("evil.example", rtype::AAAA).await;
        assert_eq!((aaaa.rcode, aaaa.answers.len()), (rcode::NOERROR, 0));
        let events = h.events().await;
        assert_eq!(events.len(), 2);
        assert_eq!(dns_event(&events[0]), ("evil.example", "A", "denied"));
        assert!(h.names.is_empty());
        // The proxy learns the name back, marked refused.
        assert_eq!(
            h.names.target_for(ip.into()),
            Some(("evil.example".to_string(), true))
        );
    }

    #[tokio::test]
    async fn exfiltration_through_names_gets_only_a_refused_address_over_udp_and_tcp() {
        // The answer comes from the responder alone: nothing is forwarded or looked up.
        let h = Harness::start(&["api.github.com"]).await;
        let leak = "c2VjcmV0LXRva2VuLTEyMzQ.attacker.example";
        let ip = denied_a(&h.udp(leak, rtype::A).await);
        assert_eq!(denied_a(&h.tcp(leak, rtype::A).await), ip);
        let txt = h.tcp(leak, rtype::TXT).await;
        assert_eq!((txt.rcode, txt.answers.len()), (rcode::NOERROR, 0));
        // A name under an allowed host's parent is no way through either.
        let sibling = "c2VjcmV0.github.com";
        denied_a(&h.udp(sibling, rtype::A).await);
        let events = h.events().await;
        assert_eq!(events.len(), 4);
        assert!(events.iter().all(|e| dns_event(e).2 == "denied"));
        assert!(h.names.is_empty(), "a denied name must not be mapped");
    }

    #[tokio::test]
    async fn names_that_are_no_hostnames_are_denied_and_shown_escaped() {
        let h = Harness::start(&["*"]).await;
        // A label holding a dot must not read as `api.github.com`.
        let mut bytes = query("x", rtype::A);
        let name = b"\x0aapi.github\x03com\x00";
        bytes.splice(12..15, name.iter().copied());
        let r =
            parse_response(&udp_exchange(h.udp, &bytes).await.expect("answer")).expect("response");
        assert_eq!(r.rcode, rcode::NXDOMAIN);
        let events = h.events().await;
        assert_eq!(events.len(), 1);
        assert_eq!(dns_event(&events[0]), ("api\\046github.com", "A", "denied"));
    }

    #[tokio::test]
    async fn other_classes_are_refused() {
        let h = Harness::start(&["api.github.com"]).await;
        let mut bytes = query("api.github.com", rtype::TXT);
        let len = bytes.len();
        bytes[len - 1] = 3; // CH
        let r =
            parse_response(&udp_exchange(h.udp, &bytes).await.expect("answer")).expect("response");
        assert_eq!(r.rcode, rcode::REFUSED);
    }

    // Policy changes.

    #[tokio::test]
    async fn apply_config_flips_answers_at_once() {
        let h = Harness::start(&["api.github.com"]).await;
        denied_a(&h.udp("pypi.org", rtype::A).await);
        h.apply(&["api.github.com", "pypi.org"]);
        let ip = only_a(&h.udp("pypi.org", rtype::A).await);
        assert_eq!(ip.octets()[..2], [127, 1]);
        h.apply(&["api.github.com"]);
        denied_a(&h.tcp("pypi.org", rtype::A).await);
        // The mapping itself outlives the rule: connections made meanwhile keep their name.
        assert_eq!(h.names.name_for(ip.into()).as_deref(), Some("pypi.org"));
        h.apply(&["pypi.org"]);
        assert_eq!(only_a(&h.udp("pypi.org", rtype::A).await), ip);
    }

    #[tokio::test]
    async fn a_full_table_answers_servfail_and_keeps_old_names() {
        let h = Harness::with(&["*"], NameTable::with_capacity(1), |r| r).await;
        let ip = only_a(&h.udp("one.example", rtype::A).await);
        assert_eq!(h.udp("two.example", rtype::A).await.rcode, rcode::SERVFAIL);
        assert_eq!(only_a(&h.udp("one.example", rtype::A).await), ip);
    }

    // Hostile packets.

    #[tokio::test]
    async fn malformed_packets_never_panic_and_service_continues() {
        let h = Harness::start(&["api.github.com"]).await;
        let seed = encode_query(
            7,
            &Name::from_dotted("api.github.com").expect("name"),
            rtype::A,
            Some(1232),
        );
        let mut state: u64 = 0xD1B5_4A32_D192_ED03;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut packets = Vec::new();
        for round in 0..300 {
            let packet: Vec<u8> = if round % 3 == 0 {
                (0..next() % 64).map(|_| next() as u8).collect()
            } else {
                let mut b = seed.clone();
                for _ in 0..(next() % 3 + 1) {
                    let i = (next() as usize) % b.len();
                    b[i] = next() as u8;
                }
                b.truncate((next() as usize) % (b.len() + 1));
                b
            };
            packets.push(packet);
        }
        packets.extend((0..seed.len()).map(|cut| seed[..cut].to_vec()));
        // Directly: every packet gets an answer or is dropped, none panics.
        for packet in &packets {
            if let Some(response) = h.responder.answer(packet, Transport::Udp) {
                assert!(response.len() >= wire::HEADER_LEN);
            }
        }
        // Over the sockets, the responder keeps serving.
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("bind");
        for packet in &packets {
            socket.send_to(packet, h.udp).await.expect("send");
        }
        for packet in packets.iter().take(50) {
            // Write and hang up: a dropped packet gets no answer to wait for.
            let mut stream = tokio::net::TcpStream::connect(h.tcp)
                .await
                .expect("connect");
            let len = packet.len() as u16;
            stream.write_all(&len.to_be_bytes()).await.expect("write");
            stream.write_all(packet).await.expect("write");
        }
        assert_eq!(
            h.udp("api.github.com", rtype::A).await.rcode,
            rcode::NOERROR
        );
        assert_eq!(
            h.tcp("api.github.com", rtype::A).await.rcode,
            rcode::NOERROR
        );
    }

    #[tokio::test]
    async fn a_compression_pointer_loop_is_rejected() {
        let h = Harness::start(&["*"]).await;
        // Header, then a question name that is a pointer to itself.
        let mut bytes = vec![0xAB, 0xCD, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        bytes.extend_from_slice(&[0xC0, 12, 0, 1, 0, 1]);
        let r =
            parse_response(&udp_exchange(h.udp, &bytes).await.expect("answer")).expect("response");
        assert_eq!((r.id, r.rcode), (0xABCD, rcode::FORMERR));
        let r =
            parse_response(&tcp_exchange(h.tcp, &bytes).await.expect("answer")).expect("response");
        assert_eq!(r.rcode, rcode::FORMERR);
        assert!(h.events().await.is_empty());
    }

    #[tokio::test]
    async fn responses_are_never_answered() {
        let h = Harness::start(&["*"]).await;
        let mut bytes = query("api.github.com", rtype::A);
        bytes[2] |= 0x80; // QR
        assert_eq!(udp_exchange(h.udp, &bytes).await, None);
    }

    #[tokio::test]
    async fn edns_is_echoed_and_unknown_versions_get_badvers() {
        let h = Harness::start(&["api.github.com"]).await;
        let name = Name::from_dotted("api.github.com").expect("name");
        let bytes = encode_query(1, &name, rtype::A, Some(4096));
        let r =
            parse_response(&udp_exchange(h.udp, &bytes).await.expect("answer")).expect("response");
        assert_eq!(r.rcode, rcode::NOERROR);
        assert_eq!(r.edns.map(|e| e.udp_size), Some(wire::UDP_EDNS_LIMIT));
        let mut v1 = bytes.clone();
        let len = v1.len();
        v1[len - 5] = 1; // the OPT TTL's version byte
        let r = parse_response(&udp_exchange(h.udp, &v1).await.expect("answer")).expect("response");
        assert_eq!(r.rcode, rcode::BADVERS);
    }

    // TCP limits.

    #[tokio::test]
    async fn tcp_carries_several_queries_per_connection() {
        let h = Harness::start(&["api.github.com"]).await;
        let mut stream = tokio::net::TcpStream::connect(h.tcp)
            .await
            .expect("connect");
        let q = query("api.github.com", rtype::A);
        let mut both = Vec::new();
        for _ in 0..2 {
            both.extend_from_slice(&(q.len() as u16).to_be_bytes());
            both.extend_from_slice(&q);
        }
        stream.write_all(&both).await.expect("write");
        for _ in 0..2 {
            let raw = read_framed(&mut stream).await.expect("answer");
            assert_eq!(parse_response(&raw).map(|r| r.rcode), Some(rcode::NOERROR));
        }
    }

    #[tokio::test]
    async fn idle_tcp_connections_are_closed() {
        let h = Harness::with(&[], NameTable::new(), |r| {
            r.with_tcp_idle_timeout(Duration::from_millis(200))
        })
        .await;
        let mut stream = tokio::net::TcpStream::connect(h.tcp)
            .await
            .expect("connect");
        stream.write_all(&[0, 40, 1, 2]).await.expect("write"); // half a query, then nothing
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(WAIT, stream.read(&mut buf)).await;
        assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "{read:?}");
    }

    #[tokio::test]
    async fn tcp_connections_beyond_the_limit_are_closed() {
        let h = Harness::start(&["api.github.com"]).await;
        let mut held = Vec::new();
        for _ in 0..TCP_MAX_CONNECTIONS {
            held.push(
                tokio::net::TcpStream::connect(h.tcp)
                    .await
                    .expect("connect"),
            );
        }
        // Make sure all of them were accepted before the extra one.
        let mut first = held.remove(0);
        let q = query("api.github.com", rtype::A);
        first
            .write_all(&(q.len() as u16).to_be_bytes())
            .await
            .expect("write");
        first.write_all(&q).await.expect("write");
        assert!(read_framed(&mut first).await.is_some());
        held.insert(0, first);
        let mut extra = tokio::net::TcpStream::connect(h.tcp)
            .await
            .expect("connect");
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(WAIT, extra.read(&mut buf)).await;
        assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "{read:?}");
        // Closing one frees its slot.
        drop(held.pop());
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(tcp_exchange(h.tcp, &q).await.is_some());
    }

    #[tokio::test]
    async fn shutdown_stops_both_transports() {
        let h = Harness::start(&["api.github.com"]).await;
        assert_eq!(
            h.udp("api.github.com", rtype::A).await.rcode,
            rcode::NOERROR
        );
        h.responder.shutdown();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let q = query("api.github.com", rtype::A);
        assert_eq!(udp_exchange(h.udp, &q).await, None);
        assert_eq!(tcp_exchange(h.tcp, &q).await, None);
    }

    #[tokio::test]
    async fn serving_outside_a_runtime_is_an_error() {
        let h = Harness::start(&[]).await;
        let responder = h.responder.clone();
        let result = std::thread::spawn(move || {
            let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
            responder.serve_udp(socket).map_err(|e| e.code())
        })
        .join()
        .expect("thread");
        assert_eq!(result, Err(crate::error::ErrorCode::Internal));
    }

    // Measurement.

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "measurement: cargo test --lib dns::responder::tests::udp_latency -- --ignored --nocapture"]
    async fn udp_latency() {
        let h = Harness::start(&["api.github.com"]).await;
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("bind");
        socket.connect(h.udp).await.expect("connect");
        let mut buf = vec![0; 2048];
        let mut samples = Vec::new();
        for i in 0..5000u32 {
            let name = if i % 2 == 0 {
                "api.github.com"
            } else {
                "evil.example"
            };
            let q = query(name, rtype::A);
            let started = std::time::Instant::now();
            socket.send(&q).await.expect("send");
            socket.recv(&mut buf).await.expect("recv");
            samples.push(started.elapsed());
        }
        samples.sort();
        let at = |p: usize| samples[samples.len() * p / 100];
        eprintln!(
            "dns over UDP, {} queries: p50 {:?}, p99 {:?}, max {:?}",
            samples.len(),
            at(50),
            at(99),
            samples[samples.len() - 1]
        );
    }

    // A real client, when the machine has one.

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dig_resolves_allowed_names_and_refused_addresses_for_others() {
        if std::process::Command::new("dig")
            .arg("-v")
            .output()
            .is_err()
        {
            eprintln!("skipped: dig is not installed (apt-get install bind9-dnsutils)");
            return;
        }
        let h = Harness::start(&["api.github.com"]).await;
        let dig = |args: Vec<String>| {
            tokio::task::spawn_blocking(move || {
                let out = std::process::Command::new("dig")
                    .args(&args)
                    .output()
                    .expect("run dig");
                String::from_utf8_lossy(&out.stdout).into_owned()
            })
        };
        let server = |addr: SocketAddr| {
            vec![
                format!("@{}", addr.ip()),
                "-p".into(),
                addr.port().to_string(),
                "+time=2".into(),
                "+tries=1".into(),
            ]
        };
        let mut args = server(h.udp);
        args.extend(["api.github.com".into(), "A".into(), "+short".into()]);
        let short = dig(args).await.expect("dig");
        let ip: Ipv4Addr = short.trim().parse().expect("an address from dig");
        assert_eq!(ip.octets()[..2], [127, 1]);

        let mut args = server(h.tcp);
        args.extend([
            "+tcp".into(),
            "api.github.com".into(),
            "A".into(),
            "+short".into(),
        ]);
        assert_eq!(dig(args).await.expect("dig").trim(), ip.to_string());

        for transport in ["+notcp", "+tcp"] {
            let addr = if transport == "+tcp" { h.tcp } else { h.udp };
            let mut args = server(addr);
            args.extend([
                transport.into(),
                "secret.attacker.example".into(),
                "+short".into(),
            ]);
            let short = dig(args).await.expect("dig");
            let ip: Ipv4Addr = short.trim().parse().expect("an address from dig");
            assert_eq!(ip.octets()[..2], [127, 2], "{transport}: {short}");
        }

        let mut args = server(h.udp);
        args.extend(["-x".into(), ip.to_string(), "+short".into()]);
        assert_eq!(dig(args).await.expect("dig").trim(), "api.github.com.");
    }
}
