"""The host emulation layer itself: what it offers kernels (warp shuffles and
votes, atomics, shared memory, wmma, launch checks) and proof that it reports
planted bugs: a missing barrier, a divergent barrier, an out-of-bounds write."""

import subprocess
import sys

import pytest
import torch

from ssl_ops import emulation

pytestmark = pytest.mark.emu

SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def emu():
    if not emulation.available():
        pytest.skip("emulation module not built (SSL_OPS_BUILD_EMU=0)")
    return emulation.load()


@pytest.mark.parametrize("seed", SEEDS)
def test_warp_shuffles_votes_atomics_and_shared_memory(emu, seed):
    emu.set_schedule_seed(seed)
    x = torch.randn(3, 96) * 2
    out = torch.ops.ssl_ops_emu._test_warp_ops(x)
    warps = x.view(3, 3, 32)

    def per_lane(values):  # (3, 3, 1) per-warp value -> (3, 96)
        return values.expand(3, 3, 32).reshape(3, 96)

    warp_sum = per_lane(warps.sum(-1, keepdim=True))
    torch.testing.assert_close(out[..., 0], warp_sum)  # xor butterfly
    torch.testing.assert_close(out[..., 1], warp_sum)  # down-reduction + broadcast
    torch.testing.assert_close(out[..., 2], warps.cumsum(-1).reshape(3, 96))  # up-scan
    groups = x.view(3, 12, 8)
    torch.testing.assert_close(out[..., 3], groups.sum(-1, keepdim=True).expand(3, 12, 8).reshape(3, 96))
    assert torch.equal(out[..., 4], per_lane((warps > 0).sum(-1, keepdim=True).float()))
    assert torch.equal(out[..., 5], per_lane((warps > 2).any(-1, keepdim=True).float()))
    assert torch.equal(out[..., 6], per_lane((warps > -10).all(-1, keepdim=True).float()))
    torch.testing.assert_close(out[..., 7], x.sum(1, keepdim=True).expand(3, 96))  # atomicAdd
    assert torch.equal(out[..., 8], x.roll(-1, 1))  # dynamic shared memory


def test_partial_warp_votes(emu):
    x = torch.tensor([1.0, -1.0, 2.0, 3.0, -4.0])
    out = torch.ops.ssl_ops_emu._test_partial_warp(x)
    assert torch.equal(out[:, 0], torch.full((5,), 5.0))  # __activemask of a 5-thread warp
    assert torch.equal(out[:, 1], torch.full((5,), 3.0))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("k", [16, 48])
def test_wmma_matches_matmul(emu, dtype, k):
    a = torch.randn(16, k).to(dtype)
    b = torch.randn(k, 16).to(dtype)
    out = torch.ops.ssl_ops_emu._test_wmma(a, b)
    if dtype == torch.float32:  # tf32: operands rounded to 10 mantissa bits
        ref = tf32_round(a).double() @ tf32_round(b).double()
    else:
        ref = a.double() @ b.double()
    tolerance = 1e-5 * ref.abs().max().item() * k
    torch.testing.assert_close(out[0].double(), ref, rtol=0, atol=tolerance)  # row-major B
    torch.testing.assert_close(out[1].double().t(), ref, rtol=0, atol=tolerance)  # col-major B, C


def tf32_round(x):
    """Round to nearest tf32, ties away from zero (cvt.rna.tf32.f32)."""
    bits = x.view(torch.int32)
    rounded = ((bits + 0x1000) & ~0x1FFF).view(torch.float32)
    return torch.where(torch.isfinite(x), rounded, x)


def test_launch_configuration_errors(emu):
    anchor = torch.empty(1)
    with pytest.raises(RuntimeError, match=r"invalid block \(2048,1,1\)"):
        torch.ops.ssl_ops_emu._test_launch_config(anchor, 2048, 1)
    with pytest.raises(RuntimeError, match=r"invalid grid \(0,1,1\)"):
        torch.ops.ssl_ops_emu._test_launch_config(anchor, 32, 0)
    torch.ops.ssl_ops_emu._test_launch_config(anchor, 32, 2)  # errors are not sticky


def test_dynamic_shared_memory_past_48_kb_needs_the_opt_in(emu):
    anchor = torch.empty(1)
    torch.ops.ssl_ops_emu._test_smem_launch(anchor, 48 * 1024, False)
    with pytest.raises(RuntimeError, match="without cudaFuncAttributeMaxDynamicSharedMemorySize"):
        torch.ops.ssl_ops_emu._test_smem_launch(anchor, 50 * 1024, False)
    torch.ops.ssl_ops_emu._test_smem_launch(anchor, 50 * 1024, True)  # launch_kernel opts in
    with pytest.raises(RuntimeError, match="exceeds 232448"):
        torch.ops.ssl_ops_emu._test_smem_launch(anchor, 228 * 1024, True)


