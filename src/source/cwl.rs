//! A CloudWatch Logs subscription batch read in one pass: the envelope's fields the classifier
//! decides on, and every log event's message unescaped straight into one buffer shared by the
//! records of one job of a GetRecords batch (`Messages`), so that the workers split each
//! message in place, parsing it once, with no per-record document, window or reader.

use std::fmt;
use std::ops::Range;

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};

use crate::cloudtrail::{Element, Key};

/// Messages back to back, and where each lies: the elements the workers split.
#[derive(Debug, Default)]
pub struct Messages {
    text: Vec<u8>,
    spans: Vec<Span>,
}

#[derive(Debug, Clone, Copy)]
struct Span {
    start: usize,
    end: usize,
    /// Starts with `{` (once trimmed): parsed as an event. Anything else goes to the error
    /// output as text.
    object: bool,
}

/// Where `Messages` stood before a record was added: what a failed record is rolled back to.
#[derive(Debug, Clone, Copy, Default)]
pub struct Mark {
    text: usize,
    spans: usize,
}

impl Messages {
    pub fn mark(&self) -> Mark {
        Mark {
            text: self.text.len(),
            spans: self.spans.len(),
        }
    }

    /// Drops everything added since `mark`.
    pub fn rollback(&mut self, mark: Mark) {
        self.text.truncate(mark.text);
        self.spans.truncate(mark.spans);
    }

    /// The spans added since `mark`.
    pub fn since(&self, mark: Mark) -> Range<usize> {
        mark.spans..self.spans.len()
    }

    /// Adds one message: trimmed when it is an object, kept as it is when it is not (it goes
    /// to the error output as written).
    pub fn push(&mut self, message: &str) {
        let trimmed = message.trim();
        let object = trimmed.starts_with('{');
        let kept = if object { trimmed } else { message };
        let start = self.text.len();
        self.text.extend_from_slice(kept.as_bytes());
        self.spans.push(Span {
            start,
            end: self.text.len(),
            object,
        });
    }

    /// Adds text that goes to the error output as it is, whatever it looks like.
    pub fn push_text(&mut self, text: &str) {
        let start = self.text.len();
        self.text.extend_from_slice(text.as_bytes());
        self.spans.push(Span {
            start,
            end: self.text.len(),
            object: false,
        });
    }

    /// The elements of `spans` (a range `since` returned), in order.
    pub fn elements(&self, spans: Range<usize>) -> impl Iterator<Item = Element<'_>> + Clone {
        self.spans.get(spans).unwrap_or_default().iter().map(|s| {
            let bytes = self.text.get(s.start..s.end).unwrap_or_default();
            if s.object {
                Element::Object(bytes)
            } else {
                Element::Text(bytes)
            }
        })
    }

    /// Objects and texts in `spans`.
    pub fn counts(&self, spans: Range<usize>) -> (usize, usize) {
        let s = self.spans.get(spans).unwrap_or_default();
        let objects = s.iter().filter(|s| s.object).count();
        (objects, s.len() - objects)
    }

    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    /// The bytes held: the messages and their spans.
    pub fn weight(&self) -> usize {
        self.text.len() + self.spans.len() * std::mem::size_of::<Span>()
    }

    /// The bytes allocated, used or not.
    pub fn capacity(&self) -> usize {
        self.text.capacity() + self.spans.capacity() * std::mem::size_of::<Span>()
    }
}

/// What a record's top-level object holds, as far as the classifier cares.
#[derive(Debug, Default)]
pub struct Top {
    /// `messageType`: None when absent or null; `Some(None)` when not a string.
    pub message_type: Option<Option<String>>,
    pub event_version: bool,
    pub event_id: bool,
    pub event_time: bool,
}

/// The most log events one record may hold. CloudWatch Logs puts at most 10,000 in one
/// subscription record (a PutLogEvents call takes at most 10,000), so real data never comes
/// near it; a small gzip bomb of `{},{},…` would otherwise make millions of events, spans and
/// error records out of one record.
pub const MAX_LOG_EVENTS: usize = 20_000;

/// Why `read` refused a record.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// Not well-formed JSON, or `logEvents` is not the usual shape.
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    #[error("the record holds more than {MAX_LOG_EVENTS} log events")]
    TooManyLogEvents,
}

/// Reads a record's JSON once: the top-level fields of `Top`, and the messages of `logEvents`
/// (each event's `message`, `""` when it has none) into `messages`. On an error the caller
/// rolls `messages` back; a JSON error means the record is not well-formed JSON or its
/// `logEvents` is not the usual shape (the caller looks again, the slow way, to tell which).
pub fn read(text: &[u8], messages: &mut Messages) -> Result<Top, ReadError> {
    let mut de = serde_json::Deserializer::from_slice(text);
    let record = messages.mark();
    let top = de::Deserializer::deserialize_map(
        &mut de,
        TopVisitor {
            messages: &mut *messages,
            record,
        },
    );
    // Only `LogEvents` stopping at the cap leaves more spans than it behind.
    if messages.since(record).len() > MAX_LOG_EVENTS {
        return Err(ReadError::TooManyLogEvents);
    }
    let top = top?;
    de.end()?;
    Ok(top)
}

struct TopVisitor<'m> {
    messages: &'m mut Messages,
    /// Where this record's messages start.
    record: Mark,
}

