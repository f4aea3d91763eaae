//! OCSF as Parquet: the columns follow the class. Each class's schema is the set of 1.1.0
//! attributes the mapping (`map`) writes for it, declared once here with their OCSF types
//! (integers, booleans, nested objects, arrays). A batch of one class (the key template's
//! `{ocsf_class}`, as Security Lake's layout has it) is written with that class's schema; a
//! batch that mixes classes gets the union of them. `unmapped` is a map of strings, as in
//! Security Lake's own tables.

#[cfg(feature = "parquet")]
use arrow::datatypes::SchemaRef;
#[cfg(feature = "parquet")]
use parquet::arrow::ArrowWriter;
#[cfg(feature = "parquet")]
use parquet::file::properties::WriterProperties;

use super::class::Class;
use crate::sink::columnar::Col;
#[cfg(feature = "parquet")]
use crate::sink::columnar::{ColumnarError, Layout, ParquetSpec};

const ACCOUNT: Col = Col::Struct(&[("uid", Col::Str), ("type", Col::Str), ("type_id", Col::Int)]);
const NAMED: Col = Col::Struct(&[("name", Col::Str)]);
const GROUP: Col = Col::Struct(&[("name", Col::Str)]);
const USER: Col = Col::Struct(&[
    ("uid", Col::Str),
    ("uid_alt", Col::Str),
    ("name", Col::Str),
    ("type", Col::Str),
    ("type_id", Col::Int),
    ("account", ACCOUNT),
    ("credential_uid", Col::Str),
    ("groups", Col::List(&GROUP)),
]);
const ACTOR: Col = Col::Struct(&[
    ("user", USER),
    (
        "session",
        Col::Struct(&[
            ("is_mfa", Col::Bool),
            ("created_time", Col::Int),
            ("issuer", Col::Str),
        ]),
    ),
    ("idp", NAMED),
    ("invoked_by", Col::Str),
]);
const API: Col = Col::Struct(&[
    ("operation", Col::Str),
    ("service", NAMED),
    ("version", Col::Str),
    ("request", Col::Struct(&[("uid", Col::Str)])),
    (
        "response",
        Col::Struct(&[("error", Col::Str), ("error_message", Col::Str)]),
    ),
]);
const RESOURCE: Col = Col::Struct(&[
    ("uid", Col::Str),
    ("type", Col::Str),
    ("owner", Col::Struct(&[("account", ACCOUNT)])),
]);
const SRC_ENDPOINT: Col = Col::Struct(&[
    ("ip", Col::Str),
    ("svc_name", Col::Str),
    ("uid", Col::Str),
    (
        "location",
        Col::Struct(&[
            ("coordinates", Col::List(&Col::Float)),
            ("city", Col::Str),
            ("country", Col::Str),
            ("region", Col::Str),
            ("isp", Col::Str),
        ]),
    ),
]);
const CLOUD: Col = Col::Struct(&[
    ("provider", Col::Str),
    ("region", Col::Str),
    ("account", ACCOUNT),
]);
const METADATA: Col = Col::Struct(&[
    ("version", Col::Str),
    (
        "product",
        Col::Struct(&[
            ("name", Col::Str),
            ("vendor_name", Col::Str),
            ("version", Col::Str),
        ]),
    ),
    ("profiles", Col::List(&Col::Str)),
    ("uid", Col::Str),
    ("original_time", Col::Str),
    ("event_code", Col::Str),
    ("correlation_uid", Col::Str),
    ("log_name", Col::Str),
    ("log_provider", Col::Str),
]);

const ENRICHMENT: Col = Col::Struct(&[
    ("name", Col::Str),
    ("value", Col::Str),
    ("type", Col::Str),
    ("provider", Col::Str),
    ("data", Col::Json),
]);

