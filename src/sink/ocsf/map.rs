//! The mapping of one CloudTrail event (a JSON object) to one OCSF 1.1.0 record. Fields are
//! taken out of the event as they are mapped; whatever is left goes to `unmapped`, so nothing
//! is lost and the record never holds a key its class does not define. Total: any object (even
//! an empty one) becomes a record that carries every attribute its class requires.

use std::net::IpAddr;

use serde_json::{Map, Value, json};

use super::class::{self, Activity, Class};
use crate::clock::Utc;
use crate::sink::partition::{ARRIVAL_FIELD, usable_time};

/// The OCSF version every record declares.
pub const VERSION: &str = "1.1.0";
/// OCSF account type for an AWS account (`account.type_id`).
const AWS_ACCOUNT: u32 = 10;
/// Insights events are flagged as unusual by CloudTrail itself.
const SEVERITY_INFORMATIONAL: u32 = 1;
const SEVERITY_LOW: u32 = 2;

type Obj = Map<String, Value>;

/// Maps `ev` (a CloudTrail event). `now` (Unix seconds) is the time of a record whose own time is
/// missing or malformed; `raw`, when given, is kept whole in `raw_data`.
pub fn to_ocsf(mut ev: Obj, now: i64, raw: Option<&str>) -> Value {
    let event_source = str_of(&ev, "eventSource").map(str::to_owned);
    let event_name = str_of(&ev, "eventName").map(str::to_owned);
    let event_type = str_of(&ev, "eventType");
    let insight = event_type == Some(class::INSIGHT);
    let class = class::classify(event_source.as_deref(), event_name.as_deref(), event_type);
    let mut out = Obj::new();
    let mut unmapped = Obj::new();

    // Time: the event's when usable (the partitioner's rule, so `time` and the partition
    // agree), else the arrival time the pipeline recorded, else now. `original_time` keeps
    // the event's own text either way.
    let original_time = take_str(&mut ev, "eventTime");
    let arrival = take_str(&mut ev, ARRIVAL_FIELD);
    let secs = [original_time.as_deref(), arrival.as_deref()]
        .into_iter()
        .flatten()
        .filter_map(Utc::parse_rfc3339)
        .find(|t| usable_time(*t, now))
        .map(Utc::to_unix)
        .unwrap_or(now);
    out.insert("time".into(), json!(secs.saturating_mul(1000)));
    // The pipeline adds it only to events whose own time was unusable: it stays their flag,
    // as in the CloudTrail schema (`WHERE unmapped['trailhoseArrivalTime'] IS NOT NULL`).
    if let Some(a) = arrival {
        unmapped.insert(ARRIVAL_FIELD.into(), Value::String(a));
    }

    // Status: an errorCode fails any call; a console sign-in says so in its response.
    let error_code = take_str(&mut ev, "errorCode");
    let error_message = take_str(&mut ev, "errorMessage");
    // A sign-in says how it went under its own name: `responseElements.ConsoleLogin`,
    // `serviceEventDetails.UserAuthentication`, ...
    let said = |part: &str| {
        let name = event_name.as_deref()?;
        ev.get(part)?.get(name)?.as_str()
    };
    let console_failed = said("responseElements") == Some("Failure")
        || said("serviceEventDetails") == Some("Failure");
    let failed = error_code.is_some() || console_failed;
    let (status_id, status) = if failed {
        (2, "Failure")
    } else {
        (1, "Success")
    };
    out.insert("status_id".into(), json!(status_id));
    out.insert("status".into(), json!(status));
    put(&mut out, "status_code", error_code.clone());
    put(&mut out, "status_detail", error_message.clone());

    let actor = take_actor(&mut ev, &mut unmapped);
    let actor_user = actor.get("user").cloned();
    // Every class takes `api` (the cloud profile's), as AWS's own CloudTrail mapping has it.
    api_part(&mut out, &mut ev, insight, (error_code, error_message));
    let activity = match class {
        Class::ApiActivity => {
            resources(&mut out, &mut ev);
            if insight {
                Activity {
                    id: class::OTHER,
                    name: "Insight".into(),
                }
            } else {
                let read_only = ev.get("readOnly").and_then(Value::as_bool);
                class::api_activity(event_name.as_deref().unwrap_or("unknown"), read_only)
            }
        }
        Class::Authentication => {
            let sts = event_source.as_deref() == Some("sts.amazonaws.com");
            let name = event_name.as_deref();
            authentication_part(&mut out, &ev, name, sts, actor_user.as_ref());
            if let Some(s) = &event_source {
                out.insert("service".into(), json!({ "name": s }));
            }
            class::authentication_activity(name.unwrap_or(""))
        }
        Class::AccountChange => {
            let name = event_name.as_deref().unwrap_or("");
            account_change_part(&mut out, &ev, name, actor_user.as_ref());
            let key_status = ev
                .get("requestParameters")
                .and_then(|r| r.get("status"))
                .and_then(Value::as_str);
            class::account_change_activity(name, key_status)
        }
    };
    let actor = if actor.is_empty() && class == Class::ApiActivity {
        // API Activity requires an actor; Insights events (and empty identities) have none.
        let by = if insight {
            "cloudtrail.amazonaws.com".to_owned()
        } else {
            event_source.clone().unwrap_or_else(|| "unknown".into())
        };
        let mut a = Obj::new();
        a.insert("invoked_by".into(), json!(by));
        a
    } else {
        actor
    };
    if !actor.is_empty() {
        out.insert("actor".into(), Value::Object(actor));
    }
    src_endpoint(&mut out, &mut ev, &mut unmapped, insight);
    if let Some(ua) = take_str(&mut ev, "userAgent") {
        out.insert("http_request".into(), json!({ "user_agent": ua }));
    }
    cloud(&mut out, &mut ev);
    metadata(&mut out, &mut ev, event_name, original_time);

    out.insert("class_uid".into(), json!(class.uid()));
    out.insert("class_name".into(), json!(class.name()));
    out.insert("category_uid".into(), json!(class.category_uid()));
    out.insert("category_name".into(), json!(class.category_name()));
    out.insert("activity_id".into(), json!(activity.id));
    let caption = if activity.id == class::OTHER {
        "Other"
    } else {
        activity.name.as_str()
    };
    out.insert(
        "type_uid".into(),
        json!(u64::from(class.uid()) * 100 + u64::from(activity.id)),
    );
    out.insert(
        "type_name".into(),
        json!(format!("{}: {caption}", class.name())),
    );
    out.insert("activity_name".into(), json!(activity.name));
    let detected = detections(&mut out, &mut ev);
    let severity = if insight {
        (SEVERITY_LOW, "Low")
    } else {
        (SEVERITY_INFORMATIONAL, "Informational")
    };
    // A Sigma rule's level raises the severity (never lowers it).
    let severity = detected.filter(|d| d.0 > severity.0).unwrap_or(severity);
    out.insert("severity_id".into(), json!(severity.0));
    out.insert("severity".into(), json!(severity.1));
    if insight {
        out.insert("message".into(), json!(insight_message(&ev)));
    }

    // Everything not mapped: top-level keys by name, values as text (strings as they are,
    // anything else as its JSON), as Security Lake's `unmapped` map<string,string> holds them.
    for (k, v) in ev {
        unmapped.insert(k, v);
    }
    if !unmapped.is_empty() {
        let flat: Obj = unmapped
            .into_iter()
            .map(|(k, v)| (k, Value::String(as_text(v))))
            .collect();
        out.insert("unmapped".into(), Value::Object(flat));
    }
    if let Some(raw) = raw {
        out.insert("raw_data".into(), json!(raw));
    }
    Value::Object(out)
}

