// kmoe-parity-mutate SOURCE.h5 DEST.h5 ACTION ARGS...: copies a fixture and breaks one thing in
// the copy, for the exit-status tests of kmoe-parity (apps/CMakeLists.txt). Actions:
//   set-attribute NAME VALUE  root string attribute NAME := VALUE
//   delete DATASET            removes the dataset
//   reverse-shape DATASET     the same values under the reversed dimensions
//   perturb DATASET REL       adds REL·‖values‖ to the first element: a relative L2 change of REL
//   copy DATASET NEW          a copy of DATASET at NEW
#include <hdf5.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

void check(bool ok, const std::string& what) {
  if (!ok) throw std::runtime_error(what);
}

void set_string_attribute(hid_t file, const std::string& name, const std::string& value) {
  if (H5Aexists(file, name.c_str()) > 0) check(H5Adelete(file, name.c_str()) >= 0, "cannot delete attribute " + name);
  // Variable-length UTF-8, as h5py writes str attributes.
  const hid_t type = H5Tcopy(H5T_C_S1);
  H5Tset_size(type, H5T_VARIABLE);
  H5Tset_cset(type, H5T_CSET_UTF8);
  const hid_t space = H5Screate(H5S_SCALAR);
  const hid_t attr = H5Acreate2(file, name.c_str(), type, space, H5P_DEFAULT, H5P_DEFAULT);
  const char* text = value.c_str();
  check(attr >= 0 && H5Awrite(attr, type, &text) >= 0, "cannot write attribute " + name);
  H5Aclose(attr);
  H5Sclose(space);
  H5Tclose(type);
}

// The dataset's values as doubles, with its dimensions.
std::vector<double> read_all(hid_t file, const std::string& path, std::vector<hsize_t>& dims) {
  const hid_t dset = H5Dopen2(file, path.c_str(), H5P_DEFAULT);
  check(dset >= 0, "no dataset " + path);
  const hid_t space = H5Dget_space(dset);
  dims.assign(static_cast<std::size_t>(H5Sget_simple_extent_ndims(space)), 0);
  H5Sget_simple_extent_dims(space, dims.data(), nullptr);
  std::vector<double> values(static_cast<std::size_t>(H5Sget_simple_extent_npoints(space)));
  check(H5Dread(dset, H5T_NATIVE_DOUBLE, H5S_ALL, H5S_ALL, H5P_DEFAULT, values.data()) >= 0, "cannot read " + path);
  H5Sclose(space);
  H5Dclose(dset);
  return values;
}

void reverse_shape(hid_t file, const std::string& path) {
  std::vector<hsize_t> dims;
  const std::vector<double> values = read_all(file, path, dims);
  check(H5Ldelete(file, path.c_str(), H5P_DEFAULT) >= 0, "cannot delete " + path);
  const std::vector<hsize_t> reversed(dims.rbegin(), dims.rend());
  const hid_t space = H5Screate_simple(static_cast<int>(reversed.size()), reversed.data(), nullptr);
  const hid_t dset = H5Dcreate2(file, path.c_str(), H5T_IEEE_F32LE, space, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
  check(dset >= 0 && H5Dwrite(dset, H5T_NATIVE_DOUBLE, H5S_ALL, H5S_ALL, H5P_DEFAULT, values.data()) >= 0,
        "cannot write " + path);
  H5Dclose(dset);
  H5Sclose(space);
}

void perturb(hid_t file, const std::string& path, double relative) {
  std::vector<hsize_t> dims;
  std::vector<double> values = read_all(file, path, dims);
  check(!values.empty(), path + " is empty");
  double norm_sq = 0;
  for (double v : values) norm_sq += v * v;
  values[0] += relative * std::sqrt(norm_sq);
  const hid_t dset = H5Dopen2(file, path.c_str(), H5P_DEFAULT);
  check(dset >= 0 && H5Dwrite(dset, H5T_NATIVE_DOUBLE, H5S_ALL, H5S_ALL, H5P_DEFAULT, values.data()) >= 0,
        "cannot write " + path);
  H5Dclose(dset);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 5) {
    std::fprintf(stderr, "usage: kmoe-parity-mutate SOURCE.h5 DEST.h5 ACTION ARGS... (see the source)\n");
    return 2;
  }
  const std::string source = argv[1], dest = argv[2], action = argv[3], target = argv[4];
  const std::string extra = argc > 5 ? argv[5] : "";
  try {
    std::filesystem::copy_file(source, dest, std::filesystem::copy_options::overwrite_existing);
    // The fixtures in the checkout are read-only; the copy must not be.
    std::filesystem::permissions(dest, std::filesystem::perms::owner_write, std::filesystem::perm_options::add);
    const hid_t file = H5Fopen(dest.c_str(), H5F_ACC_RDWR, H5P_DEFAULT);
    check(file >= 0, "cannot open " + dest);
    if (action == "set-attribute" && argc == 6) {
      set_string_attribute(file, target, extra);
    } else if (action == "delete" && argc == 5) {
      check(H5Ldelete(file, target.c_str(), H5P_DEFAULT) >= 0, "cannot delete " + target);
    } else if (action == "reverse-shape" && argc == 5) {
      reverse_shape(file, target);
    } else if (action == "perturb" && argc == 6) {
      perturb(file, target, std::stod(extra));
    } else if (action == "copy" && argc == 6) {
      check(H5Ocopy(file, target.c_str(), file, extra.c_str(), H5P_DEFAULT, H5P_DEFAULT) >= 0,
            "cannot copy " + target + " to " + extra);
    } else {
      throw std::runtime_error("unknown action or wrong argument count: " + action);
    }
    H5Fclose(file);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "kmoe-parity-mutate: %s\n", e.what());
    return 2;
  }
  return 0;
}
