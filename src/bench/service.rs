//! The service rows of `trailhose bench`: the generated delivery files in S3, one notification
//! each on SQS, and `trailhose run` in-process until every message is acknowledged. Beside
//! trailhose's own CPU seconds it reads each stand-in server's from `/proc`, so that a reader
//! sees whether the wall time goes to trailhose or to the servers it talks to.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::{BenchError, Input, TICKS_PER_SECOND, cpu_seconds, io, proc_cpu_seconds};
use crate::config::Config;

/// A stand-in server's process, named as the report shows it (`moto`, `s3s-fs`).
#[derive(Debug, Clone, PartialEq)]
pub struct Server {
    pub name: String,
    pub pid: u32,
}

/// Parses `NAME=PID`, as `--server-pid` takes it.
pub(super) fn parse_server(arg: &str) -> Result<Server, String> {
    let (name, pid) = arg
        .split_once('=')
        .ok_or_else(|| format!("{arg:?}: expected NAME=PID"))?;
    let name = name.trim();
    if name.is_empty() {
        return Err(format!("{arg:?}: the name is empty"));
    }
    let pid = pid
        .trim()
        .parse::<u32>()
        .map_err(|e| format!("{arg:?}: the PID: {e}"))?;
    Ok(Server {
        name: name.to_owned(),
        pid,
    })
}

/// Where the service run finds its AWS stand-ins: S3 may be a different server from SQS.
pub(super) struct Endpoints {
    pub sqs: String,
    pub s3: String,
}

/// How a run decides it is over.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum End {
    /// Until the queue is empty: every buffer was sealed by its age or its size while the
    /// service ran on.
    QueueEmpty,
    /// Shut down once every file is split: the shutdown drain seals and writes the buffers
    /// still waiting for their age. At the shipped 300 s age, waiting for the queue to empty
    /// would time five idle minutes, not trailhose.
    ShutdownDrain,
}

impl End {
    fn label(self) -> &'static str {
        match self {
            End::QueueEmpty => "age",
            End::ShutdownDrain => "shutdown",
        }
    }
}

/// One service run of the benchmark.
pub(super) struct ServiceRun {
    pub max_age: u64,
    pub end: End,
    pub written: u64,
    /// Until every file was split and buffered.
    split: Duration,
    /// Until `trailhose run` returned with every message acknowledged.
    pub drained: Duration,
    /// trailhose's CPU seconds over `drained` (the in-process AWS clients included).
    pub cpu: f64,
    /// The stand-ins' names, in the order of `Cpu::servers`.
    names: Vec<String>,
    /// What each process used over `drained`, and over `split` alone.
    total: Cpu,
    splitting: Cpu,
    peak_unacked: i64,
    ack_p50: f64,
    ack_p99: f64,
    /// Messages still on the queue once the run was over (0 unless something was lost).
    left: Option<u64>,
}

/// CPU seconds of trailhose and of each stand-in; a server's is `None` when its `/proc` entry
/// could not be read (not running, or on another machine).
#[derive(Debug, Clone, Default)]
struct Cpu {
    trailhose: f64,
    servers: Vec<Option<f64>>,
    /// The whole machine's busy CPU seconds, all cores and processes together: what is
    /// neither trailhose nor a stand-in is someone else's (a build on a shared machine).
    machine: Option<f64>,
}

/// Busy CPU seconds of the machine from the text of `/proc/stat`: every time in its `cpu`
/// line but idle and iowait.
fn machine_busy_seconds(stat: &str) -> Option<f64> {
    let mut fields = stat.lines().next()?.split_whitespace();
    if fields.next()? != "cpu" {
        return None;
    }
    let ticks = fields
        .map(|f| f.parse::<u64>().ok())
        .collect::<Option<Vec<u64>>>()?;
    // user nice system idle iowait irq softirq steal; guest time after them is already
    // counted in user.
    let total = ticks.iter().take(8).fold(0u64, |a, t| a.saturating_add(*t));
    let idle = ticks
        .get(3)?
        .saturating_add(ticks.get(4).copied().unwrap_or(0));
    Some(total.saturating_sub(idle) as f64 / TICKS_PER_SECOND)
}

