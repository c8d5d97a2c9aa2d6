//! Per-sandbox cgroups: finding the hierarchies this process may use, creating one cgroup per
//! sandbox in each, configuring, reading, killing and removing them (docs/decisions.md#resource-limits).
//!
//! How it works:
//! 1. [`hierarchies`] reads `/proc/self/cgroup` and `/proc/self/mountinfo`: the cgroup v2 mount
//!    (wherever it is, e.g. `/sys/fs/cgroup` or the hybrid `/sys/fs/cgroup/unified`) and each
//!    legacy v1 hierarchy that carries `memory`, `pids`, `cpu` or `cpuacct`, each with this
//!    process's *own* cgroup directory in it. Nothing is assumed: a hierarchy whose own directory
//!    is not visible through the mount (another cgroup namespace, a bind of a subtree) is skipped.
//! 2. [`SandboxCgroup::create`] makes `<own>/hive-<pid>-<n>` in every hierarchy where this process
//!    may (root, or a delegated v2 subtree such as systemd's `Delegate=yes`). It never writes to a
//!    parent of its own cgroup. On v2 the controllers must be enabled in the own cgroup's
//!    `cgroup.subtree_control`; when they are not, and the own cgroup is delegated to us (we can
//!    write it), this process first moves itself into a leaf `<own>/hive-host` (the "no internal
//!    processes" rule), as systemd's docs/CGROUP_DELEGATION.md describes.
//! 3. Limits are plain file writes ([`SandboxCgroup::set`]), so `applyConfig` can change them
//!    while the sandbox runs. Processes join by writing `0` themselves ([`join_file`]: no global
//!    migration lock): the sandbox's init joins the v1 cgroups, each command's spawn shim joins
//!    them all and forks the command into a cgroup of its own ([`ExecCgroup`]); whatever they
//!    start inherits the cgroups.
//! 4. [`SandboxCgroup::remove`] kills what is left (`cgroup.kill` on v2, else SIGKILL per pid) and
//!    removes the directories.
//!
//! `HIVE_TEST_DISABLE_CGROUPS=1` makes [`hierarchies`] find nothing, as on a host without a usable
//! cgroup (tests use it).

use std::io::{ErrorKind, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// The test switch: behave as if no cgroup were usable.
pub const DISABLE_ENV: &str = "HIVE_TEST_DISABLE_CGROUPS";

/// Controllers hive uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Controller {
    /// `memory.max` / `memory.limit_in_bytes`, OOM counters, usage.
    Memory,
    /// `pids.max`, `pids.current`, `pids.events`.
    Pids,
    /// `cpu.max` / `cpu.cfs_quota_us`.
    Cpu,
    /// v1 only: `cpuacct.stat` (v2 has `cpu.stat` in every cgroup).
    Cpuacct,
}

impl Controller {
    fn from_name(name: &str) -> Option<Controller> {
        match name {
            "memory" => Some(Controller::Memory),
            "pids" => Some(Controller::Pids),
            "cpu" => Some(Controller::Cpu),
            "cpuacct" => Some(Controller::Cpuacct),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Controller::Memory => "memory",
            Controller::Pids => "pids",
            Controller::Cpu => "cpu",
            Controller::Cpuacct => "cpuacct",
        }
    }
}

/// One cgroup hierarchy and this process's own cgroup in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hierarchy {
    /// cgroup v2 (the unified hierarchy).
    pub v2: bool,
    /// This process's cgroup directory in it.
    pub own: PathBuf,
    /// v1: the controllers bound to it (of those hive uses). v2: empty here; the directory's
    /// `cgroup.controllers` says what is available.
    pub controllers: Vec<Controller>,
}

