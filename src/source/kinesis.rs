//! A Kinesis Data Stream as a source: what a record holds (a CloudWatch Logs subscription batch,
//! a delivery-file notification, or one CloudTrail event), GetRecords polling, and the
//! contiguous-prefix tracking that decides how far a shard may be checkpointed.

use std::collections::VecDeque;
use std::io::Read;
use std::ops::Range;

use aws_sdk_kinesis::error::ProvideErrorMetadata;
use serde::Deserialize;

use crate::config::{KinesisConfig, StartPosition};
use crate::source::cwl::{self, Messages};
use crate::source::notification::{self, Notification};

/// Largest decompressed record accepted (Kinesis records are at most 1 MiB stored; CloudWatch
/// Logs batches compress well, but not a thousandfold).
const MAX_DECODED: u64 = 64 << 20;

/// What one record's data is.
#[derive(Debug, PartialEq, Eq)]
pub enum Shape {
    /// Events to split, added to the classifier's `Messages` as `spans`: a CloudWatch Logs
    /// batch's messages (`cwl`), or one plain event.
    Events { spans: Range<usize>, cwl: bool },
    /// A CloudWatch Logs `CONTROL_MESSAGE` (destination health check): skipped.
    Control,
    /// A delivery-file notification, handled as an SQS message would be.
    Notification(Notification),
    /// None of the above; `reason` is a snake_case label.
    Unrecognized {
        reason: &'static str,
        detail: String,
    },
}

/// The top-level fields that tell a record's shape, read again the slow way when the one-pass
/// read (`cwl::read`) refused the record, to tell why.
#[derive(Deserialize)]
struct Probe {
    #[serde(rename = "messageType")]
    message_type: Option<serde::de::IgnoredAny>,
}

fn unrecognized(reason: &'static str, detail: impl Into<String>) -> Shape {
    Shape::Unrecognized {
        reason,
        detail: detail.into(),
    }
}

/// Classifies the records of one GetRecords batch: their messages go into one `Messages`
/// (the workers split them in place), and gzip is undone into one buffer used again for every
/// record, so that a batch costs no allocation per record beyond its messages.
#[derive(Debug, Default)]
pub struct Classifier {
    gunzipped: Vec<u8>,
    pub messages: Messages,
}

impl Classifier {
    /// Recognises a record's data: gzip is undone first (CloudWatch Logs always gzips). Never
    /// panics: should decoding a record panic all the same, that one record is `Unrecognized`
    /// (`classify_panicked`, counted in `trailhose_panics_total{thread="classify"}`) so that it
    /// goes to the error output, rather than fail its batch and rewind its shard onto it for
    /// ever. Only `Events` leaves anything in `messages`.
    pub fn classify(&mut self, data: &[u8]) -> Shape {
        let mark = self.messages.mark();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            crate::testhook::classify(data);
            recognise(data, MAX_DECODED, &mut self.gunzipped, &mut self.messages)
        }));
        let shape = outcome.unwrap_or_else(|payload| {
            self.gunzipped = Vec::new();
            let message = crate::testhook::panic_message(payload.as_ref());
            crate::metrics::emit(crate::metrics::RecordClassifyPanicked { message: &message });
            unrecognized(
                "classify_panicked",
                format!("decoding the record panicked: {message}"),
            )
        });
        if !matches!(shape, Shape::Events { .. }) {
            self.messages.rollback(mark);
        }
        // Released now, not at the next record: a job waits for its permit between records,
        // and must not hold a large record's text while it does.
        if self.gunzipped.capacity() > KEPT_GUNZIP_BYTES {
            self.gunzipped = Vec::new();
        }
        shape
    }

    /// What the classifier holds between records: its gzip buffer and its messages.
    pub fn held_bytes(&self) -> usize {
        self.gunzipped.capacity() + self.messages.capacity()
    }
}

/// What a whole-record gunzip may hold on to between records.
const KEPT_GUNZIP_BYTES: usize = 4 << 20;

