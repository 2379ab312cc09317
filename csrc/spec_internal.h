// The speculative driver inside the shim: its state, its core steps and the MTP head
// layouts. Not part of the C API. The exported functions (speculative.cpp) validate
// their arguments and catch C++ exceptions once, then call the core (spec_core.cpp,
// spec_step.cpp), which assumes valid arguments and reports failures as PMTP statuses.
#pragma once

#include "pyllama_mtp.h"

#include "llama-ext.h"

#include <cstdint>
#include <memory>
#include <new>
#include <random>
#include <vector>

struct pmtp_seq {
    bool active = false;
    llama_token id_last = 0;         // sampled, not yet evaluated by the target
    llama_pos n_past = 0;            // tokens the target holds = position of id_last
    std::vector<float> pending_h;    // target hidden row paired with id_last
    std::vector<llama_token> draft;  // current draft (after draft(), before accept())
    std::vector<float> draft_p;      // MTP probability of each draft token
    std::vector<float> draft_q;      // sampled drafts: the MTP distribution at each position
                                     // (n_vocab floats each); empty for argmax / set drafts
    std::vector<float> chain_h;      // chained heads: hidden rows of the draft so far
    std::vector<float> verify_h;     // target nextn rows of the last verify batch
    std::vector<llama_token> verify_choice;  // target argmax at each verify row (-1: NaN / Inf)
    int32_t failure = 0;             // last step: PMTP_ERR_NONFINITE / PMTP_ERR_GRAMMAR, or 0
    llama_pos failed_at = -1;        // ... and the token whose row it was
    int32_t verify_rows = 0;
    int32_t verify_beg = -1;         // batch index of id_last in the last verify batch
    std::vector<llama_token> history;  // every token of the sequence, id_last included
    bool draft_from_lookup = false;    // the current draft came from n-gram lookup
    bool drafter_gap = false;          // the drafter skipped positions (PMTP_DRAFT_REST)
    bool parked = false;               // memory kept for prefix reuse; not stepped (pmtp_spec_park)
    std::vector<llama_token> queued;   // a prompt evaluated inside the next verify batches
                                       // (pmtp_spec_enqueue); its first token is the one
                                       // pending before, if the sequence was active
    bool queued_ready = false;         // ... whose last token then goes on as id_last
    llama_pos catch_up_from = -1;      // the drafter's catch-up skips positions below this
    pmtp_sampler * sampler = nullptr;  // the sequence's sampler (owned by the caller);
                                       // null: greedy, unconstrained (argmax rows)

    void clear_draft() {
        draft.clear();
        draft_p.clear();
        draft_q.clear();
        draft_from_lookup = false;
    }
};

namespace pmtp {

int64_t now_us();

// A llama_batch_ext owned for one scope.
struct batch_ptr {
    llama_batch_ext * batch = nullptr;
    explicit batch_ptr(llama_context * ctx) : batch(llama_batch_ext_init(ctx)) {
        if (batch == nullptr) {
            throw std::bad_alloc();
        }
    }
    ~batch_ptr() { llama_batch_ext_free(batch); }
    batch_ptr(const batch_ptr &) = delete;
    batch_ptr & operator=(const batch_ptr &) = delete;
};

// Add one entry; returns its batch index or a negative PMTP status.
int32_t add_entry(llama_batch_ext * batch, llama_seq_id seq, llama_token token, llama_pos pos,
                  bool output, const float * state_row, int32_t n_embd);

// How the MTP head(s) sit on the draft context (upstream's three layouts): what a
// catch-up decodes, where a draft step's next input goes, and whether the drafter has
// memory of its own to roll back. One strategy per layout (spec_heads.cpp).
struct head_layout {
    virtual ~head_layout() = default;
    // The longest draft this layout can make when `requested` is asked for.
    virtual int32_t max_draft(int32_t requested) const { return requested; }
    // false: the drafter reads the target's KV (gemma4): nothing to catch up or roll back.
    virtual bool own_memory() const { return true; }
    // Decode a catch-up batch on the drafter; first_pos[seq]: the position of each
    // sequence's first entry in it (-1: not in the batch).
    virtual int32_t catch_up(llama_context * dft, llama_batch_ext * batch,
                             const std::vector<llama_pos> & first_pos) const = 0;
    // A draft starts for this sequence (its first entry pairs id_last with pending_h).
    virtual void begin_draft(pmtp_seq & q) const { (void) q; }
    // Before draft step `step` (0-based); from[seq]: where each drafting sequence's
    // draft starts (its n_past), -1 for the others.
    virtual void begin_step(llama_context * dft, int32_t step, const std::vector<llama_pos> & from) const {
        (void) dft, (void) step, (void) from;
    }
    // The input of the next draft step after `id` (already appended to q.draft), whose
    // MTP hidden row is h_row; returns the batch index of the entry to read, or a status.
    virtual int32_t add_next(llama_batch_ext * batch, llama_seq_id seq, pmtp_seq & q, const float * h_row,
                             int32_t n_embd) const = 0;
    // After a draft (finished or failed).
    virtual void end_draft(llama_context * dft) const { (void) dft; }
};

// The layout of a drafter on `dft` for a model with n_heads MTP blocks.
std::unique_ptr<head_layout> make_head_layout(llama_context * tgt, llama_context * dft, int32_t n_heads);

}  // namespace pmtp

