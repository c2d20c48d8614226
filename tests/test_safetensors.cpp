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
  CHECK_THROWS_WITH(nn::load_safetensors(f), doctest::Contains("invalid JSON header"));
  fs::remove_all(dir);
}
