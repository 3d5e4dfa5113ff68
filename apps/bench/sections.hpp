// The sections kmoe-bench runs, one per layer family, each in bench/<layer>.cpp. A section
// measures its baseline and its cases in the same run and returns them as a table. A new layer
// family adds its section function and one line to bench_sections().
#pragma once

#include "options.hpp"
#include "report.hpp"

#include "kmoe/layers/moeut.hpp"

#include <vector>

namespace kmoe::apps {

// A section gets the command line's "--key value" options meant for it.
using BenchSectionFn = BenchTable (*)(const Options& options, int repeats);

struct BenchSection {
  const char* name;
  const char* options;  // the keys it reads (for the usage line)
  BenchSectionFn run;
};

BenchTable bench_sigma_moe(const Options& options, int repeats);
BenchTable bench_moeut(const Options& options, int repeats);
BenchTable bench_soft_moe(const Options& options, int repeats);
BenchTable bench_st_moe(const Options& options, int repeats);
BenchTable bench_checkpoint(const Options& options, int repeats);
BenchTable bench_dist(const Options& options, int repeats);         // under mpirun only
BenchTable bench_dist_moeut(const Options& options, int repeats);   // under mpirun only

// The MoEUT profile the moeut sections run: small enough for a two-core CPU.
layers::MoEUTConfig moeut_tiny_profile();
// Matmul FLOPs of one MoEUT LM forward over batch × seq tokens.
double moeut_forward_flops(const layers::MoEUTConfig& c, index_t batch, index_t seq);

inline const std::vector<BenchSection>& bench_sections() {
  static const std::vector<BenchSection> sections = {
      {"sigma_moe", "--tokens --dmodel --experts --expert-size --k --precision", bench_sigma_moe},
      {"moeut", "--profile --vocab --batch --seq --precision", bench_moeut},
      {"soft_moe", "--batch --seq --dim --experts --slots --precision", bench_soft_moe},
      {"st_moe", "--batch --seq --dim --experts --top-n --precision", bench_st_moe},
      {"checkpoint", "--profile --vocab --dir", bench_checkpoint},
      {"dist", "--tokens --dmodel --experts --expert-size --k", bench_dist},
      {"dist-moeut", "--batch --seq", bench_dist_moeut},
  };
  return sections;
}

}  // namespace kmoe::apps
