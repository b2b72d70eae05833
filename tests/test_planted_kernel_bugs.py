"""The kernel tests catch numeric bugs, proven on the CUDA source: the emulator
plants one bug at a time in the kernels (SSL_OPS_PLANTED, csrc/cuda/compat.cuh),
and the tests of test_contrastive_kernels.py must then fail. The Python layer's
mutations are scripts/mutation_check.py."""

import contextlib
import os

import pytest
import torch

import test_contrastive_kernels as kernel_tests
from conftest import make_backend
from ssl_ops import emulation

pytestmark = pytest.mark.emu

NONE, DROP_TRANSPOSED_TERM, POSITIVE_OFF_BY_ONE = 0, 1, 2


@contextlib.contextmanager
def planted(bug):
    module = emulation.load()
    module.set_planted_bug(bug)
    try:
        yield
    finally:
        module.set_planted_bug(NONE)


@pytest.fixture(params=["fused", "gemm"])
def emu(request, monkeypatch):
    """The emulated CUDA source on each contrastive route."""
    if not emulation.available():
        pytest.skip("emulation module not built (SSL_OPS_BUILD_EMU=0)")
    monkeypatch.setenv("SSL_OPS_CUDA_CONTRASTIVE_ROUTE", request.param)
    return make_backend(("emu", 1))


def assert_caught(bug, test, *args):
    test(*args)  # passes without the bug
    with planted(bug), pytest.raises(AssertionError):
        test(*args)


def test_dropped_transposed_gradient_term_is_caught(emu):
    """NT-Xent's gradient is (G + G^T) z_hat: the fused route loses the column
    anchors' term of its gradient pass, the GEMM route its d K_hat GEMM."""
    if os.environ["SSL_OPS_CUDA_CONTRASTIVE_ROUTE"] == "fused":
        # bf16 rows of 16-byte multiples: the shapes the fused route takes
        assert_caught(DROP_TRANSPOSED_TERM, kernel_tests.test_sym_op, emu, torch.bfloat16, 130, 64)
        assert_caught(DROP_TRANSPOSED_TERM, kernel_tests.test_sym_op_anchor_range, emu, torch.bfloat16, 200, 0, 70)
    else:
        assert_caught(DROP_TRANSPOSED_TERM, kernel_tests.test_sym_op, emu, torch.float32, 130, 65)
        assert_caught(DROP_TRANSPOSED_TERM, kernel_tests.test_sym_op, emu, torch.bfloat16, 130, 64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_positive_off_by_one_is_caught(emu, dtype):
    assert_caught(POSITIVE_OFF_BY_ONE, kernel_tests.test_asym_op_positive_offset, emu, dtype, 66, 200, 67)
    assert_caught(POSITIVE_OFF_BY_ONE, kernel_tests.test_asym_op, emu, dtype, 70, 66, 130, False)


def test_planted_bug_is_reset(emu):
    with planted(DROP_TRANSPOSED_TERM):
        pass
    kernel_tests.test_sym_op(emu, torch.float32, 64, 64)
    with pytest.raises(RuntimeError, match="unknown planted bug 7"):
        emulation.load().set_planted_bug(7)
