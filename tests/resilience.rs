//! End to end: the sink holds under faults and pressure. A worker or compression thread that
//! panics fails only its unit, which is delivered again while the process keeps serving; a
//! failed compression is a failed write (never a short object); one process-wide buffer budget
//! (`batch.max_buffered_bytes`) bounds memory whatever the partitions. Faults are injected with
//! the debug-build test hook `TRAILHOSE_TEST_FAULT` (src/testhook.rs).

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::checks::{event_ids, id_of, split_output};
use common::sqs::*;
use common::{Moto, TempDir, eventually, fixtures, free_port, http_get, local_objects, s3_objects};

/// One CloudTrail event at `time` with id `id`; `note` lands in its requestParameters.
fn event(id: &str, time: &str, note: &str) -> serde_json::Value {
    serde_json::json!({
        "eventVersion": "1.08",
        "eventID": id,
        "eventTime": time,
        "eventSource": "s3.amazonaws.com",
        "eventName": "GetObject",
        "awsRegion": "us-east-1",
        "sourceIPAddress": "203.0.113.7",
        "recipientAccountId": "111122223333",
        "requestParameters": {"note": note, "pad": "x".repeat(120)},
    })
}

fn write_file(path: &Path, events: Vec<serde_json::Value>) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let json = serde_json::json!({ "Records": events }).to_string();
    std::fs::write(path, fixtures::gzip(json.as_bytes())).unwrap();
}

fn metric_in(text: &str, needle: &[&str]) -> f64 {
    text.lines()
        .find(|l| !l.starts_with('#') && needle.iter().all(|n| l.contains(n)))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

#[test]
fn a_failed_compression_fails_the_write_instead_of_writing_a_short_object() {
    let tmp = TempDir::new("compress-fail");
    let input = tmp.path().join("in");
    let out = tmp.path().join("out");
    let events = (0..50)
        .map(|i| {
            let note = if i == 25 { "COMPRESS-FAILS-HERE" } else { "ok" };
            event(&format!("id-{i:03}"), "2024-03-18T14:00:00Z", note)
        })
        .collect();
    write_file(&input.join(DAY).join("a.json.gz"), events);
    let metrics = tmp.path().join("metrics.prom");
    let run = common::trailhose(
        &[
            "process",
            input.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--metrics-file",
            metrics.to_str().unwrap(),
        ],
        &[(
            "TRAILHOSE_TEST_FAULT",
            "compress_fail:COMPRESS-FAILS-HERE".into(),
        )],
    );
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success(), "the run must fail: {stderr}");
    assert!(stderr.contains("could not be written"), "{stderr}");
    let objects = local_objects(&out);
    let output = split_output(&objects);
    assert!(
        output.events.is_empty(),
        "no event object is written from a batch that failed to compress: {objects:?}"
    );
    let m = std::fs::read_to_string(&metrics).expect("metrics file");
    assert_eq!(
        metric_in(
            &m,
            &[
                "trailhose_errors_total",
                "reason=\"compress_failed\"",
                "stage=\"encode\""
            ]
        ),
        1.0,
        "{m}"
    );
}

