//! Every metric the Helm chart's Grafana dashboard and Prometheus alerts query is one that a
//! running `trailhose run` actually exposes: a renamed or dropped metric breaks this test, not
//! an operator's dashboard.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::checks::fixture_dbs;
use common::{Moto, TempDir, fixtures, free_port, http_get, upload_tree};

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

    // A worker on moto with the fixture set (good, digest and bad files, a mixed Records
    // array) and a garbage message: every labelled metric the chart uses gets a label set.
    let moto = Moto::start();
    let (s3, sqs) = (moto.s3(), moto.sqs());
    for b in ["trail-logs", "trail-out"] {
        s3.create_bucket().bucket(b).send().await.expect("bucket");
    }
    let queue = sqs
        .create_queue()
        .queue_name("observability")
        .send()
        .await
        .expect("queue")
        .queue_url
        .expect("queue url");
    let tmp = TempDir::new("observability");
    let input = tmp.path().join("in");
    fixtures::write_all(&input);
    let keys = upload_tree(&s3, "trail-logs", &input).await;
    let body = serde_json::json!({"s3Bucket": "trail-logs", "s3ObjectKey": keys}).to_string();
    for b in [body.as_str(), "not a notification"] {
        sqs.send_message()
            .queue_url(&queue)
            .message_body(b)
            .send()
            .await
            .expect("send");
    }
    let (city, asn) = fixture_dbs(tmp.path());
    // Transforms: one that works and one that panics after its first events, so that the
    // per-module throughput and failure metrics get label sets.
    let modules = root.join("target/transforms/wasm32-wasip2/release");
    let (priority, hostile) = (
        modules.join("priority_rules.wasm"),
        modules.join("hostile.wasm"),
    );
    assert!(
        priority.is_file() && hostile.is_file(),
        "run scripts/build-transforms.sh (scripts/test.sh does)"
    );
    let (priority, hostile) = (priority.display(), hostile.display());
    let port = free_port();
    let config = tmp.path().join("run.toml");
    let ep = &moto.endpoint;
    std::fs::write(
        &config,
        format!(
            r#"[output]
url = "s3://trail-out/ct/"
[output.s3]
endpoint_url = "{ep}"
force_path_style = true
[batch]
max_age_secs = 1
[geoip]
city_db = "{city}"
asn_db = "{asn}"
[source.sqs]
queue_url = "{queue}"
endpoint_url = "{ep}"
wait_time_secs = 1
visibility_timeout_secs = 5
[[source.buckets]]
name = "trail-logs"
endpoint_url = "{ep}"
force_path_style = true
[server]
listen = "127.0.0.1:{port}"
[pipeline]
transform_batch_events = 8
[[transforms]]
name = "priority"
path = "{priority}"
[[transforms]]
name = "flaky"
path = "{hostile}"
[transforms.config]
mode = "panic_after"
n = "8"
"#
        ),
    )
    .expect("config");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_trailhose"));
    cmd.args(["run", "--config"])
        .arg(&config)
        .env("TRAILHOSE_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for (k, v) in moto.env() {
        cmd.env(k, v);
    }
    let mut worker = cmd.spawn().expect("start trailhose run");
    let (mut kinesis_worker, kinesis_port) = start_kinesis_worker(&moto, tmp.path()).await;

    // Wait until every non-pending family is exposed by one of the two workers (or time out and
    // report what is not).
    let deadline = Instant::now() + Duration::from_secs(60);
    let (exposition, missing) = loop {
        let text: String = [port, kinesis_port]
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
    for w in [&mut worker, &mut kinesis_worker] {
        let _ = w.kill();
        let _ = w.wait();
    }
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

/// A Kinesis-mode worker on a one-shard stream holding one CloudWatch Logs batch: the lease,
/// lag and checkpoint metrics get values. Returns the child and its metrics port.
async fn start_kinesis_worker(moto: &Moto, dir: &Path) -> (std::process::Child, u16) {
    let conf = aws_sdk_kinesis::Config::builder()
        .behavior_version_latest()
        .region(aws_sdk_kinesis::config::Region::new("us-east-1"))
        .endpoint_url(&moto.endpoint)
        .credentials_provider(aws_sdk_kinesis::config::Credentials::new(
            "testing", "testing", None, None, "test",
        ))
        .build();
    let kinesis = aws_sdk_kinesis::Client::from_conf(conf);
    kinesis
        .create_stream()
        .stream_name("observability")
        .shard_count(1)
        .send()
        .await
        .expect("stream");
    let event = serde_json::json!({"eventVersion": "1.09", "eventTime": "2024-03-18T14:30:07Z",
        "eventSource": "iam.amazonaws.com", "eventID": "k1", "recipientAccountId": "111122223333"});
    let batch = serde_json::json!({"messageType": "DATA_MESSAGE", "owner": "111122223333",
        "logGroup": "g", "logStream": "s", "subscriptionFilters": ["f"],
        "logEvents": [{"id": "1", "timestamp": 1710772207000u64, "message": event.to_string()}]});
    kinesis
        .put_record()
        .stream_name("observability")
        .partition_key("k")
        .data(aws_sdk_kinesis::primitives::Blob::new(fixtures::gzip(
            batch.to_string().as_bytes(),
        )))
        .send()
        .await
        .expect("put record");
    let port = free_port();
    let ep = &moto.endpoint;
    let config = dir.join("kinesis.toml");
    std::fs::write(
        &config,
        format!(
            r#"[output]
url = "s3://trail-out/kinesis/"
[output.s3]
endpoint_url = "{ep}"
force_path_style = true
[batch]
max_age_secs = 1
[source.kinesis]
stream = "observability"
endpoint_url = "{ep}"
worker_id = "observer"
lease_duration_millis = 2000
lease_renew_interval_millis = 400
shard_sync_interval_millis = 1000
poll_interval_millis = 200
[[source.buckets]]
name = "trail-logs"
endpoint_url = "{ep}"
force_path_style = true
[server]
listen = "127.0.0.1:{port}"
"#
        ),
    )
    .expect("config");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_trailhose"));
    cmd.args(["run", "--config"])
        .arg(&config)
        .env("TRAILHOSE_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for (k, v) in moto.env() {
        cmd.env(k, v);
    }
    (cmd.spawn().expect("start the Kinesis worker"), port)
}
