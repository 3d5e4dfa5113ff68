// kmoe-make-checkpoint: makes (and breaks) kmoe checkpoints for kmoe-inspect's tests
// (apps/inspect/inspect_test.cmake).
//   kmoe-make-checkpoint KIND CONFIG_JSON SEED OUT.h5 [--with-optimizer]
//       model::build_layer<float>(KIND, CONFIG_JSON, SEED) saved with io::save_checkpoint; with
//       --with-optimizer also a fresh model::AdamW (step 0), the Generator(SEED) as /rng and
//       /train = {"step": 0}
//   kmoe-make-checkpoint --corrupt IN.h5 OUT.h5 DATASET
//       a copy with one byte flipped in the middle of DATASET's first chunk (its stored data)
//   kmoe-make-checkpoint --drop-dataset IN.h5 OUT.h5 DATASET
//       a copy without DATASET (H5Ldelete)
//   kmoe-make-checkpoint --poison IN.h5 OUT.h5 DATASET
//       a copy whose DATASET has a NaN in element 0 and an Inf in the last (valid checksums)
//   kmoe-make-checkpoint --ramp IN.h5 OUT.h5 DATASET
//       a copy whose DATASET holds 0, 1, 2, ... (statistics known in closed form)
//   kmoe-make-checkpoint --truncate IN.h5 OUT.h5
//       the first half of the file
#include "kmoe/core/random.hpp"
#include "kmoe/io/checkpoint.hpp"
#include "kmoe/model/builder.hpp"
#include "kmoe/model/optimizer.hpp"

#include <Kokkos_Core.hpp>
#include <hdf5.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <fstream>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

void check(bool ok, const std::string& what) {
  if (!ok) throw std::runtime_error(what);
}

void copy_file(const std::string& in, const std::string& out) {
  std::filesystem::copy_file(in, out, std::filesystem::copy_options::overwrite_existing);
}

int make(int argc, char** argv) {
  const std::string kind = argv[1], config = argv[2], out = argv[4];
  char* end = nullptr;
  const unsigned long long seed = std::strtoull(argv[3], &end, 10);
  check(*argv[3] != '\0' && *end == '\0', std::string("SEED must be an unsigned integer, got '") + argv[3] + "'");
  const bool with_optimizer = argc == 6 && std::string(argv[5]) == "--with-optimizer";
  check(argc == 5 || with_optimizer, "the only option after OUT.h5 is --with-optimizer");
  auto layer = kmoe::model::build_layer<float>(kind, config, seed);
  kmoe::io::CheckpointExtras<float> extras;
  const auto save = [&] {
    const auto start = std::chrono::steady_clock::now();
    kmoe::io::save_checkpoint(out, *layer, extras);
    const std::chrono::duration<double> took = std::chrono::steady_clock::now() - start;
    std::printf("kmoe-make-checkpoint: wrote %s in %.3f s\n", out.c_str(), took.count());
  };
  if (!with_optimizer) {
    save();
    return 0;
  }
  const kmoe::model::AdamW<float> optimizer(layer->parameters(), kmoe::ops::AdamWConfig{});
  const kmoe::Generator rng(seed);
  extras.optimizer = &optimizer;
  extras.rng = &rng;
  extras.train = {{"step", 0}};
  save();
  return 0;
}

