#pragma once
// Row kernels of the normalisation, one warp per row (the contrastive losses
// and the cosine ops):
//   row_denom_kernel:  denom_r = max(||x_r||, eps) (1 without normalisation), and
//                      optionally x_hat_r = x_r / denom_r in x's dtype
//   row_dot_kernel:    out_r = scale * (a_r . b_r) / (denom_a_r * denom_b_r)
//   finish_rows_kernel: the gradient through the normalisation,
//     g = s (grad_hat_r + coef_r * other_r / other_denom_r)   (each part optional)
//     dx = (g - xh (xh . g)) / ||x||   where ||x|| >= eps,   g / eps below
//   written in x's dtype (float16 saturated at its largest finite value).
// Resources (ptxas -v, sm_90, nvcc 13.0; 256 threads): 29-31 registers
// (row_denom), 38-39 (finish_rows; 48 double); no shared memory, no spills.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/ones.h>

#include <cstdint>
#include <type_traits>

#include "compat.cuh"
#include "acc_type.cuh"
#include "launch_limits.h"

namespace ssl_ops::cuda {

constexpr int kRowsPerBlock = 8;  // warps of 32 threads
constexpr int kRowThreads = kRowsPerBlock * 32;

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

template <typename T>
struct RowDenomParams {
  const T* x;
  int64_t rows, features;
  acc_t<T> eps;
  bool normalize;
  acc_t<T>* denom;
  T* x_hat;  // x / denom rounded to T, or null: not written
};

template <typename T>
__global__ void __launch_bounds__(kRowThreads) row_denom_kernel(RowDenomParams<T> p) {
  using A = acc_t<T>;
  const int64_t r = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (r >= p.rows) return;  // whole warps leave together
  A sum = 0;
  for (int64_t k = lane; k < p.features; k += 32) {
    const A v = static_cast<A>(p.x[r * p.features + k]);
    sum += v * v;
  }
  sum = warp_sum(sum);  // in every lane
  const A norm = sqrt(sum);
  const A denom = p.normalize ? (norm > p.eps ? norm : p.eps) : A(1);
  if (lane == 0) p.denom[r] = denom;
  if (p.x_hat == nullptr) return;
  // The row again, from cache: the normalised rows the products multiply.
  for (int64_t k = lane; k < p.features; k += 32) {
    p.x_hat[r * p.features + k] = static_cast<T>(static_cast<A>(p.x[r * p.features + k]) / denom);
  }
}

template <typename T>
struct RowDotParams {
  const T* a;
  const T* b;
  const acc_t<T>* denom_a;
  const acc_t<T>* denom_b;
  int64_t rows, features;
  acc_t<T> scale;
  acc_t<T>* out;
};

template <typename T>
__global__ void __launch_bounds__(kRowThreads) row_dot_kernel(RowDotParams<T> p) {
  using A = acc_t<T>;
  const int64_t r = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (r >= p.rows) return;
  A sum = 0;
  for (int64_t k = lane; k < p.features; k += 32) {
    sum += static_cast<A>(p.a[r * p.features + k]) * static_cast<A>(p.b[r * p.features + k]);
  }
  sum = warp_sum(sum);
  if (lane == 0) p.out[r] = p.scale * sum / (p.denom_a[r] * p.denom_b[r]);
}

template <typename T>
struct FinishParams {
  const T* x;
  const acc_t<T>* denom;
  const acc_t<T>* grad_hat;     // rows x features, or null (zero)
  const acc_t<T>* coef;         // per row, or null
  const T* other;               // rows x features, with coef
  const acc_t<T>* other_denom;  // with coef
  int64_t rows, features;
  acc_t<T> eps;
  bool normalize;
  T* out;
  const acc_t<T>* scale;        // a 0-dim factor of the whole d(normalised rows), or null (1)
};

template <typename T>
__device__ __forceinline__ acc_t<T> finish_input(const FinishParams<T>& p, int64_t r, int64_t k) {
  using A = acc_t<T>;
  A g = p.grad_hat ? p.grad_hat[r * p.features + k] : A(0);
  if (p.coef) g += p.coef[r] * static_cast<A>(p.other[r * p.features + k]) / p.other_denom[r];
  return p.scale ? g * *p.scale : g;
}

template <typename T>
__device__ __forceinline__ T to_output(acc_t<T> v) {
  if constexpr (std::is_same_v<T, c10::Half>) {
    v = v > acc_t<T>(65504) ? acc_t<T>(65504) : (v < acc_t<T>(-65504) ? acc_t<T>(-65504) : v);
  }
  return static_cast<T>(v);
}

template <typename T>
__global__ void __launch_bounds__(kRowThreads) finish_rows_kernel(FinishParams<T> p) {
  using A = acc_t<T>;
  const int64_t r = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (r >= p.rows) return;
  const A denom = p.denom[r];
  A radial = 0, norm_sq = 0;
  if (p.normalize) {
    for (int64_t k = lane; k < p.features; k += 32) {
      const A v = static_cast<A>(p.x[r * p.features + k]);
      radial += v * finish_input(p, r, k);
      norm_sq += v * v;
    }
    radial = warp_sum(radial) / denom;  // xh . g
    norm_sq = warp_sum(norm_sq);
  }
  // Below eps the denominator is the constant eps: no radial part.
  const bool tangential = p.normalize && sqrt(norm_sq) >= p.eps;
  for (int64_t k = lane; k < p.features; k += 32) {
    A g = finish_input(p, r, k);
    if (tangential) g -= static_cast<A>(p.x[r * p.features + k]) / denom * radial;
    p.out[r * p.features + k] = to_output<T>(p.normalize ? g / denom : g);
  }
}

// ---- Host launchers ----------------------------------------------------------------

inline dim3 row_grid(int64_t rows) {
  return checked_grid("a row kernel (8 rows per block)", (rows + kRowsPerBlock - 1) / kRowsPerBlock);
}

// max(||x_r||, eps) per row (1 without normalisation), in the accumulation type.
template <typename T>
at::Tensor row_denoms(const at::Tensor& x, double eps, bool normalize, cudaStream_t stream) {
  using A = acc_t<T>;
  const auto options = x.options().dtype(c10::CppTypeToScalarType<A>::value);
  // Without normalisation nothing needs reading (x may be any layout then).
  if (!normalize) return at::ones({x.size(0)}, options);
  at::Tensor denom = at::empty({x.size(0)}, options);
  if (x.size(0) == 0) return denom;
  RowDenomParams<T> p{x.const_data_ptr<T>(), x.size(0), x.size(1), static_cast<A>(eps), normalize,
                      denom.data_ptr<A>(), nullptr};
  launch_kernel(row_denom_kernel<T>, row_grid(x.size(0)), dim3(kRowThreads), 0, stream, p);
  return denom;
}

// The rows the products multiply, x / denom in x's dtype (x itself without
// normalisation), and denom: one launch where the norms alone took one and the
// division three (widen, divide, round).
struct NormalizedRows {
  at::Tensor denom, rows;
};
template <typename T>
NormalizedRows normalized_rows(const at::Tensor& x, double eps, bool normalize, cudaStream_t stream) {
  using A = acc_t<T>;
  if (!normalize || x.size(0) == 0) return {row_denoms<T>(x, eps, normalize, stream), x};
  NormalizedRows out{at::empty({x.size(0)}, x.options().dtype(c10::CppTypeToScalarType<A>::value)),
                        at::empty(x.sizes(), x.options())};
  RowDenomParams<T> p{x.const_data_ptr<T>(), x.size(0), x.size(1), static_cast<A>(eps), normalize,
                      out.denom.template data_ptr<A>(), out.rows.template data_ptr<T>()};
  launch_kernel(row_denom_kernel<T>, row_grid(x.size(0)), dim3(kRowThreads), 0, stream, p);
  return out;
}

// The gradient through the normalisation of x for d(normalised rows) =
// scale (grad_hat + coef_r * other_r / other_denom_r) (null pointers: absent
// parts; scale a 0-dim tensor, 1 when absent).
template <typename T>
at::Tensor finish_rows(const at::Tensor& x, const at::Tensor& denom, const at::Tensor* grad_hat,
                       const at::Tensor* coef, const at::Tensor* other, const at::Tensor* other_denom,
                       double eps, bool normalize, cudaStream_t stream, const at::Tensor* scale = nullptr) {
  using A = acc_t<T>;
  at::Tensor out = at::empty(x.sizes(), x.options());  // row-major, whatever x's layout
  if (x.size(0) == 0) return out;
  FinishParams<T> p{x.const_data_ptr<T>(), denom.const_data_ptr<A>(),
                    grad_hat ? grad_hat->const_data_ptr<A>() : nullptr, coef ? coef->const_data_ptr<A>() : nullptr,
                    other ? other->const_data_ptr<T>() : nullptr,
                    other_denom ? other_denom->const_data_ptr<A>() : nullptr, x.size(0), x.size(1),
                    static_cast<A>(eps), normalize, out.data_ptr<T>(), scale ? scale->const_data_ptr<A>() : nullptr};
  launch_kernel(finish_rows_kernel<T>, row_grid(x.size(0)), dim3(kRowThreads), 0, stream, p);
  return out;
}

}  // namespace ssl_ops::cuda