/// A non-empty string member. CloudTrail writes `""` for what it does not know (a failed
/// sign-in's `arn` and `accessKeyId`): an empty string is no id, name or value.
fn str_of<'a>(m: &'a Obj, k: &str) -> Option<&'a str> {
    m.get(k).and_then(Value::as_str).filter(|s| !s.is_empty())
}

/// Removes `k` when it is a string (any other value stays, for `unmapped`); an empty string
/// is removed and gives None.
fn take_str(m: &mut Obj, k: &str) -> Option<String> {
    if !matches!(m.get(k), Some(Value::String(_))) {
        return None;
    }
    match m.remove(k) {
        Some(Value::String(s)) if !s.is_empty() => Some(s),
        _ => None,
    }
}

/// Removes `k` when it is an object.
fn take_obj(m: &mut Obj, k: &str) -> Option<Obj> {
    if !matches!(m.get(k), Some(Value::Object(_))) {
        return None;
    }
    match m.remove(k) {
        Some(Value::Object(o)) => Some(o),
        _ => None,
    }
}

fn put(m: &mut Obj, k: &str, v: Option<String>) {
    if let Some(v) = v {
        m.insert(k.into(), Value::String(v));
    }
}

fn as_text(v: Value) -> String {
    match v {
        Value::String(s) => s,
        other => other.to_string(),
    }
}

