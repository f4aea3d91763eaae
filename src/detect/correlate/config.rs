//! `[detect.correlation]`: where Sigma correlation state lives. Checked up front with the
//! rest of `[detect]`.

use serde::{Deserialize, Serialize};

use crate::config::ConfigError;

/// Where correlation counts are kept.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// In this process's memory: right for one worker (or `detect backtest`).
    #[default]
    InProcess,
    /// In a DynamoDB table shared by every worker: counts are global.
    Dynamodb,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CorrelationConfig {
    pub mode: Mode,
    /// The DynamoDB table (`mode = "dynamodb"`); created (on demand, TTL on `expires_at`)
    /// when it does not exist.
    pub table: Option<String>,
    pub region: Option<String>,
    pub endpoint_url: Option<String>,
    /// How long a window's state is kept after its end or its last update, whichever is
    /// later (the TTL; late and redelivered events within it are counted once).
    pub retention_secs: u64,
    /// `in_process`: counted members (eventIDs, values, rule names) all correlations keep in
    /// memory together, shared evenly among them (default `store::MAX_MEMBERS`).
    pub max_members: Option<usize>,
}

impl Default for CorrelationConfig {
    fn default() -> Self {
        CorrelationConfig {
            mode: Mode::InProcess,
            table: None,
            region: None,
            endpoint_url: None,
            retention_secs: 86_400,
            max_members: None,
        }
    }
}

fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        message: message.into(),
    }
}

/// DynamoDB's table-name rule: 3–255 of `[A-Za-z0-9_.-]`.
fn valid_table(name: &str) -> bool {
    (3..=255).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// `max_members` bounds: below, a correlation with a high threshold keeps only a few groups;
/// above, about 100 bytes a member would take gigabytes.
const MAX_MEMBERS_MIN: usize = 10_000;
const MAX_MEMBERS_MAX: usize = 50_000_000;

impl CorrelationConfig {
    /// The members in-process correlations keep in memory together.
    pub fn max_members(&self) -> usize {
        self.max_members.unwrap_or(super::store::MAX_MEMBERS)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        match self.mode {
            Mode::Dynamodb if self.max_members.is_some() => {
                return Err(invalid(
                    "detect.correlation.max_members",
                    "only with mode = \"in_process\" (DynamoDB keeps the state)",
                ));
            }
            Mode::Dynamodb => match self.table.as_deref() {
                None => {
                    return Err(invalid(
                        "detect.correlation.table",
                        "mode = \"dynamodb\" needs the table's name",
                    ));
                }
                Some(t) if !valid_table(t) => {
                    return Err(invalid(
                        "detect.correlation.table",
                        format!("{t:?}: 3 to 255 letters, digits, '_', '.' or '-'"),
                    ));
                }
                Some(_) => {}
            },
            Mode::InProcess => {
                let stray = [
                    ("detect.correlation.table", self.table.is_some()),
                    ("detect.correlation.region", self.region.is_some()),
                    (
                        "detect.correlation.endpoint_url",
                        self.endpoint_url.is_some(),
                    ),
                ];
                if let Some((key, _)) = stray.iter().find(|(_, set)| *set) {
                    return Err(invalid(key, "only with mode = \"dynamodb\""));
                }
            }
        }
        if let Some(n) = self.max_members
            && !(MAX_MEMBERS_MIN..=MAX_MEMBERS_MAX).contains(&n)
        {
            return Err(invalid(
                "detect.correlation.max_members",
                format!("{n}: must be {MAX_MEMBERS_MIN} to {MAX_MEMBERS_MAX}"),
            ));
        }
        if self.retention_secs < 60 {
            return Err(invalid(
                "detect.correlation.retention_secs",
                "must be at least 60",
            ));
        }
        if let Some(e) = &self.endpoint_url
            && !(e.starts_with("https://") || e.starts_with("http://"))
        {
            return Err(invalid(
                "detect.correlation.endpoint_url",
                "must be an http(s):// URL",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        let c: CorrelationConfig = toml::from_str(text).expect("parses");
        c.validate().expect_err("invalid").to_string()
    }

    #[test]
    fn bad_keys_are_named() {
        assert!(err("mode = \"dynamodb\"").contains("detect.correlation.table"));
        assert!(err("mode = \"dynamodb\"\ntable = \"a b\"").contains("detect.correlation.table"));
        assert!(err("table = \"t-1\"").contains("only with mode"));
        assert!(err("region = \"eu-west-1\"").contains("detect.correlation.region"));
        assert!(err("retention_secs = 5").contains("detect.correlation.retention_secs"));
        assert!(err("max_members = 5").contains("detect.correlation.max_members"));
        assert!(
            err("mode = \"dynamodb\"\ntable = \"t-1\"\nmax_members = 100000")
                .contains("only with mode = \"in_process\"")
        );
        let ok: CorrelationConfig = toml::from_str("max_members = 100000").expect("ok");
        ok.validate().expect("valid");
        assert_eq!(ok.max_members(), 100_000);
        assert_eq!(CorrelationConfig::default().max_members(), 2_000_000);
        assert!(
            err("mode = \"dynamodb\"\ntable = \"t-1\"\nendpoint_url = \"localhost\"")
                .contains("detect.correlation.endpoint_url")
        );
        let unknown: Result<CorrelationConfig, _> = toml::from_str("tabel = \"x\"");
        assert!(unknown.unwrap_err().to_string().contains("tabel"));
        let mode: Result<CorrelationConfig, _> = toml::from_str("mode = \"redis\"");
        assert!(mode.unwrap_err().to_string().contains("redis"));
        let ok: CorrelationConfig =
            toml::from_str("mode = \"dynamodb\"\ntable = \"trailhose-correlation\"").expect("ok");
        ok.validate().expect("valid");
        CorrelationConfig::default()
            .validate()
            .expect("default valid");
    }
}
