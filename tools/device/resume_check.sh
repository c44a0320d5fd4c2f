#!/usr/bin/env bash
# kill -9 in the middle of a GPU training run, --resume it, and compare with the same run left
# alone: with deterministic kernels the losses after the resume point and the final weights
# are identical. The runs log every 10 steps (the default), so between logs the host runs ahead
# of the device as in real training. Usage (on the GPU machine, from the repository root):
#   bash tools/device/resume_check.sh [.device/hrm-cu]
set -uo pipefail
bin="${1:-.device/hrm-cu}"
work="$(mktemp -d)"
args=(train --data demo --device gpu --epochs 12 --lr 2e-3 --steps 240 --checkpoint-every 40 --eval-every 100000)

"$bin" "${args[@]}" --out "$work/straight" > "$work/straight.log" 2>&1 || { echo "straight run failed"; tail "$work/straight.log"; exit 1; }

"$bin" "${args[@]}" --out "$work/killed" > "$work/killed.log" 2>&1 &
pid=$!
while [[ ! -d "$work/killed/ckpt-120" ]] && kill -0 "$pid" 2>/dev/null; do sleep 0.01; done
kill -9 "$pid" 2>/dev/null
wait "$pid" 2>/dev/null
echo "killed at: $(ls "$work/killed" | grep ckpt- | tr '\n' ' ')(last logged step $(tail -n 1 "$work/killed/metrics.jsonl" | python3 -c 'import json,sys; print(json.load(sys.stdin)["step"])'))"
"$bin" "${args[@]}" --out "$work/killed" --resume > "$work/resumed.log" 2>&1 || { echo "resume failed"; tail "$work/resumed.log"; exit 1; }

python3 - "$work" <<'PY'
import json, sys, hashlib, pathlib
work = pathlib.Path(sys.argv[1])
def losses(run):
    out = {}
    for line in open(work / run / "metrics.jsonl"):
        r = json.loads(line)
        if r["split"] == "train":
            out[r["step"]] = r["loss"]  # a step logged twice (before the kill, after the resume) keeps the last
    return out
a, b = losses("straight"), losses("killed")
steps = sorted(set(a) & set(b))
diff = [s for s in steps if a[s] != b[s]]
print(f"steps compared: {len(steps)} ({steps[0]}..{steps[-1]}), loss mismatches: {len(diff)}" + (f", first at step {diff[0]}: {a[diff[0]]} vs {b[diff[0]]}" if diff else ""))
def sha(run):
    return hashlib.sha256((work / run / "ckpt-240" / "model.safetensors").read_bytes()).hexdigest()[:16]
print(f"final weights sha256: straight {sha('straight')}, killed+resumed {sha('killed')}")
sys.exit(1 if diff or sha("straight") != sha("killed") else 0)
PY
