//! Plans: everything the children need, resolved and allocated in the parent before `clone`.
//!
//! A plan is plain data (C strings, pointer arrays, fds, byte buffers). The children only read
//! it, so they run without allocating. Plans are built on the launcher thread and never leave it.
//!
//! Two plans:
//! 1. [`InitPlan`]: the sandbox's filesystem layout and network setup, built once per sandbox from
//!    a [`LaunchSpec`] and a scan of the host (which system directories exist, which are
//!    symlinks, which files under `/etc` are secrets). The setup child reads it through a
//!    borrowed view ([`SetupView`] makes the `hive_launcher::setup::Plan`: slices and `&CStr`s,
//!    the code that reads it is `#![no_std]` without `alloc`).
//! 2. [`CommandStrings`]: one command: argv/envp, the `execvp`-style candidate paths and the
//!    working directory, laid out as the spawn shim's arguments ([`CommandStrings::shim_argv`]).

use std::ffi::{CStr, CString, OsStr};
use std::os::fd::RawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileTypeExt;
use std::path::Path;

use hive_launcher::setup;

use super::{BindMount, LaunchSpec, ProcessSpec, CA_BUNDLE_PATH};
use crate::error::{HiveError, Result};

/// Namespaces every sandbox gets (and every spawn joins).
pub(crate) const NS_FLAGS: libc::c_int = libc::CLONE_NEWUSER
    | libc::CLONE_NEWNS
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWCGROUP;

/// The namespaces a spawn joins, in `setns` order: the user namespace first, so the others are
/// joined with the capabilities it grants; the PID namespace applies to the next fork.
pub(crate) const NS_ORDER: [(&str, libc::c_int); 7] = [
    ("user", libc::CLONE_NEWUSER),
    ("mnt", libc::CLONE_NEWNS),
    ("net", libc::CLONE_NEWNET),
    ("ipc", libc::CLONE_NEWIPC),
    ("uts", libc::CLONE_NEWUTS),
    ("cgroup", libc::CLONE_NEWCGROUP),
    ("pid", libc::CLONE_NEWPID),
];

/// Host system directories bound read-only (or recreated as symlinks) at the same path.
pub(crate) const SYSTEM_DIRS: &[&str] = &["usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32"];

/// Device nodes bound from the host's `/dev`.
pub(crate) const DEV_NODES: &[&str] = &["null", "zero", "full", "random", "urandom", "tty"];

/// Distribution CA bundle paths the sandbox's bundle is bound over, where they exist inside.
pub(crate) const CA_TARGETS: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
    "/etc/ssl/cert.pem",
    "/etc/ssl/ca-bundle.pem",
];

/// Top-level names a configured mount may not use: the launcher owns them.
const RESERVED_TOP: &[&str] = &[
    "usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "etc", "proc", "dev", "run", "sys",
];

/// A list of C strings stored end to end with their NULs (the layout of
/// `hive_launcher::setup::CStrs`), so the setup child reads a list inside a list element through
/// one borrowed slice.
#[derive(Debug, Clone, Default)]
pub(crate) struct PackedPaths(Vec<u8>);

impl PackedPaths {
    /// The strings, in order.
    #[cfg(test)]
    pub(crate) fn iter(&self) -> impl Iterator<Item = &CStr> {
        self.view().iter()
    }

    /// The borrowed form the setup child reads.
    pub(crate) fn view(&self) -> setup::CStrs<'_> {
        // Only `FromIterator` builds it, each string with its NUL: never `None`.
        setup::CStrs::new(&self.0).unwrap_or_default()
    }
}

impl FromIterator<CString> for PackedPaths {
    fn from_iter<I: IntoIterator<Item = CString>>(iter: I) -> Self {
        let mut packed = Vec::new();
        for s in iter {
            packed.extend_from_slice(s.as_bytes_with_nul());
        }
        PackedPaths(packed)
    }
}

/// One top-level system entry.
pub(crate) enum SystemEntry {
    /// A directory bound read-only: (name relative to the new root, absolute host path).
    Dir { name: CString, host: CString },
    /// A symlink recreated as is: (name, target).
    Symlink { name: CString, target: CString },
}

/// One mount init makes for a configured mount: the whole source, one subtree of it, or only
/// a mount point ([`plan_mount`]).
pub(crate) struct PlannedMount {
    /// Host path, canonical (no component is a symlink; init opens it with
    /// `RESOLVE_NO_SYMLINKS`, so a symlink swapped in since fails the start): the source, or a
    /// subtree of it.
    pub source: CString,
    /// Target relative to the new root, e.g. `workspace/src`.
    pub target_rel: CString,
    /// Directories to create (relative), parents first, ending with the target if a directory.
    pub mkdirs: PackedPaths,
    /// The source is a regular file (the target is created as an empty file).
    pub is_file: bool,
    pub writable: bool,
    /// A detached idmapped tree of `source` made by the parent ([`super::idmap`]), or -1.
    pub tree: RawFd,
    /// Only the mount point is made, on the sandbox's read-only root: an empty directory (or
    /// file) where no rule grants anything at the mount's root.
    pub placeholder: bool,
    /// Served over FUSE by the host ([`BindMount::fuse`]): nothing is bound.
    pub fuse: bool,
}

