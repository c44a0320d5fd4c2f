#!/usr/bin/env bash
# Cross-checks the Rust trainer (CPU reference engine by default) against the independent
# PyTorch formulation `tools/torch_reference.py`, for every net: the loss of a fresh tiny
# model over the first batches, and the weights after one optimiser step.
#
#   PYTHONPATH=/tmp/torchenv bash tools/crosscheck_torch.sh [hrm-cu binary] [device]
#
# The fresh weights come from a 1-step run at lr 0 (decay and update are then exactly zero),
# exported in f32, so both sides start from the same SPEC §9 directory.
set -euo pipefail
bin="${1:-target/release/hrm-cu}"
device="${2:-cpu}"
work="$(mktemp -d)"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" PYTHONDONTWRITEBYTECODE=1
tokens=512
"$bin" data demo --out "$work/data" --train-samples 400 --epochs 1 >/dev/null
data="$work/data/train"
status=0
printf '%-22s %12s %12s %10s  %s\n' net loss_rust loss_torch rel_diff "one step: weights"
for net in hrm transformer trm trm_match_recurrence rins ut; do
  "$bin" train --data "$data" --net "$net" --epochs 1 --steps 1 --lr 0 --batch-tokens $tokens --device cpu --out "$work/$net-init" --log-every 1000 >/dev/null 2>&1
  "$bin" export --checkpoint "$work/$net-init" --out "$work/$net-m0" --no-ema --dtype f32 >/dev/null
  "$bin" loss --model "$work/$net-m0" --data "$data" --batch-tokens $tokens --steps 3 --device "$device" > "$work/$net-loss-rust.json"
  python3 tools/torch_reference.py loss --model "$work/$net-m0" --data "$data" --batch-tokens $tokens --steps 3 > "$work/$net-loss-torch.json"
  read -r rust torch rel < <(python3 - "$work/$net-loss-rust.json" "$work/$net-loss-torch.json" <<'PY'
import json, sys
a, b = (json.loads(open(p).read().strip().splitlines()[-1]) for p in sys.argv[1:3])
print(a["loss"], b["loss"], abs(a["loss"] - b["loss"]) / abs(b["loss"]))
PY
)
  "$bin" train --init "$work/$net-m0" --data "$data" --epochs 1 --steps 1 --lr 1e-3 --warmup-steps 1 --bp-steps 5 --batch-tokens $tokens --device "$device" --out "$work/$net-step" --log-every 1000 >/dev/null 2>&1
  "$bin" export --checkpoint "$work/$net-step" --out "$work/$net-m1" --no-ema --dtype f32 >/dev/null
  python3 tools/torch_reference.py step --model "$work/$net-m0" --data "$data" --batch-tokens $tokens --lr 1e-3 --warmup-steps 1 --bp-steps 5 --out "$work/$net-t1" >/dev/null
  weights=$(python3 tools/compare_reference.py "$work/$net-m1" "$work/$net-t1" --base "$work/$net-m0" 2>&1 | tail -n 1) || status=1
  printf '%-22s %12.8f %12.8f %10.2e  %s\n' "$net" "$rust" "$torch" "$rel" "$weights"
  python3 -c "import sys; sys.exit(0 if $rel <= 1e-4 else 1)" || status=1
done
rm -rf "$work"
exit $status
