// CUDA kernels of engine/kernels/router_losses.h: the fused z-loss and the expert divergence loss (docs/objective.md).
// The CPU kernels (engine/cpu/router_losses.cpp) are their reference in the tests. F is the element type (float or
// double); the sums and the whole ED computation run in double. Nothing comes back to the host: the ED loss and its
// per-domain gradient G_j are computed on the device (the M x M pairwise part by one block), and every backward reads
// the upstream gradient g on the device.
#include "engine/kernels/router_losses.h"

#include <cmath>

#include "engine/cuda/device.cuh"
#include "engine/cuda/reduce.cuh"

namespace moelab::cuda {

constexpr int kThreads = 256;      // one-item-per-thread kernels
constexpr int kRowThreads = 256;   // one-row-per-block kernels
constexpr int kPairThreads = 128;  // the one block of the pairwise JSD (threads over the E experts)

// ---- z-loss -----------------------------------------------------------------------------------------------------------

// One team per row r (reduce.cuh: a warp for up to 32 experts): lse[r] = max + log(sum exp(z - max)), the
// exponentials in F (as the CPU's), summed in double.
template <class F> __global__ void z_loss_rows_kernel(const F* logits, int64_t N, int64_t E, double* lse) {
  const int64_t row = team_row();
  if (row >= N) return;
  const F* z = logits + row * E;
  F m = -INFINITY;
  for (int64_t j = threadIdx.x; j < E; j += blockDim.x) m = z[j] > m ? z[j] : m;
  m = team_max(m);
  double total = 0;
  for (int64_t j = threadIdx.x; j < E; j += blockDim.x) total += static_cast<double>(exp(z[j] - m));
  total = team_sum(total);
  if (threadIdx.x == 0) lse[row] = static_cast<double>(m) + log(total);
}

// One block: loss = sum_r lse[r]^2 / N, summed in a fixed order.
template <class F> __global__ void z_loss_total_kernel(const double* lse, int64_t N, F* loss) {
  double total = 0;
  for (int64_t r = threadIdx.x; r < N; r += blockDim.x) total += lse[r] * lse[r];
  total = block_sum(total);
  if (threadIdx.x == 0) *loss = static_cast<F>(total / static_cast<double>(N));
}

void z_loss_forward(const Tensor& logits, const Tensor& loss, const Tensor& lse) {
  const int64_t N = logits.size(0), E = logits.size(1);
  dispatch_float("z_loss", logits.dtype(), [&](auto tag) {
    using F = decltype(tag);
    const RowTeams teams = row_teams(N, E, kRowThreads);
    launch("z_loss_rows", z_loss_rows_kernel<F>, teams.grid, teams.block, 0, logits.data<F>(), N, E,
           lse.data<double>());
    launch("z_loss_total", z_loss_total_kernel<F>, dim3(1), dim3(1024), 0, lse.data<double>(), N, loss.data<F>());
  });
}

// One thread per logit: dz = g * 2 lse softmax(z) / N.
template <class F>
__global__ void z_loss_backward_kernel(const F* logits, const double* lse, const F* g, int64_t N, int64_t E,
                                       F* dlogits) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= N * E) return;
  const double scale = static_cast<double>(*g) * 2.0 / static_cast<double>(N), l = lse[i / E];
  dlogits[i] = static_cast<F>(scale * l * exp(static_cast<double>(logits[i]) - l));
}

void z_loss_backward(const Tensor& logits, const Tensor& lse, const Tensor& g, const Tensor& dlogits) {
  const int64_t N = logits.size(0), E = logits.size(1);
  dispatch_float("z_loss_backward", logits.dtype(), [&](auto tag) {
    using F = decltype(tag);
    launch("z_loss_backward", z_loss_backward_kernel<F>, dim3(blocks_for(N * E, kThreads)), dim3(kThreads), 0,
           logits.data<F>(), lse.data<double>(), g.data<F>(), N, E, dlogits.data<F>());
  });
}

// ---- expert divergence ------------------------------------------------------------------------------------------------

// One thread per (sequence s, expert e): the mean over the sequence's T tokens, in token order (the CPU's sum).
template <class F>
__global__ void sequence_means_kernel(const F* probs, int64_t B, int64_t T, int64_t E, double* means) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= B * E) return;
  const int64_t s = i / E, e = i % E;
  double total = 0;
  for (int64_t t = 0; t < T; ++t) total += probs[(s * T + t) * E + e];
  means[i] = total / static_cast<double>(T);
}

void sequence_means(const Tensor& probs, const Tensor& means) {
  const int64_t B = means.size(0), E = probs.size(1), T = probs.size(0) / B;
  dispatch_float("sequence_means", probs.dtype(), [&](auto tag) {
    using F = decltype(tag);
    launch("sequence_means", sequence_means_kernel<F>, dim3(blocks_for(B * E, kThreads)), dim3(kThreads), 0,
           probs.data<F>(), B, T, E, means.data<double>());
  });
}

// One thread per (domain j, expert e): Q_j[e] = (the sum over j's sequences, in order, + rest_j[e]) / counts[j] (the
// CPU's sum; 0 for an absent domain). rest may be null.
static __global__ void domain_means_kernel(const double* means, const int32_t* domains, const double* rest,
                                           const double* counts, int64_t B, int64_t M, int64_t E, double* q) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= M * E) return;
  const int64_t j = i / E, e = i % E;
  double total = 0;
  for (int64_t s = 0; s < B; ++s)
    if (domains[s] == j) total += means[s * E + e];
  if (rest) total += rest[i];
  q[i] = counts[j] > 0 ? total / counts[j] : 0.0;
}

