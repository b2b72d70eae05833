#pragma once
// Host version of nvcuda::wmma (<mma.h>) for the emulator.
//
// A fragment's layout across the lanes of a warp is opaque on the GPU, so here
// every lane's fragment holds the whole tile: x[r * cols + c] is element (r, c).
// Kernels that treat x[] element-wise (scaling, conversion) behave the same on
// both. Each lane loads its copy itself before the warp-wide check that all
// lanes passed the same pointer and stride, so a missing barrier before a load
// still shows as a race. mma_sync multiplies exactly and accumulates in float,
// in k order under schedule seed 0 and in a seed-dependent rotation of it
// otherwise: tensor cores round sums in their own order, so tests use tolerances.
// tf32 operands are truncated to 10 mantissa bits as the tensor cores read them.
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cuda_emu.h"

namespace nvcuda::wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
namespace precision {
struct tf32 {};
}  // namespace precision

namespace detail {
template <typename T>
struct storage {
  using type = T;
};
template <>
struct storage<precision::tf32> {
  using type = float;
};

template <typename Use, int M, int N, int K>
struct tile {
  static constexpr int rows = std::is_same_v<Use, matrix_b> ? K : M;
  static constexpr int cols = std::is_same_v<Use, matrix_a> ? K : N;
};

template <typename T, int M, int N, int K>
constexpr bool valid_shape() {
  const bool k8 = M == 16 && N == 16 && K == 8;  // tf32 operands, float accumulators
  const bool k16 = (M == 16 && N == 16 && K == 16) || (M == 32 && N == 8 && K == 16) ||
      (M == 8 && N == 32 && K == 16);
  if constexpr (std::is_same_v<T, precision::tf32>) {
    return k8;
  } else if constexpr (std::is_same_v<T, float>) {
    return k8 || k16;
  } else {
    return k16;
  }
}

inline float truncate_tf32(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  bits &= 0xffffe000u;
  std::memcpy(&v, &bits, 4);
  return v;
}

template <typename T>
inline float operand(T v) {
  if constexpr (std::is_same_v<T, float>) {
    return truncate_tf32(v);
  } else {
    return static_cast<float>(v);
  }
}

// Pointer and stride rules of load/store_matrix_sync on the GPU.
template <typename T>
inline void check_memory(const T* p, unsigned ldm, const char* op) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0) {
    ssl_emu::fail("wmma load/store pointer is not 256-bit aligned");
  }
  if ((ldm * sizeof(T)) % 16 != 0) {
    ssl_emu::fail("wmma load/store ldm is not a multiple of 16 bytes");
  }
  // Every lane of the warp must pass the same pointer and stride.
  const uint64_t mine = reinterpret_cast<uintptr_t>(p) ^ (uint64_t(ldm) << 48);
  const unsigned lanes = __activemask();
  const uint64_t* slots = ssl_emu::warp_gather(lanes, mine, op);
  bool uniform = true;
  for (unsigned other = 0; other < 32; ++other) {
    if (((lanes >> other) & 1u) && slots[other] != mine) uniform = false;
  }
  ssl_emu::warp_release();
  if (!uniform) ssl_emu::fail("lanes of one warp passed different pointers to a wmma load/store");
}
}  // namespace detail

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
class fragment {
  static_assert(detail::valid_shape<T, M, N, K>(), "unsupported wmma shape for this type");

 public:
  using element_type = typename detail::storage<T>::type;
  static constexpr int rows = detail::tile<Use, M, N, K>::rows;
  static constexpr int cols = detail::tile<Use, M, N, K>::cols;
  static constexpr int num_elements = rows * cols;
  element_type x[num_elements];
};

template <typename Use, int M, int N, int K, typename T, typename Layout, typename V>
inline void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, const V& value) {
  using E = typename fragment<Use, M, N, K, T, Layout>::element_type;
  for (int i = 0; i < f.num_elements; ++i) f.x[i] = static_cast<E>(value);
}

template <typename Use, int M, int N, int K, typename T, typename Layout, typename P>
inline void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const P* p, unsigned ldm) {
  static_assert(!std::is_same_v<Use, accumulator>, "accumulator loads take a layout_t");
  using Frag = fragment<Use, M, N, K, T, Layout>;
  constexpr bool row = std::is_same_v<Layout, row_major>;
  for (int r = 0; r < Frag::rows; ++r) {
    for (int c = 0; c < Frag::cols; ++c) {
      f.x[r * Frag::cols + c] = row ? p[size_t(r) * ldm + c] : p[size_t(c) * ldm + r];
    }
  }
  detail::check_memory(p, ldm, "wmma::load_matrix_sync");
}

template <int M, int N, int K, typename T, typename P>
inline void load_matrix_sync(
    fragment<accumulator, M, N, K, T>& f, const P* p, unsigned ldm, layout_t layout) {
  for (int r = 0; r < M; ++r) {
    for (int c = 0; c < N; ++c) {
      f.x[r * N + c] = layout == mem_row_major ? p[size_t(r) * ldm + c] : p[size_t(c) * ldm + r];
    }
  }
  detail::check_memory(p, ldm, "wmma::load_matrix_sync");
}

template <int M, int N, int K, typename T, typename P>
inline void store_matrix_sync(
    P* p, const fragment<accumulator, M, N, K, T>& f, unsigned ldm, layout_t layout) {
  for (int r = 0; r < M; ++r) {
    for (int c = 0; c < N; ++c) {
      P& dst = layout == mem_row_major ? p[size_t(r) * ldm + c] : p[size_t(c) * ldm + r];
      dst = static_cast<P>(f.x[r * N + c]);
    }
  }
  detail::check_memory(p, ldm, "wmma::store_matrix_sync");
}

template <int M, int N, int K, typename TA, typename LA, typename TB, typename LB, typename TC,
          typename TD>
inline void mma_sync(
    fragment<accumulator, M, N, K, TD>& d, const fragment<matrix_a, M, N, K, TA, LA>& a,
    const fragment<matrix_b, M, N, K, TB, LB>& b, const fragment<accumulator, M, N, K, TC>& c) {
  static_assert(std::is_same_v<TA, TB>, "wmma::mma_sync operands must have one type");
  ::ssl_emu::count_mma();
  // Tensor cores add the K products in an order of their own: under a nonzero
  // schedule seed each output element starts the k loop at its own rotation,
  // so the tests' tolerances must hold for more than one order.
  const uint64_t seed = ::ssl_emu::schedule_seed();
  float out[M * N];
  for (int i = 0; i < M; ++i) {
    for (int j = 0; j < N; ++j) {
      float sum = static_cast<float>(c.x[i * N + j]);
      const int start = seed == 0 ? 0 : static_cast<int>((seed * 0x9E3779B97F4A7C15ull + i * 131 + j * 7) % K);
      for (int step = 0; step < K; ++step) {
        const int k = (start + step) % K;
        sum += detail::operand(a.x[i * K + k]) * detail::operand(b.x[k * N + j]);
      }
      out[i * N + j] = sum;
    }
  }
  using D = typename fragment<accumulator, M, N, K, TD>::element_type;
  for (int i = 0; i < M * N; ++i) d.x[i] = static_cast<D>(out[i]);
}

// Rounds to the nearest tf32 value, ties away from zero (cvt.rna.tf32.f32).
inline float __float_to_tf32(float v) {
  if (!std::isfinite(v)) return v;
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  bits = (bits + 0x1000u) & 0xffffe000u;
  std::memcpy(&v, &bits, 4);
  return v;
}

}  // namespace nvcuda::wmma