impl<'de> Visitor<'de> for TopVisitor<'_> {
    type Value = Top;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Top, A::Error> {
        let mut top = Top::default();
        // `Key` borrows an unescaped key from the input (serde's `Cow<str>` always allocates).
        while let Some(Key(key)) = map.next_key::<Key<'de>>()? {
            match key.as_ref() {
                "messageType" => {
                    top.message_type = match map.next_value::<Any>()? {
                        Any::Null => None,
                        Any::Str(s) => Some(Some(s)),
                        Any::Other => Some(None),
                    }
                }
                "logEvents" => {
                    // A repeated key: the last one wins, as for any other key.
                    self.messages.rollback(self.record);
                    map.next_value_seed(LogEvents {
                        messages: &mut *self.messages,
                    })?;
                }
                "eventVersion" => {
                    top.event_version = !matches!(map.next_value::<Any>()?, Any::Null)
                }
                "eventID" => top.event_id = !matches!(map.next_value::<Any>()?, Any::Null),
                "eventTime" => top.event_time = !matches!(map.next_value::<Any>()?, Any::Null),
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(top)
    }
}

/// Null, a string, or anything else.
enum Any {
    Null,
    Str(String),
    Other,
}

impl<'de> de::Deserialize<'de> for Any {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(AnyVisitor)
    }
}

struct AnyVisitor;

impl<'de> Visitor<'de> for AnyVisitor {
    type Value = Any;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_str<E>(self, v: &str) -> Result<Any, E> {
        Ok(Any::Str(v.to_owned()))
    }
    fn visit_bool<E>(self, _: bool) -> Result<Any, E> {
        Ok(Any::Other)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Any, E> {
        Ok(Any::Other)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Any, E> {
        Ok(Any::Other)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Any, E> {
        Ok(Any::Other)
    }
    fn visit_unit<E>(self) -> Result<Any, E> {
        Ok(Any::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Any, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Any::Other)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Any, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Any::Other)
    }
}

/// `logEvents`: an array of objects.
struct LogEvents<'m> {
    messages: &'m mut Messages,
}

impl<'de> DeserializeSeed<'de> for LogEvents<'_> {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for LogEvents<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array of log events")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let start = self.messages.spans.len();
        while seq
            .next_element_seed(LogEvent {
                messages: &mut *self.messages,
            })?
            .is_some()
        {
            // Every log event adds one span. Past the cap, `read` reports it.
            if self.messages.spans.len() - start > MAX_LOG_EVENTS {
                return Err(de::Error::custom("too many log events"));
            }
        }
        Ok(())
    }
}

/// One log event: an object whose `message` is a string.
struct LogEvent<'m> {
    messages: &'m mut Messages,
}

impl<'de> DeserializeSeed<'de> for LogEvent<'_> {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for LogEvent<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a log event object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let before = self.messages.mark();
        let mut seen = false;
        while let Some(Key(key)) = map.next_key::<Key<'de>>()? {
            if key == "message" {
                if seen {
                    // The last `message` wins.
                    self.messages.rollback(before);
                }
                seen = true;
                map.next_value_seed(Message {
                    messages: &mut *self.messages,
                })?;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        if !seen {
            self.messages.push("");
        }
        Ok(())
    }
}

/// A message: a string, unescaped into the buffer.
struct Message<'m> {
    messages: &'m mut Messages,
}

impl<'de> DeserializeSeed<'de> for Message<'_> {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for Message<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string")
    }

    fn visit_str<E>(self, v: &str) -> Result<(), E> {
        self.messages.push(v);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(events: usize) -> String {
        let mut text = String::from(r#"{"messageType":"DATA_MESSAGE","logEvents":["#);
        for i in 0..events {
            if i > 0 {
                text.push(',');
            }
            text.push_str(r#"{"id":"1","message":"{}"}"#);
        }
        text.push_str("]}");
        text
    }

    #[test]
    fn a_record_of_more_log_events_than_the_cap_is_refused() {
        let mut messages = Messages::default();
        let top = read(batch(MAX_LOG_EVENTS).as_bytes(), &mut messages);
        assert!(top.is_ok(), "{top:?}");
        assert_eq!(messages.since(Mark::default()).len(), MAX_LOG_EVENTS);
        let mark = messages.mark();
        let refused = read(batch(MAX_LOG_EVENTS + 1).as_bytes(), &mut messages);
        assert!(
            matches!(refused, Err(ReadError::TooManyLogEvents)),
            "{refused:?}"
        );
        messages.rollback(mark);
        // Bare `{}` events count too: the cap is on log events, not on what they hold. The
        // read stops one past the cap instead of reading all of them first.
        let bomb = format!(
            r#"{{"messageType":"DATA_MESSAGE","logEvents":[{}]}}"#,
            vec!["{}"; MAX_LOG_EVENTS * 3].join(",")
        );
        assert!(matches!(
            read(bomb.as_bytes(), &mut messages),
            Err(ReadError::TooManyLogEvents)
        ));
        assert_eq!(messages.since(mark).len(), MAX_LOG_EVENTS + 1);
        messages.rollback(mark);
        assert_eq!(messages.since(Mark::default()).len(), MAX_LOG_EVENTS);
    }

    #[test]
    fn a_json_error_is_not_taken_for_the_cap() {
        let mut messages = Messages::default();
        let r = read(
            br#"{"messageType":"DATA_MESSAGE","logEvents":[{"message":"a"},"#,
            &mut messages,
        );
        assert!(matches!(r, Err(ReadError::Json(_))), "{r:?}");
    }
}
