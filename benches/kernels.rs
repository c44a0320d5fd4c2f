//! Criterion benchmarks of the op families: the fp32 CPU references always, and the GPU
//! kernels when this machine has a GPU (timed with CUDA events through `iter_custom`; without
//! one they are skipped with a message). `hrm-cu bench kernels` is the full table against
//! the card's ceilings; this is the quick regression check.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use cudarc::driver::sys::CUevent_flags;
use half::bf16;

use hrm_cu::bench::{random_bf16, random_host, upload};
use hrm_cu::gpu::{Gpu, GpuError};
use hrm_cu::ops::cross_entropy::{cross_entropy, cross_entropy_cpu, IGNORE_LABEL};
use hrm_cu::ops::gemm::{linear_fwd, linear_fwd_cpu, GemmCache};
use hrm_cu::ops::rmsnorm::{rmsnorm_fwd, rmsnorm_fwd_cpu};
use hrm_cu::ops::rope::qkv_rope_fwd_cpu;
use hrm_cu::ops::swiglu::swiglu_fwd_cpu;
use hrm_cu::rng::Rng;

fn cpu_references(c: &mut Criterion) {
    let mut rng = Rng::new(1);
    let mut group = c.benchmark_group("cpu");
    group.sample_size(10);

    let (t, n, k) = (256, 1536, 1536);
    let (x, w) = (rng.uniform_vec(t * k, 1.0), rng.uniform_vec(n * k, 1.0));
    let mut y = vec![0.0; t * n];
    group.throughput(Throughput::Elements((2 * t * n * k) as u64));
    group.bench_function("linear_fwd_cpu [256,1536,1536] (flops)", |b| b.iter(|| linear_fwd_cpu(&mut y, &x, &w, None, t, n, k)));

    let (t, d) = (2048, 1536);
    let x = rng.uniform_vec(t * d, 1.0);
    let (mut y, mut rstd) = (vec![0.0; t * d], vec![0.0; t]);
    group.throughput(Throughput::Bytes((2 * t * d * 4) as u64));
    group.bench_function("rmsnorm_fwd_cpu [2048,1536]", |b| b.iter(|| rmsnorm_fwd_cpu(&mut y, &mut rstd, &x, t, d)));

    let (t, nh) = (1024, 12);
    let cols = nh * 128;
    let mut gqkv = rng.uniform_vec(t * 4 * cols, 1.0);
    let pos: Vec<i32> = (0..t as i32).collect();
    // In place: the q and k blocks are read and written.
    group.throughput(Throughput::Bytes((2 * t * 2 * cols * 4) as u64));
    group.bench_function("qkv_rope_fwd_cpu [1024,4x12x128]", |b| b.iter(|| qkv_rope_fwd_cpu(&mut gqkv, &pos, t, nh)));

    let (t, i) = (1024, 4096);
    let gate_up = rng.uniform_vec(t * 2 * i, 3.0);
    let mut out = vec![0.0; t * i];
    group.throughput(Throughput::Bytes((3 * t * i * 4) as u64));
    group.bench_function("swiglu_fwd_cpu [1024,4096]", |b| b.iter(|| swiglu_fwd_cpu(&mut out, &gate_up, t, i)));

    let (t, v) = (32, 65_536);
    let logits = rng.uniform_vec(t * v, 8.0);
    let labels: Vec<i32> = (0..t).map(|r| if r % 7 == 0 { IGNORE_LABEL } else { rng.below(v as u64) as i32 }).collect();
    let (mut dl, mut losses, mut ok) = (vec![0.0; t * v], vec![0.0; t], vec![0u8; t]);
    group.throughput(Throughput::Bytes((2 * t * v * 4) as u64));
    group.bench_function("cross_entropy_cpu [32,65536]", |b| {
        b.iter(|| cross_entropy_cpu(&mut dl, &mut losses, &mut ok, &logits, &labels, t, v, 1.0 / t as f32))
    });
    group.finish();
}

/// Total GPU time of `iters` back-to-back runs of `run`, between two CUDA events.
fn gpu_time(gpu: &Gpu, iters: u64, mut run: impl FnMut() -> Result<(), GpuError>) -> Duration {
    let event = || gpu.stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).expect("recording a CUDA event");
    let start = event();
    for _ in 0..iters {
        run().expect("kernel launch");
    }
    let end = event();
    Duration::from_secs_f64(f64::from(start.elapsed_ms(&end).expect("reading CUDA events")) / 1e3)
}

