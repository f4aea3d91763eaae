//! Keeps every event as it is: measures the host's per-event overhead in the benchmark.

use trailhose_transform::{Config, Event, Outcome, Transform, export_transform};

struct Identity;

impl Transform for Identity {
    fn init(config: &Config) -> Result<Self, String> {
        config.only(&[])?;
        Ok(Identity)
    }

    fn process(&mut self, _event: &Event) -> Outcome {
        Outcome::Keep
    }
}

export_transform!(Identity);
