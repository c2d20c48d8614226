// moe-train's options: every option range-checked in one place, flags parsed as values (never as TOML source), the
// same messages from flags, a TOML file and validate(), and the checkpoint's config format.
#include <CLI/CLI.hpp>
#include <fstream>
#include <nlohmann/json.hpp>

#include "apps/train/train_config.h"
#include "tests/testing.h"

using namespace moelab;
using namespace moelab::apps;
using testing::check_mentions;
using testing::error_of;

namespace {

// moe-train's command line: the tiny preset, then these flags.
TrainConfig from_flags(std::vector<std::string> args) {
  CLI::App app;
  TrainOptions options(app);
  std::vector<char*> argv = {const_cast<char*>("moe-train")};
  for (std::string& arg : args) argv.push_back(arg.data());
  app.parse(static_cast<int>(argv.size()), argv.data());
  return options.resolve();
}

std::string flags_error(const std::vector<std::string>& args) {
  return error_of([&] { from_flags(args); });
}
std::string flag_error(const std::string& flag, const std::string& value) { return flags_error({flag, value}); }

// A TOML file given with --config, as a user would.
std::string toml_file_error(const testing::ScratchDir& dir, const std::string& toml) {
  const std::string file = dir.file("run.toml");
  std::ofstream(file) << toml;
  return error_of([&] { from_flags({"--config", file}); });
}

// The bad values of the issue: option, value, and the allowed range the message states.
struct BadValue {
  std::string key, value, range;
};
const std::vector<BadValue> kBadValues = {
    {"train.eval_batches", "0", "[1, 2147483647]"},  {"optim.beta1", "1.5", "[0, 1)"},
    {"optim.eps", "-1", "a finite number > 0"},      {"optim.grad_clip", "nan", "a finite number >= 0"},
    {"moe.z_coef", "-1", "a finite number >= 0"},    {"moe.ed_eps", "-1", "a finite number > 0"},
    {"model.init_std", "-1", "a finite number > 0"}, {"optim.warmup", "-5", "[0, 2147483647]"},
    {"optim.lr", "inf", "a finite number > 0"},      {"optim.beta2", "1", "[0, 1)"},
};

}  // namespace

TEST_CASE("config: out-of-range flags are rejected, naming the flag, the range and the value") {
  for (const BadValue& bad : kBadValues) {
    CAPTURE(bad.key);
    check_mentions(flag_error("--" + bad.key, bad.value), {"--" + bad.key + " must be", bad.range, "got " + bad.value});
  }
}

TEST_CASE("config: a TOML file with out-of-range values gives the same messages, naming the file") {
  testing::ScratchDir dir("config_toml");
  for (const BadValue& bad : kBadValues) {
    CAPTURE(bad.key);
    const size_t dot = bad.key.find('.');
    const std::string toml = fmt::format("[{}]\n{} = {}\n", bad.key.substr(0, dot), bad.key.substr(dot + 1), bad.value);
    check_mentions(toml_file_error(dir, toml),
                   {dir.file("run.toml") + ": " + bad.key + " must be", bad.range, "got " + bad.value});
  }
}

TEST_CASE("config: validate() names the key of a bad value set in code") {
  TrainConfig c = train_preset("tiny");
  c.adamw.beta1 = 1.5;
  CHECK(error_of([&] { c.validate(); }) == "config: optim.beta1 must be in [0, 1), got 1.5");
  c = train_preset("tiny");
  c.eval_batches = 0;
  CHECK(error_of([&] { c.validate(); }) == "config: train.eval_batches must be in [1, 2147483647], got 0");
  c = train_preset("tiny");
  c.seed = ~uint64_t{0};  // does not fit the TOML integer the checkpoint's config is read back from
  check_mentions(error_of([&] { c.validate(); }), {"config: train.seed", "got 18446744073709551615"});
  c = train_preset("tiny");
  c.model.dense_layers = {-1};
  check_mentions(error_of([&] { c.validate(); }), {"config: model.dense_layers entries must be in [0, ", "got -1"});
  c = train_preset("tiny");
  c.out_dir = "";
  CHECK(error_of([&] { c.validate(); }) == "config: train.out_dir must not be empty");
}

