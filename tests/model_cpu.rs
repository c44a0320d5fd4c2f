//! The model on the CPU backend: gradients of every net against finite differences, the
//! forward against a plain composition of the ops, the invariances of packing, and
//! recomputation (`--recompute`) giving the same bits as kept activations.
//!
//! Sizes are below `tiny` so the whole file runs in seconds: hidden 128, one head of 128,
//! intermediate 256, 2 layers (hrm/rins: one block per module; the recompute test also uses 6),
//! vocab 256, a packed batch of 3 samples (one with a response of length 1) and 5 padding rows.

use hrm_cu::config::{Dims, ModelConfig, NetName, HEAD_DIM};
use hrm_cu::data::batch::{pack_pairs, PackedBatch};
use hrm_cu::model::cpu::CpuBackend;
use hrm_cu::model::net::{Model, StepOutput};
use hrm_cu::model::params::Params;
use hrm_cu::model::schedule::{Pass, Schedule, Slot};
use hrm_cu::model::spec::Role;
use hrm_cu::ops::attention::{attention_fwd_cpu, block_of};
use hrm_cu::ops::cross_entropy::{cross_entropy_cpu, IGNORE_LABEL};
use hrm_cu::ops::embedding::embedding_fwd_cpu;
use hrm_cu::ops::gate::gate_fwd_cpu;
use hrm_cu::ops::gemm::linear_fwd_cpu;
use hrm_cu::ops::rmsnorm::rmsnorm_fwd_cpu;
use hrm_cu::ops::rope::qkv_rope_fwd_cpu;
use hrm_cu::ops::swiglu::swiglu_fwd_cpu;
use hrm_cu::rng::Rng;

const ALL_NETS: [NetName; 6] = [NetName::Hrm, NetName::Transformer, NetName::Trm, NetName::TrmMatchRecurrence, NetName::Rins, NetName::Ut];

fn config(net: NetName) -> ModelConfig {
    config_with_layers(net, 2)
}

fn config_with_layers(net: NetName, n_layers: usize) -> ModelConfig {
    let dims = Dims { n_layers, hidden: 128, heads: 1, head_dim: HEAD_DIM, intermediate: 256 };
    ModelConfig { dims, net: net.default_net(), vocab: 256 }
}

/// Packs the test's (instruction, response) samples into `rows` slots (SPEC §4,
/// `target_only = true`) with the library's packer.
fn pack(samples: &[(&[i32], &[i32])], rows: usize) -> PackedBatch {
    let owned: Vec<(Vec<i32>, Vec<i32>)> = samples.iter().map(|(i, r)| (i.to_vec(), r.to_vec())).collect();
    pack_pairs(&owned, rows).unwrap()
}

const SAMPLE_A: (&[i32], &[i32]) = (&[1, 5, 9, 2], &[7, 3, 8, 4, 6]); // 8 rows, 5 labels
const SAMPLE_B: (&[i32], &[i32]) = (&[1, 11, 2], &[12]); // response of length 1: causal length 0
const SAMPLE_C: (&[i32], &[i32]) = (&[1, 20, 21, 22, 2], &[30, 31, 32, 33]); // 8 rows, 4 labels

/// 19 rows of samples and 5 of padding.
fn batch() -> PackedBatch {
    pack(&[SAMPLE_A, SAMPLE_B, SAMPLE_C], 24)
}

fn model(params: &Params) -> Model<CpuBackend> {
    Model::new(CpuBackend, params.config, &params.z_l_init).unwrap()
}

/// One forward/backward of the model from zero gradients, dividing by the valid labels.
fn model_grads(params: &Params, b: &PackedBatch, schedule: &Schedule) -> (StepOutput, Vec<f32>) {
    let mut grads = params.zeros_like_master();
    let out = model(params).forward_backward(&params.master, &b.batch(), schedule, &mut grads, b.num_labels() as f32).unwrap();
    (out, grads)
}

/// `schedule` with gradient through every pass.
fn all_grad(schedule: &Schedule) -> Schedule {
    Schedule::new(schedule.passes.iter().map(|p| Pass { grad: true, ..*p }).collect(), schedule.output)
}

