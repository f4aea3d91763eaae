//! Longest-prefix match over CIDR ranges, IPv4 and IPv6.
//!
//! One hash map per prefix length present, probed from the longest length down: the first hit
//! is the longest range holding the address. Why this rather than a trie crate: real tables
//! (corporate egress, VPN pools, cloud ranges, threat-intel lists) use a handful of distinct
//! lengths (AWS's 9,000-odd published ranges use about 20), so a lookup is that many hash probes
//! of one integer with no pointer chasing, memory is one entry per range, building is one
//! insert per row, and overlapping ranges need no special handling. It needs no new dependency,
//! and the structure is small enough to be checked by reading. A trie wins only with many
//! distinct lengths and millions of ranges, where an mmdb table is the better fit anyway.

use std::collections::HashMap;
use std::net::IpAddr;

/// Ranges of one address family, by prefix length.
#[derive(Debug, Default)]
struct Family {
    /// `(length, masked network -> row)`, longest first.
    levels: Vec<(u8, HashMap<u128, u32>)>,
}

impl Family {
    fn insert(&mut self, bits: u8, network: u128, len: u8, row: u32) -> bool {
        let pos = match self.levels.binary_search_by(|(l, _)| len.cmp(l)) {
            Ok(p) => p,
            Err(p) => {
                self.levels.insert(p, (len, HashMap::new()));
                p
            }
        };
        let masked = mask(network, bits, len);
        match self.levels.get_mut(pos) {
            Some((_, map)) => map.insert(masked, row).is_none(),
            None => false,
        }
    }

    fn get(&self, bits: u8, addr: u128) -> Option<u32> {
        self.levels
            .iter()
            .find_map(|(len, map)| map.get(&mask(addr, bits, *len)).copied())
    }

    fn len(&self) -> usize {
        self.levels.iter().map(|(_, m)| m.len()).sum()
    }
}

/// `addr` with all but its first `len` of `bits` bits cleared.
fn mask(addr: u128, bits: u8, len: u8) -> u128 {
    if len == 0 {
        return 0;
    }
    let len = len.min(bits);
    let keep = u128::MAX << (128 - u32::from(len));
    // Addresses are right-aligned in `bits`: shift the mask down to them.
    addr & (keep >> (128 - u32::from(bits)))
}

/// A parsed range: family, network and prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub addr: IpAddr,
    pub len: u8,
}

/// Parses `a.b.c.d/n`, `x::/n`, or a single address (a full-length range). Host bits below
/// the prefix are allowed and ignored, as most published lists carry some. An IPv4-mapped
/// range (`::ffff:10.0.0.0/104`) is its IPv4 range, as looked-up addresses are.
pub fn parse_range(text: &str) -> Option<Range> {
    let text = text.trim();
    let (addr, len) = match text.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (text, None),
    };
    let addr: IpAddr = addr.parse().ok()?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let len = match len {
        // Digits only: `u8::from_str` would also take `+8`.
        Some(l) if !l.is_empty() && l.bytes().all(|b| b.is_ascii_digit()) => {
            l.parse::<u8>().ok().filter(|&l| l <= max)?
        }
        Some(_) => return None,
        None => max,
    };
    if let IpAddr::V6(v6) = addr
        && let Some(v4) = v6.to_ipv4_mapped()
        && len >= 96
    {
        return Some(Range {
            addr: IpAddr::V4(v4),
            len: len - 96,
        });
    }
    Some(Range { addr, len })
}

#[derive(Debug, Default)]
pub struct CidrIndex {
    v4: Family,
    v6: Family,
}

impl CidrIndex {
    /// False when the same range is already in the index.
    pub fn insert(&mut self, range: Range, row: u32) -> bool {
        match range.addr {
            IpAddr::V4(a) => self.v4.insert(32, u128::from(u32::from(a)), range.len, row),
            IpAddr::V6(a) => self.v6.insert(128, u128::from(a), range.len, row),
        }
    }

    /// The row of the longest range holding `ip` (an IPv4-mapped IPv6 address is IPv4).
    pub fn get(&self, ip: IpAddr) -> Option<u32> {
        match ip.to_canonical() {
            IpAddr::V4(a) => self.v4.get(32, u128::from(u32::from(a))),
            IpAddr::V6(a) => self.v6.get(128, u128::from(a)),
        }
    }

    pub fn len(&self) -> usize {
        self.v4.len() + self.v6.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Approximate heap bytes (hash map entries and control bytes).
    pub fn heap_bytes(&self) -> usize {
        self.len() * (std::mem::size_of::<(u128, u32)>() + 8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index(ranges: &[&str]) -> CidrIndex {
        let mut ix = CidrIndex::default();
        for (i, r) in ranges.iter().enumerate() {
            assert!(ix.insert(parse_range(r).unwrap(), i as u32), "{r}");
        }
        ix
    }

    fn at(ix: &CidrIndex, ip: &str) -> Option<u32> {
        ix.get(ip.parse().unwrap())
    }

    #[test]
    fn the_longest_overlapping_range_wins_in_both_families() {
        let ix = index(&[
            "10.0.0.0/8",
            "10.1.0.0/16",
            "10.1.2.0/24",
            "10.1.2.3",
            "0.0.0.0/0",
            "2001:db8::/32",
            "2001:db8:1::/48",
            "::/0",
        ]);
        assert_eq!(at(&ix, "10.1.2.3"), Some(3));
        assert_eq!(at(&ix, "10.1.2.4"), Some(2));
        assert_eq!(at(&ix, "10.1.3.4"), Some(1));
        assert_eq!(at(&ix, "10.200.0.1"), Some(0));
        assert_eq!(at(&ix, "192.0.2.1"), Some(4));
        assert_eq!(at(&ix, "::ffff:10.1.2.3"), Some(3), "mapped IPv4 is IPv4");
        assert_eq!(at(&ix, "2001:db8:1::5"), Some(6));
        assert_eq!(at(&ix, "2001:db8:2::5"), Some(5));
        assert_eq!(at(&ix, "2a00::1"), Some(7));
        assert_eq!(ix.len(), 8);
    }

    #[test]
    fn an_ipv4_mapped_range_holds_the_ipv4_addresses_it_maps() {
        let ix = index(&["::ffff:10.0.0.0/104", "::ffff:192.0.2.7"]);
        assert_eq!(at(&ix, "10.9.9.9"), Some(0));
        assert_eq!(at(&ix, "::ffff:10.9.9.9"), Some(0));
        assert_eq!(at(&ix, "192.0.2.7"), Some(1));
        assert_eq!(at(&ix, "11.0.0.1"), None);
        assert_eq!(
            parse_range("::ffff:0.0.0.0/96").map(|r| r.len),
            Some(0),
            "all of IPv4"
        );
    }

    #[test]
    fn host_bits_are_ignored_duplicates_and_nonsense_are_refused() {
        let ix = index(&["192.168.1.77/24"]);
        assert_eq!(at(&ix, "192.168.1.1"), Some(0));
        assert_eq!(at(&ix, "192.168.2.1"), None);
        let mut ix = CidrIndex::default();
        assert!(ix.insert(parse_range("10.0.0.0/8").unwrap(), 0));
        assert!(!ix.insert(parse_range("10.9.9.9/8").unwrap(), 1));
        for bad in [
            "10.0.0.0/33",
            "::/129",
            "10.0.0/8",
            "x",
            "10.0.0.0/",
            "10.0.0.0/+8",
            "10.0.0.0/ 8",
            "/8",
            "",
        ] {
            assert_eq!(parse_range(bad), None, "{bad}");
        }
    }
}
