//! Resource limits of a sandbox: which mechanism enforces which limit on this host ([`decide`]),
//! and the per-sandbox state that applies, changes, reads and removes them ([`SandboxLimits`]).
//! docs/decisions.md#resource-limits has the table of what holds where.
//!
//! 1. [`SandboxLimits::prepare`] (the parent, before init is cloned) creates the sandbox's
//!    cgroups ([`cgroup`]), decides and writes the cgroup limits; init joins the v1 ones itself
//!    right after "go" ([`SandboxLimits::init_join_files`]), and every workload joins all of them
//!    before it is forked.
//! 2. [`decide`]: memory and cpu need a cgroup with that controller; pids uses the pids cgroup,
//!    else `RLIMIT_NPROC`, which the kernel counts per (user namespace, uid) and so bounds the
//!    whole sandbox, but only where the sandbox's root is not host root; open files and file size
//!    are per-process rlimits (documented as such); disk is never enforceable yet. A limit the
//!    config gives and no mechanism holds is refused with `HIVE_LIMITS_UNENFORCEABLE`, naming the
//!    limit and the reason. Defaults apply only where a mechanism exists.
//! 3. The rlimits and the cgroup files travel as plain data ([`ChildLimits`]) to the spawn shim
//!    (`hive-init spawn`, `crates/launcher/src/spawn.rs`): it joins the cgroups before it forks
//!    the workload, and the workload sets the rlimits right after its uid switch.
//!
//! # Security
//! A limit is never silently dropped or swapped for a weaker per-process bound: either the
//! mechanism in the table enforces it, or the sandbox does not start.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::Path;

use parking_lot::Mutex;

use super::cgroup::{self, Controller, Counters, SandboxCgroup};
use crate::config::Limits;
use crate::error::{HiveError, Result};

/// `pids` when the config gives none and a mechanism exists: enough for builds and test
/// runners, low enough that a fork bomb leaves the host usable.
pub const DEFAULT_PIDS: u64 = 4096;

// rlimit resource numbers (`u32` on glibc, `c_int` on musl).
#[allow(clippy::unnecessary_cast)]
const NPROC: u32 = libc::RLIMIT_NPROC as u32;
#[allow(clippy::unnecessary_cast)]
const NOFILE: u32 = libc::RLIMIT_NOFILE as u32;
#[allow(clippy::unnecessary_cast)]
const FSIZE: u32 = libc::RLIMIT_FSIZE as u32;

/// What can enforce limits for one sandbox on this host.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Mechanisms {
    pub memory_cgroup: bool,
    pub pids_cgroup: bool,
    pub cpu_cgroup: bool,
    /// `RLIMIT_NPROC` bounds the sandbox as a whole: its processes run as a uid of their own
    /// user namespace that is not host root (host root is exempt from it).
    pub nproc: bool,
}

/// Which mechanism holds which limit (values already defaulted).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Decision {
    /// Bytes, in the memory cgroup.
    pub memory: Option<u64>,
    /// In the pids cgroup.
    pub pids_cgroup: Option<u64>,
    /// CPUs, in the cpu cgroup.
    pub cpus: Option<f64>,
    /// Set in every workload before exec: `(resource, value)`.
    pub rlimits: Vec<(u32, u64)>,
}

/// The hint every refusal ends with.
const HINT: &str = "run hive as root, or in a cgroup v2 subtree delegated to this user (e.g. \
`systemd-run --user --scope -p Delegate=yes node app.js`), or omit the limit";

