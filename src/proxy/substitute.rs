//! The request side of named secrets (docs/secrets.md#placeholders): placeholders in an allowed
//! request are replaced by their values where the secret may go, and a request that carries a
//! placeholder anywhere else is refused before anything is sent.
//!
//! How a request is handled, after the policy allowed it:
//! 1. Every header value and the URL are searched for placeholders: as they are, percent-decoded,
//!    and inside the base64 of `Authorization: Basic` (git and other clients put a password
//!    there).
//! 2. A placeholder of a secret that may not go to this host, or that would leave over plain HTTP
//!    without the rule's `allowPlaintext`, refuses the request (`403`, `secret.blocked`).
//! 3. Otherwise each placeholder is replaced by the value: in header values (and inside a Basic
//!    credential, re-encoded) and in the query (percent-encoded).
//! 4. When some secret may not go to this host, the first [`BODY_SCAN_BYTES`] of the body are
//!    read before forwarding and searched too; the bytes read are then sent on unchanged.
//!
//! # Security
//! A placeholder is not the secret, but one seen on the way to another host means code inside is
//! trying to use the secret where it was not meant to go; refusing makes that visible and keeps
//! the upstream from learning the token. The value itself is only ever written into the outgoing
//! request, never formatted or logged.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use base64::Engine as _;
use bytes::Bytes;
use http::header::{HeaderMap, HeaderValue};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use serde_json::{json, Map};
use zeroize::Zeroizing;

use crate::config::{Override, OverrideValue};
use crate::events::{kind, EventBus};
use crate::secrets::{Entry, Table};

/// The `egress.request` reason of a request refused for carrying a placeholder.
pub const SECRET_BLOCKED: &str = "secret-blocked";

/// How much of a request body is searched for placeholders.
pub const BODY_SCAN_BYTES: usize = 64 * 1024;

/// A refused request: which secret, and where its placeholder was seen (`header`, `url`, `body`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blocked {
    pub secret: Arc<str>,
    pub place: &'static str,
}

/// Everything above for one allowed request: checks and rewrites the head, searches the body
/// where needed, and on a refusal emits `secret.blocked`. Returns whether a value was
/// substituted, and the body to forward.
#[allow(clippy::too_many_arguments)]
pub async fn outgoing<B>(
    table: &Table,
    events: &EventBus,
    host: &str,
    may_send: bool,
    headers: &mut HeaderMap,
    path_and_query: &mut String,
    body: B,
) -> Result<(bool, Prefixed<B>), ()>
where
    B: Body<Data = Bytes> + Unpin,
{
    let checked = match head(table, host, may_send, headers, path_and_query) {
        Ok(substituted) if body_needs_scan(table, host, may_send) => {
            self::body(table, host, may_send, body)
                .await
                .map(|b| (substituted, b))
        }
        Ok(substituted) => Ok((substituted, Prefixed::whole(body))),
        Err(blocked) => Err(blocked),
    };
    checked.map_err(|blocked| report_blocked(events, host, &blocked))
}

/// Emits the `secret.blocked` event of a request refused for carrying a placeholder.
pub fn report_blocked(events: &EventBus, host: &str, blocked: &Blocked) {
    let mut fields = Map::new();
    fields.insert("secret".into(), json!(&*blocked.secret));
    fields.insert("host".into(), json!(host));
    fields.insert("where".into(), json!(blocked.place));
    events.emit(kind::SECRET_BLOCKED, fields);
}

/// Checks that every secret an override template of the deciding rule references may go to
/// `host`: a secret's `hosts` bounds where its value is ever sent, even through a rule whose host
/// pattern is wider. On a refusal emits `secret.blocked` (`where: "override"`).
pub fn check_override(
    table: &Table,
    events: &EventBus,
    over: &Override,
    host: &str,
) -> Result<(), ()> {
    let names = over.headers.iter().flat_map(|(_, value)| match value {
        OverrideValue::Template(t) => t.secret_names().collect::<Vec<_>>(),
        OverrideValue::Inline(_) => Vec::new(),
    });
    for name in names {
        if let Some(entry) = table.get(name).filter(|e| !e.allows(host)) {
            let mut fields = Map::new();
            fields.insert("secret".into(), json!(&*entry.name));
            fields.insert("host".into(), json!(host));
            fields.insert("where".into(), json!("override"));
            events.emit(kind::SECRET_BLOCKED, fields);
            return Err(());
        }
    }
    Ok(())
}

