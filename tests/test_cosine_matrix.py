"""Cosine-similarity matrix on every backend (CPU, emulated CUDA, GPU) against
float64 F.cosine_similarity, with gradients, gradcheck, opcheck, compile and
bad input."""

import pytest
import torch
import torch.nn.functional as F

import ssl_ops
from ssl_ops import reference

TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


def rand(shape, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).to(device)


def reference64(a, b, eps=1e-8):
    a64 = a.detach().double().cpu().requires_grad_()
    b64 = None if b is None else b.detach().double().cpu().requires_grad_()
    other = a64 if b64 is None else b64
    return a64, b64, F.cosine_similarity(a64[:, None], other[None], dim=-1, eps=eps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("m,n,d", [(1, 1, 1), (3, 70, 3), (65, 1, 64), (130, 66, 130), (0, 5, 4), (300, 7, 520)])
@pytest.mark.parametrize("symmetric", [False, True], ids=["a-b", "a-a"])
def test_matrix_op(backend, dtype, m, n, d, symmetric):
    if d == 520 and backend.name.startswith("emu"):
        pytest.skip("the D >= 512 case is for the CPU kernel's symmetric-tile route; too slow emulated")
    a = rand((m, d), dtype, backend.device, 1)
    b = None if symmetric else rand((n, d), dtype, backend.device, 2)
    if m > 2:
        a[1] = 0  # zero row: clamped norm
    out = backend.ops.cosine_similarity_matrix(a, b, 1e-8)
    a64, b64, ref = reference64(a, b)
    assert out.dtype == dtype and out.shape == ref.shape
    torch.testing.assert_close(out.double().cpu(), ref.detach(), rtol=0, atol=TOL[dtype] * 4)
    if ref.numel() == 0:
        return
    grad = rand(tuple(ref.shape), torch.float64, "cpu", 3)
    inputs = [a64] + ([b64] if b64 is not None else [])
    ref_grads = torch.autograd.grad((ref * grad).sum(), inputs)
    grads = backend.ops.cosine_similarity_matrix_backward(
        grad.to(dtype).to(backend.device), a, b, 1e-8, [True, not symmetric]
    )
    for ours, theirs in zip(grads, ref_grads):
        assert ours.dtype == dtype and torch.isfinite(ours).all()
        keep = [r for r in range(theirs.shape[0]) if not (dtype == torch.float16 and theirs[r].abs().max() > 6e4)]
        scale = theirs[keep].abs().max().item()
        err = (ours.double().cpu()[keep] - theirs[keep]).abs().max().item()
        assert err <= TOL[dtype] * 8 * max(scale, 1.0) * max(1, d / 16)


@pytest.mark.parametrize("m,n,d", [(200, 150, 8), (200, None, 8), (1100, None, 520), (300, None, 520)])
def test_cpu_forward_routes(m, n, d):
    """Every route of the CPU forward (csrc/cpu/cosine_matrix.cpp): normalised
    copies when (M + N) D <= M N, else raw rows with the inverse norms in the
    epilogue; with b = None and D >= 512 either one on symmetric tiles."""
    a = rand((m, d), torch.float32, "cpu", 4)
    b = None if n is None else rand((n, d), torch.float32, "cpu", 5)
    out = torch.ops.ssl_ops.cosine_similarity_matrix(a, b, 1e-8)
    a_hat = F.normalize(a.double(), dim=1)
    ref = a_hat @ (a_hat if b is None else F.normalize(b.double(), dim=1)).t()
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=TOL[torch.float32] * 4)
    if b is None and d >= 512:  # symmetric tiles write each tile to both halves
        assert torch.equal(out, out.t())


def test_api_autograd_and_reference():
    a = torch.randn(40, 16, dtype=torch.float64, requires_grad=True)
    b = torch.randn(30, 16, dtype=torch.float64, requires_grad=True)
    out = ssl_ops.cosine_similarity_matrix(a, b)
    ref = reference.cosine_similarity_matrix(a, b)
    torch.testing.assert_close(out, ref)
    w = torch.randn_like(out)
    torch.testing.assert_close(
        torch.autograd.grad((out * w).sum(), [a, b]), torch.autograd.grad((ref * w).sum(), [a, b])
    )
    only_a = ssl_ops.cosine_similarity_matrix(a, b.detach())
    (ga,) = torch.autograd.grad(only_a.sum(), [a])
    assert ga.shape == a.shape
    sym = ssl_ops.cosine_similarity_matrix(a)
    torch.testing.assert_close(sym, sym.t())
    torch.testing.assert_close(
        torch.autograd.grad((sym * w[:, :1]).sum(), [a]),
        torch.autograd.grad((reference.cosine_similarity_matrix(a) * w[:, :1]).sum(), [a]),
    )


def test_gradcheck_opcheck_compile():
    a = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, y: ssl_ops.cosine_similarity_matrix(x, y), (a, b))
    assert torch.autograd.gradcheck(lambda x: ssl_ops.cosine_similarity_matrix(x), (a,))
    fa, fb = torch.randn(6, 4, requires_grad=True), torch.randn(7, 4, requires_grad=True)
    torch.library.opcheck(torch.ops.ssl_ops.cosine_similarity_matrix.default, (fa, fb, 1e-8))
    torch.library.opcheck(torch.ops.ssl_ops.cosine_similarity_matrix.default, (fa, None, 1e-8))
    torch.library.opcheck(
        torch.ops.ssl_ops.cosine_similarity_matrix_backward.default,
        (torch.randn(6, 7), fa.detach(), fb.detach(), 1e-8, [True, True]),
        test_utils=("test_schema", "test_faketensor"),
    )
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, y: ssl_ops.cosine_similarity_matrix(x, y).sum(), fullgraph=True,
                             backend="aot_eager")
    torch.testing.assert_close(
        torch.autograd.grad(compiled(fa, fb), [fa]), torch.autograd.grad(ssl_ops.cosine_similarity_matrix(fa, fb).sum(), [fa])
    )


def test_bad_input():
    a = torch.randn(4, 8)
    with pytest.raises(ValueError, match="b has 6 features but a has 8"):
        ssl_ops.cosine_similarity_matrix(a, torch.randn(3, 6))
    with pytest.raises(ValueError, match=r"a must be a 2-D"):
        ssl_ops.cosine_similarity_matrix(torch.randn(8))
    with pytest.raises(TypeError, match="b has dtype Double but a has dtype Float"):
        ssl_ops.cosine_similarity_matrix(a, a.double())
    with pytest.raises(ValueError, match="eps must be positive, got 0"):
        ssl_ops.cosine_similarity_matrix(a, eps=0.0)
    with pytest.raises(ValueError, match="a has no features"):
        ssl_ops.cosine_similarity_matrix(torch.randn(3, 0))
