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
    Copy copy{impl.storage, impl.offset, p.numel(), Tensor::empty(p.shape(), DType::BF16, p.device())};
    KERNEL(round_to_bf16, p.device())(p, copy.bf16);
    if (!copies_.emplace(impl.storage.get(), std::move(copy)).second)
      fail("Bf16Weights: two parameters share one storage ({})", p.str());
  }
}

Tensor Bf16Weights::copy_of(const Tensor& x) const {
  if (!x.defined() || x.dtype() != DType::F32) return Tensor();
  const TensorImpl& impl = *x.impl();
  const auto it = copies_.find(impl.storage.get());
  if (it == copies_.end()) return Tensor();
  const Copy& copy = it->second;
  const int64_t begin = impl.offset - copy.offset;  // x's first element in the parameter
  if (begin < 0 || begin + x.numel() > copy.numel) return Tensor();
  // The same range of the copy, in x's shape: a view of the copy's storage.
  auto view = std::make_shared<TensorImpl>();
  view->shape = x.shape();
  view->dtype = DType::BF16;
  view->storage = copy.bf16.impl()->storage;
  view->offset = copy.bf16.impl()->offset + begin;
  return Tensor(std::move(view));
}

}  // namespace moelab
