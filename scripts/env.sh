#!/usr/bin/env bash
# Sourced by the other scripts: creates (or reuses) a virtual environment with
# requirements-dev.txt, keyed by the hash of that file and the Python version,
# activates it, and builds ssl_ops in place (incrementally).
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
  # pip's notices (here: pip.conf's find-links and extra indexes that do not
  # exist, "Location ... is ignored") go to a log, shown if the install fails.
  pip_log="$VENV/pip-install.log"
  { "$VENV/bin/pip" install --quiet --upgrade pip &&
    "$VENV/bin/pip" install --quiet -r "$SSL_OPS_ROOT/requirements-dev.txt"; } > "$pip_log" 2>&1 || {
    tail -n 40 "$pip_log"
    echo "installing requirements-dev.txt failed; full log in $pip_log" >&2
    exit 1
  }
  touch "$VENV/.ssl_ops_complete"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"

# CUDA kernels are required whenever they can be built: torch is a CUDA build
# and a CUDA toolkit is installed (the same search as setup.py).
torch_cuda=$(python -c "import torch; print(torch.version.cuda or '')")
have_nvcc=""
for home in "${CUDA_HOME:-}" "${CUDA_PATH:-}" /usr/local/cuda; do
  if [ -n "$home" ] && [ -x "$home/bin/nvcc" ]; then have_nvcc=1; CUDA_HOME=$home; break; fi
done
# Every later torch process (torch.compile's CPU code generator imports
# torch.utils.cpp_extension) then sees the toolkit the build used, not torch's
# guess from the nvcc on PATH (here a wrapper in /usr/local/bin: "/usr/local").
if [ -n "$have_nvcc" ]; then export CUDA_HOME; fi
if [ -z "$have_nvcc" ] && command -v nvcc > /dev/null; then have_nvcc=1; fi
if [ -n "$torch_cuda" ] && [ -n "$have_nvcc" ] && [ "${SSL_OPS_CPU_ONLY:-0}" != "1" ]; then
  export SSL_OPS_FORCE_CUDA=1 SSL_OPS_EXPECT_CUDA_KERNELS=1
  # With no GPU visible nothing compiled here runs here: build Hopper's code
  # only (CI's arch), not setup.py's 8.0;9.0+PTX: the whole build took 8.8 min
  # instead of 10.8 on 2 cores. A visible GPU gets its own archs from setup.py.
  if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ] &&
    ! python -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2> /dev/null; then
    export TORCH_CUDA_ARCH_LIST=9.0
  fi
fi

# One build for every script: the same options (the emulation module; its
# ASan copy only for test.sh --full, which sets SSL_OPS_BUILD_EMU_ASAN=1),
# built in place by ninja, so switching from test.sh to run.sh or back
# rebuilds nothing. (`pip install -e .` would build
# in a fresh temporary folder every time: minutes on 2 cores.) The checkout is
# made importable by a .pth file in the environment.
export SSL_OPS_BUILD_EMU=${SSL_OPS_BUILD_EMU:-1} SSL_OPS_BUILD_EMU_ASAN=${SSL_OPS_BUILD_EMU_ASAN:-0}
echo "== building ssl_ops (torch CUDA: ${torch_cuda:-none}, nvcc: ${have_nvcc:-no}; incremental)"
(cd "$SSL_OPS_ROOT" && python setup.py build_ext --inplace > "$SSL_OPS_ROOT/build.log" 2>&1) || {
  tail -n 60 "$SSL_OPS_ROOT/build.log"
  echo "ssl_ops build failed; full log in build.log" >&2
  exit 1
}
# An environment from before this scheme has ssl_ops pip-installed; drop it.
if python -m pip show --quiet ssl_ops > /dev/null 2>&1; then python -m pip uninstall --quiet --yes ssl_ops; fi
site_packages=$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$SSL_OPS_ROOT" > "$site_packages/ssl_ops_checkout.pth"
awk '/ssl_ops build configuration/ {n = 6; if (shown++) exit} n-- > 0 {sub(/^ +/, ""); print}' "$SSL_OPS_ROOT/build.log"
python -c "import ssl_ops; print('== build_info:', ssl_ops.build_info())"
