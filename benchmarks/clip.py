"""CLIP and SigLIP at CLIP scale (issue 23), forward+backward, side by side in
one process: unit rows of B images and B texts, a learnable fp32 logit scale
(SigLIP: and bias), gradients to all of them.

* clip: ssl_ops.clip_loss (both directions from one S: 4 GEMMs of B^2 D);
  "two calls", the form it replaces (two in-batch InfoNCE calls, 6 GEMMs);
  eager (ssl_ops.reference.clip_loss: open_clip's computation, the full B x B
  logits); torch.compile of it; open_clip's ClipLoss itself; on CUDA, Inf-CL's
  cal_inf_loss twice (its CLIP form) where the wheel is installed.
* siglip: ssl_ops.siglip_loss; eager (ssl_ops.reference.siglip_loss);
  torch.compile of it; open_clip's SigLipLoss; on CUDA, siglip-kernel's
  fused_siglip_loss where installed. (open_clip 3.3.0's SigLipLoss has no
  chunk_size argument, so no chunked open_clip column.)

Time is the median of interleaved blocks (benchmarks/common.py); memory the
peak extra memory (CPU: resident, in a fresh process; CUDA:
max_memory_allocated over the inputs); TFLOP/s counts the eager computation's
three B^2 D GEMMs (S, d image, d text).

    python -m benchmarks.clip                      # CPU: issue 23's CPU target and smaller shapes
    python -m benchmarks.clip --device cuda --time-budget 30   # GPU shapes, most important first
    python -m benchmarks.clip --loss siglip        # one loss's cases
    python -m benchmarks.clip --quick              # the first case of each loss (python -m benchmarks)
"""

import argparse
import importlib.util
import json
import math
import os
import time

import torch
import torch.nn.functional as F

import ssl_ops
from ssl_ops import reference

from .common import cuda_peak_extra, machine, measure_in_subprocess, peak_extra_bytes_here, timed_in_turns

MEMORY_LIMIT = 20 * 2**30
CLIP_SCALE, SIGLIP_SCALE, SIGLIP_BIAS = 1 / 0.07, 10.0, -10.0


def make_inputs(case):
    g = torch.Generator().manual_seed(0)
    device, dtype = case["device"], getattr(torch, case["dtype"])
    x, y = (F.normalize(torch.randn(case["rows"], case["d"], generator=g), dim=1).to(device, dtype).requires_grad_()
            for _ in range(2))
    if case["loss"] == "clip":
        return x, y, torch.tensor(CLIP_SCALE, device=device, requires_grad=True)
    return (x, y, torch.tensor(SIGLIP_SCALE, device=device, requires_grad=True),
            torch.tensor(SIGLIP_BIAS, device=device, requires_grad=True))


def _two_calls(x, y, scale):
    # The form before the joint op: two in-batch InfoNCE calls, the scale on the queries.
    return (ssl_ops.info_nce_loss((x * scale).to(x.dtype), y, temperature=1.0, normalize=False)
            + ssl_ops.info_nce_loss((y * scale).to(y.dtype), x, temperature=1.0, normalize=False)) / 2


def _inf_cl_clip(x, y, scale):
    from inf_cl import cal_inf_loss

    head_dim = math.gcd(x.shape[1], 256)
    return (cal_inf_loss(x, y, scale=scale, head_dim=head_dim) + cal_inf_loss(y, x, scale=scale, head_dim=head_dim)) / 2


def _siglip_kernel(x, y, scale, bias):
    from siglip_kernel import fused_siglip_loss

    return fused_siglip_loss(x, y, scale.log(), bias)


_COMPILED = {}


def loss_fn(case, impl):
    clip = case["loss"] == "clip"
    if impl == "compiled":
        if case["loss"] not in _COMPILED:
            _COMPILED[case["loss"]] = torch.compile(loss_fn(case, "eager"), dynamic=True)
        return _COMPILED[case["loss"]]
    if impl == "ours":
        return ssl_ops.clip_loss if clip else ssl_ops.siglip_loss
    if impl == "eager":
        return reference.clip_loss if clip else reference.siglip_loss
    if impl == "open_clip":
        from open_clip.loss import ClipLoss, SigLipLoss

        return ClipLoss() if clip else SigLipLoss()
    return {"two_calls": _two_calls, "inf_cl": _inf_cl_clip, "siglip_kernel": _siglip_kernel}[impl]


def run_once(case, impl, inputs):
    loss = loss_fn(case, impl)(*inputs)
    torch.autograd.grad(loss, inputs)


def impls_for(case):
    out = ["ours", "eager", "open_clip"] + (["compiled"] if case.get("compile", True) else [])
    if case["loss"] == "clip":
        out.insert(1, "two_calls")
    if case["device"] == "cuda":
        if case["loss"] == "clip" and importlib.util.find_spec("inf_cl") is not None:
            out.append("inf_cl")
        if case["loss"] == "siglip" and importlib.util.find_spec("siglip_kernel") is not None:
            out.append("siglip_kernel")
    return out


