// adam_atan2: the fused optimiser step of SPEC §7 over the whole fp32 master buffer.
//
// Per element of a tensor that received a gradient this step (lerp is torch.lerp):
//
//   p   *= 1 - lr * weight_decay
//   m    = lerp(m, g, 1 - beta1)
//   v    = beta2 * v + (1 - beta2) * g * g
//   p   -= (lr / (1 - beta1^step)) * atan2(m, sqrt(v) / sqrt(1 - beta2^step))
//   ema  = lerp(ema, p, 1 - ema_decay)
//   p_bf16 = round_to_nearest_even(p)                  the compute copy the next forward reads
//
// Invariants
// - A tensor whose has_grad flag is 0 is not touched at all: its p, m, v, ema, p_bf16 and step
//   count keep their values (SPEC §7: no decay, no moments, no EMA, no step).
// - Everything that changes from step to step (the learning rate, the has_grad flags, the step
//   counts) lives in device memory, so a captured CUDA graph replays the step unchanged.
//   adam_atan2_count_steps runs first and advances the step count of every tensor with a
//   gradient; adam_atan2_update then reads the advanced count.
// - The tensors are cut into chunks of at most CHUNK elements that never straddle two tensors;
//   block b updates chunk b. Alignment padding between tensors is never read or written.
// - A chunk starts at a tensor offset (a multiple of 64 elements, model/spec.rs) plus a multiple
//   of CHUNK, so with 16-byte aligned fp32 buffers and an 8-byte aligned p_bf16 (the launcher
//   checks) the body moves 4 elements per access; a tensor's last numel % 4 go one by one.
// - Math is fp32; the bias corrections are computed once per thread in fp64 and rounded to fp32,
//   exactly as the CPU reference (src/optim/adam_atan2.rs) does.
// - The loss guard (AMP's found_inf, made sticky): adam_atan2_guard reads the step's loss sum
//   before the update; once one is not finite, guard[0] is set and every update after it is
//   skipped whole (no weight, moment, EMA or step count changes) until the host clears it, so
//   the host, which looks only at logging steps, finds the weights that produced that loss.

#include "common.cuh"

// Four bf16 values written as one 8-byte access.
struct __align__(8) bf16x4 {
    bf16 v[4];
};

// torch.lerp(a, b, w): the two-sided form keeps lerp(a, b, 1) == b exactly.
__device__ __forceinline__ float lerp(float a, float b, float w) {
    float diff = b - a;
    return fabsf(w) < 0.5f ? a + w * diff : b - diff * (1.0f - w);
}

// The per-tensor constants of one step.
struct StepConsts {
    float decay;      // 1 - lr * weight_decay
    float step_size;  // lr / (1 - beta1^step)
    float sqrt_bc2;   // sqrt(1 - beta2^step)
};

__device__ __forceinline__ void update_one(float& p, float& m, float& v, float& ema, float g, const StepConsts& c,
                                           float beta1, float beta2, float ema_decay) {
    p *= c.decay;
    m = lerp(m, g, 1.0f - beta1);
    v = beta2 * v + (1.0f - beta2) * g * g;
    p -= c.step_size * atan2f(m, sqrtf(v) / c.sqrt_bc2);
    ema = lerp(ema, p, 1.0f - ema_decay);
}

// guard: [2] i32 {skip, finite steps since the host last cleared the count}
// sums:  [5] fp64, this step's metric sums (ce_metrics), the loss sum first
// One thread.
extern "C" __global__ void adam_atan2_guard(int32_t* __restrict__ guard, const double* __restrict__ sums) {
    if (guard[0] != 0) return;
    if (isfinite(sums[0])) {
        guard[1] += 1;
    } else {
        guard[0] = 1;
    }
}

// steps: [n_tensors] i32, has_grad: [n_tensors] i32 (0 or 1), guard: [2] i32
extern "C" __global__ void adam_atan2_count_steps(int32_t* __restrict__ steps, const int32_t* __restrict__ has_grad,
                                                  const int32_t* __restrict__ guard, int32_t n_tensors) {
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t < n_tensors && has_grad[t] && guard[0] == 0) steps[t] += 1;
}

