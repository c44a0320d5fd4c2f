//! Crash-safe writes of whole directories and small files.
//!
//! A directory `parent/name` is replaced in four moves:
//!
//! ```text
//! 1. write everything into parent/.name.partial, fsync each file and the directory
//! 2. rename parent/name -> parent/.name.old          (only when an older one exists)
//! 3. rename parent/.name.partial -> parent/name, fsync parent
//! 4. remove parent/.name.old
//! ```
//!
//! A crash during 1 leaves `name` untouched (the partial directory is removed by the next
//! save); between 2 and 3 leaves no `name` but a complete `.name.old`, which
//! [`recover_interrupted`] renames back; after 3 only a stale `.name.old` remains. So the
//! previous directory is always intact, under its own name or after recovery.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// `(parent, partial, old)` paths of a directory written atomically.
fn side_paths(dir: &Path) -> Result<(PathBuf, PathBuf, PathBuf)> {
    let Some(name) = dir.file_name().and_then(|n| n.to_str()) else {
        bail!("{}: a checkpoint path must end in a directory name", dir.display());
    };
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let partial = parent.join(format!(".{name}.partial"));
    let old = parent.join(format!(".{name}.old"));
    Ok((parent, partial, old))
}

/// fsync a directory, so that the names created or renamed in it are on disk.
pub fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|f| f.sync_all()).with_context(|| format!("flushing directory {} to disk", dir.display()))
}

/// Writes `bytes` to `path` and flushes them to disk.
pub fn write_file_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    f.write_all(bytes).and_then(|()| f.sync_all()).with_context(|| format!("writing {}", path.display()))
}

/// Replaces the small file `path` with `bytes` atomically (temporary file, fsync, rename).
pub fn write_file_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let (parent, partial, _) = side_paths(path)?;
    write_file_synced(&partial, bytes)?;
    fs::rename(&partial, path).with_context(|| format!("renaming {} to {}", partial.display(), path.display()))?;
    fsync_dir(&parent)
}

/// Rolls back a replacement of `dir` that was interrupted between its two renames, and
/// removes what an interrupted write left beside it. Safe to call at any time.
pub fn recover_interrupted(dir: &Path) -> Result<()> {
    let (parent, _, old) = side_paths(dir)?;
    if !dir.exists() && old.is_dir() {
        fs::rename(&old, dir).with_context(|| format!("restoring {} from {}", dir.display(), old.display()))?;
        fsync_dir(&parent)?;
    }
    Ok(())
}

/// Writes the directory `dir` atomically: `fill` writes its files into a fresh temporary
/// directory (and must flush each to disk), which then replaces `dir` (see the module doc).
pub fn write_dir_atomically(dir: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let (parent, partial, old) = side_paths(dir)?;
    fs::create_dir_all(&parent).with_context(|| format!("creating {}", parent.display()))?;
    recover_interrupted(dir)?;
    for stale in [&partial, &old] {
        if stale.exists() {
            fs::remove_dir_all(stale).with_context(|| format!("removing {} left by an interrupted save", stale.display()))?;
        }
    }
    fs::create_dir(&partial).with_context(|| format!("creating {}", partial.display()))?;
    fill(&partial)?;
    fsync_dir(&partial)?;

    let replacing = dir.exists();
    if replacing {
        fs::rename(dir, &old).with_context(|| format!("moving the previous {} aside", dir.display()))?;
    }
    fs::rename(&partial, dir).with_context(|| format!("renaming {} to {}", partial.display(), dir.display()))?;
    fsync_dir(&parent)?;
    if replacing {
        fs::remove_dir_all(&old).with_context(|| format!("removing the previous checkpoint at {}", old.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_and_recovers() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ck");
        let write = |text: &'static str| write_dir_atomically(&dir, |d| write_file_synced(&d.join("a"), text.as_bytes()));
        write("one").unwrap();
        write("two").unwrap();
        assert_eq!(fs::read_to_string(dir.join("a")).unwrap(), "two");
        assert!(!tmp.path().join(".ck.old").exists() && !tmp.path().join(".ck.partial").exists());

        // A crash between the two renames: the previous directory is only at .ck.old.
        fs::rename(&dir, tmp.path().join(".ck.old")).unwrap();
        recover_interrupted(&dir).unwrap();
        assert_eq!(fs::read_to_string(dir.join("a")).unwrap(), "two");

        // A failed fill leaves the previous directory as it was.
        let err = write_dir_atomically(&dir, |_| bail!("disk full")).unwrap_err();
        assert!(err.to_string().contains("disk full"));
        assert_eq!(fs::read_to_string(dir.join("a")).unwrap(), "two");
        write("three").unwrap();
        assert_eq!(fs::read_to_string(dir.join("a")).unwrap(), "three");

        write_file_atomically(&tmp.path().join("latest"), b"x").unwrap();
        assert_eq!(fs::read_to_string(tmp.path().join("latest")).unwrap(), "x");
    }
}
