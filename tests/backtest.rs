//! End to end: `trailhose detect backtest` over output that `trailhose process` wrote (gzip
//! and zstd JSON lines in the hour layout), on a local directory and under an S3 prefix on
//! moto: matches as JSON lines, correlations counted once per eventID however often an event
//! was written, and `--from/--to` reading only the hours asked for.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::{Moto, TempDir, trailhose};
use serde_json::{Value, json};

const FAILED_LOGIN: &str = "5c0e7d3a-2b7f-4a39-9d0e-1f6a2c9b8e01";
const ACCESS_KEY: &str = "5c0e7d3a-2b7f-4a39-9d0e-1f6a2c9b8e02";
const FIVE_FAILED: &str = "5c0e7d3a-2b7f-4a39-9d0e-1f6a2c9b8e10";
const LOGIN_THEN_KEY: &str = "5c0e7d3a-2b7f-4a39-9d0e-1f6a2c9b8e12";

fn rules_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/detect/correlation")
}

fn event(id: &str, time: &str, user: &str, name: &str) -> Value {
    let (source, extra) = match name {
        "ConsoleLogin" => (
            "signin.amazonaws.com",
            json!({"responseElements": {"ConsoleLogin": "Failure"}}),
        ),
        _ => ("iam.amazonaws.com", json!({})),
    };
    let mut e = json!({
        "eventVersion": "1.09", "eventTime": time, "eventSource": source, "eventName": name,
        "awsRegion": "us-east-1", "sourceIPAddress": "198.51.100.7", "userAgent": "test",
        "userIdentity": {"type": "IAMUser", "userName": user,
            "arn": format!("arn:aws:iam::111122223333:user/{user}")},
        "eventID": id, "eventType": "AwsApiCall", "recipientAccountId": "111122223333"
    });
    if let (Some(o), Value::Object(x)) = (e.as_object_mut(), extra) {
        o.extend(x);
    }
    e
}

/// A delivery file: alice fails five logins at 14:01–14:05 and creates an access key at
/// 14:20; bob fails one login at 16:30; one unmatched event.
fn write_input(dir: &Path) {
    let day = dir.join("AWSLogs/111122223333/CloudTrail/us-east-1/2024/03/18");
    std::fs::create_dir_all(&day).expect("dir");
    let mut records: Vec<Value> = (1..=5)
        .map(|i| {
            event(
                &format!("a{i}"),
                &format!("2024-03-18T14:0{i}:00Z"),
                "alice",
                "ConsoleLogin",
            )
        })
        .collect();
    records.push(event(
        "a-key",
        "2024-03-18T14:20:00Z",
        "alice",
        "CreateAccessKey",
    ));
    records.push(event("b1", "2024-03-18T16:30:00Z", "bob", "ConsoleLogin"));
    records.push(event("other", "2024-03-18T15:00:00Z", "carol", "ListUsers"));
    std::fs::write(
        day.join("111122223333_CloudTrail_us-east-1_20240318T1700Z_bt.json"),
        json!({ "Records": records }).to_string(),
    )
    .expect("write");
}

struct Run {
    matches: Vec<Value>,
    stderr: String,
}

fn backtest(args: &[&str], env: &[(&str, String)]) -> Run {
    let rules = rules_dir().display().to_string();
    let mut all = vec!["detect", "backtest"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--rules", &rules]);
    let out = trailhose(&all, env);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stderr}");
    let matches = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    Run { matches, stderr }
}

/// rule id → number of matches.
fn per_rule(matches: &[Value]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for v in matches {
        *m.entry(v["rule_id"].as_str().expect("rule_id").to_owned())
            .or_default() += 1;
    }
    m
}

fn counts(pairs: &[(&str, usize)]) -> BTreeMap<String, usize> {
    pairs.iter().map(|(k, n)| ((*k).to_owned(), *n)).collect()
}

