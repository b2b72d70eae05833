"""nn.Module losses, drop-in for lightly's (matched against lightly 1.6, the
version PyPI serves), on the fused ssl_ops kernels.

``gather_distributed=True`` gathers across torch.distributed processes as
lightly does (ssl_ops/distributed.py): NTXentLoss scores this rank's rows
against every rank's, with gradient; the memory bank enqueues every rank's
batch. With one process nothing is gathered.
"""

import functools
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import distributed
from .contrastive import info_nce_loss, nt_xent_loss
from .dcl import dcl_loss, negative_mises_fisher_weights
from .siglip import SigLipLoss  # noqa: F401  (re-exported)
from .clip import ClipLoss  # noqa: F401  (re-exported)
from .koleo import KoLeoLoss  # noqa: F401  (re-exported)
from .cosine import byol_loss, negative_cosine_similarity
from .heads import (  # noqa: F401  (re-exported)
    BYOLPredictionHead,
    BYOLProjectionHead,
    MoCoProjectionHead,
    ProjectionHead,
    SimCLRProjectionHead,
)


def _check_distributed_available(gather_distributed):
    """lightly's constructor error, word for word."""
    if gather_distributed and not torch.distributed.is_available():
        raise ValueError(
            "gather_distributed is True but torch.distributed is not available. "
            "Please set gather_distributed=False or install a torch version with "
            "distributed support."
        )