/// Decides how `limits` are enforced with `m`; `default_memory` applies when memoryBytes is
/// omitted and a memory cgroup exists.
///
/// # Errors
/// `HIVE_LIMITS_UNENFORCEABLE` naming every given limit that nothing here can enforce, and why.
pub fn decide(limits: &Limits, m: &Mechanisms, default_memory: Option<u64>) -> Result<Decision> {
    let mut refused: Vec<String> = Vec::new();
    let mut d = Decision::default();
    match (limits.memory_bytes, m.memory_cgroup) {
        (Some(v), true) => d.memory = Some(v),
        (None, true) => d.memory = default_memory,
        (Some(_), false) => refused.push(
            "limits.memoryBytes: no memory cgroup this process may create (a per-process bound \
             would not hold for the sandbox as a whole)"
                .into(),
        ),
        (None, false) => {}
    }
    let pids = limits.pids.unwrap_or(DEFAULT_PIDS);
    if m.pids_cgroup {
        d.pids_cgroup = Some(pids);
    } else if m.nproc {
        d.rlimits.push((NPROC, pids));
    } else if limits.pids.is_some() {
        refused.push(
            "limits.pids: no pids cgroup this process may create, and RLIMIT_NPROC does not \
             bind a sandbox whose root is host root (idmapped mounts unavailable)"
                .into(),
        );
    }
    match (limits.cpus, m.cpu_cgroup) {
        (Some(v), true) => d.cpus = Some(v),
        (Some(_), false) => {
            refused.push("limits.cpus: no cpu cgroup this process may create".into())
        }
        (None, _) => {}
    }
    if let Some(v) = limits.open_files {
        d.rlimits.push((NOFILE, v));
    }
    if let Some(v) = limits.file_size_bytes {
        d.rlimits.push((FSIZE, v));
    }
    if limits.disk_bytes.is_some() {
        refused.push(
            "limits.diskBytes: writable mounts are host directories and hive has no per-sandbox \
             disk quota (the sandbox's own /tmp and /root are memory, bounded by memoryBytes)"
                .into(),
        );
    }
    if refused.is_empty() {
        Ok(d)
    } else {
        Err(HiveError::LimitsUnenforceable(format!(
            "{} cannot be enforced here: {}; {HINT}",
            refused
                .iter()
                .map(|r| r.split(':').next().unwrap_or(""))
                .collect::<Vec<_>>()
                .join(", "),
            refused.join("; ")
        )))
    }
}

/// Half the host's RAM: the memory default, where a memory cgroup exists.
fn default_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024 / 2)
}

/// Most cgroups a sandbox has (one per hierarchy: v2, v1 memory, pids, cpu, cpuacct).
pub const MAX_GROUPS: usize = 6;
/// Most rlimits set per workload (NPROC, NOFILE, FSIZE).
pub const MAX_RLIMITS: usize = 3;

/// What a child applies, as plain data (see the child-side functions below).
#[derive(Debug, Clone, Copy)]
pub struct ChildLimits {
    /// The join file of each sandbox cgroup (`cgroup::SandboxCgroup::procs_files`), open for
    /// writing; -1: unused.
    pub cgroup_procs: [RawFd; MAX_GROUPS],
    /// The command's own cgroup v2 directory to fork it into; -1: none.
    pub cgroup_into: RawFd,
    /// `(resource, value)`; value 0: unused.
    pub rlimits: [(u32, u64); MAX_RLIMITS],
}

/// A process of the sandbox, for `stats()`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessInfo {
    /// Pid inside the sandbox.
    pub pid: i32,
    /// Its argv (`/proc/<pid>/cmdline`), or `[comm]` when that is empty.
    pub command: Vec<String>,
    /// Start time, milliseconds since the Unix epoch (10 ms resolution).
    pub started_at_ms: u64,
}

/// Usage of the whole sandbox (`stats()`, without egress).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Usage {
    pub memory_bytes: u64,
    pub memory_peak_bytes: u64,
    pub cpu_user_ms: u64,
    pub cpu_system_ms: u64,
    /// Tasks (processes and threads), init included.
    pub pids: u64,
    /// Processes, init excluded.
    pub processes: Vec<ProcessInfo>,
}

