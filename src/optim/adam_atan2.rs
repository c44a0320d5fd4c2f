//! AdamATan2, the optimiser of SPEC §7 (`cuda/adam_atan2.cu`): Adam whose division by
//! `sqrt(v) + eps` is replaced by `atan2`, so there is no epsilon and a zero gradient gives a
//! zero update instead of 0/0.
//!
//! Per element, with `lerp(a, b, w) = a + w * (b - a)` (torch.lerp):
//!
//! ```text
//! p   *= 1 - lr * weight_decay
//! m    = lerp(m, g, 1 - beta1)
//! v    = beta2 * v + (1 - beta2) * g * g
//! p   -= (lr / (1 - beta1^step)) * atan2(m, sqrt(v) / sqrt(1 - beta2^step))
//! ema  = lerp(ema, p, 1 - ema_decay)
//! ```
//!
//! `step` is the tensor's own step count after this step's increment: a tensor without a
//! gradient is skipped entirely and its count does not advance.
//!
//! The CPU reference [`adam_atan2_cpu`] updates one tensor; the optimiser state
//! ([`crate::optim::AdamAtan2`]) calls it once per tensor with a gradient. The GPU launcher
//! [`adam_atan2`] updates every tensor of the master buffer in one launch, reading the
//! per-tensor flags, step counts and the learning rate from device memory
//! ([`AdamDeviceTable`]) so that the step can be captured in a CUDA graph; it also writes the
//! bf16 compute copy.
//!
//! The loss guard ([`LossGuard`], [`adam_atan2_guard`]) lets the trainer look at the loss only
//! at logging steps: a step whose loss sum is not finite sets a sticky flag on the device
//! before its update, and every update from then on is skipped, so the weights, moments, EMA
//! and step counts the trainer finds are those that produced the first non-finite loss.

use std::ops::Range;

use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, DevicePtr, LaunchConfig, PushKernelArg};
use half::bf16;
use rayon::prelude::*;

use crate::config::TrainConfig;
use crate::gpu::{DriverContext, Gpu, GpuError};
use crate::model::spec::{ParamLayout, ALIGN};
use crate::ops::cross_entropy::METRICS_LEN;
use crate::ops::compare::{compare, Tolerance, F32_EPS};
use crate::rng::Rng;
use crate::selftest::{Check, Row};

const FAMILY: &str = "adam_atan2";
const THREADS: u32 = 256;
/// Elements per GPU block: 8 float4 accesses per thread. A multiple of 4 so that every chunk
/// of a tensor starts 16-byte aligned.
pub const CHUNK: usize = 4 * THREADS as usize * 8;

/// The coefficients that stay fixed over a run (SPEC §7 defaults come from [`TrainConfig`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamCoeffs {
    pub beta1: f32,
    pub beta2: f32,
    pub weight_decay: f32,
    pub ema_decay: f32,
}

impl AdamCoeffs {
    pub fn from_config(cfg: &TrainConfig) -> AdamCoeffs {
        AdamCoeffs { beta1: cfg.beta1, beta2: cfg.beta2, weight_decay: cfg.weight_decay, ema_decay: cfg.ema_decay }
    }

    /// The hyper-parameters of one tensor's update at learning rate `lr` and step count `step`.
    pub fn at(&self, lr: f32, step: u32) -> AdamHyper {
        AdamHyper {
            lr,
            beta1: self.beta1,
            beta2: self.beta2,
            weight_decay: self.weight_decay,
            ema_decay: self.ema_decay,
            step,
        }
    }
}

/// Everything one tensor's update needs. `step` is the tensor's count after the increment
/// (1 on its first update).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamHyper {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub weight_decay: f32,
    pub ema_decay: f32,
    pub step: u32,
}

/// torch.lerp: `a + w * (b - a)`, written from `b` when `w >= 0.5` so `lerp(a, b, 1) == b`.
fn lerp(a: f32, b: f32, w: f32) -> f32 {
    let diff = b - a;
    if w.abs() < 0.5 {
        a + w * diff
    } else {
        b - diff * (1.0 - w)
    }
}

