#pragma once
// The GEMM route of the contrastive losses on CUDA (Note [Contrastive routes]
// in contrastive.cu): anchor rows in chunks of c, each chunk's similarities
//   S_c = Q_hat_c K_hat^T            (vendor GEMM, fp32 output: logits never rounded to 16 bits)
// read by the row kernels of contrastive_gemm_rows.cuh (log-sum-exp, positives,
// then the coefficients G_c in the input dtype), and the gradient as two more
// vendor GEMMs per chunk:
//   d Q_hat_c  = G_c K_hat           (fresh rows of the output)
//   d K_hat   += G_c^T Q_hat_c       (accumulated in fp32 over the chunks)
// No buffer is ever n x n: S_c and G_c hold c x n elements, with c chosen so
// that S_c stays within the chunk budget (contrastive_chunk_elements(), contrastive_check.h).
// The symmetric op passes Q_hat = the anchor rows of z_hat and K_hat = z_hat
// (d z_hat = d K_hat plus d Q_hat at the anchors: (G + G^T) z_hat); the
// asymmetric op passes the queries and the keys (or queue).
//
// The algorithm and how the CPU kernels differ: Note [Contrastive algorithm]
// in csrc/contrastive_check.h.
//
// Under the emulator (SSL_OPS_CUDA_EMU) the GEMMs are at::mm on the CPU with
// the same operand types: half operands widened exactly to fp32, fp32
// operands truncated to TF32 where torch allows TF32 for matmuls.
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/exp.h>
#include <ATen/ops/index_select.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros_like.h>
#include <ATen/ops/bitwise_and.h>
#include <ATen/ops/clamp_min.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>

#include "compat.cuh"
#include "../contrastive_check.h"
#include "../message.h"
#include "contrastive_fused_grad.cuh"
#include "contrastive_fused_stats.cuh"
#include "contrastive_gemm_rows.cuh"
#include "gemm_acc.h"
#include "launch_limits.h"
#include "tensor_core_arch.h"

