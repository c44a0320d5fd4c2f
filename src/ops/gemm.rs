//! The linear layers: `y = x @ w^T (+ residual)` and its two backward products.
//!
//! Weights are stored as PyTorch's `nn.Linear` does, `w [N, K]` (out features, in features),
//! all row-major:
//!
//! ```text
//! forward      y  [T,N]  = x [T,K] @ w^T            (+ residual [T,N])
//! input grad   dx [T,K] (+)= dy [T,N] @ w [N,K]
//! weight grad  dw [N,K] (+)= dy^T [N,T] @ x [T,K]    (accumulated, or written by the first
//!                                                    contribution of a step)
//! ```
//!
//! The CPU reference calls `matrixmultiply`'s blocked, multi-threaded sgemm.
//!
//! On the GPU the three products go through cuBLASLt: bf16 inputs, fp32 accumulation
//! (`CUBLAS_COMPUTE_32F`), bf16 `y`/`dx` and fp32 `dw`. cuBLASLt computes
//! `D = alpha * op(A) op(B) + beta * C` on column-major matrices; a row-major `[R, C]`
//! buffer is the column-major `[C, R]` matrix, its transpose, so each product is computed
//! transposed (m, n, k below are cuBLASLt's):
//!
//! ```text
//! forward      y^T  [N,T] = w  [N,K] (A = w stored [K,N], op T) @ x^T [K,T] (B = x, op N)
//!              m = N, n = T, k = K;  C = residual (beta = 1) or none (beta = 0), D = y
//! input grad   dx^T [K,T] = w^T [K,N] (A = w, op N) @ dy^T [N,T] (B = dy, op N)
//!              m = K, n = T, k = N;  D = dx, beta = 0
//! weight grad  dw^T [K,N] = x^T [K,T] (A = x, op N) @ dy [T,N] (B = dy stored [N,T], op T)
//!              m = K, n = N, k = T;  C = D = dw (fp32), beta = 1
//! ```
//!
//! Descriptors, layouts and the algorithm list come from cuBLASLt's heuristic once per
//! shape and are cached in a [`GemmCache`] that the caller creates once and keeps.
//!
//! The heuristic's first choice is not always the fastest of its own list: on an H200 it
//! missed the best of 8 by 5.5-7.9% on four XL shapes (`docs/perf.md`). So when a shape's
//! plan is built the cache times every candidate on scratch operands of that shape (random
//! values, CUDA events, interleaved rounds, the median of each) and keeps the fastest. Call
//! [`GemmCache::prepare`] with the model's shapes at set-up so that this happens before the
//! first step; a shape first met later is tuned on its first call, once.
//!
//! The choice depends on timings, so two processes may pick different algorithms for one
//! shape, which round differently: bitwise-equal reruns need the same choice, which
//! [`GemmCache::chosen_algorithm`] reports and [`GemmCache::choose_algorithm`] sets. A
//! training checkpoint records every shape's choice ([`GemmCache::choices`], as
//! [`GemmChoice`]s), and `--resume` runs them again ([`GemmCache::preset_choices`]: a shape
//! with a preset choice is not tuned); so do fresh runs, from the algorithms earlier runs on the
//! same GPU and library recorded (`train::gemm_store`).

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use cudarc::cublaslt::result as lt;
use cudarc::cublaslt::sys;
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaEvent, CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, DeviceRepr};
use half::bf16;
use serde::{Deserialize, Serialize};

use crate::gpu::{DriverContext, Gpu, GpuError};
use crate::ops::check::{bf16_inputs, download, download_bf16, poisoned_bf16, poisoned_f32, upload, upload_bf16};
use crate::ops::compare::{compare, Tolerance, BF16_EPS};
use crate::ops::shape::{as_i32, expect_aligned16, expect_len};
use crate::rng::Rng;
use crate::selftest::{Check, Row};

/// `y [T,N] = x [T,K] @ w [N,K]^T + residual [T,N]` (no residual: plain product).
pub fn linear_fwd_cpu(y: &mut [f32], x: &[f32], w: &[f32], residual: Option<&[f32]>, t: usize, n: usize, k: usize) {
    const OP: &str = "linear_fwd_cpu";
    expect_len(OP, "y", y.len(), &[("T", t), ("N", n)]);
    expect_len(OP, "x", x.len(), &[("T", t), ("K", k)]);
    expect_len(OP, "w", w.len(), &[("N", n), ("K", k)]);
    let beta = match residual {
        Some(r) => {
            expect_len(OP, "residual", r.len(), &[("T", t), ("N", n)]);
            y.copy_from_slice(r);
            1.0
        }
        None => 0.0,
    };
    // w^T is w read with row stride 1 and column stride K.
    sgemm(t, k, n, x, (k, 1), w, (1, k), beta, y);
}

/// `dx [T,K] = dy [T,N] @ w [N,K]`, written with `=` (activation gradients never accumulate
/// in a GEMM; the residual stream's `+=` happens in `rmsnorm_bwd`).
pub fn linear_bwd_input_cpu(dx: &mut [f32], dy: &[f32], w: &[f32], t: usize, n: usize, k: usize) {
    const OP: &str = "linear_bwd_input_cpu";
    expect_len(OP, "dx", dx.len(), &[("T", t), ("K", k)]);
    expect_len(OP, "dy", dy.len(), &[("T", t), ("N", n)]);
    expect_len(OP, "w", w.len(), &[("N", n), ("K", k)]);
    sgemm(t, n, k, dy, (n, 1), w, (k, 1), 0.0, dx);
}

/// `dw [N,K] += dy [T,N]^T @ x [T,K]`.
/// `dw [N,K] += dy^T [N,T] @ x [T,K]` with `accumulate`, else `=` (what dw held, NaN
/// included, is ignored).
pub fn linear_bwd_weight_cpu(dw: &mut [f32], dy: &[f32], x: &[f32], t: usize, n: usize, k: usize, accumulate: bool) {
    const OP: &str = "linear_bwd_weight_cpu";
    expect_len(OP, "dw", dw.len(), &[("N", n), ("K", k)]);
    expect_len(OP, "dy", dy.len(), &[("T", t), ("N", n)]);
    expect_len(OP, "x", x.len(), &[("T", t), ("K", k)]);
    // dy^T is dy read with row stride 1 and column stride N.
    sgemm(n, t, k, dy, (1, n), x, (k, 1), if accumulate { 1.0 } else { 0.0 }, dw);
}

