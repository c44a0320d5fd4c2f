#!/usr/bin/env python3
"""Cross-check hrm-cu's PrefixLM attention against PyTorch, and time PyTorch's best routes.

Run on the GPU machine, after our binary has written its outputs:

    hrm-cu bench attention --dump DIR       # src/bench/attention.rs::dump
    python3 tools/attention_torch_check.py DIR

1. Correctness. DIR holds a packed batch (g, q, k, v and the output gradient dy as bf16) and
   what our gated attention made of it (y = sigmoid(g) * o, lse, dg, dq, dk, dv). We rebuild the
   PrefixLM mask of SPEC §4 densely (query t of a sample with prefix p sees key s of the same
   sample iff s <= max(t, p-1)), run masked attention and the gate in fp32 with autograd as the
   reference, and the same in bf16 as a plain implementation. Our error must be at most twice
   the plain bf16 error plus 1e-5 (FlashAttention's test rule).
2. Timing, for the bench batches (a) to (d) whose sample tables DIR also holds:
   - flex_attention with a block mask built from the same mask rule, under torch.compile;
   - the two-pass formulation of the published reference: varlen flash attention
     bidirectional over each prefix, causal over each response, merged by log-sum-exp.
   TFLOP/s count visible (query, key) pairs only: forward 4*128 per pair and head, backward
   2.5x that, as `hrm-cu bench attention` does, so the numbers compare line by line.
"""

import argparse
import json
import math
from pathlib import Path

import torch

HD = 128
SCALE = 1.0 / math.sqrt(HD)


def load(dir: Path, name: str, dtype, shape):
    data = (dir / f"{name}.bin").read_bytes()
    return torch.frombuffer(bytearray(data), dtype=dtype).reshape(shape).cuda()


def row_tables(cu_seqlens, prefix_lens, t):
    """Per row: the sample index (-1 for padding) and the last prefix row of its sample."""
    doc = torch.full((t,), -1, dtype=torch.int64)
    prefix_end = torch.full((t,), -1, dtype=torch.int64)
    for n, p in enumerate(prefix_lens):
        a, b = cu_seqlens[n], cu_seqlens[n + 1]
        doc[a:b] = n
        prefix_end[a:b] = a + p - 1
    return doc.cuda(), prefix_end.cuda()


def dense_mask(cu_seqlens, prefix_lens, t):
    """[T, T] bool: row i sees column j."""
    doc, prefix_end = row_tables(cu_seqlens, prefix_lens, t)
    i = torch.arange(t, device="cuda")[:, None]
    j = torch.arange(t, device="cuda")[None, :]
    return (doc[:, None] == doc[None, :]) & (doc[:, None] >= 0) & (j <= torch.maximum(i, prefix_end[:, None]))


def masked_attention(q, k, v, mask):
    """q, k, v: [T, NH, HD]; returns o [T, NH, HD] and lse [NH, T] (-inf on rows that see nothing)."""
    s = torch.einsum("thd,shd->hts", q, k) * SCALE
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    seen = mask.any(dim=-1)
    p = torch.softmax(torch.where(seen[None, :, None], s, torch.zeros_like(s)), dim=-1) * seen[None, :, None]
    return torch.einsum("hts,shd->thd", p.to(v.dtype), v), lse


def check(dir: Path, meta):
    c = meta["check"]
    t, nh = c["t"], c["nh"]
    shape = (t, nh, HD)
    g, q, k, v, dy = (load(dir, n, torch.bfloat16, shape) for n in ("g", "q", "k", "v", "dy"))
    ours = {n: load(dir, n, torch.bfloat16, shape).float() for n in ("y", "dg", "dq", "dk", "dv")}
    ours["lse"] = load(dir, "lse", torch.float32, (nh, t))
    mask = dense_mask(c["cu_seqlens"], c["prefix_lens"], t)

    def run(dtype):
        xs = [x.to(dtype).requires_grad_() for x in (g, q, k, v)]
        o, lse = masked_attention(*xs[1:], mask)
        y = torch.sigmoid(xs[0]) * o
        y.backward(dy.to(dtype))
        grads = {name: x.grad.float() for name, x in zip(("dg", "dq", "dk", "dv"), xs)}
        return {"y": y.float(), "lse": lse.float(), **grads}

    ref, plain = run(torch.float32), run(torch.bfloat16)
    print(f"correctness on {meta['card']}: T={t} NH={nh}, {len(c['prefix_lens'])} samples")
    print(f"{'tensor':<6} {'ours err':>10} {'bf16 err':>10} {'limit':>10} result")
    failed = 0
    for name in ("y", "lse", "dg", "dq", "dk", "dv"):
        r = ref[name]
        finite = torch.isfinite(r)
        # -inf lse on padding rows must be matched exactly; elsewhere compare values.
        same_inf = torch.equal(torch.isfinite(ours[name]), finite) and torch.equal(ours[name][~finite], r[~finite])
        err = (ours[name][finite] - r[finite]).abs().max().item()
        base = (plain[name][finite] - r[finite]).abs().max().item()
        limit = 2 * base + 1e-5
        ok = same_inf and err <= limit
        failed += not ok
        print(f"{name:<6} {err:>10.3e} {base:>10.3e} {limit:>10.3e} {'pass' if ok else 'FAIL'}")
    return failed


def visible_pairs(cu_seqlens, prefix_lens):
    pairs = 0
    for n, p in enumerate(prefix_lens):
        m = cu_seqlens[n + 1] - cu_seqlens[n]
        pairs += p * p + (m * (m + 1) - p * (p + 1)) // 2
    return pairs


