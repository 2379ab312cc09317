// The one sampler of pyllama_mtp (internal to the shim): llama.cpp's common_sampler with
// our chain (top-k, top-p, min-p, temperature, then a seeded draw), optionally constrained
// by a grammar. Plain decoding (pmtp_sampler_sample) and the speculative step use the same
// object, so both draw from one distribution by construction.
#pragma once

#include "pyllama_mtp.h"

#include "sampling.h"  // llama.cpp common/

#include <random>
#include <vector>

struct pmtp_sampler {
    common_sampler_ptr target;  // grammar (if any) + chain: the target's choices
    common_sampler_ptr draft;   // the same chain, never a grammar: q for sampled MTP drafts
    pmtp_sampling_params params = {};
    int32_t n_vocab = 0;
    std::mt19937_64 rng;        // acceptance tests and residual draws
    std::vector<llama_token_data> cur;
    std::vector<float> p, residual;

    bool greedy() const { return params.temperature <= 0.0f; }
};

namespace pmtp {

// Sample the target's row `idx` of ctx (grammar first); probs (may be null) receives the
// whole constrained distribution the token was drawn from. Does not accept the token.
// Throws std::invalid_argument where the grammar allows none of the model's tokens.
llama_token sample_target(pmtp_sampler & smp, llama_context * ctx, int32_t idx, std::vector<float> * probs);
// Draw a draft token from raw logits through the chain alone; q receives its distribution.
llama_token sample_draft(pmtp_sampler & smp, const float * logits, std::vector<float> & q);
// Advance the grammar (and the chain's history) over a token that is now part of the output.
void accept(pmtp_sampler & smp, llama_token token);

// Draw an index from probabilities that sum to ~1.
int32_t sample_index(const std::vector<float> & probs, std::mt19937_64 & rng);
// Uniform draw in [0, 1).
double uniform01(std::mt19937_64 & rng);

}  // namespace pmtp