/// `c [M,N] = a [M,K] @ b [K,N] + beta * c` with `a` and `b` given as (row stride, column
/// stride) views and `c` row-major; `beta = 0` ignores what `c` held (NaN included).
#[allow(clippy::too_many_arguments)]
fn sgemm(m: usize, k: usize, n: usize, a: &[f32], a_strides: (usize, usize), b: &[f32], b_strides: (usize, usize), beta: f32, c: &mut [f32]) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        // An empty sum: c = beta * c, with beta = 0 overwriting whatever was there.
        c.iter_mut().for_each(|v| *v = if beta == 0.0 { 0.0 } else { *v * beta });
        return;
    }
    // SAFETY: the callers checked that `a` holds the [m,k] view, `b` the [k,n] view (the
    // largest index reached is (rows-1)*row_stride + (cols-1)*col_stride < len for the
    // strides used above) and `c` exactly m*n elements; `c` does not alias `a` or `b`
    // (it is a `&mut`).
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            1.0,
            a.as_ptr(),
            a_strides.0 as isize,
            a_strides.1 as isize,
            b.as_ptr(),
            b_strides.0 as isize,
            b_strides.1 as isize,
            beta,
            c.as_mut_ptr(),
            n as isize,
            1,
        );
    }
}

/// Which product of a linear layer (the three layouts of the module doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GemmOp {
    /// `y [T,N] = x [T,K] @ w [N,K]^T`, bf16 out (beta = 0).
    Forward,
    /// `y [T,N] = residual [T,N] + x [T,K] @ w [N,K]^T`, bf16 out (C = residual, beta = 1);
    /// a plan of its own because reading C can change which algorithm is fastest.
    ForwardResidual,
    /// `dx [T,K] (+)= dy [T,N] @ w [N,K]`, bf16 out.
    BackwardInput,
    /// `dw [N,K] += dy [T,N]^T @ x [T,K]`, fp32 out.
    BackwardWeight,
}

/// The key of a cached plan: the product and its row-major sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GemmShape {
    pub op: GemmOp,
    pub t: usize,
    pub n: usize,
    pub k: usize,
}

/// A shape's algorithm as a checkpoint records it: its index in the heuristic's list (which
/// depends on the GPU and the cuBLASLt version, not on timings).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct GemmChoice {
    pub op: GemmOp,
    pub t: usize,
    pub n: usize,
    pub k: usize,
    pub algorithm: usize,
}

impl GemmChoice {
    fn new(shape: GemmShape, algorithm: usize) -> GemmChoice {
        GemmChoice { op: shape.op, t: shape.t, n: shape.n, k: shape.k, algorithm }
    }

    fn shape(&self) -> GemmShape {
        GemmShape { op: self.op, t: self.t, n: self.n, k: self.k }
    }
}

impl std::fmt::Display for GemmShape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?} [T={}, N={}, K={}]", self.op, self.t, self.n, self.k)
    }
}

impl GemmShape {
    /// The three products of a linear layer `y [T,N] = x [T,K] @ w [N,K]^T (+ residual)`:
    /// forward, input gradient, weight gradient; for [`GemmCache::prepare`].
    pub fn linear_layer(t: usize, n: usize, k: usize, residual: bool) -> [GemmShape; 3] {
        let forward = if residual { GemmOp::ForwardResidual } else { GemmOp::Forward };
        [forward, GemmOp::BackwardInput, GemmOp::BackwardWeight].map(|op| GemmShape { op, t, n, k })
    }

    /// Multiply-adds times two.
    pub fn flops(&self) -> f64 {
        2.0 * self.t as f64 * self.n as f64 * self.k as f64
    }
}

/// cuBLASLt's workspace: 32 MiB, NVIDIA's recommendation for Hopper.
const WORKSPACE_BYTES: usize = 32 << 20;
/// How many algorithms to ask the heuristic for (best first); the tuner times them all.
const MAX_ALGORITHMS: usize = 8;
const OP_N: i32 = 0;
const OP_T: i32 = 1;

/// Autotuning: untimed runs of each candidate first, then `TUNE_ROUNDS` rounds that each
/// time every candidate `TUNE_RUNS` times. Interleaving the candidates spreads clock and
/// temperature drift over all of them instead of penalising the last ones; the median of
/// the 9 samples is robust to a stray slow run. For the largest XL shape (the LM head's
/// 4096-row chunk, ~1.2 ms a product) the 8 candidates cost about 0.1 s, once.
const TUNE_WARMUP: usize = 2;
const TUNE_ROUNDS: usize = 3;
const TUNE_RUNS: usize = 3;
/// Tuning allocates the shape's operands; it is skipped (the heuristic's first choice is
/// kept) when they would take more than this share of the free device memory.
const TUNE_MAX_FREE_SHARE: f64 = 0.5;

/// One shape's descriptors and the heuristic's algorithms, best first.
struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    a: sys::cublasLtMatrixLayout_t,
    b: sys::cublasLtMatrixLayout_t,
    /// Shared by C and D.
    cd: sys::cublasLtMatrixLayout_t,
    algorithms: Vec<sys::cublasLtMatmulHeuristicResult_t>,
    /// The algorithm in use: the tuner's fastest, or whatever `choose_algorithm` set.
    choice: usize,
}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: each handle was created by cuBLASLt for this plan and is destroyed once;
        // null ones (a plan whose creation failed half-way) are skipped. Errors on destroy
        // cannot be acted upon in drop.
        unsafe {
            for layout in [self.a, self.b, self.cd] {
                if !layout.is_null() {
                    let _ = lt::destroy_matrix_layout(layout);
                }
            }
            if !self.desc.is_null() {
                let _ = lt::destroy_matmul_desc(self.desc);
            }
        }
    }
}

