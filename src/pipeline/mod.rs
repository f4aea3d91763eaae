//! Wiring: files are split, enriched and buffered on worker threads (`FileWorker`); sealed
//! batches are compressed on the encoder pool and written by the async uploader. `process` (here)
//! reads local files; `service` is the SQS-driven production mode.

pub mod backfill;
pub mod engine;
pub mod kinesis;
pub mod service;

use std::cell::Cell;
use std::io::Read;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::value::RawValue;

use crate::ack::Hold;
use crate::clock::Utc;
use crate::cloudtrail::{self, FileErrorReason, Item, Kind as SplitKind};
use crate::config::{Config, ConfigError, OutputUrl};
use crate::enrich::geo::{GeoDb, GeoEnricher, GeoError};
use crate::fetch::{self, Encoding};
use crate::metrics::{self, *};
use crate::sink::batch::{Batcher, Kind, Sealed};
use crate::sink::encode::{Encoder, encode_event};
use crate::sink::partition::Partitioner;
use crate::sink::write::{S3Options, Store, WriteError, Written};
use crate::source::local::{self, SourceError};

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Geo(#[from] GeoError),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("output unusable: {0}")]
    Output(#[from] WriteError),
    #[error("a worker thread failed: {0}")]
    Worker(String),
}

/// One line an error object holds. Sources and reasons are named so the file can be found and
/// replayed; a rejected record is kept whole.
#[derive(Serialize)]
struct ErrorRecord<'a> {
    /// Set when the record is buffered.
    time: String,
    source: &'a str,
    stage: &'static str,
    reason: &'a str,
    detail: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    events_kept: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    index: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    record: Option<&'a RawValue>,
}

impl<'a> ErrorRecord<'a> {
    fn new(source: &'a str, stage: &'static str, reason: &'a str, detail: &'a str) -> Self {
        ErrorRecord {
            time: String::new(),
            source,
            stage,
            reason,
            detail,
            events_kept: None,
            index: None,
            record: None,
        }
    }
}

/// What one worker saw, summed into the run summary.
#[derive(Debug, Default, Clone, Copy)]
pub struct Tally {
    pub files: u64,
    pub digests: u64,
    pub failed_files: u64,
    pub events_in: u64,
    pub error_records: u64,
}

impl Tally {
    pub fn add(&mut self, o: Tally) {
        self.files += o.files;
        self.digests += o.digests;
        self.failed_files += o.failed_files;
        self.events_in += o.events_in;
        self.error_records += o.error_records;
    }
}

/// True for CloudTrail digest files by their key, so they are skipped without a read.
pub fn is_digest_name(name: &str) -> bool {
    name.contains("/CloudTrail-Digest/") || name.contains("_CloudTrail-Digest_")
}

/// The per-thread core: one file in, sealed batches out through `out`.
pub struct FileWorker {
    geo: Option<GeoEnricher>,
    partitioner: Arc<Partitioner>,
    events: Batcher,
    errors: Batcher,
    error_prefix: String,
    max_event_bytes: usize,
    key: String,
    /// The notification of the file being processed, while it is processed.
    hold: Option<Hold>,
    lag: LagRecorder,
    /// Open buffers and buffered bytes last reported to the gauges.
    reported: (i64, i64),
    pub tally: Tally,
}

/// Whether a file is done with (its events and errors are buffered) or must be tried again
/// because its source failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileOutcome {
    Handled,
    Retry,
}

impl FileWorker {
    pub fn new(
        cfg: &Config,
        geo: &Arc<GeoDb>,
        partitioner: Arc<Partitioner>,
        encoder: &Encoder,
    ) -> FileWorker {
        FileWorker {
            geo: (!geo.is_empty()).then(|| GeoEnricher::new(geo.clone(), cfg.geoip.cache_entries)),
            partitioner,
            events: Batcher::new(Kind::Events, cfg.limits(), encoder.clone()),
            errors: Batcher::new(Kind::Errors, cfg.limits(), encoder.clone()),
            error_prefix: cfg.output.error_prefix.clone(),
            max_event_bytes: cfg.max_event_bytes(),
            key: String::new(),
            hold: None,
            lag: LagRecorder::new(),
            reported: (0, 0),
            tally: Tally::default(),
        }
    }