/// A non-empty string at a path of nested objects.
fn path<'a>(v: Option<&'a Value>, keys: &[&str]) -> Option<&'a str> {
    keys.iter()
        .try_fold(v?, |v, k| v.get(k))
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
}

fn account(uid: String) -> Value {
    json!({ "uid": uid, "type": "AWS Account", "type_id": AWS_ACCOUNT })
}

/// OCSF user type: User, Admin (root), System (AWS services), else Other.
fn user_type_id(t: &str) -> u32 {
    match t {
        "IAMUser" | "IdentityCenterUser" | "SAMLUser" | "WebIdentityUser" => 1,
        "Root" => 2,
        "AWSService" => 3,
        _ => 99,
    }
}

/// Whether a user object has what the schema asks of one (an account, a name or a uid).
fn is_user(u: &Obj) -> bool {
    ["account", "name", "uid"]
        .iter()
        .any(|k| u.contains_key(*k))
}

/// `actor` from `userIdentity`: user, session, idp and the invoking service. Keys it does not
/// map go to `unmapped` as `userIdentity.<key>`.
fn take_actor(ev: &mut Obj, unmapped: &mut Obj) -> Obj {
    let mut actor = Obj::new();
    let Some(mut ui) = take_obj(ev, "userIdentity") else {
        return actor;
    };
    let mut user = Obj::new();
    if let Some(t) = take_str(&mut ui, "type") {
        user.insert("type_id".into(), json!(user_type_id(&t)));
        user.insert("type".into(), json!(t));
    }
    put(&mut user, "uid", take_str(&mut ui, "arn"));
    put(&mut user, "uid_alt", take_str(&mut ui, "principalId"));
    put(&mut user, "name", take_str(&mut ui, "userName"));
    put(
        &mut user,
        "credential_uid",
        take_str(&mut ui, "accessKeyId"),
    );
    if let Some(a) = take_str(&mut ui, "accountId") {
        user.insert("account".into(), account(a));
    }
    put(&mut actor, "invoked_by", take_str(&mut ui, "invokedBy"));
    let mut idp = take_str(&mut ui, "identityProvider");
    let mut session = Obj::new();
    if let Some(mut sc) = take_obj(&mut ui, "sessionContext") {
        if let Some(mut attrs) = take_obj(&mut sc, "attributes") {
            if let Some(mfa) = take_str(&mut attrs, "mfaAuthenticated")
                .as_deref()
                .and_then(|m| m.parse::<bool>().ok())
            {
                session.insert("is_mfa".into(), json!(mfa));
            }
            if let Some(t) = take_str(&mut attrs, "creationDate")
                .as_deref()
                .and_then(Utc::parse_rfc3339)
            {
                session.insert(
                    "created_time".into(),
                    json!(t.to_unix().saturating_mul(1000)),
                );
            }
            leftovers(unmapped, "userIdentity.sessionContext.attributes", attrs);
        }
        if let Some(mut issuer) = take_obj(&mut sc, "sessionIssuer") {
            put(&mut session, "issuer", take_str(&mut issuer, "arn"));
            // An assumed role's name is its issuer's.
            if let Some(n) = take_str(&mut issuer, "userName") {
                user.entry("name").or_insert(json!(n));
            }
            leftovers(
                unmapped,
                "userIdentity.sessionContext.sessionIssuer",
                issuer,
            );
        }
        if let Some(mut web) = take_obj(&mut sc, "webIdFederationData") {
            if let Some(p) = take_str(&mut web, "federatedProvider") {
                idp.get_or_insert(p);
            }
            leftovers(
                unmapped,
                "userIdentity.sessionContext.webIdFederationData",
                web,
            );
        }
        leftovers(unmapped, "userIdentity.sessionContext", sc);
    }
    leftovers(unmapped, "userIdentity", ui);
    if is_user(&user) {
        actor.insert("user".into(), Value::Object(user));
    }
    if !session.is_empty() {
        actor.insert("session".into(), Value::Object(session));
    }
    if let Some(name) = idp {
        actor.insert("idp".into(), json!({ "name": name }));
    }
    actor
}

