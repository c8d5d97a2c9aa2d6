//! Giving memory back after a burst of connections (docs/decisions.md, "Proxy performance").
//!
//! glibc's allocator keeps what was freed in its per-thread arenas for reuse, so after a thousand
//! concurrent connections (TLS and HTTP buffers on every tokio worker) the process stays at its
//! peak size although almost nothing is in use. [`malloc_trim`] hands the free pages back.
//!
//! 1. Every task a listener runs (connections, tunnels) is counted here while it lives
//!    ([`opened`], [`closed`]), process-wide, with the peak since the last trim.
//! 2. A small thread (started with the first connection) looks every [`CHECK_EVERY`]: once the
//!    active count fell to a quarter of a peak of at least [`MIN_PEAK`], it trims, and keeps
//!    trimming at every look for [`FOLLOW_UP`], while the upstream pool closes the connections the
//!    burst left idle (a trim only returns what is free by then).
//!
//! Trimming costs a walk over the heap's free chunks, a few milliseconds at most, off the
//! request path; it never runs while the load is still high.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Once;
use std::time::{Duration, Instant};

use super::POOL_IDLE_TIMEOUT;

/// How often the trimming thread looks at the counts.
const CHECK_EVERY: Duration = Duration::from_secs(5);
/// Peaks below this never trigger a trim (small loads leave little behind).
const MIN_PEAK: usize = 64;
/// How long trimming goes on after a burst: until idle pooled upstream connections have expired
/// (the pool looks every [`POOL_IDLE_TIMEOUT`], so one can live up to twice that).
const FOLLOW_UP: Duration = Duration::from_secs(2 * POOL_IDLE_TIMEOUT.as_secs() + 5);

static ACTIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
static STARTED: Once = Once::new();

/// A listener task started.
pub fn opened() {
    let now = ACTIVE.fetch_add(1, Ordering::Relaxed) + 1;
    PEAK.fetch_max(now, Ordering::Relaxed);
    if now >= MIN_PEAK {
        STARTED.call_once(start);
    }
}

/// A listener task ended.
pub fn closed() {
    ACTIVE.fetch_sub(1, Ordering::Relaxed);
}

fn start() {
    let spawned = std::thread::Builder::new()
        .name("hive-trim".into())
        .spawn(|| {
            let mut trim_until: Option<Instant> = None;
            loop {
                std::thread::sleep(CHECK_EVERY);
                let active = ACTIVE.load(Ordering::Relaxed);
                let peak = PEAK.load(Ordering::Relaxed);
                if peak >= MIN_PEAK && active <= peak / 4 {
                    PEAK.store(active, Ordering::Relaxed);
                    malloc_trim();
                    trim_until = Some(Instant::now() + FOLLOW_UP);
                } else if let Some(until) = trim_until {
                    malloc_trim();
                    if Instant::now() >= until {
                        trim_until = None;
                    }
                }
            }
        });
    if let Err(e) = spawned {
        tracing::debug!(error = %e, "no memory trimming thread");
    }
}

/// Returns free heap pages to the kernel (glibc only; other allocators return them themselves
/// or have no such call).
fn malloc_trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists, under its locks.
    unsafe {
        libc::malloc_trim(0);
    }
}
