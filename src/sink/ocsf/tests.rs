//! The golden cases (`tests/ocsf/cases/*.json`, CloudTrail events written for these tests) map
//! to the records checked in beside them (`tests/ocsf/expected/`); the end-to-end test
//! (`tests/ocsf.rs`) validates those records and the binary's output against the OCSF schema.
//! `TRAILHOSE_BLESS=1 cargo test --lib ocsf` rewrites the expected records after a reviewed change.

use std::path::PathBuf;

use serde_json::{Value, json};

use super::*;

/// 2024-03-18T14:10:00Z, the time of records without a usable one.
const NOW: i64 = 1_710_771_000;

fn dir(sub: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/ocsf")
        .join(sub)
}

fn map_with(raw: &[u8], additions: &[&[u8]], cfg: &OcsfConfig) -> Value {
    let mut out = b"previous line\n".to_vec();
    encode_event(&mut out, raw, additions, NOW, cfg);
    let line = out.strip_prefix(b"previous line\n".as_slice()).unwrap();
    assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
    assert_eq!(line.last(), Some(&b'\n'));
    serde_json::from_slice(line).unwrap()
}

fn map(raw: &[u8]) -> Value {
    map_with(raw, &[], &OcsfConfig::default())
}

fn case(name: &str) -> Value {
    let raw = std::fs::read(dir("cases").join(format!("{name}.json"))).unwrap();
    map(raw.trim_ascii_end())
}

fn at<'a>(v: &'a Value, path: &str) -> &'a Value {
    path.split('.').fold(v, |v, k| match k.parse::<usize>() {
        Ok(i) => &v[i],
        Err(_) => &v[k],
    })
}

/// What every record carries, whatever its input: the attributes the schema requires.
fn assert_required(r: &Value) {
    for k in [
        "time",
        "class_uid",
        "category_uid",
        "activity_id",
        "type_uid",
        "severity_id",
        "metadata.version",
        "metadata.product.vendor_name",
        "cloud.provider",
    ] {
        assert!(!at(r, k).is_null(), "{k} missing in {r}");
    }
    let class = r["class_uid"].as_u64().unwrap();
    assert_eq!(
        r["type_uid"].as_u64().unwrap(),
        class * 100 + r["activity_id"].as_u64().unwrap()
    );
    assert_eq!(r["category_uid"].as_u64().unwrap(), class / 1000);
    match class {
        6003 => {
            assert!(r["api"]["operation"].is_string(), "{r}");
            assert!(
                r["actor"].is_object() && r["src_endpoint"].is_object(),
                "{r}"
            );
        }
        3001 | 3002 => {
            let u = &r["user"];
            assert!(
                !u["name"].is_null() || !u["uid"].is_null() || !u["account"].is_null(),
                "{r}"
            );
        }
        other => panic!("class {other}"),
    }
    if let Some(u) = r["unmapped"].as_object() {
        assert!(u.values().all(Value::is_string), "{r}");
    }
}

