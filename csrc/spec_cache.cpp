// A sequence's life around the step: prompts queued into the verify batches (admitted
// without a prefill call that stalls the others), parked sequences (memory kept for
// prefix reuse, not stepped) and checkpoints of what the target cannot cut back. A hybrid model's recurrent layers keep
// one state per sequence (plus n_rs_seq snapshots for draft rollback), so going back to
// the end of an earlier prompt needs that state saved there; attention memory and the
// drafter's KV cut back by position. llama-server keeps the same kind of checkpoints
// (LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY); we keep the step state with them.

#include "pyllama_mtp.h"
#include "spec_internal.h"
#include "internal.h"

#include <algorithm>
#include <cstring>
#include <vector>

struct pmtp_spec_checkpoint {
    llama_seq_id seq = -1;
    llama_pos n_past = 0;
    bool drafter_gap = false;
    std::vector<llama_token> history;  // id_last included
    std::vector<float> pending_h;
    std::vector<uint8_t> target_state;  // PARTIAL_ONLY: recurrent layers only
};

namespace {

using pmtp::guarded;

bool valid_seq(const pmtp_spec * s, llama_seq_id seq) {
    return s != nullptr && seq >= 0 && seq < s->n_seq;
}

int32_t save(pmtp_spec & s, llama_seq_id seq, pmtp_spec_checkpoint & c) {
    const pmtp_seq & q = s.seqs[seq];
    c.seq = seq;
    c.n_past = q.n_past;
    c.drafter_gap = q.drafter_gap;
    c.history = q.history;
    c.pending_h = q.pending_h;
    const size_t size = llama_state_seq_get_size_ext(s.tgt, seq, LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY);
    c.target_state.resize(size);
    const size_t written = llama_state_seq_get_data_ext(s.tgt, c.target_state.data(), size, seq,
                                                        LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY);
    return written == size ? PMTP_OK : PMTP_ERR_STATE;
}

int32_t restore(pmtp_spec & s, llama_seq_id seq, const pmtp_spec_checkpoint & c) {
    pmtp_seq & q = s.seqs[seq];
    // The memory past the checkpoint must be this sequence's continuation of it.
    if (c.seq != seq || !q.active || q.history.size() < c.history.size() ||
        !std::equal(c.history.begin(), c.history.end(), q.history.begin())) {
        return PMTP_ERR_STATE;
    }
    const int32_t discarded = pmtp::spec::rollback(s, seq, q.n_past);  // a verify never accepted
    if (discarded != PMTP_OK) {
        return discarded;
    }
    const size_t read = llama_state_seq_set_data_ext(s.tgt, c.target_state.data(), c.target_state.size(), seq,
                                                     LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY);
    // The recurrent state now ends before c.n_past: this cuts attention memory only.
    if (read != c.target_state.size() || pmtp::spec::rollback(s, seq, c.n_past) != PMTP_OK) {
        pmtp::spec::reset(s, seq);  // half restored: nothing of it can be trusted
        return PMTP_ERR_STATE;
    }
    q.clear_draft();
    q.verify_rows = 0;
    q.verify_choice.clear();
    q.n_past = c.n_past;
    q.id_last = c.history.back();
    q.history = c.history;
    q.pending_h = c.pending_h;
    q.drafter_gap = c.drafter_gap;
    q.parked = false;
    return PMTP_OK;
}

}  // namespace

