"""Contrastive losses: the fused ssl_ops kernels against the eager pure-PyTorch
reference (lightly-style: the full logits matrix, then cross-entropy) and
against torch.compile of that reference (dynamic shapes, compiled once per
loss and pass in the timing process; the memory-measuring process compiles
and runs it once before it measures).

* nt_xent: SimCLR over 2N rows of D features (ssl_ops.nt_xent_loss vs
  ssl_ops.reference.nt_xent_loss)
* moco: InfoNCE of B queries against a queue (ssl_ops.info_nce_loss vs
  ssl_ops.reference.info_nce_loss)
* mocov3: in-batch InfoNCE of B queries against B keys, as MoCo v3 (keys
  detached: the momentum encoder's) and CLIP (keys with gradients) use it,
  temperature 0.2 (ssl_ops.info_nce_loss vs ssl_ops.reference.info_nce_loss)
* dcl: decoupled contrastive loss over 2N rows (ssl_ops.dcl_loss vs
  ssl_ops.reference.dcl_loss, lightly's DCLLoss computation)
* siglip: SigLIP's sigmoid loss of N images against N texts, scale 10 and
  bias -10 learnable (ssl_ops.siglip_loss vs ssl_ops.reference.siglip_loss,
  open_clip's SigLipLoss computation; "rows" is N)

Each case is timed forward only and forward+backward (median of
timed blocks of calls, benchmarks/common.py; both implementations in this
process), and its peak extra memory is measured in a fresh process (the peak
resident memory the loss adds on top of its inputs; that process's address
space is capped, so an implementation that would not fit reports OOM).

    python -m benchmarks.contrastive           # quick: 2N up to 8192, about a minute
    python -m benchmarks.contrastive --full    # 2N from 512 to 65536, D 128 and 256
    python -m benchmarks.contrastive --device cuda   # issue 22's GPU shapes, bf16 and TF32
    python -m benchmarks.contrastive --device cuda --time-budget 150   # as many as fit, first first

On CUDA, memory is torch.cuda.max_memory_allocated over the inputs, measured
in this process, and both routes of the fused losses are timed (the default,
fused where it applies, and the GEMM route forced), with the fastest one
named per shape (Note [Contrastive routes] in csrc/cuda/contrastive_passes.cu),
next to Inf-CL's cal_inf_loss where it applies (in-batch InfoNCE, MoCo v3) and
is installed. The GPU cases come most important first: NT-Xent and MoCo in
bf16 at D = 128, MoCo v3 at D = 256, NT-Xent at D = 256, then TF32 (dtype
"tf32": fp32 inputs with torch's TF32 allowed for every implementation, as a
training script sets it). --time-budget stops starting new cases after that
many seconds (the JSON keeps what was measured).
"""

import argparse
import contextlib
import importlib.util
import json
import os
import time

import torch

import ssl_ops
from ssl_ops import reference

from .common import (cuda_peak_extra, machine, measure_in_subprocess, median_seconds, peak_extra_bytes_here,
                     timed_in_turns)

TWO_VIEW_LOSSES = ("nt_xent", "dcl")  # 2N rows from two views; the rest: B queries against a queue
MEMORY_LIMIT = 20 * 2**30  # address-space cap of the memory-measuring process
TEMPERATURE = 0.5
DCL_TEMPERATURE = 0.1  # lightly's DCLLoss default
MOCOV3_TEMPERATURE = 0.2  # MoCo v3's ViT setting
IN_BATCH_LOSSES = TWO_VIEW_LOSSES + ("siglip", "mocov3")  # S is (rows x rows)


def torch_dtype(case):
    """The inputs' dtype ("tf32": fp32 with TF32 allowed, tf32_setting)."""
    name = case.get("dtype", "float32")
    return torch.float32 if name == "tf32" else getattr(torch, name)


