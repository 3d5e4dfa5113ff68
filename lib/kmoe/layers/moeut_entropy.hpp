// MoEUT's deferred entropy regulariser (moeut.py entropy_reg with SigmaMoE.get_reg_loss and
// SwitchHeadCore.get_reg_loss; seeds-spec §2.4, §2.7). A shared layer is called R times per
// forward (once per repeat of its group); the router logits of all calls, each [B, T, G, E]
// (G = heads for attention, 1 for the feed-forward), are stacked over time × repeats and
//     reg = (1 / (B·G)) Σ_{b,g} Σ_e p̄_{b,g,e} log p̄_{b,g,e},   p̄_{b,g} = mean over the R·T rows of softmax_E(z),
// the negative entropy of each sequence's (and head's) mean routing distribution, computed in
// log space (log_softmax, logsumexp over rows − log(R·T)) as the original.
#pragma once

#include "kmoe/core/tensor.hpp"

#include <vector>

namespace kmoe::layers {

template <class T>
struct EntropyRegForward {
  T value = T(0);
  // Saved for backward.
  index_t calls = 0, batch = 0, length = 0, groups = 0, experts = 0;
  Tensor<T> log_probs;  // [B, R·T, G·E] log_softmax over E of the stacked logits
  Tensor<T> row_lse;    // [B, G·E] logsumexp over the R·T rows
};

// logits: the R ≥ 1 calls' router logits, each [B, T, G, E] (all the same shape). Throws
// Status::invalid_argument for no calls, Status::shape_mismatch for differing shapes.
template <class T>
EntropyRegForward<T> entropy_reg_forward(const std::vector<Tensor<T>>& logits);

// The gradients of coef · reg with respect to each call's logits, [B, T, G, E] each, in call order.
template <class T>
std::vector<Tensor<T>> entropy_reg_backward(const EntropyRegForward<T>& forward, T coef);

extern template EntropyRegForward<float> entropy_reg_forward<float>(const std::vector<Tensor<float>>&);
extern template EntropyRegForward<double> entropy_reg_forward<double>(const std::vector<Tensor<double>>&);
extern template std::vector<Tensor<float>> entropy_reg_backward<float>(const EntropyRegForward<float>&, float);
extern template std::vector<Tensor<double>> entropy_reg_backward<double>(const EntropyRegForward<double>&, double);

}  // namespace kmoe::layers
