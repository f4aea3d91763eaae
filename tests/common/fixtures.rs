//! The project's own CloudTrail fixtures: every delivery shape and every hostile file, written
//! into a directory in CloudTrail's layout, with what each must produce.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use flate2::Compression;
use flate2::write::GzEncoder;

pub fn gzip(data: &[u8]) -> Vec<u8> {
    gzip_level(data, Compression::default())
}

pub fn gzip_level(data: &[u8], level: Compression) -> Vec<u8> {
    let mut enc = GzEncoder::new(Vec::new(), level);
    enc.write_all(data).expect("gzip");
    enc.finish().expect("gzip")
}

/// What the fixture set expects.
#[derive(Debug, Default)]
pub struct Expected {
    /// eventID → the event's exact original bytes (compact events only; see `pretty_ids`).
    pub events: BTreeMap<String, String>,
    /// Events written pretty-printed across lines: only their values must survive.
    pub pretty_ids: Vec<String>,
    /// Bad file name → the reason its error record must carry.
    pub bad_files: BTreeMap<&'static str, &'static str>,
    /// Events in the truncated file (some of them are kept).
    pub truncated_ids: Vec<String>,
}

fn event(id: &str, time: Option<&str>, ip: Option<&str>, extra: &str) -> String {
    let mut s = String::from(
        r#"{"eventVersion":"1.09","userIdentity":{"type":"IAMUser","principalId":"AIDAEXAMPLE","arn":"arn:aws:iam::111122223333:user/alice","accountId":"111122223333","userName":"alice"}"#,
    );
    if let Some(t) = time {
        s.push_str(&format!(r#","eventTime":"{t}""#));
    }
    s.push_str(r#","eventSource":"ec2.amazonaws.com","eventName":"DescribeInstances","awsRegion":"us-east-1""#);
    if let Some(ip) = ip {
        s.push_str(&format!(r#","sourceIPAddress":"{ip}""#));
    }
    s.push_str(extra);
    s.push_str(&format!(
        r#","eventID":"{id}","readOnly":true,"eventType":"AwsApiCall","managementEvent":true,"recipientAccountId":"111122223333","eventCategory":"Management"}}"#
    ));
    s
}

fn records(events: &[String]) -> String {
    format!("{{\"Records\":[{}]}}", events.join(","))
}

fn put(dir: &Path, rel: &str, bytes: &[u8]) {
    let p = dir.join(rel);
    std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
    std::fs::write(p, bytes).expect("write fixture");
}

const DAY: &str = "AWSLogs/111122223333/CloudTrail/us-east-1/2024/03/18";

/// Writes the fixture tree under `dir` and returns what it expects.
pub fn write_all(dir: &Path) -> Expected {
    let mut exp = Expected::default();
    let keep = |exp: &mut Expected, id: &str, raw: &str| {
        exp.events.insert(id.to_owned(), raw.to_owned());
    };

    // An account trail file: every kind of source address, unicode and escapes, a large
    // requestParameters, a missing and a malformed eventTime.
    let big = format!(
        r#","requestParameters":{{"policyDocument":"{}","nested":{{"a":[{{"b":[1,2,{{"c":"deep"}}]}}]}}}}"#,
        "x".repeat(100_000)
    );
    let file1 = vec![
        event(
            "ev-london",
            Some("2024-03-18T14:05:00Z"),
            Some("81.2.69.160"),
            "",
        ),
        event(
            "ev-tokyo-v6",
            Some("2024-03-18T14:06:00Z"),
            Some("2001:db8:1::5"),
            "",
        ),
        event(
            "ev-aws-internal",
            Some("2024-03-18T14:07:00Z"),
            Some("AWS Internal"),
            "",
        ),
        event(
            "ev-lambda",
            Some("2024-03-18T14:08:00Z"),
            Some("lambda.amazonaws.com"),
            "",
        ),
        event(
            "ev-amazon-country-only",
            Some("2024-03-18T14:09:00Z"),
            Some("72.21.198.64"),
            "",
        ),
        event(
            "ev-unknown-ip",
            Some("2024-03-18T14:10:00Z"),
            Some("198.51.100.7"),
            "",
        ),
        event("ev-no-ip", Some("2024-03-18T14:11:00Z"), None, ""),
        event(
            "ev-unicode",
            Some("2024-03-18T14:12:00Z"),
            Some("89.160.20.112"),
            r#","requestParameters":{"description":"Zürich ☃ 東京 \"quoted\" \t tab \u00e9 \\ back","emoji":"🚀"}"#,
        ),
        event(
            "ev-big",
            Some("2024-03-18T14:13:00Z"),
            Some("216.160.83.56"),
            &big,
        ),
        event("ev-no-time", None, Some("81.2.69.160"), ""),
        event(
            "ev-bad-time",
            Some("yesterday at noon"),
            Some("81.2.69.160"),
            "",
        ),
        event(
            "ev-offset-time",
            Some("2024-03-18T16:30:00+02:00"),
            Some("81.2.69.160"),
            "",
        ),
    ];
    for e in &file1 {
        let id = serde_json::from_str::<serde_json::Value>(e).expect("fixture is JSON")["eventID"]
            .as_str()
            .expect("id")
            .to_owned();
        keep(&mut exp, &id, e);
    }
    put(
        dir,
        &format!("{DAY}/111122223333_CloudTrail_us-east-1_20240318T1410Z_fileone.json.gz"),
        &gzip(records(&file1).as_bytes()),
    );

    // An organization trail path, another region and hour.
    let org = vec![event(
        "ev-org-1",
        Some("2024-03-18T15:25:00Z"),
        Some("89.160.20.112"),
        "",
    )];
    keep(&mut exp, "ev-org-1", &org[0]);
    put(
        dir,
        "AWSLogs/o-abc123def4/444455556666/CloudTrail/eu-west-1/2024/03/18/444455556666_CloudTrail_eu-west-1_20240318T1525Z_org.json.gz",
        &gzip(records(&org).as_bytes()),
    );

    // An Insights file is processed like any other.
    let insight = r#"{"eventVersion":"1.08","eventTime":"2024-03-18T14:00:00Z","awsRegion":"us-east-1","eventID":"ev-insight","eventType":"AwsCloudTrailInsight","recipientAccountId":"111122223333","insightDetails":{"state":"Start","eventSource":"ec2.amazonaws.com","eventName":"RunInstances","insightType":"ApiCallRateInsight"},"eventCategory":"Insight"}"#;
    keep(&mut exp, "ev-insight", insight);
    put(
        dir,
        "AWSLogs/111122223333/CloudTrail-Insight/us-east-1/2024/03/18/111122223333_CloudTrail-Insight_us-east-1_20240318T1400Z_ins.json.gz",
        &gzip(format!("{{\"Records\":[{insight}]}}").as_bytes()),
    );

    // A digest file: skipped, neither events nor an error. One named like CloudTrail's, one
    // recognised only by content.
    let digest = br#"{"awsAccountId":"111122223333","digestStartTime":"2024-03-18T14:00:00Z","digestSignatureAlgorithm":"SHA256withRSA","logFiles":[]}"#;
    put(
        dir,
        "AWSLogs/111122223333/CloudTrail-Digest/us-east-1/2024/03/18/111122223333_CloudTrail-Digest_us-east-1_trail_us-east-1_20240318T150000Z.json.gz",
        &gzip(digest),
    );
    put(
        dir,
        &format!("{DAY}/digest-by-content.json.gz"),
        &gzip(digest),
    );

    // A plain .json file and a pretty-printed one.
    let plain = event(
        "ev-plain-json",
        Some("2024-03-18T14:20:00Z"),
        Some("81.2.69.160"),
        "",
    );
    keep(&mut exp, "ev-plain-json", &plain);
    put(
        dir,
        &format!("{DAY}/plain.json"),
        records(&[plain]).as_bytes(),
    );
    let pretty = "{\n  \"Records\": [\n    {\n      \"eventID\": \"ev-pretty\",\n      \"eventTime\": \"2024-03-18T14:21:00Z\",\n      \"sourceIPAddress\": \"81.2.69.160\",\n      \"requestParameters\": {\r\n        \"a\": [1,\n 2]\n      }\n    }\n  ]\n}\n";
    exp.pretty_ids.push("ev-pretty".into());
    put(
        dir,
        &format!("{DAY}/pretty.json.gz"),
        &gzip(pretty.as_bytes()),
    );

    // Hostile files.
    let bad = "bad";
    let mixed = vec![
        event(
            "ev-mixed-good-1",
            Some("2024-03-18T14:30:00Z"),
            Some("81.2.69.160"),
            "",
        ),
        r#""a string, not an event""#.to_owned(),
        "42".to_owned(),
        "null".to_owned(),
        event(
            "ev-mixed-good-2",
            Some("2024-03-18T14:31:00Z"),
            Some("81.2.69.160"),
            "",
        ),
    ];
    keep(&mut exp, "ev-mixed-good-1", &mixed[0]);
    keep(&mut exp, "ev-mixed-good-2", &mixed[4]);
    put(
        dir,
        &format!("{bad}/mixed-records.json.gz"),
        &gzip(records(&mixed).as_bytes()),
    );
    exp.bad_files
        .insert("mixed-records.json.gz", "not_an_object");

    let not_gzip = event(
        "ev-not-gzip",
        Some("2024-03-18T14:40:00Z"),
        Some("81.2.69.160"),
        "",
    );
    keep(&mut exp, "ev-not-gzip", &not_gzip);
    put(
        dir,
        &format!("{bad}/not-gzip.json.gz"),
        records(&[not_gzip]).as_bytes(),
    );
    exp.bad_files.insert("not-gzip.json.gz", "not_gzip");

    put(
        dir,
        &format!("{bad}/no-records.json.gz"),
        &gzip(br#"{"Events":[{"eventID":"lost"}]}"#),
    );
    exp.bad_files.insert("no-records.json.gz", "no_records");
    put(
        dir,
        &format!("{bad}/records-not-array.json.gz"),
        &gzip(br#"{"Records":{"eventID":"x"}}"#),
    );
    exp.bad_files
        .insert("records-not-array.json.gz", "records_not_array");
    put(dir, &format!("{bad}/empty-object.json.gz"), &gzip(b"{}"));
    exp.bad_files.insert("empty-object.json.gz", "no_records");
    put(
        dir,
        &format!("{bad}/not-json.json.gz"),
        &gzip(b"this is not json\n"),
    );
    exp.bad_files.insert("not-json.json.gz", "not_json");
    put(dir, &format!("{bad}/empty.json.gz"), b"");
    exp.bad_files.insert("empty.json.gz", "empty");
    let mut corrupt = gzip(records(&[event("x", None, None, "")]).as_bytes());
    for b in corrupt.iter_mut().skip(12).take(20) {
        *b ^= 0xa5;
    }
    put(dir, &format!("{bad}/corrupt.json.gz"), &corrupt);
    exp.bad_files.insert("corrupt.json.gz", "gzip_corrupt");

    // Truncated: enough whole events before the cut that some are kept.
    let trunc: Vec<String> = (0..200)
        .map(|i| {
            let id = format!("ev-trunc-{i:03}");
            exp.truncated_ids.push(id.clone());
            event(&id, Some("2024-03-18T14:50:00Z"), Some("81.2.69.160"), "")
        })
        .collect();
    let gz = gzip_level(records(&trunc).as_bytes(), Compression::none());
    put(
        dir,
        &format!("{bad}/truncated.json.gz"),
        &gz[..gz.len() / 2],
    );
    exp.bad_files.insert("truncated.json.gz", "truncated");
    exp
}
