"""Momentum schedules."""

import math
import warnings


def cosine_schedule(step, max_steps, start_value, end_value, period=None, *, out=None):
    """Cosine decay from ``start_value`` to ``end_value``, with the semantics,
    errors and warning of ``lightly.utils.scheduler.cosine_schedule``.

    * ``period`` given: ``end - (end - start) * (cos(2 * pi * step / period) + 1) / 2``.
    * else ``end_value`` when ``max_steps <= 1`` or ``step >= max_steps - 1``;
    * else ``end - (end - start) * (cos(pi * step / (max_steps - 1)) + 1) / 2``.

    Raises ValueError for ``step < 0``, ``max_steps < 0`` or ``period <= 0``;
    warns (RuntimeWarning) when ``step > max_steps`` without a period.

    ``out``: a one-element tensor (say the momentum on the GPU, for
    ``ema_update_``) filled with the value, and returned instead of a float:
    a fill kernel, no host sync, and a CUDA graph or compiled step that reads
    the tensor sees each step's value.
    """
    if step < 0:
        raise ValueError(f"Current step number {step} can't be negative.")
    if max_steps < 0:
        raise ValueError(f"Total step number {max_steps} can't be negative.")
    if period is None and step > max_steps:
        warnings.warn(
            f"Current step number {step} exceeds max_steps {max_steps}.",
            category=RuntimeWarning,
        )
    if period is not None and period <= 0:
        raise ValueError(f"Period {period} must be >= 1")

    if period is not None:
        cosine = math.cos(2 * math.pi * step / period)
    elif max_steps <= 1 or step >= max_steps - 1:
        return _value_or_fill(float(end_value), out)
    else:
        cosine = math.cos(math.pi * step / (max_steps - 1))
    return _value_or_fill(float(end_value - (end_value - start_value) * (cosine + 1) / 2), out)


def _value_or_fill(value, out):
    if out is None:
        return value
    return out.fill_(value)


def solo_learn_tau(step, max_steps, base_tau=0.996, final_tau=1.0):
    """solo-learn's MomentumUpdater schedule:
    ``final - (final - base) * (cos(pi * step / max_steps) + 1) / 2``."""
    return final_tau - (final_tau - base_tau) * (math.cos(math.pi * step / max_steps) + 1) / 2


def timm_ema_decay(step=None, decay=0.9999, min_decay=0.0, update_after_step=0, use_warmup=False,
                   warmup_gamma=1.0, warmup_power=2 / 3):
    """timm's ``ModelEmaV3.get_decay``: ``decay`` without a step; 0 until
    ``update_after_step`` has passed; with warmup ``1 - (1 + s / gamma) ** -power``
    clamped to ``[min_decay, decay]``."""
    if step is None:
        return decay
    step = max(0, step - update_after_step - 1)
    if step <= 0:
        return 0.0
    if use_warmup:
        value = 1 - (1 + step / warmup_gamma) ** -warmup_power
        return max(min(value, decay), min_decay)
    return decay
