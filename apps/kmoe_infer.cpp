// kmoe-infer: a trained regression model (a kmoe-train checkpoint of moe_stack) on new inputs,
// in batches, alone or under mpirun (each rank its contiguous rows, the experts placed over the
// ranks as in training, one output file written collectively).
//
//   [mpirun -n W] kmoe-infer CHECKPOINT.h5 --input IN.h5 --output OUT.h5 [--dataset inputs] [--batch 4096]
#include "mpi_app.hpp"
#include "options.hpp"

#include "kmoe/io/checkpoint.hpp"
#include "kmoe/dist/placement.hpp"
#include "kmoe/io/matrix_dataset.hpp"
#include "kmoe/model/builder.hpp"

#include <Kokkos_Core.hpp>
#include <mpi.h>

#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

int main(int argc, char** argv) {
  using namespace kmoe;
  if (const int code = apps::usage_exit_code(argc, argv, 1,
                                            "usage: [mpirun -n W] kmoe-infer CHECKPOINT.h5 --input IN.h5 --output OUT.h5 [--dataset inputs] "
                "[--batch 4096]\n  runs a moe_stack checkpoint on the rows of IN.h5's dataset; writes /outputs\n");
      code >= 0)
    return code;
  return apps::run_mpi_app(argc, argv, "kmoe-infer", [&](const dist::Communicator& comm) {
    const apps::Options options = apps::parse_options(argc, argv, 2, "kmoe-infer");
    std::string input, output, dataset = "inputs";
    for (const auto& [key, value] : options) {
      if (key == "--input") input = value;
      else if (key == "--output") output = value;
      else if (key == "--dataset") dataset = value;
      else require(key == "--batch", Status::invalid_argument, "kmoe-infer: unknown option ", key);
    }
    const long batch = apps::positive_option(options, "--batch", 4096, "kmoe-infer");
    require(!input.empty() && !output.empty(), Status::invalid_argument, "kmoe-infer: --input and --output are required");
    std::unique_ptr<model::Layer<float>> layer;
    std::unique_ptr<io::MatrixDataset> data;
    comm.collectively([&] {
      const io::CheckpointReader reader(argv[1]);
      require(reader.info().model == "moe_stack", Status::invalid_argument, argv[1], ": a '", reader.info().model,
              "' checkpoint is not a regression model (kmoe-infer takes moe_stack; language models run with "
              "kmoe-generate)");
      layer = model::build_layer<float>("moe_stack", reader.info().config, 0, ParameterInit::zeros, comm);
      data = std::make_unique<io::MatrixDataset>(input, dataset);
      const std::int64_t d_in = reader.info().config.at("d_in").get<std::int64_t>();
      require(data->cols() == d_in, Status::shape_mismatch, input, ": /", dataset, " has ", data->cols(),
              " columns, the model takes d_in = ", d_in);
    });
    io::load_checkpoint(argv[1], *layer);
    const std::int64_t rows = data->rows(), W = comm.size(), r = comm.rank();
    const std::int64_t first = r * (rows / W) + std::min(r, rows % W), count = rows / W + (r < rows % W ? 1 : 0);
    const std::int64_t d_out = layer->config().at("d_out").get<std::int64_t>();
    // Every rank runs the same number of batches (the experts' exchanges are collective).
    std::int64_t batches = 0;
    for (const std::int64_t n : comm.all_gather(count)) batches = std::max<std::int64_t>(batches, (n + batch - 1) / batch);
    std::vector<double> outputs;
    const auto start = std::chrono::steady_clock::now();
    Generator rng(0);
    for (std::int64_t b = 0; b < batches; ++b) {
      const std::int64_t at = std::min(count, b * batch), n = std::min<std::int64_t>(batch, count - at);
      const std::vector<double> x = data->read_rows(first + at, n);
      model::LayerInputs<float> in;
      in.x = Tensor<float>::from_host("infer::x", {n, data->cols()}, std::vector<float>(x.begin(), x.end()));
      comm.collectively([&] { require_finite(in.x, input + ": /" + dataset); });
      const Tensor<float> y = layer->infer(in, rng);
      if (n > 0) {
        const std::vector<float> values = y.to_host();
        outputs.insert(outputs.end(), values.begin(), values.end());
      }
    }
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    io::write_matrices(output, {{"outputs", outputs, first, rows, d_out}}, comm);
    if (r == 0)
      std::printf("kmoe-infer: %lld rows of %s:/%s through %s on %lld rank%s in %.2f s (%.0f rows/s); wrote %s:/outputs "
                  "[%lld, %lld]\n",
                  static_cast<long long>(rows), input.c_str(), dataset.c_str(), argv[1], static_cast<long long>(W),
                  W > 1 ? "s" : "", seconds, static_cast<double>(rows) / std::max(seconds, 1e-9), output.c_str(),
                  static_cast<long long>(rows), static_cast<long long>(d_out));
    return 0;
  });
}
