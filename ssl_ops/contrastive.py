"""Contrastive losses computed by fused kernels that never store the logits
matrix: NT-Xent (SimCLR), its multi-view and supervised (SupCon) forms, and
InfoNCE (MoCo, MoCo v3, CLIP)."""

import math

import torch
import torch.nn.functional as F

from . import _extension  # noqa: F401  (registers torch.ops.ssl_ops)
from . import _fallback, distributed

_REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}
_POSITIVES = {"mean": 0, "logsumexp": 1}  # how a row's positive logits enter its loss
_EXCLUDED = 2  # the op's third form: positives left out entirely (DCL's negative term; ssl_ops.dcl)
_EPS = 1e-12  # F.normalize's default, as lightly uses it


def _loss_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---- contrastive_sym_loss: fake kernel and autograd ---------------------------------


@torch.library.register_fake("ssl_ops::contrastive_sym_loss")
def _sym_loss_fake(z, labels, anchor_begin, anchor_end, scale, eps, normalize, reduction, compute_grad, positives=0):
    rows = z.shape[0]
    loss_dtype = _loss_dtype(z.dtype)
    loss = z.new_empty((rows,) if reduction == 0 else (), dtype=loss_dtype)
    lse = z.new_empty((rows,), dtype=loss_dtype)
    positive_count = z.new_empty((rows,), dtype=torch.int64)
    grad = z.new_empty(z.shape if compute_grad and reduction != 0 else (0,))
    lse_positive = z.new_empty((rows,) if positives == 1 else (0,), dtype=loss_dtype)
    return loss, lse, positive_count, grad, lse_positive


@torch.library.register_fake("ssl_ops::contrastive_sym_backward")
def _sym_backward_fake(grad_loss, z, labels, anchor_begin, anchor_end, lse, positive_count, scale, eps, normalize,
                       reduction, lse_positive=None, positives=0):
    return torch.empty_like(z)


def _no_double_backward(ctx, *grads):
    raise RuntimeError("ssl_ops: double backward through the contrastive losses is not supported")


def _sym_setup_context(ctx, inputs, output):
    z, labels, anchor_begin, anchor_end, scale, eps, normalize, reduction, compute_grad = inputs[:9]
    positives = inputs[9] if len(inputs) > 9 else 0
    _, lse, positive_count, grad, lse_positive = output
    ctx.save_for_backward(z, labels, lse, positive_count, grad, lse_positive)
    ctx.anchors = (anchor_begin, anchor_end)
    ctx.options = (scale, eps, normalize, reduction)
    ctx.positives = positives
    # The op's contract (and its fake kernel's): asked with a reduction, the
    # forward returns d loss / d z for grad_loss = 1.
    ctx.grad_in_forward = bool(compute_grad) and reduction != 0
    # The other outputs (lse, counts, the gradient) take no gradient: no zero
    # tensors for them in the backward (eight fills per step on the GPU).
    ctx.set_materialize_grads(False)


def _sym_backward(ctx, grad_loss, *_unused):
    if torch.is_grad_enabled():  # backward(create_graph=True): second derivatives
        _no_double_backward(ctx)
    if grad_loss is None:
        return (None,) * 10
    z, labels, lse, positive_count, grad, lse_positive = ctx.saved_tensors
    scale, eps, normalize, reduction = ctx.options
    if ctx.grad_in_forward:
        grad_z = grad * grad_loss  # computed in the forward; only scaled here
    else:
        grad_z = torch.ops.ssl_ops.contrastive_sym_backward(
            grad_loss, z, labels, *ctx.anchors, lse, positive_count, scale, eps, normalize, reduction,
            lse_positive if ctx.positives else None, ctx.positives,
        )
    return grad_z, None, None, None, None, None, None, None, None, None


torch.library.register_autograd(
    "ssl_ops::contrastive_sym_loss", _sym_backward, setup_context=_sym_setup_context
)


def _no_context(ctx, inputs, output):
    pass


torch.library.register_autograd(
    "ssl_ops::contrastive_sym_backward", _no_double_backward, setup_context=_no_context
)


