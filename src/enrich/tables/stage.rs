//! The built-in lookup stage: for each `[[enrich.lookups]]` entry, the event's `from` value is
//! looked up and the chosen columns are spliced in as `"field":{"column":"value",…}`, as geo
//! is, without re-serializing the event. Values are JSON strings; empty cells are left out, and
//! a row with none of the columns adds nothing.
//!
//! Fragments of CSV and JSON lines rows are rendered once per table version ([`Lookups`]), so
//! a found key costs one hash probe and one copy; mmdb records are read per event.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, Visitor};
use serde_json::value::RawValue;

use super::{Hit, Table, TableError, record_text};
use crate::cloudtrail::Head;
use crate::config::enrich::LookupConfig;
use crate::metrics::{self, TableLookups};

/// Where an event's value comes from: a field the splitter already read, or any other path.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Field {
    SourceIp,
    Account,
    Region,
    EventSource,
    EventName,
    EventId,
    EventType,
    Path(Vec<String>),
}

impl Field {
    fn parse(from: &str) -> Field {
        match from {
            "sourceIPAddress" => Field::SourceIp,
            "recipientAccountId" => Field::Account,
            "awsRegion" => Field::Region,
            "eventSource" => Field::EventSource,
            "eventName" => Field::EventName,
            "eventID" => Field::EventId,
            "eventType" => Field::EventType,
            path => Field::Path(path.split('.').map(str::to_owned).collect()),
        }
    }

    fn value<'a>(&self, head: &'a Head<'_>, raw: &'a [u8]) -> Option<Cow<'a, str>> {
        let borrowed = |c: &'a Option<Cow<'_, str>>| c.as_deref().map(Cow::Borrowed);
        match self {
            Field::SourceIp => borrowed(&head.source_ip),
            Field::Account => borrowed(&head.account),
            Field::Region => borrowed(&head.region),
            Field::EventSource => borrowed(&head.event_source),
            Field::EventName => borrowed(&head.event_name),
            Field::EventId => borrowed(&head.event_id),
            Field::EventType => borrowed(&head.event_type),
            Field::Path(path) => path_value(raw, path),
        }
    }
}

/// The scalar at `path` in the JSON object `raw`, as text (strings unescaped, numbers and
/// booleans as written). Walks only the objects on the path; other members are skipped unread.
fn path_value<'a>(raw: &'a [u8], path: &[String]) -> Option<Cow<'a, str>> {
    // The first step reads the event itself (no pass to validate it first: the splitter has).
    let (first, rest) = path.split_first()?;
    let mut current: &'a RawValue = Member(first)
        .deserialize(&mut serde_json::Deserializer::from_slice(raw))
        .ok()??;
    for segment in rest {
        let mut de = serde_json::Deserializer::from_str(current.get());
        current = Member(segment).deserialize(&mut de).ok()??;
    }
    let text = current.get();
    match text.as_bytes().first()? {
        // Borrowed unless the string has escapes.
        b'"' => serde_json::from_str::<&'a str>(text)
            .map(Cow::Borrowed)
            .ok()
            .or_else(|| serde_json::from_str::<String>(text).ok().map(Cow::Owned)),
        b'{' | b'[' | b'n' => None,
        _ => Some(Cow::Borrowed(text)),
    }
}

/// Deserializes an object into the raw value of its member `.0` (None when absent).
struct Member<'p>(&'p str);

impl<'de> DeserializeSeed<'de> for Member<'_> {
    type Value = Option<&'de RawValue>;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for Member<'_> {
    type Value = Option<&'de RawValue>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut found = None;
        while let Some(is_it) = map.next_key_seed(KeyIs(self.0))? {
            if is_it && found.is_none() {
                found = Some(map.next_value::<&'de RawValue>()?);
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(found)
    }
}

/// A key compared with the wanted name, without allocating for it.
struct KeyIs<'p>(&'p str);

impl<'de> DeserializeSeed<'de> for KeyIs<'_> {
    type Value = bool;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeyIs<'_> {
    type Value = bool;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a key")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<bool, E> {
        Ok(v == self.0)
    }
}

/// One field added from one table.
struct Entry {
    table_name: Arc<str>,
    table: Arc<Table>,
    from: Field,
    /// Field name, to label counts.
    field: String,
    /// `"field":{` rendered once.
    open: Vec<u8>,
    /// Column names wanted, and their index in a row table.
    columns: Vec<(String, Option<usize>)>,
    /// Row tables: the whole fragment of each row (empty when the row has none of the columns).
    fragments: Vec<Box<[u8]>>,
}

/// The lookups of one generation of tables, and the tables themselves (for modules' `lookup`),
/// shared by the workers.
#[derive(Default)]
pub struct Lookups {
    entries: Vec<Entry>,
    tables: Vec<(Arc<str>, Arc<Table>)>,
}

