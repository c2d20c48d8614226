// Tests of the domain-labelled data layer (nn/data): readers, tokenizers, shards, loader, pipeline.
#include <doctest/doctest.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <map>
#include <numeric>
#include <set>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "data/data.h"
#include "data/excerpt.h"
#include "data/file_io.h"
#include "data/rng.h"
#if MOELAB_HAVE_SENTENCEPIECE
#include "data/sentencepiece_tokenizer.h"
#endif
#include "tests/testing.h"

namespace fs = std::filesystem;
using namespace moelab::data;
using moelab::testing::error_of;
using namespace std::string_literals;

namespace {

// A fresh folder under the system temp dir, removed with everything in it at scope end.
struct TempDir : moelab::testing::ScratchDir {
  TempDir() : ScratchDir("moelab_test_data") {}
};

void write_text(const fs::path& file, const std::string& text) {
  fs::create_directories(file.parent_path());
  std::ofstream(file, std::ios::binary) << text;
}

bool contains(const std::string& haystack, const std::string& needle) {
  return haystack.find(needle) != std::string::npos;
}

// Whether byte c can occur in a synthetic document of `domain` (or is the "\n\n" separator).
bool byte_fits_domain(const std::string& domain, int c) {
  if (c == '\n') return true;
  if (domain == "csv") return (c >= '0' && c <= '9') || c == ',';
  if (domain == "words") return (c >= 'a' && c <= 'z') || c == ' ' || c == '.';
  if (domain == "shout") return (c >= 'A' && c <= 'Z') || c == ' ' || c == ',' || c == '.' || c == '!';
  if (domain == "cyrillic") return c >= 0x80 || c == ' ' || c == '.';
  if (domain == "code") return c < 0x80 && !(c >= 'A' && c <= 'Z');
  return false;
}

std::shared_ptr<const Shard> synthetic_shard(int docs_per_domain = 6, int seq_len = 32) {
  const auto docs = make_synthetic_corpus(42, docs_per_domain, 5, 300);
  return std::make_shared<const Shard>(pack_documents(docs, ByteTokenizer(), Domains::from_documents(docs), seq_len));
}

}  // namespace

TEST_CASE("data: splitmix64 matches the reference sequence, bounded draws are in range and uniform") {
  SplitMix64 rng(1234567);  // reference values from the published splitmix64.c
  CHECK(rng.next() == 6457827717110365317ull);
  CHECK(rng.next() == 3203168211198807973ull);
  CHECK(rng.next() == 9817491932198370423ull);
  CHECK(rng.next() == 4593380528125082431ull);
  CHECK(rng.next() == 16408922859458223821ull);

  SplitMix64 draws(7);
  std::vector<int> counts(6, 0);
  for (int i = 0; i < 60000; i++) counts[draws.below(6)]++;
  for (int c : counts) CHECK(std::abs(c - 10000) < 400);  // ~4 sigma
  CHECK(draws.below(1) == 0);
  CHECK_THROWS(draws.below(0));
}

TEST_CASE("data: byte tokenizer is exact, including invalid UTF-8") {
  ByteTokenizer tok;
  const std::string text = std::string("A\xff\xfe\x80 z\xc3", 7) + "\0end"s + "мир";
  const std::vector<int32_t> ids = tok.encode(text);
  CHECK(ids.size() == text.size());
  CHECK(ids[0] == 65);
  CHECK(ids[1] == 255);
  CHECK(ids[3] == 0x80);
  CHECK(ids[7] == 0);
  CHECK(tok.decode(ids) == text);
  CHECK(tok.vocab_size() == 256);
  CHECK(tok.name() == "byte");
  CHECK(tok.document_separator() == std::vector<int32_t>{'\n', '\n'});
  const std::vector<int32_t> bad = {65, 300};
  const std::string message = error_of([&] { tok.decode(bad); });
  CHECK(contains(message, "300"));
  CHECK(contains(message, "position 1"));
}

TEST_CASE("data: JSONL reader with plain and dotted domain keys") {
  TempDir dir;
  const fs::path file = dir / "train.jsonl";
  write_text(file,
             "{\"text\": \"int main() {}\", \"domain\": \"code_c\", \"source\": \"glibc\"}\n"
             "\n"  // blank lines are skipped
             "{\"text\": \"Call me Ishmael.\\n\", \"domain\": \"literature\","
             " \"meta\": {\"pile_set_name\": \"Books3\"}}\r\n"
             "{\"text\": \"\\u00e9t\\u00e9\", \"domain\": \"multilingual\"}\n");
  const auto docs = read_jsonl(file);
  REQUIRE(docs.size() == 3);
  CHECK(docs[0].text == "int main() {}");
  CHECK(docs[0].domain == "code_c");
  CHECK(docs[1].text == "Call me Ishmael.\n");
  CHECK(docs[2].text == "\xc3\xa9t\xc3\xa9");  // "été" as UTF-8

  const fs::path pile = dir / "pile.jsonl";
  write_text(pile,
             "{\"text\": \"a\", \"meta\": {\"pile_set_name\": \"Github\"}}\n"
             "{\"text\": \"b\", \"meta\": {\"pile_set_name\": \"ArXiv\"}, \"meta.pile_set_name\": \"Literal\"}\n");
  const auto pile_docs = read_jsonl(pile, {.domain_key = "meta.pile_set_name"});
  REQUIRE(pile_docs.size() == 2);
  CHECK(pile_docs[0].domain == "Github");
  CHECK(pile_docs[1].domain == "Literal");  // a literal dotted key wins over the path

  // A domain list keeps only those domains when skipping is asked for.
  const auto kept = read_jsonl(file, {.domains = {"literature"}, .skip_unknown_domains = true});
  REQUIRE(kept.size() == 1);
  CHECK(kept[0].domain == "literature");
}

