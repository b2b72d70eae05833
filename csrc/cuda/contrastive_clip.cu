// The symmetric in-batch InfoNCE, CUDA: Note [Symmetric InfoNCE]
// (csrc/clip_check.h) on the GEMM route's pattern: chunks of query rows
// (csrc/clip_chunks.h) of 2^25 similarities (128 MB in fp32; Note [Chunk
// budget]), each chunk's S from cuBLAS (fp16/bf16 features as they are:
// tensor cores, fp32 accumulation, gemm_acc.h), then
// - clip_row_stats_kernel: a block per row, its maximum then its sum of exps;
// - clip_column_stats_kernel: a thread per column of a slice of the chunk's
//   rows, one online pass (maximum and rescaled sum), partials per slice;
// - clip_column_merge_kernel: the slices merged into the running column
//   statistics, so the columns' log-sum-exps cover every chunk;
// then per chunk clip_coefficients_kernel writes G = P + Q - 2 [i == j] (over
// S, or in the features' dtype times kHalfGScale for the two gradient GEMMs)
// and its partial sums of G s for d scale.
// Per similarity: the statistics read it three times (two exps), the
// coefficients once more and write it once (two exps). The scale is read on
// the device: no host sync. Resources (ptxas -v, sm_90, nvcc 13.0,
// 2026-12-08): 27-32 registers for float, up to 48 for double, at most 64
// bytes of shared memory, no spills.
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <torch/library.h>

#include <algorithm>

#include "../clip_check.h"
#include "../clip_chunks.h"
#include "../contrastive_check.h"
#include "acc_type.cuh"
#include "block_reduce.cuh"
#include "compat.cuh"
#include "gemm_acc.h"
#include "launch_limits.h"

