#!/usr/bin/env bash
# Installs everything, builds ssl_ops (scripts/env.sh: with the emulation modules,
# ASan included)
# and runs the whole test suite, the mutation check of the Python layer, then the
# emulated CUDA kernel tests again under AddressSanitizer.
set -euo pipefail
# shellcheck disable=SC1091
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$SSL_OPS_ROOT"
echo "== test suite"
python -m pytest -ra tests "$@"
echo "== mutation check: planted Python bugs must each fail a test"
python scripts/mutation_check.py
if [ "$SSL_OPS_BUILD_EMU_ASAN" = "1" ]; then
  echo "== emulated CUDA kernel tests under AddressSanitizer"
  # One thread order (a shuffled one): ASan finds memory errors, the main pass races.
  SSL_OPS_TEST_EMU_SEEDS=1 python -m ssl_ops.emulation asan python -m pytest -ra -m emu tests "$@"
fi
