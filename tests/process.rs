//! End to end: the `trailhose process` binary on the project's fixtures, to a local directory and
//! to S3 on a real moto_server.

mod common;

use common::checks::{check_fixture_output, fixture_dbs, id_of};
use common::{Moto, TempDir, decode, fixtures, local_objects, s3_objects, trailhose};
use serde_json::Value;

#[test]
fn local_run_writes_every_event_once_with_geo_partitions_errors_and_metrics() {
    let tmp = TempDir::new("local");
    let input = tmp.path().join("in");
    let out = tmp.path().join("out");
    let exp = fixtures::write_all(&input);
    let (city, asn) = fixture_dbs(tmp.path());
    let metrics = tmp.path().join("metrics.prom");
    let run = trailhose(
        &[
            "process",
            input.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--geoip-db",
            &city,
            "--asn-db",
            &asn,
            "--metrics-file",
            metrics.to_str().unwrap(),
        ],
        &[],
    );
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(
        stdout.contains("files=16 (digests skipped 2, bad 7)"),
        "{stdout}"
    );
    assert!(stdout.contains("events/s="), "{stdout}");
    check_fixture_output(&exp, &local_objects(&out));

    // No temp files left behind.
    let leftovers: Vec<_> = walkdir::WalkDir::new(&out)
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    let m = std::fs::read_to_string(&metrics).expect("metrics file");
    let value = |needle: &[&str]| -> f64 {
        m.lines()
            .find(|l| !l.starts_with('#') && needle.iter().all(|n| l.contains(n)))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no metric line with {needle:?} in\n{m}"))
    };
    assert_eq!(
        value(&["trailhose_files_total", "outcome=\"digest_skipped\""]),
        2.0
    );
    assert_eq!(value(&["trailhose_files_total", "outcome=\"error\""]), 7.0);
    for reason in [
        "truncated",
        "no_records",
        "records_not_array",
        "not_json",
        "empty",
        "gzip_corrupt",
    ] {
        assert!(
            value(&[
                "trailhose_errors_total",
                &format!("reason=\"{reason}\""),
                "stage=\"split\""
            ]) >= 1.0,
            "{reason}"
        );
    }
    assert_eq!(
        value(&[
            "trailhose_records_rejected_total",
            "reason=\"not_an_object\""
        ]),
        3.0
    );
    assert_eq!(
        value(&["trailhose_errors_total", "reason=\"not_gzip\""]),
        1.0
    );
    assert_eq!(
        value(&["trailhose_geo_lookups_total", "result=\"non_address\""]),
        4.0
    );
    assert_eq!(
        value(&["trailhose_geo_lookups_total", "result=\"not_found\""]),
        1.0
    );
    assert!(value(&["trailhose_geo_cache_hits_total"]) >= 100.0);
    assert_eq!(value(&["trailhose_events_fallback_partition_total"]), 2.0);
    let events_out = value(&["trailhose_events_out_total"]);
    assert_eq!(events_out, value(&["trailhose_events_in_total"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_run_on_moto_writes_every_event_once_and_errors_under_their_prefix() {
    let moto = Moto::start();
    let s3 = moto.s3();
    s3.create_bucket()
        .bucket("trail-out")
        .send()
        .await
        .expect("create bucket");
    let tmp = TempDir::new("s3");
    let input = tmp.path().join("in");
    let exp = fixtures::write_all(&input);
    let (city, asn) = fixture_dbs(tmp.path());
    let config = tmp.path().join("trailhose.toml");
    std::fs::write(
        &config,
        format!(
            "[output]\nurl = \"s3://trail-out/cloudtrail/\"\n[output.s3]\nendpoint_url = \"{}\"\nforce_path_style = true\nregion = \"us-east-1\"\n[geoip]\ncity_db = \"{city}\"\nasn_db = \"{asn}\"\n",
            moto.endpoint
        ),
    )
    .expect("config");
    let env: Vec<(&str, String)> = moto
        .env()
        .into_iter()
        .filter(|(k, _)| *k != "AWS_ENDPOINT_URL")
        .collect();
    let run = tokio::task::spawn_blocking(move || {
        trailhose(
            &[
                "process",
                input.to_str().unwrap(),
                "--config",
                config.to_str().unwrap(),
            ],
            &env,
        )
    })
    .await
    .expect("join");
    assert!(
        run.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        stdout.contains("output=s3://trail-out/cloudtrail/"),
        "{stdout}"
    );
    let objects = s3_objects(&s3, "trail-out", "cloudtrail/").await;
    check_fixture_output(&exp, &objects);
    let everything = s3_objects(&s3, "trail-out", "").await;
    assert_eq!(
        everything.len(),
        objects.len(),
        "nothing outside the prefix"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_multipart_sse_and_storage_class_options_are_applied() {
    let moto = Moto::start();
    let s3 = moto.s3();
    s3.create_bucket()
        .bucket("big-out")
        .send()
        .await
        .expect("create bucket");
    let tmp = TempDir::new("s3-multipart");
    let input = tmp.path().join("in");
    // Generated events compress well; a low gzip level and large batches make one object over
    // the 5 MiB multipart threshold.
    let day = input.join("AWSLogs/123456789012/CloudTrail/us-east-1/2024/03/18");
    std::fs::create_dir_all(&day).expect("mkdir");
    let json = trailhose::synth::Generator::new(3).delivery_file(40 << 20);
    std::fs::write(day.join("big.json.gz"), fixtures::gzip(&json)).expect("write");
    let config = tmp.path().join("trailhose.toml");
    std::fs::write(
        &config,
        format!(
            "[output]\nurl = \"s3://big-out/x\"\nlevel = 1\nkey_template = \"dt={{year}}-{{month}}-{{day}}/\"\n[batch]\nmax_records = 1000000\nmax_bytes = 1073741824\n[output.s3]\nendpoint_url = \"{}\"\nforce_path_style = true\nmultipart_threshold_bytes = 5242880\npart_size_bytes = 5242880\nstorage_class = \"STANDARD_IA\"\nsse_kms_key_id = \"alias/trailhose-test\"\n",
            moto.endpoint
        ),
    )
    .expect("config");
    let env = moto.env();
    let run = tokio::task::spawn_blocking(move || {
        trailhose(
            &[
                "process",
                input.to_str().unwrap(),
                "--config",
                config.to_str().unwrap(),
            ],
            &env,
        )
    })
    .await
    .expect("join");
    assert!(
        run.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    let list = s3
        .list_objects_v2()
        .bucket("big-out")
        .send()
        .await
        .expect("list");
    let objs = list.contents();
    assert_eq!(objs.len(), 1, "one batch, one object");
    let key = objs[0].key().expect("key");
    assert!(key.starts_with("x/dt=2024-03-18/"), "{key}");
    assert!(
        objs[0].size().unwrap_or(0) > 5 << 20,
        "large enough to need multipart"
    );
    let head = s3
        .head_object()
        .bucket("big-out")
        .key(key)
        .send()
        .await
        .expect("head");
    assert_eq!(
        head.storage_class().map(|c| c.as_str()),
        Some("STANDARD_IA")
    );
    assert_eq!(head.ssekms_key_id(), Some("alias/trailhose-test"));
    let text = s3_objects(&s3, "big-out", "x/").await.remove(0).1;
    let expected = serde_json::from_slice::<Value>(&json).expect("json")["Records"]
        .as_array()
        .expect("records")
        .len();
    assert_eq!(text.lines().count(), expected);
}

/// Refuses every UploadPart of the first multipart upload (S3's 500, whatever the SDK's own
/// retries) and every AbortMultipartUpload (403): the first write fails and cannot be
/// aborted; the next write's upload passes.
fn refuse_parts_then_every_abort(line: &str) -> Option<(&'static str, &'static str)> {
    static FIRST: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);
    if line.starts_with("DELETE ") && line.contains("uploadId=") {
        return Some(("403 Forbidden", "AccessDenied"));
    }
    if !(line.starts_with("PUT ") && line.contains("partNumber=")) {
        return None;
    }
    let upload = line.split("uploadId=").nth(1)?.split([' ', '&']).next()?;
    let mut first = FIRST.lock().unwrap_or_else(|e| e.into_inner());
    let first = first.get_or_insert_with(|| upload.to_owned());
    (first == upload).then_some(("500 Internal Server Error", "InternalError"))
}

/// The first write's Complete is refused (S3's 500, whatever the SDK's retries), as when its
/// answer was lost and the retries found the upload gone; its abort is answered NoSuchUpload:
/// the upload is gone (completed or aborted), no parts are left, so nothing is reported.
fn refuse_first_complete_then_abort_as_gone(line: &str) -> Option<(&'static str, &'static str)> {
    static FIRST: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);
    let upload = line.split("uploadId=").nth(1)?.split([' ', '&']).next()?;
    if line.starts_with("DELETE ") {
        return Some(("404 Not Found", "NoSuchUpload"));
    }
    if !line.starts_with("POST ") {
        return None;
    }
    let mut first = FIRST.lock().unwrap_or_else(|e| e.into_inner());
    let first = first.get_or_insert_with(|| upload.to_owned());
    (first == upload).then_some(("500 Internal Server Error", "InternalError"))
}

/// moto with a `big-out` bucket, behind a proxy that answers what `refuse` picks.
async fn big_out_behind(
    refuse: common::faults::Refuse,
) -> (Moto, aws_sdk_s3::Client, common::faults::FaultProxy) {
    let moto = Moto::start();
    let s3 = moto.s3();
    s3.create_bucket()
        .bucket("big-out")
        .send()
        .await
        .expect("create bucket");
    let proxy = common::faults::FaultProxy::start_refusing(
        moto.port,
        common::faults::Plan {
            fail_every: 0,
            slow_every: 0,
            delay: std::time::Duration::ZERO,
        },
        Some(refuse),
    );
    (moto, s3, proxy)
}

/// One `process` run writing 8 MiB of events as one multipart object to moto through a proxy
/// that refuses what `refuse` picks. Returns stderr, the abort-failure count, whether an abort
/// was asked for, and the run's objects with the number of events written.
async fn multipart_run(
    name: &str,
    refuse: common::faults::Refuse,
) -> (String, f64, bool, Vec<(String, String)>, usize) {
    let (moto, s3, proxy) = big_out_behind(refuse).await;
    let tmp = TempDir::new(name);
    let input = tmp.path().join("in");
    let day = input.join("AWSLogs/123456789012/CloudTrail/us-east-1/2024/03/18");
    std::fs::create_dir_all(&day).expect("mkdir");
    // Uncompressed output, so 8 MiB of events make one object over the 5 MiB threshold.
    let json = trailhose::synth::Generator::new(5).delivery_file(8 << 20);
    std::fs::write(day.join("big.json.gz"), fixtures::gzip(&json)).expect("write");
    let config = tmp.path().join("trailhose.toml");
    std::fs::write(
        &config,
        format!(
            "[output]\nurl = \"s3://big-out/x\"\ncompression = \"none\"\nkey_template = \"dt={{year}}-{{month}}-{{day}}/\"\n[batch]\nmax_records = 1000000\nmax_bytes = 1073741824\n[output.s3]\nendpoint_url = \"{}\"\nforce_path_style = true\nmultipart_threshold_bytes = 5242880\npart_size_bytes = 5242880\n",
            proxy.endpoint()
        ),
    )
    .expect("config");
    let metrics = tmp.path().join("metrics.prom");
    let env = moto.env();
    let args = [
        "process".to_owned(),
        input.display().to_string(),
        "--config".to_owned(),
        config.display().to_string(),
        "--metrics-file".to_owned(),
        metrics.display().to_string(),
    ];
    let run = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        trailhose(&args, &env)
    })
    .await
    .expect("join");
    let stderr = String::from_utf8_lossy(&run.stderr).into_owned();
    let calls: Vec<String> = proxy
        .seen()
        .iter()
        .map(|r| r.head.lines().next().unwrap_or("").to_owned())
        .collect();
    assert!(run.status.success(), "stderr: {stderr}\ncalls: {calls:#?}");
    let m = std::fs::read_to_string(&metrics).expect("metrics file");
    let aborts = m
        .lines()
        .find(|l| l.starts_with("trailhose_output_multipart_abort_failures_total "))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .unwrap_or(0.0);
    let asked = calls
        .iter()
        .any(|c| c.starts_with("DELETE ") && c.contains("uploadId="));
    let objects = s3_objects(&s3, "big-out", "x/").await;
    let expected = serde_json::from_slice::<Value>(&json).expect("json")["Records"]
        .as_array()
        .expect("records")
        .len();
    (stderr, aborts, asked, objects, expected)
}

/// A multipart upload that fails is aborted; when the abort fails too, its parts would stay
/// in the bucket unseen: that is a warning and a metric, and the batch is still written whole
/// by the next attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multipart_upload_that_cannot_be_aborted_is_reported() {
    let (stderr, aborts, asked, objects, expected) =
        multipart_run("s3-abort", refuse_parts_then_every_abort).await;
    assert!(
        stderr.contains("cannot abort the failed multipart upload"),
        "stderr: {stderr}"
    );
    assert!(aborts >= 1.0, "{aborts}");
    assert!(asked, "an abort was asked for");
    assert_eq!(objects.len(), 1, "one batch, one object");
    assert_eq!(objects[0].1.lines().count(), expected);
}

/// An abort answered NoSuchUpload left nothing behind: not reported as leftover parts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abort_that_finds_the_upload_gone_is_not_reported() {
    let (stderr, aborts, asked, objects, expected) =
        multipart_run("s3-abort-gone", refuse_first_complete_then_abort_as_gone).await;
    assert!(asked, "the failed upload was aborted\n{stderr}");
    assert_eq!(aborts, 0.0, "{stderr}");
    assert!(!stderr.contains("cannot abort"), "{stderr}");
    assert_eq!(objects.len(), 1, "one batch, one object");
    assert_eq!(objects[0].1.lines().count(), expected);
}

#[test]
fn many_events_small_batches_and_chunks_every_compression() {
    let tmp = TempDir::new("batches");
    let input = tmp
        .path()
        .join("in/AWSLogs/123456789012/CloudTrail/us-east-1/2024/03/18");
    std::fs::create_dir_all(&input).expect("mkdir");
    let mut ids = Vec::new();
    for i in 0..3u64 {
        let json = trailhose::synth::Generator::new(i).delivery_file(3 << 20);
        let v: Value = serde_json::from_slice(&json).expect("json");
        ids.extend(
            v["Records"]
                .as_array()
                .expect("records")
                .iter()
                .map(|r| r["eventID"].as_str().expect("id").to_owned()),
        );
        std::fs::write(input.join(format!("f{i}.json.gz")), fixtures::gzip(&json)).expect("write");
    }
    ids.sort();
    for compression in ["gzip", "zstd", "none"] {
        let out = tmp.path().join(format!("out-{compression}"));
        let config = tmp.path().join(format!("{compression}.toml"));
        std::fs::write(
            &config,
            format!("[output]\ncompression = \"{compression}\"\n[batch]\nmax_records = 700\nchunk_bytes = 65536\n"),
        )
        .expect("config");
        let run = trailhose(
            &[
                "process",
                tmp.path().join("in").to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
                "--config",
                config.to_str().unwrap(),
            ],
            &[],
        );
        assert!(
            run.status.success(),
            "{compression}: {}",
            String::from_utf8_lossy(&run.stderr)
        );
        let objects = local_objects(&out);
        let ext = match compression {
            "gzip" => ".json.gz",
            "zstd" => ".json.zst",
            _ => ".json",
        };
        let mut got = Vec::new();
        for (key, text) in &objects {
            assert!(key.ends_with(ext), "{key}");
            let n = text.lines().count();
            assert!(n <= 700, "{key}: {n} records over max_records");
            got.extend(text.lines().map(id_of));
        }
        got.sort();
        assert_eq!(got, ids, "{compression}: every event exactly once");
        assert!(
            objects.len() >= ids.len() / 700,
            "{compression}: batches were cut by count"
        );
    }
}

#[test]
fn check_config_accepts_good_files_and_names_the_bad_key() {
    let tmp = TempDir::new("config");
    let good = tmp.path().join("good.toml");
    std::fs::write(&good, "[output]\nurl = \"s3://b/p\"\ncompression = \"zstd\"\nkey_template = \"{account}/{region}/{year}/{month}/{day}/\"\n[batch]\nmax_records = 5\n").expect("write");
    let run = trailhose(&["check-config", good.to_str().unwrap()], &[]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );

    for (text, key) in [
        ("[batch]\nmax_recordz = 5\n", "max_recordz"),
        (
            "[output]\nkey_template = \"year={yr}/\"\n",
            "output.key_template",
        ),
        ("[output]\nlevel = 99\n", "output.level"),
        ("[batch]\nmax_records = -1\n", "max_records"),
    ] {
        let bad = tmp.path().join("bad.toml");
        std::fs::write(&bad, text).expect("write");
        let run = trailhose(&["check-config", bad.to_str().unwrap()], &[]);
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert!(!run.status.success(), "{text} must be rejected");
        assert!(
            stderr.contains(key),
            "error for {text:?} names {key}: {stderr}"
        );
    }
}

#[test]
fn unwritable_output_and_bad_inputs_fail_with_a_clear_message() {
    let tmp = TempDir::new("unwritable");
    let input = tmp.path().join("in");
    fixtures::write_all(&input);
    let file = tmp.path().join("a-file");
    std::fs::write(&file, b"x").expect("write");
    let run = trailhose(
        &[
            "process",
            input.to_str().unwrap(),
            "--out",
            file.join("sub").to_str().unwrap(),
        ],
        &[],
    );
    assert!(!run.status.success());
    assert!(String::from_utf8_lossy(&run.stderr).contains("output unusable"));

    let run = trailhose(
        &[
            "process",
            "/nonexistent/input",
            "--out",
            tmp.path().to_str().unwrap(),
        ],
        &[],
    );
    assert!(!run.status.success());
    assert!(String::from_utf8_lossy(&run.stderr).contains("/nonexistent/input does not exist"));

    let broken_db = tmp.path().join("broken.mmdb");
    std::fs::write(&broken_db, b"not a database").expect("write");
    let run = trailhose(
        &[
            "process",
            input.to_str().unwrap(),
            "--out",
            tmp.path().join("o").to_str().unwrap(),
            "--geoip-db",
            broken_db.to_str().unwrap(),
        ],
        &[],
    );
    assert!(!run.status.success());
    assert!(String::from_utf8_lossy(&run.stderr).contains("broken.mmdb"));

    // `--out` a local directory under a config with an output role: the role would be
    // ignored, so the run is refused as the file alone would be.
    let cfg = tmp.path().join("role.toml");
    std::fs::write(
        &cfg,
        "[output]\nurl = \"s3://out/p/\"\n[output.s3]\nrole_arn = \"arn:aws:iam::111122223333:role/w\"\n",
    )
    .expect("write");
    let out = tmp.path().join("role-out");
    let run = trailhose(
        &[
            "process",
            input.to_str().unwrap(),
            "--config",
            cfg.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
        &[],
    );
    assert!(!run.status.success());
    assert!(
        String::from_utf8_lossy(&run.stderr).contains("output.s3.role_arn"),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(!out.exists(), "nothing is written");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_output_bucket_fails_before_any_work() {
    let moto = Moto::start();
    let tmp = TempDir::new("nobucket");
    let input = tmp.path().join("in");
    fixtures::write_all(&input);
    let config = tmp.path().join("t.toml");
    std::fs::write(
        &config,
        format!("[output]\nurl = \"s3://no-such-bucket/p\"\n[output.s3]\nendpoint_url = \"{}\"\nforce_path_style = true\n", moto.endpoint),
    )
    .expect("config");
    let env = moto.env();
    let run = tokio::task::spawn_blocking(move || {
        trailhose(
            &[
                "process",
                input.to_str().unwrap(),
                "--config",
                config.to_str().unwrap(),
            ],
            &env,
        )
    })
    .await
    .expect("join");
    assert!(!run.status.success());
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(stderr.contains("no-such-bucket"), "{stderr}");
}

/// Events without a usable eventTime stay in the one Hive shape: DuckDB's Hive reader takes the
/// whole event tree and sees them, flagged with the arrival time they were partitioned by.
/// A well-formed but forged year (before 2013, or far in the future) is unusable too: it
/// would open a `year=0000` partition outside the DDL's projection.
#[test]
fn events_without_a_usable_time_are_readable_by_a_hive_reader() {
    let tmp = TempDir::new("untimed");
    let input = tmp.path().join("in");
    let out = tmp.path().join("out");
    let exp = fixtures::write_all(&input);
    let forged = input.join("AWSLogs/123456789012/CloudTrail/us-east-1/2024/03/18");
    std::fs::create_dir_all(&forged).expect("mkdir");
    let event = |id: &str, t: &str| {
        format!(
            r#"{{"eventVersion":"1.08","eventID":"{id}","eventTime":"{t}","eventSource":"s3.amazonaws.com","eventName":"GetObject","awsRegion":"us-east-1","recipientAccountId":"123456789012"}}"#
        )
    };
    let records = format!(
        r#"{{"Records":[{},{}]}}"#,
        event("ev-year-0000", "0000-01-01T00:00:00Z"),
        event("ev-year-9999", "9999-12-31T23:00:00Z")
    );
    std::fs::write(
        forged.join("123456789012_CloudTrail_us-east-1_20240318T1400Z_forged.json.gz"),
        fixtures::gzip(records.as_bytes()),
    )
    .expect("write");
    let run = trailhose(
        &[
            "process",
            input.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
        &[],
    );
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let events = exp.events.len() + exp.pretty_ids.len();

    // The table's one layout, as its DDL projects it (the error output is outside it).
    let script = format!(
        r#"
import duckdb
rows = duckdb.sql("""
  SELECT eventID, trailhoseArrivalTime, year, month, day, hour
  FROM read_json('{root}/year=*/*/*/*/*.json.gz', hive_partitioning = true,
                 columns = {{'eventID': 'VARCHAR', 'eventTime': 'VARCHAR',
                             'trailhoseArrivalTime': 'VARCHAR'}})
""").fetchall()
print(len(rows))
for r in rows:
    if r[1] is not None:
        print("|".join(str(x) for x in r))
"#,
        root = out.display()
    );
    // The test venv's python when the suite runs outside scripts/test.sh's PATH.
    let venv = concat!(env!("CARGO_MANIFEST_DIR"), "/target/test-venv/bin/python3");
    let python = if std::path::Path::new(venv).exists() {
        venv
    } else {
        "python3"
    };
    let py = std::process::Command::new(python)
        .args(["-c", &script])
        .output()
        .expect("python3");
    assert!(
        py.status.success(),
        "DuckDB (PyPI duckdb, installed by scripts/moto-env.sh) read the tree: {}",
        String::from_utf8_lossy(&py.stderr)
    );
    let stdout = String::from_utf8_lossy(&py.stdout);
    let mut lines = stdout.lines();
    let total: usize = lines.next().and_then(|l| l.parse().ok()).expect("count");
    assert!(
        total >= events,
        "DuckDB saw {total} of at least {events} events"
    );
    let mut untimed: Vec<&str> = lines.collect();
    untimed.sort();
    assert_eq!(untimed.len(), 4, "{untimed:?}");
    let ids = ["ev-bad-time", "ev-no-time", "ev-year-0000", "ev-year-9999"];
    for (line, id) in untimed.iter().zip(ids) {
        let f: Vec<&str> = line.split('|').collect();
        assert_eq!(f.len(), 6, "{line}");
        assert_eq!(f[0], id);
        // The Hive partition columns are the arrival time's hour.
        let t = f[1];
        assert_eq!(
            (f[2], f[3], f[4], f[5]),
            (&t[0..4], &t[5..7], &t[8..10], &t[11..13]),
            "{line}"
        );
    }
    assert!(!out.join("unknown-time").exists());
}

/// Logs to a pipe or file are plain text (no colour codes); `--version` names the commit;
/// `check-config --print` shows defaults and masks secrets.
#[test]
fn cli_habits_plain_logs_version_and_effective_config() {
    let tmp = TempDir::new("cli");
    let input = tmp.path().join("in");
    fixtures::write_all(&input);
    let out = tmp.path().join("out");
    let run = trailhose(
        &[
            "process",
            input.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
        &[],
    );
    assert!(run.status.success());
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        stderr.contains("WARN"),
        "the bad fixture files log warnings: {stderr}"
    );
    assert!(
        !stderr.contains('\u{1b}'),
        "colour codes in piped logs: {stderr:?}"
    );

    let v = trailhose(&["--version"], &[]);
    let v = String::from_utf8_lossy(&v.stdout);
    assert!(
        v.starts_with(concat!(
            "trailhose ",
            env!("CARGO_PKG_VERSION"),
            " (commit "
        )),
        "{v}"
    );
    assert!(v.contains("features: ") && v.contains("profile: "), "{v}");

    let cfg = tmp.path().join("t.toml");
    std::fs::write(
        &cfg,
        "[[transforms]]\nname = \"redact\"\npath = \"r.wasm\"\nconfig = { salt = \"s3cr3t\" }\n",
    )
    .unwrap();
    let p = trailhose(&["check-config", cfg.to_str().unwrap(), "--print"], &[]);
    let text = String::from_utf8_lossy(&p.stdout);
    assert!(p.status.success(), "{}", String::from_utf8_lossy(&p.stderr));
    assert!(
        text.contains("max_age_secs = 300") && text.contains("<masked>"),
        "{text}"
    );
    assert!(!text.contains("s3cr3t"), "{text}");
}

#[test]
fn a_progress_line_is_drawn_on_a_terminal_only() {
    let tmp = TempDir::new("progress");
    let input = tmp.path().join("in");
    fixtures::write_all(&input);
    let bin = env!("CARGO_BIN_EXE_trailhose");
    let cmd = |extra: &str, out: &str| {
        format!(
            "{bin} process {} --out {} {extra}",
            input.display(),
            tmp.path().join(out).display()
        )
    };
    // `script` gives the command a pseudo-terminal and records what it drew.
    let on_tty = |c: String| {
        let o = std::process::Command::new("script")
            .args(["-qec", &c, "/dev/null"])
            .output()
            .expect("util-linux script");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let drawn = on_tty(cmd("", "a"));
    assert!(
        drawn.contains("\r\u{1b}[2K")
            && drawn.contains(" files, ")
            && drawn.contains(" events/s, "),
        "no progress line on a terminal: {drawn:?}"
    );
    let quiet = on_tty(cmd("--quiet", "b"));
    assert!(!quiet.contains(" events/s, "), "--quiet drew: {quiet:?}");
    assert!(
        quiet.contains("events_in="),
        "the summary still prints: {quiet:?}"
    );

    let piped = trailhose(
        &[
            "process",
            input.to_str().unwrap(),
            "--out",
            tmp.path().join("c").to_str().unwrap(),
        ],
        &[],
    );
    let stderr = String::from_utf8_lossy(&piped.stderr);
    assert!(
        !stderr.contains(" events/s, ") && !stderr.contains('\r'),
        "progress drawn into a pipe: {stderr:?}"
    );
}

/// The README's first command (here with `--out`, so the checkout stays clean): the shipped
/// sample data and config give every event, its geo, and the truncated sample's error record.
#[test]
fn the_readme_first_command_runs_on_the_shipped_sample_data() {
    let tmp = TempDir::new("first-command");
    let out = tmp.path().join("out");
    let run = trailhose(
        &[
            "process",
            "examples/data",
            "--config",
            "examples/local.toml",
            "--out",
            out.to_str().unwrap(),
        ],
        &[],
    );
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(
        stdout.contains("events_in=10 events_out=10 errors=1"),
        "{stdout}"
    );
    let mut events = 0;
    let mut with_geo = 0;
    let mut errors = 0;
    for entry in walkdir::WalkDir::new(&out).into_iter().flatten() {
        if !entry.file_type().is_file() {
            continue;
        }
        let name = entry.path().to_string_lossy().into_owned();
        let text = decode(&name, &std::fs::read(entry.path()).expect("read"));
        if name.contains("/errors/") {
            errors += text.lines().count();
            continue;
        }
        assert!(name.contains("/year="), "{name}");
        for line in text.lines() {
            events += 1;
            with_geo += usize::from(line.contains("\"geo\":{"));
        }
    }
    assert_eq!(events, 10);
    assert!(with_geo > 0, "the demo databases located some addresses");
    assert_eq!(errors, 1, "the truncated sample's error record");
}

/// Holds the first PutObject for ten minutes: a connection that takes a body and never answers.
fn stall_first_put(line: &str) -> Option<(&'static str, &'static str)> {
    static STALLED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let put = line.starts_with("PUT ") && !line.contains("uploadId=");
    if put && !STALLED.swap(true, std::sync::atomic::Ordering::SeqCst) {
        std::thread::sleep(std::time::Duration::from_secs(600));
    }
    None
}

/// A PUT that never answers is dropped after `output.s3.attempt_timeout_secs` and retried:
/// the object is written and the run ends, instead of waiting on the stalled connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_that_never_answers_is_retried_after_the_attempt_timeout() {
    let (moto, s3, proxy) = big_out_behind(stall_first_put).await;
    let tmp = TempDir::new("s3-stall");
    let input = tmp.path().join("in");
    let day = input.join("AWSLogs/123456789012/CloudTrail/us-east-1/2024/03/18");
    std::fs::create_dir_all(&day).expect("mkdir");
    let json = trailhose::synth::Generator::new(9).delivery_file(200_000);
    std::fs::write(day.join("f.json.gz"), fixtures::gzip(&json)).expect("write");
    let config = tmp.path().join("trailhose.toml");
    std::fs::write(
        &config,
        format!(
            "[output]\nurl = \"s3://big-out/x\"\nkey_template = \"dt={{year}}-{{month}}-{{day}}/\"\n[output.s3]\nendpoint_url = \"{}\"\nforce_path_style = true\nattempt_timeout_secs = 5\n",
            proxy.endpoint()
        ),
    )
    .expect("config");
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_trailhose"));
    cmd.args([
        "process",
        input.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
    ])
    .env("TRAILHOSE_LOG", "warn")
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::piped());
    for (k, v) in moto.env() {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("start");
    // Generous: the stalled connection would hold the run for ten minutes.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("the run waited on the stalled PUT");
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut stderr)
        .expect("stderr");
    assert!(status.success(), "{stderr}");
    let puts = proxy
        .seen()
        .iter()
        .filter(|r| r.head.starts_with("PUT ") && !r.head.contains("uploadId="))
        .count();
    assert!(puts >= 2, "the stalled PUT was sent again ({puts})");
    let objects = s3_objects(&s3, "big-out", "x/").await;
    assert_eq!(
        objects.len(),
        1,
        "{:?}",
        objects.iter().map(|o| &o.0).collect::<Vec<_>>()
    );
}
