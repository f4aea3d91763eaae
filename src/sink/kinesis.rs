//! Kinesis as a second output: every enriched event of a written batch is also put on a stream
//! with PutRecords, within Kinesis's limits (500 records and 5 MiB per call, 1 MiB per record,
//! partition key and data both counted). A partial failure retries only the failed entries;
//! an event too large for a record goes to the error output instead.

use std::borrow::Cow;
use std::io::Read;
use std::time::Duration;

use aws_sdk_kinesis::error::ProvideErrorMetadata;
use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::PutRecordsRequestEntry;
use serde_json::value::RawValue;

use crate::clock::Utc;
use crate::cloudtrail::Key;
use crate::config::{Config, KinesisSinkConfig};
use crate::metrics::{self, *};
use crate::retry::Backoff;
use crate::sink::batch::LineChunk;
use crate::sink::encode::{Codec, Compression, compress};
use crate::sink::write::{Store, WriteError, object_name_with};
use bytes::Bytes;

pub const MAX_RECORDS: usize = 500;
pub const MAX_REQUEST_BYTES: usize = 5 << 20;
pub const MAX_RECORD_BYTES: usize = 1 << 20;
pub const MAX_KEY_CHARS: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("cannot read the batch back: {0}")]
    Decode(String),
    #[error("PutRecords to {stream} failed: {message}")]
    Put { stream: String, message: String },
    #[error("{failed} record(s) still failing after {attempts} attempts (last: {last})")]
    Exhausted {
        failed: usize,
        attempts: u32,
        last: String,
    },
}

/// One event on its way to the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry<'a> {
    pub key: Cow<'a, str>,
    pub data: &'a [u8],
}

impl Entry<'_> {
    /// What Kinesis counts against its size limits.
    pub fn size(&self) -> usize {
        self.key.len() + self.data.len()
    }
}

/// The partition key of an event: the value of `field` (a string, or a number's text),
/// clipped to Kinesis's 256 characters; None when the event has no usable value. Reads the
/// event's top level for that one field (the batcher calls it only when the event's `Head`
/// does not hold the field).
pub fn partition_key(event: &[u8], field: &str) -> Option<String> {
    let mut de = serde_json::Deserializer::from_slice(event);
    let raw = serde::Deserializer::deserialize_map(&mut de, FieldOf(field)).ok()??;
    let raw = raw.get();
    let value = match serde_json::from_str::<Cow<'_, str>>(raw) {
        Ok(s) => s,
        Err(_) if raw.starts_with(|c: char| c.is_ascii_digit() || c == '-') => Cow::Borrowed(raw),
        Err(_) => return None,
    };
    if value.is_empty() {
        return None;
    }
    Some(value.chars().take(MAX_KEY_CHARS).collect())
}

/// The raw value of one top-level field (the last one, when repeated).
struct FieldOf<'f>(&'f str);

impl<'de> serde::de::Visitor<'de> for FieldOf<'_> {
    type Value = Option<&'de RawValue>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut found = None;
        // `Key` borrows an unescaped key from the input (serde's `Cow<str>` always allocates).
        while let Some(Key(key)) = map.next_key::<Key<'de>>()? {
            if key == self.0 {
                found = Some(map.next_value::<&'de RawValue>()?);
            } else {
                map.next_value::<serde::de::IgnoredAny>()?;
            }
        }
        Ok(found)
    }
}

/// Splits entries into PutRecords calls within the limits; entries too large for one record
/// are returned apart.
pub fn pack(entries: Vec<Entry<'_>>) -> (Vec<Vec<Entry<'_>>>, Vec<Entry<'_>>) {
    let mut calls: Vec<Vec<Entry>> = Vec::new();
    let mut oversize = Vec::new();
    let mut current: Vec<Entry> = Vec::new();
    let mut bytes = 0;
    for e in entries {
        let size = e.size();
        if size > MAX_RECORD_BYTES {
            oversize.push(e);
            continue;
        }
        if current.len() == MAX_RECORDS || bytes + size > MAX_REQUEST_BYTES {
            calls.push(std::mem::take(&mut current));
            bytes = 0;
        }
        bytes += size;
        current.push(e);
    }
    if !current.is_empty() {
        calls.push(current);
    }
    (calls, oversize)
}

