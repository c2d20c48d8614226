# Glue for the Debian-packaged dependencies (installed by scripts/install_deps.sh). Found on the system, never vendored.
find_package(fmt REQUIRED)                 # libfmt-dev
find_package(doctest REQUIRED)             # doctest-dev
find_package(nlohmann_json 3 REQUIRED)     # nlohmann-json3-dev
find_package(CLI11 REQUIRED)               # libcli11-dev
find_package(tomlplusplus 3 REQUIRED)      # libtomlplusplus-dev

# SentencePiece (libsentencepiece-dev) ships only a pkg-config file.
find_package(PkgConfig REQUIRED)
pkg_check_modules(SENTENCEPIECE REQUIRED IMPORTED_TARGET sentencepiece)
