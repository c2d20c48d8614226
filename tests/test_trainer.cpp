// The training loop end to end on the synthetic corpus: configuration, metrics log, checkpoints, bit-exact resume,
// and the effect of the expert-divergence loss.
#include <CLI/CLI.hpp>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "apps/train/checkpoint.h"
#include "apps/train/trainer.h"
#include "tests/testing.h"
#include "tests/train_testing.h"

using namespace moelab;
using namespace moelab::apps;
using moelab::testing::small_train_config;
namespace fs = std::filesystem;

namespace {

fs::path scratch(const std::string& name) { return testing::fresh_temp_dir("trainer_" + name); }

std::vector<std::vector<float>> parameters_of(Trainer& t) {
  std::vector<std::vector<float>> out;
  for (const auto& p : t.model().lm().named_parameters()) out.push_back(p.tensor.to_vector<float>());
  return out;
}

// Under bf16: the products made the copies they multiply (the experts', wqkv's, the head's; not the embedding's, which
// is looked up, or the router's, an f32 product), and the updates kept each its weight's rounding.
void check_bf16_copies(Trainer& trainer) {
  const Bf16Weights* copies = trainer.optimizer().bf16_weights();
  REQUIRE(copies != nullptr);
  std::vector<std::string> made;
  for (const nn::NamedTensor& p : trainer.model().lm().named_parameters()) {
    const Tensor copy = copies->made_copy_of(p.tensor);
    if (!copy.defined()) continue;
    made.push_back(p.name);
    CHECK_MESSAGE(testing::bitwise_equal(copy, to_dtype(p.tensor, DType::BF16)), p.name);
  }
  auto has = [&](const std::string& part) {
    return std::any_of(made.begin(), made.end(), [&](const std::string& n) { return n.find(part) != n.npos; });
  };
  CHECK(has("experts.w_gate"));
  CHECK(has("experts.w_down"));
  CHECK(has("attn.wqkv.weight"));
  CHECK(has("lm_head.weight"));
  CHECK_FALSE(has("tok_emb"));
  CHECK_FALSE(has("router"));
}

}  // namespace

TEST_CASE("train: resume is bit-exact (20 steps == 10, stop, resume, 10)") {
  fs::path dir = scratch("resume");
  // Plain; with 2 micro-batches per step, ED over the step and OMoE (whose projectors are training state too); and that
  // under bf16 mixed precision, whose weights' bf16 copies a resume makes again from the loaded weights.
  for (int variant : {0, 1, 2}) {
    const bool accumulate = variant > 0, bf16 = variant == 2;
    CAPTURE(accumulate);
    CAPTURE(bf16);
    auto config = [&](const fs::path& out) {
      TrainConfig c = small_train_config(out, 20);
      if (accumulate) {
        c.batch_size = 4, c.grad_accum = 2, c.losses.beta = 0.05, c.losses.ed_scope = moe::EDScope::Step;
        c.optimizer = OptimizerKind::OMoE, c.omoe.every = 3, c.omoe.reset = false;
      }
      if (bf16) c.precision = Precision::BF16;
      return c;
    };
    std::ostringstream quiet;
    Trainer straight(config(dir / "straight"), quiet);
    straight.run();

    Trainer first(config(dir / "split"), quiet);
    first.run(10);
    fs::path checkpoint = first.save_checkpoint("step_10");
    TrainConfig resumed_config = config(dir / "split");
    resumed_config.resume = checkpoint.string();
    Trainer resumed(resumed_config, quiet);
    CHECK(resumed.step() == 10);
    resumed.run();
    CHECK(resumed.step() == 20);
    if (bf16) {
      check_bf16_copies(straight);
      check_bf16_copies(resumed);  // made again after the checkpoint's load
    }
    auto a = parameters_of(straight), b = parameters_of(resumed);
    REQUIRE(a.size() == b.size());
    for (size_t i = 0; i < a.size(); ++i) CHECK_MESSAGE(a[i] == b[i], "parameter " << i << " differs after resume");
    fs::remove_all(dir);
  }
}

