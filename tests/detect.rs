//! End to end: Sigma detections in `trailhose run` on moto (alerts on SQS, SNS → a subscribed
//! SQS queue, Kinesis, S3 and a local webhook; annotations in the written events;
//! acknowledgement held through an alert-output outage), and `trailhose detect test`.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::mmdb::{LONDON_IP, MILTON_IP};
use common::sqs::*;
use common::{TempDir, fixtures, free_port, http_get, s3_objects, trailhose};
use serde_json::{Value, json};

const OUTSIDE_US: &str = "6f0c8d2e-1a41-4c1e-9a64-3d0b3f1e7a01";
const IAM_CHANGE: &str = "6f0c8d2e-1a41-4c1e-9a64-3d0b3f1e7a02";
const SECRET_READ: &str = "6f0c8d2e-1a41-4c1e-9a64-3d0b3f1e7a03";

fn rules_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/detect/rules")
}

fn event(id: &str, source: &str, name: &str, ip: &str, user: &str, extra: Value) -> Value {
    let mut e = json!({
        "eventVersion": "1.09",
        "eventTime": "2024-03-18T14:05:00Z",
        "eventSource": source,
        "eventName": name,
        "awsRegion": "us-east-1",
        "sourceIPAddress": ip,
        "userAgent": "test",
        "userIdentity": {"type": "IAMUser", "arn": format!("arn:aws:iam::111122223333:user/{user}"), "userName": user},
        "eventID": id,
        "eventType": "AwsApiCall",
        "recipientAccountId": "111122223333"
    });
    if let (Some(o), Value::Object(x)) = (e.as_object_mut(), extra) {
        o.extend(x);
    }
    e
}

/// Seven events: four match (one of them twice by the same user and rule), three do not.
fn delivery_file() -> Vec<u8> {
    let login = json!({"responseElements": {"ConsoleLogin": "Success"}});
    let read = |bucket: &str| json!({"requestParameters": {"bucketName": bucket, "key": "k"}});
    let records = vec![
        event(
            "login-gb",
            "signin.amazonaws.com",
            "ConsoleLogin",
            LONDON_IP,
            "alice",
            login.clone(),
        ),
        event(
            "login-us",
            "signin.amazonaws.com",
            "ConsoleLogin",
            MILTON_IP,
            "carol",
            login.clone(),
        ),
        event(
            "iam-create",
            "iam.amazonaws.com",
            "CreateUser",
            MILTON_IP,
            "bob",
            json!({}),
        ),
        event(
            "iam-get",
            "iam.amazonaws.com",
            "GetUser",
            MILTON_IP,
            "bob",
            json!({}),
        ),
        event(
            "secret-read",
            "s3.amazonaws.com",
            "GetObject",
            MILTON_IP,
            "dave",
            read("super-secret-bucket"),
        ),
        event(
            "other-read",
            "s3.amazonaws.com",
            "GetObject",
            MILTON_IP,
            "dave",
            read("other-bucket"),
        ),
        event(
            "login-gb-again",
            "signin.amazonaws.com",
            "ConsoleLogin",
            LONDON_IP,
            "alice",
            login,
        ),
    ];
    serde_json::to_vec(&json!({"Records": records})).expect("json")
}

const MATCHED: [&str; 4] = ["iam-create", "login-gb", "login-gb-again", "secret-read"];
const UNMATCHED: [&str; 3] = ["iam-get", "login-us", "other-read"];

/// A webhook receiver: answers 503 to the first request (the sender must retry), 200 after;
/// keeps the bodies it accepted.
struct Hook {
    port: u16,
    bodies: Arc<Mutex<Vec<Value>>>,
}

