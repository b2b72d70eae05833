// The Python module ssl_ops._C: importing it registers the operators (static
// initialisers in the kernel files) and exposes build_info().
#include <pybind11/pybind11.h>

#include "cpu/cpu_isa.h"

#if defined(SSL_OPS_WITH_CUDA)
#include <cuda_runtime_api.h>  // CUDART_VERSION
#endif

namespace py = pybind11;

namespace {

py::dict build_info() {
  py::dict info;
#if defined(SSL_OPS_WITH_CUDA)
  info["cuda"] = true;
  info["cuda_version"] = std::to_string(CUDART_VERSION / 1000) + "." +
      std::to_string((CUDART_VERSION % 1000) / 10);
  info["cuda_arch_list"] = SSL_OPS_ARCH_LIST;
#else
  info["cuda"] = false;
  info["cuda_version"] = py::none();
  info["cuda_arch_list"] = "";
#endif
  info["torch_version"] = SSL_OPS_TORCH_VERSION;
  info["cpu_isa"] = ssl_ops::cpu::cpu_kernel_isa();
#if defined(SSL_OPS_DEBUG_BUILD)
  info["debug"] = true;
#else
  info["debug"] = false;
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "ssl_ops compiled kernels; use the ssl_ops package, not this module";
  m.def("build_info", &build_info,
        "How this extension was built: CUDA kernels, CUDA version and arch list, "
        "the torch version built against, and the CPU vector ISA in use.");
}