TEST_CASE("config: integers beyond 32 bits are rejected, not truncated") {
  check_mentions(flag_error("--model.seq_len", "4294967312"),
                 {"--model.seq_len must be in [1, 2147483647], got 4294967312"});
  check_mentions(flag_error("--train.batch_size", "4294967298"),
                 {"--train.batch_size must be in [1, 2147483647], got 4294967298"});
  testing::ScratchDir dir("config_32");
  check_mentions(toml_file_error(dir, "[model]\nseq_len = 4294967312\n"),
                 {"run.toml: model.seq_len must be in [1, 2147483647], got 4294967312"});
  check_mentions(toml_file_error(dir, "[train]\nbatch_size = 4294967298\n"),
                 {"run.toml: train.batch_size must be in [1, 2147483647], got 4294967298"});
  // Each one fits, but their product does not fit the i32 positions of a micro-batch's routing slots.
  check_mentions(flags_error({"--train.batch_size", "65536", "--model.seq_len", "65536"}),
                 {"config: train.batch_size (65536) * model.seq_len (65536) * model.top_k (2)", "<= 2147483647"});
  check_mentions(flags_error({"--model.n_experts", "0", "--train.batch_size", "65536", "--model.seq_len", "65536"}),
                 {"config: train.batch_size (65536) * model.seq_len (65536) tokens per micro-batch", "<= 2147483647"});
}

TEST_CASE("config: an integer beyond 64 bits is out of range, from a flag and from a file") {
  check_mentions(flag_error("--train.steps", "99999999999999999999"),
                 {"--train.steps must be in [1, 2147483647], got 99999999999999999999"});
  check_mentions(flag_error("--train.seed", "99999999999999999999"),
                 {"--train.seed must be in [0, 9223372036854775807], got 99999999999999999999"});
  check_mentions(flag_error("--optim.lr", "1e999"), {"--optim.lr must be a finite number > 0, got 1e999"});
  testing::ScratchDir dir("config_64");
  check_mentions(toml_file_error(dir, "[train]\nsteps = 99999999999999999999\n"), {dir.file("run.toml"), "99999999"});
}

TEST_CASE("config: nan and inf are rejected for every real option") {
  const nlohmann::json options = train_preset("tiny");
  int reals = 0;
  for (const auto& item : options.items()) {
    const std::string& key = item.key();  // a plain reference: doctest's CAPTURE is a lambda
    if (!item.value().is_number_float()) continue;
    ++reals;
    for (const char* text : {"nan", "inf", "-inf"}) {
      CAPTURE(key);
      CAPTURE(text);
      check_mentions(flag_error("--" + key, text), {"--" + key + " must be", "got " + std::string(text)});
    }
  }
  CHECK(reals == 16);
  testing::ScratchDir dir("config_nan");
  check_mentions(toml_file_error(dir, "[optim]\ngrad_clip = nan\n"), {"run.toml: optim.grad_clip", "got nan"});
  check_mentions(toml_file_error(dir, "[moe]\nalpha = -inf\n"), {"run.toml: moe.alpha", "got -inf"});
}

TEST_CASE("config: optim.min_lr above optim.lr is rejected") {
  check_mentions(flags_error({"--optim.lr", "0.001", "--optim.min_lr", "0.01"}),
                 {"config: optim.min_lr = 0.01 must be <= optim.lr = 0.001"});
  testing::ScratchDir dir("config_min_lr");
  check_mentions(toml_file_error(dir, "[optim]\nlr = 0.001\nmin_lr = 0.01\n"),
                 {dir.file("run.toml") + ": optim.min_lr = 0.01 must be <= optim.lr = 0.001"});
  check_mentions(flags_error({"--config", dir.file("run.toml"), "--optim.lr", "0.005"}),
                 {dir.file("run.toml") + " + flags: optim.min_lr = 0.01 must be <= optim.lr = 0.005"});
  CHECK(from_flags({"--optim.lr", "0.01", "--optim.min_lr", "0.01"}).min_lr == 0.01);
}

TEST_CASE("config: a flag value holding TOML source is one value and sets no other key") {
  const std::string injected = "1\n[optim]\nlr = 1";
  const std::string message = flag_error("--train.steps", injected);
  check_mentions(message, {"--train.steps must be an integer, got '1\\x0a[optim]\\x0alr = 1'"});
  CHECK(message.find('\n') == std::string::npos);  // one line
  check_mentions(flag_error("--optim.min_lr", injected), {"--optim.min_lr must be a number"});
  // A text option keeps the text as it is.
  TrainConfig c = from_flags({"--train.out_dir", "runs/x\"\n[optim]\nlr = 1\n#"});
  CHECK(c.out_dir == "runs/x\"\n[optim]\nlr = 1\n#");
  CHECK(c.lr == train_preset("tiny").lr);
}

