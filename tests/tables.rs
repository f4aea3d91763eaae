//! Enrichment tables end to end: the real binary, `process` on local tables and `run` against
//! moto with a table on S3 that changes (and breaks) while the worker runs.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use common::checks::split_output;
use common::{Moto, TempDir, fixtures, free_port, http_get, local_objects, trailhose};
use serde_json::{Value, json};

const DAY: &str = "AWSLogs/111122223333/CloudTrail/us-east-1/2024/03/18";

fn event(id: &str, account: &str, ip: &str, arn: &str) -> String {
    // Written by hand, odd spacing included: the output must carry these bytes unchanged.
    format!(
        "{{\"eventTime\": \"2024-03-18T10:00:00Z\", \"eventID\":\"{id}\",\"eventSource\":\"iam.amazonaws.com\",\
         \"recipientAccountId\":\"{account}\",\"sourceIPAddress\":\"{ip}\",\
         \"userIdentity\":{{\"type\":\"AssumedRole\",\"arn\":\"{arn}\"}}}}"
    )
}

fn delivery(dir: &Path, name: &str, events: &[String]) {
    let folder = dir.join(DAY);
    std::fs::create_dir_all(&folder).unwrap();
    let body = format!("{{\"Records\":[{}]}}", events.join(","));
    std::fs::write(
        folder.join(format!("{name}.json.gz")),
        fixtures::gzip(body.as_bytes()),
    )
    .unwrap();
}

/// Output lines by eventID (each must be there once).
fn by_id(events: &[(String, String)]) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for (_, line) in events {
        let v: Value = serde_json::from_str(line).expect("JSON line");
        let id = v["eventID"].as_str().expect("eventID").to_owned();
        assert!(
            out.insert(id, line.clone()).is_none(),
            "written once: {line}"
        );
    }
    out
}

/// `raw` with `added` spliced before its closing brace, byte for byte.
fn spliced(raw: &str, added: &[&str]) -> String {
    let mut s = raw.strip_suffix('}').unwrap().to_owned();
    for a in added {
        s.push(',');
        s.push_str(a);
    }
    s.push('}');
    s
}

const TABLES: &str = r#"
[enrich]
reload_secs = 0
[[enrich.tables]]
name = "accounts"
path = "ACCOUNTS"
key = "account_id"
[[enrich.tables]]
name = "egress"
path = "EGRESS"
key = "cidr"
match = "cidr"
[[enrich.tables]]
name = "breakglass"
path = "PRINCIPALS"
key = "arn"
match = "case_insensitive"
[[enrich.lookups]]
table = "accounts"
from = "recipientAccountId"
add = { account = ["name", "env", "owner"] }
[[enrich.lookups]]
table = "egress"
from = "sourceIPAddress"
add = { network = ["label"] }
[[enrich.lookups]]
table = "breakglass"
from = "userIdentity.arn"
add = { principal = ["role"] }
"#;

fn write_tables(dir: &Path) -> String {
    let accounts = dir.join("accounts.csv");
    std::fs::write(
        &accounts,
        "account_id,name,env,owner\n\
         111122223333,\"Payments, \"\"main\"\"\",prod,alice@example.com\n\
         444455556666,sandbox,dev,\n",
    )
    .unwrap();
    // Overlapping ranges in both families: the longest prefix wins.
    let egress = dir.join("egress.csv");
    std::fs::write(
        &egress,
        "cidr,label\n10.0.0.0/8,corp\n10.1.2.0/24,vpn\n10.1.2.3/32,bastion\n\
         2001:db8::/32,office-v6\n2001:db8:1::/48,lab-v6\n",
    )
    .unwrap();
    let principals = dir.join("principals.jsonl");
    std::fs::write(
        &principals,
        "{\"arn\":\"arn:aws:sts::111122223333:assumed-role/break-glass/x\",\"role\":\"break-glass\"}\n",
    )
    .unwrap();
    TABLES
        .replace("ACCOUNTS", &accounts.display().to_string())
        .replace("EGRESS", &egress.display().to_string())
        .replace("PRINCIPALS", &principals.display().to_string())
}

