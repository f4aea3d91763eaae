//! `[enrich]`: enrichment tables and the built-in lookups that join them into events.

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};

use super::{ConfigError, invalid};
use crate::cloudtrail::fields::CLOUDTRAIL_FIELDS;

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct EnrichConfig {
    pub tables: Vec<TableConfig>,
    /// Run in this order, after geo and before the transform modules.
    pub lookups: Vec<LookupConfig>,
    /// How often table files (mtime and size) and S3 objects (ETag) are checked for a new
    /// version; 0 = only on SIGHUP.
    pub reload_secs: u64,
}

impl Default for EnrichConfig {
    fn default() -> Self {
        EnrichConfig {
            tables: Vec::new(),
            lookups: Vec::new(),
            reload_secs: 60,
        }
    }
}

/// How a table is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TableFormat {
    /// A header row, then one row per key.
    Csv,
    /// One JSON object per line.
    Jsonl,
    /// A MaxMind-format database: keyed by address, longest prefix.
    Mmdb,
}

impl TableFormat {
    /// The format a path's extension names, if any.
    pub fn from_path(path: &str) -> Option<TableFormat> {
        let lower = path.to_ascii_lowercase();
        let lower = lower.strip_suffix(".gz").unwrap_or(&lower);
        if lower.ends_with(".csv") {
            Some(TableFormat::Csv)
        } else if lower.ends_with(".jsonl") || lower.ends_with(".ndjson") {
            Some(TableFormat::Jsonl)
        } else if lower.ends_with(".mmdb") {
            Some(TableFormat::Mmdb)
        } else {
            None
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            TableFormat::Csv => "csv",
            TableFormat::Jsonl => "jsonl",
            TableFormat::Mmdb => "mmdb",
        }
    }
}

/// How an event's value finds its row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MatchKind {
    /// Byte-for-byte equal.
    #[default]
    Exact,
    /// Equal after Unicode lower-casing of both sides.
    CaseInsensitive,
    /// The key column holds CIDR ranges (or single addresses); the event's value is an
    /// address and the longest range holding it wins.
    Cidr,
}

/// One `[[enrich.tables]]` entry.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TableConfig {
    /// Names the table in lookups, metrics and logs.
    pub name: String,
    /// A local file or `s3://bucket/key`.
    pub path: String,
    /// Unset: from the extension (`.csv`, `.jsonl`/`.ndjson`, `.mmdb`).
    #[serde(default)]
    pub format: Option<TableFormat>,
    /// The key column (csv, jsonl); an mmdb table is keyed by address.
    #[serde(default)]
    pub key: Option<String>,
    #[serde(default, rename = "match")]
    pub match_kind: Option<MatchKind>,
    /// For `s3://` paths.
    #[serde(default)]
    pub region: Option<String>,
    #[serde(default)]
    pub endpoint_url: Option<String>,
    #[serde(default)]
    pub force_path_style: bool,
    /// A larger file is refused (unread when its size is known up front).
    #[serde(default = "default_max_bytes")]
    pub max_bytes: u64,
}

fn default_max_bytes() -> u64 {
    256 << 20
}

impl TableConfig {
    /// The format, given or from the extension (checked by `validate`).
    pub fn format(&self) -> TableFormat {
        self.format
            .or_else(|| TableFormat::from_path(&self.path))
            .unwrap_or(TableFormat::Csv)
    }

    /// The match, given or the format's default.
    pub fn match_kind(&self) -> MatchKind {
        match self.format() {
            TableFormat::Mmdb => MatchKind::Cidr,
            _ => self.match_kind.unwrap_or_default(),
        }
    }

    /// `(bucket, key)` of an `s3://` path.
    pub fn s3_location(&self) -> Option<(&str, &str)> {
        let rest = self.path.strip_prefix("s3://")?;
        let (bucket, key) = rest.split_once('/')?;
        (!bucket.is_empty() && !key.is_empty()).then_some((bucket, key))
    }
}