namespace ssl_ops::cuda {

enum class ContrastiveRoute { kFused, kGemm };

// SSL_OPS_CUDA_CONTRASTIVE_ROUTE: "fused" (default: the fused kernels where
// fused_route_fits allows, the GEMM route elsewhere) or "gemm" (the GEMM route
// everywhere). Read on every call, so tests and benchmarks can check and time both.
inline ContrastiveRoute contrastive_route() {
  const char* value = std::getenv("SSL_OPS_CUDA_CONTRASTIVE_ROUTE");
  if (value == nullptr || *value == '\0' || std::strcmp(value, "fused") == 0) return ContrastiveRoute::kFused;
  TORCH_CHECK(std::strcmp(value, "gemm") == 0,
              ssl_ops::message("SSL_OPS_CUDA_CONTRASTIVE_ROUTE must be \"fused\" or \"gemm\", got \"", value, "\""));
  return ContrastiveRoute::kGemm;
}

// Note [Chunk budget]: S_c holds at most this many elements (fp32: 128 MB by
// default). The first design took 2^23 (32 MB), so that the re-reads of S_c
// (two row kernels, and two GEMMs as G_c) would hit the 50 MB L2 of an H100/H200.
// Measured on an H200 (benchmarks/RESULTS.md, 2026-11-28), 2^25 was faster in
// 17 of 20 shapes and never slower by more than noise: NT-Xent 2N = 65536,
// D = 128, forward+backward 47.4 ms against 74.7 (bf16) and 112.9 against 137.8
// (fp32); MoCo 256 x 65536 level. At 2^23 a 65536-row problem is 512 chunks of
// 128 rows, whose GEMMs (M = 128) run far below the matmul rate and whose ~6
// launches each rival their GPU time; L2 hits do not make up for that. The
// d K_hat GEMM reads and writes the n x D fp32 accumulator once per chunk (8 n D
// bytes for 2 c n D FLOPs), another cost that falls with larger chunks. The GPU
// benchmark times 2^27 too ("big chunks"), to see whether the trend goes on.
// SSL_OPS_CONTRASTIVE_CHUNK_ELEMENTS changes it (tests force it small, for
// many chunks).
constexpr int64_t kDefaultChunkElements = int64_t(1) << 25;


inline int64_t ceil_div64(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---- The chunk loop --------------------------------------------------------------------

template <typename T>
struct GemmLossSpec {
  at::Tensor q_hat, k_hat;      // anchors (na x D) and candidates (n x D), input dtype
  int64_t first_row = 0;        // global index of anchor 0 (labels, self, offset positive)
  const int64_t* labels = nullptr;
  bool exclude_self = false;
  bool offset_positive = false;
  int64_t positive_offset = 0;
  bool rows_need_positives = false;
  bool positives_lse = false;   // symmetric: the positives inside the log (log-sum-exp form)
  bool exclude_positives = false;  // symmetric: the positives are no candidates (excluded form)
  at::Tensor initial_logit;     // MoCo's positive-key logits (na), or undefined
  double scale = 1;
  bool bounded = false;
  // Given statistics (the backward op): lse and the per-row weight (0 for rows
  // that do not count) and 1 / |P(r)| (the merge kernel's inv in the
  // log-sum-exp form, with lse_pos); the stats kernels are skipped.
  at::Tensor given_lse, given_weight, given_inv_count, given_lse_positive;
  // Forward with a gradient: per-row weights, or undefined for 1 where the row counts.
  at::Tensor weight;
  bool grad_q = false, grad_k = false;
};

template <typename T>
struct GemmLossResult {
  at::Tensor lse, positive_sum, positive_count;  // per anchor (statistics pass only)
  at::Tensor lse_positive;                        // log-sum-exp form
  at::Tensor row_loss;                            // rows_need_positives (symmetric)
  at::Tensor grad_q_hat, grad_k_hat;              // accumulation type, G including scale and w
  bool grad_k_includes_q = false;                 // Q = K: grad_k_hat is d z_hat, grad_q_hat unused
};

// The one place the fused route is chosen (Note [Fused statistics pass],
// contrastive_fused_stats.cuh; Note [Fused gradient pass],
// contrastive_fused_grad.cuh): bf16/fp16 unit rows of 8 to 128 features
// (16-byte rows) on sm_80+ take the fused statistics and gradient passes,
// everything else the GEMM route's.
template <typename T>
bool fused_route_fits(const GemmLossSpec<T>& spec, ContrastiveRoute route) {
  if constexpr (!std::is_same_v<T, c10::BFloat16> && !std::is_same_v<T, c10::Half>) {
    return false;
  } else {
    const int64_t d = spec.q_hat.size(1);
    const auto aligned = [](const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0; };
    return route == ContrastiveRoute::kFused && spec.bounded && d % 8 == 0 && d > 0 && d <= 128 &&
        std::min(current_compute_capability(), loaded_code_arch()) >= 80 && spec.q_hat.is_contiguous() &&
        spec.k_hat.is_contiguous() && aligned(spec.q_hat) && aligned(spec.k_hat);
  }
}
// Note [Fused query gradient] (contrastive_fused_stats.cuh): InfoNCE with a
// query gradient, one positive per row (key r + offset, or MoCo's positive key
// outside the columns), takes d query from the statistics pass itself.
template <typename T>
bool fused_query_grad_in_stats(const GemmLossSpec<T>& spec) {
  return spec.grad_q && !spec.given_lse.defined() && spec.labels == nullptr && !spec.exclude_self &&
      !spec.exclude_positives && !spec.positives_lse;
}

// Column splits of a fused pass: two waves of `ctas_per_sm` CTAs per
// multiprocessor, splits of whole column tiles.
struct FusedSplits {
  int64_t tiles_per_split, splits;
};
inline FusedSplits fused_splits(int64_t rows, int64_t cols, int ctas_per_sm, c10::Device device) {
  const int64_t row_blocks = ceil_div64(rows, kFusedRows);
  const int64_t col_tiles = std::max<int64_t>(ceil_div64(cols, kFusedCols), 1);
  const int64_t wanted = 2 * ctas_per_sm * int64_t(multiprocessor_count(device));
  const int64_t per_split = ceil_div64(col_tiles, std::clamp<int64_t>(ceil_div64(wanted, row_blocks), 1, col_tiles));
  return {per_split, ceil_div64(col_tiles, per_split)};
}

// The fused statistics pass over all anchors; returns the column splits of the
// partials it wrote into parts ([3 or 5][splits][na]) and part_count.
template <typename T>
int64_t fused_stats(const GemmLossSpec<T>& spec, c10::Device device, cudaStream_t stream, at::Tensor& parts,
                    at::Tensor& part_count, at::Tensor* part_grad = nullptr) {
  using Dev = std::conditional_t<std::is_same_v<T, c10::Half>, __half, __nv_bfloat16>;
  const int64_t na = spec.q_hat.size(0), n = spec.k_hat.size(0), d = spec.q_hat.size(1);
  const int64_t row_blocks = ceil_div64(na, kFusedRows);
  // 4 CTAs per multiprocessor fit (96 registers); 2 with the query gradient (182).
  const auto [tiles_per_split, splits] = fused_splits(na, n, part_grad ? 2 : 4, device);
  const auto acc_opts = spec.q_hat.options().dtype(at::kFloat);
  parts = at::empty({spec.positives_lse ? 5 : 3, splits, na}, acc_opts);
  part_count = at::empty({splits, na}, acc_opts.dtype(at::kLong));
  FusedStatsParams<Dev> p{};
  p.q = reinterpret_cast<const Dev*>(spec.q_hat.const_data_ptr());
  p.k = reinterpret_cast<const Dev*>(spec.k_hat.const_data_ptr());
  p.rows = na;
  p.cols = n;
  p.d = d;
  p.cols_per_split = tiles_per_split * kFusedCols;
  p.first_row = spec.first_row;
  p.scale = static_cast<float>(spec.scale);
  p.labels = spec.labels;
  p.exclude_self = spec.exclude_self;
  p.offset_positive = spec.offset_positive;
  p.exclude_positives = spec.exclude_positives;
  p.positive_offset = spec.positive_offset;
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
  const dim3 grid = checked_grid("fused_row_stats_kernel (row blocks, splits)", row_blocks, splits);
  const auto run = [&](auto chunks, auto query_grad) {
    constexpr int kChunks = decltype(chunks)::value;
    launch_kernel(fused_row_stats_kernel<Dev, kChunks, decltype(query_grad)::value>, grid, dim3(kFusedThreads),
                  fused_stats_smem_bytes<kChunks>(), stream, p);
  };
  using Small = std::integral_constant<int, 8>;
  using Large = std::integral_constant<int, 16>;
  if (part_grad) {
    d <= 64 ? run(Small{}, std::true_type{}) : run(Large{}, std::true_type{});
  } else {
    d <= 64 ? run(Small{}, std::false_type{}) : run(Large{}, std::false_type{});
  }
  return splits;
}

// Each anchor's gradient statistics, packed for the fused gradient pass
// (FusedAnchorTerms): lse log2(e), kGScale w, 1 / |P| (-1: the positives' term
// is exp(s - lse_pos)), lse_pos log2(e).
inline at::Tensor fused_anchor_terms(const at::Tensor& lse, const at::Tensor& weight, const at::Tensor& inv_count,
                                     const at::Tensor& lse_positive) {
  constexpr double kLog2e = 1.4426950408889634;
  const at::Tensor inv = lse_positive.defined() ? at::where(inv_count == 0, -1.0, inv_count) : inv_count;
  const at::Tensor pos = lse_positive.defined() ? lse_positive * kLog2e : at::zeros_like(lse);
  return at::stack({lse * kLog2e, weight * kGScale, inv, pos}, 1).to(at::kFloat).contiguous();
}

// One fused gradient pass (contrastive_fused_grad.cuh): sum_c G_rc cols_in_c
// for each row of rows_in (fp32, rows x d, before the scale max|w| / kGScale),
// the column splits summed in a fixed order.
template <typename T>
at::Tensor fused_grad(FusedGradMode mode, const at::Tensor& rows_in, const at::Tensor& cols_in,
                      const at::Tensor& terms, const GemmLossSpec<T>& spec, c10::Device device, cudaStream_t stream) {
  using Dev = std::conditional_t<std::is_same_v<T, c10::Half>, __half, __nv_bfloat16>;
  const int64_t rows = rows_in.size(0), cols = cols_in.size(0), d = rows_in.size(1);
  const auto acc_opts = rows_in.options().dtype(at::kFloat);
  if (rows == 0) return at::zeros({0, d}, acc_opts);
  // 3 CTAs per multiprocessor (167 registers, 50 KB: Note [Fused gradient pass]).
  const auto [tiles_per_split, splits] = fused_splits(rows, cols, 3, device);
  at::Tensor out = at::empty({splits, rows, d}, acc_opts);
  FusedGradParams<Dev> p{};
  p.rows_in = reinterpret_cast<const Dev*>(rows_in.const_data_ptr());
  p.cols_in = reinterpret_cast<const Dev*>(cols_in.const_data_ptr());
  p.rows = rows;
  p.cols = cols;
  p.d = d;
  p.cols_per_split = tiles_per_split * kFusedCols;
  p.first_row = spec.first_row;
  p.scale_log2 = static_cast<float>(spec.scale * 1.4426950408889634);
  p.terms = reinterpret_cast<const FusedAnchorTerms*>(terms.const_data_ptr());
  p.labels = spec.labels;
  p.exclude_self = spec.exclude_self;
  p.offset_positive = spec.offset_positive;
  p.exclude_positives = spec.exclude_positives;
  p.positive_offset = spec.positive_offset;
  p.out = out.data_ptr<float>();
  const dim3 grid = checked_grid("fused_grad_kernel (row blocks, splits)", ceil_div64(rows, kFusedRows), splits);
  const auto run = [&](auto chunks, auto kind) {
    constexpr int kChunks = decltype(chunks)::value;
    constexpr FusedGradMode kMode = decltype(kind)::value;
    launch_kernel(fused_grad_kernel<Dev, kChunks, kMode>, grid, dim3(kFusedThreads),
                  fused_grad_smem_bytes<kChunks, kMode>(), stream, p);
  };
  const auto by_mode = [&](auto chunks) {
    using M = FusedGradMode;
    if (mode == M::kRows) run(chunks, std::integral_constant<M, M::kRows>{});
    if (mode == M::kColumns) run(chunks, std::integral_constant<M, M::kColumns>{});
    if (mode == M::kBoth) run(chunks, std::integral_constant<M, M::kBoth>{});
  };
  d <= 64 ? by_mode(std::integral_constant<int, 8>{}) : by_mode(std::integral_constant<int, 16>{});
  return splits == 1 ? out[0] : out.sum(0);
}

template <typename T>
GemmLossResult<T> gemm_contrastive(const GemmLossSpec<T>& spec, c10::Device device, cudaStream_t stream) {
  using A = acc_t<T>;
  constexpr auto acc_type = c10::CppTypeToScalarType<A>::value;
  const int64_t na = spec.q_hat.size(0), n = spec.k_hat.size(0), d = spec.q_hat.size(1);
  const auto acc_opts = spec.q_hat.options().dtype(acc_type);
  const bool stats = !spec.given_lse.defined();
  const bool grad = spec.grad_q || spec.grad_k;
  GemmLossResult<T> out;
  if (stats) {
    out.lse = at::empty({na}, acc_opts);
    out.positive_sum = at::empty({na}, acc_opts);
    out.positive_count = at::empty({na}, acc_opts.dtype(at::kLong));
    if (spec.positives_lse) out.lse_positive = at::empty({na}, acc_opts);
    if (spec.rows_need_positives) out.row_loss = at::empty({na}, acc_opts);
  }
  if (spec.grad_q) out.grad_q_hat = at::empty({na, d}, acc_opts);
  if (spec.grad_k) out.grad_k_hat = at::zeros({n, d}, acc_opts);
  if (na == 0 || (!grad && !stats)) return out;

  // G holds kGScale * w / max|w| (contrastive_gemm_rows.cuh); the fp32 products
  // are multiplied by scale * max|w| / kGScale at the end, on the device.
  at::Tensor weight, inv_count, weight_in, product_scale;
  if (grad) {
    const at::Tensor& w = stats ? spec.weight : spec.given_weight;
    at::Tensor max_weight = at::ones({}, acc_opts);
    if (w.defined()) {
      max_weight = at::clamp_min(w.abs().max(), std::numeric_limits<A>::min());
      weight_in = (w / max_weight).contiguous();
    }
    product_scale = max_weight * (spec.scale / kGScale);
    weight = stats ? at::empty({na}, acc_opts) : weight_in;
    inv_count = stats ? at::empty({na}, acc_opts) : spec.given_inv_count;
  }
  // Merges the statistics partials ([split][row], rows r0 .. r0 + c) of either pass.
  const auto merge_rows = [&](int64_t r0, int64_t c, const at::Tensor& part_values, const at::Tensor& part_counts,
                              int64_t part_splits) {
    GemmMergeParams<A> m{};
    m.part_shift = part_values[0].template const_data_ptr<A>();
    m.part_sum = part_values[1].template const_data_ptr<A>();
    m.part_positive = part_values[2].template const_data_ptr<A>();
    m.part_count = part_counts.template const_data_ptr<int64_t>();
    if (spec.positives_lse) {
      m.part_pos_shift = part_values[3].template const_data_ptr<A>();
      m.part_pos_sum = part_values[4].template const_data_ptr<A>();
    }
    m.lse_positive = spec.positives_lse ? out.lse_positive.template data_ptr<A>() + r0 : nullptr;
    m.row_loss = spec.rows_need_positives ? out.row_loss.template data_ptr<A>() + r0 : nullptr;
    m.rows = c;
    m.splits = part_splits;
    m.initial_logit = spec.initial_logit.defined() ? spec.initial_logit.template const_data_ptr<A>() + r0 : nullptr;
    m.weight_in = weight_in.defined() ? weight_in.template const_data_ptr<A>() + r0 : nullptr;
    m.rows_need_positives = spec.rows_need_positives;
    m.exclude_positives = spec.exclude_positives;
    m.lse = out.lse.template data_ptr<A>() + r0;
    m.positive_sum = out.positive_sum.template data_ptr<A>() + r0;
    m.positive_count = out.positive_count.template data_ptr<int64_t>() + r0;
    m.weight = grad ? weight.template data_ptr<A>() + r0 : nullptr;
    m.inv_count = grad ? inv_count.template data_ptr<A>() + r0 : nullptr;
    launch_kernel(gemm_row_merge_kernel<A>,
                  checked_grid("gemm_row_merge_kernel (chunk rows / 256)", ceil_div64(c, kGemmRowThreads)),
                  dim3(kGemmRowThreads), 0, stream, m);
  };
  if (fused_route_fits(spec, contrastive_route())) {
    const bool grad_in_stats = stats && fused_query_grad_in_stats(spec);
    at::Tensor part_grad;
    if (stats) {
      at::Tensor fused_parts, fused_count;
      const int64_t fused_splits =
          fused_stats(spec, device, stream, fused_parts, fused_count, grad_in_stats ? &part_grad : nullptr);
      merge_rows(0, na, fused_parts, fused_count, fused_splits);
    }
    if (!grad) return out;
    const at::Tensor& lse = stats ? out.lse : spec.given_lse;
    if (grad_in_stats) {
      // d q_hat = scale w (sum_c exp(s - shift) k_hat_c exp(shift - lse) - k_hat_positive / |P|),
      // the splits summed in a fixed order (no atomics).
      const double bound = std::abs(spec.scale);
      at::Tensor g = part_grad.sum(0) * (at::exp(bound - lse) / kFusedPScale).unsqueeze(1);
      if (spec.offset_positive) {
        const at::Tensor index = (at::arange(na, lse.options().dtype(at::kLong)) + (spec.first_row + spec.positive_offset))
                                     .clamp(0, std::max<int64_t>(n - 1, 0));
        g -= spec.k_hat.index_select(0, index).to(acc_type) * inv_count.unsqueeze(1);
      }
      out.grad_q_hat = g * (weight * (product_scale * kGScale)).unsqueeze(1);
    }
    const at::Tensor terms =
        fused_anchor_terms(lse, weight, inv_count, stats ? out.lse_positive : spec.given_lse_positive);
    // Q = K (the symmetric op over all its rows): d z_hat = (G + G^T) z_hat in one pass.
    if (spec.grad_q && spec.grad_k && na == n && spec.first_row == 0 &&
        spec.q_hat.const_data_ptr() == spec.k_hat.const_data_ptr()) {
      out.grad_k_hat = fused_grad(FusedGradMode::kBoth, spec.q_hat, spec.k_hat, terms, spec, device, stream) * product_scale;
      out.grad_k_includes_q = true;
      return out;
    }
    if (spec.grad_q && !grad_in_stats) {
      out.grad_q_hat = fused_grad(FusedGradMode::kRows, spec.q_hat, spec.k_hat, terms, spec, device, stream) * product_scale;
    }
    if (spec.grad_k) {
      out.grad_k_hat = fused_grad(FusedGradMode::kColumns, spec.k_hat, spec.q_hat, terms, spec, device, stream) * product_scale;
    }
    return out;
  }

  const int64_t rows_per_chunk =
      std::clamp<int64_t>(contrastive_chunk_elements(kDefaultChunkElements) / std::max<int64_t>(n, 1), 1, na);
  // Column splits: a full wave of blocks (8 per multiprocessor: the row kernels
  // use at most 52 registers and 128 bytes of shared memory), at least 1024
  // columns each.
  const int64_t wanted_blocks = 8 * int64_t(multiprocessor_count(device));
  const int64_t splits =
      std::clamp<int64_t>(ceil_div64(wanted_blocks, rows_per_chunk), 1, std::max<int64_t>(ceil_div64(n, 1024), 1));
  const int64_t cols_per_split = std::max<int64_t>(ceil_div64(n, splits), 1);
  TORCH_CHECK(splits <= 65535 && rows_per_chunk <= std::numeric_limits<int32_t>::max(),
              ssl_ops::message("contrastive loss on CUDA: a chunk of ", rows_per_chunk, " rows in ", splits,
              " column splits exceeds the grid (lower SSL_OPS_CONTRASTIVE_CHUNK_ELEMENTS)"));

  at::Tensor s_buffer = at::empty({rows_per_chunk, n}, acc_opts);
  at::Tensor g_buffer;
  if (grad) g_buffer = std::is_same_v<T, A> ? s_buffer : at::empty({rows_per_chunk, n}, spec.q_hat.options());
  at::Tensor parts, part_count;  // the stats kernel's partials, [split][row]
  if (stats) {
    parts = at::empty({spec.positives_lse ? 5 : 3, splits, rows_per_chunk}, acc_opts);
    part_count = at::empty({splits, rows_per_chunk}, acc_opts.dtype(at::kLong));
  }
  const at::Tensor k_hat_t = spec.k_hat.t();

  for (int64_t r0 = 0; r0 < na; r0 += rows_per_chunk) {
    const int64_t c = std::min(rows_per_chunk, na - r0);
    at::Tensor s = s_buffer.narrow(0, 0, c);
    const at::Tensor q_chunk = spec.q_hat.narrow(0, r0, c);
    mm_acc_out(s, q_chunk, k_hat_t);

    GemmRowParams<A> p{};
    p.s = s.template const_data_ptr<A>();
    p.rows = c;
    p.cols = n;
    p.cols_per_split = cols_per_split;
    p.first_row = spec.first_row + r0;
    p.scale = static_cast<A>(spec.scale);
    p.bounded = spec.bounded;
    p.labels = spec.labels;
    p.exclude_self = spec.exclude_self;
    p.offset_positive = spec.offset_positive;
    p.positive_offset = spec.positive_offset;
    p.exclude_positives = spec.exclude_positives;
    if (stats) {
      p.part_shift = parts[0].template data_ptr<A>();
      p.part_sum = parts[1].template data_ptr<A>();
      p.part_positive = parts[2].template data_ptr<A>();
      p.part_count = part_count.template data_ptr<int64_t>();
      if (spec.positives_lse) {
        p.part_pos_shift = parts[3].template data_ptr<A>();
        p.part_pos_sum = parts[4].template data_ptr<A>();
      }
      // The partials are [split][row] with the chunk's row count as the stride.
      launch_kernel(gemm_row_stats_kernel<A>, checked_grid("gemm_row_stats_kernel (chunk rows, splits)", c, splits),
                    dim3(kGemmRowThreads), 0, stream, p);
      merge_rows(r0, c, parts, part_count, splits);
    }
    if (!grad) continue;
    at::Tensor g = g_buffer.narrow(0, 0, c);
    const at::Tensor& lse_positive = stats ? out.lse_positive : spec.given_lse_positive;
    GemmCoefParams<T> q{p, (stats ? out.lse : spec.given_lse).template const_data_ptr<A>() + r0,
                        weight.template const_data_ptr<A>() + r0, inv_count.template const_data_ptr<A>() + r0,
                        spec.positives_lse ? lse_positive.template const_data_ptr<A>() + r0 : nullptr,
                        reinterpret_cast<T*>(g.data_ptr())};
    launch_kernel(gemm_row_coef_kernel<T>, checked_grid("gemm_row_coef_kernel (chunk rows, splits)", c, splits),
                  dim3(kGemmRowThreads), 0, stream, q);
    if (spec.grad_q) {
      at::Tensor rows = out.grad_q_hat.narrow(0, r0, c);
      mm_acc_out(rows, g, spec.k_hat);
    }
    if (spec.grad_k && !SSL_OPS_PLANTED(kDropTransposedTerm)) addmm_acc_(out.grad_k_hat, g.t(), q_chunk);
  }
  if (spec.grad_q) out.grad_q_hat.mul_(product_scale);
  if (spec.grad_k) out.grad_k_hat.mul_(product_scale);
  return out;
}

}  // namespace ssl_ops::cuda