/// The per-tensor constants of one step: `(decay, step_size, sqrt_bc2)`. The bias corrections
/// are computed in f64 and rounded to f32, as the kernel does.
fn step_consts(h: &AdamHyper) -> (f32, f32, f32) {
    let step = h.step as f64;
    let decay = 1.0 - h.lr * h.weight_decay;
    let step_size = h.lr / (1.0 - (h.beta1 as f64).powf(step)) as f32;
    let sqrt_bc2 = (1.0 - (h.beta2 as f64).powf(step)).sqrt() as f32;
    (decay, step_size, sqrt_bc2)
}

/// CPU reference: one AdamATan2 update of one tensor, in place.
/// p (master), m, v, ema: [n] fp32, updated; g: [n] fp32. `hyper.step >= 1`.
pub fn adam_atan2_cpu(p: &mut [f32], m: &mut [f32], v: &mut [f32], ema: &mut [f32], g: &[f32], n: usize, hyper: &AdamHyper) {
    assert!(p.len() == n && m.len() == n && v.len() == n && ema.len() == n && g.len() == n, "adam_atan2_cpu: every buffer must hold n = {n} elements");
    assert!(hyper.step >= 1, "adam_atan2_cpu: step counts start at 1 (the count after the increment)");
    let (decay, step_size, sqrt_bc2) = step_consts(hyper);
    let (beta1, beta2, ema_decay) = (hyper.beta1, hyper.beta2, hyper.ema_decay);
    // Chunks of 16K elements spread over rayon's threads; each element is independent.
    const PAR: usize = 1 << 14;
    p.par_chunks_mut(PAR)
        .zip(m.par_chunks_mut(PAR))
        .zip(v.par_chunks_mut(PAR))
        .zip(ema.par_chunks_mut(PAR))
        .zip(g.par_chunks(PAR))
        .for_each(|((((p, m), v), ema), g)| {
            for i in 0..p.len() {
                p[i] *= decay;
                m[i] = lerp(m[i], g[i], 1.0 - beta1);
                v[i] = beta2 * v[i] + (1.0 - beta2) * g[i] * g[i];
                p[i] -= step_size * m[i].atan2(v[i].sqrt() / sqrt_bc2);
                ema[i] = lerp(ema[i], p[i], 1.0 - ema_decay);
            }
        });
}

/// The loss guard: whether updates are being skipped since a step's loss sum was not finite,
/// and how many steps with a finite loss sum came before (since the count was last cleared).
/// [`LossGuard::observe`] is the CPU reference of `adam_atan2_guard`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LossGuard {
    pub skip: bool,
    pub finite_steps: u32,
}

impl LossGuard {
    /// One step's loss sum: counted while finite; the first one that is not sets `skip` for
    /// good (until the caller resets the guard).
    pub fn observe(&mut self, loss_sum: f64) {
        if self.skip {
            return;
        }
        if loss_sum.is_finite() {
            self.finite_steps += 1;
        } else {
            self.skip = true;
        }
    }
}

/// The device-side tables one fused step reads. The chunk table is fixed by the layout; the
/// per-step inputs (`has_grad`, `lr`) are written before each step by [`Self::set_step`]
/// (before the launch of a captured step); `steps` is advanced by the launch itself and the
/// loss guard by [`adam_atan2_guard`].
pub struct AdamDeviceTable {
    /// [n_chunks] i64: first element of each chunk in the master buffer.
    chunk_begin: CudaSlice<i64>,
    /// [n_chunks] i64: one past the last element of each chunk.
    chunk_end: CudaSlice<i64>,
    /// [n_chunks] i32: the tensor each chunk belongs to.
    chunk_tensor: CudaSlice<i32>,
    /// [n_tensors] i32: 1 when the tensor received a gradient this step, else 0.
    pub has_grad: CudaSlice<i32>,
    /// [n_tensors] i32: each tensor's step count (after the last update).
    pub steps: CudaSlice<i32>,
    /// [1] fp32: this step's learning rate.
    pub lr: CudaSlice<f32>,
    /// [2] i32: the [`LossGuard`] as {skip, finite_steps}.
    guard: CudaSlice<i32>,
    /// Length of the master buffer every launch must be given.
    pub master_len: usize,
}

