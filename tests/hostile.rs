//! End to end: hostile delivery files through the real binary — `trailhose process` on local
//! files, and `trailhose run` on SQS and S3 on a real moto_server. Each case of issue 14's table:
//! the bad element alone goes to the error output with its reason, its neighbours pass, the
//! run exits 0, nothing is lost.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::checks::{id_of, split_output};
use common::sqs::{
    Settings, cloudtrail, depth, send, setup, start_worker, stop, write_config_with,
};
use common::{TempDir, eventually, fixtures, free_port, http_get, local_objects, s3_objects};
use serde_json::Value;

const DAY: &str = "AWSLogs/111122223333/CloudTrail/us-east-1/2024/03/18";

/// A compact CloudTrail event; `eventID` last, as CloudTrail writes it.
fn ev(id: &str) -> String {
    format!(
        r#"{{"eventVersion":"1.09","eventTime":"2024-03-18T14:05:00Z","eventSource":"s3.amazonaws.com","eventName":"GetObject","awsRegion":"us-east-1","sourceIPAddress":"203.0.113.9","requestID":"r-{id}","eventID":"{id}","eventType":"AwsApiCall","recipientAccountId":"111122223333"}}"#
    )
}

fn ids(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i:03}")).collect()
}

fn records(entries: &[String]) -> Vec<u8> {
    format!("{{\"Records\":[{}]}}", entries.join(",")).into_bytes()
}

/// What a run wrote: event lines (exact bytes) and error records.
struct Out {
    events: Vec<String>,
    errors: Vec<Value>,
}

impl Out {
    fn of(objects: &[(String, String)]) -> Out {
        let o = split_output(objects);
        Out {
            events: o.events.into_iter().map(|(_, l)| l).collect(),
            errors: o.errors,
        }
    }

    fn sorted_ids(&self) -> Vec<String> {
        let mut v: Vec<String> = self.events.iter().map(|l| id_of(l)).collect();
        v.sort();
        v
    }

    fn errors_with(&self, reason: &str) -> Vec<&Value> {
        self.errors
            .iter()
            .filter(|e| e["reason"] == reason)
            .collect()
    }
}

