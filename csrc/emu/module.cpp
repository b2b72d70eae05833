// The test-only Python module ssl_ops._cuda_emu (or _cuda_emu_asan): the
// csrc/cuda kernels compiled for the host, registered as the ssl_ops_emu
// operator library for CPU tensors, plus controls of the emulator.
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include "../schemas.h"
#include "cuda_emu.h"

TORCH_LIBRARY(ssl_ops_emu, m) {
  SSL_OPS_DEFINE_SCHEMAS(m)
  // Test-only kernels with planted bugs (planted_bugs.cpp).
  m.def("_planted_block_sum(Tensor x, bool with_barriers) -> Tensor");
  m.def("_planted_out_of_bounds_write(Tensor(a!) out) -> ()");
  m.def("_planted_divergent_barrier(Tensor(a!) out) -> ()");
  // Test-only kernels that exercise the emulation layer (layer_tests.cpp).
  m.def("_test_warp_ops(Tensor x) -> Tensor");
  m.def("_test_partial_warp(Tensor x) -> Tensor");
  m.def("_test_launch_config(Tensor anchor, int threads, int blocks) -> ()");
  m.def("_test_smem_launch(Tensor anchor, int bytes, bool opt_in) -> ()");
  m.def("_test_checked_grid(Tensor anchor, int x, int y, int z) -> ()");
  m.def("_test_store16(Tensor(a!) out, int offset) -> ()");
  m.def("_test_wmma(Tensor a, Tensor b) -> Tensor");
  m.def("_test_tensor_core_ptx(Tensor a, Tensor b, int fault) -> Tensor[]");
}

PYBIND11_MODULE(SSL_EMU_MODULE_NAME, m) {
  m.doc() = "ssl_ops CUDA kernels running on the host emulator (tests only)";
  m.def("set_schedule_seed", &ssl_emu::set_schedule_seed, pybind11::arg("seed"),
        "Order in which the threads of a block run between synchronisation points, and the "
        "order of blocks: 0 runs them in index order, any other seed in a random order.");
  m.def("launch_count", &ssl_emu::launch_count, "Kernel launches made so far in this process.");
  m.def("set_compute_capability", &ssl_emu::set_compute_capability, pybind11::arg("capability"),
        "The GPU generation the emulated host code sees (major * 10 + minor, e.g. 75 for a T4; "
        "default 90): it picks each kernel's path from it.");
  m.def("compute_capability", &ssl_emu::compute_capability);
  m.def("set_driver_version", &ssl_emu::set_driver_version, pybind11::arg("version"),
        "The CUDA version of the driver the emulated host code sees (e.g. 12000 for r525; "
        "default 12000): from 12010 launches take 32764 bytes of parameters, not 4096.");
  m.def("driver_version", &ssl_emu::driver_version);
  m.def("mma_count", &ssl_emu::mma_count, "wmma::mma_sync calls made so far in this process.");
  m.def("half_gemm_count", &ssl_emu::half_gemm_count,
        "Vendor GEMMs (csrc/cuda/gemm_acc.h) called with fp16/bf16 operands so far in this process.");
  m.def("set_block_tail", &ssl_emu::set_block_tail, pybind11::arg("count"),
        "Run only the last `count` blocks of each launch from now on (0: all).");
  m.def("set_planted_bug", &ssl_emu::set_planted_bug, pybind11::arg("bug"),
        "Plants a numeric bug in the emulated kernels (0: none; 1: the symmetric gradient "
        "without its G^T term; 2: InfoNCE's positive one key too far; 3: a wrong lane in an "
        "A fragment; 4: cp.async waits that do not wait; 5: the swizzle off by one), for the "
        "tests that prove the kernel tests catch it.");
}