/// The hierarchies this process could use, from `/proc/self/cgroup` and `/proc/self/mountinfo`
/// (read once per process: the own cgroups found first stay the parents of every sandbox's, even
/// after [`delegate`] moved this process into a leaf); empty with [`DISABLE_ENV`] set.
pub fn hierarchies() -> Vec<Hierarchy> {
    static FOUND: std::sync::OnceLock<Vec<Hierarchy>> = std::sync::OnceLock::new();
    if std::env::var_os(DISABLE_ENV).is_some_and(|v| v == "1") {
        return Vec::new();
    }
    FOUND
        .get_or_init(|| {
            let (Ok(cgroup), Ok(mountinfo)) = (
                std::fs::read_to_string("/proc/self/cgroup"),
                std::fs::read_to_string("/proc/self/mountinfo"),
            ) else {
                return Vec::new();
            };
            let found = parse_hierarchies(&cgroup, &mountinfo);
            for h in &found {
                sweep_stale(&h.own);
            }
            found
        })
        .clone()
}

/// Removes the empty sandbox cgroups a hive process that died without closing left behind
/// (`hive-<pid>-<n>` whose pid is gone). A cgroup that still holds a process cannot be removed,
/// so a live sandbox is never touched.
fn sweep_stale(own: &Path) {
    let Ok(entries) = std::fs::read_dir(own) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("hive-"))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<i32>().ok())
        else {
            continue;
        };
        // SAFETY: signal 0 only checks that the pid exists.
        let alive = unsafe { libc::kill(pid, 0) } == 0
            || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
        if !alive {
            let _ = std::fs::remove_dir(entry.path());
        }
    }
}

/// The hierarchies worth a cgroup for one sandbox. Every cgroup costs a migration when a process
/// joins, so: the v1 cpu hierarchy only when a cpu limit is wanted, and v1 `cpuacct` only when
/// no v2 cgroup can give `cpu.stat`.
pub fn needed(hierarchies: &[Hierarchy], want_cpu: bool) -> Vec<Hierarchy> {
    let has_v2 = hierarchies.iter().any(|h| h.v2);
    hierarchies
        .iter()
        .filter(|h| {
            h.v2 || h.controllers.iter().any(|c| match c {
                Controller::Memory | Controller::Pids => true,
                Controller::Cpu => want_cpu,
                Controller::Cpuacct => !has_v2,
            })
        })
        .cloned()
        .collect()
}

/// [`hierarchies`] on given file contents.
pub(crate) fn parse_hierarchies(proc_cgroup: &str, mountinfo: &str) -> Vec<Hierarchy> {
    // mountinfo: id parent major:minor root mountpoint options... - fstype source superoptions
    let mounts: Vec<(&str, &str, &str, &str)> = mountinfo
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let left: Vec<&str> = left.split(' ').collect();
            let mut right = right.split(' ');
            let fstype = right.next()?;
            let superopts = right.nth(1).unwrap_or("");
            Some((fstype, *left.get(3)?, *left.get(4)?, superopts))
        })
        .filter(|(fstype, ..)| *fstype == "cgroup" || *fstype == "cgroup2")
        .collect();
    let mut out = Vec::new();
    for line in proc_cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(names), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let v2 = id == "0" && names.is_empty();
        let controllers: Vec<Controller> =
            names.split(',').filter_map(Controller::from_name).collect();
        if !v2 && controllers.is_empty() {
            continue;
        }
        let mount = mounts.iter().find(|(fstype, _, _, opts)| {
            if v2 {
                *fstype == "cgroup2"
            } else {
                *fstype == "cgroup" && names.split(',').all(|n| opts.split(',').any(|o| o == n))
            }
        });
        let Some((_, root, point, _)) = mount else {
            continue;
        };
        let Some(rel) = relative_to(path, &unescape(root)) else {
            continue;
        };
        let mut own = PathBuf::from(unescape(point));
        if !rel.is_empty() {
            own.push(rel);
        }
        out.push(Hierarchy {
            v2,
            own,
            controllers,
        });
    }
    out
}

