// The three MTP head layouts of upstream's draft-mtp, one strategy each:
//   single head (qwen35, glm4moe, deepseek): one MTP block on the drafter's own KV;
//   chained heads (step35): one trained block per draft position, picked with
//     llama_set_nextn_layer_offset, each fed the whole draft so far;
//   shared KV (gemma4 assistants): the drafter reads the target's KV, so there is
//     nothing to catch up and nothing of its own to roll back.

#include "spec_internal.h"
#include "internal.h"

#include <algorithm>

namespace pmtp {
namespace {

struct single_head final : head_layout {
    int32_t catch_up(llama_context * dft, llama_batch_ext * batch, const std::vector<llama_pos> &) const override {
        const int32_t rc = llama_process(dft, LLAMA_PROCESS_TYPE_DECODE, batch);
        return rc != 0 ? pmtp_status_from_decode(rc) : PMTP_OK;
    }
    int32_t add_next(llama_batch_ext * batch, llama_seq_id seq, pmtp_seq & q, const float * h_row,
                     int32_t n_embd) const override {
        return add_entry(batch, seq, q.draft.back(), q.n_past + (llama_pos) q.draft.size(), true, h_row, n_embd);
    }
};

struct shared_kv_head final : head_layout {
    bool own_memory() const override { return false; }
    int32_t catch_up(llama_context *, llama_batch_ext *, const std::vector<llama_pos> &) const override {
        return PMTP_OK;
    }
    int32_t add_next(llama_batch_ext * batch, llama_seq_id seq, pmtp_seq & q, const float * h_row,
                     int32_t n_embd) const override {
        return add_entry(batch, seq, q.draft.back(), q.n_past, true, h_row, n_embd);
    }
};

struct chained_heads final : head_layout {
    int32_t n_heads;
    explicit chained_heads(int32_t n) : n_heads(n) {}

    int32_t max_draft(int32_t requested) const override { return std::min(requested, n_heads); }

    static void drop_from(llama_context * dft, const std::vector<llama_pos> & from) {
        for (llama_seq_id seq = 0; seq < (llama_seq_id) from.size(); seq++) {
            if (from[seq] >= 0) {
                llama_memory_seq_rm(llama_get_memory(dft), seq, from[seq], -1);
            }
        }
    }

    // Every head sees the caught-up tokens, each on the same positions in turn.
    int32_t catch_up(llama_context * dft, llama_batch_ext * batch, const std::vector<llama_pos> & first_pos) const override {
        int32_t status = PMTP_OK;
        for (int32_t head = 0; head < n_heads && status == PMTP_OK; head++) {
            drop_from(dft, first_pos);
            llama_set_nextn_layer_offset(dft, head);
            const int32_t rc = llama_process(dft, LLAMA_PROCESS_TYPE_DECODE, batch);
            status = rc != 0 ? pmtp_status_from_decode(rc) : PMTP_OK;
        }
        llama_set_nextn_layer_offset(dft, 0);
        return status;
    }
    void begin_draft(pmtp_seq & q) const override { q.chain_h = q.pending_h; }
    void begin_step(llama_context * dft, int32_t step, const std::vector<llama_pos> & from) const override {
        drop_from(dft, from);
        llama_set_nextn_layer_offset(dft, step);
    }
    // Head i drafts position i from the whole chain: id_last and the drafts so far, each
    // paired with the hidden row before it.
    int32_t add_next(llama_batch_ext * batch, llama_seq_id seq, pmtp_seq & q, const float * h_row,
                     int32_t n_embd) const override {
        q.chain_h.insert(q.chain_h.end(), h_row, h_row + n_embd);
        const int32_t n_rows = (int32_t) q.draft.size() + 1;
        int32_t idx = -1;
        for (int32_t t = 0; t < n_rows; t++) {
            const llama_token tok = t == 0 ? q.id_last : q.draft[t - 1];
            idx = add_entry(batch, seq, tok, q.n_past + t, t == n_rows - 1, q.chain_h.data() + (size_t) t * n_embd,
                            n_embd);
            if (idx < 0) {
                return idx;
            }
        }
        return idx;
    }
    void end_draft(llama_context * dft) const override { llama_set_nextn_layer_offset(dft, 0); }
};

}  // namespace

std::unique_ptr<head_layout> make_head_layout(llama_context * tgt, llama_context * dft, int32_t n_heads) {
    if (llama_get_ctx_other(dft) == tgt) {
        return std::make_unique<shared_kv_head>();
    }
    if (n_heads > 1) {
        return std::make_unique<chained_heads>(n_heads);
    }
    return std::make_unique<single_head>();
}

}  // namespace pmtp
