//! `[detect]`: which Sigma rules run, how their field names map onto the written event, and
//! where alerts go. Checked up front (`validate`); rule files are compiled when the engine
//! opens (`Rules::load`), where a rule that does not compile is named with its reason.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::config::ConfigError;

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DetectConfig {
    /// Sigma YAML files or folders (searched for `.yml`/`.yaml`).
    pub rules: Vec<PathBuf>,
    /// Sigma field name → path in the written event (a pySigma `field_name_mapping`).
    pub fields: BTreeMap<String, String>,
    /// Values of `|expand` placeholders (`%name%` → one or more values, any of which
    /// matches), like pySigma's `value_placeholders`. A rule whose placeholder has no value
    /// here does not compile.
    pub placeholders: BTreeMap<String, Vec<String>>,
    /// Splice `"detections":[{id,title,level}]` into matched events.
    pub annotate: bool,
    /// Skip a rule that does not compile (with a warning and a metric) instead of refusing
    /// to start.
    pub skip_invalid: bool,
    /// Alert outputs; each gets every match at or above its `min_level`.
    pub alerts: Vec<AlertConfig>,
    /// Where Sigma correlation state lives (`[detect.correlation]`).
    pub correlation: super::correlate::config::CorrelationConfig,
    /// Seconds between checks of the rule files for a change (default 2; 0 = only SIGHUP).
    pub reload_secs: Option<u64>,
}

/// Sigma's rule levels, in order.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    #[default]
    Informational,
    Low,
    Medium,
    High,
    Critical,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Informational => "informational",
            Level::Low => "low",
            Level::Medium => "medium",
            Level::High => "high",
            Level::Critical => "critical",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AlertKind {
    Sqs,
    Sns,
    S3,
    Webhook,
    Kinesis,
}

impl AlertKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AlertKind::Sqs => "sqs",
            AlertKind::Sns => "sns",
            AlertKind::S3 => "s3",
            AlertKind::Webhook => "webhook",
            AlertKind::Kinesis => "kinesis",
        }
    }
}

/// What of the matched event an alert carries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EventPayload {
    /// The whole event as written.
    #[default]
    Full,
    /// Its eventID and source file only (the event stays in the output).
    Reference,
}

/// One `[[detect.alerts]]` output.
#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AlertConfig {
    pub kind: AlertKind,
    /// SQS queue URL, SNS topic ARN, Kinesis stream name or ARN, `s3://bucket/prefix/`, or
    /// the webhook's URL. Exactly one of `target` and `target_env`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub target: String,
    /// The environment variable that holds the target, read at start-up (a webhook URL is a
    /// secret: on Kubernetes it comes from a Secret, not the ConfigMap).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_env: Option<String>,
    /// Names the output in metrics and logs (default: the kind). A webhook URL is a secret
    /// and never appears there.
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub min_level: Level,
    /// One alert per rule and `suppress_key` per window; 0 = every match.
    #[serde(default)]
    pub suppress_secs: u64,
    /// Event fields whose values key suppression (with the rule).
    #[serde(default = "default_suppress_key")]
    pub suppress_key: Vec<String>,
    #[serde(default)]
    pub event: EventPayload,
    /// Attempts per alert before its notification is handed back (delivered again later).
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// AWS outputs: region and endpoint overrides.
    #[serde(default)]
    pub region: Option<String>,
    #[serde(default)]
    pub endpoint_url: Option<String>,
    /// S3 output: path-style addressing (S3-compatible stores).
    #[serde(default)]
    pub force_path_style: bool,
    /// Webhook: refuse plain `http://` URLs.
    #[serde(default)]
    pub tls_only: bool,
}

/// A webhook's URL (or a target read from the environment) is a secret: never shown.
impl std::fmt::Debug for AlertConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secret = self.kind == AlertKind::Webhook || self.target_env.is_some();
        let target = if secret { "<redacted>" } else { &self.target };
        f.debug_struct("AlertConfig")
            .field("kind", &self.kind)
            .field("target", &target)
            .field("target_env", &self.target_env)
            .field("name", &self.name)
            .field("min_level", &self.min_level)
            .field("suppress_secs", &self.suppress_secs)
            .field("suppress_key", &self.suppress_key)
            .field("event", &self.event)
            .field("max_attempts", &self.max_attempts)
            .field("region", &self.region)
            .field("endpoint_url", &self.endpoint_url)
            .field("force_path_style", &self.force_path_style)
            .field("tls_only", &self.tls_only)
            .finish()
    }
}

