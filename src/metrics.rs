//! Every metric and every warn/error log line is emitted here, through one typed event per
//! occurrence (Vector's `internal_events` pattern): the catalogue of metric names lives in this
//! file only, so docs and dashboards can be checked against it, and call sites stay one line.

use std::sync::LazyLock;
use std::time::Duration;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};

mod correlate;
mod ocsf;
mod tables;
mod upload;
pub use correlate::{
    CorrelationBreakerOpened, CorrelationCountersReady, CorrelationFailed, CorrelationSkipped,
    CorrelationStatesEvicted, CorrelationUpdated, SkipReason, UpdateOutcome,
};
pub use ocsf::OcsfEventUnparsed;
pub use tables::{MemberReplaced, TableLoaded, TableLookups, TableReloadFailed};
pub use upload::{MultipartAbandoned, MultipartAbortFailed};

/// An occurrence worth counting and, where it matters, logging.
pub trait InternalEvent {
    fn emit(self);
}

pub fn emit(event: impl InternalEvent) {
    event.emit();
}

pub struct Metrics {
    registry: Registry,
    files: IntCounterVec,
    events_in: IntCounter,
    events_out: IntCounter,
    input_bytes: IntCounterVec,
    output_bytes: IntCounter,
    errors: IntCounterVec,
    records_rejected: IntCounterVec,
    fallback_partition: IntCounter,
    events_deduplicated: IntCounter,
    geo_lookups: IntCounterVec,
    geo_cache_hits: IntCounter,
    geo_reloads: IntCounterVec,
    objects: IntCounterVec,
    put_seconds: HistogramVec,
    file_seconds: Histogram,
    s3_request_seconds: HistogramVec,
    notifications: IntCounterVec,
    messages_deleted: IntCounter,
    messages_refused: IntCounterVec,
    messages_in_flight: IntGauge,
    visibility_extensions: IntCounter,
    lag_seconds: Histogram,
    sqs_message_age: Histogram,
    sqs_ack_seconds: Histogram,
    open_buffers: IntGauge,
    buffered_bytes: IntGauge,
    budget_seals: IntCounterVec,
    panics: IntCounterVec,
    workers_lost: IntGauge,
    transform_events: IntCounterVec,
    transform_failures: IntCounterVec,
    transform_seconds: HistogramVec,
    transform_fuel: IntCounterVec,
    transform_counters: IntCounterVec,
    transform_logs: IntCounterVec,
    transform_reloads: IntCounterVec,
}

fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("valid metric name");
    r.register(Box::new(c.clone()))
        .expect("metric registered once");
    c
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric name");
    r.register(Box::new(c.clone()))
        .expect("metric registered once");
    c
}

/// The catalogue. Names follow Prometheus conventions: `trailhose_` prefix, `_total` counters,
/// `_seconds` histograms, base units.
pub static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let r = Registry::new();
    let put_seconds = HistogramVec::new(
        HistogramOpts::new(
            "trailhose_output_put_seconds",
            "Time to write one output object.",
        )
        .buckets(vec![
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
        ]),
        &["kind"],
    )
    .expect("valid metric");
    r.register(Box::new(put_seconds.clone()))
        .expect("metric registered once");
    let file_seconds = Histogram::with_opts(
        HistogramOpts::new(
            "trailhose_file_process_seconds",
            "Time to read, split, enrich and buffer one input file.",
        )
        .buckets(vec![
            0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0,
        ]),
    )
    .expect("valid metric");
    r.register(Box::new(file_seconds.clone()))
        .expect("metric registered once");
    let s3_request_seconds = HistogramVec::new(
        HistogramOpts::new(
            "trailhose_s3_request_seconds",
            "S3 request latency by operation and outcome.",
        )
        .buckets(vec![
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ]),
        &["operation", "outcome"],
    )
    .expect("valid metric");
    r.register(Box::new(s3_request_seconds.clone()))
        .expect("metric registered once");
    let lag_seconds = Histogram::with_opts(
        HistogramOpts::new(
            "trailhose_end_to_end_lag_seconds",
            "Age of events (now - eventTime) when their file was processed.",
        )
        .buckets(vec![
            30.0, 60.0, 120.0, 300.0, 600.0, 900.0, 1800.0, 3600.0, 7200.0, 21600.0, 86400.0,
        ]),
    )
    .expect("valid metric");
    r.register(Box::new(lag_seconds.clone()))
        .expect("metric registered once");
    let sqs_message_age = Histogram::with_opts(
        HistogramOpts::new(
            "trailhose_sqs_message_age_seconds",
            "Time a message waited in the queue when it was received (now - SentTimestamp).",
        )
        .buckets(vec![
            1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 21600.0, 86400.0,
        ]),
    )
    .expect("valid metric");
    r.register(Box::new(sqs_message_age.clone()))
        .expect("metric registered once");
    let sqs_ack_seconds = Histogram::with_opts(
        HistogramOpts::new(
            "trailhose_sqs_ack_seconds",
            "Time from receiving an SQS message to deleting it (about batch.max_age_secs).",
        )
        .buckets(vec![
            0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 400.0, 600.0, 1800.0, 3600.0,
        ]),
    )
    .expect("valid metric");
    r.register(Box::new(sqs_ack_seconds.clone()))
        .expect("metric registered once");
    let messages_in_flight = IntGauge::new(
        "trailhose_sqs_messages_in_flight",
        "SQS messages received and not yet acknowledged (the ledger's entries).",
    )
    .expect("valid metric");
    r.register(Box::new(messages_in_flight.clone()))
        .expect("metric registered once");
    let open_buffers = IntGauge::new(
        "trailhose_open_buffers",
        "Partition buffers open across workers.",
    )
    .expect("valid metric");
    r.register(Box::new(open_buffers.clone()))
        .expect("metric registered once");
    let buffered_bytes = IntGauge::new(
        "trailhose_buffered_bytes",
        "Uncompressed bytes held in open buffers across workers.",
    )
    .expect("valid metric");
    r.register(Box::new(buffered_bytes.clone()))
        .expect("metric registered once");
    let transform_seconds = HistogramVec::new(
        HistogramOpts::new(
            "trailhose_transform_batch_seconds",
            "Time for one transform module to handle one batch, host overhead included.",
        )
        .buckets(vec![
            0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
        ]),
        &["module"],
    )
    .expect("valid metric");
    r.register(Box::new(transform_seconds.clone()))
        .expect("metric registered once");
    let workers_lost = IntGauge::new(
        "trailhose_workers_lost",
        "Worker threads that panicked and could not be rebuilt; /healthz fails while it is above 0.",
    )
    .expect("valid metric");
    r.register(Box::new(workers_lost.clone()))
        .expect("metric registered once");
    Metrics {
        workers_lost,
        budget_seals: {
            let c = counter_vec(
                &r,
                "trailhose_buffers_sealed_early_total",
                "Buffers sealed before their limits, by reason: budget (batch.max_buffered_bytes), max_open_partitions (batch.max_open_partitions) or ledger (a source's unacknowledged cap).",
                &["reason"],
            );
            // Every reason from the start, so the first seal shows in increase().
            for reason in SealReason::ALL {
                c.with_label_values(&[reason.as_str()]);
            }
            c
        },
        panics: counter_vec(
            &r,
            "trailhose_panics_total",
            "Panics caught on worker and compression threads (the unit being processed failed, \
             it is delivered again, and the thread went on with rebuilt state) and while \
             classifying a Kinesis record (thread=classify: the record went to the error output).",
            &["thread"],
        ),
        transform_seconds,
        transform_events: counter_vec(
            &r,
            "trailhose_transform_events_total",
            "Events out of each transform module call, by outcome (kept, annotated, replaced, \
             split (the events split), split_into (the events they became), dropped, failed).",
            &["module", "outcome"],
        ),
        transform_failures: counter_vec(
            &r,
            "trailhose_transform_failures_total",
            "Transform module calls that failed (trap, limit, malformed output): their batch went \
             to the error output and the instance was rebuilt.",
            &["module", "reason"],
        ),
        transform_fuel: counter_vec(
            &r,
            "trailhose_transform_fuel_consumed_total",
            "Fuel (about one unit per wasm instruction) used by metered transform modules.",
            &["module"],
        ),
        transform_counters: counter_vec(
            &r,
            "trailhose_transform_counter_total",
            "Counters incremented by transform modules through the host's count import.",
            &["module", "name"],
        ),
        transform_logs: counter_vec(
            &r,
            "trailhose_transform_log_lines_total",
            "Log lines transform modules emitted through the host's log import.",
            &["module", "level"],
        ),
        transform_reloads: counter_vec(
            &r,
            "trailhose_transform_reloads_total",
            "Transform module reloads after their file changed or SIGHUP, by result.",
            &["module", "result"],
        ),
        open_buffers,
        buffered_bytes,
        s3_request_seconds,
        lag_seconds,
        sqs_message_age,
        sqs_ack_seconds,
        messages_in_flight,
        notifications: counter_vec(
            &r,
            "trailhose_notifications_total",
            "Notifications received, by shape and result (files, ignored, refused, garbage).",
            &["shape", "result"],
        ),
        messages_deleted: counter(
            &r,
            "trailhose_sqs_messages_deleted_total",
            "SQS messages deleted after all their records were written.",
        ),
        messages_refused: counter_vec(
            &r,
            "trailhose_sqs_messages_refused_total",
            "SQS messages left for the queue's redrive policy (DLQ), by reason.",
            &["reason"],
        ),
        visibility_extensions: counter(
            &r,
            "trailhose_sqs_visibility_extensions_total",
            "Visibility timeout extensions of in-flight messages.",
        ),
        files: counter_vec(
            &r,
            "trailhose_files_total",
            "Input files by outcome (ok, digest_skipped, error).",
            &["outcome"],
        ),
        events_in: counter(
            &r,
            "trailhose_events_in_total",
            "Events split from input files.",
        ),
        events_out: counter(
            &r,
            "trailhose_events_out_total",
            "Events written to output objects.",
        ),
        input_bytes: counter_vec(
            &r,
            "trailhose_input_bytes_total",
            "Input bytes read, as stored (compressed) and decoded.",
            &["form"],
        ),
        output_bytes: counter(
            &r,
            "trailhose_output_bytes_total",
            "Bytes written to output objects.",
        ),
        errors: counter_vec(
            &r,
            "trailhose_errors_total",
            "Errors by pipeline stage and reason.",
            &["stage", "reason"],
        ),
        records_rejected: counter_vec(
            &r,
            "trailhose_records_rejected_total",
            "Single Records entries sent to the error output while their file went on.",
            &["reason"],
        ),
        events_deduplicated: counter(
            &r,
            "trailhose_events_deduplicated_total",
            "Events dropped because their eventID was seen within the dedup window.",
        ),
        fallback_partition: counter(
            &r,
            "trailhose_events_fallback_partition_total",
            "Events written to the fallback partition because eventTime was missing or malformed.",
        ),
        geo_lookups: counter_vec(
            &r,
            "trailhose_geo_lookups_total",
            "Geo enrichment outcomes per event (found, not_found, non_address).",
            &["result"],
        ),
        geo_reloads: counter_vec(
            &r,
            "trailhose_geo_reloads_total",
            "GeoIP database reloads after a file changed or SIGHUP, by result.",
            &["result"],
        ),
        geo_cache_hits: counter(
            &r,
            "trailhose_geo_cache_hits_total",
            "Geo lookups answered from the cache.",
        ),
        objects: counter_vec(
            &r,
            "trailhose_objects_written_total",
            "Output objects written.",
            &["kind"],
        ),
        put_seconds,
        file_seconds,
        registry: r,
    }
});

