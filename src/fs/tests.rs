//! The ACL file system mounted for real (FUSE on a temp dir, as root) and attacked with std::fs
//! and real tools. Tests are named after the escape they check; each skips, saying why, where
//! `/dev/fuse` cannot be opened or mounted.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use parking_lot::Mutex;
use serde_json::{Map, Value};

use super::{field, fuse_available, mount_fuse_on, op, AclFs, EventSink, FsHandle};
use crate::config::{FsAccess, FsAcl, FsBackend, FsMount, PathGlob};
use crate::events::{kind, EventBus, Since};

/// The issue's rules: `.env` files hidden everywhere, docs read-only, the rest writable.
const ISSUE_ACLS: &[(&str, FsAccess)] = &[
    ("/workspace/**/*.env", FsAccess::None),
    ("/workspace/docs/**", FsAccess::R),
    ("/workspace/**", FsAccess::Rw),
];
const RULE_ENV: Option<u64> = Some(0);
const RULE_DOCS: Option<u64> = Some(1);

#[derive(Default)]
struct Collected(Mutex<Vec<(String, Map<String, Value>)>>);

impl EventSink for Collected {
    fn emit(&self, kind: &str, fields: Map<String, Value>) {
        self.0.lock().push((kind.to_owned(), fields));
    }
}

/// One attack in a table: what the sandbox tries.
type Action = &'static dyn Fn(&Mounted) -> std::io::Result<()>;

/// `(path, operation, rule)` of an event.
type Seen = (String, String, Option<u64>);

pub(super) fn fs_mount(acls: Option<&[(&str, FsAccess)]>, audit: bool) -> FsMount {
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

/// Why FUSE tests cannot run here, if they cannot.
pub(super) fn skip_reason() -> Option<&'static str> {
    if !fuse_available() {
        return Some("/dev/fuse cannot be opened by this process");
    }
    if !rustix::process::geteuid().is_root() {
        return Some("mounting FUSE on a host directory needs root");
    }
    None
}

/// A source dir served over FUSE on a target dir; unmounted on drop.
pub(super) struct Mounted {
    source: tempfile::TempDir,
    target: tempfile::TempDir,
    events: Arc<Collected>,
    handle: Option<FsHandle>,
}

impl Mounted {
    /// Mounts; `None` (after printing why) where FUSE is unavailable.
    pub(super) fn new(
        acls: Option<&[(&str, FsAccess)]>,
        audit: bool,
        passthrough: bool,
        seed: impl FnOnce(&Path),
    ) -> Option<Mounted> {
        let collected = Arc::new(Collected::default());
        let sink: Arc<dyn EventSink> = collected.clone();
        let configure = |fs: AclFs| {
            if passthrough {
                fs
            } else {
                fs.without_passthrough()
            }
        };
        Self::with_sink(acls, audit, seed, sink, collected, configure)
    }

    /// Mounts with passthrough and `configure` applied to the server.
    fn configured(
        acls: Option<&[(&str, FsAccess)]>,
        seed: impl FnOnce(&Path),
        configure: impl FnOnce(AclFs) -> AclFs,
    ) -> Option<Mounted> {
        let collected = Arc::new(Collected::default());
        let sink: Arc<dyn EventSink> = collected.clone();
        Self::with_sink(acls, false, seed, sink, collected, configure)
    }

    fn handle(&self) -> &FsHandle {
        self.handle.as_ref().expect("served")
    }

