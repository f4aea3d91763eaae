//! Enrichment tables: what the organization knows (accounts, address ranges, threat lists),
//! loaded from CSV, JSON lines or mmdb files and looked up by a value of each event.
//!
//! A [`Table`] is parsed and checked whole before anything uses it: a row that does not parse,
//! a missing key, a repeated key or an unusable mmdb fails the load, naming the table, its
//! location and the line. Tables are immutable once built; [`live::LiveTables`] swaps in new
//! versions, and [`stage::LookupStage`] joins them into events.

pub mod cidr;
pub mod live;
pub mod organizations;
pub mod stage;

use std::collections::HashMap;
use std::io::Read;
use std::net::IpAddr;

use maxminddb::{PathElement, Reader};

use crate::config::enrich::{MatchKind, TableConfig, TableFormat};
use cidr::CidrIndex;

/// Why a table cannot be used. Every message names the table and where it came from.
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error("table {name:?}: cannot read {location}: {detail}")]
    Read {
        name: String,
        location: String,
        detail: String,
    },
    #[error("table {name:?}: {location} is not a usable {format} table: {detail}")]
    Invalid {
        name: String,
        location: String,
        format: &'static str,
        detail: String,
    },
    #[error(
        "enrich.lookups.add: table {name:?} ({location}) has no column {column:?} for field \
         {field:?}; its columns are {columns}"
    )]
    MissingColumn {
        name: String,
        location: String,
        field: String,
        column: String,
        columns: String,
    },
}

/// How rows are found.
enum Index {
    Exact(HashMap<Box<str>, u32>),
    /// Keys lower-cased at load; looked-up values are lower-cased too.
    Folded(HashMap<Box<str>, u32>),
    Cidr(CidrIndex),
    Mmdb(Reader<Vec<u8>>),
}

/// One loaded, checked table.
pub struct Table {
    columns: Vec<Box<str>>,
    /// The non-empty cells of each row as `(column, value)`, sorted by column: sparse, so that
    /// memory follows the input's size even when JSON lines bring a new column each. Empty for
    /// mmdb.
    rows: Vec<Box<[Cell]>>,
    index: Index,
    heap_bytes: usize,
}

/// Where a lookup landed.
pub enum Hit<'t> {
    /// A row of a CSV or JSON lines table.
    Row(u32),
    /// An mmdb record, read on demand.
    Record(maxminddb::LookupResult<'t, Vec<u8>>),
}

impl Table {
    /// Parses `bytes` (gzip-compressed or not) as `spec` describes. `location` names the source
    /// in errors.
    pub fn parse(spec: &TableConfig, location: &str, bytes: Vec<u8>) -> Result<Table, TableError> {
        let format = spec.format();
        let invalid = |detail: String| TableError::Invalid {
            name: spec.name.clone(),
            location: location.to_owned(),
            format: format.as_str(),
            detail,
        };
        let bytes = gunzip(bytes, spec.max_bytes).map_err(&invalid)?;
        match format {
            TableFormat::Mmdb => parse_mmdb(bytes).map_err(invalid),
            TableFormat::Csv | TableFormat::Jsonl => {
                let key = spec.key.as_deref().unwrap_or_default();
                let (columns, rows) = match format {
                    TableFormat::Csv => read_csv(&bytes, key),
                    _ => read_jsonl(&bytes, key),
                }
                .map_err(&invalid)?;
                build(columns, rows, key, spec.match_kind()).map_err(invalid)
            }
        }
    }

    pub fn columns(&self) -> &[Box<str>] {
        &self.columns
    }

    pub fn rows(&self) -> usize {
        match &self.index {
            Index::Mmdb(r) => usize::try_from(r.metadata().node_count).unwrap_or(usize::MAX),
            _ => self.rows.len(),
        }
    }

    pub fn is_mmdb(&self) -> bool {
        matches!(self.index, Index::Mmdb(_))
    }

