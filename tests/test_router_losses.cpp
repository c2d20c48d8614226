// Router losses (load balancing, z-loss, expert divergence): values against hand computations and plain loops,
// gradients against central differences, the divergence decomposition identity, and bad input.
#include <cmath>
#include <numbers>

#include "moe/divergence.h"
#include "moe/losses.h"
#include "moe/model.h"
#include "tests/testing.h"

using namespace moelab;
using namespace moelab::moe;
using testing::gradcheck;
using testing::random;

namespace {

// A plain-loop L_ED on probabilities [B*T, E] (independent of moe/divergence.cpp).
double reference_ed(const std::vector<double>& p, const std::vector<int32_t>& dom, int64_t T, int64_t E, int64_t M,
                    bool neglog, double eps) {
  int64_t B = dom.size();
  std::vector<std::vector<double>> q(M, std::vector<double>(E, 0.0));
  std::vector<int> n(M, 0);
  for (int64_t s = 0; s < B; ++s) {
    for (int64_t t = 0; t < T; ++t)
      for (int64_t e = 0; e < E; ++e) q[dom[s]][e] += p[(s * T + t) * E + e] / T;
    n[dom[s]]++;
  }
  std::vector<int> present;
  for (int j = 0; j < M; ++j)
    if (n[j]) {
      for (double& v : q[j]) v /= n[j];
      present.push_back(j);
    }
  double total = 0;
  int pairs = 0;
  for (size_t a = 0; a < present.size(); ++a)
    for (size_t b = a + 1; b < present.size(); ++b) {
      double jsd = 0;
      for (int64_t e = 0; e < E; ++e) {
        double x = q[present[a]][e], y = q[present[b]][e], m = 0.5 * (x + y);
        jsd += 0.5 * x * std::log(x / m) + 0.5 * y * std::log(y / m);
      }
      total += neglog ? -std::log(jsd + eps) : -jsd;
      ++pairs;
    }
  return pairs ? total / pairs : 0.0;
}

}  // namespace

TEST_CASE("losses: load balancing equals 1 at perfect balance and matches a plain loop") {
  // Uniform probabilities and a round-robin assignment: f_i = P_i = 1/E -> L = E * E * (1/E^2) = 1.
  int64_t N = 8, E = 4;
  Tensor probs = full({N, E}, 0.25, DType::F64);
  std::vector<int32_t> ids;
  for (int64_t n = 0; n < N; ++n) ids.push_back(n % E), ids.push_back((n + 1) % E);
  CHECK(load_balancing_loss(probs, from_vector(ids, {N, 2})).item() == doctest::Approx(1.0).epsilon(1e-12));

  // All slots on expert 0 with p_0 = 0.7: L = E * (1 * 0.7) = 2.8.
  std::vector<double> p;
  for (int64_t n = 0; n < N; ++n) p.insert(p.end(), {0.7, 0.1, 0.1, 0.1});
  Tensor skewed = from_vector(p, {N, E});
  CHECK(load_balancing_loss(skewed, from_vector(std::vector<int32_t>(N, 0), {N, 1})).item() ==
        doctest::Approx(2.8).epsilon(1e-12));
  // With the histogram given (the dispatch's counts) the ids are not counted again: the counts decide f.
  // The round-robin ids alone give E * sum_i (1/E) P_i = 1; their counts said to be all on expert 0 give 2.8.
  const Tensor round_robin = from_vector(ids, {N, 2});
  CHECK(load_balancing_loss(skewed, round_robin).item() == doctest::Approx(1.0).epsilon(1e-12));
  const Tensor all_on_0 = from_vector(std::vector<int32_t>{static_cast<int32_t>(2 * N), 0, 0, 0}, {E});
  CHECK(load_balancing_loss(skewed, round_robin, all_on_0).item() == doctest::Approx(2.8).epsilon(1e-12));
  testing::check_error(
      [&] {
        load_balancing_loss(skewed, round_robin, from_vector(std::vector<int32_t>{1, 2}, {2}));
      },
      {"expert_counts", "[E = 4]"});
}

TEST_CASE("losses: load balancing gradient is E f_i / N (f carries none)") {
  Tensor logits = random({6, 3}, 1).set_requires_grad();
  Tensor ids = from_vector(std::vector<int32_t>{0, 1, 0, 2, 0, 0, 1, 2, 0, 1, 2, 2}, {6, 2});
  gradcheck([&](const std::vector<Tensor>& in) { return load_balancing_loss(softmax(in[0]), ids); }, {logits}, 1e-6,
            1e-6, "lb");
  Tensor probs = random({6, 3}, 2).set_requires_grad();
  load_balancing_loss(probs, ids).backward();
  std::vector<double> g = probs.grad().to_vector<double>();
  // counts: expert 0 -> 5, 1 -> 3, 2 -> 4 of 12 slots
  double f[3] = {5.0 / 12, 3.0 / 12, 4.0 / 12};
  for (int n = 0; n < 6; ++n)
    for (int e = 0; e < 3; ++e) CHECK(g[n * 3 + e] == doctest::Approx(3 * f[e] / 6).epsilon(1e-12));
}

