//! Where an event goes: its partition, rendered from a Firehose-style key template.

use std::fmt::Write;

use crate::clock::Utc;
use crate::cloudtrail::Head;
use crate::sink::ocsf::Class;

/// Athena/Hive layout by event hour.
pub const DEFAULT_TEMPLATE: &str = "year={year}/month={month}/day={day}/hour={hour}/";
/// Events whose `eventTime` is missing or malformed when the template needs the time: empty
/// means "partition them by arrival time", so the tree keeps one shape that every Hive-style
/// reader (Athena's projection, DuckDB, Spark) accepts.
pub const DEFAULT_FALLBACK: &str = "";
/// The field spliced into an event partitioned by its arrival time instead of its `eventTime`.
pub const ARRIVAL_FIELD: &str = "trailhoseArrivalTime";
/// The earliest usable `eventTime`: CloudTrail started in November 2013, and the Athena DDL's
/// partition projection (`year` 2013–2099, `eventDay` from 20130101) starts here.
pub const EARLIEST_EVENT_YEAR: i32 = 2013;
/// How far past its arrival an `eventTime` may lie (clock skew) and still be usable.
pub const MAX_AHEAD_SECS: i64 = 86_400;

/// Whether `t`, a well-formed `eventTime`, can date an event that arrived at `arrival_unix`:
/// not before 2013, not more than a day after its arrival. A forged year (`0000`, `9999`)
/// would otherwise make a partition outside the table's projection that no query reads.
pub fn usable_time(t: Utc, arrival_unix: i64) -> bool {
    t.year >= EARLIEST_EVENT_YEAR && t.to_unix() <= arrival_unix.saturating_add(MAX_AHEAD_SECS)
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TemplateError {
    #[error("unknown placeholder {{{0}}} (known: {1})")]
    UnknownPlaceholder(String, &'static str),
    #[error("unbalanced '{{' or '}}'")]
    Unbalanced,
    #[error("must not start with '/' or contain an empty, '.' or '..' path segment")]
    BadPath,
    #[error(
        "must not contain characters outside A-Z a-z 0-9 and ! - _ . * ' ( ) = / (S3-safe key characters)"
    )]
    BadChar,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Year,
    Month,
    Day,
    Hour,
    Account,
    Region,
    EventSource,
    EventType,
    /// The OCSF class the event maps to (`api_activity`, ...): one class per object, as
    /// Security Lake's custom sources take them.
    OcsfClass,
}

const FIELDS: &[(&str, Field)] = &[
    ("year", Field::Year),
    ("month", Field::Month),
    ("day", Field::Day),
    ("hour", Field::Hour),
    ("account", Field::Account),
    ("region", Field::Region),
    ("event_source", Field::EventSource),
    ("event_type", Field::EventType),
    ("ocsf_class", Field::OcsfClass),
];
const FIELD_NAMES: &str =
    "year, month, day, hour, account, region, event_source, event_type, ocsf_class";

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Lit(String),
    Field(Field),
}

/// A piece of a key template: literal text or a placeholder's name (`year`, `account`, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Piece<'a> {
    Lit(&'a str),
    Field(&'static str),
}

/// A parsed key template; always ends in `/` (a directory of objects).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyTemplate {
    parts: Vec<Part>,
}

impl KeyTemplate {
    pub fn parse(s: &str) -> Result<KeyTemplate, TemplateError> {
        let mut parts = Vec::new();
        let mut rest = s;
        while !rest.is_empty() {
            match rest.find(['{', '}']) {
                Some(i) if rest.as_bytes()[i] == b'}' => return Err(TemplateError::Unbalanced),
                Some(i) => {
                    push_lit(&mut parts, &rest[..i])?;
                    let close = rest[i..].find('}').ok_or(TemplateError::Unbalanced)? + i;
                    let name = &rest[i + 1..close];
                    let field = FIELDS
                        .iter()
                        .find(|(n, _)| *n == name)
                        .map(|(_, f)| *f)
                        .ok_or_else(|| {
                            TemplateError::UnknownPlaceholder(name.to_owned(), FIELD_NAMES)
                        })?;
                    parts.push(Part::Field(field));
                    rest = &rest[close + 1..];
                }
                None => {
                    push_lit(&mut parts, rest)?;
                    rest = "";
                }
            }
        }
        if !matches!(parts.last(), Some(Part::Lit(l)) if l.ends_with('/')) {
            parts.push(Part::Lit("/".into()));
        }
        let t = KeyTemplate { parts };
        // Check path segments on a rendering with placeholder values filled in.
        let sample = t.render_with(|_| "x", Some(Utc::from_unix(0)));
        if sample.starts_with('/')
            || sample
                .trim_end_matches('/')
                .split('/')
                .any(|seg| matches!(seg, "" | "." | ".."))
        {
            return Err(TemplateError::BadPath);
        }
        Ok(t)
    }

