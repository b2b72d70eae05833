// A test-only kernel that runs the fused kernels' primitives
// (csrc/cuda/tensor_core_ptx.cuh) the way they run them, so
// tests/test_tensor_core_ptx.py can check every layout against torch:
//   stage  A (rows x k) and B (16 x k) into swizzled shared memory by cp.async
//          (rows and chunks past the ends zero-filled), wait_group, barrier;
//   S = A B^T   ldmatrix_x4 of both, mma (bf16/fp16 m16n8k16, fp32 as TF32 m16n8k8);
//   O = P B     16-bit only: P = S rounded to the input type, straight from
//               the accumulators as the A operand (FlashAttention-2's P V), B
//               read by ldmatrix_x4 .trans.
// Two warps, 16 rows each; `fault` makes one lane break a rule the GPU enforces.
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <type_traits>
#include <vector>

#include "../cuda/compat.cuh"
#include "../cuda/tensor_core_ptx.cuh"

namespace ssl_ops::cuda {
namespace {

constexpr int kRows = 32, kCols = 16, kChunks = 8, kThreads = 64;

enum Fault : int64_t { kNoFault = 0, kMisalignedLdmatrix = 1, kCopyOutsideShared = 2 };

// One 16-byte chunk of row r of a (rows x k) matrix into its swizzled place.
template <typename T>
__device__ void stage_chunk(unsigned char* tile, const T* src, int rows, int k, int r, int c, bool fault) {
  constexpr int kPerChunk = 16 / sizeof(T);
  const int valid = r < rows ? k - c * kPerChunk : 0;
  const int bytes = valid <= 0 ? 0 : (valid >= kPerChunk ? 16 : valid * int(sizeof(T)));
  const T* from = bytes > 0 ? src + int64_t(r) * k + c * kPerChunk : src;
  void* to = tile + (r * kChunks + ptx::staged_swizzle(r, c)) * 16;
  if (fault) to = const_cast<T*>(src);
  ptx::cp_async_16(to, from, bytes);
}

__device__ const unsigned char* chunk_address(const unsigned char* tile, int r, int c) {
  return tile + (r * kChunks + ptx::swizzle(r, c)) * 16;
}

template <typename T>
__global__ void tensor_core_ptx_kernel(
    const T* a, const T* b, int rows, int cols, int k, float* s_out, float* o_out, int64_t fault) {
  SSL_DYNAMIC_SMEM(unsigned char, smem);
  unsigned char* tile_a = smem;
  unsigned char* tile_b = smem + kRows * kChunks * 16;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  for (int i = tid; i < (kRows + kCols) * kChunks; i += kThreads) {
    const int r = i / kChunks, c = i % kChunks;
    const bool copy_fault = fault == kCopyOutsideShared && i == 3;
    if (r < kRows) {
      stage_chunk(tile_a, a, rows, k, r, c, copy_fault);
    } else {
      stage_chunk(tile_b, b, cols, k, r - kRows, c, copy_fault);
    }
  }
  ptx::cp_async_commit();
  ptx::cp_async_wait<0>();
  __syncthreads();

  constexpr bool kTf32 = std::is_same_v<T, float>;
  constexpr int kSteps = kChunks / 2;  // k steps of 8 (TF32) or 16 elements: 2 chunks each
  float acc[2][4] = {};
  for (int step = 0; step < kSteps; ++step) {
    uint32_t fa[4], fb[4];
    const unsigned char* a_row = chunk_address(tile_a, 16 * warp + ptx::lane_a_row(lane), 2 * step + ptx::lane_a_chunk(lane));
    if (fault == kMisalignedLdmatrix && lane == 9) a_row += 4;
    ptx::ldmatrix_x4(fa, a_row);
    ptx::ldmatrix_x4(fb, chunk_address(tile_b, ptx::lane_b_row(lane), 2 * step + ptx::lane_b_chunk(lane)));
    for (int n = 0; n < 2; ++n) {
      const uint32_t fbn[2] = {fb[2 * n], fb[2 * n + 1]};
      if constexpr (kTf32) {
        ptx::mma_m16n8k8_tf32(acc[n], fa, fbn);
      } else {
        ptx::mma_m16n8k16<T>(acc[n], fa, fbn);
      }
    }
  }
  for (int n = 0; n < 2; ++n) {
    for (int i = 0; i < 4; ++i) {
      s_out[(16 * warp + ptx::acc_row(lane, i)) * kCols + 8 * n + ptx::acc_col(lane, i)] = acc[n][i];
    }
  }
  if constexpr (!kTf32) {
    // The accumulators of S's two n8 tiles are exactly P's A fragment for k = 16 columns.
    const uint32_t p[4] = {ptx::pack2<T>(acc[0][0], acc[0][1]), ptx::pack2<T>(acc[0][2], acc[0][3]),
                           ptx::pack2<T>(acc[1][0], acc[1][1]), ptx::pack2<T>(acc[1][2], acc[1][3])};
    for (int pair = 0; pair < 4; ++pair) {  // 16 output columns per ldmatrix_x4 .trans
      uint32_t fv[4];
      ptx::ldmatrix_x4<true>(fv, chunk_address(tile_b, ptx::lane_bt_row(lane), 2 * pair + ptx::lane_bt_chunk(lane)));
      for (int n = 0; n < 2; ++n) {
        float o[4] = {};
        const uint32_t fvn[2] = {fv[2 * n], fv[2 * n + 1]};
        ptx::mma_m16n8k16<T>(o, p, fvn);
        for (int i = 0; i < 4; ++i) {
          o_out[(16 * warp + ptx::acc_row(lane, i)) * 64 + 16 * pair + 8 * n + ptx::acc_col(lane, i)] = o[i];
        }
      }
    }
  }
}

std::vector<at::Tensor> test_tensor_core_ptx(const at::Tensor& a, const at::Tensor& b, int64_t fault) {
  const int64_t per_chunk = 16 / a.element_size();
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(1) && a.scalar_type() == b.scalar_type() &&
                  a.size(0) <= kRows && b.size(0) <= kCols && a.size(1) <= kChunks * per_chunk &&
                  a.size(1) % per_chunk == 0 && a.is_contiguous() && b.is_contiguous(),
              "_test_tensor_core_ptx: a (<= 32 x k) and b (<= 16 x k) of one dtype, k a multiple of 16 "
              "bytes and at most 128 bytes; got ", a.sizes(), " and ", b.sizes());
  const int rows = int(a.size(0)), cols = int(b.size(0)), k = int(a.size(1));
  at::Tensor s = at::zeros({kRows, kCols}, a.options().dtype(at::kFloat));
  at::Tensor o = at::zeros({kRows, 64}, a.options().dtype(at::kFloat));
  const size_t smem = (kRows + kCols) * kChunks * 16;
  const cudaStream_t stream = current_stream(a.device());
  auto run = [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    launch_kernel(tensor_core_ptx_kernel<T>, dim3(1), dim3(kThreads), smem, stream,
                  reinterpret_cast<const T*>(a.const_data_ptr()), reinterpret_cast<const T*>(b.const_data_ptr()),
                  rows, cols, k, s.data_ptr<float>(), o.data_ptr<float>(), fault);
  };
  switch (a.scalar_type()) {
    case at::kBFloat16: run(static_cast<__nv_bfloat16*>(nullptr)); break;
    case at::kHalf: run(static_cast<__half*>(nullptr)); break;
    case at::kFloat: run(static_cast<float*>(nullptr)); break;
    default: TORCH_CHECK(false, "_test_tensor_core_ptx takes BFloat16, Half or Float (TF32), got ", a.scalar_type());
  }
  return {s.narrow(0, 0, rows).narrow(1, 0, cols), o.narrow(0, 0, rows)};
}

}  // namespace

SSL_OPS_CUDA_LIBRARY_IMPL(m) { m.impl("_test_tensor_core_ptx", &test_tensor_core_ptx); }

}  // namespace ssl_ops::cuda
