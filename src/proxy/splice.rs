//! The byte relay of a passed-through connection (docs/network-access.md#tls-passthrough): the
//! client's TCP socket to the upstream's and back, bulk data moved by the kernel with `splice(2)`
//! instead of through a buffer of ours.
//!
//! 1. Unwrap the client's stream down to its socket: the accepted socket comes wrapped in the idle
//!    timer ([`Idle`]), for a `CONNECT` in hyper's upgrade (with bytes hyper read past the request
//!    head), and in the prefixes sniffed so far ([`Prefixed`]). Anything else (an h2 `CONNECT`
//!    stream) is relayed by the copy loop.
//! 2. Write the bytes already read from the client (the ClientHello) to the upstream.
//! 3. Per direction: read into a small buffer and write it out. A read that leaves room in the
//!    buffer drained the socket, so a small message costs a read and a write, no more (a splice
//!    would take two calls and a third finding nothing). A read that fills it starts a burst,
//!    which goes socket → pipe → socket with `splice(2)` (the pipe opened the first time) until
//!    the socket has nothing more: bulk bytes never pass through our memory (without a pipe, out
//!    of descriptors, they are copied). Both sockets stay non-blocking and registered with tokio,
//!    which says when to try again.
//! 4. End of stream on one side shuts down writing on the other (a half close is passed on); the
//!    other direction goes on. The relay ends when both directions ended, on the first error, or
//!    when no byte moved either way for the idle timeout (the timer the unwrapped [`Idle`] kept).
//!    The connection's task can also be dropped at any await (the listener killed): the sockets
//!    and pipes close with it.
//!
//! Returns the bytes moved each way, for `egress.response`.

use std::any::Any;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use rustix::pipe::{PipeFlags, SpliceFlags};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, Interest};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::connect::Prefixed;
use super::idle::Idle;

/// Copy-loop buffer per direction (streams that are not sockets).
const RELAY_BUFFER: usize = 64 * 1024;
/// Bytes read into a buffer of ours before the rest of a burst goes through a pipe: a read that
/// fills it (a full TLS record carries 16 KiB) means bulk data is flowing.
const COPY_BUFFER: usize = 16 * 1024;
/// Most bytes asked of one `splice(2)` from a socket (the pipe's capacity bounds it further).
const SPLICE_CHUNK: usize = 1 << 20;

/// Bytes a relay moved.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Moved {
    /// From the client to the upstream, replayed bytes included.
    pub out: u64,
    /// From the upstream to the client.
    pub inn: u64,
}

/// A passed-through stream as the sniffing left it: the tunnel's first read, then the rest of
/// the ClientHello, replayed in front of the client's stream.
type Sniffed<I> = Prefixed<Prefixed<I>>;
/// The accepted socket as the listener hands it on.
type Accepted = Idle<TcpStream>;

/// Relays `client` and `upstream` both ways until both ends closed (see the module doc); `idle`
/// is the connection's idle timeout.
pub async fn relay<I>(client: I, upstream: TcpStream, idle: Duration) -> Moved
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut slot = Some(client);
    match unwrap_socket(&mut slot) {
        Some(Unwrapped::Socket { replay, socket }) => {
            splice_sockets(socket, upstream, replay, idle).await
        }
        Some(Unwrapped::Upgraded(stream)) => copy(stream, upstream).await,
        None => match slot {
            Some(client) => copy(client, upstream).await,
            None => Moved::default(),
        },
    }
}

/// What [`unwrap_socket`] found under a client stream.
enum Unwrapped {
    /// The socket, and the bytes read from it that are still to be sent on.
    Socket { replay: Bytes, socket: TcpStream },
    /// A `CONNECT` stream that is not an HTTP/1 upgrade of an accepted socket, rewrapped.
    Upgraded(Sniffed<TokioIo<Upgraded>>),
}

