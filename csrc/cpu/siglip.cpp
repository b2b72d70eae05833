// SigLIP's pairwise sigmoid loss, CPU: Note [SigLIP loss] (csrc/siglip_check.h)
// in chunks of image rows (csrc/siglip_chunks.h: the GEMMs), with the
// elementwise work in one fused, vectorised pass per chunk row (fused_rows):
// one exp, one log1p and one division per pair, G written over the
// similarities. ATen's composition of the same pass (the first version) read
// and wrote each chunk about six times and left the loss 2-20% behind
// torch.compile of the eager form (benchmarks/RESULTS.md, session 6).
// Chunks of 2^24 similarities (64 MB in float32), where the logits of
// N = 16384 images against 16384 texts are 1 GB: N = 8192, D = 768 forward+
// backward took 1.65 s in 2^20-element chunks (128 rows starve the GEMMs) and
// 1.26 s in 2^24 on 2 cores (2026-12-08).
// SSL_OPS_SIGLIP_CHUNK_ELEMENTS changes the budget (tests force many chunks).
#include <ATen/Parallel.h>
#include <ATen/ops/scalar_tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../siglip_check.h"
#include "../siglip_chunks.h"
#include "contrastive_tiles.h"

namespace ssl_ops::cpu {
namespace {

constexpr int64_t kSiglipChunkElements = int64_t(1) << 24;
constexpr int64_t kSumBlock = 512;  // float partial sums, added to double every block

// log(1 + e) for e in [0, 1], branch-free so loops over it vectorise:
// 2 atanh(w) with w = e / (2 + e) <= 1/3, its series to w^15 (the next term is
// 1e-9 of the result).
SSL_OPS_ALWAYS_INLINE inline float log1p_unit(float e) {
  const float w = e / (2.0f + e);
  const float w2 = w * w;
  float p = 1.0f / 15;
  p = std::fma(p, w2, 1.0f / 13);
  p = std::fma(p, w2, 1.0f / 11);
  p = std::fma(p, w2, 1.0f / 9);
  p = std::fma(p, w2, 1.0f / 7);
  p = std::fma(p, w2, 1.0f / 5);
  p = std::fma(p, w2, 1.0f / 3);
  p = std::fma(p, w2, 1.0f);
  return 2.0f * w * p;
}
inline double log1p_unit(double e) { return std::log1p(e); }

// Row i of the chunk: t = -label * logit with e = exp(-|t|),
//   loss = max(t, 0) + log(1 + e)             (softplus(t))
//   g = -label * sigmoid(t),  sigmoid(t) = (t >= 0 ? 1 : e) / (1 + e)
// stable for any |logit|; g overwrites the similarity after its use in g * s.
template <typename C, bool kGrad>
SSL_OPS_ALWAYS_INLINE inline void fused_rows(C* s, int64_t rows, int64_t cols, int64_t positive_diagonal, C scale,
                                             C bias, double* sums /* rows x 3 */) {
  for (int64_t i = 0; i < rows; ++i) {
    C* __restrict__ row = s + i * cols;
    const int64_t positive = i + positive_diagonal;
    double loss = 0, grad_scale = 0, grad_bias = 0;
    for (int64_t k0 = 0; k0 < cols; k0 += kSumBlock) {
      const int64_t k1 = std::min(cols, k0 + kSumBlock);
      C block_loss = 0, block_scale = 0, block_bias = 0;
#pragma omp simd reduction(+ : block_loss, block_scale, block_bias)
      for (int64_t k = k0; k < k1; ++k) {
        const C sim = row[k];
        const C logit = std::fma(sim, scale, bias);
        const bool is_positive = k == positive;
        const C t = is_positive ? -logit : logit;
        const C magnitude = t < 0 ? -t : t;
        const C e = tile_exp(-magnitude);
        block_loss += (t > 0 ? t : C(0)) + log1p_unit(e);
        if constexpr (kGrad) {
          const C sigmoid = (t >= 0 ? C(1) : e) / (C(1) + e);
          const C g = is_positive ? -sigmoid : sigmoid;
          block_scale += g * sim;
          block_bias += g;
          row[k] = g;
        }
      }
      loss += block_loss;
      grad_scale += block_scale;
      grad_bias += block_bias;
    }
    sums[3 * i] = loss;
    sums[3 * i + 1] = grad_scale;
    sums[3 * i + 2] = grad_bias;
  }
}

template <typename C, bool kGrad>
SSL_OPS_TARGET_AVX2 void fused_rows_avx2(C* s, int64_t rows, int64_t cols, int64_t positive_diagonal, C scale,
                                         C bias, double* sums) {
  fused_rows<C, kGrad>(s, rows, cols, positive_diagonal, scale, bias, sums);
}

template <typename C, bool kGrad>
void run_fused_rows(C* s, int64_t rows, int64_t cols, int64_t positive_diagonal, C scale, C bias, double* sums) {
  const bool avx2 = cpu_has_avx2_fma();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    C* block = s + begin * cols;
    double* block_sums = sums + 3 * begin;
    const int64_t diagonal = positive_diagonal + begin;  // row 0 of the block is the chunk's row `begin`
    if (avx2) {
      fused_rows_avx2<C, kGrad>(block, end - begin, cols, diagonal, scale, bias, block_sums);
    } else {
      fused_rows<C, kGrad>(block, end - begin, cols, diagonal, scale, bias, block_sums);
    }
  });
}

