// Row-wise cosine similarity (BYOL loss, negative cosine similarity), CUDA kernels.
// The math is csrc/cpu/cosine.cpp's. One warp per row: the forward reads each
// row pair once; the backward reads it twice from cache (sums, then both
// gradients) and writes both gradients in the same pass.
//
// Resources (ptxas -v, sm_90, nvcc 13.0; 256 threads): forward 32 registers,
// backward 38-40 (54 for double); no shared memory, no spills.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <array>

#include "../contrastive_check.h"  // loss_dtype
#include "../cosine_check.h"
#include "compat.cuh"
#include "acc_type.cuh"
#include "row_norms.cuh"  // warp_sum, kRowsPerBlock, to_output

namespace ssl_ops::cuda {
namespace {

template <typename T>
struct CosineRowsParams {
  const T* x0;
  const T* x1;
  const acc_t<T>* grad;  // backward: d loss / d cos per row
  int64_t rows, features;
  acc_t<T> eps;
  acc_t<T>* cos;         // forward output
  T* grad0;              // backward outputs, null where not needed
  T* grad1;
};

template <typename A>
struct RowCosine {
  A cos, denom0, denom1, norm0, norm1;
};

// The cosine of row r's pair, its norms and clamped denominators, in every lane of the warp.
template <typename T>
__device__ __forceinline__ RowCosine<acc_t<T>> row_cosine(const CosineRowsParams<T>& p, int64_t r, int lane) {
  using A = acc_t<T>;
  A dot = 0, sq0 = 0, sq1 = 0;
  for (int64_t k = lane; k < p.features; k += 32) {
    const A a = static_cast<A>(p.x0[r * p.features + k]), b = static_cast<A>(p.x1[r * p.features + k]);
    dot += a * b;
    sq0 += a * a;
    sq1 += b * b;
  }
  dot = warp_sum(dot);
  const A n0 = sqrt(warp_sum(sq0)), n1 = sqrt(warp_sum(sq1));
  const A d0 = max(n0, p.eps), d1 = max(n1, p.eps);
  return {dot / (d0 * d1), d0, d1, n0, n1};
}

template <typename T>
__global__ void __launch_bounds__(kRowThreads) cosine_rows_kernel(CosineRowsParams<T> p) {
  const int64_t r = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (r >= p.rows) return;  // whole warps leave together
  const auto rc = row_cosine(p, r, lane);
  if (lane == 0) p.cos[r] = rc.cos;
}

template <typename T>
__global__ void __launch_bounds__(kRowThreads) cosine_rows_backward_kernel(CosineRowsParams<T> p) {
  using A = acc_t<T>;
  const int64_t r = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (r >= p.rows) return;
  const RowCosine<A> rc = row_cosine(p, r, lane);
  const A d0 = rc.denom0, d1 = rc.denom1, cos = rc.cos;
  const A g = p.grad[r];
  const A inv0 = g / d0, inv1 = g / d1;
  const A self0 = rc.norm0 >= p.eps ? cos / d0 : A(0), self1 = rc.norm1 >= p.eps ? cos / d1 : A(0);
  for (int64_t k = lane; k < p.features; k += 32) {
    const A a = static_cast<A>(p.x0[r * p.features + k]), b = static_cast<A>(p.x1[r * p.features + k]);
    if (p.grad0) p.grad0[r * p.features + k] = to_output<T>(inv0 * (b / d1 - self0 * a));
    if (p.grad1) p.grad1[r * p.features + k] = to_output<T>(inv1 * (a / d0 - self1 * b));
  }
}

at::Tensor cosine_rows(const at::Tensor& x0_in, const at::Tensor& x1_in, double eps) {
  check_cosine_rows_args(x0_in, x1_in, eps);
  const DeviceGuard guard(x0_in.device());
  const at::Tensor x0 = x0_in.contiguous(), x1 = x1_in.contiguous();
  at::Tensor out = at::empty({x0.size(0)}, x0.options().dtype(loss_dtype(x0.scalar_type())));
  if (x0.size(0) == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x0.scalar_type(), "cosine_rows", [&] {
    using A = acc_t<scalar_t>;
    CosineRowsParams<scalar_t> p{x0.const_data_ptr<scalar_t>(), x1.const_data_ptr<scalar_t>(), nullptr,
                                 x0.size(0), x0.size(1), static_cast<A>(eps), out.data_ptr<A>(), nullptr, nullptr};
    launch_kernel(cosine_rows_kernel<scalar_t>, row_grid(x0.size(0)), dim3(kRowThreads), 0,
                  current_stream(x0.device()), p);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> cosine_rows_backward(const at::Tensor& grad, const at::Tensor& x0_in,
                                                        const at::Tensor& x1_in, double eps,
                                                        std::array<bool, 2> mask) {
  check_cosine_rows_args(x0_in, x1_in, eps);
  const DeviceGuard guard(x0_in.device());
  const at::Tensor x0 = x0_in.contiguous(), x1 = x1_in.contiguous();
  at::Tensor g0 = mask[0] ? at::empty_like(x0) : at::empty({0}, x0.options());
  at::Tensor g1 = mask[1] ? at::empty_like(x1) : at::empty({0}, x1.options());
  if (x0.size(0) == 0) return {g0, g1};
  const at::Tensor g = grad.to(loss_dtype(x0.scalar_type())).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x0.scalar_type(), "cosine_rows_backward", [&] {
    using A = acc_t<scalar_t>;
    CosineRowsParams<scalar_t> p{x0.const_data_ptr<scalar_t>(), x1.const_data_ptr<scalar_t>(),
                                 g.const_data_ptr<A>(), x0.size(0), x0.size(1), static_cast<A>(eps), nullptr,
                                 mask[0] ? g0.data_ptr<scalar_t>() : nullptr,
                                 mask[1] ? g1.data_ptr<scalar_t>() : nullptr};
    launch_kernel(cosine_rows_backward_kernel<scalar_t>, row_grid(x0.size(0)), dim3(kRowThreads), 0,
                  current_stream(x0.device()), p);
  });
  return {g0, g1};
}

}  // namespace

SSL_OPS_CUDA_LIBRARY_IMPL(m) {
  m.impl("cosine_rows", &cosine_rows);
  m.impl("cosine_rows_backward", &cosine_rows_backward);
}

}  // namespace ssl_ops::cuda
