//! End to end: analyst-ready outputs. The real binary writes Parquet, CSV and TSV from delivery
//! files; they are read back with the arrow/parquet and csv readers and compared with the input
//! field by field; `athena-ddl` is checked against the Parquet schema written; `[dedup]` drops a
//! repeated eventID; `query` answers the seed audit questions over JSON and Parquet output.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use arrow::array::{Array, RecordBatch, TimestampMillisecondArray};
use arrow::datatypes::DataType;
use common::checks::fixture_dbs;
use common::{TempDir, fixtures, trailhose};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde_json::{Value, json};

const DAY: &str = "AWSLogs/111122223333/CloudTrail/us-east-1/2024/03";

fn ev(id: &str, time: &str, user: &str, name: &str, ip: &str, more: Value) -> Value {
    let mut e = json!({
        "eventVersion": "1.09",
        "userIdentity": {
            "type": "IAMUser", "principalId": "AIDA", "accountId": "111122223333",
            "arn": format!("arn:aws:iam::111122223333:user/{user}"), "userName": user,
            "sessionContext": {
                "attributes": {"mfaAuthenticated": "true", "creationDate": "2024-03-18T13:00:00Z"},
                "sessionIssuer": {}
            }
        },
        "eventTime": time,
        "eventSource": "iam.amazonaws.com",
        "eventName": name,
        "awsRegion": "us-east-1",
        "sourceIPAddress": ip,
        "userAgent": "console.amazonaws.com",
        "requestID": format!("req-{id}"),
        "eventID": id,
        "readOnly": false,
        "eventType": "AwsApiCall",
        "managementEvent": true,
        "recipientAccountId": "111122223333",
        "eventCategory": "Management",
        "tlsDetails": {"tlsVersion": "TLSv1.3", "cipherSuite": "TLS_AES_128_GCM_SHA256",
                       "clientProvidedHostHeader": "iam.amazonaws.com"}
    });
    if let (Some(obj), Value::Object(more)) = (e.as_object_mut(), more) {
        obj.extend(more);
    }
    e
}

/// The seed data: who created user eve, what john.smith did, console logins from four
/// countries, over two days (three hours).
fn seed() -> Vec<Value> {
    vec![
        ev(
            "e-create",
            "2024-03-18T14:05:00Z",
            "admin",
            "CreateUser",
            "81.2.69.160",
            json!({"requestParameters": {"userName": "eve", "tags": [{"key": "team", "value": "a,b \"q\""}]},
                  "responseElements": {"user": {"userName": "eve", "arn": "arn:aws:iam::111122223333:user/eve"}},
                  "resources": [{"ARN": "arn:aws:iam::111122223333:user/eve", "accountId": "111122223333", "type": "AWS::IAM::User"}],
                  "xpriority": "high", "sessionCredentialFromConsole": "true"}),
        ),
        ev(
            "e-login-js",
            "2024-03-18T14:01:00Z",
            "john.smith",
            "ConsoleLogin",
            "2001:db8:1::5",
            json!({"eventType": "AwsConsoleSignIn", "responseElements": {"ConsoleLogin": "Success"},
                  "additionalEventData": {"MFAUsed": "Yes"}}),
        ),
        ev(
            "e-run-js",
            "2024-03-18T14:30:00Z",
            "john.smith",
            "RunInstances",
            "2001:db8:1::5",
            json!({"eventSource": "ec2.amazonaws.com",
                  "requestParameters": {"instancesSet": {"items": [{"instanceId": "i-1"}, {"instanceId": "i-2"}, {"instanceId": "i-3"}]}}}),
        ),
        ev(
            "e-del-js",
            "2024-03-18T15:10:00Z",
            "john.smith",
            "DeleteBucket",
            "2001:db8:1::5",
            json!({"eventSource": "s3.amazonaws.com", "readOnly": false,
                  "requestParameters": {"bucketName": "logs"}, "errorCode": "AccessDenied",
                  "errorMessage": "Access Denied"}),
        ),
        ev(
            "e-login-gb",
            "2024-03-18T15:20:00Z",
            "alice",
            "ConsoleLogin",
            "81.2.69.160",
            json!({"eventType": "AwsConsoleSignIn", "responseElements": {"ConsoleLogin": "Success"}}),
        ),
        ev(
            "e-login-se",
            "2024-03-19T09:00:00Z",
            "bob",
            "ConsoleLogin",
            "89.160.20.112",
            json!({"eventType": "AwsConsoleSignIn", "responseElements": {"ConsoleLogin": "Failure"}}),
        ),
        ev(
            "e-login-us",
            "2024-03-19T09:05:00Z",
            "carol",
            "ConsoleLogin",
            "216.160.83.56",
            json!({"eventType": "AwsConsoleSignIn"}),
        ),
        ev(
            "e-login-us2",
            "2024-03-19T09:06:00Z",
            "carol",
            "ConsoleLogin",
            "216.160.83.56",
            json!({"eventType": "AwsConsoleSignIn"}),
        ),
        ev(
            "e-list-js",
            "2024-03-19T09:30:00Z",
            "john.smith",
            "ListUsers",
            "2001:db8:1::5",
            json!({"readOnly": true, "requestParameters": null}),
        ),
    ]
}

