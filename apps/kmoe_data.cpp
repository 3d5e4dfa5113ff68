// kmoe-data: a plain text file as a byte-level token dataset for kmoe-train (io/token_dataset.hpp),
// or a regression dataset of a known function (a smoke test of the regression task).
//
//   kmoe-data TEXT OUT.h5 [--eval-fraction 0.05]
//   kmoe-data --regression OUT.h5 [--rows 4096]   inputs [rows, 3] uniform in [-1, 1], targets [rows, 2]
//                                                  = (sin(2 x0) x1, x2^2 - x0 / 2)
#include "options.hpp"

#include "kmoe/io/matrix_dataset.hpp"
#include "kmoe/io/token_dataset.hpp"

#include <cmath>
#include <random>

#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>

int main(int argc, char** argv) {
  using namespace kmoe;
  if (const int code = apps::usage_exit_code(argc, argv, 2,
                                            "usage: kmoe-data TEXT OUT.h5 [--eval-fraction F] | kmoe-data --regression OUT.h5 [--rows N]\n"
                "  writes TEXT's bytes as token ids (vocabulary 256): /train (the first 1 - F) and /eval\n"
                "  (the last F, default 0.05) of OUT.h5, crash-safely\n");
      code >= 0)
    return code;
  try {
    if (std::string(argv[1]) == "--regression") {
      const apps::Options options = apps::parse_options(argc, argv, 3, "kmoe-data");
      long rows = 4096;
      for (const auto& [key, value] : options) {
        require(key == "--rows", Status::invalid_argument, "kmoe-data: unknown option ", key);
        rows = apps::positive_option(options, key, 4096, "kmoe-data");
      }
      std::mt19937_64 gen(7);
      std::uniform_real_distribution<double> u(-1, 1);
      io::MatrixPart inputs{"inputs", {}, 0, rows, 3}, targets{"targets", {}, 0, rows, 2};
      for (long r = 0; r < rows; ++r) {
        const double x0 = u(gen), x1 = u(gen), x2 = u(gen);
        inputs.values.insert(inputs.values.end(), {x0, x1, x2});
        targets.values.insert(targets.values.end(), {std::sin(2 * x0) * x1, x2 * x2 - x0 / 2});
      }
      io::write_matrices(argv[2], {inputs, targets}, dist::Communicator());
      std::printf("kmoe-data: wrote %s: /inputs [%ld, 3], /targets [%ld, 2] = (sin(2 x0) x1, x2^2 - x0 / 2)\n",
                  argv[2], rows, rows);
      return 0;
    }
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
