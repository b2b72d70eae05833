#!/usr/bin/env bash
# Sourced by the other scripts: creates (or reuses) a virtual environment with
# requirements-dev.txt, keyed by the hash of that file and the Python version,
# then builds ssl_ops into it (editable) and activates it.
#
#   SSL_OPS_VENV        where the environment lives (default: ~/.cache/ssl_ops/venv-<hash>)
#   PYTHON              the interpreter to create it with (default: python3)
# Build options (README, "Build options") pass through to setup.py.
set -euo pipefail
SSL_OPS_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
deps_hash=$( (cat "$SSL_OPS_ROOT/requirements-dev.txt"; "$PYTHON" --version 2>&1) | sha256sum | cut -c1-16)
VENV=${SSL_OPS_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/ssl_ops/venv-$deps_hash}
if [ ! -f "$VENV/.ssl_ops_complete" ]; then
  echo "== creating $VENV"
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --upgrade pip
  "$VENV/bin/pip" install --quiet -r "$SSL_OPS_ROOT/requirements-dev.txt"
  touch "$VENV/.ssl_ops_complete"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"

# CUDA kernels are required whenever they can be built: torch is a CUDA build
# and a CUDA toolkit is installed (the same search as setup.py).
torch_cuda=$(python -c "import torch; print(torch.version.cuda or '')")
have_nvcc=""
for home in "${CUDA_HOME:-}" "${CUDA_PATH:-}" /usr/local/cuda; do
  if [ -n "$home" ] && [ -x "$home/bin/nvcc" ]; then have_nvcc=1; fi
done
if [ -z "$have_nvcc" ] && command -v nvcc > /dev/null; then have_nvcc=1; fi
if [ -n "$torch_cuda" ] && [ -n "$have_nvcc" ] && [ "${SSL_OPS_CPU_ONLY:-0}" != "1" ]; then
  export SSL_OPS_FORCE_CUDA=1 SSL_OPS_EXPECT_CUDA_KERNELS=1
fi

echo "== building ssl_ops (torch CUDA: ${torch_cuda:-none}, nvcc: ${have_nvcc:-no})"
(cd "$SSL_OPS_ROOT" && pip install --verbose --no-build-isolation --no-deps -e . > "$SSL_OPS_ROOT/build.log" 2>&1) || {
  tail -n 60 "$SSL_OPS_ROOT/build.log"
  echo "ssl_ops build failed; full log in build.log" >&2
  exit 1
}
# setup.py runs twice under pip (metadata, then build): show its report once.
awk '/ssl_ops build configuration/ {n = 6; if (shown++) exit} n-- > 0 {sub(/^ +/, ""); print}' "$SSL_OPS_ROOT/build.log"
python -c "import ssl_ops; print('== build_info:', ssl_ops.build_info())"
