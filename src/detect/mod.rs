//! In-stream detections: Sigma rules over each event as it is written (after geo and the
//! transforms), optional `"detections"` annotations, and alerts delivered at-least-once.
//!
//! `Detect::inspect` runs on the worker thread, once per written event: the event is parsed
//! once (its additions, such as `geo`, merged in), evaluated, and each match becomes one alert
//! document per output that wants it (`min_level`, `suppress_secs`). Every alert carries a
//! share of its notification's `Hold`, committed only when the output has the alert: an
//! output outage holds acknowledgement, and after `max_attempts` the notification is handed
//! back and delivered again, so no alert is lost (some may repeat).

#[cfg(feature = "query")]
pub mod backtest;
pub mod config;
pub mod correlate;
mod listed;
mod literals;
pub mod members;
pub mod output;
pub mod prefilter;
pub mod rules;
pub mod suppress;
pub mod trial;
mod view;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;
use tokio::sync::mpsc;

use crate::ack::Hold;
use crate::cloudtrail::Head;
use crate::metrics::{
    self, AlertEventOmitted, AlertSuppressed, DetectionMatched, EventNotEvaluated, EventsEvaluated,
};
use crate::watch::{Stamp, stamp};
use config::{AlertConfig, AlertKind, DetectConfig, EventPayload};
use correlate::{Correlated, Correlator, Fired};
use output::{Output, OutputError, Pending};
use prefilter::Keys;
use rules::{Hit, Inspected, RuleError, Rules};
use suppress::Suppressor;

#[derive(Debug, thiserror::Error)]
pub enum DetectError {
    #[error(transparent)]
    Rules(#[from] RuleError),
    #[error(transparent)]
    Output(#[from] OutputError),
    #[error(transparent)]
    Correlate(#[from] correlate::CorrelateError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
}

/// An alert output as the workers see it: where its alerts go and what it wants.
struct Route {
    cfg: AlertConfig,
    label: String,
    tx: mpsc::Sender<Pending>,
    suppressor: Option<Arc<Suppressor>>,
}

/// A rule set and the correlations compiled from it: swapped together, so a worker never
/// counts with correlations of another set than the rules it evaluated.
pub struct Running {
    pub rules: Rules,
    pub correlator: Option<Correlator>,
}

/// Rules and alert outputs, shared by every worker.
pub struct Detect {
    /// Swapped whole by `reload`; a worker reads it once per event.
    running: RwLock<Arc<Running>>,
    /// The correlation store every rule set's correlations start from (memory, or the table
    /// opened at start).
    store: correlate::store::Store,
    /// Where the rules come from, to compile them again (None for `rules_only`).
    from: Option<DetectConfig>,
    /// The rule files as last read: a change in any (or a file added or gone) reloads.
    stamps: Mutex<Vec<(PathBuf, Option<Stamp>)>>,
    annotate: bool,
    routes: Vec<Route>,
    worker: String,
    /// The runtime correlation store calls run on (the worker threads block on them: a
    /// notification is acknowledged only after its state update). None for `rules_only`.
    rt: Option<tokio::runtime::Handle>,
    /// Matched events a correlation could not count (a store call failed, or its breaker is
    /// open) that no notification brings back (local files have no hold): the run must say
    /// it failed, as `Delivery::finish` does.
    uncounted: Arc<AtomicU64>,
}

/// The delivery tasks; they end once every `Detect` is dropped and their queues are empty.
/// With them, the count of matched events correlations could not count without a hold.
pub struct Delivery(
    Vec<tokio::task::JoinHandle<output::Undelivered>>,
    Arc<AtomicU64>,
);

impl Delivery {
    /// Waits for every queued alert; returns a line per output that gave up alerts no
    /// notification will bring back (local files), for the run's failures.
    pub async fn finish(self) -> Vec<String> {
        let mut failures = Vec::new();
        let uncounted = self.1.load(Ordering::Relaxed);
        if uncounted > 0 {
            failures.push(format!(
                "{uncounted} matched event(s) not counted in their correlations: the correlation store failed or its breaker was open (see trailhose_correlation_failures_total and trailhose_correlation_skipped_total{{reason=\"breaker_open\"}})"
            ));
        }
        for h in self.0 {
            match h.await {
                Ok(u) if u.alerts > 0 => failures.push(format!(
                    "{} alert(s) not delivered to alert output {:?}",
                    u.alerts, u.output
                )),
                Ok(_) => {}
                Err(e) => failures.push(format!("an alert output stopped: {e}")),
            }
        }
        failures
    }
}

/// One event as it is about to be written.
pub struct Seen<'a> {
    pub raw: &'a [u8],
    /// Fragments spliced into it (`"geo":{…}`).
    pub additions: &'a [&'a [u8]],
    pub head: &'a Head<'a>,
    /// `head` was read from `raw` itself (not a module's output, whose head may inherit
    /// fields the event lacks): the rules it cannot match are skipped without parsing.
    pub exact_head: bool,
    /// Its partition in the output (S3 alerts are partitioned the same way).
    pub partition: &'a str,
    /// The file it came from.
    pub source: &'a str,
    pub hold: Option<&'a Hold>,
}

/// Alerts waiting per output before a worker blocks (back-pressure during an outage).
const QUEUE: usize = 1024;

impl Detect {
    /// Compiles the rules and opens the alert outputs (in a runtime: clients are built and
    /// delivery tasks spawned).
    pub async fn open(cfg: &DetectConfig) -> Result<(Arc<Detect>, Delivery), DetectError> {
        let stamps = stamps_of(&cfg.rules);
        let rules = load(cfg)?;
        let store = correlate::open_store(&cfg.correlation).await?;
        let correlator = correlations(cfg, &rules, &store, None)?;
        let mut routes = Vec::new();
        let mut tasks = Vec::new();
        let uncounted = Arc::new(AtomicU64::new(0));
        metrics::emit(metrics::CorrelationCountersReady);
        for (i, a) in cfg.alerts.iter().enumerate() {
            // A target from the environment is read now; the error names the variable only.
            let a = &a.resolved(i + 1)?;
            let out = Output::open(a).await?;
            // Its series exist from the start, at 0: an alert rule's `increase()` then sees
            // the first failure after start-up too.
            metrics::emit(metrics::AlertOutputOpened { output: &a.label() });
            let (tx, rx) = mpsc::channel(QUEUE);
            let suppressor = (a.suppress_secs > 0)
                .then(|| Arc::new(Suppressor::new(Duration::from_secs(a.suppress_secs))));
            tasks.push(tokio::spawn(output::run(out, rx)));
            routes.push(Route {
                cfg: a.clone(),
                label: a.label(),
                tx,
                suppressor,
            });
        }
        let detect = Arc::new(Detect {
            running: RwLock::new(Arc::new(Running { rules, correlator })),
            store,
            from: Some(cfg.clone()),
            stamps: Mutex::new(stamps),
            annotate: cfg.annotate,
            routes,
            worker: worker_name(),
            rt: Some(tokio::runtime::Handle::current()),
            uncounted: uncounted.clone(),
        });
        if let Some(every) = cfg.reload()
            && let Err(e) = crate::watch::poll("detect-watch", &detect, every, |d| d.reload(false))
        {
            metrics::emit(metrics::RulesReloaded {
                rules: None,
                error: Some(&format!("cannot start the file watcher: {e}")),
            });
        }
        Ok((detect, Delivery(tasks, uncounted)))
    }