@contextlib.contextmanager
def tf32_setting(case):
    """TF32 for fp32 matmuls while a "tf32" case runs (every implementation)."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = case.get("dtype") == "tf32"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def make_inputs(case, requires_grad):
    g = torch.Generator().manual_seed(0)
    device, dtype = case.get("device", "cpu"), torch_dtype(case)

    def rand(rows, grad):
        t = torch.randn(rows, case["d"], generator=g).to(device=device, dtype=dtype)
        return t.requires_grad_(grad)

    if case["loss"] in TWO_VIEW_LOSSES:
        half = case["rows"] // 2
        return rand(half, requires_grad), rand(half, requires_grad)
    if case["loss"] == "siglip":  # unit rows, as SigLIP's towers give them; fp32 scale and bias
        x, y = (torch.nn.functional.normalize(rand(case["rows"], False), dim=1).requires_grad_(requires_grad)
                for _ in range(2))
        scale = torch.tensor(10.0, device=device, requires_grad=requires_grad)
        bias = torch.tensor(-10.0, device=device, requires_grad=requires_grad)
        return x, y, scale, bias
    if case["loss"] == "mocov3":
        return rand(case["rows"], requires_grad), rand(case["rows"], requires_grad and case["keys"] == "grad")
    return rand(case["rows"], requires_grad), rand(case["rows"], False), rand(case["queue"], False)


_COMPILED = {}


def loss_fn(case, impl):
    if impl == "compiled":  # one compilation per loss and dtype (a new dtype would recompile anyway)
        key = (case["loss"], case.get("dtype", "float32"))
        if key not in _COMPILED:
            _COMPILED[key] = torch.compile(loss_fn(case, "eager"), dynamic=True)
        return _COMPILED[key]
    if impl == "inf_cl":  # Inf-CL (pip inf-cl): one-directional InfoNCE, Triton, inputs cast to fp32
        from inf_cl import cal_inf_loss

        def inf_cl_loss(q, k):
            d = q.shape[1]
            return cal_inf_loss(torch.nn.functional.normalize(q, dim=1), torch.nn.functional.normalize(k, dim=1),
                                scale=1 / MOCOV3_TEMPERATURE, head_dim=min(256, d))
        return inf_cl_loss
    module = ssl_ops if impl == "fused" else reference
    if case["loss"] == "nt_xent":
        return lambda z0, z1: module.nt_xent_loss(z0, z1, TEMPERATURE)
    if case["loss"] == "dcl":
        return lambda z0, z1: module.dcl_loss(z0, z1, DCL_TEMPERATURE)
    if case["loss"] == "siglip":
        return lambda x, y, scale, bias: module.siglip_loss(x, y, scale, bias)
    if case["loss"] == "mocov3":
        return lambda q, k: module.info_nce_loss(q, k, temperature=MOCOV3_TEMPERATURE)
    return lambda q, k, queue: module.info_nce_loss(q, k, queue, temperature=0.07)


# The CUDA routes of the fused losses (Note [Contrastive routes] in
# csrc/cuda/contrastive_passes.cu), timed side by side so the first GPU run settles the
# routing rule: "fused" is the default (the fused kernels where they apply,
# else the GEMM route with the default chunk budget).
CUDA_ROUTES = {
    "gemm": {"SSL_OPS_CUDA_CONTRASTIVE_ROUTE": "gemm"},
    "gemm_big_chunks": {"SSL_OPS_CONTRASTIVE_CHUNK_ELEMENTS": str(2**27)},  # 512 MB fp32 chunks (default 2^25)
}


def run_once(case, impl, inputs):
    if impl in CUDA_ROUTES:
        saved = {key: os.environ.get(key) for key in CUDA_ROUTES[impl]}
        os.environ.update(CUDA_ROUTES[impl])
        try:
            return run_route(case, impl, inputs)
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
    return run_route(case, impl, inputs)


def run_route(case, impl, inputs):
    fn = loss_fn(case, "fused" if impl in CUDA_ROUTES else impl)
    if case["mode"] == "forward":
        with torch.no_grad():
            fn(*inputs)
    else:
        loss = fn(*inputs)
        differentiable = [t for t in inputs if t.requires_grad]
        torch.autograd.grad(loss, differentiable)


def child(case):
    inputs = make_inputs(case, requires_grad=case["mode"] != "forward")
    if case["impl"] == "compiled":
        run_once(case, "compiled", inputs)  # compilation is not the loss's memory
    extra = peak_extra_bytes_here(lambda: run_once(case, case["impl"], inputs))
    print(json.dumps({"peak_extra_bytes": extra}))


def model_flops(case):
    """Matrix-multiply FLOPs of the eager computation: S = Q K^T forward; with
    the backward also dQ = G K and (NT-Xent) dK = G^T Q. The fused NT-Xent does
    fewer (each symmetric tile once), so its figure is an effective rate."""
    if case["loss"] == "mocov3":
        one = 2 * case["rows"] ** 2 * case["d"]
        return one * (1 if case["mode"] == "forward" else 3 if case["keys"] == "grad" else 2)
    if case["loss"] in IN_BATCH_LOSSES:
        one = 2 * case["rows"] ** 2 * case["d"]
        return one * (1 if case["mode"] == "forward" else 3)
    one = 2 * case["rows"] * case["queue"] * case["d"]
    return one * (1 if case["mode"] == "forward" else 2)


def matmul_tflops(case, min_run_time):
    """The rate of one plain matmul of the loss's shape, in the same run: what
    the hardware gives at that size."""
    g = torch.Generator().manual_seed(1)
    device, dtype = case.get("device", "cpu"), torch_dtype(case)
    cols = case["rows"] if case["loss"] in IN_BATCH_LOSSES else case["queue"]
    a = torch.randn(case["rows"], case["d"], generator=g).to(device, dtype)
    b = torch.randn(cols, case["d"], generator=g).to(device, dtype)
    seconds = median_seconds(lambda: a @ b.t(), min_run_time, device)
    return 2 * case["rows"] * cols * case["d"] / seconds / 1e12


def measure(case, min_run_time, impls, compiled_memory=True):
    """compiled_memory=False: the compiled baseline is timed only (its memory
    process would compile it again for every case; the quick run skips that)."""
    with tf32_setting(case):
        return measure_case(case, min_run_time, impls, compiled_memory)


def measure_case(case, min_run_time, impls, compiled_memory):
    row = dict(case)
    row["model_flops"] = model_flops(case)
    row["matmul_tflops"] = matmul_tflops(case, min_run_time)
    memories = {}
    for impl in impls:
        if case.get("device", "cpu") == "cuda":
            memory = cuda_peak_extra(
                lambda: make_inputs(case, requires_grad=case["mode"] != "forward"),
                lambda inputs: run_once(case, impl, inputs),
            )
        elif impl == "compiled" and not compiled_memory:
            memory = {"peak_extra_bytes": None}
        else:
            memory = measure_in_subprocess("contrastive", {**case, "impl": impl}, MEMORY_LIMIT)
        if memory.get("oom"):
            row[impl] = {"oom": True}
        else:
            memories[impl] = memory
    times = timed_in_turns(memories, lambda: make_inputs(case, requires_grad=case["mode"] != "forward"),
                           lambda impl, inputs: run_once(case, impl, inputs), min_run_time, case.get("device", "cpu"))
    for impl, seconds in times.items():
        row[impl] = {"median_s": seconds, "peak_extra_bytes": memories[impl]["peak_extra_bytes"],
                     "tflops": row["model_flops"] / seconds / 1e12}
    if "median_s" in row["fused"] and "median_s" in row["eager"]:
        row["speedup"] = row["eager"]["median_s"] / row["fused"]["median_s"]
        row["memory_ratio"] = row["eager"]["peak_extra_bytes"] / max(1, row["fused"]["peak_extra_bytes"])
    if "median_s" in row["fused"] and "median_s" in row.get("compiled", {}):
        row["speedup_vs_compiled"] = row["compiled"]["median_s"] / row["fused"]["median_s"]
    routes = {name: row[name]["median_s"] for name in ("fused", *CUDA_ROUTES) if "median_s" in row.get(name, {})}
    if len(routes) > 1:
        row["fastest_route"] = min(routes, key=routes.get)
    return row


def cases(full, device):
    if device == "cuda" and not full:
        return gpu_cases()
    on_gpu = device == "cuda"
    rows = [512, 1024, 2048, 4096, 8192, 16384, 32768, 65536] if full else [512, 2048, 8192]
    dims = [128, 256] if full else [128]
    dtypes = ["float32", "bfloat16", "tf32"] if on_gpu else ["float32"]
    out = []
    for dtype in dtypes:
        for d in dims:
            for n in rows:
                for mode in ("forward", "forward+backward"):
                    out.append({"loss": "nt_xent", "rows": n, "d": d, "mode": mode, "device": device, "dtype": dtype})
            for n in rows[-2:]:
                for mode in ("forward", "forward+backward"):
                    out.append({"loss": "dcl", "rows": n, "d": d, "mode": mode, "device": device, "dtype": dtype})
            for n in ([4096, 16384, 32768] if on_gpu or full else [2048, 8192]):
                for mode in ("forward", "forward+backward"):
                    out.append({"loss": "siglip", "rows": n, "d": d, "mode": mode, "device": device, "dtype": dtype})
        for keys in ("detached", "grad"):
            for n in [512, 1024, 4096] + ([16384] if on_gpu or full else []):
                out.append({"loss": "mocov3", "keys": keys, "rows": n, "d": 256, "mode": "forward+backward",
                            "device": device, "dtype": dtype})
        for mode in ("forward", "forward+backward"):
            queue = 65536 if full or on_gpu else 16384
            out.append({"loss": "moco", "rows": 256, "queue": queue, "d": 128, "mode": mode, "device": device,
                        "dtype": dtype})
    return out


def gpu_cases():
    """Issue 22's GPU shapes, forward+backward, most important first (a time
    budget keeps the head of the list): NT-Xent 2N in {2048, 8192, 16384,
    65536} and MoCo 256 x 65536 at D = 128 in bf16; MoCo v3 at D = 256 (Inf-CL
    beside it); NT-Xent at D = 256; then TF32."""
    def case(loss, rows, d, dtype, compile=False, **extra):
        return {"loss": loss, "rows": rows, "d": d, "mode": "forward+backward", "device": "cuda", "dtype": dtype,
                "compile": compile, **extra}

    # torch.compile for NT-Xent in bf16 at D = 128 only: its compilation (tens
    # of seconds) is paid once per loss and dtype, and the GPU check has minutes.
    out = [case("nt_xent", n, 128, "bfloat16", compile=True) for n in (8192, 2048, 16384, 65536)]
    out.append(case("moco", 256, 128, "bfloat16", queue=65536))
    out += [case("mocov3", n, 256, "bfloat16", keys="detached") for n in (4096, 16384)]
    out += [case("nt_xent", n, 256, "bfloat16") for n in (8192, 65536, 2048, 16384)]
    out += [case("nt_xent", n, 128, "tf32") for n in (8192, 65536, 2048, 16384)]
    out.append(case("moco", 256, 128, "tf32", queue=65536))
    out += [case("nt_xent", n, 256, "tf32") for n in (8192, 65536)]
    return out


def fmt_time(entry):
    if entry is None:
        return "-"
    return "OOM" if entry.get("oom") else f"{entry['median_s'] * 1e3:.1f}"


def fmt_mem(entry):
    return "OOM" if entry.get("oom") else f"{entry['peak_extra_bytes'] / 2**20:.1f}"


def markdown(rows):
    lines = [
        "| loss | device | dtype | rows (2N or B) | queue | D | pass | fused ms | eager ms | compiled ms "
        "| vs eager | vs compiled | fused MiB | eager MiB | memory ratio | fused TFLOP/s | matmul TFLOP/s "
        "| gemm ms | big chunks ms | fastest route | Inf-CL ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        speed = f"{r['speedup']:.2f}x" if "speedup" in r else "-"
        ratio = f"{r['memory_ratio']:.0f}x" if "memory_ratio" in r else "-"
        vs_compiled = f"{r['speedup_vs_compiled']:.2f}x" if "speedup_vs_compiled" in r else "-"
        tflops = f"{r['fused']['tflops']:.3f}" if "tflops" in r["fused"] else "-"
        lines.append(
            f"| {r['loss']}{' (keys ' + r['keys'] + ')' if 'keys' in r else ''} | {r.get('device', 'cpu')} | {r.get('dtype', 'float32')} | {r['rows']} "
            f"| {r.get('queue', '-')} | {r['d']} | {r['mode']} "
            f"| {fmt_time(r['fused'])} | {fmt_time(r['eager'])} | {fmt_time(r.get('compiled'))} | {speed} "
            f"| {vs_compiled} "
            f"| {fmt_mem(r['fused'])} | {fmt_mem(r['eager'])} | {ratio} "
            f"| {tflops} | {r['matmul_tflops']:.3f} | {fmt_time(r.get('gemm'))} | {fmt_time(r.get('gemm_big_chunks'))} "
            f"| {r.get('fastest_route', '-')} "
            f"| {fmt_time(r.get('inf_cl'))} |"
        )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="the whole sweep (slow on a CPU)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", default="results", help="folder for contrastive_<device>.json")
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile baseline")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="start no new case after this many seconds (CUDA: the GPU check's limit)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    todo = cases(args.full, args.device)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"contrastive_{args.device}.json")
    rows = []
    start = time.perf_counter()
    for case in tqdm(todo, desc="contrastive benchmark", unit="case") if tqdm else todo:
        if args.time_budget is not None and time.perf_counter() - start > args.time_budget:
            print(f"time budget of {args.time_budget:.0f} s spent: {len(todo) - len(rows)} cases left out")
            break
        impls = ("fused", "eager") if args.no_compile or not case.get("compile", True) else ("fused", "eager", "compiled")
        if case["device"] == "cuda":
            if case["loss"] != "siglip":  # SigLIP has one CUDA route
                impls += ("gemm",) + (("gemm_big_chunks",) if args.full else ())
            # Inf-CL where it applies: in-batch InfoNCE, positives on the diagonal (MoCo v3, CLIP's one direction).
            if case["loss"] == "mocov3" and importlib.util.find_spec("inf_cl") is not None:
                impls += ("inf_cl",)
        rows.append(measure(case, min_run_time=1.0 if args.full else 0.3, impls=impls, compiled_memory=args.full))
        # Written after every case, so a run cut short by a time limit keeps what it measured.
        with open(path, "w") as f:
            json.dump({"machine": machine(), "temperature": TEMPERATURE, "rows": rows}, f, indent=2)
    print(markdown(rows))
    print(f"\nvs eager / vs compiled = that implementation's time / fused time; memory = peak extra resident "
          f"memory of a fresh process (CUDA: max_memory_allocated); TFLOP/s = the eager computation's "
          f"matrix-multiply FLOPs / time, next to one plain matmul of the same shape; CUDA routes: fused = "
          f"the default (the fused kernels for bf16/fp16 rows of D <= 256 and TF32 rows of D <= 128, else "
          f"the GEMM route), gemm = the GEMM route everywhere, big chunks (--full) = the GEMM route with "
          f"2^27-element chunks (default 2^25); dtype tf32 = fp32 inputs with TF32 allowed for every "
          f"implementation; "
          f"fastest route = the quickest of those; Inf-CL = "
          f"inf_cl.cal_inf_loss on normalised rows (MoCo v3 rows only; where the package is installed); "
          f"JSON: {path}")
    try:
        from .plots import plot_file

        for png in plot_file(path):
            print(f"plot: {png}")
    except ImportError as e:  # matplotlib is optional for users; the dev environment has it
        print(f"no plots ({e})")


if __name__ == "__main__":
    main()
