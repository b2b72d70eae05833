"""Running a test body on the CPU kernels or on the CUDA source under the
emulator: route names "cpu", "emulated" (the default contrastive route),
"emulated-gemm" (the GEMM route forced)."""

import contextlib

import pytest

from ssl_ops import emulation


@contextlib.contextmanager
def route(name, monkeypatch):
    if name == "cpu":
        yield
        return
    if not emulation.available():
        pytest.skip("the emulation module is not built")
    if "-" in name:
        monkeypatch.setenv("SSL_OPS_CUDA_CONTRASTIVE_ROUTE", name.split("-")[1])
    with emulation.use_emulated_kernels():
        yield
