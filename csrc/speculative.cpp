// The MTP speculative step's C API: each exported function checks its arguments and
// catches C++ exceptions once, then runs the core (spec_core.cpp, spec_step.cpp) with
// the head layout of the model (spec_heads.cpp).
//
// Why our own loop instead of wrapping common/speculative.cpp: upstream's driver hides
// the draft distribution (needed for lossless sampling at T > 0 and for per-position
// statistics) and drives one policy. The upstream pieces we mirror are the pairing rule (the MTP head at
// position p sees the target's nextn hidden row of p-1 and the token at p) and the
// three head layouts (single head: qwen35; chained heads: step35; shared KV: gemma4).

#include "pyllama_mtp.h"
#include "spec_internal.h"
#include "internal.h"
#include "sampler.h"

#include <algorithm>
#include <cmath>
#include <exception>
#include <new>

namespace {

using pmtp::guarded;

bool valid_seq(const pmtp_spec * s, llama_seq_id seq) {
    return s != nullptr && seq >= 0 && seq < s->n_seq;
}

// Every token id from a caller is checked here: llama.cpp indexes its vocabulary with it.
bool valid_tokens(const pmtp_spec * s, const llama_token * tokens, int32_t n) {
    return std::all_of(tokens, tokens + n, [s](llama_token t) { return t >= 0 && t < s->n_vocab; });
}

}  // namespace

extern "C" {

pmtp_spec * pmtp_spec_new(llama_context * tgt, llama_context * dft, int32_t n_seq, int32_t n_draft_max,
                          int32_t * status) {
    int32_t ignored = PMTP_OK;
    if (status == nullptr) {
        status = &ignored;
    }
    *status = PMTP_OK;
    if (tgt == nullptr || dft == nullptr || n_seq <= 0 || n_draft_max <= 0 || n_draft_max > PMTP_MAX_DRAFT ||
        (uint32_t) n_seq > llama_n_seq_max(tgt) || (uint32_t) n_seq > llama_n_seq_max(dft) ||
        tgt == dft || llama_get_model(tgt) != llama_get_model(dft)) {
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
        s->heads = pmtp::make_head_layout(tgt, dft, std::max(1, (int) llama_model_n_layer_nextn(model)));
        s->n_draft_max = s->heads->max_draft(n_draft_max);
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
    if (!valid_seq(s, seq) || tokens == nullptr || n <= 0 || !valid_tokens(s, tokens, n)) {
        return PMTP_ERR_ARGUMENT;
    }
    return guarded([&] { return pmtp::spec::prefill(*s, seq, tokens, n); });
}

int32_t pmtp_spec_draft(pmtp_spec * s, const int32_t * n_max, float p_min) {
    if (s == nullptr || n_max == nullptr) {
        return PMTP_ERR_ARGUMENT;
    }
    return guarded([&] { return pmtp::spec::draft(*s, n_max, p_min); });
}

int32_t pmtp_spec_set_draft(pmtp_spec * s, llama_seq_id seq, const llama_token * tokens, int32_t n) {
    // Longer than n_draft_max would overrun the caller's (n_draft_max + 1)-token rows.
    if (!valid_seq(s, seq) || n < 0 || n > s->n_draft_max || (n > 0 && tokens == nullptr) ||
        !s->seqs[seq].active || (n > 0 && !valid_tokens(s, tokens, n))) {
        return PMTP_ERR_ARGUMENT;
    }
    return guarded([&]() -> int32_t {
        pmtp_seq & q = s->seqs[seq];
        q.clear_draft();
        q.draft.assign(tokens, tokens + n);
        q.draft_p.assign(n, 1.0f);  // a given draft is certain: q is a point mass
        return PMTP_OK;
    });
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
    return guarded([&] { return pmtp::spec::verify(*s); });
}

int32_t pmtp_spec_verify_row(const pmtp_spec * s, llama_seq_id seq, int32_t row) {
    if (!valid_seq(s, seq) || row < 0 || row >= s->seqs[seq].verify_rows) {
        return PMTP_ERR_ARGUMENT;
    }
    return s->seqs[seq].verify_beg + row;
}

int32_t pmtp_spec_failure(const pmtp_spec * s, llama_seq_id seq, llama_pos * pos) {
    if (!valid_seq(s, seq) || pos == nullptr) {
        return PMTP_ERR_ARGUMENT;
    }
    *pos = s->seqs[seq].failed_at;
    return s->seqs[seq].failure;
}

int32_t pmtp_spec_rebuild(pmtp_spec * s) {
    if (s == nullptr) {
        return PMTP_ERR_ARGUMENT;
    }
    return guarded([&] { return pmtp::spec::rebuild(*s); });
}

int32_t pmtp_spec_target_choices(const pmtp_spec * s, llama_seq_id seq, llama_token * out, int32_t capacity) {
    if (!valid_seq(s, seq) || capacity < 0 || (capacity > 0 && out == nullptr)) {
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
    const pmtp_seq & q = s->seqs[seq];
    if (!q.active || q.verify_rows <= 0 || n_accepted < 0 || n_accepted >= q.verify_rows ||
        next < 0 || next >= s->n_vocab) {
        return PMTP_ERR_ARGUMENT;
    }
    return guarded([&] { return pmtp::spec::accept(*s, seq, n_accepted, next); });
}

int32_t pmtp_spec_set_lookup(pmtp_spec * s, const pmtp_lookup_params * params) {
    if (s == nullptr || params == nullptr || params->ngram < 0 || params->ngram > 64 ||
        params->min_tokens < 1 || params->max_tokens < 0) {
        return PMTP_ERR_ARGUMENT;
    }
    s->lookup = *params;
    return PMTP_OK;
}

int32_t pmtp_spec_set_catch_up_from(pmtp_spec * s, llama_seq_id seq, llama_pos pos) {
    if (!valid_seq(s, seq) || pos < -1) {
        return PMTP_ERR_ARGUMENT;
    }
    s->seqs[seq].catch_up_from = pos;
    return PMTP_OK;
}

int32_t pmtp_spec_truncate(pmtp_spec * s, llama_seq_id seq, int32_t n_keep) {
    if (!valid_seq(s, seq) || !s->seqs[seq].active || n_keep < 2 || n_keep > s->seqs[seq].n_past) {
        return PMTP_ERR_ARGUMENT;
    }
    return guarded([&] { return pmtp::spec::truncate(*s, seq, n_keep); });
}

int32_t pmtp_spec_set_sampler(pmtp_spec * s, llama_seq_id seq, pmtp_sampler * sampler) {
    if (!valid_seq(s, seq) || (sampler != nullptr && sampler->n_vocab != s->n_vocab)) {
        return PMTP_ERR_ARGUMENT;
    }
    s->seqs[seq].sampler = sampler;
    return PMTP_OK;
}

int32_t pmtp_spec_step_each(pmtp_spec * s, const int32_t * n_draft_each, float p_min, llama_token * out_tokens,
                            int32_t * out_counts, int32_t * out_drafted) {
    if (s == nullptr || n_draft_each == nullptr || out_tokens == nullptr || out_counts == nullptr ||
        std::any_of(n_draft_each, n_draft_each + s->n_seq, [](int32_t n) { return n < PMTP_DRAFT_REST; })) {
        return PMTP_ERR_ARGUMENT;
    }
    return guarded([&] { return pmtp::spec::step_each(*s, n_draft_each, p_min, out_tokens, out_counts, out_drafted); });
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
    return guarded([&] {
        pmtp::spec::reset(*s, seq);
        return (int32_t) PMTP_OK;
    });
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
