//! Where a training step runs: the [`Engine`] trait, and its CPU implementation.
//!
//! The trainer (`src/train/mod.rs`) drives an engine step by step and never touches weights
//! or optimiser state directly, so the same loop trains on the CPU (fp32 reference, the CI
//! path) and on the GPU (bf16 compute copies, device-resident fp32 master, moments and EMA,
//! `src/train/gpu.rs`). Host copies are made only for checkpoints ([`Engine::snapshot`]).

use anyhow::{ensure, Result};
use rayon::prelude::*;

use crate::model::cpu::CpuBackend;
use crate::model::net::{Batch, Model, StepOutput};
use crate::model::params::Params;
use crate::model::schedule::Schedule;
use crate::ops::cross_entropy::StepMetrics;
use crate::optim::AdamAtan2;

pub trait Engine {
    /// One optimiser step on one packed batch: forward, backward through the passes of
    /// `schedule` that carry gradient, AdamATan2 at learning rate `lr`. The loss is the CE
    /// sum divided by `loss_divisor` (SPEC §5).
    fn train_step(&mut self, batch: &Batch, schedule: &Schedule, lr: f32, loss_divisor: f32) -> Result<StepOutput>;
    /// `sqrt(sum g^2)` over the gradients of the last `train_step` (synchronises; called at
    /// logging steps only).
    fn grad_norm(&mut self) -> Result<f64>;
    /// Forward only: the metrics of `batch` under the current weights.
    fn eval_batch(&mut self, batch: &Batch) -> Result<StepMetrics>;
    /// Host copies of the weights and the optimiser state (checkpoints, export).
    fn snapshot(&mut self) -> Result<(Params, AdamAtan2)>;
    /// Where it runs, for the log ("cpu", "NVIDIA H100 80GB HBM3").
    fn describe(&self) -> String;
}

/// A step whose loss is NaN or infinite. Engines return it before the optimiser update, so
/// the weights are still those that produced it and the trainer can checkpoint them.
#[derive(Debug, thiserror::Error)]
#[error("the loss is not finite (sum {loss_sum}); the weights before this step are kept")]
pub struct NonFiniteLoss {
    pub loss_sum: f64,
}

impl NonFiniteLoss {
    pub fn check(loss_sum: f64) -> Result<(), NonFiniteLoss> {
        if loss_sum.is_finite() {
            Ok(())
        } else {
            Err(NonFiniteLoss { loss_sum })
        }
    }
}

/// The fp32 CPU reference: master weights, gradients and optimiser state in host memory.
pub struct CpuEngine {
    model: Model<CpuBackend>,
    params: Params,
    optimizer: AdamAtan2,
    /// Master-shaped gradient buffer, zeroed before every step.
    grads: Vec<f32>,
}

impl CpuEngine {
    pub fn new(params: Params, optimizer: AdamAtan2) -> Result<CpuEngine> {
        ensure!(optimizer.m.len() == params.layout.master_len, "optimiser state does not match the model's layout");
        let model = Model::new(CpuBackend, params.config, &params.z_l_init)?;
        let grads = params.zeros_like_master();
        Ok(CpuEngine { model, params, optimizer, grads })
    }
}

impl Engine for CpuEngine {
    fn train_step(&mut self, batch: &Batch, schedule: &Schedule, lr: f32, loss_divisor: f32) -> Result<StepOutput> {
        self.grads.fill(0.0);
        let out = self.model.forward_backward(&self.params.master, batch, schedule, &mut self.grads, loss_divisor)?;
        NonFiniteLoss::check(out.metrics.loss_sum)?;
        let trainable = self.optimizer.steps.len();
        self.optimizer.step(&mut self.params, &self.grads, &out.tensors_with_grad[..trainable], lr);
        Ok(out)
    }

    fn grad_norm(&mut self) -> Result<f64> {
        Ok(self.grads.par_iter().map(|&g| g as f64 * g as f64).sum::<f64>().sqrt())
    }

    fn eval_batch(&mut self, batch: &Batch) -> Result<StepMetrics> {
        self.model.forward_loss(&self.params.master, batch)
    }

    fn snapshot(&mut self) -> Result<(Params, AdamAtan2)> {
        Ok((self.params.clone(), self.optimizer.clone()))
    }

    fn describe(&self) -> String {
        format!("cpu ({} threads, fp32)", rayon::current_num_threads())
    }
}
