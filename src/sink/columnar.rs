//! The fixed Parquet schema for CloudTrail events and the conversion of a sealed batch of JSON
//! lines into one Parquet file. The schema is declared once (`COLUMNS`) and drives the Arrow
//! schema, the conversion and the Athena DDL, so the three cannot disagree. Service-specific
//! parts are kept as JSON text and keys the schema does not know go to `extra`, so the schema
//! never drifts and nothing is lost.

//!
//! The Arrow and Parquet half is the `parquet` cargo feature (on by default); without it the
//! declarations stay (the Athena DDL reads them) and `format = "parquet"` is refused.

use std::collections::BTreeMap;
#[cfg(feature = "parquet")]
use std::sync::Arc;

#[cfg(feature = "parquet")]
use arrow::array::RecordBatch;
#[cfg(feature = "parquet")]
use arrow::datatypes::{DataType, Field, Fields, Schema, SchemaRef, TimeUnit};
#[cfg(feature = "parquet")]
use parquet::arrow::ArrowWriter;
#[cfg(feature = "parquet")]
use parquet::basic::{Compression as PqCompression, ZstdLevel};
#[cfg(feature = "parquet")]
use parquet::file::properties::WriterProperties;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::clock::Utc;

/// A column's type in the fixed schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Col {
    Str,
    Bool,
    Int,
    Float,
    /// eventTime: a UTC timestamp in milliseconds.
    Time,
    /// Any JSON value, kept as its JSON text.
    Json,
    /// An object as a map of strings to strings (values that are not strings as their JSON
    /// text): OCSF's `unmapped`.
    StrMap,
    Struct(&'static [(&'static str, Col)]),
    List(&'static Col),
}

/// The type of a column added by a transform module (`output.parquet.added_columns`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AddedType {
    String,
    Bigint,
    Double,
    Boolean,
    Json,
}

impl AddedType {
    pub fn col(self) -> Col {
        match self {
            AddedType::String => Col::Str,
            AddedType::Bigint => Col::Int,
            AddedType::Double => Col::Float,
            AddedType::Boolean => Col::Bool,
            AddedType::Json => Col::Json,
        }
    }
}

const SESSION_ISSUER: &[(&str, Col)] = &[
    ("type", Col::Str),
    ("principalId", Col::Str),
    ("arn", Col::Str),
    ("accountId", Col::Str),
    ("userName", Col::Str),
];
const SESSION_CONTEXT: &[(&str, Col)] = &[
    (
        "attributes",
        Col::Struct(&[("mfaAuthenticated", Col::Str), ("creationDate", Col::Str)]),
    ),
    ("sessionIssuer", Col::Struct(SESSION_ISSUER)),
    ("sourceIdentity", Col::Str),
    ("ec2RoleDelivery", Col::Str),
];
const USER_IDENTITY: &[(&str, Col)] = &[
    ("type", Col::Str),
    ("principalId", Col::Str),
    ("arn", Col::Str),
    ("accountId", Col::Str),
    ("invokedBy", Col::Str),
    ("accessKeyId", Col::Str),
    ("userName", Col::Str),
    ("sessionContext", Col::Struct(SESSION_CONTEXT)),
];
const RESOURCE: Col = Col::Struct(&[
    ("ARN", Col::Str),
    ("accountId", Col::Str),
    ("type", Col::Str),
]);
const TLS_DETAILS: &[(&str, Col)] = &[
    ("tlsVersion", Col::Str),
    ("cipherSuite", Col::Str),
    ("clientProvidedHostHeader", Col::Str),
];
/// The `geo` fragment the enricher splices in (see `enrich::geo`).
const GEO: &[(&str, Col)] = &[
    ("latitude", Col::Float),
    ("longitude", Col::Float),
    ("city", Col::Str),
    ("subdivision_isocode", Col::Str),
    ("country", Col::Str),
    ("country_isocode", Col::Str),
    ("asn", Col::Int),
    ("as_org", Col::Str),
];

/// CloudTrail's record fields in the order of its documentation, then `geo` and the arrival time. Added columns
/// and `extra` follow.
pub const COLUMNS: &[(&str, Col)] = &[
    ("eventVersion", Col::Str),
    ("userIdentity", Col::Struct(USER_IDENTITY)),
    ("eventTime", Col::Time),
    ("eventSource", Col::Str),
    ("eventName", Col::Str),
    ("awsRegion", Col::Str),
    ("sourceIPAddress", Col::Str),
    ("userAgent", Col::Str),
    ("errorCode", Col::Str),
    ("errorMessage", Col::Str),
    ("requestParameters", Col::Json),
    ("responseElements", Col::Json),
    ("additionalEventData", Col::Json),
    ("requestID", Col::Str),
    ("eventID", Col::Str),
    ("readOnly", Col::Bool),
    ("resources", Col::List(&RESOURCE)),
    ("eventType", Col::Str),
    ("apiVersion", Col::Str),
    ("managementEvent", Col::Bool),
    ("recipientAccountId", Col::Str),
    ("serviceEventDetails", Col::Json),
    ("sharedEventID", Col::Str),
    ("vpcEndpointId", Col::Str),
    ("eventCategory", Col::Str),
    ("tlsDetails", Col::Struct(TLS_DETAILS)),
    ("geo", Col::Struct(GEO)),
    // Set only on events partitioned by arrival because their eventTime was unusable.
    (crate::sink::partition::ARRIVAL_FIELD, Col::Time),
];

