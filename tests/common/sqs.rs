//! A `trailhose run` worker against moto: queues with a DLQ, seeded delivery files, the
//! worker's config and process, its metrics.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use aws_sdk_sqs::types::QueueAttributeName;

use super::checks::{event_ids, fixture_dbs};
use super::{Moto, fixtures, http_get, s3_objects};

pub const DAY: &str = "AWSLogs/111122223333/CloudTrail/us-east-1/2024/03/18";

pub struct Queues {
    pub url: String,
    pub dlq_url: String,
}

pub async fn make_queues(sqs: &aws_sdk_sqs::Client, name: &str, max_receive: u32) -> Queues {
    let dlq_url = sqs
        .create_queue()
        .queue_name(format!("{name}-dlq"))
        .send()
        .await
        .expect("create dlq")
        .queue_url
        .expect("dlq url");
    let dlq_arn = sqs
        .get_queue_attributes()
        .queue_url(&dlq_url)
        .attribute_names(QueueAttributeName::QueueArn)
        .send()
        .await
        .expect("dlq attrs")
        .attributes
        .and_then(|a| a.get(&QueueAttributeName::QueueArn).cloned())
        .expect("dlq arn");
    let url = sqs
        .create_queue()
        .queue_name(name)
        .attributes(
            QueueAttributeName::RedrivePolicy,
            format!(r#"{{"deadLetterTargetArn":"{dlq_arn}","maxReceiveCount":"{max_receive}"}}"#),
        )
        .send()
        .await
        .expect("create queue")
        .queue_url
        .expect("queue url");
    Queues { url, dlq_url }
}

pub async fn depth(sqs: &aws_sdk_sqs::Client, url: &str) -> (u64, u64) {
    let attrs = sqs
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(QueueAttributeName::All)
        .send()
        .await
        .expect("attrs")
        .attributes
        .unwrap_or_default();
    let get = |k: QueueAttributeName| attrs.get(&k).and_then(|v| v.parse().ok()).unwrap_or(0);
    (
        get(QueueAttributeName::ApproximateNumberOfMessages),
        get(QueueAttributeName::ApproximateNumberOfMessagesNotVisible),
    )
}

pub async fn send(sqs: &aws_sdk_sqs::Client, url: &str, body: &str) {
    sqs.send_message()
        .queue_url(url)
        .message_body(body)
        .send()
        .await
        .expect("send");
}

pub fn sns(message: &str) -> String {
    serde_json::json!({
        "Type": "Notification",
        "MessageId": "5b2c3f0e-0000-4000-8000-000000000001",
        "TopicArn": "arn:aws:sns:us-east-1:111122223333:cloudtrail-topic",
        "Message": message,
        "Timestamp": "2024-03-18T14:20:00.000Z",
        "SignatureVersion": "1"
    })
    .to_string()
}

pub fn cloudtrail(bucket: &str, keys: &[&str]) -> String {
    serde_json::json!({"s3Bucket": bucket, "s3ObjectKey": keys}).to_string()
}

pub fn s3_event(bucket: &str, encoded_key: &str) -> String {
    serde_json::json!({"Records": [{
        "eventVersion": "2.1", "eventSource": "aws:s3", "awsRegion": "us-east-1",
        "eventTime": "2024-03-18T14:20:00.000Z", "eventName": "ObjectCreated:Put",
        "s3": {"s3SchemaVersion": "1.0", "bucket": {"name": bucket, "arn": format!("arn:aws:s3:::{bucket}")},
               "object": {"key": encoded_key, "size": 100}}
    }]})
    .to_string()
}

pub fn eventbridge(bucket: &str, key: &str) -> String {
    serde_json::json!({
        "version": "0", "id": "17793124-05d4-b198-2fde-7ededc63b103", "detail-type": "Object Created",
        "source": "aws.s3", "account": "111122223333", "time": "2024-03-18T14:20:00Z", "region": "us-east-1",
        "resources": [format!("arn:aws:s3:::{bucket}")],
        "detail": {"version": "0", "bucket": {"name": bucket}, "object": {"key": key, "size": 100}, "reason": "PutObject"}
    })
    .to_string()
}

/// What a test changes from the shipped defaults. `max_age_secs: None` keeps the default
/// (300 s); `batch` is added to `[batch]`, `sqs` to `[source.sqs]`, `output` to `[output]`;
/// `extra` is appended (whole sections).
#[derive(Default, Clone)]
pub struct Settings {
    pub max_age_secs: Option<u64>,
    pub batch: String,
    pub sqs: String,
    pub output: String,
    pub extra: String,
}

impl Settings {
    pub fn max_age(secs: u64) -> Settings {
        Settings {
            max_age_secs: Some(secs),
            ..Settings::default()
        }
    }
}

pub fn write_config(
    dir: &Path,
    moto: &Moto,
    queue_url: &str,
    port: u16,
    max_age_secs: u64,
) -> String {
    write_config_via(
        dir,
        &moto.endpoint,
        &moto.endpoint,
        queue_url,
        port,
        max_age_secs,
    )
}

/// `s3_ep` is where both the input and the output buckets are reached (moto, or a proxy).
pub fn write_config_via(
    dir: &Path,
    s3_ep: &str,
    sqs_ep: &str,
    queue_url: &str,
    port: u16,
    max_age_secs: u64,
) -> String {
    write_config_with(
        dir,
        (s3_ep, sqs_ep),
        queue_url,
        port,
        &Settings::max_age(max_age_secs),
    )
}

/// The worker's config: short long-polls and a short visibility timeout (so heartbeats and
/// redeliveries happen within a test), everything else at the shipped defaults but `settings`.
pub fn write_config_with(
    dir: &Path,
    (s3_ep, sqs_ep): (&str, &str),
    queue_url: &str,
    port: u16,
    settings: &Settings,
) -> String {
    let (city, asn) = fixture_dbs(dir);
    let path = dir.join("run.toml");
    let max_age = settings
        .max_age_secs
        .map(|s| format!("max_age_secs = {s}\n"))
        .unwrap_or_default();
    let (batch, sqs, output, extra) = (
        &settings.batch,
        &settings.sqs,
        &settings.output,
        &settings.extra,
    );
    std::fs::write(
        &path,
        format!(
            r#"[output]
url = "s3://trail-out/ct/"
{output}
[output.s3]
endpoint_url = "{s3_ep}"
force_path_style = true
[batch]
{max_age}{batch}[geoip]
city_db = "{city}"
asn_db = "{asn}"
[source.sqs]
queue_url = "{queue_url}"
endpoint_url = "{sqs_ep}"
wait_time_secs = 1
visibility_timeout_secs = 3
max_files_in_flight = 4
{sqs}
[[source.buckets]]
name = "trail-logs"
endpoint_url = "{s3_ep}"
force_path_style = true
[server]
listen = "127.0.0.1:{port}"
shutdown_grace_secs = 20
{extra}
"#
        ),
    )
    .expect("config");
    path.display().to_string()
}

/// A `trailhose run` child, killed on drop so a failing test leaves no worker behind.
pub struct Worker(pub Child);

impl std::ops::Deref for Worker {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Worker {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn start_worker(moto: &Moto, config: &str, log: &Path) -> Worker {
    start_worker_with(moto, config, log, &[])
}

/// `start_worker` with more environment (a test hook such as `TRAILHOSE_TEST_FAULT`).
pub fn start_worker_with(moto: &Moto, config: &str, log: &Path, env: &[(&str, &str)]) -> Worker {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_trailhose"));
    cmd.args(["run", "--config", config])
        .env("TRAILHOSE_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).expect("log file"));
    for (k, v) in moto.env() {
        cmd.env(k, v);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    Worker(cmd.spawn().expect("start trailhose run"))
}

/// Waits (generously) for the worker's `/healthz` to answer 200.
pub async fn wait_healthy(port: u16) {
    super::eventually(60, "/healthz", || async {
        http_get(port, "/healthz").is_some_and(|(s, _)| s == 200)
    })
    .await;
}

/// SIGTERM, then a clean exit within `secs`; the worker's log is shown when it fails.
pub fn stop(worker: &mut Worker, log: &Path, secs: u64) {
    signal(worker, "-TERM");
    assert!(
        wait_exit(worker, secs),
        "clean exit; log:\n{}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
}

/// The value of the first `/metrics` line starting with `name` (include the space or `{` that
/// ends the name); 0 when the worker does not answer or has no such line yet.
pub fn metric(port: u16, name: &str) -> f64 {
    let text = http_get(port, "/metrics")
        .map(|(_, m)| m)
        .unwrap_or_default();
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

/// A fresh moto with the work queue (and its DLQ), the input bucket and the output bucket.
pub async fn setup(queue: &str, max_receive: u32) -> (Moto, Queues) {
    let moto = Moto::start();
    let q = make_queues(&moto.sqs(), queue, max_receive).await;
    let s3 = moto.s3();
    for b in ["trail-logs", "trail-out"] {
        s3.create_bucket().bucket(b).send().await.expect("bucket");
    }
    (moto, q)
}

pub fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .expect("kill")
        .success();
    assert!(ok, "kill {sig}");
}

/// Waits for the child to exit within `secs`; returns whether it exited successfully.
pub fn wait_exit(child: &mut Child, secs: u64) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status.success();
        }
        assert!(
            Instant::now() < deadline,
            "worker did not exit within {secs}s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Uploads `n` generated delivery files to `trail-logs` and announces each on the queue with a
/// CloudTrail notification. Returns their eventIDs, sorted.
pub async fn seed_generated(
    moto: &Moto,
    queue_url: &str,
    n: u64,
    seed: u64,
    bytes: usize,
) -> Vec<String> {
    let (s3, sqs) = (moto.s3(), moto.sqs());
    let mut ids = Vec::new();
    for i in 0..n {
        let json = trailhose::synth::Generator::new(seed + i).delivery_file(bytes);
        let v: serde_json::Value = serde_json::from_slice(&json).expect("json");
        let records = v["Records"].as_array().expect("records");
        ids.extend(
            records
                .iter()
                .map(|r| r["eventID"].as_str().expect("id").to_owned()),
        );
        let key = format!("{DAY}/gen-{seed}-{i:03}.json.gz");
        s3.put_object()
            .bucket("trail-logs")
            .key(&key)
            .body(fixtures::gzip(&json).into())
            .send()
            .await
            .expect("put");
        send(&sqs, queue_url, &cloudtrail("trail-logs", &[&key])).await;
    }
    ids.sort();
    ids
}

/// Every eventID written under the output prefix, sorted (repeats kept).
pub async fn written_ids(s3: &aws_sdk_s3::Client) -> Vec<String> {
    let objects = s3_objects(s3, "trail-out", "ct/").await;
    event_ids(&objects)
}

/// Uploads `files` generated delivery files and announces them `per_message` keys to a
/// CloudTrail notification. Returns their eventIDs, sorted, and the number of messages.
pub async fn seed_grouped(
    moto: &Moto,
    queue_url: &str,
    files: u64,
    per_message: usize,
    seed: u64,
    bytes: usize,
) -> (Vec<String>, usize) {
    let (s3, sqs) = (moto.s3(), moto.sqs());
    let mut ids = Vec::new();
    let mut keys = Vec::new();
    for i in 0..files {
        let (key, file_ids) = upload_generated(&s3, seed, i, bytes).await;
        ids.extend(file_ids);
        keys.push(key);
    }
    let mut messages = 0;
    for group in keys.chunks(per_message.max(1)) {
        let refs: Vec<&str> = group.iter().map(String::as_str).collect();
        send(&sqs, queue_url, &cloudtrail("trail-logs", &refs)).await;
        messages += 1;
    }
    ids.sort();
    (ids, messages)
}

/// Uploads one generated delivery file to `trail-logs`; returns its key and eventIDs.
pub async fn upload_generated(
    s3: &aws_sdk_s3::Client,
    seed: u64,
    i: u64,
    bytes: usize,
) -> (String, Vec<String>) {
    let json = trailhose::synth::Generator::new(seed + i).delivery_file(bytes);
    let v: serde_json::Value = serde_json::from_slice(&json).expect("json");
    let ids = v["Records"]
        .as_array()
        .expect("records")
        .iter()
        .map(|r| r["eventID"].as_str().expect("id").to_owned())
        .collect();
    let key = format!("{DAY}/gen-{seed}-{i:03}.json.gz");
    s3.put_object()
        .bucket("trail-logs")
        .key(&key)
        .body(fixtures::gzip(&json).into())
        .send()
        .await
        .expect("put");
    (key, ids)
}

/// How often each eventID was written, and the ones of `expected` never written.
pub fn tally<'a>(
    got: &'a [String],
    expected: &'a [String],
) -> (BTreeMap<&'a str, usize>, Vec<&'a str>) {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for id in got {
        *counts.entry(id.as_str()).or_default() += 1;
    }
    let missing = expected
        .iter()
        .map(String::as_str)
        .filter(|id| !counts.contains_key(id))
        .collect();
    (counts, missing)
}
