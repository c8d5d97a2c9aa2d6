//! Entry points for the fuzz targets in `fuzz/` (built only with the `fuzzing` feature): the
//! request-head handling the proxy does itself, reached through its private helpers without a
//! socket. Nothing here changes behaviour; each function only calls the real code.

use http::HeaderMap;

use super::headers;
use super::http::split_authority;
use crate::policy::Scheme;

/// Runs one request head through what the proxy checks before forwarding: the authority split and
/// host normalization, the upstream URI it would build, hop-by-hop stripping, the upgrade check
/// and the proxy-credential comparison. Returns nothing; the targets look for panics.
pub fn request_head(target: &str, authority: &str, mut head: HeaderMap, token: &str) {
    if let Some((host, port)) = split_authority(authority) {
        for scheme in [Scheme::Http, Scheme::Https] {
            let port = port.unwrap_or_else(|| super::http::default_port(scheme));
            let _ = super::http::upstream_uri(scheme, &host, port, target);
        }
    }
    let _ = crate::config::normalize_path(target.split('?').next().unwrap_or(""));
    let _ = headers::is_upgrade(&head);
    let expected = headers::basic_credential(token);
    let _ = headers::has_credential(&head, &expected);
    let mut kept = head.clone();
    headers::strip_hop_by_hop(&mut kept, true);
    headers::strip_hop_by_hop(&mut head, false);
}

/// The first-bytes sniff a transparent tunnel uses to tell plaintext HTTP from anything else.
pub fn looks_like_http(prefix: &[u8]) -> bool {
    super::connect::looks_like_http(prefix)
}

/// The lean path's heads ([`super::lean`]): a request head parsed and rewritten for secrets (a
/// named secret `KEY`, its placeholder substituted), a response head filtered and scrubbed.
/// Panics when an output is not a complete head of the same request, or not a response head.
pub fn lean_heads(request: &[u8], response: &[u8]) {
    super::lean::fuzz_heads(request, response, lean_table());
}

/// The placeholder of `KEY` in the table [`lean_heads`] uses (random per process), for targets
/// to put where their input asks for it.
pub fn lean_placeholder() -> String {
    let entry = lean_table().get("KEY").expect("the fuzz table names KEY");
    entry.placeholder.to_string()
}

fn lean_table() -> &'static crate::secrets::Table {
    static TABLE: std::sync::OnceLock<crate::secrets::Table> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        let config = serde_json::json!({
            "egress": [{ "access": "allow", "host": "a.test", "override": {
                "headers": { "x-key": "k {{secrets.KEY}}", "x-inline": "inline-value-0123" },
            } }],
            "secrets": { "KEY": { "value": "named-secret-value", "hosts": ["a.test"] } },
        });
        let config = crate::config::Config::from_json(&config).expect("a valid config");
        crate::secrets::Table::build(&config, &crate::secrets::Placeholders::default())
    })
}
