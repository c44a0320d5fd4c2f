//! The fatbins `build.rs` compiled from `cuda/*.cu`, embedded in the binary.

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaModule};
use cudarc::nvrtc::Ptx;

use super::GpuError;

include!(concat!(env!("OUT_DIR"), "/kernels.rs"));

/// The names of every embedded kernel family.
pub fn families() -> impl Iterator<Item = &'static str> {
    FATBINS.iter().map(|(name, _)| *name)
}

/// Loads one family's fatbin into `ctx`; the driver picks the sm_90a or sm_80 image.
pub fn load_family(ctx: &Arc<CudaContext>, family: &str) -> Result<Arc<CudaModule>, GpuError> {
    let (_, fatbin) = FATBINS
        .iter()
        .find(|(name, _)| *name == family)
        .ok_or_else(|| GpuError::UnknownFamily { family: family.into() })?;
    ctx.load_module(Ptx::from_binary(fatbin.to_vec())).map_err(|source| GpuError::Load {
        family: family.into(),
        name: "<module>".into(),
        source,
    })
}
