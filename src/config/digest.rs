//! The content hash of a config as `getConfig()` shows it (docs/audit-log.md#configapplied): the
//! first 16 hex digits of the SHA-256 of its canonical JSON (object keys sorted, no whitespace).
//!
//! # Security
//! The hash is taken over the redacted rendering, so it never depends on a secret's value (a hash
//! of a short token could be brute-forced from the log); two configs differing only in a secret
//! share a hash.

use serde_json::Value;

/// `value` as canonical JSON: keys sorted at every level, no whitespace.
pub fn canonical_json(value: &Value) -> String {
    let mut out = String::new();
    write(value, &mut out);
    out
}

fn write(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (n, key) in keys.into_iter().enumerate() {
                if n > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(key.clone()).to_string());
                out.push(':');
                write(&map[key], out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (n, item) in items.iter().enumerate() {
                if n > 0 {
                    out.push(',');
                }
                write(item, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

/// The short content hash of a rendered (redacted) config.
pub fn content_hash(rendered: &Value) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, canonical_json(rendered).as_bytes());
    digest.as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn key_order_does_not_change_the_hash() {
        let a = json!({ "b": 1, "a": [{ "y": true, "x": null }] });
        let b = json!({ "a": [{ "x": null, "y": true }], "b": 1 });
        assert_eq!(canonical_json(&a), r#"{"a":[{"x":null,"y":true}],"b":1}"#);
        assert_eq!(content_hash(&a), content_hash(&b));
        assert_eq!(content_hash(&a).len(), 16);
        assert_ne!(content_hash(&a), content_hash(&json!({ "b": 2 })));
    }
}
