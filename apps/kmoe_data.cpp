// kmoe-data: a plain text file as a byte-level token dataset for kmoe-train (io/token_dataset.hpp).
//
//   kmoe-data TEXT OUT.h5 [--eval-fraction 0.05]
#include "options.hpp"

#include "kmoe/io/token_dataset.hpp"

#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>

int main(int argc, char** argv) {
  using namespace kmoe;
  if (apps::asks_for_help(argc, argv) || argc < 3) {
    std::printf("usage: kmoe-data TEXT OUT.h5 [--eval-fraction F]\n"
                "  writes TEXT's bytes as token ids (vocabulary 256): /train (the first 1 - F) and /eval\n"
                "  (the last F, default 0.05) of OUT.h5, crash-safely\n");
    return argc < 3 && !apps::asks_for_help(argc, argv) ? 2 : 0;
  }
  try {
    const apps::Options options = apps::parse_options(argc, argv, 3, "kmoe-data");
    double eval_fraction = 0.05;
    for (const auto& [key, value] : options) {
      require(key == "--eval-fraction", Status::invalid_argument, "kmoe-data: unknown option ", key);
      eval_fraction = std::stod(value);
    }
    std::ifstream in(argv[1], std::ios::binary);
    require(in.good(), Status::io_error, argv[1], ": cannot open the text");
    std::ostringstream text;
    text << in.rdbuf();
    io::write_token_dataset(argv[2], text.str(), eval_fraction, argv[1]);
    const std::size_t n = text.str().size();
    std::printf("kmoe-data: wrote %s: %zu tokens of %s (%zu train, %zu eval), vocabulary 256\n", argv[2], n, argv[1],
                n - static_cast<std::size_t>(static_cast<double>(n) * eval_fraction),
                static_cast<std::size_t>(static_cast<double>(n) * eval_fraction));
    return 0;
  } catch (const Error& e) {
    std::fprintf(stderr, "kmoe-data: %s\n", e.what());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "kmoe-data: %s\n", e.what());
    return 2;
  }
}
