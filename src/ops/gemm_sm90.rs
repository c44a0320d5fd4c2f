//! Our own Hopper GEMM for the linear layers' products (`cuda/gemm_sm90.cu`), for the epilogues
//! cuBLASLt cannot run (`docs/design/gemm-epilogues.md`):
//!
//! ```text
//! linear_fwd_sm90          y [T, N] = x [T, K] @ w [N, K]^T                     N % 256 == 0
//! linear_rope_fwd_sm90     gqkv [T, 4C] = x [T, K] @ w [4C, K]^T, its q and k    C % 256 == 0
//!                          blocks rotated by RoPE at pos [T]  (as qkv_rope_fwd of the stored product)
//! linear_swiglu_fwd_sm90   gu [T, 2I] = x [T, K] @ w [2I, K]^T                  I % 128 == 0
//!                          act [T, I] = silu(gu[:, :I]) * gu[:, I:]  (from gu as rounded to bf16)
//! linear_swiglu_bwd_sm90   dact [T, I] = dy [T, D] @ w [D, I]  (the down projection's    I % 256 == 0
//!                          input gradient), dgu [T, 2I] = swiglu_bwd(dact, gu)  (from dact as
//!                          rounded to bf16; dact itself stored only when asked)
//! ```
//!
//! bf16 in and out, fp32 accumulation, K % 128 == 0 (D for the backward). `act` has exactly the
//! bits `swiglu_fwd` computes from the `gu` written beside it, `dgu` those `swiglu_bwd`
//! computes from the `dact`.
//!
//! The model runs the fused kernels by default on Hopper (`model::cuda::EpilogueGemms`,
//! `train` / `bench train --epilogue-gemms`); the measurements are in
//! `docs/design/gemm-epilogues.md`, and `hrm-cu bench gemm` compares them with cuBLASLt and the
//! pass each replaces under sustained load.

use std::sync::OnceLock;

use cudarc::driver::sys::{self, CUfunction_attribute, CUtensorMapSwizzle};
use cudarc::driver::{CudaFunction, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};
use half::bf16;

use crate::config::HEAD_DIM;
use crate::gpu::{DriverContext, Gpu, GpuError};
use crate::ops::attention::{tensor_map, tensor_map_boxed, TensorMap};
use crate::ops::check::{bf16_inputs, download_bf16, poisoned_bf16, upload, upload_bf16};
use crate::ops::compare::{compare, Tolerance, BF16_EPS};
use crate::ops::gemm::{bf16_out_tol, linear_bwd_input_cpu, linear_fwd_cpu};
use crate::ops::shape::{as_i32, expect_aligned16, expect_len};
use crate::ops::rope::qkv_rope_fwd;
use crate::ops::swiglu::{swiglu_bwd, swiglu_fwd, swiglu_fwd_cpu};
use crate::rng::Rng;
use crate::selftest::{Check, Row};

const FAMILY: &str = "gemm_sm90";
/// Output tile (rows x columns): 256 columns of y, or 128 of act (128 gate + 128 up of gu).
const TILE_M: usize = 128;
const TILE_N: usize = 256;
/// Rows of w per TMA box: a B tile is two boxes (for the input gradient, where B is MN-major,
/// four boxes of 64 columns of w [D, I] by a K step's rows).
const B_BOX_ROWS: usize = 128;
/// The input gradient's K step (the forward kernels' is 64): x's boxes are 32 columns wide,
/// in the 64-byte swizzle.
const BWD_K_STEP: usize = 32;
/// The tensor maps view a [rows, K] operand as (128, K / 128, rows): K in blocks of 128.
const K_BLOCK: usize = 128;
const THREADS: u32 = 384;
/// Rows of y (or gu) per TMA store box.
const STORE_BOX_ROWS: usize = 64;
/// The forward kernels: three stages of A [128][64] and B [256][64] bf16, the two consumers'
/// [64][256] bf16 hand-off buffers, 1 KB of alignment slack (cuda/gemm_sm90.cu, GemmLayout).
const SMEM_FWD: u32 = (3 * (128 * 64 * 2 + 256 * 64 * 2) + 2 * 64 * 256 * 2 + 1024) as u32;
/// The input gradient's kernel: four stages of A [128][32] and B [32][256], the hand-off
/// buffers, and two slots of gu's gate and up [32][256] blocks.
const SMEM_BWD: u32 = (4 * (128 * 32 * 2 + 32 * 256 * 2) + 2 * 64 * 256 * 2 + 2 * 64 * 256 * 2 + 1024) as u32;