    /// Mounts with events going to `sink` (`collected` is what [`Self::denied`] reads).
    fn with_sink(
        acls: Option<&[(&str, FsAccess)]>,
        audit: bool,
        seed: impl FnOnce(&Path),
        sink: Arc<dyn EventSink>,
        collected: Arc<Collected>,
        configure: impl FnOnce(AclFs) -> AclFs,
    ) -> Option<Mounted> {
        if let Some(reason) = skip_reason() {
            eprintln!("skipped: {reason}");
            return None;
        }
        let source = tempfile::tempdir().expect("source dir");
        let target = tempfile::tempdir().expect("target dir");
        seed(source.path());
        let source_fd = rustix::fs::open(
            source.path(),
            rustix::fs::OFlags::PATH | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .expect("open source");
        let fs = AclFs::with_sink(&fs_mount(acls, audit), source_fd, sink).expect("AclFs");
        let fs = configure(fs);
        let fuse_fd = mount_fuse_on(target.path()).expect("mount FUSE");
        let handle = fs.serve(fuse_fd).expect("serve");
        Some(Mounted {
            source,
            target,
            events: collected,
            handle: Some(handle),
        })
    }

    /// A path in the mounted view.
    pub(super) fn t(&self, rel: &str) -> PathBuf {
        self.target.path().join(rel)
    }

    /// A path in the source (the host's side).
    pub(super) fn s(&self, rel: &str) -> PathBuf {
        self.source.path().join(rel)
    }

    fn take(&self, wanted: &str) -> Vec<Seen> {
        let mut events = self.events.0.lock();
        let all = std::mem::take(&mut *events);
        all.into_iter()
            .filter(|(kind, _)| kind == wanted)
            .map(|(_, fields)| {
                let text = |name: &str| {
                    fields
                        .get(name)
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_owned()
                };
                (
                    text(field::PATH),
                    text(field::OPERATION),
                    fields.get(field::RULE).and_then(Value::as_u64),
                )
            })
            .collect()
    }

    /// Drains the `fs.denied` events seen so far.
    fn denied(&self) -> Vec<Seen> {
        self.take(kind::FS_DENIED)
    }

    /// Runs `sh -c script` in the mounted view; returns (success, stderr).
    fn sh(&self, script: &str) -> (bool, String) {
        let out = Command::new("sh")
            .arg("-c")
            .arg(script)
            .current_dir(self.target.path())
            .output()
            .expect("run sh");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = rustix::mount::unmount(self.target.path(), rustix::mount::UnmountFlags::DETACH);
        if let Some(handle) = self.handle.take() {
            // The session ends once the detached mount's last reference goes; never hang a test
            // run on a leaked one.
            for _ in 0..500 {
                if handle.is_finished() {
                    let _ = handle.join();
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            eprintln!(
                "the FUSE server of {} did not stop",
                self.target.path().display()
            );
        }
    }
}

fn seed_issue_tree(src: &Path) {
    fs::write(src.join("secret.env"), b"API_KEY=hunter2").expect("seed");
    fs::write(src.join("notes.txt"), b"notes").expect("seed");
    fs::create_dir_all(src.join("docs/guide")).expect("seed");
    fs::write(src.join("docs/readme.md"), b"read me").expect("seed");
    fs::write(src.join("docs/guide/.env"), b"DOCS_SECRET=1").expect("seed");
    fs::create_dir_all(src.join("app/config")).expect("seed");
    fs::write(src.join("app/config/prod.env"), b"DB=secret").expect("seed");
}

fn errno_of(result: std::io::Result<impl Sized>) -> Option<i32> {
    result.err().and_then(|err| err.raw_os_error())
}

fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn seen(path: &str, operation: &str, rule: Option<u64>) -> Seen {
    (path.to_owned(), operation.to_owned(), rule)
}

#[test]
fn cannot_read_a_env_file_that_existed_at_start() {
    let Some(m) = Mounted::new(Some(ISSUE_ACLS), false, true, seed_issue_tree) else {
        return;
    };
    let cases: &[(&str, &str)] = &[
        ("secret.env", "/workspace/secret.env"),
        ("app/config/prod.env", "/workspace/app/config/prod.env"),
        // under the read-only docs too: the first rule wins
        ("docs/guide/.env", "/workspace/docs/guide/.env"),
    ];
    for (rel, path) in cases {
        assert_eq!(errno_of(fs::read(m.t(rel))), Some(libc::ENOENT), "{rel}");
        assert_eq!(m.denied(), vec![seen(path, op::LOOKUP, RULE_ENV)], "{rel}");
    }
    // hidden from listings, and listing is not a refusal
    assert_eq!(names(&m.t("")), ["app", "docs", "notes.txt"]);
    assert_eq!(names(&m.t("docs/guide")), Vec::<String>::new());
    assert_eq!(m.denied(), vec![]);
    // and the tools agree
    let (ok, _) = m.sh("cat secret.env");
    assert!(!ok);
    assert_eq!(
        fs::read(m.s("secret.env")).expect("source intact"),
        b"API_KEY=hunter2"
    );
}

#[test]
fn cannot_discover_hidden_files_by_listing() {
    let Some(m) = Mounted::new(Some(ISSUE_ACLS), false, true, seed_issue_tree) else {
        return;
    };
    let out = Command::new("find")
        .args([".", "-printf", "%y %p\\n"])
        .current_dir(m.t(""))
        .output()
        .expect("find");
    assert!(out.status.success());
    let mut found: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    found.sort();
    assert_eq!(
        found,
        [
            "d .",
            "d ./app",
            "d ./app/config",
            "d ./docs",
            "d ./docs/guide",
            "f ./docs/readme.md",
            "f ./notes.txt",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect::<Vec<_>>()
    );
    let (ok, err) = m.sh("ls -la docs/guide app/config | grep -c env; test $? -eq 1");
    assert!(ok, "{err}");
    assert_eq!(fs::metadata(m.t("docs/readme.md")).expect("stat").len(), 7);
    assert_eq!(m.denied(), vec![]);
}

#[test]
fn cannot_read_hidden_names_with_spaces_or_other_bytes() {
    use std::os::unix::ffi::OsStrExt;
    const ACLS: &[(&str, FsAccess)] = &[
        ("/workspace/My Secrets/**", FsAccess::None),
        ("/workspace/**/*.env", FsAccess::None),
        ("/workspace/**", FsAccess::Rw),
    ];
    let odd = std::ffi::OsStr::from_bytes(b"x\xff.env");
    let Some(m) = Mounted::new(Some(ACLS), false, true, |src| {
        fs::create_dir(src.join("My Secrets")).expect("seed");
        fs::write(src.join("My Secrets/key"), b"k").expect("seed");
        fs::write(src.join(odd), b"k").expect("seed");
        fs::write(src.join("a%2Eenv"), b"k").expect("seed");
    }) else {
        return;
    };
    assert_eq!(
        errno_of(fs::read(m.t("My Secrets/key"))),
        Some(libc::ENOENT)
    );
    assert_eq!(errno_of(fs::read(m.t("").join(odd))), Some(libc::ENOENT));
    assert_eq!(errno_of(fs::read(m.t("a%2Eenv"))), Some(libc::ENOENT));
    assert_eq!(
        m.denied(),
        vec![
            seen("/workspace/My Secrets", op::LOOKUP, Some(0)),
            seen("/workspace/x\u{fffd}.env", op::LOOKUP, Some(1)),
            seen("/workspace/a%2Eenv", op::LOOKUP, Some(1)),
        ]
    );
    assert_eq!(names(&m.t("")), Vec::<String>::new());
}

#[test]
fn cannot_read_a_env_file_the_host_creates_after_mount() {
    let Some(m) = Mounted::new(Some(ISSUE_ACLS), false, true, seed_issue_tree) else {
        return;
    };
    // the sandbox has looked around first (no snapshot to miss later files)
    assert_eq!(names(&m.t("")), ["app", "docs", "notes.txt"]);
    fs::write(m.s("later.env"), b"LATE=1").expect("host write");
    fs::create_dir_all(m.s("new/deep")).expect("host mkdir");
    fs::write(m.s("new/deep/x.env"), b"X=1").expect("host write");
    fs::write(m.s("new/deep/ok.txt"), b"ok").expect("host write");
    assert_eq!(errno_of(fs::read(m.t("later.env"))), Some(libc::ENOENT));
    assert_eq!(
        errno_of(fs::read(m.t("new/deep/x.env"))),
        Some(libc::ENOENT)
    );
    assert_eq!(fs::read(m.t("new/deep/ok.txt")).expect("visible"), b"ok");
    assert_eq!(names(&m.t("new/deep")), ["ok.txt"]);
    assert_eq!(
        m.denied(),
        vec![
            seen("/workspace/later.env", op::LOOKUP, RULE_ENV),
            seen("/workspace/new/deep/x.env", op::LOOKUP, RULE_ENV),
        ]
    );
}

#[test]
fn cannot_create_a_env_file() {
    let Some(m) = Mounted::new(Some(ISSUE_ACLS), false, true, seed_issue_tree) else {
        return;
    };
    let cases: &[(&str, Action, &str, &str)] = &[
        (
            "create",
            &|m| fs::write(m.t("new.env"), b"x"),
            "/workspace/new.env",
            op::CREATE,
        ),
        (
            "mkdir",
            &|m| fs::create_dir(m.t("dir.env")),
            "/workspace/dir.env",
            op::MKDIR,
        ),
        // existing hidden name: EACCES, never EEXIST (which would reveal it); the one event is
        // the kernel's lookup of the name
        (
            "create over hidden",
            &|m| {
                fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(m.t("secret.env"))
                    .map(drop)
            },
            "/workspace/secret.env",
            op::LOOKUP,
        ),
        (
            "symlink",
            &|m| symlink("notes.txt", m.t("s.env")),
            "/workspace/s.env",
            op::SYMLINK,
        ),
        (
            "nested",
            &|m| fs::write(m.t("app/x.env"), b"x"),
            "/workspace/app/x.env",
            op::CREATE,
        ),
    ];
    for (name, action, path, operation) in cases {
        assert_eq!(errno_of(action(&m)), Some(libc::EACCES), "{name}");
        assert_eq!(m.denied(), vec![seen(path, operation, RULE_ENV)], "{name}");
    }
    assert!(!m.s("new.env").exists());
    assert!(!m.s("dir.env").exists());
    let (ok, _) = m.sh("echo x > shell.env");
    assert!(!ok);
    assert!(!m.s("shell.env").exists());
    assert_eq!(
        fs::read(m.s("secret.env")).expect("intact"),
        b"API_KEY=hunter2"
    );
}

#[test]
fn cannot_reach_a_denied_file_by_mv() {
    let Some(m) = Mounted::new(Some(ISSUE_ACLS), false, true, seed_issue_tree) else {
        return;
    };
    // rename the hidden file to an allowed name: it cannot even be found
    assert_eq!(
        errno_of(fs::rename(m.t("secret.env"), m.t("notes2.txt"))),
        Some(libc::ENOENT)
    );
    assert_eq!(
        m.denied(),
        vec![seen("/workspace/secret.env", op::LOOKUP, RULE_ENV)]
    );
    // move a visible file over the hidden one: refused, the secret stays
    assert_eq!(
        errno_of(fs::rename(m.t("notes.txt"), m.t("secret.env"))),
        Some(libc::EACCES)
    );
    assert_eq!(
        m.denied(),
        vec![seen("/workspace/secret.env", op::LOOKUP, RULE_ENV)]
    );
    let (ok, _) = m.sh("mv secret.env notes.txt");
    assert!(!ok);
    assert_eq!(
        fs::read(m.s("secret.env")).expect("intact"),
        b"API_KEY=hunter2"
    );
    assert_eq!(fs::read(m.s("notes.txt")).expect("intact"), b"notes");
    assert!(!m.s("notes2.txt").exists());
}

#[test]
fn cannot_reach_a_denied_file_by_ln() {
    let Some(m) = Mounted::new(Some(ISSUE_ACLS), false, true, seed_issue_tree) else {
        return;
    };
    assert_eq!(
        errno_of(fs::hard_link(m.t("secret.env"), m.t("x"))),
        Some(libc::ENOENT)
    );
    assert_eq!(
        m.denied(),
        vec![seen("/workspace/secret.env", op::LOOKUP, RULE_ENV)]
    );
    // a read-only file must not gain a writable name
    assert_eq!(
        errno_of(fs::hard_link(m.t("docs/readme.md"), m.t("mine.md"))),
        Some(libc::EACCES)
    );
    assert_eq!(
        m.denied(),
        vec![seen("/workspace/docs/readme.md", op::LINK, RULE_DOCS)]
    );
    // nor a visible file a hidden name
    assert_eq!(
        errno_of(fs::hard_link(m.t("notes.txt"), m.t("y.env"))),
        Some(libc::EACCES)
    );
    assert_eq!(
        m.denied(),
        vec![seen("/workspace/y.env", op::LINK, RULE_ENV)]
    );
    let (ok, _) = m.sh("ln secret.env x2");
    assert!(!ok);
    assert!(!m.s("x").exists() && !m.s("x2").exists() && !m.s("mine.md").exists());
    // a hard link the host made is decided on its own name (the host chose to expose it)
    fs::hard_link(m.s("secret.env"), m.s("host-link.txt")).expect("host link");
    fs::hard_link(m.s("notes.txt"), m.s("host-link.env")).expect("host link");
    assert!(fs::read(m.t("host-link.txt")).is_ok());
    assert_eq!(errno_of(fs::read(m.t("host-link.env"))), Some(libc::ENOENT));
}

#[test]
fn cannot_reach_a_denied_file_by_a_symlink() {
    let Some(m) = Mounted::new(Some(ISSUE_ACLS), false, true, |src| {
        seed_issue_tree(src);
        // made by the host, relative and absolute-into-the-mount
        symlink("secret.env", src.join("host-link")).expect("seed");
    }) else {
        return;
    };
    symlink("secret.env", m.t("link")).expect("a symlink at an rw path may be made");
    symlink(m.t("app/config/prod.env"), m.t("abs-link")).expect("symlink");
    symlink("../secret.env", m.t("app/up-link")).expect("symlink");
    m.denied();
    let cases: &[(&str, &str)] = &[
        ("link", "/workspace/secret.env"),
        ("host-link", "/workspace/secret.env"),
        ("abs-link", "/workspace/app/config/prod.env"),
        ("app/up-link", "/workspace/secret.env"),
    ];
    // The kernel caches "no such name" for a hidden name: the first lookup of each target is
    // refused (and reported) by the server, later ones by the kernel's cache.
    let mut reported = std::collections::HashSet::new();
    for (rel, target) in cases {
        assert_eq!(errno_of(fs::read(m.t(rel))), Some(libc::ENOENT), "{rel}");
        let expected = if reported.insert(*target) {
            vec![seen(target, op::LOOKUP, RULE_ENV)]
        } else {
            vec![]
        };
        assert_eq!(m.denied(), expected, "{rel}");
    }
    let (ok, _) = m.sh("cat link");
    assert!(!ok);
}

#[test]
fn cannot_reach_a_denied_file_by_dotdot() {
    let Some(m) = Mounted::new(Some(ISSUE_ACLS), false, true, seed_issue_tree) else {
        return;
    };
    // (a repeated hidden target is answered by the kernel's negative entry: no second event)
    for (rel, events) in [
        ("docs/../secret.env", 1),
        ("app/config/../../secret.env", 0),
        ("docs/guide/../../app/config/prod.env", 1),
    ] {
        assert_eq!(errno_of(fs::read(m.t(rel))), Some(libc::ENOENT), "{rel}");
        assert_eq!(m.denied().len(), events, "{rel}");
    }
    let (ok, _) = m.sh("cat docs/../secret.env");
    assert!(!ok);
}

#[test]
fn cannot_follow_a_symlink_the_host_swaps_in_out_of_the_source() {
    let Some(m) = Mounted::new(Some(ISSUE_ACLS), false, true, |src| {
        fs::create_dir(src.join("d")).expect("seed");
        fs::write(src.join("d/passwd"), b"mine").expect("seed");
    }) else {
        return;
    };
    // the sandbox holds the directory open, then the host replaces it with a symlink out
    let dir = rustix::fs::open(
        m.t("d"),
        rustix::fs::OFlags::PATH | rustix::fs::OFlags::DIRECTORY,
        rustix::fs::Mode::empty(),
    )
    .expect("open d");
    fs::rename(m.s("d"), m.s("d-old")).expect("host rename");
    symlink("/etc", m.s("d")).expect("host symlink");
    let through = rustix::fs::openat(
        &dir,
        "passwd",
        rustix::fs::OFlags::RDONLY,
        rustix::fs::Mode::empty(),
    );
    assert!(
        through.is_err(),
        "the server must not resolve d/passwd through the symlink"
    );
}

#[test]
fn docs_are_readable_but_not_writable() {
    let Some(m) = Mounted::new(Some(ISSUE_ACLS), false, true, seed_issue_tree) else {
        return;
    };
    assert_eq!(fs::read(m.t("docs/readme.md")).expect("read"), b"read me");
    assert_eq!(names(&m.t("docs")), ["guide", "readme.md"]);
    assert_eq!(m.denied(), vec![]);
    let cases: &[(&str, Action, &str, &str)] = &[
        (
            "write",
            &|m| {
                fs::OpenOptions::new()
                    .write(true)
                    .open(m.t("docs/readme.md"))
                    .map(drop)
            },
            "/workspace/docs/readme.md",
            op::OPEN,
        ),
        (
            "truncate by open",
            &|m| {
                fs::OpenOptions::new()
                    .write(true)
                    .truncate(true)
                    .open(m.t("docs/readme.md"))
                    .map(drop)
            },
            "/workspace/docs/readme.md",
            op::OPEN,
        ),
        (
            "create",
            &|m| fs::write(m.t("docs/new.md"), b"x"),
            "/workspace/docs/new.md",
            op::CREATE,
        ),
        (
            "mkdir",
            &|m| fs::create_dir(m.t("docs/sub")),
            "/workspace/docs/sub",
            op::MKDIR,
        ),
        (
            "delete",
            &|m| fs::remove_file(m.t("docs/readme.md")),
            "/workspace/docs/readme.md",
            op::UNLINK,
        ),
        (
            "rmdir",
            &|m| fs::remove_dir(m.t("docs/guide")),
            "/workspace/docs/guide",
            op::RMDIR,
        ),
        (
            "rename within",
            &|m| fs::rename(m.t("docs/readme.md"), m.t("docs/other.md")),
            "/workspace/docs/readme.md",
            op::RENAME,
        ),
        (
            "rename out",
            &|m| fs::rename(m.t("docs/readme.md"), m.t("readme.md")),
            "/workspace/docs/readme.md",
            op::RENAME,
        ),
        (
            "rename in",
            &|m| fs::rename(m.t("notes.txt"), m.t("docs/notes.txt")),
            "/workspace/docs/notes.txt",
            op::RENAME,
        ),
        (
            "chmod",
            &|m| fs::set_permissions(m.t("docs/readme.md"), fs::Permissions::from_mode(0o777)),
            "/workspace/docs/readme.md",
            op::CHMOD,
        ),
        (
            "rename the directory",
            &|m| fs::rename(m.t("docs"), m.t("docs2")),
            "/workspace/docs",
            op::RENAME,
        ),
        (
            "symlink",
            &|m| symlink("x", m.t("docs/l")),
            "/workspace/docs/l",
            op::SYMLINK,
        ),
    ];
    for (name, action, path, operation) in cases {
        assert_eq!(errno_of(action(&m)), Some(libc::EACCES), "{name}");
        assert_eq!(m.denied(), vec![seen(path, operation, RULE_DOCS)], "{name}");
    }
    assert_eq!(fs::read(m.s("docs/readme.md")).expect("intact"), b"read me");
    assert_eq!(names(&m.s("docs")), ["guide", "readme.md"]);
    let (ok, _) = m.sh("echo x >> docs/readme.md");
    assert!(!ok);
}

#[test]
fn everything_else_is_writable_and_lands_in_the_source() {
    let Some(m) = Mounted::new(Some(ISSUE_ACLS), false, true, seed_issue_tree) else {
        return;
    };
    let (ok, err) = m.sh(
        "set -e; mkdir -p a/b; echo hello > a/b/f; echo more >> a/b/f; mv a/b/f a/g; \
         ln a/g a/h; ln -s g a/s; cat a/s >/dev/null; chmod 600 a/g; touch -d @1000000000 a/g; \
         rm a/h; rmdir a/b; truncate -s 3 notes.txt; mv a c",
    );
    assert!(ok, "{err}");
    assert_eq!(fs::read(m.s("c/g")).expect("moved"), b"hello\nmore\n");
    assert_eq!(fs::read_link(m.s("c/s")).expect("symlink"), Path::new("g"));
    assert_eq!(fs::read(m.s("notes.txt")).expect("truncated"), b"not");
    let meta = fs::metadata(m.s("c/g")).expect("stat");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    use std::os::unix::fs::MetadataExt;
    assert_eq!(meta.mtime(), 1_000_000_000);
    assert!(!m.s("a").exists() && !m.s("c/h").exists() && !m.s("c/b").exists());
    // random access and reads of what was written
    let mut file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(m.t("data.bin"))
        .expect("open rw");
    file.write_all(&[7u8; 300_000]).expect("write");
    file.sync_all().expect("fsync");
    drop(file);
    let mut back = Vec::new();
    fs::File::open(m.t("data.bin"))
        .expect("open")
        .read_to_end(&mut back)
        .expect("read");
    assert_eq!(back.len(), 300_000);
    assert_eq!(fs::read(m.s("data.bin")).expect("in source").len(), 300_000);
    assert_eq!(m.denied(), vec![]);
}

#[test]
fn a_mount_without_acls_is_fully_writable() {
    let Some(m) = Mounted::new(None, false, true, seed_issue_tree) else {
        return;
    };
    assert_eq!(
        fs::read(m.t("secret.env")).expect("read"),
        b"API_KEY=hunter2"
    );
    fs::write(m.t("docs/readme.md"), b"changed").expect("write docs");
    fs::write(m.t("new.env"), b"x").expect("create env");
    fs::rename(m.t("secret.env"), m.t("moved.env")).expect("rename");
    fs::remove_dir_all(m.t("app")).expect("rm -r");
    assert_eq!(fs::read(m.s("docs/readme.md")).expect("source"), b"changed");
    assert!(m.s("new.env").exists() && m.s("moved.env").exists() && !m.s("app").exists());
    assert_eq!(m.denied(), vec![]);
}

#[test]
fn a_directory_rename_cannot_expose_a_hidden_subtree() {
    const ACLS: &[(&str, FsAccess)] = &[
        ("/workspace/a/private/**", FsAccess::None),
        ("/workspace/**", FsAccess::Rw),
    ];
    let Some(m) = Mounted::new(Some(ACLS), false, true, |src| {
        fs::create_dir_all(src.join("a/private")).expect("seed");
        fs::write(src.join("a/private/key"), b"k").expect("seed");
        fs::create_dir_all(src.join("plain/x")).expect("seed");
    }) else {
        return;
    };
    assert_eq!(names(&m.t("a")), Vec::<String>::new());
    assert_eq!(errno_of(fs::rename(m.t("a"), m.t("b"))), Some(libc::EACCES));
    assert_eq!(
        m.denied(),
        vec![seen("/workspace/a/private", op::RENAME, Some(0))]
    );
    assert!(m.s("a/private/key").exists() && !m.s("b").exists());
    // moving a directory into the hidden place is fine (it only loses access)
    fs::rename(m.t("plain"), m.t("plain2")).expect("rename without hidden content");
    assert!(m.s("plain2/x").exists());
}

#[test]
fn unmatched_paths_are_hidden_and_their_ancestors_traversable() {
    const ACLS: &[(&str, FsAccess)] = &[("/workspace/src/app/**", FsAccess::Rw)];
    let Some(m) = Mounted::new(Some(ACLS), false, true, |src| {
        fs::create_dir_all(src.join("src/app")).expect("seed");
        fs::write(src.join("src/app/main.rs"), b"fn main() {}").expect("seed");
        fs::write(src.join("src/other.rs"), b"other").expect("seed");
        fs::write(src.join("top.txt"), b"top").expect("seed");
    }) else {
        return;
    };
    assert_eq!(names(&m.t("")), ["src"]);
    assert_eq!(names(&m.t("src")), ["app"]);
    assert_eq!(
        fs::read(m.t("src/app/main.rs")).expect("read"),
        b"fn main() {}"
    );
    assert_eq!(errno_of(fs::read(m.t("top.txt"))), Some(libc::ENOENT));
    assert_eq!(
        m.denied(),
        vec![seen("/workspace/top.txt", op::LOOKUP, None)]
    );
    assert_eq!(
        errno_of(fs::write(m.t("src/new.rs"), b"x")),
        Some(libc::EACCES)
    );
    assert_eq!(
        m.denied(),
        vec![seen("/workspace/src/new.rs", op::CREATE, None)]
    );
    fs::write(m.t("src/app/new.rs"), b"x").expect("write in the allowed tree");
}

#[test]
fn audit_reports_writes_creates_renames_and_deletes() {
    let Some(m) = Mounted::new(None, true, true, |src| {
        fs::write(src.join("old.txt"), b"old").expect("seed");
    }) else {
        return;
    };
    fs::write(m.t("new.txt"), b"x").expect("create");
    fs::OpenOptions::new()
        .append(true)
        .open(m.t("old.txt"))
        .expect("open for append")
        .write_all(b"more")
        .expect("append");
    fs::rename(m.t("new.txt"), m.t("renamed.txt")).expect("rename");
    fs::remove_file(m.t("renamed.txt")).expect("unlink");
    fs::create_dir(m.t("d")).expect("mkdir");
    let _ = fs::read(m.t("old.txt")).expect("reads are not audited");
    let ops: Vec<(String, String)> = m
        .take(kind::FS_ACCESS)
        .into_iter()
        .map(|(path, operation, _)| (path, operation))
        .collect();
    let expected: Vec<(String, String)> = [
        ("/workspace/new.txt", op::CREATE),
        ("/workspace/old.txt", op::WRITE),
        ("/workspace/new.txt", op::RENAME),
        ("/workspace/renamed.txt", op::UNLINK),
        ("/workspace/d", op::MKDIR),
    ]
    .iter()
    .map(|(p, o)| (p.to_string(), o.to_string()))
    .collect();
    assert_eq!(ops, expected);
}

#[test]
fn refusals_reach_the_sandbox_event_bus() {
    let home = tempfile::tempdir().expect("tempdir");
    let bus = EventBus::open("fs-test", home.path()).expect("bus");
    let sub = bus.subscribe(Since::Now, 100).expect("subscribe");
    let sink: Arc<dyn EventSink> = bus.clone();
    let collected = Arc::new(Collected::default());
    let Some(m) = Mounted::with_sink(
        Some(ISSUE_ACLS),
        true,
        seed_issue_tree,
        sink,
        collected,
        |fs| fs,
    ) else {
        return;
    };
    assert_eq!(errno_of(fs::read(m.t("secret.env"))), Some(libc::ENOENT));
    assert_eq!(
        errno_of(fs::write(m.t("docs/x.md"), b"x")),
        Some(libc::EACCES)
    );
    fs::write(m.t("ok.txt"), b"x").expect("create");
    bus.close();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    let mut got = Vec::new();
    runtime.block_on(async {
        while let Ok(Some(event)) =
            tokio::time::timeout(std::time::Duration::from_secs(5), sub.next()).await
        {
            got.push(event.to_json());
        }
    });
    let expected = [
        serde_json::json!({"type": "fs.denied", "path": "/workspace/secret.env", "operation": "lookup", "rule": 0}),
        serde_json::json!({"type": "fs.denied", "path": "/workspace/docs/x.md", "operation": "create", "rule": 1}),
        serde_json::json!({"type": "fs.access", "path": "/workspace/ok.txt", "operation": "create"}),
    ];
    assert_eq!(got.len(), expected.len(), "{got:?}");
    for (event, expected) in got.iter().zip(expected) {
        for (key, value) in expected.as_object().expect("object") {
            assert_eq!(event.get(key), Some(value), "{event}");
        }
        assert_eq!(event.get("sandbox"), Some(&Value::from("fs-test")));
    }
}

#[test]
fn files_show_the_presented_owner_and_chown_stays_refused() {
    let collected = Arc::new(Collected::default());
    let sink: Arc<dyn EventSink> = collected.clone();
    let Some(m) = Mounted::with_sink(
        None,
        false,
        |src| fs::write(src.join("f"), b"x").expect("seed"),
        sink,
        collected,
        |fs| fs.present_owner(4242, 4343),
    ) else {
        return;
    };
    use std::os::unix::fs::MetadataExt;
    let meta = fs::metadata(m.t("f")).expect("stat");
    assert_eq!((meta.uid(), meta.gid()), (4242, 4343));
    // chown to the shown owner is a no-op; to anyone else it is refused
    std::os::unix::fs::chown(m.t("f"), Some(4242), Some(4343)).expect("chown to the owner");
    let err = std::os::unix::fs::chown(m.t("f"), Some(0), None).expect_err("chown away");
    assert_eq!(err.raw_os_error(), Some(libc::EPERM));
    assert_eq!(fs::metadata(m.s("f")).expect("source").uid(), 0);
}

#[test]
fn a_file_rewritten_with_o_trunc_is_written_through_passthrough() {
    // Truncated at open, the file is empty when the server picks its I/O mode, like a created
    // one: it must still get passthrough, or every write of the rewrite is a round trip.
    let Some(m) = Mounted::new(None, false, true, |src| {
        fs::write(src.join("small"), b"s").expect("seed");
        fs::write(src.join("big"), vec![1u8; 2 << 20]).expect("seed");
    }) else {
        return;
    };
    if !m.handle().passthrough() {
        eprintln!("skipped: the kernel gives no FUSE passthrough here");
        return;
    }
    for name in ["small", "big"] {
        let before = m.handle().served_writes();
        let mut f = fs::File::create(m.t(name)).expect("open with O_TRUNC");
        for _ in 0..8 {
            f.write_all(&[7u8; 64 << 10]).expect("write");
        }
        drop(f);
        assert_eq!(
            m.handle().served_writes(),
            before,
            "{name}: no write reached the server"
        );
        assert_eq!(
            fs::read(m.s(name)).expect("source"),
            vec![7u8; 8 << 16],
            "{name}"
        );
    }
    // An open that only writes into the file (no O_TRUNC) keeps the size rule: a small file
    // is served.
    let before = m.handle().served_writes();
    let mut f = fs::OpenOptions::new()
        .write(true)
        .open(m.t("small"))
        .expect("open");
    f.write_all(b"x").expect("write");
    drop(f);
    assert!(
        m.handle().served_writes() > before,
        "a write into a small file is served"
    );
}

#[test]
fn passthrough_and_served_opens_of_one_file_never_conflict() {
    // The kernel answers EIO to an open whose I/O mode (passthrough or served) differs from the
    // inode's other open files; the server must keep one mode per inode.
    let Some(m) = Mounted::new(None, false, true, |src| {
        fs::write(src.join("big"), vec![1u8; 2 << 20]).expect("seed");
        fs::write(src.join("small"), b"s").expect("seed");
    }) else {
        return;
    };
    // a served (small) open, then the file grows past the threshold, then more opens
    let mut small = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.t("small"))
        .expect("open small");
    small.write_all(&vec![2u8; 2 << 20]).expect("grow");
    let again = fs::File::open(m.t("small")).expect("second open while served");
    drop((small, again));
    // once closed, a new open may switch to passthrough
    assert_eq!(fs::read(m.t("small")).expect("read").len(), 2 << 20);
    // many concurrent opens of a passthrough inode, readers and writers
    std::thread::scope(|scope| {
        for i in 0..8 {
            let path = m.t("big");
            scope.spawn(move || {
                for _ in 0..20 {
                    if i % 2 == 0 {
                        assert_eq!(fs::read(&path).expect("read big").len(), 2 << 20);
                    } else {
                        let mut f = fs::OpenOptions::new()
                            .write(true)
                            .open(&path)
                            .expect("open big for writing");
                        f.write_all(&[3u8; 4096]).expect("write big");
                    }
                }
            });
        }
    });
    assert_eq!(
        &fs::read(m.s("big")).expect("source")[..4096],
        &[3u8; 4096][..]
    );
}

#[test]
fn concurrent_creates_renames_and_deletes_stay_consistent() {
    let Some(m) = Mounted::new(Some(ISSUE_ACLS), false, true, seed_issue_tree) else {
        return;
    };
    std::thread::scope(|scope| {
        for t in 0..6 {
            let m = &m;
            scope.spawn(move || {
                let dir = m.t(&format!("t{t}"));
                fs::create_dir(&dir).expect("mkdir");
                for i in 0..50 {
                    let a = dir.join(format!("f{i}"));
                    fs::write(&a, format!("{t}-{i}")).expect("create");
                    let b = dir.join(format!("g{i}"));
                    fs::rename(&a, &b).expect("rename");
                    assert_eq!(
                        errno_of(fs::rename(&b, dir.join(format!("g{i}.env")))),
                        Some(libc::EACCES)
                    );
                    if i % 2 == 0 {
                        fs::remove_file(&b).expect("unlink");
                    }
                }
                fs::rename(&dir, m.t(&format!("done{t}"))).expect("rename dir");
            });
        }
    });
    for t in 0..6 {
        let left = names(&m.s(&format!("done{t}")));
        assert_eq!(left.len(), 25, "t{t}: {left:?}");
        assert_eq!(
            fs::read_to_string(m.s(&format!("done{t}/g1"))).expect("content"),
            format!("{t}-1")
        );
    }
    assert_eq!(m.denied().len(), 6 * 50);
}

/// Times the four workloads of the file-ACL benchmark under `root` (`big` is a 100 MiB file already there).
fn workload(root: &Path, big: &Path, tarball: &Path) -> [std::time::Duration; 5] {
    use std::time::Instant;
    let start = Instant::now();
    for d in 0..10 {
        let dir = root.join(format!("c{d}"));
        fs::create_dir(&dir).expect("mkdir");
        for i in 0..1000 {
            fs::write(dir.join(format!("f{i}")), [b'x'; 64]).expect("create");
        }
    }
    let create = start.elapsed();
    let stat_all = || {
        for d in 0..10 {
            for i in 0..1000 {
                fs::symlink_metadata(root.join(format!("c{d}/f{i}"))).expect("stat");
            }
        }
    };
    let start = Instant::now();
    stat_all();
    let stat_warm = start.elapsed();
    // 1.1 s later: past the short cache time (where the kernel caches long, still cached)
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let start = Instant::now();
    stat_all();
    let stat = start.elapsed();
    let start = Instant::now();
    let mut file = fs::File::open(big).expect("open big");
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0usize;
    loop {
        let n = file.read(&mut buf).expect("read");
        if n == 0 {
            break;
        }
        total += n;
    }
    assert_eq!(total, 100 << 20);
    let read = start.elapsed();
    let start = Instant::now();
    let status = Command::new("tar")
        .arg("-xf")
        .arg(tarball)
        .arg("-C")
        .arg(root)
        .status()
        .expect("tar");
    assert!(status.success());
    let unpack = start.elapsed();
    [create, stat_warm, stat, read, unpack]
}

#[test]
#[ignore = "benchmark; run: cargo test --lib fs::tests::bench -- --ignored --nocapture"]
fn bench_fuse_overhead_against_the_plain_source() {
    if let Some(reason) = skip_reason() {
        eprintln!("skipped: {reason}");
        return;
    }
    // a node_modules-shaped tree: 2 000 packages x 5 files, packed once
    let pack = tempfile::tempdir().expect("tempdir");
    for p in 0..2000 {
        let dir = pack.path().join(format!("node_modules/pkg{p}/lib"));
        fs::create_dir_all(&dir).expect("mkdir");
        for (i, name) in ["index.js", "package.json", "README.md", "a.js"]
            .iter()
            .enumerate()
        {
            let parent = if i == 0 {
                dir.clone()
            } else {
                dir.parent().expect("pkg").to_path_buf()
            };
            fs::write(parent.join(name), [b'y'; 700]).expect("write");
        }
        fs::write(dir.join("b.js"), [b'z'; 300]).expect("write");
    }
    let tarball = pack.path().join("nm.tar");
    let ok = Command::new("tar")
        .arg("-cf")
        .arg(&tarball)
        .arg("-C")
        .arg(pack.path())
        .arg("node_modules")
        .status()
        .expect("tar")
        .success();
    assert!(ok);
    let write_big = |path: &Path| {
        let mut f = fs::File::create(path).expect("big");
        let chunk = vec![0xabu8; 1 << 20];
        for _ in 0..100 {
            f.write_all(&chunk).expect("write big");
        }
    };

    // rounds interleave the three setups so machine noise hits them alike; medians are reported
    let rounds: usize = std::env::var("HIVE_FS_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let mut runs: [Vec<[std::time::Duration; 5]>; 3] = Default::default();
    let mut active = false;
    for _ in 0..rounds {
        let plain = tempfile::tempdir().expect("plain");
        write_big(&plain.path().join("big.bin"));
        runs[0].push(workload(
            plain.path(),
            &plain.path().join("big.bin"),
            &tarball,
        ));
        drop(plain);
        for (slot, passthrough) in [(1, false), (2, true)] {
            let m = Mounted::new(Some(ISSUE_ACLS), false, passthrough, |src| {
                write_big(&src.join("big.bin"));
            })
            .expect("mounted");
            runs[slot].push(workload(&m.t(""), &m.t("big.bin"), &tarball));
            if passthrough {
                active = m.handle.as_ref().is_some_and(FsHandle::passthrough);
            }
            assert_eq!(m.denied(), vec![]);
        }
    }
    let median = |slot: usize, i: usize| {
        let mut v: Vec<f64> = runs[slot]
            .iter()
            .map(|r| r[i].as_secs_f64() * 1000.0)
            .collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let names = [
        "create 10 000 small files",
        "stat 10 000 files (right after creating them)",
        "stat 10 000 files (1.1 s later)",
        "read a 100 MiB file (1 MiB reads)",
        "unpack 2 000 dirs x 5 files (tar -x)",
    ];
    println!("| workload | plain dir | FUSE | ratio | FUSE + passthrough | ratio |");
    println!("|---|---|---|---|---|---|");
    for (i, name) in names.iter().enumerate() {
        let (b, f, p) = (median(0, i), median(1, i), median(2, i));
        println!(
            "| {name} | {b:.0} ms | {f:.0} ms | {:.2}x | {p:.0} ms | {:.2}x |",
            f / b,
            p / b
        );
    }
    println!("median of {rounds} interleaved rounds; passthrough active: {active}");
}

/// Polls `check` every millisecond until it holds or `limit` passes; returns how long it took.
fn within(limit: std::time::Duration, check: impl Fn() -> bool) -> Option<std::time::Duration> {
    let start = std::time::Instant::now();
    loop {
        if check() {
            return Some(start.elapsed());
        }
        if start.elapsed() > limit {
            return None;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// Skips (saying why) where the kernel cannot cache long (no epoch notification or no watcher).
fn long_caching(m: &Mounted) -> bool {
    // The server sets caching up after the kernel's handshake, on its own thread.
    let limit = std::time::Duration::from_secs(2);
    if within(limit, || m.handle().long_cache()).is_none() {
        eprintln!("skipped: long kernel caching is unavailable here (Linux 6.16+ and fanotify)");
        return false;
    }
    true
}

#[test]
fn new_rules_apply_at_once_although_the_kernel_caches_long() {
    let all_rw: &[(&str, FsAccess)] = &[("/workspace/**", FsAccess::Rw)];
    let seed = |src: &Path| {
        seed_issue_tree(src);
        fs::write(src.join("x.pem"), b"key").expect("seed");
        fs::create_dir(src.join("d")).expect("seed");
        fs::write(src.join("d/y.pem"), b"key").expect("seed");
    };
    let Some(m) = Mounted::configured(Some(all_rw), seed, |fs| fs) else {
        return;
    };
    if !long_caching(&m) {
        return;
    }
    for rel in ["x.pem", "d/y.pem", "notes.txt"] {
        fs::symlink_metadata(m.t(rel)).expect("stat warms the cache");
    }
    let hide_pem: &[(&str, FsAccess)] = &[
        ("/workspace/**/*.pem", FsAccess::None),
        ("/workspace/**", FsAccess::Rw),
    ];
    m.handle().reconfigure(&fs_mount(Some(hide_pem), false));
    let took = within(std::time::Duration::from_millis(50), || {
        errno_of(fs::symlink_metadata(m.t("x.pem"))) == Some(libc::ENOENT)
            && errno_of(fs::symlink_metadata(m.t("d/y.pem"))) == Some(libc::ENOENT)
    });
    assert!(
        took.is_some(),
        "x.pem still visible 50 ms after the new rules"
    );
    assert!(!names(&m.t("")).contains(&"x.pem".to_owned()));
    assert!(fs::symlink_metadata(m.t("notes.txt")).is_ok());
    // a new read-only rule: writes fail at once, reads still work
    let read_only: &[(&str, FsAccess)] = &[("/workspace/**", FsAccess::R)];
    m.handle().reconfigure(&fs_mount(Some(read_only), false));
    assert_eq!(
        errno_of(fs::OpenOptions::new().append(true).open(m.t("notes.txt"))),
        Some(libc::EACCES)
    );
    assert_eq!(fs::read(m.t("notes.txt")).expect("read"), b"notes");
    assert_eq!(fs::read(m.s("notes.txt")).expect("intact"), b"notes");
    // and the pem files are visible again
    assert_eq!(fs::read(m.t("x.pem")).expect("visible again"), b"key");
}

#[test]
fn host_changes_show_inside_within_100_ms_with_the_watcher() {
    let Some(m) = Mounted::configured(Some(ISSUE_ACLS), seed_issue_tree, |fs| fs) else {
        return;
    };
    if !long_caching(&m) {
        return;
    }
    let limit = std::time::Duration::from_millis(100);
    // "no such name" is cached, then the host creates it
    assert!(fs::symlink_metadata(m.t("app/new.txt")).is_err());
    fs::write(m.s("app/new.txt"), b"new").expect("host create");
    let took = within(limit, || fs::symlink_metadata(m.t("app/new.txt")).is_ok());
    assert!(took.is_some(), "a file the host created is not visible");
    // a cached file the host deletes
    fs::symlink_metadata(m.t("notes.txt")).expect("warm");
    fs::remove_file(m.s("notes.txt")).expect("host delete");
    let took = within(limit, || fs::symlink_metadata(m.t("notes.txt")).is_err());
    assert!(took.is_some(), "a file the host deleted is still visible");
    // a cached directory the host renames: old name gone, new name there
    fs::symlink_metadata(m.t("app/config")).expect("warm");
    fs::rename(m.s("app"), m.s("app2")).expect("host rename");
    let took = within(limit, || {
        fs::symlink_metadata(m.t("app/new.txt")).is_err()
            && fs::read(m.t("app2/new.txt")).is_ok_and(|d| d == b"new")
    });
    assert!(took.is_some(), "a rename by the host does not show");
    // a rename to a hidden name hides it
    fs::rename(m.s("app2/new.txt"), m.s("app2/new.env")).expect("host rename");
    let took = within(limit, || fs::symlink_metadata(m.t("app2/new.txt")).is_err());
    assert!(took.is_some());
    assert_eq!(
        errno_of(fs::symlink_metadata(m.t("app2/new.env"))),
        Some(libc::ENOENT)
    );
    // content the host appends to a cached file
    fs::write(m.t("grow.txt"), b"abc").expect("write");
    assert_eq!(
        fs::symlink_metadata(m.t("grow.txt")).expect("warm").len(),
        3
    );
    let mut file = fs::OpenOptions::new()
        .append(true)
        .open(m.s("grow.txt"))
        .expect("host open");
    file.write_all(b"defg").expect("host append");
    let took = within(limit, || {
        fs::symlink_metadata(m.t("grow.txt")).is_ok_and(|st| st.len() == 7)
            && fs::read(m.t("grow.txt")).is_ok_and(|d| d == b"abcdefg")
    });
    assert!(took.is_some(), "an append by the host does not show");
}

#[test]
fn host_changes_show_inside_within_the_short_ttl_without_the_watcher() {
    let Some(m) = Mounted::configured(Some(ISSUE_ACLS), seed_issue_tree, AclFs::without_watch)
    else {
        return;
    };
    assert!(!m.handle().long_cache());
    // failed lookups are not cached: a host create shows at once
    assert!(fs::symlink_metadata(m.t("new.txt")).is_err());
    fs::write(m.s("new.txt"), b"new").expect("host create");
    assert!(fs::symlink_metadata(m.t("new.txt")).is_ok());
    // a cached entry lasts at most the short TTL
    fs::symlink_metadata(m.t("notes.txt")).expect("warm");
    fs::remove_file(m.s("notes.txt")).expect("host delete");
    let took = within(std::time::Duration::from_millis(1300), || {
        fs::symlink_metadata(m.t("notes.txt")).is_err()
    });
    assert!(took.is_some(), "a deleted file outlives the short TTL");
}

#[test]
fn a_hidden_name_looked_up_a_thousand_times_reaches_the_server_once() {
    let Some(m) = Mounted::configured(Some(ISSUE_ACLS), seed_issue_tree, |fs| fs) else {
        return;
    };
    if !long_caching(&m) {
        return;
    }
    for _ in 0..1000 {
        assert_eq!(
            errno_of(fs::symlink_metadata(m.t("secret.env"))),
            Some(libc::ENOENT)
        );
    }
    assert_eq!(
        m.denied(),
        vec![seen("/workspace/secret.env", op::LOOKUP, RULE_ENV)]
    );
}

#[test]
fn a_directory_moved_under_a_hidden_name_hides_its_cached_entries_at_once() {
    // `vault` itself is writable; what is directly in it is hidden
    let rules: &[(&str, FsAccess)] = &[
        ("/workspace/vault/*", FsAccess::None),
        ("/workspace/**", FsAccess::Rw),
    ];
    let Some(m) = Mounted::configured(Some(rules), |_| {}, |fs| fs) else {
        return;
    };
    fs::create_dir_all(m.t("parent/a")).expect("mkdir");
    fs::write(m.t("parent/a/f"), b"x").expect("write");
    fs::symlink_metadata(m.t("parent/a/f")).expect("warm");
    // moving it where its entries are hidden is allowed (nothing gains access); they vanish
    fs::rename(m.t("parent"), m.t("vault")).expect("mv parent vault");
    for rel in ["vault/a", "vault/a/f"] {
        assert_eq!(
            errno_of(fs::symlink_metadata(m.t(rel))),
            Some(libc::ENOENT),
            "{rel}"
        );
    }
    assert!(m.s("vault/a/f").exists());
}

#[test]
fn a_write_through_a_new_hard_link_shows_through_the_cached_old_name() {
    let Some(m) = Mounted::configured(Some(ISSUE_ACLS), seed_issue_tree, |fs| fs) else {
        return;
    };
    assert_eq!(
        fs::symlink_metadata(m.t("notes.txt")).expect("warm").len(),
        5
    );
    let old = fs::File::open(m.t("notes.txt")).expect("open the old name");
    fs::hard_link(m.t("notes.txt"), m.t("again.txt")).expect("ln");
    fs::write(m.t("again.txt"), b"longer notes").expect("write through the new name");
    assert_eq!(
        fs::symlink_metadata(m.t("notes.txt")).expect("stat").len(),
        12
    );
    assert_eq!(old.metadata().expect("fstat").len(), 12);
    assert_eq!(fs::read(m.t("notes.txt")).expect("read"), b"longer notes");
}

/// Serves `$HIVE_FS_PROFILE_SOURCE` (with the ACLs of the tests, mounted as `/workspace`) on
/// `$HIVE_FS_PROFILE_TARGET` until `$HIVE_FS_PROFILE_TARGET.stop` exists, for profiling by hand
/// (`perf`, `strace -c`, the `fuse:fuse_request_send` tracepoint) with any workload.
#[test]
#[ignore = "profiling aid; see its doc comment"]
fn serve_a_directory_for_profiling() {
    let (Some(source), Some(target)) = (
        std::env::var_os("HIVE_FS_PROFILE_SOURCE"),
        std::env::var_os("HIVE_FS_PROFILE_TARGET"),
    ) else {
        eprintln!("skipped: set HIVE_FS_PROFILE_SOURCE and HIVE_FS_PROFILE_TARGET");
        return;
    };
    if let Some(reason) = skip_reason() {
        eprintln!("skipped: {reason}");
        return;
    }
    let (source, target) = (PathBuf::from(source), PathBuf::from(target));
    let source_fd = rustix::fs::open(
        &source,
        rustix::fs::OFlags::PATH | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .expect("open source");
    let sink: Arc<dyn EventSink> = Arc::new(Collected::default());
    let mut fs =
        AclFs::with_sink(&fs_mount(Some(ISSUE_ACLS), false), source_fd, sink).expect("AclFs");
    if std::env::var_os("HIVE_FS_PROFILE_NO_PASSTHROUGH").is_some() {
        fs = fs.without_passthrough();
    }
    let fuse_fd = mount_fuse_on(&target).expect("mount FUSE");
    let handle = fs.serve(fuse_fd).expect("serve");
    let mut stop = target.into_os_string();
    stop.push(".stop");
    while !Path::new(&stop).exists() {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let _ = fs::remove_file(&stop);
    let _ = rustix::mount::unmount(
        Path::new(&stop.to_string_lossy().trim_end_matches(".stop").to_owned()),
        rustix::mount::UnmountFlags::DETACH,
    );
    handle.join().expect("served");
}

#[test]
fn kept_listings_follow_new_rules_and_host_changes_at_once() {
    let all_rw: &[(&str, FsAccess)] = &[("/workspace/**", FsAccess::Rw)];
    let hide_pem: &[(&str, FsAccess)] = &[
        ("/workspace/**/*.pem", FsAccess::None),
        ("/workspace/**", FsAccess::Rw),
    ];
    let seed = |src: &Path| {
        seed_issue_tree(src);
        fs::write(src.join("x.pem"), b"key").expect("seed");
        fs::create_dir(src.join("d")).expect("seed");
        fs::write(src.join("d/y.pem"), b"key").expect("seed");
    };
    let Some(m) = Mounted::configured(Some(all_rw), seed, |fs| fs) else {
        return;
    };
    if !long_caching(&m) {
        return;
    }
    let has = |dir: &str, name: &str| names(&m.t(dir)).contains(&name.to_owned());
    // listed twice: the second listing may come from the kernel's cache
    for _ in 0..2 {
        assert!(has("", "x.pem") && has("d", "y.pem"));
    }
    // a directory handle opened under the old rules stays open across the change
    let old = fs::read_dir(m.t("d")).expect("opendir");
    m.handle().reconfigure(&fs_mount(Some(hide_pem), false));
    assert!(!has("", "x.pem") && !has("d", "y.pem"));
    drop(old);
    assert!(!has("", "x.pem") && !has("d", "y.pem"));
    m.handle().reconfigure(&fs_mount(Some(all_rw), false));
    assert!(has("", "x.pem") && has("d", "y.pem"));
    // while another process lists all the time, every listing after a change obeys the new rules
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let lister = {
        let (stop, dir) = (stop.clone(), m.t("d"));
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = names(&dir);
            }
        })
    };
    for round in 0..100 {
        let hidden = round % 2 == 0;
        let rules = if hidden { hide_pem } else { all_rw };
        m.handle().reconfigure(&fs_mount(Some(rules), false));
        assert_eq!(has("d", "y.pem"), !hidden, "round {round}");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    lister.join().expect("lister");
    // names the host adds, removes and renames show in a kept listing within 100 ms
    let limit = std::time::Duration::from_millis(100);
    assert!(!has("d", "z.txt"));
    fs::write(m.s("d/z.txt"), b"z").expect("host create");
    assert!(within(limit, || has("d", "z.txt")).is_some(), "host create");
    fs::rename(m.s("d/z.txt"), m.s("d/w.txt")).expect("host rename");
    assert!(
        within(limit, || !has("d", "z.txt") && has("d", "w.txt")).is_some(),
        "host rename"
    );
    fs::remove_file(m.s("d/w.txt")).expect("host delete");
    assert!(
        within(limit, || !has("d", "w.txt")).is_some(),
        "host delete"
    );
    // and the sandbox's own changes at once
    fs::write(m.t("d/v.txt"), b"v").expect("create");
    assert!(has("d", "v.txt"));
    fs::remove_file(m.t("d/v.txt")).expect("unlink");
    assert!(!has("d", "v.txt"));
}

#[test]
fn a_kept_listing_is_shown_again_without_the_server_listing_the_source() {
    let seed = |src: &Path| {
        seed_issue_tree(src);
        fs::create_dir(src.join("d")).expect("seed");
        for i in 0..50 {
            fs::write(src.join(format!("d/f{i}")), b"x").expect("seed");
        }
    };
    let Some(m) = Mounted::configured(Some(ISSUE_ACLS), seed, |fs| fs) else {
        return;
    };
    if !long_caching(&m) {
        return;
    }
    assert_eq!(names(&m.t("d")).len(), 50);
    let decided = m.handle().decided_listings();
    // the kernel keeps the listing: opening `d` again reads no listing from the source
    for _ in 0..3 {
        assert_eq!(names(&m.t("d")).len(), 50);
    }
    assert_eq!(m.handle().decided_listings(), decided);
    // a directory opened and never read decides nothing either
    drop(fs::read_dir(m.t("d")).expect("opendir"));
    assert_eq!(m.handle().decided_listings(), decided);
    // new rules: the next listing is decided again, and obeys them
    let hide_f1: &[(&str, FsAccess)] = &[
        ("/workspace/d/f1", FsAccess::None),
        ("/workspace/**", FsAccess::Rw),
    ];
    m.handle().reconfigure(&fs_mount(Some(hide_f1), false));
    let listed = names(&m.t("d"));
    assert_eq!(listed.len(), 49);
    assert!(!listed.contains(&"f1".to_owned()));
    assert!(m.handle().decided_listings() > decided);
}

#[test]
fn kept_directory_fds_follow_a_directory_the_host_replaces() {
    let seed = |src: &Path| {
        seed_issue_tree(src);
        fs::create_dir(src.join("d")).expect("seed");
        fs::write(src.join("d/f"), b"one").expect("seed");
    };
    let Some(m) = Mounted::configured(Some(ISSUE_ACLS), seed, |fs| fs) else {
        return;
    };
    if !long_caching(&m) {
        return;
    }
    assert_eq!(fs::symlink_metadata(m.t("d/f")).expect("stat").len(), 3);
    assert!(fs::symlink_metadata(m.t("d/g")).is_err());
    assert!(m.handle().kept_dir_fds() > 0, "no directory fd is kept");
    // the host moves `d` away and puts a new `d` in its place: same path, another directory
    // (held open inside, so that the kernel keeps its node and the server its node id)
    let held = fs::File::open(m.t("d")).expect("open d");
    fs::rename(m.s("d"), m.s("d_old")).expect("host rename");
    fs::create_dir(m.s("d")).expect("host mkdir");
    fs::write(m.s("d/f"), b"second").expect("host write");
    fs::write(m.s("d/g"), b"g").expect("host write");
    let took = within(std::time::Duration::from_millis(100), || {
        fs::symlink_metadata(m.t("d/f")).is_ok_and(|st| st.len() == 6)
            && fs::read(m.t("d/g")).is_ok_and(|d| d == b"g")
    });
    assert!(
        took.is_some(),
        "lookups in `d` still reach the moved directory"
    );
    assert_eq!(fs::read(m.t("d_old/f")).expect("old"), b"one");
    drop(held);
    // the sandbox's own directory renames: each path reaches what is there now
    fs::rename(m.t("d"), m.t("e")).expect("rename");
    fs::rename(m.t("d_old"), m.t("d")).expect("rename");
    assert_eq!(fs::read(m.t("d/f")).expect("read"), b"one");
    assert_eq!(fs::read(m.t("e/f")).expect("read"), b"second");
    assert!(fs::symlink_metadata(m.t("d/g")).is_err());
}