// The file offset and size of the dataset's first stored chunk (or of its contiguous data).
void data_location(const std::string& file_path, const std::string& dataset, haddr_t& address, hsize_t& size) {
  const hid_t file = H5Fopen(file_path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
  check(file >= 0, "cannot open " + file_path);
  const hid_t dset = H5Dopen2(file, dataset.c_str(), H5P_DEFAULT);
  check(dset >= 0, "no dataset " + dataset + " in " + file_path);
  const hid_t plist = H5Dget_create_plist(dset);
  if (H5Pget_layout(plist) == H5D_CHUNKED) {
    const hid_t space = H5Dget_space(dset);
    std::vector<hsize_t> offset(static_cast<std::size_t>(H5Sget_simple_extent_ndims(space)), 0);
    unsigned filter_mask = 0;
    check(H5Dget_chunk_info(dset, space, 0, offset.data(), &filter_mask, &address, &size) >= 0,
          "cannot locate the first chunk of " + dataset);
    H5Sclose(space);
  } else {
    address = H5Dget_offset(dset);
    size = H5Dget_storage_size(dset);
  }
  check(address != HADDR_UNDEF && size > 0, dataset + " has no stored data");
  H5Pclose(plist);
  H5Dclose(dset);
  H5Fclose(file);
}

void corrupt(const std::string& in, const std::string& out, const std::string& dataset) {
  haddr_t address = 0;
  hsize_t size = 0;
  data_location(in, dataset, address, size);
  copy_file(in, out);
  std::fstream f(out, std::ios::in | std::ios::out | std::ios::binary);
  check(static_cast<bool>(f), "cannot open " + out);
  const std::streamoff at = static_cast<std::streamoff>(address + size / 2);
  f.seekg(at);
  char byte = 0;
  f.read(&byte, 1);
  byte = static_cast<char>(byte ^ 0x5a);
  f.seekp(at);
  f.write(&byte, 1);
  check(static_cast<bool>(f), "cannot write " + out);
  std::printf("flipped the byte at offset %lld (chunk of %llu bytes at %llu) of %s\n", static_cast<long long>(at),
              static_cast<unsigned long long>(size), static_cast<unsigned long long>(address), dataset.c_str());
}

void drop_dataset(const std::string& in, const std::string& out, const std::string& dataset) {
  copy_file(in, out);
  const hid_t file = H5Fopen(out.c_str(), H5F_ACC_RDWR, H5P_DEFAULT);
  check(file >= 0, "cannot open " + out);
  check(H5Ldelete(file, dataset.c_str(), H5P_DEFAULT) >= 0, "cannot delete " + dataset);
  H5Fclose(file);
}

void rewrite_values(const std::string& in, const std::string& out, const std::string& dataset, bool ramp) {
  copy_file(in, out);
  const hid_t file = H5Fopen(out.c_str(), H5F_ACC_RDWR, H5P_DEFAULT);
  check(file >= 0, "cannot open " + out);
  const hid_t dset = H5Dopen2(file, dataset.c_str(), H5P_DEFAULT);
  check(dset >= 0, "no dataset " + dataset);
  const hid_t space = H5Dget_space(dset);
  std::vector<double> values(static_cast<std::size_t>(H5Sget_simple_extent_npoints(space)));
  check(!values.empty() && H5Dread(dset, H5T_NATIVE_DOUBLE, H5S_ALL, H5S_ALL, H5P_DEFAULT, values.data()) >= 0,
        "cannot read " + dataset);
  if (ramp) {
    for (std::size_t i = 0; i < values.size(); ++i) values[i] = static_cast<double>(i);
  } else {
    values.front() = std::numeric_limits<double>::quiet_NaN();
    values.back() = std::numeric_limits<double>::infinity();
  }
  check(H5Dwrite(dset, H5T_NATIVE_DOUBLE, H5S_ALL, H5S_ALL, H5P_DEFAULT, values.data()) >= 0, "cannot write " + dataset);
  H5Sclose(space);
  H5Dclose(dset);
  H5Fclose(file);
}

void truncate(const std::string& in, const std::string& out) {
  copy_file(in, out);
  std::filesystem::resize_file(out, std::filesystem::file_size(in) / 2);
}

void usage() {
  std::fprintf(stderr,
               "usage: kmoe-make-checkpoint KIND CONFIG_JSON SEED OUT.h5 [--with-optimizer]\n"
               "       kmoe-make-checkpoint --corrupt | --drop-dataset | --poison | --ramp IN.h5 OUT.h5 DATASET\n"
               "       kmoe-make-checkpoint --truncate IN.h5 OUT.h5\n");
}

}  // namespace

int main(int argc, char** argv) {
  Kokkos::ScopeGuard kokkos(argc, argv);
  try {
    const std::string mode = argc > 1 ? argv[1] : "";
    if (mode == "--corrupt" && argc == 5) {
      corrupt(argv[2], argv[3], argv[4]);
    } else if (mode == "--drop-dataset" && argc == 5) {
      drop_dataset(argv[2], argv[3], argv[4]);
    } else if (mode == "--poison" && argc == 5) {
      rewrite_values(argv[2], argv[3], argv[4], false);
    } else if (mode == "--ramp" && argc == 5) {
      rewrite_values(argv[2], argv[3], argv[4], true);
    } else if (mode == "--truncate" && argc == 4) {
      truncate(argv[2], argv[3]);
    } else if (mode.rfind("--", 0) != 0 && (argc == 5 || argc == 6)) {
      return make(argc, argv);
    } else {
      usage();
      return 2;
    }
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "kmoe-make-checkpoint: %s\n", e.what());
    return 1;
  }
}
