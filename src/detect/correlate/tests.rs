use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use super::*;

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/detect/correlation")
}

fn correlator() -> (Rules, Correlator) {
    let rules = Rules::load(&[dir()], &BTreeMap::new(), &BTreeMap::new(), false).expect("rules");
    let c = Correlator::compile(&rules, &Store::memory(), None, 86_400, false).expect("compiles");
    (rules, c)
}

fn failed(id: &str, user: &str, ip: &str) -> Value {
    json!({"eventID": id, "eventSource": "signin.amazonaws.com", "eventName": "ConsoleLogin",
        "sourceIPAddress": ip, "userIdentity": {"userName": user},
        "responseElements": {"ConsoleLogin": "Failure"}})
}

/// Feeds one event at `ts` and returns the ids of the correlations it fired.
async fn feed(rules: &Rules, c: &Correlator, e: &Value, ts: i64) -> Vec<String> {
    let hits = rules.evaluate(e);
    let id = e["eventID"].as_str().unwrap_or("");
    c.observe(&hits, e, id, ts, ts)
        .await
        .expect("observe")
        .into_iter()
        .map(|f| f.hit.id.to_string())
        .collect()
}

const COUNT: &str = "5c0e7d3a-2b7f-4a39-9d0e-1f6a2c9b8e10";
const VALUES: &str = "5c0e7d3a-2b7f-4a39-9d0e-1f6a2c9b8e11";
const TEMPORAL: &str = "5c0e7d3a-2b7f-4a39-9d0e-1f6a2c9b8e12";
/// 2024-03-18T14:00:00Z, a 10-minute and an hour boundary.
const T0: i64 = 1_710_770_400;

#[tokio::test]
async fn five_failed_logins_in_a_window_fire_once_and_a_redelivery_counts_once() {
    let (rules, c) = correlator();
    assert_eq!(c.len(), 3);
    assert!(
        !c.alerts_alone("5c0e7d3a-2b7f-4a39-9d0e-1f6a2c9b8e01"),
        "generate: false"
    );
    for i in 0..4 {
        let e = failed(&format!("e{i}"), "alice", "1.1.1.1");
        let got = feed(&rules, &c, &e, T0 + i * 60).await;
        assert!(got.is_empty(), "{i}: {got:?}");
    }
    // e3 again (a redelivery): still four.
    let again = failed("e3", "alice", "1.1.1.1");
    assert!(feed(&rules, &c, &again, T0 + 200).await.is_empty());
    // Another user's logins are another group.
    assert!(
        feed(&rules, &c, &failed("b0", "bob", "1.1.1.1"), T0 + 250)
            .await
            .is_empty()
    );
    let fifth = failed("e4", "alice", "1.1.1.1");
    assert_eq!(feed(&rules, &c, &fifth, T0 + 300).await, [COUNT]);
    // Once per window; but the event that fired fires again when it comes again.
    assert!(
        feed(&rules, &c, &failed("e5", "alice", "1.1.1.1"), T0 + 301)
            .await
            .is_empty()
    );
    assert_eq!(feed(&rules, &c, &fifth, T0 + 302).await, [COUNT]);
    // The next window starts from zero.
    for i in 0..4 {
        let e = failed(&format!("n{i}"), "alice", "1.1.1.1");
        assert!(feed(&rules, &c, &e, T0 + 600 + i).await.is_empty());
    }
    let e = failed("n4", "alice", "1.1.1.1");
    assert_eq!(feed(&rules, &c, &e, T0 + 1199).await, [COUNT]);
}

