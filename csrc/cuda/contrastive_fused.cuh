#pragma once
// The fused route of the contrastive losses (Note [Contrastive routes],
// contrastive_passes.cu), host code: the statistics pass
// (contrastive_fused_stats.cuh) and the gradient passes
// (contrastive_fused_grad.cuh) over tensor-core tiles that never store S; the
// statistics partials merge as on the GEMM route (merge_row_stats).
// contrastive_fused_{bf16,fp16,tf32}.cu instantiate fused_passes, one element
// type each: three translation units of 14-18 kernels that compile side by
// side (one held all 42: 90-120 s of nvcc on one core).
//
// Note [Fused route counts] (ptxas and SASS of nvcc 13.0 for sm_90; estimates
// below are estimates, not measurements: no GPU has run these kernels yet).
// - Per CTA: 4 warps, 64 rows; each warp owns 16 rows and, per 64-column tile,
//   16 x 64 logits: 2 x 16 x 64 x D FLOPs of S (HMMA m16n8k16: D / 2 of them)
//   and, in the gradient passes, as many again for G V; 1024 ex2 per anchor
//   term; the tile's bytes, 64 D x 2 (bf16), come from L2 once per CTA.
// - Shared memory: 3 tiles of 64 x D_pad x 2 bytes (8, 16, 32 KB at D <= 64,
//   128, 256; TF32 16, 32 KB at D <= 64, 128) + 1 KB of labels (+ 2 KB of
//   anchor records in kColumns and kBoth).
// - Registers (no spills, no stack anywhere) and CTAs per SM, the smaller of
//   the register and shared-memory limits:
//     statistics        bf16/fp16 124 / 128 / 130 (D <= 64 / 128 / 256): 4, 4, 2
//                       TF32 218 / 255 (D <= 64 / 128): 2, 2
//     + query gradient  bf16/fp16 165 / 200 / 255: 3, 2, 2; TF32 252 / 255: 2, 1
//     gradient kBoth    bf16/fp16 140 / 185 / 255: 3, 2, 2; kRows 154 / 170 / 251;
//                       kColumns 134 / 174 / 246; TF32 kBoth 199 / 195: 2, 2
// - SASS per warp and plain tile (Note [Fused plain tiles]), bf16, D = 128:
//   statistics 448 instructions (64 HMMA, 40 LDSM, 32 MUFU); + query gradient
//   604 (128 HMMA); kBoth 727 (128 HMMA, 64 MUFU); D = 256: statistics 603,
//   kBoth 980 (256 HMMA). TF32, D = 128: statistics 1247, kBoth 2419 (its
//   operand conversions and P V's 32-bit loads: issue-bound).
// - Model (estimate): a scheduler issues one instruction a cycle and, for
//   mma.sync at about 2/3 of the tensor cores' dense rate (2730 FLOP per cycle
//   and SM, shared/fused-kernel-facts.md section 6), one HMMA.16816 in 6
//   cycles; a plain warp-tile costs max(instructions, 6 HMMA): statistics
//   448, kBoth 768 cycles at D = 128. Over 132 SMs x 4 schedulers at 1.83 GHz,
//   bf16, D = 128, forward + backward, kernels only:
//     NT-Xent 2N = 8192    0.030 + 0.052 = 0.08 ms  (target 0.2)
//     NT-Xent 2N = 16384   0.12 + 0.21 = 0.33 ms    (target 0.6)
//     NT-Xent 2N = 65536   1.9 + 3.3 = 5.3 ms       (target 8)
//     MoCo 256 x 65536     0.013 ms + 17 MB of split partials (target 0.1)
//   at the model's 625 TFLOP/s; FlashAttention-2 reaches 335-370 on an H100
//   with mma.sync, so expect up to 1.9x these, and about a dozen launches
//   (NT-Xent: 13, MoCo: 12 in a training step) on top. If 2N = 65536 misses 8
//   ms, computing one triangle of S (4 n^2 D FLOPs instead of 6) is next.
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "contrastive_fused_grad.cuh"
#include "contrastive_fused_stats.cuh"
#include "contrastive_gemm_rows.cuh"  // kGScale
#include "contrastive_passes.h"
#include "launch_limits.h"

