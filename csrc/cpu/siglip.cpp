// SigLIP's pairwise sigmoid loss, CPU: Note [SigLIP loss] (csrc/siglip_check.h)
// computed by csrc/siglip_chunks.h, chunks of 2^20 similarities (4 MB in
// float32; up to four such buffers live at once), so N = 16384 images against
// 16384 texts add tens of MB where the logits alone are 1 GB.
// SSL_OPS_SIGLIP_CHUNK_ELEMENTS changes the budget (tests force many chunks).
#include <torch/library.h>

#include "../siglip_check.h"
#include "../siglip_chunks.h"

namespace ssl_ops::cpu {
namespace {

constexpr int64_t kSiglipChunkElements = int64_t(1) << 20;

SiglipOutputs siglip_loss(const at::Tensor& x, const at::Tensor& y, const at::Tensor& scale,
                          const std::optional<at::Tensor>& bias, int64_t positive_offset, bool compute_grad) {
  check_siglip_args(x, y, scale, bias, positive_offset);
  const int64_t chunk = siglip_chunk_elements(kSiglipChunkElements);
  return siglip_loss_chunked(x, y, scale, bias, positive_offset, compute_grad, chunk);
}

}  // namespace

TORCH_LIBRARY_IMPL(ssl_ops, CPU, m) { m.impl("siglip_loss", &siglip_loss); }

}  // namespace ssl_ops::cpu
