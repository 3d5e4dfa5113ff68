// kmoe's error model: every failure is a kmoe::Error carrying a Status code (the C ABI returns
// the code and keeps the message) and a message that names the offending argument or dataset.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace kmoe {

enum class Status : int {
  ok = 0,
  invalid_argument = 1,  // a value out of range: k > experts, negative dropout, unknown mode
  shape_mismatch = 2,    // a tensor's shape differs from what the operation needs
  non_finite = 3,        // NaN or Inf where finite values are required
  io_error = 4,          // a file that cannot be opened, read or written (missing, unwritable, disk full)
  out_of_memory = 5,
  internal = 6,          // a broken invariant inside kmoe
  corrupt_file = 7,      // a file that opens but whose contents are damaged or inconsistent
  unsupported = 8,       // a valid request kmoe does not implement
  mpi_error = 9,         // MPI failed, or another rank failed in a collective step
};

const char* status_name(Status status);

class Error : public std::runtime_error {
 public:
  Error(Status status, const std::string& message)
      : std::runtime_error(message), status_(status) {}
  Status status() const { return status_; }

 private:
  Status status_;
};

namespace impl {
template <class... Parts>
std::string concat(const Parts&... parts) {
  std::ostringstream out;
  (out << ... << parts);
  return out.str();
}
}  // namespace impl

// Throws Error(status, message built from the parts) when the condition fails.
template <class... Parts>
void require(bool condition, Status status, const Parts&... parts) {
  if (!condition) throw Error(status, impl::concat(parts...));
}

template <class... Parts>
[[noreturn]] void fail(Status status, const Parts&... parts) {
  throw Error(status, impl::concat(parts...));
}

}  // namespace kmoe
