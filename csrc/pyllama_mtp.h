/*
 * pyllama_mtp C shim: the public, plain-C face of what llama.cpp offers only
 * in C++ (the MTP staging API of src/llama-ext.h) and, later, the speculative
 * step loop. Everything here is extern "C" so cffi (and any C program) can
 * call it without name mangling.
 *
 * Conventions: functions that can fail return an int32_t status, 0 = success,
 * negative = a PMTP_ERR_* code; the Python layer maps codes to exceptions in
 * one place (pyllama_mtp/_lowlevel.py).
 */
#ifndef PYLLAMA_MTP_H
#define PYLLAMA_MTP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "llama.h"

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#  define PMTP_API __declspec(dllexport)
#else
#  define PMTP_API __attribute__((visibility("default")))
#endif

enum pmtp_status {
    PMTP_OK              = 0,
    PMTP_ERR_ARGUMENT    = -1, /* invalid argument (caught before llama.cpp sees it) */
    PMTP_ERR_NO_KV_SLOT  = -2, /* llama_decode returned 1: context full, recoverable */
    PMTP_ERR_DECODE      = -3, /* llama_decode failed otherwise */
    PMTP_ERR_ABORTED     = -4, /* the abort callback stopped the computation */
    PMTP_ERR_NO_MTP      = -5, /* the model has no MTP layers loaded */
    PMTP_ERR_ALLOC       = -6, /* out of memory */
    PMTP_ERR_INTERNAL    = -7  /* a C++ exception escaped llama.cpp */
};

/* Version of this shim, compiled in; Python refuses to run with another. */
PMTP_API const char * pmtp_version(void);
/* llama.cpp commit this shim was built against. */
PMTP_API const char * pmtp_llama_commit(void);
/* Comma-separated ggml backend targets compiled into this build (e.g. "ggml-cpu,ggml-vulkan"). */
PMTP_API const char * pmtp_compiled_backends(void);

/* ---- decoding ---- */

/* Decode n tokens, one sequence id each (arrays of n; output may be NULL = last token only).
 * Returns PMTP_OK or a PMTP_ERR_* mapped from llama_decode's return code. Arguments must be
 * validated by the caller (ids < n_vocab, seq ids < n_seq_max, n <= n_batch). */
PMTP_API int32_t pmtp_decode_tokens(struct llama_context * ctx, int32_t n,
                                    const llama_token * tokens, const llama_pos * pos,
                                    const llama_seq_id * seq_ids, const int8_t * output);

/* A ggml_abort_callback that aborts when the int32_t at flag is non-zero.
 * Reading a flag in C keeps Python (and the GIL) out of the per-node check. */
PMTP_API bool pmtp_abort_if_flag_set(void * flag);

/* ---- extern "C" wrappers of the staging API (src/llama-ext.h) ---- */

/* Make the context output the nextn ("MTP") hidden rows; masked: only for output tokens. */
PMTP_API void    pmtp_set_embeddings_nextn(struct llama_context * ctx, bool value, bool masked);
/* Hidden row of output i of the last decode, n_embd floats; NULL when unavailable. */
PMTP_API float * pmtp_get_embeddings_nextn_ith(struct llama_context * ctx, int32_t i);
/* Which appended NextN block an MTP context runs (chained heads, e.g. step35). */
PMTP_API void    pmtp_set_nextn_layer_offset(struct llama_context * ctx, int32_t offset);
/* The context given as ctx_other at creation (a drafter sharing the target's KV), or NULL. */
PMTP_API struct llama_context * pmtp_get_ctx_other(struct llama_context * ctx);

/* One entry of a context's memory breakdown: bytes per buffer type. */
typedef struct pmtp_memory_entry {
    char     buffer_type[64];
    uint64_t model;
    uint64_t context;
    uint64_t compute;
} pmtp_memory_entry;

/* Fill up to capacity entries; returns how many exist (may exceed capacity), or a PMTP_ERR_*. */
PMTP_API int32_t pmtp_memory_breakdown(const struct llama_context * ctx,
                                       pmtp_memory_entry * out, int32_t capacity);

#ifdef __cplusplus
}
#endif

#endif /* PYLLAMA_MTP_H */