class MemoryBank(nn.Module):
    """lightly's ``MemoryBankModule``: a ring buffer of ``size = (num_features, dim)``
    unit rows (float32, random at start), or no bank with ``size=0``.

    ``forward(output, labels=None, update=False)`` returns ``(output, bank)``:
    the bank as it was before this call (shape (dim, num_features) with
    ``feature_dim_first``, else (num_features, dim)); with ``update`` the batch is
    then enqueued (every rank's batch, in rank order, with ``gather_distributed``),
    and when it reaches the end the rest of the batch is dropped and the pointer
    wraps to 0.
    """

    def __init__(self, size: Union[int, Sequence[int]], gather_distributed: bool = False,
                 feature_dim_first: bool = True):
        super().__init__()
        size_tuple = (size,) if isinstance(size, int) else tuple(size)
        if any(x < 0 for x in size_tuple):
            raise ValueError(f"Illegal memory bank size {size}, all entries must be non-negative.")
        if isinstance(size, int) and size > 0:
            raise ValueError(
                f"Memory bank size 'size={size}' does not specify the feature "
                f"dimension. Set it with 'size=({size}, dim)', or pass 'size=0' to "
                "disable the memory bank."
            )
        if size_tuple != (0,) and len(size_tuple) != 2:
            raise ValueError(
                f"Illegal memory bank size {size}, expected a (num_features, dim) "
                "tuple, or 'size=0' to disable the memory bank."
            )
        self.size = size_tuple
        self.gather_distributed = gather_distributed
        self.feature_dim_first = feature_dim_first
        self.register_buffer("bank", torch.empty(size_tuple, dtype=torch.float), persistent=False)
        self.register_buffer("bank_ptr", torch.empty(1, dtype=torch.long), persistent=False)
        if len(size_tuple) > 1:
            with torch.no_grad():
                self.bank = F.normalize(torch.randn(size_tuple).type_as(self.bank), dim=-1)
                self.bank_ptr = torch.zeros(1).type_as(self.bank_ptr)

    def forward(self, output: Tensor, labels: Optional[Tensor] = None,
                update: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
        if self.size[0] == 0:
            return output, None
        bank = self.bank.clone().detach()
        if self.feature_dim_first:
            bank = bank.transpose(0, -1)
        if update:
            self._dequeue_and_enqueue(output)
        return output, bank

    @torch.no_grad()
    def _dequeue_and_enqueue(self, batch: Tensor) -> None:
        if self.gather_distributed and distributed.world_size() > 1:
            batch = distributed.gather(batch)
        batch_size = batch.shape[0]
        ptr = int(self.bank_ptr)
        if ptr + batch_size >= self.size[0]:
            self.bank[ptr:] = batch[: self.size[0] - ptr].detach()
            self.bank_ptr.zero_()
        else:
            self.bank[ptr : ptr + batch_size] = batch.detach()
            self.bank_ptr[0] = ptr + batch_size


class NTXentLoss(nn.Module):
    """lightly's ``NTXentLoss(temperature=0.5, memory_bank_size=0, gather_distributed=False)``.

    Without a bank: the SimCLR loss over the 2B rows of ``out0`` and ``out1``
    (``ssl_ops.nt_xent_loss``). With ``memory_bank_size=(K, D)``: the MoCo form,
    ``out0`` against ``[out1, bank]`` with the positive first
    (``ssl_ops.info_nce_loss``); the bank is read before the normalised ``out1``
    is enqueued, and only updated when ``out0.requires_grad``.
    """

    def __init__(self, temperature: float = 0.5, memory_bank_size: Union[int, Sequence[int]] = 0,
                 gather_distributed: bool = False):
        super().__init__()
        self.memory_bank = MemoryBank(size=memory_bank_size, gather_distributed=gather_distributed)
        self.temperature = temperature
        self.gather_distributed = gather_distributed
        self.eps = 1e-8
        if abs(self.temperature) < self.eps:
            raise ValueError("Illegal temperature: abs({}) < 1e-8".format(self.temperature))
        _check_distributed_available(gather_distributed)

    def forward(self, out0: Tensor, out1: Tensor) -> Tensor:
        if self.memory_bank.size[0] == 0:
            return nt_xent_loss(out0, out1, self.temperature, gather_distributed=self.gather_distributed)
        # The bank stores normalised rows, as lightly enqueues them.
        _, negatives = self.memory_bank(F.normalize(out1.detach(), dim=1), update=out0.requires_grad)
        return info_nce_loss(out0, out1, negatives.t().to(out0.dtype), self.temperature)


class DCLLoss(nn.Module):
    """lightly's ``DCLLoss(temperature=0.1, weight_fn=None, gather_distributed=False)``:
    decoupled contrastive loss (``ssl_ops.dcl_loss``), NT-Xent with each row's
    positive left out of its denominator and, with ``weight_fn(out0, out1)``, a
    per-row weight on the positive term."""

    def __init__(self, temperature: float = 0.1, weight_fn=None, gather_distributed: bool = False):
        super().__init__()
        self.temperature = temperature
        self.weight_fn = weight_fn
        self.gather_distributed = gather_distributed
        _check_distributed_available(gather_distributed)

    def forward(self, out0: Tensor, out1: Tensor) -> Tensor:
        return dcl_loss(out0, out1, self.temperature, self.weight_fn, self.gather_distributed)


class DCLWLoss(DCLLoss):
    """lightly's ``DCLWLoss(temperature=0.1, sigma=0.5, gather_distributed=False)``:
    ``DCLLoss`` weighted by the negative von Mises-Fisher weights
    ``2 - N * softmax(<out0_i, out1_i> / sigma)`` (detached)."""

    def __init__(self, temperature: float = 0.1, sigma: float = 0.5, gather_distributed: bool = False):
        super().__init__(temperature, functools.partial(negative_mises_fisher_weights, sigma=sigma),
                         gather_distributed)


class InfoNCELoss(nn.Module):
    """``ssl_ops.info_nce_loss`` as a module: MoCo with ``forward(query, key, queue)``,
    MoCo v3 / CLIP with ``forward(query, key)`` (``symmetric`` averages both ways;
    ``gather_distributed`` scores against every rank's keys)."""

    def __init__(self, temperature: float = 0.07, reduction: str = "mean", symmetric: bool = False,
                 normalize: bool = True, gather_distributed: bool = False):
        super().__init__()
        self.temperature, self.reduction, self.symmetric, self.normalize = temperature, reduction, symmetric, normalize
        self.gather_distributed = gather_distributed

    def forward(self, query: Tensor, key: Tensor, queue: Optional[Tensor] = None) -> Tensor:
        return info_nce_loss(query, key, queue, self.temperature, reduction=self.reduction,
                             symmetric=self.symmetric, normalize=self.normalize,
                             gather_distributed=self.gather_distributed)


class NegativeCosineSimilarity(nn.Module):
    """lightly's ``NegativeCosineSimilarity(dim=1, eps=1e-8)``."""

    def __init__(self, dim: int = 1, eps: float = 1e-8):
        super().__init__()
        self.dim, self.eps = dim, eps

    def forward(self, x0: Tensor, x1: Tensor) -> Tensor:
        return negative_cosine_similarity(x0, x1, self.dim, self.eps)


class BYOLLoss(nn.Module):
    """``ssl_ops.byol_loss`` as a module: ``2 - 2 * cos(p_i, z_i)``, averaged."""

    def __init__(self, reduction: str = "mean"):
        super().__init__()
        self.reduction = reduction

    def forward(self, p: Tensor, z: Tensor) -> Tensor:
        return byol_loss(p, z, reduction=self.reduction)


class MomentumEncoder(nn.Module):
    """A momentum (EMA) copy of a module: a deep copy with ``requires_grad`` off,
    updated in place by ``update(online, momentum)`` through one fused
    ``ssl_ops.ema_update_`` call (buffers left alone by default, as lightly and
    solo-learn do; ``buffers="copy"`` or ``"ema"``: see ema_update_)."""

    def __init__(self, online: nn.Module, buffers: str = "skip"):
        super().__init__()
        import copy

        self.module = copy.deepcopy(online)
        self.module.requires_grad_(False)
        self.buffers_mode = buffers
        self._prepared = None  # an ssl_ops.EMA for the last online module

    def update(self, online: nn.Module, momentum) -> None:
        """momentum: a number, or a one-element tensor on the device (see ema_update_)."""
        from .ema import EMA

        if self._prepared is None or self._prepared._online is not online:
            self._prepared = EMA(self.module, online, buffers=self.buffers_mode)
        self._prepared.update(momentum)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)
