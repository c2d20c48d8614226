// moe-eval's library (apps/common/evaluation.*): held-out CE/PPL/bpb per domain agree with the trainer's evaluation,
// router-permutation dPPL is zero when the experts are interchangeable and positive for a trained model, and bad
// inputs fail with messages that say what is wrong.
#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "apps/analysis/evaluation.h"
#include "apps/train/checkpoint.h"
#include "apps/train/trainer.h"
#include "tests/testing.h"

using namespace moelab;
using namespace moelab::apps;
namespace fs = std::filesystem;

namespace {

fs::path scratch(const std::string& name) { return testing::fresh_temp_dir("eval_" + name); }

// One small MoE (2 MoE layers, 4 experts, top-2) trained briefly on the synthetic corpus, shared by the cases of a
// process and removed at exit.
struct TrainedRun {
  fs::path dir = scratch("run");
  std::ostringstream quiet;
  std::unique_ptr<Trainer> trainer;
  fs::path checkpoint;

  TrainedRun() {
    TrainConfig c = train_preset("tiny");
    c.model.d_model = 32, c.model.n_heads = 2, c.model.seq_len = 32, c.model.expert_hidden = 32;
    c.data.synthetic_docs = 40;
    c.steps = 60, c.warmup = 5, c.eval_every = 0, c.eval_batches = 4, c.log_every = 1000;
    c.out_dir = dir.string();
    trainer = std::make_unique<Trainer>(c, quiet);
    trainer->run();
    checkpoint = dir / "checkpoints" / "final";
  }
  ~TrainedRun() { fs::remove_all(dir); }

  EvalOptions options(int64_t max_batches, int64_t permutations) const {
    EvalOptions o;
    o.max_batches = max_batches;
    o.permutations = permutations;
    o.data_dir = dir / "eval";
    return o;
  }
};

TrainedRun& trained() {
  static TrainedRun run;
  return run;
}

// Every routed expert of every MoE layer becomes a copy of expert 0.
void make_experts_identical(moe::MoEModel& model) {
  NoGradGuard no_grad;
  for (moe::MoELayer* layer : model.moe_layers()) {
    int64_t E = layer->router.n_experts();
    Tensor first = from_vector(std::vector<int32_t>(E, 0), {E});
    for (Tensor* w : {&layer->experts.w_gate, &layer->experts.w_up, &layer->experts.w_down})
      copy_(*w, index_select(clone(*w), 0, first));
  }
}

// A copy of the trained checkpoint whose "config" metadata is edited by `edit`.
fs::path checkpoint_with_config(const fs::path& from, const fs::path& to,
                                const std::function<void(nlohmann::json&)>& edit) {
  nn::SafeTensors st = nn::load_safetensors(from / kModelFile);
  nlohmann::json config = nlohmann::json::parse(st.metadata.at("config"));
  edit(config);
  st.metadata["config"] = config.dump();
  fs::create_directories(to);
  nn::save_safetensors(to / kModelFile, st.tensors, st.metadata);
  return to;
}

}  // namespace

TEST_CASE("eval: per-domain CE equals the trainer's validate(), bits per byte = CE / ln 2 for bytes") {
  TrainedRun& run = trained();
  Validation expected = run.trainer->validate();  // train.eval_batches = 4 shuffled batches

  CheckpointEvaluation e = evaluate_checkpoint(run.checkpoint, run.options(4, 0));
  REQUIRE(e.domains == run.trainer->data().domains);
  CHECK(e.step == 60);
  CHECK(e.batches == 4);
  CHECK(e.sequences == 32);
  CHECK(e.dppl.empty());
  for (int d = 0; d < e.domains.size(); ++d) {
    const DomainScore& s = e.scores.domains[d];
    CHECK_MESSAGE(s.ce() == doctest::Approx(expected.domain_ce[d]).epsilon(1e-12), e.domains.name(d));
    CHECK(s.ppl() == doctest::Approx(std::exp(s.ce())).epsilon(1e-12));
    CHECK(s.bytes == s.tokens);  // byte tokenizer
    CHECK(s.bpb() == doctest::Approx(s.ce() / std::log(2.0)).epsilon(1e-12));
  }
  CHECK(e.scores.overall.ce() == doctest::Approx(expected.mean_ce).epsilon(1e-12));
  CHECK(e.scores.overall.bpb() == doctest::Approx(expected.mean_ce / std::log(2.0)).epsilon(1e-12));

  // Without --max-batches: every validation sequence once, every domain present.
  CheckpointEvaluation all = evaluate_checkpoint(run.checkpoint, run.options(0, 0));
  const data::Shard& validation = *run.trainer->data().validation;
  CHECK(all.sequences == validation.size());
  CHECK(all.scores.overall.tokens == validation.size() * 32);
  std::vector<int64_t> per_domain = validation.sequences_per_domain();
  for (int d = 0; d < all.domains.size(); ++d) CHECK(all.scores.domains[d].tokens == per_domain[d] * 32);
  CHECK(std::abs(all.scores.overall.ce() - e.scores.overall.ce()) < 0.3);  // a sample of the same split
}

