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
// device copy); a new launch starts only when the table is full. CUDA 12.1 and
// newer take up to 32764 bytes of kernel parameters (Volta and newer, driver
// r530+), so the table holds 512 tensors and 3072 chunks: 3072 * 65536 = 201M
// elements per launch, so a 7B-parameter model is 35 launches, not the 333 a
// portable 4 KB table (320 chunks) would need; at ~4 us each that is 0.15 ms of
// launches against ~20 ms of memory traffic (84 GB at 4.3 TB/s, fp32).
// Older toolkits, and drivers older than 12.1 (checked once at run time), keep
// the 4 KB table (not run on such a driver yet: torch's default lazy module
// loading never loads the large-table kernel there; whether eager loading,
// CUDA_MODULE_LOADING=EAGER, tolerates it is unverified); so does the emulator
// unless a test has it pretend to a newer driver (it copies the parameters for
// every thread it runs).
//
// Note [EMA vector access]: a chunk whose ema and online pointers are both
// aligned to one vector (16 bytes of the wider type) is read and written in
// vectors, four per thread per step: all eight loads of a step are issued
// before the first store, so each thread keeps 64 bytes of reads in flight
// (one vector at a time cannot cover the memory latency at the occupancy a
// 512-thread block gets). The rest of the chunk and misaligned chunks (views at
// odd storage offsets) take the scalar path. chunk_size is a multiple of every
// vector width, so chunks of an aligned tensor stay aligned.
//
// Note [EMA tensor momentum]: with a tensor momentum (a schedule's value on
// the device) the host never reads the value: each block loads it (8 bytes
// from L2), rounds m and w = 1 - m as the host does for a number (so the two
// forms agree bit for bit) and traps on a value outside [0, 1] (NaN included)
// before it writes anything, so a bad value is an error (a CUDA error at the
// next synchronisation, as a device-side assert) that leaves every tensor as
// it was. No host sync, and CUDA graphs replay whatever value the tensor holds.
//
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cstdint>
#include <type_traits>

#include "../ema_check.h"
#include "compat.cuh"
#include "../message.h"

