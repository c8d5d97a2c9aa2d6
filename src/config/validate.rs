//! JSON -> [`Config`]: walks the raw value by hand and collects every problem with its field path.
//!
//! How it works:
//! 1. each method of [`Validator`] takes a value and its JS-style path (`egress[2].ports[0]`),
//!    records an issue for everything wrong with it, and returns the typed value only when it is
//!    whole (`None` otherwise, so one bad field never hides the others);
//! 2. objects are checked against their list of known keys first, so a typo (`method`) is an error
//!    with a "did you mean" hint rather than a silently ignored field;
//! 3. checks that span entries (overlapping mounts, repeated header names or resolve keys) run after
//!    the entries themselves;
//! 4. at the end, any issue fails the whole config: nothing partially valid is ever returned.
//!
//! # Security
//! Override header values are secrets: no message here ever includes one, not even on a type error
//! (a numeric token would be a secret too). PEM strings are never echoed either, in case one holds a
//! private key. Other user strings are JSON-quoted and shortened by [`quote`].

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Map, Value};

use super::host::quote;
use super::{
    normalize_host, AuditRetention, Config, EgressRule, FsAccess, FsAcl, FsBackend, FsMount,
    HostPattern, Limits, Mode, NamedSecret, Override, OverrideValue, PathGlob, RuleAccess, Secret,
    SecretValue, Template, TlsMode, Upstream, REDACTED,
};
use crate::error::{ConfigIssue, HiveError, Result};

/// Keys of the root object.
const ROOT_KEYS: &[&str] = &[
    "fs", "egress", "upstream", "audit", "limits", "mode", "secrets", "env",
];
/// Keys of a `secrets` entry given as an object.
const SECRET_KEYS: &[&str] = &["value", "hosts"];
/// Keys of `audit`.
const AUDIT_KEYS: &[&str] = &["maxBytes", "keep"];
/// Keys of `limits`.
const LIMIT_KEYS: &[&str] = &[
    "memoryBytes",
    "pids",
    "cpus",
    "openFiles",
    "fileSizeBytes",
    "diskBytes",
];
/// Keys of an egress rule.
const RULE_KEYS: &[&str] = &[
    "access", "host", "ports", "methods", "paths", "override", "mode", "tls",
];
/// Keys of an egress rule's `override`.
const OVERRIDE_KEYS: &[&str] = &["headers", "allowPlaintext"];
/// Keys of `upstream`.
const UPSTREAM_KEYS: &[&str] = &["resolve", "ca", "connectTimeoutMs", "responseTimeoutMs"];
/// Keys of an `fs` entry.
const FS_KEYS: &[&str] = &["backend", "mount", "source", "acls", "audit"];
/// Keys of an ACL entry.
const ACL_KEYS: &[&str] = &["path", "access"];

/// Header names an override may not set: framing and hop-by-hop headers (RFC 9110 §7.6.1), which
/// the proxy owns. `proxy-*` is checked by prefix.
const FORBIDDEN_HEADERS: &[&str] = &[
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "upgrade",
];

/// First path segments a mount may not use: the read-only system view and the sandbox's own
/// `/proc`, `/dev`, `/sys` (docs/security.md). `lib*` is checked by prefix.
const RESERVED_MOUNT_ROOTS: &[&str] = &["proc", "dev", "sys", "usr", "bin", "sbin", "etc"];

/// Validates a whole config (see [`Config::from_json`]).
pub(super) fn config(value: &Value, previous: Option<&Config>) -> Result<Config> {
    let mut v = Validator {
        previous: previous.map(|p| p.secrets.clone()).unwrap_or_default(),
        ..Validator::default()
    };
    let config = v.root(value);
    match config {
        Some(config) if v.issues.is_empty() => Ok(config),
        _ => Err(HiveError::InvalidConfig(v.issues)),
    }
}

/// Collects the issues of one config as it is walked.
#[derive(Default)]
struct Validator {
    issues: Vec<ConfigIssue>,
    /// The secrets in force, whose values `"[redacted]"` keeps (empty for a new sandbox).
    previous: BTreeMap<String, NamedSecret>,
    /// The names under `secrets` (valid or not), for checking template references.
    secret_names: BTreeSet<String>,
}

impl Validator {
    fn issue(&mut self, path: &str, message: impl Into<String>) {
        self.issues.push(ConfigIssue::new(path, message));
    }