/// The cuBLASLt handle, its workspace and one [`Plan`] per shape met so far. Create it once
/// (at model set-up) and pass it to every GEMM; the first call of each shape builds its plan,
/// later calls only look it up.
pub struct GemmCache {
    handle: sys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
    /// The stream the tuner times candidates on (the Gpu's own stream).
    stream: Arc<CudaStream>,
    plans: RefCell<HashMap<GemmShape, Plan>>,
    /// Algorithms to run instead of tuning, for shapes not planned yet
    /// ([`GemmCache::preset_choices`]).
    presets: RefCell<HashMap<GemmShape, usize>>,
    /// Presets whose index the heuristic did not list when their shape was planned (tuned).
    unlisted: RefCell<Vec<GemmChoice>>,
}

// SAFETY: the handle and descriptors are plain heap objects of cuBLASLt that may be used from
// any thread; the cache is not Sync (RefCell), so only one thread uses it at a time.
unsafe impl Send for GemmCache {}

impl Drop for GemmCache {
    fn drop(&mut self) {
        self.plans.get_mut().clear();
        // SAFETY: created in `new`, destroyed once, after every plan that refers to it.
        unsafe {
            let _ = lt::destroy_handle(self.handle);
        }
    }
}

fn blas(what: impl Into<String>) -> impl FnOnce(lt::CublasError) -> GpuError {
    let what = what.into();
    move |source| GpuError::Blas { what, source }
}

impl GemmCache {
    pub fn new(gpu: &Gpu) -> Result<GemmCache, GpuError> {
        Gpu::require_cublaslt("the GEMMs")?;
        gpu.ctx.bind_to_thread().map_err(|source| GpuError::Driver { what: "binding the context for cuBLASLt".into(), source })?;
        let handle = lt::create_handle().map_err(blas("creating the cuBLASLt handle"))?;
        // SAFETY: the bytes are scratch for cuBLASLt, never read as values.
        let workspace = unsafe { gpu.stream.alloc::<u8>(WORKSPACE_BYTES) };
        let workspace = match workspace {
            Ok(w) => w,
            Err(source) => {
                // SAFETY: created just above, not used anywhere else.
                unsafe {
                    let _ = lt::destroy_handle(handle);
                }
                return Err(GpuError::Driver { what: "allocating the cuBLASLt workspace".into(), source });
            }
        };
        Ok(GemmCache { handle, workspace, stream: gpu.stream.clone(), plans: RefCell::default(), presets: RefCell::default(), unlisted: RefCell::default() })
    }

    /// Builds and tunes the plan of every shape in `shapes` not seen yet: call once at
    /// model set-up with every product the model runs, so no step pays for tuning.
    pub fn prepare(&self, shapes: &[GemmShape]) -> Result<(), GpuError> {
        shapes.iter().try_for_each(|&shape| self.ensure_plan(shape))
    }

    /// How many algorithms the heuristic offered for `shape` (building its plan if needed).
    pub fn algorithm_count(&self, shape: GemmShape) -> Result<usize, GpuError> {
        self.ensure_plan(shape)?;
        Ok(self.plans.borrow()[&shape].algorithms.len())
    }

    /// The index (in the heuristic's order, 0 = its first choice) of the algorithm `shape`
    /// uses: the tuner's fastest unless [`GemmCache::choose_algorithm`] set another.
    pub fn chosen_algorithm(&self, shape: GemmShape) -> Result<usize, GpuError> {
        self.ensure_plan(shape)?;
        Ok(self.plans.borrow()[&shape].choice)
    }

    /// Uses the heuristic's `index`-th algorithm (0 = its first choice) for `shape` from now
    /// on, overriding the tuner; for benchmarks and for replaying a recorded choice.
    pub fn choose_algorithm(&self, shape: GemmShape, index: usize) -> Result<(), GpuError> {
        self.ensure_plan(shape)?;
        let mut plans = self.plans.borrow_mut();
        let plan = plans.get_mut(&shape).expect("plan built above");
        assert!(index < plan.algorithms.len(), "{shape}: algorithm {index} of {}", plan.algorithms.len());
        plan.choice = index;
        Ok(())
    }

    /// The cuBLASLt library's version number (its heuristic's lists depend on it).
    pub fn library_version(&self) -> usize {
        // SAFETY: no arguments; the library is loaded (this cache holds one of its handles).
        unsafe { sys::cublasLtGetVersion() }
    }

    /// Every shape with the algorithm it runs, in (op, T, N, K) order: the shapes planned so far
    /// and those with a preset choice not met yet (so a record passes unchanged through a
    /// process that never runs one of its shapes).
    pub fn choices(&self) -> Vec<GemmChoice> {
        let plans = self.plans.borrow();
        let planned = plans.iter().map(|(s, p)| (*s, p.choice));
        let preset = self.presets.borrow().iter().filter(|(s, _)| !plans.contains_key(*s)).map(|(s, &i)| (*s, i)).collect::<Vec<_>>();
        let mut choices: Vec<GemmChoice> = planned.chain(preset).map(|(s, algorithm)| GemmChoice::new(s, algorithm)).collect();
        choices.sort();
        choices
    }

    /// Runs each recorded choice instead of the tuner's: shapes planned already switch now
    /// (when their heuristic lists the index), the others when they are first met, without
    /// being tuned. A shape keeps the first preset it is given.
    pub fn preset_choices(&self, recorded: &[GemmChoice]) -> Result<(), GpuError> {
        for choice in recorded {
            let shape = choice.shape();
            let planned = self.plans.borrow().get(&shape).map(|p| p.algorithms.len());
            match planned {
                Some(listed) if choice.algorithm < listed => self.choose_algorithm(shape, choice.algorithm)?,
                Some(_) => self.unlisted.borrow_mut().push(*choice),
                None => {
                    self.presets.borrow_mut().entry(shape).or_insert(choice.algorithm);
                }
            }
        }
        Ok(())
    }

    /// The preset choices this GPU's heuristic did not list for their shape (those shapes were
    /// tuned instead), so far.
    pub fn unlisted_presets(&self) -> Vec<GemmChoice> {
        self.unlisted.borrow().clone()
    }