    /// Compiles the rules again when a rule file changed (or always, with `force`: SIGHUP).
    /// A set that does not load keeps the running one, counted and logged.
    pub fn reload(&self, force: bool) {
        let Some(cfg) = &self.from else { return };
        let now = stamps_of(&cfg.rules);
        {
            let mut last = self.stamps.lock().unwrap_or_else(|p| p.into_inner());
            if !force && *last == now {
                return;
            }
            *last = now;
        }
        let old = self.running();
        let built = load(cfg).map_err(DetectError::from).and_then(|rules| {
            let correlator = correlations(cfg, &rules, &self.store, old.correlator.as_ref())?;
            Ok(Running { rules, correlator })
        });
        match built {
            Ok(new) => {
                let n = new.rules.len();
                *self.running.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(new);
                metrics::emit(metrics::RulesReloaded {
                    rules: Some(n),
                    error: None,
                });
            }
            Err(e) => metrics::emit(metrics::RulesReloaded {
                rules: None,
                error: Some(&e.to_string()),
            }),
        }
    }

    /// Rules only, for `detect test`: no outputs.
    pub fn rules_only(rules: Rules) -> Detect {
        Detect {
            running: RwLock::new(Arc::new(Running {
                rules,
                correlator: None,
            })),
            store: correlate::store::Store::memory(),
            from: None,
            stamps: Mutex::new(Vec::new()),
            annotate: false,
            routes: Vec::new(),
            worker: worker_name(),
            rt: None,
            uncounted: Arc::new(AtomicU64::new(0)),
        }
    }