    /// `value` as an object whose keys are all in `known`; each unknown key is an issue.
    fn object<'a>(
        &mut self,
        value: &'a Value,
        path: &str,
        what: &str,
        known: &[&str],
    ) -> Option<&'a Map<String, Value>> {
        let Value::Object(map) = value else {
            self.issue(path, format!("expected {what}, got {}", type_name(value)));
            return None;
        };
        for key in map.keys() {
            if !known.contains(&key.as_str()) {
                let hint = match suggest(key, known) {
                    Some(near) => format!("did you mean {near:?}? "),
                    None => String::new(),
                };
                self.issue(
                    &key_path(path, key),
                    format!("unknown key; {hint}expected one of: {}", known.join(", ")),
                );
            }
        }
        Some(map)
    }

    /// A required key: missing or `null` is an issue.
    fn required<'a>(
        &mut self,
        map: &'a Map<String, Value>,
        path: &str,
        key: &str,
        hint: &str,
    ) -> Option<&'a Value> {
        let value = optional(map, key);
        if value.is_none() {
            self.issue(&key_path(path, key), format!("missing; {hint}"));
        }
        value
    }

    fn string<'a>(&mut self, value: &'a Value, path: &str, what: &str) -> Option<&'a str> {
        match value {
            Value::String(s) => Some(s),
            other => {
                self.issue(path, format!("expected {what}, got {}", type_name(other)));
                None
            }
        }
    }

    fn boolean(&mut self, value: &Value, path: &str) -> Option<bool> {
        match value {
            Value::Bool(b) => Some(*b),
            other => {
                self.issue(
                    path,
                    format!("expected true or false, got {}", type_name(other)),
                );
                None
            }
        }
    }

    /// A non-empty array, each element parsed by `each`; `None` if anything failed.
    fn list<T>(
        &mut self,
        value: &Value,
        path: &str,
        what: &str,
        if_empty: &str,
        mut each: impl FnMut(&mut Self, &Value, &str) -> Option<T>,
    ) -> Option<Vec<T>> {
        let Value::Array(items) = value else {
            self.issue(
                path,
                format!("expected an array of {what}, got {}", type_name(value)),
            );
            return None;
        };
        if items.is_empty() && !if_empty.is_empty() {
            self.issue(
                path,
                format!("expected at least one of {what}, got an empty array; {if_empty}"),
            );
            return None;
        }
        let mut out = Vec::with_capacity(items.len());
        let mut ok = true;
        for (i, item) in items.iter().enumerate() {
            match each(self, item, &format!("{path}[{i}]")) {
                Some(x) => out.push(x),
                None => ok = false,
            }
        }
        ok.then_some(out)
    }

    fn root(&mut self, value: &Value) -> Option<Config> {
        if value.is_null() {
            return Some(Config::default());
        }
        let map = self.object(
            value,
            "",
            "an object (the sandbox config) or null",
            ROOT_KEYS,
        )?;
        let secrets = match optional(map, "secrets") {
            Some(v) => self.secrets(v, "secrets"),
            None => Some(BTreeMap::new()),
        };
        let fs = match optional(map, "fs") {
            Some(v) => self.fs(v, "fs"),
            None => Some(Vec::new()),
        };
        let egress = match optional(map, "egress") {
            Some(v) => self.list(v, "egress", "egress rules", "", Self::egress_rule),
            None => Some(Vec::new()),
        };
        let upstream = match optional(map, "upstream") {
            Some(v) => self.upstream(v, "upstream"),
            None => Some(Upstream::default()),
        };
        let audit = match optional(map, "audit") {
            Some(v) => self.audit(v, "audit"),
            None => Some(AuditRetention::default()),
        };
        let limits = match optional(map, "limits") {
            Some(v) => self.limits(v, "limits"),
            None => Some(Limits::default()),
        };
        let mode = match optional(map, "mode") {
            Some(v) => self.mode(v, "mode"),
            None => Some(Mode::default()),
        };
        let env = match optional(map, "env") {
            Some(v) => self.env(v, "env"),
            None => Some(Vec::new()),
        };
        let (secrets, egress, env) = (secrets?, egress?, env?);
        self.check_secret_reach(&secrets, &egress, &env);
        Some(Config {
            fs: fs?,
            egress,
            upstream: upstream?,
            audit: audit?,
            limits: limits?,
            mode: mode?,
            secrets,
            env,
        })
    }

    // ---- limits -------------------------------------------------------------------------------

    fn limits(&mut self, value: &Value, path: &str) -> Option<Limits> {
        let map = self.object(
            value,
            path,
            "an object such as { memoryBytes: 536870912, pids: 256 }",
            LIMIT_KEYS,
        )?;
        let mut ok = true;
        let mut count = |v: &mut Self, key: &str, min: u64, unit: &str| -> Option<u64> {
            let raw = optional(map, key)?;
            let got = v.integer(raw, &key_path(path, key), min, unit);
            ok &= got.is_some();
            got
        };
        let memory_bytes = count(self, "memoryBytes", 1 << 20, "bytes (at least 1 MiB)");
        let pids = count(self, "pids", 8, "processes (at least 8)");
        let open_files = count(self, "openFiles", 16, "file descriptors (at least 16)");
        let file_size_bytes = count(self, "fileSizeBytes", 1, "bytes");
        let disk_bytes = count(self, "diskBytes", 1 << 20, "bytes (at least 1 MiB)");
        let cpus = optional(map, "cpus").and_then(|raw| {
            let at = key_path(path, "cpus");
            let got = match raw {
                Value::Number(n) => n.as_f64().filter(|f| (0.01..=1024.0).contains(f)),
                _ => None,
            };
            if got.is_none() {
                let shown = match raw {
                    Value::Number(n) => show_number(n),
                    other => type_name(other).to_owned(),
                };
                self.issue(
                    &at,
                    format!("expected a number of CPUs from 0.01 to 1024 (1.5 = one and a half cores), got {shown}"),
                );
                ok = false;
            }
            got
        });
        ok.then_some(Limits {
            memory_bytes,
            pids,
            cpus,
            open_files,
            file_size_bytes,
            disk_bytes,
        })
    }

    /// A whole number from `min` to 2^53 (JS's largest exact integer).
    fn integer(&mut self, value: &Value, path: &str, min: u64, unit: &str) -> Option<u64> {
        const MAX: u64 = 1 << 53;
        let got = match value {
            Value::Number(n) => match (n.as_u64(), n.as_f64()) {
                (Some(u), _) => Some(u),
                (None, Some(f)) if f.fract() == 0.0 && (0.0..=MAX as f64).contains(&f) => {
                    Some(f as u64)
                }
                _ => None,
            },
            _ => None,
        };
        match got {
            Some(n) if (min..=MAX).contains(&n) => Some(n),
            _ => {
                let shown = match value {
                    Value::Number(n) => show_number(n),
                    other => type_name(other).to_owned(),
                };
                self.issue(
                    path,
                    format!(
                        "expected a whole number of {unit}, got {shown}; omit it for the default"
                    ),
                );
                None
            }
        }
    }

    // ---- egress -------------------------------------------------------------------------------

    fn egress_rule(&mut self, value: &Value, path: &str) -> Option<EgressRule> {
        let map = self.object(
            value,
            path,
            "an egress rule object such as { access: \"allow\", host: \"api.example.com\" }",
            RULE_KEYS,
        )?;
        let access = self
            .required(map, path, "access", "set \"allow\" or \"deny\"")
            .and_then(|v| self.rule_access(v, &key_path(path, "access")));
        let host = self
            .required(
                map,
                path,
                "host",
                "set a hostname, *.domain, *, an IP address or a CIDR block",
            )
            .and_then(|v| {
                let at = key_path(path, "host");
                let raw = self.string(v, &at, "a host string")?;
                HostPattern::parse(raw).map_err(|m| self.issue(&at, m)).ok()
            });
        let ports = self.optional_list(
            map,
            path,
            "ports",
            "ports",
            "omit ports to allow any port",
            Self::port,
        );
        let methods = self.optional_list(
            map,
            path,
            "methods",
            "HTTP methods",
            "omit methods to allow any method",
            Self::method,
        );
        let paths = self.optional_list(
            map,
            path,
            "paths",
            "path globs",
            "omit paths to allow any path",
            |v, item, at| {
                let raw = v.string(item, at, "a path glob string such as \"/v1/**\"")?;
                PathGlob::parse(raw).map_err(|m| v.issue(at, m)).ok()
            },
        );
        let override_ = match optional(map, "override") {
            None => Some(None),
            Some(o) => {
                let at = key_path(path, "override");
                if access == Some(RuleAccess::Deny) {
                    self.issue(
                        &at,
                        "override is only allowed on allow rules; remove it or set access to \"allow\"",
                    );
                    None
                } else {
                    self.override_(o, &at).map(Some)
                }
            }
        };
        let mode = match optional(map, "mode") {
            None => Some(None),
            Some(v) => self.mode(v, &key_path(path, "mode")).map(Some),
        };
        let tls = optional(map, "tls").map_or(Some(TlsMode::Intercept), |v| {
            self.tls_mode(v, &key_path(path, "tls"))
        });
        let tls = tls.and_then(|tls| self.passthrough_rule(map, path, tls, access).then_some(tls));
        Some(EgressRule {
            access: access?,
            host: host?,
            ports: ports?,
            methods: methods?,
            paths: paths?,
            override_: override_?,
            mode: mode?,
            tls: tls?,
        })
    }

    /// `"enforce"` or `"report"` (docs/network-access.md#report-mode).
    fn mode(&mut self, value: &Value, path: &str) -> Option<Mode> {
        match value.as_str() {
            Some("enforce") => Some(Mode::Enforce),
            Some("report") => Some(Mode::Report),
            _ => {
                self.issue(
                    path,
                    format!(
                        "expected \"enforce\" or \"report\", got {}; omit it to enforce",
                        value
                    ),
                );
                None
            }
        }
    }

    fn tls_mode(&mut self, value: &Value, path: &str) -> Option<TlsMode> {
        const EXPECTED: &str = "expected \"intercept\" or \"passthrough\"";
        match value {
            Value::String(s) if s == "intercept" => Some(TlsMode::Intercept),
            Value::String(s) if s == "passthrough" => Some(TlsMode::Passthrough),
            Value::String(s) => {
                self.issue(path, format!("{EXPECTED}, got {}", quote(s)));
                None
            }
            other => {
                self.issue(path, format!("{EXPECTED}, got {}", type_name(other)));
                None
            }
        }
    }

    /// Whether a `tls: "passthrough"` rule is consistent: only on allow rules, and without what
    /// only an opened stream could enforce (docs/network-access.md#tls-passthrough).
    fn passthrough_rule(
        &mut self,
        map: &Map<String, Value>,
        path: &str,
        tls: TlsMode,
        access: Option<RuleAccess>,
    ) -> bool {
        if tls != TlsMode::Passthrough {
            return true;
        }
        let mut ok = true;
        if access == Some(RuleAccess::Deny) {
            self.issue(
                &key_path(path, "tls"),
                "tls: \"passthrough\" is only for allow rules (a deny rule opens nothing); remove tls",
            );
            ok = false;
        }
        for key in ["methods", "paths", "override"] {
            if optional(map, key).is_some() {
                self.issue(
                    &key_path(path, key),
                    format!(
                        "a tls: \"passthrough\" rule relays encrypted bytes hive cannot read, so it cannot \
                         check or change {}; remove {key}, or use tls: \"intercept\" (the default)",
                        match key {
                            "methods" => "methods",
                            "paths" => "paths",
                            _ => "headers",
                        }
                    ),
                );
                ok = false;
            }
        }
        ok
    }

    /// An optional non-empty list under `key`: `Some(None)` when absent, `None` on error.
    #[allow(clippy::too_many_arguments)]
    fn optional_list<T>(
        &mut self,
        map: &Map<String, Value>,
        path: &str,
        key: &str,
        what: &str,
        if_empty: &str,
        each: impl FnMut(&mut Self, &Value, &str) -> Option<T>,
    ) -> Option<Option<Vec<T>>> {
        match optional(map, key) {
            None => Some(None),
            Some(v) => self
                .list(v, &key_path(path, key), what, if_empty, each)
                .map(Some),
        }
    }

    fn rule_access(&mut self, value: &Value, path: &str) -> Option<RuleAccess> {
        match value {
            Value::String(s) if s == "allow" => Some(RuleAccess::Allow),
            Value::String(s) if s == "deny" => Some(RuleAccess::Deny),
            Value::String(s) => {
                self.issue(
                    path,
                    format!("expected \"allow\" or \"deny\", got {}", quote(s)),
                );
                None
            }
            other => {
                self.issue(
                    path,
                    format!("expected \"allow\" or \"deny\", got {}", type_name(other)),
                );
                None
            }
        }
    }

    fn port(&mut self, value: &Value, path: &str) -> Option<u16> {
        const EXPECTED: &str = "expected an integer from 1 to 65535";
        let Value::Number(n) = value else {
            self.issue(path, format!("{EXPECTED}, got {}", type_name(value)));
            return None;
        };
        let port = match (n.as_u64(), n.as_f64()) {
            (Some(u), _) => u16::try_from(u).ok(),
            // JS numbers may arrive as floats; 443.0 is the integer 443.
            (None, Some(f)) if f.fract() == 0.0 && (1.0..=65535.0).contains(&f) => Some(f as u16),
            _ => None,
        };
        match port {
            Some(p) if p >= 1 => Some(p),
            _ => {
                self.issue(path, format!("{EXPECTED}, got {}", show_number(n)));
                None
            }
        }
    }

    fn method(&mut self, value: &Value, path: &str) -> Option<String> {
        let raw = self.string(value, path, "an HTTP method name such as \"GET\"")?;
        if raw.is_empty() || !raw.bytes().all(is_tchar) {
            self.issue(
                path,
                format!(
                    "expected an HTTP method name such as \"GET\" (letters, no spaces), got {}",
                    quote(raw)
                ),
            );
            return None;
        }
        Some(raw.to_ascii_uppercase())
    }

    fn override_(&mut self, value: &Value, path: &str) -> Option<Override> {
        let map = self.object(
            value,
            path,
            "an object such as { headers: { \"Authorization\": \"Bearer …\" } }",
            OVERRIDE_KEYS,
        )?;
        let headers = self
            .required(
                map,
                path,
                "headers",
                "give the headers to set, e.g. { \"Authorization\": \"Bearer …\" }",
            )
            .and_then(|v| self.headers(v, &key_path(path, "headers")));
        let allow_plaintext = match optional(map, "allowPlaintext") {
            None => Some(false),
            Some(v) => self.boolean(v, &key_path(path, "allowPlaintext")),
        };
        Some(Override {
            headers: headers?,
            allow_plaintext: allow_plaintext?,
        })
    }

    /// Override headers: `{ name: value }`. Never puts a value into a message.
    fn headers(
        &mut self,
        value: &Value,
        path: &str,
    ) -> Option<Vec<(http::HeaderName, OverrideValue)>> {
        let Value::Object(map) = value else {
            self.issue(
                path,
                format!(
                    "expected an object of header names to values, got {}",
                    type_name(value)
                ),
            );
            return None;
        };
        if map.is_empty() {
            self.issue(
                path,
                "expected at least one header; remove override if no header is needed",
            );
            return None;
        }
        let mut out: Vec<(http::HeaderName, OverrideValue)> = Vec::with_capacity(map.len());
        let mut ok = true;
        for (name, value) in map {
            let at = map_path(path, name);
            let header = self.header_name(name, &at);
            let secret = self.header_value(value, &at);
            match (header, secret) {
                (Some(h), Some(s)) => {
                    if out.iter().any(|(seen, _)| *seen == h) {
                        self.issue(&at, format!("header {} is given twice (names are case-insensitive); give it once", h));
                        ok = false;
                    } else {
                        out.push((h, s));
                    }
                }
                _ => ok = false,
            }
        }
        ok.then_some(out)
    }

    fn header_name(&mut self, name: &str, path: &str) -> Option<http::HeaderName> {
        let Ok(header) = http::HeaderName::from_bytes(name.as_bytes()) else {
            self.issue(path, "not a valid header name (letters, digits and !#$%&'*+-.^_`|~, no spaces or colons)");
            return None;
        };
        let lower = header.as_str();
        if FORBIDDEN_HEADERS.contains(&lower) || lower.starts_with("proxy-") {
            self.issue(
                path,
                format!(
                    "header {name} cannot be overridden: the proxy owns Host, framing (Content-Length, \
                     Transfer-Encoding), hop-by-hop (Connection, Keep-Alive, TE, Trailer, Upgrade) and \
                     Proxy-* headers; remove it"
                ),
            );
            return None;
        }
        Some(header)
    }

    /// # Security
    /// The value is a secret: every message below is fixed text.
    fn header_value(&mut self, value: &Value, path: &str) -> Option<OverrideValue> {
        let Value::String(raw) = value else {
            self.issue(
                path,
                format!(
                    "expected the header value as a string, got {}",
                    type_name(value)
                ),
            );
            return None;
        };
        if raw == REDACTED {
            self.issue(
                path,
                "is the \"[redacted]\" marker that getConfig() returns in place of a secret; pass the \
                 secret value again",
            );
            return None;
        }
        if raw.contains(['\r', '\n', '\0']) {
            self.issue(
                path,
                "the value contains CR, LF or NUL, which could inject other headers; remove them (a \
                 trailing newline read from a file or environment variable?)",
            );
            return None;
        }
        if raw.chars().any(|c| c.is_control() && c != '\t') {
            self.issue(path, "the value contains a control character; remove it");
            return None;
        }
        if raw.contains("{{") {
            let template = self.template(raw, path)?;
            if !template.is_plain() {
                return Some(OverrideValue::Template(template));
            }
        }
        match http::HeaderValue::from_bytes(raw.as_bytes()) {
            Ok(v) => Some(OverrideValue::Inline(Secret::new(v))),
            Err(_) => {
                self.issue(path, "the value is not a valid header value");
                None
            }
        }
    }

    // ---- secrets ------------------------------------------------------------------------------

    /// `secrets: { NAME: "value" | { value, hosts? } }`.
    ///
    /// # Security
    /// Values are secrets: every message is fixed text, and `"[redacted]"` is accepted only for a
    /// name whose value is already in force (which it keeps).
    fn secrets(&mut self, value: &Value, path: &str) -> Option<BTreeMap<String, NamedSecret>> {
        let Value::Object(map) = value else {
            self.issue(
                path,
                format!(
                    "expected an object of secret names to values, such as {{ OPENAI_KEY: \"sk-…\" }}, got {}",
                    type_name(value)
                ),
            );
            return None;
        };
        let mut out = BTreeMap::new();
        let mut ok = true;
        for (name, entry) in map {
            self.secret_names.insert(name.clone());
            let at = map_path(path, name);
            if !super::is_secret_name(name) {
                self.issue(
                    &at,
                    "not a valid secret name: use A-Z, 0-9 and _, starting with a letter (e.g. OPENAI_KEY)",
                );
                ok = false;
                continue;
            }
            let (raw, hosts, value_at) = match entry {
                Value::Object(_) => {
                    let Some(obj) = self.object(
                        entry,
                        &at,
                        "a secret value or { value, hosts }",
                        SECRET_KEYS,
                    ) else {
                        ok = false;
                        continue;
                    };
                    let hosts = self.optional_list(
                        obj,
                        &at,
                        "hosts",
                        "host patterns",
                        "omit hosts to allow the hosts of the rules that reference the secret",
                        |v, item, p| {
                            let raw = v.string(item, p, "a host string")?;
                            HostPattern::parse(raw).map_err(|m| v.issue(p, m)).ok()
                        },
                    );
                    let raw = self.required(obj, &at, "value", "give the secret's value");
                    (raw, hosts, key_path(&at, "value"))
                }
                other => (Some(other), Some(None), at.clone()),
            };
            let value = raw.and_then(|raw| self.secret_value(raw, name, &value_at));
            match (value, hosts) {
                (Some(value), Some(hosts)) => {
                    out.insert(name.clone(), NamedSecret { value, hosts });
                }
                _ => ok = false,
            }
        }
        ok.then_some(out)
    }

    /// # Security
    /// The value is a secret: every message below is fixed text.
    fn secret_value(&mut self, value: &Value, name: &str, path: &str) -> Option<SecretValue> {
        const MIN: usize = 8;
        const MAX: usize = 8 * 1024;
        let Value::String(raw) = value else {
            self.issue(
                path,
                format!(
                    "expected the secret's value as a string, got {}",
                    type_name(value)
                ),
            );
            return None;
        };
        if raw == REDACTED {
            if let Some(kept) = self.previous.get(name) {
                return Some(kept.value.clone());
            }
            self.issue(
                path,
                "is the \"[redacted]\" marker that getConfig() returns in place of a secret, but no \
                 secret of this name is in force to keep; pass the secret value",
            );
            return None;
        }
        if raw.chars().any(|c| c.is_control()) {
            self.issue(
                path,
                "the value contains CR, LF, NUL or another control character, which cannot go into a \
                 header; remove them (a trailing newline read from a file or environment variable?)",
            );
            return None;
        }
        if raw.len() < MIN || raw.len() > MAX {
            self.issue(
                path,
                format!(
                    "a secret must be {MIN} to {MAX} bytes long (a shorter one cannot be told apart \
                     from ordinary response text when responses are scrubbed)"
                ),
            );
            return None;
        }
        Some(SecretValue::new(raw.clone()))
    }

    /// A template in an override header value or an env value: every name it references must be
    /// under `secrets`.
    fn template(&mut self, raw: &str, path: &str) -> Option<Template> {
        let template = Template::parse(raw).map_err(|m| self.issue(path, m)).ok()?;
        let mut ok = true;
        for name in template.secret_names() {
            if !self.secret_names.contains(name) {
                self.issue(
                    path,
                    format!("references {{{{secrets.{name}}}}}, which is not under secrets; add it there or fix the name"),
                );
                ok = false;
            }
        }
        ok.then_some(template)
    }

    /// `env: { NAME: "value" }` for every process.
    fn env(&mut self, value: &Value, path: &str) -> Option<Vec<(String, Template)>> {
        let Value::Object(map) = value else {
            self.issue(
                path,
                format!(
                    "expected an object of variable names to values, got {}",
                    type_name(value)
                ),
            );
            return None;
        };
        let mut out = Vec::with_capacity(map.len());
        let mut ok = true;
        for (name, entry) in map {
            let at = map_path(path, name);
            if name.is_empty() || name.contains(['=', '\0']) {
                self.issue(&at, "not a valid variable name (no = or NUL, not empty)");
                ok = false;
                continue;
            }
            let Some(raw) = self.string(entry, &at, "the variable's value as a string") else {
                ok = false;
                continue;
            };
            if raw.contains('\0') {
                self.issue(&at, "the value contains NUL; remove it");
                ok = false;
                continue;
            }
            match self.template(raw, &at) {
                Some(t) => out.push((name.clone(), t)),
                None => ok = false,
            }
        }
        ok.then_some(out)
    }

    /// A secret whose placeholder is handed out through `env` must be allowed somewhere: with no
    /// `hosts` and no override referencing it, every request carrying it would be refused.
    fn check_secret_reach(
        &mut self,
        secrets: &BTreeMap<String, NamedSecret>,
        egress: &[EgressRule],
        env: &[(String, Template)],
    ) {
        for (var, template) in env {
            for name in template.secret_names() {
                let Some(secret) = secrets.get(name) else {
                    continue;
                };
                let referenced = egress.iter().any(|rule| {
                    rule.override_.as_ref().is_some_and(|o| {
                        o.headers.iter().any(|(_, v)| match v {
                            OverrideValue::Template(t) => t.secret_names().any(|n| n == name),
                            OverrideValue::Inline(_) => false,
                        })
                    })
                });
                if secret.hosts.is_none() && !referenced {
                    self.issue(
                        &map_path("env", var),
                        format!(
                            "secret {name} may be sent to no host: give secrets.{name}.hosts (e.g. \
                             [\"api.openai.com\"]) or reference it from an override header"
                        ),
                    );
                }
            }
        }
    }

    // ---- audit --------------------------------------------------------------------------------

    fn audit(&mut self, value: &Value, path: &str) -> Option<AuditRetention> {
        let map = self.object(
            value,
            path,
            "an object such as { maxBytes: 67108864, keep: 1 }",
            AUDIT_KEYS,
        )?;
        let max_bytes = match optional(map, "maxBytes") {
            None => Some(AuditRetention::DEFAULT_MAX_BYTES),
            Some(v) => self.integer_in(
                v,
                &key_path(path, "maxBytes"),
                AuditRetention::MIN_MAX_BYTES,
                1 << 53,
                "the size in bytes at which audit.jsonl is rotated",
            ),
        };
        let keep = match optional(map, "keep") {
            None => Some(AuditRetention::DEFAULT_KEEP),
            Some(v) => self
                .integer_in(
                    v,
                    &key_path(path, "keep"),
                    0,
                    u64::from(AuditRetention::MAX_KEEP),
                    "how many rotated files to keep",
                )
                .map(|k| k as u32),
        };
        Some(AuditRetention {
            max_bytes: max_bytes?,
            keep: keep?,
        })
    }

    /// An integer in `min..=max` (JS numbers may arrive as floats: `2.0` is the integer 2).
    fn integer_in(
        &mut self,
        value: &Value,
        path: &str,
        min: u64,
        max: u64,
        what: &str,
    ) -> Option<u64> {
        let expected = format!("expected an integer from {min} to {max} ({what})");
        let Value::Number(n) = value else {
            self.issue(path, format!("{expected}, got {}", type_name(value)));
            return None;
        };
        let int = match (n.as_u64(), n.as_f64()) {
            (Some(u), _) => Some(u),
            (None, Some(f)) if f.fract() == 0.0 && f >= 0.0 && f <= max as f64 => Some(f as u64),
            _ => None,
        };
        match int {
            Some(i) if (min..=max).contains(&i) => Some(i),
            _ => {
                self.issue(path, format!("{expected}, got {}", show_number(n)));
                None
            }
        }
    }

    // ---- upstream -----------------------------------------------------------------------------

    fn upstream(&mut self, value: &Value, path: &str) -> Option<Upstream> {
        let map = self.object(
            value,
            path,
            "an object such as { resolve: {…}, ca: [\"-----BEGIN CERTIFICATE-----…\"] }",
            UPSTREAM_KEYS,
        )?;
        let resolve = match optional(map, "resolve") {
            None => Some(HashMap::new()),
            Some(v) => self.resolve(v, &key_path(path, "resolve")),
        };
        let ca = match optional(map, "ca") {
            None => Some(Vec::new()),
            Some(v) => self.list(
                v,
                &key_path(path, "ca"),
                "PEM certificate strings",
                "",
                Self::ca_pem,
            ),
        };
        let mut timeout = |key: &str, default: Duration| match optional(map, key) {
            None => Some(default),
            Some(v) => self
                .integer_in(
                    v,
                    &key_path(path, key),
                    1,
                    Upstream::MAX_TIMEOUT_MS,
                    "milliseconds",
                )
                .map(Duration::from_millis),
        };
        let connect_timeout = timeout("connectTimeoutMs", Upstream::DEFAULT_CONNECT_TIMEOUT);
        let response_timeout = timeout("responseTimeoutMs", Upstream::DEFAULT_RESPONSE_TIMEOUT);
        Some(Upstream {
            resolve: resolve?,
            ca: ca?,
            connect_timeout: connect_timeout?,
            response_timeout: response_timeout?,
        })
    }

    fn resolve(&mut self, value: &Value, path: &str) -> Option<HashMap<(String, u16), SocketAddr>> {
        let Value::Object(map) = value else {
            self.issue(
                path,
                format!(
                    "expected an object mapping \"host:port\" to \"ip:port\", got {}",
                    type_name(value)
                ),
            );
            return None;
        };
        let mut out = HashMap::with_capacity(map.len());
        let mut ok = true;
        for (key, target) in map {
            let at = map_path(path, key);
            let from = parse_resolve_key(key).map_err(|m| self.issue(&at, m)).ok();
            let to = match target {
                Value::String(s) => match s.parse::<SocketAddr>() {
                    Ok(addr) if addr.port() != 0 => Some(addr),
                    _ => {
                        self.issue(
                            &at,
                            format!(
                                "expected \"ip:port\" such as \"127.0.0.1:8443\" or \"[::1]:8443\", got {}",
                                quote(s)
                            ),
                        );
                        None
                    }
                },
                other => {
                    self.issue(
                        &at,
                        format!("expected an \"ip:port\" string, got {}", type_name(other)),
                    );
                    None
                }
            };
            match (from, to) {
                (Some(from), Some(to)) => match out.entry(from) {
                    Entry::Occupied(_) => {
                        self.issue(
                            &at,
                            "names the same host and port as another key (hosts are \
                             case-insensitive); give it once",
                        );
                        ok = false;
                    }
                    Entry::Vacant(slot) => {
                        slot.insert(to);
                    }
                },
                _ => ok = false,
            }
        }
        ok.then_some(out)
    }

    /// # Security
    /// PEM text is never echoed (it might be a private key pasted by mistake).
    fn ca_pem(&mut self, value: &Value, path: &str) -> Option<String> {
        let pem = self.string(value, path, "a PEM certificate string")?;
        let mut certs = Vec::new();
        let mut has_key = false;
        let mut reader = pem.as_bytes();
        for item in rustls_pemfile::read_all(&mut reader) {
            match item {
                Ok(rustls_pemfile::Item::X509Certificate(der)) => certs.push(der),
                Ok(rustls_pemfile::Item::Pkcs1Key(_))
                | Ok(rustls_pemfile::Item::Pkcs8Key(_))
                | Ok(rustls_pemfile::Item::Sec1Key(_)) => has_key = true,
                Ok(_) => {}
                Err(_) => {
                    self.issue(path, "is not valid PEM; pass the certificate as text starting with -----BEGIN CERTIFICATE-----");
                    return None;
                }
            }
        }
        if has_key {
            self.issue(path, "holds a private key; pass only the CA certificate, and keep the key out of the config");
            return None;
        }
        if certs.is_empty() {
            self.issue(
                path,
                "holds no certificate; pass PEM text with a -----BEGIN CERTIFICATE----- block",
            );
            return None;
        }
        let mut store = rustls::RootCertStore::empty();
        for (i, der) in certs.into_iter().enumerate() {
            if store.add(der).is_err() {
                self.issue(path, format!("certificate #{} in the PEM text could not be parsed as an X.509 CA certificate", i + 1));
                return None;
            }
        }
        Some(pem.to_string())
    }

    // ---- fs -----------------------------------------------------------------------------------

    fn fs(&mut self, value: &Value, path: &str) -> Option<Vec<FsMount>> {
        let Value::Array(items) = value else {
            self.issue(
                path,
                format!("expected an array of mounts, got {}", type_name(value)),
            );
            return None;
        };
        let mut out = Vec::with_capacity(items.len());
        let mut ok = true;
        // Valid mount points so far, for the overlap check: (index, mount).
        let mut seen: Vec<(usize, String)> = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let at = format!("{path}[{i}]");
            let mount = self.fs_mount(item, &at);
            let mount_point = match &mount {
                Some(m) => Some(m.mount.clone()),
                // Still check overlaps of a mount whose other fields were wrong.
                None => item
                    .get("mount")
                    .and_then(Value::as_str)
                    .and_then(|m| normalize_mount(m).ok()),
            };
            if let Some(point) = mount_point {
                if let Some((j, other)) = seen.iter().find(|(_, other)| overlaps(other, &point)) {
                    self.issue(
                        &format!("{at}.mount"),
                        format!(
                            "{} overlaps fs[{j}].mount {}; mount points may not be equal or nested",
                            quote(&point),
                            quote(other)
                        ),
                    );
                    ok = false;
                }
                seen.push((i, point));
            }
            match mount {
                Some(m) => out.push(m),
                None => ok = false,
            }
        }
        ok.then_some(out)
    }

    fn fs_mount(&mut self, value: &Value, path: &str) -> Option<FsMount> {
        let map = self.object(
            value,
            path,
            "a mount object such as { backend: \"local\", mount: \"/workspace\" }",
            FS_KEYS,
        )?;
        let backend = self
            .required(map, path, "backend", "set backend: \"local\"")
            .and_then(|v| {
                let at = key_path(path, "backend");
                match self.string(v, &at, "\"local\"")? {
                    "local" => Some(FsBackend::Local),
                    other => {
                        self.issue(
                            &at,
                            format!(
                                "unknown backend {}; the only backend is \"local\"",
                                quote(other)
                            ),
                        );
                        None
                    }
                }
            });
        let mount = self
            .required(
                map,
                path,
                "mount",
                "set the absolute path inside the sandbox, e.g. \"/workspace\"",
            )
            .and_then(|v| {
                let at = key_path(path, "mount");
                let raw = self.string(v, &at, "an absolute path such as \"/workspace\"")?;
                normalize_mount(raw).map_err(|m| self.issue(&at, m)).ok()
            });
        let source = match optional(map, "source") {
            None => Some(None),
            Some(v) => {
                let at = key_path(path, "source");
                self.string(v, &at, "an absolute host path")
                    .and_then(|raw| {
                        if !raw.starts_with('/') || raw.contains('\0') {
                            self.issue(
                                &at,
                                format!(
                                    "expected an absolute host directory path, got {}",
                                    quote(raw)
                                ),
                            );
                            None
                        } else {
                            Some(Some(PathBuf::from(raw)))
                        }
                    })
            }
        };
        let acls = match optional(map, "acls") {
            None => Some(None),
            Some(v) => {
                let at = key_path(path, "acls");
                let mount = mount.as_deref();
                self.list(v, &at, "ACL entries", "", |s, item, p| {
                    s.fs_acl(item, p, mount)
                })
                .map(Some)
            }
        };
        let audit = match optional(map, "audit") {
            None => Some(false),
            Some(v) => self.boolean(v, &key_path(path, "audit")),
        };
        Some(FsMount {
            backend: backend?,
            mount: mount?,
            source: source?,
            acls: acls?,
            audit: audit?,
        })
    }

    /// One ACL entry; `mount` (when valid) is the mount point its path must lie under.
    fn fs_acl(&mut self, value: &Value, path: &str, mount: Option<&str>) -> Option<FsAcl> {
        let map = self.object(
            value,
            path,
            "an ACL object such as { path: \"/workspace/**\", access: \"rw\" }",
            ACL_KEYS,
        )?;
        let glob = self.required(map, path, "path", "set a path glob such as \"/workspace/**\"").and_then(|v| {
            let at = key_path(path, "path");
            let raw = self.string(v, &at, "a path glob string such as \"/workspace/**\"")?;
            let glob = PathGlob::parse(raw).map_err(|m| self.issue(&at, m)).ok()?;
            if let Some(mount) = mount {
                if !(raw == mount || raw.strip_prefix(mount).is_some_and(|rest| rest.starts_with('/'))) {
                    self.issue(
                        &at,
                        format!(
                            "{} is outside its mount {}; ACL paths must lie under the mount, e.g. \"{mount}/**\"",
                            quote(raw),
                            quote(mount)
                        ),
                    );
                    return None;
                }
            }
            Some(glob)
        });
        let access = self
            .required(map, path, "access", "set \"rw\", \"r\" or \"none\"")
            .and_then(|v| {
                let at = key_path(path, "access");
                match v.as_str() {
                    Some("rw") => Some(FsAccess::Rw),
                    Some("r") => Some(FsAccess::R),
                    Some("none") => Some(FsAccess::None),
                    Some(other) => {
                        self.issue(
                            &at,
                            format!("expected \"rw\", \"r\" or \"none\", got {}", quote(other)),
                        );
                        None
                    }
                    None => {
                        self.issue(
                            &at,
                            format!("expected \"rw\", \"r\" or \"none\", got {}", type_name(v)),
                        );
                        None
                    }
                }
            });
        Some(FsAcl {
            path: glob?,
            access: access?,
        })
    }
}