/// Limit hits since the last check ([`SandboxLimits::check`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Hits {
    /// The process that just ended was killed by the sandbox's OOM killer.
    pub oom_this: bool,
    /// Other OOM kills (processes hive did not start, or seen without an exit).
    pub oom_others: u64,
    /// Forks refused at `pids`.
    pub pids_max: u64,
}

/// One sandbox's limits while it runs.
pub struct SandboxLimits {
    cgroup: Mutex<SandboxCgroup>,
    procs_files: Vec<OwnedFd>,
    mechanisms: Mechanisms,
    decision: Mutex<Decision>,
    seen: Mutex<Counters>,
    init_pid: i32,
    pid_ns: u64,
}

impl std::fmt::Debug for SandboxLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SandboxLimits")
            .field("mechanisms", &self.mechanisms)
            .field("decision", &*self.decision.lock())
            .finish_non_exhaustive()
    }
}

impl SandboxLimits {
    /// [`Self::prepare`], then moves `init_pid` (host view) into every cgroup by pid, which takes
    /// the kernel's global migration lock (see `cgroup::join_file`); the launcher lets init join
    /// by itself instead ([`Self::init_join_files`]).
    ///
    /// # Errors
    /// As [`Self::prepare`].
    pub fn start(limits: &Limits, init_pid: i32, nproc: bool) -> Result<SandboxLimits> {
        let mut l = Self::prepare(limits, nproc)?;
        l.cgroup
            .lock()
            .adopt(init_pid)
            .map_err(|e| HiveError::io("moving the sandbox init into its cgroups", e))?;
        l.attach(init_pid);
        Ok(l)
    }

    /// Creates the sandbox's cgroups, decides ([`decide`]) and writes the limits, before init
    /// exists. `nproc` says whether `RLIMIT_NPROC` binds this sandbox (see
    /// [`Mechanisms::nproc`]). Blocking, ~0.1-0.3 ms. Then [`Self::attach`].
    ///
    /// # Errors
    /// `HIVE_LIMITS_UNENFORCEABLE` ([`decide`], or a limit the kernel refused to set).
    pub fn prepare(limits: &Limits, nproc: bool) -> Result<SandboxLimits> {
        let wanted = cgroup::needed(&cgroup::hierarchies(), limits.cpus.is_some());
        let cgroup = SandboxCgroup::create(&wanted);
        let mechanisms = Mechanisms {
            memory_cgroup: cgroup.has(Controller::Memory),
            pids_cgroup: cgroup.has(Controller::Pids),
            cpu_cgroup: cgroup.has(Controller::Cpu),
            nproc,
        };
        let decision = decide(limits, &mechanisms, default_memory())?;
        write_cgroup_limits(&cgroup, &decision)?;
        let procs_files = cgroup
            .procs_files()
            .map_err(|e| HiveError::io("opening the sandbox's cgroup.procs", e))?;
        Ok(SandboxLimits {
            seen: Mutex::new(cgroup.counters()),
            cgroup: Mutex::new(cgroup),
            procs_files,
            mechanisms,
            decision: Mutex::new(decision),
            init_pid: 0,
            pid_ns: 0,
        })
    }

    /// The sandbox's init is `init_pid` (host view).
    pub fn attach(&mut self, init_pid: i32) {
        self.init_pid = init_pid;
        self.pid_ns = std::fs::metadata(format!("/proc/{init_pid}/ns/pid"))
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
            .unwrap_or(0);
    }

    /// The files init joins the sandbox's cgroup v1 hierarchies through (`tasks`, written `0` by
    /// the single-threaded setup child itself: no global migration lock); -1: unused. Init stays
    /// out of the v2 cgroup, where joining would take that lock: it only reaps orphans, forks
    /// nothing, and its few kB are not worth a grace period on every start. Every workload joins
    /// every cgroup.
    pub fn init_join_files(&self) -> [RawFd; MAX_GROUPS] {
        let mut out = [-1; MAX_GROUPS];
        let v2 = self.cgroup.lock().v2_flags();
        for ((slot, fd), v2) in out.iter_mut().zip(&self.procs_files).zip(v2) {
            if !v2 {
                *slot = fd.as_raw_fd();
            }
        }
        out
    }

