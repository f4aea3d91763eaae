//! End to end: `trailhose backfill` against a real moto_server bucket in CloudTrail's layout.

mod common;

use std::collections::BTreeMap;

use common::checks::event_ids;
use common::{Moto, TempDir, fixtures, s3_objects, trailhose};

/// Uploads generated delivery files for two accounts (one inside an organization folder), two
/// regions and three days under `org-trail/`, plus things a backfill must not touch. Returns
/// eventID → day.
async fn seed(s3: &aws_sdk_s3::Client) -> BTreeMap<String, u8> {
    let mut events = BTreeMap::new();
    let mut seed = 0u64;
    for root in [
        "org-trail/AWSLogs/111122223333",
        "org-trail/AWSLogs/o-abc123def4/444455556666",
    ] {
        for region in ["us-east-1", "eu-west-1"] {
            for day in [17u8, 18, 19] {
                for n in 0..2 {
                    seed += 1;
                    let json = trailhose::synth::Generator::new(seed).delivery_file(20_000);
                    let v: serde_json::Value = serde_json::from_slice(&json).expect("json");
                    for r in v["Records"].as_array().expect("records") {
                        events.insert(r["eventID"].as_str().expect("id").to_owned(), day);
                    }
                    let key =
                        format!("{root}/CloudTrail/{region}/2024/03/{day:02}/f{seed}-{n}.json.gz");
                    s3.put_object()
                        .bucket("trail-logs")
                        .key(key)
                        .body(fixtures::gzip(&json).into())
                        .send()
                        .await
                        .expect("put");
                }
            }
        }
    }
    let decoys = [
        (
            "org-trail/other/not-cloudtrail.json.gz",
            r#"{"Records":[{"eventID":"decoy-outside-awslogs"}]}"#,
        ),
        (
            "org-trail/AWSLogs/111122223333/CloudTrail-Digest/us-east-1/2024/03/18/111122223333_CloudTrail-Digest_us-east-1_t_us-east-1_20240318T150000Z.json.gz",
            r#"{"digestSignatureAlgorithm":"SHA256withRSA","logFiles":[]}"#,
        ),
        (
            "elsewhere/AWSLogs/111122223333/CloudTrail/us-east-1/2024/03/18/x.json.gz",
            r#"{"Records":[{"eventID":"decoy-other-prefix"}]}"#,
        ),
    ];
    for (key, body) in decoys {
        s3.put_object()
            .bucket("trail-logs")
            .key(key)
            .body(fixtures::gzip(body.as_bytes()).into())
            .send()
            .await
            .expect("put");
    }
    events
}

fn config(tmp: &std::path::Path, moto: &Moto) -> String {
    let path = tmp.join("backfill.toml");
    std::fs::write(
        &path,
        format!(
            "[output]\nurl = \"s3://trail-out/bf/\"\n[output.s3]\nendpoint_url = \"{ep}\"\nforce_path_style = true\n[[source.buckets]]\nname = \"trail-logs\"\nendpoint_url = \"{ep}\"\nforce_path_style = true\nrole_arn = \"arn:aws:iam::111122223333:role/trail-reader\"\n",
            ep = moto.endpoint
        ),
    )
    .expect("config");
    path.display().to_string()
}