fn leftovers(unmapped: &mut Obj, prefix: &str, rest: Obj) {
    for (k, v) in rest {
        unmapped.insert(format!("{prefix}.{k}"), v);
    }
}

/// `api`: operation, service, version, request and response ids; an Insights event names the
/// API it is about.
fn api_part(
    out: &mut Obj,
    ev: &mut Obj,
    insight: bool,
    (code, message): (Option<String>, Option<String>),
) {
    let mut api = Obj::new();
    let (operation, service) = if insight {
        let d = ev.get("insightDetails");
        (
            path(d, &["eventName"]).map(str::to_owned),
            path(d, &["eventSource"]).map(str::to_owned),
        )
    } else {
        (
            str_of(ev, "eventName").map(str::to_owned),
            take_str(ev, "eventSource"),
        )
    };
    // eventName stays for metadata.event_code too.
    let operation = operation.unwrap_or_else(|| "unknown".into());
    api.insert("operation".into(), json!(operation));
    if let Some(s) = service {
        api.insert("service".into(), json!({ "name": s }));
    }
    put(&mut api, "version", take_str(ev, "apiVersion"));
    if let Some(id) = take_str(ev, "requestID") {
        api.insert("request".into(), json!({ "uid": id }));
    }
    if code.is_some() || message.is_some() {
        let mut resp = Obj::new();
        put(&mut resp, "error", code);
        put(&mut resp, "error_message", message);
        api.insert("response".into(), Value::Object(resp));
    }
    out.insert("api".into(), Value::Object(api));
}

/// `resources` from CloudTrail's list (data events, some management events).
fn resources(out: &mut Obj, ev: &mut Obj) {
    let Some(Value::Array(list)) = ev.get("resources") else {
        return;
    };
    let mut mapped = Vec::new();
    for r in list {
        let Some(arn) = path(Some(r), &["ARN"]) else {
            // An entry without an ARN cannot be named: keep the list as it came.
            return;
        };
        let mut o = Obj::new();
        o.insert("uid".into(), json!(arn));
        if let Some(t) = path(Some(r), &["type"]) {
            o.insert("type".into(), json!(t));
        }
        if let Some(a) = path(Some(r), &["accountId"]) {
            o.insert("owner".into(), json!({ "account": account(a.to_owned()) }));
        }
        mapped.push(Value::Object(o));
    }
    ev.remove("resources");
    if !mapped.is_empty() {
        out.insert("resources".into(), Value::Array(mapped));
    }
}

