#pragma once
// The kernels behind the router losses of moe/losses.cpp (docs/objective.md): the fused z-loss and the expert
// divergence (ED) loss. CPU: engine/cpu/router_losses.cpp; CUDA: engine/cuda/router_losses.cu. F is the element type
// of the logits or probabilities (f32 or f64); the ED math runs in double on both devices.
#include "engine/kernels.h"

namespace moelab {

// Probabilities are clamped at this before any log (moe::kProbFloor, moe/divergence.h).
constexpr double kRouterProbFloor = 1e-12;

// ---- z-loss -----------------------------------------------------------------------------------------------------------
// logits [N, E]: lse f64 [N] = the rows' logsumexp, loss [] = sum_n lse[n]^2 / N.
DECLARE_KERNEL(z_loss_forward, (const Tensor& logits, const Tensor& loss, const Tensor& lse))
// dlogits [N, E] = g * 2 lse[n] softmax(z_n) / N, softmax(z_n) = exp(z_n - lse[n]); g is the upstream gradient [].
DECLARE_KERNEL(z_loss_backward, (const Tensor& logits, const Tensor& lse, const Tensor& g, const Tensor& dlogits))

// ---- expert divergence ------------------------------------------------------------------------------------------------
// probs [B*T, E] -> means f64 [B, E]: pbar_s = (1/T) * the sum of sequence s's T rows, in token order.
DECLARE_KERNEL(sequence_means, (const Tensor& probs, const Tensor& means))
// The forward past the sequence means, for M domains. Inputs: means f64 [B, E]; domains i32 [B] in [0, M); rest
// f64 [M, E], the domain sums of the optimizer step's other micro-batches (undefined: none); counts f64 [M], the
// pooled number of sequences of each domain (this batch's plus rest's; at least two are > 0: the present domains).
//   Q_j = (sum of pbar_s over the sequences of domain j, in order, + rest_j) / counts_j
//   loss [] (F) = mean over the pairs a < b of present domains of -log(JSD(Q_a, Q_b) + eps) (neg_log) or of -JSD
//   grad_q f64 [M, E]: G_j = dloss/dQ_j = sum over the pairs with j of dloss/dJSD * 0.5 (log Q_j - log m) (0 where j
//   is absent), m = (Q_a + Q_b) / 2.
DECLARE_KERNEL(expert_divergence_forward,
               (const Tensor& means, const Tensor& domains, const Tensor& rest, const Tensor& counts, bool neg_log,
                double eps, const Tensor& loss, const Tensor& grad_q))
// dprobs [B*T, E]: every token of sequence s gets g * G_d(s) / (T counts[d(s)]); g is the upstream gradient [] (F).
DECLARE_KERNEL(expert_divergence_backward, (const Tensor& g, const Tensor& grad_q, const Tensor& domains,
                                            const Tensor& counts, const Tensor& dprobs))

}  // namespace moelab
