//! ACL decisions for one mount: a path inside the sandbox -> [`FsAccess`] and the index of the
//! rule that decided it (docs/file-access.md).
//!
//! 1. [`Acl::new`] keeps the mount's rules in order and, for each, the literal directory prefix
//!    of its glob (the segments before the first one with a `*`).
//! 2. [`Acl::decide`] walks the rules in order; the first whose glob matches wins. With `acls`
//!    present an unmatched path has no access; without `acls` every path of the mount is `rw`.
//! 3. [`Acl::traversable`] answers whether a directory may be looked up and listed (filtered)
//!    although it is not readable itself: the mount root always is, and so is an *unmatched*
//!    directory that is an ancestor of an allowing rule's literal prefix (`/workspace/a` for a rule
//!    `/workspace/a/b/**`), or no file below it could ever be reached. A directory that a rule
//!    explicitly sets to `none` is never traversable.
//!
//! Decisions are pure: no I/O, no state, so a decision made now for a path is the decision made
//! for the same path at any other time (no snapshot of what exists).
//!
//! Globs keep their literal parts percent-normalized like request paths (`My Docs` is stored as
//! `My%20Docs`, `é` as `%C3%A9`), so a file path is brought into the same form before matching
//! ([`glob_form`]); otherwise a rule naming a file with a space or a non-ASCII letter would never
//! match it, and a `none` rule would silently not apply.

use std::borrow::Cow;

use crate::config::{FsAccess, FsMount, PathGlob};

/// The outcome of one decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// What the path allows.
    pub access: FsAccess,
    /// Index of the deciding rule in the mount's `acls`; `None` when no rule matched (or the mount
    /// has no `acls`).
    pub rule: Option<usize>,
}

impl Decision {
    /// Whether the decision allows reading (`r` or `rw`).
    pub fn can_read(&self) -> bool {
        rank(self.access) >= rank(FsAccess::R)
    }

    /// Whether the decision allows writing (`rw`).
    pub fn can_write(&self) -> bool {
        self.access == FsAccess::Rw
    }
}

/// Orders accesses: `none` < `r` < `rw`.
pub fn rank(access: FsAccess) -> u8 {
    match access {
        FsAccess::None => 0,
        FsAccess::R => 1,
        FsAccess::Rw => 2,
    }
}

#[derive(Debug, Clone)]
struct Rule {
    glob: PathGlob,
    access: FsAccess,
    /// Literal directory prefix of the glob, e.g. `/workspace/docs` for `/workspace/docs/**`.
    prefix: String,
}

/// The compiled ACL of one mount.
#[derive(Debug, Clone)]
pub struct Acl {
    mount: String,
    /// [`glob_form`] of the mount.
    mount_form: String,
    /// `None`: no `acls`, the whole mount is `rw`.
    rules: Option<Vec<Rule>>,
}

impl Acl {
    /// Compiles the rules of `mount` (already validated by the config layer).
    pub fn new(mount: &FsMount) -> Acl {
        let rules = mount.acls.as_ref().map(|acls| {
            acls.iter()
                .map(|acl| Rule {
                    glob: acl.path.clone(),
                    access: acl.access,
                    prefix: glob_form(literal_prefix(acl.path.as_str()).as_bytes()).into_owned(),
                })
                .collect()
        });
        Acl {
            mount: mount.mount.clone(),
            mount_form: glob_form(mount.mount.as_bytes()).into_owned(),
            rules,
        }
    }

    /// The mount path inside the sandbox (`/workspace`).
    pub fn mount(&self) -> &str {
        &self.mount
    }

    /// Whether the mount has `acls` (without, every path is `rw`).
    pub fn has_rules(&self) -> bool {
        self.rules.is_some()
    }

    /// Decides an absolute path inside the sandbox (as the file system names it, not
    /// percent-encoded): first matching rule wins.
    pub fn decide(&self, path: &str) -> Decision {
        self.decide_raw(path.as_bytes())
    }

    /// [`decide`](Self::decide) for a path that need not be UTF-8 (file names are bytes).
    pub fn decide_raw(&self, path: &[u8]) -> Decision {
        let Some(rules) = &self.rules else {
            return Decision {
                access: FsAccess::Rw,
                rule: None,
            };
        };
        let form = glob_form(path);
        for (index, rule) in rules.iter().enumerate() {
            if rule.glob.matches(&form) {
                return Decision {
                    access: rule.access,
                    rule: Some(index),
                };
            }
        }
        Decision {
            access: FsAccess::None,
            rule: None,
        }
    }

