//! Correlation metrics, registered in the one registry the first time one is used.

use std::sync::LazyLock;
use std::time::Duration;

use prometheus::{Histogram, HistogramOpts, IntCounter};

use super::{InternalEvent, METRICS, counter};

struct CorrelationMetrics {
    update_seconds: Histogram,
    failures: IntCounter,
    evicted: IntCounter,
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
