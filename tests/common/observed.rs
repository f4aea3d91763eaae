//! The observability scenario (tests/observability.rs, tests/prometheus.rs): on one moto, an
//! SQS worker (`trailhose run` with GeoIP and two transforms, one of which panics) and a Kinesis
//! worker whose output bucket is deleted once it has started, so that its writes fail. Both run
//! Sigma rules that match their events. The SQS worker's alerts are delivered (on a second
//! output, all but one per round suppressed) and counted in memory within the smallest budget;
//! the Kinesis worker's alert queue and correlation table are deleted once it has started, so
//! that its deliveries and state updates fail. Rounds of traffic give every labelled metric the
//! chart uses a label set, good and bad input alike.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use super::checks::fixture_dbs;
use super::{Moto, TempDir, eventually, fixtures, free_port, http_get, upload_tree};

pub const STREAM: &str = "observability";

pub struct Workers {
    pub moto: Moto,
    pub tmp: TempDir,
    queue: String,
    notification: String,
    kinesis: aws_sdk_kinesis::Client,
    sqs_worker: Child,
    kinesis_worker: Child,
    /// The /metrics ports of the SQS and the Kinesis worker.
    pub sqs_port: u16,
    pub kinesis_port: u16,
}

impl Workers {
    /// Starts both workers on a fresh moto and waits until they serve /healthz. No traffic yet.
    pub async fn start(name: &str) -> Workers {
        let moto = Moto::start();
        let (s3, sqs) = (moto.s3(), moto.sqs());
        for b in ["trail-logs", "trail-out", "kinesis-out"] {
            s3.create_bucket().bucket(b).send().await.expect("bucket");
        }
        let queue = sqs
            .create_queue()
            .queue_name(name)
            .send()
            .await
            .expect("queue")
            .queue_url
            .expect("queue url");
        let kinesis = kinesis_client(&moto);
        kinesis
            .create_stream()
            .stream_name(STREAM)
            .shard_count(1)
            .send()
            .await
            .expect("stream");
        let alerts = sqs
            .create_queue()
            .queue_name(format!("{name}-alerts"))
            .send()
            .await
            .expect("alert queue")
            .queue_url
            .expect("queue url");
        let lost_alerts = sqs
            .create_queue()
            .queue_name(format!("{name}-lost-alerts"))
            .send()
            .await
            .expect("alert queue")
            .queue_url
            .expect("queue url");
        let tmp = TempDir::new(name);
        write_rules(&tmp.path().join("rules"));
        let input = tmp.path().join("in");
        fixtures::write_all(&input);
        let keys = upload_tree(&s3, "trail-logs", &input).await;
        let notification =
            serde_json::json!({"s3Bucket": "trail-logs", "s3ObjectKey": keys}).to_string();
        let sqs_port = free_port();
        let sqs_worker = spawn(
            &moto,
            &sqs_config(&moto, tmp.path(), &queue, &alerts, sqs_port),
        );
        let kinesis_port = free_port();
        let kinesis_worker = spawn(
            &moto,
            &kinesis_config(&moto, tmp.path(), &lost_alerts, kinesis_port),
        );
        let workers = Workers {
            moto,
            tmp,
            queue,
            notification,
            kinesis,
            sqs_worker,
            kinesis_worker,
            sqs_port,
            kinesis_port,
        };
        for port in workers.ports() {
            eventually(60, "a worker's /healthz", || async {
                http_get(port, "/healthz").is_some_and(|(s, _)| s == 200)
            })
            .await;
        }
        // The Kinesis worker checked its output at start-up; from now on every put fails.
        s3.delete_bucket()
            .bucket("kinesis-out")
            .send()
            .await
            .expect("delete the Kinesis worker's output bucket");
        // ...its alerts are refused...
        workers
            .moto
            .sqs()
            .delete_queue()
            .queue_url(&lost_alerts)
            .send()
            .await
            .expect("delete the Kinesis worker's alert queue");
        // ...and its correlation state cannot be updated.
        dynamodb_client(&workers.moto)
            .delete_table()
            .table_name(CORRELATION_TABLE)
            .send()
            .await
            .expect("delete the Kinesis worker's correlation table");
        workers
    }

    pub fn ports(&self) -> [u16; 2] {
        [self.sqs_port, self.kinesis_port]
    }