/// Authentication: who signs in (`user`), with MFA or not, over which protocol. The CloudTrail
/// fields read here stay in the event (request and response go to `unmapped` whole).
fn authentication_part(
    out: &mut Obj,
    ev: &Obj,
    event_name: Option<&str>,
    sts: bool,
    actor_user: Option<&Value>,
) {
    let req = ev.get("requestParameters");
    let resp = ev.get("responseElements");
    let extra = ev.get("additionalEventData");
    let mut user = Obj::new();
    let mut mfa = None;
    match event_name {
        Some(_) if !sts => {
            // The console or IAM Identity Center: who signs in is the actor.
            if let Some(Value::Object(u)) = actor_user {
                user = u.clone();
            }
            if !user.contains_key("name")
                && let Some(n) = path(extra, &["UserName"])
            {
                user.insert("name".into(), json!(n));
            }
            mfa = match path(extra, &["MFAUsed"]) {
                Some("Yes") => Some(true),
                Some("No") => Some(false),
                _ => None,
            };
            // An Identity Center step names the credential asked for: a second factor, or not.
            if let Some(t) = path(extra, &["CredentialType"]) {
                let second = ["TOTP", "WEBAUTHN", "SMS"].contains(&t);
                if second {
                    mfa = Some(true);
                }
            }
        }
        Some(name) => {
            // STS: the identity the credentials are for.
            let assumed = resp.and_then(|r| r.get("assumedRoleUser"));
            let federated = resp.and_then(|r| r.get("federatedUser"));
            let mut own = false;
            if let Some(arn) = path(assumed, &["arn"]).or(path(federated, &["arn"])) {
                user.insert("uid".into(), json!(arn));
                user.insert(
                    "type".into(),
                    json!(if assumed.is_some() {
                        "AssumedRole"
                    } else {
                        "FederatedUser"
                    }),
                );
                user.insert("type_id".into(), json!(99));
            } else if let Some(role) = path(req, &["roleArn"]) {
                // Refused (no credentials issued): the role asked for, never the caller.
                user.insert("uid".into(), json!(role));
            } else if let Some(Value::Object(u)) = actor_user {
                // GetSessionToken, or a refused GetFederationToken: the caller itself.
                user = u.clone();
                own = true;
            }
            if let Some(id) =
                path(assumed, &["assumedRoleId"]).or(path(federated, &["federatedUserId"]))
            {
                user.insert("uid_alt".into(), json!(id));
            }
            if let Some(n) = path(req, &["roleSessionName"])
                .or(path(req, &["name"]))
                .or(path(resp, &["subject"]))
                .filter(|_| !own)
            {
                user.insert("name".into(), json!(n));
            }
            // The credentials issued, not the caller's.
            user.remove("credential_uid");
            if let Some(k) = path(resp, &["credentials", "accessKeyId"]) {
                user.insert("credential_uid".into(), json!(k));
            }
            let protocol = match name {
                "AssumeRoleWithSAML" => Some((5, "SAML")),
                "AssumeRoleWithWebIdentity" => Some((4, "OpenID")),
                _ => None,
            };
            if let Some((id, caption)) = protocol {
                out.insert("auth_protocol_id".into(), json!(id));
                out.insert("auth_protocol".into(), json!(caption));
            }
            if path(req, &["serialNumber"]).is_some() || path(req, &["tokenCode"]).is_some() {
                mfa = Some(true);
            }
            if let Some(issuer) = path(resp, &["issuer"]) {
                out.insert("session".into(), json!({ "issuer": issuer }));
            }
        }
        None => {}
    }
    if !is_user(&user) {
        user.insert("name".into(), json!("unknown"));
    }
    out.insert("user".into(), Value::Object(user));
    if let Some(m) = mfa {
        out.insert("is_mfa".into(), json!(m));
    }
    out.insert("is_remote".into(), json!(true));
}

