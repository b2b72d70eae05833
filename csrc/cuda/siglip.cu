// SigLIP's pairwise sigmoid loss, CUDA: Note [SigLIP loss] (csrc/siglip_check.h)
// on the contrastive GEMM route's pattern (contrastive_gemm.cu): chunks of
// image rows (csrc/siglip_chunks.h), each chunk's similarities from cuBLAS,
// then one fused row kernel (siglip_rows_kernel) that reads each similarity
// once and writes G over it, with the partial sums of the loss, g * s and g,
// then two more GEMMs for the feature gradients. Chunks of 2^25 similarities
// (128 MB in fp32; Note [Chunk budget]). fp16/bf16 features go into the GEMMs
// as they are (tensor cores, fp32 accumulation: gemm_acc.h), S comes out in
// fp32, and the row kernel writes G in the features' dtype times 2^14
// (kHalfGScale) for the two feature-gradient GEMMs: no fp32 copy of the
// features, and each GEMM at the tensor cores' half rate instead of SGEMM's.
//
// Counts per pair: 4 bytes read and (with a gradient) 4 written, one exp, one
// log1p, one division. Resources (ptxas -v, sm_90, nvcc 13.0, 2026-11-28): 32
// registers for float (48 for double), 32 bytes of shared memory, no spills:
// 8 blocks of 256 threads fit per multiprocessor. Blocks: rows x column splits, about a full wave of 8
// blocks per multiprocessor, at least 1024 columns per split (as the
// contrastive row kernels).
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <torch/library.h>

#include <algorithm>

#include "../siglip_check.h"
#include "../siglip_chunks.h"
#include "compat.cuh"
#include "acc_type.cuh"
#include "block_reduce.cuh"
#include "gemm_acc.h"
#include "launch_limits.h"

