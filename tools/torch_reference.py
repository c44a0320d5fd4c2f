#!/usr/bin/env python3
"""An independent PyTorch formulation of the hrm-cu numerical contract, shared/SPEC.md.

The Rust trainer must agree with this file to 1e-4 relative on the loss and on the weights
after one optimiser step, for every net of SPEC §1. It is written from the SPEC alone, in plain
fp32 (or fp64) PyTorch, as a flat list of ops meant to be read beside the SPEC:

    §9  interchange layout                    read_config / load_model / save_model
    §8  dataset layout, multipack sampler     load_epoch / lpt / multipack / epoch_batches
    §4  PrefixLM packing and mask             pack / prefix_lm_masks
    §2  block and module                      rms / rope / attention / block / run_module
    §3  each net's recurrence, as data        schedule / forward
    §5  loss and metrics                      score
    §7  AdamATan2 and the lr schedule         lr_at / adam_atan2_step

Subcommands (docs/torch_reference.md says more):
    loss     --model DIR --data DIR --batch-tokens N --steps K
    step     --model DIR --data DIR --batch-tokens N --lr X --warmup-steps W --bp-steps B --out DIR
    selftest

Precision: everything is computed in the master dtype (fp32 by default, fp64 with
`--dtype float64`); the SPEC's bf16 compute copies are *not* emulated, so the trainer's bf16
path is expected to differ by bf16 rounding, its fp32 path by fp32 rounding only.
"""
import argparse
import contextlib
import io
import json
import math
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

IGNORE = -100  # label of a slot that carries no loss (SPEC §4)

# ----------------------------------------------------------------------------------------------
# §1, §9: the configuration and the weights

# Recurrence parameters of each net with their SPEC §1 defaults. config.json's `net_config`
# overrides them; the reference layout's top-level H_cycles / L_cycles are used when present.
NET_DEFAULTS = {
    "hrm": {"H_cycles": 2, "L_cycles": 3, "bp_min_steps": 2, "bp_max_steps": 5},
    "transformer": {},
    "trm": {"H_cycles": 2, "L_cycles": 1, "H_bp_steps": 1, "L_bp_steps": 1},
    "trm_match_recurrence": {"H_cycles": 2, "L_cycles": 3, "H_bp_steps": 2, "L_bp_steps": 3},
    "rins": {"L_cycles": 7, "L_bp_cycles": 4},
    "ut": {"cycles": 4, "bp_cycles": 2},
}
# The stored modules of each net (§9) and their block counts as a fraction of n_layers (§1).
# A module's block i lives at `{prefix}.layers.{i}`; the transformer's prefix is plain `model`.
NET_MODULES = {
    "hrm": {"model.H_module": 0.5, "model.L_module": 0.5},
    "transformer": {"model": 1.0},
    "trm": {"model.L_module": 1.0},
    "trm_match_recurrence": {"model.L_module": 0.5},
    "rins": {"model.H_module": 0.5, "model.L_module": 0.5},
    "ut": {"model.L_module": 1.0},
}
BLOCK_TENSORS = ("attn.gqkv_proj.weight", "attn.o_proj.weight",
                 "mlp.gate_up_proj.weight", "mlp.down_proj.weight")
EMBED, LM_HEAD, Z_L_INIT = "model.embed_tokens.weight", "lm_head.weight", "model.z_L_init"


@dataclass
class Config:
    net: str
    hidden: int
    intermediate: int
    n_layers: int      # the full n_layers of §1 (config.json `num_hidden_layers`)
    heads: int         # = key/value heads (no GQA, §1)
    head_dim: int
    vocab: int
    eps: float
    theta: float
    rec: dict          # the net's recurrence parameters, keys of NET_DEFAULTS[net]
    modules: dict      # stored prefix -> number of blocks


def read_config(raw, names):
    """Config from config.json's dict `raw` and the stored tensor names (§9)."""
    net = raw.get("net")
    if net is None:  # §9: a directory without `net` is hrm if it has H_module, else transformer
        if any(n.startswith("model.H_module.") for n in names):
            net = "hrm"
        elif any(n.startswith("model.layers.") for n in names):
            net = "transformer"
        else:
            raise ValueError("config.json has no `net` and the tensors name neither "
                             "model.H_module nor model.layers")
    if net not in NET_DEFAULTS:
        raise ValueError(f"unknown net {net!r}; SPEC §1 knows {sorted(NET_DEFAULTS)}")
    given = raw.get("net_config") or {}
    for k in sorted(set(given) - set(NET_DEFAULTS[net])):
        print(f"note: net_config key {k!r} is not a {net} recurrence parameter; ignored",
              file=sys.stderr)
    rec = {}
    for k, default in NET_DEFAULTS[net].items():
        top = raw.get(k) if k in ("H_cycles", "L_cycles") else None
        rec[k] = int(given.get(k, top if top is not None else default))
    heads = int(raw["num_attention_heads"])
    if int(raw.get("num_key_value_heads", heads)) != heads:
        raise ValueError("num_key_value_heads != num_attention_heads: SPEC §1 has no GQA")
    n_layers = int(raw["num_hidden_layers"])
    modules = {}
    for prefix, frac in NET_MODULES[net].items():
        if (n_layers * frac) % 1:
            raise ValueError(f"{net}: {n_layers} layers do not split into {prefix}")
        modules[prefix] = int(n_layers * frac)
    return Config(net=net, hidden=int(raw["hidden_size"]),
                  intermediate=int(raw["intermediate_size"]), n_layers=n_layers, heads=heads,
                  head_dim=int(raw.get("head_dim", 128)), vocab=int(raw["vocab_size"]),
                  eps=float(raw.get("rms_norm_eps", 1e-6)),
                  theta=float(raw.get("rope_theta", 10000.0)), rec=rec, modules=modules)