#[test]
fn process_joins_exact_case_insensitive_and_longest_prefix_matches_by_splicing() {
    let tmp = TempDir::new("tables-process");
    let config = tmp.path().join("tables.toml");
    std::fs::write(&config, write_tables(tmp.path())).unwrap();
    let input = tmp.path().join("in");
    let arn = "arn:aws:sts::111122223333:assumed-role/Break-Glass/x";
    let events = [
        event("e1", "111122223333", "10.1.2.3", arn),
        event("e2", "111122223333", "10.1.2.77", "arn:aws:iam::1:user/bob"),
        event(
            "e3",
            "444455556666",
            "10.200.0.1",
            "ARN:AWS:STS::111122223333:ASSUMED-ROLE/BREAK-GLASS/X",
        ),
        event("e4", "999999999999", "2001:db8:1::7", "x"),
        event("e5", "444455556666", "2001:db8:ffff::1", "x"),
        event("e6", "999999999999", "::ffff:10.9.9.9", "x"),
        event("e7", "999999999999", "cloudtrail.amazonaws.com", "x"),
        event("e8", "999999999999", "203.0.113.9", "x"),
    ];
    delivery(&input, "one", &events);
    let out = tmp.path().join("out");
    let metrics = tmp.path().join("metrics.txt");
    let run = trailhose(
        &[
            "process",
            input.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--config",
            config.to_str().unwrap(),
            "--metrics-file",
            metrics.to_str().unwrap(),
        ],
        &[],
    );
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let got = by_id(&split_output(&local_objects(&out)).events);
    let prod =
        r#""account":{"name":"Payments, \"main\"","env":"prod","owner":"alice@example.com"}"#;
    let dev = r#""account":{"name":"sandbox","env":"dev"}"#;
    let glass = r#""principal":{"role":"break-glass"}"#;
    let expected: [(&str, Vec<&str>); 8] = [
        ("e1", vec![prod, r#""network":{"label":"bastion"}"#, glass]),
        ("e2", vec![prod, r#""network":{"label":"vpn"}"#]),
        ("e3", vec![dev, r#""network":{"label":"corp"}"#, glass]),
        ("e4", vec![r#""network":{"label":"lab-v6"}"#]),
        ("e5", vec![dev, r#""network":{"label":"office-v6"}"#]),
        ("e6", vec![r#""network":{"label":"corp"}"#]),
        ("e7", vec![]),
        ("e8", vec![]),
    ];
    assert_eq!(got.len(), expected.len(), "{got:?}");
    for ((id, added), raw) in expected.iter().zip(&events) {
        assert_eq!(got[*id], spliced(raw, added), "{id}");
    }
    let m = std::fs::read_to_string(&metrics).unwrap();
    for line in [
        r#"trailhose_enrich_lookups_total{field="account",result="found",table="accounts"} 4"#,
        r#"trailhose_enrich_lookups_total{field="account",result="absent",table="accounts"} 4"#,
        r#"trailhose_enrich_lookups_total{field="network",result="absent",table="egress"} 2"#,
        r#"trailhose_enrich_lookups_total{field="principal",result="found",table="breakglass"} 2"#,
        r#"trailhose_enrich_table_rows{table="egress"} 5"#,
    ] {
        assert!(m.contains(line), "{line} in:\n{m}");
    }
    assert!(
        m.contains(r#"trailhose_enrich_table_bytes{table="accounts"}"#),
        "{m}"
    );
    assert!(
        m.contains(r#"trailhose_enrich_table_load_seconds{table="accounts"}"#),
        "{m}"
    );
}

#[test]
fn a_corrupt_table_or_a_missing_column_stops_start_up_naming_it() {
    let tmp = TempDir::new("tables-corrupt");
    let toml = write_tables(tmp.path());
    let input = tmp.path().join("in");
    delivery(&input, "one", &[event("e1", "1", "10.0.0.1", "x")]);
    let out = tmp.path().join("out");
    let start = |toml: &str| {
        let config = tmp.path().join("tables.toml");
        std::fs::write(&config, toml).unwrap();
        let run = trailhose(
            &[
                "process",
                input.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
                "--config",
                config.to_str().unwrap(),
            ],
            &[],
        );
        assert!(!run.status.success());
        String::from_utf8_lossy(&run.stderr).into_owned()
    };
    let egress = tmp.path().join("egress.csv");
    std::fs::write(&egress, "cidr,label\n10.0.0.0/8,corp\n10.0.0.0/99,bad\n").unwrap();
    let err = start(&toml);
    assert!(
        err.contains(&egress.display().to_string()) && err.contains("line 3"),
        "{err}"
    );
    std::fs::write(&egress, "cidr,name\n10.0.0.0/8,corp\n").unwrap();
    let err = start(&toml);
    assert!(
        err.contains("enrich.lookups.add") && err.contains("\"label\""),
        "{err}"
    );
    let err = start(&toml.replace("table = \"egress\"", "table = \"egres\""));
    assert!(err.contains("enrich.lookups.table"), "{err}");
    assert!(!out.exists() || local_objects(&out).is_empty());
}

/// A worker with its accounts table on S3, at the batch defaults: a new version (ETag) is picked
/// up mid-run and the files after it use it; a corrupt version is refused and the running table
/// stays; every event is written once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_follows_a_table_on_s3_and_keeps_the_running_one_when_a_version_is_corrupt() {
    let moto = Moto::start();
    let (s3, sqs) = (moto.s3(), moto.sqs());
    for b in ["trail", "tables"] {
        s3.create_bucket().bucket(b).send().await.expect("bucket");
    }
    let put_table = |body: &'static str| {
        let s3 = s3.clone();
        async move {
            s3.put_object()
                .bucket("tables")
                .key("org/accounts.csv")
                .body(body.as_bytes().to_vec().into())
                .send()
                .await
                .expect("put table");
        }
    };
    put_table("account_id,name,env\n111122223333,payments,prod\n").await;
    let queue = sqs
        .create_queue()
        .queue_name("tables")
        .send()
        .await
        .expect("queue")
        .queue_url
        .expect("queue url");
    let tmp = TempDir::new("tables-run");
    let out = tmp.path().join("out");
    let port = free_port();
    let ep = &moto.endpoint;
    let config = tmp.path().join("run.toml");
    std::fs::write(
        &config,
        format!(
            "[output]\nurl = {:?}\n\
             [source.sqs]\nqueue_url = {queue:?}\nendpoint_url = {ep:?}\nwait_time_secs = 1\n\
             [[source.buckets]]\nname = \"trail\"\nendpoint_url = {ep:?}\nforce_path_style = true\n\
             [server]\nlisten = \"127.0.0.1:{port}\"\n\
             [enrich]\nreload_secs = 1\n\
             [[enrich.tables]]\nname = \"accounts\"\npath = \"s3://tables/org/accounts.csv\"\n\
             key = \"account_id\"\nendpoint_url = {ep:?}\nforce_path_style = true\n\
             [[enrich.lookups]]\ntable = \"accounts\"\nfrom = \"recipientAccountId\"\n\
             add = {{ account = [\"name\", \"env\"] }}\n",
            out.display().to_string(),
        ),
    )
    .unwrap();
    let send_file = |name: &'static str| {
        let (s3, sqs, queue) = (s3.clone(), sqs.clone(), queue.clone());
        async move {
            let evs: Vec<Value> = (1..=3)
                .map(|i| {
                    json!({"eventTime": "2024-03-18T10:00:00Z", "eventID": format!("{name}{i}"),
                           "recipientAccountId": "111122223333", "sourceIPAddress": "10.0.0.1"})
                })
                .collect();
            let key = format!("{DAY}/{name}.json.gz");
            let body = fixtures::gzip(&serde_json::to_vec(&json!({ "Records": evs })).unwrap());
            s3.put_object()
                .bucket("trail")
                .key(&key)
                .body(body.into())
                .send()
                .await
                .expect("put");
            let msg = json!({"s3Bucket": "trail", "s3ObjectKey": [key]}).to_string();
            sqs.send_message()
                .queue_url(&queue)
                .message_body(msg)
                .send()
                .await
                .expect("send");
        }
    };
    let written = |n: usize| {
        let out = out.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let events = if out.exists() {
                    split_output(&local_objects(&out)).events
                } else {
                    Vec::new()
                };
                if events.len() >= n || Instant::now() > deadline {
                    return events;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    let metric = |needle: String| async move {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let m = http_get(port, "/metrics")
                .map(|(_, m)| m)
                .unwrap_or_default();
            if m.contains(&needle) {
                return;
            }
            assert!(Instant::now() < deadline, "no {needle} in:\n{m}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_trailhose"));
    cmd.args(["run", "--config"])
        .arg(&config)
        .env("TRAILHOSE_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    for (k, v) in moto.env() {
        cmd.env(k, v);
    }
    let mut worker = cmd.spawn().expect("start trailhose run");
    let pid = worker.id().to_string();

    // At the batch defaults nothing is written before SIGTERM: the lookup counts say when a
    // file has been joined.
    let found = |n: u32| {
        format!(
            r#"trailhose_enrich_lookups_total{{field="account",result="found",table="accounts"}} {n}"#
        )
    };
    send_file("a").await;
    metric(found(3)).await;

    put_table("account_id,name,env\n111122223333,payments-renamed,prod\n").await;
    metric(r#"trailhose_enrich_table_reloads_total{result="ok",table="accounts"} 1"#.into()).await;
    put_table("account_id,name,env\n111122223333,broken\n").await;
    metric(r#"trailhose_enrich_table_reloads_total{result="error",table="accounts"} 1"#.into())
        .await;

    send_file("b").await;
    metric(found(6)).await;
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status();
    let _ = worker.wait();
    let events = written(6).await;
    let got = by_id(&events);
    assert_eq!(got.len(), 6, "{events:?}");
    for (id, line) in &got {
        let v: Value = serde_json::from_str(line).unwrap();
        let name = if id.starts_with('a') {
            "payments"
        } else {
            "payments-renamed"
        };
        assert_eq!(
            v["account"],
            json!({"name": name, "env": "prod"}),
            "{id}: {line}"
        );
    }
}

/// The accounts table made from an Organizations export is one `process` can use as it is.
#[test]
fn tables_from_organizations_makes_an_accounts_table_that_joins() {
    let tmp = TempDir::new("tables-orgs");
    let export = tmp.path().join("accounts.json");
    std::fs::write(
        &export,
        r#"{"Accounts":[{"Id":"111122223333","Arn":"arn:aws:organizations::1:account/o-1/111122223333",
            "Email":"pay@example.com","Name":"payments","Status":"ACTIVE",
            "JoinedMethod":"CREATED","JoinedTimestamp":"2021-04-01T10:00:00+00:00"}]}"#,
    )
    .unwrap();
    let made = trailhose(
        &["tables", "from-organizations", export.to_str().unwrap()],
        &[],
    );
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let table = tmp.path().join("accounts.csv");
    std::fs::write(&table, &made.stdout).unwrap();
    let config = tmp.path().join("orgs.toml");
    std::fs::write(
        &config,
        format!(
            "[[enrich.tables]]\nname = \"accounts\"\npath = {:?}\nkey = \"account_id\"\n\
             [[enrich.lookups]]\ntable = \"accounts\"\nfrom = \"recipientAccountId\"\n\
             add = {{ account = [\"name\", \"status\"] }}\n",
            table.display().to_string()
        ),
    )
    .unwrap();
    let input = tmp.path().join("in");
    let raw = event("o1", "111122223333", "10.0.0.1", "x");
    delivery(&input, "one", std::slice::from_ref(&raw));
    let out = tmp.path().join("out");
    let run = trailhose(
        &[
            "process",
            input.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--config",
            config.to_str().unwrap(),
        ],
        &[],
    );
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let got = by_id(&split_output(&local_objects(&out)).events);
    assert_eq!(
        got["o1"],
        spliced(
            &raw,
            &[r#""account":{"name":"payments","status":"ACTIVE"}"#]
        )
    );
    let bad = trailhose(
        &["tables", "from-organizations", config.to_str().unwrap()],
        &[],
    );
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("list-accounts"));
}

/// Fails (naming the line) unless every output line parses with no key repeated in any object,
/// as Athena's JSON reader and other strict readers require.
fn assert_no_duplicate_keys(lines: &[String], dir: &Path) {
    let file = dir.join("strict-input.jsonl");
    std::fs::write(&file, lines.join("\n")).unwrap();
    let script = r#"
import json, sys
def strict(pairs):
    seen = set()
    for k, _ in pairs:
        # Case-folded, as Athena's JSON SerDe reads keys.
        if k.lower() in seen:
            raise ValueError("duplicate key %r" % k)
        seen.add(k.lower())
    return dict(pairs)
for n, line in enumerate(open(sys.argv[1]), 1):
    try:
        json.loads(line, object_pairs_hook=strict)
    except ValueError as e:
        sys.exit("line %d: %s: %s" % (n, e, line.strip()))
"#;
    let run = std::process::Command::new("python3")
        .args(["-c", script, file.to_str().unwrap()])
        .output()
        .expect("python3");
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
}

#[test]
fn an_event_already_holding_geo_or_a_lookup_field_carries_the_enrichments_value_once() {
    let tmp = TempDir::new("tables-owned");
    let (city, _asn) = common::checks::fixture_dbs(tmp.path());
    let config = tmp.path().join("tables.toml");
    std::fs::write(
        &config,
        format!("[geoip]\ncity_db = {city:?}\n{}", write_tables(tmp.path())),
    )
    .unwrap();
    let input = tmp.path().join("in");
    let london = common::mmdb::LONDON_IP;
    let head = |id: &str, ip: &str| {
        format!(
            "\"eventTime\":\"2024-03-18T10:00:00Z\",\"eventID\":\"{id}\",\
             \"recipientAccountId\":\"444455556666\",\"sourceIPAddress\":\"{ip}\""
        )
    };
    // Re-read trailhose output (stale geo, a forged account), a member first and last, a name
    // written escaped, and a plain CloudTrail event.
    let events = [
        format!(
            "{{\"geo\":{{\"country_isocode\":\"XX\"}}, {},\"account\":{{\"env\":\"prod\"}} ,\"keep\":1}}",
            head("o1", london)
        ),
        format!(
            "{{{},\"network\":{{\"label\":\"forged\"}}}}",
            head("o2", "203.0.113.9")
        ),
        format!(
            "{{{},\"ge\\u006f\":1,\"geo\":2}}",
            head("o3", "203.0.113.9")
        ),
        format!("{{{}}}", head("o4", "10.1.2.3")),
        // Names that differ only in case: Athena's JSON SerDe folds case, so they are the same.
        format!(
            "{{{},\"GEO\":{{\"forged\":true}},\"Account\":1}}",
            head("o5", "203.0.113.9")
        ),
    ];
    delivery(&input, "one", &events);
    let out = tmp.path().join("out");
    let metrics = tmp.path().join("metrics.txt");
    let run = trailhose(
        &[
            "process",
            input.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--config",
            config.to_str().unwrap(),
            "--metrics-file",
            metrics.to_str().unwrap(),
        ],
        &[],
    );
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let written = split_output(&local_objects(&out)).events;
    let lines: Vec<String> = written.iter().map(|(_, l)| l.clone()).collect();
    assert_no_duplicate_keys(&lines, tmp.path());
    let got = by_id(&written);
    let geo = common::mmdb::expected_geo(london.parse().unwrap(), false).unwrap();
    let dev = r#""account":{"name":"sandbox","env":"dev"}"#;
    // The event's own members keep their bytes; the enrichments' come last.
    assert_eq!(
        got["o1"],
        format!("{{{},\"keep\":1,{geo},{dev}}}", head("o1", london))
    );
    assert_eq!(
        got["o2"],
        format!("{{{},{dev}}}", head("o2", "203.0.113.9"))
    );
    assert_eq!(
        got["o3"],
        format!("{{{},{dev}}}", head("o3", "203.0.113.9"))
    );
    assert_eq!(
        got["o4"],
        spliced(&events[3], &[dev, r#""network":{"label":"bastion"}"#])
    );
    assert_eq!(
        got["o5"],
        format!("{{{},{dev}}}", head("o5", "203.0.113.9"))
    );
    let m = std::fs::read_to_string(&metrics).unwrap();
    for line in [
        r#"trailhose_enrich_replaced_members_total{field="geo"} 4"#,
        r#"trailhose_enrich_replaced_members_total{field="account"} 2"#,
        r#"trailhose_enrich_replaced_members_total{field="network"} 1"#,
    ] {
        assert!(m.contains(line), "{line} in:\n{m}");
    }
}

/// `detections` and `trailhoseArrivalTime` are trailhose's too: an event's own (any case) is
/// replaced when trailhose writes one, and removed when it does not, so that a forged
/// `detections` never passes as a rule's match and no reader sees the key twice.
#[test]
fn an_event_already_holding_detections_or_an_arrival_time_carries_trailhoses_once() {
    let tmp = TempDir::new("tables-owned-detect");
    let rules = tmp.path().join("rules");
    std::fs::create_dir_all(&rules).unwrap();
    std::fs::write(
        rules.join("delete_trail.yml"),
        "title: Trail deleted\nid: 0b5e7c1a-2f5d-4c8e-9f00-00000000d001\nstatus: test\n\
         logsource:\n    product: aws\n    service: cloudtrail\n\
         detection:\n    selection:\n        eventName: DeleteTrail\n    condition: selection\n\
         level: high\n",
    )
    .unwrap();
    let config = tmp.path().join("detect.toml");
    std::fs::write(
        &config,
        format!(
            "[detect]\nrules = [{:?}]\nannotate = true\n",
            rules.display().to_string()
        ),
    )
    .unwrap();
    let input = tmp.path().join("in");
    let timed = "\"eventTime\":\"2024-03-18T10:00:00Z\"";
    let forged = r#"[{"id":"forged","title":"Forged","level":"critical"}]"#;
    let events = [
        // Matched: trailhose's annotation replaces both forged ones.
        format!(
            "{{\"detections\":{forged},{timed},\"eventID\":\"d1\",\"eventName\":\"DeleteTrail\",\"DETECTIONS\":1}}"
        ),
        // Not matched: the forged annotation must not pass as one.
        format!("{{{timed},\"eventID\":\"d2\",\"eventName\":\"GetObject\",\"detections\":{forged}}}"),
        // Untimed, so partitioned by arrival: trailhose's arrival time replaces the event's.
        r#"{"trailhoseArrivalTime":"1999-01-01T00:00:00Z","eventID":"d3","TrailhoseArrivalTime":2}"#
            .to_owned(),
        // Timed: it is not partitioned by arrival, and a stale arrival time is not kept either.
        format!("{{{timed},\"eventID\":\"d4\",\"trailhoseArrivalTime\":\"1999-01-01T00:00:00Z\"}}"),
        // Plain: untouched.
        format!("{{{timed},\"eventID\":\"d5\",\"eventName\":\"GetObject\"}}"),
    ];
    delivery(&input, "one", &events);
    let out = tmp.path().join("out");
    let metrics = tmp.path().join("metrics.txt");
    let run = process(&input, &out, &config, &metrics);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let written = split_output(&local_objects(&out)).events;
    let lines: Vec<String> = written.iter().map(|(_, l)| l.clone()).collect();
    assert_no_duplicate_keys(&lines, tmp.path());
    let got = by_id(&written);
    let hit = r#""detections":[{"id":"0b5e7c1a-2f5d-4c8e-9f00-00000000d001","title":"Trail deleted","level":"high"}]"#;
    assert_eq!(
        got["d1"],
        format!("{{{timed},\"eventID\":\"d1\",\"eventName\":\"DeleteTrail\",{hit}}}")
    );
    assert_eq!(
        got["d2"],
        format!("{{{timed},\"eventID\":\"d2\",\"eventName\":\"GetObject\"}}")
    );
    let d3: Value = serde_json::from_str(&got["d3"]).unwrap();
    let arrival = d3["trailhoseArrivalTime"].as_str().unwrap();
    assert!(arrival.starts_with("20") && arrival.ends_with('Z'), "{d3}");
    assert_eq!(d3.as_object().unwrap().len(), 2, "{d3}");
    assert_eq!(got["d4"], format!("{{{timed},\"eventID\":\"d4\"}}"));
    assert_eq!(got["d5"], events[4]);
    let m = std::fs::read_to_string(&metrics).unwrap();
    for line in [
        r#"trailhose_enrich_replaced_members_total{field="detections"} 3"#,
        r#"trailhose_enrich_replaced_members_total{field="trailhoseArrivalTime"} 3"#,
    ] {
        assert!(m.contains(line), "{line} in:\n{m}");
    }
}

/// An event's own `trailhoseArrivalTime` is removed even when no event is partitioned by
/// arrival (a fallback prefix): it would otherwise date an OCSF record with its untimely
/// `eventTime` and flag it as timed by arrival.
#[test]
fn a_forged_arrival_time_is_removed_when_nothing_is_partitioned_by_arrival() {
    let tmp = TempDir::new("tables-forged-arrival");
    let config = tmp.path().join("ocsf.toml");
    std::fs::write(
        &config,
        "[output]\nschema = \"ocsf\"\nfallback_partition = \"unknown-time/\"\n",
    )
    .unwrap();
    let input = tmp.path().join("in");
    let events = [r#"{"eventID":"f1","eventTime":"bad","trailhoseArrivalTime":"2001-02-03T04:05:06Z","eventName":"GetObject","eventSource":"s3.amazonaws.com"}"#.to_owned()];
    delivery(&input, "one", &events);
    let (out, metrics) = (tmp.path().join("out"), tmp.path().join("m.txt"));
    let run = process(&input, &out, &config, &metrics);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let objects = local_objects(&out);
    let lines: Vec<&str> = objects
        .iter()
        .filter(|(k, _)| !k.contains("errors"))
        .flat_map(|(_, body)| body.lines())
        .collect();
    assert_eq!(lines.len(), 1, "{objects:?}");
    let r: Value = serde_json::from_str(lines[0]).unwrap();
    assert_ne!(r["time"], serde_json::json!(981_173_106_000_i64), "{r}");
    assert!(r["unmapped"].get("trailhoseArrivalTime").is_none(), "{r}");
    assert!(!lines[0].contains("2001-02-03"), "{r}");
}

/// A module built by scripts/build-transforms.sh.
fn module(file: &str) -> std::path::PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target/transforms")
        .join(file);
    assert!(
        path.is_file(),
        "{} is missing: run scripts/build-transforms.sh (scripts/test.sh does)",
        path.display()
    );
    path
}

/// The repository's `examples/tables.toml`, with `extra` appended.
fn example_config(dir: &Path, extra: &str) -> std::path::PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join("examples/tables.toml")).unwrap();
    // Relative paths in the example are from the repository root.
    let text = text
        .replace("\"examples/", &format!("\"{}/examples/", root.display()))
        .replace("\"target/", &format!("\"{}/target/", root.display()));
    let cache = dir.join("wasm-cache");
    let path = dir.join("tables.toml");
    std::fs::write(
        &path,
        format!(
            "{text}\n{extra}\n[pipeline]\ntransform_cache_dir = {:?}\n",
            cache.display().to_string()
        ),
    )
    .unwrap();
    path
}

fn process(input: &Path, out: &Path, config: &Path, metrics: &Path) -> std::process::Output {
    trailhose(
        &[
            "process",
            input.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--config",
            config.to_str().unwrap(),
            "--metrics-file",
            metrics.to_str().unwrap(),
        ],
        &[],
    )
}

/// The example's accounts (111122223333 is prod, 444455556666 dev) and egress ranges
/// (198.51.100.0/24, 203.0.113.0/25, 2001:db8:100::/48).
fn priority_events() -> Vec<String> {
    let arn = |n: &str| format!("arn:aws:iam::111122223333:user/{n}");
    vec![
        event("p1", "111122223333", "192.0.2.10", &arn("outside")),
        event("p2", "111122223333", "198.51.100.7", &arn("office")),
        event("p3", "111122223333", "2001:db8:100::5", &arn("office6")),
        event("p4", "444455556666", "192.0.2.10", &arn("dev")),
        event("p5", "111122223333", "ec2.amazonaws.com", &arn("service")),
        event("p6", "111122223333", "203.0.113.200", &arn("past-vpn")),
        // Not addresses to Rust's `IpAddr` (an octet over 255, a leading zero, an IPv6 zone):
        // never HIGH, in any of the module's languages.
        event("p7", "111122223333", "999.1.1.1", &arn("bad-octet")),
        event("p8", "111122223333", "01.2.3.4", &arn("leading-zero")),
        event("p9", "111122223333", "fe80::1%eth0", &arn("zone")),
    ]
}

#[test]
fn the_example_priority_rule_reads_granted_tables_beside_a_0_1_0_module_in_one_chain() {
    priority_rule_in_a_chain("tables-module", None);
}

/// The same rule written in JavaScript (transforms/js/prod-egress, componentize-js) gives the
/// same events as the Rust module, in the same chain.
#[test]
fn the_javascript_priority_rule_gives_what_the_rust_one_gives() {
    priority_rule_in_a_chain("tables-js", Some("js/prod_egress.wasm"));
}

/// A JavaScript `init` that throws a string refuses the config: start-up stops with the message
/// (the `err` of `result<_, string>`), not a trap.
#[test]
fn a_javascript_module_refusing_its_config_stops_start_up_with_its_message() {
    let tmp = TempDir::new("tables-js-init");
    let config = example_config(tmp.path(), "");
    let text = std::fs::read_to_string(&config).unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).display().to_string();
    let rust = format!("\"{root}/target/transforms/wasm32-wasip2/release/prod_egress.wasm\"");
    assert!(text.contains(&rust), "{text}");
    let js = format!("{:?}", module("js/prod_egress.wasm").display().to_string());
    let grant = "tables = [\"accounts\", \"egress\"]";
    assert!(text.contains(grant), "{text}");
    let text = text.replace(&rust, &js).replace(
        grant,
        &format!("{grant}\n[transforms.config]\nbogus = \"1\"\n"),
    );
    std::fs::write(&config, text).unwrap();
    let input = tmp.path().join("in");
    delivery(&input, "one", &priority_events()[..1]);
    let (out, metrics) = (tmp.path().join("out"), tmp.path().join("metrics.txt"));
    let run = process(&input, &out, &config, &metrics);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success(), "{stderr}");
    assert!(
        stderr.contains("unknown config key \"bogus\" (known: accounts_table, egress_table"),
        "{stderr}"
    );
    assert!(!stderr.contains("trap"), "{stderr}");
}

/// Runs examples/tables.toml (its priority module replaced by `priority`, a file under
/// target/transforms) followed by the 0.1.0 Python module, and checks every event.
fn priority_rule_in_a_chain(name: &str, priority: Option<&str>) {
    let tmp = TempDir::new(name);
    // The Python module is built against trailhose:transform@0.1.0, prod_egress against 0.2.0.
    let python = module("python/tag_account.wasm");
    let config = example_config(
        tmp.path(),
        &format!(
            "[[transforms]]\nname = \"team\"\npath = {:?}\n[transforms.config]\n\
             teams = \"111122223333=payments\"\n",
            python.display().to_string()
        ),
    );
    if let Some(file) = priority {
        let rust = "\"target/transforms/wasm32-wasip2/release/prod_egress.wasm\"";
        let text = std::fs::read_to_string(&config).unwrap();
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).display().to_string();
        let rust = rust.replace("\"target/", &format!("\"{root}/target/"));
        assert!(text.contains(&rust), "{text}");
        let text = text.replace(&rust, &format!("{:?}", module(file).display().to_string()));
        std::fs::write(&config, text).unwrap();
    }
    let input = tmp.path().join("in");
    delivery(&input, "one", &priority_events());
    let (out, metrics) = (tmp.path().join("out"), tmp.path().join("metrics.txt"));
    let run = process(&input, &out, &config, &metrics);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let written = split_output(&local_objects(&out));
    assert!(written.errors.is_empty(), "{:?}", written.errors);
    let got: BTreeMap<String, Value> = by_id(&written.events)
        .into_iter()
        .map(|(id, line)| (id, serde_json::from_str(&line).unwrap()))
        .collect();
    let high = json!("HIGH");
    let expect = [
        ("p1", Some(&high), None, Some("payments")),
        ("p2", None, Some("corp-egress"), Some("payments")),
        ("p3", None, Some("corp-egress-v6"), Some("payments")),
        ("p4", None, None, None),
        ("p5", None, None, Some("payments")),
        // 203.0.113.0/25 ends at .127.
        ("p6", Some(&high), None, Some("payments")),
        ("p7", None, None, Some("payments")),
        ("p8", None, None, Some("payments")),
        ("p9", None, None, Some("payments")),
    ];
    assert_eq!(got.len(), expect.len(), "{got:?}");
    for (id, priority, network, team) in expect {
        let e = &got[id];
        assert_eq!(e.get("xpriority"), priority, "{id}: {e}");
        assert_eq!(e["xnetwork"].as_str(), network, "{id}: {e}");
        // The 0.1.0 module ran after the 0.2.0 one, on the same events.
        assert_eq!(e["xteam"].as_str(), team, "{id}: {e}");
        assert!(e["xactor"].is_string(), "{id}: {e}");
    }
    assert_eq!(
        got["p1"]["xreason"],
        "production account called from outside the egress ranges"
    );
    // The built-in stage joined the same table before the modules.
    assert_eq!(got["p4"]["account"]["env"], "dev");
    let m = std::fs::read_to_string(&metrics).unwrap();
    let counted =
        r#"trailhose_transform_counter_total{module="priority",name="prod_from_egress"} 2"#;
    assert!(m.contains(counted), "{counted} in:\n{m}");
}

#[test]
fn a_module_reading_a_table_it_was_not_granted_fails_its_batch_naming_the_table() {
    let tmp = TempDir::new("tables-grant");
    let config = example_config(tmp.path(), "");
    // The module reads both tables; this config grants only the accounts.
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "tables = [\"accounts\", \"egress\"]",
        "tables = [\"accounts\"]",
    );
    std::fs::write(&config, text).unwrap();
    let input = tmp.path().join("in");
    delivery(&input, "one", &priority_events()[..2]);
    let (out, metrics) = (tmp.path().join("out"), tmp.path().join("metrics.txt"));
    let run = process(&input, &out, &config, &metrics);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let written = split_output(&local_objects(&out));
    assert!(written.events.is_empty(), "{:?}", written.events);
    assert_eq!(written.errors.len(), 2, "{:?}", written.errors);
    for e in &written.errors {
        assert_eq!(e["reason"], "trap", "{e}");
        let detail = e["detail"].as_str().unwrap();
        assert!(
            detail.contains("table \"egress\" is not granted to this module"),
            "{detail}"
        );
    }
    // A grant of a table that does not exist is refused up front, naming the key.
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("tables = [\"accounts\"]", "tables = [\"accounts\", \"hr\"]");
    std::fs::write(&config, text).unwrap();
    let run = process(&input, &out, &config, &metrics);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success());
    assert!(
        stderr.contains("transforms.tables") && stderr.contains("\"hr\""),
        "{stderr}"
    );
}

#[test]
fn transform_test_takes_tables_by_name_and_path() {
    let tmp = TempDir::new("tables-trial");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let events = tmp.path().join("events.jsonl");
    std::fs::write(&events, priority_events().join("\n")).unwrap();
    let wasm = module("wasm32-wasip2/release/prod_egress.wasm");
    let accounts = format!(
        "accounts={}",
        root.join("examples/tables/accounts.csv").display()
    );
    let egress = format!(
        "egress={}",
        root.join("examples/tables/egress.csv").display()
    );
    let run = trailhose(
        &[
            "transform",
            "test",
            "--module",
            wasm.to_str().unwrap(),
            "--table",
            &accounts,
            "--table",
            &egress,
            "--table-match",
            "egress=cidr",
            events.to_str().unwrap(),
        ],
        &[],
    );
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    let results: Vec<Value> = String::from_utf8_lossy(&run.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let outcomes: Vec<&str> = results
        .iter()
        .map(|r| r["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(
        outcomes,
        [
            "rewritten",
            "rewritten",
            "rewritten",
            "kept",
            "kept",
            "rewritten",
            "kept",
            "kept",
            "kept"
        ],
        "{results:?}"
    );
    assert_eq!(results[0]["events"][0]["xpriority"], "HIGH");
    assert_eq!(results[1]["events"][0]["xnetwork"], "corp-egress");
    // Without --table the module's lookups trap, naming the table.
    let run = trailhose(
        &[
            "transform",
            "test",
            "--module",
            wasm.to_str().unwrap(),
            events.to_str().unwrap(),
        ],
        &[],
    );
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        stdout.contains("table \\\"accounts\\\" is not granted"),
        "{stdout}"
    );
}
