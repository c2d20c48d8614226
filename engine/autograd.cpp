#include "engine/autograd.h"

#include <fmt/format.h>

#include <cmath>
#include <cstdlib>
#include <stdexcept>
#include <unordered_set>

#include "engine/ops.h"

namespace moelab {

// ---- grad mode -------------------------------------------------------------------------------------------------------

static thread_local bool grad_mode = true;

bool grad_enabled() { return grad_mode; }
NoGradGuard::NoGradGuard() : previous_(grad_mode) { grad_mode = false; }
NoGradGuard::~NoGradGuard() { grad_mode = previous_; }

// ---- NaN checks (NaN only: -inf is a legitimate value, e.g. an attention mask) ------------------------------------------------------------------------------------------------------

static bool nan_checks_default() {
#ifdef MOELAB_NAN_CHECKS
  return true;
#else
  const char* env = std::getenv("MOELAB_NAN_CHECKS");
  return env && std::string(env) == "1";
#endif
}
static bool nan_checks_on = nan_checks_default();
void set_nan_checks(bool on) { nan_checks_on = on; }
bool nan_checks() { return nan_checks_on; }

// Throws at the first NaN among t's values (its elements, as T), naming the op and t.
template <class T> static void check_no_nan(const char* op, const std::vector<T>& values, const Tensor& t) {
  for (size_t i = 0; i < values.size(); ++i)
    if (std::isnan(values[i]))
      throw std::runtime_error(fmt::format("NaN check: op '{}' produced {} at flat index {} of its output {}", op,
                                           static_cast<double>(values[i]), i, t.str()));
}

static void check_finite(const char* op, const Tensor& t) {
  if (t.dtype() == DType::F32) check_no_nan(op, t.to_vector<float>(), t);
  if (t.dtype() == DType::F64) check_no_nan(op, t.to_vector<double>(), t);
  if (t.dtype() == DType::BF16) {
    std::vector<float> values;
    for (bf16 v : t.to_vector<bf16>()) values.push_back(to_float(v));
    check_no_nan(op, values, t);
  }
}

// ---- recording -------------------------------------------------------------------------------------------------------

// The node record() attaches, or none when out takes no gradient.
static std::shared_ptr<Node> node_for(const char* op, const Tensor& out, std::vector<Tensor>& inputs) {
  if (nan_checks()) check_finite(op, out);
  if (!grad_mode || out.dtype() == DType::I32) return nullptr;  // integers carry no gradient
  bool needs_grad = false;
  for (const Tensor& t : inputs) needs_grad = needs_grad || (t.defined() && t.requires_grad());
  if (!needs_grad) return nullptr;
  auto node = std::make_shared<Node>();
  node->op = op;
  node->inputs = std::move(inputs);
  return node;
}

Tensor record(const char* op, Tensor out, std::vector<Tensor> inputs, BackwardFn backward) {
  std::shared_ptr<Node> node = node_for(op, out, inputs);
  if (!node) return out;
  node->backward = std::move(backward);
  out.impl()->requires_grad = true;
  out.impl()->grad_fn = std::move(node);
  return out;
}

Tensor record_accumulating(const char* op, Tensor out, std::vector<Tensor> inputs, AccumulatingBackwardFn backward) {
  std::shared_ptr<Node> node = node_for(op, out, inputs);
  if (!node) return out;
  node->backward = [backward](const Tensor& g) { return backward(g, {}); };
  node->accumulating_backward = std::move(backward);
  out.impl()->requires_grad = true;
  out.impl()->grad_fn = std::move(node);
  return out;
}

// ---- backward --------------------------------------------------------------------------------------------------------

// held + g, a tensor's gradients from two of its uses, in the tensor's dtype. `add` takes no bf16: bf16 gradients are
// added in f32, and the sum rounded once for a bf16 activation (as a product adds into one, engine/ops/matmul.cpp) or
// kept in f32 for an f32 weight (the experts' bf16 weight gradients over micro-batches: moe/dispatch.cpp).
static Tensor sum_of_gradients(const Tensor& held, const Tensor& g, DType dtype) {
  if (held.dtype() != DType::BF16 && g.dtype() != DType::BF16) return add(held, g);
  return to_dtype(add(to_dtype(held, DType::F32), to_dtype(g, DType::F32)), dtype);
}

// Tensors reachable from root through grad_fn inputs, each after all tensors it depends on (iterative DFS, so deep
// graphs cannot overflow the stack).
static std::vector<Tensor> topological_order(const Tensor& root) {
  std::vector<Tensor> order;
  std::unordered_set<TensorImpl*> visited;
  struct Frame {
    Tensor tensor;
    size_t next_input;
  };
  std::vector<Frame> stack{{root, 0}};
  visited.insert(root.impl());
  while (!stack.empty()) {
    Frame& frame = stack.back();
    const auto& node = frame.tensor.grad_fn();
    if (node && frame.next_input < node->inputs.size()) {
      const Tensor& input = node->inputs[frame.next_input++];
      if (input.defined() && input.requires_grad() && visited.insert(input.impl()).second) stack.push_back({input, 0});
    } else {
      order.push_back(frame.tensor);
      stack.pop_back();
    }
  }
  return order;
}

void Tensor::backward() const {
  if (numel() != 1) throw std::invalid_argument("backward() needs a one-element tensor (a loss), got " + str());
  if (!requires_grad()) throw std::invalid_argument("backward() of a tensor that does not require a gradient");
  std::vector<Tensor> order = topological_order(*this);
  NoGradGuard no_grad;  // backward functions are plain tensor code; they are not themselves recorded
  Tensor seed = ones_like(*this);
  impl_->grad = (!impl_->grad_fn && impl_->grad.defined()) ? add(impl_->grad, seed) : seed;
  for (auto it = order.rbegin(); it != order.rend(); ++it) {
    TensorImpl& t = *it->impl();
    if (!t.grad_fn) continue;  // a leaf: keeps its accumulated gradient
    Node& node = *t.grad_fn;
    if (!node.backward) throw std::logic_error(fmt::format("backward through op '{}' whose graph was freed", node.op));
    if (!t.grad.defined()) continue;  // nothing flowed here
    std::vector<Tensor> input_grads;
    std::vector<Tensor> held;  // for an accumulating node: the gradients the inputs hold that nothing else holds
    if (node.accumulating_backward) {
      held.resize(node.inputs.size());
      for (size_t i = 0; i < node.inputs.size(); ++i) {
        const Tensor& input = node.inputs[i];
        if (input.defined() && input.requires_grad() && input.impl()->grad.defined() && input.impl()->grad.sole_owner())
          held[i] = input.impl()->grad;
      }
      input_grads = node.accumulating_backward(t.grad, held);
    } else {
      input_grads = node.backward(t.grad);
    }
    for (size_t i = 0; i < node.inputs.size(); ++i) {
      const Tensor& input = node.inputs[i];
      if (i >= input_grads.size() || !input_grads[i].defined() || !input.defined() || !input.requires_grad()) continue;
      Tensor& g = input_grads[i];
      if (g.shape() != input.shape())
        throw std::logic_error(fmt::format("op '{}': backward returned gradient {} for input {} (input {})", node.op,
                                           g.str(), i, input.str()));
      // Out of place: a backward may hand the same tensor (or views of it) to several inputs, e.g. add. A leaf keeps
      // its gradient after backward and optimizers scale it in place, so a leaf's first gradient must be its own:
      // the backward's tensor itself when nothing else holds it or its memory (a product's weight gradient, the
      // usual case: no copy), else a copy.
      TensorImpl& in = *input.impl();
      if (i < held.size() && held[i].defined() && g.impl() == held[i].impl()) continue;  // the node added to it
      if (in.grad.defined())
        in.grad = sum_of_gradients(in.grad, g, input.dtype());
      else
        in.grad = (in.grad_fn || g.sole_owner()) ? std::move(g) : clone(g);
    }
    // Free this part of the graph as soon as it is done: the gradient of an intermediate tensor and its node's
    // references to the inputs.
    t.grad = Tensor();
    node.inputs.clear();
    node.backward = nullptr;
    node.accumulating_backward = nullptr;
  }
}

}  // namespace moelab
