//! The lean path's heads: a request head parsed and rewritten for secrets (placeholders
//! substituted, an override's header replaced, `Accept-Encoding` narrowed), a response head
//! filtered and scrubbed; each output must parse again as one complete head of the same request
//! (or a response head). Input: `request head \0\0 response head`; `{PH}` stands for the secret's
//! placeholder (random per process).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let placeholder = hive::proxy::fuzzing::lean_placeholder();
    let data = replace(data, b"{PH}", placeholder.as_bytes());
    let (request, response) = match data.windows(2).position(|w| w == b"\0\0") {
        Some(at) => (&data[..at], &data[at + 2..]),
        None => (&data[..], &[][..]),
    };
    hive::proxy::fuzzing::lean_heads(request, response);
});

fn replace(data: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len());
    let mut at = 0;
    while at < data.len() {
        if data[at..].starts_with(from) {
            out.extend_from_slice(to);
            at += from.len();
        } else {
            out.push(data[at]);
            at += 1;
        }
    }
    out
}