    /// The template as literal text and placeholder names, in order (for the Athena DDL).
    pub fn pieces(&self) -> Vec<Piece<'_>> {
        self.parts
            .iter()
            .map(|p| match p {
                Part::Lit(l) => Piece::Lit(l),
                Part::Field(f) => {
                    Piece::Field(FIELDS.iter().find(|(_, x)| x == f).map_or("", |(n, _)| n))
                }
            })
            .collect()
    }

    fn uses_time(&self) -> bool {
        self.parts.iter().any(|p| {
            matches!(
                p,
                Part::Field(Field::Year | Field::Month | Field::Day | Field::Hour)
            )
        })
    }

    fn render_with<'v>(&self, value: impl Fn(Field) -> &'v str, time: Option<Utc>) -> String {
        let mut out = String::new();
        self.render_into(&mut out, value, time);
        out
    }

    fn render_into<'v>(
        &self,
        out: &mut String,
        value: impl Fn(Field) -> &'v str,
        time: Option<Utc>,
    ) {
        for part in &self.parts {
            match (part, time) {
                (Part::Lit(l), _) => out.push_str(l),
                (Part::Field(Field::Year), Some(t)) => push_padded(out, t.year, 4),
                (Part::Field(Field::Month), Some(t)) => push_padded(out, t.month.into(), 2),
                (Part::Field(Field::Day), Some(t)) => push_padded(out, t.day.into(), 2),
                (Part::Field(Field::Hour), Some(t)) => push_padded(out, t.hour.into(), 2),
                (Part::Field(f), _) => push_sanitized(out, value(*f)),
            }
        }
    }
}

/// `v` zero-padded to `width` digits, as `{:0width$}` writes it, without the formatting
/// machinery on the common path (once per event per time placeholder).
fn push_padded(out: &mut String, v: i32, width: u32) {
    match u32::try_from(v) {
        Ok(n) if n < 10u32.pow(width) => {
            for place in (0..width).rev() {
                let digit = (n / 10u32.pow(place)) % 10;
                out.push(char::from(b'0' + digit as u8));
            }
        }
        // Writing to a String cannot fail.
        _ => {
            let _ = write!(out, "{v:0width$}", width = width as usize);
        }
    }
}

fn push_lit(parts: &mut Vec<Part>, lit: &str) -> Result<(), TemplateError> {
    if lit.is_empty() {
        return Ok(());
    }
    if !lit.bytes().all(is_key_char) {
        return Err(TemplateError::BadChar);
    }
    parts.push(Part::Lit(lit.to_owned()));
    Ok(())
}

fn is_key_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!-_.*'()=/".contains(&b)
}

/// Event data in a key: only `[A-Za-z0-9._-]`, never a path of its own, bounded length.
fn push_sanitized(out: &mut String, v: &str) {
    let v = v.trim();
    if v.is_empty() || v.bytes().all(|b| b == b'.') {
        out.push_str("unknown");
        return;
    }
    for c in v.chars().take(128) {
        out.push(
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            },
        );
    }
}

/// Chooses each event's partition.
#[derive(Debug, Clone)]
pub struct Partitioner {
    template: KeyTemplate,
    uses_time: bool,
    /// None: events without a usable time are partitioned by their arrival time.
    fallback: Option<String>,
    /// Security Lake: a prefix per OCSF class (`ext/<source>/`) before the template.
    class_prefixes: Option<Vec<(Class, String)>>,
}

