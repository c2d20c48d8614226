#pragma once
// Runs Debian's python3 from tests: the PyTorch oracle of the ops (tests/torch/op_oracle.py) and the PyTorch twins
// of the model use it. Header-only; POSIX (popen). Their scratch folders: ScratchDir in tests/testing.h.
//
// The interpreter is /usr/bin/python3, where Debian's python3-torch installs, NOT the `python3` on PATH (here a
// pyenv build without torch). MOELAB_PYTHON overrides it, e.g. to try a virtualenv with another PyTorch.
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

#include "tests/testing.h"

namespace moelab::testing {

inline std::string python_interpreter() {
  const char* override_path = std::getenv("MOELAB_PYTHON");
  return override_path && *override_path ? override_path : "/usr/bin/python3";
}

// it's -> 'it'\''s': one word for /bin/sh whatever it contains.
inline std::string shell_quote(const std::string& s) {
  std::string out = "'";
  for (char c : s) out += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return out + "'";
}

struct PythonRun {
  int exit_code = -1;  // the interpreter's exit status; -1 when it was killed by a signal or could not start
  std::string output;  // stdout and stderr, interleaved
  bool ok() const { return exit_code == 0; }
};

// Runs the interpreter with `args` (a script path and its arguments, or "-c" and code) and waits for it.
// PYTHONHOME/PYTHONPATH are dropped: they belong to whatever python is first on PATH and would mix its modules into
// Debian's interpreter. No bytecode is written, so running a script leaves no __pycache__ in the source tree.
inline PythonRun run_python(const std::vector<std::string>& args) {
  std::string cmd = "env -u PYTHONHOME -u PYTHONPATH PYTHONDONTWRITEBYTECODE=1 ";
  cmd += shell_quote(python_interpreter());
  for (const std::string& a : args) {
    cmd += ' ';
    cmd += shell_quote(a);
  }
  cmd += " 2>&1";
  PythonRun run;
  FILE* pipe = ::popen(cmd.c_str(), "r");
  if (!pipe) {
    run.output = "popen failed for: " + cmd;
    return run;
  }
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, pipe)) > 0) run.output.append(buf, n);
  int status = ::pclose(pipe);
  if (status != -1 && WIFEXITED(status)) run.exit_code = WEXITSTATUS(status);  // 127: interpreter not found
  return run;
}

inline PythonRun run_python_script(const std::string& script, const std::vector<std::string>& args = {}) {
  std::vector<std::string> all{script};
  all.insert(all.end(), args.begin(), args.end());
  return run_python(all);
}

// Whether the interpreter can `import torch`, asked once per process (importing torch takes a second or two).
struct TorchStatus {
  bool available = false;
  std::string version;  // torch.__version__ when available
  std::string why;      // otherwise: what the interpreter said
};

inline const TorchStatus& torch_status() {
  static const TorchStatus status = [] {
    TorchStatus s;
    PythonRun run = run_python({"-c", "import torch; print(torch.__version__)"});
    if (run.ok()) {
      s.available = true;
      s.version = run.output.substr(0, run.output.find_last_not_of(" \n\r") + 1);
    } else {
      s.why = python_interpreter() + " cannot import torch (exit " + std::to_string(run.exit_code) +
              "; install Debian's python3-torch): " + run.output;
    }
    return s;
  }();
  return status;
}

// A file of the source tree by its path from the repository root, e.g. "tests/torch/op_oracle.py".
inline std::string source_file(const std::string& relative) { return (source_dir() / relative).string(); }

}  // namespace moelab::testing
