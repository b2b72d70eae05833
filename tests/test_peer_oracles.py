"""Independent implementations as oracles for what is otherwise checked only
against our own reference.py: pytorch-metric-learning's SupConLoss (multi-
positive SupCon, multi-view, rows without positives left out of the mean) and
open_clip's ClipLoss (symmetric InfoNCE). Each is skipped, visibly, when its
package is missing."""

import pytest
import torch
import torch.nn.functional as F

import ssl_ops


def rows(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64)


def grads_close(ours, theirs, inputs_ours, inputs_theirs):
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    for a, b in zip(torch.autograd.grad(ours, inputs_ours), torch.autograd.grad(theirs, inputs_theirs)):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("temperature", [0.07, 0.5])
def test_supcon_matches_pytorch_metric_learning(temperature):
    losses = pytest.importorskip("pytorch_metric_learning.losses")
    z = rows(120, 16, 1)
    labels = torch.randint(0, 15, (120,), generator=torch.Generator().manual_seed(2))
    labels[7] = 1000  # no positives: adds nothing, left out of the mean (by both)
    ours_in, theirs_in = z.clone().requires_grad_(), z.clone().requires_grad_()
    ours = ssl_ops.nt_xent_loss(ours_in, labels=labels, temperature=temperature)
    theirs = losses.SupConLoss(temperature=temperature)(theirs_in, labels)
    grads_close(ours, theirs, [ours_in], [theirs_in])


@pytest.mark.parametrize("num_views", [2, 4])
def test_multi_view_matches_pytorch_metric_learning(num_views):
    losses = pytest.importorskip("pytorch_metric_learning.losses")
    views = [rows(24, 12, 10 + v) for v in range(num_views)]
    ours_in = [v.clone().requires_grad_() for v in views]
    theirs_in = torch.cat(views).requires_grad_()
    ours = ssl_ops.nt_xent_loss(ours_in, temperature=0.2)
    theirs = losses.SupConLoss(temperature=0.2)(theirs_in, torch.arange(24).repeat(num_views))
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    ours_grad = torch.cat(torch.autograd.grad(ours, ours_in))
    (theirs_grad,) = torch.autograd.grad(theirs, [theirs_in])
    torch.testing.assert_close(ours_grad, theirs_grad, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("logit_scale", [1 / 0.07, 10.0])
def test_symmetric_info_nce_matches_open_clip(logit_scale):
    open_clip_loss = pytest.importorskip("open_clip.loss")
    # open_clip normalises in the model, not in the loss: unit rows, normalize=False.
    image, text = F.normalize(rows(40, 32, 3), dim=1), F.normalize(rows(40, 32, 4), dim=1)
    ours_in = [image.clone().requires_grad_(), text.clone().requires_grad_()]
    theirs_in = [image.clone().requires_grad_(), text.clone().requires_grad_()]
    ours = ssl_ops.info_nce_loss(*ours_in, temperature=1 / logit_scale, symmetric=True, normalize=False)
    theirs = open_clip_loss.ClipLoss()(*theirs_in, torch.tensor(logit_scale, dtype=torch.float64))
    grads_close(ours, theirs, ours_in, theirs_in)