/// An optional key: absent and `null` are both `None`.
fn optional<'a>(map: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    map.get(key).filter(|v| !v.is_null())
}

/// `parent.key`, or `parent["key"]` when the key is not an identifier.
fn key_path(parent: &str, key: &str) -> String {
    let ident = key
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == '$')
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$');
    match (ident, parent.is_empty()) {
        (true, true) => key.to_string(),
        (true, false) => format!("{parent}.{key}"),
        (false, _) => map_path(parent, key),
    }
}

/// `parent["key"]`, for keys that are data (header names, resolve entries).
fn map_path(parent: &str, key: &str) -> String {
    format!("{parent}[{}]", Value::String(key.to_string()))
}

/// The JSON type of a value, for "expected …, got …" messages. Never the value itself.
fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A known key close to an unknown one (a typo or a case slip), for the hint.
fn suggest<'a>(key: &str, known: &[&'a str]) -> Option<&'a str> {
    known
        .iter()
        .map(|k| {
            (
                edit_distance(&key.to_ascii_lowercase(), &k.to_ascii_lowercase()),
                *k,
            )
        })
        .filter(|(d, k)| *d <= 2 && *d < k.len())
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

/// A number as JS would print it: `70000`, not `70000.0` (JS numbers may arrive as floats).
fn show_number(n: &serde_json::Number) -> String {
    match n.as_f64() {
        Some(f) if n.is_f64() && f.fract() == 0.0 && f.abs() < 1e15 => format!("{}", f as i64),
        _ => n.to_string(),
    }
}

