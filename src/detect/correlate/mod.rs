//! Sigma correlation rules (`event_count`, `value_count`, `temporal`) over the matches of
//! the detection rules, per group and time window.
//!
//! rsigma-eval parses and compiles the correlations (`compile_correlation`), extracts group
//! keys (`GroupKey`) and checks conditions, `temporal` expressions included
//! (`WindowState::check_condition`). Its `CorrelationEngine` keeps its windows in this
//! process's memory, which cannot give a global count when workers each see a share of the
//! stream; so the state lives in a `Store` (memory, or DynamoDB shared by every worker) as
//! a set per correlation, group and window, and one event per window claims its alert.
//!
//! What is counted is idempotent: eventIDs (`event_count`), values (`value_count`) or rule
//! names (`temporal`), so an event delivered twice (at-least-once) counts once. The event that
//! fired a window is recorded with it: when its notification comes again (its alert was not
//! delivered), it fires again.

pub mod config;
pub mod store;
pub mod window;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

use rsigma_eval::correlation::{CompiledCorrelation, GroupByField, GroupKey, WindowState};
use rsigma_eval::event::JsonEvent;
use rsigma_parser::{CorrelationType, WindowMode};
use serde::Serialize;
use serde_json::Value;

use super::config::Level;
use super::rules::{Hit, Rules, Skipped, level_of};
use config::{CorrelationConfig, Mode};
use store::{State, Store, StoreError, Update};
use window::{Window, counted_value, expires_at, group_json, state_key};

#[derive(Debug, thiserror::Error)]
pub enum CorrelateError {
    #[error("detect.rules: {path}: correlation {title:?}: {reason}")]
    Invalid {
        path: String,
        title: String,
        reason: String,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

struct Compiled {
    c: CompiledCorrelation,
    /// Names it in alerts, metrics and state keys: its id, else its name, else its title.
    id: String,
    level: Level,
    /// Members a state keeps: past the highest threshold nothing changes.
    cap: usize,
    /// `value_count`'s field(s), as group-by fields so that rsigma-eval reads their values.
    counted: Vec<GroupByField>,
}

/// What a correlation alert adds to the alert document.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Correlated {
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// Group-by field → the group's value (null when the events lack the field).
    pub group: BTreeMap<String, Option<String>>,
    /// Events (`event_count`), distinct values (`value_count`) or rules (`temporal`) in
    /// the window when it fired.
    pub value: usize,
    pub window_start: String,
    pub window_end: String,
}

/// A correlation whose condition became true for a group and window.
#[derive(Debug, Clone)]
pub struct Fired {
    pub hit: Hit,
    pub detail: Correlated,
}

pub struct Correlator {
    correlations: Vec<Compiled>,
    /// A detection rule's `Hit::id` → the correlations that use it, with the reference as
    /// each one writes it (id or name: aliases and `temporal` are keyed by it).
    by_hit: HashMap<String, Vec<(usize, String)>>,
    /// Rules referenced by a correlation without `generate: true`: their matches alone do
    /// not alert (Sigma's default).
    silenced: HashSet<String>,
    store: Store,
    retention_secs: u64,
    /// Correlations not loaded under `skip_invalid`.
    pub skipped: Vec<Skipped>,
}

fn kind_name(t: CorrelationType) -> &'static str {
    match t {
        CorrelationType::EventCount => "event_count",
        CorrelationType::ValueCount => "value_count",
        CorrelationType::Temporal => "temporal",
        other => other.as_str(),
    }
}

/// The cap for a threshold condition: one past the highest number it compares with.
fn cap_of(c: &CompiledCorrelation) -> usize {
    match c.correlation_type {
        CorrelationType::Temporal => c.rule_refs.len().max(1),
        _ => {
            let top = c
                .condition
                .predicates
                .iter()
                .map(|(_, v)| *v)
                .fold(0.0_f64, f64::max);
            // Thresholds are whole numbers from YAML; 1e6 bounds an item far below 400 KB.
            (top.clamp(0.0, 1e6).ceil() as usize) + 1
        }
    }
}

