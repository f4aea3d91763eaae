//! `[output.security_lake]`: Amazon Security Lake's custom-source layout and rules. One custom
//! source per OCSF class, objects under
//! `ext/<source_name>/region=<region>/accountId=<account>/eventDay=<YYYYMMDD>/`, Parquet, one
//! class per object, rows sorted by time, written every 5 minutes to 1 day.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::class::Class;

/// Security Lake asks for objects written no more often than every 5 minutes and no less
/// often than once a day (`batch.max_age_secs` is checked against it).
pub const MIN_AGE_SECS: u64 = 300;
pub const MAX_AGE_SECS: u64 = 86_400;
/// `CreateCustomLogSource`'s `sourceName`: 1 to 64 characters.
const MAX_NAME: usize = 64;
/// The placeholder of a source-name template.
const CLASS: &str = "{class}";

/// `source_name`: a template with `{class}` (the class's schema name, `api_activity`, ...) or
/// a table naming the source of every class.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum SourceName {
    Template(String),
    PerClass(BTreeMap<String, String>),
}

/// `[output.security_lake]`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SecurityLakeConfig {
    pub source_name: SourceName,
    /// The partition's `accountId`; unset: the event's `recipientAccountId`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account_id: Option<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{key}: {message}")]
pub struct LakeError {
    pub key: &'static str,
    pub message: String,
}

fn err(key: &'static str, message: impl Into<String>) -> LakeError {
    LakeError {
        key,
        message: message.into(),
    }
}

/// The checked settings: a source name for every class and the account, if fixed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lake {
    sources: [(Class, String); 3],
    pub account_id: Option<String>,
}

impl SecurityLakeConfig {
    pub fn check(&self) -> Result<Lake, LakeError> {
        const KEY: &str = "output.security_lake.source_name";
        let name_of = |c: Class| -> Result<String, LakeError> {
            match &self.source_name {
                SourceName::Template(t) => {
                    if !t.contains(CLASS) {
                        return Err(err(
                            KEY,
                            "Security Lake takes one OCSF class per custom source: put {class} in the name, or name a source per class (api_activity, authentication, account_change)",
                        ));
                    }
                    Ok(t.replace(CLASS, c.slug()))
                }
                SourceName::PerClass(m) => m.get(c.slug()).cloned().ok_or_else(|| {
                    err(
                        KEY,
                        format!(
                            "no source for class {} (a table names one for each of api_activity, authentication, account_change)",
                            c.slug()
                        ),
                    )
                }),
            }
        };
        if let SourceName::PerClass(m) = &self.source_name
            && let Some(k) = m.keys().find(|k| Class::ALL.iter().all(|c| c.slug() != *k))
        {
            return Err(err(
                KEY,
                format!("{k:?} is not a class (api_activity, authentication, account_change)"),
            ));
        }
        let mut sources = Vec::with_capacity(3);
        for c in Class::ALL {
            let n = name_of(c)?;
            let ok_chars = n
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
            if n.is_empty() || n.len() > MAX_NAME || !ok_chars || n.bytes().all(|b| b == b'.') {
                return Err(err(
                    KEY,
                    format!(
                        "{n:?} (class {}) must be 1 to {MAX_NAME} characters of A-Z a-z 0-9 - _ .",
                        c.slug()
                    ),
                ));
            }
            if sources.iter().any(|(_, s)| *s == n) {
                return Err(err(
                    KEY,
                    format!("{n:?} names two classes' source; each class needs its own"),
                ));
            }
            sources.push((c, n));
        }
        if let Some(a) = &self.account_id
            && (a.len() != 12 || !a.bytes().all(|b| b.is_ascii_digit()))
        {
            return Err(err(
                "output.security_lake.account_id",
                format!("{a:?} is not a 12-digit AWS account id"),
            ));
        }
        let sources = match <[(Class, String); 3]>::try_from(sources) {
            Ok(s) => s,
            Err(_) => return Err(err(KEY, "three classes, three sources")),
        };
        Ok(Lake {
            sources,
            account_id: self.account_id.clone(),
        })
    }
}

