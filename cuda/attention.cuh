// attention.cuh: what every attention kernel file shares (the portable sm_80 path in
// attention.cu and the Hopper path in attention_sm90.cu): the row spans, the swizzled tile
// layout, the softmax constants, and a few fragment helpers.
//
// Row spans. The PrefixLM mask of a packed batch (SPEC §4) is an interval per row:
//   query row r of sample [a, b) with prefix p sees the keys [a, a + max(r - a, p - 1)];
//   key row j of that sample is seen by the queries [j - a < p ? a : j, b - 1].
// Padding rows see and are seen by nothing: the empty span {INT_MAX, -1}, chosen so that
// min/max reductions over a tile ignore them and every `lo <= x <= hi` test fails.
// `attention_spans` (attention.cu) writes both tables once per call; the kernels then need
// no per-sample arithmetic, and a tile may straddle samples: the mask stays one interval test.
//
// Shared-memory tiles hold rows of HD = 128 bf16 (256 bytes, 16 chunks of 16 bytes). Chunk c
// of row r is stored at chunk c ^ (r & 7): the 8 rows an ldmatrix phase reads, or a warp's
// 16-byte copies write, then fall in 8 different bank groups.

#pragma once
#include "common.cuh"
#include <climits>

#define ATTN_HD 128
#define ATTN_CHUNKS 16          // 16-byte chunks per row of ATTN_HD bf16
#define ATTN_EMPTY_LO INT_MAX
#define ATTN_EMPTY_HI (-1)

// 1/sqrt(128), and the same times log2(e): softmax runs in base 2 (exp2 is one instruction).
#define ATTN_SCALE 0.08838834764831845f
#define ATTN_LOG2E 1.4426950408889634f
#define ATTN_SCALE_LOG2 (ATTN_SCALE * ATTN_LOG2E)
#define ATTN_LN2 0.6931471805599453f

// 2^x as one MUFU.EX2 (ex2.approx.ftz): subnormal results flush to 0. exp2f computes the same
// approximation but handles subnormals, at three more instructions a call, and the softmax is
// bound by issuing instructions. A probability under 2^-126 in a row whose largest is 1 changes
// no bf16 output.
__device__ __forceinline__ float attn_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// The sigmoid output gate (SPEC §2), fused into the attention (src/ops/gate.rs has the math).
// Forward: 8 outputs y = sigmoid(g) * a from the bf16 output a and the gate's 8 values g.
__device__ __forceinline__ bf16x8 attn_gate8(const bf16x8& a, const bf16x8& g) {
    float af[8], gf[8], y[8];
    bf16x8_to_float(a, af);
    bf16x8_to_float(g, gf);
#pragma unroll
    for (int e = 0; e < 8; e++) y[e] = sigmoid(gf[e]) * af[e];
    return float_to_bf16x8(y);
}

// Backward, one warp per (row, head) of 128 values, 4 per lane: da = dy s, dg = dy y (1 - s)
// (from the output y: the attention's a is not kept), written at da and dg; returns (every
// lane) D = dy . y, the attention backward's rowsum(da * a).
__device__ __forceinline__ float attn_gate_bwd_row(bf16* da, bf16* dg, const bf16* dy, const bf16* g, const bf16* y, int lane) {
    const int at = 4 * lane;
    const __nv_bfloat162* dy2 = reinterpret_cast<const __nv_bfloat162*>(dy + at);
    const __nv_bfloat162* g2 = reinterpret_cast<const __nv_bfloat162*>(g + at);
    const __nv_bfloat162* y2 = reinterpret_cast<const __nv_bfloat162*>(y + at);
    float sum = 0.f;
#pragma unroll
    for (int k = 0; k < 2; ++k) {
        const float2 d = __bfloat1622float2(dy2[k]), gg = __bfloat1622float2(g2[k]), yy = __bfloat1622float2(y2[k]);
        const float s0 = sigmoid(gg.x), s1 = sigmoid(gg.y);
        reinterpret_cast<__nv_bfloat162*>(da + at)[k] = __floats2bfloat162_rn(d.x * s0, d.y * s1);
        reinterpret_cast<__nv_bfloat162*>(dg + at)[k] = __floats2bfloat162_rn(d.x * yy.x * (1.f - s0), d.y * yy.y * (1.f - s1));
        sum += d.x * yy.x + d.y * yy.y;
    }
    return warp_sum(sum);
}

// Offset in elements of chunk `chunk` of row `row` in a swizzled [rows][ATTN_HD] tile.
__device__ __forceinline__ int attn_swz(int row, int chunk) {
    return row * ATTN_HD + ((chunk ^ (row & 7)) << 3);
}

__device__ __forceinline__ int2 attn_empty_span() {
    return make_int2(ATTN_EMPTY_LO, ATTN_EMPTY_HI);
}

__device__ __forceinline__ bool attn_visible(int2 span, int x) {
    return span.x <= x && x <= span.y;
}

#define FULL_MASK 0xffffffffu

// Two floats as a bf16 pair, `lo` in the low half (the lower column of a fragment).
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
}

// The range a warp's spans (two per lane) touch, and the range all of them contain.
struct WarpSpans {
    int lo, hi;            // union: [min lo, max hi]
    int full_lo, full_hi;  // intersection: [max lo, min hi]

    __device__ __forceinline__ WarpSpans(int2 s0, int2 s1) {
        lo = __reduce_min_sync(FULL_MASK, min(s0.x, s1.x));
        hi = __reduce_max_sync(FULL_MASK, max(s0.y, s1.y));
        full_lo = __reduce_max_sync(FULL_MASK, max(s0.x, s1.x));
        full_hi = __reduce_min_sync(FULL_MASK, min(s0.y, s1.y));
    }
    __device__ __forceinline__ bool misses(int x0, int x1) const { return x0 > hi || x1 < lo; }
    __device__ __forceinline__ bool covers(int x0, int x1) const { return x0 >= full_lo && x1 <= full_hi; }
};

