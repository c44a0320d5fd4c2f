//! Model parameters: the flat fp32 master buffer described by [`ParamLayout`], and the
//! bf16 `z_L_init` buffer (SPEC §3, §6).

use half::bf16;

use crate::config::ModelConfig;
use crate::model::spec::{ParamLayout, Role, TensorSpec};
use crate::rng::Rng;

/// `fmod(x, 3)` of a standard normal scaled by this factor has unit variance (SPEC §6).
pub const TRUNC_NORMAL_SCALE: f64 = 1.014_762_601_732_121;

#[derive(Clone, Debug, PartialEq)]
pub struct Params {
    pub config: ModelConfig,
    pub layout: ParamLayout,
    /// Every trainable tensor, at the offsets of `layout`; padding is zero.
    pub master: Vec<f32>,
    /// `z_L_init` [hidden]; empty for `transformer`.
    pub z_l_init: Vec<bf16>,
}

/// SPEC §6: standard normal, `fmod(x, 3)`, times `1.014762601732121 * std`.
pub fn trunc_normal(rng: &mut Rng, std: f32) -> f32 {
    let x = rng.normal() % 3.0;
    (x * TRUNC_NORMAL_SCALE * std as f64) as f32
}

impl Params {
    /// Fresh weights drawn from `seed`: tensors in layout order, each element in row-major
    /// order, then `z_L_init`.
    pub fn init(config: ModelConfig, seed: u64) -> Params {
        let layout = ParamLayout::new(&config);
        let mut rng = Rng::new(seed);
        let mut master = vec![0.0f32; layout.master_len];
        let mut z_l_init = Vec::new();
        for t in &layout.tensors {
            match t.range() {
                Some(r) => master[r].iter_mut().for_each(|w| *w = trunc_normal(&mut rng, t.init_std)),
                None => z_l_init = (0..t.numel()).map(|_| bf16::from_f32(trunc_normal(&mut rng, t.init_std))).collect(),
            }
        }
        Params { config, layout, master, z_l_init }
    }

    /// All-zero parameters of the same layout (gradient buffers, optimiser moments).
    pub fn zeros_like_master(&self) -> Vec<f32> {
        vec![0.0; self.layout.master_len]
    }

    pub fn spec(&self, role: Role) -> &TensorSpec {
        self.layout.get(role).unwrap_or_else(|| panic!("{role:?} is not a tensor of the {:?} net", self.config.net.name()))
    }

    /// The master weights of one tensor, row-major with the spec's shape.
    pub fn tensor(&self, role: Role) -> &[f32] {
        &self.master[self.spec(role).range().expect("not a trainable tensor")]
    }

    pub fn tensor_mut(&mut self, role: Role) -> &mut [f32] {
        let r = self.spec(role).range().expect("not a trainable tensor");
        &mut self.master[r]
    }
}

/// Views one tensor of any master-shaped buffer (gradients, moments).
pub fn slice<'a>(layout: &ParamLayout, buf: &'a [f32], role: Role) -> &'a [f32] {
    &buf[layout.get(role).and_then(TensorSpec::range).expect("not a trainable tensor")]
}

pub fn slice_mut<'a>(layout: &ParamLayout, buf: &'a mut [f32], role: Role) -> &'a mut [f32] {
    &mut buf[layout.get(role).and_then(TensorSpec::range).expect("not a trainable tensor")]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{NetName, SizeName};

    #[test]
    fn init_follows_spec_std_and_truncation() {
        let cfg = ModelConfig::new(SizeName::Tiny, NetName::Hrm, 256);
        let p = Params::init(cfg, 1);
        let w = p.tensor(Role::Embedding);
        let std = (w.iter().map(|x| (*x as f64).powi(2)).sum::<f64>() / w.len() as f64).sqrt();
        let want = 1.0 / 16.0; // 1/sqrt(hidden = 256)
        assert!((std - want).abs() < 0.02 * want, "std {std}");
        let bound = 3.0 * TRUNC_NORMAL_SCALE as f32 * want as f32;
        assert!(w.iter().all(|x| x.abs() <= bound * 1.0001));
        assert_eq!(p.z_l_init.len(), 256);
        assert_eq!(Params::init(cfg, 1), p, "same seed, same weights");
    }
}
