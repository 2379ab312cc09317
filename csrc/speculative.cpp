// The MTP speculative loop: draft on the MTP context, verify in one target batch,
// accept, roll back both contexts, and hand the accepted hidden rows to the drafter.
//
// Why our own loop instead of wrapping common/speculative.cpp: upstream's driver
// lives in libcommon (not built for the wheel), hides the draft distribution (needed
// for lossless sampling at T > 0 and for per-position statistics), and drives one
// policy. The upstream pieces we mirror are the pairing rule (the MTP head at
// position p sees the target's nextn hidden row of p-1 and the token at p) and the
// three head layouts (single head: qwen35; chained heads: step35; shared KV: gemma4).

#include "pyllama_mtp.h"
#include "internal.h"
#include "sampling.h"

#include "llama-ext.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <exception>
#include <new>
#include <random>
#include <vector>

namespace {

int64_t now_us() {
    return std::chrono::duration_cast<std::chrono::microseconds>(
        std::chrono::steady_clock::now().time_since_epoch()).count();
}

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

}  // namespace

struct pmtp_seq {
    bool active = false;
    llama_token id_last = 0;         // sampled, not yet evaluated by the target
    llama_pos n_past = 0;            // tokens the target holds = position of id_last
    std::vector<float> pending_h;    // target hidden row paired with id_last
    std::vector<llama_token> draft;  // current draft (after draft(), before accept())
    std::vector<float> draft_p;      // MTP probability of each draft token
    std::vector<float> draft_q;      // sampled drafts: the MTP distribution at each position
                                     // (n_vocab floats each); empty for argmax / set drafts
    std::vector<float> verify_h;     // target nextn rows of the last verify batch
    std::vector<llama_token> verify_choice;  // target argmax at each verify row
    int32_t verify_rows = 0;
    int32_t verify_beg = -1;         // batch index of id_last in the last verify batch
    std::vector<llama_token> history;  // every token of the sequence, id_last included
    bool draft_from_lookup = false;    // the current draft came from n-gram lookup
};

struct pmtp_spec {
    llama_context * tgt = nullptr;
    llama_context * dft = nullptr;
    const llama_vocab * vocab = nullptr;
    int32_t n_vocab = 0;
    int32_t n_embd = 0;
    int32_t n_seq = 0;
    int32_t n_draft_max = 0;
    int32_t n_heads = 1;
    bool shared_kv = false;    // gemma4-style drafter on the target's KV: no catch-up decode
    bool chain_heads = false;  // several trained heads, one per draft position (step35)
    std::vector<pmtp_seq> seqs;
    pmtp_spec_stats stats = {};
    pmtp_abort_state * dft_abort = nullptr;  // see pmtp_spec_set_draft_abort_state
    pmtp_sampling_params sampling = {};        // temperature 0: greedy
    pmtp_lookup_params lookup = {};            // ngram 0: MTP drafts only
    std::mt19937_64 rng;
    std::vector<float> probs, residual;        // scratch, n_vocab each
    std::vector<int32_t> order;
    bool sampled() const { return sampling.temperature > 0.0f; }
};

