//! `trailhose ocsf-report INPUT...`: how CloudTrail files map to OCSF. Per class and
//! `eventSource`, how many events went to which class, how many of those took the class's
//! Other activity, how many went to a specific class (Authentication, Account Change) rather
//! than the API Activity fallback, and which CloudTrail fields ended in `unmapped` most often.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::{Map, Value};

use super::class::{Class, OTHER};
use super::map;
use crate::cloudtrail::{self, Item};

/// The most unmapped fields listed.
const TOP_UNMAPPED: usize = 25;

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("{0}: {1}")]
    Input(String, String),
}

/// Counts for one class and event source.
#[derive(Debug, Default, Clone, Serialize, PartialEq, Eq)]
pub struct Row {
    pub events: u64,
    /// Events that took the class's Other activity (99).
    pub other_activity: u64,
    /// `unmapped` entries over those events.
    pub unmapped_fields: u64,
}

/// The whole report.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub files: u64,
    pub events: u64,
    /// Files that could not be read or split (named, with why).
    pub unreadable: Vec<String>,
    /// `class slug` → `eventSource` → counts.
    pub by_class: BTreeMap<String, BTreeMap<String, Row>>,
    /// `unmapped` key → events that had it.
    pub unmapped: BTreeMap<String, u64>,
}

impl Report {
    /// Maps one CloudTrail event and counts the result.
    pub fn add(&mut self, raw: &[u8]) {
        let event: Map<String, Value> = serde_json::from_slice(raw).unwrap_or_default();
        let source = event
            .get("eventSource")
            .and_then(Value::as_str)
            .unwrap_or("(none)")
            .to_owned();
        let record = map::to_ocsf(event, 0, None);
        let uid = record["class_uid"].as_u64().unwrap_or(0);
        let class = Class::ALL
            .into_iter()
            .find(|c| u64::from(c.uid()) == uid)
            .map_or("unknown", Class::slug);
        let row = self
            .by_class
            .entry(class.to_owned())
            .or_default()
            .entry(source)
            .or_default();
        row.events += 1;
        if record["activity_id"].as_u64() == Some(u64::from(OTHER)) {
            row.other_activity += 1;
        }
        if let Some(u) = record["unmapped"].as_object() {
            row.unmapped_fields += u.len() as u64;
            for k in u.keys() {
                *self.unmapped.entry(k.clone()).or_default() += 1;
            }
        }
        self.events += 1;
    }

    /// Reads every CloudTrail file under `inputs` (files or directories, recursively; digests
    /// and hidden files are skipped) and counts its events.
    pub fn of_inputs(inputs: &[PathBuf]) -> Result<Report, ReportError> {
        let mut report = Report::default();
        for input in inputs {
            if !input.exists() {
                return Err(ReportError::Input(
                    input.display().to_string(),
                    "no such file or directory".into(),
                ));
            }
            for entry in walkdir::WalkDir::new(input).sort_by_file_name() {
                let entry = entry
                    .map_err(|e| ReportError::Input(input.display().to_string(), e.to_string()))?;
                let hidden = entry.file_name().to_string_lossy().starts_with('.');
                if entry.file_type().is_file() && !hidden {
                    report.add_file(entry.path());
                }
            }
        }
        Ok(report)
    }

    fn add_file(&mut self, path: &Path) {
        let name = path.display().to_string();
        let decoded = std::fs::File::open(path).and_then(crate::fetch::decode);
        let mut reader = match decoded {
            Ok((_, r)) => r,
            Err(e) => {
                self.unreadable.push(format!("{name}: {e}"));
                return;
            }
        };
        let mut events = Vec::new();
        let split = cloudtrail::split(&mut reader, 64 << 20, |item| {
            if let Item::Event { raw, .. } = item {
                events.push(raw.to_vec());
            }
        });
        match split.result {
            Ok(cloudtrail::Kind::Digest) => return,
            Ok(cloudtrail::Kind::Events) => {}
            Err(e) => self.unreadable.push(format!("{name}: {e}")),
        }
        self.files += 1;
        for e in &events {
            self.add(e);
        }
    }

    /// The report as text: three tables.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "OCSF {} mapping of {} events from {} files",
            super::VERSION,
            self.events,
            self.files
        );
        for u in &self.unreadable {
            let _ = writeln!(out, "unreadable: {u}");
        }
        let _ = writeln!(
            out,
            "\n{:<16} {:<40} {:>9} {:>9} {:>12}",
            "class", "event_source", "events", "other", "unmapped/ev"
        );
        for (class, sources) in &self.by_class {
            for (source, r) in sources {
                let per = r.unmapped_fields as f64 / r.events.max(1) as f64;
                let _ = writeln!(
                    out,
                    "{class:<16} {source:<40} {:>9} {:>9} {per:>12.1}",
                    r.events, r.other_activity
                );
            }
        }
        // By source: a specific class, or the API Activity fallback.
        let mut by_source: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
        for (class, sources) in &self.by_class {
            for (source, r) in sources {
                let e = by_source.entry(source).or_default();
                if class == Class::ApiActivity.slug() {
                    e.1 += r.events;
                } else {
                    e.0 += r.events;
                }
            }
        }
        let _ = writeln!(
            out,
            "\n{:<40} {:>9} {:>13}",
            "event_source", "specific", "api_activity"
        );
        for (source, (specific, api)) in &by_source {
            let _ = writeln!(out, "{source:<40} {specific:>9} {api:>13}");
        }
        let mut top: Vec<(&String, &u64)> = self.unmapped.iter().collect();
        top.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        let _ = writeln!(out, "\n{:<50} {:>9}", "unmapped field", "events");
        for (k, n) in top.into_iter().take(TOP_UNMAPPED) {
            let _ = writeln!(out, "{k:<50} {n:>9}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_classes_sources_other_activities_and_unmapped_fields() {
        let mut r = Report::default();
        r.add(br#"{"eventSource":"signin.amazonaws.com","eventName":"ConsoleLogin","additionalEventData":{"MFAUsed":"No"}}"#);
        r.add(br#"{"eventSource":"s3.amazonaws.com","eventName":"GetObject","requestParameters":{"bucketName":"b"}}"#);
        r.add(br#"{"eventSource":"s3.amazonaws.com","eventName":"Frobnicate","requestParameters":{}}"#);
        r.add(b"not json");
        assert_eq!(r.events, 4);
        let s3 = &r.by_class["api_activity"]["s3.amazonaws.com"];
        assert_eq!((s3.events, s3.other_activity), (2, 1));
        assert_eq!(
            r.by_class["authentication"]["signin.amazonaws.com"].events,
            1
        );
        assert_eq!(r.by_class["api_activity"]["(none)"].events, 1);
        assert_eq!(r.unmapped["requestParameters"], 2);
        assert_eq!(r.unmapped["additionalEventData"], 1);
        let text = r.render();
        assert!(text.contains("OCSF 1.1.0 mapping of 4 events"), "{text}");
        let line = text
            .lines()
            .find(|l| l.starts_with("s3.amazonaws.com"))
            .unwrap();
        let cols: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(cols, ["s3.amazonaws.com", "0", "2"], "{text}");
        // Most frequent first.
        let fields: Vec<&str> = text
            .lines()
            .skip_while(|l| !l.starts_with("unmapped field"))
            .skip(1)
            .map(|l| l.split_whitespace().next().unwrap())
            .collect();
        assert_eq!(fields.first(), Some(&"requestParameters"), "{text}");
    }
}
