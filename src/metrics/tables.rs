//! Enrichment tables' metrics, registered in the one registry the first time one is used.

use std::sync::LazyLock;

use prometheus::{GaugeVec, IntCounterVec, IntGaugeVec, Opts};

use super::{InternalEvent, METRICS, counter_vec};

pub struct TableMetrics {
    rows: IntGaugeVec,
    bytes: IntGaugeVec,
    load_seconds: GaugeVec,
    reloads: IntCounterVec,
    lookups: IntCounterVec,
    replaced: IntCounterVec,
}

pub static TABLES: LazyLock<TableMetrics> = LazyLock::new(|| {
    let r = METRICS.registry();
    let gauge = |name: &str, help: &str| {
        let g = IntGaugeVec::new(Opts::new(name, help), &["table"]).expect("valid metric");
        r.register(Box::new(g.clone()))
            .expect("metric registered once");
        g
    };
    let load_seconds = GaugeVec::new(
        Opts::new(
            "trailhose_enrich_table_load_seconds",
            "Time the table in use took to read, parse and check.",
        ),
        &["table"],
    )
    .expect("valid metric");
    r.register(Box::new(load_seconds.clone()))
        .expect("metric registered once");
    TableMetrics {
        rows: gauge(
            "trailhose_enrich_table_rows",
            "Rows (for mmdb: search tree nodes) of the table in use.",
        ),
        bytes: gauge(
            "trailhose_enrich_table_bytes",
            "Approximate memory the table in use holds, with the fragments rendered from it.",
        ),
        load_seconds,
        reloads: counter_vec(
            r,
            "trailhose_enrich_table_reloads_total",
            "Table reloads after its file or S3 object changed (or SIGHUP), by result; on error the running table is kept.",
            &["table", "result"],
        ),
        lookups: counter_vec(
            r,
            "trailhose_enrich_lookups_total",
            "Built-in lookups per event, by table, added field and result (found, absent).",
            &["table", "field", "result"],
        ),
        replaced: counter_vec(
            r,
            "trailhose_enrich_replaced_members_total",
            "Top-level members an event already held under a name an enrichment writes (geo, a lookup's field): removed, so that the event carries the enrichment's value once.",
            &["field"],
        ),
    }
});

/// A table was loaded (at start-up or on reload) and is in use.
pub struct TableLoaded<'a> {
    pub table: &'a str,
    pub location: &'a str,
    pub rows: u64,
    pub bytes: u64,
    pub seconds: f64,
    pub reload: bool,
}

impl InternalEvent for TableLoaded<'_> {
    fn emit(self) {
        let m = &*TABLES;
        let clamp = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        m.rows
            .with_label_values(&[self.table])
            .set(clamp(self.rows));
        m.bytes
            .with_label_values(&[self.table])
            .set(clamp(self.bytes));
        m.load_seconds
            .with_label_values(&[self.table])
            .set(self.seconds);
        if self.reload {
            m.reloads.with_label_values(&[self.table, "ok"]).inc();
        }
        tracing::info!(
            table = self.table,
            location = self.location,
            rows = self.rows,
            bytes = self.bytes,
            seconds = self.seconds,
            reload = self.reload,
            "enrichment table loaded"
        );
    }
}

/// A new version of a table could not be used; the running one is kept.
pub struct TableReloadFailed<'a> {
    pub table: &'a str,
    pub error: &'a str,
}

impl InternalEvent for TableReloadFailed<'_> {
    fn emit(self) {
        tracing::error!(
            table = self.table,
            "enrichment table reload failed; the running table is kept: {}",
            self.error
        );
        TABLES
            .reloads
            .with_label_values(&[self.table, "error"])
            .inc();
    }
}

/// Lookup outcomes of one field over a file.
pub struct TableLookups<'a> {
    pub table: &'a str,
    pub field: &'a str,
    pub found: u64,
    pub absent: u64,
}

impl InternalEvent for TableLookups<'_> {
    fn emit(self) {
        let m = &TABLES.lookups;
        for (result, n) in [("found", self.found), ("absent", self.absent)] {
            if n > 0 {
                m.with_label_values(&[self.table, self.field, result])
                    .inc_by(n);
            }
        }
    }
}

/// An event already held a top-level member an enrichment writes; it was removed.
pub struct MemberReplaced<'a> {
    pub field: &'a str,
}

impl InternalEvent for MemberReplaced<'_> {
    fn emit(self) {
        TABLES.replaced.with_label_values(&[self.field]).inc();
    }
}
