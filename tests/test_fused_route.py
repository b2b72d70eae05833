"""The fused route's statistics pass (csrc/cuda/contrastive_fused_stats.cuh)
on the emulator: forward calls without a gradient on bf16/fp16 rows, and fp32
rows where torch allows TF32, of 4 to 256 features, every form the GEMM route
serves (pairs and SupCon labels; mean,
log-sum-exp and excluded positives; anchor ranges; MoCo's positive key, cross-
view and offset positives; reductions none, mean and sum), against float64,
with proof that the fused kernel ran (mma.sync counts) and no vendor GEMM did,
that other shapes keep the GEMM route, and that the primitives' planted bugs
fail these tests."""

import contextlib

import pytest
import torch
import torch.nn.functional as F

from conftest import EMU_SEEDS, make_backend
from ssl_ops import emulation, reference
from tolerances import assert_close, rtol
from test_contrastive_kernels import (EPS, EXCLUDED, LOGSUMEXP, checker, rand, sym_excluded_reference,
                                      sym_lse_reference, sym_reference)

pytestmark = pytest.mark.emu

MEAN = 0
FRAGMENT_LANE, MISSING_WAIT_GROUP, SWIZZLE_OFF_BY_ONE, PLAIN_TILES_ADD_NOTHING = 3, 4, 5, 6
HALF = [torch.bfloat16, torch.float16]
TF32 = "tf32"  # fp32 rows with torch's TF32 allowed: the fused kernels' m16n8k8 path
FUSED_DTYPES = HALF + [TF32]


def as_dtype(dtype):
    return torch.float32 if dtype == TF32 else dtype


@contextlib.contextmanager
def tf32_allowed(allowed):
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


@pytest.fixture(params=FUSED_DTYPES, ids=str)
def fused_dtype(request):
    """Each dtype the fused route serves, TF32 allowed for "tf32" only."""
    with tf32_allowed(request.param == TF32):
        yield request.param


def skip_past_the_fused_width(dtype, d):
    """The fused route takes rows of up to 512 bytes: 256 bf16/fp16 features, 128 fp32 ones."""
    if dtype == TF32 and d > 128:
        pytest.skip("TF32 rows of more than 128 features take the GEMM route (test_other_shapes_keep_the_gemm_route)")


def fused_checker(dtype, length, scale, **kwargs):
    return checker(as_dtype(dtype), length, scale, tf32=dtype == TF32, **kwargs)


@pytest.fixture(params=EMU_SEEDS, ids=lambda s: f"emu-s{s}")
def emu(request, monkeypatch):
    monkeypatch.delenv("SSL_OPS_CUDA_CONTRASTIVE_ROUTE", raising=False)  # the default: fused where it applies
    return make_backend(("emu", request.param))


@contextlib.contextmanager
def fused_kernel_runs(expected=True):
    """The block runs the fused kernel (mma.sync count grows) and no aten::mm,
    or (expected False) the GEMM route instead."""
    module = emulation.load()
    before = module.mma_count()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        yield
    ran = module.mma_count() > before
    mms = [e.key for e in prof.key_averages() if e.key in ("aten::mm", "aten::addmm", "aten::bmm")]
    if expected:
        assert ran and not mms, f"fused kernel ran: {ran}; vendor GEMMs: {mms}"
    else:
        assert not ran and mms, f"expected the GEMM route; fused kernel ran: {ran}"


def against_gemm_route(run, length, scale, monkeypatch):
    """run() on the fused route, and on the GEMM route from the same operands:
    both form S in fp32 from the same rounded rows, so only the order of the
    fp32 sums separates them (a far tighter check than the float64 one's).
    With TF32 the operands' rounding differs too (the emulated vendor GEMM
    truncates, the fused kernels round to nearest)."""
    with fused_kernel_runs():
        fused = run()
    with monkeypatch.context() as patch:
        patch.setenv("SSL_OPS_CUDA_CONTRASTIVE_ROUTE", "gemm")
        gemm = run()
    tf32 = torch.backends.cuda.matmul.allow_tf32
    tol = rtol(torch.float32, length=length, logit_scale=scale, rounds_operands=False, tf32=tf32)
    for i, (a, b) in enumerate(zip(fused, gemm)):
        if a.is_floating_point():
            finite = torch.isfinite(b)  # lse is -inf for a row without candidates (one row)
            assert torch.equal(torch.isfinite(a), finite) and torch.equal(a[~finite], b[~finite])
            if finite.any():
                assert_close(a[finite], b[finite], tol, f"output {i}, fused against the GEMM route")
        else:
            assert torch.equal(a, b), f"output {i}, fused against the GEMM route"
    return fused


