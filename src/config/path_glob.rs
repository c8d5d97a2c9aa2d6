//! Path globs (`/v1/*`, `/v1/**`, `/workspace/**/*.env`) and request-path normalization.
//!
//! A request path is normalized once ([`normalize_path`]) and then matched segment by segment:
//! 1. the glob is split on `/` into segments when it is parsed; a `**` segment matches zero or more
//!    whole path segments, any other segment matches exactly one, with `*` matching any run of
//!    characters inside it (`*.env`, `v*-beta*`);
//! 2. matching walks the path in place (no allocation) with the classic greedy algorithm: remember
//!    the last `**` seen and, on a mismatch, let it swallow one more segment.
//!
//! Literal parts of a glob are percent-normalized exactly like request paths, so `/a%7eb` and
//! `/a~b` are the same glob.

use std::borrow::Cow;

/// A validated path glob: `*` matches within one segment, `**` across segments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathGlob {
    source: String,
    segments: Vec<Segment>,
}

/// One `/`-separated part of a glob.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    /// `**`: zero or more segments.
    Any,
    /// A segment without `*`, compared byte for byte.
    Literal(String),
    /// A segment with at least one `*`.
    Pattern(String),
}

impl PathGlob {
    /// Parses a glob; it must start with `/`.
    ///
    /// Globs that could never match a normalized path are refused with a hint: `.`/`..` segments
    /// and repeated slashes (both normalized away in requests), `?` and `#` (the query and fragment
    /// are not part of the matched path), and `**` inside a segment.
    pub fn parse(raw: &str) -> Result<PathGlob, String> {
        let quoted = super::host::quote(raw);
        let Some(rest) = raw.strip_prefix('/') else {
            return Err(format!(
                "expected a path glob starting with \"/\", got {quoted}"
            ));
        };
        if raw.contains(['?', '#']) {
            return Err(format!(
                "{quoted} contains ? or #; paths are matched without the query string and fragment, \
                 so remove that part"
            ));
        }
        if raw.bytes().any(|b| b.is_ascii_control()) {
            return Err(format!("{quoted} contains a control character"));
        }
        let parts: Vec<&str> = rest.split('/').collect();
        let mut segments = Vec::with_capacity(parts.len());
        for (i, part) in parts.iter().enumerate() {
            let last = i + 1 == parts.len();
            if part.is_empty() && !last {
                return Err(format!(
                    "{quoted} has an empty segment (//); repeated slashes are collapsed in request \
                     paths, so write a single /"
                ));
            }
            if part.contains("**") {
                if *part != "**" {
                    return Err(format!(
                        "{quoted}: ** must be a whole segment (/a/**/b); use * to match within a segment"
                    ));
                }
                segments.push(Segment::Any);
                continue;
            }
            let mut literal = String::with_capacity(part.len());
            push_normalized(part.as_bytes(), &mut literal);
            if literal == "." || literal == ".." {
                return Err(format!(
                    "{quoted} has a . or .. segment; request paths are matched after removing dot \
                     segments, so write the path without them"
                ));
            }
            segments.push(if literal.contains('*') {
                Segment::Pattern(literal)
            } else {
                Segment::Literal(literal)
            });
        }
        Ok(PathGlob {
            source: raw.to_string(),
            segments,
        })
    }

    /// Whether a normalized path (see [`normalize_path`]) matches.
    pub fn matches(&self, path: &str) -> bool {
        let Some(rest) = path.strip_prefix('/') else {
            return false;
        };
        let glob = &self.segments;
        let mut gi = 0;
        // Cursor into `rest`: start of the current segment, `None` once every segment is used.
        let mut at = Some(0);
        // Last `**`: (glob index after it, path cursor it has swallowed up to).
        let mut star: Option<(usize, Option<usize>)> = None;
        loop {
            match (glob.get(gi), at) {
                (None, None) => return true,
                (Some(Segment::Any), _) => {
                    star = Some((gi + 1, at));
                    gi += 1;
                    continue;
                }
                (Some(seg), Some(start)) => {
                    let (text, next) = segment_at(rest, start);
                    let ok = match seg {
                        Segment::Literal(lit) => lit == text,
                        Segment::Pattern(pat) => wildcard_match(pat.as_bytes(), text.as_bytes()),
                        Segment::Any => unreachable!("handled above"),
                    };
                    if ok {
                        gi += 1;
                        at = next;
                        continue;
                    }
                }
                _ => {}
            }
            // Mismatch: let the last `**` swallow one more segment, or fail.
            match star {
                Some((after, Some(start))) => {
                    let next = segment_at(rest, start).1;
                    star = Some((after, next));
                    gi = after;
                    at = next;
                }
                _ => return false,
            }
        }
    }

