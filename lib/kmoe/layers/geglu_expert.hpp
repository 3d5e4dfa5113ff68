// ST-MoE's expert (lucidrains/st-moe-pytorch@d94e65d8a1f50eb5b41efa5317b0d1b17c9dbfad
// st_moe_pytorch/st_moe_pytorch.py, class Expert): [RMSNorm →] Linear(dim, 2h) →
// GEGLU with learned mult_bias → Linear(h, dim), h = int(dim · hidden_mult · 2/3), GEGLU input
// [value | gate] (first half value), exact GELU, RMSNorm = F.normalize(x) · √dim · γ.
// Initialisation as the original: every Linear's weight and bias ~ U(±out_features^−½),
// mult_bias and γ ones.
//
// Two forms share these semantics:
//  - GegluExpert: one dense expert in PyTorch's layout (the SparseMoEBlock's feed-forwards);
//  - geglu_experts_forward/backward: E experts stacked for CVMM ([E, in, out] weights), each run on
//    its rows of a DispatchPlan (rows in the plan's sorted order, routed prefix only).
#pragma once

#include "kmoe/core/random.hpp"
#include "kmoe/core/tensor.hpp"
#include "kmoe/model/parameter.hpp"
#include "kmoe/moe/dispatch_plan.hpp"
#include "kmoe/moe/expert_operand.hpp"

namespace kmoe::layers {

// int(dim · hidden_mult · 2/3) as Python computes it; throws Status::invalid_argument if < 1.
index_t geglu_hidden_size(index_t dim, double hidden_mult);

// ---- one dense expert ----------------------------------------------------------------------

// Parameters (and gradients) under the original's state_dict names (prenorm shifts them by one:
// net.0 = RMSNorm, net.1 = Linear, net.2 = GEGLU, net.3 = Linear).
template <class T>
struct GegluExpertParams {
  Tensor<T> gamma;      // [dim] RMSNorm γ (net.0.gamma), empty without prenorm
  Tensor<T> w_in;       // [2h, dim] first Linear's weight
  Tensor<T> b_in;       // [2h]
  Tensor<T> mult_bias;  // [h]
  Tensor<T> w_out;      // [dim, h] second Linear's weight
  Tensor<T> b_out;      // [dim]
};

template <class T>
struct GegluExpertForward {
  Tensor<T> y;       // [rows, dim]
  Tensor<T> x;       // [rows, dim] the input (a view of the caller's tensor)
  Tensor<T> normed;  // [rows, dim] RMSNorm(x) (prenorm only)
  Tensor<T> scale;   // [rows] RMSNorm's per-row factor (prenorm only)
  Tensor<T> pre;     // [rows, 2h] first Linear's output
  Tensor<T> hidden;  // [rows, h] GEGLU output
};

template <class T>
class GegluExpert {
 public:
  using value_type = T;
  // Throws Status::invalid_argument for dim < 1 or a hidden size < 1. Parameters from Generator(seed).
  GegluExpert(index_t dim, double hidden_mult, bool prenorm, std::uint64_t seed,
              ParameterInit init = ParameterInit::drawn);

  index_t dim() const { return dim_; }
  index_t hidden() const { return hidden_; }
  bool prenorm() const { return prenorm_; }
  GegluExpertParams<T>& params() { return params_; }
  const GegluExpertParams<T>& params() const { return params_; }
  GegluExpertParams<T>& grads() { return grads_; }
  void zero_grad();
  // The registry: net.<i>.weight / bias / mult_bias / gamma under the original's indices (dense).
  void visit_parameters(const model::ParameterVisitor<T>& visit, const std::string& prefix = "");

  // x [rows, dim] (rows ≥ 0); otherwise Status::shape_mismatch.
  GegluExpertForward<T> forward(const Tensor<T>& x) const;
  // dy [rows, dim]; returns dx (new tensor) and accumulates grads().
  Tensor<T> backward(const GegluExpertForward<T>& forward, const Tensor<T>& dy);

 private:
  index_t dim_, hidden_;
  bool prenorm_;
  GegluExpertParams<T> params_, grads_;
};

// ---- E stacked experts over a dispatch plan ------------------------------------------------

// Expert e's parameters are slice e of each tensor; w_in[e] = its first Linear's weightᵀ (CVMM
// layout [in, out]), w_out[e] = its second Linear's weightᵀ.
template <class T>
struct GegluExpertsParams {
  Tensor<T> w_in;       // [E, dim, 2h]
  Tensor<T> b_in;       // [E, 2h]
  Tensor<T> mult_bias;  // [E, h]
  Tensor<T> w_out;      // [E, h, dim]
  Tensor<T> b_out;      // [E, dim]
};

// The part of E experts of width h that one rank holds (dist/placement.hpp): experts
// [first_expert, first_expert + experts) and of each the hidden units [hidden_begin,
// hidden_begin + hidden) (in both halves of the first layer). The default: everything.
struct GegluExpertsShare {
  int first_expert = 0;
  int experts = -1;  // −1: all
  index_t hidden_begin = 0;
  index_t hidden = -1;  // −1: all
  // Only one shard of an expert adds (and trains) its output bias: the one at hidden unit 0.
  bool output_bias() const { return hidden_begin == 0; }
};

// E experts of width h, initialised as the original (expert by expert from `rng`), of which the
// share's block is kept: each element holds the draw it has in the whole (rng advances by the
// whole's count either way). Gradients (zeros set): zero, the share's shapes.
template <class T>
GegluExpertsParams<T> make_geglu_experts(int experts, index_t dim, index_t hidden, Generator& rng, bool zeros = false,
                                         const GegluExpertsShare& share = {});

// What backward needs, per pair row in the plan's sorted order (routed prefix valid).
template <class T>
struct GegluExpertsSaved {
  Tensor<T> pre;         // [pairs, 2h]
  Tensor<T> hidden;      // [pairs, h]
  moe::ExpertOperand<T> w_in, w_out;  // the weights as the expert GEMMs read them
};

// x_sorted [pairs, dim] (row s = input of pair sorted_pair(s)) → y_sorted [pairs, dim]; rows at or
// beyond plan.n_routed_pairs() are neither read nor written. Any k (x's rows are named per pair to
// CVMM). Throws Status::shape_mismatch on wrong extents.
// Without output_bias (a shard past an expert's first) b_out is left out: the shards' partial
// outputs add up to the expert's. Precision::bfloat16 runs both projections' GEMMs (and backward's)
// on bfloat16 operands (T = float only).
template <class T>
GegluExpertsSaved<T> geglu_experts_forward(const GegluExpertsParams<T>& params, const moe::DispatchPlan& plan,
                                           const Tensor<T>& x_sorted, const Tensor<T>& y_sorted,
                                           bool output_bias = true, Precision precision = Precision::native);

// dy_sorted [pairs, dim] → dx_sorted [pairs, dim] (routed rows overwritten); gradients accumulated
// (b_out's only with output_bias).
template <class T>
void geglu_experts_backward(const GegluExpertsParams<T>& params, GegluExpertsParams<T>& grads,
                            const moe::DispatchPlan& plan, const Tensor<T>& x_sorted,
                            const GegluExpertsSaved<T>& saved, const Tensor<T>& dy_sorted,
                            const Tensor<T>& dx_sorted, bool output_bias = true);

extern template class GegluExpert<float>;
extern template class GegluExpert<double>;

}  // namespace kmoe::layers
