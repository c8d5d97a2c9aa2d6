//! Streaming decoders for the response codings a scrubbed body may arrive in (`gzip`, `deflate`,
//! `br`, `zstd`; RFC 9110 §8.4.1): the body is decoded to be scanned and delivered decoded.
//!
//! Input is fed in small slices and the decoded bytes taken after each one, so one slice of a
//! highly compressed body (a "zip bomb") can expand to at most `SLICE` times the coding's ratio
//! before it is scrubbed and passed on.

use std::io::Write;

/// Compressed bytes fed to a decoder at a time.
const SLICE: usize = 1024;

/// A `Content-Encoding` the scrubber cannot decode (unknown, or several stacked).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnknownEncoding;

/// A content coding the scrubber can decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Gzip,
    Deflate,
    Brotli,
    Zstd,
}

impl Encoding {
    /// Reads a `Content-Encoding` value: `Ok(None)` for none or `identity`, `Ok(Some(..))` for one
    /// supported coding, an error for anything else (an unknown or stacked coding).
    pub fn parse(value: Option<&[u8]>) -> Result<Option<Encoding>, UnknownEncoding> {
        let Some(value) = value else {
            return Ok(None);
        };
        let text = std::str::from_utf8(value)
            .map_err(|_| UnknownEncoding)?
            .trim();
        let lower = text.to_ascii_lowercase();
        match lower.as_str() {
            "" | "identity" => Ok(None),
            "gzip" | "x-gzip" => Ok(Some(Encoding::Gzip)),
            "deflate" => Ok(Some(Encoding::Deflate)),
            "br" => Ok(Some(Encoding::Brotli)),
            "zstd" => Ok(Some(Encoding::Zstd)),
            _ => Err(UnknownEncoding),
        }
    }
}

/// One body's decoder.
pub enum Decoder {
    Gzip(flate2::write::MultiGzDecoder<Vec<u8>>),
    /// `deflate` is zlib-wrapped per RFC 9110, but some servers send raw deflate: the first two
    /// bytes tell (held in the `Vec` until they arrive).
    Deflate(Result<DeflateKind, Vec<u8>>),
    Brotli(Box<brotli_decompressor::DecompressorWriter<Vec<u8>>>),
    Zstd(Box<zstd::stream::write::Decoder<'static, Vec<u8>>>),
}

/// The two forms of `deflate`.
pub enum DeflateKind {
    Zlib(flate2::write::ZlibDecoder<Vec<u8>>),
    Raw(flate2::write::DeflateDecoder<Vec<u8>>),
}

impl Decoder {
    /// A decoder for `encoding`.
    pub fn new(encoding: Encoding) -> std::io::Result<Decoder> {
        Ok(match encoding {
            Encoding::Gzip => Decoder::Gzip(flate2::write::MultiGzDecoder::new(Vec::new())),
            Encoding::Deflate => Decoder::Deflate(Err(Vec::new())),
            Encoding::Brotli => Decoder::Brotli(Box::new(
                brotli_decompressor::DecompressorWriter::new(Vec::new(), 4096),
            )),
            Encoding::Zstd => {
                Decoder::Zstd(Box::new(zstd::stream::write::Decoder::new(Vec::new())?))
            }
        })
    }

    /// Decodes `input`, calling `sink` with each piece of output.
    pub fn push(&mut self, input: &[u8], sink: &mut dyn FnMut(&[u8])) -> std::io::Result<()> {
        for slice in input.chunks(SLICE) {
            self.write(slice)?;
            self.drain(sink);
        }
        Ok(())
    }

    /// Ends the stream (checking it is complete), calling `sink` with the last output.
    pub fn finish(&mut self, sink: &mut dyn FnMut(&[u8])) -> std::io::Result<()> {
        match self {
            Decoder::Gzip(d) => d.try_finish()?,
            Decoder::Deflate(Ok(DeflateKind::Zlib(d))) => d.try_finish()?,
            Decoder::Deflate(Ok(DeflateKind::Raw(d))) => d.try_finish()?,
            Decoder::Deflate(Err(held)) => {
                let held = std::mem::take(held);
                if !held.is_empty() {
                    let mut raw = flate2::write::DeflateDecoder::new(Vec::new());
                    raw.write_all(&held)?;
                    raw.try_finish()?;
                    *self = Decoder::Deflate(Ok(DeflateKind::Raw(raw)));
                }
            }
            Decoder::Brotli(d) => d.flush()?,
            Decoder::Zstd(d) => d.flush()?,
        }
        self.drain(sink);
        Ok(())
    }