fn start_hook() -> Hook {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::new(Mutex::new(0u32));
    let keep = bodies.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let (keep, seen) = (keep.clone(), seen.clone());
            std::thread::spawn(move || {
                let mut r = BufReader::new(conn.try_clone().expect("clone"));
                let mut w = conn;
                loop {
                    let mut len = 0usize;
                    let mut line = String::new();
                    if r.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    loop {
                        line.clear();
                        if r.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        if line == "\r\n" {
                            break;
                        }
                        if let Some((k, v)) = line.split_once(':')
                            && k.eq_ignore_ascii_case("content-length")
                        {
                            len = v.trim().parse().unwrap_or(0);
                        }
                    }
                    let mut body = vec![0; len];
                    if r.read_exact(&mut body).is_err() {
                        return;
                    }
                    let first = {
                        let mut n = seen.lock().expect("lock");
                        *n += 1;
                        *n == 1
                    };
                    let status = if first {
                        "503 Service Unavailable"
                    } else {
                        keep.lock()
                            .expect("lock")
                            .push(serde_json::from_slice(&body).expect("webhook body is JSON"));
                        "200 OK"
                    };
                    let resp = format!("HTTP/1.1 {status}\r\ncontent-length: 2\r\n\r\nok");
                    if w.write_all(resp.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    Hook { port, bodies }
}

fn sns_client(moto: &common::Moto) -> aws_sdk_sns::Client {
    let conf = aws_sdk_sns::Config::builder()
        .behavior_version_latest()
        .region(aws_sdk_sns::config::Region::new("us-east-1"))
        .endpoint_url(&moto.endpoint)
        .credentials_provider(aws_sdk_sns::config::Credentials::new(
            "testing", "testing", None, None, "test",
        ))
        .build();
    aws_sdk_sns::Client::from_conf(conf)
}

fn kinesis_client(moto: &common::Moto) -> aws_sdk_kinesis::Client {
    let conf = aws_sdk_kinesis::Config::builder()
        .behavior_version_latest()
        .region(aws_sdk_kinesis::config::Region::new("us-east-1"))
        .endpoint_url(&moto.endpoint)
        .credentials_provider(aws_sdk_kinesis::config::Credentials::new(
            "testing", "testing", None, None, "test",
        ))
        .build();
    aws_sdk_kinesis::Client::from_conf(conf)
}

/// Every record on a one-shard stream so far: (partition key, data).
async fn stream_records(k: &aws_sdk_kinesis::Client, stream: &str) -> Vec<(String, Vec<u8>)> {
    let shards = k
        .list_shards()
        .stream_name(stream)
        .send()
        .await
        .expect("list shards");
    let mut out = Vec::new();
    for s in shards.shards() {
        let mut it = k
            .get_shard_iterator()
            .stream_name(stream)
            .shard_id(s.shard_id())
            .shard_iterator_type(aws_sdk_kinesis::types::ShardIteratorType::TrimHorizon)
            .send()
            .await
            .expect("iterator")
            .shard_iterator
            .expect("iterator");
        loop {
            let r = k
                .get_records()
                .shard_iterator(&it)
                .send()
                .await
                .expect("get records");
            if r.records().is_empty() {
                break;
            }
            out.extend(
                r.records()
                    .iter()
                    .map(|x| (x.partition_key().to_owned(), x.data().as_ref().to_vec())),
            );
            match r.next_shard_iterator() {
                Some(n) => it = n.to_owned(),
                None => break,
            }
        }
    }
    out
}

async fn queue(sqs: &aws_sdk_sqs::Client, name: &str) -> String {
    sqs.create_queue()
        .queue_name(name)
        .send()
        .await
        .expect("create queue")
        .queue_url
        .expect("url")
}

async fn queue_arn(sqs: &aws_sdk_sqs::Client, url: &str) -> String {
    use aws_sdk_sqs::types::QueueAttributeName;
    sqs.get_queue_attributes()
        .queue_url(url)
        .attribute_names(QueueAttributeName::QueueArn)
        .send()
        .await
        .expect("attrs")
        .attributes
        .and_then(|a| a.get(&QueueAttributeName::QueueArn).cloned())
        .expect("arn")
}

/// Receives (and deletes) messages until `want` arrived or `secs` passed; then waits a little
/// more to catch any that should not be there.
async fn drain(sqs: &aws_sdk_sqs::Client, url: &str, want: usize, secs: u64) -> Vec<String> {
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut extra_until: Option<Instant> = None;
    loop {
        let now = Instant::now();
        if now > deadline || extra_until.is_some_and(|t| now > t) {
            return got;
        }
        let out = sqs
            .receive_message()
            .queue_url(url)
            .max_number_of_messages(10)
            .wait_time_seconds(1)
            .send()
            .await
            .expect("receive");
        for m in out.messages() {
            got.push(m.body().unwrap_or_default().to_owned());
            sqs.delete_message()
                .queue_url(url)
                .receipt_handle(m.receipt_handle().unwrap_or_default())
                .send()
                .await
                .expect("delete");
        }
        if got.len() >= want && extra_until.is_none() {
            extra_until = Some(Instant::now() + Duration::from_secs(2));
        }
    }
}

/// eventID → rule ids, from alert documents.
fn by_event(docs: &[Value]) -> BTreeMap<String, BTreeSet<String>> {
    let mut m: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for d in docs {
        let id = d["eventID"].as_str().expect("eventID").to_owned();
        m.entry(id)
            .or_default()
            .insert(d["rule_id"].as_str().expect("rule_id").to_owned());
    }
    m
}

fn expect(pairs: &[(&str, &str)]) -> BTreeMap<String, BTreeSet<String>> {
    let mut m: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (e, r) in pairs {
        m.entry((*e).to_owned())
            .or_default()
            .insert((*r).to_owned());
    }
    m
}

async fn upload_and_notify(moto: &common::Moto, queue_url: &str) -> String {
    let key = format!("{DAY}/111122223333_CloudTrail_us-east-1_20240318T1410Z_detect.json.gz");
    moto.s3()
        .put_object()
        .bucket("trail-logs")
        .key(&key)
        .body(fixtures::gzip(&delivery_file()).into())
        .send()
        .await
        .expect("put");
    send(&moto.sqs(), queue_url, &cloudtrail("trail-logs", &[&key])).await;
    key
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn matched_events_alert_on_sqs_sns_kinesis_s3_and_a_webhook_and_unmatched_ones_nowhere() {
    let (moto, q) = setup("trail-work", 5).await;
    let sqs = moto.sqs();
    let alerts_url = queue(&sqs, "alerts").await;
    let via_sns_url = queue(&sqs, "alerts-via-sns").await;
    let sns = sns_client(&moto);
    let topic = sns
        .create_topic()
        .name("security-alerts")
        .send()
        .await
        .expect("topic")
        .topic_arn
        .expect("arn");
    sns.subscribe()
        .topic_arn(&topic)
        .protocol("sqs")
        .endpoint(queue_arn(&sqs, &via_sns_url).await)
        .send()
        .await
        .expect("subscribe");
    moto.s3()
        .create_bucket()
        .bucket("trail-alerts")
        .send()
        .await
        .expect("bucket");
    let kinesis = kinesis_client(&moto);
    kinesis
        .create_stream()
        .stream_name("detect-alerts")
        .shard_count(1)
        .send()
        .await
        .expect("stream");
    let hook = start_hook();
    let tmp = TempDir::new("detect-run");
    let port = free_port();
    let extra = format!(
        r#"[detect]
rules = ["{rules}"]
fields = {{ src_country = "geo.country_isocode" }}
annotate = true

[[detect.alerts]]
kind = "sqs"
target = "{alerts_url}"

[[detect.alerts]]
kind = "sns"
target = "{topic}"
suppress_secs = 3600

[[detect.alerts]]
kind = "s3"
target = "s3://trail-alerts/alerts/"
min_level = "high"
force_path_style = true

[[detect.alerts]]
kind = "kinesis"
target = "detect-alerts"
min_level = "critical"

[[detect.alerts]]
kind = "webhook"
target_env = "TRAILHOSE_TEST_WEBHOOK_URL"
min_level = "critical"
event = "reference"
"#,
        rules = rules_dir().display(),
    );
    // The webhook URL is a secret: it comes from the environment (a Secret on Kubernetes).
    let hook_url = format!("http://127.0.0.1:{}/services/T0/B0/secret-token", hook.port);
    let settings = Settings {
        extra,
        ..Settings::default()
    };
    let config = write_config_with(
        tmp.path(),
        (&moto.endpoint, &moto.endpoint),
        &q.url,
        port,
        &settings,
    );
    let log = tmp.path().join("worker.log");
    let mut worker = start_worker_with(
        &moto,
        &config,
        &log,
        &[("TRAILHOSE_TEST_WEBHOOK_URL", &hook_url)],
    );
    let key = upload_and_notify(&moto, &q.url).await;

    // Alerts go out at once, whatever the batch age (the default 300 s holds the events).
    let docs: Vec<Value> = drain(&sqs, &alerts_url, 4, 60)
        .await
        .iter()
        .map(|b| serde_json::from_str(b).expect("alert JSON"))
        .collect();
    let logs = || std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(
        by_event(&docs),
        expect(&[
            ("login-gb", OUTSIDE_US),
            ("login-gb-again", OUTSIDE_US),
            ("iam-create", IAM_CHANGE),
            ("secret-read", SECRET_READ)
        ]),
        "SQS: every match, nothing else; log:\n{}",
        logs()
    );
    let login = docs
        .iter()
        .find(|d| d["eventID"] == "login-gb")
        .expect("login alert");
    assert_eq!(login["level"], "high");
    assert_eq!(
        login["rule_title"],
        "Console login from outside the United States"
    );
    assert!(
        login["tags"]
            .as_array()
            .expect("tags")
            .contains(&json!("attack.t1078.004"))
    );
    assert_eq!(login["eventTime"], "2024-03-18T14:05:00Z");
    assert_eq!(login["source"], format!("s3://trail-logs/{key}"));
    assert!(!login["worker"].as_str().unwrap_or("").is_empty());
    assert_eq!(
        login["event"]["geo"]["country_isocode"], "GB",
        "the event as written"
    );

    let via_sns: Vec<Value> = drain(&sqs, &via_sns_url, 3, 30)
        .await
        .iter()
        .map(|b| {
            let envelope: Value = serde_json::from_str(b).expect("SNS envelope");
            serde_json::from_str(envelope["Message"].as_str().expect("Message")).expect("alert")
        })
        .collect();
    assert_eq!(
        by_event(&via_sns),
        expect(&[
            ("login-gb", OUTSIDE_US),
            ("iam-create", IAM_CHANGE),
            ("secret-read", SECRET_READ)
        ]),
        "SNS: alice's second login is suppressed"
    );

    let s3 = moto.s3();
    let mut s3_docs = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while s3_docs.len() < 3 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
        s3_docs.clear();
        for (rel, text) in s3_objects(&s3, "trail-alerts", "alerts/").await {
            assert!(
                rel.starts_with("year=2024/month=03/day=18/hour=14/alerts-"),
                "{rel}"
            );
            s3_docs.extend(
                text.lines()
                    .map(|l| serde_json::from_str::<Value>(l).expect("alert")),
            );
        }
    }
    assert_eq!(
        by_event(&s3_docs),
        expect(&[
            ("login-gb", OUTSIDE_US),
            ("login-gb-again", OUTSIDE_US),
            ("secret-read", SECRET_READ)
        ]),
        "S3: high and above"
    );

    let deadline = Instant::now() + Duration::from_secs(30);
    while hook.bodies.lock().expect("lock").is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let hooks = hook.bodies.lock().expect("lock").clone();
    assert_eq!(
        hooks.len(),
        1,
        "webhook: the critical match only, once: {hooks:?}"
    );
    assert!(
        hooks[0]["text"]
            .as_str()
            .expect("Slack text")
            .contains("super-secret")
    );
    assert_eq!(hooks[0]["alert"]["eventID"], "secret-read");
    assert!(
        hooks[0]["alert"].get("event").is_none(),
        "event = \"reference\""
    );

    let deadline = Instant::now() + Duration::from_secs(30);
    let mut records = stream_records(&kinesis, "detect-alerts").await;
    while records.is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
        records = stream_records(&kinesis, "detect-alerts").await;
    }
    let on_stream: Vec<Value> = records
        .iter()
        .map(|(_, data)| serde_json::from_slice(data).expect("alert"))
        .collect();
    assert_eq!(
        by_event(&on_stream),
        expect(&[("secret-read", SECRET_READ)]),
        "Kinesis: critical only"
    );
    assert_eq!(records[0].0, format!("{SECRET_READ}/secret-read"));

    let metrics = http_get(port, "/metrics")
        .map(|(_, m)| m)
        .unwrap_or_default();
    for line in [
        format!("trailhose_detections_total{{level=\"high\",rule=\"{OUTSIDE_US}\"}} 2"),
        format!("trailhose_detections_total{{level=\"critical\",rule=\"{SECRET_READ}\"}} 1"),
        "trailhose_alerts_delivered_total{output=\"sqs\"} 4".to_owned(),
        "trailhose_alerts_delivered_total{output=\"webhook\"} 1".to_owned(),
        "trailhose_alerts_delivered_total{output=\"kinesis\"} 1".to_owned(),
        format!("trailhose_alerts_suppressed_total{{output=\"sns\",rule=\"{OUTSIDE_US}\"}} 1"),
        "trailhose_alert_delivery_failures_total{output=\"webhook\",result=\"retried\"} 1"
            .to_owned(),
        "trailhose_detect_rules 3".to_owned(),
    ] {
        assert!(metrics.contains(&line), "{line} in\n{metrics}");
    }
    assert!(
        !logs().contains("secret-token"),
        "a webhook URL is never logged"
    );

    // The events are held by the 300 s batch: SIGTERM writes them and acknowledges.
    assert_eq!(
        depth(&sqs, &q.url).await,
        (0, 1),
        "not acknowledged before written"
    );
    signal(&worker, "-TERM");
    assert!(wait_exit(&mut worker, 30), "clean exit; log:\n{}", logs());
    assert_eq!(
        depth(&sqs, &q.url).await,
        (0, 0),
        "acknowledged; log:\n{}",
        logs()
    );
    let written: Vec<Value> = s3_objects(&s3, "trail-out", "ct/")
        .await
        .iter()
        .filter(|(k, _)| !k.starts_with("errors/"))
        .flat_map(|(_, t)| {
            t.lines()
                .map(|l| serde_json::from_str::<Value>(l).expect("event"))
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(written.len(), 7);
    for e in &written {
        let id = e["eventID"].as_str().expect("id");
        match e.get("detections") {
            Some(d) => {
                assert!(MATCHED.contains(&id), "{id} annotated");
                assert!(d[0]["id"].is_string() && d[0]["level"].is_string(), "{d}");
            }
            None => assert!(UNMATCHED.contains(&id), "{id} not annotated"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alert_output_outage_holds_acknowledgement_and_loses_nothing() {
    let (moto, q) = setup("trail-work", 5).await;
    let sqs = moto.sqs();
    // The alert queue's URL, then the queue gone: every delivery fails until it is back.
    let alerts_url = queue(&sqs, "late-alerts").await;
    sqs.delete_queue()
        .queue_url(&alerts_url)
        .send()
        .await
        .expect("delete");
    let tmp = TempDir::new("detect-outage");
    let port = free_port();
    let extra = format!(
        r#"[detect]
rules = ["{rules}"]
fields = {{ src_country = "geo.country_isocode" }}

[[detect.alerts]]
kind = "sqs"
target = "{alerts_url}"
max_attempts = 2
"#,
        rules = rules_dir().display(),
    );
    let settings = Settings {
        extra,
        ..Settings::default()
    };
    let config = write_config_with(
        tmp.path(),
        (&moto.endpoint, &moto.endpoint),
        &q.url,
        port,
        &settings,
    );
    let log = tmp.path().join("worker-1.log");
    let mut worker = start_worker(&moto, &config, &log);
    let given_up = "trailhose_alert_delivery_failures_total{output=\"sqs\",result=\"given_up\"}";
    // The series is there at 0 before anything failed: an alert rule's `increase()` sees the
    // first give-up after start-up (a series that appears at 1 has no increase).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = http_get(port, "/metrics")
            .map(|(_, m)| m)
            .unwrap_or_default();
        if text.lines().any(|l| l == format!("{given_up} 0")) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no {given_up} 0 before the first failure:\n{text}\nlog:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    upload_and_notify(&moto, &q.url).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while metric(port, given_up) < 1.0 {
        assert!(
            Instant::now() < deadline,
            "no failed delivery; log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    signal(&worker, "-TERM");
    assert!(wait_exit(&mut worker, 30), "clean exit");
    let (visible, in_flight) = depth(&sqs, &q.url).await;
    assert_eq!(
        visible + in_flight,
        1,
        "the notification was not acknowledged"
    );

    // The output is back: a new worker gets the notification again and delivers every alert.
    let again = queue(&sqs, "late-alerts").await;
    assert_eq!(again, alerts_url);
    let log = tmp.path().join("worker-2.log");
    let mut worker = start_worker(&moto, &config, &log);
    let docs: Vec<Value> = drain(&sqs, &alerts_url, 4, 90)
        .await
        .iter()
        .map(|b| serde_json::from_str(b).expect("alert JSON"))
        .collect();
    let ids: BTreeSet<&str> = docs.iter().filter_map(|d| d["eventID"].as_str()).collect();
    assert_eq!(
        ids,
        MATCHED.into_iter().collect(),
        "every alert, after the outage"
    );
    signal(&worker, "-TERM");
    assert!(wait_exit(&mut worker, 30), "clean exit");
    assert_eq!(
        depth(&sqs, &q.url).await,
        (0, 0),
        "acknowledged once delivered"
    );
}

#[test]
fn detect_test_shows_which_rule_matches_which_event() {
    let tmp = TempDir::new("detect-cli");
    // Events as written: with their geo object.
    let mut file: Value = serde_json::from_slice(&delivery_file()).expect("json");
    for e in file["Records"].as_array_mut().expect("records") {
        let country = if e["sourceIPAddress"] == LONDON_IP {
            "GB"
        } else {
            "US"
        };
        e["geo"] = json!({"country_isocode": country});
    }
    let events = tmp.path().join("events.json");
    std::fs::write(&events, serde_json::to_vec(&file).expect("json")).expect("write");
    let rules = rules_dir().display().to_string();
    let out = trailhose(
        &[
            "detect",
            "test",
            "--rules",
            &rules,
            "--field",
            "src_country=geo.country_isocode",
            &events.display().to_string(),
        ],
        &[],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    let got: BTreeMap<String, String> = lines
        .iter()
        .map(|l| {
            (
                l["eventID"].as_str().expect("id").to_owned(),
                l["matches"][0]["id"].as_str().expect("rule").to_owned(),
            )
        })
        .collect();
    let want: BTreeMap<String, String> = [
        ("login-gb", OUTSIDE_US),
        ("login-gb-again", OUTSIDE_US),
        ("iam-create", IAM_CHANGE),
        ("secret-read", SECRET_READ),
    ]
    .iter()
    .map(|(e, r)| ((*e).to_owned(), (*r).to_owned()))
    .collect();
    assert_eq!(got, want);
    assert!(
        stderr.contains("3 rules loaded, 1 for other logsources, 0 invalid; 7 events, 4 matched"),
        "{stderr}"
    );
}

#[test]
fn a_rule_that_does_not_compile_stops_start_up_with_its_path_and_reason() {
    let tmp = TempDir::new("detect-bad");
    let rules = tmp.path().join("rules");
    std::fs::create_dir_all(&rules).expect("dir");
    let bad = rules.join("broken.yml");
    std::fs::write(
        &bad,
        "title: Broken\nlogsource:\n  product: aws\n  service: cloudtrail\ndetection:\n  selection:\n    eventName: x\n  condition: selection and missing_selection\n",
    )
    .expect("write");
    std::fs::copy(rules_dir().join("iam_change.yml"), rules.join("iam.yml")).expect("copy");
    let input = tmp.path().join("in");
    std::fs::create_dir_all(&input).expect("dir");
    std::fs::write(input.join("f.json"), delivery_file()).expect("write");
    let cfg = |skip: bool| {
        let p = tmp.path().join(format!("c-{skip}.toml"));
        std::fs::write(
            &p,
            format!(
                "[output]\nurl = \"{}\"\n[detect]\nrules = [\"{}\"]\nskip_invalid = {skip}\nannotate = true\n",
                tmp.path().join(format!("out-{skip}")).display(),
                rules.display()
            ),
        )
        .expect("config");
        p.display().to_string()
    };
    let input_arg = input.display().to_string();
    let out = trailhose(&["process", "--config", &cfg(false), &input_arg], &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("broken.yml") && stderr.contains("missing_selection"),
        "{stderr}"
    );

    let out = trailhose(&["process", "--config", &cfg(true), &input_arg], &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("detection rule skipped") && stderr.contains("broken.yml"),
        "{stderr}"
    );
    let written = common::local_objects(&tmp.path().join("out-true"));
    let annotated: Vec<String> = written
        .iter()
        .flat_map(|(_, t)| t.lines().map(str::to_owned).collect::<Vec<_>>())
        .filter(|l| l.contains("\"detections\""))
        .map(|l| common::checks::id_of(&l))
        .collect();
    assert_eq!(annotated, ["iam-create"], "the valid rule still runs");
}

#[test]
fn process_fails_when_alerts_it_matched_could_not_be_delivered() {
    // Local files have no notification to deliver them again: a given-up alert is a failed
    // run (exit status and message), never a silent loss.
    let tmp = TempDir::new("detect-process-undelivered");
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let input = tmp.path().join("in");
    std::fs::create_dir_all(&input).expect("dir");
    std::fs::write(input.join("f.json"), delivery_file()).expect("write");
    let cfg = tmp.path().join("c.toml");
    std::fs::write(
        &cfg,
        format!(
            "[output]\nurl = \"{}\"\n[detect]\nrules = [\"{}\"]\n[[detect.alerts]]\nkind = \"webhook\"\ntarget_env = \"TRAILHOSE_TEST_HOOK\"\nmax_attempts = 2\n",
            tmp.path().join("out").display(),
            rules_dir().display()
        ),
    )
    .expect("config");
    let args = [
        "process".to_owned(),
        "--config".to_owned(),
        cfg.display().to_string(),
        input.display().to_string(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    // Without the variable: a clear start-up error that names the key and the variable.
    let out = trailhose(&args, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("detect.alerts.target_env") && stderr.contains("TRAILHOSE_TEST_HOOK"),
        "{stderr}"
    );
    let url = format!("http://127.0.0.1:{closed}/services/T0/B0/secret-token");
    let out = trailhose(&args, &[("TRAILHOSE_TEST_HOOK", url)]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("alert(s) not delivered to alert output \"webhook\""),
        "{stderr}"
    );
    assert!(
        !stderr.contains("secret-token"),
        "a webhook URL is never logged: {stderr}"
    );
}

/// A webhook receiver that holds its answer to every request until `release` is set.
struct GatedHook {
    port: u16,
    received: Arc<Mutex<Vec<Value>>>,
    release: Arc<std::sync::atomic::AtomicBool>,
}

fn start_gated_hook() -> GatedHook {
    use std::sync::atomic::{AtomicBool, Ordering};
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let received = Arc::new(Mutex::new(Vec::new()));
    let release = Arc::new(AtomicBool::new(false));
    let (keep, gate) = (received.clone(), release.clone());
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let (keep, gate) = (keep.clone(), gate.clone());
            std::thread::spawn(move || {
                let mut r = BufReader::new(conn.try_clone().expect("clone"));
                let mut w = conn;
                loop {
                    let mut line = String::new();
                    let mut len = 0usize;
                    if r.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    loop {
                        line.clear();
                        if r.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                            break;
                        }
                        if let Some((k, v)) = line.split_once(':')
                            && k.eq_ignore_ascii_case("content-length")
                        {
                            len = v.trim().parse().unwrap_or(0);
                        }
                    }
                    let mut body = vec![0; len];
                    if r.read_exact(&mut body).is_err() {
                        return;
                    }
                    keep.lock()
                        .expect("lock")
                        .push(serde_json::from_slice(&body).expect("webhook body is JSON"));
                    while !gate.load(Ordering::Acquire) {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    if w.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    GatedHook {
        port,
        received,
        release,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_an_alert_in_flight_delivers_it_then_acknowledges() {
    let (moto, q) = setup("trail-work", 5).await;
    let sqs = moto.sqs();
    let hook = start_gated_hook();
    let tmp = TempDir::new("detect-sigterm");
    let port = free_port();
    let extra = format!(
        r#"[detect]
rules = ["{rules}"]

[[detect.alerts]]
kind = "webhook"
target = "http://127.0.0.1:{hook}/hook"
min_level = "critical"
"#,
        rules = rules_dir().display(),
        hook = hook.port,
    );
    let settings = Settings {
        extra,
        ..Settings::default()
    };
    let config = write_config_with(
        tmp.path(),
        (&moto.endpoint, &moto.endpoint),
        &q.url,
        port,
        &settings,
    );
    let log = tmp.path().join("worker.log");
    let logs = || std::fs::read_to_string(&log).unwrap_or_default();
    let mut worker = start_worker(&moto, &config, &log);
    upload_and_notify(&moto, &q.url).await;
    // The alert is on the wire, its answer held: SIGTERM now.
    let deadline = Instant::now() + Duration::from_secs(60);
    while hook.received.lock().expect("lock").is_empty() {
        assert!(Instant::now() < deadline, "no alert sent; log:\n{}", logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    signal(&worker, "-TERM");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        worker.try_wait().expect("wait").is_none(),
        "the worker waits for the alert in flight; log:\n{}",
        logs()
    );
    assert_eq!(depth(&sqs, &q.url).await, (0, 1), "not acknowledged yet");
    hook.release
        .store(true, std::sync::atomic::Ordering::Release);
    assert!(wait_exit(&mut worker, 30), "clean exit; log:\n{}", logs());
    assert_eq!(
        depth(&sqs, &q.url).await,
        (0, 0),
        "acknowledged once the alert and the records are through; log:\n{}",
        logs()
    );
    let got = hook.received.lock().expect("lock").clone();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0]["alert"]["eventID"], "secret-read");
}

async fn notify_file(moto: &common::Moto, queue_url: &str, name: &str) {
    let key = format!("{DAY}/111122223333_CloudTrail_us-east-1_20240318T1410Z_{name}.json.gz");
    moto.s3()
        .put_object()
        .bucket("trail-logs")
        .key(&key)
        .body(fixtures::gzip(&delivery_file()).into())
        .send()
        .await
        .expect("put");
    send(&moto.sqs(), queue_url, &cloudtrail("trail-logs", &[&key])).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_rules_and_a_bad_set_keeps_the_running_one() {
    let (moto, q) = setup("trail-work", 5).await;
    let sqs = moto.sqs();
    let alerts_url = queue(&sqs, "reload-alerts").await;
    let tmp = TempDir::new("detect-reload");
    let rules = tmp.path().join("rules");
    std::fs::create_dir_all(&rules).expect("dir");
    std::fs::copy(rules_dir().join("iam_change.yml"), rules.join("iam.yml")).expect("copy");
    let port = free_port();
    let extra = format!(
        "[detect]\nrules = [\"{}\"]\nreload_secs = 0\n\n[[detect.alerts]]\nkind = \"sqs\"\ntarget = \"{alerts_url}\"\n",
        rules.display()
    );
    let settings = Settings {
        extra,
        ..Settings::default()
    };
    let config = write_config_with(
        tmp.path(),
        (&moto.endpoint, &moto.endpoint),
        &q.url,
        port,
        &settings,
    );
    let log = tmp.path().join("worker.log");
    let logs = || std::fs::read_to_string(&log).unwrap_or_default();
    let mut worker = start_worker(&moto, &config, &log);
    let rules_of = |docs: &[String]| -> BTreeSet<String> {
        docs.iter()
            .map(|b| serde_json::from_str::<Value>(b).expect("alert"))
            .map(|d| d["rule_id"].as_str().expect("rule").to_owned())
            .collect()
    };

    notify_file(&moto, &q.url, "one").await;
    let first = drain(&sqs, &alerts_url, 1, 60).await;
    assert_eq!(rules_of(&first), BTreeSet::from([IAM_CHANGE.to_owned()]));

    // A rule added, then SIGHUP: it runs on the next file.
    std::fs::copy(
        rules_dir().join("secret_bucket_read.yml"),
        rules.join("secret.yml"),
    )
    .expect("copy");
    signal(&worker, "-HUP");
    let ok = "trailhose_detect_reloads_total{result=\"ok\"}";
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric(port, ok) < 1.0 {
        assert!(Instant::now() < deadline, "no reload; log:\n{}", logs());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(metric(port, "trailhose_detect_rules "), 2.0);
    notify_file(&moto, &q.url, "two").await;
    let second = drain(&sqs, &alerts_url, 2, 60).await;
    assert_eq!(
        rules_of(&second),
        BTreeSet::from([IAM_CHANGE.to_owned(), SECRET_READ.to_owned()])
    );

    // A broken rule: the reload fails, counted and logged, and both rules keep running.
    std::fs::write(
        rules.join("broken.yml"),
        "title: Broken\nlogsource:\n  product: aws\n  service: cloudtrail\ndetection:\n  selection:\n    eventName: x\n  condition: selection and missing_selection\n",
    )
    .expect("write");
    signal(&worker, "-HUP");
    let failed = "trailhose_detect_reloads_total{result=\"failed\"}";
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric(port, failed) < 1.0 {
        assert!(
            Instant::now() < deadline,
            "no failed reload; log:\n{}",
            logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        logs().contains("detection rules not reloaded") && logs().contains("broken.yml"),
        "{}",
        logs()
    );
    assert_eq!(metric(port, "trailhose_detect_rules "), 2.0);
    notify_file(&moto, &q.url, "three").await;
    let third = drain(&sqs, &alerts_url, 2, 60).await;
    assert_eq!(
        rules_of(&third),
        BTreeSet::from([IAM_CHANGE.to_owned(), SECRET_READ.to_owned()]),
        "the running rules stay"
    );
    signal(&worker, "-TERM");
    assert!(wait_exit(&mut worker, 30), "clean exit; log:\n{}", logs());
}
