//! `trailhose athena-ddl`: the `CREATE EXTERNAL TABLE` for what the configured sink writes,
//! with partition projection from the key template, so no crawler or `MSCK REPAIR` is needed.
//! Columns come from the same declaration the Parquet writer uses (`sink::columnar::COLUMNS`).

use std::fmt::Write;

use crate::config::{Config, ConfigError, OutputUrl};
use crate::sink::columnar::{self, Col};
use crate::sink::format::Format;
use crate::sink::ocsf::{self, Class, Schema};
use crate::sink::partition::{KeyTemplate, Piece};

#[derive(Debug, thiserror::Error)]
pub enum DdlError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(
        "output.key_template: segment {0:?} cannot be projected (use name={{field}}, {{field}} or literal text per segment)"
    )]
    Segment(String),
}

/// A partition column and how Athena projects it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionCol {
    pub name: String,
    pub field: &'static str,
}

/// The partition columns of a key template and its `storage.location.template` tail.
pub fn partitions(t: &KeyTemplate) -> Result<(Vec<PartitionCol>, String), DdlError> {
    // Split the pieces into path segments.
    let mut segments: Vec<Vec<Piece<'_>>> = vec![Vec::new()];
    for piece in t.pieces() {
        match piece {
            Piece::Lit(l) => {
                let mut parts = l.split('/');
                if let (Some(first), Some(seg)) = (parts.next(), segments.last_mut())
                    && !first.is_empty()
                {
                    seg.push(Piece::Lit(first));
                }
                for p in parts {
                    segments.push(if p.is_empty() {
                        Vec::new()
                    } else {
                        vec![Piece::Lit(p)]
                    });
                }
            }
            Piece::Field(f) => {
                if let Some(seg) = segments.last_mut() {
                    seg.push(Piece::Field(f));
                }
            }
        }
    }
    let mut cols = Vec::new();
    let mut location = String::new();
    for seg in segments.iter().filter(|s| !s.is_empty()) {
        match seg.as_slice() {
            [Piece::Lit(l), Piece::Field(f)] if l.ends_with('=') && l.len() > 1 => {
                let name = sanitize(&l[..l.len() - 1]);
                let _ = write!(location, "{}${{{name}}}/", l);
                cols.push(PartitionCol { name, field: f });
            }
            [Piece::Field(f)] => {
                let _ = write!(location, "${{{f}}}/");
                cols.push(PartitionCol {
                    name: (*f).to_owned(),
                    field: f,
                });
            }
            [Piece::Lit(l)] => {
                let _ = write!(location, "{l}/");
            }
            other => {
                let text: String = other
                    .iter()
                    .map(|p| match p {
                        Piece::Lit(l) => (*l).to_owned(),
                        Piece::Field(f) => format!("{{{f}}}"),
                    })
                    .collect();
                return Err(DdlError::Segment(text));
            }
        }
    }
    Ok((cols, location))
}

/// Athena column names: lower case, `[a-z0-9_]`.
pub fn sanitize(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    s.trim_matches('_').to_owned()
}

