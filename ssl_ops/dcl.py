"""Decoupled contrastive learning (DCL, DCLW; Yeh et al. 2021) as lightly
computes it, on the symmetric contrastive kernels: the negatives' log-sum-exp
of each row comes from the op with its positives excluded (no logits matrix),
the positive term -w_i s_i / T is a row-wise dot product added here, so any
weight_fn (with or without gradient) is differentiated as lightly's is."""

import torch
import torch.nn.functional as F

from . import distributed
from .contrastive import _check_temperature, _check_view, _gathered_sym_loss, _sym_loss


def negative_mises_fisher_weights(out0, out1, sigma=0.5):
    """lightly's DCLW weights: ``2 - N * softmax(<out0_i, out1_i> / sigma)`` over
    the batch, on detached inputs (no gradient through the weights)."""
    # lightly's einsum("nm,nm->n") as a product and a sum in the accumulation
    # type: einsum runs row-wise dots as a batched GEMM (one more vendor call).
    acc = torch.promote_types(out0.dtype, torch.float32)
    similarity = (out0.detach().to(acc) * out1.detach().to(acc)).sum(1).to(out0.dtype) / sigma
    return 2 - out0.shape[0] * F.softmax(similarity, dim=0)


def dcl_loss(z0, z1, temperature=0.1, weight_fn=None, gather_distributed=False):
    """lightly's ``DCLLoss(temperature, weight_fn, gather_distributed)(z0, z1)``.

    Rows are L2-normalised; for each row of each view the loss is
    ``-w_i s(i, i') / T + logsumexp_j s(i, j) / T`` over every row j of both
    views except the row itself and its other view i' (the positive left out
    of the denominator), ``w = weight_fn(z0_hat, z1_hat)`` (and
    ``weight_fn(z1_hat, z0_hat)`` for the second view; 1 without weight_fn);
    the result is the mean over the 2N rows. ``gather_distributed``: the
    negatives come from every rank's rows (gathered with gradient).
    """
    _check_temperature(temperature)
    _check_view("z0", z0)
    _check_view("z1", z1, z0, "z0")
    if z1.dtype != z0.dtype or z1.device != z0.device:
        raise ValueError(
            f"z0 and z1 must share dtype and device, got {z0.dtype} on {z0.device} and {z1.dtype} on {z1.device}"
        )
    batch = z0.shape[0]
    z = torch.cat([z0, z1])
    group = torch.arange(batch, device=z.device).repeat(2)
    if gather_distributed and distributed.world_size() > 1:
        offsets = torch.arange(distributed.world_size(), device=z.device) * batch
        negatives = _gathered_sym_loss(z, (offsets[:, None] + group).reshape(-1), temperature, "mean", True,
                                       "excluded")
    else:
        negatives = _sym_loss(z, group, temperature, "mean", True, positives="excluded")
    accumulate = torch.float64 if z0.dtype == torch.float64 else torch.float32
    z0_hat = F.normalize(z0.to(accumulate), dim=1)
    z1_hat = F.normalize(z1.to(accumulate), dim=1)
    similarity = (z0_hat * z1_hat).sum(1) / temperature
    if weight_fn:
        positive = similarity * weight_fn(z0_hat, z1_hat) + similarity * weight_fn(z1_hat, z0_hat)
    else:
        positive = 2 * similarity
    return negatives - positive.mean() / 2
