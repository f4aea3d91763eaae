//! `trailhose bench`: generated CloudTrail delivery files through the codec floor and through
//! the real pipeline, side by side in one run. Prints wall and CPU time, events/s and MB/s.
//! CPU seconds are what one core would need; the floor is gunzip + gzip of the same bytes.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::sink::encode::{self, Codec, Compression};
use crate::synth::Generator;

mod kinesis;
mod service;

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Decoded megabytes of CloudTrail JSON to generate.
    #[arg(long, default_value_t = 256)]
    pub mb: usize,
    /// Decoded megabytes per delivery file.
    #[arg(long, default_value_t = 4)]
    pub file_mb: usize,
    /// City database for the geo run (default: the demo database shipped in examples/geoip).
    #[arg(long, default_value = "examples/geoip/demo-city.mmdb")]
    pub geoip_db: PathBuf,
    /// Output gzip level, for the floor and the pipeline alike.
    #[arg(long, default_value_t = 6)]
    pub level: i32,
    /// Also run `process` on one file of this many decoded MB in a child process and report its
    /// peak RSS (0 = skip).
    #[arg(long, default_value_t = 0)]
    pub single_file_mb: usize,
    /// Working directory for generated input and output (default: a temp dir).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Where the transform modules are (built by scripts/build-transforms.sh); the transform
    /// rows are skipped when they are missing.
    #[arg(long, default_value = "target/transforms/wasm32-wasip2/release")]
    pub transforms_dir: PathBuf,
    /// Run only the rows whose names contain one of these comma-separated words (the codec
    /// floor and `pipeline, geo, gzip` always run), e.g. `--only kinesis,parquet`.
    #[arg(long)]
    pub only: Option<String>,
    /// Also drive the service path (`trailhose run`) through SQS, and S3 unless `--s3-endpoint`
    /// is given, at this endpoint, e.g. a local moto_server: see scripts/bench-service.sh.
    /// Credentials come from the environment.
    #[arg(long)]
    pub service_endpoint: Option<String>,
    /// S3 for the service path at this endpoint instead, e.g. a local s3s-fs, so that a slow
    /// SQS stand-in does not also serve every object.
    #[arg(long, requires = "service_endpoint")]
    pub s3_endpoint: Option<String>,
    /// A stand-in server's process as NAME=PID (repeatable): its CPU seconds over each service
    /// run are shown beside trailhose's, e.g. `--server-pid moto=123 --server-pid s3s-fs=456`.
    #[arg(long = "server-pid", value_name = "NAME=PID", value_parser = service::parse_server)]
    pub server_pids: Vec<service::Server>,
    /// Sigma rules (a file or folder, e.g. SigmaHQ's rules/cloud/aws) for the detection row;
    /// skipped when absent. Rules that do not compile are skipped, as with
    /// `detect.skip_invalid`.
    #[arg(long)]
    pub rules: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
    #[error(transparent)]
    Pipeline(#[from] crate::pipeline::PipelineError),
    /// A short input or a floor that compressed nothing would measure the wrong thing.
    #[error(transparent)]
    Compress(#[from] encode::CompressError),
}

fn io<T>(what: &str, r: std::io::Result<T>) -> Result<T, BenchError> {
    r.map_err(|e| BenchError::Io(what.to_owned(), e))
}

/// CPU seconds (user + system) this process has used so far.
fn cpu_seconds() -> f64 {
    proc_cpu_seconds("self").unwrap_or(0.0)
}

/// CPU seconds (user + system) that process `pid` (or `self`) has used so far, all its threads
/// together; `None` when it is gone or its stat does not read.
fn proc_cpu_seconds(pid: &str) -> Option<f64> {
    stat_cpu_seconds(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Clock ticks per second of /proc's times: USER_HZ, fixed at 100 by the kernel's ABI.
const TICKS_PER_SECOND: f64 = 100.0;

/// utime + stime, in seconds, from the text of a `/proc/PID/stat`.
fn stat_cpu_seconds(stat: &str) -> Option<f64> {
    // Counting from the state (field 3), utime (field 14) is the twelfth, stime the next.
    stat_tick_pair(stat, 11)
}

/// The sum, in seconds, of the two tick counts at `nth` and `nth + 1` counting from the state
/// (field 3) of a `/proc/PID/stat`.
fn stat_tick_pair(stat: &str, nth: usize) -> Option<f64> {
    // The command name (field 2) is in parentheses and may itself hold spaces and parentheses,
    // and nothing after it can hold ')': the numbered fields start after the last one.
    let (_, after_name) = stat.rsplit_once(')')?;
    let mut fields = after_name.split_whitespace();
    let first = fields.nth(nth)?.parse::<u64>().ok()?;
    let second = fields.next()?.parse::<u64>().ok()?;
    Some(first.saturating_add(second) as f64 / TICKS_PER_SECOND)
}

const KINESIS_IN: &str = "kinesis source: CloudWatch Logs records, geo, gzip";
const KINESIS_OUT: &str = "pipeline, geo, gzip, kinesis output (stand-in)";

struct Row {
    name: String,
    wall: Duration,
    cpu: f64,
}

struct Input {
    dir: PathBuf,
    files: Vec<PathBuf>,
    decoded: u64,
    stored: u64,
    events: u64,
}

pub fn run(args: &BenchArgs) -> Result<(), BenchError> {
    let work = match &args.dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("trailhose-bench-{}", std::process::id())),
    };
    let _ = std::fs::remove_dir_all(&work);
    let input = generate(&work.join("in"), args.mb, args.file_mb, 1)?;
    let mb = input.decoded as f64 / 1e6;
    println!(
        "trailhose bench: {} files, {:.1} MB decoded ({:.1} MB gzip), {} events, {:.0} B/event, {} cores",
        input.files.len(),
        mb,
        input.stored as f64 / 1e6,
        input.events,
        input.decoded as f64 / input.events as f64,
        std::thread::available_parallelism().map_or(1, |n| n.get()),
    );

    let mut rows = vec![floor_in_process(&input, args.level)?];
    if let Some(row) = floor_gnu_gzip(&input, args.level) {
        rows.push(row);
    }
    let rt = io(
        "runtime",
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build(),
    )?;
    let geo = args.geoip_db.exists().then(|| args.geoip_db.clone());
    if geo.is_none() {
        println!(
            "(no {} — the geo rows are skipped)",
            args.geoip_db.display()
        );
    }
    let module = |file: &str| {
        let p = args.transforms_dir.join(file);
        (cfg!(feature = "transforms") && p.is_file()).then_some(p)
    };
    let (identity, priority) = (module("identity.wasm"), module("priority_rules.wasm"));
    if !cfg!(feature = "transforms") {
        println!("(built without the `transforms` feature — the transform rows are skipped)");
    } else if identity.is_none() || priority.is_none() {
        println!(
            "(no modules in {} — the transform rows are skipped; run scripts/build-transforms.sh)",
            args.transforms_dir.display()
        );
    }
    let runs: Vec<(&str, Option<PathBuf>, Compression, Option<PathBuf>)> = vec![
        ("pipeline, no geo, gzip", None, Compression::Gzip, None),
        ("pipeline, geo, gzip", geo.clone(), Compression::Gzip, None),
        ("pipeline, geo, zstd", geo.clone(), Compression::Zstd, None),
        // An exact 10,000-row accounts table and a 50,000-range CIDR table.
        (
            "pipeline, geo, gzip, two table lookups",
            geo.clone(),
            Compression::Gzip,
            None,
        ),
        // Parses every event into the fixed schema: the cost of analyst-ready output.
        (
            "pipeline, geo, parquet (zstd)",
            geo.clone(),
            Compression::Zstd,
            None,
        ),
        // Every event mapped to an OCSF record: as JSON lines, and as per-class Parquet
        // sorted by time under Security Lake's layout.
        (
            "pipeline, geo, ocsf json (gzip)",
            geo.clone(),
            Compression::Gzip,
            None,
        ),
        (
            "pipeline, geo, ocsf parquet (zstd), security lake",
            geo.clone(),
            Compression::Zstd,
            None,
        ),
        (
            "pipeline, geo, gzip, identity module",
            geo.clone(),
            Compression::Gzip,
            identity,
        ),
        (
            "pipeline, geo, gzip, priority-rules",
            geo.clone(),
            Compression::Gzip,
            priority,
        ),
        // Every event parsed once more and run through the rules; no alert output.
        (
            "pipeline, geo, gzip, detections",
            geo.clone(),
            Compression::Gzip,
            None,
        ),
    ];
    // The geo gzip row always runs: the other rows' notes compare with it.
    let wanted = |name: &str| {
        name == "pipeline, geo, gzip"
            || args
                .only
                .as_deref()
                .is_none_or(|only| only.split(',').any(|w| name.contains(w.trim())))
    };
    if args.rules.is_none() {
        println!("(no --rules — the detection row is skipped)");
    }
    for (name, geo, compression, module) in runs {
        if (name.contains(", geo") && geo.is_none()) || !wanted(name) {
            continue;
        }
        let is_transform_row = name.contains("identity") || name.contains("priority");
        if is_transform_row && module.is_none() {
            continue;
        }
        if name.contains("parquet") && !cfg!(feature = "parquet") {
            continue;
        }
        let is_detect_row = name.ends_with("detections");
        if is_detect_row && args.rules.is_none() {
            continue;
        }
        let mut cfg = match &module {
            Some(path) => {
                let toml = format!(
                    "[[transforms]]\nname = \"bench\"\npath = {:?}\n",
                    path.display().to_string()
                );
                Config::parse(&toml).map_err(|e| {
                    BenchError::Io("transform config".into(), std::io::Error::other(e))
                })?
            }
            None => Config::default(),
        };
        cfg.output.url = Some(work.join("out").display().to_string());
        cfg.output.compression = Some(compression);
        cfg.output.level = (compression == Compression::Gzip).then_some(args.level);
        cfg.geoip.city_db = geo;
        if name.contains("parquet") {
            cfg.output.format = crate::sink::format::Format::Parquet;
        }
        if name.contains("ocsf") {
            cfg.output.schema = crate::sink::ocsf::Schema::Ocsf;
        }
        if name.contains("security lake") {
            cfg.output.security_lake = Some(crate::sink::ocsf::lake::SecurityLakeConfig {
                source_name: crate::sink::ocsf::lake::SourceName::Template("th-{class}".into()),
                account_id: None,
            });
        }
        if name.contains("table lookups") {
            cfg.enrich = bench_tables(&work)?;
        }
        if is_detect_row && let Some(rules) = &args.rules {
            cfg.detect = Some(crate::detect::config::DetectConfig {
                rules: vec![rules.clone()],
                skip_invalid: true,
                ..Default::default()
            });
        }
        let files = input.files.clone();
        let cpu0 = cpu_seconds();
        let t0 = Instant::now();
        let summary = rt.block_on(crate::pipeline::process(&cfg, &files))?;
        let wall = t0.elapsed();
        let cpu = cpu_seconds() - cpu0;
        assert_eq!(
            summary.written.event_records, input.events,
            "every generated event is written"
        );
        rows.push(Row {
            name: name.to_owned(),
            wall,
            cpu,
        });
        let _ = std::fs::remove_dir_all(work.join("out"));
    }

    // The Kinesis paths, against the same events: subscription records in, a stream out.
    if let Some(geo) = geo
        .clone()
        .filter(|_| wanted(KINESIS_IN) || wanted(KINESIS_OUT))
    {
        let mut cfg = Config::default();
        cfg.output.url = Some(work.join("out").display().to_string());
        cfg.output.compression = Some(Compression::Gzip);
        cfg.output.level = Some(args.level);
        cfg.geoip.city_db = Some(geo);
        if wanted(KINESIS_IN) {
            let records = kinesis::cwl_records(&input.files)?;
            let (row, written) = rt.block_on(kinesis::source_run(&cfg, &records, cfg.workers()))?;
            assert_eq!(written, records.events, "every generated event is written");
            rows.push(row);
            let _ = std::fs::remove_dir_all(work.join("out"));
        }
        let credentials = std::env::var_os("AWS_ACCESS_KEY_ID").is_some();
        if wanted(KINESIS_OUT) && credentials {
            cfg.output.kinesis = Some(crate::config::KinesisSinkConfig {
                stream: "bench".into(),
                region: Some("us-east-1".into()),
                endpoint_url: Some(kinesis::stand_in()?),
                ..Default::default()
            });
            let cpu0 = cpu_seconds();
            let t0 = Instant::now();
            let summary = rt.block_on(crate::pipeline::process(&cfg, &input.files))?;
            let (wall, cpu) = (t0.elapsed(), cpu_seconds() - cpu0);
            assert_eq!(
                summary.written.event_records, input.events,
                "every generated event is written"
            );
            rows.push(Row {
                name: KINESIS_OUT.to_owned(),
                wall,
                cpu,
            });
            let _ = std::fs::remove_dir_all(work.join("out"));
        } else if wanted(KINESIS_OUT) {
            println!(
                "(no AWS_ACCESS_KEY_ID in the environment — the Kinesis output row is skipped; any value will do)"
            );
        }
    }

    let mut service_runs = Vec::new();
    if let Some(sqs) = &args.service_endpoint {
        let endpoints = service::Endpoints {
            sqs: sqs.clone(),
            s3: args.s3_endpoint.clone().unwrap_or_else(|| sqs.clone()),
        };
        // The shipped batch age, ended by the shutdown drain once every file is split, then a
        // 1 s age, ended when the buffers have aged out and the queue is empty.
        let ends = [
            (
                Config::default().batch.max_age_secs,
                service::End::ShutdownDrain,
            ),
            (1, service::End::QueueEmpty),
        ];
        for (max_age, end) in ends {
            let run = rt.block_on(service::run(
                &endpoints,
                &args.server_pids,
                &input,
                geo.clone(),
                max_age,
                end,
            ))?;
            assert_eq!(
                run.written, input.events,
                "every generated event is written"
            );
            rows.push(Row {
                name: format!("service: S3 + SQS, geo, gzip, max_age {max_age}"),
                wall: run.drained,
                cpu: run.cpu,
            });
            service_runs.push(run);
        }
    }

    let row = |name: &str| rows.iter().find(|r| r.name == name);
    if let (Some(base), Some(t)) = (
        row("pipeline, geo, gzip"),
        row("pipeline, geo, gzip, two table lookups"),
    ) {
        println!(
            "tables: two lookups keep {:.0}% of the events per CPU-second",
            100.0 * base.cpu / t.cpu.max(1e-9)
        );
    }
    if let (Some(base), Some(d)) = (
        row("pipeline, geo, gzip"),
        row("pipeline, geo, gzip, detections"),
    ) {
        println!(
            "detections: {} rules keep {:.0}% of the events per CPU-second ({:.2} µs/event of CPU)",
            crate::metrics::detect_rules(),
            100.0 * base.cpu / d.cpu.max(1e-9),
            (d.cpu - base.cpu) * 1e6 / input.events as f64,
        );
    }
    let transform_note = match (
        row("pipeline, geo, gzip"),
        row("pipeline, geo, gzip, identity module"),
        row("pipeline, geo, gzip, priority-rules"),
    ) {
        (Some(base), Some(id), Some(pr)) => Some(format!(
            "transforms: priority-rules keeps {:.0}% of the events/s without transforms \
             ({:.0}% of the events per CPU-second); host overhead of a module (identity) \
             {:.2} µs/event of CPU",
            100.0 * base.wall.as_secs_f64() / pr.wall.as_secs_f64().max(1e-9),
            100.0 * base.cpu / pr.cpu.max(1e-9),
            (id.cpu - base.cpu) * 1e6 / input.events as f64,
        )),
        _ => None,
    };
    let kinesis_note = row("pipeline, geo, gzip").map(|base| {
        let mut note = String::new();
        if let Some(k) = row(KINESIS_IN) {
            note.push_str(&format!(
                "kinesis source: {:.0}% of the events/s of delivery files ({:.0}% of the events per CPU-second)",
                100.0 * base.wall.as_secs_f64() / k.wall.as_secs_f64().max(1e-9),
                100.0 * base.cpu / k.cpu.max(1e-9),
            ));
        }
        if let Some(k) = row(KINESIS_OUT) {
            note.push_str(&format!(
                "\nkinesis output: {:.2} µs/event of CPU over the same run without it",
                (k.cpu - base.cpu) * 1e6 / input.events as f64,
            ));
        }
        note
    });
    let floor_cpu = rows[0].cpu.max(1e-9);
    println!();
    // The name column fits the longest row name, so that the figures line up.
    let width = rows
        .iter()
        .map(|r| r.name.chars().count())
        .fold(42, usize::max);
    println!(
        "{:<width$} {:>8} {:>8} {:>12} {:>10} {:>13} {:>10}",
        "run", "wall s", "cpu s", "events/s", "MB/s", "MB/s/core", "cpu÷floor"
    );
    for r in &rows {
        let wall = r.wall.as_secs_f64().max(1e-9);
        println!(
            "{:<width$} {:>8.2} {:>8.2} {:>12.0} {:>10.1} {:>13.1} {:>10.2}",
            r.name,
            wall,
            r.cpu,
            input.events as f64 / wall,
            mb / wall,
            mb / r.cpu.max(1e-9),
            r.cpu / floor_cpu
        );
    }
    println!(
        "(MB = decoded CloudTrail JSON; MB/s/core = MB per CPU-second, i.e. the speed on one core)"
    );
    if let Some(note) = transform_note {
        println!("{note}");
    }
    if let Some(note) = kinesis_note.filter(|n| !n.is_empty()) {
        println!("{note}");
    }
    if !service_runs.is_empty() {
        service::print(
            &service_runs,
            &input,
            row("pipeline, geo, gzip").map(|r| r.cpu),
        );
    }

    if args.single_file_mb > 0 {
        let big = generate(
            &work.join("big"),
            args.single_file_mb,
            args.single_file_mb,
            99,
        )?;
        let (wall, rss) = child_peak_rss(&big.dir, &work.join("big-out"), &args.geoip_db)?;
        println!(
            "single file: {:.0} MB decoded, {} events: process took {:.2}s, peak RSS {:.1} MiB",
            big.decoded as f64 / 1e6,
            big.events,
            wall.as_secs_f64(),
            rss as f64 / 1024.0
        );
    }
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}

/// Writes delivery files (gzip, as CloudTrail does) under `dir` in the delivery layout.
fn generate(dir: &Path, mb: usize, file_mb: usize, seed: u64) -> Result<Input, BenchError> {
    let day = dir.join("AWSLogs/123456789012/CloudTrail/us-east-1/2024/03/18");
    io("creating the input dir", std::fs::create_dir_all(&day))?;
    let mut gen_ = Generator::new(seed);
    let total = mb.max(1) << 20;
    let per_file = file_mb.max(1) << 20;
    let codec = Codec {
        kind: Compression::Gzip,
        level: 6,
    };
    let mut input = Input {
        dir: dir.to_owned(),
        files: Vec::new(),
        decoded: 0,
        stored: 0,
        events: 0,
    };
    let mut i = 0;
    while (input.decoded as usize) < total {
        let json = gen_.delivery_file(per_file.min(total - input.decoded as usize));
        input.events += count_events(&json);
        input.decoded += json.len() as u64;
        let mut gz: Vec<u8> = Vec::new();
        for c in json.chunks(4 << 20) {
            gz.extend(encode::compress(codec, c)?);
        }
        input.stored += gz.len() as u64;
        let path = day.join(format!(
            "123456789012_CloudTrail_us-east-1_20240318T{:04}Z_{i:08}.json.gz",
            1400 + i % 60
        ));
        io("writing input", std::fs::write(&path, gz))?;
        input.files.push(path);
        i += 1;
    }
    Ok(input)
}

/// The tables of the lookup row: every generated account among 10,000 rows, and 50,000 /24
/// ranges spread over the IPv4 space with 500 /16s over some of them (two prefix lengths,
/// overlapping), keyed by `sourceIPAddress`.
fn bench_tables(work: &Path) -> Result<crate::config::enrich::EnrichConfig, BenchError> {
    use std::fmt::Write as _;
    let mut accounts = String::from("account_id,name,env\n");
    for a in crate::synth::ACCOUNTS {
        let _ = writeln!(accounts, "{a},known-{a},prod");
    }
    for i in 0..(10_000 - crate::synth::ACCOUNTS.len() as u64) {
        let _ = writeln!(accounts, "{:012},acct-{i},dev", 100_000_000_000 + i * 7919);
    }
    let mut ranges = String::from("cidr,label\n");
    for i in 0..50_000u32 {
        // Multiplying by an odd number is a bijection mod 2^24: no range repeats.
        let net = (i.wrapping_mul(2_654_435_761) & 0xff_ffff) << 8;
        let _ = writeln!(ranges, "{}/24,net-{i}", std::net::Ipv4Addr::from(net));
    }
    for i in 0..500u32 {
        let net = (i.wrapping_mul(2_246_822_519) & 0xffff) << 16;
        let _ = writeln!(ranges, "{}/16,wide-{i}", std::net::Ipv4Addr::from(net));
    }
    io("tables dir", std::fs::create_dir_all(work.join("tables")))?;
    let (a, r) = (
        work.join("tables/accounts.csv"),
        work.join("tables/ranges.csv"),
    );
    io("accounts table", std::fs::write(&a, accounts))?;
    io("ranges table", std::fs::write(&r, ranges))?;
    let toml = format!(
        "reload_secs = 0\n[[tables]]\nname = \"accounts\"\npath = {:?}\nkey = \"account_id\"\n\
         [[tables]]\nname = \"ranges\"\npath = {:?}\nkey = \"cidr\"\nmatch = \"cidr\"\n\
         [[lookups]]\ntable = \"accounts\"\nfrom = \"recipientAccountId\"\nadd = {{ account = [\"name\", \"env\"] }}\n\
         [[lookups]]\ntable = \"ranges\"\nfrom = \"sourceIPAddress\"\nadd = {{ network = [\"label\"] }}\n",
        a.display().to_string(),
        r.display().to_string()
    );
    toml::from_str(&toml)
        .map_err(|e| BenchError::Io("tables config".into(), std::io::Error::other(e)))
}

fn count_events(json: &[u8]) -> u64 {
    // Generated events never contain `"eventVersion":` inside a string.
    memchr::memmem::find_iter(json, b"{\"eventVersion\":").count() as u64
}

/// gunzip (flate2/zlib-rs) + gzip (libdeflate, 4 MiB members) of the same bytes, one thread.
fn floor_in_process(input: &Input, level: i32) -> Result<Row, BenchError> {
    let codec = Codec {
        kind: Compression::Gzip,
        level,
    };
    let cpu0 = cpu_seconds();
    let t0 = Instant::now();
    let mut buf = Vec::new();
    let mut out_bytes = 0usize;
    for f in &input.files {
        let gz = io("reading input", std::fs::read(f))?;
        buf.clear();
        io(
            "gunzip",
            flate2::read::MultiGzDecoder::new(&gz[..]).read_to_end(&mut buf),
        )?;
        for chunk in buf.chunks(4 << 20) {
            out_bytes += encode::compress(codec, chunk)?.len();
        }
    }
    std::hint::black_box(out_bytes);
    Ok(Row {
        name: format!("codec floor: gunzip + libdeflate -{level}, 1 thread"),
        wall: t0.elapsed(),
        cpu: cpu_seconds() - cpu0,
    })
}

/// `gzip -dc | gzip -N` with GNU gzip, if installed: the floor named in the project brief.
fn floor_gnu_gzip(input: &Input, level: i32) -> Option<Row> {
    let t0 = Instant::now();
    let mut dc = Command::new("gzip")
        .arg("-dc")
        .args(&input.files)
        .stdout(Stdio::piped())
        .spawn()
        .ok()?;
    let mut c = Command::new("gzip")
        .arg(format!("-{}", level.clamp(1, 9)))
        .stdin(dc.stdout.take()?)
        .stdout(Stdio::null())
        .spawn()
        .ok()?;
    c.wait().ok()?;
    dc.wait().ok()?;
    let wall = t0.elapsed();
    // Both processes' CPU time: from /proc of finished children is not available without
    // wait4; the pipe runs them concurrently, so the sum is about each one's wall time.
    let cpu = child_cpu_seconds().unwrap_or(wall.as_secs_f64() * 2.0);
    Some(Row {
        name: format!("codec floor: GNU gzip -dc | gzip -{}", level.clamp(1, 9)),
        wall,
        cpu,
    })
}

/// CPU seconds of reaped children so far (cutime + cstime), reset-free: callers diff it.
fn child_cpu_seconds() -> Option<f64> {
    static SEEN: std::sync::Mutex<f64> = std::sync::Mutex::new(0.0);
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // cutime and cstime (fields 16 and 17).
    let total = stat_tick_pair(&stat, 13)?;
    let mut seen = SEEN.lock().ok()?;
    let delta = total - *seen;
    *seen = total;
    Some(delta)
}

/// Runs `trailhose process` on `input` in a child and samples its peak RSS (VmHWM) until exit.
fn child_peak_rss(input: &Path, out: &Path, geo: &Path) -> Result<(Duration, u64), BenchError> {
    let exe = io("locating the trailhose binary", std::env::current_exe())?;
    let mut cmd = Command::new(exe);
    cmd.arg("process").arg(input).arg("--out").arg(out);
    if geo.exists() {
        cmd.arg("--geoip-db").arg(geo);
    }
    let t0 = Instant::now();
    let mut child = io("starting process", cmd.stdout(Stdio::null()).spawn())?;
    let status_path = format!("/proc/{}/status", child.id());
    let mut peak = 0u64;
    loop {
        if let Some(kb) = std::fs::read_to_string(&status_path)
            .ok()
            .and_then(|status| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix("VmHWM:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            })
        {
            peak = peak.max(kb);
        }
        if io("waiting for process", child.try_wait())?.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = std::io::stdout().flush();
    let _ = std::fs::remove_dir_all(out);
    Ok((t0.elapsed(), peak))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_seconds_from_a_stat_line_whose_name_holds_spaces_and_parens() {
        // A thread renamed to "a) b (c" by prctl: the name's own ')' must not end it.
        let stat = "4242 (a) b (c) S 1 4242 4242 0 -1 4194560 1234 0 0 0 \
                    250 75 0 0 20 0 9 0 123456 987654321 4321 18446744073709551615 \
                    1 1 0 0 0 0 0 4096 0 0 0 17 1 0 0 0 0 0";
        assert_eq!(stat_cpu_seconds(stat), Some(3.25));
        assert_eq!(stat_cpu_seconds("4242 (short) S 1 2"), None);
        assert_eq!(stat_cpu_seconds("no name at all"), None);
        assert!(proc_cpu_seconds("self").is_some_and(|s| s >= 0.0));
        assert_eq!(proc_cpu_seconds("0"), None);
    }
}
