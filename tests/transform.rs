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
    if let Some(stem) = name.strip_suffix(".wat") {
        // Hand-written components (transforms/hostile/wat/), assembled here.
        let src = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("transforms/hostile/wat")
            .join(name);
        let wasm = wat::parse_file(&src).unwrap_or_else(|e| panic!("{}: {e}", src.display()));
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("wat");
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join(format!("{stem}.{}.wasm", std::process::id()));
        std::fs::write(&out, wasm).unwrap();
        return out;
    }
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
    /// Every output object's bytes, raw and decompressed.
    out_text: String,
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

/// Every byte under `dir`, each file's lossily decoded (gunzipped where it is gzip), joined.
fn all_text(dir: &Path) -> String {
    let mut text = String::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let p = entry.unwrap().path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            let raw = std::fs::read(&p).unwrap();
            let mut plain = Vec::new();
            let mut gz = flate2::read::MultiGzDecoder::new(&raw[..]);
            if std::io::Read::read_to_end(&mut gz, &mut plain).is_err() {
                plain = raw.clone();
            }
            text.push_str(&String::from_utf8_lossy(&raw));
            text.push_str(&String::from_utf8_lossy(&plain));
        }
    }
    text
}

/// Runs `trailhose process` over `events` with `modules`, `batch` events per call.
fn run(events: &[Value], modules: &[Mod<'_>], batch: usize) -> Run {
    let doc = serde_json::to_vec(&json!({ "Records": events })).unwrap();
    run_with(&doc, modules, batch, &Opts::default())
}

/// More of the config for `run_with`.
#[derive(Default)]
struct Opts {
    /// Lines of `[pipeline]`.
    pipeline: String,
    /// Sections after the modules.
    tail: String,
    /// `pipeline.transform_cache_dir`, when not the shared test cache.
    cache: Option<String>,
}

/// `run` over the delivery file `doc`.
fn run_with(doc: &[u8], modules: &[Mod<'_>], batch: usize, opts: &Opts) -> Run {
    let tmp = TempDir::new("transform");
    let input = tmp
        .path()
        .join("in/AWSLogs/111122223333/CloudTrail/eu-west-1/2024/03/18");
    std::fs::create_dir_all(&input).unwrap();
    std::fs::write(
        input.join("111122223333_CloudTrail_eu-west-1_20240318T1020Z_t.json.gz"),
        fixtures::gzip(doc),
    )
    .unwrap();
    let out = tmp.path().join("out");
    let (city, _) = fixture_dbs(tmp.path());
    let mut cfg = format!(
        "[output]\nurl = {:?}\n[geoip]\ncity_db = {city:?}\n[pipeline]\nworkers = 1\n\
         transform_batch_events = {batch}\ntransform_cache_dir = {:?}\n{}\n",
        out.display().to_string(),
        opts.cache.clone().unwrap_or_else(cache_dir),
        opts.pipeline
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
    cfg.push_str(&opts.tail);
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
        out_text: if out.exists() {
            all_text(&out)
        } else {
            String::new()
        },
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
    // The result is stopped while it is copied out of the module, at max_output_bytes.
    let r = hostile("huge", "max_output_bytes = 100000");
    let detail = r.errors[0]["detail"].as_str().unwrap();
    assert!(
        detail.contains("more than max_output_bytes = 100000")
            && detail.contains("the copy out of the module stopped there"),
        "{detail}"
    );
}

#[test]
fn a_huge_random_request_cannot_make_the_host_allocate_past_the_memory_limit() {
    // 48 MiB asked of wasi:random by a module allowed 2 MiB: the host must refuse before it
    // builds the bytes, not build them and fail only when copying them in.
    let len = (48u64 << 20).to_string();
    let md = Mod {
        name: "greedy",
        file: "hostile",
        config: &[("mode", "random_huge"), ("len", &len)],
        extra: "max_memory_mb = 2",
    };
    let r = run(&events()[..2], &[md], 256);
    assert!(r.ok, "{}", r.stderr);
    assert!(r.events.is_empty(), "{:?}", r.events);
    assert_eq!(r.errors.len(), 2, "{:?}", r.errors);
    for e in &r.errors {
        assert_eq!(e["reason"], "trap", "{e}");
        let detail = e["detail"].as_str().unwrap();
        assert!(detail.contains("exceeds limit 2097152"), "{detail}");
    }
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
    let r = run(
        &events()[..1],
        &[m("probe", "hostile", &[("mode", "probe")])],
        256,
    );
    assert!(r.ok, "{}", r.stderr);
    let probe = &r.events["e1"]["xprobe"];
    for key in ["read", "write", "list"] {
        let v = probe[key].as_str().unwrap();
        assert!(v.starts_with("denied"), "{key}: {v}");
    }
    assert_eq!(probe["env_vars"], 0);
    // Both clocks read zero: the wall clock is 1970-01-01, and no time passes.
    assert_eq!(probe["clock_secs"], 0);
    assert_eq!(probe["monotonic_nanos"], 0);
    assert!(!Path::new("/tmp/trailhose-probe").exists());

    // Sockets are not linked at all: the first socket call traps the batch.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let config = [("mode", "connect"), ("connect", addr.as_str())];
    let r = run(&events()[..2], &[m("net", "hostile", &config)], 256);
    assert!(r.ok, "{}", r.stderr);
    assert!(r.events.is_empty());
    assert_eq!(r.errors.len(), 2, "{:?}", r.errors);
    for e in &r.errors {
        assert_eq!(e["reason"], "trap", "{e}");
        let detail = e["detail"].as_str().unwrap();
        assert!(detail.contains("wasi:sockets"), "{detail}");
    }
    assert!(
        listener.accept().is_err(),
        "no connection may reach the host"
    );
}

#[test]
fn sleeping_traps_at_once_instead_of_blocking_the_worker() {
    // The time limit only interrupts wasm code, not a host call: a timer would block the worker
    // for the hour, so timers are not linked and the call traps.
    let r = hostile("sleep", "timeout_ms = 600000");
    assert!(r.ok, "{}", r.stderr);
    assert!(r.events.is_empty());
    assert_eq!(r.errors.len(), 6);
    for e in &r.errors {
        assert_eq!(e["reason"], "trap", "{e}");
        let detail = e["detail"].as_str().unwrap();
        assert!(
            detail.contains("timers are not available to transforms"),
            "{detail}"
        );
    }
}

#[test]
fn wasi_random_is_a_fixed_sequence_the_same_in_every_run() {
    let values = || {
        let r = run(
            &events(),
            &[m("random", "hostile", &[("mode", "random")])],
            2,
        );
        assert!(r.ok, "{}", r.stderr);
        assert_eq!(r.events.len(), 6, "{:?}", r.errors);
        r.events
            .iter()
            .map(|(id, v)| (id.clone(), v["xrandom"].clone()))
            .collect::<BTreeMap<_, _>>()
    };
    let first = values();
    assert_eq!(
        first,
        values(),
        "another run, other instances: the same bytes"
    );
    // Not zeros, and one call's bytes are the same for each event it annotated.
    assert_ne!(first["e1"]["bytes"], "00000000000000000000000000000000");
    assert_eq!(first["e1"], first["e2"]);
}

#[test]
fn two_memories_are_limited_together() {
    // Each of the module's two memories grows by 48 MiB: allowed one by one under 64 MiB, but
    // not together.
    let two = |mb: u32| {
        let extra = format!("max_memory_mb = {mb}");
        let md = Mod {
            name: "twomem",
            file: "two-memories.wat",
            config: &[],
            extra: &extra,
        };
        // One call per instance: the memories grow on every call.
        run(&events(), &[md], 256)
    };
    let r = two(64);
    assert!(r.ok, "{}", r.stderr);
    assert!(r.events.is_empty(), "{:?}", r.events);
    assert_eq!(r.errors.len(), 6);
    for e in &r.errors {
        assert_eq!(e["reason"], "memory_limit", "{e}");
        let detail = e["detail"].as_str().unwrap();
        assert!(detail.contains("all linear memories together"), "{detail}");
    }
    let r = two(128);
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(
        ids(&r),
        ["e1", "e2", "e3", "e4", "e5", "e6"],
        "{:?}",
        r.errors
    );
}

#[test]
fn drop_body_keeps_the_event_and_the_module_words_out_of_the_error_output() {
    // The module panics with the event (a password in it) in its message and on stderr.
    let careless = |extra: &'static str| {
        let md = Mod {
            name: "redact",
            file: "hostile",
            config: &[("mode", "panic_echo")],
            extra,
        };
        run(&events(), &[md], 2)
    };
    // Today's default writes the event, secret and all, and the message quoting it.
    let r = careless("");
    assert!(r.ok, "{}", r.stderr);
    assert!(r.out_text.contains("hunter2"), "the check below can fail");

    let r = careless("on_failure = \"drop_body\"");
    assert!(r.ok, "{}", r.stderr);
    assert!(r.events.is_empty());
    assert_eq!(r.errors.len(), 6, "{:?}", r.errors);
    let mut ids: Vec<&str> = Vec::new();
    for e in &r.errors {
        assert_eq!(e["stage"], "transform", "{e}");
        assert_eq!(e["module"], "redact", "{e}");
        assert_eq!(e["reason"], "panic", "{e}");
        assert!(e.get("record").is_none(), "no event body: {e}");
        assert!(e["source"].as_str().unwrap().ends_with(".json.gz"), "{e}");
        ids.push(e["eventID"].as_str().unwrap());
    }
    ids.sort();
    assert_eq!(ids, ["e1", "e2", "e3", "e4", "e5", "e6"]);
    assert!(
        !r.out_text.contains("hunter2"),
        "the secret is nowhere in the output tree"
    );
    assert!(
        !r.stderr.contains("hunter2"),
        "nor in the logs: {}",
        r.stderr
    );
    assert!(
        r.stderr
            .contains("its batch went to the error output without the events"),
        "the warning says where the batch went: {}",
        r.stderr
    );
}

#[test]
fn drop_body_also_mutes_what_the_failing_module_logged_and_counted() {
    // The module logs each event (a password in one) and counts it, then fails it.
    let echo = |extra: &'static str| {
        let md = Mod {
            name: "redact",
            file: "hostile",
            config: &[("mode", "log_echo")],
            extra,
        };
        run(&events(), &[md], 2)
    };
    let counted = |r: &Run| r.metric(&["trailhose_transform_counter_total", "echoed"]);
    let r = echo("");
    assert!(r.ok, "{}", r.stderr);
    assert!(r.stderr.contains("hunter2"), "the checks below can fail");
    assert_eq!(counted(&r), 6.0);

    let r = echo("on_failure = \"drop_body\"");
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(r.errors.len(), 6, "{:?}", r.errors);
    assert!(!r.stderr.contains("hunter2"), "{}", r.stderr);
    assert!(
        !r.stderr.contains("failing {"),
        "no line of the module: {}",
        r.stderr
    );
    assert!(!r.out_text.contains("hunter2"));
    assert_eq!(counted(&r), 0.0, "{}", r.metrics);
}

/// `retry` with the default `drop_body` fallback: the deliveries before the fallback must not
/// log the event either (a panic message or the module's own lines quoting it), while the
/// failure itself is still logged and counted.
#[test]
fn retry_before_a_drop_body_fallback_mutes_the_module_too() {
    let retried = |mode: &'static str| {
        let md = Mod {
            name: "redact",
            file: "hostile",
            config: &[("mode", mode)],
            extra: "on_failure = \"retry\"\nmax_attempts = 3",
        };
        run(&events(), &[md], 2)
    };
    for mode in ["log_echo", "panic_echo"] {
        let r = retried(mode);
        assert!(
            r.events.is_empty(),
            "{mode}: not written, the file comes again"
        );
        assert!(!r.stderr.contains("hunter2"), "{mode}: {}", r.stderr);
        assert!(!r.out_text.contains("hunter2"), "{mode}");
        assert!(
            r.stderr.contains("redact"),
            "{mode}: the failure is still logged: {}",
            r.stderr
        );
    }
    let r = retried("log_echo");
    assert_eq!(
        r.metric(&["trailhose_transform_counter_total", "echoed"]),
        0.0,
        "{}",
        r.metrics
    );
    // The warning says what became of them: not the error output, they come again.
    let warning = r
        .stderr
        .lines()
        .find(|l| l.contains("transform module failed events"))
        .unwrap_or_else(|| panic!("{}", r.stderr));
    assert!(
        warning.contains("on_failure=\"retry\"") && !warning.contains("error output"),
        "{warning}"
    );
}

