#pragma once
// Argument validation for the symmetric in-batch InfoNCE op, shared by its
// kernels.
//
// Note [Symmetric InfoNCE]: query rows q (B, D) against key rows k (B, D),
// as given (the caller normalises), S = scale q k^T, the positive of row i
// being column i in both directions (CLIP's ClipLoss, MoCo v3 symmetric):
//   r_i = logsumexp_j S_ij (query i against every key),
//   c_j = logsumexp_i S_ij (key j against every query),
//   total = sum_i (r_i - S_ii) + (c_i - S_ii),   loss = total / 2B (mean) or total / 2 (sum).
// With f = 1 / 2B or 1 / 2 and P_ij = exp(S_ij - r_i), Q_ij = exp(S_ij - c_j),
//   d loss / d S_ij = f (P_ij + Q_ij - 2 [i == j]) = f G_ij,
//   d q = f scale G k,   d k = f scale G^T q,   d scale = f sum_ij G_ij (q_i . k_j).
// Both directions come from one S: its rows give r, its columns c, one chunk
// of rows at a time (the columns' log-sum-exps merged over chunks with
// running maxima, so no bound on the logits is assumed: CLIP's scale reaches
// 100). GEMMs of B^2 D multiply-adds: one for S, then per chunk S again and
// two for d q and d k: 4 in all (3 when one chunk holds S: it is kept),
// where two asymmetric calls take 6. Memory O(c B + B D).
#include <ATen/core/Tensor.h>

namespace ssl_ops {

// Throws unless query and key are non-empty floating (B, D) matrices of one
// shape, dtype and device, scale a one-element floating tensor on their
// device, and reduction 1 (mean) or 2 (sum): the gradient formed in the
// forward is the whole backward only for a scalar loss.
void check_clip_args(const at::Tensor& query, const at::Tensor& key, const at::Tensor& scale, int64_t reduction);

}  // namespace ssl_ops
