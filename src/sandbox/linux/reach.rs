//! Reaching every process a command started when its sandbox has no cgroup (docs/processes.md).
//! Where it has one, the command's own cgroup ([`super::cgroup::ExecCgroup`]) does this instead.
//!
//! The spawn shim makes the command's first process a child subreaper before it executes the
//! command (`crates/launcher/src/spawn.rs`). While that process lives, a process the command
//! started that loses its parent (a `setsid` daemon, a double fork) is re-parented to it, not to
//! the sandbox's init: its descendants are exactly the processes the command started, whatever
//! session or process group they took. They are found through `/proc/<pid>/task/<tid>/children`
//! (or, on a kernel without that file, the parent field of every `/proc/<pid>/stat`).
//!
//! SIGKILL ([`signal_tree`]): the host stops the first process (SIGSTOP: it forks no more and
//! stays the reaper of whatever is orphaned meanwhile), SIGKILLs its live descendants until none
//! is left (a process with a pending SIGKILL cannot complete a fork, so this ends), then kills
//! the first process. Other signals go to each process of the tree once.
//!
//! A pid read from `/proc` could be reused before it is signalled; each one is opened as a pidfd
//! and signalled only if its parent is still the one it was found under, so only a process of
//! the tree is ever signalled.
//!
//! Limit: once the first process has ended, its orphans belong to the sandbox's init, and nothing
//! here finds them (the command's process group still reaches those that did not leave it).

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

/// Most processes walked in one tree (far above any `pids` limit hive sets by default).
const MAX_TREE: usize = 65_536;
/// How long a SIGKILL of a tree may keep finding live processes before it gives up (the first
/// process is killed then anyway; what is left belongs to the sandbox's init).
const KILL_BUDGET: Duration = Duration::from_millis(80);

/// Sends `signal` to every descendant of `root` (host pid; `root_pidfd` is its pidfd, and the
/// caller keeps it unreaped so the number stays its own), then to `root` (see the module doc).
pub fn signal_tree(root_pidfd: RawFd, root: i32, signal: i32) {
    if signal != libc::SIGKILL {
        // The first process first (a shell waiting for its children would otherwise see them
        // end and exit 0 before its own signal arrives); the others through pidfds opened
        // before, while the tree still proves who they are.
        let pidfds: Vec<OwnedFd> = tree(root)
            .into_iter()
            .filter_map(|(pid, parent)| open_if_child(pid, parent))
            .collect();
        let _ = super::pidfd_send_signal(root_pidfd, signal);
        for pidfd in pidfds {
            let _ = super::pidfd_send_signal(pidfd.as_raw_fd(), signal);
        }
        return;
    }
    let _ = super::pidfd_send_signal(root_pidfd, libc::SIGSTOP);
    let deadline = Instant::now() + KILL_BUDGET;
    loop {
        let mut live = 0;
        for (pid, parent) in tree(root) {
            if signal_if_child(pid, parent, libc::SIGKILL) {
                live += 1;
            }
        }
        if live == 0 || Instant::now() >= deadline {
            break;
        }
        // Let the killed processes exit (their children move up to the stopped root).
        std::thread::sleep(Duration::from_micros(200));
    }
    let _ = super::pidfd_send_signal(root_pidfd, libc::SIGKILL);
}

/// Every descendant of `root` as `(pid, parent)`, breadth first.
fn tree(root: i32) -> Vec<(i32, i32)> {
    let by_stat = (!has_children_files()).then(children_by_stat);
    let mut out = Vec::new();
    let mut seen = HashSet::from([root]);
    let mut queue = std::collections::VecDeque::from([root]);
    while let Some(parent) = queue.pop_front() {
        let kids = match &by_stat {
            Some(map) => map.get(&parent).cloned().unwrap_or_default(),
            None => children(parent),
        };
        for kid in kids {
            if out.len() < MAX_TREE && seen.insert(kid) {
                out.push((kid, parent));
                queue.push_back(kid);
            }
        }
    }
    out
}

/// Whether this kernel has `/proc/<pid>/task/<tid>/children` (`CONFIG_PROC_CHILDREN`).
fn has_children_files() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| {
        let me = std::process::id();
        std::path::Path::new(&format!("/proc/{me}/task/{me}/children")).exists()
    })
}

/// The children of every thread of `pid`.
fn children(pid: i32) -> Vec<i32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|text| {
            text.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<i32>>()
        })
        .collect()
}

/// Parent → children of every process, from `/proc/<pid>/stat`.
fn children_by_stat() -> HashMap<i32, Vec<i32>> {
    let mut map: HashMap<i32, Vec<i32>> = HashMap::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return map;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        if let Some((_, ppid)) = stat(pid) {
            map.entry(ppid).or_default().push(pid);
        }
    }
    map
}

/// State letter and parent pid of `pid` (`/proc/<pid>/stat`, fields 3 and 4).
fn stat(pid: i32) -> Option<(u8, i32)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command (field 2) may hold spaces and parentheses: fields resume after the last ')'.
    let mut rest = text.get(text.rfind(')')? + 1..)?.split_whitespace();
    let state = *rest.next()?.as_bytes().first()?;
    let ppid = rest.next()?.parse().ok()?;
    Some((state, ppid))
}

/// Signals `pid` if it is alive (not a zombie) and still the child of `parent`; returns whether
/// it was signalled.
fn signal_if_child(pid: i32, parent: i32, signal: i32) -> bool {
    open_if_child(pid, parent)
        .is_some_and(|pidfd| super::pidfd_send_signal(pidfd.as_raw_fd(), signal).is_ok())
}

/// A pidfd of `pid` if it is alive (not a zombie) and still the child of `parent`.
fn open_if_child(pid: i32, parent: i32) -> Option<OwnedFd> {
    // SAFETY: plain syscall.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0u32) };
    if fd < 0 {
        return None;
    }
    // SAFETY: a fresh fd we own.
    let pidfd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
    // The pidfd pins the process it names; checked after opening, the parent proves it is the
    // process found in the tree and not a later one with the same number.
    match stat(pid) {
        Some((state, ppid)) if ppid == parent && !matches!(state, b'Z' | b'X') => Some(pidfd),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_reads_state_and_parent_past_odd_command_names() {
        let me = std::process::id() as i32;
        let (state, ppid) = stat(me).expect("own stat");
        assert!(state.is_ascii_uppercase(), "{}", state as char);
        // SAFETY: getppid has no preconditions.
        assert_eq!(ppid, unsafe { libc::getppid() });
    }

    #[test]
    fn both_ways_of_finding_children_agree() {
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .expect("spawn sleep");
        let me = std::process::id() as i32;
        let pid = child.id() as i32;
        assert!(children_by_stat()
            .get(&me)
            .is_some_and(|kids| kids.contains(&pid)));
        if has_children_files() {
            assert!(children(me).contains(&pid));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}
