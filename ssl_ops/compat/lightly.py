"""lightly's names, signatures and argument orders, on ssl_ops' kernels.

A lightly script changes ``from lightly.loss import NTXentLoss`` (and the
like) to ``from ssl_ops.compat.lightly import NTXentLoss`` and nothing else:

* losses: ``NTXentLoss(temperature=0.5, memory_bank_size=0,
  gather_distributed=False)``, ``NegativeCosineSimilarity(dim=1, eps=1e-8)``,
  ``DCLLoss(temperature=0.1, weight_fn=None, gather_distributed=False)``,
  ``DCLWLoss(temperature=0.1, sigma=0.5, gather_distributed=False)``,
  ``KoLeoLoss(p=2, eps=1e-8)`` (float32 distances for fp16/bf16 rows);
* ``MemoryBankModule(size, gather_distributed=False, feature_dim_first=True)``;
* heads: ``SimCLRProjectionHead``, ``MoCoProjectionHead``,
  ``BYOLProjectionHead``, ``BYOLPredictionHead``, ``ProjectionHead``;
* ``update_momentum(model, model_ema, m)`` (lightly's order: the EMA model is
  the second argument; parameters only), ``deactivate_requires_grad(model)``,
  ``activate_requires_grad(model)``;
* ``cosine_schedule(step, max_steps, start_value, end_value, period=None)``.

``patch()`` puts these into lightly's own modules instead (see its docstring).
Importing this module does not import lightly.
"""

import importlib

from torch import nn

from ..dcl import negative_mises_fisher_weights
from ..ema import ema_update_
from ..koleo import KoLeoLoss
from ..nn import (
    BYOLPredictionHead,
    BYOLProjectionHead,
    DCLLoss,
    DCLWLoss,
    MoCoProjectionHead,
    NegativeCosineSimilarity,
    NTXentLoss,
    ProjectionHead,
    SimCLRProjectionHead,
)
from ..nn import MemoryBank as MemoryBankModule
from ..schedule import cosine_schedule

__all__ = [
    "BYOLPredictionHead",
    "BYOLProjectionHead",
    "DCLLoss",
    "DCLWLoss",
    "KoLeoLoss",
    "MemoryBankModule",
    "MoCoProjectionHead",
    "NTXentLoss",
    "NegativeCosineSimilarity",
    "ProjectionHead",
    "SimCLRProjectionHead",
    "activate_requires_grad",
    "cosine_schedule",
    "deactivate_requires_grad",
    "negative_mises_fisher_weights",
    "patch",
    "update_momentum",
]


def update_momentum(model: nn.Module, model_ema: nn.Module, m: float):
    """lightly's ``update_momentum``: ``ema = m * ema + (1 - m) * online`` for the
    parameters of ``model_ema`` from those of ``model`` (buffers untouched), in
    one fused kernel call."""
    ema_update_(model_ema, model, m, buffers="skip")


def deactivate_requires_grad(model: nn.Module):
    """Turns off ``requires_grad`` on every parameter of ``model`` (lightly's)."""
    for param in model.parameters():
        param.requires_grad = False


def activate_requires_grad(model: nn.Module):
    """Turns on ``requires_grad`` on every parameter of ``model`` (lightly's)."""
    for param in model.parameters():
        param.requires_grad = True


# Where patch() puts ssl_ops' objects: lightly's modules and the names in them.
_PATCH_TARGETS = {
    "lightly.loss": {"NTXentLoss": NTXentLoss, "NegativeCosineSimilarity": NegativeCosineSimilarity,
                     "DCLLoss": DCLLoss, "DCLWLoss": DCLWLoss, "KoLeoLoss": KoLeoLoss},
    "lightly.loss.koleo_loss": {"KoLeoLoss": KoLeoLoss},
    "lightly.loss.ntx_ent_loss": {"NTXentLoss": NTXentLoss},
    "lightly.loss.dcl_loss": {"DCLLoss": DCLLoss, "DCLWLoss": DCLWLoss,
                              "negative_mises_fisher_weights": negative_mises_fisher_weights},
    "lightly.loss.negative_cosine_similarity": {"NegativeCosineSimilarity": NegativeCosineSimilarity},
    "lightly.models.utils": {
        "update_momentum": update_momentum,
        "deactivate_requires_grad": deactivate_requires_grad,
        "activate_requires_grad": activate_requires_grad,
    },
}
_ABSENT = object()


class Patch:
    """What ``patch()`` replaced. ``undo()`` (or leaving a ``with`` block) puts
    lightly's own objects back, exactly as they were; undoing twice does nothing.
    Nested patches are undone innermost first."""

    def __init__(self, replaced):
        self._replaced = replaced  # (module, name, lightly's object or _ABSENT)

    @property
    def active(self):
        return bool(self._replaced)

    def undo(self):
        for module, name, original in reversed(self._replaced):
            if original is _ABSENT:
                delattr(module, name)
            else:
                setattr(module, name, original)
        self._replaced = []

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.undo()
        return False


def patch() -> Patch:
    """Puts ssl_ops' ``NTXentLoss``, ``NegativeCosineSimilarity``, ``DCLLoss``,
    ``DCLWLoss``, ``KoLeoLoss``, ``negative_mises_fisher_weights``, ``update_momentum``,
    ``deactivate_requires_grad`` and ``activate_requires_grad`` into
    ``lightly.loss``, ``lightly.loss.ntx_ent_loss``, ``lightly.loss.dcl_loss``,
    ``lightly.loss.koleo_loss``,
    ``lightly.loss.negative_cosine_similarity`` and ``lightly.models.utils``, for a
    script that cannot be edited line by line::

        import ssl_ops.compat.lightly
        ssl_ops.compat.lightly.patch()      # before the script's own lightly imports
        # or: with ssl_ops.compat.lightly.patch(): ...

    Limit: a name imported before ``patch()`` (``from lightly.loss import
    NTXentLoss`` already run) keeps lightly's object; patch first. Needs lightly
    installed (``ImportError`` otherwise). Returns a ``Patch`` handle: ``undo()``
    or the end of a ``with`` block restores lightly exactly.
    """
    try:
        modules = {name: importlib.import_module(name) for name in _PATCH_TARGETS}
    except ImportError as error:
        raise ImportError(
            "ssl_ops.compat.lightly.patch() replaces objects inside lightly, so it needs lightly "
            f"installed (pip install lightly): {error}. Without lightly, import the same names from "
            "ssl_ops.compat.lightly instead."
        ) from error
    replaced = []
    for module_name, names in _PATCH_TARGETS.items():
        module = modules[module_name]
        for name, ours in names.items():
            replaced.append((module, name, module.__dict__.get(name, _ABSENT)))
            setattr(module, name, ours)
    return Patch(replaced)
