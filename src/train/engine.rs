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

use crate::checkpoint::GemmAlgorithms;
use crate::model::backend::Backend;
use crate::model::cpu::CpuBackend;
use crate::model::net::{Batch, GradStart, Model};
use crate::model::params::Params;
use crate::model::schedule::Schedule;
use crate::ops::cross_entropy::StepMetrics;
use crate::optim::adam_atan2::LossGuard;
use crate::optim::AdamAtan2;

pub trait Engine {
    /// Queues one optimiser step on the packed micro-batches of a step (gradient
    /// accumulation, `--micro-batches K`; one for a plain step): for each in order, forward
    /// and backward through the passes of `schedule` that carry gradient, its CE sum divided
    /// by `loss_divisor` (SPEC §5), the gradients summed; then one AdamATan2 update at
    /// learning rate `lr`. Returns without waiting for the device: the step's metrics (sums
    /// over its micro-batches) stay there until [`Engine::read_metrics`]. A step whose loss
    /// is not finite makes the engine skip its update and every update after it (see
    /// [`NonFiniteLoss`]).
    fn train_micro_batches(&mut self, micro_batches: &[Batch], schedule: &Schedule, lr: f32, loss_divisor: f32) -> Result<()>;
    /// One optimiser step on one packed batch ([`Engine::train_micro_batches`] with one).
    fn train_step(&mut self, batch: &Batch, schedule: &Schedule, lr: f32, loss_divisor: f32) -> Result<()> {
        self.train_micro_batches(std::slice::from_ref(batch), schedule, lr, loss_divisor)
    }
    /// The metrics of the last step (synchronises: the trainer calls it at logging
    /// steps and before evaluating or checkpointing). Fails with [`NonFiniteLoss`] when a
    /// step since the previous call had a non-finite loss.
    fn read_metrics(&mut self) -> Result<StepMetrics>;
    /// `sqrt(sum g^2)` over the gradients of the last step (synchronises; called at
    /// logging steps only).
    fn grad_norm(&mut self) -> Result<f64>;
    /// Forward only: the metrics of `batch` under the current weights.
    fn eval_batch(&mut self, batch: &Batch) -> Result<StepMetrics>;
    /// Host copies of the weights and the optimiser state (checkpoints, export).
    fn snapshot(&mut self) -> Result<(Params, AdamAtan2)>;
    /// Where it runs, for the log ("cpu", "NVIDIA H100 80GB HBM3").
    fn describe(&self) -> String;
    /// The cuBLASLt algorithms its products run, for checkpoints (none on the CPU).
    fn gemm_algorithms(&self) -> GemmAlgorithms {
        GemmAlgorithms::default()
    }
    /// Runs `recorded`'s algorithms from now on (before the first step: graphs capture
    /// them), each shape's when it is first met and instead of tuning it. Returns why it
    /// could not: recorded on another GPU or library. (An index this GPU's heuristic does not
    /// list for its shape is tuned instead; [`Engine::gemm_algorithms`] then differs.)
    fn use_gemm_algorithms(&mut self, recorded: &GemmAlgorithms) -> Result<Option<String>> {
        Ok((!recorded.choices.is_empty()).then(|| format!("recorded on {}, running on the CPU", recorded.device)))
    }
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
    /// Master-shaped gradient buffer: each step's, summed over its micro-batches, written by
    /// the first ([`GradStart::Fresh`]).
    grads: Vec<f32>,
    /// The last step's metric sums (over its micro-batches).
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
    fn train_micro_batches(&mut self, micro_batches: &[Batch], schedule: &Schedule, lr: f32, loss_divisor: f32) -> Result<()> {
        ensure!(!micro_batches.is_empty(), "a training step needs at least one micro-batch");
        if self.guard.skip {
            return Ok(()); // every update is skipped until the trainer reads the metrics
        }
        self.model.backend().zero_metrics(&mut self.metrics)?;
        for (i, batch) in micro_batches.iter().enumerate() {
            let start = if i == 0 { GradStart::Fresh } else { GradStart::Accumulate };
            self.model.stage_step(batch, schedule, loss_divisor)?;
            self.model.enqueue_step(&self.params.master, schedule, &mut self.grads, start, &mut self.metrics)?;
        }
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
    use crate::data::batch::{pack_pairs, PackedBatch};
    use crate::optim::AdamCoeffs;
    use crate::rng::Rng;

    const LR: f32 = 1e-3;

    /// A tiny transformer on the CPU and four small batches.
    fn engine() -> (CpuEngine, Vec<PackedBatch>, Schedule) {
        let config = ModelConfig::new(SizeName::Tiny, NetName::Transformer, 256);
        let params = Params::init(config, 1);
        let optimizer = AdamAtan2::new(&params, AdamCoeffs::from_config(&TrainConfig::default()));
        let mut rng = Rng::new(2);
        let batches = (0..4).map(|_| PackedBatch::random(&mut rng, 64, 256, 4..20, (0.2, 0.8)).unwrap()).collect();
        (CpuEngine::new(params, optimizer).unwrap(), batches, Schedule::for_training(&config.net, 0))
    }

    fn step(engine: &mut CpuEngine, b: &PackedBatch, schedule: &Schedule, lr: f32) {
        engine.train_step(&b.batch(), schedule, lr, b.num_labels() as f32).unwrap();
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

    /// No zeroing pass: a step's backward writes each gradient with its first contribution and
    /// zeroes what nothing writes. An engine whose gradient buffer holds NaN before the step
    /// (a stale buffer at its worst) ends it with the gradients, bit for bit, of one whose
    /// buffer was zero; with schedules where some tensors get no gradient (hrm with one
    /// backpropagated pass, whose other module's weights get none: zero) and two micro-batches.
    #[test]
    fn a_step_writes_its_gradients_over_whatever_the_buffer_held() {
        let mut rng = Rng::new(8);
        let batches: Vec<PackedBatch> = (0..2).map(|_| PackedBatch::random(&mut rng, 64, 256, 4..20, (0.2, 0.8)).unwrap()).collect();
        for (net, bp_steps) in [(NetName::Transformer, 0), (NetName::Hrm, 1), (NetName::Hrm, 5)] {
            let config = ModelConfig::new(SizeName::Tiny, net, 256);
            let schedule = Schedule::for_training(&config.net, bp_steps);
            for micro in [1, 2] {
                let run = |stale: f32| {
                    let params = Params::init(config, 1);
                    let optimizer = AdamAtan2::new(&params, AdamCoeffs::from_config(&TrainConfig::default()));
                    let mut engine = CpuEngine::new(params, optimizer).unwrap();
                    engine.grads.fill(stale);
                    let micro_batches: Vec<Batch> = batches[..micro].iter().map(PackedBatch::batch).collect();
                    engine.train_micro_batches(&micro_batches, &schedule, LR, 40.0).unwrap();
                    engine.read_metrics().unwrap();
                    engine
                };
                let (zeroed, stale) = (run(0.0), run(f32::NAN));
                let bits = |g: &[f32]| g.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
                assert!(bits(&stale.grads) == bits(&zeroed.grads), "{net:?}, bp_steps {bp_steps}, {micro} micro-batches: the gradients depend on what the buffer held");
                let with_grad = zeroed.model.tensors_with_grad(&schedule);
                for (spec, with) in zeroed.model.layout().tensors.iter().zip(with_grad) {
                    let Some(offset) = spec.offset else { continue };
                    let region = &stale.grads[offset..offset + spec.numel()];
                    if !with {
                        assert!(region.iter().all(|&g| g == 0.0), "{net:?}, bp_steps {bp_steps}: {} has no gradient this step, yet its region is not zero", spec.name);
                    }
                }
                if bp_steps == 1 {
                    assert!(zeroed.model.tensors_with_grad(&schedule).iter().any(|&w| !w), "hrm with one backpropagated pass leaves a module without gradient");
                }
            }
        }
    }

    /// `n` random (instruction, response) pairs of 2..6 and 2..10 tokens.
    fn samples(rng: &mut Rng, n: usize) -> Vec<(Vec<i32>, Vec<i32>)> {
        let mut draw = |lo: u64, hi: u64| {
            let len = lo + rng.below(hi - lo);
            (0..len).map(|_| 1 + rng.below(255) as i32).collect::<Vec<i32>>()
        };
        (0..n).map(|_| (draw(2, 7), draw(2, 11))).collect()
    }

    /// Relative L2 error of `got` against `want`.
    fn rel_l2(got: &[f32], want: &[f32]) -> f64 {
        let err: f64 = got.iter().zip(want).map(|(&g, &w)| (g as f64 - w as f64).powi(2)).sum();
        let norm: f64 = want.iter().map(|&w| (w as f64).powi(2)).sum();
        (err / norm).sqrt()
    }

    /// A step of two micro-batches is the math of one step on a batch packing both one's
    /// samples back to back, with the same loss divisor (samples never see each other, SPEC
    /// §4): equal counts, and loss sum and gradients equal up to the fp32 summation order of
    /// the weight gradients' row reductions (1e-5 relative: ~100 ulps of fp32 over a few
    /// hundred rows). The gradients are compared, not only the weights: AdamATan2's first
    /// step moves every weight by about `lr` whatever its gradient's size.
    #[test]
    fn micro_batches_accumulate_like_one_batch_of_their_samples() {
        let (mut split, _, schedule) = engine();
        let (mut whole, _, _) = engine();
        let mut rng = Rng::new(5);
        let (first, second) = (samples(&mut rng, 3), samples(&mut rng, 4));
        let micro = [pack_pairs(&first, 64).unwrap(), pack_pairs(&second, 64).unwrap()];
        let together = pack_pairs(&[first, second].concat(), 128).unwrap();
        // SPEC §5 with a virtual rank per micro-batch: the mean of their valid labels.
        let divisor = (micro[0].num_labels() + micro[1].num_labels()) as f32 / 2.0;
        split.train_micro_batches(&[micro[0].batch(), micro[1].batch()], &schedule, LR, divisor).unwrap();
        whole.train_step(&together.batch(), &schedule, LR, divisor).unwrap();
        let (got, want) = (split.read_metrics().unwrap(), whole.read_metrics().unwrap());
        assert_eq!(got.valid_tokens, together.num_labels() as u64, "the metrics are sums over the micro-batches");
        assert_eq!((got.valid_tokens, got.correct_tokens, got.exact_samples, got.samples_with_labels), (want.valid_tokens, want.correct_tokens, want.exact_samples, want.samples_with_labels));
        assert_eq!(got.samples_with_labels, 7);
        assert!((got.loss_sum - want.loss_sum).abs() <= 1e-5 * want.loss_sum.abs(), "loss sums {} and {}", got.loss_sum, want.loss_sum);
        let err = rel_l2(&split.grads, &whole.grads);
        assert!(err <= 1e-5, "gradients differ by {err:e} (relative L2)");
        assert!(split.grads.iter().any(|&g| g != 0.0));
        let (after_split, after_whole) = (split.snapshot().unwrap().0, whole.snapshot().unwrap().0);
        assert!(rel_l2(&after_split.master, &after_whole.master) <= 1e-5, "updated weights");
    }
}
