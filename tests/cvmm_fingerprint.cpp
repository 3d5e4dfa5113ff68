// Prints the exact bits of a fixed CVMM forward + backward (per-token x reduced with gates, and
// per-pair x unreduced), one hash line per result. compare_thread_counts.cmake runs it under
// several OpenMP thread counts: CVMM's results must not depend on the thread count.
#include "kmoe/moe/cvmm.hpp"
#include "kmoe/core/tensor.hpp"

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

using namespace kmoe;

namespace {

constexpr index_t tokens = 512, K = 600, M = 520;  // inner dimensions past where BLAS drivers re-block
constexpr int k = 4, experts = 37;

Tensor<float> random_tensor(const std::string& label, const Shape& shape, std::mt19937_64& gen) {
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  std::vector<float> values(shape.size());
  for (auto& v : values) v = dist(gen);
  return Tensor<float>::from_host(label, shape, values);
}

// FNV-1a over the bytes of the values, then the bits of the first and last element.
void print_fingerprint(const char* name, const Tensor<float>& t) {
  const auto values = t.to_host();
  std::uint64_t hash = 0xcbf29ce484222325ull;
  const auto* bytes = reinterpret_cast<const unsigned char*>(values.data());
  for (std::size_t i = 0; i < values.size() * sizeof(float); ++i) hash = (hash ^ bytes[i]) * 0x100000001b3ull;
  std::uint32_t first = 0, last = 0;
  std::memcpy(&first, &values.front(), sizeof first);
  std::memcpy(&last, &values.back(), sizeof last);
  std::printf("%-16s %8zu values  fnv1a %016llx  first %08x  last %08x\n", name, values.size(),
              static_cast<unsigned long long>(hash), first, last);
}

}  // namespace

int main(int argc, char** argv) {
  Kokkos::ScopeGuard kokkos(argc, argv);
  std::fprintf(stderr, "execution space %s, concurrency %d\n", ExecSpace::name(), ExecSpace::concurrency());

  std::mt19937_64 gen(20240611);
  // Distinct experts per token, skewed towards low ids so expert sizes differ widely.
  std::vector<int> expert_index(tokens * k);
  for (index_t t = 0; t < tokens; ++t) {
    std::vector<int> pool(experts);
    std::iota(pool.begin(), pool.end(), 0);
    for (int j = 0; j < k; ++j) {
      const std::uint64_t n = experts - j, a = gen() % n, b = gen() % n;
      const int pick = j + static_cast<int>(a * b / n);  // a product of uniforms: skewed towards j
      std::swap(pool[j], pool[pick]);
      expert_index[t * k + j] = pool[j];
    }
  }
  const auto index = Tensor<int>::from_host("expert_index", {tokens, k}, expert_index);
  const auto plan = moe::DispatchPlan::build(index.as_matrix(), experts);

  const auto x = random_tensor("x", {tokens, K}, gen);
  const auto x_pairs = random_tensor("x_pairs", {tokens * k, K}, gen);
  const auto w = random_tensor("w", {experts, K, M}, gen);
  const auto gates = random_tensor("gates", {tokens, k}, gen);
  const auto dy = random_tensor("dy", {tokens, M}, gen);
  const auto dy_pairs = random_tensor("dy_pairs", {tokens * k, M}, gen);

  Tensor<float> y("y", {tokens, M}), y_pairs("y_pairs", {tokens * k, M}), dx("dx", {tokens, K}),
      dw("dw", {experts, K, M}), dgates("dgates", {tokens, k});
  moe::cvmm_forward<float>(plan, x.as_matrix(), w.view<3>(), y_pairs.as_matrix());
  moe::cvmm_forward_reduced<float>(plan, x.as_matrix(), w.view<3>(), gates.as_matrix(), y.as_matrix());
  moe::cvmm_backward_reduced<float>(plan, x.as_matrix(), w.view<3>(), gates.as_matrix(), dy.as_matrix(),
                                    dx.as_matrix(), dw.view<3>(), dgates.as_matrix());

  Tensor<float> y2_pairs("y2_pairs", {tokens * k, M}), dx2("dx2", {tokens * k, K});
  moe::cvmm_forward<float>(plan, x_pairs.as_matrix(), w.view<3>(), y2_pairs.as_matrix());
  // dw accumulates the per-pair gradient on top of the reduced one.
  moe::cvmm_backward<float>(plan, x_pairs.as_matrix(), w.view<3>(), dy_pairs.as_matrix(), dx2.as_matrix(),
                            dw.view<3>());

  print_fingerprint("y", y);
  print_fingerprint("y_pairs", y_pairs);
  print_fingerprint("dx", dx);
  print_fingerprint("dgates", dgates);
  print_fingerprint("per-pair y", y2_pairs);
  print_fingerprint("per-pair dx", dx2);
  print_fingerprint("dw (both)", dw);
  return 0;
}
