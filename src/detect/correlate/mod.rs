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
use std::sync::Mutex;

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
    /// `id` and a hash of what decides the counting (type, rules, group-by, timespan, window,
    /// condition, aliases): it keys the state, so a changed definition starts afresh and an
    /// unchanged one keeps its counts across a rule reload.
    fingerprint: String,
    /// Its states (its own memory, or the shared table).
    store: Store,
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
    retention_secs: u64,
    /// State keys of windows that fired, and the event that fired each: another event of a
    /// fired window changes nothing, so it is not written again (on DynamoDB a write costs
    /// by the item's size, and a fired item is a full one). Only the firing event's own
    /// redelivery goes to the store (it fires again).
    fired: Mutex<HashMap<String, String>>,
    /// Correlations not loaded under `skip_invalid`.
    pub skipped: Vec<Skipped>,
}

/// Fired windows remembered per rule set (about 200 bytes each); when full it starts afresh,
/// which costs only writes.
const FIRED_MAX: usize = 50_000;

fn kind_name(t: CorrelationType) -> &'static str {
    match t {
        CorrelationType::EventCount => "event_count",
        CorrelationType::ValueCount => "value_count",
        CorrelationType::Temporal => "temporal",
        other => other.as_str(),
    }
}

/// The cap for a threshold condition: one past the highest number it compares with (past it
/// no comparison changes). None when that is more than a state may hold (`MEMBERS_MAX`).
fn cap_of(c: &CompiledCorrelation) -> Option<usize> {
    let cap = match c.correlation_type {
        CorrelationType::Temporal => c.rule_refs.len().max(1),
        _ => {
            let top = c
                .condition
                .predicates
                .iter()
                .map(|(_, v)| *v)
                .fold(0.0_f64, f64::max);
            // Clamped before the cast: a NaN or huge threshold from YAML cannot wrap.
            (top.clamp(0.0, window::MEMBERS_MAX as f64).ceil() as usize).saturating_add(1)
        }
    };
    (cap <= window::MEMBERS_MAX).then_some(cap)
}

