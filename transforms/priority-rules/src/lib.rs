//! Marks events that need a human look (`xpriority: "HIGH"`): calls from a country outside
//! the allowed list, and calls to high-priority services (IAM by default). Also copies the
//! GeoIP country into `xcountry_code`. Needs no JSON parse: it reads the host's pre-extracted
//! fields and answers with an annotation.
//!
//! Config: `allowed_countries` (default `US`), `high_priority_sources` (default
//! `iam.amazonaws.com`), `unknown_country_is_high` (default `false`: service principals such as
//! `ec2.amazonaws.com` have no country).

use trailhose_transform::{Config, Event, Outcome, Transform, export_transform};

struct PriorityRules {
    allowed: Vec<String>,
    high_sources: Vec<String>,
    unknown_is_high: bool,
}

impl Transform for PriorityRules {
    fn init(config: &Config) -> Result<Self, String> {
        config.only(&[
            "allowed_countries",
            "high_priority_sources",
            "unknown_country_is_high",
        ])?;
        let allowed = config.list("allowed_countries", &["US"]);
        if let Some(bad) = allowed
            .iter()
            .find(|c| c.len() != 2 || !c.bytes().all(|b| b.is_ascii_uppercase()))
        {
            return Err(format!(
                "allowed_countries: {bad:?} is not an ISO 3166 alpha-2 code such as US"
            ));
        }
        Ok(PriorityRules {
            allowed,
            high_sources: config.list("high_priority_sources", &["iam.amazonaws.com"]),
            unknown_is_high: config.flag("unknown_country_is_high", false)?,
        })
    }

    fn process(&mut self, event: &Event) -> Outcome {
        let f = &event.fields;
        let country = f.country.as_deref();
        let foreign = match country {
            Some(c) => !self.allowed.iter().any(|a| a == c),
            None => self.unknown_is_high,
        };
        let high_source = f
            .event_source
            .as_deref()
            .is_some_and(|s| self.high_sources.iter().any(|h| h == s));
        let mut members = Vec::with_capacity(2);
        if foreign || high_source {
            members.push(("xpriority", "HIGH"));
        }
        if let Some(c) = country {
            members.push(("xcountry_code", c));
        }
        if members.is_empty() {
            Outcome::Keep
        } else {
            Outcome::annotate(members)
        }
    }
}

export_transform!(PriorityRules);
