//! Reading and writing safetensors files against the tensor spec table, with errors that
//! name the file, the tensor and what was expected. Shared by checkpoints and the
//! interchange format.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use half::bf16;
use memmap2::Mmap;
use safetensors::tensor::{Dtype, SafeTensors, TensorView, View};

use crate::config::{ModelConfig, NetName};
use crate::model::spec::ParamLayout;

/// One tensor to write: its little-endian bytes, borrowed from a buffer or owned.
pub struct TensorData<'a> {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: Cow<'a, [u8]>,
}

impl<'a> TensorData<'a> {
    pub fn f32(shape: &[usize], values: &'a [f32]) -> TensorData<'a> {
        TensorData { dtype: Dtype::F32, shape: shape.to_vec(), data: Cow::Borrowed(bytemuck::cast_slice(values)) }
    }

    pub fn bf16(shape: &[usize], values: &'a [bf16]) -> TensorData<'a> {
        TensorData { dtype: Dtype::BF16, shape: shape.to_vec(), data: Cow::Borrowed(bytemuck::cast_slice(values)) }
    }

    /// fp32 values rounded to bf16 (nearest even) into an owned buffer.
    pub fn bf16_from_f32(shape: &[usize], values: &[f32]) -> TensorData<'static> {
        let rounded: Vec<bf16> = values.iter().map(|&x| bf16::from_f32(x)).collect();
        TensorData { dtype: Dtype::BF16, shape: shape.to_vec(), data: Cow::Owned(bytemuck::cast_slice(&rounded).to_vec()) }
    }

    pub fn i64(shape: &[usize], values: &[i64]) -> TensorData<'static> {
        TensorData { dtype: Dtype::I64, shape: shape.to_vec(), data: Cow::Owned(bytemuck::cast_slice(values).to_vec()) }
    }
}

impl View for TensorData<'_> {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// Writes `tensors` to `path` as one safetensors file and flushes it to disk (fsync).
/// `metadata` is the file's free-form `__metadata__` header.
pub fn write(path: &Path, tensors: Vec<(String, TensorData<'_>)>, metadata: Option<HashMap<String, String>>) -> Result<()> {
    safetensors::serialize_to_file(tensors, &metadata, path).with_context(|| format!("writing {}", path.display()))?;
    File::open(path).and_then(|f| f.sync_all()).with_context(|| format!("flushing {} to disk", path.display()))
}

/// A safetensors file mapped into memory.
pub struct MappedFile {
    pub path: PathBuf,
    mmap: Mmap,
}

impl MappedFile {
    pub fn open(path: &Path) -> Result<MappedFile> {
        let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        // SAFETY: the mapping is read-only and lives as long as this struct; checkpoint and
        // model files are written once (into a temporary directory, then renamed) and never
        // modified in place, so the bytes cannot change under us.
        let mmap = unsafe { Mmap::map(&file) }.with_context(|| format!("mapping {}", path.display()))?;
        Ok(MappedFile { path: path.to_path_buf(), mmap })
    }

    /// The parsed header; the tensors borrow the mapping.
    pub fn tensors(&self) -> Result<SafeTensors<'_>> {
        SafeTensors::deserialize(&self.mmap)
            .with_context(|| format!("{} is not a valid safetensors file (truncated or corrupt?)", self.path.display()))
    }
}

/// Looks up tensor `name` and checks its dtype (one of `dtypes`) and shape.
pub fn expect_tensor<'a>(st: &SafeTensors<'a>, file: &Path, name: &str, shape: &[usize], dtypes: &[Dtype]) -> Result<TensorView<'a>> {
    let view = match st.tensor(name) {
        Ok(v) => v,
        Err(_) => bail!("{}: tensor `{name}` is missing", file.display()),
    };
    if !dtypes.contains(&view.dtype()) {
        bail!("{}: tensor `{name}` is {:?}, expected {}", file.display(), view.dtype(), dtype_list(dtypes));
    }
    if view.shape() != shape {
        bail!("{}: tensor `{name}` has shape {:?}, expected {shape:?}", file.display(), view.shape());
    }
    Ok(view)
}

