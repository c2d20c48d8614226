// safetensors files: round trip with metadata, and every malformed file gives an error naming the file.
#include <fstream>

#include "nn/safetensors.h"
#include "tests/testing.h"

using namespace moelab;
namespace fs = std::filesystem;

namespace {

// Writes an 8-byte little-endian header length, the header text, then `data_bytes` zero bytes.
void write_raw(const fs::path& file, const std::string& header, size_t data_bytes) {
  std::ofstream out(file, std::ios::binary);
  uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) out.put(static_cast<char>(n >> (8 * i)));
  out << header << std::string(data_bytes, '\0');
}

}  // namespace

TEST_CASE("safetensors: round trip of f32, f64, i32 and bf16 tensors with metadata") {
  fs::path dir = testing::fresh_temp_dir("safetensors");
  fs::create_directories(dir);
  Tensor a = testing::random({3, 5}, 1, DType::F32), b = testing::random({2}, 2), c = arange(7);
  Tensor h = to_dtype(testing::random({4}, 3, DType::F32), DType::BF16);
  nn::save_safetensors(dir / "x.safetensors", {{"a", a}, {"b", b}, {"c.ids", c}, {"h", h}}, {{"config", "{\"d\": 1}"}});
  nn::SafeTensors st = nn::load_safetensors(dir / "x.safetensors");
  REQUIRE(st.tensors.size() == 4);
  REQUIRE(st.find("h")->dtype() == DType::BF16);
  CHECK(to_dtype(*st.find("h"), DType::F32).to_vector<float>() == to_dtype(h, DType::F32).to_vector<float>());
  CHECK(st.find("a")->to_vector<float>() == a.to_vector<float>());
  CHECK(st.find("b")->to_vector<double>() == b.to_vector<double>());
  CHECK(st.find("c.ids")->to_vector<int32_t>() == c.to_vector<int32_t>());
  CHECK(st.metadata.at("config") == "{\"d\": 1}");
  CHECK_THROWS_WITH(nn::save_safetensors(dir / "dup.safetensors", {{"a", a}, {"a", b}}), doctest::Contains("given twice"));
  fs::remove_all(dir);
}

TEST_CASE("safetensors: malformed files fail clearly") {
  fs::path dir = testing::fresh_temp_dir("safetensors_bad");
  fs::create_directories(dir);
  fs::path f = dir / "bad.safetensors";
  write_raw(f, R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}})", 4);  // truncated data
  CHECK_THROWS_WITH(nn::load_safetensors(f), doctest::Contains("bad.safetensors"));
  write_raw(f, R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},)"
               R"( "b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}})", 16);  // overlapping
  CHECK_THROWS_WITH(nn::load_safetensors(f), doctest::Contains("overlaps or leaves a gap"));
  write_raw(f, R"({"a": {"dtype": "F32", "shape": [-2, -1], "data_offsets": [0, 8]}})", 8);
  CHECK_THROWS_WITH(nn::load_safetensors(f), doctest::Contains("negative size"));
  write_raw(f, R"({"a": {"dtype": "F16", "shape": [2], "data_offsets": [0, 4]}})", 4);
  CHECK_THROWS_WITH(nn::load_safetensors(f), doctest::Contains("unsupported dtype 'F16'"));
  write_raw(f, "{not json", 0);
  CHECK_THROWS_WITH(nn::load_safetensors(f), doctest::Contains("header: invalid JSON at byte 3 of 9"));
  fs::remove_all(dir);
}