/// What one record's data is; one that decodes to more than `max_decoded` bytes is refused
/// (`record_too_large`) rather than read cut off.
fn recognise(
    data: &[u8],
    max_decoded: u64,
    gunzipped: &mut Vec<u8>,
    messages: &mut Messages,
) -> Shape {
    let text: &[u8] = if data.starts_with(&[0x1f, 0x8b]) {
        gunzipped.clear();
        // `bufread` over the slice: no reader buffer to allocate and zero per record. One byte
        // past the limit tells a record over it from one exactly at it.
        let read = flate2::bufread::MultiGzDecoder::new(data)
            .take(max_decoded.saturating_add(1))
            .read_to_end(gunzipped);
        if let Err(e) = read {
            return unrecognized("bad_gzip", format!("gzip data does not decode: {e}"));
        }
        if gunzipped.len() as u64 > max_decoded {
            return unrecognized(
                "record_too_large",
                format!("the record decodes to more than {max_decoded} bytes"),
            );
        }
        gunzipped.as_slice()
    } else {
        data
    };
    let Ok(text) = std::str::from_utf8(text) else {
        return unrecognized("not_utf8", "record data is not UTF-8 text");
    };
    let mark = messages.mark();
    let top = match cwl::read(text.as_bytes(), messages) {
        Ok(top) => top,
        Err(e @ cwl::ReadError::TooManyLogEvents) => {
            messages.rollback(mark);
            return unrecognized(
                "too_many_log_events",
                format!("{e} (CloudWatch Logs puts at most 10000 in one)"),
            );
        }
        Err(cwl::ReadError::Json(e)) => {
            messages.rollback(mark);
            return match serde_json::from_str::<Probe>(text) {
                Err(e) => unrecognized("not_json_object", format!("not a JSON object: {e}")),
                Ok(p) if p.message_type.is_some() => unrecognized(
                    "bad_cwl_batch",
                    format!("malformed CloudWatch Logs batch: {e}"),
                ),
                // A stray `logEvents` of another shape in a record that is not a batch.
                Ok(_) => not_a_batch(text, messages),
            };
        }
    };
    match top.message_type {
        None => {
            messages.rollback(mark);
            if top.event_version && (top.event_id || top.event_time) {
                messages.push(text);
                return Shape::Events {
                    spans: messages.since(mark),
                    cwl: false,
                };
            }
            not_a_batch(text, messages)
        }
        Some(Some(t)) if t == "DATA_MESSAGE" => Shape::Events {
            spans: messages.since(mark),
            cwl: true,
        },
        Some(Some(t)) if t == "CONTROL_MESSAGE" => Shape::Control,
        Some(Some(other)) => unrecognized(
            "unknown_message_type",
            format!("CloudWatch Logs messageType {other:?}"),
        ),
        Some(None) => unrecognized(
            "bad_cwl_batch",
            "malformed CloudWatch Logs batch: messageType is not a string",
        ),
    }
}

/// A record without `messageType`: one event, or a delivery-file notification.
fn not_a_batch(text: &str, messages: &mut Messages) -> Shape {
    #[derive(Deserialize)]
    struct Event {
        #[serde(rename = "eventVersion")]
        event_version: Option<serde::de::IgnoredAny>,
        #[serde(rename = "eventID")]
        event_id: Option<serde::de::IgnoredAny>,
        #[serde(rename = "eventTime")]
        event_time: Option<serde::de::IgnoredAny>,
    }
    if let Ok(e) = serde_json::from_str::<Event>(text)
        && e.event_version.is_some()
        && (e.event_id.is_some() || e.event_time.is_some())
    {
        let mark = messages.mark();
        messages.push(text);
        return Shape::Events {
            spans: messages.since(mark),
            cwl: false,
        };
    }
    match notification::parse(text) {
        Ok(n) => Shape::Notification(n),
        Err(e) => unrecognized(e.reason(), e.to_string()),
    }
}

/// One record's events, for the workers.
#[derive(Debug)]
pub struct Unit {
    /// `kinesis://stream/shard/sequence-number`: names the record in logs and error records.
    pub source: String,
    /// Its elements in the batch's `Messages`.
    pub spans: Range<usize>,
    /// The record's data size.
    pub stored: u64,
    /// Events (not a record that went to the error output whole): messages that are not JSON
    /// objects are counted as `message_not_json_object`.
    pub events: bool,
}

/// Decoded messages per job: a GetRecords batch (up to 10 MiB stored, often ten times that
/// decoded) goes to the workers as jobs of about this much, each under one worker-queue permit
/// (`max_files_in_flight`) taken before its first record is decoded, so that all a shard's
/// decoded messages are under permits, and several workers split one batch at once. A job is
/// cut between records: one record (at most `MAX_DECODED`) may take it past this.
pub const JOB_MESSAGE_BYTES: usize = 4 << 20;

/// The events of some records of one GetRecords batch, one unit per record, in order: a single
/// job for the workers.
#[derive(Debug, Default)]
pub struct Batch {
    pub messages: Messages,
    pub units: Vec<Unit>,
}

impl Batch {
    fn is_empty(&self) -> bool {
        self.units.is_empty()
    }
}

