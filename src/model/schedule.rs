//! The recurrence of every net as data: a list of module passes (SPEC §1, §3).
//!
//! The model keeps two recurrent states of shape `[T, D]`, `z_H` and `z_L` ([`Slot`]). Every
//! net starts the same way, `z_H = embed(tokens)` and (all nets but `transformer`)
//! `z_L = z_L_init` broadcast to every token, then runs its passes in order. A [`Pass`] is one
//! call `out = module(z + inj)`: which module, which state it reads, which state it adds as
//! injection (or none), which state it overwrites, and whether gradient flows through it.
//! The LM head reads the [`Schedule::output`] state. One small function per net writes its
//! list; the forward and backward of `src/model/net.rs` interpret it without knowing which
//! net they run.
//!
//! How each row of the SPEC §1 table reads as passes (`L(a, b) -> c` = `c = L(a + b)`):
//!
//! | net | passes | gradient through |
//! |-----|--------|------------------|
//! | `hrm` | for i in 0..H_cycles: L_cycles times `L(z_L, z_H) -> z_L`, then `H(z_H, z_L) -> z_H` | L pass k iff `k >= H_cycles*L_cycles - L_bp`, H pass i iff `i >= H_cycles - H_bp`, `H_bp = min(H_cycles, bp_steps - 1)`, `L_bp = bp_steps - H_bp` |
//! | `transformer` | `Layers(z_H) -> z_H` | the one pass |
//! | `trm` | hrm's loop with module L in both roles, `H_cycles = 2, L_cycles = 1` | hrm's rule with the fixed `H_bp_steps = 1`, `L_bp_steps = 1`: the last L pass and the last H pass |
//! | `trm_match_recurrence` | as `trm` with `H_cycles = 2, L_cycles = 3` (module L of `n_layers/2` blocks) | `H_bp_steps = 2`, `L_bp_steps = 3`: the same passes as hrm with `bp_steps = 5` |
//! | `rins` | `L_cycles` times `L(z_L, z_H) -> z_L` (z_H stays the embedding), then `H(z_L) -> z_H`, no injection | the last `L_bp_cycles` L passes and the H pass |
//! | `ut` | `cycles` times `L(z_L, z_H) -> z_L`; the LM head reads z_L | the last `bp_cycles` passes |
//!
//! A pass "without gradient" is a plain forward whose output is a constant: the backward stops
//! there and its activations are not kept. [`Schedule::new`] also drops the gradient of a pass
//! whose output cannot reach the loss through passes with gradient (e.g. hrm with
//! `bp_steps = 1`: L pass 5 feeds only H pass 1, which has none), and works out whether the
//! embedding receives gradient: it does iff the initial `z_H` reaches the loss through passes
//! with gradient (not in `trm`; not in `hrm` while `bp_steps = 2`, SPEC §7).
//!
//! A schedule also says how the backward gets the activations of a pass with gradient
//! ([`Schedule::recompute`], `--recompute`): kept from the forward, or recomputed from the
//! pass's saved input just before its backward. The results are the same bits either way;
//! only memory and time differ (`docs/model.md` §4).

use crate::config::{ModuleName, Net};

/// One of the two recurrent states, each `[T, D]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Slot {
    /// `z_H`: starts as the scaled token embedding.
    H,
    /// `z_L`: starts as `z_L_init` broadcast to every token.
    L,
}

impl Slot {
    /// Index into a two-element array of per-state buffers.
    pub fn index(self) -> usize {
        match self {
            Slot::H => 0,
            Slot::L => 1,
        }
    }

    /// The other state.
    pub fn other(self) -> Slot {
        match self {
            Slot::H => Slot::L,
            Slot::L => Slot::H,
        }
    }
}

/// One module call `out = module(z + inj)` (SPEC §2: `module(z, inj) = Module(z + inj)`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pass {
    pub module: ModuleName,
    pub z: Slot,
    pub inj: Option<Slot>,
    pub out: Slot,
    /// Whether gradient flows through this pass (its input is kept for the backward, and its
    /// activations too unless the schedule recomputes them).
    pub grad: bool,
}

