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
    PMTP_ERR_INTERNAL    = -7, /* a C++ exception escaped llama.cpp */
    PMTP_ERR_STATE       = -8, /* memory could not be rolled back that far */
    PMTP_ERR_NONFINITE   = -9, /* a row of logits to choose from holds NaN or Inf */
    PMTP_ERR_GRAMMAR     = -10, /* the grammar allows none of the model's tokens here */
    PMTP_ERR_SEQUENCE    = -11  /* a step: some sequences failed, the others went on */
};

/* Version of this shim, compiled in; Python refuses to run with another. */
PMTP_API const char * pmtp_version(void);
/* llama.cpp commit this shim was built against. */
PMTP_API const char * pmtp_llama_commit(void);
/* Comma-separated ggml backend targets compiled into this build (e.g. "ggml-cpu,ggml-vulkan"). */
PMTP_API const char * pmtp_compiled_backends(void);

/* ---- backends ---- */

/* Load the backend modules that lie beside this library, before llama_backend_init (which
 * would otherwise search the executable's folder and the current directory). A build with
 * GGML_BACKEND_DL (a portable build) has its backends as modules: of the CPU variants, the
 * one that scores best on this CPU is loaded. A build that links its backends does nothing.
 * PMTP_ERR_INTERNAL when a module build finds no CPU backend to load. */
PMTP_API int32_t pmtp_backends_load(void);
/* How the CPU backend was built and chosen: the loaded variant's name in a portable build
 * ("haswell", "zen4", "x64", ...), "native" for a build tuned to the machine that compiled
 * it, "fixed" for a single build with chosen flags; "none" when no CPU backend is loaded. */
PMTP_API const char * pmtp_cpu_variant(void);
/* "dynamic" (backends are modules loaded at run time) or "linked". */
PMTP_API const char * pmtp_backend_loading(void);

/* Register a ggml RPC server ("host:port") as a device. PMTP_ERR_ARGUMENT when this build
 * has no RPC backend, PMTP_ERR_INTERNAL when the server cannot be reached. */
PMTP_API int32_t pmtp_rpc_add_server(const char * endpoint);

/* ---- decoding ---- */

/* Decode n tokens, one sequence id each (arrays of n; output may be NULL = last token only).
 * Returns PMTP_OK or a PMTP_ERR_* mapped from llama_decode's return code; PMTP_ERR_ARGUMENT
 * for n > n_batch, a token id outside the vocabulary, a sequence id outside [0, n_seq_max)
 * or a negative position. */
PMTP_API int32_t pmtp_decode_tokens(struct llama_context * ctx, int32_t n,
                                    const llama_token * tokens, const llama_pos * pos,
                                    const llama_seq_id * seq_ids, const int8_t * output);

/* ---- stopping a running computation (csrc/interrupt.cpp) ---- */

enum pmtp_abort_reason {
    PMTP_ABORT_NONE    = 0,
    PMTP_ABORT_CANCEL  = 1, /* cancel was set (from any thread) */
    PMTP_ABORT_TIMEOUT = 2, /* the monotonic clock passed deadline_us */
    PMTP_ABORT_SIGINT  = 3  /* SIGINT arrived while watched */
};

/* What pmtp_abort_check reads; one per context, filled by the caller before each call. */
typedef struct pmtp_abort_state {
    int32_t  cancel;       /* non-zero: abort (set it from any thread; the caller clears it) */
    int32_t  between_calls_only; /* non-zero: never abort inside a graph (recurrent memory
                                    cannot undo a half-computed ubatch); the caller checks
                                    between calls instead */
    int32_t  watch_sigint; /* non-zero: abort when pmtp_sigint_count() != sigint_mark */
    uint64_t sigint_mark;  /* the value pmtp_sigint_watch_begin returned */
    int64_t  deadline_us;  /* pmtp_monotonic_us() deadline, 0 = none */
    int32_t  reason;       /* out: the pmtp_abort_reason of the last abort */
} pmtp_abort_state;

/* A ggml_abort_callback; data is a pmtp_abort_state. No Python, no GIL in the per-node check. */
PMTP_API bool     pmtp_abort_check(void * data);
/* Microseconds of a monotonic clock (the one deadline_us is measured on). */
PMTP_API int64_t  pmtp_monotonic_us(void);
/* Replace the SIGINT handler (only if the current one is a function, e.g. Python's) by one
 * that only counts signals, until the matching pmtp_sigint_watch_end restores it; nests and
 * is thread-safe. The caller reports a counted signal (Python: KeyboardInterrupt).
 * Returns the current count. */
