"""EMA update of a momentum encoder: ssl_ops.ema_update_ against the ways SSL
code does it today, on the parameter sets of real timm models.

* ssl_ops    - ssl_ops.ema_update_ on the tensor lists (one fused multi-tensor kernel)
* modules    - ssl_ops.ema_update_ on two modules holding them (names matched every call)
* prepared   - ssl_ops.EMA(ema_module, online_module).update(m): matched once
* prepared_t - the same with the momentum a 0-dim tensor on the device
* loop       - the per-parameter Python loop of solo-learn's MomentumUpdater
               (``e.data = m * e.data + (1 - m) * o.data``)
* foreach    - lightly's update_momentum (``_foreach_mul_`` + ``_foreach_add_``)
* lerp       - timm's ModelEmaV3 (``torch._foreach_lerp_``)
* compiled   - torch.compile of ssl_ops.reference.ema_update_ (the in-place
               per-parameter loop; compiled once before timing; --no-compile
               leaves it out)
* copy       - ``torch._foreach_copy_`` of the same tensors: the memory-bandwidth
               yardstick the EMA is measured against

Times are medians of timed blocks of calls, the implementations taking turns
block by block (benchmarks/common.py); each ratio is
baseline time / ssl_ops time from the same run. GB/s counts the bytes an
update must move (read ema and online, write ema; copy: read and write).

    python -m benchmarks.ema            # resnet50 and vit_base_patch16_224, CPU (+ CUDA)
    python -m benchmarks.ema --quick    # resnet50 and host_161 (the per-call host cost) only
"""

import argparse
import json
import os

import torch
from torch import nn

import ssl_ops

from .common import interleaved_medians, machine, median_seconds

MOMENTUM = 0.996


# Not a timm model: the parameter count of a 1B-parameter language model (100
# matrices of 4096 x 2560), large enough that the update runs at memory
# bandwidth rather than launch rate (12.6 GB moved per fp32 update).
SYNTHETIC = {"llm_1b": [(4096, 2560)] * 100,
             # ResNet-50's 161 parameter tensors with one element each: the per-call host cost alone.
             "host_161": [(1,)] * 161}


def parameter_set(model_name, device, ema_dtype, online_dtype):
    if model_name in SYNTHETIC:
        g = torch.Generator(device=device).manual_seed(0)
        shapes = SYNTHETIC[model_name]
        online = [torch.randn(s, generator=g, device=device).to(online_dtype) for s in shapes]
        ema = [torch.randn(s, generator=g, device=device).to(ema_dtype) for s in shapes]
        return ema, online
    import timm

    model = timm.create_model(model_name, pretrained=False)
    online = [p.detach().to(device=device, dtype=online_dtype).clone() for p in model.parameters()]
    ema = [p.detach().to(device=device, dtype=ema_dtype).clone() for p in model.parameters()]
    return ema, online


def solo_learn_loop(ema, online, m):
    for e, o in zip(ema, online):
        e.data = m * e.data + (1 - m) * o.data


def lightly_foreach(ema, online, m):
    torch._foreach_mul_(ema, m)
    torch._foreach_add_(ema, online, alpha=1 - m)


def timm_lerp(ema, online, m):
    torch._foreach_lerp_(ema, online, 1 - m)


def fused(ema, online, m):
    ssl_ops.ema_update_(ema, online, m)


IMPLEMENTATIONS = {"ssl_ops": fused, "loop": solo_learn_loop, "foreach": lightly_foreach, "lerp": timm_lerp}
_COMPILED_LOOP = []


def compiled_loop(ema, online, m):
    if not _COMPILED_LOOP:
        from ssl_ops import reference

        _COMPILED_LOOP.append(torch.compile(reference.ema_update_))
    _COMPILED_LOOP[0](ema, online, m)


