"""In-place EMA update of a momentum encoder: ``ema <- m * ema + (1 - m) * online``."""

import torch
from torch import nn

from . import _extension  # noqa: F401  (registers torch.ops.ssl_ops)
from . import _fallback

_BUFFER_MODES = ("copy", "ema", "skip")


@torch.library.register_fake("ssl_ops::ema_update_")
def _ema_update_fake(ema, online, momentum):
    return None


@torch.library.register_fake("ssl_ops::_ema_update_chunked_")
def _ema_update_chunked_fake(ema, online, momentum, chunk_size):
    return None


def _matched(kind, ema_named, online_named):
    ema_named, online_named = list(ema_named), list(online_named)
    ema_names = [name for name, _ in ema_named]
    online_names = [name for name, _ in online_named]
    if ema_names != online_names:
        missing = sorted(set(online_names) ^ set(ema_names))
        raise ValueError(
            f"ssl_ops.ema_update_: ema and online modules have different {kind}: "
            f"{missing if missing else 'same names in a different order'}"
        )
    return [(name, e, o) for (name, e), (_, o) in zip(ema_named, online_named)]


def ema_update_(ema, online, momentum, *, buffers="skip"):
    """Updates ``ema`` in place: ``ema = momentum * ema + (1 - momentum) * online``.

    ``ema`` and ``online`` are either two ``nn.Module`` s of the same architecture
    (typically the momentum encoder and the online encoder) or two matching
    iterables of tensors. For modules, parameters are averaged and buffers are
    handled by ``buffers``: ``"skip"`` (default) leaves every buffer alone, as
    lightly's ``update_momentum``, solo-learn's ``MomentumUpdater`` and MoCo's
    reference code do (the momentum encoder keeps its own BN statistics);
    ``"copy"`` copies them all from ``online``; ``"ema"`` averages the
    floating-point ones (timm's ``ModelEmaV3``) and copies the integer ones
    (``num_batches_tracked``).

    All tensors are updated by one fused kernel call (one multi-tensor launch on
    CUDA). Every argument is validated before anything is written: on error all
    tensors are left as they were. ``momentum`` must be in [0, 1]. An fp32 EMA
    of an fp16/bf16 model is allowed (the math is done in fp32). Runs under
    ``torch.no_grad()``, returns None, and works inside
    ``torch.compile(fullgraph=True)``.
    """
    if buffers not in _BUFFER_MODES:
        raise ValueError(f"ssl_ops.ema_update_: buffers must be one of {_BUFFER_MODES}, got {buffers!r}")
    if isinstance(ema, nn.Module) != isinstance(online, nn.Module):
        raise TypeError(
            "ssl_ops.ema_update_: ema and online must both be nn.Modules or both iterables of "
            f"tensors, got {type(ema).__name__} and {type(online).__name__}"
        )
    copies = []
    if isinstance(ema, nn.Module):
        params = _matched("parameters", ema.named_parameters(), online.named_parameters())
        ema_tensors = [e for _, e, _ in params]
        online_tensors = [o for _, _, o in params]
        for name, e, o in _matched("buffers", ema.named_buffers(), online.named_buffers()):
            if e.is_floating_point() and buffers == "ema":
                ema_tensors.append(e)
                online_tensors.append(o)
            elif buffers == "copy" or (buffers == "ema" and not e.is_floating_point()):
                if e.shape != o.shape:
                    raise ValueError(
                        f"ssl_ops.ema_update_: buffer {name!r} has shape {tuple(o.shape)} in online "
                        f"but {tuple(e.shape)} in ema"
                    )
                copies.append((e, o))
    else:
        ema_tensors, online_tensors = list(ema), list(online)
    if not ema_tensors and not online_tensors:
        # Nothing to dispatch on (the op needs a tensor); validate as it would.
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"ssl_ops.ema_update_: momentum must be in [0, 1], got {momentum}")
        return
    with torch.no_grad():
        if _fallback.eager_requested("ema"):
            from . import reference

            reference.ema_update_(ema_tensors, online_tensors, momentum)
        else:
            torch.ops.ssl_ops.ema_update_(ema_tensors, online_tensors, momentum)
        for e, o in copies:
            e.copy_(o)
