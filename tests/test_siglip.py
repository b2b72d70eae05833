"""SigLIP's sigmoid loss (ssl_ops.siglip_loss, SigLipLoss; issue 15) against
open_clip's formula in float64 (ssl_ops.reference.siglip_loss): values and the
gradients of features, scale and bias; chunk edges; SigLIP's initial and
trained scale and bias; gradcheck, opcheck, compile, memory and bad input."""

import math

import pytest
import torch
import torch.nn.functional as F

import ssl_ops
from ssl_ops import emulation, reference
from routes import route as on_route
from tolerances import assert_close, rtol


def features(n, m, d, dtype, seed=0, normalize=True, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randn(m, d, generator=g, dtype=torch.float64)
    if normalize:  # as SigLIP's towers give them
        x, y = F.normalize(x, dim=1), F.normalize(y, dim=1)
    return x.to(device, dtype).requires_grad_(), y.to(device, dtype).requires_grad_()


def scalar(value, dtype=torch.float32, device="cpu"):
    return torch.tensor(value, dtype=dtype, device=device, requires_grad=True)


def check(x, y, scale, bias, dtype):
    loss = ssl_ops.siglip_loss(x, y, scale, bias)
    inputs = [t for t in (x, y, scale, bias) if t is not None]
    grads = torch.autograd.grad(loss, inputs)
    ref_inputs = [t.detach().double().cpu().requires_grad_() for t in inputs]
    ref = reference.siglip_loss(*ref_inputs[:3], ref_inputs[3] if bias is not None else None)
    ref_grads = torch.autograd.grad(ref, ref_inputs)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    # Each logit is scale x . y: its rounding grows with the scale; the loss
    # and d scale sum N rows of N terms each.
    tol = rtol(dtype, length=x.shape[0] + x.shape[1], logit_scale=abs(float(scale.detach())))
    assert_close(loss, ref.detach(), tol, "loss")
    for name, a, b in zip(("image", "text", "scale", "bias"), grads, ref_grads):
        assert_close(a, b, tol, f"grad {name}")


@pytest.mark.parametrize("route", ["cpu", "emulated", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("n,d", [(1, 4), (7, 1), (33, 16), (130, 65)])
@pytest.mark.parametrize("scale,bias", [(10.0, -10.0), (100.0, -5.0), (1.0, None)])
def test_matches_open_clip_formula(route, dtype, n, d, scale, bias, monkeypatch):
    """On the CPU kernel and on the CUDA source under the emulator."""
    monkeypatch.setenv("SSL_OPS_SIGLIP_CHUNK_ELEMENTS", str(5 * n))  # chunks of 5 image rows, a partial last one
    device = "cuda" if route == "cuda" else "cpu"
    if device == "cuda" and not ssl_ops.cuda_kernels_available():
        pytest.skip("no GPU")
    x, y = features(n, n, d, dtype, seed=n + d, device=device)
    param = torch.float64 if dtype == torch.float64 else torch.float32  # fp32 parameters with half features
    with on_route(route if device == "cpu" else "cpu", monkeypatch):
        check(x, y, scalar(scale, param, device), scalar(bias, param, device) if bias is not None else None, dtype)


def test_unnormalised_features_and_large_logits_stay_finite():
    # |logit| in the hundreds: softplus and sigmoid saturate, nothing overflows.
    x, y = features(40, 40, 8, torch.float32, seed=1, normalize=False)
    check(x, y, scalar(30.0), scalar(-10.0), torch.float32)


def test_scale_and_bias_shapes_and_numbers():
    x, y = features(12, 12, 6, torch.float32, seed=2)
    one_element = ssl_ops.siglip_loss(x, y, torch.tensor([10.0]), torch.tensor([-10.0]))
    zero_dim = ssl_ops.siglip_loss(x, y, 10.0, -10.0)
    torch.testing.assert_close(one_element, zero_dim)
    scale = torch.tensor([10.0], requires_grad=True)
    (grad,) = torch.autograd.grad(ssl_ops.siglip_loss(x, y, scale, -10.0), [scale])
    assert grad.shape == (1,)


def test_module_is_open_clips_forward():
    x, y = features(9, 9, 5, torch.float32, seed=3)
    loss_fn = ssl_ops.SigLipLoss()
    plain = loss_fn(x, y, scalar(10.0), scalar(-10.0))
    as_dict = loss_fn(x, y, scalar(10.0), scalar(-10.0), output_dict=True)
    assert set(as_dict) == {"contrastive_loss"}
    torch.testing.assert_close(as_dict["contrastive_loss"], plain)


def test_eager_fallback_computes_the_same_function(monkeypatch):
    x, y = features(10, 10, 5, torch.float64, seed=4)
    scale, bias = scalar(10.0, torch.float64), scalar(-10.0, torch.float64)
    kernel = ssl_ops.siglip_loss(x, y, scale, bias)
    kernel_grads = torch.autograd.grad(kernel, [x, y, scale, bias])
    monkeypatch.setenv("SSL_OPS_EAGER", "contrastive")
    eager = ssl_ops.siglip_loss(x, y, scale, bias)
    eager_grads = torch.autograd.grad(eager, [x, y, scale, bias])
    torch.testing.assert_close(kernel, eager, rtol=1e-10, atol=1e-12)
    for a, b in zip(kernel_grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_gradcheck_opcheck_and_compile():
    x, y = features(5, 5, 3, torch.float64, seed=5, normalize=False)
    scale, bias = scalar(2.0, torch.float64), scalar(-1.0, torch.float64)
    assert torch.autograd.gradcheck(lambda *t: ssl_ops.siglip_loss(*t), (x, y, scale, bias))
    assert torch.autograd.gradcheck(lambda a, b, s: ssl_ops.siglip_loss(a, b, s), (x, y, scale))
    xf, yf = features(6, 8, 4, torch.float32, seed=6)
    s32, b32 = scalar(10.0), scalar(-10.0)
    for bias_arg in (b32, None):
        for offset in (0, 2):
            for compute_grad in (False, True):
                torch.library.opcheck(torch.ops.ssl_ops.siglip_loss.default,
                                      (xf, yf, s32, bias_arg, offset, compute_grad))
    torch._dynamo.reset()

    def loss_fn(a, b, s, c):
        return ssl_ops.siglip_loss(a, b, s, c)

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    xs, ys = features(6, 6, 4, torch.float32, seed=7)
    got = compiled(xs, ys, s32, b32)
    want = loss_fn(xs, ys, s32, b32)
    torch.testing.assert_close(got, want)
    for g, w in zip(torch.autograd.grad(got, [xs, ys, s32, b32]), torch.autograd.grad(want, [xs, ys, s32, b32])):
        torch.testing.assert_close(g, w)


def test_memory_is_never_n_by_n():
    common = pytest.importorskip("benchmarks.common")
    n, d = 8192, 64  # the eager logits alone: 256 MB
    x, y = features(n, n, d, torch.float32, seed=8)
    scale, bias = scalar(10.0), scalar(-10.0)

    def run():
        torch.autograd.grad(ssl_ops.siglip_loss(x, y, scale, bias), [x, y, scale, bias])

    run()  # warm the allocator and the thread pool first
    extra = common.peak_extra_bytes_here(run)
    # One CPU chunk is 2^24 similarities (64 MB): well under half the logits.
    assert extra < 128 * 2**20, f"forward + backward added {extra / 2**20:.1f} MB"


def test_bad_input_errors():
    x, y = torch.randn(4, 8), torch.randn(4, 8)
    s = torch.tensor(10.0)
    with pytest.raises(ValueError, match=r"text_features has 6 features but image_features has 8"):
        ssl_ops.siglip_loss(x, torch.randn(4, 6), s)
    with pytest.raises(ValueError, match=r"text_features needs 4 \+ 2 rows, got 5"):
        torch.ops.ssl_ops.siglip_loss(x, torch.randn(5, 8), s, None, 2, False)
    with pytest.raises(ValueError, match=r"logit_scale must be a scalar \(one element\), got shape \[2\]"):
        ssl_ops.siglip_loss(x, y, torch.tensor([10.0, 1.0]))
    with pytest.raises(ValueError, match=r"logit_bias must be a scalar \(one element\), got shape \[4\]"):
        ssl_ops.siglip_loss(x, y, s, torch.zeros(4))
    with pytest.raises(TypeError, match="text_features has dtype Double but image_features has dtype Float"):
        ssl_ops.siglip_loss(x, y.double(), s)
    with pytest.raises(TypeError, match="logit_scale must be a floating-point tensor, got dtype Long"):
        ssl_ops.siglip_loss(x, y, torch.tensor(10))
    with pytest.raises(ValueError, match=r"image_features must be a 2-D \(batch, features\) tensor"):
        ssl_ops.siglip_loss(torch.randn(8), y, s)
    with pytest.raises(ValueError, match="image_features is an empty batch"):
        ssl_ops.siglip_loss(torch.randn(0, 8), y, s)
    with pytest.raises(TypeError, match="logit_scale must be a tensor or a number"):
        ssl_ops.siglip_loss(x, y, "10")
    assert math.isfinite(ssl_ops.siglip_loss(x, y, 10.0).item())


@pytest.mark.parametrize("n,m", [(4, 5), (5, 4), (3, 6), (1, 3), (3, 1)])
def test_mismatched_batches_raise_as_in_open_clip(n, m):
    """One process, N images and M != N texts: open_clip's SigLipLoss fails on
    its (N x N) labels times the (N x M) logits, or with one row broadcasts
    them into a loss that means nothing; we raise, naming both sizes."""
    open_clip_loss = pytest.importorskip("open_clip.loss")
    x, y = features(n, m, 8, torch.float64, seed=n * 10 + m)
    scale, bias = scalar(10.0, torch.float64), scalar(-10.0, torch.float64)
    if n > 1 and m > 1:
        with pytest.raises(RuntimeError, match="must match"):
            open_clip_loss.SigLipLoss()(x, y, scale, bias)
    for call in (lambda: ssl_ops.siglip_loss(x, y, scale, bias),
                 lambda: ssl_ops.SigLipLoss()(x, y, scale, bias),
                 lambda: ssl_ops.SigLipLoss(gather_distributed=True)(x, y, scale, bias)):  # one process
        with pytest.raises(ValueError, match=f"image_features has {n} rows but text_features has {m}"):
            call()


def test_same_batches_match_open_clip():
    open_clip_loss = pytest.importorskip("open_clip.loss")
    x, y = features(7, 7, 8, torch.float64, seed=11)
    scale, bias = scalar(10.0, torch.float64), scalar(-10.0, torch.float64)
    ours = ssl_ops.siglip_loss(x, y, scale, bias)
    ours_grads = torch.autograd.grad(ours, [x, y, scale, bias])
    theirs = open_clip_loss.SigLipLoss()(x, y, scale, bias)
    theirs_grads = torch.autograd.grad(theirs, [x, y, scale, bias])
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    for a, b in zip(ours_grads, theirs_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("route", ["cpu", "emulated"])
@pytest.mark.parametrize("n,m,offset", [(4, 12, 0), (4, 12, 4), (4, 12, 8), (3, 7, 2)])
def test_gathered_texts_positive_offset(route, n, m, offset, monkeypatch):
    """The op's larger text set (what gather_distributed passes it): image i
    against all M texts, its positive text i + positive_offset, the loss over N."""
    x, y = features(n, m, 8, torch.float64, seed=m + offset)
    scale, bias = scalar(10.0, torch.float64), scalar(-10.0, torch.float64)
    with on_route(route, monkeypatch):
        loss, gx, gy, gs, gb = torch.ops.ssl_ops.siglip_loss(x, y, scale, bias, offset, True)
    ref = reference.siglip_loss(x, y, scale, bias, offset)
    want = torch.autograd.grad(ref, [x, y, scale, bias])
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-10, atol=1e-12)
    for got, w in zip((gx, gy, gs, gb), want):
        torch.testing.assert_close(got.reshape(w.shape), w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_features_go_to_the_tensor_cores_as_they_are(dtype, monkeypatch):
    """Issue 23: on CUDA, fp16/bf16 features enter the three GEMMs of each
    chunk in their own dtype (the tensor cores, fp32 accumulation: the
    emulator counts the half-operand GEMMs), G in the features' dtype; the
    result is open_clip's SigLipLoss within the dtype's tolerance. fp32
    features keep fp32 GEMMs."""
    open_clip_loss = pytest.importorskip("open_clip.loss")
    if not emulation.available():
        pytest.skip("the emulation module is not built")
    monkeypatch.setenv("SSL_OPS_SIGLIP_CHUNK_ELEMENTS", str(40 * 90))  # chunks of 40 rows: 3, the last partial
    x, y = features(90, 90, 24, dtype, seed=7)
    scale, bias = scalar(10.0), scalar(-10.0)
    module = emulation.load()
    before = module.half_gemm_count()
    with emulation.use_emulated_kernels():
        loss = ssl_ops.siglip_loss(x, y, scale, bias)
        grads = torch.autograd.grad(loss, [x, y, scale, bias])
    assert module.half_gemm_count() - before == 3 * 3  # S, d image, d text per chunk
    wide = [t.detach().double().requires_grad_() for t in (x, y, scale, bias)]
    theirs = open_clip_loss.SigLipLoss()(*wide)
    theirs_grads = torch.autograd.grad(theirs, wide)
    tol = rtol(dtype, length=90 + 24, logit_scale=10.0)
    assert_close(loss, theirs, tol, "loss")
    for name, a, b in zip(("image", "text", "scale", "bias"), grads, theirs_grads):
        assert a.dtype == (dtype if name in ("image", "text") else torch.float32)
        assert_close(a, b, tol, f"grad {name}")
    x32, y32 = (t.detach().float().requires_grad_() for t in (x, y))
    before = module.half_gemm_count()
    with emulation.use_emulated_kernels():
        ssl_ops.siglip_loss(x32, y32, scale, bias).backward()
    assert module.half_gemm_count() == before