    /// The glob as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// The part before the first wildcard segment, e.g. `/workspace/src` for `/workspace/src/**`
    /// (with no trailing slash; `/` when the first segment already has a wildcard).
    pub fn literal_prefix(&self) -> String {
        let mut out = String::new();
        for seg in &self.segments {
            match seg {
                Segment::Literal(lit) if !lit.is_empty() => {
                    out.push('/');
                    out.push_str(lit);
                }
                _ => break,
            }
        }
        if out.is_empty() {
            out.push('/');
        }
        out
    }
}

/// The segment of `rest` starting at `start`, and where the next one starts.
fn segment_at(rest: &str, start: usize) -> (&str, Option<usize>) {
    match rest[start..].find('/') {
        Some(off) => (&rest[start..start + off], Some(start + off + 1)),
        None => (&rest[start..], None),
    }
}

/// `*` matches any run of bytes (within one segment: the text has no `/`).
fn wildcard_match(pat: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<usize> = None;
    let mut mark = 0;
    while t < text.len() {
        if p < pat.len() && pat[p] == b'*' {
            star = Some(p);
            p += 1;
            mark = t;
        } else if p < pat.len() && pat[p] == text[t] {
            p += 1;
            t += 1;
        } else if let Some(s) = star {
            p = s + 1;
            mark += 1;
            t = mark;
        } else {
            return false;
        }
    }
    pat[p..].iter().all(|&b| b == b'*')
}

/// Normalizes a request path for matching (docs/network-access.md): drops the query string, percent-decodes
/// unreserved characters, removes dot segments (`/v1/../admin` is `/admin`).
///
/// Step by step:
/// 1. everything from the first `?` or `#` is dropped; a path not starting with `/` gets one;
/// 2. `%XX` escapes of unreserved characters (`A-Z a-z 0-9 - . _ ~`) are decoded, other escapes
///    keep their encoding with uppercase hex (`%2f` becomes `%2F` and stays inside its segment);
///    bytes that may not appear in a path (space, `"`, `\`, non-ASCII, a `%` that starts no
///    escape…) are percent-encoded;
/// 3. repeated slashes are collapsed (`/v1//x` is `/v1/x`);
/// 4. dot segments are removed (RFC 3986 §5.2.4; `..` never climbs above `/`). A trailing slash
///    is kept.
///
/// # Security
/// Every form a server might read as the same path must reach the matcher as one string, or a deny
/// could be stepped around: `/v1/%2e%2e/admin` and `/v1/../admin` are both `/admin`, and
/// `//admin/x` (which many servers and frameworks treat as `/admin/x`) cannot slip past a deny on
/// `/admin/**`. The proxy should forward the path it decided on, not the raw one.
pub fn normalize_path(raw: &str) -> String {
    normalize_path_cow(raw).into_owned()
}

/// [`normalize_path`] without allocating when the path is already normal (the common case).
pub(crate) fn normalize_path_cow(raw: &str) -> Cow<'_, str> {
    let end = raw.find(['?', '#']).unwrap_or(raw.len());
    let path = &raw[..end];
    if is_normal(path) {
        return Cow::Borrowed(path);
    }
    let mut decoded = String::with_capacity(path.len() + 1);
    if !path.starts_with('/') {
        decoded.push('/');
    }
    push_normalized(path.as_bytes(), &mut decoded);

    let mut out = String::with_capacity(decoded.len());
    let mut trailing = false;
    let parts = decoded[1..].split('/');
    let mut stack: Vec<&str> = Vec::new();
    let mut parts = parts.peekable();
    while let Some(part) = parts.next() {
        let last = parts.peek().is_none();
        match part {
            "" | "." => trailing = last,
            ".." => {
                stack.pop();
                trailing = last;
            }
            seg => {
                stack.push(seg);
                trailing = false;
            }
        }
    }
    for seg in &stack {
        out.push('/');
        out.push_str(seg);
    }
    if out.is_empty() || trailing {
        out.push('/');
    }
    Cow::Owned(out)
}

