//! `EventStream`: the native async iterator behind `getEventsStream()`.

use std::sync::Arc;

use napi::bindgen_prelude::*;
use napi_derive::napi;
use serde_json::Value;

use super::error::IntoNapi;
use crate::events::{Since, Subscription, DEFAULT_BUFFER};
use crate::sandbox::Sandbox;

/// Options of `getEventsStream()`.
#[napi(object)]
pub struct EventsStreamOptions {
    /// `"start"` replays the whole persisted audit log first; an event id replays what followed it.
    pub since: Option<String>,
    /// Events a slow subscriber may fall behind before the oldest are dropped (default 10 000).
    pub buffer: Option<u32>,
}

/// One audit event, as JS sees it (typed as `SandboxEvent` in `index.d.ts`).
pub struct SandboxEvent(Value);

impl TypeName for SandboxEvent {
    fn type_name() -> &'static str {
        "SandboxEvent"
    }
    fn value_type() -> ValueType {
        ValueType::Object
    }
}

impl ToNapiValue for SandboxEvent {
    unsafe fn to_napi_value(env: napi::sys::napi_env, val: Self) -> Result<napi::sys::napi_value> {
        // SAFETY: forwarded unchanged from napi's own conversion contract.
        unsafe { Value::to_napi_value(env, val.0) }
    }
}

/// An async iterator over a sandbox's events.
#[napi(async_iterator)]
pub struct EventStream {
    subscription: Arc<Subscription>,
}

impl EventStream {
    pub(super) fn subscribe(
        sandbox: &Sandbox,
        options: Option<EventsStreamOptions>,
    ) -> Result<Self> {
        let (since, buffer) = match options {
            None => (Since::Now, DEFAULT_BUFFER),
            Some(o) => {
                let since = match o.since.as_deref() {
                    None => Since::Now,
                    Some("start") => Since::Start,
                    Some(id) => Since::After(id.to_owned()),
                };
                let buffer = o.buffer.map_or(DEFAULT_BUFFER, |b| b.max(1) as usize);
                (since, buffer)
            }
        };
        let subscription = Arc::new(sandbox.subscribe(since, buffer).napi()?);
        Ok(EventStream { subscription })
    }
}

/// Events handed to JS per [`EventStream::next_batch`] at most.
const JS_BATCH: usize = 256;

/// How long a batch that is not full waits for more events before it goes to JS. A subscriber
/// that keeps up would otherwise pay a napi round trip (a promise, a threadsafe function) for
/// nearly every event; an audit stream can be a millisecond late.
const JS_BATCH_LINGER: std::time::Duration = std::time::Duration::from_millis(1);

#[napi]
impl EventStream {
    /// Internal (the iterator `getEventsStream()` returns calls it): the next events as the text
    /// of a JSON array, one or more of them, waiting for the first; `null` once the stream has
    /// ended. One crossing into JS and one `JSON.parse` per batch instead of a promise and an
    /// object built property by property per event.
    #[napi]
    pub async fn next_batch(&self) -> Result<Option<String>> {
        let mut events = self.subscription.next_batch(JS_BATCH).await;
        if events.is_empty() {
            return Ok(None);
        }
        if events.len() < JS_BATCH {
            tokio::time::sleep(JS_BATCH_LINGER).await;
            self.subscription.take_ready(&mut events, JS_BATCH);
        }
        let mut text = Vec::with_capacity(events.len() * 320);
        text.push(b'[');
        for (i, event) in events.iter().enumerate() {
            if i > 0 {
                text.push(b',');
            }
            event.write_line(&mut text);
        }
        text.push(b']');
        // serde_json writes UTF-8 only; a failure here would be a bug, reported, not a panic.
        String::from_utf8(text)
            .map(Some)
            .map_err(|_| Error::from_reason("event batch is not UTF-8"))
    }

    /// Internal: ends the stream now (the iterator's `return()`).
    #[napi]
    pub fn unsubscribe(&self) {
        self.subscription.unsubscribe();
    }
}

#[napi]
impl AsyncGenerator for EventStream {
    type Yield = SandboxEvent;
    type Next = ();
    type Return = ();

    fn next(
        &mut self,
        _value: Option<()>,
    ) -> impl std::future::Future<Output = Result<Option<SandboxEvent>>> + Send + 'static {
        let subscription = self.subscription.clone();
        async move {
            Ok(subscription
                .next()
                .await
                .map(|event| SandboxEvent(event.into_json())))
        }
    }

    fn complete(
        &mut self,
        _value: Option<()>,
    ) -> impl std::future::Future<Output = Result<Option<SandboxEvent>>> + Send + 'static {
        self.subscription.unsubscribe();
        async move { Ok(None) }
    }
}
