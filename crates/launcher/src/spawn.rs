//! `hive-init spawn`: starts one workload inside a running sandbox.
//!
//! The host's spawn helper (a `CLONE_VM | CLONE_VFORK` child of the launcher thread) executes
//! this program at once ([`crate::stub::exec_spawn_shim`]); from then on nothing of the host's
//! memory is involved. The shim is a fresh process in the host's PID namespace:
//! 1. It checks its arguments and reads the seccomp programs ([`SeccompImage`]).
//! 2. It joins the sandbox's namespaces through the fds in [`slot::NS`] (user namespace first, so
//!    it holds the capabilities the other joins need; the PID namespace applies to its children).
//! 3. It forks the workload with `CLONE_PARENT`: a child of the *host process* (whose exit status
//!    the host reads with `waitid`), inside the sandbox's PID namespace, reports its pid (host
//!    view) on [`slot::PID`] and exits.
//! 4. The workload confines itself ([`confine`]) and executes the command, trying each candidate
//!    path like `execvp`. The exec-status pipe ([`slot::ERR`], close-on-exec) tells the host which
//!    step failed, or nothing (EOF) once the command runs.
//!
//! # Arguments
//! `argv` = `hive-init spawn <flags> <rlimits> <cwd> <n> <candidate 1> .. <candidate n> <command
//! argv..>`, where `flags` bit 0 says a Landlock ruleset sits in [`slot::LANDLOCK`] and `rlimits`
//! is `-` or up to [`MAX_RLIMITS`] `resource=value` pairs joined by `,` (decimal); the environment is the
//! workload's own. The command's `argv` and `envp` are used in place (pointers into this process's
//! own argument area), so nothing is copied.
//!
//! # Security
//! The order in [`confine`] makes the confinement hold: `no_new_privs`, Landlock, the capability
//! drop and seccomp all come after the last step that needs a capability (the uid switch) and
//! before `execve`, so the command never runs with a privilege in the sandbox's user namespace.
//! Until its `execve` the workload shows the shim's argument list in `/proc/<pid>/cmdline`: its
//! own command, working directory and search path, nothing of the host.

use crate::stage::{encode_report, Stage};
use crate::stub::slot;
use crate::sys::{self, Errno, SockFilter, StrArray};

/// A step's failure: which step and the errno.
type Fail = (Stage, Errno);

/// The seccomp programs as the host writes them into a memfd ([`slot::SECCOMP`]): a sequence of
/// 8-byte [`SockFilter`] records. The first record's `k` is the number of programs; each program
/// is one record whose `k` is its length, then that many instructions.
pub struct SeccompImage;

impl SeccompImage {
    /// Most records an image may hold (32 kB, read onto the shim's stack).
    pub const MAX_RECORDS: usize = 4096;

    /// The header record for `count` programs, or the length record of one program.
    pub const fn record(k: u32) -> SockFilter {
        SockFilter {
            code: 0,
            jt: 0,
            jf: 0,
            k,
        }
    }
}

/// The namespaces in [`slot::NS`] onwards, in `setns` order: the user namespace first (joining it
/// grants the capabilities the other joins need), the PID namespace last (it applies to the
/// children of the caller).
pub const NS_ORDER: [u32; slot::NS_COUNT as usize] = [
    sys::CLONE_NEWUSER,
    sys::CLONE_NEWNS,
    sys::CLONE_NEWNET,
    sys::CLONE_NEWIPC,
    sys::CLONE_NEWUTS,
    sys::CLONE_NEWCGROUP,
    sys::CLONE_NEWPID,
];

/// Most rlimits the host passes (`RLIMIT_NPROC`, `RLIMIT_NOFILE`, `RLIMIT_FSIZE`).
pub const MAX_RLIMITS: usize = 3;

