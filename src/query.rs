//! `trailhose query`: SQL (DataFusion) over trailhose output, JSON lines or Parquet, in a local
//! directory or under an S3 prefix. The table `events` has the Parquet schema
//! (`sink::columnar`) whatever the format, plus one string column per `name=value` directory
//! level (year, month, ...). Filters on those columns are evaluated against the listed
//! partitions before anything is read, so `WHERE year = '2024' AND month = '03'` reads one month.
//! `json_extract_scalar(json, '$.a.b')` reads the JSON-text columns as in Athena.

use std::collections::BTreeMap;
use std::io::Read;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, BooleanArray, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::util::display::{ArrayFormatter, FormatOptions};
use async_trait::async_trait;
use bytes::Bytes;
use datafusion::catalog::{MemTable, Session, TableProvider};
use datafusion::common::{DFSchema, DataFusionError, ScalarValue};
use datafusion::datasource::TableType;
use datafusion::logical_expr::{
    ColumnarValue, Expr, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature,
    TableProviderFilterPushDown, Volatility,
};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::prelude::{SessionConfig, SessionContext};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use crate::config::OutputUrl;
use crate::sink::columnar::Layout;
use crate::sink::write::{Store, WriteError};

#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("output {0}: {1}")]
    Output(String, String),
    #[error(transparent)]
    Store(#[from] WriteError),
    #[error("no trailhose objects (.json, .json.gz, .json.zst, .parquet) under {0}")]
    Empty(String),
    #[error("{0} holds both JSON and Parquet objects; query one format at a time")]
    Mixed(String),
    #[error("reading {0}: {1}")]
    Read(String, String),
    #[error("{0}")]
    Sql(#[from] DataFusionError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ObjFormat {
    Json,
    JsonGz,
    JsonZst,
    Parquet,
}

fn obj_format(key: &str) -> Option<ObjFormat> {
    let name = key.rsplit('/').next().unwrap_or(key);
    if name.starts_with('.') {
        return None;
    }
    [
        (".json.gz", ObjFormat::JsonGz),
        (".json.zst", ObjFormat::JsonZst),
        (".json", ObjFormat::Json),
        (".parquet", ObjFormat::Parquet),
    ]
    .into_iter()
    .find(|(ext, _)| name.ends_with(ext))
    .map(|(_, f)| f)
}

/// One object and its partition values (`name=value` directory levels).
#[derive(Debug, Clone)]
struct Object {
    key: String,
    format: ObjFormat,
    partition: BTreeMap<String, String>,
}

/// The `name=value` directory levels of a key, in order.
fn partition_of(key: &str) -> Vec<(String, String)> {
    let mut segs: Vec<&str> = key.split('/').collect();
    segs.pop();
    segs.iter()
        .filter_map(|s| s.split_once('='))
        .filter(|(k, _)| !k.is_empty())
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// The events table over listed objects.
#[derive(Debug)]
pub struct EventsTable {
    store: Arc<Store>,
    objects: Vec<Object>,
    partition_cols: Vec<String>,
    /// Columns of the objects themselves, then the partition columns.
    schema: SchemaRef,
    data_schema: SchemaRef,
    layout: Arc<Layout>,
    /// Objects actually read by the last scan.
    read: Arc<std::sync::atomic::AtomicUsize>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe(""))
    }
}