/// Whether a state meets the correlation's condition.
fn holds(c: &CompiledCorrelation, state: &State) -> bool {
    match c.correlation_type {
        CorrelationType::Temporal => {
            // The rules seen, by the name the correlation writes (a long one is kept hashed).
            let rule_hits: HashMap<String, VecDeque<i64>> = c
                .rule_refs
                .iter()
                .filter(|r| state.members.contains(&window::member(r)))
                .map(|r| (r.clone(), VecDeque::from([0])))
                .collect();
            // Sigma: a temporal correlation without a condition needs every rule it names.
            // rsigma-parser reads the absent condition as `gte: 1` (so an explicit `gte: 1`
            // reads the same: use `condition: "a or b"` for any one).
            if c.extended_expr.is_none() && is_default_temporal(c) {
                return rule_hits.len() >= c.rule_refs.len();
            }
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

/// Whether a temporal correlation's condition is the one rsigma-parser gives an absent one.
fn is_default_temporal(c: &CompiledCorrelation) -> bool {
    c.condition.field.is_none()
        && matches!(
            c.condition.predicates.as_slice(),
            [(rsigma_parser::ConditionOperator::Gte, n)] if *n == 1.0
        )
}

/// A hash of what decides a correlation's counting: not its title, level, tags or prose, so
/// that editing those keeps the counts.
fn definition_hash(rule: &rsigma_parser::CorrelationRule) -> String {
    use sha2::{Digest, Sha256};
    let def = (
        &rule.correlation_type,
        &rule.rules,
        &rule.group_by,
        &rule.timespan,
        &rule.window,
        &rule.gap,
        &rule.condition,
        &rule.aliases,
        rule.generate,
    );
    // Through a Value, whose maps are sorted: `aliases` holds HashMaps, whose order differs
    // per process, and the hash names DynamoDB items that every worker must agree on. Plain
    // data: cannot fail (an empty hash input would still be stable).
    let bytes = serde_json::to_value(def)
        .and_then(|v| serde_json::to_vec(&v))
        .unwrap_or_default();
    Sha256::digest(&bytes)
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The store correlations start from: memory, or the DynamoDB table (checked, created when
/// missing). Opened once; every rule set compiled later uses it.
pub async fn open_store(cfg: &CorrelationConfig) -> Result<Store, CorrelateError> {
    Ok(match cfg.mode {
        Mode::InProcess => Store::memory_within(cfg.max_members()),
        Mode::Dynamodb => {
            let shared =
                crate::aws::config(cfg.region.as_deref(), cfg.endpoint_url.as_deref()).await;
            Store::dynamo(&shared, cfg.table.as_deref().unwrap_or_default()).await?
        }
    })
}

impl Correlator {
    /// The correlations of `rules` (None when there are none), their states in `base`'s kind
    /// of store. A correlation `previous` (the running set) holds with the same id and
    /// definition keeps its memory states; the states of changed and removed ones are dropped
    /// with `previous`.
    pub fn build(
        rules: &Rules,
        base: &Store,
        previous: Option<&Correlator>,
        retention_secs: u64,
        skip_invalid: bool,
    ) -> Result<Option<Correlator>, CorrelateError> {
        if rules.correlations.is_empty() {
            return Ok(None);
        }
        Correlator::compile(rules, base, previous, retention_secs, skip_invalid).map(Some)
    }

    /// The correlations of `rules`. A correlation that does not compile, refers to an unknown
    /// rule or uses what is not supported is an error naming it, or skipped.
    pub fn compile(
        rules: &Rules,
        base: &Store,
        previous: Option<&Correlator>,
        retention_secs: u64,
        skip_invalid: bool,
    ) -> Result<Correlator, CorrelateError> {
        let kept: HashMap<&str, &Store> = previous
            .into_iter()
            .flat_map(|p| &p.correlations)
            .map(|c| (c.fingerprint.as_str(), &c.store))
            .collect();
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
            retention_secs,
            fired: Mutex::new(HashMap::new()),
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
            // Conditions are checked as each event arrives, not when the window closes: one that
            // a growing count can make false again (`lt`, `lte`, `eq`, `neq`, a range's upper
            // bound) would fire early or never, so it is refused.
            if c.correlation_type != CorrelationType::Temporal
                && c.condition.predicates.iter().any(|(op, _)| {
                    !matches!(
                        op,
                        rsigma_parser::ConditionOperator::Gt
                            | rsigma_parser::ConditionOperator::Gte
                    )
                })
            {
                refuse(
                    "only gt/gte thresholds are supported (the condition is checked as events \
                     arrive, so lt, lte, eq, neq and range upper bounds cannot be honoured)"
                        .into(),
                    &mut out,
                )?;
                continue;
            }
            let Some(cap) = cap_of(&c) else {
                refuse(
                    format!(
                        "a threshold above {} is not supported (the state keeps one member per \
                         counted event or value, and a DynamoDB item holds 400 KB)",
                        window::MEMBERS_MAX - 1
                    ),
                    &mut out,
                )?;
                continue;
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
            let fingerprint = format!("{id}#{}", definition_hash(rule));
            // Two correlations with one id and definition would share states: the second
            // gets its own (its key differs by position).
            let fingerprint = if out
                .correlations
                .iter()
                .any(|o| o.fingerprint == fingerprint)
            {
                format!("{fingerprint}#{idx}")
            } else {
                fingerprint
            };
            let store = match kept.get(fingerprint.as_str()) {
                Some(s) => (*s).clone(),
                None => base.fresh(),
            };
            out.correlations.push(Compiled {
                cap,
                level: level_of(c.level.as_ref()),
                id,
                counted,
                fingerprint,
                store,
                c,
            });
        }
        // In memory, the correlations share `detect.correlation.max_members` evenly.
        for c in &out.correlations {
            c.store.share(out.correlations.len());
        }
        Ok(out)
    }

    pub fn len(&self) -> usize {
        self.correlations.len()
    }

    pub fn is_empty(&self) -> bool {
        self.correlations.is_empty()
    }

    /// States held in memory across the correlations.
    pub fn held_states(&self) -> usize {
        self.correlations.iter().map(|c| c.store.held()).sum()
    }

    /// Whether a rule's matches alone alert (false when only correlations use it).
    pub fn alerts_alone(&self, hit_id: &str) -> bool {
        !self.silenced.contains(hit_id)
    }

    /// Whether any correlation uses one of `hits` (nothing to do otherwise).
    pub fn wants(&self, hits: &[Hit]) -> bool {
        hits.iter().any(|h| self.by_hit.contains_key(&*h.id))
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
        // What a state keeps is bounded (`window::member`), the claim's eventID too.
        let event_id = window::member(event_id);
        let event_id = event_id.as_str();
        let mut fired = Vec::new();
        let mut done = HashSet::new();
        for h in hits {
            for (idx, written) in self.by_hit.get(&*h.id).into_iter().flatten() {
                let Some(corr) = self.correlations.get(*idx) else {
                    continue;
                };
                let c = &corr.c;
                let group = GroupKey::extract(&ev, &c.group_by, &[written.as_str()]);
                // An event without a group-by field is in no group (as the Sigma backends'
                // `group by` leaves it out): pooled under null it would join unrelated events.
                if group.0.iter().any(Option::is_none) {
                    crate::metrics::emit(crate::metrics::CorrelationSkipped {
                        reason: crate::metrics::SkipReason::GroupMissing,
                    });
                    continue;
                }
                let member = match c.correlation_type {
                    CorrelationType::EventCount => event_id.to_owned(),
                    CorrelationType::ValueCount => {
                        let values = GroupKey::extract(&ev, &corr.counted, &[]);
                        match counted_value(&values.0) {
                            Some(v) => window::member(&v),
                            None => continue,
                        }
                    }
                    _ => window::member(written),
                };
                // An event two of a correlation's rules match counts once.
                if !done.insert((*idx, member.clone())) {
                    continue;
                }
                let w = window::window(ts, c.timespan_secs);
                let group_text = group_json(&group.0);
                let key = state_key(&corr.fingerprint, w, &group_text);
                if self.fired_by(&key).is_some_and(|by| by != event_id) {
                    continue;
                }
                let update = Update {
                    key: &key,
                    member: &member,
                    cap: corr.cap,
                    expires_at: expires_at(w, now, self.retention_secs),
                    correlation: &corr.id,
                    window_start: w.start,
                    group: window::clip(&group_text, window::GROUP_TEXT_MAX),
                };
                let state = corr.store.add(&update, now).await?;
                if !holds(c, &state) {
                    continue;
                }
                let mine = match state.fired_by.as_deref() {
                    Some(by) => {
                        self.remember_fired(&key, by);
                        by == event_id
                    }
                    None => corr.store.claim(&key, event_id).await?,
                };
                if mine {
                    self.remember_fired(&key, event_id);
                    fired.push(self.fired(corr, &group, w, state.members.len()));
                }
            }
        }
        Ok(fired)
    }

    fn fired_map(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        self.fired.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The event that fired the window at `key`, when this process has seen it fire.
    fn fired_by(&self, key: &str) -> Option<String> {
        self.fired_map().get(key).cloned()
    }

    fn remember_fired(&self, key: &str, by: &str) {
        let mut m = self.fired_map();
        if m.len() >= FIRED_MAX && !m.contains_key(key) {
            m.clear();
        }
        m.insert(key.to_owned(), by.to_owned());
    }

    fn fired(&self, corr: &Compiled, group: &GroupKey, w: Window, value: usize) -> Fired {
        let c = &corr.c;
        let at = |t: i64| crate::clock::Utc::from_unix(t).rfc3339();
        Fired {
            hit: Hit {
                id: corr.id.as_str().into(),
                title: c.title.as_str().into(),
                level: corr.level,
                tags: c.tags.as_slice().into(),
            },
            detail: Correlated {
                kind: kind_name(c.correlation_type),
                group: c
                    .group_by
                    .iter()
                    .zip(group.0.iter())
                    // A value is input: the alert carries at most `GROUP_VALUE_MAX` bytes.
                    .map(|(f, v)| {
                        let v = v.as_deref().map(|v| window::clip(v, GROUP_VALUE_MAX));
                        (f.name().to_owned(), v.map(str::to_owned))
                    })
                    .collect(),
                value,
                window_start: at(w.start),
                window_end: at(w.end),
            },
        }
    }
}

/// The most bytes of one group-by value an alert copies (the state is keyed by all of it).
const GROUP_VALUE_MAX: usize = 256;

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