/// Whether `path` (query already cut) is already what normalization would return.
fn is_normal(path: &str) -> bool {
    let Some(rest) = path.strip_prefix('/') else {
        return false;
    };
    if !rest
        .bytes()
        .all(|b| b == b'/' || (is_pchar(b) && b != b'%'))
    {
        return false;
    }
    let mut parts = rest.split('/').peekable();
    while let Some(part) = parts.next() {
        let last = parts.peek().is_none();
        if (part.is_empty() && !last) || part == "." || part == ".." {
            return false;
        }
    }
    true
}

/// Bytes allowed literally in a normalized path segment (RFC 3986 `pchar`, plus `%` which only
/// ever starts an escape in normalized output).
fn is_pchar(b: u8) -> bool {
    b.is_ascii_alphanumeric()
        || matches!(
            b,
            b'-' | b'.' | b'_' | b'~' // unreserved
                | b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'*' | b'+' | b',' | b';' | b'=' // sub-delims
                | b':' | b'@' | b'%'
        )
}

/// `bytes` as they are, when they are already in normalized form (only `/` and `pchar` bytes
/// other than `%`), so no copy is needed.
pub(crate) fn plain_glob_form(bytes: &[u8]) -> Option<&str> {
    let plain = |b: u8| b == b'/' || (is_pchar(b) && b != b'%');
    if bytes.iter().all(|&b| plain(b)) {
        // ASCII only, so valid UTF-8.
        std::str::from_utf8(bytes).ok()
    } else {
        None
    }
}

/// Appends `bytes` with percent-escapes normalized (step 2 of [`normalize_path`]); also the form
/// in which glob literals are stored, which file-system paths are converted to before matching.
pub(crate) fn push_normalized(bytes: &[u8], out: &mut String) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            if let (Some(hi), Some(lo)) = (
                bytes.get(i + 1).and_then(|&h| hex_value(h)),
                bytes.get(i + 2).and_then(|&l| hex_value(l)),
            ) {
                let decoded = hi << 4 | lo;
                if decoded.is_ascii_alphanumeric() || matches!(decoded, b'-' | b'.' | b'_' | b'~') {
                    out.push(decoded as char);
                } else {
                    out.push('%');
                    out.push(HEX[hi as usize] as char);
                    out.push(HEX[lo as usize] as char);
                }
                i += 3;
                continue;
            }
        } else if b == b'/' || is_pchar(b) {
            out.push(b as char);
            i += 1;
            continue;
        }
        out.push('%');
        out.push(HEX[(b >> 4) as usize] as char);
        out.push(HEX[(b & 0xF) as usize] as char);
        i += 1;
    }
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
#[rustfmt::skip]
mod tests {
    use super::*;

