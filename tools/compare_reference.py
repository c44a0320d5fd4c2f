#!/usr/bin/env python3
"""Compare the Rust trainer's output with tools/torch_reference.py's.

    compare_reference.py MODEL_A MODEL_B [--base MODEL_0] [--tol 1e-4]
    compare_reference.py LOSS_A LOSS_B [--tol 1e-4]

Two model directories (SPEC §9 layout): for every tensor, the relative difference
`max|a - b| / max(max|a|, max|b|)`, then the worst over all tensors. Normalising by the
tensor's largest magnitude, not element by element, keeps elements near zero from
dominating. With `--base` (the weights both started from) the one-step *updates* a - base
and b - base are compared as well. At step 1 AdamATan2 moves every element by
lr/(1-b1) * atan2((1-b1) g, |g|) = +-0.997 lr whatever the gradient's size (SPEC §7 with zero
moments): the step writes sign(g). An element whose gradient is at rounding level can come
out with opposite signs in two correct implementations, and then differs by ~2 lr, which
alone exceeds 1e-4 of the weights once lr is above ~1e-5. So with `--base` such sign flips
are counted against a budget (`--max-flip-fraction`) and the weights are judged on the other
elements. Without `--base` every element counts.

Two JSON lines (as printed by `torch_reference.py loss|step`, given inline or as files whose
last line is the JSON): `|a - b| / |b|` for every shared number, judged on `loss` only.

Exit status: 0 within the tolerance, 1 above it, 2 when the inputs do not match up.
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_reference import read_safetensors  # noqa: E402


def rel_diff(a, b):
    """max|a - b| / max(max|a|, max|b|); 0 for two all-zero tensors."""
    a, b = a.double(), b.double()
    scale = max(float(a.abs().max()), float(b.abs().max())) if a.numel() else 0.0
    return float((a - b).abs().max()) / scale if scale > 0 else 0.0


def load_tensors(model_dir):
    return {n: t.double() for n, t in read_safetensors(model_dir).items()}


def compare_models(dir_a, dir_b):
    """name -> relative difference of the two models' tensors; ValueError if names differ."""
    a, b = load_tensors(dir_a), load_tensors(dir_b)
    if set(a) != set(b):
        raise ValueError(f"tensor names differ: only in A {sorted(set(a) - set(b))[:4]}, "
                         f"only in B {sorted(set(b) - set(a))[:4]}")
    for n in a:
        if a[n].shape != b[n].shape:
            raise ValueError(f"{n}: shapes {tuple(a[n].shape)} vs {tuple(b[n].shape)}")
    return {n: rel_diff(a[n], b[n]) for n in sorted(a)}


def report_models(args):
    a, b = load_tensors(args.a), load_tensors(args.b)
    diffs = compare_models(args.a, args.b)
    base = load_tensors(args.base) if args.base else None
    flips_total = size_total = 0
    width = max(len(n) for n in diffs)
    for n, d in diffs.items():
        line = f"{n:<{width}}  {d:.3e}"
        if base is not None:
            da, db = a[n] - base[n], b[n] - base[n]      # the two one-step updates
            flip = da * db < 0
            flips, size = int(flip.sum()), flip.numel()
            if flips:  # judge the weights on the elements whose updates agree in sign
                scale = max(float(a[n].abs().max()), float(b[n].abs().max()))
                diffs[n] = float(((a[n] - b[n]).abs() * ~flip).max()) / scale
            flips_total, size_total = flips_total + flips, size_total + size
            line += (f"  without flips {diffs[n]:.3e}  update {rel_diff(da, db):.3e}"
                     f"  sign flips {flips}/{size}")
        print(line)
    worst = max(diffs, key=diffs.get)
    ok = diffs[worst] <= args.tol
    print(f"overall max relative difference {diffs[worst]:.3e} ({worst}), tolerance {args.tol:g}")
    if base is not None:
        budget = args.max_flip_fraction * size_total
        ok = ok and flips_total <= budget
        print(f"update sign flips {flips_total} of {size_total} elements, "
              f"budget {args.max_flip_fraction:g} of them ({budget:.1f})")
    return 0 if ok else 1


def read_json_line(arg):
    text = open(arg).read() if os.path.isfile(arg) else arg
    return json.loads(text.strip().splitlines()[-1])


def report_losses(args):
    a, b = read_json_line(args.a), read_json_line(args.b)
    if "loss" not in a or "loss" not in b:
        raise ValueError("both JSON lines need a `loss`")
    for k in sorted(set(a) & set(b)):
        if isinstance(a[k], (int, float)) and isinstance(b[k], (int, float)):
            rel = abs(a[k] - b[k]) / abs(b[k]) if b[k] else float(a[k] != b[k])
            print(f"{k:<15} {a[k]!r:>22} {b[k]!r:>22}  rel {rel:.3e}")
    rel = abs(a["loss"] - b["loss"]) / abs(b["loss"])
    print(f"relative loss difference {rel:.3e}, tolerance {args.tol:g}")
    return 0 if rel <= args.tol else 1


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("a", help="model directory or JSON line (or file) of one side")
    ap.add_argument("b", help="the same of the other side (the reference, for loss lines)")
    ap.add_argument("--base", help="model directory both sides stepped from (models only)")
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--max-flip-fraction", type=float, default=1e-4,
                    help="with --base: allowed fraction of elements whose updates differ in sign")
    args = ap.parse_args(argv)
    try:
        if os.path.isdir(args.a) and os.path.isdir(args.b):
            return report_models(args)
        return report_losses(args)
    except (ValueError, OSError, json.JSONDecodeError) as e:
        print(f"compare_reference: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
