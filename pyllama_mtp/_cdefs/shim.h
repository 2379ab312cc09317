/* The pyllama_mtp C shim (csrc/pyllama_mtp.h). */

enum pmtp_status {
    PMTP_OK, PMTP_ERR_ARGUMENT, PMTP_ERR_NO_KV_SLOT, PMTP_ERR_DECODE,
    PMTP_ERR_ABORTED, PMTP_ERR_NO_MTP, PMTP_ERR_ALLOC, PMTP_ERR_INTERNAL, ...
};

const char * pmtp_version(void);
const char * pmtp_llama_commit(void);
const char * pmtp_compiled_backends(void);

int32_t pmtp_decode_tokens(struct llama_context * ctx, int32_t n, const llama_token * tokens,
                           const llama_pos * pos, const llama_seq_id * seq_ids, const int8_t * output);
bool    pmtp_abort_if_flag_set(void * flag);

void    pmtp_set_embeddings_nextn(struct llama_context * ctx, bool value, bool masked);
float * pmtp_get_embeddings_nextn_ith(struct llama_context * ctx, int32_t i);
void    pmtp_set_nextn_layer_offset(struct llama_context * ctx, int32_t offset);
struct llama_context * pmtp_get_ctx_other(struct llama_context * ctx);

typedef struct pmtp_memory_entry {
    char     buffer_type[64];
    uint64_t model;
    uint64_t context;
    uint64_t compute;
} pmtp_memory_entry;

int32_t pmtp_memory_breakdown(const struct llama_context * ctx, pmtp_memory_entry * out, int32_t capacity);
