//! Checkpoints: everything a run needs to resume bit for bit, written atomically and
//! verified on load.
//!
//! A checkpoint is a directory:
//!
//! ```text
//! model.safetensors      master weights (fp32) by interchange name + model.z_L_init (bf16)
//! ema.safetensors        the EMA of the master weights, same names and dtypes
//! optimizer.safetensors  per trainable tensor: `<name>.m`, `<name>.v` (fp32, its shape)
//!                        and `<name>.step` (i64 [1], the tensor's own update count)
//! train_state.json       TrainState: step, data position, tokens seen, RNG, configs, dataset
//!                        metadata, the GPU run's GEMM algorithms
//! manifest.json          size and sha256 of the four files above, written last
//! ```
//!
//! [`save`] writes into a temporary directory beside the target and renames it into place
//! ([`atomic`]); [`load`] checks the manifest (every file present, of its size and hash), the
//! model config, and every tensor's name, shape and dtype against the spec table.
//! [`run_dir`] keeps the last N checkpoints of a run and finds the one to resume from.

pub mod atomic;
pub mod manifest;
pub mod run_dir;
pub mod tensors;

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use half::bf16;
use safetensors::tensor::Dtype;
use serde::{Deserialize, Serialize};

use crate::config::{ModelConfig, TrainConfig};
use crate::model::params::Params;
use crate::model::spec::ParamLayout;
use crate::ops::gemm::GemmChoice;
use crate::optim::{AdamAtan2, AdamCoeffs};
use crate::rng::Rng;
use manifest::{Manifest, MANIFEST_FILE};
use tensors::{describe, expect_tensor, MappedFile, ModelDtypes, TensorData};

pub use run_dir::{find_resume, save_in_run};

pub const MODEL_FILE: &str = "model.safetensors";
pub const EMA_FILE: &str = "ema.safetensors";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const STATE_FILE: &str = "train_state.json";
const DATA_FILES: [&str; 4] = [MODEL_FILE, EMA_FILE, OPTIMIZER_FILE, STATE_FILE];

/// Master tensors are fp32 in a checkpoint and `z_L_init` bf16, nothing else.
const CHECKPOINT_DTYPES: ModelDtypes<'static> = ModelDtypes { master: &[Dtype::F32], z_l_init: &[Dtype::BF16] };

/// Where the data loader is: the next step to run is `step` (0-based) of epoch `epoch`.
pub use crate::data::loader::DataPosition;

/// The scalar state of a run, saved as `train_state.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimiser steps taken so far (the next one is `global_step + 1`, SPEC §7).
    pub global_step: u64,
    pub data_position: DataPosition,
    pub tokens_seen: u64,
    pub rng: Rng,
    pub model_config: ModelConfig,
    pub train_config: TrainConfig,
    /// The dataset's `metadata.json`, verbatim, when known (export reads its
    /// `tokenizer_info` and `max_seq_len`).
    pub dataset_metadata: Option<serde_json::Value>,
    /// The dataset directory, against which a relative `tokenizer_path` is resolved.
    pub dataset_dir: Option<PathBuf>,
    /// The `hrm-cu` version that wrote the checkpoint.
    pub hrm_cu_version: String,
    /// The cuBLASLt algorithm of every product the GPU engine ran (empty on the CPU, and in
    /// checkpoints written before it was recorded).
    #[serde(default)]
    pub gemm_algorithms: GemmAlgorithms,
}

/// The GPU engine times cuBLASLt's candidate algorithms when it starts and keeps the fastest
/// (`ops::gemm`), so two processes may pick different ones, which add in different orders.
/// `--resume` on the same GPU kind and library runs the recorded ones, so the resumed run
/// continues bit for bit.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct GemmAlgorithms {
    /// The GPU and library they were chosen on, e.g. "NVIDIA H200, cuBLASLt 130000".
    pub device: String,
    pub choices: Vec<GemmChoice>,
}

impl TrainState {
    /// The state before the first step of a run: RNG seeded from `train_config.seed`, no
    /// dataset recorded.
    pub fn new(model_config: ModelConfig, train_config: TrainConfig) -> TrainState {
        TrainState {
            global_step: 0,
            data_position: DataPosition::default(),
            tokens_seen: 0,
            rng: Rng::new(train_config.seed),
            model_config,
            train_config,
            dataset_metadata: None,
            dataset_dir: None,
            hrm_cu_version: env!("CARGO_PKG_VERSION").to_string(),
            gemm_algorithms: GemmAlgorithms::default(),
        }
    }
}

