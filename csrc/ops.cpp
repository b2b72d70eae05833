// Defines the ssl_ops operator library; kernels register themselves per backend
// from csrc/cpu and csrc/cuda.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <vector>

#include "schemas.h"

TORCH_LIBRARY(ssl_ops, m) { SSL_OPS_DEFINE_SCHEMAS(m) }

namespace {

// In-place ops must bump the version counter of what they write, so autograd
// notices a tensor saved for backward that was modified afterwards. One boxed
// kernel serves every mutating op: it reads the (a!) arguments off the schema.
void bump_versions_of_mutated_args(
    const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  const auto& arguments = op.schema().arguments();
  const size_t first = stack->size() - arguments.size();
  std::vector<at::Tensor> mutated;
  for (size_t i = 0; i < arguments.size(); ++i) {
    const auto* alias = arguments[i].alias_info();
    if (alias == nullptr || !alias->isWrite()) continue;
    const c10::IValue& value = (*stack)[first + i];
    if (value.isTensor()) {
      mutated.push_back(value.toTensor());
    } else if (value.isTensorList()) {
      for (const at::Tensor& t : value.toTensorList()) mutated.push_back(t);
    }
  }
  op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
  for (const at::Tensor& t : mutated) t.unsafeGetTensorImpl()->bump_version();
}

}  // namespace

TORCH_LIBRARY_IMPL(ssl_ops, ADInplaceOrView, m) {
  m.impl("ema_update_", torch::CppFunction::makeFromBoxedFunction<&bump_versions_of_mutated_args>());
  m.impl(
      "_ema_update_chunked_",
      torch::CppFunction::makeFromBoxedFunction<&bump_versions_of_mutated_args>());
}
