//! The per-sandbox name table: which sandbox-local address stands for which hostname (docs/network-access.md#dns-and-transparent-capture).
//!
//! 1. The DNS responder asks [`NameTable::address_for`] for a name some rule could allow; the first
//!    time, the name gets the next free index, which never changes for the life of the sandbox.
//! 2. Index `i` is the address `127.1.(i / 254).(i % 254 + 1)` — `127.1.0.1`, …, `127.1.0.254`,
//!    `127.1.1.1`, … — so no address ends in `.0` or `.255`; and, for AAAA answers,
//!    `fd68:6976:65::XXYY` with the same last two octets (`fd68:6976:65::/96` is a ULA prefix
//!    spelling "hive").
//! 3. The proxy's transparent listeners call [`NameTable::name_for`] with the address a connection
//!    was made to and get the name back.
//!
//! 4. A name the policy denies gets an address from a separate, small ring in `127.2.0.0/16`
//!    ([`NameTable::denied_address_for`], [`DENIED_CAPACITY`] names, the oldest evicted first), so
//!    that an HTTP client's connection reaches a transparent listener and is answered `403` with
//!    its method and path; [`NameTable::target_for`] tells the listener that such a connection is
//!    refused whatever it names.
//!
//! # Security
//!
//! Entries of allowed names are never evicted or reused: a connection that dialled an address while a name was
//! mapped must not later be taken for another name. The table is bounded by the address space
//! ([`CAPACITY`] names); once full, new names get no address (the responder answers `SERVFAIL`)
//! while every existing mapping stays valid. A sandbox that may resolve `*.example.com` can fill its
//! own table with random subdomains; that only stops new names resolving in that sandbox.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};

/// The IPv4 range names are mapped into: `127.1.0.0/16`.
pub const V4_PREFIX: [u8; 2] = [127, 1];
/// The IPv6 range names are mapped into: `fd68:6976:65::/96`.
pub const V6_PREFIX: [u16; 6] = [0xfd68, 0x6976, 0x0065, 0, 0, 0];
/// The IPv4 range denied names are mapped into: `127.2.0.0/16` (only the first
/// [`DENIED_CAPACITY`] addresses are used).
pub const DENIED_V4_PREFIX: [u8; 2] = [127, 2];
/// The most denied names remembered at once; the oldest is evicted for a new one, so a sandbox
/// resolving millions of random names holds this many at most (about 1 MiB).
pub const DENIED_CAPACITY: usize = 4096;
/// Usable last octets per third octet (1..=254).
const PER_BLOCK: usize = 254;
/// The most names a table holds: 256 blocks of 254 addresses.
pub const CAPACITY: usize = 256 * PER_BLOCK;

/// A sandbox's name ↔ address table. Cheap to share (`Arc`); all methods take `&self`.
#[derive(Debug)]
pub struct NameTable {
    inner: RwLock<Inner>,
    capacity: usize,
    denied: Mutex<DeniedRing>,
}

/// Denied names by slot, reused oldest first.
#[derive(Debug)]
struct DeniedRing {
    by_name: HashMap<Arc<str>, u32>,
    slots: Vec<Arc<str>>,
    next: u32,
    capacity: u32,
}

impl DeniedRing {
    fn index_for(&mut self, name: &str) -> u32 {
        if let Some(index) = self.by_name.get(name) {
            return *index;
        }
        let index = self.next;
        self.next = (self.next + 1) % self.capacity;
        let name: Arc<str> = Arc::from(name);
        match self.slots.get_mut(index as usize) {
            Some(slot) => {
                let old = std::mem::replace(slot, name.clone());
                self.by_name.remove(&old);
            }
            None => self.slots.push(name.clone()),
        }
        self.by_name.insert(name, index);
        index
    }
}

#[derive(Debug, Default)]
struct Inner {
    by_name: HashMap<Arc<str>, u32>,
    by_index: Vec<Arc<str>>,
}

impl Default for NameTable {
    fn default() -> Self {
        NameTable::new()
    }
}

impl NameTable {
    /// An empty table holding up to [`CAPACITY`] names.
    pub fn new() -> NameTable {
        NameTable::with_capacity(CAPACITY)
    }

    /// An empty table holding up to `capacity` names (at most [`CAPACITY`]); small ones are for
    /// tests of the full table.
    pub fn with_capacity(capacity: usize) -> NameTable {
        NameTable::with_capacities(capacity, DENIED_CAPACITY)
    }

