//! The AdamATan2 optimiser state over the fp32 master buffer of [`Params`] (SPEC §7).
//!
//! `m`, `v` and `ema` are master-shaped buffers (same offsets as `Params::master`, padding
//! zero); `steps` has one count per trainable tensor, in `layout.trainable()` order, because
//! a tensor that received no gradient in a step is skipped and its bias corrections must use
//! its own count.

use crate::model::params::Params;
use crate::optim::adam_atan2::{adam_atan2_cpu, AdamCoeffs};

#[derive(Clone, Debug, PartialEq)]
pub struct AdamAtan2 {
    pub coeffs: AdamCoeffs,
    /// First moment [master_len].
    pub m: Vec<f32>,
    /// Second moment [master_len].
    pub v: Vec<f32>,
    /// Exponential moving average of the master weights [master_len].
    pub ema: Vec<f32>,
    /// Updates applied to each trainable tensor so far [n_trainable].
    pub steps: Vec<u32>,
}

impl AdamAtan2 {
    /// A fresh optimiser: zero moments, zero step counts, EMA = a copy of the weights.
    pub fn new(params: &Params, coeffs: AdamCoeffs) -> AdamAtan2 {
        AdamAtan2 {
            coeffs,
            m: params.zeros_like_master(),
            v: params.zeros_like_master(),
            ema: params.master.clone(),
            steps: vec![0; params.layout.trainable().count()],
        }
    }

    /// One optimiser step at learning rate `lr`. `grads` is master-shaped;
    /// `tensors_with_grad[i]` says whether the i-th trainable tensor received a gradient this
    /// step. A tensor without one is skipped entirely: no decay, no moments, no EMA, and its
    /// step count does not advance.
    pub fn step(&mut self, params: &mut Params, grads: &[f32], tensors_with_grad: &[bool], lr: f32) {
        let layout = &params.layout;
        assert_eq!(grads.len(), layout.master_len, "AdamAtan2::step: grads must be master-shaped");
        assert_eq!(tensors_with_grad.len(), self.steps.len(), "AdamAtan2::step: one flag per trainable tensor");
        assert_eq!(self.m.len(), layout.master_len, "AdamAtan2::step: optimiser state of another layout");
        for (i, t) in layout.trainable().enumerate() {
            if !tensors_with_grad[i] {
                continue;
            }
            self.steps[i] += 1;
            let r = t.range().expect("trainable tensors have offsets");
            let hyper = self.coeffs.at(lr, self.steps[i]);
            adam_atan2_cpu(
                &mut params.master[r.clone()],
                &mut self.m[r.clone()],
                &mut self.v[r.clone()],
                &mut self.ema[r.clone()],
                &grads[r.clone()],
                r.len(),
                &hyper,
            );
        }
    }

    /// The EMA weights as a model (evaluation and export use them, SPEC §7); `z_L_init` is
    /// never trained, so it is the model's own.
    pub fn ema_params(&self, params: &Params) -> Params {
        Params { master: self.ema.clone(), ..params.clone() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Dims, ModelConfig, NetName};
    use crate::rng::Rng;

    /// A two-block model small enough to step in a few milliseconds.
    fn small_params() -> Params {
        let dims = Dims { n_layers: 2, hidden: 128, heads: 1, head_dim: 128, intermediate: 256 };
        let config = ModelConfig { dims, net: NetName::Hrm.default_net(), vocab: 256 };
        Params::init(config, 3)
    }

    #[test]
    fn tensors_without_gradient_are_skipped_entirely() {
        let mut params = small_params();
        let coeffs = AdamCoeffs { beta1: 0.9, beta2: 0.95, weight_decay: 0.1, ema_decay: 0.9 };
        let mut opt = AdamAtan2::new(&params, coeffs);
        assert_eq!(opt.ema, params.master, "the EMA starts as a copy of the weights");
        let grads = Rng::new(5).uniform_vec(params.layout.master_len, 1.0);
        let n = opt.steps.len();
        // Step 1: everything but the embedding (tensor 0); step 2: everything.
        let mut flags = vec![true; n];
        flags[0] = false;
        let before = (params.clone(), opt.clone());
        opt.step(&mut params, &grads, &flags, 1e-2);

        let embed = params.layout.trainable().next().unwrap().range().unwrap();
        assert_eq!(params.master[embed.clone()], before.0.master[embed.clone()]);
        assert_eq!(opt.m[embed.clone()], before.1.m[embed.clone()]);
        assert_eq!(opt.v[embed.clone()], before.1.v[embed.clone()]);
        assert_eq!(opt.ema[embed.clone()], before.1.ema[embed.clone()]);
        let head = params.layout.trainable().last().unwrap().range().unwrap();
        assert_ne!(params.master[head.clone()], before.0.master[head.clone()]);
        assert_ne!(opt.ema[head.clone()], before.1.ema[head]);
        assert_eq!(opt.steps[0], 0);
        assert!(opt.steps[1..].iter().all(|&s| s == 1));

        opt.step(&mut params, &grads, &vec![true; n], 1e-2);
        assert_eq!(opt.steps[0], 1);
        assert!(opt.steps[1..].iter().all(|&s| s == 2));
        // The embedding's first update uses step 1 bias corrections: it matches a fresh
        // optimiser's first step on the same tensor.
        let mut p = before.0.master[embed.clone()].to_vec();
        let n = p.len();
        let (mut m, mut v, mut ema) = (vec![0.0; n], vec![0.0; n], p.clone());
        adam_atan2_cpu(&mut p, &mut m, &mut v, &mut ema, &grads[embed.clone()], n, &coeffs.at(1e-2, 1));
        assert_eq!(params.master[embed], p[..]);
        assert!(params.master.iter().all(|x| x.is_finite()));
    }
}