/// Without compression, chunks are "compressed" on the worker's own thread. A panic there
/// must fail the batch too: the chunk (here holding the records of an earlier, already handled
/// file) is out of its buffer by then, and the buffer must not be written without it.
#[test]
fn a_compression_panic_on_the_workers_own_thread_fails_the_batch_too() {
    let tmp = TempDir::new("inline-compress-panic");
    let input = tmp.path().join("in");
    let out = tmp.path().join("out");
    let config = tmp.path().join("none.toml");
    std::fs::write(
        &config,
        "[output]\ncompression = \"none\"\n[batch]\nchunk_bytes = 65536\n[pipeline]\nworkers = 1\n",
    )
    .unwrap();
    // Both files land in one buffer; its first 64 KiB chunk holds all of a.json.gz and the
    // start of b.json.gz, whose 10th event carries the needle.
    let file = |name: &str, needle_at: Option<usize>| {
        let events = (0..150)
            .map(|i| {
                let note = if Some(i) == needle_at {
                    "PANIC-IN-CHUNK"
                } else {
                    "ok"
                };
                event(&format!("{name}-{i:03}"), "2024-03-18T14:00:00Z", note)
            })
            .collect();
        write_file(&input.join(DAY).join(format!("{name}.json.gz")), events);
    };
    file("a", None);
    file("b", Some(10));
    let run = common::trailhose(
        &[
            "process",
            input.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--config",
            config.to_str().unwrap(),
        ],
        &[(
            "TRAILHOSE_TEST_FAULT",
            "compress_panic:PANIC-IN-CHUNK".into(),
        )],
    );
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(stderr.contains("test hook: compress_panic"), "{stderr}");
    assert!(!run.status.success(), "the run must fail: {stderr}");
    assert!(
        stderr.contains("could not be written"),
        "the batch that lost its chunk is not written: {stderr}"
    );
    let objects = local_objects(&out);
    let a_ids = split_output(&objects)
        .events
        .iter()
        .filter(|(_, l)| id_of(l).starts_with("a-"))
        .count();
    assert!(
        a_ids == 0 || a_ids == 150,
        "a.json.gz is written whole or not at all: {a_ids} of 150"
    );
}

/// Peak RSS of a child, by polling its `VmHWM` (a high-water mark) until it exits.
fn run_measured(mut cmd: Command) -> (std::process::ExitStatus, u64, String) {
    let stderr_path = std::env::temp_dir().join(format!(
        "trailhose-rss-{}-{}.log",
        std::process::id(),
        free_port()
    ));
    cmd.stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr_path).unwrap());
    let mut child = cmd.spawn().expect("spawn trailhose");
    let status_path = format!("/proc/{}/status", child.id());
    let mut peak_kib = 0u64;
    let status = loop {
        if let Ok(s) = std::fs::read_to_string(&status_path)
            && let Some(kib) = s
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        {
            peak_kib = peak_kib.max(kib);
        }
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
    let _ = std::fs::remove_file(&stderr_path);
    (status, peak_kib << 10, stderr)
}

fn process_cmd(input: &Path, out: &Path, config: &Path, metrics: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_trailhose"));
    cmd.args([
        "process",
        input.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
        "--metrics-file",
        metrics.to_str().unwrap(),
    ])
    .env("TRAILHOSE_LOG", "warn");
    cmd
}