impl EventsTable {
    /// Lists the output (error records under `errors/` are not events and are skipped).
    pub async fn open(store: Arc<Store>) -> Result<EventsTable, QueryError> {
        let keys = store.list("").await?;
        let mut objects: Vec<Object> = keys
            .into_iter()
            .filter(|k| !k.starts_with("errors/"))
            .filter_map(|key| {
                let format = obj_format(&key)?;
                let partition = partition_of(&key).into_iter().collect();
                Some(Object {
                    key,
                    format,
                    partition,
                })
            })
            .collect();
        objects.sort_by(|a, b| a.key.cmp(&b.key));
        if objects.is_empty() {
            return Err(QueryError::Empty(store.describe("")));
        }
        let parquet = objects
            .iter()
            .filter(|o| o.format == ObjFormat::Parquet)
            .count();
        if parquet != 0 && parquet != objects.len() {
            return Err(QueryError::Mixed(store.describe("")));
        }
        let mut partition_cols: Vec<String> = Vec::new();
        for o in &objects {
            for (k, _) in partition_of(&o.key) {
                if !partition_cols.contains(&k) {
                    partition_cols.push(k);
                }
            }
        }
        // OCSF output (`output.schema = "ocsf"`) is read with the union of its classes'
        // columns: an object of one class has a subset of them, the rest read as null.
        let first = &objects[0];
        let body = read_object(&store, &first.key).await?;
        let (layout, data_schema) = if parquet > 0 {
            // Parquet objects carry their schema (lower-case names or added columns included).
            let schema = ParquetRecordBatchReaderBuilder::try_new(body)
                .map_err(|e| QueryError::Read(store.describe(&first.key), e.to_string()))?
                .schema()
                .clone();
            if is_ocsf_schema(&schema) {
                let layout = Arc::new(crate::sink::ocsf::parquet::union_layout());
                let schema = layout.schema.clone();
                (layout, schema)
            } else {
                (Arc::new(Layout::new(false, &[])), schema)
            }
        } else {
            let text = decompress(first.format, &body)
                .map_err(|e| QueryError::Read(store.describe(&first.key), e))?;
            let first_line = text.split(|b| *b == b'\n').next().unwrap_or_default();
            let layout = if is_ocsf_line(first_line) {
                crate::sink::ocsf::parquet::union_layout()
            } else {
                Layout::new(false, &[])
            };
            let schema = layout.schema.clone();
            (Arc::new(layout), schema)
        };
        let mut fields: Vec<Field> = data_schema
            .fields()
            .iter()
            .map(|f| f.as_ref().clone())
            .collect();
        partition_cols.retain(|p| data_schema.field_with_name(p).is_err());
        fields.extend(
            partition_cols
                .iter()
                .map(|p| Field::new(p, DataType::Utf8, true)),
        );
        Ok(EventsTable {
            store,
            objects,
            partition_cols,
            schema: Arc::new(Schema::new(fields)),
            data_schema,
            layout,
            read: Arc::default(),
        })
    }

    /// Objects whose partition values pass every filter that uses partition columns only.
    fn prune(&self, state: &dyn Session, filters: &[Expr]) -> Result<Vec<&Object>, QueryError> {
        let usable: Vec<&Expr> = filters
            .iter()
            .filter(|f| {
                let refs = f.column_refs();
                !refs.is_empty() && refs.iter().all(|c| self.partition_cols.contains(&c.name))
            })
            .collect();
        if usable.is_empty() {
            return Ok(self.objects.iter().collect());
        }
        let pschema = Arc::new(Schema::new(
            self.partition_cols
                .iter()
                .map(|p| Field::new(p, DataType::Utf8, true))
                .collect::<Vec<_>>(),
        ));
        let columns: Vec<ArrayRef> = self
            .partition_cols
            .iter()
            .map(|p| {
                Arc::new(StringArray::from_iter(
                    self.objects.iter().map(|o| o.partition.get(p).cloned()),
                )) as ArrayRef
            })
            .collect();
        let batch = RecordBatch::try_new(pschema.clone(), columns)
            .map_err(|e| QueryError::Sql(e.into()))?;
        let df_schema = DFSchema::try_from(pschema)?;
        let mut keep = vec![true; self.objects.len()];
        for f in usable {
            let expr = state.create_physical_expr(f.clone(), &df_schema)?;
            let result = expr.evaluate(&batch)?.into_array(batch.num_rows())?;
            let Some(mask) = result.as_any().downcast_ref::<BooleanArray>() else {
                continue;
            };
            for (i, k) in keep.iter_mut().enumerate() {
                // Null (e.g. a missing partition value) does not pass, as in WHERE.
                *k = *k && mask.is_valid(i) && mask.value(i);
            }
        }
        Ok(self
            .objects
            .iter()
            .zip(keep)
            .filter_map(|(o, k)| k.then_some(o))
            .collect())
    }