namespace {

// Give the drafter the tokens the target just evaluated, each paired with the target's
// hidden row of the previous position (the first with the pending row): this is what the
// MTP head needs at those positions for later drafts. Then remember the target's rows.
int32_t catch_up(pmtp_spec * s, const std::vector<llama_seq_id> & seq_of, const std::vector<llama_token> & tok,
                 const std::vector<llama_pos> & pos) {
    const int32_t n = (int32_t) tok.size();
    const int32_t n_embd = s->n_embd;
    std::vector<int32_t> beg(s->n_seq, -1), end(s->n_seq, -1);
    for (int32_t k = 0; k < n; k++) {
        if (beg[seq_of[k]] < 0) {
            beg[seq_of[k]] = k;
        }
        end[seq_of[k]] = k;
    }
    const int64_t t0 = now_us();
    if (!s->shared_kv) {
        const float * h_tgt = llama_get_embeddings_nextn(s->tgt);
        if (h_tgt == nullptr) {
            return PMTP_ERR_INTERNAL;
        }
        batch_ptr batch(s->dft);
        for (int32_t k = 0; k < n; k++) {
            const llama_seq_id seq = seq_of[k];
            const float * row = k == beg[seq] ? s->seqs[seq].pending_h.data() : h_tgt + (size_t) (k - 1) * n_embd;
            const int32_t idx = add_entry(batch.batch, seq, tok[k], pos[k], false, row, n_embd);
            if (idx < 0) {
                return idx;
            }
        }
        for (int32_t head = 0; head < s->n_heads; head++) {
            if (s->chain_heads) {
                for (llama_seq_id seq = 0; seq < s->n_seq; seq++) {
                    if (beg[seq] >= 0) {
                        llama_memory_seq_rm(llama_get_memory(s->dft), seq, pos[beg[seq]], -1);
                    }
                }
                llama_set_nextn_layer_offset(s->dft, head);
            }
            const int32_t rc = llama_process(s->dft, LLAMA_PROCESS_TYPE_DECODE, batch.batch);
            if (rc != 0) {
                if (s->chain_heads) {
                    llama_set_nextn_layer_offset(s->dft, 0);
                }
                return pmtp_status_from_decode(rc);
            }
        }
        if (s->chain_heads) {
            llama_set_nextn_layer_offset(s->dft, 0);
        }
    }
    for (llama_seq_id seq = 0; seq < s->n_seq; seq++) {
        if (beg[seq] < 0) {
            continue;
        }
        pmtp_seq & q = s->seqs[seq];
        q.verify_rows = end[seq] - beg[seq] + 1;
        q.verify_beg = beg[seq];
        q.verify_h.resize((size_t) q.verify_rows * n_embd);
        for (int32_t i = 0; i < q.verify_rows; i++) {
            const float * h = llama_get_embeddings_nextn_ith(s->tgt, beg[seq] + i);
            if (h == nullptr) {
                return PMTP_ERR_INTERNAL;
            }
            std::memcpy(q.verify_h.data() + (size_t) i * n_embd, h, sizeof(float) * n_embd);
        }
    }
    s->stats.t_draft_us += now_us() - t0;
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
int32_t target_eval(pmtp_spec * s, const std::vector<llama_seq_id> & seq_of, const std::vector<llama_token> & tok,
                    const std::vector<llama_pos> & pos, const std::vector<bool> & out) {
    const int64_t t0 = now_us();
    {
        batch_ptr batch(s->tgt);
        for (size_t k = 0; k < tok.size(); k++) {
            const int32_t idx = add_entry(batch.batch, seq_of[k], tok[k], pos[k], out[k], nullptr, 0);
            if (idx < 0) {
                return idx;
            }
        }
        const int32_t rc = llama_process(s->tgt, LLAMA_PROCESS_TYPE_DECODE, batch.batch);
        s->stats.t_target_us += now_us() - t0;
        if (rc != 0) {
            return pmtp_status_from_decode(rc);
        }
    }
    // The target's batch is done: finish the drafter's too (see pmtp_spec_set_draft_abort_state).
    hold_abort hold(s->dft_abort);
    return catch_up(s, seq_of, tok, pos);
}

// Drop positions >= from of a sequence in both contexts. Fails (PMTP_ERR_STATE) when the
// memory cannot cut there, e.g. recurrent state further back than its snapshots.
int32_t rollback_seq(pmtp_spec * s, llama_seq_id seq, llama_pos from) {
    bool ok = llama_memory_seq_rm(llama_get_memory(s->tgt), seq, from, -1);
    if (!s->shared_kv) {
        ok = llama_memory_seq_rm(llama_get_memory(s->dft), seq, from, -1) && ok;
    }
    return ok ? PMTP_OK : PMTP_ERR_STATE;
}

// A verified batch that was never accepted (the caller drafted or verified again)
// leaves its positions in both contexts: drop them so the next batch starts at n_past.
int32_t discard_unaccepted(pmtp_spec * s) {
    int32_t status = PMTP_OK;
    for (llama_seq_id seq = 0; seq < s->n_seq; seq++) {
        pmtp_seq & q = s->seqs[seq];
        if (q.active && q.verify_rows > 0) {
            const int32_t st = rollback_seq(s, seq, q.n_past);
            status = st != PMTP_OK ? st : status;
            q.verify_rows = 0;
            q.verify_choice.clear();
        }
    }
    return status;
}

template <typename F>
int32_t guarded(F && body) {
    try {
        return body();
    } catch (const std::bad_alloc &) {
        return PMTP_ERR_ALLOC;
    } catch (const std::exception &) {
        return PMTP_ERR_INTERNAL;
    }
}

bool valid_seq(const pmtp_spec * s, llama_seq_id seq) {
    return s != nullptr && seq >= 0 && seq < s->n_seq;
}

}  // namespace

extern "C" {

pmtp_spec * pmtp_spec_new(llama_context * tgt, llama_context * dft, int32_t n_seq, int32_t n_draft_max,
                          int32_t * status) {
    *status = PMTP_OK;
    if (tgt == nullptr || dft == nullptr || n_seq <= 0 || n_draft_max <= 0) {
        *status = PMTP_ERR_ARGUMENT;
        return nullptr;
    }
    const llama_model * model = llama_get_model(dft);
    if (llama_model_n_layer_nextn(model) <= 0) {
        *status = PMTP_ERR_NO_MTP;
        return nullptr;
    }
    pmtp_spec * s = nullptr;
    *status = guarded([&]() -> int32_t {
        s = new pmtp_spec();
        s->tgt = tgt;
        s->dft = dft;
        s->vocab = llama_model_get_vocab(llama_get_model(tgt));
        s->n_vocab = llama_vocab_n_tokens(s->vocab);
        s->n_embd = llama_model_n_embd_out(llama_get_model(tgt));
        s->n_seq = n_seq;
        s->n_heads = std::max(1, (int) llama_model_n_layer_nextn(model));
        s->shared_kv = llama_get_ctx_other(dft) == tgt;
        s->chain_heads = s->n_heads > 1 && !s->shared_kv;
        s->n_draft_max = s->chain_heads ? std::min(n_draft_max, s->n_heads) : n_draft_max;
        s->seqs.resize(n_seq);
        for (auto & q : s->seqs) {
            q.pending_h.assign(s->n_embd, 0.0f);
        }
        s->stats.n_draft_max = s->n_draft_max;
        // The target writes a hidden row for every token; the drafter only for outputs.
        llama_set_embeddings_nextn(tgt, true, false);
        llama_set_embeddings_nextn(dft, true, true);
        return PMTP_OK;
    });
    if (*status != PMTP_OK) {
        delete s;
        return nullptr;
    }
    return s;
}

void pmtp_spec_free(pmtp_spec * s) {
    delete s;
}

void pmtp_spec_set_draft_abort_state(pmtp_spec * s, pmtp_abort_state * state) {
    if (s != nullptr) {
        s->dft_abort = state;
    }
}

int32_t pmtp_spec_n_draft_max(const pmtp_spec * s) {
    return s ? s->n_draft_max : 0;
}

int32_t pmtp_spec_prefill(pmtp_spec * s, llama_seq_id seq, const llama_token * tokens, int32_t n) {
    if (!valid_seq(s, seq) || tokens == nullptr || n <= 0) {
        return PMTP_ERR_ARGUMENT;
    }
    return guarded([&]() -> int32_t {
        const int32_t discarded = discard_unaccepted(s);
        if (discarded != PMTP_OK) {
            return discarded;
        }
        pmtp_seq & q = s->seqs[seq];
        // The pending token (if any) is evaluated first, then all but the last new token.
        std::vector<llama_token> todo;
        if (q.active) {
            todo.push_back(q.id_last);
        } else {
            q.n_past = llama_memory_seq_pos_max(llama_get_memory(s->tgt), seq) + 1;
        }
        todo.insert(todo.end(), tokens, tokens + n - 1);
        const llama_pos start_past = q.n_past;
        const std::vector<float> start_h = q.pending_h;
        const int32_t n_batch = (int32_t) llama_n_batch(s->tgt);
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
                const bool undone = llama_memory_seq_rm(llama_get_memory(s->tgt), seq, start_past, -1) &&
                    (s->shared_kv || llama_memory_seq_rm(llama_get_memory(s->dft), seq, start_past, -1));
                if (undone) {
                    q.n_past = start_past;
                    q.pending_h = start_h;
                    q.verify_rows = 0;
                } else {
                    pmtp_spec_reset_seq(s, seq);
                }
                return st;
            }
            q.n_past += (llama_pos) tok.size();
            // The next chunk's first token (or the first draft) pairs with this chunk's last row.
            std::memcpy(q.pending_h.data(), q.verify_h.data() + (size_t) (q.verify_rows - 1) * s->n_embd,
                        sizeof(float) * s->n_embd);
            q.verify_rows = 0;
        }
        q.id_last = tokens[n - 1];
        q.active = true;
        q.history.insert(q.history.end(), tokens, tokens + n);
        q.draft.clear();
        q.draft_p.clear();
        q.draft_q.clear();
        return PMTP_OK;
    });
}

