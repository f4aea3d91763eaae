//! Checks shared by the end-to-end tests: what the fixture set must produce in any store.

use std::collections::BTreeMap;

use serde_json::Value;

use super::fixtures;

/// Splits output objects into event lines (with their keys) and error records.
pub struct Output {
    /// (object key, line)
    pub events: Vec<(String, String)>,
    pub errors: Vec<Value>,
}

pub fn split_output(objects: &[(String, String)]) -> Output {
    let mut out = Output {
        events: Vec::new(),
        errors: Vec::new(),
    };
    for (key, text) in objects {
        assert!(
            text.ends_with('\n') || text.is_empty(),
            "{key}: JSON lines end in a newline"
        );
        for line in text.lines() {
            if key.starts_with("errors/") {
                out.errors
                    .push(serde_json::from_str(line).expect("error records are JSON"));
            } else {
                out.events.push((key.clone(), line.to_owned()));
            }
        }
    }
    out
}

/// The eventIDs of every event line of `objects` (error records left out), sorted, repeats kept.
pub fn event_ids(objects: &[(String, String)]) -> Vec<String> {
    let mut ids: Vec<String> = split_output(objects)
        .events
        .iter()
        .map(|(_, l)| id_of(l))
        .collect();
    ids.sort();
    ids
}

pub fn id_of(line: &str) -> String {
    let v: Value = serde_json::from_str(line)
        .unwrap_or_else(|e| panic!("output line is JSON ({e}): {line:.200}"));
    v["eventID"].as_str().expect("eventID").to_owned()
}

pub const LONDON_GEO: &str = r#""geo":{"latitude":51.5142,"longitude":-0.0931,"city":"London","subdivision_isocode":"ENG","country":"United Kingdom","country_isocode":"GB","asn":20712,"as_org":"Andrews & Arnold Ltd"}"#;