/// Takes the client's stream out of `slot` when it is one of the types a passed-through
/// connection arrives as; leaves it there otherwise.
fn unwrap_socket<I: 'static>(slot: &mut Option<I>) -> Option<Unwrapped> {
    if let Some(sniffed) = take::<Sniffed<Accepted>, I>(slot) {
        let (first, rest) = sniffed.into_parts();
        let (hello, accepted) = rest.into_parts();
        return Some(Unwrapped::Socket {
            replay: concat([first, hello]),
            socket: accepted.into_inner(),
        });
    }
    let sniffed = take::<Sniffed<TokioIo<Upgraded>>, I>(slot)?;
    let (first, rest) = sniffed.into_parts();
    let (hello, upgraded) = rest.into_parts();
    // The listener serves with hyper-util's auto builder, which wraps the socket in a type of its
    // own: its `downcast` unwraps that too.
    let upgraded = match hyper_util::server::conn::auto::upgrade::downcast::<TokioIo<Accepted>>(
        upgraded.into_inner(),
    ) {
        Ok(parts) => {
            return Some(Unwrapped::Socket {
                replay: concat([first, hello, parts.read_buf]),
                socket: parts.io.into_inner().into_inner(),
            })
        }
        Err(upgraded) => upgraded,
    };
    // Handed on by the lean path (`super::lean`), with the bytes it had read and hyper had not.
    match hyper_util::server::conn::auto::upgrade::downcast::<TokioIo<Prefixed<Accepted>>>(upgraded)
    {
        Ok(parts) => {
            let (unread, accepted) = parts.io.into_inner().into_parts();
            Some(Unwrapped::Socket {
                replay: concat([first, hello, parts.read_buf, unread]),
                socket: accepted.into_inner(),
            })
        }
        Err(upgraded) => Some(Unwrapped::Upgraded(Prefixed::new(
            first,
            Prefixed::new(hello, TokioIo::new(upgraded)),
        ))),
    }
}

/// Takes the value out of `slot` if it is a `T`.
fn take<T: 'static, I: 'static>(slot: &mut Option<I>) -> Option<T> {
    (slot as &mut dyn Any)
        .downcast_mut::<Option<T>>()
        .and_then(Option::take)
}

/// The parts, in order, as one buffer.
fn concat<const N: usize>(parts: [Bytes; N]) -> Bytes {
    let mut nonempty = parts.into_iter().filter(|p| !p.is_empty());
    let Some(first) = nonempty.next() else {
        return Bytes::new();
    };
    let mut rest = nonempty.peekable();
    if rest.peek().is_none() {
        return first;
    }
    let mut all = BytesMut::from(first);
    for part in rest {
        all.extend_from_slice(&part);
    }
    all.freeze()
}

/// The copy loop, for streams that are not sockets.
async fn copy<A>(mut client: A, mut upstream: TcpStream) -> Moved
where
    A: AsyncRead + AsyncWrite + Unpin,
{
    #[cfg(test)]
    tests::count(|c| c.copied += 1);
    match tokio::io::copy_bidirectional_with_sizes(
        &mut client,
        &mut upstream,
        RELAY_BUFFER,
        RELAY_BUFFER,
    )
    .await
    {
        Ok((out, inn)) => Moved { out, inn },
        Err(_) => Moved::default(),
    }
}

/// Steps 2 to 4 of the module doc.
async fn splice_sockets(
    mut client: TcpStream,
    mut upstream: TcpStream,
    replay: Bytes,
    idle: Duration,
) -> Moved {
    let mut moved = Moved::default();
    if !replay.is_empty() {
        if upstream.write_all(&replay).await.is_err() {
            return moved;
        }
        moved.out = replay.len() as u64;
    }
    #[cfg(test)]
    tests::count(|c| c.sockets += 1);
    let activity = Activity::new();
    let (client_read, client_write) = client.split();
    let (upstream_read, upstream_write) = upstream.split();
    let (out, inn) = (&mut moved.out, &mut moved.inn);
    tokio::select! {
        _ = async {
            tokio::try_join!(
                one_way(client_read, upstream_write, out, &activity),
                one_way(upstream_read, client_write, inn, &activity),
            )
        } => {}
        () = activity.expired(idle) => {}
    }
    moved
}

