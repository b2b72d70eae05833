#!/usr/bin/env bash
# Installs everything, builds ssl_ops and runs the main job: the benchmarks
# (for now the EMA update; pass --help for options, no --quick for the full set).
set -euo pipefail
# shellcheck disable=SC1091
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$SSL_OPS_ROOT"
if [ "$#" -eq 0 ]; then set -- --quick; fi
python benchmarks/ema.py "$@"