/// Writes the seed as two delivery files; the second repeats `e-create` (a duplicate
/// delivery). Returns the input directory.
fn write_input(dir: &Path) -> std::path::PathBuf {
    let input = dir.join("in");
    let events = seed();
    let (a, b) = events.split_at(5);
    let mut b = b.to_vec();
    b.push(events[0].clone());
    for (name, part) in [("18/f1.json.gz", a.to_vec()), ("19/f2.json.gz", b)] {
        let path = input.join(DAY).join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let body = json!({ "Records": part }).to_string();
        std::fs::write(path, fixtures::gzip(body.as_bytes())).unwrap();
    }
    input
}

struct Run {
    out: std::path::PathBuf,
    config: std::path::PathBuf,
    stderr: String,
    metrics: String,
}

fn process(tmp: &TempDir, name: &str, toml: &str) -> Run {
    let input = write_input(tmp.path());
    let out = tmp.path().join(name);
    let config = tmp.path().join(format!("{name}.toml"));
    std::fs::write(&config, toml).unwrap();
    let (city, asn) = fixture_dbs(tmp.path());
    let metrics = tmp.path().join(format!("{name}.prom"));
    let run = trailhose(
        &[
            "process",
            input.to_str().unwrap(),
            "--config",
            config.to_str().unwrap(),
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
    let stderr = String::from_utf8_lossy(&run.stderr).into_owned();
    assert!(run.status.success(), "stderr: {stderr}");
    Run {
        out,
        config,
        stderr,
        metrics: std::fs::read_to_string(metrics).unwrap_or_default(),
    }
}

/// Event objects under the output (relative key, bytes), error objects left out.
fn objects(root: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for e in walkdir::WalkDir::new(root).sort_by_file_name() {
        let e = e.unwrap();
        let key = e
            .path()
            .strip_prefix(root)
            .unwrap()
            .to_string_lossy()
            .into_owned();
        if e.file_type().is_file() && !key.starts_with("errors/") {
            out.push((key, std::fs::read(e.path()).unwrap()));
        }
    }
    out
}

fn read_parquet(bytes: Vec<u8>) -> Vec<RecordBatch> {
    ParquetRecordBatchReaderBuilder::try_new(bytes::Bytes::from(bytes))
        .unwrap()
        .build()
        .unwrap()
        .map(|b| b.unwrap())
        .collect()
}

/// Rows as JSON objects (nulls left out), by eventID; eventTime as epoch milliseconds.
fn rows_by_id(batches: &[RecordBatch]) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    for b in batches {
        let mut w = arrow::json::ArrayWriter::new(Vec::new());
        w.write(b).unwrap();
        w.finish().unwrap();
        let rows: Vec<Value> = serde_json::from_slice(&w.into_inner()).unwrap();
        let times = b
            .column_by_name("eventTime")
            .unwrap()
            .as_any()
            .downcast_ref::<TimestampMillisecondArray>()
            .unwrap()
            .clone();
        for (i, mut r) in rows.into_iter().enumerate() {
            r["eventTime"] = json!(times.value(i));
            out.insert(r["eventID"].as_str().unwrap().to_owned(), r);
        }
    }
    out
}

fn millis(t: &str) -> i64 {
    // 2024-03-DDTHH:MM:00Z, the seed's only shape.
    let day: i64 = t[8..10].parse().unwrap();
    let hour: i64 = t[11..13].parse().unwrap();
    let min: i64 = t[14..16].parse().unwrap();
    (1_709_251_200 + (day - 1) * 86_400 + hour * 3600 + min * 60) * 1000
}

#[test]
fn parquet_round_trip_keeps_every_mapped_field_and_the_ddl_matches_its_schema() {
    let tmp = TempDir::new("parquet");
    let run = process(
        &tmp,
        "pq",
        "[output]\nformat = \"parquet\"\n[output.parquet.added_columns]\nxpriority = \"string\"\n",
    );
    let objs = objects(&run.out);
    assert!(!objs.is_empty());
    let mut batches = Vec::new();
    for (key, bytes) in objs {
        assert!(key.ends_with(".parquet"), "{key}");
        assert!(key.starts_with("year=2024/month=03/day="), "{key}");
        let meta = ParquetRecordBatchReaderBuilder::try_new(bytes::Bytes::from(bytes.clone()))
            .unwrap()
            .metadata()
            .clone();
        assert_eq!(
            meta.row_group(0).column(0).compression(),
            parquet::basic::Compression::ZSTD(Default::default()),
            "zstd by default"
        );
        batches.extend(read_parquet(bytes));
    }
    let rows = rows_by_id(&batches);
    let seed = seed();
    // Without [dedup], the repeated delivery is written twice (at-least-once).
    let total: usize = batches.iter().map(|b| b.num_rows()).sum();
    assert_eq!(total, seed.len() + 1);
    assert_eq!(rows.len(), seed.len());
    let json_cols = [
        "requestParameters",
        "responseElements",
        "additionalEventData",
    ];
    for e in &seed {
        let id = e["eventID"].as_str().unwrap();
        let r = &rows[id];
        for (k, v) in e.as_object().unwrap() {
            match k.as_str() {
                "eventTime" => assert_eq!(r[k], json!(millis(v.as_str().unwrap())), "{id}"),
                "sessionCredentialFromConsole" => {
                    let extra: Value = serde_json::from_str(r["extra"].as_str().unwrap()).unwrap();
                    assert_eq!(extra, json!({ k: v }), "{id}: unknown keys go to extra");
                }
                k if json_cols.contains(&k) && !v.is_null() => {
                    let back: Value = serde_json::from_str(r[k].as_str().unwrap()).unwrap();
                    assert_eq!(&back, v, "{id}.{k} as JSON text");
                }
                "userIdentity" => {
                    // Empty structs read back as all-null members; compare what was set.
                    for f in ["type", "principalId", "accountId", "arn", "userName"] {
                        assert_eq!(r[k][f], v[f], "{id}.{k}.{f}");
                    }
                    assert_eq!(
                        r[k]["sessionContext"]["attributes"], v["sessionContext"]["attributes"],
                        "{id}"
                    );
                }
                _ if v.is_null() => assert!(r.get(k).is_none(), "{id}.{k}"),
                _ => assert_eq!(&r[k], v, "{id}.{k}"),
            }
        }
        if id != "e-create" {
            assert!(r.get("extra").is_none(), "{id}: {r}");
        }
    }
    assert_eq!(rows["e-create"]["geo"]["country_isocode"], "GB");
    assert_eq!(rows["e-login-js"]["geo"]["country_isocode"], "JP");
    assert_eq!(rows["e-create"]["xpriority"], "high");

    // The DDL's columns are exactly the written schema's, in order, with matching types.
    let ddl = trailhose(
        &["athena-ddl", "--config", run.config.to_str().unwrap()],
        &[],
    );
    assert!(
        ddl.status.success(),
        "{}",
        String::from_utf8_lossy(&ddl.stderr)
    );
    let ddl = String::from_utf8(ddl.stdout).unwrap();
    let declared: Vec<(String, String)> = ddl
        .lines()
        .skip_while(|l| !l.starts_with("CREATE EXTERNAL TABLE"))
        .skip(1)
        .take_while(|l| *l != ")")
        .map(|l| {
            let l = l.trim().trim_end_matches(',');
            let (n, t) = l.split_once(' ').unwrap();
            (n.trim_matches('`').to_owned(), t.to_owned())
        })
        .collect();
    let written: Vec<(String, String)> = batches[0]
        .schema()
        .fields()
        .iter()
        .map(|f| (f.name().to_ascii_lowercase(), hive(f.data_type())))
        .collect();
    assert_eq!(declared, written, "{ddl}");
    assert!(ddl.contains("STORED AS PARQUET"), "{ddl}");
    assert!(
        ddl.contains("PARTITIONED BY (`year` STRING, `month` STRING, `day` STRING, `hour` STRING)")
    );
    assert!(ddl.contains("'storage.location.template' = 's3://BUCKET/PREFIX/year=${year}/month=${month}/day=${day}/hour=${hour}/'"));
}

/// Hive's name for an Arrow type, written independently of the DDL generator.
fn hive(t: &DataType) -> String {
    match t {
        DataType::Utf8 => "STRING".into(),
        DataType::Boolean => "BOOLEAN".into(),
        DataType::Int64 => "BIGINT".into(),
        DataType::Float64 => "DOUBLE".into(),
        DataType::Timestamp(..) => "TIMESTAMP".into(),
        DataType::List(f) => format!("ARRAY<{}>", hive(f.data_type())),
        DataType::Struct(fs) => format!(
            "STRUCT<{}>",
            fs.iter()
                .map(|f| format!("{}: {}", f.name().to_ascii_lowercase(), hive(f.data_type())))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        other => panic!("unexpected type {other}"),
    }
}

fn read_csv(bytes: &[u8], key: &str, tsv: bool) -> (Vec<String>, Vec<Vec<String>>) {
    let text = common::decode(key, bytes);
    let mut r = csv::ReaderBuilder::new()
        .delimiter(if tsv { b'\t' } else { b',' })
        .quoting(!tsv)
        .from_reader(text.as_bytes());
    let header = r.headers().unwrap().iter().map(str::to_owned).collect();
    let rows = r
        .records()
        .map(|rec| {
            rec.unwrap()
                .iter()
                .map(|c| if tsv { unescape_tsv(c) } else { c.to_owned() })
                .collect()
        })
        .collect();
    (header, rows)
}

/// Reverses the TSV escapes (`\t`, `\n`, `\r`, `\\`).
fn unescape_tsv(cell: &str) -> String {
    let mut out = String::new();
    let mut chars = cell.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('t') => out.push('\t'),
            Some('n') => out.push('\n'),
            Some('r') => out.push('\r'),
            Some('\\') => out.push('\\'),
            other => panic!("bad TSV escape \\{other:?} in {cell:?}"),
        }
    }
    out
}