#[tokio::test]
async fn the_alert_says_which_group_window_and_count() {
    let (rules, c) = correlator();
    let mut last = Vec::new();
    for i in 0..5 {
        let e = failed(&format!("e{i}"), "alice", "1.1.1.1");
        let hits = rules.evaluate(&e);
        last = c
            .observe(&hits, &e, &format!("e{i}"), T0 + 5, T0)
            .await
            .expect("observe");
    }
    let [f] = last.as_slice() else {
        panic!("one fired: {last:?}")
    };
    assert_eq!(
        &*f.hit.title,
        "Five failed console logins for one user within ten minutes"
    );
    assert_eq!(f.hit.level, Level::High);
    assert!(f.hit.tags.contains(&"attack.t1110".to_owned()));
    assert_eq!(f.detail.kind, "event_count");
    assert_eq!(f.detail.value, 5);
    assert_eq!(
        f.detail.group,
        BTreeMap::from([("userIdentity.userName".to_owned(), Some("alice".to_owned()))])
    );
    assert_eq!(f.detail.window_start, "2024-03-18T14:00:00Z");
    assert_eq!(f.detail.window_end, "2024-03-18T14:10:00Z");
}

#[tokio::test]
async fn value_count_counts_distinct_values_and_temporal_needs_every_rule() {
    let (rules, c) = correlator();
    // One address, three users (one twice): the third distinct user fires.
    assert!(
        feed(&rules, &c, &failed("v0", "u1", "9.9.9.9"), T0)
            .await
            .is_empty()
    );
    assert!(
        feed(&rules, &c, &failed("v1", "u1", "9.9.9.9"), T0 + 1)
            .await
            .is_empty()
    );
    assert!(
        feed(&rules, &c, &failed("v2", "u2", "9.9.9.9"), T0 + 2)
            .await
            .is_empty()
    );
    let got = feed(&rules, &c, &failed("v3", "u3", "9.9.9.9"), T0 + 3).await;
    assert!(got.contains(&VALUES.to_owned()), "{got:?}");
    // u1 failed a login at T0; its new access key within the hour completes the temporal.
    let key = json!({"eventID": "k1", "eventSource": "iam.amazonaws.com",
        "eventName": "CreateAccessKey", "userIdentity": {"userName": "u1"}});
    assert_eq!(feed(&rules, &c, &key, T0 + 1800).await, [TEMPORAL]);
    // u9 only creates a key: one of two rules.
    let key9 = json!({"eventID": "k9", "eventSource": "iam.amazonaws.com",
        "eventName": "CreateAccessKey", "userIdentity": {"userName": "u9"}});
    assert!(feed(&rules, &c, &key9, T0 + 1800).await.is_empty());
    // In the next hour u1's failed login is no longer in the window.
    let key2 = json!({"eventID": "k2", "eventSource": "iam.amazonaws.com",
        "eventName": "CreateAccessKey", "userIdentity": {"userName": "u1"}});
    assert!(feed(&rules, &c, &key2, T0 + 3600).await.is_empty());
}

