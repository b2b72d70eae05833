// EMA update of a momentum encoder, CUDA kernel (multi-tensor apply).
//
//   ema[i] <- momentum * ema[i] + (1 - momentum) * online[i]   (every pair, elementwise)
//
// computed as fma(m, ema, w * online), m = momentum, w = 1 - momentum rounded
// once from double, in float (double for float64): the expression of
// csrc/cpu/ema.cpp, so the backends agree bit for bit.
//
// Note [EMA chunk lists]: every tensor is cut into chunks of `chunk_size`
// elements; one block updates one chunk. A launch's table of tensors and
// (tensor, chunk) pairs is passed by value as the kernel argument (no host to
// device copy); a new launch starts only when the table is full, so a whole
// model is usually one or a few launches. The table stays under the portable
// 4 KB kernel-parameter limit.
//
// Note [EMA vector access]: a chunk whose ema and online pointers are both
// aligned to one vector (16 bytes of the wider type) is read and written in
// vectors; the rest of it and misaligned chunks (views at odd storage offsets)
// take the scalar path. chunk_size is a multiple of every vector width, so
// chunks of an aligned tensor stay aligned.
//
// Resources (ptxas -v, sm_90, nvcc 13.0): 25-28 registers for every dtype pair,
// no stack frame, no spills, no barriers; no shared memory.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cstdint>

#include "../ema_check.h"
#include "compat.cuh"

namespace ssl_ops::cuda {
namespace {

constexpr int kMaxTensors = 96;
constexpr int kMaxBlocks = 320;
constexpr int kThreads = 512;
constexpr int64_t kDefaultChunkSize = 65536;
constexpr int64_t kChunkMultiple = 8;  // the widest vector, in elements

struct EmaChunkList {
  void* ema[kMaxTensors];
  const void* online[kMaxTensors];
  int64_t numel[kMaxTensors];
  int64_t chunk_size;
  uint8_t tensor_of_block[kMaxBlocks];
  int32_t chunk_of_block[kMaxBlocks];
};
static_assert(sizeof(EmaChunkList) <= 4096 - 16, "kernel parameters must stay under 4 KB");
static_assert(kMaxTensors <= 256, "tensor_of_block is a byte");

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T val[N];
};

// Explicit fmaf/fma: one rounding, and never a double-precision fma for floats.
__device__ __forceinline__ float fused_multiply_add(float a, float b, float c) {
  return fmaf(a, b, c);
}
__device__ __forceinline__ double fused_multiply_add(double a, double b, double c) {
  return fma(a, b, c);
}

template <typename E, typename O, typename C>
__device__ __forceinline__ E ema_value(E ema, O online, C m, C w) {
  return static_cast<E>(fused_multiply_add(m, static_cast<C>(ema), w * static_cast<C>(online)));
}

template <typename E, typename O>
__global__ void __launch_bounds__(kThreads)
    ema_multi_tensor_kernel(EmaChunkList list, ema_compute_t<E> m, ema_compute_t<E> w) {
  constexpr int kVec = 16 / (sizeof(E) > sizeof(O) ? sizeof(E) : sizeof(O));
  const int tensor = list.tensor_of_block[blockIdx.x];
  const int64_t begin = int64_t(list.chunk_of_block[blockIdx.x]) * list.chunk_size;
  const int64_t rest = list.numel[tensor] - begin;
  const int64_t n = rest < list.chunk_size ? rest : list.chunk_size;
  E* ema = static_cast<E*>(list.ema[tensor]) + begin;
  const O* online = static_cast<const O*>(list.online[tensor]) + begin;

  int64_t scalar_from = 0;
  if (reinterpret_cast<uintptr_t>(ema) % sizeof(Vec<E, kVec>) == 0 &&
      reinterpret_cast<uintptr_t>(online) % sizeof(Vec<O, kVec>) == 0) {
    const int64_t vectors = n / kVec;
    for (int64_t v = threadIdx.x; v < vectors; v += blockDim.x) {
      Vec<E, kVec> e = reinterpret_cast<const Vec<E, kVec>*>(ema)[v];
      const Vec<O, kVec> o = reinterpret_cast<const Vec<O, kVec>*>(online)[v];
#pragma unroll
      for (int j = 0; j < kVec; ++j) e.val[j] = ema_value(e.val[j], o.val[j], m, w);
      reinterpret_cast<Vec<E, kVec>*>(ema)[v] = e;
    }
    scalar_from = vectors * kVec;
  }
  for (int64_t i = scalar_from + threadIdx.x; i < n; i += blockDim.x) {
    ema[i] = ema_value(ema[i], online[i], m, w);
  }
}

template <typename E, typename O>
void launch_ema_chunks(
    const std::vector<at::Tensor>& ema, const std::vector<at::Tensor>& online,
    const std::vector<size_t>& pairs, double momentum, int64_t chunk_size, cudaStream_t stream) {
  using C = ema_compute_t<E>;
  const C m = static_cast<C>(momentum);
  const C w = static_cast<C>(1.0 - momentum);
  EmaChunkList list{};
  list.chunk_size = chunk_size;
  int tensors = 0;
  int blocks = 0;
  auto flush = [&] {
    if (blocks > 0) {
      launch_kernel(ema_multi_tensor_kernel<E, O>, dim3(blocks), dim3(kThreads), 0, stream, list, m, w);
    }
    blocks = 0;
  };
  for (size_t p : pairs) {
    const int64_t numel = ema[p].numel();
    if (numel == 0) continue;
    if (tensors == kMaxTensors) {
      flush();
      tensors = 0;
    }
    int slot = tensors++;
    list.ema[slot] = ema[p].data_ptr();
    list.online[slot] = online[p].const_data_ptr();
    list.numel[slot] = numel;
    const int64_t chunks = (numel + chunk_size - 1) / chunk_size;
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      if (blocks == kMaxBlocks) {
        flush();
        // Queued blocks are done with the earlier tensors; keep only this one.
        list.ema[0] = list.ema[slot];
        list.online[0] = list.online[slot];
        list.numel[0] = list.numel[slot];
        slot = 0;
        tensors = 1;
      }
      list.tensor_of_block[blocks] = static_cast<uint8_t>(slot);
      list.chunk_of_block[blocks] = static_cast<int32_t>(chunk);
      ++blocks;
    }
  }
  flush();
}

