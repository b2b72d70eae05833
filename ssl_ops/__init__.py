"""ssl_ops: fused CPU/CUDA kernels for self-supervised learning.

Each operation is a torch custom operator (``torch.ops.ssl_ops.*``) with fake
(meta) kernels, so it works under ``torch.compile``; ``ssl_ops.reference``
holds the pure-PyTorch versions used as the baseline in tests and benchmarks.
"""

from ._extension import build_info, cuda_kernels_available
from .contrastive import info_nce_loss, nt_xent_loss
from .dcl import dcl_loss
from .siglip import siglip_loss
from .clip import clip_loss
from .koleo import KoLeoLoss, koleo_loss
from .cosine import byol_loss, cosine_similarity_matrix, negative_cosine_similarity
from .ema import EMA, ema_update_
from . import nn
from .nn import (
    BYOLLoss,
    BYOLPredictionHead,
    BYOLProjectionHead,
    ClipLoss,
    DCLLoss,
    DCLWLoss,
    InfoNCELoss,
    MemoryBank,
    MoCoProjectionHead,
    MomentumEncoder,
    NegativeCosineSimilarity,
    NTXentLoss,
    ProjectionHead,
    SigLipLoss,
    SimCLRProjectionHead,
)
from .schedule import cosine_schedule, solo_learn_tau, timm_ema_decay
from . import reference

__all__ = [
    "BYOLLoss",
    "BYOLPredictionHead",
    "BYOLProjectionHead",
    "ClipLoss",
    "DCLLoss",
    "DCLWLoss",
    "EMA",
    "InfoNCELoss",
    "KoLeoLoss",
    "MemoryBank",
    "MoCoProjectionHead",
    "MomentumEncoder",
    "NegativeCosineSimilarity",
    "NTXentLoss",
    "ProjectionHead",
    "SigLipLoss",
    "SimCLRProjectionHead",
    "build_info",
    "byol_loss",
    "clip_loss",
    "cuda_kernels_available",
    "cosine_schedule",
    "cosine_similarity_matrix",
    "dcl_loss",
    "ema_update_",
    "info_nce_loss",
    "koleo_loss",
    "negative_cosine_similarity",
    "nn",
    "nt_xent_loss",
    "reference",
    "siglip_loss",
    "solo_learn_tau",
    "timm_ema_decay",
]
__version__ = "0.2.0"
