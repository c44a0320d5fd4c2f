//! The learning-rate schedule of SPEC §7: linear warm-up, then cosine decay to
//! `lr * lr_min_ratio`.
//!
//! ```text
//! step < warmup:  lr * step / warmup
//! otherwise:      lr * (r + (1 - r) * 0.5 * (1 + cos(pi * progress)))
//!                 progress = clamp((step - warmup) / (total_steps - warmup), 0, 1)
//! ```
//!
//! The global step starts at 1 for the first update. `total_steps` is an estimate and
//! multipack may run a few steps past it, hence the clamp: the rate then stays at its floor.
//! With `total_steps <= warmup` the decay has no length and every step after the warm-up runs
//! at the floor.

use crate::config::TrainConfig;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LrSchedule {
    /// Peak learning rate.
    pub lr: f32,
    /// `r`: the floor of the cosine as a fraction of `lr` (1.0: constant after warm-up).
    pub lr_min_ratio: f32,
    pub warmup_steps: u64,
    pub total_steps: u64,
}

impl LrSchedule {
    pub fn new(cfg: &TrainConfig, total_steps: u64) -> LrSchedule {
        LrSchedule { lr: cfg.lr, lr_min_ratio: cfg.lr_min_ratio, warmup_steps: cfg.warmup_steps, total_steps }
    }

    /// The learning rate of global step `step` (1 for the first update).
    pub fn lr_at(&self, step: u64) -> f32 {
        let lr = self.lr as f64;
        if step < self.warmup_steps {
            return (lr * step as f64 / self.warmup_steps as f64) as f32;
        }
        let progress = if self.total_steps > self.warmup_steps {
            ((step - self.warmup_steps) as f64 / (self.total_steps - self.warmup_steps) as f64).clamp(0.0, 1.0)
        } else {
            1.0
        };
        let r = self.lr_min_ratio as f64;
        (lr * (r + (1.0 - r) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()))) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(warmup_steps: u64, total_steps: u64, lr_min_ratio: f32) -> LrSchedule {
        LrSchedule { lr: 1.0, lr_min_ratio, warmup_steps, total_steps }
    }

    fn close(a: f32, b: f64) -> bool {
        (a as f64 - b).abs() < 1e-6
    }

    #[test]
    fn warmup_then_cosine_by_hand() {
        // warmup 10, total 110, r = 0.1: the cosine spans steps 10..110.
        let s = sched(10, 110, 0.1);
        assert!(close(s.lr_at(1), 0.1)); // 1/10
        assert!(close(s.lr_at(5), 0.5));
        assert!(close(s.lr_at(10), 1.0)); // progress 0
        assert!(close(s.lr_at(35), 0.1 + 0.9 * 0.5 * (1.0 + std::f64::consts::FRAC_1_SQRT_2))); // progress 1/4
        assert!(close(s.lr_at(60), 0.55)); // progress 1/2: 0.1 + 0.9 * 0.5
        assert!(close(s.lr_at(110), 0.1)); // progress 1
        assert!(close(s.lr_at(150), 0.1), "past the estimate the rate stays at the floor");
    }

    #[test]
    fn constant_when_ratio_is_one() {
        let s = sched(3, 100, 1.0);
        assert!(close(s.lr_at(2), 2.0 / 3.0));
        assert!([3, 50, 100, 1000].iter().all(|&t| close(s.lr_at(t), 1.0)));
    }

    #[test]
    fn no_warmup_starts_on_the_cosine() {
        // SFT: warmup 0, the first step (1) is already 1/100 into the decay.
        let s = sched(0, 100, 0.1);
        let want = 0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * 0.01).cos());
        assert!(close(s.lr_at(1), want));
        assert!(close(s.lr_at(0), 1.0));
    }

    #[test]
    fn degenerate_lengths_give_finite_rates() {
        // total_steps <= warmup: no decay span, the floor right after the warm-up.
        let s = sched(10, 5, 0.1);
        assert!(close(s.lr_at(4), 0.4));
        assert!(close(s.lr_at(10), 0.1) && close(s.lr_at(11), 0.1));
        let s = sched(0, 0, 0.1);
        assert!(close(s.lr_at(1), 0.1));
        assert!((0..20).all(|t| sched(10, 10, 0.3).lr_at(t).is_finite()));
    }
}