# ---- contrastive_asym_loss: fake kernel and autograd --------------------------------


def _grad_shapes(query, key, positive_key, grad_mask, computed=True):
    return (
        query.shape if computed and grad_mask[0] else (0,),
        key.shape if computed and grad_mask[1] else (0,),
        positive_key.shape if computed and grad_mask[2] and positive_key is not None else (0,),
    )


@torch.library.register_fake("ssl_ops::contrastive_asym_loss")
def _asym_loss_fake(query, key, positive_key, positive_offset, scale, eps, normalize, reduction, grad_mask):
    rows = query.shape[0]
    loss_dtype = _loss_dtype(query.dtype)
    loss = query.new_empty((rows,) if reduction == 0 else (), dtype=loss_dtype)
    lse = query.new_empty((rows,), dtype=loss_dtype)
    gq, gk, gp = _grad_shapes(query, key, positive_key, grad_mask, computed=reduction != 0)
    return loss, lse, query.new_empty(gq), key.new_empty(gk), query.new_empty(gp)


@torch.library.register_fake("ssl_ops::contrastive_asym_backward")
def _asym_backward_fake(grad_loss, query, key, positive_key, positive_offset, lse, scale, eps, normalize, reduction,
                        grad_mask):
    gq, gk, gp = _grad_shapes(query, key, positive_key, grad_mask)
    return query.new_empty(gq), key.new_empty(gk), query.new_empty(gp)


def _asym_setup_context(ctx, inputs, output):
    query, key, positive_key, positive_offset, scale, eps, normalize, reduction, grad_mask = inputs
    _, lse, gq, gk, gp = output
    ctx.save_for_backward(query, key, positive_key, lse, gq, gk, gp)
    ctx.positive_offset = positive_offset
    ctx.options = (scale, eps, normalize, reduction)
    # The op's contract (and its fake kernel's): with a reduction, the forward
    # returns the gradients grad_mask asks for, for grad_loss = 1.
    ctx.grads_in_forward = tuple(bool(m) and reduction != 0 for m in grad_mask)
    ctx.set_materialize_grads(False)  # as for the symmetric op


def _asym_backward(ctx, grad_loss, *_unused):
    if torch.is_grad_enabled():
        _no_double_backward(ctx)
    if grad_loss is None:
        return (None,) * 9
    query, key, positive_key, lse, gq, gk, gp = ctx.saved_tensors
    scale, eps, normalize, reduction = ctx.options
    needs = list(ctx.needs_input_grad[:3])
    if positive_key is None:
        needs[2] = False
    stored = (gq, gk, gp)
    if all(not n or in_forward for n, in_forward in zip(needs, ctx.grads_in_forward)):
        grads = [g * grad_loss if n else None for n, g in zip(needs, stored)]
    else:
        grads = torch.ops.ssl_ops.contrastive_asym_backward(
            grad_loss, query, key, positive_key, ctx.positive_offset, lse, scale, eps, normalize, reduction, needs
        )
        grads = [g if n else None for n, g in zip(needs, grads)]
    return grads[0], grads[1], grads[2], None, None, None, None, None, None


torch.library.register_autograd(
    "ssl_ops::contrastive_asym_loss", _asym_backward, setup_context=_asym_setup_context
)
torch.library.register_autograd(
    "ssl_ops::contrastive_asym_backward", _no_double_backward, setup_context=_no_context
)


# ---- Public API --------------------------------------------------------------------


def _check_temperature(temperature):
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or abs(temperature) < 1e-8:
        raise ValueError(f"temperature must be a finite number with abs(temperature) >= 1e-8, got {temperature!r}")


def _check_reduction(reduction):
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {tuple(_REDUCTIONS)}, got {reduction!r}")
    return _REDUCTIONS[reduction]


def _check_view(name, t, like=None, like_name=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be a 2-D (batch, features) tensor, got shape {tuple(t.shape)}")
    if t.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch (shape {tuple(t.shape)})")
    if like is not None and t.shape != like.shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)} but {like_name} has shape {tuple(like.shape)}")