/// Checks `batch.max_age_secs` against Security Lake's 5-minute-to-1-day rule.
pub fn check_age(max_age_secs: u64) -> Result<(), LakeError> {
    if (MIN_AGE_SECS..=MAX_AGE_SECS).contains(&max_age_secs) {
        return Ok(());
    }
    Err(err(
        "batch.max_age_secs",
        format!(
            "{max_age_secs} is outside {MIN_AGE_SECS}..={MAX_AGE_SECS}: Security Lake takes objects written every 5 minutes to 1 day"
        ),
    ))
}

impl Lake {
    /// The custom source of a class.
    pub fn source(&self, class: Class) -> &str {
        self.sources
            .iter()
            .find(|(c, _)| *c == class)
            .map_or("", |(_, s)| s.as_str())
    }

    pub fn sources(&self) -> impl Iterator<Item = (Class, &str)> {
        self.sources.iter().map(|(c, s)| (*c, s.as_str()))
    }

    /// The key template below one class's source: region, account, day.
    pub fn partition_template(&self) -> String {
        let account = self.account_id.as_deref().unwrap_or("{account}");
        format!("region={{region}}/accountId={account}/eventDay={{year}}{{month}}{{day}}/")
    }

    /// The prefix of a class's objects, from the output root.
    pub fn prefix(&self, class: Class) -> String {
        format!("ext/{}/", self.source(class))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(toml_text: &str) -> Result<Lake, LakeError> {
        let c: SecurityLakeConfig = toml::from_str(toml_text).unwrap();
        c.check()
    }

    #[test]
    fn a_template_or_a_table_names_a_source_per_class() {
        let lake = cfg("source_name = \"trailhose-{class}\"\n").unwrap();
        assert_eq!(
            lake.source(Class::Authentication),
            "trailhose-authentication"
        );
        assert_eq!(
            lake.prefix(Class::ApiActivity),
            "ext/trailhose-api_activity/"
        );
        assert_eq!(
            lake.partition_template(),
            "region={region}/accountId={account}/eventDay={year}{month}{day}/"
        );
        let lake = cfg("account_id = \"123456789012\"\n[source_name]\napi_activity = \"ct-api\"\nauthentication = \"ct-auth\"\naccount_change = \"ct-iam\"\n").unwrap();
        assert_eq!(lake.source(Class::AccountChange), "ct-iam");
        assert!(
            lake.partition_template()
                .contains("accountId=123456789012/")
        );
    }

    #[test]
    fn bad_names_accounts_and_ages_are_refused_naming_the_key() {
        let key = |r: Result<Lake, LakeError>| r.unwrap_err().key;
        assert_eq!(
            key(cfg("source_name = \"one-source\"\n")),
            "output.security_lake.source_name"
        );
        assert_eq!(
            key(cfg(
                "[source_name]\napi_activity = \"a\"\nauthentication = \"b\"\n"
            )),
            "output.security_lake.source_name"
        );
        assert_eq!(
            key(cfg(
                "[source_name]\napi_activity = \"a\"\nauthentication = \"a\"\naccount_change = \"c\"\n"
            )),
            "output.security_lake.source_name"
        );
        assert_eq!(
            key(cfg(
                "[source_name]\napi_activity = \"a\"\nauthentication = \"b\"\naccount_change = \"c\"\nfindings = \"d\"\n"
            )),
            "output.security_lake.source_name"
        );
        assert_eq!(
            key(cfg("source_name = \"a/{class}\"\n")),
            "output.security_lake.source_name"
        );
        let long = format!("source_name = \"{}{{class}}\"\n", "x".repeat(60));
        assert_eq!(key(cfg(&long)), "output.security_lake.source_name");
        assert_eq!(
            key(cfg("source_name = \"t-{class}\"\naccount_id = \"12345\"\n")),
            "output.security_lake.account_id"
        );
        assert!(check_age(300).is_ok() && check_age(86_400).is_ok());
        assert_eq!(check_age(299).unwrap_err().key, "batch.max_age_secs");
        assert_eq!(check_age(86_401).unwrap_err().key, "batch.max_age_secs");
    }
}