def sym_rows(emu, z, labels, begin, end, scale, form, monkeypatch):
    rows, lse, count, empty, lse_pos = against_gemm_route(
        lambda: emu.ops.contrastive_sym_loss(z, labels, begin, end, scale, EPS, True, 0, False, form),
        z.shape[0] + z.shape[1], scale, monkeypatch)
    assert empty.numel() == 0
    return rows, lse, count, lse_pos


SYM_SHAPES = [(1, 8), (2, 8), (63, 64), (130, 40), (200, 128), (65, 72), (70, 136), (130, 256)]


@pytest.mark.parametrize("rows,d", SYM_SHAPES)
@pytest.mark.parametrize("form", [MEAN, LOGSUMEXP, EXCLUDED], ids=["mean", "logsumexp", "excluded"])
def test_sym_forms(emu, fused_dtype, rows, d, form, monkeypatch):
    """Partial row blocks and column tiles, one and two rows, D from one 16-byte
    chunk to 256 (each row width the kernels are built for); groups of 1 to 4
    rows (0 to 3 positives)."""
    sym_forms_case(emu, fused_dtype, rows, d, form, monkeypatch)


@pytest.mark.parametrize("rows,d", [(1, 4), (70, 36), (65, 124)])
def test_tf32_rows_of_four_features(emu, rows, d, monkeypatch):
    """fp32 rows are whole 16-byte chunks from 4 features on."""
    with tf32_allowed(True):
        sym_forms_case(emu, TF32, rows, d, MEAN, monkeypatch)


