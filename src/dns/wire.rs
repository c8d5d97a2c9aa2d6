//! DNS messages on the wire (RFC 1035 §4, EDNS per RFC 6891), written by hand for the one job the
//! responder has: read a single question from an untrusted stub resolver and write a short answer.
//!
//! 1. [`parse_query`] checks the header (a response or a short packet is ignored, any opcode other
//!    than QUERY is `NOTIMP`, `QDCOUNT` must be 1, a query carries no answer or authority records),
//!    reads the question name and walks the additional section for at most one EDNS `OPT` record.
//!    Anything else that is wrong is `FORMERR`.
//! 2. [`encode_response`] echoes the question (as sent, so 0x20 case randomization survives), adds
//!    the answers, each naming the question by a compression pointer to offset 12, and an `OPT`
//!    record when the query had one. A response that would not fit the client's limit is sent
//!    truncated (`TC`), without answers, so that the client retries over TCP.
//!
//! # Security
//!
//! Every byte comes from code in the sandbox. Reads are bounds-checked slices (no indexing that can
//! panic); a name is at most 255 bytes and 63 per label; a compression pointer must point strictly
//! before the place the current run of labels started and into the message after the header, and
//! at most [`MAX_POINTERS`] are followed, so a pointer loop cannot spin; extended label types
//! (0x40, 0x80) are refused.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, Ipv6Addr};

/// Length of the fixed header.
pub const HEADER_LEN: usize = 12;
/// Longest name in wire form, terminal zero included (RFC 1035 §2.3.4).
pub const MAX_NAME_LEN: usize = 255;
/// Longest label (RFC 1035 §2.3.4).
pub const MAX_LABEL_LEN: usize = 63;
/// Most compression pointers followed while reading one name.
pub const MAX_POINTERS: usize = 16;
/// Most records read from the additional section of a query.
pub const MAX_ADDITIONAL: u16 = 4;
/// UDP payload size a client without EDNS may receive (RFC 1035 §4.2.1).
pub const UDP_PLAIN_LIMIT: usize = 512;
/// The EDNS UDP payload size we advertise and the most we send over UDP (DNS flag day 2020).
pub const UDP_EDNS_LIMIT: u16 = 1232;
/// The most a TCP message can hold (2-byte length prefix, RFC 1035 §4.2.2).
pub const TCP_LIMIT: usize = 65_535;

/// Record types this module names (RFC 1035 §3.2.2 and later RFCs).
pub mod rtype {
    pub const A: u16 = 1;
    pub const NS: u16 = 2;
    pub const CNAME: u16 = 5;
    pub const SOA: u16 = 6;
    pub const PTR: u16 = 12;
    pub const MX: u16 = 15;
    pub const TXT: u16 = 16;
    pub const AAAA: u16 = 28;
    pub const SRV: u16 = 33;
    pub const NAPTR: u16 = 35;
    pub const DS: u16 = 43;
    pub const OPT: u16 = 41;
    pub const RRSIG: u16 = 46;
    pub const DNSKEY: u16 = 48;
    pub const SVCB: u16 = 64;
    pub const HTTPS: u16 = 65;
    pub const IXFR: u16 = 251;
    pub const AXFR: u16 = 252;
    pub const ANY: u16 = 255;
    pub const CAA: u16 = 257;
}

/// Record classes.
pub mod class {
    pub const IN: u16 = 1;
}

/// Response codes (RFC 1035 §4.1.1; `BADVERS` is an extended code, RFC 6891 §6.1.3).
pub mod rcode {
    pub const NOERROR: u16 = 0;
    pub const FORMERR: u16 = 1;
    pub const SERVFAIL: u16 = 2;
    pub const NXDOMAIN: u16 = 3;
    pub const NOTIMP: u16 = 4;
    pub const REFUSED: u16 = 5;
    pub const BADVERS: u16 = 16;
}

/// The QUERY opcode; every other one is answered `NOTIMP`.
const OPCODE_QUERY: u8 = 0;

const FLAG_QR: u16 = 0x8000;
const FLAG_AA: u16 = 0x0400;
const FLAG_TC: u16 = 0x0200;
const FLAG_RD: u16 = 0x0100;
const FLAG_RA: u16 = 0x0080;
/// The DNSSEC OK bit in the `OPT` TTL field.
const EDNS_DO: u32 = 0x0000_8000;

/// The mnemonic of a record type as events show it (`"A"`, `"AAAA"`, …; `"TYPE<n>"` otherwise, as
/// RFC 3597 §5 writes unknown types).
pub fn qtype_name(qtype: u16) -> String {
    let name = match qtype {
        rtype::A => "A",
        rtype::NS => "NS",
        rtype::CNAME => "CNAME",
        rtype::SOA => "SOA",
        rtype::PTR => "PTR",
        rtype::MX => "MX",
        rtype::TXT => "TXT",
        rtype::AAAA => "AAAA",
        rtype::SRV => "SRV",
        rtype::NAPTR => "NAPTR",
        rtype::OPT => "OPT",
        rtype::DS => "DS",
        rtype::RRSIG => "RRSIG",
        rtype::DNSKEY => "DNSKEY",
        rtype::SVCB => "SVCB",
        rtype::HTTPS => "HTTPS",
        rtype::IXFR => "IXFR",
        rtype::AXFR => "AXFR",
        rtype::ANY => "ANY",
        rtype::CAA => "CAA",
        other => return format!("TYPE{other}"),
    };
    name.to_owned()
}

