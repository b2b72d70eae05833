"""The fused route's gradient pass (csrc/cuda/contrastive_fused_grad.cuh) on
the emulator (bf16/fp16, and fp32 as TF32, up to 256 features): NT-Xent /
SupCon / DCL gradients in one pass over the pairs (G + G^T) z, anchor ranges in two (rows and columns swapped), InfoNCE's d key
for MoCo v3 and CLIP, the forward with a gradient and the backward ops, all
against float64, with proof that the fused kernels ran and no vendor GEMM did."""

import pytest
import torch
import torch.nn.functional as F

from ssl_ops import emulation, reference
from test_contrastive_kernels import (EPS, EXCLUDED, LOGSUMEXP, checker, rand, sym_excluded_reference,
                                      sym_lse_reference, sym_reference)
from test_fused_route import (MEAN, PLAIN_TILES_ADD_NOTHING, PLANTED_BUGS, PLANTED_CASES, TF32,  # noqa: F401
                              as_dtype, assert_planted_bug_fails, emu, fused_checker, fused_dtype,
                              fused_kernel_runs, skip_past_the_fused_width, tf32_allowed)

pytestmark = pytest.mark.emu

SYM_REFERENCES = {MEAN: sym_reference, LOGSUMEXP: sym_lse_reference, EXCLUDED: sym_excluded_reference}


def group_labels(rows, seed):
    """Groups of 1 to 4 rows (0 to 3 positives), shuffled."""
    sizes = torch.tensor([1, 2, 3, 4])
    labels = torch.repeat_interleave(torch.arange(rows), sizes.repeat(rows)[:rows])[:rows]
    return labels[torch.randperm(rows, generator=torch.Generator().manual_seed(seed))]


def sym_case(emu, z, labels, begin, end, scale, form):
    """Forward with a gradient (mean over anchors with positives) and the
    backward op for random row weights, both on the fused route, against float64."""
    rows = z.shape[0]
    same = labels[:, None] == labels[None, :]
    anchor = torch.zeros(rows, dtype=torch.bool)
    anchor[begin:end] = True
    valid = ((same.sum(1) - 1) > 0) & anchor
    tf32 = z.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    check = checker(z.dtype, rows + z.shape[1], scale, tf32=tf32)
    with fused_kernel_runs():
        loss, lse, count, grad, lse_pos = emu.ops.contrastive_sym_loss(z, labels, begin, end, scale, EPS, True, 1,
                                                                       True, form)
    weight = valid.double() / max(int(valid.sum()), 1)
    ref_rows, ref_grad = SYM_REFERENCES[form](z, labels, scale, weight)
    check(loss, (ref_rows * weight).sum(), "mean loss")
    check(grad, ref_grad, "forward gradient")
    row_weight = rand((rows,), torch.float64, "cpu", 60)
    with fused_kernel_runs():
        grad_b = emu.ops.contrastive_sym_backward(row_weight.float(), z, labels, begin, end, lse, count, scale, EPS,
                                                  True, 0, lse_pos if form == LOGSUMEXP else None, form)
    _, ref_grad_b = SYM_REFERENCES[form](z, labels, scale, row_weight * valid)
    check(grad_b, ref_grad_b, "backward gradient")


@pytest.mark.parametrize("rows,d", [(2, 8), (63, 64), (130, 40), (200, 128), (65, 72), (70, 136), (130, 256)])
@pytest.mark.parametrize("form", [MEAN, LOGSUMEXP, EXCLUDED], ids=["mean", "logsumexp", "excluded"])
def test_sym_gradient_every_row_an_anchor(emu, fused_dtype, rows, d, form):
    """Every row an anchor: one pass forms both terms of each pair (kBoth);
    partial row blocks and column tiles, D from one 16-byte chunk to 256."""
    skip_past_the_fused_width(fused_dtype, d)
    z = rand((rows, d), as_dtype(fused_dtype), "cpu", 61)
    sym_case(emu, z, group_labels(rows, 62), 0, rows, 1 / 0.1, form)


@pytest.mark.parametrize("rows,begin,end,d", [(200, 0, 70, 64), (200, 130, 200, 64), (260, 65, 195, 64),
                                              (140, 1, 2, 64), (130, 20, 90, 256)])