PMTP_API uint64_t pmtp_sigint_watch_begin(void);
PMTP_API void     pmtp_sigint_watch_end(void);
PMTP_API uint64_t pmtp_sigint_count(void);

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

/* ---- sampling (csrc/sampler.cpp): one sampler for plain and speculative decoding ----
 *
 * llama.cpp's common_sampler with the chain top-k, top-p, min-p, temperature (each off at
 * its neutral value; temperature <= 0 is greedy), then a draw seeded by seed. Optionally
 * constrained by a GBNF grammar, given as JSON: {"grammar": GBNF, "grammar_type": "user" |
 * "output_format" | "tool_calls", "grammar_lazy": bool, "grammar_triggers": [{"type",
 * "value", "token"}], "generation_prompt": text} (what pmtp_chat_apply returns). */

typedef struct pmtp_sampler pmtp_sampler;
typedef struct pmtp_sampling_params {
    float    temperature;
    int32_t  top_k;        /* 0 = off */
    float    top_p;        /* 1 = off */
    float    min_p;        /* 0 = off */
    uint32_t seed;
    int32_t  exact_match;  /* speculative rule: see pmtp_spec_set_sampler */
} pmtp_sampling_params;

/* *out receives the sampler; on failure a PMTP_ERR_* and, with error, a message (free it
 * with pmtp_string_free): a grammar that does not parse is PMTP_ERR_ARGUMENT. */
PMTP_API int32_t pmtp_sampler_new(const struct llama_model * model, const pmtp_sampling_params * params,
                                  const char * constraint_json, pmtp_sampler ** out, char ** error);
PMTP_API void    pmtp_sampler_free(pmtp_sampler * sampler);
/* Pick a token from output idx of ctx's last batch and accept it into the sampler. */
PMTP_API int32_t pmtp_sampler_sample(pmtp_sampler * sampler, struct llama_context * ctx, int32_t idx, llama_token * out);
/* Back to the start: grammar state, history and random stream. */
PMTP_API void    pmtp_sampler_reset(pmtp_sampler * sampler);
/* A trial of a GBNF grammar over the model's vocabulary, for the text sandbox: up to
 * n_steps tokens, each the allowed token of highest random logit (seeded), accepted into
 * the grammar as generation would. Exercises what compiling alone does not (the grammar's
 * stacks growing token by token); the caller bounds its time. PMTP_ERR_ARGUMENT with a
 * message when llama.cpp refuses the grammar or fails in it, or (with from_start) when it
 * allows none of the model's tokens at its start. */
PMTP_API int32_t pmtp_grammar_trial(const struct llama_model * model, const char * gbnf, int32_t n_steps,
                                    uint32_t seed, int32_t from_start, char ** error);

/* ---- chat (csrc/chat.cpp): llama.cpp's chat templates, parsers and JSON schemas ----
 *
 * JSON crosses this boundary as UTF-8 text. Functions return a status and put either
 * the result or an error message in *out (free it with pmtp_string_free). */

typedef struct pmtp_chat_templates pmtp_chat_templates;
/* The model's own template (template_source NULL or empty) or the given Jinja source;
 * model may be NULL with a source. */
PMTP_API int32_t pmtp_chat_templates_new(const struct llama_model * model, const char * template_source,
                                         pmtp_chat_templates ** templates, char ** error);
PMTP_API void    pmtp_chat_templates_free(pmtp_chat_templates * templates);
/* {"source": the default template's text, "tool_use_source": the tool-use variant or null,
 *  "supports_thinking": bool, "caps": {...}} */
PMTP_API int32_t pmtp_chat_templates_info(const pmtp_chat_templates * templates, char ** out);
/* Render a request: {"messages", "tools", "tool_choice", "add_generation_prompt",
 * "enable_thinking", "chat_template_kwargs", "json_schema", "grammar",
 * "parallel_tool_calls", "reasoning_format"} (OpenAI shapes) -> {"prompt", "format",
 * "grammar", "grammar_type", "grammar_lazy", "grammar_triggers", "preserved_tokens",
 * "additional_stops", "generation_prompt", "parser", "supports_thinking"}. */
PMTP_API int32_t pmtp_chat_apply(const pmtp_chat_templates * templates, const char * request_json, char ** out);
/* Parse generated text with the parser state pmtp_chat_apply returned ({"format",
 * "generation_prompt", "parser", "reasoning_format", "parse_tool_calls"}) -> an OpenAI
 * message {"role", "content", "reasoning_content", "tool_calls"}. */
