//! Every metric the Helm chart's Grafana dashboard and Prometheus alerts query is one that a
//! running `trailhose run` actually exposes: a renamed or dropped metric breaks this test, not
//! an operator's dashboard.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use common::http_get;
use common::observed::Workers;

/// The files whose queries are checked; raw template text is scanned, so names in alerts that
/// only some values render (Kinesis, transforms) are checked too.
const QUERY_FILES: &[&str] = &[
    "helm/trailhose/dashboards/trailhose.json",
    "helm/trailhose/templates/prometheusrule.yaml",
];

/// Metric families the dashboard and alerts use before the code emitting them has landed
/// (none at the moment). Each must be used, must
/// not be in src/metrics.rs yet and must not be emitted; once one is, this test fails until it
/// is removed here (and the run below exercises it).
const PENDING: &[&str] = &[];

/// Every `trailhose_*` token in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let is_name = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_';
    for (i, _) in text.match_indices("trailhose_") {
        if text[..i].chars().next_back().is_some_and(is_name) {
            continue;
        }
        let name: String = text[i..].chars().take_while(|&c| is_name(c)).collect();
        out.insert(name);
    }
    out
}

/// Family name and type of every `# TYPE` line in an exposition.
fn families(exposition: &str) -> Vec<(String, String)> {
    exposition
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some((it.next()?.to_owned(), it.next()?.to_owned()))
        })
        .collect()
}

/// The family a queried series belongs to: histogram series carry `_bucket`, `_sum`, `_count`.
fn family_of(name: &str, histograms: &BTreeSet<String>) -> String {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix)
            && (histograms.contains(base) || PENDING.contains(&base))
        {
            return base.to_owned();
        }
    }
    name.to_owned()
}

#[test]
fn metric_name_scanner_finds_names_in_queries() {
    let names = metric_names(
        r#"sum(rate(trailhose_errors_total{stage="write"}[5m])) / x_trailhose_not 1 trailhose_a_bucket"#,
    );
    let want: BTreeSet<String> = ["trailhose_errors_total", "trailhose_a_bucket"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(names, want);
    let histograms: BTreeSet<String> = ["trailhose_a".to_string()].into();
    assert_eq!(family_of("trailhose_a_bucket", &histograms), "trailhose_a");
    assert_eq!(
        family_of("trailhose_b_count", &histograms),
        "trailhose_b_count"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_in_the_dashboard_and_alerts_is_emitted() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut used = BTreeSet::new();
    for f in QUERY_FILES {
        let text = std::fs::read_to_string(root.join(f)).expect("chart file");
        let names = metric_names(&text);
        assert!(names.len() >= 3, "{f} uses trailhose metrics");
        used.extend(names);
    }

    // Both kinds of worker on moto and one round of traffic (the fixture set and a garbage
    // message): every labelled metric the chart uses gets a label set.
    let workers = Workers::start("observability").await;
    workers.feed(0).await;

    // Wait until every non-pending family is exposed by one of the two workers (or time out and
    // report what is not).
    let deadline = Instant::now() + Duration::from_secs(60);
    let (exposition, missing) = loop {
        let text: String = workers
            .ports()
            .iter()
            .filter_map(|p| http_get(*p, "/metrics").map(|(_, m)| m))
            .collect::<Vec<_>>()
            .join("\n");
        let fams = families(&text);
        let exposed: BTreeSet<String> = fams.iter().map(|(n, _)| n.clone()).collect();
        let histograms: BTreeSet<String> = fams
            .iter()
            .filter(|(_, t)| t == "histogram")
            .map(|(n, _)| n.clone())
            .collect();
        let missing: Vec<String> = used
            .iter()
            .map(|n| family_of(n, &histograms))
            .filter(|f| !exposed.contains(f) && !PENDING.contains(&f.as_str()))
            .collect();
        if missing.is_empty() || Instant::now() > deadline {
            break (text, missing);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    drop(workers);
    assert!(
        missing.is_empty(),
        "the chart queries metrics trailhose does not emit: {missing:?}\n/metrics:\n{exposition}"
    );

    // A histogram is exposed before its first observation: check the queue wait was measured.
    let waits: f64 = exposition
        .lines()
        .find_map(|l| l.strip_prefix("trailhose_sqs_message_age_seconds_count "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0);
    assert!(
        waits >= 2.0,
        "queue wait observed per message:\n{exposition}"
    );

    let catalogue = std::fs::read_to_string(root.join("src/metrics.rs")).expect("metrics.rs");
    let used_families: BTreeSet<String> = used
        .iter()
        .map(|n| family_of(n, &BTreeSet::new()))
        .collect();
    for p in PENDING {
        assert!(
            used_families.contains(*p),
            "{p} is PENDING but no dashboard panel or alert uses it"
        );
        assert!(
            !catalogue.contains(&format!("\"{p}\"")) && !exposition.contains(&format!(" {p} ")),
            "{p} is in the metrics catalogue now: remove it from PENDING"
        );
    }
}
