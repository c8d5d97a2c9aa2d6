//! File ACLs end to end in real sandboxes: a FUSE mount made by the sandbox's init and
//! served by this process with [`crate::fs::AclFs`], attacked from inside with coreutils; and the
//! bind layer for plain subtree rules. Named after the escape each checks; the FUSE
//! tests skip, saying why, where this process cannot open `/dev/fuse` (unprivileged here).

use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde_json::{Map, Value};

use super::*;
use crate::config::{FsAccess, FsAcl, FsBackend, FsMount, PathGlob};
use crate::fs::{AclFs, EventSink, FsHandle};

const PORT: u16 = 3128;

/// The issue's rules: `.env` files hidden everywhere, docs read-only, the rest writable.
const ISSUE_ACLS: &[(&str, FsAccess)] = &[
    ("/workspace/**/*.env", FsAccess::None),
    ("/workspace/docs/**", FsAccess::R),
    ("/workspace/**", FsAccess::Rw),
];

#[derive(Default)]
struct Collected(Mutex<Vec<(String, Map<String, Value>)>>);

impl EventSink for Collected {
    fn emit(&self, kind: &str, fields: Map<String, Value>) {
        self.0.lock().push((kind.to_owned(), fields));
    }
}

impl Collected {
    /// `(path, operation, rule)` of every `fs.denied` so far, draining them.
    fn denied(&self) -> Vec<(String, String, Option<u64>)> {
        std::mem::take(&mut *self.0.lock())
            .into_iter()
            .filter(|(kind, _)| kind == "fs.denied")
            .map(|(_, f)| {
                (
                    f.get("path").and_then(Value::as_str).unwrap_or("").into(),
                    f.get("operation")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .into(),
                    f.get("rule").and_then(Value::as_u64),
                )
            })
            .collect()
    }
}

fn fs_mount(acls: &[(&str, FsAccess)]) -> FsMount {
    FsMount {
        backend: FsBackend::Local,
        mount: "/workspace".into(),
        source: None,
        acls: Some(
            acls.iter()
                .map(|(path, access)| FsAcl {
                    path: PathGlob::parse(path).expect("valid glob"),
                    access: *access,
                })
                .collect(),
        ),
        audit: false,
    }
}

struct Fixture {
    host: Option<SandboxHost>,
    src: tempfile::TempDir,
    other: tempfile::TempDir,
    events: Arc<Collected>,
    servers: Vec<FsHandle>,
}

impl Fixture {
    fn s(&self, rel: &str) -> std::path::PathBuf {
        self.src.path().join(rel)
    }

    fn host(&self) -> &SandboxHost {
        self.host.as_ref().expect("running")
    }