def sym_forms_case(emu, dtype, rows, d, form, monkeypatch):
    skip_past_the_fused_width(dtype, d)
    z = rand((rows, d), as_dtype(dtype), "cpu", 31)
    sizes = torch.tensor([1, 2, 3, 4])
    labels = torch.repeat_interleave(torch.arange(rows), sizes.repeat(rows)[:rows])[:rows]
    labels = labels[torch.randperm(rows, generator=torch.Generator().manual_seed(32))]
    scale = 1 / 0.1
    same = labels[:, None] == labels[None, :]
    valid = (same.sum(1) - 1) > 0
    out, lse, count, lse_pos = sym_rows(emu, z, labels, 0, rows, scale, form, monkeypatch)
    check = fused_checker(dtype, rows + d, scale)
    assert count.tolist() == (same.sum(1) - 1).tolist()
    reference_fn = {MEAN: sym_reference, LOGSUMEXP: sym_lse_reference, EXCLUDED: sym_excluded_reference}[form]
    ref_rows, _ = reference_fn(z, labels, scale, valid.double())
    check(out, ref_rows, "row losses")


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("rows,begin,end", [(200, 0, 70), (200, 130, 200), (260, 65, 195), (140, 1, 2)])
def test_sym_anchor_range(emu, dtype, rows, begin, end, monkeypatch):
    """The anchors one process owns against every row (first_row, self by global index)."""
    z = rand((rows, 64), dtype, "cpu", 33)
    labels = torch.arange(rows).remainder(rows // 2)
    scale = 1 / 0.3
    anchor = torch.zeros(rows, dtype=torch.bool)
    anchor[begin:end] = True
    valid = ((labels[:, None] == labels[None, :]).sum(1) > 1) & anchor
    out, _, count, _ = sym_rows(emu, z, labels, begin, end, scale, MEAN, monkeypatch)
    ref_rows, _ = sym_reference(z, labels, scale, valid.double())
    checker(dtype, rows + 64, scale)(out, ref_rows * valid, "row losses, 0 outside the anchors")
    assert (count[~anchor] == 0).all() and (count[anchor] > 0).all()


@pytest.mark.parametrize("reduction", [0, 1, 2], ids=["none", "mean", "sum"])
def test_sym_reductions(emu, reduction):
    rows = 150
    z = rand((rows, 32), torch.bfloat16, "cpu", 34)
    labels = torch.arange(rows).remainder(rows // 2)
    with fused_kernel_runs():
        loss, *_ = emu.ops.contrastive_sym_loss(z, labels, 0, rows, 1 / 0.2, EPS, True, reduction, False)
    ref_rows, _ = sym_reference(z, labels, 1 / 0.2, torch.ones(rows, dtype=torch.float64))
    expected = [ref_rows, ref_rows.mean(), ref_rows.sum()][reduction]
    checker(torch.bfloat16, rows + 32, 1 / 0.2)(loss, expected, "loss")


@pytest.mark.parametrize("batch,queue,d", [(1, 1, 8), (65, 700, 64), (70, 66, 128), (66, 130, 256)])
@pytest.mark.parametrize("with_queue", [True, False], ids=["moco", "cross-view"])
@pytest.mark.parametrize("reduction", [0, 1], ids=["none", "mean"])
def test_asym(emu, fused_dtype, batch, queue, d, with_queue, reduction, monkeypatch):
    """MoCo (the positive key's logit merged as each row's first term) and
    cross-view InfoNCE (the positive on the diagonal)."""
    skip_past_the_fused_width(fused_dtype, d)
    dtype = as_dtype(fused_dtype)
    q = rand((batch, d), dtype, "cpu", 35)
    k = rand((batch, d), dtype, "cpu", 36)
    qu = rand((queue, d), dtype, "cpu", 37) if with_queue else None
    candidates, positive = (qu, k) if with_queue else (k, None)
    scale = 1 / 0.2
    loss, *_ = against_gemm_route(
        lambda: emu.ops.contrastive_asym_loss(q, candidates, positive, 0, scale, EPS, True, reduction,
                                              [False, False, False]),
        batch + queue + d, scale, monkeypatch)
    inputs = [t.double() for t in (q, k) + ((qu,) if with_queue else ())]
    ref = reference.info_nce_loss(*inputs, temperature=0.2, reduction=["none", "mean"][reduction])
    fused_checker(fused_dtype, batch + queue + d, scale)(loss, ref, "loss")


@pytest.mark.parametrize("batch,keys,offset", [(1, 3, 2), (70, 140, 70), (66, 200, 67)])
def test_asym_positive_offset(emu, batch, keys, offset, monkeypatch):
    """MoCo v3 / CLIP with gathered keys: the positive of query i is key i + offset."""
    q = rand((batch, 24), torch.bfloat16, "cpu", 38)
    k = rand((keys, 24), torch.bfloat16, "cpu", 39)
    scale = 1 / 0.2
    rows, *_ = against_gemm_route(
        lambda: emu.ops.contrastive_asym_loss(q, k, None, offset, scale, EPS, True, 0, [False, False, False]),
        keys + 24, scale, monkeypatch)
    logits = F.normalize(q.double(), dim=1) @ F.normalize(k.double(), dim=1).t() * scale
    ref_rows = F.cross_entropy(logits, torch.arange(batch) + offset, reduction="none")
    checker(torch.bfloat16, keys + 24, scale)(rows, ref_rows, "row losses")


@pytest.mark.parametrize("batch,queue,d", [(1, 1, 8), (65, 700, 64), (70, 130, 128), (130, 66, 40), (66, 70, 256)])
@pytest.mark.parametrize("form", ["moco", "moco-positive-grad", "cross-view", "offset"])
def test_query_gradient_in_the_statistics_pass(emu, fused_dtype, batch, queue, d, form):
    """InfoNCE whose query alone asks for a gradient (MoCo's detached queue,
    MoCo v3's momentum keys): loss and d query from the fused pass, no GEMM
    (Note [Fused query gradient]); MoCo's positive key may take a gradient
    too (its term needs no product of the pairs)."""
    skip_past_the_fused_width(fused_dtype, d)
    dtype = as_dtype(fused_dtype)
    q = rand((batch, d), dtype, "cpu", 45)
    if form.startswith("moco"):
        k, candidates = rand((batch, d), dtype, "cpu", 46), rand((queue, d), dtype, "cpu", 47)
        positive, offset = k, 0
    else:
        offset = 0 if form == "cross-view" else min(queue - batch, 17) if queue > batch else 0
        candidates = rand((max(batch + offset, queue if form == "offset" else batch), d), dtype, "cpu", 48)
        positive = None
    mask = [True, False, form == "moco-positive-grad"]
    scale = 1 / 0.2
    with fused_kernel_runs():
        loss, lse, gq, gk, gp = emu.ops.contrastive_asym_loss(q, candidates, positive, offset, scale, EPS, True, 1,
                                                              mask)
    assert gk.numel() == 0
    q64 = q.double().requires_grad_()
    wanted = [q64]
    if positive is not None:
        p64 = positive.double().requires_grad_(mask[2])
        ref = reference.info_nce_loss(q64, p64, candidates.double(), temperature=0.2)
        if mask[2]:
            wanted.append(p64)
    else:
        logits = F.normalize(q64, dim=1) @ F.normalize(candidates.double(), dim=1).t() * scale
        ref = F.cross_entropy(logits, torch.arange(batch) + offset)
    grads = torch.autograd.grad(ref, wanted)
    check = fused_checker(fused_dtype, batch + candidates.shape[0] + d, scale,
                          degenerate=(q, candidates) if candidates.shape[0] == 1 and positive is None else ())
    check(loss, ref.detach(), "mean loss")
    check(gq, grads[0], "grad query")
    if mask[2]:
        check(gp, grads[1], "grad positive key")


@pytest.mark.parametrize("scale", [-3.0, 1 / 0.5])
def test_sym_negative_and_small_scales(emu, scale, monkeypatch):
    """The shift is |scale| whatever its sign (every logit is at most |scale|)."""
    z = rand((100, 64), torch.float16, "cpu", 44)
    labels = torch.arange(100).remainder(50)
    out, *_ = sym_rows(emu, z, labels, 0, 100, scale, MEAN, monkeypatch)
    ref_rows, _ = sym_reference(z, labels, scale, torch.ones(100, dtype=torch.float64))
    checker(torch.float16, 164, scale)(out, ref_rows, "row losses")


@pytest.mark.parametrize("dtype,d,why", [
    (torch.bfloat16, 12, "rows of 24 bytes: no 16-byte cp.async"),
    (TF32, 30, "fp32 rows of 120 bytes: no 16-byte cp.async"),
    (torch.bfloat16, 264, "more features than the fused kernels' 256"),
    (TF32, 132, "fp32 rows of more than 512 bytes (128 features)"),
    (torch.float32, 64, "fp32 without TF32 (torch's default): exact products"),
    (torch.float64, 64, "fp64: exact products"),
    (torch.bfloat16, 64, "T = 0.01: past the logit bound, the running max"),
])
def test_other_shapes_keep_the_gemm_route(emu, dtype, d, why):
    z = rand((70, d), as_dtype(dtype), "cpu", 40)
    labels = torch.arange(70).remainder(35)
    scale = 100.0 if "0.01" in why else 5.0
    with tf32_allowed(dtype == TF32), fused_kernel_runs(expected=False):
        rows, *_ = emu.ops.contrastive_sym_loss(z, labels, 0, 70, scale, EPS, True, 0, False)
    ref_rows, _ = sym_reference(z, labels, scale, torch.ones(70, dtype=torch.float64))
    fused_checker(dtype, 70 + d, scale)(rows, ref_rows, "row losses")


def test_gemm_override_keeps_the_gemm_route(emu, monkeypatch):
    z = rand((70, 64), torch.bfloat16, "cpu", 41)
    labels = torch.arange(70).remainder(35)
    monkeypatch.setenv("SSL_OPS_CUDA_CONTRASTIVE_ROUTE", "gemm")
    for with_grad in (False, True):
        with fused_kernel_runs(expected=False):
            emu.ops.contrastive_sym_loss(z, labels, 0, 70, 5.0, EPS, True, 1, with_grad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, TF32], ids=str)
def test_sm80_takes_the_fused_route(emu, dtype, monkeypatch):
    """An A100 (sm_80) runs the same fused kernels as an H100 (sm_90): mma.sync,
    ldmatrix and cp.async are sm_80 instructions."""
    module = emulation.load()
    module.set_compute_capability(80)
    try:
        with tf32_allowed(dtype == TF32):
            sym_forms_case(emu, dtype, 130, 64, MEAN, monkeypatch)
    finally:
        module.set_compute_capability(90)


def test_arch_below_sm80_keeps_the_gemm_route(emu):
    module = emulation.load()
    z = rand((70, 64), torch.bfloat16, "cpu", 42)
    labels = torch.arange(70).remainder(35)
    module.set_compute_capability(75)
    try:
        with fused_kernel_runs(expected=False):
            emu.ops.contrastive_sym_loss(z, labels, 0, 70, 5.0, EPS, True, 1, False)
    finally:
        module.set_compute_capability(90)


PLANTED_BUGS = pytest.mark.parametrize("bug", [FRAGMENT_LANE, MISSING_WAIT_GROUP, SWIZZLE_OFF_BY_ONE],
                                       ids=["fragment-lane", "missing-wait-group", "swizzle-off-by-one"])
# The row widths and element types whose tiles the planted bugs must reach: the
# bf16 path at 64 and 256 features, and TF32's (its own P V operand loads).
PLANTED_CASES = pytest.mark.parametrize("dtype,d", [(torch.bfloat16, 64), (torch.bfloat16, 256), (TF32, 64)],
                                        ids=["bf16-64", "bf16-256", "tf32-64"])


def assert_planted_bug_fails(emu, bug, check):
    """check() passes, and fails (a wrong answer or a fault) with `bug` planted.
    A missing wait_group runs under schedule seed 0, where copies land only
    when waited for: no lucky landing."""
    check()
    module = emulation.load()
    module.set_planted_bug(bug)
    if bug == MISSING_WAIT_GROUP:
        module.set_schedule_seed(0)
    try:
        with pytest.raises((AssertionError, RuntimeError)):
            check()
    finally:
        module.set_planted_bug(0)
        module.set_schedule_seed(emu.seed)


@PLANTED_BUGS
@PLANTED_CASES
def test_planted_primitive_bugs_fail_the_fused_tests(emu, bug, dtype, d, monkeypatch):
    with tf32_allowed(dtype == TF32):
        assert_planted_bug_fails(emu, bug, lambda: sym_forms_case(emu, dtype, 130, d, MEAN, monkeypatch))