// The first step's line of a run's metrics log.
nlohmann::json first_step_metrics(const Trainer& trainer) {
  std::ifstream in(trainer.metrics_path());
  for (std::string line; std::getline(in, line);) {
    nlohmann::json j = nlohmann::json::parse(line);
    if (j.contains("loss") && j["step"] == 1) return j;
  }
  FAIL("no metrics line for step 1 in " << trainer.metrics_path());
  return {};
}

TEST_CASE("train: gradient accumulation, 2 micro-batches of 4 sequences equal one batch of 8") {
  // Without load balancing (its f_i P_i product is not linear in the batch) the step's loss and gradient are the
  // mean over micro-batches; ED with scope "step" is the whole batch's ED, with scope "micro_batch" it is not. OMoE
  // updates its projectors once per step from the mean input over all micro-batches.
  fs::path dir = scratch("accumulation");
  std::ostringstream quiet;
  auto config = [&](const std::string& name, int64_t batch, int64_t accumulate, moe::EDScope scope) {
    TrainConfig c = small_train_config(dir / name, 3);
    c.batch_size = batch, c.grad_accum = accumulate;
    c.losses.alpha = 0, c.losses.beta = 0.05, c.losses.ed_scope = scope;
    c.optimizer = OptimizerKind::OMoE, c.omoe.every = 1, c.omoe.reset = false;
    return c;
  };
  Trainer whole(config("whole", 8, 1, moe::EDScope::MicroBatch), quiet),
      step(config("step", 4, 2, moe::EDScope::Step), quiet), micro(config("micro", 4, 2, moe::EDScope::MicroBatch), quiet);
  for (Trainer* t : {&whole, &step, &micro}) t->run(1);
  nlohmann::json w = first_step_metrics(whole), s = first_step_metrics(step), m = first_step_metrics(micro);
  MESSAGE("step 1, batch 8 / 2 x 4 (ED per step) / 2 x 4 (ED per micro-batch): ed " << w["ed"] << " / " << s["ed"]
          << " / " << m["ed"] << ", grad_norm " << w["grad_norm"] << " / " << s["grad_norm"] << " / " << m["grad_norm"]);
  for (const char* key : {"loss", "ce", "z", "ed", "grad_norm"}) {
    CAPTURE(key);
    CHECK(s[key].get<double>() == doctest::Approx(w[key].get<double>()).epsilon(1e-5));
  }
  CHECK(s["tokens"] == w["tokens"]);
  CHECK(m["ce"].get<double>() == doctest::Approx(w["ce"].get<double>()).epsilon(1e-5));
  CHECK(std::abs(m["ed"].get<double>() - w["ed"].get<double>()) > 1e-3);  // two half-batches' EDs, averaged
  CHECK(std::abs(m["grad_norm"].get<double>() - w["grad_norm"].get<double>()) > 1e-4 * w["grad_norm"].get<double>());
  for (size_t l = 0; l < whole.omoe()->layer_count(); ++l)
    testing::check_close(step.omoe()->projectors(l), whole.omoe()->projectors(l), 1e-4, 1e-6, "OMoE projectors");
  fs::remove_all(dir);
}

TEST_CASE("train: metrics log, evaluation per domain and checkpoint files") {
  fs::path dir = scratch("log");
  std::ostringstream out;
  TrainConfig c = small_train_config(dir, 6);
  c.eval_every = 3;
  Trainer t(c, out);
  t.run();
  std::ifstream log(t.metrics_path());
  std::string line;
  int steps = 0, evals = 0;
  while (std::getline(log, line)) {
    nlohmann::json j = nlohmann::json::parse(line);
    if (j.contains("eval")) {
      ++evals;
      CHECK(j["eval"]["ce_domain"].size() == 4);  // every synthetic domain is in the evaluation sample
      CHECK(j["eval"]["routing"].size() == 2);    // two MoE layers
      continue;
    }
    ++steps;
    for (const char* key : {"step", "loss", "ce", "lb", "z", "ed", "lr", "grad_norm", "tokens_per_s", "ce_domain", "routing"})
      CHECK_MESSAGE(j.contains(key), "metrics line lacks " << key);
    CHECK(j["lb"].get<double>() >= 1.0 - 1e-6);  // E sum f P >= 1 ... at least near balance it is about 1
  }
  CHECK(steps == 6);
  CHECK(evals == 2);
  fs::path final_dir = dir / "checkpoints" / "final";
  CHECK(fs::exists(final_dir / kModelFile));
  CHECK(fs::exists(final_dir / kStateFile));
  CHECK(nlohmann::json(checkpoint_model_config(final_dir)) == nlohmann::json(c.model));
  // The final checkpoint is written before the final evaluation, which a failure could otherwise cost the weights.
  CHECK(out.str().find("final checkpoint") != std::string::npos);
  CHECK(out.str().find("final checkpoint") < out.str().find("eval @ step 6"));
  fs::remove_all(dir);
}

