//! The interchange format (SPEC §9): a Hugging Face-style directory with `config.json`,
//! `model.safetensors` and the tokenizer files.
//!
//! - [`export`] writes one from a checkpoint (the EMA weights by default, bf16 by default);
//! - [`import`] reads one (bf16 or fp32) into [`Params`], checking every tensor against the
//!   spec table;
//! - [`load_init`] is what `hrm-cu train --init DIR` calls: it accepts an interchange
//!   directory, a checkpoint or a run directory.

pub mod hf_config;

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use safetensors::tensor::Dtype;
use serde_json::Value;

use crate::checkpoint::tensors::{self, MappedFile, ModelDtypes, TensorData};
use crate::checkpoint::{self, atomic, load_weights, run_dir, TrainState, Weights};
use crate::model::params::Params;
use crate::model::spec::ParamLayout;
use hf_config::{TokenIds, DEFAULT_MAX_POSITIONS};

pub const CONFIG_FILE: &str = "config.json";
pub const MODEL_FILE: &str = "model.safetensors";
pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// Precision of the exported master tensors; `z_L_init` is bf16 either way.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportDtype {
    Bf16,
    F32,
}

/// What [`export`] did, and what it had to fill in with defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct ExportSummary {
    /// The tokenizer file copied into the export, if one was found.
    pub tokenizer: Option<PathBuf>,
    /// One line per value written from a documented default (for the user to check).
    pub notes: Vec<String>,
}

/// The parts of the dataset's `metadata.json` (SPEC §8) the export needs.
struct DatasetInfo {
    max_seq_len: Option<u64>,
    boq: Option<String>,
    eoa: Option<String>,
    tokenizer_path: Option<PathBuf>,
}

impl DatasetInfo {
    fn from_state(state: &TrainState) -> DatasetInfo {
        let meta = state.dataset_metadata.as_ref().unwrap_or(&Value::Null);
        let info = &meta["tokenizer_info"];
        let text = |v: &Value| v.as_str().map(str::to_string);
        // A relative tokenizer path is tried against the dataset directory, then as given.
        let tokenizer_path = text(&info["tokenizer_path"]).map(PathBuf::from).and_then(|p| {
            let candidates = [state.dataset_dir.as_ref().map(|d| d.join(&p)), Some(p)];
            candidates.into_iter().flatten().find(|c| c.exists())
        });
        DatasetInfo { max_seq_len: meta["max_seq_len"].as_u64(), boq: text(&info["boq"]), eoa: text(&info["eoa"]), tokenizer_path }
    }
}

/// The tokenizer file of `path`: the file itself, or `tokenizer.json` inside a directory.
fn tokenizer_file(path: &Path) -> Option<PathBuf> {
    if path.is_file() {
        Some(path.to_path_buf())
    } else {
        Some(path.join(TOKENIZER_FILE)).filter(|p| p.is_file())
    }
}

/// `pad_token_id` (the tokenizer's padding id, else 0), `bos_token_id` (the begin-of-question
/// token), `eos_token_id` (the end-of-answer token); unknown ids are `None` and noted.
fn token_ids(info: &DatasetInfo, tokenizer: Option<&Path>, notes: &mut Vec<String>) -> Result<TokenIds> {
    let Some(path) = tokenizer else {
        notes.push("no tokenizer file found (the dataset metadata's tokenizer_path is missing or names no tokenizer file): pad_token_id = 0, bos_token_id and eos_token_id = null".into());
        return Ok(TokenIds { pad: 0, bos: None, eos: None });
    };
    let tok = tokenizers::Tokenizer::from_file(path).map_err(|e| anyhow!("reading the tokenizer {}: {e}", path.display()))?;
    let pad = tok.get_padding().map_or(0, |p| p.pad_id);
    let mut lookup = |key: &str, token: &Option<String>| match token.as_deref().map(|t| (t, tok.token_to_id(t))) {
        Some((_, Some(id))) => Some(id),
        Some((t, None)) => {
            notes.push(format!("the tokenizer has no token {t:?} (tokenizer_info.{key}): written as null"));
            None
        }
        None => {
            notes.push(format!("the dataset metadata has no tokenizer_info.{key}: written as null"));
            None
        }
    };
    let bos = lookup("boq", &info.boq);
    let eos = lookup("eoa", &info.eoa);
    Ok(TokenIds { pad, bos, eos })
}