/// Checks and rewrites the head of an allowed request to `host`. `may_send`: the request leaves
/// over TLS, or its rule allows plaintext credentials. Returns whether a value was substituted.
pub fn head(
    table: &Table,
    host: &str,
    may_send: bool,
    headers: &mut HeaderMap,
    path_and_query: &mut String,
) -> Result<bool, Blocked> {
    let values = headers.values().map(HeaderValue::as_bytes);
    if !find_placeholders(table, host, may_send, values, path_and_query)? {
        return Ok(false);
    }
    // 3: substitute.
    for value in headers.values_mut() {
        if let Some(new) = substitute_header(table, value.as_bytes()) {
            if let Ok(mut v) = HeaderValue::from_bytes(&new) {
                v.set_sensitive(true);
                *value = v;
            }
        }
    }
    if let Some(new) = substitute_target(table, path_and_query) {
        *path_and_query = new.to_string();
    }
    Ok(true)
}

/// Steps 1-2 over a request's header values and its path and query: whether a placeholder is
/// there to substitute, or the first that may not go to `host`.
pub fn find_placeholders<'a>(
    table: &Table,
    host: &str,
    may_send: bool,
    values: impl Iterator<Item = &'a [u8]>,
    path_and_query: &str,
) -> Result<bool, Blocked> {
    if table.is_empty() {
        return Ok(false);
    }
    let allowed = |e: &Entry| may_send && e.allows(host);
    let mut wanted = false;
    let mut check = |text: &[u8], place: &'static str| -> Result<(), Blocked> {
        for form in forms(text) {
            for (_, entry) in table.find(&form) {
                if !allowed(entry) {
                    return Err(Blocked {
                        secret: entry.name.clone(),
                        place,
                    });
                }
                wanted = true;
            }
        }
        Ok(())
    };
    for value in values {
        check(value, "header")?;
    }
    check(path_and_query.as_bytes(), "url")?;
    Ok(wanted)
}

/// `path_and_query` with the placeholders of its query replaced; `None` if unchanged.
pub fn substitute_target(table: &Table, path_and_query: &str) -> Option<Zeroizing<String>> {
    let (path, query) = path_and_query.split_once('?')?;
    let query = substitute_query(table, query)?;
    Some(Zeroizing::new(format!("{path}?{}", query.as_str())))
}

/// Whether the body must be searched: some secret may not go to `host`.
pub fn body_needs_scan(table: &Table, host: &str, may_send: bool) -> bool {
    table.entries().any(|e| !(may_send && e.allows(host)))
}

/// Refuses the first [`BODY_SCAN_BYTES`] of a body (`seen`) if they hold a placeholder of a
/// secret that may not go to `host`.
pub fn check_body(table: &Table, host: &str, may_send: bool, seen: &[u8]) -> Result<(), Blocked> {
    for (_, entry) in table.find(seen) {
        if !(may_send && entry.allows(host)) {
            return Err(Blocked {
                secret: entry.name.clone(),
                place: "body",
            });
        }
    }
    Ok(())
}

/// Reads up to [`BODY_SCAN_BYTES`] of `body` and refuses it if they hold a placeholder of a
/// secret that may not go to `host`; otherwise returns the body with the bytes read put back.
pub async fn body<B>(
    table: &Table,
    host: &str,
    may_send: bool,
    mut body: B,
) -> Result<Prefixed<B>, Blocked>
where
    B: Body<Data = Bytes> + Unpin,
{
    let mut prefix = VecDeque::new();
    let mut seen = Vec::new();
    let mut error = None;
    let mut ended = body.is_end_stream();
    while !ended && seen.len() < BODY_SCAN_BYTES {
        match body.frame().await {
            None => ended = true,
            Some(Err(e)) => {
                error = Some(e);
                break;
            }
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    let room = BODY_SCAN_BYTES - seen.len();
                    seen.extend_from_slice(&data[..data.len().min(room)]);
                }
                prefix.push_back(frame);
            }
        }
    }
    check_body(table, host, may_send, &seen)?;
    Ok(Prefixed {
        prefix,
        error,
        rest: (!ended).then_some(body),
    })
}

/// A body whose first frames were read ahead (for [`body`]), followed by the rest.
pub struct Prefixed<B: Body> {
    prefix: VecDeque<Frame<Bytes>>,
    error: Option<B::Error>,
    rest: Option<B>,
}

