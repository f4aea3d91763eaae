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
    assert_eq!(out.len(), 12);
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
    let out = Command::new(venv_python())
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
    let out = Command::new(venv_python())
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
                // `unmapped` is a map (an object here); an enrichment's `data` is JSON text.
                assert!(
                    v["unmapped"].is_object() || v["unmapped"].is_null(),
                    "{line}"
                );
                if let Some(list) = v.get_mut("enrichments").and_then(Value::as_array_mut) {
                    for e in list {
                        let text = e["data"].as_str().expect("data").to_owned();
                        e["data"] = serde_json::from_str(&text).expect("data JSON");
                    }
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

/// The golden cases in one delivery file, latest first: every object's rows must be put back in
/// time order.
fn write_cases_latest_first(dir: &Path) -> usize {
    let mut records: Vec<(String, String)> = cases()
        .into_values()
        .map(|c| {
            let v: Value = serde_json::from_str(&c).expect("case");
            (v["eventTime"].as_str().expect("eventTime").to_owned(), c)
        })
        .collect();
    records.sort();
    records.reverse();
    let body = format!(
        "{{\"Records\":[{}]}}",
        records
            .iter()
            .map(|(_, c)| c.as_str())
            .collect::<Vec<_>>()
            .join(",")
    );
    let path = dir.join(DAY);
    std::fs::create_dir_all(&path).expect("dir");
    std::fs::write(
        path.join("111122223333_CloudTrail_us-east-1_20240318T1415Z_lake.json.gz"),
        fixtures::gzip(body.as_bytes()),
    )
    .expect("write");
    records.len()
}

fn venv_python() -> &'static str {
    let venv = concat!(env!("CARGO_MANIFEST_DIR"), "/target/test-venv/bin/python3");
    if Path::new(venv).exists() {
        venv
    } else {
        "python3"
    }
}

/// Runs a DuckDB script (PyPI duckdb, installed by scripts/moto-env.sh) with `root` as its
/// argument and returns what it printed.
fn duckdb(script: &str, root: &Path) -> String {
    let py = Command::new(venv_python())
        .args(["-c", script, &root.display().to_string()])
        .output()
        .expect("python3");
    assert!(
        py.status.success(),
        "DuckDB: {}",
        String::from_utf8_lossy(&py.stderr)
    );
    String::from_utf8_lossy(&py.stdout).into_owned()
}

/// Every Parquet object under `root`, read by DuckDB: its key, its rows (class, time, uid,
/// region, account) in file order, and the type of `unmapped`.
const READ_LAKE: &str = r#"
import duckdb, json, os, sys
root = sys.argv[1]
for d, _, names in sorted(os.walk(root)):
    for n in sorted(names):
        if not n.endswith(".parquet"):
            continue
        p = os.path.join(d, n)
        rel = os.path.relpath(p, root)
        rows = duckdb.sql(f"SELECT class_uid, time, metadata.uid, cloud.region, cloud.account.uid, typeof(unmapped) FROM read_parquet('{p}')").fetchall()
        print(json.dumps({"key": rel, "rows": rows}))
"#;