int32_t pmtp_spec_draft(pmtp_spec * s, const int32_t * n_max, float p_min) {
    if (s == nullptr || n_max == nullptr) {
        return PMTP_ERR_ARGUMENT;
    }
    return guarded([&]() -> int32_t {
        const int32_t discarded = discard_unaccepted(s);
        if (discarded != PMTP_OK) {
            return discarded;
        }
        const int64_t t0 = now_us();
        const int32_t n_embd = s->n_embd;
        std::vector<int32_t> limit(s->n_seq, 0);
        std::vector<int32_t> i_last(s->n_seq, -1);
        std::vector<std::vector<float>> chain_h(s->n_seq);
        batch_ptr batch(s->dft);
        int n_drafting = 0;
        for (llama_seq_id seq = 0; seq < s->n_seq; seq++) {
            pmtp_seq & q = s->seqs[seq];
            limit[seq] = q.active ? std::min(n_max[seq], s->n_draft_max) : 0;
            if (limit[seq] < 0) {
                continue;  // negative: keep the draft the caller set (pmtp_spec_step's lookups)
            }
            q.draft.clear();
            q.draft_p.clear();
            q.draft_q.clear();
            q.draft_from_lookup = false;
            if (limit[seq] <= 0) {
                continue;
            }
            const int32_t idx = add_entry(batch.batch, seq, q.id_last, q.n_past, true, q.pending_h.data(), n_embd);
            if (idx < 0) {
                return idx;
            }
            i_last[seq] = idx;
            if (s->chain_heads) {
                chain_h[seq] = q.pending_h;
            }
            n_drafting++;
        }
        int32_t status = PMTP_OK;
        for (int32_t step = 0; n_drafting > 0; step++) {
            if (s->chain_heads) {
                for (llama_seq_id seq = 0; seq < s->n_seq; seq++) {
                    if (i_last[seq] >= 0) {
                        llama_memory_seq_rm(llama_get_memory(s->dft), seq, s->seqs[seq].n_past, -1);
                    }
                }
                llama_set_nextn_layer_offset(s->dft, step);
            }
            const int32_t rc = llama_process(s->dft, LLAMA_PROCESS_TYPE_DECODE, batch.batch);
            if (rc != 0) {
                status = pmtp_status_from_decode(rc);
                break;
            }
            llama_batch_ext_clear(batch.batch);
            n_drafting = 0;
            for (llama_seq_id seq = 0; seq < s->n_seq; seq++) {
                if (i_last[seq] < 0) {
                    continue;
                }
                pmtp_seq & q = s->seqs[seq];
                const float * logits = llama_get_logits_ith(s->dft, i_last[seq]);
                const float * h_row = pmtp_get_embeddings_nextn_ith(s->dft, i_last[seq]);
                if (logits == nullptr || h_row == nullptr) {
                    status = PMTP_ERR_INTERNAL;
                    break;
                }
                llama_token id;
                float p, p_top;
                if (s->sampled() && !s->sampling.exact_match) {
                    pmtp::sampling_probs(logits, s->n_vocab, s->sampling, s->probs, s->order);
                    id = pmtp::sample_index(s->probs, s->rng);
                    p = s->probs[id];
                    p_top = *std::max_element(s->probs.begin(), s->probs.end());
                } else {
                    id = argmax(logits, s->n_vocab);
                    p = p_top = p_min > 0.0f ? top_probability(logits, s->n_vocab, id) : 1.0f;
                }
                i_last[seq] = -1;
                if (p_top < p_min) {
                    continue;
                }
                q.draft.push_back(id);
                q.draft_p.push_back(p);
                if (s->sampled() && !s->sampling.exact_match) {
                    q.draft_q.insert(q.draft_q.end(), s->probs.begin(), s->probs.end());
                }
                if ((int32_t) q.draft.size() >= limit[seq]) {
                    continue;
                }
                int32_t idx;
                if (s->chain_heads) {
                    chain_h[seq].insert(chain_h[seq].end(), h_row, h_row + n_embd);
                    const int32_t n_rows = (int32_t) q.draft.size() + 1;
                    idx = -1;
                    for (int32_t t = 0; t < n_rows; t++) {
                        const llama_token tok = t == 0 ? q.id_last : q.draft[t - 1];
                        idx = add_entry(batch.batch, seq, tok, q.n_past + t, t == n_rows - 1,
                                        chain_h[seq].data() + (size_t) t * n_embd, n_embd);
                        if (idx < 0) {
                            break;
                        }
                    }
                } else if (s->shared_kv) {
                    idx = add_entry(batch.batch, seq, id, q.n_past, true, h_row, n_embd);
                } else {
                    idx = add_entry(batch.batch, seq, id, q.n_past + (llama_pos) q.draft.size(), true, h_row, n_embd);
                }
                if (idx < 0) {
                    status = idx;
                    break;
                }
                i_last[seq] = idx;
                n_drafting++;
            }
            if (status != PMTP_OK) {
                break;
            }
        }
        if (s->chain_heads) {
            llama_set_nextn_layer_offset(s->dft, 0);
        }
        // Draft positions go: the verify batch re-adds them with the target's hidden rows.
        for (llama_seq_id seq = 0; seq < s->n_seq; seq++) {
            pmtp_seq & q = s->seqs[seq];
            if (q.active && !s->shared_kv) {
                llama_memory_seq_rm(llama_get_memory(s->dft), seq, q.n_past, -1);
            }
            if (status != PMTP_OK) {
                q.draft.clear();
                q.draft_p.clear();
                q.draft_q.clear();
                q.draft_from_lookup = false;
            } else if (limit[seq] >= 0) {  // lookup drafts are counted by pmtp_spec_step
                s->stats.n_drafted += (int64_t) q.draft.size();
            }
        }
        s->stats.t_draft_us += now_us() - t0;
        return status;
    });
}

