#include "ema_check.h"
#include "message.h"

#include <ATen/MemoryOverlap.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <unordered_map>

namespace ssl_ops {
namespace {

bool is_reduced_float(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16;
}

bool overlaps(const at::Tensor& a, const at::Tensor& b) {
  const auto status = at::get_overlap_status(a, b);
  return status == at::MemOverlapStatus::Full || status == at::MemOverlapStatus::Partial;
}

}  // namespace

void check_ema_args(
    at::TensorList ema, at::TensorList online, double momentum, c10::DeviceType device_type) {
  check_momentum_value(momentum);
  check_ema_tensors(ema, online, device_type);
}

void check_momentum_value(double momentum) {
  TORCH_CHECK_VALUE(
      std::isfinite(momentum) && momentum >= 0.0 && momentum <= 1.0,
      ssl_ops::message("ssl_ops.ema_update_: momentum must be in [0, 1], got ", momentum));
}

void check_momentum_tensor(const at::Tensor& momentum, at::TensorList ema) {
  TORCH_CHECK_VALUE(momentum.numel() == 1, ssl_ops::message(
      "ssl_ops.ema_update_: a tensor momentum must have one element, got shape ", momentum.sizes()));
  TORCH_CHECK_TYPE(momentum.scalar_type() == at::kFloat || momentum.scalar_type() == at::kDouble,
                   ssl_ops::message("ssl_ops.ema_update_: a tensor momentum must be float32 or float64, got dtype ",
                                    momentum.scalar_type()));
  TORCH_CHECK(ema.empty() || momentum.device() == ema[0].device(), ssl_ops::message(
      "ssl_ops.ema_update_: the momentum tensor is on ", momentum.device(), " but ema[0] is on ",
      ema.empty() ? momentum.device() : ema[0].device(), "; it must be on the parameters' device"));
}

void check_ema_tensors(at::TensorList ema, at::TensorList online, c10::DeviceType device_type) {
  TORCH_CHECK_VALUE(
      ema.size() == online.size(),
      ssl_ops::message("ssl_ops.ema_update_: ema and online must have the same length, got ", ema.size(),
      " and ", online.size()));
  if (ema.empty()) {
    return;
  }
  const c10::Device device = ema[0].device();
  TORCH_CHECK(
      device.type() == device_type, ssl_ops::message("ssl_ops.ema_update_: ema[0] is on ", device,
      ", but this kernel runs on ", c10::DeviceTypeName(device_type, /*lower_case=*/true)));
  // Tensors of one storage are checked against each other for overlap below.
  std::unordered_map<const void*, std::vector<size_t>> ema_by_storage;
  for (size_t i = 0; i < ema.size(); ++i) {
    const at::Tensor& e = ema[i];
    const at::Tensor& o = online[i];
    TORCH_CHECK(
        e.device() == device, ssl_ops::message("ssl_ops.ema_update_: ema[", i, "] is on ", e.device(),
        " but ema[0] is on ", device, "; all tensors must be on one device"));
    TORCH_CHECK(
        o.device() == device, ssl_ops::message("ssl_ops.ema_update_: online[", i, "] is on ", o.device(),
        " but ema[0] is on ", device, "; all tensors must be on one device"));
    TORCH_CHECK_TYPE(
        at::isFloatingType(e.scalar_type()), ssl_ops::message("ssl_ops.ema_update_: ema[", i,
        "] must be a floating-point tensor, got dtype ", e.scalar_type()));
    TORCH_CHECK_TYPE(
        o.scalar_type() == e.scalar_type() ||
            (e.scalar_type() == at::kFloat && is_reduced_float(o.scalar_type())),
        ssl_ops::message("ssl_ops.ema_update_: online[", i, "] has dtype ", o.scalar_type(), " but ema[", i,
        "] has dtype ", e.scalar_type(),
        "; online must match ema's dtype, or be Half/BFloat16 when ema is Float"));
    TORCH_CHECK_VALUE(
        e.sizes() == o.sizes(), ssl_ops::message("ssl_ops.ema_update_: online[", i, "] has shape ", o.sizes(),
        " but ema[", i, "] has shape ", e.sizes()));
    TORCH_CHECK(
        at::has_internal_overlap(e) != at::MemOverlap::Yes, ssl_ops::message("ssl_ops.ema_update_: ema[", i,
        "] has internally overlapping memory (an expanded view?) and cannot be updated in place"));
    TORCH_CHECK(
        e.numel() == 0 || !overlaps(e, o), ssl_ops::message("ssl_ops.ema_update_: online[", i,
        "] shares memory with ema[", i, "]; the EMA copy must be a separate tensor"));
    if (e.numel() > 0) {
      auto& same_storage = ema_by_storage[e.storage().unsafeGetStorageImpl()];
      for (size_t j : same_storage) {
        TORCH_CHECK(
            !overlaps(e, ema[j]), ssl_ops::message("ssl_ops.ema_update_: ema[", j, "] and ema[", i,
            "] share memory; each EMA tensor must appear once"));
      }
      same_storage.push_back(i);
    }
  }
}

EmaOperands prepare_ema_operands(at::TensorList ema, at::TensorList online) {
  EmaOperands ops;
  ops.ema.reserve(ema.size());
  ops.online.reserve(online.size());
  for (size_t i = 0; i < ema.size(); ++i) {
    at::Tensor e = ema[i];
    if (!e.is_non_overlapping_and_dense()) {
      at::Tensor dense = e.contiguous();
      ops.write_back_.emplace_back(dense, e);
      e = dense;
    }
    at::Tensor o = online[i];
    if (o.strides() != e.strides() || !o.is_non_overlapping_and_dense()) {
      // empty_like keeps the strides of a dense tensor, so o walks in e's order.
      o = at::empty_like(e, o.options()).copy_(o);
    }
    ops.ema.push_back(std::move(e));
    ops.online.push_back(std::move(o));
  }
  return ops;
}

void EmaOperands::finish() {
  for (auto& [dense, original] : write_back_) {
    original.copy_(dense);
  }
  write_back_.clear();
}

}  // namespace ssl_ops