impl Metrics {
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        // Unlabelled counters kept beside the catalogue exist from the first scrape, at 0, so
        // that an alert rule's `increase()` sees their first occurrence too.
        upload::register();
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metric families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

// ---- input -------------------------------------------------------------------------------

/// A file was split completely.
pub struct FileProcessed<'a> {
    pub source: &'a str,
    pub stored_bytes: u64,
    pub decoded_bytes: u64,
    pub events: u64,
    pub elapsed: Duration,
}

impl InternalEvent for FileProcessed<'_> {
    fn emit(self) {
        tracing::debug!(
            source = self.source,
            events = self.events,
            bytes = self.decoded_bytes,
            "file processed"
        );
        let m = &*METRICS;
        m.files.with_label_values(&["ok"]).inc();
        count_input(
            self.stored_bytes,
            self.decoded_bytes,
            self.events,
            self.elapsed,
        );
    }
}

fn count_input(stored: u64, decoded: u64, events: u64, elapsed: Duration) {
    let m = &*METRICS;
    m.events_in.inc_by(events);
    m.input_bytes.with_label_values(&["stored"]).inc_by(stored);
    m.input_bytes
        .with_label_values(&["decoded"])
        .inc_by(decoded);
    m.file_seconds.observe(elapsed.as_secs_f64());
}

/// A CloudTrail digest file: not events, skipped on purpose.
pub struct DigestSkipped<'a> {
    pub source: &'a str,
}

impl InternalEvent for DigestSkipped<'_> {
    fn emit(self) {
        tracing::debug!(source = self.source, "digest file skipped");
        METRICS.files.with_label_values(&["digest_skipped"]).inc();
    }
}

/// A file that could not be split (whole or in part); it goes to the error output.
pub struct FileFailed<'a> {
    pub source: &'a str,
    /// The file error's snake_case reason.
    pub reason: &'static str,
    pub detail: &'a str,
    pub events_kept: u64,
    pub stored_bytes: u64,
    pub decoded_bytes: u64,
    pub elapsed: Duration,
}

impl InternalEvent for FileFailed<'_> {
    fn emit(self) {
        tracing::warn!(
            source = self.source,
            reason = self.reason,
            events_kept = self.events_kept,
            "bad input file: {}",
            self.detail
        );
        let m = &*METRICS;
        m.files.with_label_values(&["error"]).inc();
        m.errors.with_label_values(&["split", self.reason]).inc();
        count_input(
            self.stored_bytes,
            self.decoded_bytes,
            self.events_kept,
            self.elapsed,
        );
    }
}

/// A file could not be read at all (missing, permissions).
pub struct FileUnreadable<'a> {
    pub source: &'a str,
    pub error: &'a dyn std::error::Error,
}

impl InternalEvent for FileUnreadable<'_> {
    fn emit(self) {
        tracing::warn!(
            source = self.source,
            "cannot read input file: {}",
            self.error
        );
        let m = &*METRICS;
        m.files.with_label_values(&["error"]).inc();
        m.errors.with_label_values(&["fetch", "read_error"]).inc();
    }
}

