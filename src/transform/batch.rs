//! A batch of events on its way through the transform modules, and the pure step that applies
//! a module's outcomes to it.

use std::borrow::Cow;
use std::ops::Range;
use std::sync::Arc;

use crate::cloudtrail::Head;
use crate::sink::encode::splice;

use super::OnFailure;
#[cfg(feature = "transforms")]
use super::host::{Member, Outcome};

/// Events in one buffer, each with the head fields the host routes on and shows to modules.
/// Event bytes and field strings live in two arenas: pushing an event allocates nothing once
/// the buffers have grown.
#[derive(Default)]
pub struct Batch {
    arena: Vec<u8>,
    text: String,
    items: Vec<Item>,
}

/// Where one event's strings are in the text arena.
type Span = Option<(u32, u32)>;

struct Item {
    range: Range<usize>,
    /// event_time, source_ip, account, region, event_source, event_type, event_id, event_name.
    fields: [Span; 8],
    read_only: Option<bool>,
    other_members: bool,
    country: Span,
    index: u64,
}

/// One event of a batch, borrowed.
#[derive(Debug, Clone, Copy)]
pub struct View<'a> {
    pub event: &'a [u8],
    pub event_time: Option<&'a str>,
    pub source_ip: Option<&'a str>,
    pub account: Option<&'a str>,
    pub region: Option<&'a str>,
    pub event_source: Option<&'a str>,
    pub event_type: Option<&'a str>,
    pub event_id: Option<&'a str>,
    pub event_name: Option<&'a str>,
    pub read_only: Option<bool>,
    /// The event may hold a member that is not CloudTrail's (`Head::other_members`).
    pub other_members: bool,
    /// The GeoIP country found for the original event.
    pub country: Option<&'a str>,
    /// The position of the original event in its file's `Records`.
    pub index: u64,
}

impl<'a> View<'a> {
    /// The routing fields, borrowed.
    pub fn head(&self) -> Head<'a> {
        let b = |s: Option<&'a str>| s.map(Cow::Borrowed);
        Head {
            event_time: b(self.event_time),
            source_ip: b(self.source_ip),
            account: b(self.account),
            region: b(self.region),
            event_source: b(self.event_source),
            event_type: b(self.event_type),
            event_id: b(self.event_id),
            event_name: b(self.event_name),
            read_only: self.read_only,
            other_members: self.other_members,
            members: None,
        }
    }
}

/// An event a module failed or returned malformed: it goes to the error output (or, by the
/// module's `on_failure`, without its body, or back to the source).
#[derive(Debug)]
pub struct Reject {
    pub module: Arc<str>,
    pub index: u64,
    pub reason: &'static str,
    pub detail: String,
    /// The event's `eventID`, kept when the body is dropped.
    pub event_id: Option<String>,
    /// The event as the module received it; empty under `on_failure = "drop_body"`.
    pub event: Vec<u8>,
    pub on_failure: OnFailure,
}

impl Reject {
    /// Applies the module's failure policy: `drop_body` forgets the event and the module's
    /// words about it.
    pub fn apply(&mut self, policy: OnFailure) {
        self.on_failure = policy;
        if policy == OnFailure::DropBody {
            self.event = Vec::new();
            self.detail = dropped_detail(self.reason);
        }
    }
}

/// The detail of a failure under `on_failure = "drop_body"`: the reason only.
pub fn dropped_detail(reason: &str) -> String {
    format!(
        "the module failed ({reason}); on_failure = \"drop_body\" keeps neither the event nor the module's output"
    )
}

/// Outcomes of one module call, by kind.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub kept: u64,
    pub annotated: u64,
    pub replaced: u64,
    /// Events split, and the events they became.
    pub split: u64,
    pub split_into: u64,
    pub dropped: u64,
    pub failed: u64,
}

