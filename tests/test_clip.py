"""CLIP's symmetric InfoNCE (ssl_ops.clip_loss, ClipLoss, info_nce_loss
symmetric; issue 23) against open_clip's ClipLoss formula in float64: values
and the gradients of both features and the scale, on the CPU kernel and the
CUDA source under the emulator; chunk edges; CLIP's scale of 100 on
unnormalised rows; half features on the tensor cores; the GEMM count; gradcheck,
opcheck, compile and bad input."""

import pytest
import torch
import torch.nn.functional as F

import ssl_ops
from ssl_ops import emulation
from routes import route as on_route
from tolerances import assert_close, cancellation_floor, rtol


def features(b, d, dtype, seed=0, normalize=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, generator=g, dtype=torch.float64)
    y = torch.randn(b, d, generator=g, dtype=torch.float64)
    if normalize:  # as CLIP's towers give them
        x, y = F.normalize(x, dim=1), F.normalize(y, dim=1)
    return x.to(dtype).requires_grad_(), y.to(dtype).requires_grad_()


def scalar(value, dtype=torch.float32):
    return torch.tensor(value, dtype=dtype, requires_grad=True)


def open_clip_formula(x, y, scale, reduction="mean"):
    """open_clip's ClipLoss in one process, written out."""
    logits = scale * x @ y.t()
    labels = torch.arange(x.shape[0])
    return (F.cross_entropy(logits, labels, reduction=reduction)
            + F.cross_entropy(logits.t(), labels, reduction=reduction)) / 2


def check(x, y, scale, dtype, reduction="mean"):
    loss = ssl_ops.clip.symmetric_info_nce(x, y, scale, reduction)
    grads = torch.autograd.grad(loss, [x, y, scale])
    wide = [t.detach().double().requires_grad_() for t in (x, y, scale)]
    ref = open_clip_formula(*wide, reduction)
    ref_grads = torch.autograd.grad(ref, wide)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    s = abs(float(scale.detach()))
    tol = rtol(dtype, length=x.shape[0] + x.shape[1], logit_scale=s)
    # One row (the loss is 0) or one feature (every cosine is +-1): the results
    # cancel to about 0 from terms of the logits' size.
    degenerate = x.shape[0] == 1 or x.shape[1] == 1
    floors = (cancellation_floor(s), cancellation_floor(s, (x,)), cancellation_floor(s, (y,)), 1.0)
    assert_close(loss, ref.detach(), tol, "loss", floor=floors[0] if degenerate else 0.0)
    for i, (name, a, b) in enumerate(zip(("query", "key", "scale"), grads, ref_grads)):
        assert a.dtype == (dtype if name != "scale" else scale.dtype)
        assert_close(a, b, tol, f"grad {name}", floor=floors[i + 1] if degenerate else 0.0)


