// The one sampler: see sampler.h.

#include "sampler.h"
#include "internal.h"

#include "json.h"  // llama.cpp common/

#include <algorithm>
#include <cmath>
#include <memory>
#include <stdexcept>
#include <vector>

namespace pmtp {
namespace {

// Dense probabilities over the vocabulary from the candidates a chain left (their logits
// are already scaled by temperature): softmax, zeros elsewhere.
void dense_probs(const llama_token_data_array & cand, int32_t n_vocab, std::vector<float> & probs) {
    probs.assign(n_vocab, 0.0f);
    float max_logit = -INFINITY;
    for (size_t i = 0; i < cand.size; i++) {
        max_logit = std::max(max_logit, cand.data[i].logit);
    }
    if (!std::isfinite(max_logit)) {
        // Nothing survived (a grammar that allows no token): the drawn token gets it all.
        if (cand.selected >= 0) {
            probs[cand.data[cand.selected].id] = 1.0f;
        }
        return;
    }
    double sum = 0.0;
    for (size_t i = 0; i < cand.size; i++) {
        sum += std::exp((double) cand.data[i].logit - max_logit);
    }
    for (size_t i = 0; i < cand.size; i++) {
        probs[cand.data[i].id] = (float) (std::exp((double) cand.data[i].logit - max_logit) / sum);
    }
}

common_grammar_type grammar_type_from_name(const std::string & name) {
    if (name == "output_format") {
        return COMMON_GRAMMAR_TYPE_OUTPUT_FORMAT;
    }
    if (name == "tool_calls") {
        return COMMON_GRAMMAR_TYPE_TOOL_CALLS;
    }
    return COMMON_GRAMMAR_TYPE_USER;
}

// common_params_sampling for our chain, constrained as `constraint` (JSON, may be empty) says.
common_params_sampling chain_params(const pmtp_sampling_params & params, const common_json & constraint,
                                    bool with_grammar) {
    common_params_sampling out;
    out.seed = params.seed;
    out.temp = params.temperature;
    out.top_k = params.top_k;
    out.top_p = params.top_p;
    out.min_p = params.min_p;
    out.min_keep = 1;
    out.no_perf = true;
    out.samplers = {COMMON_SAMPLER_TYPE_TOP_K, COMMON_SAMPLER_TYPE_TOP_P, COMMON_SAMPLER_TYPE_MIN_P,
                    COMMON_SAMPLER_TYPE_TEMPERATURE};
    if (!with_grammar || !constraint.is_object()) {
        return out;
    }
    const std::string grammar = constraint.contains("grammar") ? constraint.at("grammar").get<std::string>() : "";
    if (grammar.empty()) {
        return out;
    }
    const std::string kind = constraint.contains("grammar_type") ? constraint.at("grammar_type").get<std::string>() : "user";
    out.grammar = common_grammar(grammar_type_from_name(kind), grammar);
    out.grammar_lazy = constraint.contains("grammar_lazy") && constraint.at("grammar_lazy").get<bool>();
    if (constraint.contains("grammar_triggers")) {
        const common_json & triggers = constraint.at("grammar_triggers");
        for (size_t i = 0; i < triggers.size(); i++) {
            const common_json & t = triggers.at(i);
            common_grammar_trigger trigger;
            trigger.type = (common_grammar_trigger_type) t.at("type").get<int>();
            trigger.value = t.at("value").get<std::string>();
            if (t.contains("token")) {
                trigger.token = t.at("token").get<int>();
            }
            out.grammar_triggers.push_back(trigger);
        }
    }
    if (constraint.contains("generation_prompt")) {
        out.generation_prompt = constraint.at("generation_prompt").get<std::string>();
    }
    return out;
}

}  // namespace

llama_token sample_target(pmtp_sampler & smp, llama_context * ctx, int32_t idx, std::vector<float> * probs) {
    const llama_token id = common_sampler_sample(smp.target.get(), ctx, idx, /* grammar_first */ true);
    const llama_token_data_array * chosen = common_sampler_get_candidates(smp.target.get(), false);
    if (chosen->selected < 0 || chosen->data[chosen->selected].logit == -INFINITY) {
        // The grammar allows none of the model's tokens here. Accepting the token anyway
        // aborts the process in llama.cpp when it is an end-of-generation token.
        throw std::invalid_argument("the grammar allows none of the model's tokens at this point");
    }
    if (smp.greedy() && probs == nullptr) {
        return id;
    }
    std::vector<float> & dense = probs != nullptr ? *probs : smp.p;
    dense_probs(*common_sampler_get_candidates(smp.target.get(), false), smp.n_vocab, dense);
    // Drawn in token-id order, not the chain's sorted order: logits that move a little
    // (another batch shape) move the draw's boundaries a little, instead of reordering
    // near-equal tokens under it. A seeded request then gives the same answer alone or
    // in a server's shared batches.
    return smp.greedy() ? id : sample_index(dense, smp.rng);
}

llama_token sample_draft(pmtp_sampler & smp, const float * logits, std::vector<float> & q) {
    smp.cur.resize(smp.n_vocab);
    for (llama_token id = 0; id < smp.n_vocab; id++) {
        smp.cur[id] = llama_token_data{id, logits[id], 0.0f};
    }
    llama_token_data_array cand = {smp.cur.data(), smp.cur.size(), -1, false};
    llama_sampler_apply(common_sampler_get(smp.draft.get()), &cand);
    dense_probs(cand, smp.n_vocab, q);
    if (!smp.greedy()) {
        return sample_index(q, smp.rng);  // token-id order, as above
    }
    return cand.selected >= 0 ? cand.data[cand.selected].id : 0;
}

void accept(pmtp_sampler & smp, llama_token token) {
    common_sampler_accept(smp.target.get(), token, /* is_generated */ true);
}

double uniform01(std::mt19937_64 & rng) {
    return std::uniform_real_distribution<double>(0.0, 1.0)(rng);
}

int32_t sample_index(const std::vector<float> & probs, std::mt19937_64 & rng) {
    double total = 0.0;
    for (float p : probs) {
        total += p;
    }
    const double target = uniform01(rng) * total;
    double cumulative = 0.0;
    int32_t last_nonzero = 0;
    for (size_t i = 0; i < probs.size(); i++) {
        if (probs[i] > 0.0f) {
            cumulative += probs[i];
            last_nonzero = (int32_t) i;
            if (target < cumulative) {
                return (int32_t) i;
            }
        }
    }
    return last_nonzero;  // rounding at the very end of the range
}

}  // namespace pmtp