/// The passes of one forward, in order, and the state the LM head reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Schedule {
    pub passes: Vec<Pass>,
    pub output: Slot,
    /// Whether the initial `z_H`, hence the embedding, receives gradient.
    pub embedding_grad: bool,
    /// Whether the passes with gradient keep only their input during the forward (running
    /// like passes without) and recompute their activations just before their backward.
    pub recompute: bool,
}

impl Schedule {
    /// Builds a schedule from its passes, keeping `grad` only on passes whose output reaches
    /// the loss through passes with gradient (a reverse liveness walk, the same walk the
    /// backward does with buffers).
    pub fn new(mut passes: Vec<Pass>, output: Slot) -> Schedule {
        // live[s]: the current value of state s carries gradient from the loss.
        let mut live = [false; 2];
        live[output.index()] = true;
        for pass in passes.iter_mut().rev() {
            let out_live = live[pass.out.index()];
            // The value of `out` before this pass is another variable: it only becomes live
            // again if this pass reads it.
            live[pass.out.index()] = false;
            pass.grad &= out_live;
            if pass.grad {
                live[pass.z.index()] = true;
                if let Some(inj) = pass.inj {
                    live[inj.index()] = true;
                }
            }
        }
        Schedule { passes, output, embedding_grad: live[Slot::H.index()], recompute: false }
    }

    /// The same passes, with the activations of those with gradient recomputed (`on`) or
    /// kept from the forward.
    pub fn with_recompute(self, on: bool) -> Schedule {
        Schedule { recompute: on, ..self }
    }

    /// The schedule of `net` for one training step. `bp_steps` is hrm's gradient depth
    /// (SPEC §3, see [`bp_steps`]); the other nets have a fixed depth and ignore it.
    pub fn for_training(net: &Net, bp_steps: usize) -> Schedule {
        match *net {
            Net::Hrm { h_cycles, l_cycles, .. } => hrm(h_cycles, l_cycles, bp_steps),
            Net::Transformer => transformer(),
            Net::Trm { h_cycles, l_cycles, h_bp_steps, l_bp_steps }
            | Net::TrmMatchRecurrence { h_cycles, l_cycles, h_bp_steps, l_bp_steps } => {
                trm(h_cycles, l_cycles, h_bp_steps, l_bp_steps)
            }
            Net::Rins { l_cycles, l_bp_cycles } => rins(l_cycles, l_bp_cycles),
            Net::Ut { cycles, bp_cycles } => ut(cycles, bp_cycles),
        }
    }

    /// The schedule of training step `step` of about `total_steps`: hrm's depth warms up
    /// (SPEC §3), the other nets' is fixed.
    pub fn at_step(net: &Net, step: u64, total_steps: u64, bp_warmup: bool) -> Schedule {
        Schedule::for_training(net, bp_steps(net, step, total_steps, bp_warmup).unwrap_or(0))
    }

    /// The same passes with no gradient anywhere (evaluation, `hrm-cu loss`).
    pub fn forward_only(net: &Net) -> Schedule {
        let training = Schedule::for_training(net, 0);
        let passes = training.passes.into_iter().map(|p| Pass { grad: false, ..p }).collect();
        Schedule::new(passes, training.output)
    }

    /// Whether any pass through `module` carries gradient (its weights then receive some).
    pub fn module_grad(&self, module: ModuleName) -> bool {
        self.passes.iter().any(|p| p.grad && p.module == module)
    }

    /// Number of passes with gradient: how many passes' inputs (and, unless recomputed,
    /// activations) the backward needs.
    pub fn grad_passes(&self) -> usize {
        self.passes.iter().filter(|p| p.grad).count()
    }

    /// Sets of pass activations the backward holds at once: one per pass with gradient, or
    /// with recomputation one, which each of them refills in turn.
    pub fn kept_passes(&self) -> usize {
        match self.recompute {
            false => self.grad_passes(),
            true => self.grad_passes().min(1),
        }
    }
}