/// Everything a checkpoint holds.
#[derive(Clone, Debug, PartialEq)]
pub struct Checkpoint {
    pub params: Params,
    pub optimizer: AdamAtan2,
    pub state: TrainState,
}

/// Which weights of a checkpoint [`load_weights`] returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Weights {
    Master,
    Ema,
}

/// True when `dir` looks like a checkpoint (it has a manifest).
pub fn is_checkpoint(dir: &Path) -> bool {
    dir.join(MANIFEST_FILE).is_file()
}

/// Saves a checkpoint to `dir` atomically, replacing an older checkpoint of the same name (a
/// non-empty directory that is not a checkpoint is refused); a crash at any point leaves the
/// previous checkpoint loadable.
pub fn save(dir: &Path, params: &Params, optimizer: &AdamAtan2, state: &TrainState) -> Result<()> {
    ensure!(state.model_config == params.config, "save: the train state's model config differs from the parameters'");
    ensure!(
        optimizer.m.len() == params.master.len() && optimizer.steps.len() == params.layout.trainable().count(),
        "save: the optimiser state does not match the parameter layout"
    );
    // Replacing moves the old directory aside and deletes it: never do that to a directory
    // that is not a checkpoint (a mistyped --out).
    let occupied = dir.exists() && (!dir.is_dir() || std::fs::read_dir(dir).map_or(true, |mut entries| entries.next().is_some()));
    if occupied && !is_checkpoint(dir) {
        bail!("{} exists and is not an hrm-cu checkpoint; refusing to replace it (choose another directory or remove it)", dir.display());
    }
    atomic::write_dir_atomically(dir, |tmp| {
        let layout = &params.layout;
        tensors::write(&tmp.join(MODEL_FILE), model_tensors(layout, &params.master, &params.z_l_init), None)?;
        tensors::write(&tmp.join(EMA_FILE), model_tensors(layout, &optimizer.ema, &params.z_l_init), None)?;
        tensors::write(&tmp.join(OPTIMIZER_FILE), optimizer_tensors(layout, optimizer), None)?;
        let json = serde_json::to_string_pretty(state).context("serialising the train state")?;
        atomic::write_file_synced(&tmp.join(STATE_FILE), json.as_bytes())?;
        let manifest = Manifest::build(tmp, &DATA_FILES)?;
        let json = serde_json::to_string_pretty(&manifest).context("serialising the manifest")?;
        atomic::write_file_synced(&tmp.join(MANIFEST_FILE), json.as_bytes())
    })
    .with_context(|| format!("saving checkpoint {}", dir.display()))
}

/// Loads and verifies the checkpoint at `dir`. With `expected`, the checkpoint's model
/// config must equal it (a run resumed with other `--size`/`--net` flags is refused).
pub fn load(dir: &Path, expected: Option<&ModelConfig>) -> Result<Checkpoint> {
    load_inner(dir, expected).with_context(|| format!("loading checkpoint {}", dir.display()))
}

fn load_inner(dir: &Path, expected: Option<&ModelConfig>) -> Result<Checkpoint> {
    let (_, state) = open_verified(dir, &[MODEL_FILE, EMA_FILE, OPTIMIZER_FILE])?;
    if let Some(want) = expected {
        if *want != state.model_config {
            bail!(
                "{} holds a model with {}, but the run asks for {}; pass the matching --size/--net, or start \
                 from these weights with --init instead of resuming",
                dir.join(STATE_FILE).display(),
                describe(&state.model_config),
                describe(want)
            );
        }
    }
    let params = read_params(dir, MODEL_FILE, &state.model_config)?;
    let ema = read_params(dir, EMA_FILE, &state.model_config)?;
    ensure!(
        ema.z_l_init == params.z_l_init,
        "{}: model.z_L_init differs from the one in {MODEL_FILE} (it is never trained); the checkpoint is damaged",
        dir.join(EMA_FILE).display()
    );
    let coeffs = AdamCoeffs::from_config(&state.train_config);
    let optimizer = read_optimizer(&dir.join(OPTIMIZER_FILE), &params, ema.master, coeffs)?;
    Ok(Checkpoint { params, optimizer, state })
}

/// Loads one set of weights (the master or the EMA) and the train state, verifying only
/// the files it reads. Evaluation, export and `--init` use the EMA weights (SPEC §7).
pub fn load_weights(dir: &Path, which: Weights) -> Result<(Params, TrainState)> {
    let file = match which {
        Weights::Master => MODEL_FILE,
        Weights::Ema => EMA_FILE,
    };
    let run = || -> Result<(Params, TrainState)> {
        let (_, state) = open_verified(dir, &[file])?;
        Ok((read_params(dir, file, &state.model_config)?, state))
    };
    run().with_context(|| format!("loading the {which:?} weights of checkpoint {}", dir.display()))
}

