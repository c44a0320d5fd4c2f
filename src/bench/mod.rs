//! `hrm-cu bench <target>`: kernels timed against the card's ceilings measured in the same run.
//!
//! Method (see STYLE.md §7): CUDA events around each launch after warm-up runs, the median of
//! the repeats, inputs rotated through several copies when one copy would fit in L2, random
//! data (never zeros). Each memory-bound row counts the fewest bytes its kernel must move
//! (every input read once, every output written once) and is compared with a large
//! device-to-device copy (bytes read + written); each matrix row counts `2*M*N*K` flops and
//! is compared with an 8192^3 bf16 cuBLASLt GEMM, both measured in the same run.

pub mod attention;
pub mod gemm;
pub mod kernels;
pub mod train;

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaSlice, DeviceRepr};
use half::bf16;
use rayon::prelude::*;

use crate::gpu::{DriverContext, Gpu, GpuError};
use crate::rng::Rng;

/// One `hrm-cu bench` target. Adding a target is one line in [`TARGETS`].
pub struct Target {
    pub name: &'static str,
    pub about: &'static str,
    pub run: fn(&Gpu) -> anyhow::Result<()>,
}

/// Every bench target, by the name the command line takes.
pub const TARGETS: &[Target] = &[
    Target { name: "kernels", about: "every op kernel and GEMM at the XL shapes", run: kernels::run },
    Target { name: "gemm", about: "our Hopper GEMM against cuBLASLt at the XL step's shapes, under sustained load", run: gemm::run },
    Target { name: "attention", about: "PrefixLM attention on the three packed batches of the attention issue", run: attention::run },
    Target { name: "train", about: "training steps of XL hrm (bp_steps 5, 12,288 tokens): tokens/s, MFU, memory", run: train::run_default },
];

/// Median time in milliseconds of `run(i)` over `iters` repeats after `warmup` untimed ones;
/// `i` counts every call (warm-up included) so the caller can rotate its inputs. Each repeat
/// sits between two CUDA events; the launches are queued without waiting, so once the queue
/// is ahead of the GPU consecutive repeats run back to back.
pub fn time_ms(gpu: &Gpu, warmup: usize, iters: usize, mut run: impl FnMut(usize) -> Result<(), GpuError>) -> Result<f64, GpuError> {
    assert!(iters > 0, "time_ms: iters must be positive");
    for i in 0..warmup {
        run(i)?;
    }
    let event = || gpu.stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).during("recording a timing event");
    let mut pairs = Vec::with_capacity(iters);
    for i in 0..iters {
        let start = event()?;
        run(warmup + i)?;
        pairs.push((start, event()?));
    }
    let mut times = pairs.iter().map(|(s, e)| s.elapsed_ms(e).map(f64::from)).collect::<Result<Vec<_>, _>>().during("reading timing events")?;
    times.sort_by(f64::total_cmp);
    Ok(times[iters / 2])
}

/// How many copies of a working set of `bytes` to rotate through so that consecutive
/// repeats do not find their inputs in L2: enough copies for twice the L2 size, at most 64.
pub fn rotation_sets(gpu: &Gpu, bytes: usize) -> usize {
    (2 * gpu.props.l2_bytes).div_ceil(bytes.max(1)).clamp(1, 64)
}

/// `n` random bf16 uniform in `[-scale, scale)`, drawn on the host in parallel from `seed`.
pub fn random_bf16(gpu: &Gpu, n: usize, scale: f32, seed: u64) -> Result<CudaSlice<bf16>, GpuError> {
    let host = random_host(n, seed, |rng| bf16::from_f32(((rng.uniform() * 2.0 - 1.0) * scale as f64) as f32));
    upload(gpu, &host)
}

/// `n` random i32 in `0..below`.
pub fn random_i32(gpu: &Gpu, n: usize, below: u64, seed: u64) -> Result<CudaSlice<i32>, GpuError> {
    let host = random_host(n, seed, |rng| rng.below(below) as i32);
    upload(gpu, &host)
}

/// Fills `n` values chunk by chunk in parallel, chunk `c` from `Rng::new(seed ^ c)`.
pub fn random_host<T: Send + Default + Clone>(n: usize, seed: u64, draw: impl Fn(&mut Rng) -> T + Sync) -> Vec<T> {
    const CHUNK: usize = 1 << 20;
    let mut host = vec![T::default(); n];
    host.par_chunks_mut(CHUNK).enumerate().for_each(|(c, part)| {
        let mut rng = Rng::new(seed ^ (c as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        part.iter_mut().for_each(|x| *x = draw(&mut rng));
    });
    host
}

pub fn upload<T: DeviceRepr>(gpu: &Gpu, host: &[T]) -> Result<CudaSlice<T>, GpuError> {
    gpu.stream.clone_htod(host).during(format!("uploading {} bench values", host.len()))
}

/// What a row's time is compared with.
#[derive(Clone, Copy, Debug)]
pub enum Work {
    /// Fewest bytes the kernel must move through device memory.
    Bytes(f64),
    /// Floating-point operations.
    Flops(f64),
    /// Too small to be bound by either: the time alone.
    Latency,
}

/// One line of a bench table.
#[derive(Clone, Debug)]
pub struct Measurement {
    pub name: String,
    pub shape: String,
    pub ms: f64,
    pub work: Work,
    pub note: String,
}

/// The ceilings of this card in this run: copy bandwidth (bytes read + written per second)
/// and the bf16 GEMM rate.
#[derive(Clone, Copy, Debug)]
pub struct Ceilings {
    pub copy_bytes_per_s: f64,
    pub gemm_flops_per_s: f64,
}

/// Prints the table: time, achieved GB/s or TFLOP/s and the percentage of the ceiling.
pub fn print_table(gpu: &Gpu, ceilings: &Ceilings, rows: &[Measurement]) {
    let p = &gpu.props;
    println!();
    println!(
        "{} (sm_{}{}, {} SMs, L2 {} MiB): copy {:.0} GB/s (read + write), bf16 GEMM {:.0} TFLOP/s, both measured in this run",
        p.name,
        p.major,
        p.minor,
        p.sm_count,
        p.l2_bytes >> 20,
        ceilings.copy_bytes_per_s / 1e9,
        ceilings.gemm_flops_per_s / 1e12
    );
    println!("{:<34} {:<30} {:>10} {:>14} {:>8}  note", "kernel", "shape", "time us", "rate", "% ceil");
    for r in rows {
        let seconds = r.ms / 1e3;
        let (rate, pct) = match r.work {
            Work::Bytes(b) => (format!("{:.0} GB/s", b / seconds / 1e9), format!("{:.1}", 100.0 * b / seconds / ceilings.copy_bytes_per_s)),
            Work::Flops(f) => (format!("{:.0} TFLOP/s", f / seconds / 1e12), format!("{:.1}", 100.0 * f / seconds / ceilings.gemm_flops_per_s)),
            Work::Latency => ("-".into(), "-".into()),
        };
        println!("{:<34} {:<30} {:>10.1} {:>14} {:>8}  {}", r.name, r.shape, r.ms * 1e3, rate, pct, r.note);
    }
}
