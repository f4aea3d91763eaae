//! `trailhose transform test`: runs one module over sample events and shows each outcome,
//! with timing and fuel, the way the pipeline would run it.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde_json::value::RawValue;

use super::{Batch, ModuleSpec, Reject, StageReport, TransformError, Transforms};
use crate::cloudtrail::{self, Item};
use crate::config::enrich::{MatchKind, TableConfig, TableFormat};
use crate::enrich::tables::Table;
use crate::enrich::tables::stage::Lookups;
use crate::fetch;

#[derive(Debug, thiserror::Error)]
pub enum TrialError {
    #[error("cannot read events from {path}: {detail}")]
    Events { path: String, detail: String },
    #[error(transparent)]
    Transform(#[from] TransformError),
    #[error("--table: {0}")]
    Table(String),
}

/// Loads `--table NAME=PATH` tables (format from the extension; the key column from
/// `--table-key NAME=COLUMN`, else a CSV's first column; the match from
/// `--table-match NAME=KIND`, else exact), checked as the pipeline checks them. None when
/// there are none.
pub fn open_tables(
    tables: &[String],
    keys: &[String],
    matches: &[String],
) -> Result<Option<Arc<Lookups>>, TrialError> {
    let bad = TrialError::Table;
    let pair = |kv: &str, what: &str| -> Result<(String, String), TrialError> {
        kv.split_once('=')
            .filter(|(k, v)| !k.is_empty() && !v.is_empty())
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .ok_or_else(|| bad(format!("{kv:?} is not {what}")))
    };
    let keys = keys
        .iter()
        .map(|kv| pair(kv, "NAME=COLUMN (--table-key)"))
        .collect::<Result<BTreeMap<_, _>, _>>()?;
    let matches = matches
        .iter()
        .map(|kv| pair(kv, "NAME=KIND (--table-match)"))
        .collect::<Result<BTreeMap<_, _>, _>>()?;
    if let Some(n) = keys.keys().chain(matches.keys()).find(|n| {
        !tables
            .iter()
            .any(|t| t.split_once('=').is_some_and(|(tn, _)| tn == n.as_str()))
    }) {
        return Err(bad(format!("no --table is named {n:?}")));
    }
    let mut named = Vec::new();
    for kv in tables {
        let (name, path) = pair(kv, "NAME=PATH")?;
        let bytes = std::fs::read(&path).map_err(|e| bad(format!("{path}: {e}")))?;
        let format = TableFormat::from_path(&path)
            .ok_or_else(|| bad(format!("{path}: not .csv, .jsonl, .ndjson or .mmdb")))?;
        let key = match (keys.get(&name), format) {
            (Some(k), _) => Some(k.clone()),
            (None, TableFormat::Csv) => first_csv_column(&bytes),
            (None, _) => None,
        };
        let match_kind = match matches.get(&name) {
            None => None,
            Some(m) => Some(
                serde_json::from_value::<MatchKind>(serde_json::Value::String(m.clone())).map_err(
                    |_| {
                        bad(format!(
                            "{name}: match {m:?} is not exact, case_insensitive or cidr"
                        ))
                    },
                )?,
            ),
        };
        let spec = TableConfig {
            name: name.clone(),
            path: path.clone(),
            format: Some(format),
            key,
            match_kind,
            region: None,
            endpoint_url: None,
            force_path_style: false,
            max_bytes: u64::MAX,
        };
        let table = Table::parse(&spec, &path, bytes).map_err(|e| bad(e.to_string()))?;
        named.push((Arc::<str>::from(name), path, Arc::new(table)));
    }
    if named.is_empty() {
        return Ok(None);
    }
    let lookups = Lookups::compile(&[], &named).map_err(|e| bad(e.to_string()))?;
    Ok(Some(Arc::new(lookups)))
}

/// The first header cell of a CSV table (gzip is not looked into: name the key instead).
fn first_csv_column(bytes: &[u8]) -> Option<String> {
    let mut reader = csv::ReaderBuilder::new().from_reader(bytes);
    reader.headers().ok()?.get(0).map(|h| h.trim().to_owned())
}

/// What happened to one input event.
#[derive(Debug, Serialize)]
pub struct EventResult {
    pub index: u64,
    /// kept, rewritten, split, dropped or failed.
    pub outcome: &'static str,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<Box<RawValue>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

pub struct Trial {
    pub results: Vec<EventResult>,
    pub reports: Vec<StageReport>,
    pub events: usize,
}

impl Trial {
    /// The summary line: batches, time per event, fuel per event, outcome counts.
    pub fn summary(&self) -> String {
        let elapsed: Duration = self.reports.iter().map(|r| r.elapsed).sum();
        let fuel: u64 = self.reports.iter().map(|r| r.fuel).sum();
        let n = self.events.max(1) as f64;
        let mut by_outcome: BTreeMap<&str, usize> = BTreeMap::new();
        for r in &self.results {
            *by_outcome.entry(r.outcome).or_default() += 1;
        }
        let outcomes: Vec<String> = by_outcome.iter().map(|(k, v)| format!("{v} {k}")).collect();
        let failures: Vec<String> = self
            .reports
            .iter()
            .filter_map(|r| r.failure.as_ref())
            .map(|f| format!("{}: {}", f.reason.as_str(), f.detail))
            .collect();
        let mut line = format!(
            "{} events in {} batch(es): {}; {:.3} ms ({:.1} µs/event); fuel {} ({:.0}/event)",
            self.events,
            self.reports.len(),
            outcomes.join(", "),
            elapsed.as_secs_f64() * 1e3,
            elapsed.as_secs_f64() * 1e6 / n,
            fuel,
            fuel as f64 / n,
        );
        if !failures.is_empty() {
            line.push_str(&format!("; call failures: {}", failures.join("; ")));
        }
        line
    }
}

/// Reads events from a CloudTrail file (`{"Records":[…]}`, gzip or not) or JSON lines.
pub fn read_events(path: &Path) -> Result<Vec<Vec<u8>>, TrialError> {
    let err = |detail: String| TrialError::Events {
        path: path.display().to_string(),
        detail,
    };
    let file = std::fs::File::open(path).map_err(|e| err(e.to_string()))?;
    let (_, mut decoded) = fetch::decode(file).map_err(|e| err(e.to_string()))?;
    let mut bytes = Vec::new();
    decoded
        .read_to_end(&mut bytes)
        .map_err(|e| err(e.to_string()))?;
    let mut events = Vec::new();
    let report = cloudtrail::split(&bytes[..], 64 << 20, |item| {
        if let Item::Event { raw, .. } = item {
            events.push(raw.to_vec());
        }
    });
    if report.result.is_ok() && !events.is_empty() {
        return Ok(events);
    }
    events.clear();
    for (n, line) in bytes.split(|&b| b == b'\n').enumerate() {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        cloudtrail::head_of(line).map_err(|e| {
            err(format!(
                "line {}: not a Records file or a JSON object per line: {e}",
                n + 1
            ))
        })?;
        events.push(line.to_vec());
    }
    Ok(events)
}

/// The GeoIP country an event already carries (`geo.country_isocode`), as the pipeline would
/// have found it.
fn country_in(event: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Ev {
        geo: Option<Geo>,
    }
    #[derive(serde::Deserialize)]
    struct Geo {
        country_isocode: Option<String>,
    }
    let ev: Ev = serde_json::from_slice(event).ok()?;
    ev.geo?.country_isocode
}

/// Runs `spec` over `events` in batches of `batch_events`.
/// `tables`: what the module's `lookup` reads.
pub fn run(
    spec: &ModuleSpec,
    tables: Option<Arc<Lookups>>,
    events: &[Vec<u8>],
    batch_events: usize,
) -> Result<Trial, TrialError> {
    let transforms = Transforms::open(std::slice::from_ref(spec), None)?;
    let mut chain = transforms.chain();
    chain.set_tables(tables);
    let mut results = Vec::with_capacity(events.len());
    let mut reports = Vec::new();
    let mut rejects: Vec<Reject> = Vec::new();
    for (chunk_no, chunk) in events.chunks(batch_events.max(1)).enumerate() {
        let base = (chunk_no * batch_events.max(1)) as u64;
        let mut batch = Batch::default();
        for (i, e) in chunk.iter().enumerate() {
            let head = cloudtrail::head_of(e).map_err(|err| TrialError::Events {
                path: format!("event {}", base + i as u64),
                detail: err.to_string(),
            })?;
            let country = country_in(e);
            batch.push(e, &[], &head, country.as_deref(), base + i as u64);
        }
        reports.extend(chain.run("trial", &mut batch, &mut rejects));
        for (i, input) in chunk.iter().enumerate() {
            let index = base + i as u64;
            if let Some(r) = rejects.iter().find(|r| r.index == index) {
                results.push(EventResult {
                    index,
                    outcome: "failed",
                    events: Vec::new(),
                    reason: Some(r.reason),
                    detail: Some(r.detail.clone()),
                });
                continue;
            }
            let outs: Vec<&[u8]> = batch
                .items()
                .filter(|v| v.index == index)
                .map(|v| v.event)
                .collect();
            let outcome = match outs.as_slice() {
                [] => "dropped",
                [one] if *one == input.as_slice() => "kept",
                [_] => "rewritten",
                _ => "split",
            };
            let events = outs
                .iter()
                .filter_map(|e| {
                    std::str::from_utf8(e)
                        .ok()
                        .and_then(|s| RawValue::from_string(s.to_owned()).ok())
                })
                .collect();
            results.push(EventResult {
                index,
                outcome,
                events,
                reason: None,
                detail: None,
            });
        }
        rejects.clear();
    }
    Ok(Trial {
        results,
        reports,
        events: events.len(),
    })
}
