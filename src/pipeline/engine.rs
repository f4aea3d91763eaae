//! The engine every mode shares: worker threads that split, enrich and buffer files, the
//! encoder pool, and the uploader. Modes differ only in where files come from and what they do
//! once a file's records are durable (nothing, delete an SQS message, write a backfill marker).

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel::RecvTimeoutError;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use super::{FileWorker, PipelineError, Tally, open_geo, open_store};
use crate::ack::Hold;
use crate::config::Config;
use crate::detect::{Delivery, Detect};
use crate::enrich::live::LiveGeo;
use crate::enrich::tables::live::LiveTables;
use crate::metrics::{self, FileUnreadable, WorkerLost};
use crate::sink::batch::Sealed;
use crate::sink::budget::Budget;
use crate::sink::encode::{Codec, Encoder};
use crate::sink::partition::Partitioner;
use crate::sink::write::{self, Store, Written};
use crate::testhook;
use crate::transform::Transforms;

/// Where a file's stored bytes are.
pub enum Input {
    /// Already in memory (documents built from a stream record).
    Bytes(Bytes),
    /// The events of a batch of stream records, already told apart.
    Records(Box<crate::source::kinesis::Batch>),
    /// An S3 object, streamed from the fetcher (`S3Fetcher::get`): memory never follows its
    /// size, and a declared size over `pipeline.max_file_bytes` is refused unread.
    Stream(crate::fetch::Body),
    /// A local file, streamed so that memory never follows its size.
    Path(PathBuf),
    /// A notified file that cannot be read for good (gone, forbidden): an error record says so.
    Unreadable(String),
}

struct FileJob {
    source: String,
    input: Input,
    hold: Option<Hold>,
    /// Released when a worker is done with the file: bounds files held in memory.
    _permit: OwnedSemaphorePermit,
}

/// What the workers share, opened and checked by `Engine::open`.
struct Parts {
    geo: Arc<LiveGeo>,
    tables: Option<Arc<LiveTables>>,
    partitioner: Arc<Partitioner>,
    transforms: Option<Arc<Transforms>>,
    store: Arc<Store>,
    codec: Codec,
    detect: Option<(Arc<Detect>, Delivery)>,
}

/// SIGHUP re-reads the GeoIP databases, the enrichment tables, the transform modules and the
/// detection rules (each keeps its running version when the new one is unusable).
fn reload_on_hangup(
    geo: &Arc<LiveGeo>,
    tables: Option<&Arc<LiveTables>>,
    transforms: Option<&Arc<Transforms>>,
    detect: Option<&Arc<Detect>>,
) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        return;
    };
    let (geo, transforms) = (Arc::downgrade(geo), transforms.map(Arc::downgrade));
    let (tables, detect) = (tables.map(Arc::downgrade), detect.map(Arc::downgrade));
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            let (geo, tables, transforms) = (geo.clone(), tables.clone(), transforms.clone());
            let detect = detect.clone();
            let _ = tokio::task::spawn_blocking(move || {
                if let Some(g) = geo.upgrade() {
                    g.reload(true);
                }
                if let Some(t) = tables.and_then(|t| t.upgrade()) {
                    t.reload(true);
                }
                if let Some(t) = transforms.and_then(|t| t.upgrade()) {
                    t.reload(true);
                }
                if let Some(d) = detect.and_then(|d| d.upgrade()) {
                    d.reload(true);
                }
            })
            .await;
        }
    });
}

/// Compiles and checks the transform modules (a module that fails `init` stops start-up), and
/// reloads them when their files change or on SIGHUP.
async fn open_transforms(cfg: &Config) -> Result<Option<Arc<Transforms>>, PipelineError> {
    if cfg.transforms.is_empty() {
        return Ok(None);
    }
    let t = Transforms::open_remote(&cfg.transform_specs(), cfg.transform_cache_dir()).await?;
    if let Some(every) = cfg.transform_reload() {
        t.watch(every);
    }
    Ok(Some(t))
}

/// How many worker threads still run. A worker that panics is rebuilt; one whose rebuild
/// panics too is lost for good.
#[derive(Clone, Debug)]
pub struct Workers(Arc<AtomicUsize>);

impl Workers {
    /// True once every worker thread is lost: nothing submitted would ever be split.
    pub fn all_lost(&self) -> bool {
        self.0.load(Ordering::Acquire) == 0
    }

    /// For `/readyz`: a pod whose workers are all lost must get no more work.
    pub fn check(&self) -> Result<(), String> {
        if self.all_lost() {
            Err("every worker thread panicked and could not be rebuilt".into())
        } else {
            Ok(())
        }
    }
}

pub struct Engine {
    store: Arc<Store>,
    budget: Arc<Budget>,
    alive: Workers,
    submitter: Submitter,
    workers: Vec<std::thread::JoinHandle<Tally>>,
    uploader: tokio::task::JoinHandle<Written>,
    /// Alert delivery; ends once the workers (which queue alerts) are gone.
    delivery: Option<Delivery>,
}