namespace ssl_ops::cuda {
namespace {

constexpr int64_t kClipChunkElements = int64_t(1) << 25;
constexpr int64_t kMinRowsPerSlice = 32;  // column pass: rows each thread walks, at least

template <typename A>
__global__ void __launch_bounds__(kBlockReduceThreads)
    clip_row_stats_kernel(const A* s, int64_t cols, int64_t r0, const A* scale_ptr, A* row_lse, A* diag) {
  __shared__ A smem[kBlockReduceThreads / 32];
  const int64_t row = blockIdx.x;
  const A* s_row = s + row * cols;
  const A scale = *scale_ptr;
  A max = negative_infinity<A>();
  for (int64_t j = threadIdx.x; j < cols; j += kBlockReduceThreads) max = fmax(max, scale * s_row[j]);
  max = block_reduce(max, smem, true);
  A sum = 0;
  for (int64_t j = threadIdx.x; j < cols; j += kBlockReduceThreads) sum += device_exp(scale * s_row[j] - max);
  sum = block_reduce(sum, smem, false);
  if (threadIdx.x == 0) {
    row_lse[row] = max + log(sum);
    diag[row] = s_row[r0 + row];
  }
}

// Slice blockIdx.y of the chunk's rows, column j: the maximum of scale s and
// the sum of exp(scale s - maximum), online (one read of each similarity).
template <typename A>
__global__ void __launch_bounds__(kBlockReduceThreads)
    clip_column_stats_kernel(const A* s, int64_t rows, int64_t cols, int64_t rows_per_slice, const A* scale_ptr,
                             A* part_max, A* part_sum) {
  const int64_t j = blockIdx.x * int64_t(kBlockReduceThreads) + threadIdx.x;
  if (j >= cols) return;
  const int64_t i0 = blockIdx.y * rows_per_slice;
  const int64_t i1 = i0 + rows_per_slice < rows ? i0 + rows_per_slice : rows;
  const A scale = *scale_ptr;
  A max = negative_infinity<A>(), sum = 0;
  for (int64_t i = i0; i < i1; ++i) {
    const A logit = scale * s[i * cols + j];
    if (logit > max) {
      sum = sum * device_exp(max - logit) + A(1);
      max = logit;
    } else {
      sum += device_exp(logit - max);
    }
  }
  part_max[blockIdx.y * cols + j] = max;
  part_sum[blockIdx.y * cols + j] = sum;
}

// Column j: the running (maximum, sum) merged with the slices' partials;
// `first` starts them.
template <typename A>
__global__ void __launch_bounds__(kBlockReduceThreads)
    clip_column_merge_kernel(const A* part_max, const A* part_sum, int64_t slices, int64_t cols, bool first,
                             A* col_max, A* col_sum) {
  const int64_t j = blockIdx.x * int64_t(kBlockReduceThreads) + threadIdx.x;
  if (j >= cols) return;
  A max = first ? negative_infinity<A>() : col_max[j];
  for (int64_t t = 0; t < slices; ++t) max = fmax(max, part_max[t * cols + j]);
  A sum = first ? A(0) : col_sum[j] * device_exp(col_max[j] - max);
  for (int64_t t = 0; t < slices; ++t) sum += part_sum[t * cols + j] * device_exp(part_max[t * cols + j] - max);
  col_max[j] = max;
  col_sum[j] = sum;
}

template <typename A, typename G>
struct ClipCoefficientParams {
  A* s;         // rows x cols: the similarities in, G out when g is null
  G* g;         // rows x cols: G times g_scale in the features' dtype, or null
  int64_t cols, cols_per_split, r0;
  const A* scale;
  const A* row_lse;  // the chunk's rows
  const A* col_lse;  // every column
  A g_scale;
  A* parts;  // [split][row]: sums of G s
};

template <typename A, typename G>
__global__ void __launch_bounds__(kBlockReduceThreads) clip_coefficients_kernel(ClipCoefficientParams<A, G> p) {
  __shared__ A smem[kBlockReduceThreads / 32];
  const int64_t row = blockIdx.x, split = blockIdx.y;
  const int64_t c0 = split * p.cols_per_split;
  const int64_t c1 = c0 + p.cols_per_split < p.cols ? c0 + p.cols_per_split : p.cols;
  A* s = p.s + row * p.cols;
  const A scale = *p.scale, r = p.row_lse[row];
  const int64_t positive = p.r0 + row;
  A dot = 0;
  for (int64_t j = c0 + threadIdx.x; j < c1; j += kBlockReduceThreads) {
    const A sim = s[j];
    const A logit = scale * sim;
    const A g = device_exp(logit - r) + device_exp(logit - p.col_lse[j]) - (j == positive ? A(2) : A(0));
    dot += g * sim;
    if (p.g) {
      p.g[row * p.cols + j] = static_cast<G>(g * p.g_scale);
    } else {
      s[j] = g;  // after this thread's read of s[j]
    }
  }
  dot = block_reduce(dot, smem, false);
  if (threadIdx.x == 0) p.parts[split * gridDim.x + row] = dot;
}

template <typename A>
const A* data_of(const at::Tensor& t) {
  return t.const_data_ptr<A>();
}

struct CudaClipPasses {
  void stats(const at::Tensor& s, int64_t r0, const at::Tensor& scale, at::Tensor row_lse, at::Tensor diag,
                    at::Tensor& col_max, at::Tensor& col_sum) {
    const int64_t rows = s.size(0), cols = s.size(1);
    const int64_t wanted_blocks = 8 * int64_t(multiprocessor_count(s.device()));
    const int64_t column_blocks = (cols + kBlockReduceThreads - 1) / kBlockReduceThreads;
    const int64_t slices = std::clamp<int64_t>((wanted_blocks + column_blocks - 1) / column_blocks, 1,
                                               std::max<int64_t>(rows / kMinRowsPerSlice, 1));
    const int64_t rows_per_slice = (rows + slices - 1) / slices;
    at::Tensor parts = at::empty({2, slices, cols}, s.options());
    const cudaStream_t stream = current_stream(s.device());
    auto launch = [&](auto* tag) {
      using A = std::remove_pointer_t<decltype(tag)>;
      const A* scale_ptr = data_of<A>(scale);
      launch_kernel(clip_row_stats_kernel<A>, checked_grid("clip_row_stats_kernel (chunk rows)", rows),
                    dim3(kBlockReduceThreads), 0, stream, data_of<A>(s), cols, r0, scale_ptr,
                    row_lse.data_ptr<A>(), diag.data_ptr<A>());
      launch_kernel(clip_column_stats_kernel<A>,
                    checked_grid("clip_column_stats_kernel (column blocks, row slices)", column_blocks, slices),
                    dim3(kBlockReduceThreads), 0, stream, data_of<A>(s), rows, cols, rows_per_slice, scale_ptr,
                    parts[0].data_ptr<A>(), parts[1].data_ptr<A>());
      launch_kernel(clip_column_merge_kernel<A>, checked_grid("clip_column_merge_kernel (column blocks)", column_blocks),
                    dim3(kBlockReduceThreads), 0, stream, data_of<A>(parts[0]), data_of<A>(parts[1]), slices, cols,
                    r0 == 0, col_max.data_ptr<A>(), col_sum.data_ptr<A>());
    };
    if (s.scalar_type() == at::kDouble) {
      launch(static_cast<double*>(nullptr));
    } else {
      launch(static_cast<float*>(nullptr));
    }
  }