    /// The rule set (and its correlations) running now.
    pub fn running(&self) -> Arc<Running> {
        self.running
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Whether matched events get a `"detections"` member (which trailhose then owns).
    pub fn annotates(&self) -> bool {
        self.annotate
    }

    /// Evaluates one event, queues its alerts, and returns the `"detections"` fragment to
    /// splice into it when `annotate` is on and a rule matched.
    pub fn inspect(&self, seen: &Seen<'_>) -> Option<Vec<u8>> {
        let started = Instant::now();
        // One set for the whole event: a reload meanwhile applies from the next one.
        let running = self.running();
        let keys = Keys::of(seen.head, seen.exact_head, seen.additions);
        let listed = seen.head.members.as_ref().and_then(|m| m.of(seen.raw));
        let inspected = running
            .rules
            .inspect(seen.raw, seen.additions, keys, listed);
        metrics::emit(EventsEvaluated {
            events: 1,
            elapsed: started.elapsed(),
        });
        let (hits, read) = match inspected {
            Inspected::Skipped => return None,
            Inspected::Evaluated { hits, event } => (hits, event),
            Inspected::Unreadable => {
                // The splitter takes events serde_json will not build (nested deeper than
                // it builds, a lone surrogate escape): when a member a candidate rule reads is
                // one, the event is written but that rule did not see it. Said, not silent.
                metrics::emit(EventNotEvaluated {
                    source: seen.source,
                    event_id: seen.head.event_id.as_deref().map(clip),
                });
                return None;
            }
        };
        if hits.is_empty() {
            return None;
        }
        for h in &hits {
            metrics::emit(DetectionMatched {
                rule: &h.id,
                level: h.level.as_str(),
            });
        }
        // Alerts and correlations read any member of a matched event: the whole event, or
        // (one serde will not build whole, e.g. a member nested too deep for it) every part
        // that builds. The rules saw what they read either way.
        // Without outputs or correlations the event is not read again: no tree is built.
        let event = match self.routes.is_empty() && running.correlator.is_none() {
            true => read.unwrap_or_default(),
            false => parse_written(seen.raw, seen.additions)
                .or_else(|| members::readable(seen.raw, seen.additions))
                .or(read)
                .unwrap_or_default(),
        };
        let correlator = running.correlator.as_ref();
        let fired = self.correlate(correlator, &hits, &event, seen);
        self.alert(correlator, &hits, &event, seen, None);
        for f in &fired {
            metrics::emit(DetectionMatched {
                rule: &f.hit.id,
                level: f.hit.level.as_str(),
            });
            let hit = std::slice::from_ref(&f.hit);
            self.alert(correlator, hit, &event, seen, Some(&f.detail));
        }
        self.annotate.then(|| annotation(&hits))
    }

    /// Counts the event in the correlations that use its rules (a store update, on the
    /// worker thread) and returns those it fired. A failed update fails the notification's
    /// hold: it is delivered again, and what is counted is idempotent.
    fn correlate(
        &self,
        correlator: Option<&Correlator>,
        hits: &[Hit],
        event: &Value,
        seen: &Seen<'_>,
    ) -> Vec<Fired> {
        let (Some(c), Some(rt)) = (correlator, &self.rt) else {
            return Vec::new();
        };
        if !c.wants(hits) {
            return Vec::new();
        }
        // Its notification failed already (a state update of an earlier event, an upload):
        // it is delivered again and counted then, so calls now would be wasted.
        if seen.hold.is_some_and(Hold::failed) {
            metrics::emit(metrics::CorrelationSkipped {
                reason: metrics::SkipReason::HoldFailed,
            });
            return Vec::new();
        }
        let started = Instant::now();
        let now = crate::clock::Utc::now().to_unix();
        let ts = seen
            .head
            .event_time
            .as_deref()
            .and_then(crate::clock::Utc::parse_rfc3339)
            .map_or(now, crate::clock::Utc::to_unix);
        let id = correlate::event_key(seen.head.event_id.as_deref(), seen.raw);
        let (out, outcome) = match rt.block_on(c.observe(hits, event, &id, ts, now)) {
            Ok(fired) => (fired, metrics::UpdateOutcome::Ok),
            Err(e) => {
                let outcome = match e {
                    correlate::CorrelateError::Store(
                        correlate::store::StoreError::Unavailable { .. },
                    ) => {
                        metrics::emit(metrics::CorrelationSkipped {
                            reason: metrics::SkipReason::BreakerOpen,
                        });
                        metrics::UpdateOutcome::NotCalled
                    }
                    e => {
                        metrics::emit(metrics::CorrelationFailed {
                            error: &e.to_string(),
                        });
                        metrics::UpdateOutcome::Failed
                    }
                };
                match seen.hold {
                    Some(h) => h.share().fail(),
                    // Nothing brings a local file back: the run fails instead.
                    None => {
                        self.uncounted.fetch_add(1, Ordering::Relaxed);
                    }
                }
                (Vec::new(), outcome)
            }
        };
        metrics::emit(metrics::CorrelationUpdated {
            elapsed: started.elapsed(),
            outcome,
        });
        out
    }

    fn alert(
        &self,
        correlator: Option<&Correlator>,
        hits: &[Hit],
        event: &Value,
        seen: &Seen<'_>,
        corr: Option<&Correlated>,
    ) {
        if self.routes.is_empty() {
            return;
        }
        let now = crate::clock::Utc::now().rfc3339();
        // Rules only correlations use do not alert alone (Sigma's `generate: false`).
        let alone = |h: &&Hit| corr.is_some() || correlator.is_none_or(|c| c.alerts_alone(&h.id));
        for route in &self.routes {
            for hit in hits
                .iter()
                .filter(alone)
                .filter(|h| h.level >= route.cfg.min_level)
            {
                let ticket = match &route.suppressor {
                    Some(s) => {
                        let key = suppress::key(&hit.id, &route.cfg.suppress_key, event);
                        match s.admit(key, Instant::now()) {
                            Some(t) => Some((s.clone(), t)),
                            None => {
                                metrics::emit(AlertSuppressed {
                                    output: &route.label,
                                    rule: &hit.id,
                                });
                                continue;
                            }
                        }
                    }
                    None => None,
                };
                let mut doc = AlertDoc {
                    rule_id: &hit.id,
                    rule_title: &hit.title,
                    level: hit.level.as_str(),
                    tags: &hit.tags,
                    event_id: seen.head.event_id.as_deref().map(clip),
                    event_name: seen.head.event_name.as_deref().map(clip),
                    event_time: seen.head.event_time.as_deref().map(clip),
                    source: seen.source,
                    worker: &self.worker,
                    detected_at: &now,
                    event: (route.cfg.event == EventPayload::Full).then_some(event),
                    correlation: corr,
                    event_omitted: None,
                };
                let body = fit(route.cfg.kind, &mut doc);
                if doc.event_omitted.is_some() {
                    metrics::emit(AlertEventOmitted {
                        output: &route.label,
                        rule: &hit.id,
                    });
                }
                let pending = Pending {
                    body,
                    partition: seen.partition.to_owned(),
                    partition_key: output::partition_key(&hit.id, doc.event_id.unwrap_or("")),
                    hold: seen.hold.map(Hold::share),
                    ticket,
                };
                // A closed queue means delivery stopped: the share drops uncommitted and the
                // notification is delivered again, its alert not suppressed by itself.
                if let Err(mpsc::error::SendError(p)) = route.tx.blocking_send(pending)
                    && let Some((s, t)) = p.ticket
                {
                    s.forget(t);
                }
            }
        }
    }
}

/// The alert document (README *Detections* has the schema).
#[derive(Serialize)]
pub struct AlertDoc<'a> {
    pub rule_id: &'a str,
    pub rule_title: &'a str,
    pub level: &'a str,
    pub tags: &'a [String],
    #[serde(rename = "eventID")]
    pub event_id: Option<&'a str>,
    #[serde(rename = "eventName")]
    pub event_name: Option<&'a str>,
    #[serde(rename = "eventTime")]
    pub event_time: Option<&'a str>,
    pub source: &'a str,
    pub worker: &'a str,
    pub detected_at: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event: Option<&'a Value>,
    /// A correlation alert's group, count and window (`event` is the one that fired it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub correlation: Option<&'a Correlated>,
    /// Why `event` is missing with `event = "full"`: `too_large` for the output.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event_omitted: Option<&'static str>,
}

/// The most bytes of an event's own string (eventID, eventName, eventTime) an alert copies:
/// real ones are far shorter, and a hostile one must not make every alert too large to send.
const FIELD_MAX: usize = 256;

fn clip(s: &str) -> &str {
    let mut end = s.len().min(FIELD_MAX);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.get(..end).unwrap_or_default()
}

/// The alert's body for an output of `kind`. One the output would refuse on every attempt
/// (its notification would then come back forever) goes without the event, which stays in
/// the output: eventID and source find it.
fn fit(kind: AlertKind, doc: &mut AlertDoc<'_>) -> Vec<u8> {
    let body = encode(kind, doc);
    if body.len() <= output::max_body(kind) || doc.event.is_none() {
        return body;
    }
    doc.event = None;
    doc.event_omitted = Some("too_large");
    encode(kind, doc)
}

fn encode(kind: AlertKind, doc: &AlertDoc<'_>) -> Vec<u8> {
    match kind {
        AlertKind::Webhook => slack_body(doc),
        // Strings and a parsed event into a Vec: cannot fail.
        _ => serde_json::to_vec(doc).unwrap_or_default(),
    }
}

/// A Slack-compatible webhook body: `text` for humans, the alert document beside it.
fn slack_body(doc: &AlertDoc<'_>) -> Vec<u8> {
    let text = format!(
        "[{}] {} ({}): {} at {} (eventID {})",
        doc.level,
        doc.rule_title,
        doc.rule_id,
        doc.event_name.unwrap_or("event"),
        doc.event_time.unwrap_or("unknown time"),
        doc.event_id.unwrap_or("none"),
    );
    serde_json::to_vec(&serde_json::json!({"text": text, "alert": doc})).unwrap_or_default()
}

/// `"detections":[{"id":…,"title":…,"level":…}]`.
fn annotation(hits: &[Hit]) -> Vec<u8> {
    #[derive(Serialize)]
    struct Short<'a> {
        id: &'a str,
        title: &'a str,
        level: &'a str,
    }
    let list: Vec<Short<'_>> = hits
        .iter()
        .map(|h| Short {
            id: &h.id,
            title: &h.title,
            level: h.level.as_str(),
        })
        .collect();
    let mut out = b"\"detections\":".to_vec();
    // Plain strings into a Vec: cannot fail.
    let _ = serde_json::to_writer(&mut out, &list);
    out
}

