// Command-line options of the apps as "--key value" pairs.
#pragma once

#include "kmoe/core/error.hpp"
#include "kmoe/core/precision.hpp"

#include <cstdio>
#include <cstdlib>
#include <map>
#include <string>

namespace kmoe::apps {

using Options = std::map<std::string, std::string>;

// argv[first..] as "--key value" pairs; a key without a value or without "--" throws.
inline Options parse_options(int argc, char** argv, int first, const std::string& app) {
  Options options;
  for (int i = first; i < argc; i += 2) {
    const std::string key = argv[i];
    require(key.rfind("--", 0) == 0, Status::invalid_argument, app, ": expected an option --key, got '", key, "'");
    require(i + 1 < argc, Status::invalid_argument, app, ": ", key, " needs a value");
    options[key] = argv[i + 1];
  }
  return options;
}

// Whether some argument before any "--" is --help or -h. The apps answer it before Kokkos starts:
// Kokkos 3.4's initialize() treats --help as its own and prints its options first.
inline bool asks_for_help(int argc, char** argv) {
  for (int i = 1; i < argc && std::string(argv[i]) != "--"; ++i) {
    const std::string arg = argv[i];
    if (arg == "--help" || arg == "-h") return true;
  }
  return false;
}

// Prints usage when asked (--help) or when fewer than `required` arguments follow the program's
// name; returns the exit code then (0 for --help, 2 for missing arguments), -1 to go on.
inline int usage_exit_code(int argc, char** argv, int required, const char* usage) {
  const bool help = asks_for_help(argc, argv);
  if (!help && argc > required) return -1;
  std::fputs(usage, help ? stdout : stderr);
  return help ? 0 : 2;
}

// The positive integer under `key`, or `fallback` when absent.
inline long positive_option(const Options& options, const std::string& key, long fallback, const std::string& app) {
  const auto it = options.find(key);
  if (it == options.end()) return fallback;
  char* end = nullptr;
  const long value = std::strtol(it->second.c_str(), &end, 10);
  require(*end == '\0' && value > 0, Status::invalid_argument, app, ": ", key, " needs a positive integer, got '",
          it->second, "'");
  return value;
}

// The precision under --precision (native, bfloat16), or native when absent.
inline Precision precision_option(const Options& options) {
  const auto it = options.find("--precision");
  return it == options.end() ? Precision::native : parse_precision(it->second);
}

}  // namespace kmoe::apps