    async fn load(&self, o: &Object) -> Result<Vec<RecordBatch>, QueryError> {
        let body = read_object(&self.store, &o.key).await?;
        let where_ = || self.store.describe(&o.key);
        let mut batches = Vec::new();
        match o.format {
            ObjFormat::Parquet => {
                let reader = ParquetRecordBatchReaderBuilder::try_new(body)
                    .and_then(|b| b.build())
                    .map_err(|e| QueryError::Read(where_(), e.to_string()))?;
                for b in reader {
                    batches.push(b.map_err(|e| QueryError::Read(where_(), e.to_string()))?);
                }
            }
            f => {
                let text = decompress(f, &body).map_err(|e| QueryError::Read(where_(), e))?;
                self.layout
                    .batches(&text, |b| {
                        batches.push(b);
                        Ok(())
                    })
                    .map_err(|e| QueryError::Read(where_(), e.to_string()))?;
            }
        }
        batches
            .into_iter()
            .map(|b| self.with_partition(b, o))
            .collect()
    }

    /// Shapes a batch to the table: the data schema's columns, then the partition values.
    fn with_partition(&self, b: RecordBatch, o: &Object) -> Result<RecordBatch, QueryError> {
        let n = b.num_rows();
        let mut columns: Vec<ArrayRef> = Vec::with_capacity(self.schema.fields().len());
        for f in self.data_schema.fields() {
            match b.column_by_name(f.name()) {
                Some(c) if c.data_type() == f.data_type() => columns.push(c.clone()),
                _ => columns.push(arrow::array::new_null_array(f.data_type(), n)),
            }
        }
        for p in &self.partition_cols {
            let v = o.partition.get(p).map(String::as_str);
            columns.push(Arc::new(StringArray::from(vec![v; n])));
        }
        RecordBatch::try_new(self.schema.clone(), columns).map_err(|e| QueryError::Sql(e.into()))
    }
}

/// Whether a Parquet schema is OCSF's (trailhose writes `class_uid` and `metadata` in every
/// class; CloudTrail's schema has neither).
fn is_ocsf_schema(schema: &Schema) -> bool {
    schema.field_with_name("class_uid").is_ok() && schema.field_with_name("metadata").is_ok()
}

/// Whether a JSON line is an OCSF record.
fn is_ocsf_line(line: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct Probe {
        class_uid: Option<u64>,
        metadata: Option<serde::de::IgnoredAny>,
    }
    serde_json::from_slice::<Probe>(line)
        .is_ok_and(|p| p.class_uid.is_some() && p.metadata.is_some())
}

async fn read_object(store: &Store, key: &str) -> Result<Bytes, QueryError> {
    store
        .get(key)
        .await
        .map_err(|e| QueryError::Read(store.describe(key), e.to_string()))
}

fn decompress(f: ObjFormat, body: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    match f {
        ObjFormat::JsonGz => {
            flate2::read::MultiGzDecoder::new(body)
                .read_to_end(&mut out)
                .map_err(|e| e.to_string())?;
        }
        ObjFormat::JsonZst => out = zstd::stream::decode_all(body).map_err(|e| e.to_string())?,
        _ => out.extend_from_slice(body),
    }
    Ok(out)
}

