//! Idle timeouts on accepted connections, whatever they carry: keep-alive HTTP, intercepted TLS,
//! plain HTTP in a tunnel, raw TCP tunnels and WebSockets all run over the one accepted socket,
//! so the timer lives on that socket ([`Idle`]).
//!
//! 1. Every read or write that moves bytes on the client socket marks it active.
//! 2. While a request waits for its upstream's answer ([`IdleState::busy`]) the connection is not
//!    idle, however long the upstream takes.
//! 3. Otherwise, once nothing moved for the idle timeout, the next read fails with `TimedOut`,
//!    which ends the hyper connection, the splice or the tunnel, and frees its slot.
//!
//! # Security
//! Without this, a sandbox could park connections (a silent tunnel, an idle WebSocket) forever
//! and hold its whole connection budget and their file descriptors.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// Activity shared between a connection's socket and the requests served on it.
pub struct IdleState {
    origin: Instant,
    /// Milliseconds since `origin` of the last activity.
    last: AtomicU64,
    busy: AtomicUsize,
}

impl IdleState {
    fn new() -> Arc<IdleState> {
        Arc::new(IdleState {
            origin: Instant::now(),
            last: AtomicU64::new(0),
            busy: AtomicUsize::new(0),
        })
    }

    fn touch(&self) {
        let ms = self.origin.elapsed().as_millis() as u64;
        self.last.fetch_max(ms, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.origin + Duration::from_millis(self.last.load(Ordering::Relaxed))
    }

    /// Marks a request as waiting for its answer until the guard drops.
    pub fn busy(self: &Arc<Self>) -> BusyGuard {
        self.busy.fetch_add(1, Ordering::AcqRel);
        BusyGuard(self.clone())
    }
}

/// See [`IdleState::busy`].
pub struct BusyGuard(Arc<IdleState>);

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.0.touch();
        self.0.busy.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A stream that fails its reads once idle for `timeout` (see the module docs).
pub struct Idle<I> {
    inner: I,
    state: Arc<IdleState>,
    timeout: Duration,
    sleep: Pin<Box<Sleep>>,
}

impl<I> Idle<I> {
    pub fn new(inner: I, timeout: Duration) -> Idle<I> {
        Idle {
            inner,
            state: IdleState::new(),
            timeout,
            sleep: Box::pin(tokio::time::sleep(timeout)),
        }
    }

    /// The stream, without the timer (whoever takes it keeps its own).
    pub fn into_inner(self) -> I {
        self.inner
    }

    /// The activity record requests mark themselves busy on.
    pub fn state(&self) -> Arc<IdleState> {
        self.state.clone()
    }

    /// `Ready` once the connection has been idle for the whole timeout; otherwise re-arms the
    /// timer (registering the waker) and returns `Pending`.
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            if self.sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let now = Instant::now();
            let deadline = if self.state.busy.load(Ordering::Acquire) > 0 {
                now + self.timeout
            } else {
                self.state.last() + self.timeout
            };
            if deadline <= now {
                return Poll::Ready(());
            }
            self.sleep.as_mut().reset(deadline);
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Idle<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(result) => {
                if buf.filled().len() > before {
                    self.state.touch();
                }
                Poll::Ready(result)
            }
            Poll::Pending => match self.poll_expired(cx) {
                Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "idle connection",
                ))),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Idle<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &result {
            if *n > 0 {
                self.state.touch();
            }
        }
        result
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = &result {
            if *n > 0 {
                self.state.touch();
            }
        }
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn an_idle_stream_times_out_and_a_busy_one_does_not() {
        let (a, mut b) = tokio::io::duplex(64);
        let mut idle = Idle::new(a, Duration::from_millis(100));
        b.write_all(b"x").await.unwrap();
        let mut buf = [0u8; 1];
        idle.read_exact(&mut buf).await.unwrap();
        // Busy for longer than the timeout: still alive.
        let guard = idle.state().busy();
        let read = tokio::time::timeout(Duration::from_millis(300), idle.read(&mut buf)).await;
        assert!(read.is_err(), "a busy connection must not time out");
        drop(guard);
        let err = idle.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
    }
}
