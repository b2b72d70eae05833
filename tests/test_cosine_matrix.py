"""Cosine-similarity matrix on every backend (CPU, emulated CUDA, GPU) against
float64 F.cosine_similarity, with gradients, gradcheck, opcheck, compile and
bad input."""

import pytest
import torch
import torch.nn.functional as F

import ssl_ops
from ssl_ops import reference
from tolerances import assert_close, rows_below, rtol


def rand(shape, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).to(device)


def reference64(a, b, eps=1e-8):
    a64 = a.detach().double().cpu().requires_grad_()
    b64 = None if b is None else b.detach().double().cpu().requires_grad_()
    other = a64 if b64 is None else b64
    return a64, b64, F.cosine_similarity(a64[:, None], other[None], dim=-1, eps=eps)


# The CUDA routes (Note [Cosine matrix routes] and Note [Cosine self backward]
# in csrc/cuda/cosine_matrix.cu): each dtype's default, then each forced.
CUDA_ROUTES = {
    "default": {},
    "tiles+sum": {"SSL_OPS_CUDA_COSINE_MATRIX_ROUTE": "tiles", "SSL_OPS_CUDA_COSINE_SELF_BACKWARD": "sum"},
    "gemm+two": {"SSL_OPS_CUDA_COSINE_MATRIX_ROUTE": "gemm", "SSL_OPS_CUDA_COSINE_SELF_BACKWARD": "two_gemms"},
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
# (72, 136, 20): full and partial tiles whose rows take 16-byte stores (136 and 72
# are multiples of every vector width); the others store element by element.
@pytest.mark.parametrize(
    "m,n,d", [(1, 1, 1), (3, 70, 3), (65, 1, 64), (130, 66, 130), (72, 136, 20), (0, 5, 4), (300, 7, 520)]
)
@pytest.mark.parametrize("symmetric", [False, True], ids=["a-b", "a-a"])
@pytest.mark.parametrize("route", list(CUDA_ROUTES))
def test_matrix_op(backend, dtype, m, n, d, symmetric, route, monkeypatch):
    if d == 520 and backend.name.startswith("emu"):
        pytest.skip("the D >= 512 case is for the CPU kernel's symmetric-tile route; too slow emulated")
    if route != "default" and backend.name == "cpu":
        pytest.skip("CUDA routes")
    for name, value in CUDA_ROUTES[route].items():
        monkeypatch.setenv(name, value)
    a = rand((m, d), dtype, backend.device, 1)
    b = None if symmetric else rand((n, d), dtype, backend.device, 2)
    if m > 2:
        a[1] = 0  # zero row: clamped norm
    out = backend.ops.cosine_similarity_matrix(a, b, 1e-8)
    a64, b64, ref = reference64(a, b)
    assert out.dtype == dtype and out.shape == ref.shape
    # fp16/bf16 take the tiles by default: raw rows into fp32 products, both
    # inverse norms in the epilogue, no operand rounding. fp32/fp64 round their
    # normalised rows in their own precision, within the accumulator's error.
    rounds = route == "gemm+two" and dtype in (torch.float16, torch.bfloat16)
    assert_close(out, ref, rtol(dtype, length=d, rounds_operands=rounds), "C")
    if symmetric and (route == "tiles+sum" or (route == "default" and dtype in (torch.float16, torch.bfloat16))):
        # Each off-diagonal tile is written to both halves: equal bit for bit there.
        # (Inside a diagonal tile (i, j) and (j, i) are separate sums, which
        # tensor cores may order differently.)
        tile = 32 if dtype == torch.float64 else 64
        blocks = torch.arange(m) // tile
        off_diagonal = blocks[:, None] != blocks[None, :]
        assert torch.equal(out.cpu()[off_diagonal], out.cpu().t()[off_diagonal])
    if ref.numel() == 0:
        return
    grad = rand(tuple(ref.shape), torch.float64, "cpu", 3).to(dtype).double()  # as the op gets it
    inputs = [a64] + ([b64] if b64 is not None else [])
    ref_grads = torch.autograd.grad((ref * grad).sum(), inputs)
    grads = backend.ops.cosine_similarity_matrix_backward(
        grad.to(dtype).to(backend.device), a, b, 1e-8, [True, not symmetric]
    )
    assert len(grads) == 2 and (symmetric or grads[1].numel() == b.numel())
    # g = dC . b_hat sums over the other side's rows, then d features per row.
    tol = rtol(dtype, length=d + max(m, n), rounds_operands=True)
    for x, ours, theirs, name in zip((a, b), grads, ref_grads, ("grad a", "grad b")):
        assert ours.dtype == dtype
        # At d = 1 the gradient cancels to 0: checked against the terms that cancel, |dC| / ||x||.
        floor = 0.0
        if d == 1:
            floor = (grad.abs().sum() / x.double().cpu().norm(dim=1).clamp_min(1e-8).min()).item()
        assert_close(ours, theirs, tol, name, small_rows=rows_below(x, 1e-8), floor=floor)


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
    assert_close(out, ref, rtol(torch.float32, length=d, rounds_operands=False), "C")
    if b is None and d >= 512:  # symmetric tiles write each tile to both halves
        assert torch.equal(out, out.t())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("symmetric", [False, True], ids=["a-b", "a-a"])
def test_matrix_eps_below_and_above_row_norms(backend, dtype, symmetric):
    """eps = 1e-4 with rows of norm 1e-5 (clamped: C = a . b_hat / eps, so
    dC/da = b_hat / eps) and 1e-3 (not clamped). The oracle is the math,
    F.normalize's clamp_min autograd; F.cosine_similarity's autograd differs
    below eps (it differentiates the unclamped norm), which README says."""
    eps = 1e-4
    a = rand((9, 6), torch.float64, "cpu", 6)
    b = None if symmetric else rand((7, 6), torch.float64, "cpu", 7)
    a[2] *= 1e-5 / a[2].norm()
    a[5] *= 1e-3 / a[5].norm()
    if b is not None:
        b[3] *= 1e-5 / b[3].norm()
    a, b = a.to(dtype), None if b is None else b.to(dtype)
    out = backend.ops.cosine_similarity_matrix(a.to(backend.device), None if b is None else b.to(backend.device), eps)
    a64 = a.double().requires_grad_()
    b64 = None if b is None else b.double().requires_grad_()
    ref = reference.cosine_similarity_matrix(a64, b64, eps=eps)
    assert_close(out, ref, rtol(dtype, length=6, rounds_operands=False), "C")
    grad = rand(tuple(ref.shape), torch.float64, "cpu", 8)
    inputs = [a64] + ([b64] if b is not None else [])
    ref_grads = torch.autograd.grad((ref * grad).sum(), inputs)
    grads = backend.ops.cosine_similarity_matrix_backward(
        grad.to(dtype).to(backend.device), a.to(backend.device), None if b is None else b.to(backend.device),
        eps, [True, not symmetric],
    )
    tol = rtol(dtype, length=6 + 9)
    for x, ours, theirs, name in zip((a, b), grads, ref_grads, ("grad a", "grad b")):
        assert_close(ours, theirs, tol, name, small_rows=rows_below(x, eps))
    if dtype == torch.float64 and not symmetric:  # F.cosine_similarity: same values, other gradient below eps
        c = F.cosine_similarity(a64[:, None], b64[None], dim=-1, eps=eps)
        torch.testing.assert_close(c, ref)
        (autograd_ga,) = torch.autograd.grad((c * grad).sum(), [a64])
        assert not torch.allclose(autograd_ga[2], ref_grads[0][2])
        torch.testing.assert_close(autograd_ga[5], ref_grads[0][5])


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


@pytest.mark.parametrize("broadcast", ["scalar", "rows", "columns"])
@pytest.mark.parametrize("symmetric", [False, True], ids=["a-b", "a-a"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_backward_with_a_broadcast_upstream_gradient(backend, broadcast, symmetric, dtype):
    """out.sum() and per-row or per-column weights give an expanded dC (stride 0
    along a dimension): rank one, which the CPU kernel forms without a GEMM."""
    m, n, d = 37, 29, 16
    a = rand((m, d), dtype, backend.device, 12)
    a[3] = 0
    b = None if symmetric else rand((n, d), dtype, backend.device, 13)
    n = m if symmetric else n
    w = rand((max(m, n),), torch.float64, "cpu", 14)
    dense = {"scalar": torch.full((m, n), 0.7, dtype=torch.float64), "rows": w[:m, None].expand(m, n),
             "columns": w[None, :n].expand(m, n)}[broadcast]
    expanded = {"scalar": torch.tensor(0.7, dtype=dtype).expand(m, n), "rows": w[:m, None].to(dtype).expand(m, n),
                "columns": w[None, :n].to(dtype).expand(m, n)}[broadcast].to(backend.device)
    a64, b64, ref = reference64(a, b)
    inputs = [a64] + ([b64] if b64 is not None else [])
    ref_grads = torch.autograd.grad((ref * dense.to(dtype).double()).sum(), inputs)
    grads = backend.ops.cosine_similarity_matrix_backward(expanded, a, b, 1e-8, [True, not symmetric])
    tol = rtol(dtype, length=d + max(m, n), rounds_operands=False)
    for x, ours, theirs, name in zip((a, b), grads, ref_grads, ("grad a", "grad b")):
        assert_close(ours, theirs, tol, name, small_rows=rows_below(x, 1e-8))


@pytest.mark.parametrize("symmetric", [False, True], ids=["a-b", "a-a"])
def test_api_gradients_use_eps(symmetric):
    """The autograd path passes the caller's eps to the backward op."""
    a = rand((7, 5), torch.float64, "cpu", 9)
    a[2] *= 1e-5 / a[2].norm()
    a[4] *= 1e-3 / a[4].norm()
    b = None if symmetric else rand((6, 5), torch.float64, "cpu", 10)
    ours_in = [a.clone().requires_grad_()] + ([] if b is None else [b.clone().requires_grad_()])
    ref_in = [t.clone().requires_grad_() for t in ours_in]
    ours = ssl_ops.cosine_similarity_matrix(*ours_in, eps=1e-4)
    ref = reference.cosine_similarity_matrix(*ref_in, eps=1e-4)
    w = rand(tuple(ref.shape), torch.float64, "cpu", 11)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-15)
    for g, r in zip(torch.autograd.grad((ours * w).sum(), ours_in), torch.autograd.grad((ref * w).sum(), ref_in)):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=0)


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


@pytest.mark.emu
def test_more_rows_than_a_grid_y_could_hold(monkeypatch):
    # The CUDA kernel once put row tiles on grid.y: at most 65535 tiles of 64 rows
    # (4,194,240). The emulator runs only the last 3 blocks of each launch: the
    # denominators of the last 22 rows (8 per block; the last block has 6) and
    # the last tiles, past that limit. D = 1: each cosine is a product of signs.
    from conftest import make_backend
    from ssl_ops import emulation

    backend = make_backend(("emu", 0))
    monkeypatch.setenv("SSL_OPS_CUDA_COSINE_MATRIX_ROUTE", "tiles")
    m = 65535 * 64 + 70  # 65537 row tiles, one column tile
    a = rand((m, 1), torch.float32, "cpu", 1)
    b = rand((3, 1), torch.float32, "cpu", 2)
    emulation.load().set_block_tail(3)
    try:
        out = backend.ops.cosine_similarity_matrix(a, b[:1], 1e-8)  # b: one block of denominators
    finally:
        emulation.load().set_block_tail(0)
    assert torch.equal(out[-22:], a[-22:].sign() * b[:1].sign().t())


@pytest.mark.emu
@pytest.mark.parametrize("dtype,rows", [(torch.float32, 4_194_241), (torch.float64, 2_097_121)], ids=str)
def test_tiles_past_one_launch_are_refused_before_allocating(dtype, rows, monkeypatch):
    """b = None on the tiles: 65536 row tiles make 2,147,516,416 upper-triangle
    tiles, one past what grid.x takes; refused before the rows' norms or the
    output. One row fewer passes the check and fails only where the output
    (70 TB) is allocated."""
    from conftest import make_backend
    from ssl_ops import emulation

    backend = make_backend(("emu", 0))
    monkeypatch.setenv("SSL_OPS_CUDA_COSINE_MATRIX_ROUTE", "tiles")
    launches = emulation.load().launch_count()
    with pytest.raises(RuntimeError, match=f"a {rows} x {rows} output is 2147516416 tiles, more than one CUDA launch"):
        backend.ops.cosine_similarity_matrix(torch.ones(rows, 1, dtype=dtype), None, 1e-8)
    fewer = rows - 1
    with pytest.raises(RuntimeError) as allocation:
        backend.ops.cosine_similarity_matrix(torch.ones(fewer, 1, dtype=dtype), None, 1e-8)
    assert "tiles" not in str(allocation.value)
    assert emulation.load().launch_count() == launches  # no kernel ran
