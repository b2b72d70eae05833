"""SSL_OPS_EAGER: send an op family to plain PyTorch instead of its kernels.

The escape hatch ``python -m ssl_ops.selftest`` points to when a kernel fails on
a user's GPU: ``SSL_OPS_EAGER=contrastive`` (nt_xent_loss, info_nce_loss, dcl_loss,
siglip_loss and the modules built on them), ``cosine`` (byol_loss, negative_cosine_similarity),
``cosine_matrix``, ``ema``, or ``all``; several are separated by commas. Read
on every call, so it can be set at any time. The eager code computes the same
function (values and gradients, up to rounding) with the memory of the
computation it replaces: the full logits matrix.
"""

import os

import torch
import torch.nn.functional as F

from . import reference

FAMILIES = ("contrastive", "cosine", "cosine_matrix", "ema")


def eager_requested(family):
    if torch.compiler.is_compiling():
        return False  # a compiled graph keeps the op it traced
    value = os.environ.get("SSL_OPS_EAGER", "")
    if not value:
        return False
    names = {name.strip() for name in value.split(",") if name.strip()}
    unknown = names - set(FAMILIES) - {"all"}
    if unknown:
        raise ValueError(f"SSL_OPS_EAGER names unknown op families {sorted(unknown)}; "
                         f"use any of {list(FAMILIES)} or 'all'")
    return family in names or "all" in names


def _accumulation(t):
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _reduce(per_row, reduction, count=None):
    if reduction == "none":
        return per_row
    if reduction == "sum":
        return per_row.sum()
    return per_row.sum() / (per_row.new_tensor(per_row.numel()) if count is None else count.clamp_min(1))


def sym_loss(z, group, temperature, reduction, normalize, eps, anchors=None, positives="mean"):
    """The symmetric contrastive op (NT-Xent, multi-view, SupCon L_out; or the
    positives inside the log) on anchor rows [begin, end) of z against all rows."""
    zf = _accumulation(z)
    if normalize:
        zf = F.normalize(zf, dim=1, eps=eps)
    begin, end = anchors if anchors is not None else (0, z.shape[0])
    logits = zf[begin:end] @ zf.t() / temperature
    rows = torch.arange(begin, end, device=z.device)
    self_mask = rows[:, None] == torch.arange(z.shape[0], device=z.device)[None, :]
    positive_mask = (group[begin:end, None] == group[None, :]) & ~self_mask
    per_row, has_positive = reference.contrastive_row_losses(logits, self_mask, positive_mask, positives)
    return _reduce(per_row, reduction, has_positive.sum())


def asym_loss(query, key, positive_key, temperature, reduction, normalize, eps, positive_offset=0):
    """The asymmetric op: with positive_key, MoCo's [q.k+, q.key] logits and label
    0; without, q.key^T logits and label i + positive_offset."""
    q, k = _accumulation(query), _accumulation(key)
    if normalize:
        q, k = F.normalize(q, dim=1, eps=eps), F.normalize(k, dim=1, eps=eps)
    if positive_key is not None:
        p = _accumulation(positive_key)
        if normalize:
            p = F.normalize(p, dim=1, eps=eps)
        logits = torch.cat([(q * p).sum(1, keepdim=True), q @ k.t()], dim=1) / temperature
        targets = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    else:
        logits = q @ k.t() / temperature
        targets = torch.arange(q.shape[0], device=q.device) + positive_offset
    return F.cross_entropy(logits, targets, reduction=reduction)


def siglip_loss(x, y, scale, bias, positive_offset=0):
    """open_clip's SigLIP loss with the full (N x M) logits (ssl_ops.reference's)."""
    from . import reference

    return reference.siglip_loss(_accumulation(x), _accumulation(y), scale, bias, positive_offset)


def clip_loss(query, key, scale, reduction):
    """The symmetric in-batch InfoNCE on rows as given: (CE(scale q k^T, i) +
    CE(scale k q^T, i)) / 2, with the full (B x B) logits."""
    logits = scale * (_accumulation(query) @ _accumulation(key).t())
    targets = torch.arange(query.shape[0], device=query.device)
    return (F.cross_entropy(logits, targets, reduction=reduction)
            + F.cross_entropy(logits.t(), targets, reduction=reduction)) / 2