namespace pmtp::spec {

int32_t truncate(pmtp_spec & s, llama_seq_id seq, int32_t n_keep) {
    const int32_t discarded = discard_unaccepted(s);
    if (discarded != PMTP_OK) {
        return discarded;
    }
    pmtp_seq & q = s.seqs[seq];
    const std::vector<llama_token> history = q.history;
    // The kept pending token pairs with the hidden row of the token before it, which no
    // one kept: cut one position further back and evaluate that token again.
    const llama_pos cut = n_keep - 2;
    if (rollback(s, seq, cut) != PMTP_OK) {
        reset(s, seq);  // recurrent state further back than its snapshots
        return PMTP_ERR_STATE;
    }
    q.clear_draft();
    q.verify_rows = 0;
    q.n_past = cut;
    q.id_last = history[cut];
    q.history.assign(history.begin(), history.begin() + cut + 1);
    const int32_t st = prefill(s, seq, &history[n_keep - 1], 1);
    if (st != PMTP_OK) {
        reset(s, seq);
    }
    return st;
}

void enqueue(pmtp_spec & s, llama_seq_id seq, const llama_token * tokens, int32_t n, bool ready) {
    pmtp_seq & q = s.seqs[seq];
    q.clear_draft();
    q.queued.clear();
    if (q.active) {  // its pending token is evaluated first
        q.history.pop_back();
        q.queued.push_back(q.id_last);
    } else {
        q.n_past = llama_memory_seq_pos_max(llama_get_memory(s.tgt), seq) + 1;
    }
    q.queued.insert(q.queued.end(), tokens, tokens + n);
    q.queued_ready = ready;
    q.active = false;
    q.parked = false;
    q.verify_rows = 0;
}

// Queued prompts fill what a verify batch leaves (n_batch), shortest first (a short prompt's
// first token then never waits behind a long one): each adds up to all but its last token
// (n_prompt[seq]); ends[seq] when that finishes the prompt, a ready one's last token then
// added as its pending token with an output row.
void add_prompt_chunks(pmtp_spec & s, std::vector<llama_seq_id> & seq_of, std::vector<llama_token> & tok,
                       std::vector<llama_pos> & pos, std::vector<bool> & out, std::vector<int32_t> & n_prompt,
                       std::vector<char> & ends) {
    std::vector<llama_seq_id> order;
    for (llama_seq_id seq = 0; seq < s.n_seq; seq++) {
        if (!s.seqs[seq].queued.empty()) {
            order.push_back(seq);
        }
    }
    std::stable_sort(order.begin(), order.end(), [&s](llama_seq_id a, llama_seq_id b) {
        return s.seqs[a].queued.size() < s.seqs[b].queued.size();
    });
    int32_t room = (int32_t) llama_n_batch(s.tgt) - (int32_t) tok.size();
    for (const llama_seq_id seq : order) {
        pmtp_seq & q = s.seqs[seq];
        if (room <= 0) {
            break;
        }
        const int32_t rest = (int32_t) q.queued.size() - 1;  // all but the last
        const int32_t c = std::min(room, rest);
        const bool end = c == rest && (!q.queued_ready || room > c);  // a ready one needs a row for its last
        for (int32_t i = 0; i < c; i++) {
            seq_of.push_back(seq);
            tok.push_back(q.queued[i]);
            pos.push_back(q.n_past + i);
            out.push_back(false);
        }
        if (end && q.queued_ready) {
            seq_of.push_back(seq);
            tok.push_back(q.queued[rest]);
            pos.push_back(q.n_past + c);
            out.push_back(true);
        }
        n_prompt[seq] = c;
        ends[seq] = end;
        room -= c + (end && q.queued_ready ? 1 : 0);
    }
}

// After a verify batch that held `c` queued prompt tokens of a sequence (and, if `end`,
// the rest of its prompt): they join its history; an ended prompt's last token becomes
// the pending one, verified in this batch (ready) or parked for the caller.
void take_prompt_chunk(pmtp_spec & s, llama_seq_id seq, int32_t c, bool end) {
    pmtp_seq & q = s.seqs[seq];
    if (c > 0) {
        std::memcpy(q.pending_h.data(), q.verify_h.data() + (size_t) (c - 1) * s.n_embd, sizeof(float) * s.n_embd);
    }
    q.history.insert(q.history.end(), q.queued.begin(), q.queued.begin() + c);
    q.n_past += c;
    q.queued.erase(q.queued.begin(), q.queued.begin() + c);
    if (!end) {
        q.verify_rows = 0;
        return;
    }
    q.id_last = q.queued[0];
    q.history.push_back(q.id_last);
    q.queued.clear();
    q.active = true;
    if (q.queued_ready) {  // the id_last row is this batch's verify row
        q.verify_beg += c;
        q.verify_rows -= c;
        q.verify_h.erase(q.verify_h.begin(), q.verify_h.begin() + (size_t) c * s.n_embd);
    } else {
        q.parked = true;
        q.verify_rows = 0;
    }
}

}  // namespace pmtp::spec

