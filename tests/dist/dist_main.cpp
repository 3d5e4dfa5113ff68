// gtest main of kmoe_dist_tests, run under mpirun: MPI and Kokkos (each rank on its GPU) live for the
// whole run, and only rank 0 prints gtest's report (every rank runs every test; a failure on any
// rank fails the run).
#include "kmoe/dist/rank_runtime.hpp"

#include <gtest/gtest.h>
#include <mpi.h>

#include <cstdio>
#include <string>

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  ::testing::InitGoogleTest(&argc, argv);
  if (rank != 0) {
    auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
  }
  int failed = 0;
  {
    const kmoe::dist::RankRuntime runtime(argc, argv);
    const std::string where = kmoe::dist::rank_report(MPI_COMM_WORLD);
    if (rank == 0) std::fprintf(stderr, "%s", where.c_str());
    failed = RUN_ALL_TESTS();
  }
  int any = 0;
  MPI_Allreduce(&failed, &any, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  MPI_Finalize();
  return any;
}
