//! `hrm-cu bench gemm`: our Hopper product (`ops::gemm_sm90`) against cuBLASLt's at the XL
//! training step's shapes (12,288 tokens), under sustained load.
//!
//! `bench kernels` times bursts of 20 calls, which run at the card's full clock. A training
//! step keeps the card at its power limit, where the clock falls by a quarter and the two
//! products no longer rank the same (docs/design/gemm-epilogues.md). Here each route runs
//! back to back for about `BLOCK_MS`, in rounds that alternate the routes, so every route sees
//! the same thermal and power state; a row gives each round's time per call and their median.
//! The fused routes (RoPE, SwiGLU, SwiGLU's backward in the epilogue) are timed against the
//! product plus the separate pass they replace. Each shape's calls run inside the NVTX range `bench gemm
//! <shape>`, so Nsight Compute can pick one shape (`--nvtx --nvtx-include "bench gemm gate_up/"`).

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::CudaSlice;
use half::bf16;

use crate::bench::kernels::{C, D, I, NH};
use crate::bench::{random_bf16, random_i32, time_ms};
use crate::gpu::nvtx::Range;
use crate::gpu::{DriverContext, Gpu, GpuError};
use crate::ops::gemm::{linear_bwd_input, linear_fwd, GemmCache, GemmOp, GemmShape};
use crate::ops::gemm_sm90::{linear_fwd_sm90, linear_rope_fwd_sm90, linear_swiglu_bwd_sm90, linear_swiglu_fwd_sm90, supports, supports_rope, supports_swiglu, supports_swiglu_bwd};
use crate::ops::rope::qkv_rope_fwd;
use crate::ops::swiglu::{swiglu_bwd, swiglu_fwd};

/// Tokens of the step's packed batch.
const T: usize = 12_288;
/// Rounds over the routes of a shape.
const ROUNDS: usize = 3;
/// Length of one route's sustained block in a round.
const BLOCK_MS: f64 = 400.0;

/// One way of computing a shape's output.
#[derive(Clone, Copy, PartialEq)]
enum Route {
    Cublas,
    Ours,
    /// cuBLASLt's product, then `qkv_rope_fwd` / `swiglu_fwd` / `swiglu_bwd`.
    CublasThenPass,
    /// Ours with the pass in its epilogue.
    OursFused,
}

