//! [`Template`]: text that references named secrets as `{{secrets.NAME}}` (docs/secrets.md).
//!
//! Templates appear in override header values (rendered with the secret's value for the
//! upstream) and in `env` values (rendered with the secret's placeholder for the sandbox). The
//! template text itself is not secret: `getConfig()` returns it verbatim.

use std::fmt;

/// The longest secret name accepted.
pub const MAX_SECRET_NAME: usize = 64;

/// One piece of a template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    /// Literal text.
    Text(String),
    /// `{{secrets.NAME}}`: the name.
    Secret(String),
}

/// Parsed `"... {{secrets.NAME}} ..."` text, with its source kept for `getConfig()`.
#[derive(Clone, PartialEq, Eq)]
pub struct Template {
    source: String,
    parts: Vec<Part>,
}

impl fmt::Debug for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The source is not secret, but may be long; the parts say all.
        f.debug_list().entries(&self.parts).finish()
    }
}

/// Whether `name` is a valid secret name: `[A-Z][A-Z0-9_]*`, at most [`MAX_SECRET_NAME`] long.
pub fn is_secret_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    name.len() <= MAX_SECRET_NAME
        && bytes.next().is_some_and(|b| b.is_ascii_uppercase())
        && bytes.all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
}

impl Template {
    /// Parses `raw`. `{{` not followed by `secrets.` is literal text; `{{secrets.` must be
    /// followed by a valid name and `}}` (spaces inside the braces allowed).
    pub fn parse(raw: &str) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut text = String::new();
        let mut rest = raw;
        while let Some(at) = rest.find("{{") {
            let after = &rest[at + 2..];
            let inner = after.trim_start();
            let Some(name_on) = inner.strip_prefix("secrets.") else {
                text.push_str(&rest[..at + 2]);
                rest = after;
                continue;
            };
            let Some(close) = name_on.find("}}") else {
                return Err("a {{secrets.NAME}} reference is not closed with }}".into());
            };
            let name = name_on[..close].trim_end();
            if !is_secret_name(name) {
                // The text is not echoed: an inline override value is a secret.
                return Err(
                    "a {{secrets.…}} reference does not name a valid secret: names are \
                     A-Z, 0-9 and _, starting with a letter (e.g. {{secrets.OPENAI_KEY}})"
                        .into(),
                );
            }
            text.push_str(&rest[..at]);
            if !text.is_empty() {
                parts.push(Part::Text(std::mem::take(&mut text)));
            }
            parts.push(Part::Secret(name.to_string()));
            rest = &name_on[close + 2..];
        }
        text.push_str(rest);
        if !text.is_empty() {
            parts.push(Part::Text(text));
        }
        Ok(Template {
            source: raw.to_string(),
            parts,
        })
    }

    /// The text as given.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The pieces, in order.
    pub fn parts(&self) -> &[Part] {
        &self.parts
    }

    /// Whether it references no secret.
    pub fn is_plain(&self) -> bool {
        self.secret_names().next().is_none()
    }

    /// The names it references, in order (repeats kept).
    pub fn secret_names(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|p| match p {
            Part::Secret(name) => Some(name.as_str()),
            Part::Text(_) => None,
        })
    }

    /// The text with each reference replaced by `lookup(name)`; `None` if a lookup fails.
    pub fn render<'a>(&self, mut lookup: impl FnMut(&str) -> Option<&'a str>) -> Option<String> {
        let mut out = String::with_capacity(self.source.len() + 32);
        for part in &self.parts {
            match part {
                Part::Text(t) => out.push_str(t),
                Part::Secret(name) => out.push_str(lookup(name)?),
            }
        }
        Some(out)
    }
}

#[cfg(test)]
#[rustfmt::skip]
mod tests {
    use super::*;

    fn text(s: &str) -> Part { Part::Text(s.into()) }
    fn secret(s: &str) -> Part { Part::Secret(s.into()) }

    #[test]
    fn parse_cases() {
        let cases: [(&str, Vec<Part>); 7] = [
            ("plain", vec![text("plain")]),
            ("", vec![]),
            ("Bearer {{secrets.OPENAI_KEY}}", vec![text("Bearer "), secret("OPENAI_KEY")]),
            ("{{ secrets.A }}", vec![secret("A")]),
            ("{{secrets.A}}:{{secrets.B_2}}", vec![secret("A"), text(":"), secret("B_2")]),
            // `{{` without `secrets.` is literal text
            ("{{other}} x", vec![text("{{other}} x")]),
            ("a{{{secrets.A}}", vec![text("a{{{secrets.A}}")]),
        ];
        for (raw, want) in cases {
            let t = Template::parse(raw).unwrap();
            assert_eq!(t.parts(), want.as_slice(), "{raw}");
            assert_eq!(t.source(), raw);
        }
    }

    #[test]
    fn parse_errors() {
        for raw in ["{{secrets.A", "{{secrets.lower}}", "{{secrets.}}", "{{secrets.1A}}", "{{secrets.A-B}}"] {
            assert!(Template::parse(raw).is_err(), "{raw}");
        }
    }

    #[test]
    fn render_and_names() {
        let t = Template::parse("Bearer {{secrets.K}} {{secrets.K}}").unwrap();
        assert_eq!(t.secret_names().collect::<Vec<_>>(), ["K", "K"]);
        assert_eq!(t.render(|n| (n == "K").then_some("v")).unwrap(), "Bearer v v");
        assert_eq!(t.render(|_| None), None);
        assert!(Template::parse("x").unwrap().is_plain());
    }

    #[test]
    fn names() {
        for (name, ok) in [("A", true), ("OPENAI_KEY", true), ("K9_", true), ("a", false), ("_A", false), ("9A", false), ("", false)] {
            assert_eq!(is_secret_name(name), ok, "{name}");
        }
        assert!(!is_secret_name(&"A".repeat(65)));
    }
}
