"""The path each GPU generation takes (Note [Tensor cores per arch],
csrc/cuda/contrastive_kernels.cuh), on the emulator pretending to be an sm_75
(T4: fp16 tensor cores only), an sm_80 and an sm_90: the host code picks the
tile path from the device's compute capability, and every pick must compute
the same function."""

import pytest
import torch

import test_contrastive_kernels as contrastive
import test_cosine_matrix as cosine_matrix
from conftest import make_backend
from ssl_ops import emulation

pytestmark = pytest.mark.emu

CAPABILITIES = [75, 80, 90]


@pytest.fixture
def emu(monkeypatch):
    backend = make_backend(("emu", 0))  # in-order schedule: bit-comparable runs
    monkeypatch.setenv("SSL_OPS_CUDA_CONTRASTIVE_ROUTE", "tiles")  # the arch-dependent kernels
    yield backend
    emulation.load().set_compute_capability(90)


@pytest.mark.parametrize("capability", CAPABILITIES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_tile_kernels_on_each_arch(emu, capability, dtype, monkeypatch):
    emulation.load().set_compute_capability(capability)
    contrastive.test_sym_op(emu, dtype, 130, 65)
    contrastive.test_asym_op(emu, dtype, 65, 130, 33, True)
    for symmetric in (False, True):  # the tiles, whichever route the dtype defaults to
        cosine_matrix.test_matrix_op(emu, dtype, 72, 136, 130, symmetric, "tiles+sum", monkeypatch)


def sym_statistics(emu, dtype):
    z = contrastive.rand((70, 48), dtype, emu.device, 10)
    labels = torch.arange(35).repeat(2)
    return emu.ops.contrastive_sym_loss(z, labels, 0, 70, 10.0, contrastive.EPS, True, 1, True)


def test_tf32_tensor_cores_only_from_sm80(emu):
    previous = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        emulation.load().set_compute_capability(90)
        exact = sym_statistics(emu, torch.float32)
        torch.backends.cuda.matmul.allow_tf32 = True
        tf32_sm90 = sym_statistics(emu, torch.float32)
        emulation.load().set_compute_capability(75)
        tf32_sm75 = sym_statistics(emu, torch.float32)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    assert not torch.equal(exact[1], tf32_sm90[1])  # sm_90 rounds operands to TF32
    for a, b in zip(exact, tf32_sm75):  # an sm_75 has no TF32: the exact FMA path
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype, capability, tensor_cores", [
    (torch.float16, 75, True), (torch.bfloat16, 75, False), (torch.bfloat16, 80, True), (torch.float16, 90, True),
])
def test_which_dtypes_use_tensor_cores_where(emu, dtype, capability, tensor_cores):
    emulation.load().set_compute_capability(capability)
    before = emulation.load().mma_count()
    sym_statistics(emu, dtype)
    assert (emulation.load().mma_count() > before) == tensor_cores


def test_unknown_capability_is_refused():
    with pytest.raises(RuntimeError, match="pretends to be sm_70, 75, 80, 86, 89 or 90; got 61"):
        emulation.load().set_compute_capability(61)