/// The source failed while a file was read: it will be tried again.
pub struct FileSourceFailed<'a> {
    pub source: &'a str,
    pub detail: &'a str,
}

impl InternalEvent for FileSourceFailed<'_> {
    fn emit(self) {
        tracing::warn!(
            source = self.source,
            "reading the input failed, it will be retried: {}",
            self.detail
        );
        let m = &*METRICS;
        m.files.with_label_values(&["retry"]).inc();
        m.errors.with_label_values(&["fetch", "read_error"]).inc();
    }
}

/// A file named `.gz` that is not gzip: read by its content, and noted in the error output.
pub struct NotGzipDespiteName<'a> {
    pub source: &'a str,
}

impl InternalEvent for NotGzipDespiteName<'_> {
    fn emit(self) {
        tracing::warn!(
            source = self.source,
            "file is named .gz but is not gzip; read as plain JSON"
        );
        METRICS
            .errors
            .with_label_values(&["fetch", "not_gzip"])
            .inc();
    }
}

/// One entry of a Records array was not an event object.
pub struct RecordRejected<'a> {
    pub source: &'a str,
    pub index: u64,
    pub reason: &'static str,
}

impl InternalEvent for RecordRejected<'_> {
    fn emit(self) {
        tracing::warn!(
            source = self.source,
            index = self.index,
            reason = self.reason,
            "Records entry rejected"
        );
        let m = &*METRICS;
        m.records_rejected.with_label_values(&[self.reason]).inc();
        m.errors.with_label_values(&["split", self.reason]).inc();
    }
}

/// Events of one file that went to the fallback partition.
pub struct FallbackPartitioned {
    pub events: u64,
}

impl InternalEvent for FallbackPartitioned {
    fn emit(self) {
        if self.events > 0 {
            METRICS.fallback_partition.inc_by(self.events);
        }
    }
}

/// Events of one file dropped as repeats of an eventID already seen.
pub struct EventsDeduplicated {
    pub events: u64,
}

impl InternalEvent for EventsDeduplicated {
    fn emit(self) {
        if self.events > 0 {
            METRICS.events_deduplicated.inc_by(self.events);
        }
    }
}

/// A sealed batch could not be converted to its output format (Parquet, CSV): it is not
/// written, so its notifications are delivered again.
pub struct ConvertFailed<'a> {
    pub error: &'a dyn std::error::Error,
}

impl InternalEvent for ConvertFailed<'_> {
    fn emit(self) {
        tracing::error!(
            "cannot convert a batch to the output format: {}",
            self.error
        );
        METRICS
            .errors
            .with_label_values(&["encode", "convert_failed"])
            .inc();
    }
}

/// Compressing a chunk failed: the batch holding it is not written (delivered again).
pub struct CompressFailed<'a> {
    pub error: &'a dyn std::error::Error,
}

impl InternalEvent for CompressFailed<'_> {
    fn emit(self) {
        tracing::error!("cannot compress a batch: {}", self.error);
        METRICS
            .errors
            .with_label_values(&["encode", "compress_failed"])
            .inc();
    }
}

/// A worker or compression thread panicked; the unit it was on failed and the thread went on.
pub struct ThreadPanicked<'a> {
    /// `worker` or `compress`.
    pub thread: &'static str,
    /// The file being processed, when known.
    pub source: &'a str,
    pub message: &'a str,
}

impl InternalEvent for ThreadPanicked<'_> {
    fn emit(self) {
        tracing::error!(
            thread = self.thread,
            source = self.source,
            "a {} thread panicked: {}; the unit it was on will be delivered again",
            self.thread,
            self.message
        );
        METRICS.panics.with_label_values(&[self.thread]).inc();
    }
}

/// A worker could not be rebuilt after a panic: one fewer worker, `/healthz` fails.
pub struct WorkerLost<'a> {
    pub message: &'a str,
}

impl InternalEvent for WorkerLost<'_> {
    fn emit(self) {
        tracing::error!(
            "a worker thread could not be rebuilt after a panic ({}); the process is unhealthy",
            self.message
        );
        METRICS.workers_lost.inc();
    }
}

/// Files finished, events split and stored bytes read so far: what the progress line shows.
pub fn progress() -> crate::progress::Done {
    let m = &*METRICS;
    let files = ["ok", "digest_skipped", "error"]
        .iter()
        .map(|o| m.files.with_label_values(&[o]).get())
        .sum();
    crate::progress::Done {
        files,
        events: m.events_in.get(),
        bytes: m.input_bytes.with_label_values(&["stored"]).get(),
    }
}

/// Whether every worker thread is running (`/healthz`).
/// A source stopped taking work for good (until the pod is restarted).
pub struct ReceivingStopped<'a> {
    pub reason: &'a str,
}

impl InternalEvent for ReceivingStopped<'_> {
    fn emit(self) {
        tracing::error!(
            "receiving stopped: {}; /readyz fails until the pod is restarted",
            self.reason
        );
    }
}

pub fn workers_healthy() -> bool {
    METRICS.workers_lost.get() == 0
}

/// Why buffers were sealed before their limits: the `reason` label of
/// `trailhose_buffers_sealed_early_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SealReason {
    /// `batch.max_buffered_bytes` was reached.
    Budget,
    /// `batch.max_open_partitions` was reached.
    MaxOpenPartitions,
    /// A source's ledger was full.
    Ledger,
}

impl SealReason {
    pub const ALL: [SealReason; 3] = [
        SealReason::Budget,
        SealReason::MaxOpenPartitions,
        SealReason::Ledger,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SealReason::Budget => "budget",
            SealReason::MaxOpenPartitions => "max_open_partitions",
            SealReason::Ledger => "ledger",
        }
    }
}

/// `batch.max_buffered_bytes` or `batch.max_open_partitions` was reached, or a ledger was full:
/// buffers were sealed early.
pub struct BuffersSealedEarly {
    pub buffers: u64,
    pub reason: SealReason,
}

impl InternalEvent for BuffersSealedEarly {
    fn emit(self) {
        if self.buffers > 0 {
            METRICS
                .budget_seals
                .with_label_values(&[self.reason.as_str()])
                .inc_by(self.buffers);
        }
    }
}

// ---- enrich ------------------------------------------------------------------------------

/// Geo enrichment is off: no database was configured.
pub struct GeoDisabled;

impl InternalEvent for GeoDisabled {
    fn emit(self) {
        tracing::warn!(
            "no GeoIP database configured (geoip.city_db / --geoip-db): events get no geo field"
        );
    }
}

/// The GeoIP databases were opened again after their files changed (or SIGHUP), or that failed
/// and the running databases were kept.
pub struct GeoReloaded<'a> {
    pub error: Option<&'a str>,
}

impl InternalEvent for GeoReloaded<'_> {
    fn emit(self) {
        let result = match self.error {
            None => {
                tracing::info!("GeoIP databases reloaded");
                "ok"
            }
            Some(e) => {
                tracing::error!("GeoIP reload failed; the running databases are kept: {e}");
                "error"
            }
        };
        METRICS.geo_reloads.with_label_values(&[result]).inc();
    }
}

