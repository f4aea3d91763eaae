//! Historical files: list CloudTrail's date-structured prefixes in a bucket (never the whole
//! bucket), and split the keys over N workers by a stable hash so pods share a backfill with
//! no coordinator.
//!
//! Layout: `<prefix>AWSLogs/[o-org/]<account>/<CloudTrail|CloudTrail-Insight>/<region>/<yyyy>/<mm>/<dd>/<file>`.

use crate::clock::Utc;
use crate::source::notification::is_digest_key;

/// What to backfill.
#[derive(Debug, Clone, Default)]
pub struct Spec {
    pub bucket: String,
    /// Empty or ending in `/`.
    pub prefix: String,
    pub from: Option<Day>,
    pub to: Option<Day>,
    pub accounts: Vec<String>,
    pub regions: Vec<String>,
    pub workers: u64,
    pub index: u64,
}

/// A calendar day (UTC).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Day {
    pub year: i32,
    pub month: u8,
    pub day: u8,
}

impl Day {
    /// `YYYY-MM-DD`.
    pub fn parse(s: &str) -> Option<Day> {
        let t = Utc::parse_rfc3339(&format!("{s}T00:00:00Z"))?;
        (s.len() == 10).then_some(Day {
            year: t.year,
            month: t.month,
            day: t.day,
        })
    }

    fn unix(self) -> i64 {
        Utc {
            year: self.year,
            month: self.month,
            day: self.day,
            hour: 0,
            minute: 0,
            second: 0,
        }
        .to_unix()
    }

    fn from_unix(secs: i64) -> Day {
        let t = Utc::from_unix(secs);
        Day {
            year: t.year,
            month: t.month,
            day: t.day,
        }
    }

    /// `yyyy/mm/dd/`, CloudTrail's date path.
    pub fn path(self) -> String {
        format!("{:04}/{:02}/{:02}/", self.year, self.month, self.day)
    }
}

/// Every day from `from` to `to`, inclusive (empty when reversed).
pub fn days(from: Day, to: Day) -> Vec<Day> {
    let (a, b) = (from.unix(), to.unix());
    (0..)
        .map(|i| a + i * 86_400)
        .take_while(|t| *t <= b)
        .map(Day::from_unix)
        .collect()
}

/// Which worker owns a key: FNV-1a, the same on every machine and release.
pub fn shard_of(key: &str, workers: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h % workers.max(1)
}

/// Keys this worker processes: delivery files only (no digests), its shard only.
pub fn mine<'a>(spec: &Spec, keys: &'a [String]) -> Vec<&'a String> {
    keys.iter()
        .filter(|k| !is_digest_key(k) && !k.ends_with('/'))
        .filter(|k| shard_of(k, spec.workers) == spec.index)
        .collect()
}

/// The listing plan, one level at a time: S3 listings with a `/` delimiter find accounts
/// (inside organization folders too) and regions; then each region is listed whole, or one
/// day at a time when a date range is given.
pub trait Lister {
    /// Common prefixes directly under `prefix` (each ends in `/`).
    fn folders(&self, prefix: &str) -> impl Future<Output = Result<Vec<String>, String>> + Send;
    /// Every key under `prefix`.
    fn keys(&self, prefix: &str) -> impl Future<Output = Result<Vec<String>, String>> + Send;
}

const PRODUCTS: [&str; 2] = ["CloudTrail/", "CloudTrail-Insight/"];

