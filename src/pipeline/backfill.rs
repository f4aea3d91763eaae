//! `trailhose backfill`: historical delivery files from a bucket, split over N workers by key
//! hash. Resumable: once a file's records are durably written, a marker object
//! (`_trailhose/backfill/<bucket>/<key>.done`) is written under the output root, and a re-run skips
//! files that have one. Each file is a unit of the acknowledgement ledger, which writes the
//! marker; dispatch pauses, like SQS receiving, while the buffer budget is reached or
//! `MAX_UNACKED_FILES` files wait for their buffers (the oldest buffers are then sealed early,
//! so the files drain without waiting for `max_age`).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinSet;

use super::dispatch;
use super::engine::Engine;
use super::ledger::{Effects, Ledger, Pressure};
use super::{PipelineError, Tally};
use crate::ack::Hold;
use crate::config::{BucketConfig, Config};
use crate::fetch::{S3Fetcher, S3Lister};
use crate::sink::write::Written;
use crate::source::backfill::{self, Spec};
use crate::source::notification::ObjectRef;

const MARKERS: &str = "_trailhose/backfill/";
/// Files dispatched whose records are not all written yet (each costs an entry; their records
/// are bounded by the buffer budget).
const MAX_UNACKED_FILES: usize = 5000;

#[derive(Debug)]
pub struct BackfillReport {
    pub listed: usize,
    pub mine: usize,
    pub already_done: usize,
    pub failed: usize,
    pub tally: Tally,
    pub written: Written,
    pub elapsed: Duration,
}

impl BackfillReport {
    pub fn line(&self) -> String {
        format!(
            "listed={} mine={} already_done={} processed={} failed={} events_in={} events_out={} objects={} elapsed={:.2}s",
            self.listed,
            self.mine,
            self.already_done,
            self.tally.files,
            self.failed,
            self.tally.events_in,
            self.written.event_records,
            self.written.objects,
            self.elapsed.as_secs_f64()
        )
    }
}

fn marker_key(bucket: &str, key: &str) -> String {
    format!("{MARKERS}{bucket}/{key}.done")
}

pub async fn run(cfg: &Config, spec: &Spec) -> Result<BackfillReport, PipelineError> {
    let started = Instant::now();
    let engine = Engine::open(cfg, cfg.workers(), cfg.workers() * 2).await?;
    let store = engine.store();

    // The bucket's region, role and endpoint come from [[source.buckets]] when it is listed
    // there; the operator naming it on the command line allows it for this run either way.
    let bucket = cfg
        .source
        .buckets
        .iter()
        .find(|b| b.name == spec.bucket)
        .cloned()
        .unwrap_or_else(|| BucketConfig {
            name: spec.bucket.clone(),
            ..BucketConfig::default()
        });
    let fetcher = Arc::new(S3Fetcher::new(std::slice::from_ref(&bucket)).await);
    let lister = S3Lister {
        fetcher: &fetcher,
        bucket: &spec.bucket,
    };
    let listed = backfill::list(&lister, spec).await.map_err(|e| {
        PipelineError::Worker(format!("listing s3://{}/{}: {e}", spec.bucket, spec.prefix))
    })?;
    let mine = backfill::mine(spec, &listed);
    let done: HashSet<String> = store
        .list(&format!("{MARKERS}{}/", spec.bucket))
        .await?
        .into_iter()
        .collect();
    let todo: Vec<String> = mine
        .iter()
        .filter(|k| !done.contains(&marker_key(&spec.bucket, k)))
        .map(|k| (*k).clone())
        .collect();
    let already_done = mine.len() - todo.len();
    crate::progress::set_total(crate::progress::Total {
        files: Some(todo.len() as u64),
        bytes: None,
    });
    tracing::info!(
        listed = listed.len(),
        mine = mine.len(),
        todo = todo.len(),
        "backfill s3://{}/{}",
        spec.bucket,
        spec.prefix
    );

    let files = engine.submitter();
    let budget = engine.budget();
    let over = budget.clone();
    let pressure: Pressure = Arc::new(move || over.over());
    let effects = Effects {
        sqs: None,
        store: Some(store.clone()),
    };
    let cap = crate::testhook::max_unacked(MAX_UNACKED_FILES);
    let (ledger, driver) = Ledger::start(effects, cap, pressure);
    // Files settle only once their buffers are written: a full ledger seals buffers early.
    let ledger = ledger.seal_early_when_full(budget);
    let fetch_slots = Arc::new(tokio::sync::Semaphore::new(cfg.workers() * 2));
    let mut fetches = JoinSet::new();
    for key in todo {
        // Room in the ledger first (the buffer budget), then a fetch slot (the dispatch then
        // waits for room in the engine).
        let Some(room) = ledger.reserve_one().await else {
            break;
        };
        let Ok(slot) = fetch_slots.clone().acquire_owned().await else {
            break;
        };
        let (files, fetcher, bucket) = (files.clone(), fetcher.clone(), spec.bucket.clone());
        let (hold, settled) = Hold::new();
        ledger.track_file(marker_key(&bucket, &key), settled, room);
        fetches.spawn(async move {
            let obj = ObjectRef {
                bucket,
                key,
                size: None,
            };
            let source = format!("s3://{}/{}", obj.bucket, obj.key);
            let done = dispatch::fetch_and_submit(&fetcher, &files, &source, &[obj], hold).await;
            drop(slot);
            // A file that is gone is in the error output and gets its marker; it still counts
            // as failed in the report. Any other failure fails the hold: no marker.
            matches!(done, Ok(d) if d.unreadable > 0)
        });
    }
    drop(files);
    let mut gone = 0;
    while let Some(g) = fetches.join_next().await {
        gone += usize::from(matches!(g, Ok(true)));
    }
    drop(ledger);
    let (tally, written) = engine.finish().await?;
    // Every hold has settled: the ledger writes the last markers and stops. Files it did not
    // mark failed somewhere: fetched, split, written, or their correlations and alerts.
    let unwritten = driver.finish().await;
    Ok(BackfillReport {
        listed: listed.len(),
        mine: mine.len(),
        already_done,
        failed: gone + unwritten,
        tally,
        written,
        elapsed: started.elapsed(),
    })
}