/// Geo outcomes accumulated over a file.
pub struct GeoLookups {
    pub found: u64,
    pub not_found: u64,
    pub non_address: u64,
    pub cache_hits: u64,
}

impl InternalEvent for GeoLookups {
    fn emit(self) {
        let m = &*METRICS;
        let s = self;
        for (label, n) in [
            ("found", s.found),
            ("not_found", s.not_found),
            ("non_address", s.non_address),
        ] {
            if n > 0 {
                m.geo_lookups.with_label_values(&[label]).inc_by(n);
            }
        }
        if s.cache_hits > 0 {
            m.geo_cache_hits.inc_by(s.cache_hits);
        }
    }
}

// ---- sink --------------------------------------------------------------------------------

pub struct ObjectWritten<'a> {
    pub target: &'a str,
    /// "events" or "errors".
    pub kind: &'static str,
    pub records: u64,
    pub uncompressed_bytes: u64,
    pub bytes: u64,
    pub elapsed: Duration,
}

impl InternalEvent for ObjectWritten<'_> {
    fn emit(self) {
        tracing::debug!(
            target_object = self.target,
            kind = self.kind,
            records = self.records,
            uncompressed = self.uncompressed_bytes,
            bytes = self.bytes,
            "object written"
        );
        let m = &*METRICS;
        m.objects.with_label_values(&[self.kind]).inc();
        m.output_bytes.inc_by(self.bytes);
        m.put_seconds
            .with_label_values(&[self.kind])
            .observe(self.elapsed.as_secs_f64());
        if self.kind == "events" {
            m.events_out.inc_by(self.records);
        }
    }
}

pub struct ObjectWriteFailed<'a> {
    pub target: &'a str,
    pub error: &'a dyn std::error::Error,
}

impl InternalEvent for ObjectWriteFailed<'_> {
    fn emit(self) {
        tracing::error!(
            target_object = self.target,
            "cannot write output object: {}",
            self.error
        );
        METRICS
            .errors
            .with_label_values(&["write", "put_failed"])
            .inc();
    }
}

// ---- service ------------------------------------------------------------------------------

/// One S3 request made by trailhose itself (outside the output writer's own timing).
pub struct S3Request {
    pub operation: &'static str,
    pub ok: bool,
    pub elapsed: Duration,
}

impl InternalEvent for S3Request {
    fn emit(self) {
        METRICS
            .s3_request_seconds
            .with_label_values(&[self.operation, if self.ok { "ok" } else { "error" }])
            .observe(self.elapsed.as_secs_f64());
    }
}

/// A notification was understood: it names files, or is to be ignored.
pub struct NotificationReceived<'a> {
    pub shape: &'a str,
    pub result: &'a str,
}

impl InternalEvent for NotificationReceived<'_> {
    fn emit(self) {
        tracing::debug!(shape = self.shape, result = self.result, "notification");
        METRICS
            .notifications
            .with_label_values(&[self.shape, self.result])
            .inc();
    }
}

/// A message that is left for the queue's redrive policy: garbage, or a bucket outside the
/// allowlist. Its body is never logged (it may be large or sensitive).
pub struct MessageRefused<'a> {
    pub message_id: &'a str,
    pub reason: &'a str,
    pub detail: &'a str,
}

impl InternalEvent for MessageRefused<'_> {
    fn emit(self) {
        tracing::warn!(
            message_id = self.message_id,
            reason = self.reason,
            "notification refused, left for the queue's redrive policy: {}",
            self.detail
        );
        METRICS
            .messages_refused
            .with_label_values(&[self.reason])
            .inc();
        METRICS
            .notifications
            .with_label_values(&["unknown", "refused"])
            .inc();
    }
}

/// A file named by a notification could not be fetched; the message will come back.
pub struct FetchFailed<'a> {
    pub message_id: &'a str,
    pub error: &'a dyn std::error::Error,
}

impl InternalEvent for FetchFailed<'_> {
    fn emit(self) {
        tracing::warn!(
            message_id = self.message_id,
            "fetch failed, the message will be redelivered: {}",
            self.error
        );
        METRICS.errors.with_label_values(&["fetch", "s3_get"]).inc();
    }
}

/// A file to backfill could not be fetched; a re-run tries it again (it gets no marker).
pub struct FileFetchFailed<'a> {
    pub source: &'a str,
    pub error: &'a dyn std::error::Error,
}

impl InternalEvent for FileFetchFailed<'_> {
    fn emit(self) {
        tracing::warn!(source = self.source, "fetch failed: {}", self.error);
        METRICS.errors.with_label_values(&["fetch", "s3_get"]).inc();
    }
}

/// A backfill marker could not be written: the file will be processed again by a re-run.
pub struct MarkerWriteFailed<'a> {
    pub key: &'a str,
    pub error: &'a dyn std::error::Error,
}

impl InternalEvent for MarkerWriteFailed<'_> {
    fn emit(self) {
        tracing::warn!(
            marker = self.key,
            "cannot write backfill marker: {}",
            self.error
        );
        METRICS
            .errors
            .with_label_values(&["write", "marker_failed"])
            .inc();
    }
}

/// Every record of a message is written: the message was deleted, `latency` after it was
/// received.
pub struct MessageDeleted {
    pub latency: Duration,
}

impl InternalEvent for MessageDeleted {
    fn emit(self) {
        METRICS.messages_deleted.inc();
        METRICS.sqs_ack_seconds.observe(self.latency.as_secs_f64());
    }
}

/// A message waited so long that SQS's 12-hour visibility limit is near: its heartbeat stops
/// and it will be delivered again.
pub struct VisibilityLimitReached<'a> {
    pub message_id: &'a str,
}

impl InternalEvent for VisibilityLimitReached<'_> {
    fn emit(self) {
        tracing::warn!(
            message_id = self.message_id,
            "message near SQS's 12-hour visibility limit; it will be redelivered"
        );
        METRICS
            .errors
            .with_label_values(&["ack", "visibility_limit"])
            .inc();
    }
}

/// A message's work failed; it stays on the queue and comes back after its visibility timeout.
pub struct MessageAbandoned<'a> {
    pub message_id: &'a str,
}

impl InternalEvent for MessageAbandoned<'_> {
    fn emit(self) {
        tracing::warn!(
            message_id = self.message_id,
            "message not acknowledged; it will be redelivered"
        );
        METRICS
            .errors
            .with_label_values(&["ack", "abandoned"])
            .inc();
    }
}

/// An SQS call failed (receive, delete, visibility change).
pub struct SqsCallFailed<'a> {
    pub operation: &'static str,
    pub error: &'a str,
}

impl InternalEvent for SqsCallFailed<'_> {
    fn emit(self) {
        tracing::warn!(
            operation = self.operation,
            "SQS call failed: {}",
            self.error
        );
        METRICS
            .errors
            .with_label_values(&["sqs", self.operation])
            .inc();
    }
}

/// A message was received after waiting `age` in the queue: the backlog as trailhose sees it,
/// without CloudWatch's ApproximateAgeOfOldestMessage.
pub struct MessageReceived {
    pub age: Duration,
}

impl InternalEvent for MessageReceived {
    fn emit(self) {
        METRICS.sqs_message_age.observe(self.age.as_secs_f64());
    }
}

pub struct VisibilityExtended;

impl InternalEvent for VisibilityExtended {
    fn emit(self) {
        METRICS.visibility_extensions.inc();
    }
}