TEST_CASE("eval: a router permutation over identical experts gives dPPL = 0, a trained model's dPPL > 0") {
  TrainedRun& run = trained();
  EvalOptions o = run.options(4, 3);
  LoadedCheckpoint ck = load_checkpoint(run.checkpoint, o);
  TrainingData data = prepare_eval_data(ck, o);
  EvalSet set = make_eval_set(data.validation, *data.tokenizer, 8, 4);
  const int64_t M = data.domains.size();

  Scores base = score(*ck.model, set, M);
  std::vector<LayerDPPL> dppl = router_permutation_dppl(*ck.model, set, base, M, 3, 0);
  REQUIRE(dppl.size() == 2);
  CHECK(dppl[0].layer == 0);
  CHECK(dppl[1].layer == 1);
  double largest = -1e9;
  for (const LayerDPPL& l : dppl) {
    REQUIRE(l.permutations.size() == 3);
    for (const std::vector<int64_t>& pi : l.permutations)
      for (int64_t e = 0; e < 4; ++e) CHECK(pi[e] != e);  // derangements: every expert's row moves
    largest = std::max(largest, l.overall);
  }
  MESSAGE("trained dPPL per layer: " << dppl[0].overall << ", " << dppl[1].overall << " (PPL " << base.overall.ppl()
                                     << ")");
  CHECK(largest > 0.01);
  for (const LayerDPPL& l : dppl) CHECK(l.relative_overall == doctest::Approx(l.overall / base.overall.ppl()));
  CHECK(dppl[0].permutations != dppl[1].permutations);  // seeded per layer
  // The router weights are back exactly.
  CHECK(score(*ck.model, set, M).overall.ce_sum == base.overall.ce_sum);

  // Identical experts: a token reaches copies of one expert whatever the router says, so permuting it changes nothing.
  make_experts_identical(*ck.model);
  Scores same = score(*ck.model, set, M);
  std::vector<LayerDPPL> none = router_permutation_dppl(*ck.model, set, same, M, 3, 0);
  double worst = 0;
  for (const LayerDPPL& l : none) {
    worst = std::max(worst, std::abs(l.overall));
    CHECK(std::abs(l.overall) <= 1e-6);
    CHECK(std::abs(l.relative_overall) <= 1e-6);
    for (int64_t d = 0; d < M; ++d) {
      CHECK(std::abs(l.domains[d]) <= 1e-6);
      CHECK(std::abs(l.relative_domains[d]) <= 1e-6);
    }
  }
  MESSAGE("identical experts: largest |dPPL| " << worst);

  CHECK(random_derangement(2, 7) == std::vector<int64_t>{1, 0});
  CHECK(random_derangement(8, 7) == random_derangement(8, 7));
  CHECK_THROWS_WITH(random_derangement(1, 7), doctest::Contains("n >= 2"));
}