  std::pair<at::Tensor, at::Tensor> coefficients(const at::Tensor& s_const, int64_t r0, const at::Tensor& scale,
                                                 const at::Tensor& row_lse, const at::Tensor& col_lse,
                                                 const at::Tensor& g_half) {
    at::Tensor s = s_const;  // the chunk's own buffer: G is written over it
    const int64_t rows = s.size(0), cols = s.size(1);
    const int64_t wanted_blocks = 8 * int64_t(multiprocessor_count(s.device()));
    const int64_t splits =
        std::clamp<int64_t>((wanted_blocks + rows - 1) / rows, 1, std::max<int64_t>((cols + 1023) / 1024, 1));
    const int64_t cols_per_split = (cols + splits - 1) / splits;
    at::Tensor parts = at::empty({splits, rows}, s.options());
    const cudaStream_t stream = current_stream(s.device());
    auto launch = [&](auto* data, auto* g) {
      using A = std::remove_pointer_t<decltype(data)>;
      using G = std::remove_pointer_t<decltype(g)>;
      ClipCoefficientParams<A, G> p{data, g, cols, cols_per_split, r0, data_of<A>(scale), data_of<A>(row_lse),
                                    data_of<A>(col_lse), A(kHalfGScale), parts.data_ptr<A>()};
      launch_kernel(clip_coefficients_kernel<A, G>,
                    checked_grid("clip_coefficients_kernel (chunk rows, splits)", rows, splits),
                    dim3(kBlockReduceThreads), 0, stream, p);
    };
    if (s.scalar_type() == at::kDouble) {
      launch(s.data_ptr<double>(), static_cast<double*>(nullptr));
    } else if (g_half.defined() && g_half.scalar_type() == at::kHalf) {
      launch(s.data_ptr<float>(), g_half.data_ptr<c10::Half>());
    } else if (g_half.defined()) {
      launch(s.data_ptr<float>(), g_half.data_ptr<c10::BFloat16>());
    } else {
      launch(s.data_ptr<float>(), static_cast<float*>(nullptr));
    }
    return {g_half.defined() ? g_half : s, parts.sum(at::kDouble)};
  }
};

void acc_mm(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) { mm_acc_out(out, a, b); }
void acc_addmm(at::Tensor& acc, const at::Tensor& a, const at::Tensor& b) { addmm_acc_(acc, a, b); }
constexpr ChunkGemms tensor_core_gemms{acc_mm, acc_addmm, /*half_operands=*/true};

ClipOutputs contrastive_clip_loss(const at::Tensor& query, const at::Tensor& key, const at::Tensor& scale,
                                  int64_t reduction, bool compute_grad) {
  check_clip_args(query, key, scale, reduction);
  const DeviceGuard guard(query.device());
  const int64_t chunk = contrastive_chunk_elements(kClipChunkElements);
  CudaClipPasses passes;
  return clip_loss_chunked(query, key, scale, reduction, compute_grad, chunk, tensor_core_gemms, passes);
}

}  // namespace

SSL_OPS_CUDA_LIBRARY_IMPL(m) { m.impl("contrastive_clip_loss", &contrastive_clip_loss); }

}  // namespace ssl_ops::cuda
