// The fuzz targets (tests/fuzz/fuzz_targets.h) under seeded mutations of the seed corpus (tests/data/fuzz/<target>/):
// every mutated input must load cleanly or fail with one clear error line that names its file. A crash, hang or
// sanitizer report ends the test (ctest's timeout catches a hang). Deterministic: the same seed gives the same inputs.
//   MOELAB_FUZZ_CASES=N   mutations per target (default 3000)
//   MOELAB_FUZZ_SEED=S    another sequence of mutations
//   MOELAB_FUZZ_KEEP=DIR  writes every input that failed the judgement to DIR, to replay by hand
//   MOELAB_WRITE_FUZZ_SEEDS=1  first (re)writes the binary seeds with moelab's own writers (after a format change)
// The seed corpus itself is checked: every seed must load cleanly (so the mutations start from valid files).
#include <algorithm>
#include <cstdlib>
#include <fstream>
#include <random>
#include <sstream>

#include <nlohmann/json.hpp>

#include "data/loader.h"
#include "data/shard.h"
#include "nn/safetensors.h"
#include "tests/fuzz/fuzz_targets.h"
#include "tests/testing.h"

using namespace moelab;
namespace fs = std::filesystem;

namespace {

std::string read_bytes(const fs::path& file) {
  std::ifstream in(file, std::ios::binary);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

std::vector<std::string> seeds_of(const std::string& target) {
  const fs::path folder = testing::source_dir() / "tests/data/fuzz" / target;
  std::vector<fs::path> files;
  if (fs::exists(folder))
    for (const auto& entry : fs::directory_iterator(folder)) files.push_back(entry.path());
  std::sort(files.begin(), files.end());
  std::vector<std::string> seeds;
  for (const fs::path& f : files) seeds.push_back(read_bytes(f));
  return seeds;
}

// The binary seeds, written by the writers the readers pair with: a safetensors file with every dtype and metadata,
// and a shard of two domains.
void write_binary_seeds(const fs::path& root) {
  fs::create_directories(root / "safetensors");
  Tensor a = testing::random({2, 3}, 1, DType::F32), b = testing::random({2}, 2), c = arange(4);
  Tensor h = to_dtype(testing::random({3}, 3, DType::F32), DType::BF16);
  nn::save_safetensors(root / "safetensors" / "model.safetensors", {{"a", a}, {"b", b}, {"c.ids", c}, {"h", h}},
                       {{"config", "{\"d_model\": 8}"}, {"step", "12"}});
  fs::create_directories(root / "checkpoint");
  data::LoaderState loader;
  loader.seed = 1234, loader.num_sequences = 10, loader.batches = 7, loader.cursor = 7;
  Tensor m = testing::random({2, 3}, 4, DType::F32), v = square(testing::random({2, 3}, 5, DType::F32));
  nn::save_safetensors(
      root / "checkpoint" / "state.safetensors", {{"m.w", m}, {"v.w", v}},
      {{"step", "7"}, {"optimizer_steps", "7"}, {"tokens_seen", "1792"}, {"loader", nlohmann::json(loader).dump()}});
  fs::create_directories(root / "shard");
  const std::vector<data::Document> docs = {{"def f(x): return x * 2\n", "code"},
                                            {"the quick brown fox jumps over the lazy dog", "words"},
                                            {"int main() { return 0; }", "code"}};
  data::write_shard(root / "shard" / "train.bin",
                    data::pack_documents(docs, data::ByteTokenizer(), data::Domains::from_documents(docs), 8));
}

int64_t env_int(const char* name, int64_t fallback) {
  const char* v = std::getenv(name);
  return v && *v ? std::stoll(v) : fallback;
}

// Byte strings that parsers trip over: signs, limits of 32 and 64 bits, non-finite and huge numbers, JSON and TOML
// structure, invalid UTF-8, a newline followed by a key.
const std::vector<std::string> kInteresting = {"-1",
                                               "0",
                                               "-0",
                                               "4294967296",
                                               "4294967312",
                                               "9223372036854775807",
                                               "9223372036854775808",
                                               "-9223372036854775808",
                                               "18446744073709551616",
                                               "1e999",
                                               "nan",
                                               "inf",
                                               "-inf",
                                               "null",
                                               "[]",
                                               "{}",
                                               "\"\"",
                                               "[[",
                                               "\xff\xfe",
                                               "\xc3",
                                               "\n[optim]\nlr = 1\n",
                                               std::string(1, '\0'),
                                               "999999999999999999999999999999",
                                               "2e9",
                                               "\"F16\"",
                                               "\"BF16\"",
                                               ",",
                                               ":",
                                               "\n"};

// One to four mutations of `input`, drawn from `gen`.
std::string mutate(std::string input, std::mt19937_64& gen) {
  auto below = [&](size_t n) { return n == 0 ? size_t(0) : static_cast<size_t>(gen() % n); };
  const int count = 1 + static_cast<int>(below(4));
  for (int m = 0; m < count; ++m) {
    const size_t pos = below(input.size() + 1);
    switch (below(7)) {
      case 0:  // flip one bit
        if (!input.empty()) input[below(input.size())] ^= static_cast<char>(1u << below(8));
        break;
      case 1:  // set one byte
        if (!input.empty()) input[below(input.size())] = static_cast<char>(gen() & 0xff);
        break;
      case 2:  // insert an interesting string
        input.insert(pos, kInteresting[below(kInteresting.size())]);
        break;
      case 3:  // delete a range
        input.erase(pos, 1 + below(16));
        break;
      case 4:  // duplicate a range
        if (pos < input.size()) input.insert(pos, input.substr(pos, 1 + below(32)));
        break;
      case 5:  // truncate
        input.resize(pos);
        break;
      case 6: {  // replace the number at a digit with an interesting string
        const size_t digit = input.find_first_of("0123456789", pos);
        if (digit == std::string::npos) break;
        const size_t end = input.find_first_not_of("0123456789", digit);
        input.replace(digit, (end == std::string::npos ? input.size() : end) - digit,
                      kInteresting[below(kInteresting.size())]);
        break;
      }
    }
  }
  return input;
}

void fuzz_target(const std::string& name) {
  const fuzz::Target& target = fuzz::target(name);
  const char* write_seeds = std::getenv("MOELAB_WRITE_FUZZ_SEEDS");
  if (write_seeds && std::string(write_seeds) == "1") write_binary_seeds(testing::source_dir() / "tests/data/fuzz");
  const std::vector<std::string> seeds = seeds_of(name);
  REQUIRE_MESSAGE(!seeds.empty(), "no seed files in tests/data/fuzz/" << name);
  testing::ScratchDir scratch("moelab_fuzz_" + name);
  for (size_t i = 0; i < seeds.size(); ++i) {
    std::string error;
    try {
      target.run(seeds[i], (scratch / ("seed." + name)).string());
    } catch (const std::exception& e) {
      error = e.what();
    }
    CHECK_MESSAGE(error.empty(), "seed " << i << " of " << name << " does not load: " << error);
  }

  const int64_t cases = env_int("MOELAB_FUZZ_CASES", 3000);
  std::mt19937_64 gen(static_cast<uint64_t>(env_int("MOELAB_FUZZ_SEED", 1)) * 1000003 + std::hash<std::string>{}(name));
  const char* keep = std::getenv("MOELAB_FUZZ_KEEP");
  int64_t clean = 0, errors = 0, findings = 0;
  for (int64_t c = 0; c < cases; ++c) {
    const std::string input = mutate(seeds[static_cast<size_t>(gen() % seeds.size())], gen);
    const std::string verdict = fuzz::judge(target, input, scratch.path().string());
    if (verdict.empty()) {
      // judge() does not say which: count a clean load as one that a rerun loads without an exception.
      try {
        target.run(input, (scratch / ("again." + name)).string());
        ++clean;
      } catch (const std::exception&) {
        ++errors;
      }
      continue;
    }
    ++findings;
    if (keep && *keep) {
      fs::create_directories(keep);
      std::ofstream(fs::path(keep) / fmt::format("{}-{}", name, c), std::ios::binary) << input;
    }
    if (findings <= 5) FAIL_CHECK("case " << c << " of " << name << ": " << verdict);
  }
  MESSAGE(name << ": " << cases << " mutated inputs: " << clean << " loaded, " << errors << " clear errors, "
               << findings << " findings");
  CHECK(findings == 0);
}

}  // namespace

TEST_CASE("fuzz: the judgement wants one line, of bounded length, that names the file") {
  CHECK(fuzz::judge_message("x.safetensors: bad header", "x.safetensors").empty());
  CHECK(!fuzz::judge_message("", "").empty());
  CHECK(!fuzz::judge_message("line one\nline two x.safetensors", "x.safetensors").empty());
  CHECK(!fuzz::judge_message(std::string(500, 'a') + " x.safetensors", "x.safetensors").empty());
  CHECK(!fuzz::judge_message("type must be array, but is null", "x.safetensors").empty());
}

TEST_CASE("fuzz: safetensors: mutated files load cleanly or fail with one clear line") { fuzz_target("safetensors"); }
TEST_CASE("fuzz: checkpoint: mutated training states load cleanly or fail with one clear line") {
  fuzz_target("checkpoint");
}
TEST_CASE("fuzz: jsonl: mutated corpus files load cleanly or fail with one clear line") { fuzz_target("jsonl"); }
TEST_CASE("fuzz: shard: mutated token shards load cleanly or fail with one clear line") { fuzz_target("shard"); }
TEST_CASE("fuzz: toml: mutated config files load cleanly or fail with one clear line") { fuzz_target("toml"); }
TEST_CASE("fuzz: flags: mutated command lines parse cleanly or fail with one clear line") { fuzz_target("flags"); }
