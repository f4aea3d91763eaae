//! The few top-level fields of an event the pipeline routes and enriches on, read by serde while
//! it validates the event.

use std::borrow::Cow;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, IgnoredAny, MapAccess, Visitor};
use serde_json::value::RawValue;

use super::fields::is_cloudtrail_field;

/// Top-level event fields the pipeline routes and enriches on. Borrowed from the event bytes
/// unless the JSON string held escapes.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Head<'a> {
    pub event_time: Option<Cow<'a, str>>,
    pub source_ip: Option<Cow<'a, str>>,
    pub account: Option<Cow<'a, str>>,
    pub region: Option<Cow<'a, str>>,
    pub event_source: Option<Cow<'a, str>>,
    pub event_type: Option<Cow<'a, str>>,
    pub event_id: Option<Cow<'a, str>>,
    pub event_name: Option<Cow<'a, str>>,
    pub read_only: Option<bool>,
    /// A top-level member that is not one of CloudTrail's own fields (see `fields`): the event
    /// may already hold a member an enrichment adds, so the splice must look before it adds.
    pub other_members: bool,
    /// Every top-level member, when the split was asked to keep them (detection reads the
    /// members its rules need from here instead of scanning the event again).
    pub members: Option<Members<'a>>,
}

/// An event's top-level members as serde read them while it validated the event: each key
/// (unescaped) and its value's exact bytes, in order (a repeated key appears twice).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Members<'a> {
    /// The event's bytes: every value lies within them. A reader checks that the bytes it
    /// holds are these (same place, same length) before it trusts the list.
    pub raw: &'a [u8],
    pub list: Vec<(Cow<'a, str>, &'a str)>,
}

impl<'a> Members<'a> {
    /// The list, when it describes exactly `raw` (not a copy that was rewritten since).
    pub fn of(&self, raw: &[u8]) -> Option<&[(Cow<'a, str>, &'a str)]> {
        std::ptr::eq(self.raw, raw).then_some(self.list.as_slice())
    }
}

impl Head<'_> {
    /// The same fields, owned: transforms hold events across a batch.
    pub fn into_owned(self) -> Head<'static> {
        let own = |c: Option<Cow<'_, str>>| c.map(|c| Cow::Owned(c.into_owned()));
        Head {
            event_time: own(self.event_time),
            source_ip: own(self.source_ip),
            account: own(self.account),
            region: own(self.region),
            event_source: own(self.event_source),
            event_type: own(self.event_type),
            event_id: own(self.event_id),
            event_name: own(self.event_name),
            read_only: self.read_only,
            other_members: self.other_members,
            // They point into the split's window, which the owned head outlives.
            members: None,
        }
    }
}

/// The head of one event that must be a JSON object (a transform's output).
pub fn head_of(event: &[u8]) -> Result<Head<'_>, serde_json::Error> {
    serde_json::from_slice(event)
}

/// `head_of` with the event's members listed (`Head::members`), as the split reads them when
/// detection is on.
pub fn listed_head_of(event: &[u8]) -> Result<Head<'_>, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_slice(event);
    let Listed(mut head) = Listed::deserialize(&mut de)?;
    de.end()?;
    if let Some(m) = head.members.as_mut() {
        m.raw = event;
    }
    Ok(head)
}

/// CloudTrail's own field names for the `Head` fields.
fn head_slot<'h, 'a>(head: &'h mut Head<'a>, key: &str) -> Option<&'h mut Option<Cow<'a, str>>> {
    Some(match key {
        "eventTime" => &mut head.event_time,
        "sourceIPAddress" => &mut head.source_ip,
        "recipientAccountId" => &mut head.account,
        "awsRegion" => &mut head.region,
        "eventSource" => &mut head.event_source,
        "eventType" => &mut head.event_type,
        "eventID" => &mut head.event_id,
        "eventName" => &mut head.event_name,
        _ => return None,
    })
}

impl<'de> Deserialize<'de> for Head<'de> {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(HeadVisitor)
    }
}

/// A head read with every top-level member kept (`Head::members`; its `raw` is left for the
/// caller, who knows where the event ends).
pub struct Listed<'a>(pub Head<'a>);

impl<'de> Deserialize<'de> for Listed<'de> {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(ListedVisitor).map(Listed)
    }
}

struct HeadVisitor;

struct ListedVisitor;