impl Engine {
    /// Checks the config, opens the GeoIP databases and the output (failing early when it
    /// cannot be written), and starts `workers` worker threads; at most `max_files` submitted
    /// files wait or are being split at once.
    pub async fn open(
        cfg: &Config,
        workers: usize,
        max_files: usize,
    ) -> Result<Engine, PipelineError> {
        cfg.validate()?;
        let partitioner = Arc::new(cfg.partitioner()?);
        let codec = cfg.codec()?;
        let geo = open_geo(cfg)?;
        let tables = LiveTables::open(&cfg.enrich).await?;
        let transforms = open_transforms(cfg).await?;
        let detect = match &cfg.detect {
            Some(d) => Some(Detect::open(d).await?),
            None => None,
        };
        reload_on_hangup(
            &geo,
            tables.as_ref(),
            transforms.as_ref(),
            detect.as_ref().map(|(d, _)| d),
        );
        let store = Arc::new(open_store(cfg).await?);
        store.check().await?;
        let parts = Parts {
            geo,
            tables,
            partitioner,
            transforms,
            store,
            codec,
            detect,
        };
        Engine::start(cfg, parts, workers, max_files)
    }

    fn start(
        cfg: &Config,
        parts: Parts,
        workers: usize,
        max_files: usize,
    ) -> Result<Engine, PipelineError> {
        let Parts {
            geo,
            tables,
            partitioner,
            transforms,
            store,
            codec,
            detect,
        } = parts;
        let (detect, delivery) = match detect {
            Some((d, delivery)) => (Some(d), Some(delivery)),
            None => (None, None),
        };
        let encoder = Encoder::with_format(codec, cfg.converter()?, cfg.compression_threads());
        let (sealed_tx, sealed_rx) = mpsc::channel::<Sealed>(workers * 2);
        let uploader = tokio::spawn(write::run_uploader(
            store.clone(),
            sealed_rx,
            cfg.output.s3.max_concurrent_puts,
            crate::sink::kinesis::forward_to(cfg, codec),
        ));
        let dedup = cfg.dedup.as_ref().map(|d| {
            Arc::new(crate::dedup::Dedup::new(
                Duration::from_secs(d.window_secs),
                d.max_events,
            ))
        });
        let budget = Budget::new(cfg.batch.max_buffered_bytes);
        let (files, files_rx) = crossbeam_channel::unbounded::<FileJob>();
        let alive = Workers(Arc::new(AtomicUsize::new(workers.max(1))));
        let mut handles = Vec::new();
        for i in 0..workers.max(1) {
            let mut worker = FileWorker::new(
                cfg,
                &geo,
                partitioner.clone(),
                &encoder,
                transforms.as_ref(),
                &budget,
            )
            .with_dedup(dedup.clone())
            .with_tables(tables.as_ref())
            .with_detect(detect.clone());
            let rx = files_rx.clone();
            let tx = sealed_tx.clone();
            let alive = alive.clone();
            let handle = std::thread::Builder::new()
                .name(format!("worker-{i}"))
                .spawn(move || worker_loop(&mut worker, &rx, &tx, &alive))
                .map_err(|e| PipelineError::Worker(e.to_string()))?;
            handles.push(handle);
        }
        Ok(Engine {
            store,
            budget,
            alive,
            submitter: Submitter {
                files,
                permits: Arc::new(Semaphore::new(max_files.max(1))),
            },
            workers: handles,
            uploader,
            delivery,
        })
    }

    /// The output store, for readiness checks and markers.
    pub fn store(&self) -> Arc<Store> {
        self.store.clone()
    }

    /// The process-wide buffer budget (`batch.max_buffered_bytes`); while `budget.over()` is
    /// true, workers are sealing buffers early to make room. The SQS receive loop pauses on it.
    pub fn budget(&self) -> Arc<Budget> {
        self.budget.clone()
    }

    /// The worker threads that still run: a source stops taking work when all are lost.
    pub fn workers(&self) -> Workers {
        self.alive.clone()
    }

    /// Stops the uploader and every write in flight (the shutdown's grace period is over):
    /// open multipart uploads are then aborted (`write::settle_abandoned`).
    pub fn uploader_abort(&self) -> tokio::task::AbortHandle {
        self.uploader.abort_handle()
    }

    /// A clonable way in, for the tasks that submit files.
    pub fn submitter(&self) -> Submitter {
        self.submitter.clone()
    }

    /// Closes the input: workers finish what is queued, seal every buffer and stop; the
    /// uploader writes everything. Callers must drop their `Submitter`s first.
    pub async fn finish(self) -> Result<(Tally, Written), PipelineError> {
        drop(self.submitter);
        let workers = self.workers;
        let tally = tokio::task::spawn_blocking(move || {
            let mut total = Tally::default();
            for h in workers {
                match h.join() {
                    Ok(t) => total.add(t),
                    Err(_) => return Err(PipelineError::Worker("a worker panicked".into())),
                }
            }
            Ok(total)
        })
        .await
        .map_err(|e| PipelineError::Worker(e.to_string()))??;
        let undelivered = match self.delivery {
            Some(d) => d.finish().await,
            None => Vec::new(),
        };
        let mut written = self
            .uploader
            .await
            .map_err(|e| PipelineError::Worker(e.to_string()))?;
        written.failures.extend(undelivered);
        Ok((tally, written))
    }
}