/// RFC 9110 `tchar`: what a method or header name may hold.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// `"host:port"` of `upstream.resolve`: IPv6 hosts in brackets, host normalized.
fn parse_resolve_key(key: &str) -> Result<(String, u16), String> {
    let bad = || {
        format!(
            "expected a \"host:port\" key such as \"api.example.com:443\" or \"[::1]:443\", got {}",
            quote(key)
        )
    };
    let (host, port) = key.rsplit_once(':').ok_or_else(bad)?;
    if host.contains(':') && !host.starts_with('[') {
        return Err(format!("{}; write IPv6 hosts in brackets", bad()));
    }
    let port = match port.parse::<u16>() {
        Ok(p) if p != 0 && port.bytes().all(|b| b.is_ascii_digit()) => p,
        _ => {
            return Err(format!(
                "{}; the port must be an integer from 1 to 65535",
                bad()
            ))
        }
    };
    let host = normalize_host(host)
        .ok_or_else(|| format!("{}; the host is not a valid hostname or IP address", bad()))?;
    Ok((host, port))
}

/// An `fs[].mount`: absolute, normalized (`//` and `.` removed, no trailing `/`), not `/`, not a
/// system directory.
fn normalize_mount(raw: &str) -> Result<String, String> {
    if !raw.starts_with('/') {
        return Err(format!(
            "expected an absolute path inside the sandbox such as \"/workspace\", got {}",
            quote(raw)
        ));
    }
    if raw.chars().any(|c| c.is_control() || c == '*') {
        return Err(format!(
            "{} contains a control character or *; use a plain directory path",
            quote(raw)
        ));
    }
    let mut out = String::with_capacity(raw.len());
    for seg in raw.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                return Err(format!(
                    "{} contains ..; write the path without it",
                    quote(raw)
                ))
            }
            seg => {
                out.push('/');
                out.push_str(seg);
            }
        }
    }
    let Some(first) = out.split('/').nth(1) else {
        return Err("cannot mount over /; choose a directory such as \"/workspace\"".into());
    };
    if RESERVED_MOUNT_ROOTS.contains(&first) || first.starts_with("lib") {
        return Err(format!(
            "{} is inside a system directory (/proc, /dev, /sys, /usr, /bin, /sbin, /lib*, /etc) that \
             the sandbox gets from the host or the kernel; choose another path such as \"/workspace\"",
            quote(&out)
        ));
    }
    Ok(out)
}

