//! [`Config`] -> JSON for `getConfig()`: the normalized config in the input shape, secrets redacted.
//!
//! Optional rule fields appear only when set; `allowPlaintext` and `audit` only when true; the root `audit` only when not the default; resolve
//! keys are sorted so that the output is stable.
//!
//! # Security
//! Override header values are rendered as [`REDACTED`]; `from_json` rejects that marker, so a round
//! trip through JS can never replace a secret with the marker by accident (README.md#api).

use serde_json::{json, Map, Value};

use super::{
    AuditRetention, Config, EgressRule, FsAccess, FsBackend, FsMount, Limits, OverrideValue,
    RuleAccess, TlsMode, Upstream, REDACTED,
};

/// Renders a whole config (see [`Config::to_json`]).
pub(super) fn config(config: &Config) -> Value {
    let mut out = json!({
        "fs": config.fs.iter().map(fs_mount).collect::<Vec<_>>(),
        "egress": config.egress.iter().map(egress_rule).collect::<Vec<_>>(),
        "upstream": upstream(&config.upstream),
    });
    if config.audit != AuditRetention::default() {
        out["audit"] = json!({ "maxBytes": config.audit.max_bytes, "keep": config.audit.keep });
    }
    if !config.limits.is_empty() {
        out["limits"] = limits(&config.limits);
    }
    if config.mode != super::Mode::Enforce {
        out["mode"] = config.mode.as_str().into();
    }
    if !config.secrets.is_empty() {
        out["secrets"] = secrets(config);
    }
    if !config.env.is_empty() {
        let env: Map<String, Value> = config
            .env
            .iter()
            .map(|(name, t)| (name.clone(), t.source().into()))
            .collect();
        out["env"] = Value::Object(env);
    }
    out
}

/// Each secret as the marker, or `{ value: marker, hosts }` when it has hosts: `applyConfig`
/// keeps the value of a name given the marker (docs/secrets.md#round-trip).
fn secrets(config: &Config) -> Value {
    let out: Map<String, Value> = config
        .secrets
        .iter()
        .map(|(name, secret)| {
            let value = match &secret.hosts {
                None => REDACTED.into(),
                Some(hosts) => json!({
                    "value": REDACTED,
                    "hosts": hosts.iter().map(|h| h.to_string()).collect::<Vec<_>>(),
                }),
            };
            (name.clone(), value)
        })
        .collect();
    Value::Object(out)
}

/// The limits given (defaults are not shown: they depend on the host).
fn limits(limits: &Limits) -> Value {
    let mut out = Map::new();
    let mut put = |key: &str, value: Option<Value>| {
        if let Some(value) = value {
            out.insert(key.into(), value);
        }
    };
    put("memoryBytes", limits.memory_bytes.map(Value::from));
    put("pids", limits.pids.map(Value::from));
    put("cpus", limits.cpus.map(Value::from));
    put("openFiles", limits.open_files.map(Value::from));
    put("fileSizeBytes", limits.file_size_bytes.map(Value::from));
    put("diskBytes", limits.disk_bytes.map(Value::from));
    Value::Object(out)
}

fn egress_rule(rule: &EgressRule) -> Value {
    let mut out = Map::new();
    let access = match rule.access {
        RuleAccess::Allow => "allow",
        RuleAccess::Deny => "deny",
    };
    out.insert("access".into(), access.into());
    out.insert("host".into(), rule.host.to_string().into());
    if let Some(ports) = &rule.ports {
        out.insert("ports".into(), ports.clone().into());
    }
    if let Some(methods) = &rule.methods {
        out.insert("methods".into(), methods.clone().into());
    }
    if let Some(paths) = &rule.paths {
        out.insert(
            "paths".into(),
            paths.iter().map(|p| p.as_str()).collect::<Vec<_>>().into(),
        );
    }
    if let Some(o) = &rule.override_ {
        let headers: Map<String, Value> = o
            .headers
            .iter()
            .map(|(name, value)| {
                let shown = match value {
                    OverrideValue::Inline(_) => REDACTED.into(),
                    OverrideValue::Template(t) => t.source().into(),
                };
                (name.as_str().to_string(), shown)
            })
            .collect();
        let mut ov = Map::new();
        ov.insert("headers".into(), Value::Object(headers));
        if o.allow_plaintext {
            ov.insert("allowPlaintext".into(), true.into());
        }
        out.insert("override".into(), Value::Object(ov));
    }
    if let Some(mode) = rule.mode {
        out.insert("mode".into(), mode.as_str().into());
    }
    if rule.tls != TlsMode::Intercept {
        out.insert("tls".into(), rule.tls.as_str().into());
    }
    Value::Object(out)
}