struct pmtp_spec {
    llama_context * tgt = nullptr;
    llama_context * dft = nullptr;
    const llama_vocab * vocab = nullptr;
    int32_t n_vocab = 0;
    int32_t n_embd = 0;
    int32_t n_seq = 0;
    int32_t n_draft_max = 0;
    std::unique_ptr<pmtp::head_layout> heads;
    std::vector<pmtp_seq> seqs;
    pmtp_spec_stats stats = {};
    pmtp_abort_state * dft_abort = nullptr;  // see pmtp_spec_set_draft_abort_state
    pmtp_lookup_params lookup = {};            // ngram 0: MTP drafts only
    std::vector<float> probs;                  // scratch, n_vocab
    std::vector<char> resting;                 // this step: sequences whose drafter skips catch-up
};

// The core steps. Arguments are valid (checked by the exported API); each returns a
// PMTP status and leaves both contexts consistent on failure.
namespace pmtp::spec {

int32_t prefill(pmtp_spec & s, llama_seq_id seq, const llama_token * tokens, int32_t n);
// pmtp_spec_enqueue: the prompt waits in q.queued for the next verify batches
// (spec_cache.cpp); verify adds their chunks and takes them in after the batch.
void enqueue(pmtp_spec & s, llama_seq_id seq, const llama_token * tokens, int32_t n, bool ready);
void add_prompt_chunks(pmtp_spec & s, std::vector<llama_seq_id> & seq_of, std::vector<llama_token> & tok,
                       std::vector<llama_pos> & pos, std::vector<bool> & out, std::vector<int32_t> & n_prompt,
                       std::vector<char> & ends);
void take_prompt_chunk(pmtp_spec & s, llama_seq_id seq, int32_t c, bool end);
// A verified batch never accepted leaves positions in both contexts: dropped.
int32_t discard_unaccepted(pmtp_spec & s);
// n_max[seq]: draft length per sequence; negative keeps the draft already set (lookup).
int32_t draft(pmtp_spec & s, const int32_t * n_max, float p_min);
int32_t verify(pmtp_spec & s);
int32_t accept(pmtp_spec & s, llama_seq_id seq, int32_t n_accepted, llama_token next);
// Drop positions >= from of a sequence in both contexts (PMTP_ERR_STATE where the memory
// cannot cut there, e.g. recurrent state further back than its snapshots).
int32_t rollback(pmtp_spec & s, llama_seq_id seq, llama_pos from);
void reset(pmtp_spec & s, llama_seq_id seq);
// pmtp_spec_rebuild: the sequences of the last step whose logits held NaN / Inf are each
// evaluated alone in cleared memory; those that still do are the sources and are reset
// (their failure kept), the rest are victims of llama.cpp's spread between sequences.
// Then the memory is cleared and every other active sequence is evaluated again.
int32_t rebuild(pmtp_spec & s);
// A drafter that rested lacks positions, and llama.cpp takes a sequence's new positions
// only right after its last ones: it starts over (empty) from the next position it sees.
void resume_drafter(pmtp_spec & s, llama_seq_id seq);
// Keep the first n_keep tokens of a sequence (2 <= n_keep <= n_past), the last one pending.
int32_t truncate(pmtp_spec & s, llama_seq_id seq, int32_t n_keep);
int32_t step_each(pmtp_spec & s, const int32_t * n_draft_each, float p_min, llama_token * out_tokens,
                  int32_t * out_counts, int32_t * out_drafted);

}  // namespace pmtp::spec