/// Whether two normalized mount points are equal or one lies inside the other.
fn overlaps(a: &str, b: &str) -> bool {
    let nested = |outer: &str, inner: &str| {
        inner
            .strip_prefix(outer)
            .is_some_and(|r| r.starts_with('/'))
    };
    a == b || nested(a, b) || nested(b, a)
}

#[cfg(test)]
#[rustfmt::skip]
mod tests {
    use super::*;
    use serde_json::json;

    fn issues(value: Value) -> Vec<ConfigIssue> {
        match Config::from_json(&value) {
            Ok(c) => panic!("expected an error for {value}, got {c:?}"),
            Err(e) => {
                assert_eq!(e.code(), crate::error::ErrorCode::InvalidConfig);
                e.issues().to_vec()
            }
        }
    }

    // Every fixture in the shared file fails with an issue at exactly its path.
    #[test]
    fn invalid_config_fixtures() {
        let fixtures: Value =
            serde_json::from_str(include_str!("../../__test__/fixtures/invalid-configs.json"))
                .unwrap();
        let fixtures = fixtures.as_array().unwrap();
        assert!(fixtures.len() >= 30, "only {} fixtures", fixtures.len());
        let mut names = std::collections::HashSet::new();
        for f in fixtures {
            let name = f["name"].as_str().unwrap();
            assert!(names.insert(name), "duplicate fixture name {name}");
            let path = f["path"].as_str().unwrap();
            let found = issues(f["config"].clone());
            assert!(
                found.iter().any(|i| i.path == path),
                "{name}: no issue at {path}, got {found:?}"
            );
        }
    }

