//! SQS message bodies that announce CloudTrail delivery files in S3.
//!
//! Queues can be fed in several ways (CloudTrail → SNS → SQS, with or without raw message
//! delivery; S3 event notifications, direct or through SNS; S3 → EventBridge → SQS), so
//! [`parse`] recognises every shape by its keys and says which one it saw, for metrics. It does
//! no I/O. [`Allowlist`] decides whether the announced objects may be fetched at all.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::fmt;

use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

/// One S3 object a notification announces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectRef {
    pub bucket: String,
    /// The real object key, already URL-decoded where the shape encodes it.
    pub key: String,
    /// Known for S3 events and EventBridge; CloudTrail's own notifications do not carry it.
    pub size: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notification {
    /// Files to process (never empty).
    Objects {
        shape: Shape,
        objects: Vec<ObjectRef>,
    },
    /// Recognised, nothing to fetch: s3:TestEvent, SNS subscription confirmation, a notification
    /// naming only digest files, S3 events that are not ObjectCreated, … .
    /// `reason` is a short snake_case label usable as a metric label (e.g. "s3_test_event").
    Ignorable { shape: Shape, reason: &'static str },
}

impl Notification {
    pub fn shape(&self) -> Shape {
        match self {
            Notification::Objects { shape, .. } | Notification::Ignorable { shape, .. } => *shape,
        }
    }
}

/// How the notification reached us.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// CloudTrail's `{"s3Bucket", "s3ObjectKey": [..]}` inside an SNS envelope.
    CloudTrailSns,
    /// The same, delivered with SNS raw message delivery (no envelope).
    CloudTrailRaw,
    /// S3 event notification (`{"Records": [..]}`) sent straight to SQS.
    S3Event,
    /// S3 event notification inside an SNS envelope.
    S3EventInSns,
    /// S3 "Object Created" (or other S3) event through EventBridge, with or without SNS.
    EventBridge,
    /// `s3:TestEvent`, sent once when a bucket notification is configured.
    S3TestEvent,
    /// An SNS envelope that is not a `Notification` (e.g. `SubscriptionConfirmation`).
    SnsOther,
}

impl Shape {
    /// Snake_case label for metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Shape::CloudTrailSns => "cloudtrail_sns",
            Shape::CloudTrailRaw => "cloudtrail_raw",
            Shape::S3Event => "s3_event",
            Shape::S3EventInSns => "s3_event_in_sns",
            Shape::EventBridge => "eventbridge",
            Shape::S3TestEvent => "s3_test_event",
            Shape::SnsOther => "sns_other",
        }
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a body is not a usable notification. Messages quote at most a short clipped excerpt of
/// the input (never the whole body: bodies can be large, and may hold things we should not log).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NotificationError {
    #[error("body is not JSON ({error}); it starts with {start:?}")]
    NotJson { error: String, start: String },
    #[error("not a recognised notification: {0}")]
    UnknownShape(String),
    #[error("bad SNS envelope: {0}")]
    BadEnvelope(String),
    /// The field is absent, null or empty; the label is a path such as `Records[].s3.object.key`.
    #[error("missing or empty field `{0}`")]
    MissingField(&'static str),
    /// A field has the wrong type; `detail` is serde's (clipped) description.
    #[error("malformed {shape} notification: {detail}")]
    Malformed { shape: Shape, detail: String },
    #[error("object key {key:?} is not valid UTF-8 once URL-decoded")]
    BadKeyEncoding { key: String },
}

impl NotificationError {
    /// Snake_case label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            NotificationError::NotJson { .. } => "not_json",
            NotificationError::UnknownShape(_) => "unknown_shape",
            NotificationError::BadEnvelope(_) => "bad_envelope",
            NotificationError::MissingField(_) => "missing_field",
            NotificationError::Malformed { .. } => "malformed",
            NotificationError::BadKeyEncoding { .. } => "bad_key_encoding",
        }
    }
}

/// Longest excerpt of input quoted in an error message, in characters.
const EXCERPT_CHARS: usize = 80;

fn clip(text: &str) -> String {
    let mut chars = text.chars();
    let mut out: String = chars.by_ref().take(EXCERPT_CHARS).collect();
    if chars.next().is_some() {
        out.push('…');
    }
    out
}

/// Whether a key names a CloudTrail digest file (integrity hashes, not events): skip, don't fetch.
pub fn is_digest_key(key: &str) -> bool {
    let name = key.rsplit_once('/').map_or(key, |(_, name)| name);
    key.contains("/CloudTrail-Digest/") || name.contains("_CloudTrail-Digest_")
}

/// Recognises one SQS message body. `Ok` means the shape is known (whether or not it names
/// files); `Err` means the message cannot be understood and should be dead-lettered.
pub fn parse(body: &str) -> Result<Notification, NotificationError> {
    let value: Value = serde_json::from_str(body).map_err(|e| NotificationError::NotJson {
        error: e.to_string(),
        start: clip(body),
    })?;
    let Value::Object(map) = value else {
        return Err(NotificationError::UnknownShape(format!(
            "the body is a JSON {}, not an object",
            json_kind(&value)
        )));
    };
    match kind_of(&map) {
        Some(Kind::Sns) => parse_sns(&map),
        Some(kind) => parse_payload(kind, map, false),
        None => Err(unknown_object("the body", &map)),
    }
}

/// What a JSON object is, judged by the keys that only that shape has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Sns,
    CloudTrail,
    S3Event,
    EventBridge,
    S3TestEvent,
}

