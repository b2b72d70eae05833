"""Self-check of ssl_ops on this machine's device, for users:

    python -m ssl_ops.selftest                 # the GPU when there is one, else the CPU
    python -m ssl_ops.selftest --device cpu
    python -m ssl_ops.selftest --emulate       # the CUDA code path on the CPU emulator (dev builds)

Every op and route runs at a few small shapes (partial tiles) and one large
one (D >= 2, at least 2 rows), in float32 (and bfloat16 on a GPU), forward and
backward, against the float64 computation of ssl_ops.reference on the same rounded
inputs. One line per op and route: PASS or FAIL, the worst norm-wise relative
error over outputs and gradients against its tolerance, and the time of the
large forward+backward against the eager reference in the input dtype. Exits
1 on any failure, and names the setting that takes the failing op off its
kernel (SSL_OPS_EAGER, ssl_ops/_fallback.py; SSL_OPS_CUDA_CONTRASTIVE_ROUTE=gemm
when only the fused contrastive route fails; the cosine matrix's GEMM route when
only its tiles fail).
"""

import argparse
import contextlib
import os
import statistics
import sys
import time

import torch

import ssl_ops
from ssl_ops import reference

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 3e-2}
TOLERANCE_TF32 = 5e-3  # float32 when the matmuls may use TF32


class Check:
    """An op: make(gen, n, d) draws float64 inputs; the inputs at no_grad take no
    gradient (MoCo's key), the others do."""

    def __init__(self, name, family, make, fused, eager, no_grad=(), one_route=False):
        self.name, self.family, self.make, self.fused, self.eager = name, family, make, fused, eager
        self.no_grad = no_grad
        self.one_route = one_route  # the CUDA route setting does not apply (SigLIP; the GEMM-only forms)

    def inputs(self, master, dtype, device):
        return [t.to(device, dtype).requires_grad_(i not in self.no_grad) for i, t in enumerate(master)]


