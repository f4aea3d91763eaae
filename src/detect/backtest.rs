//! `trailhose detect backtest OUTPUT --rules DIR [--from T] [--to T]`: the rules (and their
//! correlations, counted in memory) over what trailhose already wrote, in a local directory
//! or under an S3 prefix. Objects are JSON lines (`.json`, `.json.gz`, `.json.zst`); the
//! time partitions in their keys (`year=/month=/day=/hour=`) skip objects outside
//! `[from, to)` before they are read, and each event's `eventTime` is checked too.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::PathBuf;

use serde::Serialize;
use serde_json::Value;

use super::correlate::store::Store as CorrelationStore;
use super::correlate::{CorrelateError, Correlated, Correlator, event_key};
use super::rules::{Hit, RuleError, Rules};
use crate::clock::Utc;
use crate::query::{QueryError, open_output};

#[derive(Debug, thiserror::Error)]
pub enum BacktestError {
    #[error(transparent)]
    Rules(#[from] RuleError),
    #[error(transparent)]
    Correlate(#[from] CorrelateError),
    #[error(transparent)]
    Output(#[from] QueryError),
    #[error("{0}: {1}")]
    Read(String, String),
    #[error(
        "{0}: Parquet output is not read by backtest; write JSON lines (output.format = \"json\")"
    )]
    Parquet(String),
    #[error("--{0} {1:?}: expected an RFC 3339 time (2024-03-18T14:00:00Z) or a date (2024-03-18)")]
    Time(&'static str, String),
}

/// What to run and over what.
pub struct Backtest {
    pub output: String,
    pub rules: Vec<PathBuf>,
    pub fields: BTreeMap<String, String>,
    pub placeholders: BTreeMap<String, Vec<String>>,
    pub from: Option<String>,
    pub to: Option<String>,
    pub region: Option<String>,
    pub endpoint_url: Option<String>,
    /// Keys under this prefix are not events (trailhose's error output).
    pub skip_prefix: String,
}

/// One match, as printed.
#[derive(Debug, Serialize)]
pub struct Match<'a> {
    pub object: &'a str,
    pub line: usize,
    #[serde(rename = "eventID")]
    pub event_id: Option<&'a str>,
    #[serde(rename = "eventName")]
    pub event_name: Option<&'a str>,
    #[serde(rename = "eventTime")]
    pub event_time: Option<&'a str>,
    pub rule_id: &'a str,
    pub rule_title: &'a str,
    pub level: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub correlation: Option<&'a Correlated>,
}

#[derive(Debug, Default)]
pub struct Summary {
    pub listed: usize,
    pub read: usize,
    pub events: usize,
    /// Events outside `[from, to)` (by `eventTime`) in objects that were read.
    pub outside: usize,
    /// Lines that are not JSON objects.
    pub unreadable: usize,
    /// Rule id → (title, level, matches).
    pub per_rule: BTreeMap<String, (String, &'static str, usize)>,
    pub rules: usize,
    pub correlations: usize,
    pub skipped: Vec<String>,
}

impl Summary {
    /// For stderr: one line per rule that matched (most first), then the totals.
    pub fn render(&self) -> String {
        let mut rows: Vec<_> = self.per_rule.iter().collect();
        rows.sort_by(|a, b| b.1.2.cmp(&a.1.2).then(a.0.cmp(b.0)));
        let mut s = String::new();
        for (id, (title, level, n)) in rows {
            s.push_str(&format!("{n:>8}  {level:<13} {id}  {title}\n"));
        }
        s.push_str(&format!(
            "{} rules and {} correlations loaded, {} invalid; read {} of {} objects; {} events in range ({} outside, {} unreadable lines); {} matches",
            self.rules,
            self.correlations,
            self.skipped.len(),
            self.read,
            self.listed,
            self.events,
            self.outside,
            self.unreadable,
            self.per_rule.values().map(|r| r.2).sum::<usize>()
        ));
        for sk in &self.skipped {
            s.push_str(&format!("\ninvalid: {sk}"));
        }
        s
    }
}

/// `2024-03-18T14:00:00Z` or `2024-03-18` (midnight UTC), as Unix seconds.
pub fn parse_time(flag: &'static str, s: &str) -> Result<i64, BacktestError> {
    let full = if s.len() == 10 {
        format!("{s}T00:00:00Z")
    } else {
        s.to_owned()
    };
    Utc::parse_rfc3339(&full)
        .map(Utc::to_unix)
        .ok_or_else(|| BacktestError::Time(flag, s.to_owned()))
}

/// The time span `[start, end)` a key's partitions cover (`year=`, `month=`, `day=`,
/// `hour=`), or None when the key has no year partition (it cannot be pruned).
pub fn key_span(key: &str) -> Option<(i64, i64)> {
    let mut parts: HashMap<&str, u32> = HashMap::new();
    let mut dirs: Vec<&str> = key.split('/').collect();
    dirs.pop();
    for d in dirs {
        if let Some((k, v)) = d.split_once('=')
            && let Ok(n) = v.parse::<u32>()
        {
            parts.insert(k, n);
        }
    }
    let year = *parts.get("year")?;
    let at = |y: u32, mo: u32, d: u32, h: u32| {
        Utc::parse_rfc3339(&format!("{y:04}-{mo:02}-{d:02}T{h:02}:00:00Z")).map(Utc::to_unix)
    };
    let (month, day, hour) = (parts.get("month"), parts.get("day"), parts.get("hour"));
    Some(match (month, day, hour) {
        (Some(&m), Some(&d), Some(&h)) => {
            let s = at(year, m, d, h)?;
            (s, s + 3600)
        }
        (Some(&m), Some(&d), None) => {
            let s = at(year, m, d, 0)?;
            (s, s + 86_400)
        }
        (Some(&m), None, _) => {
            let s = at(year, m, 1, 0)?;
            let e = if m == 12 {
                at(year + 1, 1, 1, 0)?
            } else {
                at(year, m + 1, 1, 0)?
            };
            (s, e)
        }
        (None, _, _) => (at(year, 1, 1, 0)?, at(year + 1, 1, 1, 0)?),
    })
}

fn overlaps(span: Option<(i64, i64)>, from: Option<i64>, to: Option<i64>) -> bool {
    let Some((s, e)) = span else {
        return true;
    };
    from.is_none_or(|f| e > f) && to.is_none_or(|t| s < t)
}

enum Kind {
    Plain,
    Gzip,
    Zstd,
    Parquet,
}

fn kind_of(key: &str) -> Option<Kind> {
    let name = key.rsplit('/').next().unwrap_or(key);
    if name.starts_with('.') {
        return None;
    }
    if name.ends_with(".json.gz") {
        Some(Kind::Gzip)
    } else if name.ends_with(".json.zst") {
        Some(Kind::Zstd)
    } else if name.ends_with(".json") {
        Some(Kind::Plain)
    } else if name.ends_with(".parquet") {
        Some(Kind::Parquet)
    } else {
        None
    }
}

fn decode(kind: &Kind, body: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    match kind {
        Kind::Gzip => {
            flate2::read::MultiGzDecoder::new(body)
                .read_to_end(&mut out)
                .map_err(|e| e.to_string())?;
        }
        Kind::Zstd => out = zstd::stream::decode_all(body).map_err(|e| e.to_string())?,
        _ => out.extend_from_slice(body),
    }
    Ok(out)
}

/// Runs the backtest, handing each match to `print` (in object and line order).
pub async fn run(
    bt: &Backtest,
    mut print: impl FnMut(&Match<'_>),
) -> Result<Summary, BacktestError> {
    let from = bt
        .from
        .as_deref()
        .map(|s| parse_time("from", s))
        .transpose()?;
    let to = bt.to.as_deref().map(|s| parse_time("to", s)).transpose()?;
    let rules = Rules::load(&bt.rules, &bt.fields, &bt.placeholders, true)?;
    let correlator = Correlator::compile(
        &rules,
        &CorrelationStore::memory(),
        None,
        86_400 * 366,
        true,
    )?;
    let store = open_output(&bt.output, bt.region.as_deref(), bt.endpoint_url.as_deref()).await?;
    let mut keys = store
        .list("")
        .await
        .map_err(|e| BacktestError::Read(bt.output.clone(), e.to_string()))?;
    keys.sort();
    let mut sum = Summary {
        rules: rules.len(),
        correlations: correlator.len(),
        skipped: rules
            .skipped
            .iter()
            .chain(&correlator.skipped)
            .map(|s| format!("{}: {}", s.path.display(), s.reason))
            .collect(),
        ..Summary::default()
    };
    let tally = |hit: &Hit, sum: &mut Summary| {
        sum.per_rule
            .entry(hit.id.to_string())
            .or_insert_with(|| (hit.title.to_string(), hit.level.as_str(), 0))
            .2 += 1;
    };
    let mut reported = std::collections::HashSet::new();
    for key in &keys {
        if !bt.skip_prefix.is_empty() && key.starts_with(&bt.skip_prefix) {
            continue;
        }
        let Some(kind) = kind_of(key) else { continue };
        sum.listed += 1;
        if !overlaps(key_span(key), from, to) {
            continue;
        }
        if matches!(kind, Kind::Parquet) {
            return Err(BacktestError::Parquet(store.describe(key)));
        }
        let body = store
            .get(key)
            .await
            .map_err(|e| BacktestError::Read(store.describe(key), e.to_string()))?;
        let text = decode(&kind, &body).map_err(|e| BacktestError::Read(store.describe(key), e))?;
        sum.read += 1;
        let object = store.describe(key);
        for (n, line) in text.split(|&b| b == b'\n').enumerate() {
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let Ok(event) = serde_json::from_slice::<Value>(line) else {
                sum.unreadable += 1;
                continue;
            };
            if !event.is_object() {
                sum.unreadable += 1;
                continue;
            }
            let text = |k: &str| event.get(k).and_then(Value::as_str);
            let ts = text("eventTime")
                .and_then(Utc::parse_rfc3339)
                .map(Utc::to_unix);
            if let Some(t) = ts
                && (from.is_some_and(|f| t < f) || to.is_some_and(|e| t >= e))
            {
                sum.outside += 1;
                continue;
            }
            sum.events += 1;
            let hits = rules.evaluate(&event);
            if hits.is_empty() {
                continue;
            }
            fn m<'a>(
                object: &'a str,
                line: usize,
                event: &'a Value,
                hit: &'a Hit,
                correlation: Option<&'a Correlated>,
            ) -> Match<'a> {
                let text = |k: &str| event.get(k).and_then(Value::as_str);
                Match {
                    object,
                    line,
                    event_id: text("eventID"),
                    event_name: text("eventName"),
                    event_time: text("eventTime"),
                    rule_id: &hit.id,
                    rule_title: &hit.title,
                    level: hit.level.as_str(),
                    correlation,
                }
            }
            for h in &hits {
                tally(h, &mut sum);
                print(&m(&object, n + 1, &event, h, None));
            }
            if correlator.wants(&hits) {
                let id = event_key(text("eventID"), line);
                let t = ts.unwrap_or(0);
                for f in correlator.observe(&hits, &event, &id, t, t).await? {
                    // The event that fired a window fires again when it comes again (in the
                    // stream, its alert may not have been delivered). Stored output holds
                    // such repeats; a backtest reports each window once.
                    let window = (
                        f.hit.id.to_string(),
                        f.detail.window_start.clone(),
                        f.detail.group.clone(),
                    );
                    if !reported.insert(window) {
                        continue;
                    }
                    tally(&f.hit, &mut sum);
                    print(&m(&object, n + 1, &event, &f.hit, Some(&f.detail)));
                }
            }
        }
    }
    Ok(sum)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_cover_the_span_of_their_partitions() {
        let h = parse_time("from", "2024-03-18T14:00:00Z").expect("time");
        assert_eq!(
            key_span("year=2024/month=03/day=18/hour=14/a.json.gz"),
            Some((h, h + 3600))
        );
        let d = parse_time("from", "2024-03-18").expect("date");
        assert_eq!(
            key_span("x/year=2024/month=03/day=18/a.json"),
            Some((d, d + 86_400))
        );
        let dec = key_span("year=2023/month=12/a.json").expect("month");
        assert_eq!(dec.1, parse_time("to", "2024-01-01").expect("date"));
        assert_eq!(key_span("account=1/a.json"), None, "not prunable");
    }

    #[test]
    fn from_is_inclusive_and_to_exclusive() {
        let span = Some((100, 200));
        assert!(overlaps(span, Some(100), Some(200)));
        assert!(overlaps(span, Some(199), None));
        assert!(!overlaps(span, Some(200), None));
        assert!(!overlaps(span, None, Some(100)));
        assert!(overlaps(span, None, Some(101)));
        assert!(overlaps(None, Some(0), Some(1)), "unprunable keys are read");
        assert!(parse_time("from", "yesterday").is_err());
    }
}