fn default_suppress_key() -> Vec<String> {
    vec!["userIdentity.arn".into()]
}

fn default_max_attempts() -> u32 {
    5
}

impl AlertConfig {
    /// This output with its target read from `target_env` (at start-up). The error names the
    /// key and the variable, never its value.
    pub fn resolved(&self, n: usize) -> Result<AlertConfig, ConfigError> {
        self.resolved_with(n, |var| std::env::var(var).ok())
    }

    fn resolved_with(
        &self,
        n: usize,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<AlertConfig, ConfigError> {
        let Some(var) = &self.target_env else {
            return Ok(self.clone());
        };
        let value = env(var).unwrap_or_default();
        let value = value.trim();
        if value.is_empty() {
            return Err(invalid(
                "detect.alerts.target_env",
                format!(
                    "alert {n} ({}): environment variable {var} is not set or empty",
                    self.kind.as_str()
                ),
            ));
        }
        let mut out = self.clone();
        out.target = value.to_owned();
        check_target(&out).map_err(|m| {
            invalid(
                "detect.alerts.target_env",
                format!("alert {n} ({}): {var}: {m}", self.kind.as_str()),
            )
        })?;
        Ok(out)
    }

    pub fn label(&self) -> String {
        self.name
            .clone()
            .unwrap_or_else(|| self.kind.as_str().to_owned())
    }
}

fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        message: message.into(),
    }
}

