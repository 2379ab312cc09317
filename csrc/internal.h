// Helpers shared by the shim's translation units; not part of the public C API.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <new>
#include <string>

#if !defined(_WIN32)
#include <pthread.h>
#endif

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

// Whether every value of row is finite: no NaN or Inf. Integer compares on the exponent
// bits, which vectorise (and survive -ffast-math, unlike std::isfinite); a full row of a
// 150k vocabulary reads in tens of microseconds, against milliseconds for the decode.
inline bool all_finite(const float * row, int32_t n) {
    uint32_t worst = 0;
    for (int32_t i = 0; i < n; i++) {
        uint32_t bits;
        std::memcpy(&bits, row + i, sizeof(bits));
        const uint32_t exponent = bits & 0x7f800000u;
        worst = exponent > worst ? exponent : worst;
    }
    return worst != 0x7f800000u;
}

// Run body on a thread of its own with a stack of `bytes`, and wait for it: for llama.cpp
// parsers that recurse as deep as their input nests. The text sandbox compiles the same
// input first on a smaller stack (_sandbox_worker.STACK_BYTES), so what fitted there fits
// here whatever stack the calling thread has left. body must not throw.
template <typename F>
int32_t on_own_stack(size_t bytes, F && body) {
#if defined(_WIN32)
    return body();
#else
    struct job {
        F * body;
        int32_t status;
    } work{&body, 0};
    pthread_attr_t attr;
    if (pthread_attr_init(&attr) != 0) {
        return body();
    }
    pthread_attr_setstacksize(&attr, bytes);
    pthread_t thread;
    const int rc = pthread_create(&thread, &attr, [](void * arg) -> void * {
        job * w = static_cast<job *>(arg);
        w->status = (*w->body)();
        return nullptr;
    }, &work);
    pthread_attr_destroy(&attr);
    if (rc != 0) {
        return body();  // no thread to be had: the caller's own stack
    }
    pthread_join(thread, nullptr);
    return work.status;
#endif
}

// The stack grammar compiles get (see on_own_stack).
constexpr size_t compile_stack_bytes = size_t(16) << 20;

}  // namespace pmtp
