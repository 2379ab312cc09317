// Helpers shared by the shim's translation units; not part of the public C API.
#pragma once

#include <cstdint>

// llama_decode / llama_process return code -> PMTP status
// (0 ok, 1 no KV slot, 2 aborted, -1 invalid batch, < -1 fatal).
int32_t pmtp_status_from_decode(int32_t rc);

struct llama_context;
// Hidden row of output i of the last decode (n_embd floats), NULL when unavailable:
// upstream throws (and logs) on a bad index.
float * pmtp_get_embeddings_nextn_ith(llama_context * ctx, int32_t i);