/// Whether [`linear_fwd_sm90`] runs on this GPU for N out features and K in features.
pub fn supports(gpu: &Gpu, n: usize, k: usize) -> bool {
    gpu.props.is_hopper() && n > 0 && k > 0 && n % TILE_N == 0 && k % K_BLOCK == 0
}

/// Whether [`linear_rope_fwd_sm90`] runs on this GPU for NH heads and K in features (C = NH *
/// 128 a multiple of the tile, so that no tile straddles two blocks of gqkv).
pub fn supports_rope(gpu: &Gpu, nh: usize, k: usize) -> bool {
    supports(gpu, 4 * nh * HEAD_DIM, k) && (nh * HEAD_DIM) % TILE_N == 0
}

/// Whether [`linear_swiglu_fwd_sm90`] runs on this GPU for I act columns and K in features.
pub fn supports_swiglu(gpu: &Gpu, i: usize, k: usize) -> bool {
    gpu.props.is_hopper() && i > 0 && k > 0 && i % (TILE_N / 2) == 0 && k % K_BLOCK == 0
}

/// Whether [`linear_swiglu_bwd_sm90`] runs on this GPU for I act columns and D out features
/// of the down projection.
pub fn supports_swiglu_bwd(gpu: &Gpu, i: usize, d: usize) -> bool {
    supports(gpu, i, d)
}

/// Checks the operands every kernel reads: x [T, K] and w [rows, K] (`w_dims`, outer first).
fn expect_operands(op: &str, gpu: &Gpu, x: &CudaView<bf16>, w: &CudaView<bf16>, t: usize, w_dims: &[(&str, usize)], k: usize) {
    expect_len(op, "x", x.len(), &[("T", t), ("K", k)]);
    expect_len(op, "w", w.len(), w_dims);
    expect_aligned16(op, "x", gpu, x);
    expect_aligned16(op, "w", gpu, w);
}

/// The tensor map of w [rows, K] as the forward products read it (K-major).
fn w_map_k_major(w: u64, rows: usize, k: usize) -> Result<TensorMap, GpuError> {
    tensor_map(w, rows, k / K_BLOCK, k, B_BOX_ROWS)
}

/// A kernel's launch with its `smem` bytes of shared memory allowed, over the output tiles'
/// pairs of rows (one cluster of two blocks a pair) times `tiles_n` tile columns.
fn prepare(gpu: &Gpu, op: &str, kernel: &str, smem: u32, t: usize, tiles_n: usize) -> Result<(CudaFunction, LaunchConfig), GpuError> {
    let pairs = t.div_ceil(TILE_M).div_ceil(2) * tiles_n;
    let func = gpu.function(FAMILY, kernel)?;
    func.set_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem as i32)
        .during(format!("{op}: allowing {smem} bytes of shared memory (the device offers {})", gpu.props.smem_per_block_optin))?;
    let clusters = pairs.min(resident_clusters(gpu, op, &func, smem)?);
    let cfg = LaunchConfig { grid_dim: (2 * clusters as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: smem };
    Ok((func, cfg))
}

/// The tensor map of x [T, K] as the forward kernels read it.
fn x_map(x: u64, t: usize, k: usize) -> Result<TensorMap, GpuError> {
    tensor_map(x, t, k / K_BLOCK, k, TILE_M)
}