/// The events of a written batch, read back from its (compressed) object body: for a batch
/// sealed without its lines (none is, while the output is configured at start-up).
pub fn events_of(body: &[u8], compression: Compression) -> Result<Vec<u8>, SinkError> {
    match compression {
        Compression::None => Ok(body.to_vec()),
        Compression::Gzip => {
            let mut out = Vec::new();
            flate2::read::MultiGzDecoder::new(body)
                .read_to_end(&mut out)
                .map_err(|e| SinkError::Decode(e.to_string()))?;
            Ok(out)
        }
        Compression::Zstd => {
            zstd::stream::decode_all(body).map_err(|e| SinkError::Decode(e.to_string()))
        }
        // Only Parquet uses snappy, and the Kinesis output requires JSON lines (config check).
        Compression::Snappy => Err(SinkError::Decode(
            "snappy objects are Parquet, not JSON lines".to_owned(),
        )),
    }
}

pub struct KinesisSink {
    client: aws_sdk_kinesis::Client,
    pub stream: String,
    key_field: String,
    max_attempts: u32,
    backoff: Backoff,
}

/// What one batch's put did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PutReport<'a> {
    pub records: usize,
    pub retried: usize,
    pub oversize: Vec<Entry<'a>>,
}

fn retryable_code(code: Option<&str>) -> bool {
    !matches!(
        code,
        Some(
            "ResourceNotFoundException"
                | "InvalidArgumentException"
                | "AccessDeniedException"
                | "ValidationException"
        )
    )
}

impl KinesisSink {
    pub async fn new(cfg: &KinesisSinkConfig) -> KinesisSink {
        let shared = crate::aws::config(cfg.region.as_deref(), cfg.endpoint_url.as_deref()).await;
        KinesisSink {
            // A PutRecords that never answers must not hold the batch for ever.
            client: aws_sdk_kinesis::Client::from_conf(
                aws_sdk_kinesis::config::Builder::from(&shared)
                    .timeout_config(crate::aws::timeouts(std::time::Duration::from_secs(60)))
                    .build(),
            ),
            stream: cfg.stream.clone(),
            key_field: cfg.partition_key.clone(),
            max_attempts: cfg.max_attempts,
            backoff: Backoff {
                attempts: cfg.max_attempts,
                base: Duration::from_millis(100),
                max: Duration::from_secs(5),
            },
        }
    }

    /// Readiness: the stream exists and these credentials can see it.
    pub async fn check(&self) -> Result<(), String> {
        self.client
            .describe_stream_summary()
            .stream_name(&self.stream)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| format!("{}: {}", self.stream, e.message().unwrap_or("unreachable")))
    }

    /// Puts every entry; returns the oversize ones for the error output. An error means some
    /// events may not be on the stream: the batch must not be acknowledged.
    pub async fn put_entries<'a>(
        &self,
        entries: Vec<Entry<'a>>,
    ) -> Result<PutReport<'a>, SinkError> {
        let (calls, oversize) = pack(entries);
        let mut report = PutReport {
            oversize,
            ..PutReport::default()
        };
        for call in calls {
            let n = call.len();
            report.retried += self.put_call(call).await?;
            report.records += n;
        }
        Ok(report)
    }

    /// One PutRecords call, then again with only the entries that failed. Returns how many
    /// entries were retried.
    async fn put_call(&self, mut pending: Vec<Entry<'_>>) -> Result<usize, SinkError> {
        let mut retried = 0;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let records: Vec<PutRecordsRequestEntry> = pending
                .iter()
                .filter_map(|e| {
                    PutRecordsRequestEntry::builder()
                        .data(Blob::new(e.data))
                        .partition_key(e.key.as_ref())
                        .build()
                        .ok()
                })
                .collect();
            let sent = self
                .client
                .put_records()
                .stream_name(&self.stream)
                .set_records(Some(records))
                .send()
                .await;
            let out = match sent {
                Ok(out) => out,
                Err(e) => {
                    let message = match (e.code(), e.message()) {
                        (Some(c), Some(m)) => format!("{c}: {m}"),
                        (Some(c), None) => c.to_owned(),
                        _ => aws_sdk_kinesis::error::DisplayErrorContext(&e)
                            .to_string()
                            .chars()
                            .take(300)
                            .collect(),
                    };
                    if attempt >= self.max_attempts || !retryable_code(e.code()) {
                        return Err(SinkError::Put {
                            stream: self.stream.clone(),
                            message,
                        });
                    }
                    metrics::emit(KinesisSinkRetry {
                        records: pending.len(),
                        error: &message,
                    });
                    tokio::time::sleep(self.backoff.delay(attempt)).await;
                    continue;
                }
            };
            let results = out.records();
            let mut failed = Vec::new();
            let mut last = String::new();
            for (i, e) in pending.into_iter().enumerate() {
                match results.get(i) {
                    Some(r) if r.error_code().is_none() => {}
                    Some(r) => {
                        last = format!(
                            "{}: {}",
                            r.error_code().unwrap_or_default(),
                            r.error_message().unwrap_or_default()
                        );
                        failed.push(e);
                    }
                    None => failed.push(e),
                }
            }
            metrics::emit(KinesisSinkPut {
                records: results.len().saturating_sub(failed.len()),
            });
            if failed.is_empty() {
                return Ok(retried);
            }
            if attempt >= self.max_attempts {
                return Err(SinkError::Exhausted {
                    failed: failed.len(),
                    attempts: attempt,
                    last,
                });
            }
            metrics::emit(KinesisSinkRetry {
                records: failed.len(),
                error: &last,
            });
            retried += failed.len();
            pending = failed;
            tokio::time::sleep(self.backoff.delay(attempt)).await;
        }
    }
}