def expected_shapes(cfg):
    """name -> shape of every trained tensor of the net (§2, §3, §9); z_L_init not included."""
    h, hd, n_h, inter = cfg.hidden, cfg.head_dim, cfg.heads, cfg.intermediate
    block = {"attn.gqkv_proj.weight": (4 * n_h * hd, h),  # gate, query, key, value heads
             "attn.o_proj.weight": (h, n_h * hd),
             "mlp.gate_up_proj.weight": (2 * inter, h),    # gate rows first, then up
             "mlp.down_proj.weight": (h, inter)}
    shapes = {EMBED: (cfg.vocab, h), LM_HEAD: (cfg.vocab, h)}
    for prefix, n in cfg.modules.items():
        for i in range(n):
            shapes.update({f"{prefix}.layers.{i}.{t}": s for t, s in block.items()})
    return shapes


def read_safetensors(model_dir):
    """All tensors of model.safetensors, or of the shards a model.safetensors.index.json lists."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if not os.path.exists(index):
        return load_file(os.path.join(model_dir, "model.safetensors"))
    tensors = {}
    for shard in sorted(set(json.load(open(index))["weight_map"].values())):
        tensors.update(load_file(os.path.join(model_dir, shard)))
    return tensors


def load_model(model_dir, dtype, device):
    """(cfg, params, z_L_init): params are leaf tensors in `dtype` that require grad;
    z_L_init is returned exactly as stored (bf16 per §3) and is never trained."""
    raw = json.load(open(os.path.join(model_dir, "config.json")))
    stored = read_safetensors(model_dir)
    cfg = read_config(raw, stored)
    if "embedding_scale" in raw and not math.isclose(raw["embedding_scale"],
                                                      math.sqrt(cfg.hidden), rel_tol=1e-6):
        print(f"note: config embedding_scale {raw['embedding_scale']} ignored; SPEC §3 "
              f"scales by sqrt(hidden) = {math.sqrt(cfg.hidden)}", file=sys.stderr)
    z_init = stored.pop(Z_L_INIT, None)
    if (z_init is None) != (cfg.net == "transformer"):
        raise ValueError(f"{model_dir}: {cfg.net} must {'not ' * (cfg.net == 'transformer')}"
                         f"store {Z_L_INIT} (§9)")
    if z_init is not None and tuple(z_init.shape) != (cfg.hidden,):
        raise ValueError(f"{Z_L_INIT} has shape {tuple(z_init.shape)}, want ({cfg.hidden},)")
    shapes = expected_shapes(cfg)
    if set(stored) != set(shapes):
        raise ValueError(f"{model_dir}: tensors missing {sorted(set(shapes) - set(stored))[:4]}, "
                         f"unexpected {sorted(set(stored) - set(shapes))[:4]}")
    params = {}
    for name, t in stored.items():
        if tuple(t.shape) != shapes[name]:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, want {shapes[name]}")
        params[name] = t.to(device=device, dtype=dtype).requires_grad_()
    return cfg, params, z_init


def save_model(out_dir, src_dir, params, z_init):
    """Write `params` as f32 in the §9 layout; config.json (and tokenizer files) copied from
    `src_dir`, z_L_init written back unchanged."""
    os.makedirs(out_dir, exist_ok=True)
    for name in os.listdir(src_dir):
        path = os.path.join(src_dir, name)
        if os.path.isfile(path) and ".safetensors" not in name:
            shutil.copy2(path, os.path.join(out_dir, name))
    tensors = {n: p.detach().to("cpu", torch.float32).contiguous() for n, p in params.items()}
    if z_init is not None:
        tensors[Z_L_INIT] = z_init
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})


# ----------------------------------------------------------------------------------------------
# §8: the dataset and the multipack sampler

def load_epoch(data_dir, epoch):
    """tokens [N] (uint8/uint16/int32) and the four int64 per-sample columns of one epoch."""
    tokens = np.load(os.path.join(data_dir, "tokens.npy"))
    cols = {k: np.load(os.path.join(data_dir, f"epoch_{epoch}", f"{k}.npy")).astype(np.int64)
            for k in ("inst_start", "inst_len", "resp_start", "resp_len")}
    return tokens, cols


def lpt(lengths, c, n):
    """Longest-processing-time placement of §8 step 3: bins[r] lists the indices of `lengths`
    given to bin r, in assignment order; None as soon as a bin's load exceeds c."""
    order = np.argsort(np.asarray(lengths), kind="stable")[::-1]  # equal lengths: higher index first
    load = [None] + [0] * n          # 1-indexed binary min-heap of loads
    owner = [None] + list(range(n))  # bin r starts at heap slot r + 1
    bins = [[] for _ in range(n)]
    for i in order:
        load[1] += lengths[i]
        if load[1] > c:
            return None
        bins[owner[1]].append(int(i))
        node = 1                     # sift the root down
        while 2 * node <= n:
            child = 2 * node
            if child + 1 <= n and load[child + 1] < load[child]:
                child += 1
            if not load[child] < load[node]:
                break
            load[node], load[child] = load[child], load[node]
            owner[node], owner[child] = owner[child], owner[node]
            node = child
    return bins


