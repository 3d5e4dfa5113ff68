// Layers from JSON: one builder for every family, used by the parity tool, the checkpoints, the
// C ABI and the drivers. The config uses the original's argument names (lists where the original
// takes tuples); unknown keys are rejected naming the key, wrong types naming the field and the
// expected type (Status::invalid_argument), and options kmoe does not implement are
// Status::unsupported.
//
// Kinds (the parity fixtures' `layer` names):
//   sigma_moe            RobertCsordas/moe_layer MoE
//   st_moe, st_moe_block st-moe-pytorch v0.1.8 MoE / SparseMoEBlock {"moe": {...}, add_ff_before, add_ff_after}
//   st_moe_v0014, hier_moe_v0014, st_moe_block_v0014
//                        st-moe-pytorch v0.0.14 MoE / HeirarchicalMoE (num_experts = [outer, inner]) /
//                        SparseMoEBlock {"moe_kind": "MoE" | "HeirarchicalMoE", "moe": {...}, ...}
//   soft_moe_lite        zhaozijie2022/soft-moe SoftMoE(d_model, num_experts, num_slots)
//   soft_moe_lucidrains  lucidrains/soft-moe-pytorch SoftMoE(dim, seq_len | num_slots, ...)
//   switchhead           MoEUT's SwitchHeadRope attention alone (x feeds q, k, v and the routers)
//   moeut, moeut_lm      RobertCsordas/moeut MoEUT / MoEUTLM
//   moe_lm               kmoe's transformer LM with σ-MoE or ST-MoE feed-forwards (model/moe_lm.hpp)
//   moe_stack            kmoe's regression model: linear in, [LayerNorm → MoE → residual] blocks,
//                        linear out (model/moe_stack.hpp)
#pragma once

#include "kmoe/model/layer.hpp"

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace kmoe::model {

const std::vector<std::string>& layer_kinds();

// Builds the layer with parameters initialised as the original from Generator(seed), or left zero
// under ParameterInit::zeros (for the names and shapes alone, or parameters about to be loaded).
// An unknown kind throws Status::invalid_argument listing the known ones.
// With a communicator of several ranks the layer's experts are placed over them (layers that
// support it: sigma_moe; others are Status::unsupported); building is collective.
template <class T>
std::unique_ptr<Layer<T>> build_layer(const std::string& kind, const nlohmann::json& config, std::uint64_t seed,
                                      ParameterInit init = ParameterInit::drawn, const dist::Communicator& comm = {});

// config_text: a JSON object as text; malformed JSON is Status::invalid_argument with the parser's message.
template <class T>
std::unique_ptr<Layer<T>> build_layer(const std::string& kind, const std::string& config_text, std::uint64_t seed,
                                      ParameterInit init = ParameterInit::drawn, const dist::Communicator& comm = {});

nlohmann::json parse_config_text(const std::string& config_text);

}  // namespace kmoe::model