/// How many clusters of two blocks the device runs at once with `smem` bytes a block (one
/// block an SM; an SM left without a partner in its GPC idles), so that the persistent grid
/// is one wave. Asked once a process for each of the two shared-memory sizes: a process
/// drives GPUs of one kind.
fn resident_clusters(gpu: &Gpu, op: &str, func: &CudaFunction, smem: u32) -> Result<usize, GpuError> {
    static RESIDENT_FWD: OnceLock<usize> = OnceLock::new();
    static RESIDENT_BWD: OnceLock<usize> = OnceLock::new();
    let resident = if smem == SMEM_BWD { &RESIDENT_BWD } else { &RESIDENT_FWD };
    if let Some(&n) = resident.get() {
        return Ok(n);
    }
    let config = sys::CUlaunchConfig {
        gridDimX: 2 * gpu.props.sm_count as u32,
        gridDimY: 1,
        gridDimZ: 1,
        blockDimX: THREADS,
        blockDimY: 1,
        blockDimZ: 1,
        sharedMemBytes: smem,
        hStream: std::ptr::null_mut(),
        attrs: std::ptr::null_mut(),
        numAttrs: 0,
    };
    let mut clusters = 0;
    // SAFETY: `config` is a complete launch configuration without attributes (the kernel
    // declares its cluster size); the driver writes one int.
    unsafe { sys::cuOccupancyMaxActiveClusters(&mut clusters, func.cu_function(), &config) }.result().during(format!("{op}: asking how many clusters of two fit"))?;
    // None fitting (not seen on Hopper) fails at the launch, with the driver's reason.
    Ok(*resident.get_or_init(|| (clusters as usize).max(1)))
}

/// y: [T, N] bf16 = x [T, K] @ w [N, K]^T on a Hopper GPU; the contract of
/// [`crate::ops::gemm::linear_fwd`] without the residual. Panics unless [`supports`]`(n, k)`.
pub fn linear_fwd_sm90(gpu: &Gpu, y: &mut CudaViewMut<bf16>, x: &CudaView<bf16>, w: &CudaView<bf16>, t: usize, n: usize, k: usize) -> Result<(), GpuError> {
    const OP: &str = "linear_fwd_sm90";
    assert!(supports(gpu, n, k), "{OP}: needs a Hopper GPU, N = {n} a multiple of {TILE_N} and K = {k} of {K_BLOCK}");
    expect_operands(OP, gpu, x, w, t, &[("N", n), ("K", k)], k);
    expect_len(OP, "y", y.len(), &[("T", t), ("N", n)]);
    expect_aligned16(OP, "y", gpu, y);
    if t == 0 {
        return Ok(());
    }
    let (x_ptr, _x) = x.device_ptr(&gpu.stream);
    let (w_ptr, _w) = w.device_ptr(&gpu.stream);
    let (func, cfg) = prepare(gpu, OP, "gemm_sm90", SMEM_FWD, t, n / TILE_N)?;
    let tm_x = x_map(x_ptr, t, k)?;
    let tm_w = w_map_k_major(w_ptr, n, k)?;
    let (y_ptr, _y) = y.device_ptr_mut(&gpu.stream);
    let tm_y = tensor_map(y_ptr, t, n / K_BLOCK, n, STORE_BOX_ROWS)?;
    let (t_i, n_i, k_i) = (as_i32(OP, "T", t), as_i32(OP, "N", n), as_i32(OP, "K", k));
    let mut args = gpu.stream.launch_builder(&func);
    args.arg(&tm_x).arg(&tm_w).arg(&tm_y).arg(&t_i).arg(&n_i).arg(&k_i);
    // SAFETY: the tensor maps describe exactly x [T, K], w [N, K] and y [T, N] (alive until
    // the guards drop after the launch; TMA writes rows < T only); N and K are multiples of
    // the tile and the K block (asserted); `SMEM_FWD` bytes allowed in `prepare`.
    unsafe { args.launch(cfg) }.during(OP)?;
    Ok(())
}