// ---- the reference: the recurrence as a plain composition of the ops ----

/// `Module(z + inj)` written out op by op, allocating as it goes.
fn module_ref(params: &Params, w: &[f32], pass: &Pass, z: &[f32], inj: Option<&[f32]>, b: &PackedBatch) -> Vec<f32> {
    let cfg = &params.config;
    let (t, d, nh, i) = (b.inputs.len(), cfg.dims.hidden, cfg.dims.heads, cfg.dims.intermediate);
    let c = nh * HEAD_DIM;
    let n_blocks = cfg.net.modules(cfg.dims.n_layers).into_iter().find(|(m, _)| *m == pass.module).unwrap().1;
    let mut x: Vec<f32> = match inj {
        Some(inj) => z.iter().zip(inj).map(|(a, b)| a + b).collect(),
        None => z.to_vec(),
    };
    for layer in 0..n_blocks {
        let module = pass.module;
        let weight = |role| &w[params.spec(role).range().unwrap()];
        let (mut xn, mut rstd) = (vec![0.0; t * d], vec![0.0; t]);
        rmsnorm_fwd_cpu(&mut xn, &mut rstd, &x, t, d);
        let mut gqkv = vec![0.0; t * 4 * c];
        linear_fwd_cpu(&mut gqkv, &xn, weight(Role::Gqkv { module, layer }), None, t, 4 * c, d);
        qkv_rope_fwd_cpu(&mut gqkv, &b.positions, t, nh);
        let [q, k, v] = [1, 2, 3].map(|j| block_of(&gqkv, j, nh));
        let (mut o, mut lse) = (vec![0.0; t * c], vec![0.0; nh * t]);
        attention_fwd_cpu(&mut o, &mut lse, &q, &k, &v, &b.cu_seqlens, &b.prefix_lens, t, nh);
        let mut ga = vec![0.0; t * c];
        gate_fwd_cpu(&mut ga, &gqkv, &o, t, nh);
        let mut x1 = vec![0.0; t * d];
        linear_fwd_cpu(&mut x1, &ga, weight(Role::AttnOut { module, layer }), Some(&x), t, d, c);
        rmsnorm_fwd_cpu(&mut xn, &mut rstd, &x1, t, d);
        let (mut gu, mut act) = (vec![0.0; t * 2 * i], vec![0.0; t * i]);
        linear_fwd_cpu(&mut gu, &xn, weight(Role::GateUp { module, layer }), None, t, 2 * i, d);
        swiglu_fwd_cpu(&mut act, &gu, t, i);
        linear_fwd_cpu(&mut x, &act, weight(Role::Down { module, layer }), Some(&x1), t, d, i);
    }
    let (mut out, mut rstd) = (vec![0.0; t * d], vec![0.0; t]);
    rmsnorm_fwd_cpu(&mut out, &mut rstd, &x, t, d);
    out
}

struct RefOutput {
    /// Sum of the per-token losses over valid labels, in f64.
    loss_sum: f64,
    token_losses: Vec<f32>,
    /// The state each pass wrote, in order.
    pass_outputs: Vec<Vec<f32>>,
}

