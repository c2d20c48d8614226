#include "data/shard.h"

#include <bit>
#include <cstring>
#include <fstream>
#include <stdexcept>

#include <fmt/format.h>

#include "data/file_io.h"

namespace moelab::data {

// The file format is little-endian; we write and read memory as is.
static_assert(std::endian::native == std::endian::little, "shards are little-endian; add byte swapping for this host");

namespace {

constexpr int64_t kFixedHeaderBytes = 56;  // magic .. tokenizer name length, see docs/data_formats.md
constexpr size_t kHeaderChecksumAt = 16;   // then the body checksum at 24

// FNV-1a, 64-bit: catches the flipped bits of a corrupt file (not an adversary).
uint64_t fnv1a64(const char* bytes, size_t n) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (size_t i = 0; i < n; i++) h = (h ^ static_cast<unsigned char>(bytes[i])) * 0x100000001b3ull;
  return h;
}

// The header's checksum covers all its bytes, with the checksum field itself read as zero.
uint64_t header_checksum(std::string header) {
  std::memset(header.data() + kHeaderChecksumAt, 0, 8);
  return fnv1a64(header.data(), header.size());
}

uint64_t body_checksum(const std::vector<int32_t>& rows) {
  return fnv1a64(reinterpret_cast<const char*>(rows.data()), rows.size() * 4);
}

template <typename T>
void put(std::string& out, T value) {
  out.append(reinterpret_cast<const char*>(&value), sizeof(T));
}

void put_string(std::string& out, const std::string& s) {
  put<uint32_t>(out, static_cast<uint32_t>(s.size()));
  out += s;
}

std::string encode_header(const ShardHeader& h, uint64_t body_sum) {
  std::string out(kShardMagic, sizeof(kShardMagic));
  put<uint32_t>(out, kShardVersion);
  put<uint32_t>(out, 0);  // header_bytes, patched below
  put<uint64_t>(out, 0);  // header checksum, patched below
  put<uint64_t>(out, body_sum);
  put<int32_t>(out, h.vocab_size);
  put<int32_t>(out, h.seq_len);
  put<int64_t>(out, h.num_sequences);
  put<int32_t>(out, h.domains.size());
  put_string(out, h.tokenizer);  // its length is the last fixed field
  for (const std::string& name : h.domains.names()) put_string(out, name);
  out.resize((out.size() + 7) / 8 * 8, '\0');  // the body starts 8-byte aligned (mmap-friendly)
  const uint32_t header_bytes = static_cast<uint32_t>(out.size());
  std::memcpy(out.data() + 12, &header_bytes, 4);
  const uint64_t header_sum = header_checksum(out);
  std::memcpy(out.data() + kHeaderChecksumAt, &header_sum, 8);
  return out;
}

// Reads fields from the header bytes, naming the file and field on overrun.
struct HeaderReader {
  const std::string& bytes;
  const std::string& file;
  size_t pos = 0;

