//! [`Subscription`]: one subscriber's stream — an optional replay of the audit log, then the live
//! events the bus pushed into its bounded buffer.
//!
//! How it works:
//! 1. `subscribe` registers a [`Live`] buffer under the bus lock and remembers the first id it will
//!    receive (`until`). It does no file I/O (it runs on the Node main thread).
//! 2. The first `next()` of a replaying subscription opens the log files on a blocking thread and
//!    reads them in batches, yielding the events with `after < id < until`. Everything from `until`
//!    on is already in the live buffer, so there is neither a gap nor a duplicate.
//! 3. Then `next()` pops the live buffer. The bus never waits: a full buffer drops its oldest event
//!    and counts it; the next `next()` yields one synthetic `events.dropped` event with the count
//!    before the first event after the gap.
//!
//! `next()` is cancel-safe: the replay batch in flight lives in the subscription (its join handle),
//! not in the future, and a live event leaves the buffer only in the synchronous part of a poll.

use std::collections::VecDeque;
use std::sync::Arc;

use parking_lot::Mutex;
use serde_json::{Map, Value};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use super::log::LogReader;
use super::{kind, now_rfc3339, Event, EventBus, FIELD_COUNT};

/// Events read from the log per blocking call during a replay.
const REPLAY_BATCH: usize = 512;

/// The live half of a subscription, shared with the bus.
#[derive(Debug)]
pub(super) struct Live {
    state: Mutex<LiveState>,
    notify: Notify,
}

#[derive(Debug)]
struct LiveState {
    buf: VecDeque<Event>,
    cap: usize,
    /// Events dropped since the last delivered one, and the id of the newest of them.
    dropped: u64,
    last_dropped_id: String,
    end: End,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Open,
    /// The bus closed: drain, then end.
    Closed,
    /// Unsubscribed: end now.
    Unsubscribed,
}

/// What the live buffer holds next.
enum Pop {
    Event(Event),
    Dropped { count: u64, id: String },
    Empty,
    Ended,
}

impl Live {
    pub(super) fn new(cap: usize, closed: bool) -> Live {
        Live {
            state: Mutex::new(LiveState {
                buf: VecDeque::with_capacity(cap.min(1024)),
                cap: cap.max(1),
                dropped: 0,
                last_dropped_id: String::new(),
                end: if closed { End::Closed } else { End::Open },
            }),
            notify: Notify::new(),
        }
    }

    /// Delivers one event, dropping the oldest if the buffer is full. Never waits.
    pub(super) fn push(&self, event: Event) {
        {
            let mut state = self.state.lock();
            if state.end != End::Open {
                return;
            }
            if state.buf.len() >= state.cap {
                if let Some(oldest) = state.buf.pop_front() {
                    state.dropped += 1;
                    state.last_dropped_id = oldest.id;
                }
            }
            state.buf.push_back(event);
        }
        self.notify.notify_one();
    }

    /// Ends the stream: `Closed` drains first, `Unsubscribed` ends at once.
    fn end(&self, end: End) {
        {
            let mut state = self.state.lock();
            if state.end != End::Unsubscribed {
                state.end = end;
            }
            if end == End::Unsubscribed {
                state.buf.clear();
            }
        }
        self.notify.notify_one();
    }

    pub(super) fn close(&self) {
        self.end(End::Closed);
    }

    fn is_unsubscribed(&self) -> bool {
        self.state.lock().end == End::Unsubscribed
    }

    fn pop(&self) -> Pop {
        let mut state = self.state.lock();
        if state.end == End::Unsubscribed {
            return Pop::Ended;
        }
        if state.dropped > 0 {
            let count = std::mem::take(&mut state.dropped);
            let id = std::mem::take(&mut state.last_dropped_id);
            return Pop::Dropped { count, id };
        }
        match state.buf.pop_front() {
            Some(event) => Pop::Event(event),
            None if state.end == End::Closed => Pop::Ended,
            None => Pop::Empty,
        }
    }
}

/// Where a replay stands.
enum Replay {
    /// No replay, or it is over.
    Done,
    /// Not started: files not opened yet.
    Start {
        after: Option<String>,
        until: String,
    },
    /// A batch is being read on a blocking thread.
    InFlight(JoinHandle<Batch>),
    /// A batch to hand out, and where to continue (`None` at the end).
    Ready {
        events: VecDeque<Event>,
        cursor: Option<Cursor>,
    },
}

/// An open replay position.
struct Cursor {
    reader: LogReader,
    after: Option<String>,
    until: String,
    /// The last id handed out by this replay, so ids only go up.
    last: Option<String>,
}

struct Batch {
    events: VecDeque<Event>,
    cursor: Option<Cursor>,
}

impl Cursor {
    /// Reads up to [`REPLAY_BATCH`] events. Blocking.
    fn read_batch(mut self) -> Batch {
        let mut events = VecDeque::new();
        while events.len() < REPLAY_BATCH {
            let Some(event) = self.reader.next_event() else {
                return Batch {
                    events,
                    cursor: None,
                };
            };
            if event.id >= self.until {
                // From here on the live buffer has it.
                return Batch {
                    events,
                    cursor: None,
                };
            }
            let after_start = self.after.as_ref().is_none_or(|after| event.id > *after);
            let increasing = self.last.as_ref().is_none_or(|last| event.id > *last);
            if after_start && increasing {
                self.last = Some(event.id.clone());
                events.push_back(event);
            }
        }
        Batch {
            events,
            cursor: Some(self),
        }
    }
}

