//! Streaming replacement of secret values in response bytes (docs/secrets.md#response-scrubbing).
//!
//! How it works:
//! 1. [`Patterns`] is built once per config: every value to hide, with what replaces it (the
//!    secret's placeholder, or `[redacted]` for an inline override value), as one Aho-Corasick
//!    automaton (leftmost-longest, so a value that contains another is replaced whole).
//! 2. A [`Scrubber`] scans one response: each chunk is appended to a carry-over of at most
//!    `longest value - 1` bytes from the previous chunk; everything up to where a value could
//!    still begin is written out with matches replaced; the rest is carried. A value split across
//!    chunks (or TCP writes) is therefore still found, and memory stays at one chunk plus the
//!    carry.
//! 3. [`Scrubber::finish`] writes the carry out at the end of the body.

use std::sync::Arc;

use aho_corasick::{AhoCorasick, AhoCorasickBuilder, MatchKind};

/// The values to hide and their replacements.
pub struct Patterns {
    automaton: AhoCorasick,
    replacements: Vec<Box<[u8]>>,
    /// What the `secret.scrubbed` event names for each pattern.
    labels: Vec<Arc<str>>,
    longest: usize,
}

impl std::fmt::Debug for Patterns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Patterns")
            .field("labels", &self.labels)
            .finish_non_exhaustive()
    }
}

impl Patterns {
    /// Builds the automaton over `(value, replacement, label)`; `None` when there is nothing to
    /// hide. Empty values are skipped.
    pub fn new<'a>(
        items: impl IntoIterator<Item = (&'a [u8], &'a [u8], Arc<str>)>,
    ) -> Option<Patterns> {
        let mut values = Vec::new();
        let mut replacements = Vec::new();
        let mut labels = Vec::new();
        for (value, replacement, label) in items {
            if value.is_empty() {
                continue;
            }
            values.push(value);
            replacements.push(Box::from(replacement));
            labels.push(label);
        }
        let longest = values.iter().map(|v| v.len()).max()?;
        let automaton = AhoCorasickBuilder::new()
            .match_kind(MatchKind::LeftmostLongest)
            .build(&values)
            .ok()?;
        Some(Patterns {
            automaton,
            replacements,
            labels,
            longest,
        })
    }

    /// The label of pattern `i`.
    pub fn label(&self, i: usize) -> &Arc<str> {
        &self.labels[i]
    }

    /// How many patterns there are.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether there are none (never true for a built set).
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Whether `bytes` contain any value.
    pub fn is_match(&self, bytes: &[u8]) -> bool {
        self.automaton.is_match(bytes)
    }

    /// `bytes` with every value replaced, counting into `counts` (one slot per pattern).
    pub fn replace_all(&self, bytes: &[u8], counts: &mut [u64]) -> Vec<u8> {
        let mut out = Vec::with_capacity(bytes.len());
        let end = self.write_until(bytes, bytes.len(), counts, &mut out);
        out.extend_from_slice(&bytes[end..]);
        out
    }

    /// Writes `bytes` to `out` with matches that start before `limit` replaced, stopping at
    /// `limit` or at the end of the last such match, whichever is later; returns where it stopped.
    fn write_until(
        &self,
        bytes: &[u8],
        limit: usize,
        counts: &mut [u64],
        out: &mut Vec<u8>,
    ) -> usize {
        let mut at = 0;
        for m in self.automaton.find_iter(bytes) {
            if m.start() >= limit {
                break;
            }
            out.extend_from_slice(&bytes[at..m.start()]);
            out.extend_from_slice(&self.replacements[m.pattern().as_usize()]);
            counts[m.pattern().as_usize()] += 1;
            at = m.end();
        }
        let stop = at.max(limit);
        out.extend_from_slice(&bytes[at..stop]);
        stop
    }
}

/// The scrubbing state of one response body.
pub struct Scrubber {
    patterns: Arc<Patterns>,
    carry: Vec<u8>,
    counts: Vec<u64>,
}

impl Scrubber {
    /// A scrubber over `patterns`.
    pub fn new(patterns: Arc<Patterns>) -> Scrubber {
        let counts = vec![0; patterns.len()];
        Scrubber {
            patterns,
            carry: Vec::new(),
            counts,
        }
    }

