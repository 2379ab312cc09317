/* The pyllama_mtp C shim (csrc/pyllama_mtp.h). */

enum pmtp_status {
    PMTP_OK, PMTP_ERR_ARGUMENT, PMTP_ERR_NO_KV_SLOT, PMTP_ERR_DECODE,
    PMTP_ERR_ABORTED, PMTP_ERR_NO_MTP, PMTP_ERR_ALLOC, PMTP_ERR_INTERNAL, PMTP_ERR_STATE, PMTP_ERR_NONFINITE, PMTP_ERR_GRAMMAR, PMTP_ERR_SEQUENCE, ...
};

const char * pmtp_version(void);
const char * pmtp_llama_commit(void);
const char * pmtp_compiled_backends(void);

int32_t pmtp_backends_load(void);
const char * pmtp_cpu_variant(void);
const char * pmtp_backend_loading(void);
int32_t pmtp_rpc_add_server(const char * endpoint);

int32_t pmtp_decode_tokens(struct llama_context * ctx, int32_t n, const llama_token * tokens,
                           const llama_pos * pos, const llama_seq_id * seq_ids, const int8_t * output);

enum pmtp_abort_reason { PMTP_ABORT_NONE, PMTP_ABORT_CANCEL, PMTP_ABORT_TIMEOUT, PMTP_ABORT_SIGINT, ... };
typedef struct pmtp_abort_state {
    int32_t  cancel;
    int32_t  between_calls_only;
    int32_t  watch_sigint;
    uint64_t sigint_mark;
    int64_t  deadline_us;
    int32_t  reason;
} pmtp_abort_state;
bool     pmtp_abort_check(void * data);
int64_t  pmtp_monotonic_us(void);
uint64_t pmtp_sigint_watch_begin(void);
void     pmtp_sigint_watch_end(void);
uint64_t pmtp_sigint_count(void);



typedef struct pmtp_memory_entry {
    char     buffer_type[64];
    uint64_t model;
    uint64_t context;
    uint64_t compute;
} pmtp_memory_entry;

int32_t pmtp_memory_breakdown(const struct llama_context * ctx, pmtp_memory_entry * out, int32_t capacity);

/* sampling */
typedef struct pmtp_sampler pmtp_sampler;
typedef struct pmtp_sampling_params {
    float    temperature;
    int32_t  top_k;
    float    top_p;
    float    min_p;
    uint32_t seed;
    int32_t  exact_match;
} pmtp_sampling_params;
int32_t pmtp_sampler_new(const struct llama_model * model, const pmtp_sampling_params * params,
                         const char * constraint_json, pmtp_sampler ** out, char ** error);
void    pmtp_sampler_free(pmtp_sampler * sampler);
int32_t pmtp_sampler_sample(pmtp_sampler * sampler, struct llama_context * ctx, int32_t idx, llama_token * out);
void    pmtp_sampler_reset(pmtp_sampler * sampler);
int32_t pmtp_grammar_trial(const struct llama_model * model, const char * gbnf, int32_t n_steps, uint32_t seed,
                           int32_t from_start, char ** error);

/* chat */
typedef struct pmtp_chat_templates pmtp_chat_templates;
int32_t pmtp_chat_templates_new(const struct llama_model * model, const char * template_source,
                                pmtp_chat_templates ** templates, char ** error);
void    pmtp_chat_templates_free(pmtp_chat_templates * templates);
int32_t pmtp_chat_templates_info(const pmtp_chat_templates * templates, char ** out);
int32_t pmtp_chat_apply(const pmtp_chat_templates * templates, const char * request_json, char ** out);
int32_t pmtp_chat_parse(const char * text, int32_t is_partial, const char * parser_json, char ** out);
int32_t pmtp_json_schema_to_grammar(const char * schema_json, char ** out);
void    pmtp_string_free(char * text);
void    pmtp_common_log_pause(void);

/* MTP speculative decoding */
#define PMTP_MAX_DRAFT ...
#define PMTP_DRAFT_REST ...
typedef struct pmtp_spec pmtp_spec;
typedef struct pmtp_spec_stats {
    int32_t n_draft_max;
    int64_t n_steps;
    int64_t n_drafted;
    int64_t n_accepted;
    int64_t n_generated;
    int64_t drafted_at[...];
    int64_t accepted_at[...];
    int64_t t_target_us;
    int64_t t_draft_us;
    int64_t n_lookup_steps;
    int64_t n_lookup_drafted;
    int64_t n_lookup_accepted;
} pmtp_spec_stats;