def _check_positives(positives):
    if positives not in _POSITIVES:
        raise ValueError(f"positives must be one of {tuple(_POSITIVES)}, got {positives!r}")
    return _POSITIVES[positives]


def _sym_loss(z, labels, temperature, reduction, normalize, anchors=None, positives="mean"):
    """The symmetric op on rows [anchors) of z; positives: "mean", "logsumexp"
    or "excluded" (the log-sum-exp over each row's negatives alone)."""
    anchor_begin, anchor_end = anchors if anchors is not None else (0, z.shape[0])
    positives_code = _EXCLUDED if positives == "excluded" else _check_positives(positives)
    if z.shape[0] == 2 and positives_code != _EXCLUDED:
        # Each row's one candidate is the other row, its positive or nothing: the
        # softmax is exactly 1, so the loss is exactly 0 for any z (as lightly's
        # cross-entropy gives), where a shifted log-sum-exp would leave an ulp of
        # 1/temperature. Built from z so that NaN propagates and the graph holds.
        _check_reduction(reduction)
        per_row = (z * 0).sum(1).to(_loss_dtype(z.dtype))
        per_row = per_row[anchor_begin:anchor_end]
        return per_row if reduction == "none" else per_row.sum()
    if _fallback.eager_requested("contrastive"):
        _check_reduction(reduction)
        return _fallback.sym_loss(z, labels, temperature, reduction, normalize, _EPS, anchors, positives)
    compute_grad = torch.is_grad_enabled() and z.requires_grad
    loss = torch.ops.ssl_ops.contrastive_sym_loss(
        z, labels, anchor_begin, anchor_end, 1.0 / temperature, _EPS, normalize, _check_reduction(reduction),
        compute_grad, positives_code,
    )[0]
    return loss