    /// Approximate heap bytes the table holds.
    pub fn heap_bytes(&self) -> usize {
        self.heap_bytes
    }

    /// Column `c` of row `r`.
    pub fn cell(&self, r: u32, c: usize) -> Option<&str> {
        row_cell(self.rows.get(r as usize)?, c)
    }

    /// Finds `value`'s row. `scratch` is reused for lower-casing.
    pub fn find(&self, value: &str, scratch: &mut String) -> Option<Hit<'_>> {
        match &self.index {
            Index::Exact(map) => map.get(value).map(|&r| Hit::Row(r)),
            Index::Folded(map) => {
                scratch.clear();
                scratch.extend(value.chars().flat_map(char::to_lowercase));
                map.get(scratch.as_str()).map(|&r| Hit::Row(r))
            }
            Index::Cidr(ix) => ix.get(value.parse::<IpAddr>().ok()?).map(Hit::Row),
            Index::Mmdb(reader) => {
                let ip = value.parse::<IpAddr>().ok()?.to_canonical();
                // An IPv6 address in an IPv4-only database is an error, not a miss: both are
                // "nothing here".
                let found = reader.lookup(ip).ok()?;
                found.has_data().then_some(Hit::Record(found))
            }
        }
    }
}

impl Table {
    /// What a module's `lookup(table, key)` returns: the found row's non-empty cells as
    /// `(column, value)` in column order, or an mmdb record's scalars by dotted path
    /// (`country.iso_code`, `subdivisions.0.iso_code`). None when `key` is not in the table.
    pub fn pairs(&self, key: &str) -> Option<Vec<(String, String)>> {
        let mut scratch = String::new();
        match self.find(key, &mut scratch)? {
            Hit::Row(r) => {
                let row = self.rows.get(r as usize)?;
                Some(
                    row.iter()
                        .filter_map(|(c, v)| {
                            let name = self.columns.get(*c as usize)?;
                            Some((name.to_string(), v.to_string()))
                        })
                        .collect(),
                )
            }
            Hit::Record(found) => {
                let record = found.decode::<serde_json::Value>().ok()??;
                let mut out = Vec::new();
                flatten(&mut String::new(), &record, &mut out);
                Some(out)
            }
        }
    }
}

/// The scalars of `value` by dotted path, depth first.
fn flatten(path: &mut String, value: &serde_json::Value, out: &mut Vec<(String, String)>) {
    use serde_json::Value;
    let mut nest = |path: &mut String, name: &str, v: &Value| {
        let mark = path.len();
        if !path.is_empty() {
            path.push('.');
        }
        path.push_str(name);
        flatten(path, v, out);
        path.truncate(mark);
    };
    match value {
        Value::Object(m) => m.iter().for_each(|(k, v)| nest(path, k, v)),
        Value::Array(a) => a
            .iter()
            .enumerate()
            .for_each(|(i, v)| nest(path, &i.to_string(), v)),
        Value::String(s) => out.push((path.clone(), s.clone())),
        Value::Number(n) => out.push((path.clone(), n.to_string())),
        Value::Bool(b) => out.push((path.clone(), b.to_string())),
        Value::Null => {}
    }
}