    /// Whether a directory whose decision is `decision` may be looked up and listed (the listing
    /// filtered to visible entries) although it may not be readable itself.
    pub fn traversable(&self, path: &str, decision: &Decision) -> bool {
        self.traversable_raw(path.as_bytes(), decision)
    }

    /// [`traversable`](Self::traversable) for a path that need not be UTF-8.
    pub fn traversable_raw(&self, path: &[u8], decision: &Decision) -> bool {
        if decision.can_read() {
            return true;
        }
        let form = glob_form(path);
        if form == self.mount_form {
            return true;
        }
        if decision.rule.is_some() {
            return false;
        }
        let Some(rules) = &self.rules else {
            return false;
        };
        rules.iter().any(|rule| {
            rule.access != FsAccess::None
                && rule.prefix.len() > form.len()
                && rule.prefix.starts_with(form.as_ref())
                && rule.prefix.as_bytes()[form.len()] == b'/'
        })
    }

    /// Whether `path` (decided as `decision`) shows up in lookups and listings.
    pub fn visible(&self, path: &str, decision: &Decision) -> bool {
        self.visible_raw(path.as_bytes(), decision)
    }

    /// [`visible`](Self::visible) for a path that need not be UTF-8.
    pub fn visible_raw(&self, path: &[u8], decision: &Decision) -> bool {
        decision.can_read() || self.traversable_raw(path, decision)
    }
}

/// `path` in the form glob literals are stored in: bytes outside RFC 3986 `pchar` (and `/`) are
/// percent-encoded, escapes of unreserved characters decoded, other escapes upper-cased, exactly
/// as `config::path_glob` normalizes glob literals. Unlike request-path normalization it keeps
/// `?`, `#` and dot-like segments (`%2E%2E` is a file name here, never a step up).
pub fn glob_form(path: &[u8]) -> Cow<'_, str> {
    if let Some(plain) = crate::config::plain_glob_form(path) {
        return Cow::Borrowed(plain);
    }
    let mut out = String::with_capacity(path.len() + 8);
    crate::config::push_glob_form(path, &mut out);
    Cow::Owned(out)
}

/// The segments of `glob` before the first one holding a wildcard, without a trailing `/`.
fn literal_prefix(glob: &str) -> String {
    let mut prefix = String::new();
    for segment in glob.split('/').skip(1) {
        if segment.contains('*') {
            break;
        }
        prefix.push('/');
        prefix.push_str(segment);
    }
    prefix
}

/// Whether `glob` is a plain subtree rule `P/**` with a literal `P`.
fn plain_subtree(glob: &str) -> Option<&str> {
    let prefix = glob.strip_suffix("/**")?;
    (!prefix.contains('*') && !prefix.is_empty()).then_some(prefix)
}

/// Whether `mount` needs the per-file FUSE layer: `audit` is on, or some rule is not a plain
/// `prefix/**` subtree, or two plain subtrees nest with different accesses (the bind layer mounts
/// whole subtrees: it cannot hide a name inside a shown one).
///
/// # Security
///
/// A `false` answer promises that binding only the granted subtrees (read-only for `r`) enforces
/// the rules exactly; when in doubt the answer is `true` (the caller then refuses to start
/// without `/dev/fuse`).
pub fn needs_per_file_enforcement(mount: &FsMount) -> bool {
    per_file_reason(mount).is_some()
}

/// Why `mount` needs the per-file layer (for the `HIVE_FS_UNENFORCEABLE` message), if it does.
pub fn per_file_reason(mount: &FsMount) -> Option<String> {
    if mount.audit {
        return Some("audit: true reports every write".into());
    }
    let acls = mount.acls.as_ref()?;
    let mut subtrees = Vec::with_capacity(acls.len());
    for (index, acl) in acls.iter().enumerate() {
        match plain_subtree(acl.path.as_str()) {
            Some(prefix) => subtrees.push((index, prefix, acl.access)),
            None => {
                return Some(format!(
                    "acls[{index}] {:?} is not a plain \"<dir>/**\" subtree",
                    acl.path.as_str()
                ))
            }
        }
    }
    for (i, (index_a, a, access_a)) in subtrees.iter().enumerate() {
        for (index_b, b, access_b) in subtrees.iter().skip(i + 1) {
            if access_a != access_b && (is_ancestor_or_self(a, b) || is_ancestor_or_self(b, a)) {
                return Some(format!(
                    "acls[{index_a}] and acls[{index_b}] nest with different accesses"
                ));
            }
        }
    }
    None
}