    /// Splits, enriches and buffers one file. `source` names it (path or s3:// URL) in logs and
    /// error records; `reader` yields its stored bytes; `hold` is its notification's share,
    /// committed here once every record is buffered (the buffers hold their own shares), or
    /// failed when the source itself broke so that the notification is delivered again.
    pub fn process(
        &mut self,
        source: &str,
        reader: impl Read,
        hold: Option<Hold>,
        out: &mut impl FnMut(Sealed),
    ) -> FileOutcome {
        self.hold = hold;
        let outcome = self.process_inner(source, reader, out);
        self.report_buffers();
        if let Some(h) = self.hold.take() {
            match outcome {
                FileOutcome::Handled => h.commit(),
                FileOutcome::Retry => h.fail(),
            }
        }
        outcome
    }

    fn process_inner(
        &mut self,
        source: &str,
        reader: impl Read,
        out: &mut impl FnMut(Sealed),
    ) -> FileOutcome {
        let started = Instant::now();
        self.tally.files += 1;
        if is_digest_name(source) {
            self.tally.digests += 1;
            metrics::emit(DigestSkipped { source });
            return FileOutcome::Handled;
        }
        let stored = Cell::new(0u64);
        let decoded = fetch::decode(CountingReader {
            inner: reader,
            n: &stored,
        });
        let (encoding, decoded) = match decoded {
            Ok(d) => d,
            Err(e) => {
                let err = cloudtrail::read_error(&e);
                if err.reason == FileErrorReason::Read {
                    return self.source_failed(source, &err.detail);
                }
                self.file_failed(source, err.reason, &err.detail, (0, 0, 0), started, out);
                return FileOutcome::Handled;
            }
        };
        if encoding == Encoding::Plain && fetch::named_gzip(source) {
            metrics::emit(NotGzipDespiteName { source });
            let detail = "the file is named .gz but is not gzip; its events were read as plain JSON and kept";
            self.error_record(out, ErrorRecord::new(source, "fetch", "not_gzip", detail));
        }

        let mut fallback = 0u64;
        let mut rejected: Vec<(u64, Vec<u8>)> = Vec::new();
        let report = {
            let (partitioner, key, geo, events, hold, lag) = (
                &self.partitioner,
                &mut self.key,
                &mut self.geo,
                &mut self.events,
                self.hold.as_ref(),
                &self.lag,
            );
            let now = Utc::now().to_unix();
            cloudtrail::split(decoded, self.max_event_bytes, |item| match item {
                Item::Event { raw, head } => {
                    let routed = partitioner.key_for(&head, key);
                    fallback += u64::from(routed.fallback);
                    if let Some(t) = routed.time {
                        lag.observe((now - t.to_unix()) as f64);
                    }
                    let geo = geo
                        .as_mut()
                        .and_then(|g| g.lookup(head.source_ip.as_deref()));
                    let sealed = events.append(key, hold, |buf| match geo {
                        Some(g) => encode_event(buf, raw, &[g]),
                        None => encode_event(buf, raw, &[]),
                    });
                    if let Some(s) = sealed {
                        out(s);
                    }
                }
                // Rare; kept aside so the error batcher is not borrowed during the split.
                Item::NotAnObject { index, raw } => rejected.push((index, raw.to_vec())),
            })
        };
        for (index, raw) in &rejected {
            metrics::emit(RecordRejected {
                source,
                index: *index,
                reason: "not_an_object",
            });
            let detail = "a Records entry is not a JSON object; the file's other entries were kept";
            self.error_record(
                out,
                ErrorRecord {
                    index: Some(*index),
                    record: serde_json::from_slice::<&RawValue>(raw).ok(),
                    ..ErrorRecord::new(source, "split", "not_an_object", detail)
                },
            );
        }
        if let Some(g) = self.geo.as_mut() {
            metrics::emit(GeoLookups(g.take_stats()));
        }
        metrics::emit(FallbackPartitioned { events: fallback });
        self.lag.flush();
        self.tally.events_in += report.events;
        match report.result {
            Ok(SplitKind::Events) => metrics::emit(FileProcessed {
                source,
                stored_bytes: stored.get(),
                decoded_bytes: report.decompressed_bytes,
                events: report.events,
                elapsed: started.elapsed(),
            }),
            Ok(SplitKind::Digest) => {
                self.tally.digests += 1;
                metrics::emit(DigestSkipped { source });
            }
            Err(e) if e.reason == FileErrorReason::Read => {
                return self.source_failed(source, &e.detail);
            }
            Err(e) => {
                let detail = if report.events > 0 {
                    format!(
                        "{}; the {} events before this point were kept and written",
                        e.detail, report.events
                    )
                } else {
                    e.detail.clone()
                };
                let counts = (report.events, stored.get(), report.decompressed_bytes);
                self.file_failed(source, e.reason, &detail, counts, started, out);
            }
        }
        FileOutcome::Handled
    }