impl Lookups {
    /// Binds each lookup to its table (`tables` by name) and renders the row fragments. A
    /// column the table does not have fails, naming it.
    pub fn compile(
        lookups: &[LookupConfig],
        tables: &[(Arc<str>, String, Arc<Table>)],
    ) -> Result<Lookups, TableError> {
        let mut entries = Vec::new();
        for l in lookups {
            let Some((name, location, table)) = tables.iter().find(|(n, ..)| **n == *l.table)
            else {
                // `EnrichConfig::validate` refuses lookups of unknown tables.
                continue;
            };
            for (field, wanted) in &l.add {
                let mut columns = Vec::with_capacity(wanted.len());
                for c in wanted {
                    let at = table.columns().iter().position(|h| **h == **c);
                    if at.is_none() && !table.is_mmdb() {
                        return Err(TableError::MissingColumn {
                            name: name.to_string(),
                            location: location.clone(),
                            field: field.clone(),
                            column: c.clone(),
                            columns: table.columns().join(", "),
                        });
                    }
                    columns.push((c.clone(), at));
                }
                let mut open = Vec::new();
                push_json_str(&mut open, field);
                open.extend_from_slice(b":{");
                let mut entry = Entry {
                    table_name: name.clone(),
                    table: table.clone(),
                    from: Field::parse(&l.from),
                    field: field.clone(),
                    open,
                    columns,
                    fragments: Vec::new(),
                };
                if !table.is_mmdb() {
                    let rows = u32::try_from(table.rows()).unwrap_or(u32::MAX);
                    entry.fragments = (0..rows)
                        .map(|r| {
                            let mut out = Vec::new();
                            entry.render(&mut out, |c| {
                                c.1.and_then(|i| table.cell(r, i)).map(Cow::Borrowed)
                            });
                            out.into_boxed_slice()
                        })
                        .collect();
                }
                entries.push(entry);
            }
        }
        let tables = tables
            .iter()
            .map(|(n, _, t)| (n.clone(), t.clone()))
            .collect();
        Ok(Lookups { entries, tables })
    }

    /// The table named `name` in this generation.
    pub fn table(&self, name: &str) -> Option<&Table> {
        self.tables
            .iter()
            .find(|(n, _)| **n == *name)
            .map(|(_, t)| &**t)
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The member a lookup adds that `name` is, ignoring ASCII case: readers such as Athena's
    /// JSON SerDe fold key case, so `"Account"` beside `"account"` is a duplicate key to them.
    pub fn added_as(&self, name: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|e| e.field.eq_ignore_ascii_case(name))
            .map(|e| &*e.field)
    }

    /// Approximate heap bytes of the fragments rendered from `table`.
    pub fn heap_bytes_for(&self, table: &str) -> usize {
        self.entries
            .iter()
            .filter(|e| &*e.table_name == table)
            .flat_map(|e| e.fragments.iter())
            .map(|f| f.len() + 16)
            .sum()
    }
}

impl Entry {
    /// Appends `"field":{"col":"value",…}`, or nothing when no column has a value.
    fn render<'v>(
        &self,
        out: &mut Vec<u8>,
        mut value: impl FnMut(&(String, Option<usize>)) -> Option<Cow<'v, str>>,
    ) {
        let mark = out.len();
        out.extend_from_slice(&self.open);
        let mut any = false;
        for c in &self.columns {
            let Some(v) = value(c) else { continue };
            if any {
                out.push(b',');
            }
            push_json_str(out, &c.0);
            out.push(b':');
            push_json_str(out, &v);
            any = true;
        }
        if any {
            out.push(b'}');
        } else {
            out.truncate(mark);
        }
    }
}