fn kind_of(map: &Map<String, Value>) -> Option<Kind> {
    let has = |key: &str| map.contains_key(key);
    if has("Type") && (has("TopicArn") || has("MessageId")) {
        Some(Kind::Sns)
    } else if has("s3ObjectKey") || has("s3Bucket") {
        Some(Kind::CloudTrail)
    } else if has("Records") {
        Some(Kind::S3Event)
    } else if has("detail-type") && has("source") {
        Some(Kind::EventBridge)
    } else if map.get("Event").and_then(Value::as_str) == Some("s3:TestEvent") {
        Some(Kind::S3TestEvent)
    } else {
        None
    }
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Names the keys (not the values) of an unrecognised object: enough to tell what was sent.
fn unknown_object(what: &str, map: &Map<String, Value>) -> NotificationError {
    if map.is_empty() {
        return NotificationError::UnknownShape(format!("{what} is an empty JSON object"));
    }
    let keys = map
        .keys()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(", ");
    let hint = if map.contains_key("eventVersion") && map.contains_key("eventName") {
        " (a single CloudTrail event, not a file notification?)"
    } else {
        ""
    };
    NotificationError::UnknownShape(format!(
        "{what} is an object with keys [{}]{hint}",
        clip(&keys)
    ))
}

fn parse_sns(envelope: &Map<String, Value>) -> Result<Notification, NotificationError> {
    let Some(sns_type) = envelope.get("Type").and_then(Value::as_str) else {
        return Err(NotificationError::BadEnvelope(
            "Type is not a string".into(),
        ));
    };
    // Confirming subscriptions is left to whoever creates them: visiting a URL taken from a
    // message body is not something a worker should do on its own.
    let reason = match sns_type {
        "Notification" => None,
        "SubscriptionConfirmation" => Some("sns_subscription_confirmation"),
        "UnsubscribeConfirmation" => Some("sns_unsubscribe_confirmation"),
        _ => Some("sns_other_type"),
    };
    if let Some(reason) = reason {
        return Ok(Notification::Ignorable {
            shape: Shape::SnsOther,
            reason,
        });
    }
    let message = match envelope.get("Message") {
        None | Some(Value::Null) => return Err(NotificationError::MissingField("Message")),
        Some(Value::String(message)) => message,
        Some(other) => {
            return Err(NotificationError::BadEnvelope(format!(
                "Message is a JSON {}, not a string",
                json_kind(other)
            )));
        }
    };
    let inner: Value = serde_json::from_str(message).map_err(|e| {
        NotificationError::BadEnvelope(format!(
            "Message is not JSON ({e}); it starts with {:?}",
            clip(message)
        ))
    })?;
    let Value::Object(inner) = inner else {
        return Err(NotificationError::UnknownShape(format!(
            "the SNS Message is a JSON {}, not an object",
            json_kind(&inner)
        )));
    };
    match kind_of(&inner) {
        Some(Kind::Sns) => Err(NotificationError::UnknownShape(
            "an SNS envelope nested inside an SNS Message".into(),
        )),
        Some(kind) => parse_payload(kind, inner, true),
        None => Err(unknown_object("the SNS Message", &inner)),
    }
}

fn parse_payload(
    kind: Kind,
    map: Map<String, Value>,
    in_sns: bool,
) -> Result<Notification, NotificationError> {
    let value = Value::Object(map);
    match kind {
        Kind::CloudTrail => {
            let shape = if in_sns {
                Shape::CloudTrailSns
            } else {
                Shape::CloudTrailRaw
            };
            parse_cloudtrail(value, shape)
        }
        Kind::S3Event => {
            let shape = if in_sns {
                Shape::S3EventInSns
            } else {
                Shape::S3Event
            };
            parse_s3_event(value, shape)
        }
        // EventBridge can also target SNS; the payload is the same, so it keeps its shape.
        Kind::EventBridge => parse_eventbridge(value),
        Kind::S3TestEvent => Ok(Notification::Ignorable {
            shape: Shape::S3TestEvent,
            reason: "s3_test_event",
        }),
        Kind::Sns => Err(NotificationError::UnknownShape(
            "an SNS envelope where a payload was expected".into(),
        )),
    }
}

// Typed views of each payload. Fields the shape needs are `Option` so that an absent one is
// reported by name (`MissingField`) instead of by serde's less specific message; unknown fields
// are ignored because AWS adds fields over time.

#[derive(Deserialize)]
struct CloudTrailMessage {
    #[serde(rename = "s3Bucket")]
    bucket: Option<String>,
    #[serde(rename = "s3ObjectKey")]
    keys: Option<Vec<String>>,
}

#[derive(Deserialize)]
struct S3EventMessage {
    #[serde(rename = "Records")]
    records: Option<Vec<S3Record>>,
}

#[derive(Deserialize)]
struct S3Record {
    #[serde(rename = "eventSource")]
    event_source: Option<String>,
    #[serde(rename = "eventName")]
    event_name: Option<String>,
    s3: Option<S3Entity>,
}

#[derive(Deserialize)]
struct S3Entity {
    bucket: Option<BucketInfo>,
    object: Option<ObjectInfo>,
}

/// `bucket` in both S3 events and EventBridge `detail`.
#[derive(Deserialize)]
struct BucketInfo {
    name: Option<String>,
}

/// `object` in both S3 events and EventBridge `detail`.
#[derive(Deserialize)]
struct ObjectInfo {
    key: Option<String>,
    size: Option<u64>,
}

#[derive(Deserialize)]
struct EventBridgeEvent {
    #[serde(rename = "detail-type")]
    detail_type: Option<String>,
    source: Option<String>,
    detail: Option<EventBridgeDetail>,
}

#[derive(Deserialize)]
struct EventBridgeDetail {
    bucket: Option<BucketInfo>,
    object: Option<ObjectInfo>,
}

fn typed<T: DeserializeOwned>(value: Value, shape: Shape) -> Result<T, NotificationError> {
    serde_json::from_value(value).map_err(|e| NotificationError::Malformed {
        shape,
        // serde quotes offending string values, which come from the body: clip them too.
        detail: clip(&e.to_string()),
    })
}

fn required<T>(value: Option<T>, field: &'static str) -> Result<T, NotificationError> {
    value.ok_or(NotificationError::MissingField(field))
}

fn required_text(value: Option<String>, field: &'static str) -> Result<String, NotificationError> {
    value
        .filter(|text| !text.is_empty())
        .ok_or(NotificationError::MissingField(field))
}

fn parse_cloudtrail(value: Value, shape: Shape) -> Result<Notification, NotificationError> {
    let message: CloudTrailMessage = typed(value, shape)?;
    let bucket = required_text(message.bucket, "s3Bucket")?;
    let keys = required(message.keys, "s3ObjectKey")?;
    if keys.is_empty() {
        return Err(NotificationError::MissingField("s3ObjectKey"));
    }
    // CloudTrail writes keys as they are (no URL encoding).
    let objects = keys
        .into_iter()
        .map(|key| {
            let key = required_text(Some(key), "s3ObjectKey[]")?;
            Ok(ObjectRef {
                bucket: bucket.clone(),
                key,
                size: None,
            })
        })
        .collect::<Result<Vec<_>, NotificationError>>()?;
    Ok(without_digests(shape, objects))
}

fn parse_s3_event(value: Value, shape: Shape) -> Result<Notification, NotificationError> {
    let message: S3EventMessage = typed(value, shape)?;
    let records = required(message.records, "Records")?;
    if records.is_empty() {
        return Err(NotificationError::MissingField("Records"));
    }
    let mut objects = Vec::new();
    for (index, record) in records.into_iter().enumerate() {
        let source = required_text(record.event_source, "Records[].eventSource")?;
        if source != "aws:s3" {
            // A CloudTrail log file also has `Records`; say so rather than "missing field s3".
            return Err(NotificationError::UnknownShape(format!(
                "Records[{index}].eventSource is {:?}, not \"aws:s3\" \
                 (CloudTrail log content rather than an S3 event?)",
                clip(&source)
            )));
        }
        let name = required_text(record.event_name, "Records[].eventName")?;
        // Only new objects are files to read; removals, restores, tagging, … are not.
        if !name.starts_with("ObjectCreated:") {
            continue;
        }
        let s3 = required(record.s3, "Records[].s3")?;
        let bucket = required(s3.bucket, "Records[].s3.bucket")?;
        let bucket = required_text(bucket.name, "Records[].s3.bucket.name")?;
        let object = required(s3.object, "Records[].s3.object")?;
        // S3 event keys are form-URL-encoded ("red flower.jpg" arrives as "red+flower.jpg").
        let encoded = required_text(object.key, "Records[].s3.object.key")?;
        objects.push(ObjectRef {
            bucket,
            key: form_decode(&encoded)?,
            size: object.size,
        });
    }
    if objects.is_empty() {
        return Ok(Notification::Ignorable {
            shape,
            reason: "not_object_created",
        });
    }
    Ok(without_digests(shape, objects))
}

fn parse_eventbridge(value: Value) -> Result<Notification, NotificationError> {
    let shape = Shape::EventBridge;
    let event: EventBridgeEvent = typed(value, shape)?;
    let source = required_text(event.source, "source")?;
    if source != "aws.s3" {
        return Err(NotificationError::UnknownShape(format!(
            "an EventBridge event from {:?}, not from \"aws.s3\"",
            clip(&source)
        )));
    }
    let detail_type = required_text(event.detail_type, "detail-type")?;
    if detail_type != "Object Created" {
        return Ok(Notification::Ignorable {
            shape,
            reason: "not_object_created",
        });
    }
    let detail = required(event.detail, "detail")?;
    let bucket = required(detail.bucket, "detail.bucket")?;
    let bucket = required_text(bucket.name, "detail.bucket.name")?;
    let object = required(detail.object, "detail.object")?;
    // Unlike S3 event notifications, S3's EventBridge events are not documented as URL-encoding
    // the key, and the samples show it plain, so it is used as given. Were that wrong, a key with
    // a literal '+' or '%' would fail to fetch (NoSuchKey) rather than read the wrong object, and
    // CloudTrail's own key layout uses neither character.
    let key = required_text(object.key, "detail.object.key")?;
    let objects = vec![ObjectRef {
        bucket,
        key,
        size: object.size,
    }];
    Ok(without_digests(shape, objects))
}

/// Drops digest files; a notification naming nothing else is ignorable. Applied to every shape,
/// since S3 events on a trail's bucket announce digests too.
fn without_digests(shape: Shape, objects: Vec<ObjectRef>) -> Notification {
    let objects: Vec<ObjectRef> = objects
        .into_iter()
        .filter(|object| !is_digest_key(&object.key))
        .collect();
    if objects.is_empty() {
        Notification::Ignorable {
            shape,
            reason: "digest_only",
        }
    } else {
        Notification::Objects { shape, objects }
    }
}

/// Decodes `application/x-www-form-urlencoded` text the way S3 event keys need: `+` is a space,
/// `%XX` is a byte, and a `%` without two hex digits after it stays literal (as in the WHATWG
/// form decoder; S3 itself always sends `%` as `%25`). Written here rather than taken from
/// `form_urlencoded` because that one replaces invalid UTF-8 with U+FFFD, which would turn a bad
/// key into a different key; here it is an error.
fn form_decode(encoded: &str) -> Result<String, NotificationError> {
    let bytes = encoded.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut rest = bytes;
    while let Some((&byte, tail)) = rest.split_first() {
        rest = tail;
        match byte {
            b'+' => decoded.push(b' '),
            b'%' => match tail {
                [high, low, after @ ..] => match (hex_digit(*high), hex_digit(*low)) {
                    (Some(high), Some(low)) => {
                        decoded.push(high << 4 | low);
                        rest = after;
                    }
                    _ => decoded.push(b'%'),
                },
                _ => decoded.push(b'%'),
            },
            other => decoded.push(other),
        }
    }
    String::from_utf8(decoded).map_err(|_| NotificationError::BadKeyEncoding { key: clip(encoded) })
}

fn hex_digit(byte: u8) -> Option<u8> {
    char::from(byte)
        .to_digit(16)
        .and_then(|digit| u8::try_from(digit).ok())
}

/// Allowlist of buckets (and optional key prefixes) that workers may fetch from. A notification
/// naming anything else is refused whole (none of its objects are fetched).
///
/// An empty allowlist (the default) allows nothing. A prefix matches whole path segments:
/// `AWSLogs/123456789012` (trailing `/` optional) allows `AWSLogs/123456789012/…` but not
/// `AWSLogs/1234567890123/…`.
#[derive(Debug, Clone, Default)]
pub struct Allowlist {
    /// Bucket → prefixes; an empty list allows any key in the bucket.
    buckets: HashMap<String, Vec<String>>,
}

impl Allowlist {
    /// `(bucket, prefixes)` pairs; empty prefixes = any key. A bucket listed twice gets the union.
    pub fn new(entries: impl IntoIterator<Item = (String, Vec<String>)>) -> Allowlist {
        let mut buckets: HashMap<String, Vec<String>> = HashMap::new();
        for (bucket, prefixes) in entries {
            match buckets.entry(bucket) {
                Entry::Vacant(slot) => {
                    slot.insert(prefixes);
                }
                Entry::Occupied(mut slot) => {
                    // Any-key on either side means any key; otherwise both sets of prefixes.
                    if slot.get().is_empty() || prefixes.is_empty() {
                        slot.get_mut().clear();
                    } else {
                        slot.get_mut().extend(prefixes);
                    }
                }
            }
        }
        Allowlist { buckets }
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    pub fn allows(&self, obj: &ObjectRef) -> bool {
        let Some(prefixes) = self.buckets.get(&obj.bucket) else {
            return false;
        };
        if prefixes.is_empty() {
            return true;
        }
        // S3 itself treats keys as opaque strings, so `AWSLogs/123/../999/x` is a distinct,
        // legal key. But any layer that normalises paths (an HTTP client, a proxy, a local
        // mirror) would turn it into `AWSLogs/999/x`, outside the prefix that was checked. A
        // leading `/` is refused for the same reason (`//x` may collapse to `/x`). CloudTrail
        // never writes such keys, so refusing them costs nothing. A backslash counts as a
        // separator too, as some normalisers treat it as one.
        let dodgy = obj.key.starts_with('/') || obj.key.split(['/', '\\']).any(|seg| seg == "..");
        !dodgy
            && prefixes
                .iter()
                .any(|prefix| within_prefix(&obj.key, prefix))
    }

    /// The first object not allowed, if any.
    pub fn first_refused<'a>(&self, objs: &'a [ObjectRef]) -> Option<&'a ObjectRef> {
        objs.iter().find(|obj| !self.allows(obj))
    }
}