PMTP_API int32_t pmtp_chat_parse(const char * text, int32_t is_partial, const char * parser_json, char ** out);
/* JSON schema -> GBNF grammar (llama.cpp's json-schema-to-grammar). */
PMTP_API int32_t pmtp_json_schema_to_grammar(const char * schema_json, char ** out);
PMTP_API void    pmtp_string_free(char * text);
/* llama.cpp's common layer prints warnings from a thread of its own, past any log
 * callback: stop it (its failures reach callers as statuses and messages anyway). */
PMTP_API void    pmtp_common_log_pause(void);

/* ---- MTP speculative decoding (csrc/speculative.cpp, spec_*.cpp) ----
 *
 * One pmtp_spec drives n_seq sequences of a target context and its MTP draft context
 * (created from the same model with ctx_type = LLAMA_CONTEXT_TYPE_MTP). Per sequence it
 * keeps id_last (the newest token, sampled but not yet evaluated by the target) and the
 * target hidden row that the MTP head pairs with it.
 *
 * High level: pmtp_spec_step_each() = draft + verify + accept + rollback, one call.
 * Low level:  pmtp_spec_draft() / pmtp_spec_set_draft(), pmtp_spec_verify(),
 *             pmtp_spec_target_choices(), pmtp_spec_accept(): the same guarantees, with
 *             the acceptance rule left to the caller.
 * Rollback of rejected positions uses llama_memory_seq_rm on both contexts; on hybrid or
 * recurrent targets this needs n_rs_seq >= n_draft_max + 1 snapshots in the target context
 * (+1: a verified batch that is discarded unaccepted also drops its pending token).
 */

#define PMTP_MAX_DRAFT 16
#define PMTP_DRAFT_REST (-1)

typedef struct pmtp_spec pmtp_spec;

typedef struct pmtp_spec_stats {
    int32_t n_draft_max;
    int64_t n_steps;                     /* accept() calls */
    int64_t n_drafted;                   /* draft tokens proposed */
    int64_t n_accepted;                  /* draft tokens accepted */
    int64_t n_generated;                 /* tokens produced (accepted + one per step) */
    int64_t drafted_at[PMTP_MAX_DRAFT];  /* verified drafts at draft position i */
    int64_t accepted_at[PMTP_MAX_DRAFT]; /* accepted drafts at draft position i */
    int64_t t_target_us;                 /* time in target decodes */
    int64_t t_draft_us;                  /* time in draft decodes and hidden-row hand-over */
    int64_t n_lookup_steps;              /* steps whose draft came from n-gram lookup */
    int64_t n_lookup_drafted;            /* ... their draft tokens */
    int64_t n_lookup_accepted;           /* ... of which accepted */
} pmtp_spec_stats;

/* Create a driver; *status receives PMTP_OK, PMTP_ERR_NO_MTP or PMTP_ERR_ARGUMENT. */
PMTP_API pmtp_spec * pmtp_spec_new(struct llama_context * tgt, struct llama_context * dft,
                                   int32_t n_seq, int32_t n_draft_max, int32_t * status);
PMTP_API void        pmtp_spec_free(pmtp_spec * spec);
/* The draft context's abort state (its abort callback data). The drafter's catch-up on
 * tokens the target already accepted is then never stopped half-way: undoing the target's
 * completed batch is impossible for recurrent memory. A stop takes effect at the next draft. */
PMTP_API void        pmtp_spec_set_draft_abort_state(pmtp_spec * spec, pmtp_abort_state * state);

/* How a sequence's tokens are picked in pmtp_spec_step_each: by its pmtp_sampler (see
 * "sampling" below), or, with none (the default), greedily and unconstrained. With a
 * sampler at temperature > 0 drafts are sampled from the MTP head's distribution q (the
 * sampler's chain, never its grammar) and accepted with probability min(1, p/q) against
 * the target's p (the chain after the grammar), with a draw from the residual
 * max(0, p - q) on rejection (speculative sampling): the output has exactly the
 * distribution of plain sampling with the same sampler. exact_match instead keeps a
 * draft token only when the target's own sample equals it. Greedy samplers keep a draft
 * while it equals the target's (constrained) argmax. The grammar only ever advances over
 * output tokens. The sampler must outlive its use here (set NULL before freeing it). */