/// Moves bytes from `from` to `to` until `from` ends (then shuts down writing on `to`) or either
/// fails; adds what reached `to` to `moved`.
///
/// A read that leaves room in the buffer drained the socket (tokio then waits for it to become
/// readable again): a small message costs one read and one write, as in a copy loop, where a
/// splice would cost two splices and a third that finds nothing. A read that fills the buffer
/// means a burst: the rest of it goes through the pipe, opened the first time, and never
/// through our memory. Without a pipe (out of descriptors) the direction copies.
async fn one_way(
    mut from: ReadHalf<'_>,
    mut to: WriteHalf<'_>,
    moved: &mut u64,
    activity: &Activity,
) -> io::Result<()> {
    let mut buf = vec![0u8; COPY_BUFFER];
    let mut pipe = None;
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            return to.shutdown().await;
        }
        to.write_all(&buf[..n]).await?;
        *moved += n as u64;
        activity.touch();
        if n < buf.len() {
            continue;
        }
        let Ok(pipe) = pipe.get_or_insert_with(Pipe::new) else {
            continue;
        };
        if splice_burst(from.as_ref(), to.as_ref(), pipe, moved, activity).await? {
            return to.shutdown().await;
        }
    }
}

/// Splices from `from` through the empty `pipe` to `to` until `from` has nothing more to read
/// (`Ok(false)`, its readiness cleared) or ends (`Ok(true)`).
async fn splice_burst(
    from: &TcpStream,
    to: &TcpStream,
    pipe: &Pipe,
    moved: &mut u64,
    activity: &Activity,
) -> io::Result<bool> {
    let flags = SpliceFlags::MOVE | SpliceFlags::NONBLOCK;
    loop {
        // The pipe is empty here, so EAGAIN can only mean the socket has nothing to read.
        let read = from.try_io(Interest::READABLE, || {
            splice(from, &pipe.write, SPLICE_CHUNK, flags)
        });
        let mut in_pipe = match read {
            Ok(0) => return Ok(true),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) => return Err(e),
        };
        #[cfg(test)]
        tests::count(|c| c.spliced += in_pipe);
        // The pipe holds `in_pipe` bytes, so EAGAIN can only mean the socket's buffer is full.
        while in_pipe > 0 {
            match to.try_io(Interest::WRITABLE, || {
                splice(&pipe.read, to, in_pipe, flags)
            }) {
                Ok(n) => {
                    in_pipe -= n;
                    *moved += n as u64;
                    activity.touch();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => to.writable().await?,
                Err(e) => return Err(e),
            }
        }
    }
}

/// `splice(2)` between a socket and a pipe (no offsets).
fn splice(from: impl AsFd, to: impl AsFd, len: usize, flags: SpliceFlags) -> io::Result<usize> {
    rustix::pipe::splice(from, None, to, None, len, flags).map_err(io::Error::from)
}

/// A pipe owned by one direction of a relay.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        let (read, write) = rustix::pipe::pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK)?;
        Ok(Pipe { read, write })
    }
}

