//! [`Table`]: what the proxy needs to know about secrets for one config in force.

use std::collections::HashMap;
use std::sync::Arc;

use crate::config::{Config, HostPattern, OverrideValue, SecretValue, REDACTED};

use super::placeholder::{is_placeholder, Placeholders, PLACEHOLDER_LEN, PLACEHOLDER_PREFIX};
use super::scrub::Patterns;

/// Shortest inline override value the scrubber looks for: shorter ones (`"1"`, `"yes"`) would
/// match ordinary response text.
const MIN_INLINE_SCRUB: usize = 8;

/// One named secret.
#[derive(Debug)]
pub struct Entry {
    pub name: Arc<str>,
    pub placeholder: Arc<str>,
    pub value: SecretValue,
    /// Where the value may be sent (its `hosts`, or the hosts of the rules that reference it).
    pub hosts: Vec<HostPattern>,
}

impl Entry {
    /// Whether the value may be sent to `host`.
    pub fn allows(&self, host: &str) -> bool {
        let ip = crate::config::host_ip(host);
        self.hosts.iter().any(|h| h.matches(host, ip))
    }
}

/// The secrets of one config, with the placeholders of one sandbox.
#[derive(Debug, Default)]
pub struct Table {
    entries: Vec<Entry>,
    by_placeholder: HashMap<Arc<str>, usize>,
    /// Every value to hide in responses; `None` when there is none.
    patterns: Option<Arc<Patterns>>,
}

impl Table {
    /// Builds the table for `config`, drawing placeholders from `placeholders`.
    pub fn build(config: &Config, placeholders: &Placeholders) -> Table {
        let mut entries = Vec::with_capacity(config.secrets.len());
        for (name, secret) in &config.secrets {
            let hosts = match &secret.hosts {
                Some(hosts) => hosts.clone(),
                None => referencing_hosts(config, name),
            };
            entries.push(Entry {
                name: name.as_str().into(),
                placeholder: placeholders.get(name),
                value: secret.value.clone(),
                hosts,
            });
        }
        let by_placeholder = entries
            .iter()
            .enumerate()
            .map(|(i, e)| (e.placeholder.clone(), i))
            .collect();
        let mut items: Vec<(&[u8], &[u8], Arc<str>)> = entries
            .iter()
            .map(|e| {
                (
                    e.value.expose().as_bytes(),
                    e.placeholder.as_bytes(),
                    e.name.clone(),
                )
            })
            .collect();
        for rule in &config.egress {
            for (header, value) in rule.override_.iter().flat_map(|o| &o.headers) {
                if let OverrideValue::Inline(secret) = value {
                    let bytes = secret.expose().as_bytes();
                    if bytes.len() >= MIN_INLINE_SCRUB {
                        let label: Arc<str> = format!("header:{}", header.as_str()).into();
                        items.push((bytes, REDACTED.as_bytes(), label));
                    }
                }
            }
        }
        let patterns = Patterns::new(items).map(Arc::new);
        Table {
            entries,
            by_placeholder,
            patterns,
        }
    }

    /// Whether there are no named secrets (nothing to substitute or block).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Every named secret.
    pub fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.entries.iter()
    }

    /// The entry of `name`.
    pub fn get(&self, name: &str) -> Option<&Entry> {
        self.entries.iter().find(|e| &*e.name == name)
    }

    /// The placeholder of `name`, for rendering `env`.
    pub fn placeholder(&self, name: &str) -> Option<&str> {
        self.get(name).map(|e| &*e.placeholder)
    }

    /// The patterns responses are scrubbed with.
    pub fn patterns(&self) -> Option<&Arc<Patterns>> {
        self.patterns.as_ref()
    }

    /// Every placeholder of this table in `text`: (start offset, entry).
    pub fn find<'a>(&'a self, text: &'a [u8]) -> impl Iterator<Item = (usize, &'a Entry)> + 'a {
        let prefix = PLACEHOLDER_PREFIX.as_bytes();
        let mut from = 0;
        std::iter::from_fn(move || {
            while from + PLACEHOLDER_LEN <= text.len() {
                let at = from + find_bytes(&text[from..], prefix)?;
                from = at + 1;
                let candidate = text.get(at..at + PLACEHOLDER_LEN)?;
                if !is_placeholder(candidate) {
                    continue;
                }
                // Placeholders are ASCII, so this is valid UTF-8.
                let key = std::str::from_utf8(candidate).ok()?;
                if let Some(&i) = self.by_placeholder.get(key) {
                    from = at + PLACEHOLDER_LEN;
                    return Some((at, &self.entries[i]));
                }
            }
            None
        })
    }
}

