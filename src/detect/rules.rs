//! Sigma rules, compiled once by `rsigma-eval`, evaluated on the event as it is written.
//!
//! Only rules for CloudTrail are loaded: `logsource` `product: aws` with `service: cloudtrail`
//! (or no service). `[detect.fields]` becomes a pySigma-style `field_name_mapping` pipeline
//! applied to the rules when they compile, so mapping costs nothing per event.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use std::borrow::Cow;
use std::cell::RefCell;
use std::sync::Arc;

use rsigma_eval::compiler::CompiledRule;
use rsigma_eval::event::JsonEvent;
use rsigma_parser::{Detection, Modifier, SigmaRule, SigmaValue};
use serde_json::Value;

use super::config::Level;
use super::prefilter::{Keys, Prefilter, Scratch};

#[derive(Debug, thiserror::Error)]
pub enum RuleError {
    #[error("detect.rules: cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("detect.rules: {path}: {reason}")]
    Invalid { path: String, reason: String },
    #[error("detect.fields: {0}")]
    Fields(String),
    #[error(
        "detect.rules: no CloudTrail rule (logsource product: aws, service: cloudtrail) in {0}"
    )]
    Empty(String),
}

/// A rule file that was not loaded, and why.
#[derive(Debug, Clone)]
pub struct Skipped {
    pub path: PathBuf,
    pub reason: String,
}

/// What one rule says about itself in alerts and annotations. Shared, not copied: every
/// match hands one out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hit {
    pub id: Arc<str>,
    pub title: Arc<str>,
    pub level: Level,
    pub tags: Arc<[String]>,
}

pub struct Rules {
    engine: rsigma_eval::Engine,
    /// The candidate rules of an event, and the members they read.
    prefilter: Prefilter,
    /// Each compiled rule's `Hit`, in the engine's order.
    hits: Vec<Hit>,
    /// Rules not for CloudTrail (another logsource), by title: listed by `detect test`.
    pub other_logsource: Vec<String>,
    /// Invalid rules skipped under `skip_invalid`.
    pub skipped: Vec<Skipped>,
    /// Correlation rules, with `[detect.fields]` applied, compiled by `correlate`.
    pub correlations: Vec<(PathBuf, rsigma_parser::CorrelationRule)>,
    /// Each loaded rule's `Hit::id` and Sigma `name` (correlations refer to either).
    pub identities: Vec<(String, Option<String>)>,
}

impl std::fmt::Debug for Rules {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Rules({} loaded)", self.len())
    }
}

fn is_rule_file(p: &Path) -> bool {
    matches!(p.extension().and_then(|e| e.to_str()), Some("yml" | "yaml"))
}

/// Every rule file under `paths` (files as given, folders searched), sorted per folder.
pub(super) fn rule_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>, RuleError> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            // Hidden entries are skipped: a Kubernetes ConfigMap volume holds each file three
            // times (`x.yml` → `..data/x.yml` → `..2026_…/x.yml`), and each copy would load
            // as a rule of its own and alert again.
            let mut found: Vec<PathBuf> = walkdir::WalkDir::new(p)
                .follow_links(true)
                .into_iter()
                .filter_entry(|e| {
                    e.depth() == 0 || !e.file_name().to_string_lossy().starts_with('.')
                })
                .filter_map(Result::ok)
                .filter(|e| e.file_type().is_file() && is_rule_file(e.path()))
                .map(|e| e.into_path())
                .collect();
            found.sort();
            out.extend(found);
        } else {
            out.push(p.clone());
        }
    }
    Ok(out)
}

/// True for a rule meant for CloudTrail events.
fn for_cloudtrail(rule: &SigmaRule) -> bool {
    let ls = &rule.logsource;
    let product = ls.product.as_deref().map(str::to_ascii_lowercase);
    let service = ls.service.as_deref().map(str::to_ascii_lowercase);
    product.as_deref() == Some("aws") && matches!(service.as_deref(), None | Some("cloudtrail"))
}

pub(super) fn level_of(l: Option<&rsigma_parser::Level>) -> Level {
    match l {
        Some(rsigma_parser::Level::Low) => Level::Low,
        Some(rsigma_parser::Level::Medium) => Level::Medium,
        Some(rsigma_parser::Level::High) => Level::High,
        Some(rsigma_parser::Level::Critical) => Level::Critical,
        _ => Level::Informational,
    }
}

/// The field mapping and placeholder values as a rule pipeline (JSON is YAML, so no YAML
/// writer is needed).
fn mapping_pipeline(
    fields: &BTreeMap<String, String>,
    placeholders: &BTreeMap<String, Vec<String>>,
) -> Result<Option<rsigma_eval::Pipeline>, RuleError> {
    let mut transformations = Vec::new();
    if !fields.is_empty() {
        transformations.push(serde_json::json!(
            {"id": "detect_fields", "type": "field_name_mapping", "mapping": fields}
        ));
    }
    if !placeholders.is_empty() {
        transformations
            .push(serde_json::json!({"id": "detect_placeholders", "type": "value_placeholders"}));
    }
    if transformations.is_empty() {
        return Ok(None);
    }
    let doc = serde_json::json!({
        "name": "trailhose detect.fields and detect.placeholders",
        "vars": placeholders,
        "transformations": transformations,
    });
    rsigma_eval::parse_pipeline(&doc.to_string())
        .map(Some)
        .map_err(|e| RuleError::Fields(e.to_string()))
}

