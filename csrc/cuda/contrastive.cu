// Contrastive losses, CUDA host code: NT-Xent / SupCon (symmetric) and InfoNCE
// (asymmetric). The math is the CPU kernels' (csrc/cpu/contrastive_sym.cpp,
// contrastive_asym.cpp). Two routes compute it (Note [Contrastive routes]):
//
// GEMM route (contrastive_gemm.h): anchor rows in chunks, each chunk's
// similarities from the vendor GEMM, row kernels for the log-sum-exps,
// positives and the coefficients G, and the gradient as two more GEMMs.
//
// Fused route (default, SSL_OPS_CUDA_CONTRASTIVE_ROUTE=fused; where
// fused_route_fits allows, else the GEMM route): the statistics and the
// gradient from tensor-core tiles that never store S
// (contrastive_fused_stats.cuh, contrastive_fused_grad.cuh).
//
// Tile route (SSL_OPS_CUDA_CONTRASTIVE_ROUTE=tiles; contrastive_kernels.cuh,
// contrastive_pairs.cuh): row denominators -> log-sum-exps of the anchor rows
// (self excluded, positives by label) -> per-row loss; with a gradient, the
// rows of (G + G^T) zh -> finish_rows_kernel. With every row an anchor, both
// run on symmetric tile pairs (Note [Tile pairs]), otherwise lse_kernel and
// grad_kernel with both terms. Asymmetric: the same with the positive-key logit
// as the first term of each row (MoCo) or the diagonal (MoCo v3, CLIP); d key
// runs grad_kernel with rows and columns swapped.
//
// Reductions and row weights are small ATen ops on the device, so nothing
// waits for the GPU.
//
// Note [Contrastive routes]: the rule is "GEMM route everywhere"; the tile
// route is kept for measurement only. The reasoning, for an H100/H200 (132
// SMs; bf16 tensor cores ~990 TFLOP/s dense, FP32 cores ~67 TFLOP/s; HBM
// 3.4-4.8 TB/s; 50 MB L2):
// - NT-Xent, 2N = 16384, D = 128, bf16, forward + backward. GEMM route:
//   3 GEMMs over the n x n pairs, 6 n^2 D = 206 GFLOP on tensor cores (~0.3 ms
//   at 70% of peak); S_c and G_c traffic 4 (GEMM write) + 4 (stats) + 4 + 2
//   (coef) + 2 x 2 (GEMM reads of G) = 18 bytes per pair, 4.8 GB, mostly from
//   L2 at a 2^23 chunk (Note [Chunk budget]), at most 1.0 ms from HBM;
//   2 exps per pair (537 M, ~0.13 ms of SFU time). Estimate 0.6-1.3 ms. Tile
//   route: 2/3 of eager's products, but the gradient products on FP32 cores
//   (~90 GFLOP at ~67 TFLOP/s, at least 1.4 ms) and the S tiles through shared
//   memory; the SASS review (shared/gpu-review.md) estimates 3.2 ms.
// - MoCo, B = 256 queries, K = 65536 queue, D = 128, d query only. GEMM
//   route: 2 GEMMs, 8.6 GFLOP; S 16.7 M pairs x 16 bytes = 268 MB; row
//   kernels on 128-row chunks x 9 column splits = 1152 blocks (8.7 per SM,
//   a full wave at 8 resident blocks of 256 threads).
//   Tile route: 4 blocks of 64 rows on 132 SMs (review: ~8 ms against
//   ~0.15 ms for cuBLAS + cross_entropy).
// - Gathered anchors, 512 of 8192 rows: one 512 x 8192 chunk, 512 x 3 = 1536
//   row blocks; tile route: 8 row-tile blocks. CLIP, B = 32768: 256-row
//   chunks, 256 x 5 = 1280 row blocks each; host time may be the limit there
//   (estimated: about 6 launches, ~30 us of host work per chunk against
//   ~25 us of GPU work), see Note [Chunk budget].
// A hand-written route would win only by never storing S (FlashAttention-
// style: ~0.4-0.6 ms at 2N = 16384), which needs a GPU to tune. What would
// justify routing a shape to the tile kernels: `python -m benchmarks.contrastive
// --device cuda` showing them ahead of the GEMM route there by more than the
// run-to-run spread (it times both and prints the winner per shape).
// Measured (H200, torch 2.11, 2026-11-28; benchmarks/RESULTS.md): the estimates
// above were 3-4x optimistic. NT-Xent 2N = 65536, D = 128, bf16, forward +
// backward took 47.4 ms with 2^25-element chunks (eager 52.6): the bytes of S_c
// and G_c (18 per pair, 77 GB, ~18 ms at 4.3 TB/s) plus the GEMMs (3.3 TFLOP,
// ~9.5 ms at the 350 TFLOP/s one matmul of that shape reached) leave ~20 ms
// of launches and row-kernel inefficiency. fp32 (no TF32): 112.9 ms against
// eager 157.4. The tile kernels won only the forward-only fp32 shapes (31.7 ms
// against 44.3 at 65536: half the products, on FP32 cores) and lost every
// training (forward + backward) shape by up to 3x, so the rule stands; the
// fused FlashAttention-style route is the way past eager in bf16.
// Deterministic: the GEMM route uses no atomics and a fixed chunk order, so
// torch.use_deterministic_algorithms(True) needs nothing more of it; the
// tile route then uses the row-tile kernels (Note [Tile pairs]).
#include <ATen/Dispatch.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/clamp_min.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/exp.h>
#include <ATen/ops/log.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/ones_like.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <optional>
#include <type_traits>
#include <vector>

