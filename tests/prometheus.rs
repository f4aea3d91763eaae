//! The Helm chart's dashboard and alerts, evaluated on a live Prometheus. A real Prometheus
//! server scrapes both kinds of worker on moto every second while traffic flows (good input,
//! bad files, garbage messages, failing writes); then every dashboard query and every alert
//! expression must return series through /api/v1/query, histogram quantiles must be numbers,
//! and every metric must be used as its type allows. A wrong label, a rate() over a gauge or a
//! histogram queried without `_bucket` fails here, not on an operator's screen.
//!
//! Needs TRAILHOSE_TEST_PROMETHEUS (the server binary) and TRAILHOSE_TEST_ALERTS (the chart's
//! alert rules as Helm renders them), which `source scripts/chart-env.sh` exports; scripts/test.sh
//! always does, so there the test runs or fails. A plain `cargo test` without them skips it.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::observed::Workers;
use common::prometheus::{Prometheus, Sample, Target};

const DASHBOARD: &str = "helm/trailhose/dashboards/trailhose.json";
const RULES_TEMPLATE: &str = "helm/trailhose/templates/prometheusrule.yaml";

/// What Grafana's `$__rate_interval`, `$__interval` and `$__range` become: longer than the
/// whole scenario, so a series that moved early still has a rate when it is checked.
const WINDOW: &str = "10m";

/// Queries over series this scenario does not produce or does not move (a counter exported at
/// 0 from start-up), each with the reason. They are still evaluated: once one returns a
/// non-zero value the test fails until its entry is removed here (and the query is then
/// checked like every other).
const NOT_EMITTED: &[(&str, &str)] = &[
    (
        "alert TrailhoseSqsOldestMessageOld",
        "a CloudWatch exporter's series (SQS ApproximateAgeOfOldestMessage), not one trailhose emits",
    ),
    (
        "alert TrailhoseAlertDeliveryFailing [sqs-values]",
        "the SQS worker's alerts are delivered, so its give-up counters stay at 0 (an output that \
         gives up would hold back every notification, and the SQS panels need some deleted); the \
         same rule on the Kinesis release (ci/detect-values.yaml), whose alert queue is gone, is \
         checked",
    ),
    (
        "alert TrailhoseCorrelationStoreFailing [sqs-values]",
        "the SQS worker counts its correlations in process, so its failure and breaker \
         counters stay at 0; the same rule on the Kinesis release, whose DynamoDB table is gone, \
         is checked",
    ),
    (
        "alert TrailhoseOutputWritesFailing [sqs-values]",
        "the SQS worker's writes succeed here (it is the one that writes the output the panels \
         show); the same rule on the Kinesis release, whose output bucket is gone, is checked",
    ),
];

/// Range functions that want a counter (or a histogram's `_bucket`, `_sum`, `_count`).
const COUNTER_FUNCTIONS: &[&str] = &["rate", "irate", "increase"];

#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    /// At least one series, every value a finite number, some value above 0 where counters are
    /// rated (they moved), every legend label present.
    Series,
    /// No series while the workers are scraped (`absent()`).
    Empty,
    /// A complete alert expression: evaluates without error; whether it fires is the arms' matter.
    Evaluates,
}

#[derive(Debug, Clone)]
struct Query {
    id: String,
    expr: String,
    legend: Option<String>,
    expect: Expect,
}

/// scripts/render_alerts.py's output: each mode is its own release, with its own job label.
#[derive(serde::Deserialize)]
struct Rendered {
    namespace: String,
    jobs: BTreeMap<String, String>,
    alerts: Vec<RenderedAlert>,
}

#[derive(serde::Deserialize)]
struct RenderedAlert {
    case: String,
    alert: String,
    expr: String,
}

