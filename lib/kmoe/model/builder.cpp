#include "kmoe/model/builder.hpp"

#include "kmoe/model/moe_lm.hpp"
#include "kmoe/model/moe_stack.hpp"

#include "kmoe/layers/moeut.hpp"
#include "kmoe/layers/sigma_moe.hpp"
#include "kmoe/layers/soft_moe.hpp"
#include "kmoe/layers/sparse_moe_block.hpp"
#include "kmoe/layers/st_moe.hpp"
#include "kmoe/layers/switchhead_attention.hpp"
#include "kmoe/model/config_fields.hpp"

#include <KokkosBlas1_axpby.hpp>

#include <functional>
#include <map>

namespace kmoe::model {

const char* dtype_name(Dtype dtype) { return dtype == Dtype::float32 ? "float32" : "float64"; }

Dtype parse_dtype(const std::string& name) {
  if (name == "float32") return Dtype::float32;
  if (name == "float64") return Dtype::float64;
  fail(Status::invalid_argument, "unknown dtype '", name, "' (float32, float64)");
}

nlohmann::json parse_config_text(const std::string& config_text) {
  try {
    return nlohmann::json::parse(config_text);
  } catch (const nlohmann::json::exception& e) {
    fail(Status::invalid_argument, "config is not valid JSON (", e.what(), ")");
  }
}

namespace {

// ---- argument tables of the configs that exist only as JSON ------------------------------

using layers::LucidrainsSoftMoEOptions;
using layers::StMoEV0014Config;

const FieldTable<StMoEV0014Config>& v0014_fields(bool hierarchical) {
  using C = StMoEV0014Config;
  const auto make = [](bool hier) {
    FieldTable<C> table = {required_field("dim", &C::dim)};
    if (hier) {
      // HeirarchicalMoE(num_experts = (outer, inner)), the original's default (4, 4).
      Field<C> experts;
      experts.name = "num_experts";
      experts.type = "a list [outer, inner]";
      experts.get = [](const C& c) { return nlohmann::json::array({c.num_experts, c.num_experts_inner}); };
      experts.set = [](C& c, const nlohmann::json& v, const std::string& where) {
        if (!v.is_array() || v.size() != 2) impl::wrong_type(where, "a list [outer, inner]", v);
        c.num_experts = impl::json_to<int>(v[0], where);
        c.num_experts_inner = impl::json_to<int>(v[1], where);
      };
      table.push_back(experts);
    } else {
      table.push_back(field("num_experts", &C::num_experts));
    }
    for (Field<C> f : {field("expert_hidden_mult", &C::expert_hidden_mult),
                       field("second_threshold_train", &C::second_threshold_train),
                       field("second_threshold_eval", &C::second_threshold_eval),
                       field("capacity_factor_train", &C::capacity_factor_train),
                       field("capacity_factor_eval", &C::capacity_factor_eval), field("loss_coef", &C::loss_coef),
                       field("router_z_loss_coef", &C::router_z_loss_coef),
                       field("detached_dispatch_tensor", &C::detached_dispatch_tensor),
                       fixed_field<C>("experts", [](const nlohmann::json& v) { return v.is_null(); },
                                      "custom expert modules"),
                       enum_field("precision", &C::precision, parse_precision, precision_name)})
      table.push_back(f);
    return table;
  };
  static const FieldTable<C> flat = make(false), hier = make(true);
  return hierarchical ? hier : flat;
}

StMoEV0014Config v0014_defaults(bool hierarchical) {
  StMoEV0014Config c;
  if (hierarchical) c.num_experts = c.num_experts_inner = 4;
  return c;
}

struct LiteArgs {
  index_t d_model = 0;
  int num_experts = 0;
  index_t num_slots = 0;
  Precision precision = Precision::native;  // the experts' GEMMs (SlotExpertConfig::precision)
};

const FieldTable<LiteArgs>& lite_fields() {
  using C = LiteArgs;
  static const FieldTable<C> table = {required_field("d_model", &C::d_model),
                                      required_field("num_experts", &C::num_experts),
                                      required_field("num_slots", &C::num_slots),
                                      enum_field("precision", &C::precision, parse_precision, precision_name)};
  return table;
}

struct LucidrainsArgs {
  index_t dim = 0;
  LucidrainsSoftMoEOptions options;
  Precision precision = Precision::native;  // the experts' GEMMs (SlotExpertConfig::precision)
};

// A member of LucidrainsArgs::options.
template <class V>
Field<LucidrainsArgs> option_field(const std::string& name, V LucidrainsSoftMoEOptions::*member, bool nullable) {
  Field<LucidrainsSoftMoEOptions> inner =
      nullable ? nullable_field(name, member) : field(name, member);
  Field<LucidrainsArgs> f;
  f.name = inner.name;
  f.type = inner.type;
  f.get = [inner](const LucidrainsArgs& a) { return inner.get(a.options); };
  f.set = [inner](LucidrainsArgs& a, const nlohmann::json& v, const std::string& where) { inner.set(a.options, v, where); };
  return f;
}

const FieldTable<LucidrainsArgs>& lucidrains_fields() {
  using C = LucidrainsArgs;
  using O = LucidrainsSoftMoEOptions;
  const auto any = [](const nlohmann::json&) { return true; };
  // Where the experts live (ranks, CPU offload) does not change the computed values.
  static const FieldTable<C> table = {
      required_field("dim", &C::dim),
      option_field("seq_len", &O::seq_len, true),
      option_field("num_experts", &O::num_experts, false),
      option_field("num_slots", &O::num_slots, true),
      option_field("expert_mult", &O::expert_mult, false),
      option_field("dropout", &O::dropout, false),
      option_field("geglu", &O::geglu, false),
      option_field("use_layernorm", &O::use_layernorm, false),
      fixed_field<C>("is_distributed", any, "placement does not change the values"),
      fixed_field<C>("offload_unused_experts_to_cpu", any, "placement does not change the values"),
      enum_field("precision", &C::precision, parse_precision, precision_name),
  };
  return table;
}

struct BlockArgs {
  bool add_ff_before = false;
  bool add_ff_after = true;
};

// The fields of a SparseMoEBlock config besides "moe" (and "moe_kind").
const FieldTable<BlockArgs>& block_fields() {
  using C = BlockArgs;
  static const FieldTable<C> table = {field("add_ff_before", &C::add_ff_before), field("add_ff_after", &C::add_ff_after)};
  return table;
}

// The object without the given keys (a nested config's own fields are read by its table).
nlohmann::json without(nlohmann::json object, std::initializer_list<const char*> keys) {
  for (const char* key : keys) object.erase(key);
  return object;
}

const nlohmann::json& required_key(const nlohmann::json& config, const char* key, const std::string& context) {
  require(config.is_object(), Status::invalid_argument, context, " must be a JSON object, got ", config.dump());
  const auto found = config.find(key);
  require(found != config.end(), Status::invalid_argument, context, ": missing required key '", key, "'");
  return *found;
}

// ---- the type-erased layers --------------------------------------------------------------

// A wrapper's forward with the MoE routing counts of its calls filled in.
template <class T>
LayerForward<T> with_counts(LayerForward<T> f, Tensor<std::int64_t> counts) {
  f.expert_counts = std::move(counts);
  return f;
}

template <class T>
void require_input(const Tensor<T>& x, const std::string& kind) {
  require(!x.empty(), Status::invalid_argument, kind, ": the input x is missing");
}

void refuse(bool given, const std::string& kind, const char* what) {
  require(!given, Status::invalid_argument, kind, " takes no ", what);
}

// Holds the concrete layer, its kind and its config as JSON; families add forward and backward.
template <class L>
class Wrapped : public Layer<typename L::value_type> {
 public:
  using T = typename L::value_type;
  template <class... Args>
  Wrapped(std::string kind, nlohmann::json config, Args&&... args)
      : kind_(std::move(kind)), config_(std::move(config)), layer_(std::forward<Args>(args)...) {}

