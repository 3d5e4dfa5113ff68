// The layers kmoe-parity can check: the fixture's `layer` attribute names the runner, which
// builds the layer from the config, loads the parameters, runs it in the stated mode and
// compares every output and gradient through the Report. A new layer family adds its runner
// (parity/<layer>.cpp, instantiated for float and double) and one line to layer_runners().
#pragma once

#include "fixture.hpp"

#include "kmoe/core/error.hpp"

#include <string>
#include <vector>

namespace kmoe::parity {

using RunFn = void (*)(const Fixture&, Report&);

struct LayerRunner {
  const char* layer;
  RunFn run_float;   // float32 dumps
  RunFn run_double;  // float64 dumps
};

template <class T>
void run_sigma_moe(const Fixture& fixture, Report& report);
template <class T>
void run_moeut(const Fixture& fixture, Report& report);
template <class T>
void run_moeut_lm(const Fixture& fixture, Report& report);
template <class T>
void run_soft_moe_lite(const Fixture& fixture, Report& report);
template <class T>
void run_soft_moe_lucidrains(const Fixture& fixture, Report& report);

template <class T>
void run_st_moe(const Fixture& fixture, Report& report);  // st_moe.cpp: the st-moe-pytorch layers below

inline const std::vector<LayerRunner>& layer_runners() {
  static const std::vector<LayerRunner> runners = {
      {"sigma_moe", run_sigma_moe<float>, run_sigma_moe<double>},
      {"moeut", run_moeut<float>, run_moeut<double>},
      {"moeut_lm", run_moeut_lm<float>, run_moeut_lm<double>},
      {"soft_moe_lite", run_soft_moe_lite<float>, run_soft_moe_lite<double>},
      {"soft_moe_lucidrains", run_soft_moe_lucidrains<float>, run_soft_moe_lucidrains<double>},
      {"st_moe", run_st_moe<float>, run_st_moe<double>},
      {"st_moe_block", run_st_moe<float>, run_st_moe<double>},
      {"st_moe_v0014", run_st_moe<float>, run_st_moe<double>},
      {"hier_moe_v0014", run_st_moe<float>, run_st_moe<double>},
      {"st_moe_block_v0014", run_st_moe<float>, run_st_moe<double>},
  };
  return runners;
}

// Runs the fixture's layer in the fixture's dtype, then checks that nothing in the dump was
// left unchecked. An unknown layer throws, listing the known ones.
inline void run_layer(const Fixture& fixture, Report& report) {
  std::string known;
  for (const LayerRunner& runner : layer_runners()) {
    if (fixture.layer() == runner.layer) {
      (fixture.dtype() == io::Dtype::float64 ? runner.run_double : runner.run_float)(fixture, report);
      fixture.require_all_used();
      return;
    }
    known += (known.empty() ? "" : ", ") + std::string(runner.layer);
  }
  fail(Status::invalid_argument, "unknown layer '", fixture.layer(), "' (kmoe-parity knows: ",
       known, ")");
}

}  // namespace kmoe::parity