/// `path` below `root` (both absolute cgroup paths), without the leading `/`.
fn relative_to<'a>(path: &'a str, root: &str) -> Option<&'a str> {
    if path.contains("/../") || path.ends_with("/..") {
        return None;
    }
    let root = root.trim_end_matches('/');
    let rest = path.strip_prefix(root)?;
    if !rest.is_empty() && !rest.starts_with('/') {
        return None;
    }
    Some(rest.trim_start_matches('/').trim_end_matches('/'))
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One created cgroup directory.
#[derive(Debug)]
struct Group {
    dir: PathBuf,
    v2: bool,
    controllers: Vec<Controller>,
}

/// A sandbox's cgroups: one directory per usable hierarchy (see the module doc).
#[derive(Debug)]
pub struct SandboxCgroup {
    groups: Vec<Group>,
}

/// Usage read from a sandbox's cgroups; `None` where no created cgroup provides it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Usage {
    pub memory_bytes: Option<u64>,
    pub memory_peak_bytes: Option<u64>,
    pub cpu_user_us: Option<u64>,
    pub cpu_system_us: Option<u64>,
    pub pids: Option<u64>,
}

/// Monotonic counters of limit hits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Processes the kernel's OOM killer killed in the sandbox's memory cgroup.
    pub oom_kills: u64,
    /// Forks refused because `pids.max` was reached.
    pub pids_max: u64,
}

static NEXT: AtomicU64 = AtomicU64::new(1);

