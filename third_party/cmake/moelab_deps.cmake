# The header-only dependencies: the system's packages when they are installed (scripts/install_deps.sh installs them
# from Debian's archive), otherwise the copies in third_party/ (the same versions as Debian 12's packages, each with
# its licence; third_party/README.md). So a machine with only a compiler, CMake, ninja and the CUDA toolkit builds.
# SentencePiece (a compiled library) is optional: without it, BPE tokenizers are unavailable and say so.
set(MOELAB_THIRD_PARTY ${CMAKE_SOURCE_DIR}/third_party)

# An INTERFACE target named `target` over the vendored headers in third_party/<folder>/include.
function(moelab_vendored target folder)
  add_library(${target} INTERFACE IMPORTED GLOBAL)
  target_include_directories(${target} SYSTEM INTERFACE ${MOELAB_THIRD_PARTY}/${folder}/include)
  message(STATUS "moelab: ${target} from third_party/${folder}")
endfunction()

find_package(fmt QUIET)  # libfmt-dev
if(NOT fmt_FOUND)
  moelab_vendored(fmt::fmt fmt)
  set_property(TARGET fmt::fmt APPEND PROPERTY INTERFACE_COMPILE_DEFINITIONS FMT_HEADER_ONLY=1)
endif()

find_package(doctest QUIET)  # doctest-dev
if(NOT doctest_FOUND)
  moelab_vendored(doctest::doctest doctest)
  list(APPEND CMAKE_MODULE_PATH ${MOELAB_THIRD_PARTY}/doctest/cmake)  # doctest_discover_tests
endif()

find_package(nlohmann_json 3 QUIET)  # nlohmann-json3-dev
if(NOT nlohmann_json_FOUND)
  moelab_vendored(nlohmann_json::nlohmann_json nlohmann_json)
endif()

find_package(CLI11 QUIET)  # libcli11-dev
if(NOT CLI11_FOUND)
  moelab_vendored(CLI11::CLI11 cli11)
endif()

find_package(tomlplusplus 3 QUIET)  # libtomlplusplus-dev
if(NOT tomlplusplus_FOUND)
  moelab_vendored(tomlplusplus::tomlplusplus tomlplusplus)
endif()

# SentencePiece (libsentencepiece-dev) ships only a pkg-config file.
set(MOELAB_HAVE_SENTENCEPIECE OFF)
find_package(PkgConfig QUIET)
if(PKG_CONFIG_FOUND)
  pkg_check_modules(SENTENCEPIECE QUIET IMPORTED_TARGET sentencepiece)
  if(SENTENCEPIECE_FOUND)
    set(MOELAB_HAVE_SENTENCEPIECE ON)
  endif()
endif()
if(NOT MOELAB_HAVE_SENTENCEPIECE)
  message(STATUS "moelab: SentencePiece not found: BPE tokenizers are unavailable (the byte tokenizer works)")
endif()