TEST_CASE("train: options from preset, TOML file and flags, with clear errors") {
  TrainConfig c = train_preset("tiny");
  apply_toml(c, "[model]\nd_model = 96\ndense_layers = [0]\n[moe]\nbeta = 0.05\n[train]\nsteps = 7\n", "test.toml");
  CHECK(c.model.d_model == 96);
  CHECK(c.model.dense_layers == std::vector<int64_t>{0});
  CHECK(c.losses.beta == 0.05);
  CHECK(c.steps == 7);
  CHECK_THROWS_WITH(apply_toml(c, "[train]\nstpes = 3\n", "typo.toml"), doctest::Contains("unknown key 'train.stpes'"));
  CHECK_THROWS_WITH(apply_toml(c, "[train]\nsteps = \"many\"\n", "bad.toml"), doctest::Contains("must be an integer"));
  CHECK_THROWS_WITH(apply_toml(c, "[train\n", "broken.toml"), doctest::Contains("broken.toml"));

  CLI::App app;
  TrainOptions options(app);
  const char* argv[] = {"moe-train", "--preset", "tiny", "--train.steps", "11", "--moe.ed_form", "neg_jsd",
                        "--data.balanced", "true"};
  app.parse(9, const_cast<char**>(argv));
  TrainConfig parsed = options.resolve();
  CHECK(parsed.steps == 11);
  CHECK(parsed.losses.ed_form == moe::EDForm::NegJSD);
  CHECK(parsed.data.balanced);
  CHECK(parsed.precision == Precision::FP32);

  CLI::App short_app;  // --device and --precision: short names of train.device and train.precision
  TrainOptions short_options(short_app);
  const char* short_argv[] = {"moe-train", "--device", "cpu", "--precision", "bf16"};
  short_app.parse(5, const_cast<char**>(short_argv));
  TrainConfig short_parsed = short_options.resolve();
  CHECK(short_parsed.device == Device::CPU);
  CHECK(short_parsed.precision == Precision::BF16);
  CHECK_THROWS_WITH(apply_toml(c, "[train]\nprecision = \"fp16\"\n", "p.toml"), doctest::Contains("fp32 | bf16"));

  TrainConfig bad = train_preset("tiny");
  bad.losses.beta = 0.1, bad.model.n_experts = 1, bad.model.top_k = 1;
  CHECK_THROWS_WITH(bad.validate(), doctest::Contains("needs at least 2 experts"));
  CHECK_THROWS_WITH(train_preset("XL"), doctest::Contains("unknown model config 'XL'"));
}

TEST_CASE("train: resuming with a mismatched config or a missing checkpoint fails clearly, another batch per step resumes with a note") {
  fs::path dir = scratch("mismatch");
  std::ostringstream quiet;
  Trainer t(small_train_config(dir, 2), quiet);
  t.run();
  TrainConfig other = small_train_config(dir / "other", 2);
  other.model.d_model = 64;
  other.resume = (dir / "checkpoints" / "final").string();
  CHECK_THROWS_WITH(Trainer(other, quiet), doctest::Contains("does not match"));
  other.resume = (dir / "nowhere").string();
  CHECK_THROWS_WITH(Trainer(other, quiet), doctest::Contains("missing model.safetensors"));
  // A different batch per step resumes, with a note.
  TrainConfig more_accumulation = small_train_config(dir / "more", 4);
  more_accumulation.grad_accum = 2;
  more_accumulation.resume = (dir / "checkpoints" / "final").string();
  std::ostringstream out;
  Trainer resumed(more_accumulation, out);
  CHECK(resumed.step() == 2);
  testing::check_mentions(out.str(), {"resume: train.grad_accum is 2", "trained with 1"});
  fs::remove_all(dir);
}