def child(case):
    inputs = make_inputs(case)
    if case["impl"] == "compiled":
        run_once(case, "compiled", inputs)  # compilation is not the loss's memory
    print(json.dumps({"peak_extra_bytes": peak_extra_bytes_here(lambda: run_once(case, case["impl"], inputs))}))


def measure(case, min_run_time):
    row = dict(case)
    row["model_flops"] = 3 * 2 * case["rows"] ** 2 * case["d"]
    memories = {}
    for impl in impls_for(case):
        try:
            if case["device"] == "cuda":
                memory = cuda_peak_extra(lambda: make_inputs(case), lambda inputs: run_once(case, impl, inputs))
            else:
                memory = measure_in_subprocess("clip", {**case, "impl": impl}, MEMORY_LIMIT)
        except Exception as e:  # a peer that fails at this shape is reported, not fatal
            row[impl] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
            continue
        if memory.get("oom"):
            row[impl] = {"oom": True}
        else:
            memories[impl] = memory
    times = timed_in_turns(memories, lambda: make_inputs(case), lambda impl, inputs: run_once(case, impl, inputs),
                           min_run_time, case["device"])
    for impl, seconds in times.items():
        row[impl] = {"median_s": seconds, "peak_extra_bytes": memories[impl]["peak_extra_bytes"],
                     "tflops": row["model_flops"] / seconds / 1e12}
    return row


def cases(device):
    def case(loss, rows, d, dtype):
        return {"loss": loss, "rows": rows, "d": d, "dtype": dtype, "device": device}

    if device == "cpu":  # the CPU target first: CLIP B = 8192, D = 512, fp32
        return [case("clip", 8192, 512, "float32"), case("clip", 2048, 512, "float32"),
                case("siglip", 8192, 768, "float32"), case("clip", 4096, 128, "float32")]
    # torch.compile on one GPU case (its compilation takes tens of seconds).
    out = [case("clip", 32768, 768, "bfloat16"), case("siglip", 65536, 768, "bfloat16"),
           {**case("clip", 16384, 128, "bfloat16"), "compile": True}, case("siglip", 16384, 128, "bfloat16"),
           case("clip", 8192, 512, "bfloat16"), case("siglip", 16384, 768, "bfloat16"),
           case("clip", 32768, 512, "bfloat16"), case("clip", 8192, 768, "bfloat16")]
    return [{"compile": False, **c} for c in out]


IMPL_COLUMNS = ("ours", "two_calls", "eager", "compiled", "open_clip", "inf_cl", "siglip_kernel")


def fmt(entry):
    if entry is None:
        return "-"
    if "error" in entry:
        return "error"
    if entry.get("oom"):
        return "OOM"
    return f"{entry['median_s'] * 1e3:.1f} / {entry['peak_extra_bytes'] / 2**20:.0f}"


def markdown(rows):
    lines = ["| loss | device | dtype | B | D | " + " | ".join(f"{c} ms / MiB" for c in IMPL_COLUMNS)
             + " | ours TFLOP/s | eager / ours | compiled / ours | two calls / ours |",
             "|---" * (5 + len(IMPL_COLUMNS) + 4) + "|"]
    for r in rows:
        def ratio(name):
            a, b = r.get(name, {}), r.get("ours", {})
            return f"{a['median_s'] / b['median_s']:.2f}x" if "median_s" in a and "median_s" in b else "-"

        tflops = f"{r['ours']['tflops']:.3f}" if "tflops" in r.get("ours", {}) else "-"
        lines.append(f"| {r['loss']} | {r['device']} | {r['dtype']} | {r['rows']} | {r['d']} | "
                     + " | ".join(fmt(r.get(c)) for c in IMPL_COLUMNS)
                     + f" | {tflops} | {ratio('eager')} | {ratio('compiled')} | {ratio('two_calls')} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", default="results", help="folder for clip_<device>.json")
    parser.add_argument("--time-budget", type=float, default=None, help="start no new case after this many seconds")
    parser.add_argument("--min-run-time", type=float, default=0.3)
    parser.add_argument("--loss", choices=["clip", "siglip"], help="only this loss's cases")
    parser.add_argument("--quick", action="store_true", help="the first case of each loss only")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"clip_{args.device}.json")
    rows, start = [], time.perf_counter()
    todo = [c for c in cases(args.device) if args.loss in (None, c["loss"])]
    if args.quick:
        todo = [c for i, c in enumerate(todo) if c["loss"] not in {t["loss"] for t in todo[:i]}]
    for case in todo:
        if args.time_budget is not None and time.perf_counter() - start > args.time_budget:
            print(f"time budget of {args.time_budget:.0f} s spent: later cases left out")
            break
        rows.append(measure(case, args.min_run_time))
        print(markdown(rows[-1:]).splitlines()[-1], flush=True)
        with open(path, "w") as f:  # after every case: a run cut short keeps what it measured
            json.dump({"machine": machine(), "rows": rows}, f, indent=2)
    print(markdown(rows))
    print(f"\nms / MiB = median forward+backward time / peak extra memory; x / ours = that time over ours; JSON: {path}")


if __name__ == "__main__":
    main()
