// The core of the speculative step: prefill, draft on the MTP context, verify in one
// target batch, accept, and roll back both contexts; after every target batch the
// drafter catches up on the hidden rows it needs. Arguments are valid here (the exported
// API checks them); see spec_internal.h.

#include "spec_internal.h"
#include "internal.h"
#include "sampler.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>

namespace pmtp {

int64_t now_us() {
    return std::chrono::duration_cast<std::chrono::microseconds>(
        std::chrono::steady_clock::now().time_since_epoch()).count();
}

int32_t add_entry(llama_batch_ext * batch, llama_seq_id seq, llama_token token, llama_pos pos,
                  bool output, const float * state_row, int32_t n_embd) {
    const int32_t idx = llama_batch_ext_add_token(batch, seq, token);
    if (idx < 0) {
        return idx == -1 ? PMTP_ERR_NO_KV_SLOT : PMTP_ERR_ARGUMENT;
    }
    llama_batch_ext_set_pos(batch, idx, &pos);
    if (state_row != nullptr &&
        !llama_batch_ext_set_embd_token(batch, idx, llama_embd{ state_row, 1, (size_t) n_embd })) {
        return PMTP_ERR_ARGUMENT;
    }
    if (output) {
        llama_batch_ext_set_output_logits(batch, idx, true);
    }
    return idx;
}

}  // namespace pmtp