namespace ssl_ops::cuda {
namespace {

constexpr int kThreads = 512;
constexpr int kUnroll = 4;  // vectors per thread per step (Note [EMA vector access])
constexpr int64_t kDefaultChunkSize = 65536;
constexpr int64_t kChunkMultiple = 8;  // the widest vector, in elements

// The two table sizes of Note [EMA chunk lists]: the portable 4 KB of kernel
// parameters, and the 32764 bytes that CUDA 12.1+ takes where the driver
// does too (r530+; Volta and newer).
struct PortableTable {
  static constexpr int kTensors = 96, kBlocks = 320;
  static constexpr size_t kParamBytes = 4096;
};
struct LargeTable {
  static constexpr int kTensors = 512, kBlocks = 3072;
  static constexpr size_t kParamBytes = 32764;
};

template <typename Table>
struct EmaChunkList {
  using TensorSlot = std::conditional_t<(Table::kTensors <= 256), uint8_t, uint16_t>;
  void* ema[Table::kTensors];
  const void* online[Table::kTensors];
  int64_t numel[Table::kTensors];
  int64_t chunk_size;
  TensorSlot tensor_of_block[Table::kBlocks];
  int32_t chunk_of_block[Table::kBlocks];
};
// Where the kernel takes the momentum from (Note [EMA tensor momentum]).
struct MomentumSource {
  const void* tensor;  // null: the m and w passed by value
  bool is_double;      // the tensor's dtype: float64, else float32
};

// The other kernel parameters (m, w, MomentumSource) take 32 bytes at most.
static_assert(sizeof(EmaChunkList<PortableTable>) <= PortableTable::kParamBytes - 32, "parameters over the limit");
static_assert(sizeof(EmaChunkList<LargeTable>) <= LargeTable::kParamBytes - 32, "parameters over the limit");
static_assert(LargeTable::kTensors <= 65536, "tensor_of_block holds at most 16 bits");

// Whether this process may launch with the large table: this build's toolkit
// and the installed driver both at 12.1 or newer (a CUDA 12.0 driver, r525-r529,
// runs our 12.x-built code through its compatibility but refuses the larger
// parameters at launch). The emulator answers for the driver it pretends to
// have (ssl_emu::set_driver_version).
bool large_tables_supported() {
#if defined(SSL_OPS_CUDA_EMU)
  return ::ssl_emu::driver_version() >= 12010;
#elif defined(CUDART_VERSION) && CUDART_VERSION >= 12010
  static const bool supported = [] {
    int driver = 0;
    return cudaDriverGetVersion(&driver) == cudaSuccess && driver >= 12010;
  }();
  return supported;
#else
  return false;
#endif
}

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

template <typename E, typename O, typename Table>
__global__ void __launch_bounds__(kThreads)
    ema_multi_tensor_kernel(EmaChunkList<Table> list, ema_compute_t<E> m, ema_compute_t<E> w, MomentumSource from) {
  if (from.tensor != nullptr) {
    const double value = from.is_double ? *static_cast<const double*>(from.tensor)
                                        : static_cast<double>(*static_cast<const float*>(from.tensor));
    if (!(value >= 0.0 && value <= 1.0)) __trap();  // before any write
    m = static_cast<ema_compute_t<E>>(value);
    w = static_cast<ema_compute_t<E>>(1.0 - value);
  }
  constexpr int kVec = 16 / (sizeof(E) > sizeof(O) ? sizeof(E) : sizeof(O));
  const int tensor = list.tensor_of_block[blockIdx.x];
  const int64_t begin = int64_t(list.chunk_of_block[blockIdx.x]) * list.chunk_size;
  const int64_t rest = list.numel[tensor] - begin;
  const int64_t n = rest < list.chunk_size ? rest : list.chunk_size;
  E* __restrict__ ema = static_cast<E*>(list.ema[tensor]) + begin;
  const O* __restrict__ online = static_cast<const O*>(list.online[tensor]) + begin;
  using EV = Vec<E, kVec>;
  using OV = Vec<O, kVec>;

  int64_t scalar_from = 0;
  if (reinterpret_cast<uintptr_t>(ema) % sizeof(EV) == 0 &&
      reinterpret_cast<uintptr_t>(online) % sizeof(OV) == 0) {
    EV* __restrict__ ema_v = reinterpret_cast<EV*>(ema);
    const OV* __restrict__ online_v = reinterpret_cast<const OV*>(online);
    const int64_t vectors = n / kVec;
    const int64_t stride = blockDim.x;
    int64_t v = threadIdx.x;
    // Steps of kUnroll vectors per thread: loads first, then the stores.
    for (; v + (kUnroll - 1) * stride < vectors; v += kUnroll * stride) {
      EV e[kUnroll];
      OV o[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        e[u] = ema_v[v + u * stride];
        o[u] = online_v[v + u * stride];
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
        for (int j = 0; j < kVec; ++j) e[u].val[j] = ema_value(e[u].val[j], o[u].val[j], m, w);
        ema_v[v + u * stride] = e[u];
      }
    }
    for (; v < vectors; v += stride) {
      EV e = ema_v[v];
      const OV o = online_v[v];
#pragma unroll
      for (int j = 0; j < kVec; ++j) e.val[j] = ema_value(e.val[j], o.val[j], m, w);
      ema_v[v] = e;
    }
    scalar_from = vectors * kVec;
  }
  for (int64_t i = scalar_from + threadIdx.x; i < n; i += blockDim.x) {
    ema[i] = ema_value(ema[i], online[i], m, w);
  }
}

template <typename E, typename O, typename Table>
void launch_ema_chunks_with(
    const std::vector<at::Tensor>& ema, const std::vector<at::Tensor>& online,
    const std::vector<size_t>& pairs, double momentum, MomentumSource from, int64_t chunk_size,
    cudaStream_t stream) {
  using C = ema_compute_t<E>;
  using TensorSlot = typename EmaChunkList<Table>::TensorSlot;
  constexpr int kMaxTensors = Table::kTensors, kMaxBlocks = Table::kBlocks;
  const C m = static_cast<C>(momentum);
  const C w = static_cast<C>(1.0 - momentum);
  EmaChunkList<Table> list{};
  list.chunk_size = chunk_size;
  int tensors = 0;
  int blocks = 0;
  auto flush = [&] {
    if (blocks > 0) {
      launch_kernel(ema_multi_tensor_kernel<E, O, Table>, dim3(blocks), dim3(kThreads), 0, stream, list, m, w, from);
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
      list.tensor_of_block[blocks] = static_cast<TensorSlot>(slot);
      list.chunk_of_block[blocks] = static_cast<int32_t>(chunk);
      ++blocks;
    }
  }
  flush();
}

template <typename E, typename O>
void launch_ema_chunks(
    const std::vector<at::Tensor>& ema, const std::vector<at::Tensor>& online,
    const std::vector<size_t>& pairs, double momentum, MomentumSource from, int64_t chunk_size,
    cudaStream_t stream) {
#if defined(SSL_OPS_CUDA_EMU) || (defined(CUDART_VERSION) && CUDART_VERSION >= 12010)
  if (large_tables_supported()) {
    launch_ema_chunks_with<E, O, LargeTable>(ema, online, pairs, momentum, from, chunk_size, stream);
    return;
  }
#endif
  launch_ema_chunks_with<E, O, PortableTable>(ema, online, pairs, momentum, from, chunk_size, stream);
}

// momentum: the value, or (with from.tensor) unused: the kernels read it.
// The arguments other than the momentum are checked here.
void ema_update_from(at::TensorList ema, at::TensorList online, double momentum, MomentumSource from,
                     int64_t chunk_size) {
  TORCH_CHECK_VALUE(
      chunk_size > 0 && chunk_size % kChunkMultiple == 0 &&
          (chunk_size - 1) / kChunkMultiple < (int64_t(1) << 28),
      ssl_ops::message("ssl_ops._ema_update_chunked_: chunk_size must be a positive multiple of ", kChunkMultiple,
      ", got ", chunk_size));
  check_ema_tensors(ema, online, kKernelDevice);
  // chunk_of_block is int32 (Note [Launch limits]); checked before any tensor is written.
  for (size_t i = 0; i < ema.size(); ++i) {
    TORCH_CHECK_VALUE((ema[i].numel() - 1) / chunk_size < (int64_t(1) << 31),
                      ssl_ops::message("ssl_ops.ema_update_: ema[", i, "] has ", ema[i].numel(),
                                       " elements, over 2^31 chunks of ", chunk_size));
  }
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
  for (const auto& group : groups) {
    // Named copies, not structured bindings: lambdas may capture those only from C++20.
    const at::ScalarType ema_type = group.first.first;
    const at::ScalarType online_type = group.first.second;
    const std::vector<size_t>& pairs = group.second;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, ema_type, "ema_update_cuda", [&] {
      using E = scalar_t;
      if (online_type == ema_type) {
        launch_ema_chunks<E, E>(ops.ema, ops.online, pairs, momentum, from, chunk_size, stream);
      } else if constexpr (std::is_same_v<E, float>) {
        if (online_type == at::kHalf) {
          launch_ema_chunks<float, at::Half>(ops.ema, ops.online, pairs, momentum, from, chunk_size, stream);
        } else {
          launch_ema_chunks<float, at::BFloat16>(
              ops.ema, ops.online, pairs, momentum, from, chunk_size, stream);
        }
      }
    });
  }
  ops.finish();
}

void ema_update_chunked_(at::TensorList ema, at::TensorList online, double momentum, int64_t chunk_size) {
  check_momentum_value(momentum);
  ema_update_from(ema, online, momentum, MomentumSource{nullptr, false}, chunk_size);
}

void ema_update_(at::TensorList ema, at::TensorList online, double momentum) {
  ema_update_chunked_(ema, online, momentum, kDefaultChunkSize);
}

void ema_update_tensor_chunked_(at::TensorList ema, at::TensorList online, const at::Tensor& momentum,
                                int64_t chunk_size) {
  check_momentum_tensor(momentum, ema);
  const MomentumSource from{momentum.const_data_ptr(), momentum.scalar_type() == at::kDouble};
  ema_update_from(ema, online, /*momentum=*/0.0, from, chunk_size);
}

void ema_update_tensor_(at::TensorList ema, at::TensorList online, const at::Tensor& momentum) {
  ema_update_tensor_chunked_(ema, online, momentum, kDefaultChunkSize);
}

}  // namespace

SSL_OPS_CUDA_LIBRARY_IMPL(m) {
  m.impl("ema_update_", &ema_update_);
  m.impl("_ema_update_chunked_", &ema_update_chunked_);
  m.impl("ema_update_tensor_", &ema_update_tensor_);
  m.impl("_ema_update_tensor_chunked_", &ema_update_tensor_chunked_);
}

}  // namespace ssl_ops::cuda