#[test]
fn golden_cases_map_to_their_checked_in_records() {
    let bless = std::env::var("TRAILHOSE_BLESS").is_ok_and(|v| v == "1");
    // A CI run compares; it never rewrites what it compares against.
    assert!(
        !(bless && std::env::var_os("CI").is_some()),
        "TRAILHOSE_BLESS is refused under CI"
    );
    let mut names: Vec<String> = std::fs::read_dir(dir("cases"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter_map(|n| n.strip_suffix(".json").map(str::to_owned))
        .collect();
    names.sort();
    assert_eq!(names.len(), 12, "{names:?}");
    for name in names {
        let got = case(&name);
        assert_required(&got);
        let path = dir("expected").join(format!("{name}.json"));
        if bless {
            std::fs::create_dir_all(dir("expected")).unwrap();
            let text = serde_json::to_string_pretty(&got).unwrap();
            std::fs::write(&path, text + "\n").unwrap();
            continue;
        }
        let want: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(
            got,
            want,
            "{name}: got {}",
            serde_json::to_string_pretty(&got).unwrap()
        );
    }
}

#[test]
fn console_sign_ins_are_authentication_with_mfa_and_failure() {
    let ok = case("console_login_mfa");
    assert_eq!(ok["class_uid"], 3002);
    assert_eq!(ok["type_uid"], 300201);
    assert_eq!(ok["activity_name"], "Logon");
    assert_eq!(ok["is_mfa"], true);
    assert_eq!(ok["status_id"], 1);
    assert_eq!(ok["user"]["name"], "alice");
    assert_eq!(ok["user"]["uid"], "arn:aws:iam::111122223333:user/alice");
    assert_eq!(ok["src_endpoint"]["ip"], "81.2.69.160");
    assert_eq!(ok["service"]["name"], "signin.amazonaws.com");
    assert_eq!(ok["time"], json!(NOW * 1000));
    assert_eq!(ok["metadata"]["uid"], "ocsf-0001-console-mfa");
    assert_eq!(ok["metadata"]["original_time"], "2024-03-18T14:10:00Z");
    assert_eq!(ok["metadata"]["product"]["version"], "1.08");
    assert_eq!(ok["metadata"]["event_code"], "ConsoleLogin");
    assert_eq!(ok["metadata"]["log_name"], "Management");
    assert!(
        ok["unmapped"]["tlsDetails"]
            .as_str()
            .unwrap()
            .contains("TLSv1.3")
    );
    assert!(
        ok["unmapped"]["additionalEventData"]
            .as_str()
            .unwrap()
            .contains("MFAUsed")
    );

    let failed = case("console_login_failed");
    assert_eq!(failed["class_uid"], 3002);
    assert_eq!(failed["status_id"], 2);
    assert_eq!(failed["status"], "Failure");
    assert_eq!(failed["status_detail"], "Failed authentication");
    assert_eq!(failed["is_mfa"], false);
    assert_eq!(failed["src_endpoint"]["ip"], "2001:db8::7");
}

#[test]
fn assume_role_with_saml_signs_in_the_role_session() {
    let r = case("assume_role_with_saml");
    assert_eq!(r["class_uid"], 3002);
    assert_eq!(r["auth_protocol_id"], 5);
    assert_eq!(
        r["user"]["uid"],
        "arn:aws:sts::111122223333:assumed-role/Admins/carol@example.com"
    );
    assert_eq!(r["user"]["credential_uid"], "ASIAEXAMPLESAML0001");
    assert_eq!(r["user"]["name"], "carol@example.com");
    assert_eq!(r["actor"]["idp"]["name"], "Xo1bZEXAMPLE=");
    assert_eq!(r["actor"]["user"]["type"], "SAMLUser");
    assert_eq!(r["session"]["issuer"], "http://www.okta.com/exk123");
    // The cloud profile's `api` is every class's, as in AWS's mapping.
    assert_eq!(r["api"]["operation"], "AssumeRoleWithSAML");
    assert_eq!(r["api"]["service"]["name"], "sts.amazonaws.com");
    assert!(r["api"]["request"]["uid"].is_string());
    assert!(r["unmapped"]["requestID"].is_null());
}

#[test]
fn iam_changes_are_account_changes_of_their_target() {
    let r = case("create_user");
    assert_eq!(r["class_uid"], 3001);
    assert_eq!(r["type_uid"], 300101);
    assert_eq!(r["user"]["name"], "dave");
    assert_eq!(r["user"]["uid"], "arn:aws:iam::111122223333:user/dave");
    assert_eq!(r["user"]["uid_alt"], "AIDAEXAMPLEDAVE00004");
    assert_eq!(r["actor"]["user"]["name"], "Admins");
    assert_eq!(r["actor"]["session"]["is_mfa"], false);
    assert_eq!(
        r["actor"]["session"]["issuer"],
        "arn:aws:iam::111122223333:role/Admins"
    );
    assert_eq!(r["unmapped"]["sessionCredentialFromConsole"], "true");
    assert_eq!(r["api"]["operation"], "CreateUser");
    assert_eq!(r["api"]["service"]["name"], "iam.amazonaws.com");

    let k = case("create_access_key");
    assert_eq!(k["class_uid"], 3001);
    assert_eq!(k["activity_id"], 99);
    assert_eq!(k["activity_name"], "CreateAccessKey");
    assert_eq!(k["type_name"], "Account Change: Other");
    assert_eq!(k["user"]["name"], "dave");
    assert_eq!(k["user"]["credential_uid"], "AKIAEXAMPLEDAVE0001");
    assert_eq!(k["actor"]["user"]["credential_uid"], "AKIAEXAMPLEALICE001");
}

#[test]
fn api_calls_data_events_denials_insights_and_service_callers() {
    let g = case("get_object_data_event");
    assert_eq!(g["class_uid"], 6003);
    assert_eq!(g["type_uid"], 600302);
    assert_eq!(g["api"]["operation"], "GetObject");
    assert_eq!(g["api"]["service"]["name"], "s3.amazonaws.com");
    assert_eq!(g["api"]["request"]["uid"], "EXAMPLE0006");
    assert_eq!(g["resources"][0]["uid"], "arn:aws:s3:::reports/2024/q1.csv");
    assert_eq!(g["resources"][1]["owner"]["account"]["uid"], "111122223333");
    assert_eq!(g["src_endpoint"]["uid"], "vpce-0123456789abcdef0");
    assert_eq!(g["cloud"]["region"], "eu-west-1");
    assert_eq!(g["cloud"]["account"]["uid"], "111122223333");
    assert_eq!(g["metadata"]["log_name"], "Data");
    assert_eq!(
        g["metadata"]["correlation_uid"],
        "5b3a2c1d-0000-4000-8000-000000000006"
    );
    assert_eq!(
        g["unmapped"]["userIdentity.sessionContext.ec2RoleDelivery"],
        "2.0"
    );

    let d = case("access_denied");
    assert_eq!(d["activity_id"], 4);
    assert_eq!(d["status_id"], 2);
    assert_eq!(d["status_code"], "Client.UnauthorizedOperation");
    assert_eq!(
        d["api"]["response"]["error"],
        "Client.UnauthorizedOperation"
    );
    assert!(
        d["status_detail"]
            .as_str()
            .unwrap()
            .contains("not authorized")
    );

    let i = case("insight");
    assert_eq!(i["class_uid"], 6003);
    assert_eq!(i["activity_id"], 99);
    assert_eq!(i["activity_name"], "Insight");
    assert_eq!(i["severity_id"], 2);
    assert_eq!(i["api"]["operation"], "RunInstances");
    assert_eq!(i["api"]["service"]["name"], "ec2.amazonaws.com");
    assert_eq!(i["actor"]["invoked_by"], "cloudtrail.amazonaws.com");
    assert!(
        i["unmapped"]["insightDetails"]
            .as_str()
            .unwrap()
            .contains("ApiCallRateInsight")
    );

    let s = case("service_source_ip");
    assert_eq!(
        s["src_endpoint"],
        json!({"svc_name": "cloudtrail.amazonaws.com"})
    );
    assert_eq!(s["actor"]["invoked_by"], "cloudtrail.amazonaws.com");
    assert_eq!(s["http_request"]["user_agent"], "cloudtrail.amazonaws.com");
}

#[test]
fn geo_becomes_the_location_and_what_has_no_place_stays_unmapped() {
    let raw = br#"{"eventSource":"ec2.amazonaws.com","eventName":"DescribeRegions","sourceIPAddress":"81.2.69.160"}"#;
    let geo = br#""geo":{"latitude":51.5142,"longitude":-0.0931,"city":"London","subdivision_isocode":"ENG","country":"United Kingdom","country_isocode":"GB","asn":64512,"as_org":"Example Net"}"#;
    let r = map_with(raw, &[geo.as_slice()], &OcsfConfig::default());
    assert_eq!(
        r["src_endpoint"]["location"],
        json!({"coordinates": [-0.0931, 51.5142], "city": "London", "country": "GB", "region": "ENG", "isp": "Example Net"})
    );
    assert_eq!(r["unmapped"]["geo.asn"], "64512");
    assert_eq!(r["unmapped"]["geo.country"], "United Kingdom");
    assert_required(&r);
}

#[test]
fn raw_data_is_kept_only_when_asked() {
    let raw = br#"{"eventName":"ListBuckets","eventSource":"s3.amazonaws.com"}"#;
    assert!(map(raw)["raw_data"].is_null());
    let cfg = OcsfConfig { raw_data: true };
    let r = map_with(raw, &[br#""geo":{"city":"X"}"#.as_slice()], &cfg);
    assert_eq!(r["raw_data"], std::str::from_utf8(raw).unwrap());
}

#[test]
fn the_arrival_time_dates_an_event_without_a_usable_one() {
    let r = map(
        br#"{"eventTime":"2024-02-30T00:00:00Z","trailhoseArrivalTime":"2024-03-18T15:00:00Z"}"#,
    );
    assert_eq!(r["time"], json!((NOW + 3000) * 1000));
    assert_eq!(r["metadata"]["original_time"], "2024-02-30T00:00:00Z");
    assert_eq!(
        r["unmapped"]["trailhoseArrivalTime"],
        "2024-03-18T15:00:00Z"
    );
    assert_eq!(map(b"{}")["time"], json!(NOW * 1000));
    assert!(map(b"{}").get("unmapped").is_none());
    // A forged year is as unusable as a malformed time: `time` is the arrival's, as the
    // partition is, and the event's own text stays in `original_time`.
    for forged in [
        "0000-01-01T00:00:00Z",
        "2012-12-31T23:59:59Z",
        "9999-12-31T23:59:59Z",
    ] {
        let raw =
            format!(r#"{{"eventTime":"{forged}","trailhoseArrivalTime":"2024-03-18T15:00:00Z"}}"#);
        let r = map(raw.as_bytes());
        assert_eq!(r["time"], json!((NOW + 3000) * 1000), "{forged}");
        assert_eq!(r["metadata"]["original_time"], forged);
        let r = map(format!(r#"{{"eventTime":"{forged}"}}"#).as_bytes());
        assert_eq!(r["time"], json!(NOW * 1000), "{forged}");
    }
    // Up to a day ahead of the arrival is clock skew, not forgery.
    let r = map(br#"{"eventTime":"2024-03-19T14:10:00Z"}"#);
    assert_eq!(r["time"], json!((NOW + 86_400) * 1000));
}

#[test]
fn any_input_gives_a_complete_record() {
    let inputs: &[&[u8]] = &[
        b"{}",
        b"[]",
        b"not json",
        b"",
        br#"{"userIdentity":"x","resources":{"a":1},"eventTime":5,"geo":[1],"eventSource":7,"errorCode":null}"#,
        br#"{"userIdentity":{"sessionContext":{"attributes":{"mfaAuthenticated":true,"creationDate":"bad"},"sessionIssuer":"x"}}}"#,
        br#"{"resources":[{"ARN":5},{"type":"t"}],"sourceIPAddress":"999.1.1.1"}"#,
        br#"{"eventSource":"iam.amazonaws.com","eventName":"CreateUser","requestParameters":"x","responseElements":[1]}"#,
        br#"{"eventSource":"iam.amazonaws.com","eventName":"AttachRolePolicy","requestParameters":{"roleName":"r","policyArn":"arn:aws:iam::aws:policy/ReadOnlyAccess"}}"#,
        br#"{"eventSource":"sts.amazonaws.com","eventName":"AssumeRole","responseElements":{"assumedRoleUser":7}}"#,
        br#"{"eventSource":"signin.amazonaws.com","eventName":"ConsoleLogin","responseElements":{"ConsoleLogin":["Failure"]}}"#,
        br#"{"eventType":"AwsCloudTrailInsight","insightDetails":"x"}"#,
        br#"{"eventName":"","geo":{"latitude":"n","longitude":1}}"#,
    ];
    for raw in inputs {
        let r = map(raw);
        assert_required(&r);
        let parsed = serde_json::from_slice::<Map<String, Value>>(raw).is_ok();
        assert_eq!(r["raw_data"].is_string(), !parsed, "{r}");
    }
    let p = map(inputs[8]);
    assert_eq!(p["activity_id"], 7);
    assert_eq!(p["policy"]["name"], "ReadOnlyAccess");
    assert_eq!(p["user"]["name"], "r");
}

#[test]
fn a_refused_sign_in_names_the_role_asked_for_not_the_caller() {
    let caller = r#""userIdentity":{"type":"IAMUser","arn":"arn:aws:iam::111122223333:user/bob","userName":"bob","accessKeyId":"AKIABOB","accountId":"111122223333"}"#;
    let role = format!(
        r#"{{"eventSource":"sts.amazonaws.com","eventName":"AssumeRole","errorCode":"AccessDenied",{caller},"requestParameters":{{"roleArn":"arn:aws:iam::444455556666:role/Admin","roleSessionName":"s1"}},"responseElements":null}}"#
    );
    let r = map(role.as_bytes());
    assert_required(&r);
    assert_eq!(r["status_id"], 2);
    assert_eq!(
        r["user"],
        json!({"uid": "arn:aws:iam::444455556666:role/Admin", "name": "s1"})
    );
    assert_eq!(r["actor"]["user"]["name"], "bob");
    let fed = format!(
        r#"{{"eventSource":"sts.amazonaws.com","eventName":"GetFederationToken","errorCode":"AccessDenied",{caller},"requestParameters":{{"name":"partner"}}}}"#
    );
    let r = map(fed.as_bytes());
    // The caller's own identity, not relabelled with the name it asked for.
    assert_eq!(r["user"]["uid"], "arn:aws:iam::111122223333:user/bob");
    assert_eq!(r["user"]["name"], "bob");
    assert!(r["user"]["credential_uid"].is_null());
}

#[test]
fn identity_center_sign_ins_are_authentication() {
    let ok = case("identity_center_sign_in");
    assert_eq!(ok["class_uid"], 3002);
    assert_eq!(
        (ok["activity_id"].clone(), ok["type_uid"].clone()),
        (json!(1), json!(300201))
    );
    assert_eq!(ok["status_id"], 1);
    assert_eq!(ok["user"]["name"], "erin");
    assert_eq!(ok["user"]["type"], "IdentityCenterUser");
    assert_eq!(ok["user"]["account"]["uid"], "111122223333");
    assert_eq!(ok["service"]["name"], "signin.amazonaws.com");
    assert!(
        ok.get("is_mfa").is_none(),
        "a password is not a second factor: {ok}"
    );

    let failed = case("identity_center_mfa_failed");
    assert_eq!(failed["class_uid"], 3002);
    assert_eq!(failed["activity_id"], 99);
    assert_eq!(failed["activity_name"], "CredentialVerification");
    assert_eq!(failed["status_id"], 2, "serviceEventDetails says Failure");
    assert_eq!(failed["is_mfa"], true);
    assert_eq!(failed["user"]["name"], "erin");
}

#[test]
fn detections_become_enrichments_and_raise_the_severity() {
    let r = case("detected_access_key");
    let e = r["enrichments"].as_array().expect("enrichments");
    assert_eq!(e.len(), 2);
    assert_eq!(e[0]["name"], "detections");
    assert_eq!(e[0]["value"], "6a4ab7a5-0e9a-4f39-8b0c-5a1b5b0f1f01");
    assert_eq!(e[0]["type"], "sigma");
    assert_eq!(e[0]["provider"], "trailhose");
    assert_eq!(e[0]["data"]["title"], "Access key created for another user");
    assert_eq!(e[1]["data"]["level"], "medium");
    assert_eq!(
        (r["severity_id"].clone(), r["severity"].clone()),
        (json!(4), json!("High"))
    );
    assert!(r["unmapped"].get("detections").is_none(), "{r}");
    // Spliced in by the detect stage, as the pipeline does.
    let raw = std::fs::read(dir("cases").join("create_access_key.json")).unwrap();
    let spliced = map_with(
        raw.trim_ascii_end(),
        &[br#""detections":[{"id":"r1","title":"T","level":"low"}]"#.as_slice()],
        &OcsfConfig::default(),
    );
    assert_eq!(spliced["enrichments"][0]["value"], "r1");
    assert_eq!(spliced["severity_id"], 2);
    // A transform's own `detections` of another shape stays in unmapped.
    let odd = map_with(
        raw.trim_ascii_end(),
        &[br#""detections":"none""#.as_slice()],
        &OcsfConfig::default(),
    );
    assert!(odd.get("enrichments").is_none());
    assert_eq!(odd["unmapped"]["detections"], "none");
    assert_eq!(odd["severity_id"], 1);
}

/// Every string outside `unmapped`/`raw_data`/an enrichment's `data`, by path.
fn strings<'a>(v: &'a Value, at: String, out: &mut Vec<(String, &'a str)>) {
    match v {
        Value::String(s) => out.push((at, s)),
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                strings(x, format!("{at}.{i}"), out);
            }
        }
        Value::Object(o) => {
            for (k, x) in o {
                if !matches!(k.as_str(), "unmapped" | "raw_data" | "data") {
                    strings(x, format!("{at}.{k}"), out);
                }
            }
        }
        _ => {}
    }
}

#[test]
fn empty_strings_are_never_written_as_ids_names_or_values() {
    // CloudTrail writes "" for what it does not know (a failed sign-in's arn and key).
    let blank = br#"{"eventVersion":"","eventID":"","eventTime":"","eventSource":"sts.amazonaws.com","eventName":"AssumeRole","awsRegion":"","recipientAccountId":"","requestID":"","sourceIPAddress":"","userAgent":"","errorCode":"","errorMessage":"","userIdentity":{"type":"","arn":"","principalId":"","accountId":"","accessKeyId":"","userName":"","invokedBy":"","identityProvider":"","sessionContext":{"sessionIssuer":{"arn":"","userName":""}}},"requestParameters":{"roleArn":"","roleSessionName":""},"responseElements":{"assumedRoleUser":{"arn":"","assumedRoleId":""},"credentials":{"accessKeyId":""}},"resources":[{"ARN":"","type":"","accountId":""}]}"#;
    let iam = br#"{"eventSource":"iam.amazonaws.com","eventName":"CreateAccessKey","requestParameters":{"userName":""},"responseElements":{"accessKey":{"accessKeyId":""}},"userIdentity":{"arn":"","userName":"u"}}"#;
    let mut records: Vec<Value> = [blank.as_slice(), iam.as_slice()]
        .into_iter()
        .map(map)
        .collect();
    records.push(case("identity_center_mfa_failed"));
    records.push(case("console_login_failed"));
    for r in &records {
        assert_required(r);
        let mut found = Vec::new();
        strings(r, String::new(), &mut found);
        let empty: Vec<&String> = found
            .iter()
            .filter(|(_, s)| s.is_empty())
            .map(|(p, _)| p)
            .collect();
        assert!(empty.is_empty(), "empty strings at {empty:?} in {r}");
    }
    let failed = case("identity_center_mfa_failed");
    assert!(failed["user"].get("uid").is_none(), "{failed}");
    assert!(failed["actor"]["user"].get("credential_uid").is_none());
    assert_eq!(failed["user"]["name"], "erin");
}

/// An event nested deeper than serde_json parses (128) is still routed by its head (which
/// skips nested values without a limit): its record must be of the same class, from the
/// routing fields, with the event kept whole in raw_data.
#[test]
fn an_event_too_deep_to_parse_keeps_the_class_it_is_routed_by() {
    let deep = format!("{}1{}", "[".repeat(200), "]".repeat(200));
    let raw = format!(
        r#"{{"eventVersion":"1.08","eventTime":"2024-03-18T10:00:00Z","eventSource":"signin.amazonaws.com","eventName":"ConsoleLogin","eventType":"AwsConsoleSignIn","eventID":"deep-1","recipientAccountId":"111122223333","awsRegion":"us-east-1","additionalEventData":{deep}}}"#
    );
    assert!(serde_json::from_str::<Value>(&raw).is_err(), "too deep");
    let head = crate::cloudtrail::head_of(raw.as_bytes()).unwrap();
    let routed = super::class::classify(
        head.event_source.as_deref(),
        head.event_name.as_deref(),
        head.event_type.as_deref(),
    );
    let r = map(raw.as_bytes());
    assert_eq!(r["class_uid"], json!(routed.uid()), "{r}");
    assert_eq!(r["class_uid"], json!(3002), "{r}");
    assert_eq!(r["metadata"]["uid"], "deep-1", "{r}");
    assert_eq!(r["raw_data"].as_str(), Some(raw.as_str()));
    assert_eq!(r["time"], json!(1_710_756_000_000i64), "{r}");
}