struct Reader {
    replay: Replay,
    /// The last id yielded, so a live event can never repeat a replayed one.
    last_id: Option<String>,
}

/// One subscriber's stream of events (docs/audit-log.md#streaming). Dropping it unsubscribes.
pub struct Subscription {
    bus: Arc<EventBus>,
    key: u64,
    live: Arc<Live>,
    reader: tokio::sync::Mutex<Reader>,
}

impl Subscription {
    pub(super) fn new(
        bus: Arc<EventBus>,
        key: u64,
        live: Arc<Live>,
        after: Option<Option<String>>,
        until: String,
    ) -> Subscription {
        let replay = match after {
            None => Replay::Done,
            Some(after) => Replay::Start { after, until },
        };
        Subscription {
            bus,
            key,
            live,
            reader: tokio::sync::Mutex::new(Reader {
                replay,
                last_id: None,
            }),
        }
    }

    /// The next event; `None` once the bus is closed and the buffer drained, or after
    /// [`unsubscribe`](Self::unsubscribe).
    ///
    /// Cancel-safe: dropping the future loses no event.
    pub async fn next(&self) -> Option<Event> {
        let mut reader = self.reader.lock().await;
        loop {
            if self.live.is_unsubscribed() {
                return None;
            }
            if let Replay::InFlight(handle) = &mut reader.replay {
                // Awaiting by reference: if this future is dropped, the handle stays put and the
                // next call picks the batch up.
                reader.replay = match handle.await {
                    Ok(batch) => Replay::Ready {
                        events: batch.events,
                        cursor: batch.cursor,
                    },
                    Err(e) => {
                        tracing::warn!(error = %e, "audit log replay failed");
                        Replay::Done
                    }
                };
                continue;
            }
            match std::mem::replace(&mut reader.replay, Replay::Done) {
                Replay::Done => break,
                Replay::Start { after, until } => {
                    let bus = self.bus.clone();
                    reader.replay = Replay::InFlight(tokio::task::spawn_blocking(move || {
                        Cursor {
                            reader: bus.log_reader(),
                            after,
                            until,
                            last: None,
                        }
                        .read_batch()
                    }));
                }
                Replay::Ready { mut events, cursor } => match events.pop_front() {
                    Some(event) => {
                        reader.last_id = Some(event.id.clone());
                        reader.replay = Replay::Ready { events, cursor };
                        return Some(event);
                    }
                    None => {
                        if let Some(cursor) = cursor {
                            reader.replay =
                                Replay::InFlight(tokio::task::spawn_blocking(move || {
                                    cursor.read_batch()
                                }));
                        }
                    }
                },
                // Handled above; put it back and go round again.
                in_flight @ Replay::InFlight(_) => reader.replay = in_flight,
            }
        }

        loop {
            let notified = self.live.notify.notified();
            match self.live.pop() {
                Pop::Event(event) => {
                    if reader
                        .last_id
                        .as_ref()
                        .is_some_and(|last| event.id <= *last)
                    {
                        continue;
                    }
                    reader.last_id = Some(event.id.clone());
                    return Some(event);
                }
                Pop::Dropped { count, id } => {
                    let mut fields = Map::new();
                    fields.insert(FIELD_COUNT.into(), Value::from(count));
                    return Some(Event {
                        id,
                        kind: kind::EVENTS_DROPPED.into(),
                        time: now_rfc3339(),
                        sandbox: self.bus.sandbox().into(),
                        fields: fields.into(),
                    });
                }
                Pop::Ended => return None,
                Pop::Empty => notified.await,
            }
        }
    }

    /// Up to `max` events (at least one): waits for the first as [`next`](Self::next) does, then
    /// takes the ones that are ready without waiting. Empty once the stream has ended. Saves a
    /// round trip to JS per event when a subscriber is behind.
    ///
    /// Cancel-safe, as `next()` is.
    pub async fn next_batch(&self, max: usize) -> Vec<Event> {
        let Some(first) = self.next().await else {
            return Vec::new();
        };
        let mut batch = vec![first];
        self.take_ready(&mut batch, max);
        batch
    }

    /// Adds to `batch` the events that are ready now, up to `max` in all; never waits.
    pub fn take_ready(&self, batch: &mut Vec<Event>, max: usize) {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        while batch.len() < max {
            // Polled once: a `next()` that would wait is dropped, which loses nothing.
            let next = std::pin::pin!(self.next());
            match std::future::Future::poll(next, &mut cx) {
                std::task::Poll::Ready(Some(event)) => batch.push(event),
                _ => break,
            }
        }
    }

    /// Unsubscribes now (JS `break`): `next()` returns `None` from then on. Idempotent.
    pub fn unsubscribe(&self) {
        self.bus.remove_subscriber(self.key);
        self.live.end(End::Unsubscribed);
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.unsubscribe();
    }
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("sandbox", &self.bus.sandbox())
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}
