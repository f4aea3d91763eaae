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
use std::path::Path;

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
    // Every later step works relative to this descriptor, checked as opened: swapping the
    // directory's path (or a parent) for a symlink afterwards changes nothing.
    let dir_fd = match private_dir(dir) {
        Ok(fd) => fd,
        Err(note) => return Ok((Component::new(engine, wasm)?, Source::Compiled, Some(note))),
    };
    let name = artifact_name(engine, wasm);
    let path = dir.join(&name);
    let mut note = None;
    match read_artifact(&dir_fd, &name, &path) {
        Ok(Some(bytes)) => {
            // SAFETY: the bytes were written by `Component::serialize` of this engine build (the
            // name carries its compatibility hash), read through a descriptor that is not a
            // symlink, owned by this user, in a directory only this user can write.
            match unsafe { Component::deserialize(engine, &bytes) } {
                Ok(c) => return Ok((c, Source::Cached, None)),
                Err(_) => {
                    let _ = unlink_at(&dir_fd, &name);
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
        .and_then(|bytes| write_atomic(&dir_fd, &name, &bytes).map_err(|e| e.to_string()));
    if let Err(e) = written {
        note.get_or_insert(format!(
            "cannot write the compiled module to {}: {e}",
            path.display()
        ));
    }
    Ok((component, Source::Compiled, note))
}

fn artifact_name(engine: &Engine, wasm: &[u8]) -> String {
    let mut h = DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut h);
    format!("{}-{:016x}.cwasm", digest(wasm), h.finish())
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
            "{what} {} is writable by group or others; not loading native code from it",
            path.display()
        ))
    } else {
        None
    }
}

/// Creates `dir` (0700) if needed and opens it without following a symlink; refuses, on the
/// open descriptor, a directory owned by another user or one that group or others can write.
fn private_dir(dir: &Path) -> Result<File, String> {
    use std::os::unix::fs::DirBuilderExt;
    if let Err(e) = std::fs::symlink_metadata(dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            return Err(format!("cannot use cache directory {}: {e}", dir.display()));
        }
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| format!("cannot create cache directory {}: {e}", dir.display()))?;
    }
    let fd = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(dir)
        .map_err(|e| match e.raw_os_error() {
            // O_DIRECTORY with O_NOFOLLOW reports a symlink as ENOTDIR (or ELOOP).
            Some(libc::ELOOP | libc::ENOTDIR)
                if std::fs::symlink_metadata(dir).is_ok_and(|m| m.file_type().is_symlink()) =>
            {
                format!(
                    "cache directory {} is a symlink; not loading native code through it",
                    dir.display()
                )
            }
            Some(libc::ENOTDIR) => format!("cache path {} is not a directory", dir.display()),
            _ => format!("cannot use cache directory {}: {e}", dir.display()),
        })?;
    let meta = fd
        .metadata()
        .map_err(|e| format!("cannot use cache directory {}: {e}", dir.display()))?;
    if let Some(why) = refuse(&meta, "cache directory", dir) {
        return Err(why);
    }
    if !meta.is_dir() {
        return Err(format!("cache path {} is not a directory", dir.display()));
    }
    Ok(fd)
}

fn c_name(name: &str) -> std::io::Result<std::ffi::CString> {
    std::ffi::CString::new(name).map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))
}

/// `openat(dir, name)` without following a symlink, as a `File`.
fn open_at(
    dir: &File,
    name: &str,
    flags: libc::c_int,
    mode: libc::mode_t,
) -> std::io::Result<File> {
    use std::os::fd::{AsRawFd, FromRawFd};
    let name = c_name(name)?;
    let flags = flags | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    // SAFETY: `name` is a valid C string and `dir` an open descriptor, both alive for the call.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            flags,
            libc::c_uint::from(mode),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just opened and is owned by nothing else.
    Ok(unsafe { File::from_raw_fd(fd) })
}

fn unlink_at(dir: &File, name: &str) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let name = c_name(name)?;
    // SAFETY: as in `open_at`.
    if unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), 0) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The artifact's bytes, `None` when there is none, or why it is refused. Opened in the checked
/// directory without following a symlink and checked on the open descriptor, so it cannot be
/// swapped in between. `path` only names it in messages.
fn read_artifact(dir: &File, name: &str, path: &Path) -> Result<Option<Vec<u8>>, String> {
    let mut file = match open_at(dir, name, libc::O_RDONLY, 0) {
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

/// Writes a new file 0600 next to `name` in `dir` and renames it over `name` (replacing
/// whatever was there, a refused artifact included).
fn write_atomic(dir: &File, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let tmp = format!("{name}.tmp{}", std::process::id());
    let _ = unlink_at(dir, &tmp);
    let mut f = open_at(
        dir,
        &tmp,
        libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL,
        0o600,
    )?;
    f.write_all(bytes)?;
    f.sync_all()?;
    let (from, to) = (c_name(&tmp)?, c_name(name)?);
    let fd = dir.as_raw_fd();
    // SAFETY: valid C strings and an open directory descriptor, alive for the call.
    if unsafe { libc::renameat(fd, from.as_ptr(), fd, to.as_ptr()) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn artifact_path(engine: &Engine, wasm: &[u8], dir: &Path) -> PathBuf {
        dir.join(artifact_name(engine, wasm))
    }

    /// The directory is checked once, on its descriptor; the artifact is then opened relative
    /// to that descriptor. Swapping the directory's path for a symlink to another (here, one
    /// holding an artifact) after the check must not redirect the read.
    #[test]
    fn the_artifact_is_read_from_the_checked_directory_not_its_path() {
        let engine = Engine::default();
        let wasm = wat::parse_str("(component (core module))").unwrap();
        let base =
            std::env::temp_dir().join(format!("trailhose-cache-swap-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let (dir, other) = (base.join("cache"), base.join("other"));
        // `other` holds a good artifact for this module.
        load(&engine, &wasm, Some(&other)).unwrap();
        let name = artifact_name(&engine, &wasm);
        let checked = private_dir(&dir).unwrap();
        // After the check: the path now leads elsewhere.
        std::fs::rename(&dir, base.join("moved")).unwrap();
        std::os::unix::fs::symlink(&other, &dir).unwrap();
        let got = read_artifact(&checked, &name, &dir.join(&name)).unwrap();
        assert!(got.is_none(), "read through the swapped path");
        // And a write lands in the checked directory too.
        write_atomic(&checked, &name, b"x").unwrap();
        assert_eq!(std::fs::read(base.join("moved").join(&name)).unwrap(), b"x");
        std::fs::remove_dir_all(&base).unwrap();
    }

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
        assert!(private_dir(&fresh).is_ok());
        let mode = std::fs::metadata(&fresh).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        std::fs::set_permissions(&fresh, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(
            private_dir(&fresh)
                .unwrap_err()
                .contains("writable by group or others")
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
