#!/usr/bin/env bash
# Installs everything, builds ssl_ops and runs the main job: the benchmarks
# of the contrastive losses, the cosine ops and the EMA update. `--full` runs the
# whole sweep.
set -euo pipefail
# shellcheck disable=SC1091
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$SSL_OPS_ROOT"
if [ "${1:-}" = "--full" ]; then
  python -m benchmarks.contrastive --full
  python -m benchmarks.cosine --full
  python -m benchmarks.ema
else
  python -m benchmarks.contrastive
  python -m benchmarks.cosine
  python -m benchmarks.ema --quick
fi
