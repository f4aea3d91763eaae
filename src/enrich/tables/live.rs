//! Tables that follow their files and S3 objects. A check (every `enrich.reload_secs`, or
//! SIGHUP) reads a table whose file stamp (mtime, size) or S3 ETag moved, parses and checks it
//! whole, and binds the lookups to it; only then are the lookups swapped. Each worker switches
//! at its next input file, so no file sees two versions. A table that fails keeps the running
//! version (logged and counted); the others still update.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use super::stage::Lookups;
use super::{Table, TableError};
use crate::config::enrich::{EnrichConfig, LookupConfig, TableConfig};
use crate::metrics::{self, TableLoaded, TableReloadFailed};
use crate::watch::{self, ReadError, S3Settings, Source, Version, poll_ready};

struct Slot {
    spec: TableConfig,
    name: Arc<str>,
    source: Source,
}

struct State {
    tables: Vec<Arc<Table>>,
    versions: Vec<Version>,
}

pub struct LiveTables {
    slots: Vec<Slot>,
    lookups: Vec<LookupConfig>,
    runtime: tokio::runtime::Handle,
    state: Mutex<State>,
    current: RwLock<Arc<Lookups>>,
    /// Bumped on every swap.
    generation: AtomicU64,
}

impl Slot {
    fn read_error(&self, detail: String) -> TableError {
        TableError::Read {
            name: self.spec.name.clone(),
            location: self.spec.path.clone(),
            detail,
        }
    }

    /// The source's bytes and version, or None when its version is still `known`.
    async fn fetch(&self, known: &Version) -> Result<Option<(Vec<u8>, Version)>, TableError> {
        self.source
            .read(known, self.spec.max_bytes)
            .await
            .map_err(|e| match e {
                ReadError::TooLarge { .. } => TableError::Invalid {
                    name: self.spec.name.clone(),
                    location: self.spec.path.clone(),
                    format: self.spec.format().as_str(),
                    detail: e.to_string(),
                },
                ReadError::Failed(detail) => self.read_error(detail),
            })
    }

    /// Fetches and parses; None when unchanged. A parse failure comes with the version that
    /// failed, so that it is not read again until it changes.
    async fn load(&self, known: &Version) -> Result<Option<Loaded>, TableError> {
        let started = Instant::now();
        let Some((bytes, version)) = self.fetch(known).await? else {
            return Ok(None);
        };
        let table = Table::parse(&self.spec, &self.spec.path, bytes);
        Ok(Some((table, version, started.elapsed().as_secs_f64())))
    }
}

type Loaded = (Result<Table, TableError>, Version, f64);

impl LiveTables {
    /// Loads and checks every table and binds the lookups (failing start-up, naming the table
    /// and its location, when one is unusable). None when no table is configured.
    pub async fn open(cfg: &EnrichConfig) -> Result<Option<Arc<LiveTables>>, TableError> {
        if cfg.tables.is_empty() {
            return Ok(None);
        }
        let mut slots = Vec::with_capacity(cfg.tables.len());
        for spec in &cfg.tables {
            let source = Source::open(
                &spec.path,
                S3Settings {
                    region: spec.region.as_deref(),
                    endpoint_url: spec.endpoint_url.as_deref(),
                    force_path_style: spec.force_path_style,
                },
            )
            .await;
            slots.push(Slot {
                spec: spec.clone(),
                name: spec.name.as_str().into(),
                source,
            });
        }
        let mut tables = Vec::with_capacity(slots.len());
        let mut versions = Vec::with_capacity(slots.len());
        let mut timings = Vec::with_capacity(slots.len());
        for slot in &slots {
            let Some((table, version, secs)) = slot.load(&Version::Unknown).await? else {
                return Err(slot.read_error("no data".into()));
            };
            tables.push(Arc::new(table?));
            versions.push(version);
            timings.push(secs);
        }
        let live = LiveTables {
            slots,
            lookups: cfg.lookups.clone(),
            runtime: tokio::runtime::Handle::current(),
            state: Mutex::new(State {
                tables: Vec::new(),
                versions,
            }),
            current: RwLock::new(Arc::new(Lookups::default())),
            generation: AtomicU64::new(0),
        };
        let lookups = live.bind(&tables)?;
        for ((slot, table), secs) in live.slots.iter().zip(&tables).zip(timings) {
            live.loaded(slot, table, &lookups, secs, false);
        }
        if let Ok(mut cur) = live.current.write() {
            *cur = Arc::new(lookups);
        }
        if let Ok(mut st) = live.state.lock() {
            st.tables = tables;
        }
        let live = Arc::new(live);
        if cfg.reload_secs > 0 {
            live.watch(Duration::from_secs(cfg.reload_secs));
        }
        Ok(Some(live))
    }

    fn bind(&self, tables: &[Arc<Table>]) -> Result<Lookups, TableError> {
        let named: Vec<(Arc<str>, String, Arc<Table>)> = self
            .slots
            .iter()
            .zip(tables)
            .map(|(s, t)| (s.name.clone(), s.spec.path.clone(), t.clone()))
            .collect();
        Lookups::compile(&self.lookups, &named)
    }