/// The hosts of the allow rules whose override references `name`.
fn referencing_hosts(config: &Config, name: &str) -> Vec<HostPattern> {
    config
        .egress
        .iter()
        .filter(|rule| {
            rule.override_.as_ref().is_some_and(|o| {
                o.headers.iter().any(|(_, v)| match v {
                    OverrideValue::Template(t) => t.secret_names().any(|n| n == name),
                    OverrideValue::Inline(_) => false,
                })
            })
        })
        .map(|rule| rule.host.clone())
        .collect()
}

/// Where `needle` first occurs in `hay`.
pub(crate) fn find_bytes(hay: &[u8], needle: &[u8]) -> Option<usize> {
    let first = *needle.first()?;
    let mut from = 0;
    while from + needle.len() <= hay.len() {
        let at = from + hay[from..].iter().position(|&b| b == first)?;
        if hay[at..].starts_with(needle) {
            return Some(at);
        }
        from = at + 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn table() -> (Table, Config) {
        let config = Config::from_json(&json!({
            "secrets": { "A": "value-of-a-123", "B": { "value": "value-of-b-456", "hosts": ["*.b.com"] } },
            "egress": [
                { "access": "allow", "host": "api.a.com", "override": { "headers": { "X-A": "k {{secrets.A}}", "X-I": "inline-secret-1" } } },
                { "access": "allow", "host": "*" },
            ],
        }))
        .unwrap();
        (Table::build(&config, &Placeholders::default()), config)
    }

    #[test]
    fn hosts_default_to_referencing_rules() {
        let (t, _) = table();
        let (a, b) = (t.get("A").unwrap(), t.get("B").unwrap());
        let cases = [
            (a, "api.a.com", true),
            (a, "other.com", false),
            (b, "x.b.com", true),
            (b, "b.com", true),
            (b, "api.a.com", false),
        ];
        for (entry, host, want) in cases {
            assert_eq!(entry.allows(host), want, "{} {host}", entry.name);
        }
    }

    #[test]
    fn finds_placeholders() {
        let (t, _) = table();
        let (pa, pb) = (
            t.placeholder("A").unwrap().to_string(),
            t.placeholder("B").unwrap().to_string(),
        );
        let text = format!("x{pa}y hive_ph_short {pb}{pa} hive_ph_{}", "a".repeat(32));
        let found: Vec<(usize, &str)> = t
            .find(text.as_bytes())
            .map(|(at, e)| (at, &*e.name))
            .collect();
        assert_eq!(
            found,
            vec![(1, "A"), (1 + 40 + 16, "B"), (1 + 40 + 16 + 40, "A")]
        );
    }

    #[test]
    fn scrubs_named_and_long_inline_values() {
        let (t, _) = table();
        let p = t.patterns().unwrap();
        let mut counts = vec![0; p.len()];
        let out = p.replace_all(
            b"value-of-a-123 inline-secret-1 value-of-b-456",
            &mut counts,
        );
        let want = format!(
            "{} [redacted] {}",
            t.placeholder("A").unwrap(),
            t.placeholder("B").unwrap()
        );
        assert_eq!(out, want.as_bytes());
    }
}