/// The event as it will be written: `raw` parsed once, each addition (`"key":value`) merged
/// in. None when `raw` is not a JSON object (the splitter never gives one).
pub fn parse_written(raw: &[u8], additions: &[&[u8]]) -> Option<Value> {
    let mut event: Value = serde_json::from_slice(raw).ok()?;
    let obj = event.as_object_mut()?;
    for add in additions {
        let mut wrapped = Vec::with_capacity(add.len() + 2);
        wrapped.push(b'{');
        wrapped.extend_from_slice(add);
        wrapped.push(b'}');
        if let Ok(Value::Object(m)) = serde_json::from_slice::<Value>(&wrapped) {
            obj.extend(m);
        }
    }
    Some(event)
}

/// Compiles the configured rules, reporting what was skipped.
fn load(cfg: &DetectConfig) -> Result<Rules, RuleError> {
    let rules = Rules::load(&cfg.rules, &cfg.fields, &cfg.placeholders, cfg.skip_invalid)?;
    for s in &rules.skipped {
        metrics::emit(metrics::RuleSkipped {
            path: &s.path.display().to_string(),
            reason: &s.reason,
        });
    }
    metrics::emit(metrics::RulesLoaded { rules: rules.len() });
    Ok(rules)
}

/// The correlations of `rules` (None when there are none), carrying over the states of
/// `previous`'s unchanged ones, reporting what was skipped.
fn correlations(
    cfg: &DetectConfig,
    rules: &Rules,
    store: &correlate::store::Store,
    previous: Option<&Correlator>,
) -> Result<Option<Correlator>, correlate::CorrelateError> {
    let c = Correlator::build(
        rules,
        store,
        previous,
        cfg.correlation.retention_secs,
        cfg.skip_invalid,
    )?;
    for s in c.iter().flat_map(|c| &c.skipped) {
        metrics::emit(metrics::RuleSkipped {
            path: &s.path.display().to_string(),
            reason: &s.reason,
        });
    }
    Ok(c)
}