/// When bytes last moved either way.
struct Activity {
    origin: Instant,
    /// Milliseconds since `origin`.
    last: AtomicU64,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            origin: Instant::now(),
            last: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let ms = self.origin.elapsed().as_millis() as u64;
        self.last.store(ms, Ordering::Relaxed);
    }

    /// Resolves once nothing moved for `timeout`.
    async fn expired(&self, timeout: Duration) {
        loop {
            let last = self.origin + Duration::from_millis(self.last.load(Ordering::Relaxed));
            let deadline = last + timeout;
            if deadline <= Instant::now() {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// Which relays ran on this thread (tests run on a current-thread runtime, so every task
    /// they spawn counts here).
    #[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
    pub struct Counts {
        /// Relays between two sockets.
        pub sockets: usize,
        /// Bytes those moved with `splice(2)`.
        pub spliced: usize,
        /// Relays by the copy loop.
        pub copied: usize,
    }

    thread_local! {
        static COUNTS: std::cell::Cell<Counts> = std::cell::Cell::default();
    }

    pub fn count(f: impl FnOnce(&mut Counts)) {
        COUNTS.with(|c| {
            let mut counts = c.get();
            f(&mut counts);
            c.set(counts);
        });
    }

    pub fn counts() -> Counts {
        COUNTS.with(std::cell::Cell::get)
    }

    /// `len` bytes that repeat with no period a pipe or socket buffer could hide a slip behind.
    pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// Two connected loopback sockets.
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let near = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (far, _) = listener.accept().await.unwrap();
        (near, far)
    }

    /// A relay as a passed-through connection runs it: `(client, server, relay)`, the client's
    /// socket reaching the relay behind the idle timer and the two sniffed prefixes.
    async fn start(
        first: &'static [u8],
        hello: &'static [u8],
        idle: Duration,
    ) -> (TcpStream, TcpStream, tokio::task::JoinHandle<Moved>) {
        let (client, accepted) = pair().await;
        let (upstream, server) = pair().await;
        let stream = Prefixed::new(
            Bytes::from_static(first),
            Prefixed::new(Bytes::from_static(hello), Idle::new(accepted, idle)),
        );
        let relay = tokio::spawn(relay(stream, upstream, idle));
        (client, server, relay)
    }

    /// Sends `data` and closes writing, while reading everything the peer sends.
    pub async fn exchange(stream: TcpStream, data: Vec<u8>) -> Vec<u8> {
        let (mut read, mut write) = stream.into_split();
        let send = async move {
            write.write_all(&data).await.unwrap();
            write.shutdown().await.unwrap();
            write
        };
        let receive = async move {
            let mut got = Vec::new();
            read.read_to_end(&mut got).await.unwrap();
            got
        };
        tokio::join!(send, receive).1
    }

    #[tokio::test]
    async fn megabytes_both_ways_arrive_byte_for_byte_and_are_counted() {
        let before = counts();
        let (client, server, relay) =
            start(b"\x16\x03", b"\x01hello", Duration::from_secs(60)).await;
        let up = pattern(9 << 20, 1);
        let down = pattern(7 << 20, 2);
        let (at_server, at_client) =
            tokio::join!(exchange(server, down.clone()), exchange(client, up.clone()));
        let moved = relay.await.unwrap();
        assert_eq!(
            &at_server[..8],
            b"\x16\x03\x01hello",
            "the prefixes first, in order"
        );
        assert!(at_server[8..] == up[..], "client to server, byte for byte");
        assert!(at_client == down, "server to client, byte for byte");
        assert_eq!(
            moved,
            Moved {
                out: 8 + up.len() as u64,
                inn: down.len() as u64
            }
        );
        let after = counts();
        assert_eq!(after.sockets, before.sockets + 1, "socket to socket");
        assert_eq!(after.copied, before.copied, "not by the copy loop");
        let spliced = after.spliced - before.spliced;
        assert!(
            spliced > (up.len() + down.len()) / 2,
            "most of it spliced: {spliced} bytes"
        );
    }

    #[tokio::test]
    async fn the_client_closing_first_is_passed_on_and_the_answer_still_comes_back() {
        let (mut client, mut server, relay) = start(b"GE", b"T /", Duration::from_secs(60)).await;
        client.write_all(b" request").await.unwrap();
        client.shutdown().await.unwrap();
        let mut request = Vec::new();
        server.read_to_end(&mut request).await.unwrap();
        assert_eq!(request, b"GET / request", "the server saw the client's end");
        server.write_all(b"the answer").await.unwrap();
        server.shutdown().await.unwrap();
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await.unwrap();
        assert_eq!(answer, b"the answer");
        assert_eq!(relay.await.unwrap(), Moved { out: 13, inn: 10 });
    }

    #[tokio::test]
    async fn the_server_closing_first_is_passed_on_and_the_client_may_still_send() {
        let (mut client, mut server, relay) = start(b"", b"", Duration::from_secs(60)).await;
        server.write_all(b"banner").await.unwrap();
        server.shutdown().await.unwrap();
        let mut banner = Vec::new();
        client.read_to_end(&mut banner).await.unwrap();
        assert_eq!(banner, b"banner", "the client saw the server's end");
        let late = pattern(3 << 20, 3);
        client.write_all(&late).await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert!(got == late, "sent after the server's end, byte for byte");
        let moved = relay.await.unwrap();
        assert_eq!(
            moved,
            Moved {
                out: late.len() as u64,
                inn: 6
            }
        );
    }

    #[tokio::test]
    async fn a_reset_upstream_ends_the_relay_and_closes_the_client() {
        let (mut client, server, relay) = start(b"x", b"", Duration::from_secs(60)).await;
        // SO_LINGER 0: close sends a reset.
        rustix::net::sockopt::set_socket_linger(&server, Some(Duration::ZERO)).unwrap();
        drop(server);
        let moved = tokio::time::timeout(Duration::from_secs(10), relay)
            .await
            .expect("the relay ends")
            .unwrap();
        assert_eq!(moved.inn, 0);
        let mut rest = Vec::new();
        let _ = client.read_to_end(&mut rest).await;
        assert!(rest.is_empty());
    }

    #[tokio::test]
    async fn an_idle_relay_ends_after_the_idle_timeout_and_an_active_one_does_not() {
        let idle = Duration::from_millis(300);
        let (mut client, mut server, relay) = start(b"", b"", idle).await;
        let mut byte = [0u8; 1];
        for _ in 0..8 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            client.write_all(b"x").await.unwrap();
            server.read_exact(&mut byte).await.unwrap();
        }
        assert!(!relay.is_finished(), "bytes moved within every 300 ms");
        let moved = tokio::time::timeout(Duration::from_secs(10), relay)
            .await
            .expect("idle: the relay ends")
            .unwrap();
        assert_eq!(moved, Moved { out: 8, inn: 0 });
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        server.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "both ends closed");
    }

    #[tokio::test]
    async fn a_stream_that_is_not_a_socket_is_copied() {
        let before = counts();
        let (near, mut far) = tokio::io::duplex(64 * 1024);
        let (upstream, mut server) = pair().await;
        let relay = tokio::spawn(relay(
            Prefixed::new(Bytes::from_static(b"pre"), near),
            upstream,
            Duration::from_secs(60),
        ));
        far.write_all(b"fix").await.unwrap();
        far.shutdown().await.unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"prefix");
        server.write_all(b"back").await.unwrap();
        drop(server);
        let mut back = Vec::new();
        far.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"back");
        assert_eq!(relay.await.unwrap(), Moved { out: 6, inn: 4 });
        let after = counts();
        assert_eq!(
            (after.copied, after.sockets),
            (before.copied + 1, before.sockets)
        );
    }

    #[test]
    fn concat_keeps_order_and_skips_empty_parts() {
        let b = |s: &'static [u8]| Bytes::from_static(s);
        assert_eq!(concat([b(b""), b(b"")]), b(b""));
        assert_eq!(concat([b(b"ab"), b(b"")]), b(b"ab"));
        assert_eq!(concat([b(b""), b(b"cd")]), b(b"cd"));
        assert_eq!(concat([b(b"ab"), b(b""), b(b"cd")]), b(b"abcd"));
    }
}
