# Text files compiled into a library as string constants: the report's stylesheet and glossary stay ordinary files
# (apps/report/report.css, glossary.html) that one can edit and check as such, and moe-analyze needs nothing beside it.
#   moelab_embed_text(TARGET FILE SYMBOL)
# adds <build>/apps/embedded/<FILE as an identifier>.cpp to TARGET, defining `const char moelab::apps::SYMBOL[]` with
# FILE's text without its final newline (an editor adds one; the page would otherwise change with it). The build writes
# that source by running this same file as a script (cmake -P), again whenever FILE or this file changes.
if(CMAKE_SCRIPT_MODE_FILE)
  file(READ "${INPUT}" text)
  string(REGEX REPLACE "\n$" "" text "${text}")
  # A raw string literal takes the text as it is; only its closing delimiter may not occur in it.
  string(FIND "${text}" ")embedded\"" clash)
  if(NOT clash EQUAL -1)
    message(FATAL_ERROR "${INPUT} contains ')embedded\"', which would end the string literal early")
  endif()
  file(WRITE "${OUTPUT}"
       "// Generated from ${INPUT} by ${CMAKE_CURRENT_LIST_FILE}: edit that file, not this one.\n"
       "namespace moelab::apps {\n\n"
       "extern const char ${SYMBOL}[];\n"
       "const char ${SYMBOL}[] = R\"embedded(${text})embedded\";\n\n"
       "}  // namespace moelab::apps\n")
  return()
endif()

function(moelab_embed_text target file symbol)
  get_filename_component(input "${file}" ABSOLUTE)
  string(MAKE_C_IDENTIFIER "${file}" name)
  set(output "${CMAKE_CURRENT_BINARY_DIR}/embedded/${name}.cpp")
  add_custom_command(
    OUTPUT "${output}"
    COMMAND "${CMAKE_COMMAND}" "-DINPUT=${input}" "-DOUTPUT=${output}" "-DSYMBOL=${symbol}"
            -P "${CMAKE_CURRENT_FUNCTION_LIST_FILE}"
    DEPENDS "${input}" "${CMAKE_CURRENT_FUNCTION_LIST_FILE}"
    COMMENT "Embedding ${file} as ${symbol}"
    VERBATIM)
  target_sources(${target} PRIVATE "${output}")
endfunction()