async fn written_ids(s3: &aws_sdk_s3::Client) -> (Vec<String>, usize) {
    let objects = s3_objects(s3, "trail-out", "bf/").await;
    let events: Vec<(String, String)> = objects
        .iter()
        .filter(|(k, _)| !k.starts_with("_trailhose/"))
        .cloned()
        .collect();
    (event_ids(&events), objects.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_shards_cover_every_file_once_and_a_rerun_writes_nothing_new() {
    let moto = Moto::start();
    let s3 = moto.s3();
    for b in ["trail-logs", "trail-out"] {
        s3.create_bucket().bucket(b).send().await.expect("bucket");
    }
    let events = seed(&s3).await;
    let tmp = TempDir::new("backfill");
    let cfg = config(tmp.path(), &moto);
    let env = moto.env();
    let run = |args: Vec<String>| {
        let env = env.clone();
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            trailhose(&args, &env)
        })
    };
    let base = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "backfill",
            "--config",
            &cfg,
            "--bucket",
            "trail-logs",
            "--prefix",
            "org-trail",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };

    // Two shards of the 17th and 18th, run concurrently like two pods.
    let dates = [
        "--from",
        "2024-03-17",
        "--to",
        "2024-03-18",
        "--workers",
        "2",
    ];
    let a = run(base(&[&dates[..], &["--worker-index", "0"]].concat()));
    let b = run(base(&[&dates[..], &["--worker-index", "1"]].concat()));
    let (a, b) = (a.await.expect("join"), b.await.expect("join"));
    for out in [&a, &b] {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let (sa, sb) = (
        String::from_utf8_lossy(&a.stdout),
        String::from_utf8_lossy(&b.stdout),
    );
    assert!(
        sa.contains("listed=16") && sb.contains("listed=16"),
        "{sa}\n{sb}"
    );
    let mine = |s: &str| -> usize {
        s.split_whitespace()
            .find_map(|w| w.strip_prefix("mine="))
            .and_then(|v| v.parse().ok())
            .expect("mine=")
    };
    assert_eq!(mine(&sa) + mine(&sb), 16, "the shards split the files");
    assert!(mine(&sa) > 0 && mine(&sb) > 0, "both shards got work");

    let (ids, objects_after_first) = written_ids(&s3).await;
    let mut expected: Vec<String> = events
        .iter()
        .filter(|(_, d)| **d != 19)
        .map(|(id, _)| id.clone())
        .collect();
    expected.sort();
    assert_eq!(
        ids, expected,
        "every event of the 17th and 18th exactly once, nothing else"
    );

    // A re-run of shard 0 finds its markers and writes nothing.
    let again = run(base(&[&dates[..], &["--worker-index", "0"]].concat()))
        .await
        .expect("join");
    assert!(again.status.success());
    let s = String::from_utf8_lossy(&again.stdout);
    assert!(
        s.contains(&format!("already_done={}", mine(&sa))) && s.contains("processed=0"),
        "{s}"
    );
    assert_eq!(
        written_ids(&s3).await.1,
        objects_after_first,
        "no new objects"
    );

    // Without dates, one worker picks up only what is left: the 19th.
    let rest = run(base(&[])).await.expect("join");
    assert!(
        rest.status.success(),
        "{}",
        String::from_utf8_lossy(&rest.stderr)
    );
    let s = String::from_utf8_lossy(&rest.stdout);
    assert!(
        s.contains("listed=24") && s.contains("already_done=16") && s.contains("processed=8"),
        "{s}"
    );
    let (ids, _) = written_ids(&s3).await;
    let mut all: Vec<String> = events.keys().cloned().collect();
    all.sort();
    assert_eq!(
        ids, all,
        "the whole trail exactly once; decoys and digests untouched"
    );
}

