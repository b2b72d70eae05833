"""The path each GPU generation takes (Note [Tensor cores per arch],
csrc/cuda/tensor_core_arch.h), on the emulator pretending to be an sm_75
(T4: fp16 tensor cores only), an sm_80 and an sm_90: the host code picks the
cosine matrix's tile path and the contrastive losses' route (fused on sm_80+)
from the device's compute capability, and every pick must compute the same
function."""

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
    monkeypatch.setenv("SSL_OPS_CUDA_COSINE_MATRIX_ROUTE", "tiles")  # the arch-dependent tile kernels
    monkeypatch.delenv("SSL_OPS_CUDA_CONTRASTIVE_ROUTE", raising=False)
    yield backend
    emulation.load().set_compute_capability(90)


@pytest.mark.parametrize("capability", CAPABILITIES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_kernels_on_each_arch(emu, capability, dtype, monkeypatch):
    emulation.load().set_compute_capability(capability)
    contrastive.test_sym_op(emu, dtype, 130, 64)  # fp16/bf16: fused from sm_80, GEMM route on sm_75
    contrastive.test_asym_op(emu, dtype, 65, 130, 32, True)
    for symmetric in (False, True):
        cosine_matrix.test_matrix_op(emu, dtype, 72, 136, 130, symmetric, "tiles+sum", monkeypatch)


def cosine_tile(emu, dtype):
    a = cosine_matrix.rand((70, 48), dtype, emu.device, 10)
    b = cosine_matrix.rand((66, 48), dtype, emu.device, 11)
    return emu.ops.cosine_similarity_matrix(a, b, 1e-8)


def test_tf32_tensor_cores_only_from_sm80(emu):
    previous = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        emulation.load().set_compute_capability(90)
        exact = cosine_tile(emu, torch.float32)
        torch.backends.cuda.matmul.allow_tf32 = True
        tf32_sm90 = cosine_tile(emu, torch.float32)
        emulation.load().set_compute_capability(75)
        tf32_sm75 = cosine_tile(emu, torch.float32)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    assert not torch.equal(exact, tf32_sm90)  # sm_90 rounds operands to TF32
    assert torch.equal(exact, tf32_sm75)  # an sm_75 has no TF32: the exact FMA path


@pytest.mark.parametrize("dtype, capability, tensor_cores", [
    (torch.float16, 75, True), (torch.bfloat16, 75, False), (torch.bfloat16, 80, True), (torch.float16, 90, True),
])
def test_which_dtypes_use_tensor_cores_where(emu, dtype, capability, tensor_cores):
    emulation.load().set_compute_capability(capability)
    before = emulation.load().mma_count()
    cosine_tile(emu, dtype)
    assert (emulation.load().mma_count() > before) == tensor_cores


def test_unknown_capability_is_refused():
    with pytest.raises(RuntimeError, match="pretends to be sm_70, 75, 80, 86, 89 or 90; got 61"):
        emulation.load().set_compute_capability(61)