impl Batch {
    /// Adds one event: `raw` with `additions` (`"key":value` members) spliced in.
    pub fn push(
        &mut self,
        raw: &[u8],
        additions: &[&[u8]],
        head: &Head<'_>,
        country: Option<&str>,
        index: u64,
    ) {
        let start = self.arena.len();
        splice(&mut self.arena, raw, additions);
        let mut put = |s: Option<&str>| -> Span {
            let s = s?;
            let at = u32::try_from(self.text.len()).ok()?;
            self.text.push_str(s);
            Some((at, u32::try_from(s.len()).ok()?))
        };
        let fields = [
            put(head.event_time.as_deref()),
            put(head.source_ip.as_deref()),
            put(head.account.as_deref()),
            put(head.region.as_deref()),
            put(head.event_source.as_deref()),
            put(head.event_type.as_deref()),
            put(head.event_id.as_deref()),
            put(head.event_name.as_deref()),
        ];
        let country = put(country);
        self.items.push(Item {
            range: start..self.arena.len(),
            fields,
            read_only: head.read_only,
            other_members: head.other_members,
            country,
            index,
        });
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub fn bytes(&self) -> usize {
        self.arena.len()
    }

    pub fn clear(&mut self) {
        self.arena.clear();
        self.text.clear();
        self.items.clear();
    }

    pub fn items(&self) -> impl Iterator<Item = View<'_>> {
        self.items.iter().map(|i| {
            let text = |span: Span| {
                span.and_then(|(at, len)| self.text.get(at as usize..(at + len) as usize))
            };
            let [t, ip, acct, reg, src, typ, id, name] = i.fields.map(text);
            View {
                event: &self.arena[i.range.clone()],
                event_time: t,
                source_ip: ip,
                account: acct,
                region: reg,
                event_source: src,
                event_type: typ,
                event_id: id,
                event_name: name,
                read_only: i.read_only,
                other_members: i.other_members,
                country: text(i.country),
                index: i.index,
            }
        })
    }

    /// Every event rejected with the same reason (the module call itself failed).
    pub fn reject_all(
        &self,
        module: &Arc<str>,
        reason: &'static str,
        detail: &str,
        out: &mut Vec<Reject>,
    ) {
        out.extend(self.items().map(|v| Reject {
            module: module.clone(),
            index: v.index,
            reason,
            detail: detail.to_owned(),
            event_id: v.event_id.map(str::to_owned),
            event: v.event.to_vec(),
            on_failure: OnFailure::ErrorOutput,
        }));
    }
}

#[cfg(feature = "transforms")]
/// Writes the members as `"key":value,"key":value` into `out` (cleared first), or says why
/// they are malformed.
fn annotation(members: &[Member], out: &mut Vec<u8>) -> Result<(), String> {
    out.clear();
    for (i, m) in members.iter().enumerate() {
        if m.key.is_empty() {
            return Err("an annotation has an empty key".to_owned());
        }
        // CloudTrail's own fields and geo, which the host wrote before the modules: adding one
        // would write the key twice (readers fold case, so any case counts). The arrival time
        // is the host's flag: a module's would pass as it. `detections` is the host's to
        // replace after the modules.
        if ["geo", crate::sink::partition::ARRIVAL_FIELD]
            .iter()
            .chain(crate::cloudtrail::fields::CLOUDTRAIL_FIELDS)
            .any(|f| f.eq_ignore_ascii_case(&m.key))
        {
            return Err(format!(
                "annotation {:?}: a CloudTrail or trailhose field (ignoring case) cannot be \
                 added; use replace to change it",
                truncate(&m.key, 80)
            ));
        }
        let value = m.value.trim();
        if !is_plain_string(value) && serde_json::from_str::<serde::de::IgnoredAny>(value).is_err()
        {
            return Err(format!(
                "annotation {:?}: value {:?} is not JSON text",
                m.key,
                truncate(value, 80)
            ));
        }
        if i > 0 {
            out.push(b',');
        }
        // Serializing a string into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, &m.key);
        out.push(b':');
        out.extend_from_slice(value.as_bytes());
    }
    Ok(())
}

#[cfg(feature = "transforms")]
/// A JSON string with nothing to unescape (`"HIGH"`): valid without a parse, and the common
/// annotation.
fn is_plain_string(v: &str) -> bool {
    let b = v.as_bytes();
    b.len() >= 2
        && b[0] == b'"'
        && b[b.len() - 1] == b'"'
        && b[1..b.len() - 1]
            .iter()
            .all(|&c| c != b'"' && c != b'\\' && c >= 0x20)
}

#[cfg(feature = "transforms")]
fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(feature = "transforms")]
/// A rewritten event is routed on its own fields, and on the original's where it has none: a
/// module that renames keys (lowercase-keys) must not send every event to the fallback
/// partition.
fn inherit<'a>(mut new: Head<'a>, old: &Head<'a>) -> Head<'a> {
    let fill = |n: &mut Option<_>, o: &Option<_>| {
        if n.is_none() {
            n.clone_from(o);
        }
    };
    fill(&mut new.event_time, &old.event_time);
    fill(&mut new.source_ip, &old.source_ip);
    fill(&mut new.account, &old.account);
    fill(&mut new.region, &old.region);
    fill(&mut new.event_source, &old.event_source);
    fill(&mut new.event_type, &old.event_type);
    fill(&mut new.event_id, &old.event_id);
    fill(&mut new.event_name, &old.event_name);
    if new.read_only.is_none() {
        new.read_only = old.read_only;
    }
    new
}