/// The same events written twice, once gzip and once zstd, as a redelivery would.
fn processed(tmp: &TempDir) -> PathBuf {
    let input = tmp.path().join("in");
    write_input(&input);
    let out = tmp.path().join("out");
    for compression in ["gzip", "zstd"] {
        let o = trailhose(
            &[
                "process",
                input.to_str().expect("path"),
                "--out",
                out.to_str().expect("path"),
                "--compression",
                compression,
                "--quiet",
            ],
            &[],
        );
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    out
}

#[test]
fn backtest_finds_matches_and_correlations_in_processed_output() {
    let tmp = TempDir::new("backtest-local");
    let out = processed(&tmp);
    let keys: Vec<String> = common::local_objects(&out)
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert!(keys.iter().any(|k| k.starts_with("year=2024/month=03/day=18/hour=14/") && k.ends_with(".json.gz")), "{keys:?}");
    assert!(keys.iter().any(|k| k.ends_with(".json.zst")), "{keys:?}");

    let run = backtest(&[out.to_str().expect("path")], &[]);
    // Every detection match twice (written twice); each correlation once (eventIDs dedupe).
    assert_eq!(
        per_rule(&run.matches),
        counts(&[
            (FAILED_LOGIN, 12),
            (ACCESS_KEY, 2),
            (FIVE_FAILED, 1),
            (LOGIN_THEN_KEY, 1)
        ]),
        "{:#?}\n{}",
        run.matches,
        run.stderr
    );
    let five = run
        .matches
        .iter()
        .find(|m| m["rule_id"] == FIVE_FAILED)
        .expect("fired");
    assert_eq!(five["eventID"], "a5");
    assert_eq!(five["correlation"]["value"], 5);
    assert_eq!(
        five["correlation"]["group"],
        json!({"userIdentity.userName": "alice"})
    );
    assert_eq!(five["correlation"]["window_start"], "2024-03-18T14:00:00Z");
    assert!(five["object"].as_str().expect("object").contains("hour=14"));
    assert!(five["line"].as_u64().expect("line") >= 1);
    let temporal = run
        .matches
        .iter()
        .find(|m| m["rule_id"] == LOGIN_THEN_KEY)
        .expect("fired");
    assert_eq!(temporal["eventID"], "a-key");
    assert_eq!(temporal["level"], "critical");
    assert!(
        run.stderr.lines().any(|l| l.trim_start().starts_with("12 ")
            && l.contains("low")
            && l.contains(FAILED_LOGIN)),
        "the per-rule summary: {}",
        run.stderr
    );
    assert!(run.stderr.contains("read 6 of 6 objects"), "{}", run.stderr);

    // Only 16:00–17:00: the other hours' objects are not read.
    let run = backtest(
        &[
            out.to_str().expect("path"),
            "--from",
            "2024-03-18T16:00:00Z",
            "--to",
            "2024-03-18T17:00:00Z",
        ],
        &[],
    );
    assert_eq!(
        per_rule(&run.matches),
        counts(&[(FAILED_LOGIN, 2)]),
        "{}",
        run.stderr
    );
    assert!(run.matches.iter().all(|m| m["eventID"] == "b1"));
    assert!(run.stderr.contains("read 2 of 6 objects"), "{}", run.stderr);
    // Within one hour's objects, events outside the range are not evaluated.
    let run = backtest(
        &[
            out.to_str().expect("path"),
            "--from",
            "2024-03-18T14:03:00Z",
            "--to",
            "2024-03-18T15:00:00Z",
        ],
        &[],
    );
    assert_eq!(
        per_rule(&run.matches),
        counts(&[(FAILED_LOGIN, 6), (ACCESS_KEY, 2), (LOGIN_THEN_KEY, 1)]),
        "three logins in range: no five-login alert; {}",
        run.stderr
    );

    let bad = trailhose(
        &[
            "detect",
            "backtest",
            out.to_str().expect("path"),
            "--rules",
            rules_dir().to_str().expect("path"),
            "--from",
            "yesterday",
        ],
        &[],
    );
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--from \"yesterday\""));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backtest_reads_an_s3_prefix() {
    let tmp = TempDir::new("backtest-s3");
    let out = processed(&tmp);
    let moto = Moto::start();
    let s3 = moto.s3();
    s3.create_bucket()
        .bucket("trail-out")
        .send()
        .await
        .expect("bucket");
    let mut keys = Vec::new();
    for (k, _) in common::local_objects(&out) {
        let body = std::fs::read(out.join(&k)).expect("object");
        s3.put_object()
            .bucket("trail-out")
            .key(format!("ct/{k}"))
            .body(body.into())
            .send()
            .await
            .expect("put");
        keys.push(k);
    }
    let env = moto.env();
    let endpoint = moto.endpoint.clone();
    let run = tokio::task::spawn_blocking(move || {
        backtest(
            &[
                "s3://trail-out/ct/",
                "--from",
                "2024-03-18",
                "--to",
                "2024-03-19",
                "--endpoint-url",
                &endpoint,
            ],
            &env,
        )
    })
    .await
    .expect("backtest");
    assert_eq!(
        per_rule(&run.matches),
        counts(&[
            (FAILED_LOGIN, 12),
            (ACCESS_KEY, 2),
            (FIVE_FAILED, 1),
            (LOGIN_THEN_KEY, 1)
        ]),
        "{}",
        run.stderr
    );
    assert!(run.matches.iter().all(|m| {
        m["object"]
            .as_str()
            .unwrap_or("")
            .starts_with("s3://trail-out/ct/year=2024/")
    }));
    assert!(
        run.stderr
            .contains(&format!("read {n} of {n} objects", n = keys.len())),
        "{}",
        run.stderr
    );
}
