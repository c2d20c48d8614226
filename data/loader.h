// Batches of training sequences from a shard: seeded, deterministic shuffling, optional domain-balanced sampling,
// and a position that saves and restores exactly (bit-exact resume). Plain int32 vectors; the trainer makes tensors.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "data/shard.h"

namespace moelab::data {

struct Batch {
  int B = 0, T = 0;
  std::vector<int32_t> inputs{};        // [B*T] tokens 0..T-1 of each sequence
  std::vector<int32_t> targets{};       // [B*T] next tokens: targets[b*T + t] = token t+1 of sequence b
  std::vector<int32_t> domains{};       // [B] domain id of each sequence (one domain per sequence)
  std::vector<int64_t> sequence_ids{};  // [B] row in the shard, for analysis and tests
};

struct LoaderOptions {
  int batch_size = 8;
  uint64_t seed = 0;
  bool shuffle = true;            // false: shard order (validation); true: a new seeded permutation every epoch
  // false: every sequence once per epoch, so domains appear in proportion to their size.
  // true: every row of a batch draws a domain uniformly (among domains with sequences), then that domain's next
  //       sequence; each domain walks its own permutation and starts its own next epoch when it runs out.
  bool balanced_domains = false;
};

// The loader's position. Restoring it into a loader built on the same sequences with the same options gives the
// same batches as if it had never stopped.
struct LoaderState {
  uint64_t seed = 0;
  bool balanced_domains = false;
  int64_t num_sequences = 0;             // checked on restore: the state belongs to these sequences
  int64_t batches = 0;                   // batches served so far
  int64_t epoch = 0, cursor = 0;         // sequential mode: next position in the epoch's permutation
  uint64_t rng_state = 0;                // balanced mode: the domain draws (SplitMix64 state)
  std::vector<int64_t> domain_epoch{};   // balanced mode, [D]: per domain, its epoch ...
  std::vector<int64_t> domain_cursor{};  // ... and next position in its permutation
  bool operator==(const LoaderState&) const = default;
};
void to_json(nlohmann::json& j, const LoaderState& state);
void from_json(const nlohmann::json& j, LoaderState& state);  // throws naming a missing or mistyped key

class Loader {
 public:
  Loader(std::shared_ptr<const Shard> shard, LoaderOptions options);  // all sequences of the shard
  // Only `sequence_ids` (rows of the shard), e.g. one side of split_every_kth.
  Loader(std::shared_ptr<const Shard> shard, std::vector<int64_t> sequence_ids, LoaderOptions options);

  Batch next();
  LoaderState state() const { return state_; }
  void restore(const LoaderState& state);  // throws when the state does not fit these sequences and options

  int64_t num_sequences() const { return static_cast<int64_t>(ids_.size()); }
  int64_t batches_per_epoch() const { return num_sequences() / options_.batch_size; }  // full batches (sequential)
  const Shard& shard() const { return *shard_; }
  const LoaderOptions& options() const { return options_; }

 private:
  int64_t next_sequence();  // a shard row; advances the position
  void make_epoch_order();  // order_ for state_.epoch
  void make_domain_order(int domain);

  std::shared_ptr<const Shard> shard_;
  std::vector<int64_t> ids_;     // the shard rows this loader serves
  LoaderOptions options_;
  LoaderState state_;
  std::vector<int64_t> order_;                       // sequential mode: ids_ permuted for state_.epoch
  std::vector<std::vector<int64_t>> domain_ids_;     // balanced mode: [D] the rows of each domain
  std::vector<std::vector<int64_t>> domain_order_;   // balanced mode: [D] permuted for its epoch
  std::vector<int> active_domains_;                  // balanced mode: domains with at least one sequence
};

struct Split {
  std::vector<int64_t> train{}, validation{};
};
// The random-label controls of the studies (data.labels): the training sequences keep their text but lose the link
// between text and domain label, so that a method using the labels (the expert divergence) sees labels that carry no
// domain information. The unit is the sequence: sequences are cut from each domain's stream of documents, so a
// sequence is domain-pure but may join the end of one document and the start of the next. Held-out data keep their
// true labels.
//   True      the labels as read
//   Permuted  the labels shuffled among the sequences (a seeded permutation): every label keeps its sequence count
//   Uniform   every sequence draws its label uniformly from [0, D)
enum class DomainLabels { True, Permuted, Uniform };
// The names of the option (an overload found by engine/enum_names.h's parse_enum; data itself needs no engine).
constexpr std::array<std::pair<DomainLabels, const char*>, 3> enum_names(DomainLabels) {
  return {{{DomainLabels::True, "true"}, {DomainLabels::Permuted, "permuted"}, {DomainLabels::Uniform, "uniform"}}};
}
// Rewrites the domain id of every row of `shard` as `labels` says (True: unchanged), seeded, the same on every
// platform.
void relabel_domains(Shard& shard, DomainLabels labels, uint64_t seed);

// Holds out every k-th sequence (i % k == k-1) for validation, for corpora without a validation file. Shards are
// grouped by domain, so the held-out share of every domain is ~1/k.
Split split_every_kth(int64_t num_sequences, int k);

}  // namespace moelab::data