namespace ssl_ops::cuda {
namespace {

constexpr int64_t kSiglipChunkElements = int64_t(1) << 25;

template <typename A, typename G>
struct SiglipRowParams {
  A* s;                       // rows x cols: the similarities in, and G out (with a gradient) when g is null
  G* g;                       // rows x cols: G times g_scale in the features' dtype, or null
  int64_t rows, cols, cols_per_split;
  int64_t positive_diagonal;  // row r's positive is column r + positive_diagonal
  const A* scale;             // device scalars (no host sync)
  const A* bias;              // or null
  bool grad;
  A g_scale;                  // with g: kHalfGScale
  A* parts;                   // [3][split][row]: sums of the loss, g * s and g
};

// t = -label * logit, e = exp(-|t|): loss = max(t, 0) + log1p(e),
// g = -label * sigmoid(t) with sigmoid(t) = (t >= 0 ? 1 : e) / (1 + e).
template <typename A, typename G>
__global__ void __launch_bounds__(kBlockReduceThreads) siglip_rows_kernel(SiglipRowParams<A, G> p) {
  __shared__ A smem[kBlockReduceThreads / 32];
  const int64_t row = blockIdx.x, split = blockIdx.y;
  const int64_t c0 = split * p.cols_per_split;
  const int64_t c1 = c0 + p.cols_per_split < p.cols ? c0 + p.cols_per_split : p.cols;
  A* s = p.s + row * p.cols;
  const A scale = *p.scale, bias = p.bias ? *p.bias : A(0);
  const int64_t positive = row + p.positive_diagonal;
  A loss = 0, grad_scale = 0, grad_bias = 0;
  for (int64_t c = c0 + threadIdx.x; c < c1; c += kBlockReduceThreads) {
    const A sim = s[c];
    const A logit = scale * sim + bias;
    const bool is_positive = c == positive;
    const A t = is_positive ? -logit : logit;
    const A e = device_exp(t < A(0) ? t : -t);
    loss += (t > A(0) ? t : A(0)) + log1p(e);
    if (p.grad) {
      const A sigmoid = (t >= A(0) ? A(1) : e) / (A(1) + e);
      const A g = is_positive ? -sigmoid : sigmoid;
      grad_scale += g * sim;
      grad_bias += g;
      if (p.g) {
        p.g[row * p.cols + c] = static_cast<G>(g * p.g_scale);
      } else {
        s[c] = g;  // after this thread's read of s[c]
      }
    }
  }
  loss = block_reduce(loss, smem, false);
  if (p.grad) {
    grad_scale = block_reduce(grad_scale, smem, false);
    grad_bias = block_reduce(grad_bias, smem, false);
  }
  if (threadIdx.x == 0) {
    const int64_t splits = gridDim.y, at = split * p.rows + row;
    p.parts[at] = loss;
    p.parts[splits * p.rows + at] = grad_scale;
    p.parts[2 * splits * p.rows + at] = grad_bias;
  }
}

SiglipChunkSums fused_chunk(const at::Tensor& s_const, int64_t positive_diagonal, const at::Tensor& scale,
                            const at::Tensor& bias, bool compute_grad, const at::Tensor& g_half) {
  at::Tensor s = s_const;  // the chunk's own buffer: G is written over it
  const int64_t rows = s.size(0), cols = s.size(1);
  const int64_t wanted_blocks = 8 * int64_t(multiprocessor_count(s.device()));
  const int64_t splits = std::clamp<int64_t>((wanted_blocks + rows - 1) / rows, 1, std::max<int64_t>((cols + 1023) / 1024, 1));
  const int64_t cols_per_split = std::max<int64_t>((cols + splits - 1) / splits, 1);
  TORCH_CHECK(splits <= 65535 && rows <= std::numeric_limits<int32_t>::max(),
              ssl_ops::message("siglip_loss on CUDA: a chunk of ", rows, " rows in ", splits,
                               " column splits exceeds the grid (lower SSL_OPS_SIGLIP_CHUNK_ELEMENTS)"));
  at::Tensor parts = at::empty({3, splits, rows}, s.options());
  const at::Tensor scale_acc = scale.contiguous();
  const at::Tensor bias_acc = bias.defined() ? bias.contiguous() : at::Tensor();
  const cudaStream_t stream = current_stream(s.device());
  const bool to_half = compute_grad && g_half.defined();
  auto launch = [&](auto* data, auto* g) {
    using A = std::remove_pointer_t<decltype(data)>;
    using G = std::remove_pointer_t<decltype(g)>;
    SiglipRowParams<A, G> p{data, g, rows, cols, cols_per_split, positive_diagonal, scale_acc.const_data_ptr<A>(),
                            bias_acc.defined() ? bias_acc.const_data_ptr<A>() : nullptr, compute_grad,
                            A(kHalfGScale), parts.data_ptr<A>()};
    launch_kernel(siglip_rows_kernel<A, G>, checked_grid("siglip_rows_kernel (chunk rows, splits)", rows, splits),
                  dim3(kBlockReduceThreads), 0, stream, p);
  };
  if (s.scalar_type() == at::kDouble) {
    launch(s.data_ptr<double>(), static_cast<double*>(nullptr));
  } else if (to_half && g_half.scalar_type() == at::kHalf) {
    launch(s.data_ptr<float>(), g_half.data_ptr<c10::Half>());
  } else if (to_half) {
    launch(s.data_ptr<float>(), g_half.data_ptr<c10::BFloat16>());
  } else {
    launch(s.data_ptr<float>(), static_cast<float*>(nullptr));
  }
  SiglipChunkSums out;
  out.loss = parts[0].sum(at::kDouble);
  if (!compute_grad) return out;
  out.grad_scale = parts[1].sum(at::kDouble);
  out.grad_bias = parts[2].sum(at::kDouble);
  out.g = to_half ? g_half : s;
  return out;
}

// The GEMMs of gemm_acc.h: fp16/bf16 operands with fp32 results.
void acc_mm(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) { mm_acc_out(out, a, b); }
void acc_addmm(at::Tensor& acc, const at::Tensor& a, const at::Tensor& b) { addmm_acc_(acc, a, b); }
constexpr ChunkGemms tensor_core_gemms{acc_mm, acc_addmm, /*half_operands=*/true};

SiglipOutputs siglip_loss(const at::Tensor& x, const at::Tensor& y, const at::Tensor& scale,
                          const std::optional<at::Tensor>& bias, int64_t positive_offset, bool compute_grad) {
  check_siglip_args(x, y, scale, bias, positive_offset);
  const DeviceGuard guard(x.device());
  const int64_t chunk = siglip_chunk_elements(kSiglipChunkElements);
  return siglip_loss_chunked(x, y, scale, bias, positive_offset, compute_grad, chunk, fused_chunk, tensor_core_gemms);
}

}  // namespace

SSL_OPS_CUDA_LIBRARY_IMPL(m) { m.impl("siglip_loss", &siglip_loss); }

}  // namespace ssl_ops::cuda
