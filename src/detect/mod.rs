//! In-stream detections: Sigma rules over each event as it is written (after geo and the
//! transforms), optional `"detections"` annotations, and alerts delivered at-least-once.
//!
//! `Detect::inspect` runs on the worker thread, once per written event: the event is parsed
//! once (its additions, such as `geo`, merged in), evaluated, and each match becomes one alert
//! document per output that wants it (`min_level`, `suppress_secs`). Every alert carries a
//! share of its notification's `Hold`, committed only when the output has the alert: an
//! output outage holds acknowledgement, and after `max_attempts` the notification is handed
//! back and delivered again, so no alert is lost (some may repeat).

pub mod backtest;
pub mod config;
pub mod correlate;
pub mod output;
pub mod rules;
pub mod suppress;
pub mod trial;

use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;
use serde_json::Value;
use tokio::sync::mpsc;

use crate::ack::Hold;
use crate::cloudtrail::Head;
use crate::metrics::{self, AlertSuppressed, DetectionMatched, EventsEvaluated};
use config::{AlertConfig, AlertKind, DetectConfig, EventPayload};
use correlate::{Correlated, Correlator, Fired};
use output::{Output, OutputError, Pending};
use rules::{Hit, RuleError, Rules};
use suppress::Suppressor;

#[derive(Debug, thiserror::Error)]
pub enum DetectError {
    #[error(transparent)]
    Rules(#[from] RuleError),
    #[error(transparent)]
    Output(#[from] OutputError),
    #[error(transparent)]
    Correlate(#[from] correlate::CorrelateError),
}

/// An alert output as the workers see it: where its alerts go and what it wants.
struct Route {
    cfg: AlertConfig,
    label: String,
    tx: mpsc::Sender<Pending>,
    suppressor: Option<Arc<Suppressor>>,
}

/// Rules and alert outputs, shared by every worker.
pub struct Detect {
    rules: Rules,
    annotate: bool,
    routes: Vec<Route>,
    worker: String,
    /// Correlation rules, and the runtime their store calls run on (the worker threads
    /// block on them: a notification is acknowledged only after its state update).
    correlate: Option<(Correlator, tokio::runtime::Handle)>,
}

/// The delivery tasks; they end once every `Detect` is dropped and their queues are empty.
pub struct Delivery(Vec<tokio::task::JoinHandle<()>>);

impl Delivery {
    pub async fn finish(self) {
        for h in self.0 {
            let _ = h.await;
        }
    }
}

/// One event as it is about to be written.
pub struct Seen<'a> {
    pub raw: &'a [u8],
    /// Fragments spliced into it (`"geo":{…}`).
    pub additions: &'a [&'a [u8]],
    pub head: &'a Head<'a>,
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
        let rules = Rules::load(&cfg.rules, &cfg.fields, &cfg.placeholders, cfg.skip_invalid)?;
        for s in &rules.skipped {
            metrics::emit(metrics::RuleSkipped {
                path: &s.path.display().to_string(),
                reason: &s.reason,
            });
        }
        metrics::emit(metrics::RulesLoaded { rules: rules.len() });
        let correlate = Correlator::open(&rules, &cfg.correlation, cfg.skip_invalid).await?;
        for s in correlate.iter().flat_map(|c| &c.skipped) {
            metrics::emit(metrics::RuleSkipped {
                path: &s.path.display().to_string(),
                reason: &s.reason,
            });
        }
        let mut routes = Vec::new();
        let mut tasks = Vec::new();
        for a in &cfg.alerts {
            let out = Output::open(a).await?;
            let (tx, rx) = mpsc::channel(QUEUE);
            let suppressor = (a.suppress_secs > 0).then(|| {
                Arc::new(Suppressor::new(std::time::Duration::from_secs(
                    a.suppress_secs,
                )))
            });
            tasks.push(tokio::spawn(output::run(out, rx)));
            routes.push(Route {
                cfg: a.clone(),
                label: a.label(),
                tx,
                suppressor,
            });
        }
        let detect = Detect {
            rules,
            annotate: cfg.annotate,
            routes,
            worker: worker_name(),
            correlate: correlate.map(|c| (c, tokio::runtime::Handle::current())),
        };
        Ok((Arc::new(detect), Delivery(tasks)))
    }

