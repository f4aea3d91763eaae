//! End to end: `trailhose process` and `trailhose run` (on moto) with `output.schema = "ocsf"`.
//! Every OCSF record the binary writes is validated against the official OCSF 1.1.0 JSON
//! schema of its class (`scripts/ocsf_validate.py`, PyPI `ocsf-json-schema`, installed by
//! `scripts/moto-env.sh`), and the golden cases come out as their checked-in records.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use common::checks::{fixture_dbs, split_output};
use common::mmdb::LONDON_IP;
use common::sqs::*;
use common::{
    TempDir, eventually, fixtures, free_port, http_get, local_objects, s3_objects, trailhose,
};

const DAY: &str = "AWSLogs/111122223333/CloudTrail/us-east-1/2024/03/18";
/// Security Lake's custom-source layout, a source per class.
const LAKE: &str =
    "ext/trailhose-{ocsf_class}/region={region}/accountId={account}/eventDay={year}{month}{day}/";

fn ocsf_dir(sub: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/ocsf")
        .join(sub)
}

/// The golden cases (CloudTrail events), by name.
fn cases() -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(ocsf_dir("cases")).expect("cases") {
        let p = e.expect("case").path();
        let name = p.file_stem().expect("name").to_string_lossy().into_owned();
        let text = std::fs::read_to_string(&p).expect("case");
        out.insert(name, text.trim_end().to_owned());
    }
    assert_eq!(out.len(), 9);
    out
}

/// One CloudTrail log file holding every golden case, plus events whose fields have the wrong
/// types (they must map to valid records too).
fn write_cases(dir: &Path) -> usize {
    let mut records: Vec<String> = cases().into_values().collect();
    records.extend([
        r#"{"eventID":"ocsf-hostile-1","userIdentity":"x","resources":{"a":1},"eventTime":5,"eventSource":7}"#.to_owned(),
        r#"{"eventID":"ocsf-hostile-2","eventSource":"iam.amazonaws.com","eventName":"CreateUser","requestParameters":"x","responseElements":[1]}"#.to_owned(),
        r#"{"eventID":"ocsf-hostile-3","eventSource":"sts.amazonaws.com","eventName":"AssumeRole","sourceIPAddress":"300.1.1.1","responseElements":{"assumedRoleUser":7}}"#.to_owned(),
    ]);
    let body = format!("{{\"Records\":[{}]}}", records.join(","));
    let path = dir.join(DAY);
    std::fs::create_dir_all(&path).expect("dir");
    std::fs::write(
        path.join("111122223333_CloudTrail_us-east-1_20240318T1415Z_ocsf.json.gz"),
        fixtures::gzip(body.as_bytes()),
    )
    .expect("write");
    records.len()
}

/// Runs the validator over `records` (JSON lines); panics with its report when any is invalid.
fn validate(dir: &Path, records: &[String]) {
    let file = dir.join("ocsf-records.json");
    std::fs::write(&file, records.join("\n") + "\n").expect("records");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/ocsf_validate.py");
    let out = Command::new("python3")
        .arg(&script)
        .arg(&file)
        .output()
        .expect("python3 with ocsf-json-schema and jsonschema (scripts/moto-env.sh installs them)");
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "OCSF validation failed:\n{report}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        report.contains(&format!("validated {} records, 0 invalid", records.len())),
        "{report}"
    );
}

/// The validator's report on `records`: whether it passed, and what it printed.
fn validator(dir: &Path, records: &[String]) -> (bool, String) {
    let file = dir.join("ocsf-records.json");
    std::fs::write(&file, records.join("\n") + "\n").expect("records");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/ocsf_validate.py");
    let out = Command::new("python3")
        .arg(&script)
        .arg(&file)
        .output()
        .expect("python3 with ocsf-json-schema and jsonschema (scripts/moto-env.sh installs them)");
    let report =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), report)
}