/// Checks Security Lake's rules on the objects under `root`: every object under
/// `ext/<source of its class>/region=/accountId=/eventDay=/`, Parquet, of one class, its rows
/// sorted by time and of its partition's region, account and day. Returns the uids read.
fn check_lake(root: &Path, source: impl Fn(&str) -> String, account: Option<&str>) -> Vec<String> {
    let mut uids = Vec::new();
    let mut objects = 0;
    for line in duckdb(READ_LAKE, root).lines() {
        let o: Value = serde_json::from_str(line).expect("DuckDB line");
        let key = o["key"].as_str().expect("key");
        objects += 1;
        let parts: Vec<&str> = key.split('/').collect();
        assert_eq!(parts.len(), 6, "{key}");
        assert_eq!(parts[0], "ext", "{key}");
        let (region, acct, day) = (
            parts[2].strip_prefix("region=").expect(key),
            parts[3].strip_prefix("accountId=").expect(key),
            parts[4].strip_prefix("eventDay=").expect(key),
        );
        assert!(parts[5].ends_with(".parquet"), "{key}");
        let rows = o["rows"].as_array().expect("rows");
        assert!(!rows.is_empty(), "{key}");
        let uid = rows[0][0].as_u64().expect("class_uid");
        let slug = match uid {
            3001 => "account_change",
            3002 => "authentication",
            6003 => "api_activity",
            other => panic!("{key}: class {other}"),
        };
        assert_eq!(parts[1], source(slug), "{key}: the source of {slug}");
        let mut last = i64::MIN;
        for r in rows {
            assert_eq!(r[0].as_u64(), Some(uid), "{key}: one class per object");
            let t = r[1].as_i64().expect("time");
            assert!(t >= last, "{key}: rows sorted by time ({last} then {t})");
            last = t;
            assert_eq!(r[3].as_str(), Some(region), "{key}");
            match account {
                Some(a) => assert_eq!(acct, a, "{key}"),
                None => assert_eq!(r[4].as_str(), Some(acct), "{key}"),
            }
            let d = trailhose::clock::Utc::from_unix(t.div_euclid(1000));
            let want = format!("{:04}{:02}{:02}", d.year, d.month, d.day);
            assert_eq!(day, want, "{key}");
            assert!(
                r[5].as_str().is_some_and(|t| t.starts_with("MAP(")),
                "{key}: unmapped is a map: {r}"
            );
            uids.push(r[2].as_str().expect("uid").to_owned());
        }
    }
    assert!(objects >= 3, "{objects} objects");
    uids.sort();
    uids
}

fn golden_uids() -> Vec<String> {
    let mut want: Vec<String> = cases()
        .values()
        .map(|c| {
            let v: Value = serde_json::from_str(c).expect("case");
            v["eventID"].as_str().expect("eventID").to_owned()
        })
        .collect();
    want.sort();
    want
}