/// Messages in flight changed by `delta`.
pub struct MessagesInFlight(pub i64);

impl InternalEvent for MessagesInFlight {
    fn emit(self) {
        METRICS.messages_in_flight.add(self.0);
    }
}

/// A worker's open buffers changed (reported as deltas: gauges sum over workers).
pub struct BuffersChanged {
    pub open: i64,
    pub bytes: i64,
}

impl InternalEvent for BuffersChanged {
    fn emit(self) {
        if self.open != 0 {
            METRICS.open_buffers.add(self.open);
        }
        if self.bytes != 0 {
            METRICS.buffered_bytes.add(self.bytes);
        }
    }
}

// ---- transforms --------------------------------------------------------------------------

/// One transform module call's outcomes.
pub struct TransformBatch<'a> {
    pub module: &'a str,
    /// Events by outcome label (kept, annotated, replaced, split, split_into, dropped, failed).
    pub outcomes: [(&'static str, u64); 7],
    pub elapsed: Duration,
    pub fuel: u64,
    /// The policy the failed events got (`error_output`, `drop_body`, `retry`).
    pub on_failure: &'static str,
}

impl InternalEvent for TransformBatch<'_> {
    fn emit(self) {
        let failed: u64 = self
            .outcomes
            .iter()
            .filter(|(o, _)| *o == "failed")
            .map(|(_, n)| n)
            .sum();
        for (outcome, n) in self.outcomes {
            if n > 0 {
                METRICS
                    .transform_events
                    .with_label_values(&[self.module, outcome])
                    .inc_by(n);
            }
        }
        if failed > 0 {
            METRICS
                .errors
                .with_label_values(&["transform", "event_failed"])
                .inc_by(failed);
            tracing::warn!(
                module = self.module,
                events = failed,
                on_failure = self.on_failure,
                "transform module failed events or returned malformed ones; they were handled by its on_failure policy"
            );
        }
        METRICS
            .transform_seconds
            .with_label_values(&[self.module])
            .observe(self.elapsed.as_secs_f64());
        if self.fuel > 0 {
            METRICS
                .transform_fuel
                .with_label_values(&[self.module])
                .inc_by(self.fuel);
        }
    }
}

/// A transform call failed as a whole: its events went to the error output, the instance is
/// rebuilt for the next batch.
pub struct TransformFailed<'a> {
    pub module: &'a str,
    pub reason: &'a str,
    pub events: u64,
    pub detail: &'a str,
    /// Where the batch's events went (`error_output`, `drop_body`, `retry`).
    pub on_failure: &'a str,
}

impl InternalEvent for TransformFailed<'_> {
    fn emit(self) {
        let then = match self.on_failure {
            "retry" => "nothing of its batch was written and its file will come again",
            "drop_body" => "its batch went to the error output without the events",
            _ => "its batch went to the error output",
        };
        tracing::warn!(
            module = self.module,
            reason = self.reason,
            events = self.events,
            on_failure = self.on_failure,
            "transform module failed; {then}, and the instance will be rebuilt: {}",
            self.detail
        );
        METRICS
            .transform_failures
            .with_label_values(&[self.module, self.reason])
            .inc();
        METRICS
            .transform_events
            .with_label_values(&[self.module, "failed"])
            .inc_by(self.events);
        METRICS
            .errors
            .with_label_values(&["transform", self.reason])
            .inc();
    }
}

/// A module was reloaded (its file changed, or SIGHUP), or a reload failed and the running
/// version was kept.
pub struct TransformReloaded<'a> {
    pub module: &'a str,
    pub error: Option<&'a str>,
}

impl InternalEvent for TransformReloaded<'_> {
    fn emit(self) {
        let result = match self.error {
            None => {
                tracing::info!(module = self.module, "transform module reloaded");
                "ok"
            }
            Some(e) => {
                tracing::error!(
                    module = self.module,
                    "transform module reload failed; the running version is kept: {e}"
                );
                "error"
            }
        };
        METRICS
            .transform_reloads
            .with_label_values(&[self.module, result])
            .inc();
    }
}

/// The compiled-module cache could not be used; modules are compiled at each start.
pub struct TransformCacheUnusable<'a> {
    pub note: &'a str,
}

impl InternalEvent for TransformCacheUnusable<'_> {
    fn emit(self) {
        tracing::warn!("transform cache not used: {}", self.note);
        METRICS
            .errors
            .with_label_values(&["transform", "cache_unusable"])
            .inc();
    }
}

/// A log line from a module, through the host's `log` import.
pub struct GuestLogged<'a> {
    pub module: &'a str,
    pub level: tracing::Level,
    pub message: &'a str,
}

impl InternalEvent for GuestLogged<'_> {
    fn emit(self) {
        use tracing::Level;
        let (m, msg) = (self.module, self.message);
        let level = match self.level {
            Level::ERROR => {
                tracing::error!(module = m, "{msg}");
                "error"
            }
            Level::WARN => {
                tracing::warn!(module = m, "{msg}");
                "warn"
            }
            Level::INFO => {
                tracing::info!(module = m, "{msg}");
                "info"
            }
            _ => {
                tracing::debug!(module = m, "{msg}");
                "debug"
            }
        };
        METRICS.transform_logs.with_label_values(&[m, level]).inc();
    }
}

/// A module's own counter, through the host's `count` import.
pub struct GuestCounted<'a> {
    pub module: &'a str,
    pub name: &'a str,
    pub delta: u64,
}

impl InternalEvent for GuestCounted<'_> {
    fn emit(self) {
        METRICS
            .transform_counters
            .with_label_values(&[self.module, self.name])
            .inc_by(self.delta);
    }
}

/// End-to-end lag (now − eventTime) of each event, kept per worker thread without atomics
/// and published once per file by `flush`.
pub struct LagRecorder(prometheus::local::LocalHistogram);

impl LagRecorder {
    pub fn new() -> LagRecorder {
        LagRecorder(METRICS.lag_seconds.local())
    }

    pub fn observe(&self, seconds: f64) {
        self.0.observe(seconds);
    }

    pub fn flush(&self) {
        self.0.flush();
    }
}

impl Default for LagRecorder {
    fn default() -> Self {
        Self::new()
    }
}

// ---- Kinesis source ----------------------------------------------------------------------

/// The Kinesis source's metrics, registered in the one registry the first time one is used.
pub struct KinesisMetrics {
    millis_behind_latest: prometheus::IntGaugeVec,
    get_records: IntCounter,
    leases_held: IntGauge,
    lease_takeovers: IntCounterVec,
    checkpoint_age: prometheus::GaugeVec,
    records: IntCounterVec,
    sink_records: IntCounterVec,
    handoffs: IntCounterVec,
}

