#include "kmoe/io/atomic_write.hpp"

#include "kmoe/core/error.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>

namespace kmoe::io {

namespace {

std::string errno_text() { return std::strerror(errno); }

// fsync of a file or folder by path.
void sync_path(const std::string& path, bool folder, const std::string& target) {
  const int fd = ::open(path.c_str(), folder ? (O_RDONLY | O_DIRECTORY) : O_RDONLY);
  require(fd >= 0, Status::io_error, target, ": cannot open ", path, " to flush it: ", errno_text());
  const int rc = ::fsync(fd);
  const std::string reason = rc != 0 ? errno_text() : std::string();
  ::close(fd);
  require(rc == 0, Status::io_error, target, ": fsync of ", path, " failed: ", reason);
}

std::string folder_of(const std::string& path) {
  const std::filesystem::path parent = std::filesystem::path(path).parent_path();
  return parent.empty() ? std::string(".") : parent.string();
}

}  // namespace

std::string temporary_path_for(const std::string& path) {
  static std::atomic<unsigned> counter{0};
  const std::filesystem::path target(path);
  return (std::filesystem::path(folder_of(path)) /
          ("." + target.filename().string() + ".tmp-" + std::to_string(::getpid()) + "-" +
           std::to_string(counter++)))
      .string();
}

void write_atomically(const std::string& path, const std::function<void(const std::string&)>& write,
                      const dist::Communicator& comm) {
  std::string temporary;
  comm.collectively([&] {
    if (comm.rank() != 0) return;
    require(!path.empty(), Status::invalid_argument, "empty output path");
    const std::string folder = folder_of(path);
    require(std::filesystem::is_directory(folder), Status::io_error, path, ": folder ", folder, " does not exist");
    require(::access(folder.c_str(), W_OK) == 0, Status::io_error, path, ": folder ", folder,
            " is not writable: ", errno_text());
    temporary = temporary_path_for(path);
  });
  temporary = comm.broadcast(temporary);
  try {
    comm.collectively([&] { write(temporary); });
  } catch (...) {
    if (comm.rank() == 0) std::remove(temporary.c_str());
    throw;
  }
  comm.collectively([&] {
    if (comm.rank() != 0) return;
    try {
      sync_path(temporary, false, path);
      require(std::rename(temporary.c_str(), path.c_str()) == 0, Status::io_error, path, ": cannot rename ",
              temporary, " over it: ", errno_text());
    } catch (...) {
      std::remove(temporary.c_str());
      throw;
    }
    sync_path(folder_of(path), true, path);
  });
}

}  // namespace kmoe::io