/// The whole forward with weights `w`. With `frozen`, every pass without gradient writes the
/// recorded output instead of computing one: the "treated as a constant" of SPEC §3, so that
/// finite differences of this loss are what the truncated backward must compute.
fn reference(params: &Params, w: &[f32], b: &PackedBatch, schedule: &Schedule, frozen: Option<&[Vec<f32>]>) -> RefOutput {
    let cfg = &params.config;
    let (t, d, v) = (b.inputs.len(), cfg.dims.hidden, cfg.vocab);
    let mut state = [vec![0.0; t * d], vec![0.0; t * d]];
    embedding_fwd_cpu(&mut state[0], &b.inputs, &w[params.spec(Role::Embedding).range().unwrap()], t, d, (d as f32).sqrt());
    if cfg.net.has_z_l_init() {
        state[1] = params.z_l_init.iter().map(|x| x.to_f32()).collect::<Vec<_>>().repeat(t);
    }
    let mut pass_outputs = Vec::new();
    for (n, pass) in schedule.passes.iter().enumerate() {
        let out = match frozen {
            Some(f) if !pass.grad => f[n].clone(),
            _ => module_ref(params, w, pass, &state[pass.z.index()], pass.inj.map(|s| state[s.index()].as_slice()), b),
        };
        state[pass.out.index()] = out.clone();
        pass_outputs.push(out);
    }
    let mut logits = vec![0.0; t * v];
    linear_fwd_cpu(&mut logits, &state[schedule.output.index()], &w[params.spec(Role::LmHead).range().unwrap()], None, t, v, d);
    let (mut dlogits, mut token_losses, mut correct) = (vec![0.0; t * v], vec![0.0; t], vec![0u8; t]);
    cross_entropy_cpu(&mut dlogits, &mut token_losses, &mut correct, &logits, &b.labels, t, v, 1.0);
    let loss_sum = token_losses.iter().zip(&b.labels).filter(|(_, &y)| y != IGNORE_LABEL).map(|(&l, _)| l as f64).sum();
    RefOutput { loss_sum, token_losses, pass_outputs }
}

// ---- finite differences ----

/// Checks the model's gradient of `loss_sum / valid` for every trainable tensor along one
/// random direction `u` over the whole tensor, by central differences of the reference with
/// the passes without gradient frozen:
///
/// `(L(w + h*u) - L(w - h*u)) / 2  ~=  <grad, (w + h*u) - (w - h*u)> / 2`
///
/// (the right side uses the perturbation as stored in fp32). The error is measured relative
/// to the scale `h * |grad * u|` of the terms. Two sources, measured over all nets: the
/// O(h^2) truncation of the central difference (median 3e-3, max 3.6e-2 at `h = 1e-2`,
/// falling 10x per 3x smaller h) and the fp32 rounding of the forward (~1e-4 at `h = 3e-4`,
/// growing as 1/h). At `h = 1e-3` the worst case measured was 4.3e-4 (median 6e-5); we allow
/// 3e-3. A wrong backward (a missing pass, a missing injection term, a gradient that should
/// have stopped) is off by far more.
fn check_against_finite_differences(net: NetName, schedule: &Schedule, seed: u64) {
    const H: f64 = 1e-3;
    const REL_TOL: f64 = 3e-3;
    let params = Params::init(config(net), seed);
    let b = batch();
    let valid = b.num_labels() as f64;
    let (out, grads) = model_grads(&params, &b, schedule);
    let base = reference(&params, &params.master, &b, schedule, None);
    let loss = |w: &[f32]| reference(&params, w, &b, schedule, Some(&base.pass_outputs)).loss_sum / valid;
    let mut rng = Rng::new(seed ^ 0xF1D);
    for (spec, &has_grad) in params.layout.tensors.iter().zip(&out.tensors_with_grad) {
        let Some(range) = spec.range() else { continue };
        let g = &grads[range.clone()];
        let u: Vec<f64> = range.clone().map(|_| rng.normal()).collect();
        let mut wp = params.master.clone();
        let mut wm = params.master.clone();
        for (j, uj) in range.clone().zip(&u) {
            wp[j] = (params.master[j] as f64 + H * uj) as f32;
            wm[j] = (params.master[j] as f64 - H * uj) as f32;
        }
        let numeric = (loss(&wp) - loss(&wm)) / 2.0;
        let analytic: f64 = g.iter().zip(range.clone()).map(|(&gj, j)| gj as f64 * (wp[j] as f64 - wm[j] as f64) / 2.0).sum();
        let scale = g.iter().zip(&u).map(|(&gj, uj)| (gj as f64 * uj * H).powi(2)).sum::<f64>().sqrt();
        if !has_grad {
            assert!(g.iter().all(|&x| x == 0.0), "{net:?} {}: flagged without gradient but has some", spec.name);
            assert_eq!(numeric, 0.0, "{net:?} {}: no gradient, yet the loss depends on it", spec.name);
            continue;
        }
        let err = (numeric - analytic).abs() / scale;
        assert!(scale > 0.0 && err <= REL_TOL, "{net:?} {}: numeric {numeric:.6e} vs analytic {analytic:.6e} (relative error {err:.2e})", spec.name);
    }
}

