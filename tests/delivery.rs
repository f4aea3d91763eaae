//! End to end: the acknowledgement ledger of `trailhose run` on a real moto_server. Receiving
//! does not wait for buffers to age; messages stay in flight (heartbeated) until their records
//! are written; `[dedup]` remembers events only once they are written.

mod common;

use std::time::Duration;

use common::sqs::*;
use common::{TempDir, eventually, free_port, s3_objects};

/// At the shipped batch defaults (`max_age_secs = 300`): 200 files announced in 67 messages
/// are all received and split long before any buffer ages out; the messages stay invisible by
/// heartbeat, nothing is deleted before it is written, and SIGTERM writes every event exactly
/// once and empties the queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_files_are_received_at_the_default_max_age_and_held_until_written() {
    let (moto, q) = setup("ledger-work", 5).await;
    let (sqs, s3) = (moto.sqs(), moto.s3());
    let tmp = TempDir::new("ledger-200");
    let (expected, messages) = seed_grouped(&moto, &q.url, 200, 3, 2000, 6_000).await;
    assert!(messages >= 60, "{messages} messages");
    let port = free_port();
    let eps = (moto.endpoint.as_str(), moto.endpoint.as_str());
    let config = write_config_with(tmp.path(), eps, &q.url, port, &Settings::default());
    let log = tmp.path().join("worker.log");
    let mut worker = start_worker(&moto, &config, &log);

    // Well inside the five-minute batch age: receiving does not wait for buffers to seal.
    eventually(90, "every file to be received and split", || async {
        metric(port, "trailhose_files_total{outcome=\"ok\"}") >= 200.0
    })
    .await;
    let held = metric(port, "trailhose_sqs_messages_in_flight ");
    assert_eq!(held, messages as f64, "every message is in the ledger");
    assert_eq!(depth(&sqs, &q.url).await, (0, messages as u64));
    assert!(
        s3_objects(&s3, "trail-out", "ct/").await.is_empty(),
        "nothing written before the batches age or the shutdown"
    );

    // Several visibility timeouts (3 s) later they are still invisible: heartbeated.
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert_eq!(depth(&sqs, &q.url).await, (0, messages as u64));
    assert!(metric(port, "trailhose_sqs_visibility_extensions_total ") >= messages as f64);
    assert_eq!(metric(port, "trailhose_sqs_messages_deleted_total "), 0.0);

    stop(&mut worker, &log, 25);
    assert_eq!(
        depth(&sqs, &q.url).await,
        (0, 0),
        "every message deleted on the way out"
    );
    let got = written_ids(&s3).await;
    assert_eq!(got, expected, "every event written exactly once");
    assert_eq!(depth(&sqs, &q.dlq_url).await.0, 0);
}

/// Messages keep arriving for several batch ages while the worker runs (this test is about the
/// batch age, so it is short here): the unacknowledged count levels off near rate × max_age
/// instead of growing with the messages sent, yet reaches about half of it (messages are held
/// until written, not throttled), and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_a_sustained_producer_unacked_messages_level_off_near_rate_times_max_age() {
    let (moto, q) = setup("ledger-steady", 5).await;
    let (sqs, s3) = (moto.sqs(), moto.s3());
    let tmp = TempDir::new("ledger-steady");
    const MAX_AGE: u64 = 3;
    const RATE: u64 = 4; // messages per second
    const SENT: u64 = 84; // 21 s: seven batch ages
    let mut expected = Vec::new();
    let mut keys = Vec::new();
    for i in 0..SENT {
        let (key, ids) = upload_generated(&s3, 3000, i, 4_000).await;
        expected.extend(ids);
        keys.push(key);
    }
    expected.sort();
    let port = free_port();
    let eps = (moto.endpoint.as_str(), moto.endpoint.as_str());
    let config = write_config_with(tmp.path(), eps, &q.url, port, &Settings::max_age(MAX_AGE));
    let log = tmp.path().join("worker.log");
    let mut worker = start_worker(&moto, &config, &log);
    wait_healthy(port).await;

    let mut peak = 0.0f64;
    let mut deleted_while_sending = 0.0f64;
    let mut late_samples = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(1000 / RATE));
    for (i, key) in keys.iter().enumerate() {
        tick.tick().await;
        send(&sqs, &q.url, &cloudtrail("trail-logs", &[key])).await;
        let unacked = metric(port, "trailhose_sqs_messages_in_flight ");
        peak = peak.max(unacked);
        deleted_while_sending = metric(port, "trailhose_sqs_messages_deleted_total ");
        // After two batch ages the ledger is in its steady state.
        if i as u64 >= 2 * MAX_AGE * RATE {
            late_samples.push(unacked);
        }
    }
    let steady = RATE * MAX_AGE;
    eprintln!(
        "sustained producer: rate × max_age = {steady}, peak unacked {peak}, late samples {late_samples:?}"
    );
    assert!(
        peak <= (3 * steady) as f64,
        "unacked messages level off near {steady}, not the {SENT} sent (peak {peak})"
    );
    // And they are held, not throttled or acknowledged early: over five late batch ages the
    // count climbs to about rate × max_age between seals (half of it is the bound).
    let late_peak = late_samples.iter().copied().fold(0.0f64, f64::max);
    assert!(
        late_peak >= (steady / 2) as f64,
        "messages wait in the ledger for their buffers: about {steady} in flight late in the run, \
         at least {} (late peak {late_peak})",
        steady / 2
    );
    // Seven batch ages of sending: acknowledgements began long before the end. (How many is
    // load-dependent; the level-off above and the drain below are the conditions.)
    assert!(
        deleted_while_sending > 0.0,
        "messages are acknowledged while the producer runs"
    );

    eventually(90, "every message to be acknowledged", || async {
        metric(port, "trailhose_sqs_messages_deleted_total ") >= SENT as f64
            && depth(&sqs, &q.url).await == (0, 0)
    })
    .await;
    stop(&mut worker, &log, 25);
    let got = written_ids(&s3).await;
    let (counts, missing) = tally(&got, &expected);
    assert!(missing.is_empty(), "{} events lost", missing.len());
    assert_eq!(counts.len(), expected.len());
    assert_eq!(depth(&sqs, &q.dlq_url).await.0, 0);
}

