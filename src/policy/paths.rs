//! How a request path is read for `paths` rules when servers may read it differently
//! (docs/network-access.md, "Paths"):
//!
//! 1. The path is normalized ([`normalize_path_cow`]): query cut, unreserved escapes decoded,
//!    slashes collapsed, dot segments removed. That is the plain reading.
//! 2. When the normal path holds a `;`, `%2F` or `%5C` (a `\` is escaped to `%5C` by step 1),
//!    the other common server readings are derived from it: `;` parameters stripped from each
//!    segment (Tomcat, Spring, Jetty), `%2F` and `\` read as `/` (many decoders and Windows-minded
//!    servers), and both in either order, each followed by dot-segment removal again. The plain
//!    reading comes first; duplicates are dropped. A path holding `%25` is also read decoded
//!    twice, with the same readings of that.
//! 3. A `deny` rule matches when its globs match *any* reading, compared case-insensitively (a
//!    server may fold case); an `allow` rule with `paths` matches only when its globs match
//!    *every* reading, compared exactly.
//!
//! # Security
//! The proxy forwards the path as the client sent it, so the decision must hold whatever the
//! upstream makes of it: `allow /v1/**` must not admit `/v1/..;/admin/x` (which Tomcat serves as
//! `/admin/x`), and `deny /admin/**` must not miss `/admin;x/s`, `/admin%2fs` or `/ADMIN/s`.
//! Robust in the safe direction: an ambiguous path can only be denied more often, never allowed
//! more often, than its plain reading alone.

use std::borrow::Cow;

use crate::config::{normalize_path_cow, EgressRule, PathGlob};

/// The readings of one request path, computed on first use.
pub(super) struct PathReadings<'p> {
    raw: &'p str,
    readings: Option<Vec<Cow<'p, str>>>,
    /// The readings case-folded (see [`fold_case`]), computed on first use by a deny rule.
    folded: Option<Vec<String>>,
}

impl<'p> PathReadings<'p> {
    pub(super) fn new(raw: &'p str) -> PathReadings<'p> {
        PathReadings {
            raw,
            readings: None,
            folded: None,
        }
    }

    fn readings(&mut self) -> &[Cow<'p, str>] {
        let raw = self.raw;
        self.readings.get_or_insert_with(|| readings_of(raw))
    }

    /// Whether `rule`'s `paths` match (see the module docs); `folded` are the rule's globs in
    /// folded case (deny rules only).
    pub(super) fn rule_matches(&mut self, rule: &EgressRule, folded: Option<&[PathGlob]>) -> bool {
        let Some(globs) = &rule.paths else {
            return true;
        };
        let any = |path: &str, globs: &[PathGlob]| globs.iter().any(|g| g.matches(path));
        match folded {
            // A deny rule: any reading, case-folded.
            Some(folded_globs) => {
                if self.readings().iter().any(|p| any(p, globs)) {
                    return true;
                }
                if self.folded.is_none() {
                    let folded: Vec<String> =
                        self.readings().iter().map(|p| fold_case(p)).collect();
                    self.folded = Some(folded);
                }
                self.folded
                    .as_ref()
                    .is_some_and(|f| f.iter().any(|p| any(p, folded_globs)))
            }
            // An allow rule: every reading, exactly.
            None => self.readings().iter().all(|p| any(p, globs)),
        }
    }

    /// Whether the plain reading alone matches `rule`'s paths (to tell an ambiguous path from one
    /// that is simply outside the rule).
    pub(super) fn plain_matches(&mut self, rule: &EgressRule) -> bool {
        match &rule.paths {
            None => true,
            Some(globs) => {
                let plain = &self.readings()[0];
                globs.iter().any(|g| g.matches(plain))
            }
        }
    }
}

/// The readings of `raw` (see the module docs), the plain one first. A path holding `%25` is
/// also read decoded twice (IIS and some proxies decode again), with the same readings of that.
fn readings_of(raw: &str) -> Vec<Cow<'_, str>> {
    let plain = normalize_path_cow(raw);
    if !plain.contains("%25") {
        return single_decoded(plain);
    }
    let twice = renormalize(&plain.replace("%25", "%"));
    let mut out = single_decoded(plain);
    for reading in single_decoded(Cow::Owned(twice)) {
        if !out.contains(&reading) {
            out.push(Cow::Owned(reading.into_owned()));
        }
    }
    out
}