  const std::string& kind() const override { return kind_; }
  nlohmann::json config() const override { return config_; }
  const dist::Communicator& communicator() const override {
    if constexpr (std::is_same_v<L, layers::SigmaMoE<T>> || std::is_same_v<L, layers::MoEUT<T>> ||
                  std::is_same_v<L, layers::MoEUTLM<T>> || std::is_same_v<L, layers::StMoE<T>> ||
                  std::is_same_v<L, layers::SparseMoEBlock<T>> || std::is_same_v<L, layers::SoftMoE<T>> ||
                  std::is_same_v<L, layers::SwitchHeadAttention<T>>) {
      return layer_.communicator();
    } else {
      static const dist::Communicator one_rank;
      return one_rank;
    }
  }
  void visit_parameters(const ParameterVisitor<T>& visit, const std::string& prefix) override {
    layer_.visit_parameters(visit, prefix);
  }

 protected:
  void* concrete(const std::type_info& type) override { return type == typeid(L) ? &layer_ : nullptr; }
  template <class F>
  static const F& state(const LayerForward<T>& forward) {
    return forward.template state_as<F>();
  }
  template <class F>
  static LayerForward<T> result(F&& saved, const Tensor<T>& out, bool training, T aux_loss,
                                std::map<std::string, double> losses) {
    LayerForward<T> f;
    f.out = out;
    f.training = training;
    f.aux_loss = aux_loss;
    f.losses = std::move(losses);
    f.state = std::make_shared<const std::decay_t<F>>(std::forward<F>(saved));
    return f;
  }

