//! Stamps the binary with the commit it was built from, for `trailhose --version`.

use std::path::PathBuf;
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
        .filter(|s| !s.is_empty())
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=TRAILHOSE_COMMIT");
    // An image build has no .git: it passes the commit in.
    let commit = std::env::var("TRAILHOSE_COMMIT")
        .ok()
        .filter(|c| !c.is_empty())
        .or_else(|| git(&["rev-parse", "--short=12", "HEAD"]));
    // Rebuild when HEAD moves: watch this worktree's HEAD and its reflog (appended on every commit
    // and checkout) and the one branch HEAD names, not all of refs/heads (a directory is scanned
    // whole, so a commit on any other branch or worktree would recompile the crate). Only files
    // that exist are watched (a missing one reruns always).
    if let (Some(dir), Some(common)) = (
        git(&["rev-parse", "--git-dir"]),
        git(&["rev-parse", "--git-common-dir"]),
    ) {
        let (dir, common) = (PathBuf::from(dir), PathBuf::from(common));
        let branch = git(&["symbolic-ref", "-q", "HEAD"]).map(|r| common.join(r));
        let watched = [
            Some(dir.join("HEAD")),
            Some(dir.join("logs/HEAD")),
            branch,
            Some(common.join("packed-refs")),
        ];
        for p in watched.into_iter().flatten() {
            if p.exists() {
                println!("cargo:rerun-if-changed={}", p.display());
            }
        }
    }
    let mut features: Vec<String> = std::env::vars()
        .filter_map(|(k, _)| k.strip_prefix("CARGO_FEATURE_").map(|f| f.to_lowercase()))
        .collect();
    features.sort();
    let features = if features.is_empty() {
        "none".to_owned()
    } else {
        features.join(",")
    };
    println!(
        "cargo:rustc-env=TRAILHOSE_VERSION_LINE={} (commit {}, features: {features}, profile: {})",
        std::env::var("CARGO_PKG_VERSION").unwrap_or_default(),
        commit.as_deref().unwrap_or("unknown"),
        profile(),
    );
}

/// The profile's name: cargo's `PROFILE` says only `debug` or `release` (a `dist` build
/// reports `release`), so it is read from `OUT_DIR` (`target/<profile>/build/<pkg>/out`).
fn profile() -> String {
    let out = std::env::var("OUT_DIR").unwrap_or_default();
    let up = |n: usize| {
        std::path::Path::new(&out)
            .ancestors()
            .nth(n)
            .and_then(|p| p.file_name())
            .and_then(|n| n.to_str())
            .map(str::to_owned)
    };
    // Only in the layout described; any other (a future build-dir layout) says PROFILE's.
    match (up(2).as_deref(), up(3)) {
        (Some("build"), Some(profile)) => profile,
        _ => std::env::var("PROFILE").unwrap_or_default(),
    }
}
