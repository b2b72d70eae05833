#pragma once
// The passes over S behind both contrastive ops on CUDA (Note [Contrastive
// routes] in contrastive_passes.cu): what an op asks for (ContrastiveSpec),
// what it gets back (ContrastiveResult), and the two routes that compute it,
// contrastive_fused.cuh (instantiated by contrastive_fused_{bf16,fp16,tf32}.cu)
// and contrastive_gemm.cu. The ops (contrastive_sym.cu, contrastive_asym.cu)
// normalise the rows, fill a spec, call contrastive_passes and take the
// gradient back through the normalisation.
//
// The algorithm and how the CPU kernels differ: Note [Contrastive algorithm]
// in csrc/contrastive_check.h.
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <type_traits>

#include "compat.cuh"

namespace ssl_ops::cuda {

template <typename T>
struct ContrastiveSpec {
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
  // log-sum-exp form, with lse_pos); the statistics passes are skipped.
  at::Tensor given_lse, given_weight, given_inv_count, given_lse_positive;
  // Forward with a gradient: per-row weights, or undefined for 1 where the row counts.
  at::Tensor weight;
  bool grad_q = false, grad_k = false;
};

template <typename T>
struct ContrastiveResult {
  at::Tensor lse, positive_sum, positive_count;  // per anchor (statistics pass only)
  at::Tensor lse_positive;                        // log-sum-exp form
  at::Tensor row_loss;                            // rows_need_positives (symmetric)
  at::Tensor grad_q_hat, grad_k_hat;              // accumulation type, G including scale and w
  bool grad_k_includes_q = false;                 // Q = K: grad_k_hat is d z_hat, grad_q_hat unused
  // MoCo (initial_logit) with a gradient, statistics computed: each row's
  // positive-key coefficient scale w_r (softmax of the positive key - 1).
  at::Tensor positive_coef;
};

// The statistics and the gradients `spec` asks for, on the route
// choose_contrastive_route picks. Instantiated for float, double, Half and BFloat16.
template <typename T>
ContrastiveResult<T> contrastive_passes(const ContrastiveSpec<T>& spec, c10::Device device, cudaStream_t stream);

// ---- Between contrastive_passes and the routes --------------------------------------

// The per-row terms of a gradient pass. G holds kGScale * w / max|w|
// (contrastive_gemm_rows.cuh); the fp32 products are multiplied by
// product_scale = scale * max|w| / kGScale at the end, on the device.
struct PassWeights {
  at::Tensor weight_in;      // the given weights / max|w| (undefined: 1 where the row counts)
  at::Tensor weight;         // each anchor's w / max|w| (written by the merge where the statistics are formed)
  at::Tensor inv_count;      // 1 / |P(r)| (likewise)
  at::Tensor product_scale;  // a 0-dim tensor
};

// Merges the statistics partials ([split][row] of rows r0 .. r0 + c) of either
// route into `out` (and the weights' per-row terms).
// anchor_terms: where to write the fused gradient pass's record of each row
// (FusedAnchorTerms), or null.
template <typename T>
void merge_row_stats(const ContrastiveSpec<T>& spec, ContrastiveResult<T>& out, const PassWeights& w, int64_t r0,
                     int64_t c, const at::Tensor& part_values, const at::Tensor& part_counts, int64_t splits,
                     cudaStream_t stream, float* anchor_terms = nullptr);

// The routes: `out` arrives with its statistics allocated; each route
// allocates the gradients it writes. The fused route serves the dtypes of
// fused_route_dtype and rows of at most 512 bytes (fused_route_max_features).
template <typename T>
constexpr bool fused_route_dtype() {
  return std::is_same_v<T, c10::Half> || std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, float>;
}
template <typename T>
constexpr int64_t fused_route_max_features() {
  return 512 / sizeof(T);  // bf16/fp16: 256; fp32 (TF32): 128
}
template <typename T>
void fused_passes(const ContrastiveSpec<T>& spec, const PassWeights& w, ContrastiveResult<T>& out,
                  c10::Device device, cudaStream_t stream);
template <typename T>
void gemm_passes(const ContrastiveSpec<T>& spec, const PassWeights& w, ContrastiveResult<T>& out,
                 c10::Device device, cudaStream_t stream);

}  // namespace ssl_ops::cuda