const FLAT_COLUMNS: &str = r#"columns = ["eventTime", "eventID", "userIdentity.userName", "requestParameters.instancesSet.items[*].instanceId", "requestParameters.tags", "geo.country_isocode"]"#;

#[test]
fn csv_and_tsv_round_trip_with_exploded_rows_sorted_by_event_time() {
    let tmp = TempDir::new("flat");
    for (name, tsv) in [("csv", false), ("tsv", true)] {
        let run = process(
            &tmp,
            name,
            &format!("[output]\nformat = \"{name}\"\n{FLAT_COLUMNS}\nsort = \"eventTime\"\n"),
        );
        let seed: BTreeMap<String, Value> = seed()
            .into_iter()
            .map(|e| (e["eventID"].as_str().unwrap().to_owned(), e))
            .collect();
        let mut seen: BTreeMap<String, usize> = BTreeMap::new();
        for (key, bytes) in objects(&run.out) {
            assert!(key.ends_with(&format!(".{name}.gz")), "{key}");
            let (header, rows) = read_csv(&bytes, &key, tsv);
            assert_eq!(
                header,
                [
                    "eventTime",
                    "eventID",
                    "userIdentity.userName",
                    "requestParameters.instancesSet.items[*].instanceId",
                    "requestParameters.tags",
                    "geo.country_isocode"
                ]
            );
            let times: Vec<&String> = rows.iter().map(|r| &r[0]).collect();
            assert!(times.is_sorted(), "{key}: {times:?}");
            for r in &rows {
                let e = &seed[&r[1]];
                *seen.entry(r[1].clone()).or_default() += 1;
                assert_eq!(r[0], e["eventTime"].as_str().unwrap());
                assert_eq!(r[2], e["userIdentity"]["userName"].as_str().unwrap());
                match &e["requestParameters"]["tags"] {
                    Value::Null => assert_eq!(r[4], ""),
                    // JSON text with quotes, commas and (in TSV, escaped) backslashes.
                    tags => assert_eq!(serde_json::from_str::<Value>(&r[4]).unwrap(), *tags),
                }
            }
            let run_rows: Vec<&Vec<String>> = rows.iter().filter(|r| r[1] == "e-run-js").collect();
            if !run_rows.is_empty() {
                let ids: Vec<&str> = run_rows.iter().map(|r| r[3].as_str()).collect();
                assert_eq!(ids, ["i-1", "i-2", "i-3"], "one row per exploded element");
                assert!(run_rows.iter().all(|r| r[5] == "JP"));
            }
        }
        assert_eq!(seen["e-run-js"], 3);
        assert_eq!(seen["e-create"], 2, "no dedup configured: both deliveries");
        assert_eq!(seen.len(), seed.len());
        assert!(
            run.stderr.is_empty() || !run.stderr.contains("ERROR"),
            "{}",
            run.stderr
        );
    }
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

#[test]
fn dedup_drops_the_repeated_delivery_and_counts_it() {
    let tmp = TempDir::new("dedup");
    let run = process(&tmp, "dd", "[dedup]\nwindow_secs = 600\n");
    let mut ids = Vec::new();
    for (key, bytes) in objects(&run.out) {
        for line in common::decode(&key, &bytes).lines() {
            let v: Value = serde_json::from_str(line).unwrap();
            ids.push(v["eventID"].as_str().unwrap().to_owned());
        }
    }
    ids.sort();
    let mut expected: Vec<String> = seed()
        .iter()
        .map(|e| e["eventID"].as_str().unwrap().to_owned())
        .collect();
    expected.sort();
    assert_eq!(ids, expected, "each eventID once");
    assert_eq!(
        metric(&run.metrics, "trailhose_events_deduplicated_total"),
        1.0
    );
    assert_eq!(metric(&run.metrics, "trailhose_events_in_total"), 10.0);
}

fn query(out: &Path, sql: &str) -> (Vec<Vec<String>>, String) {
    let run = trailhose(&["query", out.to_str().unwrap(), sql, "--csv"], &[]);
    let stderr = String::from_utf8_lossy(&run.stderr).into_owned();
    assert!(run.status.success(), "{sql}: {stderr}");
    let mut r = csv::ReaderBuilder::new()
        .has_headers(true)
        .from_reader(&run.stdout[..]);
    let rows = r
        .records()
        .map(|rec| rec.unwrap().iter().map(str::to_owned).collect())
        .collect();
    (rows, stderr)
}

fn seed_questions(out: &Path) {
    // Who created IAM user eve (Athena's json_extract_scalar works as there)?
    let (rows, _) = query(
        out,
        "SELECT DISTINCT userIdentity.userName, sourceIPAddress FROM events \
         WHERE eventName = 'CreateUser' AND json_extract_scalar(requestParameters, '$.userName') = 'eve'",
    );
    assert_eq!(rows, [["admin", "81.2.69.160"]]);

    // Everything john.smith did, in order.
    let (rows, stderr) = query(
        out,
        "SELECT eventName, errorCode FROM events WHERE userIdentity.userName = 'john.smith' ORDER BY eventTime",
    );
    assert_eq!(
        rows,
        [
            ["ConsoleLogin", ""],
            ["RunInstances", ""],
            ["DeleteBucket", "AccessDenied"],
            ["ListUsers", ""]
        ]
    );
    let all = objects(out).len();
    assert_eq!(
        read_note(&stderr),
        (all, all),
        "no partition filter: everything is read"
    );

    // Console logins by country.
    let (rows, _) = query(
        out,
        "SELECT geo.country_isocode AS country, count(*) AS logins FROM events \
         WHERE eventName = 'ConsoleLogin' GROUP BY 1 ORDER BY 1",
    );
    assert_eq!(rows, [["GB", "1"], ["JP", "1"], ["SE", "1"], ["US", "2"]]);

    // Partition columns prune: one day's objects only are read.
    let (rows, stderr) = query(
        out,
        "SELECT count(*) FROM events WHERE year = '2024' AND month = '03' AND day = '19' \
         AND eventName = 'ConsoleLogin'",
    );
    assert_eq!(rows, [["3"]]);
    let day19 = objects(out)
        .iter()
        .filter(|(k, _)| k.contains("/day=19/"))
        .count();
    assert!(day19 >= 1 && day19 < all);
    assert_eq!(read_note(&stderr), (day19, all), "{stderr}");
}

/// `read N of M objects` from the query's stderr.
fn read_note(stderr: &str) -> (usize, usize) {
    let line = stderr
        .lines()
        .find_map(|l| l.strip_prefix("trailhose: read "))
        .unwrap_or_else(|| panic!("no read note in {stderr}"));
    let mut it = line.split(' ');
    let n = it.next().and_then(|n| n.parse().ok()).unwrap();
    let m = it.nth(1).and_then(|m| m.parse().ok()).unwrap();
    (n, m)
}

#[test]
fn query_answers_the_seed_questions_over_json_and_parquet_output() {
    let tmp = TempDir::new("query");
    let json = process(&tmp, "json", "[dedup]\n");
    seed_questions(&json.out);
    let pq = process(&tmp, "pq", "[dedup]\n[output]\nformat = \"parquet\"\n");
    seed_questions(&pq.out);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_reads_parquet_output_on_s3_and_prunes_partitions() {
    let moto = common::Moto::start();
    moto.s3()
        .create_bucket()
        .bucket("lake")
        .send()
        .await
        .expect("create bucket");
    let tmp = TempDir::new("query-s3");
    let input = write_input(tmp.path());
    let config = tmp.path().join("s3.toml");
    std::fs::write(
        &config,
        format!(
            "[dedup]\n[output]\nformat = \"parquet\"\nurl = \"s3://lake/ct/\"\n[output.s3]\nendpoint_url = \"{}\"\nforce_path_style = true\nregion = \"us-east-1\"\n",
            moto.endpoint
        ),
    )
    .unwrap();
    let env: Vec<(&str, String)> = moto
        .env()
        .into_iter()
        .filter(|(k, _)| *k != "AWS_ENDPOINT_URL")
        .collect();
    let endpoint = moto.endpoint.clone();
    let (written, answer) = tokio::task::spawn_blocking(move || {
        let w = trailhose(
            &["process", input.to_str().unwrap(), "--config", config.to_str().unwrap()],
            &env,
        );
        let q = trailhose(
            &[
                "query",
                "s3://lake/ct",
                "SELECT eventName FROM events WHERE day = '19' AND userIdentity.userName = 'john.smith'",
                "--csv",
                "--endpoint-url",
                &endpoint,
                "--region",
                "us-east-1",
            ],
            &env,
        );
        (w, q)
    })
    .await
    .expect("join");
    assert!(
        written.status.success(),
        "{}",
        String::from_utf8_lossy(&written.stderr)
    );
    let stderr = String::from_utf8_lossy(&answer.stderr);
    assert!(answer.status.success(), "{stderr}");
    assert_eq!(
        String::from_utf8_lossy(&answer.stdout),
        "eventName\r\nListUsers\r\n"
    );
    let (read, listed) = read_note(&stderr);
    assert!(read >= 1 && read < listed, "{stderr}");
}