/// A clonable way into the engine. Room is taken before a file is fetched, so fetched bytes
/// are bounded too.
#[derive(Clone)]
pub struct Submitter {
    files: crossbeam_channel::Sender<FileJob>,
    permits: Arc<Semaphore>,
}

impl Submitter {
    /// Waits for room for one more file; None once the engine is closed.
    pub async fn permit(&self) -> Option<OwnedSemaphorePermit> {
        self.permits.clone().acquire_owned().await.ok()
    }

    /// Waits for room, then hands the file on. False when the workers are gone.
    pub async fn submit(&self, source: String, input: Input, hold: Option<Hold>) -> bool {
        match self.permit().await {
            Some(p) => self.submit_with(source, input, hold, p),
            None => false,
        }
    }

    /// Hands a file on with room already taken. False when the workers are gone (the hold
    /// then drops uncommitted, so its notification is not acknowledged).
    pub fn submit_with(
        &self,
        source: String,
        input: Input,
        hold: Option<Hold>,
        permit: OwnedSemaphorePermit,
    ) -> bool {
        self.files
            .send(FileJob {
                source,
                input,
                hold,
                _permit: permit,
            })
            .is_ok()
    }
}

/// One worker thread: files in, sealed batches out, until the input closes. A panic while on a
/// file fails that file (its hold drops uncommitted, so it is delivered again), is counted, and
/// the worker goes on with its per-file state rebuilt (`FileWorker::recover`). Only when the
/// rebuild itself panics does the thread stop; `/healthz` then fails.
fn worker_loop(
    worker: &mut FileWorker,
    rx: &crossbeam_channel::Receiver<FileJob>,
    tx: &mpsc::Sender<Sealed>,
    alive: &Workers,
) -> Tally {
    let mut out = |s: Sealed| {
        // A closed channel means the uploader is gone: the batch's holds drop uncommitted.
        let _ = tx.blocking_send(s);
    };
    loop {
        // Wake for the oldest buffer's age limit even when no file arrives.
        let wait = worker
            .next_deadline()
            .map_or(Duration::from_secs(1), |d| {
                d.saturating_duration_since(Instant::now())
            })
            .min(Duration::from_secs(1));
        let job = match rx.recv_timeout(wait) {
            Ok(job) => Some(job),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => break,
        };
        // A panic while sealing after a file (or when idle) is no fault of the file's.
        let source = job.as_ref().map(|j| j.source.clone());
        let ran = match job {
            Some(job) => catch_unwind(AssertUnwindSafe(|| run_job(worker, job, &mut out))),
            None => Ok(()),
        };
        let (on_file, ran) = match ran {
            Ok(()) => (
                None,
                catch_unwind(AssertUnwindSafe(|| {
                    worker.seal_expired(&mut out);
                    worker.relieve(&mut out);
                })),
            ),
            Err(panic) => (source, Err(panic)),
        };
        let Err(panic) = ran else {
            continue;
        };
        let message = testhook::panic_message(&*panic);
        let rebuilt = catch_unwind(AssertUnwindSafe(|| {
            worker.recover(on_file.as_deref(), &message, &mut out);
        }));
        if let Err(again) = rebuilt {
            alive.0.fetch_sub(1, Ordering::AcqRel);
            metrics::emit(WorkerLost {
                message: &testhook::panic_message(&*again),
            });
            // Save what is buffered if that still works; else the holds drop uncommitted.
            let _ = catch_unwind(AssertUnwindSafe(|| worker.seal_all(&mut out)));
            return worker.tally;
        }
    }
    worker.seal_all(&mut out);
    worker.tally
}

fn run_job(worker: &mut FileWorker, job: FileJob, out: &mut impl FnMut(Sealed)) {
    match job.input {
        Input::Bytes(b) => {
            worker.process(&job.source, &b[..], job.hold, out);
        }
        Input::Records(batch) => {
            worker.process_records(&batch, job.hold, out);
        }
        Input::Stream(body) => {
            let declared = body.declared_size();
            worker.process_sized(&job.source, body, declared, job.hold, out);
        }
        Input::Unreadable(detail) => {
            worker.unreadable(&job.source, &detail, job.hold, out);
        }
        Input::Path(p) => match std::fs::File::open(&p) {
            Ok(f) => {
                let declared = f.metadata().ok().map(|m| m.len());
                worker.process_sized(&job.source, f, declared, job.hold, out);
            }
            Err(e) => {
                worker.tally.files += 1;
                worker.tally.failed_files += 1;
                metrics::emit(FileUnreadable {
                    source: &job.source,
                    error: &e,
                });
            }
        },
    }
}