/// Error records of the split stage hold bytes no module saw: with a `drop_body` module they
/// carry none unless `errors.keep_raw`; either way sensitive values are masked.
#[test]
fn split_error_records_carry_no_raw_bytes_when_a_module_drops_bodies() {
    let big = format!(
        r#"{{"eventVersion":"1.09","requestParameters":{{"password":"SECRET-1"}},"pad":"{}","eventID":"big-1"}}"#,
        "p".repeat(8000)
    );
    let broken =
        r#"{"eventVersion":"1.09","sessionToken":"SECRET-2","readOnly":tru,"eventID":"bad-1"}"#;
    let (a, b) = (
        serde_json::to_string(&events()[1]).unwrap(),
        serde_json::to_string(&events()[3]).unwrap(),
    );
    let doc = format!(r#"{{"Records":[{a},{big},{broken},["SECRET-3"],{b}]}}"#);
    let md = |on_failure| Mod {
        name: "redact",
        file: "identity",
        config: &[],
        extra: on_failure,
    };
    let opts = |tail: &str| Opts {
        pipeline: "max_event_bytes = 4096".into(),
        tail: tail.into(),
        cache: None,
    };
    let split = |r: &Run| -> Vec<Value> {
        r.errors
            .iter()
            .filter(|e| e["stage"] == "split")
            .cloned()
            .collect()
    };
    let r = run_with(
        doc.as_bytes(),
        &[md("on_failure = \"drop_body\"")],
        256,
        &opts(""),
    );
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(r.lines.len(), 2);
    let errs = split(&r);
    assert_eq!(errs.len(), 3, "{errs:?}");
    for e in &errs {
        for key in ["raw", "raw_base64", "record"] {
            assert!(e.get(key).is_none(), "no {key}: {e}");
        }
        assert!(e.get("index").is_some(), "{e}");
    }
    let too_large = errs
        .iter()
        .find(|e| e["reason"] == "event_too_large")
        .unwrap();
    assert_eq!(too_large["eventID"], "big-1");
    assert_eq!(too_large["size"], big.len() as u64);
    assert!(too_large.get("offset").is_some());
    assert!(!r.out_text.contains("SECRET"));

    // keep_raw: the bytes are back, masked; the string inside an array is not a key's value.
    let r = run_with(
        doc.as_bytes(),
        &[md("on_failure = \"drop_body\"")],
        256,
        &opts("[errors]\nkeep_raw = true\n"),
    );
    assert!(r.ok, "{}", r.stderr);
    let errs = split(&r);
    let malformed = errs
        .iter()
        .find(|e| e["reason"] == "malformed_json")
        .unwrap();
    assert_eq!(
        malformed["raw"],
        broken.replace("\"SECRET-2\"", "\"[redacted]\"")
    );
    let too_large = errs
        .iter()
        .find(|e| e["reason"] == "event_too_large")
        .unwrap();
    assert!(
        too_large["raw"]
            .as_str()
            .unwrap()
            .contains(r#""password":"[redacted]""#)
    );
    assert!(!r.out_text.contains("SECRET-1") && !r.out_text.contains("SECRET-2"));
    let not_obj = errs
        .iter()
        .find(|e| e["reason"] == "not_an_object")
        .unwrap();
    assert_eq!(not_obj["record"], json!(["SECRET-3"]));
}

/// The module cache is refused through a symlinked directory and for an artifact that group
/// or others may write: the module is compiled instead, with a warning, and the run is right.
#[test]
fn the_binary_refuses_a_symlinked_cache_and_a_group_writable_artifact() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = TempDir::new("transform-cache-refusal");
    let real = tmp.path().join("real");
    let link = tmp.path().join("link");
    std::fs::create_dir(&real).unwrap();
    std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let with_cache = |dir: &Path| {
        let opts = Opts {
            cache: Some(dir.display().to_string()),
            ..Opts::default()
        };
        let doc = serde_json::to_vec(&json!({ "Records": events() })).unwrap();
        let r = run_with(&doc, &[m("id", "identity", &[])], 256, &opts);
        assert!(r.ok, "{}", r.stderr);
        assert_eq!(r.events.len(), 6);
        r
    };
    let r = with_cache(&link);
    assert!(
        r.stderr.contains("transform cache not used") && r.stderr.contains("is a symlink"),
        "{}",
        r.stderr
    );
    assert_eq!(
        std::fs::read_dir(&real).unwrap().count(),
        0,
        "nothing written through it"
    );

    let r = with_cache(&real);
    assert!(
        !r.stderr.contains("transform cache not used"),
        "{}",
        r.stderr
    );
    let artifact = std::fs::read_dir(&real)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "cwasm"))
        .expect("the compiled module is cached");
    let r = with_cache(&real);
    assert!(
        !r.stderr.contains("transform cache not used"),
        "{}",
        r.stderr
    );

    std::fs::set_permissions(&artifact, std::fs::Permissions::from_mode(0o660)).unwrap();
    let r = with_cache(&real);
    assert!(
        r.stderr.contains("transform cache not used")
            && r.stderr.contains("writable by group or others"),
        "{}",
        r.stderr
    );
    // The refused artifact was replaced by a fresh one only this user can write.
    let mode = std::fs::metadata(&artifact).unwrap().permissions().mode();
    assert_eq!(mode & 0o077, 0, "{mode:o}");

    // An artifact owned by another user (only root may hand a file to one).
    if std::os::unix::fs::chown(&artifact, Some(65534), None).is_ok() {
        let r = with_cache(&real);
        assert!(
            r.stderr.contains("transform cache not used")
                && r.stderr.contains("is owned by uid 65534"),
            "{}",
            r.stderr
        );
    }
}

