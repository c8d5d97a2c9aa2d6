//! [`Placeholders`]: the opaque token a sandbox's processes see instead of a secret's value.
//!
//! A placeholder is `hive_ph_` followed by 32 base32 characters (160 random bits), drawn the first
//! time a sandbox needs one for a name and kept for the sandbox's lifetime, so a process started
//! before a rotation keeps working. Another sandbox draws its own.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;

/// What every placeholder starts with.
pub const PLACEHOLDER_PREFIX: &str = "hive_ph_";
/// Length of a whole placeholder.
pub const PLACEHOLDER_LEN: usize = PLACEHOLDER_PREFIX.len() + 32;

/// RFC 4648 base32 in lowercase (placeholders survive case-folding tools unchanged only when
/// they are not folded; lowercase is what environment values usually keep).
const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";

/// The placeholders of one sandbox, by secret name.
#[derive(Default)]
pub struct Placeholders {
    by_name: Mutex<HashMap<String, Arc<str>>>,
}

impl std::fmt::Debug for Placeholders {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Placeholders").finish_non_exhaustive()
    }
}

impl Placeholders {
    /// The placeholder for `name`, drawn on first use.
    pub fn get(&self, name: &str) -> Arc<str> {
        self.by_name
            .lock()
            .entry(name.to_string())
            .or_insert_with(draw)
            .clone()
    }
}

/// A fresh random placeholder.
fn draw() -> Arc<str> {
    let mut random = [0u8; 20];
    if getrandom::fill(&mut random).is_err() {
        // The OS source does not fail on Linux after boot; should it, std's per-process random
        // hash keys (themselves OS-seeded) still make the token unguessable from inside.
        use std::hash::{BuildHasher, Hasher};
        for (i, chunk) in random.chunks_mut(8).enumerate() {
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_usize(i);
            h.write_u128(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos()),
            );
            let bytes = h.finish().to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }
    let mut out = String::with_capacity(PLACEHOLDER_LEN);
    out.push_str(PLACEHOLDER_PREFIX);
    // 20 bytes = 160 bits = 32 groups of 5 bits.
    let mut acc: u64 = 0;
    let mut bits = 0;
    for byte in random {
        acc = (acc << 8) | u64::from(byte);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(ALPHABET[((acc >> bits) & 31) as usize] as char);
        }
    }
    out.into()
}

/// Whether `text` is a whole placeholder (prefix and 32 base32 characters).
pub fn is_placeholder(text: &[u8]) -> bool {
    text.len() == PLACEHOLDER_LEN
        && text.starts_with(PLACEHOLDER_PREFIX.as_bytes())
        && text[PLACEHOLDER_PREFIX.len()..]
            .iter()
            .all(|b| ALPHABET.contains(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stable_per_name_and_distinct_across_sandboxes() {
        let (a, b) = (Placeholders::default(), Placeholders::default());
        let first = a.get("OPENAI_KEY");
        assert!(is_placeholder(first.as_bytes()), "{first}");
        assert_eq!(a.get("OPENAI_KEY"), first);
        assert_ne!(a.get("OTHER"), first);
        assert_ne!(b.get("OPENAI_KEY"), first);
    }
}