/// gqkv: [T, 4C] bf16 = x [T, K] @ w [4C, K]^T with its query and key blocks rotated by RoPE
/// at `pos` `[T]`, in one kernel on a Hopper GPU: the bits of [`linear_fwd_sm90`] followed by
/// `qkv_rope_fwd`. Panics unless [`supports_rope`]`(nh, k)`.
#[allow(clippy::too_many_arguments)]
pub fn linear_rope_fwd_sm90(gpu: &Gpu, gqkv: &mut CudaViewMut<bf16>, x: &CudaView<bf16>, w: &CudaView<bf16>, pos: &CudaView<i32>, t: usize, nh: usize, k: usize) -> Result<(), GpuError> {
    const OP: &str = "linear_rope_fwd_sm90";
    assert!(supports_rope(gpu, nh, k), "{OP}: needs a Hopper GPU, NH = {nh} even and K = {k} a multiple of {K_BLOCK}");
    let (c, n) = (nh * HEAD_DIM, 4 * nh * HEAD_DIM);
    expect_operands(OP, gpu, x, w, t, &[("4C", n), ("K", k)], k);
    expect_len(OP, "gqkv", gqkv.len(), &[("T", t), ("4C", n)]);
    expect_len(OP, "pos", pos.len(), &[("T", t)]);
    expect_aligned16(OP, "gqkv", gpu, gqkv);
    if t == 0 {
        return Ok(());
    }
    let (x_ptr, _x) = x.device_ptr(&gpu.stream);
    let (w_ptr, _w) = w.device_ptr(&gpu.stream);
    let (func, cfg) = prepare(gpu, OP, "gemm_rope_sm90", SMEM_FWD, t, n / TILE_N)?;
    let tm_x = x_map(x_ptr, t, k)?;
    let tm_w = w_map_k_major(w_ptr, n, k)?;
    let (y_ptr, _y) = gqkv.device_ptr_mut(&gpu.stream);
    let tm_y = tensor_map(y_ptr, t, n / K_BLOCK, n, STORE_BOX_ROWS)?;
    let (t_i, n_i, k_i, c_i) = (as_i32(OP, "T", t), as_i32(OP, "4C", n), as_i32(OP, "K", k), as_i32(OP, "C", c));
    let mut args = gpu.stream.launch_builder(&func);
    args.arg(&tm_x).arg(&tm_w).arg(&tm_y).arg(pos).arg(&t_i).arg(&n_i).arg(&k_i).arg(&c_i);
    // SAFETY: the tensor maps describe exactly x [T, K], w [4C, K] and gqkv [T, 4C] (alive
    // until the guards drop after the launch; TMA writes rows < T only); pos holds T values
    // (checked), read on rows < T; 4C and K are multiples of the tile and the K block, C of
    // the tile (asserted); `SMEM_FWD` bytes allowed in `prepare`.
    unsafe { args.launch(cfg) }.during(OP)?;
    Ok(())
}

/// gu: [T, 2I] bf16 = x [T, K] @ w [2I, K]^T and act: [T, I] = silu(gate) * up from it, in one
/// kernel on a Hopper GPU. Without `gu` only act is written (a pass that keeps no
/// activations). Panics unless [`supports_swiglu`]`(i, k)`.
#[allow(clippy::too_many_arguments)]
pub fn linear_swiglu_fwd_sm90(gpu: &Gpu, gu: Option<&mut CudaViewMut<bf16>>, act: &mut CudaViewMut<bf16>, x: &CudaView<bf16>, w: &CudaView<bf16>, t: usize, i: usize, k: usize) -> Result<(), GpuError> {
    const OP: &str = "linear_swiglu_fwd_sm90";
    assert!(supports_swiglu(gpu, i, k), "{OP}: needs a Hopper GPU, I = {i} a multiple of {} and K = {k} of {K_BLOCK}", TILE_N / 2);
    expect_operands(OP, gpu, x, w, t, &[("2I", 2 * i), ("K", k)], k);
    expect_len(OP, "act", act.len(), &[("T", t), ("I", i)]);
    expect_aligned16(OP, "act", gpu, act);
    if let Some(gu) = gu.as_ref() {
        expect_len(OP, "gu", gu.len(), &[("T", t), ("2I", 2 * i)]);
        expect_aligned16(OP, "gu", gpu, *gu);
    }
    if t == 0 {
        return Ok(());
    }
    let (x_ptr, _x) = x.device_ptr(&gpu.stream);
    let (w_ptr, _w) = w.device_ptr(&gpu.stream);
    let (func, cfg) = prepare(gpu, OP, "gemm_swiglu_sm90", SMEM_FWD, t, i / (TILE_N / 2))?;
    let tm_x = x_map(x_ptr, t, k)?;
    let tm_w = w_map_k_major(w_ptr, 2 * i, k)?;
    let gu = gu.map(|g| g.device_ptr_mut(&gpu.stream));
    // Without gu the kernel stores nothing through its map: x's stands in.
    let (tm_gu, store_gu) = match gu.as_ref() {
        Some((gu_ptr, _)) => (tensor_map(*gu_ptr, t, 2 * i / K_BLOCK, 2 * i, STORE_BOX_ROWS)?, 1i32),
        None => (tm_x, 0),
    };
    let (act_ptr, _act) = act.device_ptr_mut(&gpu.stream);
    let (t_i, i_i, k_i) = (as_i32(OP, "T", t), as_i32(OP, "I", i), as_i32(OP, "K", k));
    let mut args = gpu.stream.launch_builder(&func);
    args.arg(&tm_x).arg(&tm_w).arg(&tm_gu).arg(&store_gu).arg(&act_ptr).arg(&t_i).arg(&i_i).arg(&k_i);
    // SAFETY: the tensor maps describe exactly x [T, K], w [2I, K] and gu [T, 2I] (alive until
    // the guards drop after the launch; TMA writes rows < T only); act holds T * I bf16
    // (checked), written on rows < T only; I and K are multiples of the tile and the K block
    // (asserted); `SMEM_FWD` bytes allowed in `prepare`.
    unsafe { args.launch(cfg) }.during(OP)?;
    Ok(())
}

