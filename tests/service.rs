//! End to end: `trailhose run` workers on a real moto_server — S3 buckets, an SQS queue with a
//! DLQ redrive policy, every notification shape — stopped with SIGTERM or SIGKILL.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::checks::{check_fixture_output, split_output};
use common::sqs::*;
use common::{Moto, TempDir, eventually, fixtures, free_port, http_get, s3_objects, upload_tree};

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

    wait_healthy(port).await;
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
    stop(&mut worker, &log, 25);

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

/// At the default batch age: worker A is killed without warning while it holds messages whose
/// records are only buffered; a restarted A and worker B take them over once their visibility
/// lapses, and SIGTERM writes everything. Nothing is lost; repeats are counted and printed.
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
    let defaults = Settings::default();
    let eps = (moto.endpoint.as_str(), moto.endpoint.as_str());
    let cfg_a = write_config_with(&dir_a, eps, &q.url, pa, &defaults);
    let cfg_b = write_config_with(&dir_b, eps, &q.url, pb, &defaults);
    let mut a = start_worker(&moto, &cfg_a, &dir_a.join("log"));
    let mut b = start_worker(&moto, &cfg_b, &dir_b.join("log"));

    // Kill worker A without warning once it has split some files (buffered, not written).
    eventually(60, "worker A to split files", || async {
        metric(pa, "trailhose_files_total{outcome=\"ok\"}") >= 3.0
    })
    .await;
    signal(&a, "-KILL");
    let _ = a.wait();
    // Restart it: together with B it takes every message, A's once their visibility lapses.
    let mut a2 = start_worker(&moto, &cfg_a, &dir_a.join("log2"));
    eventually(120, "every message to be held by a live worker", || async {
        let held = metric(pa, "trailhose_sqs_messages_in_flight ")
            + metric(pb, "trailhose_sqs_messages_in_flight ")
            + metric(pa, "trailhose_sqs_messages_deleted_total ")
            + metric(pb, "trailhose_sqs_messages_deleted_total ");
        depth(&sqs, &q.url).await.0 == 0 && held >= 40.0
    })
    .await;
    signal(&a2, "-TERM");
    signal(&b, "-TERM");
    assert!(wait_exit(&mut a2, 25));
    assert!(wait_exit(&mut b, 25));
    assert_eq!(depth(&sqs, &q.url).await, (0, 0), "every message deleted");

    let got = written_ids(&s3).await;
    let (counts, missing) = tally(&got, &expected);
    assert!(
        missing.is_empty(),
        "{} events lost, e.g. {:?}",
        missing.len(),
        missing.first()
    );
    let duplicates = got.len() - counts.len();
    eprintln!(
        "SIGKILL test: {} events expected, {} written, {duplicates} repeats",
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
    wait_healthy(port).await;

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
    stop(&mut worker, &log, 25);
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
    stop(&mut worker, &log, 25);

    let injected = proxy.injected.load(std::sync::atomic::Ordering::SeqCst);
    assert!(injected >= 5, "the proxy injected faults ({injected})");
    let got = written_ids(&s3).await;
    assert_eq!(
        got, expected,
        "every event exactly once despite {injected} injected faults"
    );
    assert_eq!(depth(&sqs, &q.dlq_url).await.0, 0, "nothing dead-lettered");
}