TEST_CASE("train: expert divergence separates the domains' routing and keeps load balanced") {
  // The same run with beta = 0 and beta > 0: the mean pairwise JSD between the domains' mean routing distributions
  // on held-out data ends clearly higher with the divergence loss, with no dead experts.
  auto run = [](double beta) {
    fs::path dir = scratch("ed" + std::to_string(beta));
    std::ostringstream quiet;
    TrainConfig c = small_train_config(dir, 120);
    c.losses.beta = beta;
    Trainer t(c, quiet);
    t.run();
    Validation eval = t.validate();
    fs::remove_all(dir);
    return eval;
  };
  Validation base = run(0.0), ed = run(0.05);
  double jsd_base = 0, jsd_ed = 0;
  for (size_t l = 0; l < base.routing.size(); ++l) {
    jsd_base += base.routing[l].mean_pairwise_jsd / base.routing.size();
    jsd_ed += ed.routing[l].mean_pairwise_jsd / ed.routing.size();
    CHECK(ed.routing[l].dead_experts == 0);
    CHECK(ed.routing[l].load_entropy > 0.8);
  }
  MESSAGE("mean pairwise JSD between domains (held out): beta=0 " << jsd_base << ", beta=0.05 " << jsd_ed
                                                                  << "; mean CE " << base.mean_ce << " vs " << ed.mean_ce);
  CHECK(jsd_ed > 1.5 * jsd_base);
  CHECK(jsd_ed > jsd_base + 0.05);
}

TEST_CASE("train: ED per sequence (the ablation) pulls the step's sequences apart, across micro-batches too") {
  // moe.ed_groups = sequence: every sequence is its own group. Checked against the mean over sequence pairs of
  // -log(JSD + eps) between their mean routing distributions, computed here from a fresh model on the same batch;
  // with 2 micro-batches and ED over the step it is the same number as one batch of 8.
  fs::path dir = scratch("ed_sequence");
  std::ostringstream quiet;
  auto config = [&](const std::string& name, int64_t batch, int64_t accumulate, moe::EDGroupBy groups) {
    TrainConfig c = small_train_config(dir / name, 3);
    c.batch_size = batch, c.grad_accum = accumulate;
    c.losses.alpha = 0, c.losses.beta = 0.05, c.losses.ed_scope = moe::EDScope::Step, c.losses.ed_groups = groups;
    return c;
  };
  const TrainConfig whole_config = config("whole", 8, 1, moe::EDGroupBy::Sequence);
  Trainer whole(whole_config, quiet), step(config("step", 4, 2, moe::EDGroupBy::Sequence), quiet),
      domains(config("domains", 8, 1, moe::EDGroupBy::Domain), quiet);

  // The reference: the first batch the trainer will draw, through the model as initialized.
  data::Loader loader(whole.data().train, {.batch_size = 8, .seed = whole_config.seed});
  const data::Batch batch = loader.next();
  moe::MoEModel model(whole_config.model, whole_config.losses, whole_config.seed);
  {
    NoGradGuard no_grad;
    model.lm().forward(from_vector(batch.inputs, {batch.B, batch.T}));
  }
  double expected = 0;
  const std::vector<moe::MoELayer*> layers = model.moe_layers();
  for (moe::MoELayer* layer : layers) {
    const std::vector<moe::Distribution> means = moe::sequence_means(layer->last_routing().probs, batch.B);
    double sum = 0;
    int64_t pairs = 0;
    for (int i = 0; i < batch.B; ++i)
      for (int j = i + 1; j < batch.B; ++j, ++pairs)
        sum += -std::log(moe::js_divergence(means[i], means[j]) + whole_config.losses.ed_eps);
    expected += sum / static_cast<double>(pairs) / static_cast<double>(layers.size());
  }

  for (Trainer* t : {&whole, &step, &domains}) t->run(1);
  const nlohmann::json w = first_step_metrics(whole), s = first_step_metrics(step), d = first_step_metrics(domains);
  MESSAGE("ED at step 1: per sequence " << w["ed"] << " (2 x 4: " << s["ed"] << ", reference " << expected
                                        << "), per domain " << d["ed"]);
  CHECK(w["ed"].get<double>() == doctest::Approx(expected).epsilon(1e-5));
  CHECK(s["ed"].get<double>() == doctest::Approx(expected).epsilon(1e-5));
  CHECK(s["grad_norm"].get<double>() == doctest::Approx(w["grad_norm"].get<double>()).epsilon(1e-4));
  CHECK(std::abs(d["ed"].get<double>() - expected) > 1e-2);
  fs::remove_all(dir);
}

