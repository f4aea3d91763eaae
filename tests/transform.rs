//! End to end: WASM transform modules (built by scripts/build-transforms.sh) run by the real
//! `trailhose process` binary over CloudTrail files, with the GeoIP stage before them; hostile
//! modules are contained; reloads swap modules without losing events.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::checks::{fixture_dbs, split_output};
use common::mmdb::{LONDON_IP, MILTON_IP, NOT_FOUND_IP};
use common::{TempDir, fixtures, local_objects, trailhose};
use serde_json::{Value, json};

fn module(name: &str) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/transforms");
    let path = if name == "tag_account" {
        root.join("python/tag_account.wasm")
    } else {
        root.join(format!("wasm32-wasip2/release/{name}.wasm"))
    };
    assert!(
        path.is_file(),
        "{} is missing: run scripts/build-transforms.sh (scripts/test.sh does)",
        path.display()
    );
    path
}

/// Compiled modules are cached across the tests' runs, as in production.
fn cache_dir() -> String {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("wasm-cache")
        .display()
        .to_string()
}

/// The events every test feeds: (eventID, event).
fn events() -> Vec<Value> {
    let ev = |id: &str, source: &str, name: &str, ip: &str, read_only: bool, account: &str| {
        json!({
            "eventVersion": "1.09",
            "userIdentity": {"type": "IAMUser", "arn": format!("arn:aws:iam::{account}:user/alice-{id}")},
            "eventTime": "2024-03-18T10:15:00Z",
            "eventSource": source,
            "eventName": name,
            "awsRegion": "eu-west-1",
            "sourceIPAddress": ip,
            "requestParameters": null,
            "eventID": id,
            "readOnly": read_only,
            "eventType": "AwsApiCall",
            "recipientAccountId": account,
        })
    };
    let mut e1 = ev(
        "e1",
        "iam.amazonaws.com",
        "CreateUser",
        LONDON_IP,
        false,
        "111122223333",
    );
    e1["requestParameters"] = json!({"userName": "bob", "password": "hunter2"});
    let mut e3 = ev(
        "e3",
        "ec2.amazonaws.com",
        "DescribeInstances",
        MILTON_IP,
        true,
        "111122223333",
    );
    e3["errorCode"] = json!("Client.UnauthorizedOperation");
    vec![
        e1,
        ev(
            "e2",
            "ec2.amazonaws.com",
            "DescribeInstances",
            MILTON_IP,
            true,
            "111122223333",
        ),
        e3,
        ev(
            "e4",
            "s3.amazonaws.com",
            "GetObject",
            MILTON_IP,
            true,
            "444455556666",
        ),
        ev(
            "e5",
            "sts.amazonaws.com",
            "AssumeRole",
            NOT_FOUND_IP,
            false,
            "444455556666",
        ),
        ev(
            "e6",
            "iam.amazonaws.com",
            "ListUsers",
            MILTON_IP,
            true,
            "111122223333",
        ),
    ]
}

/// A module entry of the pipeline config.
struct Mod<'a> {
    name: &'a str,
    file: &'a str,
    config: &'a [(&'a str, &'a str)],
    extra: &'a str,
}

fn m<'a>(name: &'a str, file: &'a str, config: &'a [(&'a str, &'a str)]) -> Mod<'a> {
    Mod {
        name,
        file,
        config,
        extra: "",
    }
}

struct Run {
    ok: bool,
    stderr: String,
    /// eventID (any key case) → output event.
    events: BTreeMap<String, Value>,
    /// (key, line) of every output event.
    lines: Vec<(String, String)>,
    errors: Vec<Value>,
    metrics: String,
}

impl Run {
    fn metric(&self, needle: &[&str]) -> f64 {
        self.metrics
            .lines()
            .find(|l| !l.starts_with('#') && needle.iter().all(|n| l.contains(n)))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    }
}

