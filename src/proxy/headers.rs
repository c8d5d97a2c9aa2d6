//! Header rewriting between the sandbox and the upstream: hop-by-hop stripping (RFC 9110 §7.6.1),
//! method-override and upgrade inspection, override injection (docs/network-access.md), and the
//! host listener's proxy credential.
//!
//! # Security
//! Injection happens after stripping, and replaces every header of that name the sandbox sent, so
//! the sandbox can neither forge nor duplicate an injected credential. Secret values are cloned
//! straight from [`crate::config::Secret::expose`] into the outgoing map and never formatted.

use base64::Engine as _;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::config::{Override, OverrideValue};
use crate::secrets::Table;

/// The user name in the host listener's URL (`http://hive:<token>@…`).
pub const PROXY_USER: &str = "hive";

/// Headers some frameworks read as the method to run instead of the request line's.
const METHOD_OVERRIDE_HEADERS: [&str; 3] = [
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
];

/// The query parameter some frameworks (Rails, Laravel, Express method-override) read likewise.
const METHOD_OVERRIDE_PARAM: &str = "_method";

/// Most override methods taken from one request; more are refused as a whole (a request naming
/// dozens of methods is not a real client).
pub const MAX_OVERRIDE_METHODS: usize = 16;

/// Hop-by-hop headers always removed (besides those the `Connection` header names).
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// Removes hop-by-hop headers in place. With `keep_upgrade`, `Upgrade` and `Connection: upgrade`
/// survive so a WebSocket handshake can be carried to the upstream.
///
/// On every request and response: no header name is built or allocated (the `Connection`
/// values are cheap clones of the parsed bytes, so the map can be changed while reading them).
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let listed: Vec<HeaderValue> = headers
        .get_all(header::CONNECTION)
        .iter()
        .cloned()
        .collect();
    let te_trailers = headers.get_all(header::TE).iter().any(|v| {
        v.to_str().is_ok_and(|s| {
            s.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
        })
    });
    let tokens = listed
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim);
    for token in tokens {
        if keep_upgrade && token.eq_ignore_ascii_case("upgrade") {
            continue;
        }
        // Not a valid header name: names nothing to remove.
        headers.remove(token);
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::UPGRADE);
    }
}

/// Whether a request asks for a protocol upgrade (WebSocket) that the proxy carries through.
pub fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// The methods a request's method-override headers and `_method` query parameters name (values
/// split on `,`, trimmed, percent-decoded for the query); `Err(())` when there are more than
/// [`MAX_OVERRIDE_METHODS`] or one is not valid text.
pub fn override_methods(headers: &HeaderMap, query: Option<&str>) -> Result<Vec<String>, ()> {
    let mut out: Vec<String> = Vec::new();
    let mut push = |m: &str| {
        let m = m.trim();
        if !m.is_empty() && !out.iter().any(|o| o.eq_ignore_ascii_case(m)) {
            out.push(m.to_string());
        }
    };
    for name in METHOD_OVERRIDE_HEADERS {
        for value in headers.get_all(name) {
            let text = value.to_str().map_err(|_| ())?;
            text.split(',').for_each(&mut push);
        }
    }
    for pair in query.unwrap_or("").split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if percent_decode(key).eq_ignore_ascii_case(METHOD_OVERRIDE_PARAM) {
            push(&percent_decode(value));
        }
    }
    if out.len() > MAX_OVERRIDE_METHODS {
        return Err(());
    }
    Ok(out)
}

/// `%XX` decoded and `+` read as a space (form encoding); invalid escapes kept as they are.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The protocols an `Upgrade` header names (`websocket`, `h2c`), lowercased, versions cut.
pub fn upgrade_protocols(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(header::UPGRADE)
        .iter()
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .flat_map(|v| {
            v.split(',')
                .map(|p| {
                    p.split('/')
                        .next()
                        .unwrap_or("")
                        .trim()
                        .to_ascii_lowercase()
                })
                .collect::<Vec<_>>()
        })
        .filter(|p| !p.is_empty())
        .collect()
}

/// Removes an `h2c` upgrade offer (the `Upgrade` header and `HTTP2-Settings`) so the request goes
/// on as plain HTTP/1.1; returns whether there was one.
///
/// # Security
/// After an `h2c` switch the connection carries HTTP/2 frames the proxy would only splice, so
/// every later request on it would reach the upstream undecided.
pub fn strip_h2c(headers: &mut HeaderMap) -> bool {
    if !upgrade_protocols(headers).iter().any(|p| p == "h2c") {
        return false;
    }
    headers.remove(header::UPGRADE);
    headers.remove("http2-settings");
    true
}