  std::string kind_;
  nlohmann::json config_;
  L layer_;
};

template <class T>
class SigmaMoELayer final : public Wrapped<layers::SigmaMoE<T>> {
 public:
  using Wrapped<layers::SigmaMoE<T>>::Wrapped;
  LayerForward<T> forward(const LayerInputs<T>& in, bool training, Generator& rng) const override {
    require_input(in.x, this->kind_);
    refuse(!in.mask.empty() || in.attention_mask.has_value(), this->kind_, "mask");
    auto f = this->layer_.forward(in.x, training, rng);
    const Tensor<T> out = f.y;
    const T reg = f.reg_loss;
    auto counts = count_experts(f.expert_index, this->layer_.config().n_experts);
    return with_counts(this->result(std::move(f), out, training, reg, {{"reg_loss", reg}}), std::move(counts));
  }
  Tensor<T> backward(const LayerForward<T>& forward, const Tensor<T>& dout, T aux_weight) override {
    return this->layer_.backward(this->template state<layers::SigmaMoEForward<T>>(forward), dout, aux_weight);
  }
};

template <class T>
layers::StMoECall<T> st_moe_call(const LayerInputs<T>& in, const std::string& kind) {
  require_input(in.x, kind);
  refuse(!in.mask.empty() || in.attention_mask.has_value(), kind, "mask");
  layers::StMoECall<T> call;
  call.route_uniform = in.route_uniform;
  call.route_uniform_inner = in.route_uniform_inner;
  return call;
}

template <class T, class F>
std::map<std::string, double> st_moe_losses(const F& f) {
  return {{"total_aux_loss", f.total_aux_loss}, {"balance_loss", f.balance_loss}, {"router_z_loss", f.router_z_loss}};
}

// The kept choices of ST-MoE's (outer) gate over its num_experts (the config's, or its moe's).
template <class T>
Tensor<std::int64_t> st_moe_counts(const layers::StMoEForward<T>& f, const nlohmann::json& config) {
  const nlohmann::json& moe = config.contains("moe") ? config["moe"] : config;
  const nlohmann::json& n = moe.at("num_experts");
  return count_experts(f.gate.routing.expert_index, (n.is_array() ? n[0] : n).get<index_t>());
}
template <class T>
Tensor<std::int64_t> st_moe_counts(const layers::SparseMoEBlockForward<T>& f, const nlohmann::json& config) {
  return st_moe_counts(f.moe, config);
}

// histogram[e] += the number of ids e in expert_index (ids outside the histogram ignored), on the
// device. Integer atomics: the counts do not depend on the order of the increments.
void count_experts_into(const View1<std::int64_t>& histogram, const Tensor<int>& expert_index) {
  if (expert_index.size() == 0) return;
  const View1<int> ids = expert_index.flat();
  const auto n = static_cast<index_t>(histogram.extent(0));
  Kokkos::parallel_for(
      "kmoe::count_experts", Kokkos::RangePolicy<ExecSpace>(0, ids.extent(0)), KOKKOS_LAMBDA(const index_t i) {
        const int e = ids(i);
        if (e >= 0 && e < n) Kokkos::atomic_increment(&histogram(e));
      });
}

// MoEUT's σ-MoE feed-forward calls, over its ff_n_experts, counted into one histogram.
template <class T>
Tensor<std::int64_t> moeut_counts(const layers::MoEUTForward<T>& f, const layers::MoEUTConfig& config) {
  Tensor<std::int64_t> counts("kmoe::expert_counts", {config.ff_n_experts});
  for (const auto& call : f.calls) count_experts_into(counts.flat(), call.ffn.expert_index);
  return counts;
}

// StMoE and SparseMoEBlock (L), whose forward results (F) carry the same losses.
template <class L, class F>
class StMoEFamilyLayer final : public Wrapped<L> {
 public:
  using T = typename L::value_type;
  using Wrapped<L>::Wrapped;
  LayerForward<T> forward(const LayerInputs<T>& in, bool training, Generator& rng) const override {
    auto f = this->layer_.forward(in.x, training, rng, st_moe_call(in, this->kind_));
    const Tensor<T> out = f.out;
    const T aux = f.total_aux_loss;
    auto losses = st_moe_losses<T>(f);
    auto counts = st_moe_counts(f, this->config_);
    return with_counts(this->result(std::move(f), out, training, aux, std::move(losses)), std::move(counts));
  }
  Tensor<T> backward(const LayerForward<T>& forward, const Tensor<T>& dout, T aux_weight) override {
    return this->layer_.backward(this->template state<F>(forward), dout, aux_weight);
  }
};

template <class T>
using StMoELayer = StMoEFamilyLayer<layers::StMoE<T>, layers::StMoEForward<T>>;
template <class T>
using SparseMoEBlockLayer = StMoEFamilyLayer<layers::SparseMoEBlock<T>, layers::SparseMoEBlockForward<T>>;

template <class T>
class SoftMoELayer final : public Wrapped<layers::SoftMoE<T>> {
 public:
  using Wrapped<layers::SoftMoE<T>>::Wrapped;
  LayerForward<T> forward(const LayerInputs<T>& in, bool training, Generator& rng) const override {
    require_input(in.x, this->kind_);
    refuse(in.attention_mask.has_value(), this->kind_, "attention mask");
    refuse(!in.route_uniform.empty(), this->kind_, "route uniforms");
    auto f = this->layer_.forward(in.x, in.mask, training, rng);
    const Tensor<T> out = f.y;
    return this->result(std::move(f), out, training, T(0), {});
  }
  Tensor<T> backward(const LayerForward<T>& forward, const Tensor<T>& dout, T) override {
    return this->layer_.backward(this->template state<layers::SoftMoEForward<T>>(forward), dout);
  }
};

template <class T>
class SwitchHeadLayer final : public Wrapped<layers::SwitchHeadAttention<T>> {
 public:
  using Wrapped<layers::SwitchHeadAttention<T>>::Wrapped;
  LayerForward<T> forward(const LayerInputs<T>& in, bool training, Generator& rng) const override {
    require_input(in.x, this->kind_);
    refuse(!in.mask.empty(), this->kind_, "token mask (use attention_mask)");
    auto f = this->layer_.forward(in.x, in.x, in.attention_mask.value_or(ops::AttentionMask{}), training, rng);
    const Tensor<T> out = f.y;
    return this->result(std::move(f), out, training, T(0), {});
  }
  // x feeds both sources, so its gradient is the sum of both.
  Tensor<T> backward(const LayerForward<T>& forward, const Tensor<T>& dout, T) override {
    const auto grads =
        this->layer_.backward(this->template state<layers::SwitchHeadForward<T>>(forward), dout, Tensor<T>(), Tensor<T>());
    const Tensor<T> dx = grads.dqk_src.clone("switchhead::dx");
    KokkosBlas::axpy(T(1), grads.dv_src.flat(), dx.flat());
    return dx;
  }
};

template <class T>
class MoEUTLayer final : public Wrapped<layers::MoEUT<T>> {
 public:
  using Wrapped<layers::MoEUT<T>>::Wrapped;
  LayerForward<T> forward(const LayerInputs<T>& in, bool training, Generator& rng) const override {
    auto f = run(in, training, rng, true);
    auto counts = moeut_counts(f, this->layer_.config());
    const Tensor<T> out = f.out;
    const T reg = f.reg_loss;
    return with_counts(this->result(std::move(f), out, training, reg, {{"reg_loss", reg}}), std::move(counts));
  }
  Tensor<T> infer(const LayerInputs<T>& in, Generator& rng) const override { return run(in, false, rng, false).out; }
  Tensor<T> backward(const LayerForward<T>& forward, const Tensor<T>& dout, T aux_weight) override {
    return this->layer_.backward(this->template state<layers::MoEUTForward<T>>(forward), dout, aux_weight);
  }

