"""KoLeo (Sablayrolles et al. 2019), DINOv2's uniformity regulariser, with
lightly's and dinov2's semantics: ``-mean_i log(||x_i - x_nn(i)|| + eps)`` over
L2-normalised rows, the nearest neighbour by cosine with the row itself
excluded. The work is B x B with B the per-GPU batch (64 and below in DINOv2),
so it is a composition of torch ops; what it fixes is numerics: users of fp16
report ``koleo_loss: inf`` (dinov2 issues 143, 307, 492), where eps = 1e-8
underflows and a row's distance to a near-duplicate rounds to 0. Here the
rows are normalised, compared and measured in float32 (float64 for float64
input) whatever their dtype, and the loss is float32 (float64)."""

import torch
import torch.nn.functional as F
from torch import nn


def koleo_loss(x, p=2.0, eps=1e-8):
    """KoLeo of the rows of ``x`` (batch, features): lightly's ``KoLeoLoss``
    forward (``fill_diagonal_(-2)`` on the cosines, so a row is its own
    neighbour only when it is alone, as in lightly), computed in float32.
    Gradients flow through the normalisation and the distances (the neighbour
    choice is an argmax, as in lightly and dinov2)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[0] == 0 or not x.is_floating_point():
        raise ValueError("koleo_loss: x must be a non-empty 2-D (batch, features) floating tensor, got "
                         f"{getattr(x, 'shape', type(x).__name__)} of dtype {getattr(x, 'dtype', None)}")
    wide = x if x.dtype == torch.float64 else x.float()
    unit = F.normalize(wide, p=2, dim=-1, eps=eps)
    with torch.no_grad():
        cosines = unit @ unit.t()
        cosines.fill_diagonal_(-2)
        neighbour = cosines.argmax(dim=1)
    distance = F.pairwise_distance(unit, unit[neighbour], p=p, eps=eps)
    return -(distance + eps).log().mean()


class KoLeoLoss(nn.Module):
    """lightly's ``KoLeoLoss(p=2, eps=1e-8)`` (dinov2's ``KoLeoLoss`` with its
    defaults), on ``ssl_ops.koleo_loss``: float32 distances for fp16/bf16 rows."""

    def __init__(self, p: float = 2, eps: float = 1e-8):
        super().__init__()
        self.p = p
        self.eps = eps

    def forward(self, x):
        return koleo_loss(x, self.p, self.eps)