/// The value of the first metric line holding every needle.
fn metric(text: &str, needles: &[&str]) -> f64 {
    text.lines()
        .find(|l| !l.starts_with('#') && needles.iter().all(|n| l.contains(n)))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

/// `trailhose process` on one file, with more `[pipeline]` settings; returns what it wrote and
/// its metrics. The run must exit 0.
fn process(tmp: &Path, name: &str, bytes: &[u8], pipeline: &str) -> (Out, String) {
    let input = tmp.join("in").join(DAY).join(name);
    std::fs::create_dir_all(input.parent().unwrap()).unwrap();
    std::fs::write(&input, bytes).unwrap();
    let out = tmp.join("out");
    let config = tmp.join("process.toml");
    std::fs::write(
        &config,
        format!(
            "[output]\nurl = \"{}\"\n[pipeline]\n{pipeline}\n",
            out.display()
        ),
    )
    .unwrap();
    let metrics = tmp.join("metrics.prom");
    let run = common::trailhose(
        &[
            "process",
            tmp.join("in").to_str().unwrap(),
            "--config",
            config.to_str().unwrap(),
            "--metrics-file",
            metrics.to_str().unwrap(),
        ],
        &[],
    );
    assert!(
        run.status.success(),
        "exit 0; stderr: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    let m = std::fs::read_to_string(&metrics).expect("metrics file");
    (Out::of(&local_objects(&out)), m)
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

/// Case 1: 40 non-object entries of 10 KB between good events, across the 256 KiB read window.
fn non_objects_file() -> (Vec<u8>, Vec<String>, Vec<String>) {
    let good = ids("no", 41);
    let mut entries = Vec::new();
    let mut texts = Vec::new();
    for (i, id) in good.iter().enumerate() {
        entries.push(ev(id));
        if i < 40 {
            let t = format!("{i:02} {}", "n".repeat(10_000));
            entries.push(serde_json::to_string(&t).unwrap());
            texts.push(t);
        }
    }
    (records(&entries), good, texts)
}

#[test]
fn non_objects_across_the_read_window_go_to_errors_and_good_events_pass() {
    let tmp = TempDir::new("hostile-nonobj");
    let (file, good, texts) = non_objects_file();
    let (out, m) = process(tmp.path(), "nonobj.json", &fixtures::gzip(&file), "");
    assert_eq!(out.sorted_ids(), sorted(good.clone()));
    for line in &out.events {
        let id = id_of(line);
        assert_eq!(line, &ev(&id), "events keep their exact bytes");
    }
    let rejected = out.errors_with("not_an_object");
    assert_eq!(rejected.len(), 40);
    for (n, r) in rejected.iter().enumerate() {
        assert_eq!(r["index"], 2 * n as u64 + 1);
        assert_eq!(r["record"], texts[n].as_str());
    }
    assert_eq!(out.errors.len(), 40, "{:?}", out.errors);
    assert_eq!(
        metric(&m, &["trailhose_records_rejected_total", "not_an_object"]),
        40.0
    );
}

/// Case 2: one 17 MiB event (over the 16 MiB default) in the middle, eventID at its end.
fn oversized_file() -> (Vec<u8>, Vec<String>, String) {
    let before = ids("ob", 10);
    let after = ids("oa", 30);
    let big = format!(
        r#"{{"eventVersion":"1.09","requestParameters":{{"policy":"{}"}},"eventID":"huge-1"}}"#,
        "p".repeat(17 << 20)
    );
    let mut entries: Vec<String> = before.iter().map(|i| ev(i)).collect();
    entries.push(big.clone());
    entries.extend(after.iter().map(|i| ev(i)));
    let mut good = before;
    good.extend(after);
    (records(&entries), good, big)
}

fn check_oversized(out: &Out, good: &[String], big: &str) {
    assert_eq!(out.sorted_ids(), sorted(good.to_vec()));
    let errs = out.errors_with("event_too_large");
    assert_eq!(errs.len(), 1, "{:?}", out.errors);
    let e = errs[0];
    assert_eq!(e["index"], 10);
    assert_eq!(e["size"], big.len() as u64);
    assert_eq!(e["eventID"], "huge-1");
    assert_eq!(e["raw"], &big[..1024]);
    assert_eq!(e["stage"], "split");
    assert_eq!(out.errors.len(), 1, "{:?}", out.errors);
}

#[test]
fn an_oversized_event_alone_goes_to_errors_and_the_events_after_it_pass() {
    let tmp = TempDir::new("hostile-big");
    let (file, good, big) = oversized_file();
    let (out, m) = process(tmp.path(), "big.json.gz", &fixtures::gzip(&file), "");
    check_oversized(&out, &good, &big);
    assert_eq!(
        metric(&m, &["trailhose_records_rejected_total", "event_too_large"]),
        1.0
    );
    assert_eq!(
        metric(&m, &["trailhose_files_total", "outcome=\"ok\""]),
        1.0
    );
}

/// Case 3: one event with a JSON syntax error mid-file, 20 good events after it.
fn syntax_error_file() -> (Vec<u8>, Vec<String>, String) {
    let before = ids("sb", 5);
    let after = ids("sa", 20);
    let broken = r#"{"eventVersion":"1.09","eventTime":"2024-03-18T14:05:00Z","readOnly":tru,"note":"a } and a ] in a string","eventID":"broken-1"}"#.to_owned();
    let mut entries: Vec<String> = before.iter().map(|i| ev(i)).collect();
    entries.push(broken.clone());
    entries.extend(after.iter().map(|i| ev(i)));
    let mut good = before;
    good.extend(after);
    (records(&entries), good, broken)
}

fn check_syntax_error(out: &Out, good: &[String], broken: &str) {
    assert_eq!(out.sorted_ids(), sorted(good.to_vec()));
    let errs = out.errors_with("malformed_json");
    assert_eq!(errs.len(), 1, "{:?}", out.errors);
    assert_eq!(errs[0]["index"], 5);
    assert_eq!(errs[0]["raw"], broken);
    assert_eq!(errs[0]["eventID"], "broken-1");
    assert_eq!(errs[0]["size"], broken.len() as u64);
    assert_eq!(out.errors.len(), 1, "{:?}", out.errors);
}

#[test]
fn a_syntax_error_sends_only_its_event_to_errors() {
    let tmp = TempDir::new("hostile-syntax");
    let (file, good, broken) = syntax_error_file();
    let (out, m) = process(tmp.path(), "syntax.json.gz", &fixtures::gzip(&file), "");
    check_syntax_error(&out, &good, &broken);
    assert_eq!(
        metric(&m, &["trailhose_records_rejected_total", "malformed_json"]),
        1.0
    );
}

#[test]
fn where_no_end_can_be_found_the_rest_of_the_file_goes_to_errors_raw() {
    let tmp = TempDir::new("hostile-unsplit");
    let before = ids("ub", 3);
    let mut head: Vec<String> = before.iter().map(|i| ev(i)).collect();
    head.push(String::new());
    let head = format!("{{\"Records\":[{}", head.join(","));
    // A bracket that closes the wrong thing: the entries after it cannot be told apart.
    let tail = format!(
        r#"{{"eventID":"bad","x":[1}}, {}, {}]}}"#,
        ev("lost-1"),
        ev("lost-2")
    );
    let file = format!("{head}{tail}");
    let (out, m) = process(
        tmp.path(),
        "unsplit.json.gz",
        &fixtures::gzip(file.as_bytes()),
        "",
    );
    assert_eq!(out.sorted_ids(), before);
    let file_err = out.errors_with("malformed_json");
    assert_eq!(file_err.len(), 1, "{:?}", out.errors);
    assert_eq!(file_err[0]["events_kept"], 3);
    let raw = out.errors_with("unsplittable");
    assert_eq!(raw.len(), 1);
    assert_eq!(raw[0]["offset"], head.len() as u64);
    assert_eq!(
        raw[0]["raw"],
        tail.as_str(),
        "the rest of the file, byte for byte"
    );
    assert_eq!(
        metric(&m, &["trailhose_errors_total", "reason=\"malformed_json\""]),
        1.0
    );
}

#[test]
fn invalid_utf8_in_one_event_sends_it_to_errors_and_output_stays_utf8() {
    let tmp = TempDir::new("hostile-utf8");
    let good = ids("u", 6);
    let mut file = b"{\"Records\":[".to_vec();
    let mut bad_event = Vec::new();
    for (i, id) in good.iter().enumerate() {
        file.extend_from_slice(ev(id).as_bytes());
        file.push(b',');
        if i == 2 {
            bad_event = b"{\"eventTime\":\"2024-03-18T14:05:00Z\",\"userAgent\":\"caf\xe9 \xff\",\"eventID\":\"bad-utf8\"}".to_vec();
            file.extend_from_slice(&bad_event);
            file.push(b',');
        }
    }
    file.pop();
    file.extend_from_slice(b"]}");
    let (out, m) = process(tmp.path(), "utf8.json.gz", &fixtures::gzip(&file), "");
    assert_eq!(out.sorted_ids(), good);
    let errs = out.errors_with("invalid_utf8");
    assert_eq!(errs.len(), 1, "{:?}", out.errors);
    assert_eq!(errs[0]["index"], 3);
    assert_eq!(errs[0]["eventID"], "bad-utf8");
    let exact = unbase64(errs[0]["raw_base64"].as_str().expect("raw_base64"));
    assert_eq!(exact, bad_event, "the exact bytes are recoverable");
    assert_eq!(out.errors.len(), 1);
    assert_eq!(
        metric(&m, &["trailhose_records_rejected_total", "invalid_utf8"]),
        1.0
    );
}

/// Decodes standard base64 (the test's own, independent of the encoder under test).
fn unbase64(text: &str) -> Vec<u8> {
    let abc = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut bits = 0u32;
    let mut n = 0;
    let mut out = Vec::new();
    for c in text.chars().filter(|c| *c != '=') {
        bits = (bits << 6) | abc.find(c).expect("base64 alphabet") as u32;
        n += 6;
        if n >= 8 {
            n -= 8;
            out.push((bits >> n) as u8);
        }
    }
    out
}

/// The peak resident set of a running process, from /proc.
fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Split-stage error records hold bytes no transform saw: the values of sensitive keys are
/// masked in them first, in an oversized event, a malformed one, a non-object and the raw rest
/// of a file alike.
#[test]
fn secrets_in_what_the_split_sends_to_errors_appear_nowhere_in_the_output() {
    let tmp = TempDir::new("hostile-secrets");
    let good = ids("sg", 4);
    // Over max_event_bytes = 4096: its first KiB goes to the error output, credentials in it.
    let big = format!(
        r#"{{"eventVersion":"1.09","responseElements":{{"credentials":{{"accessKeyId":"ASIAEXAMPLE","sessionToken":"SECRET-session-1","expiration":"x"}},"secretAccessKey":"SECRET-key-2"}},"pad":"{}","eventID":"big-1"}}"#,
        "p".repeat(8000)
    );
    let broken = r#"{"eventVersion":"1.09","requestParameters":{"userName":"bob","Password" : "SECRET-pw-3"},"readOnly":tru,"eventID":"broken-1"}"#;
    let not_object = r#"[{"privateKey":"SECRET-pem-4"},"plain"]"#;
    let entries = [
        ev(&good[0]),
        big.clone(),
        ev(&good[1]),
        broken.to_owned(),
        ev(&good[2]),
        not_object.to_owned(),
        ev(&good[3]),
    ];
    // Then a bracket that closes the wrong thing: the rest of the file goes out raw.
    let tail = r#"{"eventID":"bad","x":[1}, {"clientSecret":"SECRET-cs-5","ok":1}]}"#;
    let file = format!("{{\"Records\":[{},{tail}", entries.join(","));
    let (out, _) = process(
        tmp.path(),
        "secrets.json.gz",
        &fixtures::gzip(file.as_bytes()),
        "max_event_bytes = 4096",
    );
    assert_eq!(out.sorted_ids(), good);
    let all: String = local_objects(&tmp.path().join("out"))
        .into_iter()
        .map(|(_, text)| text)
        .collect();
    assert!(!all.contains("SECRET"), "a secret was written: {all}");
    let big_err = out.errors_with("event_too_large");
    assert_eq!(big_err.len(), 1, "{:?}", out.errors);
    assert_eq!(big_err[0]["eventID"], "big-1");
    assert_eq!(big_err[0]["size"], big.len() as u64);
    let raw = big_err[0]["raw"].as_str().unwrap();
    assert!(
        raw.contains(r#""credentials":"[redacted]","secretAccessKey":"[redacted]"},"pad":"ppp"#),
        "{raw}"
    );
    let bad = out.errors_with("malformed_json");
    let element = bad
        .iter()
        .find(|e| e["index"] == 3)
        .expect("the broken event");
    assert_eq!(
        element["raw"],
        broken.replace("\"SECRET-pw-3\"", "\"[redacted]\"")
    );
    let not_obj = out.errors_with("not_an_object");
    assert_eq!(not_obj.len(), 1);
    assert_eq!(
        not_obj[0]["record"],
        serde_json::json!([{"privateKey": "[redacted]"}, "plain"])
    );
    let rest = out.errors_with("unsplittable");
    assert_eq!(rest.len(), 1);
    assert_eq!(
        rest[0]["raw"],
        tail.replace("\"SECRET-cs-5\"", "\"[redacted]\"")
    );
    assert_eq!(
        rest[0]["size"],
        tail.len() as u64,
        "the size is of the bytes read"
    );
}

/// `errors.redact_keys` replaces the default list; an empty list turns masking off.
#[test]
fn errors_redact_keys_names_the_keys_masked() {
    let tmp = TempDir::new("hostile-redact-keys");
    let broken = r#"{"note":"SECRET-a","Password":"SECRET-b","x":tru,"eventID":"b-1"}"#;
    let file = records(&[ev("k-1"), broken.to_owned()]);
    let (out, _) = process(
        tmp.path(),
        "keys.json",
        &file,
        "[errors]\nredact_keys = [\"note\"]",
    );
    assert_eq!(out.sorted_ids(), ["k-1"]);
    let bad = out.errors_with("malformed_json");
    assert_eq!(
        bad[0]["raw"],
        r#"{"note":"[redacted]","Password":"SECRET-b","x":tru,"eventID":"b-1"}"#
    );
}

/// A top-level value over `max_event_bytes` before `Records` is stepped over, not the end of
/// the file; `Records` that is not an array goes to the error output raw.
#[test]
fn a_big_value_before_records_is_stepped_over_and_records_not_array_goes_out_raw() {
    let tmp = TempDir::new("hostile-toplevel");
    let good = ids("tl", 5);
    let entries: Vec<String> = good.iter().map(|i| ev(i)).collect();
    let file = format!(
        r#"{{"meta":{{"pad":"{}","list":[1,2,3]}},"Records":[{}]}}"#,
        "m".repeat(8000),
        entries.join(",")
    );
    let (out, m) = process(
        tmp.path(),
        "meta.json.gz",
        &fixtures::gzip(file.as_bytes()),
        "max_event_bytes = 4096",
    );
    assert_eq!(out.sorted_ids(), good);
    assert!(out.errors.is_empty(), "{:?}", out.errors);
    assert_eq!(
        metric(&m, &["trailhose_files_total", "outcome=\"ok\""]),
        1.0
    );

    let tmp = TempDir::new("hostile-not-array");
    let file = format!(r#"{{"Records":{{"one":{}}}}}"#, ev("na-1"));
    let (out, m) = process(tmp.path(), "obj.json", file.as_bytes(), "");
    assert!(out.events.is_empty());
    let file_err = out.errors_with("records_not_array");
    assert_eq!(file_err.len(), 1, "{:?}", out.errors);
    let raw = out.errors_with("unsplittable");
    assert_eq!(raw.len(), 1, "{:?}", out.errors);
    assert_eq!(raw[0]["offset"], 11);
    assert_eq!(raw[0]["raw"], &file[11..]);
    assert_eq!(
        metric(
            &m,
            &["trailhose_errors_total", "reason=\"records_not_array\""]
        ),
        1.0
    );
}

/// The element `max_decompressed_bytes` falls in goes to the error output raw, with its offset;
/// the events before it pass.
#[test]
fn the_element_the_decompressed_limit_cuts_goes_to_errors_raw() {
    let tmp = TempDir::new("hostile-limit-cut");
    let all = ids("lc", 10);
    let entries: Vec<String> = all.iter().map(|i| ev(i)).collect();
    let file = records(&entries);
    // The limit falls in the middle of the sixth event.
    let start = 12 + 5 * (ev(&all[0]).len() + 1);
    let limit = start + 100;
    let (out, _) = process(
        tmp.path(),
        "cut.json.gz",
        &fixtures::gzip(&file),
        &format!("max_decompressed_bytes = {limit}"),
    );
    assert_eq!(out.sorted_ids(), all[..5].to_vec());
    assert_eq!(
        out.errors_with("inflation_limit").len(),
        1,
        "{:?}",
        out.errors
    );
    let raw = out.errors_with("unsplittable");
    assert_eq!(raw.len(), 1, "{:?}", out.errors);
    assert_eq!(raw[0]["offset"], start as u64);
    assert_eq!(
        raw[0]["raw"],
        String::from_utf8_lossy(&file[start..limit]).as_ref()
    );
}

#[test]
fn an_inflation_bomb_is_stopped_by_the_decompressed_limit() {
    let tmp = TempDir::new("hostile-bomb");
    // ~2 MB of gzip that inflates to 2 GiB of `{},`: one 48 MiB member, compressed once and
    // repeated (concatenated gzip members read as one stream).
    let gz = |data: &[u8]| {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        enc.write_all(data).unwrap();
        enc.finish().unwrap()
    };
    let member = gz("{},".repeat(16 << 20).as_bytes());
    let mut bomb = gz(b"{\"Records\":[");
    for _ in 0..42 {
        bomb.extend_from_slice(&member);
    }
    bomb.extend(gz(b"{}]}"));
    assert!(bomb.len() < 4 << 20, "{}", bomb.len());
    let input = tmp.path().join("in").join(DAY).join("bomb.json.gz");
    std::fs::create_dir_all(input.parent().unwrap()).unwrap();
    std::fs::write(&input, &bomb).unwrap();

    let limit: u64 = 8 << 20;
    let out = tmp.path().join("out");
    let config = tmp.path().join("bomb.toml");
    std::fs::write(
        &config,
        format!(
            "[output]\nurl = \"{}\"\n[pipeline]\nmax_decompressed_bytes = {limit}\n",
            out.display()
        ),
    )
    .unwrap();
    let metrics = tmp.path().join("metrics.prom");
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_trailhose"))
        .args([
            "process",
            tmp.path().join("in").to_str().unwrap(),
            "--config",
            config.to_str().unwrap(),
            "--metrics-file",
            metrics.to_str().unwrap(),
        ])
        .env("TRAILHOSE_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut peak = 0;
    let status = loop {
        if let Some(p) = peak_rss_kib(child.id()) {
            peak = peak.max(p);
        }
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if started.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            panic!("the bomb was not stopped within 120 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success());
    // A generous bound: the point is that memory does not follow the 2 GiB the file inflates
    // to. (No bound on time: the 120 s deadline above only catches a hang.)
    assert!(peak < 400 * 1024, "peak RSS {peak} KiB");

    let got = Out::of(&local_objects(&out));
    // Every `{}` wholly inside the first `limit` bytes is kept: offsets 12 + 3k.
    let kept = (limit - 14) / 3 + 1;
    assert_eq!(got.events.len() as u64, kept);
    // `{}` has no eventTime: each is partitioned by arrival and says so, nothing else added.
    assert!(
        got.events
            .iter()
            .all(|l| l.starts_with("{\"trailhoseArrivalTime\":\"") && l.ends_with("Z\"}")),
        "{:?}",
        got.events.first()
    );
    let errs = got.errors_with("inflation_limit");
    assert_eq!(errs.len(), 1, "{:?}", got.errors);
    assert_eq!(errs[0]["events_kept"], kept);
    let m = std::fs::read_to_string(&metrics).unwrap();
    assert_eq!(
        metric(
            &m,
            &["trailhose_errors_total", "reason=\"inflation_limit\""]
        ),
        1.0
    );
}

#[test]
fn a_file_over_the_stored_limit_is_refused_unread() {
    let tmp = TempDir::new("hostile-filesize");
    let file = records(&ids("fs", 50).iter().map(|i| ev(i)).collect::<Vec<_>>());
    let (out, m) = process(tmp.path(), "big.json", &file, "max_file_bytes = 4096");
    assert!(out.events.is_empty());
    let errs = out.errors_with("file_too_large");
    assert_eq!(errs.len(), 1, "{:?}", out.errors);
    assert_eq!(errs[0]["events_kept"], 0);
    assert_eq!(
        metric(&m, &["trailhose_errors_total", "reason=\"file_too_large\""]),
        1.0
    );
}

// ---- Through SQS and S3 ------------------------------------------------------------------

fn scrape(port: u16) -> String {
    http_get(port, "/metrics")
        .map(|(_, m)| m)
        .unwrap_or_default()
}

/// The oversized-event, syntax-error and over-the-stored-limit files through `trailhose run`: fetched from S3 as
/// announced on SQS, at the shipped batch defaults (buffers are sealed by SIGTERM).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_files_through_sqs_lose_only_their_bad_events_and_are_acknowledged() {
    let (moto, q) = setup("hostile", 5).await;
    let (s3, sqs) = (moto.s3(), moto.sqs());
    let (big_file, big_good, big) = oversized_file();
    let (syn_file, syn_good, broken) = syntax_error_file();
    // Over `max_file_bytes` stored (its pad does not compress); the CloudTrail notification
    // carries no size, so the object's Content-Length refuses it.
    let mut x = 0x9e37_79b9_u32;
    let pad: String = (0..3 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            char::from(b"0123456789abcdef"[(x % 16) as usize])
        })
        .collect();
    let huge_file = records(&[format!(r#"{{"eventID":"stored-1","pad":"{pad}"}}"#)]);
    let mut keys = Vec::new();
    for (name, bytes) in [
        ("big.json.gz", &big_file),
        ("syntax.json.gz", &syn_file),
        ("huge.json.gz", &huge_file),
    ] {
        let gz = fixtures::gzip(bytes);
        assert_eq!(gz.len() > 1 << 20, name == "huge.json.gz", "{name}");
        let key = format!("{DAY}/{name}");
        s3.put_object()
            .bucket("trail-logs")
            .key(&key)
            .body(gz.into())
            .send()
            .await
            .unwrap();
        keys.push(key);
    }
    for key in &keys {
        send(&sqs, &q.url, &cloudtrail("trail-logs", &[key])).await;
    }

    let tmp = TempDir::new("hostile-sqs");
    let port = free_port();
    let eps = (moto.endpoint.as_str(), moto.endpoint.as_str());
    let settings = Settings {
        extra: "[pipeline]\nmax_file_bytes = 1048576\n".into(),
        ..Settings::default()
    };
    let config = write_config_with(tmp.path(), eps, &q.url, port, &settings);
    let log = tmp.path().join("worker.log");
    let mut child = start_worker(&moto, &config, &log);
    eventually(60, "both files split", || async {
        metric(&scrape(port), &["trailhose_files_total", "outcome=\"ok\""]) >= 2.0
    })
    .await;
    eventually(60, "the stored-size refusal", || async {
        metric(&scrape(port), &["trailhose_errors_total", "file_too_large"]) >= 1.0
    })
    .await;
    let m = scrape(port);
    assert_eq!(
        metric(&m, &["trailhose_records_rejected_total", "event_too_large"]),
        1.0
    );
    assert_eq!(
        metric(&m, &["trailhose_records_rejected_total", "malformed_json"]),
        1.0
    );
    // SIGTERM seals the open buffers, writes them and acknowledges both messages.
    stop(&mut child, &log, 30);

    let objects = s3_objects(&s3, "trail-out", "ct/").await;
    let out = Out::of(&objects);
    let mut all_good = big_good.clone();
    all_good.extend(syn_good.clone());
    assert_eq!(out.sorted_ids(), sorted(all_good));
    let only = |needle: &str| Out {
        events: Vec::new(),
        errors: out
            .errors
            .iter()
            .filter(|e| e["source"].as_str().unwrap_or_default().contains(needle))
            .cloned()
            .collect(),
    };
    let big_errs = only("big.json.gz");
    let syn_errs = only("syntax.json.gz");
    let huge_errs = only("huge.json.gz");
    assert_eq!(
        big_errs.errors.len() + syn_errs.errors.len() + huge_errs.errors.len(),
        out.errors.len()
    );
    // The file over the stored limit: one record, nothing read, and (below) acknowledged.
    assert_eq!(huge_errs.errors.len(), 1, "{:?}", huge_errs.errors);
    assert_eq!(huge_errs.errors[0]["reason"], "file_too_large");
    assert_eq!(huge_errs.errors[0]["events_kept"], 0);
    check_oversized(
        &Out {
            events: out
                .events
                .iter()
                .filter(|l| big_good.contains(&id_of(l)))
                .cloned()
                .collect(),
            errors: big_errs.errors,
        },
        &big_good,
        &big,
    );
    check_syntax_error(
        &Out {
            events: out
                .events
                .iter()
                .filter(|l| syn_good.contains(&id_of(l)))
                .cloned()
                .collect(),
            errors: syn_errs.errors,
        },
        &syn_good,
        &broken,
    );
    // Every message acknowledged.
    assert_eq!(depth(&sqs, &q.url).await, (0, 0));
    assert_eq!(depth(&sqs, &q.dlq_url).await.0, 0);
}
