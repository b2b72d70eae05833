// The passes over S behind both contrastive ops (contrastive_passes.h): the
// route choice, the outputs and weights both routes share, and the merge of
// the statistics partials.
//
// Note [Contrastive routes]:
// - Fused (default, where choose_contrastive_route allows: bf16/fp16, and fp32
//   as TF32 where torch allows it, D <= 256 in 16-byte rows, bounded logits,
//   sm_80+): tensor-core tiles that never store S (contrastive_fused.cuh); no
//   vendor GEMM.
// - GEMM (everything else; SSL_OPS_CUDA_CONTRASTIVE_ROUTE=gemm forces it): each
//   chunk's S_c by the vendor GEMM in fp32, row kernels for the statistics and
//   the coefficients G_c, two more GEMMs for the gradient; O(c n + n D) memory
//   (contrastive_gemm.cu).
// - Why a fused route: the GEMM route moves 18 bytes per pair through memory and
//   launches about six kernels per chunk. Measured on an H200 (2026-11-28,
//   benchmarks/RESULTS.md): bf16, D = 128, NT-Xent 2N = 8192 forward+backward
//   1.6 ms against eager's 1.2.
// - Deterministic: no float atomics on either route and fixed chunk and split
//   orders, so repeated runs are bit-identical; torch's deterministic mode
//   changes no choice.
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/clamp_min.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>

#include "../message.h"
#include "contrastive_gemm_rows.cuh"
#include "contrastive_passes.h"
#include "launch_limits.h"
#include "tensor_core_arch.h"