fn load_one(name: &str, text: &str) -> Result<Correlator, String> {
    let d = std::env::temp_dir().join(format!("trailhose-corr-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("dir");
    let base = std::fs::read_to_string(dir().join("logins.yml")).expect("base");
    let base = base
        .split("\n---\n")
        .take(2)
        .collect::<Vec<_>>()
        .join("\n---\n");
    std::fs::write(d.join("r.yml"), format!("{base}\n---\n{text}")).expect("write");
    let rules = Rules::load(
        std::slice::from_ref(&d),
        &BTreeMap::new(),
        &BTreeMap::new(),
        false,
    )
    .map_err(|e| e.to_string())?;
    let out = Correlator::compile(&rules, &Store::memory(), None, 86_400, false)
        .map_err(|e| e.to_string());
    let _ = std::fs::remove_dir_all(&d);
    out
}

#[test]
fn unsupported_correlations_are_named_with_the_reason() {
    let corr =
        |body: &str| format!("title: Bad one\nid: bad-1\ncorrelation:\n{body}\nlevel: high\n");
    let e = load_one(
        "unknown",
        &corr("  type: event_count\n  rules: [no_such_rule]\n  group-by: [x]\n  timespan: 5m\n  condition:\n    gte: 2"),
    )
    .err()
    .expect("unknown rule");
    assert!(e.contains("Bad one") && e.contains("no_such_rule"), "{e}");
    let e = load_one(
        "sum",
        &corr("  type: value_sum\n  rules: [failed_console_login]\n  group-by: [x]\n  timespan: 5m\n  condition:\n    field: n\n    gte: 2"),
    )
    .err()
    .expect("value_sum");
    assert!(
        e.contains("value_sum") && e.contains("not supported"),
        "{e}"
    );
    let e = load_one(
        "session",
        &corr("  type: event_count\n  rules: [failed_console_login]\n  group-by: [x]\n  timespan: 5m\n  window: session\n  gap: 1m\n  condition:\n    gte: 2"),
    )
    .err()
    .expect("session");
    assert!(e.contains("session"), "{e}");
    let e = load_one(
        "huge",
        &corr("  type: event_count\n  rules: [failed_console_login]\n  group-by: [x]\n  timespan: 5m\n  condition:\n    gte: 4001"),
    )
    .err()
    .expect("a threshold no item can hold");
    assert!(e.contains("above 4000"), "{e}");
    // Checked as events arrive: a condition a growing count can make false again is refused.
    for (name, cond) in [
        ("lt", "lt: 3"),
        ("eq", "eq: 5"),
        ("range", "gt: 5\n    lte: 10"),
    ] {
        let e = load_one(
            name,
            &corr(&format!("  type: event_count\n  rules: [failed_console_login]\n  group-by: [x]\n  timespan: 5m\n  condition:\n    {cond}")),
        )
        .err()
        .expect("an upper bound");
        assert!(e.contains("only gt/gte thresholds"), "{name}: {e}");
    }
    load_one(
        "max",
        &corr("  type: event_count\n  rules: [failed_console_login]\n  group-by: [x]\n  timespan: 5m\n  condition:\n    gte: 4000"),
    )
    .expect("4000 loads");
    load_one(
        "ok",
        &corr("  type: event_count\n  rules: [access_key_created]\n  group-by: [x]\n  timespan: 5m\n  condition:\n    gte: 2"),
    )
    .expect("a good one loads");
}

#[test]
fn caps_are_one_past_the_highest_threshold() {
    let (_, c) = correlator();
    let caps: Vec<usize> = c.correlations.iter().map(|x| x.cap).collect();
    assert_eq!(caps, [6, 4, 2]);
}

/// The test rules with `edit` applied, loaded from a folder of their own.
fn rules_edited(name: &str, edit: impl Fn(String) -> String) -> Rules {
    let d = std::env::temp_dir().join(format!("trailhose-carry-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("dir");
    let text = std::fs::read_to_string(dir().join("logins.yml")).expect("rules");
    std::fs::write(d.join("logins.yml"), edit(text)).expect("write");
    let rules = Rules::load(
        std::slice::from_ref(&d),
        &BTreeMap::new(),
        &BTreeMap::new(),
        false,
    )
    .expect("rules");
    let _ = std::fs::remove_dir_all(&d);
    rules
}

fn store_of<'a>(c: &'a Correlator, id: &str) -> &'a Store {
    &c.correlations
        .iter()
        .find(|x| x.id == id)
        .expect("correlation")
        .store
}

#[tokio::test]
async fn a_reload_keeps_the_counts_of_unchanged_correlations_and_drops_changed_ones() {
    let base = Store::memory();
    let build = |rules: &Rules, previous: Option<&Correlator>| {
        Correlator::build(rules, &base, previous, 86_400, false)
            .expect("compiles")
            .expect("has correlations")
    };
    let first_rules = rules_edited("a", |t| t);
    let first = build(&first_rules, None);
    for i in 0..4 {
        let e = failed(&format!("e{i}"), "alice", "1.1.1.1");
        assert!(feed(&first_rules, &first, &e, T0 + i).await.is_empty());
    }
    // Reloaded with a new title and level: not what is counted, so the four stay.
    let second_rules = rules_edited("b", |t| {
        t.replace(
            "title: Five failed console logins for one user within ten minutes",
            "title: Five failed logins (edited)",
        )
    });
    let second = build(&second_rules, Some(&first));
    assert!(store_of(&second, COUNT).same(store_of(&first, COUNT)));
    assert_eq!(store_of(&second, COUNT).held(), 1);
    let fifth = failed("e4", "alice", "1.1.1.1");
    assert_eq!(feed(&second_rules, &second, &fifth, T0 + 10).await, [COUNT]);
    // Reloaded with another threshold: its state starts afresh; the others keep theirs.
    let third_rules = rules_edited("c", |t| t.replace("gte: 5", "gte: 2"));
    let third = build(&third_rules, Some(&second));
    assert!(!store_of(&third, COUNT).same(store_of(&second, COUNT)));
    assert_eq!(store_of(&third, COUNT).held(), 0, "dropped");
    assert!(store_of(&third, VALUES).same(store_of(&second, VALUES)));
    assert!(store_of(&third, TEMPORAL).same(store_of(&first, TEMPORAL)));
    let e = failed("f0", "alice", "1.1.1.1");
    assert!(
        feed(&third_rules, &third, &e, T0 + 20).await.is_empty(),
        "one, not six"
    );
    let e = failed("f1", "alice", "1.1.1.1");
    assert_eq!(feed(&third_rules, &third, &e, T0 + 21).await, [COUNT]);
    // The changed definition keys its DynamoDB state differently too.
    let fp = |c: &Correlator| {
        c.correlations
            .iter()
            .find(|x| x.id == COUNT)
            .map(|x| x.fingerprint.clone())
            .expect("count")
    };
    assert_eq!(fp(&first), fp(&second));
    assert_ne!(fp(&second), fp(&third));
    // A removed correlation's state goes with the set that held it.
    let fourth_rules = rules_edited("d", |t| {
        t.replace("gte: 5", "gte: 2")
            .split("\n---\n")
            .filter(|doc| !doc.contains(VALUES))
            .collect::<Vec<_>>()
            .join("\n---\n")
    });
    let fourth = build(&fourth_rules, Some(&third));
    assert_eq!(fourth.len(), 2);
    assert!(store_of(&fourth, COUNT).same(store_of(&third, COUNT)));
}

/// The definition hash names DynamoDB items every worker must agree on: `aliases` (HashMaps
/// inside) must not change it from one parse to the next.
#[test]
fn a_correlation_with_aliases_hashes_the_same_every_time_it_is_parsed() {
    let corr = "title: Aliased\nid: alias-1\ncorrelation:\n  type: temporal\n  rules: [failed_console_login, access_key_created]\n  aliases:\n    who:\n      failed_console_login: userIdentity.arn\n      access_key_created: userIdentity.arn\n    from:\n      failed_console_login: sourceIPAddress\n      access_key_created: sourceIPAddress\n    where:\n      failed_console_login: awsRegion\n      access_key_created: awsRegion\n  group-by: [who, from, where]\n  timespan: 5m\nlevel: high\n";
    let hashes: std::collections::BTreeSet<String> = (0..12)
        .map(|i| {
            let c = load_one(&format!("alias{i}"), corr).expect("loads");
            let x = c
                .correlations
                .iter()
                .find(|x| x.id == "alias-1")
                .expect("the aliased correlation");
            x.fingerprint.clone()
        })
        .collect();
    assert_eq!(hashes.len(), 1, "{hashes:?}");
}

#[tokio::test]
async fn events_without_a_group_by_field_are_in_no_group() {
    let (rules, c) = correlator();
    // Five failed logins from five different principals none of which has a userName (a
    // root or federated sign-in): pooled under null they would fire COUNT.
    for i in 0..5 {
        let mut e = failed(&format!("g{i}"), "x", "1.1.1.1");
        e["userIdentity"] = json!({"type": "Root", "arn": format!("arn:aws:iam::{i}:root")});
        let got = feed(&rules, &c, &e, T0 + i * 10).await;
        assert!(!got.contains(&COUNT.to_owned()), "{i}: {got:?}");
    }
    assert_eq!(
        store_of(&c, COUNT).held(),
        0,
        "no state for the missing group"
    );
    // They still count where their group is known (VALUES groups by sourceIPAddress, and
    // counts userName values, which they lack: nothing counted there either).
    assert_eq!(store_of(&c, VALUES).held(), 0);
}

#[tokio::test]
async fn a_fired_window_is_not_written_again_except_by_the_event_that_fired_it() {
    let (rules, c) = correlator();
    for i in 0..5 {
        let e = failed(&format!("f{i}"), "alice", "1.1.1.1");
        let got = feed(&rules, &c, &e, T0 + i).await;
        assert_eq!(got.contains(&COUNT.to_owned()), i == 4, "{i}: {got:?}");
    }
    let count = store_of(&c, COUNT);
    assert_eq!(count.members(), 5);
    // Later events of the fired window: not added (the set would grow to its cap of 6).
    for i in 5..8 {
        let e = failed(&format!("f{i}"), "alice", "1.1.1.1");
        assert!(
            !feed(&rules, &c, &e, T0 + i)
                .await
                .contains(&COUNT.to_owned())
        );
    }
    assert_eq!(count.members(), 5, "a fired window is not rewritten");
    // The event that fired, delivered again, fires again.
    let again = failed("f4", "alice", "1.1.1.1");
    assert_eq!(
        feed(&rules, &c, &again, T0 + 9).await,
        [COUNT.to_owned()],
        "redelivered, it fires again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_run_fails_when_a_correlation_could_not_count_an_event() {
    use crate::cloudtrail::Head;
    use crate::detect::{Detect, Running, Seen};
    // Local files have no notification to deliver again: an event a correlation could not
    // count must fail the run, like an undelivered alert or a failed write.
    let cfg: crate::detect::config::DetectConfig = toml::from_str(&format!(
        "rules = [{:?}]\nreload_secs = 0",
        dir().display().to_string()
    ))
    .expect("config");
    let (d, delivery) = Detect::open(&cfg).await.expect("open");
    // Its correlations on a table at a closed port: every call fails.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let shared = aws_config::SdkConfig::builder()
        .behavior_version(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new("us-east-1"))
        .endpoint_url(format!("http://127.0.0.1:{closed}"))
        .credentials_provider(aws_sdk_dynamodb::config::SharedCredentialsProvider::new(
            aws_sdk_dynamodb::config::Credentials::new("k", "s", None, None, "test"),
        ))
        .build();
    let dead = Store::dynamo_unchecked(
        &shared,
        "gone",
        std::time::Duration::from_millis(300),
        std::time::Duration::from_secs(2),
    );
    let (rules, _) = correlator();
    let c = Correlator::build(&rules, &dead, None, 86_400, false).expect("compiles");
    *d.running.write().unwrap_or_else(|p| p.into_inner()) = std::sync::Arc::new(Running {
        rules,
        correlator: c,
    });
    let d2 = d.clone();
    tokio::task::spawn_blocking(move || {
        let raw = r#"{"eventID":"l1","eventTime":"2024-03-18T14:01:00Z","eventSource":"signin.amazonaws.com","eventName":"ConsoleLogin","userIdentity":{"userName":"carol"},"responseElements":{"ConsoleLogin":"Failure"}}"#;
        let head = Head {
            event_id: Some("l1".into()),
            event_time: Some("2024-03-18T14:01:00Z".into()),
            ..Head::default()
        };
        d2.inspect(&Seen {
            raw: raw.as_bytes(),
            additions: &[],
            head: &head,
            exact_head: false,
            partition: "",
            source: "/local/f.json",
            hold: None,
        });
    })
    .await
    .expect("feed");
    drop(d);
    // Its time is measured too, as a failure.
    let failed = crate::metrics::METRICS.render().lines().any(|l| {
        l.starts_with("trailhose_correlation_update_seconds_count{outcome=\"failed\"} ")
            && !l.ends_with(" 0")
    });
    assert!(failed, "update time of the failed update");
    let failures = delivery.finish().await;
    assert!(
        failures
            .iter()
            .any(|f| f.starts_with("1 matched event(s) not counted in their correlations")),
        "{failures:?}"
    );
}