    /// What the spawn helper and the workload apply (fds stay open as long as `self`).
    pub fn child(&self) -> ChildLimits {
        let mut out = ChildLimits {
            cgroup_procs: [-1; MAX_GROUPS],
            cgroup_into: -1,
            rlimits: [(0, 0); MAX_RLIMITS],
        };
        for (slot, fd) in out.cgroup_procs.iter_mut().zip(&self.procs_files) {
            *slot = fd.as_raw_fd();
        }
        for (slot, r) in out.rlimits.iter_mut().zip(&self.decision.lock().rlimits) {
            *slot = *r;
        }
        out
    }

    /// [`Self::child`] for one command, which gets a cgroup of its own where the sandbox has
    /// cgroups ([`cgroup::ExecCgroup`]); the returned fd backs a slot of the limits and must stay
    /// open until the spawn shim has joined it.
    pub fn command(&self) -> (ChildLimits, Option<(cgroup::ExecCgroup, OwnedFd)>) {
        let mut out = self.child();
        let Some((index, exec, fd)) = self.cgroup.lock().exec_cgroup() else {
            return (out, None);
        };
        if let Some(slot) = out.cgroup_procs.get_mut(index) {
            if exec.is_v2() {
                // Forked straight into the command's cgroup, below the sandbox's.
                *slot = -1;
                out.cgroup_into = fd.as_raw_fd();
            } else {
                *slot = fd.as_raw_fd();
            }
        }
        (out, Some((exec, fd)))
    }

    /// `applyConfig`: writes new cgroup limits in place; new rlimits apply to later spawns.
    ///
    /// # Errors
    /// `HIVE_LIMITS_UNENFORCEABLE` when the new limits need a mechanism this sandbox lacks, or
    /// the kernel refuses a value (e.g. memory below what is in use); nothing changes then.
    pub fn update(&self, limits: &Limits) -> Result<()> {
        let decision = decide(limits, &self.mechanisms, default_memory())?;
        let mut current = self.decision.lock();
        if *current == decision {
            return Ok(());
        }
        write_cgroup_limits(&self.cgroup.lock(), &decision)?;
        *current = decision;
        Ok(())
    }

    /// Limit hits since the last call; `exited_by` is the signal that ended a process hive
    /// started (a SIGKILL with a new OOM kill is attributed to it). Cheap (two small reads).
    pub fn check(&self, exited_by: Option<i32>) -> Hits {
        let now = self.cgroup.lock().counters();
        let mut seen = self.seen.lock();
        let mut hits = Hits {
            oom_this: false,
            oom_others: now.oom_kills.saturating_sub(seen.oom_kills),
            pids_max: now.pids_max.saturating_sub(seen.pids_max),
        };
        if hits.oom_others > 0 && exited_by == Some(libc::SIGKILL) {
            hits.oom_this = true;
            hits.oom_others -= 1;
        }
        if exited_by.is_some() {
            *seen = now;
        } else {
            // A poll reports refused forks only: an OOM kill waits for its process's exit.
            seen.pids_max = now.pids_max;
            hits.oom_others = 0;
        }
        hits
    }