fn upstream(upstream: &Upstream) -> Value {
    let mut entries: Vec<(String, String)> = upstream
        .resolve
        .iter()
        .map(|((host, port), addr)| {
            let key = if host.contains(':') {
                format!("[{host}]:{port}")
            } else {
                format!("{host}:{port}")
            };
            (key, addr.to_string())
        })
        .collect();
    entries.sort();
    let resolve: Map<String, Value> = entries.into_iter().map(|(k, v)| (k, v.into())).collect();
    json!({
        "resolve": resolve,
        "ca": upstream.ca,
        "connectTimeoutMs": upstream.connect_timeout.as_millis() as u64,
        "responseTimeoutMs": upstream.response_timeout.as_millis() as u64,
    })
}

fn fs_mount(mount: &FsMount) -> Value {
    let mut out = Map::new();
    let backend = match mount.backend {
        FsBackend::Local => "local",
    };
    out.insert("backend".into(), backend.into());
    out.insert("mount".into(), mount.mount.clone().into());
    if let Some(source) = &mount.source {
        out.insert(
            "source".into(),
            source.to_string_lossy().into_owned().into(),
        );
    }
    if let Some(acls) = &mount.acls {
        let acls: Vec<Value> = acls
            .iter()
            .map(|acl| {
                let access = match acl.access {
                    FsAccess::Rw => "rw",
                    FsAccess::R => "r",
                    FsAccess::None => "none",
                };
                json!({ "path": acl.path.as_str(), "access": access })
            })
            .collect();
        out.insert("acls".into(), acls.into());
    }
    if mount.audit {
        out.insert("audit".into(), true.into());
    }
    Value::Object(out)
}

#[cfg(test)]
#[rustfmt::skip]
mod tests {
    use super::*;

    // to_json gives valid input that parses back to the same config.
    #[test]
    fn round_trip() {
        let input = json!({
            "fs": [
                { "backend": "local", "mount": "/workspace", "source": "/srv/data", "audit": true,
                  "acls": [{ "path": "/workspace/.git/**", "access": "r" }, { "path": "/workspace/**", "access": "rw" }] },
                { "backend": "local", "mount": "/cache" },
            ],
            "egress": [
                { "access": "allow", "host": "api.anthropic.com" },
                { "access": "allow", "host": "pypi.org", "ports": [443] },
                { "access": "allow", "host": "api.github.com", "methods": ["GET", "post"] },
                { "access": "allow", "host": "api.example.com", "paths": ["/v1/*"] },
                { "access": "deny", "host": "*.evil.com" },
                { "access": "allow", "host": "10.0.0.0/8" },
                { "access": "allow", "host": "[::1]" },
                { "access": "allow", "host": "*" },
            ],
            "upstream": {
                "resolve": { "api.example.com:443": "127.0.0.1:8443", "[::1]:80": "[::1]:8080" },
                "ca": [],
            },
            "limits": { "memoryBytes": 268435456, "pids": 256, "cpus": 1.5, "openFiles": 1024,
                        "fileSizeBytes": 1048576 },
        });
        let config = Config::from_json(&input).unwrap();
        let rendered = config.to_json();
        assert_eq!(Config::from_json(&rendered).unwrap(), config);
        assert_eq!(rendered["egress"][2]["methods"], json!(["GET", "POST"]));
        assert_eq!(rendered["egress"][6]["host"], "::1");
        assert_eq!(
            rendered["egress"][0],
            json!({ "access": "allow", "host": "api.anthropic.com" })
        );
        assert_eq!(rendered["upstream"]["resolve"]["[::1]:80"], "[::1]:8080");
        assert_eq!(rendered["limits"]["cpus"], json!(1.5));
        assert_eq!(rendered["limits"].get("diskBytes"), None);
        assert_eq!(
            rendered["fs"][1],
            json!({ "backend": "local", "mount": "/cache" })
        );
        assert_eq!(
            Config::default().to_json(),
            json!({ "fs": [], "egress": [], "upstream": { "resolve": {}, "ca": [], "connectTimeoutMs": 10000, "responseTimeoutMs": 120000 } })
        );
    }