    /// Closes the sandbox; the FUSE servers must then end on their own.
    fn stop(&mut self) -> bool {
        if let Some(host) = self.host.take() {
            host.close();
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while std::time::Instant::now() < deadline {
            if self.servers.iter().all(FsHandle::is_finished) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Starts a sandbox with `/workspace` served over FUSE with `acls` and `/other` a plain
/// writable bind; `None` (after saying why) where FUSE is unavailable.
fn start_fuse(name: &str, acls: &[(&str, FsAccess)], seed: impl FnOnce(&Path)) -> Option<Fixture> {
    if !crate::fs::fuse_available() {
        eprintln!("skipped: this process cannot open /dev/fuse");
        return None;
    }
    let src = tempfile::tempdir().expect("tempdir");
    let other = tempfile::tempdir().expect("tempdir");
    seed(src.path());
    std::fs::write(other.path().join("plain.txt"), "plain\n").expect("seed");
    let spec = LaunchSpec {
        name: name.into(),
        mounts: vec![
            BindMount {
                source: src.path().into(),
                target: "/workspace".into(),
                fuse: true,
                ..Default::default()
            },
            BindMount {
                source: other.path().into(),
                target: "/other".into(),
                writable: true,
                ..Default::default()
            },
        ],
        ca_bundle_pem: b"-----BEGIN CERTIFICATE-----\ntest\n-----END CERTIFICATE-----\n".to_vec(),
        proxy_port: PORT,
        capture_ports: Vec::new(),
    };
    let (host, handover) = SandboxHost::start(spec).expect("sandbox starts");
    assert_eq!(handover.fuse.len(), 1);
    let events = Arc::new(Collected::default());
    let mount = fs_mount(acls);
    let servers = handover
        .fuse
        .into_iter()
        .map(|(target, fd)| {
            assert_eq!(target, "/workspace");
            let dir = std::fs::File::open(src.path()).expect("source");
            AclFs::with_sink(&mount, OwnedFd::from(dir), events.clone())
                .expect("server")
                .present_owner(0, 0)
                .serve(fd)
                .expect("serves")
        })
        .collect();
    Some(Fixture {
        host: Some(host),
        src,
        other,
        events,
        servers,
    })
}

fn seed_issue_tree(src: &Path) {
    std::fs::write(src.join("secret.env"), "API_KEY=hunter2\n").expect("seed");
    std::fs::create_dir_all(src.join("docs")).expect("seed");
    std::fs::write(src.join("docs/guide.md"), "# guide\n").expect("seed");
    std::fs::create_dir_all(src.join("src")).expect("seed");
    std::fs::write(src.join("src/main.rs"), "fn main() {}\n").expect("seed");
}

/// Runs `script` with `sh -c`; (exit code, stdout + stderr).
fn sh(host: &SandboxHost, script: &str) -> (i32, String) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let p = ProcessSpec {
            argv: vec![
                "/bin/sh".into(),
                "-c".into(),
                format!("exec 2>&1; {script}"),
            ],
            env: default_env(PORT),
            cwd: None,
        };
        let mut proc = host.spawn_async(p).await.expect("spawn");
        drop(proc.stdin.take());
        let out = std::fs::File::from(proc.stdout.try_clone().expect("dup"));
        let reader = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = std::io::Read::read_to_string(&mut { out }, &mut s);
            s
        });
        let status = proc.wait().await.expect("wait");
        drop(proc);
        (status.code.unwrap_or(-1), reader.join().unwrap_or_default())
    })
}

fn denied(path: &str, operation: &str, rule: Option<u64>) -> (String, String, Option<u64>) {
    (path.into(), operation.into(), rule)
}

#[test]
fn cannot_read_a_env_file_that_existed_at_start_or_that_the_host_created_later() {
    let Some(f) = start_fuse("fuse-env", ISSUE_ACLS, seed_issue_tree) else {
        return;
    };
    let (code, out) = sh(f.host(), "cat /workspace/secret.env");
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("No such file"), "{out}");
    assert!(!out.contains("hunter2"), "{out}");
    let (code, out) = sh(f.host(), "ls -a /workspace");
    assert_eq!(code, 0, "{out}");
    assert!(!out.contains("secret.env") && out.contains("docs"), "{out}");
    assert!(f
        .events
        .denied()
        .contains(&denied("/workspace/secret.env", "lookup", Some(0))));
    std::fs::write(f.s("src/late.env"), "LATE=1\n").expect("host writes");
    let (code, out) = sh(f.host(), "cat /workspace/src/late.env");
    assert_ne!(code, 0, "{out}");
    assert!(!out.contains("LATE"), "{out}");
    assert!(f
        .events
        .denied()
        .contains(&denied("/workspace/src/late.env", "lookup", Some(0))));
}

#[test]
fn cannot_create_a_env_file() {
    let Some(f) = start_fuse("fuse-create", ISSUE_ACLS, seed_issue_tree) else {
        return;
    };
    let (code, out) = sh(f.host(), "echo X=1 > /workspace/src/new.env");
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("Permission denied"), "{out}");
    assert!(!f.s("src/new.env").exists());
    let seen = f.events.denied();
    assert!(
        seen.contains(&denied("/workspace/src/new.env", "create", Some(0))),
        "{seen:?}"
    );
}