impl<B: Body> Prefixed<B> {
    /// The body untouched.
    pub fn whole(body: B) -> Self {
        Prefixed {
            prefix: VecDeque::new(),
            error: None,
            rest: Some(body),
        }
    }

    /// A body of `frames` alone.
    pub fn frames(frames: VecDeque<Frame<Bytes>>) -> Self {
        Prefixed {
            prefix: frames,
            error: None,
            rest: None,
        }
    }

    /// A copy of every frame, when the whole body is in memory: read to its end, without an
    /// error.
    pub fn copy_whole(&self) -> Option<VecDeque<Frame<Bytes>>> {
        let ended = self.rest.as_ref().is_none_or(|r| r.is_end_stream());
        (ended && self.error.is_none()).then(|| super::resend::copy(&self.prefix))
    }
}

impl<B> Prefixed<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Unpin,
{
    /// Reads the rest of a body whose stated length is at most `max` bytes into memory, waiting
    /// at most `wait` for it; what was read by then stays ahead of the rest. Bodies without a
    /// stated length, or longer, are left to stream.
    pub async fn read_ahead(&mut self, max: u64, wait: std::time::Duration) {
        if Body::size_hint(self).exact().is_none_or(|n| n > max) {
            return;
        }
        let by = tokio::time::Instant::now() + wait;
        while let Some(rest) = self.rest.as_mut().filter(|r| !r.is_end_stream()) {
            match tokio::time::timeout_at(by, rest.frame()).await {
                Err(_) => return,
                Ok(None) => self.rest = None,
                Ok(Some(Err(e))) => {
                    self.error = Some(e);
                    self.rest = None;
                }
                Ok(Some(Ok(frame))) => self.prefix.push_back(frame),
            }
        }
    }
}

impl<B> Body for Prefixed<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        if let Some(frame) = this.prefix.pop_front() {
            return Poll::Ready(Some(Ok(frame)));
        }
        if let Some(e) = this.error.take() {
            this.rest = None;
            return Poll::Ready(Some(Err(e)));
        }
        match &mut this.rest {
            Some(rest) => Pin::new(rest).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_empty()
            && self.error.is_none()
            && self.rest.as_ref().is_none_or(|r| r.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        let ahead: u64 = self
            .prefix
            .iter()
            .filter_map(|f| f.data_ref())
            .map(|d| d.len() as u64)
            .sum();
        match &self.rest {
            None => SizeHint::with_exact(ahead),
            Some(rest) => {
                let inner = rest.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(inner.lower() + ahead);
                if let Some(upper) = inner.upper() {
                    hint.set_upper(upper + ahead);
                }
                hint
            }
        }
    }
}

/// The forms of `text` a placeholder may hide in: as is, percent-decoded, and the decoded
/// credential of a `Basic` scheme.
fn forms(text: &[u8]) -> Vec<std::borrow::Cow<'_, [u8]>> {
    let mut out = vec![std::borrow::Cow::Borrowed(text)];
    if text.contains(&b'%') {
        out.push(percent_decode(text).into());
    }
    if let Some(decoded) = basic_credential(text) {
        if decoded.contains(&b'%') {
            out.push(percent_decode(&decoded).into());
        }
        out.push(decoded.to_vec().into());
    }
    out
}

/// The decoded credential of `Basic <base64>`, if `text` is one.
fn basic_credential(text: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
    let rest = text
        .get(..6)?
        .eq_ignore_ascii_case(b"basic ")
        .then(|| &text[6..])?;
    base64::engine::general_purpose::STANDARD
        .decode(rest.trim_ascii())
        .ok()
        .map(Zeroizing::new)
}

/// `value` with every placeholder replaced (inside a Basic credential too); `None` if unchanged.
pub fn substitute_header(table: &Table, value: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
    if let Some(decoded) = basic_credential(value) {
        let replaced = replace(table, &decoded, |e| e.value.expose().as_bytes().to_vec())?;
        let encoded = base64::engine::general_purpose::STANDARD.encode(&*replaced);
        let mut out = Zeroizing::new(value[..6].to_vec());
        out.extend_from_slice(encoded.as_bytes());
        return Some(out);
    }
    replace(table, value, |e| e.value.expose().as_bytes().to_vec())
}