def run_case(model_name, device, ema_dtype, online_dtype, min_run_time, implementations=IMPLEMENTATIONS):
    ema, online = parameter_set(model_name, device, ema_dtype, online_dtype)
    numel = sum(t.numel() for t in ema)
    ema_bytes = numel * (2 * ema[0].element_size() + online[0].element_size())
    steps = {}
    for name, impl in implementations.items():
        # Only ssl_ops takes a reduced-precision online model as it is; the
        # baselines need the cast their callers would write.
        cast = name != "ssl_ops" and online_dtype != ema_dtype

        def step(impl=impl, cast=cast):
            impl(ema, [t.to(ema_dtype) for t in online] if cast else online, MOMENTUM)

        steps[name] = step
    if "ssl_ops" in implementations:  # the module forms, on modules that hold the same tensors
        def module_of(tensors):
            return nn.ParameterList([nn.Parameter(t, requires_grad=False) for t in tensors])

        ema_module, online_module = module_of(ema), module_of(online)
        prepared = ssl_ops.EMA(ema_module, online_module)
        momentum = torch.tensor(MOMENTUM, device=device)
        module_forms = {
            "modules": lambda: ssl_ops.ema_update_(ema_module, online_module, MOMENTUM),
            "prepared": lambda: prepared.update(MOMENTUM),
            "prepared_t": lambda: prepared.update(momentum),
        }
        steps.update(module_forms)
    # Timed in turns, block by block, so a slow spell of the machine falls on all.
    results = interleaved_medians(steps, min_run_time, device)
    copy_dst = [torch.empty_like(t) for t in ema]

    copy_time = median_seconds(lambda: torch._foreach_copy_(copy_dst, ema), min_run_time, device)
    row = {
        "model": model_name,
        "device": device,
        "ema_dtype": str(ema_dtype).replace("torch.", ""),
        "online_dtype": str(online_dtype).replace("torch.", ""),
        "tensors": len(ema),
        "numel": numel,
        "median_s": results,
        "speedup_vs": {name: results[name] / results["ssl_ops"] for name in results if name != "ssl_ops"},
        "ssl_ops_GBps": ema_bytes / results["ssl_ops"] / 1e9,
        "copy_GBps": 2 * numel * ema[0].element_size() / copy_time / 1e9,
        "copy_median_s": copy_time,
    }
    del ema, online, copy_dst
    return row


def markdown(rows):
    lines = [
        "| model | device | ema/online | tensors | ssl_ops ms | modules ms | prepared ms | prepared_t ms | loop ms "
        "| foreach ms | lerp ms | compiled ms "
        "| vs loop | vs foreach | vs lerp | vs compiled | ssl_ops GB/s | copy GB/s |",
        "|---" * 18 + "|",
    ]
    for r in rows:
        t, s = r["median_s"], r["speedup_vs"]
        names = ("ssl_ops", "modules", "prepared", "prepared_t", "loop", "foreach", "lerp", "compiled")
        ms = " | ".join(f"{t[k] * 1e3:.3f}" if k in t else "-" for k in names)
        vs = " | ".join(f"{s[k]:.2f}x" if k in s else "-" for k in ("loop", "foreach", "lerp", "compiled"))
        lines.append(
            f"| {r['model']} | {r['device']} | {r['ema_dtype']}/{r['online_dtype']} | {r['tensors']} "
            f"| {ms} | {vs} | {r['ssl_ops_GBps']:.1f} | {r['copy_GBps']:.1f} |"
        )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="resnet50 and host_161 only, shorter timing")
    parser.add_argument("--models", nargs="+", default=None,
                        help=f"timm model names, or {', '.join(SYNTHETIC)} (synthetic; for a GPU)")
    parser.add_argument("--devices", nargs="+", default=None, help="cpu and/or cuda")
    parser.add_argument("--out", default="results", help="folder for ema.json")
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile baseline")
    args = parser.parse_args()
    implementations = dict(IMPLEMENTATIONS) if args.no_compile else {**IMPLEMENTATIONS, "compiled": compiled_loop}
    models = args.models or (["resnet50", "host_161"] if args.quick else ["resnet50", "vit_base_patch16_224", "host_161"])
    devices = args.devices or (["cpu", "cuda"] if ssl_ops.cuda_kernels_available() else ["cpu"])
    min_run_time = 0.5 if args.quick else 2.0
    cases = []
    for device in devices:
        for model in models:
            cases.append((model, device, torch.float32, torch.float32))
            if device == "cuda":
                cases.append((model, device, torch.float32, torch.bfloat16))
                cases.append((model, device, torch.bfloat16, torch.bfloat16))
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    rows = []
    iterator = tqdm(cases, desc="ema benchmark", unit="case") if tqdm else cases
    for model, device, ema_dtype, online_dtype in iterator:
        rows.append(run_case(model, device, ema_dtype, online_dtype, min_run_time, implementations))
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "ema.json")
    with open(path, "w") as f:
        json.dump({"machine": machine(), "momentum": MOMENTUM, "rows": rows}, f, indent=2)
    print(markdown(rows))
    print(f"\nmedian of timed blocks; 'vs X' = X time / ssl_ops time; JSON: {path}")


if __name__ == "__main__":
    main()