#[test]
fn cannot_reach_a_denied_file_by_mv_ln_a_symlink_or_dotdot_from_another_mount() {
    let Some(f) = start_fuse("fuse-reach", ISSUE_ACLS, seed_issue_tree) else {
        return;
    };
    let mut seen = Vec::new();
    for (script, event) in [
        (
            "mv /workspace/secret.env /workspace/notes.txt",
            ("/workspace/secret.env", "lookup"),
        ),
        (
            "ln /workspace/secret.env /workspace/x",
            ("/workspace/secret.env", "lookup"),
        ),
        (
            "ln -s secret.env /workspace/link && cat /workspace/link",
            ("/workspace/secret.env", "lookup"),
        ),
        (
            "cat /other/../workspace/secret.env",
            ("/workspace/secret.env", "lookup"),
        ),
    ] {
        let (code, out) = sh(f.host(), script);
        assert_ne!(code, 0, "{script}: {out}");
        assert!(!out.contains("hunter2"), "{script}: {out}");
        // Once refused, the hidden name is answered by the kernel's cache ("no such name")
        // without reaching the server again: one event for all attempts.
        seen.extend(f.events.denied());
        assert!(
            seen.contains(&denied(event.0, event.1, Some(0))),
            "{script}: {seen:?}"
        );
    }
    assert!(!f.s("notes.txt").exists() && !f.s("x").exists());
    assert_eq!(
        std::fs::read_to_string(f.s("secret.env")).expect("kept"),
        "API_KEY=hunter2\n"
    );
}

#[test]
fn docs_are_readable_but_not_writable_creatable_deletable_or_renamable() {
    let Some(f) = start_fuse("fuse-docs", ISSUE_ACLS, seed_issue_tree) else {
        return;
    };
    let (code, out) = sh(
        f.host(),
        "cat /workspace/docs/guide.md && ls /workspace/docs",
    );
    assert_eq!((code, out.as_str()), (0, "# guide\nguide.md\n"));
    for (script, path, operation) in [
        (
            "echo more >> /workspace/docs/guide.md",
            "/workspace/docs/guide.md",
            "open",
        ),
        (
            "touch /workspace/docs/new.md",
            "/workspace/docs/new.md",
            "create",
        ),
        (
            "rm -f /workspace/docs/guide.md",
            "/workspace/docs/guide.md",
            "unlink",
        ),
        (
            "mv /workspace/docs/guide.md /workspace/docs/g2.md",
            "/workspace/docs/guide.md",
            "rename",
        ),
        ("mkdir /workspace/docs/sub", "/workspace/docs/sub", "mkdir"),
    ] {
        let (code, out) = sh(f.host(), script);
        assert_ne!(code, 0, "{script}: {out}");
        let seen = f.events.denied();
        assert!(
            seen.contains(&denied(path, operation, Some(1))),
            "{script}: {seen:?}"
        );
    }
    assert_eq!(
        std::fs::read_to_string(f.s("docs/guide.md")).expect("kept"),
        "# guide\n"
    );
    let mut names: Vec<_> = std::fs::read_dir(f.s("docs"))
        .expect("docs")
        .map(|e| e.expect("entry").file_name())
        .collect();
    names.sort();
    assert_eq!(names, ["guide.md"]);
}

/// What the sandbox does to a file in [`set_id_bits_are_cleared_as_on_a_plain_mount`]: a name
/// and a shell command on `F`.
const SET_ID_CHANGES: &[(&str, &str)] = &[
    // a small file: its writes go through the server
    ("write", "printf x >> F"),
    // a file of 2 MiB: written through kernel passthrough where available
    ("big-write", "printf x >> F"),
    ("truncate", "truncate -s 1 F"),
    ("open-trunc", ": > F"),
    ("chown", "chown 0:0 F"),
    // `chown(F, -1, -1)`: no owner named; Linux clears set-user-id all the same
    ("chown-nothing", "chown : F"),
    ("fallocate", "fallocate -l 8192 F"),
    // nothing that clears: the bits stay (a `chmod` through the server always drops them: the
    // sandbox may not set set-id bits, see `fs::ops`)
    ("read", "cat F > /dev/null"),
    ("utimes", "touch F"),
];

/// Modes the files of [`set_id_bits_are_cleared_as_on_a_plain_mount`] start with.
const SET_ID_MODES: &[u32] = &[0o4755, 0o2755, 0o6755, 0o2745, 0o4644, 0o755];