#[test]
fn guest_log_lines_are_cut_before_they_are_logged() {
    let r = run(
        &events()[..1],
        &[m("chatty", "hostile", &[("mode", "log_long")])],
        256,
    );
    assert!(r.ok, "{}", r.stderr);
    let line = r
        .stderr
        .lines()
        .find(|l| l.contains("chatty") && l.contains("yyyy"))
        .unwrap_or_else(|| panic!("the guest's line is logged: {}", r.stderr));
    assert!(line.contains("(100000 bytes, cut at 2048)"), "{line}");
    assert!(line.len() < 4096, "{} bytes", line.len());
}

/// The copy budget bounds each import call too: a 100 000-byte log line is more than
/// `max_output_bytes = 50000` may carry, so the batch fails before the host copies it.
#[test]
fn a_log_line_longer_than_max_output_bytes_fails_the_batch() {
    let md = Mod {
        name: "chatty",
        file: "hostile",
        config: &[("mode", "log_long")],
        extra: "max_output_bytes = 50000",
    };
    let r = run(&events()[..1], &[md], 256);
    assert!(r.ok, "{}", r.stderr);
    assert!(r.events.is_empty(), "{:?}", r.events);
    assert_eq!(r.errors.len(), 1, "{:?}", r.errors);
    assert_eq!(r.errors[0]["reason"], "output_too_large", "{}", r.errors[0]);
    let detail = r.errors[0]["detail"].as_str().unwrap();
    assert!(detail.contains("passed a host call more than"), "{detail}");
}