/// The validator is not a rubber stamp: a golden record passes, and each corruption of it (an
/// attribute its class lacks, a wrong type, an id outside its enum, ids that disagree) fails.
#[test]
fn the_validator_rejects_records_that_are_not_ocsf() {
    let tmp = TempDir::new("ocsf-validator");
    let text =
        std::fs::read_to_string(ocsf_dir("expected").join("create_user.json")).expect("golden");
    let good: Value = serde_json::from_str(&text).expect("golden JSON");
    let (ok, report) = validator(tmp.path(), &[good.to_string()]);
    assert!(
        ok && report.contains("validated 1 records, 0 invalid"),
        "{report}"
    );
    type Corruption = (&'static str, fn(&mut Value));
    let corrupt: [Corruption; 5] = [
        ("unknown attribute", |v| {
            v["eventName"] = "CreateUser".into()
        }),
        ("nested unknown", |v| v["user"]["userName"] = "dave".into()),
        ("wrong type", |v| v["time"] = "2024-03-18T14:13:00Z".into()),
        ("outside the enum", |v| v["activity_id"] = 57.into()),
        ("ids disagree", |v| v["activity_id"] = 6.into()),
    ];
    for (what, change) in corrupt {
        let mut v = good.clone();
        change(&mut v);
        let (ok, report) = validator(tmp.path(), &[v.to_string()]);
        assert!(
            !ok && report.contains("1 invalid"),
            "{what} passed: {report}"
        );
    }
}

/// Checks the golden cases against their checked-in records (the location the fixture city
/// database adds aside), and that every record is OCSF.
fn check_cases(records: &[String], with_geo: bool) {
    let by_uid: BTreeMap<String, Value> = records
        .iter()
        .map(|l| serde_json::from_str::<Value>(l).expect("OCSF JSON line"))
        .filter_map(|v| Some((v["metadata"]["uid"].as_str()?.to_owned(), v)))
        .collect();
    for name in cases().keys() {
        let want: Value = serde_json::from_slice(
            &std::fs::read(ocsf_dir("expected").join(format!("{name}.json"))).expect("expected"),
        )
        .expect("expected JSON");
        let uid = want["metadata"]["uid"].as_str().expect("uid");
        let mut got = by_uid
            .get(uid)
            .unwrap_or_else(|| panic!("{name} ({uid}) not written"))
            .clone();
        if with_geo && got["src_endpoint"]["ip"] == LONDON_IP {
            let loc = &got["src_endpoint"]["location"];
            assert_eq!(loc["city"], "London", "{name}: {loc}");
            assert_eq!(loc["country"], "GB", "{name}: {loc}");
            assert!(
                loc["coordinates"].as_array().is_some_and(|c| c.len() == 2),
                "{loc}"
            );
            assert!(
                got["unmapped"]["geo.asn"].is_string(),
                "{name}: ASN kept in unmapped"
            );
        }
        if let Some(ep) = got["src_endpoint"].as_object_mut() {
            ep.remove("location");
        }
        if let Some(u) = got["unmapped"].as_object_mut() {
            u.retain(|k, _| !k.starts_with("geo."));
        }
        assert_eq!(got, want, "{name}");
    }
}

#[test]
fn process_writes_ocsf_records_that_validate_against_the_schema() {
    let tmp = TempDir::new("ocsf-process");
    let input = tmp.path().join("in");
    let extra = write_cases(&input);
    // The whole fixture set too (every record shape the splitter passes), geo-enriched.
    let exp = fixtures::write_all(&input);
    let (city, asn) = fixture_dbs(tmp.path());
    let config = tmp.path().join("ocsf.toml");
    std::fs::write(
        &config,
        format!(
            "[output]\nschema = \"ocsf\"\nkey_template = \"{LAKE}\"\n[geoip]\ncity_db = \"{city}\"\nasn_db = \"{asn}\"\n"
        ),
    )
    .expect("config");
    let out_dir = tmp.path().join("out");
    let run = trailhose(
        &[
            "process",
            "--config",
            &config.display().to_string(),
            "--out",
            &out_dir.display().to_string(),
            &input.display().to_string(),
        ],
        &[],
    );
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let objects = local_objects(&out_dir);
    let output = split_output(&objects);
    let events: Vec<String> = output.events.iter().map(|(_, l)| l.clone()).collect();
    assert!(
        events.len() >= extra + exp.events.len(),
        "{} records for {} + {} events",
        events.len(),
        extra,
        exp.events.len()
    );
    // Every event line is an OCSF record (no CloudTrail event slipped through), in the object
    // of its class under Security Lake's layout.
    let mut classes = std::collections::BTreeSet::new();
    for (key, line) in &output.events {
        let v: Value = serde_json::from_str(line).expect("JSON line");
        assert_eq!(v["metadata"]["version"], "1.1.0", "{line}");
        assert!(v.get("eventID").is_none(), "{line}");
        let slug = match v["class_uid"].as_u64() {
            Some(3001) => "account_change",
            Some(3002) => "authentication",
            Some(6003) => "api_activity",
            other => panic!("class {other:?}: {line}"),
        };
        classes.insert(slug);
        assert!(
            key.starts_with(&format!("ext/trailhose-{slug}/region=")),
            "{key}: {line}"
        );
        if v["metadata"]["uid"]
            .as_str()
            .is_some_and(|u| u.starts_with("ocsf-0"))
        {
            let region = v["cloud"]["region"].as_str().expect("region");
            let part = format!("/region={region}/accountId=111122223333/eventDay=20240318/");
            assert!(key.contains(&part), "{key}: {line}");
        }
    }
    assert_eq!(classes.len(), 3, "{classes:?}");
    // Bad files still give error records (JSON, not OCSF).
    assert!(!output.errors.is_empty());
    check_cases(&events, true);
    validate(tmp.path(), &events);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_writes_ocsf_records_to_s3_from_sqs_notifications() {
    let (moto, q) = setup("ocsf-work", 5).await;
    let (sqs, s3) = (moto.sqs(), moto.s3());
    let tmp = TempDir::new("ocsf-run");
    let input = tmp.path().join("in");
    let n = write_cases(&input);
    let key = format!("{DAY}/111122223333_CloudTrail_us-east-1_20240318T1415Z_ocsf.json.gz");
    s3.put_object()
        .bucket("trail-logs")
        .key(&key)
        .body(std::fs::read(input.join(&key)).expect("file").into())
        .send()
        .await
        .expect("upload");
    send(&sqs, &q.url, &cloudtrail("trail-logs", &[&key])).await;

    let port = free_port();
    let eps = (moto.endpoint.as_str(), moto.endpoint.as_str());
    // Shipped batch defaults: the records are written when SIGTERM seals the batch.
    let settings = Settings {
        output: "schema = \"ocsf\"\nocsf.raw_data = true".into(),
        ..Settings::default()
    };
    let config = write_config_with(tmp.path(), eps, &q.url, port, &settings);
    let log = tmp.path().join("worker.log");
    let mut worker = start_worker(&moto, &config, &log);
    eventually(60, "the file to be split", || async {
        metric(port, "trailhose_files_total{outcome=\"ok\"}") >= 1.0
    })
    .await;
    assert!(http_get(port, "/healthz").is_some());
    signal(&worker, "-TERM");
    assert!(
        wait_exit(&mut worker, 25),
        "clean exit on SIGTERM; log:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let objects = s3_objects(&s3, "trail-out", "ct/").await;
    let output = split_output(&objects);
    let events: Vec<String> = output.events.iter().map(|(_, l)| l.clone()).collect();
    assert_eq!(events.len(), n, "{objects:?}");
    assert!(output.errors.is_empty(), "{:?}", output.errors);
    // raw_data keeps each CloudTrail event whole; without it, the records are the golden ones.
    let cases: Vec<String> = cases().into_values().collect();
    let mut stripped = Vec::new();
    for line in &events {
        let mut v: Value = serde_json::from_str(line).expect("JSON line");
        let raw = v["raw_data"].as_str().expect("raw_data").to_owned();
        let event: Value = serde_json::from_str(&raw).expect("raw_data is the event");
        assert_eq!(event["eventID"], v["metadata"]["uid"], "{line}");
        if v["metadata"]["uid"]
            .as_str()
            .is_some_and(|u| u.starts_with("ocsf-0"))
        {
            assert!(cases.contains(&raw), "{raw}");
        }
        v.as_object_mut().expect("object").remove("raw_data");
        stripped.push(v.to_string());
    }
    check_cases(&stripped, true);
    validate(tmp.path(), &events);
    // The notification was acknowledged once its records were written.
    eventually(30, "the queue to drain", || async {
        depth(&sqs, &q.url).await == (0, 0)
    })
    .await;
}

/// Optional: maps a directory of real CloudTrail delivery files (e.g. `../shared/real-cloudtrail/s3`)
/// and validates every record. Run with
/// `TRAILHOSE_REAL_CLOUDTRAIL=DIR cargo test --test ocsf real -- --ignored --nocapture`.
#[test]
#[ignore = "needs TRAILHOSE_REAL_CLOUDTRAIL=<dir of CloudTrail files>"]
fn real_cloudtrail_maps_to_valid_ocsf() {
    let dir = std::env::var("TRAILHOSE_REAL_CLOUDTRAIL").expect("TRAILHOSE_REAL_CLOUDTRAIL");
    let tmp = TempDir::new("ocsf-real");
    let config = tmp.path().join("ocsf.toml");
    std::fs::write(
        &config,
        format!("[output]\nschema = \"ocsf\"\nkey_template = \"{LAKE}\"\n"),
    )
    .expect("config");
    let out_dir = tmp.path().join("out");
    let run = trailhose(
        &[
            "process",
            "--config",
            &config.display().to_string(),
            "--out",
            &out_dir.display().to_string(),
            &dir,
        ],
        &[],
    );
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let output = split_output(&local_objects(&out_dir));
    let events: Vec<String> = output.events.iter().map(|(_, l)| l.clone()).collect();
    let mut by_class: BTreeMap<String, u64> = BTreeMap::new();
    for (key, _) in &output.events {
        let class = key.split('/').nth(1).unwrap_or("?").to_owned();
        *by_class.entry(class).or_default() += 1;
    }
    println!("{} records, by class: {by_class:?}", events.len());
    validate(tmp.path(), &events);
}

/// OCSF Parquet under Security Lake's layout: one class per object, each with its class's
/// columns; read back with the Arrow reader, the rows are the JSON records again (and valid).
#[test]
fn process_writes_ocsf_parquet_one_class_per_object() {
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

    let tmp = TempDir::new("ocsf-parquet");
    let input = tmp.path().join("in");
    let n = write_cases(&input);
    let config = tmp.path().join("ocsf.toml");
    std::fs::write(
        &config,
        format!("[output]\nschema = \"ocsf\"\nformat = \"parquet\"\nkey_template = \"{LAKE}\"\n"),
    )
    .expect("config");
    let out_dir = tmp.path().join("out");
    let run = trailhose(
        &[
            "process",
            "--config",
            &config.display().to_string(),
            "--out",
            &out_dir.display().to_string(),
            &input.display().to_string(),
        ],
        &[],
    );
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let mut records = Vec::new();
    let mut objects = 0;
    for entry in walkdir::WalkDir::new(&out_dir) {
        let entry = entry.expect("walk");
        let key = entry
            .path()
            .strip_prefix(&out_dir)
            .expect("under")
            .to_string_lossy()
            .into_owned();
        if !entry.file_type().is_file() || !key.ends_with(".parquet") {
            continue;
        }
        objects += 1;
        let slug = key
            .split('/')
            .nth(1)
            .and_then(|s| s.strip_prefix("trailhose-"))
            .expect("source");
        let body = bytes::Bytes::from(std::fs::read(entry.path()).expect("read"));
        let reader = ParquetRecordBatchReaderBuilder::try_new(body)
            .expect("parquet")
            .build()
            .expect("reader");
        let mut class_uids = std::collections::BTreeSet::new();
        for batch in reader {
            let batch = batch.expect("batch");
            let names: Vec<String> = batch
                .schema()
                .fields()
                .iter()
                .map(|f| f.name().clone())
                .collect();
            assert!(names.contains(&"api".to_owned()), "{key}: {names:?}");
            assert_eq!(
                names.contains(&"resources".to_owned()),
                slug == "api_activity",
                "{key}: {names:?}"
            );
            assert_eq!(
                names.contains(&"user".to_owned()),
                slug != "api_activity",
                "{key}: {names:?}"
            );
            let mut w = arrow::json::LineDelimitedWriter::new(Vec::new());
            w.write(&batch).expect("to json");
            w.finish().expect("finish");
            for line in String::from_utf8(w.into_inner()).expect("utf8").lines() {
                let mut v: Value = serde_json::from_str(line).expect("row");
                // `unmapped` is stored as its JSON text.
                if let Some(text) = v["unmapped"].as_str() {
                    v["unmapped"] = serde_json::from_str(text).expect("unmapped JSON");
                }
                class_uids.insert(v["class_uid"].as_u64().expect("class_uid"));
                records.push(v.to_string());
            }
        }
        assert_eq!(class_uids.len(), 1, "{key}: one class per object");
    }
    assert!(objects >= 3, "{objects} objects");
    assert_eq!(records.len(), n);
    check_cases(&records, false);
    validate(tmp.path(), &records);
}

/// The mapping runs after the transform modules: what a redact module masks is masked in every
/// attribute it maps to, in `unmapped` and in `raw_data`.
#[test]
fn process_maps_after_transforms_so_masked_values_stay_masked() {
    let tmp = TempDir::new("ocsf-redact");
    let module = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target/transforms/wasm32-wasip2/release/redact.wasm");
    assert!(
        module.is_file(),
        "{} is missing: run scripts/build-transforms.sh (scripts/test.sh does)",
        module.display()
    );
    let input = tmp.path().join("in");
    let case = &cases()["assume_role_with_saml"];
    let secret = "ASIAEXAMPLESAML0001";
    assert!(case.contains(secret));
    let path = input.join(DAY);
    std::fs::create_dir_all(&path).expect("dir");
    std::fs::write(
        path.join("111122223333_CloudTrail_us-east-1_20240318T1415Z_redact.json.gz"),
        fixtures::gzip(format!("{{\"Records\":[{case}]}}").as_bytes()),
    )
    .expect("write");
    let config = tmp.path().join("ocsf.toml");
    std::fs::write(
        &config,
        format!(
            "[output]\nschema = \"ocsf\"\n[output.ocsf]\nraw_data = true\n[[transforms]]\nname = \"redact\"\npath = \"{}\"\nconfig = {{ paths = \"responseElements.credentials.accessKeyId\" }}\n",
            module.display()
        ),
    )
    .expect("config");
    let out_dir = tmp.path().join("out");
    let run = trailhose(
        &[
            "process",
            "--config",
            &config.display().to_string(),
            "--out",
            &out_dir.display().to_string(),
            &input.display().to_string(),
        ],
        &[],
    );
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let output = split_output(&local_objects(&out_dir));
    assert_eq!(output.events.len(), 1, "{:?}", output.events);
    let line = &output.events[0].1;
    assert!(!line.contains(secret), "{line}");
    let v: Value = serde_json::from_str(line).expect("JSON line");
    assert_eq!(v["class_uid"], 3002, "{line}");
    assert_eq!(v["user"]["credential_uid"], "****", "{line}");
    assert!(
        v["raw_data"].as_str().is_some_and(|r| r.contains("****")),
        "{line}"
    );
    validate(tmp.path(), std::slice::from_ref(line));
}