/// Sets each override header, replacing any value the sandbox sent (templates rendered with the
/// values in `secrets`); returns the names set.
pub fn inject(headers: &mut HeaderMap, over: &Override, secrets: &Table) -> Vec<HeaderName> {
    let mut names = Vec::with_capacity(over.headers.len());
    for (name, value) in &over.headers {
        let value = override_value(value, secrets);
        // A template always renders (validation checked its names); never forward the sandbox's
        // own value under an override name.
        headers.remove(name);
        if let Some(value) = value {
            headers.insert(name.clone(), value);
            names.push(name.clone());
        }
    }
    names
}

/// The value an override header is sent with: an inline value as it is, a template rendered
/// with the named secrets' values (`None` when it cannot be).
pub fn override_value(value: &OverrideValue, secrets: &Table) -> Option<HeaderValue> {
    match value {
        OverrideValue::Inline(secret) => Some(secret.expose().clone()),
        OverrideValue::Template(template) => template
            .render(|n| secrets.get(n).map(|e| e.value.expose()))
            .map(zeroize::Zeroizing::new)
            .and_then(|text| HeaderValue::from_bytes(text.as_bytes()).ok())
            .map(|mut v| {
                v.set_sensitive(true);
                v
            }),
    }
}

/// The `Proxy-Authorization` value a host listener expects for `token`.
pub fn basic_credential(token: &str) -> HeaderValue {
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{PROXY_USER}:{token}"));
    let mut value = HeaderValue::from_str(&format!("Basic {encoded}"))
        .unwrap_or_else(|_| HeaderValue::from_static("Basic -"));
    value.set_sensitive(true);
    value
}

/// Whether `headers` carry the expected proxy credential (compared in constant time).
pub fn has_credential(headers: &HeaderMap, expected: &HeaderValue) -> bool {
    headers
        .get_all(header::PROXY_AUTHORIZATION)
        .iter()
        .any(|got| credential_matches(got.as_bytes(), expected))
}

