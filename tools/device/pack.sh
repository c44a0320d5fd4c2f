#!/usr/bin/env bash
# Builds what a GPU-machine call needs and copies it into .device/ (ignored by git), so that a
# device call can carry ["target/release/hrm-cu", ".device"] — see ../shared/DEVICE.md.
# The GPU machines have no Rust toolchain: everything is built here.
set -euo pipefail
cd "$(dirname "$0")/../.."
bash tools/install-cuda-toolchain.sh >/dev/null
cargo build --release --locked
rm -rf .device && mkdir -p .device
cp target/release/hrm-cu .device/
cp tools/device/checks.sh .device/
if [[ "${WITH_BENCHES:-0}" == 1 ]]; then
  # Criterion bench executables: `cargo bench --no-run` prints where it put them.
  cargo bench --no-run --locked --message-format=json 2>/dev/null \
    | python3 -c 'import json,sys
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m.get("executable") and "bench" in m["target"]["kind"]: print(m["executable"])' \
    | while read -r exe; do cp "$exe" .device/; done
fi
du -sh .device
