#!/usr/bin/env bash
# GPU verification in one call, for a machine with an NVIDIA GPU, torch, nvcc
# and no internet (the lent GPU machine):
#   bash scripts/gpu_check.sh OUT_DIR          # 6.5 minutes at most
#   GPU_CHECK_ALL=1 bash scripts/gpu_check.sh OUT_DIR   # + cosine and EMA benchmarks
# builds ssl_ops for the local GPU arch (without the emulation modules: CI runs
# the emulated and the CPU cases), runs python -m ssl_ops.selftest, the error
# probe, the fused route's GPU tests and the other CUDA-parametrised tests,
# then the contrastive benchmark (fused, GEMM route, eager, torch.compile,
# Inf-CL), and writes logs and JSON to OUT_DIR. A summary is printed last.
# Uses the python3 on PATH as it is; installs nothing but the wheels in .whl/
# (expecttest for opcheck, inf-cl for its column), if any, under /tmp/site.
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

# Stage limits add up to 390 s (6.5 min), so that one call with the machine's
# start and a second one after a fix fit the 15 minutes of device time. The cosine
# and EMA benchmarks run only with GPU_CHECK_ALL=1 (80 s more).
# Build in place for the visible GPU (TORCH_CUDA_ARCH_LIST unset: torch picks it).
if timeout 140 python3 setup.py build_ext --inplace > "$out/build.log" 2>&1; then
  # What the extension was linked with (Note [Messages without iostreams]).
  { "${CXX:-g++}" -v 2>&1 | tail -n 2; so=$(ls ssl_ops/_C*.so); readelf -d "$so" | grep NEEDED
    echo "libstdc++ locale symbols defined in _C: $(nm -D --defined-only "$so" | grep -c _ZNSt6locale)"
  } > "$out/toolchain.txt" 2>&1
  summary build "ok in $(( $(date +%s) - start )) s ($(python3 -c 'import ssl_ops; i = ssl_ops.build_info(); print(i["cuda_arch_list"], "cuda", i["cuda"], "gpu", ssl_ops.cuda_kernels_available())'))"
else
  summary build "FAILED (see build.log)"
  tail -n 40 "$out/build.log"
  exit 1
fi

# The user's self-check first (every op and route against float64), then
# whether errors raised in each op's kernel entry reach Python (a crash was
# seen there on the first H200 run).
timeout 35 python3 -m ssl_ops.selftest --device cuda > "$out/selftest.log" 2>&1
summary selftest "exit $? ($(grep -c '^PASS' "$out/selftest.log") PASS, $(grep -c '^FAIL' "$out/selftest.log") FAIL)"
timeout 20 python3 scripts/gpu_error_probe.py > "$out/error_probe.log" 2>&1
summary errors "exit $? ($(grep -c 'exit    0' "$out/error_probe.log") cases raised cleanly, see error_probe.log)"

# The CUDA-parametrised tests (the real kernels against float64 references),
# spread over processes when pytest-xdist is there: the fused route's own GPU
# tests first, then the rest (the torch.compile cases spend most of their time
# compiling on the CPU). -v names every result in the log as it comes, so a
# run cut short by the limit still says what passed.
parallel=()
python3 -c "import xdist" 2> /dev/null && parallel=(-n 8)
python3 -c "import pytest_timeout" 2> /dev/null && parallel+=(--timeout 60)
run_tests() {  # NAME LIMIT PYTEST-ARGS...
  local name=$1 limit=$2
  shift 2
  timeout "$limit" python3 -m pytest -v -rfE -p no:cacheprovider -p no:benchmark "${parallel[@]}" \
    --junitxml="$out/$name.xml" "$@" > "$out/$name.log" 2>&1
  summary "$name" "$(tail -n 1 "$out/$name.log" | cut -c1-150); $(grep -c ' PASSED' "$out/$name.log") PASSED, $(grep -c ' FAILED' "$out/$name.log") FAILED lines"
}
run_tests fused-tests 35 tests/test_fused_route_gpu.py
run_tests cuda-tests 40 -m cuda tests --ignore tests/test_fused_route_gpu.py

# Issue 22's shapes, forward+backward: fused, the GEMM route, eager,
# torch.compile (NT-Xent bf16 D = 128: one compilation) and Inf-CL (where its
# wheel is in .whl/), most important first, as many as 60 s allow
# (benchmarks/contrastive.py, gpu_cases).
timeout 90 python3 -m benchmarks.contrastive --device cuda --time-budget 60 --out "$out" \
  > "$out/bench_contrastive.log" 2>&1
summary contrastive "exit $? ($(python3 -c 'import json, sys; print(len(json.load(open(sys.argv[1]))["rows"]))' \
  "$out/contrastive_cuda.json" 2> /dev/null || echo 0) cases; bench_contrastive.log, contrastive_cuda.json)"
summary routes "$(python3 -c '
import collections, json, sys
rows = json.load(open(sys.argv[1]))["rows"]
wins = collections.Counter(r.get("fastest_route", "-") for r in rows)
print(len(rows), "shapes; fastest per shape:", dict(wins))' "$out/contrastive_cuda.json" 2>&1)"
# Issue 23's CLIP and SigLIP shapes (bf16): ours, the two-call form, eager,
# torch.compile (one case: its compilation takes tens of seconds), open_clip,
# Inf-CL and siglip-kernel (wheels in .whl/), most important first, as many as
# 30 s allow.
timeout 50 python3 -m benchmarks.clip --device cuda --time-budget 30 --min-run-time 0.2 --out "$out" \
  > "$out/bench_clip.log" 2>&1
summary clip "exit $? ($(python3 -c 'import json, sys; print(len(json.load(open(sys.argv[1]))["rows"]))' \
  "$out/clip_cuda.json" 2> /dev/null || echo 0) cases; bench_clip.log, clip_cuda.json)"
if [ "${GPU_CHECK_ALL:-0}" = "1" ]; then
  timeout 40 python3 -m benchmarks.cosine --device cuda --no-compile --min-run-time 0.1 --out "$out" > "$out/bench_cosine.log" 2>&1
  summary cosine "exit $? (bench_cosine.log, cosine_cuda.json)"
  timeout 40 python3 -m benchmarks.ema --quick --models resnet50 llm_1b --devices cuda --no-compile --out "$out" > "$out/bench_ema.log" 2>&1
  summary ema "exit $? (bench_ema.log, ema.json)"
fi

summary seconds "$(( $(date +%s) - start ))"
echo
grep -E "^\| (nt_xent|moco|mocov3)" "$out/bench_contrastive.log" | head -n 20
grep -E "^\| (clip|siglip) " "$out/bench_clip.log" | sort -u
if [ "${GPU_CHECK_ALL:-0}" = "1" ]; then
  grep -E "^\| (matrix|byol) " "$out/bench_cosine.log" | head -n 8
  grep -E "^\| (resnet50|vit|llm)" "$out/bench_ema.log"
fi
echo
cat "$out/summary.txt"