    /// The source broke mid-read (not the file's fault): nothing is routed to the error output,
    /// the file is tried again. Events already buffered stay; their notification is not
    /// acknowledged, so a retry may repeat them (at-least-once).
    fn source_failed(&mut self, source: &str, detail: &str) -> FileOutcome {
        self.tally.failed_files += 1;
        metrics::emit(FileSourceFailed { source, detail });
        FileOutcome::Retry
    }

    /// `counts`: events kept, stored bytes, decoded bytes.
    fn file_failed(
        &mut self,
        source: &str,
        reason: FileErrorReason,
        detail: &str,
        (events_kept, stored, decoded): (u64, u64, u64),
        started: Instant,
        out: &mut impl FnMut(Sealed),
    ) {
        self.tally.failed_files += 1;
        metrics::emit(FileFailed {
            source,
            reason,
            detail,
            events_kept,
            stored_bytes: stored,
            decoded_bytes: decoded,
            elapsed: started.elapsed(),
        });
        self.error_record(
            out,
            ErrorRecord {
                events_kept: Some(events_kept),
                ..ErrorRecord::new(source, "split", reason.as_str(), detail)
            },
        );
    }

    fn error_record(&mut self, out: &mut impl FnMut(Sealed), mut rec: ErrorRecord<'_>) {
        self.tally.error_records += 1;
        let now = Utc::now();
        rec.time = now.rfc3339();
        let partition = format!(
            "{}year={:04}/month={:02}/day={:02}/",
            self.error_prefix, now.year, now.month, now.day
        );
        let sealed = self.errors.append(&partition, self.hold.as_ref(), |buf| {
            // Serializing plain strings and valid raw JSON into a Vec cannot fail.
            let _ = serde_json::to_writer(&mut *buf, &rec);
            buf.push(b'\n');
        });
        if let Some(s) = sealed {
            out(s);
        }
    }

    /// Reports this worker's change in open buffers and buffered bytes.
    fn report_buffers(&mut self) {
        let now = (
            (self.events.open_buffers() + self.errors.open_buffers()) as i64,
            (self.events.buffered_bytes() + self.errors.buffered_bytes()) as i64,
        );
        metrics::emit(BuffersChanged {
            open: now.0 - self.reported.0,
            bytes: now.1 - self.reported.1,
        });
        self.reported = now;
    }

    /// When the oldest open buffer must be sealed.
    pub fn next_deadline(&self) -> Option<Instant> {
        [self.events.next_deadline(), self.errors.next_deadline()]
            .into_iter()
            .flatten()
            .min()
    }

    /// Seals buffers that reached their age limit.
    pub fn seal_expired(&mut self, out: &mut impl FnMut(Sealed)) {
        let now = Instant::now();
        self.events
            .seal_expired(now)
            .into_iter()
            .for_each(&mut *out);
        self.errors
            .seal_expired(now)
            .into_iter()
            .for_each(&mut *out);
    }

    /// Seals everything (end of input or shutdown).
    pub fn seal_all(&mut self, out: &mut impl FnMut(Sealed)) {
        self.events.seal_all().into_iter().for_each(&mut *out);
        self.errors.seal_all().into_iter().for_each(&mut *out);
        self.report_buffers();
    }
}

