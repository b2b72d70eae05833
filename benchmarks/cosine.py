"""Cosine similarity: ssl_ops.cosine_similarity_matrix against F.normalize +
matmul and against F.cosine_similarity(a[:, None], b[None], dim=-1) (which
broadcasts an (M, N, D) tensor); ssl_ops.byol_loss against the eager
2 - 2 * F.cosine_similarity; both against torch.compile of the eager baseline
(dynamic shapes; the memory-measuring process runs it once before measuring). Forward and forward+backward; times are medians in
this process, peak extra memory is measured in a fresh process (CPU) or with
torch.cuda.max_memory_allocated (CUDA).

    python -m benchmarks.cosine [--device cuda] [--full] [--min-run-time S]

On CUDA the cosine matrix is also timed on each of its routes, forced one at a
time (tiles / gemm; with b = None and a dense upstream gradient also the two
forms of the backward, sum / two_gemms), and the faster of each pair is named.
"""

import argparse
import json
import os

import torch
import torch.nn.functional as F

import ssl_ops
from ssl_ops import reference

from .common import cuda_peak_extra, machine, measure_in_subprocess, median_seconds, peak_extra_bytes_here

MEMORY_LIMIT = 20 * 2**30

IMPLS = {
    "matrix": {
        "fused": lambda a, b: ssl_ops.cosine_similarity_matrix(a, b),
        "normalize+matmul": lambda a, b: reference.cosine_similarity_matrix(a, b),
        "compiled": torch.compile(lambda a, b: reference.cosine_similarity_matrix(a, b), dynamic=True),
        "broadcast": lambda a, b: F.cosine_similarity(a[:, None], b[None], dim=-1),
    },
    "matrix_self": {  # b = None: a against itself
        "fused": lambda a, b: ssl_ops.cosine_similarity_matrix(a),
        "normalize+matmul": lambda a, b: reference.cosine_similarity_matrix(a),
        "compiled": torch.compile(lambda a, b: reference.cosine_similarity_matrix(a), dynamic=True),
    },
    "byol": {
        "fused": lambda p, z: ssl_ops.byol_loss(p, z),
        "eager": lambda p, z: reference.byol_loss(p, z),
        "compiled": torch.compile(lambda p, z: reference.byol_loss(p, z), dynamic=True),
    },
}


def make_inputs(case):
    g = torch.Generator().manual_seed(0)
    dtype = getattr(torch, case["dtype"])
    a = torch.randn(case["m"], case["d"], generator=g).to(case["device"], dtype)
    b = torch.randn(case["n"], case["d"], generator=g).to(case["device"], dtype)
    grad = case["mode"] != "forward"
    return a.requires_grad_(grad), b.requires_grad_(grad and case["op"] == "matrix")


def run_once(case, impl, inputs):
    fn = IMPLS[case["op"]][impl]
    if case["mode"] == "forward":
        with torch.no_grad():
            fn(*inputs)
        return
    out = fn(*inputs)
    wanted = [t for t in inputs if t.requires_grad]
    if case["mode"] == "forward+dense backward":  # a dense dC, as a loss on the matrix gives
        torch.autograd.grad(out, wanted, grad_outputs=dense_gradient(out))
    else:  # out.sum(): a broadcast dC, which the kernels take as rank one
        torch.autograd.grad(out.sum(), wanted)


def dense_gradient(out):
    g = torch.Generator(device=out.device).manual_seed(1)
    return torch.randn(out.shape, generator=g, device=out.device, dtype=out.dtype)


# The CUDA cosine-matrix routes (csrc/cuda/cosine_matrix.cu), each forced by its
# variable and timed in the same process as the default.
ROUTES = {
    "tiles": ("SSL_OPS_CUDA_COSINE_MATRIX_ROUTE", "tiles"),
    "gemm": ("SSL_OPS_CUDA_COSINE_MATRIX_ROUTE", "gemm"),
    "sum": ("SSL_OPS_CUDA_COSINE_SELF_BACKWARD", "sum"),
    "two_gemms": ("SSL_OPS_CUDA_COSINE_SELF_BACKWARD", "two_gemms"),
}


def routes_of(case):
    if case["device"] != "cuda" or not case["op"].startswith("matrix"):
        return []
    if case["mode"] == "forward+dense backward" and case["op"] == "matrix_self":
        return ["tiles", "gemm", "sum", "two_gemms"]
    return ["tiles", "gemm"]


def time_routes(case, min_run_time):
    times = {}
    for route in routes_of(case):
        name, value = ROUTES[route]
        os.environ[name] = value
        try:
            inputs = make_inputs(case)
            times[route] = median_seconds(lambda: run_once(case, "fused", inputs), min_run_time, case["device"])
        finally:
            del os.environ[name]
    return times


def child(case):
    inputs = make_inputs(case)
    if case["impl"] == "compiled":
        run_once(case, "compiled", inputs)  # compilation is not the op's memory
    print(json.dumps({"peak_extra_bytes": peak_extra_bytes_here(lambda: run_once(case, case["impl"], inputs))}))