impl PlannedMount {
    /// Whether init binds `source` (or the parent's idmapped tree of it) at the target.
    pub(crate) fn binds_source(&self) -> bool {
        !self.fuse && !self.placeholder
    }
}

/// A secret to hide: absolute path inside the sandbox and whether it is a directory.
pub(crate) struct Hidden {
    pub path: CString,
    pub is_dir: bool,
}

/// Everything the sandbox's setup child needs (`hive_launcher::setup`, which reads it through
/// a [`SetupView`]).
pub(crate) struct InitPlan {
    pub hostname: Vec<u8>,
    pub proxy_port: u16,
    /// The init's end of the control socket.
    pub ctrl: RawFd,
    /// Landlock ruleset fd (shared object with the parent), or -1 without Landlock.
    pub landlock_fd: RawFd,
    /// Landlock fs rights the ruleset handles.
    pub landlock_fs: u64,
    pub system: Vec<SystemEntry>,
    pub etc_host: CString,
    pub dev_host: Vec<(CString, CString)>,
    pub mounts: Vec<PlannedMount>,
    pub hidden: Vec<Hidden>,
    pub ca_bundle: Vec<u8>,
    /// [`CA_BUNDLE_PATH`] relative to the new root.
    pub ca_bundle_rel: CString,
    pub ca_targets: Vec<CString>,
    /// Ports captured on `0.0.0.0` and `[::]` ([`super::capture`]).
    pub capture_ports: Vec<u16>,
    /// Generated `/etc/resolv.conf` and `/etc/hosts`.
    pub etc_files: Vec<EtcFile>,
    /// The sealed `hive-init` memfd init executes at the end ([`super::image`]); set by the
    /// launcher before `clone`.
    pub image: RawFd,
    /// Files init joins the sandbox's cgroups through by writing `0` (-1: unused).
    pub cgroup_join: [RawFd; super::limits::MAX_GROUPS],
}

/// `/etc/resolv.conf` inside: hive's DNS responder only, one try, one second.
pub(crate) const RESOLV_CONF: &[u8] = b"nameserver 127.0.0.1\noptions attempts:1 timeout:1\n";
/// `/etc/hosts` inside: the localhost lines, and the sandbox's hostname on loopback (so looking up
/// one's own hostname does not become a denied DNS query).
pub(crate) fn hosts_file(hostname: &[u8]) -> Vec<u8> {
    let mut hosts = b"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n".to_vec();
    if !hostname.is_empty()
        && hostname
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'-')
    {
        hosts.extend_from_slice(b"127.0.1.1\t");
        hosts.extend_from_slice(hostname);
        hosts.push(b'\n');
    }
    hosts
}

/// A file generated under `/run/hive` and shown at an `/etc` path.
pub(crate) struct EtcFile {
    /// Where it is written, relative to the new root (`run/hive/resolv.conf`).
    pub staged: CString,
    /// The same, absolute (a symlink target).
    pub staged_abs: CString,
    pub data: Vec<u8>,
    pub target: EtcTarget,
}

/// How an [`EtcFile`] is shown (decided from the host's `/etc`, which is bound read-only).
pub(crate) enum EtcTarget {
    /// Bound over this absolute path (a regular file inside, symlinks followed).
    Bind(CString),
    /// The `/etc` entry is a symlink into `/run` (systemd-resolved's stub): create the parents
    /// (absolute) and a symlink at `link` pointing at the staged file.
    Symlink { mkdirs: PackedPaths, link: CString },
    /// Not shown (no such entry on the host, or a link to somewhere hive does not provide).
    Skip,
}

/// Resolves `/etc/<name>` on the host into where the generated file must go inside.
fn etc_target(name: &str) -> Result<EtcTarget> {
    let path = Path::new("/etc").join(name);
    let Ok(meta) = std::fs::symlink_metadata(&path) else {
        return Ok(EtcTarget::Skip);
    };
    if meta.is_file() {
        return Ok(EtcTarget::Bind(path_cstring(&path)?));
    }
    if !meta.file_type().is_symlink() {
        return Ok(EtcTarget::Skip);
    }
    let Ok(link) = std::fs::read_link(&path) else {
        return Ok(EtcTarget::Skip);
    };
    link_target(&resolve_link(Path::new("/etc"), &link))
}

/// `dir/link`, with `.` and `..` resolved lexically (the target may not exist on the host).
fn resolve_link(dir: &Path, link: &Path) -> std::path::PathBuf {
    let mut resolved = std::path::PathBuf::from("/");
    for part in dir.join(link).components() {
        match part {
            std::path::Component::ParentDir => {
                resolved.pop();
            }
            std::path::Component::Normal(p) => resolved.push(p),
            _ => {}
        }
    }
    resolved
}