/// dgu: [T, 2I] bf16 = swiglu_bwd(dact, gu) of dact [T, I] = dy [T, D] @ w [D, I] (the down
/// projection's input gradient, w as stored), in one kernel on a Hopper GPU: the bits of the
/// product rounded to bf16 followed by `swiglu_bwd`. dact is written only when given. Panics
/// unless [`supports_swiglu_bwd`]`(i, d)`.
#[allow(clippy::too_many_arguments)]
pub fn linear_swiglu_bwd_sm90(
    gpu: &Gpu,
    dgu: &mut CudaViewMut<bf16>,
    dact: Option<&mut CudaViewMut<bf16>>,
    dy: &CudaView<bf16>,
    w: &CudaView<bf16>,
    gu: &CudaView<bf16>,
    t: usize,
    d: usize,
    i: usize,
) -> Result<(), GpuError> {
    const OP: &str = "linear_swiglu_bwd_sm90";
    assert!(supports_swiglu_bwd(gpu, i, d), "{OP}: needs a Hopper GPU, I = {i} a multiple of {TILE_N} and D = {d} of {K_BLOCK}");
    expect_operands(OP, gpu, dy, w, t, &[("D", d), ("I", i)], d);
    expect_len(OP, "gu", gu.len(), &[("T", t), ("2I", 2 * i)]);
    expect_len(OP, "dgu", dgu.len(), &[("T", t), ("2I", 2 * i)]);
    expect_aligned16(OP, "gu", gpu, gu);
    expect_aligned16(OP, "dgu", gpu, dgu);
    if let Some(dact) = dact.as_ref() {
        expect_len(OP, "dact", dact.len(), &[("T", t), ("I", i)]);
        expect_aligned16(OP, "dact", gpu, *dact);
    }
    if t == 0 {
        return Ok(());
    }
    let (dy_ptr, _dy) = dy.device_ptr(&gpu.stream);
    let (w_ptr, _w) = w.device_ptr(&gpu.stream);
    let (func, cfg) = prepare(gpu, OP, "gemm_swiglu_bwd_sm90", SMEM_BWD, t, i / TILE_N)?;
    let tm_dy = tensor_map_boxed(dy_ptr, t, d / K_BLOCK, d, (BWD_K_STEP, TILE_M), CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_64B)?;
    // w [D, I]: B's K runs over w's rows, its columns are the output's
    let tm_w = tensor_map(w_ptr, d, i / K_BLOCK, i, BWD_K_STEP)?;
    let (gu_ptr, _gu) = gu.device_ptr(&gpu.stream);
    // gu comes in units of 32 rows
    let tm_gu = tensor_map(gu_ptr, t, 2 * i / K_BLOCK, 2 * i, 32)?;
    let dact = dact.map(|a| a.device_ptr_mut(&gpu.stream));
    // Without dact the kernel stores nothing through its map: gu's stands in.
    let (tm_dact, store_dact) = match dact.as_ref() {
        Some((dact_ptr, _)) => (tensor_map(*dact_ptr, t, i / K_BLOCK, i, STORE_BOX_ROWS)?, 1i32),
        None => (tm_gu, 0),
    };
    let (dgu_ptr, _dgu) = dgu.device_ptr_mut(&gpu.stream);
    let (t_i, i_i, d_i) = (as_i32(OP, "T", t), as_i32(OP, "I", i), as_i32(OP, "D", d));
    let mut args = gpu.stream.launch_builder(&func);
    args.arg(&tm_dy).arg(&tm_w).arg(&tm_dact).arg(&tm_gu).arg(&store_dact).arg(&dgu_ptr).arg(&t_i).arg(&i_i).arg(&d_i);
    // SAFETY: the tensor maps describe exactly dy [T, D], w [D, I], dact [T, I] and gu [T, 2I]
    // (alive until the guards drop after the launch; TMA writes rows < T only); dgu holds
    // T * 2I bf16 (checked), written on rows < T only; I and D are multiples of the tile and
    // the K block (asserted); `SMEM_BWD` bytes allowed in `prepare`.
    unsafe { args.launch(cfg) }.during(OP)?;
    Ok(())
}