#[test]
fn set_id_bits_are_cleared_as_on_a_plain_mount() {
    // The server clears set-user-id and set-group-id bits itself (FUSE_HANDLE_KILLPRIV_V2): a
    // host set-uid file the sandbox writes, truncates or chowns must lose them exactly as it
    // would on the source itself (here: the plain bind mount /other).
    let name = |change: &str, mode: u32| format!("{change}-{mode:o}");
    let seed = |dir: &Path| {
        use std::os::unix::fs::PermissionsExt;
        for (change, _) in SET_ID_CHANGES {
            for mode in SET_ID_MODES {
                let path = dir.join(name(change, *mode));
                let size = if *change == "big-write" { 2 << 20 } else { 4 };
                std::fs::write(&path, vec![b'a'; size]).expect("seed");
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(*mode))
                    .expect("seed");
            }
        }
    };
    let Some(f) = start_fuse("fuse-setid", &[("/workspace/**", FsAccess::Rw)], seed) else {
        return;
    };
    seed(f.other.path());
    let mut script = String::from("set -e");
    for root in ["/workspace", "/other"] {
        for (change, command) in SET_ID_CHANGES {
            for mode in SET_ID_MODES {
                let path = format!("{root}/{}", name(change, *mode));
                script.push_str("; ");
                script.push_str(&command.replace('F', &path));
            }
        }
    }
    let (code, out) = sh(f.host(), &script);
    assert_eq!(code, 0, "{out}");
    use std::os::unix::fs::PermissionsExt;
    let mode_of =
        |path: &Path| std::fs::metadata(path).expect("stat").permissions().mode() & 0o7777;
    let mut differ = Vec::new();
    for (change, _) in SET_ID_CHANGES {
        for mode in SET_ID_MODES {
            let file = name(change, *mode);
            let (fuse, plain) = (mode_of(&f.s(&file)), mode_of(&f.other.path().join(&file)));
            if fuse != plain {
                differ.push(format!("{file}: FUSE {fuse:o}, plain {plain:o}"));
            }
        }
    }
    assert_eq!(differ, Vec::<String>::new());
    // the plain mount did clear (the sandbox holds no CAP_FSETID), so the comparison means something
    let plain = |file: &str| mode_of(&f.other.path().join(file));
    assert_eq!(plain("write-4755"), 0o755);
    assert_eq!(plain("big-write-6755"), 0o755);
    assert_eq!(plain("truncate-2755"), 0o755);
    assert_eq!(plain("chown-4644"), 0o644);
    assert_eq!(plain("chown-nothing-4755"), 0o755);
    assert_eq!(plain("write-2745"), 0o2745);
    assert_eq!(plain("read-4755"), 0o4755);
}

#[test]
fn everything_else_is_writable_lands_in_the_source_and_outlives_the_sandbox() {
    let Some(mut f) = start_fuse("fuse-rw", ISSUE_ACLS, seed_issue_tree) else {
        return;
    };
    let script = "cd /workspace && mkdir -p out/deep && echo one > out/deep/a.txt \
                  && mv out/deep/a.txt out/b.txt && ln out/b.txt out/c.txt && rm src/main.rs \
                  && echo two >> out/b.txt && chmod 600 out/b.txt && cat out/c.txt";
    let (code, out) = sh(f.host(), script);
    assert_eq!((code, out.as_str()), (0, "one\ntwo\n"));
    assert_eq!(f.events.denied(), vec![]);
    assert!(f.stop(), "the FUSE server ends with its sandbox");
    assert_eq!(
        std::fs::read_to_string(f.s("out/b.txt")).expect("persisted"),
        "one\ntwo\n"
    );
    assert!(f.s("out/c.txt").exists() && !f.s("src/main.rs").exists());
}

#[test]
fn a_mount_without_acls_is_fully_writable_and_a_path_under_no_mount_is_not_visible() {
    let Some(f) = start_fuse("fuse-other", ISSUE_ACLS, seed_issue_tree) else {
        return;
    };
    let (code, out) = sh(
        f.host(),
        "echo hi > /other/new.txt && mkdir /other/d && mv /other/new.txt /other/d/ \
         && rm /other/plain.txt && cat /other/d/new.txt",
    );
    assert_eq!((code, out.as_str()), (0, "hi\n"));
    assert!(f.other.path().join("d/new.txt").exists());
    let src = f.src.path().display().to_string();
    let (code, out) = sh(
        f.host(),
        &format!("ls {src} || ls /home/* || cat /workspace/../etc/shadow"),
    );
    assert_ne!(code, 0, "{out}");
}

#[test]
fn a_nested_mount_under_a_fuse_mount_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = LaunchSpec {
        name: "fuse-nested".into(),
        mounts: vec![
            BindMount {
                source: dir.path().into(),
                target: "/workspace".into(),
                fuse: true,
                ..Default::default()
            },
            BindMount {
                source: dir.path().into(),
                target: "/workspace/inner".into(),
                ..Default::default()
            },
        ],
        ca_bundle_pem: Vec::new(),
        proxy_port: PORT,
        capture_ports: Vec::new(),
    };
    let err = SandboxHost::start(spec).expect_err("refused");
    assert_eq!(err.code(), crate::ErrorCode::InvalidArgument, "{err}");
}