/// The first `|expand` placeholder of `rule` without a value in `placeholders`. Left alone,
/// rsigma-eval would read it from an event field of that name, which CloudTrail events do not
/// have: SigmaHQ's `%Legitimate_Countries%` filter would then never match and the rule would
/// fire on every console login.
fn unresolved_placeholder(
    rule: &SigmaRule,
    placeholders: &BTreeMap<String, Vec<String>>,
) -> Option<String> {
    fn in_values(values: &[SigmaValue], known: &BTreeMap<String, Vec<String>>) -> Option<String> {
        for v in values {
            let SigmaValue::String(s) = v else { continue };
            let text = s.as_plain().unwrap_or_else(|| s.original.clone());
            // `%name%` pairs: the odd-numbered pieces between percent signs.
            for name in text.split('%').skip(1).step_by(2) {
                if !known.contains_key(name) {
                    return Some(name.to_owned());
                }
            }
        }
        None
    }
    fn in_detection(d: &Detection, known: &BTreeMap<String, Vec<String>>) -> Option<String> {
        match d {
            Detection::AllOf(items) => items
                .iter()
                .filter(|i| i.field.has_modifier(Modifier::Expand))
                .find_map(|i| in_values(&i.values, known)),
            Detection::AnyOf(subs) | Detection::And(subs) => {
                subs.iter().find_map(|s| in_detection(s, known))
            }
            Detection::ArrayMatch { body, .. } => in_detection(body, known),
            Detection::Conditional { named, .. } => {
                named.values().find_map(|s| in_detection(s, known))
            }
            Detection::Keywords(_) => None,
        }
    }
    rule.detection
        .named
        .values()
        .find_map(|d| in_detection(d, placeholders))
}

impl Rules {
    /// Reads, selects and compiles the rules. A file that does not parse or a rule that does
    /// not compile is an error naming it, or skipped (and listed) with `skip_invalid`.
    pub fn load(
        paths: &[PathBuf],
        fields: &BTreeMap<String, String>,
        placeholders: &BTreeMap<String, Vec<String>>,
        skip_invalid: bool,
    ) -> Result<Rules, RuleError> {
        let pipeline = mapping_pipeline(fields, placeholders)?;
        let mut engine = match pipeline.clone() {
            Some(p) => rsigma_eval::Engine::new_with_pipeline(p),
            None => rsigma_eval::Engine::new(),
        };
        let mut correlations = Vec::new();
        let mut identities = Vec::new();
        let mut skipped = Vec::new();
        let mut other_logsource = Vec::new();
        let refuse = |path: &Path, reason: String, skipped: &mut Vec<Skipped>| {
            if skip_invalid {
                skipped.push(Skipped {
                    path: path.to_owned(),
                    reason,
                });
                Ok(())
            } else {
                Err(RuleError::Invalid {
                    path: path.display().to_string(),
                    reason,
                })
            }
        };
        for path in rule_files(paths)? {
            let text = std::fs::read_to_string(&path).map_err(|source| RuleError::Read {
                path: path.display().to_string(),
                source,
            })?;
            let collection = match rsigma_parser::parse_sigma_yaml(&text) {
                Ok(c) => c,
                Err(e) => {
                    refuse(&path, e.to_string(), &mut skipped)?;
                    continue;
                }
            };
            if let Some(e) = collection.errors.first() {
                refuse(&path, e.clone(), &mut skipped)?;
                continue;
            }
            for corr in &collection.correlations {
                let mut corr = corr.clone();
                let mapped = pipeline.as_ref().map(|p| {
                    rsigma_eval::pipeline::apply_pipelines_to_correlation(
                        std::slice::from_ref(p),
                        &mut corr,
                    )
                });
                match mapped {
                    Some(Err(e)) => refuse(
                        &path,
                        format!("correlation {:?}: {e}", corr.title),
                        &mut skipped,
                    )?,
                    _ => correlations.push((path.clone(), corr)),
                }
            }
            for rule in &collection.rules {
                if !for_cloudtrail(rule) {
                    other_logsource.push(rule.title.clone());
                    continue;
                }
                if let Some(name) = unresolved_placeholder(rule, placeholders) {
                    let reason = format!(
                        "rule {:?}: placeholder %{name}% (|expand) has no value in detect.placeholders",
                        rule.title
                    );
                    refuse(&path, reason, &mut skipped)?;
                    continue;
                }
                match engine.add_rule(rule) {
                    Ok(()) => identities.push((
                        rule.id.clone().unwrap_or_else(|| rule.title.clone()),
                        rule.name.clone(),
                    )),
                    Err(e) => {
                        let reason = format!("rule {:?}: {e}", rule.title);
                        refuse(&path, reason, &mut skipped)?;
                    }
                }
            }
            for filter in &collection.filters {
                if let Err(e) = engine.apply_filter(filter) {
                    refuse(&path, format!("filter: {e}"), &mut skipped)?;
                }
            }
        }
        if engine.rule_count() == 0 && skipped.is_empty() {
            let named: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
            return Err(RuleError::Empty(named.join(", ")));
        }
        Ok(Rules {
            prefilter: Prefilter::build(engine.rules()),
            hits: engine.rules().iter().map(hit_of).collect(),
            engine,
            other_logsource,
            skipped,
            correlations,
            identities,
        })
    }

