"""Row-wise cosine losses (BYOL, negative cosine similarity): the fused
cosine_rows operator on every backend against float64 F.cosine_similarity,
and the Python API against the reference and lightly."""

import pytest
import torch
import torch.nn.functional as F

import ssl_ops
from ssl_ops import reference
from tolerances import accumulator, assert_close, rows_below, rtol


def rand(shape, dtype, device, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)


def cosine64(a, b, eps):
    """The math, cos = a / max(||a||, eps) . b / max(||b||, eps), in float64 with
    F.normalize's clamp_min autograd (dcos/da = b_hat / eps below eps).
    F.cosine_similarity has the same values but differentiates the unclamped
    norm below eps (README, "Numerics")."""
    return (F.normalize(a, dim=1, eps=eps) * F.normalize(b, dim=1, eps=eps)).sum(1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("rows,d", [(0, 4), (1, 1), (3, 3), (9, 64), (17, 130)])
@pytest.mark.parametrize("eps", [1e-8, 1e-4])
def test_cosine_rows_op(backend, dtype, rows, d, eps):
    x0, x1 = rand((rows, d), torch.float64, "cpu", 1), rand((rows, d), torch.float64, "cpu", 2)
    if rows > 2:
        x0[1] = 0  # a zero row: clamped norm, finite
        if eps > 1e-8:  # one row clamped (norm 1e-5 < eps), one not (1e-3)
            x1[2] *= 1e-5 / x1[2].norm()
            x0[0] *= 1e-3 / x0[0].norm()
    x0, x1 = x0.to(dtype), x1.to(dtype)
    cos = backend.ops.cosine_rows(x0.to(backend.device), x1.to(backend.device), eps)
    a, b = x0.double().requires_grad_(), x1.double().requires_grad_()
    ref = cosine64(a, b, eps)
    assert cos.dtype == accumulator(dtype)
    # fp32 (fp64) products of the inputs as given, one fp32 result: no operand rounding.
    assert_close(cos, ref, rtol(dtype, cos.dtype, length=d, rounds_operands=False), "cos")
    if dtype == torch.float64 and rows:
        torch.testing.assert_close(ref, F.cosine_similarity(a, b, dim=1, eps=eps))
    grad = rand((rows,), torch.float64, "cpu", 3).to(cos.dtype).double()  # as the op gets it
    ga, gb = torch.autograd.grad((ref * grad).sum(), [a, b]) if rows else (a, b)
    g0, g1 = backend.ops.cosine_rows_backward(grad.to(cos.dtype).to(backend.device), x0.to(backend.device),
                                             x1.to(backend.device), eps, [True, True])
    tol = rtol(dtype, length=d, rounds_operands=False)
    for x, ours, theirs, name in ((x0, g0, ga, "grad x0"), (x1, g1, gb, "grad x1")):
        assert ours.dtype == dtype
        # At d = 1 the gradient cancels to 0: checked against g / ||x||, the terms that cancel.
        floor = (grad.abs() / x.double().norm(dim=1).clamp_min(eps)).max().item() if rows and d == 1 else 0.0
        assert_close(ours, theirs, tol, name, small_rows=rows_below(x, eps), floor=floor)
    only0 = backend.ops.cosine_rows_backward(grad.to(cos.dtype).to(backend.device), x0.to(backend.device),
                                            x1.to(backend.device), eps, [True, False])
    assert only0[1].numel() == 0 and torch.equal(only0[0], g0)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_byol_loss_matches_reference(reduction, dtype):
    p = rand((33, 256), dtype, "cpu", 4).requires_grad_()
    z = rand((33, 256), dtype, "cpu", 5)
    loss = ssl_ops.byol_loss(p, z, reduction=reduction)
    p64 = p.detach().double().requires_grad_()
    ref = reference.byol_loss(p64, z.double(), reduction)
    weight = torch.randn(ref.shape, dtype=torch.float64)
    (g,) = torch.autograd.grad((loss * weight.to(loss.dtype)).sum(), [p])
    (gr,) = torch.autograd.grad((ref * weight.to(loss.dtype).double()).sum(), [p64])
    # The loss is fp32 for bf16 inputs: an fp32 tolerance (plus the bf16 weight's rounding).
    assert loss.dtype == accumulator(dtype)
    assert_close(loss, ref, rtol(dtype, loss.dtype, length=256, rounds_operands=False), "loss")
    assert g.dtype == dtype
    assert_close(g, gr, rtol(dtype, length=256, rounds_operands=False), "grad p")


def test_byol_symmetrised_like_byol_code():
    # BYOL: 0.5 * (crit(p0, z1) + crit(p1, z0)) with detached targets; solo-learn's byol_loss_func.
    p0, p1 = rand((16, 32), torch.float64, "cpu", 6).requires_grad_(), rand((16, 32), torch.float64, "cpu", 7)
    z0, z1 = rand((16, 32), torch.float64, "cpu", 8), rand((16, 32), torch.float64, "cpu", 9)
    ours = 0.5 * (ssl_ops.byol_loss(p0, z1) + ssl_ops.byol_loss(p1, z0))
    solo = 0.5 * ((2 - 2 * F.cosine_similarity(p0, z1.detach()).mean()) + (2 - 2 * F.cosine_similarity(p1, z0).mean()))
    torch.testing.assert_close(ours, solo)


@pytest.mark.parametrize("shape,dim", [((8, 5), 1), ((8, 5), 0), ((4, 3, 6), -1), ((4, 3, 6), 1)])
def test_negative_cosine_similarity_matches_lightly(shape, dim):
    x0 = rand(shape, torch.float32, "cpu", 10).requires_grad_()
    x1 = rand(shape, torch.float32, "cpu", 11).requires_grad_()
    ours = ssl_ops.negative_cosine_similarity(x0, x1, dim=dim)
    g_ours = torch.autograd.grad(ours, [x0, x1])
    lightly_loss = pytest.importorskip("lightly.loss")
    theirs = lightly_loss.NegativeCosineSimilarity(dim=dim)(x0, x1)
    g_theirs = torch.autograd.grad(theirs, [x0, x1])
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    for a, b in zip(g_ours, g_theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_negative_cosine_similarity_broadcasts_and_eps():
    x0 = rand((6, 4), torch.float64, "cpu", 12)
    x1 = rand((1, 4), torch.float64, "cpu", 13)
    torch.testing.assert_close(
        ssl_ops.negative_cosine_similarity(x0, x1), reference.negative_cosine_similarity(x0, x1)
    )
    tiny = torch.tensor([[1e-5, 0.0]], dtype=torch.float64)
    far = torch.tensor([[3.0, 4.0]], dtype=torch.float64)
    torch.testing.assert_close(  # each norm clamped on its own, as F.cosine_similarity does
        ssl_ops.negative_cosine_similarity(tiny, far, eps=1e-4),
        reference.negative_cosine_similarity(tiny, far, eps=1e-4),
    )


@pytest.mark.parametrize("dim", [1, 0])
def test_api_gradients_use_eps(dim):
    """The autograd path passes the caller's eps to the backward op: rows of
    norm 1e-5 (clamped at eps = 1e-4) and 1e-3 (not), against the math."""
    x0 = rand((6, 5), torch.float64, "cpu", 14)
    x1 = rand((6, 5), torch.float64, "cpu", 15)
    x0[1] *= 1e-5 / x0[1].norm()
    x1[3] *= 1e-3 / x1[3].norm()
    x0, x1 = x0.movedim(0, dim).contiguous(), x1.movedim(0, dim).contiguous()
    a, b = x0.clone().requires_grad_(), x1.clone().requires_grad_()
    ours = ssl_ops.negative_cosine_similarity(a, b, dim=1 - dim, eps=1e-4)
    ra, rb = x0.clone().requires_grad_(), x1.clone().requires_grad_()
    ref = -cosine64(ra.movedim(dim, 0), rb.movedim(dim, 0), 1e-4).mean()
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=0)
    for g, r in zip(torch.autograd.grad(ours, [a, b]), torch.autograd.grad(ref, [ra, rb])):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=0)


