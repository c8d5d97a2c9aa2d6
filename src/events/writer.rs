//! The audit log's writer thread: one per bus, so that writing (and rotating) never happens on
//! an async worker or under the bus lock (docs/audit-log.md).
//!
//! How it works:
//! 1. The bus serializes each event under its lock and sends the line (or the event's rendering,
//!    which subscribers share, for this thread to end with a newline) with its sequence number
//!    over an unbounded channel (never waiting), so lines arrive in id order.
//! 2. Woken by a first line, the thread lingers [`LINGER`] (group commit: a sender wakes it only
//!    while it waits for a first line, so under load the lines of many requests cost one
//!    wake-up), then takes what is queued (up to [`MAX_BATCH`] bytes) and appends it with one
//!    write ([`AuditLog::append`]), then publishes the last sequence number written;
//!    [`Shared::wait`] lets a replay or a close wait until the log holds everything emitted so
//!    far (they unpark the thread first, cutting the linger short).
//! 3. While the bus's coalescer holds events (the `holding` flag), the thread wakes every
//!    [`TICK`] to let it emit what has waited long enough (`EventBus::expire_held`).
//! 4. When the bus drops its sender, the thread writes what is left and ends.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::{Arc, Condvar, Weak};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::log::{AuditLog, LogReader};
use super::EventBus;
use crate::config::AuditRetention;

/// Most bytes written in one batch.
pub const MAX_BATCH: usize = 1 << 20;
/// How long the writer waits after a first line for more to batch with it. Events reach
/// subscribers at once; only the file write waits.
pub const LINGER: Duration = Duration::from_millis(10);
/// How often the writer lets the coalescer expire what it holds.
pub const TICK: Duration = Duration::from_millis(100);

/// What the bus sends the writer.
pub enum Msg {
    /// One serialized event (ending with `\n`) and its sequence number.
    Line(u64, Vec<u8>),
    /// One serialized event without its newline (shared with the event's subscribers) and its
    /// sequence number.
    Rendered(u64, Arc<[u8]>),
    /// The coalescer started holding: switch to ticking.
    Wake,
}

/// State shared by the bus and its writer thread.
#[derive(Debug)]
pub struct Shared {
    log: Mutex<AuditLog>,
    /// The last sequence number the writer has handled (written, or failed to write).
    written: std::sync::Mutex<u64>,
    written_changed: Condvar,
    /// Whether the coalescer holds events (set by the bus under its lock).
    pub holding: AtomicBool,
}

impl Shared {
    pub fn new(log: AuditLog, last_seq: u64) -> Shared {
        Shared {
            log: Mutex::new(log),
            written: std::sync::Mutex::new(last_seq),
            written_changed: Condvar::new(),
            holding: AtomicBool::new(false),
        }
    }

    /// Waits (at most `timeout`) until every line up to `seq` has been handled; false on timeout.
    pub fn wait(&self, seq: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut written = self.written.lock().unwrap_or_else(|e| e.into_inner());
        while *written < seq {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            written = self
                .written_changed
                .wait_timeout(written, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }

    /// Opens the kept files for a replay (no rotation can happen meanwhile).
    pub fn reader(&self) -> LogReader {
        self.log.lock().reader()
    }

    /// Changes the retention from the next write.
    pub fn set_retention(&self, retention: AuditRetention) {
        self.log.lock().set_retention(retention);
    }

    fn mark_written(&self, seq: u64) {
        let mut written = self.written.lock().unwrap_or_else(|e| e.into_inner());
        if seq > *written {
            *written = seq;
        }
        drop(written);
        self.written_changed.notify_all();
    }
}

/// Starts the writer thread for `bus`.
pub fn spawn(
    sandbox: &str,
    shared: Arc<Shared>,
    rx: Receiver<Msg>,
    bus: Weak<EventBus>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("hive-audit-{sandbox}"))
        .spawn(move || run(&shared, &rx, &bus))
}

fn run(shared: &Shared, rx: &Receiver<Msg>, bus: &Weak<EventBus>) {
    let mut batch = Vec::new();
    loop {
        let holding = shared.holding.load(Ordering::Acquire);
        let first = if holding {
            rx.recv_timeout(TICK)
        } else {
            rx.recv().map_err(|_| RecvTimeoutError::Disconnected)
        };
        let mut last = None;
        let mut ended = false;
        let mut take = |msg: Msg, batch: &mut Vec<u8>| match msg {
            Msg::Line(seq, line) => {
                batch.extend_from_slice(&line);
                last = Some(seq);
            }
            Msg::Rendered(seq, rendered) => {
                batch.extend_from_slice(&rendered);
                batch.push(b'\n');
                last = Some(seq);
            }
            Msg::Wake => {}
        };
        match first {
            Ok(msg) => {
                take(msg, &mut batch);
                // Returns early when a waiter unparks this thread (sync, replay, close).
                std::thread::park_timeout(LINGER);
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => ended = true,
        }
        while !ended && batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(msg) => take(msg, &mut batch),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => ended = true,
            }
        }
        if !batch.is_empty() {
            if let Err(e) = shared.log.lock().append(&batch) {
                tracing::warn!(error = %e, "cannot write audit log");
            }
            batch.clear();
        }
        if let Some(seq) = last {
            shared.mark_written(seq);
        }
        if ended {
            return;
        }
        if holding {
            if let Some(bus) = bus.upgrade() {
                bus.expire_held();
            }
        }
    }
}