TEST_CASE("config: a non-UTF-8 flag value is a clean error naming the flag") {
  CHECK(flag_error("--data.corpus", "runs/\xff\xfe") ==
        "--data.corpus must be UTF-8 text, got the byte 0xff at offset 5");
  // An overlong form, a surrogate, a code point above U+10FFFF, a character cut short.
  CHECK(flag_error("--train.steps", "1\xc0\x80") == "--train.steps must be UTF-8 text, got the byte 0xc0 at offset 1");
  CHECK(flags_error({"--preset", "\xed\xa0\x80"}) == "--preset must be UTF-8 text, got the byte 0xed at offset 0");
  CHECK(flag_error("--train.out_dir", "\xf4\x90\x80\x80") ==
        "--train.out_dir must be UTF-8 text, got the byte 0xf4 at offset 0");
  CHECK(flag_error("--train.resume", "ok\xd0") == "--train.resume must be UTF-8 text, got the byte 0xd0 at offset 2");
  // Valid multi-byte text passes through.
  CHECK(from_flags({"--data.corpus", "корпус"}).data.corpus == "корпус");
  CHECK(from_flags({"--train.out_dir", "runs/\xf0\x9f\x9a\x80"}).out_dir == "runs/\xf0\x9f\x9a\x80");
}

TEST_CASE("config: flags parse strictly as integers, numbers, booleans, names and lists") {
  check_mentions(flag_error("--train.steps", "1.5"), {"--train.steps must be an integer, got '1.5'"});
  check_mentions(flag_error("--train.steps", " 5"), {"--train.steps must be an integer, got ' 5'"});
  check_mentions(flag_error("--train.steps", "0x10"), {"--train.steps must be an integer"});
  check_mentions(flag_error("--optim.lr", "1e-3x"), {"--optim.lr must be a number, got '1e-3x'"});
  check_mentions(flag_error("--data.balanced", "yes"), {"--data.balanced must be true or false, got 'yes'"});
  check_mentions(flag_error("--moe.ed_form", "log"), {"--moe.ed_form must be one of neglog | neg_jsd, got 'log'"});
  check_mentions(flag_error("--model.dense_layers", "0"), {"--model.dense_layers must be a list of integers"});
  check_mentions(flag_error("--model.dense_layers", "[0,]"), {"--model.dense_layers must be a list of integers"});
  check_mentions(flag_error("--model.dense_layers", "[-1]"),
                 {"--model.dense_layers entries must be in [0, ", "got -1"});

  TrainConfig c = from_flags({"--optim.lr", "1e-3", "--optim.min_lr", "0", "--train.seed", "9223372036854775807",
                              "--model.dense_layers", "[ 0, 1 ]", "--optim.name", "omoe", "--omoe.reset", "false"});
  CHECK(c.lr == 1e-3);
  CHECK(c.min_lr == 0);
  CHECK(c.seed == 9223372036854775807u);
  CHECK(c.model.dense_layers == std::vector<int64_t>{0, 1});
  CHECK(c.optimizer == OptimizerKind::OMoE);
  CHECK_FALSE(c.omoe.reset);
  CHECK(from_flags({"--model.dense_layers", "[]"}).model.dense_layers.empty());
  CHECK(from_flags({"--optim.warmup", "0"}).warmup == 0);
}

TEST_CASE("config: the presets tiny, S and M validate") {
  for (const char* name : {"tiny", "S", "M"}) {
    CAPTURE(name);
    CHECK_NOTHROW(train_preset(name).validate());
    CHECK(from_flags({"--preset", name}).preset == name);
  }
  check_mentions(flags_error({"--preset", "XL"}), {"--preset: unknown model config 'XL'"});
  testing::ScratchDir dir("config_preset");
  check_mentions(toml_file_error(dir, "preset = 3\n"), {"run.toml: preset must be a string, got 3"});
}

