"""Cosine similarity: ssl_ops.cosine_similarity_matrix against F.normalize +
matmul and against F.cosine_similarity(a[:, None], b[None], dim=-1) (which
broadcasts an (M, N, D) tensor); ssl_ops.byol_loss against the eager
2 - 2 * F.cosine_similarity; both against torch.compile of the eager baseline
(dynamic shapes; the memory-measuring process runs it once before measuring). Forward and forward+backward; times are medians in
this process, peak extra memory is measured in a fresh process (CPU) or with
torch.cuda.max_memory_allocated (CUDA).

    python -m benchmarks.cosine [--device cuda] [--full]
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
    torch.autograd.grad(out.sum(), [t for t in inputs if t.requires_grad])


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
    return row


def cell(entry):
    if "median_s" in entry:
        memory = entry["peak_extra_bytes"]
        return f"{entry['median_s'] * 1e3:.2f} ms / " + ("-" if memory is None else f"{memory / 2**20:.1f} MiB")
    return "OOM" if entry.get("oom") else "-"


def markdown(rows):
    lines = [
        "| op | device | dtype | M x N x D | pass | fused | baseline | compiled | broadcast |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        baseline = r.get("normalize+matmul", r.get("eager", {}))
        lines.append(
            f"| {r['op']} | {r['device']} | {r['dtype']} | {r['m']} x {r['n']} x {r['d']} | {r['mode']} "
            f"| {cell(r['fused'])} | {cell(baseline)} | {cell(r.get('compiled', {}))} "
            f"| {cell(r.get('broadcast', {}))} |"
        )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--out", default="results")
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile baseline")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    from tqdm import tqdm

    # The broadcast baseline materialises M x N x D: the quick run keeps it to
    # the smallest shape (at 4096 x 4096 x 128 it takes 8 GiB, more with grads).
    limit = 2**31 if args.full else 2**27
    rows = [measure(case, 0.3, limit, not args.no_compile, compiled_memory=args.full)
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