impl Cpu {
    /// What each process has used so far.
    fn now(servers: &[Server]) -> Cpu {
        Cpu {
            trailhose: cpu_seconds(),
            servers: servers
                .iter()
                .map(|s| proc_cpu_seconds(&s.pid.to_string()))
                .collect(),
            machine: std::fs::read_to_string("/proc/stat")
                .ok()
                .and_then(|s| machine_busy_seconds(&s)),
        }
    }

    /// What each process used from `self` to `later`.
    fn until(&self, later: &Cpu) -> Cpu {
        Cpu {
            trailhose: later.trailhose - self.trailhose,
            servers: self
                .servers
                .iter()
                .zip(&later.servers)
                .map(|(a, b)| a.zip(*b).map(|(a, b)| b - a))
                .collect(),
            machine: self.machine.zip(later.machine).map(|(a, b)| b - a),
        }
    }
}

/// What the benchmark reads from the process's own metrics while the service runs.
#[derive(Debug, Default, Clone, PartialEq)]
struct Gauges {
    files: f64,
    unacked: i64,
    /// Acknowledgement latency histogram: (upper bound, cumulative count).
    ack: Vec<(f64, f64)>,
}

fn gauges(text: &str) -> Gauges {
    let mut g = Gauges::default();
    for line in text.lines() {
        let Some((name, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(v) = value.parse::<f64>() else {
            continue;
        };
        if name.starts_with("trailhose_files_total{") {
            g.files += v;
        } else if name == "trailhose_sqs_messages_in_flight" {
            g.unacked = v as i64;
        } else if let Some(le) = name
            .strip_prefix("trailhose_sqs_ack_seconds_bucket{le=\"")
            .and_then(|r| r.strip_suffix("\"}"))
        {
            let bound = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().unwrap_or(f64::INFINITY)
            };
            g.ack.push((bound, v));
        }
    }
    g
}

/// The `q` quantile of the latencies observed between two snapshots of the histogram,
/// interpolated within its bucket as Prometheus' histogram_quantile does.
fn quantile(before: &[(f64, f64)], after: &[(f64, f64)], q: f64) -> f64 {
    let counts: Vec<(f64, f64)> = after
        .iter()
        .map(|(le, c)| {
            let b = before
                .iter()
                .find(|(l, _)| l == le)
                .map_or(0.0, |(_, c)| *c);
            (*le, c - b)
        })
        .collect();
    let total = counts.last().map_or(0.0, |(_, c)| *c);
    if total <= 0.0 {
        return 0.0;
    }
    let rank = q * total;
    let (mut lower, mut below) = (0.0, 0.0);
    for (le, c) in counts {
        if c >= rank {
            if le.is_infinite() {
                return lower;
            }
            let within = (c - below).max(1e-9);
            return lower + (le - lower) * (rank - below) / within;
        }
        (lower, below) = (le, c);
    }
    lower
}

fn fail(what: &str, e: impl std::fmt::Display) -> BenchError {
    BenchError::Io(what.to_owned(), std::io::Error::other(e.to_string()))
}

/// Visible plus in-flight messages, `None` when the queue could not be asked.
async fn queue_depth(sqs: &aws_sdk_sqs::Client, queue_url: &str) -> Option<u64> {
    use aws_sdk_sqs::types::QueueAttributeName as A;
    let attrs = sqs
        .get_queue_attributes()
        .queue_url(queue_url)
        .attribute_names(A::ApproximateNumberOfMessages)
        .attribute_names(A::ApproximateNumberOfMessagesNotVisible)
        .send()
        .await
        .ok()?
        .attributes?;
    Some(
        attrs
            .iter()
            .filter(|(k, _)| {
                matches!(
                    k,
                    A::ApproximateNumberOfMessages | A::ApproximateNumberOfMessagesNotVisible
                )
            })
            .filter_map(|(_, v)| v.parse::<u64>().ok())
            .sum(),
    )
}

/// Uploads the files to S3 and announces each on SQS (untimed), then runs the service at
/// `max_age` until `end` (timed), sampling the metrics, and reads every stand-in's CPU
/// seconds around the timed part.
pub(super) async fn run(
    endpoints: &Endpoints,
    servers: &[Server],
    input: &Input,
    geo: Option<PathBuf>,
    max_age: u64,
    end: End,
) -> Result<ServiceRun, BenchError> {
    use crate::config::{BucketConfig, SqsConfig};
    let s3_shared = crate::aws::config(None, Some(&endpoints.s3)).await;
    let s3 = aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::config::Builder::from(&s3_shared)
            .force_path_style(true)
            .build(),
    );
    let sqs = aws_sdk_sqs::Client::new(&crate::aws::config(None, Some(&endpoints.sqs)).await);
    // A v7 UUID's last digits are random (its first ones a clock that ticks every 65 s, too
    // slow for two runs a second apart): fresh names per run on a long-lived stand-in.
    let run_id = uuid::Uuid::now_v7().simple().to_string();
    let tag = run_id
        .get(run_id.len().saturating_sub(8)..)
        .unwrap_or(&run_id);
    let (src, out) = (format!("bench-src-{tag}"), format!("bench-out-{tag}"));
    for b in [&src, &out] {
        s3.create_bucket()
            .bucket(b)
            .send()
            .await
            .map_err(|e| fail("create bucket", aws_sdk_s3::error::DisplayErrorContext(e)))?;
    }
    let queue_url = sqs
        .create_queue()
        .queue_name(format!("bench-{tag}"))
        .send()
        .await
        .map_err(|e| fail("create queue", aws_sdk_sqs::error::DisplayErrorContext(e)))?
        .queue_url
        .unwrap_or_default();
    for f in &input.files {
        let key = f
            .strip_prefix(&input.dir)
            .unwrap_or(f)
            .to_string_lossy()
            .into_owned();
        let body = io("reading input", std::fs::read(f))?;
        s3.put_object()
            .bucket(&src)
            .key(&key)
            .body(body.into())
            .send()
            .await
            .map_err(|e| fail("upload", aws_sdk_s3::error::DisplayErrorContext(e)))?;
        let note = serde_json::json!({"s3Bucket": src, "s3ObjectKey": [key]}).to_string();
        sqs.send_message()
            .queue_url(&queue_url)
            .message_body(note)
            .send()
            .await
            .map_err(|e| fail("send", aws_sdk_sqs::error::DisplayErrorContext(e)))?;
    }
    let mut cfg = Config::default();
    cfg.output.url = Some(format!("s3://{out}/"));
    cfg.output.s3.endpoint_url = Some(endpoints.s3.clone());
    cfg.output.s3.force_path_style = true;
    cfg.geoip.city_db = geo;
    cfg.batch.max_age_secs = max_age;
    cfg.server.listen = "127.0.0.1:0".into();
    cfg.server.shutdown_grace_secs = 60;
    cfg.source.sqs = Some(SqsConfig {
        queue_url: queue_url.clone(),
        endpoint_url: Some(endpoints.sqs.clone()),
        wait_time_secs: 1,
        ..SqsConfig::default()
    });
    cfg.source.buckets = vec![BucketConfig {
        name: src.clone(),
        endpoint_url: Some(endpoints.s3.clone()),
        force_path_style: true,
        ..BucketConfig::default()
    }];
    let files = input.files.len() as f64;
    let base = gauges(&crate::metrics::METRICS.render());
    // When every file was split, with the CPU used by then, and the peak of unacknowledged
    // messages.
    let sampled = std::sync::Mutex::new((None::<(Duration, Cpu)>, 0i64));
    let t0 = Instant::now();
    let over = async {
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let now = gauges(&crate::metrics::METRICS.render());
            let split = match sampled.lock() {
                Ok(mut s) => {
                    s.1 = s.1.max(now.unacked);
                    if s.0.is_none() && now.files - base.files >= files {
                        s.0 = Some((t0.elapsed(), Cpu::now(servers)));
                    }
                    s.0.is_some()
                }
                Err(_) => false,
            };
            // No message is deleted before its file is split, so the queue is asked only
            // from then on: polling it earlier would only load the SQS stand-in.
            if split
                && (end == End::ShutdownDrain || queue_depth(&sqs, &queue_url).await == Some(0))
            {
                break;
            }
        }
    };
    let cpu0 = Cpu::now(servers);
    let report = crate::pipeline::service::run(&cfg, over).await?;
    let drained = t0.elapsed();
    let total = cpu0.until(&Cpu::now(servers));
    if !report.clean {
        return Err(fail(
            "service run",
            "the shutdown grace period ran out before every buffer was written",
        ));
    }
    let (split, peak_unacked) = sampled.into_inner().unwrap_or((None, 0));
    let (split, splitting) =
        split.map_or((drained, total.clone()), |(at, cpu)| (at, cpu0.until(&cpu)));
    let end_gauges = gauges(&crate::metrics::METRICS.render());
    let left = queue_depth(&sqs, &queue_url).await;
    Ok(ServiceRun {
        max_age,
        end,
        written: report.written.event_records,
        split,
        drained,
        cpu: total.trailhose,
        names: servers.iter().map(|s| s.name.clone()).collect(),
        total,
        splitting,
        peak_unacked,
        ack_p50: quantile(&base.ack, &end_gauges.ack, 0.5),
        ack_p99: quantile(&base.ack, &end_gauges.ack, 0.99),
        left,
    })
}