TEST_CASE("data: JSONL errors name the file, the line and the problem") {
  TempDir dir;
  const fs::path file = dir / "bad.jsonl";
  const std::string good = "{\"text\": \"ok\", \"domain\": \"d\"}\n";

  write_text(file, good + good + "{\"text\": \"broken\n");
  std::string message = error_of([&] { read_jsonl(file); });
  CHECK(contains(message, file.string() + ":3"));
  CHECK(contains(message, "invalid JSON"));

  write_text(file, good + "{\"body\": \"x\", \"domain\": \"d\"}\n");
  message = error_of([&] { read_jsonl(file); });
  CHECK(contains(message, file.string() + ":2"));
  CHECK(contains(message, "missing key 'text'"));

  write_text(file, "{\"text\": \"x\", \"meta\": {\"other\": 1}}\n");
  message = error_of([&] { read_jsonl(file, {.domain_key = "meta.pile_set_name"}); });
  CHECK(contains(message, file.string() + ":1"));
  CHECK(contains(message, "missing key 'meta.pile_set_name'"));

  write_text(file, "{\"text\": 17, \"domain\": \"d\"}\n");
  message = error_of([&] { read_jsonl(file); });
  CHECK(contains(message, "key 'text' should be a string, got number"));

  write_text(file, good + good + good + "{\"text\": \"x\", \"domain\": \"poetry\"}\n");
  message = error_of([&] { read_jsonl(file, {.domains = {"d", "prose"}}); });
  CHECK(contains(message, file.string() + ":4"));
  CHECK(contains(message, "unknown domain 'poetry' (expected one of: d, prose)"));

  write_text(file, "\n  \n");
  message = error_of([&] { read_jsonl(file); });
  CHECK(contains(message, file.string()));
  CHECK(contains(message, "empty corpus"));

  message = error_of([&] { read_jsonl(dir / "missing.jsonl"); });
  CHECK(contains(message, "missing.jsonl"));
}

TEST_CASE("data: text folder reader: one document per file, sorted, bytes kept") {
  TempDir dir;
  write_text(dir / "corpus/b/2.txt", "second b");
  write_text(dir / "corpus/b/1.txt", "first b \xff");
  write_text(dir / "corpus/a/x.txt", "only a");
  write_text(dir / "corpus/a/notes.md", "not a txt file");
  const auto docs = read_text_folder(dir / "corpus");
  REQUIRE(docs.size() == 3);
  CHECK(docs[0].domain == "a");
  CHECK(docs[0].text == "only a");
  CHECK(docs[1].text == "first b \xff");
  CHECK(docs[2].text == "second b");
  CHECK(docs[2].domain == "b");

  CHECK(contains(error_of([&] { read_text_folder(dir / "corpus", {.domains = {"a"}}); }), "unknown domain 'b'"));
  CHECK(read_text_folder(dir / "corpus", {.domains = {"a"}, .skip_unknown_domains = true}).size() == 1);
  fs::create_directories(dir / "empty/a");
  CHECK(contains(error_of([&] { read_text_folder(dir / "empty"); }), "empty corpus"));
  CHECK(contains(error_of([&] { read_text_folder(dir / "nowhere"); }), "does not exist"));
}

TEST_CASE("data: domains registry") {
  const std::vector<Document> docs = {{"x", "speech"}, {"y", "code_c"}, {"z", "speech"}, {"w", "legal"}};
  const Domains domains = Domains::from_documents(docs);
  CHECK(domains.names() == std::vector<std::string>{"code_c", "legal", "speech"});
  CHECK(domains.id("speech") == 2);
  CHECK(domains.name(1) == "legal");
  CHECK(domains.find("math") == -1);
  CHECK(contains(error_of([&] { domains.id("math"); }), "unknown domain 'math' (known: code_c, legal, speech)"));
  CHECK(contains(error_of([&] { Domains({"a", "b", "a"}); }), "'a' is listed twice"));
  CHECK_THROWS(domains.name(3));
}