/// Whether `key` is `prefix` or lies below it, on a segment boundary.
fn within_prefix(key: &str, prefix: &str) -> bool {
    let prefix = prefix.trim_end_matches('/');
    if prefix.is_empty() {
        return true;
    }
    key.strip_prefix(prefix)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BUCKET: &str = "acme-audit-trail";

    fn obj(bucket: &str, key: &str, size: Option<u64>) -> ObjectRef {
        ObjectRef {
            bucket: bucket.into(),
            key: key.into(),
            size,
        }
    }

    /// An SNS envelope around `message`, which is embedded as a JSON string.
    fn sns(message: &str) -> String {
        serde_json::json!({
            "Type": "Notification",
            "MessageId": "6c0d6a53-3f0b-5bb0-9d5e-1f2a3b4c5d6e",
            "TopicArn": "arn:aws:sns:eu-west-1:210987654321:trail-files",
            "Subject": "Amazon S3 Notification",
            "Message": message,
            "Timestamp": "2025-01-07T09:12:44.101Z",
            "SignatureVersion": "1",
            "Signature": "c2lnbmF0dXJl",
            "SigningCertURL": "https://sns.eu-west-1.amazonaws.com/cert.pem",
            "UnsubscribeURL": "https://sns.eu-west-1.amazonaws.com/?Action=Unsubscribe",
        })
        .to_string()
    }

    fn s3_record(event_name: &str, key: &str, size: u64) -> serde_json::Value {
        serde_json::json!({
            "eventVersion": "2.1",
            "eventSource": "aws:s3",
            "awsRegion": "eu-west-1",
            "eventTime": "2025-01-07T09:12:40.000Z",
            "eventName": event_name,
            "userIdentity": {"principalId": "AWS:AROAEXAMPLE2:regionalDeliverySession"},
            "requestParameters": {"sourceIPAddress": "203.0.113.7"},
            "responseElements": {"x-amz-request-id": "9A1B2C3D4E5F6071"},
            "s3": {
                "s3SchemaVersion": "1.0",
                "configurationId": "new-trail-files",
                "bucket": {
                    "name": BUCKET,
                    "ownerIdentity": {"principalId": "A1B2C3EXAMPLE"},
                    "arn": "arn:aws:s3:::acme-audit-trail"
                },
                "object": {"key": key, "size": size, "eTag": "0123456789abcdef", "sequencer": "00AB12"}
            }
        })
    }

    fn s3_event(records: Vec<serde_json::Value>) -> String {
        serde_json::json!({ "Records": records }).to_string()
    }

    const KEY_A: &str = "AWSLogs/210987654321/CloudTrail/eu-west-1/2025/01/07/210987654321_CloudTrail_eu-west-1_20250107T0910Z_Qw3rTy0001.json.gz";
    const KEY_B: &str = "AWSLogs/210987654321/CloudTrail/eu-west-1/2025/01/07/210987654321_CloudTrail_eu-west-1_20250107T0910Z_Qw3rTy0002.json.gz";
    const KEY_C: &str = "AWSLogs/210987654321/CloudTrail/us-east-2/2025/01/07/210987654321_CloudTrail_us-east-2_20250107T0905Z_Zx9vBn0003.json.gz";
    const DIGEST: &str = "AWSLogs/210987654321/CloudTrail-Digest/eu-west-1/2025/01/07/210987654321_CloudTrail-Digest_eu-west-1_audit_eu-west-1_20250107T091000Z.json.gz";

    fn cloudtrail_message(keys: &[&str]) -> String {
        serde_json::json!({ "s3Bucket": BUCKET, "s3ObjectKey": keys }).to_string()
    }

    #[test]
    fn cloudtrail_sns_with_several_keys() {
        let body = sns(&cloudtrail_message(&[KEY_A, KEY_B, KEY_C]));
        let expected = [KEY_A, KEY_B, KEY_C]
            .map(|key| obj(BUCKET, key, None))
            .to_vec();
        assert_eq!(
            parse(&body),
            Ok(Notification::Objects {
                shape: Shape::CloudTrailSns,
                objects: expected
            })
        );
    }

    #[test]
    fn cloudtrail_raw_delivery() {
        let body = cloudtrail_message(&[KEY_A]);
        assert_eq!(
            parse(&body),
            Ok(Notification::Objects {
                shape: Shape::CloudTrailRaw,
                objects: vec![obj(BUCKET, KEY_A, None)]
            })
        );
    }

    #[test]
    fn s3_event_keys_are_form_decoded() {
        // "trail files/été +1%.json.gz" under a prefix holding a literal '/' encoded as %2F.
        let encoded = "AWSLogs/210987654321/trail+files%2Fsub/%C3%A9t%C3%A9+%2B1%25.json.gz";
        let body = s3_event(vec![s3_record("ObjectCreated:Put", encoded, 2048)]);
        assert_eq!(
            parse(&body),
            Ok(Notification::Objects {
                shape: Shape::S3Event,
                objects: vec![obj(
                    BUCKET,
                    "AWSLogs/210987654321/trail files/sub/été +1%.json.gz",
                    Some(2048)
                )]
            })
        );
    }

    #[test]
    fn s3_event_in_sns() {
        let body = sns(&s3_event(vec![s3_record(
            "ObjectCreated:CompleteMultipartUpload",
            KEY_B,
            77,
        )]));
        assert_eq!(
            parse(&body),
            Ok(Notification::Objects {
                shape: Shape::S3EventInSns,
                objects: vec![obj(BUCKET, KEY_B, Some(77))]
            })
        );
    }

    #[test]
    fn s3_event_keeps_only_created_objects() {
        let body = s3_event(vec![
            s3_record("ObjectRemoved:Delete", KEY_A, 0),
            s3_record("ObjectCreated:Copy", KEY_B, 10),
        ]);
        assert_eq!(
            parse(&body),
            Ok(Notification::Objects {
                shape: Shape::S3Event,
                objects: vec![obj(BUCKET, KEY_B, Some(10))]
            })
        );
    }

    #[test]
    fn s3_event_object_removed_is_ignorable() {
        let mut removed = s3_record("ObjectRemoved:DeleteMarkerCreated", KEY_A, 0);
        // Removal events need not carry a usable object: they are not read at all.
        removed["s3"]["object"] = serde_json::json!({"sequencer": "00AB13"});
        let body = s3_event(vec![removed]);
        assert_eq!(
            parse(&body),
            Ok(Notification::Ignorable {
                shape: Shape::S3Event,
                reason: "not_object_created"
            })
        );
    }

    fn eventbridge(detail_type: &str, source: &str, key: &str) -> String {
        serde_json::json!({
            "version": "0",
            "id": "0b4a7f0e-8e2c-4d3b-a1f0-9c8d7e6f5a4b",
            "detail-type": detail_type,
            "source": source,
            "account": "210987654321",
            "time": "2025-01-07T09:12:40Z",
            "region": "eu-west-1",
            "resources": ["arn:aws:s3:::acme-audit-trail"],
            "detail": {
                "version": "0",
                "bucket": {"name": BUCKET},
                "object": {"key": key, "size": 4096, "etag": "fedcba9876543210", "sequencer": "00AB14"},
                "request-id": "Q1W2E3R4T5Y6U7I8",
                "requester": "210987654321",
                "source-ip-address": "203.0.113.7",
                "reason": "PutObject"
            }
        })
        .to_string()
    }

    #[test]
    fn eventbridge_object_created_key_taken_as_is() {
        let key = "AWSLogs/210987654321/CloudTrail/eu-west-1/2025/01/07/a+b%2Fc.json.gz";
        let body = eventbridge("Object Created", "aws.s3", key);
        assert_eq!(
            parse(&body),
            Ok(Notification::Objects {
                shape: Shape::EventBridge,
                objects: vec![obj(BUCKET, key, Some(4096))]
            })
        );
        // EventBridge → SNS → SQS carries the same payload.
        assert!(matches!(
            parse(&sns(&body)),
            Ok(Notification::Objects {
                shape: Shape::EventBridge,
                ..
            })
        ));
    }

    #[test]
    fn eventbridge_other_s3_events_are_ignorable() {
        let body = eventbridge("Object Deleted", "aws.s3", KEY_A);
        assert_eq!(
            parse(&body),
            Ok(Notification::Ignorable {
                shape: Shape::EventBridge,
                reason: "not_object_created"
            })
        );
    }

    #[test]
    fn eventbridge_from_another_source_is_an_error() {
        let body = eventbridge("AWS API Call via CloudTrail", "aws.iam", KEY_A);
        let err = parse(&body).unwrap_err();
        assert_eq!(err.reason(), "unknown_shape");
        assert!(err.to_string().contains("aws.iam"), "{err}");
    }

    const TEST_EVENT: &str = r#"{"Service":"Amazon S3","Event":"s3:TestEvent","Time":"2025-01-07T08:00:00.000Z","Bucket":"acme-audit-trail","RequestId":"0F1E2D3C4B5A6978","HostId":"aG9zdGlkZXhhbXBsZQ=="}"#;

    #[test]
    fn s3_test_event_raw_and_in_sns() {
        let expected = Ok(Notification::Ignorable {
            shape: Shape::S3TestEvent,
            reason: "s3_test_event",
        });
        assert_eq!(parse(TEST_EVENT), expected);
        assert_eq!(parse(&sns(TEST_EVENT)), expected);
    }

    #[test]
    fn sns_control_messages_are_ignorable() {
        let confirmation = r#"{
            "Type": "SubscriptionConfirmation",
            "MessageId": "165545c9-2a5c-472c-8df2-7ff2be2b3b1b",
            "Token": "2336412f37fb687f5d51e6e241d09c805a5a57b30d712f794cc5f6a988666d92768dd60a747ba6f3beb71854e285d6ad02428b09ceece29417f1f02d609c582afbacc99c583a916b9981dd2728f4ae6fdb82efd087cc3b7849e05798d2d2785c03b0879594eeac82c01f235d0e717736",
            "TopicArn": "arn:aws:sns:eu-west-1:210987654321:trail-files",
            "Message": "You have chosen to subscribe to the topic arn:aws:sns:eu-west-1:210987654321:trail-files.\nTo confirm the subscription, visit the SubscribeURL included in this message.",
            "SubscribeURL": "https://sns.eu-west-1.amazonaws.com/?Action=ConfirmSubscription",
            "Timestamp": "2025-01-07T08:00:00.000Z",
            "SignatureVersion": "1",
            "Signature": "c2ln"
        }"#;
        assert_eq!(
            parse(confirmation),
            Ok(Notification::Ignorable {
                shape: Shape::SnsOther,
                reason: "sns_subscription_confirmation"
            })
        );
        let unsubscribe =
            confirmation.replace("SubscriptionConfirmation", "UnsubscribeConfirmation");
        assert_eq!(parse(&unsubscribe).map(|n| n.shape()), Ok(Shape::SnsOther));
        let other = confirmation.replace("SubscriptionConfirmation", "SomethingNew");
        assert_eq!(
            parse(&other),
            Ok(Notification::Ignorable {
                shape: Shape::SnsOther,
                reason: "sns_other_type"
            })
        );
    }

    fn reason_of(body: &str) -> &'static str {
        match parse(body) {
            Ok(notification) => panic!("expected an error, got {notification:?}"),
            Err(err) => err.reason(),
        }
    }

    #[test]
    fn garbage_is_not_json() {
        let err = parse("\u{0}\u{fffd}certainly not a notification").unwrap_err();
        assert_eq!(err.reason(), "not_json");
        assert!(err.to_string().contains("certainly not"), "{err}");
        assert_eq!(reason_of(""), "not_json");
        assert_eq!(reason_of("{\"s3Bucket\": "), "not_json");
        assert_eq!(reason_of("{} trailing"), "not_json");
    }

    #[test]
    fn json_of_unknown_shape() {
        assert_eq!(reason_of("[]"), "unknown_shape");
        assert_eq!(reason_of("{}"), "unknown_shape");
        assert_eq!(reason_of("\"s3Bucket\""), "unknown_shape");
        assert_eq!(reason_of("null"), "unknown_shape");
        let err = parse(r#"{"hello": "world", "count": 3}"#).unwrap_err();
        assert_eq!(err.reason(), "unknown_shape");
        assert!(
            err.to_string().contains("count, hello") || err.to_string().contains("hello, count")
        );
        assert!(
            !err.to_string().contains("world"),
            "values are not quoted: {err}"
        );
    }

    #[test]
    fn a_single_cloudtrail_event_is_not_a_notification() {
        let event = r#"{"eventVersion":"1.10","eventTime":"2025-01-07T09:00:00Z","eventSource":"s3.amazonaws.com","eventName":"GetObject","awsRegion":"eu-west-1","eventID":"e0e0e0e0-0000-4000-8000-000000000001"}"#;
        let err = parse(event).unwrap_err();
        assert_eq!(err.reason(), "unknown_shape");
        assert!(err.to_string().contains("single CloudTrail event"), "{err}");
    }

    #[test]
    fn cloudtrail_log_content_is_not_an_s3_event() {
        let log = r#"{"Records":[{"eventVersion":"1.10","eventSource":"iam.amazonaws.com","eventName":"CreateUser"}]}"#;
        let err = parse(log).unwrap_err();
        assert_eq!(err.reason(), "unknown_shape");
        assert!(err.to_string().contains("iam.amazonaws.com"), "{err}");
    }

    #[test]
    fn sns_envelope_errors() {
        let not_json = sns("hello, this is plain text");
        let err = parse(&not_json).unwrap_err();
        assert_eq!(err.reason(), "bad_envelope");
        assert!(err.to_string().contains("not JSON"), "{err}");

        let mut object_message: serde_json::Value = serde_json::from_str(&sns("")).unwrap();
        object_message["Message"] = serde_json::json!({"s3Bucket": BUCKET, "s3ObjectKey": [KEY_A]});
        assert_eq!(reason_of(&object_message.to_string()), "bad_envelope");

        let mut no_message = object_message.clone();
        no_message.as_object_mut().unwrap().remove("Message");
        assert_eq!(
            parse(&no_message.to_string()),
            Err(NotificationError::MissingField("Message"))
        );

        let mut bad_type = object_message;
        bad_type["Type"] = serde_json::json!(7);
        assert_eq!(reason_of(&bad_type.to_string()), "bad_envelope");

        assert_eq!(reason_of(&sns("[1, 2]")), "unknown_shape");
        assert_eq!(reason_of(&sns(r#"{"greeting": "hi"}"#)), "unknown_shape");
        assert_eq!(
            reason_of(&sns(&sns(&cloudtrail_message(&[KEY_A])))),
            "unknown_shape"
        );
    }

    #[test]
    fn cloudtrail_field_errors() {
        let not_array = format!(r#"{{"s3Bucket": "{BUCKET}", "s3ObjectKey": "{KEY_A}"}}"#);
        let err = parse(&not_array).unwrap_err();
        assert!(
            matches!(
                err,
                NotificationError::Malformed {
                    shape: Shape::CloudTrailRaw,
                    ..
                }
            ),
            "{err:?}"
        );
        // The offending value is quoted by serde, but clipped.
        assert!(err.to_string().len() < 200, "{err}");

        let not_strings = format!(r#"{{"s3Bucket": "{BUCKET}", "s3ObjectKey": [1, 2]}}"#);
        assert_eq!(reason_of(&not_strings), "malformed");
        assert_eq!(reason_of(&sns(&not_strings)), "malformed");

        let no_bucket = format!(r#"{{"s3ObjectKey": ["{KEY_A}"]}}"#);
        assert_eq!(
            parse(&no_bucket),
            Err(NotificationError::MissingField("s3Bucket"))
        );
        let no_keys = format!(r#"{{"s3Bucket": "{BUCKET}"}}"#);
        assert_eq!(
            parse(&no_keys),
            Err(NotificationError::MissingField("s3ObjectKey"))
        );
        let empty_keys = format!(r#"{{"s3Bucket": "{BUCKET}", "s3ObjectKey": []}}"#);
        assert_eq!(
            parse(&empty_keys),
            Err(NotificationError::MissingField("s3ObjectKey"))
        );
        let empty_key = format!(r#"{{"s3Bucket": "{BUCKET}", "s3ObjectKey": [""]}}"#);
        assert_eq!(
            parse(&empty_key),
            Err(NotificationError::MissingField("s3ObjectKey[]"))
        );
    }

    #[test]
    fn s3_event_field_errors() {
        assert_eq!(
            parse(r#"{"Records": []}"#),
            Err(NotificationError::MissingField("Records"))
        );
        assert_eq!(reason_of(r#"{"Records": {}}"#), "malformed");

        let mut no_key = s3_record("ObjectCreated:Put", KEY_A, 1);
        no_key["s3"]["object"]
            .as_object_mut()
            .unwrap()
            .remove("key");
        assert_eq!(
            parse(&s3_event(vec![no_key])),
            Err(NotificationError::MissingField("Records[].s3.object.key"))
        );

        let invalid_utf8 = s3_event(vec![s3_record(
            "ObjectCreated:Put",
            "AWSLogs/%FF%FE.json.gz",
            1,
        )]);
        assert_eq!(reason_of(&invalid_utf8), "bad_key_encoding");
    }

    #[test]
    fn errors_never_echo_a_whole_body() {
        let tail = "TAIL-MARKER";
        let body = format!("not json {} {tail}", "x".repeat(10_000));
        let err = parse(&body).unwrap_err();
        let message = err.to_string();
        assert!(message.len() < 250 && !message.contains(tail), "{message}");

        let message_body = sns(&format!("plain {} {tail}", "y".repeat(10_000)));
        let message = parse(&message_body).unwrap_err().to_string();
        assert!(message.len() < 250 && !message.contains(tail), "{message}");
    }

    #[test]
    fn digest_keys() {
        assert!(is_digest_key(DIGEST));
        assert!(is_digest_key(
            "custom/prefix/x_CloudTrail-Digest_eu-west-1.json.gz"
        ));
        assert!(!is_digest_key(KEY_A));
        // The marker must be a path segment or part of the file name's pattern.
        assert!(!is_digest_key("AWSLogs/1/CloudTrail-Digests/file.json.gz"));
        assert!(!is_digest_key("AWSLogs/_CloudTrail-Digest_/file.json.gz"));
    }

    #[test]
    fn digest_only_notification_is_ignorable() {
        assert_eq!(
            parse(&sns(&cloudtrail_message(&[DIGEST]))),
            Ok(Notification::Ignorable {
                shape: Shape::CloudTrailSns,
                reason: "digest_only"
            })
        );
        assert_eq!(
            parse(&s3_event(vec![s3_record("ObjectCreated:Put", DIGEST, 900)])),
            Ok(Notification::Ignorable {
                shape: Shape::S3Event,
                reason: "digest_only"
            })
        );
    }

    #[test]
    fn mixed_notification_drops_digests() {
        assert_eq!(
            parse(&cloudtrail_message(&[KEY_A, DIGEST, KEY_B])),
            Ok(Notification::Objects {
                shape: Shape::CloudTrailRaw,
                objects: vec![obj(BUCKET, KEY_A, None), obj(BUCKET, KEY_B, None)]
            })
        );
    }

    #[test]
    fn form_decoding() {
        let decode = |s: &str| form_decode(s).unwrap();
        assert_eq!(decode("a+b%20c%2Bd"), "a b c+d");
        assert_eq!(decode("%E2%82%AC%e2%82%ac"), "€€");
        // Escapes that are not two hex digits stay literal.
        assert_eq!(decode("100%"), "100%");
        assert_eq!(decode("%4"), "%4");
        assert_eq!(decode("%zz%41"), "%zzA");
        assert!(form_decode("%C3").is_err());
    }

    fn allowlist() -> Allowlist {
        Allowlist::new([
            (
                BUCKET.to_string(),
                vec!["AWSLogs/210987654321/".to_string()],
            ),
            ("acme-org-trail".to_string(), vec![]),
            (
                BUCKET.to_string(),
                vec!["AWSLogs/o-abc123def4/210987654321".to_string()],
            ),
        ])
    }

    #[test]
    fn allowlist_buckets() {
        let allow = allowlist();
        assert!(allow.allows(&obj(BUCKET, KEY_A, None)));
        assert!(!allow.allows(&obj("someone-elses-bucket", KEY_A, None)));
        // No prefixes: any key at all, odd-looking ones included.
        assert!(allow.allows(&obj("acme-org-trail", "anything/../at all", None)));
        assert!(!Allowlist::default().allows(&obj(BUCKET, KEY_A, None)));
        assert!(Allowlist::default().is_empty());
    }

    #[test]
    fn allowlist_prefixes() {
        let allow = allowlist();
        let allowed = |key: &str| allow.allows(&obj(BUCKET, key, None));
        assert!(allowed(
            "AWSLogs/o-abc123def4/210987654321/CloudTrail/x.json.gz"
        ));
        assert!(!allowed("AWSLogs/999999999999/CloudTrail/x.json.gz"));
        // Prefixes match whole segments, with or without a trailing '/'.
        assert!(!allowed("AWSLogs/2109876543210/CloudTrail/x.json.gz"));
        assert!(!allowed("AWSLogs/o-abc123def4/2109876543219/x.json.gz"));
    }

    #[test]
    fn allowlist_refuses_path_tricks() {
        let allow = allowlist();
        let allowed = |key: &str| allow.allows(&obj(BUCKET, key, None));
        assert!(!allowed(
            "AWSLogs/210987654321/../999999999999/CloudTrail/x.json.gz"
        ));
        assert!(!allowed("AWSLogs/210987654321/CloudTrail/.."));
        assert!(!allowed("AWSLogs/210987654321/..\\..\\secret.json.gz"));
        assert!(!allowed("/AWSLogs/210987654321/CloudTrail/x.json.gz"));
        // Dots that are not a whole segment are ordinary characters.
        assert!(allowed("AWSLogs/210987654321/CloudTrail/x..y.json.gz"));

        // The check runs on the decoded key: "%2F..%2F" in an S3 event is a real ".." segment.
        let body = s3_event(vec![s3_record(
            "ObjectCreated:Put",
            "AWSLogs%2F210987654321%2F..%2F999999999999%2Fx.json.gz",
            1,
        )]);
        let Ok(Notification::Objects { objects, .. }) = parse(&body) else {
            panic!("expected objects");
        };
        assert!(!allow.allows(&objects[0]));
    }

    #[test]
    fn first_refused_names_the_culprit() {
        let allow = allowlist();
        let objects = vec![
            obj(BUCKET, KEY_A, None),
            obj("someone-elses-bucket", KEY_B, None),
            obj("another", KEY_C, None),
        ];
        assert_eq!(allow.first_refused(&objects), Some(&objects[1]));
        assert_eq!(allow.first_refused(&objects[..1]), None);
    }

    #[test]
    fn labels_are_snake_case() {
        let shapes = [
            Shape::CloudTrailSns,
            Shape::CloudTrailRaw,
            Shape::S3Event,
            Shape::S3EventInSns,
            Shape::EventBridge,
            Shape::S3TestEvent,
            Shape::SnsOther,
        ];
        let errors = [
            NotificationError::NotJson {
                error: String::new(),
                start: String::new(),
            },
            NotificationError::UnknownShape(String::new()),
            NotificationError::BadEnvelope(String::new()),
            NotificationError::MissingField("x"),
            NotificationError::Malformed {
                shape: Shape::S3Event,
                detail: String::new(),
            },
            NotificationError::BadKeyEncoding { key: String::new() },
        ];
        let labels = shapes
            .iter()
            .map(|shape| shape.as_str())
            .chain(errors.iter().map(NotificationError::reason));
        for label in labels {
            assert!(
                !label.is_empty()
                    && label
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
                "{label}"
            );
        }
    }
}
