#pragma once
// Argument validation and numeric rules shared by the CPU and CUDA
// contrastive-loss kernels, and the algorithm they share.
//
// Note [Contrastive algorithm]: anchors Q (rows a, normalised to q_hat) against
// candidates K (rows k_hat); logits S = scale * q_hat k_hat^T, never stored whole.
//   loss_a = logsumexp_k S_ak (self excluded) - mean_{p in P(a)} S_ap
//   G_ak   = w_a (softmax_ak - 1[k in P(a)] / |P(a)|),   w_a = d(total) / d(loss_a)
// or, with the positives inside the log (PositiveReduction::kLogSumExp),
//   loss_a = logsumexp_k S_ak - logsumexp_{p in P(a)} S_ap
//   G_ak   = w_a (softmax_ak - 1[k in P(a)] exp(S_ak - lse_pos_a)),
// lse_pos_a from the same pass as lse_a (its exps are the candidates' own). A
// row with one positive takes the mean form's arithmetic in both (its
// log-sum-exp is that logit, exactly), so two views give bit-equal results.
//   d q_hat = scale G k_hat,   d k_hat = scale G^T q_hat,   then the normalisation.
// Symmetric (NT-Xent, SupCon): Q = the anchor rows of z, K = z, P by labels, so
// d z_hat = scale (G + G^T) z_hat. Asymmetric (InfoNCE): Q = queries, K = keys
// or the queue; the positive is key a + offset, or MoCo's separate positive key
// (its logit the first term of each row). Both backends walk the anchors in
// blocks, form S a block at a time with a GEMM, reduce each row's
// log-sum-exp (shifted by the logit bound |scale| where rows are unit vectors,
// logit_bound_usable, else by the running max) and, with a gradient, turn the
// block into G and multiply it back. They differ in where the block lives:
// - CPU (csrc/cpu/contrastive_*.cpp): 128-row tiles that stay in cache; the
//   exps run in the same loop as the product's consumer, S being symmetric is
//   used to form each tile pair once. The asymmetric kernel forms panels of
//   rows against every candidate where they fit (G in place, no tile formed
//   twice) and falls back to tiles with the query-only gradient accumulated in
//   the log-sum-exp pass itself (online softmax).
// - CUDA GEMM route (csrc/cuda/contrastive_gemm.cu): chunks of c anchor rows
//   against every candidate, S_c stored in fp32 by cuBLAS and read back by row
//   kernels; log-sum-exp before G within a chunk, so no online
//   rescaling; the symmetry is not used (cuBLAS at tensor-core speed does the
//   third product faster than a hand-written kernel would save it).
// - CUDA fused route (csrc/cuda/contrastive_fused_*.cuh): S tiles in
//   registers on tensor cores, never stored; the symmetric gradient takes both
//   terms of each pair from one S.
#include <ATen/core/Tensor.h>

#include <cmath>
#include <optional>

namespace ssl_ops {

// reduction argument of the contrastive ops.
enum class Reduction : int64_t { None = 0, Mean = 1, Sum = 2 };

// positives argument of the symmetric op: how a row's positive logits enter
// its loss. kExcluded: not at all, neither in the numerator nor among the
// candidates (DCL's negative term: loss_a = logsumexp over a's negatives).
enum class PositiveReduction : int64_t { kMean = 0, kLogSumExp = 1, kExcluded = 2 };

// Throws unless z is a non-empty floating (M, D) matrix, labels an int64 vector
// of length M on z's device, 0 <= anchor_begin < anchor_end <= M, and the
// scalars valid.
void check_sym_contrastive_args(
    const at::Tensor& z, const at::Tensor& labels, int64_t anchor_begin, int64_t anchor_end, double scale,
    double eps, int64_t reduction, int64_t positives);

// The backward op's saved lse_positive: an (M,) tensor of the loss dtype with
// the log-sum-exp form, ignored (may be absent) with the mean form.
void check_sym_lse_positive(const at::Tensor& z, const std::optional<at::Tensor>& lse_positive,
                            int64_t positives);

// Throws unless query (M, D), key (L, D) and positive_key (M, D), when given,
// are non-empty floating matrices of one dtype and device; without
// positive_key the positive of query i is key i + positive_offset, so
// 0 <= positive_offset and M + positive_offset <= L; with it the offset is 0.
void check_asym_contrastive_args(
    const at::Tensor& query, const at::Tensor& key, const std::optional<at::Tensor>& positive_key,
    int64_t positive_offset, double scale, double eps, int64_t reduction);

// The type losses and log-sum-exps are returned in: float64 for float64
// inputs (so gradcheck runs in double), float32 otherwise.
inline at::ScalarType loss_dtype(at::ScalarType input) {
  return input == at::kDouble ? at::kDouble : at::kFloat;
}

// Unit rows bound every logit by |scale|. Shifting exp by that bound instead
// of a running max saves a pass over each tile (and lets a symmetric tile feed
// its row and column sums from one exp), as long as exp(S - bound) >=
// exp(-2 |scale|) stays far from underflow: float |scale| <= 30 (temperature
// >= 1/30), double <= 300. Otherwise a row whose logits all sit near -|scale|
// would sum to 0.
// C: the accumulation type (float, or double for float64 inputs).
template <typename C>
inline bool logit_bound_usable(double scale, bool normalize) {
  return normalize && 2 * std::abs(scale) <= (sizeof(C) == 4 ? 60.0 : 600.0);
}

// The elements of S a backend forms per step of anchor rows against every
// candidate (the CUDA GEMM route's chunk, the CPU asymmetric kernel's panel):
// default_elements, or SSL_OPS_CONTRASTIVE_CHUNK_ELEMENTS when set (tests force
// it small for many chunks; a positive integer, else an error naming it).
int64_t contrastive_chunk_elements(int64_t default_elements);

}  // namespace ssl_ops
