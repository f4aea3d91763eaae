//! Wiring: files are split, enriched and buffered on worker threads (`FileWorker`); sealed
//! batches are compressed on the encoder pool and written by the async uploader. `process` (here)
//! reads local files; `service` is the SQS-driven production mode.

pub mod backfill;
pub mod dispatch;
pub mod engine;
pub mod kinesis;
pub mod ledger;
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
use crate::cloudtrail::Head;
use crate::cloudtrail::{self, FileErrorReason, Item, Kind as SplitKind, scrub};
use crate::config::{Config, ConfigError, OutputUrl};
use crate::dedup::Dedup;
use crate::detect::{Detect, DetectError, Seen};
use crate::enrich::geo::{self, GeoEnricher, GeoError};
use crate::enrich::live::LiveGeo;
use crate::enrich::members;
use crate::enrich::tables::TableError;
use crate::enrich::tables::live::LiveTables;
use crate::enrich::tables::stage::LookupStage;
use crate::fetch::{self, Encoding};
use crate::metrics::{self, *};
use crate::sink::batch::{Batcher, Forward, Kind, Sealed};
use crate::sink::budget::Budget;
use crate::sink::encode::{Encoder, encode_event};
use crate::sink::ocsf::{OcsfConfig, Schema};
use crate::sink::partition::Partitioner;
use crate::sink::write::{S3Options, Store, WriteError, Written};
use crate::source::local::{self, SourceError};
use crate::transform::{Batch, Chain, OnFailure, Reject, TransformError, Transforms};

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Geo(#[from] GeoError),
    #[error(transparent)]
    Table(#[from] TableError),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("output unusable: {0}")]
    Output(#[from] WriteError),
    #[error(transparent)]
    Transform(#[from] TransformError),
    #[error(transparent)]
    Detect(#[from] DetectError),
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
    /// The transform module that refused the record.
    #[serde(skip_serializing_if = "Option::is_none")]
    module: Option<&'a str>,
    /// The refused record's eventID (kept when its body is not, `on_failure = "drop_body"`).
    #[serde(rename = "eventID", skip_serializing_if = "Option::is_none")]
    event_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    events_kept: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    index: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    record: Option<&'a RawValue>,
    /// Where the bytes in `raw` start in the decompressed file.
    #[serde(skip_serializing_if = "Option::is_none")]
    offset: Option<u64>,
    /// The full size of an element stepped over (`raw` may hold only its first bytes).
    #[serde(skip_serializing_if = "Option::is_none")]
    size: Option<u64>,
    /// Bytes that are not a JSON value, as text (invalid UTF-8 replaced)…
    #[serde(skip_serializing_if = "Option::is_none")]
    raw: Option<std::borrow::Cow<'a, str>>,
    /// …and exactly, when they are not UTF-8.
    #[serde(skip_serializing_if = "Option::is_none")]
    raw_base64: Option<String>,
}

impl<'a> ErrorRecord<'a> {
    fn new(source: &'a str, stage: &'static str, reason: &'a str, detail: &'a str) -> Self {
        ErrorRecord {
            time: String::new(),
            source,
            stage,
            reason,
            detail,
            module: None,
            event_id: None,
            events_kept: None,
            index: None,
            record: None,
            offset: None,
            size: None,
            raw: None,
            raw_base64: None,
        }
    }

    /// Raw bytes as text, plus base64 when the text is not exact.
    fn with_raw(mut self, bytes: &'a [u8]) -> Self {
        if std::str::from_utf8(bytes).is_err() {
            self.raw_base64 = Some(base64(bytes));
        }
        self.raw = Some(String::from_utf8_lossy(bytes));
        self
    }
}

/// Standard base64 with padding (RFC 4648), for the rare error record whose bytes are not
/// UTF-8.
fn base64(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for group in bytes.chunks(3) {
        let b = |i: usize| u32::from(group.get(i).copied().unwrap_or(0));
        let n = (b(0) << 16) | (b(1) << 8) | b(2);
        for (i, shift) in [18u32, 12, 6, 0].into_iter().enumerate() {
            if i <= group.len() {
                out.push(char::from(ABC[((n >> shift) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
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

/// Raw bytes in split-stage error records: no transform saw them, so sensitive values are
/// masked first, and with a `drop_body` module they are left out unless `errors.keep_raw`.
struct RawPolicy {
    keys: scrub::Keys,
    keep: bool,
}

impl RawPolicy {
    fn of(cfg: &Config) -> RawPolicy {
        let drop_body = cfg.transforms.iter().any(|t| {
            t.on_failure == OnFailure::DropBody
                || (t.on_failure == OnFailure::Retry && t.retry_fallback == OnFailure::DropBody)
        });
        RawPolicy {
            keys: scrub::Keys::new(&cfg.errors.redact_keys),
            keep: cfg.errors.keep_raw || !drop_body,
        }
    }
}

/// The per-thread core: one file in, sealed batches out through `out`.
pub struct FileWorker {
    /// The databases as they are now, and the generation `geo` was built from.
    live_geo: Arc<LiveGeo>,
    geo_generation: u64,
    geo_cache_entries: usize,
    geo: Option<GeoEnricher>,
    /// The enrichment tables as they are now, the generation `lookups` was built from, and
    /// the built-in lookups (None when there are none).
    live_tables: Option<Arc<LiveTables>>,
    tables_generation: u64,
    lookups: Option<LookupStage>,
    partitioner: Arc<Partitioner>,
    events: Batcher,
    errors: Batcher,
    error_prefix: String,
    limits: cloudtrail::Limits,
    /// What raw bytes split-stage error records may carry (`[errors]`).
    raw: RawPolicy,
    max_file_bytes: u64,
    key: String,
    /// The notification of the file being processed, while it is processed.
    hold: Option<Hold>,
    lag: LagRecorder,
    /// The transform modules, when configured.
    stage: Option<TransformStage>,
    /// Where `stage`'s chain comes from, to rebuild it after a panic.
    transforms: Option<Arc<Transforms>>,
    /// Open buffers and buffered bytes last reported to the gauges.
    reported: (i64, i64),
    /// Shared by all workers, when `[dedup]` is configured.
    dedup: Option<Arc<Dedup>>,
    /// Set when events are written as OCSF (`output.schema = "ocsf"`).
    ocsf: Option<OcsfConfig>,
    /// Sigma rules and alert outputs, when `[detect]` is configured.
    detect: Option<Arc<Detect>>,
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
        live_geo: &Arc<LiveGeo>,
        partitioner: Arc<Partitioner>,
        encoder: &Encoder,
        transforms: Option<&Arc<Transforms>>,
        budget: &Arc<Budget>,
    ) -> FileWorker {
        let (geo_generation, db) = live_geo.current();
        FileWorker {
            live_geo: live_geo.clone(),
            geo_generation,
            geo_cache_entries: cfg.geoip.cache_entries,
            geo: (!db.is_empty()).then(|| GeoEnricher::new(db, cfg.geoip.cache_entries)),
            live_tables: None,
            tables_generation: 0,
            lookups: None,
            partitioner,
            events: Batcher::new(Kind::Events, cfg.limits(), encoder.clone(), budget.clone())
                .forwarding(cfg.output.kinesis.as_ref().map(|k| Forward {
                    key_field: k.partition_key.clone(),
                    objects: k.write_objects,
                })),
            errors: Batcher::new(
                Kind::Errors,
                cfg.limits(),
                encoder.json_lines(),
                budget.clone(),
            ),
            transforms: transforms.cloned(),
            error_prefix: cfg.output.error_prefix.clone(),
            limits: cfg.split_limits(),
            raw: RawPolicy::of(cfg),
            max_file_bytes: cfg.max_file_bytes(),
            key: String::new(),
            hold: None,
            lag: LagRecorder::new(),
            stage: transforms.map(|t| TransformStage {
                chain: t.chain(),
                pending: Batch::default(),
                rejects: Vec::new(),
                batch_events: cfg.transform_batch_events(),
            }),
            reported: (0, 0),
            dedup: None,
            ocsf: (cfg.output.schema == Schema::Ocsf).then(|| cfg.output.ocsf.clone()),
            detect: None,
            tally: Tally::default(),
        }
    }

    /// Joins the enrichment tables' built-in lookups into events.
    pub fn with_tables(mut self, tables: Option<&Arc<LiveTables>>) -> FileWorker {
        self.live_tables = tables.cloned();
        self.tables_generation = u64::MAX;
        self.follow_tables();
        self
    }

    /// Drops events whose eventID `dedup` has seen.
    pub fn with_dedup(mut self, dedup: Option<Arc<Dedup>>) -> FileWorker {
        self.dedup = dedup;
        self
    }

    /// Runs `[detect]`'s rules on every event as it is written.
    pub fn with_detect(mut self, detect: Option<Arc<Detect>>) -> FileWorker {
        self.detect = detect;
        self
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
        self.process_sized(source, reader, None, hold, out)
    }

    /// `process` for a file whose stored size was declared up front (file metadata, an S3
    /// notification or Content-Length): over `pipeline.max_file_bytes`, none of it is read.
    pub fn process_sized(
        &mut self,
        source: &str,
        reader: impl Read,
        declared: Option<u64>,
        hold: Option<Hold>,
        out: &mut impl FnMut(Sealed),
    ) -> FileOutcome {
        self.hold = hold;
        crate::testhook::worker(source);
        let outcome = match declared.filter(|&n| n > self.max_file_bytes) {
            Some(size) if !is_digest_name(source) => {
                self.tally.files += 1;
                let detail = format!(
                    "the stored file is {size} bytes, over the {}-byte limit (pipeline.max_file_bytes); it was not read",
                    self.max_file_bytes
                );
                let reason = FileErrorReason::FileTooLarge;
                self.file_failed(source, reason, &detail, (0, 0, 0), Instant::now(), out);
                FileOutcome::Handled
            }
            _ => self.process_inner(source, reader, out),
        };
        self.settle(outcome);
        outcome
    }

    /// Splits, enriches and buffers the events of a job of stream records (see
    /// `source::kinesis::Batch`), each record accounted for as a file of its own; `hold` is
    /// the batch's share for this job, committed once every record of it is buffered.
    pub fn process_records(
        &mut self,
        batch: &crate::source::kinesis::Batch,
        hold: Option<Hold>,
        out: &mut impl FnMut(Sealed),
    ) -> FileOutcome {
        self.hold = hold;
        let mut outcome = FileOutcome::Handled;
        let max_event_bytes = self.limits.max_event_bytes;
        for unit in &batch.units {
            crate::testhook::worker(&unit.source);
            let started = Instant::now();
            self.tally.files += 1;
            self.follow_geo();
            self.follow_tables();
            let elements = batch.messages.elements(unit.spans.clone());
            let split = |on_item: &mut dyn FnMut(Item<'_>)| {
                let report = cloudtrail::split_elements(elements, max_event_bytes, on_item);
                if unit.events && report.not_objects > 0 {
                    metrics::emit(KinesisRecordUnrecognized {
                        source: &unit.source,
                        reason: "message_not_json_object",
                    });
                }
                report
            };
            let stored = Cell::new(unit.stored);
            if self.split_and_route(&unit.source, started, &stored, split, out)
                == FileOutcome::Retry
            {
                outcome = FileOutcome::Retry;
            }
        }
        self.settle(outcome);
        outcome
    }

    /// After a file or batch: reports the buffers, and commits its hold (remembering its
    /// eventIDs for `[dedup]`) or, when it must come again, fails it.
    fn settle(&mut self, outcome: FileOutcome) {
        self.report_buffers();
        if let Some(h) = self.hold.take() {
            match outcome {
                FileOutcome::Handled => h.commit(),
                FileOutcome::Retry => h.fail(),
            }
        }
    }

    /// Records a notified file that cannot be fetched for good (see `dispatch`) in the error
    /// output; its unit goes on.
    pub fn unreadable(
        &mut self,
        source: &str,
        detail: &str,
        hold: Option<Hold>,
        out: &mut impl FnMut(Sealed),
    ) {
        self.hold = hold;
        self.tally.files += 1;
        self.tally.failed_files += 1;
        self.error_record(
            out,
            ErrorRecord::new(source, "fetch", "object_unreadable", detail),
        );
        self.report_buffers();
        if let Some(h) = self.hold.take() {
            h.commit();
        }
    }

    fn process_inner(
        &mut self,
        source: &str,
        reader: impl Read,
        out: &mut impl FnMut(Sealed),
    ) -> FileOutcome {
        let started = Instant::now();
        self.tally.files += 1;
        self.follow_geo();
        self.follow_tables();
        if is_digest_name(source) {
            self.tally.digests += 1;
            metrics::emit(DigestSkipped { source });
            return FileOutcome::Handled;
        }
        let stored = Cell::new(0u64);
        let decoded = fetch::decode(CountingReader {
            inner: reader,
            n: &stored,
            limit: self.max_file_bytes,
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

        let limits = self.limits;
        let split =
            |on_item: &mut dyn FnMut(Item<'_>)| cloudtrail::split_limited(decoded, limits, on_item);
        self.split_and_route(source, started, &stored, split, out)
    }

    /// Splits the events of one file or record with `split`, routes each item (events to
    /// their partitions, through enrichment, transforms and detection; the rest to the error
    /// output) and accounts for the file.
    fn split_and_route(
        &mut self,
        source: &str,
        started: Instant,
        stored: &Cell<u64>,
        split: impl FnOnce(&mut dyn FnMut(Item<'_>)) -> cloudtrail::Report,
        out: &mut impl FnMut(Sealed),
    ) -> FileOutcome {
        let mut route = Route {
            partitioner: &self.partitioner,
            key: &mut self.key,
            events: &mut self.events,
            errors: &mut self.errors,
            error_prefix: &self.error_prefix,
            hold: self.hold.as_ref(),
            lag: &self.lag,
            now: Utc::now().to_unix(),
            fallback: 0,
            error_records: 0,
            dedup: self.dedup.as_ref(),
            ocsf: self.ocsf.as_ref(),
            duplicates: 0,
            retry: false,
            detect: self.detect.as_deref(),
            source,
            stripped: Vec::new(),
        };
        // Members trailhose writes later on (see `replace_owned`): stripped at the split too, so
        // that an event is parsed again at most once, and rules never see a forged annotation.
        let annotates = self.detect.as_deref().is_some_and(Detect::annotates);
        let (geo, stage, lookups) = (&mut self.geo, &mut self.stage, &mut self.lookups);
        let raw_policy = &self.raw;
        // The raw rest of a file comes in pieces: one scrubber runs over all of them.
        let mut unsplit_scrub = scrub::Scrubber::new(&raw_policy.keys);
        let mut next_index = 0u64;
        let mut stripped = Vec::new();
        let report = split(&mut |item| match item {
            Item::Event { raw, mut head } => {
                let index = next_index;
                next_index += 1;
                if route.duplicate(&head) {
                    return;
                }
                // An event that may already hold `geo`, a lookup's field, `detections` or
                // `trailhoseArrivalTime` loses it: trailhose's value replaces it (see
                // `enrich::members`).
                let owners = Owners {
                    geo: geo.is_some(),
                    lookups: lookups.as_ref(),
                    detections: annotates,
                    // Always: even where nothing is routed by arrival, an event's own would
                    // pass as trailhose's flag (and date an OCSF record).
                    arrival: true,
                };
                let raw = match head.other_members && owners.any() {
                    true => {
                        // None of them is left: `Route::event` need not look again.
                        head.other_members = false;
                        replace_owned(raw, owners, &mut stripped)
                    }
                    false => raw,
                };
                let fragment = geo
                    .as_mut()
                    .and_then(|g| g.lookup(head.source_ip.as_deref()));
                // Geo's and the lookups' fragments: on the stack, no allocation per event,
                // unless there are more than `inline` holds.
                let mut inline: [&[u8]; 8] = [&[]; 8];
                let spilled: Vec<&[u8]>;
                let additions = match lookups {
                    None => fragment.as_slice(),
                    Some(l) => {
                        l.run(raw, &head);
                        let mut all = fragment.into_iter().chain(l.fragments());
                        let mut n = 0;
                        for (slot, f) in inline.iter_mut().zip(all.by_ref()) {
                            *slot = f;
                            n += 1;
                        }
                        match all.next() {
                            None => inline.get(..n).unwrap_or_default(),
                            Some(more) => {
                                spilled = inline.iter().copied().chain([more]).chain(all).collect();
                                spilled.as_slice()
                            }
                        }
                    }
                };
                match stage {
                    None => route.event(raw, additions, &head, true, out),
                    Some(st) => {
                        let country = fragment.and_then(geo::country_code);
                        st.pending.push(raw, additions, &head, country, index);
                        if st.pending.len() >= st.batch_events {
                            st.flush(&mut route, source, out);
                        }
                    }
                }
            }
            Item::NotAnObject { index, raw } => {
                next_index = index + 1;
                metrics::emit(RecordRejected {
                    source,
                    index,
                    reason: "not_an_object",
                });
                let detail =
                    "a Records entry is not a JSON object; the file's other entries were kept";
                let scrubbed = scrub::Scrubber::scrub(&raw_policy.keys, raw);
                let record = match raw_policy.keep {
                    true => serde_json::from_slice::<&RawValue>(&scrubbed).ok(),
                    false => None,
                };
                route.split_error(
                    out,
                    ErrorRecord {
                        index: Some(index),
                        record,
                        ..ErrorRecord::new(source, "split", "not_an_object", detail)
                    },
                );
            }
            Item::Skipped(sk) => {
                next_index = sk.index + 1;
                let reason = sk.reason.as_str();
                metrics::emit(RecordRejected {
                    source,
                    index: sk.index,
                    reason,
                });
                let detail = format!("{}; the file's other entries were kept", sk.detail);
                // A small malformed element is kept whole as text; the limit keeps the rest.
                let rec = ErrorRecord {
                    index: Some(sk.index),
                    offset: Some(sk.offset),
                    size: Some(sk.size),
                    event_id: sk.event_id.as_deref(),
                    ..ErrorRecord::new(source, "split", reason, &detail)
                };
                if !raw_policy.keep {
                    return route.split_error(out, rec);
                }
                let scrubbed = scrub::Scrubber::scrub(&raw_policy.keys, sk.raw);
                route.split_error(out, rec.with_raw(&scrubbed));
            }
            Item::Unsplit { offset, raw } => {
                let detail = "bytes after a point where the Records entries could not be told apart, kept raw";
                let rec = ErrorRecord {
                    offset: Some(offset),
                    size: Some(raw.len() as u64),
                    ..ErrorRecord::new(source, "split", "unsplittable", detail)
                };
                if !raw_policy.keep {
                    return route.split_error(out, rec);
                }
                let scrubbed = unsplit_scrub.feed(raw);
                route.split_error(out, rec.with_raw(&scrubbed));
            }
        });
        if let Some(st) = stage {
            st.flush(&mut route, source, out);
        }
        let (fallback, retry) = (route.fallback, route.retry);
        metrics::emit(EventsDeduplicated {
            events: route.duplicates,
        });
        self.tally.error_records += route.error_records;
        if let Some(g) = self.geo.as_mut() {
            let s = g.take_stats();
            metrics::emit(GeoLookups {
                found: s.found,
                not_found: s.not_found,
                non_address: s.non_address,
                cache_hits: s.cache_hits,
            });
        }
        if let Some(l) = self.lookups.as_mut() {
            l.report();
        }
        metrics::emit(FallbackPartitioned { events: fallback });
        self.lag.flush();
        self.tally.events_in += report.events;
        if retry {
            // A module with on_failure = "retry" failed: its events were not written, so the
            // file must come again (what was written may repeat: at-least-once).
            self.tally.failed_files += 1;
            return FileOutcome::Retry;
        }
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

    /// Switches to reloaded enrichment tables between files.
    fn follow_tables(&mut self) {
        let Some(live) = &self.live_tables else {
            return;
        };
        if live.generation() == self.tables_generation {
            return;
        }
        let (generation, lookups) = live.current();
        self.tables_generation = generation;
        if let Some(st) = self.stage.as_mut() {
            st.chain.set_tables(Some(lookups.clone()));
        }
        if lookups.is_empty() {
            self.lookups = None;
            return;
        }
        match self.lookups.as_mut() {
            Some(l) => l.switch(lookups),
            None => self.lookups = Some(LookupStage::new(lookups)),
        }
    }

    /// Switches to reloaded GeoIP databases between files (the cache goes with the old ones).
    fn follow_geo(&mut self) {
        if self.live_geo.generation() == self.geo_generation {
            return;
        }
        let (generation, db) = self.live_geo.current();
        self.geo = (!db.is_empty()).then(|| GeoEnricher::new(db, self.geo_cache_entries));
        self.geo_generation = generation;
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
            reason: reason.as_str(),
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

    fn error_record(&mut self, out: &mut impl FnMut(Sealed), rec: ErrorRecord<'_>) {
        self.tally.error_records += 1;
        let hold = self.hold.as_ref();
        write_error_record(&mut self.errors, &self.error_prefix, hold, out, rec);
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
    pub fn next_deadline(&mut self) -> Option<Instant> {
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

    /// Seals buffers early while the process-wide budget is full (other workers may have
    /// filled it); called when idle.
    pub fn relieve(&mut self, out: &mut impl FnMut(Sealed)) {
        self.events.relieve(out);
        self.errors.relieve(out);
    }

    /// After a panic while processing `source`: fails its hold (so it is delivered again),
    /// counts it, and rebuilds the per-file state, which may be half-updated. The buffers
    /// stay: they hold only whole records (see `Batcher::append`), whose own notifications
    /// are still owed them. Records of the failed file that were buffered are written too,
    /// and repeated when it is delivered again (at-least-once).
    /// `source` is None when the panic came between files (sealing): no file is blamed.
    pub fn recover(&mut self, source: Option<&str>, message: &str, out: &mut impl FnMut(Sealed)) {
        let redelivered = self.hold.take().is_some();
        metrics::emit(ThreadPanicked {
            thread: "worker",
            source: source.unwrap_or(""),
            message,
        });
        crate::testhook::rebuild(source.unwrap_or(""));
        self.geo = None;
        self.geo_generation = u64::MAX;
        self.follow_geo();
        self.key.clear();
        self.lag = LagRecorder::new();
        if let Some(st) = self.stage.as_mut() {
            st.pending.clear();
            st.rejects.clear();
            if let Some(t) = &self.transforms {
                st.chain = t.chain();
            }
        }
        // The new chain reads the tables in use.
        self.tables_generation = u64::MAX;
        self.follow_tables();
        let Some(source) = source else {
            self.report_buffers();
            return;
        };
        self.tally.failed_files += 1;
        // Nothing will deliver a local file again: say where it is, in the error output.
        if !redelivered {
            let detail = format!(
                "trailhose panicked while processing this file ({message}); events buffered before the panic were kept"
            );
            self.error_record(out, ErrorRecord::new(source, "worker", "panic", &detail));
        }
        self.report_buffers();
    }

    /// Seals everything (end of input or shutdown).
    pub fn seal_all(&mut self, out: &mut impl FnMut(Sealed)) {
        self.events.seal_all().into_iter().for_each(&mut *out);
        self.errors.seal_all().into_iter().for_each(&mut *out);
        self.report_buffers();
    }
}

/// Buffers an error record under `errors/year=/month=/day=/` (the time it was seen).
fn write_error_record(
    errors: &mut Batcher,
    error_prefix: &str,
    hold: Option<&Hold>,
    out: &mut impl FnMut(Sealed),
    mut rec: ErrorRecord<'_>,
) {
    let now = Utc::now();
    rec.time = now.rfc3339();
    let partition = format!(
        "{}year={:04}/month={:02}/day={:02}/",
        error_prefix, now.year, now.month, now.day
    );
    let write = |buf: &mut Vec<u8>| {
        // Serializing plain strings and valid raw JSON into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *buf, &rec);
        buf.push(b'\n');
    };
    errors.append(&partition, hold, write, out);
}

/// Where events and rejects of the file being processed go: the worker's buffers, borrowed
/// for the length of one file.
struct Route<'w> {
    partitioner: &'w Partitioner,
    key: &'w mut String,
    events: &'w mut Batcher,
    errors: &'w mut Batcher,
    error_prefix: &'w str,
    hold: Option<&'w Hold>,
    lag: &'w LagRecorder,
    now: i64,
    fallback: u64,
    error_records: u64,
    dedup: Option<&'w Arc<Dedup>>,
    ocsf: Option<&'w OcsfConfig>,
    duplicates: u64,
    /// A module with `on_failure = "retry"` failed on this file.
    retry: bool,
    detect: Option<&'w Detect>,
    /// The file being processed.
    source: &'w str,
    /// An event without the members trailhose is about to write (`Route::event`).
    stripped: Vec<u8>,
}

impl Route<'_> {
    /// True (and counted) when `[dedup]` has this eventID from an acknowledged unit, or this
    /// unit (any file of its message, any job of its batch) carried it already: the event is dropped before enrichment and transforms, so events
    /// a module splits out of one event all stay.
    fn duplicate(&mut self, head: &Head<'_>) -> bool {
        let seen = match (self.dedup, head.event_id.as_deref()) {
            // Without a unit to acknowledge (local files), remembered at once.
            (Some(d), Some(id)) if self.hold.is_none() => d.seen(id, Instant::now()),
            // Remembered once the unit is durable; a second copy anywhere in the unit is dropped.
            (Some(d), Some(id)) => {
                let h = Dedup::hash(id);
                d.contains(h, Instant::now())
                    || self.hold.is_some_and(|hold| !hold.first_copy(d, h))
            }
            _ => false,
        };
        self.duplicates += u64::from(seen);
        seen
    }

    /// Buffers one event under its partition: `raw` with `additions` spliced in.
    /// Routes, inspects and buffers one event. `exact_head` says that `head` was read from
    /// `raw` itself (not a module's output, whose head may inherit fields the event lacks), so
    /// that the Kinesis output's partition key may be taken from it.
    fn event(
        &mut self,
        raw: &[u8],
        additions: &[&[u8]],
        head: &Head<'_>,
        exact_head: bool,
        out: &mut impl FnMut(Sealed),
    ) {
        let routed = self
            .partitioner
            .key_for(head, Utc::from_unix(self.now), self.key);
        self.fallback += u64::from(routed.fallback);
        if let Some(t) = routed.time {
            self.lag.observe((self.now - t.to_unix()) as f64);
        }
        // A module's output may hold `detections` or `trailhoseArrivalTime`, which trailhose
        // writes below: its own goes first (events from the split had theirs removed there).
        let annotates = self.detect.is_some_and(Detect::annotates);
        let mut stripped = std::mem::take(&mut self.stripped);
        let raw = match head.other_members && (annotates || routed.arrival) {
            true => {
                let owners = Owners {
                    geo: false,
                    lookups: None,
                    detections: annotates,
                    arrival: routed.arrival,
                };
                replace_owned(raw, owners, &mut stripped)
            }
            false => raw,
        };
        // Detections see the event as written, before the annotations they add.
        let detections = self.detect.and_then(|d| {
            d.inspect(&Seen {
                raw,
                additions,
                head,
                exact_head,
                partition: self.key.as_str(),
                source: self.source,
                hold: self.hold,
            })
        });
        // Rare: an event partitioned by arrival says so, so that queries can tell it apart.
        let (field, mut flagged);
        let additions = if routed.arrival || detections.is_some() {
            flagged = additions.to_vec();
            if routed.arrival {
                field = arrival_field(self.now);
                flagged.push(field.as_slice());
            }
            if let Some(d) = &detections {
                flagged.push(d.as_slice());
            }
            flagged.as_slice()
        } else {
            additions
        };
        let (ocsf, now) = (self.ocsf, self.now);
        // The Kinesis output's key, when the event's head holds it (as written: not OCSF).
        let key = match (ocsf, self.events.key_field()) {
            (None, Some(field)) if exact_head => head_field(head, field),
            _ => None,
        };
        self.events.append_event(
            self.key,
            self.hold,
            key,
            |buf| match ocsf {
                Some(cfg) => crate::sink::ocsf::encode_event(buf, raw, additions, now, cfg),
                None => encode_event(buf, raw, additions),
            },
            out,
        );
        self.stripped = stripped;
    }

    /// Buffers an error record for one element of the file being split.
    fn split_error(&mut self, out: &mut impl FnMut(Sealed), rec: ErrorRecord<'_>) {
        self.error_records += 1;
        write_error_record(self.errors, self.error_prefix, self.hold, out, rec);
    }

    /// Buffers an event a transform module refused, with the module and the reason.
    fn reject(&mut self, source: &str, r: &Reject, out: &mut impl FnMut(Sealed)) {
        if r.on_failure == OnFailure::Retry {
            self.retry = true;
            // Remembered at the split, but not written: it must pass dedup when it comes again.
            if let (Some(d), Some(id)) = (self.dedup, r.event_id.as_deref()) {
                d.forget(id);
            }
            return;
        }
        self.error_records += 1;
        let rec = ErrorRecord {
            module: Some(&r.module),
            event_id: r.event_id.as_deref(),
            index: Some(r.index),
            record: serde_json::from_slice::<&RawValue>(&r.event).ok(),
            ..ErrorRecord::new(source, "transform", r.reason, &r.detail)
        };
        write_error_record(self.errors, self.error_prefix, self.hold, out, rec);
    }
}

/// The value of a top-level field that `Head` reads, by its CloudTrail name.
fn head_field<'h>(head: &'h Head<'_>, field: &str) -> Option<&'h str> {
    let value = match field {
        "eventID" => &head.event_id,
        "eventSource" => &head.event_source,
        "eventName" => &head.event_name,
        "awsRegion" => &head.region,
        "recipientAccountId" => &head.account,
        "sourceIPAddress" => &head.source_ip,
        "eventType" => &head.event_type,
        "eventTime" => &head.event_time,
        _ => return None,
    };
    value.as_deref()
}

/// The top-level members trailhose writes into an event: `geo` (with a GeoIP stage), each
/// lookup's field, `detections` (when rules annotate) and `trailhoseArrivalTime` (when events
/// may be partitioned by arrival). An event's own member of such a name is trailhose's to
/// replace, whether or not trailhose writes one into this event: leaving it would write the key
/// twice, or pass a forged (or stale) value off as trailhose's.
#[derive(Clone, Copy)]
struct Owners<'a> {
    geo: bool,
    lookups: Option<&'a LookupStage>,
    detections: bool,
    arrival: bool,
}

impl Owners<'_> {
    fn any(&self) -> bool {
        self.geo || self.lookups.is_some() || self.detections || self.arrival
    }

    /// The owned name `key` is, ignoring ASCII case (readers fold it); the metric carries the
    /// owned name, so its label set stays the configured one whatever case the input used.
    fn owner(&self, key: &str) -> Option<&str> {
        let named =
            |on: bool, name: &'static str| (on && key.eq_ignore_ascii_case(name)).then_some(name);
        named(self.geo, "geo")
            .or_else(|| named(self.detections, "detections"))
            .or_else(|| named(self.arrival, crate::sink::partition::ARRIVAL_FIELD))
            .or_else(|| self.lookups.and_then(|l| l.added_as(key)))
    }
}

/// `raw` without the top-level members `owners` names, copied into `stripped`; `raw` itself
/// when it has none. Each removal is counted.
fn replace_owned<'r>(raw: &'r [u8], owners: Owners<'_>, stripped: &'r mut Vec<u8>) -> &'r [u8] {
    match members::without_owned(raw, |k| owners.owner(k).is_some(), stripped) {
        Some(removed) => {
            for name in &removed {
                if let Some(field) = owners.owner(name) {
                    metrics::emit(MemberReplaced { field });
                }
            }
            stripped
        }
        None => raw,
    }
}

/// `"trailhoseArrivalTime":"<rfc3339>"`, spliced into an event partitioned by arrival.
fn arrival_field(now: i64) -> Vec<u8> {
    format!(
        "\"{}\":\"{}\"",
        crate::sink::partition::ARRIVAL_FIELD,
        Utc::from_unix(now).rfc3339()
    )
    .into_bytes()
}

/// A worker's transform modules and the batch of events waiting for them.
struct TransformStage {
    chain: Chain,
    pending: Batch,
    rejects: Vec<Reject>,
    batch_events: usize,
}

impl TransformStage {
    /// Runs the pending events through the modules and routes what comes out.
    fn flush(&mut self, route: &mut Route<'_>, source: &str, out: &mut impl FnMut(Sealed)) {
        if self.pending.is_empty() {
            return;
        }
        self.chain.run(source, &mut self.pending, &mut self.rejects);
        for v in self.pending.items() {
            route.event(v.event, &[], &v.head(), false, out);
        }
        for r in self.rejects.drain(..) {
            route.reject(source, &r, out);
        }
        self.pending.clear();
    }
}

/// Counts the stored bytes read, and stops at `pipeline.max_file_bytes` for sources whose
/// size was not declared (or was declared wrongly).
struct CountingReader<'a, R> {
    inner: R,
    n: &'a Cell<u64>,
    limit: u64,
}

impl<R: Read> Read for CountingReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        let total = self.n.get() + n as u64;
        self.n.set(total);
        if total > self.limit {
            let limit = self.limit;
            return Err(std::io::Error::other(fetch::StoredLimit { limit }));
        }
        Ok(n)
    }
}

/// Builds the configured output store.
pub async fn open_store(cfg: &Config) -> Result<Store, PipelineError> {
    Ok(match cfg.output_url()? {
        OutputUrl::Local(root) => Store::Local { root },
        OutputUrl::S3 { bucket, prefix } => {
            let s3 = &cfg.output.s3;
            let client = match cfg.output_role()? {
                None => {
                    s3_client(
                        s3.region.as_deref(),
                        s3.endpoint_url.as_deref(),
                        s3.force_path_style,
                    )
                    .await
                }
                // The role is the output's alone: sources, lookups and detections keep the
                // process's own credentials.
                Some(role) => {
                    let region = s3.region.as_deref();
                    let shared = crate::aws::config(region, s3.endpoint_url.as_deref()).await;
                    let shared = crate::aws::assume(shared, region, &role).await;
                    s3_client_from(&shared, s3.force_path_style)
                }
            };
            // A stalled PUT would hold its upload slot (and its batch's acknowledgements)
            // for ever: each attempt is bounded, then retried.
            let attempt = Duration::from_secs(s3.attempt_timeout_secs);
            let conf = client
                .config()
                .to_builder()
                .timeout_config(crate::aws::timeouts(attempt))
                .build();
            let client = aws_sdk_s3::Client::from_conf(conf);
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
                    attempt_timeout: attempt,
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
    let shared = crate::aws::config(region, endpoint).await;
    s3_client_from(&shared, path_style)
}

fn s3_client_from(shared: &aws_config::SdkConfig, path_style: bool) -> aws_sdk_s3::Client {
    let conf = aws_sdk_s3::config::Builder::from(shared)
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
pub fn open_geo(cfg: &Config) -> Result<Arc<LiveGeo>, PipelineError> {
    let live = LiveGeo::open(cfg.geoip.city_db.clone(), cfg.geoip.asn_db.clone())?;
    if live.current().1.is_empty() {
        metrics::emit(GeoDisabled);
    }
    if cfg.geoip.reload_secs > 0 {
        live.watch(Duration::from_secs(cfg.geoip.reload_secs));
    }
    Ok(live)
}

/// The `process` job: local delivery files in, objects out.
pub async fn process(cfg: &Config, inputs: &[PathBuf]) -> Result<Summary, PipelineError> {
    let started = Instant::now();
    cfg.validate()?;
    let files = local::list_inputs(inputs)?;
    crate::progress::set_total(crate::progress::Total {
        files: Some(files.len() as u64),
        // One stat per input: only for a terminal that shows the ETA.
        bytes: crate::progress::drawn().then(|| {
            files
                .iter()
                .filter_map(|f| f.metadata().ok())
                .map(|m| m.len())
                .sum()
        }),
    });

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

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    #[test]
    fn the_stored_limit_while_reading_is_file_too_large_through_gzip_too() {
        // A body with no (or a wrong) declared size: the limit is found while reading, under
        // the gzip decoder, and must stay `file_too_large` (acknowledged), not become a read
        // or gzip error (retried or misreported).
        let plain: Vec<u8> = (0..400_000u32)
            .flat_map(|i| {
                format!("{{\"eventID\":\"{}\"}},", i.wrapping_mul(2_654_435_761)).into_bytes()
            })
            .collect();
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(&plain).unwrap();
        let gz = enc.finish().unwrap();
        for data in [&gz[..], &plain[..]] {
            let n = std::cell::Cell::new(0);
            let limit = data.len() as u64 / 2;
            let reader = super::CountingReader {
                inner: data,
                n: &n,
                limit,
            };
            let err = match crate::fetch::decode(reader) {
                Ok((_, mut decoded)) => decoded.read_to_end(&mut Vec::new()).unwrap_err(),
                Err(e) => e,
            };
            let reason = crate::cloudtrail::read_error(&err).reason;
            assert_eq!(reason, crate::cloudtrail::FileErrorReason::FileTooLarge);
        }
    }

    #[test]
    fn base64_matches_rfc_4648() {
        for (plain, enc) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(super::base64(plain.as_bytes()), enc);
        }
        assert_eq!(super::base64(&[0xff, 0xfe, 0x00]), "//4A");
    }
}