/// Runs `trailhose process` over `events` with `modules`, `batch` events per call.
fn run(events: &[Value], modules: &[Mod<'_>], batch: usize) -> Run {
    let tmp = TempDir::new("transform");
    let input = tmp
        .path()
        .join("in/AWSLogs/111122223333/CloudTrail/eu-west-1/2024/03/18");
    std::fs::create_dir_all(&input).unwrap();
    let doc = serde_json::to_vec(&json!({ "Records": events })).unwrap();
    std::fs::write(
        input.join("111122223333_CloudTrail_eu-west-1_20240318T1020Z_t.json.gz"),
        fixtures::gzip(&doc),
    )
    .unwrap();
    let out = tmp.path().join("out");
    let (city, _) = fixture_dbs(tmp.path());
    let mut cfg = format!(
        "[output]\nurl = {:?}\n[geoip]\ncity_db = {city:?}\n[pipeline]\nworkers = 1\n\
         transform_batch_events = {batch}\ntransform_cache_dir = {:?}\n",
        out.display().to_string(),
        cache_dir()
    );
    for md in modules {
        cfg.push_str(&format!(
            "[[transforms]]\nname = {:?}\npath = {:?}\n{}\n[transforms.config]\n",
            md.name,
            module(md.file).display().to_string(),
            md.extra
        ));
        for (k, v) in md.config {
            cfg.push_str(&format!("{k} = {v:?}\n"));
        }
    }
    let cfg_path = tmp.path().join("trailhose.toml");
    std::fs::write(&cfg_path, cfg).unwrap();
    let metrics = tmp.path().join("metrics.prom");
    let r = trailhose(
        &[
            "process",
            tmp.path().join("in").to_str().unwrap(),
            "--config",
            cfg_path.to_str().unwrap(),
            "--metrics-file",
            metrics.to_str().unwrap(),
        ],
        &[],
    );
    let objects = if out.exists() {
        local_objects(&out)
    } else {
        Vec::new()
    };
    let output = split_output(&objects);
    let mut by_id = BTreeMap::new();
    for (_, line) in &output.events {
        let v: Value = serde_json::from_str(line).expect("output lines are JSON");
        let id = v
            .get("eventID")
            .or_else(|| v.get("eventid"))
            .and_then(Value::as_str)
            .expect("eventID")
            .to_owned();
        assert!(by_id.insert(id.clone(), v).is_none(), "{id} written twice");
    }
    Run {
        ok: r.status.success(),
        stderr: String::from_utf8_lossy(&r.stderr).into_owned(),
        events: by_id,
        lines: output.events,
        errors: output.errors,
        metrics: std::fs::read_to_string(&metrics).unwrap_or_default(),
    }
}

fn ids(r: &Run) -> Vec<&str> {
    r.events.keys().map(String::as_str).collect()
}

#[test]
fn priority_rules_marks_foreign_and_iam_calls_from_the_geo_country() {
    let r = run(&events(), &[m("priority", "priority_rules", &[])], 4);
    assert!(r.ok, "{}", r.stderr);
    let e = |id: &str| &r.events[id];
    // Outside the default allowed list (US): HIGH, whatever the service.
    assert_eq!(e("e1")["xpriority"], "HIGH");
    assert_eq!(e("e1")["xcountry_code"], "GB");
    // IAM from the US: HIGH for the service.
    assert_eq!(e("e6")["xpriority"], "HIGH");
    assert_eq!(e("e6")["xcountry_code"], "US");
    // Allowed country, other service: only the country.
    assert!(e("e4").get("xpriority").is_none());
    assert_eq!(e("e4")["xcountry_code"], "US");
    // No country found: untouched, byte for byte apart from nothing.
    assert!(e("e5").get("xpriority").is_none() && e("e5").get("xcountry_code").is_none());
    // The annotation is spliced after geo; the original bytes stay in front.
    let line = &r
        .lines
        .iter()
        .find(|(_, l)| l.contains("\"e1\""))
        .unwrap()
        .1;
    assert!(
        line.ends_with(r#","xpriority":"HIGH","xcountry_code":"GB"}"#),
        "{line}"
    );
    assert_eq!(
        r.metric(&[
            "trailhose_transform_events_total",
            "module=\"priority\"",
            "outcome=\"annotated\""
        ]),
        5.0
    );
    assert_eq!(
        r.metric(&[
            "trailhose_transform_events_total",
            "module=\"priority\"",
            "outcome=\"kept\""
        ]),
        1.0
    );
    // Event time partitions survive the stage.
    assert!(
        r.lines.iter().all(|(k, _)| k.contains("hour=10/")),
        "{:?}",
        r.lines
    );

    // The allowed list is config: with GB allowed, e1 is HIGH only for IAM.
    let r = run(
        &events(),
        &[m(
            "priority",
            "priority_rules",
            &[
                ("allowed_countries", "US,GB"),
                ("high_priority_sources", "sts.amazonaws.com"),
            ],
        )],
        256,
    );
    assert!(r.ok, "{}", r.stderr);
    assert!(r.events["e1"].get("xpriority").is_none());
    assert!(r.events["e6"].get("xpriority").is_none());
    assert_eq!(r.events["e5"]["xpriority"], "HIGH");
}

#[test]
fn drop_noise_drops_read_only_calls_of_listed_services_but_keeps_failed_reads() {
    let r = run(
        &events(),
        &[m(
            "noise",
            "drop_noise",
            &[("services", "ec2.amazonaws.com, s3.amazonaws.com")],
        )],
        2,
    );
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(ids(&r), ["e1", "e3", "e5", "e6"]);
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert_eq!(
        r.metric(&[
            "trailhose_transform_events_total",
            "module=\"noise\"",
            "outcome=\"dropped\""
        ]),
        2.0
    );
    assert_eq!(
        r.metric(&[
            "trailhose_transform_counter_total",
            "module=\"noise\"",
            "name=\"dropped_ec2\""
        ]),
        1.0
    );
    assert_eq!(r.metric(&["trailhose_events_out_total"]), 4.0);
}

#[test]
fn redact_masks_configured_paths_and_leaves_other_events_byte_identical() {
    let plain = run(&events(), &[], 256);
    let r = run(
        &events(),
        &[m(
            "redact",
            "redact",
            &[(
                "paths",
                "requestParameters.password,userIdentity.accessKeyId",
            )],
        )],
        256,
    );
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(
        r.events["e1"]["requestParameters"],
        json!({"userName": "bob", "password": "****"})
    );
    assert!(!r.lines.iter().any(|(_, l)| l.contains("hunter2")));
    for id in ["e2", "e3", "e4", "e5", "e6"] {
        let line = |run: &Run| {
            run.lines
                .iter()
                .find(|(_, l)| l.contains(&format!("\"{id}\"")))
                .unwrap()
                .1
                .clone()
        };
        assert_eq!(line(&r), line(&plain), "{id} must be untouched");
    }
    assert_eq!(
        r.metric(&[
            "trailhose_transform_counter_total",
            "module=\"redact\"",
            "name=\"redacted\""
        ]),
        1.0
    );
}

#[test]
fn lowercase_keys_rewrites_every_key_and_keeps_partitions() {
    let r = run(&events(), &[m("lower", "lowercase_keys", &[])], 3);
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(r.events.len(), 6);
    let e1 = &r.events["e1"];
    assert_eq!(
        e1["useridentity"]["arn"],
        "arn:aws:iam::111122223333:user/alice-e1"
    );
    assert_eq!(e1["geo"]["country_isocode"], "GB");
    assert_eq!(e1["requestparameters"]["password"], "hunter2");
    for (_, line) in &r.lines {
        let v: Value = serde_json::from_str(line).unwrap();
        let upper = v
            .as_object()
            .unwrap()
            .keys()
            .find(|k| k.chars().any(char::is_uppercase));
        assert!(upper.is_none(), "{line}");
    }
    // Routed on the original's eventTime although the output calls it `eventtime`.
    assert!(
        r.lines
            .iter()
            .all(|(k, _)| k.contains("year=2024/month=03/day=18/hour=10/")),
        "{:?}",
        r.lines
    );
    assert_eq!(
        r.metric(&["trailhose_events_fallback_partition_total"]),
        0.0
    );
}

#[test]
fn a_python_module_runs_like_a_rust_one() {
    let r = run(
        &events(),
        &[m(
            "teams",
            "tag_account",
            &[("teams", "111122223333=identity")],
        )],
        256,
    );
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(r.events["e1"]["xteam"], "identity");
    assert_eq!(r.events["e1"]["xactor"], "alice-e1");
    assert!(r.events["e4"].get("xteam").is_none());
    assert_eq!(r.events["e4"]["xactor"], "alice-e4");
    assert_eq!(
        r.metric(&[
            "trailhose_transform_counter_total",
            "module=\"teams\"",
            "name=\"untagged\""
        ]),
        2.0
    );
}

#[test]
fn modules_chain_in_order_each_seeing_the_previous_output() {
    let r = run(
        &events(),
        &[
            m("priority", "priority_rules", &[]),
            m(
                "noise",
                "drop_noise",
                &[("services", "ec2.amazonaws.com,s3.amazonaws.com")],
            ),
            m(
                "redact",
                "redact",
                &[("paths", "requestParameters.password")],
            ),
            m("lower", "lowercase_keys", &[]),
        ],
        4,
    );
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(ids(&r), ["e1", "e3", "e5", "e6"]);
    let e1 = &r.events["e1"];
    assert_eq!(e1["xpriority"], "HIGH");
    assert_eq!(e1["requestparameters"]["password"], "****");
    assert_eq!(e1["geo"]["country_isocode"], "GB");
}

/// Runs the hostile module in `mode` over 6 events in batches of 2 and returns the run.
fn hostile(mode: &str, extra: &str) -> Run {
    let config = [("mode", mode), ("n", "2")];
    let md = Mod {
        name: "hostile",
        file: "hostile",
        config: &config,
        extra,
    };
    run(&events(), &[md], 2)
}

#[test]
fn hostile_modules_are_contained_reported_and_the_worker_goes_on() {
    let cases = [
        (
            "loop",
            "fuel = 50000000\ntimeout_ms = 60000",
            "fuel_exhausted",
        ),
        ("loop", "fuel = 0\ntimeout_ms = 200", "timeout"),
        ("alloc", "max_memory_mb = 32", "memory_limit"),
        ("trap", "", "trap"),
        ("panic", "", "panic"),
        ("wrong_length", "", "malformed_output"),
        ("huge", "max_output_bytes = 100000", "output_too_large"),
        ("bad_json", "", "malformed_output"),
    ];
    for (mode, extra, reason) in cases {
        let r = hostile(mode, extra);
        let what = format!("mode {mode} ({extra}): {}", r.stderr);
        assert!(r.ok, "the run must succeed: {what}");
        assert!(r.events.is_empty(), "{what}");
        // Every event is in the error output, with the module, the reason and the event.
        assert_eq!(r.errors.len(), 6, "{what}: {:?}", r.errors);
        let mut got: Vec<String> = Vec::new();
        for e in &r.errors {
            assert_eq!(e["stage"], "transform", "{what}");
            assert_eq!(e["module"], "hostile", "{what}");
            assert_eq!(e["reason"], reason, "{what}: {e}");
            got.push(e["record"]["eventID"].as_str().unwrap().to_owned());
        }
        got.sort();
        assert_eq!(got, ["e1", "e2", "e3", "e4", "e5", "e6"], "{what}");
        let failures = r.metric(&[
            "trailhose_transform_failures_total",
            "module=\"hostile\"",
            &format!("reason=\"{reason}\""),
        ]);
        // A whole-call failure per batch of 2, each on a fresh instance; bad_json fails per event.
        let want = if mode == "bad_json" { 0.0 } else { 3.0 };
        assert_eq!(failures, want, "{what}");
        assert!(
            r.stderr.contains("hostile"),
            "a warning names the module: {what}"
        );
    }
    let r = hostile("panic", "");
    let detail = r.errors[0]["detail"].as_str().unwrap();
    assert!(
        detail.contains("hostile module panicked on purpose"),
        "{detail}"
    );
}

#[test]
fn a_failed_instance_is_rebuilt_and_later_batches_pass() {
    // Panics once it has seen more than 2 events: batch 1 passes, batch 2 panics, batch 3 runs
    // on a rebuilt instance and passes.
    let r = hostile("panic_after", "");
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(ids(&r), ["e1", "e2", "e5", "e6"]);
    let failed: Vec<&str> = r
        .errors
        .iter()
        .map(|e| e["record"]["eventID"].as_str().unwrap())
        .collect();
    assert_eq!(failed, ["e3", "e4"]);
    assert_eq!(r.errors[0]["reason"], "panic");
}

#[test]
fn a_module_that_refuses_its_config_stops_start_up() {
    // (module file, its config, the message start-up must stop with)
    type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str);
    let cases: [Case<'_>; 3] = [
        ("drop_noise", &[], "services: list the eventSource values"),
        (
            "priority_rules",
            &[("allowed_countries", "usa")],
            "\"usa\" is not an ISO 3166 alpha-2 code",
        ),
        (
            "priority_rules",
            &[("alowed_countries", "US")],
            "unknown config key \"alowed_countries\"",
        ),
    ];
    for (file, config, message) in cases {
        let r = run(&events(), &[m("refusing", file, config)], 256);
        assert!(!r.ok, "{file} {config:?} must stop start-up");
        assert!(r.stderr.contains("transform \"refusing\""), "{}", r.stderr);
        assert!(r.stderr.contains(message), "{}", r.stderr);
        assert!(r.events.is_empty() && r.errors.is_empty());
    }
}

#[test]
fn modules_cannot_reach_files_network_environment_or_clock() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let config = [("mode", "probe"), ("connect", addr.as_str())];
    let r = run(&events()[..1], &[m("probe", "hostile", &config)], 256);
    assert!(r.ok, "{}", r.stderr);
    let probe = &r.events["e1"]["xprobe"];
    for key in ["read", "write", "list", "net"] {
        let v = probe[key].as_str().unwrap();
        assert!(v.starts_with("denied"), "{key}: {v}");
    }
    assert_eq!(probe["env_vars"], 0);
    assert_eq!(probe["clock_secs"], 0);
    assert!(
        listener.accept().is_err(),
        "no connection may reach the host"
    );
    assert!(!Path::new("/tmp/trailhose-probe").exists());
}

