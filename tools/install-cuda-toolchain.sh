#!/usr/bin/env bash
# Installs the pinned CUDA 13.0 compiler wheels into .cuda-toolchain/ (project-local, no root).
# Idempotent: returns at once when the pinned versions are already there.
# The nvvm pin matters: an unpinned nvvm emits PTX that the 13.0 assembler rejects.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dest="$root/.cuda-toolchain"
pins=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-crt==13.0.88
  nvidia-cuda-cccl==13.0.85
)
stamp="$dest/.pins"
if [[ -x "$dest/nvidia/cu13/bin/nvcc" && -f "$stamp" && "$(cat "$stamp")" == "${pins[*]}" ]]; then
  echo "cuda toolchain: already installed in $dest"
  exit 0
fi
python="${PYTHON:-python3}"
command -v "$python" >/dev/null || { echo "error: python3 is needed to install the nvcc wheels (apt-get install python3-pip)" >&2; exit 1; }
rm -rf "$dest"
"$python" -m pip install --quiet --disable-pip-version-check --no-warn-script-location \
  --target "$dest" "${pins[@]}"
nvcc="$dest/nvidia/cu13/bin/nvcc"
[[ -x "$nvcc" ]] || { echo "error: $nvcc missing after install" >&2; exit 1; }
echo "${pins[*]}" > "$stamp"
"$nvcc" --version | tail -n 2
echo "cuda toolchain: installed in $dest"