/// Which classes write an attribute.
const ALL: &[Class] = &Class::ALL;
const API_ONLY: &[Class] = &[Class::ApiActivity];
const AUTH_ONLY: &[Class] = &[Class::Authentication];
const WITH_USER: &[Class] = &[Class::Authentication, Class::AccountChange];
const CHANGE_ONLY: &[Class] = &[Class::AccountChange];

/// Every attribute the mapping writes, in the schema's order: the classification, the
/// occurrence, the class's own objects, then context.
const ATTRIBUTES: &[(&str, Col, &[Class])] = &[
    ("class_uid", Col::Int, ALL),
    ("class_name", Col::Str, ALL),
    ("category_uid", Col::Int, ALL),
    ("category_name", Col::Str, ALL),
    ("activity_id", Col::Int, ALL),
    ("activity_name", Col::Str, ALL),
    ("type_uid", Col::Int, ALL),
    ("type_name", Col::Str, ALL),
    ("severity_id", Col::Int, ALL),
    ("severity", Col::Str, ALL),
    ("time", Col::Int, ALL),
    ("status_id", Col::Int, ALL),
    ("status", Col::Str, ALL),
    ("status_code", Col::Str, ALL),
    ("status_detail", Col::Str, ALL),
    ("message", Col::Str, ALL),
    ("actor", ACTOR, ALL),
    ("api", API, ALL),
    ("resources", Col::List(&RESOURCE), API_ONLY),
    ("user", USER, WITH_USER),
    ("auth_protocol_id", Col::Int, AUTH_ONLY),
    ("auth_protocol", Col::Str, AUTH_ONLY),
    ("is_mfa", Col::Bool, AUTH_ONLY),
    ("is_remote", Col::Bool, AUTH_ONLY),
    ("service", NAMED, AUTH_ONLY),
    ("session", Col::Struct(&[("issuer", Col::Str)]), AUTH_ONLY),
    (
        "policy",
        Col::Struct(&[("uid", Col::Str), ("name", Col::Str)]),
        CHANGE_ONLY,
    ),
    ("src_endpoint", SRC_ENDPOINT, ALL),
    ("enrichments", Col::List(&ENRICHMENT), ALL),
    (
        "http_request",
        Col::Struct(&[("user_agent", Col::Str)]),
        ALL,
    ),
    ("cloud", CLOUD, ALL),
    ("metadata", METADATA, ALL),
    ("unmapped", Col::StrMap, ALL),
    ("raw_data", Col::Str, ALL),
];

/// The columns of one class, or of the union when `class` is None.
pub fn columns(class: Option<Class>) -> Vec<(String, Col)> {
    ATTRIBUTES
        .iter()
        .filter(|(_, _, classes)| class.is_none_or(|c| classes.contains(&c)))
        .map(|(n, c, _)| ((*n).to_owned(), *c))
        .collect()
}

#[cfg(feature = "parquet")]
/// The union of the three classes' columns: what `trailhose query` reads OCSF output with.
pub fn union_layout() -> Layout {
    Layout::of(columns(None), false, Some("unmapped"))
}

#[cfg(feature = "parquet")]
/// The layouts: one per class and the union, built once.
#[derive(Debug)]
pub struct Layouts {
    by_class: Vec<(Class, Layout)>,
    union: Layout,
}

#[cfg(feature = "parquet")]
impl Default for Layouts {
    fn default() -> Self {
        Layouts::new()
    }
}

#[cfg(feature = "parquet")]
impl Layouts {
    pub fn new() -> Layouts {
        let layout = |c| Layout::of(columns(c), false, Some("unmapped"));
        Layouts {
            by_class: Class::ALL.iter().map(|c| (*c, layout(Some(*c)))).collect(),
            union: layout(None),
        }
    }

    pub fn schema(&self, class: Option<Class>) -> SchemaRef {
        self.pick(class).schema.clone()
    }

    fn pick(&self, class: Option<Class>) -> &Layout {
        class
            .and_then(|c| self.by_class.iter().find(|(k, _)| *k == c))
            .map_or(&self.union, |(_, l)| l)
    }
}

