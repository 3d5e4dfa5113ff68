// The frame of the apps that run under mpirun (kmoe-train, kmoe-infer): MPI and Kokkos (each rank on
// its GPU, where it runs and how MPI moves device data printed by rank 0) up around the body, and an
// error printed once, by rank 0, as "<app>: error: <message>".
#pragma once

#include "kmoe/core/error.hpp"
#include "kmoe/dist/communicator.hpp"
#include "kmoe/dist/rank_runtime.hpp"

#include <Kokkos_Core.hpp>
#include <mpi.h>

#include <cstdio>
#include <functional>
#include <string>

namespace kmoe::apps {

// body's exit code; 2 for an error (3 for a non-finite value, which a driver tells apart).
inline int run_mpi_app(int& argc, char**& argv, const char* app,
                       const std::function<int(const dist::Communicator& comm)>& body) {
  MPI_Init(&argc, &argv);
  int status = 0;
  {
    const dist::RankRuntime runtime(argc, argv);
    const std::string where = dist::rank_report(MPI_COMM_WORLD);  // collective: before anything may fail
    const dist::Communicator comm(MPI_COMM_WORLD);
    if (comm.rank() == 0) std::fprintf(stderr, "%s", where.c_str());
    try {
      status = body(comm);
    } catch (const Error& e) {
      if (comm.rank() == 0) std::fprintf(stderr, "%s: error: %s\n", app, e.what());
      status = e.status() == Status::non_finite ? 3 : 2;
    } catch (const std::exception& e) {
      if (comm.rank() == 0) std::fprintf(stderr, "%s: error: %s\n", app, e.what());
      status = 2;
    }
  }
  MPI_Finalize();
  return status;
}

}  // namespace kmoe::apps
