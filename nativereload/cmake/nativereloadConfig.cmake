# nativereload's CMake helper: shared libraries built to be hot-reloaded.
#
#   list(APPEND CMAKE_PREFIX_PATH "$(nativereload --cmake-dir)")   # or -Dnativereload_DIR=...
#   find_package(nativereload REQUIRED)
#   nativereload_add_module(counter SOURCES counter.c [OUTPUT_DIRECTORY dir])
#
# gives build/modules/counter.so (OUTPUT_DIRECTORY defaults to
# ${CMAKE_BINARY_DIR}/modules, the directory `nativereload build` reports):
#   - no "lib" prefix;
#   - -fPIC;
#   - -Wl,-Bsymbolic: the library's calls to its own functions bind inside the
#     library, so no other loaded image can interpose on them;
#   - C++ (GCC): -fno-gnu-unique, since STB_GNU_UNIQUE symbols keep an image mapped
#     after dlclose() and the registry would have to report it "leaked";
#   - written atomically: the linker writes into a staging directory and the
#     finished file is renamed over the output, so a process watching the
#     output never sees a half-written library;
#   - recorded in ${CMAKE_BINARY_DIR}/nativereload-modules/NAME.path (the
#     final file's path, one line), which is how `nativereload build` knows
#     which modules a build produced and where.
include_guard(GLOBAL)

function(nativereload_add_module name)
  cmake_parse_arguments(NRM "" "OUTPUT_DIRECTORY" "SOURCES" ${ARGN})
  if(NOT NRM_SOURCES)
    message(FATAL_ERROR "nativereload_add_module(${name}): SOURCES is required")
  endif()
  if(NOT NRM_OUTPUT_DIRECTORY)
    set(NRM_OUTPUT_DIRECTORY "${CMAKE_BINARY_DIR}/modules")
  endif()
  set(staging "${CMAKE_CURRENT_BINARY_DIR}/nativereload-staging")
  add_library(${name} SHARED ${NRM_SOURCES})
  set_target_properties(${name} PROPERTIES
    PREFIX ""
    POSITION_INDEPENDENT_CODE ON
    LIBRARY_OUTPUT_DIRECTORY "${staging}")
  # CMake already compiles a SHARED library position-independent; -fPIC is
  # spelled out so the flags reloading relies on read the same here as on the
  # compiler's command line.
  target_compile_options(${name} PRIVATE -fPIC)
  target_link_options(${name} PRIVATE -Wl,-Bsymbolic)
  # Only GCC emits STB_GNU_UNIQUE (and knows the flag); Clang never does.
  target_compile_options(${name} PRIVATE $<$<AND:$<COMPILE_LANGUAGE:CXX>,$<CXX_COMPILER_ID:GNU>>:-fno-gnu-unique>)
  set(final "${NRM_OUTPUT_DIRECTORY}/$<TARGET_FILE_NAME:${name}>")
  # The manifest is rewritten at each configure, so a module removed from the
  # project disappears from it: clear it once per configure run (global
  # properties do not survive between runs), then let each module add itself.
  get_property(manifest_reset GLOBAL PROPERTY NATIVERELOAD_MANIFEST_RESET)
  if(NOT manifest_reset)
    file(REMOVE_RECURSE "${CMAKE_BINARY_DIR}/nativereload-modules")
    set_property(GLOBAL PROPERTY NATIVERELOAD_MANIFEST_RESET TRUE)
  endif()
  file(GENERATE OUTPUT "${CMAKE_BINARY_DIR}/nativereload-modules/${name}.path" CONTENT "${final}\n")
  add_custom_command(TARGET ${name} POST_BUILD
    COMMAND ${CMAKE_COMMAND} -E make_directory "${NRM_OUTPUT_DIRECTORY}"
    COMMAND ${CMAKE_COMMAND} -E copy "$<TARGET_FILE:${name}>" "${final}.partial"
    COMMAND ${CMAKE_COMMAND} -E rename "${final}.partial" "${final}"
    VERBATIM)
endfunction()