namespace ssl_ops::cuda {
namespace {

inline int64_t ceil_div64(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The element type the kernels read: bf16 and fp16 as they are, fp32 as TF32 (Note [Fused TF32]).
template <typename T>
using DeviceElement = std::conditional_t<std::is_same_v<T, c10::Half>, __half,
                                         std::conditional_t<std::is_same_v<T, float>, float, __nv_bfloat16>>;

// Calls f(std::integral_constant<int, kChunks>) with the 16-byte chunks per
// shared-memory row that hold d features of Dev: 8, 16 or 32 for bf16/fp16
// (D <= 64, 128, 256), 16 or 32 for fp32 (D <= 64, 128).
template <typename Dev, typename F>
void with_row_chunks(int64_t d, F&& f) {
  const int64_t chunks = ceil_div64(d * int64_t(sizeof(Dev)), 16);
  if constexpr (std::is_same_v<Dev, float>) {
    chunks <= 16 ? f(std::integral_constant<int, 16>{}) : f(std::integral_constant<int, 32>{});
  } else if (chunks <= 8) {
    f(std::integral_constant<int, 8>{});
  } else {
    chunks <= 16 ? f(std::integral_constant<int, 16>{}) : f(std::integral_constant<int, 32>{});
  }
}

// Note [Fused query gradient] (contrastive_fused_stats.cuh): InfoNCE with a
// query gradient, one positive per row (key r + offset, or MoCo's positive key
// outside the columns), takes d query from the statistics pass itself.
template <typename T>
bool fused_query_grad_in_stats(const ContrastiveSpec<T>& spec) {
  return spec.grad_q && !spec.given_lse.defined() && spec.labels == nullptr && !spec.exclude_self &&
      !spec.exclude_positives && !spec.positives_lse;
}

// Column splits of a fused pass: two waves of the CTAs the multiprocessors
// hold (max_ctas_per_multiprocessor), splits of whole column tiles.
struct FusedSplits {
  int64_t tiles_per_split, splits;
};
FusedSplits fused_splits(int64_t rows, int64_t cols, int ctas_per_sm, c10::Device device) {
  const int64_t row_blocks = ceil_div64(rows, kFusedRows);
  const int64_t col_tiles = std::max<int64_t>(ceil_div64(cols, kFusedCols), 1);
  const int64_t wanted = 2 * ctas_per_sm * int64_t(multiprocessor_count(device));
  const int64_t per_split = ceil_div64(col_tiles, std::clamp<int64_t>(ceil_div64(wanted, row_blocks), 1, col_tiles));
  return {per_split, ceil_div64(col_tiles, per_split)};
}

// The fused statistics pass over all anchors; returns the column splits of the
// partials it wrote into parts ([3 or 5][splits][na]) and part_count.
template <typename T>
int64_t fused_stats(const ContrastiveSpec<T>& spec, c10::Device device, cudaStream_t stream, at::Tensor& parts,
                    at::Tensor& part_count, at::Tensor* part_grad = nullptr) {
  using Dev = DeviceElement<T>;
  const int64_t na = spec.q_hat.size(0), n = spec.k_hat.size(0), d = spec.q_hat.size(1);
  const auto acc_opts = spec.q_hat.options().dtype(at::kFloat);
  FusedStatsParams<Dev> p{};
  p.q = reinterpret_cast<const Dev*>(spec.q_hat.const_data_ptr());
  p.k = reinterpret_cast<const Dev*>(spec.k_hat.const_data_ptr());
  p.rows = na;
  p.cols = n;
  p.d = d;
  p.first_row = spec.first_row;
  p.scale = static_cast<float>(spec.scale);
  p.labels = spec.labels;
  p.exclude_self = spec.exclude_self;
  p.offset_positive = spec.offset_positive;
  p.exclude_positives = spec.exclude_positives;
  p.positive_offset = spec.positive_offset;
  int64_t splits = 0;
  const auto run = [&](auto chunks, auto query_grad) {
    constexpr int kChunks = decltype(chunks)::value;
    constexpr auto kKernel = fused_row_stats_kernel<Dev, kChunks, decltype(query_grad)::value>;
    constexpr size_t kSmem = fused_stats_smem_bytes<kChunks>();
    const auto split = fused_splits(na, n, max_ctas_per_multiprocessor<kKernel>(kFusedThreads, kSmem), device);
    splits = split.splits;
    p.cols_per_split = split.tiles_per_split * kFusedCols;
    parts = at::empty({spec.positives_lse ? 5 : 3, splits, na}, acc_opts);
    part_count = at::empty({splits, na}, acc_opts.dtype(at::kLong));
    p.part_shift = parts[0].template data_ptr<float>();
    p.part_sum = parts[1].template data_ptr<float>();
    p.part_positive = parts[2].template data_ptr<float>();
    p.part_count = part_count.template data_ptr<int64_t>();
    if (spec.positives_lse) {
      p.part_pos_shift = parts[3].template data_ptr<float>();
      p.part_pos_sum = parts[4].template data_ptr<float>();
    }
    if (part_grad) {
      *part_grad = at::empty({splits, na, d}, acc_opts);
      p.part_grad = part_grad->template data_ptr<float>();
    }
    const dim3 grid = checked_grid("fused_row_stats_kernel (row blocks, splits)", ceil_div64(na, kFusedRows), splits);
    launch_kernel(kKernel, grid, dim3(kFusedThreads), kSmem, stream, p);
  };
  with_row_chunks<Dev>(d, [&](auto chunks) {
    part_grad ? run(chunks, std::true_type{}) : run(chunks, std::false_type{});
  });
  return splits;
}

// Each anchor's gradient statistics from given ones (the backward op), packed
// for the fused gradient pass (FusedAnchorTerms): lse log2(e), kGScale w,
// 1 / |P| (-1: the positives' term is exp(s - lse_pos)), lse_pos log2(e). The
// forward's merge kernel writes the same records itself.
inline at::Tensor fused_anchor_terms(const at::Tensor& lse, const at::Tensor& weight, const at::Tensor& inv_count,
                                     const at::Tensor& lse_positive) {
  constexpr double kLog2e = 1.4426950408889634;
  const at::Tensor inv = lse_positive.defined() ? at::where(inv_count == 0, -1.0, inv_count) : inv_count;
  const at::Tensor pos = lse_positive.defined() ? lse_positive * kLog2e : at::zeros_like(lse);
  // A row without weight gets a finite lse (its lse is -inf without candidates),
  // so that the plain tiles' gw exp2(s - lse) is 0, not 0 * inf.
  const at::Tensor lse_log2 = at::where(weight == 0, 0.0, lse * kLog2e);
  return at::stack({lse_log2, weight * kGScale, inv, pos}, 1).to(at::kFloat).contiguous();
}

// One fused gradient pass (contrastive_fused_grad.cuh): product_scale times
// sum_c G_rc cols_in_c for each row of rows_in (fp32, rows x d), the column
// splits summed in a fixed order.
template <typename T>
at::Tensor fused_grad(FusedGradMode mode, const at::Tensor& rows_in, const at::Tensor& cols_in,
                      const at::Tensor& terms, const at::Tensor& product_scale, const ContrastiveSpec<T>& spec,
                      c10::Device device, cudaStream_t stream) {
  using Dev = DeviceElement<T>;
  const int64_t rows = rows_in.size(0), cols = cols_in.size(0), d = rows_in.size(1);
  const auto acc_opts = rows_in.options().dtype(at::kFloat);
  if (rows == 0) return at::zeros({0, d}, acc_opts);
  FusedGradParams<Dev> p{};
  p.rows_in = reinterpret_cast<const Dev*>(rows_in.const_data_ptr());
  p.cols_in = reinterpret_cast<const Dev*>(cols_in.const_data_ptr());
  p.rows = rows;
  p.cols = cols;
  p.d = d;
  p.first_row = spec.first_row;
  p.scale_log2 = static_cast<float>(spec.scale * 1.4426950408889634);
  p.terms = reinterpret_cast<const FusedAnchorTerms*>(terms.const_data_ptr());
  p.labels = spec.labels;
  p.exclude_self = spec.exclude_self;
  p.offset_positive = spec.offset_positive;
  p.exclude_positives = spec.exclude_positives;
  p.positive_offset = spec.positive_offset;
  at::Tensor out;
  const auto run = [&](auto chunks, auto kind) {
    constexpr int kChunks = decltype(chunks)::value;
    constexpr FusedGradMode kMode = decltype(kind)::value;
    constexpr auto kKernel = fused_grad_kernel<Dev, kChunks, kMode>;
    constexpr size_t kSmem = fused_grad_smem_bytes<kChunks, kMode>();
    const auto split = fused_splits(rows, cols, max_ctas_per_multiprocessor<kKernel>(kFusedThreads, kSmem), device);
    p.cols_per_split = split.tiles_per_split * kFusedCols;
    out = at::empty({split.splits, rows, d}, acc_opts);
    p.out = out.data_ptr<float>();
    const dim3 grid = checked_grid("fused_grad_kernel (row blocks, splits)", ceil_div64(rows, kFusedRows), split.splits);
    launch_kernel(kKernel, grid, dim3(kFusedThreads), kSmem, stream, p);
  };
  with_row_chunks<Dev>(d, [&](auto chunks) {
    using M = FusedGradMode;
    if (mode == M::kRows) run(chunks, std::integral_constant<M, M::kRows>{});
    if (mode == M::kColumns) run(chunks, std::integral_constant<M, M::kColumns>{});
    if (mode == M::kBoth) run(chunks, std::integral_constant<M, M::kBoth>{});
  });
  at::Tensor grad = at::empty({rows, d}, acc_opts);
  const int64_t n = rows * d;
  launch_kernel(fused_sum_splits_kernel<float>,
                checked_grid("fused_sum_splits_kernel (rows x d / 1024)", ceil_div64(n, 4 * kSumSplitsThreads)),
                dim3(kSumSplitsThreads), 0, stream, out.const_data_ptr<float>(), out.size(0), n,
                product_scale.const_data_ptr<float>(), grad.data_ptr<float>());
  return grad;
}

}  // namespace

template <typename T>
void fused_passes(const ContrastiveSpec<T>& spec, const PassWeights& w, ContrastiveResult<T>& out,
                  c10::Device device, cudaStream_t stream) {
  const int64_t na = spec.q_hat.size(0), n = spec.k_hat.size(0);
  const bool stats = !spec.given_lse.defined();
  const bool grad_in_stats = stats && fused_query_grad_in_stats(spec);
  const bool grad_pass = spec.grad_k || (spec.grad_q && !grad_in_stats);
  at::Tensor part_grad, terms;
  if (stats) {
    at::Tensor parts, part_count;
    const int64_t splits = fused_stats(spec, device, stream, parts, part_count, grad_in_stats ? &part_grad : nullptr);
    // The merge writes the gradient pass's records of the anchors in the same pass.
    if (grad_pass) terms = at::empty({na, 4}, spec.q_hat.options().dtype(at::kFloat));
    merge_row_stats(spec, out, w, 0, na, parts, part_count, splits, stream,
                    grad_pass ? terms.data_ptr<float>() : nullptr);
  }
  if (!spec.grad_q && !spec.grad_k) return;
  const at::Tensor& lse = stats ? out.lse : spec.given_lse;
  if (grad_in_stats) {  // Note [Fused query gradient]: the splits summed and finished in one launch
    using Dev = DeviceElement<T>;
    const int64_t d = spec.q_hat.size(1);
    out.grad_q_hat = at::empty({na, d}, lse.options());
    FusedQueryGradParams<Dev> q{};
    q.part_grad = part_grad.const_data_ptr<float>();
    q.splits = part_grad.size(0);
    q.rows = na;
    q.d = d;
    q.lse = lse.const_data_ptr<float>();
    q.weight = w.weight.const_data_ptr<float>();
    q.inv_count = w.inv_count.const_data_ptr<float>();
    q.product_scale = w.product_scale.const_data_ptr<float>();
    q.g_scale = static_cast<float>(kGScale);
    q.shift = static_cast<float>(std::abs(spec.scale));
    q.keys = spec.offset_positive ? reinterpret_cast<const Dev*>(spec.k_hat.const_data_ptr()) : nullptr;
    q.positive0 = spec.first_row + spec.positive_offset;
    q.cols = n;
    q.out = out.grad_q_hat.template data_ptr<float>();
    launch_kernel(fused_query_grad_kernel<Dev>,
                  checked_grid("fused_query_grad_kernel (rows x d / 1024)", ceil_div64(na * d, 4 * kQueryGradThreads)),
                  dim3(kQueryGradThreads), 0, stream, q);
  }
  if (!grad_pass) return;
  if (!stats) terms = fused_anchor_terms(lse, w.weight, w.inv_count, spec.given_lse_positive);
  // Q = K (the symmetric op over all its rows): d z_hat = (G + G^T) z_hat in one pass.
  if (spec.grad_q && spec.grad_k && na == n && spec.first_row == 0 &&
      spec.q_hat.const_data_ptr() == spec.k_hat.const_data_ptr()) {
    out.grad_k_hat = fused_grad(FusedGradMode::kBoth, spec.q_hat, spec.k_hat, terms, w.product_scale, spec, device,
                                stream);
    out.grad_k_includes_q = true;
    return;
  }
  if (spec.grad_q && !grad_in_stats) {
    out.grad_q_hat = fused_grad(FusedGradMode::kRows, spec.q_hat, spec.k_hat, terms, w.product_scale, spec, device,
                                stream);
  }
  if (spec.grad_k) {
    out.grad_k_hat = fused_grad(FusedGradMode::kColumns, spec.k_hat, spec.q_hat, terms, w.product_scale, spec,
                                device, stream);
  }
}

}  // namespace ssl_ops::cuda
