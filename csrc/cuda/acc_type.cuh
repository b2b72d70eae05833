#pragma once
// The accumulation type of each input dtype (float for half, bfloat16 and
// float; double for double) and the device math written once for both.
#include <limits>

#include "compat.cuh"

namespace ssl_ops::cuda {

template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccType<T>::type;

template <typename A>
__device__ __forceinline__ A device_exp(A x) {
  return exp(x);
}
template <>
__device__ __forceinline__ float device_exp<float>(float x) {
  return expf(x);
}

template <typename A>
__device__ __forceinline__ A negative_infinity() {
  return -std::numeric_limits<A>::infinity();
}

}  // namespace ssl_ops::cuda