/// Where an `/etc` symlink resolving to `resolved` gets its generated file.
fn link_target(resolved: &Path) -> Result<EtcTarget> {
    let mut parts = resolved.components().skip(1);
    match parts.next().and_then(|c| c.as_os_str().to_str()) {
        Some("run") if !resolved.starts_with("/run/hive") => {
            let mut mkdirs = Vec::new();
            let mut dir = std::path::PathBuf::from("/run");
            let rest: Vec<_> = parts.collect();
            for part in rest.iter().take(rest.len().saturating_sub(1)) {
                dir.push(part);
                mkdirs.push(path_cstring(&dir)?);
            }
            Ok(EtcTarget::Symlink {
                mkdirs: mkdirs.into_iter().collect(),
                link: path_cstring(resolved)?,
            })
        }
        Some(top) if SYSTEM_DIRS.contains(&top) || top == "etc" => {
            Ok(EtcTarget::Bind(path_cstring(resolved)?))
        }
        _ => Ok(EtcTarget::Skip),
    }
}

fn etc_file(name: &str, data: &[u8]) -> Result<EtcFile> {
    Ok(EtcFile {
        staged: cstring(format!("run/hive/{name}").as_bytes())?,
        staged_abs: cstring(format!("/run/hive/{name}").as_bytes())?,
        data: data.to_vec(),
        target: etc_target(name)?,
    })
}

fn cstring(bytes: &[u8]) -> Result<CString> {
    CString::new(bytes).map_err(|_| HiveError::InvalidArgument("path contains a NUL byte".into()))
}

fn path_cstring(p: &Path) -> Result<CString> {
    cstring(p.as_os_str().as_bytes())
}

impl InitPlan {
    /// Resolves `spec` against the host.
    pub(crate) fn build(
        spec: &LaunchSpec,
        ctrl: RawFd,
        landlock_fd: RawFd,
        landlock_fs: u64,
    ) -> Result<InitPlan> {
        let mut system = Vec::new();
        for name in SYSTEM_DIRS {
            let host = Path::new("/").join(name);
            match std::fs::symlink_metadata(&host) {
                Ok(m) if m.file_type().is_symlink() => {
                    let target = std::fs::read_link(&host).map_err(|e| {
                        HiveError::io(format!("reading link {}", host.display()), e)
                    })?;
                    system.push(SystemEntry::Symlink {
                        name: cstring(name.as_bytes())?,
                        target: path_cstring(&target)?,
                    });
                }
                Ok(m) if m.is_dir() => system.push(SystemEntry::Dir {
                    name: cstring(name.as_bytes())?,
                    host: path_cstring(&host)?,
                }),
                _ => {}
            }
        }
        let mut dev_host = Vec::new();
        for node in DEV_NODES {
            let host = format!("/dev/{node}");
            if std::fs::metadata(&host)
                .map(|m| m.file_type().is_char_device())
                .unwrap_or(false)
            {
                dev_host.push((
                    cstring(host.as_bytes())?,
                    cstring(format!("dev/{node}").as_bytes())?,
                ));
            }
        }
        let mut targets: Vec<String> = Vec::new();
        let mut planned = Vec::new();
        for m in &spec.mounts {
            let rel = target_rel(m)?;
            if targets.contains(&rel) {
                return Err(HiveError::InvalidArgument(format!(
                    "mount target {:?} is used twice",
                    m.target
                )));
            }
            let depth = rel.matches('/').count();
            planned.extend(plan_mount(m)?.into_iter().map(|p| (depth, p)));
            targets.push(rel);
        }
        // Configured mounts parents first, so a nested target lands on top of its parent; the
        // binds of one mount's subtrees right after its own mount point, parents first too.
        planned.sort_by_key(|(depth, m)| {
            (
                *depth,
                m.target_rel
                    .as_bytes()
                    .iter()
                    .filter(|b| **b == b'/')
                    .count(),
            )
        });
        let mounts: Vec<PlannedMount> = planned.into_iter().map(|(_, m)| m).collect();
        // A FUSE mount is served only after init is done: init cannot create mount points in it.
        for outer in mounts.iter().filter(|m| m.fuse) {
            if let Some(inner) = mounts
                .iter()
                .find(|m| nested(&outer.target_rel, &m.target_rel))
            {
                return Err(HiveError::InvalidArgument(format!(
                    "mount target /{} is inside /{}, which is served with per-file enforcement; \
                     mount it elsewhere",
                    inner.target_rel.to_string_lossy(),
                    outer.target_rel.to_string_lossy()
                )));
            }
        }
        let hidden = super::etc_scan::hidden()?;
        let mut hostname = spec.name.as_bytes().to_vec();
        hostname.truncate(64);
        let hosts = hosts_file(&hostname);
        Ok(InitPlan {
            hostname,
            proxy_port: spec.proxy_port,
            ctrl,
            landlock_fd,
            landlock_fs,
            system,
            etc_host: c"/etc".to_owned(),
            dev_host,
            mounts,
            hidden,
            ca_bundle: spec.ca_bundle_pem.clone(),
            ca_bundle_rel: cstring(CA_BUNDLE_PATH.trim_start_matches('/').as_bytes())?,
            ca_targets: CA_TARGETS
                .iter()
                .map(|t| cstring(t.as_bytes()))
                .collect::<Result<_>>()?,
            capture_ports: spec.capture_ports.clone(),
            etc_files: vec![
                etc_file("resolv.conf", RESOLV_CONF)?,
                etc_file("hosts", &hosts)?,
            ],
            image: -1,
            cgroup_join: [-1; super::limits::MAX_GROUPS],
        })
    }
}