def test_gradcheck_opcheck_and_compile():
    p = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    z = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: ssl_ops.byol_loss(a, b), (p, z))
    assert torch.autograd.gradcheck(lambda a, b: ssl_ops.negative_cosine_similarity(a, b, dim=0), (p, z))
    x0, x1 = torch.randn(6, 3, requires_grad=True), torch.randn(6, 3)
    torch.library.opcheck(torch.ops.ssl_ops.cosine_rows.default, (x0, x1, 1e-8))
    torch.library.opcheck(
        torch.ops.ssl_ops.cosine_rows_backward.default,
        (torch.randn(6), x0.detach(), x1, 1e-8, [True, True]),
        test_utils=("test_schema", "test_faketensor"),
    )
    torch._dynamo.reset()
    compiled = torch.compile(lambda a, b: ssl_ops.byol_loss(a, b), fullgraph=True, backend="aot_eager")
    loss = compiled(x0, x1)
    (g,) = torch.autograd.grad(loss, [x0])
    (g_eager,) = torch.autograd.grad(ssl_ops.byol_loss(x0, x1), [x0])
    torch.testing.assert_close(g, g_eager)


def test_bad_input():
    p = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"z has shape \(4, 6\) but p has shape \(4, 8\)"):
        ssl_ops.byol_loss(p, torch.randn(4, 6))
    with pytest.raises(ValueError, match=r"p must be a 2-D"):
        ssl_ops.byol_loss(torch.randn(8), torch.randn(8))
    with pytest.raises(ValueError, match="x0 and x1 must share dtype and device"):
        ssl_ops.negative_cosine_similarity(p, p.double())
    with pytest.raises(ValueError, match="do not broadcast"):
        ssl_ops.negative_cosine_similarity(p, torch.randn(3, 8))
    with pytest.raises(ValueError, match="dim 2 is out of range"):
        ssl_ops.negative_cosine_similarity(p, p, dim=2)
    with pytest.raises(ValueError, match="reduction must be one of"):
        ssl_ops.byol_loss(p, p, reduction="avg")
    with pytest.raises(TypeError, match="x1 has dtype Double but x0 has dtype Float"):
        torch.ops.ssl_ops.cosine_rows(p, p.double(), 1e-8)
