// extern "C" wrappers of llama.cpp's C++-linkage staging API (src/llama-ext.h).
// Compiled against the real header, so a change of signature upstream breaks
// the build here instead of corrupting memory at run time.

#include "pyllama_mtp.h"
#include "internal.h"

#include "llama-ext.h"

#include <cstring>
#include <exception>
#include <new>
#include <vector>

extern "C" {

const char * pmtp_version(void)            { return PYLLAMA_MTP_VERSION; }
const char * pmtp_llama_commit(void)       { return PYLLAMA_MTP_LLAMA_COMMIT; }
const char * pmtp_compiled_backends(void)  { return PYLLAMA_MTP_BACKENDS; }

}  // extern "C"

int32_t pmtp_status_from_decode(int32_t rc) {
    switch (rc) {
        case 0:  return PMTP_OK;
        case 1:  return PMTP_ERR_NO_KV_SLOT;
        case 2:  return PMTP_ERR_ABORTED;
        case -1: return PMTP_ERR_ARGUMENT;
        default: return PMTP_ERR_DECODE;
    }
}

float * pmtp_get_embeddings_nextn_ith(llama_context * ctx, int32_t i) {
    // Upstream throws (and logs) on a bad index; the speculative step gets NULL instead.
    try {
        return llama_get_embeddings_nextn_ith(ctx, i);
    } catch (const std::exception &) {
        return nullptr;
    }
}

extern "C" {

int32_t pmtp_decode_tokens(llama_context * ctx, int32_t n, const llama_token * tokens,
                           const llama_pos * pos, const llama_seq_id * seq_ids, const int8_t * output) {
    if (ctx == nullptr || n <= 0 || tokens == nullptr || pos == nullptr || seq_ids == nullptr ||
        (uint32_t) n > llama_n_batch(ctx)) {
        return PMTP_ERR_ARGUMENT;
    }
    // llama.cpp trusts ids and sequence numbers in places (a vocabulary index, a bitset).
    const int32_t n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(llama_get_model(ctx)));
    const int32_t n_seq_max = (int32_t) llama_n_seq_max(ctx);
    for (int32_t i = 0; i < n; i++) {
        if (tokens[i] < 0 || tokens[i] >= n_vocab || seq_ids[i] < 0 || seq_ids[i] >= n_seq_max || pos[i] < 0) {
            return PMTP_ERR_ARGUMENT;
        }
    }
    try {
        // llama_batch wants one pointer per token into its sequence-id list.
        std::vector<int32_t> n_seq_id(n, 1);
        std::vector<llama_seq_id *> seq_ptrs(n);
        std::vector<int8_t> last_only;
        for (int32_t i = 0; i < n; i++) {
            seq_ptrs[i] = const_cast<llama_seq_id *>(seq_ids + i);
        }
        if (output == nullptr) {
            last_only.assign(n, 0);
            last_only[n - 1] = 1;
            output = last_only.data();
        }
        llama_batch batch = {};
        batch.n_tokens = n;
        batch.token    = const_cast<llama_token *>(tokens);
        batch.pos      = const_cast<llama_pos *>(pos);
        batch.n_seq_id = n_seq_id.data();
        batch.seq_id   = seq_ptrs.data();
        batch.logits   = const_cast<int8_t *>(output);
        return pmtp_status_from_decode(llama_decode(ctx, batch));
    } catch (const std::bad_alloc &) {
        return PMTP_ERR_ALLOC;
    } catch (const std::exception &) {
        return PMTP_ERR_INTERNAL;
    }
}

int32_t pmtp_memory_breakdown(const llama_context * ctx, pmtp_memory_entry * out, int32_t capacity) {
    if (ctx == nullptr || capacity < 0 || (capacity > 0 && out == nullptr)) {
        return PMTP_ERR_ARGUMENT;
    }
    try {
        const llama_memory_breakdown breakdown = llama_get_memory_breakdown(ctx);
        int32_t n = 0;
        for (const auto & [buft, data] : breakdown) {
            if (n < capacity) {
                pmtp_memory_entry & entry = out[n];
                std::memset(&entry, 0, sizeof(entry));
                std::strncpy(entry.buffer_type, ggml_backend_buft_name(buft), sizeof(entry.buffer_type) - 1);
                entry.model   = data.model;
                entry.context = data.context;
                entry.compute = data.compute;
            }
            n++;
        }
        return n;
    } catch (const std::bad_alloc &) {
        return PMTP_ERR_ALLOC;
    } catch (const std::exception &) {
        return PMTP_ERR_INTERNAL;
    }
}

}  // extern "C"
