"""InfoNCE (MoCo with a queue, MoCo v3 / CLIP cross-view, symmetric) on the CPU
kernels: float64 reference parity, solo-learn's formulas, gradcheck, opcheck,
compile and bad input."""

import math

import pytest
import torch
import torch.nn.functional as F

import ssl_ops
from ssl_ops import reference
from tolerances import accumulator, assert_close, cancellation_floor, rtol


def rand(shape, dtype, seed, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_(requires_grad)


def check_against_reference(inputs, dtype, weight=None, **kwargs):
    loss = ssl_ops.info_nce_loss(*inputs, **kwargs)
    ref_inputs = [t.detach().double().requires_grad_(t.requires_grad) if t is not None else None for t in inputs]
    ref = reference.info_nce_loss(*ref_inputs, **kwargs)
    differentiable = [t for t in inputs if t is not None and t.requires_grad]
    ref_differentiable = [t for t in ref_inputs if t is not None and t.requires_grad]
    total = (loss * weight).sum() if weight is not None else loss
    ref_total = (ref * weight.double()).sum() if weight is not None else ref
    grads = torch.autograd.grad(total, differentiable)
    ref_grads = torch.autograd.grad(ref_total, ref_differentiable)
    # CPU kernels: fp32 (fp64) throughout, no operand rounding; the longest sum
    # runs over the candidates (keys and queue) and the features.
    length = sum(t.shape[0] for t in inputs[1:] if t is not None) + inputs[0].shape[1]
    common = dict(length=length, logit_scale=1 / kwargs.get("temperature", 0.07), rounds_operands=False)
    # One feature or one candidate (in-batch negatives, batch 1): the exact loss
    # and gradients are 0, checked against the terms that cancel.
    one_candidate = inputs[2] is None if len(inputs) > 2 else True
    degenerate = inputs[0].shape[1] == 1 or (one_candidate and inputs[0].shape[0] == 1)
    w = 1.0 if weight is None else weight.abs().max().item()
    rows = [t for t in inputs if t is not None]
    assert loss.dtype == accumulator(dtype)
    floor = cancellation_floor(common["logit_scale"], weight=w) if degenerate else 0.0
    assert_close(loss, ref, rtol(dtype, loss.dtype, **common), "loss", floor=floor)
    floor = cancellation_floor(common["logit_scale"], rows, weight=w) if degenerate else 0.0
    for g, r, t in zip(grads, ref_grads, differentiable):
        assert g.dtype == t.dtype
        assert_close(g, r, rtol(dtype, **common), "gradient", floor=floor)


@pytest.mark.parametrize("temperature", [0.01, 1 / 30, 0.034, 0.07, 1.0, 10.0, -0.2])
@pytest.mark.parametrize("magnitude", [1e-6, 1.0, 1e6])
def test_moco_temperatures_and_far_negative_rows(temperature, magnitude):
    """The CPU forward shifts by the logit bound |1/T| where exp(-2/|T|) cannot
    underflow (|T| >= 1/30) and by each tile's max otherwise; rows whose logits
    all sit near the bottom of the range are the hard case for the first."""
    query = rand((40, 16), torch.float32, 3)
    queue = rand((700, 16), torch.float32, 4, requires_grad=False)
    with torch.no_grad():
        query.mul_(magnitude)
        queue[:, 0] = queue[:, 0].abs() + 1.0
        query[:5] = 0
        query[:5, 0] = -magnitude  # opposite to every queue row and to its key
    key = (-query).detach() * 0.5
    key[5:] = rand((35, 16), torch.float32, 5, requires_grad=False) * magnitude
    for inputs in ((query, key, queue), (query, key)):
        check_against_reference(inputs, torch.float32, temperature=temperature, reduction="none",
                                weight=torch.linspace(0.5, 1.5, 40))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("batch,queue_size,d", [(1, 1, 1), (3, 129, 3), (65, 300, 64), (130, 2500, 128), (7, 40, 256)])
def test_moco_queue_matches_reference(dtype, batch, queue_size, d):
    query = rand((batch, d), dtype, 1)
    key = rand((batch, d), dtype, 2, requires_grad=False)
    queue = rand((queue_size, d), dtype, 3, requires_grad=False)
    # An upstream gradient other than 1: backward must scale the forward's gradient.
    check_against_reference((query, key, queue), dtype, weight=torch.tensor(1.7), temperature=0.07)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("batch,d", [(1, 3), (129, 64), (200, 17)])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("key_grad", [True, False], ids=["clip", "mocov3-detached-key"])
def test_cross_view_matches_reference(dtype, batch, d, symmetric, key_grad):
    # A detached key takes the one-pass path (online softmax-weighted keys).
    query, key = rand((batch, d), dtype, 4), rand((batch, d), dtype, 5, requires_grad=key_grad)
    check_against_reference((query, key), dtype, weight=torch.tensor(0.6), temperature=0.2, symmetric=symmetric)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("with_queue", [False, True])
def test_reductions_and_gradients_to_every_input(reduction, with_queue):
    query, key = rand((40, 16), torch.float64, 6), rand((40, 16), torch.float64, 7)
    queue = rand((90, 16), torch.float64, 8) if with_queue else None
    weight = rand((40,), torch.float64, 9, requires_grad=False) if reduction == "none" else None
    check_against_reference((query, key, queue), torch.float64, weight=weight, temperature=0.5, reduction=reduction)


def test_only_query_needs_grad_in_moco():
    query = rand((10, 8), torch.float32, 1)
    key, queue = rand((10, 8), torch.float32, 2, False), rand((50, 8), torch.float32, 3, False)
    loss = ssl_ops.info_nce_loss(query, key, queue)
    (gq,) = torch.autograd.grad(loss, [query])
    assert gq.shape == query.shape and key.grad is None and queue.grad is None


def test_solo_learn_moco_formulas():
    # mocov2plus_loss_func: normalised inputs, queue as (D, K), positive at index 0.
    query = F.normalize(torch.randn(16, 32, dtype=torch.float64), dim=1)
    key = F.normalize(torch.randn(16, 32, dtype=torch.float64), dim=1)
    queue_dk = F.normalize(torch.randn(32, 100, dtype=torch.float64), dim=0)
    pos = torch.einsum("nc,nc->n", [query, key]).unsqueeze(-1)
    neg = torch.einsum("nc,ck->nk", [query, queue_dk])
    logits = torch.cat([pos, neg], dim=1) / 0.1
    solo_v2 = F.cross_entropy(logits, torch.zeros(16, dtype=torch.long))
    ours = ssl_ops.info_nce_loss(query, key, queue_dk.t(), temperature=0.1, normalize=False)
    torch.testing.assert_close(ours, solo_v2)
    # mocov3_loss_func (one process): normalises, labels arange, times 2 * temperature.
    q, k = torch.randn(16, 32, dtype=torch.float64), torch.randn(16, 32, dtype=torch.float64)
    logits = F.normalize(q, dim=1) @ F.normalize(k, dim=1).t() / 0.2
    solo_v3 = F.cross_entropy(logits, torch.arange(16)) * 2 * 0.2
    torch.testing.assert_close(ssl_ops.info_nce_loss(q, k, temperature=0.2) * 2 * 0.2, solo_v3)


def test_gradcheck_float64():
    query, key, queue = rand((4, 3), torch.float64, 1), rand((4, 3), torch.float64, 2), rand((6, 3), torch.float64, 3)
    assert torch.autograd.gradcheck(lambda a, b, c: ssl_ops.info_nce_loss(a, b, c, 0.5), (query, key, queue))
    assert torch.autograd.gradcheck(
        lambda a, b, c: ssl_ops.info_nce_loss(a, b, c, 0.5, reduction="none"), (query, key, queue)
    )
    assert torch.autograd.gradcheck(lambda a, b: ssl_ops.info_nce_loss(a, b, None, 0.3, symmetric=True), (query, key))


def test_opcheck():
    query, key, queue = torch.randn(6, 5), torch.randn(6, 5), torch.randn(9, 5)
    op = torch.ops.ssl_ops.contrastive_asym_loss.default
    for positive, candidates in ((key, queue), (None, key)):
        for reduction in (0, 1, 2):
            for mask in ([True, False, False], [True, True, True]):
                q = query.clone().requires_grad_(mask[0])
                torch.library.opcheck(op, (q, candidates, positive, 0, 2.0, 1e-12, True, reduction, mask))
    torch.library.opcheck(op, (query, queue, None, 2, 2.0, 1e-12, True, 1, [True, True, False]))  # gathered keys
    _, lse, _, _, _ = op(query, queue, key, 0, 2.0, 1e-12, True, 0, [False, False, False])
    torch.library.opcheck(
        torch.ops.ssl_ops.contrastive_asym_backward.default,
        (torch.randn(6), query, queue, key, 0, lse, 2.0, 1e-12, True, 0, [True, True, True]),
        test_utils=("test_schema", "test_faketensor"),
    )


@pytest.mark.parametrize("with_queue", [False, True])
def test_compile_fullgraph(with_queue):
    torch._dynamo.reset()
    query, key = rand((12, 8), torch.float32, 1), rand((12, 8), torch.float32, 2, False)
    queue = rand((30, 8), torch.float32, 3, False) if with_queue else None

    def loss_fn(q, k, qu):
        return ssl_ops.info_nce_loss(q, k, qu, 0.1)

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    loss = compiled(query, key, queue)
    (grad,) = torch.autograd.grad(loss, [query])
    eager = loss_fn(query, key, queue)
    (eager_grad,) = torch.autograd.grad(eager, [query])
    torch.testing.assert_close(loss, eager)
    torch.testing.assert_close(grad, eager_grad)


def test_bad_input_errors():
    q = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"key has shape \(4, 6\) but query has shape \(4, 8\)"):
        ssl_ops.info_nce_loss(q, torch.randn(4, 6))
    with pytest.raises(ValueError, match="queue has 6 features but query has 8"):
        ssl_ops.info_nce_loss(q, q, torch.randn(10, 6))
    with pytest.raises(ValueError, match="query is an empty batch"):
        ssl_ops.info_nce_loss(torch.randn(0, 8), torch.randn(0, 8))
    with pytest.raises(ValueError, match=r"query must be a 2-D"):
        ssl_ops.info_nce_loss(torch.randn(8), torch.randn(8))
    with pytest.raises(ValueError, match="symmetric=True .* takes no queue"):
        ssl_ops.info_nce_loss(q, q, torch.randn(3, 8), symmetric=True)
    with pytest.raises(ValueError, match="temperature must be a finite number"):
        ssl_ops.info_nce_loss(q, q, temperature=0.0)
    with pytest.raises(ValueError, match="temperature must be a finite number"):
        ssl_ops.info_nce_loss(q, q, temperature=math.nan)
    with pytest.raises(ValueError, match="queue must share query's dtype and device"):
        ssl_ops.info_nce_loss(q, q, torch.randn(3, 8, dtype=torch.float64))
    op = torch.ops.ssl_ops.contrastive_asym_loss
    with pytest.raises(ValueError, match=r"key row i \+ positive_offset is the positive of query row i, so key needs "
                                         r"4 \+ 0 rows, got 3"):
        op(q, torch.randn(3, 8), None, 0, 2.0, 1e-12, True, 1, [False, False, False])
    with pytest.raises(ValueError, match=r"so key needs 4 \+ 2 rows, got 5"):
        op(q, torch.randn(5, 8), None, 2, 2.0, 1e-12, True, 1, [False, False, False])
    with pytest.raises(ValueError, match="positive_offset must be 0 with a positive_key, got 1"):
        op(q, torch.randn(5, 8), q, 1, 2.0, 1e-12, True, 1, [False, False, False])
    with pytest.raises(ValueError, match="gather_distributed is for the in-batch loss"):
        ssl_ops.info_nce_loss(q, q, torch.randn(3, 8), gather_distributed=True)
    with pytest.raises(TypeError, match="key has dtype Double but query has dtype Float"):
        op(q, q.double(), None, 0, 2.0, 1e-12, True, 1, [False, False, False])


class _OpLog(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.name())
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("with_queue", [True, False])
@pytest.mark.parametrize("key_grad", [False, True])
def test_forward_computes_the_gradient_and_backward_only_scales_it(with_queue, key_grad):
    """README: with inputs that require grad the gradient comes from the forward's
    pass; backward runs no second kernel (a wrong grad_mask would make it)."""
    query, key = rand((12, 8), torch.float32, 1), rand((12, 8), torch.float32, 2, requires_grad=key_grad)
    queue = rand((30, 8), torch.float32, 3, requires_grad=False) if with_queue else None
    loss = ssl_ops.info_nce_loss(query, key, queue)
    log = _OpLog()
    with log:
        loss.backward()
    assert "ssl_ops::contrastive_asym_backward" not in log.names
    assert query.grad is not None and (key.grad is not None) == key_grad
