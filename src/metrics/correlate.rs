//! Correlation metrics, registered in the one registry the first time one is used.

use std::sync::LazyLock;
use std::time::Duration;

use prometheus::{HistogramOpts, HistogramVec, IntCounter, IntCounterVec};

use super::{InternalEvent, METRICS, counter, counter_vec};

struct CorrelationMetrics {
    update_seconds: HistogramVec,
    failures: IntCounter,
    evicted: IntCounter,
    skipped: IntCounterVec,
}

static CORRELATION: LazyLock<CorrelationMetrics> = LazyLock::new(|| {
    let r = METRICS.registry();
    let update_seconds = HistogramVec::new(
        HistogramOpts::new(
            "trailhose_correlation_update_seconds",
            "Time to count one matched event in the correlations that use its rules (store calls included), by outcome: ok, failed (a store call failed, timeouts included), not_called (the table's breaker is open).",
        )
        .buckets(vec![0.000_01, 0.000_1, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.0, 10.0]),
        &["outcome"],
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

/// How counting one matched event in its correlations ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpdateOutcome {
    Ok,
    /// A store call failed (a timeout takes the whole call's 10 s).
    Failed,
    /// The table's breaker is open: no call was made.
    NotCalled,
}

impl UpdateOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            UpdateOutcome::Ok => "ok",
            UpdateOutcome::Failed => "failed",
            UpdateOutcome::NotCalled => "not_called",
        }
    }
}

/// A matched event was counted in its correlations, or that failed: how long it took.
pub struct CorrelationUpdated {
    pub elapsed: Duration,
    pub outcome: UpdateOutcome,
}

impl InternalEvent for CorrelationUpdated {
    fn emit(self) {
        CORRELATION
            .update_seconds
            .with_label_values(&[self.outcome.as_str()])
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

/// The detection stage opened: the correlation counters exist from now on, at 0, so that an
/// alert rule's `increase()` sees their first failure after start-up.
pub struct CorrelationCountersReady;

impl InternalEvent for CorrelationCountersReady {
    fn emit(self) {
        let c = &*CORRELATION;
        for r in [
            SkipReason::HoldFailed,
            SkipReason::BreakerOpen,
            SkipReason::GroupMissing,
        ] {
            c.skipped.with_label_values(&[r.as_str()]);
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

/// Calls to the correlation table kept failing: it is not called again for `secs` seconds
/// (then one call probes it), so that a hung endpoint costs one timeout, not one per event.
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
