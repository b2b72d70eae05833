"""How close a result must be to its float64 reference: the rules every test
uses, written once.

A kernel accumulates in fp32 (fp64 for float64 inputs), may round its
operands to the input dtype (normalised rows fed to tensor cores or a vendor
GEMM in bf16/fp16), and rounds its result to the output dtype. The reference
is computed in float64 from the same (already rounded) inputs, so only these
three steps separate the two. Relative to the magnitude of the reference:

- accumulation over ``length`` terms: ``sqrt(length) * u_acc`` (u is the unit
  roundoff, eps / 2). The worst case is ``length * u``, but rounding errors of
  independent terms add like a random walk: Higham and Mary's probabilistic
  bound, lambda sqrt(n) u, holds with overwhelming probability for a modest
  lambda, which the safety factor below supplies;
- operand rounding: a dot product of unit rows whose operands are each off by
  u relative is off by at most 2u absolute (Cauchy-Schwarz), so a logit scaled
  by ``|1/T|`` is off by ``2u |1/T|``; the loss and, through the softmax, its
  gradient inherit that;
- result rounding: u of the output dtype.

Errors in the logits move the loss and the gradient by the same factor, so
the first two terms are multiplied by ``1 + |logit_scale|``. A safety factor
of 4 covers the few chained operations (exp, log, the softmax's sums) that
each add their own rounding.

``assert_close`` compares against the largest reference magnitude, with no
absolute floor (a floor of 1 admits whole percent errors on mean-reduced
gradients of 1e-3), and checks the rows whose input norm is below eps on
their own: their gradient is g / eps (1e7 and more), which would otherwise set
the scale and leave every other row unchecked.
"""

import math

import torch

SAFETY = 4.0
FLOAT16_MAX = torch.finfo(torch.float16).max
# TF32 keeps 10 mantissa bits: a full ulp covers both the truncation of the
# emulated vendor GEMM and the rounding (cvt.rna) of the fused kernels.
TF32_ROUNDOFF = 2.0**-10


def unit_roundoff(dtype):
    return torch.finfo(dtype).eps / 2


def accumulator(dtype):
    """fp64 for float64 inputs, fp32 for the rest (what every kernel accumulates in)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def rtol(inputs, output=None, *, length=1, logit_scale=0.0, rounds_operands=True, tf32=False):
    """Relative tolerance of a result computed from ``inputs``-dtype tensors.

    output: the result's dtype (default: the input dtype); length: the longest
    reduction (features for a cosine, candidates for a log-sum-exp);
    logit_scale: 1/T for contrastive losses (0 for plain cosines);
    rounds_operands: the kernel may round normalised operands to the input
    dtype (tensor cores, vendor GEMMs); False for kernels that read the inputs
    and compute in the accumulator type throughout.
    tf32: fp32 operands go to the tensor cores as TF32 (torch allows it).
    """
    output = inputs if output is None else output
    u_acc = unit_roundoff(accumulator(inputs))
    u_operand = TF32_ROUNDOFF if tf32 else unit_roundoff(inputs) if rounds_operands else 0.0
    logit_error = (1.0 + abs(logit_scale)) * (math.sqrt(length) * u_acc + 2 * u_operand)
    return SAFETY * (logit_error + unit_roundoff(output))


def cancellation_floor(logit_scale, rows=(), weight=1.0):
    """The size of the terms a contrastive loss (no rows given) or its gradient
    (the input rows given) is formed from, for shapes where the exact result is
    0: one feature (every cosine is +-1, the normalisation's gradient vanishes)
    or one candidate (lse equals the positive logit). |1/T| |weight|, over the
    smallest row norm for a gradient."""
    floor = abs(logit_scale) * abs(float(weight))
    if rows:
        norms = torch.cat([r.detach().double().cpu().norm(dim=-1).flatten() for r in rows])
        floor /= max(norms.min().item(), 1e-30)
    return floor


def rows_below(x, eps):
    """Rows of x whose norm is below eps (their gradient is the clamped g / eps)."""
    return x.detach().double().cpu().norm(dim=-1) < eps


def _check(actual, expected, tol, what, floor):
    if expected.numel() == 0:
        return
    scale = max(expected.abs().max().item(), floor)
    err = (actual - expected).abs().max().item()
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:.3g} x scale {scale:.3g}"


def assert_close(actual, expected, tol, what="result", small_rows=None, floor=0.0):
    """max |actual - expected| <= tol * max |expected|, with the rows flagged in
    ``small_rows`` (a bool mask over dim 0) checked on their own scale.

    floor: for results that cancel to (nearly) 0, the size of the terms that
    cancel (the gradient of a cosine at D = 1 is g/||x|| - x_hat (x_hat . g)/||x||,
    exactly 0 in the math, a few ulp of g/||x|| in floats); 0 otherwise.

    A float16 result saturates at its largest finite value (as our kernels do
    for the g / eps gradient of a zero row), so the reference is clamped there.
    """
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    expected = expected.detach().double().cpu()
    if actual.dtype == torch.float16:
        expected = expected.clamp(-FLOAT16_MAX, FLOAT16_MAX)
    actual = actual.detach().double().cpu()
    assert torch.isfinite(actual).all(), f"{what}: not finite"
    if small_rows is None or not small_rows.any():
        _check(actual, expected, tol, what, floor)
        return
    _check(actual[small_rows], expected[small_rows], tol, f"{what} (rows below eps)", floor)
    _check(actual[~small_rows], expected[~small_rows], tol, f"{what} (other rows)", floor)