impl<'de> Visitor<'de> for ListedVisitor {
    type Value = Head<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a CloudTrail event object")
    }

    /// As `HeadVisitor`, but every value is taken as its bytes (serde checks them as it
    /// would step over them, and checks their UTF-8 too) and the head's fields read from them.
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Head<'de>, A::Error> {
        let mut head = Head::default();
        let mut list = Vec::with_capacity(24);
        while let Some(Key(key)) = map.next_key::<Key<'de>>()? {
            let value: &'de RawValue = map.next_value()?;
            let text = value.get();
            if key == "readOnly" {
                head.read_only = match lenient(text).map_err(de::Error::custom)? {
                    Lenient::Bool(b) => Some(b),
                    _ => None,
                };
            } else if let Some(slot) = head_slot(&mut head, &key) {
                *slot = match lenient(text).map_err(de::Error::custom)? {
                    Lenient::Str(s) => Some(s),
                    _ => None,
                };
            } else if !head.other_members && !is_cloudtrail_field(&key) {
                head.other_members = true;
            }
            list.push((key, text));
        }
        head.members = Some(Members { raw: &[], list });
        Ok(head)
    }
}

/// A head field's value as `HeadVisitor` reads it, from its bytes. Stepping over a value (as
/// the raw bytes were taken) checks less than reading it (number ranges, surrogate escapes, keys
/// inside): what `HeadVisitor` refuses is refused here too, so the event is classified the same.
fn lenient(text: &str) -> Result<Lenient<'_>, serde_json::Error> {
    match text {
        "true" => return Ok(Lenient::Bool(true)),
        "false" => return Ok(Lenient::Bool(false)),
        _ => {}
    }
    if let Some(inner) = text.strip_prefix('"').and_then(|t| t.strip_suffix('"'))
        && !inner.contains('\\')
    {
        // A JSON string (serde checked it) without escapes holds exactly its bytes.
        return Ok(Lenient::Str(Cow::Borrowed(inner)));
    }
    serde_json::from_str::<Lenient<'_>>(text)
}

impl<'de> Visitor<'de> for HeadVisitor {
    type Value = Head<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a CloudTrail event object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Head<'de>, A::Error> {
        let mut head = Head::default();
        // Duplicate keys are valid JSON: the last one wins, as in most readers.
        while let Some(Key(key)) = map.next_key::<Key<'de>>()? {
            if key == "readOnly" {
                head.read_only = match map.next_value::<Lenient<'de>>()? {
                    Lenient::Bool(b) => Some(b),
                    _ => None,
                };
                continue;
            }
            match head_slot(&mut head, &key) {
                Some(slot) => {
                    *slot = match map.next_value::<Lenient<'de>>()? {
                        Lenient::Str(s) => Some(s),
                        _ => None,
                    }
                }
                None => {
                    if !head.other_members && !is_cloudtrail_field(&key) {
                        head.other_members = true;
                    }
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(head)
    }
}

/// An object key, borrowed from the event unless it holds escapes. (Serde's own `Cow<str>`
/// always allocates: that would be a `String` per key of every event.)
pub struct Key<'a>(pub Cow<'a, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(KeyVisitor)
    }
}

struct KeyVisitor;

impl<'de> Visitor<'de> for KeyVisitor {
    type Value = Key<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object key")
    }
    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Key(Cow::Borrowed(v)))
    }
    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Key(Cow::Owned(v.to_owned())))
    }
    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(Key(Cow::Owned(v)))
    }
}

/// A string, a bool, or any other JSON value: a field of the wrong type is not routed on, but
/// the event itself is still good.
enum Lenient<'a> {
    Str(Cow<'a, str>),
    Bool(bool),
    Other,
}

impl<'de> Deserialize<'de> for Lenient<'de> {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(LenientVisitor)
    }
}

struct LenientVisitor;