/// hrm's nested loop over two modules (SPEC §3), with gradient through the last `h_bp` H
/// passes and the last `l_bp` L passes.
fn hrm_like(h: ModuleName, l: ModuleName, h_cycles: usize, l_cycles: usize, h_bp: usize, l_bp: usize) -> Schedule {
    let mut passes = Vec::with_capacity(h_cycles * (l_cycles + 1));
    for i in 0..h_cycles {
        for k in i * l_cycles..(i + 1) * l_cycles {
            let grad = k + l_bp >= h_cycles * l_cycles;
            passes.push(Pass { module: l, z: Slot::L, inj: Some(Slot::H), out: Slot::L, grad });
        }
        let grad = i + h_bp >= h_cycles;
        passes.push(Pass { module: h, z: Slot::H, inj: Some(Slot::L), out: Slot::H, grad });
    }
    Schedule::new(passes, Slot::H)
}

/// `hrm`: `H_bp = min(H_cycles, bp_steps - 1)`, `L_bp = bp_steps - H_bp` (SPEC §3);
/// `bp_steps = 0` means no pass has gradient.
pub fn hrm(h_cycles: usize, l_cycles: usize, bp_steps: usize) -> Schedule {
    let h_bp = h_cycles.min(bp_steps.saturating_sub(1));
    let l_bp = bp_steps - h_bp;
    hrm_like(ModuleName::H, ModuleName::L, h_cycles, l_cycles, h_bp, l_bp)
}

/// `transformer`: one pass of the single stack over the embedding.
pub fn transformer() -> Schedule {
    Schedule::new(vec![Pass { module: ModuleName::Layers, z: Slot::H, inj: None, out: Slot::H, grad: true }], Slot::H)
}

/// `trm` and `trm_match_recurrence`: hrm's loop with module L in both roles and fixed depths.
pub fn trm(h_cycles: usize, l_cycles: usize, h_bp_steps: usize, l_bp_steps: usize) -> Schedule {
    hrm_like(ModuleName::L, ModuleName::L, h_cycles, l_cycles, h_bp_steps, l_bp_steps)
}

/// `rins`: `z_L = L(z_L, emb)` for `l_cycles` passes, then `z_H = H(z_L)` with no injection.
pub fn rins(l_cycles: usize, l_bp_cycles: usize) -> Schedule {
    let mut passes: Vec<Pass> = (0..l_cycles)
        .map(|k| Pass { module: ModuleName::L, z: Slot::L, inj: Some(Slot::H), out: Slot::L, grad: k + l_bp_cycles >= l_cycles })
        .collect();
    passes.push(Pass { module: ModuleName::H, z: Slot::L, inj: None, out: Slot::H, grad: true });
    Schedule::new(passes, Slot::H)
}

/// `ut`: `z = L(z, emb)` for `cycles` passes from `z_L_init`; the LM head reads `z`.
pub fn ut(cycles: usize, bp_cycles: usize) -> Schedule {
    let passes = (0..cycles)
        .map(|k| Pass { module: ModuleName::L, z: Slot::L, inj: Some(Slot::H), out: Slot::L, grad: k + bp_cycles >= cycles })
        .collect();
    Schedule::new(passes, Slot::L)
}

/// hrm's gradient depth at global step `step` (SPEC §3): `bp_min + floor(progress *
/// (bp_max - bp_min))` with `progress = min(1, step / (0.2 * total_steps))`; always `bp_max`
/// without warm-up (fine-tuning). `None` for the nets whose depth is fixed by their config.
pub fn bp_steps(net: &Net, step: u64, total_steps: u64, warmup: bool) -> Option<usize> {
    let Net::Hrm { bp_min_steps, bp_max_steps, .. } = *net else { return None };
    if !warmup {
        return Some(bp_max_steps);
    }
    let ramp = 0.2 * total_steps as f64;
    let progress = if ramp > 0.0 { (step as f64 / ramp).min(1.0) } else { 1.0 };
    let extra = (progress * bp_max_steps.saturating_sub(bp_min_steps) as f64).floor() as usize;
    Some(bp_min_steps + extra)
}
