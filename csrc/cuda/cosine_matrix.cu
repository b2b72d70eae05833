// Cosine-similarity matrix, CUDA. The math is csrc/cpu/cosine_matrix.cpp's.
//
// Forward: row denominators (row_denom_kernel), then one tile kernel on the
// contrastive losses' S-tile machinery (tensor cores for fp16/bf16 and for
// fp32 where torch allows TF32, the exact FMA path otherwise) whose epilogue
// applies both inverse norms in registers, so no normalised copy of a or b is
// written. With b = None only tiles on and above the diagonal are computed,
// each stored to both halves.
// Tiles are numbered along grid.x only (row block = index / column blocks),
// so the 65535 limit of grid.y never caps the rows; the host refuses a grid
// past 2^31 - 1 blocks (an output of over 2^43 elements).
// Shape routing: every shape takes the tile kernel for now. On an H200
// (benchmarks/RESULTS.md, 2026-11-28) it was 3.2x eager at 1024^2 x 128 and
// slower at 4096^2 x 128 (0.22 against 0.16 ms, bound by its output stores).
// Backward: d a_hat = dC b_hat (b = None: (dC + dC^T) a_hat, one GEMM) through
// the vendor GEMM with the operands in the input dtype and the products
// accumulated in fp32 (gemm_acc.h), then the normalisation backward in
// finish_rows_kernel. b_hat (and a_hat) are written in the input dtype: the
// GEMM needs scaled operands, and an (N, D) scaled copy costs less than
// scaling the (M, N) dC.
// Resources (ptxas -v, sm_90, nvcc 13.0; 256 threads): 58 registers on tensor
// cores for fp16/bf16, 64 for TF32, 59 exact fp32, 44 double; 17-18 KB shared
// memory; no spills.
#include <ATen/Dispatch.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <type_traits>

#include "../cosine_check.h"
#include "../message.h"
#include "compat.cuh"
#include "contrastive_kernels.cuh"
#include "gemm_acc.h"
#include "contrastive_rows.cuh"

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
};

template <typename T, bool kTensorCores>
__global__ void __launch_bounds__(kTileThreads) cosine_matrix_kernel(CosineMatrixParams<T> p) {
  using A = acc_t<T>;
  constexpr int kTile = tile_size<T>(), R = kTile / 16;
  __shared__ STileSmem<T> smem;
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
  s_tile<T, kTensorCores, kTile>(p.a, p.m, r0, p.b, p.n, c0, p.features, smem, s);
  const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
#pragma unroll
  for (int i = 0; i < R; ++i) {
    const int64_t r = r0 + ty * R + i;
#pragma unroll
    for (int j = 0; j < R; ++j) {
      const int64_t c = c0 + tx * R + j;
      if (r < p.m && c < p.n) {
        const T v = static_cast<T>(s[i][j] / (p.denom_a[r] * p.denom_b[c]));
        p.out[r * p.n + c] = v;
        if (p.symmetric && row_block != col_block) p.out[c * p.n + r] = v;
      }
    }
  }
}

at::Tensor cosine_similarity_matrix(const at::Tensor& a_in, const std::optional<at::Tensor>& b_in, double eps) {
  check_cosine_matrix_args(a_in, b_in, eps);
  const DeviceGuard guard(a_in.device());
  const cudaStream_t stream = current_stream(a_in.device());
  const at::Tensor a = a_in.contiguous();
  const at::Tensor b = b_in.has_value() ? b_in->contiguous() : a;
  at::Tensor out = at::empty({a.size(0), b.size(0)}, a.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "cosine_similarity_matrix", [&] {
    using T = scalar_t;
    const at::Tensor denom_a = row_denoms<T>(a, eps, true, stream);
    const at::Tensor denom_b = b_in.has_value() ? row_denoms<T>(b, eps, true, stream) : denom_a;
    CosineMatrixParams<T> p{a.const_data_ptr<T>(), b.const_data_ptr<T>(), denom_a.const_data_ptr<acc_t<T>>(),
                            denom_b.const_data_ptr<acc_t<T>>(), a.size(0), b.size(0), a.size(1),
                            !b_in.has_value(), out.data_ptr<T>()};
    const int64_t tile = tile_size<T>();
    const int64_t row_blocks = (p.m + tile - 1) / tile, col_blocks = (p.n + tile - 1) / tile;
    p.col_blocks = col_blocks;
    const int64_t blocks = p.symmetric ? row_blocks * (row_blocks + 1) / 2 : row_blocks * col_blocks;
    TORCH_CHECK(blocks <= int64_t(std::numeric_limits<int32_t>::max()),
                ssl_ops::message("ssl_ops.cosine_similarity_matrix: a ", p.m, " x ", p.n,
                                 " output needs more tiles than one CUDA launch takes (", blocks, ")"));
    const dim3 grid(static_cast<unsigned>(blocks));
    with_tile_path<T>([&](auto tensor_cores) {
      launch_kernel(cosine_matrix_kernel<T, decltype(tensor_cores)::value>, grid, dim3(kTileThreads), 0, stream, p);
    });
  });
  return out;
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
    // Operands stay in the input dtype, products accumulate in fp32 (gemm_acc.h):
    // no fp32 copy of the M x N gradient, and bf16/fp16 GEMMs at tensor-core
    // speed instead of SGEMM. The normalised rows are rounded to the input dtype
    // once, as the gradient already is.
    const at::ScalarType acc = c10::CppTypeToScalarType<acc_t<T>>::value;
    const at::Tensor g = grad.contiguous();
    const at::Tensor denom_a = row_denoms<T>(a, eps, true, stream);
    const at::Tensor a_hat = (a.to(acc) / denom_a.unsqueeze(1)).to(a.scalar_type());
    auto product = [&](const at::Tensor& left, const at::Tensor& right) {
      at::Tensor out = at::empty({left.size(0), right.size(1)}, a.options().dtype(acc));
      mm_acc_out(out, left, right);
      return out;
    };
    auto finish = [&](const at::Tensor& x, const at::Tensor& denom, const at::Tensor& grad_hat) {
      return finish_rows<T>(x, denom, &grad_hat, nullptr, nullptr, nullptr, eps, /*normalize=*/true, stream);
    };
    if (!b_in.has_value()) {
      // d a_hat = (G + G^T) a_hat: one GEMM, the sum rounded once to the input dtype.
      if (mask[0]) ga = finish(a, denom_a, product(g + g.t(), a_hat));
      return;
    }
    const at::Tensor b = b_in->contiguous();
    const at::Tensor denom_b = row_denoms<T>(b, eps, true, stream);
    const at::Tensor b_hat = (b.to(acc) / denom_b.unsqueeze(1)).to(b.scalar_type());
    if (mask[0]) ga = finish(a, denom_a, product(g, b_hat));
    if (mask[1]) gb = finish(b, denom_b, product(g.t(), a_hat));
  });
  return {ga, gb};
}

}  // namespace

SSL_OPS_CUDA_LIBRARY_IMPL(m) {
  m.impl("cosine_similarity_matrix", &cosine_similarity_matrix);
  m.impl("cosine_similarity_matrix_backward", &cosine_similarity_matrix_backward);
}

}  // namespace ssl_ops::cuda