/// With `[dedup]`, an output outage makes the first attempts fail after their events were
/// split; the redeliveries must not be taken for repeats of themselves. Once the output is
/// back every event arrives exactly once, and a real repeat (a file announced again) is still
/// dropped. The batch age is short because the test needs several failed rounds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dedup_remembers_events_only_once_written_so_an_outage_loses_nothing() {
    let (moto, q) = setup("dedup-outage", 50).await;
    let (sqs, s3) = (moto.sqs(), moto.s3());
    let tmp = TempDir::new("dedup-outage");
    let port = free_port();
    let eps = (moto.endpoint.as_str(), moto.endpoint.as_str());
    let settings = Settings {
        max_age_secs: Some(1),
        extra: "[dedup]\nwindow_secs = 3600\n".into(),
        ..Settings::default()
    };
    let config = write_config_with(tmp.path(), eps, &q.url, port, &settings);
    let log = tmp.path().join("worker.log");
    let mut worker = start_worker(&moto, &config, &log);
    wait_healthy(port).await;

    // The output disappears after start-up: every put fails, every message is handed back.
    s3.delete_bucket()
        .bucket("trail-out")
        .send()
        .await
        .expect("delete output bucket");
    let (expected, _) = seed_grouped(&moto, &q.url, 6, 2, 4000, 30_000).await;
    eventually(60, "failed puts and handed-back messages", || async {
        metric(port, "trailhose_errors_total{reason=\"put_failed\"") >= 1.0
            && metric(port, "trailhose_errors_total{reason=\"abandoned\"") >= 3.0
    })
    .await;
    assert_eq!(metric(port, "trailhose_sqs_messages_deleted_total "), 0.0);

    s3.create_bucket()
        .bucket("trail-out")
        .send()
        .await
        .expect("recreate output bucket");
    eventually(90, "the queue to drain", || async {
        depth(&sqs, &q.url).await == (0, 0)
    })
    .await;
    eventually(20, "every event to be written", || async {
        written_ids(&s3).await.len() >= expected.len()
    })
    .await;

    // A real repeat: the first file is announced again and dropped as a duplicate.
    let before = metric(port, "trailhose_events_deduplicated_total ");
    send(
        &sqs,
        &q.url,
        &cloudtrail("trail-logs", &[&format!("{DAY}/gen-4000-000.json.gz")]),
    )
    .await;
    eventually(30, "the repeat to be dropped", || async {
        metric(port, "trailhose_events_deduplicated_total ") > before
            && depth(&sqs, &q.url).await == (0, 0)
    })
    .await;

    stop(&mut worker, &log, 25);
    let got = written_ids(&s3).await;
    assert_eq!(got, expected, "every event exactly once after the outage");
    assert_eq!(depth(&sqs, &q.dlq_url).await.0, 0);
}