    pub fn len(&self) -> usize {
        self.engine.rule_count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The rules `event` matches, in rule order (every rule, through the engine's own
    /// index: the reference `inspect` is tested against).
    pub fn evaluate(&self, event: &Value) -> Vec<Hit> {
        let results = self.engine.evaluate(&JsonEvent::borrow(event));
        results.into_iter().filter_map(hit).collect()
    }

    /// The rules the event as written (`raw` with `additions`) matches, in rule order,
    /// parsing it only when a rule can match its `keys` and bytes, and then only for the
    /// members its candidate rules read.
    /// `listed`: every top-level member of `raw`, as the split read them (else `raw` is
    /// scanned for them).
    pub fn inspect(
        &self,
        raw: &[u8],
        additions: &[&[u8]],
        keys: Keys<'_>,
        listed: Option<&[(Cow<'_, str>, &str)]>,
    ) -> Inspected {
        SCRATCH.with_borrow_mut(|s| {
            self.prefilter.candidates(keys, raw, additions, listed, s);
            if s.candidates.is_empty() {
                return Inspected::Skipped;
            }
            let plan = self.prefilter.plan(&s.candidates);
            let compiled = self.engine.rules();
            let mut selections = Vec::new();
            let hits_in = |ev: &dyn Fn(&CompiledRule, &mut Vec<String>) -> bool,
                           selections: &mut Vec<String>| {
                s.candidates
                    .iter()
                    .filter(|i| compiled.get(**i).is_some_and(|r| ev(r, selections)))
                    .filter_map(|i| self.hits.get(*i).cloned())
                    .collect::<Vec<Hit>>()
            };
            // Listed: each path read where it lies. A value read that does not build voids
            // the answers: the event is judged on the pruned tree, as below.
            if let (Some(plan), Some(list)) = (&plan, listed) {
                let ev = super::listed::Listed::new(raw, list, additions, plan);
                let hits = hits_in(&|r, sel| matches(r, &ev, sel), &mut selections);
                if !ev.failed() {
                    return Inspected::Evaluated {
                        hits,
                        event: ev.into_pruned(),
                    };
                }
            }
            // The bytes not laid out as the scan expects, or a member not building: serde
            // decides on the whole event.
            let event = match (plan, listed) {
                (Some(plan), Some(list)) => plan
                    .parse_listed(raw, list, additions)
                    .or_else(|| super::parse_written(raw, additions)),
                (Some(plan), None) => plan
                    .parse(raw, additions)
                    .or_else(|| super::parse_written(raw, additions)),
                (None, _) => super::parse_written(raw, additions),
            };
            let Some(event) = event else {
                return Inspected::Unreadable;
            };
            let ev = super::view::View::new(&event);
            let hits = hits_in(&|r, sel| matches(r, &ev, sel), &mut selections);
            let event = Some(event);
            Inspected::Evaluated { hits, event }
        })
    }
}

thread_local! {
    /// A worker's buffers for `inspect` (no allocation per event once grown).
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// Whether `r` matches: its conditions as `evaluate_rule` decides them, without building the
/// match's details.
fn matches(r: &CompiledRule, ev: &impl rsigma_eval::Event, selections: &mut Vec<String>) -> bool {
    r.conditions.iter().any(|c| {
        selections.clear();
        rsigma_eval::compiler::eval_condition(c, &r.detections, ev, selections)
    })
}

/// What `Rules::inspect` found.
pub enum Inspected {
    /// No rule can match the event: it was not parsed.
    Skipped,
    /// A candidate rule remained, but serde_json does not build the event (nested deeper
    /// than 128, a lone surrogate escape).
    Unreadable,
    /// The rules it matched, and the event: only the members its candidate rules read (the
    /// whole event when they may read any); None when the rules read the members where they
    /// lie, without building a tree.
    Evaluated {
        hits: Vec<Hit>,
        event: Option<Value>,
    },
}

fn hit(r: rsigma_eval::EvaluationResult) -> Option<Hit> {
    if !r.is_detection() {
        return None;
    }
    let h = r.header;
    Some(Hit {
        id: h
            .rule_id
            .clone()
            .unwrap_or_else(|| h.rule_title.clone())
            .into(),
        title: h.rule_title.into(),
        level: level_of(h.level.as_ref()),
        tags: h.tags.into(),
    })
}

/// The `Hit` a match of `r` gives: what `hit` makes of its result's header.
fn hit_of(r: &CompiledRule) -> Hit {
    Hit {
        id: r.id.clone().unwrap_or_else(|| r.title.clone()).into(),
        title: r.title.as_str().into(),
        level: level_of(r.level.as_ref()),
        tags: r.tags.as_slice().into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/detect")
            .join(name)
    }

    fn ids(rules: &Rules, event: &str) -> Vec<String> {
        let v: Value = serde_json::from_str(event).expect("test event");
        let mut ids: Vec<String> = rules
            .evaluate(&v)
            .into_iter()
            .map(|h| h.id.to_string())
            .collect();
        ids.sort();
        ids
    }

    #[test]
    fn every_modifier_and_condition_form_matches_as_sigma_says() {
        let rules = Rules::load(
            &[dir("modifiers")],
            &BTreeMap::new(),
            &BTreeMap::new(),
            false,
        )
        .expect("rules");
        assert_eq!(rules.len(), 17);
        let cases: &[(&str, &[&str])] = &[
            (
                r#"{"eventName":"ListBuckets","userAgent":"aws-cli/2.15 Python/3.11"}"#,
                &["contains"],
            ),
            (
                r#"{"eventName":"DeleteBucketPolicy","eventSource":"s3.amazonaws.com"}"#,
                &["re", "startswith"],
            ),
            (
                r#"{"eventName":"GetCallerIdentity","eventSource":"sts.amazonaws.com","userIdentity":{"arn":"arn:aws:iam::111122223333:root"}}"#,
                &["and-or-not", "endswith"],
            ),
            (
                r#"{"eventName":"GetCallerIdentity","eventSource":"sts.amazonaws.com","errorCode":"AccessDenied","userAgent":"Boto3/1.34 Python/3.12 Linux"}"#,
                &["contains-all"],
            ),
            (
                r#"{"eventName":"PutBucketAcl","sourceIPAddress":"10.1.2.3"}"#,
                &["cidr", "re"],
            ),
            (
                r#"{"eventName":"CreateAccessKey","sourceIPAddress":"2001:db8:1::1","eventSource":"iam.amazonaws.com"}"#,
                &["and-or-not", "cidr", "wildcard"],
            ),
            (
                r#"{"eventName":"ConsoleLogin","sourceIPAddress":"192.168.1.1"}"#,
                &["case-insensitive"],
            ),
            (
                r#"{"eventName":"UpdateLoginProfile","userIdentity":{"userName":"bob"},"requestParameters":{"userName":"bob"}}"#,
                &["fieldref"],
            ),
            (
                r#"{"eventName":"UpdateLoginProfile","userIdentity":{"userName":"bob"},"requestParameters":{"userName":"alice"}}"#,
                &[],
            ),
            (
                r#"{"eventName":"StopLogging","eventSource":"cloudtrail.amazonaws.com","readOnly":false,"userIdentity":{"arn":"arn:aws:iam::1:user/eve"}}"#,
                &["all-of", "list-is-or", "not-one-of-filters", "one-of"],
            ),
            (
                r#"{"eventName":"DeleteTrail","eventSource":"cloudtrail.amazonaws.com","userIdentity":{"arn":"arn:aws:sts::1:assumed-role/deployer/x"}}"#,
                &["list-is-or", "one-of", "one-of-them", "startswith"],
            ),
            (
                r#"{"eventName":"PutEventSelectors","eventSource":"cloudtrail.amazonaws.com","readOnly":true}"#,
                &["all-of-them", "one-of-them"],
            ),
            (
                r#"{"eventName":"Decrypt","resources":[{"ARN":"arn:aws:kms:us-east-1:1:key/other"},{"ARN":"arn:aws:kms:us-east-1:1:key/secret"}]}"#,
                &["nested-array"],
            ),
            (
                r#"{"eventName":"CreateUser","eventSource":"IAM.amazonaws.com"}"#,
                &["and-or-not"],
            ),
        ];
        for (event, want) in cases {
            assert_eq!(ids(&rules, event), *want, "{event}");
        }
    }

    #[test]
    fn only_cloudtrail_rules_load_and_fields_map_onto_the_event() {
        let fields = BTreeMap::from([("src_country".to_owned(), "geo.country_isocode".to_owned())]);
        let rules = Rules::load(&[dir("rules")], &fields, &BTreeMap::new(), false).expect("rules");
        assert_eq!(rules.len(), 3);
        assert_eq!(rules.other_logsource.len(), 1);
        let login = |country: &str| {
            format!(
                r#"{{"eventSource":"signin.amazonaws.com","eventName":"ConsoleLogin","responseElements":{{"ConsoleLogin":"Success"}},"geo":{{"country_isocode":"{country}"}}}}"#
            )
        };
        let outside = "6f0c8d2e-1a41-4c1e-9a64-3d0b3f1e7a01";
        assert_eq!(ids(&rules, &login("GB")), [outside]);
        assert!(ids(&rules, &login("US")).is_empty());
        let no_geo = r#"{"eventSource":"signin.amazonaws.com","eventName":"ConsoleLogin","responseElements":{"ConsoleLogin":"Success"}}"#;
        assert!(
            ids(&rules, no_geo).is_empty(),
            "no geo: not known to be outside"
        );
        let without_mapping =
            Rules::load(&[dir("rules")], &BTreeMap::new(), &BTreeMap::new(), false).expect("rules");
        assert!(ids(&without_mapping, &login("GB")).is_empty());
    }

    #[test]
    fn a_rule_that_does_not_compile_is_named_or_skipped() {
        let tmp = std::env::temp_dir().join(format!("trailhose-badrule-{}", std::process::id()));
        std::fs::create_dir_all(&tmp).expect("dir");
        let bad = tmp.join("bad.yml");
        std::fs::write(
            &bad,
            "title: Bad\nlogsource:\n  product: aws\n  service: cloudtrail\ndetection:\n  selection:\n    eventName|nosuchmodifier: x\n  condition: selection\n",
        )
        .expect("write");
        std::fs::copy(dir("rules").join("iam_change.yml"), tmp.join("good.yml")).expect("copy");
        let err = Rules::load(
            std::slice::from_ref(&tmp),
            &BTreeMap::new(),
            &BTreeMap::new(),
            false,
        )
        .expect_err("refused");
        let text = err.to_string();
        assert!(
            text.contains("bad.yml") && text.contains("nosuchmodifier"),
            "{text}"
        );
        let rules = Rules::load(
            std::slice::from_ref(&tmp),
            &BTreeMap::new(),
            &BTreeMap::new(),
            true,
        )
        .expect("skipped");
        assert_eq!(rules.len(), 1);
        assert_eq!(rules.skipped.len(), 1);
        assert_eq!(rules.skipped[0].path, bad);
        let _ = std::fs::remove_dir_all(&tmp);
    }

    #[test]
    fn a_configmap_volume_loads_each_rule_once() {
        // The layout the kubelet writes: the files are symlinks through `..data` into a
        // hidden, timestamped folder.
        let tmp = std::env::temp_dir().join(format!("trailhose-cm-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        let stamped = tmp.join("..2026_12_01_15_00_00.123");
        std::fs::create_dir_all(&stamped).expect("dir");
        std::fs::copy(dir("rules").join("iam_change.yml"), stamped.join("iam.yml")).expect("copy");
        std::os::unix::fs::symlink("..2026_12_01_15_00_00.123", tmp.join("..data")).expect("link");
        std::os::unix::fs::symlink("..data/iam.yml", tmp.join("iam.yml")).expect("link");
        let rules = Rules::load(
            std::slice::from_ref(&tmp),
            &BTreeMap::new(),
            &BTreeMap::new(),
            false,
        )
        .expect("rules");
        assert_eq!(rules.len(), 1, "one rule, not one per copy");
        let create = r#"{"eventSource":"iam.amazonaws.com","eventName":"CreateUser"}"#;
        assert_eq!(ids(&rules, create).len(), 1);
        let _ = std::fs::remove_dir_all(&tmp);
    }

    #[test]
    fn hostile_events_do_not_panic_the_rules() {
        let rules = Rules::load(
            &[dir("modifiers"), dir("rules")],
            &BTreeMap::new(),
            &BTreeMap::new(),
            false,
        )
        .expect("rules");
        let huge = "A".repeat(4 << 20);
        let deep = format!("{}1{}", "[".repeat(120), "]".repeat(120));
        let events = [
            r#"{}"#.to_owned(),
            r#"{"eventName":null,"eventSource":7,"userAgent":{"x":[1,2]},"sourceIPAddress":true}"#
                .to_owned(),
            r#"{"eventName":["CreateUser",{"a":1}],"sourceIPAddress":"999.1.1.1/77"}"#.to_owned(),
            r#"{"sourceIPAddress":"::ffff:10.0.0.1%eth0","userIdentity":"root"}"#.to_owned(),
            format!(r#"{{"eventName":"{huge}","userAgent":"{huge}"}}"#),
            format!(r#"{{"eventName":"ConsoleLogin","requestParameters":{deep}}}"#),
            "{\"eventName\":\"\u{10ffff}\u{fffe}\\u0000é\",\"resources\":[null,1,\"x\"]}"
                .to_owned(),
        ];
        for e in &events {
            let v: Value = serde_json::from_str(e).expect("test event");
            let _ = rules.evaluate(&v);
        }
    }

    #[test]
    fn expand_placeholders_take_their_values_from_the_config_or_the_rule_is_refused() {
        let err = Rules::load(
            &[dir("placeholders")],
            &BTreeMap::new(),
            &BTreeMap::new(),
            false,
        )
        .expect_err("no value for the placeholder");
        let text = err.to_string();
        assert!(
            text.contains("login_outside_allowed.yml") && text.contains("%Allowed_Countries%"),
            "{text}"
        );
        let fields = BTreeMap::from([("src_country".to_owned(), "geo.country_isocode".to_owned())]);
        let allowed = BTreeMap::from([(
            "Allowed_Countries".to_owned(),
            vec!["US".to_owned(), "CA".to_owned()],
        )]);
        let rules = Rules::load(&[dir("placeholders")], &fields, &allowed, false).expect("rules");
        let login = |country: &str| {
            format!(r#"{{"eventName":"ConsoleLogin","geo":{{"country_isocode":"{country}"}}}}"#)
        };
        let id = "6f0c8d2e-1a41-4c1e-9a64-3d0b3f1e7b01";
        assert_eq!(ids(&rules, &login("GB")), [id]);
        assert!(ids(&rules, &login("US")).is_empty());
        assert!(ids(&rules, &login("CA")).is_empty());
    }

    /// What `inspect` finds, sorted by rule id (nothing when it skipped the event).
    /// Both ways the members are found: scanned for, and listed by the split (the two must
    /// agree).
    fn inspected(rules: &Rules, raw: &str, additions: &[&[u8]], keys: Keys<'_>) -> Vec<Hit> {
        let of = |listed| {
            let (mut hits, event) = match rules.inspect(raw.as_bytes(), additions, keys, listed) {
                Inspected::Skipped => (Vec::new(), None),
                Inspected::Evaluated { hits, event } => (hits, Some(event)),
                Inspected::Unreadable => panic!("unreadable: {raw}"),
            };
            hits.sort_by(|a: &Hit, b: &Hit| a.id.cmp(&b.id));
            (hits, event)
        };
        let head = crate::cloudtrail::listed_head_of(raw.as_bytes()).expect("listed head");
        let list = head.members.as_ref().and_then(|m| m.of(raw.as_bytes()));
        assert!(list.is_some(), "listed: {raw}");
        let scanned = of(None);
        // The same hits. (The members read may differ: with the list, the gates look only in
        // the members their rules read, so fewer rules may remain to read members for.)
        assert_eq!(of(list).0, scanned.0, "listed and scanned members: {raw}");
        scanned.0
    }

    /// The engine's matches on the event as written, sorted by rule id.
    fn reference(rules: &Rules, raw: &str, additions: &[&[u8]]) -> Vec<Hit> {
        let whole = super::super::parse_written(raw.as_bytes(), additions).expect("object");
        let mut hits = rules.evaluate(&whole);
        hits.sort_by(|a, b| a.id.cmp(&b.id));
        hits
    }

    /// Every rule the engine finds on the event as written, against what `inspect` finds
    /// through the prefilter (and the members it parses), for one rule set: with the head
    /// read from the event, and with it not trusted (a module's output).
    fn agree(rules: &Rules, raw: &str, additions: &[&[u8]]) {
        let want = reference(rules, raw, additions);
        let head = crate::cloudtrail::head_of(raw.as_bytes()).expect("head");
        for exact in [true, false] {
            let got = inspected(rules, raw, additions, Keys::of(&head, exact, additions));
            assert_eq!(got, want, "{raw} {additions:?} exact={exact}");
        }
    }

    /// Events over every combination of eventSource and eventName values the test rules
    /// name (in other cases, absent, of other types, repeated), with the members the other
    /// rules read.
    fn events() -> Vec<String> {
        let sources = [
            None,
            Some(r#""iam.amazonaws.com""#),
            Some(r#""IAM.Amazonaws.COM""#),
            Some(r#""kms.amazonaws.com""#),
            Some(r#""s3.amazonaws.com""#),
            Some(r#""sts.amazonaws.com""#),
            Some(r#""cloudtrail.amazonaws.com""#),
            Some(r#""ec2.amazonaws.com""#),
            Some(r#""lambda.amazonaws.com""#),
            Some(r#""signin.amazonaws.com""#),
            Some("7"),
            Some(r#"["iam.amazonaws.com"]"#),
            Some("null"),
            Some(r#""i\u0061m.amazonaws.com""#),
        ];
        let names = [
            None,
            Some(r#""CreateUser""#),
            Some(r#""createuser""#),
            Some(r#""DeleteUser""#),
            Some(r#""Decrypt""#),
            Some(r#""PutBucketPolicy""#),
            Some(r#""GetObject""#),
            Some(r#""getobject""#),
            Some(r#""GetCallerIdentity""#),
            Some(r#""StopLogging""#),
            Some(r#""DeleteTrail""#),
            Some(r#""ConsoleLogin""#),
            Some(r#""consolelogin""#),
            Some(r#""AssumeRole""#),
            Some(r#""RunInstances""#),
            Some(r#""UpdateLoginProfile""#),
            Some(r#""CreateAccessKey""#),
            Some(r#""PutBucketAcl""#),
            Some(r#""ListBuckets""#),
            Some(r#""PutEventSelectors""#),
            Some("7"),
            Some(r#""7""#),
            Some(r#"["CreateUser","x"]"#),
            Some("null"),
            Some("{}"),
            Some(r#""CRÉATEUSER""#),
            Some(r#""Cre\u0061teUser""#),
        ];
        let extras = [
            "",
            r#""userAgent":"TruffleHog/3.0","#,
            r#""errorCode":"AccessDenied","#,
            r#""userIdentity":{"type":"Root","userName":"bob","arn":"arn:aws:iam::1:root"},"requestParameters":{"userName":"bob"},"#,
            r#""readOnly":false,"userIdentity":{"arn":"arn:aws:sts::1:assumed-role/deployer/x"},"#,
            r#""eventType":"AwsServiceEvent","userIdentity":{"type":"root"},"#,
            r#""requestParameters":{"bucketName":"exfil-bucket"},"sourceIPAddress":"10.1.2.3","#,
            r#""api":"PutBucketPolicy","detail":{"eventName":"CreateUser"},"#,
            r#""eventName":"CreateUser","eventSource":"iam.amazonaws.com","#,
            r#""userIdentity.type":"Root","#,
            // For the literal gates: escaped and non-ASCII spellings of what they look for
            // (`\u212a` is the Kelvin sign, which lowercases to `k`), numbers and booleans
            // compared through their text, empty strings, literal stars.
            r#""userIdentity":{"type":"R\u006fot","arn":"arn:aws:sts::1:assumed-role/deployer/x"},"#,
            "\"userAgent\":\"\u{212a}MS\",\"userIdentity\":{\"type\":\"ROOT\"},",
            r#""userAgent":"\u212aMS","errorCode":"","#,
            r#""userAgent":"KmS","count":1e2,"readOnly":true,"#,
            r#""userAgent":"Truffle*Hog","count":100,"#,
            r#""userAgent":"TRUFFLEHOG/3.1 Beta Gamma","count":"100","#,
            r#""userAgent":"alpha\/beta","userIdentity":{"arn":"ARN:AWS:STS::1:ASSUMED-ROLE/DEPLOYER/X"},"#,
            r#""userIdentity":[{"type":"Root"},{"type":"IAMUser"}],"count":-100.0,"#,
            // What `not` and `|neq` match: an event holding none of the literals they negate
            // (a gate read through the negation would skip it).
            r#""userIdentity":{"type":"IAMUser","userName":"alice"},"userAgent":"aws-cli/2","#,
            // What the gated modifier rules match, in plain ASCII (the gates apply): a
            // `contains` in another case, a `contains|all`, a key read through an array, a
            // `cidr` (not gated: checked all the same), encoded values and a `|re` alternation.
            r#""userAgent":"AWS-CLI/2.15 Python/3.11","sourceIPAddress":"2001:db8::1","#,
            r#""userAgent":"Boto3/1.34 Python/3.12 Linux","requestParameters":{"bucketName":"super-secret-bucket"},"resources":[{"ARN":"arn:aws:kms:us-east-1:1:alias/x"},{"ARN":"arn:aws:kms:us-east-1:1:key/secret"}],"#,
            r#""resources":[[{"ARN":"arn:aws:kms:us-east-1:1:KEY/SECRET"}]],"userAgent":"python/3 boto3","#,
            r#""requestParameters":{"policyDocument":"eyJTdGF0ZW1lbnQiOlt7IkVmZmVjdCI6IkFsbG93In1dfQ==","command":"powershell /enc SQBFAFgA"},"userAgent":"Terraform/1.5.7","#,
            r#""requestParameters":{"script":"SQBFAFgAOwAgAEkAbgB2AG8AawBlAC0ARQB4AHAAcgBlAHMAcwBpAG8AbgA=","command":"cmd -enc x"},"userAgent":"pulumi/3.1","#,
        ];
        let mut out = Vec::new();
        for s in sources {
            for n in names {
                for x in extras {
                    let mut e = format!("{{{x}");
                    if let Some(s) = s {
                        e.push_str(&format!(r#""eventSource":{s},"#));
                    }
                    if let Some(n) = n {
                        e.push_str(&format!(r#""eventName":{n},"#));
                    }
                    e.push_str(r#""eventID":"e"}"#);
                    out.push(e);
                }
            }
        }
        out
    }

    /// `raw` laid out as people write it: a member a line, spaces around the colons.
    fn pretty(raw: &str) -> String {
        let (mut out, mut depth, mut in_string, mut escaped) =
            (String::new(), 0usize, false, false);
        let newline = |out: &mut String, depth: usize| {
            out.push('\n');
            out.push_str(&"  ".repeat(depth));
        };
        for c in raw.chars() {
            if in_string {
                out.push(c);
                (in_string, escaped) = match (escaped, c) {
                    (false, '\\') => (true, true),
                    (false, '"') => (false, false),
                    _ => (true, false),
                };
                continue;
            }
            match c {
                '"' => {
                    in_string = true;
                    out.push(c);
                }
                '{' | '[' => {
                    depth += 1;
                    out.push(c);
                    newline(&mut out, depth);
                }
                '}' | ']' => {
                    depth = depth.saturating_sub(1);
                    newline(&mut out, depth);
                    out.push(c);
                }
                ',' => {
                    out.push(c);
                    newline(&mut out, depth);
                }
                ':' => out.push_str(" :\t"),
                c => out.push(c),
            }
        }
        out.push_str("\r\n");
        out
    }

    #[test]
    fn the_prefilter_never_skips_a_rule_that_matches() {
        let mappings = [
            BTreeMap::new(),
            BTreeMap::from([("api".to_owned(), "eventName".to_owned())]),
            BTreeMap::from([("eventName".to_owned(), "detail.eventName".to_owned())]),
        ];
        let geo: &[u8] = br#""geo":{"country_isocode":"GB"}"#;
        let renames: &[u8] = br#""eventName":"CreateUser""#;
        let escaped: &[u8] = br#""event\u004eame":"DeleteUser""#;
        let city: &[u8] = "\"geo\":{\"city\":\"Zürich\",\"country_isocode\":\"gb\"}".as_bytes();
        let agent: &[u8] = br#""userAgent":"TruffleHog/3.0""#;
        let dirs = ["prefilter", "modifiers", "rules", "gates", "encodings"].map(dir);
        // Without the keyword rule (it may read any member, so every event it is a candidate
        // for is parsed whole): the members the rules read are then scanned for.
        let mut scanned: Vec<PathBuf> = dirs
            .iter()
            .flat_map(|d| std::fs::read_dir(d).expect("dir"))
            .map(|f| f.expect("file").path())
            .filter(|p| !p.ends_with("keywords.yml"))
            .collect();
        scanned.sort();
        let sets = mappings
            .iter()
            .enumerate()
            .flat_map(|(m, f)| [(m, f, &dirs[..]), (m, f, &scanned[..])]);
        for (m, fields, paths) in sets {
            let rules = Rules::load(paths, fields, &BTreeMap::new(), false).expect("rules");
            let mut matched = 0;
            let mut unmatched: std::collections::BTreeSet<&str> =
                rules.identities.iter().map(|(id, _)| id.as_str()).collect();
            for e in events() {
                let v: Value = serde_json::from_str(&e).expect("event");
                let hits = rules.evaluate(&v);
                matched += usize::from(!hits.is_empty());
                for h in &hits {
                    unmatched.remove(&*h.id);
                }
                agree(&rules, &e, &[]);
                agree(&rules, &e, &[geo]);
                agree(&rules, &e, &[geo, renames]);
                agree(&rules, &e, &[escaped]);
                agree(&rules, &e, &[city, agent]);
                // An ASCII addition holding a gate's literal: the gates apply and read it.
                agree(&rules, &e, &[agent]);
                // The same event laid out otherwise, and with a key escaped.
                let laid_out = pretty(&e);
                agree(&rules, &laid_out, &[]);
                agree(&rules, &laid_out, &[agent]);
                let key_escaped = e.replacen(r#""eventName":"#, r#""\u0065ventName":"#, 1);
                if key_escaped != e {
                    agree(&rules, &key_escaped, &[]);
                    agree(&rules, &pretty(&key_escaped), &[]);
                }
            }
            assert!(matched > 1000, "the events match: {matched}");
            // Every rule that can match does, on some event (the gated ones in plain ASCII):
            // what cannot match is agreed on trivially.
            if m == 0 {
                let without_additions = [
                    "6f0c8d2e-1a41-4c1e-9a64-3d0b3f1e7a01", // outside the US: needs `geo`
                    "contradiction",
                    "gate-geo",
                ];
                assert_eq!(unmatched.into_iter().collect::<Vec<_>>(), without_additions);
            }
        }
    }

    #[test]
    fn rules_are_indexed_by_the_literals_they_require_and_unrelated_events_are_not_parsed() {
        let rules = Rules::load(
            &[dir("prefilter")],
            &BTreeMap::new(),
            &BTreeMap::new(),
            false,
        )
        .expect("rules");
        let always: Vec<&str> = rules
            .prefilter
            .always()
            .iter()
            .map(|i| rules.identities[*i].0.as_str())
            .collect();
        assert_eq!(
            always,
            [
                "keywords",
                "mapped",
                "name-contains",
                "name-re",
                "name-wildcard",
                "no-literal",
                "not-name",
                "one-of-mixed",
                "or-one-side",
                "source-startswith",
            ],
            "the rules without a literal eventSource or eventName"
        );
        // Only the literal rules: an event none of them names is not parsed at all.
        let literal = Rules::load(
            &[
                dir("prefilter").join("name-literal.yml"),
                dir("prefilter").join("filtered.yml"),
                dir("prefilter").join("contradiction.yml"),
            ],
            &BTreeMap::new(),
            &BTreeMap::new(),
            false,
        )
        .expect("rules");
        let inspect = |raw: &str| {
            let head = crate::cloudtrail::head_of(raw.as_bytes()).expect("head");
            let keys = Keys::of(&head, true, &[]);
            match literal.inspect(raw.as_bytes(), &[], keys, None) {
                Inspected::Skipped => None,
                Inspected::Evaluated { hits, .. } => Some(hits.len()),
                Inspected::Unreadable => panic!("unreadable"),
            }
        };
        // Not even read: a body that does not parse is never looked at.
        assert_eq!(
            inspect(r#"{"eventSource":"s3.amazonaws.com","eventName":"GetObject","x":[1,2]}"#),
            None
        );
        assert_eq!(
            inspect(r#"{"eventSource":"IAM.amazonaws.com","eventName":"createUSER"}"#),
            Some(1)
        );
        assert_eq!(
            inspect(r#"{"eventSource":"sts.amazonaws.com","eventName":"GetCallerIdentity"}"#),
            Some(0),
            "a candidate its filter then refuses"
        );
        assert_eq!(
            inspect(r#"{"eventSource":"sts.amazonaws.com","eventName":"AssumeRole"}"#),
            Some(1)
        );
        // Unknown keys (absent, not strings) leave every rule a candidate.
        assert_eq!(inspect(r#"{"eventName":"CreateUser"}"#), Some(0));
        assert_eq!(
            inspect(r#"{"eventSource":["iam.amazonaws.com"],"eventName":"CreateUser"}"#),
            Some(1)
        );
    }

    /// The ids of the rules `candidates` leaves for an event, sorted.
    fn candidate_ids<'r>(
        rules: &'r Rules,
        raw: &str,
        additions: &[&[u8]],
        keys: Keys<'_>,
        listed: Option<&[(Cow<'_, str>, &str)]>,
    ) -> Vec<&'r str> {
        let mut s = Scratch::default();
        rules
            .prefilter
            .candidates(keys, raw.as_bytes(), additions, listed, &mut s);
        let mut ids: Vec<&str> = s
            .candidates
            .iter()
            .map(|i| rules.identities[*i].0.as_str())
            .collect();
        ids.sort();
        ids
    }

    #[test]
    fn rules_naming_no_source_or_name_are_gated_by_the_literals_they_need() {
        let rules = Rules::load(
            &[dir("gates"), dir("prefilter")],
            &BTreeMap::new(),
            &BTreeMap::new(),
            false,
        )
        .expect("rules");
        let gates: BTreeMap<&str, Vec<String>> = rules
            .prefilter
            .gates()
            .into_iter()
            .map(|(i, lits)| (rules.identities[i].0.as_str(), lits))
            .collect();
        let lits = |ls: &[&str]| ls.iter().map(|l| (*l).to_owned()).collect::<Vec<_>>();
        let want: BTreeMap<&str, Vec<String>> = [
            ("gate-all", lits(&["truffle"])),
            ("gate-bool", lits(&["true"])),
            ("gate-escaped-star", lits(&["truffle*hog"])),
            ("gate-folding", lits(&["kms"])),
            ("gate-geo", lits(&["gb"])),
            ("gate-n-of", lits(&["alpha", "beta", "gamma"])),
            ("gate-not-first", lits(&["root"])),
            ("gate-regex", lits(&[":assumed-role/deploy"])),
            ("gate-regex-ci", lits(&["assumed-role/deployer/"])),
            ("gate-wildcard", lits(&["truf"])),
            ("mapped", lits(&["putbucketpolicy"])),
            ("name-contains", lits(&["policy"])),
            ("name-re", lits(&["bucket"])),
            ("name-wildcard", lits(&["bject", "create"])),
            ("no-literal", lits(&["root"])),
            ("one-of-mixed", lits(&["stoplogging", "trufflehog"])),
            ("or-one-side", lits(&["accessdenied", "assumerole"])),
            ("source-startswith", lits(&["object"])),
        ]
        .into_iter()
        .collect();
        // Not gated: `|exists`, `|neq`, `''`, numbers, `not` alone, keywords.
        assert_eq!(gates, want);
        // The same whether the gates look in the whole event or in the members the split
        // listed (these events hold their literals where the rules read them).
        let candidates = |raw: &str| {
            let head = crate::cloudtrail::listed_head_of(raw.as_bytes()).expect("head");
            let listed = head.members.as_ref().and_then(|m| m.of(raw.as_bytes()));
            let keys = Keys::of(&head, true, &[]);
            let whole = candidate_ids(&rules, raw, &[], keys, None);
            assert_eq!(
                candidate_ids(&rules, raw, &[], keys, listed),
                whole,
                "{raw}"
            );
            whole
        };
        let ungated = [
            "gate-empty",
            "gate-exists",
            "gate-neq",
            "gate-number",
            "gate-number-contains",
            "keywords",
            "not-name",
        ];
        fn with<'a>(ungated: &[&'a str], more: &[&'a str]) -> Vec<&'a str> {
            let mut ids: Vec<&str> = ungated.iter().chain(more).copied().collect();
            ids.sort();
            ids
        }
        // An event holding none of a rule's literals is not evaluated against it; one that
        // spells a literal in a way its bytes may hide (an escape, a non-ASCII byte) is.
        let plain = r#"{"eventSource":"x","eventName":"GetObject","userIdentity":{"type":"IAMUser"},"errorCode":"x"}"#;
        assert_eq!(
            candidates(plain),
            with(&ungated, &["name-wildcard", "source-startswith"])
        );
        let root = r#"{"eventSource":"x","eventName":"X","userIdentity":{"type":"ROOT"}}"#;
        assert_eq!(
            candidates(root),
            with(&ungated, &["gate-not-first", "no-literal"])
        );
        let gated: Vec<&str> = want.keys().copied().collect();
        for hidden in [
            r#"{"eventSource":"x","eventName":"X","userIdentity":{"type":"R\u006fot"}}"#,
            "{\"eventSource\":\"x\",\"eventName\":\"X\",\"userAgent\":\"\u{212a}MS\"}",
        ] {
            assert_eq!(candidates(hidden), with(&ungated, &gated), "{hidden}");
        }
        // With the members listed, a literal counts only in a member a gated rule reads (or
        // an addition), and an escape or a non-ASCII byte only there.
        let elsewhere =
            r#"{"eventSource":"x","eventName":"X","requestParameters":{"note":"root \u00e9"}}"#;
        let head = crate::cloudtrail::listed_head_of(elsewhere.as_bytes()).expect("head");
        let listed = head
            .members
            .as_ref()
            .and_then(|m| m.of(elsewhere.as_bytes()));
        let keys = Keys::of(&head, true, &[]);
        let geo: &[&[u8]] = &[br#""geo":{"country_isocode":"GB"}"#];
        let ids = |listed, adds| candidate_ids(&rules, elsewhere, adds, keys, listed);
        assert_eq!(ids(listed, &[]), with(&ungated, &[]));
        assert_eq!(ids(listed, geo), with(&ungated, &["gate-geo"]));
        assert_eq!(
            ids(None, &[]),
            with(&ungated, &gated),
            "the whole event: the escape"
        );
    }

    #[test]
    fn a_module_output_is_not_read_by_the_head_it_inherits() {
        let rules = Rules::load(
            &[
                dir("prefilter"),
                dir("modifiers"),
                dir("rules"),
                dir("gates"),
            ],
            &BTreeMap::new(),
            &BTreeMap::new(),
            false,
        )
        .expect("rules");
        let events = events();
        let mut misled = 0;
        for (i, raw) in events.iter().enumerate() {
            // The head of another event: a module's output inherits the fields it lacks.
            let other = &events[(i * 7 + 3) % events.len()];
            let head = crate::cloudtrail::head_of(other.as_bytes()).expect("head");
            let want = reference(&rules, raw, &[]);
            let untrusted = inspected(&rules, raw, &[], Keys::of(&head, false, &[]));
            assert_eq!(untrusted, want, "{raw} with the head of {other}");
            misled += usize::from(inspected(&rules, raw, &[], Keys::of(&head, true, &[])) != want);
        }
        assert!(
            misled > 100,
            "trusting such a head would skip rules: {misled}"
        );
        // A list-valued eventName the module wrote, and the string one it inherits.
        let raw = r#"{"eventSource":"iam.amazonaws.com","eventName":["CreateUser","x"]}"#;
        let head = crate::cloudtrail::head_of(
            br#"{"eventSource":"iam.amazonaws.com","eventName":"GetObject"}"#,
        )
        .expect("head");
        let got: Vec<String> = inspected(&rules, raw, &[], Keys::of(&head, false, &[]))
            .into_iter()
            .map(|h| h.id.to_string())
            .collect();
        assert!(got.iter().any(|id| id == "name-literal"), "{got:?}");
        assert_eq!(got.len(), reference(&rules, raw, &[]).len());
    }
}