def _randn(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def _checks():
    t_nt, t_moco = 0.1, 0.07
    return [
        Check("nt_xent", "contrastive",
              lambda g, n, d: [_randn(g, n, d), _randn(g, n, d)],
              lambda a, b: ssl_ops.nt_xent_loss(a, b, t_nt), lambda a, b: reference.nt_xent_loss(a, b, t_nt)),
        Check("supcon", "contrastive",
              lambda g, n, d: [_randn(g, 2 * n, d)],
              lambda z: ssl_ops.nt_xent_loss(z, labels=_labels(z)), lambda z: reference.supcon_loss(z, _labels(z))),
        Check("multicrop", "contrastive",
              lambda g, n, d: [_randn(g, 3 * n, d)],
              lambda z: ssl_ops.nt_xent_loss(z, labels=_labels(z), positives="logsumexp"),
              lambda z: reference.supcon_loss(z, _labels(z), positives="logsumexp"), one_route=True),
        Check("dcl", "contrastive",
              lambda g, n, d: [_randn(g, n, d), _randn(g, n, d)],
              ssl_ops.dcl_loss, reference.dcl_loss, one_route=True),
        Check("siglip", "contrastive",
              lambda g, n, d: [_randn(g, n, d) / d ** 0.5, _randn(g, n, d) / d ** 0.5,
                               torch.tensor(10.0, dtype=torch.float64), torch.tensor(-10.0, dtype=torch.float64)],
              ssl_ops.siglip_loss, reference.siglip_loss, one_route=True),
        Check("moco", "contrastive",
              lambda g, n, d: [_randn(g, n, d), _randn(g, n, d), _randn(g, 4 * n + 3, d)],
              lambda q, k, queue: ssl_ops.info_nce_loss(q, k, queue, t_moco),
              lambda q, k, queue: reference.info_nce_loss(q, k, queue, t_moco), no_grad=(1, 2)),
        Check("mocov3", "contrastive",
              lambda g, n, d: [_randn(g, n, d), _randn(g, n, d)],
              lambda q, k: ssl_ops.info_nce_loss(q, k, temperature=0.2),
              lambda q, k: reference.info_nce_loss(q, k, temperature=0.2)),
        Check("clip", "contrastive",
              lambda g, n, d: [_randn(g, n, d) / d ** 0.5, _randn(g, n, d) / d ** 0.5,
                               torch.tensor(30.0, dtype=torch.float64)],
              ssl_ops.clip_loss, reference.clip_loss, one_route=True),
        Check("byol", "cosine",
              lambda g, n, d: [_randn(g, n, d), _randn(g, n, d)],
              ssl_ops.byol_loss, reference.byol_loss),
        Check("cosine_matrix", "cosine_matrix",
              lambda g, n, d: [_randn(g, n, d), _randn(g, n + 5, d)],
              ssl_ops.cosine_similarity_matrix, reference.cosine_similarity_matrix),
        Check("cosine_matrix_self", "cosine_matrix",
              lambda g, n, d: [_randn(g, n, d)],
              ssl_ops.cosine_similarity_matrix, reference.cosine_similarity_matrix),
    ]


def _labels(z):
    return torch.arange(z.shape[0], device=z.device) % max(1, z.shape[0] // 3)


# The routes of the CUDA kernels, each run in turn (the environment variables
# are read on every call).
_CUDA_ROUTES = {
    "contrastive": {"fused": {}, "gemm": {"SSL_OPS_CUDA_CONTRASTIVE_ROUTE": "gemm"}},
    "cosine_matrix": {"tiles": {"SSL_OPS_CUDA_COSINE_MATRIX_ROUTE": "tiles"},
                      "gemm": {"SSL_OPS_CUDA_COSINE_MATRIX_ROUTE": "gemm"}},
}


def _routes(cuda_kernels, family):
    return _CUDA_ROUTES.get(family, {"default": {}}) if cuda_kernels else {"default": {}}


@contextlib.contextmanager
def _environment(settings):
    saved = {k: os.environ.get(k) for k in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _run(fn, inputs, upstream_seed=0):
    """Forward and backward; returns the output and the input gradients."""
    leaves = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    out = fn(*leaves)
    g = torch.Generator().manual_seed(upstream_seed)
    upstream = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.device, out.dtype)
    differentiable = [t for t in leaves if t.requires_grad]
    grads = torch.autograd.grad(out, differentiable, upstream) if differentiable else []
    return [out, *grads]


def _relative_error(got, want):
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    if not torch.isfinite(got).all():
        return float("inf")
    # A loss whose exact value is ~0 (one sample: a lone positive) is judged on
    # the absolute scale of a loss, 1; other outputs on 1e-6 per element.
    floor = 1.0 if want.numel() == 1 else 1e-6 * max(1, want.numel()) ** 0.5
    scale = max(want.norm().item(), floor)
    return (got - want).norm().item() / scale


def _median_time(fn, inputs, device, repeats=5):
    leaves = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]

    def step():
        out = fn(*leaves)
        differentiable = [t for t in leaves if t.requires_grad]
        if differentiable:
            torch.autograd.grad(out.sum(), differentiable)
        if device == "cuda":
            torch.cuda.synchronize()

    step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _shapes(device, emulate):
    # D = 1 and single rows are left to the test suite: their exact gradients
    # are 0, so every backend's answer is rounding noise of no fixed scale.
    small = [(2, 7), (5, 2), (37, 33), (130, 67)]
    if emulate:
        return small, (96, 64)
    return small, ((4096, 128) if device == "cuda" else (512, 64))


def check_op(check, device, dtypes, emulate, settings):
    worst_ratio, worst_err, worst_tol = 0.0, 0.0, 0.0
    small, large = _shapes(device, emulate)
    gen = torch.Generator().manual_seed(0)
    with _environment(settings):
        for dtype in dtypes:
            tol = TOLERANCE[dtype]
            if dtype == torch.float32 and device == "cuda" and torch.backends.cuda.matmul.allow_tf32:
                tol = TOLERANCE_TF32
            for n, d in [*small, large]:
                master = check.make(gen, n, d)
                got = _run(check.fused, check.inputs(master, dtype, device))
                # The reference gets the same rounded inputs, in float64.
                want = _run(check.eager, check.inputs([m.to(dtype) for m in master], torch.float64, "cpu"))
                for g_out, w_out in zip(got, want):
                    err = _relative_error(g_out, w_out)
                    if err / tol > worst_ratio or err != err:
                        worst_ratio, worst_err, worst_tol = err / tol, err, tol
        dtype = dtypes[-1]
        n, d = large
        inputs = check.inputs(check.make(gen, n, d), dtype, device)
        fused_s = _median_time(check.fused, inputs, device)
    eager_s = _median_time(check.eager, inputs, device)
    return worst_ratio <= 1.0, worst_err, worst_tol, eager_s / fused_s, dtype


def check_ema(device, emulate):
    """Bit-for-bit against the CPU kernel (whose exactness the test suite proves),
    and within float32 rounding of the float64 formula."""
    gen = torch.Generator().manual_seed(1)
    sizes = [1, 7, 4099, 65536 + 13] + ([] if emulate else [1 << 20])
    ema = [torch.randn(s, generator=gen) for s in sizes]
    online = [torch.randn(s, generator=gen) for s in sizes]
    expected = [e.clone() for e in ema]
    torch.ops.ssl_ops.ema_update_(expected, online, 0.996)
    got = [e.to(device, copy=True) for e in ema]
    ssl_ops.ema_update_(got, [o.to(device) for o in online], 0.996)
    exact = all(torch.equal(g.cpu(), x) for g, x in zip(got, expected))
    err = max(_relative_error(g, 0.996 * e.double() + 0.004 * o.double()) for g, e, o in zip(got, ema, online))
    dev_online = [o.to(device) for o in online]
    fused_s = _median_time(lambda z: ssl_ops.ema_update_(got, dev_online, 0.996) or z, [torch.zeros(1)], device)
    eager_s = _median_time(lambda z: reference.ema_update_(got, dev_online, 0.996) or z, [torch.zeros(1)], device)
    return exact and err <= 1e-6, err, 1e-6, eager_s / fused_s


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None)
    parser.add_argument("--emulate", action="store_true",
                        help="run the CUDA kernels on the CPU emulator (needs a build with SSL_OPS_BUILD_EMU=1)")
    args = parser.parse_args(argv)
    device = args.device or ("cuda" if ssl_ops.cuda_kernels_available() else "cpu")
    if args.emulate:
        device = "cpu"
    if device == "cuda" and not ssl_ops.cuda_kernels_available():
        print(f"ssl_ops selftest: no CUDA kernels or no GPU here ({ssl_ops.build_info()})")
        return 2
    info = ssl_ops.build_info()
    where = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"ssl_ops {ssl_ops.__version__} selftest on {where}{' (emulated CUDA kernels)' if args.emulate else ''}; "
          f"torch {torch.__version__}, built for arch {info['cuda_arch_list'] or '-'}")
    dtypes = [torch.float32, torch.bfloat16] if device == "cuda" else [torch.float32]
    mode = contextlib.nullcontext()
    if args.emulate:
        from . import emulation

        mode = emulation.use_emulated_kernels()
    cuda_kernels = args.emulate or device == "cuda"
    failures = []
    start = time.perf_counter()
    with mode:
        for check in _checks():
            routes = {"default": {}} if check.one_route else _routes(cuda_kernels, check.family)
            for route, settings in routes.items():
                try:
                    ok, err, tol, speed, dtype = check_op(check, device, dtypes, args.emulate, settings)
                    detail = f"worst error {err:.1e} (tolerance {tol:.0e})" + (
                        "" if args.emulate else f"   large {str(dtype)[6:]} fwd+bwd {speed:.2f}x eager")
                except Exception as error:  # a crash is a failure to report, not to hide
                    ok, detail = False, f"raised {type(error).__name__}: {error}"
                print(f"{'PASS' if ok else 'FAIL'}  {check.name:19} {route:8} {detail}", flush=True)
                if not ok:
                    failures.append((check, route))
        try:
            ok, err, tol, speed = check_ema(device, args.emulate)
            detail = f"worst error {err:.1e} (tolerance {tol:.0e}), bit-identical to the CPU kernel: {ok}" + (
                "" if args.emulate else f"   {speed:.2f}x eager")
        except Exception as error:
            ok, detail = False, f"raised {type(error).__name__}: {error}"
        print(f"{'PASS' if ok else 'FAIL'}  {'ema_update_':19} {'default':8} {detail}", flush=True)
        if not ok:
            failures.append((Check("ema_update_", "ema", None, None, None), "default"))
    print(f"{time.perf_counter() - start:.1f} s")
    for check, route in failures:
        if route == "fused" and check.family == "contrastive":
            print(f"  {check.name}: the default (fused) route failed; set SSL_OPS_CUDA_CONTRASTIVE_ROUTE=gemm "
                  f"to use the vendor-GEMM route instead, and please report this output")
        elif route == "tiles":
            print(f"  {check.name}: the tile route failed; set SSL_OPS_CUDA_COSINE_MATRIX_ROUTE=gemm "
                  f"to use the vendor GEMM instead")
        else:
            print(f"  {check.name}: set SSL_OPS_EAGER={check.family} to run it in plain PyTorch, and please "
                  f"report this output")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