/// What the shim read from its arguments.
struct Plan {
    landlock: bool,
    /// `(resource, value)`; value 0: unused.
    rlimits: [(u32, u64); MAX_RLIMITS],
    cwd: *const u8,
    candidates: &'static [*const u8],
    argv: StrArray,
    envp: StrArray,
}

/// The shim. `argv`/`envp` are the process's own (from `_start`). Never returns.
///
/// # Safety
/// `argv` must hold `argc` valid NUL-terminated strings followed by NULL, and `envp` must be a
/// valid NULL-terminated string array; both must live for the rest of the process (they are the
/// process's argument area).
pub unsafe fn shim_main(argc: usize, argv: StrArray, envp: StrArray) -> ! {
    let _ = sys::set_cloexec(slot::ERR);
    // SAFETY: forwarded to the caller.
    let plan = match unsafe { parse(argc, argv, envp) } {
        Some(p) => p,
        None => fail((Stage::SpawnPlan, Errno(sys::EINVAL as i32))),
    };
    let mut seccomp = [SeccompImage::record(0); SeccompImage::MAX_RECORDS];
    let records = read_seccomp(&mut seccomp).unwrap_or_else(|e| fail((Stage::SpawnPlan, e)));
    let seccomp = seccomp.get(..records).unwrap_or(&[]);
    if programs(seccomp).is_none() {
        fail((Stage::SpawnPlan, Errno(sys::EINVAL as i32)));
    }
    // The sandbox's cgroups: writing `0` to `cgroup.procs` moves the writer, so the workload forked
    // below starts in them (and every process it forks after it). Unused slots are closed.
    for fd in slot::CGROUPS..slot::CGROUPS + slot::CGROUPS_COUNT {
        match sys::write(fd, b"0") {
            Ok(1) => {}
            Err(Errno(e)) if e == sys::EBADF as i32 => continue,
            Ok(_) => fail((Stage::Limits, Errno(sys::EIO as i32))),
            Err(e) => fail((Stage::Limits, e)),
        }
        let _ = sys::close(fd);
    }
    for (fd, nstype) in (slot::NS..).zip(NS_ORDER) {
        if let Err(e) = sys::setns(fd, nstype) {
            fail((Stage::Setns, e));
        }
        let _ = sys::close(fd);
    }
    match fork_workload() {
        Ok(0) => {
            let _ = sys::close(slot::PID);
            let f = match confine(&plan, seccomp) {
                // SAFETY: the plan's pointers come from our own argument area (see `parse`).
                Ok(()) => unsafe { exec(&plan) },
                Err(f) => f,
            };
            fail(f)
        }
        Ok(pid) => {
            sys::write_all(slot::PID, &pid.to_le_bytes());
            sys::exit(0)
        }
        Err(f) => fail(f),
    }
}

/// Forks the workload (a child of the host, see the module doc): into the command's own cgroup
/// v2 directory in [`slot::CGROUP_INTO`] when there is one (`clone3` with `CLONE_INTO_CGROUP`;
/// where the kernel lacks it, by joining it first through its `cgroup.procs`).
fn fork_workload() -> Result<i32, Fail> {
    let at = |stage: Stage| move |e: Errno| (stage, e);
    let into = slot::CGROUP_INTO;
    // Closed slot (EBADF): no cgroup of its own (a failed clone3 would first copy the process).
    if sys::set_cloexec(into).is_err() {
        return sys::fork(sys::CLONE_PARENT).map_err(at(Stage::Fork));
    }
    let pid = match sys::fork_into_cgroup(sys::CLONE_PARENT, into) {
        Err(Errno(e)) if [sys::ENOSYS, sys::E2BIG, sys::EINVAL].contains(&(e as u32)) => {
            let procs = sys::open_write_at(into, c"cgroup.procs").map_err(at(Stage::Limits))?;
            let joined = sys::write(procs, b"0");
            let _ = sys::close(procs);
            match joined {
                Ok(1) => {}
                Ok(_) => return Err((Stage::Limits, Errno(sys::EIO as i32))),
                Err(e) => return Err((Stage::Limits, e)),
            }
            sys::fork(sys::CLONE_PARENT)
        }
        r => r,
    }
    .map_err(at(Stage::Fork))?;
    let _ = sys::close(into);
    Ok(pid)
}

