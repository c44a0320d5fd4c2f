// gate: the sigmoid output gate of attention (SPEC §2); mirrors src/ops/gate.rs.
//
//   forward    out = s * a,  s = sigmoid(g)
//   backward   da = dout * s;  dg = dout * a * s * (1 - s)
//
// Invariants
// - Pure element maps over n values; outputs written with `=`, nothing else touched.
// - fp32 math on bf16 storage; sigmoid with the accurate expf.
// - Pointers 16-byte aligned (the launcher checks). A grid of one wave (the launcher sizes
//   it to what fits on the device at once) strides over the n / 8 vectors GATE_UNROLL at a
//   time: each thread issues all of an iteration's 16-byte loads before using the first,
//   2 * GATE_UNROLL (forward) or 3 * GATE_UNROLL (backward) of them. The last n % 8
//   elements are done one by one.

#include "common.cuh"

#define GATE_UNROLL 2

// out, g, a: [n] bf16
extern "C" __global__ void gate_fwd(bf16* __restrict__ out, const bf16* __restrict__ g, const bf16* __restrict__ a,
                                    int64_t n) {
    const int64_t stride = (int64_t)gridDim.x * blockDim.x, n_vec = n / 8;
    for (int64_t i0 = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i0 < n_vec; i0 += GATE_UNROLL * stride) {
        bf16x8 gv[GATE_UNROLL], av[GATE_UNROLL];
#pragma unroll
        for (int u = 0; u < GATE_UNROLL; u++) {
            const int64_t i = i0 + u * stride;
            if (i < n_vec) {
                gv[u] = load_bf16x8(g + 8 * i);
                av[u] = load_bf16x8(a + 8 * i);
            }
        }
#pragma unroll
        for (int u = 0; u < GATE_UNROLL; u++) {
            const int64_t i = i0 + u * stride;
            if (i >= n_vec) continue;
            float gf[8], af[8], o[8];
            bf16x8_to_float(gv[u], gf);
            bf16x8_to_float(av[u], af);
#pragma unroll
            for (int e = 0; e < 8; e++) o[e] = sigmoid(gf[e]) * af[e];
            reinterpret_cast<bf16x8*>(out)[i] = float_to_bf16x8(o);
        }
    }
    for (int64_t i = n_vec * 8 + (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        out[i] = __float2bfloat16_rn(sigmoid(__bfloat162float(g[i])) * __bfloat162float(a[i]));
    }
}

// dg, da, dout, g, a: [n] bf16
extern "C" __global__ void gate_bwd(bf16* __restrict__ dg, bf16* __restrict__ da, const bf16* __restrict__ dout,
                                    const bf16* __restrict__ g, const bf16* __restrict__ a, int64_t n) {
    const int64_t stride = (int64_t)gridDim.x * blockDim.x, n_vec = n / 8;
    for (int64_t i0 = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i0 < n_vec; i0 += GATE_UNROLL * stride) {
        bf16x8 dv[GATE_UNROLL], gv[GATE_UNROLL], av[GATE_UNROLL];
#pragma unroll
        for (int u = 0; u < GATE_UNROLL; u++) {
            const int64_t i = i0 + u * stride;
            if (i < n_vec) {
                dv[u] = load_bf16x8(dout + 8 * i);
                gv[u] = load_bf16x8(g + 8 * i);
                av[u] = load_bf16x8(a + 8 * i);
            }
        }
#pragma unroll
        for (int u = 0; u < GATE_UNROLL; u++) {
            const int64_t i = i0 + u * stride;
            if (i >= n_vec) continue;
            float d[8], gf[8], af[8], dgv[8], dav[8];
            bf16x8_to_float(dv[u], d);
            bf16x8_to_float(gv[u], gf);
            bf16x8_to_float(av[u], af);
#pragma unroll
            for (int e = 0; e < 8; e++) {
                const float s = sigmoid(gf[e]);
                dav[e] = d[e] * s;
                dgv[e] = d[e] * af[e] * s * (1.0f - s);
            }
            reinterpret_cast<bf16x8*>(dg)[i] = float_to_bf16x8(dgv);
            reinterpret_cast<bf16x8*>(da)[i] = float_to_bf16x8(dav);
        }
    }
    for (int64_t i = n_vec * 8 + (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const float d = __bfloat162float(dout[i]), s = sigmoid(__bfloat162float(g[i]));
        da[i] = __float2bfloat16_rn(d * s);
        dg[i] = __float2bfloat16_rn(d * __bfloat162float(a[i]) * s * (1.0f - s));
    }
}
