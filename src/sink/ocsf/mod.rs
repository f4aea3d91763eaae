//! OCSF output: CloudTrail events become Open Cybersecurity Schema Framework records
//! (version 1.1.0, the version of Amazon Security Lake's custom sources), one JSON line each,
//! chosen by `output.schema = "ocsf"`. The mapping runs where the event is buffered, so the
//! batcher, compression and every sink carry OCSF lines as they carry CloudTrail ones.

pub mod class;
pub mod lake;
pub mod map;
pub mod parquet;
pub mod report;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub use class::Class;
pub use map::VERSION;

/// Which schema events are written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Schema {
    /// The events as CloudTrail wrote them (with the enricher's additions).
    #[default]
    Cloudtrail,
    /// OCSF 1.1.0 records.
    Ocsf,
}

/// `[output.ocsf]`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct OcsfConfig {
    /// Also keep each CloudTrail event whole, as text, in `raw_data`.
    pub raw_data: bool,
}

/// Appends one OCSF JSON line for the event `raw` with `additions` (`"key":value` members,
/// e.g. `geo`) spliced in. `now` (Unix seconds) dates an event without a usable time. Bytes
/// that are not a JSON object (never from the splitter) still give a valid record, with the
/// bytes in `raw_data`.
pub fn encode_event(
    out: &mut Vec<u8>,
    raw: &[u8],
    additions: &[&[u8]],
    now: i64,
    cfg: &OcsfConfig,
) {
    let mut joined = Vec::new();
    let whole: &[u8] = if additions.is_empty() {
        raw
    } else {
        super::encode::splice(&mut joined, raw, additions);
        &joined
    };
    let (event, parsed) = match serde_json::from_slice::<Map<String, Value>>(whole) {
        Ok(m) => (m, true),
        Err(_) => (routing_fields(whole), false),
    };
    let text = (cfg.raw_data || !parsed).then(|| String::from_utf8_lossy(raw));
    let record = map::to_ocsf(event, now, text.as_deref());
    // Serializing a Value into a Vec cannot fail; its strings escape every newline.
    let _ = serde_json::to_writer(&mut *out, &record);
    out.push(b'\n');
}

/// What the partitioner routed an unparseable event by (the head reader skips nested values
/// without a depth limit), so that its record lands in the class its object holds.
fn routing_fields(event: &[u8]) -> Map<String, Value> {
    let mut m = Map::new();
    let Ok(head) = crate::cloudtrail::head_of(event) else {
        return m;
    };
    crate::metrics::emit(crate::metrics::OcsfEventUnparsed {
        event_id: head.event_id.as_deref(),
    });
    let fields = [
        ("eventTime", &head.event_time),
        ("eventSource", &head.event_source),
        ("eventName", &head.event_name),
        ("eventType", &head.event_type),
        ("eventID", &head.event_id),
        ("recipientAccountId", &head.account),
        ("awsRegion", &head.region),
        ("sourceIPAddress", &head.source_ip),
    ];
    for (name, value) in fields {
        if let Some(v) = value {
            m.insert(name.into(), Value::String(v.to_string()));
        }
    }
    if let Some(r) = head.read_only {
        m.insert("readOnly".into(), Value::Bool(r));
    }
    m
}

#[cfg(test)]
mod tests;