#[test]
fn every_net_with_gradient_through_every_pass_matches_finite_differences() {
    for (n, net) in ALL_NETS.into_iter().enumerate() {
        let schedule = all_grad(&Schedule::for_training(&net.default_net(), 5));
        check_against_finite_differences(net, &schedule, 10 + n as u64);
    }
}

#[test]
fn every_net_with_its_spec_gradient_depth_matches_finite_differences() {
    for (n, net) in ALL_NETS.into_iter().enumerate() {
        let schedule = Schedule::for_training(&net.default_net(), 5);
        check_against_finite_differences(net, &schedule, 20 + n as u64);
    }
    // hrm's warm-up depths: 2 (no gradient into H0 and the embedding), 4 (L3 without gradient
    // between H0 and L4, which have some).
    for bp in [2, 4] {
        check_against_finite_differences(NetName::Hrm, &Schedule::for_training(&NetName::Hrm.default_net(), bp), 30 + bp as u64);
    }
}

#[test]
fn a_pass_without_gradient_stops_it_between_passes_with_gradient() {
    // Not a SPEC schedule: every pass has gradient but L pass 3 (passes L0 L1 L2 H0 L3 L4 L5
    // H1). The gradient arriving at L3's output must be dropped, not passed on to L2, whose
    // output still gets gradient through its injection into H0.
    let hrm = Schedule::for_training(&NetName::Hrm.default_net(), 20);
    let mut passes = hrm.passes.clone();
    passes[4].grad = false;
    let schedule = Schedule::new(passes, hrm.output);
    assert_eq!(schedule.grad_passes(), 7);
    check_against_finite_differences(NetName::Hrm, &schedule, 40);
}

// ---- which tensors get gradient ----

#[test]
fn tensors_used_only_without_gradient_get_exactly_zero() {
    let b = batch();
    for (net, bp, embedding_grad) in [(NetName::Hrm, 2, false), (NetName::Hrm, 3, true), (NetName::Trm, 5, false), (NetName::Ut, 5, true)] {
        let params = Params::init(config(net), 3);
        let schedule = Schedule::for_training(&net.default_net(), bp);
        let (out, grads) = model_grads(&params, &b, &schedule);
        for (spec, &flag) in params.layout.tensors.iter().zip(&out.tensors_with_grad) {
            let want = match spec.role {
                Role::Embedding => embedding_grad,
                Role::ZLInit => false,
                _ => true,
            };
            assert_eq!(flag, want, "{net:?} bp {bp}: {}", spec.name);
            if let Some(r) = spec.range() {
                let nonzero = grads[r].iter().any(|&g| g != 0.0);
                assert_eq!(nonzero, want, "{net:?} bp {bp}: {} has nonzero gradient: {nonzero}", spec.name);
            }
        }
    }
}

#[test]
fn gradients_accumulate_into_the_buffer() {
    let params = Params::init(config(NetName::Hrm), 4);
    let b = batch();
    let schedule = Schedule::for_training(&params.config.net, 5);
    let (_, once) = model_grads(&params, &b, &schedule);
    let mut twice = params.zeros_like_master();
    let mut m = model(&params);
    for _ in 0..2 {
        m.forward_backward(&params.master, &b.batch(), &schedule, &mut twice, b.num_labels() as f32).unwrap();
    }
    // The same deterministic step twice: double, up to the rounding of the second addition
    // (the sgemm and the embedding scatter add partial sums into the buffer): 2^-23 relative
    // to the largest term, with room for a few roundings.
    let scale = once.iter().fold(0.0f32, |m, g| m.max(g.abs()));
    let worst = once.iter().zip(&twice).fold(0.0f32, |m, (a, b)| m.max((2.0 * a - b).abs()));
    assert!(worst <= 4.0 * f32::EPSILON * scale, "off by {worst:.3e} (largest {scale:.3e})");
    assert!(scale > 0.0);
}

// ---- the forward ----