int32_t pmtp_spec_set_draft(pmtp_spec * s, llama_seq_id seq, const llama_token * tokens, int32_t n) {
    if (!valid_seq(s, seq) || n < 0 || (n > 0 && tokens == nullptr) || !s->seqs[seq].active) {
        return PMTP_ERR_ARGUMENT;
    }
    pmtp_seq & q = s->seqs[seq];
    q.draft.assign(tokens, tokens + n);
    q.draft_p.assign(n, 1.0f);
    q.draft_q.clear();  // a given draft is certain: q is a point mass
    q.draft_from_lookup = false;
    return PMTP_OK;
}

int32_t pmtp_spec_get_draft(const pmtp_spec * s, llama_seq_id seq, llama_token * tokens, float * probs,
                            int32_t capacity) {
    if (!valid_seq(s, seq) || capacity < 0) {
        return PMTP_ERR_ARGUMENT;
    }
    const pmtp_seq & q = s->seqs[seq];
    const int32_t n = (int32_t) q.draft.size();
    for (int32_t i = 0; i < std::min(n, capacity); i++) {
        if (tokens) tokens[i] = q.draft[i];
        if (probs) probs[i] = q.draft_p[i];
    }
    return n;
}

int32_t pmtp_spec_verify(pmtp_spec * s) {
    if (s == nullptr) {
        return PMTP_ERR_ARGUMENT;
    }
    return guarded([&]() -> int32_t {
        const int32_t discarded = discard_unaccepted(s);
        if (discarded != PMTP_OK) {
            return discarded;
        }
        std::vector<llama_seq_id> seq_of;
        std::vector<llama_token> tok;
        std::vector<llama_pos> pos;
        for (llama_seq_id seq = 0; seq < s->n_seq; seq++) {
            pmtp_seq & q = s->seqs[seq];
            q.verify_rows = 0;
            q.verify_choice.clear();
            if (!q.active) {
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
        if (tok.empty()) {
            return PMTP_OK;
        }
        const std::vector<bool> out(tok.size(), true);
        const int32_t st = target_eval(s, seq_of, tok, pos, out);
        if (st != PMTP_OK) {
            // Nothing was accepted: both contexts go back to before the batch.
            for (llama_seq_id seq = 0; seq < s->n_seq; seq++) {
                if (s->seqs[seq].active) {
                    // llama.cpp already restored the memory for "no KV slot"; this covers the rest.
                    rollback_seq(s, seq, s->seqs[seq].n_past);
                    s->seqs[seq].verify_rows = 0;
                }
            }
            return st;
        }
        for (llama_seq_id seq = 0; seq < s->n_seq; seq++) {
            pmtp_seq & q = s->seqs[seq];
            if (!q.active) {
                continue;
            }
            q.verify_choice.resize(q.verify_rows);
            for (int32_t i = 0; i < q.verify_rows; i++) {
                const float * logits = llama_get_logits_ith(s->tgt, q.verify_beg + i);
                if (logits == nullptr) {
                    return PMTP_ERR_INTERNAL;
                }
                q.verify_choice[i] = argmax(logits, s->n_vocab);
            }
        }
        return PMTP_OK;
    });
}

int32_t pmtp_spec_verify_row(const pmtp_spec * s, llama_seq_id seq, int32_t row) {
    if (!valid_seq(s, seq) || row < 0 || row >= s->seqs[seq].verify_rows) {
        return PMTP_ERR_ARGUMENT;
    }
    return s->seqs[seq].verify_beg + row;
}

int32_t pmtp_spec_target_choices(const pmtp_spec * s, llama_seq_id seq, llama_token * out, int32_t capacity) {
    if (!valid_seq(s, seq) || capacity < 0) {
        return PMTP_ERR_ARGUMENT;
    }
    const pmtp_seq & q = s->seqs[seq];
    const int32_t n = (int32_t) q.verify_choice.size();
    std::copy(q.verify_choice.begin(), q.verify_choice.begin() + std::min(n, capacity), out);
    return n;
}

int32_t pmtp_spec_accept(pmtp_spec * s, llama_seq_id seq, int32_t n_accepted, llama_token next) {
    if (!valid_seq(s, seq)) {
        return PMTP_ERR_ARGUMENT;
    }
    pmtp_seq & q = s->seqs[seq];
    if (!q.active || q.verify_rows <= 0 || n_accepted < 0 || n_accepted >= q.verify_rows ||
        next < 0 || next >= s->n_vocab) {
        return PMTP_ERR_ARGUMENT;
    }
    return guarded([&]() -> int32_t {
        const int32_t n_drafted = q.verify_rows - 1;
        for (int32_t i = 0; i < n_drafted; i++) {
            s->stats.drafted_at[std::min(i, PMTP_MAX_DRAFT - 1)]++;
            if (i < n_accepted) {
                s->stats.accepted_at[std::min(i, PMTP_MAX_DRAFT - 1)]++;
            }
        }
        s->stats.n_accepted += n_accepted;
        if (q.draft_from_lookup) {
            s->stats.n_lookup_steps++;
            s->stats.n_lookup_drafted += n_drafted;
            s->stats.n_lookup_accepted += n_accepted;
        }
        s->stats.n_steps++;
        s->stats.n_generated += n_accepted + 1;
        // Keep id_last and the accepted drafts; everything past them goes, from both contexts.
        q.n_past += 1 + n_accepted;
        const int32_t rolled = rollback_seq(s, seq, q.n_past);
        std::memcpy(q.pending_h.data(), q.verify_h.data() + (size_t) n_accepted * s->n_embd,
                    sizeof(float) * s->n_embd);
        q.id_last = next;
        q.history.insert(q.history.end(), q.draft.begin(), q.draft.begin() + n_accepted);
        q.history.push_back(next);
        q.draft.clear();
        q.draft_p.clear();
        q.draft_q.clear();
        q.draft_from_lookup = false;
        q.verify_rows = 0;
        return rolled;
    });
}

}  // extern "C"

namespace {

// Speculative sampling over one sequence's verified rows: returns the token that follows
// the k accepted drafts. Rule (Leviathan et al. 2023; Chen et al. 2023): accept draft x
// at row i with probability min(1, p_i(x) / q_i(x)); on rejection draw from
// norm(max(0, p_i - q_i)); after k = all, draw the bonus token from p_k. The output then
// has exactly plain sampling's distribution. With exact_match the target samples each row
// itself and a draft token stays only if it equals that sample.
llama_token sampled_acceptance(pmtp_spec * s, const pmtp_seq & q, int32_t & k) {
    const int32_t n_vocab = s->n_vocab;
    const int32_t n_draft = (int32_t) q.draft.size();
    for (k = 0; k <= n_draft; k++) {
        const float * logits = llama_get_logits_ith(s->tgt, q.verify_beg + k);
        pmtp::sampling_probs(logits, n_vocab, s->sampling, s->probs, s->order);
        if (k == n_draft) {
            break;  // every draft accepted: the bonus token comes from p
        }
        const llama_token x = q.draft[k];
        if (s->sampling.exact_match) {
            const llama_token t = pmtp::sample_index(s->probs, s->rng);
            if (t != x) {
                return t;
            }
            continue;
        }
        const float * q_row = q.draft_q.empty() ? nullptr : q.draft_q.data() + (size_t) k * n_vocab;
        const double q_x = q_row ? q_row[x] : 1.0;
        if (q_x > 0.0 && pmtp::uniform01(s->rng) * q_x < s->probs[x]) {
            continue;  // accepted with probability min(1, p(x) / q(x))
        }
        s->residual.resize(n_vocab);
        double mass = 0.0;
        for (int32_t j = 0; j < n_vocab; j++) {
            const float q_j = q_row ? q_row[j] : (j == x ? 1.0f : 0.0f);
            s->residual[j] = std::max(0.0f, s->probs[j] - q_j);
            mass += s->residual[j];
        }
        // p == q up to rounding leaves no residual mass: p itself is then the residual.
        return pmtp::sample_index(mass > 0.0 ? s->residual : s->probs, s->rng);
    }
    return pmtp::sample_index(s->probs, s->rng);
}

// The tokens that followed the most recent earlier occurrence of the sequence's last
// `ngram` tokens, at most max_tokens of them (empty when the n-gram never occurred).
void lookup_draft(const std::vector<llama_token> & history, int32_t ngram, int32_t max_tokens,
                  std::vector<llama_token> & out) {
    out.clear();
    const int64_t n = (int64_t) history.size();
    if (ngram <= 0 || max_tokens <= 0 || n <= ngram) {
        return;
    }
    const llama_token * key = history.data() + (n - ngram);
    for (int64_t start = n - ngram - 1; start >= 0; start--) {
        if (std::equal(key, key + ngram, history.data() + start)) {
            const int64_t from = start + ngram;
            const int64_t to = std::min(n, from + (int64_t) max_tokens);
            out.assign(history.begin() + from, history.begin() + to);
            return;
        }
    }
}

}  // namespace

extern "C" {

int32_t pmtp_spec_set_lookup(pmtp_spec * s, const pmtp_lookup_params * params) {
    if (s == nullptr || params == nullptr || params->ngram < 0 || params->ngram > 64 ||
        params->min_tokens < 1 || params->max_tokens < 0) {
        return PMTP_ERR_ARGUMENT;
    }
    s->lookup = *params;
    return PMTP_OK;
}

int32_t pmtp_spec_set_sampling(pmtp_spec * s, const pmtp_sampling_params * params) {
    if (s == nullptr || params == nullptr || !std::isfinite(params->temperature) || params->top_k < 0 ||
        !(params->top_p > 0.0f && params->top_p <= 1.0f) || !(params->min_p >= 0.0f && params->min_p < 1.0f)) {
        return PMTP_ERR_ARGUMENT;
    }
    s->sampling = *params;
    s->rng.seed(params->seed);
    return PMTP_OK;
}

int32_t pmtp_spec_step(pmtp_spec * s, int32_t n_draft, float p_min, llama_token * out_tokens,
                       int32_t * out_counts) {
    if (s == nullptr || n_draft < 0) {
        return PMTP_ERR_ARGUMENT;
    }
    return guarded([&]() -> int32_t {
        const std::vector<int32_t> n_each(s->n_seq, n_draft);
        return pmtp_spec_step_each(s, n_each.data(), p_min, out_tokens, out_counts, nullptr);
    });
}

int32_t pmtp_spec_step_each(pmtp_spec * s, const int32_t * n_draft_each, float p_min, llama_token * out_tokens,
                            int32_t * out_counts, int32_t * out_drafted) {
    if (s == nullptr || n_draft_each == nullptr || out_tokens == nullptr || out_counts == nullptr) {
        return PMTP_ERR_ARGUMENT;
    }
    for (llama_seq_id seq = 0; seq < s->n_seq; seq++) {
        if (n_draft_each[seq] < 0) {
            return PMTP_ERR_ARGUMENT;
        }
    }
    return guarded([&]() -> int32_t {
    const int32_t stride = s->n_draft_max + 1;
    std::vector<int32_t> limits(s->n_seq);
    const int32_t n_ctx = (int32_t) llama_n_ctx_seq(s->tgt);
    int32_t n_draft = 0;  // the longest MTP draft asked for
    for (llama_seq_id seq = 0; seq < s->n_seq; seq++) {
        out_counts[seq] = 0;
        if (out_drafted) {
            out_drafted[seq] = 0;
        }
        // Never draft past the end of the context: the verify batch must fit.
        limits[seq] = std::max(0, std::min({n_draft_each[seq], s->n_draft_max, n_ctx - 1 - s->seqs[seq].n_past}));
        n_draft = std::max(n_draft, limits[seq]);
    }
    // n-gram lookup first: a sequence whose last n-gram occurred before, followed by at
    // least min_tokens tokens, takes those as its draft (up to max_tokens, the context
    // permitting) and skips MTP drafting this step; the others draft with the MTP head.
    int32_t n_lookups = 0;
    if (s->lookup.ngram > 0) {
        std::vector<llama_token> found;
        for (llama_seq_id seq = 0; seq < s->n_seq; seq++) {
            pmtp_seq & q = s->seqs[seq];
            const int32_t room = n_ctx - 1 - q.n_past;
            const int32_t longest = std::min({s->lookup.max_tokens > 0 ? s->lookup.max_tokens : s->n_draft_max,
                                              s->n_draft_max, room});
            if (!q.active || longest < s->lookup.min_tokens) {
                continue;
            }
            lookup_draft(q.history, s->lookup.ngram, longest, found);
            if ((int32_t) found.size() >= s->lookup.min_tokens) {
                q.draft = found;
                q.draft_p.assign(found.size(), 1.0f);
                q.draft_q.clear();  // a point mass: min(1, p/q) = p(x), still lossless
                q.draft_from_lookup = true;
                s->stats.n_drafted += (int64_t) found.size();
                limits[seq] = -1;
                n_lookups++;
            }
        }
    }
    int32_t st = n_draft > 0 && n_lookups < s->n_seq ? pmtp_spec_draft(s, limits.data(), p_min) : PMTP_OK;
    if (st != PMTP_OK) {
        return st;
    }
    st = pmtp_spec_verify(s);
    if (st != PMTP_OK) {
        return st;
    }
    for (llama_seq_id seq = 0; seq < s->n_seq; seq++) {
        pmtp_seq & q = s->seqs[seq];
        if (!q.active || q.verify_rows <= 0) {
            continue;
        }
        int32_t k = 0;
        llama_token next;
        if (s->sampled()) {
            next = sampled_acceptance(s, q, k);
        } else {
            while (k < (int32_t) q.draft.size() && q.verify_choice[k] == q.draft[k]) {
                k++;
            }
            next = q.verify_choice[k];
        }
        llama_token * out = out_tokens + (size_t) seq * stride;
        for (int32_t i = 0; i < k; i++) {
            out[i] = q.draft[i];
        }
        out[k] = next;
        out_counts[seq] = k + 1;
        if (out_drafted) {
            out_drafted[seq] = q.draft_from_lookup ? -(int32_t) q.draft.size() - 1 : (int32_t) q.draft.size();
        }
        st = pmtp_spec_accept(s, seq, k, next);
        if (st != PMTP_OK) {
            return st;
        }
    }
    return PMTP_OK;
    });
}

int32_t pmtp_spec_seq_state(const pmtp_spec * s, llama_seq_id seq, llama_token * id_last, llama_pos * n_past) {
    if (!valid_seq(s, seq)) {
        return PMTP_ERR_ARGUMENT;
    }
    const pmtp_seq & q = s->seqs[seq];
    if (id_last) *id_last = q.id_last;
    if (n_past) *n_past = q.n_past;
    return q.active ? 1 : 0;
}

int32_t pmtp_spec_reset_seq(pmtp_spec * s, llama_seq_id seq) {
    if (!valid_seq(s, seq)) {
        return PMTP_ERR_ARGUMENT;
    }
    pmtp_seq & q = s->seqs[seq];
    llama_memory_seq_rm(llama_get_memory(s->tgt), seq, -1, -1);
    if (!s->shared_kv) {
        llama_memory_seq_rm(llama_get_memory(s->dft), seq, -1, -1);
    }
    q = pmtp_seq();
    q.pending_h.assign(s->n_embd, 0.0f);
    return PMTP_OK;
}

void pmtp_spec_get_stats(const pmtp_spec * s, pmtp_spec_stats * out) {
    if (s && out) {
        *out = s->stats;
    }
}

void pmtp_spec_reset_stats(pmtp_spec * s) {
    if (s) {
        const int32_t n_draft_max = s->stats.n_draft_max;
        s->stats = pmtp_spec_stats{};
        s->stats.n_draft_max = n_draft_max;
    }
}

}  // extern "C"