#[cfg(feature = "transforms")]
/// Applies one outcome per event of `input`, appending what is kept to `output` and what is
/// refused to `rejects`. `outcomes.len() == input.len()` is checked by the caller.
pub fn apply(
    module: &Arc<str>,
    input: &Batch,
    outcomes: &[Outcome],
    output: &mut Batch,
    rejects: &mut Vec<Reject>,
) -> Counts {
    let mut counts = Counts::default();
    let mut members = Vec::new();
    for (view, outcome) in input.items().zip(outcomes) {
        let mut reject = |reason: &'static str, detail: String| {
            rejects.push(Reject {
                module: module.clone(),
                index: view.index,
                reason,
                detail,
                event_id: view.event_id.map(str::to_owned),
                event: view.event.to_vec(),
                on_failure: OnFailure::ErrorOutput,
            })
        };
        let head = view.head();
        match outcome {
            Outcome::Keep => {
                counts.kept += 1;
                output.push(view.event, &[], &head, view.country, view.index);
            }
            Outcome::Annotate(list) => match annotation(list, &mut members) {
                Ok(()) => {
                    counts.annotated += 1;
                    let adds: &[&[u8]] = if list.is_empty() { &[] } else { &[&members] };
                    // An annotation is never a CloudTrail field (refused above), but may be
                    // one the host writes later (`detections`).
                    let head = Head {
                        other_members: head.other_members || !list.is_empty(),
                        ..head
                    };
                    output.push(view.event, adds, &head, view.country, view.index);
                }
                Err(detail) => {
                    counts.failed += 1;
                    reject("malformed_output", detail);
                }
            },
            Outcome::Replace(bytes) => match crate::cloudtrail::head_of(bytes) {
                Ok(new) => {
                    counts.replaced += 1;
                    let new = inherit(new, &head);
                    output.push(bytes, &[], &new, view.country, view.index);
                }
                Err(e) => {
                    counts.failed += 1;
                    reject(
                        "malformed_output",
                        format!("the replacement is not a JSON object: {e}"),
                    );
                }
            },
            Outcome::Split(parts) => {
                let heads: Result<Vec<Head<'_>>, _> = parts
                    .iter()
                    .map(|p| crate::cloudtrail::head_of(p).map(|h| inherit(h, &head)))
                    .collect();
                match heads {
                    Ok(heads) => {
                        counts.split += 1;
                        counts.split_into += parts.len() as u64;
                        for (p, h) in parts.iter().zip(heads) {
                            output.push(p, &[], &h, view.country, view.index);
                        }
                    }
                    Err(e) => {
                        counts.failed += 1;
                        reject(
                            "malformed_output",
                            format!("a split part is not a JSON object: {e}"),
                        );
                    }
                }
            }
            Outcome::Drop => counts.dropped += 1,
            Outcome::Failed(message) => {
                counts.failed += 1;
                reject("module_failed", truncate(message, 1024).to_owned());
            }
        }
    }
    counts
}

#[cfg(feature = "transforms")]
#[cfg(test)]
mod tests {
    use super::*;
    use crate::cloudtrail;

    fn batch(events: &[&str]) -> Batch {
        let mut b = Batch::default();
        for (i, e) in events.iter().enumerate() {
            let head = cloudtrail::head_of(e.as_bytes()).unwrap();
            b.push(e.as_bytes(), &[], &head, Some("US"), i as u64);
        }
        b
    }

    fn texts(b: &Batch) -> Vec<String> {
        b.items()
            .map(|v| String::from_utf8(v.event.to_vec()).unwrap())
            .collect()
    }

    fn member(k: &str, v: &str) -> Member {
        Member {
            key: k.into(),
            value: v.into(),
        }
    }