/// The borrowed view of an [`InitPlan`] the setup child reads, and the scratch arrays it fills
/// (sized here, so the child never allocates).
pub(crate) struct SetupView<'a> {
    plan: &'a InitPlan,
    system: Vec<setup::SystemEntry<'a>>,
    dev_nodes: Vec<setup::DevNode<'a>>,
    mounts: Vec<setup::Mount<'a>>,
    hidden: Vec<setup::Hidden<'a>>,
    ca_targets: Vec<&'a CStr>,
    etc_files: Vec<setup::EtcFile<'a>>,
    source_fds: Vec<RawFd>,
    fuse_fds: Vec<RawFd>,
}

impl<'a> SetupView<'a> {
    /// Borrows `plan` (complete: idmapped trees, image and cgroup files filled in).
    pub(crate) fn new(plan: &'a InitPlan) -> SetupView<'a> {
        let system = plan
            .system
            .iter()
            .map(|e| match e {
                SystemEntry::Dir { name, host } => setup::SystemEntry::Dir { name, host },
                SystemEntry::Symlink { name, target } => {
                    setup::SystemEntry::Symlink { name, target }
                }
            })
            .collect();
        let dev_nodes = plan
            .dev_host
            .iter()
            .map(|(host, rel)| setup::DevNode { host, rel })
            .collect();
        let mounts = plan
            .mounts
            .iter()
            .map(|m| setup::Mount {
                source: &m.source,
                target_rel: &m.target_rel,
                mkdirs: m.mkdirs.view(),
                is_file: m.is_file,
                writable: m.writable,
                tree: m.tree,
                placeholder: m.placeholder,
                fuse: m.fuse,
            })
            .collect();
        let hidden = plan
            .hidden
            .iter()
            .map(|h| setup::Hidden {
                path: &h.path,
                is_dir: h.is_dir,
            })
            .collect();
        let etc_files = plan
            .etc_files
            .iter()
            .map(|f| setup::EtcFile {
                staged: &f.staged,
                staged_abs: &f.staged_abs,
                data: &f.data,
                target: match &f.target {
                    EtcTarget::Bind(target) => setup::EtcTarget::Bind(target),
                    EtcTarget::Symlink { mkdirs, link } => setup::EtcTarget::Symlink {
                        mkdirs: mkdirs.view(),
                        link,
                    },
                    EtcTarget::Skip => setup::EtcTarget::Skip,
                },
            })
            .collect();
        SetupView {
            plan,
            system,
            dev_nodes,
            mounts,
            hidden,
            ca_targets: plan.ca_targets.iter().map(CString::as_c_str).collect(),
            etc_files,
            // One per system entry, a spare, one per device node and per mount (see
            // `hive_launcher::setup::Plan::source_fds`).
            source_fds: vec![-1; plan.system.len() + 1 + plan.dev_host.len() + plan.mounts.len()],
            fuse_fds: vec![-1; plan.mounts.len()],
        }
    }

    /// The plan the setup child runs ([`hive_launcher::setup::run`]).
    pub(crate) fn plan(&mut self) -> setup::Plan<'_> {
        let p = self.plan;
        setup::Plan {
            hostname: &p.hostname,
            proxy_port: p.proxy_port,
            ctrl: p.ctrl,
            landlock_fd: p.landlock_fd,
            landlock_fs: p.landlock_fs,
            system: &self.system,
            etc_host: &p.etc_host,
            dev_nodes: &self.dev_nodes,
            mounts: &self.mounts,
            hidden: &self.hidden,
            ca_bundle: &p.ca_bundle,
            ca_bundle_rel: &p.ca_bundle_rel,
            ca_targets: &self.ca_targets,
            capture_ports: &p.capture_ports,
            etc_files: &self.etc_files,
            image: p.image,
            cgroup_join: &p.cgroup_join,
            source_fds: &mut self.source_fds,
            fuse_fds: &mut self.fuse_fds,
        }
    }
}

/// Whether `inner` lies strictly below `outer` (both relative, normalized).
fn nested(outer: &CStr, inner: &CStr) -> bool {
    let (outer, inner) = (outer.to_bytes(), inner.to_bytes());
    inner.len() > outer.len() && inner.starts_with(outer) && inner.get(outer.len()) == Some(&b'/')
}

