#include "data/file_io.h"

#include <cerrno>
#include <charconv>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <system_error>

#include <fcntl.h>
#include <fmt/format.h>
#include <signal.h>
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

std::filesystem::path expand_home(const std::string& path) {
  const char* home = std::getenv("HOME");
  if (path.starts_with("~/") && home && *home) return std::filesystem::path(home) / path.substr(2);
  return path;
}

std::filesystem::path temporary_folder(const std::filesystem::path& folder) {
  return folder.parent_path() / fmt::format(".tmp-{}-{}", folder.filename().string(), static_cast<long>(::getpid()));
}

void replace_folder(const std::filesystem::path& from, const std::filesystem::path& to) {
  if (!std::filesystem::exists(to)) {
    std::filesystem::rename(from, to);
    return;
  }
  // After the exchange `from` holds the old folder: every moment has a complete folder at `to`.
  if (::renameat2(AT_FDCWD, from.c_str(), AT_FDCWD, to.c_str(), RENAME_EXCHANGE) == 0) {
    std::filesystem::remove_all(from);
    return;
  }
  if (errno != EINVAL && errno != ENOSYS && errno != ENOTSUP)
    throw std::system_error(errno, std::generic_category(),
                            fmt::format("cannot exchange '{}' with '{}'", from.string(), to.string()));
  // No exchange on this file system: a kill between the two renames leaves both folders as temporaries.
  std::filesystem::path aside = temporary_folder(to.parent_path() / (to.filename().string() + "-old"));
  std::filesystem::rename(to, aside);
  std::filesystem::rename(from, to);
  std::filesystem::remove_all(aside);
}

bool is_stale_temporary(const std::filesystem::path& path) {
  const std::string name = path.filename().string();
  const size_t dash = name.rfind('-');
  if (name.find(".tmp-") == std::string::npos || dash == std::string::npos) return false;
  long pid = 0;
  const char* end = name.data() + name.size();
  auto [stop, error] = std::from_chars(name.data() + dash + 1, end, pid);
  if (error != std::errc{} || stop != end || pid <= 0) return false;
  return pid == static_cast<long>(::getpid()) || (::kill(static_cast<pid_t>(pid), 0) != 0 && errno == ESRCH);
}

}  // namespace moelab::data