/// Subtree rules without FUSE: only the subtrees are mounted (read-only unless writable), so
/// what no rule grants does not exist inside, and attribute changes, which Landlock has no
/// right for, are refused like writes.
#[test]
fn plain_subtree_rules_hold_by_the_mount_layout() {
    let src = tempfile::tempdir().expect("tempdir");
    for dir in ["pub", "rw", "private"] {
        std::fs::create_dir(src.path().join(dir)).expect("seed");
        std::fs::write(src.path().join(dir).join("f.txt"), dir).expect("seed");
        std::fs::set_permissions(
            src.path().join(dir).join("f.txt"),
            std::os::unix::fs::PermissionsExt::from_mode(0o644),
        )
        .expect("seed");
    }
    std::fs::write(src.path().join("single.txt"), "single\n").expect("seed");
    // A planted symlink must not carry a subtree's rule out of its tree.
    std::os::unix::fs::symlink("private", src.path().join("linked")).expect("seed");
    let sub = |path: &str, writable| Subtree {
        path: path.into(),
        writable,
    };
    let spec = LaunchSpec {
        name: "landlock-subtrees".into(),
        mounts: vec![BindMount {
            source: src.path().into(),
            target: "/data".into(),
            writable: true,
            subtrees: Some(vec![
                sub("/data/pub", false),
                sub("/data/rw", true),
                sub("/data/linked", true),
                sub("/data/single.txt", false),
            ]),
            fuse: false,
        }],
        ca_bundle_pem: Vec::new(),
        proxy_port: PORT,
        capture_ports: Vec::new(),
    };
    let (host, _handover) = SandboxHost::start(spec).expect("starts");
    for (script, ok) in [
        ("cat /data/pub/f.txt", true),
        ("echo x > /data/pub/f.txt", false),
        ("touch /data/pub/new", false),
        ("echo x > /data/rw/f.txt && touch /data/rw/new", true),
        ("cat /data/private/f.txt", false),
        ("cat /data/linked/f.txt", false),
        ("echo x > /data/linked/new", false),
        ("touch /data/new", false),
        ("mv /data/rw /data/moved", false),
        ("chmod 666 /data/pub/f.txt", false),
        ("touch -d 2001-01-01 /data/pub/f.txt", false),
        ("chmod 666 /data/private/f.txt", false),
        ("touch -d 2001-01-01 /data/private/f.txt", false),
        ("chmod 777 /data", false),
        (
            "chmod 666 /data/rw/f.txt && touch -d 2001-01-01 /data/rw/f.txt",
            true,
        ),
        ("mv /data/rw/f.txt /data/pub/", false),
        ("cat /data/single.txt", true),
        ("echo x >> /data/single.txt", false),
        ("rm /data/single.txt", false),
    ] {
        let (code, out) = sh(&host, script);
        assert_eq!(code == 0, ok, "{script}: {out}");
    }
    assert_eq!(
        sh(&host, "ls -a /data"),
        (0, ".\n..\npub\nrw\nsingle.txt\n".into())
    );
    assert!(!src.path().join("private/new").exists());
    use std::os::unix::fs::PermissionsExt;
    for (file, mode) in [
        ("pub/f.txt", 0o644),
        ("private/f.txt", 0o644),
        ("rw/f.txt", 0o666),
    ] {
        let meta = std::fs::metadata(src.path().join(file)).expect("kept");
        assert_eq!(meta.permissions().mode() & 0o777, mode, "{file}");
    }
}

