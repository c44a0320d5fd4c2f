// gate: the sigmoid output gate of attention (SPEC §2); mirrors src/ops/gate.rs.
//
//   forward    out = s * a,  s = sigmoid(g)
//   backward   da = dout * s;  dg = dout * a * s * (1 - s)
//
// Invariants
// - Pure element maps over n values; outputs written with `=`, nothing else touched.
// - fp32 math on bf16 storage; sigmoid with the accurate expf.
// - Pointers 16-byte aligned (the launcher checks): each thread moves 8 elements per
//   iteration as 16-byte accesses, the last n % 8 one by one.

#include "common.cuh"

// out, g, a: [n] bf16
extern "C" __global__ void gate_fwd(bf16* __restrict__ out, const bf16* __restrict__ g, const bf16* __restrict__ a,
                                    int64_t n) {
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n / 8; i += stride) {
        float gv[8], av[8], o[8];
        bf16x8_to_float(reinterpret_cast<const bf16x8*>(g)[i], gv);
        bf16x8_to_float(reinterpret_cast<const bf16x8*>(a)[i], av);
#pragma unroll
        for (int e = 0; e < 8; e++) o[e] = sigmoid(gv[e]) * av[e];
        reinterpret_cast<bf16x8*>(out)[i] = float_to_bf16x8(o);
    }
    for (int64_t i = n / 8 * 8 + (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        out[i] = __float2bfloat16_rn(sigmoid(__bfloat162float(g[i])) * __bfloat162float(a[i]));
    }
}

// dg, da, dout, g, a: [n] bf16
extern "C" __global__ void gate_bwd(bf16* __restrict__ dg, bf16* __restrict__ da, const bf16* __restrict__ dout,
                                    const bf16* __restrict__ g, const bf16* __restrict__ a, int64_t n) {
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n / 8; i += stride) {
        float d[8], gv[8], av[8], dgv[8], dav[8];
        bf16x8_to_float(reinterpret_cast<const bf16x8*>(dout)[i], d);
        bf16x8_to_float(reinterpret_cast<const bf16x8*>(g)[i], gv);
        bf16x8_to_float(reinterpret_cast<const bf16x8*>(a)[i], av);
#pragma unroll
        for (int e = 0; e < 8; e++) {
            const float s = sigmoid(gv[e]);
            dav[e] = d[e] * s;
            dgv[e] = d[e] * av[e] * s * (1.0f - s);
        }
        reinterpret_cast<bf16x8*>(dg)[i] = float_to_bf16x8(dgv);
        reinterpret_cast<bf16x8*>(da)[i] = float_to_bf16x8(dav);
    }
    for (int64_t i = n / 8 * 8 + (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const float d = __bfloat162float(dout[i]), s = sigmoid(__bfloat162float(g[i]));
        da[i] = __float2bfloat16_rn(d * s);
        dg[i] = __float2bfloat16_rn(d * __bfloat162float(a[i]) * s * (1.0f - s));
    }
}