  template <typename T>
  T get(const char* field) {
    need(sizeof(T), field);
    T value;
    std::memcpy(&value, bytes.data() + pos, sizeof(T));
    pos += sizeof(T);
    return value;
  }
  std::string get_string(const char* field) {
    const uint32_t n = get<uint32_t>(field);
    need(n, field);
    std::string s = bytes.substr(pos, n);
    pos += n;
    return s;
  }
  void need(size_t n, const char* field) const {
    if (n > bytes.size() - pos)
      throw std::runtime_error(fmt::format("shard '{}': corrupt header: {} ends at byte {}, past the header's {} bytes",
                                           file, field, pos + n, bytes.size()));
  }
};

// What read_header finds besides the ShardHeader.
struct HeaderLayout {
  int64_t header_bytes = 0;    // the body starts here
  uint64_t body_checksum = 0;  // FNV-1a of the body, as written
};

// Reads and checks the header, its checksum included; leaves `in` at the start of the body.
HeaderLayout read_header(std::ifstream& in, const std::filesystem::path& path, ShardHeader& h) {
  const std::string file = path.string();
  std::string fixed(kFixedHeaderBytes, '\0');
  in.read(fixed.data(), kFixedHeaderBytes);
  if (in.gcount() != kFixedHeaderBytes)
    throw std::runtime_error(fmt::format("shard '{}': truncated: {} bytes, shorter than the {}-byte fixed header", file,
                                         in.gcount(), kFixedHeaderBytes));
  if (std::memcmp(fixed.data(), kShardMagic, sizeof(kShardMagic)) != 0)
    throw std::runtime_error(fmt::format("'{}' is not a moelab shard: bad magic (expected \"MOELABSH\")", file));
  HeaderReader r{fixed, file, sizeof(kShardMagic)};
  const uint32_t version = r.get<uint32_t>("version");
  if (version != kShardVersion)
    throw std::runtime_error(
        fmt::format("shard '{}': format version {} is not supported (expected {})", file, version, kShardVersion));
  const uint32_t header_bytes = r.get<uint32_t>("header_bytes");
  const uint64_t stored_header_checksum = r.get<uint64_t>("header_checksum");
  HeaderLayout layout{header_bytes, r.get<uint64_t>("body_checksum")};
  const uintmax_t file_bytes = std::filesystem::file_size(path);
  if (header_bytes < kFixedHeaderBytes || header_bytes % 8 != 0 || header_bytes > file_bytes)
    throw std::runtime_error(fmt::format("shard '{}': corrupt header: header_bytes {} (expected a multiple of 8, "
                                         ">= {}, within the file's {} bytes)",
                                         file, header_bytes, kFixedHeaderBytes, file_bytes));
  std::string bytes = fixed;
  bytes.resize(header_bytes);
  in.read(bytes.data() + kFixedHeaderBytes, header_bytes - kFixedHeaderBytes);
  if (in.gcount() != header_bytes - kFixedHeaderBytes)
    throw std::runtime_error(fmt::format("shard '{}': truncated: expected at least the {}-byte header, got {} bytes",
                                         file, header_bytes, kFixedHeaderBytes + in.gcount()));
  HeaderReader hr{bytes, file, 32};
  h.vocab_size = hr.get<int32_t>("vocab_size");
  h.seq_len = hr.get<int32_t>("seq_len");
  h.num_sequences = hr.get<int64_t>("num_sequences");
  const int32_t num_domains = hr.get<int32_t>("num_domains");
  h.tokenizer = hr.get_string("tokenizer");
  if (h.vocab_size <= 0 || h.seq_len <= 0 || h.num_sequences < 0 || num_domains <= 0)
    throw std::runtime_error(fmt::format("shard '{}': corrupt header: vocab_size {}, seq_len {}, num_sequences {}, "
                                         "num_domains {} (expected positive, num_sequences >= 0)",
                                         file, h.vocab_size, h.seq_len, h.num_sequences, num_domains));
  std::vector<std::string> names;
  for (int32_t d = 0; d < num_domains; d++) names.push_back(hr.get_string("domain name"));
  try {
    h.domains = Domains(std::move(names));
  } catch (const std::invalid_argument& e) {  // an empty or a repeated name
    throw std::runtime_error(fmt::format("shard '{}': corrupt header: {}", file, e.what()));
  }
  if (const uint64_t actual = header_checksum(bytes); actual != stored_header_checksum)
    throw std::runtime_error(fmt::format("shard '{}': corrupt header: its bytes give checksum {:016x}, the header "
                                         "says {:016x}",
                                         file, actual, stored_header_checksum));
  return layout;
}

void check_size(const std::filesystem::path& file, const ShardHeader& h, int64_t header_bytes) {
  const int64_t row_bytes = (int64_t(h.seq_len) + 2) * 4;
  if (h.num_sequences > (int64_t(1) << 62) / row_bytes)
    throw std::runtime_error(
        fmt::format("shard '{}': corrupt header: num_sequences {}", file.string(), h.num_sequences));
  const int64_t expected = header_bytes + h.num_sequences * row_bytes;
  const int64_t actual = static_cast<int64_t>(std::filesystem::file_size(file));
  if (actual != expected)
    throw std::runtime_error(fmt::format("shard '{}': {}: expected {} bytes (header {} + {} sequences x {} bytes), "
                                         "got {}", file.string(), actual < expected ? "truncated" : "trailing bytes",
                                         expected, header_bytes, h.num_sequences, row_bytes, actual));
}

}  // namespace

std::vector<int64_t> Shard::sequences_per_domain() const {
  std::vector<int64_t> counts(header.domains.size(), 0);
  for (int64_t i = 0; i < size(); i++) counts[domain(i)]++;
  return counts;
}

Shard pack_documents(const std::vector<Document>& docs, const Tokenizer& tokenizer, const Domains& domains,
                     int seq_len) {
  if (seq_len < 1) throw std::invalid_argument(fmt::format("pack_documents: seq_len should be >= 1, got {}", seq_len));
  if (domains.empty()) throw std::invalid_argument("pack_documents: no domains");
  const std::vector<int32_t> separator = tokenizer.document_separator();
  std::vector<std::vector<int32_t>> streams(domains.size());  // per domain: its documents' tokens, concatenated
  for (const Document& doc : docs) {
    std::vector<int32_t>& stream = streams[domains.id(doc.domain)];
    if (doc.text.empty()) continue;  // would add a lone separator
    const std::vector<int32_t> ids = tokenizer.encode(doc.text);
    stream.insert(stream.end(), ids.begin(), ids.end());
    stream.insert(stream.end(), separator.begin(), separator.end());
  }
  Shard shard;
  shard.header = {tokenizer.vocab_size(), seq_len, 0, tokenizer.name(), domains};
  for (int d = 0; d < domains.size(); d++) {
    const std::vector<int32_t>& stream = streams[d];
    for (size_t start = 0; start + seq_len + 1 <= stream.size(); start += seq_len) {
      shard.rows.push_back(d);
      shard.rows.insert(shard.rows.end(), stream.begin() + start, stream.begin() + start + seq_len + 1);
      shard.header.num_sequences++;
    }
    std::vector<int32_t>().swap(streams[d]);  // free it now: peak memory ~ one copy of the corpus, not two
  }
  return shard;
}

