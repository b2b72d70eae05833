"""Loads the compiled extension (which registers the torch.ops.ssl_ops operators)."""

import torch

try:
    from . import _C
except ImportError as error:  # pragma: no cover - only without a build
    raise ImportError(
        "ssl_ops._C is not built. Install with `pip install --no-build-isolation .` "
        "(or `-e .`) with torch already installed; see README.md."
    ) from error


def build_info():
    """How the extension was built: a dict with ``cuda`` (CUDA kernels compiled),
    ``cuda_version``, ``cuda_arch_list``, ``torch_version`` (built against),
    ``cpu_isa`` (vector ISA of the CPU kernels in this process) and ``debug``."""
    return _C.build_info()


def cuda_kernels_available():
    """True when the CUDA kernels are compiled in and a GPU is visible."""
    return bool(_C.build_info()["cuda"]) and torch.cuda.is_available()