TEST_CASE("data: packing concatenates one domain's documents and never mixes domains") {
  // Domain a: "aaaaa" + "\n\n" + "aaaaaaa" + "\n\n" = 16 tokens; T = 4 -> rows start at 0, 4, 8 (12 + 5 > 16).
  const std::vector<Document> docs = {{"aaaaa", "a"}, {"bbb", "b"}, {"aaaaaaa", "a"}, {"", "b"}};
  const Shard shard = pack_documents(docs, ByteTokenizer(), Domains({"a", "b"}), 4);
  REQUIRE(shard.size() == 4);  // 3 rows of a, then b: "bbb\n\n" is exactly one row; the empty document adds nothing
  CHECK(shard.header.seq_len == 4);
  CHECK(shard.header.vocab_size == 256);
  CHECK(shard.header.tokenizer == "byte");
  const auto row = [&](int64_t i) { return ByteTokenizer().decode(shard.tokens(i)); };
  CHECK(shard.domain(0) == 0);
  CHECK(row(0) == "aaaaa");
  CHECK(row(1) == "a\n\naa");  // consecutive rows share one token: row 0's last target is row 1's first input
  CHECK(row(2) == "aaaaa");
  CHECK(shard.domain(3) == 1);
  CHECK(row(3) == "bbb\n\n");
  CHECK(shard.sequences_per_domain() == std::vector<int64_t>{3, 1});
  CHECK(contains(error_of([&] { pack_documents({{"x", "c"}}, ByteTokenizer(), Domains({"a"}), 4); }),
                 "unknown domain 'c'"));

  // On the synthetic corpus every row holds bytes of its own domain only.
  const auto synth = make_synthetic_corpus(3, 8, 5, 400);
  const Shard big = pack_documents(synth, ByteTokenizer(), Domains::from_documents(synth), 48);
  CHECK(big.size() > 100);
  for (int64_t i = 0; i < big.size(); i++) {
    const std::string& domain = big.header.domains.name(big.domain(i));
    for (int32_t t : big.tokens(i)) REQUIRE_MESSAGE(byte_fits_domain(domain, t), "row ", i, " of ", domain, " has ", t);
  }
}

TEST_CASE("data: shard write/read round trip, exact size, atomic write") {
  TempDir dir;
  const auto shard = synthetic_shard(4, 16);
  const fs::path file = dir / "train.bin";
  write_shard(file, *shard);
  // Header: 56 fixed bytes + "byte" (4) + 5 names with 4-byte lengths, padded to 8; then N rows of (16 + 2) int32.
  const int64_t names_bytes = 4 + 3 + 4 + 4 + 4 + 5 + 4 + 5 + 4 + 8;  // code csv cyrillic shout words
  const int64_t header_bytes = (56 + 4 + names_bytes + 7) / 8 * 8;
  CHECK(int64_t(fs::file_size(file)) == header_bytes + shard->size() * 18 * 4);
  int files = 0;
  for (const auto& entry : fs::directory_iterator(dir.path())) files += entry.is_regular_file();
  CHECK(files == 1);  // no temporary file left behind

  const Shard back = read_shard(file);
  CHECK(back.header.vocab_size == 256);
  CHECK(back.header.seq_len == 16);
  CHECK(back.header.num_sequences == shard->size());
  CHECK(back.header.tokenizer == "byte");
  CHECK(back.header.domains.names() == std::vector<std::string>{"code", "csv", "cyrillic", "shout", "words"});
  CHECK(back.rows == shard->rows);
  CHECK(read_shard_header(file).num_sequences == shard->size());

  // An empty shard (no sequences) is valid too.
  Shard empty;
  empty.header = {256, 8, 0, "byte", Domains({"x"})};
  write_shard(dir / "empty.bin", empty);
  CHECK(read_shard(dir / "empty.bin").size() == 0);
}

