//! The request head the proxy handles itself: authority split and host normalization, the
//! upstream URI, hop-by-hop stripping, upgrade detection, proxy-credential check, path
//! normalization of the request target. Input: `target \n authority \n token \n header lines`.
#![no_main]
use http::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = hive::proxy::fuzzing::looks_like_http(data);
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut lines = text.split('\n');
    let target = lines.next().unwrap_or("");
    let authority = lines.next().unwrap_or("");
    let token = lines.next().unwrap_or("");
    let mut head = HeaderMap::new();
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value.trim()),
        ) {
            head.append(n, v);
        }
    }
    hive::proxy::fuzzing::request_head(target, authority, head, token);
});