pub fn selftests() -> Vec<Check> {
    vec![
        Check { name: "linear_fwd_sm90", run: check_fwd },
        Check { name: "linear_rope_fwd_sm90", run: check_rope },
        Check { name: "linear_swiglu_fwd_sm90", run: check_swiglu },
        Check { name: "linear_swiglu_bwd_sm90", run: check_swiglu_bwd },
    ]
}

/// (T, N, K, input scale): one partial row tile, several tiles each way, the XL projections'
/// N and K, large inputs.
const SHAPES: [(usize, usize, usize, f32); 4] = [(1, 256, 128, 1.0), (333, 512, 384, 1.0), (1000, 1536, 1536, 1.0), (129, 768, 4096, 100.0)];

/// Against the CPU reference with `ops::gemm`'s tolerance for a bf16 output; no rows off
/// Hopper.
fn check_fwd(gpu: &Gpu, rng: &mut Rng) -> Result<Vec<Row>, GpuError> {
    let mut rows = Vec::new();
    for (t, n, k, scale) in SHAPES {
        if !supports(gpu, n, k) {
            continue;
        }
        let (x, w) = (bf16_inputs(rng, t * k, scale), bf16_inputs(rng, n * k, 1.0));
        let (dx, dw) = (upload_bf16(gpu, &x)?, upload_bf16(gpu, &w)?);
        let tol = bf16_out_tol(k, scale, 1.0);
        let mut want = vec![0.0; t * n];
        linear_fwd_cpu(&mut want, &x, &w, None, t, n, k);
        let mut y = poisoned_bf16(gpu, t * n)?;
        linear_fwd_sm90(gpu, &mut y.as_view_mut(), &dx.as_view(), &dw.as_view(), t, n, k)?;
        rows.push(Row::new("linear_fwd_sm90 y = x w^T", format!("[{t},{n},{k}] x{scale}"), tol, compare(&download_bf16(gpu, &y)?, &want, tol)));
    }
    Ok(rows)
}

/// (T, NH, K, input scale): one partial row tile, several tiles each way, the XL projection,
/// large inputs.
const ROPE_SHAPES: [(usize, usize, usize, f32); 4] = [(1, 2, 128, 1.0), (333, 2, 384, 1.0), (1000, 12, 1536, 1.0), (129, 4, 1536, 30.0)];

