// One whole speculative step for every active sequence: n-gram lookup or MTP drafts,
// one verify batch, then the acceptance rule (greedy, speculative sampling or exact
// match) and the rollback of what was rejected.

#include "spec_internal.h"
#include "sampler.h"

#include <algorithm>
#include <stdexcept>

namespace pmtp::spec {
namespace {

// The target's verdict on one sequence's verified rows through its sampler: returns the
// token that follows the k accepted drafts. Each row is read with the sampler's grammar
// (if any) in the state after the tokens accepted so far, and every token that becomes
// output is accepted into it, so the grammar never sees a rejected draft.
// Greedy or exact_match: the target's own choice at each row, a draft stays while it
// equals it. Speculative sampling (Leviathan et al. 2023; Chen et al. 2023): accept draft
// x at row i with probability min(1, p_i(x) / q_i(x)); on rejection draw from
// norm(max(0, p_i - q_i)); after k = all, the bonus token comes from p_k. The output then
// has exactly plain sampling's distribution, p being the constrained one.
llama_token sampler_acceptance(pmtp_spec & s, const pmtp_seq & q, int32_t & k) {
    pmtp_sampler & smp = *q.sampler;
    const int32_t n_vocab = s.n_vocab;
    const int32_t n_draft = (int32_t) q.draft.size();
    const bool rule_sampling = !smp.greedy() && !smp.params.exact_match;
    for (k = 0;; k++) {
        if (q.verify_choice[k] < 0) {
            return PMTP_ERR_NONFINITE;  // NaN / Inf in the row to choose from (negative: no token)
        }
        llama_token t;
        try {
            t = pmtp::sample_target(smp, s.tgt, q.verify_beg + k, rule_sampling ? &smp.p : nullptr);
        } catch (const std::invalid_argument &) {
            return PMTP_ERR_GRAMMAR;  // its grammar allows no token: this sequence cannot go on
        }
        const llama_token x = k < n_draft ? q.draft[k] : -1;
        llama_token chosen = t;
        if (k < n_draft && rule_sampling) {
            const float * q_row = q.draft_q.empty() ? nullptr : q.draft_q.data() + (size_t) k * n_vocab;
            const double q_x = q_row ? q_row[x] : 1.0;
            if (q_x > 0.0 && pmtp::uniform01(smp.rng) * q_x < smp.p[x]) {
                chosen = x;  // accepted with probability min(1, p(x) / q(x))
            } else {
                smp.residual.resize(n_vocab);
                double mass = 0.0;
                for (int32_t j = 0; j < n_vocab; j++) {
                    const float q_j = q_row ? q_row[j] : (j == x ? 1.0f : 0.0f);
                    smp.residual[j] = std::max(0.0f, smp.p[j] - q_j);
                    mass += smp.residual[j];
                }
                // p == q up to rounding leaves no residual mass: p itself is then the residual.
                chosen = pmtp::sample_index(mass > 0.0 ? smp.residual : smp.p, smp.rng);
            }
        }
        pmtp::accept(smp, chosen);
        // An end-of-generation token ends the step: nothing after it is output.
        if (k == n_draft || chosen != x || llama_vocab_is_eog(s.vocab, chosen)) {
            return chosen;
        }
    }
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

// A sequence whose last n-gram occurred before, followed by at least min_tokens tokens,
// takes those as its draft (up to max_tokens, the context permitting) and skips MTP
// drafting this step (limits[seq] = -1). Returns how many sequences did.
int32_t lookup_drafts(pmtp_spec & s, int32_t n_ctx, std::vector<int32_t> & limits) {
    int32_t n_lookups = 0;
    std::vector<llama_token> found;
    for (llama_seq_id seq = 0; seq < s.n_seq; seq++) {
        pmtp_seq & q = s.seqs[seq];
        const int32_t room = n_ctx - 1 - q.n_past;
        const int32_t longest = std::min({s.lookup.max_tokens > 0 ? s.lookup.max_tokens : s.n_draft_max,
                                          s.n_draft_max, room});
        if (!q.active || q.parked || longest < s.lookup.min_tokens) {
            continue;
        }
        lookup_draft(q.history, s.lookup.ngram, longest, found);
        if ((int32_t) found.size() >= s.lookup.min_tokens) {
            q.draft = found;
            q.draft_p.assign(found.size(), 1.0f);
            q.draft_q.clear();  // a point mass: min(1, p/q) = p(x), still lossless
            q.draft_from_lookup = true;
            s.stats.n_drafted += (int64_t) found.size();
            limits[seq] = -1;
            n_lookups++;
        }
    }
    return n_lookups;
}

}  // namespace

int32_t step_each(pmtp_spec & s, const int32_t * n_draft_each, float p_min, llama_token * out_tokens,
                  int32_t * out_counts, int32_t * out_drafted) {
    const int32_t stride = s.n_draft_max + 1;
    std::vector<int32_t> limits(s.n_seq);
    s.resting.assign(s.n_seq, 0);
    // Resting applies to this step's catch-up only (never to a later prefill).
    struct end_rest {
        std::vector<char> & resting;
        ~end_rest() { resting.clear(); }
    } rest_guard{s.resting};
    const int32_t n_ctx = (int32_t) llama_n_ctx_seq(s.tgt);
    int32_t n_draft = 0;  // the longest MTP draft asked for
    for (llama_seq_id seq = 0; seq < s.n_seq; seq++) {
        s.seqs[seq].failure = 0;
        out_counts[seq] = 0;
        if (out_drafted) {
            out_drafted[seq] = 0;
        }
        s.resting[seq] = n_draft_each[seq] == PMTP_DRAFT_REST;
        // Never draft past the end of the context: the verify batch must fit.
        limits[seq] = std::max(0, std::min({n_draft_each[seq], s.n_draft_max, n_ctx - 1 - s.seqs[seq].n_past}));
        n_draft = std::max(n_draft, limits[seq]);
    }
    const int32_t n_lookups = s.lookup.ngram > 0 ? lookup_drafts(s, n_ctx, limits) : 0;
    int32_t st = n_draft > 0 && n_lookups < s.n_seq ? draft(s, limits.data(), p_min) : PMTP_OK;
    if (st != PMTP_OK) {
        return st;
    }
    st = verify(s);
    if (st != PMTP_OK) {
        return st;
    }
    bool failed = false;
    for (llama_seq_id seq = 0; seq < s.n_seq; seq++) {
        pmtp_seq & q = s.seqs[seq];
        if (!q.active || q.verify_rows <= 0) {
            continue;
        }
        int32_t k = 0;
        llama_token next;
        if (q.sampler != nullptr) {
            next = sampler_acceptance(s, q, k);
        } else {
            while (k < (int32_t) q.draft.size() && q.verify_choice[k] == q.draft[k]) {
                k++;  // a NaN row's -1 never equals a draft: it is where acceptance stops
            }
            next = q.verify_choice[k] < 0 ? PMTP_ERR_NONFINITE : q.verify_choice[k];
        }
        if (next < 0) {
            // Nothing of this step is kept for the sequence; the others go on.
            q.failure = next;
            q.failed_at = q.n_past + k;
            st = rollback(s, seq, q.n_past);
            q.verify_rows = 0;
            q.verify_choice.clear();
            q.clear_draft();
            failed = true;
            if (st != PMTP_OK) {
                return st;
            }
            continue;
        }
        llama_token * out = out_tokens + (size_t) seq * stride;
        std::copy(q.draft.begin(), q.draft.begin() + k, out);
        out[k] = next;
        out_counts[seq] = k + 1;
        if (out_drafted) {
            out_drafted[seq] = q.draft_from_lookup ? -(int32_t) q.draft.size() - 1 : (int32_t) q.draft.size();
        }
        st = accept(s, seq, k, next);
        if (st != PMTP_OK) {
            return st;
        }
    }
    return failed ? PMTP_ERR_SEQUENCE : PMTP_OK;
}

namespace {

// Forget every sequence and clear both memories, data included: a freed cell's NaN would
// survive llama.cpp's re-initialisation (a scale by zero).
void clear_all(pmtp_spec & s) {
    for (llama_seq_id seq = 0; seq < s.n_seq; seq++) {
        reset(s, seq);
    }
    llama_memory_clear(llama_get_memory(s.tgt), true);
    if (s.heads->own_memory()) {
        llama_memory_clear(llama_get_memory(s.dft), true);
    }
}

}  // namespace

int32_t rebuild(pmtp_spec & s) {
    std::vector<std::vector<llama_token>> keep(s.n_seq), queued(s.n_seq);
    std::vector<char> ready(s.n_seq, 0);
    std::vector<llama_pos> at(s.n_seq, -1);
    std::vector<int32_t> kind(s.n_seq, 0);
    for (llama_seq_id seq = 0; seq < s.n_seq; seq++) {
        if (!s.seqs[seq].queued.empty()) {  // a prompt being fed: queued again, whole
            queued[seq] = s.seqs[seq].history;
            queued[seq].insert(queued[seq].end(), s.seqs[seq].queued.begin(), s.seqs[seq].queued.end());
            ready[seq] = s.seqs[seq].queued_ready;
        }
        if (s.seqs[seq].active && !s.seqs[seq].parked) {  // a parked one is a cache: dropped
            keep[seq] = s.seqs[seq].history;  // its pending token last
        }
        at[seq] = s.seqs[seq].failure != 0 ? s.seqs[seq].failed_at : -1;
        kind[seq] = s.seqs[seq].failure;
    }
    std::vector<char> source(s.n_seq, 0);
    bool found = false;
    for (llama_seq_id seq = 0; seq < s.n_seq; seq++) {
        if (kind[seq] != PMTP_ERR_NONFINITE || keep[seq].empty()) {
            continue;
        }
        clear_all(s);  // alone: nothing of another sequence can reach it
        int32_t st = prefill(s, seq, keep[seq].data(), (int32_t) keep[seq].size());
        st = st == PMTP_OK ? verify(s) : st;
        if (st != PMTP_OK) {
            return st;
        }
        const std::vector<llama_token> & choice = s.seqs[seq].verify_choice;
        source[seq] = choice.empty() || choice[0] < 0;
        found = found || source[seq];
    }
    clear_all(s);
    for (llama_seq_id seq = 0; seq < s.n_seq; seq++) {
        // No source alone: the NaN needs several together; failing them all ends the loop.
        // A grammar's dead end is its own sequence's: it goes too.
        if (kind[seq] == PMTP_ERR_GRAMMAR || (kind[seq] == PMTP_ERR_NONFINITE && (source[seq] || !found))) {
            s.seqs[seq].failure = kind[seq];
            s.seqs[seq].failed_at = at[seq];
            continue;
        }
        if (!keep[seq].empty()) {
            const int32_t st = prefill(s, seq, keep[seq].data(), (int32_t) keep[seq].size());
            if (st != PMTP_OK) {
                return st;
            }
        } else if (!queued[seq].empty()) {
            enqueue(s, seq, queued[seq].data(), (int32_t) queued[seq].size(), ready[seq] != 0);
        }
    }
    return PMTP_OK;
}

}  // namespace pmtp::spec
