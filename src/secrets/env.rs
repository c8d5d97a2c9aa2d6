//! The environment of a new process with `{{secrets.NAME}}` rendered as placeholders
//! (docs/secrets.md#placeholders): the config's `env` first, then the `exec`/`spawn` options'
//! `env` over it.

use crate::config::Template;
use crate::error::{HiveError, Result};

use super::Table;

/// `config_env` then `extra`, each value's secret references replaced by placeholders.
///
/// # Security
/// Only placeholders are ever rendered here: the values never reach a process's environment,
/// `/proc/<pid>/environ` or argv.
pub fn process_env(
    table: &Table,
    config_env: &[(String, Template)],
    extra: &[(String, String)],
) -> Result<Vec<(String, String)>> {
    let mut out: Vec<(String, String)> = Vec::with_capacity(config_env.len() + extra.len());
    let mut set = |name: &str, value: String| match out.iter_mut().find(|(k, _)| k == name) {
        Some(slot) => slot.1 = value,
        None => out.push((name.to_string(), value)),
    };
    for (name, template) in config_env {
        let value =
            render(table, template).ok_or_else(|| unknown(&format!("env[{name:?}]"), template))?;
        set(name, value);
    }
    for (name, raw) in extra {
        if !raw.contains("{{") {
            set(name, raw.clone());
            continue;
        }
        let at = format!("options.env[{name:?}]");
        let template =
            Template::parse(raw).map_err(|m| HiveError::InvalidArgument(format!("{at}: {m}")))?;
        let value = render(table, &template).ok_or_else(|| unknown(&at, &template))?;
        set(name, value);
    }
    Ok(out)
}

fn render(table: &Table, template: &Template) -> Option<String> {
    template.render(|name| table.placeholder(name))
}

fn unknown(at: &str, template: &Template) -> HiveError {
    let missing: Vec<&str> = template.secret_names().collect();
    HiveError::InvalidArgument(format!(
        "{at}: references {}, which the sandbox's secrets do not name; add it under secrets",
        missing
            .iter()
            .map(|n| format!("{{{{secrets.{n}}}}}"))
            .collect::<Vec<_>>()
            .join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::secrets::Placeholders;
    use serde_json::json;

    #[test]
    fn renders_placeholders_never_values() {
        let config = Config::from_json(&json!({
            "secrets": { "K": { "value": "the-real-value", "hosts": ["a.com"] } },
            "env": { "OPENAI_API_KEY": "{{secrets.K}}", "A": "1" },
        }))
        .unwrap();
        let table = Table::build(&config, &Placeholders::default());
        let ph = table.placeholder("K").unwrap().to_string();
        let extra = vec![
            ("A".to_string(), "2".to_string()),
            ("B".to_string(), "x {{secrets.K}}".to_string()),
        ];
        let env = process_env(&table, &config.env, &extra).unwrap();
        assert_eq!(
            env,
            vec![
                // The config's env comes in name order (a JSON object).
                ("A".to_string(), "2".to_string()),
                ("OPENAI_API_KEY".to_string(), ph.clone()),
                ("B".to_string(), format!("x {ph}")),
            ]
        );
        assert!(!format!("{env:?}").contains("the-real-value"));
        let bad = vec![("C".to_string(), "{{secrets.NOPE}}".to_string())];
        let err = process_env(&table, &config.env, &bad)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("options.env[\"C\"]") && err.contains("NOPE"),
            "{err}"
        );
    }
}
