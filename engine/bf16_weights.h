#pragma once
// The bf16 copies of a model's f32 parameters under mixed precision (engine/precision.h). Without them every product
// that multiplies a weight rounds it again: once in the forward, again in the experts' backward, once per
// micro-batch. With them each parameter has one bf16 copy that every product of a step's forwards and backwards
// reads (PyTorch's autocast caches its casts of the weights the same way, for one autocast region), and the optimizer
// that updates the parameters writes their new copies in the same pass (optim::AdamW::keep_bf16_weights): a step then
// rounds no weight. The update writes 2 bytes more per element; each product reads 2 bytes where rounding read 4 and
// wrote 2.
//
// The products find the copies through the precision guard that holds them (PrecisionGuard's `weights`): a product of
// a parameter, or of a view of one (slice_rows, reshape: one range of its elements), multiplies that range of the
// copy. A copy is made when a product first asks for it, so parameters that no bf16 product multiplies (embeddings,
// norms, the f32 router) have none, and the optimizer writes only the copies that exist. A copy holds the bits
// round_to_bf16 gives its parameter as long as nothing but that optimizer writes the parameter; whoever writes them
// otherwise (a checkpoint's load, a move to another device) calls refresh() before the next product.
#include <memory>
#include <unordered_map>
#include <vector>

#include "engine/tensor.h"

namespace moelab {

class Bf16Weights {
 public:
  // The f32 tensors `params`, none rounded yet.
  explicit Bf16Weights(std::vector<Tensor> params);

  // The copy of x's elements when x is one of the parameters or a view of one (a range of its elements), made on first
  // use; else an undefined tensor. x's shape, on the parameter's device.
  Tensor copy_of(const Tensor& x) const;
  // A parameter's copy if a product has made it, else an undefined tensor: what the optimizer rewrites.
  Tensor made_copy_of(const Tensor& param) const;
  // Drops every copy, each made again at its next use (after a write the optimizer did not make, or a move).
  void refresh();

 private:
  struct Copy {
    Tensor param;
    std::shared_ptr<Storage> storage;  // the parameter's when registered: kept alive, so its address names no other
    int64_t offset = 0;                // the parameter's first element in it
    mutable Tensor bf16;               // undefined until a product asks
  };
  // The copy whose parameter holds x's elements, and where they begin in it; null if none.
  const Copy* find(const Tensor& x, int64_t& begin) const;

  std::vector<Tensor> params_;
  std::unordered_map<const Storage*, Copy> copies_;  // by the parameter's storage, which its views share
};

}  // namespace moelab
