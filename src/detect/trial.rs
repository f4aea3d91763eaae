//! `trailhose detect test --rules DIR EVENTS...`: which rule matches which event, before a
//! rule ships. Events are taken as written (a `geo` object already in them is used); rules
//! that do not compile are listed with their reason rather than stopping the run.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Serialize;

use super::prefilter::Keys;
use super::rules::{Inspected, RuleError, Rules};
use crate::transform::trial::{TrialError, read_events};

#[derive(Debug, thiserror::Error)]
pub enum DetectTestError {
    #[error(transparent)]
    Rules(#[from] RuleError),
    #[error(transparent)]
    Events(#[from] TrialError),
}

#[derive(Debug, Serialize)]
pub struct Matched {
    pub id: String,
    pub title: String,
    pub level: &'static str,
}

/// One event some rule matched.
#[derive(Debug, Serialize)]
pub struct EventMatches {
    pub file: String,
    pub index: usize,
    #[serde(rename = "eventID")]
    pub event_id: Option<String>,
    #[serde(rename = "eventName")]
    pub event_name: Option<String>,
    pub matches: Vec<Matched>,
}

pub struct Report {
    pub matched: Vec<EventMatches>,
    pub events: usize,
    pub rules: Rules,
}

impl Report {
    /// Rules, events, matches, and what was not loaded (stderr).
    pub fn summary(&self) -> String {
        let mut s = format!(
            "{} rules loaded, {} for other logsources, {} invalid; {} events, {} matched",
            self.rules.len(),
            self.rules.other_logsource.len(),
            self.rules.skipped.len(),
            self.events,
            self.matched.len()
        );
        for sk in &self.rules.skipped {
            s.push_str(&format!("\ninvalid: {}: {}", sk.path.display(), sk.reason));
        }
        s
    }
}

pub fn run(
    rules: &[PathBuf],
    fields: &BTreeMap<String, String>,
    placeholders: &BTreeMap<String, Vec<String>>,
    files: &[PathBuf],
) -> Result<Report, DetectTestError> {
    let rules = Rules::load(rules, fields, placeholders, true)?;
    let mut matched = Vec::new();
    let mut events = 0;
    for file in files {
        for (index, raw) in read_events(file)?.iter().enumerate() {
            events += 1;
            // As the pipeline sees it: the head the split reads, then the candidate rules.
            let Ok(head) = crate::cloudtrail::listed_head_of(raw) else {
                continue;
            };
            let keys = Keys::of(&head, true, &[]);
            let listed = head.members.as_ref().and_then(|m| m.of(raw));
            let Inspected::Evaluated { hits, .. } = rules.inspect(raw, &[], keys, listed) else {
                continue;
            };
            if hits.is_empty() {
                continue;
            }
            let text = |v: Option<&str>| v.map(str::to_owned);
            matched.push(EventMatches {
                file: file.display().to_string(),
                index,
                event_id: text(head.event_id.as_deref()),
                event_name: text(head.event_name.as_deref()),
                matches: hits
                    .into_iter()
                    .map(|h| Matched {
                        id: h.id.to_string(),
                        title: h.title.to_string(),
                        level: h.level.as_str(),
                    })
                    .collect(),
            });
        }
    }
    Ok(Report {
        matched,
        events,
        rules,
    })
}
