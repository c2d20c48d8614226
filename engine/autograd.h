#pragma once
// Reverse-mode autodiff on a dynamic tape (define-by-run), in the manner of micrograd:
// every differentiable op returns a tensor whose Node remembers the op's inputs and a backward function that turns
// dL/d(output) into dL/d(each input). Tensor::backward() sorts the graph once and runs the nodes in reverse
// topological order, summing gradients where a tensor was used more than once, then frees the graph.
#include <functional>
#include <vector>

#include "engine/tensor.h"

namespace moelab {

// Given dL/d(output), returns dL/d(input) for each input, in order (an undefined Tensor where none flows).
// Captures only what backward needs; it must not capture the output itself (that would be a reference cycle):
// capture `out.detach()` (same storage) instead.
using BackwardFn = std::function<std::vector<Tensor>(const Tensor& grad_out)>;

// A backward that may add an input's gradient to the gradient that input already holds: held[i] is that gradient
// when input i has one that nothing else holds (else undefined; held may also be empty), and returning held[i] itself
// as input i's gradient says that it was added to, so backward() adds nothing. A product adds in its GEMM (beta = 1)
// where an add would read both gradients and write a third tensor: x used by the q, k and v products, a weight's
// gradient over micro-batches (engine/ops/matmul.cpp).
using AccumulatingBackwardFn =
    std::function<std::vector<Tensor>(const Tensor& grad_out, const std::vector<Tensor>& held)>;

struct Node {
  const char* op = "";
  std::vector<Tensor> inputs;
  BackwardFn backward;  // always set: for an accumulating op, its accumulating_backward with no gradient held
  AccumulatingBackwardFn accumulating_backward;  // set by record_accumulating only
};

// Gradient recording is on by default; NoGradGuard turns it off in a scope (optimizer steps, evaluation, and the
// backward functions themselves, which are plain tensor code).
bool grad_enabled();
class NoGradGuard {
 public:
  NoGradGuard();
  ~NoGradGuard();
  NoGradGuard(const NoGradGuard&) = delete;
  NoGradGuard& operator=(const NoGradGuard&) = delete;

 private:
  bool previous_;
};

// Called by every differentiable op on its freshly computed output: when grad mode is on and some input requires a
// gradient, attaches a Node so that backward() can reach the inputs. Returns `out`.
Tensor record(const char* op, Tensor out, std::vector<Tensor> inputs, BackwardFn backward);
// The same for an op whose backward can add into the gradients its inputs hold (AccumulatingBackwardFn).
Tensor record_accumulating(const char* op, Tensor out, std::vector<Tensor> inputs, AccumulatingBackwardFn backward);

// Debug aid: when on, every recorded op checks its output for NaN and throws naming the op.
// Default: on when built with MOELAB_NAN_CHECKS or when the environment sets MOELAB_NAN_CHECKS=1.
void set_nan_checks(bool on);
bool nan_checks();

}  // namespace moelab