/// The service tables: throughput and acknowledgement, then where the wall time went, with
/// trailhose's CPU per MB over the local pipeline's (`local_cpu`, same input) as `cpu÷local`.
pub(super) fn print(runs: &[ServiceRun], input: &Input, local_cpu: Option<f64>) {
    let mb = input.decoded as f64 / 1e6;
    println!();
    println!(
        "{:<20} {:>8} {:>9} {:>8} {:>10} {:>13} {:>10} {:>10} {:>10}",
        "service (S3 + SQS)",
        "max_age",
        "ends by",
        "files/s",
        "events/s",
        "peak unacked",
        "ack p50 s",
        "ack p99 s",
        "drained s"
    );
    for r in runs {
        let split = r.split.as_secs_f64().max(1e-9);
        println!(
            "{:<20} {:>8} {:>9} {:>8.1} {:>10.0} {:>13} {:>10.1} {:>10.1} {:>10.2}",
            "geo, gzip",
            r.max_age,
            r.end.label(),
            input.files.len() as f64 / split,
            input.events as f64 / split,
            r.peak_unacked,
            r.ack_p50,
            r.ack_p99,
            r.drained.as_secs_f64()
        );
    }
    println!(
        "(files/s, events/s: until every file is received, split and buffered; ack: receive to \
         delete; drained: until every message is deleted; ends by age: the queue emptied as \
         buffers aged out; by shutdown: the service was stopped once every file was split and \
         its shutdown drain wrote the buffers)"
    );
    for r in runs {
        if r.left != Some(0) {
            println!(
                "warning: max_age {}: {} messages left on the queue after the run",
                r.max_age,
                r.left
                    .map_or("an unknown number of".to_owned(), |n| n.to_string())
            );
        }
    }

    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cell = |cpu: Option<f64>| cpu.map_or("-".to_owned(), |c| format!("{c:.2}"));
    let names: Vec<&str> = runs
        .first()
        .map(|r| r.names.iter().map(String::as_str).collect())
        .unwrap_or_default();
    let mut header = format!(
        "{:<20} {:>8} {:>8} {:>10} {:>16}",
        "where the wall goes", "max_age", "split s", "drained s", "trailhose cpu s"
    );
    for n in &names {
        header.push_str(&format!(" {:>14}", format!("{n} cpu s")));
    }
    header.push_str(&format!(" {:>10} {:>10}", "cpu ms/MB", "cpu÷local"));
    println!();
    println!("{header}");
    for r in runs {
        let mut line = format!(
            "{:<20} {:>8} {:>8.2} {:>10.2} {:>16}",
            "geo, gzip",
            r.max_age,
            r.split.as_secs_f64(),
            r.drained.as_secs_f64(),
            cell(Some(r.total.trailhose))
        );
        for cpu in &r.total.servers {
            line.push_str(&format!(" {:>14}", cell(*cpu)));
        }
        let ratio = local_cpu.map_or("-".to_owned(), |l| format!("{:.2}", r.cpu / l.max(1e-9)));
        line.push_str(&format!(
            " {:>10.1} {:>10}",
            1e3 * r.cpu / mb.max(1e-9),
            ratio
        ));
        println!("{line}");
    }
    println!(
        "(cpu s: user + system from the start of `trailhose run` until drained; cpu÷local: \
         trailhose's CPU per MB over `pipeline, geo, gzip` on the same files)"
    );
    // Cores kept busy per phase: a process near all of them is the limit; idle cores mean
    // everyone waited (on the batch age, a long poll, or each other).
    for r in runs {
        let phase = |what: &str, secs: f64, cpu: &Cpu| {
            let secs = secs.max(1e-9);
            let mut text = format!(
                "{what} ({secs:.2} s): trailhose {:.2}",
                cpu.trailhose / secs
            );
            let mut busy = cpu.trailhose;
            for (n, c) in names.iter().zip(&cpu.servers) {
                match c {
                    Some(c) => {
                        text.push_str(&format!(", {n} {:.2}", c / secs));
                        busy += c;
                    }
                    None => text.push_str(&format!(", {n} -")),
                }
            }
            match cpu.machine {
                Some(m) => text.push_str(&format!(
                    ", the rest of the machine {:.2}, idle {:.2} of {cores} cores",
                    ((m - busy) / secs).max(0.0),
                    (cores as f64 - m / secs).max(0.0)
                )),
                None => text.push_str(&format!(
                    ", idle or another's {:.2} of {cores} cores",
                    (cores as f64 - busy / secs).max(0.0)
                )),
            }
            text
        };
        let rest = r.splitting.until(&r.total);
        println!(
            "max_age {}: {}; {}",
            r.max_age,
            phase("splitting", r.split.as_secs_f64(), &r.splitting),
            phase(
                match r.end {
                    End::QueueEmpty => "then aging out and deleting",
                    End::ShutdownDrain => "then the shutdown drain",
                },
                (r.drained - r.split.min(r.drained)).as_secs_f64(),
                &rest
            )
        );
    }
    if !runs.is_empty() {
        println!(
            "(per phase, in cores: CPU seconds over the phase's wall seconds; the rest of the \
             machine: every other process on it)"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_from_histogram_deltas() {
        let before = vec![(1.0, 2.0), (10.0, 2.0), (f64::INFINITY, 2.0)];
        let after = vec![(1.0, 2.0), (10.0, 102.0), (f64::INFINITY, 102.0)];
        let p50 = quantile(&before, &after, 0.5);
        assert!((p50 - 5.5).abs() < 1e-9, "{p50}");
        assert_eq!(quantile(&before, &before, 0.5), 0.0);
        let g = gauges(
            "trailhose_files_total{outcome=\"ok\"} 3\ntrailhose_files_total{outcome=\"error\"} 1\ntrailhose_sqs_messages_in_flight 7\ntrailhose_sqs_ack_seconds_bucket{le=\"0.5\"} 4\ntrailhose_sqs_ack_seconds_bucket{le=\"+Inf\"} 9\n",
        );
        assert_eq!(g.files, 4.0);
        assert_eq!(g.unacked, 7);
        assert_eq!(g.ack, vec![(0.5, 4.0), (f64::INFINITY, 9.0)]);
    }

    #[test]
    fn machine_busy_time_leaves_out_idle_and_iowait() {
        let stat = "cpu  1000 50 300 9000 200 10 40 0 70 0\ncpu0 500 25 150 4500 100 5 20 0 35 0\n";
        assert_eq!(machine_busy_seconds(stat), Some(14.0));
        assert_eq!(machine_busy_seconds("cpu0 1 2 3 4\n"), None);
        assert_eq!(machine_busy_seconds("cpu 1 2 x 4\n"), None);
        assert_eq!(machine_busy_seconds(""), None);
    }

    #[test]
    fn server_pids_parse_as_name_and_pid() {
        assert_eq!(
            parse_server("s3s-fs=4242"),
            Ok(Server {
                name: "s3s-fs".into(),
                pid: 4242
            })
        );
        assert!(parse_server("moto").is_err());
        assert!(parse_server("=12").is_err());
        assert!(parse_server("moto=-1").is_err());
        assert!(parse_server("moto=").is_err());
    }
}