/// A domain name in uncompressed wire form (length-prefixed labels and the terminal zero), as read
/// from a message: case preserved, at most [`MAX_NAME_LEN`] bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct Name {
    wire: Vec<u8>,
}

impl Name {
    /// The root name (`.`).
    pub fn root() -> Name {
        Name { wire: vec![0] }
    }

    /// A name from dotted text (`api.github.com`, a trailing dot allowed). `None` when a label is
    /// empty or longer than 63 bytes, or the name longer than 255 bytes in wire form. Bytes are
    /// taken as they are; callers pass normalized hostnames.
    pub fn from_dotted(text: &str) -> Option<Name> {
        let text = text.strip_suffix('.').unwrap_or(text);
        let mut wire = Vec::with_capacity(text.len() + 2);
        if !text.is_empty() {
            for label in text.split('.') {
                if label.is_empty() || label.len() > MAX_LABEL_LEN {
                    return None;
                }
                wire.push(label.len() as u8);
                wire.extend_from_slice(label.as_bytes());
            }
        }
        wire.push(0);
        (wire.len() <= MAX_NAME_LEN).then_some(Name { wire })
    }

    /// The uncompressed wire form, terminal zero included.
    pub fn wire(&self) -> &[u8] {
        &self.wire
    }

    /// The labels, most specific first, without the root.
    pub fn labels(&self) -> Labels<'_> {
        Labels { rest: &self.wire }
    }

    /// Whether this is the root name.
    pub fn is_root(&self) -> bool {
        self.wire.len() == 1
    }

    /// The name as a lowercase dotted hostname when every byte is a letter, digit, `-` or `_` and it
    /// is not the root; `None` otherwise (such a name is never a host a rule could allow).
    pub fn to_hostname(&self) -> Option<String> {
        if self.is_root() {
            return None;
        }
        let mut out = String::with_capacity(self.wire.len());
        for label in self.labels() {
            if !label
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_')
            {
                return None;
            }
            if !out.is_empty() {
                out.push('.');
            }
            out.extend(label.iter().map(|b| char::from(b.to_ascii_lowercase())));
        }
        Some(out)
    }

    /// The name in presentation form for logs and events: dotted, letters, digits, `-` and `_` as
    /// they are, every other byte (a dot inside a label included) as `\DDD` (RFC 1035 §5.1); the
    /// root is `.`.
    pub fn to_presentation(&self) -> String {
        if self.is_root() {
            return ".".to_owned();
        }
        let mut out = String::with_capacity(self.wire.len());
        for label in self.labels() {
            if !out.is_empty() {
                out.push('.');
            }
            for &b in label {
                if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
                    out.push(char::from(b));
                } else {
                    let _ = write!(out, "\\{b:03}");
                }
            }
        }
        out
    }

    /// The address a reverse-lookup name stands for: `d.c.b.a.in-addr.arpa` (RFC 1035 §3.5) or the
    /// 32 nibbles under `ip6.arpa` (RFC 3596 §2.5). `None` for anything else.
    pub fn reverse_address(&self) -> Option<std::net::IpAddr> {
        let labels: Vec<&[u8]> = self.labels().collect();
        let lower: Vec<String> = labels
            .iter()
            .map(|l| String::from_utf8_lossy(l).to_ascii_lowercase())
            .collect();
        match lower.as_slice() {
            [d, c, b, a, in_addr, arpa] if in_addr == "in-addr" && arpa == "arpa" => {
                let octet = |s: &String| -> Option<u8> {
                    if s.is_empty() || s.len() > 3 || (s.len() > 1 && s.starts_with('0')) {
                        return None;
                    }
                    if !s.bytes().all(|b| b.is_ascii_digit()) {
                        return None;
                    }
                    s.parse().ok()
                };
                Some(Ipv4Addr::new(octet(a)?, octet(b)?, octet(c)?, octet(d)?).into())
            }
            [nibbles @ .., ip6, arpa] if nibbles.len() == 32 && ip6 == "ip6" && arpa == "arpa" => {
                let mut value: u128 = 0;
                for nibble in nibbles.iter().rev() {
                    let mut chars = nibble.chars();
                    let digit = chars.next()?.to_digit(16)?;
                    if chars.next().is_some() {
                        return None;
                    }
                    value = (value << 4) | u128::from(digit);
                }
                Some(Ipv6Addr::from(value).into())
            }
            _ => None,
        }
    }
}

impl std::fmt::Debug for Name {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Name({})", self.to_presentation())
    }
}

/// Iterator over the labels of a [`Name`].
pub struct Labels<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for Labels<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        let (&len, tail) = self.rest.split_first()?;
        if len == 0 {
            return None;
        }
        let label = tail.get(..usize::from(len))?;
        self.rest = tail.get(usize::from(len)..)?;
        Some(label)
    }
}