impl AdamDeviceTable {
    /// The table of every trainable tensor of `layout`, in `layout.trainable()` order, starting
    /// from the step counts `steps` (zeros for a fresh optimiser).
    pub fn for_layout(gpu: &Gpu, layout: &ParamLayout, steps: &[u32]) -> Result<AdamDeviceTable, GpuError> {
        let ranges: Vec<Range<usize>> = layout.trainable().map(|t| t.range().expect("trainable tensors have offsets")).collect();
        AdamDeviceTable::new(gpu, &ranges, layout.master_len, steps)
    }

    /// The table of the tensors at `ranges` of a buffer of `master_len` elements. Each range
    /// must start at a multiple of [`ALIGN`] elements; `steps` has one count per range.
    pub fn new(gpu: &Gpu, ranges: &[Range<usize>], master_len: usize, steps: &[u32]) -> Result<AdamDeviceTable, GpuError> {
        assert_eq!(ranges.len(), steps.len(), "AdamDeviceTable: one step count per tensor");
        let (mut begin, mut end, mut tensor) = (Vec::new(), Vec::new(), Vec::new());
        for (t, r) in ranges.iter().enumerate() {
            assert!(r.start % ALIGN == 0 && r.end <= master_len, "AdamDeviceTable: tensor {t} at {r:?} is unaligned or outside the buffer");
            for start in r.clone().step_by(CHUNK) {
                begin.push(start as i64);
                end.push((start + CHUNK).min(r.end) as i64);
                tensor.push(t as i32);
            }
        }
        let steps: Vec<i32> = steps.iter().map(|&s| i32::try_from(s).expect("step count fits i32")).collect();
        let s = &gpu.stream;
        Ok(AdamDeviceTable {
            chunk_begin: s.clone_htod(&begin).during("uploading the AdamATan2 chunk table")?,
            chunk_end: s.clone_htod(&end).during("uploading the AdamATan2 chunk table")?,
            chunk_tensor: s.clone_htod(&tensor).during("uploading the AdamATan2 chunk table")?,
            has_grad: s.alloc_zeros(ranges.len()).during("allocating the AdamATan2 flags")?,
            steps: s.clone_htod(&steps).during("uploading the AdamATan2 step counts")?,
            lr: s.alloc_zeros(1).during("allocating the AdamATan2 learning rate")?,
            guard: s.alloc_zeros(2).during("allocating the AdamATan2 loss guard")?,
            master_len,
        })
    }

    /// Writes this step's inputs: which tensors have a gradient (indexed like the ranges the
    /// table was built from) and the learning rate.
    pub fn set_step(&mut self, gpu: &Gpu, has_grad: &[bool], lr: f32) -> Result<(), GpuError> {
        assert_eq!(has_grad.len(), self.has_grad.len(), "AdamDeviceTable::set_step: one flag per tensor");
        let flags: Vec<i32> = has_grad.iter().map(|&b| i32::from(b)).collect();
        gpu.stream.memcpy_htod(&flags, &mut self.has_grad).during("uploading the AdamATan2 flags")?;
        gpu.stream.memcpy_htod(&[lr], &mut self.lr).during("uploading the learning rate")?;
        Ok(())
    }

    /// The loss guard (synchronises).
    pub fn read_guard(&self, gpu: &Gpu) -> Result<LossGuard, GpuError> {
        let g = gpu.stream.clone_dtoh(&self.guard).during("downloading the AdamATan2 loss guard")?;
        Ok(LossGuard { skip: g[0] != 0, finite_steps: g[1] as u32 })
    }

    /// Overwrites the loss guard (stream-ordered: it applies to the steps launched after).
    pub fn write_guard(&mut self, gpu: &Gpu, guard: LossGuard) -> Result<(), GpuError> {
        let host = [i32::from(guard.skip), guard.finite_steps as i32];
        gpu.stream.memcpy_htod(&host, &mut self.guard).during("uploading the AdamATan2 loss guard")
    }

