// moe_stack: the regression model a scientific code trains as a surrogate — a linear projection
// in, n_blocks of [LayerNorm → MoE layer → residual], a linear projection out:
//
//   h = x·W_inᵀ + b_in;  h += moe_b(LN_b(h)) for each block;  y = h·W_outᵀ + b_out
//
// over rows x [N, d_in] → y [N, d_out]. The MoE layers are any of the builder's sigma_moe,
// st_moe and soft_moe_lite (each row is its own sequence of one token for the last two), placed
// over the ranks like the layer alone. Config: {"d_in", "d_out", "d_model", "n_blocks",
// "moe_kind", "moe": the MoE's config (its model width is set to d_model), "norm_eps"}.
// Registry: input.weight/bias, blocks.<b>.norm.weight/bias, blocks.<b>.moe.<the MoE's names>,
// output.weight/bias. The auxiliary loss is the sum of the blocks' (σ-MoE reg_loss, ST-MoE
// total_aux_loss).
#pragma once

#include "kmoe/model/layer.hpp"

#include <memory>
#include <string>
#include <vector>

namespace kmoe::model {

struct MoEStackConfig {
  index_t d_in = 0, d_out = 0, d_model = 0;
  int n_blocks = 1;
  std::string moe_kind = "sigma_moe";
  nlohmann::json moe = nlohmann::json::object();
  double norm_eps = 1e-5;
};

// An MoE layer's config (kind sigma_moe, st_moe or soft_moe_lite) with its model width — each
// kind names it its own way — set to width; a different width already there is an error naming
// `context`. For the models that hold MoE layers (moe_stack, moe_lm).
nlohmann::json with_model_width(const std::string& kind, nlohmann::json moe, index_t width, const std::string& context);

// The config read from JSON (every key checked, unknown ones refused).
MoEStackConfig read_moe_stack_config(const nlohmann::json& json);
nlohmann::json write_moe_stack_config(const MoEStackConfig& config);

template <class T>
std::unique_ptr<Layer<T>> make_moe_stack(const MoEStackConfig& config, std::uint64_t seed, ParameterInit init,
                                         const dist::Communicator& comm);

}  // namespace kmoe::model
