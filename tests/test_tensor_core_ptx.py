"""The fused kernels' tensor-core primitives (csrc/cuda/tensor_core_ptx.cuh) on
the emulator: cp.async staging into swizzled shared memory, ldmatrix (plain and
.trans) and mma.sync in bf16, fp16 and TF32, checked against float64 matmuls,
with the PTX rules the GPU enforces and the planted bugs the tests must catch
(a wrong lane in a fragment, a missing wait_group, a swizzle off by one)."""

import pytest
import torch

import tolerances
from ssl_ops import emulation

pytestmark = pytest.mark.emu

NO_FAULT, MISALIGNED_LDMATRIX, COPY_OUTSIDE_SHARED = 0, 1, 2
FRAGMENT_LANE, MISSING_WAIT_GROUP, SWIZZLE_OFF_BY_ONE = 3, 4, 5
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@pytest.fixture(scope="module")
def emu():
    if not emulation.available():
        pytest.skip("emulation module not built (SSL_OPS_BUILD_EMU=0)")
    return emulation.load()


@pytest.fixture(params=[0, 1, 2], ids=lambda s: f"seed{s}")
def seeded(emu, request):
    emu.set_schedule_seed(request.param)
    yield emu
    emu.set_schedule_seed(0)


def tf32(x):
    """What the tensor cores read of fp32 operands: the top 19 bits."""
    return (x.view(torch.int32) & -8192).view(torch.float32)


def per_chunk(dtype):
    return 16 // torch.tensor([], dtype=dtype).element_size()


def operands(dtype, rows, cols, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(rows, k, generator=g).to(dtype)
    b = torch.randn(cols, k, generator=g).to(dtype)
    return a, b


def check(a, b):
    s, o = torch.ops.ssl_ops_emu._test_tensor_core_ptx(a, b, NO_FAULT)
    read = tf32 if a.dtype == torch.float32 else (lambda x: x)
    expected_s = read(a).double() @ read(b).double().T
    tol = tolerances.rtol(torch.float32, length=a.shape[1], rounds_operands=False)
    tolerances.assert_close(s, expected_s, tol, "S = A B^T")
    if a.dtype != torch.float32:
        # P is the kernel's own S rounded to the input type, so only O's
        # accumulation separates it from the reference.
        p = s.to(a.dtype).double()
        expected_o = torch.zeros(a.shape[0], 64, dtype=torch.float64)
        expected_o[:, : a.shape[1]] = p @ b.double()
        tolerances.assert_close(o, expected_o, tolerances.rtol(torch.float32, length=16, rounds_operands=False),
                                "O = P B")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,cols,chunks", [(32, 16, 8), (1, 1, 1), (17, 9, 3), (32, 16, 2)])
def test_primitives_match_matmul(seeded, dtype, rows, cols, chunks):
    """Full tiles (8 chunks of 16 bytes per row), one row and column, and
    partial tiles whose missing rows and chunks cp.async zero-fills."""
    check(*operands(dtype, rows, cols, chunks * per_chunk(dtype)))


def test_mma_counts_warp_instructions(emu):
    before = emu.mma_count()
    torch.ops.ssl_ops_emu._test_tensor_core_ptx(*operands(torch.bfloat16, 32, 16, 64), NO_FAULT)
    # per warp: 4 k steps x 2 n tiles for S, then 4 x 2 for O
    assert emu.mma_count() - before == 2 * (8 + 8)


@pytest.mark.parametrize("fault,message", [
    (MISALIGNED_LDMATRIX, "ldmatrix: a row address is not 16-byte aligned"),
    (COPY_OUTSIDE_SHARED, "cp.async: the destination is outside the block's dynamic shared memory"),
])
def test_ptx_rules_are_enforced(emu, fault, message):
    a, b = operands(torch.bfloat16, 32, 16, 64)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.ssl_ops_emu._test_tensor_core_ptx(a, b, fault)


@pytest.mark.parametrize("bug", [FRAGMENT_LANE, MISSING_WAIT_GROUP, SWIZZLE_OFF_BY_ONE],
                         ids=["fragment-lane", "missing-wait-group", "swizzle-off-by-one"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_planted_primitive_bugs_are_caught(seeded, bug, dtype):
    a, b = operands(dtype, 32, 16, 8 * per_chunk(dtype))
    check(a, b)
    seeded.set_planted_bug(bug)
    try:
        with pytest.raises((AssertionError, RuntimeError)):
            check(a, b)
    finally:
        seeded.set_planted_bug(0)
