//! Compiled modules cached on disk, keyed by the module's content hash and the engine's
//! compatibility hash, so that a restart (or a second pod on the same node volume) skips the
//! compile. Loading a cached artifact maps native code, so the cache directory must be private:
//! it is created 0700 and not used when others can write to it.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

/// The content hash of a module, hex.
pub fn digest(wasm: &[u8]) -> String {
    let d = Sha256::digest(wasm);
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// How a component was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Compiled,
    Cached,
}

/// Compiles `wasm`, or loads it from `dir` when an artifact for the same bytes and engine is
/// there. Cache problems are never fatal: the module is compiled instead. Returns the component
/// and a note about the cache when it could not be used.
pub fn load(
    engine: &Engine,
    wasm: &[u8],
    dir: Option<&Path>,
) -> wasmtime::Result<(Component, Source, Option<String>)> {
    let Some(dir) = dir else {
        return Ok((Component::new(engine, wasm)?, Source::Compiled, None));
    };
    if let Err(note) = private_dir(dir) {
        return Ok((Component::new(engine, wasm)?, Source::Compiled, Some(note)));
    }
    let path = artifact_path(engine, wasm, dir);
    if path.is_file() {
        // SAFETY: the file was written by `Component::serialize` of this engine build (the
        // name carries its compatibility hash) into a directory only this user can write.
        match unsafe { Component::deserialize_file(engine, &path) } {
            Ok(c) => return Ok((c, Source::Cached, None)),
            Err(_) => {
                let _ = std::fs::remove_file(&path);
            }
        }
    }
    let component = Component::new(engine, wasm)?;
    let note = component
        .serialize()
        .map_err(|e| e.to_string())
        .and_then(|bytes| write_atomic(&path, &bytes).map_err(|e| e.to_string()))
        .err()
        .map(|e| {
            format!(
                "cannot write the compiled module to {}: {e}",
                path.display()
            )
        });
    Ok((component, Source::Compiled, note))
}

fn artifact_path(engine: &Engine, wasm: &[u8], dir: &Path) -> PathBuf {
    let mut h = DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut h);
    dir.join(format!("{}-{:016x}.cwasm", digest(wasm), h.finish()))
}

/// Creates `dir` (0700) if needed; refuses a directory that group or others can write.
fn private_dir(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| format!("cannot create cache directory {}: {e}", dir.display()))?;
    }
    let meta = std::fs::metadata(dir)
        .map_err(|e| format!("cannot use cache directory {}: {e}", dir.display()))?;
    if !meta.is_dir() {
        return Err(format!("cache path {} is not a directory", dir.display()));
    }
    if meta.permissions().mode() & 0o022 != 0 {
        return Err(format!(
            "cache directory {} is writable by others; not loading native code from it",
            dir.display()
        ));
    }
    Ok(())
}

fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_is_sha256_hex() {
        assert_eq!(
            digest(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn a_directory_others_can_write_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let base =
            std::env::temp_dir().join(format!("trailhose-cache-test-{}", std::process::id()));
        let fresh = base.join("fresh");
        assert_eq!(private_dir(&fresh), Ok(()));
        let mode = std::fs::metadata(&fresh).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        std::fs::set_permissions(&fresh, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(
            private_dir(&fresh)
                .unwrap_err()
                .contains("writable by others")
        );
        std::fs::remove_dir_all(&base).unwrap();
    }
}