/// The one question of a query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Question {
    pub name: Name,
    pub qtype: u16,
    pub qclass: u16,
}

/// What a query's EDNS `OPT` record said (RFC 6891 §6.1.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Edns {
    /// The UDP payload size the client can receive.
    pub udp_size: u16,
    /// EDNS version; only 0 exists.
    pub version: u8,
    /// The DNSSEC OK bit, echoed back.
    pub dnssec_ok: bool,
}

/// A parsed query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    pub id: u16,
    /// Recursion desired: copied into the response.
    pub rd: bool,
    pub question: Question,
    pub edns: Option<Edns>,
}

impl Query {
    /// The largest response the client takes over UDP: 512 bytes without EDNS, else its
    /// advertised size clamped to 512..=1232.
    pub fn udp_limit(&self) -> usize {
        match self.edns {
            None => UDP_PLAIN_LIMIT,
            Some(edns) => usize::from(edns.udp_size.min(UDP_EDNS_LIMIT)).max(UDP_PLAIN_LIMIT),
        }
    }
}

/// Why a packet is not answered with records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    /// Not answered at all: shorter than a header, or a response (answering responses could loop).
    Ignore,
    /// Answered by a bare header carrying `rcode` (`FORMERR` or `NOTIMP`).
    Error(ErrorReply),
}

/// A header-only error response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErrorReply {
    pub id: u16,
    pub opcode: u8,
    pub rd: bool,
    pub rcode: u16,
}

/// A bounds-checked reader over a message.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let out = self.buf.get(self.pos..end)?;
        self.pos = end;
        Some(out)
    }

    fn u16(&mut self) -> Option<u16> {
        let b = self.take(2)?;
        Some(u16::from_be_bytes([*b.first()?, *b.get(1)?]))
    }

    fn u32(&mut self) -> Option<u32> {
        let b = self.take(4)?;
        Some(u32::from_be_bytes([
            *b.first()?,
            *b.get(1)?,
            *b.get(2)?,
            *b.get(3)?,
        ]))
    }

    /// Reads a possibly compressed name starting here and moves past it.
    fn name(&mut self) -> Option<Name> {
        let (name, end) = read_name(self.buf, self.pos)?;
        self.pos = end;
        Some(name)
    }
}

/// Reads the name at `start`; returns it uncompressed and the offset just past it in the stream.
///
/// # Security
///
/// Each pointer must target an offset after the header and strictly before the start of the run
/// of labels that contained it, so targets strictly decrease and no loop is possible; at most
/// [`MAX_POINTERS`] are followed anyway, and the assembled name may not exceed 255 bytes.
fn read_name(buf: &[u8], start: usize) -> Option<(Name, usize)> {
    let mut wire = Vec::with_capacity(64);
    let mut pos = start;
    let mut run_start = start;
    let mut end = None;
    let mut pointers = 0;
    loop {
        let len = *buf.get(pos)?;
        match len & 0xC0 {
            0x00 if len == 0 => {
                wire.push(0);
                if wire.len() > MAX_NAME_LEN {
                    return None;
                }
                let end = end.unwrap_or(pos + 1);
                return Some((Name { wire }, end));
            }
            0x00 => {
                let len = usize::from(len);
                let label = buf.get(pos + 1..pos + 1 + len)?;
                // The label, its length byte and the terminal zero still to come must fit.
                if wire.len() + 1 + len + 1 > MAX_NAME_LEN {
                    return None;
                }
                wire.push(len as u8);
                wire.extend_from_slice(label);
                pos += 1 + len;
            }
            0xC0 => {
                let low = *buf.get(pos + 1)?;
                let target = (usize::from(len & 0x3F) << 8) | usize::from(low);
                pointers += 1;
                if pointers > MAX_POINTERS || target < HEADER_LEN || target >= run_start {
                    return None;
                }
                end.get_or_insert(pos + 2);
                pos = target;
                run_start = target;
            }
            // 0x40 and 0x80: extended label types (RFC 6891 §5) and reserved.
            _ => return None,
        }
    }
}