def multipack(lengths, c, n):
    """Yields the steps of one epoch (§8), each as n bins of sample indices, bin r for rank r.
    A generator, so that the first K steps of a large epoch cost only K steps' work."""
    start, total = 0, len(lengths)
    while start < total:
        end, acc = start, 0          # 1. the window: scan until the sum reaches c * n
        while end < total and acc < c * n:
            acc += lengths[end]
            end += 1
        window = lengths[start:end]
        lo, hi = 1, len(window) + 1  # 2. bisection over [lo, hi); m = 1 accepted untested
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if lpt(window[:mid], c, n) is not None:
                lo = mid
            else:
                hi = mid
        if lo < n:                   # 4. not a full step: the epoch ends here
            break
        bins = lpt(window[:lo], c, n)
        start += lo
        if start >= total:           # the step that reaches the end is dropped
            break
        yield [[start - lo + i for i in b] for b in bins]


@dataclass
class Batch:
    inputs: torch.Tensor     # [T] int64 token ids, 0 in padding
    labels: torch.Tensor     # [T] int64, IGNORE where no loss
    positions: torch.Tensor  # [T] int64, restarting at 0 in each sample, 0 in padding
    samples: list            # (start, length, prefix_len) per sample, back to back from slot 0


def pack(samples, batch_tokens, target_only=True):
    """§4: pack (instruction, response) pairs into one row of `batch_tokens` slots."""
    inputs = np.zeros(batch_tokens, np.int64)
    labels = np.full(batch_tokens, IGNORE, np.int64)
    positions = np.zeros(batch_tokens, np.int64)
    spans, at = [], 0
    for inst, resp in samples:
        inst, resp = np.asarray(inst, np.int64), np.asarray(resp, np.int64)
        p, n = len(inst), len(inst) + len(resp) - 1   # prefix length, sample length
        if p < 1 or len(resp) < 1:
            raise ValueError("a sample needs an instruction and a response of >= 1 token")
        if at + n > batch_tokens:
            raise ValueError(f"samples of {at + n} tokens overflow batch_tokens={batch_tokens}")
        inputs[at:at + n] = np.concatenate([inst, resp[:-1]])            # I ++ R[:-1]
        prefix = inst[1:] if not target_only else np.full(p - 1, IGNORE)
        labels[at:at + n] = np.concatenate([prefix, resp])               # I[-1] predicts R[0]
        positions[at:at + n] = np.arange(n)
        spans.append((at, n, p))
        at += n
    return Batch(torch.from_numpy(inputs), torch.from_numpy(labels),
                 torch.from_numpy(positions), spans)


def epoch_batches(data_dir, epoch, batch_tokens, target_only=True):
    """The packed batches of one epoch for world size 1, in order."""
    tokens, s = load_epoch(data_dir, epoch)
    lengths = (s["inst_len"] + s["resp_len"] - 1).tolist()
    for (order,) in multipack(lengths, batch_tokens, 1):
        pairs = [(tokens[s["inst_start"][i]:s["inst_start"][i] + s["inst_len"][i]],
                  tokens[s["resp_start"][i]:s["resp_start"][i] + s["resp_len"][i]])
                 for i in order]
        yield pack(pairs, batch_tokens, target_only)


# ----------------------------------------------------------------------------------------------
# §2: the block and the module

@dataclass
class Context:
    """What every block of one forward shares: the config and the batch's RoPE and masks."""
    cfg: Config
    cos: torch.Tensor   # [T, head_dim]
    sin: torch.Tensor   # [T, head_dim]
    spans: list         # Batch.samples
    masks: list         # per sample, bool [n_query, n_key]