/// The dispatch policy, at the batch defaults: a notified file that is gone (404) goes to the
/// error output, named, and its neighbours in the same message are written; the message is
/// acknowledged rather than retried into the DLQ.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notified_file_that_is_gone_goes_to_the_error_output_and_its_message_is_acknowledged() {
    let (moto, q) = setup("gone-work", 2).await;
    let (sqs, s3) = (moto.sqs(), moto.s3());
    let tmp = TempDir::new("gone");
    let (good, ids) = upload_generated(&s3, 5000, 0, 20_000).await;
    let gone = format!("{DAY}/never-uploaded.json.gz");
    send(&sqs, &q.url, &cloudtrail("trail-logs", &[&gone, &good])).await;
    let port = free_port();
    let eps = (moto.endpoint.as_str(), moto.endpoint.as_str());
    let config = write_config_with(tmp.path(), eps, &q.url, port, &Settings::default());
    let log = tmp.path().join("worker.log");
    let mut worker = start_worker(&moto, &config, &log);
    eventually(60, "both files to be handled", || async {
        metric(port, "trailhose_files_total{outcome=\"ok\"}") >= 1.0
            && metric(
                port,
                "trailhose_errors_total{reason=\"s3_get\",stage=\"fetch\"}",
            ) >= 1.0
    })
    .await;
    stop(&mut worker, &log, 25);
    assert_eq!(depth(&sqs, &q.url).await, (0, 0), "acknowledged");
    assert_eq!(depth(&sqs, &q.dlq_url).await.0, 0, "not dead-lettered");

    let mut expected = ids;
    expected.sort();
    assert_eq!(written_ids(&s3).await, expected, "the neighbour is written");
    let objects = s3_objects(&s3, "trail-out", "ct/").await;
    let errors = common::checks::split_output(&objects).errors;
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0]["stage"], "fetch");
    assert_eq!(errors[0]["reason"], "object_unreadable");
    assert_eq!(
        errors[0]["source"],
        format!("s3://trail-logs/{gone}").as_str()
    );
}

/// A notified file that exists but is refused (403: here an archived object,
/// `InvalidObjectState`; an expired credential or a KMS key policy answer the same) is not
/// "gone": its message is not acknowledged but comes back (and, after `maxReceiveCount`, lands
/// in the DLQ), so the events are read once the cause is fixed. No error record stands in for
/// them. The message is handed back as soon as the fetch fails, while its neighbour's records
/// still wait in a buffer for the five-minute batch age (not when that buffer is written).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notified_file_that_is_forbidden_is_not_acknowledged_and_comes_back_at_once() {
    let (moto, q) = setup("forbidden-work", 5).await;
    let (sqs, s3) = (moto.sqs(), moto.s3());
    let tmp = TempDir::new("forbidden");
    let (good, ids) = upload_generated(&s3, 5100, 0, 20_000).await;
    let archived = format!("{DAY}/archived.json.gz");
    s3.put_object()
        .bucket("trail-logs")
        .key(&archived)
        .storage_class(aws_sdk_s3::types::StorageClass::Glacier)
        .body(common::fixtures::gzip(b"{\"Records\":[]}").into())
        .send()
        .await
        .expect("put archived");
    send(&sqs, &q.url, &cloudtrail("trail-logs", &[&good, &archived])).await;
    let port = free_port();
    let eps = (moto.endpoint.as_str(), moto.endpoint.as_str());
    let config = write_config_with(tmp.path(), eps, &q.url, port, &Settings::default());
    let log = tmp.path().join("worker.log");
    let mut worker = start_worker(&moto, &config, &log);
    eventually(
        60,
        "the message handed back and received again after the refused fetch",
        || async {
            metric(port, "trailhose_files_total{outcome=\"ok\"}") >= 1.0
                && metric(port, "trailhose_errors_total{reason=\"abandoned\"") >= 1.0
                && metric(
                    port,
                    "trailhose_errors_total{reason=\"s3_get\",stage=\"fetch\"}",
                ) >= 2.0
        },
    )
    .await;
    assert!(
        s3_objects(&s3, "trail-out", "ct/").await.is_empty(),
        "handed back before the neighbour's buffer was written"
    );
    stop(&mut worker, &log, 25);
    let (visible, in_flight) = depth(&sqs, &q.url).await;
    let dead = depth(&sqs, &q.dlq_url).await.0;
    assert_eq!(
        visible + in_flight + dead,
        1,
        "the message is not acknowledged"
    );

    // Each delivery buffered the neighbour again: repeats, never a loss.
    let got = written_ids(&s3).await;
    let (counts, missing) = tally(&got, &ids);
    assert!(
        missing.is_empty(),
        "{} events of the neighbour lost",
        missing.len()
    );
    assert_eq!(counts.len(), ids.len());
    let objects = s3_objects(&s3, "trail-out", "ct/").await;
    let errors = common::checks::split_output(&objects).errors;
    assert!(errors.is_empty(), "no error record stands in: {errors:?}");
}