/// Reports `f` on the exec-status pipe and exits.
fn fail(f: Fail) -> ! {
    sys::write_all(slot::ERR, &encode_report(f.0, (f.1).0));
    sys::exit(127)
}

/// Reads the arguments (see the module doc).
///
/// # Safety
/// As [`shim_main`].
unsafe fn parse(argc: usize, argv: StrArray, envp: StrArray) -> Option<Plan> {
    // SAFETY: the caller guarantees `argc` valid pointers at `argv`, alive for the process.
    let args: &'static [*const u8] = unsafe { core::slice::from_raw_parts(argv, argc) };
    let number = |i: usize| -> Option<usize> {
        let p = *args.get(i)?;
        // SAFETY: every argv entry is a NUL-terminated string.
        let s = unsafe { core::ffi::CStr::from_ptr(p.cast()) }.to_bytes();
        if s.is_empty() || s.len() > 9 {
            return None;
        }
        s.iter().try_fold(0usize, |n, b| {
            b.is_ascii_digit().then(|| n * 10 + usize::from(b - b'0'))
        })
    };
    let flags = number(2)?;
    // SAFETY: every argv entry is a NUL-terminated string.
    let rlimits =
        parse_rlimits(unsafe { core::ffi::CStr::from_ptr((*args.get(3)?).cast()) }.to_bytes())?;
    let cwd = *args.get(4)?;
    let n = number(5)?;
    let candidates = args.get(6..6 + n)?;
    let first = 6 + n;
    if candidates.is_empty() || first >= argc {
        return None;
    }
    Some(Plan {
        landlock: flags & 1 != 0,
        rlimits,
        cwd,
        candidates,
        // SAFETY: first < argc, so this stays inside the array (whose tail is NULL-terminated).
        argv: unsafe { argv.add(first) },
        envp,
    })
}

/// `-`, or `resource=value[,resource=value]..` (decimal, at most [`MAX_RLIMITS`] pairs).
fn parse_rlimits(s: &[u8]) -> Option<[(u32, u64); MAX_RLIMITS]> {
    let mut out = [(0u32, 0u64); MAX_RLIMITS];
    if s == b"-" {
        return Some(out);
    }
    let decimal = |d: &[u8]| -> Option<u64> {
        if d.is_empty() || d.len() > 19 {
            return None;
        }
        d.iter().try_fold(0u64, |n, b| {
            b.is_ascii_digit().then(|| n * 10 + u64::from(b - b'0'))
        })
    };
    for (n, pair) in s.split(|b| *b == b',').enumerate() {
        let eq = pair.iter().position(|b| *b == b'=')?;
        let resource = u32::try_from(decimal(pair.get(..eq)?)?).ok()?;
        let value = decimal(pair.get(eq + 1..)?)?;
        *out.get_mut(n)? = (resource, value);
    }
    Some(out)
}

/// Reads the seccomp image into `buf`; returns the number of records.
fn read_seccomp(buf: &mut [SockFilter; SeccompImage::MAX_RECORDS]) -> Result<usize, Errno> {
    let size = core::mem::size_of_val(buf);
    // SAFETY: SockFilter is plain integers (any byte pattern is valid) and the byte view covers
    // exactly the array, which it borrows mutably for its whole life.
    let bytes = unsafe { core::slice::from_raw_parts_mut(buf.as_mut_ptr().cast::<u8>(), size) };
    let got = sys::pread_full(slot::SECCOMP, bytes)?;
    let _ = sys::close(slot::SECCOMP);
    if got % core::mem::size_of::<SockFilter>() != 0 || got == size {
        return Err(Errno(sys::EINVAL as i32));
    }
    Ok(got / core::mem::size_of::<SockFilter>())
}