/// The whole path `exec` takes: config -> launch spec -> FUSE mount -> served with the sandbox's
/// event bus; refusals arrive as `fs.denied` events; close() stops the servers and the data stays.
#[tokio::test(flavor = "multi_thread")]
async fn refusals_reach_the_sandbox_event_bus_through_the_engine() {
    if !crate::fs::fuse_available() {
        eprintln!("skipped: this process cannot open /dev/fuse");
        return;
    }
    let home = tempfile::tempdir().expect("home");
    let src = tempfile::tempdir().expect("source");
    seed_issue_tree(src.path());
    // Only this test reads HIVE_HOME in this binary.
    std::env::set_var("HIVE_HOME", home.path());
    let config = serde_json::json!({
        "fs": [
            {
                "backend": "local",
                "mount": "/workspace",
                "source": src.path(),
                "acls": [
                    { "path": "/workspace/**/*.env", "access": "none" },
                    { "path": "/workspace/docs/**", "access": "r" },
                    { "path": "/workspace/**", "access": "rw" }
                ]
            },
            { "backend": "local", "mount": "/scratch" }
        ]
    });
    let sandbox = crate::sandbox::get_or_create("fuse-engine".into(), Some(config))
        .await
        .expect("sandbox");
    let events = sandbox
        .subscribe(crate::events::Since::Now, 1000)
        .expect("subscribe");
    let run = |script: &'static str| {
        let sandbox = sandbox.clone();
        async move {
            let spawned = sandbox
                .spawn(
                    vec![
                        "/bin/sh".into(),
                        "-c".into(),
                        format!("exec 2>&1; {script}"),
                    ],
                    vec![],
                    None,
                )
                .await
                .expect("spawn");
            let [stdin, stdout, _stderr] = spawned.take_stdio().expect("stdio");
            drop(stdin);
            let reader = std::thread::spawn(move || {
                let mut s = String::new();
                let _ = std::io::Read::read_to_string(&mut std::fs::File::from(stdout), &mut s);
                s
            });
            let status = spawned.wait().await.expect("wait");
            (status.code, reader.join().unwrap_or_default())
        }
    };
    let (code, out) = run("cat /workspace/secret.env; echo x > /workspace/docs/new.md").await;
    assert_ne!(code, Some(0), "{out}");
    let (code, out) = run(
        "echo kept > /workspace/src/kept.txt && echo s > /scratch/s.txt && cat /workspace/docs/guide.md",
    )
    .await;
    assert_eq!((code, out.as_str()), (Some(0), "# guide\n"));
    let mut denied = Vec::new();
    while denied.len() < 2 {
        let event = tokio::time::timeout(Duration::from_secs(5), events.next())
            .await
            .expect("an event in time")
            .expect("stream open");
        if event.kind == "fs.denied" {
            denied.push((
                event.fields["path"].as_str().unwrap_or("").to_owned(),
                event.fields["rule"].as_u64(),
            ));
        }
    }
    assert_eq!(
        denied,
        [
            ("/workspace/secret.env".to_owned(), Some(0)),
            ("/workspace/docs/new.md".to_owned(), Some(1)),
        ]
    );
    sandbox.close().await;
    assert_eq!(
        std::fs::read_to_string(src.path().join("src/kept.txt")).expect("persisted"),
        "kept\n"
    );
    assert!(home
        .path()
        .join("sandboxes/fuse-engine/fs/scratch/s.txt")
        .exists());
}

/// The workload script shared with `benches/fs.mjs`.
const WORKLOAD: &str = include_str!("../../../benches/fs_workload.py");

/// Writes the inputs of the workload into `dir`: the script, a `node_modules`-shaped tarball
/// (2 000 packages x 5 files), and returns the tarball's name.
fn bench_inputs(dir: &Path) {
    std::fs::write(dir.join("fs_workload.py"), WORKLOAD).expect("script");
    let pack = tempfile::tempdir().expect("tempdir");
    for p in 0..2000 {
        let lib = pack.path().join(format!("node_modules/pkg{p}/lib"));
        std::fs::create_dir_all(&lib).expect("mkdir");
        for name in ["package.json", "README.md", "a.js"] {
            std::fs::write(lib.parent().expect("pkg").join(name), [b'y'; 700]).expect("write");
        }
        std::fs::write(lib.join("index.js"), [b'y'; 700]).expect("write");
        std::fs::write(lib.join("b.js"), [b'z'; 300]).expect("write");
    }
    let ok = std::process::Command::new("tar")
        .arg("-cf")
        .arg(dir.join("nm.tar"))
        .arg("-C")
        .arg(pack.path())
        .arg("node_modules")
        .status()
        .expect("tar")
        .success();
    assert!(ok);
}

fn write_big(path: &Path) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).expect("big");
    let chunk = vec![0xabu8; 1 << 20];
    for _ in 0..100 {
        f.write_all(&chunk).expect("write big");
    }
}

