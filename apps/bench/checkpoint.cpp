// kmoe-bench section "checkpoint": save and load of a MoEUT-sized MoEUTLM (default MoEUT_244M,
// vocabulary 8000: 243M parameters, 973 MB of float32) on the host, against the same bytes
// written and read as one raw file in the same folder, measured in the same run:
//   raw write    one ::write of the parameters' bytes from one buffer, then fsync (the write baseline)
//   save         io::save_checkpoint: HDF5, chunked + Fletcher32, fsync, rename, folder fsync
//   raw read     ::read of the raw file into a buffer (the read baseline)
//   load         io::load_checkpoint into the built layer (checks, checksums, copies into the tensors)
//   verify       the kmoe-inspect beside kmoe-bench, run as a process: kmoe-inspect --verify
//                (every checksum, statistics of every parameter, the config's layer built and
//                checked against the stored parameters; the target: at most 2 x the raw read time)
// Every rate counts the parameters' bytes, so a ratio is the inverse ratio of the times. Reads run
// twice: warm (each file read and the checkpoint loaded once, untimed, before the timed reads:
// memory-to-memory rates) and
// cold (before every run the file's pages are evicted with posix_fadvise(POSIX_FADV_DONTNEED),
// which needs no root: the files are clean after their fsync). kmoe-bench prints its standard
// table (bench/report.hpp), whose rate column is headed GFLOP/s; it is fed 1000 x the bytes here,
// so the column reads MB/s (10^6 bytes/s). One table per baseline: save against the raw write,
// load and verify against the raw read of the same cache state.
#include "sections.hpp"

#include "kmoe/io/checkpoint.hpp"
#include "kmoe/layers/moeut.hpp"
#include "kmoe/model/builder.hpp"
#include "kmoe/model/config_fields.hpp"

#include <fcntl.h>
#include <spawn.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

extern char** environ;

namespace kmoe::apps {

namespace {

constexpr const char* app = "kmoe-bench checkpoint";

void progress(const std::string& line) {
  std::fprintf(stderr, "checkpoint: %s\n", line.c_str());
  std::fflush(stderr);
}

std::string errno_text() { return std::strerror(errno); }

// Runs the command with stdout and stderr to /dev/null; anything but exit 0 throws.
void run_quietly(const std::vector<std::string>& command) {
  std::vector<char*> argv;
  for (const std::string& arg : command) argv.push_back(const_cast<char*>(arg.c_str()));
  argv.push_back(nullptr);
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, 1, "/dev/null", O_WRONLY, 0);
  posix_spawn_file_actions_adddup2(&actions, 1, 2);
  pid_t pid = 0;
  const int rc = posix_spawn(&pid, argv[0], &actions, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  require(rc == 0, Status::io_error, app, ": cannot run ", command[0], ": ", std::strerror(rc));
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  require(WIFEXITED(status) && WEXITSTATUS(status) == 0, Status::internal, app, ": ", command[0], " ", command[1],
          " failed (status ", status, ")");
}

void write_raw(const std::string& path, const char* data, std::size_t n) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  require(fd >= 0, Status::io_error, app, ": cannot create ", path, ": ", errno_text());
  std::size_t done = 0;
  while (done < n) {
    const ssize_t w = ::write(fd, data + done, std::min<std::size_t>(n - done, std::size_t(1) << 30));
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) {
      const std::string reason = errno_text();
      ::close(fd);
      fail(Status::io_error, app, ": writing ", path, " failed: ", reason);
    }
    done += static_cast<std::size_t>(w);
  }
  const bool synced = ::fsync(fd) == 0;
  const std::string reason = synced ? std::string() : errno_text();
  ::close(fd);
  require(synced, Status::io_error, app, ": fsync of ", path, " failed: ", reason);
}

