#pragma once
// The GEMMs of the chunked pair losses (siglip_chunks.h, clip_chunks.h), as a
// backend provides them: out = a @ b and acc += a @ b with results in the
// accumulation type. With half_operands, fp16/bf16 features go in as they are
// (CUDA: tensor cores, fp32 accumulation) and the logits' gradient G comes
// back in the features' dtype times kHalfGScale; otherwise (the CPU) the
// features are widened to the accumulation type first.
#include <ATen/core/Tensor.h>

namespace ssl_ops {

struct ChunkGemms {
  void (*mm)(at::Tensor& out, const at::Tensor& a, const at::Tensor& b);
  void (*addmm)(at::Tensor& acc, const at::Tensor& a, const at::Tensor& b);
  bool half_operands;
};

// G times 2^14 in fp16/bf16: exact, divided out at the end; fp16 keeps
// |g| down to 2^-38 normal where unscaled it would go subnormal at 2^-14.
constexpr double kHalfGScale = 16384.0;

inline bool gemms_take_half(const ChunkGemms& gemms, const at::Tensor& features) {
  return gemms.half_operands && (features.scalar_type() == at::kHalf || features.scalar_type() == at::kBFloat16);
}

}  // namespace ssl_ops
