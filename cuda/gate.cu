// gate: the sigmoid output gate of attention (SPEC §2); mirrors src/ops/gate.rs.
//
//   forward    out = s * a,  s = sigmoid(g)
//   backward   da = dout * s;  dg = dout * a * s * (1 - s)
//
// Invariants
// - Element maps over the T*C values of [T, C] tensors (C = NH*128, a multiple of 8); g is the
//   gate block of gqkv [T, 4C] (its first C columns), read in place, and dg goes to the same
//   block of dgqkv; the other blocks are not touched. Outputs written with `=`.
// - fp32 math on bf16 storage; sigmoid with the accurate expf.
// - Pointers 16-byte aligned (the launcher checks). The T*C / 8 vectors go in tiles of
//   GATE_THREADS * UNROLL (UNROLL = GATE_FWD_UNROLL or GATE_BWD_UNROLL), one tile a block
//   (a grid-stride over tiles only if the grid is capped): thread k of a tile does vectors
//   tile + k + u * GATE_THREADS, issuing all 2 * UNROLL (forward) or 3 * UNROLL (backward)
//   16-byte loads before using the first. Many short blocks let the block scheduler fill
//   the device to the end; v2's one-wave grid-stride loop ran 9.3 iterations a thread on
//   an H100 (gate_fwd), its last one with 31% of the threads busy.

#include "common.cuh"

#define GATE_THREADS 256
#define GATE_FWD_UNROLL 4
#define GATE_BWD_UNROLL 2
// Register cap for gate_fwd: 4 blocks of 256 an SM (64 registers; uncapped it took 92, 2
// blocks): 1024 threads x 8 loads x 16 B = 128 KB in flight an SM.
#define GATE_FWD_BLOCKS_PER_SM 3

// The offset in gqkv [T, 4C] of vector i (8 values) of the gate block seen as [T, C]. 32-bit
// division (the launcher checks T * C / 8 < 2^31), several times cheaper than the 64-bit one.
__device__ __forceinline__ int64_t gate_offset(int64_t i, int c_vec) {
    const unsigned row = (unsigned)i / (unsigned)c_vec, col = (unsigned)i - row * (unsigned)c_vec;
    return (int64_t)row * (32 * c_vec) + 8 * col;
}

// out, a: [T, C] bf16; gqkv: [T, 4C] bf16 (gate block read)
extern "C" __global__ void __launch_bounds__(GATE_THREADS, GATE_FWD_BLOCKS_PER_SM)
gate_fwd(bf16* __restrict__ out, const bf16* __restrict__ gqkv, const bf16* __restrict__ a, int64_t T, int C) {
#define GATE_UNROLL GATE_FWD_UNROLL
    const int c_vec = C / 8;
    const int64_t n_vec = T * c_vec, tile_stride = (int64_t)gridDim.x * GATE_THREADS * GATE_UNROLL;
    for (int64_t i0 = (int64_t)blockIdx.x * GATE_THREADS * GATE_UNROLL + threadIdx.x; i0 < n_vec; i0 += tile_stride) {
        const int64_t stride = GATE_THREADS;
        bf16x8 gv[GATE_UNROLL], av[GATE_UNROLL];
#pragma unroll
        for (int u = 0; u < GATE_UNROLL; u++) {
            const int64_t i = i0 + u * stride;
            if (i < n_vec) {
                gv[u] = load_bf16x8(gqkv + gate_offset(i, c_vec));
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
}

// dgqkv: [T, 4C] bf16 (gate block written); da, dout, a: [T, C] bf16; gqkv: [T, 4C] (gate block read)
extern "C" __global__ void __launch_bounds__(GATE_THREADS)
gate_bwd(bf16* __restrict__ dgqkv, bf16* __restrict__ da, const bf16* __restrict__ dout, const bf16* __restrict__ gqkv,
         const bf16* __restrict__ a, int64_t T, int C) {
#define GATE_UNROLL GATE_BWD_UNROLL
    const int c_vec = C / 8;
    const int64_t n_vec = T * c_vec, tile_stride = (int64_t)gridDim.x * GATE_THREADS * GATE_UNROLL;
    for (int64_t i0 = (int64_t)blockIdx.x * GATE_THREADS * GATE_UNROLL + threadIdx.x; i0 < n_vec; i0 += tile_stride) {
        const int64_t stride = GATE_THREADS;
        bf16x8 dv[GATE_UNROLL], gv[GATE_UNROLL], av[GATE_UNROLL];
#pragma unroll
        for (int u = 0; u < GATE_UNROLL; u++) {
            const int64_t i = i0 + u * stride;
            if (i < n_vec) {
                dv[u] = load_bf16x8(dout + 8 * i);
                gv[u] = load_bf16x8(gqkv + gate_offset(i, c_vec));
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
            *reinterpret_cast<bf16x8*>(dgqkv + gate_offset(i, c_vec)) = float_to_bf16x8(dgv);
            reinterpret_cast<bf16x8*>(da)[i] = float_to_bf16x8(dav);
        }
    }
#undef GATE_UNROLL
}