impl DetectConfig {
    /// How often the rule files are checked for a change, if at all.
    pub fn reload(&self) -> Option<std::time::Duration> {
        match self.reload_secs.unwrap_or(2) {
            0 => None,
            n => Some(std::time::Duration::from_secs(n)),
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.rules.is_empty() {
            return Err(invalid(
                "detect.rules",
                "name at least one Sigma rule file or folder",
            ));
        }
        for p in &self.rules {
            if !p.exists() {
                return Err(invalid(
                    "detect.rules",
                    format!("{} does not exist", p.display()),
                ));
            }
        }
        for (sigma, path) in &self.fields {
            if sigma.is_empty() || path.is_empty() || path.split('.').any(str::is_empty) {
                return Err(invalid(
                    "detect.fields",
                    format!(
                        "{sigma:?} = {path:?}: both sides must be field names (dots between parts)"
                    ),
                ));
            }
        }
        for (name, values) in &self.placeholders {
            if name.is_empty() || name.contains('%') || values.is_empty() {
                return Err(invalid(
                    "detect.placeholders",
                    format!("{name:?}: a name without % and at least one value"),
                ));
            }
        }
        self.correlation.validate()?;
        let mut names = std::collections::HashSet::new();
        for (i, a) in self.alerts.iter().enumerate() {
            let n = i + 1;
            match (&a.target_env, a.target.is_empty()) {
                (Some(_), false) | (None, true) => {
                    return Err(invalid(
                        "detect.alerts.target",
                        format!(
                            "alert {n} ({}): give exactly one of target and target_env",
                            a.kind.as_str()
                        ),
                    ));
                }
                (Some(var), true) => {
                    if !is_env_name(var) {
                        return Err(invalid(
                            "detect.alerts.target_env",
                            format!(
                                "alert {n} ({}): {var:?} is not an environment variable name (letters, digits, _)",
                                a.kind.as_str()
                            ),
                        ));
                    }
                }
                (None, false) => {}
            }
            // A target from the environment is checked when it is read (`resolved`).
            if a.target_env.is_none() {
                check_target(a).map_err(|m| {
                    invalid(
                        "detect.alerts.target",
                        format!("alert {n} ({}): {m}", a.kind.as_str()),
                    )
                })?;
            }
            if a.max_attempts == 0 {
                return Err(invalid(
                    "detect.alerts.max_attempts",
                    format!("alert {n}: must be at least 1"),
                ));
            }
            if a.suppress_secs > 0
                && (a.suppress_key.is_empty() || a.suppress_key.iter().any(String::is_empty))
            {
                return Err(invalid(
                    "detect.alerts.suppress_key",
                    format!("alert {n}: name at least one event field (e.g. \"userIdentity.arn\")"),
                ));
            }
            if !names.insert(a.label()) {
                return Err(invalid(
                    "detect.alerts.name",
                    format!(
                        "alert {n}: {:?} names two outputs; give each a distinct name",
                        a.label()
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// A portable environment variable name: letters, digits and `_`, not starting with a digit.
fn is_env_name(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with(|c: char| c.is_ascii_digit())
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn check_target(a: &AlertConfig) -> Result<(), String> {
    let t = a.target.as_str();
    let ok = match a.kind {
        AlertKind::Sqs => t.starts_with("https://") || t.starts_with("http://"),
        AlertKind::Sns => t.starts_with("arn:") && t.split(':').nth(2) == Some("sns"),
        AlertKind::Kinesis => !t.is_empty() && !t.contains(char::is_whitespace),
        AlertKind::S3 => t
            .strip_prefix("s3://")
            .is_some_and(|rest| !rest.split('/').next().unwrap_or("").is_empty()),
        AlertKind::Webhook => {
            t.starts_with("https://") || (!a.tls_only && t.starts_with("http://"))
        }
    };
    if ok {
        return Ok(());
    }
    Err(match a.kind {
        AlertKind::Sqs => {
            "must be a queue URL (https://sqs.REGION.amazonaws.com/ACCOUNT/NAME)".into()
        }
        AlertKind::Sns => "must be a topic ARN (arn:aws:sns:REGION:ACCOUNT:NAME)".into(),
        AlertKind::Kinesis => "must be a stream name or ARN".into(),
        AlertKind::S3 => "must be s3://bucket/prefix/".into(),
        AlertKind::Webhook if a.tls_only => "must be an https:// URL (tls_only = true)".into(),
        AlertKind::Webhook => "must be an http(s):// URL".into(),
    })
}

/// The bucket and key prefix of an `s3://` alert target (validated).
pub fn s3_target(target: &str) -> (String, String) {
    let rest = target.strip_prefix("s3://").unwrap_or(target);
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    let mut prefix = prefix.to_owned();
    if !prefix.is_empty() && !prefix.ends_with('/') {
        prefix.push('/');
    }
    (bucket.to_owned(), prefix)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(toml_text: &str) -> String {
        let cfg: DetectConfig = toml::from_str(toml_text).expect("parses");
        cfg.validate().expect_err("invalid").to_string()
    }

    #[test]
    fn a_webhook_or_environment_target_is_never_in_debug_output() {
        let alert = |text: &str| -> AlertConfig { toml::from_str(text).expect("parses") };
        let hook =
            alert("kind = \"webhook\"\ntarget = \"https://hooks.example/T0/B0/secret-token\"");
        let from_env = alert("kind = \"sqs\"\ntarget_env = \"Q\"");
        let mut resolved = from_env.clone();
        resolved.target = "https://sqs.example/111122223333/secret-queue".into();
        for cfg in [&hook, &resolved] {
            let shown = format!("{cfg:?}");
            assert!(
                !shown.contains("secret") && shown.contains("<redacted>"),
                "{shown}"
            );
        }
        let queue = alert("kind = \"sqs\"\ntarget = \"https://sqs.example/1/plain\"");
        assert!(format!("{queue:?}").contains("plain"));
    }

    #[test]
    fn bad_keys_are_named() {
        assert!(err("rules = []").contains("detect.rules"));
        assert!(err("rules = [\"/nonexistent/rules\"]").contains("/nonexistent/rules"));
        let here = env!("CARGO_MANIFEST_DIR");
        let e = err(&format!(
            "rules = [\"{here}\"]\nfields = {{ x = \"geo..c\" }}"
        ));
        assert!(e.contains("detect.fields"), "{e}");
        let e = err(&format!(
            "rules = [\"{here}\"]\nplaceholders = {{ Legitimate_Countries = [] }}"
        ));
        assert!(e.contains("detect.placeholders"), "{e}");
        let alert = |kind: &str, target: &str, extra: &str| {
            err(&format!(
                "rules = [\"{here}\"]\n[[alerts]]\nkind = \"{kind}\"\ntarget = \"{target}\"\n{extra}"
            ))
        };
        assert!(alert("sns", "https://x", "").contains("detect.alerts.target"));
        assert!(alert("sqs", "queue-name", "").contains("queue URL"));
        assert!(alert("s3", "bucket/alerts/", "").contains("s3://"));
        assert!(alert("webhook", "http://hooks", "tls_only = true").contains("https"));
        assert!(
            alert("sqs", "http://q", "max_attempts = 0").contains("detect.alerts.max_attempts")
        );
        assert!(
            alert("sqs", "http://q", "suppress_secs = 60\nsuppress_key = []")
                .contains("detect.alerts.suppress_key")
        );
        let two = format!(
            "rules = [\"{here}\"]\n[[alerts]]\nkind = \"sqs\"\ntarget = \"http://a\"\n[[alerts]]\nkind = \"sqs\"\ntarget = \"http://b\"\n"
        );
        assert!(err(&two).contains("detect.alerts.name"));
        let unknown: Result<DetectConfig, _> = toml::from_str("rules = []\nrulez = 1");
        assert!(unknown.unwrap_err().to_string().contains("rulez"));
        let level: Result<DetectConfig, _> = toml::from_str(
            "[[alerts]]\nkind = \"sqs\"\ntarget = \"http://a\"\nmin_level = \"severe\"",
        );
        assert!(level.unwrap_err().to_string().contains("severe"));
    }

    #[test]
    fn a_webhook_url_is_masked_in_the_printed_config() {
        let cfg = crate::config::Config::parse(
            "[detect]\nrules = [\"r\"]\n[[detect.alerts]]\nkind = \"webhook\"\ntarget = \"https://hooks.slack.com/services/T0/B0/token123\"\n",
        )
        .expect("parses");
        let text = cfg.effective_toml().expect("toml");
        assert!(!text.contains("token123"), "{text}");
        assert!(text.contains("https://hooks.slack.com/<masked>"), "{text}");
    }

    #[test]
    fn a_target_can_come_from_the_environment_and_its_value_is_never_in_an_error() {
        let here = env!("CARGO_MANIFEST_DIR");
        let cfg = |alert: &str| -> DetectConfig {
            toml::from_str(&format!("rules = [\"{here}\"]\n[[alerts]]\n{alert}")).expect("parses")
        };
        let both = cfg("kind = \"webhook\"\ntarget = \"https://a\"\ntarget_env = \"X\"");
        let e = both.validate().expect_err("both").to_string();
        assert!(
            e.contains("detect.alerts.target") && e.contains("exactly one"),
            "{e}"
        );
        let neither = cfg("kind = \"webhook\"");
        let e = neither.validate().expect_err("neither").to_string();
        assert!(e.contains("exactly one"), "{e}");
        let bad = cfg("kind = \"webhook\"\ntarget_env = \"NOT-A NAME\"");
        let e = bad.validate().expect_err("bad name").to_string();
        assert!(e.contains("detect.alerts.target_env"), "{e}");

        // Names unique to this test: the environment is the process's.
        let ok =
            cfg("kind = \"webhook\"\ntarget_env = \"TRAILHOSE_TEST_HOOK_URL\"\ntls_only = true");
        ok.validate().expect("valid without the variable");
        let a = ok.alerts.first().expect("alert");
        let with = |value: Option<&str>| {
            a.resolved_with(1, |var| {
                assert_eq!(var, "TRAILHOSE_TEST_HOOK_URL");
                value.map(str::to_owned)
            })
        };
        let e = with(None).expect_err("unset").to_string();
        assert!(
            e.contains("detect.alerts.target_env")
                && e.contains("TRAILHOSE_TEST_HOOK_URL")
                && e.contains("not set"),
            "{e}"
        );
        assert!(with(Some(" ")).is_err(), "empty");
        let e = with(Some("http://hooks.example/T0/secret-token"))
            .expect_err("plain http with tls_only")
            .to_string();
        assert!(e.contains("https") && !e.contains("secret-token"), "{e}");
        let r = with(Some("https://hooks.example/T0/secret-token\n")).expect("resolved");
        assert_eq!(r.target, "https://hooks.example/T0/secret-token");
    }

    #[test]
    fn s3_targets_split_into_bucket_and_prefix() {
        assert_eq!(s3_target("s3://b/alerts"), ("b".into(), "alerts/".into()));
        assert_eq!(s3_target("s3://b/alerts/"), ("b".into(), "alerts/".into()));
        assert_eq!(s3_target("s3://b"), ("b".into(), String::new()));
    }
}