    // Accepted configs and what they normalize to.
    #[test]
    fn accepts_and_normalizes() {
        assert_eq!(Config::from_json(&Value::Null).unwrap(), Config::default());
        assert_eq!(Config::from_json(&json!({})).unwrap(), Config::default());
        assert_eq!(Config::from_json(&json!({ "limits": {} })).unwrap(), Config::default());
        assert_eq!(
            Config::from_json(&json!({ "limits": { "pids": 256.0, "cpus": 2, "memoryBytes": null } }))
                .unwrap()
                .limits,
            Limits { pids: Some(256), cpus: Some(2.0), ..Limits::default() }
        );
        let c = Config::from_json(&json!({
            "fs": [{ "backend": "local", "mount": "/workspace/", "acls": [{ "path": "/workspace/**", "access": "rw" }] }],
            "egress": [
                { "access": "allow", "host": "API.GitHub.com.", "methods": ["get", "Post"], "ports": [443, 8443.0] },
                { "access": "allow", "host": "api.finnhub.io", "override": { "headers": { "X-Finnhub-Token": "s3cr3t" } } },
                { "access": "deny", "host": "*.example.com", "paths": ["/admin/**"], "override": null },
            ],
            "upstream": { "resolve": { "API.example.com:443": "127.0.0.1:8443", "[::1]:80": "[::1]:8080" } },
        }))
        .unwrap();
        assert_eq!(c.fs[0].mount, "/workspace");
        assert_eq!(
            c.egress[0].host,
            HostPattern::Exact("api.github.com".into())
        );
        assert_eq!(
            c.egress[0].methods.as_deref(),
            Some(&["GET".to_string(), "POST".to_string()][..])
        );
        assert_eq!(c.egress[0].ports.as_deref(), Some(&[443, 8443][..]));
        let o = c.egress[1].override_.as_ref().unwrap();
        assert_eq!(o.headers[0].0.as_str(), "x-finnhub-token");
        assert!(matches!(&o.headers[0].1, OverrideValue::Inline(s) if s.expose() == "s3cr3t"));
        assert!(!o.allow_plaintext);
        assert_eq!(c.egress[2].override_, None);
        assert_eq!(
            c.upstream.resolve[&("api.example.com".to_string(), 443)],
            "127.0.0.1:8443".parse().unwrap()
        );
        assert_eq!(
            c.upstream.resolve[&("::1".to_string(), 80)],
            "[::1]:8080".parse().unwrap()
        );
    }