    /// Overwrites the per-tensor step counts (a state loaded into existing buffers).
    pub fn write_steps(&mut self, gpu: &Gpu, steps: &[u32]) -> Result<(), GpuError> {
        assert_eq!(steps.len(), self.steps.len(), "AdamDeviceTable::write_steps: one count per tensor");
        let host: Vec<i32> = steps.iter().map(|&s| i32::try_from(s).expect("step count fits i32")).collect();
        gpu.stream.memcpy_htod(&host, &mut self.steps).during("uploading the AdamATan2 step counts")
    }

    /// The per-tensor step counts, for checkpoints.
    pub fn download_steps(&self, gpu: &Gpu) -> Result<Vec<u32>, GpuError> {
        let steps = gpu.stream.clone_dtoh(&self.steps).during("downloading the AdamATan2 step counts")?;
        Ok(steps.into_iter().map(|s| s as u32).collect())
    }

    fn n_chunks(&self) -> usize {
        self.chunk_tensor.len()
    }
}

/// The loss guard's step (see [`LossGuard::observe`]): reads this step's metric sums
/// (`[METRICS_LEN]` fp64, the loss sum first, as [`crate::ops::cross_entropy::metrics`] writes
/// them) and updates `table`'s guard, which the following [`adam_atan2`] launch reads.
pub fn adam_atan2_guard(gpu: &Gpu, table: &mut AdamDeviceTable, sums: &CudaView<f64>) -> Result<(), GpuError> {
    assert_eq!(sums.len(), METRICS_LEN, "adam_atan2_guard: the metric sums hold {METRICS_LEN} values");
    let func = gpu.function(FAMILY, "adam_atan2_guard")?;
    let mut args = gpu.stream.launch_builder(&func);
    args.arg(&mut table.guard).arg(sums);
    let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (1, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: one thread reads sums[0] (the view holds METRICS_LEN values) and updates the two
    // i32 of the guard.
    unsafe { args.launch(cfg) }.during("adam_atan2_guard")?;
    Ok(())
}

/// One fused AdamATan2 step over every tensor of `table` (see the module doc), then the bf16
/// compute copy of each updated tensor; nothing at all while the table's loss guard skips.
/// p (master), m, v, ema: [N] fp32, updated; g: [N] fp32; p_bf16: [N] bf16, written for tensors
/// with a gradient; N = `table.master_len`. fp32 buffers 16-byte aligned, p_bf16 8-byte aligned.
#[allow(clippy::too_many_arguments)]
pub fn adam_atan2(
    gpu: &Gpu,
    p: &mut CudaViewMut<f32>,
    m: &mut CudaViewMut<f32>,
    v: &mut CudaViewMut<f32>,
    ema: &mut CudaViewMut<f32>,
    g: &CudaView<f32>,
    p_bf16: &mut CudaViewMut<bf16>,
    table: &mut AdamDeviceTable,
    coeffs: &AdamCoeffs,
) -> Result<(), GpuError> {
    let n = table.master_len;
    assert!(
        p.len() == n && m.len() == n && v.len() == n && ema.len() == n && g.len() == n && p_bf16.len() == n,
        "adam_atan2: every buffer must hold the table's {n} elements"
    );
    assert!(
        aligned(gpu, p, 16) && aligned(gpu, m, 16) && aligned(gpu, v, 16) && aligned(gpu, ema, 16) && aligned(gpu, g, 16) && aligned(gpu, p_bf16, 8),
        "adam_atan2: fp32 buffers must be 16-byte aligned and p_bf16 8-byte aligned"
    );
    let n_tensors = table.steps.len() as i32;
    if n_tensors == 0 {
        return Ok(());
    }

    let count = gpu.function(FAMILY, "adam_atan2_count_steps")?;
    let cfg = LaunchConfig { grid_dim: ((n_tensors as u32).div_ceil(THREADS), 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
    let mut args = gpu.stream.launch_builder(&count);
    args.arg(&mut table.steps).arg(&table.has_grad).arg(&table.guard).arg(&n_tensors);
    // SAFETY: steps and has_grad hold n_tensors i32 each, guard 2; threads past n_tensors return.
    unsafe { args.launch(cfg) }.during("adam_atan2_count_steps")?;

    if table.n_chunks() == 0 {
        return Ok(());
    }
    let update = gpu.function(FAMILY, "adam_atan2_update")?;
    let cfg = LaunchConfig { grid_dim: (table.n_chunks() as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
    let mut args = gpu.stream.launch_builder(&update);
    args.arg(p).arg(m).arg(v).arg(ema).arg(g).arg(p_bf16);
    args.arg(&table.chunk_begin).arg(&table.chunk_end).arg(&table.chunk_tensor);
    args.arg(&table.has_grad).arg(&table.steps).arg(&table.lr).arg(&table.guard);
    args.arg(&coeffs.beta1).arg(&coeffs.beta2).arg(&coeffs.weight_decay).arg(&coeffs.ema_decay);
    // SAFETY: one block per chunk; every chunk range lies inside [0, N) (checked when the table
    // was built) and every buffer holds N elements of the type the kernel expects (asserted
    // above); chunk starts are multiples of 4 elements, so the vector accesses are aligned.
    unsafe { args.launch(cfg) }.during("adam_atan2_update")?;
    Ok(())
}

fn aligned<T>(gpu: &Gpu, buf: &impl DevicePtr<T>, bytes: u64) -> bool {
    let (ptr, _sync) = buf.device_ptr(&gpu.stream);
    ptr % bytes == 0
}

pub fn selftests() -> Vec<Check> {
    vec![Check { name: "adam_atan2", run: check_adam_atan2 }, Check { name: "adam_atan2_guard", run: check_guard }]
}

/// One selftest case: tensor sizes (odd sizes, chunk boundaries, a multi-chunk tensor) and the
/// scale of the gradients and moments.
struct Case {
    sizes: &'static [usize],
    grad_scale: f32,
}

const CASES: [Case; 2] = [
    Case { sizes: &[1, 3, 64, CHUNK - 1, CHUNK, CHUNK + 5, 100_003, (1 << 20) + 7], grad_scale: 1.0 },
    Case { sizes: &[7, CHUNK + 1, 50_001], grad_scale: 1e4 },
];

/// Runs one optimiser step on the GPU and on the CPU from the same random state, with random
/// per-tensor step counts (0 = first update) and random gradient flags, and compares every
/// output. The compute copy is NaN-poisoned for tensors with a gradient and holds the old
/// weights' bf16 elsewhere, so unwritten and wrongly written elements both show.
fn check_adam_atan2(gpu: &Gpu, rng: &mut Rng) -> Result<Vec<Row>, GpuError> {
    let mut rows = Vec::new();
    for case in &CASES {
        // Tensors at ALIGN offsets with a gap of padding after each, as in the master layout.
        let mut ranges = Vec::new();
        let mut cursor = 0;
        for &n in case.sizes {
            ranges.push(cursor..cursor + n);
            cursor = (cursor + n + 1).div_ceil(ALIGN) * ALIGN;
        }
        let len = cursor;
        let coeffs = AdamCoeffs { beta1: 0.9, beta2: 0.95, weight_decay: 0.1, ema_decay: 0.99 };
        let lr = (1e-3 + 9e-3 * rng.uniform()) as f32;
        let steps: Vec<u32> = ranges.iter().map(|_| [0, 1, 2, 9, 10_000][rng.below(5) as usize]).collect();
        let mut has_grad: Vec<bool> = ranges.iter().map(|_| rng.below(4) != 0).collect();
        // At least one tensor of each kind.
        has_grad[0] = false;
        has_grad[1] = true;

        let s = case.grad_scale;
        let p0 = rng.uniform_vec(len, 1.0);
        let m0 = rng.uniform_vec(len, s);
        let v0: Vec<f32> = rng.uniform_vec(len, s * s).into_iter().map(f32::abs).collect();
        let ema0 = rng.uniform_vec(len, 1.0);
        let g = rng.uniform_vec(len, s);

        // CPU reference, tensor by tensor.
        let (mut p, mut m, mut v, mut ema) = (p0.clone(), m0.clone(), v0.clone(), ema0.clone());
        let mut want_steps = steps.clone();
        let mut max_step_size = 0.0f32;
        for (t, r) in ranges.iter().enumerate().filter(|(t, _)| has_grad[*t]) {
            want_steps[t] += 1;
            let h = coeffs.at(lr, want_steps[t]);
            max_step_size = max_step_size.max(step_consts(&h).1);
            let n = r.len();
            adam_atan2_cpu(&mut p[r.clone()], &mut m[r.clone()], &mut v[r.clone()], &mut ema[r.clone()], &g[r.clone()], n, &h);
        }

        // GPU.
        let mut poisoned: Vec<bf16> = p0.iter().map(|&x| bf16::from_f32(x)).collect();
        for r in ranges.iter().enumerate().filter(|(t, _)| has_grad[*t]).map(|(_, r)| r) {
            poisoned[r.clone()].fill(bf16::NAN);
        }
        let st = &gpu.stream;
        let mut d_p = st.clone_htod(&p0).during("upload p")?;
        let mut d_m = st.clone_htod(&m0).during("upload m")?;
        let mut d_v = st.clone_htod(&v0).during("upload v")?;
        let mut d_ema = st.clone_htod(&ema0).during("upload ema")?;
        let d_g = st.clone_htod(&g).during("upload g")?;
        let mut d_bf16 = st.clone_htod(&poisoned).during("poison p_bf16")?;
        let mut table = AdamDeviceTable::new(gpu, &ranges, len, &steps)?;
        table.set_step(gpu, &has_grad, lr)?;
        adam_atan2(
            gpu,
            &mut d_p.as_view_mut(),
            &mut d_m.as_view_mut(),
            &mut d_v.as_view_mut(),
            &mut d_ema.as_view_mut(),
            &d_g.as_view(),
            &mut d_bf16.as_view_mut(),
            &mut table,
            &coeffs,
        )?;
        let got_p = st.clone_dtoh(&d_p).during("download p")?;
        let got_m = st.clone_dtoh(&d_m).during("download m")?;
        let got_v = st.clone_dtoh(&d_v).during("download v")?;
        let got_ema = st.clone_dtoh(&d_ema).during("download ema")?;
        let got_bf16 = st.clone_dtoh(&d_bf16).during("download p_bf16")?;
        let got_steps = table.download_steps(gpu)?;

        // Tolerances, in f32 epsilons (the kernel contracts a*b+c into FMAs, the CPU does not):
        // - m, ema: a lerp of inputs of size `s` (ema: 1) rounds twice: 4 eps of the input scale.
        // - v: a sum of two positive products, 3 roundings: 4 eps relative.
        // - p: the decay rounds twice (2 eps of |p|); the update's angle has <= 3 ulp from CUDA's
        //   atan2f plus ~2 eps from its rounded inputs, times step_size <= max_step_size, and
        //   |angle| <= pi/2: 8 eps * max_step_size * pi/2 absolute.
        let shape = format!("{} tensors, |g|<{s:.0e}", ranges.len());
        let eps = F32_EPS;
        let tol_p = Tolerance { abs: 8.0 * eps * max_step_size * std::f32::consts::FRAC_PI_2, rel: 4.0 * eps };
        rows.push(Row::new("adam_atan2 p", shape.clone(), tol_p, compare(&got_p, &p, tol_p)));
        let tol_m = Tolerance { abs: 4.0 * eps * s, rel: 4.0 * eps };
        rows.push(Row::new("adam_atan2 m", shape.clone(), tol_m, compare(&got_m, &m, tol_m)));
        let tol_v = Tolerance { abs: f32::MIN_POSITIVE, rel: 4.0 * eps };
        rows.push(Row::new("adam_atan2 v", shape.clone(), tol_v, compare(&got_v, &v, tol_v)));
        let tol_ema = Tolerance { abs: 4.0 * eps, rel: 4.0 * eps };
        rows.push(Row::new("adam_atan2 ema", shape.clone(), tol_ema, compare(&got_ema, &ema, tol_ema)));

        // The compute copy must be exactly the rounding of the GPU's own master weights where
        // a tensor was updated, and untouched elsewhere.
        let exact = Tolerance { abs: 0.0, rel: 0.0 };
        let mut want_bf16 = poisoned.clone();
        for r in ranges.iter().enumerate().filter(|(t, _)| has_grad[*t]).map(|(_, r)| r) {
            for i in r.clone() {
                want_bf16[i] = bf16::from_f32(got_p[i]);
            }
        }
        // Padding keeps its poison on both sides; compare only tensor elements.
        let in_tensors = |buf: &[bf16]| ranges.iter().flat_map(|r| buf[r.clone()].iter().map(|x| x.to_f32())).collect::<Vec<f32>>();
        rows.push(Row::new("adam_atan2 p_bf16", shape.clone(), exact, compare(&in_tensors(&got_bf16), &in_tensors(&want_bf16), exact)));
        let as_f32 = |s: &[u32]| s.iter().map(|&x| x as f32).collect::<Vec<f32>>();
        rows.push(Row::new("adam_atan2 steps", shape, exact, compare(&as_f32(&got_steps), &as_f32(&want_steps), exact)));
    }
    Ok(rows)
}

/// The loss guard on the device against [`LossGuard::observe`]: loss sums finite, NaN, then
/// finite again; after the NaN every update must leave every buffer exactly as it was, and
/// after the guard is cleared the update applies again.
fn check_guard(gpu: &Gpu, rng: &mut Rng) -> Result<Vec<Row>, GpuError> {
    let (ranges, len) = (vec![0..100, 128..1000], 1024);
    let coeffs = AdamCoeffs { beta1: 0.9, beta2: 0.95, weight_decay: 0.1, ema_decay: 0.99 };
    let st = &gpu.stream;
    let mut p = st.clone_htod(&rng.uniform_vec(len, 1.0)).during("upload p")?;
    let mut m = st.clone_htod(&rng.uniform_vec(len, 1.0)).during("upload m")?;
    let mut v = st.clone_htod(&vec![0.5f32; len]).during("upload v")?;
    let mut ema = st.clone_htod(&rng.uniform_vec(len, 1.0)).during("upload ema")?;
    let g = st.clone_htod(&rng.uniform_vec(len, 1.0)).during("upload g")?;
    let mut p_bf16 = st.alloc_zeros::<bf16>(len).during("allocate p_bf16")?;
    let mut table = AdamDeviceTable::new(gpu, &ranges, len, &[3, 5])?;
    table.set_step(gpu, &[true, true], 1e-3)?;
    let state = |p: &CudaSlice<f32>, m: &CudaSlice<f32>, v: &CudaSlice<f32>, ema: &CudaSlice<f32>, table: &AdamDeviceTable| -> Result<Vec<f32>, GpuError> {
        let mut all = Vec::new();
        for buf in [p, m, v, ema] {
            all.extend(st.clone_dtoh(buf).during("download the optimiser state")?);
        }
        all.extend(table.download_steps(gpu)?.iter().map(|&s| s as f32));
        Ok(all)
    };
    let exact = Tolerance { abs: 0.0, rel: 0.0 };
    let (mut rows, mut want) = (Vec::new(), LossGuard::default());
    for (i, loss_sum) in [1.5, f64::NAN, 2.0, f64::INFINITY].into_iter().enumerate() {
        let before = state(&p, &m, &v, &ema, &table)?;
        let sums = st.clone_htod(&[loss_sum, 1.0, 0.0, 0.0, 1.0]).during("upload the sums")?;
        adam_atan2_guard(gpu, &mut table, &sums.as_view())?;
        adam_atan2(gpu, &mut p.as_view_mut(), &mut m.as_view_mut(), &mut v.as_view_mut(), &mut ema.as_view_mut(), &g.as_view(), &mut p_bf16.as_view_mut(), &mut table, &coeffs)?;
        want.observe(loss_sum);
        let got = table.read_guard(gpu)?;
        let shape = format!("step {}, loss sum {loss_sum}", i + 1);
        let as_f32 = |g: LossGuard| [g.skip as u32 as f32, g.finite_steps as f32];
        rows.push(Row::new("adam_atan2_guard state", &shape, exact, compare(&as_f32(got), &as_f32(want), exact)));
        if want.skip {
            let after = state(&p, &m, &v, &ema, &table)?;
            rows.push(Row::new("adam_atan2_guard skipped update", &shape, exact, compare(&after, &before, exact)));
        }
    }
    // Cleared, the update applies again: the step counts advance.
    table.write_guard(gpu, LossGuard::default())?;
    adam_atan2(gpu, &mut p.as_view_mut(), &mut m.as_view_mut(), &mut v.as_view_mut(), &mut ema.as_view_mut(), &g.as_view(), &mut p_bf16.as_view_mut(), &mut table, &coeffs)?;
    let steps: Vec<f32> = table.download_steps(gpu)?.iter().map(|&s| s as f32).collect();
    rows.push(Row::new("adam_atan2_guard cleared", "step counts", exact, compare(&steps, &[5.0, 7.0], exact)));
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guard_counts_finite_losses_and_latches() {
        let mut g = LossGuard::default();
        for loss in [1.0, 2.0, f64::NAN, 3.0, f64::INFINITY] {
            g.observe(loss);
        }
        assert_eq!(g, LossGuard { skip: true, finite_steps: 2 });
    }

    fn hyper(lr: f32, step: u32) -> AdamHyper {
        AdamCoeffs { beta1: 0.9, beta2: 0.95, weight_decay: 0.1, ema_decay: 0.9999 }.at(lr, step)
    }

    #[test]
    fn first_step_matches_hand_computation() {
        // p = 1, m = v = 0, ema = 1, g = 0.5, lr = 0.01, step 1:
        //   p = 1 * (1 - 0.01 * 0.1)                         = 0.999
        //   m = 0.1 * 0.5 = 0.05;  v = 0.05 * 0.25           = 0.0125
        //   denom = sqrt(0.0125) / sqrt(1 - 0.95)            = 0.5
        //   p -= (0.01 / (1 - 0.9)) * atan2(0.05, 0.5)       = 0.1 * 0.0996687
        //   ema = 1 + 1e-4 * (p - 1)
        let (mut p, mut m, mut v, mut ema) = ([1.0f32], [0.0f32], [0.0f32], [1.0f32]);
        adam_atan2_cpu(&mut p, &mut m, &mut v, &mut ema, &[0.5], 1, &hyper(0.01, 1));
        let want_p = 0.999 - 0.1 * 0.05f64.atan2(0.5);
        assert!((p[0] as f64 - want_p).abs() < 1e-6, "p {} want {want_p}", p[0]);
        assert!((m[0] - 0.05).abs() < 1e-7 && (v[0] - 0.0125).abs() < 1e-8);
        let want_ema = 1.0 + 1e-4 * (want_p - 1.0);
        assert!((ema[0] as f64 - want_ema).abs() < 1e-6, "ema {} want {want_ema}", ema[0]);
    }

    #[test]
    fn zero_gradient_only_decays() {
        // atan2(0, 0) = 0: no NaN from 0/0, the weight only decays.
        let (mut p, mut m, mut v, mut ema) = ([2.0f32; 3], [0.0f32; 3], [0.0f32; 3], [2.0f32; 3]);
        adam_atan2_cpu(&mut p, &mut m, &mut v, &mut ema, &[0.0; 3], 3, &hyper(0.5, 1));
        assert_eq!(p, [2.0 * 0.95; 3]);
        assert_eq!((m, v), ([0.0; 3], [0.0; 3]));
    }

    #[test]
    fn late_steps_lose_their_bias_correction() {
        // At step 10^4 both corrections are 1 to f32 precision: the update is lr * atan2(m, sqrt(v)).
        let (mut p, mut m, mut v, mut ema) = ([0.0f32], [0.3f32], [0.04f32], [0.0f32]);
        let h = AdamHyper { weight_decay: 0.0, ..hyper(0.01, 10_000) };
        adam_atan2_cpu(&mut p, &mut m, &mut v, &mut ema, &[0.3], 1, &h);
        let v_new = 0.95f64 * 0.04 + 0.05 * 0.09;
        let want = -0.01 * 0.3f64.atan2(v_new.sqrt());
        assert!((p[0] as f64 - want).abs() < 1e-8, "p {} want {want}", p[0]);
    }

    #[test]
    fn lerp_is_exact_at_the_ends() {
        assert_eq!(lerp(3.0, 7.0, 0.0), 3.0);
        assert_eq!(lerp(3.0, 7.0, 1.0), 7.0);
        assert_eq!(lerp(1e8, 1.0, 1.0), 1.0);
    }
}
