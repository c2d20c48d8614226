#include "data/loader.h"

#include <numeric>
#include <stdexcept>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "data/rng.h"

namespace moelab::data {
namespace {

// Fisher-Yates with our portable bounded draw: the same permutation on every platform.
void shuffle(std::vector<int64_t>& v, uint64_t seed) {
  SplitMix64 rng(seed);
  for (size_t i = v.size(); i > 1; i--) std::swap(v[i - 1], v[rng.below(i)]);
}

// Stream ids for derive_seed: 0 = the sequential epoch order, 1 + d = domain d's order, kDomainDraws = domain draws.
constexpr uint64_t kDomainDraws = ~uint64_t(0);

}  // namespace

Loader::Loader(std::shared_ptr<const Shard> shard, LoaderOptions options)
    : Loader(shard, [&] {
        std::vector<int64_t> all(shard ? shard->size() : 0);
        std::iota(all.begin(), all.end(), int64_t(0));
        return all;
      }(), options) {}

Loader::Loader(std::shared_ptr<const Shard> shard, std::vector<int64_t> sequence_ids, LoaderOptions options)
    : shard_(std::move(shard)), ids_(std::move(sequence_ids)), options_(options) {
  if (!shard_) throw std::invalid_argument("Loader: no shard");
  if (options_.batch_size < 1)
    throw std::invalid_argument(fmt::format("Loader: batch_size should be >= 1, got {}", options_.batch_size));
  if (ids_.empty()) throw std::invalid_argument("Loader: no sequences to serve (empty shard or split)");
  for (int64_t id : ids_)
    if (id < 0 || id >= shard_->size())
      throw std::out_of_range(fmt::format("Loader: sequence {} out of range (shard has {})", id, shard_->size()));

  state_.seed = options_.seed;
  state_.balanced_domains = options_.balanced_domains;
  state_.num_sequences = num_sequences();
  if (options_.balanced_domains) {
    const int num_domains = shard_->header.domains.size();
    domain_ids_.resize(num_domains);
    for (int64_t id : ids_) domain_ids_[shard_->domain(id)].push_back(id);
    for (int d = 0; d < num_domains; d++)
      if (!domain_ids_[d].empty()) active_domains_.push_back(d);
    state_.rng_state = derive_seed(options_.seed, kDomainDraws);
    state_.domain_epoch.assign(num_domains, 0);
    state_.domain_cursor.assign(num_domains, 0);
    domain_order_.resize(num_domains);
    for (int d = 0; d < num_domains; d++) make_domain_order(d);
  } else {
    make_epoch_order();
  }
}

void Loader::make_epoch_order() {
  order_ = ids_;
  if (options_.shuffle) shuffle(order_, derive_seed(options_.seed, 0, uint64_t(state_.epoch)));
}

void Loader::make_domain_order(int d) {
  domain_order_[d] = domain_ids_[d];
  if (options_.shuffle) shuffle(domain_order_[d], derive_seed(options_.seed, 1 + uint64_t(d), state_.domain_epoch[d]));
}

int64_t Loader::next_sequence() {
  if (!options_.balanced_domains) {
    if (state_.cursor == num_sequences()) {
      state_.epoch++;
      state_.cursor = 0;
      make_epoch_order();
    }
    return order_[size_t(state_.cursor++)];
  }
  SplitMix64 rng(state_.rng_state);
  const int d = active_domains_[rng.below(active_domains_.size())];
  state_.rng_state = rng.state;
  if (state_.domain_cursor[d] == int64_t(domain_order_[d].size())) {
    state_.domain_epoch[d]++;
    state_.domain_cursor[d] = 0;
    make_domain_order(d);
  }
  return domain_order_[d][size_t(state_.domain_cursor[d]++)];
}

Batch Loader::next() {
  Batch batch;
  batch.B = options_.batch_size;
  batch.T = shard_->seq_len();
  const size_t T = size_t(batch.T);
  batch.inputs.resize(batch.B * T);
  batch.targets.resize(batch.B * T);
  for (int b = 0; b < batch.B; b++) {
    const int64_t id = next_sequence();
    const std::span<const int32_t> tokens = shard_->tokens(id);  // [T+1]
    std::copy(tokens.begin(), tokens.begin() + T, batch.inputs.begin() + b * T);
    std::copy(tokens.begin() + 1, tokens.end(), batch.targets.begin() + b * T);
    batch.domains.push_back(shard_->domain(id));
    batch.sequence_ids.push_back(id);
  }
  state_.batches++;
  return batch;
}

void Loader::restore(const LoaderState& s) {
  const auto fail = [](const std::string& what) {
    throw std::invalid_argument(fmt::format("Loader::restore: the saved state does not fit this loader: {}", what));
  };
  if (s.seed != options_.seed) fail(fmt::format("seed {} (loader: {})", s.seed, options_.seed));
  if (s.balanced_domains != options_.balanced_domains)
    fail(fmt::format("balanced_domains {} (loader: {})", s.balanced_domains, options_.balanced_domains));
  if (s.num_sequences != num_sequences())
    fail(fmt::format("num_sequences {} (loader: {})", s.num_sequences, num_sequences()));
  if (s.epoch < 0 || s.cursor < 0 || s.cursor > num_sequences() || s.batches < 0)
    fail(fmt::format("epoch {}, cursor {}, batches {} (expected >= 0, cursor <= {})", s.epoch, s.cursor, s.batches,
                     num_sequences()));
  if (options_.balanced_domains) {
    const size_t num_domains = domain_ids_.size();
    if (s.domain_epoch.size() != num_domains || s.domain_cursor.size() != num_domains)
      fail(fmt::format("{} domain positions (loader: {} domains)", s.domain_cursor.size(), num_domains));
    for (size_t d = 0; d < num_domains; d++)
      if (s.domain_epoch[d] < 0 || s.domain_cursor[d] < 0 || s.domain_cursor[d] > int64_t(domain_ids_[d].size()))
        fail(fmt::format("domain {}: epoch {}, cursor {} (domain has {} sequences)", d, s.domain_epoch[d],
                         s.domain_cursor[d], domain_ids_[d].size()));
  }
  state_ = s;
  if (options_.balanced_domains) {
    for (int d = 0; d < int(domain_ids_.size()); d++) make_domain_order(d);
  } else {
    make_epoch_order();
  }
}

void to_json(nlohmann::json& j, const LoaderState& s) {
  j = nlohmann::json{{"seed", s.seed},
                     {"balanced_domains", s.balanced_domains},
                     {"num_sequences", s.num_sequences},
                     {"batches", s.batches},
                     {"epoch", s.epoch},
                     {"cursor", s.cursor},
                     {"rng_state", s.rng_state},
                     {"domain_epoch", s.domain_epoch},
                     {"domain_cursor", s.domain_cursor}};
}

void from_json(const nlohmann::json& j, LoaderState& s) {
  const auto get = [&](const char* key, auto& value) {
    if (!j.is_object() || !j.contains(key))
      throw std::runtime_error(fmt::format("LoaderState JSON: missing key '{}'", key));
    try {
      j.at(key).get_to(value);
    } catch (const nlohmann::json::exception& e) {
      throw std::runtime_error(fmt::format("LoaderState JSON: key '{}' has the wrong type: {}", key, e.what()));
    }
  };
  get("seed", s.seed);
  get("balanced_domains", s.balanced_domains);
  get("num_sequences", s.num_sequences);
  get("batches", s.batches);
  get("epoch", s.epoch);
  get("cursor", s.cursor);
  get("rng_state", s.rng_state);
  get("domain_epoch", s.domain_epoch);
  get("domain_cursor", s.domain_cursor);
}

void relabel_domains(Shard& shard, DomainLabels labels, uint64_t seed) {
  if (labels == DomainLabels::True || shard.size() == 0) return;
  const int64_t row_ints = shard.row_ints();
  std::vector<int32_t> domain(size_t(shard.size()));
  for (int64_t i = 0; i < shard.size(); i++) domain[size_t(i)] = shard.domain(i);
  if (labels == DomainLabels::Permuted) {
    std::vector<int64_t> order(domain.size());
    std::iota(order.begin(), order.end(), int64_t(0));
    shuffle(order, seed);
    std::vector<int32_t> permuted(domain.size());
    for (size_t i = 0; i < domain.size(); i++) permuted[i] = domain[size_t(order[i])];
    domain = std::move(permuted);
  } else {
    SplitMix64 rng(seed);
    const uint64_t num_domains = uint64_t(shard.header.domains.size());
    for (int32_t& d : domain) d = int32_t(rng.below(num_domains));
  }
  for (int64_t i = 0; i < shard.size(); i++) shard.rows[size_t(i * row_ints)] = domain[size_t(i)];
}

Split split_every_kth(int64_t num_sequences, int k) {
  if (k < 2) throw std::invalid_argument(fmt::format("split_every_kth: k should be >= 2, got {}", k));
  Split split;
  for (int64_t i = 0; i < num_sequences; i++) (i % k == k - 1 ? split.validation : split.train).push_back(i);
  return split;
}

}  // namespace moelab::data