/// Exports the checkpoint at `checkpoint_dir` to `out_dir` (created if needed; existing
/// files of the same names are replaced): the EMA weights when `use_ema`, else the master
/// weights, as `dtype`. Token ids and `max_position_embeddings` come from the dataset
/// metadata recorded in the checkpoint; what is unknown is written from documented defaults
/// and listed in the summary's notes.
pub fn export(checkpoint_dir: &Path, out_dir: &Path, use_ema: bool, dtype: ExportDtype) -> Result<ExportSummary> {
    let which = if use_ema { Weights::Ema } else { Weights::Master };
    let (params, state) = load_weights(checkpoint_dir, which)?;
    let run = || -> Result<ExportSummary> {
        let info = DatasetInfo::from_state(&state);
        let tokenizer = info.tokenizer_path.as_deref().and_then(tokenizer_file);
        let mut notes = Vec::new();
        let tokens = token_ids(&info, tokenizer.as_deref(), &mut notes)?;
        let max_positions = match info.max_seq_len {
            Some(s) if s >= 1 => s - 1,
            _ => {
                notes.push(format!("the dataset's max_seq_len is unknown: max_position_embeddings = {DEFAULT_MAX_POSITIONS}"));
                DEFAULT_MAX_POSITIONS
            }
        };

        std::fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
        let config = hf_config::to_json(&params.config, &tokens, max_positions, dtype);
        let text = serde_json::to_string_pretty(&config).expect("a JSON value serialises");
        atomic::write_file_atomically(&out_dir.join(CONFIG_FILE), text.as_bytes())?;
        write_model(&out_dir.join(MODEL_FILE), &params, dtype)?;
        if let Some(src) = &tokenizer {
            let bytes = std::fs::read(src).with_context(|| format!("reading {}", src.display()))?;
            atomic::write_file_atomically(&out_dir.join(TOKENIZER_FILE), &bytes)?;
        }
        Ok(ExportSummary { tokenizer, notes })
    };
    run().with_context(|| format!("exporting {} to {}", checkpoint_dir.display(), out_dir.display()))
}

/// `model.safetensors` of the interchange format: every tensor by its SPEC §9 name, the
/// master tensors as `dtype` (bf16: rounded to nearest even), `z_L_init` as bf16.
fn write_model(path: &Path, params: &Params, dtype: ExportDtype) -> Result<()> {
    let mut named = checkpoint::model_tensors(&params.layout, &params.master, &params.z_l_init);
    if dtype == ExportDtype::Bf16 {
        for (name, t) in named.iter_mut().filter(|(_, t)| t.dtype == Dtype::F32) {
            let r = params.layout.by_name(name).and_then(|s| s.range()).expect("fp32 tensors are trainable");
            *t = TensorData::bf16_from_f32(&t.shape, &params.master[r]);
        }
    }
    // Hugging Face loaders require the `format` entry of the safetensors metadata.
    let metadata = [("format".to_string(), "pt".to_string())].into_iter().collect();
    let partial = path.with_extension("safetensors.partial");
    tensors::write(&partial, named, Some(metadata))?;
    std::fs::rename(&partial, path).with_context(|| format!("renaming {} to {}", partial.display(), path.display()))
}

/// Reads an interchange directory into `Params` (master weights in fp32, widened exactly
/// from bf16 when the file holds bf16). Every tensor the config's spec table lists must be
/// present with its shape, and no other.
pub fn import(dir: &Path) -> Result<Params> {
    import_inner(dir).with_context(|| format!("importing {}", dir.display()))
}

fn import_inner(dir: &Path) -> Result<Params> {
    let config_path = dir.join(CONFIG_FILE);
    let model_path = dir.join(MODEL_FILE);
    for p in [&config_path, &model_path] {
        if !p.is_file() {
            bail!("{} is missing; an interchange directory holds {CONFIG_FILE} and {MODEL_FILE} (SPEC §9)", p.display());
        }
    }
    let text = std::fs::read_to_string(&config_path).with_context(|| format!("reading {}", config_path.display()))?;
    let json: Value = serde_json::from_str(&text).with_context(|| format!("parsing {}", config_path.display()))?;
    let mapped = MappedFile::open(&model_path)?;
    let config = {
        let st = mapped.tensors()?;
        let names: Vec<&str> = st.names().into_iter().map(String::as_str).collect();
        hf_config::from_json(&json, &names).with_context(|| format!("reading the model config from {}", config_path.display()))?
    };
    let layout = ParamLayout::new(&config);
    let mut master = vec![0.0f32; layout.master_len];
    let dtypes = ModelDtypes { master: &[Dtype::F32, Dtype::BF16], z_l_init: &[Dtype::BF16, Dtype::F32] };
    let z_l_init = tensors::read_model(&mapped, &config, &layout, &dtypes, &mut master)
        .with_context(|| format!("{MODEL_FILE} does not match {CONFIG_FILE}"))?;
    Ok(Params { config, layout, master, z_l_init })
}

/// The starting weights of `hrm-cu train --init DIR`: the EMA weights of a checkpoint (or of
/// the checkpoint a run directory would resume from), or the weights of an interchange
/// directory. The SFT recipe (SPEC §7) starts from these with a fresh optimiser.
pub fn load_init(dir: &Path) -> Result<Params> {
    if checkpoint::is_checkpoint(dir) {
        return Ok(load_weights(dir, Weights::Ema)?.0);
    }
    if dir.join(run_dir::LATEST_FILE).is_file() {
        let Some(ckpt) = run_dir::find_resume(dir)? else {
            bail!("{} is a run directory without a complete checkpoint", dir.display());
        };
        return Ok(load_weights(&ckpt, Weights::Ema)?.0);
    }
    if dir.join(CONFIG_FILE).is_file() {
        return import(dir);
    }
    bail!(
        "{} is neither a checkpoint (manifest.json), a run directory (latest) nor an interchange model directory \
         ({CONFIG_FILE} + {MODEL_FILE})",
        dir.display()
    )
}
