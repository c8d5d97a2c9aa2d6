//! Sandbox name validation (README.md#api): 1–63 characters of `[A-Za-z0-9._-]`, not starting with `.`
//! or `-`. The name becomes a folder name, so this is also what keeps it from escaping the hive home.

use crate::error::{HiveError, Result};

/// Checks a sandbox name; the error quotes it (JSON-escaped, at most 80 chars).
pub fn validate_name(name: &str) -> Result<()> {
    let ok_len = (1..=63).contains(&name.len());
    let ok_chars = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    let ok_start = !name.starts_with(['.', '-']);
    if ok_len && ok_chars && ok_start {
        return Ok(());
    }
    let shown: String = name.chars().take(80).collect();
    Err(HiveError::InvalidName(
        serde_json::Value::String(shown).to_string(),
    ))
}

#[cfg(test)]
mod tests {
    use super::validate_name;

    #[test]
    fn names() {
        let cases: &[(&str, bool)] = &[
            ("my-sandbox", true),
            ("a", true),
            ("A.b_c-9", true),
            (&"x".repeat(63), true),
            // rejected
            ("", false),
            (&"x".repeat(64), false),
            (".hidden", false),
            ("-flag", false),
            ("..", false),
            ("a/b", false),
            ("a b", false),
            ("ü", false),
            ("a\0b", false),
        ];
        for (name, ok) in cases {
            assert_eq!(validate_name(name).is_ok(), *ok, "{name:?}");
        }
    }
}
