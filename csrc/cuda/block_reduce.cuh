#pragma once
// The sum (take_max: the maximum) of v over a block of kBlockReduceThreads
// threads, returned to every thread; smem holds one value per warp.
#include "compat.cuh"

namespace ssl_ops::cuda {

constexpr int kBlockReduceThreads = 256;

template <typename A>
__device__ __forceinline__ A block_reduce(A v, A* smem, bool take_max) {
  for (int offset = 16; offset > 0; offset /= 2) {
    const A other = __shfl_xor_sync(0xffffffffu, v, offset);
    v = take_max ? (other > v ? other : v) : v + other;
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // smem may still be read by a previous reduction
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  A total = smem[0];
  for (int w = 1; w < kBlockReduceThreads / 32; ++w) total = take_max ? (smem[w] > total ? smem[w] : total) : total + smem[w];
  return total;
}

}  // namespace ssl_ops::cuda
