//! A run directory: numbered checkpoints, a pointer to the newest, and rotation.
//!
//! ```text
//! run/ckpt-1000/     a checkpoint (see the parent module) after global step 1000
//! run/ckpt-2000/
//! run/latest         one line, the name of the newest checkpoint ("ckpt-2000"), replaced atomically
//! ```

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};

use super::{atomic, is_checkpoint, save, TrainState};
use crate::model::params::Params;
use crate::optim::AdamAtan2;

pub const LATEST_FILE: &str = "latest";
const PREFIX: &str = "ckpt-";

/// The directory name of the checkpoint after global step `step`.
pub fn checkpoint_name(step: u64) -> String {
    format!("{PREFIX}{step}")
}

/// Saves `run_dir/ckpt-<global_step>/`, points `run_dir/latest` at it, then removes the
/// oldest checkpoints so that `keep_last` remain (the new one always stays). Returns the new
/// checkpoint's path.
pub fn save_in_run(run_dir: &Path, params: &Params, optimizer: &AdamAtan2, state: &TrainState, keep_last: usize) -> Result<PathBuf> {
    ensure!(keep_last >= 1, "keep_last must be at least 1 (got {keep_last})");
    let name = checkpoint_name(state.global_step);
    let dir = run_dir.join(&name);
    save(&dir, params, optimizer, state)?;
    atomic::write_file_atomically(&run_dir.join(LATEST_FILE), format!("{name}\n").as_bytes())?;

    let mut older: Vec<(u64, PathBuf)> = list_checkpoints(run_dir)?.into_iter().filter(|(_, p)| *p != dir).collect();
    let remove = (older.len() + 1).saturating_sub(keep_last);
    for (_, path) in older.drain(..remove) {
        fs::remove_dir_all(&path).with_context(|| format!("removing old checkpoint {}", path.display()))?;
    }
    Ok(dir)
}

/// Every `ckpt-<step>` directory of `run_dir`, complete or not, by ascending step.
pub fn list_checkpoints(run_dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut found = Vec::new();
    for entry in fs::read_dir(run_dir).with_context(|| format!("listing {}", run_dir.display()))? {
        let entry = entry.with_context(|| format!("listing {}", run_dir.display()))?;
        let name = entry.file_name();
        let step = name.to_str().and_then(|n| n.strip_prefix(PREFIX)).and_then(|s| s.parse::<u64>().ok());
        if let (Some(step), true) = (step, entry.path().is_dir()) {
            found.push((step, entry.path()));
        }
    }
    found.sort();
    Ok(found)
}

/// The checkpoint a run in `run_dir` should resume from: the one `latest` names when it is
/// complete, else the newest complete `ckpt-<step>`; `None` when there is none (or no
/// `run_dir`). Completeness is the presence of the manifest; [`super::load`] verifies the rest.
pub fn find_resume(run_dir: &Path) -> Result<Option<PathBuf>> {
    if !run_dir.is_dir() {
        return Ok(None);
    }
    let latest = run_dir.join(LATEST_FILE);
    if latest.is_file() {
        let text = fs::read_to_string(&latest).with_context(|| format!("reading {}", latest.display()))?;
        let name = text.trim();
        if !name.is_empty() {
            let dir = run_dir.join(name);
            atomic::recover_interrupted(&dir)?;
            if is_checkpoint(&dir) {
                return Ok(Some(dir));
            }
        }
    }
    let complete = list_checkpoints(run_dir)?.into_iter().rev().find(|(_, p)| is_checkpoint(p));
    Ok(complete.map(|(_, p)| p))
}