/// A configured mount's target relative to the new root, validated: absolute, normalized, not
/// `/` and not inside a directory the launcher provides.
fn target_rel(m: &BindMount) -> Result<String> {
    let bad = |why: &str| HiveError::InvalidArgument(format!("mount target {:?}: {why}", m.target));
    let rel = m
        .target
        .strip_prefix('/')
        .ok_or_else(|| bad("must be an absolute path"))?
        .trim_end_matches('/');
    if rel.is_empty() {
        return Err(bad("cannot mount over /"));
    }
    let parts: Vec<&str> = rel.split('/').collect();
    if parts
        .iter()
        .any(|p| p.is_empty() || *p == "." || *p == "..")
    {
        return Err(bad("must be a normalized path without '.', '..' or '//'"));
    }
    if parts.first().is_some_and(|p| RESERVED_TOP.contains(p)) {
        return Err(bad("is inside a directory the sandbox provides itself"));
    }
    Ok(rel.to_owned())
}

/// Validates and resolves one configured mount into what init mounts for it.
///
/// Without subtrees (or served over FUSE): the whole source at the target. With subtrees
/// ([`BindMount::subtrees`]), only they are shown: one bind per subtree, read-only unless it is
/// writable, on directories made in the sandbox's read-only root (docs/isolation.md). A path
/// no subtree covers does not exist inside: it cannot be read, listed, written, `chmod`ed or
/// `utime`d, whether or not Landlock is there. A name on the way to a subtree is an empty
/// directory of that root; creating anything there answers `EROFS`.
fn plan_mount(m: &BindMount) -> Result<Vec<PlannedMount>> {
    let bad = |why: &str| HiveError::InvalidArgument(format!("mount target {:?}: {why}", m.target));
    let rel = target_rel(m)?;
    let source = std::fs::canonicalize(&m.source).map_err(|e| {
        HiveError::io(
            format!("mount source {} for {}", m.source.display(), m.target),
            e,
        )
    })?;
    let meta = std::fs::metadata(&source)
        .map_err(|e| HiveError::io(format!("mount source {}", source.display()), e))?;
    let is_file = meta.is_file();
    if !is_file && !meta.is_dir() {
        return Err(bad("source must be a directory or a regular file"));
    }
    if m.fuse && is_file {
        return Err(bad(
            "a mount served with per-file enforcement needs a directory source",
        ));
    }
    let mount = |below: &str, is_file: bool, writable: bool, placeholder: bool| -> Result<_> {
        let host = match below.trim_start_matches('/') {
            "" => source.clone(),
            rest => source.join(rest),
        };
        Ok(PlannedMount {
            source: path_cstring(&host)?,
            target_rel: cstring(format!("{rel}{below}").as_bytes())?,
            mkdirs: mount_point_dirs(&format!("{rel}{below}"), is_file)?,
            is_file,
            writable,
            tree: -1,
            placeholder,
            fuse: m.fuse,
        })
    };
    let subtrees = match (&m.subtrees, m.fuse) {
        (Some(subtrees), false) => subtrees,
        (_, true) => return Ok(vec![mount("", false, true, false)?]),
        (None, false) => return Ok(vec![mount("", is_file, m.writable, false)?]),
    };
    let mut below = subtrees
        .iter()
        .map(|t| {
            let rest = t
                .path
                .trim_end_matches('/')
                .strip_prefix(m.target.trim_end_matches('/'))
                .filter(|rest| rest.is_empty() || rest.starts_with('/'))
                .ok_or_else(|| bad(&format!("subtree {:?} is not under it", t.path)))?;
            if rest
                .split('/')
                .skip(1)
                .any(|p| p.is_empty() || p == "." || p == "..")
            {
                return Err(bad(&format!(
                    "subtree {:?} is not a normalized path",
                    t.path
                )));
            }
            Ok((rest, t.writable))
        })
        .collect::<Result<Vec<_>>>()?;
    below.sort();
    below.dedup();
    // A subtree inside another of the same access adds nothing (and its own bind would make a
    // rename between the two cross mounts).
    let kept: Vec<(&str, bool)> = below
        .iter()
        .filter(|(path, writable)| {
            !below
                .iter()
                .any(|(outer, w)| w == writable && nested_path(outer, path))
        })
        .copied()
        .collect();
    let mut planned = Vec::with_capacity(kept.len() + 1);
    if !kept.iter().any(|(path, _)| path.is_empty()) {
        planned.push(mount("", is_file, false, true)?);
    }
    for (path, writable) in kept {
        // Missing, a symlink on the way, or neither a directory nor a file: nothing is shown
        // there (it grants nothing).
        if let Some(file) = subtree_kind(&source, path) {
            planned.push(mount(path, file, writable, false)?);
        }
    }
    Ok(planned)
}

/// Whether `inner` lies strictly below `outer` (`""` is the mount's root; others start with `/`).
fn nested_path(outer: &str, inner: &str) -> bool {
    inner.len() > outer.len()
        && inner.starts_with(outer)
        && inner.as_bytes().get(outer.len()) == Some(&b'/')
}

