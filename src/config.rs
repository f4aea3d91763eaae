//! The one TOML configuration file, validated up front. Every error names the key at fault.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub mod enrich;

use crate::sink::batch::Limits;
#[cfg(feature = "parquet")]
use crate::sink::columnar::{self, ParquetSpec};
use crate::sink::encode::{Codec, Compression};
use crate::sink::flat::{Dialect, FlatSpec};
use crate::sink::format::{Converter, Format};
use crate::sink::ocsf::lake::{Lake, SecurityLakeConfig};
#[cfg(feature = "parquet")]
use crate::sink::ocsf::parquet::Layouts;
use crate::sink::ocsf::{OcsfConfig, Schema};
use crate::sink::partition::{self, KeyTemplate, Partitioner};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid config {path}: {message}")]
    Parse { path: String, message: String },
    #[error("invalid config: {key}: {message}")]
    Invalid { key: &'static str, message: String },
}

/// The optional features this binary was built with.
#[derive(Debug, Clone, Copy)]
struct Built {
    parquet: bool,
    transforms: bool,
}

impl Built {
    const THIS: Built = Built {
        parquet: cfg!(feature = "parquet"),
        transforms: cfg!(feature = "transforms"),
    };
}

/// `format = "parquet"` in a build without the `parquet` feature.
fn no_parquet() -> ConfigError {
    invalid(
        "output.format",
        "this trailhose was built without Parquet (the `parquet` feature); build it with the default features",
    )
}

fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        message: message.into(),
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub output: OutputConfig,
    pub batch: BatchConfig,
    pub geoip: GeoipConfig,
    /// Enrichment tables and the lookups that join them into events.
    pub enrich: enrich::EnrichConfig,
    pub pipeline: PipelineConfig,
    pub source: SourceConfig,
    pub server: ServerConfig,
    /// Transform modules, run in this order.
    pub transforms: Vec<TransformConfig>,
    /// Drops repeated eventIDs when the section is present.
    pub dedup: Option<DedupConfig>,
    /// What raw bytes the error output may carry.
    pub errors: ErrorsConfig,
    /// Sigma detections and alerts, when the section is present.
    pub detect: Option<crate::detect::config::DetectConfig>,
}

/// `[errors]`: the split stage writes bytes no transform saw (an oversized event's first KiB, a
/// malformed element, the raw rest of a file), so they are scrubbed here.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ErrorsConfig {
    /// Keys (case-insensitive) whose values are masked in raw bytes before they are written.
    pub redact_keys: Vec<String>,
    /// Keep raw bytes in split-stage error records even when a module has
    /// `on_failure = "drop_body"` (which otherwise leaves them out).
    pub keep_raw: bool,
}