fn dtype_list(dtypes: &[Dtype]) -> String {
    dtypes.iter().map(|d| format!("{d:?}")).collect::<Vec<_>>().join(" or ")
}

/// Copies an F32 or BF16 tensor into `dst` as fp32 (bf16 widens exactly).
pub fn copy_to_f32(view: &TensorView<'_>, dst: &mut [f32]) {
    let bytes = view.data();
    match view.dtype() {
        Dtype::F32 => bytemuck::cast_slice_mut::<f32, u8>(dst).copy_from_slice(bytes),
        Dtype::BF16 => {
            for (d, b) in dst.iter_mut().zip(bytes.chunks_exact(2)) {
                *d = bf16::from_le_bytes([b[0], b[1]]).to_f32();
            }
        }
        other => unreachable!("copy_to_f32 called on a {other:?} tensor; expect_tensor admits F32 and BF16 only"),
    }
}

/// A BF16 tensor as bf16 values, or an F32 one rounded to nearest even.
pub fn to_bf16(view: &TensorView<'_>) -> Vec<bf16> {
    let bytes = view.data();
    match view.dtype() {
        Dtype::BF16 => bytes.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]])).collect(),
        Dtype::F32 => bytes.chunks_exact(4).map(|b| bf16::from_f32(f32::from_le_bytes([b[0], b[1], b[2], b[3]]))).collect(),
        other => unreachable!("to_bf16 called on a {other:?} tensor; expect_tensor admits F32 and BF16 only"),
    }
}

/// One line describing a model config, for error messages.
pub fn describe(cfg: &ModelConfig) -> String {
    let d = &cfg.dims;
    format!(
        "net {}, {} layers, hidden {}, {} heads of {}, intermediate {}, vocab {}",
        net_name(cfg.net.name()),
        d.n_layers,
        d.hidden,
        d.heads,
        d.head_dim,
        d.intermediate,
        cfg.vocab
    )
}

/// The name a net has on the command line and in `config.json` (`"hrm"`, `"trm_match_recurrence"`).
pub fn net_name(net: NetName) -> String {
    match serde_json::to_value(net) {
        Ok(serde_json::Value::String(s)) => s,
        _ => unreachable!("NetName serialises as a string"),
    }
}

/// The accepted storage precisions of a model file's tensors.
pub struct ModelDtypes<'a> {
    /// For trainable (master) tensors.
    pub master: &'a [Dtype],
    /// For `z_L_init`.
    pub z_l_init: &'a [Dtype],
}

/// Reads every tensor of `layout` from a model file by interchange name: the trainable ones
/// into the master-shaped `master` (fp32), `z_L_init` returned as bf16 (empty when the net
/// has none). Every spec tensor must be present with its shape; any other tensor is an error.
pub fn read_model(file: &MappedFile, cfg: &ModelConfig, layout: &ParamLayout, dtypes: &ModelDtypes<'_>, master: &mut [f32]) -> Result<Vec<bf16>> {
    let st = file.tensors()?;
    let path = file.path.as_path();
    let hint = || format!("expected a model with {}", describe(cfg));
    let mut z_l_init = Vec::new();
    for spec in &layout.tensors {
        // The spec table's only tensor outside the master buffer is z_L_init.
        match spec.range() {
            Some(r) => {
                let view = expect_tensor(&st, path, &spec.name, &spec.shape, dtypes.master).with_context(hint)?;
                copy_to_f32(&view, &mut master[r]);
            }
            None => {
                let view = expect_tensor(&st, path, &spec.name, &spec.shape, dtypes.z_l_init).with_context(hint)?;
                z_l_init = to_bf16(&view);
            }
        }
    }
    let mut names = st.names();
    names.sort();
    if let Some(extra) = names.into_iter().find(|n| layout.by_name(n).is_none()) {
        bail!("{}: unexpected tensor `{extra}`: not part of a model with {}", path.display(), describe(cfg));
    }
    Ok(z_l_init)
}