fn is_ancestor_or_self(ancestor: &str, path: &str) -> bool {
    path == ancestor
        || (path.len() > ancestor.len()
            && path.starts_with(ancestor)
            && path.as_bytes()[ancestor.len()] == b'/')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{FsAcl, FsBackend};

    fn mount(acls: Option<&[(&str, FsAccess)]>, audit: bool) -> FsMount {
        FsMount {
            backend: FsBackend::Local,
            mount: "/workspace".into(),
            source: None,
            acls: acls.map(|acls| {
                acls.iter()
                    .map(|(path, access)| FsAcl {
                        path: PathGlob::parse(path).expect("valid glob"),
                        access: *access,
                    })
                    .collect()
            }),
            audit,
        }
    }

    const ISSUE_ACLS: &[(&str, FsAccess)] = &[
        ("/workspace/**/*.env", FsAccess::None),
        ("/workspace/docs/**", FsAccess::R),
        ("/workspace/**", FsAccess::Rw),
    ];

    #[test]
    fn decisions_first_match_wins() {
        let acl = Acl::new(&mount(Some(ISSUE_ACLS), false));
        let cases: &[(&str, FsAccess, Option<usize>)] = &[
            // the deny glob wins everywhere, at any depth, under docs too
            ("/workspace/secret.env", FsAccess::None, Some(0)),
            ("/workspace/a/b/c.env", FsAccess::None, Some(0)),
            ("/workspace/docs/x.env", FsAccess::None, Some(0)),
            // docs is read-only, itself included
            ("/workspace/docs", FsAccess::R, Some(1)),
            ("/workspace/docs/guide/intro.md", FsAccess::R, Some(1)),
            // everything else is rw, the mount root included
            ("/workspace", FsAccess::Rw, Some(2)),
            ("/workspace/notes.txt", FsAccess::Rw, Some(2)),
            ("/workspace/docsx/a", FsAccess::Rw, Some(2)),
            ("/workspace/env", FsAccess::Rw, Some(2)),
            ("/workspace/x.envy", FsAccess::Rw, Some(2)),
        ];
        for (path, access, rule) in cases {
            let decision = acl.decide(path);
            assert_eq!(decision.access, *access, "{path}");
            assert_eq!(decision.rule, *rule, "{path}");
        }
    }

    #[test]
    fn decisions_without_acls_are_rw() {
        let acl = Acl::new(&mount(None, false));
        for path in ["/workspace", "/workspace/x.env", "/workspace/a/b"] {
            assert_eq!(
                acl.decide(path),
                Decision {
                    access: FsAccess::Rw,
                    rule: None
                },
                "{path}"
            );
        }
    }

    #[test]
    fn decisions_unmatched_have_no_access() {
        let acl = Acl::new(&mount(Some(&[("/workspace/src/**", FsAccess::Rw)]), false));
        let cases: &[(&str, FsAccess, Option<usize>)] = &[
            ("/workspace/other", FsAccess::None, None),
            ("/workspace", FsAccess::None, None),
            ("/workspace/src", FsAccess::Rw, Some(0)),
            ("/workspace/srcx", FsAccess::None, None),
        ];
        for (path, access, rule) in cases {
            let decision = acl.decide(path);
            assert_eq!((decision.access, decision.rule), (*access, *rule), "{path}");
        }
    }

    #[test]
    fn traversal_of_unmatched_ancestors() {
        let acl = Acl::new(&mount(
            Some(&[
                ("/workspace/a/private/**", FsAccess::None),
                ("/workspace/a/b/**", FsAccess::Rw),
                ("/workspace/**/*.env", FsAccess::None),
            ]),
            false,
        ));
        let cases: &[(&str, bool)] = &[
            // the mount root always
            ("/workspace", true),
            // an unmatched ancestor of an allowing prefix
            ("/workspace/a", true),
            // readable itself
            ("/workspace/a/b", true),
            // an ancestor of a `none` prefix only: nothing to reach
            ("/workspace/a/private", false),
            // explicitly none (a directory named *.env), though an ancestor of nothing
            ("/workspace/a.env", false),
            // a sibling whose name shares the prefix's first bytes
            ("/workspace/ab", false),
        ];
        for (path, traversable) in cases {
            let decision = acl.decide(path);
            assert_eq!(acl.traversable(path, &decision), *traversable, "{path}");
        }
    }

    #[test]
    fn names_match_rules_written_plainly() {
        let acl = Acl::new(&mount(
            Some(&[
                ("/workspace/My Docs/**", FsAccess::None),
                ("/workspace/données/*.txt", FsAccess::R),
                ("/workspace/100%/**", FsAccess::None),
                ("/workspace/docs/**", FsAccess::R),
                ("/workspace/**/*.env", FsAccess::None),
                ("/workspace/**", FsAccess::Rw),
            ]),
            false,
        ));
        let cases: &[(&[u8], Option<usize>)] = &[
            // a space and a non-ASCII letter, as the file system names them
            (b"/workspace/My Docs/x", Some(0)),
            ("/workspace/données/a.txt".as_bytes(), Some(1)),
            // a literal percent sign
            (b"/workspace/100%/x", Some(2)),
            // an escape in a name is not a step up: `%2E%2E` stays under docs
            (b"/workspace/docs/%2E%2E/x", Some(3)),
            // an escaped dot still makes a .env name
            (b"/workspace/a%2Eenv", Some(4)),
            // a name that is not UTF-8 is still a .env
            (b"/workspace/x\xff.env", Some(4)),
            // `?` and `#` are ordinary name characters
            (b"/workspace/a?b#c", Some(5)),
        ];
        for (path, rule) in cases {
            assert_eq!(
                acl.decide_raw(path).rule,
                *rule,
                "{}",
                String::from_utf8_lossy(path)
            );
        }
    }

    #[test]
    fn glob_forms() {
        let cases: &[(&[u8], &str)] = &[
            (b"/workspace/a.txt", "/workspace/a.txt"),
            (b"/w/My Docs", "/w/My%20Docs"),
            ("/w/é".as_bytes(), "/w/%C3%A9"),
            (b"/w/%41%2f%2E", "/w/A%2F."),
            (b"/w/100%", "/w/100%25"),
            (b"/w/a?b#c", "/w/a%3Fb%23c"),
        ];
        for (path, form) in cases {
            assert_eq!(glob_form(path), *form, "{}", String::from_utf8_lossy(path));
        }
    }

    #[test]
    fn literal_prefixes() {
        let cases: &[(&str, &str)] = &[
            ("/workspace/**", "/workspace"),
            ("/workspace/**/*.env", "/workspace"),
            ("/workspace/docs/**", "/workspace/docs"),
            ("/workspace/a*/b", "/workspace"),
            ("/workspace/a/b.txt", "/workspace/a/b.txt"),
        ];
        for (glob, prefix) in cases {
            assert_eq!(literal_prefix(glob), *prefix, "{glob}");
        }
    }

    #[test]
    fn per_file_enforcement_needed() {
        type Rules<'a> = Option<&'a [(&'a str, FsAccess)]>;
        let cases: &[(Rules, bool, bool)] = &[
            // no acls, no audit: the mount alone does it
            (None, false, false),
            // audit needs the FUSE layer
            (None, true, true),
            // plain disjoint subtrees
            (
                Some(&[
                    ("/workspace/src/**", FsAccess::Rw),
                    ("/workspace/data/**", FsAccess::R),
                ]),
                false,
                false,
            ),
            // a glob that is not a subtree
            (
                Some(&[("/workspace/**/*.env", FsAccess::None)]),
                false,
                true,
            ),
            (
                Some(&[("/workspace/secrets/*", FsAccess::None)]),
                false,
                true,
            ),
            // a single file
            (Some(&[("/workspace/a.txt", FsAccess::R)]), false, true),
            // nested subtrees with different accesses (first match decides inside a subtree)
            (
                Some(&[
                    ("/workspace/docs/**", FsAccess::R),
                    ("/workspace/**", FsAccess::Rw),
                ]),
                false,
                true,
            ),
            // nested with the same access
            (
                Some(&[
                    ("/workspace/docs/**", FsAccess::Rw),
                    ("/workspace/**", FsAccess::Rw),
                ]),
                false,
                false,
            ),
            // the issue's example
            (Some(ISSUE_ACLS), false, true),
        ];
        for (acls, audit, needed) in cases {
            assert_eq!(
                needs_per_file_enforcement(&mount(*acls, *audit)),
                *needed,
                "{acls:?} audit={audit}"
            );
        }
    }
}