/// What `benches/fs_workload.py` expects in its seed dir, made by the host before the sandbox
/// starts: `stat/` (10 x 1 000 files), `tree/` (500 dirs x 100 files), `repo/` (a committed git
/// repository of 200 dirs x 100 files) and `big.bin` (100 MiB).
fn seed_bench(dir: &Path) {
    for (sub, dirs, files) in [("stat", 10, 1000), ("tree", 500, 100), ("repo", 200, 100)] {
        for d in 0..dirs {
            let at = dir.join(format!("{sub}/c{d}"));
            std::fs::create_dir_all(&at).expect("mkdir");
            for i in 0..files {
                std::fs::write(at.join(format!("f{i}")), format!("{d} {i}\n")).expect("seed");
            }
        }
    }
    let git = |args: &[&str]| {
        let ok = std::process::Command::new("git")
            .args([
                "-c",
                "user.name=bench",
                "-c",
                "user.email=bench@localhost",
                "-C",
            ])
            .arg(dir.join("repo"))
            .args(args)
            .stdout(std::process::Stdio::null())
            .status()
            .expect("git")
            .success();
        assert!(ok, "git {args:?}");
    };
    git(&["init", "-q"]);
    git(&["add", "-A"]);
    git(&["commit", "-q", "-m", "seed"]);
    write_big(&dir.join("big.bin"));
}

/// Workloads of `benches/fs_workload.py`, in its output order, with their labels.
const BENCH_ROWS: [(&str, &str); 8] = [
    ("create", "create 10 000 files (10 dirs, 64 B each)"),
    (
        "stat_cold",
        "stat 10 000 files, cold (first access through the mount)",
    ),
    ("stat_warm", "stat 10 000 files, warm"),
    ("find", "find over 50 000 entries (lstat each)"),
    (
        "unpack",
        "unpack a node_modules tree (tar -x, 2 000 packages x 5 files)",
    ),
    ("git_status", "git status in a 20 000-file repository"),
    ("read", "read 100 MiB (1 MiB reads)"),
    ("write", "write 100 MiB (1 MiB writes)"),
];

