#pragma once
// Module: a named tree of parameters. Checkpoint names are the paths through the tree
// ("layers.0.attn.wqkv.weight"), so a module's registration names are the checkpoint names of docs/model.md.
#include <string>
#include <utility>
#include <vector>

#include "engine/tensor.h"

namespace moelab::nn {

struct NamedTensor {
  std::string name;
  Tensor tensor;
};

class Module {
 public:
  Module() = default;
  virtual ~Module() = default;
  // Children are registered by address: a module never moves once built.
  Module(const Module&) = delete;
  Module& operator=(const Module&) = delete;

  // Every parameter below this module in registration order, named by its path.
  std::vector<NamedTensor> named_parameters() const;
  int64_t parameter_count() const;
  // Moves every parameter to `device` in place (the module's own handles see it: Tensor::move_to).
  void to(Device device);

 protected:
  // Registers a trainable tensor (marks it requires_grad) and returns the handle the module keeps.
  Tensor add_parameter(const std::string& name, Tensor value);
  void add_module(const std::string& name, Module& child);

 private:
  void collect(const std::string& prefix, std::vector<NamedTensor>& out) const;
  std::vector<NamedTensor> parameters_;
  std::vector<std::pair<std::string, Module*>> children_;
};

}  // namespace moelab::nn