def nt_xent_loss(z0, z1=None, temperature=0.5, *, labels=None, reduction="mean", normalize=True,
                 positives="mean", gather_distributed=False):
    """NT-Xent, the SimCLR loss, without storing the (2N x 2N) logits matrix.

    * ``nt_xent_loss(z0, z1)``: two views (N, D) each. Over the 2N rows of
      ``[z0; z1]``, the positive of a row is the other view of its sample, every
      other row is a negative, self is excluded; cross-entropy of the cosine
      similarities / temperature, averaged over the 2N rows. Same value and
      gradients as lightly's ``NTXentLoss(temperature)`` without a memory bank.
    * ``nt_xent_loss([v0, v1, ..., vV])``: V >= 2 views; each row's positives are
      the other V - 1 views of its sample.
    * ``nt_xent_loss(z, labels=y)``: supervised contrastive loss over the rows
      of ``z`` (B, D); every other row with the same label is a positive.

    With several positives, ``positives`` says how they enter the loss of row i:

    * ``"mean"`` (default): ``logsumexp_{k != i}(s_ik) - mean_{p in P(i)}(s_ip)``,
      SupCon's L_out form;
    * ``"logsumexp"``: ``logsumexp_{k != i}(s_ik) - logsumexp_{p in P(i)}(s_ip)``,
      i.e. ``-log(sum_P exp(s) / sum_{k != i} exp(s))``, the positives inside the
      log as solo-learn's ``simclr_loss_func`` computes its multi-crop loss
      (SupCon's L_in up to the constant log |P(i)|).

    With one positive per row (two views) both are the same NT-Xent. Rows
    without positives add 0 and are left out of the mean.

    ``reduction``: "mean" (default), "sum" or "none" (one loss per row).
    ``normalize=False`` skips the L2 normalisation of rows (for inputs that are
    already normalised). A negative temperature is accepted, as lightly does.
    The loss is float32 for float16/bfloat16 inputs (float64 for float64);
    gradients come in the input dtype.

    ``gather_distributed=True`` (with torch.distributed initialised and more
    than one process): this rank's rows are the anchors, scored against the
    rows of every rank (gathered with gradient; samples of different ranks are
    different samples, labels are compared across ranks). The loss is the mean
    over this rank's anchors; with DDP's gradient averaging the update equals
    one process's on the whole batch. Every rank must pass the same batch size.
    """
    _check_temperature(temperature)
    _check_positives(positives)
    if isinstance(z0, (list, tuple)):
        if z1 is not None or labels is not None:
            raise ValueError("pass either a list of views, or z0 and z1, or z0 with labels")
        views = list(z0)
        if len(views) < 2:
            raise ValueError(f"a list of views needs at least 2 views, got {len(views)}")
        for i, v in enumerate(views):
            _check_view(f"views[{i}]", v, views[0], "views[0]")
        z = torch.cat(views)
        batch = views[0].shape[0]
        group = torch.arange(batch, device=z.device).repeat(len(views))
    elif labels is not None:
        if z1 is not None:
            raise ValueError("with labels, pass one tensor z0 (B, D) and no z1")
        _check_view("z0", z0)
        if not isinstance(labels, torch.Tensor) or labels.dtype.is_floating_point or labels.dtype.is_complex \
                or labels.dtype == torch.bool:
            raise TypeError(f"labels must be an integer tensor, got {getattr(labels, 'dtype', type(labels))}")
        if labels.shape != (z0.shape[0],):
            raise ValueError(f"labels must have shape ({z0.shape[0]},), one per row of z0, got {tuple(labels.shape)}")
        z, group = z0, labels.to(torch.int64)
        if gather_distributed and distributed.world_size() > 1:
            return _gathered_sym_loss(z, distributed.gather(group), temperature, reduction, normalize, positives)
    else:
        if z1 is None:
            raise ValueError("nt_xent_loss needs z1 (the second view), a list of views, or labels")
        _check_view("z0", z0)
        _check_view("z1", z1, z0, "z0")
        if z1.dtype != z0.dtype or z1.device != z0.device:
            raise ValueError(
                f"z0 and z1 must share dtype and device, got {z0.dtype} on {z0.device} and {z1.dtype} on {z1.device}"
            )
        z = torch.cat([z0, z1])
        batch = z0.shape[0]
        group = torch.arange(batch, device=z.device).repeat(2)
    if gather_distributed and distributed.world_size() > 1:
        # Sample i of rank r is sample r * batch + i of the gathered batch.
        offsets = torch.arange(distributed.world_size(), device=z.device) * batch
        return _gathered_sym_loss(z, (offsets[:, None] + group).reshape(-1), temperature, reduction, normalize,
                                  positives)
    return _sym_loss(z, group, temperature, reduction, normalize, positives=positives)


def _gathered_sym_loss(z, group_all, temperature, reduction, normalize, positives="mean"):
    rows, rank = z.shape[0], distributed.rank()
    anchors = (rank * rows, (rank + 1) * rows)
    loss = _sym_loss(distributed.gather_with_grad(z), group_all, temperature, reduction, normalize, anchors,
                     positives)
    return loss.narrow(0, anchors[0], rows) if reduction == "none" else loss


def _asym_loss(query, key, positive_key, temperature, reduction, normalize, positive_offset=0):
    if _fallback.eager_requested("contrastive"):
        _check_reduction(reduction)
        return _fallback.asym_loss(query, key, positive_key, temperature, reduction, normalize, _EPS,
                                   positive_offset)
    grad_enabled = torch.is_grad_enabled()
    grad_mask = [
        grad_enabled and query.requires_grad,
        grad_enabled and key.requires_grad,
        grad_enabled and positive_key is not None and positive_key.requires_grad,
    ]
    loss, _, _, _, _ = torch.ops.ssl_ops.contrastive_asym_loss(
        query, key, positive_key, positive_offset, 1.0 / temperature, _EPS, normalize, _check_reduction(reduction),
        grad_mask,
    )
    return loss


def _unit_rows(x):
    # Normalised in float32 (float64 for float64), as the other ops do inside;
    # CUDA then takes fp16/bf16 rows back in their dtype for the tensor cores,
    # while the CPU kernels, which widen anyway, keep the wide rows.
    unit = F.normalize(x.to(_loss_dtype(x.dtype)), dim=1, eps=_EPS)
    return unit if x.device.type == "cpu" else unit.to(x.dtype)


