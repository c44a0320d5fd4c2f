// gate: the sigmoid output gate of attention (SPEC §2); mirrors src/ops/gate.rs.
//
//   forward    out = s * a,  s = sigmoid(g)
//   backward   da = dout * s;  dg = dout * a * s * (1 - s)
//
// Invariants
// - Pure element maps over n values; outputs written with `=`, nothing else touched.
// - fp32 math on bf16 storage; sigmoid with the accurate expf.
// - Pointers 16-byte aligned (the launcher checks). The n / 8 vectors go in tiles of
//   GATE_THREADS * UNROLL (UNROLL = GATE_FWD_UNROLL or GATE_BWD_UNROLL), one tile a block
//   (a grid-stride over tiles only if the grid is capped): thread k of a tile does vectors
//   tile + k + u * GATE_THREADS, issuing all 2 * UNROLL (forward) or 3 * UNROLL (backward)
//   16-byte loads before using the first. Many short blocks let the block scheduler fill
//   the device to the end; v2's one-wave grid-stride loop ran 9.3 iterations a thread on
//   an H100 (gate_fwd), its last one with 31% of the threads busy. The last n % 8 elements
//   are done one by one by the first block.

#include "common.cuh"

#define GATE_THREADS 256
#define GATE_FWD_UNROLL 4
#define GATE_BWD_UNROLL 2
// Register cap for gate_fwd: 4 blocks of 256 an SM (64 registers; uncapped it took 92, 2
// blocks): 1024 threads x 8 loads x 16 B = 128 KB in flight an SM.
#define GATE_FWD_BLOCKS_PER_SM 3

// out, g, a: [n] bf16
extern "C" __global__ void __launch_bounds__(GATE_THREADS, GATE_FWD_BLOCKS_PER_SM)
gate_fwd(bf16* __restrict__ out, const bf16* __restrict__ g, const bf16* __restrict__ a, int64_t n) {
#define GATE_UNROLL GATE_FWD_UNROLL
    const int64_t n_vec = n / 8, tile_stride = (int64_t)gridDim.x * GATE_THREADS * GATE_UNROLL;
    for (int64_t i0 = (int64_t)blockIdx.x * GATE_THREADS * GATE_UNROLL + threadIdx.x; i0 < n_vec; i0 += tile_stride) {
        const int64_t stride = GATE_THREADS;
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
#undef GATE_UNROLL
    if (blockIdx.x != 0) return;
    for (int64_t i = n_vec * 8 + threadIdx.x; i < n; i += GATE_THREADS) {
        out[i] = __float2bfloat16_rn(sigmoid(__bfloat162float(g[i])) * __bfloat162float(a[i]));
    }
}

// dg, da, dout, g, a: [n] bf16
extern "C" __global__ void __launch_bounds__(GATE_THREADS)
gate_bwd(bf16* __restrict__ dg, bf16* __restrict__ da, const bf16* __restrict__ dout, const bf16* __restrict__ g,
         const bf16* __restrict__ a, int64_t n) {
#define GATE_UNROLL GATE_BWD_UNROLL
    const int64_t n_vec = n / 8, tile_stride = (int64_t)gridDim.x * GATE_THREADS * GATE_UNROLL;
    for (int64_t i0 = (int64_t)blockIdx.x * GATE_THREADS * GATE_UNROLL + threadIdx.x; i0 < n_vec; i0 += tile_stride) {
        const int64_t stride = GATE_THREADS;
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
#undef GATE_UNROLL
    if (blockIdx.x != 0) return;
    for (int64_t i = n_vec * 8 + threadIdx.x; i < n; i += GATE_THREADS) {
        const float d = __bfloat162float(dout[i]), s = sigmoid(__bfloat162float(g[i]));
        da[i] = __float2bfloat16_rn(d * s);
        dg[i] = __float2bfloat16_rn(d * __bfloat162float(a[i]) * s * (1.0f - s));
    }
}