pmtp_spec * pmtp_spec_new(struct llama_context * tgt, struct llama_context * dft,
                          int32_t n_seq, int32_t n_draft_max, int32_t * status);
void    pmtp_spec_free(pmtp_spec * spec);
void    pmtp_spec_set_draft_abort_state(pmtp_spec * spec, pmtp_abort_state * state);
int32_t pmtp_spec_set_sampler(pmtp_spec * spec, llama_seq_id seq, struct pmtp_sampler * sampler);
typedef struct pmtp_lookup_params {
    int32_t ngram;
    int32_t min_tokens;
    int32_t max_tokens;
} pmtp_lookup_params;
int32_t pmtp_spec_set_lookup(pmtp_spec * spec, const pmtp_lookup_params * params);
int32_t pmtp_spec_set_catch_up_from(pmtp_spec * spec, llama_seq_id seq, llama_pos pos);
int32_t pmtp_spec_n_draft_max(const pmtp_spec * spec);
int32_t pmtp_spec_prefill(pmtp_spec * spec, llama_seq_id seq, const llama_token * tokens, int32_t n);
int32_t pmtp_spec_draft(pmtp_spec * spec, const int32_t * n_max, float p_min);
int32_t pmtp_spec_set_draft(pmtp_spec * spec, llama_seq_id seq, const llama_token * tokens, int32_t n);
int32_t pmtp_spec_get_draft(const pmtp_spec * spec, llama_seq_id seq, llama_token * tokens,
                            float * probs, int32_t capacity);
int32_t pmtp_spec_verify(pmtp_spec * spec);
int32_t pmtp_spec_target_choices(const pmtp_spec * spec, llama_seq_id seq, llama_token * out, int32_t capacity);
int32_t pmtp_spec_verify_row(const pmtp_spec * spec, llama_seq_id seq, int32_t row);
int32_t pmtp_spec_failure(const pmtp_spec * spec, llama_seq_id seq, llama_pos * pos);
int32_t pmtp_spec_rebuild(pmtp_spec * spec);
int32_t pmtp_spec_accept(pmtp_spec * spec, llama_seq_id seq, int32_t n_accepted, llama_token next);
int32_t pmtp_spec_step_each(pmtp_spec * spec, const int32_t * n_draft, float p_min,
                            llama_token * out_tokens, int32_t * out_counts, int32_t * out_drafted);
int32_t pmtp_spec_seq_state(const pmtp_spec * spec, llama_seq_id seq, llama_token * id_last, llama_pos * n_past);
int32_t pmtp_spec_truncate(pmtp_spec * spec, llama_seq_id seq, int32_t n_keep);
int32_t pmtp_spec_reset_seq(pmtp_spec * spec, llama_seq_id seq);
int32_t pmtp_spec_park(pmtp_spec * spec, llama_seq_id seq, int32_t parked);
int32_t pmtp_spec_enqueue(pmtp_spec * spec, llama_seq_id seq, const llama_token * tokens, int32_t n, int32_t ready);
typedef struct pmtp_spec_checkpoint pmtp_spec_checkpoint;
int32_t pmtp_spec_checkpoint_new(pmtp_spec * spec, llama_seq_id seq, pmtp_spec_checkpoint ** out);
int32_t pmtp_spec_checkpoint_restore(pmtp_spec * spec, llama_seq_id seq, const pmtp_spec_checkpoint * checkpoint);
int64_t pmtp_spec_checkpoint_bytes(const pmtp_spec_checkpoint * checkpoint);
int32_t pmtp_spec_checkpoint_n_tokens(const pmtp_spec_checkpoint * checkpoint);
void    pmtp_spec_checkpoint_free(pmtp_spec_checkpoint * checkpoint);
void    pmtp_spec_get_stats(const pmtp_spec * spec, pmtp_spec_stats * out);
void    pmtp_spec_reset_stats(pmtp_spec * spec);