    /// One round of traffic: a notification naming the whole fixture set (good, digest and bad
    /// files, a mixed Records array; processed again in each round, as after a redelivery), a
    /// garbage message, and one CloudWatch Logs batch of two events on the stream.
    pub async fn feed(&self, round: u32) {
        let sqs = self.moto.sqs();
        for b in [self.notification.as_str(), "not a notification"] {
            sqs.send_message()
                .queue_url(&self.queue)
                .message_body(b)
                .send()
                .await
                .expect("send");
        }
        // One event with an eventTime and one without (it goes to the fallback partition).
        let event = serde_json::json!({"eventVersion": "1.09", "eventTime": "2024-03-18T14:30:07Z",
            "eventSource": "iam.amazonaws.com", "eventID": format!("k{round}"),
            "recipientAccountId": "111122223333"});
        let timeless = serde_json::json!({"eventVersion": "1.09", "eventSource": "iam.amazonaws.com",
            "eventID": format!("k{round}-no-time"), "recipientAccountId": "111122223333"});
        let batch = serde_json::json!({"messageType": "DATA_MESSAGE", "owner": "111122223333",
        "logGroup": "g", "logStream": "s", "subscriptionFilters": ["f"],
        "logEvents": [
            {"id": "1", "timestamp": 1710772207000u64, "message": event.to_string()},
            {"id": "2", "timestamp": 1710772207000u64, "message": timeless.to_string()},
        ]});
        self.kinesis
            .put_record()
            .stream_name(STREAM)
            .partition_key("k")
            .data(aws_sdk_kinesis::primitives::Blob::new(fixtures::gzip(
                batch.to_string().as_bytes(),
            )))
            .send()
            .await
            .expect("put record");
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        for w in [&mut self.sqs_worker, &mut self.kinesis_worker] {
            let _ = w.kill();
            let _ = w.wait();
        }
    }
}

/// The Kinesis worker's correlation table (created by trailhose at start-up).
const CORRELATION_TABLE: &str = "observed-correlation";

/// Rules for both workers: one matches the fixture files' DescribeInstances calls (SQS), one
/// the stream's IAM events (Kinesis); a correlation counts both per account, another each
/// event on its own, a third groups by a field no event has (in no group: skipped, the
/// dashboard's normal `group_missing`); none fires. The SQS worker's memory budget is the smallest allowed,
/// so the fixture set's groups do not fit and states are evicted in every round.
fn write_rules(dir: &Path) {
    std::fs::create_dir_all(dir).expect("rules dir");
    std::fs::write(
        dir.join("observed.yml"),
        r#"title: EC2 instances described
id: 0b5e1d7c-6a0e-4c53-9a57-0b5e1d7c0001
name: ec2_describe
logsource: {product: aws, service: cloudtrail}
detection:
  selection: {eventSource: ec2.amazonaws.com, eventName: DescribeInstances}
  condition: selection
level: medium
---
title: Any IAM event
id: 0b5e1d7c-6a0e-4c53-9a57-0b5e1d7c0002
name: iam_any
logsource: {product: aws, service: cloudtrail}
detection:
  selection: {eventSource: iam.amazonaws.com}
  condition: selection
level: high
---
title: Many calls from one account
id: 0b5e1d7c-6a0e-4c53-9a57-0b5e1d7c0003
correlation:
  type: event_count
  rules: [ec2_describe, iam_any]
  group-by: [recipientAccountId]
  timespan: 1h
  condition: {gte: 4000}
  generate: true
level: low
---
title: One event seen many times
id: 0b5e1d7c-6a0e-4c53-9a57-0b5e1d7c0004
correlation:
  type: event_count
  rules: [ec2_describe]
  group-by: [eventID]
  timespan: 1h
  condition: {gte: 4000}
  generate: true
level: low
---
title: Calls grouped by a field the events lack
id: 0b5e1d7c-6a0e-4c53-9a57-0b5e1d7c0005
correlation:
  type: event_count
  rules: [ec2_describe]
  group-by: [observedAbsentField]
  timespan: 1h
  condition: {gte: 4000}
  generate: true
level: low
"#,
    )
    .expect("rules");
}

fn dynamodb_client(moto: &Moto) -> aws_sdk_dynamodb::Client {
    let conf = aws_sdk_dynamodb::Config::builder()
        .behavior_version_latest()
        .region(aws_sdk_dynamodb::config::Region::new("us-east-1"))
        .endpoint_url(&moto.endpoint)
        .credentials_provider(aws_sdk_dynamodb::config::Credentials::new(
            "testing", "testing", None, None, "test",
        ))
        .build();
    aws_sdk_dynamodb::Client::from_conf(conf)
}

