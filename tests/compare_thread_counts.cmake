# CvmmDeterminism.ThreadCounts: runs EXE (cvmm_fingerprint) with OMP_NUM_THREADS = 1, 1 and 2 and
# fails unless all three runs print the same bits.
#   cmake -DEXE=<path to cvmm_fingerprint> -P compare_thread_counts.cmake
if(NOT EXE)
  message(FATAL_ERROR "usage: cmake -DEXE=<path to cvmm_fingerprint> -P compare_thread_counts.cmake")
endif()

set(ENV{OMP_PROC_BIND} false)
set(thread_counts 1 1 2)
set(run 0)
foreach(threads IN LISTS thread_counts)
  math(EXPR run "${run} + 1")
  # OpenBLAS reads its own variable before OMP_NUM_THREADS: vary both.
  set(ENV{OMP_NUM_THREADS} ${threads})
  set(ENV{OPENBLAS_NUM_THREADS} ${threads})
  execute_process(COMMAND "${EXE}" RESULT_VARIABLE rc OUTPUT_VARIABLE out_${run} ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "run ${run} (OMP_NUM_THREADS=${threads}) of ${EXE} failed (${rc}):\n${out_${run}}${err}")
  endif()
  # On the OpenMP backend, make sure the thread count really changed.
  if(err MATCHES "execution space OpenMP, concurrency ([0-9]+)" AND NOT CMAKE_MATCH_1 EQUAL threads)
    message(FATAL_ERROR "run ${run}: asked for ${threads} OpenMP threads, Kokkos used ${CMAKE_MATCH_1}")
  endif()
  string(STRIP "${err}" err)
  message(STATUS "run ${run}, OMP_NUM_THREADS=${threads}: ${err}")
endforeach()

if(NOT out_1 STREQUAL out_2)
  message(FATAL_ERROR "two runs with 1 thread differ:\n${out_1}\nversus\n${out_2}")
endif()
if(NOT out_1 STREQUAL out_3)
  message(FATAL_ERROR "1 thread and 2 threads differ:\n${out_1}\nversus\n${out_3}")
endif()
message(STATUS "identical across runs and thread counts:\n${out_1}")
