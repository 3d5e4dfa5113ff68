#include "kmoe/core/profile_region.hpp"
#include "kmoe/model/builder.hpp"
#include "test_util.hpp"

#include <algorithm>
#include <string>
#include <vector>

using namespace kmoe;
using namespace kmoe::test;

namespace {

// What a profiling tool sees: "+name" for each pushed region, "-" for each pop.
std::vector<std::string> events;
void record_push(const char* name) { events.push_back(std::string("+") + name); }
void record_pop() { events.push_back("-"); }

// Installs the recording callbacks while alive (as a tool loaded through KOKKOS_PROFILE_LIBRARY
// would) and removes them after.
class RecordRegions {
 public:
  RecordRegions() {
    events.clear();
    Kokkos::Tools::Experimental::set_push_region_callback(record_push);
    Kokkos::Tools::Experimental::set_pop_region_callback(record_pop);
  }
  ~RecordRegions() {
    Kokkos::Tools::Experimental::set_push_region_callback(nullptr);
    Kokkos::Tools::Experimental::set_pop_region_callback(nullptr);
  }
};

bool pushed(const std::string& name) { return std::count(events.begin(), events.end(), "+" + name) > 0; }

}  // namespace

// A tool sees the σ-MoE layer's forward and backward and the pieces the GPU profile splits them
// into, every region popped again.
TEST(ProfileRegion, SigmaMoEStepShowsItsPieces) {
  auto layer = model::build_layer<float>(
      "sigma_moe", std::string(R"({"dmodel": 8, "n_experts": 4, "expert_size": 6, "k": 2, "dropout": 0.0})"), 1);
  model::LayerInputs<float> inputs;
  inputs.x = make_tensor<float>({2, 5, 8}, random_values(80, 3, -1, 1));
  Generator rng(2);
  const RecordRegions record;
  const auto f = layer->forward(inputs, true, rng);
  layer->backward(f, make_tensor<float>({2, 5, 8}, random_values(80, 4, -1, 1)), 1.0f);
  for (const char* name : {"kmoe::sigma_moe::forward", "kmoe::sigma_moe::backward", "kmoe::dispatch_plan",
                           "kmoe::cvmm_forward", "kmoe::cvmm_forward_reduced", "kmoe::cvmm_backward",
                           "kmoe::cvmm_backward_reduced", "kmoe::entropy_reg_forward"}) {
    EXPECT_TRUE(pushed(name)) << name;
  }
  int depth = 0;
  for (const std::string& e : events) {
    depth += e == "-" ? -1 : 1;
    ASSERT_GE(depth, 0) << "a region popped before it was pushed";
  }
  EXPECT_EQ(depth, 0) << "regions left open";
  EXPECT_EQ(events.front(), "+kmoe::sigma_moe::forward");
}