    // One config with three problems reports all three.
    #[test]
    fn reports_every_problem() {
        let found = issues(json!({
            "egress": [
                { "access": "allow", "host": "*.com" },
                { "access": "allow", "host": "ok.example.com", "ports": [70000] },
            ],
            "fs": [{ "backend": "local", "mount": "workspace" }],
        }));
        let paths: Vec<&str> = found.iter().map(|i| i.path.as_str()).collect();
        assert_eq!(
            paths,
            ["fs[0].mount", "egress[0].host", "egress[1].ports[0]"],
            "{found:?}"
        );
        assert_eq!(
            found[2].message,
            "expected an integer from 1 to 65535, got 70000"
        );
        assert_eq!(
            found[2].to_string(),
            "egress[1].ports[0]: expected an integer from 1 to 65535, got 70000"
        );
    }

    // Messages: path and a phrase the message must contain.
    #[test]
    fn messages() {
        let cases: &[(Value, &str, &str)] = &[
            (json!([]), "", "expected an object"),
            (json!({ "egres": [] }), "egres", "did you mean \"egress\""),
            (json!({ "egress": [{ "access": "allow", "host": "a.com", "method": ["GET"] }] }), "egress[0].method", "did you mean \"methods\""),
            (json!({ "egress": [{ "host": "a.com" }] }), "egress[0].access", "missing"),
            (json!({ "egress": [{ "access": "allow" }] }), "egress[0].host", "missing"),
            (json!({ "egress": [{ "access": "permit", "host": "a.com" }] }), "egress[0].access", "got \"permit\""),
            (json!({ "egress": [{ "access": "allow", "host": 5 }] }), "egress[0].host", "got a number"),
            (json!({ "egress": [{ "access": "allow", "host": "a.com", "ports": [] }] }), "egress[0].ports", "omit ports"),
            (json!({ "egress": [{ "access": "allow", "host": "a.com", "ports": [1.5] }] }), "egress[0].ports[0]", "got 1.5"),
            (json!({ "egress": [{ "access": "allow", "host": "a.com", "ports": [-1] }] }), "egress[0].ports[0]", "got -1"),
            (json!({ "egress": [{ "access": "allow", "host": "a.com", "ports": "443" }] }), "egress[0].ports", "got a string"),
            (json!({ "egress": [{ "access": "allow", "host": "a.com", "tls": "open" }] }), "egress[0].tls", "got \"open\""),
            (json!({ "egress": [{ "access": "deny", "host": "a.com", "tls": "passthrough" }] }), "egress[0].tls", "only for allow rules"),
            (json!({ "egress": [{ "access": "allow", "host": "a.com", "tls": "passthrough", "methods": ["GET"] }] }), "egress[0].methods", "cannot read, so it cannot check or change methods"),
            (json!({ "egress": [{ "access": "allow", "host": "a.com", "tls": "passthrough", "paths": ["/x"] }] }), "egress[0].paths", "remove paths"),
            (json!({ "egress": [{ "access": "allow", "host": "a.com", "tls": "passthrough", "override": { "headers": { "X-A": "1" } } }] }), "egress[0].override", "cannot check or change headers"),
            (json!({ "egress": [{ "access": "allow", "host": "a.com", "override": { "headers": { "Proxy-Authorization": "x" } } }] }), "egress[0].override.headers[\"Proxy-Authorization\"]", "cannot be overridden"),
            (json!({ "egress": [{ "access": "allow", "host": "a.com", "override": { "headers": { "TE": "x" } } }] }), "egress[0].override.headers[\"TE\"]", "cannot be overridden"),
            (json!({ "egress": [{ "access": "allow", "host": "a.com", "override": { "headers": { "Bad Name": "x" } } }] }), "egress[0].override.headers[\"Bad Name\"]", "not a valid header name"),
            (json!({ "egress": [{ "access": "allow", "host": "a.com", "override": { "headers": { "X-A": "1", "x-a": "2" } } }] }), "egress[0].override.headers[\"x-a\"]", "given twice"),
            (json!({ "egress": [{ "access": "allow", "host": "a.com", "override": { "headers": {} } }] }), "egress[0].override.headers", "at least one header"),
            (json!({ "egress": [{ "access": "allow", "host": "a.com", "override": {} }] }), "egress[0].override.headers", "missing"),
            (json!({ "egress": [{ "access": "allow", "host": "a.com", "override": { "headers": { "X-A": "1" }, "allowPlaintext": "yes" } }] }), "egress[0].override.allowPlaintext", "true or false"),
            (json!({ "upstream": { "resolve": { "a.com": "127.0.0.1:1" } } }), "upstream.resolve[\"a.com\"]", "host:port"),
            (json!({ "upstream": { "resolve": { "::1:443": "127.0.0.1:1" } } }), "upstream.resolve[\"::1:443\"]", "brackets"),
            (json!({ "upstream": { "resolve": { "a.com:0": "127.0.0.1:1" } } }), "upstream.resolve[\"a.com:0\"]", "1 to 65535"),
            (json!({ "upstream": { "resolve": { "a.com:443": "127.0.0.1:1", "A.com:443": "127.0.0.1:2" } } }), "upstream.resolve[\"a.com:443\"]", "same host"),
            (json!({ "fs": [{ "backend": "local", "mount": "/" }] }), "fs[0].mount", "over /"),
            (json!({ "fs": [{ "backend": "local", "mount": "/lib64/x" }] }), "fs[0].mount", "system directory"),
            (json!({ "fs": [{ "backend": "local", "mount": "/a/../etc" }] }), "fs[0].mount", ".."),
            (json!({ "fs": [{ "backend": "local", "mount": "/a" }, { "backend": "local", "mount": "/a/b" }] }), "fs[1].mount", "overlaps fs[0].mount"),
            (json!({ "fs": [{ "backend": "local", "mount": "/a", "source": "rel/dir" }] }), "fs[0].source", "absolute"),
            (json!({ "fs": [{ "backend": "local", "mount": "/a", "audit": 1 }] }), "fs[0].audit", "true or false"),
            (json!({ "fs": [{ "backend": "local", "mount": "/a", "acls": [{ "path": "/a*", "access": "r" }] }] }), "fs[0].acls[0].path", "outside its mount"),
            (json!({ "limits": { "pid": 1 } }), "limits.pid", "did you mean \"pids\""),
            (json!({ "limits": 5 }), "limits", "expected an object"),
            (json!({ "limits": { "memoryBytes": 1024 } }), "limits.memoryBytes", "at least 1 MiB"),
            (json!({ "limits": { "memoryBytes": "256M" } }), "limits.memoryBytes", "got a string"),
            (json!({ "limits": { "pids": 2.5 } }), "limits.pids", "got 2.5"),
            (json!({ "limits": { "pids": -1 } }), "limits.pids", "whole number"),
            (json!({ "limits": { "cpus": 0 } }), "limits.cpus", "0.01 to 1024"),
            (json!({ "limits": { "openFiles": 3 } }), "limits.openFiles", "at least 16"),
            (json!({ "limits": { "fileSizeBytes": 0 } }), "limits.fileSizeBytes", "whole number of bytes"),
        ];
        for (config, path, phrase) in cases {
            let found = issues(config.clone());
            assert!(
                found
                    .iter()
                    .any(|i| i.path == *path && i.message.contains(phrase)),
                "{config}: wanted {path} containing {phrase:?}, got {found:?}"
            );
        }
    }

