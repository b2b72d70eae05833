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


def _collect(ema, online, buffers):
    """(names, ema tensors, online tensors, buffer copies) for modules or lists."""
    if buffers not in _BUFFER_MODES:
        raise ValueError(f"ssl_ops.ema_update_: buffers must be one of {_BUFFER_MODES}, got {buffers!r}")
    if isinstance(ema, nn.Module) != isinstance(online, nn.Module):
        raise TypeError(
            "ssl_ops.ema_update_: ema and online must both be nn.Modules or both iterables of "
            f"tensors, got {type(ema).__name__} and {type(online).__name__}"
        )
    if not isinstance(ema, nn.Module):
        ema_tensors, online_tensors = list(ema), list(online)
        return [f"ema[{i}]" for i in range(len(ema_tensors))], ema_tensors, online_tensors, []
    params = _matched("parameters", ema.named_parameters(), online.named_parameters())
    names = [name for name, _, _ in params]
    ema_tensors = [e for _, e, _ in params]
    online_tensors = [o for _, _, o in params]
    copies = []
    for name, e, o in _matched("buffers", ema.named_buffers(), online.named_buffers()):
        if e.is_floating_point() and buffers == "ema":
            names.append(name)
            ema_tensors.append(e)
            online_tensors.append(o)
        elif buffers == "copy" or (buffers == "ema" and not e.is_floating_point()):
            if e.shape != o.shape:
                raise ValueError(
                    f"ssl_ops.ema_update_: buffer {name!r} has shape {tuple(o.shape)} in online "
                    f"but {tuple(e.shape)} in ema"
                )
            copies.append((e, o))
    return names, ema_tensors, online_tensors, copies


def _local_shards(names, ema_tensors, online_tensors):
    """DTensor pairs (FSDP2's parameters) as their local shards, updated in
    place with no gather; placements and meshes must match."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without torch.distributed
        return ema_tensors, online_tensors
    if not any(isinstance(t, DTensor) for t in (*ema_tensors, *online_tensors)):
        return ema_tensors, online_tensors
    ema_local, online_local = [], []
    for name, e, o in zip(names, ema_tensors, online_tensors):
        e_sharded, o_sharded = isinstance(e, DTensor), isinstance(o, DTensor)
        if e_sharded != o_sharded:
            raise ValueError(f"ssl_ops.ema_update_: {name} is a DTensor in {'ema' if e_sharded else 'online'} "
                             f"but a plain tensor in {'online' if e_sharded else 'ema'}")
        if e_sharded:
            if e.device_mesh != o.device_mesh or tuple(e.placements) != tuple(o.placements):
                raise ValueError(f"ssl_ops.ema_update_: {name} is sharded as {tuple(e.placements)} on "
                                 f"{e.device_mesh} in ema but {tuple(o.placements)} on {o.device_mesh} in online; "
                                 f"the local shards must correspond")
            e, o = e.to_local(), o.to_local()
        ema_local.append(e)
        online_local.append(o)
    return ema_local, online_local


def _check_momentum(momentum):
    if isinstance(momentum, torch.Tensor):
        if momentum.numel() != 1 or not momentum.is_floating_point():
            raise ValueError("ssl_ops.ema_update_: a tensor momentum must be one floating-point element, got "
                             f"shape {tuple(momentum.shape)} and dtype {momentum.dtype}")
        if momentum.device.type == "cpu" and not torch.compiler.is_compiling():
            _check_momentum(momentum.item())  # free to read on the CPU
        return
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"ssl_ops.ema_update_: momentum must be in [0, 1], got {momentum}")


def _apply(ema_tensors, online_tensors, momentum, copies):
    if not ema_tensors and not online_tensors:
        # Nothing to dispatch on (the op needs a tensor); validate as it would.
        _check_momentum(momentum)
        return
    with torch.no_grad():
        if _fallback.eager_requested("ema"):
            from . import reference

            if isinstance(momentum, torch.Tensor):
                _check_momentum(momentum)
                momentum = momentum.item()  # the eager fallback's one sync
            reference.ema_update_(ema_tensors, online_tensors, momentum)
        elif isinstance(momentum, torch.Tensor):
            torch.ops.ssl_ops.ema_update_tensor_(ema_tensors, online_tensors, momentum.reshape(()))
        else:
            torch.ops.ssl_ops.ema_update_(ema_tensors, online_tensors, momentum)
        for e, o in copies:
            e.copy_(o)


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

    ``momentum`` is a number in [0, 1] or a one-element float32/float64 tensor
    on the parameters' device. A tensor is read by the kernel: no host sync,
    no recompilation under ``torch.compile`` when its value changes, and CUDA
    graphs replay its current value. On the CPU its range is checked before
    anything is written; on CUDA the kernel checks it on the device and traps
    before writing on a value outside [0, 1] (a CUDA error at the next
    synchronisation, as a device-side assert).

    DTensor parameters (FSDP2's ``fully_shard``) are updated shard by shard in
    place, with no gather; an ema and online pair must share placements and
    mesh (else a ValueError names the parameter).

    All tensors are updated by one fused kernel call (one multi-tensor launch on
    CUDA). Every argument is validated before anything is written: on error all
    tensors are left as they were. An fp32 EMA of an fp16/bf16 model is
    allowed (the math is done in fp32). Runs under ``torch.no_grad()``,
    returns None, and works inside ``torch.compile(fullgraph=True)``.
    ``ssl_ops.EMA`` prepares the matching once for repeated updates.
    """
    names, ema_tensors, online_tensors, copies = _collect(ema, online, buffers)
    ema_tensors, online_tensors = _local_shards(names, ema_tensors, online_tensors)
    _apply(ema_tensors, online_tensors, momentum, copies)


class EMA:
    """A prepared ``ema_update_`` of one pair (modules or tensor lists):

        ema = ssl_ops.EMA(momentum_encoder, encoder)   # matches and validates once
        ema.update(momentum)                           # then one kernel call per step

    The parameters (and buffers, by ``buffers`` as in ``ema_update_``) are
    matched by name once; each ``update`` passes the kept parameter objects
    straight to the kernel, which checks them (devices, dtypes, shapes,
    overlap) as every call does. So storage that moves under a parameter
    (``module.to(...)``, ``p.data = ...``) is followed for free; a parameter
    replaced by a new object (a new layer, or FSDP2's ``fully_shard`` after
    this was made) needs ``refresh()``. DTensor pairs are looked up each
    step. Bits are those of ``ema_update_``."""

    def __init__(self, ema, online, *, buffers="skip"):
        if not isinstance(ema, nn.Module):  # iterables are read once
            ema = list(ema)
        if not isinstance(online, nn.Module):
            online = list(online)
        self._ema, self._online, self.buffers = ema, online, buffers
        self.refresh()

    def refresh(self):
        names, ema_tensors, online_tensors, copies = _collect(self._ema, self._online, self.buffers)
        ema_local, online_local = _local_shards(names, ema_tensors, online_tensors)
        self._sharded = ema_local is not ema_tensors
        self._prepared = (ema_local, online_local, copies)

    def update(self, momentum):
        """One kernel call; ``momentum`` a number or a one-element tensor (see ``ema_update_``)."""
        if self._sharded:  # the DTensors' local shards, looked up each step
            self.refresh()
        ema_tensors, online_tensors, copies = self._prepared
        _apply(ema_tensors, online_tensors, momentum, copies)