/// Iterates over the programs of an image; `None` if it is malformed.
fn programs(image: &[SockFilter]) -> Option<Programs<'_>> {
    let (head, rest) = image.split_first()?;
    let mut check = Programs {
        rest,
        left: head.k as usize,
    };
    for _ in check.by_ref() {}
    (check.left == 0 && check.rest.is_empty()).then_some(Programs {
        rest,
        left: head.k as usize,
    })
}

struct Programs<'a> {
    rest: &'a [SockFilter],
    left: usize,
}

impl<'a> Iterator for Programs<'a> {
    type Item = &'a [SockFilter];

    fn next(&mut self) -> Option<&'a [SockFilter]> {
        if self.left == 0 {
            return None;
        }
        let (len, rest) = self.rest.split_first()?;
        let len = len.k as usize;
        let prog = rest.get(..len)?;
        self.rest = rest.get(len..)?;
        self.left -= 1;
        Some(prog)
    }
}

/// `SECBIT_*` (`linux/securebits.h`): root gains nothing at exec or setuid, locked.
const SECURE_BITS: usize =
    (1 << 0) | (1 << 1) | (1 << 2) | (1 << 3) | (1 << 5) | (1 << 6) | (1 << 7);

/// The workload's confinement, in order (see the module doc).
fn confine(plan: &Plan, seccomp: &[SockFilter]) -> Result<(), Fail> {
    let at = |stage: Stage| move |e: Errno| (stage, e);
    // 1. Signals: every disposition back to the default (an ignored SIGPIPE survives exec), then
    //    unblock everything (the launcher blocked all signals before the clone).
    sys::reset_signal_dispositions().map_err(at(Stage::Signals))?;
    sys::sigprocmask(sys::SIG_SETMASK, 0).map_err(at(Stage::Signals))?;
    // 2. A new session: no controlling terminal for TIOCSTI, and a process group of its own that
    //    the host signals as a whole (docs/isolation.md).
    sys::setsid().map_err(at(Stage::Setsid))?;
    // 2b. A subreaper: while the command's first process lives, every process it starts that
    //     is orphaned (a `setsid` daemon, a double fork) becomes its child again instead of
    //     init's, so the host finds them all below it to kill them (docs/processes.md). The flag
    //     survives execve and is not inherited.
    sys::prctl(sys::PR_SET_CHILD_SUBREAPER, 1, 0).map_err(at(Stage::Setsid))?;
    // 3. Working directory (setns put us at the sandbox's root).
    sys::chdir(plan.cwd).map_err(at(Stage::Chdir))?;
    // 4. Identity: uid/gid 0 of the sandbox (setns keeps the host ids, which may be unmapped).
    //    setgroups is refused where the host denied it (unprivileged); the caller's groups stay.
    let _ = sys::clear_groups();
    sys::setresgid(0).map_err(at(Stage::Identity))?;
    sys::setresuid(0).map_err(at(Stage::Identity))?;
    // 4b. rlimits, now that the process is the sandbox's uid 0: `RLIMIT_NPROC` counts processes
    //     per user namespace and uid, so set before the switch it would count the host user's.
    for (resource, value) in plan.rlimits.iter().copied().filter(|(_, v)| *v > 0) {
        sys::lower_rlimit(resource, value).map_err(at(Stage::Limits))?;
    }
    // 5. no_new_privs: no setuid gains; required for Landlock and seccomp.
    sys::prctl(sys::PR_SET_NO_NEW_PRIVS, 1, 0).map_err(at(Stage::NoNewPrivs))?;
    // 6. Landlock (ruleset completed by the sandbox's setup with in-sandbox paths).
    if plan.landlock {
        sys::landlock_restrict_self(slot::LANDLOCK).map_err(at(Stage::Landlock))?;
    }
    // 7. Capabilities: lock root's special treatment off, empty every set.
    let caps = at(Stage::Capabilities);
    sys::prctl(sys::PR_SET_SECUREBITS, SECURE_BITS, 0).map_err(caps)?;
    sys::prctl(
        sys::PR_CAP_AMBIENT,
        sys::PR_CAP_AMBIENT_CLEAR_ALL as usize,
        0,
    )
    .map_err(caps)?;
    for cap in 0..64 {
        match sys::prctl(sys::PR_CAPBSET_DROP, cap, 0) {
            Ok(_) => {}
            Err(Errno(e)) if e == sys::EINVAL as i32 => {}
            Err(e) => return Err((Stage::Capabilities, e)),
        }
    }
    sys::capset_empty().map_err(caps)?;
    // 8. Every fd above 2 is closed at exec (the exec-status pipe stays open until then).
    sys::close_range(3, u32::MAX, sys::CLOSE_RANGE_CLOEXEC).map_err(at(Stage::CloseFds))?;
    // 9. seccomp last: from here on only execve, write and exit are needed.
    for prog in programs(seccomp).into_iter().flatten() {
        sys::seccomp_filter(prog).map_err(at(Stage::Seccomp))?;
    }
    Ok(())
}

