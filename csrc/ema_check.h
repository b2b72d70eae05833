#pragma once
// Argument validation and operand preparation shared by the CPU and CUDA EMA
// kernels: every pair is checked before any tensor is touched.
#include <ATen/core/Tensor.h>

#include <vector>

namespace ssl_ops {

// Throws (naming the argument and the value) unless ema/online are equally long
// lists of pairwise same-shaped tensors on one device of `device_type`, ema
// floating-point, dtypes compatible, no aliasing, and 0 <= momentum <= 1.
void check_ema_args(
    at::TensorList ema, at::TensorList online, double momentum, c10::DeviceType device_type);
// The same checks in parts: the momentum's range, and everything else.
void check_momentum_value(double momentum);
void check_ema_tensors(at::TensorList ema, at::TensorList online, c10::DeviceType device_type);

// A tensor momentum (read by the kernels, Note [EMA tensor momentum]): one
// float32 or float64 element on the EMA tensors' device. Its value is not
// read here.
void check_momentum_tensor(const at::Tensor& momentum, at::TensorList ema);

// Flat views the kernels can walk as one span per tensor: each ema entry dense
// (non-overlapping, any stride order) and each online entry with the same
// strides. Inputs that are not get a dense stand-in, written back by finish().
struct EmaOperands {
  std::vector<at::Tensor> ema;
  std::vector<at::Tensor> online;
  void finish();

 private:
  friend EmaOperands prepare_ema_operands(at::TensorList, at::TensorList);
  std::vector<std::pair<at::Tensor, at::Tensor>> write_back_;  // (stand-in, original)
};
EmaOperands prepare_ema_operands(at::TensorList ema, at::TensorList online);

// The update is computed as fma(momentum, ema, weight * online) in this type
// with weight = 1 - momentum rounded once from double, on every backend.
template <typename EmaT>
using ema_compute_t = std::conditional_t<std::is_same_v<EmaT, double>, double, float>;

}  // namespace ssl_ops
