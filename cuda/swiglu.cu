// swiglu: the SwiGLU activation of the MLP (SPEC §2); mirrors src/ops/swiglu.rs. The math is
// in swiglu.cuh, shared with the GEMM epilogues of gemm_sm90.cu.
//
//   gate_up [T, 2I] = [gate | up];   out = silu(gate) * up,  silu(x) = x * sigmoid(x)
//   backward   dup = dout * silu(gate);  dgate = dout * up * s * (1 + gate * (1 - s)),  s = sigmoid(gate)
//
// Invariants
// - One thread per 8 output columns of a row (16-byte accesses): I % 8 == 0 and every
//   pointer 16-byte aligned (the launcher checks). Grid-stride over T * I/8 vectors.
// - fp32 math on bf16 storage, accurate expf; outputs written with `=`.

#include "swiglu.cuh"

// out: [T, I] bf16, gate_up: [T, 2I] bf16
extern "C" __global__ void swiglu_fwd(bf16* __restrict__ out, const bf16* __restrict__ gate_up, int T, int I) {
    const int64_t vecs_per_row = I / 8, n = (int64_t)T * vecs_per_row;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t row = i / vecs_per_row, col = i % vecs_per_row;
        const bf16* src = gate_up + row * 2 * I + 8 * col;
        float g[8], u[8], o[8];
        bf16x8_to_float(load_bf16x8(src), g);
        bf16x8_to_float(load_bf16x8(src + I), u);
        swiglu_fwd8(g, u, o);
        reinterpret_cast<bf16x8*>(out)[i] = float_to_bf16x8(o);
    }
}

// dgate_up: [T, 2I] bf16, dout: [T, I] bf16, gate_up: [T, 2I] bf16
extern "C" __global__ void swiglu_bwd(bf16* __restrict__ dgate_up, const bf16* __restrict__ dout,
                                      const bf16* __restrict__ gate_up, int T, int I) {
    const int64_t vecs_per_row = I / 8, n = (int64_t)T * vecs_per_row;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t row = i / vecs_per_row, col = i % vecs_per_row;
        const bf16* src = gate_up + row * 2 * I + 8 * col;
        bf16x8* dst = reinterpret_cast<bf16x8*>(dgate_up + row * 2 * I);
        float d[8], g[8], u[8], dg[8], du[8];
        bf16x8_to_float(load_bf16x8(dout + 8 * i), d);
        bf16x8_to_float(load_bf16x8(src), g);
        bf16x8_to_float(load_bf16x8(src + I), u);
        swiglu_bwd8(d, g, u, dg, du);
        dst[col] = float_to_bf16x8(dg);
        dst[vecs_per_row + col] = float_to_bf16x8(du);
    }
}
