#pragma once
// GEMMs whose products accumulate in the accumulation type (fp32 for fp16/bf16
// operands, else the operands' own): cuBLAS through ATen, used by the
// contrastive GEMM route (contrastive_gemm.cu) and the cosine matrix.
// Under the emulator they run as CPU at::mm on operands widened the way the
// tensor cores read them.
#include <ATen/core/Tensor.h>
#include <ATen/Context.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/bitwise_and.h>
#include <ATen/ops/mm.h>

#include <cstdint>

#include "compat.cuh"

namespace ssl_ops::cuda {

#if defined(SSL_OPS_CUDA_EMU)
// What the tensor cores read: half operands exactly, fp32 truncated to TF32
// when allowed. ssl_emu::half_gemm_count counts the GEMMs whose first operand
// is fp16/bf16 (tests: which operands a route hands the vendor GEMM).
inline at::Tensor gemm_operand(const at::Tensor& x, at::ScalarType acc) {
  at::Tensor wide = x.to(acc);
  if (x.scalar_type() == at::kFloat && at::globalContext().allowTF32CuBLAS()) {
    wide = at::bitwise_and(wide.view(at::kInt), int32_t(0xFFFFE000)).view(at::kFloat);
  }
  return wide;
}
inline void count_gemm(const at::Tensor& a) {
  if (a.scalar_type() == at::kHalf || a.scalar_type() == at::kBFloat16) ::ssl_emu::count_half_gemm();
}
inline void mm_acc_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  count_gemm(a);
  at::mm_out(out, gemm_operand(a, out.scalar_type()), gemm_operand(b, out.scalar_type()));
}
inline void addmm_acc_(at::Tensor& acc, const at::Tensor& a, const at::Tensor& b) {
  count_gemm(a);
  at::addmm_out(acc, acc, gemm_operand(a, acc.scalar_type()), gemm_operand(b, acc.scalar_type()));
}
// out = a @ b in a's dtype: products accumulated as the tensor cores do, rounded once.
inline void mm_round_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  count_gemm(a);
  const at::ScalarType acc = a.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  out.copy_(at::mm(gemm_operand(a, acc), gemm_operand(b, acc)));
}
#elif defined(SSL_OPS_HAVE_MM_OUT_DTYPE)
// fp16 operands with an fp32 result are refused by ATen when the user allows
// fp16 accumulation in cuBLAS: then the operands are widened (exact) instead.
inline bool widen_operands(const at::Tensor& a) {
  return a.scalar_type() == at::kHalf && at::globalContext().allowFP16AccumulationCuBLAS();
}
// out = a @ b: fp16/bf16 operands with an fp32 result (aten::mm.dtype_out:
// cuBLAS accumulates and stores fp32); fp32 (TF32 per torch's setting) and fp64 as they are.
inline void mm_acc_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() == out.scalar_type()) {
    at::mm_out(out, a, b);
  } else if (widen_operands(a)) {
    at::mm_out(out, a.to(out.scalar_type()), b.to(out.scalar_type()));
  } else {
    at::mm_out(out, a, b, out.scalar_type());
  }
}
// acc += a @ b. Half operands: the product in fp32, then one add (addmm.dtype
// wants its bias in the operands' dtype).
inline void addmm_acc_(at::Tensor& acc, const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() == acc.scalar_type()) {
    at::addmm_out(acc, acc, a, b);  // beta = 1: accumulates in place
  } else if (widen_operands(a)) {
    at::addmm_out(acc, acc, a.to(acc.scalar_type()), b.to(acc.scalar_type()));
  } else {
    acc.add_(at::mm(a, b, acc.scalar_type()));
  }
}
// out = a @ b in a's dtype, as matmul forms it: cuBLAS accumulates fp16/bf16
// products in fp32, though under torch's allow_{fp16,bf16}_reduced_precision_reduction
// (on by default) split-K partial sums may be rounded to the output dtype. With
// fp16 accumulation allowed, the operands are widened instead.
inline void mm_round_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  if (widen_operands(a)) {
    out.copy_(at::mm(a.to(at::kFloat), b.to(at::kFloat)));
  } else {
    at::mm_out(out, a, b);
  }
}
#else
// Older torch without aten::mm.dtype: half operands widened to fp32 (exact, so
// the same products), at SGEMM speed.
inline void mm_acc_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  at::mm_out(out, a.to(out.scalar_type()), b.to(out.scalar_type()));
}
inline void addmm_acc_(at::Tensor& acc, const at::Tensor& a, const at::Tensor& b) {
  at::addmm_out(acc, acc, a.to(acc.scalar_type()), b.to(acc.scalar_type()));
}
inline void mm_round_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) { at::mm_out(out, a, b); }
#endif


}  // namespace ssl_ops::cuda