fn kinesis_client(moto: &Moto) -> aws_sdk_kinesis::Client {
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

fn spawn(moto: &Moto, config: &Path) -> Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_trailhose"));
    cmd.args(["run", "--config"])
        .arg(config)
        .env("TRAILHOSE_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for (k, v) in moto.env() {
        cmd.env(k, v);
    }
    cmd.spawn().expect("start trailhose run")
}

/// `max_age_secs = 1` (not the shipped 300): the scenario watches objects being written.
fn sqs_config(moto: &Moto, dir: &Path, queue: &str, alerts: &str, port: u16) -> PathBuf {
    let (city, asn) = fixture_dbs(dir);
    // Transforms: one that works and one that panics after its first events, so that the
    // per-module throughput and failure metrics get label sets.
    let modules =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("target/transforms/wasm32-wasip2/release");
    let (priority, hostile) = (
        modules.join("priority_rules.wasm"),
        modules.join("hostile.wasm"),
    );
    assert!(
        priority.is_file() && hostile.is_file(),
        "run scripts/build-transforms.sh (scripts/test.sh does)"
    );
    let (priority, hostile) = (priority.display(), hostile.display());
    let rules = dir.join("rules");
    let rules = rules.display();
    let ep = &moto.endpoint;
    let config = dir.join("run.toml");
    std::fs::write(
        &config,
        format!(
            r#"[output]
url = "s3://trail-out/ct/"
[output.s3]
endpoint_url = "{ep}"
force_path_style = true
[batch]
max_age_secs = 1
[geoip]
city_db = "{city}"
asn_db = "{asn}"
[source.sqs]
queue_url = "{queue}"
endpoint_url = "{ep}"
wait_time_secs = 1
visibility_timeout_secs = 5
[[source.buckets]]
name = "trail-logs"
endpoint_url = "{ep}"
force_path_style = true
[server]
listen = "127.0.0.1:{port}"
[pipeline]
transform_batch_events = 8
[[transforms]]
name = "priority"
path = "{priority}"
[[transforms]]
name = "flaky"
path = "{hostile}"
[transforms.config]
mode = "panic_after"
n = "8"
[detect]
rules = ["{rules}"]
reload_secs = 0
[detect.correlation]
max_members = 10000
[[detect.alerts]]
kind = "sqs"
name = "triage"
target = "{alerts}"
endpoint_url = "{ep}"
[[detect.alerts]]
kind = "sqs"
name = "digest"
target = "{alerts}"
endpoint_url = "{ep}"
# Every fixture event is alice's: one alert per round (rounds are more than 2 s apart), the
# rest of the round's suppressed.
suppress_secs = 2
"#
        ),
    )
    .expect("config");
    config
}

/// A Kinesis-mode worker on the one-shard stream: the lease and lag metrics get values.
fn kinesis_config(moto: &Moto, dir: &Path, alerts: &str, port: u16) -> PathBuf {
    let rules = dir.join("rules");
    let rules = rules.display();
    let ep = &moto.endpoint;
    let config = dir.join("kinesis.toml");
    std::fs::write(
        &config,
        format!(
            r#"[output]
url = "s3://kinesis-out/kinesis/"
[output.s3]
endpoint_url = "{ep}"
force_path_style = true
[batch]
max_age_secs = 1
[source.kinesis]
stream = "{STREAM}"
endpoint_url = "{ep}"
worker_id = "observer"
lease_duration_millis = 2000
lease_renew_interval_millis = 400
shard_sync_interval_millis = 1000
poll_interval_millis = 200
[[source.buckets]]
name = "trail-logs"
endpoint_url = "{ep}"
force_path_style = true
[server]
listen = "127.0.0.1:{port}"
[detect]
rules = ["{rules}"]
reload_secs = 0
[detect.correlation]
mode = "dynamodb"
table = "{CORRELATION_TABLE}"
endpoint_url = "{ep}"
[[detect.alerts]]
kind = "sqs"
name = "lost"
target = "{alerts}"
endpoint_url = "{ep}"
max_attempts = 2
"#
        ),
    )
    .expect("config");
    config
}
