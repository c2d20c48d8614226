# The layer rule (engine < nn < moe < optim < apps, with data beside nn) enforced by the compiler: no target sees the
# whole source tree. Each layer folder gets an include root of its own under the build folder that holds a link to
# that folder alone, e.g. <build>/layers/moe/moe -> <source>/moe, and a library adds only its own root (PUBLIC, so
# the layers above it inherit it). An upward #include ("moe/..." inside nn/) then fails to compile: nn's targets
# have no root that contains moe/. tests/check_layers.py says the same in words, as a test.
function(moelab_layer target folder)
  string(REPLACE "/" "_" root_name "${folder}")
  set(root "${CMAKE_BINARY_DIR}/layers/${root_name}")
  get_filename_component(parent "${root}/${folder}" DIRECTORY)
  file(MAKE_DIRECTORY "${parent}")
  if(NOT EXISTS "${root}/${folder}")
    file(CREATE_LINK "${CMAKE_SOURCE_DIR}/${folder}" "${root}/${folder}" SYMBOLIC)
  endif()
  target_include_directories(${target} PUBLIC "${root}")
endfunction()
