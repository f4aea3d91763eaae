//! The seed's priority rule on enrichment tables: `xpriority: "HIGH"` for a call into a
//! production account (`env=prod` in the accounts table) from an address outside the corporate
//! egress ranges (the egress table, a CIDR table). Uses the `lookup` host import
//! (`trailhose:transform@0.2.0`); the module's `[[transforms]]` entry must grant both tables
//! (`tables = ["accounts", "egress"]`).
//!
//! Config: `accounts_table` (default `accounts`), `egress_table` (default `egress`),
//! `env_column` (default `env`), `prod` (default `prod`). A `sourceIPAddress` that is not an
//! address (a service such as `ec2.amazonaws.com`) is never HIGH: AWS calls on the account's
//! behalf.

use std::net::IpAddr;

use trailhose_transform::{Config, Event, Outcome, Transform, count, export_transform, lookup};

struct ProdEgress {
    accounts: String,
    egress: String,
    env_column: String,
    prod: String,
}

impl Transform for ProdEgress {
    fn init(config: &Config) -> Result<Self, String> {
        config.only(&["accounts_table", "egress_table", "env_column", "prod"])?;
        let get = |k: &str, d: &str| config.get(k).unwrap_or(d).to_owned();
        Ok(ProdEgress {
            accounts: get("accounts_table", "accounts"),
            egress: get("egress_table", "egress"),
            env_column: get("env_column", "env"),
            prod: get("prod", "prod"),
        })
    }

    fn process(&mut self, event: &Event) -> Outcome {
        let f = &event.fields;
        let Some(ip) = f.source_ip_address.as_deref() else {
            return Outcome::Keep;
        };
        if ip.parse::<IpAddr>().is_err() {
            return Outcome::Keep;
        }
        let prod = f
            .account
            .as_deref()
            .and_then(|a| lookup(&self.accounts, a))
            .is_some_and(|row| row.get(&self.env_column) == Some(self.prod.as_str()));
        if !prod {
            return Outcome::Keep;
        }
        match lookup(&self.egress, ip) {
            Some(range) => {
                count("prod_from_egress", 1);
                let label = range.get("label").unwrap_or("egress");
                Outcome::annotate([("xnetwork", label)])
            }
            None => Outcome::annotate([
                ("xpriority", "HIGH"),
                (
                    "xreason",
                    "production account called from outside the egress ranges",
                ),
            ]),
        }
    }
}

export_transform!(ProdEgress);