impl Partitioner {
    /// `fallback` empty: untimed events go under the template at their arrival time.
    pub fn new(template: KeyTemplate, fallback: &str) -> Partitioner {
        let fallback = (!fallback.is_empty()).then(|| {
            let mut f = fallback.to_owned();
            if !f.ends_with('/') {
                f.push('/');
            }
            f
        });
        Partitioner {
            uses_time: template.uses_time(),
            template,
            fallback,
            class_prefixes: None,
        }
    }

    /// Puts each event under its OCSF class's prefix (Security Lake's one source per class).
    /// Its `region=` and `accountId=` values must then be an AWS region name and a 12-digit
    /// account id, else `unknown`: a hostile event cannot add odd partitions to the source's
    /// Glue table.
    pub fn with_class_prefixes(mut self, prefixes: Vec<(Class, String)>) -> Partitioner {
        self.class_prefixes = Some(prefixes);
        self
    }

    /// Writes the event's partition into `out` (cleared first) and returns how it was routed.
    /// `arrival` is when the event reached trailhose: the time used when its own is unusable
    /// (missing, malformed, or outside `usable_time`).
    pub fn key_for(&self, head: &Head<'_>, arrival: Utc, out: &mut String) -> Routed {
        out.clear();
        let time = head
            .event_time
            .as_deref()
            .and_then(Utc::parse_rfc3339)
            .filter(|t| usable_time(*t, arrival.to_unix()));
        let mut render_time = time;
        if self.uses_time && time.is_none() {
            match &self.fallback {
                Some(prefix) => {
                    out.push_str(prefix);
                    return Routed {
                        fallback: true,
                        arrival: false,
                        time,
                    };
                }
                None => render_time = Some(arrival),
            }
        }
        let class = || {
            let (source, name) = (head.event_source.as_deref(), head.event_name.as_deref());
            crate::sink::ocsf::class::classify(source, name, head.event_type.as_deref())
        };
        if let Some(prefixes) = &self.class_prefixes {
            let c = class();
            if let Some((_, p)) = prefixes.iter().find(|(k, _)| *k == c) {
                out.push_str(p);
            }
        }
        let value = |f: Field| -> &str {
            if f == Field::OcsfClass {
                return class().slug();
            }
            let v = match f {
                Field::Account => &head.account,
                Field::Region => &head.region,
                Field::EventSource => &head.event_source,
                Field::EventType => &head.event_type,
                _ => &None,
            };
            let v = v.as_deref().unwrap_or("unknown");
            let lake = self.class_prefixes.is_some();
            match f {
                Field::Account if lake && !is_account_id(v) => "unknown",
                Field::Region if lake && !is_region_name(v) => "unknown",
                _ => v,
            }
        };
        self.template.render_into(out, value, render_time);
        let arrival = render_time.is_some() && time.is_none();
        Routed {
            fallback: arrival,
            arrival,
            time,
        }
    }
}

/// A 12-digit AWS account id.
fn is_account_id(v: &str) -> bool {
    v.len() == 12 && v.bytes().all(|b| b.is_ascii_digit())
}

/// An AWS region name in the shape every partition uses: two or more lower-case words and a
/// number, joined by `-` (`us-east-1`, `us-gov-west-1`, `cn-north-1`, `us-isob-east-1`,
/// `eusc-de-east-1`), at most 32 characters. Nothing else passes, so no value can add a path
/// segment, a `=` or an upper-case twin of a partition.
fn is_region_name(v: &str) -> bool {
    let Some((words, number)) = v.rsplit_once('-') else {
        return false;
    };
    v.len() <= 32
        && (1..=2).contains(&number.len())
        && number.bytes().all(|b| b.is_ascii_digit())
        && words.split('-').count() >= 2
        && words
            .split('-')
            .all(|w| !w.is_empty() && w.bytes().all(|b| b.is_ascii_lowercase()))
}

/// How one event was routed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Routed {
    /// Its time was unusable (missing, malformed, before 2013 or over a day after its
    /// arrival) while the template needs one (counted).
    pub fallback: bool,
    /// It was partitioned by its arrival time, so it must carry `ARRIVAL_FIELD`.
    pub arrival: bool,
    /// Its `eventTime`, when usable.
    pub time: Option<Utc>,
}