fn push_json_str(out: &mut Vec<u8>, s: &str) {
    // Writing a string into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

/// Per-worker state: the lookups in use, the fragments of the current event, and counts.
pub struct LookupStage {
    lookups: Arc<Lookups>,
    arena: Vec<u8>,
    spans: Vec<(usize, usize)>,
    scratch: String,
    /// Per entry: (found, absent).
    counts: Vec<(u64, u64)>,
}

impl LookupStage {
    pub fn new(lookups: Arc<Lookups>) -> LookupStage {
        let n = lookups.entries.len();
        LookupStage {
            lookups,
            arena: Vec::new(),
            spans: Vec::new(),
            scratch: String::new(),
            counts: vec![(0, 0); n],
        }
    }

    /// True when a lookup adds the top-level member `name`.
    pub fn added_as(&self, name: &str) -> Option<&str> {
        self.lookups.added_as(name)
    }

    /// Switches to another generation of tables (counts so far are reported first).
    pub fn switch(&mut self, lookups: Arc<Lookups>) {
        self.report();
        *self = LookupStage::new(lookups);
    }

    /// Looks the event up in every table; the fragments are then in [`Self::fragments`].
    pub fn run(&mut self, raw: &[u8], head: &Head<'_>) {
        self.arena.clear();
        self.spans.clear();
        for (i, e) in self.lookups.entries.iter().enumerate() {
            let start = self.arena.len();
            if let Some(value) = e.from.value(head, raw) {
                match e.table.find(&value, &mut self.scratch) {
                    Some(Hit::Row(r)) => {
                        if let Some(f) = e.fragments.get(r as usize) {
                            self.arena.extend_from_slice(f);
                        }
                    }
                    Some(Hit::Record(found)) => {
                        e.render(&mut self.arena, |c| {
                            record_text(&found, &c.0).map(Cow::Owned)
                        });
                    }
                    None => {}
                }
            }
            let end = self.arena.len();
            if let Some(c) = self.counts.get_mut(i) {
                if end > start {
                    c.0 += 1;
                } else {
                    c.1 += 1;
                }
            }
            if end > start {
                self.spans.push((start, end));
            }
        }
    }

    /// The fragments of the event last given to [`Self::run`].
    pub fn fragments(&self) -> impl Iterator<Item = &[u8]> {
        self.spans.iter().filter_map(|&(s, e)| self.arena.get(s..e))
    }

    /// Reports and resets the counts.
    pub fn report(&mut self) {
        for (e, c) in self.lookups.entries.iter().zip(self.counts.iter_mut()) {
            let (found, absent) = std::mem::take(c);
            if found + absent > 0 {
                metrics::emit(TableLookups {
                    table: &e.table_name,
                    field: &e.field,
                    found,
                    absent,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cloudtrail::head_of;
    use crate::config::enrich::{MatchKind, TableConfig};
    use std::collections::BTreeMap;

    fn table(name: &str, key: &str, kind: MatchKind, text: &str) -> (Arc<str>, String, Arc<Table>) {
        let spec = TableConfig {
            name: name.into(),
            path: format!("{name}.csv"),
            format: None,
            key: Some(key.into()),
            match_kind: Some(kind),
            region: None,
            endpoint_url: None,
            force_path_style: false,
            max_bytes: 1 << 20,
        };
        let t = Table::parse(&spec, name, text.as_bytes().to_vec()).unwrap();
        (name.into(), format!("{name}.csv"), Arc::new(t))
    }

    fn lookup(table: &str, from: &str, field: &str, cols: &[&str]) -> LookupConfig {
        LookupConfig {
            table: table.into(),
            from: from.into(),
            add: BTreeMap::from([(field.into(), cols.iter().map(|c| c.to_string()).collect())]),
        }
    }

    fn run(stage: &mut LookupStage, event: &str) -> Vec<String> {
        let head = head_of(event.as_bytes()).unwrap();
        stage.run(event.as_bytes(), &head);
        stage
            .fragments()
            .map(|f| String::from_utf8(f.to_vec()).unwrap())
            .collect()
    }

    #[test]
    fn fields_are_rendered_from_head_fields_and_paths_and_absent_keys_add_nothing() {
        let tables = [
            table(
                "accounts",
                "id",
                MatchKind::Exact,
                "id,name,env\n111122223333,main \"prod\",prod\n444455556666,,\n",
            ),
            table(
                "egress",
                "cidr",
                MatchKind::Cidr,
                "cidr,label\n10.0.0.0/8,corp\n10.1.0.0/16,vpn\n",
            ),
        ];
        let lookups = [
            lookup(
                "accounts",
                "recipientAccountId",
                "account",
                &["name", "env"],
            ),
            lookup("accounts", "userIdentity.accountId", "caller", &["name"]),
            lookup("egress", "sourceIPAddress", "network", &["label"]),
        ];
        let compiled = Arc::new(Lookups::compile(&lookups, &tables).unwrap());
        let mut stage = LookupStage::new(compiled);
        let ev = r#"{"recipientAccountId":"111122223333","sourceIPAddress":"10.1.2.3","userIdentity":{"type":"x","accountId":"111122223333"}}"#;
        assert_eq!(
            run(&mut stage, ev),
            [
                r#""account":{"name":"main \"prod\"","env":"prod"}"#,
                r#""caller":{"name":"main \"prod\""}"#,
                r#""network":{"label":"vpn"}"#
            ]
        );
        // A row with none of the columns, an unknown key, a non-address: nothing.
        let ev =
            r#"{"recipientAccountId":"444455556666","sourceIPAddress":"cloudtrail.amazonaws.com"}"#;
        assert!(run(&mut stage, ev).is_empty());
        assert_eq!(stage.counts, [(1, 1), (1, 1), (1, 1)]);
    }

    #[test]
    fn a_missing_column_is_named() {
        let tables = [table("accounts", "id", MatchKind::Exact, "id,name\n1,a\n")];
        let e = Lookups::compile(&[lookup("accounts", "x", "account", &["owner"])], &tables)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("\"owner\"") && e.contains("accounts.csv") && e.contains("id, name"),
            "{e}"
        );
    }

    #[test]
    fn paths_read_strings_numbers_and_escaped_keys() {
        let raw = br#"{"a":{"b":"x\"y","n":12},"k\u0065y":"v","arr":[1]}"#;
        let p = |s: &str| path_value(raw, &s.split('.').map(str::to_owned).collect::<Vec<_>>());
        assert_eq!(p("a.b").as_deref(), Some("x\"y"));
        assert_eq!(p("a.n").as_deref(), Some("12"));
        assert_eq!(p("key").as_deref(), Some("v"));
        assert_eq!(p("arr"), None);
        assert_eq!(p("a.c"), None);
        assert_eq!(p("a.b.c"), None);
    }
}
