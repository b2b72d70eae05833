// The GEMM route of the contrastive losses on CUDA (Note [Contrastive routes]
// in contrastive_passes.cu): anchor rows in chunks of c, each chunk's similarities
//   S_c = Q_hat_c K_hat^T            (vendor GEMM, fp32 output: logits never rounded to 16 bits)
// read by the row kernels of contrastive_gemm_rows.cuh (log-sum-exp, positives,
// then the coefficients G_c in the input dtype), and the gradient as two more
// vendor GEMMs per chunk:
//   d Q_hat_c  = G_c K_hat           (fresh rows of the output)
//   d K_hat   += G_c^T Q_hat_c       (accumulated in fp32 over the chunks)
// No buffer is ever n x n: S_c and G_c hold c x n elements, with c chosen so
// that S_c stays within the chunk budget (contrastive_chunk_elements(), contrastive_check.h).
// The symmetric op passes Q_hat = the anchor rows of z_hat and K_hat = z_hat
// (d z_hat = d K_hat plus d Q_hat at the anchors: (G + G^T) z_hat); the
// asymmetric op passes the queries and the keys (or queue).
//
// The algorithm and how the CPU kernels differ: Note [Contrastive algorithm]
// in csrc/contrastive_check.h.
//
// Under the emulator (SSL_OPS_CUDA_EMU) the GEMMs are at::mm on the CPU with
// the same operand types: half operands widened exactly to fp32, fp32
// operands truncated to TF32 where torch allows TF32 for matmuls.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "../contrastive_check.h"
#include "../message.h"
#include "contrastive_gemm_rows.cuh"
#include "contrastive_passes.h"
#include "gemm_acc.h"
#include "launch_limits.h"