void read_raw(const std::string& path, char* data, std::size_t n) {
  const int fd = ::open(path.c_str(), O_RDONLY);
  require(fd >= 0, Status::io_error, app, ": cannot open ", path, ": ", errno_text());
  std::size_t done = 0;
  while (done < n) {
    const ssize_t r = ::read(fd, data + done, std::min<std::size_t>(n - done, std::size_t(1) << 30));
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) {
      ::close(fd);
      fail(Status::io_error, app, ": reading ", path, " failed or ended early");
    }
    done += static_cast<std::size_t>(r);
  }
  ::close(fd);
}

// Evicts the file's pages from the page cache (they are clean: every file here was fsync-ed).
void drop_cached(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY);
  require(fd >= 0, Status::io_error, app, ": cannot open ", path, ": ", errno_text());
  ::fdatasync(fd);
  const int rc = ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
  ::close(fd);
  require(rc == 0, Status::io_error, app, ": posix_fadvise(DONTNEED) of ", path, " failed: ", std::strerror(rc));
}

// The fraction of the file's pages in the page cache (mincore), -1 where it cannot be told.
double resident_fraction(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) return -1;
  const auto size = static_cast<std::size_t>(::lseek(fd, 0, SEEK_END));
  void* map = size > 0 ? ::mmap(nullptr, size, PROT_READ, MAP_SHARED, fd, 0) : MAP_FAILED;
  ::close(fd);
  if (map == MAP_FAILED) return -1;
  const std::size_t page = static_cast<std::size_t>(::sysconf(_SC_PAGESIZE));
  std::vector<unsigned char> pages((size + page - 1) / page);
  const bool ok = ::mincore(map, size, pages.data()) == 0;
  ::munmap(map, size);
  if (!ok) return -1;
  std::size_t resident = 0;
  for (const unsigned char p : pages) resident += p & 1;
  return static_cast<double>(resident) / static_cast<double>(pages.size());
}

// Peak resident host memory above the level at reset(), through Linux's VmHWM (reset by writing
// "5" to /proc/self/clear_refs). The checkpoint's staging copies are std::vectors, which
// PeakMemory (Kokkos allocations) does not see; nullopt where /proc does not allow it.
class PeakResident {
 public:
  void reset() {
    std::ofstream clear("/proc/self/clear_refs");
    clear << "5";
    clear.close();
    start_ = clear ? status_kib("VmRSS:") : -1;
  }
  std::optional<std::int64_t> peak_bytes() const {
    const std::int64_t hwm = status_kib("VmHWM:");
    if (start_ < 0 || hwm < 0) return std::nullopt;
    return std::max<std::int64_t>(0, hwm - start_) * 1024;
  }

 private:
  static std::int64_t status_kib(const std::string& key) {
    std::ifstream status("/proc/self/status");
    std::string word;
    while (status >> word) {
      if (word == key) {
        std::int64_t kib = -1;
        status >> kib;
        return kib;
      }
    }
    return -1;
  }
  std::int64_t start_ = -1;
};

// Removes the files on every way out.
struct RemoveOnExit {
  std::vector<std::string> paths;
  ~RemoveOnExit() {
    for (const std::string& path : paths) {
      std::error_code ignored;
      std::filesystem::remove(path, ignored);
    }
  }
};

}  // namespace

