// kmoe-generate: text from a trained language model (a kmoe-train checkpoint of moeut_lm) with the
// KV cache: greedy (the default), or sampled with a temperature and top-k from a seed.
//
//   kmoe-generate CHECKPOINT.h5 --prompt TEXT [--tokens N] [--temperature T] [--top-k K] [--seed S]
#include "options.hpp"

#include "kmoe/io/checkpoint.hpp"
#include "kmoe/layers/moeut.hpp"

#include <Kokkos_Core.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <string>
#include <vector>

namespace {

// The next token from the last position's logits: the argmax at temperature 0, else a draw from
// softmax(logits / temperature) over the top_k largest (all when 0), uniform u in [0, 1).
int next_token(const std::vector<float>& logits, double temperature, int top_k, double u) {
  if (temperature <= 0) return static_cast<int>(std::max_element(logits.begin(), logits.end()) - logits.begin());
  std::vector<int> order(logits.size());
  std::iota(order.begin(), order.end(), 0);
  const std::size_t keep = top_k > 0 ? std::min<std::size_t>(static_cast<std::size_t>(top_k), order.size()) : order.size();
  std::partial_sort(order.begin(), order.begin() + static_cast<std::ptrdiff_t>(keep), order.end(),
                    [&](int a, int b) { return logits[static_cast<std::size_t>(a)] > logits[static_cast<std::size_t>(b)]; });
  const double top = logits[static_cast<std::size_t>(order[0])];
  std::vector<double> weights(keep);
  double total = 0;
  for (std::size_t i = 0; i < keep; ++i)
    total += weights[i] = std::exp((logits[static_cast<std::size_t>(order[i])] - top) / temperature);
  double at = u * total;
  for (std::size_t i = 0; i < keep; ++i)
    if ((at -= weights[i]) < 0) return order[i];
  return order[keep - 1];
}

}  // namespace

int main(int argc, char** argv) {
  using namespace kmoe;
  if (const int code = apps::usage_exit_code(argc, argv, 1,
                                            "usage: kmoe-generate CHECKPOINT.h5 --prompt TEXT [--tokens 200] [--temperature 0] [--top-k 0] "
                "[--seed 0]\n  continues TEXT with a moeut_lm checkpoint (byte tokens), using the KV cache;\n"
                "  temperature 0 is greedy, otherwise a draw from the top-k tokens (0: all)\n");
      code >= 0)
    return code;
  Kokkos::ScopeGuard kokkos(argc, argv);
  try {
    const apps::Options options = apps::parse_options(argc, argv, 2, "kmoe-generate");
    std::string prompt;
    long n_new = 200, top_k = 0;
    double temperature = 0;
    std::uint64_t seed = 0;
    for (const auto& [key, value] : options) {
      if (key == "--prompt") prompt = value;
      else if (key == "--tokens") n_new = apps::positive_option(options, key, 200, "kmoe-generate");
      else if (key == "--temperature") temperature = std::stod(value);
      else if (key == "--top-k") top_k = std::stol(value);
      else if (key == "--seed") seed = std::stoull(value);
      else fail(Status::invalid_argument, "kmoe-generate: unknown option ", key);
    }
    require(!prompt.empty(), Status::invalid_argument, "kmoe-generate: --prompt TEXT is required");
    require(temperature >= 0 && std::isfinite(temperature) && top_k >= 0, Status::invalid_argument,
            "kmoe-generate: --temperature must be >= 0 and --top-k >= 0");
    const io::CheckpointReader reader(argv[1]);
    require(reader.info().model == "moeut_lm", Status::invalid_argument, argv[1], ": a '", reader.info().model,
            "' checkpoint is not a language model (kmoe-generate takes moeut_lm; regression models run with "
            "kmoe-infer)");
    const auto layer = io::load_layer<float>(argv[1]);
    const layers::MoEUTLM<float>& model = *layer->as<layers::MoEUTLM<float>>();
    const int V = static_cast<int>(model.config().n_tokens);

    std::vector<int> tokens;
    for (const unsigned char ch : prompt) tokens.push_back(ch);
    layers::MoEUTCache<float> cache;
    Generator rng(seed);
    std::string text;
    const auto start = std::chrono::steady_clock::now();
    Tensor<int> step = Tensor<int>::from_host("generate::prompt", {1, static_cast<index_t>(tokens.size())}, tokens);
    for (long i = 0; i < n_new; ++i) {
      const auto f = model.forward(step, std::nullopt, false, rng, &cache);
      const std::vector<float> logits = f.logits.to_host();
      const std::vector<float> last(logits.end() - V, logits.end());
      std::uint32_t r[4];
      impl::philox4x32(seed, static_cast<std::uint64_t>(i), r);
      const int token = next_token(last, temperature, static_cast<int>(top_k), r[0] * (1.0 / 4294967296.0));
      text.push_back(static_cast<char>(token));
      step = Tensor<int>::from_host("generate::token", {1, 1}, {token});
    }
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    std::printf("%s%s\n", prompt.c_str(), text.c_str());
    std::fprintf(stderr, "kmoe-generate: %ld tokens in %.2f s (%.0f tokens/s, KV cache, %s)\n", n_new, seconds,
                 static_cast<double>(n_new) / seconds,
                 temperature > 0 ? ("temperature " + std::to_string(temperature) + ", top-k " + std::to_string(top_k) +
                                    ", seed " + std::to_string(seed)).c_str()
                                 : "greedy");
    return 0;
  } catch (const Error& e) {
    std::fprintf(stderr, "kmoe-generate: %s\n", e.what());
    return 2;
  }
}
