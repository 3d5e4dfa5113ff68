// Test helper of the checkpoint tests.
//   checkpoint_writer PATH FIRST_SEED        saves σ-MoE checkpoints to PATH in an endless loop,
//       version s built from seed s (recorded in /train), s = FIRST_SEED, FIRST_SEED + 1, ... until
//       killed (Checkpoint.WriterKilledMidSaveLeavesALoadableCheckpoint);
//   checkpoint_writer --limited PATH BYTES   saves one large checkpoint under a file size limit of
//       BYTES (a full disk) and prints the error; then, the limit lifted, saves it to PATH.retry.h5
//       and loads it back; exits normally (Kokkos and HDF5 shut down) with 3 when the first save
//       was Status::io_error and the retry worked.
#include "kmoe/io/checkpoint.hpp"
#include "kmoe/model/builder.hpp"

#include <sys/resource.h>
#include <unistd.h>

#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <string>

int main(int argc, char** argv) {
  if (argc == 4 && std::string(argv[1]) == "--limited") {
    Kokkos::ScopeGuard kokkos(argc, argv);
    const auto big = kmoe::model::build_layer<float>(
        "sigma_moe", std::string(R"({"dmodel": 256, "n_experts": 16, "expert_size": 256, "k": 2})"), 2);
    std::signal(SIGXFSZ, SIG_IGN);
    rlimit limit{};
    getrlimit(RLIMIT_FSIZE, &limit);
    const rlimit unlimited = limit;
    limit.rlim_cur = std::strtoull(argv[3], nullptr, 10);
    setrlimit(RLIMIT_FSIZE, &limit);
    kmoe::Status status = kmoe::Status::ok;
    try {
      kmoe::io::save_checkpoint(argv[2], *big);
    } catch (const kmoe::Error& e) {
      std::printf("%s: %s\n", kmoe::status_name(e.status()), e.what());
      status = e.status();
    }
    setrlimit(RLIMIT_FSIZE, &unlimited);
    const std::string retry = std::string(argv[2]) + ".retry.h5";
    kmoe::io::save_checkpoint(retry, *big);
    kmoe::io::load_checkpoint(retry, *big);
    std::printf("retry: saved and loaded %s\n", retry.c_str());
    return status == kmoe::Status::io_error ? 3 : 4;
  }
  if (argc != 3) {
    std::fprintf(stderr, "usage: checkpoint_writer PATH FIRST_SEED | --limited PATH BYTES\n");
    return 2;
  }
  Kokkos::ScopeGuard kokkos(argc, argv);
  const std::string config = R"({"dmodel": 64, "n_experts": 16, "expert_size": 64, "k": 2})";
  for (std::uint64_t seed = std::strtoull(argv[2], nullptr, 10);; ++seed) {
    const auto layer = kmoe::model::build_layer<float>("sigma_moe", config, seed);
    kmoe::io::CheckpointExtras<float> extras;
    extras.train = {{"seed", seed}};
    kmoe::io::save_checkpoint(argv[1], *layer, extras);
  }
}