pub static KINESIS: LazyLock<KinesisMetrics> = LazyLock::new(|| {
    let r = METRICS.registry();
    let millis_behind_latest = prometheus::IntGaugeVec::new(
        Opts::new(
            "trailhose_kinesis_millis_behind_latest",
            "How far this worker's reader is behind the tip of each shard it holds (GetRecords MillisBehindLatest).",
        ),
        &["stream", "shard"],
    )
    .expect("valid metric");
    r.register(Box::new(millis_behind_latest.clone()))
        .expect("metric registered once");
    let leases_held = IntGauge::new(
        "trailhose_kinesis_leases_held",
        "Shard leases this worker holds.",
    )
    .expect("valid metric");
    r.register(Box::new(leases_held.clone()))
        .expect("metric registered once");
    let checkpoint_age = prometheus::GaugeVec::new(
        Opts::new(
            "trailhose_kinesis_checkpoint_age_seconds",
            "Time since each held shard's checkpoint last advanced, or since its reader was last caught up with nothing unwritten.",
        ),
        &["shard"],
    )
    .expect("valid metric");
    r.register(Box::new(checkpoint_age.clone()))
        .expect("metric registered once");
    let get_records = IntCounter::new(
        "trailhose_kinesis_get_records_total",
        "GetRecords calls answered, on every shard this worker read.",
    )
    .expect("valid metric");
    r.register(Box::new(get_records.clone()))
        .expect("metric registered once");
    KinesisMetrics {
        millis_behind_latest,
        get_records,
        leases_held,
        checkpoint_age,
        lease_takeovers: counter_vec(
            r,
            "trailhose_kinesis_lease_takeovers_total",
            "Shard leases taken by this worker, by how: free (new or released), expired (owner stopped renewing), handoff (rebalancing), adopted (already this worker's name).",
            &["how"],
        ),
        handoffs: counter_vec(
            r,
            "trailhose_kinesis_lease_handoffs_total",
            "Rebalancing handoffs by stage: requested (as the new owner), draining, handed_over, timed_out (as the old owner).",
            &["stage"],
        ),
        sink_records: counter_vec(
            r,
            "trailhose_kinesis_sink_records_total",
            "Events for the Kinesis output, by outcome: put, retried (failed entries put again), oversize (to the error output).",
            &["outcome"],
        ),
        records: counter_vec(
            r,
            "trailhose_kinesis_records_total",
            "Kinesis records read, by shape (cwl_data, cwl_control, notification, event, unrecognized).",
            &["shape"],
        ),
    }
});

/// Records read from a shard, by their recognised shape.
pub struct KinesisRecords<'a> {
    pub shape: &'a str,
    pub count: u64,
}

impl InternalEvent for KinesisRecords<'_> {
    fn emit(self) {
        KINESIS
            .records
            .with_label_values(&[self.shape])
            .inc_by(self.count);
    }
}

/// A Kinesis record that is none of the known shapes: it goes to the error output.
pub struct KinesisRecordUnrecognized<'a> {
    pub source: &'a str,
    pub reason: &'a str,
}

impl InternalEvent for KinesisRecordUnrecognized<'_> {
    fn emit(self) {
        tracing::warn!(
            source = self.source,
            reason = self.reason,
            "Kinesis record not recognised; written to the error output"
        );
        KINESIS.records.with_label_values(&["unrecognized"]).inc();
    }
}

/// A file named by a notification on the stream cannot be read for good (gone, forbidden): the
/// record goes to the error output so that the shard goes on.
pub struct NotifiedFileUnreadable<'a> {
    pub source: &'a str,
    pub error: &'a dyn std::error::Error,
}

impl InternalEvent for NotifiedFileUnreadable<'_> {
    fn emit(self) {
        tracing::warn!(
            source = self.source,
            "file named on the stream cannot be fetched; the record goes to the error output: {}",
            self.error
        );
        METRICS.errors.with_label_values(&["fetch", "s3_get"]).inc();
    }
}

/// A GetRecords answer: how far behind the shard's tip the reader is.
/// A GetRecords call answered (`millis` set), or a shard's series dropped.
pub struct KinesisBehind<'a> {
    pub stream: &'a str,
    pub shard: &'a str,
    /// None removes the shard's series (its lease went elsewhere).
    pub millis: Option<i64>,
}

impl InternalEvent for KinesisBehind<'_> {
    fn emit(self) {
        let labels = [self.stream, self.shard];
        match self.millis {
            Some(m) => {
                KINESIS
                    .millis_behind_latest
                    .with_label_values(&labels)
                    .set(m);
            }
            None => {
                let _ = KINESIS.millis_behind_latest.remove_label_values(&labels);
            }
        }
    }
}

/// A GetRecords call answered (with records or none).
pub struct KinesisRecordsFetched;

impl InternalEvent for KinesisRecordsFetched {
    fn emit(self) {
        KINESIS.get_records.inc();
    }
}

/// A Kinesis or DynamoDB (lease table) call failed; `retrying` when it is retried with backoff.
pub struct KinesisCallFailed<'a> {
    pub operation: &'static str,
    pub shard: &'a str,
    pub error: &'a str,
}

impl InternalEvent for KinesisCallFailed<'_> {
    fn emit(self) {
        tracing::warn!(
            operation = self.operation,
            shard = self.shard,
            "Kinesis source call failed: {}",
            self.error
        );
        METRICS
            .errors
            .with_label_values(&["kinesis", self.operation])
            .inc();
    }
}

/// This worker took a shard lease (`how`: free, expired, handoff, adopted).
pub struct LeaseTaken<'a> {
    pub shard: &'a str,
    pub how: &'static str,
    pub previous_owner: &'a str,
}

impl InternalEvent for LeaseTaken<'_> {
    fn emit(self) {
        tracing::info!(
            shard = self.shard,
            how = self.how,
            previous_owner = self.previous_owner,
            "lease taken"
        );
        KINESIS.lease_takeovers.with_label_values(&[self.how]).inc();
    }
}

/// This worker lost a lease it held (another worker took it, or renewal failed too long).
pub struct LeaseLost<'a> {
    pub shard: &'a str,
    pub reason: &'a str,
}

impl InternalEvent for LeaseLost<'_> {
    fn emit(self) {
        tracing::warn!(
            shard = self.shard,
            reason = self.reason,
            "lease lost; reading of the shard stopped"
        );
        METRICS
            .errors
            .with_label_values(&["kinesis", "lease_lost"])
            .inc();
    }
}

/// A lease write failed its condition only because an earlier write of the same holding was
/// applied with its answer lost (a timeout, or an SDK retry): the lease is still held.
pub struct LeaseWriteRecovered<'a> {
    pub shard: &'a str,
    pub counter: u64,
}

impl InternalEvent for LeaseWriteRecovered<'_> {
    fn emit(self) {
        tracing::info!(
            shard = self.shard,
            counter = self.counter,
            "lease write recovered: an earlier write was applied, its answer lost; lease kept"
        );
    }
}

/// A Kinesis record whose classification panicked: it goes to the error output (reason
/// `classify_panicked`) and its shard goes on.
pub struct RecordClassifyPanicked<'a> {
    pub message: &'a str,
}

impl InternalEvent for RecordClassifyPanicked<'_> {
    fn emit(self) {
        tracing::error!(
            "classifying a Kinesis record panicked: {}; the record goes to the error output",
            self.message
        );
        METRICS.panics.with_label_values(&["classify"]).inc();
    }
}

/// A rebalancing handoff: `stage` = requested (by this worker), draining (this owner stops
/// reading), handed_over, or timed_out (handed over before everything read was written).
pub struct LeaseHandoff<'a> {
    pub shard: &'a str,
    pub to: &'a str,
    pub stage: &'static str,
}