    fn loaded(&self, slot: &Slot, table: &Table, lookups: &Lookups, secs: f64, reload: bool) {
        metrics::emit(TableLoaded {
            table: &slot.spec.name,
            location: &slot.spec.path,
            rows: table.rows() as u64,
            bytes: (table.heap_bytes() + lookups.heap_bytes_for(&slot.name)) as u64,
            seconds: secs,
            reload,
        });
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// The lookups in use and their generation.
    pub fn current(&self) -> (u64, Arc<Lookups>) {
        // Generation first: a swap between the two reads is seen at the next check.
        let g = self.generation();
        let l = match self.current.read() {
            Ok(l) => l.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        (g, l)
    }

    /// Reads every table whose source changed (`force`: every table, as on SIGHUP); swaps the
    /// lookups when one was replaced. Blocks: call it from a plain thread.
    pub fn reload(&self, force: bool) {
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        let mut latest = None;
        for (i, slot) in self.slots.iter().enumerate() {
            let known = match (force, state.versions.get(i)) {
                (false, Some(v)) => v.clone(),
                _ => Version::Unknown,
            };
            let loaded = match &slot.source {
                // A file is read without the runtime: it works after the runtime is gone too.
                Source::File(_) => poll_ready(slot.load(&known)),
                Source::S3 { .. } => self.runtime.block_on(slot.load(&known)),
            };
            let (table, version, secs) = match loaded {
                Ok(None) => continue,
                Ok(Some(l)) => l,
                Err(e) => {
                    // Not read: tried again at the next check.
                    metrics::emit(TableReloadFailed {
                        table: &slot.spec.name,
                        error: &e.to_string(),
                    });
                    continue;
                }
            };
            if let Some(v) = state.versions.get_mut(i) {
                *v = version;
            }
            let table = match table {
                Ok(t) => Arc::new(t),
                Err(e) => {
                    metrics::emit(TableReloadFailed {
                        table: &slot.spec.name,
                        error: &e.to_string(),
                    });
                    continue;
                }
            };
            let mut candidate = state.tables.clone();
            if let Some(t) = candidate.get_mut(i) {
                *t = table.clone();
            }
            match self.bind(&candidate) {
                Ok(lookups) => {
                    self.loaded(slot, &table, &lookups, secs, true);
                    state.tables = candidate;
                    latest = Some(lookups);
                }
                Err(e) => metrics::emit(TableReloadFailed {
                    table: &slot.spec.name,
                    error: &e.to_string(),
                }),
            }
        }
        if let Some(lookups) = latest
            && let Ok(mut cur) = self.current.write()
        {
            *cur = Arc::new(lookups);
            self.generation.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Checks the sources every `interval`.
    pub fn watch(self: &Arc<Self>, interval: Duration) {
        if let Err(e) = watch::poll("tables-watch", self, interval, |t| t.reload(false)) {
            metrics::emit(TableReloadFailed {
                table: "",
                error: &format!("cannot start the table watcher: {e}"),
            });
        }
    }
}

/// Runs a future that never waits on I/O readiness (a file read) to completion on this thread.
#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_changed_file_is_followed_and_a_broken_one_keeps_the_running_table() {
        let dir =
            std::env::temp_dir().join(format!("trailhose-live-tables-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("accounts.csv");
        std::fs::write(&path, "id,name\n1,one\n").unwrap();
        let cfg: EnrichConfig = toml::from_str(&format!(
            "reload_secs = 0\n[[tables]]\nname = \"accounts\"\npath = {:?}\nkey = \"id\"\n\
             [[lookups]]\ntable = \"accounts\"\nfrom = \"recipientAccountId\"\nadd = {{ account = [\"name\"] }}\n",
            path.display().to_string()
        ))
        .unwrap();
        let live = LiveTables::open(&cfg).await.unwrap().unwrap();
        let live2 = live.clone();
        let path2 = path.clone();
        tokio::task::spawn_blocking(move || {
            let (live, path) = (live2, path2);
            assert_eq!(live.generation(), 0);
            live.reload(false);
            assert_eq!(live.generation(), 0, "unchanged");
            std::fs::write(&path, "id,name\n1,one\n1,again\n").unwrap();
            live.reload(false);
            assert_eq!(live.generation(), 0, "a broken table is refused");
            // A table without the column a lookup needs is refused too.
            std::fs::write(&path, "id,label\n1,x\n").unwrap();
            live.reload(false);
            assert_eq!(live.generation(), 0);
            std::fs::write(&path, "id,name\n1,uno\n22,dos\n").unwrap();
            live.reload(false);
            assert_eq!(live.generation(), 1);
            live.reload(true);
            assert_eq!(live.generation(), 2, "forced");
        })
        .await
        .unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_file_over_max_bytes_is_refused_unread() {
        let dir = std::env::temp_dir().join(format!("trailhose-big-table-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("big.csv");
        std::fs::write(&path, format!("id,name\n{}\n", "1,x\n".repeat(100))).unwrap();
        let cfg: EnrichConfig = toml::from_str(&format!(
            "reload_secs = 0\n[[tables]]\nname = \"big\"\npath = {:?}\nkey = \"id\"\nmax_bytes = 64\n",
            path.display().to_string()
        ))
        .unwrap();
        let e = LiveTables::open(&cfg).await.err().unwrap().to_string();
        assert!(e.contains("over max_bytes = 64; not read"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