/// At the batch defaults with every S3 request slow (2 s), the fetches are the bottleneck:
/// received messages wait for a dispatch slot longer than the visibility timeout (3 s). They
/// are in the ledger from their receipt, so heartbeats keep them invisible meanwhile: none is
/// received twice (a second receipt would dead-letter it: `maxReceiveCount` is 1), and
/// SIGTERM writes every event exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_waiting_for_a_dispatch_slot_are_heartbeated() {
    let (moto, q) = setup("slot-wait", 1).await;
    let (sqs, s3) = (moto.sqs(), moto.s3());
    let tmp = TempDir::new("slot-wait");
    let expected = seed_generated(&moto, &q.url, 30, 6100, 4_000).await;
    let proxy = common::faults::FaultProxy::start(
        moto.port,
        common::faults::Plan {
            fail_every: 0,
            slow_every: 1,
            delay: Duration::from_secs(2),
        },
    );
    let port = free_port();
    let eps = (proxy.endpoint(), moto.endpoint.clone());
    let config = write_config_with(
        tmp.path(),
        (eps.0.as_str(), eps.1.as_str()),
        &q.url,
        port,
        &Settings::default(),
    );
    let log = tmp.path().join("worker.log");
    let mut worker = start_worker(&moto, &config, &log);
    eventually(180, "every file to be fetched and split", || async {
        metric(port, "trailhose_files_total{outcome=\"ok\"}") >= 30.0
    })
    .await;
    assert_eq!(
        depth(&sqs, &q.dlq_url).await.0,
        0,
        "no message received twice"
    );
    assert_eq!(depth(&sqs, &q.url).await, (0, 30), "all held, none back");
    stop(&mut worker, &log, 60);
    assert_eq!(depth(&sqs, &q.url).await, (0, 0));
    assert_eq!(written_ids(&s3).await, expected, "every event exactly once");
}

/// `source.sqs.max_unacked_messages` is a real bound that does not stall: at the default batch
/// age the ledger fills to it, receiving pauses, and the oldest buffers are sealed early so
/// that messages are acknowledged and receiving goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_max_unacked_messages_receiving_pauses_and_buffers_seal_early() {
    // Twenty one-file messages, room for five, the default max_age (300 s): the ledger never
    // holds more than five, and because a full ledger seals the oldest buffers early, all
    // twenty are written and deleted long before any buffer would age out.
    let (moto, q) = setup("ledger-full", 5).await;
    let (sqs, s3) = (moto.sqs(), moto.s3());
    let tmp = TempDir::new("ledger-full");
    let (expected, messages) = seed_grouped(&moto, &q.url, 20, 1, 5200, 4_000).await;
    assert_eq!(messages, 20);
    let port = free_port();
    let eps = (moto.endpoint.as_str(), moto.endpoint.as_str());
    let settings = Settings {
        sqs: "max_unacked_messages = 5\n".into(),
        ..Settings::default()
    };
    let config = write_config_with(tmp.path(), eps, &q.url, port, &settings);
    let log = tmp.path().join("worker.log");
    let mut worker = start_worker(&moto, &config, &log);
    let started = std::time::Instant::now();
    let mut peak = 0.0f64;
    loop {
        let in_flight = metric(port, "trailhose_sqs_messages_in_flight ");
        peak = peak.max(in_flight);
        assert!(in_flight <= 5.0, "{in_flight} messages held, room for 5");
        if depth(&sqs, &q.url).await == (0, 0) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(150),
            "a full ledger waited for max_age: queue {:?}",
            depth(&sqs, &q.url).await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(peak >= 1.0, "nothing was ever held");
    assert!(
        metric(
            port,
            "trailhose_buffers_sealed_early_total{reason=\"ledger\"}"
        ) >= 1.0,
        "the ledger filled, so buffers were sealed early"
    );
    stop(&mut worker, &log, 25);
    let got = written_ids(&s3).await;
    let (counts, missing) = tally(&got, &expected);
    assert!(missing.is_empty(), "{} events never written", missing.len());
    assert!(counts.values().all(|&n| n == 1), "written once");
}