impl InternalEvent for LeaseHandoff<'_> {
    fn emit(self) {
        if self.stage == "timed_out" {
            tracing::warn!(
                shard = self.shard,
                to = self.to,
                "lease handed over before its records were all written; some will be read twice"
            );
        } else {
            tracing::info!(
                shard = self.shard,
                to = self.to,
                stage = self.stage,
                "lease handoff"
            );
        }
        KINESIS.handoffs.with_label_values(&[self.stage]).inc();
    }
}

/// Shard leases held by this worker now.
pub struct LeasesHeld(pub usize);

impl InternalEvent for LeasesHeld {
    fn emit(self) {
        KINESIS.leases_held.set(self.0 as i64);
    }
}

/// Seconds since a held shard's checkpoint last advanced; `None` removes the shard's series.
pub struct CheckpointAge<'a> {
    pub shard: &'a str,
    pub seconds: Option<f64>,
}

impl InternalEvent for CheckpointAge<'_> {
    fn emit(self) {
        match self.seconds {
            Some(s) => KINESIS
                .checkpoint_age
                .with_label_values(&[self.shard])
                .set(s),
            None => {
                let _ = KINESIS.checkpoint_age.remove_label_values(&[self.shard]);
            }
        }
    }
}

/// A shard was read to its end and checkpointed at SHARD_END: its children may start.
pub struct ShardEnded<'a> {
    pub shard: &'a str,
}

impl InternalEvent for ShardEnded<'_> {
    fn emit(self) {
        tracing::info!(shard = self.shard, "shard read to its end (SHARD_END)");
    }
}

/// Events accepted by the Kinesis output.
pub struct KinesisSinkPut {
    pub records: usize,
}

impl InternalEvent for KinesisSinkPut {
    fn emit(self) {
        KINESIS
            .sink_records
            .with_label_values(&["put"])
            .inc_by(self.records as u64);
    }
}

/// Entries of a PutRecords call that failed (or the whole call) are tried again.
pub struct KinesisSinkRetry<'a> {
    pub records: usize,
    pub error: &'a str,
}

impl InternalEvent for KinesisSinkRetry<'_> {
    fn emit(self) {
        tracing::warn!(
            records = self.records,
            "Kinesis output: retrying failed records: {}",
            self.error
        );
        KINESIS
            .sink_records
            .with_label_values(&["retried"])
            .inc_by(self.records as u64);
    }
}

/// An event too large for a Kinesis record: written to the error output instead.
pub struct KinesisSinkOversize<'a> {
    pub stream: &'a str,
    pub bytes: usize,
}

impl InternalEvent for KinesisSinkOversize<'_> {
    fn emit(self) {
        tracing::warn!(
            stream = self.stream,
            bytes = self.bytes,
            "event too large for a Kinesis record; written to the error output"
        );
        KINESIS.sink_records.with_label_values(&["oversize"]).inc();
        METRICS
            .errors
            .with_label_values(&["sink", "too_large_for_kinesis"])
            .inc();
    }
}

/// The Kinesis output's stream could not be described at start-up.
pub struct KinesisSinkUnreachable<'a> {
    pub stream: &'a str,
    pub error: &'a str,
}

impl InternalEvent for KinesisSinkUnreachable<'_> {
    fn emit(self) {
        tracing::error!(
            stream = self.stream,
            "Kinesis output stream not reachable at start-up; batches stay unacknowledged until it is: {}",
            self.error
        );
        METRICS
            .errors
            .with_label_values(&["sink", "kinesis_unreachable"])
            .inc();
    }
}

/// A written batch could not be put on the Kinesis output: it is not acknowledged.
pub struct KinesisSinkFailed<'a> {
    pub stream: &'a str,
    pub error: &'a str,
}

impl InternalEvent for KinesisSinkFailed<'_> {
    fn emit(self) {
        tracing::error!(
            stream = self.stream,
            "Kinesis output failed; the batch is not acknowledged: {}",
            self.error
        );
        METRICS
            .errors
            .with_label_values(&["sink", "kinesis_put_failed"])
            .inc();
    }
}

/// Records of a shard were not all written: reading restarts from the last checkpoint.
pub struct ShardRewound<'a> {
    pub shard: &'a str,
    pub checkpoint: &'a str,
}

impl InternalEvent for ShardRewound<'_> {
    fn emit(self) {
        tracing::warn!(
            shard = self.shard,
            checkpoint = self.checkpoint,
            "records not written; reading the shard again from its checkpoint"
        );
        METRICS
            .errors
            .with_label_values(&["kinesis", "rewound"])
            .inc();
    }
}

// ---- detect ------------------------------------------------------------------------------

/// The detection stage's metrics, registered with the others when the stage opens (or on
/// first use).
struct DetectMetrics {
    detections: IntCounterVec,
    evaluation_seconds: Histogram,
    delivered: IntCounterVec,
    failures: IntCounterVec,
    delivery_seconds: HistogramVec,
    suppressed: IntCounterVec,
    rules: IntGauge,
    rules_skipped: IntCounter,
    unevaluated: IntCounter,
    omitted: IntCounterVec,
    reloads: IntCounterVec,
}

static DETECT: LazyLock<DetectMetrics> = LazyLock::new(|| {
    let r = METRICS.registry();
    let evaluation_seconds = Histogram::with_opts(
        HistogramOpts::new(
            "trailhose_detect_evaluation_seconds",
            "Time to parse one written event and evaluate every Sigma rule on it.",
        )
        .buckets(vec![
            0.000_005, 0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.01,
        ]),
    )
    .expect("valid metric");
    r.register(Box::new(evaluation_seconds.clone()))
        .expect("metric registered once");
    let delivery_seconds = HistogramVec::new(
        HistogramOpts::new(
            "trailhose_alert_delivery_seconds",
            "Time to deliver one round of alerts to an output, retries included.",
        )
        .buckets(vec![0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 120.0]),
        &["output"],
    )
    .expect("valid metric");
    r.register(Box::new(delivery_seconds.clone()))
        .expect("metric registered once");
    let rules = IntGauge::new(
        "trailhose_detect_rules",
        "Sigma rules loaded for CloudTrail.",
    )
    .expect("valid metric");
    r.register(Box::new(rules.clone()))
        .expect("metric registered once");
    DetectMetrics {
        detections: counter_vec(
            r,
            "trailhose_detections_total",
            "Events a Sigma rule matched, by rule id and level.",
            &["rule", "level"],
        ),
        evaluation_seconds,
        delivered: counter_vec(
            r,
            "trailhose_alerts_delivered_total",
            "Alerts delivered, by output.",
            &["output"],
        ),
        failures: counter_vec(
            r,
            "trailhose_alert_delivery_failures_total",
            "Failed alert delivery attempts, by output and whether they were retried or given up (the notification then comes again).",
            &["output", "result"],
        ),
        delivery_seconds,
        suppressed: counter_vec(
            r,
            "trailhose_alerts_suppressed_total",
            "Alerts not sent because the rule and key alerted within suppress_secs, by output and rule.",
            &["output", "rule"],
        ),
        rules,
        rules_skipped: counter(
            r,
            "trailhose_detect_rules_skipped_total",
            "Rule files or rules skipped because they do not compile (detect.skip_invalid).",
        ),
        unevaluated: counter(
            r,
            "trailhose_detect_events_unevaluated_total",
            "Events written but not evaluated: they do not parse as a JSON document (nested deeper than 128, a lone surrogate escape).",
        ),
        reloads: counter_vec(
            r,
            "trailhose_detect_reloads_total",
            "Rule reloads (a rule file changed, or SIGHUP), by result: ok, or failed (the running rules stay).",
            &["result"],
        ),
        omitted: counter_vec(
            r,
            "trailhose_alerts_event_omitted_total",
            "Alerts sent without their event (event = \"full\"): the document would exceed what the output takes.",
            &["output", "rule"],
        ),
    }
});