#[cfg(test)]
mod tests {
    #[test]
    fn padded_numbers_are_written_as_the_formatter_writes_them() {
        for (v, width) in [
            (0, 4),
            (7, 2),
            (12, 2),
            (2024, 4),
            (99, 2),
            (123, 2),
            (12345, 4),
            (-5, 4),
        ] {
            let mut out = String::new();
            super::push_padded(&mut out, v, width);
            assert_eq!(out, format!("{v:0w$}", w = width as usize), "{v} {width}");
        }
    }

    use super::*;
    use std::borrow::Cow;

    fn head(time: Option<&'static str>) -> Head<'static> {
        Head {
            event_time: time.map(Cow::Borrowed),
            account: Some(Cow::Borrowed("123456789012")),
            region: Some(Cow::Borrowed("eu-west-1")),
            event_source: Some(Cow::Borrowed("s3.amazonaws.com")),
            event_type: None,
            ..Head::default()
        }
    }

    fn arrival() -> Utc {
        Utc::parse_rfc3339("2026-12-01T09:15:00Z").unwrap()
    }

    fn key_with(template: &str, fallback: &str, h: &Head<'_>) -> (String, Routed) {
        let p = Partitioner::new(KeyTemplate::parse(template).unwrap(), fallback);
        let mut out = String::new();
        let routed = p.key_for(h, arrival(), &mut out);
        (out, routed)
    }

    fn key(template: &str, h: &Head<'_>) -> (String, bool) {
        let (k, routed) = key_with(template, DEFAULT_FALLBACK, h);
        (k, !routed.fallback)
    }

    #[test]
    fn class_prefixes_put_each_class_under_its_source() {
        let t =
            KeyTemplate::parse("region={region}/accountId={account}/eventDay={year}{month}{day}/")
                .unwrap();
        let prefixes = Class::ALL
            .iter()
            .map(|c| (*c, format!("ext/src-{}/", c.uid())))
            .collect();
        let p = Partitioner::new(t, "").with_class_prefixes(prefixes);
        let mut h = head(Some("2024-03-18T23:59:59Z"));
        h.event_source = Some(Cow::Borrowed("signin.amazonaws.com"));
        h.event_name = Some(Cow::Borrowed("ConsoleLogin"));
        let mut out = String::new();
        p.key_for(&h, arrival(), &mut out);
        assert_eq!(
            out,
            "ext/src-3002/region=eu-west-1/accountId=123456789012/eventDay=20240318/"
        );
        // Untimed: by arrival, still under the class's source.
        let mut h = head(None);
        h.event_name = Some(Cow::Borrowed("GetObject"));
        p.key_for(&h, arrival(), &mut out);
        assert_eq!(
            out,
            "ext/src-6003/region=eu-west-1/accountId=123456789012/eventDay=20261201/"
        );
    }

    #[test]
    fn security_lake_partition_values_are_an_account_id_and_a_region_or_unknown() {
        let t =
            KeyTemplate::parse("region={region}/accountId={account}/eventDay={year}{month}{day}/")
                .unwrap();
        let prefixes = Class::ALL
            .iter()
            .map(|c| (*c, format!("ext/src-{}/", c.uid())))
            .collect();
        let p = Partitioner::new(t.clone(), "").with_class_prefixes(prefixes);
        let mut out = String::new();
        for (account, region) in [
            ("../../etc", ".."),
            ("12345678901x", "us-east-1/../x"),
            ("1234567890123", "US-EAST-1"),
            ("", "us-east-"),
            ("123456789012 ", "eu"),
            ("123456789012\n", "us-east-1="),
            ("", "region=x-1"),
            ("", "us--east-1"),
            ("", "-us-east-1"),
            ("", "us-east-1-"),
            ("", "us-east"),
            ("", "east-1"),
            ("", "us-east-100"),
            ("", "us-east-1."),
            ("", "us.east-1"),
            ("", "us-east-\u{661}"),
            ("", "us-\u{e9}ast-1"),
            ("", "a-very-long-region-name-that-is-over-1"),
        ] {
            let mut h = head(Some("2024-03-18T14:30:07Z"));
            h.account = Some(Cow::Borrowed(account));
            h.region = Some(Cow::Borrowed(region));
            p.key_for(&h, arrival(), &mut out);
            assert_eq!(
                out, "ext/src-6003/region=unknown/accountId=unknown/eventDay=20240318/",
                "{account:?} {region:?}"
            );
        }
        for region in [
            "us-gov-west-1",
            "ap-southeast-5",
            "eu-central-2",
            "il-central-1",
            "eusc-de-east-1",
            "us-iso-east-1",
            "us-isob-east-1",
            "eu-isoe-west-1",
            "us-isof-south-1",
            "cn-north-1",
            "mx-central-1",
        ] {
            let mut h = head(Some("2024-03-18T14:30:07Z"));
            h.region = Some(Cow::Borrowed(region));
            p.key_for(&h, arrival(), &mut out);
            assert!(
                out.contains(&format!("region={region}/accountId=123456789012/")),
                "{out}"
            );
        }
        // Other layouts keep any value, sanitized.
        let plain = Partitioner::new(t, "");
        let mut h = head(Some("2024-03-18T14:30:07Z"));
        h.region = Some(Cow::Borrowed("US-EAST-1"));
        plain.key_for(&h, arrival(), &mut out);
        assert!(out.starts_with("region=US-EAST-1/"), "{out}");
    }

    #[test]
    fn default_layout_is_hourly_hive_partitions_in_utc() {
        let (k, ok) = key(DEFAULT_TEMPLATE, &head(Some("2024-03-18T01:30:07+02:00")));
        assert!(ok);
        assert_eq!(k, "year=2024/month=03/day=17/hour=23/");
    }

    #[test]
    fn dynamic_fields_and_missing_values() {
        let (k, _) = key(
            "{account}/{region}/{event_source}/{event_type}/{year}{month}{day}",
            &head(Some("2024-03-18T14:30:07Z")),
        );
        assert_eq!(
            k,
            "123456789012/eu-west-1/s3.amazonaws.com/unknown/20240318/"
        );
    }

    #[test]
    fn the_ocsf_class_gives_security_lakes_layout() {
        let mut h = head(Some("2024-03-18T14:30:07Z"));
        let t = "ext/trailhose-{ocsf_class}/region={region}/accountId={account}/eventDay={year}{month}{day}/";
        assert_eq!(
            key(t, &h).0,
            "ext/trailhose-api_activity/region=eu-west-1/accountId=123456789012/eventDay=20240318/"
        );
        h.event_source = Some(Cow::Borrowed("signin.amazonaws.com"));
        h.event_name = Some(Cow::Borrowed("ConsoleLogin"));
        assert_eq!(key("{ocsf_class}", &h).0, "authentication/");
        h.event_source = Some(Cow::Borrowed("iam.amazonaws.com"));
        h.event_name = Some(Cow::Borrowed("CreateUser"));
        assert_eq!(key("{ocsf_class}", &h).0, "account_change/");
    }

    #[test]
    fn bad_or_missing_time_is_partitioned_by_arrival_only_when_time_is_used() {
        for h in [head(None), head(Some("yesterday"))] {
            let (k, routed) = key_with(DEFAULT_TEMPLATE, DEFAULT_FALLBACK, &h);
            assert_eq!(k, "year=2026/month=12/day=01/hour=09/");
            assert!(routed.fallback && routed.arrival, "{routed:?}");
            assert_eq!(routed.time, None);
        }
        let (k, routed) = key_with("acct={account}", DEFAULT_FALLBACK, &head(None));
        assert_eq!(k, "acct=123456789012/");
        assert!(!routed.fallback && !routed.arrival);
        let (k, routed) = key_with(
            DEFAULT_TEMPLATE,
            DEFAULT_FALLBACK,
            &head(Some("2024-03-18T14:30:07Z")),
        );
        assert_eq!(k, "year=2024/month=03/day=18/hour=14/");
        assert!(!routed.fallback && !routed.arrival);
    }

    #[test]
    fn an_event_time_before_2013_or_over_a_day_ahead_is_unusable_in_every_layout() {
        let lake = Partitioner::new(
            KeyTemplate::parse("region={region}/accountId={account}/eventDay={year}{month}{day}/")
                .unwrap(),
            "",
        )
        .with_class_prefixes(vec![(Class::ApiActivity, "ext/src/".into())]);
        let hive = Partitioner::new(KeyTemplate::parse(DEFAULT_TEMPLATE).unwrap(), "");
        // arrival() is 2026-12-01T09:15:00Z.
        for t in [
            "0000-01-01T00:00:00Z",
            "0001-01-01T00:00:00Z",
            "2012-12-31T23:59:59Z",
            "2013-01-01T00:30:00+01:00",
            "2026-12-02T09:15:01Z",
            "9999-12-31T23:59:59Z",
            "-0001-01-01T00:00:00Z",
            "10000-01-01T00:00:00Z",
            "+2024-03-18T14:30:07Z",
        ] {
            let h = head(Some(t));
            let mut out = String::new();
            let routed = hive.key_for(&h, arrival(), &mut out);
            assert_eq!(out, "year=2026/month=12/day=01/hour=09/", "{t}");
            assert!(routed.fallback && routed.arrival, "{t}: {routed:?}");
            assert_eq!(routed.time, None, "{t}");
            let routed = lake.key_for(&h, arrival(), &mut out);
            assert_eq!(
                out, "ext/src/region=eu-west-1/accountId=123456789012/eventDay=20261201/",
                "{t}"
            );
            assert!(routed.fallback && routed.arrival, "{t}: {routed:?}");
            let (k, routed) = key_with(DEFAULT_TEMPLATE, "unknown-time", &h);
            assert_eq!(k, "unknown-time/", "{t}");
            assert!(routed.fallback && !routed.arrival, "{t}");
        }
        // The bounds themselves are usable.
        for (t, want) in [
            ("2013-01-01T00:00:00Z", "year=2013/month=01/day=01/hour=00/"),
            ("2026-12-02T09:15:00Z", "year=2026/month=12/day=02/hour=09/"),
        ] {
            let mut out = String::new();
            let routed = hive.key_for(&head(Some(t)), arrival(), &mut out);
            assert_eq!(out, want, "{t}");
            assert!(!routed.fallback && !routed.arrival && routed.time.is_some());
        }
    }

    #[test]
    fn an_explicit_fallback_prefix_keeps_untimed_events_apart() {
        let (k, routed) = key_with(DEFAULT_TEMPLATE, "unknown-time", &head(None));
        assert_eq!(k, "unknown-time/");
        assert!(routed.fallback && !routed.arrival);
    }

    #[test]
    fn event_data_cannot_escape_its_segment() {
        let mut h = head(Some("2024-03-18T14:30:07Z"));
        h.account = Some(Cow::Borrowed("../../etc"));
        h.region = Some(Cow::Borrowed(".."));
        h.event_source = Some(Cow::Borrowed("a/b c\u{e9}"));
        let (k, _) = key("{account}/{region}/{event_source}", &h);
        assert_eq!(k, ".._.._etc/unknown/a_b_c_/");
    }

    #[test]
    fn template_errors_name_the_problem() {
        assert_eq!(
            KeyTemplate::parse("year={yr}/"),
            Err(TemplateError::UnknownPlaceholder("yr".into(), FIELD_NAMES))
        );
        assert_eq!(KeyTemplate::parse("a{year"), Err(TemplateError::Unbalanced));
        assert_eq!(KeyTemplate::parse("a}b"), Err(TemplateError::Unbalanced));
        assert_eq!(KeyTemplate::parse("/x/{year}"), Err(TemplateError::BadPath));
        assert_eq!(KeyTemplate::parse("x//{year}"), Err(TemplateError::BadPath));
        assert_eq!(
            KeyTemplate::parse("x/../{year}"),
            Err(TemplateError::BadPath)
        );
        assert_eq!(
            KeyTemplate::parse("x y/{year}"),
            Err(TemplateError::BadChar)
        );
        assert!(KeyTemplate::parse("").is_err());
    }
}