/// Parses a query from a stub resolver.
pub fn parse_query(buf: &[u8]) -> Result<Query, Reject> {
    let mut r = Reader { buf, pos: 0 };
    let header = (|| Some((r.u16()?, r.u16()?, r.u16()?, r.u16()?, r.u16()?, r.u16()?)))();
    let Some((id, flags, qdcount, ancount, nscount, arcount)) = header else {
        return Err(Reject::Ignore);
    };
    if flags & FLAG_QR != 0 {
        return Err(Reject::Ignore);
    }
    let opcode = ((flags >> 11) & 0x0F) as u8;
    let rd = flags & FLAG_RD != 0;
    let error = |rcode| {
        Reject::Error(ErrorReply {
            id,
            opcode,
            rd,
            rcode,
        })
    };
    if opcode != OPCODE_QUERY {
        return Err(error(rcode::NOTIMP));
    }
    if qdcount != 1 || ancount != 0 || nscount != 0 || arcount > MAX_ADDITIONAL {
        return Err(error(rcode::FORMERR));
    }
    let question = (|| {
        Some(Question {
            name: r.name()?,
            qtype: r.u16()?,
            qclass: r.u16()?,
        })
    })()
    .ok_or(error(rcode::FORMERR))?;

    let mut edns = None;
    for _ in 0..arcount {
        let record = (|| {
            let name = r.name()?;
            let rtype = r.u16()?;
            let rclass = r.u16()?;
            let ttl = r.u32()?;
            let rdlen = r.u16()?;
            r.take(usize::from(rdlen))?;
            Some((name, rtype, rclass, ttl))
        })();
        let (name, rtype, rclass, ttl) = record.ok_or(error(rcode::FORMERR))?;
        if rtype != rtype::OPT {
            // Other additional records (a TSIG, say) are skipped: nothing here is signed.
            continue;
        }
        // RFC 6891 §6.1.1: one OPT, owned by the root; a second one is FORMERR.
        if edns.is_some() || !name.is_root() {
            return Err(error(rcode::FORMERR));
        }
        edns = Some(Edns {
            udp_size: rclass,
            version: ((ttl >> 16) & 0xFF) as u8,
            dnssec_ok: ttl & EDNS_DO != 0,
        });
    }
    Ok(Query {
        id,
        rd,
        question,
        edns,
    })
}

/// The data of an answer record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RData {
    A(Ipv4Addr),
    Aaaa(Ipv6Addr),
    Ptr(Name),
}

/// An answer record; its owner is always the question name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub ttl: u32,
    pub data: RData,
}

/// Encodes the response to `query`: the question echoed, `answers`, and an `OPT` record when the
/// query had one. `rcode` may be an extended code (its high bits go into the `OPT` record). When
/// the result exceeds `limit` bytes the answers are left out and `TC` is set.
pub fn encode_response(query: &Query, rcode: u16, answers: &[Answer], limit: usize) -> Vec<u8> {
    let full = encode(query, rcode, answers, false);
    if full.len() <= limit {
        return full;
    }
    encode(query, rcode, &[], true)
}

fn encode(query: &Query, rcode: u16, answers: &[Answer], truncated: bool) -> Vec<u8> {
    let question = &query.question;
    let mut out = Vec::with_capacity(HEADER_LEN + question.name.wire().len() + 4 + 64);
    let mut flags = FLAG_QR | FLAG_AA | FLAG_RA | (rcode & 0x000F);
    if query.rd {
        flags |= FLAG_RD;
    }
    if truncated {
        flags |= FLAG_TC;
    }
    out.extend_from_slice(&query.id.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&(answers.len() as u16).to_be_bytes());
    out.extend_from_slice(&0u16.to_be_bytes());
    out.extend_from_slice(&u16::from(query.edns.is_some()).to_be_bytes());
    out.extend_from_slice(question.name.wire());
    out.extend_from_slice(&question.qtype.to_be_bytes());
    out.extend_from_slice(&question.qclass.to_be_bytes());
    for answer in answers {
        // A pointer to the question name at offset 12.
        out.extend_from_slice(&[0xC0, HEADER_LEN as u8]);
        let (rtype, rdata): (u16, &[u8]) = match &answer.data {
            RData::A(ip) => (rtype::A, &ip.octets()),
            RData::Aaaa(ip) => (rtype::AAAA, &ip.octets()),
            RData::Ptr(name) => (rtype::PTR, name.wire()),
        };
        out.extend_from_slice(&rtype.to_be_bytes());
        out.extend_from_slice(&class::IN.to_be_bytes());
        out.extend_from_slice(&answer.ttl.to_be_bytes());
        out.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
        out.extend_from_slice(rdata);
    }
    if let Some(edns) = query.edns {
        let mut ttl = u32::from(rcode >> 4) << 24;
        if edns.dnssec_ok {
            ttl |= EDNS_DO;
        }
        out.push(0);
        out.extend_from_slice(&rtype::OPT.to_be_bytes());
        out.extend_from_slice(&UDP_EDNS_LIMIT.to_be_bytes());
        out.extend_from_slice(&ttl.to_be_bytes());
        out.extend_from_slice(&0u16.to_be_bytes());
    }
    out
}

/// Encodes a header-only error response (no question; RFC 1035 allows leaving it out).
pub fn encode_error(reply: &ErrorReply) -> Vec<u8> {
    let mut flags =
        FLAG_QR | FLAG_RA | (u16::from(reply.opcode & 0x0F) << 11) | (reply.rcode & 0x0F);
    if reply.rd {
        flags |= FLAG_RD;
    }
    let mut out = Vec::with_capacity(HEADER_LEN);
    out.extend_from_slice(&reply.id.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&[0; 8]);
    out
}