/// Output on tmpfs when there is one: 20,000 objects each synced twice would otherwise take
/// minutes on a slow disk, and the disk is not what this test is about.
fn fast_dir(name: &str) -> TempDir {
    let shm = PathBuf::from("/dev/shm");
    if shm.is_dir() {
        let p = shm.join(format!("trailhose-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        return TempDir(p);
    }
    TempDir::new(name)
}

/// One file whose 20,000 events fall in 20,000 different hours: with a 4 MiB budget, the
/// buffers are sealed early, memory stays under the budget (peak RSS against a one-event run
/// of the same binary), and every event is written exactly once.
#[test]
fn twenty_thousand_hours_in_one_file_stay_under_the_buffer_budget() {
    const BUDGET: u64 = 4 << 20;
    let tmp = fast_dir("budget");
    let config = tmp.path().join("budget.toml");
    std::fs::write(
        &config,
        format!("[batch]\nmax_buffered_bytes = {BUDGET}\n[pipeline]\nworkers = 1\ncompression_threads = 1\n"),
    )
    .unwrap();
    let start = 1_577_836_800i64; // 2020-01-01T00:00:00Z
    let time = |h: i64| {
        let t = start + h * 3600;
        let days = t.div_euclid(86_400);
        let (y, m, d) = civil(days);
        format!(
            "{y:04}-{m:02}-{d:02}T{:02}:00:00Z",
            t.rem_euclid(86_400) / 3600
        )
    };
    let many = tmp.path().join("many");
    write_file(
        &many.join(DAY).join("hours.json.gz"),
        (0..20_000)
            .map(|h| event(&format!("h-{h:05}"), &time(h), "ok"))
            .collect(),
    );
    let one = tmp.path().join("one");
    write_file(
        &one.join(DAY).join("one.json.gz"),
        vec![event("only", &time(0), "ok")],
    );

    // The one-event run's RSS varies by a few MiB from run to run: take the larger of two.
    let mut baseline = 0;
    for i in 0..2 {
        let out_one = tmp.path().join(format!("out-one-{i}"));
        let m_one = tmp.path().join(format!("one-{i}.prom"));
        let (status, rss, stderr) = run_measured(process_cmd(&one, &out_one, &config, &m_one));
        assert!(status.success(), "{stderr}");
        baseline = baseline.max(rss);
    }
    let (out, metrics) = (tmp.path().join("out"), tmp.path().join("many.prom"));
    let (status, peak, stderr) = run_measured(process_cmd(&many, &out, &config, &metrics));
    assert!(status.success(), "{stderr}");
    let grown = peak.saturating_sub(baseline);
    eprintln!(
        "peak RSS {} KiB, one-event run {} KiB, grown {} KiB, budget {} KiB",
        peak >> 10,
        baseline >> 10,
        grown >> 10,
        BUDGET >> 10
    );
    // The budget bounds open buffers; on top come fixed working memory (compressor state,
    // batches sealed and being written, allocator slack) and run-to-run noise: 12 MiB. The
    // same file with buffers allocated up front and no budget grows by about 90 MiB.
    assert!(
        grown < BUDGET + (12 << 20),
        "memory grew by {grown} bytes over a {BUDGET}-byte budget"
    );

    let m = std::fs::read_to_string(&metrics).unwrap();
    assert!(
        metric_in(
            &m,
            &["trailhose_buffers_sealed_early_total", "reason=\"budget\""]
        ) > 0.0,
        "the budget sealed buffers early\n{m}"
    );
    let objects = local_objects(&out);
    let ids = event_ids(&objects);
    let want: Vec<String> = (0..20_000).map(|h| format!("h-{h:05}")).collect();
    assert_eq!(ids.len(), want.len(), "every event once");
    assert_eq!(ids, want);
}

/// `batch.max_open_partitions` at 2, everything else at its default: a file whose events take
/// turns among four hours is written whole, the cap counted under its own reason.
#[test]
fn a_file_over_more_hours_than_open_partitions_are_allowed_is_written_whole() {
    let tmp = TempDir::new("max-open");
    let config = tmp.path().join("t.toml");
    std::fs::write(&config, "[batch]\nmax_open_partitions = 2\n").unwrap();
    let input = tmp.path().join("in");
    let times = [
        "2024-03-18T10:00:00Z",
        "2024-03-18T11:00:00Z",
        "2024-03-18T12:00:00Z",
        "2024-03-18T13:00:00Z",
    ];
    let events = (0..40)
        .map(|i| event(&format!("id-{i:03}"), times[i % 4], "ok"))
        .collect();
    write_file(&input.join(DAY).join("turns.json.gz"), events);
    let (out, metrics) = (tmp.path().join("out"), tmp.path().join("m.prom"));
    let run = process_cmd(&input, &out, &config, &metrics)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let m = std::fs::read_to_string(&metrics).unwrap();
    let sealed = |reason: &str| {
        metric_in(
            &m,
            &[
                "trailhose_buffers_sealed_early_total",
                &format!("reason=\"{reason}\""),
            ],
        )
    };
    // Every event after the first two opens a third partition, sealing the oldest.
    assert_eq!(sealed("max_open_partitions"), 38.0, "{m}");
    assert_eq!(sealed("budget"), 0.0, "{m}");
    assert!(
        m.contains("trailhose_buffers_sealed_early_total{reason=\"ledger\"} 0"),
        "{m}"
    );
    let objects = local_objects(&out);
    let ids = event_ids(&objects);
    let want: Vec<String> = (0..40).map(|i| format!("id-{i:03}")).collect();
    assert_eq!(ids, want, "every event once");
    let hours: BTreeSet<String> = objects
        .iter()
        .filter_map(|(k, _)| k.split("/hour=").nth(1)?.get(..2).map(str::to_owned))
        .collect();
    assert_eq!(
        hours.len(),
        4,
        "{:?}",
        objects.iter().map(|(k, _)| k).collect::<Vec<_>>()
    );
}

/// Days since 1970-01-01 to (year, month, day) (Howard Hinnant's algorithm).
fn civil(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

// ---- service mode ------------------------------------------------------------------------

struct Service {
    moto: Moto,
    queue: Queues,
    port: u16,
    config: String,
}

/// moto with the buckets and a queue (redrive after 5 receives), and a config for one worker
/// at the shipped batch defaults but `settings`.
async fn service(tmp: &Path, settings: Settings) -> Service {
    let (moto, queue) = setup("work", 5).await;
    let port = free_port();
    let eps = (moto.endpoint.as_str(), moto.endpoint.as_str());
    let config = write_config_with(tmp, eps, &queue.url, port, &settings);
    Service {
        moto,
        queue,
        port,
        config,
    }
}

/// One worker thread (and `batch` added to `[batch]`).
fn one_worker(batch: &str, pipeline: &str) -> Settings {
    Settings {
        batch: batch.into(),
        extra: format!("[pipeline]\nworkers = 1\n{pipeline}"),
        ..Settings::default()
    }
}

impl Service {
    fn start(&self, fault: &str, log: &Path) -> Worker {
        start_worker_with(
            &self.moto,
            &self.config,
            log,
            &[("TRAILHOSE_TEST_FAULT", fault)],
        )
    }

    fn metric(&self, needle: &[&str]) -> f64 {
        let text = http_get(self.port, "/metrics")
            .map(|(_, m)| m)
            .unwrap_or_default();
        metric_in(&text, needle)
    }

    /// Uploads `n` generated files (`gen-100-000.json.gz`, …), one message each; returns their
    /// eventIDs, sorted.
    async fn seed(&self, n: u64, bytes: usize) -> Vec<String> {
        seed_generated(&self.moto, &self.queue.url, n, 100, bytes).await
    }

    /// (visible, in flight) messages.
    async fn depth(&self) -> (u64, u64) {
        depth(&self.moto.sqs(), &self.queue.url).await
    }

    async fn queue_empty(&self) -> bool {
        self.depth().await == (0, 0)
    }

    async fn written_ids(&self) -> Vec<String> {
        written_ids(&self.moto.s3()).await
    }
}

/// One worker thread, batch defaults (`max_age_secs = 300`): the worker panics on one file;
/// the file's message is not deleted, comes back, and is processed by the same worker, which
/// went on serving the other files meanwhile. SIGTERM then writes every event exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_panics_on_a_file_redelivers_it_and_keeps_serving() {
    let tmp = TempDir::new("worker-panic");
    let svc = service(tmp.path(), one_worker("", "")).await;
    let ids = svc.seed(6, 20_000).await;
    let log = tmp.path().join("worker.log");
    let mut w = svc.start("worker_panic:gen-100-002.json.gz", &log);
    eventually(60, "every file split, the panicking one again", || async {
        svc.metric(&["trailhose_files_total", "outcome=\"ok\""]) >= 6.0
    })
    .await;
    assert_eq!(
        svc.metric(&["trailhose_panics_total", "thread=\"worker\""]),
        1.0
    );
    let (status, _) = http_get(svc.port, "/healthz").expect("healthz");
    assert_eq!(status, 200, "a rebuilt worker keeps the process healthy");
    stop(&mut w, &log, 60);
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        log_text.contains("test hook: worker_panic on") && log_text.contains("gen-100-002"),
        "{log_text}"
    );
    assert_eq!(svc.written_ids().await, ids, "every event exactly once");
    eventually(30, "the queue to be empty", || svc.queue_empty()).await;
}

/// A compression thread panics on one chunk: the batch holding it is not written (no short
/// object) and its messages stay on the queue. A second run (without the fault) then writes
/// them: every event arrives, and the queue drains.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compression_thread_that_panics_fails_its_batch_and_its_messages_come_again() {
    let tmp = TempDir::new("compress-panic");
    // Small batches so that batches seal (and compress) while the worker runs; the first
    // batch compressed panics (every event has an eventVersion).
    let svc = service(
        tmp.path(),
        one_worker("max_records = 5\n", "compression_threads = 1\n"),
    )
    .await;
    let ids = svc.seed(6, 20_000).await;
    let log = tmp.path().join("first.log");
    let mut w = svc.start("compress_panic:eventVersion", &log);
    eventually(60, "the compression thread to panic", || async {
        svc.metric(&["trailhose_panics_total", "thread=\"compress\""]) >= 1.0
    })
    .await;
    eventually(60, "every file split", || async {
        svc.metric(&["trailhose_files_total", "outcome=\"ok\""]) >= 6.0
    })
    .await;
    let split_first = svc.metric(&["trailhose_files_total", "outcome=\"ok\""]);
    stop(&mut w, &log, 60);
    drop(w);
    let first = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(first.contains("test hook: compress_panic"), "{first}");
    for (key, text) in s3_objects(&svc.moto.s3(), "trail-out", "ct/").await {
        assert!(!text.is_empty(), "no empty or short object: {key}");
    }
    // The failed batch's messages were not deleted: they come back once their visibility
    // runs out (or already came back to the first run, if all their batches sealed in it).
    let deadline = Instant::now() + Duration::from_secs(30);
    let left = loop {
        let (visible, hidden) = svc.depth().await;
        if hidden == 0 {
            break visible;
        }
        assert!(Instant::now() < deadline, "messages stay in flight");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        left > 0 || split_first > 6.0,
        "the failed batch's messages were delivered again"
    );
    if left > 0 {
        let log = tmp.path().join("second.log");
        let mut w = svc.start("", &log);
        eventually(60, "the second run to split what came back", || async {
            svc.metric(&["trailhose_files_total", "outcome=\"ok\""]) >= left as f64
                && svc.depth().await.0 == 0
        })
        .await;
        stop(&mut w, &log, 60);
    }
    let written = svc.written_ids().await;
    let unique: BTreeSet<&String> = written.iter().collect();
    let want: BTreeSet<&String> = ids.iter().collect();
    assert_eq!(unique, want, "every event arrives (repeats allowed)");
    eventually(30, "the queue to be empty", || svc.queue_empty()).await;
}