/// The one class of a batch of OCSF lines, or None when they mix classes (or none says).
pub fn batch_class(lines: &[u8]) -> Option<Class> {
    let mut found = None;
    for line in lines.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        let c = line_class(line)?;
        if found.is_some_and(|f| f != c) {
            return None;
        }
        found = Some(c);
    }
    found
}

/// `class_uid` of one line, found without parsing it (the mapping writes the key once, at
/// the top level; nested objects hold no `class_uid`).
fn line_class(line: &[u8]) -> Option<Class> {
    const KEY: &[u8] = b"\"class_uid\":";
    let at = memchr::memmem::find(line, KEY)? + KEY.len();
    let digits = line.get(at..)?;
    let n = digits.iter().take_while(|b| b.is_ascii_digit()).count();
    let uid: u32 = std::str::from_utf8(digits.get(..n)?).ok()?.parse().ok()?;
    Class::ALL.into_iter().find(|c| c.uid() == uid)
}

/// The lines of a batch ordered by `time` (stable: equal times keep their order), as Security
/// Lake asks of an object and as the column's statistics prune best. Borrowed when already in
/// order, the common case for CloudTrail's files.
pub fn sorted_by_time(lines: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    #[derive(serde::Deserialize)]
    struct Time {
        time: Option<i64>,
    }
    let mut rows: Vec<(i64, &[u8])> = lines
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| {
            let t = serde_json::from_slice::<Time>(l).ok().and_then(|t| t.time);
            (t.unwrap_or(i64::MIN), l)
        })
        .collect();
    if rows.windows(2).all(|w| matches!(w, [a, b] if a.0 <= b.0)) {
        return std::borrow::Cow::Borrowed(lines);
    }
    rows.sort_by_key(|(t, _)| *t);
    let mut out = Vec::with_capacity(lines.len() + 1);
    for (_, l) in rows {
        out.extend_from_slice(l);
        out.push(b'\n');
    }
    std::borrow::Cow::Owned(out)
}

#[cfg(feature = "parquet")]
/// Encodes one sealed batch of OCSF lines as one Parquet file, with its class's schema, rows
/// in time order.
pub fn encode(
    spec: &ParquetSpec,
    layouts: &Layouts,
    lines: &[u8],
) -> Result<Vec<u8>, ColumnarError> {
    let sorted = sorted_by_time(lines);
    let lines: &[u8] = &sorted;
    let layout = layouts.pick(batch_class(lines));
    let props = WriterProperties::builder()
        .set_compression(spec.compression)
        .set_max_row_group_row_count(Some(spec.row_group_rows.max(1)))
        .set_created_by(format!("trailhose {}", env!("CARGO_PKG_VERSION")))
        .build();
    let mut writer = ArrowWriter::try_new(Vec::new(), layout.schema.clone(), Some(props))?;
    layout.batches(lines, |b| Ok(writer.write(&b)?))?;
    Ok(writer.into_inner()?)
}

#[cfg(all(test, feature = "parquet"))]
mod tests {
    use arrow::array::AsArray;
    use arrow::datatypes::Int64Type;
    use bytes::Bytes;
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    use parquet::basic::Compression;
    use serde_json::Value;

    use super::*;
    use crate::sink::ocsf::{OcsfConfig, encode_event};

    fn spec() -> ParquetSpec {
        ParquetSpec {
            lowercase: false,
            added: Vec::new(),
            compression: Compression::SNAPPY,
            row_group_rows: 1000,
        }
    }

