//! End to end: `trailhose run` workers reading a Kinesis stream on a real moto_server (Kinesis,
//! DynamoDB lease table, S3 output), fed with CloudWatch Logs subscription batches; stopped with
//! SIGTERM or SIGKILL; a shard split mid-stream.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::types::AttributeValue;
use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::PutRecordsRequestEntry;
use common::checks::{event_ids, fixture_dbs, id_of, split_output};
use common::{Moto, TempDir, eventually, fixtures, free_port, http_get, s3_objects};

const STREAM: &str = "trail-stream";
const TABLE: &str = "trailhose-trail-stream";

fn kinesis(moto: &Moto) -> aws_sdk_kinesis::Client {
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

fn dynamodb(moto: &Moto) -> aws_sdk_dynamodb::Client {
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

/// moto's Kinesis differs from Kinesis after a split or merge: new records keep going to the
/// closed parent (the first shard whose hash range matches), and the parents' records are
/// re-put (renumbered) or moved instead of staying where they were. This prelude makes it behave as
/// Kinesis does: records go to open shards only, and a closed shard keeps its records.
const KINESIS_RESHARDING: &str = r#"
from moto.kinesis import models as m
def _route(self, partition_key, explicit_hash_key):
    key = int(explicit_hash_key) if explicit_hash_key else int(m.md5_hash(partition_key.encode("utf-8")).hexdigest(), 16)
    for shard in self.shards.values():
        if shard.is_open and shard.starting_hash <= key <= shard.ending_hash:
            return shard
    return None
m.Stream.get_shard_for_key = _route
_split = m.Stream.split_shard
def _split_keeping_records(self, shard_to_split, new_starting_hash_key):
    parent = self.shards[shard_to_split]
    kept = parent.records
    parent.records = m.OrderedDict()
    _split(self, shard_to_split, new_starting_hash_key)
    parent.records = kept
m.Stream.split_shard = _split_keeping_records
_merge = m.Stream.merge_shards
def _merge_keeping_records(self, shard_to_merge, adjacent_shard_to_merge):
    a, b = self.shards[shard_to_merge], self.shards[adjacent_shard_to_merge]
    kept = (a.records, b.records)
    a.records, b.records = m.OrderedDict(), m.OrderedDict()
    _merge(self, shard_to_merge, adjacent_shard_to_merge)
    a.records, b.records = kept
m.Stream.merge_shards = _merge_keeping_records
"#;

/// A fresh moto with the stream (`shards` shards), the input and the output bucket.
async fn setup(shards: i32) -> Moto {
    setup_on(Moto::start(), shards).await
}

async fn setup_on(moto: Moto, shards: i32) -> Moto {
    kinesis(&moto)
        .create_stream()
        .stream_name(STREAM)
        .shard_count(shards)
        .send()
        .await
        .expect("create stream");
    let s3 = moto.s3();
    for b in ["trail-logs", "trail-out"] {
        s3.create_bucket().bucket(b).send().await.expect("bucket");
    }
    moto
}

/// A CloudWatch Logs subscription record: gzip'd DATA_MESSAGE with one event per message.
fn cwl_batch(events: &[String]) -> Vec<u8> {
    let log_events: Vec<serde_json::Value> = events
        .iter()
        .enumerate()
        .map(|(i, e)| serde_json::json!({"id": i.to_string(), "timestamp": 1710772207000u64, "message": e}))
        .collect();
    let batch = serde_json::json!({
        "messageType": "DATA_MESSAGE", "owner": "111122223333",
        "logGroup": "aws-cloudtrail-logs", "logStream": "111122223333_CloudTrail_us-east-1",
        "subscriptionFilters": ["to-kinesis"], "logEvents": log_events
    });
    fixtures::gzip(batch.to_string().as_bytes())
}

fn control_message() -> Vec<u8> {
    fixtures::gzip(br#"{"messageType":"CONTROL_MESSAGE","owner":"CloudwatchLogs","logGroup":"","logStream":"","subscriptionFilters":[],"logEvents":[{"id":"","timestamp":1710772207000,"message":"CWL CONTROL MESSAGE: Checking health of destination Kinesis stream."}]}"#)
}

/// `n` generated events (JSON text), and their ids.
fn events(seed: u64, n: usize) -> (Vec<String>, Vec<String>) {
    let mut g = trailhose::synth::Generator::new(seed);
    let mut out = Vec::new();
    let mut ids = Vec::new();
    for _ in 0..n {
        let mut s = String::new();
        g.event(&mut s);
        let v: serde_json::Value = serde_json::from_str(&s).expect("event json");
        ids.push(v["eventID"].as_str().expect("eventID").to_owned());
        out.push(s);
    }
    (out, ids)
}

/// Puts `batches` CloudWatch Logs batches of `per` events on the stream, spread over shards by
/// partition key. Returns the eventIDs.
async fn feed(moto: &Moto, seed: u64, batches: usize, per: usize) -> Vec<String> {
    let k = kinesis(moto);
    let mut ids = Vec::new();
    let mut entries = Vec::new();
    for b in 0..batches {
        let (evs, mut batch_ids) = events(seed * 1000 + b as u64, per);
        ids.append(&mut batch_ids);
        entries.push(
            PutRecordsRequestEntry::builder()
                .data(Blob::new(cwl_batch(&evs)))
                .partition_key(format!("pk-{seed}-{b}"))
                .build()
                .expect("entry"),
        );
    }
    put(&k, entries).await;
    ids
}

async fn put(k: &aws_sdk_kinesis::Client, entries: Vec<PutRecordsRequestEntry>) {
    for chunk in entries.chunks(100) {
        let out = k
            .put_records()
            .stream_name(STREAM)
            .set_records(Some(chunk.to_vec()))
            .send()
            .await
            .expect("put records");
        assert_eq!(out.failed_record_count(), Some(0));
    }
}

async fn put_one(moto: &Moto, data: Vec<u8>, key: &str) {
    put(
        &kinesis(moto),
        vec![
            PutRecordsRequestEntry::builder()
                .data(Blob::new(data))
                .partition_key(key)
                .build()
                .expect("entry"),
        ],
    )
    .await;
}

/// How a test worker is set up.
struct Settings<'a> {
    max_age_secs: u64,
    /// Where Kinesis and DynamoDB are reached (moto, or a proxy).
    kinesis_ep: &'a str,
    /// Where S3 (input and output) is reached.
    s3_ep: &'a str,
    /// More `[source.kinesis]` lines.
    extra: &'a str,
}

fn write_config(dir: &Path, port: u16, worker: &str, s: &Settings) -> String {
    let (city, asn) = fixture_dbs(dir);
    let Settings {
        max_age_secs,
        kinesis_ep,
        s3_ep: ep,
        extra,
    } = *s;
    // A test may set its own lease duration in `extra`.
    let lease = match extra.contains("lease_duration_millis") {
        true => "",
        false => "lease_duration_millis = 2000\n",
    };
    let path = dir.join("run.toml");
    std::fs::write(
        &path,
        format!(
            r#"[output]
url = "s3://trail-out/ct/"
[output.s3]
endpoint_url = "{ep}"
force_path_style = true
[batch]
max_age_secs = {max_age_secs}
[geoip]
city_db = "{city}"
asn_db = "{asn}"
[source.kinesis]
stream = "{STREAM}"
endpoint_url = "{kinesis_ep}"
worker_id = "{worker}"
{lease}lease_renew_interval_millis = 400
shard_sync_interval_millis = 1000
poll_interval_millis = 200
max_records_per_call = 50
{extra}
[[source.buckets]]
name = "trail-logs"
endpoint_url = "{ep}"
force_path_style = true
[server]
listen = "127.0.0.1:{port}"
shutdown_grace_secs = 20
"#
        ),
    )
    .expect("config");
    path.display().to_string()
}

/// A `trailhose run` child, killed on drop so a failing test leaves no worker behind.
struct Worker {
    child: Child,
    port: u16,
    log: std::path::PathBuf,
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Worker {
    fn start(moto: &Moto, dir: &Path, name: &str) -> Worker {
        Worker::start_with(moto, dir, name, 1)
    }

    /// A worker whose buffers flush after `max_age_secs`.
    fn start_with(moto: &Moto, dir: &Path, name: &str, max_age_secs: u64) -> Worker {
        Worker::start_via(moto, dir, name, max_age_secs, &moto.endpoint)
    }

    /// A worker with more `[source.kinesis]` lines.
    fn start_configured(moto: &Moto, dir: &Path, name: &str, extra: &str) -> Worker {
        Worker::spawn(
            moto,
            dir,
            name,
            &Settings {
                max_age_secs: 1,
                kinesis_ep: &moto.endpoint,
                s3_ep: &moto.endpoint,
                extra,
            },
        )
    }

    /// A worker reaching Kinesis and DynamoDB at `kinesis_ep` (moto, or a proxy).
    fn start_via(
        moto: &Moto,
        dir: &Path,
        name: &str,
        max_age_secs: u64,
        kinesis_ep: &str,
    ) -> Worker {
        Worker::spawn(
            moto,
            dir,
            name,
            &Settings {
                max_age_secs,
                kinesis_ep,
                s3_ep: &moto.endpoint,
                extra: "",
            },
        )
    }

    fn spawn(moto: &Moto, dir: &Path, name: &str, settings: &Settings) -> Worker {
        Worker::spawn_env(moto, dir, name, settings, &[])
    }

    /// A worker with more environment variables (test hooks).
    fn spawn_env(
        moto: &Moto,
        dir: &Path,
        name: &str,
        settings: &Settings,
        env: &[(&str, &str)],
    ) -> Worker {
        let dir = dir.join(name);
        std::fs::create_dir_all(&dir).expect("worker dir");
        let port = free_port();
        let config = write_config(&dir, port, name, settings);
        let log = dir.join(format!("log-{}", free_port()));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_trailhose"));
        cmd.args(["run", "--config", &config])
            .env("TRAILHOSE_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"));
        for (k, v) in moto.env() {
            cmd.env(k, v);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        Worker {
            child: cmd.spawn().expect("start trailhose run"),
            port,
            log,
        }
    }

    fn metric(&self, name: &str) -> f64 {
        metric_sum(self.port, name)
    }

    /// The worker's log, without terminal colours.
    fn log(&self) -> String {
        let raw = std::fs::read_to_string(&self.log).unwrap_or_default();
        let mut out = String::with_capacity(raw.len());
        let mut chars = raw.chars();
        while let Some(c) = chars.next() {
            if c == '\u{1b}' {
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            } else {
                out.push(c);
            }
        }
        out
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill {sig}");
    }

    /// SIGTERM, then waits for a clean exit.
    fn stop(&mut self) {
        self.signal("-TERM");
        let deadline = Instant::now() + Duration::from_secs(25);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                assert!(status.success(), "clean exit; log:\n{}", self.log());
                return;
            }
            assert!(
                Instant::now() < deadline,
                "no exit after SIGTERM; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The sum of every `/metrics` line starting with `name`; 0 when there is none.
fn metric_sum(port: u16, name: &str) -> f64 {
    let text = http_get(port, "/metrics")
        .map(|(_, m)| m)
        .unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Every eventID written under the output prefix, sorted (repeats kept).
async fn written_ids(s3: &aws_sdk_s3::Client) -> Vec<String> {
    event_ids(&s3_objects(s3, "trail-out", "ct/").await)
}

async fn error_records(s3: &aws_sdk_s3::Client) -> Vec<serde_json::Value> {
    split_output(&s3_objects(s3, "trail-out", "ct/").await).errors
}

/// Waits until every expected id is written; returns (written ids, duplicates).
async fn all_written(
    s3: &aws_sdk_s3::Client,
    expected: &[String],
    secs: u64,
) -> (Vec<String>, usize) {
    let want: std::collections::BTreeSet<&String> = expected.iter().collect();
    eventually(secs, "every event to be written", || async {
        let got = written_ids(s3).await;
        let have: std::collections::BTreeSet<&String> = got.iter().collect();
        want.is_subset(&have)
    })
    .await;
    let got = written_ids(s3).await;
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for id in &got {
        *counts.entry(id.as_str()).or_default() += 1;
    }
    assert!(
        counts.keys().all(|id| want.contains(&id.to_string())),
        "no unexpected events"
    );
    let dups = got.len() - counts.len();
    (got, dups)
}

#[derive(Debug)]
struct LeaseRow {
    key: String,
    owner: Option<String>,
    checkpoint: String,
    parents: String,
}

async fn leases(moto: &Moto) -> Vec<LeaseRow> {
    let items = dynamodb(moto)
        .scan()
        .table_name(TABLE)
        .send()
        .await
        .expect("scan leases")
        .items
        .unwrap_or_default();
    let get = |i: &std::collections::HashMap<String, AttributeValue>, k: &str| {
        i.get(k).and_then(|v| v.as_s().ok()).cloned()
    };
    let mut rows: Vec<LeaseRow> = items
        .iter()
        .map(|i| LeaseRow {
            key: get(i, "leaseKey").expect("leaseKey"),
            owner: get(i, "leaseOwner"),
            checkpoint: get(i, "checkpoint").unwrap_or_default(),
            parents: get(i, "parentShardIds").unwrap_or_default(),
        })
        .collect();
    rows.sort_by(|a, b| a.key.cmp(&b.key));
    rows
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shards_fed_with_cloudwatch_batches_land_exactly_once_and_resume_from_checkpoints() {
    let moto = setup(4).await;
    let s3 = moto.s3();
    let tmp = TempDir::new("kinesis-once");
    let mut expected = feed(&moto, 1, 40, 25).await;
    // The other shapes: a control message (skipped), one plain event, a file notification, and
    // a record that is none of these (error output, named by shard and sequence number).
    put_one(&moto, control_message(), "control").await;
    let (plain, plain_ids) = events(777, 1);
    put_one(&moto, plain[0].clone().into_bytes(), "plain").await;
    expected.extend(plain_ids);
    let key = "AWSLogs/111122223333/CloudTrail/us-east-1/2024/03/18/gen-kinesis.json.gz";
    let file = trailhose::synth::Generator::new(4242).delivery_file(20_000);
    let v: serde_json::Value = serde_json::from_slice(&file).expect("json");
    expected.extend(
        v["Records"]
            .as_array()
            .expect("records")
            .iter()
            .map(|r| r["eventID"].as_str().expect("id").to_owned()),
    );
    s3.put_object()
        .bucket("trail-logs")
        .key(key)
        .body(fixtures::gzip(&file).into())
        .send()
        .await
        .expect("put file");
    put_one(
        &moto,
        serde_json::json!({"s3Bucket": "trail-logs", "s3ObjectKey": [key]})
            .to_string()
            .into_bytes(),
        "notification",
    )
    .await;
    put_one(&moto, b"certainly not cloudtrail".to_vec(), "garbage").await;
    // A notification naming a file that does not exist must not stall its shard.
    put_one(
        &moto,
        serde_json::json!({"s3Bucket": "trail-logs", "s3ObjectKey": ["AWSLogs/111122223333/CloudTrail/us-east-1/2024/03/18/gone.json.gz"]})
            .to_string()
            .into_bytes(),
        "gone",
    )
    .await;
    expected.sort();

    let mut w = Worker::start(&moto, tmp.path(), "solo");
    eventually(30, "/healthz", || async {
        http_get(w.port, "/healthz").is_some_and(|(s, _)| s == 200)
    })
    .await;
    let (_, dups) = all_written(&s3, &expected, 60).await;
    assert_eq!(dups, 0, "exactly once");
    assert_eq!(w.metric("trailhose_kinesis_leases_held "), 4.0);
    let (status, ready) = http_get(w.port, "/readyz").expect("readyz");
    assert_eq!(status, 200, "{ready}");
    let (_, m) = http_get(w.port, "/metrics").expect("metrics");
    for needle in [
        "trailhose_kinesis_millis_behind_latest{shard=\"shardId-000000000000\",stream=\"trail-stream\"}",
        "trailhose_kinesis_checkpoint_age_seconds{shard=",
        "trailhose_kinesis_lease_takeovers_total{how=\"free\"} 4",
        "trailhose_kinesis_records_total{shape=\"cwl_control\"} 1",
        "trailhose_kinesis_records_total{shape=\"cwl_data\"} 40",
        "trailhose_kinesis_records_total{shape=\"event\"} 1",
        "trailhose_kinesis_records_total{shape=\"notification\"} 2",
        "trailhose_kinesis_records_total{shape=\"unrecognized\"} 1",
    ] {
        assert!(m.contains(needle), "/metrics lacks {needle}:\n{m}");
    }
    w.stop();

    // The garbage record reached the error output, named by stream, shard and sequence number.
    let errors = error_records(&s3).await;
    let garbage = errors
        .iter()
        .find(|e| e["record"] == "certainly not cloudtrail")
        .unwrap_or_else(|| panic!("garbage in the error output: {errors:?}"));
    let src = garbage["source"].as_str().expect("source");
    assert!(src.starts_with("kinesis://trail-stream/shardId-"), "{src}");
    let gone = errors
        .iter()
        .find(|e| {
            e["record"]
                .as_str()
                .is_some_and(|r| r.starts_with("fetch_failed:") && r.contains("gone.json.gz"))
        })
        .unwrap_or_else(|| panic!("the unreadable file in the error output: {errors:?}"));
    assert!(
        gone["source"]
            .as_str()
            .is_some_and(|s| s.starts_with("kinesis://"))
    );
    // Every lease is checkpointed and released.
    for l in leases(&moto).await {
        assert!(l.owner.is_none(), "{} released", l.key);
        assert!(!l.checkpoint.is_empty(), "{} checkpointed", l.key);
    }

    // More records while no worker runs; a restarted worker resumes at the checkpoints.
    let more = feed(&moto, 2, 12, 10).await;
    expected.extend(more);
    expected.sort();
    let mut w2 = Worker::start(&moto, tmp.path(), "solo-again");
    let (_, dups) = all_written(&s3, &expected, 60).await;
    assert_eq!(dups, 0, "nothing read twice after a clean restart");
    w2.stop();
}

/// Under load (a busy machine) a lease can expire and move without anyone being killed: the
/// assertions below are on conditions, and on repeats only where no lease was lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workers_spread_leases_and_a_killed_workers_shards_are_taken_over() {
    let moto = setup(6).await;
    let s3 = moto.s3();
    let tmp = TempDir::new("kinesis-kill");
    let mut expected = feed(&moto, 10, 30, 20).await;
    let workers: Vec<Worker> = ["a", "b", "c"]
        .iter()
        .map(|n| Worker::start(&moto, tmp.path(), n))
        .collect();
    eventually(120, "two leases per worker", || async {
        workers
            .iter()
            .all(|w| w.metric("trailhose_kinesis_leases_held ") == 2.0)
    })
    .await;
    let mut workers = workers;
    // Rebalancing repeats what a stolen shard's first owner had read past its checkpoint.
    expected.sort();
    let (_, dups_rebalance) = all_written(&s3, &expected, 120).await;
    let sum = |workers: &[Worker], name: &str| workers.iter().map(|w| w.metric(name)).sum::<f64>();
    let handed_over = sum(
        &workers,
        "trailhose_kinesis_lease_handoffs_total{stage=\"handed_over\"}",
    );
    let timed_out = sum(
        &workers,
        "trailhose_kinesis_lease_handoffs_total{stage=\"timed_out\"}",
    );
    let lost_before = sum(&workers, "trailhose_errors_total{reason=\"lease_lost\"");
    if timed_out == 0.0 && lost_before == 0.0 {
        assert_eq!(
            dups_rebalance, 0,
            "handoffs drain before the lease moves: rebalancing repeats nothing"
        );
    }

    // Kill one without warning while records are in flight: once it has read some of them.
    let victim_read = workers[0].metric("trailhose_kinesis_records_total{shape=\"cwl_data\"}");
    let in_flight = feed(&moto, 11, 30, 20).await;
    let fed_before_kill = in_flight.len();
    expected.extend(in_flight);
    eventually(60, "the victim to read some of the new records", || async {
        workers[0].metric("trailhose_kinesis_records_total{shape=\"cwl_data\"}") > victim_read
    })
    .await;
    let mut victim = workers.remove(0);
    victim.signal("-KILL");
    let _ = victim.child.wait();
    let killed_at = Instant::now();
    let victims: Vec<String> = leases(&moto)
        .await
        .into_iter()
        .filter(|l| l.owner.as_deref() == Some("a"))
        .map(|l| l.key)
        .collect();
    expected.extend(feed(&moto, 12, 30, 20).await);
    eventually(120, "the survivors to hold every lease", || async {
        let rows = leases(&moto).await;
        rows.len() == 6
            && rows
                .iter()
                .all(|l| matches!(l.owner.as_deref(), Some("b" | "c")))
            && sum(&workers, "trailhose_kinesis_leases_held ") == 6.0
    })
    .await;
    let takeover = killed_at.elapsed();
    expected.sort();
    let (got, dups) = all_written(&s3, &expected, 120).await;
    let expired = sum(
        &workers,
        "trailhose_kinesis_lease_takeovers_total{how=\"expired\"}",
    );
    assert!(
        expired >= victims.len() as f64,
        "the killed worker's leases ({victims:?}) were taken after expiry ({expired})"
    );
    let lost = sum(&workers, "trailhose_errors_total{reason=\"lease_lost\"");
    for w in &mut workers {
        w.stop();
    }
    let dups_kill = dups - dups_rebalance;
    eprintln!(
        "SIGKILL test: {} events expected, {} written; {handed_over} leases handed over at start-up ({timed_out} timed out); duplicates: {dups_rebalance} from start-up rebalancing, {dups_kill} from the kill (of {fed_before_kill} fed just before it); takeover {:.1}s after the kill (lease 2 s); survivors lost {lost} leases",
        expected.len(),
        got.len(),
        takeover.as_secs_f64()
    );
    if lost == 0.0 {
        assert!(
            dups_kill <= fed_before_kill,
            "only records the killed worker read past its checkpoints are repeated: {dups_kill}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_shard_is_drained_before_its_children_start_and_nothing_is_lost() {
    let moto = setup_on(Moto::start_patched(KINESIS_RESHARDING), 1).await;
    let s3 = moto.s3();
    let tmp = TempDir::new("kinesis-split");
    let mut expected = feed(&moto, 20, 10, 20).await;
    let mut w = Worker::start(&moto, tmp.path(), "solo");
    // Split while the parent is being read.
    eventually(30, "reading to start", || async {
        w.metric("trailhose_kinesis_records_total") > 0.0
    })
    .await;

    let k = kinesis(&moto);
    k.split_shard()
        .stream_name(STREAM)
        .shard_to_split("shardId-000000000000")
        .new_starting_hash_key((u128::MAX / 2).to_string())
        .send()
        .await
        .expect("split");
    expected.extend(feed(&moto, 21, 10, 20).await);
    expected.sort();
    let (got, dups) = all_written(&s3, &expected, 60).await;
    eventually(20, "both children to be checkpointed", || async {
        leases(&moto)
            .await
            .iter()
            .filter(|l| l.parents == "shardId-000000000000" && !l.checkpoint.is_empty())
            .count()
            == 2
    })
    .await;
    w.stop();

    let rows = leases(&moto).await;
    let parent = rows
        .iter()
        .find(|l| l.key == "shardId-000000000000")
        .expect("parent lease");
    assert_eq!(parent.checkpoint, "SHARD_END");
    let log = w.log();
    let ended = log
        .find("shard read to its end")
        .unwrap_or_else(|| panic!("parent ended; log:\n{log}"));
    for child in ["shardId-000000000001", "shardId-000000000002"] {
        let taken = log
            .find(&format!("lease taken shard=\"{child}\""))
            .unwrap_or_else(|| panic!("{child} taken; log:\n{log}"));
        assert!(taken > ended, "{child} started only after its parent ended");
    }
    assert_eq!(
        dups,
        0,
        "exactly once across the split ({} events)",
        got.len()
    );
}

/// `trailhose process --config CONFIG --out OUT [EXTRA...] INPUT` against moto; it must
/// succeed.
fn process_ok(moto: &Moto, config: &Path, out: &Path, extra: &[&str], input: &Path) {
    let (config, out, input) = (
        config.display().to_string(),
        out.display().to_string(),
        input.display().to_string(),
    );
    let mut args = vec!["process", "--config", &config, "--out", &out];
    args.extend_from_slice(extra);
    args.push(&input);
    let run = common::trailhose(&args, &moto.env());
    assert!(
        run.status.success(),
        "process: {}",
        String::from_utf8_lossy(&run.stderr)
    );
}

/// Every record on the stream, from every shard, oldest first: (partition key, data).
async fn stream_records(moto: &Moto, stream: &str) -> Vec<(String, Vec<u8>)> {
    let k = kinesis(moto);
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

/// The eventIDs of stream records, each checked to be its record's partition key (the output's
/// default `partition_key = "eventID"`), and how many records had no eventID: each of those
/// must have a random key (a UUID).
fn ids_keyed_by_event_id(records: &[(String, Vec<u8>)]) -> (Vec<String>, usize) {
    let (mut ids, mut no_id, mut wrong) = (Vec::new(), 0, Vec::new());
    for (key, data) in records {
        let v: serde_json::Value = serde_json::from_slice(data).expect("a record is one event");
        match v.get("eventID").and_then(|id| id.as_str()) {
            Some(id) => {
                if key != id {
                    wrong.push(format!("{key} for {id}"));
                }
                ids.push(id.to_owned());
            }
            None => {
                assert!(
                    key.len() == 36 && uuid::Uuid::parse_str(key).is_ok(),
                    "a random key for an event without eventID: {key:?}"
                );
                no_id += 1;
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {} records are not keyed by their eventID, e.g. {:?}",
        wrong.len(),
        records.len(),
        wrong.first()
    );
    (ids, no_id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sink_puts_every_event_on_the_stream_and_retries_only_failed_entries() {
    let moto = setup(2).await;
    let proxy = common::faults::PartialPutProxy::start(moto.port, 2);
    let tmp = TempDir::new("kinesis-sink");
    let day = tmp
        .path()
        .join("in/AWSLogs/111122223333/CloudTrail/us-east-1/2024/03/18");
    std::fs::create_dir_all(&day).expect("input dir");
    let mut expected = Vec::new();
    for i in 0..3u64 {
        let file = trailhose::synth::Generator::new(300 + i).delivery_file(400_000);
        let v: serde_json::Value = serde_json::from_slice(&file).expect("json");
        expected.extend(
            v["Records"]
                .as_array()
                .expect("records")
                .iter()
                .map(|r| r["eventID"].as_str().expect("id").to_owned()),
        );
        std::fs::write(day.join(format!("gen-{i}.json.gz")), fixtures::gzip(&file)).expect("file");
    }
    // One event over Kinesis's 1 MiB record limit: objects only, plus an error record.
    let (mut huge, huge_ids) = events(999, 1);
    let mut v: serde_json::Value = serde_json::from_str(&huge[0]).expect("event");
    v["requestParameters"] = serde_json::json!({"policy": "x".repeat(1_100_000)});
    huge[0] = v.to_string();
    std::fs::write(
        day.join("huge.json"),
        format!("{{\"Records\":[{}]}}", huge[0]),
    )
    .expect("huge file");
    // One event without an eventID: a random key of its own.
    std::fs::write(
        day.join("no-id.json"),
        r#"{"Records":[{"eventVersion":"1.09","eventTime":"2024-03-18T14:00:00Z","eventSource":"s3.amazonaws.com","eventName":"NoIdMarker","awsRegion":"us-east-1"}]}"#,
    )
    .expect("no-id file");
    expected.sort();

    let (city, asn) = fixture_dbs(tmp.path());
    let config = tmp.path().join("sink.toml");
    std::fs::write(
        &config,
        format!(
            r#"[geoip]
city_db = "{city}"
asn_db = "{asn}"
[batch]
chunk_bytes = 65536
[output.kinesis]
stream = "{STREAM}"
endpoint_url = "{}"
max_attempts = 6
"#,
            proxy.endpoint()
        ),
    )
    .expect("config");
    let out = tmp.path().join("out");
    let metrics = tmp.path().join("metrics.txt");
    process_ok(
        &moto,
        &config,
        &out,
        &["--metrics-file", &metrics.display().to_string()],
        &tmp.path().join("in"),
    );

    // Chunks of 64 KiB: many lines cross from one chunk into the next, and each record's key
    // is still its own line's eventID.
    let (mut on_stream, no_id) = ids_keyed_by_event_id(&stream_records(&moto, STREAM).await);
    assert_eq!(no_id, 1, "the event without an eventID, under a random key");
    on_stream.sort();
    let missing = expected
        .iter()
        .filter(|id| on_stream.binary_search(id).is_err())
        .count();
    let mut distinct = on_stream.clone();
    distinct.dedup();
    assert!(
        missing == 0 && distinct.len() == on_stream.len() && on_stream.len() == expected.len(),
        "every event on the stream exactly once: {} expected, {} on the stream ({} distinct), {missing} missing",
        expected.len(),
        on_stream.len(),
        distinct.len()
    );
    let failed = proxy
        .failed_entries
        .load(std::sync::atomic::Ordering::SeqCst);
    assert!(failed > 0, "the proxy failed some entries");
    let m = std::fs::read_to_string(&metrics).expect("metrics");
    let retried = m
        .lines()
        .find(|l| l.starts_with("trailhose_kinesis_sink_records_total{outcome=\"retried\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .unwrap_or(0);
    assert_eq!(retried, failed, "exactly the failed entries were retried");
    assert!(
        m.contains("trailhose_kinesis_sink_records_total{outcome=\"oversize\"} 1"),
        "{m}"
    );

    // The objects hold every event, the huge one too; the error output names it.
    let objects = common::local_objects(&out);
    let split = split_output(&objects);
    let mut in_objects: Vec<String> = split
        .events
        .iter()
        .filter(|(_, l)| !l.contains("NoIdMarker"))
        .map(|(_, l)| id_of(l))
        .collect();
    in_objects.sort();
    assert_eq!(
        split.events.len(),
        in_objects.len() + 1,
        "the no-id event too"
    );
    let mut all = expected.clone();
    all.extend(huge_ids.iter().cloned());
    all.sort();
    assert_eq!(in_objects, all);
    let oversize = split
        .errors
        .iter()
        .find(|e| e["reason"] == "too_large_for_kinesis")
        .expect("oversize error record");
    assert_eq!(oversize["record"]["eventID"], huge_ids[0].as_str());
    eprintln!(
        "sink test: {} events on the stream, {failed} entries failed by the proxy and retried",
        on_stream.len()
    );

    // Instead of objects: events only on the stream, errors still under the output.
    kinesis(&moto)
        .create_stream()
        .stream_name("only-stream")
        .shard_count(1)
        .send()
        .await
        .expect("second stream");
    let config2 = tmp.path().join("only.toml");
    std::fs::write(
        &config2,
        format!(
            "[output.kinesis]\nstream = \"only-stream\"\nendpoint_url = \"{}\"\nwrite_objects = false\n",
            // Through the proxy too: it also serialises puts, which moto needs.
            proxy.endpoint()
        ),
    )
    .expect("config");
    let out2 = tmp.path().join("out2");
    process_ok(&moto, &config2, &out2, &[], &tmp.path().join("in"));
    let (mut only, no_id) = ids_keyed_by_event_id(&stream_records(&moto, "only-stream").await);
    assert_eq!(no_id, 1);
    only.sort();
    assert!(only == expected, "every event on the second stream");
    let split2 = split_output(&common::local_objects(&out2));
    assert!(split2.events.is_empty(), "no event objects");
    assert_eq!(split2.errors.len(), 1, "the oversize event's error record");
}

/// A transform module that rewrites the key names (`lowercase-keys`: `eventID` becomes
/// `eventid`) leaves the output line without the key field: each record then gets a random key,
/// never the eventID the event had before the module ran (commit 52b0780).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_module_that_renames_the_key_field_leaves_no_record_keyed_by_the_old_event_id() {
    let moto = setup(1).await;
    let tmp = TempDir::new("kinesis-sink-lowercase");
    let day = tmp
        .path()
        .join("in/AWSLogs/111122223333/CloudTrail/us-east-1/2024/03/18");
    std::fs::create_dir_all(&day).expect("input dir");
    let (evs, mut ids) = events(1850, 20);
    std::fs::write(
        day.join("f.json.gz"),
        fixtures::gzip(format!("{{\"Records\":[{}]}}", evs.join(",")).as_bytes()),
    )
    .expect("file");
    let module = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target/transforms/wasm32-wasip2/release/lowercase_keys.wasm");
    assert!(
        module.is_file(),
        "{} is missing: run scripts/build-transforms.sh (scripts/test.sh does)",
        module.display()
    );
    let config = tmp.path().join("lower.toml");
    std::fs::write(
        &config,
        format!(
            r#"[pipeline]
transform_cache_dir = {cache:?}
[output.kinesis]
stream = "{STREAM}"
endpoint_url = "{ep}"
[[transforms]]
name = "lower"
path = {module:?}
"#,
            cache = tmp.path().join("wasm-cache").display().to_string(),
            ep = moto.endpoint,
            module = module.display().to_string(),
        ),
    )
    .expect("config");
    let out = tmp.path().join("out");
    process_ok(&moto, &config, &out, &[], &tmp.path().join("in"));
    let records = stream_records(&moto, STREAM).await;
    assert_eq!(records.len(), ids.len(), "every event on the stream");
    let mut rewritten = Vec::new();
    for (key, data) in &records {
        let v: serde_json::Value = serde_json::from_slice(data).expect("one event");
        assert!(v.get("eventID").is_none(), "the module renamed it: {v}");
        let id = v["eventid"].as_str().expect("eventid").to_owned();
        assert!(
            !ids.contains(key),
            "a record keyed by an eventID its line no longer holds: {key}"
        );
        assert!(uuid::Uuid::parse_str(key).is_ok(), "a random key: {key:?}");
        rewritten.push(id);
    }
    rewritten.sort();
    ids.sort();
    assert_eq!(rewritten, ids);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_wait_for_durable_writes_and_an_output_outage_loses_nothing() {
    let moto = setup(2).await;
    let s3 = moto.s3();
    let tmp = TempDir::new("kinesis-outage");
    let w = Worker::start(&moto, tmp.path(), "solo");
    eventually(30, "/healthz", || async {
        http_get(w.port, "/healthz").is_some_and(|(s, _)| s == 200)
    })
    .await;
    // The output disappears: every put fails, so no batch settles and nothing is checkpointed.
    s3.delete_bucket()
        .bucket("trail-out")
        .send()
        .await
        .expect("delete output bucket");
    let mut expected = feed(&moto, 30, 20, 10).await;
    eventually(40, "a failed put and a rewind", || async {
        w.metric("trailhose_errors_total{reason=\"put_failed\"") >= 1.0
            && w.metric("trailhose_errors_total{reason=\"rewound\"") >= 1.0
    })
    .await;
    for l in leases(&moto).await {
        assert_eq!(
            l.checkpoint, "",
            "{}: no checkpoint while nothing is written",
            l.key
        );
    }
    // The output comes back: the rewound shards are read again and everything arrives.
    s3.create_bucket()
        .bucket("trail-out")
        .send()
        .await
        .expect("recreate output bucket");
    expected.sort();
    let (got, dups) = all_written(&s3, &expected, 90).await;
    eventually(20, "checkpoints to advance", || async {
        leases(&moto).await.iter().all(|l| !l.checkpoint.is_empty())
    })
    .await;
    let mut w = w;
    w.stop();
    eprintln!(
        "outage test: {} events expected, {} written, {dups} duplicates",
        expected.len(),
        got.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_flushes_open_buffers_then_checkpoints_and_releases_leases() {
    let moto = setup(3).await;
    let s3 = moto.s3();
    let tmp = TempDir::new("kinesis-term");
    let mut expected = feed(&moto, 40, 15, 10).await;
    expected.sort();
    // Buffers would wait five minutes to flush by age: only the shutdown can flush them.
    let mut w = Worker::start_with(&moto, tmp.path(), "solo", 300);
    eventually(30, "every record to be read", || async {
        w.metric("trailhose_kinesis_records_total{shape=\"cwl_data\"}") == 15.0
    })
    .await;
    assert!(
        s3_objects(&s3, "trail-out", "ct/").await.is_empty(),
        "nothing written before the shutdown"
    );
    for l in leases(&moto).await {
        assert_eq!(
            l.checkpoint, "",
            "{}: nothing checkpointed before the shutdown",
            l.key
        );
    }
    let started = Instant::now();
    w.stop();
    assert!(started.elapsed() < Duration::from_secs(20));
    let (_, dups) = all_written(&s3, &expected, 5).await;
    assert_eq!(dups, 0);
    for l in leases(&moto).await {
        assert!(l.owner.is_none(), "{} released", l.key);
        assert!(
            !l.checkpoint.is_empty(),
            "{} checkpointed on the way out",
            l.key
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_and_expired_iterators_cost_retries_not_records() {
    let moto = setup(2).await;
    let s3 = moto.s3();
    let tmp = TempDir::new("kinesis-throttle");
    let proxy = common::faults::GetRecordsFaultProxy::start(moto.port, 3, 5);
    let mut expected = feed(&moto, 50, 30, 10).await;
    let mut w = Worker::start_via(&moto, tmp.path(), "solo", 1, &proxy.endpoint());
    // More records while the worker reads, so iterators expire mid-stream.
    for round in 0..3 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        expected.extend(feed(&moto, 51 + round, 10, 10).await);
    }
    expected.sort();
    let (got, dups) = all_written(&s3, &expected, 90).await;
    w.stop();
    let throttled = proxy.throttled.load(std::sync::atomic::Ordering::SeqCst);
    let expired = proxy.expired.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        throttled >= 2 && expired >= 1,
        "faults injected: {throttled} throttled, {expired} expired"
    );
    assert_eq!(
        dups, 0,
        "an expired iterator is renewed after the last record read"
    );
    eprintln!(
        "throttle test: {} events, {throttled} throttled and {expired} expired GetRecords calls, {dups} duplicates",
        got.len()
    );
}

/// Every id in `ids`, whether it was written: (written, not written).
async fn partition_written(s3: &aws_sdk_s3::Client, ids: &[String]) -> (usize, usize) {
    let got = written_ids(s3).await;
    let n = ids
        .iter()
        .filter(|id| got.binary_search(id).is_ok())
        .count();
    (n, ids.len() - n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_shards_start_at_latest_or_at_a_timestamp_when_configured() {
    // LATEST: records put before the readers start are skipped.
    let moto = setup(2).await;
    let s3 = moto.s3();
    let tmp = TempDir::new("kinesis-start");
    let old = feed(&moto, 70, 10, 10).await;
    let mut w =
        Worker::start_configured(&moto, tmp.path(), "latest", "start_position = \"LATEST\"");
    eventually(30, "both readers to poll", || async {
        http_get(w.port, "/metrics")
            .is_some_and(|(_, m)| m.matches("trailhose_kinesis_millis_behind_latest{").count() == 2)
    })
    .await;
    let mut new = feed(&moto, 71, 10, 10).await;
    new.sort();
    let (_, dups) = all_written(&s3, &new, 60).await;
    assert_eq!(dups, 0);
    assert_eq!(
        partition_written(&s3, &old).await,
        (0, old.len()),
        "LATEST skips older records"
    );
    w.stop();
    drop(moto);

    // AT_TIMESTAMP: records put before the time are skipped.
    let moto = setup(2).await;
    let s3 = moto.s3();
    let before = feed(&moto, 72, 10, 10).await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock");
    let at = now.as_secs() as i64 + 1;
    tokio::time::sleep(
        Duration::from_secs(1) - Duration::from_nanos(now.subsec_nanos().into())
            + Duration::from_millis(300),
    )
    .await;
    let mut after = feed(&moto, 73, 10, 10).await;
    after.sort();
    let stamp = trailhose::clock::Utc::from_unix(at).rfc3339();
    let mut w = Worker::start_configured(
        &moto,
        tmp.path(),
        "at-timestamp",
        &format!("start_position = \"AT_TIMESTAMP\"\nstart_timestamp = \"{stamp}\""),
    );
    let (_, dups) = all_written(&s3, &after, 60).await;
    assert_eq!(dups, 0);
    assert_eq!(
        partition_written(&s3, &before).await,
        (0, before.len()),
        "records before {stamp} are skipped"
    );
    w.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merged_shard_starts_only_after_both_parents_are_drained() {
    let moto = setup_on(Moto::start_patched(KINESIS_RESHARDING), 2).await;
    let s3 = moto.s3();
    let tmp = TempDir::new("kinesis-merge");
    let mut expected = feed(&moto, 80, 20, 10).await;
    let mut w = Worker::start(&moto, tmp.path(), "solo");
    eventually(30, "reading to start", || async {
        w.metric("trailhose_kinesis_records_total") > 0.0
    })
    .await;
    kinesis(&moto)
        .merge_shards()
        .stream_name(STREAM)
        .shard_to_merge("shardId-000000000000")
        .adjacent_shard_to_merge("shardId-000000000001")
        .send()
        .await
        .expect("merge");
    expected.extend(feed(&moto, 81, 20, 10).await);
    expected.sort();
    let (got, dups) = all_written(&s3, &expected, 60).await;
    assert_eq!(
        dups,
        0,
        "exactly once across the merge ({} events)",
        got.len()
    );
    let child = "shardId-000000000002";
    eventually(20, "the merged shard to be checkpointed", || async {
        leases(&moto)
            .await
            .iter()
            .any(|l| l.key == child && !l.checkpoint.is_empty() && l.checkpoint != "SHARD_END")
    })
    .await;
    w.stop();
    let rows = leases(&moto).await;
    let c = rows.iter().find(|l| l.key == child).expect("child lease");
    assert_eq!(c.parents, "shardId-000000000000,shardId-000000000001");
    let log = w.log();
    let taken = log
        .find(&format!("lease taken shard=\"{child}\""))
        .unwrap_or_else(|| panic!("{child} taken; log:\n{log}"));
    for parent in ["shardId-000000000000", "shardId-000000000001"] {
        let row = rows.iter().find(|l| l.key == parent).expect("parent lease");
        assert_eq!(row.checkpoint, "SHARD_END", "{parent}");
        let ended = log
            .find(&format!(
                "shard read to its end (SHARD_END) shard=\"{parent}\""
            ))
            .unwrap_or_else(|| panic!("{parent} ended; log:\n{log}"));
        assert!(ended < taken, "{child} started after {parent} ended");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_stay_renewed_through_a_slow_shutdown_and_pass_on_without_repeats() {
    let moto = setup(2).await;
    let s3 = moto.s3();
    let tmp = TempDir::new("kinesis-slow-term");
    // Every S3 request of the first worker takes 3 s: its shutdown flush outlasts a lease (2 s).
    let slow = common::faults::FaultProxy::start(
        moto.port,
        common::faults::Plan {
            fail_every: 0,
            slow_every: 1,
            delay: Duration::from_secs(3),
        },
    );
    let mut expected = feed(&moto, 90, 10, 10).await;
    expected.sort();
    let mut a = Worker::spawn(
        &moto,
        tmp.path(),
        "a",
        &Settings {
            max_age_secs: 300,
            kinesis_ep: &moto.endpoint,
            s3_ep: &slow.endpoint(),
            extra: "",
        },
    );
    eventually(60, "every record to be read", || async {
        a.metric("trailhose_kinesis_records_total{shape=\"cwl_data\"}") == 10.0
    })
    .await;
    let b = Worker::start(&moto, tmp.path(), "b");
    eventually(30, "b to ask for a lease", || async {
        b.metric("trailhose_kinesis_lease_handoffs_total{stage=\"requested\"}") >= 1.0
    })
    .await;
    let started = Instant::now();
    a.stop();
    let took = started.elapsed();
    assert!(
        took > Duration::from_secs(2),
        "the flush outlasted a lease ({took:?})"
    );
    let (_, dups) = all_written(&s3, &expected, 30).await;
    assert_eq!(dups, 0, "nothing read twice");
    eventually(20, "b to hold both leases", || async {
        b.metric("trailhose_kinesis_leases_held ") == 2.0
    })
    .await;
    assert_eq!(
        b.metric("trailhose_kinesis_lease_takeovers_total{how=\"expired\"}"),
        0.0,
        "a's leases were released, never left to expire"
    );
    let mut b = b;
    b.stop();
}

/// A worker reading from LATEST, with the shipped batch defaults unless `max_age_secs` says
/// otherwise.
fn latest_worker(moto: &Moto, dir: &Path, name: &str, max_age_secs: u64) -> Worker {
    Worker::spawn(
        moto,
        dir,
        name,
        &Settings {
            max_age_secs,
            kinesis_ep: &moto.endpoint,
            s3_ep: &moto.endpoint,
            extra: "start_position = \"LATEST\"",
        },
    )
}

async fn readers_polling(w: &Worker, n: usize) {
    eventually(30, "the readers to poll", || async {
        http_get(w.port, "/metrics")
            .is_some_and(|(_, m)| m.matches("trailhose_kinesis_millis_behind_latest{").count() == n)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latest_a_failed_write_before_the_first_checkpoint_rewinds_to_the_first_record_read() {
    let moto = setup(2).await;
    let s3 = moto.s3();
    let tmp = TempDir::new("kinesis-latest-rewind");
    // A write must fail while the worker runs: at the default age the first write is the
    // shutdown's, so buffers flush after a second here.
    let mut w = latest_worker(&moto, tmp.path(), "solo", 1);
    readers_polling(&w, 2).await;
    s3.delete_bucket()
        .bucket("trail-out")
        .send()
        .await
        .expect("delete output bucket");
    let mut expected = feed(&moto, 100, 20, 10).await;
    eventually(40, "a failed put and a rewind", || async {
        w.metric("trailhose_errors_total{reason=\"put_failed\"") >= 1.0
            && w.metric("trailhose_errors_total{reason=\"rewound\"") >= 1.0
    })
    .await;
    s3.create_bucket()
        .bucket("trail-out")
        .send()
        .await
        .expect("recreate output bucket");
    expected.sort();
    // The rewind goes back to the first record read, not to LATEST.
    all_written(&s3, &expected, 90).await;
    w.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latest_a_lease_taken_over_before_the_first_checkpoint_resumes_at_the_first_record_read() {
    let moto = setup(2).await;
    let s3 = moto.s3();
    let tmp = TempDir::new("kinesis-latest-takeover");
    let a = latest_worker(&moto, tmp.path(), "a", 300);
    readers_polling(&a, 2).await;
    let mut expected = feed(&moto, 110, 10, 10).await;
    expected.sort();
    eventually(30, "a to read every record", || async {
        a.metric("trailhose_kinesis_records_total{shape=\"cwl_data\"}") == 10.0
    })
    .await;
    // Killed before anything is written or checkpointed.
    a.signal("-KILL");
    drop(a);
    for l in leases(&moto).await {
        assert_eq!(l.checkpoint, "", "{}: nothing checkpointed", l.key);
    }
    let mut b = latest_worker(&moto, tmp.path(), "b", 300);
    eventually(
        60,
        "b to take both leases and read every record",
        || async {
            b.metric("trailhose_kinesis_leases_held ") == 2.0
                && b.metric("trailhose_kinesis_records_total{shape=\"cwl_data\"}") == 10.0
        },
    )
    .await;
    b.stop();
    let (_, dups) = all_written(&s3, &expected, 10).await;
    assert_eq!(dups, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latest_children_of_a_split_start_at_trim_horizon_and_keep_what_arrived_while_the_parent_drained()
 {
    let moto = setup_on(Moto::start_patched(KINESIS_RESHARDING), 1).await;
    let s3 = moto.s3();
    let tmp = TempDir::new("kinesis-latest-split");
    let mut a = latest_worker(&moto, tmp.path(), "a", 300);
    readers_polling(&a, 1).await;
    let mut expected = feed(&moto, 120, 10, 10).await;
    eventually(30, "a to read the parent's records", || async {
        a.metric("trailhose_kinesis_records_total{shape=\"cwl_data\"}") == 10.0
    })
    .await;
    kinesis(&moto)
        .split_shard()
        .stream_name(STREAM)
        .shard_to_split("shardId-000000000000")
        .new_starting_hash_key((u128::MAX / 2).to_string())
        .send()
        .await
        .expect("split");
    // Written to the children while the parent's records wait for their batch to age.
    expected.extend(feed(&moto, 121, 10, 10).await);
    expected.sort();
    eventually(20, "the children's leases", || async {
        leases(&moto).await.len() == 3
    })
    .await;
    // The shutdown writes the parent's records and checkpoints them; the next worker ends the
    // parent and reads its children from their first record.
    a.stop();
    let mut b = latest_worker(&moto, tmp.path(), "b", 300);
    eventually(60, "b to read the children's records", || async {
        b.metric("trailhose_kinesis_records_total{shape=\"cwl_data\"}") == 10.0
    })
    .await;
    b.stop();
    let (_, dups) = all_written(&s3, &expected, 10).await;
    assert_eq!(dups, 0);
    let rows = leases(&moto).await;
    assert_eq!(rows[0].checkpoint, "SHARD_END", "the parent ended");
}

/// Issue 14: every CloudWatch Logs message that is not a JSON object becomes a string entry of
/// a synthetic `Records` array; 300 KB of plain-text messages in one batch straddle the
/// splitter's 256 KiB read window, which used to panic every worker reading the shard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_plain_text_messages_larger_than_the_read_window_goes_to_errors() {
    let moto = setup(1).await;
    let s3 = moto.s3();
    let tmp = TempDir::new("kinesis-plain");
    let (evs, mut ids) = events(1414, 5);
    let texts: Vec<String> = (0..30)
        .map(|i| format!("plain text line {i:02}: {}", "t".repeat(10_000)))
        .collect();
    let mut messages = evs.clone();
    messages.extend(texts.iter().cloned());
    put_one(&moto, cwl_batch(&messages), "plain-batch").await;
    let mut w = Worker::start_with(&moto, tmp.path(), "w1", 300);
    eventually(60, "the batch to be split", || async {
        w.metric("trailhose_records_rejected_total{reason=\"not_an_object\"}") >= 30.0
    })
    .await;
    w.stop();
    assert!(!w.log().contains("panicked"), "{}", w.log());
    ids.sort();
    assert_eq!(written_ids(&s3).await, ids);
    let errors = error_records(&s3).await;
    let rejected: Vec<&serde_json::Value> = errors
        .iter()
        .filter(|e| e["reason"] == "not_an_object")
        .collect();
    assert_eq!(rejected.len(), 30, "{errors:?}");
    for (n, r) in rejected.iter().enumerate() {
        // Its place in the batch, after the five events.
        assert_eq!(r["index"], (evs.len() + n) as u64);
        assert_eq!(r["record"], texts[n].as_str());
    }
    assert_eq!(errors.len(), 30, "{errors:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latest_a_shard_closed_before_the_first_start_is_not_waited_for_its_children_read_at_once()
{
    let moto = setup_on(Moto::start_patched(KINESIS_RESHARDING), 1).await;
    let s3 = moto.s3();
    let tmp = TempDir::new("kinesis-latest-closed");
    // On the parent before the worker ever ran: not read at LATEST.
    feed(&moto, 130, 5, 10).await;
    kinesis(&moto)
        .split_shard()
        .stream_name(STREAM)
        .shard_to_split("shardId-000000000000")
        .new_starting_hash_key((u128::MAX / 2).to_string())
        .send()
        .await
        .expect("split");
    let mut w = latest_worker(&moto, tmp.path(), "solo", 300);
    readers_polling(&w, 2).await;
    let mut expected = feed(&moto, 131, 10, 10).await;
    expected.sort();
    eventually(30, "the children's records to be read", || async {
        w.metric("trailhose_kinesis_records_total{shape=\"cwl_data\"}") == 10.0
    })
    .await;
    w.stop();
    let (_, dups) = all_written(&s3, &expected, 10).await;
    assert_eq!(dups, 0);
    let rows = leases(&moto).await;
    assert_eq!(
        rows[0].checkpoint, "SHARD_END",
        "the closed parent is ended"
    );
    // Had the children waited for the parent to be read to its end, what reached them
    // meanwhile would have been skipped (they start at LATEST).
    let log = w.log();
    assert!(
        !log.contains("lease taken shard=\"shardId-000000000000\""),
        "the closed parent is never read; log:\n{log}"
    );
}

/// Fails the first four checkpoint writes of a sequence number (not pins, not SHARD_END).
const FAILING_CHECKPOINTS: &str = r##"
from moto.core.exceptions import JsonRESTError
from moto.dynamodb.models import DynamoDBBackend
_update = DynamoDBBackend.update_item
_failures = [4]
def _update_failing(self, table_name, key, update_expression, expression_attribute_names, expression_attribute_values, *args, **kwargs):
    p = (expression_attribute_values or {}).get(":p", {}).get("S", "")
    if "#p = :p" in update_expression and p not in ("", "SHARD_END") and _failures[0] > 0:
        _failures[0] -= 1
        raise JsonRESTError("InternalFailure", "injected checkpoint failure")
    return _update(self, table_name, key, update_expression, expression_attribute_names, expression_attribute_values, *args, **kwargs)
DynamoDBBackend.update_item = _update_failing
"##;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_write_that_fails_while_draining_is_written_before_the_lease_is_released() {
    let moto = setup_on(Moto::start_patched(FAILING_CHECKPOINTS), 1).await;
    let s3 = moto.s3();
    let tmp = TempDir::new("kinesis-owed-checkpoint");
    let mut expected = feed(&moto, 140, 10, 10).await;
    expected.sort();
    // At the default age the records are written by the shutdown.
    let mut a = Worker::start_with(&moto, tmp.path(), "a", 300);
    eventually(30, "a to read every record", || async {
        a.metric("trailhose_kinesis_records_total{shape=\"cwl_data\"}") == 10.0
    })
    .await;
    // The shutdown writes the records; their checkpoint fails at first.
    a.stop();
    let log = a.log();
    assert!(
        log.contains("injected checkpoint failure"),
        "a checkpoint failed; log:\n{log}"
    );
    all_written(&s3, &expected, 10).await;
    for l in leases(&moto).await {
        assert!(
            !l.checkpoint.is_empty() && l.owner.is_none(),
            "{}: checkpointed, then released; log:\n{log}",
            l.key
        );
    }
    // So the next worker repeats nothing.
    let mut b = Worker::start(&moto, tmp.path(), "b");
    eventually(30, "b to hold the lease", || async {
        b.metric("trailhose_kinesis_leases_held ") == 1.0
    })
    .await;
    b.stop();
    let (_, dups) = all_written(&s3, &expected, 10).await;
    assert_eq!(dups, 0);
}

/// Like `feed`, on a one-shard stream: also returns the last record's sequence number.
async fn feed_one_shard(
    moto: &Moto,
    seed: u64,
    batches: usize,
    per: usize,
) -> (Vec<String>, String) {
    let k = kinesis(moto);
    let mut ids = Vec::new();
    let mut entries = Vec::new();
    for b in 0..batches {
        let (evs, mut batch_ids) = events(seed * 1000 + b as u64, per);
        ids.append(&mut batch_ids);
        entries.push(
            PutRecordsRequestEntry::builder()
                .data(Blob::new(cwl_batch(&evs)))
                .partition_key(format!("pk-{seed}-{b}"))
                .build()
                .expect("entry"),
        );
    }
    let out = k
        .put_records()
        .stream_name(STREAM)
        .set_records(Some(entries))
        .send()
        .await
        .expect("put records");
    assert_eq!(out.failed_record_count(), Some(0));
    let last = out
        .records()
        .last()
        .and_then(|r| r.sequence_number())
        .expect("sequence number")
        .to_owned();
    (ids, last)
}

/// A shard's checkpoint; "" while it has none, or while a busy moto does not answer (the
/// callers poll).
async fn checkpoint_of(moto: &Moto, shard: &str) -> String {
    let item = dynamodb(moto)
        .get_item()
        .table_name(TABLE)
        .key("leaseKey", AttributeValue::S(shard.into()))
        .consistent_read(true)
        .send()
        .await
        .ok()
        .and_then(|r| r.item)
        .unwrap_or_default();
    item.get("checkpoint")
        .and_then(|v| v.as_s().ok())
        .cloned()
        .unwrap_or_default()
}

/// The renewals numbered in `{lost}` (a Python tuple) are applied, but their answers are lost
/// (a 500 after the write); `{dir}/answer-lost-N` says the Nth was.
const LOST_RENEWAL_ANSWERS: &str = r##"
from moto.core.exceptions import JsonRESTError
from moto.dynamodb.models import DynamoDBBackend
class _AnswerLost(JsonRESTError):
    code = 500
_update = DynamoDBBackend.update_item
_renewals = [0]
def _update_losing_answers(self, table_name, key, update_expression, *args, **kwargs):
    out = _update(self, table_name, key, update_expression, *args, **kwargs)
    if update_expression == "SET #c = :next":
        _renewals[0] += 1
        if _renewals[0] in {lost}:
            open("{dir}/answer-lost-%d" % _renewals[0], "w").close()
            raise _AnswerLost("InternalServerError", "injected: renewal applied, answer lost")
    return out
DynamoDBBackend.update_item = _update_losing_answers
"##;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_write_applied_with_its_answer_lost_keeps_the_lease() {
    let tmp = TempDir::new("kinesis-lost-answer");
    let dir = tmp.path().display().to_string();
    let moto = setup_on(
        Moto::start_patched(
            &LOST_RENEWAL_ANSWERS
                .replace("{dir}", &dir)
                .replace("{lost}", "(5, 9)"),
        ),
        1,
    )
    .await;
    let s3 = moto.s3();
    let mut expected = feed(&moto, 150, 5, 10).await;
    expected.sort();
    let mut w = Worker::start_with(&moto, tmp.path(), "solo", 300);
    file_appears(&tmp.path().join("answer-lost-5")).await;
    file_appears(&tmp.path().join("answer-lost-9")).await;
    // The write after each (the SDK's retry, or the next renewal) settles what happened.
    eventually(30, "both lost answers to be dealt with", || async {
        w.log().matches("lease write recovered").count() >= 2
            || w.metric("trailhose_errors_total{reason=\"lease_lost\"") > 0.0
    })
    .await;
    eventually(30, "every record to be read", || async {
        w.metric("trailhose_kinesis_records_total{shape=\"cwl_data\"}") == 5.0
    })
    .await;
    assert_eq!(
        w.metric("trailhose_errors_total{reason=\"lease_lost\""),
        0.0,
        "the lease was never given up; log:\n{}",
        w.log()
    );
    assert_eq!(
        w.metric("trailhose_kinesis_lease_takeovers_total"),
        1.0,
        "taken once, never again; log:\n{}",
        w.log()
    );
    assert_eq!(w.metric("trailhose_kinesis_leases_held "), 1.0);
    w.stop();
    let (_, dups) = all_written(&s3, &expected, 10).await;
    assert_eq!(dups, 0, "the shard was read once");
}

/// Two writes in a row applied with their answers lost (the SDK retries each, and the retry
/// finds the condition changed): the second is the write that recovered from the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_lease_writes_in_a_row_applied_with_their_answers_lost_keep_the_lease() {
    let tmp = TempDir::new("kinesis-lost-answers-twice");
    let dir = tmp.path().display().to_string();
    let moto = setup_on(
        Moto::start_patched(
            &LOST_RENEWAL_ANSWERS
                .replace("{dir}", &dir)
                .replace("{lost}", "(5, 6)"),
        ),
        1,
    )
    .await;
    let s3 = moto.s3();
    let mut expected = feed(&moto, 155, 5, 10).await;
    expected.sort();
    // Two lost answers in a row cost two rounds of the SDK's retries before the write that
    // settles them: a 2 s lease (the other tests') is given up on a busy machine before that.
    // Without the recovery the lease is lost at the first conflicting renewal, whatever its
    // duration.
    let mut w = Worker::spawn(
        &moto,
        tmp.path(),
        "solo",
        &Settings {
            max_age_secs: 300,
            kinesis_ep: &moto.endpoint,
            s3_ep: &moto.endpoint,
            extra: "lease_duration_millis = 8000",
        },
    );
    file_appears(&tmp.path().join("answer-lost-6")).await;
    // Renewals go on past the faults (every 400 ms), or the lease is given up.
    let shard = "shardId-000000000000";
    let after = counter_of(&moto, shard).await;
    eventually(30, "renewals past the lost answers", || async {
        counter_of(&moto, shard).await >= after + 3
            || w.metric("trailhose_errors_total{reason=\"lease_lost\"") > 0.0
    })
    .await;
    eventually(30, "every record to be read", || async {
        w.metric("trailhose_kinesis_records_total{shape=\"cwl_data\"}") == 5.0
    })
    .await;
    assert_eq!(
        w.metric("trailhose_errors_total{reason=\"lease_lost\""),
        0.0,
        "the lease was never given up; log:\n{}",
        w.log()
    );
    assert_eq!(
        w.metric("trailhose_kinesis_lease_takeovers_total"),
        1.0,
        "taken once, never again; log:\n{}",
        w.log()
    );
    w.stop();
    let (_, dups) = all_written(&s3, &expected, 10).await;
    assert_eq!(dups, 0, "the shard was read once");
}

/// While `{dir}/hang` exists, Scan and ListShards calls do not answer.
const HANGING_SCANS: &str = r##"
import os, time
from moto.dynamodb.models import DynamoDBBackend
from moto.kinesis.models import KinesisBackend
def _hanging(f):
    def g(*args, **kwargs):
        while os.path.exists("{dir}/hang"):
            time.sleep(0.05)
        return f(*args, **kwargs)
    return g
DynamoDBBackend.scan = _hanging(DynamoDBBackend.scan)
KinesisBackend.list_shards = _hanging(KinesisBackend.list_shards)
"##;

async fn counter_of(moto: &Moto, shard: &str) -> u64 {
    let item = dynamodb(moto)
        .get_item()
        .table_name(TABLE)
        .key("leaseKey", AttributeValue::S(shard.into()))
        .consistent_read(true)
        .send()
        .await
        .expect("get lease")
        .item
        .unwrap_or_default();
    item.get("leaseCounter")
        .and_then(|v| v.as_n().ok())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_scan_and_list_shards_calls_do_not_stall_renewals() {
    let tmp = TempDir::new("kinesis-hung-scan");
    let dir = tmp.path().display().to_string();
    let moto = setup_on(
        Moto::start_patched(&HANGING_SCANS.replace("{dir}", &dir)),
        1,
    )
    .await;
    let s3 = moto.s3();
    let mut expected = feed(&moto, 160, 5, 10).await;
    let mut w = Worker::start_with(&moto, tmp.path(), "solo", 300);
    eventually(60, "the lease to be held and read", || async {
        w.metric("trailhose_kinesis_leases_held ") == 1.0
            && w.metric("trailhose_kinesis_records_total{shape=\"cwl_data\"}") == 5.0
    })
    .await;
    let shard = "shardId-000000000000";
    std::fs::write(tmp.path().join("hang"), b"").expect("hang switch");
    // Three lease durations of hung calls (the lease is 2 s, renewed every 400 ms).
    let before = counter_of(&moto, shard).await;
    eventually(60, "the calls to time out", || async {
        w.metric("trailhose_errors_total{reason=\"scan_leases\"") >= 2.0
            && w.metric("trailhose_errors_total{reason=\"list_shards\"") >= 1.0
    })
    .await;
    let during = counter_of(&moto, shard).await;
    std::fs::remove_file(tmp.path().join("hang")).expect("hang switch off");
    assert!(
        during >= before + 5,
        "renewals went on while the coordinator's calls hung ({before} -> {during}); log:\n{}",
        w.log()
    );
    assert_eq!(
        w.metric("trailhose_errors_total{reason=\"lease_lost\""),
        0.0,
        "the lease was kept; log:\n{}",
        w.log()
    );
    expected.extend(feed(&moto, 161, 5, 10).await);
    eventually(60, "the new records to be read", || async {
        w.metric("trailhose_kinesis_records_total{shape=\"cwl_data\"}") == 10.0
    })
    .await;
    w.stop();
    expected.sort();
    let (_, dups) = all_written(&s3, &expected, 10).await;
    assert_eq!(dups, 0);
}

/// SIGTERM while the lease table's Scan hangs: the shutdown's own calls have deadlines too, so
/// the worker exits (its last checkpoint written), and its lease is given up all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_stopped_while_the_lease_table_hangs_exits_and_releases_its_lease() {
    let tmp = TempDir::new("kinesis-hung-shutdown");
    let dir = tmp.path().display().to_string();
    let moto = setup_on(
        Moto::start_patched(&HANGING_SCANS.replace("{dir}", &dir)),
        1,
    )
    .await;
    let s3 = moto.s3();
    let mut expected = feed(&moto, 165, 5, 10).await;
    expected.sort();
    let mut w = Worker::start_with(&moto, tmp.path(), "solo", 300);
    eventually(60, "the lease to be held and read", || async {
        w.metric("trailhose_kinesis_leases_held ") == 1.0
            && w.metric("trailhose_kinesis_records_total{shape=\"cwl_data\"}") == 5.0
    })
    .await;
    std::fs::write(tmp.path().join("hang"), b"").expect("hang switch");
    // Exits within `stop`'s 25 s.
    w.stop();
    std::fs::remove_file(tmp.path().join("hang")).expect("hang switch off");
    let rows = leases(&moto).await;
    assert!(
        rows.iter().all(|l| l.owner.is_none()),
        "the lease was released: {rows:?}"
    );
    let (_, dups) = all_written(&s3, &expected, 10).await;
    assert_eq!(dups, 0);
}

/// While `{dir}/fail-renewals` exists, renewals fail. While `{dir}/hang-reads` exists, the first
/// GetRecords call to arrive does not answer (`{dir}/read-hung` says it arrived) until the file
/// is removed (then `{dir}/read-answered`).
const STALE_LEASE: &str = r##"
import os, time, threading
from moto.core.exceptions import JsonRESTError
from moto.dynamodb.models import DynamoDBBackend
from moto.kinesis.models import KinesisBackend
_update = DynamoDBBackend.update_item
def _update_failing(self, table_name, key, update_expression, *args, **kwargs):
    if update_expression == "SET #c = :next" and os.path.exists("{dir}/fail-renewals"):
        raise JsonRESTError("InternalFailure", "injected renewal failure")
    return _update(self, table_name, key, update_expression, *args, **kwargs)
DynamoDBBackend.update_item = _update_failing
_get = KinesisBackend.get_records
_hung = [False]
_lock = threading.Lock()
def _get_hanging(self, *args, **kwargs):
    with _lock:
        hang = os.path.exists("{dir}/hang-reads") and not _hung[0]
        if hang:
            _hung[0] = True
    if hang:
        open("{dir}/read-hung", "w").close()
        while os.path.exists("{dir}/hang-reads"):
            time.sleep(0.05)
    out = _get(self, *args, **kwargs)
    if hang:
        open("{dir}/read-answered", "w").close()
    return out
KinesisBackend.get_records = _get_hanging
"##;

/// Waits for a file the patched moto writes.
async fn file_appears(path: &Path) {
    eventually(60, &format!("{}", path.display()), || async {
        path.exists()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_given_up_as_stale_is_stopped_before_the_shard_is_read_again() {
    let tmp = TempDir::new("kinesis-stale");
    let dir = tmp.path().display().to_string();
    let moto = setup_on(Moto::start_patched(&STALE_LEASE.replace("{dir}", &dir)), 1).await;
    let s3 = moto.s3();
    let shard = "shardId-000000000000";
    // Batches age for a second: the shard must be checkpointed to its end before the fault,
    // so that any record read twice afterwards is the two readers' doing.
    let mut w = Worker::start(&moto, tmp.path(), "solo");
    let (mut expected, last) = feed_one_shard(&moto, 170, 5, 10).await;
    eventually(60, "the first records to be checkpointed", || async {
        checkpoint_of(&moto, shard).await == last
    })
    .await;
    // The reader's next GetRecords hangs; then its renewals fail until it is given up.
    std::fs::write(tmp.path().join("hang-reads"), b"").expect("switch");
    file_appears(&tmp.path().join("read-hung")).await;
    std::fs::write(tmp.path().join("fail-renewals"), b"").expect("switch");
    eventually(60, "the lease to be given up as stale", || async {
        w.log().contains("not renewed within the lease duration")
    })
    .await;
    std::fs::remove_file(tmp.path().join("fail-renewals")).expect("switch off");
    // The shard is read again (by a new reader), and what arrives now is read by it.
    let (more, last) = feed_one_shard(&moto, 171, 5, 10).await;
    expected.extend(more);
    eventually(60, "the new records to be checkpointed", || async {
        checkpoint_of(&moto, shard).await == last
    })
    .await;
    // The old reader's call answers now: were it still running, it would hand on the new
    // records a second time.
    std::fs::remove_file(tmp.path().join("hang-reads")).expect("switch off");
    file_appears(&tmp.path().join("read-answered")).await;
    let (sentinel, last) = feed_one_shard(&moto, 172, 1, 1).await;
    expected.extend(sentinel);
    eventually(60, "the sentinel to be checkpointed", || async {
        checkpoint_of(&moto, shard).await == last
    })
    .await;
    assert_eq!(
        w.metric("trailhose_kinesis_records_total{shape=\"cwl_data\"}"),
        11.0,
        "each record handed on once; log:\n{}",
        w.log()
    );
    w.stop();
    expected.sort();
    let (_, dups) = all_written(&s3, &expected, 10).await;
    assert_eq!(dups, 0, "no record read by two readers");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_whose_decoding_panics_goes_to_the_error_output_and_its_shard_goes_on() {
    let moto = setup(1).await;
    let s3 = moto.s3();
    let tmp = TempDir::new("kinesis-poison");
    let mut expected = feed(&moto, 180, 3, 10).await;
    let poison =
        r#"{"eventVersion":"1.09","eventID":"POISON-RECORD","eventTime":"2024-03-18T14:30:07Z"}"#;
    put_one(&moto, poison.as_bytes().to_vec(), "poison").await;
    expected.extend(feed(&moto, 181, 3, 10).await);
    expected.sort();
    let mut w = Worker::spawn_env(
        &moto,
        tmp.path(),
        "solo",
        &Settings {
            max_age_secs: 300,
            kinesis_ep: &moto.endpoint,
            s3_ep: &moto.endpoint,
            extra: "",
        },
        &[("TRAILHOSE_TEST_FAULT", "classify_panic:POISON-RECORD")],
    );
    eventually(60, "every record to be read", || async {
        w.metric("trailhose_kinesis_records_total{shape=\"cwl_data\"}") == 6.0
            && w.metric("trailhose_kinesis_records_total{shape=\"unrecognized\"}") == 1.0
    })
    .await;
    assert_eq!(w.metric("trailhose_panics_total{thread=\"classify\"}"), 1.0);
    assert_eq!(
        w.metric("trailhose_errors_total{reason=\"rewound\""),
        0.0,
        "the shard was not rewound; log:\n{}",
        w.log()
    );
    w.stop();
    let (_, dups) = all_written(&s3, &expected, 10).await;
    assert_eq!(dups, 0);
    let errors = error_records(&s3).await;
    let reason = errors
        .iter()
        .find(|e| {
            e["record"]
                .as_str()
                .is_some_and(|r| r.starts_with("classify_panicked:"))
        })
        .unwrap_or_else(|| panic!("the reason in the error output: {errors:?}"));
    assert!(
        reason["source"]
            .as_str()
            .is_some_and(|s| s.starts_with("kinesis://trail-stream/shardId-000000000000/"))
    );
    assert!(
        errors.iter().any(|e| e["record"] == poison),
        "the record itself in the error output: {errors:?}"
    );
    assert_eq!(errors.len(), 2, "{errors:?}");
}

/// One GetRecords batch: good CloudWatch Logs records around a malformed one (a valid event,
/// then a `message` that is a number) and one whose messages are hostile (a second event
/// smuggled after the first, an object cut short) beside a good event. The bad record and the
/// bad messages go to the error output named by their record; every good event is written
/// once, nothing of the malformed record leaks out as an event, and the checkpoint reaches the
/// batch's last record only once its events are durably written (at shutdown, with the
/// default 300 s age).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_cloudwatch_record_goes_to_errors_and_its_batch_neighbours_pass() {
    let moto = setup(1).await;
    let s3 = moto.s3();
    let tmp = TempDir::new("kinesis-hostile-batch");
    let (before, mut expected) = events(1818, 5);
    let (after, after_ids) = events(1819, 5);
    let (smuggled, smuggled_ids) = events(1820, 1);
    let (neighbour, neighbour_ids) = events(1821, 1);
    expected.extend(after_ids);
    expected.extend(neighbour_ids);
    expected.sort();
    let malformed = serde_json::json!({
        "messageType": "DATA_MESSAGE",
        "logEvents": [{"id": "1", "message": smuggled[0]}, {"id": "2", "message": 5}]
    });
    let smuggling = format!("{}{}", smuggled[0], neighbour[0]);
    let cut = r#"{"eventVersion":"1.09","eventID":"cut""#.to_owned();
    let data = [
        cwl_batch(&before),
        fixtures::gzip(malformed.to_string().as_bytes()),
        cwl_batch(&[smuggling.clone(), neighbour[0].clone(), cut.clone()]),
        cwl_batch(&after),
    ];
    let entries = data
        .into_iter()
        .map(|d| {
            PutRecordsRequestEntry::builder()
                .data(Blob::new(d))
                .partition_key("one-shard")
                .build()
                .expect("entry")
        })
        .collect();
    let put = kinesis(&moto)
        .put_records()
        .stream_name(STREAM)
        .set_records(Some(entries))
        .send()
        .await
        .expect("put records");
    assert_eq!(put.failed_record_count(), Some(0));
    let seqs: Vec<String> = put
        .records()
        .iter()
        .map(|r| r.sequence_number().expect("sequence number").to_owned())
        .collect();
    let shard = "shardId-000000000000";
    let source = |n: usize| format!("kinesis://{STREAM}/{shard}/{}", seqs[n]);

    let mut w = Worker::start_with(&moto, tmp.path(), "solo", 300);
    eventually(60, "the batch to be split", || async {
        w.metric("trailhose_events_in_total ") >= 11.0
            && w.metric("trailhose_records_rejected_total{reason=\"not_an_object\"}") >= 4.0
    })
    .await;
    // Two more reader cycles (GetRecords answered after the batch): still no checkpoint, as
    // the batch's events are only buffered. A checkpoint never moves back, so none before.
    let calls = w.metric("trailhose_kinesis_get_records_total");
    eventually(60, "two more GetRecords calls", || async {
        w.metric("trailhose_kinesis_get_records_total") >= calls + 2.0
    })
    .await;
    assert_eq!(
        checkpoint_of(&moto, shard).await,
        "",
        "no checkpoint while the batch's events are only buffered"
    );
    assert_eq!(
        w.metric("trailhose_kinesis_records_total{shape=\"cwl_data\"}"),
        3.0
    );
    w.stop();
    assert!(!w.log().contains("panicked"), "{}", w.log());
    assert_eq!(written_ids(&s3).await, expected);
    assert!(!expected.contains(&smuggled_ids[0]));
    assert_eq!(checkpoint_of(&moto, shard).await, seqs[3]);

    let errors = error_records(&s3).await;
    let of = |n: usize| -> Vec<&serde_json::Value> {
        errors.iter().filter(|e| e["source"] == source(n)).collect()
    };
    let bad = of(1);
    assert_eq!(bad.len(), 2, "the reason and the data: {errors:?}");
    assert!(
        bad[0]["record"]
            .as_str()
            .is_some_and(|r| r.starts_with("bad_cwl_batch: ")),
        "{bad:?}"
    );
    assert!(
        bad.iter().all(|e| e["reason"] == "not_an_object"),
        "{bad:?}"
    );
    let hostile = of(2);
    let kept: Vec<&str> = hostile
        .iter()
        .filter_map(|e| e["record"].as_str())
        .collect();
    assert_eq!(kept, [smuggling.as_str(), cut.as_str()], "{hostile:?}");
    assert!(of(0).is_empty() && of(3).is_empty(), "{errors:?}");
    assert_eq!(errors.len(), 4, "{errors:?}");
}

/// Records put on the one shard in one call, in order; their sequence numbers.
async fn put_in_order(moto: &Moto, data: Vec<Vec<u8>>) -> Vec<String> {
    let entries = data
        .into_iter()
        .map(|d| {
            PutRecordsRequestEntry::builder()
                .data(Blob::new(d))
                .partition_key("one-shard")
                .build()
                .expect("entry")
        })
        .collect();
    let put = kinesis(moto)
        .put_records()
        .stream_name(STREAM)
        .set_records(Some(entries))
        .send()
        .await
        .expect("put records");
    assert_eq!(put.failed_record_count(), Some(0));
    put.records()
        .iter()
        .map(|r| r.sequence_number().expect("sequence number").to_owned())
        .collect()
}

/// A CloudWatch Logs record of over 2 MiB of messages (two make a job, see
/// `JOB_MESSAGE_BYTES`), its events and their ids.
fn large_record(seed: &mut u64) -> (Vec<String>, Vec<String>) {
    let (mut evs, mut ids, mut bytes) = (Vec::new(), Vec::new(), 0);
    while bytes < 2 << 20 {
        let (e, i) = events(*seed, 200);
        *seed += 1;
        bytes += e.iter().map(String::len).sum::<usize>();
        evs.extend(e);
        ids.extend(i);
    }
    (evs, ids)
}

/// With one worker-queue permit (`max_files_in_flight = 1`), one GetRecords batch that decodes
/// to two jobs goes through job by job under its one hold. A worker panics on the record of the
/// later job (once): that job fails the whole batch, although the first job is split and
/// buffered, so the batch is read again from the start rather than checkpointed past the failed
/// job, and every event is written (repeats allowed); the shard ends checkpointed at the
/// batch's last record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_later_job_of_a_batch_rewinds_the_whole_batch_and_loses_nothing() {
    let moto = setup(1).await;
    let s3 = moto.s3();
    let tmp = TempDir::new("kinesis-jobs");
    let (mut data, mut per_record) = (Vec::new(), Vec::new());
    let mut seed = 1_860_000;
    for _ in 0..3 {
        let (evs, ids) = large_record(&mut seed);
        let record = cwl_batch(&evs);
        assert!(record.len() < 1 << 20, "within Kinesis's record size");
        data.push(record);
        per_record.push(ids);
    }
    let seqs = put_in_order(&moto, data).await;
    let shard = "shardId-000000000000";
    let fault = format!("worker_panic:{}", seqs[2]);
    let mut w = Worker::spawn_env(
        &moto,
        tmp.path(),
        "solo",
        &Settings {
            max_age_secs: 300,
            kinesis_ep: &moto.endpoint,
            s3_ep: &moto.endpoint,
            extra: "max_files_in_flight = 1",
        },
        &[("TRAILHOSE_TEST_FAULT", &fault)],
    );
    // The first job (records 0 and 1) is split twice: before the panic, and again with its
    // batch; the later job once, after.
    let n = per_record.iter().map(Vec::len).sum::<usize>();
    let again = n + per_record[0].len() + per_record[1].len();
    eventually(
        180,
        "the failed batch to be read and split again",
        || async { w.metric("trailhose_events_in_total ") >= again as f64 },
    )
    .await;
    assert_eq!(w.metric("trailhose_panics_total{thread=\"worker\"}"), 1.0);
    assert_eq!(w.metric("trailhose_events_in_total "), again as f64);
    assert_eq!(
        checkpoint_of(&moto, shard).await,
        "",
        "nothing is durable yet"
    );
    w.stop();
    let mut expected: Vec<String> = per_record.concat();
    expected.sort();
    let mut written = written_ids(&s3).await;
    written.dedup();
    assert_eq!(written, expected, "every event, the later job's too");
    assert_eq!(checkpoint_of(&moto, shard).await, seqs[2]);
}

/// With `[dedup]`, a second copy of an eventID anywhere in one GetRecords batch is dropped:
/// in another record of the same job, and in a record of a later job (before the batch, and
/// so its first copy, is durable).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dedup_drops_second_copies_in_other_records_and_jobs_of_the_same_batch() {
    let moto = setup(1).await;
    let s3 = moto.s3();
    let tmp = TempDir::new("kinesis-dedup");
    let mut seed = 1_870_000;
    let (first, mut expected) = large_record(&mut seed);
    let (mut second, ids) = large_record(&mut seed);
    expected.extend(ids);
    let (mut third, ids) = events(seed, 3);
    expected.extend(ids);
    // The first record's first event again in the same job, its last in the next job.
    second.push(first[0].clone());
    third.push(first[first.len() - 1].clone());
    let seqs = put_in_order(
        &moto,
        vec![cwl_batch(&first), cwl_batch(&second), cwl_batch(&third)],
    )
    .await;
    expected.sort();
    let mut w = Worker::spawn(
        &moto,
        tmp.path(),
        "solo",
        &Settings {
            max_age_secs: 300,
            kinesis_ep: &moto.endpoint,
            s3_ep: &moto.endpoint,
            extra: "[dedup]\nwindow_secs = 3600",
        },
    );
    let n = expected.len() + 2;
    eventually(120, "the batch to be split", || async {
        w.metric("trailhose_events_in_total ") >= n as f64
    })
    .await;
    assert_eq!(w.metric("trailhose_events_deduplicated_total"), 2.0);
    w.stop();
    assert_eq!(written_ids(&s3).await, expected, "each event once");
    assert_eq!(checkpoint_of(&moto, "shardId-000000000000").await, seqs[2]);
}