def peak_memory(case, impl):
    if case["device"] != "cuda":
        return measure_in_subprocess("cosine", {**case, "impl": impl}, MEMORY_LIMIT)
    return cuda_peak_extra(lambda: make_inputs(case), lambda inputs: run_once(case, impl, inputs))


def cases(device, full):
    dtypes = ["float32", "bfloat16"] if device == "cuda" else ["float32"]
    sizes = [(1024, 1024, 128), (4096, 4096, 128)] + ([(4096, 4096, 2048), (16384, 16384, 256)] if full else [])
    out = []
    for dtype in dtypes:
        for m, n, d in sizes:
            for mode in ("forward", "forward+backward"):
                out.append({"op": "matrix", "m": m, "n": n, "d": d, "mode": mode, "device": device, "dtype": dtype})
        if device == "cuda":  # b = None and a dense dC: the shapes that choose the CUDA routes
            for m, d in [(4096, 128), (4096, 512)] + ([(16384, 256)] if full else []):
                for mode in ("forward", "forward+dense backward"):
                    out.append({"op": "matrix_self", "m": m, "n": m, "d": d, "mode": mode, "device": device,
                                "dtype": dtype})
        for rows, d in ((4096, 256), (65536, 256)):
            for mode in ("forward", "forward+backward"):
                out.append({"op": "byol", "m": rows, "n": rows, "d": d, "mode": mode, "device": device, "dtype": dtype})
    return out


def measure(case, min_run_time, broadcast_limit, compile_baseline=True, compiled_memory=True):
    """compiled_memory=False: the compiled baseline is timed only (its memory
    process would compile it again for every case; the quick run skips that)."""
    row = dict(case)
    for impl in IMPLS[case["op"]]:
        if impl == "compiled" and not compile_baseline:
            continue
        if impl == "broadcast" and case["m"] * case["n"] * case["d"] > broadcast_limit:
            row[impl] = {"skipped": "M*N*D too large"}
            continue
        skip_memory = impl == "compiled" and not compiled_memory and case["device"] != "cuda"
        memory = {"peak_extra_bytes": None} if skip_memory else peak_memory(case, impl)
        if memory.get("oom"):
            row[impl] = {"oom": True}
            continue
        inputs = make_inputs(case)
        seconds = median_seconds(lambda: run_once(case, impl, inputs), min_run_time, case["device"])
        row[impl] = {"median_s": seconds, "peak_extra_bytes": memory["peak_extra_bytes"]}
    row["routes"] = time_routes(case, min_run_time)
    return row


def routes_cell(times):
    """Each forced route's time, then the faster of each pair."""
    if not times:
        return "-"
    parts = [f"{route} {seconds * 1e3:.2f}" for route, seconds in times.items()]
    winners = [min(pair, key=times.get) for pair in (("tiles", "gemm"), ("sum", "two_gemms")) if pair[0] in times]
    return " / ".join(parts) + " ms -> " + ", ".join(winners)


def cell(entry):
    if "median_s" in entry:
        memory = entry["peak_extra_bytes"]
        return f"{entry['median_s'] * 1e3:.2f} ms / " + ("-" if memory is None else f"{memory / 2**20:.1f} MiB")
    return "OOM" if entry.get("oom") else "-"


def markdown(rows):
    lines = [
        "| op | device | dtype | M x N x D | pass | fused | baseline | compiled | broadcast | CUDA routes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        baseline = r.get("normalize+matmul", r.get("eager", {}))
        lines.append(
            f"| {r['op']} | {r['device']} | {r['dtype']} | {r['m']} x {r['n']} x {r['d']} | {r['mode']} "
            f"| {cell(r['fused'])} | {cell(baseline)} | {cell(r.get('compiled', {}))} "
            f"| {cell(r.get('broadcast', {}))} | {routes_cell(r.get('routes', {}))} |"
        )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--out", default="results")
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile baseline")
    parser.add_argument("--min-run-time", type=float, default=0.3, help="seconds of timed calls per measurement")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    from tqdm import tqdm

    # The broadcast baseline materialises M x N x D: the quick run keeps it to
    # the smallest shape (at 4096 x 4096 x 128 it takes 8 GiB, more with grads).
    limit = 2**31 if args.full else 2**27
    rows = [measure(case, args.min_run_time, limit, not args.no_compile, compiled_memory=args.full)
            for case in tqdm(cases(args.device, args.full), desc="cosine benchmark")]
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"cosine_{args.device}.json")
    with open(path, "w") as f:
        json.dump({"machine": machine(), "rows": rows}, f, indent=2)
    print(markdown(rows))
    print(f"\ncells: median time / peak extra memory; baseline = F.normalize + matmul (matrix) or eager "
          f"2 - 2 cos (byol); compiled = torch.compile of the baseline; JSON: {path}")


if __name__ == "__main__":
    main()