/// Everything the fixture set promises, checked on whatever store the objects came from.
pub fn check_fixture_output(exp: &fixtures::Expected, objects: &[(String, String)]) {
    let out = split_output(objects);

    // Every key sorts by time and names its compression.
    for (key, _) in objects {
        let name = key.rsplit('/').next().unwrap_or_default();
        assert!(
            name.len() > 17 && name.as_bytes()[8] == b'T',
            "object name starts with a timestamp: {key}"
        );
        assert!(name.ends_with(".json.gz"), "{key}");
    }

    // Every eventID exactly once: all good events, the pretty one, and the truncated file's
    // events that were complete before the cut.
    let mut seen: BTreeMap<String, (String, String)> = BTreeMap::new();
    for (key, line) in &out.events {
        let id = id_of(line);
        assert!(
            seen.insert(id.clone(), (key.clone(), line.clone()))
                .is_none(),
            "{id} written twice"
        );
    }
    let kept_trunc: Vec<&String> = exp
        .truncated_ids
        .iter()
        .filter(|id| seen.contains_key(*id))
        .collect();
    assert!(
        !kept_trunc.is_empty(),
        "events before the truncation are kept"
    );
    for id in exp.events.keys().chain(exp.pretty_ids.iter()) {
        assert!(seen.contains_key(id), "{id} missing from the output");
    }
    assert_eq!(
        seen.len(),
        exp.events.len() + exp.pretty_ids.len() + kept_trunc.len(),
        "no unexpected events (lost files' contents must not appear as events)"
    );

    // Original bytes are preserved exactly; geo is spliced in before the closing brace.
    // Events without a usable eventTime also carry the arrival time they were partitioned by.
    let untimed = ["ev-no-time", "ev-bad-time"];
    for (id, raw) in &exp.events {
        let line = &seen[id].1;
        let body = &raw[..raw.len() - 1];
        assert!(line.starts_with(body), "{id}: original bytes preserved");
        let mut added = &line[body.len()..];
        let arrival = added.find(",\"trailhoseArrivalTime\":\"");
        assert_eq!(
            arrival.is_some(),
            untimed.contains(&id.as_str()),
            "{id}: {added}"
        );
        if let Some(at) = arrival {
            let rest = &added[at + ",\"trailhoseArrivalTime\":\"".len()..];
            let time = &rest[..rest.find('"').expect("closing quote")];
            assert!(time.len() == 20 && time.ends_with('Z'), "{id}: {time}");
            added = &added[..at];
            assert!(
                line.ends_with(&format!("\"{time}\"}}")),
                "{id}: arrival field last"
            );
        }
        let added = if arrival.is_some() {
            &format!("{added}}}")
        } else {
            added
        };
        assert!(
            added == "}" || (added.starts_with(",\"geo\":{") && added.ends_with("}}")),
            "{id}: only geo added: {added}"
        );
    }
    let pretty = &seen["ev-pretty"].1;
    let v: Value = serde_json::from_str(pretty).expect("pretty event is one JSON line");
    assert_eq!(v["requestParameters"]["a"], serde_json::json!([1, 2]));

    // Geo: exact keys and order; absent values omitted; non-addresses get none.
    let line = |id: &str| seen[id].1.as_str();
    assert!(
        line("ev-london").ends_with(&format!(",{LONDON_GEO}}}")),
        "{}",
        line("ev-london")
    );
    assert!(line("ev-tokyo-v6").contains(r#""geo":{"latitude":35.6895,"longitude":139.6917,"city":"Tokyo","subdivision_isocode":"13","country":"Japan","country_isocode":"JP"}"#));
    assert!(line("ev-amazon-country-only").ends_with(r#","geo":{"country":"United States","country_isocode":"US","asn":16509,"as_org":"AMAZON-02"}}"#));
    for id in ["ev-aws-internal", "ev-lambda", "ev-no-ip", "ev-unknown-ip"] {
        assert!(!line(id).contains("\"geo\""), "{id} has no geo");
    }
    let unicode: Value = serde_json::from_str(line("ev-unicode")).expect("json");
    assert_eq!(unicode["geo"]["city"], "Linköping");
    assert_eq!(unicode["requestParameters"]["emoji"], "🚀");

    // Partitions: event hour in UTC; missing or malformed times in the fallback partition.
    let key = |id: &str| seen[id].0.as_str();
    assert!(key("ev-london").starts_with("year=2024/month=03/day=18/hour=14/"));
    assert!(key("ev-org-1").starts_with("year=2024/month=03/day=18/hour=15/"));
    assert!(key("ev-offset-time").starts_with("year=2024/month=03/day=18/hour=14/"));
    // Missing or malformed times: the partition of the arrival hour, in the same Hive shape.
    for id in untimed {
        let v: Value = serde_json::from_str(&seen[id].1).expect("json");
        let t = v["trailhoseArrivalTime"].as_str().expect("arrival time");
        let hour = format!(
            "year={}/month={}/day={}/hour={}/",
            &t[0..4],
            &t[5..7],
            &t[8..10],
            &t[11..13]
        );
        assert!(key(id).starts_with(&hour), "{id}: {} vs {t}", key(id));
    }

    // Errors: one record per bad file (three for the mixed file), naming source and reason.
    let mut by_file: BTreeMap<String, Vec<&Value>> = BTreeMap::new();
    for e in &out.errors {
        let source = e["source"].as_str().expect("source");
        let name = source.rsplit('/').next().unwrap_or_default().to_owned();
        by_file.entry(name).or_default().push(e);
    }
    for (name, reason) in &exp.bad_files {
        let recs = by_file
            .get(*name)
            .unwrap_or_else(|| panic!("no error record for {name}"));
        // A Records value that is not an array also goes out raw, after its file-level record.
        let raw_too = *reason == "records_not_array";
        assert!(
            recs.iter()
                .all(|r| r["reason"] == *reason || (raw_too && r["reason"] == "unsplittable")),
            "{name}: {recs:?}"
        );
        if raw_too {
            assert!(
                recs.iter().any(|r| r["reason"] == "unsplittable"),
                "{name}: {recs:?}"
            );
        }
        assert!(
            recs.iter()
                .all(|r| r["detail"].as_str().is_some_and(|d| !d.is_empty()))
        );
    }
    let mixed = &by_file["mixed-records.json.gz"];
    let records: Vec<&Value> = mixed.iter().map(|r| &r["record"]).collect();
    assert_eq!(
        records,
        [
            &Value::from("a string, not an event"),
            &Value::from(42),
            &Value::Null
        ]
    );
    let trunc = &by_file["truncated.json.gz"][0];
    assert_eq!(trunc["events_kept"], kept_trunc.len() as u64);
    assert!(
        trunc["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("kept")
    );
    assert_eq!(
        by_file.len(),
        exp.bad_files.len(),
        "no error records for good files: {by_file:?}"
    );
}

/// Writes the fixture city and ASN databases; returns their paths.
pub fn fixture_dbs(dir: &std::path::Path) -> (String, String) {
    let city = dir.join("city.mmdb");
    let asn = dir.join("asn.mmdb");
    super::mmdb::write_city_db(&city);
    super::mmdb::write_asn_db(&asn);
    (city.display().to_string(), asn.display().to_string())
}