    /// [`NameTable::with_capacity`] with another ring size for denied names (1 to
    /// [`DENIED_CAPACITY`]); small ones are for tests of the eviction.
    pub fn with_capacities(capacity: usize, denied: usize) -> NameTable {
        let denied = denied.clamp(1, DENIED_CAPACITY) as u32;
        NameTable {
            inner: RwLock::new(Inner::default()),
            capacity: capacity.min(CAPACITY),
            denied: Mutex::new(DeniedRing {
                by_name: HashMap::new(),
                slots: Vec::new(),
                next: 0,
                capacity: denied,
            }),
        }
    }

    /// The address standing for a name the policy denies (in `127.2.0.0/16`): the same while the
    /// name is among the last [`DENIED_CAPACITY`] denied names, then reused for another one.
    /// `None` for an empty name.
    pub fn denied_address_for(&self, name: &str) -> Option<Ipv4Addr> {
        if name.is_empty() {
            return None;
        }
        let index = self.denied.lock().index_for(name);
        let [_, _, third, fourth] = v4_of(index).octets();
        Some(Ipv4Addr::new(
            DENIED_V4_PREFIX[0],
            DENIED_V4_PREFIX[1],
            third,
            fourth,
        ))
    }

    /// How many denied names are remembered (at most the ring size).
    pub fn denied_len(&self) -> usize {
        self.denied.lock().by_name.len()
    }

    /// What a connection to `ip` meant: `(name, refused)` with `refused` set for an address of a
    /// denied name; `None` for an address neither range handed out.
    pub fn target_for(&self, ip: IpAddr) -> Option<(String, bool)> {
        if let Some(name) = self.name_for(ip) {
            return Some((name, false));
        }
        let IpAddr::V4(v4) = canonical(ip) else {
            return None;
        };
        let [a, b, third, fourth] = v4.octets();
        if [a, b] != DENIED_V4_PREFIX || fourth == 0 || fourth == 255 {
            return None;
        }
        let index = u32::from(third) * PER_BLOCK as u32 + u32::from(fourth) - 1;
        let ring = self.denied.lock();
        ring.slots
            .get(index as usize)
            .map(|name| (name.to_string(), true))
    }

    /// The IPv4 address of `name` (a normalized hostname, see [`crate::config::normalize_host`]),
    /// allocating the next one the first time. `None` when the table is full or `name` is empty.
    pub fn address_for(&self, name: &str) -> Option<Ipv4Addr> {
        self.index_for(name).map(v4_of)
    }

    /// The IPv6 address of `name`: the same index as [`NameTable::address_for`], in
    /// `fd68:6976:65::/96`. Allocates like it.
    pub fn address_v6_for(&self, name: &str) -> Option<Ipv6Addr> {
        self.index_for(name).map(v6_of)
    }

    /// The IPv4 address of `name` if it already has one; never allocates.
    pub fn lookup(&self, name: &str) -> Option<Ipv4Addr> {
        self.inner.read().by_name.get(name).copied().map(v4_of)
    }

    /// The name mapped to `ip` (IPv4 in `127.1.0.0/16` or IPv6 in `fd68:6976:65::/96`, IPv4-mapped
    /// IPv6 accepted); `None` for any other address or one not handed out.
    pub fn name_for(&self, ip: IpAddr) -> Option<String> {
        let index = index_of(ip)?;
        let inner = self.inner.read();
        inner
            .by_index
            .get(usize::try_from(index).ok()?)
            .map(|name| name.to_string())
    }

    /// How many names are mapped.
    pub fn len(&self) -> usize {
        self.inner.read().by_index.len()
    }

    /// Whether no name is mapped yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the table can map no further name.
    pub fn is_full(&self) -> bool {
        self.len() >= self.capacity
    }

    fn index_for(&self, name: &str) -> Option<u32> {
        if name.is_empty() {
            return None;
        }
        if let Some(index) = self.inner.read().by_name.get(name) {
            return Some(*index);
        }
        let mut inner = self.inner.write();
        // Another thread may have mapped it between the two locks.
        if let Some(index) = inner.by_name.get(name) {
            return Some(*index);
        }
        if inner.by_index.len() >= self.capacity {
            return None;
        }
        let index = u32::try_from(inner.by_index.len()).ok()?;
        let name: Arc<str> = Arc::from(name);
        inner.by_index.push(name.clone());
        inner.by_name.insert(name, index);
        Some(index)
    }
}

/// Whether `ip` lies in the range of denied names (`127.2.0.0/16`, IPv4-mapped accepted).
pub fn is_denied_range(ip: IpAddr) -> bool {
    matches!(canonical(ip), IpAddr::V4(v4) if v4.octets()[..2] == DENIED_V4_PREFIX)
}