 private:
  layers::MoEUTForward<T> run(const LayerInputs<T>& in, bool training, Generator& rng, bool for_backward) const {
    require_input(in.x, this->kind_);
    refuse(!in.mask.empty(), this->kind_, "token mask (use attention_mask)");
    return this->layer_.forward(in.x, in.attention_mask.value_or(ops::AttentionMask{}), training, rng, nullptr,
                                for_backward);
  }
};

template <class T>
class MoEUTLMLayer final : public Wrapped<layers::MoEUTLM<T>> {
 public:
  using Wrapped<layers::MoEUTLM<T>>::Wrapped;
  LayerForward<T> forward(const LayerInputs<T>& in, bool training, Generator& rng) const override {
    auto f = run(in, training, rng, true);
    auto counts = moeut_counts(f.body, this->layer_.config());
    const Tensor<T> out = f.logits;
    const T reg = f.reg_loss;
    return with_counts(this->result(std::move(f), out, training, reg, {{"reg_loss", reg}}), std::move(counts));
  }
  Tensor<T> backward(const LayerForward<T>& forward, const Tensor<T>& dout, T aux_weight) override {
    this->layer_.backward(this->template state<layers::MoEUTLMForward<T>>(forward), dout, aux_weight);
    return Tensor<T>();
  }
  Tensor<T> infer(const LayerInputs<T>& in, Generator& rng) const override { return run(in, false, rng, false).logits; }

