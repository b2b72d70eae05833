#!/usr/bin/env bash
# Installs everything, builds ssl_ops and runs the main job: the benchmarks
# of the contrastive losses, the cosine ops and the EMA update (python -m
# benchmarks; `--full` runs the whole sweep). Tables on stdout, JSON and plots
# in results/.
set -euo pipefail
# shellcheck disable=SC1091
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$SSL_OPS_ROOT"
python -m benchmarks "$@"