TEST_CASE("losses: z-loss value and gradient") {
  Tensor logits = random({5, 7}, 3, DType::F64, 2.0).set_requires_grad();
  std::vector<double> z = logits.to_vector<double>();
  double expected = 0;
  for (int n = 0; n < 5; ++n) {
    double s = 0;
    for (int e = 0; e < 7; ++e) s += std::exp(z[n * 7 + e]);
    expected += std::log(s) * std::log(s) / 5;
  }
  CHECK(z_loss(logits).item() == doctest::Approx(expected).epsilon(1e-12));
  gradcheck([](const std::vector<Tensor>& in) { return z_loss(in[0]); }, {logits}, 1e-6, 1e-6, "z");
  // f32 path agrees with f64
  CHECK(z_loss(to_dtype(logits.detach(), DType::F32)).item() == doctest::Approx(expected).epsilon(1e-5));
}

TEST_CASE("losses: expert divergence hand-computed cases") {
  const double eps = 1e-6;
  SUBCASE("one domain present -> 0 and no gradient") {
    Tensor probs = softmax(random({6, 4}, 4)).detach().set_requires_grad();
    Tensor loss = expert_divergence_loss(probs, from_vector(std::vector<int32_t>{1, 1, 1}, {3}), 3);
    CHECK(loss.item() == 0.0);
    CHECK_FALSE(loss.requires_grad());
  }
  SUBCASE("two domains routed to disjoint experts -> -log(ln 2 + eps)") {
    // B = 2 sequences of T = 2 tokens; domain 0 uses experts {0, 1}, domain 1 uses {2, 3}.
    Tensor probs = from_vector(std::vector<double>{0.5, 0.5, 0, 0, 0.3, 0.7, 0, 0,  //
                                                   0, 0, 1, 0, 0, 0, 0, 1},
                               {4, 4});
    Tensor domains = from_vector(std::vector<int32_t>{0, 1}, {2});
    CHECK(expert_divergence_loss(probs, domains, 2, EDForm::NegLog, eps).item() ==
          doctest::Approx(-std::log(std::numbers::ln2 + eps)).epsilon(1e-12));
    CHECK(expert_divergence_loss(probs, domains, 2, EDForm::NegJSD, eps).item() ==
          doctest::Approx(-std::numbers::ln2).epsilon(1e-12));
  }
  SUBCASE("identical domain distributions -> JSD 0 -> -log(eps)") {
    Tensor probs = full({4, 3}, 1.0 / 3, DType::F64);
    CHECK(expert_divergence_loss(probs, from_vector(std::vector<int32_t>{0, 1}, {2}), 2, EDForm::NegLog, eps).item() ==
          doctest::Approx(-std::log(eps)).epsilon(1e-9));
  }
}

TEST_CASE("losses: expert divergence matches a plain loop and finite differences") {
  int64_t B = 6, T = 3, E = 5, M = 4;
  std::vector<int32_t> dom{0, 2, 2, 1, 0, 2};  // domain 3 absent; unequal counts
  Tensor domains = from_vector(dom, {B});
  Tensor logits = random({B * T, E}, 5, DType::F64, 1.5).set_requires_grad();
  std::vector<double> p = softmax(logits).to_vector<double>();
  for (EDForm form : {EDForm::NegLog, EDForm::NegJSD}) {
    CAPTURE(enum_name(form));
    double expected = reference_ed(p, dom, T, E, M, form == EDForm::NegLog, 1e-6);
    CHECK(expert_divergence_loss(softmax(logits), domains, M, form).item() == doctest::Approx(expected).epsilon(1e-10));
    // through the softmax to the router logits, as in the model
    gradcheck([&](const std::vector<Tensor>& in) { return expert_divergence_loss(softmax(in[0]), domains, M, form); },
              {logits}, 1e-5, 1e-6, "ed");
  }
}