/// Unknown keys, as one JSON object keyed by their dotted path.
pub const EXTRA: &str = "extra";

#[derive(Debug, thiserror::Error)]
pub enum ColumnarError {
    #[cfg(feature = "parquet")]
    #[error("arrow: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
    #[cfg(feature = "parquet")]
    #[error("parquet: {0}")]
    Parquet(#[from] parquet::errors::ParquetError),
    #[error(transparent)]
    Compress(#[from] super::encode::CompressError),
}

/// Parquet output settings, checked.
#[cfg(feature = "parquet")]
#[derive(Debug, Clone)]
pub struct ParquetSpec {
    pub lowercase: bool,
    /// Columns added by transforms, in order, with their types.
    pub added: Vec<(String, Col)>,
    pub compression: PqCompression,
    pub row_group_rows: usize,
}

#[cfg(feature = "parquet")]
/// Row groups sized for Athena: about 128 MiB (uncompressed).
const ROW_GROUP_BYTES: usize = 128 << 20;

#[cfg(feature = "parquet")]
/// Rows converted and handed to the writer at a time: bounds the JSON values held at once.
const SLICE_ROWS: usize = 4096;

/// The column list actually written: fixed columns, added columns, `extra`.
#[derive(Debug)]
pub struct Layout {
    pub lowercase: bool,
    pub columns: Vec<(String, Col)>,
    #[cfg(feature = "parquet")]
    pub schema: SchemaRef,
    /// Where keys the columns do not hold go: None, the `extra` column (the last one); Some, a
    /// JSON column of the layout they are merged into (OCSF's `unmapped`).
    extra_into: Option<String>,
}

impl Layout {
    pub fn new(lowercase: bool, added: &[(String, Col)]) -> Layout {
        let mut columns: Vec<(String, Col)> =
            COLUMNS.iter().map(|(n, c)| ((*n).to_owned(), *c)).collect();
        columns.extend(added.iter().cloned());
        columns.push((EXTRA.to_owned(), Col::Str));
        Layout::of(columns, lowercase, None)
    }

    /// A layout of exactly `columns`; keys they do not hold are merged into the JSON column
    /// `extra_into` (or, when None, into the `extra` column `columns` must end with).
    pub fn of(columns: Vec<(String, Col)>, lowercase: bool, extra_into: Option<&str>) -> Layout {
        #[cfg(feature = "parquet")]
        let fields: Vec<Field> = columns
            .iter()
            .map(|(n, c)| Field::new(name(n, lowercase), arrow_type(*c, lowercase), true))
            .collect();
        Layout {
            lowercase,
            columns,
            #[cfg(feature = "parquet")]
            schema: Arc::new(Schema::new(fields)),
            extra_into: extra_into.map(str::to_owned),
        }
    }

    /// One event as a JSON object shaped exactly like the schema (every value of the column's
    /// type or null), so decoding it into Arrow cannot fail on odd input.
    pub fn conform(&self, line: &[u8]) -> Value {
        let mut extra = Map::new();
        let mut out = Map::new();
        match serde_json::from_slice::<Map<String, Value>>(line) {
            Ok(mut obj) => {
                for (n, c) in &self.columns {
                    if n == EXTRA {
                        continue;
                    }
                    if let Some(v) = obj.remove(n.as_str()) {
                        let v = conform(v, *c, n, self.lowercase, &mut extra);
                        out.insert(name(n, self.lowercase), v);
                    }
                }
                // What is left is unknown at the top level (including a key named `extra`).
                extra.extend(obj);
            }
            Err(_) => {
                // Cannot happen for splitter output; keep the text rather than drop the event.
                extra.insert(
                    "_raw".into(),
                    Value::String(String::from_utf8_lossy(line).into_owned()),
                );
            }
        }
        if !extra.is_empty() {
            let column = name(self.extra_into.as_deref().unwrap_or(EXTRA), self.lowercase);
            if let Some(Value::Object(held)) = out.get_mut(&column) {
                // A map column: the misfits join it as strings.
                for (k, v) in extra {
                    held.insert(k, Value::String(map_value(v)));
                }
                return Value::Object(out);
            }
            let is_map = self
                .columns
                .iter()
                .any(|(n, c)| *c == Col::StrMap && Some(n.as_str()) == self.extra_into.as_deref());
            if is_map {
                let m = extra
                    .into_iter()
                    .map(|(k, v)| (k, Value::String(map_value(v))))
                    .collect();
                out.insert(column, Value::Object(m));
                return Value::Object(out);
            }
            // Merged with what the column holds already (a JSON object's text, or nothing).
            if let Some(Value::String(held)) = out.get(&column)
                && let Ok(mut m) = serde_json::from_str::<Map<String, Value>>(held)
            {
                m.extend(extra);
                extra = m;
            }
            out.insert(column, Value::String(Value::Object(extra).to_string()));
        }
        Value::Object(out)
    }

    #[cfg(feature = "parquet")]
    /// Converts JSON lines into record batches of at most `SLICE_ROWS` rows, handing each on.
    pub fn batches(
        &self,
        lines: &[u8],
        mut each: impl FnMut(RecordBatch) -> Result<(), ColumnarError>,
    ) -> Result<(), ColumnarError> {
        let mut decoder = arrow::json::ReaderBuilder::new(self.schema.clone())
            .with_coerce_primitive(true)
            .build_decoder()?;
        let mut rows = Vec::with_capacity(SLICE_ROWS);
        let mut lines = lines
            .split(|b| *b == b'\n')
            .filter(|l| l.iter().any(|b| !b.is_ascii_whitespace()))
            .peekable();
        while let Some(line) = lines.next() {
            rows.push(self.conform(line));
            if rows.len() == SLICE_ROWS || lines.peek().is_none() {
                decoder.serialize(&rows)?;
                rows.clear();
                if let Some(batch) = decoder.flush()? {
                    each(batch)?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(feature = "parquet")]
/// Encodes one sealed batch of JSON lines as one Parquet file.
pub fn encode_parquet(
    spec: &ParquetSpec,
    layout: &Layout,
    lines: &[u8],
) -> Result<Vec<u8>, ColumnarError> {
    let props = WriterProperties::builder()
        .set_compression(spec.compression)
        .set_max_row_group_row_count(Some(spec.row_group_rows.max(1)))
        .set_max_row_group_bytes(Some(ROW_GROUP_BYTES))
        .set_created_by(format!("trailhose {}", env!("CARGO_PKG_VERSION")))
        .build();
    let mut writer = ArrowWriter::try_new(Vec::new(), layout.schema.clone(), Some(props))?;
    layout.batches(lines, |b| Ok(writer.write(&b)?))?;
    Ok(writer.into_inner()?)
}

#[cfg(feature = "parquet")]
/// The Parquet codec for a `compression` setting: zstd (with its level), snappy, none.
pub fn parquet_compression(kind: super::encode::Compression, level: i32) -> Option<PqCompression> {
    use super::encode::Compression as C;
    match kind {
        C::Zstd => ZstdLevel::try_new(level).ok().map(PqCompression::ZSTD),
        C::Snappy => Some(PqCompression::SNAPPY),
        C::None => Some(PqCompression::UNCOMPRESSED),
        C::Gzip => None,
    }
}

pub fn name(n: &str, lowercase: bool) -> String {
    if lowercase {
        n.to_ascii_lowercase()
    } else {
        n.to_owned()
    }
}

#[cfg(feature = "parquet")]
pub fn arrow_type(c: Col, lowercase: bool) -> DataType {
    match c {
        Col::Str | Col::Json => DataType::Utf8,
        Col::StrMap => DataType::Map(
            Arc::new(Field::new(
                "key_value",
                DataType::Struct(Fields::from(vec![
                    Field::new("key", DataType::Utf8, false),
                    Field::new("value", DataType::Utf8, true),
                ])),
                false,
            )),
            false,
        ),
        Col::Bool => DataType::Boolean,
        Col::Int => DataType::Int64,
        Col::Float => DataType::Float64,
        Col::Time => DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
        Col::Struct(fields) => DataType::Struct(Fields::from(
            fields
                .iter()
                .map(|(n, c)| Field::new(name(n, lowercase), arrow_type(*c, lowercase), true))
                .collect::<Vec<_>>(),
        )),
        Col::List(elem) => DataType::List(Arc::new(Field::new(
            "element",
            arrow_type(*elem, lowercase),
            true,
        ))),
    }
}

/// Shapes `v` to column type `c`. What does not fit is recorded in `extra` under its dotted
/// `path` and becomes null.
fn conform(v: Value, c: Col, path: &str, lowercase: bool, extra: &mut Map<String, Value>) -> Value {
    let misfit = |v: Value, extra: &mut Map<String, Value>| {
        extra.insert(path.to_owned(), v);
        Value::Null
    };
    match (c, v) {
        (_, Value::Null) => Value::Null,
        (Col::Str, Value::String(s)) => Value::String(s),
        (Col::Str, v @ (Value::Bool(_) | Value::Number(_))) => Value::String(v.to_string()),
        (Col::Json, v) => Value::String(v.to_string()),
        (Col::StrMap, Value::Object(m)) => Value::Object(
            m.into_iter()
                .map(|(k, v)| (k, Value::String(map_value(v))))
                .collect(),
        ),
        (Col::Bool, Value::Bool(b)) => Value::Bool(b),
        (Col::Bool, Value::String(s)) if s == "true" || s == "false" => Value::Bool(s == "true"),
        (Col::Int, Value::Number(n)) if n.is_i64() => Value::Number(n),
        (Col::Float, Value::Number(n)) => Value::Number(n),
        (Col::Time, Value::String(s)) => match Utc::parse_rfc3339(&s) {
            Some(t) => Value::from(t.to_unix().saturating_mul(1000)),
            None => misfit(Value::String(s), extra),
        },
        (Col::Struct(fields), Value::Object(mut obj)) => {
            let mut out = Map::new();
            for (n, fc) in fields {
                if let Some(fv) = obj.remove(*n) {
                    let sub = format!("{path}.{n}");
                    out.insert(name(n, lowercase), conform(fv, *fc, &sub, lowercase, extra));
                }
            }
            for (k, v) in obj {
                extra.insert(format!("{path}.{k}"), v);
            }
            Value::Object(out)
        }
        (Col::List(elem), Value::Array(items)) => {
            let path = format!("{path}[]");
            Value::Array(
                items
                    .into_iter()
                    .map(|i| conform(i, *elem, &path, lowercase, extra))
                    .collect(),
            )
        }
        (_, v) => misfit(v, extra),
    }
}

/// A value of a string map: a string as it is, anything else as its JSON text.
fn map_value(v: Value) -> String {
    match v {
        Value::String(s) => s,
        other => other.to_string(),
    }
}

/// Added columns from the config, in a stable order.
pub fn added_columns(map: &BTreeMap<String, AddedType>) -> Vec<(String, Col)> {
    map.iter().map(|(n, t)| (n.clone(), t.col())).collect()
}

#[cfg(all(test, feature = "parquet"))]
mod tests {
    use super::*;

    #[test]
    fn conform_keeps_known_fields_typed_and_everything_else_in_extra() {
        let layout = Layout::new(false, &[("xpriority".into(), Col::Str)]);
        let line = br#"{"eventTime":"2024-03-18T14:30:07Z","readOnly":"true","requestParameters":{"a":[1]},"userIdentity":{"type":"IAMUser","onBehalfOf":{"x":1}},"resources":[{"ARN":"a","zz":2}],"xpriority":"high","newField":7,"geo":{"asn":"bad"}}"#;
        let v = layout.conform(line);
        assert_eq!(v["eventTime"], 1_710_772_207_000i64);
        assert_eq!(v["readOnly"], true);
        assert_eq!(v["requestParameters"], r#"{"a":[1]}"#);
        assert_eq!(v["userIdentity"]["type"], "IAMUser");
        assert_eq!(v["xpriority"], "high");
        assert_eq!(v["geo"]["asn"], Value::Null);
        let extra: Value = serde_json::from_str(v["extra"].as_str().unwrap()).unwrap();
        assert_eq!(
            extra,
            serde_json::json!({"userIdentity.onBehalfOf": {"x": 1}, "resources[].zz": 2,
                               "newField": 7, "geo.asn": "bad"})
        );
    }

    #[test]
    fn lowercase_renames_nested_fields_too() {
        let layout = Layout::new(true, &[]);
        let v = layout.conform(br#"{"userIdentity":{"userName":"bob"},"eventID":"e"}"#);
        assert_eq!(v["useridentity"]["username"], "bob");
        assert_eq!(v["eventid"], "e");
        assert!(
            layout
                .schema
                .fields()
                .iter()
                .all(|f| f.name() == &f.name().to_ascii_lowercase())
        );
    }

    #[test]
    fn batches_decode_every_line_even_odd_ones() {
        let layout = Layout::new(false, &[]);
        let mut lines = Vec::new();
        for i in 0..(SLICE_ROWS + 3) {
            lines.extend_from_slice(
                format!(r#"{{"eventID":"{i}","readOnly":{{"odd":1}},"eventTime":"nope"}}"#)
                    .as_bytes(),
            );
            lines.push(b'\n');
        }
        let mut rows = 0;
        let mut batches = 0;
        layout
            .batches(&lines, |b| {
                rows += b.num_rows();
                batches += 1;
                Ok(())
            })
            .unwrap();
        assert_eq!((rows, batches), (SLICE_ROWS + 3, 2));
    }
}