def median_ms(fn, grad_to_none=None):
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=200, grad_to_none=grad_to_none, return_mode="median")


def flex_route(cu_seqlens, prefix_lens, t):
    """flex_attention on [1, NH, T, HD] with a block mask of the PrefixLM rule, compiled."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    doc, prefix_end = row_tables(cu_seqlens, prefix_lens, t)

    def mask_mod(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (doc[q_idx] >= 0) & (kv_idx <= torch.maximum(q_idx, prefix_end[q_idx]))

    block_mask = create_block_mask(mask_mod, B=None, H=None, Q_LEN=t, KV_LEN=t, device="cuda")
    flex = torch.compile(flex_attention)
    layout = lambda x: x.transpose(0, 1)[None].contiguous()
    return layout, lambda q, k, v: flex(q, k, v, block_mask=block_mask, scale=SCALE)


def two_pass_route(cu_seqlens, prefix_lens, t):
    """The published reference's formulation on [T, NH, HD]: varlen flash attention over each
    prefix (every row of the sample against its prefix, no mask) and over each response (causal),
    merged on the response rows by log-sum-exp. A timing route: the merge weights enter as
    constants, so its gradient ignores their dependence on q and k (the work is the same)."""
    from torch.nn.attention.varlen import AuxRequest, varlen_attn

    starts, ends = cu_seqlens[:-1], cu_seqlens[1:]
    lens = [b - a for a, b in zip(starts, ends)]
    resp_lens = [m - p for m, p in zip(lens, prefix_lens)]
    prefix_rows = torch.cat([torch.arange(a, a + p) for a, p in zip(starts, prefix_lens)]).cuda()
    resp_rows = torch.cat([torch.arange(a + p, b) for a, b, p in zip(starts, ends, prefix_lens)]).cuda()
    offsets = lambda xs: torch.tensor([0] + torch.tensor(xs).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    cu_all, cu_pre, cu_resp = offsets(lens), offsets(prefix_lens), offsets(resp_lens)
    real = cu_seqlens[-1]

    def rows_first(lse, rows):
        """varlen_attn's lse as [rows, NH], whichever way round it comes."""
        return lse.detach().float() if lse.shape[0] == rows else lse.detach().float().t()

    def attn(q, k, v):
        o1, lse1 = varlen_attn(q[:real], k[prefix_rows], v[prefix_rows], cu_all, cu_pre, max(lens), max(prefix_lens),
                               return_aux=AuxRequest(lse=True), scale=SCALE)
        o2, lse2 = varlen_attn(q[resp_rows], k[resp_rows], v[resp_rows], cu_resp, cu_resp, max(resp_lens), max(resp_lens),
                               return_aux=AuxRequest(lse=True), scale=SCALE, window_size=(-1, 0))
        lse1 = rows_first(lse1, real)[resp_rows]
        lse2 = rows_first(lse2, len(resp_rows))
        lse = torch.logaddexp(lse1, lse2)
        w1, w2 = torch.exp(lse1 - lse)[..., None], torch.exp(lse2 - lse)[..., None]
        o = o1.clone()
        o[resp_rows] = (o1[resp_rows].float() * w1 + o2.float() * w2).to(o1.dtype)
        return o

    return (lambda x: x), attn


def timing(meta):
    # The compiled backward is timed by calling it again and again (retain_graph=True), which
    # PyTorch refuses for a graph compiled with donated buffers, the default once a new batch
    # length makes it recompile (batch (d) has 12,288 rows against 16,384).
    import torch._functorch.config

    torch._functorch.config.donated_buffer = False
    b = meta["bench"]
    nh = b["nh"]
    print(f"\nPyTorch {torch.__version__} on {torch.cuda.get_device_name()}, {nh} heads of {HD}")
    print(f"{'batch':<32} {'route':<10} {'fwd ms':>9} {'fwd TF/s':>9} {'bwd ms':>9} {'bwd TF/s':>9}")
    for batch in b["batches"]:
        t, cu, pl = batch["t"], batch["cu_seqlens"], batch["prefix_lens"]
        flops = 4 * HD * visible_pairs(cu, pl) * nh
        inputs = [torch.randn(t, nh, HD, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
        for route, make in (("flex", flex_route), ("two-pass", two_pass_route)):
            try:
                layout, attn = make(cu, pl, t)
                xs = [layout(x).requires_grad_() for x in inputs]
                fwd = median_ms(lambda: attn(*xs))
                o = attn(*xs)
                do = torch.randn_like(o)
                bwd = median_ms(lambda: o.backward(do, retain_graph=True), grad_to_none=xs)
                print(f"{batch['name']:<32} {route:<10} {fwd:>9.3f} {flops / fwd / 1e9:>9.1f} {bwd:>9.3f} {2.5 * flops / bwd / 1e9:>9.1f}")
            except Exception as e:  # a route missing from this PyTorch build is reported, not fatal
                print(f"{batch['name']:<32} {route:<10} unavailable: {type(e).__name__}: {str(e).splitlines()[0][:80]}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dir", type=Path, help="directory written by `hrm-cu bench attention --dump DIR`")
    parser.add_argument("--no-timing", action="store_true", help="only the correctness check")
    args = parser.parse_args()
    meta = json.loads((args.dir / "meta.json").read_text())
    failed = check(args.dir, meta)
    if not args.no_timing:
        timing(meta)
    if failed:
        raise SystemExit(f"{failed} tensor(s) outside the limit")


if __name__ == "__main__":
    main()