    fn ensure_plan(&self, shape: GemmShape) -> Result<(), GpuError> {
        if !self.plans.borrow().contains_key(&shape) {
            let mut plan = self.build_plan(shape)?;
            let preset = self.presets.borrow().get(&shape).copied();
            plan.choice = match preset {
                Some(index) if index < plan.algorithms.len() => index,
                Some(index) => {
                    self.unlisted.borrow_mut().push(GemmChoice::new(shape, index));
                    self.tune(shape, &plan)?
                }
                None => self.tune(shape, &plan)?,
            };
            self.plans.borrow_mut().insert(shape, plan);
        }
        Ok(())
    }

    /// Times every algorithm of `plan` on random operands of `shape` and returns the index
    /// of the fastest (median of its samples; ties keep the heuristic's order). Returns 0,
    /// the heuristic's choice, when there is nothing to compare or too little free memory
    /// for the operands. Candidates that fail to launch are left out.
    fn tune(&self, shape: GemmShape, plan: &Plan) -> Result<usize, GpuError> {
        if plan.algorithms.len() < 2 {
            return Ok(0);
        }
        let Some(operands) = TuneOperands::new(&self.stream, shape)? else {
            return Ok(0);
        };
        let beta = operands.beta;
        let (a, b, c, d) = operands.pointers(&self.stream);
        let event = || self.stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).during("recording a GEMM tuning event");
        let mut usable = vec![true; plan.algorithms.len()];
        let mut pairs: Vec<Vec<(CudaEvent, CudaEvent)>> = (0..plan.algorithms.len()).map(|_| Vec::new()).collect();
        for round in 0..TUNE_ROUNDS {
            for index in 0..plan.algorithms.len() {
                let warmup = if round == 0 { TUNE_WARMUP } else { 0 };
                for run in 0..warmup + TUNE_RUNS {
                    if !usable[index] {
                        break;
                    }
                    let start = event()?;
                    // SAFETY: the operands were allocated for this shape by TuneOperands and
                    // live until the events below have been waited on.
                    if unsafe { self.launch(shape, plan, index, beta, a, b, c, d) }.is_err() {
                        usable[index] = false;
                    } else if run >= warmup {
                        pairs[index].push((start, event()?));
                    }
                }
            }
        }
        let mut best = (0, f64::INFINITY);
        for (index, samples) in pairs.iter().enumerate().filter(|(i, _)| usable[*i]) {
            let mut ms = samples.iter().map(|(s, e)| s.elapsed_ms(e).map(f64::from)).collect::<Result<Vec<_>, _>>().during("reading GEMM tuning events")?;
            ms.sort_by(f64::total_cmp);
            let median = ms[ms.len() / 2];
            if median < best.1 {
                best = (index, median);
            }
        }
        drop(operands);
        Ok(best.0)
    }

    fn build_plan(&self, shape: GemmShape) -> Result<Plan, GpuError> {
        let GemmShape { op, t, n, k } = shape;
        let (t, n, k) = (t as u64, n as u64, k as u64);
        let bf = sys::cudaDataType_t::CUDA_R_16BF;
        // (op A, op B, A rows/cols/ld, B rows/cols/ld, D rows/cols, D type), column-major.
        let (trans_a, trans_b, a_dims, b_dims, d_dims, d_type) = match op {
            GemmOp::Forward | GemmOp::ForwardResidual => (OP_T, OP_N, (k, n, k), (k, t, k), (n, t), bf),
            GemmOp::BackwardInput => (OP_N, OP_N, (k, n, k), (n, t, n), (k, t), bf),
            GemmOp::BackwardWeight => (OP_N, OP_T, (k, t, k), (n, t, n), (k, n), sys::cudaDataType_t::CUDA_R_32F),
        };
        let what = |step: &str| format!("{step} for GEMM {shape}");
        let desc = lt::create_matmul_desc(sys::cublasComputeType_t::CUBLAS_COMPUTE_32F, sys::cudaDataType_t::CUDA_R_32F).map_err(blas(what("creating the matmul descriptor")))?;
        let mut plan = Plan { desc, a: std::ptr::null_mut(), b: std::ptr::null_mut(), cd: std::ptr::null_mut(), algorithms: Vec::new(), choice: 0 };
        for (attr, value) in [(sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA, trans_a), (sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB, trans_b)] {
            // SAFETY: desc is live; the attribute is an i32 (cublasOperation_t) read from `value`.
            unsafe { lt::set_matmul_desc_attribute(desc, attr, (&value as *const i32).cast(), std::mem::size_of::<i32>()) }.map_err(blas(what("setting the transposes")))?;
        }
        plan.a = lt::create_matrix_layout(bf, a_dims.0, a_dims.1, a_dims.2 as i64).map_err(blas(what("creating the A layout")))?;
        plan.b = lt::create_matrix_layout(bf, b_dims.0, b_dims.1, b_dims.2 as i64).map_err(blas(what("creating the B layout")))?;
        plan.cd = lt::create_matrix_layout(d_type, d_dims.0, d_dims.1, d_dims.0 as i64).map_err(blas(what("creating the C/D layout")))?;

        let pref = lt::create_matmul_pref().map_err(blas(what("creating the preference")))?;
        let workspace = WORKSPACE_BYTES as u64;
        let align = 16u32;
        // Split-K candidates must reduce their partial products in fp32, in the workspace
        // (COMPUTE_TYPE), or, for the fp32 dW, in the output type. Excluded: reducing in a
        // bf16 output, which rounds every partial sum (far outside the GEMM tolerances where
        // a sum cancels), and reducing in place in the output buffer. Only the heuristic's
        // first choice used to run, and it passed selftest; with the tuner free to pick any
        // of 8 candidates, those that could not are ruled out up front.
        type Scheme = sys::cublasLtReductionScheme_t;
        let reductions = match op {
            GemmOp::BackwardWeight => Scheme::CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE as u32 | Scheme::CUBLASLT_REDUCTION_SCHEME_OUTPUT_TYPE as u32,
            _ => Scheme::CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE as u32,
        };
        type PrefAttr = sys::cublasLtMatmulPreferenceAttributes_t;
        // SAFETY: pref is live; each value has the type its attribute expects (u64 bytes for
        // the workspace, u32 for the alignments and the reduction-scheme mask).
        let set_prefs = unsafe {
            lt::set_matmul_pref_attribute(pref, PrefAttr::CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, (&reductions as *const u32).cast(), 4)
                .and_then(|_| lt::set_matmul_pref_attribute(pref, PrefAttr::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, (&workspace as *const u64).cast(), 8))
                .and_then(|_| lt::set_matmul_pref_attribute(pref, PrefAttr::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, (&align as *const u32).cast(), 4))
                .and_then(|_| lt::set_matmul_pref_attribute(pref, PrefAttr::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, (&align as *const u32).cast(), 4))
                .and_then(|_| lt::set_matmul_pref_attribute(pref, PrefAttr::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, (&align as *const u32).cast(), 4))
                .and_then(|_| lt::set_matmul_pref_attribute(pref, PrefAttr::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, (&align as *const u32).cast(), 4))
        };
        // SAFETY: a zeroed heuristic result is a valid (empty) value of this plain C struct.
        let mut results: Vec<sys::cublasLtMatmulHeuristicResult_t> = vec![unsafe { std::mem::zeroed() }; MAX_ALGORITHMS];
        let mut count = 0i32;
        let heuristic = set_prefs.and_then(|_| {
            // SAFETY: every descriptor is live, `results` has room for MAX_ALGORITHMS entries.
            unsafe {
                sys::cublasLtMatmulAlgoGetHeuristic(self.handle, plan.desc, plan.a, plan.b, plan.cd, plan.cd, pref, MAX_ALGORITHMS as i32, results.as_mut_ptr(), &mut count).result()
            }
        });
        // SAFETY: created above, used only for the heuristic call.
        unsafe {
            let _ = lt::destroy_matmul_pref(pref);
        }
        heuristic.map_err(blas(what("asking the heuristic for an algorithm")))?;
        results.truncate(count.max(0) as usize);
        results.retain(|r| r.state == sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS);
        if results.is_empty() {
            return Err(GpuError::Blas { what: what("finding any algorithm (bf16 in, 16-byte aligned)"), source: lt::CublasError(sys::cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED) });
        }
        plan.algorithms = results;
        Ok(plan)
    }

    /// `D = op(A) op(B) + beta * C` for `shape` with device addresses `a`, `b`, `c`, `d`.
    ///
    /// # Safety
    /// The addresses must hold the matrices the plan of `shape` describes (see the module
    /// doc), 16-byte aligned, and stay alive until the stream has run the product.
    #[allow(clippy::too_many_arguments)]
    unsafe fn matmul(&self, gpu: &Gpu, shape: GemmShape, beta: f32, a: u64, b: u64, c: u64, d: u64) -> Result<(), GpuError> {
        self.ensure_plan(shape)?;
        // cuBLASLt runs on the calling thread's current context, which cudarc's own calls
        // set but a thread that has only called cuBLASLt so far may not have.
        gpu.ctx.bind_to_thread().map_err(|source| GpuError::Driver { what: format!("binding the context for GEMM {shape}"), source })?;
        let plans = self.plans.borrow();
        let plan = &plans[&shape];
        self.launch(shape, plan, plan.choice, beta, a, b, c, d)
    }

    /// Queues `D = op(A) op(B) + beta * C` with algorithm `index` of `plan` on the cache's
    /// stream.
    ///
    /// # Safety
    /// As [`GemmCache::matmul`]; the context must be current on this thread.
    #[allow(clippy::too_many_arguments)]
    unsafe fn launch(&self, shape: GemmShape, plan: &Plan, index: usize, beta: f32, a: u64, b: u64, c: u64, d: u64) -> Result<(), GpuError> {
        let alpha = 1.0f32;
        let (workspace, _sync) = self.workspace.device_ptr(&self.stream);
        lt::matmul(
            self.handle,
            plan.desc,
            (&alpha as *const f32).cast(),
            (&beta as *const f32).cast(),
            a as *const _,
            plan.a,
            b as *const _,
            plan.b,
            c as *const _,
            plan.cd,
            d as *mut _,
            plan.cd,
            &plan.algorithms[index].algo,
            workspace as *mut _,
            WORKSPACE_BYTES,
            self.stream.cu_stream() as sys::cudaStream_t,
        )
        .map_err(blas(format!("running GEMM {shape} with algorithm {index}")))
    }
}

