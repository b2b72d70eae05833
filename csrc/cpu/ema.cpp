// EMA update of a momentum encoder, CPU kernel.
//
//   ema[i] <- momentum * ema[i] + (1 - momentum) * online[i]   (every pair, elementwise)
//
// computed as fma(m, ema, w * online) with m = momentum and w = 1 - momentum
// (rounded once from double) in float, or double for float64 tensors: the same
// expression as csrc/cuda/ema.cu, so both backends agree bit for bit.
//
// All tensors are walked as one virtual concatenation split into grains by
// at::parallel_for, so hundreds of small tensors cost one thread-pool dispatch,
// not one each. The inner loop is compiled twice (baseline and AVX2+FMA) and
// picked at run time.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "../ema_check.h"
#include "cpu_isa.h"

namespace ssl_ops::cpu {
namespace {

constexpr int64_t kGrainElements = 32768;

template <typename E, typename O>
SSL_OPS_ALWAYS_INLINE inline void ema_span(
    E* __restrict__ ema, const O* __restrict__ online, int64_t n, ema_compute_t<E> m,
    ema_compute_t<E> w) {
  using C = ema_compute_t<E>;
  for (int64_t i = 0; i < n; ++i) {
    ema[i] = static_cast<E>(std::fma(m, static_cast<C>(ema[i]), w * static_cast<C>(online[i])));
  }
}

template <typename E, typename O>
SSL_OPS_TARGET_AVX2 void ema_span_avx2(
    E* ema, const O* online, int64_t n, ema_compute_t<E> m, ema_compute_t<E> w) {
  ema_span(ema, online, n, m, w);
}

template <typename E, typename O>
void ema_span_dispatch(void* ema, const void* online, int64_t n, double momentum) {
  using C = ema_compute_t<E>;
  const C m = static_cast<C>(momentum);
  const C w = static_cast<C>(1.0 - momentum);
  if (cpu_has_avx2_fma()) {
    ema_span_avx2(static_cast<E*>(ema), static_cast<const O*>(online), n, m, w);
  } else {
    ema_span(static_cast<E*>(ema), static_cast<const O*>(online), n, m, w);
  }
}

using SpanFn = void (*)(void*, const void*, int64_t, double);

SpanFn span_fn_for(at::ScalarType ema_type, at::ScalarType online_type) {
  SpanFn fn = nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, ema_type, "ema_update_cpu", [&] {
    using E = scalar_t;
    if (online_type == ema_type) {
      fn = &ema_span_dispatch<E, E>;
    } else if constexpr (std::is_same_v<E, float>) {
      fn = online_type == at::kHalf ? &ema_span_dispatch<float, at::Half>
                                    : &ema_span_dispatch<float, at::BFloat16>;
    }
  });
  TORCH_INTERNAL_ASSERT(fn != nullptr, "unvalidated dtype pair reached the EMA kernel");
  return fn;
}

void ema_update_(at::TensorList ema, at::TensorList online, double momentum) {
  check_ema_args(ema, online, momentum, c10::kCPU);
  EmaOperands ops = prepare_ema_operands(ema, online);
  const size_t count = ops.ema.size();
  std::vector<int64_t> starts(count + 1, 0);  // offsets in the virtual concatenation
  std::vector<SpanFn> fns(count);
  for (size_t i = 0; i < count; ++i) {
    starts[i + 1] = starts[i] + ops.ema[i].numel();
    fns[i] = span_fn_for(ops.ema[i].scalar_type(), ops.online[i].scalar_type());
  }
  at::parallel_for(0, starts[count], kGrainElements, [&](int64_t begin, int64_t end) {
    size_t t = std::upper_bound(starts.begin(), starts.end(), begin) - starts.begin() - 1;
    for (int64_t pos = begin; pos < end; ++t) {
      const int64_t stop = std::min(end, starts[t + 1]);
      if (stop > pos) {
        const int64_t offset = pos - starts[t];
        const at::Tensor& e = ops.ema[t];
        const at::Tensor& o = ops.online[t];
        fns[t](
            static_cast<char*>(e.data_ptr()) + offset * e.element_size(),
            static_cast<const char*>(o.const_data_ptr()) + offset * o.element_size(),
            stop - pos, momentum);
      }
      pos = stop;
    }
  });
  ops.finish();
}

// A tensor momentum: on the CPU its value costs nothing to read, so it is
// checked before anything is written, and the update is the number's.
void ema_update_tensor_(at::TensorList ema, at::TensorList online, const at::Tensor& momentum) {
  check_momentum_tensor(momentum, ema);
  ema_update_(ema, online, momentum.item<double>());
}

}  // namespace

TORCH_LIBRARY_IMPL(ssl_ops, CPU, m) {
  m.impl("ema_update_", &ema_update_);
  m.impl("ema_update_tensor_", &ema_update_tensor_);
}

}  // namespace ssl_ops::cpu
