// kmoe-parity runners for lucidrains/st-moe-pytorch: layers "st_moe" (v0.1.8 MoE), "st_moe_block"
// (v0.1.8 SparseMoEBlock), "st_moe_v0014" (v0.0.14 MoE), "hier_moe_v0014" (v0.0.14 HeirarchicalMoE)
// and "st_moe_block_v0014" (v0.0.14 SparseMoEBlock around either); dump format of
// data/golden/st_moe/README.md and data/golden/st_moe_v0014/README.md. The recorded routing draws
// (/input/route_uniform, or _outer / _inner) are replayed.
#include "registry.hpp"

#include "kmoe/layers/sparse_moe_block.hpp"
#include "kmoe/layers/st_moe.hpp"

#include <cmath>
#include <functional>
#include <optional>
#include <set>
#include <string>
#include <vector>

namespace kmoe::parity {

namespace {

// Typed access to a JSON object of constructor arguments (the config, or a nested "moe" object),
// with every key either consumed or rejected, as ConfigReader does for flat configs.
class JsonKeys {
 public:
  JsonKeys(const nlohmann::json& object, std::string context) : object_(object), context_(std::move(context)) {
    require(object_.is_object(), Status::io_error, context_, " is not a JSON object: ", object_.dump());
  }

  const nlohmann::json* find(const std::string& key) {
    known_.insert(key);
    return object_.contains(key) ? &object_.at(key) : nullptr;
  }
  const nlohmann::json& required(const std::string& key) {
    const nlohmann::json* value = find(key);
    require(value != nullptr, Status::io_error, context_, " has no '", key, "': ", object_.dump());
    return *value;
  }
  double number(const std::string& key, double fallback) {
    const nlohmann::json* value = find(key);
    if (value == nullptr) return fallback;
    require(value->is_number(), Status::io_error, context_, " key '", key, "' must be a number, got ", value->dump());
    return value->get<double>();
  }
  int integer(const nlohmann::json& value, const std::string& key) const {
    require(value.is_number_integer(), Status::io_error, context_, " key '", key, "' must be an integer, got ",
            value.dump());
    return value.get<int>();
  }
  int integer(const std::string& key, int fallback) {
    const nlohmann::json* value = find(key);
    return value == nullptr ? fallback : integer(*value, key);
  }
  bool boolean(const std::string& key, bool fallback) {
    const nlohmann::json* value = find(key);
    if (value == nullptr) return fallback;
    require(value->is_boolean(), Status::io_error, context_, " key '", key, "' must be a boolean, got ", value->dump());
    return value->get<bool>();
  }
  // A number or a list of numbers (a Python tuple).
  std::vector<double> numbers(const std::string& key, double fallback) {
    const nlohmann::json* value = find(key);
    if (value == nullptr) return {fallback};
    if (value->is_number()) return {value->get<double>()};
    require(value->is_array() && !value->empty(), Status::io_error, context_, " key '", key,
            "' must be a number or a list of numbers, got ", value->dump());
    std::vector<double> list;
    for (const auto& item : *value) {
      require(item.is_number(), Status::io_error, context_, " key '", key, "' must be a number or a list of numbers, got ",
              value->dump());
      list.push_back(item.get<double>());
    }
    return list;
  }
  // A key kmoe accepts only with the value that leaves the computation as implemented.
  void expect(const std::string& key, const nlohmann::json& supported, const char* why) {
    const nlohmann::json* value = find(key);
    require(value == nullptr || *value == supported, Status::io_error, context_, " key '", key, "' = ", value ? value->dump() : "",
            " is not supported (", why, ")");
  }
  void ignore(const std::string& key) { find(key); }

  void finish() const {
    std::string unknown;
    for (const auto& item : object_.items()) {
      if (known_.count(item.key()) == 0) unknown += (unknown.empty() ? "'" : ", '") + item.key() + "'";
    }
    require(unknown.empty(), Status::io_error, context_, ": keys unknown to kmoe's ST-MoE: ", unknown);
  }