/// Bit for bit against `qkv_rope_fwd` of the plain product (both checked against the CPU
/// reference by their own rows), positions up to 4095. No rows off Hopper.
fn check_rope(gpu: &Gpu, rng: &mut Rng) -> Result<Vec<Row>, GpuError> {
    let mut rows = Vec::new();
    for (t, nh, k, scale) in ROPE_SHAPES {
        if !supports_rope(gpu, nh, k) {
            continue;
        }
        let n = 4 * nh * HEAD_DIM;
        let (x, w) = (bf16_inputs(rng, t * k, scale), bf16_inputs(rng, n * k, 1.0));
        let pos: Vec<i32> = (0..t).map(|_| (rng.uniform() * 4096.0) as i32).collect();
        let (dx, dw, dpos) = (upload_bf16(gpu, &x)?, upload_bf16(gpu, &w)?, upload(gpu, &pos)?);
        let mut want = poisoned_bf16(gpu, t * n)?;
        linear_fwd_sm90(gpu, &mut want.as_view_mut(), &dx.as_view(), &dw.as_view(), t, n, k)?;
        qkv_rope_fwd(gpu, &mut want.as_view_mut(), &dpos.as_view(), t, nh)?;
        let mut got = poisoned_bf16(gpu, t * n)?;
        linear_rope_fwd_sm90(gpu, &mut got.as_view_mut(), &dx.as_view(), &dw.as_view(), &dpos.as_view(), t, nh, k)?;
        let exact = Tolerance { abs: 0.0, rel: 0.0 };
        rows.push(Row::new("linear_rope_fwd_sm90 (= qkv_rope_fwd of the product)", format!("[{t},{n},{k}] x{scale}"), exact, compare(&download_bf16(gpu, &got)?, &download_bf16(gpu, &want)?, exact)));
    }
    Ok(rows)
}

/// (T, I, K, input scale): one partial row tile, several tiles each way, the XL MLP's I and K,
/// large inputs.
const SWIGLU_SHAPES: [(usize, usize, usize, f32); 4] = [(1, 128, 128, 1.0), (333, 384, 384, 1.0), (1000, 4096, 1536, 1.0), (129, 256, 1536, 30.0)];

/// gu against the CPU product (`ops::gemm`'s tolerance); act against the CPU SwiGLU of the gu
/// the kernel wrote (one bf16 rounding) and, bit for bit, against `swiglu_fwd` of that gu; act
/// alone (no gu) against act with gu. No rows off Hopper.
fn check_swiglu(gpu: &Gpu, rng: &mut Rng) -> Result<Vec<Row>, GpuError> {
    let mut rows = Vec::new();
    for (t, i, k, scale) in SWIGLU_SHAPES {
        if !supports_swiglu(gpu, i, k) {
            continue;
        }
        let (x, w) = (bf16_inputs(rng, t * k, scale), bf16_inputs(rng, 2 * i * k, 1.0));
        let (dx, dw) = (upload_bf16(gpu, &x)?, upload_bf16(gpu, &w)?);
        let shape = format!("[{t},{i},{k}] x{scale}");
        let (mut gu, mut act) = (poisoned_bf16(gpu, t * 2 * i)?, poisoned_bf16(gpu, t * i)?);
        linear_swiglu_fwd_sm90(gpu, Some(&mut gu.as_view_mut()), &mut act.as_view_mut(), &dx.as_view(), &dw.as_view(), t, i, k)?;
        let (gu_got, act_got) = (download_bf16(gpu, &gu)?, download_bf16(gpu, &act)?);

        let mut gu_want = vec![0.0; t * 2 * i];
        linear_fwd_cpu(&mut gu_want, &x, &w, None, t, 2 * i, k);
        let tol = bf16_out_tol(k, scale, 1.0);
        rows.push(Row::new("linear_swiglu_fwd_sm90 gu", shape.clone(), tol, compare(&gu_got, &gu_want, tol)));

        let mut act_want = vec![0.0; t * i];
        swiglu_fwd_cpu(&mut act_want, &gu_got, t, i);
        let tol = Tolerance { abs: 1e-30, rel: 2.0 * BF16_EPS };
        rows.push(Row::new("linear_swiglu_fwd_sm90 act", shape.clone(), tol, compare(&act_got, &act_want, tol)));

        let exact = Tolerance { abs: 0.0, rel: 0.0 };
        let mut act_unfused = poisoned_bf16(gpu, t * i)?;
        swiglu_fwd(gpu, &mut act_unfused.as_view_mut(), &gu.as_view(), t, i)?;
        rows.push(Row::new("linear_swiglu_fwd_sm90 act (= swiglu_fwd)", shape.clone(), exact, compare(&act_got, &download_bf16(gpu, &act_unfused)?, exact)));

        let mut act_only = poisoned_bf16(gpu, t * i)?;
        linear_swiglu_fwd_sm90(gpu, None, &mut act_only.as_view_mut(), &dx.as_view(), &dw.as_view(), t, i, k)?;
        rows.push(Row::new("linear_swiglu_fwd_sm90 act, no gu (=)", shape, exact, compare(&download_bf16(gpu, &act_only)?, &act_got, exact)));
    }
    Ok(rows)
}

