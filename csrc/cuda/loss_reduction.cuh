#pragma once
// The reduction argument of the contrastive ops on CUDA.
//
// The forward's reduced loss in one launch (instead of about ten small ATen
// ops): one block sums the rows' losses in double, as on the CPU
// (Note [Loss rounding], csrc/cpu/contrastive_sym.cpp), and counts the rows
// that count (the symmetric op: rows with positives; InfoNCE: every row), then
// writes
//   loss        = sum_r loss_r (/ max(count, 1) for the mean)
//   row_factor  = 1 / max(count, 1) (mean) or 1 (sum): what each counted
//                 row's gradient is multiplied by (finish_rows' scale).
// Deterministic: a fixed order of sums, no atomics.
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/clamp_min.h>
#include <ATen/ops/empty.h>

#include <cstdint>

#include "../contrastive_check.h"
#include "acc_type.cuh"
#include "block_reduce.cuh"
#include "compat.cuh"

namespace ssl_ops::cuda {

template <typename A>
struct LossReductionParams {
  const A* row_loss;       // rows
  const A* subtract;       // loss_r = row_loss_r - subtract_r (InfoNCE: lse - positive logit), or null
  const int64_t* counts;   // a row counts where counts_r > 0 (the symmetric op's positives); null: every row
  int64_t rows;
  bool mean;
  A* loss;                 // 0-dim
  A* row_factor;           // 0-dim
};

template <typename A>
__global__ void __launch_bounds__(kBlockReduceThreads) loss_reduction_kernel(LossReductionParams<A> p) {
  __shared__ double smem[kBlockReduceThreads / 32];
  double total = 0, counted = 0;
  for (int64_t r = threadIdx.x; r < p.rows; r += kBlockReduceThreads) {
    total += static_cast<double>(p.subtract ? p.row_loss[r] - p.subtract[r] : p.row_loss[r]);
    counted += !p.counts || p.counts[r] > 0 ? 1.0 : 0.0;
  }
  total = block_reduce(total, smem, false);
  counted = block_reduce(counted, smem, false);
  if (threadIdx.x == 0) {
    const double denominator = p.mean && counted > 1.0 ? counted : 1.0;
    *p.loss = static_cast<A>(total / denominator);
    *p.row_factor = static_cast<A>(1.0 / denominator);
  }
}

struct ReducedLoss {
  at::Tensor loss, row_factor;  // 0-dim, the accumulation type
};

// row_loss (- subtract) reduced as the mean over counted rows (mean) or the sum.
template <typename A>
ReducedLoss reduced_loss(const at::Tensor& row_loss, const at::Tensor* subtract, const at::Tensor* counts, bool mean,
                         cudaStream_t stream) {
  ReducedLoss out{at::empty({}, row_loss.options()), at::empty({}, row_loss.options())};
  const LossReductionParams<A> p{row_loss.const_data_ptr<A>(), subtract ? subtract->const_data_ptr<A>() : nullptr,
                                 counts ? counts->const_data_ptr<int64_t>() : nullptr, row_loss.size(0), mean,
                                 out.loss.data_ptr<A>(), out.row_factor.data_ptr<A>()};
  launch_kernel(loss_reduction_kernel<A>, dim3(1), dim3(kBlockReduceThreads), 0, stream, p);
  return out;
}

// The backward ops' row weights w_r of the reduced loss for grad_loss g, as
// small ATen ops on the device (nothing waits for the GPU): none g_r, mean
// g / n, sum g; `valid` masks rows that count.
inline at::Tensor row_weights(const at::Tensor& grad_loss, Reduction reduction, const at::Tensor& valid,
                              at::ScalarType acc) {
  const at::Tensor g = grad_loss.to(acc);
  const at::Tensor mask = valid.to(acc);
  if (reduction == Reduction::Mean) return g / at::clamp_min(mask.sum(), 1) * mask;
  return g * mask;
}

}  // namespace ssl_ops::cuda