/// Account Change: the user, role or group changed (`user`), and the policy attached or
/// detached. The target is named in the request; a call on oneself (CreateAccessKey without
/// a userName) changes the actor.
fn account_change_part(out: &mut Obj, ev: &Obj, event_name: &str, actor_user: Option<&Value>) {
    let req = ev.get("requestParameters");
    let resp = ev.get("responseElements");
    let mut user = Obj::new();
    let created = resp.and_then(|r| {
        r.get("user")
            .or_else(|| r.get("role"))
            .or_else(|| r.get("group"))
    });
    if let Some(n) = path(req, &["userName"]) {
        user.insert("name".into(), json!(n));
        user.insert("type".into(), json!("IAMUser"));
        user.insert("type_id".into(), json!(1));
    } else if let Some(n) = path(req, &["roleName"]) {
        user.insert("name".into(), json!(n));
        user.insert("type".into(), json!("Role"));
        user.insert("type_id".into(), json!(99));
    } else if let Some(n) = path(req, &["groupName"]) {
        user.insert("name".into(), json!(n));
        user.insert("type".into(), json!("Group"));
        user.insert("type_id".into(), json!(99));
    } else if let Some(Value::Object(u)) = actor_user {
        user = u.clone();
    }
    if let Some(g) = path(req, &["groupName"]).filter(|_| path(req, &["userName"]).is_some()) {
        user.insert("groups".into(), json!([{ "name": g }]));
    }
    if let Some(arn) = path(created, &["arn"]) {
        user.insert("uid".into(), json!(arn));
    }
    if let Some(id) = path(created, &["userId"]).or(path(created, &["roleId"])) {
        user.insert("uid_alt".into(), json!(id));
    }
    let key = path(resp, &["accessKey", "accessKeyId"]).or(path(req, &["accessKeyId"]));
    // The key changed; for other changes the actor's own key says nothing about the target.
    if key.is_some() || !event_name.contains("AccessKey") {
        user.remove("credential_uid");
    }
    if let Some(k) = key {
        user.insert("credential_uid".into(), json!(k));
    }
    if !user.contains_key("account")
        && let Some(a) = str_of(ev, "recipientAccountId")
    {
        user.insert("account".into(), account(a.to_owned()));
    }
    if !is_user(&user) {
        user.insert("name".into(), json!("unknown"));
    }
    out.insert("user".into(), Value::Object(user));
    let policy_arn = path(req, &["policyArn"]).or(path(req, &["permissionsBoundary"]));
    let policy = match (policy_arn, path(req, &["policyName"])) {
        (Some(arn), _) => {
            Some(json!({ "uid": arn, "name": arn.rsplit('/').next().unwrap_or(arn) }))
        }
        (None, Some(name)) => Some(json!({ "name": name })),
        (None, None) => None,
    };
    if let Some(p) = policy {
        out.insert("policy".into(), p);
    }
}

/// `src_endpoint`: an address, or the name of the AWS service that made the call
/// (`sourceIPAddress` holds either); `geo` becomes its location.
fn src_endpoint(out: &mut Obj, ev: &mut Obj, unmapped: &mut Obj, insight: bool) {
    let mut ep = Obj::new();
    let source = take_str(ev, "sourceIPAddress");
    let (key, value) = match source {
        Some(s) => match s.parse::<IpAddr>() {
            Ok(ip) => ("ip", Some(ip.to_string())),
            Err(_) => ("svc_name", Some(s)),
        },
        None if insight => ("svc_name", Some("cloudtrail.amazonaws.com".to_owned())),
        None => ("svc_name", None),
    };
    put(&mut ep, key, value);
    put(&mut ep, "uid", take_str(ev, "vpcEndpointId"));
    if let Some(mut geo) = take_obj(ev, "geo") {
        let mut loc = Obj::new();
        let lat = geo.get("latitude").and_then(Value::as_f64);
        let lon = geo.get("longitude").and_then(Value::as_f64);
        if let (Some(lat), Some(lon)) = (lat, lon) {
            geo.remove("latitude");
            geo.remove("longitude");
            // GeoJSON order: longitude first.
            loc.insert("coordinates".into(), json!([lon, lat]));
        }
        put(&mut loc, "city", take_str(&mut geo, "city"));
        put(&mut loc, "country", take_str(&mut geo, "country_isocode"));
        put(
            &mut loc,
            "region",
            take_str(&mut geo, "subdivision_isocode"),
        );
        put(&mut loc, "isp", take_str(&mut geo, "as_org"));
        // OCSF 1.1.0 has no place for the AS number or the country's name: they stay as
        // `geo.asn` and `geo.country` in `unmapped`.
        if ["coordinates", "city", "country", "region"]
            .iter()
            .any(|k| loc.contains_key(*k))
        {
            ep.insert("location".into(), Value::Object(loc));
        } else {
            for (k, v) in loc {
                geo.insert(k, v);
            }
        }
        leftovers(unmapped, "geo", geo);
    }
    if !["ip", "svc_name", "uid"]
        .iter()
        .any(|k| ep.contains_key(*k))
    {
        ep.insert("svc_name".into(), json!("unknown"));
    }
    out.insert("src_endpoint".into(), Value::Object(ep));
}

