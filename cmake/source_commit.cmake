# The llama.cpp commit of the tree actually being built, for system_info():
#   1. the provisioning stamp (tools/provision_llama_cpp.py writes "commit <sha>"),
#   2. else git, for a submodule or any other checkout,
#   3. else "unknown" (a tree of unknown origin is reported as such, never as the pin).
# Script mode prints it: cmake -DSOURCE_DIR=<tree> -P cmake/source_commit.cmake
function(pyllama_mtp_source_commit source_dir out_var)
    set(commit "unknown")
    set(stamp "${source_dir}/.pyllama_mtp-provenance")
    if(EXISTS "${stamp}")
        file(STRINGS "${stamp}" stamp_line REGEX "^commit [0-9a-f]+$" LIMIT_COUNT 1)
        string(REGEX MATCH "[0-9a-f]+$" commit "${stamp_line}")
    elseif(EXISTS "${source_dir}/.git")
        find_program(_git git)
        if(_git)
            execute_process(COMMAND "${_git}" -C "${source_dir}" rev-parse HEAD
                            OUTPUT_VARIABLE head RESULT_VARIABLE rc
                            OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
            if(rc EQUAL 0 AND head MATCHES "^[0-9a-f]+$")
                set(commit "${head}")
            endif()
        endif()
    endif()
    if(NOT commit)
        set(commit "unknown")
    endif()
    set(${out_var} "${commit}" PARENT_SCOPE)
endfunction()

if(CMAKE_SCRIPT_MODE_FILE STREQUAL CMAKE_CURRENT_LIST_FILE)
    pyllama_mtp_source_commit("${SOURCE_DIR}" commit)
    message("${commit}")
endif()
