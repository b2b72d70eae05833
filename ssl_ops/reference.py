"""Pure-PyTorch versions of every ssl_ops operation: the baseline that tests
compare against and benchmarks time."""

import torch


def ema_update_(ema, online, momentum):
    """Per-parameter EMA loop (as solo-learn's MomentumUpdater):
    ``ema = momentum * ema + (1 - momentum) * online`` for each pair of tensors."""
    with torch.no_grad():
        for e, o in zip(ema, online):
            e.mul_(momentum).add_(o.to(e.dtype), alpha=1 - momentum)