TEST_CASE("data: corrupt shards: truncated, trailing bytes, bad magic, bad version, token id >= vocab") {
  TempDir dir;
  const auto shard = synthetic_shard(2, 8);
  const fs::path file = dir / "train.bin";
  write_shard(file, *shard);
  const int64_t size = int64_t(fs::file_size(file));
  const int64_t row_bytes = (8 + 2) * 4;
  const int64_t header_bytes = size - shard->size() * row_bytes;

  fs::resize_file(file, size - 10);
  std::string message = error_of([&] { read_shard(file); });
  CHECK(contains(message, file.string()));
  CHECK(contains(message, "truncated"));
  CHECK(contains(message, fmt::format("expected {} bytes", size)));
  CHECK(contains(message, fmt::format("got {}", size - 10)));
  CHECK(contains(error_of([&] { read_shard_header(file); }), "truncated"));

  fs::resize_file(file, 20);
  CHECK(contains(error_of([&] { read_shard(file); }), "shorter than the 56-byte fixed header"));

  write_shard(file, *shard);
  fs::resize_file(file, size + 4);
  CHECK(contains(error_of([&] { read_shard(file); }), "trailing bytes"));

  const auto patch = [&](int64_t offset, const void* bytes, size_t n) {
    std::fstream f(file, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(offset);
    f.write(static_cast<const char*>(bytes), std::streamsize(n));
  };
  write_shard(file, *shard);
  patch(0, "NOTASHRD", 8);
  CHECK(contains(error_of([&] { read_shard(file); }), "bad magic"));

  write_shard(file, *shard);
  const uint32_t version = 99;
  patch(8, &version, 4);
  CHECK(contains(error_of([&] { read_shard(file); }), "format version 99 is not supported (expected 2)"));

  write_shard(file, *shard);
  const int32_t bad_token = 300;
  const int64_t offset = header_bytes + 2 * row_bytes + (1 + 5) * 4;  // sequence 2, token 5
  patch(offset, &bad_token, 4);
  message = error_of([&] { read_shard(file); });
  CHECK(contains(message, file.string()));
  CHECK(contains(message, "sequence 2, token 5"));
  CHECK(contains(message, fmt::format("byte offset {}", offset)));
  CHECK(contains(message, "token id 300 out of range (expected 0..255"));

  write_shard(file, *shard);
  const int32_t bad_domain = 7;
  patch(header_bytes + row_bytes, &bad_domain, 4);
  CHECK(contains(error_of([&] { read_shard(file); }), "sequence 1 (byte offset"));
}

TEST_CASE("data: loader is deterministic, shuffles per epoch, and targets are inputs shifted by one") {
  const auto shard = synthetic_shard();
  const int64_t n = shard->size();
  const int T = shard->seq_len();
  Loader a(shard, {.batch_size = 4, .seed = 1}), b(shard, {.batch_size = 4, .seed = 1});
  Loader c(shard, {.batch_size = 4, .seed = 2});
  bool any_difference = false;
  std::vector<int64_t> epoch0;
  for (int i = 0; i < 3 * n / 4; i++) {
    const Batch x = a.next(), y = b.next(), z = c.next();
    REQUIRE(x.inputs == y.inputs);
    REQUIRE(x.domains == y.domains);
    any_difference |= x.sequence_ids != z.sequence_ids;
    CHECK(x.inputs.size() == size_t(4 * T));
    for (int r = 0; r < 4; r++) {
      const auto tokens = shard->tokens(x.sequence_ids[r]);
      CHECK(std::equal(tokens.begin(), tokens.end() - 1, x.inputs.begin() + r * T));
      CHECK(std::equal(tokens.begin() + 1, tokens.end(), x.targets.begin() + r * T));
      CHECK(x.domains[r] == shard->domain(x.sequence_ids[r]));
      if (int64_t(epoch0.size()) < n) epoch0.push_back(x.sequence_ids[r]);
    }
  }
  CHECK(any_difference);
  // The first epoch is a permutation of all sequences, not the shard order.
  std::vector<int64_t> sorted = epoch0, identity(n);
  std::iota(identity.begin(), identity.end(), int64_t(0));
  std::sort(sorted.begin(), sorted.end());
  CHECK(sorted == identity);
  CHECK(epoch0 != identity);
  CHECK(a.state().epoch >= 2);

  // Without shuffling: shard order, wrapping around.
  Loader ordered(shard, {.batch_size = 3, .shuffle = false});
  CHECK(ordered.next().sequence_ids == std::vector<int64_t>{0, 1, 2});
  CHECK(ordered.next().sequence_ids == std::vector<int64_t>{3, 4, 5});
}

TEST_CASE("data: loader resumes bit-exactly from a saved state (sequential and balanced)") {
  const auto shard = synthetic_shard();
  for (bool balanced : {false, true}) {
    CAPTURE(balanced);
    const LoaderOptions options{.batch_size = 5, .seed = 99, .balanced_domains = balanced};
    Loader original(shard, options);
    for (int i = 0; i < 2 * shard->size() / 5 + 3; i++) original.next();  // past an epoch boundary
    const std::string saved = nlohmann::json(original.state()).dump();
    std::vector<Batch> expected;
    for (int i = 0; i < 12; i++) expected.push_back(original.next());

    Loader resumed(shard, options);
    resumed.restore(nlohmann::json::parse(saved).get<LoaderState>());
    CHECK(nlohmann::json(resumed.state()).dump() == saved);
    for (int i = 0; i < 12; i++) {
      const Batch batch = resumed.next();
      CHECK(batch.sequence_ids == expected[i].sequence_ids);
      CHECK(batch.inputs == expected[i].inputs);
      CHECK(batch.targets == expected[i].targets);
    }
    CHECK(resumed.state() == original.state());
  }
  Loader other_seed(shard, {.batch_size = 5, .seed = 7});
  Loader saved_from(shard, {.batch_size = 5, .seed = 99});
  CHECK(contains(error_of([&] { other_seed.restore(saved_from.state()); }), "seed 99 (loader: 7)"));
  CHECK(contains(error_of([&] { nlohmann::json::parse(R"({"seed": 1})").get<LoaderState>(); }),
                 "missing key 'balanced_domains'"));
}

TEST_CASE("data: balanced sampling draws domains uniformly, sequential follows domain sizes") {
  // csv gets 10x the documents of every other domain.
  auto docs = make_synthetic_corpus(5, 3, 5, 300);
  const auto extra = make_synthetic_corpus(6, 27, 1, 300);
  docs.insert(docs.end(), extra.begin(), extra.end());
  const Domains domains = Domains::from_documents(docs);
  const auto shard = std::make_shared<const Shard>(pack_documents(docs, ByteTokenizer(), domains, 32));
  const int csv = domains.id("csv");
  const auto shares = [&](bool balanced) {
    Loader loader(shard, {.batch_size = 8, .seed = 3, .balanced_domains = balanced});
    std::vector<double> share(domains.size(), 0.0);
    const int batches = 400;
    for (int i = 0; i < batches; i++)
      for (int32_t d : loader.next().domains) share[d] += 1.0 / (8 * batches);
    return share;
  };
  for (double s : shares(true)) CHECK(std::abs(s - 0.2) < 0.03);  // 3200 draws: sigma 0.007
  const auto sizes = shard->sequences_per_domain();
  CHECK(shares(false)[csv] == doctest::Approx(double(sizes[csv]) / shard->size()).epsilon(0.1));
  CHECK(shares(false)[csv] > 0.5);
}

TEST_CASE("data: every-k-th validation split, and a loader over a subset") {
  const Split split = split_every_kth(10, 3);
  CHECK(split.validation == std::vector<int64_t>{2, 5, 8});
  CHECK(split.train == std::vector<int64_t>{0, 1, 3, 4, 6, 7, 9});
  CHECK_THROWS(split_every_kth(10, 1));

  const auto shard = synthetic_shard();
  const Split s = split_every_kth(shard->size(), 4);
  Loader validation(shard, s.validation, {.batch_size = 2, .shuffle = false});
  CHECK(validation.num_sequences() == int64_t(s.validation.size()));
  CHECK(validation.next().sequence_ids == std::vector<int64_t>{3, 7});
  Loader train(shard, s.train, {.batch_size = 4, .seed = 1});
  for (int i = 0; i < 20; i++)
    for (int64_t id : train.next().sequence_ids) REQUIRE(id % 4 != 3);
}

TEST_CASE("data: random-label controls: a permutation keeps every label's count, uniform labels cover the domains") {
  const auto shard = synthetic_shard();
  const int64_t D = shard->header.domains.size();
  REQUIRE(D >= 2);
  const std::vector<int64_t> true_counts = shard->sequences_per_domain();
  auto labels_of = [](const Shard& s) {
    std::vector<int32_t> out;
    for (int64_t i = 0; i < s.size(); i++) out.push_back(s.domain(i));
    return out;
  };
  auto relabelled = [&](DomainLabels labels, uint64_t seed) {
    Shard copy = *shard;
    relabel_domains(copy, labels, seed);
    for (int64_t i = 0; i < copy.size(); i++)  // the text stays: only the label moves
      REQUIRE(std::ranges::equal(copy.tokens(i), shard->tokens(i)));
    return copy;
  };
  CHECK(labels_of(relabelled(DomainLabels::True, 1)) == labels_of(*shard));

  const Shard permuted = relabelled(DomainLabels::Permuted, 1);
  CHECK(permuted.sequences_per_domain() == true_counts);
  int64_t moved = 0;
  for (int64_t i = 0; i < shard->size(); i++) moved += permuted.domain(i) != shard->domain(i);
  // A random permutation keeps a sequence's label with probability sum_j (n_j / N)^2 (1/D for equal domains).
  MESSAGE("permuted: " << moved << " of " << shard->size() << " labels changed");
  CHECK(moved > shard->size() / 2);
  CHECK(labels_of(relabelled(DomainLabels::Permuted, 1)) == labels_of(permuted));  // seeded
  CHECK(labels_of(relabelled(DomainLabels::Permuted, 2)) != labels_of(permuted));

  const Shard uniform = relabelled(DomainLabels::Uniform, 3);
  const std::vector<int64_t> counts = uniform.sequences_per_domain();
  REQUIRE(int64_t(counts.size()) == D);
  for (int64_t d = 0; d < D; d++) {
    CAPTURE(d);
    CHECK(counts[d] > 0);  // each domain's expected count is N / D, far from 0 here
  }
  CHECK(std::accumulate(counts.begin(), counts.end(), int64_t(0)) == shard->size());
}

TEST_CASE("data: synthetic corpus is seeded and its domains differ") {
  const auto a = make_synthetic_corpus(11, 3, 5, 200), b = make_synthetic_corpus(11, 3, 5, 200);
  const auto c = make_synthetic_corpus(12, 3, 5, 200);
  REQUIRE(a.size() == 15);
  CHECK(a[0].domain == "csv");
  CHECK(a[4].domain == "cyrillic");
  CHECK(a[5].domain == "csv");  // interleaved
  bool same_as_b = true, same_as_c = true;
  for (size_t i = 0; i < a.size(); i++) {
    same_as_b &= a[i].text == b[i].text;
    same_as_c &= a[i].text == c[i].text;
    CHECK(a[i].text.size() >= 200);
    CHECK(a[i].text.back() == '\n');
    for (unsigned char ch : a[i].text) REQUIRE(byte_fits_domain(a[i].domain, ch));
  }
  CHECK(same_as_b);
  CHECK(!same_as_c);
  CHECK(std::count(a[1].text.begin(), a[1].text.end(), '{') >= 3);  // code is brace-heavy
  // Pinned: the generator uses only our portable RNG, so these lines are the same with every compiler. Other tests
  // (MoE training) rely on this text; change the generator only on purpose.
  const auto first_line = [&](int i) { return a[i].text.substr(0, a[i].text.find('\n')); };
  CHECK(first_line(0) == "8,12663,342,3,16164");
  CHECK(first_line(1) == "    } else { return scan(total9); }");
  CHECK(first_line(2) == "likes red tree near house.");
  CHECK(first_line(3) == "SHALL SHALL THE!");
  CHECK(first_line(4) == "время окно дорога река снег окно книга река.");
}

#if MOELAB_HAVE_SENTENCEPIECE
TEST_CASE("data: SentencePiece BPE trains deterministically and round-trips text") {
  TempDir dir;
  const auto docs = make_synthetic_corpus(21, 30, 5, 400);
  const SentencePieceOptions options{.vocab_size = 512, .seed = 5};
  const auto first = SentencePieceTokenizer::train(docs, dir / "first.model", options);
  const auto second = SentencePieceTokenizer::train(docs, dir / "second.model", options);
  CHECK(read_file(dir / "first.model") == read_file(dir / "second.model"));  // identical model files
  CHECK(first.name() == second.name());
  CHECK(first.vocab_size() == 512);
  CHECK(first.eos_id() == 2);
  CHECK(first.document_separator() == std::vector<int32_t>{2});

  const auto loaded = SentencePieceTokenizer::load(dir / "first.model");
  CHECK(loaded.name() == first.name());
  int64_t bytes = 0, tokens = 0;
  for (const Document& doc : docs) {
    const auto ids = first.encode(doc.text);
    REQUIRE(ids == second.encode(doc.text));
    REQUIRE(ids == loaded.encode(doc.text));
    REQUIRE(first.decode(ids) == doc.text);
    bytes += int64_t(doc.text.size());
    tokens += int64_t(ids.size());
  }
  CHECK(double(bytes) / tokens > 2.0);  // it learned the domains' words, not just bytes
  // Text it never saw: whitespace, tabs, newlines, accents, CJK and a control byte survive exactly (byte fallback).
  const std::string unseen = "  Hello\tWorld\n\n  été 中文 \x01 end\n";
  CHECK(first.decode(first.encode(unseen)) == unseen);

  // A shard made with it records its name and vocabulary.
  const Shard shard = pack_documents(docs, loaded, Domains::from_documents(docs), 32);
  write_shard(dir / "spm.bin", shard);
  const Shard back = read_shard(dir / "spm.bin");
  CHECK(back.header.vocab_size == 512);
  CHECK(back.header.tokenizer == first.name());
  CHECK(load_tokenizer((dir / "first.model").string())->name() == first.name());
  CHECK(load_tokenizer("byte")->name() == "byte");
  CHECK(contains(error_of([&] { SentencePieceTokenizer::load(dir / "spm.bin"); }), "is not a SentencePiece model"));
}
#else
TEST_CASE("data: without SentencePiece, BPE tokenizers say what is missing") {
  CHECK_FALSE(sentencepiece_available());
  CHECK(contains(error_of([] { load_tokenizer("bpe-512.model"); }), "no SentencePiece"));
  CHECK(load_tokenizer("byte")->name() == "byte");
}
#endif

TEST_CASE("data: build_shards turns corpus JSONL into train and validation shards") {
  TempDir dir;
  const auto write_jsonl = [&](const fs::path& file, const std::vector<Document>& docs) {
    std::string text;
    for (const Document& d : docs)
      text += nlohmann::json{{"text", d.text}, {"domain", d.domain}, {"source", "synthetic"}}.dump() + "\n";
    write_text(file, text);
  };
  write_jsonl(dir / "corpus/train.jsonl", make_synthetic_corpus(1, 10, 5, 300));
  write_jsonl(dir / "corpus/validation.jsonl", make_synthetic_corpus(2, 2, 5, 300));
  ShardBuildOptions options{.train_jsonl = dir / "corpus/train.jsonl",
                            .validation_jsonl = dir / "corpus/validation.jsonl",
                            .seq_len = 32,
                            .out_dir = dir / "shards"};
  const ShardBuildResult built = build_shards(options, ByteTokenizer());
  CHECK(!built.up_to_date);
  CHECK(built.domains.names() == std::vector<std::string>{"code", "csv", "cyrillic", "shout", "words"});
  const Shard train = read_shard(built.train_shard), validation = read_shard(built.validation_shard);
  CHECK(train.header.domains == validation.header.domains);
  CHECK(train.sequences_per_domain() == built.train_sequences_per_domain);
  CHECK(validation.sequences_per_domain() == built.validation_sequences_per_domain);
  for (int64_t count : built.validation_sequences_per_domain) CHECK(count >= 10);  // ~600 bytes / 32 per domain
  for (int64_t count : built.train_sequences_per_domain) CHECK(count >= 80);
  CHECK(fs::exists(built.manifest));

  CHECK(build_shards(options, ByteTokenizer()).up_to_date);  // same inputs: nothing rebuilt
  options.seq_len = 16;
  CHECK(!build_shards(options, ByteTokenizer()).up_to_date);

  // A validation domain the train file does not have is an error naming the file and line.
  write_text(dir / "corpus/validation.jsonl", "{\"text\": \"x\", \"domain\": \"csv\"}\n"
                                              "{\"text\": \"y\", \"domain\": \"poetry\"}\n");
  const std::string message = error_of([&] { build_shards(options, ByteTokenizer()); });
  CHECK(contains(message, (dir / "corpus/validation.jsonl").string() + ":2"));
  CHECK(contains(message, "unknown domain 'poetry'"));

  // Without a validation file every 5th train sequence is held out.
  options.validation_jsonl.clear();
  options.holdout_every = 5;
  options.out_dir = dir / "holdout";
  const ShardBuildResult holdout = build_shards(options, ByteTokenizer());
  const int64_t n_train = read_shard(holdout.train_shard).size(), n_val = read_shard(holdout.validation_shard).size();
  const int64_t n_all = n_train + n_val;
  CHECK(n_val == n_all / 5);
}

TEST_CASE("data: the committed small corpus (scripts/build_corpus.py format) reads and packs") {
  const fs::path corpus = moelab::testing::source_dir() / "tests/data/corpus_small";
  if (!fs::exists(corpus / "train.jsonl")) {
    MESSAGE("skipped: no fixture at ", corpus.string());
    return;
  }
  // The fixture's own manifest says what to expect, so regenerating the fixture does not break this test.
  const auto manifest = nlohmann::json::parse(read_file(corpus / "manifest.json"));
  const auto train_docs = read_jsonl(corpus / "train.jsonl");
  CHECK(int64_t(train_docs.size()) == manifest["files"]["train.jsonl"]["docs"].get<int64_t>());
  std::vector<std::string> expected_domains = manifest["domains"].get<std::vector<std::string>>();
  std::sort(expected_domains.begin(), expected_domains.end());
  CHECK(Domains::from_documents(train_docs).names() == expected_domains);

  TempDir dir;
  const ShardBuildResult built = build_shards({.train_jsonl = corpus / "train.jsonl",
                                               .validation_jsonl = corpus / "val.jsonl",
                                               .jsonl = {},
                                               .seq_len = 64,
                                               .out_dir = dir / "shards"},
                                              ByteTokenizer());
  for (int64_t count : built.train_sequences_per_domain) CHECK(count >= 1);
  const auto shard = std::make_shared<const Shard>(read_shard(built.train_shard));
  Loader loader(shard, {.batch_size = 8, .seed = 1, .balanced_domains = true});
  const Batch batch = loader.next();
  CHECK(batch.inputs.size() == 8 * 64);
  CHECK(ByteTokenizer().decode(shard->tokens(0)).size() == 65);
}

// ==== values read from disk: corrupt input gives one short line naming the file ====================================

TEST_CASE("data: a long JSONL line with one bad byte gives a short error with the line and its length") {
  TempDir dir;
  const fs::path file = dir / "long.jsonl";
  const std::string good = "{\"text\": \"ok\", \"domain\": \"d\"}\n";
  std::string line = "{\"text\": \"" + std::string(4 << 20, 'a') + "\xff" + "\", \"domain\": \"d\"}";
  write_text(file, good + line + "\n");
  const std::string message = error_of([&] { read_jsonl(file); });
  CHECK(message.size() < 300);
  CHECK(contains(message, file.string() + ":2"));
  CHECK(contains(message, fmt::format("of {}", line.size())));  // the line's byte length
  CHECK(contains(message, "ill-formed UTF-8"));
  CHECK(contains(message, "aaa\\xff'"));  // the bad byte, quoted as \xff, at the end of a short excerpt

  // A 1 MB domain name is quoted cut short, with its length.
  write_text(file, "{\"text\": \"x\", \"domain\": \"" + std::string(1 << 20, 'z') + "\"}\n");
  const std::string unknown = error_of([&] { read_jsonl(file, {.domains = {"d"}}); });
  CHECK(unknown.size() < 300);
  CHECK(contains(unknown, fmt::format("zzz... ({} bytes)", 1 << 20)));
}

TEST_CASE("data: excerpts of bytes from files are short, printable and say the whole length") {
  CHECK(excerpt("plain") == "plain");
  CHECK(excerpt("tab\there\n") == "tab\\x09here\\x0a");
  CHECK(excerpt("\xc3\xa9t\xc3\xa9") == "\xc3\xa9t\xc3\xa9");  // UTF-8 stays
  CHECK(excerpt("a\xff\xc3") == "a\\xff\\xc3");                // bytes that are no character do not
  CHECK(excerpt(std::string(1000, 'x'), 10) == "xxxxxxxxxx... (1000 bytes)");
  CHECK(excerpt("ab\xc3\xa9", 3) == "ab... (4 bytes)");  // a character is never cut in two
  const auto error_parsing = [](const std::string& input) {
    try {
      const nlohmann::json parsed = nlohmann::json::parse(input);
      (void)parsed;
    } catch (const nlohmann::json::exception& e) {
      return json_error(e, input);
    }
    return std::string("<no exception>");
  };
  const std::string message = error_parsing(std::string(1000, ' ') + "{oops}");
  CHECK(message.size() < 200);
  CHECK(contains(message, "invalid JSON at byte 100"));
  CHECK(contains(message, "of 1006: syntax error while parsing object key"));
  CHECK(contains(message, "; expected string literal"));
  CHECK(contains(message, "; near '..." + std::string(22, ' ') + "{o'"));  // the 24 bytes up to the error
  // A number too large for a double: not a parse error, and its 10000 digits are cut short too.
  const std::string overflow = error_parsing("[" + std::string(10000, '9') + "]");
  CHECK(overflow.size() < 200);
  CHECK(contains(overflow, "invalid JSON: number overflow parsing '999"));
}

TEST_CASE("data: a shard header with a flipped bit fails its checksum, naming the file") {
  TempDir dir;
  const auto shard = synthetic_shard(2, 8);
  const fs::path file = dir / "train.bin";
  write_shard(file, *shard);
  const std::string header = read_file(file).substr(0, 200);
  const size_t at = header.find("cyrillic");
  REQUIRE(at != std::string::npos);
  std::fstream f(file, std::ios::in | std::ios::out | std::ios::binary);
  f.seekp(std::streamoff(at));
  f.put('C');  // the domain "cyrillic" would silently become "Cyrillic"
  f.close();
  for (const std::string& message : {error_of([&] { read_shard(file); }), error_of([&] { read_shard_header(file); })}) {
    CHECK(contains(message, file.string()));
    CHECK(contains(message, "corrupt header: its bytes give checksum"));
  }
}

namespace {

// A corpus folder and the shard options of a small build from it.
struct CachedCorpus {
  TempDir dir;
  ShardBuildOptions options;
  CachedCorpus() {
    std::string text;
    for (const Document& d : make_synthetic_corpus(1, 6, 3, 300))
      text += nlohmann::json{{"text", d.text}, {"domain", d.domain}}.dump() + "\n";
    write_text(dir / "corpus/train.jsonl", text);
    options = {.train_jsonl = dir / "corpus/train.jsonl", .holdout_every = 5, .seq_len = 32, .out_dir = dir / "shards"};
  }
  void patch(const fs::path& file, int64_t offset, const std::string& bytes) const {
    std::fstream f(file, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(offset);
    f.write(bytes.data(), std::streamsize(bytes.size()));
  }
};

}  // namespace

TEST_CASE("data: cached shards with a corrupt header, body or manifest are rebuilt, saying why") {
  CachedCorpus corpus;
  const BuiltShards first = build_and_read_shards(corpus.options, ByteTokenizer());
  CHECK(!first.build.up_to_date);
  CHECK(first.build.cache_problem.empty());
  const BuiltShards again = build_and_read_shards(corpus.options, ByteTokenizer());
  CHECK(again.build.up_to_date);
  CHECK(again.build.cache_problem.empty());

  // A flipped bit in a domain name of the header: caught by the header's checksum.
  const fs::path train = first.build.train_shard;
  const size_t at = read_file(train).find("words");
  REQUIRE(at != std::string::npos);
  corpus.patch(train, int64_t(at), "Words");
  BuiltShards rebuilt = build_and_read_shards(corpus.options, ByteTokenizer());
  CHECK(!rebuilt.build.up_to_date);
  CHECK(contains(rebuilt.build.cache_problem, train.string()));
  CHECK(contains(rebuilt.build.cache_problem, "corrupt header"));
  CHECK(rebuilt.train.header.domains == first.train.header.domains);
  CHECK(rebuilt.train.rows == first.train.rows);

  // A token changed to another valid id: only the body's checksum sees it.
  const int64_t header_bytes = int64_t(fs::file_size(train)) - first.train.size() * first.train.row_ints() * 4;
  corpus.patch(train, header_bytes + 8, std::string("\x41\x00\x00\x00", 4));
  rebuilt = build_and_read_shards(corpus.options, ByteTokenizer());
  CHECK(contains(rebuilt.build.cache_problem, "corrupt body"));
  CHECK(rebuilt.train.rows == first.train.rows);

  // The manifest's domains no longer match the shards' headers.
  nlohmann::json manifest = nlohmann::json::parse(read_file(first.build.manifest));
  manifest["domains"][0] = "renamed";
  write_text(first.build.manifest, manifest.dump());
  rebuilt = build_and_read_shards(corpus.options, ByteTokenizer());
  CHECK(contains(rebuilt.build.cache_problem, "differ from the manifest's"));
  CHECK(rebuilt.build.domains == first.build.domains);

  // A manifest that is not JSON, or whose counts have the wrong type.
  write_text(first.build.manifest, "{\"inputs\": ");
  CHECK(contains(build_shards(corpus.options, ByteTokenizer()).cache_problem, "not valid JSON"));
  manifest = nlohmann::json::parse(read_file(first.build.manifest));
  manifest["train_sequences_per_domain"] = "many";
  write_text(first.build.manifest, manifest.dump());
  CHECK(contains(build_shards(corpus.options, ByteTokenizer()).cache_problem,
                 "'train_sequences_per_domain' is not a list of 3 counts"));
  CHECK(build_shards(corpus.options, ByteTokenizer()).up_to_date);  // rebuilt: fine again
}

TEST_CASE("data: cached shards of another seq_len or vocabulary than the run asks for are rebuilt") {
  CachedCorpus corpus;
  const BuiltShards wanted = build_and_read_shards(corpus.options, ByteTokenizer());
  // Shards of seq_len 16 put in place of the cache of seq_len 32 (the manifest still says 32).
  ShardBuildOptions shorter = corpus.options;
  shorter.seq_len = 16;
  shorter.out_dir = corpus.dir / "shorter";
  const BuiltShards other = build_and_read_shards(shorter, ByteTokenizer());
  fs::copy_file(other.build.train_shard, wanted.build.train_shard, fs::copy_options::overwrite_existing);
  BuiltShards rebuilt = build_and_read_shards(corpus.options, ByteTokenizer());
  CHECK(contains(rebuilt.build.cache_problem, "has seq_len 16, but the run needs 32"));
  CHECK(rebuilt.train.seq_len() == 32);

  // A shard written for a vocabulary of 512 under the byte tokenizer's name.
  Shard wide = wanted.validation;
  wide.header.vocab_size = 512;
  write_shard(wanted.build.validation_shard, wide);
  rebuilt = build_and_read_shards(corpus.options, ByteTokenizer());
  CHECK(contains(rebuilt.build.cache_problem, wanted.build.validation_shard.string()));
  CHECK(contains(rebuilt.build.cache_problem, "has vocab_size 512, but the run needs 256"));
  CHECK(rebuilt.validation.header.vocab_size == 256);
}