/// Whether `ip` lies in one of the mapped ranges (whether or not it was handed out): a connection
/// to such an address that [`NameTable::name_for`] does not know has no name and must be refused.
pub fn is_mapped_range(ip: IpAddr) -> bool {
    match canonical(ip) {
        IpAddr::V4(v4) => v4.octets()[..2] == V4_PREFIX,
        IpAddr::V6(v6) => v6.segments()[..6] == V6_PREFIX,
    }
}

fn v4_of(index: u32) -> Ipv4Addr {
    let index = index as usize;
    let third = (index / PER_BLOCK) as u8;
    let fourth = (index % PER_BLOCK + 1) as u8;
    Ipv4Addr::new(V4_PREFIX[0], V4_PREFIX[1], third, fourth)
}

fn v6_of(index: u32) -> Ipv6Addr {
    let [_, _, third, fourth] = v4_of(index).octets();
    let [a, b, c, d, e, f] = V6_PREFIX;
    Ipv6Addr::new(a, b, c, d, e, f, 0, u16::from_be_bytes([third, fourth]))
}

/// An IPv4-mapped IPv6 address (`::ffff:127.1.0.1`, as a dual-stack listener reports it) as IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn index_of(ip: IpAddr) -> Option<u32> {
    if !is_mapped_range(ip) {
        return None;
    }
    let (third, fourth) = match canonical(ip) {
        IpAddr::V4(v4) => {
            let [_, _, third, fourth] = v4.octets();
            (third, fourth)
        }
        IpAddr::V6(v6) => {
            let segments = v6.segments();
            if segments[6] != 0 {
                return None;
            }
            let [third, fourth] = segments[7].to_be_bytes();
            (third, fourth)
        }
    };
    if fourth == 0 || fourth == 255 {
        return None;
    }
    Some(u32::from(third) * PER_BLOCK as u32 + u32::from(fourth) - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_to_address() {
        let cases: &[(u32, &str, &str)] = &[
            (0, "127.1.0.1", "fd68:6976:65::1"),
            (1, "127.1.0.2", "fd68:6976:65::2"),
            (253, "127.1.0.254", "fd68:6976:65::fe"),
            (254, "127.1.1.1", "fd68:6976:65::101"),
            (508, "127.1.2.1", "fd68:6976:65::201"),
            (CAPACITY as u32 - 1, "127.1.255.254", "fd68:6976:65::fffe"),
        ];
        for (index, v4, v6) in cases {
            assert_eq!(v4_of(*index).to_string(), *v4);
            assert_eq!(v6_of(*index).to_string(), *v6);
            let v4: IpAddr = v4.parse().expect("v4");
            let v6: IpAddr = v6.parse().expect("v6");
            assert_eq!(index_of(v4), Some(*index), "{v4}");
            assert_eq!(index_of(v6), Some(*index), "{v6}");
        }
    }

    #[test]
    fn addresses_outside_the_ranges() {
        let cases: &[(&str, bool)] = &[
            ("127.1.0.0", true),
            ("127.1.3.255", true),
            ("127.0.0.1", false),
            ("127.2.0.1", false),
            ("10.1.0.1", false),
            ("::1", false),
            ("fd68:6976:65::1:1", true),
            ("fd68:6976:66::1", false),
            ("::ffff:127.1.0.1", true),
        ];
        for (ip, in_range) in cases {
            let ip: IpAddr = ip.parse().expect("ip");
            assert_eq!(is_mapped_range(ip), *in_range, "{ip}");
            if !in_range {
                assert_eq!(index_of(ip), None, "{ip}");
            }
        }
        // In range but never a handed-out address: .0/.255 endings and a nonzero 7th segment.
        for ip in [
            "127.1.0.0",
            "127.1.3.255",
            "fd68:6976:65::1:1",
            "fd68:6976:65::100",
        ] {
            assert_eq!(index_of(ip.parse().expect("ip")), None, "{ip}");
        }
    }

    #[test]
    fn names_get_stable_addresses_and_map_back() {
        let table = NameTable::new();
        let a = table.address_for("api.github.com");
        let b = table.address_for("pypi.org");
        assert_eq!(a, Some(Ipv4Addr::new(127, 1, 0, 1)));
        assert_eq!(b, Some(Ipv4Addr::new(127, 1, 0, 2)));
        assert_eq!(table.address_for("api.github.com"), a);
        assert_eq!(table.lookup("pypi.org"), b);
        assert_eq!(table.lookup("example.com"), None);
        assert_eq!(
            table.address_v6_for("pypi.org"),
            Some("fd68:6976:65::2".parse().expect("v6"))
        );
        assert_eq!(table.len(), 2);

        let cases: &[(&str, Option<&str>)] = &[
            ("127.1.0.1", Some("api.github.com")),
            ("127.1.0.2", Some("pypi.org")),
            ("::ffff:127.1.0.2", Some("pypi.org")),
            ("fd68:6976:65::1", Some("api.github.com")),
            ("127.1.0.3", None),
            ("127.0.0.1", None),
            ("192.0.2.1", None),
        ];
        for (ip, name) in cases {
            let ip: IpAddr = ip.parse().expect("ip");
            assert_eq!(table.name_for(ip).as_deref(), *name, "{ip}");
        }
    }

    #[test]
    fn empty_names_get_nothing() {
        let table = NameTable::new();
        assert_eq!(table.address_for(""), None);
        assert!(table.is_empty());
    }

    #[test]
    fn a_full_table_keeps_its_mappings() {
        let table = NameTable::with_capacity(3);
        let mapped: Vec<_> = ["a.example", "b.example", "c.example"]
            .iter()
            .map(|n| table.address_for(n))
            .collect();
        assert!(mapped.iter().all(Option::is_some));
        assert!(table.is_full());
        assert_eq!(table.address_for("d.example"), None);
        assert_eq!(table.address_v6_for("d.example"), None);
        // Existing names still resolve and map back.
        assert_eq!(table.address_for("b.example"), mapped[1]);
        assert_eq!(
            table
                .name_for(IpAddr::V4(Ipv4Addr::new(127, 1, 0, 3)))
                .as_deref(),
            Some("c.example")
        );
    }

    #[test]
    fn the_whole_range_fills_without_bad_addresses() {
        let table = NameTable::new();
        let mut seen = std::collections::HashSet::new();
        for i in 0..CAPACITY {
            let ip = table.address_for(&format!("h{i}.example")).expect("room");
            let [a, b, _, last] = ip.octets();
            assert_eq!([a, b], V4_PREFIX);
            assert!(last != 0 && last != 255, "{ip}");
            assert!(seen.insert(ip), "{ip} handed out twice");
        }
        assert_eq!(table.address_for("one.more.example"), None);
        assert_eq!(
            table.name_for(IpAddr::V4(Ipv4Addr::new(127, 1, 255, 254))),
            Some(format!("h{}.example", CAPACITY - 1))
        );
    }

    #[test]
    fn denied_names_get_ring_addresses_and_are_refused() {
        let table = NameTable::with_capacities(CAPACITY, 3);
        let a = table.denied_address_for("a.example").expect("a");
        assert_eq!(a, Ipv4Addr::new(127, 2, 0, 1));
        assert_eq!(table.denied_address_for("a.example"), Some(a));
        let b = table.denied_address_for("b.example").expect("b");
        let c = table.denied_address_for("c.example").expect("c");
        assert_eq!(
            table.target_for(b.into()),
            Some(("b.example".to_string(), true))
        );
        // A fourth name evicts the oldest and takes its address.
        assert_eq!(table.denied_address_for("d.example"), Some(a));
        assert_eq!(
            table.target_for(a.into()),
            Some(("d.example".to_string(), true))
        );
        assert_eq!(table.denied_len(), 3);
        assert!(table.is_empty(), "denied names take no allowed slot");
        assert_eq!(table.target_for(Ipv4Addr::new(127, 2, 0, 9).into()), None);
        assert!(is_denied_range(c.into()));
        assert!(!is_mapped_range(c.into()));
        // Allowed names keep their own range.
        let allowed = table.address_for("ok.example").expect("ok");
        assert_eq!(
            table.target_for(allowed.into()),
            Some(("ok.example".to_string(), false))
        );
    }

    /// A million random denied names (as an agent might resolve) leave the table at its bound.
    #[test]
    fn a_million_denied_names_stay_bounded() {
        let table = NameTable::new();
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..1_000_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let name = format!("{seed:016x}.exfil.example");
            let ip = table.denied_address_for(&name).expect("address");
            assert!(is_denied_range(ip.into()));
        }
        assert_eq!(table.denied_len(), DENIED_CAPACITY);
        assert_eq!(table.denied.lock().slots.len(), DENIED_CAPACITY);
        assert!(table.is_empty());
    }

    #[test]
    fn concurrent_allocation_agrees() {
        let table = Arc::new(NameTable::new());
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let table = table.clone();
                std::thread::spawn(move || {
                    (0..200)
                        .map(|i| table.address_for(&format!("n{i}.example")))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let results: Vec<_> = handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect();
        assert!(results.windows(2).all(|w| w[0] == w[1]));
        assert_eq!(table.len(), 200);
    }
}