/// (T, D, I, dy scale): one partial row tile, several tiles each way, the XL MLP's D and I,
/// large gradients.
const SWIGLU_BWD_SHAPES: [(usize, usize, usize, f32); 4] = [(1, 128, 256, 1.0), (333, 384, 512, 1.0), (1000, 1536, 4096, 1.0), (129, 1536, 256, 30.0)];

/// dact (stored on request) against the CPU product `linear_bwd_input_cpu` (`ops::gemm`'s
/// tolerance); dgu bit for bit against `swiglu_bwd` of that dact (checked against the CPU by
/// its own rows); dgu without dact against dgu with it. gu at scale 3 reaches the sigmoid's
/// flat ends. No rows off Hopper.
fn check_swiglu_bwd(gpu: &Gpu, rng: &mut Rng) -> Result<Vec<Row>, GpuError> {
    let mut rows = Vec::new();
    for (t, d, i, scale) in SWIGLU_BWD_SHAPES {
        if !supports_swiglu_bwd(gpu, i, d) {
            continue;
        }
        let (dy, w, gu) = (bf16_inputs(rng, t * d, scale), bf16_inputs(rng, d * i, 1.0), bf16_inputs(rng, t * 2 * i, 3.0));
        let (ddy, dw, dgu_in) = (upload_bf16(gpu, &dy)?, upload_bf16(gpu, &w)?, upload_bf16(gpu, &gu)?);
        let shape = format!("[{t},{d},{i}] x{scale}");
        let (mut dgu, mut dact) = (poisoned_bf16(gpu, t * 2 * i)?, poisoned_bf16(gpu, t * i)?);
        linear_swiglu_bwd_sm90(gpu, &mut dgu.as_view_mut(), Some(&mut dact.as_view_mut()), &ddy.as_view(), &dw.as_view(), &dgu_in.as_view(), t, d, i)?;

        let mut dact_want = vec![0.0; t * i];
        linear_bwd_input_cpu(&mut dact_want, &dy, &w, t, d, i);
        let tol = bf16_out_tol(d, scale, 1.0);
        rows.push(Row::new("linear_swiglu_bwd_sm90 dact = dy w", shape.clone(), tol, compare(&download_bf16(gpu, &dact)?, &dact_want, tol)));

        let exact = Tolerance { abs: 0.0, rel: 0.0 };
        let mut dgu_unfused = poisoned_bf16(gpu, t * 2 * i)?;
        swiglu_bwd(gpu, &mut dgu_unfused.as_view_mut(), &dact.as_view(), &dgu_in.as_view(), t, i)?;
        let dgu_got = download_bf16(gpu, &dgu)?;
        rows.push(Row::new("linear_swiglu_bwd_sm90 dgu (= swiglu_bwd)", shape.clone(), exact, compare(&dgu_got, &download_bf16(gpu, &dgu_unfused)?, exact)));

        let mut dgu_only = poisoned_bf16(gpu, t * 2 * i)?;
        linear_swiglu_bwd_sm90(gpu, &mut dgu_only.as_view_mut(), None, &ddy.as_view(), &dw.as_view(), &dgu_in.as_view(), t, d, i)?;
        rows.push(Row::new("linear_swiglu_bwd_sm90 dgu, no dact (=)", shape, exact, compare(&download_bf16(gpu, &dgu_only)?, &dgu_got, exact)));
    }
    Ok(rows)
}