__device__ inline double safe_log(double p) { return log(fmax(p, kRouterProbFloor)); }

// One block over the present domains' pairs (a, b), in the CPU's order. Thread x owns the experts e = x, x + blockDim,
// ... of every domain: it zeroes and accumulates exactly those entries of grad_q, so no two threads write one entry.
// Each pair's two KL sums: every thread leaves its partial sums in shared memory, and every thread then adds all of
// them in thread order (the same total in every thread: the pair's JSD, and the running loss, are known to all).
template <class F>
__global__ void pairwise_jsd_kernel(const double* q, const double* counts, int64_t M, int64_t E, bool neg_log,
                                    double eps, F* loss, double* grad_q) {
  // kl_part[x]: thread x's part of KL(Q_a || m); kl_part[kPairThreads + x]: of KL(Q_b || m)
  SHARED_ARRAY(double, kl_part, 2 * kPairThreads);
  for (int64_t j = 0; j < M; ++j)
    for (int64_t e = threadIdx.x; e < E; e += blockDim.x) grad_q[j * E + e] = 0;
  int64_t present = 0;
  for (int64_t j = 0; j < M; ++j) present += counts[j] > 0;
  const int64_t pairs = present * (present - 1) / 2;
  double total = 0;
  for (int64_t a = 0; a < M; ++a)
    for (int64_t b = a + 1; b < M; ++b) {
      if (!(counts[a] > 0 && counts[b] > 0)) continue;  // the same for every thread of the block
      const double *qa = q + a * E, *qb = q + b * E;
      double kl_a = 0, kl_b = 0;  // over this thread's experts
      for (int64_t e = threadIdx.x; e < E; e += blockDim.x) {
        const double log_m = safe_log(0.5 * (qa[e] + qb[e]));
        if (qa[e] > 0) kl_a += qa[e] * (safe_log(qa[e]) - log_m);
        if (qb[e] > 0) kl_b += qb[e] * (safe_log(qb[e]) - log_m);
      }
      kl_part[threadIdx.x] = kl_a;
      kl_part[kPairThreads + threadIdx.x] = kl_b;
      __syncthreads();
      kl_a = 0, kl_b = 0;
      for (int t = 0; t < kPairThreads; ++t) kl_a += kl_part[t], kl_b += kl_part[kPairThreads + t];
      __syncthreads();  // every thread has read kl_part: the next pair may overwrite it
      const double jsd = 0.5 * kl_a + 0.5 * kl_b;
      double dloss_djsd;
      if (neg_log) {
        total += -log(jsd + eps) / pairs;
        dloss_djsd = -1.0 / ((jsd + eps) * pairs);
      } else {
        total += -jsd / pairs;
        dloss_djsd = -1.0 / pairs;
      }
      for (int64_t e = threadIdx.x; e < E; e += blockDim.x) {
        const double log_m = safe_log(0.5 * (qa[e] + qb[e]));
        grad_q[a * E + e] += dloss_djsd * 0.5 * (safe_log(qa[e]) - log_m);
        grad_q[b * E + e] += dloss_djsd * 0.5 * (safe_log(qb[e]) - log_m);
      }
    }
  if (threadIdx.x == 0) *loss = static_cast<F>(total);
}

void expert_divergence_forward(const Tensor& means, const Tensor& domains, const Tensor& rest, const Tensor& counts,
                               bool neg_log, double eps, const Tensor& loss, const Tensor& grad_q) {
  const int64_t B = means.size(0), E = means.size(1), M = counts.numel();
  Tensor q = Tensor::empty({M, E}, DType::F64, Device::CUDA);  // the domain means
  launch("domain_means", domain_means_kernel, dim3(blocks_for(M * E, kThreads)), dim3(kThreads), 0,
         means.data<double>(), domains.data<int32_t>(), rest.defined() ? rest.data<double>() : nullptr,
         counts.data<double>(), B, M, E, q.data<double>());
  dispatch_float("expert_divergence_loss", loss.dtype(), [&](auto tag) {
    using F = decltype(tag);
    launch("pairwise_jsd", pairwise_jsd_kernel<F>, dim3(1), dim3(kPairThreads), 0, q.data<double>(),
           counts.data<double>(), M, E, neg_log, eps, loss.data<F>(), grad_q.data<double>());
  });
}

// One thread per element of dprobs [B*T, E]: token of sequence s, expert e: g G_d(s)[e] / (T counts[d(s)]).
template <class F>
__global__ void expert_divergence_backward_kernel(const F* g, const double* grad_q, const int32_t* domains,
                                                  const double* counts, int64_t B, int64_t T, int64_t E, F* dprobs) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= B * T * E) return;
  const int32_t j = domains[i / (T * E)];
  const double w = static_cast<double>(*g) / (static_cast<double>(T) * counts[j]);
  dprobs[i] = static_cast<F>(w * grad_q[j * E + i % E]);
}

void expert_divergence_backward(const Tensor& g, const Tensor& grad_q, const Tensor& domains, const Tensor& counts,
                                const Tensor& dprobs) {
  const int64_t B = domains.numel(), E = dprobs.size(1), T = dprobs.size(0) / B;
  dispatch_float("expert_divergence_loss_backward", dprobs.dtype(), [&](auto tag) {
    using F = decltype(tag);
    launch("expert_divergence_backward", expert_divergence_backward_kernel<F>, dim3(blocks_for(B * T * E, kThreads)),
           dim3(kThreads), 0, g.data<F>(), grad_q.data<double>(), domains.data<int32_t>(), counts.data<double>(), B, T,
           E, dprobs.data<F>());
  });
}

}  // namespace moelab::cuda