/// `query` with each placeholder replaced by the percent-encoded value, also where the
/// placeholder itself was percent-encoded; `None` if unchanged.
fn substitute_query(table: &Table, query: &str) -> Option<Zeroizing<String>> {
    let mut changed = false;
    let mut out = Zeroizing::new(String::with_capacity(query.len() + 64));
    for (i, pair) in query.split('&').enumerate() {
        if i > 0 {
            out.push('&');
        }
        let (key, value) = match pair.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (pair, None),
        };
        for (j, part) in std::iter::once(key).chain(value).enumerate() {
            if j == 1 {
                out.push('=');
            }
            let raw = replace(table, part.as_bytes(), |e| {
                percent_encode(e.value.expose().as_bytes()).into_bytes()
            });
            let decoded = (raw.is_none() && part.contains('%'))
                .then(|| percent_decode(part.as_bytes()))
                .and_then(|d| replace(table, &d, |e| e.value.expose().as_bytes().to_vec()))
                .map(|d| Zeroizing::new(percent_encode(&d).into_bytes()));
            match raw.or(decoded) {
                Some(new) => {
                    changed = true;
                    out.push_str(&String::from_utf8_lossy(&new));
                }
                None => out.push_str(part),
            }
        }
    }
    changed.then_some(out)
}

/// `text` with each placeholder replaced by `with(entry)`; `None` if there was none.
fn replace(
    table: &Table,
    text: &[u8],
    with: impl Fn(&Entry) -> Vec<u8>,
) -> Option<Zeroizing<Vec<u8>>> {
    let mut out = Zeroizing::new(Vec::with_capacity(text.len() + 64));
    let mut at = 0;
    for (start, entry) in table.find(text) {
        out.extend_from_slice(&text[at..start]);
        out.extend_from_slice(&Zeroizing::new(with(entry)));
        at = start + crate::secrets::PLACEHOLDER_LEN;
    }
    if at == 0 {
        return None;
    }
    out.extend_from_slice(&text[at..]);
    Some(out)
}

/// `%XX` decoded (`+` kept: in a query it may be a space or a plus, and placeholders hold none).
fn percent_decode(text: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    let mut i = 0;
    while i < text.len() {
        let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
        if text[i] == b'%' && i + 2 < text.len() {
            if let (Some(h), Some(l)) = (hex(text[i + 1]), hex(text[i + 2])) {
                out.push(h << 4 | l);
                i += 3;
                continue;
            }
        }
        out.push(text[i]);
        i += 1;
    }
    out
}