namespace ssl_ops::cuda {
namespace {

// Note [Chunk budget]: S_c holds at most this many elements (fp32: 128 MB by
// default). The first design took 2^23 (32 MB), so that the re-reads of S_c
// (two row kernels, and two GEMMs as G_c) would hit the 50 MB L2 of an H100/H200.
// Measured on an H200 (benchmarks/RESULTS.md, 2026-11-28), 2^25 was faster in
// 17 of 20 shapes and never slower by more than noise: NT-Xent 2N = 65536,
// D = 128, forward+backward 47.4 ms against 74.7 (bf16) and 112.9 against 137.8
// (fp32); MoCo 256 x 65536 level. At 2^23 a 65536-row problem is 512 chunks of
// 128 rows, whose GEMMs (M = 128) run far below the matmul rate and whose ~6
// launches each rival their GPU time; L2 hits do not make up for that. The
// d K_hat GEMM reads and writes the n x D fp32 accumulator once per chunk (8 n D
// bytes for 2 c n D FLOPs), another cost that falls with larger chunks. The GPU
// benchmark times 2^27 too ("big chunks"), to see whether the trend goes on.
// SSL_OPS_CONTRASTIVE_CHUNK_ELEMENTS changes it (tests force it small, for
// many chunks).
constexpr int64_t kDefaultChunkElements = int64_t(1) << 25;


inline int64_t ceil_div64(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

template <typename T>
void gemm_passes(const ContrastiveSpec<T>& spec, const PassWeights& w, ContrastiveResult<T>& out,
                 c10::Device device, cudaStream_t stream) {
  using A = acc_t<T>;
  const auto acc_opts = spec.q_hat.options().dtype(c10::CppTypeToScalarType<A>::value);
  const int64_t na = spec.q_hat.size(0), n = spec.k_hat.size(0);
  const bool stats = !spec.given_lse.defined();
  const bool grad = spec.grad_q || spec.grad_k;
  if (spec.grad_q) out.grad_q_hat = at::empty({na, spec.q_hat.size(1)}, acc_opts);
  if (spec.grad_k) out.grad_k_hat = at::zeros({n, spec.q_hat.size(1)}, acc_opts);  // accumulated over the chunks
  const int64_t rows_per_chunk =
      std::clamp<int64_t>(contrastive_chunk_elements(kDefaultChunkElements) / std::max<int64_t>(n, 1), 1, na);
  // Column splits: a full wave of blocks (8 per multiprocessor: the row kernels
  // use at most 52 registers and 128 bytes of shared memory), at least 1024
  // columns each.
  const int64_t wanted_blocks = 8 * int64_t(multiprocessor_count(device));
  const int64_t splits =
      std::clamp<int64_t>(ceil_div64(wanted_blocks, rows_per_chunk), 1, std::max<int64_t>(ceil_div64(n, 1024), 1));
  const int64_t cols_per_split = std::max<int64_t>(ceil_div64(n, splits), 1);
  TORCH_CHECK(splits <= 65535 && rows_per_chunk <= std::numeric_limits<int32_t>::max(),
              ssl_ops::message("contrastive loss on CUDA: a chunk of ", rows_per_chunk, " rows in ", splits,
              " column splits exceeds the grid (lower SSL_OPS_CONTRASTIVE_CHUNK_ELEMENTS)"));

  at::Tensor s_buffer = at::empty({rows_per_chunk, n}, acc_opts);
  at::Tensor g_buffer;
  if (grad) g_buffer = std::is_same_v<T, A> ? s_buffer : at::empty({rows_per_chunk, n}, spec.q_hat.options());
  at::Tensor parts, part_count;  // the stats kernel's partials, [split][row]
  if (stats) {
    parts = at::empty({spec.positives_lse ? 5 : 3, splits, rows_per_chunk}, acc_opts);
    part_count = at::empty({splits, rows_per_chunk}, acc_opts.dtype(at::kLong));
  }
  const at::Tensor k_hat_t = spec.k_hat.t();

  for (int64_t r0 = 0; r0 < na; r0 += rows_per_chunk) {
    const int64_t c = std::min(rows_per_chunk, na - r0);
    at::Tensor s = s_buffer.narrow(0, 0, c);
    const at::Tensor q_chunk = spec.q_hat.narrow(0, r0, c);
    mm_acc_out(s, q_chunk, k_hat_t);

    GemmRowParams<A> p{};
    p.s = s.template const_data_ptr<A>();
    p.rows = c;
    p.cols = n;
    p.cols_per_split = cols_per_split;
    p.first_row = spec.first_row + r0;
    p.scale = static_cast<A>(spec.scale);
    p.bounded = spec.bounded;
    p.labels = spec.labels;
    p.exclude_self = spec.exclude_self;
    p.offset_positive = spec.offset_positive;
    p.positive_offset = spec.positive_offset;
    p.exclude_positives = spec.exclude_positives;
    if (stats) {
      p.part_shift = parts[0].template data_ptr<A>();
      p.part_sum = parts[1].template data_ptr<A>();
      p.part_positive = parts[2].template data_ptr<A>();
      p.part_count = part_count.template data_ptr<int64_t>();
      if (spec.positives_lse) {
        p.part_pos_shift = parts[3].template data_ptr<A>();
        p.part_pos_sum = parts[4].template data_ptr<A>();
      }
      // The partials are [split][row] with the chunk's row count as the stride.
      launch_kernel(gemm_row_stats_kernel<A>, checked_grid("gemm_row_stats_kernel (chunk rows, splits)", c, splits),
                    dim3(kGemmRowThreads), 0, stream, p);
      merge_row_stats(spec, out, w, r0, c, parts, part_count, splits, stream);
    }
    if (!grad) continue;
    at::Tensor g = g_buffer.narrow(0, 0, c);
    const at::Tensor& lse_positive = stats ? out.lse_positive : spec.given_lse_positive;
    GemmCoefParams<T> q{p, (stats ? out.lse : spec.given_lse).template const_data_ptr<A>() + r0,
                        w.weight.template const_data_ptr<A>() + r0, w.inv_count.template const_data_ptr<A>() + r0,
                        spec.positives_lse ? lse_positive.template const_data_ptr<A>() + r0 : nullptr,
                        reinterpret_cast<T*>(g.data_ptr())};
    launch_kernel(gemm_row_coef_kernel<T>, checked_grid("gemm_row_coef_kernel (chunk rows, splits)", c, splits),
                  dim3(kGemmRowThreads), 0, stream, q);
    if (spec.grad_q) {
      at::Tensor rows = out.grad_q_hat.narrow(0, r0, c);
      mm_acc_out(rows, g, spec.k_hat);
    }
    if (spec.grad_k && !SSL_OPS_PLANTED(kDropTransposedTerm)) addmm_acc_(out.grad_k_hat, g.t(), q_chunk);
  }
  if (spec.grad_q) out.grad_q_hat.mul_(w.product_scale);
  if (spec.grad_k) out.grad_k_hat.mul_(w.product_scale);
}

#define SSL_OPS_INSTANTIATE_GEMM_PASSES(T)                                                            \
  template void gemm_passes<T>(const ContrastiveSpec<T>&, const PassWeights&, ContrastiveResult<T>&, \
                               c10::Device, cudaStream_t);
SSL_OPS_INSTANTIATE_GEMM_PASSES(float)
SSL_OPS_INSTANTIATE_GEMM_PASSES(double)
SSL_OPS_INSTANTIATE_GEMM_PASSES(c10::Half)
SSL_OPS_INSTANTIATE_GEMM_PASSES(c10::BFloat16)
#undef SSL_OPS_INSTANTIATE_GEMM_PASSES

}  // namespace ssl_ops::cuda