/// Whether one `Proxy-Authorization` value is the expected credential (compared in constant
/// time). The scheme name is accepted in any case (`basic`/`BASIC`), as RFC 9110 §11.1 allows.
pub fn credential_matches(got: &[u8], expected: &HeaderValue) -> bool {
    let expected = expected.as_bytes();
    if got.len() != expected.len() {
        return false;
    }
    let scheme = got.len() > 6 && got[..6].eq_ignore_ascii_case(b"basic ");
    let diff = got
        .iter()
        .zip(expected)
        .enumerate()
        .fold(0u8, |acc, (i, (&x, &y))| {
            let x = if scheme && i < 6 { b"Basic "[i] } else { x };
            acc | (x ^ y)
        });
    diff == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        m
    }

    #[test]
    fn strip_hop_by_hop_cases() {
        // (headers in, keep_upgrade, names that must remain, names that must be gone)
        type Case<'a> = (&'a [(&'a str, &'a str)], bool, &'a [&'a str], &'a [&'a str]);
        let cases: [Case; 6] = [
            // the fixed list
            (
                &[
                    ("keep-alive", "5"),
                    ("proxy-authorization", "Basic x"),
                    ("accept", "*/*"),
                ],
                false,
                &["accept"],
                &["keep-alive", "proxy-authorization"],
            ),
            // names listed in Connection
            (
                &[
                    ("connection", "close, x-foo"),
                    ("x-foo", "1"),
                    ("x-bar", "2"),
                ],
                false,
                &["x-bar"],
                &["x-foo", "connection"],
            ),
            // names in any case, with blanks, empty and invalid tokens among them
            (
                &[
                    ("connection", " X-Foo ,, bad name, x(y), KEEP-ALIVE"),
                    ("x-foo", "1"),
                    ("keep-alive", "5"),
                    ("x-bar", "2"),
                ],
                false,
                &["x-bar"],
                &["x-foo", "keep-alive", "connection"],
            ),
            // te: only trailers survives
            (&[("te", "trailers")], false, &["te"], &[]),
            (&[("te", "gzip")], false, &[], &["te"]),
            // websocket handshake keeps upgrade
            (
                &[("connection", "Upgrade"), ("upgrade", "websocket")],
                true,
                &["upgrade", "connection"],
                &[],
            ),
        ];
        for (input, keep, remain, gone) in cases {
            let mut h = map(input);
            strip_hop_by_hop(&mut h, keep);
            for n in remain {
                assert!(h.contains_key(*n), "{n} should remain in {input:?}");
            }
            for n in gone {
                assert!(!h.contains_key(*n), "{n} should be gone from {input:?}");
            }
        }
    }

    #[test]
    fn upgrade_without_keep_is_removed() {
        let mut h = map(&[("connection", "upgrade"), ("upgrade", "websocket")]);
        strip_hop_by_hop(&mut h, false);
        assert!(!h.contains_key("upgrade"));
    }

    #[test]
    fn is_upgrade_cases() {
        let cases: [(&[(&str, &str)], bool); 4] = [
            (&[("connection", "Upgrade"), ("upgrade", "websocket")], true),
            (
                &[
                    ("connection", "keep-alive, upgrade"),
                    ("upgrade", "websocket"),
                ],
                true,
            ),
            (&[("upgrade", "websocket")], false),
            (&[("connection", "upgrade")], false),
        ];
        for (input, want) in cases {
            assert_eq!(is_upgrade(&map(input)), want, "{input:?}");
        }
    }

    #[test]
    fn override_methods_cases() {
        type Case<'a> = (&'a [(&'a str, &'a str)], Option<&'a str>, &'a [&'a str]);
        let cases: [Case; 6] = [
            (&[], None, &[]),
            (&[("x-http-method-override", "DELETE")], None, &["DELETE"]),
            (&[("x-http-method", "put, patch")], None, &["put", "patch"]),
            (
                &[("x-method-override", "GET"), ("x-http-method", "get")],
                None,
                &["get"],
            ),
            (&[], Some("a=1&_method=%44ELETE"), &["DELETE"]),
            (&[], Some("_METHOD=post&x=_method"), &["post"]),
        ];
        for (input, query, want) in cases {
            assert_eq!(
                override_methods(&map(input), query).unwrap(),
                want,
                "{input:?} {query:?}"
            );
        }
        let many: String = (0..=MAX_OVERRIDE_METHODS)
            .map(|i| format!("M{i},"))
            .collect();
        assert!(override_methods(&map(&[("x-http-method", &many)]), None).is_err());
    }

    #[test]
    fn h2c_is_stripped_and_websocket_kept() {
        let mut h = map(&[
            ("connection", "Upgrade, HTTP2-Settings"),
            ("upgrade", "h2c"),
            ("http2-settings", "AA"),
        ]);
        assert!(strip_h2c(&mut h));
        assert!(!h.contains_key("upgrade") && !h.contains_key("http2-settings"));
        let mut h = map(&[("connection", "upgrade"), ("upgrade", "WebSocket")]);
        assert!(!strip_h2c(&mut h));
        assert_eq!(upgrade_protocols(&h), vec!["websocket"]);
        assert_eq!(
            upgrade_protocols(&map(&[("upgrade", "HTTP/2.0, h2c")])),
            vec!["http", "h2c"]
        );
    }

    #[test]
    fn inject_replaces_forged_values() {
        let mut h = map(&[("authorization", "forged"), ("authorization", "forged2")]);
        let over = Override {
            headers: vec![(
                HeaderName::from_static("authorization"),
                OverrideValue::Inline(Secret::new(HeaderValue::from_static("Bearer real"))),
            )],
            allow_plaintext: false,
        };
        let names = inject(&mut h, &over, &Table::default());
        assert_eq!(names, vec![HeaderName::from_static("authorization")]);
        let all: Vec<_> = h.get_all("authorization").iter().collect();
        assert_eq!(all, vec![HeaderValue::from_static("Bearer real")]);
    }

    #[test]
    fn credential_cases() {
        let want = basic_credential("abc");
        let good = base64::engine::general_purpose::STANDARD.encode("hive:abc");
        let cases = [
            (format!("Basic {good}"), true),
            (format!("basic {good}"), true),
            (
                format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode("hive:abd")
                ),
                false,
            ),
            (
                format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode("root:abc")
                ),
                false,
            ),
            ("Bearer abc".to_string(), false),
            (String::new(), false),
        ];
        for (value, ok) in cases {
            let h = map(&[("proxy-authorization", value.as_str())]);
            assert_eq!(has_credential(&h, &want), ok, "{value}");
        }
        assert!(!has_credential(&HeaderMap::new(), &want));
    }
}