def info_nce_loss(query, key, queue=None, temperature=0.07, *, reduction="mean", symmetric=False, normalize=True,
                  gather_distributed=False):
    """InfoNCE without storing the logits matrix.

    * With ``queue`` (K, D), rows of negatives: MoCo (v2). Row i scores
      ``[q_i . k_i, q_i . queue_1, ..., q_i . queue_K] / temperature`` and the
      positive is the first; the queue is never concatenated into a logits matrix.
    * Without a queue: the in-batch cross-view loss of MoCo v3 and CLIP, logits
      ``q . k^T / temperature`` with the positive of row i in column i;
      ``symmetric=True`` averages it with the loss of ``key`` against ``query``;
      with "mean" or "sum" both directions come from one pass over S
      (``ssl_ops.clip_loss``'s op: 4 GEMMs where two calls take 6).

    query and key are (B, D). Rows are L2-normalised first unless
    ``normalize=False`` (solo-learn's MoCo functions expect normalised inputs).
    Gradients flow to whichever inputs require grad (in MoCo, only the query).
    ``reduction``: "mean" (default), "sum" or "none".

    ``gather_distributed=True`` (in-batch form, torch.distributed with more than
    one process): this rank's queries are scored against every rank's keys,
    the positive of query i being this rank's key i (solo-learn's MoCo v3
    labels ``arange(B) + B * rank``); keys are gathered with gradient when they
    require it (CLIP), and ``symmetric`` gathers the queries too: open_clip's
    ``local_loss`` form, two different matrices, so two calls (``ssl_ops.clip_loss``
    has the global form, every rank's rows against every rank's). A queue is not
    gathered here: ``MemoryBank(gather_distributed=True)`` gathers it on enqueue.
    """
    _check_temperature(temperature)
    _check_view("query", query)
    _check_view("key", key, query, "query")
    for name, t in (("key", key), ("queue", queue)):
        if t is not None and (t.dtype != query.dtype or t.device != query.device):
            raise ValueError(
                f"{name} must share query's dtype and device, got {t.dtype} on {t.device} "
                f"and {query.dtype} on {query.device}"
            )
    if queue is not None:
        if gather_distributed:
            raise ValueError("gather_distributed is for the in-batch loss; a MoCo queue is gathered on enqueue "
                             "(MemoryBank(gather_distributed=True))")
        if symmetric:
            raise ValueError("symmetric=True is the in-batch (MoCo v3 / CLIP) loss; it takes no queue")
        if not isinstance(queue, torch.Tensor) or queue.dim() != 2 or queue.shape[0] == 0:
            raise ValueError(f"queue must be a non-empty 2-D (size, features) tensor, got {getattr(queue, 'shape', queue)}")
        if queue.shape[1] != query.shape[1]:
            raise ValueError(f"queue has {queue.shape[1]} features but query has {query.shape[1]}")
        return _asym_loss(query, queue, key, temperature, reduction, normalize)
    if gather_distributed and distributed.world_size() > 1:
        offset = distributed.rank() * query.shape[0]

        def gathered(t):
            return distributed.gather_with_grad(t) if t.requires_grad else distributed.gather(t)

        loss = _asym_loss(query, gathered(key), None, temperature, reduction, normalize, offset)
        if symmetric:
            loss = (loss + _asym_loss(key, gathered(query), None, temperature, reduction, normalize, offset)) / 2
        return loss
    if symmetric and reduction != "none":
        from .clip import symmetric_info_nce  # (clip imports this module)

        if normalize:
            query, key = _unit_rows(query), _unit_rows(key)
        scale = torch.full((), 1.0 / temperature, dtype=_loss_dtype(query.dtype), device=query.device)
        return symmetric_info_nce(query, key, scale, reduction)
    loss = _asym_loss(query, key, None, temperature, reduction, normalize)
    if symmetric:
        loss = (loss + _asym_loss(key, query, None, temperature, reduction, normalize)) / 2
    return loss
