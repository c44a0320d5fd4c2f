//! The GEMM algorithm store: one small JSON file that remembers, per GPU and cuBLASLt version,
//! which algorithm each product shape ran, so that later runs on that kind of machine run the
//! same ones without tuning again.
//!
//! Why: the GPU engine times cuBLASLt's candidates for every shape and keeps the fastest
//! (`ops::gemm`). Timings vary between processes, so two runs of one command could pick
//! different algorithms where two candidates are close, which add in different orders, and the
//! runs would drift apart from the first step. With the store, the first run on a machine kind
//! tunes and records; every later one runs the recorded algorithms (and skips the tuning), so
//! two runs of one command give the same bits (`tools/device/repro_check.sh`). A checkpoint's
//! own record ([`GemmAlgorithms`], for `--resume`) takes precedence over the store.
//!
//! The file (default `~/.cache/hrm-cu/gemm-algorithms.json`, `HRM_CU_CACHE_DIR` or
//! `XDG_CACHE_HOME` move it; `train --gemm-algorithms` names another or turns it off):
//!
//! ```json
//! {"format": 1, "records": [{"device": "NVIDIA H200, cuBLASLt 130100",
//!   "choices": [{"op": "Forward", "t": 12288, "n": 6144, "k": 1536, "algorithm": 3}, ...]}]}
//! ```
//!
//! Entries are only ever added: a shape's first recorded algorithm stays, so every run that
//! reads the store agrees with the first. Writes re-read the file, merge, and replace it
//! atomically, so concurrent runs lose at most an addition, never the file.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::checkpoint::atomic::write_file_atomically;
use crate::checkpoint::GemmAlgorithms;
use crate::ops::gemm::GemmChoice;

const FORMAT: u32 = 1;
const FILE_NAME: &str = "gemm-algorithms.json";

#[derive(Debug, Default, PartialEq, Serialize, Deserialize)]
struct StoreFile {
    format: u32,
    records: Vec<GemmAlgorithms>,
}

/// The store's contents, read from `path`.
#[derive(Debug)]
pub struct GemmStore {
    path: PathBuf,
    records: Vec<GemmAlgorithms>,
}

/// Where the store lives by default: `$HRM_CU_CACHE_DIR`, else `$XDG_CACHE_HOME/hrm-cu`, else
/// `$HOME/.cache/hrm-cu`; `None` when none of them is set.
pub fn default_path() -> Option<PathBuf> {
    default_path_from(|name| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from))
}

fn default_path_from(var: impl Fn(&str) -> Option<PathBuf>) -> Option<PathBuf> {
    let dir = var("HRM_CU_CACHE_DIR")
        .or_else(|| var("XDG_CACHE_HOME").map(|d| d.join("hrm-cu")))
        .or_else(|| var("HOME").map(|d| d.join(".cache").join("hrm-cu")))?;
    Some(dir.join(FILE_NAME))
}

impl GemmStore {
    /// Reads the store at `path`; a missing file is an empty store.
    pub fn open(path: &Path) -> Result<GemmStore> {
        Ok(GemmStore { path: path.to_path_buf(), records: read(path)?.records })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The algorithms recorded on `device` (a GPU and cuBLASLt version, as engines name them).
    pub fn for_device(&self, device: &str) -> GemmAlgorithms {
        let choices = self.records.iter().find(|r| r.device == device).map(|r| r.choices.clone()).unwrap_or_default();
        GemmAlgorithms { device: device.to_string(), choices }
    }

    /// Adds the shapes of `used` that its device has no entry for yet (entries are never
    /// replaced); returns whether anything was added.
    pub fn add(&mut self, used: &GemmAlgorithms) -> bool {
        merge(&mut self.records, used)
    }

    /// Writes the store: the file as it is now (another run may have added to it), plus this
    /// store's entries, replaced atomically. Creates the directory.
    pub fn save(&self) -> Result<()> {
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let mut file = read(&self.path)?;
        for record in &self.records {
            merge(&mut file.records, record);
        }
        file.format = FORMAT;
        let text = serde_json::to_string_pretty(&file).expect("the store serialises");
        write_file_atomically(&self.path, text.as_bytes())
    }
}

fn read(path: &Path) -> Result<StoreFile> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(StoreFile { format: FORMAT, records: Vec::new() }),
        Err(e) => return Err(e).with_context(|| format!("reading the GEMM algorithm store {}", path.display())),
    };
    let file: StoreFile = serde_json::from_str(&text).with_context(|| {
        format!("{}: not a GEMM algorithm store (delete the file to start a new one, or pass --gemm-algorithms off)", path.display())
    })?;
    if file.format != FORMAT {
        bail!("{}: field `format` is {}, this hrm-cu reads {FORMAT} (delete the file to start a new one)", path.display(), file.format);
    }
    Ok(file)
}