/// The rules loaded by the last detection stage opened (`trailhose bench` prints it).
pub fn detect_rules() -> i64 {
    DETECT.rules.get()
}

/// The rules were compiled.
pub struct RulesLoaded {
    pub rules: usize,
}

impl InternalEvent for RulesLoaded {
    fn emit(self) {
        tracing::info!(rules = self.rules, "detection rules loaded");
        DETECT.rules.set(self.rules as i64);
    }
}

/// The rules were compiled again (`rules`), or could not be and the running ones stay
/// (`error`).
pub struct RulesReloaded<'a> {
    pub rules: Option<usize>,
    pub error: Option<&'a str>,
}

impl InternalEvent for RulesReloaded<'_> {
    fn emit(self) {
        match self.error {
            None => {
                tracing::info!(rules = self.rules, "detection rules reloaded");
                DETECT.reloads.with_label_values(&["ok"]).inc();
            }
            Some(error) => {
                tracing::error!(
                    error,
                    "detection rules not reloaded; the running rules stay"
                );
                DETECT.reloads.with_label_values(&["failed"]).inc();
            }
        }
    }
}

/// A rule that does not compile was skipped (`detect.skip_invalid = true`).
pub struct RuleSkipped<'a> {
    pub path: &'a str,
    pub reason: &'a str,
}

impl InternalEvent for RuleSkipped<'_> {
    fn emit(self) {
        tracing::warn!(
            path = self.path,
            reason = self.reason,
            "detection rule skipped"
        );
        DETECT.rules_skipped.inc();
    }
}

/// Events evaluated against the rules.
pub struct EventsEvaluated {
    pub events: u64,
    pub elapsed: Duration,
}

impl InternalEvent for EventsEvaluated {
    fn emit(self) {
        DETECT
            .evaluation_seconds
            .observe(self.elapsed.as_secs_f64());
    }
}

/// A rule matched an event.
pub struct DetectionMatched<'a> {
    pub rule: &'a str,
    pub level: &'a str,
}

impl InternalEvent for DetectionMatched<'_> {
    fn emit(self) {
        DETECT
            .detections
            .with_label_values(&[self.rule, self.level])
            .inc();
    }
}

/// An event the rules could not see: it does not parse as a JSON document.
pub struct EventNotEvaluated<'a> {
    pub source: &'a str,
    pub event_id: Option<&'a str>,
}

impl InternalEvent for EventNotEvaluated<'_> {
    fn emit(self) {
        tracing::warn!(
            source = self.source,
            event_id = self.event_id,
            "event written but not evaluated by the detection rules: it does not parse as a JSON document"
        );
        DETECT.unevaluated.inc();
    }
}

/// An alert went out without its event, which would make it too large for the output.
pub struct AlertEventOmitted<'a> {
    pub output: &'a str,
    pub rule: &'a str,
}

impl InternalEvent for AlertEventOmitted<'_> {
    fn emit(self) {
        DETECT
            .omitted
            .with_label_values(&[self.output, self.rule])
            .inc();
    }
}

/// A match was not alerted on an output: its rule and key alerted within `suppress_secs`.
pub struct AlertSuppressed<'a> {
    pub output: &'a str,
    pub rule: &'a str,
}

impl InternalEvent for AlertSuppressed<'_> {
    fn emit(self) {
        DETECT
            .suppressed
            .with_label_values(&[self.output, self.rule])
            .inc();
    }
}

pub struct AlertsDelivered<'a> {
    pub output: &'a str,
    pub alerts: u64,
    pub elapsed: Duration,
}

impl InternalEvent for AlertsDelivered<'_> {
    fn emit(self) {
        tracing::debug!(
            output = self.output,
            alerts = self.alerts,
            "alerts delivered"
        );
        DETECT
            .delivered
            .with_label_values(&[self.output])
            .inc_by(self.alerts);
        DETECT
            .delivery_seconds
            .with_label_values(&[self.output])
            .observe(self.elapsed.as_secs_f64());
    }
}

/// An alert output opened: its delivery series exist from now on, at 0, so that an alert
/// rule's `increase()` sees its first failure after start-up (a series that appears at 1
/// has no increase).
pub struct AlertOutputOpened<'a> {
    pub output: &'a str,
}

impl InternalEvent for AlertOutputOpened<'_> {
    fn emit(self) {
        DETECT.delivered.with_label_values(&[self.output]);
        for result in ["retried", "given_up"] {
            DETECT.failures.with_label_values(&[self.output, result]);
        }
    }
}

/// An attempt to deliver alerts failed. `error` never holds a webhook URL.
pub struct AlertDeliveryFailed<'a> {
    pub output: &'a str,
    pub alerts: u64,
    pub attempt: u32,
    pub given_up: bool,
    pub error: &'a str,
}

impl InternalEvent for AlertDeliveryFailed<'_> {
    fn emit(self) {
        let result = if self.given_up { "given_up" } else { "retried" };
        if self.given_up {
            tracing::error!(
                output = self.output,
                alerts = self.alerts,
                attempt = self.attempt,
                error = self.error,
                "alert delivery failed; their notifications will be delivered again"
            );
        } else {
            tracing::warn!(
                output = self.output,
                alerts = self.alerts,
                attempt = self.attempt,
                error = self.error,
                "alert delivery failed; retrying"
            );
        }
        DETECT
            .failures
            .with_label_values(&[self.output, result])
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_opened_alert_output_exposes_its_failure_series_at_zero() {
        emit(AlertOutputOpened {
            output: "fresh-out",
        });
        let text = METRICS.render();
        for line in [
            "trailhose_alert_delivery_failures_total{output=\"fresh-out\",result=\"given_up\"} 0",
            "trailhose_alert_delivery_failures_total{output=\"fresh-out\",result=\"retried\"} 0",
            "trailhose_alerts_delivered_total{output=\"fresh-out\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in {text}");
        }
        // Another test may have counted one already: present is what matters.
        assert!(
            text.lines()
                .any(|l| l.starts_with("trailhose_output_multipart_abort_failures_total ")),
            "{text}"
        );
    }

    #[test]
    fn catalogue_renders_with_conventional_names() {
        emit(DigestSkipped { source: "x" });
        emit(FallbackPartitioned { events: 2 });
        let text = METRICS.render();
        assert!(text.contains("trailhose_files_total{outcome=\"digest_skipped\"}"));
        assert!(text.contains("trailhose_events_fallback_partition_total"));
        for line in text.lines().filter(|l| l.starts_with("# TYPE")) {
            let mut it = line.split_whitespace().skip(2);
            let (name, kind) = (it.next().unwrap(), it.next().unwrap());
            assert!(name.starts_with("trailhose_"), "{name}");
            match kind {
                "counter" => assert!(name.ends_with("_total"), "{name}"),
                "histogram" => assert!(name.ends_with("_seconds"), "{name}"),
                _ => {}
            }
        }
    }
}