impl<'de> Visitor<'de> for LenientVisitor {
    type Value = Lenient<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Lenient::Str(Cow::Borrowed(v)))
    }
    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Lenient::Str(Cow::Owned(v.to_owned())))
    }
    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(Lenient::Str(Cow::Owned(v)))
    }
    fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
        Ok(Lenient::Bool(v))
    }
    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(Lenient::Other)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(Lenient::Other)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(Lenient::Other)
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(Lenient::Other)
    }
    fn visit_none<E>(self) -> Result<Self::Value, E> {
        Ok(Lenient::Other)
    }
    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Lenient::Other)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Lenient::Other)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_that_are_not_cloudtrail_fields_are_flagged_at_the_top_level_only() {
        let flag = |ev: &str| head_of(ev.as_bytes()).unwrap().other_members;
        assert!(!flag(
            r#"{"eventID":"a","userIdentity":{"geo":1},"requestParameters":{"x":1}}"#
        ));
        assert!(!flag("{}"));
        assert!(flag(r#"{"eventID":"a","geo":{"country_isocode":"US"}}"#));
        assert!(flag(r#"{"account":{},"eventID":"a"}"#));
        // An escaped key is compared decoded, as readers see it.
        assert!(flag(r#"{"ge\u006f":1}"#));
        assert!(!flag(r#"{"event\u0049D":"a"}"#));
    }

    #[test]
    fn a_listed_head_reads_the_fields_as_the_plain_one_does() {
        for ev in [
            r#"{"eventTime":"2024-03-18T14:30:07Z","awsRegion":"us-east-1","eventID":"x","eventID":"y","readOnly":true}"#,
            r#"{"readOnly":"true","eventName":7,"eventSource":null,"eventType":{"a":"b"},"eventID":["x"]}"#,
            r#"{"event\u0049D":"a\"b\u00e9","sourceIPAddress":"","readOnly":false,"geo":1}"#,
            r#"{ "eventName" : "GetObject" , "recipientAccountId":"1\/2", "readOnly": 1 }"#,
            r#"{"eventName":1e300,"eventID":[{"a":"\ud83d\ude00"}],"awsRegion":-0.5e-3}"#,
            "{}",
        ] {
            let plain = head_of(ev.as_bytes()).unwrap();
            let mut listed = listed_head_of(ev.as_bytes()).unwrap();
            let m = listed.members.take().expect("listed");
            assert_eq!(listed, plain, "{ev}");
            assert!(m.of(ev.as_bytes()).is_some());
            // Another copy of the same bytes is not the event the list was read from.
            let copy = ev.as_bytes().to_vec();
            assert!(m.of(&copy).is_none());
        }
        // What reading a head field refuses (a number out of range, a lone surrogate, one in
        // a key inside) is refused listed too, though stepping over it would not refuse it.
        for bad in [
            r#"{"eventName":1e400}"#,
            r#"{"eventID":"\ud800"}"#,
            r#"{"readOnly":-1e999}"#,
            r#"{"awsRegion":{"\udc00":1}}"#,
        ] {
            assert!(head_of(bad.as_bytes()).is_err(), "{bad}");
            assert!(listed_head_of(bad.as_bytes()).is_err(), "listed {bad}");
        }
        // Elsewhere both step over it.
        let other = r#"{"x":1e400,"y":"\ud800"}"#;
        assert!(head_of(other.as_bytes()).is_ok() && listed_head_of(other.as_bytes()).is_ok());
        let head = listed_head_of(br#"{"a" : [1, {"b":2}] ,"c":"d"}"#).unwrap();
        let list = head.members.unwrap().list;
        assert_eq!(
            list,
            [
                (Cow::Borrowed("a"), r#"[1, {"b":2}]"#),
                (Cow::Borrowed("c"), r#""d""#)
            ]
        );
    }

    #[test]
    fn keys_are_borrowed_unless_they_hold_escapes() {
        let key = |text: &'static str| serde_json::from_str::<Key<'_>>(text).unwrap().0;
        assert!(matches!(key(r#""eventID""#), Cow::Borrowed("eventID")));
        let escaped = key(r#""event\u0049D""#);
        assert!(
            matches!(&escaped, Cow::Owned(k) if k == "eventID"),
            "{escaped:?}"
        );
    }

    /// The pipeline parses an event a second time (`enrich::members`) only when it is flagged:
    /// an event with every CloudTrail field, as CloudTrail writes them, is not.
    #[test]
    fn a_plain_cloudtrail_event_is_not_flagged_so_it_skips_the_second_parse() {
        use crate::cloudtrail::fields::CLOUDTRAIL_FIELDS;
        let members: Vec<String> = CLOUDTRAIL_FIELDS
            .iter()
            .map(|f| format!("\"{f}\":{{\"geo\":1,\"detections\":[]}}"))
            .collect();
        let plain = format!("{{{}}}", members.join(","));
        let head = head_of(plain.as_bytes()).unwrap();
        assert!(!head.other_members, "{plain}");
        // One member trailhose writes, in any case, flags it.
        for owned in ["geo", "detections", "TrailhoseArrivalTime", "account"] {
            let ev = format!("{{{},\"{owned}\":1}}", members.join(","));
            assert!(head_of(ev.as_bytes()).unwrap().other_members, "{owned}");
        }
    }
}
