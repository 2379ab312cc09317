// Helpers shared by the shim's translation units; not part of the public C API.
#pragma once

#include <cstdint>

// llama_decode / llama_process return code -> PMTP status
// (0 ok, 1 no KV slot, 2 aborted, -1 invalid batch, < -1 fatal).
int32_t pmtp_status_from_decode(int32_t rc);
