#include "data/file_io.h"

#include <fstream>
#include <sstream>
#include <stdexcept>

#include <fmt/format.h>
#include <unistd.h>

namespace moelab::data {

std::string read_file(const std::filesystem::path& file) {
  std::ifstream in(file, std::ios::binary);
  if (!in) throw std::runtime_error(fmt::format("cannot open '{}' for reading", file.string()));
  std::ostringstream bytes;
  bytes << in.rdbuf();
  if (in.bad()) throw std::runtime_error(fmt::format("error while reading '{}'", file.string()));
  return std::move(bytes).str();
}

void write_file_atomic(const std::filesystem::path& file, const std::function<void(std::ostream&)>& write) {
  if (file.has_parent_path()) std::filesystem::create_directories(file.parent_path());
  // The pid keeps two processes writing the same target from sharing a temporary file.
  std::filesystem::path tmp = file;
  tmp += fmt::format(".tmp-{}", static_cast<long>(::getpid()));
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) throw std::runtime_error(fmt::format("cannot open '{}' for writing", tmp.string()));
    try {
      write(out);
    } catch (...) {
      out.close();
      std::filesystem::remove(tmp);
      throw;
    }
    out.flush();
    if (!out) {
      out.close();
      std::filesystem::remove(tmp);
      throw std::runtime_error(fmt::format("error while writing '{}' (disk full?)", tmp.string()));
    }
  }
  std::filesystem::rename(tmp, file);
}

}  // namespace moelab::data