TEST_CASE("eval: relative dPPL = dPPL / PPL per domain, and equals permuting the router by hand") {
  TrainedRun& run = trained();
  EvalOptions o = run.options(4, 2);
  LoadedCheckpoint ck = load_checkpoint(run.checkpoint, o);
  TrainingData data = prepare_eval_data(ck, o);
  EvalSet set = make_eval_set(data.validation, *data.tokenizer, 8, 4);
  const int64_t M = data.domains.size();
  Scores base = score(*ck.model, set, M);
  std::vector<LayerDPPL> dppl = router_permutation_dppl(*ck.model, set, base, M, 2, 5);
  REQUIRE(dppl.size() == 2);
  for (const LayerDPPL& l : dppl) {
    REQUIRE(l.relative_domains.size() == static_cast<size_t>(M));
    for (int64_t d = 0; d < M; ++d) {
      CAPTURE(d);
      CHECK(l.relative_domains[d] == doctest::Approx(l.domains[d] / base.domains[d].ppl()).epsilon(1e-12));
    }
    CHECK(l.relative_overall == doctest::Approx(l.overall / base.overall.ppl()).epsilon(1e-12));
  }
  MESSAGE("layer 0: dPPL " << dppl[0].overall << ", relative " << dppl[0].relative_overall << " (PPL "
                           << base.overall.ppl() << ")");

  // Layer 0 by hand: its router rows permuted by each reported pi, scored, (PPL_pi - PPL) / PPL averaged.
  moe::MoELayer* layer = ck.model->moe_layers()[0];
  Tensor trained_weight = [&] {
    NoGradGuard no_grad;
    return clone(layer->router.weight);
  }();
  std::vector<double> expected(M, 0.0);
  double expected_overall = 0;
  for (const std::vector<int64_t>& pi : dppl[0].permutations) {
    {
      NoGradGuard no_grad;
      copy_(layer->router.weight,
            index_select(trained_weight, 0, from_vector(std::vector<int32_t>(pi.begin(), pi.end()), {4})));
    }
    Scores s = score(*ck.model, set, M);
    for (int64_t d = 0; d < M; ++d) expected[d] += (s.domains[d].ppl() / base.domains[d].ppl() - 1) / 2;
    expected_overall += (s.overall.ppl() / base.overall.ppl() - 1) / 2;
  }
  {
    NoGradGuard no_grad;
    copy_(layer->router.weight, trained_weight);
  }
  for (int64_t d = 0; d < M; ++d) CHECK(dppl[0].relative_domains[d] == doctest::Approx(expected[d]).epsilon(1e-12));
  CHECK(dppl[0].relative_overall == doctest::Approx(expected_overall).epsilon(1e-12));
  CHECK(dppl[0].relative_overall > 0.0);
}

TEST_CASE("eval: missing checkpoint, mismatched config and a corpus without domains give clear errors") {
  TrainedRun& run = trained();
  EvalOptions o = run.options(1, 0);
  fs::path bad = run.dir / "bad";

  CHECK_THROWS_WITH(evaluate_checkpoint(bad / "nowhere", o), doctest::Contains("does not exist"));
  fs::create_directories(bad / "empty");
  CHECK_THROWS_WITH(evaluate_checkpoint(bad / "empty", o), doctest::Contains("no model.safetensors in it"));
  // A run folder stands for its final checkpoint.
  CHECK(load_checkpoint(run.dir, o).dir == run.checkpoint);

  // The stored config does not describe the stored parameters.
  fs::path wide = checkpoint_with_config(run.checkpoint, bad / "wide", [](nlohmann::json& c) { c["d_model"] = 64; });
  CHECK_THROWS_WITH(load_checkpoint(wide, o), doctest::Contains("do not match its model config"));
  // The model does not fit the data options: a longer context than trained, another vocabulary than the tokenizer's.
  EvalOptions longer = o;
  longer.data.seq_len = 64;
  CHECK_THROWS_WITH(load_checkpoint(run.checkpoint, longer), doctest::Contains("trained at model.seq_len = 32"));
  fs::path vocab =
      checkpoint_with_config(run.checkpoint, bad / "vocab", [](nlohmann::json& c) { c["vocab_size"] = 300; });
  {  // parameters that fit the config: 300 rows of embeddings and logits
    nn::SafeTensors st = nn::load_safetensors(vocab / kModelFile);
    for (nn::NamedTensor& t : st.tensors)
      if (t.name == "tok_emb.weight" || t.name == "lm_head.weight") t.tensor = zeros({300, t.tensor.size(1)});
    nn::save_safetensors(vocab / kModelFile, st.tensors, st.metadata);
  }
  EvalOptions byte = o;
  byte.data.tokenizer = "byte";
  CHECK_THROWS_WITH(load_checkpoint(vocab, byte),
                    doctest::Contains("has 256 tokens but the model's config has vocab_size = 300"));

  // Corpora: missing, and lines without the domain key.
  EvalOptions missing = o;
  missing.data.corpus = (bad / "nowhere.jsonl").string();
  CHECK_THROWS_WITH(evaluate_checkpoint(run.checkpoint, missing), doctest::Contains("does not exist"));
  fs::path no_domains = bad / "no_domains.jsonl";
  {
    std::ofstream f(no_domains);
    for (int i = 0; i < 30; ++i)
      f << nlohmann::json({{"text", std::string(200, char('a' + i % 26))}, {"topic", "letters"}}).dump() << '\n';
  }
  EvalOptions unlabelled = o;
  unlabelled.data.corpus = no_domains.string();
  testing::check_mentions(testing::error_of([&] { evaluate_checkpoint(run.checkpoint, unlabelled); }),
                          {"no_domains.jsonl:1: missing key 'domain'", "--domain-key"});
  // ... which is fine once the key is named.
  unlabelled.data.domain_key = "topic";
  unlabelled.data.seq_len = 16;
  CheckpointEvaluation e = evaluate_checkpoint(run.checkpoint, unlabelled);
  CHECK(e.domains.names() == std::vector<std::string>{"letters"});
  CHECK(e.config.model.seq_len == 16);
}