/// Every rule file under `paths` with its stamp (an unreadable folder lists nothing).
fn stamps_of(paths: &[PathBuf]) -> Vec<(PathBuf, Option<Stamp>)> {
    rules::rule_files(paths)
        .unwrap_or_default()
        .into_iter()
        .map(|p| {
            let s = stamp(&p);
            (p, s)
        })
        .collect()
}

/// Names this process in alerts: `HOSTNAME` (the pod's name on Kubernetes) or the host's.
fn worker_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "trailhose".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_written_event_has_its_additions() {
        let v = parse_written(
            br#"{"eventID":"a","sourceIPAddress":"1.2.3.4"}"#,
            &[br#""geo":{"country_isocode":"GB"}"#],
        )
        .expect("object");
        assert_eq!(v["geo"]["country_isocode"], "GB");
        assert_eq!(v["eventID"], "a");
        assert!(parse_written(b"[1]", &[]).is_none());
        assert!(parse_written(b"{not json", &[]).is_none());
    }

    #[test]
    fn an_alert_too_large_for_its_output_goes_without_the_event_and_hostile_ids_are_clipped() {
        let big =
            serde_json::json!({"eventID": "e", "requestParameters": {"x": "a".repeat(300_000)}});
        let long_id = "é".repeat(10_000);
        let doc = |event| AlertDoc {
            rule_id: "r",
            rule_title: "T",
            level: "high",
            tags: &[],
            event_id: Some(clip(&long_id)),
            event_name: Some("GetObject"),
            event_time: None,
            source: "s3://b/k",
            worker: "w",
            detected_at: "now",
            event,
            correlation: None,
            event_omitted: None,
        };
        for kind in [AlertKind::Sqs, AlertKind::Sns, AlertKind::Webhook] {
            let mut d = doc(Some(&big));
            let body = fit(kind, &mut d);
            assert!(
                body.len() <= output::max_body(kind),
                "{kind:?}: {}",
                body.len()
            );
            let v: Value = serde_json::from_slice(&body).expect("json");
            let alert = if kind == AlertKind::Webhook {
                &v["alert"]
            } else {
                &v
            };
            assert_eq!(alert["event_omitted"], "too_large", "{kind:?}");
            assert!(alert.get("event").is_none());
            assert_eq!(alert["eventID"].as_str().expect("id").len(), FIELD_MAX);
        }
        let mut d = doc(Some(&big));
        let body = fit(AlertKind::S3, &mut d);
        assert!(body.len() > 300_000, "S3 takes the whole event");
        let small = serde_json::json!({"eventID": "e"});
        let mut d = doc(Some(&small));
        let v: Value = serde_json::from_slice(&fit(AlertKind::Sqs, &mut d)).expect("json");
        assert_eq!(v["event"]["eventID"], "e");
        assert!(v.get("event_omitted").is_none());
    }

    #[test]
    fn an_event_the_rules_cannot_see_is_counted() {
        let rules = Rules::load(
            &[std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/detect/rules")],
            &Default::default(),
            &Default::default(),
            false,
        )
        .expect("rules");
        let d = Detect::rules_only(rules);
        // Too deep in a member a rule reads.
        let deep = format!(
            "{{\"eventSource\":\"iam.amazonaws.com\",\"eventName\":{}\"CreateUser\"{}}}",
            "[".repeat(200),
            "]".repeat(200)
        );
        let head = Head {
            event_id: Some("deep".into()),
            ..Head::default()
        };
        let count = || {
            crate::metrics::METRICS
                .render()
                .lines()
                .find_map(|l| l.strip_prefix("trailhose_detect_events_unevaluated_total "))
                .and_then(|n| n.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        let before = count();
        let seen = Seen {
            raw: deep.as_bytes(),
            additions: &[],
            head: &head,
            exact_head: true,
            partition: "",
            source: "s3://b/k",
            hold: None,
        };
        assert!(d.inspect(&seen).is_none());
        assert!(count() >= before + 1.0, "counted");
    }

    /// A webhook receiver on a real socket that answers 200 and hands each body over.
    fn receiver() -> (u16, std::sync::mpsc::Receiver<String>) {
        use std::io::{BufRead, Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let tx = tx.clone();
                std::thread::spawn(move || {
                    let mut r = std::io::BufReader::new(conn.try_clone().expect("clone"));
                    let mut w = conn;
                    loop {
                        let (mut line, mut len) = (String::new(), 0);
                        while r.read_line(&mut line).unwrap_or(0) > 0 && line != "\r\n" {
                            if let Some((k, v)) = line.split_once(':')
                                && k.eq_ignore_ascii_case("content-length")
                            {
                                len = v.trim().parse().unwrap_or(0);
                            }
                            line.clear();
                        }
                        let mut body = vec![0; len];
                        if line.is_empty() || r.read_exact(&mut body).is_err() {
                            break;
                        }
                        let _ = tx.send(String::from_utf8_lossy(&body).into_owned());
                        let ok = "HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
                        if w.write_all(ok.as_bytes()).is_err() {
                            break;
                        }
                    }
                });
            }
        });
        (port, rx)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn with_an_alert_output_an_event_too_deep_to_parse_whole_is_evaluated_and_alerted() {
        let (port, bodies) = receiver();
        let here = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/detect/rules");
        let cfg: DetectConfig = toml::from_str(&format!(
            "rules = [{:?}]\nreload_secs = 0\n[[alerts]]\nkind = \"webhook\"\ntarget = \"http://127.0.0.1:{port}/hook\"\n",
            here.display().to_string()
        ))
        .expect("config");
        let (d, delivery) = Detect::open(&cfg).await.expect("open");
        // 200 arrays deep beside the member the rule reads: serde_json builds the event only
        // without it.
        let raw = format!(
            r#"{{"eventID":"deep","eventSource":"s3.amazonaws.com","eventName":"GetObject","requestParameters":{{"bucketName":"super-secret-bucket","x":{}1{}}},"y":1}}"#,
            "[".repeat(200),
            "]".repeat(200)
        );
        assert!(parse_written(raw.as_bytes(), &[]).is_none());
        let d2 = d.clone();
        tokio::task::spawn_blocking(move || {
            let head = crate::cloudtrail::head_of(raw.as_bytes()).expect("head");
            let geo: &[u8] = br#""geo":{"country_isocode":"GB"}"#;
            d2.inspect(&Seen {
                raw: raw.as_bytes(),
                additions: &[geo],
                head: &head,
                exact_head: true,
                partition: "",
                source: "s3://b/k",
                hold: None,
            });
        })
        .await
        .expect("inspect");
        let body =
            tokio::task::spawn_blocking(move || bodies.recv_timeout(Duration::from_secs(60)))
                .await
                .expect("join")
                .expect("an alert");
        let v: Value = serde_json::from_str(&body).expect("json");
        let alert = &v["alert"];
        assert_eq!(alert["rule_id"], "6f0c8d2e-1a41-4c1e-9a64-3d0b3f1e7a03");
        assert_eq!(alert["eventID"], "deep");
        // The body holds every part that builds, the member the rule matched beside the one
        // nested too deep, additions included.
        assert_eq!(alert["event"]["eventName"], "GetObject");
        assert_eq!(
            alert["event"]["requestParameters"],
            serde_json::json!({"bucketName": "super-secret-bucket"})
        );
        assert_eq!(alert["event"]["y"], 1);
        assert_eq!(alert["event"]["geo"]["country_isocode"], "GB");
        drop(d);
        delivery.finish().await;
    }

    #[tokio::test]
    async fn a_changed_rule_folder_is_loaded_and_a_broken_one_keeps_the_running_rules() {
        let here = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/detect/rules");
        let tmp = std::env::temp_dir().join(format!("trailhose-reload-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).expect("dir");
        std::fs::copy(here.join("iam_change.yml"), tmp.join("iam.yml")).expect("copy");
        let cfg: DetectConfig = toml::from_str(&format!(
            "rules = [{:?}]\nreload_secs = 1",
            tmp.display().to_string()
        ))
        .expect("config");
        let (d, delivery) = Detect::open(&cfg).await.expect("open");
        assert_eq!(d.running().rules.len(), 1);
        let wait_for = |n: usize| {
            let deadline = Instant::now() + Duration::from_secs(30);
            while d.running().rules.len() != n {
                assert!(
                    Instant::now() < deadline,
                    "still {} rules",
                    d.running().rules.len()
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        };
        std::fs::copy(here.join("secret_bucket_read.yml"), tmp.join("secret.yml")).expect("copy");
        wait_for(2);
        std::fs::write(tmp.join("broken.yml"), "title: B\nlogsource: {product: aws}\ndetection:\n  s: {eventName: x}\n  condition: s and t\n").expect("write");
        // The watcher sees the change and refuses it; the two rules stay.
        std::thread::sleep(Duration::from_secs(3));
        assert_eq!(d.running().rules.len(), 2);
        d.reload(true);
        assert_eq!(
            d.running().rules.len(),
            2,
            "SIGHUP's forced reload refuses it too"
        );
        std::fs::remove_file(tmp.join("broken.yml")).expect("rm");
        std::fs::remove_file(tmp.join("secret.yml")).expect("rm");
        wait_for(1);
        drop(d);
        delivery.finish().await;
        let _ = std::fs::remove_dir_all(&tmp);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reload_rebuilds_the_correlations_keeping_unchanged_counts_and_a_bad_set_keeps_both()
    {
        const COUNT: &str = "5c0e7d3a-2b7f-4a39-9d0e-1f6a2c9b8e10";
        let here =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/detect/correlation");
        let tmp =
            std::env::temp_dir().join(format!("trailhose-corr-reload-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).expect("dir");
        let text = std::fs::read_to_string(here.join("logins.yml")).expect("rules");
        std::fs::write(tmp.join("logins.yml"), &text).expect("write");
        let cfg: DetectConfig = toml::from_str(&format!(
            "rules = [{:?}]\nreload_secs = 0",
            tmp.display().to_string()
        ))
        .expect("config");
        let (d, delivery) = Detect::open(&cfg).await.expect("open");
        let fired = || {
            let line = format!("trailhose_detections_total{{level=\"high\",rule=\"{COUNT}\"}} ");
            crate::metrics::METRICS
                .render()
                .lines()
                .find_map(|l| l.strip_prefix(line.as_str()).map(str::to_owned))
                .and_then(|n| n.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        // Worker threads block on the store: feed from a blocking thread, as they do.
        let feed = |d: Arc<Detect>, id: &'static str| async move {
            tokio::task::spawn_blocking(move || {
                let raw = format!(
                    r#"{{"eventID":"{id}","eventTime":"2024-03-18T14:01:00Z","eventSource":"signin.amazonaws.com","eventName":"ConsoleLogin","userIdentity":{{"userName":"alice"}},"responseElements":{{"ConsoleLogin":"Failure"}}}}"#
                );
                let head = Head {
                    event_id: Some(id.into()),
                    event_time: Some("2024-03-18T14:01:00Z".into()),
                    ..Head::default()
                };
                let seen = Seen {
                    raw: raw.as_bytes(),
                    additions: &[],
                    head: &head,
                    exact_head: false,
                    partition: "",
                    source: "s3://b/k",
                    hold: None,
                };
                d.inspect(&seen);
            })
            .await
            .expect("feed");
        };
        for id in ["e1", "e2", "e3", "e4"] {
            feed(d.clone(), id).await;
        }
        let before = fired();
        // A broken file: the running rules and correlations stay, counts and all.
        let running = d.running();
        std::fs::write(tmp.join("broken.yml"), "title: B\nlogsource: {product: aws}\ndetection:\n  s: {eventName: x}\n  condition: s and t\n").expect("write");
        d.reload(true);
        assert!(
            Arc::ptr_eq(&running, &d.running()),
            "a bad set keeps the running one"
        );
        // A good set with the correlation's title edited: rebuilt, its four counts kept.
        std::fs::remove_file(tmp.join("broken.yml")).expect("rm");
        std::fs::write(
            tmp.join("logins.yml"),
            text.replace("within ten minutes", "in ten minutes"),
        )
        .expect("write");
        d.reload(true);
        assert!(!Arc::ptr_eq(&running, &d.running()), "rebuilt");
        drop(running);
        feed(d.clone(), "e5").await;
        assert_eq!(fired(), before + 1.0, "the fifth fires across the reload");
        // A changed threshold starts from zero: two more do not fire, though seven were seen.
        std::fs::write(tmp.join("logins.yml"), text.replace("gte: 5", "gte: 3")).expect("write");
        d.reload(true);
        feed(d.clone(), "e6").await;
        feed(d.clone(), "e7").await;
        assert_eq!(fired(), before + 1.0, "counted afresh");
        feed(d.clone(), "e8").await;
        assert_eq!(fired(), before + 2.0);
        drop(d);
        delivery.finish().await;
        let _ = std::fs::remove_dir_all(&tmp);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn events_of_a_failed_notification_are_not_counted_in_correlations() {
        const COUNT: &str = "5c0e7d3a-2b7f-4a39-9d0e-1f6a2c9b8e10";
        let here =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/detect/correlation");
        let cfg: DetectConfig = toml::from_str(&format!(
            "rules = [{:?}]\nreload_secs = 0",
            here.display().to_string()
        ))
        .expect("config");
        let (d, delivery) = Detect::open(&cfg).await.expect("open");
        let skipped = || {
            let line = "trailhose_correlation_skipped_total{reason=\"hold_failed\"} ";
            crate::metrics::METRICS
                .render()
                .lines()
                .find_map(|l| l.strip_prefix(line).map(str::to_owned))
                .and_then(|n| n.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        let before = skipped();
        let (hold, settled) = Hold::new();
        // Another share of the notification failed (a state update, an upload): it comes
        // again, so its remaining events are not counted now.
        hold.share().fail();
        let d2 = d.clone();
        tokio::task::spawn_blocking(move || {
            for i in 0..5 {
                let id = format!("h{i}");
                let raw = format!(
                    r#"{{"eventID":"{id}","eventTime":"2024-03-18T14:01:00Z","eventSource":"signin.amazonaws.com","eventName":"ConsoleLogin","userIdentity":{{"userName":"carol"}},"responseElements":{{"ConsoleLogin":"Failure"}}}}"#
                );
                let head = Head {
                    event_id: Some(id.into()),
                    event_time: Some("2024-03-18T14:01:00Z".into()),
                    ..Head::default()
                };
                d2.inspect(&Seen {
                    raw: raw.as_bytes(),
                    additions: &[],
                    head: &head,
                    // Not read from `raw`: the rules may not trust it.
                    exact_head: false,
                    partition: "",
                    source: "s3://b/k",
                    hold: Some(&hold),
                });
            }
            hold.commit();
        })
        .await
        .expect("feed");
        assert!(!settled.await.expect("settled"), "the notification failed");
        assert_eq!(skipped(), before + 5.0, "each event skipped");
        let running = d.running();
        let c = running.correlator.as_ref().expect("correlations");
        assert_eq!(c.held_states(), 0, "nothing counted for {COUNT}");
        drop(running);
        drop(d);
        delivery.finish().await;
    }

    #[test]
    fn annotations_are_a_json_member() {
        let hits = [Hit {
            id: "r1".into(),
            title: "T \"q\"".into(),
            level: config::Level::High,
            tags: Arc::new([]),
        }];
        let a = annotation(&hits);
        let v: Value = serde_json::from_slice(&[b"{", &a[..], b"}"].concat()).expect("json");
        assert_eq!(v["detections"][0]["title"], "T \"q\"");
        assert_eq!(v["detections"][0]["level"], "high");
    }
}