/// Whether a state meets the correlation's condition.
fn holds(c: &CompiledCorrelation, state: &State) -> bool {
    match c.correlation_type {
        CorrelationType::Temporal => {
            let rule_hits = state
                .members
                .iter()
                .map(|r| (r.clone(), VecDeque::from([0])))
                .collect();
            WindowState::Temporal { rule_hits }
                .check_condition(
                    &c.condition,
                    c.correlation_type,
                    &c.rule_refs,
                    c.extended_expr.as_ref(),
                )
                .is_some()
        }
        _ => c.condition.check(state.members.len() as f64),
    }
}

impl Correlator {
    /// Compiles the correlations of `rules` (None when there are none) and opens their store.
    pub async fn open(
        rules: &Rules,
        cfg: &CorrelationConfig,
        skip_invalid: bool,
    ) -> Result<Option<Correlator>, CorrelateError> {
        if rules.correlations.is_empty() {
            return Ok(None);
        }
        let store = match cfg.mode {
            Mode::InProcess => Store::memory(),
            Mode::Dynamodb => {
                let shared =
                    crate::aws::config(cfg.region.as_deref(), cfg.endpoint_url.as_deref()).await;
                Store::dynamo(&shared, cfg.table.as_deref().unwrap_or_default()).await?
            }
        };
        Correlator::compile(rules, store, cfg.retention_secs, skip_invalid).map(Some)
    }

    /// The correlations of `rules` over `store`. A correlation that does not compile, refers
    /// to an unknown rule or uses what is not supported is an error naming it, or skipped.
    pub fn compile(
        rules: &Rules,
        store: Store,
        retention_secs: u64,
        skip_invalid: bool,
    ) -> Result<Correlator, CorrelateError> {
        let mut known: HashMap<&str, Vec<&str>> = HashMap::new();
        for (id, name) in &rules.identities {
            known.entry(id.as_str()).or_default().push(id.as_str());
            if let Some(n) = name {
                known.entry(n.as_str()).or_default().push(id.as_str());
            }
        }
        let mut out = Correlator {
            correlations: Vec::new(),
            by_hit: HashMap::new(),
            silenced: HashSet::new(),
            store,
            retention_secs,
            skipped: Vec::new(),
        };
        for (path, rule) in &rules.correlations {
            let refuse = |reason: String, out: &mut Correlator| {
                if skip_invalid {
                    out.skipped.push(Skipped {
                        path: path.clone(),
                        reason: format!("correlation {:?}: {reason}", rule.title),
                    });
                    Ok(())
                } else {
                    Err(CorrelateError::Invalid {
                        path: path.display().to_string(),
                        title: rule.title.clone(),
                        reason,
                    })
                }
            };
            match rule.correlation_type {
                CorrelationType::EventCount
                | CorrelationType::ValueCount
                | CorrelationType::Temporal => {}
                other => {
                    refuse(
                        format!(
                            "type {} is not supported (event_count, value_count, temporal)",
                            other.as_str()
                        ),
                        &mut out,
                    )?;
                    continue;
                }
            }
            if rule.window == WindowMode::Session {
                refuse(
                    "session windows are not supported (windows are tumbling)".into(),
                    &mut out,
                )?;
                continue;
            }
            let c = match rsigma_eval::correlation::compile_correlation(rule) {
                Ok(c) => c,
                Err(e) => {
                    refuse(e.to_string(), &mut out)?;
                    continue;
                }
            };
            let mut uses = Vec::new();
            let mut unknown = None;
            for r in &c.rule_refs {
                match known.get(r.as_str()) {
                    Some(ids) => uses.extend(ids.iter().map(|id| ((*id).to_owned(), r.clone()))),
                    None => {
                        unknown = Some(r.clone());
                        break;
                    }
                }
            }
            if let Some(r) = unknown {
                let is_correlation = rules
                    .correlations
                    .iter()
                    .any(|(_, o)| o.id.as_deref() == Some(&r) || o.name.as_deref() == Some(&r));
                let reason = if is_correlation {
                    format!(
                        "refers to correlation {r:?}: correlations of correlations are not supported"
                    )
                } else {
                    format!("refers to {r:?}, which no loaded CloudTrail rule is (by id or name)")
                };
                refuse(reason, &mut out)?;
                continue;
            }
            let idx = out.correlations.len();
            for (hit_id, written) in uses {
                if !c.generate {
                    out.silenced.insert(hit_id.clone());
                }
                out.by_hit.entry(hit_id).or_default().push((idx, written));
            }
            let counted = c
                .condition
                .field
                .iter()
                .flatten()
                .map(|f| GroupByField::Direct(f.clone()))
                .collect();
            let id =
                c.id.clone()
                    .or_else(|| c.name.clone())
                    .unwrap_or_else(|| c.title.clone());
            out.correlations.push(Compiled {
                cap: cap_of(&c),
                level: level_of(c.level.as_ref()),
                id,
                counted,
                c,
            });
        }
        Ok(out)
    }

