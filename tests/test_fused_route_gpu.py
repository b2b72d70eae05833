"""The fused route on a real GPU (sm_80+; skipped elsewhere): the shapes and
forms the emulated tests (test_fused_route.py, test_fused_grad.py) run, on
the device's own tensor cores, against float64 and against the GEMM route
on the same device: NT-Xent / SupCon / DCL forward and gradient, the backward
op, MoCo with d query from the statistics pass, MoCo v3 with d key; bf16 and
fp16 rows of up to 256 features and TF32 rows of up to 128, with partial
tiles and shapes that reach the plain tiles."""

import os

import pytest
import torch
import torch.nn.functional as F

import ssl_ops
from ssl_ops import reference
from test_contrastive_kernels import EPS, EXCLUDED, LOGSUMEXP, checker, rand, sym_excluded_reference, \
    sym_lse_reference, sym_reference
from test_fused_route import TF32, as_dtype, tf32_allowed
from tolerances import assert_close, rtol

pytestmark = pytest.mark.cuda

MEAN = 0
SYM_REFERENCES = {MEAN: sym_reference, LOGSUMEXP: sym_lse_reference, EXCLUDED: sym_excluded_reference}


@pytest.fixture(autouse=True)
def _needs_a_fused_gpu():
    if not ssl_ops.cuda_kernels_available():
        pytest.skip("needs CUDA kernels and a GPU")
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("the fused route runs from sm_80")


def on_route(route, fn):
    """fn() with SSL_OPS_CUDA_CONTRASTIVE_ROUTE set to route (None: the default)."""
    saved = os.environ.pop("SSL_OPS_CUDA_CONTRASTIVE_ROUTE", None)
    try:
        if route is not None:
            os.environ["SSL_OPS_CUDA_CONTRASTIVE_ROUTE"] = route
        return fn()
    finally:
        os.environ.pop("SSL_OPS_CUDA_CONTRASTIVE_ROUTE", None)
        if saved is not None:
            os.environ["SSL_OPS_CUDA_CONTRASTIVE_ROUTE"] = saved


def pairs_or_groups(rows, kind):
    if kind == "pairs":  # NT-Xent: the positive of row r is r +- rows / 2
        return torch.arange(rows).remainder(rows // 2)
    sizes = torch.tensor([1, 2, 3, 4])  # SupCon groups of 1 to 4, shuffled
    labels = torch.repeat_interleave(torch.arange(rows), sizes.repeat(rows)[:rows])[:rows]
    return labels[torch.randperm(rows, generator=torch.Generator().manual_seed(5))]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, TF32], ids=str)
@pytest.mark.parametrize("rows,d", [(2, 8), (130, 64), (300, 128), (70, 136), (300, 256)])
@pytest.mark.parametrize("form", [MEAN, LOGSUMEXP, EXCLUDED], ids=["mean", "logsumexp", "excluded"])
@pytest.mark.parametrize("labels_kind", ["pairs", "groups"])
def test_sym(dtype, rows, d, form, labels_kind):
    if dtype == TF32 and d > 128:
        pytest.skip("TF32 rows of more than 128 features take the GEMM route")
    z = rand((rows, d), as_dtype(dtype), "cuda", 11)
    labels = pairs_or_groups(rows, labels_kind)
    scale = 1 / 0.2
    with tf32_allowed(dtype == TF32):
        def run():
            return torch.ops.ssl_ops.contrastive_sym_loss(z, labels.cuda(), 0, rows, scale, EPS, True, 1, True, form)

        fused, gemm = on_route(None, run), on_route("gemm", run)
    same = labels[:, None] == labels[None, :]
    valid = (same.sum(1) - 1) > 0
    weight = valid.double() / max(int(valid.sum()), 1)
    ref_rows, ref_grad = SYM_REFERENCES[form](z.cpu(), labels, scale, weight)
    check = checker(as_dtype(dtype), rows + d, scale, tf32=dtype == TF32)
    check(fused[0], (ref_rows * weight).sum(), "mean loss")
    check(fused[3], ref_grad, "gradient")
    # The GEMM route forms S in fp32 from the same rounded rows.
    tight = rtol(torch.float32, length=rows + d, logit_scale=scale, rounds_operands=False, tf32=dtype == TF32)
    finite = torch.isfinite(gemm[1])
    assert_close(fused[1][finite], gemm[1][finite], tight, "lse, fused against the GEMM route")


@pytest.mark.parametrize("dtype", [torch.bfloat16, TF32], ids=str)
@pytest.mark.parametrize("batch,queue,d", [(70, 700, 64), (256, 4096, 128), (66, 300, 256)])
def test_moco(dtype, batch, queue, d):
    if dtype == TF32 and d > 128:
        pytest.skip("TF32 rows of more than 128 features take the GEMM route")
    real = as_dtype(dtype)
    q, k, qu = (rand(shape, real, "cuda", seed) for shape, seed in (((batch, d), 12), ((batch, d), 13),
                                                                     ((queue, d), 14)))
    q.requires_grad_()
    with tf32_allowed(dtype == TF32):
        loss = ssl_ops.info_nce_loss(q, k, qu, temperature=0.2)
        (grad,) = torch.autograd.grad(loss, [q])
    q64 = q.detach().double().cpu().requires_grad_()
    ref = reference.info_nce_loss(q64, k.double().cpu(), qu.double().cpu(), temperature=0.2)
    check = checker(real, batch + queue + d, 5.0, tf32=dtype == TF32)
    check(loss, ref.detach(), "loss")
    check(grad, torch.autograd.grad(ref, [q64])[0], "grad query")


@pytest.mark.parametrize("dtype", [torch.bfloat16, TF32], ids=str)
@pytest.mark.parametrize("batch,d", [(130, 64), (1024, 256)])
@pytest.mark.parametrize("keys_grad", [False, True], ids=["keys-detached", "keys-grad"])
def test_mocov3(dtype, batch, d, keys_grad):
    if dtype == TF32 and d > 128:
        pytest.skip("TF32 rows of more than 128 features take the GEMM route")
    real = as_dtype(dtype)
    q = rand((batch, d), real, "cuda", 15).requires_grad_()
    k = rand((batch, d), real, "cuda", 16).requires_grad_(keys_grad)
    wanted = [q, k] if keys_grad else [q]
    with tf32_allowed(dtype == TF32):
        loss = ssl_ops.info_nce_loss(q, k, temperature=0.2)
        grads = torch.autograd.grad(loss, wanted)
    q64, k64 = (t.detach().double().cpu().requires_grad_() for t in (q, k))
    logits = F.normalize(q64, dim=1) @ F.normalize(k64, dim=1).t() / 0.2
    ref = F.cross_entropy(logits, torch.arange(batch))
    ref_grads = torch.autograd.grad(ref, [q64, k64] if keys_grad else [q64])
    check = checker(real, 2 * batch + d, 5.0, tf32=dtype == TF32)
    check(loss, ref.detach(), "loss")
    for got, want, name in zip(grads, ref_grads, ["grad query", "grad key"]):
        check(got, want, name)