/// `npm run bench fs` runs this: the workloads in one sandbox on a FUSE mount with ACLs (`.env`
/// hidden, `docs` read-only) vs on a plain bind mount, interleaved rounds, medians.
#[test]
#[ignore = "benchmark; run: cargo test --lib bench_sandboxed_fs -- --ignored --nocapture"]
fn bench_sandboxed_fs_fuse_against_a_bind_mount() {
    if !crate::fs::fuse_available() {
        eprintln!("skipped: this process cannot open /dev/fuse");
        return;
    }
    let rounds: usize = std::env::var("HIVE_FS_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let input = tempfile::tempdir().expect("input");
    bench_inputs(input.path());
    // Both sources side by side in one directory (`HIVE_FS_BENCH_DIR`, else the temp dir), so
    // that the file system allocates their inodes alike: on ext4 a create can cost 50-1000 us
    // depending on the block group's recently deleted inodes, more than a FUSE round trip.
    let base = std::env::var_os("HIVE_FS_BENCH_DIR").map_or_else(std::env::temp_dir, Into::into);
    let sources = tempfile::tempdir_in(&base).expect("sources");
    let (fuse_src, bind_src) = (sources.path().join("fuse"), sources.path().join("bind"));
    std::fs::create_dir(&fuse_src).expect("mkdir");
    std::fs::create_dir(&bind_src).expect("mkdir");
    seed_bench(&fuse_src.join("seed"));
    let ok = std::process::Command::new("cp")
        .arg("-a")
        .arg(fuse_src.join("seed"))
        .arg(&bind_src)
        .status()
        .expect("cp")
        .success();
    assert!(ok);
    let mut runs: [Vec<Vec<f64>>; 2] = Default::default();
    let (mut passthrough, mut long) = (false, false);
    for round in 0..rounds {
        let mount = |target: &str, source: &Path, fuse: bool| BindMount {
            source: source.into(),
            target: target.into(),
            writable: true,
            fuse,
            ..Default::default()
        };
        let spec = LaunchSpec {
            name: "fs-bench".into(),
            mounts: vec![
                mount("/fuse", &fuse_src, true),
                mount("/bind", &bind_src, false),
                BindMount {
                    writable: false,
                    ..mount("/input", input.path(), false)
                },
            ],
            ca_bundle_pem: Vec::new(),
            proxy_port: PORT,
            capture_ports: Vec::new(),
        };
        let (host, handover) = SandboxHost::start(spec).expect("starts");
        let acls = [
            ("/fuse/**/*.env", FsAccess::None),
            ("/fuse/docs/**", FsAccess::R),
            ("/fuse/**", FsAccess::Rw),
        ];
        let fs_mount = FsMount {
            mount: "/fuse".into(),
            ..fs_mount(&acls)
        };
        let events = Arc::new(Collected::default());
        let mut servers = Vec::new();
        for (_, fd) in handover.fuse {
            let dir = std::fs::File::open(&fuse_src).expect("source");
            let server = AclFs::with_sink(&fs_mount, OwnedFd::from(dir), events.clone())
                .expect("server")
                .present_owner(0, 0)
                .serve(fd)
                .expect("serves");
            servers.push(server);
        }
        for (slot, dir) in [(0, "/bind"), (1, "/fuse")] {
            let work = format!("{dir}/round{round}");
            let (code, out) = sh(
                &host,
                &format!(
                    "mkdir {work} && python3 /input/fs_workload.py {work} {dir}/seed /input/nm.tar"
                ),
            );
            assert_eq!(code, 0, "{out}");
            let ms: Value = serde_json::from_str(out.trim()).expect("json");
            runs[slot].push(
                BENCH_ROWS
                    .iter()
                    .map(|(n, _)| ms[n].as_f64().unwrap_or(0.0))
                    .collect(),
            );
        }
        passthrough |= servers.iter().any(FsHandle::passthrough);
        long |= servers.iter().any(FsHandle::long_cache);
        assert_eq!(events.denied(), vec![]);
        host.close();
    }
    let median = |slot: usize, i: usize| {
        let mut v: Vec<f64> = runs[slot].iter().map(|r| r[i]).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!(
        "| workload (inside a sandbox, one process) | bind mount | FUSE mount with ACLs | ratio |"
    );
    println!("|---|---|---|---|");
    for (i, (_, label)) in BENCH_ROWS.iter().enumerate() {
        let (b, f) = (median(0, i), median(1, i));
        println!("| {label} | {b:.0} ms | {f:.0} ms | {:.2}x |", f / b);
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "median of {rounds} interleaved rounds; sources in {}; kernel passthrough used: \
         {passthrough}; long kernel caches: {long}; load average: {}",
        base.display(),
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
}

/// As root, runs these tests and the refusal test again as uid/gid 65534, where `/dev/fuse`
/// (mode 0600 here) cannot be opened: the FUSE tests must skip, the Landlock ones pass, and a
/// per-file config must be refused with `HIVE_FS_UNENFORCEABLE`.
#[test]
fn unprivileged_run_refuses_per_file_rules_it_cannot_enforce() {
    // SAFETY: trivial getter.
    if unsafe { libc::geteuid() } != 0 || std::env::var_os("HIVE_TEST_UNPRIVILEGED").is_some() {
        eprintln!("skipped: needs root to switch to an unprivileged user (or is that run)");
        return;
    }
    if !Path::new("/usr/bin/setpriv").exists() {
        eprintln!("skipped: setpriv (util-linux) is not installed");
        return;
    }
    // SAFETY: plain open without O_CLOEXEC so that setpriv inherits it; closed below.
    let exe_fd = unsafe { libc::open(c"/proc/self/exe".as_ptr(), libc::O_RDONLY) };
    assert!(exe_fd >= 0, "open /proc/self/exe");
    let out = std::process::Command::new("/usr/bin/setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(format!("/proc/self/fd/{exe_fd}"))
        .args([
            "sandbox::linux::fuse_tests::",
            "sandbox::runtime::tests::per_file_mounts_are_refused",
            "--test-threads=2",
        ])
        .env("HIVE_TEST_UNPRIVILEGED", "1")
        .env("HOME", "/nonexistent")
        .current_dir("/")
        .output()
        .expect("run setpriv");
    // SAFETY: our fd.
    unsafe { libc::close(exe_fd) };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "unprivileged run failed:\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("per_file_mounts_are_refused_without_fuse_and_planned_with_it ... ok"),
        "{stdout}"
    );
    assert!(stdout.contains("test result: ok"), "{stdout}");
}
