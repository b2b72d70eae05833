"""SigLIP's pairwise sigmoid loss (Zhai et al. 2023) as open_clip's SigLipLoss
computes it, without the (N x M) logits: the kernels take the similarities a
chunk of image rows at a time and form every gradient (features, scale, bias)
in the same pass (Note [SigLIP loss] in csrc/siglip_check.h)."""

import torch
from torch import nn

from . import _extension  # noqa: F401  (registers torch.ops.ssl_ops)
from . import _fallback, distributed
from .contrastive import _check_view


@torch.library.register_fake("ssl_ops::siglip_loss")
def _siglip_fake(x, y, scale, bias, positive_offset, compute_grad):
    loss = x.new_empty((), dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    if not compute_grad:
        return loss, *(x.new_empty((0,)) for _ in range(4))
    grad_bias = bias.new_empty(bias.shape) if bias is not None else x.new_empty((0,))
    return loss, x.new_empty(x.shape), y.new_empty(y.shape), scale.new_empty(scale.shape), grad_bias


def _setup_context(ctx, inputs, output):
    x, y, scale, bias, positive_offset, compute_grad = inputs
    _, grad_x, grad_y, grad_scale, grad_bias = output
    ctx.computed = compute_grad
    if compute_grad:
        ctx.save_for_backward(grad_x, grad_y, grad_scale, grad_bias)
    else:  # called with compute_grad=False under autograd: the backward runs the op again
        ctx.save_for_backward(x, y, scale, bias)
        ctx.positive_offset = positive_offset


def _backward(ctx, grad_loss, *_unused):
    if torch.is_grad_enabled():
        raise RuntimeError("ssl_ops: double backward through siglip_loss is not supported")
    grads = ctx.saved_tensors
    if not ctx.computed:
        x, y, scale, bias = grads
        grads = torch.ops.ssl_ops.siglip_loss(x, y, scale, bias, ctx.positive_offset, True)[1:]
    out = [g * grad_loss.to(g.dtype) if need else None for g, need in zip(grads, ctx.needs_input_grad[:4])]
    return out[0], out[1], out[2], out[3], None, None


torch.library.register_autograd("ssl_ops::siglip_loss", _backward, setup_context=_setup_context)


def _as_scalar_tensor(value, name, like):
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (int, float)):
        return torch.tensor(float(value), dtype=torch.float32, device=like.device)
    raise TypeError(f"{name} must be a tensor or a number, got {type(value).__name__}")


def siglip_loss(image_features, text_features, logit_scale, logit_bias=None, *, gather_distributed=False):
    """open_clip's SigLIP loss: ``logits = logit_scale * x @ y.T (+ logit_bias)``,
    labels +1 on the diagonal and -1 elsewhere,
    ``loss = -sum(logsigmoid(labels * logits)) / N``.

    Features are used as given (open_clip normalises them in the model);
    ``logit_scale`` is the multiplier (the model's ``logit_scale.exp()``), a
    one-element tensor (or a number); ``logit_bias`` likewise or None. Gradients
    go to the features, the scale and the bias, formed in the forward pass
    when anything requires grad. fp16/bf16 features accumulate in float32 and
    the loss is float32. Never an N x N buffer.

    ``gather_distributed=True`` (torch.distributed with more than one
    process): this rank's images against every rank's texts (gathered with
    gradient), the positive of image i being this rank's text i; the loss is
    divided by this rank's N, so with DDP's gradient averaging the update is
    one process's on the whole batch (the all-gather form of open_clip's
    neighbour exchange). Every rank must pass the same batch size.

    ``image_features`` and ``text_features`` must have the same number of rows
    (this rank's, before any gathering): image i's positive is text i, and a
    mismatch is a ValueError naming both sizes, where open_clip's
    ``SigLipLoss`` fails on the shapes (or, with one row, broadcasts). A larger
    text set is only the gathered one; the op underneath,
    ``torch.ops.ssl_ops.siglip_loss(x, y, scale, bias, positive_offset,
    compute_grad)``, takes any ``y`` with at least ``N + positive_offset``
    rows, the positive of image i being text ``i + positive_offset``.
    """
    _check_view("image_features", image_features)
    _check_view("text_features", text_features)
    if text_features.shape[0] != image_features.shape[0]:
        # open_clip builds (N x N) labels for (N x M) logits and raises on the
        # product; where it broadcasts instead (N or M = 1) its labels mean
        # nothing. The larger text set SigLIP means is the gathered one.
        raise ValueError(
            f"ssl_ops.siglip_loss: image_features has {image_features.shape[0]} rows but text_features has "
            f"{text_features.shape[0]}: text i is the positive of image i, so the batches must be the same "
            f"size (open_clip's SigLipLoss raises here too); for every rank's texts use gather_distributed=True")
    logit_scale = _as_scalar_tensor(logit_scale, "logit_scale", image_features)
    if logit_bias is not None:
        logit_bias = _as_scalar_tensor(logit_bias, "logit_bias", image_features)
    offset = 0
    if gather_distributed and distributed.world_size() > 1:
        offset = distributed.rank() * image_features.shape[0]
        text_features = distributed.gather_with_grad(text_features)
    if _fallback.eager_requested("contrastive"):
        return _fallback.siglip_loss(image_features, text_features, logit_scale, logit_bias, offset)
    tensors = (image_features, text_features, logit_scale, logit_bias)
    compute_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    return torch.ops.ssl_ops.siglip_loss(image_features, text_features, logit_scale, logit_bias, offset,
                                         compute_grad)[0]


class SigLipLoss(nn.Module):
    """open_clip's ``SigLipLoss`` forward, ``forward(image_features,
    text_features, logit_scale, logit_bias=None, output_dict=False)``, on
    ``ssl_ops.siglip_loss``; ``gather_distributed=True`` scores this rank's
    images against every rank's texts (see ``siglip_loss``)."""

    def __init__(self, gather_distributed: bool = False):
        super().__init__()
        self.gather_distributed = gather_distributed

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict=False):
        loss = siglip_loss(image_features, text_features, logit_scale, logit_bias,
                           gather_distributed=self.gather_distributed)
        return {"contrastive_loss": loss} if output_dict else loss