// g_half is never asked for: the CPU's GEMMs take widened features (cpu_gemms).
SiglipChunkSums fused_chunk(const at::Tensor& s_const, int64_t positive_diagonal, const at::Tensor& scale,
                            const at::Tensor& bias, bool compute_grad, const at::Tensor& /*g_half*/) {
  at::Tensor s = s_const;  // the chunk's own buffer: G is written over it
  const int64_t rows = s.size(0), cols = s.size(1);
  std::vector<double> sums(3 * rows);
  const double scale_value = scale.item<double>(), bias_value = bias.defined() ? bias.item<double>() : 0.0;
  auto run = [&](auto* data) {
    using C = std::remove_pointer_t<decltype(data)>;
    if (compute_grad) {
      run_fused_rows<C, true>(data, rows, cols, positive_diagonal, C(scale_value), C(bias_value), sums.data());
    } else {
      run_fused_rows<C, false>(data, rows, cols, positive_diagonal, C(scale_value), C(bias_value), sums.data());
    }
  };
  if (s.scalar_type() == at::kDouble) {
    run(s.data_ptr<double>());
  } else {
    run(s.data_ptr<float>());
  }
  double total[3] = {0, 0, 0};
  for (int64_t i = 0; i < rows; ++i) {
    for (int j = 0; j < 3; ++j) total[j] += sums[3 * i + j];
  }
  const auto opts = s.options().dtype(at::kDouble);
  SiglipChunkSums out;
  out.loss = at::scalar_tensor(total[0], opts);
  if (!compute_grad) return out;
  out.grad_scale = at::scalar_tensor(total[1], opts);
  out.grad_bias = at::scalar_tensor(total[2], opts);
  out.g = s;
  return out;
}

// The CPU's GEMMs on features widened to the accumulation type.
void cpu_mm(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) { at::mm_out(out, a, b); }
void cpu_addmm(at::Tensor& acc, const at::Tensor& a, const at::Tensor& b) { acc.addmm_(a, b); }
constexpr ChunkGemms cpu_gemms{cpu_mm, cpu_addmm, /*half_operands=*/false};

SiglipOutputs siglip_loss(const at::Tensor& x, const at::Tensor& y, const at::Tensor& scale,
                          const std::optional<at::Tensor>& bias, int64_t positive_offset, bool compute_grad) {
  check_siglip_args(x, y, scale, bias, positive_offset);
  const int64_t chunk = siglip_chunk_elements(kSiglipChunkElements);
  return siglip_loss_chunked(x, y, scale, bias, positive_offset, compute_grad, chunk, fused_chunk, cpu_gemms);
}

}  // namespace

TORCH_LIBRARY_IMPL(ssl_ops, CPU, m) { m.impl("siglip_loss", &siglip_loss); }

}  // namespace ssl_ops::cpu