extern "C" {

int32_t pmtp_spec_enqueue(pmtp_spec * s, llama_seq_id seq, const llama_token * tokens, int32_t n, int32_t ready) {
    if (!valid_seq(s, seq) || n < 1 || tokens == nullptr || !s->seqs[seq].queued.empty() ||
        !std::all_of(tokens, tokens + n, [s](llama_token t) { return t >= 0 && t < s->n_vocab; })) {
        return PMTP_ERR_ARGUMENT;
    }
    const pmtp_seq & q = s->seqs[seq];
    const llama_pos start = q.active ? q.n_past : llama_memory_seq_pos_max(llama_get_memory(s->tgt), seq) + 1;
    if (start + n > (llama_pos) llama_n_ctx_seq(s->tgt)) {
        return PMTP_ERR_NO_KV_SLOT;
    }
    return guarded([&] {
        const int32_t discarded = pmtp::spec::discard_unaccepted(*s);
        if (discarded != PMTP_OK) {
            return discarded;
        }
        if (!ready && !q.active && n == 1) {  // nothing to evaluate: a prefill is its state
            return pmtp::spec::prefill(*s, seq, tokens, 1);
        }
        pmtp::spec::enqueue(*s, seq, tokens, n, ready != 0);
        return (int32_t) PMTP_OK;
    });
}

int32_t pmtp_spec_park(pmtp_spec * s, llama_seq_id seq, int32_t parked) {
    if (!valid_seq(s, seq)) {
        return PMTP_ERR_ARGUMENT;
    }
    s->seqs[seq].parked = parked != 0;
    return PMTP_OK;
}

int32_t pmtp_spec_checkpoint_new(pmtp_spec * s, llama_seq_id seq, pmtp_spec_checkpoint ** out) {
    if (out == nullptr) {
        return PMTP_ERR_ARGUMENT;
    }
    *out = nullptr;
    if (!valid_seq(s, seq) || !s->seqs[seq].active || s->seqs[seq].verify_rows > 0) {
        return PMTP_ERR_ARGUMENT;
    }
    return guarded([&] {
        auto * c = new pmtp_spec_checkpoint();
        const int32_t st = save(*s, seq, *c);
        if (st != PMTP_OK) {
            delete c;
            return st;
        }
        *out = c;
        return (int32_t) PMTP_OK;
    });
}

int32_t pmtp_spec_checkpoint_restore(pmtp_spec * s, llama_seq_id seq, const pmtp_spec_checkpoint * c) {
    if (!valid_seq(s, seq) || c == nullptr) {
        return PMTP_ERR_ARGUMENT;
    }
    return guarded([&] { return restore(*s, seq, *c); });
}

int64_t pmtp_spec_checkpoint_bytes(const pmtp_spec_checkpoint * c) {
    if (c == nullptr) {
        return 0;
    }
    return (int64_t) (c->target_state.size() + c->pending_h.size() * sizeof(float) +
                      c->history.size() * sizeof(llama_token));
}

int32_t pmtp_spec_checkpoint_n_tokens(const pmtp_spec_checkpoint * c) {
    return c == nullptr ? 0 : (int32_t) c->history.size();
}

void pmtp_spec_checkpoint_free(pmtp_spec_checkpoint * c) {
    delete c;
}

}  // extern "C"