namespace ssl_ops::cuda {
namespace {

enum class ContrastiveRoute { kFused, kGemm };

// The one place the route is chosen. SSL_OPS_CUDA_CONTRASTIVE_ROUTE, read once
// per call: "fused" (default) or "gemm" (the GEMM route everywhere, for tests,
// benchmarks and the selftest's fallback). The fused route takes unit rows of
// bf16/fp16 (D up to 256, a multiple of 8), or fp32 where torch allows TF32
// for matmuls (D up to 128, a multiple of 4): whole 16-byte chunks of at most
// 512 bytes a row, contiguous and 16-byte aligned, on sm_80+ (Note [Fused
// statistics pass], Note [Fused gradient pass]); exact fp32, fp64, other D and
// older archs take the GEMM route. Deterministic mode changes nothing:
// neither route uses atomics.
template <typename T>
ContrastiveRoute choose_contrastive_route(const ContrastiveSpec<T>& spec) {
  const char* value = std::getenv("SSL_OPS_CUDA_CONTRASTIVE_ROUTE");
  const bool forced_gemm = value != nullptr && std::strcmp(value, "gemm") == 0;
  TORCH_CHECK(forced_gemm || value == nullptr || *value == '\0' || std::strcmp(value, "fused") == 0,
              ssl_ops::message("SSL_OPS_CUDA_CONTRASTIVE_ROUTE must be \"fused\" or \"gemm\", got \"", value, "\""));
  if constexpr (!fused_route_dtype<T>()) {
    return ContrastiveRoute::kGemm;
  } else {
    if (forced_gemm || (std::is_same_v<T, float> && !tf32_allowed())) return ContrastiveRoute::kGemm;
    const int64_t d = spec.q_hat.size(1);
    const auto aligned = [](const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0; };
    const bool fits = spec.bounded && d > 0 && d <= fused_route_max_features<T>() && (d * int64_t(sizeof(T))) % 16 == 0 &&
        std::min(current_compute_capability(), loaded_code_arch()) >= 80 && spec.q_hat.is_contiguous() &&
        spec.k_hat.is_contiguous() && aligned(spec.q_hat) && aligned(spec.k_hat);
    return fits ? ContrastiveRoute::kFused : ContrastiveRoute::kGemm;
  }
}

}  // namespace

template <typename T>
ContrastiveResult<T> contrastive_passes(const ContrastiveSpec<T>& spec, c10::Device device, cudaStream_t stream) {
  using A = acc_t<T>;
  const ContrastiveRoute route = choose_contrastive_route(spec);
  const auto acc_opts = spec.q_hat.options().dtype(c10::CppTypeToScalarType<A>::value);
  const int64_t na = spec.q_hat.size(0), n = spec.k_hat.size(0), d = spec.q_hat.size(1);
  const bool stats = !spec.given_lse.defined();
  const bool grad = spec.grad_q || spec.grad_k;
  ContrastiveResult<T> out;
  if (stats) {
    out.lse = at::empty({na}, acc_opts);
    out.positive_sum = at::empty({na}, acc_opts);
    out.positive_count = at::empty({na}, acc_opts.dtype(at::kLong));
    if (spec.positives_lse) out.lse_positive = at::empty({na}, acc_opts);
    if (spec.rows_need_positives) out.row_loss = at::empty({na}, acc_opts);
    if (spec.initial_logit.defined() && grad) out.positive_coef = at::empty({na}, acc_opts);
  }
  if (na == 0 || (!grad && !stats)) {
    if (spec.grad_q) out.grad_q_hat = at::empty({na, d}, acc_opts);
    if (spec.grad_k) out.grad_k_hat = at::zeros({n, d}, acc_opts);
    return out;
  }

  PassWeights w;
  if (grad) {
    const at::Tensor& given = stats ? spec.weight : spec.given_weight;
    if (given.defined()) {
      const at::Tensor max_weight = at::clamp_min(given.abs().max(), std::numeric_limits<A>::min());
      w.weight_in = (given / max_weight).contiguous();
      w.product_scale = max_weight * (spec.scale / kGScale);
    } else {
      w.product_scale = at::full({}, spec.scale / kGScale, acc_opts);
    }
    w.weight = stats ? at::empty({na}, acc_opts) : w.weight_in;
    w.inv_count = stats ? at::empty({na}, acc_opts) : spec.given_inv_count;
  }
  if constexpr (fused_route_dtype<T>()) {
    if (route == ContrastiveRoute::kFused) {
      fused_passes(spec, w, out, device, stream);
      return out;
    }
  }
  gemm_passes(spec, w, out, device, stream);
  return out;
}

template <typename T>
void merge_row_stats(const ContrastiveSpec<T>& spec, ContrastiveResult<T>& out, const PassWeights& w, int64_t r0,
                     int64_t c, const at::Tensor& part_values, const at::Tensor& part_counts, int64_t splits,
                     cudaStream_t stream, float* anchor_terms) {
  using A = acc_t<T>;
  const bool grad = spec.grad_q || spec.grad_k;
  GemmMergeParams<A> m{};
  m.part_shift = part_values[0].template const_data_ptr<A>();
  m.part_sum = part_values[1].template const_data_ptr<A>();
  m.part_positive = part_values[2].template const_data_ptr<A>();
  m.part_count = part_counts.template const_data_ptr<int64_t>();
  if (spec.positives_lse) {
    m.part_pos_shift = part_values[3].template const_data_ptr<A>();
    m.part_pos_sum = part_values[4].template const_data_ptr<A>();
  }
  m.lse_positive = spec.positives_lse ? out.lse_positive.template data_ptr<A>() + r0 : nullptr;
  m.row_loss = spec.rows_need_positives ? out.row_loss.template data_ptr<A>() + r0 : nullptr;
  m.rows = c;
  m.splits = splits;
  m.initial_logit = spec.initial_logit.defined() ? spec.initial_logit.template const_data_ptr<A>() + r0 : nullptr;
  m.weight_in = w.weight_in.defined() ? w.weight_in.template const_data_ptr<A>() + r0 : nullptr;
  m.rows_need_positives = spec.rows_need_positives;
  m.exclude_positives = spec.exclude_positives;
  m.lse = out.lse.template data_ptr<A>() + r0;
  m.positive_sum = out.positive_sum.template data_ptr<A>() + r0;
  m.positive_count = out.positive_count.template data_ptr<int64_t>() + r0;
  // The merge writes the per-row terms of a gradient in the same pass.
  m.weight = grad ? w.weight.template data_ptr<A>() + r0 : nullptr;
  m.inv_count = grad ? w.inv_count.template data_ptr<A>() + r0 : nullptr;
  m.anchor_terms = grad && anchor_terms ? anchor_terms + 4 * r0 : nullptr;
  m.positive_coef = grad && out.positive_coef.defined() ? out.positive_coef.template data_ptr<A>() + r0 : nullptr;
  m.positive_coef_scale = static_cast<A>(spec.scale);
  launch_kernel(gemm_row_merge_kernel<A>,
                checked_grid("gemm_row_merge_kernel (chunk rows / 256)", (c + kGemmRowThreads - 1) / kGemmRowThreads),
                dim3(kGemmRowThreads), 0, stream, m);
}

#define SSL_OPS_INSTANTIATE_PASSES(T)                                                                         \
  template ContrastiveResult<T> contrastive_passes<T>(const ContrastiveSpec<T>&, c10::Device, cudaStream_t); \
  template void merge_row_stats<T>(const ContrastiveSpec<T>&, ContrastiveResult<T>&, const PassWeights&,       \
                                   int64_t, int64_t, const at::Tensor&, const at::Tensor&, int64_t, cudaStream_t, \
                                   float*);
SSL_OPS_INSTANTIATE_PASSES(float)
SSL_OPS_INSTANTIATE_PASSES(double)
SSL_OPS_INSTANTIATE_PASSES(c10::Half)
SSL_OPS_INSTANTIATE_PASSES(c10::BFloat16)
#undef SSL_OPS_INSTANTIATE_PASSES

}  // namespace ssl_ops::cuda