/// A GetRecords batch classified.
#[derive(Debug, Default)]
pub struct Classified {
    /// Its events, as jobs (see `JOB_MESSAGE_BYTES`); filled by `classify_batch` only.
    pub jobs: Vec<Batch>,
    /// Delivery-file notifications, named by their record, in order.
    pub notifications: Vec<(String, Notification)>,
    /// Records of each shape (`cwl_data`, `event`, `cwl_control`, `notification`; the
    /// unrecognised ones are counted as they are reported).
    pub counts: Vec<(&'static str, u64)>,
    /// `on_job` refused a job: the batch was left unfinished.
    pub stopped: bool,
}

/// `classify_jobs`, the jobs collected (room is always there).
pub fn classify_batch(stream: &str, shard: &str, records: Vec<Record>) -> Classified {
    let mut jobs = Vec::new();
    let room = |_: &Classifier| Some(());
    let mut out = classify_jobs(
        stream,
        shard,
        records,
        JOB_MESSAGE_BYTES,
        room,
        |job, ()| {
            jobs.push(job);
            true
        },
    );
    out.jobs = jobs;
    out
}

/// Classifies a batch of records read from `stream`'s `shard`, handing its events to `on_job`
/// as they are decoded, in jobs of about `job_bytes` of messages. Before the first record of
/// each job it waits for `room` (a worker-queue permit, handed on with the job), holding
/// nothing but its kept gzip buffer (at most `KEPT_GUNZIP_BYTES`; `room` is shown the
/// classifier): what a shard has decoded is always under a permit. Records that are not
/// events become units of their own whose elements are the reason and the data as text, so
/// that they reach the error output whole, named by their record. Stops when `room` gives
/// none or `on_job` returns false.
pub fn classify_jobs<P>(
    stream: &str,
    shard: &str,
    records: Vec<Record>,
    job_bytes: usize,
    mut room: impl FnMut(&Classifier) -> Option<P>,
    mut on_job: impl FnMut(Batch, P) -> bool,
) -> Classified {
    let mut classifier = Classifier::default();
    let mut out = Classified::default();
    let mut job = Vec::new();
    let mut permit = None;
    let mut counts = [
        ("cwl_data", 0),
        ("event", 0),
        ("cwl_control", 0),
        ("notification", 0),
    ];
    for r in records {
        if permit.is_none() {
            permit = room(&classifier);
            if permit.is_none() {
                out.stopped = true;
                return out;
            }
        }
        let source = format!("kinesis://{stream}/{shard}/{}", r.seq);
        let mark = classifier.messages.mark();
        let (spans, events) = match classifier.classify(&r.data) {
            Shape::Events { spans, cwl } => {
                counts[usize::from(!cwl)].1 += 1;
                (spans, true)
            }
            Shape::Control => {
                counts[2].1 += 1;
                continue;
            }
            Shape::Notification(n) => {
                counts[3].1 += 1;
                out.notifications.push((source, n));
                continue;
            }
            Shape::Unrecognized { reason, detail } => {
                crate::metrics::emit(crate::metrics::KinesisRecordUnrecognized {
                    source: &source,
                    reason,
                });
                let m = &mut classifier.messages;
                m.push_text(&format!("{reason}: {detail}"));
                m.push_text(&describe_data(&r.data));
                (m.since(mark), false)
            }
        };
        job.push(Unit {
            source,
            spans,
            stored: r.data.len() as u64,
            events,
        });
        if classifier.messages.weight() >= job_bytes
            && let Some(p) = permit.take()
        {
            let full = Batch {
                messages: std::mem::take(&mut classifier.messages),
                units: std::mem::take(&mut job),
            };
            if !on_job(full, p) {
                out.stopped = true;
                return out;
            }
        }
    }
    let last = Batch {
        messages: classifier.messages,
        units: job,
    };
    // An empty last job gives its permit back unused.
    if let Some(p) = permit
        && !last.is_empty()
        && !on_job(last, p)
    {
        out.stopped = true;
    }
    out.counts = counts.into_iter().filter(|(_, n)| *n > 0).collect();
    out
}

/// A document the splitter turns into one error record per entry: used for record data that
/// is not events, so it reaches the error output whole, named by its source.
pub fn error_document(items: &[String]) -> Vec<u8> {
    // Each item becomes a JSON string inside Records: not an object, so the splitter routes it
    // to the error output with its index and the text kept.
    let strings: Vec<&str> = items.iter().map(String::as_str).collect();
    let mut doc = b"{\"Records\":".to_vec();
    doc.extend_from_slice(
        serde_json::to_string(&strings)
            .unwrap_or_else(|_| "[]".into())
            .as_bytes(),
    );
    doc.push(b'}');
    doc
}

/// Record data as text for the error output: UTF-8 as is, anything else as lossy text of its
/// first `BINARY_SHOWN` bytes (the record is named by shard and sequence number, so it can be
/// read again). Text, not hex: the error output's scrubber (`errors.redact_keys`) must see a
/// secret in it, as it does in UTF-8 data.
pub fn describe_data(data: &[u8]) -> String {
    match std::str::from_utf8(data) {
        Ok(t) => t.to_owned(),
        Err(_) => {
            let shown = data.get(..BINARY_SHOWN).unwrap_or(data);
            format!("binary: {}", String::from_utf8_lossy(shown))
        }
    }
}

/// How much of record data that is not UTF-8 is kept for the error output.
const BINARY_SHOWN: usize = 1024;

/// Progress of one shard: batches of records handed to the pipeline in order, each settled
/// (durably written, or failed) in any order. The checkpoint may advance to the last record of
/// the longest prefix of batches that all settled OK.
#[derive(Debug, Default)]
pub struct Progress {
    /// (ticket, last sequence number, outcome), in the order the batches were read.
    pending: VecDeque<(u64, String, Option<bool>)>,
    next_ticket: u64,
}

/// What settling told the caller.
#[derive(Debug, PartialEq, Eq)]
pub enum Advance {
    /// Nothing new to checkpoint.
    None,
    /// Checkpoint up to and including this sequence number.
    To(String),
    /// A batch failed: what follows the checkpoint must be read again.
    Failed,
}

impl Progress {
    /// A batch ending at `last_seq` was handed on; returns its ticket.
    pub fn push(&mut self, last_seq: String) -> u64 {
        let t = self.next_ticket;
        self.next_ticket += 1;
        self.pending.push_back((t, last_seq, None));
        t
    }