/// `Some(is_file)` when `below` (`""` or `/a/b`) names a directory or a regular file under
/// `source` with no symlink on the way (`RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`: a subtree's
/// components are never the sandbox's to write, but the host's or another sandbox's may be).
fn subtree_kind(source: &Path, below: &str) -> Option<bool> {
    use rustix::fs::{openat2, Mode, OFlags, ResolveFlags};
    let root = openat2(
        rustix::fs::CWD,
        source,
        OFlags::PATH | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::NO_SYMLINKS,
    )
    .ok()?;
    let fd = match below.trim_start_matches('/') {
        "" => root,
        rel => openat2(
            &root,
            rel,
            OFlags::PATH | OFlags::CLOEXEC,
            Mode::empty(),
            ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS,
        )
        .ok()?,
    };
    let st = rustix::fs::fstat(&fd).ok()?;
    match rustix::fs::FileType::from_raw_mode(st.st_mode) {
        rustix::fs::FileType::Directory => Some(false),
        rustix::fs::FileType::RegularFile => Some(true),
        _ => None,
    }
}

/// The directories to create for a mount point at `rel`, parents first: every prefix, the
/// last one too unless the mount point is a file.
fn mount_point_dirs(rel: &str, is_file: bool) -> Result<PackedPaths> {
    let parts: Vec<&str> = rel.split('/').collect();
    let dirs = if is_file {
        parts.len() - 1
    } else {
        parts.len()
    };
    (1..=dirs)
        .map(|i| cstring(parts[..i].join("/").as_bytes()))
        .collect()
}

/// `PATH` used for the command lookup when the caller's env has none.
pub(crate) const DEFAULT_PATH: &str =
    "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// argv/envp/cwd/candidates for `p`; fds are filled in by the caller.
pub(crate) struct CommandStrings {
    pub argv: Vec<CString>,
    pub envp: Vec<CString>,
    pub cwd: CString,
    pub exec_candidates: Vec<CString>,
}

impl CommandStrings {
    /// Validates and converts a [`ProcessSpec`].
    pub(crate) fn build(p: &ProcessSpec) -> Result<CommandStrings> {
        let argv0 = p
            .argv
            .first()
            .filter(|a| !a.is_empty())
            .ok_or_else(|| HiveError::InvalidArgument("command must not be empty".into()))?;
        let nul = |what: &str| HiveError::InvalidArgument(format!("{what} contains a NUL byte"));
        let argv = p
            .argv
            .iter()
            .map(|a| CString::new(a.as_bytes()).map_err(|_| nul("an argument")))
            .collect::<Result<Vec<_>>>()?;
        let mut envp = Vec::with_capacity(p.env.len());
        for (k, v) in &p.env {
            if k.is_empty() || k.contains('=') {
                return Err(HiveError::InvalidArgument(format!(
                    "environment variable name {k:?} must be non-empty and contain no '='"
                )));
            }
            envp.push(CString::new(format!("{k}={v}")).map_err(|_| nul("the environment"))?);
        }
        let cwd = match &p.cwd {
            Some(c) if c.starts_with('/') => CString::new(c.as_bytes()).map_err(|_| nul("cwd"))?,
            Some(c) => {
                return Err(HiveError::InvalidArgument(format!(
                    "cwd {c:?} must be an absolute path inside the sandbox"
                )))
            }
            None => c"/".to_owned(),
        };
        let exec_candidates = if argv0.contains('/') {
            vec![CString::new(argv0.as_bytes()).map_err(|_| nul("the command"))?]
        } else {
            let path = p
                .env
                .iter()
                .rev()
                .find(|(k, _)| k == "PATH")
                .map(|(_, v)| v.as_str())
                .unwrap_or(DEFAULT_PATH);
            path.split(':')
                .map(|d| if d.is_empty() { "." } else { d })
                .map(|d| {
                    let joined = Path::new(d).join(OsStr::new(argv0));
                    CString::new(joined.as_os_str().as_bytes()).map_err(|_| nul("PATH"))
                })
                .collect::<Result<Vec<_>>>()?
        };
        Ok(CommandStrings {
            argv,
            envp,
            cwd,
            exec_candidates,
        })
    }
}

impl CommandStrings {
    /// `hive-init spawn <flags> <cwd> <n> <candidates..> <argv..>` (`hive_launcher::spawn`);
    /// `landlock`: a ruleset is passed in its slot.
    pub(crate) fn shim_argv(&self, landlock: bool, rlimits: &[(u32, u64)]) -> Vec<CString> {
        let mut v = Vec::with_capacity(6 + self.exec_candidates.len() + self.argv.len());
        v.push(c"hive-init".to_owned());
        v.push(c"spawn".to_owned());
        v.push(if landlock { c"1" } else { c"0" }.to_owned());
        let pairs: Vec<String> = rlimits
            .iter()
            .filter(|(_, value)| *value > 0)
            .map(|(resource, value)| format!("{resource}={value}"))
            .collect();
        let pairs = if pairs.is_empty() {
            "-".to_owned()
        } else {
            pairs.join(",")
        };
        v.push(CString::new(pairs).unwrap_or_default());
        v.push(self.cwd.clone());
        let n = CString::new(self.exec_candidates.len().to_string()).unwrap_or_default();
        v.push(n);
        v.extend(self.exec_candidates.iter().cloned());
        v.extend(self.argv.iter().cloned());
        v
    }
}

