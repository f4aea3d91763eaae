//! Flattened text output: one row per event (or per element of an exploded array) with the
//! configured columns, each a dotted path into the event. CSV follows RFC 4180; TSV escapes tab,
//! newline, carriage return and backslash as `\t`, `\n`, `\r`, `\\` (Hive's text format).

use serde_json::Value;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg {
    Key(String),
    Index(usize),
    /// `[*]`: one row per element.
    Each,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PathError {
    #[error("{0:?}: empty path segment")]
    Empty(String),
    #[error("{0:?}: bad index (use [N] or [*])")]
    BadIndex(String),
    #[error("{0:?}: at most one [*] per column")]
    TwoExplodes(String),
    #[error("{0:?} and {1:?} explode different arrays; every [*] column must share one array")]
    Mixed(String, String),
    #[error("sort column {0:?} must not contain [*]")]
    SortExplodes(String),
}

/// A parsed column path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Path {
    text: String,
    segs: Vec<Seg>,
}

impl Path {
    pub fn parse(text: &str) -> Result<Path, PathError> {
        let mut segs = Vec::new();
        for part in text.split('.') {
            let (key, mut rest) = match part.find('[') {
                Some(i) => (&part[..i], &part[i..]),
                None => (part, ""),
            };
            if key.is_empty() && (segs.is_empty() || rest.is_empty()) {
                return Err(PathError::Empty(text.into()));
            }
            if !key.is_empty() {
                segs.push(Seg::Key(key.to_owned()));
            }
            while !rest.is_empty() {
                let close = rest
                    .find(']')
                    .filter(|_| rest.starts_with('['))
                    .ok_or_else(|| PathError::BadIndex(text.into()))?;
                let inner = &rest[1..close];
                segs.push(match inner {
                    "*" => Seg::Each,
                    n => Seg::Index(n.parse().map_err(|_| PathError::BadIndex(text.into()))?),
                });
                rest = &rest[close + 1..];
            }
        }
        if segs.iter().filter(|s| **s == Seg::Each).count() > 1 {
            return Err(PathError::TwoExplodes(text.into()));
        }
        Ok(Path {
            text: text.to_owned(),
            segs,
        })
    }

    /// The segments before `[*]`, if the path explodes.
    fn explode_prefix(&self) -> Option<&[Seg]> {
        let i = self.segs.iter().position(|s| *s == Seg::Each)?;
        Some(&self.segs[..i])
    }
}

fn walk<'v>(mut v: &'v Value, segs: &[Seg]) -> Option<&'v Value> {
    for s in segs {
        v = match (s, v) {
            (Seg::Key(k), Value::Object(m)) => m.get(k)?,
            (Seg::Index(i), Value::Array(a)) => a.get(*i)?,
            _ => return None,
        };
    }
    Some(v)
}

