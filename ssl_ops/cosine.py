"""Row-wise cosine losses (BYOL, SimSiam): one fused kernel per direction."""

import torch
import torch.nn.functional as F

from . import _extension  # noqa: F401  (registers torch.ops.ssl_ops)
from . import _fallback
from .contrastive import _check_reduction, _loss_dtype, _no_context, _no_double_backward


@torch.library.register_fake("ssl_ops::cosine_rows")
def _cosine_rows_fake(x0, x1, eps):
    return x0.new_empty((x0.shape[0],), dtype=_loss_dtype(x0.dtype))


@torch.library.register_fake("ssl_ops::cosine_rows_backward")
def _cosine_rows_backward_fake(grad, x0, x1, eps, grad_mask):
    return (
        x0.new_empty(x0.shape if grad_mask[0] else (0,)),
        x1.new_empty(x1.shape if grad_mask[1] else (0,)),
    )


def _save_pair_and_eps(ctx, inputs, output):
    """setup_context of both ops: (x0, x1) or (a, b), then eps."""
    first, second, eps = inputs
    ctx.save_for_backward(first, second)
    ctx.eps = eps


def _cosine_backward(ctx, grad):
    if torch.is_grad_enabled():
        _no_double_backward(ctx)
    x0, x1 = ctx.saved_tensors
    mask = list(ctx.needs_input_grad[:2])
    g0, g1 = torch.ops.ssl_ops.cosine_rows_backward(grad, x0, x1, ctx.eps, mask)
    return (g0 if mask[0] else None), (g1 if mask[1] else None), None


torch.library.register_autograd("ssl_ops::cosine_rows", _cosine_backward, setup_context=_save_pair_and_eps)
torch.library.register_autograd("ssl_ops::cosine_rows_backward", _no_double_backward, setup_context=_no_context)


def _rows(x0, x1, dim):
    """x0 and x1 broadcast to one shape, with `dim` moved last and the rest flattened."""
    if not isinstance(x0, torch.Tensor) or not isinstance(x1, torch.Tensor):
        raise TypeError(f"x0 and x1 must be tensors, got {type(x0).__name__} and {type(x1).__name__}")
    if x0.dtype != x1.dtype or x0.device != x1.device:
        raise ValueError(
            f"x0 and x1 must share dtype and device, got {x0.dtype} on {x0.device} and {x1.dtype} on {x1.device}"
        )
    try:
        a, b = torch.broadcast_tensors(x0, x1)
    except RuntimeError as error:
        raise ValueError(f"x0 {tuple(x0.shape)} and x1 {tuple(x1.shape)} do not broadcast") from error
    if a.dim() == 0:
        raise ValueError("x0 and x1 need at least one dimension")
    if not -a.dim() <= dim < a.dim():
        raise ValueError(f"dim {dim} is out of range for tensors of shape {tuple(a.shape)}")
    a, b = a.movedim(dim, -1), b.movedim(dim, -1)
    features = a.shape[-1]
    return a.reshape(-1, features), b.reshape(-1, features), a.shape[:-1]


def byol_loss(p, z, *, reduction="mean"):
    """BYOL's loss ``2 - 2 * cos(p_i, z_i)`` over the rows of p and z (B, D),
    averaged by default (``reduction``: "mean", "sum" or "none"). As in BYOL
    code, the caller detaches the target z; gradients flow to whichever input
    requires grad. Cosine with F.cosine_similarity's eps (1e-8, each norm
    clamped on its own); float32 accumulation; the loss is float32 for
    fp16/bf16 inputs."""
    code = _check_reduction(reduction)
    if p.dim() != 2:
        raise ValueError(f"p must be a 2-D (batch, features) tensor, got shape {tuple(p.shape)}")
    if z.shape != p.shape:
        raise ValueError(f"z has shape {tuple(z.shape)} but p has shape {tuple(p.shape)}")
    a, b, _ = _rows(p, z, 1)
    loss = 2 - 2 * _cosine_rows(a, b, 1e-8)
    if code == 0:
        return loss
    return loss.sum() if code == 2 else loss.mean()


def negative_cosine_similarity(x0, x1, dim=1, eps=1e-8):
    """lightly's ``NegativeCosineSimilarity``: ``-F.cosine_similarity(x0, x1, dim, eps).mean()``,
    broadcasting as F.cosine_similarity does, from one fused kernel per direction."""
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")
    a, b, _ = _rows(x0, x1, dim)
    return -_cosine_rows(a, b, float(eps)).mean()


def _cosine_rows(a, b, eps):
    if _fallback.eager_requested("cosine"):
        cos = F.cosine_similarity(a.float() if a.dtype in (torch.float16, torch.bfloat16) else a,
                                  b.float() if b.dtype in (torch.float16, torch.bfloat16) else b, dim=1, eps=eps)
        return cos
    return torch.ops.ssl_ops.cosine_rows(a, b, eps)


# ---- Cosine-similarity matrix ---------------------------------------------------------


@torch.library.register_fake("ssl_ops::cosine_similarity_matrix")
def _cosine_matrix_fake(a, b, eps):
    return a.new_empty((a.shape[0], (b if b is not None else a).shape[0]))


@torch.library.register_fake("ssl_ops::cosine_similarity_matrix_backward")
def _cosine_matrix_backward_fake(grad, a, b, eps, grad_mask):
    return (
        a.new_empty(a.shape if grad_mask[0] else (0,)),
        a.new_empty(b.shape if b is not None and grad_mask[1] else (0,)),
    )


def _matrix_backward(ctx, grad):
    if torch.is_grad_enabled():
        _no_double_backward(ctx)
    a, b = ctx.saved_tensors
    mask = [ctx.needs_input_grad[0], b is not None and ctx.needs_input_grad[1]]
    ga, gb = torch.ops.ssl_ops.cosine_similarity_matrix_backward(grad, a, b, ctx.eps, mask)
    return (ga if mask[0] else None), (gb if mask[1] else None), None


torch.library.register_autograd(
    "ssl_ops::cosine_similarity_matrix", _matrix_backward, setup_context=_save_pair_and_eps
)
torch.library.register_autograd(
    "ssl_ops::cosine_similarity_matrix_backward", _no_double_backward, setup_context=_no_context
)


def cosine_similarity_matrix(a, b=None, *, eps=1e-8):
    """``C[i, j] = a_i . b_j / (max(||a_i||, eps) * max(||b_j||, eps))``, shape (M, N);
    ``b=None`` means ``b = a``.

    The formula of ``F.cosine_similarity(a[:, None], b[None], dim=-1, eps=eps)``
    (which also clamps each norm on its own) without its (M, N, D) broadcast,
    equal to rounding, not bit for bit. Which products and copies each backend
    forms: README, ``cosine_similarity_matrix``. fp16/bf16 inputs accumulate in
    fp32; the result has the input dtype.
    """
    if not isinstance(a, torch.Tensor) or (b is not None and not isinstance(b, torch.Tensor)):
        raise TypeError("a and b must be tensors")
    if _fallback.eager_requested("cosine_matrix"):
        from . import reference

        return reference.cosine_similarity_matrix(a, b, eps)
    return torch.ops.ssl_ops.cosine_similarity_matrix(a, b, float(eps))