impl SandboxCgroup {
    /// Creates the sandbox's cgroup in every hierarchy where this process may; an empty result
    /// where it may nowhere. Blocking (a few file operations per hierarchy).
    pub fn create(hierarchies: &[Hierarchy]) -> SandboxCgroup {
        let leaf = format!(
            "hive-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let mut groups = Vec::new();
        for h in hierarchies {
            let controllers = if h.v2 {
                match v2_controllers(&h.own) {
                    Some(c) => c,
                    None => continue,
                }
            } else {
                h.controllers.clone()
            };
            let dir = h.own.join(&leaf);
            match std::fs::create_dir(&dir) {
                Ok(()) => groups.push(Group {
                    dir,
                    v2: h.v2,
                    controllers,
                }),
                Err(e) => {
                    tracing::debug!(dir = %dir.display(), error = %e, "no sandbox cgroup in this hierarchy")
                }
            }
        }
        SandboxCgroup { groups }
    }

    /// Whether some created cgroup provides `controller`.
    pub fn has(&self, controller: Controller) -> bool {
        self.group(controller).is_some()
    }

    /// For each cgroup, in [`Self::procs_files`] order: whether it is cgroup v2.
    pub fn v2_flags(&self) -> Vec<bool> {
        self.groups.iter().map(|g| g.v2).collect()
    }

    /// Whether any cgroup was created.
    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    fn group(&self, controller: Controller) -> Option<&Group> {
        self.groups
            .iter()
            .find(|g| g.controllers.contains(&controller))
    }

    fn v2(&self) -> Option<&Group> {
        self.groups.iter().find(|g| g.v2)
    }

    /// Sets (or, with `None`, lifts) the limit of `controller`: bytes for memory, a count for
    /// pids, CPUs for cpu (as `quota period`, period 100 ms).
    pub fn set(&self, controller: Controller, value: Option<f64>) -> std::io::Result<()> {
        let group = self
            .group(controller)
            .ok_or_else(|| std::io::Error::new(ErrorKind::Unsupported, "no such controller"))?;
        let dir = &group.dir;
        match (controller, group.v2) {
            (Controller::Memory, true) => {
                write(
                    dir,
                    "memory.max",
                    &max_or(value, |v| format!("{}", v as u64)),
                )?;
                // Where swap exists, memory.max alone lets the rest go to swap.
                let _ = write(dir, "memory.swap.max", "0");
                Ok(())
            }
            (Controller::Memory, false) => {
                let limit = value.map_or_else(|| "-1".to_owned(), |v| format!("{}", v as u64));
                // memsw (RAM + swap) must stay >= the RAM limit: raise it first, lower it after.
                let _ = write(dir, "memory.memsw.limit_in_bytes", "-1");
                write(dir, "memory.limit_in_bytes", &limit)?;
                let _ = write(dir, "memory.memsw.limit_in_bytes", &limit);
                Ok(())
            }
            (Controller::Pids, _) => {
                write(dir, "pids.max", &max_or(value, |v| format!("{}", v as u64)))
            }
            (Controller::Cpu, true) => write(
                dir,
                "cpu.max",
                &format!("{} 100000", max_or(value, |v| format!("{}", cpu_quota(v)))),
            ),
            (Controller::Cpu, false) => {
                write(dir, "cpu.cfs_period_us", "100000")?;
                write(
                    dir,
                    "cpu.cfs_quota_us",
                    &value.map_or_else(|| "-1".to_owned(), |v| cpu_quota(v).to_string()),
                )
            }
            (Controller::Cpuacct, _) => Ok(()),
        }
    }

    /// Moves process `pid` (host view) into every created cgroup. Its later children inherit
    /// them.
    pub fn adopt(&self, pid: i32) -> std::io::Result<()> {
        for g in &self.groups {
            write(&g.dir, "cgroup.procs", &pid.to_string())?;
        }
        Ok(())
    }

    /// For each cgroup, a file a single-threaded child joins it through by writing `0`, opened
    /// for writing (`O_CLOEXEC`; the opener's credentials decide, so a child that has joined the
    /// sandbox's user namespace still may): [`join_file`].
    pub fn procs_files(&self) -> std::io::Result<Vec<OwnedFd>> {
        self.groups
            .iter()
            .map(|g| open_write(&g.dir.join(join_file(g.v2))))
            .collect()
    }

    /// Host pids of the processes in the sandbox's cgroups, its commands' cgroups included (v2
    /// first: it sees every process).
    pub fn pids(&self) -> Option<Vec<i32>> {
        let g = self.tracking()?;
        let mut pids = read_procs(&g.dir)?;
        for sub in subdirs(&g.dir) {
            pids.extend(read_procs(&sub).unwrap_or_default());
        }
        Some(pids)
    }

    /// The hierarchy that tracks processes: v2 (where `cgroup.kill` exists), else pids, else any.
    fn tracking(&self) -> Option<&Group> {
        self.v2()
            .or_else(|| self.group(Controller::Pids))
            .or(self.groups.first())
    }

    /// Creates a command's own cgroup below the sandbox's in the tracking hierarchy and opens
    /// its `cgroup.procs` for writing; `None` where the sandbox has no cgroup (or the kernel
    /// refuses one). The `usize` is the index, in [`Self::procs_files`], of the file it replaces
    /// for the command: limits still hold, as every hierarchy charges a child to its parent.
    ///
    /// On v2 the fd is the directory, which the spawn shim forks the command into
    /// (`CLONE_INTO_CGROUP`) instead of joining the sandbox's v2 cgroup; on v1 it is the
    /// command cgroup's [`join_file`].
    pub fn exec_cgroup(&self) -> Option<(usize, ExecCgroup, OwnedFd)> {
        let g = self.tracking()?;
        let index = self.groups.iter().position(|x| std::ptr::eq(x, g))?;
        let dir = g
            .dir
            .join(format!("exec-{}", NEXT.fetch_add(1, Ordering::Relaxed)));
        if let Err(e) = std::fs::create_dir(&dir) {
            tracing::debug!(dir = %dir.display(), error = %e, "no command cgroup");
            return None;
        }
        let exec = ExecCgroup { dir, v2: g.v2 };
        let fd = if g.v2 {
            std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_CLOEXEC | libc::O_DIRECTORY)
                .open(&exec.dir)
                .map(OwnedFd::from)
        } else {
            open_write(&exec.dir.join(join_file(false)))
        };
        Some((index, exec, fd.ok()?))
    }