    /// Records the outcome of a batch and reports how far the checkpoint may go.
    pub fn settle(&mut self, ticket: u64, ok: bool) -> Advance {
        if let Some(entry) = self.pending.iter_mut().find(|e| e.0 == ticket) {
            entry.2 = Some(ok);
        }
        let mut to = None;
        while let Some((_, _, Some(outcome))) = self.pending.front() {
            if !outcome {
                return Advance::Failed;
            }
            if let Some((_, seq, _)) = self.pending.pop_front() {
                to = Some(seq);
            }
        }
        to.map_or(Advance::None, Advance::To)
    }

    /// Batches handed on and not yet settled.
    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }
}

/// Where a shard's reading starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartAt {
    After(String),
    /// At this record (the first read of a shard that has no checkpoint yet).
    At(String),
    TrimHorizon,
    Latest,
    AtTimestamp(i64),
}

impl StartAt {
    pub fn initial(cfg: &KinesisConfig) -> StartAt {
        match cfg.start_position {
            StartPosition::TrimHorizon => StartAt::TrimHorizon,
            StartPosition::Latest => StartAt::Latest,
            StartPosition::AtTimestamp => StartAt::AtTimestamp(
                cfg.start_timestamp
                    .as_deref()
                    .and_then(crate::clock::Utc::parse_rfc3339)
                    .map_or(0, |t| t.to_unix()),
            ),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KinesisError {
    #[error("{0}")]
    Throttled(String),
    #[error("{0}")]
    ExpiredIterator(String),
    #[error("{0}")]
    Other(String),
}

fn describe<E: ProvideErrorMetadata + std::error::Error + 'static>(
    e: &aws_sdk_kinesis::error::SdkError<E>,
) -> KinesisError {
    let text = match (e.code(), e.message()) {
        (Some(c), Some(m)) => format!("{c}: {m}"),
        (Some(c), None) => c.to_owned(),
        _ => aws_sdk_kinesis::error::DisplayErrorContext(e)
            .to_string()
            .chars()
            .take(300)
            .collect(),
    };
    match e.code() {
        Some("ProvisionedThroughputExceededException" | "LimitExceededException") => {
            KinesisError::Throttled(text)
        }
        Some("ExpiredIteratorException") => KinesisError::ExpiredIterator(text),
        _ => KinesisError::Other(text),
    }
}

/// One shard as ListShards describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardInfo {
    pub id: String,
    pub parents: Vec<String>,
    /// Set once the shard is closed (split or merged): its last sequence number.
    pub ending_seq: Option<String>,
}

/// One record read.
#[derive(Debug, Clone)]
pub struct Record {
    pub seq: String,
    pub data: Vec<u8>,
}

pub struct Fetched {
    pub records: Vec<Record>,
    /// None at SHARD_END.
    pub next: Option<String>,
    pub millis_behind: i64,
}

pub struct Kinesis {
    client: aws_sdk_kinesis::Client,
    pub stream: String,
}

/// The AWS config for the Kinesis source's clients (Kinesis and the DynamoDB lease table).
pub async fn aws_config(cfg: &KinesisConfig) -> aws_config::SdkConfig {
    crate::aws::config(cfg.region.as_deref(), cfg.endpoint_url.as_deref()).await
}

/// Compares Kinesis sequence numbers (decimal strings of up to 128 bits).
pub fn seq_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    a.len().cmp(&b.len()).then_with(|| a.cmp(b))
}

impl Kinesis {
    pub fn new(shared: &aws_config::SdkConfig, stream: &str) -> Kinesis {
        Kinesis {
            client: aws_sdk_kinesis::Client::new(shared),
            stream: stream.to_owned(),
        }
    }