void ema_update_chunked_(
    at::TensorList ema, at::TensorList online, double momentum, int64_t chunk_size) {
  TORCH_CHECK_VALUE(
      chunk_size > 0 && chunk_size % kChunkMultiple == 0 &&
          (chunk_size - 1) / kChunkMultiple < (int64_t(1) << 28),
      "ssl_ops._ema_update_chunked_: chunk_size must be a positive multiple of ", kChunkMultiple,
      ", got ", chunk_size);
  check_ema_args(ema, online, momentum, kKernelDevice);
  if (ema.empty()) return;
  EmaOperands ops = prepare_ema_operands(ema, online);
  const DeviceGuard guard(ema[0].device());
  const cudaStream_t stream = current_stream(ema[0].device());
  // One launch sequence per (ema dtype, online dtype) pair; usually there is one.
  std::vector<std::pair<std::pair<at::ScalarType, at::ScalarType>, std::vector<size_t>>> groups;
  for (size_t i = 0; i < ops.ema.size(); ++i) {
    const auto key = std::make_pair(ops.ema[i].scalar_type(), ops.online[i].scalar_type());
    auto it = std::find_if(groups.begin(), groups.end(), [&](const auto& g) { return g.first == key; });
    if (it == groups.end()) it = groups.insert(groups.end(), {key, {}});
    it->second.push_back(i);
  }
  for (const auto& [types, pairs] : groups) {
    const auto [ema_type, online_type] = types;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, ema_type, "ema_update_cuda", [&] {
      using E = scalar_t;
      if (online_type == ema_type) {
        launch_ema_chunks<E, E>(ops.ema, ops.online, pairs, momentum, chunk_size, stream);
      } else if constexpr (std::is_same_v<E, float>) {
        if (online_type == at::kHalf) {
          launch_ema_chunks<float, at::Half>(ops.ema, ops.online, pairs, momentum, chunk_size, stream);
        } else {
          launch_ema_chunks<float, at::BFloat16>(
              ops.ema, ops.online, pairs, momentum, chunk_size, stream);
        }
      }
    });
  }
  ops.finish();
}

void ema_update_(at::TensorList ema, at::TensorList online, double momentum) {
  ema_update_chunked_(ema, online, momentum, kDefaultChunkSize);
}

}  // namespace

SSL_OPS_CUDA_LIBRARY_IMPL(m) {
  m.impl("ema_update_", &ema_update_);
  m.impl("_ema_update_chunked_", &ema_update_chunked_);
}

}  // namespace ssl_ops::cuda