/// What the uploader needs to start the Kinesis output, when one is configured.
pub struct ForwardTo {
    cfg: KinesisSinkConfig,
    codec: Codec,
    error_prefix: String,
}

pub fn forward_to(cfg: &Config, codec: Codec) -> Option<ForwardTo> {
    cfg.output.kinesis.as_ref().map(|k| ForwardTo {
        cfg: k.clone(),
        codec,
        error_prefix: cfg.output.error_prefix.clone(),
    })
}

impl ForwardTo {
    /// The output, checked once: a stream that cannot be seen is reported at start-up (batches
    /// then fail, unacknowledged, until it can).
    pub async fn open(self) -> Forwarder {
        let f = Forwarder::new(&self.cfg, self.codec, &self.error_prefix).await;
        if let Err(e) = f.sink.check().await {
            metrics::emit(KinesisSinkUnreachable {
                stream: &f.sink.stream,
                error: &e,
            });
        }
        f
    }
}

/// The Kinesis output beside the object store: forwards the events of each written batch and
/// writes those too large for a record to the error output.
pub struct Forwarder {
    pub sink: KinesisSink,
    /// Whether events are also written as objects (errors always are).
    pub write_objects: bool,
    codec: Codec,
    error_prefix: String,
}

#[derive(serde::Serialize)]
struct OversizeRecord<'a> {
    time: String,
    source: String,
    stage: &'static str,
    reason: &'static str,
    detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    record: Option<&'a RawValue>,
}

impl Forwarder {
    pub async fn new(cfg: &KinesisSinkConfig, codec: Codec, error_prefix: &str) -> Forwarder {
        Forwarder {
            sink: KinesisSink::new(cfg).await,
            write_objects: cfg.write_objects,
            codec,
            error_prefix: error_prefix.to_owned(),
        }
    }

