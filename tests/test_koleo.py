"""KoLeo (ssl_ops.koleo_loss, KoLeoLoss; issue 24's KoLeo item) against
lightly's KoLeoLoss and dinov2's formula in float64, fp16/bf16 rows with
duplicates (where the half-precision form gives inf), one row, gradcheck,
compile and bad input."""

import pytest
import torch
import torch.nn.functional as F

import ssl_ops
from tolerances import assert_close, rtol


def rows(n, d, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_()


def dinov2_formula(x, eps=1e-8):
    """dinov2/loss/koleo_loss.py written out: the diagonal of the cosines set
    to -1, the max as the neighbour, PairwiseDistance(2, eps) and
    -log(d + eps).mean()."""
    x = F.normalize(x, eps=eps, p=2, dim=-1)
    with torch.no_grad():
        dots = x @ x.t()
        n = x.shape[0]
        dots.view(-1)[:: (n + 1)].fill_(-1)
        _, neighbour = torch.max(dots, dim=1)
    distances = torch.nn.PairwiseDistance(2, eps=eps)(x, x[neighbour])
    return -torch.log(distances + eps).mean()


@pytest.mark.parametrize("n,d", [(2, 5), (7, 3), (33, 16), (9, 1)])
def test_matches_lightly_and_dinov2(n, d):
    lightly_loss = pytest.importorskip("lightly.loss.koleo_loss")
    x = rows(n, d, seed=n + d)
    ours = ssl_ops.koleo_loss(x)
    (grad,) = torch.autograd.grad(ours, [x])
    for oracle in (lightly_loss.KoLeoLoss(), dinov2_formula):
        xr = x.detach().clone().requires_grad_()
        theirs = oracle(xr)
        (theirs_grad,) = torch.autograd.grad(theirs, [xr])
        tol = rtol(torch.float64, length=d)
        assert_close(ours, theirs, tol, "loss")
        assert_close(grad, theirs_grad, tol, "grad")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_rows_with_duplicates_stay_finite(dtype):
    """Two identical rows (a duplicated image): in fp16 the half-precision form
    sums 0 + 1e-8, which rounds to 0, and gives inf; ours measures in float32
    and matches float64 on the same values."""
    x = rows(16, 32, seed=3, dtype=torch.float64).detach()
    x[5] = x[4]
    x = x.to(dtype).requires_grad_()
    ours = ssl_ops.koleo_loss(x)
    (grad,) = torch.autograd.grad(ours, [x])
    assert ours.dtype == torch.float32 and torch.isfinite(ours) and torch.isfinite(grad).all()
    wide = x.detach().double().requires_grad_()
    expected = ssl_ops.koleo_loss(wide)
    (expected_grad,) = torch.autograd.grad(expected, [wide])
    assert_close(ours, expected, rtol(torch.float32, length=32), "loss")
    # The duplicated pair's gradient is 0 in exact arithmetic, the sum of terms
    # of size 1 / (D eps) that cancel; the other rows' must match.
    others = [i for i in range(16) if i not in (4, 5)]
    assert_close(grad[others], expected_grad[others], rtol(torch.float32, dtype, length=32), "grad")
    if dtype == torch.float16:
        assert not torch.isfinite(dinov2_formula(x.detach()))  # the half-precision form fails here


def test_one_row_is_lightlys_answer():
    """Alone, a row is its own neighbour: lightly's value, -log(sqrt(D) eps + eps)."""
    x = rows(1, 4, seed=4)
    expected = -torch.log(torch.tensor(2 * 1e-8 + 1e-8, dtype=torch.float64))
    torch.testing.assert_close(ssl_ops.koleo_loss(x), expected)


def test_module_and_compat():
    from ssl_ops.compat import lightly as compat

    x = rows(6, 3, seed=5)
    assert compat.KoLeoLoss is ssl_ops.KoLeoLoss
    torch.testing.assert_close(ssl_ops.KoLeoLoss(p=2, eps=1e-6)(x), ssl_ops.koleo_loss(x, 2, 1e-6))


def test_gradcheck_and_compile():
    x = rows(8, 5, seed=6)
    assert torch.autograd.gradcheck(ssl_ops.koleo_loss, (x,))
    compiled = torch.compile(ssl_ops.koleo_loss, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), ssl_ops.koleo_loss(x))


@pytest.mark.parametrize("bad", [torch.zeros(0, 3), torch.zeros(4), torch.zeros(3, 2, dtype=torch.int64)])
def test_bad_input_is_named(bad):
    with pytest.raises(ValueError, match="koleo_loss: x must be"):
        ssl_ops.koleo_loss(bad)