namespace pmtp::spec {
namespace {

int32_t argmax(const float * row, int32_t n) {
    return (int32_t) (std::max_element(row, row + n) - row);
}

// Probability of the top token under softmax(row), without allocating.
float top_probability(const float * row, int32_t n, int32_t top) {
    const float max_logit = row[top];
    double sum = 0.0;
    for (int32_t i = 0; i < n; i++) {
        sum += std::exp((double) row[i] - max_logit);
    }
    return (float) (1.0 / sum);
}

// Give the drafter the tokens the target just evaluated, each paired with the target's
// hidden row of the previous position (the first with the pending row): this is what the
// MTP head needs at those positions for later drafts. Then remember the target's rows.
int32_t catch_up(pmtp_spec & s, const std::vector<llama_seq_id> & seq_of, const std::vector<llama_token> & tok,
                 const std::vector<llama_pos> & pos) {
    const int32_t n = (int32_t) tok.size();
    const int32_t n_embd = s.n_embd;
    std::vector<int32_t> beg(s.n_seq, -1), end(s.n_seq, -1);
    std::vector<llama_pos> first_pos(s.n_seq, -1);
    for (int32_t k = 0; k < n; k++) {
        if (beg[seq_of[k]] < 0) {
            beg[seq_of[k]] = k;
            first_pos[seq_of[k]] = pos[k];
        }
        end[seq_of[k]] = k;
    }
    const int64_t t0 = now_us();
    if (s.heads->own_memory()) {
        const float * h_tgt = llama_get_embeddings_nextn(s.tgt);
        if (h_tgt == nullptr) {
            return PMTP_ERR_INTERNAL;
        }
        batch_ptr batch(s.dft);
        std::vector<llama_pos> from = first_pos;
        int32_t n_rows = 0;
        for (int32_t k = 0; k < n; k++) {
            const llama_seq_id seq = seq_of[k];
            if (!s.resting.empty() && s.resting[seq]) {
                from[seq] = -1;  // a resting drafter skips these positions
                s.seqs[seq].drafter_gap = true;
                continue;
            }
            if (pos[k] < s.seqs[seq].catch_up_from) {  // see pmtp_spec_set_catch_up_from
                from[seq] = pos[k] + 1;
                s.seqs[seq].drafter_gap = true;
                continue;
            }
            resume_drafter(s, seq);
            const float * row = k == beg[seq] ? s.seqs[seq].pending_h.data() : h_tgt + (size_t) (k - 1) * n_embd;
            const int32_t idx = add_entry(batch.batch, seq, tok[k], pos[k], false, row, n_embd);
            if (idx < 0) {
                return idx;
            }
            n_rows++;
        }
        const int32_t st = n_rows > 0 ? s.heads->catch_up(s.dft, batch.batch, from) : PMTP_OK;
        if (st != PMTP_OK) {
            return st;
        }
    }
    for (llama_seq_id seq = 0; seq < s.n_seq; seq++) {
        if (beg[seq] < 0) {
            continue;
        }
        pmtp_seq & q = s.seqs[seq];
        q.verify_rows = end[seq] - beg[seq] + 1;
        q.verify_beg = beg[seq];
        q.verify_h.resize((size_t) q.verify_rows * n_embd);
        for (int32_t i = 0; i < q.verify_rows; i++) {
            const float * h = llama_get_embeddings_nextn_ith(s.tgt, beg[seq] + i);
            if (h == nullptr) {
                return PMTP_ERR_INTERNAL;
            }
            std::memcpy(q.verify_h.data() + (size_t) i * n_embd, h, sizeof(float) * n_embd);
        }
    }
    s.stats.t_draft_us += now_us() - t0;
    return PMTP_OK;
}

// Keeps a context's abort callback from stopping a graph while in scope.
struct hold_abort {
    pmtp_abort_state * state;
    int32_t previous = 0;
    explicit hold_abort(pmtp_abort_state * st) : state(st) {
        if (state != nullptr) {
            previous = state->between_calls_only;
            state->between_calls_only = 1;
        }
    }
    ~hold_abort() {
        if (state != nullptr) {
            state->between_calls_only = previous;
        }
    }
    hold_abort(const hold_abort &) = delete;
    hold_abort & operator=(const hold_abort &) = delete;
};

// Evaluate tokens on the target (outputs as requested), then catch the drafter up.
int32_t target_eval(pmtp_spec & s, const std::vector<llama_seq_id> & seq_of, const std::vector<llama_token> & tok,
                    const std::vector<llama_pos> & pos, const std::vector<bool> & out) {
    const int64_t t0 = now_us();
    {
        batch_ptr batch(s.tgt);
        for (size_t k = 0; k < tok.size(); k++) {
            const int32_t idx = add_entry(batch.batch, seq_of[k], tok[k], pos[k], out[k], nullptr, 0);
            if (idx < 0) {
                return idx;
            }
        }
        const int32_t rc = llama_process(s.tgt, LLAMA_PROCESS_TYPE_DECODE, batch.batch);
        s.stats.t_target_us += now_us() - t0;
        if (rc != 0) {
            return pmtp_status_from_decode(rc);
        }
    }
    // The target's batch is done: finish the drafter's too (see pmtp_spec_set_draft_abort_state).
    hold_abort hold(s.dft_abort);
    return catch_up(s, seq_of, tok, pos);
}

}  // namespace

// A verified batch that was never accepted (the caller drafted or verified again)
// leaves its positions in both contexts: drop them so the next batch starts at n_past.
int32_t discard_unaccepted(pmtp_spec & s) {
    int32_t status = PMTP_OK;
    for (llama_seq_id seq = 0; seq < s.n_seq; seq++) {
        pmtp_seq & q = s.seqs[seq];
        if (q.active && q.verify_rows > 0) {
            const int32_t st = rollback(s, seq, q.n_past);
            status = st != PMTP_OK ? st : status;
            q.verify_rows = 0;
            q.verify_choice.clear();
        }
    }
    return status;
}

namespace {

// One MTP draft token from a row of the drafter's logits: (token, its probability, the top
// probability); sampled drafts also keep the whole distribution in q.draft_q.
void choose_draft(pmtp_spec & s, pmtp_seq & q, const float * logits, float p_min, llama_token & id, float & p,
                  float & p_top) {
    // Drafts are never constrained: the target's grammar decides at verification.
    if (q.sampler != nullptr && !q.sampler->greedy() && !q.sampler->params.exact_match) {
        id = pmtp::sample_draft(*q.sampler, logits, s.probs);
        p = s.probs[id];
        p_top = *std::max_element(s.probs.begin(), s.probs.end());
        if (p_top >= p_min) {
            q.draft_q.insert(q.draft_q.end(), s.probs.begin(), s.probs.end());
        }
    } else {
        id = argmax(logits, s.n_vocab);
        p = p_top = p_min > 0.0f ? top_probability(logits, s.n_vocab, id) : 1.0f;
    }
}

}  // namespace

int32_t rollback(pmtp_spec & s, llama_seq_id seq, llama_pos from) {
    bool ok = llama_memory_seq_rm(llama_get_memory(s.tgt), seq, from, -1);
    if (s.heads->own_memory()) {
        ok = llama_memory_seq_rm(llama_get_memory(s.dft), seq, from, -1) && ok;
    }
    return ok ? PMTP_OK : PMTP_ERR_STATE;
}

void resume_drafter(pmtp_spec & s, llama_seq_id seq) {
    if (s.seqs[seq].drafter_gap && s.heads->own_memory()) {
        llama_memory_seq_rm(llama_get_memory(s.dft), seq, -1, -1);
    }
    s.seqs[seq].drafter_gap = false;
}

void reset(pmtp_spec & s, llama_seq_id seq) {
    llama_memory_seq_rm(llama_get_memory(s.tgt), seq, -1, -1);
    if (s.heads->own_memory()) {
        llama_memory_seq_rm(llama_get_memory(s.dft), seq, -1, -1);
    }
    pmtp_seq & q = s.seqs[seq];
    pmtp_sampler * sampler = q.sampler;  // the caller's setting outlives the sequence
    q = pmtp_seq();
    q.pending_h.assign(s.n_embd, 0.0f);
    q.sampler = sampler;
}

int32_t prefill(pmtp_spec & s, llama_seq_id seq, const llama_token * tokens, int32_t n) {
    const int32_t discarded = discard_unaccepted(s);
    if (discarded != PMTP_OK) {
        return discarded;
    }
    pmtp_seq & q = s.seqs[seq];
    // The pending token (if any) is evaluated first, then all but the last new token.
    std::vector<llama_token> todo;
    if (q.active) {
        todo.push_back(q.id_last);
    } else {
        q.n_past = llama_memory_seq_pos_max(llama_get_memory(s.tgt), seq) + 1;
    }
    todo.insert(todo.end(), tokens, tokens + n - 1);
    const llama_pos start_past = q.n_past;
    const std::vector<float> start_h = q.pending_h;
    const int32_t n_batch = (int32_t) llama_n_batch(s.tgt);
    for (size_t start = 0; start < todo.size(); start += n_batch) {
        const size_t stop = std::min(todo.size(), start + (size_t) n_batch);
        std::vector<llama_seq_id> seq_of(stop - start, seq);
        std::vector<llama_token> tok(todo.begin() + start, todo.begin() + stop);
        std::vector<llama_pos> pos(stop - start);
        std::vector<bool> out(stop - start, false);
        for (size_t k = 0; k < pos.size(); k++) {
            pos[k] = q.n_past + (llama_pos) k;
        }
        const int32_t st = target_eval(s, seq_of, tok, pos, out);
        if (st != PMTP_OK) {
            // Undo the whole prefill; where the memory cannot cut back that far
            // (recurrent state past its snapshots) the sequence is reset instead.
            if (rollback(s, seq, start_past) == PMTP_OK) {
                q.n_past = start_past;
                q.pending_h = start_h;
                q.verify_rows = 0;
            } else {
                reset(s, seq);
            }
            return st;
        }
        q.n_past += (llama_pos) tok.size();
        // The next chunk's first token (or the first draft) pairs with this chunk's last row.
        std::memcpy(q.pending_h.data(), q.verify_h.data() + (size_t) (q.verify_rows - 1) * s.n_embd,
                    sizeof(float) * s.n_embd);
        q.verify_rows = 0;
    }
    q.id_last = tokens[n - 1];
    q.active = true;
    q.parked = false;
    q.history.insert(q.history.end(), tokens, tokens + n);
    q.clear_draft();
    return PMTP_OK;
}

int32_t draft(pmtp_spec & s, const int32_t * n_max, float p_min) {
    const int32_t discarded = discard_unaccepted(s);
    if (discarded != PMTP_OK) {
        return discarded;
    }
    const int64_t t0 = now_us();
    const int32_t n_embd = s.n_embd;
    std::vector<int32_t> limit(s.n_seq, 0);
    std::vector<int32_t> i_last(s.n_seq, -1);
    std::vector<llama_pos> from(s.n_seq, -1);  // where each drafting sequence's draft starts
    batch_ptr batch(s.dft);
    int n_drafting = 0;
    for (llama_seq_id seq = 0; seq < s.n_seq; seq++) {
        pmtp_seq & q = s.seqs[seq];
        limit[seq] = q.active && !q.parked ? std::min(n_max[seq], s.n_draft_max) : 0;
        if (limit[seq] < 0) {
            continue;  // keep the draft set by the caller (step_each's lookups)
        }
        q.clear_draft();
        if (limit[seq] <= 0) {
            continue;
        }
        resume_drafter(s, seq);
        const int32_t idx = add_entry(batch.batch, seq, q.id_last, q.n_past, true, q.pending_h.data(), n_embd);
        if (idx < 0) {
            return idx;
        }
        i_last[seq] = idx;
        s.heads->begin_draft(q);
        n_drafting++;
    }
    int32_t status = PMTP_OK;
    for (int32_t step = 0; n_drafting > 0 && status == PMTP_OK; step++) {
        for (llama_seq_id seq = 0; seq < s.n_seq; seq++) {
            from[seq] = i_last[seq] >= 0 ? s.seqs[seq].n_past : -1;
        }
        s.heads->begin_step(s.dft, step, from);
        const int32_t rc = llama_process(s.dft, LLAMA_PROCESS_TYPE_DECODE, batch.batch);
        if (rc != 0) {
            status = pmtp_status_from_decode(rc);
            break;
        }
        llama_batch_ext_clear(batch.batch);
        n_drafting = 0;
        for (llama_seq_id seq = 0; seq < s.n_seq && status == PMTP_OK; seq++) {
            if (i_last[seq] < 0) {
                continue;
            }
            pmtp_seq & q = s.seqs[seq];
            const float * logits = llama_get_logits_ith(s.dft, i_last[seq]);
            const float * h_row = pmtp_get_embeddings_nextn_ith(s.dft, i_last[seq]);
            if (logits == nullptr || h_row == nullptr) {
                status = PMTP_ERR_INTERNAL;
                break;
            }
            i_last[seq] = -1;
            if (!all_finite(logits, s.n_vocab)) {
                continue;  // a broken head drafts no further: the target decides alone
            }
            llama_token id;
            float p, p_top;
            choose_draft(s, q, logits, p_min, id, p, p_top);
            if (p_top < p_min) {
                continue;
            }
            q.draft.push_back(id);
            q.draft_p.push_back(p);
            if ((int32_t) q.draft.size() >= limit[seq]) {
                continue;
            }
            const int32_t idx = s.heads->add_next(batch.batch, seq, q, h_row, n_embd);
            if (idx < 0) {
                status = idx;
                break;
            }
            i_last[seq] = idx;
            n_drafting++;
        }
    }
    s.heads->end_draft(s.dft);
    // Draft positions go: the verify batch re-adds them with the target's hidden rows.
    for (llama_seq_id seq = 0; seq < s.n_seq; seq++) {
        pmtp_seq & q = s.seqs[seq];
        if (q.active && s.heads->own_memory()) {
            llama_memory_seq_rm(llama_get_memory(s.dft), seq, q.n_past, -1);
        }
        if (status != PMTP_OK) {
            q.clear_draft();
        } else if (limit[seq] >= 0) {  // lookup drafts are counted where they are made
            s.stats.n_drafted += (int64_t) q.draft.size();
        }
    }
    s.stats.t_draft_us += now_us() - t0;
    return status;
}

int32_t verify(pmtp_spec & s) {
    const int32_t discarded = discard_unaccepted(s);
    if (discarded != PMTP_OK) {
        return discarded;
    }
    std::vector<llama_seq_id> seq_of;
    std::vector<llama_token> tok;
    std::vector<llama_pos> pos;
    for (llama_seq_id seq = 0; seq < s.n_seq; seq++) {
        pmtp_seq & q = s.seqs[seq];
        q.verify_rows = 0;
        q.verify_choice.clear();
        if (!q.active || q.parked) {
            continue;
        }
        seq_of.push_back(seq);
        tok.push_back(q.id_last);
        pos.push_back(q.n_past);
        for (size_t i = 0; i < q.draft.size(); i++) {
            seq_of.push_back(seq);
            tok.push_back(q.draft[i]);
            pos.push_back(q.n_past + 1 + (llama_pos) i);
        }
    }
    std::vector<bool> out(tok.size(), true);
    // Queued prompts fill what the batch leaves (see add_prompt_chunks).
    std::vector<int32_t> n_prompt(s.n_seq, 0);
    std::vector<char> ends(s.n_seq, 0);
    add_prompt_chunks(s, seq_of, tok, pos, out, n_prompt, ends);
    if (tok.empty()) {
        for (llama_seq_id seq = 0; seq < s.n_seq; seq++) {
            if (ends[seq]) {
                take_prompt_chunk(s, seq, 0, true);  // one token left, not ready: it is pending
            }
        }
        return PMTP_OK;
    }
    const int32_t st = target_eval(s, seq_of, tok, pos, out);
    if (st != PMTP_OK) {
        // Nothing was accepted: both contexts go back to before the batch.
        for (llama_seq_id seq = 0; seq < s.n_seq; seq++) {
            pmtp_seq & q = s.seqs[seq];
            if (q.active) {
                // llama.cpp already restored the memory for "no KV slot"; this covers the rest.
                rollback(s, seq, q.n_past);
                q.verify_rows = 0;
            } else if ((n_prompt[seq] > 0 || ends[seq]) && rollback(s, seq, q.n_past) != PMTP_OK) {
                reset(s, seq);  // a prompt chunk recurrent state cannot take back
            }
        }
        return st;
    }
    for (llama_seq_id seq = 0; seq < s.n_seq; seq++) {
        if (n_prompt[seq] > 0 || ends[seq]) {
            take_prompt_chunk(s, seq, n_prompt[seq], ends[seq]);
        }
    }
    for (llama_seq_id seq = 0; seq < s.n_seq; seq++) {
        pmtp_seq & q = s.seqs[seq];
        if (!q.active || q.parked) {
            continue;
        }
        q.verify_choice.resize(q.verify_rows);
        for (int32_t i = 0; i < q.verify_rows; i++) {
            const float * logits = llama_get_logits_ith(s.tgt, q.verify_beg + i);
            if (logits == nullptr) {
                return PMTP_ERR_INTERNAL;
            }
            q.verify_choice[i] = all_finite(logits, s.n_vocab) ? argmax(logits, s.n_vocab) : -1;
        }
    }
    return PMTP_OK;
}

int32_t accept(pmtp_spec & s, llama_seq_id seq, int32_t n_accepted, llama_token next) {
    pmtp_seq & q = s.seqs[seq];
    const int32_t n_drafted = q.verify_rows - 1;
    for (int32_t i = 0; i < n_drafted; i++) {
        s.stats.drafted_at[std::min(i, PMTP_MAX_DRAFT - 1)]++;
        if (i < n_accepted) {
            s.stats.accepted_at[std::min(i, PMTP_MAX_DRAFT - 1)]++;
        }
    }
    s.stats.n_accepted += n_accepted;
    if (q.draft_from_lookup) {
        s.stats.n_lookup_steps++;
        s.stats.n_lookup_drafted += n_drafted;
        s.stats.n_lookup_accepted += n_accepted;
    }
    s.stats.n_steps++;
    s.stats.n_generated += n_accepted + 1;
    // Keep id_last and the accepted drafts; everything past them goes, from both contexts.
    q.n_past += 1 + n_accepted;
    const int32_t rolled = rollback(s, seq, q.n_past);
    std::memcpy(q.pending_h.data(), q.verify_h.data() + (size_t) n_accepted * s.n_embd, sizeof(float) * s.n_embd);
    q.id_last = next;
    q.history.insert(q.history.end(), q.draft.begin(), q.draft.begin() + n_accepted);
    q.history.push_back(next);
    q.clear_draft();
    q.verify_rows = 0;
    return rolled;
}

}  // namespace pmtp::spec