/// `cloud`: AWS, the region, the account the event was delivered to.
fn cloud(out: &mut Obj, ev: &mut Obj) {
    let mut c = Obj::new();
    c.insert("provider".into(), json!("AWS"));
    put(&mut c, "region", take_str(ev, "awsRegion"));
    if let Some(a) = take_str(ev, "recipientAccountId") {
        c.insert("account".into(), account(a));
    }
    out.insert("cloud".into(), Value::Object(c));
}

fn metadata(
    out: &mut Obj,
    ev: &mut Obj,
    event_name: Option<String>,
    original_time: Option<String>,
) {
    let mut product = Obj::new();
    product.insert("name".into(), json!("CloudTrail"));
    product.insert("vendor_name".into(), json!("AWS"));
    put(&mut product, "version", take_str(ev, "eventVersion"));
    let mut m = Obj::new();
    m.insert("version".into(), json!(VERSION));
    m.insert("product".into(), Value::Object(product));
    m.insert("profiles".into(), json!(["cloud"]));
    put(&mut m, "uid", take_str(ev, "eventID"));
    put(&mut m, "original_time", original_time);
    if event_name.is_some() {
        ev.remove("eventName");
    }
    put(&mut m, "event_code", event_name);
    put(&mut m, "correlation_uid", take_str(ev, "sharedEventID"));
    let log_name =
        take_str(ev, "eventCategory").or_else(|| str_of(ev, "eventType").map(str::to_owned));
    put(&mut m, "log_name", log_name);
    m.insert("log_provider".into(), json!("CloudTrail"));
    out.insert("metadata".into(), Value::Object(m));
}

/// The detect stage's `detections` (`[{"id","title","level"}]`, `[detect] annotate = true`)
/// become `enrichments`, one per rule matched: `name` "detections", `value` the rule id, `type`
/// "sigma", `provider` "trailhose", `data` the match. Returns the severity of the highest level.
fn detections(out: &mut Obj, ev: &mut Obj) -> Option<(u32, &'static str)> {
    let Some(Value::Array(hits)) = ev.get("detections") else {
        return None;
    };
    if !hits.iter().all(|h| path(Some(h), &["id"]).is_some()) {
        // Not the detect stage's shape (a transform's field of that name): left in unmapped.
        return None;
    }
    let mut top: Option<(u32, &'static str)> = None;
    let mut list = Vec::with_capacity(hits.len());
    for h in hits {
        let level = match path(Some(h), &["level"]) {
            Some("low") => Some((2, "Low")),
            Some("medium") => Some((3, "Medium")),
            Some("high") => Some((4, "High")),
            Some("critical") => Some((5, "Critical")),
            _ => None,
        };
        match (level, top) {
            (Some(l), Some(t)) if l.0 <= t.0 => {}
            (Some(l), _) => top = Some(l),
            (None, _) => {}
        }
        list.push(json!({
            "name": "detections",
            "value": path(Some(h), &["id"]).unwrap_or(""),
            "type": "sigma",
            "provider": "trailhose",
            "data": h,
        }));
    }
    ev.remove("detections");
    if !list.is_empty() {
        out.insert("enrichments".into(), Value::Array(list));
    }
    top
}

fn insight_message(ev: &Obj) -> String {
    let d = ev.get("insightDetails");
    let part = |k: &str| path(d, &[k]).unwrap_or("?");
    format!(
        "CloudTrail Insights {} {}: {} {}",
        part("insightType"),
        part("state"),
        part("eventSource"),
        part("eventName")
    )
}
