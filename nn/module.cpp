#include "nn/module.h"

namespace moelab::nn {

Tensor Module::add_parameter(const std::string& name, Tensor value) {
  value.set_requires_grad(true);
  parameters_.push_back({name, value});
  return value;
}

void Module::add_module(const std::string& name, Module& child) { children_.emplace_back(name, &child); }

void Module::collect(const std::string& prefix, std::vector<NamedTensor>& out) const {
  for (const auto& p : parameters_) out.push_back({prefix + p.name, p.tensor});
  for (const auto& [name, child] : children_) child->collect(prefix + name + ".", out);
}

std::vector<NamedTensor> Module::named_parameters() const {
  std::vector<NamedTensor> out;
  collect("", out);
  return out;
}

void Module::to(Device device) {
  for (NamedTensor& p : named_parameters()) p.tensor.move_to(device);
}

int64_t Module::parameter_count() const {
  int64_t n = 0;
  for (const auto& p : named_parameters()) n += p.tensor.numel();
  return n;
}

}  // namespace moelab::nn
