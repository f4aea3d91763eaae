//! The few top-level fields of an event the pipeline routes and enriches on, read by serde while
//! it validates the event.

use std::borrow::Cow;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, IgnoredAny, MapAccess, Visitor};

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
        }
    }
}

/// The head of one event that must be a JSON object (a transform's output).
pub fn head_of(event: &[u8]) -> Result<Head<'_>, serde_json::Error> {
    serde_json::from_slice(event)
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

struct HeadVisitor;

impl<'de> Visitor<'de> for HeadVisitor {
    type Value = Head<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a CloudTrail event object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Head<'de>, A::Error> {
        let mut head = Head::default();
        // Duplicate keys are valid JSON: the last one wins, as in most readers.
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
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
}