#[test]
fn transform_test_prints_each_outcome_with_timing_and_fuel() {
    let tmp = TempDir::new("transform-cli");
    let file = tmp.path().join("events.json");
    std::fs::write(
        &file,
        serde_json::to_vec(&json!({ "Records": events() })).unwrap(),
    )
    .unwrap();
    let r = trailhose(
        &[
            "transform",
            "test",
            "--module",
            module("drop_noise").to_str().unwrap(),
            "--config",
            "services=ec2.amazonaws.com",
            file.to_str().unwrap(),
        ],
        &[],
    );
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert!(r.status.success(), "{stderr}");
    let lines: Vec<Value> = String::from_utf8_lossy(&r.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let outcomes: Vec<&str> = lines
        .iter()
        .map(|l| l["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(
        outcomes,
        ["kept", "dropped", "kept", "kept", "kept", "kept"]
    );
    assert_eq!(lines[0]["events"][0]["eventID"], "e1");
    assert!(
        stderr.contains("6 events in 1 batch(es): 1 dropped, 5 kept"),
        "{stderr}"
    );
    assert!(
        stderr.contains("µs/event") && stderr.contains("fuel "),
        "{stderr}"
    );

    // JSON lines work too, and a refused config is an error.
    let jl = tmp.path().join("events.jsonl");
    let text: String = events().iter().map(|e| format!("{e}\n")).collect();
    std::fs::write(&jl, text).unwrap();
    let r = trailhose(
        &[
            "transform",
            "test",
            "--module",
            module("drop_noise").to_str().unwrap(),
            jl.to_str().unwrap(),
        ],
        &[],
    );
    assert!(!r.status.success());
    assert!(String::from_utf8_lossy(&r.stderr).contains("init refused the config"));
}

#[test]
fn modules_reload_when_their_file_changes_and_a_bad_file_keeps_the_running_version() {
    use trailhose::transform::{Batch, Limits, ModuleSpec, Transforms};
    let tmp = TempDir::new("transform-reload");
    let path = tmp.path().join("live.wasm");
    std::fs::copy(module("identity"), &path).unwrap();
    let spec = ModuleSpec {
        name: "live".into(),
        path: path.clone(),
        config: Vec::new(),
        limits: Limits {
            fuel: 0,
            timeout: std::time::Duration::from_secs(5),
            max_memory_bytes: 64 << 20,
            max_output_bytes: 1 << 20,
        },
    };
    let t = Transforms::open(&[spec], None).unwrap();
    let mut chain = t.chain();
    let event = br#"{"eventID":"r1","eventSource":"iam.amazonaws.com"}"#;
    let pass = |chain: &mut trailhose::transform::Chain| {
        let mut b = Batch::default();
        let head = trailhose::cloudtrail::head_of(event).unwrap();
        b.push(event, &[], &head, None, 0);
        let mut rejects = Vec::new();
        chain.run(&mut b, &mut rejects);
        assert!(rejects.is_empty(), "{rejects:?}");
        b.items()
            .map(|v| String::from_utf8(v.event.to_vec()).unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        pass(&mut chain),
        [String::from_utf8(event.to_vec()).unwrap()]
    );

    // Not a component: the reload fails, the running version stays.
    std::fs::write(&path, b"not wasm").unwrap();
    t.reload(false);
    assert_eq!(
        pass(&mut chain),
        [String::from_utf8(event.to_vec()).unwrap()]
    );

    // A new module: the next batch runs it (the worker's instance is rebuilt between batches).
    std::fs::copy(module("priority_rules"), &path).unwrap();
    t.reload(false);
    assert_eq!(
        pass(&mut chain),
        [r#"{"eventID":"r1","eventSource":"iam.amazonaws.com","xpriority":"HIGH"}"#]
    );
}

/// The service mode reloads a module and the GeoIP database on SIGHUP between files: files
/// before the reload are written with the old ones, files after with the new ones, and every
/// event exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_modules_and_geoip_in_a_running_worker_without_losing_events() {
    use common::{Moto, free_port, http_get};
    let moto = Moto::start();
    let (s3, sqs) = (moto.s3(), moto.sqs());
    s3.create_bucket()
        .bucket("trail")
        .send()
        .await
        .expect("bucket");
    let queue = sqs
        .create_queue()
        .queue_name("reload")
        .send()
        .await
        .expect("queue")
        .queue_url
        .expect("queue url");
    let tmp = TempDir::new("transform-sighup");
    let live = tmp.path().join("live.wasm");
    std::fs::copy(module("identity"), &live).unwrap();
    // The fixture database does not know 52.94.0.1; the demo database (swapped in later) does.
    let city = tmp.path().join("city.mmdb");
    common::mmdb::write_city_db(&city);
    let out = tmp.path().join("out");
    let port = free_port();
    let ep = &moto.endpoint;
    let config = tmp.path().join("run.toml");
    std::fs::write(
        &config,
        format!(
            "[output]\nurl = {:?}\n[geoip]\ncity_db = {:?}\nreload_secs = 0\n\
             [batch]\nmax_age_secs = 1\n[pipeline]\ntransform_reload_secs = 0\n\
             transform_cache_dir = {:?}\n[source.sqs]\nqueue_url = {queue:?}\nendpoint_url = {ep:?}\n\
             wait_time_secs = 1\n[[source.buckets]]\nname = \"trail\"\nendpoint_url = {ep:?}\n\
             force_path_style = true\n[server]\nlisten = \"127.0.0.1:{port}\"\n\
             [[transforms]]\nname = \"live\"\npath = {:?}\n",
            out.display().to_string(),
            city.display().to_string(),
            cache_dir(),
            live.display().to_string()
        ),
    )
    .unwrap();
    let send_file = |name: &'static str| {
        let (s3, sqs, queue) = (s3.clone(), sqs.clone(), queue.clone());
        async move {
            let evs: Vec<Value> = (1..=3)
                .map(|i| {
                    json!({"eventTime": "2024-03-18T10:00:00Z", "eventSource": "iam.amazonaws.com",
                           "eventID": format!("{name}{i}"), "recipientAccountId": "111122223333",
                           "sourceIPAddress": "52.94.0.1"})
                })
                .collect();
            let key =
                format!("AWSLogs/111122223333/CloudTrail/eu-west-1/2024/03/18/{name}.json.gz");
            let body = fixtures::gzip(&serde_json::to_vec(&json!({ "Records": evs })).unwrap());
            s3.put_object()
                .bucket("trail")
                .key(&key)
                .body(body.into())
                .send()
                .await
                .expect("put");
            let msg = json!({"s3Bucket": "trail", "s3ObjectKey": [key]}).to_string();
            sqs.send_message()
                .queue_url(&queue)
                .message_body(msg)
                .send()
                .await
                .expect("send");
        }
    };
    let written = |n: usize| {
        let out = out.clone();
        async move {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            loop {
                let events = if out.exists() {
                    split_output(&local_objects(&out)).events
                } else {
                    Vec::new()
                };
                if events.len() >= n || std::time::Instant::now() > deadline {
                    return events;
                }
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
        }
    };
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_trailhose"));
    cmd.args(["run", "--config"])
        .arg(&config)
        .env("TRAILHOSE_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    for (k, v) in moto.env() {
        cmd.env(k, v);
    }
    let mut worker = cmd.spawn().expect("start trailhose run");
    let pid = worker.id().to_string();

    send_file("a").await;
    assert_eq!(
        written(3).await.len(),
        3,
        "file a written by the first module"
    );

    std::fs::copy(module("priority_rules"), &live).unwrap();
    common::mmdb::write_demo_city_db(&city);
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status();
    assert!(hup.unwrap().success());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let m = http_get(port, "/metrics")
            .map(|(_, m)| m)
            .unwrap_or_default();
        if m.contains("trailhose_transform_reloads_total{module=\"live\",result=\"ok\"} 1")
            && m.contains("trailhose_geo_reloads_total{result=\"ok\"} 1")
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no reload after SIGHUP:\n{m}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }

    send_file("b").await;
    let events = written(6).await;
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status();
    let _ = worker.wait();
    let mut by_id: BTreeMap<String, Value> = BTreeMap::new();
    for (_, line) in &events {
        let v: Value = serde_json::from_str(line).unwrap();
        let id = v["eventID"].as_str().unwrap().to_owned();
        assert!(by_id.insert(id, v).is_none(), "written once: {line}");
    }
    assert_eq!(by_id.len(), 6, "{events:?}");
    for (id, v) in &by_id {
        let after = id.starts_with('b');
        // Before: identity module, fixture database. After: priority-rules (IAM is HIGH), demo
        // database (which covers 52.0.0.0/8).
        assert_eq!(v.get("xpriority").is_some(), after, "{id}: {v}");
        assert_eq!(v.get("geo").is_some(), after, "{id}: {v}");
    }
}