/// Tries each candidate path like `execvp`; returns the failure to report.
///
/// # Safety
/// The plan's pointers must be valid (they point into the process's argument area).
unsafe fn exec(plan: &Plan) -> Fail {
    let mut last = Errno(sys::ENOENT as i32);
    let mut seen_eacces = false;
    for candidate in plan.candidates {
        // SAFETY: candidate, argv and envp are NUL-terminated strings / NULL-terminated arrays
        // from the argument area.
        let e = unsafe { sys::execve(*candidate, plan.argv, plan.envp) };
        match e.0 as u32 {
            sys::ENOENT | sys::ENOTDIR | sys::ELOOP | sys::ENAMETOOLONG => {}
            sys::EACCES => seen_eacces = true,
            _ => return (Stage::Exec, e),
        }
        last = e;
    }
    if seen_eacces {
        last = Errno(sys::EACCES as i32);
    }
    (Stage::Exec, last)
}

#[cfg(test)]
mod unit {
    use super::*;

    fn rec(k: u32) -> SockFilter {
        SeccompImage::record(k)
    }

    #[test]
    fn seccomp_images_parse_or_are_refused() {
        let lens = |image: &[SockFilter]| {
            programs(image).map(|p| p.map(<[SockFilter]>::len).collect::<heapless_lens::Lens>())
        };
        // two programs of 2 and 1 instructions
        let good = [rec(2), rec(2), rec(7), rec(8), rec(1), rec(9)];
        assert_eq!(lens(&good), Some(heapless_lens::Lens::of(&[2, 1])));
        // a length beyond the end, trailing garbage, a missing program, an empty image
        assert!(lens(&[rec(1), rec(5), rec(0)]).is_none());
        assert!(lens(&[rec(1), rec(1), rec(0), rec(0)]).is_none());
        assert!(lens(&[rec(2), rec(1), rec(0)]).is_none());
        assert!(lens(&[]).is_none());
    }

    /// A fixed-capacity list of lengths (the crate has no `alloc`, so no `Vec` even in tests).
    mod heapless_lens {
        #[derive(Debug, PartialEq, Eq, Default)]
        pub struct Lens {
            items: [usize; 8],
            n: usize,
        }

        impl Lens {
            pub fn of(v: &[usize]) -> Lens {
                v.iter().copied().collect()
            }
        }

        impl FromIterator<usize> for Lens {
            fn from_iter<I: IntoIterator<Item = usize>>(iter: I) -> Lens {
                let mut l = Lens::default();
                for v in iter {
                    l.items[l.n] = v;
                    l.n += 1;
                }
                l
            }
        }
    }
}