def test_misaligned_vector_store_faults_as_on_a_gpu(emu):
    out = torch.zeros(12)  # torch aligns CPU storage to 64 bytes
    torch.ops.ssl_ops_emu._test_store16(out, 4)
    assert out.tolist() == [0.0] * 4 + [1.0, 2.0, 3.0, 4.0] + [0.0] * 4
    with pytest.raises(RuntimeError, match="misaligned 16-byte store"):
        torch.ops.ssl_ops_emu._test_store16(out, 1)


@pytest.mark.parametrize(
    "grid,fits",
    [((2**31 - 1, 65535, 65535), True), ((2**31, 1, 1), False), ((1, 65536, 1), False), ((1, 1, 65536), False),
     ((0, 1, 1), False), ((2**35 + 1, 1, 1), False)],  # 2^35 + 1 would wrap to 1 in a bare dim3
)
def test_every_grid_is_checked_at_the_hardware_limits(emu, grid, fits):
    """checked_grid (csrc/cuda/launch_limits.h), which builds every kernel's grid:
    the largest grid passes whole, one block more in any dimension is an error
    naming the grid, and an int64 is never truncated into a dim3."""
    anchor = torch.empty(1)
    if fits:
        torch.ops.ssl_ops_emu._test_checked_grid(anchor, *grid)
        return
    with pytest.raises(RuntimeError, match=rf"the test grid needs a grid of \({grid[0]}, {grid[1]}, {grid[2]}\) blocks"):
        torch.ops.ssl_ops_emu._test_checked_grid(anchor, *grid)


# ---- Planted bugs ------------------------------------------------------------------


def test_planted_missing_barrier_gives_wrong_sums(emu):
    x = torch.randn(8, 64)
    for seed in SEEDS:
        emu.set_schedule_seed(seed)
        good = torch.ops.ssl_ops_emu._planted_block_sum(x, True)
        torch.testing.assert_close(good, x.sum(1), rtol=1e-5, atol=1e-5)
    wrong = 0
    for seed in SEEDS:
        emu.set_schedule_seed(seed)
        x = torch.randn(8, 64)  # fresh values: stale shared memory must not match by luck
        racy = torch.ops.ssl_ops_emu._planted_block_sum(x, False)
        wrong += not torch.allclose(racy, x.sum(1), rtol=1e-5, atol=1e-5)
    assert wrong == len(SEEDS), "the race went unnoticed under some thread order"


def test_planted_divergent_barrier_is_a_deadlock(emu):
    out = torch.zeros(32)
    with pytest.raises(RuntimeError, match=r"deadlock in block \(0,0,0\).*waits at __syncthreads\(\)"):
        torch.ops.ssl_ops_emu._planted_divergent_barrier(out)


def run_under_asan(code):
    try:
        env = emulation.asan_environment()
    except ImportError as error:
        pytest.skip(str(error))
    prelude = "import torch, ssl_ops\nfrom ssl_ops import emulation\nemulation.load()\n"
    return subprocess.run(
        [sys.executable, "-c", prelude + code], env=env, capture_output=True, text=True, timeout=600
    )


def test_planted_out_of_bounds_write_is_reported_by_asan():
    clean = run_under_asan(
        "e = [torch.randn(1001)]\n"
        "torch.ops.ssl_ops_emu.ema_update_(e, [torch.randn(1001)], 0.5)\n"
        "print('clean run finished')"
    )
    assert clean.returncode == 0 and "clean run finished" in clean.stdout, clean.stderr[-3000:]
    planted = run_under_asan(
        "torch.ops.ssl_ops_emu._planted_out_of_bounds_write(torch.empty(100))\nprint('survived')"
    )
    assert planted.returncode != 0 and "survived" not in planted.stdout
    assert "AddressSanitizer: heap-buffer-overflow" in planted.stderr
    assert "WRITE of size 4" in planted.stderr and "off_by_one_kernel" in planted.stderr


def test_kernels_after_a_fault_run_clean_under_asan():
    """A faulting kernel leaves its threads' stacks mid-frame, redzones still
    poisoned; the next kernels reuse those stacks and must not trip over them
    (CI once died in the next test's gemm_row_stats_kernel)."""
    run = run_under_asan(
        "out = torch.zeros(12)\n"
        "try:\n"
        "    torch.ops.ssl_ops_emu._test_store16(out, 1)\n"
        "except RuntimeError as error:\n"
        "    assert 'misaligned 16-byte store' in str(error)\n"
        "z0, z1 = torch.randn(40, 32), torch.randn(40, 32)\n"
        "with emulation.use_emulated_kernels():\n"
        "    loss = ssl_ops.nt_xent_loss(z0, z1)\n"
        "print('finished', float(loss))"
    )
    assert run.returncode == 0 and "finished" in run.stdout, run.stderr[-3000:]
