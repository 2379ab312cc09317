// Sampling distributions for the speculative loop (internal to the shim).
#pragma once

#include "pyllama_mtp.h"

#include <random>
#include <vector>

namespace pmtp {

// Probabilities over the whole vocabulary (zeros outside the kept set) in the order of
// llama.cpp's sampler chain as pyllama_mtp builds it: top-k, top-p and min-p on the raw
// logits, then temperature, then softmax. Plain sampling draws from this same
// distribution, which is what makes speculative sampling lossless.
void sampling_probs(const float * logits, int32_t n_vocab, const pmtp_sampling_params & params,
                    std::vector<float> & probs, std::vector<int32_t> & scratch);

// Draw an index from probabilities that sum to ~1.
int32_t sample_index(const std::vector<float> & probs, std::mt19937_64 & rng);

// Uniform draw in [0, 1).
double uniform01(std::mt19937_64 & rng);

}  // namespace pmtp