/// Scratch operands of one shape for the tuner: A, B, D (and a separate C for the
/// residual form), filled with random values in [-1, 1) — never zeros, which can run
/// measurably faster than real data. Freed as soon as tuning is done.
struct TuneOperands {
    a: CudaSlice<bf16>,
    b: CudaSlice<bf16>,
    c: Option<CudaSlice<bf16>>,
    d: TuneOutput,
    beta: f32,
}

enum TuneOutput {
    Bf16(CudaSlice<bf16>),
    F32(CudaSlice<f32>),
}

impl TuneOperands {
    /// None when the operands would take more than `TUNE_MAX_FREE_SHARE` of free memory.
    fn new(stream: &Arc<CudaStream>, shape: GemmShape) -> Result<Option<TuneOperands>, GpuError> {
        let GemmShape { op, t, n, k } = shape;
        // (A, B, C, D) element counts; A and B as the module doc lays them out.
        let (a_len, b_len, c_len, d_len) = match op {
            GemmOp::Forward => (n * k, t * k, 0, t * n),
            GemmOp::ForwardResidual => (n * k, t * k, t * n, t * n),
            GemmOp::BackwardInput => (n * k, t * n, 0, t * k),
            GemmOp::BackwardWeight => (t * k, t * n, 0, n * k),
        };
        let d_bytes = if op == GemmOp::BackwardWeight { 4 } else { 2 };
        let bytes = 2 * (a_len + b_len + c_len) + d_bytes * d_len;
        stream.context().bind_to_thread().during("binding the context for GEMM tuning")?;
        let (free, _total) = cudarc::driver::result::mem_get_info().during("querying free memory for GEMM tuning")?;
        if bytes as f64 > TUNE_MAX_FREE_SHARE * free as f64 {
            return Ok(None);
        }
        let mut rng = Rng::new(0x6E_6D6D);
        let pattern_bf16: Vec<bf16> = (0..TUNE_PATTERN).map(|_| bf16::from_f32((rng.uniform() * 2.0 - 1.0) as f32)).collect();
        let bf16_buffer = |len: usize| random_fill(stream, len, &pattern_bf16);
        let d = if op == GemmOp::BackwardWeight {
            let pattern: Vec<f32> = (0..TUNE_PATTERN).map(|_| (rng.uniform() * 2.0 - 1.0) as f32).collect();
            TuneOutput::F32(random_fill(stream, d_len, &pattern)?)
        } else {
            TuneOutput::Bf16(bf16_buffer(d_len)?)
        };
        let c = if c_len > 0 { Some(bf16_buffer(c_len)?) } else { None };
        let beta = if matches!(op, GemmOp::ForwardResidual | GemmOp::BackwardWeight) { 1.0 } else { 0.0 };
        Ok(Some(TuneOperands { a: bf16_buffer(a_len)?, b: bf16_buffer(b_len)?, c, d, beta }))
    }