    /// Usage and processes of the sandbox (cheap enough to poll every second).
    pub fn usage(&self) -> Usage {
        let cg = self.cgroup.lock();
        let from_cgroup = cg.usage();
        let host_pids = cg.pids();
        drop(cg);
        let host_pids = match host_pids {
            Some(p) => p,
            None => pids_in_namespace(self.pid_ns),
        };
        let mut u = Usage::default();
        let (mut rss, mut hwm, mut utime, mut stime, mut tasks) = (0, 0, 0, 0, 0);
        let boot_ms = boot_time_ms();
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
        for host_pid in host_pids {
            let Some(p) = read_process(host_pid) else {
                continue;
            };
            rss += p.rss_kb * 1024;
            hwm += p.hwm_kb * 1024;
            utime += p.utime;
            stime += p.stime;
            tasks += p.threads;
            if host_pid != self.init_pid && p.in_child_ns {
                u.processes.push(ProcessInfo {
                    pid: p.ns_pid,
                    command: p.command,
                    started_at_ms: boot_ms + p.start_ticks * 1000 / hz,
                });
            }
        }
        u.processes.sort_by_key(|p| p.pid);
        // Without a cgroup: the live processes' own numbers (exited ones are not counted).
        u.memory_bytes = from_cgroup.memory_bytes.unwrap_or(rss);
        u.memory_peak_bytes = from_cgroup
            .memory_peak_bytes
            .unwrap_or(hwm)
            .max(u.memory_bytes);
        u.cpu_user_ms = from_cgroup
            .cpu_user_us
            .map_or(utime * 1000 / hz, |us| us / 1000);
        u.cpu_system_ms = from_cgroup
            .cpu_system_us
            .map_or(stime * 1000 / hz, |us| us / 1000);
        u.pids = from_cgroup.pids.unwrap_or(tasks);
        u
    }

    /// Kills whatever is left in the sandbox's cgroups and removes them (`close()`; init is
    /// already dead). Idempotent.
    pub fn close(&self) {
        self.cgroup.lock().remove();
    }
}

fn write_cgroup_limits(cg: &SandboxCgroup, d: &Decision) -> Result<()> {
    let set = |c: Controller, v: Option<f64>, name: &str| -> Result<()> {
        if !cg.has(c) {
            return Ok(());
        }
        cg.set(c, v).map_err(|e| {
            HiveError::LimitsUnenforceable(format!(
                "limits.{name}: the kernel refused the value: {e}"
            ))
        })
    };
    set(
        Controller::Memory,
        d.memory.map(|v| v as f64),
        "memoryBytes",
    )?;
    set(Controller::Pids, d.pids_cgroup.map(|v| v as f64), "pids")?;
    set(Controller::Cpu, d.cpus, "cpus")
}

/// What `stats()` reads of one process in `/proc`.
struct ProcRead {
    ns_pid: i32,
    in_child_ns: bool,
    command: Vec<String>,
    start_ticks: u64,
    utime: u64,
    stime: u64,
    rss_kb: u64,
    hwm_kb: u64,
    threads: u64,
}

fn read_process(host_pid: i32) -> Option<ProcRead> {
    let dir = format!("/proc/{host_pid}");
    let status = std::fs::read_to_string(format!("{dir}/status")).ok()?;
    let field = |name: &str| -> Option<&str> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
    };
    let nspid: Vec<i32> = field("NSpid:")?
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect();
    let kb = |name: &str| -> u64 {
        field(name)
            .and_then(|v| v.trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    let stat = std::fs::read_to_string(format!("{dir}/stat")).ok()?;
    // Fields after the command (which may hold spaces and parentheses): state is field 3.
    let rest = stat.rsplit_once(") ")?.1;
    let f: Vec<&str> = rest.split(' ').collect();
    let num = |i: usize| -> u64 { f.get(i - 3).and_then(|v| v.parse().ok()).unwrap_or(0) };
    let cmdline = std::fs::read(format!("{dir}/cmdline")).unwrap_or_default();
    let mut command: Vec<String> = cmdline
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    if command.is_empty() {
        command.push(field("Name:").unwrap_or("").to_owned());
    }
    Some(ProcRead {
        ns_pid: *nspid.last()?,
        in_child_ns: nspid.len() > 1,
        command,
        utime: num(14),
        stime: num(15),
        start_ticks: num(22),
        rss_kb: kb("VmRSS:"),
        hwm_kb: kb("VmHWM:"),
        threads: field("Threads:").and_then(|v| v.parse().ok()).unwrap_or(1),
    })
}

/// Host pids of every process whose PID namespace is `pid_ns` (a scan of `/proc`).
fn pids_in_namespace(pid_ns: u64) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::metadata(Path::new("/proc").join(pid.to_string()).join("ns/pid"))
                .is_ok_and(|m| std::os::unix::fs::MetadataExt::ino(&m) == pid_ns)
        })
        .collect()
}