    // A secret never shows up in an error, whatever is wrong with it or around it.
    #[test]
    fn secrets_never_echoed() {
        let secret = "sk-live-SUPERSECRET-4242";
        let cases = [
            json!({ "egress": [{ "access": "allow", "host": "a.com", "override": { "headers": { "X-Key": format!("{secret}\r\nX-Evil: 1") } } }] }),
            json!({ "egress": [{ "access": "allow", "host": "a.com", "override": { "headers": { "X-Key": format!("{secret}\n") } } }] }),
            json!({ "egress": [{ "access": "allow", "host": "a.com", "override": { "headers": { "X-Key": format!("{secret}\u{0}") } } }] }),
            json!({ "egress": [{ "access": "allow", "host": "a.com", "override": { "headers": { "X-Key": format!("{secret}\u{7}") } } }] }),
            json!({ "egress": [{ "access": "deny", "host": "a.com", "override": { "headers": { "X-Key": secret } } }] }),
            json!({ "egress": [{ "access": "allow", "host": "*.com", "override": { "headers": { "Host": secret, "X-Key": secret } } }] }),
            json!({ "egress": [{ "access": "allow", "host": "a.com", "override": { "headers": { "X-Key": secret, "x-key": secret } } }] }),
        ];
        for config in cases {
            let err = Config::from_json(&config).expect_err("must fail");
            let shown = format!("{err} {err:?}");
            assert!(!shown.contains("SUPERSECRET"), "leaked: {shown}");
        }
        // And a valid config's Debug does not show it either.
        let ok = json!({ "egress": [{ "access": "allow", "host": "a.com", "override": { "headers": { "X-Key": secret } } }] });
        assert!(!format!("{:?}", Config::from_json(&ok).unwrap()).contains("SUPERSECRET"));
    }

    // upstream.ca: a real certificate passes, as given; a key or junk is refused without echoing it.
    #[test]
    fn ca_pem() {
        let ca = rcgen::generate_simple_self_signed(vec!["test-ca.example".to_string()]).unwrap();
        let cert = ca.cert.pem();
        let key = ca.signing_key.serialize_pem();
        let ok = Config::from_json(&json!({ "upstream": { "ca": [cert.clone(), format!("{cert}{cert}")] } })).unwrap();
        assert_eq!(ok.upstream.ca[0], cert);
        let cases: &[(String, &str)] = &[
            (key.clone(), "private key"),
            (format!("{cert}{key}"), "private key"),
            ("hello".to_string(), "no certificate"),
            ("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n".to_string(), "could not be parsed"),
        ];
        for (pem, phrase) in cases {
            let found = issues(json!({ "upstream": { "ca": [pem] } }));
            assert_eq!(found[0].path, "upstream.ca[0]");
            assert!(found[0].message.contains(phrase), "{found:?}");
            let body = pem.lines().filter(|l| !l.starts_with("-----") && l.len() >= 4);
            assert!(body.into_iter().all(|l| !found[0].message.contains(l)), "PEM echoed: {found:?}");
        }
    }

    // JS numbers may arrive as floats: 443.0 is a port, and 70000.0 prints as JS would.
    #[test]
    fn float_ports() {
        let ok = Config::from_json(&json!({ "egress": [{ "access": "allow", "host": "a.com", "ports": [443.0] }] })).unwrap();
        assert_eq!(ok.egress[0].ports.as_deref(), Some(&[443][..]));
        let found = issues(json!({ "egress": [{ "access": "allow", "host": "a.com", "ports": [70000.0] }] }));
        assert_eq!(found[0].message, "expected an integer from 1 to 65535, got 70000");
    }

    // Path helpers render JS notation.
    #[test]
    fn paths() {
        assert_eq!(key_path("", "egress"), "egress");
        assert_eq!(key_path("egress[0]", "host"), "egress[0].host");
        assert_eq!(key_path("egress[0]", "bad key"), "egress[0][\"bad key\"]");
        assert_eq!(
            map_path("upstream.resolve", "api.github.com:443"),
            "upstream.resolve[\"api.github.com:443\"]"
        );
        assert_eq!(map_path("h", "a\"b"), "h[\"a\\\"b\"]");
    }
}