    /// Rules only, for `detect test`: no outputs.
    pub fn rules_only(rules: Rules) -> Detect {
        Detect {
            rules,
            annotate: false,
            routes: Vec::new(),
            worker: worker_name(),
            correlate: None,
        }
    }

    pub fn rules(&self) -> &Rules {
        &self.rules
    }

    /// Evaluates one event, queues its alerts, and returns the `"detections"` fragment to
    /// splice into it when `annotate` is on and a rule matched.
    pub fn inspect(&self, seen: &Seen<'_>) -> Option<Vec<u8>> {
        let started = Instant::now();
        let event = parse_written(seen.raw, seen.additions);
        let hits = event
            .as_ref()
            .map(|e| self.rules.evaluate(e))
            .unwrap_or_default();
        metrics::emit(EventsEvaluated {
            events: 1,
            elapsed: started.elapsed(),
        });
        let event = event?;
        if hits.is_empty() {
            return None;
        }
        for h in &hits {
            metrics::emit(DetectionMatched {
                rule: &h.id,
                level: h.level.as_str(),
            });
        }
        let fired = self.correlate(&hits, &event, seen);
        self.alert(&hits, &event, seen, None);
        for f in &fired {
            metrics::emit(DetectionMatched {
                rule: &f.hit.id,
                level: f.hit.level.as_str(),
            });
            self.alert(std::slice::from_ref(&f.hit), &event, seen, Some(&f.detail));
        }
        self.annotate.then(|| annotation(&hits))
    }

    /// Counts the event in the correlations that use its rules (a store update, on the
    /// worker thread) and returns those it fired. A failed update fails the notification's
    /// hold: it is delivered again, and what is counted is idempotent.
    fn correlate(&self, hits: &[Hit], event: &Value, seen: &Seen<'_>) -> Vec<Fired> {
        let Some((c, rt)) = &self.correlate else {
            return Vec::new();
        };
        if !c.wants(hits) {
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
        match rt.block_on(c.observe(hits, event, &id, ts, now)) {
            Ok(fired) => {
                metrics::emit(metrics::CorrelationUpdated {
                    elapsed: started.elapsed(),
                });
                fired
            }
            Err(e) => {
                metrics::emit(metrics::CorrelationFailed {
                    error: &e.to_string(),
                });
                if let Some(h) = seen.hold {
                    h.share().fail();
                }
                Vec::new()
            }
        }
    }

    fn alert(&self, hits: &[Hit], event: &Value, seen: &Seen<'_>, corr: Option<&Correlated>) {
        let now = crate::clock::Utc::now().rfc3339();
        // Rules only correlations use do not alert alone (Sigma's `generate: false`).
        let alone = |h: &&Hit| {
            corr.is_some()
                || self
                    .correlate
                    .as_ref()
                    .is_none_or(|(c, _)| c.alerts_alone(&h.id))
        };
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
                let doc = AlertDoc {
                    rule_id: &hit.id,
                    rule_title: &hit.title,
                    level: hit.level.as_str(),
                    tags: &hit.tags,
                    event_id: seen.head.event_id.as_deref(),
                    event_name: seen.head.event_name.as_deref(),
                    event_time: seen.head.event_time.as_deref(),
                    source: seen.source,
                    worker: &self.worker,
                    detected_at: &now,
                    event: (route.cfg.event == EventPayload::Full).then_some(event),
                    correlation: corr,
                };
                let body = match route.cfg.kind {
                    AlertKind::Webhook => slack_body(&doc),
                    _ => serde_json::to_vec(&doc).unwrap_or_default(),
                };
                let pending = Pending {
                    body,
                    partition: seen.partition.to_owned(),
                    partition_key: format!("{}/{}", hit.id, doc.event_id.unwrap_or("")),
                    hold: seen.hold.map(Hold::share),
                    ticket,
                };
                // A closed queue means delivery stopped: the share drops uncommitted and the
                // notification is delivered again.
                let _ = route.tx.blocking_send(pending);
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
    fn annotations_are_a_json_member() {
        let hits = [Hit {
            id: "r1".into(),
            title: "T \"q\"".into(),
            level: config::Level::High,
            tags: vec![],
        }];
        let a = annotation(&hits);
        let v: Value = serde_json::from_slice(&[b"{", &a[..], b"}"].concat()).expect("json");
        assert_eq!(v["detections"][0]["title"], "T \"q\"");
        assert_eq!(v["detections"][0]["level"], "high");
    }
}