/// When the host booted, ms since the epoch (`btime` in `/proc/stat`).
fn boot_time_ms() -> u64 {
    static BOOT: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *BOOT.get_or_init(|| {
        std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("btime ")?.trim().parse::<u64>().ok())
            })
            .unwrap_or(0)
            * 1000
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorCode;

    fn limits(f: impl FnOnce(&mut Limits)) -> Limits {
        let mut l = Limits::default();
        f(&mut l);
        l
    }

    const ROOT_V1: Mechanisms = Mechanisms {
        memory_cgroup: true,
        pids_cgroup: true,
        cpu_cgroup: true,
        nproc: true,
    };
    const UNPRIVILEGED: Mechanisms = Mechanisms {
        memory_cgroup: false,
        pids_cgroup: false,
        cpu_cgroup: false,
        nproc: true,
    };
    const HOST_ROOT_NO_CGROUP: Mechanisms = Mechanisms {
        memory_cgroup: false,
        pids_cgroup: false,
        cpu_cgroup: false,
        nproc: false,
    };

    #[test]
    fn defaults_apply_only_where_a_mechanism_exists() {
        let none = Limits::default();
        let d = decide(&none, &ROOT_V1, Some(1 << 30)).unwrap();
        assert_eq!(
            (d.memory, d.pids_cgroup, d.cpus),
            (Some(1 << 30), Some(DEFAULT_PIDS), None)
        );
        assert!(d.rlimits.is_empty());
        let d = decide(&none, &UNPRIVILEGED, Some(1 << 30)).unwrap();
        assert_eq!(d.memory, None);
        assert_eq!(d.rlimits, vec![(NPROC, DEFAULT_PIDS)]);
        // Nothing at all: an omitted limit never refuses.
        assert_eq!(
            decide(&none, &HOST_ROOT_NO_CGROUP, None).unwrap(),
            Decision::default()
        );
    }

    #[test]
    fn each_limit_goes_to_the_mechanism_that_holds_it() {
        let all = limits(|l| {
            l.memory_bytes = Some(256 << 20);
            l.pids = Some(256);
            l.cpus = Some(0.5);
            l.open_files = Some(64);
            l.file_size_bytes = Some(1 << 20);
        });
        let d = decide(&all, &ROOT_V1, None).unwrap();
        assert_eq!(
            (d.memory, d.pids_cgroup, d.cpus),
            (Some(256 << 20), Some(256), Some(0.5))
        );
        assert_eq!(d.rlimits, vec![(NOFILE, 64), (FSIZE, 1 << 20)]);
        // pids falls back to RLIMIT_NPROC.
        let pids = limits(|l| l.pids = Some(256));
        let d = decide(&pids, &UNPRIVILEGED, None).unwrap();
        assert_eq!(d.rlimits, vec![(NPROC, 256)]);
    }

    #[test]
    fn refusals_name_the_limit_and_the_reason() {
        for (l, m, names) in [
            (
                limits(|l| l.memory_bytes = Some(256 << 20)),
                UNPRIVILEGED,
                "limits.memoryBytes",
            ),
            (limits(|l| l.cpus = Some(1.0)), UNPRIVILEGED, "limits.cpus"),
            (
                limits(|l| l.pids = Some(64)),
                HOST_ROOT_NO_CGROUP,
                "limits.pids",
            ),
            (
                limits(|l| l.disk_bytes = Some(1 << 30)),
                ROOT_V1,
                "limits.diskBytes",
            ),
            (
                limits(|l| {
                    l.memory_bytes = Some(256 << 20);
                    l.cpus = Some(1.0);
                }),
                UNPRIVILEGED,
                "limits.memoryBytes, limits.cpus",
            ),
        ] {
            let e = decide(&l, &m, None).unwrap_err();
            assert_eq!(e.code(), ErrorCode::LimitsUnenforceable);
            let text = e.to_string();
            assert!(
                text.starts_with(&format!("{names} cannot be enforced here")),
                "{text}"
            );
            assert!(text.contains("Delegate=yes"), "{text}");
        }
    }

    #[test]
    fn reads_this_process() {
        let me = read_process(std::process::id() as i32).expect("own /proc entry");
        assert!(!me.command.is_empty());
        assert!(me.rss_kb > 0 && me.threads >= 1 && me.start_ticks > 0);
        assert!(boot_time_ms() > 1_500_000_000_000);
    }
}

