#!/usr/bin/env bash
# Compile-check every CUDA source in csrc/ for sm_80 and sm_90 with warnings as errors.
# The .cu files are torch-free (design §3), so plain nvcc is enough; no GPU is needed.
# Skips (exit 0) with a message when nvcc is not installed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NVCC="${NVCC:-$(command -v nvcc || true)}"
if [[ -z "$NVCC" && -x /usr/local/cuda/bin/nvcc ]]; then NVCC=/usr/local/cuda/bin/nvcc; fi
if [[ -z "$NVCC" ]]; then
  echo "nvcc_check: nvcc not found; skipping the CUDA compile check"
  exit 0
fi
shopt -s nullglob
sources=("$root"/csrc/*.cu)
if (( ${#sources[@]} == 0 )); then
  echo "nvcc_check: no .cu files under csrc/"
  exit 0
fi
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
status=0
for src in "${sources[@]}"; do
  for arch in 80 90; do
    if "$NVCC" -c "$src" -o "$out/$(basename "$src" .cu)_sm$arch.o" -std=c++17 -O3 \
        -gencode "arch=compute_$arch,code=sm_$arch" -I"$root/csrc" \
        -Werror all-warnings -Xcompiler -Wall,-Wextra,-Werror; then
      echo "nvcc_check: ok   $(basename "$src") sm_$arch"
    else
      echo "nvcc_check: FAIL $(basename "$src") sm_$arch"
      status=1
    fi
  done
done
exit $status