    /// Scrubs the next chunk, appending what is safe to deliver to `out`.
    pub fn push(&mut self, chunk: &[u8], out: &mut Vec<u8>) {
        let keep = self.patterns.longest - 1;
        let joined: std::borrow::Cow<'_, [u8]> = if self.carry.is_empty() {
            chunk.into()
        } else {
            let mut j = std::mem::take(&mut self.carry);
            j.extend_from_slice(chunk);
            j.into()
        };
        if joined.len() <= keep {
            self.carry = joined.into_owned();
            return;
        }
        let limit = joined.len() - keep;
        let stop = self
            .patterns
            .write_until(&joined, limit, &mut self.counts, out);
        self.carry.clear();
        self.carry.extend_from_slice(&joined[stop..]);
    }

    /// Writes out the carry at the end of the body.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        let carry = std::mem::take(&mut self.carry);
        let end = self
            .patterns
            .write_until(&carry, carry.len(), &mut self.counts, out);
        out.extend_from_slice(&carry[end..]);
    }

    /// Adds header matches (counted by [`Patterns::replace_all`]) to this body's counts.
    pub fn add_counts(&mut self, counts: &[u64]) {
        for (a, b) in self.counts.iter_mut().zip(counts) {
            *a += b;
        }
    }

    /// (label, count) for each value found so far, counts of one label summed.
    pub fn found(&self) -> Vec<(Arc<str>, u64)> {
        let mut out: Vec<(Arc<str>, u64)> = Vec::new();
        for (i, &n) in self.counts.iter().enumerate() {
            if n == 0 {
                continue;
            }
            let label = self.patterns.label(i);
            match out.iter_mut().find(|(l, _)| l == label) {
                Some(slot) => slot.1 += n,
                None => out.push((label.clone(), n)),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALUE: &[u8] = b"sk-live-0123456789";
    const PH: &[u8] = b"hive_ph_aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

    fn patterns() -> Arc<Patterns> {
        Arc::new(
            Patterns::new([
                (VALUE, PH, Arc::from("OPENAI_KEY")),
                (
                    &b"Bearer inline-secret"[..],
                    &b"[redacted]"[..],
                    Arc::from("header:authorization"),
                ),
            ])
            .unwrap(),
        )
    }

    fn scrub_chunks(chunks: &[&[u8]]) -> (Vec<u8>, Vec<(Arc<str>, u64)>) {
        let mut s = Scrubber::new(patterns());
        let mut out = Vec::new();
        for c in chunks {
            s.push(c, &mut out);
        }
        s.finish(&mut out);
        (out, s.found())
    }

    fn body() -> Vec<u8> {
        let mut b = b"{\"headers\":{\"authorization\":\"Bearer ".to_vec();
        b.extend_from_slice(VALUE);
        b.extend_from_slice(b"\"},\"echo\":\"");
        b.extend_from_slice(VALUE);
        b.extend_from_slice(VALUE);
        b.extend_from_slice(b"\",\"x\":\"Bearer inline-secret\",\"tail\":\"sk-live-012345678\"}");
        b
    }

    fn expected() -> Vec<u8> {
        String::from_utf8(body())
            .unwrap()
            .replace(
                std::str::from_utf8(VALUE).unwrap(),
                std::str::from_utf8(PH).unwrap(),
            )
            .replace("Bearer inline-secret", "[redacted]")
            .into_bytes()
    }

    #[test]
    fn whole_body() {
        let (out, found) = scrub_chunks(&[&body()]);
        assert_eq!(out, expected());
        assert_eq!(
            found,
            vec![
                (Arc::from("OPENAI_KEY"), 3),
                (Arc::from("header:authorization"), 1)
            ]
        );
    }

    // A value split across two chunks at every offset of the body is still replaced.
    #[test]
    fn split_at_every_offset() {
        let body = body();
        for cut in 0..=body.len() {
            let (out, found) = scrub_chunks(&[&body[..cut], &body[cut..]]);
            assert_eq!(out, expected(), "cut at {cut}");
            assert_eq!(found.iter().map(|f| f.1).sum::<u64>(), 4, "cut at {cut}");
        }
    }

    // Three-way splits around the value, and one byte at a time.
    #[test]
    fn split_many_ways() {
        let body = body();
        for a in 0..body.len() {
            for b in [a + 1, a + 5, a + VALUE.len(), a + VALUE.len() + 1] {
                let b = b.min(body.len());
                let (out, _) = scrub_chunks(&[&body[..a], &body[a..b], &body[b..]]);
                assert_eq!(out, expected(), "cuts at {a}, {b}");
            }
        }
        let bytes: Vec<&[u8]> = body.chunks(1).collect();
        assert_eq!(scrub_chunks(&bytes).0, expected());
    }

    // Memory: the carry never exceeds the longest value.
    #[test]
    fn carry_is_bounded() {
        let mut s = Scrubber::new(patterns());
        let mut out = Vec::new();
        for _ in 0..1000 {
            s.push(&[b'x'; 4096], &mut out);
            assert!(s.carry.len() < "Bearer inline-secret".len());
        }
        s.finish(&mut out);
        assert_eq!(out.len(), 4096 * 1000);
    }

    #[test]
    fn nothing_to_hide() {
        assert!(Patterns::new([(&b""[..], &b"x"[..], Arc::from("A"))]).is_none());
        let (out, found) = scrub_chunks(&[b"plain text", b" only"]);
        assert_eq!(out, b"plain text only");
        assert!(found.is_empty());
    }
}
