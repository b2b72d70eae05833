"""What the build reports about itself."""

import os

import torch

import ssl_ops


def test_build_info_fields():
    info = ssl_ops.build_info()
    assert set(info) >= {"cuda", "cuda_version", "cuda_arch_list", "torch_version", "cpu_isa", "debug"}
    assert info["torch_version"] == torch.__version__
    assert isinstance(info["cpu_isa"], str) and info["cpu_isa"]
    if info["cuda"]:
        assert info["cuda_version"].split(".")[0] == torch.version.cuda.split(".")[0]
        assert info["cuda_arch_list"]
    else:
        assert info["cuda_version"] is None


def test_cuda_kernels_available_needs_kernels_and_gpu():
    expected = ssl_ops.build_info()["cuda"] and torch.cuda.is_available()
    assert ssl_ops.cuda_kernels_available() == expected


def test_cuda_kernels_built_when_ci_expects_them():
    # scripts/env.sh sets this when torch is a CUDA build and nvcc is installed.
    if os.environ.get("SSL_OPS_EXPECT_CUDA_KERNELS") == "1":
        assert ssl_ops.build_info()["cuda"], "CUDA kernels were expected but not compiled"