@pytest.mark.parametrize("form", [MEAN, LOGSUMEXP], ids=["mean", "logsumexp"])
def test_sym_gradient_anchor_range(emu, fused_dtype, rows, begin, end, d, form):
    """The anchors of one process (gathered rows): d z from the anchors' rows
    (kRows) plus every row as a candidate (kColumns), self by global index."""
    skip_past_the_fused_width(fused_dtype, d)
    z = rand((rows, d), as_dtype(fused_dtype), "cpu", 63)
    sym_case(emu, z, torch.arange(rows).remainder(rows // 3), begin, end, 1 / 0.3, form)


@pytest.mark.parametrize("scale", [-3.0, 1 / 0.5, 1 / 0.05])
def test_sym_gradient_scales(emu, scale):
    """Negative and large scales: exp(s - lse) with s up to |scale| = 20."""
    z = rand((100, 32), torch.float16, "cpu", 64)
    sym_case(emu, z, torch.arange(100).remainder(50), 0, 100, scale, MEAN)


@pytest.mark.parametrize("batch,keys,offset,d", [(1, 1, 0, 48), (70, 70, 0, 48), (66, 200, 67, 48),
                                                (130, 260, 130, 48), (70, 140, 70, 256)])
def test_asym_key_gradient(emu, fused_dtype, batch, keys, offset, d):
    """MoCo v3 and CLIP (one direction), keys gathered: d query from the
    statistics pass, d key by the pass with rows and columns swapped."""
    skip_past_the_fused_width(fused_dtype, d)
    dtype = as_dtype(fused_dtype)
    q = rand((batch, d), dtype, "cpu", 65)
    k = rand((keys, d), dtype, "cpu", 66)
    scale = 1 / 0.2
    mask = [True, True, False]
    with fused_kernel_runs():
        loss, lse, gq, gk, _ = emu.ops.contrastive_asym_loss(q, k, None, offset, scale, EPS, True, 1, mask)
    check = fused_checker(fused_dtype, keys + d, scale, degenerate=(q, k) if keys == 1 else ())
    q64, k64 = (t.double().requires_grad_() for t in (q, k))
    logits = F.normalize(q64, dim=1) @ F.normalize(k64, dim=1).t() * scale
    ref_rows = F.cross_entropy(logits, torch.arange(batch) + offset, reduction="none")
    ref_grads = torch.autograd.grad(ref_rows.mean(), [q64, k64], retain_graph=True)
    check(loss, ref_rows.mean().detach(), "mean loss")
    check(gq, ref_grads[0], "grad query")
    check(gk, ref_grads[1], "grad key")
    weight = rand((batch,), torch.float64, "cpu", 67)
    ref_grads = torch.autograd.grad((ref_rows * weight).sum(), [q64, k64])
    with fused_kernel_runs():
        grads = emu.ops.contrastive_asym_backward(weight.float(), q, k, None, offset, lse, scale, EPS, True, 0, mask)
    check(grads[0], ref_grads[0], "backward grad query", weight=weight.abs().max())
    check(grads[1], ref_grads[1], "backward grad key", weight=weight.abs().max())


def test_moco_queue_gradient(emu, fused_dtype):
    """MoCo with every input taking a gradient (a queue that is a parameter)."""
    dtype = as_dtype(fused_dtype)
    q, k, queue = (rand(shape, dtype, "cpu", s) for shape, s in (((65, 64), 68), ((65, 64), 69), ((300, 64), 70)))
    mask = [True, True, True]
    with fused_kernel_runs():
        loss, lse, gq, gqueue, gk = emu.ops.contrastive_asym_loss(q, queue, k, 0, 1 / 0.2, EPS, True, 1, mask)
    inputs = [t.double().requires_grad_() for t in (q, k, queue)]
    ref = reference.info_nce_loss(*inputs, temperature=0.2)
    ref_grads = torch.autograd.grad(ref, inputs)
    check = fused_checker(fused_dtype, 65 + 300 + 64, 1 / 0.2)
    check(loss, ref.detach(), "mean loss")
    check(gq, ref_grads[0], "grad query")
    check(gk, ref_grads[1], "grad positive key")
    check(gqueue, ref_grads[2], "grad queue")


def test_gradient_pass_outputs_are_deterministic(emu):
    """No float atomics: two runs give the same bits."""
    z = rand((200, 64), torch.bfloat16, "cpu", 71)
    labels = torch.arange(200).remainder(100)
    first = emu.ops.contrastive_sym_loss(z, labels, 0, 200, 10.0, EPS, True, 1, True)[3]
    second = emu.ops.contrastive_sym_loss(z, labels, 0, 200, 10.0, EPS, True, 1, True)[3]
    assert torch.equal(first, second)


@PLANTED_BUGS
@PLANTED_CASES
def test_planted_primitive_bugs_fail_the_gradient_tests(emu, bug, dtype, d):
    z = rand((130, d), as_dtype(dtype), "cpu", 72)
    labels = torch.arange(130).remainder(65)
    with tf32_allowed(dtype == TF32):
        assert_planted_bug_fails(emu, bug, lambda: sym_case(emu, z, labels, 0, 130, 1 / 0.1, MEAN))


def clustered(rows, d, dtype, seed):
    """Rows around one direction (pairwise cosines near 0.8): the softmax-weighted
    sums over the candidates are as large as the positives' terms, so leaving
    out part of them shows at the dtype's tolerance."""
    g = torch.Generator().manual_seed(seed)
    direction = torch.randn(d, generator=g, dtype=torch.float64)
    rows = direction / direction.norm() + 0.5 * torch.randn(rows, d, generator=g, dtype=torch.float64) / d**0.5
    return rows.to(dtype)


# Shapes whose warps meet whole plain tiles (Note [Fused plain tiles]): NT-Xent
# pairs over 300 rows (the positive of row r is r +- 150, so two of a warp's
# five column tiles hold neither its self nor its positives), MoCo against a
# 400-row queue (every whole tile plain), MoCo v3 with keys gathered (positives
# offset by 70).
PAIRS = torch.arange(300).remainder(150)


def check_plain_statistics(emu, dtype, monkeypatch):
    """The statistics pass, against the GEMM route from the same operands (fp32 sums apart)."""
    from test_fused_route import sym_rows

    z = clustered(300, 64, as_dtype(dtype), 73)
    rows, *_ = sym_rows(emu, z, PAIRS, 0, 300, 1 / 0.2, MEAN, monkeypatch)
    ref_rows, _ = SYM_REFERENCES[MEAN](z, PAIRS, 1 / 0.2, torch.ones(300, dtype=torch.float64))
    fused_checker(dtype, 364, 1 / 0.2)(rows, ref_rows, "row losses")


def check_plain_gradient(emu, dtype, lse, count):
    """The gradient pass alone: the backward op from given statistics, against float64."""
    z = clustered(300, 64, as_dtype(dtype), 73)
    weight = rand((300,), torch.float64, "cpu", 60)
    with fused_kernel_runs():
        grad = emu.ops.contrastive_sym_backward(weight.float(), z, PAIRS, 0, 300, lse, count, 1 / 0.2, EPS, True, 0,
                                                None, MEAN)
    _, ref_grad = SYM_REFERENCES[MEAN](z, PAIRS, 1 / 0.2, weight)
    fused_checker(dtype, 364, 1 / 0.2)(grad, ref_grad, "backward gradient")


def check_plain_moco(emu, dtype):
    """d query from the statistics pass (MoCo), d key from the gradient pass (MoCo v3), against float64."""
    real = as_dtype(dtype)
    q, k, queue = (clustered(rows, 64, real, seed) for rows, seed in ((70, 74), (70, 75), (400, 76)))
    with fused_kernel_runs():
        loss, _, gq, _, _ = emu.ops.contrastive_asym_loss(q, queue, k, 0, 1 / 0.2, EPS, True, 1, [True, False, False])
    q64 = q.double().requires_grad_()
    ref = reference.info_nce_loss(q64, k.double(), queue.double(), temperature=0.2)
    check = fused_checker(dtype, 70 + 400 + 64, 1 / 0.2)
    check(loss, ref.detach(), "MoCo loss")
    check(gq, torch.autograd.grad(ref, [q64])[0], "MoCo grad query")
    keys = clustered(300, 64, real, 77)
    with fused_kernel_runs():
        loss, _, gq, gk, _ = emu.ops.contrastive_asym_loss(q, keys, None, 70, 1 / 0.2, EPS, True, 1, [True, True, False])
    q64, k64 = q.double().requires_grad_(), keys.double().requires_grad_()
    logits = F.normalize(q64, dim=1) @ F.normalize(k64, dim=1).t() / 0.2
    ref = F.cross_entropy(logits, torch.arange(70) + 70)
    ref_gq, ref_gk = torch.autograd.grad(ref, [q64, k64])
    check = fused_checker(dtype, 70 + 300 + 64, 1 / 0.2)
    check(loss, ref.detach(), "MoCo v3 loss")
    check(gq, ref_gq, "MoCo v3 grad query")
    check(gk, ref_gk, "MoCo v3 grad key")


def plain_statistics(emu, dtype):
    z = clustered(300, 64, as_dtype(dtype), 73)
    _, lse, count, *_ = emu.ops.contrastive_sym_loss(z, PAIRS, 0, 300, 1 / 0.2, EPS, True, 0, False)
    return lse, count


def test_plain_tiles(emu, fused_dtype, monkeypatch):
    check_plain_statistics(emu, fused_dtype, monkeypatch)
    check_plain_gradient(emu, fused_dtype, *plain_statistics(emu, fused_dtype))
    check_plain_moco(emu, fused_dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, TF32], ids=str)
def test_planted_plain_tile_bug_fails_each_pass(emu, dtype, monkeypatch):
    """Plain tiles that add nothing fail the statistics pass's check, the
    gradient pass's (statistics computed without the bug) and the MoCo checks:
    the plain path runs in each pass and is checked."""
    with tf32_allowed(dtype == TF32):
        statistics = plain_statistics(emu, dtype)
        module = emulation.load()
        module.set_planted_bug(PLAIN_TILES_ADD_NOTHING)
        try:
            for check in (lambda: check_plain_statistics(emu, dtype, monkeypatch),
                          lambda: check_plain_gradient(emu, dtype, *statistics),
                          lambda: check_plain_moco(emu, dtype)):
                with pytest.raises(AssertionError):
                    check()
        finally:
            module.set_planted_bug(0)
