//! trailhose: AWS CloudTrail delivery files in; geo-enriched, time-partitioned, compressed
//! objects out. Modules follow the data: `source` → `fetch` → `cloudtrail` (split) → `enrich` →
//! `transform` → `detect` → `sink` (partition, batch, encode, write), wired in `pipeline`, watched by `metrics`.

pub mod ack;
pub mod athena;
pub mod aws;
pub mod bench;
pub mod clock;
pub mod cloudtrail;
pub mod config;
pub mod dedup;
pub mod detect;
pub mod enrich;
pub mod fetch;
pub mod metrics;
pub mod pipeline;
pub mod progress;
#[cfg(feature = "query")]
pub mod query;
pub mod retry;
pub mod server;
pub mod sink;
pub mod source;
pub mod synth;
pub mod testhook;
pub mod transform;
pub mod watch;
