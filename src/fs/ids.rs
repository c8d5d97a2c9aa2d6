//! Maps keyed by the ids the server hands out itself (node ids, file handles), hashed by one
//! multiplication instead of SipHash: a listing of 50 000 entries remembers 50 000 nodes, and
//! SipHash of their ids was a tenth of the server's time in it (docs/decisions.md, "FUSE server
//! CPU per request"). The ids come from a counter, never from the sandbox, so no one can choose
//! keys that collide; maps keyed by names keep the standard, randomly keyed hasher.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// A map keyed by a server-assigned id.
pub(crate) type IdMap<V> = HashMap<u64, V, BuildHasherDefault<IdHasher>>;

/// Fibonacci hashing of a `u64`: an odd multiplier maps the low bits of consecutive ids to
/// distinct buckets and mixes them into the high bits the table's tags are taken from.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct IdHasher(u64);

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write_u64(&mut self, id: u64) {
        self.0 = (self.0 ^ id).wrapping_mul(GOLDEN);
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `u64` keys are used; anything else still hashes, byte by byte.
        for &byte in bytes {
            self.write_u64(u64::from(byte));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consecutive_ids_spread_over_buckets_and_tags() {
        use std::collections::HashSet;
        use std::hash::BuildHasher;
        let build = BuildHasherDefault::<IdHasher>::default();
        let hashes: Vec<u64> = (1..=4096u64).map(|id| build.hash_one(id)).collect();
        // every id its own bucket in a table of 4096 (low bits) ...
        let buckets: HashSet<u64> = hashes.iter().map(|h| h & 4095).collect();
        assert_eq!(buckets.len(), 4096);
        // ... and the 7-bit tags (high bits) all in use
        let tags: HashSet<u64> = hashes.iter().map(|h| h >> 57).collect();
        assert_eq!(tags.len(), 128);
        let mut map = IdMap::default();
        for id in 1..=100_000u64 {
            map.insert(id, id);
        }
        assert!((1..=100_000u64).all(|id| map.get(&id) == Some(&id)));
    }
}