    /// Current usage (cheap: a few small files).
    pub fn usage(&self) -> Usage {
        let mut u = Usage::default();
        if let Some(g) = self.group(Controller::Memory) {
            if g.v2 {
                u.memory_bytes = read_u64(&g.dir, "memory.current");
                u.memory_peak_bytes = read_u64(&g.dir, "memory.peak");
            } else {
                u.memory_bytes = read_u64(&g.dir, "memory.usage_in_bytes");
                u.memory_peak_bytes = read_u64(&g.dir, "memory.max_usage_in_bytes");
            }
        }
        if let Some(g) = self.group(Controller::Pids) {
            u.pids = read_u64(&g.dir, "pids.current");
        }
        if let Some(g) = self.v2() {
            // cpu.stat exists in every v2 cgroup, with or without the cpu controller.
            let stat = std::fs::read_to_string(g.dir.join("cpu.stat")).unwrap_or_default();
            u.cpu_user_us = keyed(&stat, "user_usec");
            u.cpu_system_us = keyed(&stat, "system_usec");
        } else if let Some(g) = self.group(Controller::Cpuacct) {
            // USER_HZ ticks.
            let stat = std::fs::read_to_string(g.dir.join("cpuacct.stat")).unwrap_or_default();
            // SAFETY: sysconf has no preconditions.
            let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
            u.cpu_user_us = keyed(&stat, "user").map(|t| t * 1_000_000 / hz);
            u.cpu_system_us = keyed(&stat, "system").map(|t| t * 1_000_000 / hz);
        }
        u
    }

    /// OOM kills and refused forks so far.
    pub fn counters(&self) -> Counters {
        let mut c = Counters::default();
        if let Some(g) = self.group(Controller::Memory) {
            let file = if g.v2 {
                "memory.events"
            } else {
                "memory.oom_control"
            };
            let text = std::fs::read_to_string(g.dir.join(file)).unwrap_or_default();
            c.oom_kills = keyed(&text, "oom_kill").unwrap_or(0);
        }
        if let Some(g) = self.group(Controller::Pids) {
            let text = std::fs::read_to_string(g.dir.join("pids.events")).unwrap_or_default();
            c.pids_max = keyed(&text, "max").unwrap_or(0);
        }
        c
    }

    /// Kills every process in the sandbox's cgroups: `cgroup.kill` where the kernel has it (v2,
    /// 5.14+; recursive, and no fork can race it), else SIGKILL to each listed pid until none is
    /// left (bounded).
    pub fn kill(&self) {
        if let Some(g) = self.v2() {
            if write(&g.dir, "cgroup.kill", "1").is_ok() {
                return;
            }
        }
        kill_listed(|| self.pids().unwrap_or_default(), libc::SIGKILL);
    }

    /// Kills what is left and removes the directories (retrying while the kernel still counts
    /// exiting tasks, up to 500 ms). Idempotent.
    pub fn remove(&mut self) {
        if self.groups.is_empty() {
            return;
        }
        self.kill();
        let deadline = std::time::Instant::now() + std::time::Duration::from_millis(500);
        let dirs = std::mem::take(&mut self.groups)
            .into_iter()
            .flat_map(|g| subdirs(&g.dir).into_iter().chain([g.dir]));
        for dir in dirs {
            loop {
                match std::fs::remove_dir(&dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == ErrorKind::NotFound => break,
                    Err(e)
                        if e.raw_os_error() == Some(libc::EBUSY)
                            && std::time::Instant::now() < deadline =>
                    {
                        std::thread::sleep(std::time::Duration::from_millis(2));
                    }
                    Err(e) => {
                        tracing::warn!(dir = %dir.display(), error = %e, "removing a sandbox cgroup");
                        break;
                    }
                }
            }
        }
    }
}

impl Drop for SandboxCgroup {
    fn drop(&mut self) {
        self.remove();
    }
}

/// A command's own cgroup, a child of its sandbox's in one hierarchy
/// ([`SandboxCgroup::exec_cgroup`]): every process the command starts stays in it, whatever
/// session, process group or parent it takes, so a signal or kill reaches all of them, also
/// after the command's first process has ended (docs/processes.md).
#[derive(Debug)]
pub struct ExecCgroup {
    dir: PathBuf,
    v2: bool,
}

