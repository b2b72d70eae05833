"""The contrastive-loss operators on every backend: the CPU kernels, the CUDA
kernels on the host emulator under several thread orders, and the CUDA
kernels on a GPU. Each is checked against the float64 reference (loss, lse,
gradients from the forward and from the backward op) on shapes that hit
partial tiles, one row, one feature and several blocks."""

import pytest
import torch
import torch.nn.functional as F

from ssl_ops import reference
from tolerances import assert_close, cancellation_floor, rows_below, rtol

EPS = 1e-12


# Every case runs on the CPU kernels and on the CUDA source under both of its
# route settings (the default, fused where it applies, and the GEMM route
# forced; conftest.py).
@pytest.fixture
def backend(contrastive_backend):
    return contrastive_backend


@pytest.fixture
def cuda_source_backend(contrastive_cuda_source_backend):
    return contrastive_cuda_source_backend


def rand(shape, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).to(device)


def checker(dtype, length, logit_scale, small_rows=None, degenerate=(), tf32=False):
    """check(actual, expected, what): tolerances.rtol for inputs of `dtype`
    (the result's own dtype for its rounding), candidates + features summed,
    logits scaled by `logit_scale`; operands may be rounded (tensor cores).
    Rows in `small_rows` (norm below eps) are checked on their own scale.
    `degenerate`: the input rows when the exact result is 0 (one feature or one
    candidate), so it is checked against the size of the terms that cancel.
    `tf32`: fp32 operands rounded to TF32 (tensor cores, where torch allows it)."""

    def check(actual, expected, what, weight=1.0):
        tol = rtol(dtype, actual.dtype, length=length, logit_scale=logit_scale, tf32=tf32)
        rows = small_rows if small_rows is not None and actual.dim() == 2 else None
        floor = 0.0
        if degenerate:
            floor = cancellation_floor(logit_scale, degenerate if actual.dim() == 2 else (), weight)
        assert_close(actual, expected, tol, what, small_rows=rows, floor=floor)

    return check


def sym_reference(z, labels, scale, weight):
    z64 = z.detach().double().cpu().requires_grad_()
    rows = reference.supcon_loss(z64, labels.cpu(), 1.0 / scale, reduction="none")
    (grad,) = torch.autograd.grad((rows * weight.double()).sum(), [z64])
    return rows.detach(), grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("rows,d", [(1, 4), (2, 1), (7, 3), (64, 64), (130, 65), (66, 130)])