pub async fn list<L: Lister>(lister: &L, spec: &Spec) -> Result<Vec<String>, String> {
    let base = format!("{}AWSLogs/", spec.prefix);
    let mut roots = Vec::new();
    for top in lister.folders(&base).await? {
        let name = top
            .trim_end_matches('/')
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .to_owned();
        if name.starts_with("o-") {
            for acct in lister.folders(&top).await? {
                roots.push(acct);
            }
        } else {
            roots.push(top);
        }
    }
    if !spec.accounts.is_empty() {
        roots.retain(|r| {
            let acct = r
                .trim_end_matches('/')
                .rsplit('/')
                .next()
                .unwrap_or_default();
            spec.accounts.iter().any(|a| a == acct)
        });
    }
    let mut keys = Vec::new();
    for root in roots {
        for product in PRODUCTS {
            let product_prefix = format!("{root}{product}");
            let mut regions = lister.folders(&product_prefix).await?;
            if !spec.regions.is_empty() {
                regions.retain(|r| {
                    let name = r
                        .trim_end_matches('/')
                        .rsplit('/')
                        .next()
                        .unwrap_or_default();
                    spec.regions.iter().any(|x| x == name)
                });
            }
            for region in regions {
                match (spec.from, spec.to) {
                    (None, None) => keys.extend(lister.keys(&region).await?),
                    (from, to) => {
                        let from = from.unwrap_or(Day {
                            year: 2013,
                            month: 11,
                            day: 1,
                        });
                        let to = to.unwrap_or_else(|| Day::from_unix(Utc::now().to_unix()));
                        for d in days(from, to) {
                            keys.extend(lister.keys(&format!("{region}{}", d.path())).await?);
                        }
                    }
                }
            }
        }
    }
    keys.sort();
    keys.dedup();
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// An in-memory bucket that records every listing asked of it.
    struct Fake {
        keys: Vec<String>,
        asked: Mutex<Vec<String>>,
    }

    impl Lister for Fake {
        async fn folders(&self, prefix: &str) -> Result<Vec<String>, String> {
            self.asked.lock().unwrap().push(format!("folders {prefix}"));
            let mut out: Vec<String> = self
                .keys
                .iter()
                .filter_map(|k| k.strip_prefix(prefix))
                .filter_map(|rest| rest.split_once('/').map(|(f, _)| format!("{prefix}{f}/")))
                .collect();
            out.dedup();
            Ok(out)
        }
        async fn keys(&self, prefix: &str) -> Result<Vec<String>, String> {
            self.asked.lock().unwrap().push(format!("keys {prefix}"));
            Ok(self
                .keys
                .iter()
                .filter(|k| k.starts_with(prefix))
                .cloned()
                .collect())
        }
    }

    fn fake() -> Fake {
        let keys = [
            "p/AWSLogs/111/CloudTrail/us-east-1/2024/03/17/a.json.gz",
            "p/AWSLogs/111/CloudTrail/us-east-1/2024/03/18/b.json.gz",
            "p/AWSLogs/111/CloudTrail/eu-west-1/2024/03/18/c.json.gz",
            "p/AWSLogs/111/CloudTrail-Digest/us-east-1/2024/03/18/d.json.gz",
            "p/AWSLogs/111/CloudTrail-Insight/us-east-1/2024/03/18/i.json.gz",
            "p/AWSLogs/o-org/222/CloudTrail/us-east-1/2024/03/18/e.json.gz",
            "p/AWSLogs/o-org/222/CloudTrail/us-east-1/2024/03/20/f.json.gz",
            "p/unrelated/huge.bin",
        ];
        Fake {
            keys: keys.iter().map(|s| s.to_string()).collect(),
            asked: Mutex::new(Vec::new()),
        }
    }

    fn run(spec: &Spec) -> (Vec<String>, Vec<String>) {
        let f = fake();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let keys = rt.block_on(list(&f, spec)).unwrap();
        let names = keys
            .iter()
            .map(|k| k.rsplit('/').next().unwrap().to_owned())
            .collect();
        (names, f.asked.into_inner().unwrap())
    }

    fn spec() -> Spec {
        Spec {
            prefix: "p/".into(),
            workers: 1,
            ..Spec::default()
        }
    }

    #[test]
    fn lists_accounts_org_accounts_regions_and_products_never_the_bucket() {
        let (names, asked) = run(&spec());
        assert_eq!(
            names,
            [
                "i.json.gz",
                "c.json.gz",
                "a.json.gz",
                "b.json.gz",
                "e.json.gz",
                "f.json.gz"
            ]
        );
        assert!(
            asked
                .iter()
                .all(|a| a.starts_with("folders p/AWSLogs/") || a.starts_with("keys p/AWSLogs/"))
        );
        assert!(
            !asked.iter().any(|a| a.contains("Digest")),
            "digest folders are never listed"
        );
    }

    #[test]
    fn dates_accounts_and_regions_narrow_the_listing() {
        let mut s = spec();
        s.from = Day::parse("2024-03-18");
        s.to = Day::parse("2024-03-19");
        let (names, asked) = run(&s);
        assert_eq!(names, ["i.json.gz", "c.json.gz", "b.json.gz", "e.json.gz"]);
        assert!(asked.contains(&"keys p/AWSLogs/111/CloudTrail/us-east-1/2024/03/19/".to_owned()));
        s.accounts = vec!["222".into()];
        assert_eq!(run(&s).0, ["e.json.gz"]);
        s.accounts.clear();
        s.regions = vec!["eu-west-1".into()];
        assert_eq!(run(&s).0, ["c.json.gz"]);
    }

    #[test]
    fn shards_partition_the_keys_stably() {
        let keys: Vec<String> = (0..1000)
            .map(|i| format!("AWSLogs/1/CloudTrail/r/2024/01/01/f{i}.json.gz"))
            .collect();
        let mut seen = std::collections::HashSet::new();
        for index in 0..3 {
            let s = Spec {
                workers: 3,
                index,
                ..Spec::default()
            };
            let m = mine(&s, &keys);
            assert!(m.len() > 250, "shards are balanced: {}", m.len());
            for k in m {
                assert!(seen.insert(k.clone()), "{k} in two shards");
            }
        }
        assert_eq!(seen.len(), keys.len());
        assert_eq!(
            shard_of("AWSLogs/1/x.json.gz", 7),
            shard_of("AWSLogs/1/x.json.gz", 7)
        );
    }

    #[test]
    fn days_and_dates() {
        let d = days(
            Day::parse("2024-02-28").unwrap(),
            Day::parse("2024-03-01").unwrap(),
        );
        let paths: Vec<String> = d.into_iter().map(Day::path).collect();
        assert_eq!(paths, ["2024/02/28/", "2024/02/29/", "2024/03/01/"]);
        assert_eq!(Day::parse("2024-3-1"), None);
        assert_eq!(Day::parse("2024-02-30"), None);
    }
}
