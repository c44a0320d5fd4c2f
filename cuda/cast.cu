// cast: precision conversions over flat buffers.
//
// Invariants
// - Pure element maps: out[i] = convert(in[i]) for every i < n; nothing else is written.
// - fp32 -> bf16 rounds to nearest even (__float2bfloat16_rn), as PyTorch's .to(bfloat16).
// - Both pointers are 16-byte aligned (the launcher checks). Each thread moves 8 elements per
//   iteration as 16-byte accesses; the last n % 8 elements go one by one.

#include "common.cuh"

// out: [n] bf16, in: [n] fp32
extern "C" __global__ void cast_f32_to_bf16(bf16* __restrict__ out, const float* __restrict__ in, int64_t n) {
    int64_t stride = (int64_t)gridDim.x * blockDim.x;
    int64_t n8 = n / 8;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n8; i += stride) {
        float4 a = reinterpret_cast<const float4*>(in)[2 * i];
        float4 b = reinterpret_cast<const float4*>(in)[2 * i + 1];
        bf16x8 o;
        o.v[0] = __float2bfloat16_rn(a.x); o.v[1] = __float2bfloat16_rn(a.y);
        o.v[2] = __float2bfloat16_rn(a.z); o.v[3] = __float2bfloat16_rn(a.w);
        o.v[4] = __float2bfloat16_rn(b.x); o.v[5] = __float2bfloat16_rn(b.y);
        o.v[6] = __float2bfloat16_rn(b.z); o.v[7] = __float2bfloat16_rn(b.w);
        reinterpret_cast<bf16x8*>(out)[i] = o;
    }
    for (int64_t i = n8 * 8 + (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        out[i] = __float2bfloat16_rn(in[i]);
    }
}

// out: [n] fp32, in: [n] bf16
extern "C" __global__ void cast_bf16_to_f32(float* __restrict__ out, const bf16* __restrict__ in, int64_t n) {
    int64_t stride = (int64_t)gridDim.x * blockDim.x;
    int64_t n8 = n / 8;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n8; i += stride) {
        bf16x8 x = reinterpret_cast<const bf16x8*>(in)[i];
        float4 a = make_float4(__bfloat162float(x.v[0]), __bfloat162float(x.v[1]), __bfloat162float(x.v[2]), __bfloat162float(x.v[3]));
        float4 b = make_float4(__bfloat162float(x.v[4]), __bfloat162float(x.v[5]), __bfloat162float(x.v[6]), __bfloat162float(x.v[7]));
        reinterpret_cast<float4*>(out)[2 * i] = a;
        reinterpret_cast<float4*>(out)[2 * i + 1] = b;
    }
    for (int64_t i = n8 * 8 + (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        out[i] = __bfloat162float(in[i]);
    }
}