/// Builds a query (for tests and probes): one question, `RD` set, and an `OPT` record advertising
/// `edns_size` when given.
pub fn encode_query(id: u16, name: &Name, qtype: u16, edns_size: Option<u16>) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + name.wire().len() + 4 + 11);
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&FLAG_RD.to_be_bytes());
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(&u16::from(edns_size.is_some()).to_be_bytes());
    out.extend_from_slice(name.wire());
    out.extend_from_slice(&qtype.to_be_bytes());
    out.extend_from_slice(&class::IN.to_be_bytes());
    if let Some(size) = edns_size {
        out.push(0);
        out.extend_from_slice(&rtype::OPT.to_be_bytes());
        out.extend_from_slice(&size.to_be_bytes());
        out.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    }
    out
}

/// A response as a test or probe sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedResponse {
    pub id: u16,
    /// The full 16-bit rcode (header bits plus the `OPT` extension).
    pub rcode: u16,
    pub truncated: bool,
    pub authoritative: bool,
    pub question: Option<Question>,
    /// `(type, ttl, rdata)` of each answer; PTR data is decompressed to wire form.
    pub answers: Vec<(u16, u32, Vec<u8>)>,
    pub edns: Option<Edns>,
}

/// Parses a response (for tests and probes; the responder itself never reads responses).
pub fn parse_response(buf: &[u8]) -> Option<ParsedResponse> {
    let mut r = Reader { buf, pos: 0 };
    let id = r.u16()?;
    let flags = r.u16()?;
    let qdcount = r.u16()?;
    let ancount = r.u16()?;
    let nscount = r.u16()?;
    let arcount = r.u16()?;
    if flags & FLAG_QR == 0 || qdcount > 1 {
        return None;
    }
    let question = if qdcount == 1 {
        Some(Question {
            name: r.name()?,
            qtype: r.u16()?,
            qclass: r.u16()?,
        })
    } else {
        None
    };
    let mut answers = Vec::new();
    let mut edns = None;
    let mut ext_rcode = 0u16;
    let total = u32::from(ancount) + u32::from(nscount) + u32::from(arcount);
    for index in 0..total {
        let _owner = r.name()?;
        let rtype = r.u16()?;
        let rclass = r.u16()?;
        let ttl = r.u32()?;
        let rdlen = usize::from(r.u16()?);
        let start = r.pos;
        let rdata = r.take(rdlen)?;
        if index < u32::from(ancount) {
            let data = if rtype == rtype::PTR {
                read_name(buf, start)?.0.wire().to_vec()
            } else {
                rdata.to_vec()
            };
            answers.push((rtype, ttl, data));
        } else if rtype == rtype::OPT {
            ext_rcode = ((ttl >> 24) & 0xFF) as u16;
            edns = Some(Edns {
                udp_size: rclass,
                version: ((ttl >> 16) & 0xFF) as u8,
                dnssec_ok: ttl & EDNS_DO != 0,
            });
        }
    }
    Some(ParsedResponse {
        id,
        rcode: (ext_rcode << 4) | (flags & 0x0F),
        truncated: flags & FLAG_TC != 0,
        authoritative: flags & FLAG_AA != 0,
        question,
        answers,
        edns,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(id: u16, flags: u16, qd: u16, an: u16, ns: u16, ar: u16) -> Vec<u8> {
        [id, flags, qd, an, ns, ar]
            .iter()
            .flat_map(|v| v.to_be_bytes())
            .collect()
    }

    fn query_bytes(name: &str, qtype: u16) -> Vec<u8> {
        encode_query(
            0x1234,
            &Name::from_dotted(name).expect("test name"),
            qtype,
            None,
        )
    }

    fn error_rcode(result: Result<Query, Reject>) -> Option<u16> {
        match result {
            Err(Reject::Error(reply)) => Some(reply.rcode),
            _ => None,
        }
    }

    #[test]
    fn names_from_text() {
        let cases: &[(&str, Option<&[u8]>)] = &[
            ("a.bc", Some(b"\x01a\x02bc\x00")),
            ("a.bc.", Some(b"\x01a\x02bc\x00")),
            ("", Some(b"\x00")),
            (".", Some(b"\x00")),
            ("a..b", None),
            (".a", None),
        ];
        for (text, wire) in cases {
            assert_eq!(
                Name::from_dotted(text).map(|n| n.wire().to_vec()),
                wire.map(<[u8]>::to_vec),
                "{text:?}"
            );
        }
        // 63-byte labels are fine, 64 is not; 255 bytes of wire are fine, 256 are not.
        assert!(Name::from_dotted(&"a".repeat(63)).is_some());
        assert!(Name::from_dotted(&"a".repeat(64)).is_none());
        let l63 = "a".repeat(63);
        let fits = format!("{l63}.{l63}.{l63}.{}", "b".repeat(61)); // 64*3 + 62 + 1 = 255
        assert_eq!(Name::from_dotted(&fits).map(|n| n.wire().len()), Some(255));
        assert!(Name::from_dotted(&format!("{fits}c")).is_none());
    }

    #[test]
    fn names_as_hostnames_and_presentation() {
        let cases: &[(&[u8], Option<&str>, &str)] = &[
            (
                b"\x03API\x06GitHub\x03com\x00",
                Some("api.github.com"),
                "API.GitHub.com",
            ),
            (
                b"\x05_http\x04_tcp\x01x\x00",
                Some("_http._tcp.x"),
                "_http._tcp.x",
            ),
            (b"\x00", None, "."),
            // A dot inside a label must never read as a label boundary.
            (b"\x03a.b\x03com\x00", None, "a\\046b.com"),
            (b"\x02a\x00\x03com\x00", None, "a\\000.com"),
            (b"\x02\xc3\xa9\x03com\x00", None, "\\195\\169.com"),
            (b"\x03a b\x00", None, "a\\032b"),
            (b"\x02a\\\x00", None, "a\\092"),
        ];
        for (wire, host, shown) in cases {
            let name = Name {
                wire: wire.to_vec(),
            };
            assert_eq!(name.to_hostname().as_deref(), *host, "{shown}");
            assert_eq!(name.to_presentation(), *shown);
        }
    }

    #[test]
    fn reverse_names() {
        let cases: &[(&str, Option<&str>)] = &[
            ("2.0.1.127.in-addr.arpa", Some("127.1.0.2")),
            ("1.0.0.127.IN-ADDR.ARPA", Some("127.0.0.1")),
            ("255.255.255.255.in-addr.arpa", Some("255.255.255.255")),
            ("256.0.1.127.in-addr.arpa", None),
            ("02.0.1.127.in-addr.arpa", None),
            ("+2.0.1.127.in-addr.arpa", None),
            ("0.1.127.in-addr.arpa", None),
            ("2.0.1.127.in-addr.arpa.evil", None),
            (
                "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.ip6.arpa",
                Some("::1"),
            ),
            (
                "2.0.1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.5.6.0.0.6.7.9.6.8.6.d.f.ip6.arpa",
                Some("fd68:6976:65::102"),
            ),
            (
                "2.0.1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.5.6.0.0.6.7.9.6.8.6.d.ip6.arpa",
                None,
            ),
            (
                "g.0.1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.5.6.0.0.6.7.9.6.8.6.d.f.ip6.arpa",
                None,
            ),
            ("example.com", None),
        ];
        for (text, ip) in cases {
            let name = Name::from_dotted(text).expect("test name");
            assert_eq!(
                name.reverse_address().map(|ip| ip.to_string()).as_deref(),
                *ip,
                "{text}"
            );
        }
    }

    #[test]
    fn qtype_names() {
        let cases: &[(u16, &str)] = &[
            (1, "A"),
            (28, "AAAA"),
            (12, "PTR"),
            (65, "HTTPS"),
            (255, "ANY"),
            (999, "TYPE999"),
        ];
        for (qtype, name) in cases {
            assert_eq!(qtype_name(*qtype), *name);
        }
    }

    #[test]
    fn parses_a_plain_query() {
        let q = parse_query(&query_bytes("Api.GitHub.com", rtype::AAAA)).expect("query");
        assert_eq!(q.id, 0x1234);
        assert!(q.rd);
        assert_eq!(q.question.qtype, rtype::AAAA);
        assert_eq!(q.question.qclass, class::IN);
        assert_eq!(q.question.name.to_presentation(), "Api.GitHub.com");
        assert_eq!(q.edns, None);
        assert_eq!(q.udp_limit(), 512);
    }

    #[test]
    fn parses_edns() {
        let name = Name::from_dotted("a.example").expect("name");
        let cases: &[(u16, usize)] = &[(4096, 1232), (1232, 1232), (600, 600), (100, 512)];
        for (size, limit) in cases {
            let q = parse_query(&encode_query(7, &name, rtype::A, Some(*size))).expect("query");
            assert_eq!(q.edns.map(|e| e.udp_size), Some(*size));
            assert_eq!(q.udp_limit(), *limit);
        }
    }

    #[test]
    fn header_rejections() {
        let mut question = Name::from_dotted("a.example")
            .expect("name")
            .wire()
            .to_vec();
        question.extend_from_slice(&[0, 1, 0, 1]);
        let with = |h: Vec<u8>| [h, question.clone()].concat();
        let cases: &[(&str, Vec<u8>, Option<u16>)] = &[
            ("empty", vec![], None),
            ("short header", vec![0; 11], None),
            ("a response", with(header(1, 0x8000, 1, 0, 0, 0)), None),
            (
                "opcode STATUS",
                with(header(1, 2 << 11, 1, 0, 0, 0)),
                Some(rcode::NOTIMP),
            ),
            (
                "opcode UPDATE",
                with(header(1, 5 << 11, 1, 0, 0, 0)),
                Some(rcode::NOTIMP),
            ),
            (
                "no question",
                header(1, 0, 0, 0, 0, 0),
                Some(rcode::FORMERR),
            ),
            (
                "two questions",
                with(header(1, 0, 2, 0, 0, 0)),
                Some(rcode::FORMERR),
            ),
            (
                "answers in a query",
                with(header(1, 0, 1, 1, 0, 0)),
                Some(rcode::FORMERR),
            ),
            (
                "authority in a query",
                with(header(1, 0, 1, 0, 1, 0)),
                Some(rcode::FORMERR),
            ),
            (
                "missing additional",
                with(header(1, 0, 1, 0, 0, 1)),
                Some(rcode::FORMERR),
            ),
            (
                "too many additional",
                with(header(1, 0, 1, 0, 0, 9)),
                Some(rcode::FORMERR),
            ),
            (
                "question cut short",
                header(1, 0, 1, 0, 0, 0)[..]
                    .iter()
                    .chain(&question[..5])
                    .copied()
                    .collect(),
                Some(rcode::FORMERR),
            ),
        ];
        for (what, bytes, rcode) in cases {
            let result = parse_query(bytes);
            match rcode {
                None => assert_eq!(result, Err(Reject::Ignore), "{what}"),
                Some(code) => assert_eq!(error_rcode(result), Some(*code), "{what}"),
            }
        }
    }

    #[test]
    fn name_rejections() {
        let name_cases: &[(&str, Vec<u8>)] = &[
            // A pointer to itself.
            ("self pointer", vec![0xC0, 12]),
            // A pointer forward, to a pointer back: a two-step loop.
            ("two-step loop", vec![0xC0, 14, 0xC0, 12]),
            // A label and then a pointer back to that label: a loop that grows the name.
            ("label then pointer to it", vec![1, b'a', 0xC0, 12]),
            ("pointer into the header", vec![0xC0, 2]),
            ("pointer past the end", vec![0xC0, 200]),
            ("extended label 0x40", vec![0x41, b'a', 0]),
            ("reserved label 0x80", vec![0x81, b'a', 0]),
            ("label runs past the end", vec![5, b'a', b'b']),
            ("no terminal zero", vec![1, b'a']),
        ];
        for (what, name) in name_cases {
            let bytes = [header(1, 0, 1, 0, 0, 0), name.clone(), vec![0, 1, 0, 1]].concat();
            assert_eq!(
                error_rcode(parse_query(&bytes)),
                Some(rcode::FORMERR),
                "{what}"
            );
        }
    }

    #[test]
    fn names_longer_than_255_are_rejected() {
        // Four 63-byte labels: 4 * 64 + 1 = 257 bytes.
        let mut name = Vec::new();
        for _ in 0..4 {
            name.push(63);
            name.extend_from_slice(&[b'a'; 63]);
        }
        name.push(0);
        let bytes = [header(1, 0, 1, 0, 0, 0), name, vec![0, 1, 0, 1]].concat();
        assert_eq!(error_rcode(parse_query(&bytes)), Some(rcode::FORMERR));
    }

    #[test]
    fn backward_pointers_are_followed() {
        // A query has nothing before its question to point at, so the reader is checked on a
        // buffer holding three names, each pointing at the one before.
        let mut buf = header(1, 0, 1, 0, 0, 0);
        buf.extend_from_slice(b"\x07example\x03com\x00"); // at 12
        let second = buf.len();
        buf.extend_from_slice(b"\x03api\xC0\x0C"); // api + pointer to 12
        let third = buf.len();
        buf.extend_from_slice(b"\x01x\xC0"); // x + pointer to `second`
        buf.push(second as u8);
        let (name, end) = read_name(&buf, third).expect("name");
        assert_eq!(name.to_presentation(), "x.api.example.com");
        assert_eq!(end, buf.len());
        let (name, end) = read_name(&buf, second).expect("name");
        assert_eq!(name.to_presentation(), "api.example.com");
        assert_eq!(end, third);
    }

    #[test]
    fn too_many_pointers_are_rejected() {
        // A chain of 17 strictly-backward pointers ending at a root label.
        let mut buf = header(1, 0, 1, 0, 0, 0);
        buf.push(0); // root at 12
        let mut previous = 12usize;
        let mut last = 12;
        for _ in 0..=MAX_POINTERS {
            last = buf.len();
            buf.extend_from_slice(&[0xC0 | (previous >> 8) as u8, previous as u8]);
            previous = last;
        }
        assert!(read_name(&buf, last).is_none());
        // One pointer fewer is fine.
        assert!(read_name(&buf, last - 2).is_some());
    }

    #[test]
    fn additional_records() {
        let name = Name::from_dotted("a.example").expect("name");
        let base = encode_query(9, &name, rtype::A, Some(1400));
        let opt: &[u8] = &[0, 0, 41, 0x05, 0x78, 0, 0, 0, 0, 0, 0];
        // Two OPT records: FORMERR.
        let mut two = base.clone();
        two[11] = 2;
        two.extend_from_slice(opt);
        assert_eq!(error_rcode(parse_query(&two)), Some(rcode::FORMERR));
        // An OPT not owned by the root: FORMERR.
        let mut owned = encode_query(9, &name, rtype::A, None);
        owned[11] = 1;
        owned.extend_from_slice(&[1, b'x', 0, 0, 41, 0x05, 0x78, 0, 0, 0, 0, 0, 0]);
        assert_eq!(error_rcode(parse_query(&owned)), Some(rcode::FORMERR));
        // Some other record beside the OPT is skipped; EDNS options inside the OPT are skipped.
        let mut other = encode_query(9, &name, rtype::A, None);
        other[11] = 2;
        other.extend_from_slice(&[0xC0, 12, 0, 16, 0, 1, 0, 0, 0, 0, 0, 2, 1, b'x']);
        other.extend_from_slice(&[0, 0, 41, 0x10, 0, 0, 1, 0x80, 0, 0, 4, 0, 10, 0, 0]);
        let q = parse_query(&other).expect("query");
        assert_eq!(
            q.edns,
            Some(Edns {
                udp_size: 4096,
                version: 1,
                dnssec_ok: true
            })
        );
        // An OPT whose rdata runs past the end: FORMERR.
        let mut cut = base.clone();
        let len = cut.len();
        cut[len - 1] = 9;
        assert_eq!(error_rcode(parse_query(&cut)), Some(rcode::FORMERR));
    }

    #[test]
    fn responses_round_trip() {
        let query = parse_query(&encode_query(
            0xBEEF,
            &Name::from_dotted("wWw.Example.COM").expect("name"),
            rtype::A,
            Some(4096),
        ))
        .expect("query");
        let answers = [Answer {
            ttl: 5,
            data: RData::A(Ipv4Addr::new(127, 1, 0, 1)),
        }];
        let bytes = encode_response(&query, rcode::NOERROR, &answers, query.udp_limit());
        let r = parse_response(&bytes).expect("response");
        assert_eq!(r.id, 0xBEEF);
        assert_eq!(r.rcode, rcode::NOERROR);
        assert!(!r.truncated);
        assert!(r.authoritative);
        assert_eq!(r.question.as_ref(), Some(&query.question));
        assert_eq!(r.answers, vec![(rtype::A, 5, vec![127, 1, 0, 1])]);
        assert_eq!(r.edns.map(|e| e.udp_size), Some(UDP_EDNS_LIMIT));

        // BADVERS travels in the OPT record.
        let bytes = encode_response(&query, rcode::BADVERS, &[], 512);
        assert_eq!(
            parse_response(&bytes).map(|r| r.rcode),
            Some(rcode::BADVERS)
        );

        // PTR data decompresses.
        let target = Name::from_dotted("api.github.com").expect("name");
        let answers = [Answer {
            ttl: 5,
            data: RData::Ptr(target.clone()),
        }];
        let bytes = encode_response(&query, rcode::NOERROR, &answers, 512);
        let r = parse_response(&bytes).expect("response");
        assert_eq!(r.answers, vec![(rtype::PTR, 5, target.wire().to_vec())]);
    }

    #[test]
    fn oversized_responses_are_truncated() {
        let l63 = "a".repeat(63);
        let long = format!("{l63}.{l63}.{l63}.{}", "b".repeat(61));
        let query = parse_query(&encode_query(
            1,
            &Name::from_dotted(&long).expect("name"),
            rtype::PTR,
            None,
        ))
        .expect("query");
        let answers = [Answer {
            ttl: 5,
            data: RData::Ptr(Name::from_dotted(&long).expect("name")),
        }];
        let r = parse_response(&encode_response(&query, rcode::NOERROR, &answers, 512))
            .expect("response");
        assert!(r.truncated);
        assert!(r.answers.is_empty());
        let r = parse_response(&encode_response(
            &query,
            rcode::NOERROR,
            &answers,
            TCP_LIMIT,
        ))
        .expect("response");
        assert!(!r.truncated);
        assert_eq!(r.answers.len(), 1);
    }

    #[test]
    fn error_replies() {
        let reply = ErrorReply {
            id: 0x0102,
            opcode: 0,
            rd: true,
            rcode: rcode::FORMERR,
        };
        let bytes = encode_error(&reply);
        assert_eq!(bytes, vec![1, 2, 0x81, 0x81, 0, 0, 0, 0, 0, 0, 0, 0]);
        let r = parse_response(&bytes).expect("response");
        assert_eq!(r.rcode, rcode::FORMERR);
        assert_eq!(r.question, None);
    }

    #[test]
    fn random_bytes_never_panic() {
        // A small xorshift keeps this deterministic without a dependency.
        let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let seed = encode_query(
            3,
            &Name::from_dotted("api.github.com").expect("name"),
            rtype::A,
            Some(1232),
        );
        for round in 0..2000 {
            let len = (next() % 80) as usize;
            let mut bytes: Vec<u8> = if round % 2 == 0 {
                (0..len).map(|_| next() as u8).collect()
            } else {
                // Mutate a valid query: flip a few bytes, then cut it somewhere.
                let mut b = seed.clone();
                for _ in 0..(next() % 4 + 1) {
                    let i = (next() as usize) % b.len();
                    b[i] = next() as u8;
                }
                b.truncate((next() as usize) % (b.len() + 1));
                b
            };
            if round % 7 == 0 {
                bytes.clear();
            }
            let _ = parse_query(&bytes);
            let _ = parse_response(&bytes);
        }
        for cut in 0..=seed.len() {
            let _ = parse_query(&seed[..cut]);
        }
    }
}
