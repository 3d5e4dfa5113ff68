#include "kmoe/io/atomic_write.hpp"

#include "kmoe/core/error.hpp"

#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
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

// ".<name>.tmp-<host>-": the start of this host's temporary names for path.
std::string temporary_prefix(const std::string& path) {
  char host[256] = {};
  if (::gethostname(host, sizeof(host) - 1) != 0) std::strcpy(host, "localhost");
  return "." + std::filesystem::path(path).filename().string() + ".tmp-" + host + "-";
}

// Removes the temporary files of path that writers of this host left when they were killed (their
// process no longer exists); a writer killed mid-save otherwise leaves a checkpoint-sized file
// behind every time. Other hosts' temporaries are left alone: their processes cannot be asked.
void remove_abandoned_temporaries(const std::string& path) {
  const std::string prefix = temporary_prefix(path);
  std::error_code error;
  for (const auto& entry : std::filesystem::directory_iterator(folder_of(path), error)) {
    const std::string name = entry.path().filename().string();
    if (name.compare(0, prefix.size(), prefix) != 0) continue;
    char* end = nullptr;
    const long pid = std::strtol(name.c_str() + prefix.size(), &end, 10);
    if (pid <= 0 || end == nullptr || *end != '-' || pid == ::getpid()) continue;
    if (::kill(static_cast<pid_t>(pid), 0) != 0 && errno == ESRCH) std::filesystem::remove(entry.path(), error);
  }
}

}  // namespace

std::string temporary_path_for(const std::string& path) {
  static std::atomic<unsigned> counter{0};
  return (std::filesystem::path(folder_of(path)) /
          (temporary_prefix(path) + std::to_string(::getpid()) + "-" + std::to_string(counter++)))
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
    remove_abandoned_temporaries(path);
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
