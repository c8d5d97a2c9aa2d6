//! The workload's seccomp filter, compiled in the parent with `seccompiler`, installed by the
//! spawn shim (`hive_launcher::spawn`) right before the command's `execve`.
//!
//! Three stacked programs (the kernel runs all of them; the strictest result wins):
//! 1. `EPERM` for the mount family, namespace creation/joining (`unshare`, `setns`, `clone` with
//!    any `CLONE_NEW*` flag), `ptrace`, `process_vm_*`, `bpf`, `perf_event_open`, keyrings,
//!    `userfaultfd`, kexec and module loading, `io_uring`, `ioctl(TIOCSTI | TIOCLINUX)` compared
//!    on the low 32 bits only (CVE-2019-10063: a masked compare, so high bits cannot dodge it),
//!    and `socket`/`socketpair` of any family but [`SOCKET_FAMILIES`] (`AF_UNIX`, `AF_INET`,
//!    `AF_INET6`): netlink and packet sockets reach the kernel's routing and raw network code,
//!    and `AF_VSOCK` is not network-namespaced at all (on a VM, CID 2 is the hypervisor).
//! 2. `ENOSYS` for `clone3`: its flags live in memory a filter cannot read, and `ENOSYS` makes
//!    libc fall back to `clone`, where (1) sees the flags.
//! 3. x86_64 only: `ENOSYS` for every x32 syscall number (bit 30), which would otherwise reach
//!    the same syscalls under numbers (1) does not list.
//!
//! seccompiler kills the process for any other architecture (`int 0x80` i386 calls).
//!
//! # Security
//! The filter is defence in depth under the capability drop: without capabilities most of these
//! calls fail anyway; the filter also closes the kernel attack surface they expose.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::OnceLock;

use hive_launcher::spawn::SeccompImage;
use hive_launcher::sys::SockFilter;

use crate::error::{HiveError, Result};

/// The compiled programs, installed in order.
pub(crate) struct SeccompProgram {
    programs: Vec<BpfProgram>,
}

/// Syscalls denied outright with `EPERM`.
fn denied_syscalls() -> Vec<libc::c_long> {
    let mut v = vec![
        libc::SYS_mount,
        libc::SYS_umount2,
        libc::SYS_pivot_root,
        libc::SYS_move_mount,
        libc::SYS_open_tree,
        libc::SYS_fsopen,
        libc::SYS_fsconfig,
        libc::SYS_fsmount,
        libc::SYS_fspick,
        libc::SYS_mount_setattr,
        libc::SYS_chroot,
        libc::SYS_unshare,
        libc::SYS_setns,
        libc::SYS_ptrace,
        libc::SYS_process_vm_readv,
        libc::SYS_process_vm_writev,
        libc::SYS_bpf,
        libc::SYS_perf_event_open,
        libc::SYS_keyctl,
        libc::SYS_add_key,
        libc::SYS_request_key,
        libc::SYS_userfaultfd,
        libc::SYS_kexec_load,
        libc::SYS_init_module,
        libc::SYS_finit_module,
        libc::SYS_delete_module,
        libc::SYS_io_uring_setup,
        libc::SYS_io_uring_enter,
        libc::SYS_io_uring_register,
        libc::SYS_open_by_handle_at,
        libc::SYS_name_to_handle_at,
        libc::SYS_swapon,
        libc::SYS_swapoff,
        libc::SYS_reboot,
        libc::SYS_syslog,
        libc::SYS_acct,
    ];
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    v.push(libc::SYS_kexec_file_load);
    #[cfg(target_arch = "x86_64")]
    v.extend([libc::SYS_iopl, libc::SYS_ioperm]);
    v
}

/// The only socket families a workload may create: local sockets and IP (which the network
/// namespace confines to its loopback and the capture listeners).
pub(crate) const SOCKET_FAMILIES: [libc::c_int; 3] = [libc::AF_UNIX, libc::AF_INET, libc::AF_INET6];

/// `CLONE_NEW*` flags a `clone` may not carry (`CLONE_NEWTIME` shares its bit with the exit
/// signal in `clone`, so it is only reachable through `unshare`/`clone3`, both denied).
const CLONE_NEW_FLAGS: &[libc::c_int] = &[
    libc::CLONE_NEWNS,
    libc::CLONE_NEWCGROUP,
    libc::CLONE_NEWUTS,
    libc::CLONE_NEWIPC,
    libc::CLONE_NEWUSER,
    libc::CLONE_NEWPID,
    libc::CLONE_NEWNET,
];

fn cond(arg: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value)
        .map_err(|e| HiveError::Internal(format!("seccomp condition: {e}")))
}

fn rule(conds: Vec<SeccompCondition>) -> Result<SeccompRule> {
    SeccompRule::new(conds).map_err(|e| HiveError::Internal(format!("seccomp rule: {e}")))
}

