// Cosine-similarity matrix, CUDA. The math is csrc/cpu/cosine_matrix.cpp's.
//
// Note [Cosine matrix routes]. Forward, two routes (SSL_OPS_CUDA_COSINE_MATRIX_ROUTE
// = "tiles" | "gemm" forces one; tests run both):
//   tiles: row denominators (row_denom_kernel), then cosine_matrix_kernel on the
//     S-tile machinery (similarity_tile.cuh), whose epilogue applies both inverse norms
//     in registers (no normalised copy of a or b), stages the finished tile in
//     shared memory and writes it as 16-byte vectors (Note [Cosine matrix
//     stores]). With b = None only tiles on and above the diagonal are
//     computed, each also written, transposed, to the other half.
//   gemm: normalised copies of a and b in the input dtype, then the vendor GEMM
//     straight into the output (fp32 accumulation for fp16/bf16).
// The default is by the tile kernel's path: tiles where it runs on tensor
// cores (fp16/bf16; fp32 where torch allows TF32), gemm where it would run its
// exact FMA path (fp32 without TF32, fp64). Why, in counts at 4096^2 x 128
// (4.3 GFLOP; output 64 MB fp32, 32 MB bf16): on an H200 (benchmarks/RESULTS.md,
// 2026-11-28) the FMA tile took 0.22 ms (19.5 TFLOP/s) against 0.16 ms for
// F.normalize + matmul. Its 4 x 4 register tile does 16 FMAs per 8 shared-memory
// loads and stays well below the 67 TFLOP/s fp32 peak that cuBLAS's SGEMM
// approaches, and DGEMM runs on the FP64 tensor cores (sm_80+) that the tile
// never uses. The copies cost (M + N) D elements written and read (4 MB at that
// shape, 6% of the output). On tensor cores the tile kernel's floor is the
// output write (32 MB bf16 at ~4 TB/s: 8 us) plus the WMMA products (~9 us at
// ~500 TFLOP/s), and it skips the copies, their launches and, with b = None,
// half the products; it measured 0.13 against 0.15 ms with the old 2-byte
// stores. The GPU benchmark (benchmarks/cosine.py) times both routes and
// prints the faster, so the first GPU run can move this line.
// Tiles are numbered along grid.x only (row block = index / column blocks),
// so the 65535 limit of grid.y never caps the rows; the host refuses a grid
// past 2^31 - 1 blocks before allocating the output (Note [Launch limits]).
//
// Backward: d a_hat = dC b_hat through the vendor GEMM with the operands in
// the input dtype and the products accumulated in fp32 (gemm_acc.h), then the
// normalisation backward in finish_rows_kernel; b_hat (and a_hat) are written
// in the input dtype (an (N, D) scaled copy costs less than scaling the (M, N)
// dC). Routes by the gradient's layout and shape:
//   - a gradient broadcast along a dimension (out.sum(), per-row weights) is
//     rank one: no GEMM and no dense copy (csrc/cosine_rank_one.h);
//   - b = None: Note [Cosine self backward].
#include <ATen/Dispatch.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <optional>
#include <string>
#include <type_traits>

#include "../cosine_check.h"
#include "../cosine_rank_one.h"
#include "../message.h"
#include "compat.cuh"
#include "gemm_acc.h"
#include "row_norms.cuh"
#include "similarity_tile.cuh"
#include "launch_limits.h"

