"""DCL and DCLW (ssl_ops.dcl_loss, DCLLoss, DCLWLoss; issue 15) against the
float64 formula written out, against lightly's own classes where lightly is
installed, on the CPU kernels and the emulated CUDA route; gradcheck, opcheck,
compile and bad input."""

import functools
import warnings

import pytest
import torch
import torch.nn.functional as F

import ssl_ops
from ssl_ops import reference
from ssl_ops.compat import lightly as compat
from routes import route
from tolerances import assert_close, cancellation_floor, rtol

ROUTES = ["cpu", "emulated", "emulated-gemm"]
EXCLUDED = 2  # the op's positives argument: positives left out entirely


def views(n, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_() for _ in range(2)]


def dcl_formula(out0, out1, temperature, weight_fn=None):
    """ssl_ops.reference.dcl_loss (lightly's computation) in float64."""
    return reference.dcl_loss(out0.double(), out1.double(), temperature, weight_fn)


def vmf(a, b, sigma=0.5):
    return 2 - a.shape[0] * F.softmax((a.detach() * b.detach()).sum(1) / sigma, dim=0)


def check_against(loss_fn, expected_fn, inputs, dtype):
    loss = loss_fn(*inputs)
    grads = torch.autograd.grad(loss, inputs)
    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    expected = expected_fn(*ref_inputs)
    ref_grads = torch.autograd.grad(expected, ref_inputs)
    n, d = inputs[0].shape
    tol = rtol(dtype, length=2 * n + d, logit_scale=10)
    assert_close(loss, expected.detach(), tol, "loss")
    # One feature: every cosine is +-1 and the exact gradient 0, checked
    # against the size of the terms that cancel.
    floor = cancellation_floor(10, inputs) if d == 1 else 0.0
    for i, (a, b) in enumerate(zip(grads, ref_grads)):
        assert_close(a, b, tol, f"grad out{i}", floor=floor)


@pytest.mark.parametrize("route_name", ROUTES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n,d", [(2, 3), (7, 1), (65, 33), (130, 20)])
def test_dcl_and_dclw_match_the_formula(route_name, dtype, n, d, monkeypatch):
    inputs = views(n, d, dtype, seed=n + d)
    with route(route_name, monkeypatch):
        check_against(lambda a, b: ssl_ops.DCLLoss()(a, b), lambda a, b: dcl_formula(a, b, 0.1), inputs, dtype)
        check_against(lambda a, b: ssl_ops.DCLWLoss(temperature=0.2, sigma=0.3)(a, b),
                      lambda a, b: dcl_formula(a, b, 0.2, functools.partial(vmf, sigma=0.3)), inputs, dtype)


def test_a_weight_fn_with_gradient_is_differentiated_as_lightly_does():
    # weight_fn sees the normalised rows and may carry gradient (lightly does
    # not detach it): the positive term is computed in autograd, so it does.
    def weight_fn(a, b):
        return ((a - b) ** 2).sum(1)

    inputs = views(20, 6, torch.float64, seed=3)
    check_against(lambda a, b: ssl_ops.dcl_loss(a, b, 0.3, weight_fn),
                  lambda a, b: dcl_formula(a, b, 0.3, weight_fn), inputs, torch.float64)


@pytest.mark.parametrize("route_name", ROUTES)
def test_matches_lightly(route_name, monkeypatch):
    lightly_loss = pytest.importorskip("lightly.loss")
    for n, temperature in ((16, 0.1), (33, 0.5)):
        out0, out1 = views(n, 12, seed=n)
        la, lb = [t.detach().clone().requires_grad_() for t in (out0, out1)]
        for ours_cls, theirs_cls, kwargs in ((compat.DCLLoss, lightly_loss.DCLLoss, {}),
                                             (compat.DCLWLoss, lightly_loss.DCLWLoss, {"sigma": 0.4})):
            with route(route_name, monkeypatch):
                ours = ours_cls(temperature=temperature, **kwargs)(out0, out1)
                g_ours = torch.autograd.grad(ours, [out0, out1])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # lightly's torch.tensor(tensor) in its DCLW weights
                theirs = theirs_cls(temperature=temperature, **kwargs)(la, lb)
            g_theirs = torch.autograd.grad(theirs, [la, lb])
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
            for a, b in zip(g_ours, g_theirs):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_one_sample_has_no_negatives():
    # Each row's only other row is its positive, so the negatives' log-sum-exp
    # is over nothing: -inf, as lightly's logsumexp of an empty row gives.
    out0, out1 = views(1, 4)
    assert ssl_ops.dcl_loss(out0, out1).item() == float("-inf")


def test_gradcheck_opcheck_and_compile():
    a, b = views(6, 4, torch.float64, seed=5)
    assert torch.autograd.gradcheck(lambda x, y: ssl_ops.dcl_loss(x, y, 0.3), (a, b))
    # (DCLW's weights are detached, as lightly's, so its autograd gradient is
    # not the derivative gradcheck measures; a weight_fn with gradient is.)
    assert torch.autograd.gradcheck(
        lambda x, y: ssl_ops.dcl_loss(x, y, 0.3, lambda p, q: ((p - q) ** 2).sum(1)), (a, b))
    z = torch.randn(9, 5, requires_grad=True)
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3, 3])
    for reduction in (0, 1, 2):
        for compute_grad in (False, True):
            torch.library.opcheck(torch.ops.ssl_ops.contrastive_sym_loss.default,
                                  (z, labels, 0, 9, 2.0, 1e-12, True, reduction, compute_grad, EXCLUDED))
    _, lse, count, _, _ = torch.ops.ssl_ops.contrastive_sym_loss(z, labels, 0, 9, 2.0, 1e-12, True, 0, False,
                                                                 EXCLUDED)
    torch.library.opcheck(
        torch.ops.ssl_ops.contrastive_sym_backward.default,
        (torch.randn(9), z.detach(), labels, 0, 9, lse, count, 2.0, 1e-12, True, 0, None, EXCLUDED),
        test_utils=("test_schema", "test_faketensor"),
    )
    torch._dynamo.reset()
    x, y = views(12, 8)
    loss_fn = ssl_ops.DCLWLoss()
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    got = compiled(x, y)
    grads = torch.autograd.grad(got, [x, y])
    want = loss_fn(x, y)
    want_grads = torch.autograd.grad(want, [x, y])
    torch.testing.assert_close(got, want)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w)


def test_bad_input_errors():
    a = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"z1 has shape \(5, 8\) but z0 has shape \(4, 8\)"):
        ssl_ops.dcl_loss(a, torch.randn(5, 8))
    with pytest.raises(ValueError, match="z0 and z1 must share dtype and device"):
        ssl_ops.dcl_loss(a, a.double())
    with pytest.raises(ValueError, match="temperature must be a finite number"):
        ssl_ops.DCLLoss(temperature=0.0)(a, a)
    with pytest.raises(ValueError, match="z0 is an empty batch"):
        ssl_ops.dcl_loss(torch.randn(0, 8), torch.randn(0, 8))
