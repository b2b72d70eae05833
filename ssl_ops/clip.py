"""CLIP's symmetric InfoNCE (open_clip's ``ClipLoss``, MoCo v3 symmetric) from
one similarity matrix that is never stored whole: both directions' log-sum-exps
come from the same chunks of S, and one more pass forms every gradient
(features and the logit scale) in the forward (Note [Symmetric InfoNCE] in
csrc/clip_check.h): 4 GEMMs of B^2 D where two InfoNCE calls take 6."""

import torch
from torch import nn

from . import _extension  # noqa: F401  (registers torch.ops.ssl_ops)
from . import _fallback, distributed
from .contrastive import _asym_loss, _check_view
from .siglip import _as_scalar_tensor

_REDUCTIONS = {"mean": 1, "sum": 2}


@torch.library.register_fake("ssl_ops::contrastive_clip_loss")
def _clip_fake(query, key, scale, reduction, compute_grad):
    loss = query.new_empty((), dtype=torch.float64 if query.dtype == torch.float64 else torch.float32)
    if not compute_grad:
        return loss, *(query.new_empty((0,)) for _ in range(3))
    return loss, query.new_empty(query.shape), key.new_empty(key.shape), scale.new_empty(scale.shape)


def _setup_context(ctx, inputs, output):
    query, key, scale, reduction, compute_grad = inputs
    ctx.computed = compute_grad
    if compute_grad:
        ctx.save_for_backward(*output[1:])
    else:  # called with compute_grad=False under autograd: the backward runs the op again
        ctx.save_for_backward(query, key, scale)
        ctx.reduction = reduction


def _backward(ctx, grad_loss, *_unused):
    if torch.is_grad_enabled():
        raise RuntimeError("ssl_ops: double backward through contrastive_clip_loss is not supported")
    grads = ctx.saved_tensors
    if not ctx.computed:
        query, key, scale = grads
        grads = torch.ops.ssl_ops.contrastive_clip_loss(query, key, scale, ctx.reduction, True)[1:]
    out = [g * grad_loss.to(g.dtype) if need else None for g, need in zip(grads, ctx.needs_input_grad[:3])]
    return out[0], out[1], out[2], None, None


torch.library.register_autograd("ssl_ops::contrastive_clip_loss", _backward, setup_context=_setup_context)


def _scale_tensor(value, name, like):
    # A number becomes a 0-dim tensor on like's device (a fill, no host sync),
    # float64 for float64 rows so that 1 / T is not rounded to float32.
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
        return torch.full((), float(value), dtype=dtype, device=like.device)
    return _as_scalar_tensor(value, name, like)


def symmetric_info_nce(query, key, scale, reduction="mean"):
    """(CE(scale q k^T, i) + CE(scale k q^T, i)) / 2 on the rows as given, from
    one S; ``scale`` a one-element tensor (gradients reach it) or a number.
    ``reduction`` "mean" or "sum" (the per-row form is two InfoNCE calls)."""
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be 'mean' or 'sum' for the joint symmetric loss, got {reduction!r}")
    scale = _scale_tensor(scale, "scale", query)
    if _fallback.eager_requested("contrastive"):
        return _fallback.clip_loss(query, key, scale, reduction)
    compute_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, scale))
    return torch.ops.ssl_ops.contrastive_clip_loss(query, key, scale, _REDUCTIONS[reduction], compute_grad)[0]


def _gather_global(x, rank, world_size, with_grad):
    # open_clip's gather_features without local_loss: every rank's rows; with
    # gather_with_grad=False, the others' detached and this rank's own in place.
    if with_grad:
        return distributed.gather_with_grad(x)
    parts = list(distributed.gather(x).chunk(world_size, dim=0))
    parts[rank] = x
    return torch.cat(parts)


def clip_loss(image_features, text_features, logit_scale, logit_bias=None, *, local_loss=False,
              gather_with_grad=False, rank=None, world_size=None):
    """open_clip's ``ClipLoss``: ``logits = logit_scale * image @ text.T`` (+
    ``logit_bias``, which cross-entropy ignores: its gradient is 0), labels on
    the diagonal, ``(CE(logits, labels) + CE(logits.T, labels)) / 2``.

    Features are used as given (open_clip normalises them in the model);
    ``logit_scale`` is the multiplier (the model's ``logit_scale.exp()``), a
    one-element tensor or a number; gradients reach the features and the scale.

    With torch.distributed and ``world_size > 1`` (default: the process
    group's), open_clip's two modes:

    * ``local_loss=False`` (global): every rank scores all rows against all
      rows; one joint call on the gathered features (``gather_with_grad``: the
      gather is differentiable, its backward summing over ranks as
      ``torch.distributed.nn.all_gather``'s; else only this rank's rows carry
      gradient).
    * ``local_loss=True``: this rank's images against every rank's texts and
      this rank's texts against every rank's images, labels offset by
      ``rank * B``. These are two different matrices, so two asymmetric
      InfoNCE calls, each without the logits matrix, stay the exact form.
    """
    _check_view("image_features", image_features)
    _check_view("text_features", text_features, image_features, "image_features")
    if text_features.dtype != image_features.dtype or text_features.device != image_features.device:
        raise ValueError(f"text_features must share image_features's dtype and device, got {text_features.dtype} "
                         f"on {text_features.device} and {image_features.dtype} on {image_features.device}")
    scale = _scale_tensor(logit_scale, "logit_scale", image_features)
    world_size = distributed.world_size() if world_size is None else world_size
    rank = distributed.rank() if rank is None else rank
    if world_size > 1 and local_loss:
        gather = distributed.gather_with_grad if gather_with_grad else distributed.gather
        offset = rank * image_features.shape[0]
        # scale * rows as the queries (unnormalised, temperature 1): d scale by autograd.
        per_image = _asym_loss(image_features * scale.reshape(()), gather(text_features), None, 1.0, "mean", False,
                               offset)
        per_text = _asym_loss(text_features * scale.reshape(()), gather(image_features), None, 1.0, "mean", False,
                              offset)
        loss = (per_image + per_text) / 2
    else:
        if world_size > 1:
            image_features = _gather_global(image_features, rank, world_size, gather_with_grad)
            text_features = _gather_global(text_features, rank, world_size, gather_with_grad)
        loss = symmetric_info_nce(image_features, text_features, scale)
    if logit_bias is not None and isinstance(logit_bias, torch.Tensor) and logit_bias.requires_grad:
        loss = loss + 0 * logit_bias.sum()  # the bias shifts every logit: cross-entropy's gradient is 0
    return loss


class ClipLoss(nn.Module):
    """open_clip's ``ClipLoss``: the same constructor (``local_loss``,
    ``gather_with_grad``, ``cache_labels``, ``rank``, ``world_size``,
    ``use_horovod``) and ``forward(image_features, text_features, logit_scale,
    logit_bias=None, output_dict=False)``, on ``ssl_ops.clip_loss``. Labels
    are never built, so ``cache_labels`` has nothing to cache; horovod is not
    supported."""

    def __init__(self, local_loss=False, gather_with_grad=False, cache_labels=False, rank=0, world_size=1,
                 use_horovod=False):
        super().__init__()
        if use_horovod:
            raise ValueError("ssl_ops.ClipLoss gathers with torch.distributed; use_horovod=True is not supported")
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.use_horovod = use_horovod

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict=False):
        loss = clip_loss(image_features, text_features, logit_scale, logit_bias, local_loss=self.local_loss,
                         gather_with_grad=self.gather_with_grad, rank=self.rank, world_size=self.world_size)
        return {"contrastive_loss": loss} if output_dict else loss