    // Secrets come back as the marker, names lowercased, and the marker is refused on the way in.
    #[test]
    fn redacts_override_values() {
        let input = json!({ "egress": [{ "access": "allow", "host": "api.finnhub.io",
            "override": { "headers": { "X-Finnhub-Token": "tok-123" }, "allowPlaintext": true } }] });
        let rendered = Config::from_json(&input).unwrap().to_json();
        assert_eq!(
            rendered["egress"][0]["override"],
            json!({ "headers": { "x-finnhub-token": "[redacted]" }, "allowPlaintext": true })
        );
        assert!(!rendered.to_string().contains("tok-123"));
        let err = Config::from_json(&rendered).unwrap_err();
        assert_eq!(
            err.issues()[0].path,
            "egress[0].override.headers[\"x-finnhub-token\"]"
        );
        assert!(err.issues()[0]
            .message
            .contains("pass the secret value again"));
    }

    // Named secrets come back as the marker and are kept by it; templates and env come back verbatim.
    #[test]
    fn named_secrets_round_trip() {
        let input = json!({
            "secrets": { "OPENAI_KEY": "sk-live-123456", "GH": { "value": "ghp-abcdefgh", "hosts": ["API.github.com"] } },
            "egress": [{ "access": "allow", "host": "api.openai.com",
                "override": { "headers": { "Authorization": "Bearer {{secrets.OPENAI_KEY}}" } } }],
            "env": { "OPENAI_API_KEY": "{{secrets.OPENAI_KEY}}", "PLAIN": "x{{y}}" },
        });
        let config = Config::from_json(&input).unwrap();
        let rendered = config.to_json();
        assert!(!rendered.to_string().contains("sk-live") && !rendered.to_string().contains("ghp-"));
        assert_eq!(rendered["secrets"], json!({ "OPENAI_KEY": "[redacted]", "GH": { "value": "[redacted]", "hosts": ["api.github.com"] } }));
        assert_eq!(rendered["egress"][0]["override"]["headers"]["authorization"], "Bearer {{secrets.OPENAI_KEY}}");
        assert_eq!(rendered["env"], json!({ "OPENAI_API_KEY": "{{secrets.OPENAI_KEY}}", "PLAIN": "x{{y}}" }));
        // Over the config in force, the marker keeps each value.
        assert_eq!(Config::from_json_over(&rendered, &config).unwrap(), config);
        // Without one (a new sandbox), the marker is refused, naming the field.
        let err = Config::from_json(&rendered).unwrap_err();
        let paths: Vec<&str> = err.issues().iter().map(|i| i.path.as_str()).collect();
        assert_eq!(paths, ["secrets[\"GH\"].value", "secrets[\"OPENAI_KEY\"]"]);
        // A new value for a name replaces the old one (rotation).
        let mut rotated = rendered.clone();
        rotated["secrets"]["OPENAI_KEY"] = json!("sk-live-rotated");
        let next = Config::from_json_over(&rotated, &config).unwrap();
        assert_eq!(next.secrets["OPENAI_KEY"].value.expose(), "sk-live-rotated");
        assert_eq!(next.secrets["GH"].value.expose(), "ghp-abcdefgh");
    }
}
