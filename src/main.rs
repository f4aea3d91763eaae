use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use trailhose::config::Config;
use trailhose::sink::encode::Compression;

/// trailhose: AWS CloudTrail delivery files in; geo-enriched, time-partitioned, compressed
/// objects out.
#[derive(Parser)]
#[command(version = env!("TRAILHOSE_VERSION_LINE"), about)]
struct Cli {
    /// Log format.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        env = "TRAILHOSE_LOG_FORMAT"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Process local delivery files (files and directories, walked recursively).
    Process {
        /// Files or directories in CloudTrail's delivery layout (`.json.gz` or `.json`).
        #[arg(required = true)]
        inputs: Vec<PathBuf>,
        /// Output: a directory or s3://bucket/prefix (overrides output.url).
        #[arg(long)]
        out: Option<String>,
        /// MaxMind-format city database (overrides geoip.city_db).
        #[arg(long)]
        geoip_db: Option<PathBuf>,
        /// MaxMind-format ASN database (overrides geoip.asn_db).
        #[arg(long)]
        asn_db: Option<PathBuf>,
        /// Output compression (overrides output.compression).
        #[arg(long, value_enum)]
        compression: Option<Compression>,
        /// TOML configuration file.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Write the Prometheus text exposition here at the end.
        #[arg(long)]
        metrics_file: Option<PathBuf>,
        /// No progress line (it is drawn only when stderr is a terminal).
        #[arg(long, short)]
        quiet: bool,
    },
    /// Service mode: share CloudTrail notifications from SQS with other workers, fetch from
    /// S3, write to the output, acknowledge only what is written. Stops cleanly on SIGTERM.
    Run {
        /// TOML configuration file (needs [source.sqs] and [[source.buckets]], or
        /// [source.kinesis]).
        #[arg(long)]
        config: PathBuf,
    },
    /// Process historical delivery files from a bucket. N pods split one backfill with
    /// `--workers N --worker-index I` (stable key hash); a re-run skips files already done.
    Backfill {
        /// TOML configuration file (output, geoip, batch; the bucket's region/role/endpoint from
        /// [[source.buckets]] when listed there).
        #[arg(long)]
        config: PathBuf,
        /// The trail's bucket.
        #[arg(long)]
        bucket: String,
        /// The prefix before `AWSLogs/`, if the trail has one.
        #[arg(long, default_value = "")]
        prefix: String,
        /// First day (YYYY-MM-DD, UTC), inclusive.
        #[arg(long)]
        from: Option<String>,
        /// Last day (YYYY-MM-DD, UTC), inclusive.
        #[arg(long)]
        to: Option<String>,
        /// Only these accounts (comma-separated).
        #[arg(long, value_delimiter = ',')]
        accounts: Vec<String>,
        /// Only these regions (comma-separated).
        #[arg(long, value_delimiter = ',')]
        regions: Vec<String>,
        /// How many workers share the backfill.
        #[arg(long, default_value_t = 1)]
        workers: u64,
        /// This worker's index, 0..workers.
        #[arg(long, default_value_t = 0)]
        worker_index: u64,
        /// Output (overrides output.url).
        #[arg(long)]
        out: Option<String>,
        /// No progress line (it is drawn only when stderr is a terminal).
        #[arg(long, short)]
        quiet: bool,
    },
    /// Validate a configuration file; errors name the bad key.
    CheckConfig {
        file: PathBuf,
        /// Also print the effective configuration (defaults filled in, secrets masked).
        #[arg(long)]
        print: bool,
    },
    /// Measure throughput on generated CloudTrail data: codec floor vs. the pipeline.
    Bench(trailhose::bench::BenchArgs),
    /// Work with enrichment tables.
    Tables {
        #[command(subcommand)]
        command: TablesCommand,
    },
    /// Work with WASM transform modules.
    Transform {
        #[command(subcommand)]
        command: TransformCommand,
    },
    /// Work with Sigma detection rules.
    Detect {
        #[command(subcommand)]
        command: DetectCommand,
    },
    /// Print the Athena `CREATE EXTERNAL TABLE` for what the configured output writes
    /// (format, columns, partition projection from the key template).
    AthenaDdl {
        #[arg(long)]
        config: PathBuf,
        /// Table name.
        #[arg(long, default_value = "cloudtrail_enriched")]
        table: String,
    },
    /// Map CloudTrail files to OCSF and report the coverage: per class and eventSource, how many
    /// events went to which class (a specific one or the API Activity fallback), and which
    /// CloudTrail fields ended in `unmapped` most often.
    OcsfReport {
        /// CloudTrail files or directories (gzip or plain; digests are skipped).
        #[arg(required = true)]
        inputs: Vec<PathBuf>,
        /// Print the counts as JSON instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// Run SQL over trailhose output (JSON lines or Parquet, local directory or s3://bucket/prefix).
    /// The table is `events`; partition columns (year, month, ...) prune what is read.
    Query {
        /// The output root: a directory or s3://bucket/prefix.
        output: String,
        /// One SQL statement, e.g. "SELECT eventName, count(*) FROM events GROUP BY 1".
        sql: String,
        /// S3 region and endpoint, for the s3:// form.
        #[arg(long)]
        region: Option<String>,
        #[arg(long)]
        endpoint_url: Option<String>,
        /// Print the result as CSV instead of a table.
        #[arg(long)]
        csv: bool,
    },
}

#[derive(Subcommand)]
enum TablesCommand {
    /// Print an accounts table (CSV, key `account_id`) made from an AWS Organizations export:
    /// `aws organizations list-accounts --output json > accounts.json`.
    FromOrganizations {
        /// The `list-accounts` JSON.
        file: PathBuf,
    },
}

#[derive(Subcommand)]
enum DetectCommand {
    /// Show which rule matches which event: one JSON line per matched event (stdout), then
    /// the rules loaded, those skipped and why (stderr). Exits 0 when the rules load.
    Test {
        /// Sigma rule files or folders (repeatable).
        #[arg(long, required = true)]
        rules: Vec<PathBuf>,
        /// A field mapping SIGMA_FIELD=EVENT.PATH, as `detect.fields` (repeatable).
        #[arg(long = "field", value_name = "SIGMA=PATH")]
        fields: Vec<String>,
        /// A value for an `|expand` placeholder NAME=VALUE, as `detect.placeholders`
        /// (repeatable; values of one name accumulate).
        #[arg(long = "placeholder", value_name = "NAME=VALUE")]
        placeholders: Vec<String>,
        /// CloudTrail files (`{"Records":[…]}`, gzip or not) or JSON lines, as written.
        #[arg(required = true)]
        events: Vec<PathBuf>,
    },
    /// Run rules (and correlations, counted in memory) over stored trailhose output: one JSON
    /// line per match (stdout), then a per-rule summary (stderr).
    Backtest {
        /// The output root: a directory or s3://bucket/prefix (JSON lines, gzip or zstd).
        output: String,
        /// Sigma rule files or folders (repeatable).
        #[arg(long, required = true)]
        rules: Vec<PathBuf>,
        /// Only events at or after this time (RFC 3339 or YYYY-MM-DD); earlier hour
        /// partitions are not read.
        #[arg(long)]
        from: Option<String>,
        /// Only events before this time (RFC 3339 or YYYY-MM-DD).
        #[arg(long)]
        to: Option<String>,
        /// A field mapping SIGMA_FIELD=EVENT.PATH, as `detect.fields` (repeatable).
        #[arg(long = "field", value_name = "SIGMA=PATH")]
        fields: Vec<String>,
        /// A value for an `|expand` placeholder NAME=VALUE (repeatable).
        #[arg(long = "placeholder", value_name = "NAME=VALUE")]
        placeholders: Vec<String>,
        /// Keys under this prefix of the output are not events (the error output).
        #[arg(long, default_value = "errors/")]
        skip_prefix: String,
        /// S3 region and endpoint, for the s3:// form.
        #[arg(long)]
        region: Option<String>,
        #[arg(long)]
        endpoint_url: Option<String>,
    },
}

type Fields = std::collections::BTreeMap<String, String>;
type Placeholders = std::collections::BTreeMap<String, Vec<String>>;

/// `--field SIGMA=PATH` and `--placeholder NAME=VALUE` flags as `[detect]` tables.
fn rule_options(
    fields: &[String],
    placeholders: &[String],
) -> anyhow::Result<(Fields, Placeholders)> {
    let fields = fields
        .iter()
        .map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .with_context(|| format!("--field {kv:?} is not SIGMA=PATH"))
        })
        .collect::<anyhow::Result<std::collections::BTreeMap<_, _>>>()?;
    let mut values = std::collections::BTreeMap::<String, Vec<String>>::new();
    for kv in placeholders {
        let (k, v) = kv
            .split_once('=')
            .with_context(|| format!("--placeholder {kv:?} is not NAME=VALUE"))?;
        values.entry(k.to_owned()).or_default().push(v.to_owned());
    }
    Ok((fields, values))
}