impl Default for ErrorsConfig {
    fn default() -> Self {
        ErrorsConfig {
            redact_keys: crate::cloudtrail::scrub::DEFAULT_KEYS
                .iter()
                .map(|k| (*k).to_owned())
                .collect(),
            keep_raw: false,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DedupConfig {
    /// An eventID seen again within this many seconds is dropped.
    pub window_secs: u64,
    /// Most eventIDs remembered; beyond it the oldest part of the window is forgotten early.
    pub max_events: usize,
}

impl Default for DedupConfig {
    fn default() -> Self {
        DedupConfig {
            window_secs: 3600,
            max_events: 2_000_000,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ParquetConfig {
    /// Column names in lower case, nested ones too (Glue and Hive lower-case them anyway).
    pub lowercase_columns: bool,
    /// Rows per row group; a batch (at most `batch.max_bytes`) is usually one row group.
    pub row_group_rows: usize,
    /// Top-level fields added by transform modules, with their types.
    pub added_columns: std::collections::BTreeMap<String, crate::sink::columnar::AddedType>,
}

impl Default for ParquetConfig {
    fn default() -> Self {
        ParquetConfig {
            lowercase_columns: false,
            row_group_rows: 1 << 20,
            added_columns: Default::default(),
        }
    }
}

/// One `[[transforms]]` entry.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TransformConfig {
    /// Names the module in metrics, logs and error records.
    pub name: String,
    /// The component file (`.wasm`): a local path or `s3://bucket/key`.
    pub path: PathBuf,
    /// For an `s3://` path: the S3 client's region and endpoint (defaults: the SDK's chain).
    #[serde(default)]
    pub region: Option<String>,
    #[serde(default)]
    pub endpoint_url: Option<String>,
    #[serde(default)]
    pub force_path_style: bool,
    /// Handed to the module's `init`.
    #[serde(default)]
    pub config: std::collections::BTreeMap<String, String>,
    /// The `[[enrich.tables]]` the module may read through the `lookup` host import
    /// (`trailhose:transform@0.2.0`); any other name traps.
    #[serde(default)]
    pub tables: Vec<String>,
    /// Fuel per batch (about one unit per wasm instruction); 0 = not metered.
    #[serde(default = "default_fuel")]
    pub fuel: u64,
    /// Wall time per batch.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    #[serde(default = "default_max_memory_mb")]
    pub max_memory_mb: usize,
    /// Bytes the outcomes of one batch may carry.
    #[serde(default = "default_max_output_bytes")]
    pub max_output_bytes: usize,
    /// What happens to the events of a failed call.
    #[serde(default)]
    pub on_failure: crate::transform::OnFailure,
    /// With `on_failure = "retry"`: deliveries of the same batch that may fail before
    /// `retry_fallback` applies.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// With `on_failure = "retry"`: the policy once `max_attempts` are used up.
    #[serde(default = "default_retry_fallback")]
    pub retry_fallback: crate::transform::OnFailure,
}

fn default_max_attempts() -> u32 {
    5
}
fn default_retry_fallback() -> crate::transform::OnFailure {
    crate::transform::OnFailure::DropBody
}

fn default_fuel() -> u64 {
    2_000_000_000
}
fn default_timeout_ms() -> u64 {
    2_000
}
fn default_max_memory_mb() -> usize {
    128
}
fn default_max_output_bytes() -> usize {
    64 << 20
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SourceConfig {
    pub sqs: Option<SqsConfig>,
    pub kinesis: Option<KinesisConfig>,
    /// The only buckets (and key prefixes) workers may fetch from.
    pub buckets: Vec<BucketConfig>,
}

/// The longest batch age with an SQS source: an hour inside SQS's 12-hour visibility limit.
pub const MAX_AGE_WITH_SQS: u64 = 11 * 3600;

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SqsConfig {
    pub queue_url: String,
    pub region: Option<String>,
    pub endpoint_url: Option<String>,
    pub wait_time_secs: i32,
    pub max_messages: i32,
    pub visibility_timeout_secs: i32,
    pub max_files_in_flight: usize,
    /// Messages received and not yet acknowledged (waiting for their buffers to be written);
    /// receiving pauses at this many. SQS allows 120,000 in flight per queue.
    pub max_unacked_messages: usize,
}

impl Default for SqsConfig {
    fn default() -> Self {
        SqsConfig {
            queue_url: String::new(),
            region: None,
            endpoint_url: None,
            wait_time_secs: 20,
            max_messages: 10,
            visibility_timeout_secs: 300,
            max_files_in_flight: 8,
            max_unacked_messages: 5000,
        }
    }
}

/// Where a shard with no checkpoint yet starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum StartPosition {
    TrimHorizon,
    Latest,
    AtTimestamp,
}

/// `[source.kinesis]`: read a Kinesis Data Stream, shards shared by leases in DynamoDB.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct KinesisConfig {
    pub stream: String,
    pub region: Option<String>,
    /// Endpoint for both Kinesis and DynamoDB (tests, VPC endpoints).
    pub endpoint_url: Option<String>,
    /// DynamoDB lease table, created if missing; "" = `trailhose-<stream>`.
    pub lease_table: String,
    /// This worker's name in the lease table; "" = host name, process id and a random suffix.
    pub worker_id: String,
    pub start_position: StartPosition,
    /// RFC 3339 time, for `start_position = "AT_TIMESTAMP"`.
    pub start_timestamp: Option<String>,
    /// A lease whose counter has not moved for this long is taken over.
    pub lease_duration_millis: u64,
    /// How often leases are renewed, taken and balanced; 0 = a third of the lease duration.
    pub lease_renew_interval_millis: u64,
    /// Most leases taken from busier workers per balancing round.
    pub max_leases_to_steal: usize,
    /// How long an owner may drain a shard it is asked to hand over before it hands it over
    /// anyway; 0 = batch.max_age_secs plus the lease duration.
    pub handoff_timeout_millis: u64,
    /// How often the shard list is read to find new shards (resharding).
    pub shard_sync_interval_millis: u64,
    /// GetRecords `Limit`.
    pub max_records_per_call: i32,
    /// Wait between GetRecords calls on a shard that is caught up.
    pub poll_interval_millis: u64,
    pub max_files_in_flight: usize,
}

impl Default for KinesisConfig {
    fn default() -> Self {
        KinesisConfig {
            stream: String::new(),
            region: None,
            endpoint_url: None,
            lease_table: String::new(),
            worker_id: String::new(),
            start_position: StartPosition::TrimHorizon,
            start_timestamp: None,
            lease_duration_millis: 10_000,
            lease_renew_interval_millis: 0,
            max_leases_to_steal: 1,
            handoff_timeout_millis: 0,
            shard_sync_interval_millis: 60_000,
            max_records_per_call: 10_000,
            poll_interval_millis: 1_000,
            max_files_in_flight: 8,
        }
    }
}

impl KinesisConfig {
    pub fn lease_table(&self) -> String {
        match self.lease_table.as_str() {
            "" => format!("trailhose-{}", self.stream),
            t => t.to_owned(),
        }
    }

    pub fn renew_interval(&self) -> Duration {
        match self.lease_renew_interval_millis {
            0 => Duration::from_millis(self.lease_duration_millis / 3),
            n => Duration::from_millis(n),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct BucketConfig {
    pub name: String,
    /// Key prefixes allowed in this bucket; empty = any key.
    pub prefixes: Vec<String>,
    pub region: Option<String>,
    /// An IAM role to assume (STS) for reading this bucket.
    pub role_arn: Option<String>,
    pub endpoint_url: Option<String>,
    pub force_path_style: bool,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub listen: String,
    pub shutdown_grace_secs: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "0.0.0.0:9090".into(),
            shutdown_grace_secs: 25,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutputConfig {
    /// A local directory or `s3://bucket/prefix`.
    pub url: Option<String>,
    /// json (lines, the original bytes), parquet, csv or tsv.
    pub format: Format,
    /// cloudtrail (the events as they came) or ocsf (OCSF 1.1.0 records, `sink::ocsf`).
    pub schema: Schema,
    pub ocsf: OcsfConfig,
    /// Amazon Security Lake's custom-source layout (`sink::ocsf::lake`).
    pub security_lake: Option<SecurityLakeConfig>,
    /// Unset: gzip, or zstd for parquet.
    pub compression: Option<Compression>,
    /// gzip: 1–12 (libdeflate levels; 6 matches `gzip -6`), zstd: 1–22.
    pub level: Option<i32>,
    pub key_template: String,
    pub fallback_partition: String,
    pub error_prefix: String,
    pub s3: S3OutputConfig,
    /// csv/tsv: the columns, as dotted paths (`[*]` explodes an array into rows).
    pub columns: Vec<String>,
    /// csv/tsv: rows sorted within each object by this path.
    pub sort: Option<String>,
    pub parquet: ParquetConfig,
    /// Also put every event on a Kinesis stream.
    pub kinesis: Option<KinesisSinkConfig>,
}

/// `[output.kinesis]`: every enriched event also goes to a Kinesis stream.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct KinesisSinkConfig {
    pub stream: String,
    pub region: Option<String>,
    pub endpoint_url: Option<String>,
    /// The event field whose value is the partition key.
    pub partition_key: String,
    /// Attempts per PutRecords call, counting retries of failed entries.
    pub max_attempts: u32,
    /// Also write events as objects under output.url; false = events go to the stream only
    /// (error records are always written under output.url).
    pub write_objects: bool,
}

impl Default for KinesisSinkConfig {
    fn default() -> Self {
        KinesisSinkConfig {
            stream: String::new(),
            region: None,
            endpoint_url: None,
            partition_key: "eventID".into(),
            max_attempts: 10,
            write_objects: true,
        }
    }
}

impl Default for OutputConfig {
    fn default() -> Self {
        OutputConfig {
            url: None,
            format: Format::Json,
            schema: Schema::Cloudtrail,
            ocsf: OcsfConfig::default(),
            security_lake: None,
            compression: None,
            level: None,
            key_template: partition::DEFAULT_TEMPLATE.into(),
            fallback_partition: partition::DEFAULT_FALLBACK.into(),
            error_prefix: "errors/".into(),
            s3: S3OutputConfig::default(),
            columns: Vec::new(),
            sort: None,
            parquet: ParquetConfig::default(),
            kinesis: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct S3OutputConfig {
    pub region: Option<String>,
    pub endpoint_url: Option<String>,
    pub force_path_style: bool,
    pub sse_kms_key_id: Option<String>,
    pub storage_class: Option<String>,
    pub multipart_threshold_bytes: u64,
    pub part_size_bytes: u64,
    pub max_concurrent_puts: usize,
    /// How long one request to S3 (a PUT, a part, a Complete) may take before it is dropped
    /// and retried: a stalled connection must not hold an upload slot for ever.
    pub attempt_timeout_secs: u64,
    /// An IAM role assumed (STS) for the output's S3 client only (objects and error records):
    /// e.g. the provider role Security Lake creates for a custom source.
    pub role_arn: Option<String>,
    /// The external id the role's trust policy asks for (Security Lake's provider role does).
    pub external_id: Option<String>,
    /// The role session name (CloudTrail shows it); unset: `trailhose`.
    pub role_session_name: Option<String>,
}

impl Default for S3OutputConfig {
    fn default() -> Self {
        S3OutputConfig {
            region: None,
            endpoint_url: None,
            force_path_style: false,
            sse_kms_key_id: None,
            storage_class: None,
            multipart_threshold_bytes: 64 << 20,
            part_size_bytes: 16 << 20,
            max_concurrent_puts: 8,
            attempt_timeout_secs: 120,
            role_arn: None,
            external_id: None,
            role_session_name: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatchConfig {
    pub max_records: u64,
    pub max_bytes: u64,
    pub max_age_secs: u64,
    pub chunk_bytes: usize,
    /// What all open buffers of the process may hold together; when reached, the oldest are
    /// sealed early.
    pub max_buffered_bytes: u64,
    /// Most partition buffers one worker keeps open; opening one more seals its oldest.
    pub max_open_partitions: usize,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            max_records: 10_000,
            max_bytes: 64 << 20,
            max_age_secs: 300,
            chunk_bytes: 4 << 20,
            max_buffered_bytes: 256 << 20,
            max_open_partitions: 10_000,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct GeoipConfig {
    pub city_db: Option<PathBuf>,
    pub asn_db: Option<PathBuf>,
    pub cache_entries: usize,
    /// How often the database files are checked for replacement; 0 = only on SIGHUP.
    pub reload_secs: u64,
}

impl Default for GeoipConfig {
    fn default() -> Self {
        GeoipConfig {
            city_db: None,
            asn_db: None,
            cache_entries: 65_536,
            reload_secs: 60,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineConfig {
    /// Threads splitting and enriching files; 0 = one per core.
    pub workers: usize,
    /// Threads compressing output; 0 = one per core.
    pub compression_threads: usize,
    /// Largest single event accepted; 0 = 16 MiB.
    pub max_event_bytes: usize,
    /// Largest stored (compressed) file accepted; 0 = 256 MiB.
    pub max_file_bytes: u64,
    /// Most bytes one file may decompress to; 0 = 1 GiB.
    pub max_decompressed_bytes: u64,
    /// Events per transform call; 0 = 256.
    pub transform_batch_events: usize,
    /// Where compiled transform modules are cached; unset = `$XDG_CACHE_HOME/trailhose/wasm`
    /// (or `$HOME/.cache/trailhose/wasm`; no cache without either), empty = no cache.
    pub transform_cache_dir: Option<PathBuf>,
    /// How often module files are checked for changes; 0 = only on SIGHUP.
    pub transform_reload_secs: Option<u64>,
}

/// Where the output goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutputUrl {
    Local(PathBuf),
    S3 { bucket: String, prefix: String },
}

impl OutputUrl {
    pub fn parse(url: &str) -> Result<OutputUrl, String> {
        match url.strip_prefix("s3://") {
            Some(rest) => {
                let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
                if bucket.is_empty() {
                    return Err("an s3:// URL needs a bucket name".into());
                }
                let mut prefix = prefix.trim_matches('/').to_owned();
                if !prefix.is_empty() {
                    prefix.push('/');
                }
                Ok(OutputUrl::S3 {
                    bucket: bucket.to_owned(),
                    prefix,
                })
            }
            None if url.contains("://") => Err(format!(
                "unsupported URL scheme in {url:?} (use a directory or s3://)"
            )),
            None if url.is_empty() => Err("empty".into()),
            None => Ok(OutputUrl::Local(PathBuf::from(url))),
        }
    }
}

pub const MASKED: &str = "<masked>";

/// Masks secrets in a serialized config: every value under a `config` table of a transform
/// (`under_module_config`), and the password of URLs (`scheme://user:password@host`).
fn mask(v: &mut toml::Value, under_module_config: bool) {
    match v {
        toml::Value::String(s) if under_module_config => *s = MASKED.to_owned(),
        toml::Value::String(s) => {
            if let Some(masked) = mask_url_password(s) {
                *s = masked;
            }
        }
        toml::Value::Array(items) => items.iter_mut().for_each(|i| mask(i, under_module_config)),
        toml::Value::Table(t) => {
            // A webhook's URL carries its token (Slack's do): only scheme and host show.
            if t.get("kind").and_then(|k| k.as_str()) == Some("webhook")
                && let Some(toml::Value::String(url)) = t.get_mut("target")
            {
                let (scheme, rest) = url.split_once("://").unwrap_or(("", url.as_str()));
                let authority = rest.split('/').next().unwrap_or("");
                let host = authority.rsplit('@').next().unwrap_or("");
                *url = format!("{scheme}://{host}/{MASKED}");
            }
            for (k, item) in t.iter_mut() {
                // An external id is a shared secret of the role's trust policy.
                if k == "external_id"
                    && let toml::Value::String(id) = item
                {
                    *id = MASKED.to_owned();
                    continue;
                }
                mask(item, under_module_config || k == "config");
            }
        }
        _ => {}
    }
}

/// `scheme://user:secret@host/…` → `scheme://user:<masked>@host/…`; None when there is none.
fn mask_url_password(s: &str) -> Option<String> {
    let (scheme, rest) = s.split_once("://")?;
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let authority = rest.get(..authority_end)?;
    let (userinfo, host) = authority.rsplit_once('@')?;
    let (user, _password) = userinfo.split_once(':')?;
    let path = rest.get(authority_end..)?;
    Some(format!("{scheme}://{user}:{MASKED}@{host}{path}"))
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let cfg = Config::parse(&text).map_err(|message| ConfigError::Parse {
            path: path.display().to_string(),
            message,
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The effective configuration as TOML, defaults filled in (unset options are left out),
    /// with whatever may be secret masked: module config values (a redact module's salt),
    /// external ids and the password of any URL.
    pub fn effective_toml(&self) -> Result<String, String> {
        let mut v = toml::Value::try_from(self).map_err(|e| e.to_string())?;
        mask(&mut v, false);
        toml::to_string_pretty(&v).map_err(|e| e.to_string())
    }

    /// Parses TOML; unknown keys are errors (a typo must not silently fall back to a default).
    pub fn parse(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    /// Refuses what `built` cannot run; a parameter so one test build checks both answers.
    fn refuse_unbuilt(&self, built: Built) -> Result<(), ConfigError> {
        if !built.transforms && !self.transforms.is_empty() {
            return Err(invalid("transforms", crate::transform::NOT_BUILT));
        }
        if !built.parquet && self.output.format == Format::Parquet {
            return Err(no_parquet());
        }
        Ok(())
    }

    /// Checks what the types alone cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.refuse_unbuilt(Built::THIS)?;
        if let Some(url) = &self.output.url {
            OutputUrl::parse(url).map_err(|m| invalid("output.url", m))?;
        }
        self.codec()?;
        self.converter()?;
        self.partitioner()?;
        self.security_lake()?;
        if let Some(d) = &self.detect {
            d.validate()?;
        }
        if let Some(d) = &self.dedup {
            if d.window_secs == 0 {
                return Err(invalid("dedup.window_secs", "must be at least 1"));
            }
            if d.max_events < 1000 {
                return Err(invalid("dedup.max_events", "must be at least 1000"));
            }
        }
        for k in &self.errors.redact_keys {
            if k.is_empty() || k.len() > 64 || k.contains('"') || k.contains('\\') {
                return Err(invalid(
                    "errors.redact_keys",
                    format!("{k:?} must be 1 to 64 characters without quotes or backslashes"),
                ));
            }
        }
        for t in &self.transforms {
            if t.max_attempts == 0 {
                return Err(invalid("transforms.max_attempts", "must be at least 1"));
            }
            if t.retry_fallback == crate::transform::OnFailure::Retry {
                return Err(invalid(
                    "transforms.retry_fallback",
                    "must be \"drop_body\" or \"error_output\"",
                ));
            }
        }
        let ep = &self.output.error_prefix;
        if ep.is_empty() || ep.starts_with('/') || ep.split('/').any(|s| s == "..") {
            return Err(invalid(
                "output.error_prefix",
                "must be a relative prefix such as \"errors/\"",
            ));
        }
        if self
            .output
            .key_template
            .trim_start_matches('/')
            .starts_with(ep.trim_end_matches('/'))
        {
            return Err(invalid(
                "output.error_prefix",
                "must not overlap the event key_template",
            ));
        }
        if let Some(class) = &self.output.s3.storage_class {
            let known = aws_sdk_s3::types::StorageClass::values();
            if !known.contains(&class.as_str()) {
                return Err(invalid(
                    "output.s3.storage_class",
                    format!("unknown class {class:?} (one of {})", known.join(", ")),
                ));
            }
        }
        self.output_role()?;
        self.no_role_for_a_local_output()?;
        if self.output.s3.multipart_threshold_bytes < 5 << 20 {
            return Err(invalid(
                "output.s3.multipart_threshold_bytes",
                "must be at least 5 MiB (S3's smallest part)",
            ));
        }
        if self.output.s3.part_size_bytes < 5 << 20 {
            return Err(invalid(
                "output.s3.part_size_bytes",
                "must be at least 5 MiB (S3's smallest part)",
            ));
        }
        if !(5..=3600).contains(&self.output.s3.attempt_timeout_secs) {
            return Err(invalid(
                "output.s3.attempt_timeout_secs",
                "must be 5 to 3600 (seconds)",
            ));
        }
        if self.output.s3.max_concurrent_puts == 0 {
            return Err(invalid(
                "output.s3.max_concurrent_puts",
                "must be at least 1",
            ));
        }
        let b = &self.batch;
        if b.max_records == 0 {
            return Err(invalid("batch.max_records", "must be at least 1"));
        }
        if b.max_bytes < 1024 {
            return Err(invalid("batch.max_bytes", "must be at least 1024"));
        }
        if b.max_age_secs == 0 {
            return Err(invalid("batch.max_age_secs", "must be at least 1"));
        }
        if !(64 << 10..=64 << 20).contains(&b.chunk_bytes) {
            return Err(invalid(
                "batch.chunk_bytes",
                "must be between 64 KiB and 64 MiB",
            ));
        }
        if b.max_buffered_bytes < 1 << 20 {
            return Err(invalid(
                "batch.max_buffered_bytes",
                "must be at least 1 MiB",
            ));
        }
        if !(1..=1_000_000).contains(&b.max_open_partitions) {
            return Err(invalid(
                "batch.max_open_partitions",
                "must be between 1 and 1000000",
            ));
        }
        if let Some(sqs) = &self.source.sqs {
            if !sqs.queue_url.starts_with("http") {
                return Err(invalid(
                    "source.sqs.queue_url",
                    "must be the queue's https:// URL",
                ));
            }
            if !(0..=20).contains(&sqs.wait_time_secs) {
                return Err(invalid(
                    "source.sqs.wait_time_secs",
                    "must be 0..=20 (SQS long polling)",
                ));
            }
            if !(1..=10).contains(&sqs.max_messages) {
                return Err(invalid("source.sqs.max_messages", "must be 1..=10"));
            }
            if !(1..=43_200).contains(&sqs.visibility_timeout_secs) {
                return Err(invalid(
                    "source.sqs.visibility_timeout_secs",
                    "must be 1..=43200",
                ));
            }
            if sqs.max_files_in_flight == 0 {
                return Err(invalid(
                    "source.sqs.max_files_in_flight",
                    "must be at least 1",
                ));
            }
            if !(1..=120_000).contains(&sqs.max_unacked_messages) {
                return Err(invalid(
                    "source.sqs.max_unacked_messages",
                    "must be 1..=120000 (SQS's in-flight limit)",
                ));
            }
            // A message waits for its buffers to age out, invisible by heartbeat; SQS keeps it
            // invisible for at most 12 hours from receipt, so buffers must seal well before.
            if self.batch.max_age_secs > MAX_AGE_WITH_SQS {
                return Err(invalid(
                    "batch.max_age_secs",
                    "must be at most 39600 (11 hours) with [source.sqs]: SQS keeps a message invisible for at most 12 hours",
                ));
            }
        }
        if let Some(k) = &self.output.kinesis {
            if k.stream.is_empty() {
                return Err(invalid("output.kinesis.stream", "is required"));
            }
            if k.partition_key.is_empty() {
                return Err(invalid("output.kinesis.partition_key", "must name a field"));
            }
            if k.max_attempts == 0 {
                return Err(invalid("output.kinesis.max_attempts", "must be at least 1"));
            }
            // The stream gets the batch's object body: JSON lines, one record per event.
            if self.output.format != Format::Json {
                return Err(invalid(
                    "output.kinesis",
                    "needs output.format = \"json\" (events go to the stream as JSON lines)",
                ));
            }
        }
        if let Some(k) = &self.source.kinesis {
            validate_kinesis(k)?;
            if self.source.sqs.is_some() {
                return Err(invalid(
                    "source.kinesis",
                    "configure [source.sqs] or [source.kinesis], not both",
                ));
            }
        }
        for b in &self.source.buckets {
            if b.name.is_empty() || b.name.contains('/') {
                return Err(invalid(
                    "source.buckets.name",
                    format!("{:?} is not a bucket name", b.name),
                ));
            }
        }
        if self.server.listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(invalid(
                "server.listen",
                format!("{:?} is not an address:port", self.server.listen),
            ));
        }
        let mut names = std::collections::HashSet::new();
        for t in &self.transforms {
            let named = |m: &str| format!("{:?}: {m}", t.name);
            if t.name.is_empty()
                || t.name.len() > 64
                || !t
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            {
                return Err(invalid(
                    "transforms.name",
                    named("must be 1-64 characters of [A-Za-z0-9_-]"),
                ));
            }
            if !names.insert(t.name.as_str()) {
                return Err(invalid("transforms.name", named("is used twice")));
            }
            if t.path.as_os_str().is_empty() {
                return Err(invalid("transforms.path", named("is empty")));
            }
            if let Some(p) = t.path.to_str()
                && p.starts_with("s3://")
                && crate::watch::s3_location(p).is_none()
            {
                return Err(invalid(
                    "transforms.path",
                    named("an S3 path must be s3://bucket/key"),
                ));
            }
            if let Some(unknown) = t
                .tables
                .iter()
                .find(|n| !self.enrich.tables.iter().any(|e| e.name == **n))
            {
                return Err(invalid(
                    "transforms.tables",
                    named(&format!("no [[enrich.tables]] is named {unknown:?}")),
                ));
            }
            if !(1..=600_000).contains(&t.timeout_ms) {
                return Err(invalid(
                    "transforms.timeout_ms",
                    named("must be 1..=600000"),
                ));
            }
            if !(1..=4096).contains(&t.max_memory_mb) {
                return Err(invalid(
                    "transforms.max_memory_mb",
                    named("must be 1..=4096"),
                ));
            }
            if t.max_output_bytes < 1024 {
                return Err(invalid(
                    "transforms.max_output_bytes",
                    named("must be at least 1024"),
                ));
            }
        }
        if self.pipeline.transform_batch_events > 100_000 {
            return Err(invalid(
                "pipeline.transform_batch_events",
                "must be at most 100000",
            ));
        }
        if self.geoip.cache_entries == 0 {
            return Err(invalid("geoip.cache_entries", "must be at least 1"));
        }
        self.enrich.validate()?;
        Ok(())
    }

    /// The SQS settings `run` needs, checked.
    pub fn sqs(&self) -> Result<&SqsConfig, ConfigError> {
        let sqs = self
            .source
            .sqs
            .as_ref()
            .ok_or_else(|| invalid("source.sqs", "`run` needs a [source.sqs] section"))?;
        if self.source.buckets.is_empty() {
            return Err(invalid(
                "source.buckets",
                "list at least one [[source.buckets]]: workers only fetch from allowed buckets",
            ));
        }
        Ok(sqs)
    }

    pub fn output_url(&self) -> Result<OutputUrl, ConfigError> {
        let url = self.output.url.as_deref().ok_or_else(|| {
            invalid(
                "output.url",
                "no output given (set output.url or pass --out)",
            )
        })?;
        OutputUrl::parse(url).map_err(|m| invalid("output.url", m))
    }

    pub fn codec(&self) -> Result<Codec, ConfigError> {
        let parquet = self.output.format == Format::Parquet;
        let kind = match self.output.compression {
            Some(k) => k,
            None if parquet => Compression::Zstd,
            None => Compression::Gzip,
        };
        match (parquet, kind) {
            (true, Compression::Gzip) => {
                return Err(invalid(
                    "output.compression",
                    "parquet takes zstd, snappy or none",
                ));
            }
            (false, Compression::Snappy) => {
                return Err(invalid(
                    "output.compression",
                    "snappy is for format = \"parquet\" only",
                ));
            }
            _ => {}
        }
        let (default, range) = match kind {
            Compression::Gzip => (6, 1..=12),
            Compression::Zstd => (3, 1..=22),
            Compression::None | Compression::Snappy => (0, 0..=0),
        };
        let level = match (kind, self.output.level) {
            (Compression::None | Compression::Snappy, _) => 0,
            (_, None) => default,
            (_, Some(l)) if range.contains(&l) => l,
            (_, Some(l)) => {
                return Err(invalid(
                    "output.level",
                    format!(
                        "{l} is out of range {}..={} for {kind:?}",
                        range.start(),
                        range.end()
                    ),
                ));
            }
        };
        Ok(Codec { kind, level })
    }

    /// How event batches become objects when the format is not JSON lines.
    pub fn converter(&self) -> Result<Option<Converter>, ConfigError> {
        let o = &self.output;
        if o.format != Format::Csv
            && o.format != Format::Tsv
            && (!o.columns.is_empty() || o.sort.is_some())
        {
            return Err(invalid(
                "output.columns",
                "columns and sort apply to format = \"csv\" or \"tsv\" only",
            ));
        }
        if o.format == Format::Parquet && !cfg!(feature = "parquet") {
            return Err(no_parquet());
        }
        if o.schema == Schema::Ocsf {
            return match o.format {
                Format::Json => Ok(None),
                #[cfg(feature = "parquet")]
                Format::Parquet
                    if o.parquet.added_columns.is_empty() && !o.parquet.lowercase_columns =>
                {
                    let codec = self.codec()?;
                    let compression = columnar::parquet_compression(codec.kind, codec.level)
                        .ok_or_else(|| invalid("output.compression", "not a parquet codec"))?;
                    Ok(Some(Converter::OcsfParquet {
                        spec: ParquetSpec {
                            lowercase: false,
                            added: Vec::new(),
                            compression,
                            row_group_rows: o.parquet.row_group_rows.max(1),
                        },
                        layouts: Layouts::new(),
                    }))
                }
                #[cfg(not(feature = "parquet"))]
                Format::Parquet => Err(no_parquet()),
                #[cfg(feature = "parquet")]
                Format::Parquet => Err(invalid(
                    "output.parquet",
                    "added_columns and lowercase_columns apply to schema = \"cloudtrail\" (OCSF names are lower case; transform fields go to unmapped)",
                )),
                Format::Csv | Format::Tsv => Err(invalid(
                    "output.schema",
                    "ocsf is written as json or parquet",
                )),
            };
        }
        Ok(match o.format {
            Format::Json => None,
            #[cfg(not(feature = "parquet"))]
            Format::Parquet => return Err(no_parquet()),
            #[cfg(feature = "parquet")]
            Format::Parquet => {
                let codec = self.codec()?;
                let compression = columnar::parquet_compression(codec.kind, codec.level)
                    .ok_or_else(|| invalid("output.compression", "not a parquet codec"))?;
                let p = &o.parquet;
                let fixed: Vec<String> = columnar::COLUMNS
                    .iter()
                    .map(|(n, _)| n.to_ascii_lowercase())
                    .chain([columnar::EXTRA.to_owned()])
                    .collect();
                for n in p.added_columns.keys() {
                    if n.is_empty() || fixed.contains(&n.to_ascii_lowercase()) {
                        return Err(invalid(
                            "output.parquet.added_columns",
                            format!("{n:?} is empty or a fixed column"),
                        ));
                    }
                }
                Some(Converter::parquet(ParquetSpec {
                    lowercase: p.lowercase_columns,
                    added: columnar::added_columns(&p.added_columns),
                    compression,
                    row_group_rows: p.row_group_rows.max(1),
                }))
            }
            Format::Csv | Format::Tsv => {
                if o.columns.is_empty() {
                    return Err(invalid(
                        "output.columns",
                        "csv and tsv need a list of columns (dotted paths)",
                    ));
                }
                let dialect = match o.format {
                    Format::Csv => Dialect::Csv,
                    _ => Dialect::Tsv,
                };
                let spec = FlatSpec::new(dialect, &o.columns, o.sort.as_deref())
                    .map_err(|e| invalid("output.columns", e.to_string()))?;
                Some(Converter::Flat(spec))
            }
        })
    }

    /// The checked role of the output's S3 client (`output.s3.role_arn`), when set.
    pub fn output_role(&self) -> Result<Option<crate::aws::AssumedRole>, ConfigError> {
        let s3 = &self.output.s3;
        let Some(arn) = &s3.role_arn else {
            if s3.external_id.is_some() {
                return Err(invalid("output.s3.external_id", "takes output.s3.role_arn"));
            }
            if s3.role_session_name.is_some() {
                return Err(invalid(
                    "output.s3.role_session_name",
                    "takes output.s3.role_arn",
                ));
            }
            return Ok(None);
        };
        crate::aws::check_role_arn(arn).map_err(|m| invalid("output.s3.role_arn", m))?;
        if let Some(id) = &s3.external_id {
            // The id is a shared secret of sorts: never echoed in the error.
            crate::aws::check_external_id(id).map_err(|m| invalid("output.s3.external_id", m))?;
        }
        let session_name = s3.role_session_name.as_deref().unwrap_or("trailhose");
        crate::aws::check_session_name(session_name)
            .map_err(|m| invalid("output.s3.role_session_name", m))?;
        Ok(Some(crate::aws::AssumedRole {
            arn: arn.clone(),
            external_id: s3.external_id.clone(),
            session_name: session_name.to_owned(),
        }))
    }

    /// An output role only applies to an `s3://` output: with a local directory it would be
    /// ignored, and a user who set it expects the objects written as that role.
    fn no_role_for_a_local_output(&self) -> Result<(), ConfigError> {
        let local = matches!(
            self.output.url.as_deref().map(OutputUrl::parse),
            Some(Ok(OutputUrl::Local(_)))
        );
        let s3 = &self.output.s3;
        let set = [
            ("output.s3.role_arn", s3.role_arn.is_some()),
            ("output.s3.external_id", s3.external_id.is_some()),
            (
                "output.s3.role_session_name",
                s3.role_session_name.is_some(),
            ),
        ];
        match set.into_iter().find(|(_, on)| *on) {
            Some((key, _)) if local => Err(invalid(
                key,
                "applies to an s3:// output.url only; the output is a local directory",
            )),
            _ => Ok(()),
        }
    }

    /// The checked `[output.security_lake]`, when set: OCSF Parquet only, the layout its own
    /// (no key template or fallback of the user's), the batch age within the service's rule.
    pub fn security_lake(&self) -> Result<Option<Lake>, ConfigError> {
        let Some(sl) = &self.output.security_lake else {
            return Ok(None);
        };
        let o = &self.output;
        if o.schema != Schema::Ocsf {
            return Err(invalid(
                "output.schema",
                "output.security_lake takes schema = \"ocsf\"",
            ));
        }
        if o.format != Format::Parquet {
            return Err(invalid(
                "output.format",
                "output.security_lake takes format = \"parquet\"",
            ));
        }
        if o.key_template != partition::DEFAULT_TEMPLATE {
            return Err(invalid(
                "output.key_template",
                "output.security_lake sets the layout (ext/<source_name>/region=/accountId=/eventDay=/): remove key_template",
            ));
        }
        if !o.fallback_partition.is_empty() {
            return Err(invalid(
                "output.fallback_partition",
                "output.security_lake partitions events without a usable time by their arrival time: remove fallback_partition",
            ));
        }
        let lake = sl.check().map_err(|e| invalid(e.key, e.message))?;
        crate::sink::ocsf::lake::check_age(self.batch.max_age_secs)
            .map_err(|e| invalid(e.key, e.message))?;
        Ok(Some(lake))
    }

    pub fn partitioner(&self) -> Result<Partitioner, ConfigError> {
        if let Some(lake) = self.security_lake()? {
            let t = KeyTemplate::parse(&lake.partition_template())
                .map_err(|e| invalid("output.security_lake", e.to_string()))?;
            let prefixes = lake.sources().map(|(c, _)| (c, lake.prefix(c))).collect();
            return Ok(Partitioner::new(t, "").with_class_prefixes(prefixes));
        }
        let t = KeyTemplate::parse(&self.output.key_template)
            .map_err(|e| invalid("output.key_template", e.to_string()))?;
        if !self.output.fallback_partition.is_empty() {
            KeyTemplate::parse(&self.output.fallback_partition)
                .map_err(|e| invalid("output.fallback_partition", e.to_string()))?;
        }
        Ok(Partitioner::new(t, &self.output.fallback_partition))
    }

    pub fn limits(&self) -> Limits {
        Limits {
            max_records: self.batch.max_records,
            max_bytes: self.batch.max_bytes,
            max_age: Duration::from_secs(self.batch.max_age_secs),
            chunk_bytes: self.batch.chunk_bytes,
            max_open: self.batch.max_open_partitions,
        }
    }

    pub fn workers(&self) -> usize {
        cores_or(self.pipeline.workers)
    }

    pub fn compression_threads(&self) -> usize {
        cores_or(self.pipeline.compression_threads)
    }

    pub fn transform_batch_events(&self) -> usize {
        match self.pipeline.transform_batch_events {
            0 => 256,
            n => n,
        }
    }

    /// The transform modules as the host takes them.
    pub fn transform_specs(&self) -> Vec<crate::transform::ModuleSpec> {
        self.transforms
            .iter()
            .map(|t| crate::transform::ModuleSpec {
                name: t.name.clone(),
                path: t.path.clone(),
                region: t.region.clone(),
                endpoint_url: t.endpoint_url.clone(),
                force_path_style: t.force_path_style,
                config: t.config.clone().into_iter().collect(),
                tables: t.tables.clone(),
                limits: crate::transform::Limits {
                    fuel: t.fuel,
                    timeout: Duration::from_millis(t.timeout_ms),
                    max_memory_bytes: t.max_memory_mb << 20,
                    max_output_bytes: t.max_output_bytes,
                },
                on_failure: t.on_failure,
                max_attempts: t.max_attempts,
                retry_fallback: t.retry_fallback,
            })
            .collect()
    }

    pub fn transform_cache_dir(&self) -> Option<PathBuf> {
        match &self.pipeline.transform_cache_dir {
            // A directory of our own, never the shared $TMPDIR: the cache holds native code.
            None => std::env::var_os("XDG_CACHE_HOME")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
                .or_else(|| {
                    std::env::var_os("HOME")
                        .filter(|v| !v.is_empty())
                        .map(|h| PathBuf::from(h).join(".cache"))
                })
                .map(|base| base.join("trailhose/wasm")),
            Some(p) if p.as_os_str().is_empty() => None,
            Some(p) => Some(p.clone()),
        }
    }

    pub fn transform_reload(&self) -> Option<Duration> {
        match self.pipeline.transform_reload_secs.unwrap_or(2) {
            0 => None,
            n => Some(Duration::from_secs(n)),
        }
    }

    pub fn max_event_bytes(&self) -> usize {
        match self.pipeline.max_event_bytes {
            0 => 16 << 20,
            n => n,
        }
    }

    /// `pipeline.max_file_bytes`: CloudTrail's own files are tens of MB at most.
    pub fn max_file_bytes(&self) -> u64 {
        match self.pipeline.max_file_bytes {
            0 => 256 << 20,
            n => n,
        }
    }

    /// `pipeline.max_decompressed_bytes`: well above any real delivery file, far below what a
    /// gzip bomb inflates to.
    pub fn max_decompressed_bytes(&self) -> u64 {
        match self.pipeline.max_decompressed_bytes {
            0 => 1 << 30,
            n => n,
        }
    }

    /// The per-file work limits the splitter applies.
    pub fn split_limits(&self) -> crate::cloudtrail::Limits {
        crate::cloudtrail::Limits {
            max_event_bytes: self.max_event_bytes(),
            max_decompressed_bytes: self.max_decompressed_bytes(),
            // The rules read members the split has seen: it keeps where they are.
            members: self.detect.is_some(),
        }
    }
}

fn validate_kinesis(k: &KinesisConfig) -> Result<(), ConfigError> {
    if k.stream.is_empty() {
        return Err(invalid("source.kinesis.stream", "is required"));
    }
    match (k.start_position, &k.start_timestamp) {
        (StartPosition::AtTimestamp, None) => {
            return Err(invalid(
                "source.kinesis.start_timestamp",
                "required with start_position = \"AT_TIMESTAMP\"",
            ));
        }
        (_, Some(t)) if crate::clock::Utc::parse_rfc3339(t).is_none() => {
            return Err(invalid(
                "source.kinesis.start_timestamp",
                format!("{t:?} is not an RFC 3339 time"),
            ));
        }
        _ => {}
    }
    if k.lease_duration_millis < 300 {
        return Err(invalid(
            "source.kinesis.lease_duration_millis",
            "must be at least 300",
        ));
    }
    if k.renew_interval() >= Duration::from_millis(k.lease_duration_millis) {
        return Err(invalid(
            "source.kinesis.lease_renew_interval_millis",
            "must be shorter than the lease duration",
        ));
    }
    if !(1..=10_000).contains(&k.max_records_per_call) {
        return Err(invalid(
            "source.kinesis.max_records_per_call",
            "must be 1..=10000",
        ));
    }
    if k.max_files_in_flight == 0 {
        return Err(invalid(
            "source.kinesis.max_files_in_flight",
            "must be at least 1",
        ));
    }
    if k.shard_sync_interval_millis == 0 {
        return Err(invalid(
            "source.kinesis.shard_sync_interval_millis",
            "must be at least 1",
        ));
    }
    Ok(())
}

fn cores_or(n: usize) -> usize {
    match n {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn the_effective_config_has_defaults_and_masks_secrets() {
        let cfg = Config::parse(
            "[output]\nurl = \"s3://out/p/\"\n[output.s3]\nendpoint_url = \"http://key:hunter2@127.0.0.1:9000/\"\n\
             role_arn = \"arn:aws:iam::111122223333:role/w\"\nexternal_id = \"tr1st-me\"\n\
             [[transforms]]\nname = \"redact\"\npath = \"r.wasm\"\nconfig = { salt = \"s3cr3t\" }\n",
        )
        .unwrap();
        let text = cfg.effective_toml().unwrap();
        assert!(
            !text.contains("hunter2") && !text.contains("s3cr3t") && !text.contains("tr1st-me"),
            "{text}"
        );
        assert!(
            text.contains("http://key:<masked>@127.0.0.1:9000/"),
            "{text}"
        );
        assert!(text.contains("salt = \"<masked>\""), "{text}");
        // Defaults filled in, and the text is a config that loads to the same settings.
        assert!(text.contains("max_age_secs = 300"), "{text}");
        let again = Config::parse(&text).unwrap();
        assert_eq!(again.batch.max_age_secs, cfg.batch.max_age_secs);
        assert_eq!(mask_url_password("s3://bucket/a@b:c"), None);
        assert_eq!(mask_url_password("http://user@host/"), None);
    }
    use super::*;

    fn err(text: &str) -> String {
        match Config::parse(text) {
            Err(e) => e,
            Ok(c) => c.validate().unwrap_err().to_string(),
        }
    }

    #[test]
    fn a_build_without_parquet_or_transforms_refuses_them_naming_the_key() {
        let parquet = Config::parse("[output]\nurl = \"out\"\nformat = \"parquet\"\n").unwrap();
        let module = Config::parse(
            "[output]\nurl = \"out\"\n[[transforms]]\nname = \"m\"\npath = \"/m.wasm\"\n",
        )
        .unwrap();
        let all = Built {
            parquet: true,
            transforms: true,
        };
        let refused = |c: &Config, built: Built| c.refuse_unbuilt(built).map_err(|e| e.to_string());
        assert!(refused(&parquet, all).is_ok() && refused(&module, all).is_ok());
        let e = refused(
            &parquet,
            Built {
                parquet: false,
                ..all
            },
        )
        .unwrap_err();
        assert!(
            e.contains("output.format") && e.contains("`parquet` feature"),
            "{e}"
        );
        let e = refused(
            &module,
            Built {
                transforms: false,
                ..all
            },
        )
        .unwrap_err();
        assert!(
            e.contains("transforms") && e.contains("`transforms` feature"),
            "{e}"
        );
        // This build answers as its features say, through `validate`.
        assert_eq!(parquet.validate().is_ok(), cfg!(feature = "parquet"));
        assert_eq!(module.validate().is_ok(), cfg!(feature = "transforms"));
    }

    #[test]
    fn security_lake_takes_ocsf_parquet_and_its_own_layout() {
        let lake = "[output.security_lake]\nsource_name = \"t-{class}\"\n";
        let ok = format!("[output]\nschema = \"ocsf\"\nformat = \"parquet\"\n{lake}");
        let cfg = Config::parse(&ok).unwrap();
        cfg.validate().unwrap();
        assert!(cfg.security_lake().unwrap().is_some());
        // The effective config round-trips.
        let again = Config::parse(&cfg.effective_toml().unwrap()).unwrap();
        assert_eq!(again.output.security_lake, cfg.output.security_lake);
        assert!(err(&format!("[output]\nformat = \"parquet\"\n{lake}")).contains("output.schema"));
        assert!(err(&format!("[output]\nschema = \"ocsf\"\n{lake}")).contains("output.format"));
        assert!(
            err(&format!(
                "[output]\nschema = \"ocsf\"\nformat = \"parquet\"\nkey_template = \"x/\"\n{lake}"
            ))
            .contains("output.key_template")
        );
        assert!(err(&format!("{ok}[batch]\nmax_age_secs = 30\n")).contains("batch.max_age_secs"));
        assert!(
            err("[output]\nschema = \"ocsf\"\nformat = \"parquet\"\n[output.security_lake]\nsource_name = \"one\"\n")
                .contains("output.security_lake.source_name")
        );
    }

    #[test]
    fn empty_config_is_valid_with_documented_defaults() {
        let c = Config::parse("").unwrap();
        c.validate().unwrap();
        assert_eq!(c.batch.max_records, 10_000);
        assert_eq!(c.batch.max_bytes, 64 << 20);
        assert_eq!(c.batch.max_buffered_bytes, 256 << 20);
        assert_eq!(c.batch.max_open_partitions, 10_000);
        assert_eq!(c.limits().max_open, 10_000);
        assert_eq!(c.batch.max_age_secs, 300);
        assert_eq!(
            c.codec().unwrap(),
            Codec {
                kind: Compression::Gzip,
                level: 6
            }
        );
        assert_eq!(c.output.error_prefix, "errors/");
    }

    #[test]
    fn on_failure_takes_the_three_documented_values_and_names_a_bad_one() {
        let with = |v: &str| {
            format!("[[transforms]]\nname = \"m\"\npath = \"/m.wasm\"\non_failure = \"{v}\"\n")
        };
        for (v, want) in [
            ("error_output", crate::transform::OnFailure::ErrorOutput),
            ("drop_body", crate::transform::OnFailure::DropBody),
            ("retry", crate::transform::OnFailure::Retry),
        ] {
            let c = Config::parse(&with(v)).unwrap();
            assert_eq!(c.transforms[0].on_failure, want, "{v}");
        }
        let e = err(&with("retyr"));
        assert!(e.contains("on_failure") && e.contains("retyr"), "{e}");
    }

    #[test]
    fn an_output_role_with_a_local_output_is_refused_naming_the_key() {
        for (keys, key) in [
            (
                "role_arn = \"arn:aws:iam::444455556666:role/w\"",
                "output.s3.role_arn",
            ),
            (
                "role_arn = \"arn:aws:iam::444455556666:role/w\"\nexternal_id = \"ext-id-1\"",
                "output.s3.role_arn",
            ),
            (
                "role_arn = \"arn:aws:iam::444455556666:role/w\"\nrole_session_name = \"lake\"",
                "output.s3.role_arn",
            ),
        ] {
            let e = err(&format!(
                "[output]\nurl = \"/var/out\"\n[output.s3]\n{keys}\n"
            ));
            assert!(
                e.contains(key) && e.contains("local directory"),
                "{keys}: {e}"
            );
            assert!(!e.contains("ext-id-1"), "{e}");
            // The same keys with an s3:// output, or no output yet (`--out` gives it), pass.
            let s3 = format!("[output]\nurl = \"s3://b/p/\"\n[output.s3]\n{keys}\n");
            Config::parse(&s3).unwrap().validate().unwrap();
            let unset = format!("[output.s3]\n{keys}\n");
            Config::parse(&unset).unwrap().validate().unwrap();
        }
    }

    #[test]
    fn errors_name_the_bad_key() {
        assert!(err("[batch]\nmax_recordz = 5\n").contains("max_recordz"));
        assert!(err("[nope]\n").contains("nope"));
        assert!(err("[batch]\nmax_records = \"many\"\n").contains("max_records"));
        assert!(err("[batch]\nmax_records = 0\n").contains("batch.max_records"));
        assert!(err("[batch]\nmax_buffered_bytes = 1000\n").contains("batch.max_buffered_bytes"));
        for n in [0, 1_000_001] {
            let e = err(&format!("[batch]\nmax_open_partitions = {n}\n"));
            assert!(e.contains("batch.max_open_partitions"), "{e}");
        }
        assert!(err("[output]\nkey_template = \"y={yr}/\"\n").contains("output.key_template"));
        assert!(err("[output]\ncompression = \"lz4\"\n").contains("compression"));
        assert!(err("[output]\nlevel = 40\n").contains("output.level"));
        assert!(err("[output]\nurl = \"ftp://x\"\n").contains("output.url"));
        assert!(err("[output.s3]\nstorage_class = \"COLD\"\n").contains("output.s3.storage_class"));
        assert!(err("[output]\nerror_prefix = \"year=\"\n").contains("output.error_prefix"));
        assert!(err("[source.sqs]\nqueue_url = \"q\"\n").contains("source.sqs.queue_url"));
        assert!(
            err("[source.sqs]\nqueue_url = \"http://x/q\"\nmax_unacked_messages = 0\n")
                .contains("source.sqs.max_unacked_messages")
        );
        assert!(
            err("[batch]\nmax_age_secs = 50000\n[source.sqs]\nqueue_url = \"http://x/q\"\n")
                .contains("batch.max_age_secs")
        );
        assert!(
            err("[source.sqs]\nqueue_url = \"http://x/q\"\nmax_messages = 11\n")
                .contains("source.sqs.max_messages")
        );
        assert!(err("[[source.buckets]]\nname = \"a/b\"\n").contains("source.buckets.name"));
        assert!(err("[[source.buckets]]\nname = \"a\"\nbogus = 1\n").contains("bogus"));
        assert!(err("[server]\nlisten = \"nowhere\"\n").contains("server.listen"));
        assert!(err("[source.kinesis]\nlease_table = \"t\"\n").contains("source.kinesis.stream"));
        assert!(
            err("[source.kinesis]\nstream = \"s\"\nstart_position = \"AT_TIMESTAMP\"\n")
                .contains("source.kinesis.start_timestamp")
        );
        assert!(err("[source.kinesis]\nstream = \"s\"\nposition = 1\n").contains("position"));
        assert!(err("[output.kinesis]\npartition_key = \"x\"\n").contains("output.kinesis.stream"));
        assert!(
            err("[output.kinesis]\nstream = \"s\"\nmax_attempts = 0\n")
                .contains("output.kinesis.max_attempts")
        );
        assert!(
            err("[output]\nformat = \"parquet\"\n[output.kinesis]\nstream = \"s\"\n")
                .contains("output.kinesis: needs output.format")
        );
        let no_buckets = Config::parse("[source.sqs]\nqueue_url = \"http://x/q\"\n").unwrap();
        assert!(
            no_buckets
                .sqs()
                .unwrap_err()
                .to_string()
                .contains("source.buckets")
        );
    }

    #[test]
    fn analyst_output_errors_name_the_bad_key() {
        let pq = "[output]\nformat = \"parquet\"\n";
        assert!(err(&format!("{pq}compression = \"gzip\"\n")).contains("output.compression"));
        assert!(err("[output]\ncompression = \"snappy\"\n").contains("output.compression"));
        assert!(err("[output]\nformat = \"csv\"\n").contains("output.columns"));
        assert!(err("[output]\ncolumns = [\"a\"]\n").contains("output.columns"));
        assert!(
            err("[output]\nformat = \"tsv\"\ncolumns = [\"a[*].b\", \"c[*].d\"]\n")
                .contains("output.columns")
        );
        assert!(
            err(&format!(
                "{pq}[output.parquet.added_columns]\neventName = \"string\"\n"
            ))
            .contains("output.parquet.added_columns")
        );
        assert!(err("[dedup]\nwindow_secs = 0\n").contains("dedup.window_secs"));
        assert!(err("[dedup]\nwindo = 1\n").contains("windo"));
        let c = Config::parse(pq).unwrap();
        c.validate().unwrap();
        assert_eq!(
            c.codec().unwrap().kind,
            Compression::Zstd,
            "parquet defaults to zstd"
        );
    }

    #[test]
    fn the_helm_charts_kinesis_section_is_valid() {
        // helm/trailhose renders these keys from `kinesis:` in its values.
        let c = Config::parse(
            "[source.kinesis]\nstream = \"org-cloudtrail-events\"\nlease_table = \"trailhose-org-cloudtrail\"\nstart_position = \"LATEST\"\n",
        )
        .unwrap();
        c.validate().unwrap();
        let k = c.source.kinesis.unwrap();
        assert_eq!(k.start_position, StartPosition::Latest);
        assert_eq!(k.lease_table(), "trailhose-org-cloudtrail");
        assert_eq!(k.lease_duration_millis, 10_000);
        assert_eq!(k.renew_interval(), Duration::from_millis(3_333));
    }

    #[test]
    fn output_urls() {
        assert_eq!(
            OutputUrl::parse("s3://b/p/q/").unwrap(),
            OutputUrl::S3 {
                bucket: "b".into(),
                prefix: "p/q/".into()
            }
        );
        assert_eq!(
            OutputUrl::parse("s3://b").unwrap(),
            OutputUrl::S3 {
                bucket: "b".into(),
                prefix: "".into()
            }
        );
        assert_eq!(
            OutputUrl::parse("out").unwrap(),
            OutputUrl::Local("out".into())
        );
        assert!(OutputUrl::parse("s3:///x").is_err());
    }
}
