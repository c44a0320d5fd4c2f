//! Where a training step runs: the [`Engine`] trait, and its CPU implementation.
//!
//! The trainer (`src/train/mod.rs`) drives an engine step by step and never touches weights
//! or optimiser state directly, so the same loop trains on the CPU (fp32 reference, the CI
//! path) and on the GPU (bf16 compute copies, device-resident fp32 master, moments and EMA,
//! `src/train/gpu.rs`). Host copies are made only for checkpoints ([`Engine::snapshot`]), and
//! the metrics reach the host only when the trainer asks ([`Engine::read_metrics`]), so a GPU
//! step needs no host synchronisation.

use anyhow::{ensure, Result};
use rayon::prelude::*;

use crate::model::cpu::CpuBackend;
use crate::model::net::{Batch, Model};
use crate::model::params::Params;
use crate::model::schedule::Schedule;
use crate::ops::cross_entropy::StepMetrics;
use crate::optim::adam_atan2::LossGuard;
use crate::optim::AdamAtan2;

pub trait Engine {
    /// Queues one optimiser step on one packed batch: forward, backward through the passes of
    /// `schedule` that carry gradient, AdamATan2 at learning rate `lr`. The loss is the CE
    /// sum divided by `loss_divisor` (SPEC §5). Returns without waiting for the device: the
    /// step's metrics stay there until [`Engine::read_metrics`]. A step whose loss is not
    /// finite makes the engine skip its update and every update after it (see
    /// [`NonFiniteLoss`]).
    fn train_step(&mut self, batch: &Batch, schedule: &Schedule, lr: f32, loss_divisor: f32) -> Result<()>;
    /// The metrics of the last `train_step` (synchronises: the trainer calls it at logging
    /// steps and before evaluating or checkpointing). Fails with [`NonFiniteLoss`] when a
    /// step since the previous call had a non-finite loss.
    fn read_metrics(&mut self) -> Result<StepMetrics>;
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

/// A step whose loss was NaN or infinite, found by [`Engine::read_metrics`]. The engines check
/// each step's loss before its update and skip that update and every later one (the loss
/// guard, [`LossGuard`]), so the weights and optimiser state are still those that produced
/// it; the trainer checkpoints them. `steps_before` is the number of `train_step`s with a
/// finite loss between the previous `read_metrics` and that step.
#[derive(Debug, thiserror::Error)]
#[error("a step's loss was not finite (NaN or infinite); its update and every later one were skipped, so the weights are those before it")]
pub struct NonFiniteLoss {
    pub steps_before: u32,
}

impl NonFiniteLoss {
    /// The error for `guard`, if it stopped the updates.
    pub fn check(guard: LossGuard) -> Result<(), NonFiniteLoss> {
        match guard.skip {
            true => Err(NonFiniteLoss { steps_before: guard.finite_steps }),
            false => Ok(()),
        }
    }
}

/// The fp32 CPU reference: master weights, gradients and optimiser state in host memory. It
/// computes every step at once but follows the GPU engine's contract: the loss guard, metrics
/// returned only by `read_metrics`.
pub struct CpuEngine {
    model: Model<CpuBackend>,
    params: Params,
    optimizer: AdamAtan2,
    /// Master-shaped gradient buffer, zeroed before every step.
    grads: Vec<f32>,
    /// The last step's metric sums.
    metrics: StepMetrics,
    guard: LossGuard,
}

impl CpuEngine {
    pub fn new(params: Params, optimizer: AdamAtan2) -> Result<CpuEngine> {
        ensure!(optimizer.m.len() == params.layout.master_len, "optimiser state does not match the model's layout");
        let model = Model::new(CpuBackend, params.config, &params.z_l_init)?;
        let grads = params.zeros_like_master();
        Ok(CpuEngine { model, params, optimizer, grads, metrics: StepMetrics::default(), guard: LossGuard::default() })
    }
}

impl Engine for CpuEngine {
    fn train_step(&mut self, batch: &Batch, schedule: &Schedule, lr: f32, loss_divisor: f32) -> Result<()> {
        if self.guard.skip {
            return Ok(()); // every update is skipped until the trainer reads the metrics
        }
        self.grads.fill(0.0);
        self.model.stage_step(batch, schedule, loss_divisor)?;
        self.model.enqueue_step(&self.params.master, schedule, &mut self.grads, &mut self.metrics)?;
        self.guard.observe(self.metrics.loss_sum);
        if !self.guard.skip {
            let trainable = self.optimizer.steps.len();
            let with_grad = self.model.tensors_with_grad(schedule);
            self.optimizer.step(&mut self.params, &self.grads, &with_grad[..trainable], lr);
        }
        Ok(())
    }

    fn read_metrics(&mut self) -> Result<StepMetrics> {
        NonFiniteLoss::check(self.guard)?;
        self.guard.finite_steps = 0;
        Ok(self.metrics)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ModelConfig, NetName, SizeName, TrainConfig};
    use crate::optim::AdamCoeffs;
    use crate::rng::Rng;
    use crate::train::gpu::PackedSamples;

    const LR: f32 = 1e-3;

    /// A tiny transformer on the CPU and four small batches.
    fn engine() -> (CpuEngine, Vec<PackedSamples>, Schedule) {
        let config = ModelConfig::new(SizeName::Tiny, NetName::Transformer, 256);
        let params = Params::init(config, 1);
        let optimizer = AdamAtan2::new(&params, AdamCoeffs::from_config(&TrainConfig::default()));
        let mut rng = Rng::new(2);
        let batches = (0..4).map(|_| PackedSamples::random(&mut rng, 64, 256, 4..20, (0.2, 0.8)).unwrap()).collect();
        (CpuEngine::new(params, optimizer).unwrap(), batches, Schedule::for_training(&config.net, 0))
    }

    fn step(engine: &mut CpuEngine, b: &PackedSamples, schedule: &Schedule, lr: f32) {
        engine.train_step(&b.batch(), schedule, lr, b.valid_labels() as f32).unwrap();
    }

    #[test]
    fn metrics_read_late_are_the_last_steps() {
        let (mut every, batches, schedule) = engine();
        let (mut late, _, _) = engine();
        let mut last = StepMetrics::default();
        for b in &batches {
            step(&mut every, b, &schedule, LR);
            last = every.read_metrics().unwrap();
            step(&mut late, b, &schedule, LR);
        }
        assert!(last.valid_tokens > 0);
        assert_eq!(late.read_metrics().unwrap(), last, "one read after four steps gives the fourth step's metrics");
        assert_eq!(late.snapshot().unwrap().0.master, every.snapshot().unwrap().0.master, "reading does not change the steps");
    }

    #[test]
    fn a_non_finite_loss_stops_every_later_update() {
        let (mut engine, batches, schedule) = engine();
        step(&mut engine, &batches[0], &schedule, LR);
        engine.read_metrics().unwrap();
        // Step 2's own loss is finite, but its update (NaN rate) makes step 3's loss NaN.
        step(&mut engine, &batches[1], &schedule, f32::NAN);
        let (_, after_2) = engine.snapshot().unwrap();
        step(&mut engine, &batches[2], &schedule, LR);
        step(&mut engine, &batches[3], &schedule, LR);
        let err = engine.read_metrics().unwrap_err();
        assert_eq!(err.downcast_ref::<NonFiniteLoss>().expect("a NonFiniteLoss").steps_before, 1, "one finite step (2) since the read, then 3's NaN");
        assert_eq!(engine.snapshot().unwrap().1.steps, after_2.steps, "steps 3 and 4 updated nothing");
        assert!(engine.read_metrics().is_err(), "the guard stays set");
    }
}