impl ExecCgroup {
    /// Whether it is in the cgroup v2 hierarchy.
    pub fn is_v2(&self) -> bool {
        self.v2
    }

    /// Host pids of its processes.
    pub fn pids(&self) -> Vec<i32> {
        read_procs(&self.dir).unwrap_or_default()
    }

    /// Sends `signal` to every process in it. SIGKILL: `cgroup.kill` on v2 (atomic, no fork can
    /// race it), else SIGKILL to each listed pid until none is left (a killed process cannot
    /// fork, so this ends). Other signals: to each process listed now but `skip` (which the
    /// caller signalled first).
    pub fn signal(&self, signal: i32, skip: Option<i32>) {
        if signal == libc::SIGKILL {
            if self.v2 && write(&self.dir, "cgroup.kill", "1").is_ok() {
                return;
            }
            kill_listed(|| self.pids(), libc::SIGKILL);
        } else {
            for pid in self.pids().into_iter().filter(|p| Some(*p) != skip) {
                // SAFETY: plain syscall; see `kill_listed` on the pid's identity.
                unsafe { libc::kill(pid, signal) };
            }
        }
    }

    /// Removes the directory if no process is left in it (else it goes with the sandbox's).
    pub fn remove_if_empty(&self) {
        let _ = std::fs::remove_dir(&self.dir);
    }
}

impl Drop for ExecCgroup {
    fn drop(&mut self) {
        self.remove_if_empty();
    }
}

/// The file a process joins a cgroup through by writing `0`: on v1 `tasks`, which moves only the
/// writing thread (the spawn shim is single-threaded, so that is the whole process) and, unlike
/// `cgroup.procs`, does not take the kernel's global migration lock, whose first taker waits for
/// an RCU grace period (measured: 6-18 ms on a loaded 2-core host, the largest part of a cold
/// start). v2 has no such file outside threaded subtrees: `cgroup.procs`.
fn join_file(v2: bool) -> &'static str {
    if v2 {
        "cgroup.procs"
    } else {
        "tasks"
    }
}

fn open_write(path: &Path) -> std::io::Result<OwnedFd> {
    std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map(OwnedFd::from)
}