TEST_CASE("losses: expert divergence over a step of micro-batches equals the whole batch's, value and gradient") {
  // 7 sequences split into micro-batches of 3 and 4: domain 3 is only in the second, domain 1 only in the first.
  int64_t T = 4, E = 5, M = 4;
  std::vector<int32_t> dom{0, 1, 2, 0, 3, 2, 3};
  Tensor logits = random({7 * T, E}, 21, DType::F64, 1.5);
  for (EDForm form : {EDForm::NegLog, EDForm::NegJSD}) {
    CAPTURE(enum_name(form));
    Tensor whole_logits = logits.detach().set_requires_grad();
    Tensor whole = expert_divergence_loss(softmax(whole_logits), from_vector(dom, {7}), M, form);
    whole.backward();

    std::vector<double> pooled_grad;
    const std::vector<std::pair<int64_t, int64_t>> parts{{0, 3}, {3, 7}};  // sequence ranges
    std::vector<DomainSums> sums;
    for (auto [begin, end] : parts)
      sums.push_back(routing_domain_sums(softmax(slice_rows(logits, begin * T, end * T)),
                                         from_vector(std::vector<int32_t>(dom.begin() + begin, dom.begin() + end),
                                                     {end - begin}),
                                         M));
    for (size_t m = 0; m < parts.size(); ++m) {
      auto [begin, end] = parts[m];
      Tensor part = slice_rows(logits, begin * T, end * T).detach().set_requires_grad();
      Tensor part_domains = from_vector(std::vector<int32_t>(dom.begin() + begin, dom.begin() + end), {end - begin});
      const DomainSums& rest = sums[1 - m];
      Tensor loss = expert_divergence_loss(softmax(part), part_domains, M, form, 1e-6, &rest);
      CHECK(loss.item() == doctest::Approx(whole.item()).epsilon(1e-12));
      // Alone, each micro-batch's ED differs from the step's.
      CHECK(std::abs(expert_divergence_loss(softmax(part), part_domains, M, form).item() - whole.item()) > 1e-3);
      loss.backward();
      for (double g : part.grad().to_vector<double>()) pooled_grad.push_back(g);
      // The rest is a constant: finite differences through this micro-batch alone agree too.
      gradcheck([&](const std::vector<Tensor>& in) {
        return expert_divergence_loss(softmax(in[0]), part_domains, M, form, 1e-6, &rest);
      }, {part}, 1e-5, 1e-6, "ed step scope");
    }
    testing::check_close(from_vector(pooled_grad, {7 * T, E}), whole_logits.grad(), 1e-10, 1e-12, "pooled gradient");
  }
}

TEST_CASE("losses: divergence decomposition D_total = D_inter + D_intra on random inputs") {
  for (uint64_t seed = 10; seed < 15; ++seed) {
    int64_t B = 9, E = 6, M = 3;
    Tensor probs = softmax(random({B, E}, seed, DType::F64, 2.0));
    std::vector<double> flat = probs.to_vector<double>();
    std::vector<Distribution> seq(B);
    for (int64_t s = 0; s < B; ++s) seq[s].assign(flat.begin() + s * E, flat.begin() + (s + 1) * E);
    std::vector<int32_t> dom{0, 1, 2, 0, 1, 2, 0, 0, 1};
    std::vector<double> w = uniform({B}, *std::make_unique<Generator>(seed), 0.1, 1.0, DType::F64).to_vector<double>();
    double total_w = 0;
    for (double v : w) total_w += v;
    for (double& v : w) v /= total_w;
    Decomposition d = decompose_divergence(seq, dom, w, M);
    CHECK(d.total > 0);
    CHECK(d.total == doctest::Approx(d.inter + d.intra).epsilon(1e-12));

    // With equal domain weights (w_s = 1 / (M n_j)), D_inter >= mean pairwise JSD.
    std::vector<int64_t> n(M, 0);
    for (int32_t j : dom) n[j]++;
    std::vector<double> equal(B);
    for (int64_t s = 0; s < B; ++s) equal[s] = 1.0 / (M * n[dom[s]]);
    Decomposition de = decompose_divergence(seq, dom, equal, M);
    CHECK(de.inter >= mean_pairwise_jsd(domain_means(seq, dom, M)) - 1e-15);
  }
}

TEST_CASE("losses: bad input gives clear errors") {
  Tensor probs = full({4, 2}, 0.5);
  CHECK_THROWS_WITH_AS(expert_divergence_loss(probs, from_vector(std::vector<int32_t>{0, 5}, {2}), 2),
                       doctest::Contains("domain id 5 out of range"), std::invalid_argument);
  CHECK_THROWS_WITH_AS(expert_divergence_loss(probs, from_vector(std::vector<int32_t>{0, 1, 1}, {3}), 2),
                       doctest::Contains("do not split into 3 sequences"), std::invalid_argument);
  nn::ModelConfig one_expert = nn::model_preset("tiny");
  one_expert.n_experts = 1, one_expert.top_k = 1;
  RouterLossConfig with_ed;
  with_ed.beta = 0.1;
  CHECK_THROWS_WITH_AS(MoEModel(one_expert, with_ed, 1), doctest::Contains("at least 2 experts"), std::invalid_argument);
  nn::ModelConfig too_many = nn::model_preset("tiny");
  too_many.top_k = 5;  // > n_experts = 4
  CHECK_THROWS_WITH_AS(MoEModel(too_many, {}, 1), doctest::Contains("top_k"), std::invalid_argument);
  // The loss reads the domains on the host as i32: another dtype is an error, not a silent conversion.
  MoEModel model(nn::model_preset("tiny"), {}, 1);
  const int64_t T = model.lm().config().seq_len;
  const Tensor tokens = zeros({1, T}, DType::I32), targets = zeros({T}, DType::I32);
  CHECK_THROWS_WITH_AS(model.loss(tokens, targets, zeros({1}, DType::F32), 2), doctest::Contains("domains must be i32"),
                       std::invalid_argument);
  CHECK_THROWS_WITH_AS(parse_enum<EDForm>("log", "moe.ed_form"), doctest::Contains("neglog | neg_jsd"), std::invalid_argument);
}
