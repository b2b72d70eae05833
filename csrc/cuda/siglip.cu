// SigLIP's pairwise sigmoid loss, CUDA: Note [SigLIP loss] (csrc/siglip_check.h)
// computed by csrc/siglip_chunks.h on the device: each chunk's similarities
// from cuBLAS (fp32 operands: half features are widened first), then ATen's
// elementwise kernels for the loss and G, then two more GEMMs. Chunks of 2^25
// similarities (128 MB in fp32; Note [Chunk budget] in contrastive_gemm.h).
// Not yet the contrastive GEMM route's shape: there one fused row kernel reads
// each chunk once, here ATen's kernels pass over it about six times (logits,
// softplus, its sum, sigmoid, G * S and its sum), and half operands do not
// reach the tensor cores. Correct and O(N D) in memory; its speed needs a GPU
// to measure.
#include <torch/library.h>

#include "../siglip_check.h"
#include "../siglip_chunks.h"
#include "compat.cuh"

namespace ssl_ops::cuda {
namespace {

constexpr int64_t kSiglipChunkElements = int64_t(1) << 25;

SiglipOutputs siglip_loss(const at::Tensor& x, const at::Tensor& y, const at::Tensor& scale,
                          const std::optional<at::Tensor>& bias, int64_t positive_offset, bool compute_grad) {
  check_siglip_args(x, y, scale, bias, positive_offset);
  const DeviceGuard guard(x.device());
  const int64_t chunk = siglip_chunk_elements(kSiglipChunkElements);
  return siglip_loss_chunked(x, y, scale, bias, positive_offset, compute_grad, chunk, siglip_chunk_aten);
}

}  // namespace

SSL_OPS_CUDA_LIBRARY_IMPL(m) { m.impl("siglip_loss", &siglip_loss); }

}  // namespace ssl_ops::cuda
