# nativereload's CMake helper: shared libraries built to be hot-reloaded.
#
#   list(APPEND CMAKE_PREFIX_PATH "$(nativereload --cmake-dir)")   # or -Dnativereload_DIR=...
#   find_package(nativereload REQUIRED)
#   nativereload_add_module(counter SOURCES counter.c [INTERFACE counter.h] [OUTPUT_DIRECTORY dir])
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
#     which modules a build produced and where;
#   - nativereload.h on its include path (`#include <nativereload.h>`);
#   - with INTERFACE: the header's declarations embedded in the library (the
#     ELF section nativereload reads before loading it, so reg.load("counter")
#     needs no cdef and a reload that changes a declaration is refused). At
#     build time `python -m nativereload embed` preprocesses the header with
#     the target's include directories and compile definitions, and
#     NATIVERELOAD_CDEF defined, into
#     ${CMAKE_CURRENT_BINARY_DIR}/nativereload-interface/NAME_interface.c,
#     compiled into the module; it re-runs when the header, or any header it
#     includes, changes.
#
# INTERFACE needs a Python that can import nativereload: the cache variable
# NATIVERELOAD_PYTHON (`nativereload build` sets it to its own interpreter),
# else the Python CMake finds (find_package(Python3)); either runs with
# PYTHONPATH set to the directory holding this nativereload package, so it
# imports the same version as this helper. Configure fails, saying so, if
# that Python cannot import it.
include_guard(GLOBAL)

# Depfiles from add_custom_command are read relative to the binary dir (and
# absolute paths kept) only under CMP0116; functions defined below keep it.
if(POLICY CMP0116)
  cmake_policy(SET CMP0116 NEW)
endif()

get_filename_component(_nativereload_package "${CMAKE_CURRENT_LIST_DIR}" DIRECTORY)
get_filename_component(_nativereload_package_parent "${_nativereload_package}" DIRECTORY)
set(nativereload_INCLUDE_DIR "${_nativereload_package}/include")
set(NATIVERELOAD_PYTHON "" CACHE FILEPATH
    "Python that can import nativereload, for nativereload_add_module(... INTERFACE header)")

# The command that runs nativereload's Python, checked once per configure.
function(_nativereload_python_command out)
  get_property(command GLOBAL PROPERTY _NATIVERELOAD_PYTHON_COMMAND)
  if(NOT command)
    if(NATIVERELOAD_PYTHON)
      set(python "${NATIVERELOAD_PYTHON}")
    else()
      find_package(Python3 COMPONENTS Interpreter QUIET)
      if(NOT Python3_Interpreter_FOUND)
        message(FATAL_ERROR "nativereload_add_module(... INTERFACE ...): no Python found to embed the interface; "
                            "pass -DNATIVERELOAD_PYTHON=/path/to/python (one that can import nativereload)")
      endif()
      set(python "${Python3_EXECUTABLE}")
    endif()
    set(command "${CMAKE_COMMAND}" -E env "PYTHONPATH=${_nativereload_package_parent}" "${python}")
    execute_process(COMMAND ${command} -c "import nativereload.cdefgen"
                    RESULT_VARIABLE failed OUTPUT_QUIET ERROR_VARIABLE why)
    if(failed)
      message(FATAL_ERROR "nativereload_add_module(... INTERFACE ...): ${python} cannot import nativereload from "
                          "${_nativereload_package_parent}:\n${why}\nPass -DNATIVERELOAD_PYTHON=/path/to/python "
                          "(the interpreter nativereload is installed for; `nativereload build` passes its own)")
    endif()
    set_property(GLOBAL PROPERTY _NATIVERELOAD_PYTHON_COMMAND "${command}")
  endif()
  set(${out} "${command}" PARENT_SCOPE)
endfunction()

# Embed the declarations of ``header`` in target ``name`` (see the top of this file).
function(_nativereload_embed_interface name header)
  get_filename_component(header "${header}" ABSOLUTE BASE_DIR "${CMAKE_CURRENT_SOURCE_DIR}")
  _nativereload_python_command(python)
  set(out "${CMAKE_CURRENT_BINARY_DIR}/nativereload-interface/${name}_interface.c")
  set(includes "$<TARGET_PROPERTY:${name},INCLUDE_DIRECTORIES>")
  set(definitions "$<TARGET_PROPERTY:${name},COMPILE_DEFINITIONS>")
  if(CMAKE_C_COMPILER)
    set(compiler "${CMAKE_C_COMPILER}")
  else()
    set(compiler "${CMAKE_CXX_COMPILER}")
  endif()
  set(depfile_options)
  set(depfile_arguments)
  if(CMAKE_VERSION VERSION_GREATER_EQUAL 3.20)
    set(depfile_options DEPFILE "${out}.d")
    set(depfile_arguments --depfile "${out}.d")
  endif()
  add_custom_command(OUTPUT "${out}"
    COMMAND ${python} -m nativereload embed "${header}" -o "${out}" --compiler "${compiler}"
            "$<$<BOOL:${includes}>:-I$<JOIN:${includes},;-I>>"
            "$<$<BOOL:${definitions}>:-D$<JOIN:${definitions},;-D>>"
            ${depfile_arguments}
    DEPENDS "${header}"
    ${depfile_options}
    COMMENT "Embedding the interface of ${header} in ${name}"
    COMMAND_EXPAND_LISTS VERBATIM)
  get_property(languages GLOBAL PROPERTY ENABLED_LANGUAGES)
  if(NOT "C" IN_LIST languages)
    # A C++-only project: the generated file is valid C++ too.
    set_source_files_properties("${out}" PROPERTIES LANGUAGE CXX)
  endif()
  target_sources(${name} PRIVATE "${out}")
endfunction()

function(nativereload_add_module name)
  cmake_parse_arguments(NRM "" "OUTPUT_DIRECTORY;INTERFACE" "SOURCES" ${ARGN})
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
  target_include_directories(${name} PRIVATE "${nativereload_INCLUDE_DIR}")
  if(NRM_INTERFACE)
    _nativereload_embed_interface(${name} "${NRM_INTERFACE}")
  endif()
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
