//! The host index of a compiled policy: which rules could match a given host, found without
//! scanning the whole rule list.
//!
//! How it works:
//! 1. at compile time each rule goes into one bucket by its host pattern: exact hostnames into a
//!    map `host -> rule indices`, `*.apex` rules into a map `apex -> rule indices`, and `*` and
//!    IP/CIDR rules (which need the address, not the name) into one short general list;
//! 2. at decision time the candidates for a host are the exact bucket of the host, the suffix
//!    buckets of each of its label suffixes (`a.b.example.com`, `b.example.com`, `example.com`,
//!    `com`) and the general list. Every bucket is in rule order;
//! 3. the caller takes the first match of each bucket and keeps the smallest index, which is the
//!    first match over all rules: "first match wins" (SPEC §2) without merging.
//!
//! A decision therefore costs a handful of hash lookups plus the rules naming that host, however
//! many rules there are for other hosts.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use crate::config::{EgressRule, HostPattern};

/// Rule indices in rule order.
pub(super) type Bucket = Vec<usize>;

/// Rules grouped by host pattern (see the module docs).
#[derive(Debug, Clone, Default)]
pub(super) struct HostIndex {
    exact: HashMap<Box<str>, Bucket, FastHash>,
    suffix: HashMap<Box<str>, Bucket, FastHash>,
    general: Bucket,
}

impl HostIndex {
    /// Builds the index of `rules`.
    pub(super) fn build(rules: &[EgressRule]) -> HostIndex {
        let mut index = HostIndex::default();
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
                HostPattern::Any | HostPattern::Net(_) => index.general.push(i),
            }
        }
        index
    }

    /// Calls `f` with every bucket that may hold rules matching `host` (normalized). The general
    /// bucket (`*` and IP/CIDR rules) comes last and still needs a host check by the caller; rules
    /// of the other buckets match `host` by construction.
    pub(super) fn for_each_bucket<'a>(&'a self, host: &str, mut f: impl FnMut(&'a [usize], bool)) {
        if let Some(bucket) = self.exact.get(host) {
            f(bucket, false);
        }
        if !self.suffix.is_empty() {
            let mut rest = host;
            loop {
                if let Some(bucket) = self.suffix.get(rest) {
                    f(bucket, false);
                }
                match rest.find('.') {
                    Some(dot) => rest = &rest[dot + 1..],
                    None => break,
                }
            }
        }
        if !self.general.is_empty() {
            f(&self.general, true);
        }
    }

    /// The `*` and IP/CIDR rules, in order.
    pub(super) fn general(&self) -> &[usize] {
        &self.general
    }
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
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }

    #[inline]
    fn finish(&self) -> u64 {
        self.hash
    }
}