/// Adds `used`'s shapes missing from the record of its device (creating the record); returns
/// whether anything was added. Choices stay sorted by (op, T, N, K).
fn merge(records: &mut Vec<GemmAlgorithms>, used: &GemmAlgorithms) -> bool {
    if used.choices.is_empty() {
        return false;
    }
    let at = match records.iter().position(|r| r.device == used.device) {
        Some(at) => at,
        None => {
            records.push(GemmAlgorithms { device: used.device.clone(), choices: Vec::new() });
            records.len() - 1
        }
    };
    let record = &mut records[at];
    let same_shape = |a: &GemmChoice, b: &GemmChoice| (a.op, a.t, a.n, a.k) == (b.op, b.t, b.n, b.k);
    let new: Vec<GemmChoice> = used.choices.iter().filter(|c| !record.choices.iter().any(|r| same_shape(r, c))).copied().collect();
    record.choices.extend(&new);
    record.choices.sort();
    !new.is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gemm::GemmOp;

    fn choice(n: usize, algorithm: usize) -> GemmChoice {
        GemmChoice { op: GemmOp::Forward, t: 64, n, k: 128, algorithm }
    }

    fn record(device: &str, choices: Vec<GemmChoice>) -> GemmAlgorithms {
        GemmAlgorithms { device: device.into(), choices }
    }

    #[test]
    fn a_missing_file_is_an_empty_store_and_a_saved_one_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache").join(FILE_NAME);
        let mut store = GemmStore::open(&path).unwrap();
        assert!(store.for_device("GPU A").choices.is_empty());
        assert!(store.add(&record("GPU A", vec![choice(256, 3), choice(128, 1)])));
        store.save().unwrap();
        let again = GemmStore::open(&path).unwrap();
        assert_eq!(again.for_device("GPU A"), record("GPU A", vec![choice(128, 1), choice(256, 3)]));
        assert!(again.for_device("GPU B").choices.is_empty());
    }

    #[test]
    fn recorded_shapes_keep_their_first_algorithm() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = GemmStore::open(&dir.path().join(FILE_NAME)).unwrap();
        assert!(store.add(&record("GPU A", vec![choice(256, 3)])));
        assert!(!store.add(&record("GPU A", vec![choice(256, 5)])), "a recorded shape was replaced");
        assert!(store.add(&record("GPU A", vec![choice(256, 5), choice(512, 0)])));
        assert!(store.add(&record("GPU B", vec![choice(256, 7)])));
        assert_eq!(store.for_device("GPU A").choices, vec![choice(256, 3), choice(512, 0)]);
        assert_eq!(store.for_device("GPU B").choices, vec![choice(256, 7)]);
        assert!(!store.add(&record("GPU C", vec![])));
    }

    #[test]
    fn saving_merges_with_what_another_run_wrote_meanwhile() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        let mut ours = GemmStore::open(&path).unwrap();
        let mut theirs = GemmStore::open(&path).unwrap();
        theirs.add(&record("GPU A", vec![choice(256, 2)]));
        theirs.save().unwrap();
        ours.add(&record("GPU A", vec![choice(256, 6), choice(512, 1)]));
        ours.save().unwrap();
        assert_eq!(GemmStore::open(&path).unwrap().for_device("GPU A").choices, vec![choice(256, 2), choice(512, 1)]);
    }

    #[test]
    fn a_damaged_file_is_an_error_that_names_it_and_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        std::fs::write(&path, "{\"format\": 1, \"records\": [").unwrap();
        let err = format!("{:#}", GemmStore::open(&path).unwrap_err());
        assert!(err.contains(&path.display().to_string()) && err.contains("--gemm-algorithms off"), "{err}");
        std::fs::write(&path, "{\"format\": 9, \"records\": []}").unwrap();
        let err = format!("{:#}", GemmStore::open(&path).unwrap_err());
        assert!(err.contains("`format` is 9"), "{err}");
    }

    #[test]
    fn a_store_that_cannot_be_written_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("cache");
        let mut store = GemmStore::open(&blocker.join(FILE_NAME)).unwrap();
        store.add(&record("GPU A", vec![choice(256, 3)]));
        std::fs::write(&blocker, "").unwrap(); // the store's directory is now a file
        let err = format!("{:#}", store.save().unwrap_err());
        assert!(err.contains(&blocker.display().to_string()), "{err}");
    }

    #[test]
    fn the_default_path_follows_the_environment() {
        fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<PathBuf> + 'a {
            move |name| vars.iter().find(|(k, _)| *k == name).map(|(_, v)| PathBuf::from(v))
        }
        let all = [("HRM_CU_CACHE_DIR", "/c"), ("XDG_CACHE_HOME", "/x"), ("HOME", "/h")];
        assert_eq!(default_path_from(env(&all)), Some(PathBuf::from("/c/gemm-algorithms.json")));
        assert_eq!(default_path_from(env(&all[1..])), Some(PathBuf::from("/x/hrm-cu/gemm-algorithms.json")));
        assert_eq!(default_path_from(env(&all[2..])), Some(PathBuf::from("/h/.cache/hrm-cu/gemm-algorithms.json")));
        assert_eq!(default_path_from(env(&[])), None);
    }
}