PMTP_API int32_t pmtp_spec_set_sampler(pmtp_spec * spec, llama_seq_id seq, struct pmtp_sampler * sampler);
/* n-gram lookup drafts in pmtp_spec_step_each. ngram > 0: when the sequence's last ngram
 * tokens occurred earlier in it and at least min_tokens tokens followed there, those
 * tokens (up to max_tokens; 0 = n_draft_max) are the step's draft instead of the MTP
 * head's. They are verified like any draft (point-mass q when sampling): lossless.
 * ngram 0 turns lookup off (the default). */
typedef struct pmtp_lookup_params {
    int32_t ngram;
    int32_t min_tokens;
    int32_t max_tokens;
} pmtp_lookup_params;
PMTP_API int32_t pmtp_spec_set_lookup(pmtp_spec * spec, const pmtp_lookup_params * params);
/* From now on the drafter's catch-up on sequence seq skips positions below pos (-1, the
 * default: skips none); its memory then restarts at the first position it does see. Set
 * before a long prefill to bound the MTP layer's work to the prompt's last tokens (drafts
 * attend to those only), and back to -1 after. Output is unchanged (drafts are verified). */
PMTP_API int32_t pmtp_spec_set_catch_up_from(pmtp_spec * spec, llama_seq_id seq, llama_pos pos);
/* n_draft_max after limits of the model (chained heads cap it at their count). */
PMTP_API int32_t     pmtp_spec_n_draft_max(const pmtp_spec * spec);

/* Evaluate n tokens on sequence seq (after its pending token, if any); the last one
 * becomes the pending token. On error the sequence is left as before the call, or reset
 * where its recurrent state cannot be cut back that far. */
PMTP_API int32_t pmtp_spec_prefill(pmtp_spec * spec, llama_seq_id seq, const llama_token * tokens, int32_t n);

/* Draft up to n_max[seq] tokens for every active sequence (greedy MTP; stop under p_min);
 * a negative n_max[seq] keeps that sequence's current draft. */
PMTP_API int32_t pmtp_spec_draft(pmtp_spec * spec, const int32_t * n_max, float p_min);
/* Replace a sequence's draft with tokens of the caller's choosing (n-gram, another model):
 * at most pmtp_spec_n_draft_max tokens, each inside the vocabulary. */
PMTP_API int32_t pmtp_spec_set_draft(pmtp_spec * spec, llama_seq_id seq, const llama_token * tokens, int32_t n);
/* Copy a sequence's draft (and MTP probabilities); returns its length. */
PMTP_API int32_t pmtp_spec_get_draft(const pmtp_spec * spec, llama_seq_id seq, llama_token * tokens,
                                     float * probs, int32_t capacity);
/* Evaluate [id_last, draft...] of every active sequence in one target batch. */
PMTP_API int32_t pmtp_spec_verify(pmtp_spec * spec);
/* Target greedy choice after id_last and after each draft token (draft length + 1). */
PMTP_API int32_t pmtp_spec_target_choices(const pmtp_spec * spec, llama_seq_id seq, llama_token * out, int32_t capacity);
/* Target batch index of verify row `row` (for reading its logits); or a PMTP_ERR_*. */
PMTP_API int32_t pmtp_spec_verify_row(const pmtp_spec * spec, llama_seq_id seq, int32_t row);
/* Keep n_accepted draft tokens, make `next` the pending token, roll back the rest. */
PMTP_API int32_t pmtp_spec_accept(pmtp_spec * spec, llama_seq_id seq, int32_t n_accepted, llama_token next);
/* One whole step for every active sequence, with a draft length per sequence
 * (n_draft[seq] >= 0, or PMTP_DRAFT_REST: no draft, and the drafter does not catch up on
 * this step's tokens, which saves its pass over them; its later drafts then lack those
 * positions and may be kept less often, the output is the same). out_tokens: n_seq rows of (n_draft_max + 1); out_counts[seq]:
 * tokens produced (accepted drafts + 1); out_drafted (may be
 * NULL) receives each sequence's verified draft length, or -(length + 1) when the draft
 * came from n-gram lookup. A sequence that cannot go on (a verify row it needs holds NaN
 * or Inf, or its grammar allows no token) produces nothing and keeps its state from
 * before the step (see pmtp_spec_failure); the others go on, and the step returns
 * PMTP_ERR_SEQUENCE after finishing them. A draft row with NaN / Inf only ends that
 * sequence's draft. */
PMTP_API int32_t pmtp_spec_step_each(pmtp_spec * spec, const int32_t * n_draft, float p_min,
                                     llama_token * out_tokens, int32_t * out_counts, int32_t * out_drafted);
/* Why the sequence failed in the last step: PMTP_ERR_NONFINITE or PMTP_ERR_GRAMMAR, and
 * the position of the token whose row it was (*pos); 0 if it did not fail. */
