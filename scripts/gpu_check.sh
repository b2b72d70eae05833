#!/usr/bin/env bash
# GPU verification in one call, for a machine with an NVIDIA GPU, torch, nvcc
# and no internet (the lent GPU machine):
#   bash scripts/gpu_check.sh OUT_DIR
# builds ssl_ops for the local GPU arch (without the emulation modules: CI runs
# the emulated and the CPU cases), runs python -m ssl_ops.selftest, the error
# probe and the CUDA-parametrised tests, runs the CUDA benchmarks (every contrastive route,
# the fastest named per shape), and writes logs and JSON to OUT_DIR. A summary
# is printed last. Uses the python3 on PATH as it is; installs nothing but the
# wheels in .whl/, if any, under /tmp/site.
set -uo pipefail
out=${1:?usage: bash scripts/gpu_check.sh OUT_DIR}
mkdir -p "$out"
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONUNBUFFERED=1 SSL_OPS_FORCE_CUDA=1 SSL_OPS_BUILD_EMU=0 MAX_JOBS=${MAX_JOBS:-16}
start=$(date +%s)
summary() { printf '%-12s %s\n' "$1" "$2" | tee -a "$out/summary.txt"; }
: > "$out/summary.txt"

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
  nvcc --version | tail -n 1
  "$(python3 -c 'import sysconfig; print(sysconfig.get_config_var("CC").split()[0])' 2>/dev/null || echo gcc)" --version | head -n 1
  which gcc g++; gcc --version | head -n 1; ls /opt/gcc/bin 2> /dev/null | head -n 5
} > "$out/env.txt" 2>&1
summary env "$(head -n 3 "$out/env.txt" | tail -n 2 | tr '\n' ' ')"

# Test-only packages missing from the GPU image (expecttest, for opcheck) may be
# carried as wheels in .whl/ (see benchmarks/RESULTS.md, "GPU runs").
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

# Stage limits add up to under 8 minutes, so one call fits the device lease with
# time left for a rerun.
# Build in place for the visible GPU (TORCH_CUDA_ARCH_LIST unset: torch picks it).
if timeout 140 python3 setup.py build_ext --inplace > "$out/build.log" 2>&1; then
  # What the extension was linked with (Note [Messages without iostreams]).
  { "${CXX:-g++}" -v 2>&1 | tail -n 2; so=$(ls ssl_ops/_C*.so); readelf -d "$so" | grep NEEDED
    echo "libstdc++ locale symbols defined in _C: $(nm -D --defined-only "$so" | grep -c _ZNSt6locale)"
  } > "$out/toolchain.txt" 2>&1
  summary build "ok ($(python3 -c 'import ssl_ops; i = ssl_ops.build_info(); print(i["cuda_arch_list"], "cuda", i["cuda"], "gpu", ssl_ops.cuda_kernels_available())'))"
else
  summary build "FAILED (see build.log)"
  tail -n 40 "$out/build.log"
  exit 1
fi

# The user's self-check first (every op and route against float64), then
# whether errors raised in each op's kernel entry reach Python (a crash was
# seen there on the first H200 run).
timeout 45 python3 -m ssl_ops.selftest --device cuda > "$out/selftest.log" 2>&1
summary selftest "exit $? ($(grep -c '^PASS' "$out/selftest.log") PASS, $(grep -c '^FAIL' "$out/selftest.log") FAIL)"
timeout 50 python3 scripts/gpu_error_probe.py --gdb > "$out/error_probe.log" 2>&1
summary errors "exit $? ($(grep -c 'exit    0' "$out/error_probe.log") cases raised cleanly, see error_probe.log)"

# The CUDA-parametrised tests (the real kernels against float64 references),
# spread over processes when pytest-xdist is there: the torch.compile cases
# spend most of their time compiling on the CPU. -v names every result in the
# log as it comes, so a run cut short by the limit still says what passed.
parallel=()
python3 -c "import xdist" 2> /dev/null && parallel=(-n 8)
python3 -c "import pytest_timeout" 2> /dev/null && parallel+=(--timeout 60)
timeout 70 python3 -m pytest -v -rfE -m cuda tests -p no:cacheprovider -p no:benchmark "${parallel[@]}" \
  --junitxml="$out/tests_cuda.xml" > "$out/tests_cuda.log" 2>&1
summary cuda-tests "$(tail -n 1 "$out/tests_cuda.log" | cut -c1-150); $(grep -c ' PASSED' "$out/tests_cuda.log") PASSED, $(grep -c ' FAILED' "$out/tests_cuda.log") FAILED lines"

# torch.compile baselines are left out here: their compile time would not fit.
timeout 80 python3 -m benchmarks.contrastive --device cuda --no-compile --out "$out" > "$out/bench_contrastive.log" 2>&1
summary contrastive "exit $? (bench_contrastive.log, contrastive_cuda.json)"
summary routes "$(python3 -c '
import collections, json, sys
rows = json.load(open(sys.argv[1]))["rows"]
wins = collections.Counter(r.get("fastest_route", "-") for r in rows)
print(len(rows), "shapes; fastest per shape:", dict(wins))' "$out/contrastive_cuda.json" 2>&1)"
timeout 40 python3 -m benchmarks.cosine --device cuda --no-compile --min-run-time 0.1 --out "$out" > "$out/bench_cosine.log" 2>&1
summary cosine "exit $? (bench_cosine.log, cosine_cuda.json)"
timeout 45 python3 -m benchmarks.ema --quick --models resnet50 llm_1b --devices cuda --no-compile --out "$out" > "$out/bench_ema.log" 2>&1
summary ema "exit $? (bench_ema.log, ema.json)"

summary seconds "$(( $(date +%s) - start ))"
echo
grep -E "^\| (nt_xent|moco) .*(8192|65536) " "$out/bench_contrastive.log" | head -n 12
grep -E "^\| (matrix|byol) " "$out/bench_cosine.log" | head -n 8
grep -E "^\| (resnet50|vit|llm)" "$out/bench_ema.log"
echo
cat "$out/summary.txt"