fn gpu_kernels(c: &mut Criterion) {
    let gpu = match Gpu::open(0) {
        Ok(gpu) => gpu,
        Err(e) => {
            eprintln!("GPU benchmarks skipped: {e}");
            return;
        }
    };
    let setup = || -> Result<_, GpuError> {
        let gemm = GemmCache::new(&gpu)?;
        let (t, d, n) = (16_384, 1536, 6144);
        let x = random_bf16(&gpu, t * d, 1.0, 1)?;
        let w = random_bf16(&gpu, n * d, 1.0, 2)?;
        Ok((gemm, t, d, n, x, w))
    };
    let (gemm, t, d, n, x, w) = setup().expect("setting up the GPU benchmarks");
    let mut group = c.benchmark_group("gpu");
    group.sample_size(20);

    let mut y = gpu.stream.alloc_zeros::<bf16>(t * d).expect("allocation");
    let mut rstd = gpu.stream.alloc_zeros::<f32>(t).expect("allocation");
    group.throughput(Throughput::Bytes((2 * t * d * 2 + t * 4) as u64));
    group.bench_function("rmsnorm_fwd [16384,1536]", |b| {
        b.iter_custom(|iters| gpu_time(&gpu, iters, || rmsnorm_fwd(&gpu, &mut y.as_view_mut(), &mut rstd.as_view_mut(), &x.as_view(), t, d)))
    });

    let mut out = gpu.stream.alloc_zeros::<bf16>(t * n).expect("allocation");
    group.throughput(Throughput::Elements((2 * t * n * d) as u64));
    group.bench_function("linear_fwd [16384,6144,1536] (flops)", |b| {
        b.iter_custom(|iters| gpu_time(&gpu, iters, || linear_fwd(&gpu, &gemm, &mut out.as_view_mut(), &x.as_view(), &w.as_view(), None, t, n, d)))
    });

    let (rows, v) = (2048, 65_536);
    let logits = random_bf16(&gpu, rows * v, 8.0, 3).expect("upload");
    let labels = upload(&gpu, &random_host(rows, 4, |rng| rng.below(v as u64) as i32)).expect("upload");
    let mut dl = gpu.stream.alloc_zeros::<bf16>(rows * v).expect("allocation");
    let mut losses = gpu.stream.alloc_zeros::<f32>(rows).expect("allocation");
    let mut ok = gpu.stream.alloc_zeros::<u8>(rows).expect("allocation");
    let grad_scale = upload(&gpu, &[1.0 / rows as f32]).expect("upload");
    group.throughput(Throughput::Bytes((2 * rows * v * 2) as u64));
    group.bench_function("cross_entropy [2048,65536]", |b| {
        b.iter_custom(|iters| {
            gpu_time(&gpu, iters, || {
                cross_entropy(&gpu, &mut dl.as_view_mut(), &mut losses.as_view_mut(), &mut ok.as_view_mut(), &logits.as_view(), &labels.as_view(), rows, v, &grad_scale.as_view())
            })
        })
    });
    group.finish();
}

/// One `tiny` hrm training step on the CPU reference (4 layers, hidden 256, 2 heads,
/// bp_steps 5): 16 samples of 128 tokens with 40-token instructions, 2048 tokens in all.
fn cpu_model_step(c: &mut Criterion) {
    use hrm_cu::config::{ModelConfig, NetName, SizeName};
    use hrm_cu::model::cpu::CpuBackend;
    use hrm_cu::model::net::Model;
    use hrm_cu::model::params::Params;
    use hrm_cu::model::schedule::Schedule;
    use hrm_cu::data::batch::pack_pairs;

    let params = Params::init(ModelConfig::new(SizeName::Tiny, NetName::Hrm, 256), 11);
    let mut rng = Rng::new(12);
    let mut tokens = |n: usize| (0..n).map(|_| rng.below(256) as i32).collect::<Vec<i32>>();
    let samples: Vec<(Vec<i32>, Vec<i32>)> = (0..16).map(|_| (tokens(40), tokens(89))).collect();
    let packed = pack_pairs(&samples, 2048).expect("16 samples of 128 rows fill 2048");
    let (batch, valid, t) = (packed.batch(), packed.num_labels() as f32, packed.num_tokens());
    let schedule = Schedule::for_training(&params.config.net, 5);
    let mut model = Model::new(CpuBackend, params.config, &params.z_l_init).expect("tiny model");
    let mut grads = params.zeros_like_master();

    let mut group = c.benchmark_group("cpu_model");
    group.sample_size(10);
    group.throughput(Throughput::Elements(t as u64));
    group.bench_function("tiny hrm forward+backward, 2048 tokens (tokens)", |b| {
        b.iter(|| model.forward_backward(&params.master, &batch, &schedule, &mut grads, valid).expect("step"))
    });
    group.finish();
}

criterion_group!(benches, cpu_references, cpu_model_step, gpu_kernels);
criterion_main!(benches);
