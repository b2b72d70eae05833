#!/usr/bin/env bash
# The tests, in two tiers (README, "Tests"):
#   bash scripts/test.sh          every CPU test and every emulated CUDA kernel
#                                 test once, under one shuffled schedule seed
#   bash scripts/test.sh --full   every seed (index order and two shuffles), the
#                                 mutation check of the Python layer, then the
#                                 emulated kernel tests again under AddressSanitizer
# Both build ssl_ops first (scripts/env.sh; --full adds the ASan emulation
# module) and run pytest on both cores (pytest-xdist). Other arguments go to pytest.
set -euo pipefail
full=0
if [ "${1:-}" = "--full" ]; then
  full=1
  shift
fi
if [ "$full" = "1" ]; then export SSL_OPS_BUILD_EMU_ASAN=1; fi
# shellcheck disable=SC1091
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$SSL_OPS_ROOT"
workers=${SSL_OPS_TEST_WORKERS:-$(nproc)}
xdist=()
if [ "$workers" -gt 1 ]; then xdist=(-n "$workers"); fi
if [ "$full" = "1" ]; then
  seeds=${SSL_OPS_TEST_EMU_SEEDS:-0,1,2}
else
  seeds=${SSL_OPS_TEST_EMU_SEEDS:-1}  # a shuffled order: index order hides more races
fi
echo "== test suite (emulator schedule seeds: $seeds; $workers workers)"
SSL_OPS_TEST_EMU_SEEDS=$seeds python -m pytest -ra "${xdist[@]}" tests "$@"
if [ "$full" = "1" ]; then
  echo "== mutation check: planted Python bugs must each fail a test"
  python scripts/mutation_check.py
  echo "== emulated CUDA kernel tests under AddressSanitizer"
  # One thread order (a shuffled one): ASan finds memory errors, the main pass races.
  SSL_OPS_TEST_EMU_SEEDS=1 python -m ssl_ops.emulation asan python -m pytest -ra "${xdist[@]}" -m emu tests "$@"
fi
