// Sampling distributions for the speculative loop: see sampling.h.

#include "sampling.h"

#include <algorithm>
#include <cmath>
#include <numeric>

namespace pmtp {

void sampling_probs(const float * logits, int32_t n_vocab, const pmtp_sampling_params & params,
                    std::vector<float> & probs, std::vector<int32_t> & kept) {
    kept.resize(n_vocab);
    std::iota(kept.begin(), kept.end(), 0);
    auto by_logit = [logits](int32_t a, int32_t b) { return logits[a] > logits[b]; };
    size_t n_kept = kept.size();
    if (params.top_k > 0 && (size_t) params.top_k < n_kept) {
        std::nth_element(kept.begin(), kept.begin() + params.top_k, kept.end(), by_logit);
        n_kept = params.top_k;
    }
    const bool need_order = params.top_p < 1.0f;
    if (need_order) {
        std::sort(kept.begin(), kept.begin() + n_kept, by_logit);
    }
    float max_logit = logits[kept[0]];
    for (size_t i = 0; i < n_kept; i++) {
        max_logit = std::max(max_logit, logits[kept[i]]);
    }
    if (need_order) {
        // Smallest prefix (by probability) whose mass reaches top_p, at least one token.
        double total = 0.0;
        for (size_t i = 0; i < n_kept; i++) {
            total += std::exp((double) logits[kept[i]] - max_logit);
        }
        double cumulative = 0.0;
        size_t last = n_kept;
        for (size_t i = 0; i < n_kept; i++) {
            cumulative += std::exp((double) logits[kept[i]] - max_logit) / total;
            if (cumulative >= params.top_p) {
                last = i + 1;
                break;
            }
        }
        n_kept = std::max<size_t>(1, last);
    }
    if (params.min_p > 0.0f) {
        // p >= min_p * p_max  <=>  logit >= max_logit + log(min_p)
        const float floor_logit = max_logit + std::log(params.min_p);
        const auto end = std::partition(kept.begin(), kept.begin() + n_kept,
                                        [&](int32_t id) { return logits[id] >= floor_logit; });
        n_kept = std::max<size_t>(1, end - kept.begin());
    }
    probs.assign(n_vocab, 0.0f);
    double sum = 0.0;
    const double inv_temp = 1.0 / params.temperature;
    for (size_t i = 0; i < n_kept; i++) {
        const double e = std::exp(((double) logits[kept[i]] - max_logit) * inv_temp);
        probs[kept[i]] = (float) e;
        sum += e;
    }
    for (size_t i = 0; i < n_kept; i++) {
        probs[kept[i]] = (float) (probs[kept[i]] / sum);
    }
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
