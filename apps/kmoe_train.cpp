// kmoe-train: trains a model from a config file, on one rank or under mpirun (experts placed over
// the ranks). README "Training: kmoe-train" documents every config key (train/train_config.hpp).
//
//   mpirun -n W kmoe-train CONFIG.json [--resume]
#include "mpi_app.hpp"
#include "options.hpp"

#include "kmoe/train/trainer.hpp"

#include <Kokkos_Core.hpp>
#include <mpi.h>
#include <unistd.h>

#include <algorithm>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>

namespace {

void on_signal(int) { kmoe::train::request_stop(); }

// The loss curve as a PNG beside the metrics (gnuplot, when installed); its path, or "".
std::string plot_losses(const std::string& metrics, const std::string& out_dir) {
  if (std::system("command -v gnuplot > /dev/null 2>&1") != 0) return "";
  const std::string png = (std::filesystem::path(out_dir) / "loss.png").string();
  const std::string script = (std::filesystem::path(out_dir) / "loss.gnuplot").string();
  std::ofstream(script) << "set terminal png size 900,500\nset output '" << png << "'\n"
                        << "set datafile separator ','\nset key top right\nset xlabel 'step'\n"
                        << "set ylabel 'cross-entropy (nats)'\nset grid\n"
                        << "plot '" << metrics << "' using 1:2 skip 1 with lines lw 2 title 'train', \\\n"
                        << "     '' using 1:3 skip 1 with linespoints pt 7 title 'eval'\n";
  return std::system(("gnuplot '" + script + "' 2> /dev/null").c_str()) == 0 ? png : "";
}

}  // namespace

int main(int argc, char** argv) {
  using namespace kmoe;
  if (const int code = apps::usage_exit_code(argc, argv, 1,
                                            "usage: [mpirun -n W] kmoe-train CONFIG.json [--resume] [--stop-after STEP]\n"
                "  trains the config's model on its token dataset; README \"Training\" lists every key.\n"
                "  --resume continues from the newest checkpoint in out_dir (at any W).\n"
                "  --stop-after STEP stops after that step with a checkpoint, as SIGTERM does.\n"
                "  SIGINT / SIGTERM: a final checkpoint, then a clean exit.\n");
      code >= 0)
    return code;
  return apps::run_mpi_app(argc, argv, "kmoe-train", [&](const dist::Communicator& comm) {
    std::signal(SIGINT, on_signal);
    std::signal(SIGTERM, on_signal);
    bool resume = false;
    long stop_after = 0;
    for (int i = 2; i < argc; ++i) {
      const std::string arg = argv[i];
      if (arg == "--resume") {
        resume = true;
      } else if (arg == "--stop-after" && i + 1 < argc) {
        stop_after = std::stol(argv[++i]);
        require(stop_after >= 1, Status::invalid_argument, "kmoe-train: --stop-after needs a step >= 1");
      } else {
        fail(Status::invalid_argument, "kmoe-train: unknown argument ", arg);
      }
    }
    std::ifstream in(argv[1]);
    require(in.good(), Status::io_error, argv[1], ": cannot open the config");
    std::ostringstream text;
    text << in.rdbuf();
    const train::TrainConfig config = train::parse_train_config(text.str(), argv[1]);
    train::TrainOptions options;
    options.resume = resume;
    options.log = &std::cout;
    options.stop_after = stop_after;
    // Under mpirun stdout is Open MPI's pseudo-terminal even when piped: lines only there.
    options.progress_bar = comm.rank() == 0 && ::isatty(STDOUT_FILENO) != 0 && std::getenv("OMPI_COMM_WORLD_SIZE") == nullptr;
    const train::TrainSummary s = train::run_training(config, comm, options);
    if (comm.rank() == 0) {
      const std::string png = plot_losses(s.metrics_path, config.out_dir);
      const bool lm = config.task == "lm";
      std::printf("kmoe-train: steps %lld-%lld%s: loss %.4f -> %.4f, eval loss %.4f (%s %.4f), %.0f %s/s\n",
                  static_cast<long long>(s.first_step), static_cast<long long>(s.last_step),
                  s.stopped ? " (stopped on request)" : "", s.initial_loss, s.final_loss, s.final_eval_loss,
                  lm ? "unigram entropy of the training text, nats:" : "variance of the training targets:",
                  s.baseline_loss, s.tokens_per_second, lm ? "tokens" : "rows");
      const double total = std::max(s.seconds, 1e-9);
      std::printf("kmoe-train: time %.1f s: data %.1f%%, eval %.1f%%, checkpoints %.1f%%, logging %.1f%%, the rest "
                  "(forward, backward, optimizer) %.1f%%\n",
                  s.seconds, 100 * s.data_seconds / total, 100 * s.eval_seconds / total,
                  100 * s.checkpoint_seconds / total, 100 * s.log_seconds / total,
                  100 * (1 - (s.data_seconds + s.eval_seconds + s.checkpoint_seconds + s.log_seconds) / total));
      std::printf("kmoe-train: wrote %s (last checkpoint), %s (metrics)%s%s\n", s.last_checkpoint.c_str(),
                  s.metrics_path.c_str(), png.empty() ? "" : ", ", png.empty() ? "" : (png + " (loss curve)").c_str());
    }
    return 0;
  });
}