TEST_CASE("eval: the table, the JSON and the run's options read back from a checkpoint") {
  TrainedRun& run = trained();
  CheckpointEvaluation e = evaluate_checkpoint(run.checkpoint, run.options(2, 1));
  std::string table = format_table(e);
  for (const char* text : {"csv", "code", "words", "shout", "all", "dPPL L0 (rel.)", "dPPL L1 (rel.)", "CE(nats)",
                           "bpb", "(rel.): the same divided by PPL"})
    CHECK_MESSAGE(table.find(text) != std::string::npos, "table lacks " << text << ":\n" << table);
  // The "all" row: each layer's dPPL, then the relative one in percent.
  const size_t all_row = table.find("  all ");
  REQUIRE(all_row != std::string::npos);
  const std::string all_line = table.substr(all_row, table.find('\n', all_row) - all_row);
  CHECK_MESSAGE(all_line.find(fmt::format("({:+.1f}%)", 100 * e.dppl[1].relative_overall)) != std::string::npos,
                all_line);

  nlohmann::json j = evaluation_json(e);
  CHECK(j["step"] == 60);
  CHECK(j["data"]["tokenizer"] == "byte");
  CHECK(j["data"]["batches"] == 2);
  CHECK(j["domains"].size() == 4);
  CHECK(j["per_domain"]["csv"]["bpb"].get<double>() == doctest::Approx(e.scores.domains[e.domains.id("csv")].bpb()));
  CHECK(j["overall"]["tokens"] == e.scores.overall.tokens);
  CHECK(j["dppl"]["permutations"] == 1);
  REQUIRE(j["dppl"]["layers"].size() == 2);
  CHECK(j["dppl"]["layers"][1]["layer"] == 1);
  CHECK(j["dppl"]["layers"][1]["per_domain"].size() == 4);
  CHECK(j["dppl"]["layers"][1]["relative_per_domain"].size() == 4);
  CHECK(j["dppl"]["layers"][1]["relative_overall"].get<double>() == e.dppl[1].relative_overall);
  CHECK(j["dppl"]["layers"][0]["relative_per_domain"]["code"].get<double>() ==
        e.dppl[0].relative_domains[e.domains.id("code")]);
  CHECK(j["dppl"]["layers"][1]["permutations"][0].size() == 4);
  CHECK(j["model"] == nlohmann::json(run.trainer->config().model));

  // train_config round trip; keys of other versions are listed, not fatal.
  nlohmann::json flat = run.trainer->config();
  flat["future.option"] = 3;
  std::vector<std::string> ignored;
  TrainConfig back = train_config_from_json(flat, &ignored);
  flat.erase("future.option");
  CHECK(nlohmann::json(back) == flat);
  CHECK(ignored == std::vector<std::string>{"future.option"});
  flat["train.steps"] = "many";
  CHECK_THROWS_WITH(train_config_from_json(flat), doctest::Contains("must be an integer"));
}

TEST_CASE("eval: a checkpoint whose config claims 100000 layers fails before the model is built") {
  TrainedRun& run = trained();
  const fs::path huge = checkpoint_with_config(run.checkpoint, run.dir / "bad" / "huge",
                                               [](nlohmann::json& c) { c["n_layers"] = 100000; });
  // Building it would allocate 100000 layers; the check against the file's tensors stops at the first missing one.
  testing::check_mentions(
      testing::error_of([&] { load_checkpoint(huge, run.options(1, 0)); }),
      {(huge / kModelFile).string(), "do not match its model config", "needs tensor 'layers.2.attn_norm.weight' [32]"});
}