    fn lines(cases: &[&str]) -> Vec<u8> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ocsf/cases");
        let mut out = Vec::new();
        for c in cases {
            let raw = std::fs::read(dir.join(format!("{c}.json"))).unwrap();
            encode_event(
                &mut out,
                raw.trim_ascii_end(),
                &[],
                0,
                &OcsfConfig::default(),
            );
        }
        out
    }

    fn read(file: Vec<u8>) -> Vec<arrow::array::RecordBatch> {
        ParquetRecordBatchReaderBuilder::try_new(Bytes::from(file))
            .unwrap()
            .build()
            .unwrap()
            .map(Result::unwrap)
            .collect()
    }

    #[test]
    fn a_batch_of_one_class_has_that_classes_columns() {
        let layouts = Layouts::new();
        let data = lines(&[
            "console_login_mfa",
            "console_login_failed",
            "assume_role_with_saml",
        ]);
        assert_eq!(batch_class(&data), Some(Class::Authentication));
        let batches = read(encode(&spec(), &layouts, &data).unwrap());
        let schema = batches[0].schema();
        let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
        assert!(
            names.contains(&"user") && names.contains(&"is_mfa"),
            "{names:?}"
        );
        assert!(
            names.contains(&"api") && !names.contains(&"policy"),
            "{names:?}"
        );
        let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
        assert_eq!(rows, 3);
        let uid = batches[0].column_by_name("class_uid").unwrap();
        assert!(
            uid.as_primitive::<Int64Type>()
                .iter()
                .all(|v| v == Some(3002))
        );
        let user = batches[0].column_by_name("user").unwrap().as_struct();
        let name = user.column_by_name("name").unwrap().as_string::<i32>();
        assert_eq!(name.value(0), "alice");
    }

    #[test]
    fn rows_are_sorted_by_time_and_sorted_batches_are_borrowed() {
        let line = |t: &str| {
            format!("{{\"class_uid\":6003,\"time\":{t},\"metadata\":{{\"uid\":\"{t}\"}}}}\n")
        };
        let data: String = ["3", "1", "2", "1"].iter().map(|t| line(t)).collect();
        let sorted = sorted_by_time(data.as_bytes());
        let times: Vec<i64> = sorted
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| {
                serde_json::from_slice::<Value>(l).unwrap()["time"]
                    .as_i64()
                    .unwrap()
            })
            .collect();
        assert_eq!(times, [1, 1, 2, 3]);
        let again = sorted_by_time(&sorted);
        assert!(matches!(again, std::borrow::Cow::Borrowed(_)));
        let layouts = Layouts::new();
        let batches = read(encode(&spec(), &layouts, data.as_bytes()).unwrap());
        let col = batches[0]
            .column_by_name("time")
            .unwrap()
            .as_primitive::<Int64Type>();
        assert_eq!(col.values().to_vec(), [1, 1, 2, 3]);
    }

    #[test]
    fn mixed_batches_get_the_union_and_nothing_misfits() {
        let layouts = Layouts::new();
        let all = [
            "access_denied",
            "assume_role_with_saml",
            "console_login_failed",
            "console_login_mfa",
            "create_access_key",
            "create_user",
            "get_object_data_event",
            "insight",
            "service_source_ip",
        ];
        let data = lines(&all);
        assert_eq!(batch_class(&data), None);
        let union = layouts.pick(None);
        // Every attribute the mapping writes has a column of its type: conforming a record
        // moves nothing into `unmapped`.
        for line in data.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            let record: Value = serde_json::from_slice(line).unwrap();
            let conformed = union.conform(line);
            let unmapped = conformed
                .get("unmapped")
                .cloned()
                .unwrap_or(Value::Object(Default::default()));
            let want = record
                .get("unmapped")
                .cloned()
                .unwrap_or(Value::Object(Default::default()));
            assert_eq!(unmapped, want, "{record}");
        }
        let batches = read(encode(&spec(), &layouts, &data).unwrap());
        assert_eq!(batches[0].schema(), layouts.schema(None));
        assert_eq!(
            batches.iter().map(|b| b.num_rows()).sum::<usize>(),
            all.len()
        );
        let coords = lines(&["get_object_data_event"]);
        assert_eq!(batch_class(&coords), Some(Class::ApiActivity));
    }
}