/// The text of a dotted path (`country.iso_code`, `subdivisions.0.iso_code`) in an mmdb record;
/// scalars only.
pub fn record_text(found: &maxminddb::LookupResult<'_, Vec<u8>>, path: &str) -> Option<String> {
    let elements: Vec<PathElement<'_>> = path
        .split('.')
        .map(|p| match p.parse::<usize>() {
            Ok(i) => PathElement::Index(i),
            Err(_) => PathElement::Key(p),
        })
        .collect();
    match found.decode_path::<serde_json::Value>(&elements).ok()?? {
        serde_json::Value::String(s) => Some(s),
        serde_json::Value::Number(n) => Some(n.to_string()),
        serde_json::Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// Gzip-compressed bytes (by their magic number) decompressed, at most `max` of them.
fn gunzip(bytes: Vec<u8>, max: u64) -> Result<Vec<u8>, String> {
    if bytes.len() as u64 > max {
        return Err(format!("{} bytes, over max_bytes = {max}", bytes.len()));
    }
    if !bytes.starts_with(&[0x1f, 0x8b]) {
        return Ok(bytes);
    }
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(bytes.as_slice())
        .take(max.saturating_add(1))
        .read_to_end(&mut out)
        .map_err(|e| format!("gzip: {e}"))?;
    if out.len() as u64 > max {
        return Err(format!("decompresses to over max_bytes = {max}"));
    }
    Ok(out)
}

/// A non-empty cell: its column and text.
type Cell = (u32, Box<str>);
/// Each row's cells and the line it starts on, for errors.
type Rows = Vec<(Vec<Cell>, u64)>;

/// Column `c` of a row sorted by column.
fn row_cell(row: &[Cell], c: usize) -> Option<&str> {
    let c = u32::try_from(c).ok()?;
    let at = row.binary_search_by_key(&c, |(col, _)| *col).ok()?;
    row.get(at).map(|(_, v)| &**v)
}

/// `(c, s)` unless `s` is empty (or there are over 4 billion columns).
fn cell(c: usize, s: &str) -> Option<Cell> {
    (!s.is_empty())
        .then(|| u32::try_from(c).ok().map(|c| (c, s.into())))
        .flatten()
}

/// Header and rows; the key column is checked to exist.
fn read_csv(bytes: &[u8], key: &str) -> Result<(Vec<Box<str>>, Rows), String> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .from_reader(bytes);
    let header = reader
        .headers()
        .map_err(|e| format!("header row: {e}"))?
        .clone();
    let columns: Vec<Box<str>> = header.iter().map(|h| h.trim().into()).collect();
    if !columns.iter().any(|c| &**c == key) {
        return Err(format!(
            "the header has no key column {key:?} (columns: {})",
            columns.join(", ")
        ));
    }
    let mut rows = Vec::new();
    // Newlines before `counted`: blank lines are skipped and quoted cells may span lines, so
    // a record's line is counted from its byte offset.
    let (mut counted, mut newlines) = (0usize, 0u64);
    for record in reader.records() {
        let record = record.map_err(|e| e.to_string())?;
        let at = record
            .position()
            .and_then(|p| usize::try_from(p.byte()).ok())
            .unwrap_or(counted);
        // The offset is where the reader started, before the blank lines it skipped.
        let at = bytes
            .get(at..)
            .and_then(|rest| rest.iter().position(|b| !matches!(b, b'\n' | b'\r')))
            .map_or(at, |skip| at + skip);
        if let Some(gap) = bytes.get(counted..at) {
            newlines += memchr::memchr_iter(b'\n', gap).count() as u64;
            counted = at;
        }
        let line = newlines + 1;
        // In column order: already sorted.
        rows.push((
            record
                .iter()
                .enumerate()
                .filter_map(|(c, s)| cell(c, s))
                .collect(),
            line,
        ));
    }
    Ok((columns, rows))
}

/// Columns in order of first appearance; strings as they are, numbers and booleans as text,
/// objects and arrays as their JSON text, null as an empty cell.
fn read_jsonl(bytes: &[u8], key: &str) -> Result<(Vec<Box<str>>, Rows), String> {
    let mut columns: Vec<Box<str>> = vec![key.into()];
    let mut by_name: HashMap<String, usize> = HashMap::from([(key.to_owned(), 0)]);
    let mut rows: Rows = Vec::new();
    for (n, line) in bytes.split(|&b| b == b'\n').enumerate() {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let object: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(line)
            .map_err(|e| format!("line {}: not a JSON object: {e}", n + 1))?;
        let mut row: Vec<Cell> = Vec::with_capacity(object.len());
        for (name, value) in object {
            let c = match by_name.get(&name) {
                Some(&c) => c,
                None => {
                    columns.push(name.as_str().into());
                    by_name.insert(name, columns.len() - 1);
                    columns.len() - 1
                }
            };
            let text = match value {
                serde_json::Value::Null => None,
                serde_json::Value::String(s) => cell(c, &s),
                other => cell(c, &other.to_string()),
            };
            row.extend(text);
        }
        // An object's names are unique (serde_json keeps the last of a repeated one).
        row.sort_unstable_by_key(|(c, _)| *c);
        rows.push((row, n as u64 + 1));
    }
    Ok((columns, rows))
}

/// Indexes the rows by their key column.
fn build(columns: Vec<Box<str>>, rows: Rows, key: &str, kind: MatchKind) -> Result<Table, String> {
    let key_col = columns
        .iter()
        .position(|c| &**c == key)
        .ok_or_else(|| format!("no key column {key:?}"))?;
    let mut exact: HashMap<Box<str>, u32> = HashMap::with_capacity(rows.len());
    let mut cidr = CidrIndex::default();
    let mut heap = 0usize;
    let line = |i: usize| rows.get(i).map_or(0, |(_, l)| *l);
    for (i, (row, _)) in rows.iter().enumerate() {
        let r = u32::try_from(i).map_err(|_| "more than 4 billion rows".to_owned())?;
        let raw = row_cell(row, key_col)
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .ok_or_else(|| format!("row {} (line {}) has no {key:?}", i + 1, line(i)))?;
        heap += row
            .iter()
            .map(|(_, v)| std::mem::size_of::<Cell>() + v.len())
            .sum::<usize>();
        let fresh = match kind {
            MatchKind::Cidr => {
                let range = cidr::parse_range(raw).ok_or_else(|| {
                    format!(
                        "row {} (line {}): {raw:?} is not a CIDR range or an address",
                        i + 1,
                        line(i)
                    )
                })?;
                cidr.insert(range, r)
            }
            MatchKind::Exact => exact.insert(raw.into(), r).is_none(),
            MatchKind::CaseInsensitive => {
                let folded: String = raw.chars().flat_map(char::to_lowercase).collect();
                exact.insert(folded.into(), r).is_none()
            }
        };
        if !fresh {
            return Err(format!(
                "row {} (line {}): key {raw:?} appears twice",
                i + 1,
                line(i)
            ));
        }
    }
    let index = match kind {
        MatchKind::Cidr => {
            heap += cidr.heap_bytes();
            Index::Cidr(cidr)
        }
        MatchKind::Exact | MatchKind::CaseInsensitive => {
            heap += exact.keys().map(|k| k.len() + 32).sum::<usize>();
            if kind == MatchKind::Exact {
                Index::Exact(exact)
            } else {
                Index::Folded(exact)
            }
        }
    };
    Ok(Table {
        columns,
        rows: rows
            .into_iter()
            .map(|(cells, _)| cells.into_boxed_slice())
            .collect(),
        index,
        heap_bytes: heap,
    })
}

/// Opens an mmdb after walking its whole search tree and decoding records spread across it
/// (the same check as the GeoIP databases get).
fn parse_mmdb(bytes: Vec<u8>) -> Result<Table, String> {
    {
        let reader =
            Reader::from_source(bytes.as_slice()).map_err(|e| format!("not an mmdb file: {e}"))?;
        let samples = crate::enrich::geo::check_search_tree(&bytes, reader.metadata())?;
        for ip in samples {
            reader
                .lookup(ip)
                .and_then(|found| found.decode::<serde_json::Value>())
                .map_err(|e| format!("record for {ip} does not decode: {e}"))?;
        }
    }
    let heap_bytes = bytes.len();
    let reader = Reader::from_source(bytes).map_err(|e| format!("not an mmdb file: {e}"))?;
    Ok(Table {
        columns: Vec::new(),
        rows: Vec::new(),
        index: Index::Mmdb(reader),
        heap_bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(path: &str, key: Option<&str>, kind: Option<MatchKind>) -> TableConfig {
        TableConfig {
            name: "t".into(),
            path: path.into(),
            format: None,
            key: key.map(Into::into),
            match_kind: kind,
            region: None,
            endpoint_url: None,
            force_path_style: false,
            max_bytes: 1 << 20,
        }
    }

    fn row_of(t: &Table, value: &str) -> Option<u32> {
        match t.find(value, &mut String::new()) {
            Some(Hit::Row(r)) => Some(r),
            _ => None,
        }
    }

    #[test]
    fn pairs_are_a_rows_non_empty_cells_in_column_order_and_an_mmdb_records_scalars() {
        let csv = b"cidr,label,owner\n10.0.0.0/8,corp,\n10.1.0.0/16,vpn,net\n";
        let s = spec("e.csv", Some("cidr"), Some(MatchKind::Cidr));
        let t = Table::parse(&s, "e.csv", csv.to_vec()).unwrap();
        let pairs = |k: &str| t.pairs(k);
        assert_eq!(
            pairs("10.1.2.3").unwrap(),
            [("cidr", "10.1.0.0/16"), ("label", "vpn"), ("owner", "net")]
                .map(|(c, v)| (c.to_owned(), v.to_owned()))
        );
        assert_eq!(
            pairs("10.9.9.9").unwrap(),
            [("cidr", "10.0.0.0/8"), ("label", "corp")].map(|(c, v)| (c.to_owned(), v.to_owned()))
        );
        assert_eq!(pairs("192.0.2.1"), None);
        assert_eq!(pairs("not an address"), None);
        let mut out = Vec::new();
        let record = serde_json::json!({"country": {"iso_code": "GB"}, "subdivisions": [{"iso_code": "ENG"}], "x": null, "n": 3});
        flatten(&mut String::new(), &record, &mut out);
        out.sort();
        assert_eq!(
            out,
            [
                ("country.iso_code", "GB"),
                ("n", "3"),
                ("subdivisions.0.iso_code", "ENG")
            ]
            .map(|(c, v)| (c.to_owned(), v.to_owned()))
        );
    }

    #[test]
    fn csv_rows_are_found_exactly_or_ignoring_case() {
        let csv = b"account_id,name,env\n111122223333,Prod \"Main\",prod\n444455556666,Dev,\n";
        let s = spec("a.csv", Some("account_id"), None);
        let t = Table::parse(&s, "a.csv", csv.to_vec()).unwrap();
        assert_eq!(row_of(&t, "111122223333"), Some(0));
        assert_eq!(t.cell(0, 1), Some("Prod \"Main\""));
        assert_eq!(t.cell(1, 2), None, "an empty cell is absent");
        assert_eq!(row_of(&t, "999"), None);

        let csv = "arn,who\narn:aws:iam::1:role/Break-Glass,oncall\nÄrger,x\n";
        let s = spec("r.csv", Some("arn"), Some(MatchKind::CaseInsensitive));
        let t = Table::parse(&s, "r.csv", csv.as_bytes().to_vec()).unwrap();
        assert_eq!(row_of(&t, "ARN:AWS:IAM::1:ROLE/BREAK-GLASS"), Some(0));
        assert_eq!(row_of(&t, "äRGER"), Some(1));
    }

    #[test]
    fn jsonl_columns_are_the_union_of_keys() {
        let jl = b"{\"cidr\":\"10.0.0.0/8\",\"label\":\"corp\"}\n\n{\"cidr\":\"2001:db8::/32\",\"n\":3,\"tags\":[1]}\n";
        let s = spec("e.jsonl", Some("cidr"), Some(MatchKind::Cidr));
        let t = Table::parse(&s, "e.jsonl", jl.to_vec()).unwrap();
        assert_eq!(t.columns().len(), 4);
        assert_eq!(row_of(&t, "10.3.4.5"), Some(0));
        assert_eq!(row_of(&t, "2001:db8::1"), Some(1));
        assert_eq!(t.cell(1, 2), Some("3"));
        assert_eq!(t.cell(0, 2), None);
    }

    #[test]
    fn memory_stays_linear_in_the_input_when_every_json_line_brings_a_new_column() {
        // Padding every row to the union of columns would hold rows x columns cells.
        let mut jl = String::new();
        for i in 0..2000 {
            jl.push_str(&format!("{{\"id\":\"{i}\",\"c{i}\":\"v\"}}\n"));
        }
        let s = spec("w.jsonl", Some("id"), None);
        let t = Table::parse(&s, "w.jsonl", jl.clone().into_bytes()).unwrap();
        assert_eq!(t.columns().len(), 2001);
        assert_eq!(t.cell(7, 8), Some("v"));
        assert_eq!(t.cell(7, 9), None);
        assert!(
            t.heap_bytes() < 64 * jl.len(),
            "{} for {}",
            t.heap_bytes(),
            jl.len()
        );
    }

    #[test]
    fn broken_tables_are_refused_with_the_line() {
        let s = spec("a.csv", Some("id"), None);
        let bad: [(&[u8], &str); 5] = [
            (b"name\nx\n", "no key column \"id\""),
            (b"id,name\n1,a\n1,b\n", "line 3"),
            (b"id,name\n1,a\n2\n", "record"),
            (b"id,name\n,a\n", "has no \"id\""),
            (b"id,name\n1,\xff\n", "utf-8"),
        ];
        for (text, needle) in bad {
            let e = Table::parse(&s, "here.csv", text.to_vec())
                .err()
                .unwrap()
                .to_string();
            assert!(
                e.to_lowercase().contains(needle) && e.contains("here.csv"),
                "{e}"
            );
        }
        let s = spec("a.jsonl", Some("id"), None);
        let e = Table::parse(&s, "x", b"{\"id\":1}\n[1]\n".to_vec())
            .err()
            .unwrap();
        assert!(e.to_string().contains("line 2"), "{e}");
        // The line a repeated key is on, past blank lines and cells spanning lines.
        let e = Table::parse(&s, "x", b"{\"id\":1}\n{\"id\":1}\n\n{\"id\":2}\n".to_vec())
            .err()
            .unwrap();
        assert!(e.to_string().contains("(line 2)"), "{e}");
        let s = spec("a.csv", Some("id"), None);
        let e = Table::parse(&s, "x", b"id,note\n1,\"a\nb\"\n\n1,c\n".to_vec())
            .err()
            .unwrap();
        assert!(e.to_string().contains("(line 5)"), "{e}");
        let s = spec("a.csv", Some("cidr"), Some(MatchKind::Cidr));
        let e = Table::parse(&s, "x", b"cidr\n10.0.0.0/40\n".to_vec())
            .err()
            .unwrap();
        assert!(e.to_string().contains("not a CIDR"), "{e}");
        let s = spec("a.mmdb", None, None);
        let e = Table::parse(&s, "x", b"not an mmdb".to_vec())
            .err()
            .unwrap();
        assert!(e.to_string().contains("mmdb"), "{e}");
    }

    #[test]
    fn an_mmdb_table_answers_paths_of_its_records() {
        let demo =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/geoip/demo-city.mmdb");
        let s = spec("demo.mmdb", None, None);
        let t = Table::parse(&s, "demo", std::fs::read(demo).unwrap()).unwrap();
        assert!(t.is_mmdb());
        let Some(Hit::Record(found)) = t.find("52.94.0.1", &mut String::new()) else {
            panic!("52.94.0.1 is in the demo database");
        };
        assert!(record_text(&found, "country.iso_code").is_some());
        assert_eq!(record_text(&found, "no.such.path"), None);
        assert!(t.find("not an address", &mut String::new()).is_none());
    }
}
