//! Elements already told apart by their container (the messages of a CloudWatch Logs batch):
//! each is parsed once for its head, as the splitter parses a delivery file's `Records`
//! elements, but in place, without a window over a reader.

use serde::Deserialize;

use super::{Head, Item, Kind, PREVIEW_BYTES, RecordReason, Report, Skipped, step};

/// One element, UTF-8 text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Element<'a> {
    /// Starts with `{`: an event when it is one whole JSON object.
    Object(&'a [u8]),
    /// Anything else.
    Text(&'a [u8]),
}

/// Hands on each element as the splitter would hand on the same elements in a `Records`
/// array: objects first, in order (`Event`, or `Skipped` when over `max_event_bytes`); then the
/// texts and the objects that are not valid JSON, each as a JSON string (`NotAnObject`), so that
/// the error output keeps them as they were written. What goes to the error output is numbered
/// by its position among the elements (a message's place in its batch), so no two of one record
/// share an `index`.
pub fn split_elements<'a, I, F>(elements: I, max_event_bytes: usize, mut on_item: F) -> Report
where
    I: Iterator<Item = Element<'a>> + Clone,
    F: FnMut(Item<'_>),
{
    let mut report = Report {
        result: Ok(Kind::Events),
        events: 0,
        not_objects: 0,
        skipped: 0,
        decompressed_bytes: 0,
    };
    // Positions of objects that are not valid JSON (rare): they go out with the texts.
    let mut broken: Vec<usize> = Vec::new();
    let mut offset = 0u64;
    for (at, element) in elements.clone().enumerate() {
        let raw = match element {
            Element::Object(raw) => raw,
            Element::Text(raw) => {
                offset += raw.len() as u64;
                continue;
            }
        };
        let start = offset;
        offset += raw.len() as u64;
        if raw.len() > max_event_bytes {
            report.skipped += 1;
            on_item(Item::Skipped(Skipped {
                index: at as u64,
                reason: RecordReason::TooLarge,
                offset: start,
                size: raw.len() as u64,
                raw: raw.get(..PREVIEW_BYTES).unwrap_or(raw),
                event_id: step::event_id_in(raw),
                detail: format!(
                    "the element is over the {max_event_bytes}-byte limit (pipeline.max_event_bytes)"
                ),
            }));
            continue;
        }
        let mut de = serde_json::Deserializer::from_slice(raw);
        match Head::deserialize(&mut de).and_then(|head| de.end().map(|()| head)) {
            Ok(head) => {
                report.events += 1;
                on_item(Item::Event { raw, head });
            }
            Err(_) => broken.push(at),
        }
    }
    report.decompressed_bytes = offset;
    let mut quoted = Vec::new();
    let mut broken = broken.into_iter().peekable();
    let mut offset = 0u64;
    for (at, element) in elements.enumerate() {
        let start = offset;
        let raw = match element {
            Element::Text(raw) => raw,
            Element::Object(raw) if broken.next_if_eq(&at).is_some() => raw,
            Element::Object(raw) => {
                offset += raw.len() as u64;
                continue;
            }
        };
        offset += raw.len() as u64;
        // The size limit holds for every element, as in a delivery file (a broken object is
        // within it already: it was measured above).
        if raw.len() > max_event_bytes {
            report.skipped += 1;
            on_item(Item::Skipped(Skipped {
                index: at as u64,
                reason: RecordReason::TooLarge,
                offset: start,
                size: raw.len() as u64,
                raw: raw.get(..PREVIEW_BYTES).unwrap_or(raw),
                event_id: None,
                detail: format!(
                    "the element is over the {max_event_bytes}-byte limit (pipeline.max_event_bytes)"
                ),
            }));
            continue;
        }
        quoted.clear();
        // Writing a string into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut quoted, &String::from_utf8_lossy(raw));
        report.not_objects += 1;
        on_item(Item::NotAnObject {
            index: at as u64,
            raw: &quoted,
        });
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items(elements: &[Element<'_>], max: usize) -> (Vec<String>, Report) {
        let mut seen = Vec::new();
        let report = split_elements(elements.iter().copied(), max, |item| {
            seen.push(match item {
                Item::Event { raw, head } => format!(
                    "event {} {}",
                    String::from_utf8_lossy(raw),
                    head.event_id.as_deref().unwrap_or("-")
                ),
                Item::NotAnObject { index, raw } => {
                    format!("text {index} {}", String::from_utf8_lossy(raw))
                }
                Item::Skipped(s) => format!(
                    "skipped {} {:?} {} {}",
                    s.index,
                    s.reason,
                    s.size,
                    s.event_id.as_deref().unwrap_or("-")
                ),
                Item::Unsplit { .. } => "unsplit".to_owned(),
            })
        });
        (seen, report)
    }

    #[test]
    fn objects_are_events_and_the_rest_follows_as_strings_numbered_by_position() {
        let big = format!(r#"{{"eventID":"big","pad":"{}"}}"#, "x".repeat(100));
        let elements = [
            Element::Text(b"plain \"text\""),
            Element::Object(br#"{"eventID":"a","n":1}"#),
            Element::Object(br#"{"eventID":"broken""#),
            Element::Object(big.as_bytes()),
            Element::Object(br#"{"eventID":"b"} trailing"#),
            Element::Text(b"[1]"),
            Element::Object(br#"{"eventID":"c","o":{"eventID":"inner"}}"#),
        ];
        let (seen, report) = items(&elements, 64);
        assert_eq!(
            seen,
            [
                r#"event {"eventID":"a","n":1} a"#,
                "skipped 3 TooLarge 126 big",
                r#"event {"eventID":"c","o":{"eventID":"inner"}} c"#,
                r#"text 0 "plain \"text\"""#,
                r#"text 2 "{\"eventID\":\"broken\"""#,
                r#"text 4 "{\"eventID\":\"b\"} trailing""#,
                r#"text 5 "[1]""#,
            ]
        );
        assert_eq!(
            (report.events, report.skipped, report.not_objects),
            (2, 1, 4)
        );
        assert!(report.result.is_ok());
    }

    #[test]
    fn an_object_is_an_event_only_when_it_is_the_whole_element() {
        // Deep nesting is valid JSON: an event, as the same element in a delivery file is.
        let deep = format!("{}1{}", r#"{"a":"#.repeat(5000), "}".repeat(5000));
        let elements = [
            Element::Object(deep.as_bytes()),
            Element::Object(br#"{"eventVersion":"1.09","eventID":"cut""#),
            Element::Object(br#"{"eventID":"x"}{"eventID":"smuggled"}"#),
            Element::Object(br#"{"eventID":"dup","eventID":"last"}"#),
        ];
        let (seen, report) = items(&elements, 1 << 20);
        assert_eq!(seen.len(), 4, "{seen:?}");
        assert!(seen[0].starts_with(r#"event {"a":{"a":"#) && seen[0].ends_with("}} -"));
        assert_eq!(seen[1], r#"event {"eventID":"dup","eventID":"last"} last"#);
        assert_eq!(
            seen[2],
            r#"text 1 "{\"eventVersion\":\"1.09\",\"eventID\":\"cut\"""#
        );
        assert_eq!(
            seen[3],
            r#"text 2 "{\"eventID\":\"x\"}{\"eventID\":\"smuggled\"}""#
        );
        assert_eq!((report.events, report.not_objects), (2, 2));
    }

    #[test]
    fn a_text_over_the_size_limit_is_skipped_too_large_with_its_preview() {
        let long = "x".repeat(100);
        let big = format!(r#"{{"eventID":"big","pad":"{long}"}}"#);
        let elements = [
            Element::Text(b"short"),
            Element::Text(long.as_bytes()),
            Element::Object(br#"{"eventID":"a"}"#),
            Element::Object(big.as_bytes()),
        ];
        let mut skipped = Vec::new();
        let report = split_elements(elements.iter().copied(), 64, |item| {
            if let Item::Skipped(s) = item {
                skipped.push((s.index, s.reason, s.offset, s.size, s.raw.to_vec()));
            }
        });
        // The oversized object and the oversized text each keep their own index.
        assert_eq!(
            skipped,
            [
                (
                    3,
                    RecordReason::TooLarge,
                    120,
                    126,
                    big.clone().into_bytes()
                ),
                (1, RecordReason::TooLarge, 5, 100, long.clone().into_bytes())
            ]
        );
        assert_eq!(
            (report.events, report.not_objects, report.skipped),
            (1, 1, 2)
        );
        // Over the preview size, only its first bytes are kept.
        let huge = "y".repeat(PREVIEW_BYTES * 3);
        let mut preview = 0;
        split_elements([Element::Text(huge.as_bytes())].into_iter(), 64, |item| {
            if let Item::Skipped(s) = item {
                preview = s.raw.len();
            }
        });
        assert_eq!(preview, PREVIEW_BYTES);
    }

    #[test]
    fn no_elements_is_an_empty_records_array() {
        let (seen, report) = items(&[], 64);
        assert!(seen.is_empty());
        assert_eq!((report.events, report.decompressed_bytes), (0, 0));
    }
}