def rms(x, eps):
    """x / sqrt(mean(x^2) + eps) over the hidden dimension, no learnable weight (§2)."""
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def rope_tables(positions, head_dim, theta, dtype):
    """cos, sin [T, head_dim] of the rotate-half RoPE: inv_freq[i] = theta^(-2i/head_dim).
    Built in fp64 and rounded once to `dtype`: an fp32 angle near position 4096 is off by up to
    ~1e-4 rad, and the reference should not carry that error itself."""
    i = torch.arange(head_dim // 2, dtype=torch.float64, device=positions.device)
    inv_freq = theta ** (-2 * i / head_dim)                                # [head_dim/2]
    angle = positions.to(torch.float64)[:, None] * inv_freq[None, :]       # [T, head_dim/2]
    angle = torch.cat([angle, angle], -1)                                  # [T, head_dim]
    return angle.cos().to(dtype), angle.sin().to(dtype)


def rope(x, cos, sin):
    """x [T, heads, head_dim]: x*cos + rotate_half(x)*sin, rotate_half([x1, x2]) = [-x2, x1]."""
    x1, x2 = x.chunk(2, -1)
    return x * cos[:, None] + torch.cat([-x2, x1], -1) * sin[:, None]


def prefix_lm_masks(batch):
    """§4, per sample: query t sees key s iff s <= max(t, p - 1)."""
    masks = []
    for start, n, p in batch.samples:
        pos = batch.positions[start:start + n]                          # [n] = 0..n-1
        masks.append(pos[None, :] <= torch.clamp(pos, min=p - 1)[:, None])  # [query, key]
    return masks


def attention(q, k, v, ctx):
    """q, k, v [T, heads, head_dim] -> [T, heads, head_dim]: dense masked softmax attention,
    scale 1/sqrt(head_dim). Samples never see each other, so each sample's block of the
    [T, T] score matrix is computed on its own; padding sees nothing and outputs 0."""
    scale = 1.0 / math.sqrt(ctx.cfg.head_dim)
    out = []
    for (start, n, _), allowed in zip(ctx.spans, ctx.masks):
        qs, ks, vs = (t[start:start + n].transpose(0, 1) for t in (q, k, v))  # [heads, n, hd]
        scores = (qs @ ks.transpose(1, 2)) * scale                            # [heads, n, n]
        scores = scores.masked_fill(~allowed, float("-inf"))
        out.append((scores.softmax(-1) @ vs).transpose(0, 1))                 # [n, heads, hd]
    used = sum(n for _, n, _ in ctx.spans)
    out.append(q.new_zeros((q.shape[0] - used,) + q.shape[1:]))
    return torch.cat(out)


def block(x, w, ctx):
    """One pre-norm block (§2); x [T, hidden], w: the block's four weights by short name."""
    cfg = ctx.cfg
    T, heads, hd = x.shape[0], cfg.heads, cfg.head_dim
    h = rms(x, cfg.eps)
    gqkv = (h @ w["attn.gqkv_proj.weight"].T).view(T, 4, heads, hd)  # rows: g, q, k, v heads
    g, q, k, v = gqkv.unbind(1)                                       # each [T, heads, hd]
    q, k = rope(q, ctx.cos, ctx.sin), rope(k, ctx.cos, ctx.sin)
    a = attention(q, k, v, ctx)                                       # [T, heads, hd]
    x = x + (torch.sigmoid(g) * a).reshape(T, heads * hd) @ w["attn.o_proj.weight"].T
    h = rms(x, cfg.eps)
    gate, up = (h @ w["mlp.gate_up_proj.weight"].T).chunk(2, -1)     # each [T, intermediate]
    return x + (F.silu(gate) * up) @ w["mlp.down_proj.weight"].T


def run_module(params, prefix, x, ctx):
    """A module (§2): its blocks in order, then a final rms. x [T, hidden] -> [T, hidden]."""
    for i in range(ctx.cfg.modules[prefix]):
        x = block(x, {t: params[f"{prefix}.layers.{i}.{t}"] for t in BLOCK_TENSORS}, ctx)
    return rms(x, ctx.cfg.eps)


# ----------------------------------------------------------------------------------------------
# §3: the recurrences, as data

@dataclass(frozen=True)
class Pass:
    module: str       # stored prefix of the module's blocks (§9)
    out: str          # state[out] = Module(state[x] + state[inj])
    x: str
    inj: str | None   # None: no injection
    grad: bool        # does gradient flow through this pass (§3)?


def default_bp_steps(cfg):
    """hrm's bp_steps when none is given: the post-warm-up value bp_max_steps (§3)."""
    return cfg.rec["bp_max_steps"] if cfg.net == "hrm" else None


def schedule(cfg, bp_steps=None):
    """(passes, output state) of one forward of cfg.net. The state starts as
    emb = embedding, z_H = emb, z_L = z_L_init broadcast to every token."""
    r, net = cfg.rec, cfg.net
    if net == "transformer":
        return [Pass("model", "z_H", "emb", None, True)], "z_H"
    if net in ("hrm", "trm", "trm_match_recurrence"):
        Hc, Lc = r["H_cycles"], r["L_cycles"]
        if net == "hrm":
            bp = default_bp_steps(cfg) if bp_steps is None else bp_steps
            H_bp = min(Hc, bp - 1)
            L_bp = bp - H_bp
            H, L = "model.H_module", "model.L_module"
        else:  # one module plays both roles, with fixed gradient passes (§1)
            H_bp, L_bp = r["H_bp_steps"], r["L_bp_steps"]
            H = L = "model.L_module"
        passes = []
        for i in range(Hc):
            for k in range(i * Lc, (i + 1) * Lc):
                passes.append(Pass(L, "z_L", "z_L", "z_H", k >= Hc * Lc - L_bp))
            passes.append(Pass(H, "z_H", "z_H", "z_L", i >= Hc - H_bp))
        return passes, "z_H"
    if net == "rins":
        Lc, bp = r["L_cycles"], r["L_bp_cycles"]
        passes = [Pass("model.L_module", "z_L", "z_L", "emb", k >= Lc - bp) for k in range(Lc)]
        return passes + [Pass("model.H_module", "z_H", "z_L", None, True)], "z_H"
    if net == "ut":
        c, bp = r["cycles"], r["bp_cycles"]
        return [Pass("model.L_module", "z_L", "z_L", "emb", k >= c - bp) for k in range(c)], "z_L"
    raise ValueError(f"no schedule for net {net!r}")


def forward(params, z_init, cfg, batch, bp_steps=None):
    """Logits [T, vocab] of one packed batch. A pass without gradient runs under no_grad, so
    its output is a constant to the passes after it (§3)."""
    emb_w = params[EMBED]
    dev, dtype = emb_w.device, emb_w.dtype
    positions = batch.positions.to(dev)
    cos, sin = rope_tables(positions, cfg.head_dim, cfg.theta, dtype)
    ctx = Context(cfg, cos, sin, batch.samples, [m.to(dev) for m in prefix_lm_masks(batch)])
    emb = emb_w[batch.inputs.to(dev)] * math.sqrt(cfg.hidden)  # [T, hidden], §3 embedding scale
    state = {"emb": emb, "z_H": emb}
    if z_init is not None:  # one fixed vector broadcast to every token
        state["z_L"] = z_init.to(dev, dtype).expand(emb.shape[0], cfg.hidden)
    passes, out = schedule(cfg, bp_steps)
    grad_on = torch.is_grad_enabled()
    for p in passes:
        with torch.set_grad_enabled(grad_on and p.grad):
            x = state[p.x] if p.inj is None else state[p.x] + state[p.inj]
            state[p.out] = run_module(params, p.module, x, ctx)
    return state[out] @ params[LM_HEAD].T                           # [T, vocab], untied head


# ----------------------------------------------------------------------------------------------
# §5: loss and metrics

def score(logits, batch):
    """The sums of one step (world size 1): summed CE (a tensor, differentiable), the number
    of valid labels, of right argmaxes, and of exact / eligible samples."""
    labels = batch.labels.to(logits.device)
    valid = labels != IGNORE
    ce_sum = F.cross_entropy(logits[valid], labels[valid], reduction="sum")
    right = (logits.argmax(-1) == labels) & valid
    exact = eligible = 0
    for start, n, _ in batch.samples:  # samples with >= 1 valid label, all of them right
        v = valid[start:start + n]
        if bool(v.any()):
            eligible += 1
            exact += bool(right[start:start + n][v].all())
    return {"ce_sum": ce_sum, "valid": int(valid.sum()), "right": int(right.sum()),
            "exact": exact, "eligible": eligible}


def step_metrics(s):
    """§5 per-step metrics from score()'s sums."""
    return {"loss": s["ce_sum"].item() / s["valid"], "accuracy": s["right"] / s["valid"],
            "exact_accuracy": s["exact"] / max(1, s["eligible"]), "tokens": s["valid"]}


# ----------------------------------------------------------------------------------------------
# §7: the optimiser and the schedule

def lr_at(step, lr, warmup, total_steps, lr_min_ratio):
    """lr * step / warmup while step < warmup, then cosine down to lr * lr_min_ratio."""
    if step < warmup:
        return lr * step / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return lr * (lr_min_ratio + (1 - lr_min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def adam_atan2_step(params, lr, weight_decay=0.1, betas=(0.9, 0.95)):
    """One AdamATan2 update from a fresh optimiser (moments zero, every parameter's own step
    count becomes 1). A parameter that received no gradient is skipped entirely (§7).
    Returns the names of the skipped parameters."""
    b1, b2 = betas
    step = 1
    skipped = []
    with torch.no_grad():
        for name, p in params.items():
            if p.grad is None:
                skipped.append(name)
                continue
            g = p.grad
            m, v = torch.zeros_like(p), torch.zeros_like(p)
            p.mul_(1 - lr * weight_decay)
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = v.sqrt() / math.sqrt(1 - b2 ** step)
            p.sub_((lr / (1 - b1 ** step)) * torch.atan2(m, denom))
    return skipped


# ----------------------------------------------------------------------------------------------
# Subcommands

def setup(a):
    """(device, dtype) from the arguments; full-precision fp32 matmuls on GPUs (no TF32)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device), {"float32": torch.float32, "float64": torch.float64}[a.dtype]


def cmd_loss(a):
    """Mean over the first K steps of epoch `a.epoch` of each per-step metric (§5)."""
    device, dtype = setup(a)
    cfg, params, z_init = load_model(a.model, dtype, device)
    rows = []
    with torch.no_grad():
        for batch in epoch_batches(a.data, a.epoch, a.batch_tokens, a.target_only):
            if len(rows) == a.steps:
                break
            rows.append(step_metrics(score(forward(params, z_init, cfg, batch), batch)))
    if len(rows) < a.steps:
        raise SystemExit(f"epoch {a.epoch} has only {len(rows)} steps of {a.batch_tokens} tokens")
    out = {k: sum(r[k] for r in rows) / len(rows) for k in ("loss", "accuracy", "exact_accuracy")}
    out["tokens"] = sum(r["tokens"] for r in rows)
    print(json.dumps(out))
    return out


def cmd_step(a):
    """One training step on the first batch of epoch `a.epoch`; writes the updated weights."""
    device, dtype = setup(a)
    cfg, params, z_init = load_model(a.model, dtype, device)
    bp = a.bp_steps if a.bp_steps is not None else default_bp_steps(cfg)
    if cfg.net != "hrm" and a.bp_steps is not None:
        print(f"note: --bp-steps applies to hrm only; {cfg.net} uses its net_config "
              f"{cfg.rec}", file=sys.stderr)
        bp = None
    batch = next(epoch_batches(a.data, a.epoch, a.batch_tokens, a.target_only), None)
    if batch is None:
        raise SystemExit(f"epoch {a.epoch} has no step of {a.batch_tokens} tokens")
    s = score(forward(params, z_init, cfg, batch, bp), batch)
    (s["ce_sum"] / s["valid"]).backward()     # §5: sum CE / valid tokens of the step
    total = a.total_steps
    if total is None:  # §7's estimate, for a cosine that starts at step 1 (warmup <= 1)
        meta = json.load(open(os.path.join(a.data, "metadata.json")))
        total = math.floor(a.epochs * meta["total_length"] / a.batch_tokens)
    lr = lr_at(1, a.lr, a.warmup_steps, total, a.lr_min_ratio)
    skipped = adam_atan2_step(params, lr, a.weight_decay)
    save_model(a.out, a.model, params, z_init)
    out = dict(step_metrics(s), lr=lr, bp_steps=bp, no_gradient=skipped)
    print(json.dumps(out))
    return out


def build_parser():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("loss", "step"):
        p = sub.add_parser(name)
        p.add_argument("--model", required=True, help="model directory, SPEC §9 layout")
        p.add_argument("--data", required=True, help="dataset directory, SPEC §8 layout")
        p.add_argument("--batch-tokens", type=int, required=True)
        p.add_argument("--epoch", type=int, default=0)
        p.add_argument("--target-only", action=argparse.BooleanOptionalAction, default=True)
        p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
        p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    sub.choices["loss"].add_argument("--steps", type=int, required=True)
    p = sub.choices["step"]
    p.add_argument("--lr", type=float, required=True)
    p.add_argument("--warmup-steps", type=int, required=True)
    p.add_argument("--bp-steps", type=int, default=None, help="hrm only; default bp_max_steps")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--lr-min-ratio", type=float, default=1.0)
    p.add_argument("--total-steps", type=int, default=None,
                   help="default: floor(epochs * total_length / batch_tokens)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--out", required=True)
    sub.add_parser("selftest").add_argument("--device", default="cpu")
    return ap


def main(argv=None):
    a = build_parser().parse_args(argv)
    if a.cmd == "selftest":
        return selftest(a.device)
    return {"loss": cmd_loss, "step": cmd_step}[a.cmd](a)


# ----------------------------------------------------------------------------------------------
# selftest: a tiny random model and dataset of our own, written in the §8 / §9 layouts

TINY = {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4,
        "num_attention_heads": 2, "head_dim": 128, "vocab_size": 256}  # §1's tiny size
TOKENIZER_VOCAB = 200                                                  # < 256: uint8 tokens


def trunc_normal(gen, shape, std):
    """§6: fmod(N(0, 1), 3) * 1.014762601732121 * std."""
    return torch.fmod(torch.randn(shape, generator=gen), 3) * (1.014762601732121 * std)


def write_random_model(path, net, seed=0, dtype=torch.float32, name_net=True):
    """A lecun_normal-initialised TINY model of `net` in the §9 layout."""
    gen = torch.Generator().manual_seed(seed)
    raw = dict(TINY, model_type="hrm_text", architectures=["HrmTextForCausalLM"],
               num_key_value_heads=TINY["num_attention_heads"], rms_norm_eps=1e-6,
               rope_theta=10000.0, tie_word_embeddings=False, prefix_lm=True)
    if name_net:
        raw.update(net=net, net_config=NET_DEFAULTS[net])
    cfg = read_config(dict(raw, net=net), {})
    std_h, std_i = 1 / math.sqrt(cfg.hidden), 1 / math.sqrt(cfg.intermediate)
    tensors = {n: trunc_normal(gen, s, std_i if n.endswith("down_proj.weight") else std_h)
               for n, s in expected_shapes(cfg).items()}
    tensors = {n: t.to(dtype) for n, t in tensors.items()}
    if net != "transformer":
        tensors[Z_L_INIT] = trunc_normal(gen, (cfg.hidden,), 1.0).bfloat16()
    os.makedirs(path, exist_ok=True)
    json.dump(raw, open(os.path.join(path, "config.json"), "w"), indent=1)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    return path


def random_samples(rng, count):
    """(instruction, response) pairs; the first response has length 1 (causal length 0)."""
    out = []
    for j in range(count):
        inst = rng.integers(1, TOKENIZER_VOCAB, rng.integers(2, 10))
        resp = rng.integers(1, TOKENIZER_VOCAB, 1 if j == 0 else rng.integers(2, 16))
        out.append((inst, resp))
    return out


def write_dataset(path, samples, max_seq_len=32):
    """One epoch of `samples` in the §8 layout."""
    tokens, cols = [], {k: [] for k in ("inst_start", "inst_len", "resp_start", "resp_len")}
    at = 0
    for inst, resp in samples:
        for name, part in (("inst", inst), ("resp", resp)):
            cols[f"{name}_start"].append(at)
            cols[f"{name}_len"].append(len(part))
            tokens.extend(part)
            at += len(part)
    os.makedirs(os.path.join(path, "epoch_0"), exist_ok=True)
    np.save(os.path.join(path, "tokens.npy"), np.asarray(tokens, np.uint8))
    for k, v in cols.items():
        np.save(os.path.join(path, "epoch_0", f"{k}.npy"), np.asarray(v, np.int64))
    meta = {"tokenizer_info": {"vocab_size": TOKENIZER_VOCAB, "boq": "<q>", "eoq": "</q>",
                               "eoa": "</a>", "condition_mapping": {"direct": "<d>", "cot": "<c>"},
                               "tokenizer_path": "none"},
            "max_seq_len": max_seq_len, "total_length": at, "vocab_size": None}
    json.dump(meta, open(os.path.join(path, "metadata.json"), "w"))
    return path


def run_cli(argv):
    """main(argv) with its JSON line captured; returns the parsed line."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        main(argv)
    return json.loads(buf.getvalue().strip().splitlines()[-1])


def selftest(device="cpu"):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import compare_reference

    results = []

    def check(ok, what):
        results.append(bool(ok))
        print(f"{'ok  ' if ok else 'FAIL'}  {what}", flush=True)

    # §8 by hand. n=2, c=8: the window [5,3,5,2,4] (its sum crosses 16 at the 5th), m=4 fits,
    # m=5 does not; the tie between the 5s goes to index 2. The next step reaches the end: dropped.
    check(list(multipack([5, 3, 5, 2, 4, 6], 8, 2)) == [[[2, 3], [0, 1]]],
          "multipack, 2 bins, by hand")
    check(list(multipack([3, 4, 2, 5], 8, 1)) == [[[1, 0]]],
          "multipack, 1 bin: longest first, last step dropped")
    # §4 by hand: I = [10, 11, 12], R = [20, 21] in 6 slots.
    b = pack([([10, 11, 12], [20, 21])], 6)
    check(b.inputs.tolist() == [10, 11, 12, 20, 0, 0] and b.positions.tolist() == [0, 1, 2, 3, 0, 0]
          and b.labels.tolist() == [IGNORE, IGNORE, 20, 21, IGNORE, IGNORE], "pack, target_only")
    check(pack([([10, 11, 12], [20, 21])], 6, False).labels.tolist()[:4] == [11, 12, 20, 21],
          "pack, instruction labels")
    check(prefix_lm_masks(b)[0].int().tolist() == [[1, 1, 1, 0]] * 3 + [[1, 1, 1, 1]],
          "PrefixLM mask: bidirectional instruction, causal response")
    # §5 by hand: sample A's labels [3, 4] predicted right, sample B's [6, 7] with 7 wrong.
    b = pack([([1, 2], [3, 4]), ([5], [6, 7])], 8)
    logits = 10.0 * F.one_hot(b.labels.clamp(min=0), 8).double()
    logits[4, 7] = -10.0
    m = step_metrics(score(logits, b))
    check((m["accuracy"], m["exact_accuracy"], m["tokens"]) == (0.75, 0.5, 4), "§5 metrics")
    # §3's worked example: bp_steps = 5 -> H pass 0, L passes 3, 4, 5, H pass 1.
    cfg = read_config(dict(TINY, net="hrm"), {})
    grads = [(p.module.split(".")[1][0], p.grad) for p in schedule(cfg, 5)[0]]
    check(grads == [("L", False)] * 3 + [("H", True)] + [("L", True)] * 3 + [("H", True)],
          "hrm schedule, bp_steps=5 (§3 example)")
    # §7 closed form at step 1: p*(1 - lr*wd) - lr/(1-b1) * atan2((1-b1) g, |g|).
    p0, g = torch.randn(7, dtype=torch.float64), torch.randn(7, dtype=torch.float64)
    g[3] = 0.0
    p = {"w": p0.clone().requires_grad_()}
    p["w"].grad = g
    adam_atan2_step(p, 1e-3)
    want = p0 * (1 - 1e-4) - 1e-2 * torch.atan2(0.1 * g, g.abs())
    check(torch.allclose(p["w"].detach(), want, rtol=0, atol=1e-15), "AdamATan2 step 1, closed form")
    check(lr_at(1, 1e-3, 2000, 100, 1.0) == 1e-3 / 2000 and lr_at(1, 1e-3, 1, 100, 0.1) == 1e-3,
          "lr schedule at step 1")

    tmp = tempfile.mkdtemp(prefix="torch_reference_")
    rng = np.random.default_rng(0)
    data = write_dataset(os.path.join(tmp, "data"), random_samples(rng, 40))
    a_pair, b_pair = random_samples(np.random.default_rng(1), 3)[1:]  # responses of >= 2 tokens
    b_other = (rng.integers(1, TOKENIZER_VOCAB, len(b_pair[0])),
               rng.integers(1, TOKENIZER_VOCAB, len(b_pair[1])))
    common = ["--data", data, "--batch-tokens", "64", "--device", device]

    def token_ce(params, z, cfg, batch, bp=None):
        with torch.no_grad():
            logits = forward(params, z, cfg, batch, bp)
        labels = batch.labels.clamp(min=0).to(logits.device)
        return logits, F.cross_entropy(logits, labels, reduction="none")

    for net in NET_DEFAULTS:
        mdir = write_random_model(os.path.join(tmp, net), net)
        cfg, params, z = load_model(mdir, torch.float64, device)
        n_a = len(a_pair[0]) + len(a_pair[1]) - 1
        _, ce_ab = token_ce(params, z, cfg, pack([a_pair, b_pair], 48))
        _, ce_ab_pad = token_ce(params, z, cfg, pack([a_pair, b_pair], 80))
        _, ce_ab2 = token_ce(params, z, cfg, pack([a_pair, b_other], 48))
        _, ce_ba = token_ce(params, z, cfg, pack([b_pair, a_pair], 48))
        used = n_a + len(b_pair[0]) + len(b_pair[1]) - 1
        check(torch.allclose(ce_ab[:used], ce_ab_pad[:used], rtol=1e-12, atol=0),
              f"{net}: padding does not change the per-token loss")
        check(torch.allclose(ce_ab[:n_a], ce_ab2[:n_a], rtol=1e-12, atol=0)
              and torch.allclose(ce_ab[:n_a], ce_ba[used - n_a:used], rtol=1e-12, atol=0),
              f"{net}: a sample sees neither its neighbour nor its offset")
        # Prefix is bidirectional, response causal: change the last instruction token, then
        # the first response input, and see which slots move.
        p_a = len(a_pair[0])
        base, _ = token_ce(params, z, cfg, pack([a_pair], 32))
        inst2 = a_pair[0].copy()
        inst2[-1] = inst2[-1] % (TOKENIZER_VOCAB - 1) + 1
        moved, _ = token_ce(params, z, cfg, pack([(inst2, a_pair[1])], 32))
        resp2 = np.concatenate([[a_pair[1][0] % (TOKENIZER_VOCAB - 1) + 1], a_pair[1][1:]])
        moved2, _ = token_ce(params, z, cfg, pack([(a_pair[0], resp2)], 32))
        check(not torch.equal(base[0], moved[0]) and torch.equal(base[:p_a], moved2[:p_a])
              and not torch.equal(base[p_a], moved2[p_a]), f"{net}: PrefixLM visibility")

        l32 = run_cli(["loss", "--model", mdir, "--steps", "2"] + common)
        l1 = run_cli(["loss", "--model", mdir, "--steps", "1"] + common)
        l64 = run_cli(["loss", "--model", mdir, "--steps", "2", "--dtype", "float64"] + common)
        check(math.isfinite(l32["loss"]) and l32["tokens"] > 0
              and abs(l32["loss"] / l64["loss"] - 1) < 1e-5,
              f"{net}: loss {l32['loss']:.6f} over {l32['tokens']} tokens; fp32/fp64 rel diff "
              f"{abs(l32['loss'] / l64['loss'] - 1):.1e}")
        bps = [2, 5] if net == "hrm" else [None]
        for bp in bps:
            out = os.path.join(tmp, f"{net}_step{bp}")
            s = run_cli(["step", "--model", mdir, "--out", out, "--lr", "1e-3", "--warmup-steps",
                         "1"] + (["--bp-steps", str(bp)] if bp else []) + common)
            after = load_file(os.path.join(out, "model.safetensors"))
            before = load_file(os.path.join(mdir, "model.safetensors"))
            no_emb = (net == "hrm" and bp == 2) or net == "trm"
            same = sorted(n for n in before if torch.equal(before[n], after[n]))
            want_same = sorted(([EMBED] if no_emb else []) + ([Z_L_INIT] if z is not None else []))
            check(s["no_gradient"] == ([EMBED] if no_emb else []) and same == want_same
                  and abs(s["loss"] / l1["loss"] - 1) < 1e-6,
                  f"{net}{'' if bp is None else f' bp_steps={bp}'}: step, unchanged {same}")
            diffs = compare_reference.compare_models(mdir, out)
            check(max(diffs.values()) > 0 and
                  run_cli(["loss", "--model", out, "--steps", "1"] + common)["loss"] > 0,
                  f"{net}: stepped model reloads, max rel change {max(diffs.values()):.2e}")

    # §9 without `net`: inferred from the names, here from bf16 tensors.
    for net in ("hrm", "transformer"):
        mdir = write_random_model(os.path.join(tmp, f"{net}_bf16"), net, 1, torch.bfloat16, False)
        cfg, params, _ = load_model(mdir, torch.float32, device)
        check(cfg.net == net and params[EMBED].dtype == torch.float32, f"{net} inferred, bf16 read")
    # The gradient is the true derivative where every pass carries it (hrm bp_steps = 8):
    # central differences in fp64 on a few weights.
    cfg, params, z = load_model(os.path.join(tmp, "hrm"), torch.float64, device)
    batch = pack([a_pair, b_pair], 48)

    def full_bp_loss():
        s = score(forward(params, z, cfg, batch, 8), batch)
        return s["ce_sum"] / s["valid"]

    full_bp_loss().backward()
    worst = 0.0
    for name in (EMBED, "model.L_module.layers.0.attn.gqkv_proj.weight",
                 "model.H_module.layers.1.mlp.down_proj.weight", LM_HEAD):
        w = params[name]
        idx = np.unravel_index(int(w.grad.abs().argmax()), tuple(w.shape))
        with torch.no_grad():
            w[idx] += 1e-6
            up = float(full_bp_loss())
            w[idx] -= 2e-6
            down = float(full_bp_loss())
            w[idx] += 1e-6
        fd = (up - down) / 2e-6
        worst = max(worst, abs(fd - float(w.grad[idx])) / abs(fd))
    check(worst < 1e-6, f"hrm bp_steps=8 gradient vs finite differences, worst rel {worst:.1e}")
    shutil.rmtree(tmp)
    print(f"{sum(results)} passed, {len(results) - sum(results)} failed")
    return 0 if all(results) else 1


if __name__ == "__main__":
    r = main()
    sys.exit(r if isinstance(r, int) else 0)
