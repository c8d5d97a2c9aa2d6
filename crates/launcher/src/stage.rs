//! Where a child failed: the step ([`Stage`]) and errno, as one fixed-size report that crosses
//! the process boundary (a pipe or the control socket) and is decoded by the host.

/// The steps a child can fail in; the numeric value crosses the process boundary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
#[allow(missing_docs)] // each step is described by `describe`
pub enum Stage {
    Ok = 0,
    Handshake = 1,
    Hostname = 2,
    LoopbackUp = 3,
    Listener = 4,
    MountPrivate = 5,
    OpenSource = 6,
    MountRoot = 7,
    BindSystem = 8,
    MountTmpfs = 9,
    MountDev = 10,
    MountProc = 11,
    WriteFile = 12,
    BindConfigured = 13,
    PivotRoot = 14,
    HideSecret = 15,
    BindCaBundle = 16,
    LandlockRule = 17,
    RemountRootRo = 18,
    SendListener = 19,
    Setns = 20,
    Fork = 21,
    Stdio = 22,
    Chdir = 23,
    Signals = 24,
    Capabilities = 25,
    NoNewPrivs = 26,
    Landlock = 27,
    Seccomp = 28,
    CloseFds = 29,
    Exec = 30,
    Setsid = 31,
    Identity = 32,
    OpenFuse = 33,
    MountFuse = 34,
    /// Not a failure: one FUSE fd handed over before the final report (errno field: mount index).
    FuseHandover = 35,
    Routes = 36,
    DnsSocket = 37,
    /// The spawn shim's arguments or file descriptors are not what the host sends.
    SpawnPlan = 38,
    /// `execveat` of `hive-init` (sandbox init or spawn shim) failed.
    ExecInit = 39,
    /// Not a failure: the exec'd init runs (its first message to the host).
    InitReady = 40,
    /// Joining the sandbox's cgroups or setting its rlimits.
    Limits = 41,
    Unknown = 255,
}

impl Stage {
    /// Decodes a stage code received from a child.
    pub fn from_u32(v: u32) -> Stage {
        const ALL: [Stage; 42] = [
            Stage::Ok,
            Stage::Handshake,
            Stage::Hostname,
            Stage::LoopbackUp,
            Stage::Listener,
            Stage::MountPrivate,
            Stage::OpenSource,
            Stage::MountRoot,
            Stage::BindSystem,
            Stage::MountTmpfs,
            Stage::MountDev,
            Stage::MountProc,
            Stage::WriteFile,
            Stage::BindConfigured,
            Stage::PivotRoot,
            Stage::HideSecret,
            Stage::BindCaBundle,
            Stage::LandlockRule,
            Stage::RemountRootRo,
            Stage::SendListener,
            Stage::Setns,
            Stage::Fork,
            Stage::Stdio,
            Stage::Chdir,
            Stage::Signals,
            Stage::Capabilities,
            Stage::NoNewPrivs,
            Stage::Landlock,
            Stage::Seccomp,
            Stage::CloseFds,
            Stage::Exec,
            Stage::Setsid,
            Stage::Identity,
            Stage::OpenFuse,
            Stage::MountFuse,
            Stage::FuseHandover,
            Stage::Routes,
            Stage::DnsSocket,
            Stage::SpawnPlan,
            Stage::ExecInit,
            Stage::InitReady,
            Stage::Limits,
        ];
        ALL.iter()
            .copied()
            .find(|s| *s as u32 == v)
            .unwrap_or(Stage::Unknown)
    }

    /// What the step does, for error messages built in the parent.
    pub fn describe(self) -> &'static str {
        match self {
            Stage::Ok => "ok",
            Stage::Handshake => "waiting for the parent",
            Stage::Hostname => "setting the hostname",
            Stage::LoopbackUp => "bringing up the loopback interface",
            Stage::Listener => "creating the proxy listener",
            Stage::MountPrivate => "making mounts private",
            Stage::OpenSource => "opening a mount source",
            Stage::MountRoot => "mounting the root tmpfs",
            Stage::BindSystem => "binding a system directory",
            Stage::MountTmpfs => "mounting a tmpfs",
            Stage::MountDev => "setting up /dev",
            Stage::MountProc => "mounting /proc",
            Stage::WriteFile => "writing a generated file",
            Stage::BindConfigured => "binding a configured mount",
            Stage::PivotRoot => "pivot_root",
            Stage::HideSecret => "hiding a secret file",
            Stage::BindCaBundle => "binding the CA bundle",
            Stage::LandlockRule => "adding a Landlock rule",
            Stage::RemountRootRo => "making / read-only",
            Stage::SendListener => "handing over the proxy listener",
            Stage::Setns => "joining the sandbox namespaces",
            Stage::Fork => "forking into the sandbox",
            Stage::Stdio => "setting up stdio",
            Stage::Chdir => "changing to the working directory",
            Stage::Signals => "resetting signal handlers",
            Stage::Capabilities => "dropping capabilities",
            Stage::NoNewPrivs => "setting no_new_privs",
            Stage::Landlock => "applying Landlock",
            Stage::Seccomp => "applying the seccomp filter",
            Stage::CloseFds => "closing inherited file descriptors",
            Stage::Exec => "executing the command",
            Stage::Setsid => "starting a new session as its subreaper",
            Stage::Identity => "switching to the sandbox's uid/gid 0",
            Stage::OpenFuse => "opening /dev/fuse",
            Stage::MountFuse => "mounting a FUSE file system",
            Stage::FuseHandover => "handing over a FUSE connection",
            Stage::Routes => "adding the capture routes",
            Stage::DnsSocket => "creating the DNS sockets",
            Stage::SpawnPlan => "reading the spawn plan",
            Stage::ExecInit => "executing hive-init (is vm.memfd_noexec set to 2?)",
            Stage::InitReady => "starting init",
            Stage::Limits => "applying the sandbox's resource limits",
            Stage::Unknown => "an unknown step",
        }
    }
}

/// Encodes a stage/errno report: 8 bytes, little endian.
pub fn encode_report(stage: Stage, errno: i32) -> [u8; 8] {
    let s = (stage as u32).to_le_bytes();
    let e = errno.to_le_bytes();
    [s[0], s[1], s[2], s[3], e[0], e[1], e[2], e[3]]
}

/// Decodes a report made by [`encode_report`].
pub fn decode_report(buf: &[u8; 8]) -> (Stage, i32) {
    let stage = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]);
    let errno = i32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
    (Stage::from_u32(stage), errno)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_round_trips() {
        for (stage, errno) in [
            (Stage::Ok, 0),
            (Stage::Exec, 2),
            (Stage::LoopbackUp, 1),
            (Stage::Setsid, 1),
            (Stage::Limits, -7),
        ] {
            assert_eq!(decode_report(&encode_report(stage, errno)), (stage, errno));
        }
    }

    #[test]
    fn unknown_stage_decodes_to_unknown() {
        assert_eq!(Stage::from_u32(9999), Stage::Unknown);
        assert_eq!(Stage::from_u32(Stage::Limits as u32), Stage::Limits);
    }
}