#[async_trait]
impl TableProvider for EventsTable {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> datafusion::error::Result<Vec<TableProviderFilterPushDown>> {
        // Inexact: used to skip objects, and applied again to the rows.
        Ok(vec![TableProviderFilterPushDown::Inexact; filters.len()])
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> datafusion::error::Result<Arc<dyn ExecutionPlan>> {
        let external = |e: QueryError| DataFusionError::External(Box::new(e));
        let objects = self.prune(state, filters).map_err(external)?;
        self.read
            .store(objects.len(), std::sync::atomic::Ordering::Relaxed);
        let mut batches = Vec::new();
        for o in objects {
            batches.extend(self.load(o).await.map_err(external)?);
        }
        let mem = MemTable::try_new(self.schema.clone(), vec![batches])?;
        mem.scan(state, projection, filters, limit).await
    }
}

/// Athena's `json_extract_scalar(json, '$.a.b')`: the string, number or boolean at a simple
/// path (`$.key`, `.key`, `[n]`), else null.
#[derive(Debug, PartialEq, Eq, Hash)]
struct JsonExtractScalar {
    signature: Signature,
}

/// Walks `$.a.b[0]` in `v`.
fn json_path<'v>(v: &'v serde_json::Value, path: &str) -> Option<&'v serde_json::Value> {
    let mut rest = path.strip_prefix('$')?;
    let mut cur = v;
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix('.') {
            let end = r.find(['.', '[']).unwrap_or(r.len());
            cur = cur.get(&r[..end])?;
            rest = &r[end..];
        } else if let Some(r) = rest.strip_prefix('[') {
            let end = r.find(']')?;
            let inner = r[..end].trim_matches(['"', '\'']);
            cur = match inner.parse::<usize>() {
                Ok(i) => cur.get(i)?,
                Err(_) => cur.get(inner)?,
            };
            rest = &r[end + 1..];
        } else {
            return None;
        }
    }
    Some(cur)
}

fn extract_scalar(json: &str, path: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    match json_path(&v, path)? {
        serde_json::Value::String(s) => Some(s.clone()),
        v @ (serde_json::Value::Number(_) | serde_json::Value::Bool(_)) => Some(v.to_string()),
        _ => None,
    }
}

impl ScalarUDFImpl for JsonExtractScalar {
    fn name(&self) -> &str {
        "json_extract_scalar"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _args: &[DataType]) -> datafusion::error::Result<DataType> {
        Ok(DataType::Utf8)
    }

    fn invoke_with_args(
        &self,
        args: ScalarFunctionArgs,
    ) -> datafusion::error::Result<ColumnarValue> {
        let path = match args.args.get(1) {
            Some(ColumnarValue::Scalar(
                ScalarValue::Utf8(Some(p))
                | ScalarValue::Utf8View(Some(p))
                | ScalarValue::LargeUtf8(Some(p)),
            )) => p.clone(),
            _ => {
                return Err(DataFusionError::Plan(
                    "json_extract_scalar(json, path): path must be a string literal".into(),
                ));
            }
        };
        let Some(json) = args.args.first() else {
            return Err(DataFusionError::Plan(
                "json_extract_scalar needs two arguments".into(),
            ));
        };
        let json = json.clone().into_array(args.number_rows)?;
        let json = arrow::compute::cast(&json, &DataType::Utf8)?;
        let Some(json) = json.as_any().downcast_ref::<StringArray>() else {
            return Err(DataFusionError::Plan(
                "json_extract_scalar: the first argument must be a string".into(),
            ));
        };
        let out: StringArray = json
            .iter()
            .map(|j| j.and_then(|j| extract_scalar(j, &path)))
            .collect();
        Ok(ColumnarValue::Array(Arc::new(out)))
    }
}

/// The store behind an output URL.
pub async fn open_output(
    url: &str,
    region: Option<&str>,
    endpoint: Option<&str>,
) -> Result<Store, QueryError> {
    Ok(
        match OutputUrl::parse(url).map_err(|m| QueryError::Output(url.to_owned(), m))? {
            OutputUrl::Local(root) => Store::Local { root },
            OutputUrl::S3 { bucket, prefix } => Store::S3 {
                client: crate::pipeline::s3_client(region, endpoint, endpoint.is_some()).await,
                bucket,
                prefix,
                options: crate::sink::write::S3Options {
                    sse_kms_key_id: None,
                    storage_class: None,
                    multipart_threshold: u64::MAX,
                    part_size: 16 << 20,
                    attempt_timeout: std::time::Duration::from_secs(120),
                },
            },
        },
    )
}

/// What a query returned.
pub struct Answer {
    pub batches: Vec<RecordBatch>,
    /// Objects read, and objects listed.
    pub read: usize,
    pub listed: usize,
}

