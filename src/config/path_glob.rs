//! Path globs (`/v1/*`, `/v1/**`, `/workspace/**/*.env`) and request-path normalization.

/// A validated path glob: `*` matches within one segment, `**` across segments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathGlob {
    source: String,
}

impl PathGlob {
    /// Parses a glob; it must start with `/`.
    pub fn parse(raw: &str) -> Result<PathGlob, String> {
        let _ = raw;
        todo!()
    }

    /// Whether a normalized path (see [`normalize_path`]) matches.
    pub fn matches(&self, path: &str) -> bool {
        let _ = path;
        todo!()
    }

    /// The glob as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }
}

/// Normalizes a request path for matching (SPEC §2): drops the query string, percent-decodes
/// unreserved characters, removes dot segments (`/v1/../admin` is `/admin`).
pub fn normalize_path(raw: &str) -> String {
    let _ = raw;
    todo!()
}