@pytest.mark.parametrize("route", ["cpu", "emulated"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("b,d", [(1, 4), (2, 1), (7, 3), (33, 16), (130, 65)])
@pytest.mark.parametrize("scale", [14.3, 100.0])
def test_matches_open_clip_formula(route, dtype, b, d, scale, monkeypatch):
    """Chunks of 5 rows, the last partial: the columns' statistics merge over chunks."""
    monkeypatch.setenv("SSL_OPS_CONTRASTIVE_CHUNK_ELEMENTS", str(5 * b))
    x, y = features(b, d, dtype, seed=b + d)
    param = torch.float64 if dtype == torch.float64 else torch.float32
    with on_route(route, monkeypatch):
        check(x, y, scalar(scale, param), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("b,d,chunk_rows", [(1, 3, 1), (9, 5, 4), (70, 33, 16)])
def test_kernel_against_float64(backend, dtype, b, d, chunk_rows, monkeypatch):
    """The op itself on each backend (the emulator under every schedule seed,
    and under ASan in the full tier): loss and the three gradients it forms
    in the forward, for grad_loss = 1, reduction sum."""
    monkeypatch.setenv("SSL_OPS_CONTRASTIVE_CHUNK_ELEMENTS", str(chunk_rows * b))
    x, y = (t.detach().to(backend.device) for t in features(b, d, dtype, seed=b * d))
    scale = torch.tensor(40.0, dtype=torch.float64 if dtype == torch.float64 else torch.float32, device=x.device)
    loss, grad_x, grad_y, grad_scale = backend.ops.contrastive_clip_loss(x, y, scale, 2, True)
    wide = [t.detach().double().cpu().requires_grad_() for t in (x, y, scale)]
    ref = open_clip_formula(*wide, reduction="sum")
    ref_grads = torch.autograd.grad(ref, wide)
    tol = rtol(dtype, length=b + d, logit_scale=40.0)
    degenerate = b == 1
    assert_close(loss, ref.detach(), tol, "loss", floor=cancellation_floor(40.0) if degenerate else 0.0)
    for name, a, r in zip(("query", "key", "scale"), (grad_x, grad_y, grad_scale), ref_grads):
        floor = cancellation_floor(40.0, (x,)) if degenerate else 0.0
        assert_close(a, r, tol, f"grad {name}", floor=floor)


@pytest.mark.parametrize("route", ["cpu", "emulated"])
@pytest.mark.parametrize("chunk_rows", [1, 8, 64])
def test_one_chunk_or_many_agree(route, chunk_rows, monkeypatch):
    """64 rows in chunks of 1, 8 or all (S kept for the gradient), sum reduction."""
    monkeypatch.setenv("SSL_OPS_CONTRASTIVE_CHUNK_ELEMENTS", str(chunk_rows * 64))
    x, y = features(64, 24, torch.float32, seed=3)
    with on_route(route, monkeypatch):
        check(x, y, scalar(20.0), torch.float32, reduction="sum")


@pytest.mark.parametrize("route", ["cpu", "emulated"])
def test_unnormalised_rows_at_clips_scale_stay_finite(route, monkeypatch):
    """Logits in the hundreds, rows whose every logit is far below another
    row's: no bound is assumed, every row and column is shifted by its own
    maximum."""
    monkeypatch.setenv("SSL_OPS_CONTRASTIVE_CHUNK_ELEMENTS", str(7 * 40))
    x, y = features(40, 8, torch.float32, seed=4, normalize=False)
    with torch.no_grad():
        x[3] *= 20.0  # row 3's logits reach the thousands
    with on_route(route, monkeypatch):
        loss = ssl_ops.clip.symmetric_info_nce(x, y, scalar(100.0))
        grads = torch.autograd.grad(loss, [x, y])
    wide = [t.detach().double().requires_grad_() for t in (x, y)]
    ref = open_clip_formula(*wide, torch.tensor(100.0, dtype=torch.float64))
    ref_grads = torch.autograd.grad(ref, wide)
    assert torch.isfinite(loss)
    tol = rtol(torch.float32, length=48, logit_scale=100.0 * 20 * 4)  # |logit| up to ~ 8000
    assert_close(loss, ref.detach(), tol, "loss")
    for a, b in zip(grads, ref_grads):
        assert_close(a, b, tol, "grad")


def test_open_clips_cliploss_itself():
    open_clip_loss = pytest.importorskip("open_clip.loss")
    x, y = features(29, 12, torch.float32, seed=5)
    scale = scalar(30.0)
    ours = ssl_ops.ClipLoss()(x, y, scale, output_dict=True)["contrastive_loss"]
    ours_grads = torch.autograd.grad(ours, [x, y, scale])
    wide = [t.detach().double().requires_grad_() for t in (x, y, scale)]
    theirs = open_clip_loss.ClipLoss()(*wide)
    theirs_grads = torch.autograd.grad(theirs, wide)
    tol = rtol(torch.float32, length=41, logit_scale=30.0)
    assert_close(ours, theirs, tol, "loss")
    for a, b in zip(ours_grads, theirs_grads):
        assert_close(a, b, tol, "grad")


def test_logit_bias_changes_nothing_and_gets_zero_gradient():
    x, y = features(9, 6, torch.float32, seed=6)
    bias = torch.tensor(-3.0, requires_grad=True)
    with_bias = ssl_ops.clip_loss(x, y, 10.0, bias)
    torch.testing.assert_close(with_bias, ssl_ops.clip_loss(x, y, 10.0))
    (grad,) = torch.autograd.grad(with_bias, [bias])
    assert grad.item() == 0.0


@pytest.mark.parametrize("route", ["cpu", "emulated"])
def test_info_nce_symmetric_takes_the_joint_op(route, monkeypatch):
    """info_nce_loss(symmetric=True) normalises and runs one joint call; it is
    the mean of the two directions' losses."""
    x, y = features(37, 10, torch.float32, seed=7, normalize=False)
    with on_route(route, monkeypatch):
        loss = ssl_ops.info_nce_loss(x, y, temperature=0.1, symmetric=True)
        grads = torch.autograd.grad(loss, [x, y])
    wide = [t.detach().double().requires_grad_() for t in (x, y)]
    ref = ssl_ops.reference.info_nce_loss(*wide, temperature=0.1, symmetric=True)
    ref_grads = torch.autograd.grad(ref, wide)
    tol = rtol(torch.float32, length=47, logit_scale=10.0)
    assert_close(loss, ref.detach(), tol, "loss")
    for a, b in zip(grads, ref_grads):
        assert_close(a, b, tol, "grad")
    per_row = ssl_ops.info_nce_loss(x, y, temperature=0.1, symmetric=True, reduction="none")
    assert_close(per_row.mean(), ref.detach(), tol, "per-row mean")


def gemm_equivalents(fn, b, d):
    """The multiply-adds of fn's aten::mm / addmm / addmm_ calls (from their
    recorded shapes: the profiler counts no FLOPs for addmm_), in units of b^2 d."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    first_operand = {"aten::mm": 0, "aten::addmm": 1, "aten::addmm_": 1}
    macs = 0
    for e in prof.events():
        if e.name in first_operand:
            (m, k), (_, n) = e.input_shapes[first_operand[e.name]:first_operand[e.name] + 2]
            macs += m * k * n
    return macs / (b * b * d)


@pytest.mark.parametrize("route", ["cpu", "emulated"])
def test_four_gemm_equivalents_where_two_calls_take_six(route, monkeypatch):
    """The issue's profile: B = 512, D = 64, forward+backward. Many chunks: S,
    then S again with d query and d key per chunk (4); one chunk keeps S (3)."""
    b, d = 512, 64
    x, y = features(b, d, torch.float32, seed=8)
    scale = scalar(14.3)

    def step():
        torch.autograd.grad(ssl_ops.clip_loss(x, y, scale), [x, y, scale])

    def two_calls():
        loss = (ssl_ops.info_nce_loss(x, y, temperature=0.07, normalize=False)
                + ssl_ops.info_nce_loss(y, x, temperature=0.07, normalize=False)) / 2
        torch.autograd.grad(loss, [x, y])

    with on_route(route, monkeypatch):
        monkeypatch.setenv("SSL_OPS_CONTRASTIVE_CHUNK_ELEMENTS", str(64 * b))
        chunked = gemm_equivalents(step, b, d)
        monkeypatch.setenv("SSL_OPS_CONTRASTIVE_CHUNK_ELEMENTS", str(b * b))
        whole = gemm_equivalents(step, b, d)
        if route == "emulated":
            monkeypatch.setenv("SSL_OPS_CUDA_CONTRASTIVE_ROUTE", "gemm")
            monkeypatch.setenv("SSL_OPS_CONTRASTIVE_CHUNK_ELEMENTS", str(64 * b))
            before = gemm_equivalents(two_calls, b, d)
            assert before >= 6 - 1e-9, before
    assert abs(chunked - 4) < 1e-9, chunked
    assert abs(whole - 3) < 1e-9, whole


def test_memory_is_never_b_by_b():
    """B = 12288: the logits alone are 576 MB; the CPU keeps S whole only up
    to 2^26 similarities, so here it takes chunks of 2^24 (64 MB)."""
    common = pytest.importorskip("benchmarks.common")
    x, y = features(12288, 32, torch.float32, seed=15)
    scale = scalar(14.3)

    def run():
        torch.autograd.grad(ssl_ops.clip_loss(x, y, scale), [x, y, scale])

    run()  # warm the allocator and the thread pool first
    extra = common.peak_extra_bytes_here(run)
    assert extra < 160 * 2**20, f"forward + backward added {extra / 2**20:.1f} MB"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_features_go_to_the_tensor_cores_as_they_are(dtype, monkeypatch):
    """CUDA: fp16/bf16 features enter every GEMM in their own dtype (the
    emulator counts half-operand GEMMs): 4 per chunk after the first pass."""
    open_clip_loss = pytest.importorskip("open_clip.loss")
    if not emulation.available():
        pytest.skip("the emulation module is not built")
    monkeypatch.setenv("SSL_OPS_CONTRASTIVE_CHUNK_ELEMENTS", str(40 * 90))  # 3 chunks, the last partial
    x, y = features(90, 24, dtype, seed=9)
    scale = scalar(50.0)
    module = emulation.load()
    before = module.half_gemm_count()
    with emulation.use_emulated_kernels():
        loss = ssl_ops.clip_loss(x, y, scale)
        grads = torch.autograd.grad(loss, [x, y, scale])
    assert module.half_gemm_count() - before == 3 * 4  # S; S again, d query, d key per chunk
    wide = [t.detach().double().requires_grad_() for t in (x, y, scale)]
    theirs = open_clip_loss.ClipLoss()(*wide)
    theirs_grads = torch.autograd.grad(theirs, wide)
    tol = rtol(dtype, length=90 + 24, logit_scale=50.0)
    assert_close(loss, theirs, tol, "loss")
    for name, a, b in zip(("image", "text", "scale"), grads, theirs_grads):
        assert a.dtype == (dtype if name != "scale" else torch.float32)
        assert_close(a, b, tol, f"grad {name}")


@pytest.mark.parametrize("route", ["cpu", "emulated"])
def test_gradcheck(route, monkeypatch):
    monkeypatch.setenv("SSL_OPS_CONTRASTIVE_CHUNK_ELEMENTS", str(3 * 7))
    x, y = features(7, 5, torch.float64, seed=10, normalize=False)
    scale = scalar(3.0, torch.float64)
    with on_route(route, monkeypatch):
        for reduction in ("mean", "sum"):
            assert torch.autograd.gradcheck(
                lambda a, b, s: ssl_ops.clip.symmetric_info_nce(a, b, s, reduction), (x, y, scale))


def test_upstream_gradient_scales_the_gradients():
    """The forward forms the gradients for grad_loss = 1; the backward scales them."""
    x, y = features(12, 5, torch.float32, seed=16)
    scale = scalar(20.0)
    once = torch.autograd.grad(ssl_ops.clip_loss(x, y, scale), [x, y, scale])
    thrice = torch.autograd.grad(3 * ssl_ops.clip_loss(x, y, scale), [x, y, scale])
    for a, b in zip(thrice, once):
        torch.testing.assert_close(a, 3 * b)


def test_opcheck():
    x, y = features(11, 6, torch.float32, seed=11)
    scale = scalar(10.0)
    for reduction, grad in ((1, True), (2, True), (1, False)):
        torch.library.opcheck(torch.ops.ssl_ops.contrastive_clip_loss, (x, y, scale, reduction, grad))


def test_compile_fullgraph():
    x, y = features(16, 8, torch.float32, seed=12)
    scale = scalar(20.0)
    compiled = torch.compile(ssl_ops.clip_loss, fullgraph=True, backend="aot_eager")
    loss = compiled(x, y, scale)
    grads = torch.autograd.grad(loss, [x, y, scale])
    expected = ssl_ops.clip_loss(x, y, scale)
    torch.testing.assert_close(loss, expected)
    for a, b in zip(grads, torch.autograd.grad(expected, [x, y, scale])):
        torch.testing.assert_close(a, b)


def test_no_grad_forms_no_gradient_and_backward_recomputes():
    x, y = features(10, 4, torch.float32, seed=13)
    with torch.no_grad():
        value = ssl_ops.clip_loss(x, y, 10.0)
    torch.testing.assert_close(value, ssl_ops.clip_loss(x, y, 10.0).detach())
    out = torch.ops.ssl_ops.contrastive_clip_loss(x.detach(), y.detach(), torch.tensor(10.0), 1, False)
    assert all(t.numel() == 0 for t in out[1:])


@pytest.mark.parametrize("call,match", [
    (lambda x, y, s: torch.ops.ssl_ops.contrastive_clip_loss(x, y, s, 0, True), "reduction must be 1"),
    (lambda x, y, s: torch.ops.ssl_ops.contrastive_clip_loss(x, y[:3], s, 1, True), "as many rows"),
    (lambda x, y, s: torch.ops.ssl_ops.contrastive_clip_loss(x, y, torch.ones(2), 1, True), "scale must be a scalar"),
    (lambda x, y, s: torch.ops.ssl_ops.contrastive_clip_loss(x, y.double(), s, 1, True), "dtype"),
    (lambda x, y, s: ssl_ops.clip_loss(x, y[:, :2], s), "shape"),
    (lambda x, y, s: ssl_ops.clip_loss(x[:0], y[:0], s), "empty batch"),
    (lambda x, y, s: ssl_ops.clip.symmetric_info_nce(x, y, s, "none"), "'mean' or 'sum'"),
    (lambda x, y, s: ssl_ops.ClipLoss(use_horovod=True), "horovod"),
])
def test_bad_input_names_the_argument(call, match):
    x, y = features(5, 4, torch.float32, seed=14)
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        call(x.detach(), y.detach(), torch.tensor(10.0))
