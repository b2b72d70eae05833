"""Shared fixtures: the kernel backends every EMA case runs on.

* ``cpu``: the C++ CPU kernels (torch.ops.ssl_ops on CPU tensors);
* ``emu-s<seed>``: the csrc/cuda kernels on the host emulator (torch.ops.ssl_ops_emu
  on CPU tensors), with threads and blocks in the order drawn from <seed>
  (0: index order);
* ``cuda``: the real CUDA kernels, when a GPU is present.
"""

import os

import pytest
import torch

# Deterministic mode refuses cuBLAS GEMMs without this (as for any torch matmul);
# the CUDA contrastive tests run the GEMM route under it. Set before CUDA starts.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import ssl_ops
from ssl_ops import emulation

# SSL_OPS_TEST_EMU_SEEDS (comma-separated) narrows them: scripts/test.sh runs
# the AddressSanitizer pass, which looks for memory errors rather than races,
# under one shuffled order.
EMU_SEEDS = tuple(int(s) for s in os.environ.get("SSL_OPS_TEST_EMU_SEEDS", "0,1,2").split(","))


class Backend:
    def __init__(self, name, device, namespace, seed=None):
        self.name = name
        self.device = torch.device(device)
        self.ops = getattr(torch.ops, namespace)
        self.seed = seed

    def activate(self):
        if self.seed is not None:
            emulation.load().set_schedule_seed(self.seed)
        return self


def _backend_params():
    params = [pytest.param(("cpu",), id="cpu")]
    for seed in EMU_SEEDS:
        params.append(pytest.param(("emu", seed), id=f"emu-s{seed}", marks=pytest.mark.emu))
    params.append(pytest.param(("cuda",), id="cuda", marks=pytest.mark.cuda))
    return params


def make_backend(spec):
    kind = spec[0]
    if kind == "cpu":
        return Backend("cpu", "cpu", "ssl_ops")
    if kind == "emu":
        if not emulation.available():
            pytest.skip("emulation module not built (SSL_OPS_BUILD_EMU=0)")
        return Backend(f"emu-s{spec[1]}", "cpu", "ssl_ops_emu", seed=spec[1]).activate()
    if not ssl_ops.cuda_kernels_available():
        pytest.skip("needs CUDA kernels and a GPU")
    return Backend("cuda", "cuda", "ssl_ops")


@pytest.fixture(params=_backend_params())
def backend(request):
    return make_backend(request.param)


# Backends that run the csrc/cuda source: the emulator and the GPU.
@pytest.fixture(params=[p for p in _backend_params() if p.values[0][0] != "cpu"])
def cuda_source_backend(request):
    return make_backend(request.param)


def pytest_report_header(config):
    info = ssl_ops.build_info()
    emu = emulation.module_name() if emulation.available() else "not built"
    return [
        f"ssl_ops: CUDA kernels compiled={info['cuda']} (arch {info['cuda_arch_list'] or '-'}), "
        f"GPU visible={torch.cuda.is_available()}, CPU ISA={info['cpu_isa']}",
        f"ssl_ops: CUDA kernels emulated on the host by ssl_ops.{emu}",
    ]


# The contrastive ops have two CUDA routes (Note [Contrastive routes] in
# csrc/cuda/contrastive_passes.cu), picked by SSL_OPS_CUDA_CONTRASTIVE_ROUTE on each
# call: the default (fused where it applies, the GEMM route elsewhere) and the
# GEMM route forced, both under every emulator seed.


def _contrastive_params(cuda_source_only=False):
    params = [] if cuda_source_only else [pytest.param(("cpu",), id="cpu")]
    for seed in EMU_SEEDS:
        params.append(pytest.param(("emu", seed), id=f"emu-s{seed}", marks=pytest.mark.emu))
    for seed in EMU_SEEDS:
        params.append(pytest.param(("emu", seed, "gemm"), id=f"emu-gemm-s{seed}", marks=pytest.mark.emu))
    params.append(pytest.param(("cuda",), id="cuda", marks=pytest.mark.cuda))
    params.append(pytest.param(("cuda", "gemm"), id="cuda-gemm", marks=pytest.mark.cuda))
    return params


def _with_route(request, monkeypatch):
    spec = request.param
    if spec[-1] == "gemm":
        monkeypatch.setenv("SSL_OPS_CUDA_CONTRASTIVE_ROUTE", "gemm")
        spec = spec[:-1]
    else:
        monkeypatch.delenv("SSL_OPS_CUDA_CONTRASTIVE_ROUTE", raising=False)
    return make_backend(spec)


@pytest.fixture(params=_contrastive_params())
def contrastive_backend(request, monkeypatch):
    """Like `backend`, with the CUDA source under both contrastive route settings."""
    return _with_route(request, monkeypatch)


@pytest.fixture(params=_contrastive_params(cuda_source_only=True))
def contrastive_cuda_source_backend(request, monkeypatch):
    return _with_route(request, monkeypatch)


# The asymmetric op's CPU kernel forms S in panels of rows against every
# candidate, or in tiles when the candidates are too many for a panel
# (SSL_OPS_CONTRASTIVE_CHUNK_ELEMENTS=1 forces the tiles).
@pytest.fixture(params=[pytest.param(("cpu",), id="cpu"), pytest.param(("cpu", "tiles"), id="cpu-tiles")]
                + [p for p in _backend_params() if p.values[0][0] != "cpu"])
def asym_backend(request, monkeypatch):
    if request.param == ("cpu", "tiles"):
        monkeypatch.setenv("SSL_OPS_CONTRASTIVE_CHUNK_ELEMENTS", "1")
        return make_backend(("cpu",))
    monkeypatch.delenv("SSL_OPS_CONTRASTIVE_CHUNK_ELEMENTS", raising=False)
    return make_backend(request.param)


@pytest.fixture(autouse=True)
def _seed_rng():
    torch.manual_seed(0)