/// A NULL-terminated pointer array over `strings` (which must outlive it).
pub(crate) fn ptr_array(strings: &[CString]) -> Vec<*const libc::c_char> {
    strings
        .iter()
        .map(|s| s.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect()
}

#[cfg(test)]
mod unit {
    use super::super::Subtree;
    use super::*;

    fn mount(target: &str) -> BindMount {
        BindMount {
            source: "/tmp".into(),
            target: target.into(),
            ..Default::default()
        }
    }

    #[test]
    fn the_namespace_fds_are_opened_in_the_order_the_spawn_shim_joins_them() {
        let ours: Vec<u32> = NS_ORDER.iter().map(|(_, t)| *t as u32).collect();
        assert_eq!(ours, hive_launcher::spawn::NS_ORDER);
    }

    #[test]
    fn mount_targets_are_validated() {
        for (target, ok) in [
            ("/workspace", true),
            ("/data/sub", true),
            ("/tmp/x", true),
            ("workspace", false),   // relative
            ("/", false),           // the root itself
            ("/a/../etc", false),   // dot-dot
            ("/a//b", false),       // empty component
            ("/etc/passwd", false), // reserved: the sandbox provides /etc
            ("/proc", false),       // reserved
            ("/usr/local", false),  // reserved
        ] {
            assert_eq!(plan_mount(&mount(target)).is_ok(), ok, "{target}");
        }
    }

    #[test]
    fn a_target_used_twice_is_rejected() {
        let spec = LaunchSpec {
            name: "t".into(),
            mounts: vec![mount("/w"), mount("/w/")],
            ca_bundle_pem: vec![],
            proxy_port: 3128,
            capture_ports: Vec::new(),
        };
        assert!(InitPlan::build(&spec, -1, -1, 0).is_err());
    }

    #[test]
    fn the_setup_childs_view_lends_every_part_of_the_plan_and_sizes_its_scratch() {
        let spec = LaunchSpec {
            name: "view".into(),
            mounts: vec![
                mount("/data/a"),
                BindMount {
                    fuse: true,
                    ..mount("/acl")
                },
            ],
            ca_bundle_pem: b"pem".to_vec(),
            proxy_port: 3128,
            capture_ports: vec![80, 443],
        };
        let mut plan = InitPlan::build(&spec, 7, -1, 0).expect("plan");
        plan.image = 9;
        plan.cgroup_join[0] = 11;
        let (systems, devs) = (plan.system.len(), plan.dev_host.len());
        let mut view = SetupView::new(&plan);
        let p = view.plan();
        assert_eq!((p.hostname, p.proxy_port, p.ctrl), (&b"view"[..], 3128, 7));
        assert_eq!((p.image, p.cgroup_join.first()), (9, Some(&11)));
        assert_eq!(
            (p.ca_bundle, p.capture_ports),
            (&b"pem"[..], &[80, 443][..])
        );
        assert_eq!((p.system.len(), p.dev_nodes.len()), (systems, devs));
        assert_eq!(p.ca_targets.len(), CA_TARGETS.len());
        assert_eq!(p.etc_files.len(), 2);
        let mounts: Vec<_> = p
            .mounts
            .iter()
            .map(|m| {
                let dirs: Vec<_> = m.mkdirs.iter().map(|d| d.to_str().unwrap_or("?")).collect();
                (m.target_rel.to_str().unwrap_or("?"), dirs, m.fuse)
            })
            .collect();
        assert_eq!(
            mounts,
            [
                ("acl", vec!["acl"], true),
                ("data/a", vec!["data", "data/a"], false)
            ]
        );
        // One source slot per system entry, a spare, one per device node and mount; one FUSE
        // slot per mount; none filled yet.
        assert_eq!(p.source_fds.len(), systems + 1 + devs + 2);
        assert_eq!(p.fuse_fds, [-1, -1]);
        assert!(p.source_fds.iter().all(|fd| *fd == -1));
    }

    #[test]
    fn nested_targets_create_their_parents() {
        let planned = plan_mount(&mount("/data/a/b")).expect("valid");
        let [m] = planned.as_slice() else {
            panic!("one mount")
        };
        let dirs: Vec<_> = m
            .mkdirs
            .iter()
            .map(|c| c.to_str().unwrap_or("").to_owned())
            .collect();
        assert_eq!(dirs, ["data", "data/a", "data/a/b"]);
        assert_eq!(m.target_rel.to_str().ok(), Some("data/a/b"));
    }

    #[test]
    fn subtrees_become_binds_on_a_placeholder_and_nothing_else_of_the_source_is_mounted() {
        let src = tempfile::tempdir().expect("tempdir");
        for dir in ["a/in", "b", "c", "private"] {
            std::fs::create_dir_all(src.path().join(dir)).expect("seed");
        }
        std::fs::write(src.path().join("f.txt"), "f").expect("seed");
        // A planted symlink must not carry a subtree to somewhere else.
        std::os::unix::fs::symlink("private", src.path().join("linked")).expect("seed");
        let sub = |path: &str, writable| Subtree {
            path: path.into(),
            writable,
        };
        let m = BindMount {
            source: src.path().into(),
            target: "/ws".into(),
            writable: true,
            subtrees: Some(vec![
                sub("/ws/a", true),
                sub("/ws/a/in", true), // inside a subtree of the same access: adds nothing
                sub("/ws/b", false),
                sub("/ws/linked", true),  // a symlink: shown nowhere
                sub("/ws/missing", true), // does not exist: shown nowhere
                sub("/ws/f.txt", false),  // a file
            ]),
            fuse: false,
        };
        let show = |p: &PlannedMount| {
            format!(
                "{} {}{}{}",
                p.target_rel.to_string_lossy(),
                if p.placeholder {
                    "placeholder"
                } else if p.writable {
                    "rw"
                } else {
                    "ro"
                },
                if p.is_file { " file" } else { "" },
                if p.placeholder {
                    String::new()
                } else {
                    format!(
                        " from {}",
                        p.source
                            .to_string_lossy()
                            .strip_prefix(&*src.path().to_string_lossy())
                            .unwrap_or("?")
                    )
                },
            )
        };
        let planned: Vec<String> = plan_mount(&m).expect("valid").iter().map(show).collect();
        assert_eq!(
            planned,
            [
                "ws placeholder",
                "ws/a rw from /a",
                "ws/b ro from /b",
                "ws/f.txt ro file from /f.txt",
            ]
        );
        // A subtree at the mount's root: the whole source, no placeholder.
        let whole = BindMount {
            subtrees: Some(vec![sub("/ws", false), sub("/ws/b", false)]),
            ..m.clone()
        };
        let planned: Vec<String> = plan_mount(&whole)
            .expect("valid")
            .iter()
            .map(show)
            .collect();
        assert_eq!(planned, ["ws ro from "]);
        // No subtree at all (every rule is `none`): only the empty mount point.
        let nothing = BindMount {
            subtrees: Some(vec![]),
            ..m
        };
        let planned: Vec<String> = plan_mount(&nothing)
            .expect("valid")
            .iter()
            .map(show)
            .collect();
        assert_eq!(planned, ["ws placeholder"]);
    }

    #[test]
    fn command_lookup_follows_path_or_slash() {
        let spec = |argv0: &str, path: Option<&str>| ProcessSpec {
            argv: vec![argv0.into()],
            env: path
                .map(|p| vec![("PATH".to_string(), p.to_string())])
                .unwrap_or_default(),
            cwd: None,
        };
        let c = |s: &CommandStrings| {
            s.exec_candidates
                .iter()
                .map(|c| c.to_str().unwrap_or("").to_owned())
                .collect::<Vec<_>>()
        };
        let s = CommandStrings::build(&spec("/bin/true", None)).expect("valid");
        assert_eq!(c(&s), ["/bin/true"]);
        let s = CommandStrings::build(&spec("true", Some("/a:/b"))).expect("valid");
        assert_eq!(c(&s), ["/a/true", "/b/true"]);
        assert!(CommandStrings::build(&spec("", None)).is_err());
    }

    #[test]
    fn bad_env_and_cwd_are_rejected() {
        let mut p = ProcessSpec {
            argv: vec!["true".into()],
            env: vec![],
            cwd: Some("rel".into()),
        };
        assert!(CommandStrings::build(&p).is_err());
        p.cwd = None;
        p.env = vec![("A=B".into(), "x".into())];
        assert!(CommandStrings::build(&p).is_err());
        p.env = vec![("A".into(), "x\0y".into())];
        assert!(CommandStrings::build(&p).is_err());
    }

    #[test]
    fn etc_symlinks_resolve_to_where_the_generated_file_goes() {
        let show = |t: EtcTarget| match t {
            EtcTarget::Bind(p) => format!("bind {}", p.to_string_lossy()),
            EtcTarget::Symlink { mkdirs, link } => format!(
                "symlink {} after {:?}",
                link.to_string_lossy(),
                mkdirs
                    .iter()
                    .map(|d| d.to_string_lossy().into_owned())
                    .collect::<Vec<_>>()
            ),
            EtcTarget::Skip => "skip".into(),
        };
        for (link, want) in [
            (
                "../run/systemd/resolve/stub-resolv.conf",
                r#"symlink /run/systemd/resolve/stub-resolv.conf after ["/run/systemd", "/run/systemd/resolve"]"#,
            ),
            ("/run/resolv.conf", "symlink /run/resolv.conf after []"),
            ("../run/hive/resolv.conf", "skip"),
            ("../usr/lib/resolv.conf", "bind /usr/lib/resolv.conf"),
            (
                "resolvconf/run/resolv.conf",
                "bind /etc/resolvconf/run/resolv.conf",
            ),
            ("../../../home/user/resolv.conf", "skip"),
            ("/var/run/resolv.conf", "skip"),
        ] {
            let resolved = resolve_link(Path::new("/etc"), Path::new(link));
            assert_eq!(
                show(link_target(&resolved).expect("target")),
                want,
                "{link}"
            );
        }
    }
}
