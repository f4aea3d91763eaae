//! GeoIP databases that follow their files. geoipupdate (or a volume update) replaces a file;
//! the next check opens and verifies it, and each worker switches at its next input file, so
//! no event sees half of an update. A file that fails to open keeps the running databases.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use super::geo::{GeoDb, GeoError};
use crate::metrics::{self, GeoReloaded};
use crate::watch::{self, Stamp, stamp};

pub struct LiveGeo {
    city: Option<PathBuf>,
    asn: Option<PathBuf>,
    current: RwLock<Arc<GeoDb>>,
    /// Bumped on every successful reload.
    generation: AtomicU64,
    stamps: Mutex<[Option<Stamp>; 2]>,
}

impl LiveGeo {
    /// Opens the databases (failing start-up when one is unusable).
    pub fn open(city: Option<PathBuf>, asn: Option<PathBuf>) -> Result<Arc<LiveGeo>, GeoError> {
        let stamps = [
            city.as_deref().and_then(stamp),
            asn.as_deref().and_then(stamp),
        ];
        let db = GeoDb::open(city.as_deref(), asn.as_deref())?;
        Ok(Arc::new(LiveGeo {
            city,
            asn,
            current: RwLock::new(Arc::new(db)),
            generation: AtomicU64::new(0),
            stamps: Mutex::new(stamps),
        }))
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// The databases in use and their generation.
    pub fn current(&self) -> (u64, Arc<GeoDb>) {
        // Read the generation first: a reload between the two reads is seen at the next check.
        let g = self.generation();
        let db = match self.current.read() {
            Ok(db) => db.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        (g, db)
    }

    /// Opens the files again when one changed (`force`: always, as on SIGHUP).
    pub fn reload(&self, force: bool) {
        if self.city.is_none() && self.asn.is_none() {
            return;
        }
        let now = [
            self.city.as_deref().and_then(stamp),
            self.asn.as_deref().and_then(stamp),
        ];
        {
            let Ok(mut last) = self.stamps.lock() else {
                return;
            };
            if !force && *last == now {
                return;
            }
            *last = now;
        }
        match GeoDb::open(self.city.as_deref(), self.asn.as_deref()) {
            Ok(db) => {
                if let Ok(mut cur) = self.current.write() {
                    *cur = Arc::new(db);
                    self.generation.fetch_add(1, Ordering::SeqCst);
                }
                metrics::emit(GeoReloaded { error: None });
            }
            Err(e) => metrics::emit(GeoReloaded {
                error: Some(&e.to_string()),
            }),
        }
    }

    /// Checks the files every `interval` while the databases are in use.
    pub fn watch(self: &Arc<Self>, interval: Duration) {
        if self.city.is_none() && self.asn.is_none() {
            return;
        }
        if let Err(e) = watch::poll("geoip-watch", self, interval, |g| g.reload(false)) {
            metrics::emit(GeoReloaded {
                error: Some(&format!("cannot start the file watcher: {e}")),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn a_replaced_file_is_followed_and_a_broken_one_keeps_the_running_database() {
        let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/geoip/demo-city.mmdb");
        let dir = std::env::temp_dir().join(format!("trailhose-live-geo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("city.mmdb");
        std::fs::copy(&demo, &path).unwrap();
        let live = LiveGeo::open(Some(path.clone()), None).unwrap();
        live.watch(Duration::from_millis(20));
        assert_eq!(live.generation(), 0);

        // Half-written or corrupt: refused, the running database stays.
        std::fs::write(&path, b"not an mmdb").unwrap();
        live.reload(false);
        assert_eq!(live.generation(), 0);
        assert!(!live.current().1.is_empty());

        // A good file again: the watcher thread picks it up on its own.
        std::fs::copy(&demo, &path).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while live.generation() == 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(live.generation(), 1);
        // Unchanged file, no reload; SIGHUP (force) reloads anyway.
        live.reload(false);
        assert_eq!(live.generation(), 1);
        live.reload(true);
        assert_eq!(live.generation(), 2);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