#[test]
fn forward_matches_the_plain_composition_and_the_training_step() {
    let b = batch();
    for net in ALL_NETS {
        let params = Params::init(config(net), 5);
        let schedule = Schedule::for_training(&params.config.net, 5);
        let want = reference(&params, &params.master, &b, &schedule, None);
        let mut m = model(&params);
        let eval = m.forward_loss(&params.master, &b.batch()).unwrap();
        // The same ops in the same order on the same inputs: identical bits.
        assert_eq!(m.token_losses().unwrap(), want.token_losses, "{net:?}");
        assert_eq!(eval.loss_sum, want.loss_sum, "{net:?}");
        assert_eq!((eval.valid_tokens, eval.samples_with_labels), (10, 3));
        let (train, _) = model_grads(&params, &b, &schedule);
        assert_eq!(train.metrics, eval, "{net:?}: the training step's metrics");
        // A fresh model has ln(256) = 5.55 per token, give or take.
        let mean = eval.loss_sum / eval.valid_tokens as f64;
        assert!((4.5..6.5).contains(&mean), "{net:?}: mean loss {mean}");
    }
}

#[test]
fn padding_changes_nothing() {
    let params = Params::init(config(NetName::Hrm), 6);
    let schedule = Schedule::for_training(&params.config.net, 5);
    let (padded, unpadded) = (batch(), pack(&[SAMPLE_A, SAMPLE_B, SAMPLE_C], 19));
    let (out_p, grads_p) = model_grads(&params, &padded, &schedule);
    let mut m = model(&params);
    let mut grads_u = params.zeros_like_master();
    let out_u = m.forward_backward(&params.master, &unpadded.batch(), &schedule, &mut grads_u, unpadded.num_labels() as f32).unwrap();
    assert_eq!(out_p.metrics.valid_tokens, out_u.metrics.valid_tokens);
    // Row results do not depend on other rows (padding rows are masked out of attention and
    // carry no label), but the sgemm may block a longer T differently: allow fp32 rounding
    // of sums over at most D = 256 terms, 256 * 2^-24 = 1.5e-5 relative.
    let rel = |a: f64, b: f64| (a - b).abs() / b.abs().max(1e-30);
    assert!(rel(out_p.metrics.loss_sum, out_u.metrics.loss_sum) < 1.5e-5);
    let scale = grads_u.iter().fold(0.0f32, |m, g| m.max(g.abs()));
    let worst = grads_p.iter().zip(&grads_u).fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(worst <= 1.5e-5 * scale, "gradients differ by {worst:.3e} (largest {scale:.3e})");
}

#[test]
fn samples_do_not_see_each_other() {
    let params = Params::init(config(NetName::Hrm), 7);
    let mut m = model(&params);
    let other_c: (&[i32], &[i32]) = (&[1, 40, 41, 2], &[50, 51, 52, 53, 54]);
    let mut losses = Vec::new();
    for c in [SAMPLE_C, other_c] {
        let b = pack(&[SAMPLE_A, SAMPLE_B, c], 24);
        m.forward_loss(&params.master, &b.batch()).unwrap();
        losses.push(m.token_losses().unwrap());
    }
    // Samples A and B fill rows 0..11; each row's computation reads only its own sample.
    assert_eq!(losses[0][..11], losses[1][..11]);
    assert_ne!(losses[0][11..19], losses[1][11..19], "sample C did change");
}

// ---- bad input ----