fn live_env() -> Option<(PathBuf, PathBuf)> {
    let get = |k: &str| std::env::var_os(k).map(PathBuf::from);
    match (
        get("TRAILHOSE_TEST_PROMETHEUS"),
        get("TRAILHOSE_TEST_ALERTS"),
    ) {
        (Some(p), Some(a)) => Some((p, a)),
        _ => {
            eprintln!(
                "skipped: TRAILHOSE_TEST_PROMETHEUS and TRAILHOSE_TEST_ALERTS are not set \
                 (`source scripts/chart-env.sh` sets them; scripts/test.sh always does)"
            );
            None
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_query_and_alert_returns_data_on_a_live_prometheus() {
    let Some((binary, alerts)) = live_env() else {
        return;
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let rendered: Rendered =
        serde_json::from_str(&std::fs::read_to_string(&alerts).unwrap_or_else(|e| {
            panic!("{}: {e} (scripts/chart-env.sh writes it)", alerts.display())
        }))
        .expect("rendered alerts JSON");
    let template = std::fs::read_to_string(root.join(RULES_TEMPLATE)).expect("rule template");
    let mut queries = alert_queries(&rendered.alerts);
    let rendered_names: BTreeSet<&str> = rendered.alerts.iter().map(|a| a.alert.as_str()).collect();
    for name in template_alerts(&template) {
        assert!(
            rendered_names.contains(name.as_str()),
            "{name} is in {RULES_TEMPLATE} but no helm/trailhose/ci/*.yaml renders it: add a values file that does"
        );
    }
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join(DASHBOARD)).expect("dashboard"))
            .expect("dashboard JSON");

    // Each worker is scraped as its mode's release, under the labels the rendered alerts select.
    let workers = Workers::start("prometheus").await;
    let targets: Vec<Target> = [(workers.sqs_port, "sqs"), (workers.kinesis_port, "kinesis")]
        .into_iter()
        .map(|(port, mode)| {
            let job = rendered.jobs.get(mode).unwrap_or_else(|| {
                panic!("no helm/trailhose/ci/*.yaml renders the alerts in {mode} mode")
            });
            Target {
                port,
                labels: operator_labels(job, &rendered.namespace),
            }
        })
        .collect();
    let prom = Prometheus::start(&binary, &targets);
    // Traffic starts once both workers have been scraped: a series' first sample is its
    // baseline, so increments before it would never show in a rate().
    let deadline = Instant::now() + Duration::from_secs(60);
    while prom.query("up == 1").map(|s| s.len()).unwrap_or(0) < targets.len() {
        assert!(
            Instant::now() < deadline,
            "both workers scraped within 60 s: {:?}\n{}",
            prom.query("up"),
            prom.log()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    let vars = resolve_variables(&prom, &dashboard, &rendered);
    queries.extend(panel_queries(&dashboard, &vars));
    let ids: BTreeSet<&str> = queries.iter().map(|q| q.id.as_str()).collect();
    for (id, _) in NOT_EMITTED {
        assert!(
            ids.contains(id),
            "NOT_EMITTED lists {id}, which is no dashboard query or alert: remove it"
        );
    }
    let not_emitted = |q: &Query| NOT_EMITTED.iter().any(|(id, _)| *id == q.id);

    // Rounds of traffic until every query has passed once (each is checked until it does).
    let mut pending: Vec<&Query> = queries.iter().filter(|q| !not_emitted(q)).collect();
    let mut last_error: BTreeMap<String, String> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(240);
    let mut round = 0;
    while !pending.is_empty() && Instant::now() < deadline {
        workers.feed(round).await;
        round += 1;
        tokio::time::sleep(Duration::from_secs(2)).await;
        pending.retain(|q| match check(&prom, q) {
            Ok(()) => false,
            Err(e) => {
                last_error.insert(q.id.clone(), e);
                true
            }
        });
    }
    let mut failed: Vec<String> = pending
        .iter()
        .map(|q| format!("{}: {}\n    {}", q.id, last_error[&q.id], q.expr))
        .collect();
    // Every metric used as its scraped type allows.
    let types = prom.metadata().expect("/api/v1/metadata");
    for q in queries.iter().filter(|q| !not_emitted(q)) {
        for p in type_problems(&q.expr, &types) {
            failed.push(format!("{}: {p}\n    {}", q.id, q.expr));
        }
    }
    assert!(
        failed.is_empty(),
        "after {round} rounds of traffic on a live Prometheus:\n{}",
        failed.join("\n")
    );

    for q in queries.iter().filter(|q| not_emitted(q)) {
        let got = prom.query(&q.expr);
        assert!(
            got.as_ref().is_ok_and(|s| s.iter().all(|s| s.value == 0.0)),
            "{} is in NOT_EMITTED but gives {got:?}: remove it there so it is checked\n    {}",
            q.id,
            q.expr
        );
    }
    // What each query gives now, for a reader of `--nocapture`.
    for q in &queries {
        let got = prom.query(&q.expr).unwrap_or_default();
        let values: Vec<String> = got
            .iter()
            .take(6)
            .map(|s| {
                let labels: Vec<String> = s
                    .labels
                    .iter()
                    .filter(|(k, _)| {
                        ![
                            "namespace",
                            "job",
                            "service",
                            "container",
                            "endpoint",
                            "instance",
                        ]
                        .contains(&k.as_str())
                    })
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect();
                format!("{{{}}} {:.4}", labels.join(","), s.value)
            })
            .collect();
        eprintln!("  {}: {}", q.id, values.join("  "));
    }
    eprintln!(
        "{} dashboard queries and alert expressions evaluated on Prometheus after {round} rounds of traffic; {} not emitted by this scenario",
        queries.len(),
        NOT_EMITTED.len()
    );
}

/// The target labels the Prometheus Operator gives a ServiceMonitor's series (the job is the
/// Service's name, the pod one of the release's).
fn operator_labels(job: &str, namespace: &str) -> BTreeMap<String, String> {
    let pod = format!("{job}-7d9f8b6c5-x2k4q");
    [
        ("job", job),
        ("namespace", namespace),
        ("service", job),
        ("pod", pod.as_str()),
        ("container", "trailhose"),
        ("endpoint", "metrics"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

fn check(prom: &Prometheus, q: &Query) -> Result<(), String> {
    let got: Vec<Sample> = prom.query(&q.expr)?;
    match q.expect {
        Expect::Evaluates => Ok(()),
        Expect::Empty if got.is_empty() => Ok(()),
        Expect::Empty => Err(format!("answers while the workers are scraped: {got:?}")),
        Expect::Series => {
            if got.is_empty() {
                return Err("no series".into());
            }
            if let Some(s) = got.iter().find(|s| !s.value.is_finite()) {
                return Err(format!("{} for {:?}", s.value, s.labels));
            }
            let rates_counters = metric_uses(&q.expr).iter().any(|(_, calls)| {
                calls
                    .last()
                    .is_some_and(|f| COUNTER_FUNCTIONS.contains(&f.as_str()))
            });
            if rates_counters && !got.iter().any(|s| s.value > 0.0) {
                return Err(format!("the counters have not moved: {got:?}"));
            }
            for label in q.legend.as_deref().map(legend_labels).unwrap_or_default() {
                if let Some(s) = got
                    .iter()
                    .find(|s| s.labels.get(&label).is_none_or(|v| v.is_empty()))
                {
                    return Err(format!(
                        "the legend shows {{{{{label}}}}} but a series has no {label} label: {:?}",
                        s.labels
                    ));
                }
            }
            Ok(())
        }
    }
}

/// For each distinct rendered alert: the whole expression (must evaluate) and each arm of a
/// top-level `or`/`and`/`unless` without its threshold (must give series; `absent()` must not).
fn alert_queries(alerts: &[RenderedAlert]) -> Vec<Query> {
    let mut variants: BTreeMap<&str, Vec<(&str, &str)>> = BTreeMap::new();
    for a in alerts {
        let v = variants.entry(&a.alert).or_default();
        if !v.iter().any(|(_, e)| *e == a.expr) {
            v.push((&a.case, &a.expr));
        }
    }
    let mut out = Vec::new();
    for (alert, exprs) in variants {
        for (case, expr) in &exprs {
            let id = if exprs.len() == 1 {
                format!("alert {alert}")
            } else {
                format!("alert {alert} [{case}]")
            };
            out.push(Query {
                id: format!("{id} (whole)"),
                expr: expr.to_string(),
                legend: None,
                expect: Expect::Evaluates,
            });
            let arms = split_top(expr, &["or", "and", "unless"]);
            let n = arms.len();
            for (i, arm) in arms.into_iter().enumerate() {
                let expect = if arm.starts_with("absent(") {
                    Expect::Empty
                } else {
                    Expect::Series
                };
                out.push(Query {
                    id: if n == 1 {
                        id.clone()
                    } else {
                        format!("{id} (arm {})", i + 1)
                    },
                    expr: strip_threshold(&arm).to_owned(),
                    legend: None,
                    expect,
                });
            }
        }
    }
    out
}

/// Every `- alert: Name` in the rule template, whichever values render it.
fn template_alerts(template: &str) -> Vec<String> {
    template
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert:"))
        .map(|n| n.trim().to_owned())
        .collect()
}

/// The dashboard's query variables resolved in order, as Grafana does with `label_values`
/// (each must find values), plus the interval variables.
fn resolve_variables(
    prom: &Prometheus,
    dashboard: &serde_json::Value,
    rendered: &Rendered,
) -> BTreeMap<String, String> {
    let mut vars: BTreeMap<String, String> = ["__rate_interval", "__interval", "__range"]
        .into_iter()
        .map(|v| (v.to_owned(), WINDOW.to_owned()))
        .collect();
    let list = dashboard["templating"]["list"]
        .as_array()
        .expect("templating.list");
    for v in list {
        let name = v["name"].as_str().expect("variable name");
        match v["type"].as_str() {
            Some("datasource") => continue,
            Some("query") => {}
            other => panic!("variable {name}: type {other:?} is not handled by this test"),
        }
        let query = v["query"]["query"]
            .as_str()
            .or(v["query"].as_str())
            .expect("variable query");
        let (selector, label) = parse_label_values(query)
            .unwrap_or_else(|| panic!("variable {name}: {query} is not label_values(...)"));
        let selector = substitute(&selector, &vars)
            .unwrap_or_else(|e| panic!("variable {name}: {e} in {query}"));
        let values = prom
            .label_values(&label, &selector)
            .unwrap_or_else(|e| panic!("variable {name}: {e}"));
        assert!(
            !values.is_empty(),
            "variable {name} ({query}) finds no values"
        );
        // The alerts select exactly these labels: the two must agree.
        let want: Vec<&String> = match name {
            "namespace" => vec![&rendered.namespace],
            "job" => rendered.jobs.values().collect(),
            _ => vec![],
        };
        for w in want {
            assert!(
                values.contains(w),
                "variable {name} finds {values:?}, not the alerts' {w}"
            );
        }
        let alternatives: Vec<String> = values.iter().map(|s| regex_escape(s)).collect();
        vars.insert(name.to_owned(), format!("({})", alternatives.join("|")));
    }
    vars
}

/// `label_values(selector, label)` (or `label_values(label)`) → (selector, label).
fn parse_label_values(q: &str) -> Option<(String, String)> {
    let inner = q.trim().strip_prefix("label_values(")?.strip_suffix(')')?;
    match split_top_at(inner, ",").as_slice() {
        [label] => Some(("{__name__=~\".+\"}".to_owned(), label.trim().to_owned())),
        [selector, label] => Some((selector.trim().to_owned(), label.trim().to_owned())),
        _ => None,
    }
}

fn panel_queries(dashboard: &serde_json::Value, vars: &BTreeMap<String, String>) -> Vec<Query> {
    fn walk<'a>(panels: &'a serde_json::Value, out: &mut Vec<&'a serde_json::Value>) {
        for p in panels.as_array().into_iter().flatten() {
            out.push(p);
            walk(&p["panels"], out);
        }
    }
    let mut panels = Vec::new();
    walk(&dashboard["panels"], &mut panels);
    let mut out = Vec::new();
    for p in panels {
        let title = p["title"].as_str().unwrap_or("?");
        for t in p["targets"].as_array().into_iter().flatten() {
            let Some(expr) = t["expr"].as_str() else {
                continue;
            };
            let id = format!("panel {title:?} {}", t["refId"].as_str().unwrap_or("?"));
            let expr = substitute(expr, vars).unwrap_or_else(|e| panic!("{id}: {e}"));
            out.push(Query {
                id,
                expr,
                legend: t["legendFormat"].as_str().map(str::to_owned),
                expect: Expect::Series,
            });
        }
    }
    assert!(out.len() >= 10, "the dashboard has queries");
    out
}

/// Replaces `$name` and `${name}`; an unknown variable is an error.
fn substitute(expr: &str, vars: &BTreeMap<String, String>) -> Result<String, String> {
    let is_name = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut out = String::new();
    let mut rest = expr;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        let (name, len) = match after.strip_prefix('{') {
            Some(b) => {
                let end = b.find('}').ok_or("unclosed ${")?;
                (&b[..end], end + 2)
            }
            None => {
                let end = after.find(|c| !is_name(c)).unwrap_or(after.len());
                (&after[..end], end)
            }
        };
        let value = vars
            .get(name)
            .ok_or_else(|| format!("unknown variable ${name}"))?;
        out.push_str(value);
        rest = &after[len..];
    }
    out.push_str(rest);
    Ok(out)
}

fn regex_escape(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            let special = "\\.+*?()|[]{}^$".contains(c);
            special.then_some('\\').into_iter().chain([c])
        })
        .collect()
}

/// The `{{label}}` names in a legend format.
fn legend_labels(legend: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = legend;
    while let Some(i) = rest.find("{{") {
        let after = &rest[i + 2..];
        let Some(end) = after.find("}}") else { break };
        out.push(after[..end].trim().to_owned());
        rest = &after[end + 2..];
    }
    out
}

// ---- a little PromQL: enough structure to split alerts and see what encloses a metric ------

/// Byte offsets of `expr` that are outside string literals, with their nesting depth in
/// parentheses, brackets and braces.
fn depths(expr: &str) -> Vec<(usize, char, usize)> {
    let mut out = Vec::new();
    let (mut depth, mut quote, mut escaped) = (0usize, None::<char>, false);
    for (i, c) in expr.char_indices() {
        if let Some(q) = quote {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == q {
                quote = None;
            }
            continue;
        }
        match c {
            '"' | '\'' | '`' => quote = Some(c),
            '(' | '[' | '{' => {
                out.push((i, c, depth));
                depth += 1;
            }
            ')' | ']' | '}' => {
                depth = depth.saturating_sub(1);
                out.push((i, c, depth));
            }
            _ => out.push((i, c, depth)),
        }
    }
    out
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// Splits at top-level occurrences of the literal `sep`.
fn split_top_at<'a>(expr: &'a str, sep: &str) -> Vec<&'a str> {
    let mut out = Vec::new();
    let mut start = 0;
    for (i, _, depth) in depths(expr) {
        if depth == 0 && i >= start && expr[i..].starts_with(sep) {
            out.push(&expr[start..i]);
            start = i + sep.len();
        }
    }
    out.push(&expr[start..]);
    out
}

/// Splits at top-level keyword operators (`or`, `and`, `unless`), as whole words.
fn split_top(expr: &str, ops: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    let mut start = 0;
    for (i, _, depth) in depths(expr) {
        if depth != 0 || i < start {
            continue;
        }
        let before = expr[..i].chars().next_back();
        if before.is_some_and(is_ident) {
            continue;
        }
        for op in ops {
            let after = expr[i..].strip_prefix(op);
            if after.is_some_and(|a| !a.chars().next().is_some_and(is_ident)) {
                out.push(expr[start..i].trim().to_owned());
                start = i + op.len();
                break;
            }
        }
    }
    out.push(expr[start..].trim().to_owned());
    out
}

/// The expression without a top-level comparison against a number (`x > 0.05` → `x`).
fn strip_threshold(arm: &str) -> &str {
    let mut cut = None;
    let chars = depths(arm);
    for (i, c, depth) in &chars {
        if *depth != 0 || !matches!(c, '>' | '<' | '=' | '!') {
            continue;
        }
        let len = if arm[i + 1..].starts_with('=') { 2 } else { 1 };
        if (*c == '=' || *c == '!') && len == 1 {
            continue;
        }
        // The second character of a two-character operator was seen as its own position.
        if cut.is_some_and(|(j, l): (usize, usize)| j + l > *i) {
            continue;
        }
        cut = Some((*i, len));
    }
    let Some((i, len)) = cut else {
        return arm.trim();
    };
    let rhs = arm[i + len..].trim();
    let rhs = rhs.strip_prefix("bool").map(str::trim).unwrap_or(rhs);
    if rhs.parse::<f64>().is_ok() {
        arm[..i].trim()
    } else {
        arm.trim()
    }
}

/// Every `trailhose_*` metric in `expr` with the calls enclosing it, innermost last: a
/// function's name, or "" for an aggregation's body after `by (...)` or a bare parenthesis.
fn metric_uses(expr: &str) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    let mut stack: Vec<String> = Vec::new();
    let mut opened: Vec<char> = Vec::new();
    let mut word = String::new();
    let mut last_word = String::new();
    let mut after_word = false;
    let chars = depths(expr);
    let mut k = 0;
    while let Some(&(i, c, _)) = chars.get(k) {
        k += 1;
        if is_ident(c) && (c.is_ascii_alphabetic() || c == '_' || !word.is_empty()) {
            word.push(c);
            let next = chars.get(k).filter(|(j, _, _)| *j == i + c.len_utf8());
            if next.is_some_and(|&(_, n, _)| is_ident(n)) {
                continue;
            }
            let inside_braces = opened.last() == Some(&'{');
            if word.starts_with("trailhose_") && !inside_braces {
                out.push((word.clone(), stack.clone()));
            }
            last_word = std::mem::take(&mut word);
            after_word = true;
            continue;
        }
        match c {
            '(' => {
                stack.push(if after_word {
                    last_word.clone()
                } else {
                    String::new()
                });
                opened.push(c);
            }
            '[' | '{' => opened.push(c),
            ')' => {
                stack.pop();
                opened.pop();
            }
            ']' | '}' => {
                opened.pop();
            }
            _ => {}
        }
        if !c.is_whitespace() {
            after_word = false;
        }
    }
    out
}

/// Metrics used against their type: counters without rate()/increase(), rate() over gauges,
/// histograms without `_bucket`/`_sum`/`_count`, buckets outside histogram_quantile().
fn type_problems(expr: &str, types: &BTreeMap<String, String>) -> Vec<String> {
    let mut out = Vec::new();
    for (name, stack) in metric_uses(expr) {
        let part = ["_bucket", "_sum", "_count"].into_iter().find_map(|s| {
            let base = name.strip_suffix(s)?;
            (types.get(base).map(String::as_str) == Some("histogram")).then_some((base, s))
        });
        let family = part.map(|(b, _)| b).unwrap_or(&name);
        let Some(ty) = types.get(family) else {
            out.push(format!("{name} was never scraped (no metadata)"));
            continue;
        };
        let f = stack.last().map(String::as_str).unwrap_or("");
        let counting = COUNTER_FUNCTIONS.contains(&f);
        match (ty.as_str(), part.map(|(_, s)| s)) {
            ("histogram", None) => out.push(format!(
                "the histogram {name} is queried without _bucket, _sum or _count"
            )),
            ("histogram", Some("_bucket"))
                if !counting || !stack.iter().any(|s| s == "histogram_quantile") =>
            {
                out.push(format!(
                    "{name} belongs in histogram_quantile(..., rate({name}[...]))"
                ))
            }
            ("counter", _) | ("histogram", _) if !counting && f != "absent" => out.push(format!(
                "the counter {name} is used without rate() or increase() (in {f:?})"
            )),
            ("gauge", _) if counting => out.push(format!("{f}() over the gauge {name}")),
            ("counter" | "gauge" | "histogram", _) => {}
            (other, _) => out.push(format!(
                "{name} has type {other}, which this test does not judge"
            )),
        }
    }
    out
}

#[test]
fn alerts_split_into_arms_without_thresholds() {
    let e = "sum(increase(trailhose_a_total{job=\"x\",reason=\"or\"}[30m])) == 0\n  or absent(trailhose_a_total{job=\"x\"})";
    let arms = split_top(e, &["or", "and", "unless"]);
    assert_eq!(arms.len(), 2, "{arms:?}");
    assert_eq!(
        strip_threshold(&arms[0]),
        "sum(increase(trailhose_a_total{job=\"x\",reason=\"or\"}[30m]))"
    );
    assert_eq!(
        strip_threshold(&arms[1]),
        "absent(trailhose_a_total{job=\"x\"})"
    );
    let ratio = "sum(rate(e[15m]))\n / (sum(rate(f[15m])) or vector(0))\n > 0.05";
    assert_eq!(
        split_top(ratio, &["or"]).len(),
        1,
        "`or` inside parentheses"
    );
    assert_eq!(
        strip_threshold(ratio),
        "sum(rate(e[15m]))\n / (sum(rate(f[15m])) or vector(0))"
    );
    assert_eq!(strip_threshold("max(g) / 1000 >= 600"), "max(g) / 1000");
    assert_eq!(strip_threshold("a > bool 1"), "a");
    assert_eq!(strip_threshold("a > b"), "a > b", "only thresholds go");
    assert_eq!(strip_threshold("x{a!=\"1\"} != 2"), "x{a!=\"1\"}");
    assert_eq!(
        split_top("a ordinal b", &["or"]).len(),
        1,
        "whole words only"
    );
}

#[test]
fn metric_types_are_checked_against_their_use() {
    let types: BTreeMap<String, String> = [
        ("trailhose_c_total", "counter"),
        ("trailhose_g", "gauge"),
        ("trailhose_h_seconds", "histogram"),
    ]
    .into_iter()
    .map(|(a, b)| (a.to_owned(), b.to_owned()))
    .collect();
    let ok = [
        "sum by (x) (rate(trailhose_c_total{a=\"b\"}[5m]))",
        "histogram_quantile(0.99, sum by (le) (rate(trailhose_h_seconds_bucket{a=~\"b\"}[5m])))",
        "sum(rate(trailhose_h_seconds_sum[5m])) / sum(rate(trailhose_h_seconds_count[5m]))",
        "max by (s) (trailhose_g) / 1000",
        "absent(trailhose_c_total{job=\"x\"})",
    ];
    for e in ok {
        assert_eq!(type_problems(e, &types), Vec::<String>::new(), "{e}");
    }
    let bad = [
        ("sum(rate(trailhose_g[5m]))", "over the gauge"),
        ("sum(trailhose_c_total)", "without rate()"),
        (
            "histogram_quantile(0.5, sum by (le) (rate(trailhose_h_seconds[5m])))",
            "without _bucket",
        ),
        (
            "sum(rate(trailhose_h_seconds_bucket[5m]))",
            "histogram_quantile",
        ),
        ("sum(rate(trailhose_missing_total[5m]))", "never scraped"),
    ];
    for (e, want) in bad {
        let got = type_problems(e, &types);
        assert!(got.iter().any(|p| p.contains(want)), "{e}: {got:?}");
    }
    let uses =
        metric_uses("histogram_quantile(0.5, sum by (le) (rate(trailhose_h_seconds_bucket[5m])))");
    assert_eq!(
        uses,
        vec![(
            "trailhose_h_seconds_bucket".to_owned(),
            vec![
                "histogram_quantile".to_owned(),
                String::new(),
                "rate".to_owned()
            ]
        )]
    );
}

#[test]
fn dashboard_variables_are_substituted() {
    let vars: BTreeMap<String, String> = [("job", "(a|b)"), ("__rate_interval", "10m")]
        .into_iter()
        .map(|(a, b)| (a.to_owned(), b.to_owned()))
        .collect();
    assert_eq!(
        substitute("rate(x{job=~\"$job\"}[$__rate_interval]) ${job}", &vars).as_deref(),
        Ok("rate(x{job=~\"(a|b)\"}[10m]) (a|b)")
    );
    assert!(substitute("x{ns=~\"$namespace\"}", &vars).is_err());
    assert_eq!(
        parse_label_values("label_values(m{namespace=~\"$namespace\"}, job)"),
        Some(("m{namespace=~\"$namespace\"}".to_owned(), "job".to_owned()))
    );
    assert_eq!(
        legend_labels("p50 {{kind}} {{ module }}"),
        ["kind", "module"]
    );
    assert_eq!(regex_escape("a.b"), "a\\.b");
}