#include "../contrastive_check.h"
#include "compat.cuh"
#include "../message.h"
#include "contrastive_gemm.h"
#include "contrastive_kernels.cuh"
#include "contrastive_pairs.cuh"
#include "contrastive_rows.cuh"
#include "launch_limits.h"

namespace ssl_ops::cuda {
namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename T>
const T* data(const at::Tensor& t) {
  return reinterpret_cast<const T*>(t.const_data_ptr());
}
template <typename T>
T* mutable_data(at::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

template <typename T>
void launch_lse(const LseParams<T>& p, cudaStream_t stream) {
  const dim3 grid = checked_grid("lse_kernel (row tiles)", ceil_div(p.n_rows, tile_size<T>()));
  with_tile_path<T>([&](auto tensor_cores) {
    constexpr bool kTc = decltype(tensor_cores)::value;
    if (p.bounded) {
      launch_kernel(lse_kernel<T, kTc, true>, grid, dim3(kTileThreads), 0, stream, p);
    } else {
      launch_kernel(lse_kernel<T, kTc, false>, grid, dim3(kTileThreads), 0, stream, p);
    }
  });
}

// Feature chunks per gradient block: up to 256 features (S formed once per
// tile); wider rows split over blocks.
int feature_parts(int64_t features) { return features <= kChunk ? 1 : (features <= 2 * kChunk ? 2 : 4); }

// Gradient blocks along the features (a grid dimension: check_tile_route_size
// bounds it before any kernel runs, checked_grid again at the launch).
int64_t feature_blocks(int64_t features, int parts) { return ceil_div(features, int64_t(kChunk) * parts); }

// The tile route's grids for rows x (R, D) (Note [Launch limits]), checked
// before any of its kernels runs; the features bound only the gradient kernels.
void check_tile_route_size(const at::Tensor& x, const char* name, bool gradient) {
  const int64_t tile = x.scalar_type() == at::kDouble ? 32 : 64, features = x.size(1);
  TORCH_CHECK(!gradient || feature_blocks(features, feature_parts(features)) <= kMaxGridYZ,
              ssl_ops::message("contrastive loss on the CUDA tile route (SSL_OPS_CUDA_CONTRASTIVE_ROUTE=tiles): ", name,
                               " may have at most ", kMaxGridYZ * kChunk * 4, " features, got ", features,
                               "; the GEMM route (the default) has no such limit"));
  TORCH_CHECK(ceil_div(x.size(0), tile) <= kMaxGridX,
              ssl_ops::message("contrastive loss on the CUDA tile route: ", name, " may have at most ",
                               kMaxGridX * tile, " rows, got ", x.size(0)));
}

template <typename Launch>
void with_parts(int parts, Launch&& launch) {
  if (parts == 1) {
    launch(std::integral_constant<int, 1>{});
  } else if (parts == 2) {
    launch(std::integral_constant<int, 2>{});
  } else {
    launch(std::integral_constant<int, 4>{});
  }
}

template <typename T>
at::Tensor run_grad_kernel(GradParams<T> p, const at::Tensor& like_rows, cudaStream_t stream) {
  using A = acc_t<T>;
  at::Tensor out = at::empty({p.n_rows, p.features}, like_rows.options().dtype(c10::CppTypeToScalarType<A>::value));
  p.out = mutable_data<A>(out);
  const int parts = feature_parts(p.features);
  const dim3 grid = checked_grid("grad_kernel (row tiles, feature blocks)", ceil_div(p.n_rows, tile_size<T>()),
                                 feature_blocks(p.features, parts));
  with_tile_path<T>([&](auto tensor_cores) {
    with_parts(parts, [&](auto kParts) {
      launch_kernel(grad_kernel<T, decltype(tensor_cores)::value, decltype(kParts)::value>, grid,
                    dim3(kTileThreads), 0, stream, p);
    });
  });
  return out;
}

// Row weights w_r of the reduced loss for grad_loss g: none g_r, mean g / n, sum g;
// `valid` masks rows that have positives.
at::Tensor row_weights(const at::Tensor& grad_loss, Reduction reduction, const at::Tensor& valid,
                       at::ScalarType acc) {
  const at::Tensor g = grad_loss.to(acc);
  const at::Tensor mask = valid.to(acc);
  if (reduction == Reduction::None) return g * mask;
  if (reduction == Reduction::Sum) return g * mask;
  return g / at::clamp_min(mask.sum(), 1) * mask;
}

// Summed in double, as on the CPU (Note [Loss rounding]): one row-count-sized
// reduction, negligible next to the loss itself.
at::Tensor reduce(const at::Tensor& row_loss, Reduction reduction, const at::Tensor& valid) {
  if (reduction == Reduction::None) return row_loss;
  const at::Tensor total = row_loss.sum(at::kDouble);
  if (reduction == Reduction::Sum) return total.to(row_loss.scalar_type());
  return (total / at::clamp_min(valid.sum(), 1)).to(row_loss.scalar_type());
}

// ---- The GEMM route (contrastive_gemm.h; Note [Contrastive routes]) ---------------------

// The rows the GEMMs multiply: x / denom in x's dtype (x itself without normalisation).
at::Tensor normalized_rows(const at::Tensor& x, const at::Tensor& denom, bool normalize) {
  if (!normalize) return x;
  return (x.to(denom.scalar_type()) / denom.unsqueeze(1)).to(x.scalar_type());
}

// The fused route runs inside gemm_contrastive (fused_route_fits), so every
// route but the tiles' takes the GEMM route's host code.
bool use_gemm_route() { return contrastive_route() != ContrastiveRoute::kTiles; }

// ---- Symmetric: NT-Xent, multi-view, SupCon -----------------------------------------

struct SymSaved {
  at::Tensor lse, positive_sum, positive_count;
  at::Tensor lse_positive;  // log-sum-exp form; else empty
  at::Tensor row_loss;      // GEMM route: each row's loss, rounded as on the CPU
};

// The anchor rows [begin, end) of z: all rows in one process, this process's
// rows when z is gathered from several.
struct Anchors {
  int64_t begin, end;
  int64_t count() const { return end - begin; }
};

template <typename T>
GemmLossSpec<T> sym_gemm_spec(const at::Tensor& z_hat, const at::Tensor& labels, Anchors anchors, double scale,
                              bool normalize, PositiveReduction form) {
  GemmLossSpec<T> spec;
  spec.q_hat = z_hat.narrow(0, anchors.begin, anchors.count());
  spec.k_hat = z_hat;
  spec.first_row = anchors.begin;
  spec.labels = data<int64_t>(labels);
  spec.exclude_self = true;
  spec.rows_need_positives = true;
  spec.positives_lse = form == PositiveReduction::kLogSumExp;
  spec.exclude_positives = form == PositiveReduction::kExcluded;
  spec.scale = scale;
  spec.bounded = logit_bound_usable<acc_t<T>>(scale, normalize);
  return spec;
}

// The GEMM route's statistics as the op returns them: rows outside the anchors
// keep 0 (no positives, so no loss and no weight).
template <typename T>
SymSaved sym_saved_from(const GemmLossResult<T>& r, int64_t rows, Anchors anchors) {
  SymSaved s{at::zeros({rows}, r.lse.options()), at::zeros({rows}, r.lse.options()),
             at::zeros({rows}, r.positive_count.options())};
  s.lse.narrow(0, anchors.begin, anchors.count()).copy_(r.lse);
  s.positive_sum.narrow(0, anchors.begin, anchors.count()).copy_(r.positive_sum);
  s.positive_count.narrow(0, anchors.begin, anchors.count()).copy_(r.positive_count);
  s.lse_positive = at::zeros({r.lse_positive.defined() ? rows : 0}, r.lse.options());
  if (r.lse_positive.defined()) s.lse_positive.narrow(0, anchors.begin, anchors.count()).copy_(r.lse_positive);
  s.row_loss = at::zeros({rows}, r.lse.options());
  s.row_loss.narrow(0, anchors.begin, anchors.count()).copy_(r.row_loss);
  return s;
}

// 1 / |P(r)| per row, 0 for rows without positives (count in the accumulation
// type); in the log-sum-exp form 1 for one positive, else 0 (the GEMM merge
// kernel's rule).
at::Tensor inverse_counts(const at::Tensor& count, bool positives_lse = false) {
  if (positives_lse) return (count == 1).to(count.scalar_type()).contiguous();
  return at::where(count > 0, 1 / at::clamp_min(count, 1), at::zeros_like(count)).contiguous();
}

// d z_hat = (G + G^T) z_hat: d K_hat over every row, plus d Q_hat at the anchors.
template <typename T>
at::Tensor sym_gemm_grad_hat(GemmLossResult<T>& r, Anchors anchors) {
  if (r.grad_k_includes_q) return r.grad_k_hat;
  r.grad_k_hat.narrow(0, anchors.begin, anchors.count()).add_(r.grad_q_hat);
  return r.grad_k_hat;
}

// Note [Tile pairs]: when every row is an anchor, the symmetric kernels of
// contrastive_pairs.cuh form each tile pair once (the log-sum-exps only where
// the logit bound is usable; the gradient always). Their atomics make the
// last bits vary between runs, so torch.use_deterministic_algorithms(True)
// keeps the row-tile kernels, which form every tile of S (twice the work).
bool use_tile_pairs(int64_t rows, Anchors anchors) {
  return anchors.begin == 0 && anchors.end == rows && !at::globalContext().deterministicAlgorithms();
}

constexpr int64_t kMinPairsPerBlock = 2;

// Splits each row tile's pairs over enough blocks for about two waves of the
// multiprocessors, with at least kMinPairsPerBlock pairs per block.
template <typename T>
PairSchedule pair_schedule(int64_t rows, int64_t blocks_per_row_tile, c10::Device device) {
  PairSchedule s{ceil_div(rows, tile_size<T>()), 0};
  const int64_t wanted_blocks = 2 * int64_t(multiprocessor_count(device));
  const int64_t most = s.most_pairs();
  const int64_t splits =
      std::clamp<int64_t>(ceil_div(wanted_blocks, s.tiles * blocks_per_row_tile), 1, ceil_div(most, kMinPairsPerBlock));
  s.pairs_per_block = ceil_div(most, splits);
  return s;
}

template <typename T>
SymSaved sym_statistics(const at::Tensor& z, const at::Tensor& denom, const at::Tensor& labels, Anchors anchors,
                        double scale, bool normalize, cudaStream_t stream) {
  using A = acc_t<T>;
  const int64_t m = z.size(0), d = z.size(1);
  const auto acc_opts = z.options().dtype(c10::CppTypeToScalarType<A>::value);
  // Rows outside the anchors keep 0: no positives, so no loss and no weight.
  SymSaved s{at::zeros({m}, acc_opts), at::zeros({m}, acc_opts), at::zeros({m}, z.options().dtype(at::kLong))};
  if (use_tile_pairs(m, anchors) && logit_bound_usable<A>(scale, normalize)) {
    const double bound = std::abs(scale);
    const PairSchedule schedule = pair_schedule<T>(m, 1, z.device());
    SymPairLseParams<T> p{data<T>(z), data<A>(denom), m, d, static_cast<A>(scale), static_cast<A>(bound),
                          data<int64_t>(labels), schedule, mutable_data<A>(s.lse),
                          mutable_data<A>(s.positive_sum), mutable_data<int64_t>(s.positive_count)};
    const dim3 grid = checked_grid("sym_lse_pairs_kernel (row tiles, slices)", schedule.tiles, schedule.slices());
    with_tile_path<T>([&](auto tensor_cores) {
      launch_kernel(sym_lse_pairs_kernel<T, decltype(tensor_cores)::value>, grid, dim3(kTileThreads), 0, stream,
                    p);
    });
    s.lse.log_().add_(bound);  // the kernel left sum_c exp(S_rc - bound) there
    return s;
  }
  const int64_t a0 = anchors.begin;
  LseParams<T> p{data<T>(z) + a0 * d, data<T>(z), data<A>(denom) + a0, data<A>(denom), anchors.count(), m, d,
                 static_cast<A>(scale), data<int64_t>(labels), /*row_offset=*/a0, /*exclude_self=*/true, nullptr,
                 logit_bound_usable<A>(scale, normalize), static_cast<A>(std::abs(scale)),
                 mutable_data<A>(s.lse) + a0, mutable_data<A>(s.positive_sum) + a0,
                 mutable_data<int64_t>(s.positive_count) + a0, nullptr};
  launch_lse(p, stream);
  return s;
}

// d zh = scale (G + G^T) zh with G zero outside the anchor rows: the anchors
// take both terms against every row; the other rows (before and after the
// anchors) take only the column term, against the anchors.
template <typename T>
at::Tensor sym_gradient(const at::Tensor& z, const at::Tensor& denom, const at::Tensor& labels, Anchors anchors,
                        const at::Tensor& lse, const at::Tensor& positive_count, const at::Tensor& weight,
                        double scale, double eps, bool normalize, cudaStream_t stream) {
  using A = acc_t<T>;
  const int64_t m = z.size(0), d = z.size(1);
  const at::Tensor count = positive_count.to(lse.scalar_type());
  const at::Tensor inv_positives = inverse_counts(count);
  GradParams<T> base{};
  base.features = d;
  base.scale = static_cast<A>(scale);
  base.labels = data<int64_t>(labels);
  base.exclude_self = true;
  base.has_positives = true;
  if (use_tile_pairs(m, anchors)) {
    at::Tensor grad_hat = at::zeros({m, d}, lse.options());
    const int parts = feature_parts(d);
    const int64_t blocks_per_row_tile = feature_blocks(d, parts);
    const PairSchedule schedule = pair_schedule<T>(m, blocks_per_row_tile, z.device());
    SymPairGradParams<T> p{data<T>(z), data<A>(denom), m, d, static_cast<A>(scale), data<int64_t>(labels),
                           data<A>(lse), data<A>(weight), data<A>(inv_positives), schedule,
                           mutable_data<A>(grad_hat)};
    const dim3 grid = checked_grid("sym_grad_pairs_kernel (row tiles, slices, feature blocks)", schedule.tiles,
                                   schedule.slices(), blocks_per_row_tile);
    with_tile_path<T>([&](auto tensor_cores) {
      with_parts(parts, [&](auto kParts) {
        launch_kernel(sym_grad_pairs_kernel<T, decltype(tensor_cores)::value, decltype(kParts)::value>, grid,
                      dim3(kTileThreads), 0, stream, p);
      });
    });
    return finish_rows<T>(z, denom, &grad_hat, nullptr, nullptr, nullptr, eps, normalize, stream);
  }
  // Rows [r0, r1) against columns [c0, c1); every per-row array is sliced alike.
  auto block = [&](int64_t r0, int64_t r1, int64_t c0, int64_t c1, bool row_term) {
    GradParams<T> p = base;
    p.rows = data<T>(z) + r0 * d;
    p.cols = data<T>(z) + c0 * d;
    p.row_denom = data<A>(denom) + r0;
    p.col_denom = data<A>(denom) + c0;
    p.n_rows = r1 - r0;
    p.n_cols = c1 - c0;
    p.row_offset = r0;
    p.col_offset = c0;
    p.row_term = row_term;
    p.col_term = true;
    p.row_lse = data<A>(lse) + r0;
    p.row_weight = data<A>(weight) + r0;
    p.row_inv_positives = data<A>(inv_positives) + r0;
    p.col_lse = data<A>(lse) + c0;
    p.col_weight = data<A>(weight) + c0;
    p.col_inv_positives = data<A>(inv_positives) + c0;
    return run_grad_kernel(p, z, stream);
  };
  at::Tensor grad_hat = block(anchors.begin, anchors.end, 0, m, true);
  if (anchors.count() < m) {
    std::vector<at::Tensor> parts;
    if (anchors.begin > 0) parts.push_back(block(0, anchors.begin, anchors.begin, anchors.end, false));
    parts.push_back(grad_hat);
    if (anchors.end < m) parts.push_back(block(anchors.end, m, anchors.begin, anchors.end, false));
    grad_hat = at::cat(parts);
  }
  return finish_rows<T>(z, denom, &grad_hat, nullptr, nullptr, nullptr, eps, normalize, stream);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> contrastive_sym_loss(
    const at::Tensor& z_in, const at::Tensor& labels_in, int64_t anchor_begin, int64_t anchor_end, double scale,
    double eps, bool normalize, int64_t reduction_in, bool compute_grad, int64_t positives) {
  check_sym_contrastive_args(z_in, labels_in, anchor_begin, anchor_end, scale, eps, reduction_in, positives);
  const auto form = static_cast<PositiveReduction>(positives);
  const bool positives_lse = form == PositiveReduction::kLogSumExp;
  if (!use_gemm_route() && form == PositiveReduction::kMean) {
    const bool gradient = compute_grad && static_cast<Reduction>(reduction_in) != Reduction::None;
    check_tile_route_size(z_in, "z", gradient);
  }
  const DeviceGuard guard(z_in.device());
  const cudaStream_t stream = current_stream(z_in.device());
  const at::Tensor z = z_in.contiguous(), labels = labels_in.contiguous();
  const auto reduction = static_cast<Reduction>(reduction_in);
  const Anchors anchors{anchor_begin, anchor_end};
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "contrastive_sym_loss", [&] {
    const at::Tensor denom = row_denoms<scalar_t>(z, eps, normalize, stream);
    const bool with_grad = compute_grad && reduction != Reduction::None;
    SymSaved s;
    at::Tensor gemm_grad_hat;  // the GEMM route forms the gradient with the statistics
    // The positives inside the log or excluded take the GEMM route on either
    // setting: the tile kernels compute the mean form only.
    if (use_gemm_route() || form != PositiveReduction::kMean) {
      GemmLossSpec<scalar_t> spec = sym_gemm_spec<scalar_t>(normalized_rows(z, denom, normalize), labels, anchors,
                                                            scale, normalize, form);
      spec.grad_q = spec.grad_k = with_grad;  // weights: 1 where the row has positives
      GemmLossResult<scalar_t> r = gemm_contrastive(spec, z.device(), stream);
      s = sym_saved_from(r, z.size(0), anchors);
      if (with_grad) gemm_grad_hat = sym_gemm_grad_hat(r, anchors);
    } else {
      s = sym_statistics<scalar_t>(z, denom, labels, anchors, scale, normalize, stream);
    }
    const at::Tensor valid = s.positive_count > 0;
    const at::Tensor count = s.positive_count.to(s.lse.scalar_type());
    const at::Tensor row_loss =
        s.row_loss.defined() ? s.row_loss
                             : at::where(valid, s.lse - s.positive_sum / at::clamp_min(count, 1), at::zeros_like(s.lse));
    at::Tensor grad = at::empty({0}, z.options());
    if (with_grad && gemm_grad_hat.defined()) {
      if (reduction == Reduction::Mean) gemm_grad_hat.div_(at::clamp_min(valid.sum(), 1));
      grad = finish_rows<scalar_t>(z, denom, &gemm_grad_hat, nullptr, nullptr, nullptr, eps, normalize, stream);
    } else if (with_grad) {
      const at::Tensor unit = at::ones({}, s.lse.options());  // d(loss)/d(loss) for the forward's gradient
      const at::Tensor weight = row_weights(unit, reduction, valid, s.lse.scalar_type());
      grad = sym_gradient<scalar_t>(z, denom, labels, anchors, s.lse, s.positive_count, weight, scale, eps,
                                    normalize, stream);
    }
    const at::Tensor lse_positive = positives_lse ? s.lse_positive : at::empty({0}, s.lse.options());
    result = {reduce(row_loss, reduction, valid), s.lse, s.positive_count, grad, lse_positive};
  });
  return result;
}

at::Tensor contrastive_sym_backward(const at::Tensor& grad_loss, const at::Tensor& z_in, const at::Tensor& labels_in,
                                    int64_t anchor_begin, int64_t anchor_end, const at::Tensor& lse,
                                    const at::Tensor& positive_count, double scale, double eps, bool normalize,
                                    int64_t reduction, const std::optional<at::Tensor>& lse_positive,
                                    int64_t positives) {
  check_sym_contrastive_args(z_in, labels_in, anchor_begin, anchor_end, scale, eps, reduction, positives);
  check_sym_lse_positive(z_in, lse_positive, positives);
  const auto form = static_cast<PositiveReduction>(positives);
  const bool positives_lse = form == PositiveReduction::kLogSumExp;
  if (!use_gemm_route() && form == PositiveReduction::kMean) check_tile_route_size(z_in, "z", true);
  const DeviceGuard guard(z_in.device());
  const cudaStream_t stream = current_stream(z_in.device());
  const at::Tensor z = z_in.contiguous(), labels = labels_in.contiguous();
  at::Tensor grad;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "contrastive_sym_backward", [&] {
    const at::Tensor denom = row_denoms<scalar_t>(z, eps, normalize, stream);
    const at::Tensor lse_acc = lse.to(denom.scalar_type()).contiguous();
    const at::Tensor weight =
        row_weights(grad_loss, static_cast<Reduction>(reduction), positive_count > 0, denom.scalar_type());
    const Anchors anchors{anchor_begin, anchor_end};
    if (use_gemm_route() || form != PositiveReduction::kMean) {
      GemmLossSpec<scalar_t> spec = sym_gemm_spec<scalar_t>(normalized_rows(z, denom, normalize), labels, anchors,
                                                            scale, normalize, form);
      const at::Tensor count = positive_count.narrow(0, anchors.begin, anchors.count()).to(lse_acc.scalar_type());
      spec.given_lse = lse_acc.narrow(0, anchors.begin, anchors.count()).contiguous();
      spec.given_weight = weight.narrow(0, anchors.begin, anchors.count()).contiguous();
      spec.given_inv_count = inverse_counts(count, positives_lse);
      if (positives_lse) {
        spec.given_lse_positive =
            lse_positive->to(lse_acc.scalar_type()).narrow(0, anchors.begin, anchors.count()).contiguous();
      }
      spec.grad_q = spec.grad_k = true;
      GemmLossResult<scalar_t> r = gemm_contrastive(spec, z.device(), stream);
      at::Tensor grad_hat = sym_gemm_grad_hat(r, anchors);
      grad = finish_rows<scalar_t>(z, denom, &grad_hat, nullptr, nullptr, nullptr, eps, normalize, stream);
      return;
    }
    grad = sym_gradient<scalar_t>(z, denom, labels, anchors, lse_acc,
                                  positive_count.contiguous(), weight.contiguous(), scale, eps, normalize, stream);
  });
  return grad;
}

// ---- Asymmetric: InfoNCE (MoCo, MoCo v3, CLIP) --------------------------------------

template <typename T>
struct AsymInputs {
  at::Tensor q, k, p, denom_q, denom_k, denom_p, positive_logit;
  int64_t offset = 0;  // without p: the positive of query r is key r + offset
};

template <typename T>
AsymInputs<T> asym_inputs(const at::Tensor& query, const at::Tensor& key, const std::optional<at::Tensor>& positive,
                          int64_t offset, double scale, double eps, bool normalize, bool gemm_route,
                          cudaStream_t stream) {
  using A = acc_t<T>;
  AsymInputs<T> in;
  in.offset = SSL_OPS_PLANTED(kPositiveOffByOne) ? offset + 1 : offset;
  in.q = query.contiguous();
  // A MoCo queue kept as (D, K) arrives transposed: the GEMM route reads it in
  // place when nothing normalises it (solo-learn's mocov2plus), never copying it.
  const bool column_major = key.dim() == 2 && key.t().is_contiguous();
  in.k = (!normalize && gemm_route && column_major) ? key : key.contiguous();
  in.denom_q = row_denoms<T>(in.q, eps, normalize, stream);
  in.denom_k = row_denoms<T>(in.k, eps, normalize, stream);
  in.positive_logit = at::empty({in.q.size(0)}, in.denom_q.options());
  if (positive.has_value()) {
    in.p = positive->contiguous();
    in.denom_p = row_denoms<T>(in.p, eps, normalize, stream);
    RowDotParams<T> d{data<T>(in.q), data<T>(in.p), data<A>(in.denom_q), data<A>(in.denom_p), in.q.size(0),
                      in.q.size(1), static_cast<A>(scale), mutable_data<A>(in.positive_logit)};
    launch_kernel(row_dot_kernel<T>, row_grid(in.q.size(0)), dim3(kRowThreads), 0, stream, d);
  }
  return in;
}

// The asymmetric gradients through the normalisation, from d q_hat and d k_hat
// (accumulation type; undefined where not asked for) and, with a positive key,
// its softmax term coef_r = scale * w_r (softmax of the positive key - 1).
template <typename T>
std::array<at::Tensor, 3> finish_asym(const AsymInputs<T>& in, const at::Tensor& grad_q_hat,
                                      const at::Tensor& grad_k_hat, const at::Tensor& lse, const at::Tensor& weight,
                                      double scale, double eps, bool normalize, std::array<bool, 3> mask,
                                      cudaStream_t stream) {
  const bool with_p = in.p.defined();
  at::Tensor coef;
  if (with_p) coef = (weight * (at::exp(in.positive_logit - lse) - 1) * scale).contiguous();
  std::array<at::Tensor, 3> out;
  if (mask[0]) {
    out[0] = with_p ? finish_rows<T>(in.q, in.denom_q, &grad_q_hat, &coef, &in.p, &in.denom_p, eps, normalize,
                                     stream)
                    : finish_rows<T>(in.q, in.denom_q, &grad_q_hat, nullptr, nullptr, nullptr, eps, normalize,
                                     stream);
  }
  if (mask[1]) out[1] = finish_rows<T>(in.k, in.denom_k, &grad_k_hat, nullptr, nullptr, nullptr, eps, normalize, stream);
  if (mask[2] && with_p) {
    out[2] = finish_rows<T>(in.p, in.denom_p, nullptr, &coef, &in.q, &in.denom_q, eps, normalize, stream);
  }
  return out;
}

template <typename T>
std::array<at::Tensor, 3> asym_gradients(const AsymInputs<T>& in, const at::Tensor& lse, const at::Tensor& weight,
                                         double scale, double eps, bool normalize, std::array<bool, 3> mask,
                                         cudaStream_t stream) {
  using A = acc_t<T>;
  GradParams<T> base{};
  base.features = in.q.size(1);
  base.scale = static_cast<A>(scale);
  base.has_positives = !in.p.defined();  // without a positive key, column r + offset is row r's positive
  at::Tensor grad_q_hat, grad_k_hat;
  if (mask[0]) {
    GradParams<T> p = base;
    p.rows = data<T>(in.q);
    p.cols = data<T>(in.k);
    p.row_denom = data<A>(in.denom_q);
    p.col_denom = data<A>(in.denom_k);
    p.n_rows = in.q.size(0);
    p.n_cols = in.k.size(0);
    p.row_offset = in.offset;  // query r meets its positive at key r + offset
    p.row_term = true;
    p.row_lse = data<A>(lse);
    p.row_weight = data<A>(weight);
    grad_q_hat = run_grad_kernel(p, in.q, stream);
  }
  if (mask[1]) {
    GradParams<T> p = base;  // rows: keys; columns: queries, whose statistics weigh T
    p.rows = data<T>(in.k);
    p.cols = data<T>(in.q);
    p.row_denom = data<A>(in.denom_k);
    p.col_denom = data<A>(in.denom_q);
    p.n_rows = in.k.size(0);
    p.n_cols = in.q.size(0);
    p.col_offset = in.offset;
    p.col_term = true;
    p.col_lse = data<A>(lse);
    p.col_weight = data<A>(weight);
    grad_k_hat = run_grad_kernel(p, in.k, stream);
  }
  return finish_asym<T>(in, grad_q_hat, grad_k_hat, lse, weight, scale, eps, normalize, mask, stream);
}

// The GEMM route of both asymmetric ops: queries against keys (or the queue),
// the positive a separate key (MoCo; its logit starts each row) or key
// r + offset. `lse` given (the backward op): only the gradient is formed.
// Returns the log-sum-exps (forward) and the gradients `mask` asks for.
template <typename T>
std::pair<at::Tensor, std::array<at::Tensor, 3>> asym_gemm(AsymInputs<T>& in, const at::Tensor& given_lse,
                                                          const at::Tensor& weight, double scale, double eps,
                                                          bool normalize, std::array<bool, 3> mask,
                                                          cudaStream_t stream) {
  const bool with_p = in.p.defined();
  GemmLossSpec<T> spec;
  spec.q_hat = normalized_rows(in.q, in.denom_q, normalize);
  spec.k_hat = normalized_rows(in.k, in.denom_k, normalize);
  spec.offset_positive = !with_p;
  spec.positive_offset = in.offset;
  if (with_p) spec.initial_logit = in.positive_logit;
  spec.scale = scale;
  spec.bounded = logit_bound_usable<acc_t<T>>(scale, normalize);
  spec.grad_q = weight.defined() && mask[0];
  spec.grad_k = weight.defined() && mask[1];
  if (given_lse.defined()) {
    spec.given_lse = given_lse;
    spec.given_weight = weight;
    spec.given_inv_count = at::ones_like(given_lse);  // one positive per row (unused with a positive key)
  } else {
    spec.weight = weight;
  }
  GemmLossResult<T> r = gemm_contrastive(spec, in.q.device(), stream);
  const at::Tensor lse = given_lse.defined() ? given_lse : r.lse;
  if (!with_p && r.positive_sum.defined()) in.positive_logit = r.positive_sum;  // S_r,r+offset
  if (!weight.defined()) return {lse, {}};
  return {lse, finish_asym<T>(in, r.grad_q_hat, r.grad_k_hat, lse, weight, scale, eps, normalize, mask, stream)};
}

at::Tensor or_empty(const at::Tensor& t, const at::Tensor& like) {
  return t.defined() ? t : at::empty({0}, like.options());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> contrastive_asym_loss(
    const at::Tensor& query, const at::Tensor& key, const std::optional<at::Tensor>& positive_key,
    int64_t positive_offset, double scale, double eps, bool normalize, int64_t reduction_in,
    std::array<bool, 3> grad_mask) {
  check_asym_contrastive_args(query, key, positive_key, positive_offset, scale, eps, reduction_in);
  if (!use_gemm_route()) {
    const bool gradient =
        static_cast<Reduction>(reduction_in) != Reduction::None && (grad_mask[0] || grad_mask[1] || grad_mask[2]);
    check_tile_route_size(query, "query", gradient);
    check_tile_route_size(key, "key", gradient);
  }
  const DeviceGuard guard(query.device());
  const cudaStream_t stream = current_stream(query.device());
  const auto reduction = static_cast<Reduction>(reduction_in);
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(), "contrastive_asym_loss", [&] {
    using A = acc_t<scalar_t>;
    const bool gemm_route = use_gemm_route();  // read once: the key's layout depends on it
    AsymInputs<scalar_t> in =
        asym_inputs<scalar_t>(query, key, positive_key, positive_offset, scale, eps, normalize, gemm_route, stream);
    if (gemm_route) {
      const at::Tensor all_rows = at::ones({in.q.size(0)}, in.denom_q.options().dtype(at::kBool));
      at::Tensor weight;  // undefined: no gradient
      if (reduction != Reduction::None && (grad_mask[0] || grad_mask[1] || grad_mask[2])) {
        weight = row_weights(at::ones({}, in.denom_q.options()), reduction, all_rows, in.denom_q.scalar_type());
      }
      auto [lse, grads] = asym_gemm<scalar_t>(in, at::Tensor(), weight, scale, eps, normalize, grad_mask, stream);
      result = {reduce(lse - in.positive_logit, reduction, all_rows), lse, or_empty(grads[0], query),
                or_empty(grads[1], key), or_empty(grads[2], query)};
      return;
    }
    at::Tensor lse = at::empty({in.q.size(0)}, in.denom_q.options());
    LseParams<scalar_t> p{data<scalar_t>(in.q), data<scalar_t>(in.k), data<A>(in.denom_q), data<A>(in.denom_k),
                          in.q.size(0), in.k.size(0), in.q.size(1), static_cast<A>(scale), nullptr,
                          /*row_offset=*/positive_offset, /*exclude_self=*/false,
                          in.p.defined() ? data<A>(in.positive_logit) : nullptr,
                          logit_bound_usable<A>(scale, normalize), static_cast<A>(std::abs(scale)),
                          mutable_data<A>(lse), nullptr, nullptr,
                          in.p.defined() ? nullptr : mutable_data<A>(in.positive_logit)};
    launch_lse(p, stream);
    const at::Tensor row_loss = lse - in.positive_logit;
    const at::Tensor all_rows = at::ones_like(lse, lse.options().dtype(at::kBool));
    std::array<at::Tensor, 3> grads;
    if (reduction != Reduction::None && (grad_mask[0] || grad_mask[1] || grad_mask[2])) {
      const at::Tensor weight = row_weights(at::ones({}, lse.options()), reduction, all_rows, lse.scalar_type());
      grads = asym_gradients<scalar_t>(in, lse, weight, scale, eps, normalize, grad_mask, stream);
    }
    result = {reduce(row_loss, reduction, all_rows), lse, or_empty(grads[0], query), or_empty(grads[1], key),
              or_empty(grads[2], query)};
  });
  return result;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> contrastive_asym_backward(
    const at::Tensor& grad_loss, const at::Tensor& query, const at::Tensor& key,
    const std::optional<at::Tensor>& positive_key, int64_t positive_offset, const at::Tensor& lse, double scale,
    double eps, bool normalize, int64_t reduction, std::array<bool, 3> grad_mask) {
  check_asym_contrastive_args(query, key, positive_key, positive_offset, scale, eps, reduction);
  if (!use_gemm_route()) {
    check_tile_route_size(query, "query", true);
    check_tile_route_size(key, "key", true);
  }
  const DeviceGuard guard(query.device());
  const cudaStream_t stream = current_stream(query.device());
  std::tuple<at::Tensor, at::Tensor, at::Tensor> result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(), "contrastive_asym_backward", [&] {
    const bool gemm_route = use_gemm_route();  // read once: the key's layout depends on it
    AsymInputs<scalar_t> in =
        asym_inputs<scalar_t>(query, key, positive_key, positive_offset, scale, eps, normalize, gemm_route, stream);
    const at::Tensor lse_acc = lse.to(in.denom_q.scalar_type()).contiguous();
    const at::Tensor all_rows = at::ones_like(lse_acc, lse_acc.options().dtype(at::kBool));
    const at::Tensor weight =
        row_weights(grad_loss, static_cast<Reduction>(reduction), all_rows, lse_acc.scalar_type()).contiguous();
    const auto grads =
        gemm_route
            ? asym_gemm<scalar_t>(in, lse_acc, weight, scale, eps, normalize, grad_mask, stream).second
            : asym_gradients<scalar_t>(in, lse_acc, weight, scale, eps, normalize, grad_mask, stream);
    result = {or_empty(grads[0], query), or_empty(grads[1], key), or_empty(grads[2], query)};
  });
  return result;
}

}  // namespace

SSL_OPS_CUDA_LIBRARY_IMPL(m) {
  m.impl("contrastive_sym_loss", &contrastive_sym_loss);
  m.impl("contrastive_sym_backward", &contrastive_sym_backward);
  m.impl("contrastive_asym_loss", &contrastive_asym_loss);
  m.impl("contrastive_asym_backward", &contrastive_asym_backward);
}

}  // namespace ssl_ops::cuda
