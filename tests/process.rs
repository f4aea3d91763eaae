//! End to end: the `trailhose process` binary on the project's fixtures, to a local directory and
//! to S3 on a real moto_server.

mod common;

use std::collections::BTreeMap;

use common::{Moto, TempDir, fixtures, local_objects, s3_objects, trailhose};
use serde_json::Value;

/// Splits output objects into event lines (with their keys) and error records.
struct Output {
    /// (object key, line)
    events: Vec<(String, String)>,
    errors: Vec<Value>,
}

fn split_output(objects: &[(String, String)]) -> Output {
    let mut out = Output {
        events: Vec::new(),
        errors: Vec::new(),
    };
    for (key, text) in objects {
        assert!(
            text.ends_with('\n') || text.is_empty(),
            "{key}: JSON lines end in a newline"
        );
        for line in text.lines() {
            if key.starts_with("errors/") {
                out.errors
                    .push(serde_json::from_str(line).expect("error records are JSON"));
            } else {
                out.events.push((key.clone(), line.to_owned()));
            }
        }
    }
    out
}

fn id_of(line: &str) -> String {
    let v: Value = serde_json::from_str(line)
        .unwrap_or_else(|e| panic!("output line is JSON ({e}): {line:.200}"));
    v["eventID"].as_str().expect("eventID").to_owned()
}

const LONDON_GEO: &str = r#""geo":{"latitude":51.5142,"longitude":-0.0931,"city":"London","subdivision_isocode":"ENG","country":"United Kingdom","country_isocode":"GB","asn":20712,"as_org":"Andrews & Arnold Ltd"}"#;

/// Everything the fixture set promises, checked on whatever store the objects came from.
fn check_fixture_output(exp: &fixtures::Expected, objects: &[(String, String)]) {
    let out = split_output(objects);

    // Every key sorts by time and names its compression.
    for (key, _) in objects {
        let name = key.rsplit('/').next().unwrap_or_default();
        assert!(
            name.len() > 17 && name.as_bytes()[8] == b'T',
            "object name starts with a timestamp: {key}"
        );
        assert!(name.ends_with(".json.gz"), "{key}");
    }

    // Every eventID exactly once: all good events, the pretty one, and the truncated file's
    // events that were complete before the cut.
    let mut seen: BTreeMap<String, (String, String)> = BTreeMap::new();
    for (key, line) in &out.events {
        let id = id_of(line);
        assert!(
            seen.insert(id.clone(), (key.clone(), line.clone()))
                .is_none(),
            "{id} written twice"
        );
    }
    let kept_trunc: Vec<&String> = exp
        .truncated_ids
        .iter()
        .filter(|id| seen.contains_key(*id))
        .collect();
    assert!(
        !kept_trunc.is_empty(),
        "events before the truncation are kept"
    );
    for id in exp.events.keys().chain(exp.pretty_ids.iter()) {
        assert!(seen.contains_key(id), "{id} missing from the output");
    }
    assert_eq!(
        seen.len(),
        exp.events.len() + exp.pretty_ids.len() + kept_trunc.len(),
        "no unexpected events (lost files' contents must not appear as events)"
    );

    // Original bytes are preserved exactly; geo is spliced in before the closing brace.
    for (id, raw) in &exp.events {
        let line = &seen[id].1;
        let body = &raw[..raw.len() - 1];
        assert!(line.starts_with(body), "{id}: original bytes preserved");
        let added = &line[body.len()..];
        assert!(
            added == "}" || (added.starts_with(",\"geo\":{") && added.ends_with("}}")),
            "{id}: only geo added: {added}"
        );
    }
    let pretty = &seen["ev-pretty"].1;
    let v: Value = serde_json::from_str(pretty).expect("pretty event is one JSON line");
    assert_eq!(v["requestParameters"]["a"], serde_json::json!([1, 2]));

    // Geo: exact keys and order; absent values omitted; non-addresses get none.
    let line = |id: &str| seen[id].1.as_str();
    assert!(
        line("ev-london").ends_with(&format!(",{LONDON_GEO}}}")),
        "{}",
        line("ev-london")
    );
    assert!(line("ev-tokyo-v6").contains(r#""geo":{"latitude":35.6895,"longitude":139.6917,"city":"Tokyo","subdivision_isocode":"13","country":"Japan","country_isocode":"JP"}"#));
    assert!(line("ev-amazon-country-only").ends_with(r#","geo":{"country":"United States","country_isocode":"US","asn":16509,"as_org":"AMAZON-02"}}"#));
    for id in ["ev-aws-internal", "ev-lambda", "ev-no-ip", "ev-unknown-ip"] {
        assert!(!line(id).contains("\"geo\""), "{id} has no geo");
    }
    let unicode: Value = serde_json::from_str(line("ev-unicode")).expect("json");
    assert_eq!(unicode["geo"]["city"], "Linköping");
    assert_eq!(unicode["requestParameters"]["emoji"], "🚀");

    // Partitions: event hour in UTC; missing or malformed times in the fallback partition.
    let key = |id: &str| seen[id].0.as_str();
    assert!(key("ev-london").starts_with("year=2024/month=03/day=18/hour=14/"));
    assert!(key("ev-org-1").starts_with("year=2024/month=03/day=18/hour=15/"));
    assert!(key("ev-offset-time").starts_with("year=2024/month=03/day=18/hour=14/"));
    assert!(key("ev-no-time").starts_with("unknown-time/"));
    assert!(key("ev-bad-time").starts_with("unknown-time/"));

    // Errors: one record per bad file (three for the mixed file), naming source and reason.
    let mut by_file: BTreeMap<String, Vec<&Value>> = BTreeMap::new();
    for e in &out.errors {
        let source = e["source"].as_str().expect("source");
        let name = source.rsplit('/').next().unwrap_or_default().to_owned();
        by_file.entry(name).or_default().push(e);
    }
    for (name, reason) in &exp.bad_files {
        let recs = by_file
            .get(*name)
            .unwrap_or_else(|| panic!("no error record for {name}"));
        assert!(
            recs.iter().all(|r| r["reason"] == *reason),
            "{name}: {recs:?}"
        );
        assert!(
            recs.iter()
                .all(|r| r["detail"].as_str().is_some_and(|d| !d.is_empty()))
        );
    }
    let mixed = &by_file["mixed-records.json.gz"];
    let records: Vec<&Value> = mixed.iter().map(|r| &r["record"]).collect();
    assert_eq!(
        records,
        [
            &Value::from("a string, not an event"),
            &Value::from(42),
            &Value::Null
        ]
    );
    let trunc = &by_file["truncated.json.gz"][0];
    assert_eq!(trunc["events_kept"], kept_trunc.len() as u64);
    assert!(
        trunc["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("kept")
    );
    assert_eq!(
        by_file.len(),
        exp.bad_files.len(),
        "no error records for good files: {by_file:?}"
    );
}

fn fixture_dbs(dir: &std::path::Path) -> (String, String) {
    let city = dir.join("city.mmdb");
    let asn = dir.join("asn.mmdb");
    common::mmdb::write_city_db(&city);
    common::mmdb::write_asn_db(&asn);
    (city.display().to_string(), asn.display().to_string())
}

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