#[derive(Subcommand)]
enum TransformCommand {
    /// Run a module on sample events and print each outcome as a JSON line (stdout), then
    /// timing and fuel (stderr): what a team runs before shipping a module.
    Test {
        /// The component (`.wasm`).
        #[arg(long)]
        module: PathBuf,
        /// A config entry for the module's init, KEY=VALUE (repeatable).
        #[arg(long = "config", value_name = "KEY=VALUE")]
        config: Vec<String>,
        /// Fuel per batch; 0 = not metered.
        #[arg(long, default_value_t = 2_000_000_000)]
        fuel: u64,
        /// Wall time per batch.
        #[arg(long, default_value_t = 2_000)]
        timeout_ms: u64,
        #[arg(long, default_value_t = 128)]
        max_memory_mb: usize,
        #[arg(long, default_value_t = 64 << 20)]
        max_output_bytes: usize,
        /// Events per call.
        #[arg(long, default_value_t = 256)]
        batch: usize,
        /// An enrichment table the module may read through `lookup`, NAME=PATH (.csv,
        /// .jsonl/.ndjson or .mmdb; repeatable).
        #[arg(long = "table", value_name = "NAME=PATH")]
        tables: Vec<String>,
        /// The key column of a --table, NAME=COLUMN (default: a CSV's first column).
        #[arg(long = "table-key", value_name = "NAME=COLUMN")]
        table_keys: Vec<String>,
        /// How a --table matches, NAME=exact|case_insensitive|cidr (default: exact).
        #[arg(long = "table-match", value_name = "NAME=KIND")]
        table_matches: Vec<String>,
        /// A CloudTrail file (`{"Records":[…]}`, gzip or not) or JSON lines.
        events: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("trailhose: error: {}", report(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line. Our errors already quote their cause in their own
/// message (logs print only that), so a cause whose text is already there is not repeated.
fn report(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TRAILHOSE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    // Colour codes only for a person at a terminal: a file or a log collector gets plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(|| trailhose::progress::LogWriter);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Resolves on SIGTERM (Kubernetes) or SIGINT (Ctrl-C).
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {},
                _ = int.recv() => {},
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    tracing::info!("signal received");
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Process {
            inputs,
            out,
            geoip_db,
            asn_db,
            compression,
            config,
            metrics_file,
            quiet,
        } => {
            let mut cfg = match &config {
                Some(path) => Config::load(path)?,
                None => Config::default(),
            };
            if let Some(out) = out {
                cfg.output.url = Some(out);
            }
            if geoip_db.is_some() {
                cfg.geoip.city_db = geoip_db;
            }
            if asn_db.is_some() {
                cfg.geoip.asn_db = asn_db;
            }
            if let Some(c) = compression {
                cfg.output.compression = Some(c);
                cfg.output.level = None;
            }
            // The flags may change what the file's checks saw (`--out` a local directory
            // beside `output.s3.role_arn`): checked again as run.
            cfg.validate()?;
            let progress = trailhose::progress::Progress::start(quiet);
            let summary = runtime()?.block_on(trailhose::pipeline::process(&cfg, &inputs));
            drop(progress);
            let summary = summary?;
            if let Some(path) = metrics_file {
                std::fs::write(&path, trailhose::metrics::METRICS.render())
                    .with_context(|| format!("writing metrics to {}", path.display()))?;
            }
            println!("{}", summary.line());
            if !summary.written.failures.is_empty() {
                anyhow::bail!(
                    "{} output object(s) could not be written or alert output(s) delivered; first: {}",
                    summary.written.failures.len(),
                    summary.written.failures[0]
                );
            }
            Ok(())
        }
        Command::Run { config } => {
            let cfg = Config::load(&config)?;
            let report = runtime()?.block_on(async {
                if cfg.source.kinesis.is_some() {
                    trailhose::pipeline::kinesis::run(&cfg, shutdown_signal()).await
                } else {
                    trailhose::pipeline::service::run(&cfg, shutdown_signal()).await
                }
            })?;
            tracing::info!(
                files = report.tally.files,
                events_in = report.tally.events_in,
                events_out = report.written.event_records,
                clean = report.clean,
                "stopped"
            );
            Ok(())
        }
        Command::Backfill {
            config,
            bucket,
            prefix,
            from,
            to,
            accounts,
            regions,
            workers,
            worker_index,
            out,
            quiet,
        } => {
            use trailhose::source::backfill::{Day, Spec};
            let mut cfg = Config::load(&config)?;
            if let Some(out) = out {
                cfg.output.url = Some(out);
            }
            let day = |flag: &str, v: Option<String>| -> anyhow::Result<Option<Day>> {
                v.map(|s| {
                    Day::parse(&s)
                        .with_context(|| format!("--{flag} {s:?} is not a YYYY-MM-DD date"))
                })
                .transpose()
            };
            anyhow::ensure!(workers >= 1, "--workers must be at least 1");
            anyhow::ensure!(
                worker_index < workers,
                "--worker-index must be below --workers"
            );
            let mut prefix = prefix.trim_matches('/').to_owned();
            if !prefix.is_empty() {
                prefix.push('/');
            }
            let spec = Spec {
                bucket,
                prefix,
                from: day("from", from)?,
                to: day("to", to)?,
                accounts,
                regions,
                workers,
                index: worker_index,
            };
            let progress = trailhose::progress::Progress::start(quiet);
            cfg.validate()?;
            let report = runtime()?.block_on(trailhose::pipeline::backfill::run(&cfg, &spec));
            drop(progress);
            let report = report?;
            println!("{}", report.line());
            // The ledger's count covers failed writes; their messages too, should one ever
            // leave every file marked.
            anyhow::ensure!(
                report.failed == 0 && report.written.failures.is_empty(),
                "{} file(s) failed (a file that is gone is in the error output and not retried; the others are, by a re-run){}",
                report.failed,
                report
                    .written
                    .failures
                    .first()
                    .map(|f| format!(": {f}"))
                    .unwrap_or_default()
            );
            Ok(())
        }
        Command::CheckConfig { file, print } => {
            let cfg = Config::load(&file)?;
            if print {
                let text = cfg.effective_toml().map_err(anyhow::Error::msg)?;
                println!("# {}: ok; effective configuration\n{text}", file.display());
            } else {
                println!("{}: ok", file.display());
            }
            Ok(())
        }
        Command::Bench(args) => Ok(trailhose::bench::run(&args)?),
        Command::AthenaDdl { config, table } => {
            let cfg = Config::load(&config)?;
            print!("{}", trailhose::athena::ddl(&cfg, &table)?);
            Ok(())
        }
        Command::OcsfReport { inputs, json } => {
            let report = trailhose::sink::ocsf::report::Report::of_inputs(&inputs)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.render());
            }
            Ok(())
        }
        #[cfg(feature = "query")]
        Command::Query {
            output,
            sql,
            region,
            endpoint_url,
            csv,
        } => {
            let (text, note) = runtime()?.block_on(trailhose::query::run(
                &output,
                &sql,
                region.as_deref(),
                endpoint_url.as_deref(),
                csv,
            ))?;
            print!("{text}");
            eprintln!("trailhose: {note}");
            Ok(())
        }
        #[cfg(not(feature = "query"))]
        Command::Query { .. } => anyhow::bail!(
            "this trailhose was built without the `query` feature (`--no-default-features`); \
             build it with the default features (`cargo build --release`) to run SQL"
        ),
        Command::Tables {
            command: TablesCommand::FromOrganizations { file },
        } => {
            let export =
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let csv = trailhose::enrich::tables::organizations::accounts_csv(&export)
                .with_context(|| file.display().to_string())?;
            use std::io::Write;
            std::io::stdout().write_all(&csv)?;
            Ok(())
        }
        Command::Detect {
            command:
                DetectCommand::Test {
                    rules,
                    fields,
                    placeholders,
                    events,
                },
        } => {
            let (fields, values) = rule_options(&fields, &placeholders)?;
            let report = trailhose::detect::trial::run(&rules, &fields, &values, &events)?;
            let mut out = std::io::stdout().lock();
            for m in &report.matched {
                serde_json::to_writer(&mut out, m)?;
                writeln!(out)?;
            }
            eprintln!("{}", report.summary());
            Ok(())
        }
        #[cfg(not(feature = "query"))]
        Command::Detect {
            command: DetectCommand::Backtest { .. },
        } => anyhow::bail!(
            "this trailhose was built without the `query` feature (`--no-default-features`), which \
             `detect backtest` reads stored output with; build it with the default features"
        ),
        #[cfg(feature = "query")]
        Command::Detect {
            command:
                DetectCommand::Backtest {
                    output,
                    rules,
                    from,
                    to,
                    fields,
                    placeholders,
                    skip_prefix,
                    region,
                    endpoint_url,
                },
        } => {
            let (fields, placeholders) = rule_options(&fields, &placeholders)?;
            let bt = trailhose::detect::backtest::Backtest {
                output,
                rules,
                fields,
                placeholders,
                from,
                to,
                region,
                endpoint_url,
                skip_prefix,
            };
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            let mut failed = None;
            let summary = runtime()?.block_on(trailhose::detect::backtest::run(&bt, |m| {
                if failed.is_none()
                    && let Err(e) = serde_json::to_writer(&mut out, m)
                        .map_err(std::io::Error::from)
                        .and_then(|()| writeln!(out))
                {
                    failed = Some(e);
                }
            }))?;
            if let Some(e) = failed {
                return Err(e.into());
            }
            out.flush()?;
            eprintln!("{}", summary.render());
            Ok(())
        }
        Command::Transform {
            command:
                TransformCommand::Test {
                    module,
                    config,
                    fuel,
                    timeout_ms,
                    max_memory_mb,
                    max_output_bytes,
                    batch,
                    tables,
                    table_keys,
                    table_matches,
                    events,
                },
        } => {
            if !cfg!(feature = "transforms") {
                anyhow::bail!(
                    "{} (`cargo build --release`)",
                    trailhose::transform::NOT_BUILT
                );
            }
            use trailhose::transform::{Limits, ModuleSpec, trial};
            let config = config
                .iter()
                .map(|kv| {
                    kv.split_once('=')
                        .map(|(k, v)| (k.to_owned(), v.to_owned()))
                        .with_context(|| format!("--config {kv:?} is not KEY=VALUE"))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let name = module
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "module".to_owned());
            let lookups = trial::open_tables(&tables, &table_keys, &table_matches)?;
            let granted = tables
                .iter()
                .filter_map(|t| t.split_once('=').map(|(n, _)| n.to_owned()))
                .collect();
            if module.to_str().is_some_and(|m| m.starts_with("s3://")) {
                anyhow::bail!(
                    "transform test reads a local module file; copy {} here first (a worker \
                     reads s3:// modules itself)",
                    module.display()
                );
            }
            let spec = ModuleSpec {
                name,
                path: module,
                region: None,
                endpoint_url: None,
                force_path_style: false,
                config,
                tables: granted,
                limits: Limits {
                    fuel,
                    timeout: std::time::Duration::from_millis(timeout_ms),
                    max_memory_bytes: max_memory_mb << 20,
                    max_output_bytes,
                },
                on_failure: trailhose::transform::OnFailure::ErrorOutput,
                max_attempts: 1,
                retry_fallback: trailhose::transform::OnFailure::ErrorOutput,
            };
            let events = trial::read_events(&events)?;
            let trial = trial::run(&spec, lookups, &events, batch)?;
            let mut out = std::io::stdout().lock();
            for r in &trial.results {
                serde_json::to_writer(&mut out, r)?;
                writeln!(out)?;
            }
            eprintln!("{}", trial.summary());
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_does_not_repeat_quoted_causes() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file or directory");
        let e = anyhow::Error::new(trailhose::config::ConfigError::Read {
            path: "c.toml".into(),
            source: io,
        })
        .context("loading");
        assert_eq!(
            report(&e),
            "loading: cannot read config c.toml: No such file or directory"
        );
    }
}