// p, m, v, ema: [N] fp32, master layout, updated in place
// g:            [N] fp32, master layout
// p_bf16:       [N] bf16, master layout, written for tensors with a gradient
// chunk_begin, chunk_end: [n_chunks] i64, element range of each chunk
// chunk_tensor: [n_chunks] i32, the tensor each chunk belongs to
// has_grad:     [n_tensors] i32, steps: [n_tensors] i32 (already advanced), lr: [1] fp32
// guard:        [2] i32, the update is skipped while guard[0] != 0
extern "C" __global__ void adam_atan2_update(float* __restrict__ p, float* __restrict__ m, float* __restrict__ v,
                                             float* __restrict__ ema, const float* __restrict__ g,
                                             bf16* __restrict__ p_bf16, const int64_t* __restrict__ chunk_begin,
                                             const int64_t* __restrict__ chunk_end,
                                             const int32_t* __restrict__ chunk_tensor,
                                             const int32_t* __restrict__ has_grad, const int32_t* __restrict__ steps,
                                             const float* __restrict__ lr_ptr, const int32_t* __restrict__ guard,
                                             float beta1, float beta2, float weight_decay, float ema_decay) {
    int32_t t = chunk_tensor[blockIdx.x];
    if (!has_grad[t] || guard[0] != 0) return;
    int64_t begin = chunk_begin[blockIdx.x];
    int64_t end = chunk_end[blockIdx.x];
    float lr = *lr_ptr;
    double step = (double)steps[t];
    StepConsts c;
    c.decay = 1.0f - lr * weight_decay;
    c.step_size = lr / (float)(1.0 - pow((double)beta1, step));
    c.sqrt_bc2 = (float)sqrt(1.0 - pow((double)beta2, step));

    int64_t n4 = (end - begin) / 4;
    for (int64_t i = threadIdx.x; i < n4; i += blockDim.x) {
        int64_t e = begin + 4 * i;
        float4 pp = *reinterpret_cast<const float4*>(p + e);
        float4 mm = *reinterpret_cast<const float4*>(m + e);
        float4 vv = *reinterpret_cast<const float4*>(v + e);
        float4 ee = *reinterpret_cast<const float4*>(ema + e);
        float4 gg = *reinterpret_cast<const float4*>(g + e);
        update_one(pp.x, mm.x, vv.x, ee.x, gg.x, c, beta1, beta2, ema_decay);
        update_one(pp.y, mm.y, vv.y, ee.y, gg.y, c, beta1, beta2, ema_decay);
        update_one(pp.z, mm.z, vv.z, ee.z, gg.z, c, beta1, beta2, ema_decay);
        update_one(pp.w, mm.w, vv.w, ee.w, gg.w, c, beta1, beta2, ema_decay);
        *reinterpret_cast<float4*>(p + e) = pp;
        *reinterpret_cast<float4*>(m + e) = mm;
        *reinterpret_cast<float4*>(v + e) = vv;
        *reinterpret_cast<float4*>(ema + e) = ee;
        bf16x4 b;
        b.v[0] = __float2bfloat16_rn(pp.x); b.v[1] = __float2bfloat16_rn(pp.y);
        b.v[2] = __float2bfloat16_rn(pp.z); b.v[3] = __float2bfloat16_rn(pp.w);
        *reinterpret_cast<bf16x4*>(p_bf16 + e) = b;
    }
    for (int64_t e = begin + 4 * n4 + threadIdx.x; e < end; e += blockDim.x) {
        float pe = p[e], me = m[e], ve = v[e], ee = ema[e];
        update_one(pe, me, ve, ee, g[e], c, beta1, beta2, ema_decay);
        p[e] = pe; m[e] = me; v[e] = ve; ema[e] = ee;
        p_bf16[e] = __float2bfloat16_rn(pe);
    }
}