/// More files than the ledger's count cap (lowered for the test), each too small to fill a
/// buffer, at the default `max_age_secs = 300`: the full ledger seals the oldest buffers early,
/// so the backfill finishes long before max_age (it used to wait max_age per cap of files).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_ledger_seals_buffers_early_instead_of_waiting_for_max_age() {
    let moto = Moto::start();
    let s3 = moto.s3();
    for b in ["trail-logs", "trail-out"] {
        s3.create_bucket().bucket(b).send().await.expect("bucket");
    }
    let mut expected = Vec::new();
    for n in 0..24u64 {
        let json = trailhose::synth::Generator::new(100 + n).delivery_file(2_000);
        let v: serde_json::Value = serde_json::from_slice(&json).expect("json");
        for r in v["Records"].as_array().expect("records") {
            expected.push(r["eventID"].as_str().expect("id").to_owned());
        }
        s3.put_object()
            .bucket("trail-logs")
            .key(format!(
                "org-trail/AWSLogs/111122223333/CloudTrail/us-east-1/2024/03/18/f{n}.json.gz"
            ))
            .body(fixtures::gzip(&json).into())
            .send()
            .await
            .expect("put");
    }
    expected.sort();
    let tmp = TempDir::new("backfill-cap");
    let cfg = config(tmp.path(), &moto);
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_trailhose"));
    cmd.args([
        "backfill",
        "--config",
        &cfg,
        "--bucket",
        "trail-logs",
        "--prefix",
        "org-trail",
    ])
    .env("TRAILHOSE_LOG", "warn")
    .env("TRAILHOSE_TEST_MAX_UNACKED", "4")
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped());
    for (k, v) in moto.env() {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn trailhose");
    // Far below max_age (300 s): without early seals the 24 files take 6 rounds of max_age.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while child.try_wait().expect("wait").is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("backfill still running after 120 s: the full ledger waited for max_age");
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let out = child.wait_with_output().expect("output");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("processed=24"), "{stdout}");
    let (ids, _) = written_ids(&s3).await;
    assert_eq!(ids, expected, "every record is written once");
}

/// A file whose alert cannot be delivered has no notification to come again by: the backfill
/// leaves it unmarked (a re-run takes it) and says so in its exit status and its report.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_whose_alert_is_not_delivered_is_not_marked_and_fails_the_run() {
    let moto = Moto::start();
    let s3 = moto.s3();
    for b in ["trail-logs", "trail-out"] {
        s3.create_bucket().bucket(b).send().await.expect("bucket");
    }
    let file = serde_json::json!({"Records": [{
        "eventVersion": "1.09",
        "eventID": "iam-change",
        "eventTime": "2024-03-18T10:00:00Z",
        "eventSource": "iam.amazonaws.com",
        "eventName": "CreateUser",
        "awsRegion": "us-east-1",
        "sourceIPAddress": "203.0.113.7",
        "recipientAccountId": "111122223333",
    }]});
    s3.put_object()
        .bucket("trail-logs")
        .key("org-trail/AWSLogs/111122223333/CloudTrail/us-east-1/2024/03/18/alerted.json.gz")
        .body(fixtures::gzip(file.to_string().as_bytes()).into())
        .send()
        .await
        .expect("put");
    let tmp = TempDir::new("backfill-alert");
    let cfg = config(tmp.path(), &moto);
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let rules = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/detect/rules");
    let mut text = std::fs::read_to_string(&cfg).expect("config");
    text.push_str(&format!(
        "[detect]\nrules = [\"{}\"]\n[[detect.alerts]]\nkind = \"webhook\"\ntarget = \"http://127.0.0.1:{closed}/hook\"\nmax_attempts = 2\n",
        rules.display()
    ));
    std::fs::write(&cfg, text).expect("config");
    let env = moto.env();
    let out = tokio::task::spawn_blocking(move || {
        let args = [
            "backfill",
            "--config",
            &cfg,
            "--bucket",
            "trail-logs",
            "--prefix",
            "org-trail",
        ];
        trailhose(&args, &env)
    })
    .await
    .expect("join");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stdout}\n{stderr}");
    assert!(
        format!("{stdout}{stderr}").contains("failed=1"),
        "{stdout}\n{stderr}"
    );
    let markers: Vec<String> = s3_objects(&s3, "trail-out", "")
        .await
        .into_iter()
        .map(|(k, _)| k)
        .filter(|k| k.contains("_trailhose/backfill/"))
        .collect();
    assert!(
        markers.is_empty(),
        "no marker for the failed file: {markers:?}"
    );
    // The event itself was written: the alert is what failed.
    assert_eq!(written_ids(&s3).await.0, ["iam-change"]);
}