/// One `[[enrich.lookups]]` entry.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LookupConfig {
    pub table: String,
    /// The event field whose value is looked up: a top-level name or a dotted path
    /// (`userIdentity.accountId`).
    pub from: String,
    /// Field to add -> the table columns it holds, e.g. `{ account = ["name", "env"] }`
    /// adds `"account":{"name":…,"env":…}`.
    pub add: BTreeMap<String, Vec<String>>,
}

/// Fields the pipeline itself adds; a lookup may not add them again.
const RESERVED: &[&str] = &["geo", "trailhoseArrivalTime", "detections"];

impl EnrichConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut names = HashSet::new();
        for t in &self.tables {
            let named = |m: &str| format!("table {:?}: {m}", t.name);
            if t.name.is_empty() {
                return Err(invalid("enrich.tables.name", "must not be empty"));
            }
            if !names.insert(t.name.as_str()) {
                return Err(invalid(
                    "enrich.tables.name",
                    named("is used by two tables"),
                ));
            }
            if t.path.is_empty() {
                return Err(invalid("enrich.tables.path", named("must not be empty")));
            }
            if t.path.starts_with("s3://") && t.s3_location().is_none() {
                return Err(invalid(
                    "enrich.tables.path",
                    named("an S3 path must be s3://bucket/key"),
                ));
            }
            if t.format.is_none() && TableFormat::from_path(&t.path).is_none() {
                return Err(invalid(
                    "enrich.tables.format",
                    named("the path has no .csv, .jsonl, .ndjson or .mmdb extension; set format"),
                ));
            }
            match t.format() {
                TableFormat::Mmdb => {
                    if t.key.is_some() {
                        return Err(invalid(
                            "enrich.tables.key",
                            named("an mmdb table is keyed by address; remove key"),
                        ));
                    }
                    if t.match_kind.is_some_and(|m| m != MatchKind::Cidr) {
                        return Err(invalid(
                            "enrich.tables.match",
                            named("an mmdb table only matches by address (cidr)"),
                        ));
                    }
                }
                _ => {
                    if t.key.as_deref().is_none_or(str::is_empty) {
                        return Err(invalid("enrich.tables.key", named("name the key column")));
                    }
                }
            }
            if t.max_bytes == 0 {
                return Err(invalid(
                    "enrich.tables.max_bytes",
                    named("must be at least 1"),
                ));
            }
        }
        // Compared ignoring ASCII case: readers that fold key case would see two names as one.
        let mut added: HashSet<String> = HashSet::new();
        for l in &self.lookups {
            let named = |m: &str| format!("lookup of {:?} in table {:?}: {m}", l.from, l.table);
            if !names.contains(l.table.as_str()) {
                return Err(invalid(
                    "enrich.lookups.table",
                    named("no [[enrich.tables]] has this name"),
                ));
            }
            if l.from.is_empty() || l.from.split('.').any(str::is_empty) {
                return Err(invalid(
                    "enrich.lookups.from",
                    named("must be a field name or a dotted path"),
                ));
            }
            if l.add.is_empty() {
                return Err(invalid(
                    "enrich.lookups.add",
                    named("add at least one field, e.g. { account = [\"name\"] }"),
                ));
            }
            for (field, columns) in &l.add {
                if field.is_empty() || RESERVED.iter().any(|r| r.eq_ignore_ascii_case(field)) {
                    return Err(invalid(
                        "enrich.lookups.add",
                        named(&format!("{field:?} cannot be added (empty or reserved)")),
                    ));
                }
                if CLOUDTRAIL_FIELDS
                    .iter()
                    .any(|f| f.eq_ignore_ascii_case(field))
                {
                    return Err(invalid(
                        "enrich.lookups.add",
                        named(&format!(
                            "{field:?} is a CloudTrail field: events would carry it twice; \
                             choose another name"
                        )),
                    ));
                }
                if !added.insert(field.to_ascii_lowercase()) {
                    return Err(invalid(
                        "enrich.lookups.add",
                        named(&format!("field {field:?} is added by two lookups")),
                    ));
                }
                if columns.is_empty() || columns.iter().any(String::is_empty) {
                    return Err(invalid(
                        "enrich.lookups.add",
                        named(&format!("field {field:?} needs a list of column names")),
                    ));
                }
                let mut seen = HashSet::new();
                if let Some(c) = columns.iter().find(|c| !seen.insert(c.as_str())) {
                    return Err(invalid(
                        "enrich.lookups.add",
                        named(&format!("field {field:?} lists column {c:?} twice")),
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    fn err(toml: &str) -> String {
        let cfg = Config::parse(toml).expect("parses");
        cfg.validate().expect_err("invalid").to_string()
    }

    const TABLES: &str = "[[enrich.tables]]\nname = \"accounts\"\npath = \"a.csv\"\nkey = \"id\"\n";

    #[test]
    fn bad_tables_and_lookups_are_refused_naming_the_key() {
        let e = err(&format!("{TABLES}{TABLES}"));
        assert!(
            e.contains("enrich.tables.name") && e.contains("two tables"),
            "{e}"
        );
        let e = err("[[enrich.tables]]\nname = \"x\"\npath = \"x.txt\"\nkey = \"k\"\n");
        assert!(e.contains("enrich.tables.format"), "{e}");
        let e = err("[[enrich.tables]]\nname = \"x\"\npath = \"x.csv\"\n");
        assert!(e.contains("enrich.tables.key"), "{e}");
        let e = err("[[enrich.tables]]\nname = \"x\"\npath = \"s3://bucket\"\nkey = \"k\"\n");
        assert!(e.contains("enrich.tables.path"), "{e}");
        let e = err("[[enrich.tables]]\nname = \"x\"\npath = \"x.mmdb\"\nmatch = \"exact\"\n");
        assert!(e.contains("enrich.tables.match"), "{e}");
        let e = err(&format!(
            "{TABLES}[[enrich.lookups]]\ntable = \"nope\"\nfrom = \"a\"\nadd = {{ x = [\"y\"] }}\n"
        ));
        assert!(
            e.contains("enrich.lookups.table") && e.contains("nope"),
            "{e}"
        );
        let e = err(&format!(
            "{TABLES}[[enrich.lookups]]\ntable = \"accounts\"\nfrom = \"a\"\nadd = {{ geo = [\"y\"] }}\n"
        ));
        assert!(
            e.contains("enrich.lookups.add") && e.contains("reserved"),
            "{e}"
        );
        let e = err(&format!(
            "{TABLES}[[enrich.lookups]]\ntable = \"accounts\"\nfrom = \"a\"\nadd = {{ x = [\"y\"] }}\n\
             [[enrich.lookups]]\ntable = \"accounts\"\nfrom = \"b\"\nadd = {{ x = [\"z\"] }}\n"
        ));
        assert!(e.contains("added by two lookups"), "{e}");
        let e = err(&format!(
            "{TABLES}[[enrich.lookups]]\ntable = \"accounts\"\nfrom = \"a\"\nadd = {{ resources = [\"y\"] }}\n"
        ));
        assert!(
            e.contains("enrich.lookups.add") && e.contains("CloudTrail field"),
            "{e}"
        );
        let e = err(&format!(
            "{TABLES}[[enrich.lookups]]\ntable = \"accounts\"\nfrom = \"a..b\"\nadd = {{ x = [\"y\"] }}\n"
        ));
        assert!(e.contains("enrich.lookups.from"), "{e}");
        let ok = Config::parse(&format!(
            "{TABLES}[[enrich.lookups]]\ntable = \"accounts\"\nfrom = \"recipientAccountId\"\n\
             add = {{ account = [\"name\", \"env\"] }}\n"
        ))
        .unwrap();
        ok.validate().unwrap();
    }
}