/// A value as cell text: strings as they are, nothing as empty, anything else as JSON.
fn text(v: Option<&Value>) -> String {
    match v {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(v) => v.to_string(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Csv,
    Tsv,
}

/// Flat output settings, checked.
#[derive(Debug, Clone)]
pub struct FlatSpec {
    pub dialect: Dialect,
    pub columns: Vec<Path>,
    pub sort: Option<Path>,
}

impl FlatSpec {
    pub fn new(
        dialect: Dialect,
        columns: &[String],
        sort: Option<&str>,
    ) -> Result<Self, PathError> {
        let columns = columns
            .iter()
            .map(|c| Path::parse(c))
            .collect::<Result<Vec<_>, _>>()?;
        let mut exploding = columns.iter().filter(|c| c.explode_prefix().is_some());
        if let Some(first) = exploding.next() {
            for other in exploding {
                if other.explode_prefix() != first.explode_prefix() {
                    return Err(PathError::Mixed(first.text.clone(), other.text.clone()));
                }
            }
        }
        let sort = sort.map(Path::parse).transpose()?;
        if let Some(s) = &sort
            && s.explode_prefix().is_some()
        {
            return Err(PathError::SortExplodes(s.text.clone()));
        }
        Ok(FlatSpec {
            dialect,
            columns,
            sort,
        })
    }

    /// The rows of one event.
    fn rows(&self, event: &Value, out: &mut Vec<Vec<String>>) {
        let prefix = self.columns.iter().find_map(|c| c.explode_prefix());
        let elements: Vec<Option<&Value>> = match prefix.map(|p| walk(event, p)) {
            None => vec![None],
            Some(Some(Value::Array(items))) if !items.is_empty() => {
                items.iter().map(Some).collect()
            }
            // Nothing to explode: one row, exploded cells empty.
            Some(_) => vec![None],
        };
        for el in elements {
            let row = self
                .columns
                .iter()
                .map(|c| match c.explode_prefix() {
                    None => text(walk(event, &c.segs)),
                    Some(p) => text(el.and_then(|e| walk(e, &c.segs[p.len() + 1..]))),
                })
                .collect();
            out.push(row);
        }
    }

    /// The whole object: a header row, then the rows of every line (sorted by the sort column
    /// when set; ties keep their order).
    pub fn encode(&self, lines: &[u8]) -> Vec<u8> {
        let mut events: Vec<Value> = lines
            .split(|b| *b == b'\n')
            .filter(|l| l.iter().any(|b| !b.is_ascii_whitespace()))
            // Splitter output is always valid JSON; an unparsable line yields an empty row.
            .map(|l| serde_json::from_slice(l).unwrap_or(Value::Null))
            .collect();
        if let Some(s) = &self.sort {
            events.sort_by_cached_key(|e| text(walk(e, &s.segs)));
        }
        let mut out = Vec::with_capacity(lines.len() / 2);
        let header: Vec<String> = self.columns.iter().map(|c| c.text.clone()).collect();
        self.push_row(&mut out, &header);
        let mut rows = Vec::new();
        for e in &events {
            rows.clear();
            self.rows(e, &mut rows);
            for r in &rows {
                self.push_row(&mut out, r);
            }
        }
        out
    }

    fn push_row(&self, out: &mut Vec<u8>, row: &[String]) {
        for (i, cell) in row.iter().enumerate() {
            match self.dialect {
                Dialect::Csv => {
                    if i > 0 {
                        out.push(b',');
                    }
                    push_csv(out, cell);
                }
                Dialect::Tsv => {
                    if i > 0 {
                        out.push(b'\t');
                    }
                    push_tsv(out, cell);
                }
            }
        }
        match self.dialect {
            Dialect::Csv => out.extend_from_slice(b"\r\n"),
            Dialect::Tsv => out.push(b'\n'),
        }
    }
}

/// RFC 4180: a field holding a comma, quote, CR or LF is quoted, quotes doubled.
fn push_csv(out: &mut Vec<u8>, cell: &str) {
    if cell.contains([',', '"', '\r', '\n']) {
        out.push(b'"');
        out.extend_from_slice(cell.replace('"', "\"\"").as_bytes());
        out.push(b'"');
    } else {
        out.extend_from_slice(cell.as_bytes());
    }
}

fn push_tsv(out: &mut Vec<u8>, cell: &str) {
    for b in cell.bytes() {
        match b {
            b'\t' => out.extend_from_slice(b"\\t"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b => out.push(b),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(d: Dialect, cols: &[&str], sort: Option<&str>) -> FlatSpec {
        let cols: Vec<String> = cols.iter().map(|s| s.to_string()).collect();
        FlatSpec::new(d, &cols, sort).unwrap()
    }

    #[test]
    fn paths_parse_and_reject_what_they_cannot_mean() {
        let p = Path::parse("a.items[*].id").unwrap();
        assert_eq!(
            p.segs,
            vec![
                Seg::Key("a".into()),
                Seg::Key("items".into()),
                Seg::Each,
                Seg::Key("id".into())
            ]
        );
        assert_eq!(Path::parse("a[2]").unwrap().segs[1], Seg::Index(2));
        assert!(Path::parse("a..b").is_err());
        assert!(Path::parse("a[x]").is_err());
        assert!(Path::parse("a[*].b[*]").is_err());
        let cols = vec!["a[*].x".to_string(), "b[*].y".to_string()];
        assert!(matches!(
            FlatSpec::new(Dialect::Csv, &cols, None),
            Err(PathError::Mixed(..))
        ));
    }

    #[test]
    fn explodes_sorts_and_quotes() {
        let s = spec(
            Dialect::Csv,
            &["eventTime", "r.items[*].id", "r.items[*].t", "u.n"],
            Some("eventTime"),
        );
        let lines = concat!(
            r#"{"eventTime":"2024-01-02T00:00:00Z","r":{"items":[{"id":"i-1","t":"a,b"},{"id":"i-2"}]},"u":{"n":"say \"hi\""}}"#,
            "\n",
            r#"{"eventTime":"2024-01-01T00:00:00Z","u":{"n":{"k":1}}}"#,
            "\n"
        );
        let out = String::from_utf8(s.encode(lines.as_bytes())).unwrap();
        assert_eq!(
            out,
            concat!(
                "eventTime,r.items[*].id,r.items[*].t,u.n\r\n",
                "2024-01-01T00:00:00Z,,,\"{\"\"k\"\":1}\"\r\n",
                "2024-01-02T00:00:00Z,i-1,\"a,b\",\"say \"\"hi\"\"\"\r\n",
                "2024-01-02T00:00:00Z,i-2,,\"say \"\"hi\"\"\"\r\n",
            )
        );
    }

    #[test]
    fn tsv_escapes_separators() {
        let s = spec(Dialect::Tsv, &["a", "b"], None);
        let out = s.encode(br#"{"a":"x\ty\nz\\","b":true}"#);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "a\tb\nx\\ty\\nz\\\\\ttrue\n"
        );
    }
}
