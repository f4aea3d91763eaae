//! End to end: `trailhose run` workers on a real moto_server — S3 buckets, an SQS queue with a
//! DLQ redrive policy, every notification shape — stopped with SIGTERM or SIGKILL.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use aws_sdk_sqs::types::QueueAttributeName;
use common::checks::{check_fixture_output, fixture_dbs, id_of, split_output};
use common::{Moto, TempDir, eventually, fixtures, free_port, http_get, s3_objects, upload_tree};

const DAY: &str = "AWSLogs/111122223333/CloudTrail/us-east-1/2024/03/18";

struct Queues {
    url: String,
    dlq_url: String,
}

async fn make_queues(sqs: &aws_sdk_sqs::Client, name: &str, max_receive: u32) -> Queues {
    let dlq_url = sqs
        .create_queue()
        .queue_name(format!("{name}-dlq"))
        .send()
        .await
        .expect("create dlq")
        .queue_url
        .expect("dlq url");
    let dlq_arn = sqs
        .get_queue_attributes()
        .queue_url(&dlq_url)
        .attribute_names(QueueAttributeName::QueueArn)
        .send()
        .await
        .expect("dlq attrs")
        .attributes
        .and_then(|a| a.get(&QueueAttributeName::QueueArn).cloned())
        .expect("dlq arn");
    let url = sqs
        .create_queue()
        .queue_name(name)
        .attributes(
            QueueAttributeName::RedrivePolicy,
            format!(r#"{{"deadLetterTargetArn":"{dlq_arn}","maxReceiveCount":"{max_receive}"}}"#),
        )
        .send()
        .await
        .expect("create queue")
        .queue_url
        .expect("queue url");
    Queues { url, dlq_url }
}

async fn depth(sqs: &aws_sdk_sqs::Client, url: &str) -> (u64, u64) {
    let attrs = sqs
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(QueueAttributeName::All)
        .send()
        .await
        .expect("attrs")
        .attributes
        .unwrap_or_default();
    let get = |k: QueueAttributeName| attrs.get(&k).and_then(|v| v.parse().ok()).unwrap_or(0);
    (
        get(QueueAttributeName::ApproximateNumberOfMessages),
        get(QueueAttributeName::ApproximateNumberOfMessagesNotVisible),
    )
}

async fn send(sqs: &aws_sdk_sqs::Client, url: &str, body: &str) {
    sqs.send_message()
        .queue_url(url)
        .message_body(body)
        .send()
        .await
        .expect("send");
}

fn sns(message: &str) -> String {
    serde_json::json!({
        "Type": "Notification",
        "MessageId": "5b2c3f0e-0000-4000-8000-000000000001",
        "TopicArn": "arn:aws:sns:us-east-1:111122223333:cloudtrail-topic",
        "Message": message,
        "Timestamp": "2024-03-18T14:20:00.000Z",
        "SignatureVersion": "1"
    })
    .to_string()
}

fn cloudtrail(bucket: &str, keys: &[&str]) -> String {
    serde_json::json!({"s3Bucket": bucket, "s3ObjectKey": keys}).to_string()
}

fn s3_event(bucket: &str, encoded_key: &str) -> String {
    serde_json::json!({"Records": [{
        "eventVersion": "2.1", "eventSource": "aws:s3", "awsRegion": "us-east-1",
        "eventTime": "2024-03-18T14:20:00.000Z", "eventName": "ObjectCreated:Put",
        "s3": {"s3SchemaVersion": "1.0", "bucket": {"name": bucket, "arn": format!("arn:aws:s3:::{bucket}")},
               "object": {"key": encoded_key, "size": 100}}
    }]})
    .to_string()
}

fn eventbridge(bucket: &str, key: &str) -> String {
    serde_json::json!({
        "version": "0", "id": "17793124-05d4-b198-2fde-7ededc63b103", "detail-type": "Object Created",
        "source": "aws.s3", "account": "111122223333", "time": "2024-03-18T14:20:00Z", "region": "us-east-1",
        "resources": [format!("arn:aws:s3:::{bucket}")],
        "detail": {"version": "0", "bucket": {"name": bucket}, "object": {"key": key, "size": 100}, "reason": "PutObject"}
    })
    .to_string()
}

fn write_config(dir: &Path, moto: &Moto, queue_url: &str, port: u16, max_age_secs: u64) -> String {
    write_config_via(
        dir,
        &moto.endpoint,
        &moto.endpoint,
        queue_url,
        port,
        max_age_secs,
    )
}

/// `s3_ep` is where both the input and the output buckets are reached (moto, or a proxy).
fn write_config_via(
    dir: &Path,
    s3_ep: &str,
    sqs_ep: &str,
    queue_url: &str,
    port: u16,
    max_age_secs: u64,
) -> String {
    let (city, asn) = fixture_dbs(dir);
    let path = dir.join("run.toml");
    std::fs::write(
        &path,
        format!(
            r#"[output]
url = "s3://trail-out/ct/"
[output.s3]
endpoint_url = "{s3_ep}"
force_path_style = true
[batch]
max_age_secs = {max_age_secs}
[geoip]
city_db = "{city}"
asn_db = "{asn}"
[source.sqs]
queue_url = "{queue_url}"
endpoint_url = "{sqs_ep}"
wait_time_secs = 1
visibility_timeout_secs = 3
max_files_in_flight = 4
[[source.buckets]]
name = "trail-logs"
endpoint_url = "{s3_ep}"
force_path_style = true
[server]
listen = "127.0.0.1:{port}"
shutdown_grace_secs = 20
"#
        ),
    )
    .expect("config");
    path.display().to_string()
}

/// A `trailhose run` child, killed on drop so a failing test leaves no worker behind.
struct Worker(Child);

impl std::ops::Deref for Worker {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Worker {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_worker(moto: &Moto, config: &str, log: &Path) -> Worker {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_trailhose"));
    cmd.args(["run", "--config", config])
        .env("TRAILHOSE_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).expect("log file"));
    for (k, v) in moto.env() {
        cmd.env(k, v);
    }
    Worker(cmd.spawn().expect("start trailhose run"))
}

/// The value of the first `/metrics` line starting with `name` (include the space or `{` that
/// ends the name); 0 when the worker does not answer or has no such line yet.
fn metric(port: u16, name: &str) -> f64 {
    let text = http_get(port, "/metrics")
        .map(|(_, m)| m)
        .unwrap_or_default();
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

/// A fresh moto with the work queue (and its DLQ), the input bucket and the output bucket.
async fn setup(queue: &str, max_receive: u32) -> (Moto, Queues) {
    let moto = Moto::start();
    let q = make_queues(&moto.sqs(), queue, max_receive).await;
    let s3 = moto.s3();
    for b in ["trail-logs", "trail-out"] {
        s3.create_bucket().bucket(b).send().await.expect("bucket");
    }
    (moto, q)
}

fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .expect("kill")
        .success();
    assert!(ok, "kill {sig}");
}

/// Waits for the child to exit within `secs`; returns whether it exited successfully.
fn wait_exit(child: &mut Child, secs: u64) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status.success();
        }
        assert!(
            Instant::now() < deadline,
            "worker did not exit within {secs}s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Uploads `n` generated delivery files to `trail-logs` and announces each on the queue with a
/// CloudTrail notification. Returns their eventIDs, sorted.
async fn seed_generated(
    moto: &Moto,
    queue_url: &str,
    n: u64,
    seed: u64,
    bytes: usize,
) -> Vec<String> {
    let (s3, sqs) = (moto.s3(), moto.sqs());
    let mut ids = Vec::new();
    for i in 0..n {
        let json = trailhose::synth::Generator::new(seed + i).delivery_file(bytes);
        let v: serde_json::Value = serde_json::from_slice(&json).expect("json");
        let records = v["Records"].as_array().expect("records");
        ids.extend(
            records
                .iter()
                .map(|r| r["eventID"].as_str().expect("id").to_owned()),
        );
        let key = format!("{DAY}/gen-{seed}-{i:03}.json.gz");
        s3.put_object()
            .bucket("trail-logs")
            .key(&key)
            .body(fixtures::gzip(&json).into())
            .send()
            .await
            .expect("put");
        send(&sqs, queue_url, &cloudtrail("trail-logs", &[&key])).await;
    }
    ids.sort();
    ids
}

/// Every eventID written under the output prefix, sorted (repeats kept).
async fn written_ids(s3: &aws_sdk_s3::Client) -> Vec<String> {
    let objects = s3_objects(s3, "trail-out", "ct/").await;
    let mut ids: Vec<String> = split_output(&objects)
        .events
        .iter()
        .map(|(_, l)| id_of(l))
        .collect();
    ids.sort();
    ids
}

/// Uploads the fixture set to `trail-logs` and announces every file, in every notification
/// shape, plus messages that must be refused. Returns what the fixtures expect.
async fn upload_and_announce(moto: &Moto, tmp: &Path, queue_url: &str) -> fixtures::Expected {
    let s3 = moto.s3();
    let sqs = moto.sqs();
    for b in ["trail-logs", "trail-out", "someone-elses-bucket"] {
        s3.create_bucket().bucket(b).send().await.expect("bucket");
    }
    let input = tmp.join("in");
    let exp = fixtures::write_all(&input);
    // The plain .json file is stored under a key with a space and a plus, so the S3 event
    // carries a form-encoded key.
    std::fs::rename(
        input.join(format!("{DAY}/plain.json")),
        input.join(format!("{DAY}/plain copy+1.json")),
    )
    .expect("rename");
    upload_tree(&s3, "trail-logs", &input).await;
    s3.put_object()
        .bucket("someone-elses-bucket")
        .key("secret.json.gz")
        .body(fixtures::gzip(br#"{"Records":[{"eventID":"must-never-be-read"}]}"#).into())
        .send()
        .await
        .expect("foreign object");

    let file1 = format!("{DAY}/111122223333_CloudTrail_us-east-1_20240318T1410Z_fileone.json.gz");
    let org = "AWSLogs/o-abc123def4/444455556666/CloudTrail/eu-west-1/2024/03/18/444455556666_CloudTrail_eu-west-1_20240318T1525Z_org.json.gz";
    let insight = "AWSLogs/111122223333/CloudTrail-Insight/us-east-1/2024/03/18/111122223333_CloudTrail-Insight_us-east-1_20240318T1400Z_ins.json.gz";
    let digest = "AWSLogs/111122223333/CloudTrail-Digest/us-east-1/2024/03/18/111122223333_CloudTrail-Digest_us-east-1_trail_us-east-1_20240318T150000Z.json.gz";
    let by_content = format!("{DAY}/digest-by-content.json.gz");
    let bad: Vec<String> = [
        "no-records",
        "records-not-array",
        "empty-object",
        "not-json",
        "empty",
        "corrupt",
        "truncated",
        "not-gzip",
    ]
    .iter()
    .map(|n| format!("bad/{n}.json.gz"))
    .collect();
    let bad_refs: Vec<&str> = bad.iter().map(String::as_str).collect();

    send(
        &sqs,
        queue_url,
        &sns(&cloudtrail("trail-logs", &[&file1, org])),
    )
    .await;
    send(
        &sqs,
        queue_url,
        &cloudtrail("trail-logs", &[insight, digest, &by_content]),
    )
    .await;
    send(&sqs, queue_url, &cloudtrail("trail-logs", &bad_refs)).await;
    let plain_encoded = format!("{}/plain+copy%2B1.json", DAY.replace('/', "%2F"));
    send(&sqs, queue_url, &s3_event("trail-logs", &plain_encoded)).await;
    send(
        &sqs,
        queue_url,
        &sns(&s3_event("trail-logs", &format!("{DAY}/pretty.json.gz"))),
    )
    .await;
    send(
        &sqs,
        queue_url,
        &eventbridge("trail-logs", "bad/mixed-records.json.gz"),
    )
    .await;
    send(&sqs, queue_url, r#"{"Service":"Amazon S3","Event":"s3:TestEvent","Time":"2024-03-18T14:00:00.000Z","Bucket":"trail-logs","RequestId":"X","HostId":"Y"}"#).await;
    send(&sqs, queue_url, &cloudtrail("trail-logs", &[digest])).await;
    // Refused: a bucket outside the allowlist, and garbage. Both must end in the DLQ.
    send(
        &sqs,
        queue_url,
        &cloudtrail("someone-elses-bucket", &["secret.json.gz"]),
    )
    .await;
    send(&sqs, queue_url, "\u{1}not a notification at all").await;
    exp
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_processes_every_notification_shape_acks_and_refuses_then_stops_on_sigterm() {
    let moto = Moto::start();
    let sqs = moto.sqs();
    let q = make_queues(&sqs, "trail-work", 2).await;
    let tmp = TempDir::new("service");
    let exp = upload_and_announce(&moto, tmp.path(), &q.url).await;
    let port = free_port();
    let config = write_config(tmp.path(), &moto, &q.url, port, 1);
    let log = tmp.path().join("worker.log");
    let mut worker = start_worker(&moto, &config, &log);

    eventually(30, "/healthz", || async {
        http_get(port, "/healthz").is_some_and(|(s, _)| s == 200)
    })
    .await;
    let (status, body) = http_get(port, "/readyz").expect("readyz");
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("queue: ok") && body.contains("output: ok"),
        "{body}"
    );

    // The queue drains; the two refused messages reach the DLQ through the redrive policy.
    eventually(
        90,
        "the queue to drain and the DLQ to hold the refused messages",
        || async { depth(&sqs, &q.url).await == (0, 0) && depth(&sqs, &q.dlq_url).await.0 == 2 },
    )
    .await;
    let s3 = moto.s3();
    eventually(20, "every event to be written", || async {
        let objects = s3_objects(&s3, "trail-out", "ct/").await;
        split_output(&objects).events.len() >= exp.events.len() + exp.pretty_ids.len()
    })
    .await;

    let (_, metrics) = http_get(port, "/metrics").expect("metrics");
    signal(&worker, "-TERM");
    assert!(
        wait_exit(&mut worker, 25),
        "clean exit on SIGTERM; log:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );

    let objects = s3_objects(&s3, "trail-out", "ct/").await;
    check_fixture_output(&exp, &objects);

    let dlq = sqs
        .receive_message()
        .queue_url(&q.dlq_url)
        .max_number_of_messages(10)
        .send()
        .await
        .expect("dlq")
        .messages
        .unwrap_or_default();
    let bodies: Vec<String> = dlq.iter().filter_map(|m| m.body.clone()).collect();
    assert!(
        bodies.iter().any(|b| b.contains("someone-elses-bucket")),
        "{bodies:?}"
    );
    assert!(
        bodies.iter().any(|b| b.contains("not a notification")),
        "{bodies:?}"
    );

    for needle in [
        "trailhose_notifications_total{result=\"files\",shape=\"cloudtrail_sns\"}",
        "trailhose_notifications_total{result=\"files\",shape=\"s3_event\"}",
        "trailhose_notifications_total{result=\"files\",shape=\"s3_event_in_sns\"}",
        "trailhose_notifications_total{result=\"files\",shape=\"eventbridge\"}",
        "trailhose_notifications_total{result=\"s3_test_event\",shape=\"s3_test_event\"}",
        "trailhose_notifications_total{result=\"digest_only\",shape=\"cloudtrail_raw\"}",
        "trailhose_sqs_messages_refused_total{reason=\"bucket_not_allowed\"}",
        "trailhose_sqs_messages_refused_total{reason=\"not_json\"}",
        "trailhose_sqs_messages_deleted_total",
        "trailhose_s3_request_seconds_bucket",
        "trailhose_end_to_end_lag_seconds_bucket",
        "trailhose_open_buffers ",
        "trailhose_buffered_bytes ",
        "trailhose_sqs_messages_in_flight ",
    ] {
        assert!(
            metrics.contains(needle),
            "/metrics lacks {needle}:\n{metrics}"
        );
    }
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(log_text.contains("shutdown complete"), "{log_text}");
    assert!(!log_text.contains("testing"), "no credential in logs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_share_a_queue_and_a_killed_worker_loses_nothing() {
    let (moto, q) = setup("shared-work", 5).await;
    let (sqs, s3) = (moto.sqs(), moto.s3());
    let tmp = TempDir::new("service-share");
    // 40 files of generated events, one notification each.
    let expected = seed_generated(&moto, &q.url, 40, 100, 150_000).await;

    let (pa, pb) = (free_port(), free_port());
    let dir_a = tmp.path().join("a");
    let dir_b = tmp.path().join("b");
    std::fs::create_dir_all(&dir_a).expect("a");
    std::fs::create_dir_all(&dir_b).expect("b");
    let cfg_a = write_config(&dir_a, &moto, &q.url, pa, 1);
    let cfg_b = write_config(&dir_b, &moto, &q.url, pb, 1);
    let mut a = start_worker(&moto, &cfg_a, &dir_a.join("log"));
    let mut b = start_worker(&moto, &cfg_b, &dir_b.join("log"));

    // Kill worker A without warning as soon as it has deleted some messages.
    eventually(60, "worker A to acknowledge work", || async {
        metric(pa, "trailhose_sqs_messages_deleted_total ") >= 1.0
    })
    .await;
    signal(&a, "-KILL");
    let _ = a.wait();
    // Restart it: together with B it finishes the queue, including A's unacknowledged messages
    // once their visibility timeout passes.
    let mut a2 = start_worker(&moto, &cfg_a, &dir_a.join("log2"));
    eventually(120, "the queue to drain", || async {
        depth(&sqs, &q.url).await == (0, 0)
    })
    .await;
    signal(&a2, "-TERM");
    signal(&b, "-TERM");
    assert!(wait_exit(&mut a2, 25));
    assert!(wait_exit(&mut b, 25));

    let got = written_ids(&s3).await;
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for id in &got {
        *counts.entry(id.as_str()).or_default() += 1;
    }
    let missing: Vec<&String> = expected
        .iter()
        .filter(|id| !counts.contains_key(id.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "{} events lost, e.g. {:?}",
        missing.len(),
        missing.first()
    );
    let duplicates = got.len() - counts.len();
    eprintln!(
        "SIGKILL test: {} events expected, {} written, {duplicates} duplicates (files in flight at the kill)",
        expected.len(),
        got.len()
    );
    assert_eq!(counts.len(), expected.len(), "no unexpected events");
    assert_eq!(depth(&sqs, &q.dlq_url).await.0, 0, "nothing dead-lettered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_are_acknowledged_only_after_their_records_are_written() {
    let (moto, q) = setup("outage-work", 50).await;
    let (sqs, s3) = (moto.sqs(), moto.s3());
    let tmp = TempDir::new("service-outage");
    let port = free_port();
    let config = write_config(tmp.path(), &moto, &q.url, port, 1);
    let log = tmp.path().join("worker.log");
    let mut worker = start_worker(&moto, &config, &log);
    eventually(30, "/healthz", || async {
        http_get(port, "/healthz").is_some_and(|(s, _)| s == 200)
    })
    .await;

    // The output disappears after start-up: every put now fails.
    s3.delete_bucket()
        .bucket("trail-out")
        .send()
        .await
        .expect("delete output bucket");
    let expected = seed_generated(&moto, &q.url, 5, 500, 50_000).await;
    eventually(30, "a failed put", || async {
        metric(port, "trailhose_errors_total{reason=\"put_failed\"") >= 1.0
    })
    .await;
    // Longer than the visibility timeout: redelivered messages fail again, none is deleted.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        metric(port, "trailhose_sqs_messages_deleted_total "),
        0.0,
        "nothing acknowledged while nothing is written"
    );
    let (visible, invisible) = depth(&sqs, &q.url).await;
    assert_eq!(visible + invisible, 5, "every message still on the queue");

    // The output comes back: the redelivered messages are processed and acknowledged.
    s3.create_bucket()
        .bucket("trail-out")
        .send()
        .await
        .expect("recreate output bucket");
    eventually(60, "the queue to drain", || async {
        depth(&sqs, &q.url).await == (0, 0)
    })
    .await;
    signal(&worker, "-TERM");
    assert!(wait_exit(&mut worker, 25));
    let mut got = written_ids(&s3).await;
    got.dedup();
    assert_eq!(got, expected, "every event arrives once the output is back");
    assert_eq!(depth(&sqs, &q.dlq_url).await.0, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_run_flushes_open_buffers_and_acknowledges_within_the_grace_period() {
    let (moto, q) = setup("term-work", 5).await;
    let (sqs, s3) = (moto.sqs(), moto.s3());
    let tmp = TempDir::new("service-term");
    let expected = seed_generated(&moto, &q.url, 6, 900, 40_000).await;
    let port = free_port();
    // Buffers would wait five minutes to flush by age: only the shutdown can flush them.
    let config = write_config(tmp.path(), &moto, &q.url, port, 300);
    let log = tmp.path().join("worker.log");
    let mut worker = start_worker(&moto, &config, &log);
    eventually(30, "every file to be read", || async {
        http_get(port, "/metrics")
            .is_some_and(|(_, m)| m.contains("trailhose_files_total{outcome=\"ok\"} 6"))
    })
    .await;
    assert!(
        s3_objects(&s3, "trail-out", "ct/").await.is_empty(),
        "nothing written before the shutdown"
    );
    assert!(metric(port, "trailhose_open_buffers ") >= 1.0);
    assert!(metric(port, "trailhose_buffered_bytes ") > 100_000.0);
    let (v, nv) = depth(&sqs, &q.url).await;
    assert_eq!(v + nv, 6, "nothing acknowledged before the shutdown");

    let started = Instant::now();
    signal(&worker, "-TERM");
    assert!(wait_exit(&mut worker, 20), "exit 0 within the grace period");
    assert!(started.elapsed() < Duration::from_secs(20));
    assert_eq!(
        depth(&sqs, &q.url).await,
        (0, 0),
        "every message acknowledged on the way out"
    );
    let got = written_ids(&s3).await;
    assert_eq!(
        got, expected,
        "every buffered event was flushed exactly once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_errors_throttling_and_slow_responses_cost_retries_not_events() {
    let (moto, q) = setup("fault-work", 20).await;
    let (sqs, s3) = (moto.sqs(), moto.s3());
    let tmp = TempDir::new("service-faults");
    let expected = seed_generated(&moto, &q.url, 12, 700, 60_000).await;
    // Every S3 request of the worker (fetches, puts, the start-up check) goes through the proxy.
    let proxy = common::faults::FaultProxy::start(
        moto.port,
        common::faults::Plan {
            fail_every: 3,
            slow_every: 4,
            delay: Duration::from_millis(1500),
        },
    );
    let port = free_port();
    let config = write_config_via(
        tmp.path(),
        &proxy.endpoint(),
        &moto.endpoint,
        &q.url,
        port,
        1,
    );
    let log = tmp.path().join("worker.log");
    let mut worker = start_worker(&moto, &config, &log);
    eventually(120, "the queue to drain", || async {
        depth(&sqs, &q.url).await == (0, 0)
    })
    .await;
    signal(&worker, "-TERM");
    assert!(
        wait_exit(&mut worker, 25),
        "{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );

    let injected = proxy.injected.load(std::sync::atomic::Ordering::SeqCst);
    assert!(injected >= 5, "the proxy injected faults ({injected})");
    let got = written_ids(&s3).await;
    assert_eq!(
        got, expected,
        "every event exactly once despite {injected} injected faults"
    );
    assert_eq!(depth(&sqs, &q.dlq_url).await.0, 0, "nothing dead-lettered");
}
