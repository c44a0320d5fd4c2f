//! `manifest.json`: the size and sha256 of every file of a checkpoint, written last, so a
//! directory with a manifest is complete and a file that changed since is detected.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::path::Path;

use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub const MANIFEST_FILE: &str = "manifest.json";
const FORMAT: &str = "hrm-cu checkpoint";
const VERSION: u32 = 1;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FileEntry {
    pub size: u64,
    pub sha256: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    /// File name (relative to the checkpoint directory) -> entry.
    pub files: BTreeMap<String, FileEntry>,
}

/// Lower-case hex sha256 of a file, streamed in 8 MiB reads.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 8 << 20];
    loop {
        let n = file.read(&mut buf).with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

impl Manifest {
    /// Sizes and hashes of `names` inside `dir` (hashed in parallel).
    pub fn build(dir: &Path, names: &[&str]) -> Result<Manifest> {
        let entries: Vec<(String, FileEntry)> = names
            .par_iter()
            .map(|name| {
                let path = dir.join(name);
                let size = std::fs::metadata(&path).with_context(|| format!("reading the size of {}", path.display()))?.len();
                Ok((name.to_string(), FileEntry { size, sha256: sha256_file(&path)? }))
            })
            .collect::<Result<_>>()?;
        Ok(Manifest { format: FORMAT.into(), version: VERSION, files: entries.into_iter().collect() })
    }

    /// Reads `dir/manifest.json`. A missing manifest means the directory is not a complete
    /// checkpoint.
    pub fn read(dir: &Path) -> Result<Manifest> {
        let path = dir.join(MANIFEST_FILE);
        if !path.is_file() {
            bail!(
                "{} is not a complete checkpoint: {MANIFEST_FILE} is missing (it is written last, so the save was \
                 interrupted or this is not an hrm-cu checkpoint directory); resume from an earlier checkpoint",
                dir.display()
            );
        }
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let manifest: Manifest = serde_json::from_str(&text)
            .with_context(|| format!("{} is corrupt; the checkpoint cannot be verified, resume from an earlier one", path.display()))?;
        if manifest.format != FORMAT || manifest.version != VERSION {
            bail!(
                "{}: format `{}` version {}, this hrm-cu reads `{FORMAT}` version {VERSION}",
                path.display(),
                manifest.format,
                manifest.version
            );
        }
        Ok(manifest)
    }

    /// Checks that each of `names` is listed, exists, has the recorded size and hash (files
    /// are hashed in parallel).
    pub fn verify(&self, dir: &Path, names: &[&str]) -> Result<()> {
        names.par_iter().map(|name| self.verify_one(dir, name)).collect::<Result<Vec<()>>>()?;
        Ok(())
    }

    fn verify_one(&self, dir: &Path, name: &str) -> Result<()> {
        let path = dir.join(name);
        let fix = "the checkpoint is damaged; resume from an earlier checkpoint";
        let Some(entry) = self.files.get(name) else {
            bail!("{}: {MANIFEST_FILE} does not list {name}; {fix}", dir.display());
        };
        let Ok(meta) = std::fs::metadata(&path) else {
            bail!("{} is missing; {fix}", path.display());
        };
        if meta.len() < entry.size {
            bail!("{} is truncated: {} bytes, {MANIFEST_FILE} says {}; {fix}", path.display(), meta.len(), entry.size);
        }
        if meta.len() != entry.size {
            bail!("{} has {} bytes, {MANIFEST_FILE} says {}; {fix}", path.display(), meta.len(), entry.size);
        }
        let sha = sha256_file(&path)?;
        if sha != entry.sha256 {
            bail!("{} fails its checksum (sha256 {sha}, {MANIFEST_FILE} says {}); {fix}", path.display(), entry.sha256);
        }
        Ok(())
    }
}
