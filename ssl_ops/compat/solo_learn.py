"""solo-learn's loss functions (solo.losses, as on solo-learn's main branch),
under solo's names, signatures and defaults, on ssl_ops' kernels:

* ``simclr_loss_func(z, indexes, temperature=0.1)``
* ``mocov2plus_loss_func(query, key, queue, temperature=0.1)``
* ``mocov3_loss_func(query, key, temperature=0.2)``
* ``byol_loss_func(p, z, simplified=True)``

With ``torch.distributed`` initialised, ``simclr_loss_func`` and
``mocov3_loss_func`` gather across processes as solo does (simclr through solo's
``GatherLayer`` semantics: the backward keeps this rank's slice unsummed;
mocov3's keys without gradient). Importing this
module does not import solo-learn.
"""

import torch

from .. import distributed
from ..contrastive import _sym_loss, info_nce_loss
from ..cosine import byol_loss, negative_cosine_similarity

__all__ = ["byol_loss_func", "mocov2plus_loss_func", "mocov3_loss_func", "simclr_loss_func"]


def simclr_loss_func(z: torch.Tensor, indexes: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """solo's SimCLR loss: z (all crops stacked, N x D), rows with equal
    ``indexes`` are positives of each other (self excluded), all others
    negatives; ``-mean_i log(sum_pos exp(s) / (sum_pos exp(s) + sum_neg exp(s)))``
    over s = cos / temperature, any number of crops per index (the positives
    inside the log: ``nt_xent_loss(..., positives="logsumexp")``), from
    log-sum-exps where solo sums raw exps. With two crops it is NT-Xent.

    An index that appears once has no positive, where solo's loss is
    infinite; that raises ValueError instead.
    """
    if not isinstance(indexes, torch.Tensor) or indexes.dim() != 1 or indexes.shape[0] != z.shape[0]:
        raise ValueError(f"indexes must be a 1-D tensor with one entry per row of z ({z.shape[0]}), "
                         f"got {getattr(indexes, 'shape', indexes)}")
    group = indexes.to(torch.int64)
    gathered = distributed.world_size() > 1
    group_all = distributed.gather(group) if gathered else group
    _, counts = torch.unique(group_all, return_counts=True)
    if bool((counts < 2).any()):
        lonely = torch.unique(group_all)[counts < 2][:5].tolist()
        raise ValueError(
            "ssl_ops.compat.solo_learn.simclr_loss_func: every index needs at least two crops (a positive); "
            f"indexes {lonely} appear once, where solo's loss is infinite"
        )
    if gathered:
        rank, rows = distributed.rank(), z.shape[0]
        anchors = (rank * rows, (rank + 1) * rows)
        # solo gathers z through its GatherLayer (the backward keeps this rank's
        # slice, unsummed) and scores this rank's rows against all.
        return _sym_loss(distributed.gather_local_grad(z), group_all, temperature, "mean", True, anchors,
                         positives="logsumexp")
    return _sym_loss(z, group, temperature, "mean", True, positives="logsumexp")


def mocov2plus_loss_func(query: torch.Tensor, key: torch.Tensor, queue: torch.Tensor,
                         temperature: float = 0.1) -> torch.Tensor:
    """solo's MoCo v2+ loss: logits ``[q . k, q @ queue] / temperature`` with the
    positive first, then cross-entropy; inputs are used as given (solo
    normalises them beforehand). ``queue`` is (D, K) as solo keeps it; it is
    read in place, never copied or transposed into a new buffer."""
    if queue.dim() != 2:
        raise ValueError(f"queue must be (features, size), got shape {tuple(queue.shape)}")
    if queue.shape[0] != query.shape[1]:
        raise ValueError(f"queue has {queue.shape[0]} features (queue is (D, K)) but query has {query.shape[1]}")
    return info_nce_loss(query, key, queue.t(), temperature, normalize=False)


def mocov3_loss_func(query: torch.Tensor, key: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """solo's MoCo v3 loss: rows normalised, this rank's queries against every
    rank's keys (gathered without gradient, as solo does), labels
    ``arange(B) + B * rank``, and the cross-entropy times ``2 * temperature``."""
    if distributed.world_size() > 1:
        keys = distributed.gather(key.detach())
        offset = distributed.rank() * query.shape[0]
        from ..contrastive import _asym_loss

        loss = _asym_loss(query, keys, None, temperature, "mean", True, offset)
    else:
        loss = info_nce_loss(query, key, temperature=temperature)
    return loss * (2 * temperature)


def byol_loss_func(p: torch.Tensor, z: torch.Tensor, simplified: bool = True) -> torch.Tensor:
    """solo's BYOL loss, ``2 - 2 * cos(p, z.detach()).mean()``. ``simplified=False``
    is solo's normalise-then-dot form of the same value (solo normalises with
    eps 1e-12 there, 1e-8 in the simplified form)."""
    z = z.detach()
    if simplified:
        return 2 + 2 * negative_cosine_similarity(p, z, dim=-1)
    return byol_loss(p, z)
