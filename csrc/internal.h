// Helpers shared by the shim's translation units; not part of the public C API.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <new>
#include <string>

// llama_decode / llama_process return code -> PMTP status
// (0 ok, 1 no KV slot, 2 aborted, -1 invalid batch, < -1 fatal).
int32_t pmtp_status_from_decode(int32_t rc);

struct llama_context;
// Hidden row of output i of the last decode (n_embd floats), NULL when unavailable:
// upstream throws (and logs) on a bad index.
float * pmtp_get_embeddings_nextn_ith(llama_context * ctx, int32_t i);

namespace pmtp {

// A malloc'd copy the caller frees with pmtp_string_free; NULL when out of memory.
inline char * copy_string(const std::string & text) {
    char * out = static_cast<char *>(std::malloc(text.size() + 1));
    if (out != nullptr) {
        std::memcpy(out, text.c_str(), text.size() + 1);
    }
    return out;
}

// Return `status`, handing `message` to the caller through *error (when asked for).
inline int32_t fail(char ** error, int32_t status, const std::string & message) {
    if (error != nullptr) {
        *error = copy_string(message);
    }
    return status;
}

// Run body; a C++ exception becomes a status (and, with `error`, its message): the one
// place where exceptions stop before they reach C.
template <typename F>
int32_t guarded(F && body, char ** error = nullptr, int32_t on_exception = -7 /* PMTP_ERR_INTERNAL */) {
    try {
        return body();
    } catch (const std::bad_alloc &) {
        return fail(error, -6 /* PMTP_ERR_ALLOC */, "out of memory");
    } catch (const std::exception & e) {
        return fail(error, on_exception, e.what());
    }
}

}  // namespace pmtp
