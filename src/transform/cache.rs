//! Compiled modules cached on disk, keyed by the module's content hash and the engine's
//! compatibility hash, so that a restart (or a second pod on the same node volume) skips the
//! compile. Loading a cached artifact maps native code, so the cache must be ours alone: the
//! directory is created 0700, and it and each artifact are used only when they are not symlinks,
//! are owned by the running user and cannot be written by group or others. Anything else is
//! compiled instead (and the artifact rewritten), with a note saying why.

use std::fs::{File, Metadata, OpenOptions};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
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
/// there and passes the checks. Cache problems are never fatal: the module is compiled instead.
/// Returns the component and a note about the cache when it could not be used.
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
    let mut note = None;
    match read_artifact(&path) {
        Ok(Some(bytes)) => {
            // SAFETY: the bytes were written by `Component::serialize` of this engine build (the
            // name carries its compatibility hash), read through a descriptor that is not a
            // symlink, owned by this user, in a directory only this user can write.
            match unsafe { Component::deserialize(engine, &bytes) } {
                Ok(c) => return Ok((c, Source::Cached, None)),
                Err(_) => {
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        Ok(None) => {}
        Err(refused) => note = Some(refused),
    }
    let component = Component::new(engine, wasm)?;
    let written = component
        .serialize()
        .map_err(|e| e.to_string())
        .and_then(|bytes| write_atomic(&path, &bytes).map_err(|e| e.to_string()));
    if let Err(e) = written {
        note.get_or_insert(format!(
            "cannot write the compiled module to {}: {e}",
            path.display()
        ));
    }
    Ok((component, Source::Compiled, note))
}

fn artifact_path(engine: &Engine, wasm: &[u8], dir: &Path) -> PathBuf {
    let mut h = DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut h);
    dir.join(format!("{}-{:016x}.cwasm", digest(wasm), h.finish()))
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Why `meta` (of `what` at `path`) may not hold native code we load, if it may not.
fn refuse(meta: &Metadata, what: &str, path: &Path) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let me = euid();
    if meta.file_type().is_symlink() {
        Some(format!(
            "{what} {} is a symlink; not loading native code through it",
            path.display()
        ))
    } else if meta.uid() != me {
        Some(format!(
            "{what} {} is owned by uid {}, not by this process (uid {me}); not loading native code from it",
            path.display(),
            meta.uid()
        ))
    } else if meta.permissions().mode() & 0o022 != 0 {
        Some(format!(
            "{what} {} is writable by others; not loading native code from it",
            path.display()
        ))
    } else {
        None
    }
}

/// Creates `dir` (0700) if needed; refuses a symlink, a directory owned by another user, or
/// one that group or others can write.
fn private_dir(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::DirBuilderExt;
    let meta = match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| format!("cannot create cache directory {}: {e}", dir.display()))?;
            std::fs::symlink_metadata(dir)
        }
        m => m,
    }
    .map_err(|e| format!("cannot use cache directory {}: {e}", dir.display()))?;
    if let Some(why) = refuse(&meta, "cache directory", dir) {
        return Err(why);
    }
    if !meta.is_dir() {
        return Err(format!("cache path {} is not a directory", dir.display()));
    }
    Ok(())
}

/// The artifact's bytes, `None` when there is none, or why it is refused. Opened without
/// following a symlink and checked on the open descriptor, so it cannot be swapped in between.
fn read_artifact(path: &Path) -> Result<Option<Vec<u8>>, String> {
    let mut file = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        // ELOOP: the name is a symlink.
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(format!(
                "cache artifact {} is a symlink; not loading native code through it",
                path.display()
            ));
        }
        Err(e) => {
            return Err(format!(
                "cannot read cache artifact {}: {e}",
                path.display()
            ));
        }
    };
    let meta = file
        .metadata()
        .map_err(|e| format!("cannot read cache artifact {}: {e}", path.display()))?;
    if let Some(why) = refuse(&meta, "cache artifact", path) {
        return Err(why);
    }
    if !meta.is_file() {
        return Err(format!("cache artifact {} is not a file", path.display()));
    }
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read cache artifact {}: {e}", path.display()))?;
    Ok(Some(bytes))
}

/// Writes a new file 0600 next to `path` and renames it over `path` (replacing whatever was
/// there, a refused artifact included).
fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let mut f: File = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)?;
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

    /// The checks that guard loading native code: an artifact owned by another user and a
    /// symlinked directory are refused (the module is compiled), a good artifact is loaded.
    #[test]
    fn foreign_artifacts_and_symlinked_directories_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let engine = Engine::default();
        let wasm = wat::parse_str("(component (core module))").unwrap();
        let base =
            std::env::temp_dir().join(format!("trailhose-cache-owner-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let dir = base.join("cache");
        let first = load(&engine, &wasm, Some(&dir)).unwrap();
        assert_eq!((first.1, first.2), (Source::Compiled, None));
        let second = load(&engine, &wasm, Some(&dir)).unwrap();
        assert_eq!((second.1, second.2), (Source::Cached, None));
        let artifact = artifact_path(&engine, &wasm, &dir);
        let mode = std::fs::metadata(&artifact).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        // Another user's artifact (the tests run as root, so chown works; skip otherwise).
        if euid() == 0 {
            std::os::unix::fs::lchown(&artifact, Some(65534), Some(65534)).unwrap();
            let (_, source, note) = load(&engine, &wasm, Some(&dir)).unwrap();
            assert_eq!(source, Source::Compiled);
            let note = note.unwrap();
            assert!(note.contains("owned by uid 65534"), "{note}");
            // It was replaced by our own, which loads again.
            assert_eq!(std::fs::metadata(&artifact).unwrap().uid(), 0);
            assert_eq!(load(&engine, &wasm, Some(&dir)).unwrap().1, Source::Cached);

            // A directory owned by another user is refused too.
            let theirs = base.join("theirs");
            std::fs::create_dir(&theirs).unwrap();
            std::fs::set_permissions(&theirs, std::fs::Permissions::from_mode(0o700)).unwrap();
            std::os::unix::fs::lchown(&theirs, Some(65534), Some(65534)).unwrap();
            let note = private_dir(&theirs).unwrap_err();
            assert!(note.contains("owned by uid 65534"), "{note}");
        }

        // An artifact that is a symlink (to a good artifact) is refused.
        let target = base.join("elsewhere.cwasm");
        std::fs::copy(&artifact, &target).unwrap();
        std::fs::remove_file(&artifact).unwrap();
        std::os::unix::fs::symlink(&target, &artifact).unwrap();
        let (_, source, note) = load(&engine, &wasm, Some(&dir)).unwrap();
        assert_eq!(source, Source::Compiled);
        assert!(note.unwrap().contains("is a symlink"));

        // A symlinked cache directory is refused, even though its target would pass.
        let link = base.join("link");
        std::os::unix::fs::symlink(&dir, &link).unwrap();
        let (_, source, note) = load(&engine, &wasm, Some(&link)).unwrap();
        assert_eq!(source, Source::Compiled);
        let note = note.unwrap();
        assert!(
            note.contains("cache directory") && note.contains("symlink"),
            "{note}"
        );
        std::fs::remove_dir_all(&base).unwrap();
    }
}
