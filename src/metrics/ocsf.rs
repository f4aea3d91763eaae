//! OCSF mapping metrics, registered in the one registry the first time one is used.

use std::sync::LazyLock;

use prometheus::IntCounter;

use super::{InternalEvent, METRICS, counter};

static UNPARSED: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        METRICS.registry(),
        "trailhose_ocsf_events_unparsed_total",
        "Events the OCSF mapping could not parse whole (nested deeper than 128): mapped from their routing fields, the event kept in raw_data.",
    )
});

/// An event too deep for the mapping's parser: its record carries the routing fields only,
/// and the event itself in `raw_data`.
pub struct OcsfEventUnparsed<'a> {
    pub event_id: Option<&'a str>,
}

impl InternalEvent for OcsfEventUnparsed<'_> {
    fn emit(self) {
        tracing::warn!(
            event_id = self.event_id,
            "OCSF: the event does not parse as a whole; mapped from its routing fields, kept whole in raw_data"
        );
        UNPARSED.inc();
    }
}
