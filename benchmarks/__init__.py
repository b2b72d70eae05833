"""The benchmarks (python -m benchmarks). Importing the package quiets one log
line, below, in every benchmark process."""

import logging


class _NoGpuToolkitNotice(logging.Filter):
    """torch.compile's CPU code generator imports torch.utils.cpp_extension,
    which logs "No CUDA runtime is found, using CUDA_HOME=..." whenever a CUDA
    toolkit is installed and no GPU is visible (the path itself comes right from
    scripts/env.sh, which exports the toolkit setup.py built with). The CPU
    benchmarks use no toolkit, and their header already says there is no GPU."""

    def filter(self, record):
        return not record.getMessage().startswith("No CUDA runtime is found")


logging.getLogger("torch.utils.cpp_extension").addFilter(_NoGpuToolkitNotice())
