// Test-only kernels that exercise what the emulation layer offers kernels:
// warp shuffles and votes with their lane semantics, atomics, static and
// dynamic shared memory, launch-configuration errors and the wmma fragment
// API. tests/test_emulator.py checks their outputs against torch.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "../cuda/compat.cuh"
#include "../cuda/launch_limits.h"

namespace ssl_ops::cuda {
namespace {

constexpr int kWarpOutputs = 9;

// x: (blocks, T) with T a multiple of 32; out: (blocks, T, kWarpOutputs).
__global__ void warp_ops_kernel(const float* x, float* out, int T) {
  __shared__ float block_total;
  SSL_DYNAMIC_SMEM(float, staged);
  const int t = threadIdx.x;
  const float v = x[blockIdx.x * T + t];
  float* o = out + (int64_t(blockIdx.x) * T + t) * kWarpOutputs;
  const unsigned full = 0xffffffffu;

  float butterfly = v;
  for (int offset = 16; offset > 0; offset /= 2) butterfly += __shfl_xor_sync(full, butterfly, offset);
  o[0] = butterfly;

  float down = v;
  for (int offset = 16; offset > 0; offset /= 2) down += __shfl_down_sync(full, down, offset);
  o[1] = __shfl_sync(full, down, 0);

  float scan = v;
  for (int offset = 1; offset < 32; offset *= 2) {
    const float up = __shfl_up_sync(full, scan, offset);
    if ((t % 32) >= offset) scan += up;
  }
  o[2] = scan;

  float group = v;
  for (int offset = 4; offset > 0; offset /= 2) group += __shfl_xor_sync(full, group, offset, 8);
  o[3] = group;

  o[4] = float(__popc(__ballot_sync(full, v > 0.0f)));
  o[5] = float(__any_sync(full, v > 2.0f));
  o[6] = float(__all_sync(full, v > -10.0f));

  if (t == 0) block_total = 0.0f;
  __syncthreads();
  atomicAdd(&block_total, v);
  staged[t] = v;
  __syncthreads();
  o[7] = block_total;
  o[8] = staged[(t + 1) % T];
}

at::Tensor test_warp_ops(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) % 32 == 0 && x.size(1) <= 1024 && x.is_contiguous() &&
              x.scalar_type() == at::kFloat, "x must be a contiguous float (B, 32k) tensor");
  const int T = static_cast<int>(x.size(1));
  at::Tensor out = at::empty({x.size(0), T, kWarpOutputs}, x.options());
  launch_kernel(warp_ops_kernel, dim3(x.size(0)), dim3(T), T * sizeof(float),
                current_stream(x.device()), x.const_data_ptr<float>(), out.data_ptr<float>(), T);
  return out;
}

// Lanes of a partial warp (T % 32 != 0): votes over __activemask().
__global__ void partial_warp_kernel(const float* x, float* out) {
  const unsigned active = __activemask();
  const float v = x[threadIdx.x];
  out[2 * threadIdx.x] = float(__popc(active));
  out[2 * threadIdx.x + 1] = float(__popc(__ballot_sync(active, v > 0.0f)));
}

at::Tensor test_partial_warp(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 1 && x.size(0) < 32 && x.is_contiguous() && x.scalar_type() == at::kFloat,
              "x must be a contiguous float vector shorter than a warp");
  at::Tensor out = at::empty({x.size(0), 2}, x.options());
  launch_kernel(partial_warp_kernel, dim3(1), dim3(x.size(0)), 0, current_stream(x.device()),
                x.const_data_ptr<float>(), out.data_ptr<float>());
  return out;
}

__global__ void noop_kernel() {}

void test_launch_config(const at::Tensor& anchor, int64_t threads, int64_t blocks) {
  launch_kernel(noop_kernel, dim3(blocks), dim3(threads), 0, current_stream(anchor.device()));
}

// A launch of `bytes` of dynamic shared memory through launch_kernel (which
// opts in past 48 KB, as cudaFuncSetAttribute does on a GPU) or straight to
// the emulator without the opt-in (two kernels: an opt-in lasts).
template <int kId>
__global__ void smem_kernel() {}

void test_smem_launch(const at::Tensor& anchor, int64_t bytes, bool opt_in) {
  if (opt_in) {
    launch_kernel(smem_kernel<1>, dim3(1), dim3(32), size_t(bytes), current_stream(anchor.device()));
  } else {
    ::ssl_emu::launch(smem_kernel<0>, dim3(1), dim3(32), size_t(bytes), current_stream(anchor.device()));
    check_launch();
  }
}

// store16 of four floats (1, 2, 3, 4) at out + offset: a GPU faults on a
// misaligned vector store, and the emulator must too.
__global__ void store16_kernel(float* dst) { store16(dst, Vec<float, 4>{{1.f, 2.f, 3.f, 4.f}}); }

void test_store16(at::Tensor& out, int64_t offset) {
  launch_kernel(store16_kernel, dim3(1), dim3(1), 0, current_stream(out.device()), out.data_ptr<float>() + offset);
}