    /// Device addresses (A, B, C, D); C is D unless the residual form has its own.
    fn pointers(&self, stream: &Arc<CudaStream>) -> (u64, u64, u64, u64) {
        let d = match &self.d {
            TuneOutput::Bf16(d) => d.device_ptr(stream).0,
            TuneOutput::F32(d) => d.device_ptr(stream).0,
        };
        let c = self.c.as_ref().map_or(d, |c| c.device_ptr(stream).0);
        (self.a.device_ptr(stream).0, self.b.device_ptr(stream).0, c, d)
    }
}

/// Elements of the random pattern the tuner's operands repeat (256 KiB of bf16).
const TUNE_PATTERN: usize = 1 << 17;

/// A device buffer of `len` values repeating `pattern`: one upload, then doubling
/// device-to-device copies (a few dozen launches for a GiB instead of a host upload).
fn random_fill<T: DeviceRepr>(stream: &Arc<CudaStream>, len: usize, pattern: &[T]) -> Result<CudaSlice<T>, GpuError> {
    // SAFETY: every element is written below before the buffer is read.
    let mut buf = unsafe { stream.alloc::<T>(len.max(1)) }.during("allocating GEMM tuning operands")?;
    let first = pattern.len().min(len);
    stream.memcpy_htod(&pattern[..first], &mut buf.slice_mut(..first)).during("uploading GEMM tuning operands")?;
    let mut filled = first;
    while filled < len {
        let count = filled.min(len - filled);
        let (done, mut rest) = buf.split_at_mut(filled);
        stream.memcpy_dtod(&done.slice(..count), &mut rest.slice_mut(..count)).during("filling GEMM tuning operands")?;
        filled += count;
    }
    Ok(buf)
}

/// GPU [`linear_fwd_cpu`]: y: [T,N] bf16, x: [T,K] bf16, w: [N,K] bf16, residual: [T,N] bf16
/// (C of the product, so `y` and `residual` are distinct buffers).
#[allow(clippy::too_many_arguments)]
pub fn linear_fwd(
    gpu: &Gpu,
    gemm: &GemmCache,
    y: &mut CudaViewMut<bf16>,
    x: &CudaView<bf16>,
    w: &CudaView<bf16>,
    residual: Option<&CudaView<bf16>>,
    t: usize,
    n: usize,
    k: usize,
) -> Result<(), GpuError> {
    const OP: &str = "linear_fwd";
    check_sizes(OP, t, n, k);
    expect_len(OP, "y", y.len(), &[("T", t), ("N", n)]);
    expect_len(OP, "x", x.len(), &[("T", t), ("K", k)]);
    expect_len(OP, "w", w.len(), &[("N", n), ("K", k)]);
    expect_aligned16(OP, "y", gpu, y);
    expect_aligned16(OP, "x", gpu, x);
    expect_aligned16(OP, "w", gpu, w);
    if let Some(r) = residual {
        expect_len(OP, "residual", r.len(), &[("T", t), ("N", n)]);
        expect_aligned16(OP, "residual", gpu, r);
    }
    if t == 0 {
        return Ok(());
    }
    let op = if residual.is_some() { GemmOp::ForwardResidual } else { GemmOp::Forward };
    let shape = GemmShape { op, t, n, k };
    let (x_ptr, _x) = x.device_ptr(&gpu.stream);
    let (w_ptr, _w) = w.device_ptr(&gpu.stream);
    let (y_ptr, _y) = y.device_ptr_mut(&gpu.stream);
    let residual_ptr = residual.map(|r| r.device_ptr(&gpu.stream));
    let (c_ptr, beta) = residual_ptr.as_ref().map_or((y_ptr, 0.0), |(p, _)| (*p, 1.0));
    // SAFETY: A = w [N,K], B = x [T,K], C = residual or y, D = y [T,N], all bf16 of the
    // lengths checked above and 16-byte aligned; the views outlive the queued product
    // (their guards are held until return and the buffers by the caller).
    unsafe { gemm.matmul(gpu, shape, beta, w_ptr, x_ptr, c_ptr, y_ptr) }
}

/// GPU [`linear_bwd_input_cpu`]: dx: [T,K] bf16 (written),
/// dy: [T,N] bf16, w: [N,K] bf16.
#[allow(clippy::too_many_arguments)]
pub fn linear_bwd_input(
    gpu: &Gpu,
    gemm: &GemmCache,
    dx: &mut CudaViewMut<bf16>,
    dy: &CudaView<bf16>,
    w: &CudaView<bf16>,
    t: usize,
    n: usize,
    k: usize,
) -> Result<(), GpuError> {
    const OP: &str = "linear_bwd_input";
    check_sizes(OP, t, n, k);
    expect_len(OP, "dx", dx.len(), &[("T", t), ("K", k)]);
    expect_len(OP, "dy", dy.len(), &[("T", t), ("N", n)]);
    expect_len(OP, "w", w.len(), &[("N", n), ("K", k)]);
    expect_aligned16(OP, "dx", gpu, dx);
    expect_aligned16(OP, "dy", gpu, dy);
    expect_aligned16(OP, "w", gpu, w);
    if t == 0 {
        return Ok(());
    }
    let shape = GemmShape { op: GemmOp::BackwardInput, t, n, k };
    let (dy_ptr, _dy) = dy.device_ptr(&gpu.stream);
    let (w_ptr, _w) = w.device_ptr(&gpu.stream);
    let (dx_ptr, _dx) = dx.device_ptr_mut(&gpu.stream);
    // SAFETY: A = w [N,K], B = dy [T,N], D = dx [T,K] (beta = 0: C is not read), bf16,
    // lengths checked above, 16-byte aligned, alive until the product has run.
    unsafe { gemm.matmul(gpu, shape, 0.0, w_ptr, dy_ptr, dx_ptr, dx_ptr) }
}

