#pragma once
// Argument validation for the SigLIP loss op, shared by its kernels.
//
// Note [SigLIP loss]: image rows x (N, D) against text rows y (M, D),
//   logit_ij = scale * x_i . y_j + bias,   label_ij = +1 if j == i + positive_offset else -1
//   loss = -(1 / N) sum_ij logsigmoid(label_ij logit_ij) = (1 / N) sum_ij softplus(-label_ij logit_ij)
// (open_clip's SigLipLoss: features as given, scale the multiplier). With
// g_ij = d loss / d logit_ij = -label_ij sigmoid(-label_ij logit_ij) / N:
//   d x = scale G y,  d y = scale G^T x,  d scale = sum_ij g_ij x_i . y_j,  d bias = sum_ij g_ij.
// positive_offset places this process's images among the texts of all
// processes (gathered), so the labels follow the global diagonal.
#include <ATen/core/Tensor.h>

#include <optional>

namespace ssl_ops {

// Throws unless x (N, D) and y (M, D) are non-empty floating matrices of one
// dtype and device, 0 <= positive_offset and N + positive_offset <= M, scale
// a one-element floating tensor on their device, and bias too when given.
void check_siglip_args(const at::Tensor& x, const at::Tensor& y, const at::Tensor& scale,
                       const std::optional<at::Tensor>& bias, int64_t positive_offset);

}  // namespace ssl_ops