/// Runs one SQL statement over the output at `store`.
pub async fn query(store: Store, sql: &str) -> Result<Answer, QueryError> {
    let table = EventsTable::open(Arc::new(store)).await?;
    let listed = table.objects.len();
    let read = table.read.clone();
    // Column names keep their case (eventName, userIdentity.userName), as in the data.
    let config =
        SessionConfig::new().set_bool("datafusion.sql_parser.enable_ident_normalization", false);
    let ctx = SessionContext::new_with_config(config);
    ctx.register_table("events", Arc::new(table))?;
    ctx.register_udf(ScalarUDF::new_from_impl(JsonExtractScalar {
        signature: Signature::string(2, Volatility::Immutable),
    }));
    let batches = ctx.sql(sql).await?.collect().await?;
    Ok(Answer {
        batches,
        read: read.load(std::sync::atomic::Ordering::Relaxed),
        listed,
    })
}

/// The answer as CSV (RFC 4180, header row) or an aligned table.
pub fn render(a: &Answer, csv: bool) -> Result<String, QueryError> {
    let rows: usize = a.batches.iter().map(|b| b.num_rows()).sum();
    if !csv && rows == 0 {
        return Ok("(no rows)\n".to_owned());
    }
    if !csv {
        return Ok(arrow::util::pretty::pretty_format_batches(&a.batches)
            .map_err(|e| QueryError::Sql(e.into()))?
            .to_string()
            + "\n");
    }
    let mut out = String::new();
    let Some(first) = a.batches.first() else {
        return Ok(out);
    };
    let header: Vec<String> = first
        .schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    push_csv_row(&mut out, &header);
    let opts = FormatOptions::default();
    for b in &a.batches {
        let fmts = b
            .columns()
            .iter()
            .map(|c| ArrayFormatter::try_new(c.as_ref(), &opts))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| QueryError::Sql(e.into()))?;
        for row in 0..b.num_rows() {
            let cells: Vec<String> = b
                .columns()
                .iter()
                .zip(&fmts)
                .map(|(c, f)| {
                    if c.is_null(row) {
                        String::new()
                    } else {
                        f.value(row).to_string()
                    }
                })
                .collect();
            push_csv_row(&mut out, &cells);
        }
    }
    Ok(out)
}

fn push_csv_row(out: &mut String, cells: &[String]) {
    for (i, c) in cells.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        if c.contains([',', '"', '\r', '\n']) {
            out.push('"');
            out.push_str(&c.replace('"', "\"\""));
            out.push('"');
        } else {
            out.push_str(c);
        }
    }
    out.push_str("\r\n");
}

/// The `query` command: the answer as text, and a line for stderr saying what was read.
pub async fn run(
    url: &str,
    sql: &str,
    region: Option<&str>,
    endpoint: Option<&str>,
    csv: bool,
) -> Result<(String, String), QueryError> {
    let store = open_output(url, region, endpoint).await?;
    let a = query(store, sql).await?;
    let note = format!("read {} of {} objects", a.read, a.listed);
    Ok((render(&a, csv)?, note))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_and_formats_come_from_keys() {
        assert_eq!(
            partition_of("year=2024/month=03/x.json.gz"),
            vec![
                ("year".to_owned(), "2024".to_owned()),
                ("month".to_owned(), "03".to_owned())
            ]
        );
        assert_eq!(obj_format("a/b.parquet"), Some(ObjFormat::Parquet));
        assert_eq!(obj_format("a/.b.parquet.tmp"), None);
        assert_eq!(obj_format("a/b.json.zst"), Some(ObjFormat::JsonZst));
    }

    #[test]
    fn json_extract_scalar_walks_simple_paths() {
        let j = r#"{"userName":"bob","a":{"b":[{"c":1}]},"t":true}"#;
        assert_eq!(extract_scalar(j, "$.userName").as_deref(), Some("bob"));
        assert_eq!(extract_scalar(j, "$.a.b[0].c").as_deref(), Some("1"));
        assert_eq!(extract_scalar(j, "$.t").as_deref(), Some("true"));
        assert_eq!(extract_scalar(j, "$.a"), None);
        assert_eq!(extract_scalar(j, "$.nope"), None);
        assert_eq!(extract_scalar("not json", "$.a"), None);
    }
}
