#!/usr/bin/env bash
# Two fresh GPU training runs of one command give the same bits: the first tunes cuBLASLt's
# algorithms and records them in a fresh GEMM algorithm store (src/train/gemm_store.rs), the
# second runs the recorded ones; their losses and final weights must be identical. The runs
# log every 10 steps (the default), so the host runs ahead of the device between logs, as in
# real training (a staging race once hid there, docs/perf.md, ninth session). A third run with
# `--gemm-algorithms off` tunes anew, for comparison (it may or may not differ). Usage (on the
# GPU machine, from the repository root):
#   bash tools/device/repro_check.sh [.device/hrm-cu]
set -uo pipefail
bin="${1:-.device/hrm-cu}"
work="$(mktemp -d)"
args=(train --data demo --device gpu --epochs 12 --lr 2e-3 --steps 240 --checkpoint-every 240)
store="$work/gemm-algorithms.json"
for run in first second; do
  "$bin" "${args[@]}" --gemm-algorithms "$store" --out "$work/$run" > "$work/$run.log" 2>&1 || { echo "$run run failed"; tail "$work/$run.log"; exit 1; }
done
"$bin" "${args[@]}" --gemm-algorithms off --out "$work/untuned" > "$work/untuned.log" 2>&1 || { echo "run without the store failed"; tail "$work/untuned.log"; exit 1; }

python3 - "$work" <<'PY'
import json, sys, hashlib, pathlib
work = pathlib.Path(sys.argv[1])
store = json.load(open(work / "gemm-algorithms.json"))
print("store:", "; ".join(f'{r["device"]}: {len(r["choices"])} shapes' for r in store["records"]))
def records(run):
    out = {}
    for line in open(work / run / "metrics.jsonl"):
        r = json.loads(line)
        out[(r["split"], r["step"])] = r["loss"]
    return out
def sha(run):
    return hashlib.sha256((work / run / "ckpt-240" / "model.safetensors").read_bytes()).hexdigest()[:16]
a, b, c = records("first"), records("second"), records("untuned")
diff = [k for k in sorted(a) if a[k] != b.get(k)]
print(f"first vs second: {len(a)} logged losses, {len(diff)} mismatches; final weights sha256 {sha('first')} / {sha('second')}")
diff_c = [k for k in sorted(a) if a[k] != c.get(k)]
print(f"first vs a run tuned anew: {len(diff_c)} mismatches" + (f", first at {diff_c[0]}" if diff_c else "") + f"; sha256 {sha('untuned')}")
sys.exit(1 if diff or sha("first") != sha("second") or set(a) != set(b) else 0)
PY