/// GPU [`linear_bwd_weight_cpu`]: dw: [N,K] fp32 (+= with `accumulate`, else =), dy: [T,N]
/// bf16, x: [T,K] bf16.
#[allow(clippy::too_many_arguments)]
pub fn linear_bwd_weight(
    gpu: &Gpu,
    gemm: &GemmCache,
    dw: &mut CudaViewMut<f32>,
    dy: &CudaView<bf16>,
    x: &CudaView<bf16>,
    t: usize,
    n: usize,
    k: usize,
    accumulate: bool,
) -> Result<(), GpuError> {
    const OP: &str = "linear_bwd_weight";
    check_sizes(OP, t, n, k);
    expect_len(OP, "dw", dw.len(), &[("N", n), ("K", k)]);
    expect_len(OP, "dy", dy.len(), &[("T", t), ("N", n)]);
    expect_len(OP, "x", x.len(), &[("T", t), ("K", k)]);
    expect_aligned16(OP, "dw", gpu, dw);
    expect_aligned16(OP, "dy", gpu, dy);
    expect_aligned16(OP, "x", gpu, x);
    if t == 0 {
        return Ok(());
    }
    let shape = GemmShape { op: GemmOp::BackwardWeight, t, n, k };
    let (dy_ptr, _dy) = dy.device_ptr(&gpu.stream);
    let (x_ptr, _x) = x.device_ptr(&gpu.stream);
    let (dw_ptr, _dw) = dw.device_ptr_mut(&gpu.stream);
    // SAFETY: A = x [T,K], B = dy [T,N] bf16, C = D = dw [N,K] fp32, lengths checked above,
    // 16-byte aligned, alive until the product has run; with beta = 0 C is not read.
    unsafe { gemm.matmul(gpu, shape, if accumulate { 1.0 } else { 0.0 }, x_ptr, dy_ptr, dw_ptr, dw_ptr) }
}

/// N and K are positive (an empty sum is not a GEMM worth a plan) and fit cuBLASLt's ints.
fn check_sizes(op: &str, t: usize, n: usize, k: usize) {
    assert!(n > 0 && k > 0, "{op}: N = {n} and K = {k} must be positive");
    as_i32(op, "T", t);
    as_i32(op, "N", n);
    as_i32(op, "K", k);
}

pub fn selftests() -> Vec<Check> {
    vec![Check { name: "linear_fwd", run: check_fwd }, Check { name: "linear_bwd_input", run: check_bwd_input }, Check { name: "linear_bwd_weight", run: check_bwd_weight }]
}

/// (T, N, K, input scale): a single row, odd sizes everywhere (leading dimensions that are not
/// multiples of 8), mid-size, an XL projection slice, large inputs.
const SHAPES: [(usize, usize, usize, f32); 5] = [(1, 8, 8, 1.0), (33, 35, 37, 1.0), (129, 200, 264, 1.0), (1000, 1536, 1536, 1.0), (77, 512, 128, 100.0)];

/// bf16 output: one rounding (2^-9, checked at 2^-7); where the sum cancels, the two fp32
/// accumulations (tensor cores, blocked sgemm) each err by ~sqrt(K) * 2^-24 * sqrt(K) *
/// scale^2; 2^-20 * K * scale^2 is a factor of 8 above that.
pub(crate) fn bf16_out_tol(k: usize, scale_a: f32, scale_b: f32) -> Tolerance {
    Tolerance { abs: 2f32.powi(-20) * k as f32 * scale_a * scale_b, rel: 2.0 * BF16_EPS }
}

fn check_fwd(gpu: &Gpu, rng: &mut Rng) -> Result<Vec<Row>, GpuError> {
    let gemm = GemmCache::new(gpu)?;
    let mut rows = Vec::new();
    for (t, n, k, scale) in SHAPES {
        let (x, w, res) = (bf16_inputs(rng, t * k, scale), bf16_inputs(rng, n * k, 1.0), bf16_inputs(rng, t * n, scale * 10.0));
        let (dx, dw, dres) = (upload_bf16(gpu, &x)?, upload_bf16(gpu, &w)?, upload_bf16(gpu, &res)?);
        let tol = bf16_out_tol(k, scale, 1.0);
        for residual in [false, true] {
            let mut want = vec![0.0; t * n];
            linear_fwd_cpu(&mut want, &x, &w, residual.then_some(&res[..]), t, n, k);
            let mut y = poisoned_bf16(gpu, t * n)?;
            linear_fwd(gpu, &gemm, &mut y.as_view_mut(), &dx.as_view(), &dw.as_view(), residual.then(|| dres.as_view()).as_ref(), t, n, k)?;
            let name = if residual { "linear_fwd y = res + x w^T" } else { "linear_fwd y = x w^T" };
            rows.push(Row::new(name, format!("[{t},{n},{k}] x{scale}"), tol, compare(&download_bf16(gpu, &y)?, &want, tol)));
        }
    }
    Ok(rows)
}