PMTP_API int32_t pmtp_spec_failure(const pmtp_spec * spec, llama_seq_id seq, llama_pos * pos);
/* Clear both contexts' memory, data included, and evaluate each active sequence's tokens
 * again (its pending token stays pending). After NaN / Inf: llama.cpp re-initialises freed
 * KV cells and recurrent states by scaling them by zero (NaN * 0 is NaN) and multiplies
 * masked-out cells by zero weights, so values left by one sequence reach the others. The
 * sequences that failed with NaN are each evaluated alone first: those that still give
 * NaN (the sources) are forgotten, with those whose grammar hit a dead end; their
 * pmtp_spec_failure stays, the others' is cleared. */
PMTP_API int32_t pmtp_spec_rebuild(pmtp_spec * spec);
/* 1 if active (and its pending token / position), 0 if not, or a PMTP_ERR_*. */
PMTP_API int32_t pmtp_spec_seq_state(const pmtp_spec * spec, llama_seq_id seq, llama_token * id_last,
                                     llama_pos * n_past);
/* Keep the first n_keep tokens of a sequence (2 <= n_keep <= its evaluated count), the
 * last of them becoming the pending token: a conversation continues from a common
 * prefix. The drafter's entry one position before the cut is rebuilt from a stale hidden
 * row (acceptance only, never output). PMTP_ERR_STATE (the sequence is then reset) where
 * recurrent state cannot go back that far. */
PMTP_API int32_t pmtp_spec_truncate(pmtp_spec * spec, llama_seq_id seq, int32_t n_keep);
/* Forget a sequence in both contexts. */
PMTP_API int32_t pmtp_spec_reset_seq(pmtp_spec * spec, llama_seq_id seq);
/* Queue a prompt on a sequence (continuing it if active): instead of a prefill call of
 * its own, its tokens are evaluated in chunks inside the next verify batches, beside the
 * other sequences' decoding (each batch filled up to n_batch after their rows), so
 * admitting a request does not stall the others. With ready != 0 the batch that ends the
 * prompt also evaluates its last token as the pending one: the sequence gets its first
 * token from that step. With ready == 0 the sequence ends the prompt like a prefill (its
 * last token pending) and parks, for a checkpoint and the next part. Until then it is not
 * active (pmtp_spec_seq_state returns 0). */
PMTP_API int32_t pmtp_spec_enqueue(pmtp_spec * spec, llama_seq_id seq, const llama_token * tokens, int32_t n,
                                   int32_t ready);
/* Prefix reuse (a server's cached prompts, csrc/spec_cache.cpp). A parked sequence keeps
 * its memory and state but takes no part in drafts, verify batches or steps; prefill,
 * truncate and checkpoint restore unpark it. */
PMTP_API int32_t pmtp_spec_park(pmtp_spec * spec, llama_seq_id seq, int32_t parked);
/* A checkpoint: what the target cannot cut back (recurrent state, saved with
 * LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY), the sequence's tokens and the hidden row its pending
 * token pairs with. Take one right after a prefill (nothing drafted or rolled back since);
 * restore it on the same sequence while that sequence's tokens still start with the
 * checkpoint's (PMTP_ERR_STATE otherwise, the sequence unchanged): the sequence then holds
 * the checkpoint's tokens, its last one pending. Attention memory past it is dropped. */
typedef struct pmtp_spec_checkpoint pmtp_spec_checkpoint;
PMTP_API int32_t pmtp_spec_checkpoint_new(pmtp_spec * spec, llama_seq_id seq, pmtp_spec_checkpoint ** out);
PMTP_API int32_t pmtp_spec_checkpoint_restore(pmtp_spec * spec, llama_seq_id seq,
                                              const pmtp_spec_checkpoint * checkpoint);
/* Bytes the checkpoint holds; tokens it covers (its pending token included). */
PMTP_API int64_t pmtp_spec_checkpoint_bytes(const pmtp_spec_checkpoint * checkpoint);
PMTP_API int32_t pmtp_spec_checkpoint_n_tokens(const pmtp_spec_checkpoint * checkpoint);
PMTP_API void    pmtp_spec_checkpoint_free(pmtp_spec_checkpoint * checkpoint);
PMTP_API void    pmtp_spec_get_stats(const pmtp_spec * spec, pmtp_spec_stats * out);
PMTP_API void    pmtp_spec_reset_stats(pmtp_spec * spec);

#ifdef __cplusplus
}
#endif

#endif /* PYLLAMA_MTP_H */
