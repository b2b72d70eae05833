// Test-only kernels with planted bugs, to prove the emulator reports them:
// a block reduction whose barriers can be left out (a race on shared memory
// that gives wrong sums under shuffled thread orders) and a write one element
// past the end of a tensor (caught by the AddressSanitizer build), and a
// barrier that not every thread reaches (reported as a deadlock).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "../cuda/compat.cuh"

namespace ssl_ops::cuda {
namespace {

constexpr int kBlock = 64;

__global__ void block_sum_kernel(const float* x, float* out, bool with_barriers) {
  __shared__ float partial[kBlock];
  const int t = threadIdx.x;
  partial[t] = x[blockIdx.x * kBlock + t];
  if (with_barriers) __syncthreads();
  for (int stride = kBlock / 2; stride > 0; stride /= 2) {
    if (t < stride) partial[t] += partial[t + stride];
    if (with_barriers) __syncthreads();
  }
  if (t == 0) out[blockIdx.x] = partial[0];
}

at::Tensor planted_block_sum(const at::Tensor& x, bool with_barriers) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == kBlock && x.scalar_type() == at::kFloat &&
              x.is_contiguous(), "x must be a contiguous float (B, 64) tensor");
  at::Tensor out = at::empty({x.size(0)}, x.options());
  launch_kernel(block_sum_kernel, dim3(x.size(0)), dim3(kBlock), 0, current_stream(x.device()),
                x.const_data_ptr<float>(), out.data_ptr<float>(), with_barriers);
  return out;
}

__global__ void off_by_one_kernel(float* out, int64_t n) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i <= n) out[i] = float(i);  // planted bug: should be i < n
}

void planted_out_of_bounds_write(at::Tensor& out) {
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous(), "out must be contiguous float");
  const int64_t n = out.numel();
  launch_kernel(off_by_one_kernel, dim3((n + 1 + 127) / 128), dim3(128), 0,
                current_stream(out.device()), out.data_ptr<float>(), n);
}

// Planted bug: threads past `active` leave before a barrier the others wait at.
__global__ void divergent_barrier_kernel(float* out, int active) {
  if (int(threadIdx.x) >= active) return;
  __syncthreads();
  out[threadIdx.x] = 1.0f;
}

void planted_divergent_barrier(at::Tensor& out) {
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() && out.numel() >= 32,
              "out must be a contiguous float tensor of at least 32 elements");
  launch_kernel(divergent_barrier_kernel, dim3(1), dim3(32), 0, current_stream(out.device()),
                out.data_ptr<float>(), 16);
}

}  // namespace

SSL_OPS_CUDA_LIBRARY_IMPL(m) {
  m.impl("_planted_divergent_barrier", &planted_divergent_barrier);
  m.impl("_planted_block_sum", &planted_block_sum);
  m.impl("_planted_out_of_bounds_write", &planted_out_of_bounds_write);
}

}  // namespace ssl_ops::cuda