impl Route {
    fn label(self, shape: &Shape) -> String {
        match (self, shape.epilogue) {
            (Route::Cublas, _) => "cuBLASLt".into(),
            (Route::Ours, _) => "ours".into(),
            (Route::CublasThenPass, Epilogue::Rope) => "cuBLASLt + qkv_rope_fwd".into(),
            (Route::CublasThenPass, Epilogue::SwigluBwd) => "cuBLASLt + swiglu_bwd".into(),
            (Route::CublasThenPass, _) => "cuBLASLt + swiglu_fwd".into(),
            (Route::OursFused, Epilogue::Rope) => "ours, RoPE epilogue".into(),
            (Route::OursFused, Epilogue::SwigluBwd) => "ours, SwiGLU bwd epilogue".into(),
            (Route::OursFused, _) => "ours, SwiGLU epilogue".into(),
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Epilogue {
    None,
    Rope,
    Swiglu,
    /// The input gradient dact [T, K] = dy [T, N] @ w [N, K] (the down projection's), then
    /// SwiGLU's backward.
    SwigluBwd,
}

/// A product of an XL block with w [N, K]: the forward y [T, N] = x [T, K] @ w^T, or for
/// `Epilogue::SwigluBwd` the input gradient [T, K] = x [T, N] @ w.
struct Shape {
    nvtx: &'static str,
    n: usize,
    k: usize,
    epilogue: Epilogue,
}

const SHAPES: [Shape; 5] = [
    Shape { nvtx: "bench gemm gqkv", n: 4 * C, k: D, epilogue: Epilogue::Rope },
    Shape { nvtx: "bench gemm o", n: D, k: C, epilogue: Epilogue::None },
    Shape { nvtx: "bench gemm gate_up", n: 2 * I, k: D, epilogue: Epilogue::Swiglu },
    Shape { nvtx: "bench gemm down", n: D, k: I, epilogue: Epilogue::None },
    Shape { nvtx: "bench gemm down dx", n: D, k: I, epilogue: Epilogue::SwigluBwd },
];

impl Shape {
    /// (rows of x's columns, y's columns): (K, N) forward, (N, K) for the input gradient.
    fn in_out(&self) -> (usize, usize) {
        if self.epilogue == Epilogue::SwigluBwd {
            (self.n, self.k)
        } else {
            (self.k, self.n)
        }
    }
}

/// The operands of one shape and what its routes write.
struct Operands {
    x: CudaSlice<bf16>,
    w: CudaSlice<bf16>,
    y: CudaSlice<bf16>,
    /// SwiGLU's act [T, N / 2].
    act: CudaSlice<bf16>,
    /// SwiGLU's backward: gu and dgu [T, 2K] (empty for the other shapes).
    gu: CudaSlice<bf16>,
    dgu: CudaSlice<bf16>,
    /// RoPE's positions [T]: samples of up to 4,096 tokens.
    pos: CudaSlice<i32>,
}

impl Operands {
    fn run(&mut self, gpu: &Gpu, gemm: &GemmCache, shape: &Shape, route: Route) -> Result<(), GpuError> {
        let (n, k) = (shape.n, shape.k);
        let (x, w) = (self.x.as_view(), self.w.as_view());
        let y = &mut self.y.as_view_mut();
        match (route, shape.epilogue) {
            (Route::Cublas, Epilogue::SwigluBwd) => linear_bwd_input(gpu, gemm, y, &x, &w, T, n, k),
            (Route::CublasThenPass, Epilogue::SwigluBwd) => {
                linear_bwd_input(gpu, gemm, y, &x, &w, T, n, k)?;
                swiglu_bwd(gpu, &mut self.dgu.as_view_mut(), &self.y.as_view(), &self.gu.as_view(), T, k)
            }
            (Route::OursFused, Epilogue::SwigluBwd) => linear_swiglu_bwd_sm90(gpu, &mut self.dgu.as_view_mut(), None, &x, &w, &self.gu.as_view(), T, n, k),
            (Route::Ours, Epilogue::SwigluBwd) => unreachable!("the input gradient has no plain route of ours"),
            (Route::Cublas, _) => linear_fwd(gpu, gemm, y, &x, &w, None, T, n, k),
            (Route::Ours, _) => linear_fwd_sm90(gpu, y, &x, &w, T, n, k),
            (Route::CublasThenPass, Epilogue::Rope) => {
                linear_fwd(gpu, gemm, y, &x, &w, None, T, n, k)?;
                qkv_rope_fwd(gpu, y, &self.pos.as_view(), T, NH)
            }
            (Route::CublasThenPass, _) => {
                linear_fwd(gpu, gemm, y, &x, &w, None, T, n, k)?;
                swiglu_fwd(gpu, &mut self.act.as_view_mut(), &self.y.as_view(), T, n / 2)
            }
            (Route::OursFused, Epilogue::Rope) => linear_rope_fwd_sm90(gpu, y, &x, &w, &self.pos.as_view(), T, NH, k),
            (Route::OursFused, _) => linear_swiglu_fwd_sm90(gpu, Some(y), &mut self.act.as_view_mut(), &x, &w, T, n / 2, k),
        }
    }
}

pub fn run(gpu: &Gpu) -> anyhow::Result<()> {
    if !SHAPES.iter().all(|s| supports(gpu, s.in_out().1, s.in_out().0)) {
        anyhow::bail!("bench gemm compares our Hopper product with cuBLASLt's: it needs an sm_90 GPU, and {} is sm_{}{}", gpu.props.name, gpu.props.major, gpu.props.minor);
    }
    let gemm = GemmCache::new(gpu)?;
    let p = &gpu.props;
    println!("{} (sm_{}{}, {} SMs): products at T = {T}, each route sustained for ~{BLOCK_MS:.0} ms per round, {ROUNDS} rounds", p.name, p.major, p.minor, p.sm_count);
    println!("{:<10} {:<18} {:<26} {:>28} {:>10} {:>10} {:>8}", "product", "shape", "route", "us per call, each round", "median", "TFLOP/s", "vs 1st");
    for (index, shape) in SHAPES.iter().enumerate() {
        let _range = Range::push(shape.nvtx);
        let seed = 1000 * index as u64;
        let (x_cols, y_cols) = shape.in_out();
        let backward = shape.epilogue == Epilogue::SwigluBwd;
        let gu_len = if backward { T * 2 * shape.k } else { 0 };
        let mut ops = Operands {
            x: random_bf16(gpu, T * x_cols, 1.0, seed + 1)?,
            w: random_bf16(gpu, shape.n * shape.k, 1.0, seed + 2)?,
            y: gpu.stream.alloc_zeros::<bf16>(T * y_cols).during("allocating bench outputs")?,
            act: gpu.stream.alloc_zeros::<bf16>(T * shape.n / 2).during("allocating bench outputs")?,
            gu: random_bf16(gpu, gu_len, 3.0, seed + 4)?,
            dgu: gpu.stream.alloc_zeros::<bf16>(gu_len).during("allocating bench outputs")?,
            pos: random_i32(gpu, T, 4096, seed + 3)?,
        };
        let op = if backward { GemmOp::BackwardInput } else { GemmOp::Forward };
        gemm.prepare(&[GemmShape { op, t: T, n: shape.n, k: shape.k }])?;
        let routes = routes(gpu, shape);
        // Calls per block, from a short burst of each route.
        let calls: Vec<usize> = routes
            .iter()
            .map(|&r| Ok((BLOCK_MS / time_ms(gpu, 3, 5, |_| ops.run(gpu, &gemm, shape, r))?).ceil() as usize))
            .collect::<Result<_, GpuError>>()?;
        let mut rounds = vec![Vec::with_capacity(ROUNDS); routes.len()];
        for _ in 0..ROUNDS {
            for (r, &route) in routes.iter().enumerate() {
                rounds[r].push(sustained_us(gpu, calls[r], || ops.run(gpu, &gemm, shape, route))?);
            }
        }
        let flops = 2.0 * (T * shape.n * shape.k) as f64;
        let medians: Vec<f64> = rounds.iter().map(|t| median(t)).collect();
        for (r, &route) in routes.iter().enumerate() {
            let each: Vec<String> = rounds[r].iter().map(|us| format!("{us:.1}")).collect();
            // Fused routes compare with the product plus its pass, plain ones with cuBLASLt.
            let base_route = if route == Route::OursFused { Route::CublasThenPass } else { Route::Cublas };
            let base = medians[routes.iter().position(|&r| r == base_route).expect("every shape times its base routes")];
            println!(
                "{:<10} {:<18} {:<26} {:>28} {:>10.1} {:>10.0} {:>+7.1}%",
                shape.nvtx.trim_start_matches("bench gemm "),
                format!("N={} K={}", shape.n, shape.k),
                route.label(shape),
                each.join(" "),
                medians[r],
                flops / (medians[r] * 1e-6) / 1e12,
                100.0 * (medians[r] / base - 1.0)
            );
        }
    }
    Ok(())
}

/// The routes timed for `shape`: cuBLASLt and ours, and for a shape with an epilogue the
/// product plus its pass and our fused kernel.
fn routes(gpu: &Gpu, shape: &Shape) -> Vec<Route> {
    let fused = match shape.epilogue {
        Epilogue::None => false,
        Epilogue::Rope => supports_rope(gpu, NH, shape.k),
        Epilogue::Swiglu => supports_swiglu(gpu, shape.n / 2, shape.k),
        Epilogue::SwigluBwd => supports_swiglu_bwd(gpu, shape.k, shape.n),
    };
    // (our kernel computes the input gradient only with the SwiGLU backward after it)
    let mut routes = vec![Route::Cublas];
    if shape.epilogue != Epilogue::SwigluBwd {
        routes.push(Route::Ours);
    }
    if fused {
        routes.extend([Route::CublasThenPass, Route::OursFused]);
    }
    routes
}

/// Microseconds per call of `calls` back-to-back calls of `run`, between two events.
fn sustained_us(gpu: &Gpu, calls: usize, mut run: impl FnMut() -> Result<(), GpuError>) -> Result<f64, GpuError> {
    let event = || gpu.stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).during("recording a timing event");
    let start = event()?;
    for _ in 0..calls {
        run()?;
    }
    let end = event()?;
    Ok(1e3 * start.elapsed_ms(&end).during("reading timing events")? as f64 / calls as f64)
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
