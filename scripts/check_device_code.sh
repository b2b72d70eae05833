#!/usr/bin/env bash
# Compiles the device code of every csrc/cuda/*.cu for other GPU archs, without
# host code or linking (nvcc -cubin), to prove the per-arch guards (Note
# [Tensor cores per arch], csrc/cuda/tensor_core_arch.h) hold everywhere
# pip install builds: about 40 s per arch on 2 cores, against minutes for a
# second full build.
#   bash scripts/check_device_code.sh [ARCH ...]     # default: sm_75 (the T4)
# Uses the environment of scripts/env.sh (torch's headers, the CUDA toolkit).
set -euo pipefail
# shellcheck disable=SC1091
source "$(dirname "${BASH_SOURCE[0]}")/env.sh" > /dev/null
cd "$SSL_OPS_ROOT"
nvcc=""
for home in "${CUDA_HOME:-}" "${CUDA_PATH:-}" /usr/local/cuda; do
  if [ -n "$home" ] && [ -x "$home/bin/nvcc" ]; then nvcc="$home/bin/nvcc"; break; fi
done
if [ -z "$nvcc" ]; then
  echo "check_device_code: no CUDA toolkit found; nothing to check" >&2
  exit 0
fi
includes=$(python - <<'PY' 2> /dev/null
import sysconfig
from torch.utils.cpp_extension import include_paths
print(" ".join("-I" + p for p in include_paths(device_type="cuda") + [sysconfig.get_paths()["include"]]))
PY
)
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for arch in "${@:-sm_75}"; do
  for source in csrc/cuda/*.cu; do
    # The flags of setup.py's CUDA build that matter to device code.
    # shellcheck disable=SC2086
    "$nvcc" -cubin -arch="$arch" -std=c++20 -O3 --expt-relaxed-constexpr \
      -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ \
      -D__CUDA_NO_HALF2_OPERATORS__ -DSSL_OPS_WITH_CUDA=1 -DSSL_OPS_HAVE_MM_OUT_DTYPE=1 $includes \
      -o "$out/$(basename "$source").cubin" "$source"
    echo "device code of $source compiles for $arch"
  done
done
