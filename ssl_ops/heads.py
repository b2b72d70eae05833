"""Projection and prediction heads of SimCLR, MoCo and BYOL, built like
lightly's (same layers in the same order in ``self.layers``, so state dicts
are interchangeable): each block is Linear (no bias when batch norm follows),
then optional BatchNorm1d, then optional ReLU."""

from typing import Optional, Sequence, Tuple

from torch import Tensor, nn

Block = Tuple[int, int, Optional[nn.Module], Optional[nn.Module]]


class ProjectionHead(nn.Module):
    """An MLP of ``(in_features, out_features, batch_norm or None, activation or None)`` blocks."""

    def __init__(self, blocks: Sequence[Block]):
        super().__init__()
        layers = []
        for in_features, out_features, batch_norm, activation in blocks:
            layers.append(nn.Linear(in_features, out_features, bias=batch_norm is None))
            layers += [m for m in (batch_norm, activation) if m is not None]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


def _mlp_blocks(input_dim, hidden_dim, output_dim, num_layers, batch_norm, output_batch_norm) -> list:
    if num_layers < 2:
        raise ValueError(f"num_layers must be at least 2, got {num_layers}")
    bn = (lambda n: nn.BatchNorm1d(n)) if batch_norm else (lambda n: None)
    blocks = [(input_dim, hidden_dim, bn(hidden_dim), nn.ReLU())]
    blocks += [(hidden_dim, hidden_dim, bn(hidden_dim), nn.ReLU()) for _ in range(2, num_layers)]
    blocks.append((hidden_dim, output_dim, bn(output_dim) if output_batch_norm else None, None))
    return blocks


class SimCLRProjectionHead(ProjectionHead):
    """SimCLR's g(h) = W2 ReLU(W1 h) (v1: 2 layers; v2: 3), batch norm after
    every linear layer by default, as lightly's."""

    def __init__(self, input_dim: int = 2048, hidden_dim: int = 2048, output_dim: int = 128,
                 num_layers: int = 2, batch_norm: bool = True):
        super().__init__(_mlp_blocks(input_dim, hidden_dim, output_dim, num_layers, batch_norm, batch_norm))


class MoCoProjectionHead(ProjectionHead):
    """MoCo v2's 2-layer MLP (hidden 2048, output 128, no batch norm); MoCo v3:
    ``num_layers=3, batch_norm=True`` with 4096 / 256."""

    def __init__(self, input_dim: int = 2048, hidden_dim: int = 2048, output_dim: int = 128,
                 num_layers: int = 2, batch_norm: bool = False):
        super().__init__(_mlp_blocks(input_dim, hidden_dim, output_dim, num_layers, batch_norm, batch_norm))


class BYOLProjectionHead(ProjectionHead):
    """BYOL's projector: Linear 4096, BatchNorm, ReLU, Linear 256."""

    def __init__(self, input_dim: int = 2048, hidden_dim: int = 4096, output_dim: int = 256):
        super().__init__(_mlp_blocks(input_dim, hidden_dim, output_dim, 2, True, False))


class BYOLPredictionHead(ProjectionHead):
    """BYOL's predictor q: the projector's shape on the 256-d projection."""

    def __init__(self, input_dim: int = 256, hidden_dim: int = 4096, output_dim: int = 256):
        super().__init__(_mlp_blocks(input_dim, hidden_dim, output_dim, 2, True, False))