TEST_CASE("config: the checkpoint's train_config keeps its keys and types") {
  TrainConfig c = train_preset("tiny");
  c.model.dense_layers = {0};
  const nlohmann::json j = c;
  std::vector<std::string> keys;
  for (const auto& [key, value] : j.items()) keys.push_back(key);
  const std::vector<std::string> expected = {"data.balanced",
                                             "data.bpe_vocab",
                                             "data.corpus",
                                             "data.domain_key",
                                             "data.labels",
                                             "data.synthetic_docs",
                                             "data.synthetic_domains",
                                             "data.text_key",
                                             "data.tokenizer",
                                             "model.d_model",
                                             "model.dense_hidden",
                                             "model.dense_layers",
                                             "model.expert_hidden",
                                             "model.init_std",
                                             "model.moe_every",
                                             "model.n_experts",
                                             "model.n_heads",
                                             "model.n_layers",
                                             "model.norm_topk",
                                             "model.rope_theta",
                                             "model.seq_len",
                                             "model.shared_experts",
                                             "model.tie_embeddings",
                                             "model.top_k",
                                             "model.vocab_size",
                                             "moe.alpha",
                                             "moe.beta",
                                             "moe.ed_eps",
                                             "moe.ed_form",
                                             "moe.ed_groups",
                                             "moe.ed_scope",
                                             "moe.z_coef",
                                             "omoe.alpha",
                                             "omoe.alpha_scale",
                                             "omoe.every",
                                             "omoe.mode",
                                             "omoe.project_down",
                                             "omoe.reset",
                                             "omoe.spectrum_every",
                                             "omoe.warmup",
                                             "optim.beta1",
                                             "optim.beta2",
                                             "optim.eps",
                                             "optim.grad_clip",
                                             "optim.lr",
                                             "optim.min_lr",
                                             "optim.name",
                                             "optim.warmup",
                                             "optim.weight_decay",
                                             "preset",
                                             "train.batch_size",
                                             "train.checkpoint_every",
                                             "train.device",
                                             "train.eval_batches",
                                             "train.eval_every",
                                             "train.grad_accum",
                                             "train.init_from",
                                             "train.log_every",
                                             "train.out_dir",
                                             "train.precision",
                                             "train.resume",
                                             "train.seed",
                                             "train.steps",
                                             "train.upcycle_noise"};
  CHECK(keys == expected);  // nlohmann's objects keep their keys sorted
  CHECK(j.at("preset") == "tiny");
  CHECK(j.at("model.seq_len") == 64);
  CHECK(j.at("model.dense_layers") == nlohmann::json::array({0}));
  CHECK(j.at("model.init_std") == 0.02);
  CHECK(j.at("data.balanced") == false);
  CHECK(j.at("data.corpus") == "synthetic");
  CHECK(j.at("moe.ed_form") == "neglog");
  CHECK(j.at("optim.name") == "adamw");
  CHECK(j.at("train.seed").is_number_unsigned());
  CHECK(j.at("train.seed") == 1234);
  CHECK(j.at("train.device") == "cpu");
}

TEST_CASE("config: errors stay on one short line, whatever the value") {
  const std::string digits(1000, '7');
  const std::string too_big = flag_error("--train.steps", digits);
  check_mentions(too_big, {"--train.steps must be in [1, 2147483647], got 777", "... (1000 bytes)"});
  CHECK(too_big.size() < 200);
  const std::string long_text = flag_error("--optim.lr", std::string(1000, 'x') + "\n");
  check_mentions(long_text, {"--optim.lr must be a number, got 'xxx", "... (1001 bytes)'"});
  CHECK(long_text.size() < 200);
  testing::ScratchDir dir("config_one_line");
  const std::string array = toml_file_error(dir, "[model]\ndense_layers = [nan, 1]\n");
  check_mentions(array, {"run.toml: model.dense_layers must be an array of integers, got [ nan, 1 ]"});
  CHECK(array.find('\n') == std::string::npos);
}

TEST_CASE("config: the model's shape is checked across options, naming the keys") {
  check_mentions(flags_error({"--model.top_k", "5"}), {"config: model.top_k = 5 must be <= model.n_experts = 4"});
  check_mentions(flags_error({"--model.n_heads", "3"}),
                 {"config: model.d_model = 64 must be a multiple of model.n_heads = 3"});
  check_mentions(flags_error({"--model.n_heads", "64"}), {"config: model.d_model / model.n_heads = 1 must be even"});
  check_mentions(flags_error({"--model.dense_layers", "[2]"}),
                 {"config: model.dense_layers entry 2 must be < model.n_layers = 2"});
  check_mentions(flags_error({"--model.expert_hidden", "0"}), {"config: model.expert_hidden must be > 0 with experts"});
  check_mentions(flags_error({"--omoe.alpha_scale", "0"}),
                 {"config: omoe.alpha_scale must be > 0 when omoe.alpha = 0, got 0"});
  CHECK(from_flags({"--model.n_experts", "0", "--model.expert_hidden", "0", "--model.dense_hidden", "32"})
            .model.dense_hidden == 32);
  TrainConfig c = train_preset("tiny");
  c.model.n_heads = 3;
  check_mentions(error_of([&] { c.validate("run.toml"); }), {"run.toml: model.d_model = 64 must be a multiple"});
}

TEST_CASE("config: a bad name is quoted on one line, from a flag and from a file") {
  CHECK(flag_error("--moe.ed_form", "neg\njsd") == "--moe.ed_form must be one of neglog | neg_jsd, got 'neg\\x0ajsd'");
  CHECK(flags_error({"--preset", "S\nM"}) == "--preset: unknown model config 'S\\x0aM' (known: tiny, S, M)");
  testing::ScratchDir dir("config_names");
  check_mentions(toml_file_error(dir, "[optim]\nname = \"adam\\nw\"\n"),
                 {dir.file("run.toml") + ": optim.name must be one of adamw | omoe, got 'adam\\x0aw'"});
}
