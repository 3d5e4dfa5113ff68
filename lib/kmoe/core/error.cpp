#include "kmoe/core/error.hpp"

namespace kmoe {

const char* status_name(Status status) {
  switch (status) {
    case Status::ok: return "ok";
    case Status::invalid_argument: return "invalid argument";
    case Status::shape_mismatch: return "shape mismatch";
    case Status::non_finite: return "non-finite value";
    case Status::io_error: return "I/O error";
    case Status::out_of_memory: return "out of memory";
    case Status::internal: return "internal error";
    case Status::corrupt_file: return "corrupt file";
    case Status::unsupported: return "unsupported";
    case Status::mpi_error: return "MPI error";
  }
  return "unknown status";
}

}  // namespace kmoe