/// Every byte but RFC 3986 unreserved characters percent-encoded.
fn percent_encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 3);
    for &b in bytes {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::secrets::Placeholders;
    use serde_json::json;

    const VALUE: &str = "sk-live value/1+2";

    fn table() -> Table {
        let config = Config::from_json(&json!({
            "secrets": {
                "OPENAI_KEY": { "value": VALUE, "hosts": ["api.openai.com"] },
                "GH": { "value": "ghp_0123456789", "hosts": ["github.com"] },
            },
        }))
        .unwrap();
        Table::build(&config, &Placeholders::default())
    }

    fn headers(pairs: &[(&str, String)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| {
                (
                    http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    HeaderValue::from_str(v).unwrap(),
                )
            })
            .collect()
    }

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    #[test]
    fn substitutes_for_allowed_hosts() {
        let t = table();
        let ph = t.placeholder("OPENAI_KEY").unwrap().to_string();
        let gh = t.placeholder("GH").unwrap().to_string();
        let encoded_ph = ph.replace('_', "%5F");
        // (host, header pairs, url, expected headers, expected url)
        type Case = (
            &'static str,
            Vec<(&'static str, String)>,
            String,
            Vec<(&'static str, String)>,
            String,
        );
        let cases: Vec<Case> = vec![
            (
                "api.openai.com",
                vec![("authorization", format!("Bearer {ph}"))],
                "/v1/models".into(),
                vec![("authorization", format!("Bearer {VALUE}"))],
                "/v1/models".into(),
            ),
            (
                "api.openai.com",
                vec![],
                format!("/v1?key={ph}&x=1"),
                vec![],
                "/v1?key=sk-live%20value%2F1%2B2&x=1".into(),
            ),
            (
                "api.openai.com",
                vec![],
                format!("/v1?key={encoded_ph}"),
                vec![],
                "/v1?key=sk-live%20value%2F1%2B2".into(),
            ),
            (
                "github.com",
                vec![(
                    "authorization",
                    format!("Basic {}", b64(&format!("x-access-token:{gh}"))),
                )],
                "/o/r.git/info/refs".into(),
                vec![(
                    "authorization",
                    format!("Basic {}", b64("x-access-token:ghp_0123456789")),
                )],
                "/o/r.git/info/refs".into(),
            ),
            (
                "example.com",
                vec![("accept", "hive_ph_notaplaceholder".into())],
                "/".into(),
                vec![("accept", "hive_ph_notaplaceholder".into())],
                "/".into(),
            ),
        ];
        for (host, hin, url, hout, url_out) in cases {
            let mut h = headers(&hin);
            let mut u = url.clone();
            head(&t, host, true, &mut h, &mut u).unwrap();
            assert_eq!(h, headers(&hout), "{host} {hin:?}");
            assert_eq!(u, url_out, "{host} {url}");
        }
    }

    #[test]
    fn blocks_other_hosts_and_plaintext() {
        let t = table();
        let ph = t.placeholder("OPENAI_KEY").unwrap().to_string();
        let blocked = |place| {
            Err(Blocked {
                secret: "OPENAI_KEY".into(),
                place,
            })
        };
        // (host, may_send, headers, url, expected)
        type Case<'a> = (
            &'a str,
            bool,
            Vec<(&'a str, String)>,
            String,
            Result<bool, Blocked>,
        );
        let cases: Vec<Case> = vec![
            (
                "evil.com",
                true,
                vec![("authorization", format!("Bearer {ph}"))],
                "/".into(),
                blocked("header"),
            ),
            (
                "evil.com",
                true,
                vec![],
                format!("/x?k={ph}"),
                blocked("url"),
            ),
            ("evil.com", true, vec![], format!("/{ph}"), blocked("url")),
            (
                "evil.com",
                true,
                vec![],
                format!("/x?k={}", ph.replace('_', "%5f")),
                blocked("url"),
            ),
            (
                "evil.com",
                true,
                vec![(
                    "authorization",
                    format!("Basic {}", b64(&format!("u:{ph}"))),
                )],
                "/".into(),
                blocked("header"),
            ),
            (
                "evil.com",
                true,
                vec![("cookie", format!("k={}", ph.replace('_', "%5F")))],
                "/".into(),
                blocked("header"),
            ),
            (
                "api.openai.com",
                false,
                vec![("authorization", format!("Bearer {ph}"))],
                "/".into(),
                blocked("header"),
            ),
            (
                "evil.com",
                true,
                vec![("authorization", "Bearer other".into())],
                "/".into(),
                Ok(false),
            ),
        ];
        for (host, may_send, hin, url, want) in cases {
            let mut h = headers(&hin);
            let mut u = url.clone();
            assert_eq!(
                head(&t, host, may_send, &mut h, &mut u),
                want,
                "{host} {hin:?} {url}"
            );
        }
    }

    #[tokio::test]
    async fn body_prefix_is_searched_and_kept() {
        let t = table();
        let ph = t.placeholder("OPENAI_KEY").unwrap().to_string();
        let chunks = |parts: Vec<String>| Chunks(parts.into_iter().map(Bytes::from).collect());
        // Found after a split: the prefix is searched whole.
        let split = ph.len() / 2;
        let got = body(
            &t,
            "evil.com",
            true,
            chunks(vec![format!("a={}", &ph[..split]), ph[split..].to_string()]),
        )
        .await;
        assert_eq!(
            got.err(),
            Some(Blocked {
                secret: "OPENAI_KEY".into(),
                place: "body"
            })
        );
        // Past 64 KiB: not searched, and everything is delivered.
        let filler = "x".repeat(BODY_SCAN_BYTES);
        let got = body(
            &t,
            "evil.com",
            true,
            chunks(vec![filler.clone(), ph.clone()]),
        )
        .await
        .unwrap();
        let all = got.collect().await.unwrap().to_bytes();
        assert_eq!(all.len(), filler.len() + ph.len());
        // Allowed host: the body is not refused.
        assert!(body(&t, "api.openai.com", true, chunks(vec![ph.clone()]))
            .await
            .is_ok());
    }

    /// A body of the given chunks.
    struct Chunks(VecDeque<Bytes>);

    impl Body for Chunks {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            Poll::Ready(self.0.pop_front().map(|b| Ok(Frame::data(b))))
        }
    }
}