extern "C" {

int32_t pmtp_sampler_new(const llama_model * model, const pmtp_sampling_params * params, const char * constraint_json,
                         pmtp_sampler ** out, char ** error) {
    if (out == nullptr) {
        return PMTP_ERR_ARGUMENT;
    }
    *out = nullptr;
    if (model == nullptr || params == nullptr || !std::isfinite(params->temperature) || params->top_k < 0 ||
        !(params->top_p > 0.0f && params->top_p <= 1.0f) || !(params->min_p >= 0.0f && params->min_p < 1.0f)) {
        return pmtp::fail(error, PMTP_ERR_ARGUMENT, "invalid sampling parameters");
    }
    return pmtp::on_own_stack(pmtp::compile_stack_bytes, [&] { return pmtp::guarded([&] {
        const common_json constraint = constraint_json != nullptr && constraint_json[0] != '\0'
            ? common_json::parse(constraint_json) : common_json();
        auto smp = std::make_unique<pmtp_sampler>();
        smp->params = *params;
        smp->n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
        smp->rng.seed(params->seed);
        common_params_sampling target = pmtp::chain_params(*params, constraint, true);
        common_params_sampling draft = pmtp::chain_params(*params, constraint, false);
        smp->target.reset(common_sampler_init(model, target));
        smp->draft.reset(common_sampler_init(model, draft));
        if (!smp->target || !smp->draft) {
            return pmtp::fail(error, PMTP_ERR_ARGUMENT, "llama.cpp could not build the sampler");
        }
        *out = smp.release();
        return (int32_t) PMTP_OK;
    }, error, PMTP_ERR_ARGUMENT); });  // a grammar or JSON that does not parse
}

void pmtp_sampler_free(pmtp_sampler * sampler) {
    delete sampler;
}

int32_t pmtp_sampler_sample(pmtp_sampler * sampler, llama_context * ctx, int32_t idx, llama_token * out) {
    if (sampler == nullptr || ctx == nullptr || out == nullptr ||
        sampler->n_vocab != llama_vocab_n_tokens(llama_model_get_vocab(llama_get_model(ctx)))) {
        return PMTP_ERR_ARGUMENT;  // a sampler made for another model's vocabulary
    }
    return pmtp::guarded([&] {
        const float * logits = llama_get_logits_ith(ctx, idx);
        if (logits == nullptr) {
            return (int32_t) PMTP_ERR_ARGUMENT;
        }
        if (!pmtp::all_finite(logits, sampler->n_vocab)) {
            return (int32_t) PMTP_ERR_NONFINITE;  // NaN / Inf: no choice would mean anything
        }
        try {
            *out = pmtp::sample_target(*sampler, ctx, idx, nullptr);
        } catch (const std::invalid_argument &) {
            return (int32_t) PMTP_ERR_GRAMMAR;
        }
        pmtp::accept(*sampler, *out);
        return (int32_t) PMTP_OK;
    });
}

int32_t pmtp_grammar_trial(const llama_model * model, const char * gbnf, int32_t n_steps, uint32_t seed,
                           int32_t from_start, char ** error) {
    if (model == nullptr || gbnf == nullptr || n_steps < 0) {
        return PMTP_ERR_ARGUMENT;
    }
    const llama_vocab * vocab = llama_model_get_vocab(model);
    return pmtp::on_own_stack(pmtp::compile_stack_bytes, [&] { return pmtp::guarded([&] {
        std::unique_ptr<llama_sampler, decltype(&llama_sampler_free)> grammar(
            llama_sampler_init_grammar(vocab, gbnf, "root"), &llama_sampler_free);
        if (!grammar) {
            return pmtp::fail(error, PMTP_ERR_ARGUMENT, "llama.cpp could not parse the grammar");
        }
        const int32_t n_vocab = llama_vocab_n_tokens(vocab);
        std::vector<llama_token_data> cur(n_vocab);
        std::mt19937 rng(seed);
        std::uniform_real_distribution<float> logit(0.0f, 1.0f);
        for (int32_t step = 0; step < n_steps; step++) {
            for (llama_token id = 0; id < n_vocab; id++) {
                cur[id] = llama_token_data{id, logit(rng), 0.0f};
            }
            llama_token_data_array cand = {cur.data(), cur.size(), -1, false};
            llama_sampler_apply(grammar.get(), &cand);
            llama_token best = -1;
            for (size_t i = 0; i < cand.size; i++) {
                if (cand.data[i].logit != -INFINITY && (best < 0 || cand.data[i].logit > cur[best].logit)) {
                    best = cand.data[i].id;
                }
            }
            if (best < 0 && step == 0 && from_start) {
                return pmtp::fail(error, PMTP_ERR_ARGUMENT, "the grammar allows none of the model's tokens at its start");
            }
            if (best < 0 || llama_vocab_is_eog(vocab, best)) {
                break;  // no way on (a clean error when generating) or done
            }
            llama_sampler_accept(grammar.get(), best);
        }
        return (int32_t) PMTP_OK;
    }, error, PMTP_ERR_ARGUMENT); });
}

void pmtp_sampler_reset(pmtp_sampler * sampler) {
    if (sampler != nullptr) {
        common_sampler_reset(sampler->target.get());
        sampler->rng.seed(sampler->params.seed);
    }
}

}  // extern "C"