TEST_CASE("eval: checkpoint metadata of the wrong type names the file and the key") {
  TrainedRun& run = trained();
  const EvalOptions o = run.options(1, 0);
  const fs::path bad = run.dir / "bad";
  const fs::path typed =
      checkpoint_with_config(run.checkpoint, bad / "typed", [](nlohmann::json& c) { c["n_layers"] = "two"; });
  testing::check_mentions(
      testing::error_of([&] { load_checkpoint(typed, o); }),
      {(typed / kModelFile).string(), "__metadata__ 'config'", "key 'n_layers' must be an integer"});
  const fs::path missing =
      checkpoint_with_config(run.checkpoint, bad / "missing", [](nlohmann::json& c) { c.erase("d_model"); });
  testing::check_mentions(testing::error_of([&] { load_checkpoint(missing, o); }),
                          {(missing / kModelFile).string(), "missing key 'd_model'"});

  nn::SafeTensors st = nn::load_safetensors(run.checkpoint / kModelFile);
  fs::create_directories(bad / "step");
  st.metadata["step"] = "sixty";
  nn::save_safetensors(bad / "step" / kModelFile, st.tensors, st.metadata);
  testing::check_mentions(testing::error_of([&] { load_checkpoint(bad / "step", o); }),
                          {"step/model.safetensors", "__metadata__ 'step' must be an integer >= 0, got 'sixty'"});
  st.metadata["step"] = "60";
  st.metadata["config"] = "{\"vocab_size\": " + std::string(10000, '9');
  fs::create_directories(bad / "json");
  nn::save_safetensors(bad / "json" / kModelFile, st.tensors, st.metadata);
  const std::string message = testing::error_of([&] { load_checkpoint(bad / "json", o); });
  CHECK(message.size() < 300);
  testing::check_mentions(message, {"json/model.safetensors", "__metadata__ 'config': invalid JSON: number overflow"});
}

TEST_CASE("eval: a non-finite parameter is refused by name, a non-finite result is reported") {
  TrainedRun& run = trained();
  const EvalOptions o = run.options(1, 0);
  nn::SafeTensors st = nn::load_safetensors(run.checkpoint / kModelFile);
  nn::SafeTensors broken = st;
  for (nn::NamedTensor& t : broken.tensors)
    if (t.name == "final_norm.weight") t.tensor = full({32}, INFINITY);
  const fs::path inf_dir = run.dir / "bad" / "inf";
  fs::create_directories(inf_dir);
  nn::save_safetensors(inf_dir / kModelFile, broken.tensors, broken.metadata);
  testing::check_mentions(testing::error_of([&] { load_checkpoint(inf_dir, o); }),
                          {"inf/model.safetensors", "parameter 'final_norm.weight' holds a non-finite value (inf)"});

  // Finite but huge weights: the logits overflow and the CE is not a number.
  for (nn::NamedTensor& t : st.tensors)
    if (t.name == "lm_head.weight") t.tensor = full(t.tensor.shape(), 3e38);
  const fs::path huge_dir = run.dir / "bad" / "huge_weights";
  fs::create_directories(huge_dir);
  nn::save_safetensors(huge_dir / kModelFile, st.tensors, st.metadata);
  const CheckpointEvaluation e = evaluate_checkpoint(huge_dir, run.options(1, 1));
  testing::check_mentions(testing::error_of([&] { check_finite_results(e); }),
                          {"huge_weights", "non-finite results", "CE of 'code' = nan"});

  CheckpointEvaluation fine = evaluate_checkpoint(run.checkpoint, run.options(1, 1));
  CHECK_NOTHROW(check_finite_results(fine));
  fine.dppl[1].domains[3] = INFINITY;
  testing::check_mentions(testing::error_of([&] { check_finite_results(fine); }),
                          {"1 non-finite results", "dPPL of layer 1 on 'words' = inf"});
  fine.dppl[0].relative_overall = NAN;
  testing::check_mentions(testing::error_of([&] { check_finite_results(fine); }),
                          {"2 non-finite results", "relative dPPL of layer 0 = nan"});
}

TEST_CASE("eval: negative counts and a --data-dir that is a file are refused, naming the flag") {
  TrainedRun& run = trained();
  EvalOptions o = run.options(1, 0);
  o.batch_size = -1;
  testing::check_mentions(testing::error_of([&] { evaluate_checkpoint(run.checkpoint, o); }),
                          {"--batch-size must be >= 0", "got -1"});
  o = run.options(-2, 0);
  testing::check_mentions(testing::error_of([&] { validate(o); }), {"--max-batches must be >= 0", "got -2"});
  o = run.options(1, -1);
  testing::check_mentions(testing::error_of([&] { validate(o); }), {"--permutations must be >= 0"});
  o = run.options(1, 0);
  o.data.seq_len = -5;
  testing::check_mentions(testing::error_of([&] { validate(o); }), {"--seq-len must be >= 0", "got -5"});
  o = run.options(1, 0);
  o.data_dir = run.checkpoint / kModelFile;
  testing::check_mentions(testing::error_of([&] { validate(o); }), {"--data-dir", "is not a folder"});
}