/// Verifies the manifest entries of `files` and the train state, and parses the latter.
fn open_verified(dir: &Path, files: &[&str]) -> Result<(Manifest, TrainState)> {
    atomic::recover_interrupted(dir)?;
    if !dir.is_dir() {
        bail!("{} does not exist or is not a directory", dir.display());
    }
    let manifest = Manifest::read(dir)?;
    let mut names = files.to_vec();
    names.push(STATE_FILE);
    manifest.verify(dir, &names)?;
    let path = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let state: TrainState = serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    Ok((manifest, state))
}

/// Reads a model file of the checkpoint into fresh `Params` of `config`.
fn read_params(dir: &Path, file: &str, config: &ModelConfig) -> Result<Params> {
    let layout = ParamLayout::new(config);
    let mut master = vec![0.0f32; layout.master_len];
    let mapped = MappedFile::open(&dir.join(file))?;
    let z_l_init = tensors::read_model(&mapped, config, &layout, &CHECKPOINT_DTYPES, &mut master).with_context(|| {
        format!("{file} does not match the model recorded in {STATE_FILE}: the checkpoint was damaged or edited; resume from an earlier checkpoint")
    })?;
    Ok(Params { config: *config, layout, master, z_l_init })
}

/// Every tensor of a model in the interchange naming: the trainable ones from the
/// master-shaped `master` (fp32), then `z_L_init` (bf16).
pub fn model_tensors<'a>(layout: &ParamLayout, master: &'a [f32], z_l_init: &'a [bf16]) -> Vec<(String, TensorData<'a>)> {
    layout
        .tensors
        .iter()
        .map(|t| match t.range() {
            Some(r) => (t.name.clone(), TensorData::f32(&t.shape, &master[r])),
            None => (t.name.clone(), TensorData::bf16(&t.shape, z_l_init)),
        })
        .collect()
}

fn optimizer_tensors<'a>(layout: &ParamLayout, opt: &'a AdamAtan2) -> Vec<(String, TensorData<'a>)> {
    let mut out = Vec::new();
    for (t, &step) in layout.trainable().zip(&opt.steps) {
        let r = t.range().expect("trainable tensors have offsets");
        out.push((format!("{}.m", t.name), TensorData::f32(&t.shape, &opt.m[r.clone()])));
        out.push((format!("{}.v", t.name), TensorData::f32(&t.shape, &opt.v[r])));
        out.push((format!("{}.step", t.name), TensorData::i64(&[1], &[step as i64])));
    }
    out
}

fn read_optimizer(path: &Path, params: &Params, ema: Vec<f32>, coeffs: AdamCoeffs) -> Result<AdamAtan2> {
    let mapped = MappedFile::open(path)?;
    let st = mapped.tensors()?;
    let mut opt = AdamAtan2 { coeffs, m: params.zeros_like_master(), v: params.zeros_like_master(), ema, steps: Vec::new() };
    let hint = || format!("expected the optimiser state of a model with {}", describe(&params.config));
    let mut expected_names = std::collections::HashSet::new();
    for t in params.layout.trainable() {
        let r = t.range().expect("trainable tensors have offsets");
        let m = expect_tensor(&st, path, &format!("{}.m", t.name), &t.shape, &[Dtype::F32]).with_context(hint)?;
        tensors::copy_to_f32(&m, &mut opt.m[r.clone()]);
        let v = expect_tensor(&st, path, &format!("{}.v", t.name), &t.shape, &[Dtype::F32]).with_context(hint)?;
        tensors::copy_to_f32(&v, &mut opt.v[r]);
        let step = expect_tensor(&st, path, &format!("{}.step", t.name), &[1], &[Dtype::I64]).with_context(hint)?;
        let count = i64::from_le_bytes(step.data().try_into().expect("an i64 [1] tensor holds 8 bytes"));
        let count = u32::try_from(count).with_context(|| format!("{}: `{}.step` = {count} is not a step count", path.display(), t.name))?;
        opt.steps.push(count);
        expected_names.extend(["m", "v", "step"].map(|s| format!("{}.{s}", t.name)));
    }
    let mut names = st.names();
    names.sort();
    if let Some(extra) = names.into_iter().find(|n| !expected_names.contains(*n)) {
        bail!("{}: unexpected tensor `{extra}`; {}", path.display(), hint());
    }
    Ok(opt)
}