struct CountingReader<'a, R> {
    inner: R,
    n: &'a Cell<u64>,
}

impl<R: Read> Read for CountingReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.n.set(self.n.get() + n as u64);
        Ok(n)
    }
}

/// Builds the configured output store.
pub async fn open_store(cfg: &Config) -> Result<Store, PipelineError> {
    Ok(match cfg.output_url()? {
        OutputUrl::Local(root) => Store::Local { root },
        OutputUrl::S3 { bucket, prefix } => {
            let s3 = &cfg.output.s3;
            let client = s3_client(
                s3.region.as_deref(),
                s3.endpoint_url.as_deref(),
                s3.force_path_style,
            )
            .await;
            Store::S3 {
                client,
                bucket,
                prefix,
                options: S3Options {
                    sse_kms_key_id: s3.sse_kms_key_id.clone(),
                    storage_class: s3
                        .storage_class
                        .as_deref()
                        .map(aws_sdk_s3::types::StorageClass::from),
                    multipart_threshold: s3.multipart_threshold_bytes,
                    part_size: s3.part_size_bytes,
                },
            }
        }
    })
}

/// An S3 client from the standard AWS chain (env, profile, IRSA web identity), with optional
/// region and endpoint overrides for S3-compatible stores and tests.
pub async fn s3_client(
    region: Option<&str>,
    endpoint: Option<&str>,
    path_style: bool,
) -> aws_sdk_s3::Client {
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
    if let Some(r) = region {
        loader = loader.region(aws_config::Region::new(r.to_owned()));
    }
    if let Some(e) = endpoint {
        loader = loader.endpoint_url(e);
    }
    let shared = loader.load().await;
    let conf = aws_sdk_s3::config::Builder::from(&shared)
        .force_path_style(path_style)
        .retry_config(aws_config::retry::RetryConfig::standard().with_max_attempts(5))
        .build();
    aws_sdk_s3::Client::from_conf(conf)
}

/// The result of a `process` run.
#[derive(Debug)]
pub struct Summary {
    pub tally: Tally,
    pub written: Written,
    pub elapsed: Duration,
    pub output: String,
}

impl Summary {
    pub fn line(&self) -> String {
        let t = &self.tally;
        let secs = self.elapsed.as_secs_f64();
        format!(
            "files={} (digests skipped {}, bad {}) events_in={} events_out={} errors={} objects={} elapsed={:.2}s events/s={:.0} output={}",
            t.files,
            t.digests,
            t.failed_files,
            t.events_in,
            self.written.event_records,
            t.error_records,
            self.written.objects,
            secs,
            if secs > 0.0 {
                t.events_in as f64 / secs
            } else {
                0.0
            },
            self.output,
        )
    }
}

/// Opens the geo databases named in the config; warns once when there are none.
pub fn open_geo(cfg: &Config) -> Result<Arc<GeoDb>, PipelineError> {
    let db = GeoDb::open(cfg.geoip.city_db.as_deref(), cfg.geoip.asn_db.as_deref())?;
    if db.is_empty() {
        metrics::emit(GeoDisabled);
    }
    Ok(Arc::new(db))
}

/// The `process` job: local delivery files in, objects out.
pub async fn process(cfg: &Config, inputs: &[PathBuf]) -> Result<Summary, PipelineError> {
    let started = Instant::now();
    cfg.validate()?;
    let files = local::list_inputs(inputs)?;

    let workers = cfg.workers().min(files.len().max(1));
    let engine = engine::Engine::open(cfg, workers, workers * 2).await?;
    let output = engine.store().describe("");
    let submitter = engine.submitter();
    for path in files {
        let source = path.display().to_string();
        if !submitter
            .submit(source, engine::Input::Path(path), None)
            .await
        {
            return Err(PipelineError::Worker("the workers stopped".into()));
        }
    }
    drop(submitter);
    let (tally, written) = engine.finish().await?;
    Ok(Summary {
        tally,
        written,
        elapsed: started.elapsed(),
        output,
    })
}
