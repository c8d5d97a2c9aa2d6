//! Escape tests for the launcher, each named after the escape it checks.
//!
//! They start real sandboxes, so they need user namespaces; they run as whoever runs `cargo test`.
//! As root, [`unprivileged_run_passes_the_same_escape_tests`] re-executes this test binary as
//! uid/gid 65534 (`setpriv`) with the same filter, so one `cargo test --lib sandbox::linux` run
//! covers both. Commands inside use `/usr/bin/python3` and coreutils from the host's `/usr`.
//!
//! The benchmark ([`bench_spawn_true`]) is `#[ignore]`d: `cargo test --lib bench_spawn_true --
//! --ignored --nocapture`.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use super::*;

const PORT: u16 = 3128;
const PY: &str = "/usr/bin/python3";

struct Sandbox {
    host: SandboxHost,
    listener: TcpListener,
    captured: capture::CaptureListeners,
    dns_udp: Option<std::net::UdpSocket>,
    rw: tempfile::TempDir,
    ro: tempfile::TempDir,
}

#[derive(Debug)]
struct Output {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Output {
    fn ok(&self) -> bool {
        self.status.code == Some(0)
    }
}

fn start(name: &str) -> Sandbox {
    let rw = tempfile::tempdir().expect("tempdir");
    let ro = tempfile::tempdir().expect("tempdir");
    std::fs::write(ro.path().join("data.txt"), "read-only data\n").expect("write");
    let spec = LaunchSpec {
        name: name.into(),
        mounts: vec![
            BindMount {
                source: rw.path().into(),
                target: "/workspace".into(),
                writable: true,
                ..Default::default()
            },
            BindMount {
                source: ro.path().into(),
                target: "/data".into(),
                writable: false,
                ..Default::default()
            },
        ],
        ca_bundle_pem: b"-----BEGIN CERTIFICATE-----\ntest\n-----END CERTIFICATE-----\n".to_vec(),
        proxy_port: PORT,
        capture_ports: vec![80, 443],
    };
    let (host, handover) = SandboxHost::start(spec).expect("sandbox starts");
    let listener = handover.proxy;
    Sandbox {
        host,
        listener,
        captured: handover.transparent,
        dns_udp: handover.dns_udp,
        rw,
        ro,
    }
}

fn read_all(fd: OwnedFd) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = std::fs::File::from(fd).read_to_end(&mut s);
        String::from_utf8_lossy(&s).into_owned()
    })
}

async fn run_with(host: &SandboxHost, argv: &[&str], stdin: &[u8]) -> Output {
    let p = ProcessSpec {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env: default_env(PORT),
        cwd: None,
    };
    let mut proc = host.spawn_async(p).await.expect("spawn");
    let mut input = std::fs::File::from(proc.stdin.take().expect("stdin"));
    let _ = input.write_all(stdin);
    drop(input);
    let out = read_all(proc.stdout.try_clone().expect("dup"));
    let err = read_all(proc.stderr.try_clone().expect("dup"));
    let status = proc.wait().await.expect("wait");
    drop(proc);
    Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    }
}

async fn sh(host: &SandboxHost, script: &str) -> Output {
    run_with(host, &["/bin/sh", "-c", script], b"").await
}

async fn py(host: &SandboxHost, code: &str) -> Output {
    run_with(host, &[PY, "-c", code], b"").await
}

/// Connects to `addr:port` and prints "connected" or the errno name.
fn py_connect(addr: &str, port: u16) -> String {
    format!(
        "import socket,errno\ns=socket.socket()\ns.settimeout(5)\ntry:\n s.connect(('{addr}',{port}))\n print('connected')\n print(s.recv(100).decode())\nexcept OSError as e:\n print(errno.errorcode.get(e.errno, e))"
    )
}

// ----- network -----

