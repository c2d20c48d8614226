#include "engine/bf16_weights.h"

#include "engine/error.h"
#include "engine/kernels/matmul.h"

namespace moelab {

Bf16Weights::Bf16Weights(std::vector<Tensor> params) : params_(std::move(params)) {
  for (const Tensor& p : params_)
    if (!p.defined() || p.dtype() != DType::F32) fail("Bf16Weights: parameters must be f32, got {}", p.str());
  refresh();
}

void Bf16Weights::refresh() {
  copies_.clear();
  for (const Tensor& p : params_) {
    const TensorImpl& impl = *p.impl();
    if (!copies_.emplace(impl.storage.get(), Copy{p, impl.storage, impl.offset, Tensor()}).second)
      fail("Bf16Weights: two parameters share one storage ({})", p.str());
  }
}

const Bf16Weights::Copy* Bf16Weights::find(const Tensor& x, int64_t& begin) const {
  if (!x.defined() || x.dtype() != DType::F32) return nullptr;
  const TensorImpl& impl = *x.impl();
  const auto it = copies_.find(impl.storage.get());
  if (it == copies_.end()) return nullptr;
  const Copy& copy = it->second;
  begin = impl.offset - copy.offset;
  return begin >= 0 && begin + x.numel() <= copy.param.numel() ? &copy : nullptr;
}

Tensor Bf16Weights::copy_of(const Tensor& x) const {
  int64_t begin = 0;
  const Copy* copy = find(x, begin);
  if (!copy) return Tensor();
  if (!copy->bf16.defined()) {
    copy->bf16 = Tensor::empty(copy->param.shape(), DType::BF16, copy->param.device());
    KERNEL(round_to_bf16, copy->param.device())(copy->param, copy->bf16);
  }
  // The same range of the copy, in x's shape: a view of the copy's storage.
  auto view = std::make_shared<TensorImpl>();
  view->shape = x.shape();
  view->dtype = DType::BF16;
  view->storage = copy->bf16.impl()->storage;
  view->offset = copy->bf16.impl()->offset + begin;
  return Tensor(std::move(view));
}

Tensor Bf16Weights::made_copy_of(const Tensor& param) const {
  int64_t begin = 0;
  const Copy* copy = find(param, begin);
  return copy && begin == 0 && param.numel() == copy->param.numel() ? copy->bf16 : Tensor();
}

}  // namespace moelab
