// The routers' entropy regulariser of σ-MoE and MoEUT: the negative entropy of mean routing
// distributions (RobertCsordas/moe_layer@c9b9c01c7071fe5c39d1f91ae6f24911fb75adb0
// triton_src/moe_layer/moe_layer_simple.py, entropy_reg / log_mean / entropy_l;
// RobertCsordas/moeut@87f04973d3db3ad7cb4ca67a0750241e40210d3c moeut/moeut.py,
// SigmaMoE.get_reg_loss and SwitchHeadCore.get_reg_loss), in log space as the originals compute
// it (log_softmax, logsumexp over rows − log(rows)). A router called R times (MoEUT: once per
// repeat of a shared layer's group) gives R logits tensors, each [B, T, G, E] (G = heads for
// SwitchHead, 1 otherwise); they are stacked over time × calls and
//     reg = (1 / (B·G)) Σ_{b,g} Σ_e p̄_{b,g,e} log p̄_{b,g,e},   p̄_{b,g} = mean over the R·T rows of softmax_E(z).
// σ-MoE's regulariser over all tokens of a batch is the case B = R = G = 1.
#pragma once

#include "kmoe/core/tensor.hpp"
#include "kmoe/dist/communicator.hpp"

#include <vector>

namespace kmoe::moe {

template <class T>
struct EntropyRegForward {
  T value = T(0);
  // Saved for backward.
  index_t calls = 0, batch = 0, length = 0, groups = 0, experts = 0;
  index_t total_rows = 0;   // the R·T rows of the mean over every rank
  index_t total_batch = 0;  // the B of the (1 / B·G) over every rank
  Tensor<T> log_probs;  // [B, R·T, G·E] log_softmax over E of the stacked logits
  Tensor<T> row_lse;    // [B, G·E] logsumexp over the R·T rows
};

// How a communicator of several ranks splits the regulariser's batch: the rows of its mean (σ-MoE's
// one mean over every token of the batch: each rank's logsumexp over its rows is combined in rank
// order) or whole sequences (MoEUT's per-sequence means: each rank's sum over its sequences is
// added up, and 1/B counts every rank's). Either way every rank gets the same value and, from
// backward, its own rows' gradients.
enum class SplitOver { rows, sequences };

// logits: the R ≥ 1 calls' router logits, each [B, T, G, E] (all the same shape). Throws
// Status::invalid_argument for no calls, Status::shape_mismatch for differing shapes.
template <class T>
EntropyRegForward<T> entropy_reg_forward(const std::vector<Tensor<T>>& logits, const dist::Communicator* pool = nullptr,
                                         SplitOver split = SplitOver::rows);

// Adds the gradient of coef · reg with respect to each call's logits into dlogits (one [B, T, G, E]
// tensor per call, in call order), in one pass over the rows.
template <class T>
void entropy_reg_backward_add(const EntropyRegForward<T>& forward, T coef, const std::vector<Tensor<T>>& dlogits);

// The same gradients as new tensors.
template <class T>
std::vector<Tensor<T>> entropy_reg_backward(const EntropyRegForward<T>& forward, T coef);

}  // namespace kmoe::moe