fn check_bwd_input(gpu: &Gpu, rng: &mut Rng) -> Result<Vec<Row>, GpuError> {
    let gemm = GemmCache::new(gpu)?;
    let mut rows = Vec::new();
    for (t, n, k, scale) in SHAPES {
        let (dy, w) = (bf16_inputs(rng, t * n, scale), bf16_inputs(rng, n * k, 1.0));
        let (ddy, dw) = (upload_bf16(gpu, &dy)?, upload_bf16(gpu, &w)?);
        let tol = bf16_out_tol(n, scale, 1.0);
        let mut want = vec![0.0; t * k];
        linear_bwd_input_cpu(&mut want, &dy, &w, t, n, k);
        let mut dx = poisoned_bf16(gpu, t * k)?;
        linear_bwd_input(gpu, &gemm, &mut dx.as_view_mut(), &ddy.as_view(), &dw.as_view(), t, n, k)?;
        rows.push(Row::new("linear_bwd_input dx = dy w", format!("[{t},{n},{k}] x{scale}"), tol, compare(&download_bf16(gpu, &dx)?, &want, tol)));
    }
    Ok(rows)
}

fn check_bwd_weight(gpu: &Gpu, rng: &mut Rng) -> Result<Vec<Row>, GpuError> {
    let gemm = GemmCache::new(gpu)?;
    let mut rows = Vec::new();
    for (t, n, k, scale) in SHAPES {
        let (dy, x) = (bf16_inputs(rng, t * n, scale), bf16_inputs(rng, t * k, 1.0));
        let dw0 = rng.uniform_vec(n * k, scale);
        let mut want = dw0.clone();
        linear_bwd_weight_cpu(&mut want, &dy, &x, t, n, k, true);
        let (ddy, dx) = (upload_bf16(gpu, &dy)?, upload_bf16(gpu, &x)?);
        let mut dw = upload(gpu, &dw0)?;
        linear_bwd_weight(gpu, &gemm, &mut dw.as_view_mut(), &ddy.as_view(), &dx.as_view(), t, n, k, true)?;
        // fp32 out: only the two accumulations differ (see bf16_out_tol, sum over T) and the
        // final add to dw0 (a few 2^-24).
        let tol = Tolerance { abs: 2f32.powi(-20) * t as f32 * scale, rel: 4.0 * f32::EPSILON };
        rows.push(Row::new("linear_bwd_weight dw+=dy^T x", format!("[{t},{n},{k}] x{scale}"), tol, compare(&download(gpu, &dw)?, &want, tol)));
        // Written (a step's first contribution): what dw held, NaN here, is not read.
        let mut want = vec![f32::NAN; n * k];
        linear_bwd_weight_cpu(&mut want, &dy, &x, t, n, k, false);
        let mut dw = poisoned_f32(gpu, n * k)?;
        linear_bwd_weight(gpu, &gemm, &mut dw.as_view_mut(), &ddy.as_view(), &dx.as_view(), t, n, k, false)?;
        rows.push(Row::new("linear_bwd_weight dw=dy^T x", format!("[{t},{n},{k}] x{scale}"), tol, compare(&download(gpu, &dw)?, &want, tol)));
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::{check_gradient, weighted_sum};
    use crate::rng::Rng;

    /// The textbook triple loop in f64, the reference for the blocked sgemm.
    fn naive_fwd(x: &[f32], w: &[f32], t: usize, n: usize, k: usize) -> Vec<f64> {
        let mut y = vec![0.0f64; t * n];
        for i in 0..t {
            for j in 0..n {
                y[i * n + j] = (0..k).map(|p| x[i * k + p] as f64 * w[j * k + p] as f64).sum();
            }
        }
        y
    }

    #[test]
    fn forward_matches_triple_loop() {
        let mut rng = Rng::new(1);
        // Odd sizes so no dimension is a multiple of the sgemm kernel's tile.
        let (t, n, k) = (37, 29, 53);
        let x = rng.uniform_vec(t * k, 1.0);
        let w = rng.uniform_vec(n * k, 1.0);
        let res = rng.uniform_vec(t * n, 1.0);
        let mut y = vec![f32::NAN; t * n];
        linear_fwd_cpu(&mut y, &x, &w, None, t, n, k);
        let want = naive_fwd(&x, &w, t, n, k);
        // fp32 dot products of K = 53 terms of size <= 1: error <= K * 2^-24 * sum|terms|.
        for (g, w) in y.iter().zip(&want) {
            assert!((*g as f64 - w).abs() <= 53.0 * 6e-8 * 53.0, "{g} vs {w}");
        }
        linear_fwd_cpu(&mut y, &x, &w, Some(&res), t, n, k);
        for ((g, w), r) in y.iter().zip(&want).zip(&res) {
            assert!((*g as f64 - (w + *r as f64)).abs() <= 53.0 * 6e-8 * 54.0);
        }
    }

    #[test]
    fn backward_matches_finite_differences() {
        let mut rng = Rng::new(2);
        let (t, n, k) = (13, 7, 11);
        let x = rng.uniform_vec(t * k, 1.0);
        let w = rng.uniform_vec(n * k, 1.0);
        let r = rng.uniform_vec(t * n, 1.0);
        let loss = |x: &[f32], w: &[f32]| {
            let mut y = vec![0.0; t * n];
            linear_fwd_cpu(&mut y, x, w, None, t, n, k);
            weighted_sum(&r, &y)
        };

        // dx: written with `=` (NaN before proves it).
        let mut dx = vec![f32::NAN; t * k];
        linear_bwd_input_cpu(&mut dx, &r, &w, t, n, k);
        check_gradient("linear dx", &x, &dx, |x| loss(x, &w), &mut rng, 4);

        // dw: accumulates onto a random start.
        let start = rng.uniform_vec(n * k, 1.0);
        let mut dw = start.clone();
        linear_bwd_weight_cpu(&mut dw, &r, &x, t, n, k, true);
        let delta: Vec<f32> = dw.iter().zip(&start).map(|(a, b)| a - b).collect();
        check_gradient("linear dw", &w, &delta, |w| loss(&x, w), &mut rng, 4);
        // Written instead (NaN before proves it): the same gradient.
        let mut written = vec![f32::NAN; n * k];
        linear_bwd_weight_cpu(&mut written, &r, &x, t, n, k, false);
        check_gradient("linear dw written", &w, &written, |w| loss(&x, w), &mut rng, 4);
    }
}
