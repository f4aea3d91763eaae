//! Correlation metrics, registered in the one registry the first time one is used.

use std::sync::LazyLock;
use std::time::Duration;

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec};

use super::{InternalEvent, METRICS, counter, counter_vec};

struct CorrelationMetrics {
    update_seconds: Histogram,
    failures: IntCounter,
    evicted: IntCounter,
    skipped: IntCounterVec,
}

static CORRELATION: LazyLock<CorrelationMetrics> = LazyLock::new(|| {
    let r = METRICS.registry();
    let update_seconds = Histogram::with_opts(
        HistogramOpts::new(
            "trailhose_correlation_update_seconds",
            "Time to count one matched event in the correlations that use its rules (store calls included).",
        )
        .buckets(vec![0.000_01, 0.000_1, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.0]),
    )
    .expect("valid metric");
    r.register(Box::new(update_seconds.clone()))
        .expect("metric registered once");
    CorrelationMetrics {
        update_seconds,
        failures: counter(
            r,
            "trailhose_correlation_failures_total",
            "Correlation state updates that failed (the notification is delivered again).",
        ),
        evicted: counter(
            r,
            "trailhose_correlation_states_evicted_total",
            "In-process correlation states evicted unexpired to bound memory (their counts are lost).",
        ),
        skipped: counter_vec(
            r,
            "trailhose_correlation_skipped_total",
            "Matched events not counted in a correlation, by reason: hold_failed (their notification failed already and comes again), breaker_open (the table failed just now; the notification comes again), group_missing (the event lacks a group-by field).",
            &["reason"],
        ),
    }
});

/// A matched event was counted in its correlations.
pub struct CorrelationUpdated {
    pub elapsed: Duration,
}

impl InternalEvent for CorrelationUpdated {
    fn emit(self) {
        CORRELATION
            .update_seconds
            .observe(self.elapsed.as_secs_f64());
    }
}

/// A correlation state update failed.
pub struct CorrelationFailed<'a> {
    pub error: &'a str,
}

impl InternalEvent for CorrelationFailed<'_> {
    fn emit(self) {
        tracing::warn!(
            error = self.error,
            "correlation state update failed; the notification will be delivered again"
        );
        CORRELATION.failures.inc();
    }
}

/// In-process correlation states were evicted before they expired (memory bound reached).
pub struct CorrelationStatesEvicted<'a> {
    pub correlation: &'a str,
    pub states: usize,
}

impl InternalEvent for CorrelationStatesEvicted<'_> {
    fn emit(self) {
        tracing::warn!(
            correlation = self.correlation,
            states = self.states,
            "correlation memory full: the oldest windows' states were evicted (their counts are lost)"
        );
        CORRELATION.evicted.inc_by(self.states as u64);
    }
}

/// Why a matched event was not counted in a correlation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    /// Its notification's hold failed already: it is delivered again and counted then.
    HoldFailed,
    /// The table failed just now: not called (the notification is delivered again).
    BreakerOpen,
    /// The event lacks a group-by field of the correlation (Sigma backends drop such events).
    GroupMissing,
}

impl SkipReason {
    pub fn as_str(self) -> &'static str {
        match self {
            SkipReason::HoldFailed => "hold_failed",
            SkipReason::BreakerOpen => "breaker_open",
            SkipReason::GroupMissing => "group_missing",
        }
    }
}

/// A matched event was not counted in a correlation (or in any, for a failed hold).
pub struct CorrelationSkipped {
    pub reason: SkipReason,
}

impl InternalEvent for CorrelationSkipped {
    fn emit(self) {
        CORRELATION
            .skipped
            .with_label_values(&[self.reason.as_str()])
            .inc();
    }
}

/// A call to the correlation table failed: it is not called again for `secs` seconds (then
/// one call probes it), so that a hung endpoint costs one timeout, not one per event.
pub struct CorrelationBreakerOpened<'a> {
    pub table: &'a str,
    pub secs: f64,
}

impl InternalEvent for CorrelationBreakerOpened<'_> {
    fn emit(self) {
        tracing::warn!(
            table = self.table,
            secs = self.secs,
            "correlation table failing: not called until a probe succeeds (events meanwhile are not counted; their notifications come again)"
        );
    }
}