/// A module's output that holds `detections` (in any case) loses it when rules annotate:
/// trailhose's annotation is the only one, and an event no rule matched carries none.
#[test]
fn a_module_writing_detections_does_not_leave_it_beside_trailhoses() {
    let tmp = TempDir::new("transform-detections");
    let rules = tmp.path().join("rules");
    std::fs::create_dir_all(&rules).unwrap();
    std::fs::write(
        rules.join("e1.yml"),
        "title: The first event\nid: 0b5e7c1a-2f5d-4c8e-9f00-00000000e001\nstatus: test\n\
         logsource:\n    product: aws\n    service: cloudtrail\n\
         detection:\n    selection:\n        eventID: e1\n    condition: selection\n\
         level: low\n",
    )
    .unwrap();
    let opts = Opts {
        tail: format!(
            "[detect]\nrules = [{:?}]\nannotate = true\n",
            rules.display().to_string()
        ),
        ..Opts::default()
    };
    let doc = serde_json::to_vec(&json!({ "Records": events() })).unwrap();
    let config = [
        ("mode", "annotate"),
        ("key", "Detections"),
        ("value", r#"[{"id":"forged"}]"#),
    ];
    let md = Mod {
        name: "forger",
        file: "hostile",
        config: &config,
        extra: "",
    };
    let r = run_with(&doc, &[md], 256, &opts);
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(r.events.len(), 6, "{:?} {}", r.errors, r.stderr);
    for (_, line) in &r.lines {
        let v: Value = serde_json::from_str(line).unwrap();
        let id = v["eventID"].as_str().unwrap();
        let named = line.to_ascii_lowercase().matches("\"detections\":").count();
        if id == "e1" {
            assert_eq!(named, 1, "{line}");
            assert_eq!(
                v["detections"],
                json!([{"id": "0b5e7c1a-2f5d-4c8e-9f00-00000000e001", "title": "The first event", "level": "low"}]),
                "{line}"
            );
        } else {
            assert_eq!(named, 0, "{line}");
        }
    }
    let removed = r.metric(&[
        "trailhose_enrich_replaced_members_total",
        "field=\"detections\"",
    ]);
    assert_eq!(removed, 6.0, "{}", r.metrics);
}

/// `lookup` is charged to the module's fuel (1 000 per call and 4 per byte of key and result,
/// as the README says), so a module cannot make the host work past its budget by looping over
/// lookups; a key over 4 KiB and an unbounded table name are refused with a bounded message.
#[test]
fn lookups_are_charged_to_fuel_and_a_key_over_4_kib_or_a_huge_table_name_traps() {
    let tmp = TempDir::new("transform-lookup-fuel");
    let table = tmp.path().join("t.csv");
    std::fs::write(&table, "key,label\nk,v\n").unwrap();
    let opts = Opts {
        tail: format!(
            "[[enrich.tables]]\nname = \"t\"\npath = {:?}\nkey = \"key\"\nmatch = \"case_insensitive\"\n",
            table.display().to_string()
        ),
        ..Opts::default()
    };
    let doc = serde_json::to_vec(&json!({ "Records": events() })).unwrap();
    let looping_with = |key_len: &str, lookups: &str, table: &str, extra: &str| {
        let config = [
            ("mode", "lookup_loop"),
            ("key_len", key_len),
            ("lookups", lookups),
            ("table", table),
        ];
        let md = Mod {
            name: "looker",
            file: "hostile",
            config: &config,
            extra,
        };
        run_with(&doc, &[md], 256, &opts)
    };
    let looping = |key_len: &str, lookups: &str, table: &str| {
        // A generous time limit: only fuel may stop these, however slow the machine.
        let extra = "tables = [\"t\"]\nfuel = 5000000\ntimeout_ms = 60000";
        looping_with(key_len, lookups, table, extra)
    };
    let per_lookup = 1_000.0 + 4.0 * 4096.0;
    // 100 lookups of a 4 KiB key: within the fuel, and every one of them charged.
    let r = looping("4096", "100", "t");
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(r.events.len(), 6, "{:?} {}", r.errors, r.stderr);
    let used = r.metric(&[
        "trailhose_transform_fuel_consumed_total",
        "module=\"looker\"",
    ]);
    assert!(used >= 100.0 * per_lookup, "fuel used: {used}");
    // Ten times as many: over the 5 000 000 fuel, though the module's own instructions are not
    // (about 75 per lookup).
    let r = looping("4096", "1000", "t");
    assert!(r.ok, "{}", r.stderr);
    assert!(r.events.is_empty(), "{:?}", r.events);
    assert_eq!(r.errors.len(), 6, "{:?}", r.errors);
    for e in &r.errors {
        assert_eq!(e["reason"], "fuel_exhausted", "{e}");
        let detail = e["detail"].as_str().unwrap();
        assert!(
            detail.contains("ran out of fuel (fuel = 5000000 per batch)"),
            "{detail}"
        );
    }
    // A key of 4 KiB + 1 byte traps, naming the limit.
    let r = looping("4097", "1", "t");
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(r.errors.len(), 6, "{:?}", r.errors);
    let detail = r.errors[0]["detail"].as_str().unwrap();
    assert_eq!(r.errors[0]["reason"], "trap", "{}", r.errors[0]);
    assert!(
        detail.contains("lookup: a key of 4097 bytes is over the limit of 4096 bytes"),
        "{detail}"
    );
    // A key past max_output_bytes is stopped as it is copied in, and said to be an argument.
    let r = looping_with(
        "200000",
        "1",
        "t",
        "tables = [\"t\"]\nmax_output_bytes = 100000",
    );
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(r.errors.len(), 6, "{:?}", r.errors);
    assert_eq!(r.errors[0]["reason"], "output_too_large", "{}", r.errors[0]);
    let detail = r.errors[0]["detail"].as_str().unwrap();
    assert!(
        detail.contains("passed a host call more than max_output_bytes = 100000"),
        "{detail}"
    );
    // A table name of 100 000 bytes is quoted cut, not whole.
    let long = "n".repeat(100_000);
    let r = looping("1", "1", &long);
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(r.errors.len(), 6, "{:?}", r.errors);
    let detail = r.errors[0]["detail"].as_str().unwrap();
    assert!(
        detail.contains("is not granted to this module") && detail.contains("(100000 bytes)"),
        "{detail}"
    );
    assert!(detail.len() < 1000, "{} bytes", detail.len());
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
        region: None,
        endpoint_url: None,
        force_path_style: false,
        config: Vec::new(),
        tables: Vec::new(),
        limits: Limits {
            fuel: 0,
            timeout: std::time::Duration::from_secs(5),
            max_memory_bytes: 64 << 20,
            max_output_bytes: 1 << 20,
        },
        on_failure: Default::default(),
        max_attempts: 1,
        retry_fallback: Default::default(),
    };
    let t = Transforms::open(&[spec], None).unwrap();
    let mut chain = t.chain();
    let event = br#"{"eventID":"r1","eventSource":"iam.amazonaws.com"}"#;
    let pass = |chain: &mut trailhose::transform::Chain| {
        let mut b = Batch::default();
        let head = trailhose::cloudtrail::head_of(event).unwrap();
        b.push(event, &[], &head, None, 0);
        let mut rejects = Vec::new();
        chain.run("test", &mut b, &mut rejects);
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
    let send_file = |name: &'static str| send_file(&s3, &sqs, &queue, name);
    let written = |n: usize| written(&out, n);
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

/// A module at an `s3://` path: fetched at start-up, followed by its ETag at the shipped reload
/// interval (2 s) and the shipped batch age (the output is written at SIGTERM), a corrupt
/// version keeps the running one and is reported once, and a missing object stops start-up
/// naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_module_on_s3_is_fetched_followed_by_its_etag_and_a_bad_version_keeps_the_running_one() {
    use common::sqs::{metric, signal, wait_exit};
    use common::{Moto, eventually, free_port, http_get};
    let moto = Moto::start();
    let (s3, sqs) = (moto.s3(), moto.sqs());
    for b in ["trail", "modules"] {
        s3.create_bucket().bucket(b).send().await.expect("bucket");
    }
    let put_module = |bytes: Vec<u8>| {
        let s3 = s3.clone();
        async move {
            s3.put_object()
                .bucket("modules")
                .key("team/live.wasm")
                .body(bytes.into())
                .send()
                .await
                .expect("put module");
        }
    };
    put_module(std::fs::read(module("identity")).unwrap()).await;
    let queue = sqs
        .create_queue()
        .queue_name("s3-module")
        .send()
        .await
        .expect("queue")
        .queue_url
        .expect("queue url");
    let tmp = TempDir::new("transform-s3-module");
    let out = tmp.path().join("out");
    let port = free_port();
    let ep = &moto.endpoint;
    let config = |path: &str| {
        let file = tmp.path().join("run.toml");
        std::fs::write(
            &file,
            format!(
                "[output]\nurl = {:?}\n[pipeline]\ntransform_cache_dir = {:?}\n[source.sqs]\n\
                 queue_url = {queue:?}\nendpoint_url = {ep:?}\nwait_time_secs = 1\n\
                 [[source.buckets]]\nname = \"trail\"\nendpoint_url = {ep:?}\n\
                 force_path_style = true\n[server]\nlisten = \"127.0.0.1:{port}\"\n\
                 [[transforms]]\nname = \"live\"\npath = {path:?}\nendpoint_url = {ep:?}\n\
                 force_path_style = true\n",
                out.display().to_string(),
                cache_dir(),
            ),
        )
        .unwrap();
        file
    };
    // stderr is read only from a worker that stops at start-up: a running one's could fill
    // the pipe and block it.
    let spawn = |config: &Path, stderr: std::process::Stdio| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_trailhose"));
        cmd.args(["run", "--config"])
            .arg(config)
            .env("TRAILHOSE_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(stderr);
        for (k, v) in moto.env() {
            cmd.env(k, v);
        }
        cmd.spawn().expect("start trailhose run")
    };
    // The sum of the series of `prefix` (every label set that starts with it).
    let sum = |prefix: &str| -> f64 {
        http_get(port, "/metrics")
            .map(|(_, m)| m)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let reloads = |result: &str| {
        metric(
            port,
            &format!("trailhose_transform_reloads_total{{module=\"live\",result=\"{result}\"}}"),
        )
    };
    let transformed = |n: f64| {
        eventually(60, "events through the module", move || async move {
            sum("trailhose_transform_events_total{module=\"live\"") >= n
        })
    };

    // A missing object stops start-up, naming it.
    let mut missing = spawn(
        &config("s3://modules/team/missing.wasm"),
        std::process::Stdio::piped(),
    );
    assert!(!wait_exit(&mut missing, 60), "start-up must fail");
    let mut stderr = String::new();
    std::io::Read::read_to_string(missing.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert!(
        stderr.contains("cannot read s3://modules/team/missing.wasm"),
        "{stderr}"
    );

    let mut worker = spawn(
        &config("s3://modules/team/live.wasm"),
        std::process::Stdio::null(),
    );
    send_file(&s3, &sqs, &queue, "a").await;
    transformed(3.0).await;

    put_module(std::fs::read(module("priority_rules")).unwrap()).await;
    eventually(60, "a reload", || async { reloads("ok") >= 1.0 }).await;
    send_file(&s3, &sqs, &queue, "b").await;
    transformed(6.0).await;

    put_module(b"not a component".to_vec()).await;
    eventually(60, "a failed reload", || async { reloads("error") >= 1.0 }).await;
    send_file(&s3, &sqs, &queue, "c").await;
    transformed(9.0).await;
    // Several checks later the corrupt version is still reported once, and nothing reloaded.
    tokio::time::sleep(std::time::Duration::from_secs(7)).await;
    assert_eq!((reloads("ok"), reloads("error")), (1.0, 1.0));

    signal(&worker, "-TERM");
    assert!(wait_exit(&mut worker, 60), "the worker did not drain");
    let events = split_output(&local_objects(&out)).events;
    let mut by_id: BTreeMap<String, Value> = BTreeMap::new();
    for (_, line) in &events {
        let v: Value = serde_json::from_str(line).unwrap();
        let id = v["eventID"].as_str().unwrap().to_owned();
        assert!(by_id.insert(id, v).is_none(), "written once: {line}");
    }
    assert_eq!(by_id.len(), 9, "{events:?}");
    for (id, v) in &by_id {
        // Before the new version: identity. After it, and after the corrupt one: priority-rules
        // (IAM is HIGH).
        assert_eq!(
            v.get("xpriority").is_some(),
            !id.starts_with('a'),
            "{id}: {v}"
        );
    }
}

/// Puts a delivery file of three IAM events (`{name}1`..`{name}3`) in bucket `trail` and
/// announces it on `queue`.
async fn send_file(s3: &aws_sdk_s3::Client, sqs: &aws_sdk_sqs::Client, queue: &str, name: &str) {
    let evs: Vec<Value> = (1..=3)
        .map(|i| {
            json!({"eventTime": "2024-03-18T10:00:00Z", "eventSource": "iam.amazonaws.com",
                   "eventID": format!("{name}{i}"), "recipientAccountId": "111122223333",
                   "sourceIPAddress": "52.94.0.1"})
        })
        .collect();
    let key = format!("AWSLogs/111122223333/CloudTrail/eu-west-1/2024/03/18/{name}.json.gz");
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
        .queue_url(queue)
        .message_body(msg)
        .send()
        .await
        .expect("send");
}

/// The events under `out` once there are at least `n` (or whatever is there after 30 s).
async fn written(out: &Path, n: usize) -> Vec<(String, String)> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let events = if out.exists() {
            split_output(&local_objects(out)).events
        } else {
            Vec::new()
        };
        if events.len() >= n || std::time::Instant::now() > deadline {
            return events;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// `on_failure = "retry"` through the service: a module that fails leaves nothing written and
/// the notification unacknowledged, so SQS delivers it again (and again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_failure_retry_leaves_the_message_on_the_queue_to_come_again() {
    retry_comes_again("").await;
}

/// With `[dedup]`, the events of a retried file were remembered when first split: the next
/// delivery must not drop them as repeats (and then acknowledge a file whose events were never
/// written).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_failure_retry_with_dedup_does_not_drop_the_retried_events_as_repeats() {
    retry_comes_again("[dedup]\n").await;
}

async fn retry_comes_again(extra: &str) {
    retry_with(extra, None).await;
}

/// After `max_attempts` failed deliveries the fallback (`drop_body` by default) applies: the
/// events go to the error output without their bodies and the message is deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_failure_retry_gives_up_after_max_attempts_and_the_fallback_applies() {
    retry_with("", Some(2)).await;
}

/// The retry tests: `max_attempts` = `attempts`, or so many that the file keeps coming back.
async fn retry_with(extra: &str, attempts: Option<u32>) {
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
        .queue_name("retry")
        .send()
        .await
        .expect("queue")
        .queue_url
        .expect("queue url");
    let tmp = TempDir::new("transform-retry");
    let out = tmp.path().join("out");
    let port = free_port();
    let ep = &moto.endpoint;
    let config = tmp.path().join("run.toml");
    std::fs::write(
        &config,
        format!(
            "{extra}[output]\nurl = {:?}\n[pipeline]\ntransform_cache_dir = {:?}\n\
             [source.sqs]\nqueue_url = {queue:?}\nendpoint_url = {ep:?}\nwait_time_secs = 1\n\
             visibility_timeout_secs = 2\n[[source.buckets]]\nname = \"trail\"\n\
             endpoint_url = {ep:?}\nforce_path_style = true\n[server]\nlisten = \"127.0.0.1:{port}\"\n\
             [[transforms]]\nname = \"redact\"\npath = {:?}\non_failure = \"retry\"\n\
             max_attempts = {}\n[transforms.config]\nmode = \"panic\"\n",
            out.display().to_string(),
            cache_dir(),
            module("hostile").display().to_string(),
            attempts.unwrap_or(1000)
        ),
    )
    .unwrap();
    let key = "AWSLogs/111122223333/CloudTrail/eu-west-1/2024/03/18/retry.json.gz";
    let body = fixtures::gzip(&serde_json::to_vec(&json!({ "Records": events() })).unwrap());
    s3.put_object()
        .bucket("trail")
        .key(key)
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

    // Each delivery fails the batches of the file; three deliveries' worth means it came back.
    let failures = |m: &str| {
        m.lines()
            .find(|l| {
                l.starts_with("trailhose_transform_failures_total")
                    && l.contains("module=\"redact\"")
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let metrics = loop {
        let m = http_get(port, "/metrics")
            .map(|(_, m)| m)
            .unwrap_or_default();
        // One call per delivery (256 events per batch): three failures = delivered three times.
        if failures(&m) >= attempts.map_or(3.0, f64::from) {
            break m;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the file did not come back:\n{m}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status();
    let _ = worker.wait();
    if let Some(n) = attempts {
        return gave_up(&sqs, &queue, &out, &metrics, failures(&metrics), n).await;
    }
    assert!(
        metrics.contains("reason=\"panic\""),
        "the failure is counted with its reason:\n{metrics}"
    );
    // Nothing was written, the error output included, and the message is still queued.
    let objects = if out.exists() {
        local_objects(&out)
    } else {
        Vec::new()
    };
    assert!(objects.is_empty(), "{:?}", objects.len());
    let attrs = sqs
        .get_queue_attributes()
        .queue_url(&queue)
        .attribute_names(aws_sdk_sqs::types::QueueAttributeName::All)
        .send()
        .await
        .expect("attributes");
    let count = |name: aws_sdk_sqs::types::QueueAttributeName| {
        attrs
            .attributes()
            .and_then(|a| a.get(&name))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    use aws_sdk_sqs::types::QueueAttributeName as A;
    assert_eq!(
        count(A::ApproximateNumberOfMessages) + count(A::ApproximateNumberOfMessagesNotVisible),
        1,
        "the notification is not deleted"
    );
}

/// What `retry_with` finds once `n` attempts failed: the last delivery wrote the events
/// without bodies, and its message is deleted.
async fn gave_up(
    sqs: &aws_sdk_sqs::Client,
    queue: &str,
    out: &Path,
    metrics: &str,
    failures: f64,
    n: u32,
) {
    assert_eq!(
        failures,
        f64::from(n),
        "no delivery after the last attempt:\n{metrics}"
    );
    let output = split_output(&local_objects(out));
    assert!(output.events.is_empty());
    assert_eq!(output.errors.len(), 6, "{:?}", output.errors);
    for e in &output.errors {
        assert_eq!(e["module"], "redact", "{e}");
        assert_eq!(e["reason"], "panic", "{e}");
        assert!(e.get("record").is_none(), "drop_body, the fallback: {e}");
    }
    let attrs = sqs
        .get_queue_attributes()
        .queue_url(queue)
        .attribute_names(aws_sdk_sqs::types::QueueAttributeName::All)
        .send()
        .await
        .expect("attributes");
    let count = |name: aws_sdk_sqs::types::QueueAttributeName| {
        attrs
            .attributes()
            .and_then(|a| a.get(&name))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    use aws_sdk_sqs::types::QueueAttributeName as A;
    assert_eq!(
        count(A::ApproximateNumberOfMessages) + count(A::ApproximateNumberOfMessagesNotVisible),
        0,
        "the notification is deleted once its records are written"
    );
}