// The host check every kernel's grid goes through (Note [Launch limits]), at
// sizes no emulated launch could reach: a grid of (x, y, z) or its error.
void test_checked_grid(const at::Tensor&, int64_t x, int64_t y, int64_t z) {
  const dim3 grid = checked_grid("the test grid", x, y, z);
  TORCH_CHECK(grid.x == x && grid.y == y && grid.z == z, "checked_grid changed the grid");
}

// C = A @ B for A (16, K) row-major and B (K, 16): once with B row-major and once
// from B^T (16, K) row-major read as a column-major B. One warp; out (2, 16, 16).
template <typename T, typename Precision, int K_STEP>
__global__ void wmma_kernel(const T* a, const T* b, const T* bt, float* out, int K) {
  using namespace nvcuda;
  wmma::fragment<wmma::accumulator, 16, 16, K_STEP, float> c_row, c_col;
  wmma::fill_fragment(c_row, 0.0f);
  wmma::fill_fragment(c_col, 0.0f);
  for (int k = 0; k < K; k += K_STEP) {
    wmma::fragment<wmma::matrix_a, 16, 16, K_STEP, Precision, wmma::row_major> fa;
    wmma::fragment<wmma::matrix_b, 16, 16, K_STEP, Precision, wmma::row_major> fb;
    wmma::fragment<wmma::matrix_b, 16, 16, K_STEP, Precision, wmma::col_major> fbt;
    wmma::load_matrix_sync(fa, a + k, K);
    wmma::load_matrix_sync(fb, b + int64_t(k) * 16, 16);
    wmma::load_matrix_sync(fbt, bt + k, K);
    if constexpr (std::is_same_v<Precision, wmma::precision::tf32>) {
      for (int i = 0; i < fa.num_elements; ++i) fa.x[i] = wmma::__float_to_tf32(fa.x[i]);
      for (int i = 0; i < fb.num_elements; ++i) fb.x[i] = wmma::__float_to_tf32(fb.x[i]);
      for (int i = 0; i < fbt.num_elements; ++i) fbt.x[i] = wmma::__float_to_tf32(fbt.x[i]);
    }
    wmma::mma_sync(c_row, fa, fb, c_row);
    wmma::mma_sync(c_col, fa, fbt, c_col);
  }
  wmma::store_matrix_sync(out, c_row, 16, wmma::mem_row_major);
  wmma::store_matrix_sync(out + 256, c_col, 16, wmma::mem_col_major);
}

at::Tensor test_wmma(const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(a.dim() == 2 && a.size(0) == 16 && b.dim() == 2 && b.size(1) == 16 &&
              a.size(1) == b.size(0) && a.size(1) % 16 == 0 && a.scalar_type() == b.scalar_type(),
              "a must be (16, K) and b (K, 16), K a multiple of 16, one dtype");
  const int K = static_cast<int>(a.size(1));
  at::Tensor ac = a.contiguous(), bc = b.contiguous(), bt = b.t().contiguous();
  at::Tensor out = at::zeros({2, 16, 16}, a.options().dtype(at::kFloat));
  const cudaStream_t stream = current_stream(a.device());
  float* o = out.data_ptr<float>();
  switch (a.scalar_type()) {
    case at::kHalf: {
      using T = __half;
      launch_kernel(wmma_kernel<T, T, 16>, dim3(1), dim3(32), 0, stream,
                    reinterpret_cast<const T*>(ac.const_data_ptr()), reinterpret_cast<const T*>(bc.const_data_ptr()),
                    reinterpret_cast<const T*>(bt.const_data_ptr()), o, K);
      break;
    }
    case at::kBFloat16: {
      using T = __nv_bfloat16;
      launch_kernel(wmma_kernel<T, T, 16>, dim3(1), dim3(32), 0, stream,
                    reinterpret_cast<const T*>(ac.const_data_ptr()), reinterpret_cast<const T*>(bc.const_data_ptr()),
                    reinterpret_cast<const T*>(bt.const_data_ptr()), o, K);
      break;
    }
    case at::kFloat:
      launch_kernel(wmma_kernel<float, nvcuda::wmma::precision::tf32, 8>, dim3(1), dim3(32), 0, stream,
                    ac.const_data_ptr<float>(), bc.const_data_ptr<float>(), bt.const_data_ptr<float>(), o, K);
      break;
    default:
      TORCH_CHECK(false, "test_wmma takes Half, BFloat16 or Float (tf32), got ", a.scalar_type());
  }
  return out;
}

}  // namespace

SSL_OPS_CUDA_LIBRARY_IMPL(m) {
  m.impl("_test_warp_ops", &test_warp_ops);
  m.impl("_test_partial_warp", &test_partial_warp);
  m.impl("_test_launch_config", &test_launch_config);
  m.impl("_test_smem_launch", &test_smem_launch);
  m.impl("_test_checked_grid", &test_checked_grid);
  m.impl("_test_store16", &test_store16);
  m.impl("_test_wmma", &test_wmma);
}

}  // namespace ssl_ops::cuda