/// `[output.security_lake]` through `trailhose process`: a source per class from a table, a
/// fixed account; read back by DuckDB (layout, one class per object, rows sorted by time), by
/// `trailhose query`, and described by `trailhose athena-ddl` column for column.
#[test]
fn process_writes_security_lake_objects_that_readers_and_the_ddl_agree_on() {
    let tmp = TempDir::new("ocsf-lake");
    let input = tmp.path().join("in");
    let n = write_cases_latest_first(&input);
    let config = tmp.path().join("lake.toml");
    std::fs::write(
        &config,
        "[output]\nurl = \"s3://aws-security-data-lake-us-east-1-x/\"\nschema = \"ocsf\"\nformat = \"parquet\"\n[output.security_lake]\naccount_id = \"999988887777\"\n[output.security_lake.source_name]\napi_activity = \"ct-api\"\nauthentication = \"ct-auth\"\naccount_change = \"ct-iam\"\n",
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
    let source = |slug: &str| match slug {
        "api_activity" => "ct-api".to_owned(),
        "authentication" => "ct-auth".to_owned(),
        _ => "ct-iam".to_owned(),
    };
    let uids = check_lake(&out_dir, source, Some("999988887777"));
    assert_eq!(uids.len(), n);
    assert_eq!(uids, golden_uids());

    // `trailhose query` reads the tree with the classes' columns and the partition columns.
    let q = trailhose(
        &[
            "query",
            &out_dir.display().to_string(),
            "SELECT class_uid, count(*) AS n, min(\"accountId\") AS a FROM events WHERE \"eventDay\" = '20240318' GROUP BY class_uid ORDER BY class_uid",
            "--csv",
        ],
        &[],
    );
    assert!(q.status.success(), "{}", String::from_utf8_lossy(&q.stderr));
    let text = String::from_utf8_lossy(&q.stdout);
    let rows: Vec<&str> = text.lines().skip(1).collect();
    assert_eq!(
        rows,
        [
            "3001,3,999988887777",
            "3002,5,999988887777",
            "6003,4,999988887777"
        ],
        "{text}"
    );
    let q = trailhose(
        &[
            "query",
            &out_dir.display().to_string(),
            "SELECT \"user\".name, is_mfa, unmapped['geo.asn'] IS NULL AS no_asn, metadata.profiles[1] AS p, get_field(api, 'operation') AS op FROM events WHERE metadata['uid'] = 'ocsf-0010-idc-sign-in'",
            "--csv",
        ],
        &[],
    );
    assert!(q.status.success(), "{}", String::from_utf8_lossy(&q.stderr));
    let text = String::from_utf8_lossy(&q.stdout);
    // Dotted and bracketed access to structs, maps and lists (DataFusion's nested
    // expressions), and get_field.
    assert_eq!(
        text.lines().nth(1),
        Some("erin,,true,cloud,UserAuthentication"),
        "{text}"
    );

    // The DDL's tables have exactly the columns (and types) of the objects of their class.
    let ddl = trailhose(
        &[
            "athena-ddl",
            "--config",
            &config.display().to_string(),
            "--table",
            "ocsf",
        ],
        &[],
    );
    assert!(
        ddl.status.success(),
        "{}",
        String::from_utf8_lossy(&ddl.stderr)
    );
    let ddl = String::from_utf8_lossy(&ddl.stdout).into_owned();
    let described = duckdb(
        r#"
import duckdb, json, os, sys
root = sys.argv[1]
seen = set()
for d, _, names in sorted(os.walk(root)):
    for n in sorted(names):
        src = d.split(os.sep + "ext" + os.sep)[1].split(os.sep)[0]
        if n.endswith(".parquet") and src not in seen:
            seen.add(src)
            cols = duckdb.sql(f"DESCRIBE SELECT * FROM read_parquet('{os.path.join(d, n)}', hive_partitioning = false)").fetchall()
            print(json.dumps({"source": src, "cols": [[c[0], c[1]] for c in cols]}))
"#,
        &out_dir,
    );
    let mut tables = 0;
    for line in described.lines() {
        let v: Value = serde_json::from_str(line).expect("describe");
        let src = v["source"].as_str().expect("source");
        let table = ddl
            .split("CREATE EXTERNAL TABLE ")
            .find(|t| t.contains(&format!("/ext/{src}/'")))
            .unwrap_or_else(|| panic!("no table over {src}:\n{ddl}"));
        let body = table.split("\n)\n").next().expect("columns");
        let ddl_cols: Vec<(String, String)> = body
            .lines()
            .skip(1)
            .map(|l| {
                let l = l.trim().trim_end_matches(',');
                let (n, t) = l.split_once(' ').expect("column");
                (n.trim_matches('`').to_owned(), t.to_owned())
            })
            .collect();
        let parquet_cols: Vec<(String, String)> = v["cols"]
            .as_array()
            .expect("cols")
            .iter()
            .map(|c| {
                (
                    c[0].as_str().expect("name").to_owned(),
                    c[1].as_str().expect("type").to_owned(),
                )
            })
            .collect();
        let names = |c: &[(String, String)]| c.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
        assert_eq!(names(&ddl_cols), names(&parquet_cols), "{src}");
        for ((n, hive), (_, duck)) in ddl_cols.iter().zip(&parquet_cols) {
            // DuckDB quotes field names that are keywords ("type").
            assert_eq!(hive_as_duckdb(hive), duck.replace('"', ""), "{src}.{n}");
        }
        tables += 1;
    }
    assert_eq!(tables, 3, "{described}");
}

/// A Hive type in DuckDB's spelling (`STRUCT<a: STRING>` is `STRUCT(a VARCHAR)`).
fn hive_as_duckdb(t: &str) -> String {
    let t = t.trim();
    if let Some(inner) = t.strip_prefix("ARRAY<").and_then(|r| r.strip_suffix('>')) {
        return format!("{}[]", hive_as_duckdb(inner));
    }
    if let Some(inner) = t.strip_prefix("MAP<").and_then(|r| r.strip_suffix('>')) {
        let (k, v) = inner.split_once(',').expect("map");
        return format!("MAP({}, {})", hive_as_duckdb(k), hive_as_duckdb(v));
    }
    if let Some(inner) = t.strip_prefix("STRUCT<").and_then(|r| r.strip_suffix('>')) {
        let fields: Vec<String> = split_top(inner)
            .into_iter()
            .map(|f| {
                let (n, ft) = f.split_once(':').expect("field");
                format!("{} {}", n.trim(), hive_as_duckdb(ft))
            })
            .collect();
        return format!("STRUCT({})", fields.join(", "));
    }
    match t {
        "STRING" => "VARCHAR".into(),
        "DOUBLE" => "DOUBLE".into(),
        other => other.into(),
    }
}

/// Splits `a: X, b: STRUCT<c: Y, d: Z>` at the commas outside brackets.
fn split_top(s: &str) -> Vec<&str> {
    let (mut out, mut depth, mut start) = (Vec::new(), 0i32, 0);
    for (i, c) in s.char_indices() {
        match c {
            '<' => depth += 1,
            '>' => depth -= 1,
            ',' if depth == 0 => {
                out.push(s[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(s[start..].trim());
    out
}

/// The provider role Security Lake creates for a custom source, in the data lake's account.
const PROVIDER_ROLE: &str =
    "arn:aws:iam::444455556666:role/AmazonSecurityLake-Provider-trailhose-us-east-1";
const LAKE_BUCKET: &str = "aws-security-data-lake-us-east-1-example";

/// An S3 client of the data lake's account: moto's STS issues credentials of the account a
/// role ARN names, and S3 keeps each account's buckets apart (cross-account access refused).
async fn lake_account_s3(moto: &common::Moto) -> aws_sdk_s3::Client {
    let base = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new("us-east-1"))
        .endpoint_url(&moto.endpoint)
        .credentials_provider(aws_sdk_s3::config::Credentials::new(
            "testing", "testing", None, None, "test",
        ))
        .load()
        .await;
    let role = aws_config::sts::AssumeRoleProvider::builder(PROVIDER_ROLE)
        .session_name("test")
        .configure(&base)
        .build()
        .await;
    let conf = aws_sdk_s3::config::Builder::from(&base)
        .credentials_provider(aws_sdk_s3::config::SharedCredentialsProvider::new(role))
        .force_path_style(true)
        .build();
    aws_sdk_s3::Client::from_conf(conf)
}

/// `[output.security_lake]` through `trailhose run` on moto at the shipped batch defaults,
/// writing as Security Lake's provider role (`output.s3.role_arn`, `external_id`) into the
/// data lake's bucket of another account, while the queue and the CloudTrail bucket are read
/// with the process's own credentials: a `{class}` template, the event's account; the objects
/// read back from S3 by DuckDB. moto checks neither the external id nor where STS is asked,
/// so STS (`AWS_ENDPOINT_URL_STS`) is a recording proxy in front of moto: the AssumeRole call
/// must reach it, carrying the configured external id and session name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_writes_security_lake_objects_to_s3_through_an_assumed_output_role() {
    let moto = common::Moto::start_patched(
        "import os\nos.environ['MOTO_S3_ALLOW_CROSSACCOUNT_ACCESS'] = 'false'",
    );
    let (sqs, s3) = (moto.sqs(), moto.s3());
    let q = make_queues(&sqs, "ocsf-lake", 5).await;
    s3.create_bucket()
        .bucket("trail-logs")
        .send()
        .await
        .expect("bucket");
    let lake = lake_account_s3(&moto).await;
    lake.create_bucket()
        .bucket(LAKE_BUCKET)
        .send()
        .await
        .expect("the data lake's bucket, in its own account");
    // The test discriminates: the process's own credentials cannot write there.
    let own = s3
        .put_object()
        .bucket(LAKE_BUCKET)
        .key("ext/probe")
        .body(b"x".to_vec().into())
        .send()
        .await;
    assert!(own.is_err(), "cross-account write must be refused");

    let tmp = TempDir::new("ocsf-lake-run");
    let input = tmp.path().join("in");
    let n = write_cases_latest_first(&input);
    let key = format!("{DAY}/111122223333_CloudTrail_us-east-1_20240318T1415Z_lake.json.gz");
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
    let settings = Settings {
        output: "schema = \"ocsf\"\nformat = \"parquet\"\nsecurity_lake = { source_name = \"th-{class}\" }".into(),
        ..Settings::default()
    };
    let config = write_config_with(tmp.path(), eps, &q.url, port, &settings);
    let text = std::fs::read_to_string(&config).expect("config");
    let text = text
        .replacen(
            "url = \"s3://trail-out/ct/\"",
            &format!("url = \"s3://{LAKE_BUCKET}/\""),
            1,
        )
        .replacen(
            "[output.s3]\n",
            &format!(
                "[output.s3]\nrole_arn = \"{PROVIDER_ROLE}\"\nexternal_id = \"trailhose-lake-1\"\nrole_session_name = \"trailhose-lake\"\n"
            ),
            1,
        );
    assert!(
        text.contains("role_arn") && text.contains(LAKE_BUCKET),
        "{text}"
    );
    std::fs::write(&config, text).expect("config");
    let sts = common::faults::FaultProxy::recording(moto.port);
    let log = tmp.path().join("worker.log");
    let sts_endpoint = sts.endpoint();
    let mut worker = start_worker_with(
        &moto,
        &config,
        &log,
        &[("AWS_ENDPOINT_URL_STS", sts_endpoint.as_str())],
    );
    eventually(60, "the file to be split", || async {
        metric(port, "trailhose_files_total{outcome=\"ok\"}") >= 1.0
    })
    .await;
    signal(&worker, "-TERM");
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        wait_exit(&mut worker, 25),
        "clean exit on SIGTERM; log:\n{}",
        log_text()
    );
    assert!(
        !log_text().contains("trailhose-lake-1"),
        "the external id is never logged"
    );
    // The objects, byte for byte, under their keys.
    let root = tmp.path().join("lake");
    let mut pages = lake
        .list_objects_v2()
        .bucket(LAKE_BUCKET)
        .prefix("ext/")
        .into_paginator()
        .send();
    while let Some(page) = pages.next().await {
        for obj in page.expect("list").contents() {
            let k = obj.key().expect("key");
            let body = lake
                .get_object()
                .bucket(LAKE_BUCKET)
                .key(k)
                .send()
                .await
                .expect("get")
                .body
                .collect()
                .await
                .expect("body")
                .into_bytes();
            let path = root.join(k);
            std::fs::create_dir_all(path.parent().expect("parent")).expect("dir");
            std::fs::write(&path, &body).expect("write");
        }
    }
    let uids = check_lake(&root, |slug| format!("th-{slug}"), None);
    assert_eq!(uids.len(), n, "log:\n{}", log_text());
    assert_eq!(uids, golden_uids());
    // The role was assumed at the configured STS endpoint, as configured; nothing else was
    // sent there (the objects went to S3's endpoint).
    let seen = sts.seen();
    let assumed: Vec<_> = seen
        .iter()
        .filter(|r| r.body.split('&').any(|p| p == "Action=AssumeRole"))
        .collect();
    assert!(
        !assumed.is_empty(),
        "no AssumeRole reached the STS endpoint: {seen:?}"
    );
    for r in &assumed {
        let params: Vec<&str> = r.body.split('&').collect();
        assert!(r.head.starts_with("POST / "), "{}", r.head);
        assert!(
            params.contains(&"ExternalId=trailhose-lake-1"),
            "{}",
            r.body
        );
        assert!(
            params.contains(&"RoleSessionName=trailhose-lake"),
            "{}",
            r.body
        );
        assert!(
            params.iter().any(|p| p.starts_with("RoleArn=")
                && p.contains("444455556666")
                && p.contains("AmazonSecurityLake-Provider-trailhose-us-east-1")),
            "{}",
            r.body
        );
    }
    assert!(
        seen.iter()
            .all(|r| r.head.starts_with("POST / ") && r.body.contains("Action=")),
        "only STS calls go to the STS endpoint: {seen:?}"
    );
    eventually(30, "the queue to drain", || async {
        depth(&sqs, &q.url).await == (0, 0)
    })
    .await;
}

/// A malformed output role, an external id or session name without one, are refused up
/// front, naming the key (and the external id is not echoed).
#[test]
fn a_bad_output_role_is_refused_naming_the_key() {
    let tmp = TempDir::new("ocsf-role");
    let cases = [
        (
            "role_arn = \"AmazonSecurityLake-Provider-x\"",
            Some("output.s3.role_arn"),
        ),
        (
            "role_arn = \"arn:aws:iam::123:role/x\"",
            Some("output.s3.role_arn"),
        ),
        (
            "external_id = \"secret-id-1\"",
            Some("output.s3.external_id"),
        ),
        (
            "role_session_name = \"s\"",
            Some("output.s3.role_session_name"),
        ),
        (
            "role_arn = \"arn:aws:iam::444455556666:role/w\"\nexternal_id = \"bad id 1\"",
            Some("output.s3.external_id"),
        ),
        (
            "role_arn = \"arn:aws:iam::444455556666:role/w\"\nrole_session_name = \"a/b\"",
            Some("output.s3.role_session_name"),
        ),
        (
            "role_arn = \"arn:aws:iam::444455556666:role/w\"\nexternal_id = \"ok-id\"\nrole_session_name = \"lake\"",
            None,
        ),
    ];
    for (i, (keys, want)) in cases.iter().enumerate() {
        let config = tmp.path().join(format!("role-{i}.toml"));
        std::fs::write(
            &config,
            format!("[output]\nurl = \"s3://b/\"\n[output.s3]\n{keys}\n"),
        )
        .expect("config");
        let run = trailhose(&["check-config", &config.display().to_string()], &[]);
        let err = String::from_utf8_lossy(&run.stderr);
        assert_eq!(run.status.success(), want.is_none(), "{keys}: {err}");
        if let Some(key) = want {
            assert!(err.contains(key), "{keys}: {err}");
            assert!(
                !err.contains("secret-id-1") && !err.contains("bad id 1"),
                "{err}"
            );
        }
    }
}

/// A Security Lake config whose batch age breaks the service's rule is refused up front,
/// naming the key.
#[test]
fn security_lake_refuses_a_batch_age_outside_five_minutes_to_a_day() {
    let tmp = TempDir::new("ocsf-lake-age");
    for (age, ok) in [(60, false), (300, true), (86_400, true), (90_000, false)] {
        let config = tmp.path().join(format!("lake-{age}.toml"));
        std::fs::write(
            &config,
            format!("[output]\nschema = \"ocsf\"\nformat = \"parquet\"\n[output.security_lake]\nsource_name = \"t-{{class}}\"\n[batch]\nmax_age_secs = {age}\n"),
        )
        .expect("config");
        let run = trailhose(&["check-config", &config.display().to_string()], &[]);
        assert_eq!(
            run.status.success(),
            ok,
            "{age}: {}",
            String::from_utf8_lossy(&run.stderr)
        );
        if !ok {
            let err = String::from_utf8_lossy(&run.stderr);
            assert!(err.contains("batch.max_age_secs"), "{err}");
        }
    }
}

/// `trailhose ocsf-report` over the golden cases: the classes, the sources, the fallback and
/// the unmapped fields.
#[test]
fn ocsf_report_counts_classes_sources_and_unmapped_fields() {
    let tmp = TempDir::new("ocsf-report");
    let input = tmp.path().join("in");
    let n = write_cases(&input);
    let run = trailhose(
        &["ocsf-report", &input.display().to_string(), "--json"],
        &[],
    );
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let r: Value = serde_json::from_slice(&run.stdout).expect("JSON report");
    assert_eq!(r["events"], n as u64);
    assert_eq!(r["files"], 1);
    assert_eq!(
        r["by_class"]["authentication"]["signin.amazonaws.com"]["events"],
        4
    );
    assert_eq!(
        r["by_class"]["authentication"]["signin.amazonaws.com"]["other_activity"],
        1
    );
    assert_eq!(
        r["by_class"]["authentication"]["sts.amazonaws.com"]["events"], 2,
        "the SAML case and the hostile AssumeRole"
    );
    assert_eq!(
        r["by_class"]["account_change"]["iam.amazonaws.com"]["events"],
        4
    );
    assert_eq!(
        r["by_class"]["api_activity"]["s3.amazonaws.com"]["events"],
        1
    );
    assert!(
        r["unmapped"]["requestParameters"]
            .as_u64()
            .is_some_and(|c| c >= 5),
        "{r}"
    );
    let text = trailhose(&["ocsf-report", &input.display().to_string()], &[]);
    assert!(text.status.success());
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.starts_with(&format!("OCSF 1.1.0 mapping of {n} events from 1 files")),
        "{text}"
    );
    let iam = text
        .lines()
        .find(|l| l.starts_with("iam.amazonaws.com "))
        .expect("iam row");
    assert_eq!(
        iam.split_whitespace().collect::<Vec<_>>(),
        ["iam.amazonaws.com", "4", "0"],
        "{text}"
    );
}