/// SIGKILLs every pid `list` returns until it returns none (at most 100 rounds, 1 ms apart).
fn kill_listed(list: impl Fn() -> Vec<i32>, signal: i32) {
    for _ in 0..100 {
        let pids = list();
        if pids.is_empty() {
            return;
        }
        for pid in pids {
            // SAFETY: plain syscall. The pid was listed in our cgroup a moment ago; it is either
            // still there or gone (a reused pid would not be in our cgroup, but the window
            // between read and kill is not closed; v2's cgroup.kill has none).
            unsafe { libc::kill(pid, signal) };
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// The pids in `dir/cgroup.procs`.
fn read_procs(dir: &Path) -> Option<Vec<i32>> {
    let text = std::fs::read_to_string(dir.join("cgroup.procs")).ok()?;
    Some(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
}

/// The cgroup directories directly below `dir` (commands' cgroups).
fn subdirs(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

/// The v2 controllers (of memory, pids, cpu) a child of `own` gets, enabling them in `own`'s
/// `cgroup.subtree_control` when they are available but not enabled; `None` when a child cannot
/// be made at all.
fn v2_controllers(own: &Path) -> Option<Vec<Controller>> {
    let available = read_names(&own.join("cgroup.controllers"))?;
    let wanted: Vec<Controller> = [Controller::Memory, Controller::Pids, Controller::Cpu]
        .into_iter()
        .filter(|c| available.iter().any(|a| a == c.name()))
        .collect();
    let enabled = read_names(&own.join("cgroup.subtree_control")).unwrap_or_default();
    let missing: Vec<Controller> = wanted
        .iter()
        .copied()
        .filter(|c| !enabled.iter().any(|e| e == c.name()))
        .collect();
    if !missing.is_empty() {
        delegate(own, &missing);
    }
    let enabled = read_names(&own.join("cgroup.subtree_control")).unwrap_or_default();
    Some(
        wanted
            .into_iter()
            .filter(|c| enabled.iter().any(|e| e == c.name()))
            .collect(),
    )
}

/// Enables `missing` in `own`'s `cgroup.subtree_control`. A cgroup with processes cannot enable
/// controllers for its children (except the root), so when the own cgroup holds only this
/// process it first moves into a leaf `<own>/hive-host` (systemd's docs/CGROUP_DELEGATION.md).
/// Failures leave the controllers disabled (the limits needing them are then refused).
fn delegate(own: &Path, missing: &[Controller]) {
    let line = missing
        .iter()
        .map(|c| format!("+{}", c.name()))
        .collect::<Vec<_>>()
        .join(" ");
    if write(own, "cgroup.subtree_control", &line).is_ok() {
        return;
    }
    let procs = std::fs::read_to_string(own.join("cgroup.procs")).unwrap_or_default();
    let me = std::process::id().to_string();
    if procs.lines().any(|p| p.trim() != me) {
        return; // other processes live here: not ours to move
    }
    let host = own.join("hive-host");
    if std::fs::create_dir(&host).is_err() && !host.is_dir() {
        return;
    }
    if write(&host, "cgroup.procs", &me).is_err() {
        return;
    }
    if let Err(e) = write(own, "cgroup.subtree_control", &line) {
        tracing::debug!(cgroup = %own.display(), error = %e, "cannot enable cgroup controllers");
    }
}

fn read_names(path: &Path) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(path).ok()?;
    Some(text.split_whitespace().map(str::to_owned).collect())
}

fn write(dir: &Path, file: &str, value: &str) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join(file))?;
    f.write_all(value.as_bytes())
}

fn read_u64(dir: &Path, file: &str) -> Option<u64> {
    std::fs::read_to_string(dir.join(file))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The value of `key` in a `key value` per line file (`memory.events`, `cpu.stat`).
fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

fn max_or(value: Option<f64>, f: impl Fn(f64) -> String) -> String {
    value.map_or_else(|| "max".to_owned(), f)
}

/// CFS quota in microseconds per 100 ms period (at least the kernel's minimum of 1 ms).
fn cpu_quota(cpus: f64) -> u64 {
    ((cpus * 100_000.0).round() as u64).max(1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID_MOUNTS: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw";

    #[test]
    fn finds_own_cgroups_on_a_hybrid_host() {
        let cgroup =
            "9:name=systemd:/\n8:pids:/\n4:memory:/process_api/abc\n2:cpuacct:/\n1:cpu:/\n0::/\n";
        let h = parse_hierarchies(cgroup, HYBRID_MOUNTS);
        let find = |c: Controller| {
            h.iter()
                .find(|h| h.controllers.contains(&c))
                .map(|h| h.own.clone())
        };
        assert_eq!(find(Controller::Pids), Some("/sys/fs/cgroup/pids".into()));
        assert_eq!(
            find(Controller::Memory),
            Some("/sys/fs/cgroup/memory/process_api/abc".into())
        );
        assert_eq!(find(Controller::Cpu), Some("/sys/fs/cgroup/cpu".into()));
        assert_eq!(
            find(Controller::Cpuacct),
            Some("/sys/fs/cgroup/cpuacct".into())
        );
        let v2: Vec<_> = h.iter().filter(|h| h.v2).collect();
        assert_eq!(v2.len(), 1);
        assert_eq!(v2[0].own, PathBuf::from("/sys/fs/cgroup/unified"));
        // name=systemd carries no controller hive uses.
        assert_eq!(h.len(), 5);
        // Without a cpu limit: memory, pids and v2 (whose cpu.stat replaces cpuacct).
        assert_eq!(needed(&h, false).len(), 3);
        assert_eq!(needed(&h, true).len(), 4);
        let v1_only: Vec<Hierarchy> = h.iter().filter(|h| !h.v2).cloned().collect();
        assert_eq!(needed(&v1_only, false).len(), 3);
    }

    #[test]
    fn finds_a_delegated_v2_subtree() {
        let mounts = "30 25 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate";
        let cgroup = "0::/user.slice/user-1000.slice/user@1000.service/app.slice/run-u7.scope\n";
        let h = parse_hierarchies(cgroup, mounts);
        assert_eq!(
            h,
            vec![Hierarchy {
                v2: true,
                own: "/sys/fs/cgroup/user.slice/user-1000.slice/user@1000.service/app.slice/run-u7.scope".into(),
                controllers: vec![],
            }]
        );
    }

    #[test]
    fn co_mounted_and_subtree_mounts() {
        // cpu,cpuacct on one hierarchy; a container that sees only its own subtree.
        let mounts =
            "40 31 0:40 /docker/x /sys/fs/cgroup/cpu,cpuacct ro - cgroup cgroup rw,cpu,cpuacct";
        let h = parse_hierarchies("3:cpu,cpuacct:/docker/x/inner\n", mounts);
        assert_eq!(h[0].own, PathBuf::from("/sys/fs/cgroup/cpu,cpuacct/inner"));
        assert_eq!(h[0].controllers, vec![Controller::Cpu, Controller::Cpuacct]);
        // Our cgroup outside what the mount shows: unusable, skipped.
        assert!(parse_hierarchies("3:cpu,cpuacct:/other\n", mounts).is_empty());
        assert!(parse_hierarchies("3:cpu,cpuacct:/docker/xy\n", mounts).is_empty());
        // No mount at all.
        assert!(parse_hierarchies("0::/\n", "").is_empty());
    }

    #[test]
    fn stale_sandbox_cgroups_of_dead_processes_are_swept() {
        let own = tempfile::tempdir().expect("tempdir");
        let dead = own.path().join("hive-2147483600-1");
        let mine = own.path().join(format!("hive-{}-1", std::process::id()));
        let other = own.path().join("unrelated");
        for d in [&dead, &mine, &other] {
            std::fs::create_dir(d).unwrap();
        }
        sweep_stale(own.path());
        assert!(!dead.exists());
        assert!(mine.exists() && other.exists());
    }

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape(r"/a\040b"), "/a b");
        assert_eq!(unescape(r"/a\\"), r"/a\\");
    }

    #[test]
    fn keyed_files() {
        let events = "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\noom_group_kill 0\n";
        assert_eq!(keyed(events, "oom_kill"), Some(1));
        assert_eq!(keyed(events, "max"), Some(3));
        assert_eq!(
            keyed("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n", "oom_kill"),
            Some(2)
        );
        assert_eq!(keyed(events, "nope"), None);
        assert_eq!(cpu_quota(1.5), 150_000);
        assert_eq!(cpu_quota(0.001), 1000);
    }

    /// A v2 tree made of plain files: what `create` makes of it.
    #[test]
    fn v2_uses_only_enabled_controllers() {
        let own = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            own.path().join("cgroup.controllers"),
            "cpuset cpu io memory pids\n",
        )
        .unwrap();
        std::fs::write(
            own.path().join("cgroup.subtree_control"),
            "cpu memory pids\n",
        )
        .unwrap();
        let got = v2_controllers(own.path()).expect("usable");
        assert_eq!(
            got,
            vec![Controller::Memory, Controller::Pids, Controller::Cpu]
        );
        // Without cgroup.controllers the directory is no cgroup.
        assert_eq!(v2_controllers(&own.path().join("nope")), None);
        let cg = SandboxCgroup::create(&[Hierarchy {
            v2: true,
            own: own.path().into(),
            controllers: vec![],
        }]);
        assert!(cg.has(Controller::Memory));
        assert!(own.path().read_dir().unwrap().any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with("hive-")));
    }
}
