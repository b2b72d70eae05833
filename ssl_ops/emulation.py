"""Access to the test-only host emulation of the CUDA kernels (README, "How CUDA
code is tested"). The csrc/cuda kernels, compiled for the CPU, are reached as
``torch.ops.ssl_ops_emu.<op>`` on CPU tensors once ``load()`` has run."""

import contextlib
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


def _emulated_mode():
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class EmulatedKernels(TorchDispatchMode):
        """Sends every ssl_ops operator call on CPU tensors to its ssl_ops_emu
        twin: the csrc/cuda host code and kernels on the emulator. Autograd runs
        above this mode, so ssl_ops' own backward formulas are the ones used."""

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func.namespace == "ssl_ops" and not any(
                isinstance(t, torch.Tensor) and t.device.type != "cpu"
                for t in torch.utils._pytree.tree_leaves((args, kwargs))
            ):
                packet = getattr(torch.ops.ssl_ops_emu, func._schema.name.split("::", 1)[1])
                return getattr(packet, func._overloadname)(*args, **kwargs)
            return func(*args, **kwargs)

    return EmulatedKernels()


@contextlib.contextmanager
def use_emulated_kernels():
    """Inside this context the public functions and modules (``nt_xent_loss``,
    ``info_nce_loss``, ``byol_loss``, ``negative_cosine_similarity``,
    ``cosine_similarity_matrix``, ``ema_update_``, the ``nn`` modules) given CPU
    tensors run the CUDA code path (host code and kernels, the vendor GEMMs as
    ``at::mm`` on the CPU) through the emulator: a whole training step on the
    CUDA route without a GPU. Slow; for tests and for checking a setup.

        with ssl_ops.emulation.use_emulated_kernels():
            loss = ssl_ops.nt_xent_loss(z0, z1)
            loss.backward()
    """
    load()
    with _emulated_mode():
        yield


def asan_environment(base=None):
    """Environment for a Python process that loads ``_cuda_emu_asan``: the
    AddressSanitizer runtime it links is preloaded (it must come first), leak
    checks are off (the interpreter itself leaks by design), and the emulated
    tests pick the ASan module."""
    import re
    import subprocess

    import ssl_ops

    env = dict(os.environ if base is None else base)
    package_dir = os.path.dirname(ssl_ops.__file__)
    candidates = [f for f in os.listdir(package_dir) if f.startswith("_cuda_emu_asan") and f.endswith(".so")]
    if not candidates:
        raise ImportError("ssl_ops._cuda_emu_asan is not built (SSL_OPS_BUILD_EMU_ASAN=1)")
    plain = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}  # ldd lists preloads apart
    ldd = subprocess.run(
        ["ldd", os.path.join(package_dir, candidates[0])], capture_output=True, text=True, env=plain
    )
    libraries = dict(re.findall(r"(lib(?:asan|stdc\+\+)\.so\S*) => (\S+)", ldd.stdout))
    asan = [path for name, path in libraries.items() if name.startswith("libasan")]
    if not asan:
        raise RuntimeError(f"cannot find the libasan that _cuda_emu_asan links:\n{ldd.stdout}")
    # libstdc++ must be loaded when ASan starts, or its __cxa_throw interceptor
    # finds no real function and C++ exceptions abort the process.
    stdcxx = [path for name, path in libraries.items() if name.startswith("libstdc++")]
    env["LD_PRELOAD"] = " ".join(asan + stdcxx)
    # allocator_may_return_null: an allocation too large to make fails as it
    # does without ASan (torch raises), instead of aborting the process; the
    # tests probe limits with such allocations.
    env["ASAN_OPTIONS"] = "detect_leaks=0:alloc_dealloc_mismatch=0:detect_odr_violation=0:allocator_may_return_null=1"
    env["SSL_OPS_EMU_MODULE"] = "_cuda_emu_asan"
    return env


def _main(argv):
    usage = "usage: python -m ssl_ops.emulation asan COMMAND [ARGS...]"
    if len(argv) < 2 or argv[0] != "asan":
        raise SystemExit(usage + "\n  runs COMMAND with the emulated kernels under AddressSanitizer")
    env = asan_environment()
    os.execvpe(argv[1], argv[1:], env)


if __name__ == "__main__":
    import sys

    _main(sys.argv[1:])