    pub fn len(&self) -> usize {
        self.correlations.len()
    }

    pub fn is_empty(&self) -> bool {
        self.correlations.is_empty()
    }

    /// Whether a rule's matches alone alert (false when only correlations use it).
    pub fn alerts_alone(&self, hit_id: &str) -> bool {
        !self.silenced.contains(hit_id)
    }

    /// Whether any correlation uses one of `hits` (nothing to do otherwise).
    pub fn wants(&self, hits: &[Hit]) -> bool {
        hits.iter().any(|h| self.by_hit.contains_key(&h.id))
    }

    /// Counts `event` (matched by `hits`, at `ts` in Unix seconds) in every correlation that
    /// uses one of its rules, and returns the correlations it made fire. One store update per
    /// correlation, and one more for the event that fires a window.
    pub async fn observe(
        &self,
        hits: &[Hit],
        event: &Value,
        event_id: &str,
        ts: i64,
        now: i64,
    ) -> Result<Vec<Fired>, CorrelateError> {
        let ev = JsonEvent::borrow(event);
        let mut fired = Vec::new();
        let mut done = HashSet::new();
        for h in hits {
            for (idx, written) in self.by_hit.get(&h.id).into_iter().flatten() {
                let Some(corr) = self.correlations.get(*idx) else {
                    continue;
                };
                let c = &corr.c;
                let group = GroupKey::extract(&ev, &c.group_by, &[written.as_str()]);
                let member = match c.correlation_type {
                    CorrelationType::EventCount => event_id.to_owned(),
                    CorrelationType::ValueCount => {
                        let values = GroupKey::extract(&ev, &corr.counted, &[]);
                        match counted_value(&values.0) {
                            Some(v) => v,
                            None => continue,
                        }
                    }
                    _ => written.clone(),
                };
                // An event two of a correlation's rules match counts once.
                if !done.insert((*idx, member.clone())) {
                    continue;
                }
                let w = window::window(ts, c.timespan_secs);
                let group_text = group_json(&group.0);
                let key = state_key(&corr.id, w, &group_text);
                let update = Update {
                    key: &key,
                    member: &member,
                    cap: corr.cap,
                    expires_at: expires_at(w, now, self.retention_secs),
                    correlation: &corr.id,
                    window_start: w.start,
                    group: &group_text,
                };
                let state = self.store.add(&update, now).await?;
                if !holds(c, &state) {
                    continue;
                }
                let mine = match state.fired_by.as_deref() {
                    Some(by) => by == event_id,
                    None => self.store.claim(&key, event_id).await?,
                };
                if mine {
                    fired.push(self.fired(corr, &group, w, state.members.len()));
                }
            }
        }
        Ok(fired)
    }

    fn fired(&self, corr: &Compiled, group: &GroupKey, w: Window, value: usize) -> Fired {
        let c = &corr.c;
        let at = |t: i64| crate::clock::Utc::from_unix(t).rfc3339();
        Fired {
            hit: Hit {
                id: corr.id.clone(),
                title: c.title.clone(),
                level: corr.level,
                tags: c.tags.clone(),
            },
            detail: Correlated {
                kind: kind_name(c.correlation_type),
                group: c
                    .group_by
                    .iter()
                    .zip(group.0.iter())
                    .map(|(f, v)| (f.name().to_owned(), v.clone()))
                    .collect(),
                value,
                window_start: at(w.start),
                window_end: at(w.end),
            },
        }
    }
}

/// What identifies an event in `event_count` state: its eventID, else a hash of the event.
pub fn event_key(event_id: Option<&str>, raw: &[u8]) -> String {
    match event_id {
        Some(id) if !id.is_empty() => id.to_owned(),
        _ => {
            use sha2::{Digest, Sha256};
            let d = Sha256::digest(raw);
            let hex: String = d.iter().take(16).map(|b| format!("{b:02x}")).collect();
            format!("sha256:{hex}")
        }
    }
}

#[cfg(test)]
mod tests;