/// Hive type of a column; JSON text keeps eventTime a string (the OpenX SerDe reads it as
/// written), Parquet stores a timestamp.
pub fn hive_type(c: Col, parquet: bool) -> String {
    match c {
        Col::Str | Col::Json => "STRING".into(),
        Col::StrMap => "MAP<STRING, STRING>".into(),
        Col::Time if parquet => "TIMESTAMP".into(),
        Col::Time => "STRING".into(),
        Col::Bool => "BOOLEAN".into(),
        Col::Int => "BIGINT".into(),
        Col::Float => "DOUBLE".into(),
        Col::Struct(fields) => format!(
            "STRUCT<{}>",
            fields
                .iter()
                .map(|(n, c)| format!("{}: {}", n.to_ascii_lowercase(), hive_type(*c, parquet)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Col::List(e) => format!("ARRAY<{}>", hive_type(*e, parquet)),
    }
}

fn projection(out: &mut String, p: &PartitionCol) {
    let n = &p.name;
    let _ = match p.field {
        "year" => writeln!(
            out,
            "  'projection.{n}.type' = 'integer', 'projection.{n}.range' = '2013,2099',"
        ),
        "month" | "day" | "hour" => {
            let range = match p.field {
                "month" => "1,12",
                "day" => "1,31",
                _ => "0,23",
            };
            writeln!(
                out,
                "  'projection.{n}.type' = 'integer', 'projection.{n}.range' = '{range}', 'projection.{n}.digits' = '2',"
            )
        }
        // Unbounded values: queries must name them in WHERE.
        _ => writeln!(out, "  'projection.{n}.type' = 'injected',"),
    };
}

/// The DDL for the configured output. `table` defaults to `cloudtrail_enriched`.
pub fn ddl(cfg: &Config, table: &str) -> Result<String, DdlError> {
    cfg.validate()?;
    if cfg.output.schema == Schema::Ocsf {
        return ocsf_ddl(cfg, table);
    }
    let (parts, tail) = template_partitions(cfg)?;
    let location = output_location(cfg);
    let format = cfg.output.format;
    let columns: Vec<(String, String)> = match format {
        Format::Json | Format::Parquet => {
            let parquet = format == Format::Parquet;
            let added = columnar::added_columns(&cfg.output.parquet.added_columns);
            let layout = columnar::Layout::new(true, &added);
            layout
                .columns
                .iter()
                .filter(|(n, _)| parquet || n != columnar::EXTRA)
                .map(|(n, c)| (n.to_ascii_lowercase(), hive_type(*c, parquet)))
                .collect()
        }
        Format::Csv | Format::Tsv => cfg
            .output
            .columns
            .iter()
            .map(|c| (sanitize(c), "STRING".to_owned()))
            .collect(),
    };
    let mut out = String::new();
    let names: Vec<&str> = parts.iter().map(|p| p.name.as_str()).collect();
    create(&mut out, table, &columns, &names);
    out.push_str(match format {
        Format::Json => "ROW FORMAT SERDE 'org.openx.data.jsonserde.JsonSerDe'\n",
        Format::Parquet => "STORED AS PARQUET\n",
        Format::Csv => {
            "ROW FORMAT SERDE 'org.apache.hadoop.hive.serde2.OpenCSVSerde'\n\
             WITH SERDEPROPERTIES ('separatorChar' = ',', 'quoteChar' = '\"', 'escapeChar' = '\\\\')\n"
        }
        Format::Tsv => {
            "ROW FORMAT DELIMITED FIELDS TERMINATED BY '\\t' ESCAPED BY '\\\\' LINES TERMINATED BY '\\n'\n"
        }
    });
    let _ = writeln!(out, "LOCATION '{location}'");
    out.push_str("TBLPROPERTIES (\n");
    if matches!(format, Format::Csv | Format::Tsv) {
        out.push_str("  'skip.header.line.count' = '1',\n");
    }
    projected_properties(&mut out, &parts, &location, &tail, "cloudtrail");
    Ok(out)
}

/// The key template's partition columns and the path after the last one.
fn template_partitions(cfg: &Config) -> Result<(Vec<PartitionCol>, String), DdlError> {
    let template =
        KeyTemplate::parse(&cfg.output.key_template).map_err(|e| ConfigError::Invalid {
            key: "output.key_template",
            message: e.to_string(),
        })?;
    partitions(&template)
}

/// Ends an open `TBLPROPERTIES (` list: partition projection over `parts`, or, with nothing to
/// project, a harmless `classification` marker.
fn projected_properties(
    out: &mut String,
    parts: &[PartitionCol],
    location: &str,
    tail: &str,
    classification: &str,
) {
    if parts.is_empty() {
        let _ = writeln!(out, "  'classification' = '{classification}'\n);");
        return;
    }
    out.push_str("  'projection.enabled' = 'true',\n");
    for p in parts {
        projection(out, p);
    }
    let _ = writeln!(
        out,
        "  'storage.location.template' = '{location}{tail}'\n);"
    );
}

fn output_location(cfg: &Config) -> String {
    match cfg.output.url.as_deref().map(OutputUrl::parse) {
        Some(Ok(OutputUrl::S3 { bucket, prefix })) => format!("s3://{bucket}/{prefix}"),
        _ => "s3://BUCKET/PREFIX/".to_owned(),
    }
}

/// The columns of OCSF records as Hive types: a class's, or the union of the three.
fn ocsf_columns(class: Option<Class>, parquet: bool) -> Vec<(String, String)> {
    ocsf::parquet::columns(class)
        .into_iter()
        .map(|(n, c)| (n, hive_type(c, parquet)))
        .collect()
}

fn create(out: &mut String, table: &str, columns: &[(String, String)], partitions: &[&str]) {
    let _ = writeln!(out, "CREATE EXTERNAL TABLE {table} (");
    for (i, (n, t)) in columns.iter().enumerate() {
        let comma = if i + 1 < columns.len() { "," } else { "" };
        let _ = writeln!(out, "  `{n}` {t}{comma}");
    }
    out.push_str(")\n");
    if !partitions.is_empty() {
        let cols: Vec<String> = partitions.iter().map(|p| format!("`{p}` STRING")).collect();
        let _ = writeln!(out, "PARTITIONED BY ({})", cols.join(", "));
    }
}

/// OCSF records: with `[output.security_lake]`, one table per class (`<table>_<class>`) over
/// its custom source's prefix, partitioned as Security Lake lays objects out; else one table
/// of the three classes' columns over the key template's partitions.
fn ocsf_ddl(cfg: &Config, table: &str) -> Result<String, DdlError> {
    let location = output_location(cfg);
    let mut out = String::new();
    if let Some(lake) = cfg.security_lake()? {
        for (i, (class, source)) in lake.sources().enumerate() {
            if i > 0 {
                out.push('\n');
            }
            let name = format!("{table}_{}", class.slug());
            create(
                &mut out,
                &name,
                &ocsf_columns(Some(class), true),
                &["region", "accountid", "eventday"],
            );
            let root = format!("{location}ext/{source}/");
            let account = match &lake.account_id {
                Some(a) => format!(
                    "  'projection.accountid.type' = 'enum', 'projection.accountid.values' = '{a}',\n"
                ),
                None => "  'projection.accountid.type' = 'injected',\n".to_owned(),
            };
            let _ = write!(
                out,
                "STORED AS PARQUET\nLOCATION '{root}'\nTBLPROPERTIES (\n  'projection.enabled' = 'true',\n  'projection.region.type' = 'injected',\n{account}  'projection.eventday.type' = 'date', 'projection.eventday.format' = 'yyyyMMdd', 'projection.eventday.range' = '20130101,NOW+1DAYS', 'projection.eventday.interval' = '1', 'projection.eventday.interval.unit' = 'DAYS',\n  'storage.location.template' = '{root}region=${{region}}/accountId=${{accountid}}/eventDay=${{eventday}}/'\n);\n"
            );
        }
        return Ok(out);
    }
    let (parts, tail) = template_partitions(cfg)?;
    let parquet = cfg.output.format == Format::Parquet;
    let names: Vec<&str> = parts.iter().map(|p| p.name.as_str()).collect();
    create(&mut out, table, &ocsf_columns(None, parquet), &names);
    out.push_str(if parquet {
        "STORED AS PARQUET\n"
    } else {
        "ROW FORMAT SERDE 'org.openx.data.jsonserde.JsonSerDe'\n"
    });
    let _ = writeln!(out, "LOCATION '{location}'");
    out.push_str("TBLPROPERTIES (\n");
    projected_properties(&mut out, &parts, &location, &tail, "ocsf");
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hive_and_bare_segments_become_projected_partitions() {
        let t = KeyTemplate::parse("acct={account}/{region}/cloudtrail/year={year}/month={month}/")
            .unwrap();
        let (cols, loc) = partitions(&t).unwrap();
        let names: Vec<&str> = cols.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["acct", "region", "year", "month"]);
        assert_eq!(
            loc,
            "acct=${acct}/${region}/cloudtrail/year=${year}/month=${month}/"
        );
        let t = KeyTemplate::parse("dt={year}-{month}/").unwrap();
        assert!(matches!(partitions(&t), Err(DdlError::Segment(_))));
    }

    #[test]
    fn the_readme_shows_what_the_command_prints() {
        let cfg = Config::parse("").unwrap();
        let d = ddl(&cfg, "cloudtrail_enriched").unwrap();
        assert!(
            include_str!("../README.md").contains(&d),
            "README Athena section:\n{d}"
        );
    }

    #[test]
    fn security_lake_gets_a_table_per_class_over_its_source() {
        let cfg = Config::parse(
            "[output]\nurl = \"s3://aws-security-data-lake-eu-west-1-abc/\"\nschema = \"ocsf\"\nformat = \"parquet\"\n[output.security_lake]\nsource_name = \"th-{class}\"\n",
        )
        .unwrap();
        let d = ddl(&cfg, "ocsf").unwrap();
        assert_eq!(d.matches("CREATE EXTERNAL TABLE").count(), 3, "{d}");
        assert!(
            d.contains("CREATE EXTERNAL TABLE ocsf_authentication ("),
            "{d}"
        );
        assert!(
            d.contains("LOCATION 's3://aws-security-data-lake-eu-west-1-abc/ext/th-api_activity/'")
        );
        assert!(d.contains(
            "'storage.location.template' = 's3://aws-security-data-lake-eu-west-1-abc/ext/th-account_change/region=${region}/accountId=${accountid}/eventDay=${eventday}/'"
        ));
        assert!(d.contains("`unmapped` MAP<STRING, STRING>"), "{d}");
        // An eventTime up to a day ahead of its arrival is usable: its eventDay is projected.
        assert!(
            d.contains("'projection.eventday.range' = '20130101,NOW+1DAYS'"),
            "{d}"
        );
        assert!(d.contains("`time` BIGINT,"));
        assert!(
            d.contains("PARTITIONED BY (`region` STRING, `accountid` STRING, `eventday` STRING)")
        );
        // Each table has its class's columns only.
        let auth = d
            .split("CREATE EXTERNAL TABLE")
            .find(|t| t.contains("_authentication"))
            .unwrap();
        assert!(auth.contains("`is_mfa` BOOLEAN") && !auth.contains("`resources`"));
    }

    #[test]
    fn default_json_ddl_matches_the_documented_table() {
        let cfg = Config::parse("[output]\nurl = \"s3://b/p\"\n").unwrap();
        let d = ddl(&cfg, "cloudtrail_enriched").unwrap();
        assert!(d.contains("`eventtime` STRING,"), "{d}");
        assert!(d.contains("`requestparameters` STRING,"));
        assert!(
            d.contains("`resources` ARRAY<STRUCT<arn: STRING, accountid: STRING, type: STRING>>")
        );
        assert!(d.contains("org.openx.data.jsonserde.JsonSerDe"));
        assert!(!d.contains("`extra`"));
        assert!(d.contains(
            "PARTITIONED BY (`year` STRING, `month` STRING, `day` STRING, `hour` STRING)"
        ));
        assert!(d.contains(
            "'storage.location.template' = 's3://b/p/year=${year}/month=${month}/day=${day}/hour=${hour}/'"
        ));
        assert!(d.contains("'projection.hour.range' = '0,23', 'projection.hour.digits' = '2'"));
    }
}
