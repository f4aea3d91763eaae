//! Local files and directories in CloudTrail's delivery layout.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("input {path}: {source}")]
    Walk {
        path: String,
        #[source]
        source: walkdir::Error,
    },
    #[error("input {0} does not exist")]
    Missing(String),
}

/// Whether a file in a walked directory looks like a delivery file. Explicit file arguments are
/// always taken; inside directories, other files (READMEs, our own temp files) are left alone.
fn is_candidate(path: &Path) -> bool {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    !name.starts_with('.')
        && (name.ends_with(".json") || name.ends_with(".json.gz") || name.ends_with(".gz"))
}

/// Every input file, each directory walked recursively, in a stable (sorted) order.
pub fn list_inputs(inputs: &[PathBuf]) -> Result<Vec<PathBuf>, SourceError> {
    let mut files = Vec::new();
    for input in inputs {
        if !input.exists() {
            return Err(SourceError::Missing(input.display().to_string()));
        }
        if input.is_file() {
            files.push(input.clone());
            continue;
        }
        let mut found = Vec::new();
        for entry in walkdir::WalkDir::new(input).follow_links(true) {
            let entry = entry.map_err(|source| SourceError::Walk {
                path: input.display().to_string(),
                source,
            })?;
            if entry.file_type().is_file() && is_candidate(entry.path()) {
                found.push(entry.into_path());
            }
        }
        found.sort();
        files.extend(found);
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walks_directories_and_keeps_explicit_files() {
        let dir = std::env::temp_dir().join(format!("trailhose-local-{}", std::process::id()));
        let deep = dir.join("AWSLogs/1/CloudTrail/us-east-1/2024/03/18");
        std::fs::create_dir_all(&deep).unwrap();
        for name in ["b.json.gz", "a.json", ".hidden.json.gz", "README.md"] {
            std::fs::write(deep.join(name), b"x").unwrap();
        }
        let explicit = dir.join("notes.txt");
        std::fs::write(&explicit, b"x").unwrap();
        let got = list_inputs(&[dir.join("AWSLogs"), explicit.clone()]).unwrap();
        assert_eq!(
            got,
            vec![deep.join("a.json"), deep.join("b.json.gz"), explicit]
        );
        assert!(matches!(
            list_inputs(&[dir.join("nope")]),
            Err(SourceError::Missing(_))
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
