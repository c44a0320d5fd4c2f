#!/usr/bin/env python3
"""The fastest honest PyTorch formulation of one hrm-cu training step we could write, for timing.

It does the work `hrm-cu bench train` does (src/bench/train.rs) on the same batches: XL hrm at
bp_steps 5 (SPEC §1-3), 12,288 packed tokens (§4), bf16 compute weights with fp32 master weights,
AdamATan2 and the EMA (§7). Numerical agreement with the SPEC is torch_reference.py's job;
`--check` only confirms that this formulation computes the same loss and gradients.

    bf16 copies       one flat bf16 buffer; every §9 tensor is a leaf view into it, and its
                      gradient a view into a flat bf16 gradient buffer that autograd adds into
    block (§2)        two torch.compile'd graphs (pre-attention, post-attention) around the
                      attention route; one graph serves all 32 blocks
    attention (§4)    flex:   flex_attention (compiled) with a BlockMask built per batch
                      varlen: FlashAttention-2 varlen, two passes (prefix bidirectional,
                              response causal bottom-right over the whole sample)
                      dense:  SDPA with a [T, T] boolean mask (CPU smoke runs)
    LM head, CE (§5)  one compiled graph: bf16 logits, fp32 cross-entropy
    optimiser (§7)    AdamATan2 (not an AdamW stand-in), EMA and the master -> bf16 copy,
                      fused by torch.compile into one pass over flat fp32 buffers
    recompute         torch.utils.checkpoint on 1 block in K, only if K=0 runs out of memory

Timing, FLOPs and MFU follow src/bench/train.rs: warm-up steps (compilation included) are not
timed, each timed step lies between two CUDA events, the median is reported, and MFU counts the
bench's useful FLOPs over 989 TFLOP/s. The last line is JSON. docs/torch_speed.md says more.
"""
import os

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: E402
from torch.nn.attention.varlen import varlen_attn  # noqa: E402
from torch.utils.checkpoint import checkpoint  # noqa: E402

HEAD_DIM, EPS, THETA, IGNORE = 128, 1e-6, 10000.0, -100          # §1, §2, §4
SCALE = 1.0 / math.sqrt(HEAD_DIM)
SIZES = {"tiny": (4, 256, 2), "B": (12, 1024, 8), "L": (24, 1280, 10), "XL": (32, 1536, 12),
         "XXL": (72, 1792, 14), "XXL_wide": (32, 2560, 20)}    # §1: n_layers, hidden, heads
LR, WD, B1, B2, EMA_DECAY = 2.2e-4, 0.1, 0.9, 0.95, 0.9999       # §7 defaults (constant lr)
PEAK_FLOPS = 989e12                                              # H100 SXM dense bf16, as train.rs
EMBED, LM_HEAD = "model.embed_tokens.weight", "lm_head.weight"
BLOCK = ("attn.gqkv_proj.weight", "attn.o_proj.weight", "mlp.gate_up_proj.weight",
         "mlp.down_proj.weight")
BATCHES = 4                                                      # distinct batches, as train.rs