TEST_CASE("safetensors: shapes whose size overflows fail before anything is allocated") {
  testing::ScratchDir dir("safetensors_overflow");
  const fs::path f = dir / "huge.safetensors";
  write_raw(f, R"({"a": {"dtype": "F32", "shape": [4294967296, 4294967296], "data_offsets": [0, 0]}})", 0);
  testing::check_mentions(
      testing::error_of([&] { nn::load_safetensors(f); }),
      {"huge.safetensors", "tensor 'a'", "[4294967296, 4294967296]", "more than 2^63 - 1 elements"});
  // 2^62 elements of 4 bytes wrap around to 0 bytes in 64 bits: they must not load from an empty data section.
  write_raw(f, R"({"a": {"dtype": "F32", "shape": [4611686018427387904], "data_offsets": [0, 0]}})", 0);
  testing::check_mentions(testing::error_of([&] { nn::load_safetensors(f); }),
                          {"huge.safetensors", "tensor 'a'", "more than 2^63 - 1 bytes"});
  // A shape that fits in 63 bits must still match its data_offsets' span.
  write_raw(f, R"({"a": {"dtype": "F32", "shape": [1152921504606846976], "data_offsets": [0, 8]}})", 8);
  testing::check_mentions(testing::error_of([&] { nn::load_safetensors(f); }),
                          {"huge.safetensors", "do not hold 4611686018427387904 bytes"});
  write_raw(f, R"({"a": {"dtype": "F32", "shape": [1, 1, 1, 1, 1, 1, 1, 1, 1], "data_offsets": [0, 4]}})", 4);
  testing::check_mentions(testing::error_of([&] { nn::load_safetensors(f); }),
                          {"huge.safetensors", "field 'shape' must be an array of at most 8 sizes, got 9 sizes"});
}

TEST_CASE("safetensors: header fields of the wrong JSON type name the file, the tensor and the field") {
  testing::ScratchDir dir("safetensors_types");
  const fs::path f = dir / "typed.safetensors";
  auto error_for = [&](const std::string& header, size_t data_bytes = 8) {
    write_raw(f, header, data_bytes);
    return testing::error_of([&] { nn::load_safetensors(f); });
  };
  const std::string a = R"({"a": )";
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"[1, 2]", "the header must be a JSON object, got array"},
      {a + "3}", "tensor 'a': expected an object with dtype, shape and data_offsets, got number"},
      {a + R"({"shape": [2], "data_offsets": [0, 8]}})", "tensor 'a': missing field 'dtype'"},
      {a + R"({"dtype": 5, "shape": [2], "data_offsets": [0, 8]}})", "field 'dtype' must be a string, got number"},
      {a + R"({"dtype": "F32", "shape": null, "data_offsets": [0, 8]}})", "field 'shape' must be an array"},
      {a + R"({"dtype": "F32", "shape": ["2"], "data_offsets": [0, 8]}})",
       "field 'shape' must hold integers in [0, 2^63), got \"2\""},
      {a + R"({"dtype": "F32", "shape": [2.5], "data_offsets": [0, 8]}})", "field 'shape' must hold integers"},
      {a + R"({"dtype": "F32", "shape": [2], "data_offsets": [8]}})", "field 'data_offsets' must be [begin, end]"},
      {a + R"({"dtype": "F32", "shape": [2], "data_offsets": [-1, 7]}})", "field 'data_offsets' must be [begin, end]"},
      {a + R"({"dtype": "F32", "shape": [2], "data_offsets": {"a": 1}}})", "field 'data_offsets' must be [begin, end]"},
      {a + R"({"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "extra": 1}})", "unknown field 'extra'"},
      {R"({"__metadata__": {"config": 3}})", "__metadata__ 'config' must be a string, got number"},
      {R"({"__metadata__": ["x"]})", "__metadata__ must be an object, got array"},
  };
  for (const auto& [header, expected] : cases) {
    const std::string message = error_for(header);
    CAPTURE(header);
    testing::check_mentions(message, {"typed.safetensors", expected});
  }
}

TEST_CASE("safetensors: quoted names and broken JSON stay short in messages") {
  testing::ScratchDir dir("safetensors_long");
  const fs::path f = dir / "long.safetensors";
  const std::string name(100000, 'n');
  write_raw(f, "{\"" + name + R"(": {"dtype": "F16", "shape": [2], "data_offsets": [0, 4]}})", 4);
  std::string message = testing::error_of([&] { nn::load_safetensors(f); });
  CHECK(message.size() < 300);
  testing::check_mentions(message, {"long.safetensors", "nnn... (100000 bytes)", "unsupported dtype 'F16'"});

  write_raw(f, "{\"a\": \"" + std::string(100000, 'x') + "\xfe\"}", 0);
  message = testing::error_of([&] { nn::load_safetensors(f); });
  CHECK(message.size() < 300);
  testing::check_mentions(message, {"long.safetensors", "header: invalid JSON at byte", "xxx\\xfe'"});
}