    fn write(&mut self, slice: &[u8]) -> std::io::Result<()> {
        match self {
            Decoder::Gzip(d) => d.write_all(slice),
            Decoder::Deflate(state) => {
                let input: std::borrow::Cow<'_, [u8]> = match state {
                    Ok(_) => slice.into(),
                    Err(held) => {
                        held.extend_from_slice(slice);
                        if held.len() < 2 {
                            return Ok(());
                        }
                        // A zlib header: CM = 8 in the low nibble and a check that divides 31.
                        let zlib = held[0] & 0x0f == 8
                            && (u16::from(held[0]) << 8 | u16::from(held[1])) % 31 == 0;
                        let input = std::mem::take(held);
                        *state = Ok(if zlib {
                            DeflateKind::Zlib(flate2::write::ZlibDecoder::new(Vec::new()))
                        } else {
                            DeflateKind::Raw(flate2::write::DeflateDecoder::new(Vec::new()))
                        });
                        input.into()
                    }
                };
                match state {
                    Ok(DeflateKind::Zlib(d)) => d.write_all(&input),
                    Ok(DeflateKind::Raw(d)) => d.write_all(&input),
                    Err(_) => Ok(()),
                }
            }
            Decoder::Brotli(d) => d.write_all(slice),
            Decoder::Zstd(d) => d.write_all(slice),
        }
    }

    fn drain(&mut self, sink: &mut dyn FnMut(&[u8])) {
        let out: &mut Vec<u8> = match self {
            Decoder::Gzip(d) => d.get_mut(),
            Decoder::Deflate(Ok(DeflateKind::Zlib(d))) => d.get_mut(),
            Decoder::Deflate(Ok(DeflateKind::Raw(d))) => d.get_mut(),
            Decoder::Deflate(Err(_)) => return,
            Decoder::Brotli(d) => d.get_mut(),
            Decoder::Zstd(d) => d.get_mut(),
        };
        if !out.is_empty() {
            sink(out);
            out.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(encoding: Encoding, data: &[u8], piece: usize) -> Vec<u8> {
        let mut d = Decoder::new(encoding).unwrap();
        let mut out = Vec::new();
        for chunk in data.chunks(piece.max(1)) {
            d.push(chunk, &mut |b| out.extend_from_slice(b)).unwrap();
        }
        d.finish(&mut |b| out.extend_from_slice(b)).unwrap();
        out
    }

    fn plain() -> Vec<u8> {
        (0..50_000u32)
            .flat_map(|i| format!("line {i} sk-live-0123456789\n").into_bytes())
            .collect()
    }

    #[test]
    fn round_trips() {
        let plain = plain();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&plain).unwrap();
        let gz = gz.finish().unwrap();
        let mut zl = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
        zl.write_all(&plain).unwrap();
        let zl = zl.finish().unwrap();
        let mut raw = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
        raw.write_all(&plain).unwrap();
        let raw = raw.finish().unwrap();
        let zs = zstd::stream::encode_all(&plain[..], 1).unwrap();
        for (enc, data) in [
            (Encoding::Gzip, &gz),
            (Encoding::Deflate, &zl),
            (Encoding::Deflate, &raw),
            (Encoding::Zstd, &zs),
        ] {
            for piece in [1, 7, 4096, data.len()] {
                assert_eq!(
                    decode(enc, data, piece),
                    plain,
                    "{enc:?} in pieces of {piece}"
                );
            }
        }
    }

    #[test]
    fn truncated_gzip_fails() {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&plain()).unwrap();
        let gz = gz.finish().unwrap();
        let mut d = Decoder::new(Encoding::Gzip).unwrap();
        d.push(&gz[..gz.len() / 2], &mut |_| {}).unwrap();
        assert!(d.finish(&mut |_| {}).is_err());
    }

    #[test]
    fn parse_cases() {
        type Case<'a> = (Option<&'a [u8]>, Result<Option<Encoding>, UnknownEncoding>);
        let cases: [Case; 7] = [
            (None, Ok(None)),
            (Some(b"identity"), Ok(None)),
            (Some(b"GZIP"), Ok(Some(Encoding::Gzip))),
            (Some(b"br"), Ok(Some(Encoding::Brotli))),
            (Some(b"zstd"), Ok(Some(Encoding::Zstd))),
            (Some(b"gzip, br"), Err(UnknownEncoding)),
            (Some(b"compress"), Err(UnknownEncoding)),
        ];
        for (value, want) in cases {
            assert_eq!(Encoding::parse(value), want, "{value:?}");
        }
    }
}
