"""Access to the test-only host emulation of the CUDA kernels (README, "How CUDA
code is tested"). The csrc/cuda kernels, compiled for the CPU, are reached as
``torch.ops.ssl_ops_emu.<op>`` on CPU tensors once ``load()`` has run."""

import importlib
import os


def module_name():
    """``_cuda_emu``, or the module named by SSL_OPS_EMU_MODULE (``_cuda_emu_asan``)."""
    return os.environ.get("SSL_OPS_EMU_MODULE", "_cuda_emu")


def load():
    """Imports the emulation module; raises ImportError when it was not built
    (``SSL_OPS_BUILD_EMU=0``)."""
    from . import _extension  # noqa: F401  (the emulated ops share validation with _C)

    return importlib.import_module(f"ssl_ops.{module_name()}")


def available():
    try:
        load()
    except ImportError:
        return False
    return True