    /// Puts the events of a batch: from its lines as they were staged, each with the key
    /// recorded when it was appended (`lines`), or else read back from the object `body`. Ok
    /// only when every event is on the stream or, if too large, in the error output.
    pub async fn forward(
        &self,
        store: &Store,
        lines: Option<Vec<LineChunk>>,
        body: Bytes,
    ) -> Result<(), String> {
        let kind = self.codec.kind;
        let read_back = match lines {
            Some(_) => None,
            None => Some(
                tokio::task::spawn_blocking(move || events_of(&body, kind))
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| e.to_string())?,
            ),
        };
        // A key for each event that has none of its own, as before: random, spreading them.
        let random = || Cow::Owned(uuid::Uuid::now_v7().to_string());
        let entries: Vec<Entry> = match (&lines, &read_back) {
            (Some(chunks), _) => chunks
                .iter()
                .flat_map(LineChunk::lines)
                .map(|(data, key)| Entry {
                    key: key.map_or_else(random, Cow::Borrowed),
                    data,
                })
                .collect(),
            (None, Some(text)) => text
                .split(|b| *b == b'\n')
                .filter(|l| !l.is_empty())
                .map(|data| Entry {
                    key: partition_key(data, &self.sink.key_field).map_or_else(random, Cow::Owned),
                    data,
                })
                .collect(),
            (None, None) => Vec::new(),
        };
        let report = self
            .sink
            .put_entries(entries)
            .await
            .map_err(|e| e.to_string())?;
        if report.oversize.is_empty() {
            return Ok(());
        }
        let now = Utc::now();
        let mut lines = Vec::new();
        for e in &report.oversize {
            metrics::emit(KinesisSinkOversize {
                stream: &self.sink.stream,
                bytes: e.size(),
            });
            let rec = OversizeRecord {
                time: now.rfc3339(),
                source: format!("kinesis-sink://{}", self.sink.stream),
                stage: "sink",
                reason: "too_large_for_kinesis",
                detail: format!(
                    "the event and its partition key are {} bytes, over Kinesis's {} per record; it is kept here (and in the event objects when they are written)",
                    e.size(),
                    MAX_RECORD_BYTES
                ),
                record: serde_json::from_slice::<&RawValue>(e.data).ok(),
            };
            let _ = serde_json::to_writer(&mut lines, &rec);
            lines.push(b'\n');
        }
        let key = format!(
            "{}year={:04}/month={:02}/day={:02}/{}",
            self.error_prefix,
            now.year,
            now.month,
            now.day,
            object_name_with(now, kind.extension())
        );
        let body = Bytes::from(compress(self.codec, &lines).map_err(|e| e.to_string())?);
        Backoff::default()
            .run(
                || store.put(&key, body.clone(), kind.content_type()),
                |e| {
                    matches!(
                        e,
                        WriteError::S3 {
                            retryable: true,
                            ..
                        }
                    )
                },
            )
            .await
            .map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(key: &str, size: usize) -> Entry<'static> {
        static DATA: std::sync::LazyLock<Vec<u8>> =
            std::sync::LazyLock::new(|| vec![b'x'; MAX_RECORD_BYTES + 1]);
        Entry {
            key: Cow::Owned(key.into()),
            data: &DATA[..size],
        }
    }

    #[test]
    fn partition_keys_come_from_the_configured_field() {
        let ev = br#"{"eventID":"abc","n":42,"o":{"x":1},"e":""}"#;
        assert_eq!(partition_key(ev, "eventID").as_deref(), Some("abc"));
        assert_eq!(partition_key(ev, "n").as_deref(), Some("42"));
        assert_eq!(partition_key(ev, "o"), None);
        assert_eq!(partition_key(ev, "e"), None);
        assert_eq!(partition_key(ev, "missing"), None);
        assert_eq!(partition_key(b"not json", "eventID"), None);
        let nested = br#"{"o":{"eventID":"inner"},"eventID":"outer","eventID":"last"}"#;
        assert_eq!(partition_key(nested, "eventID").as_deref(), Some("last"));
        assert_eq!(
            partition_key(br#"{"k":"a\"b"}"#, "k").as_deref(),
            Some("a\"b")
        );
        let long = format!(r#"{{"k":"{}"}}"#, "é".repeat(300));
        assert_eq!(
            partition_key(long.as_bytes(), "k").map(|k| k.chars().count()),
            Some(256)
        );
    }

    #[test]
    fn calls_respect_record_count_and_request_size() {
        let (calls, over) = pack((0..1201).map(|_| entry("k", 10)).collect());
        assert!(over.is_empty());
        assert_eq!(
            calls.iter().map(Vec::len).collect::<Vec<_>>(),
            vec![500, 500, 201]
        );

        // 1 MiB records: five fit in 5 MiB only if keys are counted out; they are counted in.
        let big = MAX_RECORD_BYTES - 1;
        let (calls, over) = pack((0..6).map(|_| entry("k", big)).collect());
        assert!(over.is_empty());
        assert_eq!(calls.iter().map(Vec::len).collect::<Vec<_>>(), vec![5, 1]);
        for c in &calls {
            assert!(c.iter().map(Entry::size).sum::<usize>() <= MAX_REQUEST_BYTES);
        }
    }

    #[test]
    fn oversize_records_are_set_apart() {
        let (calls, over) = pack(vec![
            entry("k", 10),
            entry("key", MAX_RECORD_BYTES - 2),
            entry("k", 20),
        ]);
        assert_eq!(over.len(), 1);
        assert_eq!(calls, vec![vec![entry("k", 10), entry("k", 20)]]);
        let (_, over) = pack(vec![entry("k", MAX_RECORD_BYTES - 1)]);
        assert!(over.is_empty(), "exactly 1 MiB with the key fits");
    }

    #[test]
    fn events_are_read_back_from_every_codec() {
        use crate::sink::encode::{Codec, compress};
        let text = b"{\"a\":1}\n{\"b\":2}\n";
        for kind in [Compression::None, Compression::Gzip, Compression::Zstd] {
            let level = if kind == Compression::None { 0 } else { 3 };
            let mut body = compress(Codec { kind, level }, &text[..8]).unwrap();
            body.extend(compress(Codec { kind, level }, &text[8..]).unwrap());
            assert_eq!(events_of(&body, kind).unwrap(), text, "{kind:?}");
        }
    }
}