    // Request path normalization: raw path -> normalized.
    #[test]
    fn normalize() {
        let cases: &[(&str, &str)] = &[
            ("/", "/"),
            ("", "/"),
            ("v1/models", "/v1/models"),
            ("/v1/models", "/v1/models"),
            ("/v1/models?key=secret", "/v1/models"),
            ("/v1/models#frag", "/v1/models"),
            ("/v1/models/", "/v1/models/"),
            ("/v1/../admin", "/admin"),
            ("/v1/%2e%2e/admin", "/admin"),
            ("/v1/%2E%2E/admin", "/admin"),
            ("/v1/.%2e/admin", "/admin"),
            ("/v1/./models", "/v1/models"),
            ("/v1/.", "/v1/"),
            ("/v1/..", "/"),
            ("/../../etc/passwd", "/etc/passwd"),
            ("/v1//x", "/v1/x"),
            ("//admin/x", "/admin/x"),
            ("/a//../b", "/b"),
            ("/%7Euser", "/~user"),
            ("/%41%42c", "/ABc"),
            ("/a%2fb", "/a%2Fb"),
            ("/a%2Fb/../c", "/c"),
            ("/a%20b", "/a%20b"),
            ("/a b", "/a%20b"),
            ("/a\\..\\b", "/a%5C..%5Cb"),
            ("/100%", "/100%25"),
            ("/%zz", "/%25zz"),
            ("/caf\u{e9}", "/caf%C3%A9"),
            ("/a:b@c;d=e", "/a:b@c;d=e"),
        ];
        for (raw, want) in cases {
            assert_eq!(normalize_path(raw), *want, "{raw:?}");
            assert_eq!(normalize_path(want), *want, "idempotent on {want:?}");
        }
        assert!(matches!(normalize_path_cow("/v1/models?x"), Cow::Borrowed("/v1/models")));
    }

    // Glob matching: glob, normalized path, expected.
    #[test]
    fn matches() {
        let cases: &[(&str, &str, bool)] = &[
            ("/v1/*", "/v1/models", true),
            ("/v1/*", "/v1/a/b", false),
            ("/v1/*", "/v1", false),
            ("/v1/*", "/v2/models", false),
            ("/v1/**", "/v1", true),
            ("/v1/**", "/v1/", true),
            ("/v1/**", "/v1/models", true),
            ("/v1/**", "/v1/a/b", true),
            ("/v1/**", "/v10", false),
            ("/v1/**", "/v2/a", false),
            ("/**", "/", true),
            ("/**", "/anything/at/all", true),
            ("/", "/", true),
            ("/", "/x", false),
            ("/v1", "/v1", true),
            ("/v1", "/v1/", false),
            ("/v1/", "/v1/", true),
            ("/workspace/**/*.env", "/workspace/a.env", true),
            ("/workspace/**/*.env", "/workspace/x/y/prod.env", true),
            ("/workspace/**/*.env", "/workspace/x/y/prod.envx", false),
            ("/workspace/**/*.env", "/other/a.env", false),
            ("/a/**/b/**/c", "/a/b/c", true),
            ("/a/**/b/**/c", "/a/x/b/y/z/c", true),
            ("/a/**/b/**/c", "/a/x/c", false),
            ("/v*-beta*/x", "/v2-beta3/x", true),
            ("/v*-beta*/x", "/v2-alpha/x", false),
            ("/*.*", "/a.b", true),
            ("/*", "/", true),
            ("/a%7eb", "/a~b", true),
            ("/Admin", "/admin", false),
        ];
        for (glob, path, want) in cases {
            let g = PathGlob::parse(glob).unwrap();
            assert_eq!(g.matches(path), *want, "{glob} vs {path}");
        }
    }

    // Glob parsing: rejected globs, with a word the message must contain.
    #[test]
    fn parse_rejects() {
        let cases: &[(&str, &str)] = &[
            ("v1/*", "starting with \"/\""),
            ("", "starting with \"/\""),
            ("/v1?x=1", "query"),
            ("/v1#x", "query"),
            ("/v1//x", "empty segment"),
            ("/v1/../admin", "dot"),
            ("/v1/./x", "dot"),
            ("/v1/%2e%2e/x", "dot"),
            ("/a**", "whole segment"),
            ("/***", "whole segment"),
            ("/a\nb", "control"),
        ];
        for (raw, want) in cases {
            let err = PathGlob::parse(raw).expect_err(raw);
            assert!(err.contains(want), "{raw:?}: {err}");
        }
    }

    // The literal prefix, used to check that ACL globs lie under their mount.
    #[test]
    fn literal_prefix() {
        let cases: &[(&str, &str)] = &[
            ("/workspace/**", "/workspace"),
            ("/workspace/src/*.rs", "/workspace/src"),
            ("/workspace", "/workspace"),
            ("/*", "/"),
            ("/", "/"),
        ];
        for (glob, want) in cases {
            assert_eq!(PathGlob::parse(glob).unwrap().literal_prefix(), *want, "{glob}");
        }
    }
}
