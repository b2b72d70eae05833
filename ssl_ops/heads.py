"""Projection and prediction heads of SimCLR, MoCo and BYOL, built like
lightly's (same layers in the same order in ``self.layers``, so state dicts
are interchangeable): each block is Linear (no bias when batch norm follows),
then optional BatchNorm1d, then optional ReLU."""

from typing import Optional, Sequence, Tuple, Union

from torch import Tensor, nn

Block = Union[
    Tuple[int, int, Optional[nn.Module], Optional[nn.Module]],
    Tuple[int, int, Optional[nn.Module], Optional[nn.Module], bool],
]


class ProjectionHead(nn.Module):
    """An MLP of lightly's blocks: ``(in_features, out_features, batch_norm or
    None, activation or None)``, optionally with a fifth element ``use_bias``
    (default: a bias only without batch norm). Falsy modules are left out, as
    lightly does."""

    def __init__(self, blocks: Sequence[Block]):
        super().__init__()
        layers = []
        for block in blocks:
            if len(block) not in (4, 5):
                raise ValueError(
                    "each block must be (in_features, out_features, batch_norm, activation[, use_bias]), "
                    f"got {len(block)} elements: {block!r}"
                )
            in_features, out_features, batch_norm, activation, *bias = block
            use_bias = bias[0] if bias else not bool(batch_norm)
            layers.append(nn.Linear(in_features, out_features, bias=use_bias))
            layers += [m for m in (batch_norm, activation) if m]
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
