//! Drops read-only events (`readOnly: true`) from the configured services: the Describe/List/Get
//! chatter that dominates volume and rarely matters in an audit. Failed reads (an `errorCode`,
//! such as AccessDenied) are kept by default: they are how reconnaissance shows up.
//!
//! Config: `services` (required, comma-separated eventSource values such as
//! `ec2.amazonaws.com`), `keep_errors` (default `true`). Dropped events are counted per
//! service as `dropped_<service>`.

use trailhose_transform::{Config, Event, Outcome, Transform, count, export_transform};

struct DropNoise {
    services: Vec<String>,
    keep_errors: bool,
}

impl Transform for DropNoise {
    fn init(config: &Config) -> Result<Self, String> {
        config.only(&["services", "keep_errors"])?;
        let services = config.list("services", &[]);
        if services.is_empty() {
            return Err(
                "services: list the eventSource values whose read-only events to drop, e.g. \
                 services = \"ec2.amazonaws.com,s3.amazonaws.com\""
                    .to_owned(),
            );
        }
        Ok(DropNoise {
            services,
            keep_errors: config.flag("keep_errors", true)?,
        })
    }

    fn process(&mut self, event: &Event) -> Outcome {
        let f = &event.fields;
        if f.read_only != Some(true) {
            return Outcome::Keep;
        }
        let Some(source) = f.event_source.as_deref() else {
            return Outcome::Keep;
        };
        if !self.services.iter().any(|s| s == source) {
            return Outcome::Keep;
        }
        if self.keep_errors && event.has_key("errorCode") {
            return Outcome::Keep;
        }
        let service = source.split('.').next().unwrap_or(source);
        count(&format!("dropped_{service}"), 1);
        Outcome::Drop
    }
}

export_transform!(DropNoise);