#[test]
fn bad_batches_and_buffers_are_errors() {
    let params = Params::init(config(NetName::Hrm), 8);
    let mut m = model(&params);
    let good = batch();
    let mut bad = good.clone();
    bad.labels[3] = 256;
    assert!(m.forward_loss(&params.master, &bad.batch()).is_err(), "label outside the vocabulary");
    let mut bad = good.clone();
    bad.inputs[0] = -1;
    assert!(m.forward_loss(&params.master, &bad.batch()).is_err(), "negative token");
    let mut bad = good.clone();
    *bad.cu_seqlens.last_mut().unwrap() = 25;
    assert!(m.forward_loss(&params.master, &bad.batch()).is_err(), "sample past the end");
    let mut bad = good.clone();
    bad.prefix_lens[1] = 4;
    assert!(m.forward_loss(&params.master, &bad.batch()).is_err(), "prefix longer than its sample");
    let mut bad = good.clone();
    bad.positions.pop();
    assert!(m.forward_loss(&params.master, &bad.batch()).is_err(), "positions of the wrong length");
    let schedule = Schedule::for_training(&params.config.net, 5);
    let mut short = vec![0.0; params.master.len() - 1];
    assert!(m.forward_backward(&params.master, &good.batch(), &schedule, &mut short, 10.0).is_err(), "gradient buffer of the wrong length");
    let mut grads = params.zeros_like_master();
    assert!(m.forward_backward(&params.master, &good.batch(), &schedule, &mut grads, 0.0).is_err(), "zero divisor");
    assert!(Model::new(CpuBackend, params.config, &params.z_l_init[1..]).is_err(), "z_L_init of the wrong length");
    // The model still works after all that.
    assert!(m.forward_loss(&params.master, &good.batch()).is_ok());
}

#[test]
fn transformer_has_no_z_l_state() {
    let params = Params::init(config(NetName::Transformer), 9);
    assert!(params.z_l_init.is_empty());
    let reads_l = Schedule::new(vec![Pass { module: hrm_cu::config::ModuleName::Layers, z: Slot::L, inj: None, out: Slot::H, grad: true }], Slot::H);
    let mut grads = params.zeros_like_master();
    let b = batch();
    assert!(model(&params).forward_backward(&params.master, &b.batch(), &reads_l, &mut grads, 1.0).is_err());
}

// ---- recomputation ----

/// One step on `m` from zero gradients: its output, the gradients' and the token losses' bits.
fn step_bits(m: &mut Model<CpuBackend>, params: &Params, b: &PackedBatch, schedule: &Schedule) -> (StepOutput, Vec<u32>, Vec<u32>) {
    let mut grads = params.zeros_like_master();
    let out = m.forward_backward(&params.master, &b.batch(), schedule, &mut grads, b.num_labels() as f32).unwrap();
    let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<u32>>();
    (out, bits(&grads), bits(&m.token_losses().unwrap()))
}

#[test]
fn recompute_gives_the_same_bits_as_kept_activations() {
    // Every net at its SPEC depth, hrm truncated (bp 2: H0 without gradient; bp 4: L3 without
    // gradient between passes with) and with gradient through all 8 passes; modules of one
    // block (2 layers) and of three (6 layers: the scratch ring wraps around).
    let b = batch();
    let hrm = NetName::Hrm.default_net();
    for n_layers in [2, 6] {
        let mut cases: Vec<(NetName, Schedule)> = ALL_NETS.iter().map(|&net| (net, Schedule::for_training(&net.default_net(), 5))).collect();
        cases.push((NetName::Hrm, Schedule::for_training(&hrm, 2)));
        cases.push((NetName::Hrm, Schedule::for_training(&hrm, 4)));
        cases.push((NetName::Hrm, all_grad(&Schedule::for_training(&hrm, 5))));
        for (n, (net, schedule)) in cases.into_iter().enumerate() {
            let params = Params::init(config_with_layers(net, n_layers), 50 + n as u64);
            let what = format!("{net:?} with {n_layers} layers, {} of {} passes with gradient", schedule.grad_passes(), schedule.passes.len());
            let kept = step_bits(&mut model(&params), &params, &b, &schedule);
            // One model for both modes: each step finds the other's workspace.
            let mut m = model(&params);
            let recomputed = step_bits(&mut m, &params, &b, &schedule.clone().with_recompute(true));
            assert!(kept.0 == recomputed.0, "{what}: metrics or gradient flags differ");
            assert!(kept.1 == recomputed.1, "{what}: gradients differ");
            assert!(kept.2 == recomputed.2, "{what}: token losses differ");
            assert!(kept.1.iter().any(|&g| g != 0), "{what}: no gradient at all");
            let again = step_bits(&mut m, &params, &b, &schedule);
            assert!(kept.1 == again.1, "{what}: kept activations after a recomputed step");
        }
    }
}