#[tokio::test(flavor = "multi_thread")]
async fn cannot_reach_192_0_2_1_without_the_proxy() {
    let sb = start("net-direct");
    let t = Instant::now();
    // Every address is local inside (capture routes): a port nothing listens on refuses at once.
    let out = py(&sb.host, &py_connect("192.0.2.1", 9)).await;
    assert_eq!(out.stdout.trim(), "ECONNREFUSED", "{out:?}");
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "must fail fast, took {:?}",
        t.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn cannot_reach_a_service_on_the_host_loopback() {
    let sb = start("net-host-lo");
    let service = TcpListener::bind("127.0.0.1:0").expect("bind");
    service.set_nonblocking(true).expect("nonblocking");
    let port = service.local_addr().expect("addr").port();
    let out = py(&sb.host, &py_connect("127.0.0.1", port)).await;
    assert_eq!(out.stdout.trim(), "ECONNREFUSED", "{out:?}");
    assert!(
        service.accept().is_err(),
        "the host service saw a connection"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_proxy_listener_receives_connections_made_inside() {
    let sb = start("net-proxy");
    let listener = sb.listener.try_clone().expect("clone");
    let server = std::thread::spawn(move || {
        let (mut c, peer) = listener.accept().expect("accept");
        c.write_all(b"hello from the proxy").expect("write");
        peer
    });
    let out = py(&sb.host, &py_connect("127.0.0.1", PORT)).await;
    assert_eq!(out.stdout, "connected\nhello from the proxy\n", "{out:?}");
    assert!(server.join().expect("server").ip().is_loopback());
    // The port exists only inside the sandbox's network namespace.
    assert!(std::net::TcpStream::connect(("127.0.0.1", PORT)).is_err() || PORT_IN_USE_ON_HOST());
}

/// Accepts one connection on the capture listener of `port` for `v6` and answers with the local
/// address the sandbox dialled.
fn answer_captured(
    listeners: &capture::CaptureListeners,
    port: u16,
    v6: bool,
) -> std::thread::JoinHandle<()> {
    let listener = listeners
        .iter()
        .find(|(p, l)| *p == port && l.local_addr().map(|a| a.is_ipv6()).unwrap_or(false) == v6)
        .map(|(_, l)| l.try_clone().expect("clone"))
        .expect("capture listener for the port");
    std::thread::spawn(move || {
        let (mut c, _) = listener.accept().expect("accept");
        let local = c.local_addr().expect("local addr");
        c.write_all(format!("captured {}", local.ip()).as_bytes())
            .expect("write");
    })
}

fn py_dial(addr: &str, port: u16) -> String {
    format!(
        "import socket,errno\ntry:\n s=socket.create_connection(('{addr}',{port}),5)\n print(s.recv(100).decode())\nexcept OSError as e:\n print(errno.errorcode.get(e.errno, e))"
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_connection_to_any_address_on_a_captured_port_lands_on_its_capture_listener() {
    let sb = start("net-capture");
    let v4 = answer_captured(&sb.captured, 443, false);
    let out = py(&sb.host, &py_dial("192.0.2.1", 443)).await;
    assert_eq!(out.stdout.trim(), "captured 192.0.2.1", "{out:?}");
    v4.join().expect("v4");
    let v6 = answer_captured(&sb.captured, 80, true);
    let out = py(&sb.host, &py_dial("2001:db8::1", 80)).await;
    assert_eq!(out.stdout.trim(), "captured 2001:db8::1", "{out:?}");
    v6.join().expect("v6");
    // A port nothing captures is refused at once, IPv6 too.
    let t = Instant::now();
    let out = py(&sb.host, &py_dial("2001:db8::1", 9)).await;
    assert_eq!(out.stdout.trim(), "ECONNREFUSED", "{out:?}");
    assert!(t.elapsed() < Duration::from_secs(3));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_port_added_later_gets_listeners_from_the_setns_helper() {
    let sb = start("net-capture-later");
    let added = sb
        .host
        .open_capture_listeners(vec![7443, 80])
        .expect("helper");
    // 80 is already bound by init: only 7443 comes back, on IPv4 and IPv6.
    let ports: Vec<u16> = added.iter().map(|(p, _)| *p).collect();
    assert_eq!(ports, vec![7443, 7443], "{added:?}");
    let server = answer_captured(&added, 7443, false);
    let out = py(&sb.host, &py_dial("198.51.100.7", 7443)).await;
    assert_eq!(out.stdout.trim(), "captured 198.51.100.7", "{out:?}");
    server.join().expect("server");
    sb.host.close();
    assert!(sb.host.open_capture_listeners(vec![7444]).is_err());
}

/// 1 000 new ports send 2 000 fd messages, far more than the socket holds: the helper must not
/// block the launcher thread (and with it every spawn and close in the process).
#[tokio::test(flavor = "multi_thread")]
async fn a_config_adding_1000_ports_does_not_hang_the_launcher() {
    let sb = std::sync::Arc::new(start("net-capture-1000"));
    let ports: Vec<u16> = (20_000..21_000).collect();
    let (tx, rx) = std::sync::mpsc::channel();
    let helper = sb.clone();
    std::thread::spawn(move || {
        let _ = tx.send(helper.host.open_capture_listeners(ports));
    });
    let added = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the capture helper hung the launcher")
        .expect("helper");
    let v4 = added
        .iter()
        .filter(|(_, l)| l.local_addr().is_ok_and(|a| a.is_ipv4()))
        .count();
    assert_eq!(v4, 1000, "an IPv4 listener per port");
    let out = sh(&sb.host, "echo still spawning").await;
    assert_eq!(out.stdout.trim(), "still spawning", "{out:?}");
    let server = answer_captured(&added, 20_999, false);
    let dialled = py(&sb.host, &py_dial("198.51.100.7", 20_999)).await;
    assert_eq!(
        dialled.stdout.trim(),
        "captured 198.51.100.7",
        "{dialled:?}"
    );
    server.join().expect("server");
    sb.host.close();
}

#[tokio::test(flavor = "multi_thread")]
async fn resolv_conf_and_hosts_point_at_the_sandbox_dns() {
    let sb = start("net-dns");
    let out = sh(&sb.host, "cat /etc/resolv.conf; cat /etc/hosts").await;
    let want = format!(
        "{}{}",
        String::from_utf8_lossy(plan::RESOLV_CONF),
        String::from_utf8_lossy(&plan::hosts_file(b"net-dns"))
    );
    assert_eq!(out.stdout, want, "{out:?}");
    let dns = sb.dns_udp.as_ref().expect("dns socket");
    dns.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let out = py(
        &sb.host,
        "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.sendto(b'query',('127.0.0.1',53))\nprint('sent')",
    )
    .await;
    assert_eq!(out.stdout.trim(), "sent", "{out:?}");
    let mut buf = [0u8; 16];
    let (n, _) = dns.recv_from(&mut buf).expect("the DNS socket receives");
    assert_eq!(&buf[..n], b"query");
}

#[allow(non_snake_case)]
fn PORT_IN_USE_ON_HOST() -> bool {
    TcpListener::bind(("127.0.0.1", PORT)).is_err()
}

#[tokio::test(flavor = "multi_thread")]
async fn two_processes_of_one_sandbox_talk_over_loopback() {
    let sb = start("net-peers");
    let server = py(
        &sb.host,
        "import socket,os\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\ns.bind(('127.0.0.1',8000))\ns.listen()\nopen('/tmp/ready','w').close()\nc,_=s.accept()\nprint(c.recv(100).decode())",
    );
    let client = async {
        let wait = "import os,time\nfor _ in range(200):\n if os.path.exists('/tmp/ready'): break\n time.sleep(0.02)\n";
        let code = format!(
            "{wait}{}\ns.send(b'ping')",
            py_connect("127.0.0.1", 8000).replace(" print(s.recv(100).decode())\n", "")
        );
        py(&sb.host, &code).await
    };
    let (server, client) = tokio::join!(server, client);
    assert_eq!(client.stdout.trim(), "connected", "{client:?}");
    assert_eq!(server.stdout.trim(), "ping", "{server:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn cannot_reach_or_see_another_sandbox() {
    let a = start("iso-a");
    let b = start("iso-b");
    let server = py(
        &b.host,
        "import socket\ns=socket.socket()\ns.bind(('127.0.0.1',8001))\ns.listen()\nopen('/tmp/b-secret','w').write('b')\ns.settimeout(3)\ntry:\n s.accept()\n print('accepted')\nexcept OSError:\n print('nobody came')",
    );
    let probe = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let net = py(&a.host, &py_connect("127.0.0.1", 8001)).await;
        let fs = sh(&a.host, "cat /tmp/b-secret 2>&1; echo rc=$?").await;
        (net, fs)
    };
    let (server, (net, fs)) = tokio::join!(server, probe);
    assert_eq!(net.stdout.trim(), "ECONNREFUSED", "{net:?}");
    assert!(fs.stdout.contains("rc=1"), "{fs:?}");
    assert_eq!(server.stdout.trim(), "nobody came", "{server:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_spawns_in_several_sandboxes_all_complete() {
    let sandboxes: Vec<Sandbox> = (0..3).map(|i| start(&format!("many-{i}"))).collect();
    let mut runs = Vec::new();
    for (i, sb) in sandboxes.iter().enumerate() {
        for j in 0..8 {
            runs.push(async move {
                let out = sh(&sb.host, &format!("echo {i}-{j}; exit {j}")).await;
                (i, j, out)
            });
        }
    }
    for (i, j, out) in futures_join_all(runs).await {
        assert_eq!(out.stdout, format!("{i}-{j}\n"));
        assert_eq!(out.status.code, Some(j));
    }
}

/// Minimal join_all (no futures crate): polls every future to completion concurrently.
async fn futures_join_all<F: std::future::Future>(futs: Vec<F>) -> Vec<F::Output> {
    let handles: Vec<_> = futs.into_iter().map(Box::pin).collect();
    let mut out = Vec::with_capacity(handles.len());
    let mut set: Vec<_> = handles.into_iter().map(Some).collect();
    let mut results: Vec<Option<F::Output>> = (0..set.len()).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (slot, res) in set.iter_mut().zip(results.iter_mut()) {
            if let Some(f) = slot {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => {
                        *res = Some(v);
                        *slot = None;
                    }
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.extend(results.into_iter().flatten());
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn only_loopback_exists_inside() {
    let sb = start("net-ifaces");
    let out = sh(
        &sb.host,
        "cat /proc/net/dev | tail -n +3 | cut -d: -f1 | tr -d ' '",
    )
    .await;
    assert_eq!(out.stdout.trim(), "lo", "{out:?}");
}

// ----- processes -----

#[tokio::test(flavor = "multi_thread")]
async fn cannot_see_host_processes() {
    let sb = start("proc-see");
    let out = sh(&sb.host, "ls /proc | grep -E '^[0-9]+$'").await;
    let pids: Vec<i32> = out.stdout.lines().filter_map(|l| l.parse().ok()).collect();
    assert!(pids.contains(&1), "{out:?}");
    assert!(
        pids.len() <= 4,
        "sees more than its own processes: {pids:?}"
    );
    let host_pid = std::process::id() as i32;
    assert!(!pids.contains(&host_pid) || host_pid < 5, "{pids:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn cannot_signal_or_ptrace_processes_outside_its_domain() {
    let sb = start("proc-signal");
    // PID 1 (init) stands for everything outside the workload: the host is not even visible.
    let out = sh(&sb.host, "kill -9 1; echo rc=$?").await;
    assert!(out.stdout.contains("rc=1"), "{out:?}");
    let out = py(
        &sb.host,
        "import ctypes,os\nlibc=ctypes.CDLL(None,use_errno=True)\nr=libc.ptrace(16,1,0,0)\nprint(r, os.strerror(ctypes.get_errno()))",
    )
    .await;
    assert!(out.stdout.starts_with("-1 "), "{out:?}");
    let out = sh(&sb.host, "cat /proc/1/environ; echo rc=$?").await;
    assert!(out.stdout.ends_with("rc=1\n"), "{out:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn stdio_pipes_exit_codes_and_signals_are_reported() {
    let sb = start("proc-stdio");
    let out = run_with(&sb.host, &["/usr/bin/cat"], b"piped input").await;
    assert_eq!(
        (out.stdout.as_str(), out.status.code),
        ("piped input", Some(0))
    );
    let out = sh(&sb.host, "echo out; echo err >&2; exit 7").await;
    assert_eq!(
        (out.stdout.as_str(), out.stderr.as_str()),
        ("out\n", "err\n")
    );
    assert_eq!(
        out.status,
        ExitStatus {
            code: Some(7),
            signal: None
        }
    );
    let out = sh(&sb.host, "kill -TERM $$").await;
    assert_eq!(
        out.status,
        ExitStatus {
            code: None,
            signal: Some(libc::SIGTERM)
        }
    );
    // SIGPIPE is back to default inside although the test harness ignores it.
    let out = sh(&sb.host, "yes | head -n 1; echo ${PIPESTATUS:-done}").await;
    assert!(out.ok(), "{out:?}");
    let p = sb
        .host
        .spawn(ProcessSpec {
            argv: vec!["sleep".into(), "100".into()],
            env: default_env(PORT),
            cwd: None,
        })
        .expect("spawn");
    assert!(p.pid > 1, "pid inside the sandbox: {}", p.pid);
    p.kill(libc::SIGKILL).expect("kill");
    assert_eq!(p.wait().await.expect("wait").signal, Some(libc::SIGKILL));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_command_fails_clearly() {
    let sb = start("proc-missing");
    let err = sb
        .host
        .spawn(ProcessSpec {
            argv: vec!["no-such-command-xyz".into()],
            env: default_env(PORT),
            cwd: None,
        })
        .expect_err("must fail");
    assert_eq!(err.code(), crate::ErrorCode::SpawnFailed);
    assert!(err.to_string().contains("no-such-command-xyz"), "{err}");
    let err = sb
        .host
        .spawn(ProcessSpec {
            argv: vec!["/bin/true".into()],
            env: vec![],
            cwd: Some("/nope".into()),
        })
        .expect_err("must fail");
    assert_eq!(err.code(), crate::ErrorCode::SpawnFailed);
    let out = sh(&sb.host, "no-such-command-xyz").await;
    assert_eq!(out.status.code, Some(127));
}

#[tokio::test(flavor = "multi_thread")]
async fn nothing_of_the_host_environment_leaks_in() {
    let sb = start("proc-env");
    let out = run_with(&sb.host, &["/usr/bin/env"], b"").await;
    let mut got: Vec<String> = out.stdout.lines().map(String::from).collect();
    let mut want: Vec<String> = default_env(PORT)
        .into_iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    got.sort();
    want.sort();
    assert_eq!(got, want);
}

#[tokio::test(flavor = "multi_thread")]
async fn close_leaves_no_process_behind() {
    let sb = start("proc-close");
    let _p = sb
        .host
        .spawn(ProcessSpec {
            argv: vec![
                "/bin/sh".into(),
                "-c".into(),
                "sleep 1000 & sleep 1000".into(),
            ],
            env: default_env(PORT),
            cwd: None,
        })
        .expect("spawn");
    let orphan = sh(&sb.host, "sleep 1000 >/dev/null 2>&1 & echo $!").await;
    assert!(orphan.ok(), "{orphan:?}");
    let ns_id = sb.host.pid_namespace_id();
    let members = || namespace_members(ns_id);
    let deadline = Instant::now() + Duration::from_secs(5);
    while members() < 4 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(members() >= 4, "sh, 2 sleeps, orphan sleep");
    sb.host.close();
    sb.host.close(); // idempotent
    assert_eq!(members(), 0);
    let err = sb.host.spawn(ProcessSpec {
        argv: vec!["/bin/true".into()],
        env: vec![],
        cwd: None,
    });
    assert_eq!(
        err.expect_err("closed").code(),
        crate::ErrorCode::SandboxClosed
    );
}

/// Host processes whose PID namespace is `ns_id` (init itself is not dumpable, so as an
/// unprivileged user it is not counted; the workloads are).
/// `kill` reaches everything the command started, also a process that made a session of its own
/// (`setsid`) and so left the command's process group: through the command's cgroup as root, its
/// subreaper tree unprivileged (docs/processes.md).
#[tokio::test(flavor = "multi_thread")]
async fn kill_reaches_every_process_of_the_command_even_in_a_session_of_its_own() {
    let sb = start("proc-kill-group");
    let ns_id = sb.host.pid_namespace_id();
    let members = || namespace_members(ns_id);
    // init counts where its /proc entry is readable (as root; it is not dumpable).
    let init = members();
    let p = sb
        .host
        .spawn(ProcessSpec {
            argv: vec![
                "/bin/sh".into(),
                "-c".into(),
                "sleep 1000 & sleep 1000 & setsid sh -c 'echo ready; exec sleep 1000' & wait"
                    .into(),
            ],
            env: default_env(PORT),
            cwd: None,
        })
        .expect("spawn");
    let wait_for = |pred: &dyn Fn(usize) -> bool| {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !pred(members()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        members()
    };
    assert_eq!(wait_for(&|n| n >= init + 4), init + 4, "sh and 3 sleeps");
    // The escapee prints once its own session exists.
    let mut ready = [0u8; 6];
    let mut out = std::fs::File::from(p.stdout.try_clone().expect("dup"));
    out.read_exact(&mut ready).expect("ready");
    assert_eq!(&ready, b"ready\n");
    p.kill(libc::SIGKILL).expect("kill");
    let status = p.wait().await.expect("wait");
    assert_eq!(status.signal, Some(libc::SIGKILL));
    assert_eq!(
        wait_for(&|n| n <= init),
        init,
        "no sleep remains, not even the setsid'd one"
    );
    sb.host.close();
    assert_eq!(members(), 0);
}

/// The setup child runs in the host's memory until it executes hive-init: whatever it changes
/// that belongs to the memory (dumpability) would change the host process.
#[tokio::test(flavor = "multi_thread")]
async fn starting_a_sandbox_leaves_the_host_process_dumpable() {
    let sb = start("proc-host-dumpable");
    assert!(sh(&sb.host, "true").await.ok());
    // SAFETY: plain prctl query.
    let dumpable = unsafe { libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) };
    assert_eq!(dumpable, 1);
}

fn namespace_members(ns_id: u64) -> usize {
    let want = format!("pid:[{ns_id}]");
    std::fs::read_dir("/proc")
        .expect("proc")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
        .filter(|e| {
            let link = std::fs::read_link(e.path().join("ns/pid"));
            link.ok().and_then(|l| l.to_str().map(|s| s == want)) == Some(true)
        })
        .count()
}

#[test]
fn killing_the_host_process_leaves_no_sandboxed_process() {
    const CHILD: &str = "HIVE_TEST_DEATH_CHILD";
    if std::env::var_os(CHILD).is_some() {
        // The "host process" that gets SIGKILLed: a sandbox with a workload and an orphan.
        let sb = start("host-death");
        let spec = ProcessSpec {
            argv: vec![
                "/bin/sh".into(),
                "-c".into(),
                "sleep 1000 & sleep 1000".into(),
            ],
            env: default_env(PORT),
            cwd: None,
        };
        let _p = sb.host.spawn(spec).expect("spawn");
        println!("ready {}", sb.host.pid_namespace_id());
        std::thread::sleep(Duration::from_secs(60));
        return;
    }
    // /proc/self/exe, not current_exe(): the path may meanwhile hold another build (a target
    // directory shared between worktrees), the inode we run from cannot.
    let mut child = std::process::Command::new("/proc/self/exe")
        .args([
            "--exact",
            "sandbox::linux::tests::killing_the_host_process_leaves_no_sandboxed_process",
        ])
        .args(["--nocapture", "--test-threads=1"])
        .env(CHILD, "1")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn the host process");
    let mut stdout = std::io::BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    let ns_id = loop {
        line.clear();
        let n = std::io::BufRead::read_line(&mut stdout, &mut line).expect("read");
        assert!(n > 0, "host process exited before it was ready");
        // libtest prints "test <name> ... " without a newline before our line.
        if let Some(pid) = line
            .trim()
            .rsplit("ready ")
            .next()
            .filter(|_| line.contains("ready "))
        {
            break pid.parse::<u64>().expect("pid namespace id");
        }
    };
    let members = || namespace_members(ns_id);
    let deadline = Instant::now() + Duration::from_secs(5);
    while members() < 3 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(members() >= 3, "sh and the two sleeps are running");
    child.kill().expect("SIGKILL the host process");
    child.wait().expect("reap");
    let deadline = Instant::now() + Duration::from_secs(5);
    while members() > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        members(),
        0,
        "sandboxed processes outlived the host process"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn does_not_run_as_host_root() {
    let sb = start("proc-uid");
    let p = sb
        .host
        .spawn(ProcessSpec {
            argv: vec!["sleep".into(), "100".into()],
            env: default_env(PORT),
            cwd: None,
        })
        .expect("spawn");
    let ns = format!("pid:[{}]", sb.host.pid_namespace_id());
    let uid_line = std::fs::read_dir("/proc")
        .expect("proc")
        .flatten()
        .filter(|e| {
            std::fs::read_link(e.path().join("ns/pid"))
                .ok()
                .and_then(|l| l.to_str().map(|s| s == ns))
                == Some(true)
        })
        .filter_map(|e| std::fs::read_to_string(e.path().join("status")).ok())
        .find(|st| st.contains("\nName:\tsleep") || st.starts_with("Name:\tsleep"))
        .and_then(|st| st.lines().find(|l| l.starts_with("Uid:")).map(String::from))
        .expect("the sleep is visible from the host");
    // SAFETY: trivial getter.
    let me = unsafe { libc::geteuid() };
    let want = if me == 0 { idmap::ROOT_MAPPED_ID } else { me };
    let uids: Vec<u32> = uid_line
        .split_whitespace()
        .skip(1)
        .filter_map(|u| u.parse().ok())
        .collect();
    assert_eq!(uids, [want; 4], "{uid_line}");
    p.kill(libc::SIGKILL).expect("kill");
    // Inside, it is root of its own namespace, with nothing to show for it.
    let out = sh(
        &sb.host,
        "id -u; cat /proc/1/maps >/dev/null 2>&1 || echo no-init-memory",
    )
    .await;
    assert_eq!(out.stdout, "0\nno-init-memory\n", "{out:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn orphans_are_reaped_and_init_holds_no_host_memory() {
    let sb = start("proc-orphans");
    let out = sh(&sb.host, "for i in 1 2 3; do sleep 0.1 & done; exit 0").await;
    assert!(out.ok(), "{out:?}");
    tokio::time::sleep(Duration::from_millis(600)).await;
    let want = format!("pid:[{}]", sb.host.pid_namespace_id());
    let zombies = std::fs::read_dir("/proc")
        .expect("proc")
        .flatten()
        .filter(|e| {
            let link = std::fs::read_link(e.path().join("ns/pid"));
            link.ok().and_then(|l| l.to_str().map(|s| s == want)) == Some(true)
        })
        .filter_map(|e| std::fs::read_to_string(e.path().join("status")).ok())
        .filter(|st| {
            st.lines()
                .any(|l| l.starts_with("State:") && l.contains('Z'))
        })
        .count();
    assert_eq!(zombies, 0);
    // The orphans' exits reached init, which is hive-init exec'd from its memfd: every mapping it
    // has is that program's, its stack or the kernel's (nothing of the host process).
    if let Ok(maps) = std::fs::read_to_string(format!("/proc/{}/maps", sb.host.init_host_pid())) {
        let foreign: Vec<&str> = maps
            .lines()
            .filter(|l| {
                let name = l.split_whitespace().nth(5).unwrap_or("");
                !(name.is_empty()
                    || name.starts_with("/memfd:hive-init")
                    || ["[stack]", "[vdso]", "[vvar]", "[vvar_vclock]", "[vsyscall]"]
                        .contains(&name))
            })
            .collect();
        assert!(
            foreign.is_empty(),
            "init maps host memory: {foreign:?}\n{maps}"
        );
        let exe = std::fs::read_link(format!("/proc/{}/exe", sb.host.init_host_pid()));
        let exe = exe
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        assert!(exe.starts_with("/memfd:hive-init"), "{exe}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn inherits_no_file_descriptor_of_the_host() {
    let sb = start("proc-fds");
    // A deliberately inheritable fd in the host process.
    // SAFETY: plain open without O_CLOEXEC; closed below.
    let leaky = unsafe { libc::open(c"/etc/hostname".as_ptr(), libc::O_RDONLY) };
    assert!(leaky >= 0);
    let out = sh(&sb.host, "ls /proc/self/fd").await;
    // SAFETY: our own fd.
    unsafe { libc::close(leaky) };
    let fds: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(
        fds,
        ["0", "1", "2", "3"],
        "only stdio (and ls's own directory fd): {out:?}"
    );
    // init is not dumpable: only root may look at its fds.
    if let Ok(init_fds) = std::fs::read_dir(format!("/proc/{}/fd", sb.host.init_host_pid())) {
        assert_eq!(init_fds.count(), 0, "init holds no fd of the host");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn cannot_inject_terminal_input_or_open_netlink_sockets() {
    let sb = start("proc-seccomp");
    let out = py(
        &sb.host,
        "import fcntl,termios,socket,errno\nfor req in (termios.TIOCSTI, termios.TIOCSTI | (1 << 32), 0x541C):\n try:\n  fcntl.ioctl(0, req, b'x')\n  print('ioctl ok')\n except OSError as e:\n  print(errno.errorcode[e.errno])\nfor fam in (socket.AF_NETLINK, socket.AF_PACKET):\n try:\n  socket.socket(fam, socket.SOCK_RAW, 0)\n  print('socket ok')\n except OSError as e:\n  print(errno.errorcode[e.errno])",
    )
    .await;
    // 0x541C is TIOCLINUX. The second TIOCSTI sets a high bit: the masked compare still matches.
    assert_eq!(out.stdout, "EPERM\nEPERM\nEPERM\nEPERM\nEPERM\n", "{out:?}");
}

/// vsock is not network-namespaced (on a VM, CID 2 is the hypervisor), and every other family
/// but unix and IP reaches kernel code the sandbox has no use for: only those three are allowed.
#[tokio::test(flavor = "multi_thread")]
async fn cannot_open_vsock_or_any_socket_family_but_unix_and_ip() {
    let sb = start("proc-families");
    let out = py(
        &sb.host,
        r#"import socket, errno, ctypes, os
def err(f):
    try:
        f()
        return 'ok'
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
allowed = (socket.AF_UNIX, socket.AF_INET, socket.AF_INET6)
bad = []
for fam in range(0, 64):
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM, socket.SOCK_RAW, socket.SOCK_SEQPACKET):
        got = err(lambda: socket.socket(fam, kind, 0).close())
        if (fam in allowed) == (got == 'EPERM'):
            bad.append((fam, kind, got))
print('bad', bad)
print('vsock', err(lambda: socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)))
print('vsock pair', err(lambda: socket.socketpair(socket.AF_VSOCK, socket.SOCK_STREAM)))
libc = ctypes.CDLL(None, use_errno=True)
nr = {'x86_64': 41, 'aarch64': 198, 'riscv64': 198}[os.uname().machine]
r = libc.syscall(ctypes.c_long(nr), ctypes.c_long((1 << 32) | 40), ctypes.c_long(1), ctypes.c_long(0))
print('vsock high bits', r, errno.errorcode.get(ctypes.get_errno()))
print('unix pair', err(lambda: socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)))"#,
    )
    .await;
    // AF_INET6 may be unsupported (EAFNOSUPPORT) on a host without IPv6: only EPERM is the filter.
    assert_eq!(
        out.stdout,
        "bad []\nvsock EPERM\nvsock pair EPERM\nvsock high bits -1 EPERM\nunix pair ok\n",
        "{out:?}"
    );
}

// ----- filesystem -----

#[tokio::test(flavor = "multi_thread")]
async fn cannot_read_etc_shadow_or_other_secrets() {
    let sb = start("fs-shadow");
    for f in ["/etc/shadow", "/etc/gshadow", "/etc/shadow-"] {
        if std::path::Path::new(f).exists() {
            let out = sh(&sb.host, &format!("cat {f}")).await;
            assert!(!out.ok() && out.stdout.is_empty(), "{f}: {out:?}");
        }
    }
    // The rest of /etc is there.
    assert!(sh(&sb.host, "grep -q '^root:' /etc/passwd").await.ok());
}

#[tokio::test(flavor = "multi_thread")]
async fn cannot_read_the_hosts_home_or_the_hive_home() {
    let sb = start("fs-home");
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let out = sh(
        &sb.host,
        "ls -A /root; ls -d /home/* /work /farm 2>/dev/null; echo end",
    )
    .await;
    assert_eq!(out.stdout, "end\n", "{out:?} (host HOME {home})");
    // HOME is a private, writable tmpfs.
    assert!(
        sh(&sb.host, "echo x > $HOME/.profile && cat $HOME/.profile")
            .await
            .ok()
    );
    assert!(!std::path::Path::new("/root/.profile-hive-test").exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn cannot_remount_unmount_or_create_namespaces() {
    let sb = start("fs-remount");
    for cmd in [
        "mount -o remount,rw /data",
        "mount -o remount,bind,rw /data",
        "umount /data",
        "umount -l /proc",
        "mount -t tmpfs none /tmp",
        "unshare -U true",
        "unshare -r true",
        "unshare -n true",
    ] {
        let out = sh(&sb.host, &format!("{cmd} 2>&1")).await;
        assert!(!out.ok(), "{cmd}: {out:?}");
    }
    let out = sh(&sb.host, "echo x > /data/new.txt").await;
    assert!(!out.ok(), "{out:?}");
    assert!(!sb.ro.path().join("new.txt").exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn cannot_write_outside_the_writable_mounts() {
    let sb = start("fs-write");
    for path in [
        "/x",
        "/usr/x",
        "/etc/x",
        "/data/x",
        "/proc/sys/kernel/hostname",
        "/dev/x",
        "/run/hive/x",
    ] {
        let out = sh(&sb.host, &format!("echo x > {path}")).await;
        assert!(!out.ok(), "{path}: {out:?}");
    }
    assert!(sh(&sb.host, "echo x > /tmp/x && cat /tmp/x").await.ok());
    if landlock::abi_version().is_some() {
        // Only Landlock stands in the way here (procfs is mounted read-write, the file is ours).
        let out = sh(&sb.host, "echo renamed > /proc/self/comm").await;
        assert!(
            !out.ok() && out.stderr.contains("Permission denied"),
            "{out:?}"
        );
    }
    assert!(sh(&sb.host, "cat /data/data.txt")
        .await
        .stdout
        .contains("read-only data"));
}

#[tokio::test(flavor = "multi_thread")]
async fn writes_to_a_writable_mount_land_in_the_host_source() {
    let sb = start("fs-rw");
    let out = sh(
        &sb.host,
        "mkdir -p /workspace/d && echo persisted > /workspace/d/out.txt",
    )
    .await;
    assert!(out.ok(), "{out:?}");
    let got = std::fs::read_to_string(sb.rw.path().join("d/out.txt")).expect("on the host");
    assert_eq!(got, "persisted\n");
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(sb.rw.path().join("d/out.txt")).expect("meta");
    // SAFETY: trivial getter.
    assert_eq!(
        meta.uid(),
        unsafe { libc::geteuid() },
        "owned by the user running hive"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_ca_bundle_is_bound_over_the_distribution_paths() {
    let sb = start("fs-ca");
    let out = sh(&sb.host, &format!("cat {CA_BUNDLE_PATH}")).await;
    assert!(out.stdout.contains("BEGIN CERTIFICATE"), "{out:?}");
    if std::path::Path::new("/etc/ssl/certs/ca-certificates.crt").exists() {
        let out = sh(&sb.host, "cat /etc/ssl/certs/ca-certificates.crt").await;
        assert_eq!(
            out.stdout,
            "-----BEGIN CERTIFICATE-----\ntest\n-----END CERTIFICATE-----\n"
        );
    }
}

// ----- unprivileged -----

/// As root: run this module's tests again as uid/gid 65534 without groups.
#[test]
fn unprivileged_run_passes_the_same_escape_tests() {
    // SAFETY: trivial getter.
    if unsafe { libc::geteuid() } != 0 || std::env::var_os("HIVE_TEST_UNPRIVILEGED").is_some() {
        eprintln!("skipped: needs root to switch to an unprivileged user (or is that run)");
        return;
    }
    if !std::path::Path::new("/usr/bin/setpriv").exists() {
        eprintln!("skipped: setpriv (util-linux) is not installed");
        return;
    }
    // The running binary's inode, passed as an inherited fd: the path may meanwhile hold another
    // build (a shared target directory), and setpriv would resolve /proc/self/exe to itself.
    // SAFETY: plain open without O_CLOEXEC so that setpriv inherits it; closed below.
    let exe_fd = unsafe { libc::open(c"/proc/self/exe".as_ptr(), libc::O_RDONLY) };
    assert!(exe_fd >= 0, "open /proc/self/exe");
    let exe = format!("/proc/self/fd/{exe_fd}");
    let out = std::process::Command::new("/usr/bin/setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(&exe)
        .args(["sandbox::linux::tests::", "--test-threads=2"])
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
    assert!(stdout.contains("test result: ok"), "{stdout}");
}

// ----- benchmark -----

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).copied().unwrap_or_default()
}

fn row(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    println!(
        "| {name:<58} | {:>8.2} | {:>8.2} |",
        percentile(&samples, 0.5).as_secs_f64() * 1e3,
        percentile(&samples, 0.9).as_secs_f64() * 1e3
    );
}

/// Median/p90 of spawn+wait of `true`: sandbox vs plain spawn vs bwrap.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "benchmark: cargo test --lib bench_spawn_true -- --ignored --nocapture"]
async fn bench_spawn_true() {
    const RUNS: usize = 100;
    // HIVE_BENCH_HEAP_MB=N: a host with an N MB heap (Node's is 50-200 MB), since every spawn
    // clones the host.
    let heap_mb: usize = std::env::var("HIVE_BENCH_HEAP_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let heap = vec![1u8; heap_mb << 20];
    println!("\nhost heap: {heap_mb} MB (HIVE_BENCH_HEAP_MB)");
    let t = Instant::now();
    let sb = start("bench");
    let start_time = t.elapsed();
    let spec = || ProcessSpec {
        argv: vec!["/usr/bin/true".into()],
        env: default_env(PORT),
        cwd: None,
    };
    let mut hive = Vec::new();
    for _ in 0..RUNS {
        let t = Instant::now();
        let p = sb.host.spawn_async(spec()).await.expect("spawn");
        p.wait().await.expect("wait");
        hive.push(t.elapsed());
    }
    let mut plain = Vec::new();
    for _ in 0..RUNS {
        let t = Instant::now();
        std::process::Command::new("/usr/bin/true")
            .status()
            .expect("true");
        plain.push(t.elapsed());
    }
    println!(
        "\nsandbox start (namespaces + init + fs): {:.2} ms",
        start_time.as_secs_f64() * 1e3
    );
    println!(
        "| {:<58} | {:>8} | {:>8} |",
        "spawn+wait `true`, 100 runs", "median ms", "p90 ms"
    );
    println!("|{}|{}|{}|", "-".repeat(60), "-".repeat(10), "-".repeat(10));
    // Cold: a new sandbox (namespaces, setup, hive-init) and its first spawn+wait, then close.
    let mut cold = Vec::new();
    for i in 0..RUNS / 5 {
        let t = Instant::now();
        let fresh = start(&format!("bench-cold-{i}"));
        let p = fresh.host.spawn_async(spec()).await.expect("spawn");
        p.wait().await.expect("wait");
        cold.push(t.elapsed());
    }
    // The cost of the exec'd program alone: hive-init (static, no libc) from its sealed memfd,
    // which only prints a line and exits when started without a role, vs a libc `true`.
    let image = image::init_image().expect("hive-init memfd");
    let mut init_exec = Vec::new();
    for _ in 0..RUNS {
        let t = Instant::now();
        std::process::Command::new(format!("/proc/self/fd/{image}"))
            .stderr(std::process::Stdio::null())
            .status()
            .expect("hive-init");
        init_exec.push(t.elapsed());
    }
    row(
        "hive sandbox (shared namespaces, vfork + hive-init spawn)",
        hive,
    );
    row("hive new sandbox + first spawn (cold), 20 runs", cold);
    row("std::process::Command (no isolation)", plain);
    row(
        &format!(
            "exec of hive-init ({} B, static) from its memfd + exit",
            image::HIVE_INIT.len()
        ),
        init_exec,
    );
    if let Ok(bwrap) = which("bwrap") {
        let mut b = Vec::new();
        for _ in 0..RUNS {
            let t = Instant::now();
            std::process::Command::new(&bwrap)
                .args([
                    "--unshare-all",
                    "--ro-bind",
                    "/",
                    "/",
                    "--dev",
                    "/dev",
                    "--proc",
                    "/proc",
                    "true",
                ])
                .status()
                .expect("bwrap");
            b.push(t.elapsed());
        }
        row(
            "bwrap --unshare-all --ro-bind / / --dev /dev --proc /proc true",
            b,
        );
    } else {
        println!("(bwrap not installed)");
    }
    // Idle memory of the sandbox, after the runs so that init has settled: init only.
    match std::fs::read_to_string(format!("/proc/{}/smaps_rollup", sb.host.init_host_pid())) {
        Ok(rollup) => {
            let pick = |k: &str| {
                let line = rollup.lines().find(|l| l.starts_with(k));
                line.map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
                    .unwrap_or_default()
            };
            let keys = ["Rss:", "Pss:", "Private_Clean:", "Private_Dirty:"];
            println!("idle sandbox (init): {}", keys.map(pick).join(", "));
        }
        Err(e) => {
            println!("idle sandbox memory: unreadable ({e}); init is not dumpable, run as root")
        }
    }
    drop(heap);
}

fn which(name: &str) -> std::io::Result<std::path::PathBuf> {
    for dir in ["/usr/bin", "/bin", "/usr/local/bin"] {
        let p = std::path::Path::new(dir).join(name);
        if p.exists() {
            return Ok(p);
        }
    }
    Err(std::io::ErrorKind::NotFound.into())
}

/// Measures how much host memory an idle init pins after the host rewrites its heap (init is a
/// copy-on-write copy of the host taken at sandbox start).
#[test]
#[ignore = "measurement: cargo test --lib init_memory_after_host_writes -- --ignored --nocapture"]
fn init_memory_after_host_writes() {
    const MB: usize = 1 << 20;
    let mut heap = vec![1u8; 200 * MB];
    let sb = start("mem");
    let rollup =
        || std::fs::read_to_string(format!("/proc/{}/smaps_rollup", sb.host.init_host_pid()));
    let pick = |r: &str, k: &str| {
        r.lines()
            .find(|l| l.starts_with(k))
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
    };
    let show = |when: &str| match rollup() {
        Ok(r) => println!(
            "{when}: {:?} {:?} {:?}",
            pick(&r, "Rss:"),
            pick(&r, "Pss:"),
            pick(&r, "Private_Dirty:")
        ),
        Err(e) => println!("{when}: unreadable ({e})"),
    };
    show("after start");
    for b in heap.iter_mut().step_by(4096) {
        *b = 2;
    }
    show("after the host rewrote 200 MB");
    drop(heap);
    show("after the host freed it");
}