Shard select_sequences(const Shard& shard, std::span<const int64_t> ids) {
  Shard out;
  out.header = shard.header;
  out.header.num_sequences = static_cast<int64_t>(ids.size());
  out.rows.reserve(ids.size() * shard.row_ints());
  for (int64_t i : ids) {
    if (i < 0 || i >= shard.size())
      throw std::out_of_range(
          fmt::format("select_sequences: sequence {} out of range (shard has {})", i, shard.size()));
    const int32_t* row = shard.rows.data() + i * shard.row_ints();
    out.rows.insert(out.rows.end(), row, row + shard.row_ints());
  }
  return out;
}

void write_shard(const std::filesystem::path& file, const Shard& shard) {
  const int64_t expected = shard.size() * shard.row_ints();
  if (static_cast<int64_t>(shard.rows.size()) != expected)
    throw std::invalid_argument(fmt::format("write_shard '{}': {} ints of rows, expected {} ({} sequences x {})",
                                            file.string(), shard.rows.size(), expected, shard.size(),
                                            shard.row_ints()));
  const std::string header = encode_header(shard.header, body_checksum(shard.rows));
  write_file_atomic(file, [&](std::ostream& out) {
    out.write(header.data(), std::ssize(header));
    out.write(reinterpret_cast<const char*>(shard.rows.data()), std::streamsize(shard.rows.size() * 4));
  });
}

ShardHeader read_shard_header(const std::filesystem::path& file) {
  std::ifstream in(file, std::ios::binary);
  if (!in) throw std::runtime_error(fmt::format("cannot open shard '{}'", file.string()));
  ShardHeader h;
  check_size(file, h, read_header(in, file, h).header_bytes);
  return h;
}

Shard read_shard(const std::filesystem::path& file) {
  std::ifstream in(file, std::ios::binary);
  if (!in) throw std::runtime_error(fmt::format("cannot open shard '{}'", file.string()));
  Shard shard;
  const HeaderLayout layout = read_header(in, file, shard.header);
  const int64_t header_bytes = layout.header_bytes;
  check_size(file, shard.header, header_bytes);
  shard.rows.resize(size_t(shard.size() * shard.row_ints()));
  in.read(reinterpret_cast<char*>(shard.rows.data()), std::streamsize(shard.rows.size() * 4));
  if (in.gcount() != std::streamsize(shard.rows.size() * 4))
    throw std::runtime_error(fmt::format("shard '{}': read {} body bytes, expected {}", file.string(), in.gcount(),
                                         shard.rows.size() * 4));

  const int32_t vocab = shard.header.vocab_size, num_domains = shard.header.domains.size();
  const int64_t row_ints = shard.row_ints();
  for (int64_t i = 0; i < shard.size(); i++) {
    const int32_t* row = shard.rows.data() + i * row_ints;
    const int64_t row_offset = header_bytes + i * row_ints * 4;  // byte offset of the row in the file
    if (row[0] < 0 || row[0] >= num_domains)
      throw std::runtime_error(fmt::format("shard '{}': sequence {} (byte offset {}): domain id {} out of range "
                                           "(expected 0..{})", file.string(), i, row_offset, row[0], num_domains - 1));
    for (int64_t t = 1; t < row_ints; t++)
      if (row[t] < 0 || row[t] >= vocab)
        throw std::runtime_error(fmt::format("shard '{}': sequence {}, token {} (byte offset {}): token id {} out of "
                                             "range (expected 0..{} for vocab size {})", file.string(), i, t - 1,
                                             row_offset + t * 4, row[t], vocab - 1, vocab));
  }
  if (const uint64_t actual = body_checksum(shard.rows); actual != layout.body_checksum)
    throw std::runtime_error(fmt::format("shard '{}': corrupt body: its {} bytes give checksum {:016x}, the header "
                                         "says {:016x}",
                                         file.string(), shard.rows.size() * 4, actual, layout.body_checksum));
  return shard;
}

}  // namespace moelab::data