/// A worker that cannot be rebuilt after a panic is lost: `/healthz` turns unhealthy (so
/// Kubernetes restarts the pod) and the file's message is not deleted. With every worker lost
/// the pod stops receiving (the queue is left to the other pods: nothing here could split a
/// file) and `/readyz` fails, saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_whose_workers_are_all_lost_stops_receiving_and_is_not_ready() {
    let tmp = TempDir::new("worker-lost");
    let svc = service(tmp.path(), one_worker("", "")).await;
    svc.seed(1, 5_000).await;
    let log = tmp.path().join("worker.log");
    let _w = svc.start("worker_panic:gen-100-000,rebuild_panic:gen-100-000", &log);
    eventually(60, "the process to be up", || async {
        http_get(svc.port, "/metrics").is_some()
    })
    .await;
    eventually(60, "/healthz to fail", || async {
        http_get(svc.port, "/healthz").is_some_and(|(status, _)| status == 503)
    })
    .await;
    assert_eq!(svc.metric(&["trailhose_workers_lost "]), 1.0);
    assert_eq!(
        svc.metric(&["trailhose_panics_total", "thread=\"worker\""]),
        1.0
    );
    let (status, body) = http_get(svc.port, "/readyz").expect("readyz");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("workers: every worker thread"), "{body}");
    assert!(body.contains("queue: ok"), "{body}");

    // A message sent now is never received here, and the failed one, once handed back,
    // stays on the queue too (several long polls and visibility timeouts).
    let key = format!("{DAY}/gen-100-000.json.gz");
    send(
        &svc.moto.sqs(),
        &svc.queue.url,
        &cloudtrail("trail-logs", &[&key]),
    )
    .await;
    eventually(30, "both messages to wait on the queue", || async {
        svc.depth().await == (2, 0)
    })
    .await;
    for _ in 0..16 {
        assert_eq!(svc.depth().await, (2, 0), "nothing is received any more");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Holds every UploadPart for a minute (then passes it on): a multipart upload that cannot
/// finish within the shutdown's grace period.
fn stall_parts(line: &str) -> Option<(&'static str, &'static str)> {
    if line.starts_with("PUT ") && line.contains("partNumber=") {
        std::thread::sleep(Duration::from_secs(60));
    }
    None
}

/// SIGTERM while a multipart upload is stuck: when the grace period ends, the upload is
/// aborted (no parts left in the bucket, a warning and a count), the message stays on the
/// queue for redelivery, and the worker exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_cut_off_by_the_grace_period_is_aborted() {
    let (moto, q) = setup("cutoff", 5).await;
    let proxy = common::faults::FaultProxy::start_refusing(
        moto.port,
        common::faults::Plan {
            fail_every: 0,
            slow_every: 0,
            delay: Duration::ZERO,
        },
        Some(stall_parts),
    );
    let tmp = TempDir::new("cutoff");
    let port = free_port();
    let settings = Settings {
        output: "compression = \"none\"\n".into(),
        ..Settings::default()
    };
    let proxied = proxy.endpoint();
    let config = write_config_with(
        tmp.path(),
        (&proxied, &moto.endpoint),
        &q.url,
        port,
        &settings,
    );
    // Multipart from 5 MiB and a 10 s grace period (the part stalls for 60 s).
    let text = std::fs::read_to_string(&config).unwrap();
    let changed = text
        .replace(
            "[output.s3]\n",
            "[output.s3]\nmultipart_threshold_bytes = 5242880\npart_size_bytes = 5242880\n",
        )
        .replace("shutdown_grace_secs = 20", "shutdown_grace_secs = 10");
    assert_eq!(
        changed.len(),
        text.len() + 62,
        "both settings replaced:\n{changed}"
    );
    std::fs::write(&config, changed).unwrap();
    // 8 MiB of events within a minute or two: one buffer, sealed by the shutdown.
    seed_generated(&moto, &q.url, 1, 77, 8 << 20).await;
    let log = tmp.path().join("worker.log");
    let mut worker = start_worker(&moto, &config, &log);
    eventually(60, "the file to be split", || async {
        metric(port, "trailhose_files_total{outcome=\"ok\"}") >= 1.0
    })
    .await;
    signal(&worker, "-TERM");
    let exited = tokio::task::spawn_blocking(move || {
        wait_exit(&mut worker, 60);
        worker
    });
    let _worker = exited.await.expect("join");
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    let calls: Vec<String> = proxy
        .seen()
        .iter()
        .map(|r| r.head.lines().next().unwrap_or("").to_owned())
        .collect();
    assert!(
        calls
            .iter()
            .any(|c| c.starts_with("PUT ") && c.contains("partNumber=")),
        "a part was being uploaded\n{calls:#?}\n{log_text}"
    );
    assert!(
        calls
            .iter()
            .any(|c| c.starts_with("DELETE ") && c.contains("uploadId=")),
        "the cut-off upload was aborted\n{calls:#?}\n{log_text}"
    );
    assert!(
        log_text.contains("multipart upload dropped before it completed"),
        "{log_text}"
    );
    let s3 = moto.s3();
    let open = s3
        .list_multipart_uploads()
        .bucket("trail-out")
        .send()
        .await
        .expect("list uploads");
    assert!(open.uploads().is_empty(), "parts left: {open:?}");
    assert!(s3_objects(&s3, "trail-out", "ct/").await.is_empty());
    // Not acknowledged: the message comes back.
    let sqs = moto.sqs();
    eventually(30, "the message to be visible again", || async {
        depth(&sqs, &q.url).await.0 == 1
    })
    .await;
}