def test_sym_op(backend, dtype, rows, d):
    z = rand((rows, d), dtype, backend.device, 1)
    labels = torch.arange(rows).remainder((rows + 1) // 2).to(backend.device)  # pairs, one singleton if odd
    labels_cpu = labels.cpu()
    scale = 2.0
    loss, lse, count, grad, _ = backend.ops.contrastive_sym_loss(z, labels, 0, rows, scale, EPS, True, 2, True)
    check = checker(dtype, rows + d, scale)
    valid = (labels_cpu[:, None] == labels_cpu[None, :]).sum(1) > 1
    ref_rows, ref_grad = sym_reference(z, labels_cpu, scale, valid.double())
    check(loss, ref_rows.sum(), "sum loss")
    check(grad, ref_grad, "forward gradient")
    assert count.cpu().tolist() == ((labels_cpu[:, None] == labels_cpu[None, :]).sum(1) - 1).tolist()
    # reduction none, its backward op with random row weights
    rows_loss, lse, count, empty, _ = backend.ops.contrastive_sym_loss(z, labels, 0, rows, scale, EPS, True, 0, True)
    assert empty.numel() == 0
    check(rows_loss, ref_rows, "row losses")
    weight = rand((rows,), torch.float64, "cpu", 2)
    grad_loss = weight.to(lse.dtype).to(backend.device)
    grad_b = backend.ops.contrastive_sym_backward(grad_loss, z, labels, 0, rows, lse, count, scale, EPS, True, 0)
    _, ref_grad_b = sym_reference(z, labels_cpu, scale, weight * valid)
    check(grad_b, ref_grad_b, "backward gradient")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows,d,scale", [(300, 24, 2.0), (256, 33, 1 / 0.2), (70, 300, 1 / 0.01), (97, 8, -3.0)])
def test_sym_op_is_bit_identical_under_deterministic_algorithms(cuda_source_backend, dtype, rows, d, scale):
    """Neither CUDA route uses float atomics, so
    torch.use_deterministic_algorithms(True) changes no bit, and repeated runs
    on a GPU agree bit for bit. Against the float64 reference, with SupCon
    labels with singletons, bounded (2, 5, -3) and unbounded (100) scales."""
    backend = cuda_source_backend
    z = rand((rows, d), dtype, backend.device, 16)
    labels = torch.randint(0, rows // 3, (rows,), generator=torch.Generator().manual_seed(17))
    valid = (labels[:, None] == labels[None, :]).sum(1) > 1
    weight = rand((rows,), torch.float64, "cpu", 18)
    ref_rows, ref_grad = sym_reference(z, labels, scale, weight * valid)
    dev_labels = labels.to(backend.device)

    def run():
        check = checker(dtype, rows + d, scale)
        rows_loss, lse, count, _, _ = backend.ops.contrastive_sym_loss(z, dev_labels, 0, rows, scale, EPS, True, 0, False)
        grad = backend.ops.contrastive_sym_backward(
            weight.to(lse.dtype).to(backend.device), z, dev_labels, 0, rows, lse, count, scale, EPS, True, 0
        )
        assert count.cpu().tolist() == ((labels[:, None] == labels[None, :]).sum(1) - 1).tolist()
        check(rows_loss, ref_rows, "row losses")
        check(grad, ref_grad, "gradient")
        return rows_loss, grad

    free = run()
    previous = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        deterministic = run()
        if backend.name == "cuda":  # the emulator runs every schedule the same way twice anyway
            again = run()
            assert all(torch.equal(a, b) for a, b in zip(deterministic, again))
    finally:
        torch.use_deterministic_algorithms(previous)
    assert all(torch.equal(a, b) for a, b in zip(free, deterministic))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows,begin,end", [(9, 3, 6), (200, 0, 70), (200, 130, 200), (260, 65, 195), (140, 1, 2)])
def test_sym_op_anchor_range(backend, dtype, rows, begin, end):
    """Anchors [begin, end) against all rows (the rows one process owns in a
    gathered batch): losses of the anchors only, gradients to every row."""
    z = rand((rows, 40), dtype, backend.device, 11)
    labels = torch.arange(rows).remainder(rows // 2)
    scale = 1 / 0.3
    anchor = torch.zeros(rows, dtype=torch.bool)
    anchor[begin:end] = True
    valid = ((labels[:, None] == labels[None, :]).sum(1) > 1) & anchor
    dev_labels = labels.to(backend.device)
    loss, lse, count, grad, _ = backend.ops.contrastive_sym_loss(z, dev_labels, begin, end, scale, EPS, True, 1, True)
    check = checker(dtype, rows + 40, scale)
    ref_rows, ref_grad = sym_reference(z, labels, scale, valid.double() / valid.sum())
    check(loss, (ref_rows * valid).sum() / valid.sum(), "mean loss over anchors")
    check(grad, ref_grad, "forward gradient")
    assert (count.cpu()[~anchor] == 0).all() and (count.cpu()[anchor] > 0).all()
    rows_loss, lse, count, _, _ = backend.ops.contrastive_sym_loss(z, dev_labels, begin, end, scale, EPS, True, 0, False)
    check(rows_loss, ref_rows * valid, "row losses, 0 outside the anchors")
    weight = rand((rows,), torch.float64, "cpu", 12)
    grad_b = backend.ops.contrastive_sym_backward(
        weight.to(lse.dtype).to(backend.device), z, dev_labels, begin, end, lse, count, scale, EPS, True, 0
    )
    _, ref_grad_b = sym_reference(z, labels, scale, weight * valid)
    check(grad_b, ref_grad_b, "backward gradient")


LOGSUMEXP = 1  # the op's positives argument: the positives inside the log


def sym_lse_reference(z, labels, scale, weight, normalize=True):
    z64 = z.detach().double().cpu().requires_grad_()
    rows = reference.supcon_loss(z64, labels.cpu(), 1.0 / scale, "none", normalize, positives="logsumexp")
    (grad,) = torch.autograd.grad((rows * weight.double()).sum(), [z64])
    return rows.detach(), grad


def positive_logsumexp(z, labels, scale, normalize=True):
    """float64 log-sum-exp of each row's positive logits (0 without positives)."""
    z64 = z.detach().double().cpu()
    if normalize:
        z64 = F.normalize(z64, dim=1)
    logits = scale * z64 @ z64.t()
    labels = labels.cpu()
    mask = (labels[:, None] == labels[None, :]) & ~torch.eye(len(labels), dtype=torch.bool)
    lse = torch.logsumexp(logits.masked_fill(~mask, float("-inf")), dim=1)
    return torch.where(mask.any(1), lse, torch.zeros_like(lse))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("rows,d,scale", [(1, 4, 2.0), (7, 3, 2.0), (130, 65, 1 / 0.1), (66, 130, -3.0),
                                          (150, 20, 1 / 0.01)])
def test_sym_op_positives_inside_the_log(backend, dtype, rows, d, scale):
    """positives = 1 (solo-learn's multi-crop SimCLR): loss_i = lse_i - lse over
    the positives, groups of 1 to 4 rows (rows with 0, 1, 2 and 3 positives),
    under the bounded shift and the running max (scale 100), against float64:
    losses, lse_positive, the forward's gradient and the backward op's."""
    if dtype == torch.float16 and abs(scale) > 10:
        pytest.skip("float16 logits of scale 100 are the mean form's business too; covered in fp32/bf16")
    z = rand((rows, d), dtype, backend.device, 21)
    sizes = torch.tensor([1, 2, 3, 4])
    labels = torch.repeat_interleave(torch.arange(rows), sizes.repeat(rows)[:rows])[:rows]
    labels = labels[torch.randperm(rows, generator=torch.Generator().manual_seed(22))]
    dev_labels = labels.to(backend.device)
    count = (labels[:, None] == labels[None, :]).sum(1) - 1
    valid = count > 0
    check = checker(dtype, rows + d, scale)
    loss, lse, count_out, grad, lse_pos = backend.ops.contrastive_sym_loss(
        z, dev_labels, 0, rows, scale, EPS, True, 2, True, LOGSUMEXP)
    assert count_out.cpu().tolist() == count.tolist()
    ref_rows, ref_grad = sym_lse_reference(z, labels, scale, valid.double())
    check(loss, ref_rows.sum(), "sum loss")
    check(grad, ref_grad, "forward gradient")
    check(lse_pos, positive_logsumexp(z, labels, scale), "lse over the positives")
    rows_loss, lse, count_out, empty, lse_pos = backend.ops.contrastive_sym_loss(
        z, dev_labels, 0, rows, scale, EPS, True, 0, False, LOGSUMEXP)
    assert empty.numel() == 0
    check(rows_loss, ref_rows, "row losses")
    weight = rand((rows,), torch.float64, "cpu", 23)
    grad_b = backend.ops.contrastive_sym_backward(
        weight.to(lse.dtype).to(backend.device), z, dev_labels, 0, rows, lse, count_out, scale, EPS, True, 0,
        lse_pos, LOGSUMEXP)
    _, ref_grad_b = sym_lse_reference(z, labels, scale, weight * valid)
    check(grad_b, ref_grad_b, "backward gradient")


@pytest.mark.parametrize("begin,end", [(3, 6), (0, 70), (130, 200)])
def test_sym_op_positives_inside_the_log_anchor_range(backend, begin, end):
    rows = 200 if end > 9 else 9
    z = rand((rows, 40), torch.float32, backend.device, 24)
    labels = torch.arange(rows).remainder(rows // 3)  # three rows per label
    anchor = torch.zeros(rows, dtype=torch.bool)
    anchor[begin:end] = True
    dev_labels = labels.to(backend.device)
    scale = 1 / 0.2
    loss, _, _, grad, lse_pos = backend.ops.contrastive_sym_loss(
        z, dev_labels, begin, end, scale, EPS, True, 1, True, LOGSUMEXP)
    check = checker(torch.float32, rows + 40, scale)
    ref_rows, ref_grad = sym_lse_reference(z, labels, scale, anchor.double() / anchor.sum())
    check(loss, (ref_rows * anchor).sum() / anchor.sum(), "mean loss over anchors")
    check(grad, ref_grad, "forward gradient")
    check(lse_pos, positive_logsumexp(z, labels, scale) * anchor, "lse over the positives, 0 outside the anchors")


def test_sym_op_positives_inside_the_log_keep_a_positive_far_below_the_largest_logit(backend):
    """Running-max shift (no normalisation): row 0's positives sit 190-200 below
    its largest logit, so exp(positive - row max) is 0 in float32; the
    positives' own shift keeps lse_pos (and the loss, ~199) finite and right."""
    z = torch.tensor([[10.0, 0.0], [-10.0, 0.0], [-9.5, 0.1], [10.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 0, 1, 2])
    z_dev, dev_labels = z.to(backend.device), labels.to(backend.device)
    rows_loss, _, _, _, lse_pos = backend.ops.contrastive_sym_loss(
        z_dev, dev_labels, 0, 5, 1.0, EPS, False, 0, False, LOGSUMEXP)
    ref_rows, _ = sym_lse_reference(z, labels, 1.0, torch.ones(5), normalize=False)
    assert torch.isfinite(rows_loss).all()
    assert ref_rows[0] > 150
    torch.testing.assert_close(rows_loss.cpu().double(), ref_rows, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(lse_pos.cpu().double(), positive_logsumexp(z, labels, 1.0, normalize=False),
                               rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_sym_op_one_positive_per_row_is_the_mean_form_bit_for_bit(backend, dtype):
    """With two views each row's only positive is its log-sum-exp: both forms
    run the same arithmetic, so loss and gradients are equal, not just close."""
    z = rand((130, 33), dtype, backend.device, 25)
    labels = torch.arange(65).repeat(2).to(backend.device)
    mean_form = backend.ops.contrastive_sym_loss(z, labels, 0, 130, 1 / 0.2, EPS, True, 1, True)
    lse_form = backend.ops.contrastive_sym_loss(z, labels, 0, 130, 1 / 0.2, EPS, True, 1, True, LOGSUMEXP)
    assert torch.equal(mean_form[0], lse_form[0])
    assert torch.equal(mean_form[3], lse_form[3])


EXCLUDED = 2  # the op's positives argument: positives are no candidates (DCL's negatives)


def sym_excluded_reference(z, labels, scale, weight):
    """float64 log-sum-exp over each row's negatives (0 for rows without positives)."""
    z64 = z.detach().double().cpu().requires_grad_()
    zn = F.normalize(z64, dim=1)
    logits = scale * zn @ zn.t()
    labels = labels.cpu()
    same = labels[:, None] == labels[None, :]
    has_positive = (same.sum(1) - 1) > 0
    lse = torch.logsumexp(logits.masked_fill(same, float("-inf")), dim=1)
    rows = torch.where(has_positive, lse, torch.zeros_like(lse))
    (grad,) = torch.autograd.grad((rows * weight.double()).sum(), [z64])
    return rows.detach(), grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows,d,scale", [(7, 3, 2.0), (130, 65, 1 / 0.1), (66, 130, -3.0), (150, 20, 1 / 0.01)])
def test_sym_op_positives_excluded(backend, dtype, rows, d, scale):
    """positives = 2 (DCL's negative term): each row's loss is the log-sum-exp
    over its negatives only; groups of 1 to 4 rows; bounded and running-max
    shifts; forward gradient and the backward op against float64."""
    z = rand((rows, d), dtype, backend.device, 27)
    sizes = torch.tensor([1, 2, 3, 4])
    labels = torch.repeat_interleave(torch.arange(rows), sizes.repeat(rows)[:rows])[:rows]
    labels = labels[torch.randperm(rows, generator=torch.Generator().manual_seed(28))]
    dev_labels = labels.to(backend.device)
    valid = ((labels[:, None] == labels[None, :]).sum(1) - 1) > 0
    check = checker(dtype, rows + d, scale)
    loss, lse, count, grad, _ = backend.ops.contrastive_sym_loss(
        z, dev_labels, 0, rows, scale, EPS, True, 2, True, EXCLUDED)
    ref_rows, ref_grad = sym_excluded_reference(z, labels, scale, valid.double())
    check(loss, ref_rows.sum(), "sum loss")
    check(grad, ref_grad, "forward gradient")
    rows_loss, lse, count, _, _ = backend.ops.contrastive_sym_loss(
        z, dev_labels, 0, rows, scale, EPS, True, 0, False, EXCLUDED)
    check(rows_loss, ref_rows, "row losses")
    weight = rand((rows,), torch.float64, "cpu", 29)
    grad_b = backend.ops.contrastive_sym_backward(
        weight.to(lse.dtype).to(backend.device), z, dev_labels, 0, rows, lse, count, scale, EPS, True, 0, None,
        EXCLUDED)
    _, ref_grad_b = sym_excluded_reference(z, labels, scale, weight * valid)
    check(grad_b, ref_grad_b, "backward gradient")


def test_sym_op_positives_argument_is_checked(backend):
    z = rand((6, 4), torch.float32, backend.device, 26)
    labels = torch.arange(3).repeat(2).to(backend.device)
    with pytest.raises(ValueError, match="positives must be 0 \\(mean outside the log\\), 1 .* or 2 .*got 3"):
        backend.ops.contrastive_sym_loss(z, labels, 0, 6, 2.0, EPS, True, 1, False, 3)
    _, lse, count, _, _ = backend.ops.contrastive_sym_loss(z, labels, 0, 6, 2.0, EPS, True, 0, False)
    grad_loss = torch.ones(6, device=backend.device)
    with pytest.raises(ValueError, match="positives = 1 needs lse_positive"):
        backend.ops.contrastive_sym_backward(grad_loss, z, labels, 0, 6, lse, count, 2.0, EPS, True, 0, None, 1)
    with pytest.raises(ValueError, match=r"lse_positive must have shape \[6\].*got \[5\]"):
        backend.ops.contrastive_sym_backward(grad_loss, z, labels, 0, 6, lse, count, 2.0, EPS, True, 0, lse[:5], 1)
    with pytest.raises(TypeError, match="lse_positive must have dtype Float, got Double"):
        backend.ops.contrastive_sym_backward(grad_loss, z, labels, 0, 6, lse, count, 2.0, EPS, True, 0,
                                             lse.double(), 1)


def test_sym_supcon_labels_and_mean(backend):
    z = rand((150, 24), torch.float32, backend.device, 3)
    g = torch.Generator().manual_seed(4)
    labels = torch.randint(0, 20, (150,), generator=g)
    labels[5] = 999  # no positives
    loss, _, _, grad, _ = backend.ops.contrastive_sym_loss(z, labels.to(backend.device), 0, 150, 1 / 0.3, EPS, True, 1, True)
    check = checker(torch.float32, 150 + 24, 1 / 0.3)
    z64 = z.detach().double().cpu().requires_grad_()
    ref = reference.supcon_loss(z64, labels, 0.3)
    (ref_grad,) = torch.autograd.grad(ref, [z64])
    check(loss, ref.detach(), "mean loss")
    check(grad, ref_grad, "gradient")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("batch,queue,d", [(1, 1, 1), (5, 130, 3), (65, 700, 64), (70, 66, 130)])
@pytest.mark.parametrize("with_queue", [True, False], ids=["moco", "cross-view"])
def test_asym_op(asym_backend, dtype, batch, queue, d, with_queue):
    q = rand((batch, d), dtype, asym_backend.device, 5)
    k = rand((batch, d), dtype, asym_backend.device, 6)
    qu = rand((queue, d), dtype, asym_backend.device, 7) if with_queue else None
    candidates, positive = (qu, k) if with_queue else (k, None)
    scale = 1 / 0.2
    mask = [True, True, True]
    loss, lse, gq, gk, gp = asym_backend.ops.contrastive_asym_loss(q, candidates, positive, 0, scale, EPS, True, 1, mask)
    check = checker(dtype, batch + queue + d, scale, degenerate=(q, k, qu) if with_queue and d == 1 else (q, k) if d == 1 else ())
    inputs = [t.detach().double().cpu().requires_grad_() for t in (q, k) + ((qu,) if with_queue else ())]
    ref = reference.info_nce_loss(*inputs, temperature=0.2)
    ref_grads = torch.autograd.grad(ref, inputs)
    check(loss, ref.detach(), "mean loss")
    check(gq, ref_grads[0], "grad query")
    if with_queue:
        check(gk, ref_grads[2], "grad queue")
        check(gp, ref_grads[1], "grad positive key")
    else:
        check(gk, ref_grads[1], "grad key")
        assert gp.numel() == 0
    # reduction none and the backward op with row weights
    rows_loss, lse, *_ = asym_backend.ops.contrastive_asym_loss(q, candidates, positive, 0, scale, EPS, True, 0, mask)
    weight = rand((batch,), torch.float64, "cpu", 8)
    ref_rows = reference.info_nce_loss(*inputs, temperature=0.2, reduction="none")
    ref_grads = torch.autograd.grad((ref_rows * weight).sum(), inputs)
    check(rows_loss, ref_rows.detach(), "row losses")
    grads = asym_backend.ops.contrastive_asym_backward(
        weight.to(lse.dtype).to(asym_backend.device), q, candidates, positive, 0, lse, scale, EPS, True, 0, mask
    )
    check(grads[0], ref_grads[0], "backward grad query", weight=weight.abs().max())
    check(grads[1], ref_grads[2] if with_queue else ref_grads[1], "backward grad key", weight=weight.abs().max())
    if with_queue:
        check(grads[2], ref_grads[1], "backward grad positive key", weight=weight.abs().max())


@pytest.mark.parametrize("temperature", [0.01, 0.07, -0.5])
@pytest.mark.parametrize("normalize", [True, False], ids=["normalize", "unit-inputs"])
@pytest.mark.parametrize("with_queue", [True, False], ids=["moco", "cross-view"])
def test_asym_op_shifts(asym_backend, temperature, normalize, with_queue):
    """The log-sum-exp shifted by the logit bound (normalised rows, |1/T| <= 30)
    and by a running max (T = 0.01, or rows the kernel does not normalise)."""
    unit = lambda t: t if normalize else F.normalize(t, dim=1)  # noqa: E731
    q = unit(rand((70, 24), torch.float64, "cpu", 21)).float().to(asym_backend.device)
    k = unit(rand((70, 24), torch.float64, "cpu", 22)).float().to(asym_backend.device)
    qu = unit(rand((300, 24), torch.float64, "cpu", 23)).float().to(asym_backend.device) if with_queue else None
    candidates, positive = (qu, k) if with_queue else (k, None)
    mask = [True, True, with_queue]
    loss, lse, gq, gk, gp = asym_backend.ops.contrastive_asym_loss(
        q, candidates, positive, 0, 1 / temperature, EPS, normalize, 1, mask
    )
    check = checker(torch.float32, 70 + 300 + 24, 1 / temperature)
    inputs = [t.detach().double().cpu().requires_grad_() for t in (q, k) + ((qu,) if with_queue else ())]
    ref = reference.info_nce_loss(*inputs, temperature=temperature, normalize=normalize)
    ref_grads = torch.autograd.grad(ref, inputs)
    check(loss, ref.detach(), "mean loss")
    check(gq, ref_grads[0], "grad query")
    check(gk, ref_grads[2] if with_queue else ref_grads[1], "grad key")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("batch,keys,offset", [(1, 3, 2), (5, 20, 10), (70, 140, 70), (66, 200, 67)])
def test_asym_op_positive_offset(asym_backend, dtype, batch, keys, offset):
    """Queries against keys gathered from several processes: the positive of
    query i is key i + offset (MoCo v3 / CLIP with gather_distributed)."""
    q = rand((batch, 24), dtype, asym_backend.device, 13)
    k = rand((keys, 24), dtype, asym_backend.device, 14)
    scale = 1 / 0.2
    mask = [True, True, False]
    loss, lse, gq, gk, _ = asym_backend.ops.contrastive_asym_loss(q, k, None, offset, scale, EPS, True, 1, mask)
    check = checker(dtype, keys + 24, scale)
    q64, k64 = (t.detach().double().cpu().requires_grad_() for t in (q, k))
    logits = F.normalize(q64, dim=1) @ F.normalize(k64, dim=1).t() * scale
    ref_rows = F.cross_entropy(logits, torch.arange(batch) + offset, reduction="none")
    ref_grads = torch.autograd.grad(ref_rows.mean(), [q64, k64], retain_graph=True)
    check(loss, ref_rows.mean().detach(), "mean loss")
    check(gq, ref_grads[0], "grad query")
    check(gk, ref_grads[1], "grad key")
    weight = rand((batch,), torch.float64, "cpu", 15)
    ref_grads = torch.autograd.grad((ref_rows * weight).sum(), [q64, k64])
    grads = asym_backend.ops.contrastive_asym_backward(
        weight.to(lse.dtype).to(asym_backend.device), q, k, None, offset, lse, scale, EPS, True, 0, mask
    )
    check(grads[0], ref_grads[0], "backward grad query")
    check(grads[1], ref_grads[1], "backward grad key")
    # Only the query needs a gradient (MoCo v3 with detached keys): the one-pass route, offset positives.
    loss_q, _, gq_only, gk_none, _ = asym_backend.ops.contrastive_asym_loss(
        q, k, None, offset, scale, EPS, True, 1, [True, False, False]
    )
    query_logits = F.normalize(q64, dim=1) @ F.normalize(k64.detach(), dim=1).t() * scale
    (ref_gq,) = torch.autograd.grad(F.cross_entropy(query_logits, torch.arange(batch) + offset), [q64])
    assert gk_none.numel() == 0
    check(loss_q, ref_rows.mean().detach(), "mean loss, query-only route")
    check(gq_only, ref_gq, "grad query, query-only route")


@pytest.mark.parametrize("with_queue", [True, False], ids=["moco", "cross-view"])
def test_asym_cpu_panels_with_a_partial_last_one(with_queue, monkeypatch):
    """The CPU kernel's panels of rows against every candidate: a budget of 128
    rows of 300 candidates makes panels of 128, 128 and 44 rows."""
    batch = candidates_rows = 300
    monkeypatch.setenv("SSL_OPS_CONTRASTIVE_CHUNK_ELEMENTS", str(128 * candidates_rows))
    q = rand((batch, 40), torch.float32, "cpu", 31)
    k = rand((batch, 40), torch.float32, "cpu", 32)
    qu = rand((candidates_rows, 40), torch.float32, "cpu", 33) if with_queue else None
    candidates, positive = (qu, k) if with_queue else (k, None)
    loss, _, gq, gk, gp = torch.ops.ssl_ops.contrastive_asym_loss(q, candidates, positive, 0, 5.0, EPS, True, 1,
                                                                  [True, True, with_queue])
    inputs = [t.detach().double().requires_grad_() for t in (q, k) + ((qu,) if with_queue else ())]
    ref = reference.info_nce_loss(*inputs, temperature=0.2)
    ref_grads = torch.autograd.grad(ref, inputs)
    check = checker(torch.float32, batch + candidates_rows + 40, 5.0)
    check(loss, ref.detach(), "mean loss")
    check(gq, ref_grads[0], "grad query")
    check(gk, ref_grads[2] if with_queue else ref_grads[1], "grad candidates")
    if with_queue:
        check(gp, ref_grads[1], "grad positive key")


@pytest.mark.parametrize("temperature", [0.01, 0.05, 0.07, 0.5, 10.0, -0.2])
@pytest.mark.parametrize("magnitude", [1e-6, 1e6])
def test_sym_op_extreme_temperatures_and_magnitudes(backend, temperature, magnitude):
    """Both log-sum-exp shifts (the logit bound up to |1/T| = 30, the running
    max beyond) on rows scaled far from 1, against float64."""
    z = rand((150, 16), torch.float32, backend.device, 19) * magnitude
    labels = torch.arange(75).repeat(2)
    scale = 1 / temperature
    loss, lse, count, grad, _ = backend.ops.contrastive_sym_loss(z, labels.to(backend.device), 0, 150, scale, EPS, True, 1, True)
    check = checker(torch.float32, 150 + 16, scale)
    ref_rows, ref_grad = sym_reference(z, labels, scale, torch.full((150,), 1 / 150, dtype=torch.float64))
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    check(loss, ref_rows.mean(), "mean loss")
    # d z scales as 1 / magnitude: compare on the unit scale
    check(grad * magnitude, ref_grad * magnitude, "gradient x magnitude")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_sym_op_half_zero_rows(backend, dtype):
    z = rand((70, 8), dtype, backend.device, 20)
    z[3] = 0
    z[40] = 1e-5  # below eps once squared in half precision; normalised in fp32
    labels = torch.arange(35).repeat(2).to(backend.device)
    loss, _, _, grad, _ = backend.ops.contrastive_sym_loss(z, labels, 0, 70, 1 / 0.1, EPS, True, 1, True)
    ref_rows, ref_grad = sym_reference(z, labels.cpu(), 1 / 0.1, torch.full((70,), 1 / 70, dtype=torch.float64))
    check = checker(dtype, 70 + 8, 1 / 0.1, small_rows=rows_below(z, EPS))
    check(loss, ref_rows.mean(), "mean loss")
    check(grad, ref_grad, "gradient (the zero row's is g / eps, float16 saturated)")


def test_zero_rows_and_unnormalised_inputs(backend):
    z = rand((20, 8), torch.float32, backend.device, 9)
    z[3] = 0
    labels = torch.arange(10).repeat(2).to(backend.device)
    loss, _, _, grad, _ = backend.ops.contrastive_sym_loss(z, labels, 0, 20, 10.0, EPS, True, 1, True)
    ref_rows, ref_grad = sym_reference(z, labels.cpu(), 10.0, torch.full((20,), 1 / 20, dtype=torch.float64))
    check = checker(torch.float32, 20 + 8, 10.0, small_rows=rows_below(z, EPS))
    check(loss, ref_rows.mean(), "mean loss with a zero row")
    check(grad, ref_grad, "gradient with a zero row")
    zn = torch.nn.functional.normalize(z.double().cpu(), dim=1).float().to(backend.device)
    loss_n, _, _, grad_n, _ = backend.ops.contrastive_sym_loss(zn, labels, 0, 20, 10.0, EPS, False, 1, True)
    z64 = zn.double().cpu().requires_grad_()
    check = checker(torch.float32, 20 + 8, 10.0)
    ref = reference.supcon_loss(z64, labels.cpu(), 0.1, normalize=False)
    (ref_grad,) = torch.autograd.grad(ref, [z64])
    check(loss_n, ref.detach(), "loss without normalisation")
    check(grad_n, ref_grad, "gradient without normalisation")


def test_tf32_only_where_torch_allows_it(cuda_source_backend):
    backend = cuda_source_backend
    z = rand((70, 48), torch.float32, backend.device, 10)
    labels = torch.arange(35).repeat(2).to(backend.device)
    args = (z, labels, 0, 70, 1 / 0.1, EPS, True, 1, True)
    previous = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        exact = backend.ops.contrastive_sym_loss(*args)
        torch.backends.cuda.matmul.allow_tf32 = True
        tf32 = backend.ops.contrastive_sym_loss(*args)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    ref_rows, ref_grad = sym_reference(z, labels.cpu(), 1 / 0.1, torch.full((70,), 1 / 70, dtype=torch.float64))
    check = checker(torch.float32, 70 + 48, 1 / 0.1)
    check(exact[0], ref_rows.mean(), "exact loss")
    check(exact[3], ref_grad, "exact gradient")
    # TF32 keeps 10 mantissa bits of each operand: the tiles differ from the exact path.
    assert not torch.equal(exact[1], tf32[1])
    tf32_tol = rtol(torch.float32, length=70 + 48, logit_scale=10, tf32=True)
    assert_close(tf32[0], ref_rows.mean(), tf32_tol, "TF32 loss")
    assert_close(tf32[3], ref_grad, tf32_tol, "TF32 gradient")


@pytest.mark.parametrize("d", [257, 300, 520, 1100])
def test_wide_features(backend, d):
    """More than 256 features (past the fused route's widths): every route takes
    any width. Partial tiles, forward and backward, against float64."""
    test_sym_op(backend, torch.float32, 37, d)
    test_asym_op(backend, torch.float32, 9, 70, d, True)
    test_asym_op(backend, torch.bfloat16, 33, 33, d, False)


@pytest.mark.parametrize("chunk_elements", [1, 3 * 700, 7 * 700 + 5])
def test_gemm_route_chunks(cuda_source_backend, monkeypatch, chunk_elements):
    """The GEMM route takes the anchors in chunks of budget // candidates rows
    (at least one): one row per chunk, and chunks that do not divide the
    anchors, for both ops, forward and backward, against float64."""
    monkeypatch.setenv("SSL_OPS_CONTRASTIVE_CHUNK_ELEMENTS", str(chunk_elements))
    test_sym_op(cuda_source_backend, torch.float32, 66, 130)
    test_sym_op_anchor_range(cuda_source_backend, torch.bfloat16, 260, 65, 195)
    test_asym_op(cuda_source_backend, torch.float32, 65, 700, 64, True)
    test_asym_op_positive_offset(cuda_source_backend, torch.float64, 66, 200, 67)


@pytest.mark.parametrize("form", [LOGSUMEXP, EXCLUDED])
@pytest.mark.parametrize("scale", [5.0, 100.0])
def test_gemm_route_column_splits_merge_both_new_forms(cuda_source_backend, monkeypatch, form, scale):
    """2100 candidates make the row kernels split each row's columns (one split
    per 1024) and a 3-row budget makes several chunks: the positives' partial
    log-sum-exps (their own shift under the running max, scale 100) and the
    negatives-only sums merge across splits. Positives sit 700 columns apart,
    so each row's are in different splits. Anchors [1000, 1006)."""
    backend = cuda_source_backend
    rows, d, begin, end = 2100, 8, 1000, 1006
    monkeypatch.setenv("SSL_OPS_CONTRASTIVE_CHUNK_ELEMENTS", str(3 * rows))
    z = rand((rows, d), torch.float32, backend.device, 30)
    labels = torch.arange(rows).remainder(700)
    anchor = torch.zeros(rows, dtype=torch.bool)
    anchor[begin:end] = True
    weight = anchor.double() / anchor.sum()
    loss, _, _, grad, lse_pos = backend.ops.contrastive_sym_loss(
        z, labels.to(backend.device), begin, end, scale, EPS, True, 1, True, form)
    reference_fn = sym_lse_reference if form == LOGSUMEXP else sym_excluded_reference
    ref_rows, ref_grad = reference_fn(z, labels, scale, weight)
    check = checker(torch.float32, rows + d, scale)
    check(loss, (ref_rows * weight).sum(), "mean loss over anchors")
    check(grad, ref_grad, "forward gradient")
    if form == LOGSUMEXP:
        check(lse_pos, positive_logsumexp(z, labels, scale) * anchor, "lse over the positives")


def test_route_and_budget_settings_are_checked(cuda_source_backend, monkeypatch):
    z = rand((6, 4), torch.float32, cuda_source_backend.device, 1)
    labels = torch.arange(3).repeat(2).to(cuda_source_backend.device)
    monkeypatch.setenv("SSL_OPS_CUDA_CONTRASTIVE_ROUTE", "tiles")
    with pytest.raises(RuntimeError, match=r'SSL_OPS_CUDA_CONTRASTIVE_ROUTE must be "fused" or "gemm", got "tiles"'):
        cuda_source_backend.ops.contrastive_sym_loss(z, labels, 0, 6, 2.0, EPS, True, 1, True)
    monkeypatch.setenv("SSL_OPS_CUDA_CONTRASTIVE_ROUTE", "gemm")
    monkeypatch.setenv("SSL_OPS_CONTRASTIVE_CHUNK_ELEMENTS", "0")
    with pytest.raises(RuntimeError, match=r'SSL_OPS_CONTRASTIVE_CHUNK_ELEMENTS must be a positive integer, got "0"'):
        cuda_source_backend.ops.contrastive_sym_loss(z, labels, 0, 6, 2.0, EPS, True, 1, True)