 private:
  const nlohmann::json& object_;
  std::string context_;
  std::set<std::string> known_;
};

enum class Generation { v0_1_8, v0_0_14 };

struct Model {
  Generation generation = Generation::v0_1_8;
  bool block = false;
  layers::SparseMoEBlockConfig config;  // config.moe is the MoE's; the feed-forwards only for blocks
};

// v0.1.8 MoE(**kwargs).
layers::StMoEConfig parse_moe_v0_1_8(JsonKeys& keys) {
  layers::StMoEConfig c;
  c.dim = keys.integer(keys.required("dim"), "dim");
  c.num_experts = keys.integer("num_experts", c.num_experts);
  c.expert_hidden_mult = keys.number("expert_hidden_mult", c.expert_hidden_mult);
  c.threshold_train = keys.numbers("threshold_train", 0.2);
  c.threshold_eval = keys.numbers("threshold_eval", 0.2);
  c.capacity_factor_train = keys.number("capacity_factor_train", c.capacity_factor_train);
  c.capacity_factor_eval = keys.number("capacity_factor_eval", c.capacity_factor_eval);
  c.gating_top_n = keys.integer("gating_top_n", c.gating_top_n);
  c.balance_loss_coef = keys.number("balance_loss_coef", c.balance_loss_coef);
  c.router_z_loss_coef = keys.number("router_z_loss_coef", c.router_z_loss_coef);
  c.straight_through_dispatch_tensor =
      keys.boolean("straight_through_dispatch_tensor", c.straight_through_dispatch_tensor);
  keys.expect("experts", nullptr, "custom expert modules");
  keys.expect("differentiable_topk", false, "the coordinate-descent top-k is not implemented");
  keys.ignore("differentiable_topk_fused");  // only used with differentiable_topk
  const nlohmann::json* distributed = keys.find("is_distributed");
  require(distributed == nullptr || distributed->is_null() || *distributed == false, Status::io_error,
          "config key 'is_distributed' = ", distributed ? distributed->dump() : "",
          " is not supported (kmoe runs the experts on one device)");
  keys.ignore("allow_var_seq_len");  // only used when distributed
  keys.finish();
  return c;
}

// v0.0.14 MoE(**kwargs) or HeirarchicalMoE(**kwargs).
layers::StMoEConfig parse_moe_v0_0_14(JsonKeys& keys, bool hierarchical) {
  layers::StMoEV0014Config v;
  v.dim = keys.integer(keys.required("dim"), "dim");
  const nlohmann::json* experts = keys.find("num_experts");
  if (hierarchical) {
    v.num_experts = v.num_experts_inner = 4;  // the original's (4, 4)
    if (experts != nullptr) {
      require(experts->is_array() && experts->size() == 2, Status::io_error,
              "config key 'num_experts' must be [outer, inner] for HeirarchicalMoE, got ", experts->dump());
      v.num_experts = keys.integer(experts->at(0), "num_experts");
      v.num_experts_inner = keys.integer(experts->at(1), "num_experts");
    }
  } else if (experts != nullptr) {
    v.num_experts = keys.integer(*experts, "num_experts");
  }
  v.expert_hidden_mult = keys.number("expert_hidden_mult", v.expert_hidden_mult);
  v.second_threshold_train = keys.number("second_threshold_train", v.second_threshold_train);
  v.second_threshold_eval = keys.number("second_threshold_eval", v.second_threshold_eval);
  v.capacity_factor_train = keys.number("capacity_factor_train", v.capacity_factor_train);
  v.capacity_factor_eval = keys.number("capacity_factor_eval", v.capacity_factor_eval);
  v.loss_coef = keys.number("loss_coef", v.loss_coef);
  v.router_z_loss_coef = keys.number("router_z_loss_coef", v.router_z_loss_coef);
  v.detached_dispatch_tensor = keys.boolean("detached_dispatch_tensor", v.detached_dispatch_tensor);
  keys.expect("experts", nullptr, "custom expert modules");
  keys.finish();
  return v.to_config();
}

Model parse_model(const Fixture& fixture) {
  const std::string& layer = fixture.layer();
  Model m;
  m.generation = layer.find("v0014") != std::string::npos ? Generation::v0_0_14 : Generation::v0_1_8;
  m.block = layer == "st_moe_block" || layer == "st_moe_block_v0014";
  JsonKeys top(fixture.config(), "config");
  if (!m.block) {
    m.config.moe = m.generation == Generation::v0_1_8 ? parse_moe_v0_1_8(top)
                                                      : parse_moe_v0_0_14(top, layer == "hier_moe_v0014");
    return m;
  }
  bool hierarchical = false;
  if (m.generation == Generation::v0_0_14) {
    const nlohmann::json& kind = top.required("moe_kind");
    require(kind == "MoE" || kind == "HeirarchicalMoE", Status::io_error,
            "config key 'moe_kind' must be \"MoE\" or \"HeirarchicalMoE\", got ", kind.dump());
    hierarchical = kind == "HeirarchicalMoE";
  }
  JsonKeys moe(top.required("moe"), "config key 'moe'");
  m.config.moe = m.generation == Generation::v0_1_8 ? parse_moe_v0_1_8(moe) : parse_moe_v0_0_14(moe, hierarchical);
  m.config.add_ff_before = top.boolean("add_ff_before", false);
  m.config.add_ff_after = top.boolean("add_ff_after", true);
  top.finish();
  return m;
}

// The differentiated scalar must be sum(out * grad_out) plus the returned losses, unweighted.
void require_known_loss(const Fixture& fixture) {
  const std::string& loss = fixture.loss();
  const std::string expected = fixture.layer().find("v0014") != std::string::npos
                                   ? "sum(out * grad_out) + balance_loss + router_z_loss"
                                   : "sum(out * grad_out) + total_aux_loss";
  require(loss.compare(0, expected.size(), expected) == 0, Status::io_error, "attribute 'loss' is '", loss,
          "'; the ", fixture.layer(), " runner knows only '", expected, "'");
}

// ---- parameters: state_dict names ↔ kmoe tensors -------------------------------------------

// v [lead, a, b] → [lead, b, a].
std::vector<double> swap_last_axes(const std::vector<double>& v, index_t a, index_t b) {
  const index_t lead = static_cast<index_t>(v.size()) / (a * b);
  std::vector<double> out(v.size());
  for (index_t l = 0; l < lead; ++l)
    for (index_t i = 0; i < a; ++i)
      for (index_t j = 0; j < b; ++j) out[(l * b + j) * a + i] = v[(l * a + i) * b + j];
  return out;
}

// One state_dict entry: slice `slice` of a kmoe tensor (the whole tensor when slice < 0), stored
// by PyTorch with its last two axes swapped when `transposed`.
template <class T>
struct Binding {
  std::string name;
  Tensor<T>* param;
  Tensor<T>* grad;
  index_t slice;
  bool transposed;
  Shape torch_shape;
};

template <class T>
index_t slice_size(const Binding<T>& b) {
  return b.slice < 0 ? b.param->size() : b.param->size() / b.param->dim(0);
}

template <class T>
void load(const Fixture& fixture, const Binding<T>& b) {
  const auto stored = fixture.read<double>(Fixture::state_dict_path("/params", b.name), b.torch_shape).to_host();
  const int r = b.torch_shape.rank();
  const auto values = b.transposed ? swap_last_axes(stored, b.torch_shape[r - 2], b.torch_shape[r - 1]) : stored;
  std::vector<T> all = b.param->to_host();
  const index_t offset = b.slice < 0 ? 0 : b.slice * slice_size(b);
  for (std::size_t i = 0; i < values.size(); ++i) all[offset + i] = static_cast<T>(values[i]);
  b.param->copy_from_host(all);
}

template <class T>
void compare_grad(Report& report, const Binding<T>& b) {
  const std::vector<T> all = b.grad->to_host();
  const index_t offset = b.slice < 0 ? 0 : b.slice * slice_size(b);
  std::vector<double> values(all.begin() + offset, all.begin() + offset + slice_size(b));
  const int r = b.torch_shape.rank();
  if (b.transposed) values = swap_last_axes(values, b.torch_shape[r - 1], b.torch_shape[r - 2]);
  report.compare(Fixture::state_dict_path("/grad/params", b.name),
                 Tensor<double>::from_host("grad", b.torch_shape, values));
}

template <class T>
void bind_moe(std::vector<Binding<T>>& out, const std::string& prefix, layers::StMoE<T>& moe, Generation generation) {
  const layers::StMoEConfig& c = moe.config();
  auto& p = moe.params();
  auto& g = moe.grads();
  const index_t D = c.dim, E = c.num_experts, I = c.num_experts_inner, h = c.expert_hidden();
  if (generation == Generation::v0_1_8) {
    out.push_back({prefix + "gate.to_gates.weight", &p.router, &g.router, -1, false, {E, D}});
  } else if (!c.hierarchical()) {
    out.push_back({prefix + "gate.w_gating", &p.router, &g.router, -1, true, {D, E}});
  } else {
    out.push_back({prefix + "gate_outer.w_gating", &p.router, &g.router, -1, true, {D, E}});
    out.push_back({prefix + "gate_inner.w_gating", &p.router_inner, &g.router_inner, -1, true, {E, D, I}});
  }
  for (int e = 0; e < c.total_experts(); ++e) {
    const std::string name = prefix + (c.hierarchical() ? "experts." + std::to_string(e / I) + ".experts." +
                                                              std::to_string(e % I)
                                                        : "experts.experts." + std::to_string(e)) + ".net.";
    out.push_back({name + "0.weight", &p.experts.w_in, &g.experts.w_in, e, true, {2 * h, D}});
    out.push_back({name + "0.bias", &p.experts.b_in, &g.experts.b_in, e, false, {2 * h}});
    out.push_back({name + "1.mult_bias", &p.experts.mult_bias, &g.experts.mult_bias, e, false, {h}});
    out.push_back({name + "2.weight", &p.experts.w_out, &g.experts.w_out, e, true, {D, h}});
    out.push_back({name + "2.bias", &p.experts.b_out, &g.experts.b_out, e, false, {D}});
  }
}

template <class T>
void bind_feed_forward(std::vector<Binding<T>>& out, const std::string& prefix, layers::GegluExpert<T>& ff) {
  auto& p = ff.params();
  auto& g = ff.grads();
  const index_t D = ff.dim(), h = ff.hidden();
  out.push_back({prefix + "net.0.gamma", &p.gamma, &g.gamma, -1, false, {D}});
  out.push_back({prefix + "net.1.weight", &p.w_in, &g.w_in, -1, false, {2 * h, D}});
  out.push_back({prefix + "net.1.bias", &p.b_in, &g.b_in, -1, false, {2 * h}});
  out.push_back({prefix + "net.2.mult_bias", &p.mult_bias, &g.mult_bias, -1, false, {h}});
  out.push_back({prefix + "net.3.weight", &p.w_out, &g.w_out, -1, false, {D, h}});
  out.push_back({prefix + "net.3.bias", &p.b_out, &g.b_out, -1, false, {D}});
}

// v0.1.8's persistent threshold buffers [eps, τ_1, …] must be the config's.
void check_threshold_buffers(const Fixture& fixture, const std::string& prefix, const layers::StMoEConfig& c) {
  for (const bool training : {true, false}) {
    const std::string name = prefix + "gate.threshold_" + (training ? "train" : "eval");
    const moe::TopNGatingOptions options = c.gating_options(training);
    const auto stored = fixture.read<double>(Fixture::state_dict_path("/buffers", name),
                                             Shape{static_cast<index_t>(c.gating_top_n)}).to_host();
    for (int i = 0; i < c.gating_top_n; ++i) {
      const double expected = i == 0 ? options.eps : options.thresholds[i - 1];
      require(std::abs(stored[i] - expected) <= 1e-6 * std::abs(expected), Status::io_error, "buffer '", name, "'[",
              i, "] = ", stored[i], " differs from the config's threshold ", expected);
    }
  }
}

// [rows...] → [2, rows...] with row 0 (the never-used first-choice draw) zero.
template <class T>
Tensor<T> with_unused_first_row(const Tensor<T>& second) {
  auto dims = second.shape().dims();
  dims.insert(dims.begin(), 2);
  std::vector<T> values(second.size(), T(0));
  const auto tail = second.to_host();
  values.insert(values.end(), tail.begin(), tail.end());
  return Tensor<T>::from_host("route_uniform", Shape(dims), values);
}

template <class T>
void run_st_moe_family(const Fixture& fixture, Report& report) {
  const Model m = parse_model(fixture);
  require_known_loss(fixture);
  const layers::StMoEConfig& c = m.config.moe;
  std::optional<layers::SparseMoEBlock<T>> block;
  std::optional<layers::StMoE<T>> flat;
  if (m.block) {
    block.emplace(m.config, fixture.seed());
  } else {
    flat.emplace(c, fixture.seed());
  }
  layers::StMoE<T>& moe = block ? block->moe() : *flat;
  const std::string moe_prefix = m.block ? "moe." : "";

  std::vector<Binding<T>> bindings;
  if (block && block->ff_before()) bind_feed_forward(bindings, "ff_before.", *block->ff_before());
  if (block) {
    bindings.push_back({"moe_prenorm.gamma", &block->moe_prenorm_gamma(), &block->moe_prenorm_gamma_grad(), -1, false,
                        Shape{c.dim}});
  }
  bind_moe(bindings, moe_prefix, moe, m.generation);
  if (block && block->ff_after()) bind_feed_forward(bindings, "ff_after.", *block->ff_after());
  for (const Binding<T>& b : bindings) load(fixture, b);
  if (m.generation == Generation::v0_1_8) check_threshold_buffers(fixture, moe_prefix, c);

  const Tensor<T> x = fixture.read<T>("/input/x");
  layers::StMoECall<T> call;
  if (m.generation == Generation::v0_1_8) {
    call.route_uniform = fixture.read<T>("/input/route_uniform");
  } else if (!c.hierarchical()) {
    call.route_uniform = with_unused_first_row(fixture.read<T>("/input/route_uniform"));
  } else {
    call.route_uniform = with_unused_first_row(fixture.read<T>("/input/route_uniform_outer"));
    call.route_uniform_inner = with_unused_first_row(fixture.read<T>("/input/route_uniform_inner"));
  }
  Generator rng(fixture.seed());  // no draws: the uniforms are replayed, gate noise is off
  const bool training = fixture.training();
  std::optional<layers::SparseMoEBlockForward<T>> block_forward;
  std::optional<layers::StMoEForward<T>> moe_forward;
  if (block) {
    block_forward = block->forward(x, training, rng, call);
  } else {
    moe_forward = flat->forward(x, training, rng, call);
  }
  const Tensor<T>& out = block ? block_forward->out : moe_forward->out;
  const T total_aux = block ? block_forward->total_aux_loss : moe_forward->total_aux_loss;
  const T balance = block ? block_forward->balance_loss : moe_forward->balance_loss;
  const T z = block ? block_forward->router_z_loss : moe_forward->router_z_loss;
  report.compare("/output/out", out);
  if (m.generation == Generation::v0_1_8) {
    report.compare_scalar("/output/total_aux_loss", total_aux);
    report.compare_scalar("/output/balance_loss", balance);
    report.compare_scalar("/output/router_z_loss", z);
  } else {  // v0.0.14 returns the weighted losses
    report.compare_scalar("/output/balance_loss", c.balance_loss_coef * balance);
    report.compare_scalar("/output/router_z_loss", c.router_z_loss_coef * z);
  }

  const Tensor<T> grad_out = fixture.read<T>("/input/grad_out", out.shape());
  report.compare_scalar("/output/loss", dot(out, grad_out) + static_cast<double>(total_aux));
  if (!fixture.has("/grad")) return;
  const Tensor<T> dx = block ? block->backward(*block_forward, grad_out, T(1)) : flat->backward(*moe_forward, grad_out, T(1));
  report.compare("/grad/input/x", dx);
  for (const Binding<T>& b : bindings) compare_grad(report, b);
}

}  // namespace

template <class T>
void run_st_moe(const Fixture& fixture, Report& report) {
  run_st_moe_family<T>(fixture, report);
}

template void run_st_moe<float>(const Fixture&, Report&);
template void run_st_moe<double>(const Fixture&, Report&);

}  // namespace kmoe::parity