/// The readings of a normal path (the plain one first).
fn single_decoded(plain: Cow<'_, str>) -> Vec<Cow<'_, str>> {
    if !plain.contains(';') && !has_escaped_slash(&plain) {
        return vec![plain];
    }
    let slashes = |p: &str| renormalize(&slashes_as_separators(p));
    let params = |p: &str| renormalize(&strip_params(p));
    let s = slashes(&plain);
    let p = params(&plain);
    let sp = params(&s);
    let ps = slashes(&p);
    let mut out: Vec<Cow<'_, str>> = vec![plain];
    for reading in [s, p, sp, ps] {
        if !out.iter().any(|r| *r == reading) {
            out.push(Cow::Owned(reading));
        }
    }
    out
}

fn has_escaped_slash(path: &str) -> bool {
    path.contains("%2F") || path.contains("%5C")
}

/// `%2F` and `%5C` (normal form: uppercase hex) read as `/`.
fn slashes_as_separators(path: &str) -> String {
    path.replace("%2F", "/").replace("%5C", "/")
}

/// Each segment cut at its first `;` (`/a;x/b;y=1` is `/a/b`).
fn strip_params(path: &str) -> String {
    path.split('/')
        .map(|seg| seg.split_once(';').map_or(seg, |(keep, _)| keep))
        .collect::<Vec<_>>()
        .join("/")
}

/// Normalizes again (collapses the slashes and dot segments a reading produced).
fn renormalize(path: &str) -> String {
    normalize_path_cow(path).into_owned()
}

/// ASCII letters lowercased, except the hex digits of `%XX` escapes (kept uppercase, as normal
/// paths and glob literals store them).
pub(super) fn fold_case(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut escape = 0;
    for c in text.chars() {
        if escape > 0 {
            escape -= 1;
            out.push(c);
        } else {
            if c == '%' {
                escape = 2;
            }
            out.push(c.to_ascii_lowercase());
        }
    }
    out
}

/// A deny rule's globs in folded case, for [`PathReadings::rule_matches`].
pub(super) fn folded_globs(rule: &EgressRule) -> Option<Vec<PathGlob>> {
    let globs = rule.paths.as_ref()?;
    globs
        .iter()
        .map(|g| PathGlob::parse(&fold_case(g.as_str())).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readings_cases() {
        let cases: &[(&str, &[&str])] = &[
            ("/v1/models", &["/v1/models"]),
            ("/v1/..;/admin/x", &["/v1/..;/admin/x", "/admin/x"]),
            ("/v1/..%2fadmin/x", &["/v1/..%2Fadmin/x", "/admin/x"]),
            ("/v1/..\\admin\\x", &["/v1/..%5Cadmin%5Cx", "/admin/x"]),
            ("/admin;x/s", &["/admin;x/s", "/admin/s"]),
            ("/admin%2fs", &["/admin%2Fs", "/admin/s"]),
            ("/a;b%2f..%2f../c", &["/a;b%2F..%2F../c", "/c", "/a/c"]),
            (
                "/v1/..%252fadmin/x",
                &["/v1/..%252fadmin/x", "/v1/..%2Fadmin/x", "/admin/x"],
            ),
            ("/v1/%252e%252e/admin", &["/v1/%252e%252e/admin", "/admin"]),
        ];
        for (raw, want) in cases {
            let got: Vec<String> = readings_of(raw).into_iter().map(Cow::into_owned).collect();
            assert_eq!(&got, want, "{raw}");
        }
    }

    #[test]
    fn fold_case_keeps_escapes() {
        assert_eq!(fold_case("/ADMIN/%2F%5Cx"), "/admin/%2F%5Cx");
        assert_eq!(fold_case("/Ab%"), "/ab%");
    }
}
