//! The host index of a compiled policy: which rules could match a given host, found without
//! scanning the whole rule list.
//!
//! How it works:
//! 1. at compile time each rule goes into one bucket by its host pattern: exact hostnames into a
//!    map `host -> rule indices`, `*.apex` rules into a map `apex -> rule indices`, IP/CIDR rules
//!    into one map per prefix length `network address -> rule indices`, and `*` rules into a list;
//! 2. at decision time the candidates for a host are the exact bucket of the host, the suffix
//!    buckets of each of its label suffixes (`a.b.example.com`, `b.example.com`, `example.com`,
//!    `com`), for the host's address (if it is an IP literal) and the address the proxy connects
//!    to one network bucket per prefix length in use, and the `*` list. Every bucket is in rule
//!    order, and every rule in a bucket matches the host by construction;
//! 3. the caller takes the first match of each bucket and keeps the smallest index, which is the
//!    first match over all rules: "first match wins" (docs/network-access.md) without merging.
//!
//! A decision therefore costs a handful of hash lookups plus the rules naming that host, however
//! many rules there are for other hosts.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::net::IpAddr;

use crate::config::{EgressRule, HostPattern, RuleAccess};

/// Rule indices in rule order.
pub(super) type Bucket = Vec<usize>;

/// Rules grouped by host pattern (see the module docs).
#[derive(Debug, Clone, Default)]
pub(super) struct HostIndex {
    exact: HashMap<Box<str>, Bucket, FastHash>,
    suffix: HashMap<Box<str>, Bucket, FastHash>,
    /// IPv4 rules: one map per prefix length in use, keyed by network address.
    v4: Vec<(u8, HashMap<u32, Bucket, FastHash>)>,
    /// IPv6 rules, likewise.
    v6: Vec<(u8, HashMap<u128, Bucket, FastHash>)>,
    /// `*` rules.
    any: Bucket,
    /// The first allow rule with an IP/CIDR host (`usize::MAX`: none): such a rule could allow any
    /// name, through the address it resolves to.
    first_net_allow: usize,
}

impl HostIndex {
    /// Builds the index of `rules`.
    pub(super) fn build(rules: &[EgressRule]) -> HostIndex {
        let mut index = HostIndex {
            first_net_allow: usize::MAX,
            ..HostIndex::default()
        };
        for (i, rule) in rules.iter().enumerate() {
            match &rule.host {
                HostPattern::Exact(host) => {
                    index.exact.entry(host.as_str().into()).or_default().push(i)
                }
                HostPattern::Suffix(apex) => index
                    .suffix
                    .entry(apex.as_str().into())
                    .or_default()
                    .push(i),
                HostPattern::Any => index.any.push(i),
                HostPattern::Net(net) => {
                    if rule.access == RuleAccess::Allow {
                        index.first_net_allow = index.first_net_allow.min(i);
                    }
                    let len = net.prefix_len();
                    match net.network() {
                        IpAddr::V4(a) => by_len(&mut index.v4, len)
                            .entry(u32::from(a))
                            .or_default()
                            .push(i),
                        IpAddr::V6(a) => by_len(&mut index.v6, len)
                            .entry(u128::from(a))
                            .or_default()
                            .push(i),
                    }
                }
            }
        }
        index
    }

    /// Calls `f` with every bucket of rules whose host matches `host` (normalized) or one of the
    /// canonical addresses in `ips` (the host's own, if it is an IP literal, and the connect
    /// address). A rule may come up twice (once per address); callers take the minimum.
    pub(super) fn for_each_bucket<'a>(
        &'a self,
        host: &str,
        ips: [Option<IpAddr>; 2],
        mut f: impl FnMut(&'a [usize]),
    ) {
        if let Some(bucket) = self.exact.get(host) {
            f(bucket);
        }
        if !self.suffix.is_empty() {
            let mut rest = host;
            loop {
                if let Some(bucket) = self.suffix.get(rest) {
                    f(bucket);
                }
                match rest.find('.') {
                    Some(dot) => rest = &rest[dot + 1..],
                    None => break,
                }
            }
        }
        for ip in ips.into_iter().flatten() {
            self.for_each_net_bucket(ip, &mut f);
        }
        if !self.any.is_empty() {
            f(&self.any);
        }
    }

    /// Calls `f` with every bucket of IP/CIDR rules containing `ip` (canonical).
    pub(super) fn for_each_net_bucket<'a>(&'a self, ip: IpAddr, f: &mut impl FnMut(&'a [usize])) {
        match ip {
            IpAddr::V4(a) => {
                let a = u32::from(a);
                for (len, map) in &self.v4 {
                    let mask = u32::MAX.checked_shl(32 - u32::from(*len)).unwrap_or(0);
                    if let Some(bucket) = map.get(&(a & mask)) {
                        f(bucket);
                    }
                }
            }
            IpAddr::V6(a) => {
                let a = u128::from(a);
                for (len, map) in &self.v6 {
                    let mask = u128::MAX.checked_shl(128 - u32::from(*len)).unwrap_or(0);
                    if let Some(bucket) = map.get(&(a & mask)) {
                        f(bucket);
                    }
                }
            }
        }
    }

    /// Whether any rule has an IP/CIDR host.
    pub(super) fn has_nets(&self) -> bool {
        !self.v4.is_empty() || !self.v6.is_empty()
    }

    /// The first allow rule with an IP/CIDR host, if any.
    pub(super) fn first_net_allow(&self) -> Option<usize> {
        (self.first_net_allow != usize::MAX).then_some(self.first_net_allow)
    }
}

/// The map for prefix length `len`, created on first use.
fn by_len<K>(
    maps: &mut Vec<(u8, HashMap<K, Bucket, FastHash>)>,
    len: u8,
) -> &mut HashMap<K, Bucket, FastHash> {
    let at = match maps.iter().position(|(l, _)| *l == len) {
        Some(at) => at,
        None => {
            maps.push((len, HashMap::default()));
            maps.len() - 1
        }
    };
    &mut maps[at].1
}

/// FxHash (rustc's hasher): a few cycles per word instead of SipHash's rounds.
///
/// # Security
/// Not collision-resistant, which is fine here: the keys are the config's hostnames, chosen by the
/// host program. A sandboxed client only looks keys up, and a lookup costs at most the probe length
/// the config's own keys produce, whatever string it asks for.
type FastHash = BuildHasherDefault<FxHasher>;

#[derive(Default, Clone, Copy)]
pub(super) struct FxHasher {
    hash: u64,
}

const FX_SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

impl FxHasher {
    #[inline]
    fn add(&mut self, word: u64) {
        self.hash = (self.hash.rotate_left(5) ^ word).wrapping_mul(FX_SEED);
    }
}

impl Hasher for FxHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut word = [0u8; 8];
            word[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(word));
        }
    }

    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }

    #[inline]
    fn write_u32(&mut self, i: u32) {
        self.add(u64::from(i));
    }

    #[inline]
    fn write_u128(&mut self, i: u128) {
        self.add(i as u64);
        self.add((i >> 64) as u64);
    }

    #[inline]
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }

    #[inline]
    fn finish(&self) -> u64 {
        self.hash
    }
}