 private:
  layers::MoEUTLMForward<T> run(const LayerInputs<T>& in, bool training, Generator& rng, bool for_backward) const {
    require(!in.tokens.empty(), Status::invalid_argument, this->kind_, ": the input tokens are missing");
    refuse(!in.x.empty(), this->kind_, "float input x (it reads token ids)");
    return this->layer_.forward(in.tokens, in.attention_mask, training, rng, nullptr, for_backward);
  }
};

// ---- the kinds ---------------------------------------------------------------------------

template <class T>
using Factory = std::function<std::unique_ptr<Layer<T>>(const std::string& kind, const nlohmann::json&, std::uint64_t, ParameterInit,
                                                          const dist::Communicator&)>;

template <class T>
std::unique_ptr<Layer<T>> build_st_moe_block(const std::string& kind, const nlohmann::json& config, std::uint64_t seed,
                                             ParameterInit init, const dist::Communicator& comm, bool v0014) {
  const std::string context = kind + " config";
  layers::SparseMoEBlockConfig block;
  nlohmann::json moe_json;
  nlohmann::json written;
  const nlohmann::json& moe = required_key(config, "moe", context);
  if (v0014) {
    const nlohmann::json& moe_kind = required_key(config, "moe_kind", context);
    require(moe_kind == "MoE" || moe_kind == "HeirarchicalMoE", Status::invalid_argument, context,
            ": moe_kind must be \"MoE\" or \"HeirarchicalMoE\", got ", moe_kind.dump());
    const bool hier = moe_kind == "HeirarchicalMoE";
    const StMoEV0014Config args = read_fields(v0014_fields(hier), moe, context + ": moe", v0014_defaults(hier));
    block.moe = args.to_config();
    moe_json = write_fields(v0014_fields(hier), args);
    written["moe_kind"] = moe_kind;
  } else {
    block.moe = read_fields(layers::st_moe_fields(), moe, context + ": moe");
    moe_json = write_fields(layers::st_moe_fields(), block.moe);
  }
  const BlockArgs args = read_fields(block_fields(), without(config, {"moe", "moe_kind"}), context);
  block.add_ff_before = args.add_ff_before;
  block.add_ff_after = args.add_ff_after;
  written.update(write_fields(block_fields(), args));
  written["moe"] = moe_json;
  return std::make_unique<SparseMoEBlockLayer<T>>(kind, written, block, seed, init, comm);
}

template <class T>
const std::map<std::string, Factory<T>>& factories() {
  static const std::map<std::string, Factory<T>> table = {
      {"moe_lm",
       [](const std::string&, const nlohmann::json& json, std::uint64_t seed, ParameterInit init,
          const dist::Communicator& comm) -> std::unique_ptr<Layer<T>> {
         return make_moe_lm<T>(read_moe_lm_config(json), seed, init, comm);
       }},
      {"moe_stack",
       [](const std::string&, const nlohmann::json& json, std::uint64_t seed, ParameterInit init,
          const dist::Communicator& comm) -> std::unique_ptr<Layer<T>> {
         return make_moe_stack<T>(read_moe_stack_config(json), seed, init, comm);
       }},
      {"sigma_moe",
       [](const std::string& kind, const nlohmann::json& json, std::uint64_t seed, ParameterInit init, const dist::Communicator& comm) -> std::unique_ptr<Layer<T>> {
         const auto c = read_fields(layers::sigma_moe_fields(), json, kind + " config");
         return std::make_unique<SigmaMoELayer<T>>(kind, write_fields(layers::sigma_moe_fields(), c), c, seed, init, comm);
       }},
      {"st_moe",
       [](const std::string& kind, const nlohmann::json& json, std::uint64_t seed, ParameterInit init, const dist::Communicator& comm) -> std::unique_ptr<Layer<T>> {
         const auto c = read_fields(layers::st_moe_fields(), json, kind + " config");
         return std::make_unique<StMoELayer<T>>(kind, write_fields(layers::st_moe_fields(), c), c, seed, init, comm);
       }},
      {"st_moe_v0014",
       [](const std::string& kind, const nlohmann::json& json, std::uint64_t seed, ParameterInit init, const dist::Communicator& comm) -> std::unique_ptr<Layer<T>> {
         const auto args = read_fields(v0014_fields(false), json, kind + " config", v0014_defaults(false));
         return std::make_unique<StMoELayer<T>>(kind, write_fields(v0014_fields(false), args), args.to_config(), seed, init, comm);
       }},
      {"hier_moe_v0014",
       [](const std::string& kind, const nlohmann::json& json, std::uint64_t seed, ParameterInit init, const dist::Communicator& comm) -> std::unique_ptr<Layer<T>> {
         const auto args = read_fields(v0014_fields(true), json, kind + " config", v0014_defaults(true));
         return std::make_unique<StMoELayer<T>>(kind, write_fields(v0014_fields(true), args), args.to_config(), seed, init, comm);
       }},
      {"st_moe_block",
       [](const std::string& kind, const nlohmann::json& json, std::uint64_t seed, ParameterInit init, const dist::Communicator& comm) {
         return build_st_moe_block<T>(kind, json, seed, init, comm, false);
       }},
      {"st_moe_block_v0014",
       [](const std::string& kind, const nlohmann::json& json, std::uint64_t seed, ParameterInit init, const dist::Communicator& comm) {
         return build_st_moe_block<T>(kind, json, seed, init, comm, true);
       }},
      {"soft_moe_lite",
       [](const std::string& kind, const nlohmann::json& json, std::uint64_t seed, ParameterInit init, const dist::Communicator& comm) -> std::unique_ptr<Layer<T>> {
         const auto a = read_fields(lite_fields(), json, kind + " config");
         layers::SoftMoEConfig c = layers::SoftMoEConfig::lite(a.d_model, a.num_experts, a.num_slots);
         c.experts.precision = a.precision;
         return std::make_unique<SoftMoELayer<T>>(kind, write_fields(lite_fields(), a), c, seed, init, comm);
       }},
      {"soft_moe_lucidrains",
       [](const std::string& kind, const nlohmann::json& json, std::uint64_t seed, ParameterInit init, const dist::Communicator& comm) -> std::unique_ptr<Layer<T>> {
         const auto a = read_fields(lucidrains_fields(), json, kind + " config");
         layers::SoftMoEConfig c = layers::SoftMoEConfig::lucidrains(a.dim, a.options);
         c.experts.precision = a.precision;
         return std::make_unique<SoftMoELayer<T>>(kind, write_fields(lucidrains_fields(), a), c, seed, init, comm);
       }},
      {"switchhead",
       [](const std::string& kind, const nlohmann::json& json, std::uint64_t seed, ParameterInit init, const dist::Communicator& comm) -> std::unique_ptr<Layer<T>> {
         const auto c = read_fields(layers::switchhead_fields(), json, kind + " config");
         return std::make_unique<SwitchHeadLayer<T>>(kind, write_fields(layers::switchhead_fields(), c), c, seed, init, comm);
       }},
      {"moeut",
       [](const std::string& kind, const nlohmann::json& json, std::uint64_t seed, ParameterInit init, const dist::Communicator& comm) -> std::unique_ptr<Layer<T>> {
         const auto c = read_fields(layers::moeut_fields(false), json, kind + " config");
         return std::make_unique<MoEUTLayer<T>>(kind, write_fields(layers::moeut_fields(false), c), c, seed, init, comm);
       }},
      {"moeut_lm",
       [](const std::string& kind, const nlohmann::json& json, std::uint64_t seed, ParameterInit init, const dist::Communicator& comm) -> std::unique_ptr<Layer<T>> {
         const auto c = read_fields(layers::moeut_fields(true), json, kind + " config");
         return std::make_unique<MoEUTLMLayer<T>>(kind, write_fields(layers::moeut_fields(true), c), c, seed, init, comm);
       }},
  };
  return table;
}

}  // namespace

Tensor<std::int64_t> count_experts(const Tensor<int>& expert_index, index_t n) {
  Tensor<std::int64_t> counts("kmoe::expert_counts", {std::max<index_t>(n, 0)});
  count_experts_into(counts.flat(), expert_index);
  return counts;
}

void add_counts(Tensor<std::int64_t>& a, const Tensor<std::int64_t>& b) {
  if (a.empty()) {
    a = b.clone("kmoe::expert_counts");  // not b itself: a is added to later
    return;
  }
  require(a.size() == b.size(), Status::internal, "add_counts: ", a.size(), " and ", b.size(), " experts");
  const View1<std::int64_t> sum = a.flat(), add = b.flat();
  Kokkos::parallel_for(
      "kmoe::add_counts", Kokkos::RangePolicy<ExecSpace>(0, sum.extent(0)),
      KOKKOS_LAMBDA(const index_t e) { sum(e) += add(e); });
}

const std::vector<std::string>& layer_kinds() {
  static const std::vector<std::string> kinds = [] {
    std::vector<std::string> names;
    for (const auto& item : factories<float>()) names.push_back(item.first);
    return names;
  }();
  return kinds;
}

template <class T>
std::unique_ptr<Layer<T>> build_layer(const std::string& kind, const nlohmann::json& config, std::uint64_t seed,
                                      ParameterInit init, const dist::Communicator& comm) {
  const auto found = factories<T>().find(kind);
  if (found == factories<T>().end()) {
    std::string known;
    for (const std::string& name : layer_kinds()) known += (known.empty() ? "" : ", ") + name;
    fail(Status::invalid_argument, "unknown layer '", kind, "' (kmoe knows: ", known, ")");
  }
  return found->second(kind, config, seed, init, comm);
}

template <class T>
std::unique_ptr<Layer<T>> build_layer(const std::string& kind, const std::string& config_text, std::uint64_t seed,
                                      ParameterInit init, const dist::Communicator& comm) {
  return build_layer<T>(kind, parse_config_text(config_text), seed, init, comm);
}

template std::unique_ptr<Layer<float>> build_layer<float>(const std::string&, const nlohmann::json&, std::uint64_t, ParameterInit,
                                                             const dist::Communicator&);
template std::unique_ptr<Layer<double>> build_layer<double>(const std::string&, const nlohmann::json&, std::uint64_t, ParameterInit,
                                                             const dist::Communicator&);
template std::unique_ptr<Layer<float>> build_layer<float>(const std::string&, const std::string&, std::uint64_t, ParameterInit,
                                                             const dist::Communicator&);
template std::unique_ptr<Layer<double>> build_layer<double>(const std::string&, const std::string&, std::uint64_t, ParameterInit,
                                                             const dist::Communicator&);

}  // namespace kmoe::model