impl SeccompProgram {
    /// Compiles the filter for the running architecture.
    pub(crate) fn build() -> Result<SeccompProgram> {
        let arch = TargetArch::try_from(std::env::consts::ARCH)
            .map_err(|e| HiveError::UnsupportedPlatform(format!("seccomp: {e}")))?;
        let mut deny: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
        for nr in denied_syscalls() {
            deny.insert(nr, vec![]);
        }
        let clone_rules = CLONE_NEW_FLAGS
            .iter()
            .map(|f| rule(vec![cond(0, SeccompCmpOp::MaskedEq(*f as u64), *f as u64)?]))
            .collect::<Result<Vec<_>>>()?;
        deny.insert(libc::SYS_clone, clone_rules);
        let ioctl_rules = [libc::TIOCSTI, libc::TIOCLINUX]
            .iter()
            .map(|req| {
                rule(vec![cond(
                    1,
                    SeccompCmpOp::MaskedEq(0xffff_ffff),
                    u64::from(*req as u32),
                )?])
            })
            .collect::<Result<Vec<_>>>()?;
        deny.insert(libc::SYS_ioctl, ioctl_rules);
        // One rule whose conditions all hold (they are ANDed): the family is none of the allowed.
        let other_family = || -> Result<Vec<SeccompRule>> {
            let conds = SOCKET_FAMILIES
                .iter()
                .map(|af| cond(0, SeccompCmpOp::Ne, *af as u64))
                .collect::<Result<Vec<_>>>()?;
            Ok(vec![rule(conds)?])
        };
        deny.insert(libc::SYS_socket, other_family()?);
        deny.insert(libc::SYS_socketpair, other_family()?);
        let compile = |rules, action| -> Result<BpfProgram> {
            let f = SeccompFilter::new(rules, SeccompAction::Allow, action, arch)
                .map_err(|e| HiveError::Internal(format!("seccomp filter: {e}")))?;
            BpfProgram::try_from(f)
                .map_err(|e| HiveError::Internal(format!("seccomp compile: {e}")))
        };
        let mut programs = vec![compile(deny, SeccompAction::Errno(libc::EPERM as u32))?];
        let mut clone3 = BTreeMap::new();
        clone3.insert(libc::SYS_clone3, vec![]);
        programs.push(compile(clone3, SeccompAction::Errno(libc::ENOSYS as u32))?);
        #[cfg(target_arch = "x86_64")]
        programs.push(x32_filter());
        Ok(SeccompProgram { programs })
    }
}

/// `ENOSYS` for syscall numbers with the x32 bit set (x86_64).
#[cfg(target_arch = "x86_64")]
fn x32_filter() -> BpfProgram {
    const X32_SYSCALL_BIT: u32 = 0x4000_0000;
    const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
    let stmt = |code: u16, k: u32| seccompiler::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    };
    let jump = |code: u16, k: u32, jt: u8, jf: u8| seccompiler::sock_filter { code, jt, jf, k };
    let ld = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
    let jeq = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
    let jge = (libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K) as u16;
    let ret = (libc::BPF_RET | libc::BPF_K) as u16;
    vec![
        stmt(ld, 4), // seccomp_data.arch
        jump(jeq, AUDIT_ARCH_X86_64, 1, 0),
        stmt(ret, libc::SECCOMP_RET_ALLOW), // other arches: left to the first program
        stmt(ld, 0),                        // seccomp_data.nr
        jump(jge, X32_SYSCALL_BIT, 0, 1),
        stmt(ret, libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32),
        stmt(ret, libc::SECCOMP_RET_ALLOW),
    ]
}

impl SeccompProgram {
    /// The programs as the spawn shim reads them (`hive_launcher::spawn::SeccompImage`): a
    /// header record with the count, then each program's length record and instructions.
    pub(crate) fn image(&self) -> Vec<u8> {
        let mut records = vec![SeccompImage::record(self.programs.len() as u32)];
        for prog in &self.programs {
            records.push(SeccompImage::record(prog.len() as u32));
            records.extend(prog.iter().map(|i| SockFilter {
                code: i.code,
                jt: i.jt,
                jf: i.jf,
                k: i.k,
            }));
        }
        records
            .iter()
            .flat_map(|r| {
                let mut b = [0u8; 8];
                b[0..2].copy_from_slice(&r.code.to_ne_bytes());
                b[2] = r.jt;
                b[3] = r.jf;
                b[4..8].copy_from_slice(&r.k.to_ne_bytes());
                b
            })
            .collect()
    }
}

/// The compiled filter as a sealed memfd the spawn shim reads (with `pread`, so concurrent
/// spawns do not share a file offset), made once per process: the filter does not depend on the
/// sandbox.
pub(crate) fn image_fd() -> Result<RawFd> {
    static IMAGE: OnceLock<std::result::Result<OwnedFd, String>> = OnceLock::new();
    IMAGE
        .get_or_init(|| {
            let image = SeccompProgram::build().map_err(|e| e.to_string())?.image();
            if image.len() / 8 >= SeccompImage::MAX_RECORDS {
                return Err("the seccomp filter is larger than the spawn shim reads".into());
            }
            super::image::sealed_memfd(&image, c"hive-seccomp", false).map_err(|e| e.to_string())
        })
        .as_ref()
        .map(|fd| fd.as_raw_fd())
        .map_err(|e| HiveError::Internal(format!("preparing the seccomp filter: {e}")))
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn filter_compiles_for_this_arch() {
        let p = SeccompProgram::build().expect("compiles");
        assert!(p.programs.len() >= 2);
        assert!(p
            .programs
            .iter()
            .all(|prog| !prog.is_empty() && prog.len() < 4096));
        let image = p.image();
        assert_eq!(image.len() % 8, 0);
        assert!(image.len() / 8 < SeccompImage::MAX_RECORDS);
        assert!(image_fd().is_ok());
    }
}