TEST_CASE("train: random labels permute the training split's labels only; held-out data keep the true ones") {
  fs::path dir = scratch("labels");
  TrainConfig c = small_train_config(dir, 1);
  const TrainingData truth = prepare_data(c);
  c.data.labels = data::DomainLabels::Permuted;
  const TrainingData permuted = prepare_data(c);
  CHECK(permuted.train->sequences_per_domain() == truth.train->sequences_per_domain());
  CHECK(permuted.train->rows != truth.train->rows);
  CHECK(permuted.validation->rows == truth.validation->rows);
  c.data.labels = data::DomainLabels::Uniform;
  const TrainingData uniform = prepare_data(c);
  CHECK(uniform.train->sequences_per_domain() != truth.train->sequences_per_domain());
  CHECK(uniform.validation->rows == truth.validation->rows);
  fs::remove_all(dir);
}

TEST_CASE("train: init_from starts from another run's weights; a dense run is upcycled into the MoE model") {
  fs::path dir = scratch("init_from");
  std::ostringstream quiet;
  TrainConfig dense_config = small_train_config(dir / "dense", 5);
  dense_config.model.n_experts = 0, dense_config.model.dense_hidden = 32;  // = expert_hidden: experts are copies
  Trainer dense(dense_config, quiet);
  dense.run();

  // Upcycled: top-2 of 4 equal experts with gates renormalized to sum 1 compute the dense FFN.
  TrainConfig moe_config = small_train_config(dir / "moe", 5);
  moe_config.init_from = (dir / "dense").string();
  Trainer upcycled(moe_config, quiet);
  CHECK(upcycled.step() == 0);
  const data::Batch batch = data::Loader(upcycled.data().validation, {.batch_size = 4, .shuffle = false}).next();
  const Tensor inputs = from_vector(batch.inputs, {batch.B, batch.T});
  {
    NoGradGuard no_grad;
    testing::check_close(upcycled.model().lm().forward(inputs), dense.model().lm().forward(inputs), 1e-4, 1e-2,
                         "upcycled logits vs the dense model's");
  }

  // The same architecture loads as is: the weights are the run's final ones.
  TrainConfig again = small_train_config(dir / "again", 5);
  again.model = dense_config.model, again.init_from = (dir / "dense").string();
  Trainer continued(again, quiet);
  auto a = parameters_of(continued), b = parameters_of(dense);
  REQUIRE(a.size() == b.size());
  for (size_t i = 0; i < a.size(); ++i) CHECK(a[i] == b[i]);

  // Another MoE architecture is refused, naming both configs; noise without a dense source too.
  TrainConfig other = small_train_config(dir / "other", 5);
  other.init_from = (dir / "moe").string();
  upcycled.run();
  other.model.n_experts = 8;
  CHECK(testing::error_of([&] { Trainer t(other, quiet); }).find("differs from this run's") != std::string::npos);
  other.model.n_experts = 4, other.upcycle_noise = 0.01;
  CHECK(testing::error_of([&] { Trainer t(other, quiet); }).find("is not a dense checkpoint") != std::string::npos);
  fs::remove_all(dir);
}