class Cfg:
    """§1 size and §3 hrm schedule: `passes` is [(module, grad)] in execution order."""

    def __init__(self, size, vocab, bp_steps=5, h_cycles=2, l_cycles=3):
        self.size, self.vocab = size, vocab
        self.n_layers, self.hidden, self.heads = SIZES[size]
        self.inter = -(-round(4 * self.hidden * 2 / 3) // 256) * 256  # XL: 4096
        self.blocks = self.n_layers // 2                                # per module (hrm)
        h_bp = min(h_cycles, bp_steps - 1)
        l_bp = bp_steps - h_bp
        self.passes = []
        for i in range(h_cycles):
            for k in range(i * l_cycles, (i + 1) * l_cycles):
                self.passes.append(("L", k >= h_cycles * l_cycles - l_bp))
            self.passes.append(("H", i >= h_cycles - h_bp))


# ----------------------------------------------------------------------------------------------
# Batches: the bench's own generator (src/rng.rs SplitMix64, PackedBatch::random in
# src/data/synthetic.rs), bit for bit

class SplitMix64:
    M = (1 << 64) - 1

    def __init__(self, seed):
        self.s = seed & self.M

    def next(self):
        self.s = (self.s + 0x9E3779B97F4A7C15) & self.M
        z = self.s
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & self.M
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & self.M
        return z ^ (z >> 31)

    def below(self, n):
        return (self.next() * n) >> 64

    def uniform(self):
        return (self.next() >> 11) * 2.0 ** -53


def random_samples(rng, rows, vocab, lens=(64, 4097), frac=(0.1, 0.9)):
    """(instruction, response) pairs filling `rows` slots: packed lengths uniform in `lens`,
    instruction fractions uniform in `frac`, the last sample cut to the slots left."""
    out, left = [], rows
    while left >= 2:
        n = min(lens[0] + rng.below(lens[1] - lens[0]), left)
        x = n * (frac[0] + (frac[1] - frac[0]) * rng.uniform())
        p = math.floor(x) + (x - math.floor(x) >= 0.5)                # Rust's round()
        p = min(max(p, 1), n - 1)
        inst = [1 + rng.below(vocab - 1) for _ in range(p)]
        out.append((inst, [1 + rng.below(vocab - 1) for _ in range(n + 1 - p)]))
        left -= n
    return out


class Batch:
    """§4 packing of `samples` into `rows` slots, plus what each attention route needs. Query t
    sees keys lo[t]..hi[t]: its sample's start up to max(t, start + p - 1); padding sees itself."""

    def __init__(self, samples, rows):
        inputs, labels = np.zeros(rows, np.int64), np.full(rows, IGNORE, np.int64)
        positions, idx = np.zeros(rows, np.int64), np.arange(rows)
        lo, hi, spans, at = idx.copy(), idx.copy(), [], 0
        for inst, resp in samples:
            p, n = len(inst), len(inst) + len(resp) - 1
            inputs[at:at + n] = inst + resp[:-1]                       # I ++ R[:-1]
            labels[at + p - 1:at + n] = resp                           # I[-1] predicts R[0]
            positions[at:at + n] = np.arange(n)
            lo[at:at + n] = at
            hi[at:at + n] = np.maximum(idx[at:at + n], at + p - 1)
            spans.append((at, n, p))
            at += n
        self.samples, self.spans, self.tokens = samples, spans, at
        self.valid = int((labels != IGNORE).sum())
        # Visible (query, key) pairs per head, as train.rs's visible_pairs.
        self.pairs = sum(p * p + (n * (n + 1) - p * (p + 1)) // 2 for _, n, p in spans)
        # varlen route: rows regrouped as [all prefixes, all responses, padding].
        pre = np.concatenate([idx[s:s + p] for s, n, p in spans] + [idx[:0]])
        resp = np.concatenate([idx[s + p:s + n] for s, n, p in spans] + [idx[:0]])
        cu = lambda lens: np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)  # noqa: E731
        pl, rl = [p for _, _, p in spans], [n - p for _, n, p in spans]
        nl = [n for _, n, _ in spans]
        self.max_pre, self.max_resp, self.max_all = max(pl), max(rl), max(nl)
        inv = np.argsort(np.concatenate([pre, resp, idx[at:]]))
        host = dict(inputs=inputs, labels=labels, positions=positions, lo=lo, hi=hi, pre=pre,
                    resp=resp, inv=inv, cu_pre=cu(pl), cu_resp=cu(rl), cu_all=cu(nl))
        pin = torch.cuda.is_available()
        self.host = {k: (torch.from_numpy(v).pin_memory() if pin else torch.from_numpy(v))
                     for k, v in host.items()}

    def upload(self, device):
        d = {k: v.to(device, non_blocking=True) for k, v in self.host.items()}
        return SimpleNamespace(**d, valid=self.valid, tokens=self.tokens, rows=len(d["inputs"]),
                               max_pre=self.max_pre, max_resp=self.max_resp, max_all=self.max_all)


def useful_flops(cfg, b):
    """src/bench/train.rs useful_flops: per pass blocks x (GEMMs + attention), a pass with
    gradient 2x GEMMs and 2.5x attention more, the LM head 3x; T = real tokens."""
    t, d, c, i, v = b.tokens, cfg.hidden, cfg.heads * HEAD_DIM, cfg.inter, cfg.vocab
    gemm = 2.0 * t * (d * 4 * c + c * d + d * 2 * i + i * d)
    attn = 4.0 * HEAD_DIM * b.pairs * cfg.heads
    flops = sum(cfg.blocks * ((gemm + attn) + (2 * gemm + 2.5 * attn) * g) for _, g in cfg.passes)
    return flops + 3 * 2.0 * t * d * v


# ----------------------------------------------------------------------------------------------
# §2: the block, in two compiled halves around the attention

def rms(x):
    """rms(x) = x / sqrt(mean(x^2) + eps), fp32 math, no weight (§2); result in x's dtype."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)).to(x.dtype)


def rope(x, cos, sin):
    """Rotate-half RoPE in fp32, cast back (§2). x [T, H, 128], cos/sin [T, 128] fp32."""
    xf = x.float()
    x1, x2 = xf.chunk(2, -1)
    return (xf * cos[:, None] + torch.cat([-x2, x1], -1) * sin[:, None]).to(x.dtype)


def pre_attn(x, w_gqkv, cos, sin, heads_first):
    """rms, gqkv projection (rows: gate, query, key, value heads), RoPE. Outputs are fresh
    contiguous tensors, so the [T, 4*H*128] projection is not kept alive by views of it."""
    t = x.shape[0]
    g, q, k, v = (rms(x) @ w_gqkv.t()).view(t, 4, -1, HEAD_DIM).unbind(1)
    q, k = rope(q, cos, sin), rope(k, cos, sin)
    if heads_first:                                   # flex/SDPA layout [1, H, T, 128]
        q, k, v = (y.transpose(0, 1).unsqueeze(0).contiguous() for y in (q, k, v))
    else:
        v = v.contiguous()
    return g.contiguous(), q, k, v


def post_attn(x, g, a, w_o, w_gu, w_down, heads_first):
    """Gate, output projection, residual; rms, SwiGLU MLP, residual (§2)."""
    t = x.shape[0]
    if heads_first:
        a = a.squeeze(0).transpose(0, 1)
    x = x + (torch.sigmoid(g) * a).reshape(t, -1) @ w_o.t()
    gate, up = (rms(x) @ w_gu.t()).chunk(2, -1)
    return x + (F.silu(gate) * up) @ w_down.t()


def lm_ce_sum(z, w_head, labels):
    """Untied LM head in bf16, cross-entropy in fp32 summed over labels != -100 (§5)."""
    return F.cross_entropy((z @ w_head.t()).float(), labels, ignore_index=IGNORE, reduction="sum")


def adam_atan2_(p, g, m, v, ema, w, t, lr: float):
    """§7 on flat buffers (one step counter: at bp_steps >= 3 every tensor gets a gradient):
    decay, moments, atan2 update, EMA, and the master -> compute copy; compiled, one pass."""
    t.add_(1)
    gf = g.float()
    p.mul_(1 - lr * WD)
    m.lerp_(gf, 1 - B1)
    v.mul_(B2).addcmul_(gf, gf, value=1 - B2)
    p.sub_(torch.atan2(m, v.sqrt() / torch.sqrt(1 - B2 ** t)) * (lr / (1 - B1 ** t)))
    ema.lerp_(p, 1 - EMA_DECAY)
    w.copy_(p)


OPS = SimpleNamespace()


def setup_ops(compile_, mode=None):
    """The compiled (or, for CPU smoke runs, eager) pieces. Shapes are static: one graph each for
    passes with and without gradient, shared by every block of both modules."""
    torch._dynamo.config.recompile_limit = 64
    def c(f):
        return torch.compile(f, fullgraph=True, dynamic=False, mode=mode) if compile_ else f
    OPS.compiled = compile_
    OPS.find_nan = False
    OPS.pre, OPS.post, OPS.rms, OPS.lm, OPS.opt = map(
        c, (pre_attn, post_attn, rms, lm_ce_sum, adam_atan2_))
    OPS.flex = c(flex_attention)


class PrefixLMMask:
    """The flex mask_mod reads per-query bounds from two persistent buffers that each batch
    overwrites, so the same function (and compiled kernels) serve every batch."""

    def __init__(self, rows, device):
        self.lo = torch.zeros(rows, dtype=torch.int64, device=device)
        self.hi = torch.zeros(rows, dtype=torch.int64, device=device)
        lo, hi = self.lo, self.hi
        self.mask_mod = lambda b, h, q, kv: (kv >= lo[q]) & (kv <= hi[q])


def attn_flex(q, k, v, ctx):
    return OPS.flex(q, k, v, block_mask=ctx.block_mask, scale=SCALE, kernel_options=ctx.flex_opts)


def attn_dense(q, k, v, ctx):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.dense_mask, scale=SCALE)


def attn_varlen(q, k, v, ctx):
    """Two FlashAttention-2 varlen passes: prefixes bidirectional over themselves; responses
    causal over their whole sample (window (-1, 0) aligns the diagonal bottom-right, so
    response row p+i sees keys 0..p+i). Padding rows output 0."""
    b = ctx.bat
    take = lambda y, i: y.index_select(0, i)  # noqa: E731
    oa = varlen_attn(take(q, b.pre), take(k, b.pre), take(v, b.pre), b.cu_pre, b.cu_pre,
                     b.max_pre, b.max_pre, scale=SCALE)
    ob = varlen_attn(take(q, b.resp), k[:b.tokens], v[:b.tokens], b.cu_resp, b.cu_all,
                     b.max_resp, b.max_all, scale=SCALE, window_size=(-1, 0))
    pad = q.new_zeros((b.rows - b.tokens,) + q.shape[1:])
    return torch.cat([oa, ob, pad]).index_select(0, b.inv)


ROUTES = {"flex": (attn_flex, True), "dense": (attn_dense, True), "varlen": (attn_varlen, False)}


def block(x, w_gqkv, w_o, w_gu, w_down, ctx):
    attend, heads_first = ROUTES[ctx.route]
    g, q, k, v = OPS.pre(x, w_gqkv, ctx.cos, ctx.sin, heads_first)
    a = attend(q, k, v, ctx)
    if ctx.find_nan:
        report_nonfinite(ctx, "pre-attention (g, q, k, v)", g, q, k, v)
        report_nonfinite(ctx, "attention output", a)
    return OPS.post(x, g, a, w_o, w_gu, w_down, heads_first)


def report_nonfinite(ctx, where, *tensors):
    """--find-nan: print the first place of the step where a value is not finite (syncs)."""
    if ctx.nan_seen is None and not all(bool(torch.isfinite(t).all()) for t in tensors):
        ctx.nan_seen = f"{where} at {ctx.place}"
        print(f"find-nan: first non-finite value: {ctx.nan_seen}", flush=True)


def run_module(blocks, z, inj, ctx, grad):
    """Module(z + inj) (§2): the blocks, then a final rms. With gradient, 1 block in K is
    recomputed in the backward instead of keeping its activations."""
    x = z + inj
    for j, w in enumerate(blocks):
        ctx.place = f"{ctx.module} pass {ctx.pass_index}, block {j}"
        if grad and ctx.recompute_every and j % ctx.recompute_every == 0:
            x = checkpoint(block, x, *w, ctx, use_reentrant=False)
        else:
            x = block(x, *w, ctx)
        if ctx.find_nan:
            report_nonfinite(ctx, "block output", x)
    return OPS.rms(x)


# ----------------------------------------------------------------------------------------------
# Weights, optimiser state, one training step

class Model:
    """fp32 master weights, AdamATan2 moments and EMA as flat fp32 buffers; the compute copy and
    its gradient as flat `dtype` buffers. Every §9 tensor is a leaf view of the compute copy whose
    .grad is preset to a view of the gradient buffer: autograd adds into it in place."""

    def __init__(self, cfg, device, dtype=torch.bfloat16, seed=0):
        d, c, i, v = cfg.hidden, cfg.heads * HEAD_DIM, cfg.inter, cfg.vocab
        shapes = dict(zip(BLOCK, [((4 * c, d), d), ((d, c), c), ((2 * i, d), d), ((d, i), i)]))
        specs = [(EMBED, (v, d), d)]
        for m in ("H", "L"):
            specs += [(f"model.{m}_module.layers.{j}.{n}", s, fan)
                      for j in range(cfg.blocks) for n, (s, fan) in shapes.items()]
        specs.append((LM_HEAD, (v, d), d))
        total = sum(math.prod(s) for _, s, _ in specs)
        gen = torch.Generator(device=device).manual_seed(seed)
        self.master = torch.empty(total, dtype=torch.float32, device=device)
        self.w = torch.empty(total, dtype=dtype, device=device)
        self.g = torch.zeros(total, dtype=dtype, device=device)
        self.params, at = {}, 0
        for name, shape, fan in specs:       # §6 std 1/sqrt(fan_in), untruncated (timing only)
            n = math.prod(shape)
            self.master[at:at + n].normal_(0.0, fan ** -0.5, generator=gen)
            p = self.w[at:at + n].view(shape).detach().requires_grad_()
            p.grad = self.g[at:at + n].view(shape)
            self.params[name], at = p, at + n
        self.w.copy_(self.master)
        self.m, self.v = torch.zeros_like(self.master), torch.zeros_like(self.master)
        self.ema, self.t = self.master.clone(), torch.zeros((), device=device)
        self.z_init = torch.randn(d, generator=gen, device=device).bfloat16().to(dtype)  # §3
        self.blocks = {m: [tuple(self.params[f"model.{m}_module.layers.{j}.{n}"] for n in BLOCK)
                           for j in range(cfg.blocks)] for m in ("H", "L")}
        self.numel = total


def step_context(cfg, route, bat, tables, recompute_every):
    ctx = SimpleNamespace(route=route, bat=bat, recompute_every=recompute_every,
                          find_nan=OPS.find_nan, nan_seen=None, place="embedding",
                          cos=tables.cos[bat.positions], sin=tables.sin[bat.positions],
                          flex_opts=tables.flex_opts)
    if route == "flex":
        tables.mask.lo.copy_(bat.lo)
        tables.mask.hi.copy_(bat.hi)
        ctx.block_mask = create_block_mask(tables.mask.mask_mod, None, None, bat.rows, bat.rows,
                                           device=bat.lo.device, _compile=OPS.compiled)
    elif route == "dense":
        kv = torch.arange(bat.rows, device=bat.lo.device)
        ctx.dense_mask = (kv[None, :] >= bat.lo[:, None]) & (kv[None, :] <= bat.hi[:, None])
    return ctx


def forward_loss(model, cfg, ctx, bat):
    """§3 hrm: z_H = scaled embedding, z_L = z_L_init; L/H passes per cfg.passes, those
    without gradient under no_grad; mean CE over the valid labels (§5)."""
    emb = F.embedding(bat.inputs, model.params[EMBED]) * math.sqrt(cfg.hidden)
    z_h, z_l = emb, model.z_init.expand_as(emb)
    for i, (module, grad) in enumerate(cfg.passes):
        ctx.module, ctx.pass_index = module, i
        with torch.set_grad_enabled(grad):
            if module == "L":
                z_l = run_module(model.blocks["L"], z_l, z_h, ctx, grad)
            else:
                z_h = run_module(model.blocks["H"], z_h, z_l, ctx, grad)
    return OPS.lm(z_h, model.params[LM_HEAD], bat.labels) / bat.valid


def train_step(model, cfg, route, batch, tables, recompute_every, optimise=True):
    bat = batch.upload(model.w.device)
    ctx = step_context(cfg, route, bat, tables, recompute_every)
    model.g.zero_()
    loss = forward_loss(model, cfg, ctx, bat)
    loss.backward()
    if ctx.find_nan:
        bad = [n for n, p in model.params.items() if not bool(torch.isfinite(p.grad).all())]
        print(f"find-nan: step loss {float(loss):.4f}; weights finite "
              f"{bool(torch.isfinite(model.w).all())}; {len(bad)} gradients not finite "
              f"{bad[:3]}", flush=True)
    if optimise:
        with torch.no_grad():
            OPS.opt(model.master, model.g, model.m, model.v, model.ema, model.w, model.t, LR)
    return loss.detach()


def make_tables(rows, device, flex_opts=None):
    """RoPE cos/sin per position (built in fp64, rounded once to fp32) and the flex mask."""
    inv_freq = THETA ** (-torch.arange(0, HEAD_DIM, 2, dtype=torch.float64) / HEAD_DIM)
    angle = torch.arange(rows, dtype=torch.float64)[:, None] * inv_freq[None, :]
    angle = torch.cat([angle, angle], -1)
    return SimpleNamespace(cos=angle.cos().float().to(device), sin=angle.sin().float().to(device),
                           mask=PrefixLMMask(rows, device), flex_opts=flex_opts)


# ----------------------------------------------------------------------------------------------
# Benchmark

def time_route(model, cfg, route, batches, tables, k, args):
    cuda = model.w.is_cuda
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    t0 = time.perf_counter()
    train_step(model, cfg, route, batches[0], tables, k)
    sync()
    first_s = time.perf_counter() - t0
    for i in range(1, args.warmup):
        train_step(model, cfg, route, batches[i % BATCHES], tables, k)
    sync()
    host, events, losses = [], [], []      # host: time to issue a step (on CPU: to run it)
    for i in range(args.steps):
        b = batches[(args.warmup + i) % BATCHES]
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)] if cuda else None
        s = time.perf_counter()
        if cuda:
            ev[0].record()
        losses.append(train_step(model, cfg, route, b, tables, k))
        if cuda:
            ev[1].record()
            events.append(ev)
        host.append(1e3 * (time.perf_counter() - s))
    sync()
    times = [e0.elapsed_time(e1) for e0, e1 in events] if cuda else host
    return times, statistics.median(host), first_s, [float(x) for x in losses]


def nonfinite_report(model):
    """Which flat buffers hold non-finite values, and in which tensors of the compute copy."""
    bufs = {"master": model.master, "bf16 weights": model.w, "gradients": model.g, "m": model.m,
            "v": model.v, "ema": model.ema}
    counts = {k: int((~torch.isfinite(b)).sum()) for k, b in bufs.items()}
    names = [n for n, p in model.params.items() if not bool(torch.isfinite(p).all())][:5]
    return f"non-finite entries {counts}; first weights affected {names}"


def bench(args, device):
    cfg = Cfg(args.size, args.vocab, args.bp_steps)
    rng = SplitMix64(args.seed ^ 0x5EED)                       # train.rs: Rng::new(seed ^ 0x5eed)
    batches = [Batch(random_samples(rng, args.tokens, args.vocab), args.tokens)
               for _ in range(BATCHES)]
    model = Model(cfg, device, seed=args.seed)
    # Not ROWS_GUARANTEED_SAFE: every query sees itself, but flex's online softmax meets rows
    # with no visible key inside a partially masked block (a 128-row block spanning two
    # samples), and without the guard such a row's running max stays -inf and turns into NaN.
    # With the flag set, every XL step's loss was NaN on an H100 (docs/torch_speed.md).
    flex_opts = json.loads(args.flex_options or "{}")
    tables = make_tables(args.tokens, device, flex_opts)
    setup_ops(args.compile, args.compile_mode)
    OPS.find_nan = args.find_nan
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"torch_speed: {args.size} hrm, {model.numel / 1e9:.3f} B parameters, vocab {cfg.vocab}, "
          f"{len(cfg.passes)} passes ({sum(g for _, g in cfg.passes)} with gradient), {args.tokens} "
          f"tokens per step, on {name}, torch {torch.__version__}, compile {args.compile}", flush=True)
    used = [batches[(args.warmup + i) % BATCHES] for i in range(args.steps)]
    tokens = sum(b.tokens for b in used) / len(used)
    flops = sum(useful_flops(cfg, b) for b in used) / len(used)
    results = []
    for r, route in enumerate(args.route.split(",")):
        if r > 0:               # fresh weights: a route must not inherit another's updates
            del model
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            model = Model(cfg, device, seed=args.seed)
        ks = [args.recompute_every] if args.recompute_every is not None else [0, 8, 4, 2, 1]
        out = {"route": route, "error": "out of memory at every recompute setting"}
        for k in ks:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            failed = None
            try:
                times, host_ms, first_s, losses = time_route(model, cfg, route, batches, tables,
                                                             k, args)
            except Exception as e:  # noqa: BLE001 -- OOM: recompute more; else the next route
                failed = f"{type(e).__name__}: {e}"[:2000]
            if failed and "out of memory" not in failed.lower():
                out["error"] = failed
                print(f"route {route} failed: {failed}", flush=True)
                break
            if failed:                               # outside the except: the graph is freed
                print(f"{route}: out of memory with recompute 1 block in {k or 'none'} ({failed})",
                      flush=True)
                gc.collect()
                torch.cuda.empty_cache()
                continue
            med = statistics.median(times)
            cuda = device.type == "cuda"
            peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else 0.0
            reserved = torch.cuda.max_memory_reserved(device) / 2**30 if cuda else 0.0
            out = {"ms_per_step": round(med, 2), "tokens_per_s": round(tokens / med * 1e3),
                   "mfu": round(flops / (med * 1e-3) / PEAK_FLOPS, 4), "peak_gib": round(peak, 2),
                   "route": route, "reserved_gib": round(reserved, 2), "recompute_every": k,
                   "min_ms": round(min(times), 2), "max_ms": round(max(times), 2),
                   "host_ms": round(host_ms, 1), "first_step_s": round(first_s, 1),
                   "tflop_per_step": round(flops / 1e12, 2), "loss": round(losses[-1], 4),
                   "losses": [round(x, 4) for x in losses],
                   "size": args.size, "tokens": args.tokens, "device": name,
                   "torch": torch.__version__, "compiled": args.compile}
            print(f"{route}: median {med:.1f} ms (min {min(times):.1f}, max {max(times):.1f}) over "
                  f"{args.steps} steps after {args.warmup} warm-up (first step {first_s:.1f} s, "
                  f"compilation included); {tokens / med * 1e3:.0f} tokens/s; {flops / 1e12:.1f} "
                  f"TFLOP useful per step: MFU {100 * out['mfu']:.1f}% of 989 TFLOP/s; peak "
                  f"{peak:.2f} GiB allocated; host issues a step in {host_ms:.0f} ms; recompute "
                  f"1 block in {k or 'none'}; losses {losses[0]:.4f} .. {losses[-1]:.4f}", flush=True)
            bad = [i for i, x in enumerate(losses) if not math.isfinite(x)]
            if bad:
                print(f"{route}: the loss is not finite from timed step {bad[0]} on "
                      f"({bad[0] + args.warmup} steps in): the timing is not trustworthy; "
                      f"{nonfinite_report(model)}", flush=True)
            break
        results.append(out)
        print(json.dumps(out), flush=True)
    return 0 if all("error" not in r for r in results) else 1


# ----------------------------------------------------------------------------------------------
# --check: the same loss and gradients as tools/torch_reference.py (tiny model, small batch)

def check(args, device):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import torch_reference as ref
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    cfg = Cfg(args.size, 512, args.bp_steps)
    samples = random_samples(SplitMix64(args.seed + 1), 700, cfg.vocab, lens=(8, 300))
    rows = 768                                                       # 68 padding slots
    batch = Batch(samples, rows)
    setup_ops(args.compile, args.compile_mode)
    model = Model(cfg, device, dtype, seed=args.seed)
    tables = make_tables(rows, device)
    raw = {"net": "hrm", "hidden_size": cfg.hidden, "intermediate_size": cfg.inter,
           "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.heads,
           "head_dim": HEAD_DIM, "vocab_size": cfg.vocab}
    rp = {n: p.detach().float().clone().requires_grad_() for n, p in model.params.items()}
    rb = ref.pack(samples, rows)
    assert np.array_equal(rb.labels.numpy(), batch.host["labels"].numpy()), "packing differs"
    s = ref.score(ref.forward(rp, model.z_init.bfloat16(), ref.read_config(raw, rp), rb,
                              args.bp_steps), rb)
    ref_loss = s["ce_sum"] / s["valid"]
    ref_loss.backward()
    ltol, gtol = (1e-5, 1e-4) if dtype == torch.float32 else (1e-2, 5e-2)
    ok = True
    for route in args.route.split(","):
        for k in (0, 1):                                 # without and with recomputation
            loss = float(train_step(model, cfg, route, batch, tables, k, optimise=False))
            lerr = abs(loss / ref_loss.item() - 1)
            gerr = max(float((model.params[n].grad.float() - p.grad.to(device)).norm()
                             / p.grad.norm()) for n, p in rp.items())
            base = model.g.untyped_storage().data_ptr()
            in_place = all(p.grad.untyped_storage().data_ptr() == base for p in model.params.values())
            good = lerr < ltol and gerr < gtol and in_place
            ok &= good
            print(f"{'ok  ' if good else 'FAIL'}  {route}, recompute {k or 'none'}, {args.dtype}: "
                  f"loss rel err {lerr:.1e}, worst gradient rel L2 err {gerr:.1e} "
                  f"(tol {ltol:.0e} / {gtol:.0e}), gradients in the flat buffer: {in_place}")
    # §7 step 1 in closed form: p(1 - lr wd) - lr/(1-b1) atan2((1-b1) g, |g|); EMA; copy.
    p0, g = model.master.clone(), model.g.float()
    model.t.zero_()
    OPS.opt(model.master, model.g, model.m, model.v, model.ema, model.w, model.t, LR)
    want = p0 * (1 - LR * WD) - LR / (1 - B1) * torch.atan2((1 - B1) * g, g.abs())
    err = float((model.master - want).abs().max())
    ema_err = float((model.ema - (p0 + (want - p0) * (1 - EMA_DECAY))).abs().max())
    good = err < 1e-7 and ema_err < 1e-7 and torch.equal(model.w, model.master.to(dtype))
    ok &= good
    print(f"{'ok  ' if good else 'FAIL'}  AdamATan2 step 1 vs closed form: max err {err:.1e}, "
          f"EMA {ema_err:.1e}, compute copy updated")
    return 0 if ok else 1


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=SIZES, help="default XL; --check: tiny")
    ap.add_argument("--tokens", type=int, help="tokens per step (default 12288; cpu: 1024)")
    ap.add_argument("--vocab", type=int, help="vocabulary (default 65536; cpu: 4096)")
    ap.add_argument("--steps", type=int, help="timed steps (default 10; cpu: 2)")
    ap.add_argument("--warmup", type=int,
                    help="untimed steps, compilation included (default 3; cpu: 1)")
    ap.add_argument("--recompute-every", type=int, default=None,
                    help="checkpoint 1 block in K (0: none); default: try 0, then 8, 4, 2, 1 on OOM")
    ap.add_argument("--route", default=None,
                    help="attention route(s), comma-separated: flex, varlen (CUDA), dense "
                         "(default flex on cuda, dense on cpu)")
    ap.add_argument("--bp-steps", type=int, default=5, help="§3 gradient depth (>= 3)")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="torch.compile (default: on for cuda, off for cpu)")
    ap.add_argument("--compile-mode", default=None,
                    help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    ap.add_argument("--flex-options", default=None,
                    help='extra flex kernel_options as JSON, e.g. {"USE_TMA": true}')
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--find-nan", action="store_true",
                    help="check every block's values and every gradient for non-finite ones, "
                         "printing the first place (synchronises: not for timing)")
    ap.add_argument("--check", action="store_true",
                    help="compare loss and gradients with tools/torch_reference.py and stop")
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16",
                    help="compute dtype of --check")
    a = ap.parse_args(argv)
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cpu = device.type == "cpu"
    for key, gpu_default, cpu_default in (("tokens", 12288, 1024), ("vocab", 65536, 4096),
                                          ("steps", 10, 2), ("warmup", 3, 1)):
        if getattr(a, key) is None:
            setattr(a, key, cpu_default if cpu else gpu_default)
    a.route = a.route or ("dense" if cpu else "flex")
    a.size = a.size or ("tiny" if a.check else "XL")
    a.compile = (not cpu) if a.compile is None else a.compile
    if a.bp_steps < 3:
        ap.error("--bp-steps below 3 leaves the embedding without gradient, which §7 skips; "
                 "this script updates every tensor")
    if a.warmup < 1:
        ap.error("--warmup must be at least 1 (the first step compiles)")
    return check(a, device) if a.check else bench(a, device)


if __name__ == "__main__":
    sys.exit(main())