/// `cargo test --lib cgroup_setup_cost -- --ignored --nocapture` (as root): what the cgroup
/// part of a sandbox start and close costs on this host (docs/decisions.md#resource-limits).
#[cfg(test)]
#[test]
#[ignore = "a measurement; run by hand"]
fn cgroup_setup_cost() {
    use std::time::Instant;
    let limits = Limits {
        memory_bytes: Some(256 << 20),
        pids: Some(256),
        ..Limits::default()
    };
    let t = Instant::now();
    let h = cgroup::hierarchies();
    let detect = t.elapsed();
    let (mut start, mut close) = (Vec::new(), Vec::new());
    for _ in 0..50 {
        let mut child = std::process::Command::new("sleep")
            .arg("10")
            .spawn()
            .expect("sleep");
        let t = Instant::now();
        let l = SandboxLimits::start(&limits, child.id() as i32, true).expect("start");
        start.push(t.elapsed());
        let _ = child.kill();
        let _ = child.wait();
        let t = Instant::now();
        l.close();
        close.push(t.elapsed());
    }
    let show = |v: &mut Vec<std::time::Duration>| {
        v.sort();
        let mean = v.iter().sum::<std::time::Duration>() / v.len() as u32;
        format!(
            "median {:?} mean {:?} max {:?}",
            v[v.len() / 2],
            mean,
            v[v.len() - 1]
        )
    };
    println!("hierarchies: {h:?}");
    println!(
        "detect {detect:?}; start {}; close {}",
        show(&mut start),
        show(&mut close)
    );
}

#[cfg(test)]
#[test]
#[ignore = "a measurement; run by hand"]
fn cgroup_setup_phases() {
    use std::time::{Duration, Instant};
    let mut tot = [Duration::ZERO; 6];
    let n = 30;
    for _ in 0..n {
        let mut child = std::process::Command::new("sleep")
            .arg("10")
            .spawn()
            .expect("sleep");
        let t = Instant::now();
        let h = cgroup::needed(&cgroup::hierarchies(), false);
        tot[0] += t.elapsed();
        let t = Instant::now();
        let mut cg = SandboxCgroup::create(&h);
        tot[1] += t.elapsed();
        let t = Instant::now();
        cg.set(Controller::Memory, Some((256u64 << 20) as f64))
            .unwrap();
        cg.set(Controller::Pids, Some(256.0)).unwrap();
        tot[2] += t.elapsed();
        let t = Instant::now();
        cg.adopt(child.id() as i32).unwrap();
        tot[3] += t.elapsed();
        let t = Instant::now();
        let _f = cg.procs_files().unwrap();
        let _ = default_memory();
        tot[4] += t.elapsed();
        let _ = child.kill();
        let _ = child.wait();
        let t = Instant::now();
        cg.remove();
        tot[5] += t.elapsed();
    }
    let names = ["detect", "mkdir", "set", "adopt", "open+meminfo", "remove"];
    for (name, d) in names.iter().zip(tot) {
        println!("{name}: {:?}", d / n);
    }
}