BenchTable bench_checkpoint(const Options& options, int repeats) {
  const index_t vocab = positive_option(options, "--vocab", 8000, app);
  const std::string profile = options.count("--profile") ? options.at("--profile") : "MoEUT_244M";
  const std::string dir =
      options.count("--dir") ? options.at("--dir") : std::filesystem::temp_directory_path().string();
  require(std::filesystem::is_directory(dir), Status::invalid_argument, app, ": --dir ", dir, " is not a folder");

  const layers::MoEUTConfig c = layers::moeut_profile(profile, vocab);
  const nlohmann::json config = model::write_fields(layers::moeut_fields(true), c);
  const index_t expected = layers::moeut_parameter_count(c, true);
  char line[512];
  std::snprintf(line, sizeof line, "building %s (%.0fM parameters, vocabulary %ld) ...", profile.c_str(),
                static_cast<double>(expected) * 1e-6, static_cast<long>(vocab));
  progress(line);
  const auto layer = model::build_layer<float>("moeut_lm", config, 3);
  const model::ParameterList<float> parameters = model::trainable(layer->parameters());
  const index_t count = model::parameter_count(parameters);
  const std::size_t bytes = static_cast<std::size_t>(count) * sizeof(float);
  const double rate_units = 1e3 * static_cast<double>(bytes);  // the table's "GFLOP/s" column then reads MB/s

  // The raw file's bytes: the parameters themselves, in one buffer.
  std::vector<char> buffer(bytes);
  {
    std::size_t offset = 0;
    for (const model::Parameter<float>& p : parameters) {
      const std::size_t n = static_cast<std::size_t>(p.tensor->size()) * sizeof(float);
      const std::vector<float> values = p.tensor->to_host();
      std::memcpy(buffer.data() + offset, values.data(), n);
      offset += n;
    }
  }
  std::vector<char> read_back(bytes, 1);

  const std::string stem = (std::filesystem::path(dir) / ("kmoe-bench-checkpoint-" + std::to_string(::getpid()))).string();
  const std::string raw_path = stem + ".bin", checkpoint_path = stem + ".h5";
  RemoveOnExit cleanup{{raw_path, checkpoint_path}};

  // Median of `repeats` runs of fn, each after an untimed setup (the cold reads' eviction), with
  // the peak resident memory above the level before the case.
  PeakResident resident;
  const auto row = [&](const std::string& name, const std::string& what, auto&& setup, auto&& fn) {
    std::snprintf(line, sizeof line, "%s, %d run%s ...", what.c_str(), repeats, repeats == 1 ? "" : "s");
    progress(line);
    resident.reset();
    std::vector<double> times;
    for (int r = 0; r < repeats; ++r) {
      setup();
      times.push_back(median_seconds(1, fn));
    }
    std::sort(times.begin(), times.end());
    BenchRow result{name, times[times.size() / 2], rate_units, std::nullopt};
    result.peak_bytes = resident.peak_bytes();
    return result;
  };
  const auto nothing = [] {};

  BenchTable save, warm, cold;
  char shape[512];
  std::snprintf(shape, sizeof shape, ": %s, vocab %ld, %ld parameters = %.1f MB float32, host, in ", profile.c_str(),
                static_cast<long>(vocab), static_cast<long>(count), static_cast<double>(bytes) * 1e-6);
  const auto titled = [&](const std::string& direction) { return "checkpoint " + direction + shape + dir; };
  save.title = titled("save");
  warm.title = titled("load, warm page cache");
  cold.title = titled("load, cold page cache (posix_fadvise DONTNEED before each run)");

  save.baseline = row("raw ::write of one buffer + fsync (baseline)", "raw write", nothing,
                      [&] { write_raw(raw_path, buffer.data(), bytes); });
  save.rows.push_back(row("io::save_checkpoint (HDF5 chunked + Fletcher32, fsync, rename)", "save_checkpoint", nothing,
                          [&] { io::save_checkpoint(checkpoint_path, *layer); }));
  const std::uintmax_t file_bytes = std::filesystem::file_size(checkpoint_path);

  const auto raw_read = [&] { read_raw(raw_path, read_back.data(), bytes); };
  const auto load = [&] { io::load_checkpoint(checkpoint_path, *layer); };
  const std::size_t datasets = io::CheckpointReader(checkpoint_path).tensors().size();
  const std::string inspect = (std::filesystem::read_symlink("/proc/self/exe").parent_path() / "kmoe-inspect").string();
  require(::access(inspect.c_str(), X_OK) == 0, Status::invalid_argument, app, ": ", inspect,
          " (built beside kmoe-bench) is missing");
  const auto verify = [&] { run_quietly({inspect, "--verify", checkpoint_path}); };
  const char* raw_read_name = "raw ::read into one buffer (baseline)";
  const char* load_name = "io::load_checkpoint into the built layer";
  const char* verify_name = "kmoe-inspect --verify (the tool, as a process)";

  // One untimed load too: a process's first touch of a fresh 1 GB staging buffer cost about 1 s on
  // the test VM (its host backs guest memory on first use), which --repeats 1 would time alone.
  progress("warming the page cache and the staging memory (one untimed read of each file, one load) ...");
  raw_read();
  require(std::memcmp(read_back.data(), buffer.data(), bytes) == 0, Status::internal, app,
          ": the raw file reads back different bytes");
  {
    std::vector<char> whole(static_cast<std::size_t>(file_bytes));
    read_raw(checkpoint_path, whole.data(), whole.size());
  }
  load();
  warm.baseline = row(raw_read_name, "raw read, warm", nothing, raw_read);
  warm.rows.push_back(row(load_name, "load_checkpoint, warm", nothing, load));
  warm.rows.push_back(row(verify_name, "verify, warm", nothing, verify));

  double left_resident = 0;
  const auto evict = [&](const std::string& path) {
    return [&, path] {
      drop_cached(path);
      left_resident = std::max(left_resident, resident_fraction(path));
    };
  };
  cold.baseline = row(raw_read_name, "raw read, cold", evict(raw_path), raw_read);
  cold.rows.push_back(row(load_name, "load_checkpoint, cold", evict(checkpoint_path), load));
  cold.rows.push_back(row(verify_name, "verify, cold", evict(checkpoint_path), verify));

  // The loaded layer holds the saved values.
  {
    std::size_t offset = 0;
    for (const model::Parameter<float>& p : parameters) {
      const std::vector<float> values = p.tensor->to_host();
      require(std::memcmp(buffer.data() + offset, values.data(), values.size() * sizeof(float)) == 0,
              Status::internal, app, ": ", p.name, " differs after load_checkpoint");
      offset += values.size() * sizeof(float);
    }
  }

  const auto ratio = [](const BenchTable& t, std::size_t i) { return t.baseline.seconds / t.rows[i].seconds; };
  const double target = 0.7;
  const auto verdict = [&](double r) { return r >= target ? "met" : "NOT met"; };
  std::snprintf(line, sizeof line,
                "Targets (issue): save and load >= %.1f x the raw rate of the same direction; kmoe-inspect --verify "
                "within 2 x the raw read time (ratio >= 0.5). save %.2f x raw write (%s); load %.2f x raw read warm "
                "(%s), %.2f cold (%s); verify %.2f warm (%s), %.2f cold (%s).",
                target, ratio(save, 0), verdict(ratio(save, 0)), ratio(warm, 0), verdict(ratio(warm, 0)),
                ratio(cold, 0), verdict(ratio(cold, 0)), ratio(warm, 1), ratio(warm, 1) >= 0.5 ? "met" : "NOT met",
                ratio(cold, 1), ratio(cold, 1) >= 0.5 ? "met" : "NOT met");
  const std::string target_note = line;
  std::snprintf(line, sizeof line,
                "The GFLOP/s column is MB/s here (10^6 bytes/s of the %zu parameter bytes; the checkpoint file holds "
                "%ju bytes in %zu datasets); peak [MB]: resident host memory (VmHWM) above the level before the "
                "case, page cache excluded.",
                bytes, file_bytes, datasets);
  const std::string units_note = line;
  save.notes = {units_note,
                "Every write ends with fsync (the checkpoint's also renames its temporary file and fsyncs the folder).",
                target_note};
  warm.notes = {units_note,
                "Warm: each file was read once and the checkpoint loaded once, untimed, before the timed reads; "
                "memory-to-memory rates (the page cache's copy plus the reader's own work), not disk rates.",
                target_note};
  std::snprintf(line, sizeof line,
                "Cold: the file's pages evicted before each run (at most %.1f%% stayed resident); the rates are "
                "this machine's disk as the VM sees it (its host may cache it).",
                100 * left_resident);
  cold.notes = {units_note, line, target_note};
  save.print();
  warm.print();
  std::fflush(stdout);
  return cold;
}

}  // namespace kmoe::apps