    pub async fn list_shards(&self) -> Result<Vec<ShardInfo>, KinesisError> {
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let req = match &token {
                Some(t) => self.client.list_shards().next_token(t),
                None => self.client.list_shards().stream_name(&self.stream),
            };
            let resp = req.send().await.map_err(|e| describe(&e))?;
            for s in resp.shards() {
                let parents = [s.parent_shard_id(), s.adjacent_parent_shard_id()]
                    .into_iter()
                    .flatten()
                    .map(str::to_owned)
                    .collect();
                out.push(ShardInfo {
                    id: s.shard_id().to_owned(),
                    parents,
                    ending_seq: s
                        .sequence_number_range()
                        .and_then(|r| r.ending_sequence_number())
                        .map(str::to_owned),
                });
            }
            token = resp.next_token().map(str::to_owned);
            if token.is_none() {
                return Ok(out);
            }
        }
    }

    pub async fn iterator(&self, shard: &str, at: &StartAt) -> Result<String, KinesisError> {
        use aws_sdk_kinesis::types::ShardIteratorType as T;
        let req = self
            .client
            .get_shard_iterator()
            .stream_name(&self.stream)
            .shard_id(shard);
        let req = match at {
            StartAt::After(seq) => req
                .shard_iterator_type(T::AfterSequenceNumber)
                .starting_sequence_number(seq),
            StartAt::At(seq) => req
                .shard_iterator_type(T::AtSequenceNumber)
                .starting_sequence_number(seq),
            StartAt::TrimHorizon => req.shard_iterator_type(T::TrimHorizon),
            StartAt::Latest => req.shard_iterator_type(T::Latest),
            StartAt::AtTimestamp(t) => req
                .shard_iterator_type(T::AtTimestamp)
                .timestamp(aws_sdk_kinesis::primitives::DateTime::from_secs(*t)),
        };
        let resp = req.send().await.map_err(|e| describe(&e))?;
        resp.shard_iterator()
            .map(str::to_owned)
            .ok_or_else(|| KinesisError::Other("GetShardIterator returned no iterator".into()))
    }

    pub async fn get_records(&self, iterator: &str, limit: i32) -> Result<Fetched, KinesisError> {
        let resp = self
            .client
            .get_records()
            .shard_iterator(iterator)
            .limit(limit)
            .send()
            .await
            .map_err(|e| describe(&e))?;
        let millis_behind = resp.millis_behind_latest().unwrap_or(0);
        let next = resp.next_shard_iterator().map(str::to_owned);
        let records = resp
            .records
            .into_iter()
            .map(|r| Record {
                seq: r.sequence_number,
                data: r.data.into_inner(),
            })
            .collect();
        Ok(Fetched {
            records,
            next,
            millis_behind,
        })
    }

    /// Readiness: the stream exists and these credentials can see it.
    pub async fn check(&self) -> Result<(), String> {
        self.client
            .describe_stream_summary()
            .stream_name(&self.stream)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| describe(&e).to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cloudtrail::Element;

    const SAMPLES: &str = "../shared/samples/kinesis";

    fn gzip(data: &[u8]) -> Vec<u8> {
        use std::io::Write;
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    /// A record's shape, and its elements as (object?, text).
    fn elements(data: &[u8]) -> (Shape, Vec<(bool, String)>) {
        let mut c = Classifier::default();
        let shape = c.classify(data);
        let all = c.messages.since(cwl::Mark::default());
        let els = c
            .messages
            .elements(all)
            .map(|e| match e {
                Element::Object(b) => (true, String::from_utf8_lossy(b).into_owned()),
                Element::Text(b) => (false, String::from_utf8_lossy(b).into_owned()),
            })
            .collect();
        (shape, els)
    }

    fn classify(data: &[u8]) -> Shape {
        elements(data).0
    }

    #[test]
    fn a_cloudwatch_data_batch_is_read_once_into_its_messages() {
        let batch = serde_json::json!({
            "messageType": "DATA_MESSAGE", "owner": "1", "logGroup": "g", "logStream": "s",
            "subscriptionFilters": ["f"],
            "logEvents": [
                {"id": "1", "timestamp": 1, "message": "{\"eventVersion\":\"1.09\",\"eventID\":\"a\"}"},
                {"id": "2", "timestamp": 2, "message": "not json"},
                {"id": "3", "timestamp": 3, "message": " {\"eventID\":\"b\"} "},
                {"id": "4", "timestamp": 4, "message": " [1]"},
                {"id": "5", "timestamp": 5},
                {"id": "6", "message": "first", "timestamp": 6, "message": "{}"}
            ]
        });
        let (shape, els) = elements(&gzip(batch.to_string().as_bytes()));
        assert_eq!(
            shape,
            Shape::Events {
                spans: 0..6,
                cwl: true
            }
        );
        let want: Vec<(bool, String)> = [
            (true, r#"{"eventVersion":"1.09","eventID":"a"}"#),
            (false, "not json"),
            (true, r#"{"eventID":"b"}"#),
            (false, " [1]"),
            (false, ""),
            (true, "{}"),
        ]
        .into_iter()
        .map(|(o, t)| (o, t.to_owned()))
        .collect();
        assert_eq!(els, want);
    }

    #[test]
    fn a_batch_keeps_every_records_messages_and_rolls_back_the_rest() {
        let cwl = |msgs: &[&str]| {
            let evs: Vec<serde_json::Value> = msgs
                .iter()
                .map(|m| serde_json::json!({"id": "1", "timestamp": 1, "message": m}))
                .collect();
            gzip(
                serde_json::json!({"messageType": "DATA_MESSAGE", "logEvents": evs})
                    .to_string()
                    .as_bytes(),
            )
        };
        let rec = |seq: &str, data: Vec<u8>| Record {
            seq: seq.into(),
            data,
        };
        let records = vec![
            rec("1", cwl(&[r#"{"eventID":"a"}"#, r#"{"eventID":"b"}"#])),
            // Malformed half-way through its messages: nothing of it stays behind.
            rec("2", gzip(br#"{"messageType":"DATA_MESSAGE","logEvents":[{"message":"{\"eventID\":\"x\"}"},{"message":5}]}"#)),
            rec("3", br#"{"messageType":"CONTROL_MESSAGE","logEvents":[{"message":"CWL CONTROL MESSAGE"}]}"#.to_vec()),
            rec("4", br#" {"eventVersion":"1.09","eventID":"c"} "#.to_vec()),
            rec("5", br#"{"s3Bucket":"b","s3ObjectKey":["AWSLogs/1/CloudTrail/us-east-1/2024/03/18/f.json.gz"]}"#.to_vec()),
        ];
        let c = classify_batch("s", "shard-1", records);
        assert_eq!(
            c.counts,
            vec![
                ("cwl_data", 1),
                ("event", 1),
                ("cwl_control", 1),
                ("notification", 1)
            ]
        );
        assert_eq!(c.notifications.len(), 1);
        assert_eq!(c.notifications[0].0, "kinesis://s/shard-1/5");
        assert_eq!(c.jobs.len(), 1, "a small batch is one job");
        let job = &c.jobs[0];
        let units: Vec<(&str, bool, Vec<String>)> = job
            .units
            .iter()
            .map(|u| {
                let texts = job
                    .messages
                    .elements(u.spans.clone())
                    .map(|e| match e {
                        Element::Object(b) => format!("object {}", String::from_utf8_lossy(b)),
                        Element::Text(b) => format!("text {}", String::from_utf8_lossy(b)),
                    })
                    .collect();
                (u.source.as_str(), u.events, texts)
            })
            .collect();
        assert_eq!(units.len(), 3, "{units:?}");
        assert_eq!(units[0].0, "kinesis://s/shard-1/1");
        assert_eq!(
            units[0].2,
            [r#"object {"eventID":"a"}"#, r#"object {"eventID":"b"}"#]
        );
        assert!(units[0].1);
        assert_eq!(units[1].0, "kinesis://s/shard-1/2");
        assert!(!units[1].1);
        assert_eq!(
            units[1].2.len(),
            2,
            "the reason and the data only: {:?}",
            units[1].2
        );
        assert!(
            units[1].2[0].starts_with("text bad_cwl_batch: "),
            "{:?}",
            units[1].2
        );
        assert!(
            units[1].2[1].starts_with("text binary: "),
            "the data, as text: {:?}",
            units[1].2
        );
        assert_eq!(
            units[2].2,
            [r#"object {"eventVersion":"1.09","eventID":"c"}"#]
        );
        assert!(units[2].1);
    }

    #[test]
    fn a_batch_over_the_job_size_is_cut_into_jobs_between_records_in_order() {
        let event = |id: usize| {
            format!(
                r#"{{"eventVersion":"1.09","eventID":"e{id}","pad":"{}"}}"#,
                "x".repeat(900)
            )
        };
        let records: Vec<Record> = (0..10)
            .map(|i| Record {
                seq: i.to_string(),
                data: gzip(event(i).as_bytes()),
            })
            .collect();
        // About 1 KiB of messages a record: jobs cut at 2 KiB take three records each.
        let mut jobs = Vec::new();
        let room = |_: &Classifier| Some(());
        let c = classify_jobs("s", "shard-1", records.clone(), 2 << 10, room, |job, ()| {
            jobs.push(job);
            true
        });
        assert!(!c.stopped);
        let seqs: Vec<Vec<&str>> = jobs
            .iter()
            .map(|j| {
                j.units
                    .iter()
                    .map(|u| u.source.rsplit('/').next().unwrap_or(""))
                    .collect()
            })
            .collect();
        assert_eq!(
            seqs,
            [
                vec!["0", "1", "2"],
                vec!["3", "4", "5"],
                vec!["6", "7", "8"],
                vec!["9"]
            ]
        );
        for job in &jobs {
            assert!(
                job.messages.weight() <= (2 << 10) + 1024,
                "{}",
                job.messages.weight()
            );
            for u in &job.units {
                let els: Vec<_> = job.messages.elements(u.spans.clone()).collect();
                let id = format!(
                    "\"eventID\":\"e{}\"",
                    u.source.rsplit('/').next().unwrap_or("")
                );
                assert!(
                    matches!(els.as_slice(), [Element::Object(b)] if String::from_utf8_lossy(b).contains(&id)),
                    "each unit's spans point into its own job's messages"
                );
            }
        }
        // A refusal stops classifying: nothing more is decoded or handed on.
        let mut offered = 0;
        let c = classify_jobs("s", "shard-1", records.clone(), 2 << 10, room, |_, ()| {
            offered += 1;
            false
        });
        assert!(c.stopped);
        assert_eq!(offered, 1);
        // So does no room: nothing is decoded without it.
        let c = classify_jobs(
            "s",
            "shard-1",
            records,
            2 << 10,
            |_| None::<()>,
            |_, ()| panic!("no job without room"),
        );
        assert!(c.stopped);
    }

    /// What a shard's classifier holds outside the worker-queue permits stays small: it takes a
    /// job's permit before decoding the job's first record, and it gives a large record's gzip
    /// buffer back before it waits. Under a permit, a job holds at most `job_bytes` plus one
    /// record's messages.
    #[test]
    fn jobs_are_decoded_only_under_a_permit_and_a_large_record_is_let_go_before_waiting() {
        let event = |id: usize, pad: usize| {
            format!(
                r#"{{"eventVersion":"1.09","eventID":"e{id}","pad":"{}"}}"#,
                "x".repeat(pad)
            )
        };
        // Small records, one of 8 MiB decoded (a few KiB of gzip), then small ones again.
        let big = 8 << 20;
        let records: Vec<Record> = (0..12)
            .map(|i| Record {
                seq: i.to_string(),
                data: gzip(event(i, if i == 4 { big } else { 900 }).as_bytes()),
            })
            .collect();
        let job_bytes = 2 << 10;
        let (mut waits, mut jobs) = (Vec::new(), Vec::new());
        let (waited, handed) = (std::cell::Cell::new(0), std::cell::Cell::new(0));
        let room = |c: &Classifier| {
            // Every job handed on had its own permit; the next is taken before decoding.
            assert_eq!(
                waited.get(),
                handed.get(),
                "one permit per job, taken first"
            );
            waited.set(waited.get() + 1);
            waits.push(c.held_bytes());
            Some(waited.get())
        };
        let c = classify_jobs("s", "shard-1", records, job_bytes, room, |job, permit| {
            assert_eq!(
                permit,
                handed.get() + 1,
                "each job goes with the permit taken for it"
            );
            handed.set(handed.get() + 1);
            jobs.push(job.messages.weight());
            true
        });
        assert!(!c.stopped);
        assert_eq!(jobs.len(), 5, "{jobs:?}");
        assert_eq!(waits.len(), jobs.len());
        for held in &waits {
            assert!(
                *held <= KEPT_GUNZIP_BYTES,
                "held {held} bytes while waiting"
            );
        }
        let record = event(4, big).len();
        for w in &jobs {
            assert!(*w <= job_bytes + record + 64, "a job of {w} bytes");
        }
        assert!(
            jobs.iter().any(|w| *w >= big),
            "the large record is in a job: {jobs:?}"
        );
    }

    #[test]
    fn shapes_of_the_shared_samples() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(SAMPLES);
        let Ok(control) = std::fs::read(dir.join("cwl-control-message.bin")) else {
            return; // samples live outside the repository
        };
        assert_eq!(classify(&control), Shape::Control);
        let data = std::fs::read(dir.join("cwl-data-message.bin")).unwrap();
        assert!(matches!(classify(&data), Shape::Events { cwl: true, spans } if !spans.is_empty()));
        let one = std::fs::read(dir.join("single-event.json")).unwrap();
        let (shape, els) = elements(&one);
        assert_eq!(
            shape,
            Shape::Events {
                spans: 0..1,
                cwl: false
            }
        );
        let v: serde_json::Value = serde_json::from_str(&els[0].1).unwrap();
        assert!(els[0].0 && v["eventID"].is_string());
    }

    #[test]
    fn notifications_and_garbage() {
        let n = br#"{"s3Bucket":"b","s3ObjectKey":["AWSLogs/1/CloudTrail/us-east-1/2024/03/18/f.json.gz"]}"#;
        assert!(matches!(
            classify(n),
            Shape::Notification(Notification::Objects { .. })
        ));
        assert!(matches!(
            classify(&gzip(n)),
            Shape::Notification(Notification::Objects { .. })
        ));
        for (data, reason) in [
            (&b"hello"[..], "not_json_object"),
            (b"[1,2]", "not_json_object"),
            (b"{\"x\":1}", "unknown_shape"),
            (b"\xff\xfe", "not_utf8"),
            (b"\x1f\x8bnot really", "bad_gzip"),
            (b"{\"messageType\":\"OTHER\"}", "unknown_message_type"),
        ] {
            match classify(data) {
                Shape::Unrecognized { reason: r, .. } => assert_eq!(r, reason, "{data:?}"),
                other => panic!("{data:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_log_event_bomb_goes_whole_to_the_error_output() {
        // About 40 KiB of gzip, 20 times the cap in log events.
        let bomb = format!(
            r#"{{"messageType":"DATA_MESSAGE","logEvents":[{}]}}"#,
            vec!["{}"; cwl::MAX_LOG_EVENTS * 20].join(",")
        );
        let data = gzip(bomb.as_bytes());
        let mut c = Classifier::default();
        match c.classify(&data) {
            Shape::Unrecognized { reason, detail } => {
                assert_eq!(reason, "too_many_log_events");
                assert!(detail.contains("20000"), "{detail}");
            }
            other => panic!("{other:?}"),
        }
        assert!(c.messages.is_empty(), "no span of it stays behind");
        let out = classify_batch(
            "s",
            "shard-1",
            vec![Record {
                seq: "1".into(),
                data,
            }],
        );
        let units: Vec<_> = out.jobs.iter().flat_map(|j| &j.units).collect();
        assert_eq!(units.len(), 1);
        assert!(!units[0].events);
        assert_eq!(
            units[0].spans.len(),
            2,
            "the reason and the data, nothing else"
        );
    }

    #[test]
    fn a_record_over_the_decoded_limit_says_so_instead_of_a_json_error() {
        let event = br#"{"eventVersion":"1.09","eventID":"a"}"#;
        let (mut buf, mut messages) = (Vec::new(), Messages::default());
        let limit = event.len() as u64;
        assert!(matches!(
            recognise(&gzip(event), limit, &mut buf, &mut messages),
            Shape::Events { cwl: false, .. }
        ));
        match recognise(&gzip(event), limit - 1, &mut buf, &mut messages) {
            Shape::Unrecognized { reason, .. } => assert_eq!(reason, "record_too_large"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn data_that_is_not_utf8_reaches_the_error_output_scrubbable() {
        use crate::cloudtrail::scrub::{DEFAULT_KEYS, Keys, Scrubber};
        let data = b"{\"eventVersion\":\"1\",\"password\":\"hunter2\"}\xff";
        let text = describe_data(data);
        assert!(text.starts_with("binary: "), "{text}");
        let doc = error_document(&[text]);
        let out = Scrubber::scrub(&Keys::new(DEFAULT_KEYS), &doc);
        let out = String::from_utf8_lossy(&out);
        assert!(out.contains("eventVersion"), "readable: {out}");
        // Neither as text nor as hex (`hunter2` = 68756e74657232).
        assert!(
            !out.contains("hunter2") && !out.contains("68756e74"),
            "{out}"
        );
    }

    #[test]
    fn error_documents_keep_each_item_as_a_string() {
        let doc = error_document(&["a\"b".into(), "{x".into()]);
        let v: serde_json::Value = serde_json::from_slice(&doc).unwrap();
        assert_eq!(v["Records"][0], "a\"b");
        assert_eq!(v["Records"][1], "{x");
    }

    #[test]
    fn checkpoint_follows_the_contiguous_settled_prefix() {
        let mut p = Progress::default();
        let a = p.push("10".into());
        let b = p.push("20".into());
        let c = p.push("30".into());
        assert_eq!(p.settle(b, true), Advance::None, "b waits for a");
        assert_eq!(p.settle(a, true), Advance::To("20".into()));
        assert_eq!(p.in_flight(), 1);
        assert_eq!(p.settle(c, true), Advance::To("30".into()));
        let d = p.push("40".into());
        let e = p.push("50".into());
        assert_eq!(p.settle(e, true), Advance::None);
        assert_eq!(p.settle(d, false), Advance::Failed);
    }

    #[test]
    fn sequence_numbers_compare_numerically() {
        use std::cmp::Ordering::*;
        assert_eq!(seq_cmp("9", "10"), Less);
        assert_eq!(
            seq_cmp(
                "49590338271490256608559692538361571095921575989136588898",
                "49590338271490256608559692538361571095921575989136588899"
            ),
            Less
        );
        assert_eq!(seq_cmp("5", "5"), Equal);
    }
}