namespace ssl_ops::cuda {
namespace {

template <typename T>
struct CosineMatrixParams {
  const T* a;
  const T* b;
  const acc_t<T>* denom_a;
  const acc_t<T>* denom_b;
  int64_t m, n, features;
  bool symmetric;
  T* out;  // m x n
  int64_t col_blocks;  // tiles across the output's columns
  bool vector_stores;  // out 16-byte aligned and n a multiple of the vector width
};

// Note [Cosine matrix stores]: the kernel is bound by its output writes, so a
// finished tile goes through shared memory and leaves as 16-byte vectors: a
// warp writes 4 rows of 128 contiguous bytes (bf16; 2 rows of 256 for fp32),
// where the registers' 4 x 4 layout gave 2-byte stores at an 8-byte stride
// (25% of each sector used) and, for the mirror, 32 rows per instruction (6%).
// The mirror tile is read transposed from the same stage: two neighbouring
// threads write 32 contiguous bytes of a mirror row, so a warp covers 16 full
// sectors when rows start on a sector (n * sizeof(T) a multiple of 32; else
// each pair straddles two), and its shared-memory reads (a column each)
// conflict at most 2 ways. Rows are padded by one vector, which keeps them
// 16-byte aligned. Without vector alignment (n not a multiple of the vector
// width, or an offset output) the same stage is written element by element,
// consecutive threads on consecutive columns. Left for a GPU run to weigh: the
// registers go to the stage as scalar st.shared (PTX), R values per thread at
// an R-element stride, which conflicts up to 4 ways for fp32.
template <typename T, int kTile>
struct alignas(16) OutputStage {
  static constexpr int kVec = 16 / int(sizeof(T));
  T v[kTile][kTile + kVec];
};

template <typename T>
union CosineMatrixSmem {
  STileSmem<T> tile;
  OutputStage<T, tile_size<T>()> out;
};

// Writes rows x cols of the stage (transposed: its columns) to dst, row stride ld.
template <typename T, int kTile, bool kTransposed>
__device__ __forceinline__ void store_tile(T* __restrict__ dst, int64_t ld, int rows, int cols,
                                           const OutputStage<T, kTile>& stage, bool vector_stores) {
  constexpr int kVec = OutputStage<T, kTile>::kVec, kVectorsPerRow = kTile / kVec;
  auto staged = [&](int i, int j) { return kTransposed ? stage.v[j][i] : stage.v[i][j]; };
  if (vector_stores) {  // cols is a multiple of kVec here (and rows, on the mirror, where m == n)
    for (int e = threadIdx.x; e < kTile * kVectorsPerRow; e += kTileThreads) {
      int i, vec;
      if constexpr (kTransposed) {  // pairs of threads on one sector, down the column
        const int pair = e / 2;
        i = pair % kTile;
        vec = (pair / kTile) * 2 + e % 2;
      } else {
        i = e / kVectorsPerRow;
        vec = e % kVectorsPerRow;
      }
      if (i >= rows || vec * kVec >= cols) continue;
      Vec<T, kVec> out;
#pragma unroll
      for (int t = 0; t < kVec; ++t) out.val[t] = staged(i, vec * kVec + t);
      store16(dst + i * ld + vec * kVec, out);
    }
  } else {
    for (int e = threadIdx.x; e < kTile * kTile; e += kTileThreads) {
      const int i = e / kTile, j = e % kTile;
      if (i < rows && j < cols) dst[i * ld + j] = staged(i, j);
    }
  }
}

// Resources (ptxas -v, sm_90, nvcc 13.0; 256 threads): 48 registers for
// fp16/bf16 on either path and exact fp32, 62 on TF32, 40 for fp64; 17-18 KB
// static shared memory; no spills. The PTX has st.global.wb.v4 for the vector
// stores (store16) and scalar stores only on the element-wise path.
template <typename T, bool kTensorCores>
__global__ void __launch_bounds__(kTileThreads) cosine_matrix_kernel(CosineMatrixParams<T> p) {
  using A = acc_t<T>;
  constexpr int kTile = tile_size<T>(), R = kTile / 16;
  __shared__ CosineMatrixSmem<T> smem;
  const int64_t block = blockIdx.x;
  int64_t row_block = block / p.col_blocks, col_block = block % p.col_blocks;
  if (p.symmetric) {
    // Block index -> (row block <= column block), column by column.
    const int64_t pair = block;
    int64_t k = static_cast<int64_t>((sqrt(8.0 * double(pair) + 1.0) - 1.0) / 2.0);
    while (k * (k + 1) / 2 > pair) --k;
    while ((k + 1) * (k + 2) / 2 <= pair) ++k;
    col_block = k;
    row_block = pair - k * (k + 1) / 2;
  }
  const int64_t r0 = row_block * kTile, c0 = col_block * kTile;
  A s[R][R];
  s_tile<T, kTensorCores, kTile>(p.a, p.m, r0, p.b, p.n, c0, p.features, smem.tile, s);
  // s_tile ends on a barrier: its shared memory is free for the output stage.
  const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
#pragma unroll
  for (int i = 0; i < R; ++i) {
    const int64_t r = r0 + ty * R + i;
#pragma unroll
    for (int j = 0; j < R; ++j) {
      const int64_t c = c0 + tx * R + j;
      smem.out.v[ty * R + i][tx * R + j] = (r < p.m && c < p.n) ? static_cast<T>(s[i][j] / (p.denom_a[r] * p.denom_b[c]))
                                                                  : T(0);
    }
  }
  __syncthreads();
  const int rows = static_cast<int>(p.m - r0 < kTile ? p.m - r0 : kTile);
  const int cols = static_cast<int>(p.n - c0 < kTile ? p.n - c0 : kTile);
  store_tile<T, kTile, false>(p.out + r0 * p.n + c0, p.n, rows, cols, smem.out, p.vector_stores);
  if (p.symmetric && row_block != col_block) {
    store_tile<T, kTile, true>(p.out + c0 * p.n + r0, p.n, cols, rows, smem.out, p.vector_stores);
  }
}

// -1 when the variable is unset or empty, else the index of its value in choices.
int env_choice(const char* name, std::initializer_list<const char*> choices) {
  const char* value = std::getenv(name);
  if (value == nullptr || *value == '\0') return -1;
  int index = 0;
  std::string allowed;
  for (const char* choice : choices) {
    if (std::strcmp(value, choice) == 0) return index;
    allowed += (index++ ? " or \"" : "\"") + std::string(choice) + "\"";
  }
  TORCH_CHECK(false, ssl_ops::message(name, " must be ", allowed, ", got \"", value, "\""));
  return -1;
}

// Whether T's tile path runs on tensor cores on the current device (with_tile_path's choice).
template <typename T>
bool tiles_on_tensor_cores() {
  bool tensor_cores = false;
  with_tile_path<T>([&](auto path) { tensor_cores = decltype(path)::value; });
  return tensor_cores;
}

// Note [Cosine matrix routes].
template <typename T>
bool forward_on_tiles() {
  const int forced = env_choice("SSL_OPS_CUDA_COSINE_MATRIX_ROUTE", {"tiles", "gemm"});
  if (forced >= 0) return forced == 0;
  // fp16/bf16 stay on the tiles even without tensor cores (bf16 before sm_80),
  // where cuBLAS has no fast bf16 GEMM either.
  if constexpr (!std::is_same_v<T, float> && !std::is_same_v<T, double>) return true;
  return tiles_on_tensor_cores<T>();
}

// x_r / denom_r, rounded to x's dtype: the operands of the vendor GEMMs.
at::Tensor normalized_rows(const at::Tensor& x, const at::Tensor& denom) {
  return (x.to(denom.scalar_type()) / denom.unsqueeze(1)).to(x.scalar_type());
}

at::Tensor cosine_similarity_matrix(const at::Tensor& a_in, const std::optional<at::Tensor>& b_in, double eps) {
  check_cosine_matrix_args(a_in, b_in, eps);
  const DeviceGuard guard(a_in.device());
  const cudaStream_t stream = current_stream(a_in.device());
  const at::Tensor a = a_in.contiguous();
  const at::Tensor b = b_in.has_value() ? b_in->contiguous() : a;
  const int64_t m = a.size(0), n = b.size(0);
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "cosine_similarity_matrix", [&] {
    using T = scalar_t;
    if (m == 0 || n == 0 || !forward_on_tiles<T>()) {
      out = at::empty({m, n}, a.options());
      if (out.numel() == 0) return;
      const at::Tensor denom_a = row_denoms<T>(a, eps, true, stream);
      const at::Tensor a_hat = normalized_rows(a, denom_a);
      const at::Tensor b_hat = b_in.has_value() ? normalized_rows(b, row_denoms<T>(b, eps, true, stream)) : a_hat;
      mm_round_out(out, a_hat, b_hat.t());
      return;
    }
    // The grid first (Note [Launch limits]): an output too large for one launch
    // is refused before anything is allocated.
    const int64_t tile = tile_size<T>();
    const int64_t row_blocks = (m + tile - 1) / tile, col_blocks = (n + tile - 1) / tile;
    const int64_t blocks = b_in.has_value() ? row_blocks * col_blocks : row_blocks * (row_blocks + 1) / 2;
    TORCH_CHECK(blocks <= kMaxGridX,
                ssl_ops::message("ssl_ops.cosine_similarity_matrix: a ", m, " x ", n, " output is ", blocks,
                                 " tiles, more than one CUDA launch takes (", kMaxGridX,
                                 "); SSL_OPS_CUDA_COSINE_MATRIX_ROUTE=gemm has no such limit"));
    out = at::empty({m, n}, a.options());
    const at::Tensor denom_a = row_denoms<T>(a, eps, true, stream);
    const at::Tensor denom_b = b_in.has_value() ? row_denoms<T>(b, eps, true, stream) : denom_a;
    CosineMatrixParams<T> p{a.const_data_ptr<T>(), b.const_data_ptr<T>(), denom_a.const_data_ptr<acc_t<T>>(),
                            denom_b.const_data_ptr<acc_t<T>>(), m, n, a.size(1), !b_in.has_value(),
                            out.data_ptr<T>(), col_blocks};
    constexpr int64_t kVec = OutputStage<T, tile_size<T>()>::kVec;
    p.vector_stores = n % kVec == 0 && reinterpret_cast<uintptr_t>(p.out) % 16 == 0;
    const dim3 grid = checked_grid("cosine_matrix_kernel (tiles)", blocks);
    with_tile_path<T>([&](auto tensor_cores) {
      launch_kernel(cosine_matrix_kernel<T, decltype(tensor_cores)::value>, grid, dim3(kTileThreads), 0, stream, p);
    });
  });
  return out;
}

// Note [Cosine self backward]: with b = None, d a_hat = G a_hat + G^T a_hat
// (G = dC, M x M). Either one GEMM of the sum, or two GEMMs summed in fp32
// (cuBLAS reads G^T in place; for fp16/bf16 the second product lands in an
// M x D fp32 temporary first, gemm_acc.h's addmm_acc_). Per element of G
// (s bytes): the sum reads G twice (once transposed) and writes G + G^T, then
// its GEMM reads it, 4 s bytes and 2 D FLOPs; two GEMMs read G twice, 2 s bytes and 4 D FLOPs,
// with no M x M temporary. The sum pays when D FLOPs take longer than s bytes:
// D > s F / B. On an H200 (B ~ 4 TB/s; F ~ 400 TFLOP/s for these skinny bf16
// or TF32 GEMMs, ~50 for fp32 and fp64): D > 200 for bf16/fp16, D > 400 for
// TF32, D > 50 for exact fp32 and D > 100 for fp64. The transposed read of the
// sum runs below the streaming rate, which moves each line up: the sum is
// taken from D = 512 on tensor cores and from D = 128 otherwise.
// SSL_OPS_CUDA_COSINE_SELF_BACKWARD = "sum" | "two_gemms" forces one.
template <typename T>
bool self_backward_sums(int64_t features) {
  const int forced = env_choice("SSL_OPS_CUDA_COSINE_SELF_BACKWARD", {"sum", "two_gemms"});
  if (forced >= 0) return forced == 0;
  return features >= (tiles_on_tensor_cores<T>() ? 512 : 128);
}

std::tuple<at::Tensor, at::Tensor> cosine_similarity_matrix_backward(const at::Tensor& grad, const at::Tensor& a_in,
                                                                     const std::optional<at::Tensor>& b_in, double eps,
                                                                     std::array<bool, 2> mask) {
  check_cosine_matrix_args(a_in, b_in, eps);
  const at::NoGradGuard no_graph;  // a backward: its own products (mm_out) record nothing
  const DeviceGuard guard(a_in.device());
  const cudaStream_t stream = current_stream(a_in.device());
  const at::Tensor a = a_in.contiguous();
  at::Tensor ga = at::empty({0}, a.options()), gb = at::empty({0}, a.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "cosine_similarity_matrix_backward", [&] {
    using T = scalar_t;
    const at::ScalarType acc = c10::CppTypeToScalarType<acc_t<T>>::value;
    const std::optional<at::Tensor> b = b_in.has_value() ? std::optional<at::Tensor>(b_in->contiguous()) : std::nullopt;
    const bool need_a_hat = !b || mask[1], need_b_hat = b && mask[0];
    const at::Tensor denom_a = row_denoms<T>(a, eps, true, stream);
    const at::Tensor denom_b = b ? row_denoms<T>(*b, eps, true, stream) : denom_a;
    auto finish = [&](const at::Tensor& x, const at::Tensor& denom, const at::Tensor& grad_hat) {
      return finish_rows<T>(x, denom, &grad_hat, nullptr, nullptr, nullptr, eps, /*normalize=*/true, stream);
    };
    if (const std::optional<RankOne> r = rank_one(grad, acc)) {
      // Rank one: O((M + N) D) products, on normalised rows in the accumulation type.
      const at::Tensor a_hat = need_a_hat ? a.to(acc) / denom_a.unsqueeze(1) : at::Tensor();
      if (!b) {
        if (mask[0]) ga = finish(a, denom_a, rank_one_product(r->u, r->v, a_hat) + rank_one_product(r->v, r->u, a_hat));
        return;
      }
      if (mask[0]) ga = finish(a, denom_a, rank_one_product(r->u, r->v, b->to(acc) / denom_b.unsqueeze(1)));
      if (mask[1]) gb = finish(*b, denom_b, rank_one_product(r->v, r->u, a_hat));
      return;
    }
    // Operands stay in the input dtype, products accumulate in fp32 (gemm_acc.h):
    // no fp32 copy of the M x N gradient, and bf16/fp16 GEMMs at tensor-core
    // speed instead of SGEMM. The normalised rows are rounded to the input dtype
    // once, as the gradient already is.
    const at::Tensor g = grad.contiguous();
    const at::Tensor a_hat = need_a_hat ? normalized_rows(a, denom_a) : at::Tensor();
    const at::Tensor b_hat = need_b_hat ? normalized_rows(*b, denom_b) : at::Tensor();
    auto product = [&](const at::Tensor& left, const at::Tensor& right) {
      at::Tensor out = at::empty({left.size(0), right.size(1)}, a.options().dtype(acc));
      mm_acc_out(out, left, right);
      return out;
    };
    if (!b) {
      if (!mask[0]) return;
      if (self_backward_sums<T>(a.size(1))) {
        ga = finish(a, denom_a, product(g + g.t(), a_hat));  // the sum rounded once to the input dtype
      } else {
        at::Tensor grad_hat = product(g, a_hat);
        addmm_acc_(grad_hat, g.t(), a_hat);
        ga = finish(a, denom_a, grad_hat);
      }
      return;
    }
    if (mask[0]) ga = finish(a, denom_a, product(g, b_hat));
    if (mask[1]) gb = finish(*b, denom_b, product(g.t(), a_hat));
  });
  return {ga, gb};
}

}  // namespace

SSL_OPS_CUDA_LIBRARY_IMPL(m) {
  m.impl("cosine_similarity_matrix", &cosine_similarity_matrix);
  m.impl("cosine_similarity_matrix_backward", &cosine_similarity_matrix_backward);
}

}  // namespace ssl_ops::cuda