    #[test]
    fn push_splices_additions_into_objects_even_empty_ones() {
        let mut b = Batch::default();
        b.push(br#"{"a":1}"#, &[br#""geo":{}"#], &Head::default(), None, 0);
        b.push(b"{ }", &[b"\"x\":1", b"\"y\":2"], &Head::default(), None, 1);
        assert_eq!(texts(&b), [r#"{"a":1,"geo":{}}"#, r#"{ "x":1,"y":2}"#]);
    }

    #[test]
    fn every_outcome_kind_is_applied_and_counted() {
        let input = batch(&[
            r#"{"eventID":"1"}"#,
            r#"{"eventID":"2"}"#,
            r#"{"eventID":"3"}"#,
            r#"{"eventID":"4"}"#,
            r#"{"eventID":"5"}"#,
            r#"{"eventID":"6"}"#,
        ]);
        let outcomes = vec![
            Outcome::Keep,
            Outcome::Annotate(vec![member("xpriority", "\"HIGH\""), member("n", " 3 ")]),
            Outcome::Replace(br#"{"eventID":"3b","eventTime":"2024-01-01T00:00:00Z"}"#.to_vec()),
            Outcome::Split(vec![
                br#"{"eventID":"4a"}"#.to_vec(),
                br#"{"eventID":"4b"}"#.to_vec(),
            ]),
            Outcome::Drop,
            Outcome::Failed("no".into()),
        ];
        let (mut out, mut rejects) = (Batch::default(), Vec::new());
        let m: Arc<str> = "m".into();
        let c = apply(&m, &input, &outcomes, &mut out, &mut rejects);
        assert_eq!(
            c,
            Counts {
                kept: 1,
                annotated: 1,
                replaced: 1,
                split: 1,
                split_into: 2,
                dropped: 1,
                failed: 1
            }
        );
        assert_eq!(
            texts(&out),
            [
                r#"{"eventID":"1"}"#,
                r#"{"eventID":"2","xpriority":"HIGH","n":3}"#,
                r#"{"eventID":"3b","eventTime":"2024-01-01T00:00:00Z"}"#,
                r#"{"eventID":"4a"}"#,
                r#"{"eventID":"4b"}"#,
            ]
        );
        // Only the annotated event may hold a member the host writes later (`detections`):
        // the others need no second parse to strip one.
        let others: Vec<bool> = out.items().map(|v| v.other_members).collect();
        assert_eq!(others, [false, true, false, false, false]);
        // A replacement is routed on its own fields; the original's country and index stay.
        let third = out.items().nth(2).unwrap();
        assert_eq!(third.event_time, Some("2024-01-01T00:00:00Z"));
        assert_eq!((third.index, third.country), (2, Some("US")));
        let split_part = out.items().nth(4).unwrap();
        assert_eq!((split_part.event_id, split_part.index), (Some("4b"), 3));
        // Fields the replacement lacks are inherited from the original.
        let lowered = batch(&[r#"{"eventID":"9","eventTime":"2024-05-05T00:00:00Z"}"#]);
        let (mut out2, mut rej2) = (Batch::default(), Vec::new());
        let replaced = [Outcome::Replace(
            br#"{"eventid":"9","eventtime":"x"}"#.to_vec(),
        )];
        apply(&m, &lowered, &replaced, &mut out2, &mut rej2);
        let view = out2.items().next().unwrap();
        assert_eq!(view.event_time, Some("2024-05-05T00:00:00Z"));
        assert_eq!(rejects.len(), 1);
        assert_eq!(
            (
                rejects[0].index,
                rejects[0].reason,
                rejects[0].detail.as_str()
            ),
            (5, "module_failed", "no")
        );
        assert_eq!(rejects[0].event, br#"{"eventID":"6"}"#);
    }

    #[test]
    fn plain_strings_skip_the_parse_and_everything_else_is_parsed() {
        assert!(is_plain_string(r#""HIGH""#) && is_plain_string(r#""""#));
        assert!(!is_plain_string(r#""a\"b""#) && !is_plain_string("\"a\u{1}\""));
        assert!(!is_plain_string("3") && !is_plain_string("\""));
        let mut out = Vec::new();
        let ok = [
            member("k\"q", r#""a\"b""#),
            member("n", "[1, {\"x\":null}]"),
        ];
        annotation(&ok, &mut out).unwrap();
        assert_eq!(out, br#""k\"q":"a\"b","n":[1, {"x":null}]"#);
        assert!(annotation(&[member("k", "\"open")], &mut out).is_err());
        // A field the event has, or trailhose writes, in any case: it would be written twice.
        for key in [
            "eventName",
            "EVENTNAME",
            "geo",
            "Geo",
            "recipientAccountId",
            "trailhoseArrivalTime",
            "TRAILHOSEARRIVALTIME",
        ] {
            let e = annotation(&[member(key, "\"x\"")], &mut out).unwrap_err();
            assert!(e.contains("use replace"), "{key}: {e}");
        }
    }

    #[test]
    fn malformed_outputs_reject_only_their_event() {
        let input = batch(&[r#"{"a":1}"#, r#"{"a":2}"#, r#"{"a":3}"#, r#"{"a":4}"#]);
        let outcomes = vec![
            Outcome::Replace(b"[1,2]".to_vec()),
            Outcome::Annotate(vec![member("k", "not json")]),
            Outcome::Split(vec![br#"{"ok":1}"#.to_vec(), b"{broken".to_vec()]),
            Outcome::Annotate(vec![member("", "1")]),
        ];
        let (mut out, mut rejects) = (Batch::default(), Vec::new());
        let c = apply(&"m".into(), &input, &outcomes, &mut out, &mut rejects);
        assert_eq!(c.failed, 4);
        assert!(out.is_empty());
        assert!(rejects.iter().all(|r| r.reason == "malformed_output"));
        assert!(
            rejects[1].detail.contains("not JSON"),
            "{}",
            rejects[1].detail
        );
    }
}
