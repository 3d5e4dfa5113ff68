#include "kmoe/io/checkpoint.hpp"

#include "kmoe/core/error.hpp"
#include "kmoe/io/atomic_write.hpp"
#include "kmoe/model/builder.hpp"

#include <hdf5.h>

#include <algorithm>
#include <ctime>
#include <map>

namespace kmoe::io {

namespace {

constexpr const char* kmoe_version_string = "0.1.0";

// Closes an HDF5 handle on scope exit.
class H5Object {
 public:
  H5Object(hid_t id, herr_t (*close)(hid_t)) : id_(id), close_(close) {}
  ~H5Object() {
    if (id_ >= 0) close_(id_);
  }
  H5Object(const H5Object&) = delete;
  H5Object& operator=(const H5Object&) = delete;
  hid_t get() const { return id_; }
  bool valid() const { return id_ >= 0; }

 private:
  hid_t id_;
  herr_t (*close_)(hid_t);
};

void silence_hdf5() {
  static const bool silenced = [] {
    H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
    return true;
  }();
  (void)silenced;
}

template <class T>
hid_t native_type() {
  return std::is_same_v<T, float> ? H5T_NATIVE_FLOAT : H5T_NATIVE_DOUBLE;
}

std::string utc_now() {
  const std::time_t now = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&now, &tm);
  char text[32];
  std::strftime(text, sizeof text, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return text;
}

// ---- writing ------------------------------------------------------------------------------

class Writer {
 public:
  explicit Writer(const std::string& target) : target_(target) {}

  void check(herr_t rc, const std::string& what) const {
    require(rc >= 0, Status::io_error, target_, ": writing ", what, " failed (disk full or unwritable?)");
  }
  void check(hid_t id, const std::string& what) const {
    require(id >= 0, Status::io_error, target_, ": writing ", what, " failed (disk full or unwritable?)");
  }

  void string_attribute(hid_t object, const char* name, const std::string& value) const {
    H5Object type(H5Tcopy(H5T_C_S1), H5Tclose);
    H5Tset_size(type.get(), H5T_VARIABLE);
    H5Tset_cset(type.get(), H5T_CSET_UTF8);
    H5Object space(H5Screate(H5S_SCALAR), H5Sclose);
    H5Object attr(H5Acreate2(object, name, type.get(), space.get(), H5P_DEFAULT, H5P_DEFAULT), H5Aclose);
    check(attr.get(), std::string("attribute ") + name);
    const char* data = value.c_str();
    check(H5Awrite(attr.get(), type.get(), &data), std::string("attribute ") + name);
  }

  template <class V>
  void number_attribute(hid_t object, const char* name, V value) const {
    const hid_t type = std::is_floating_point_v<V> ? H5T_NATIVE_DOUBLE : H5T_NATIVE_INT64;
    H5Object space(H5Screate(H5S_SCALAR), H5Sclose);
    H5Object attr(H5Acreate2(object, name, std::is_floating_point_v<V> ? H5T_IEEE_F64LE : H5T_STD_I64LE, space.get(),
                             H5P_DEFAULT, H5P_DEFAULT),
                  H5Aclose);
    check(attr.get(), std::string("attribute ") + name);
    if constexpr (std::is_floating_point_v<V>) {
      const double v = value;
      check(H5Awrite(attr.get(), type, &v), std::string("attribute ") + name);
    } else {
      const std::int64_t v = value;
      check(H5Awrite(attr.get(), type, &v), std::string("attribute ") + name);
    }
  }

  void int_list_attribute(hid_t object, const char* name, const std::vector<int>& values) const {
    const hsize_t n = values.size();
    H5Object space(H5Screate_simple(1, &n, nullptr), H5Sclose);
    H5Object attr(H5Acreate2(object, name, H5T_STD_I32LE, space.get(), H5P_DEFAULT, H5P_DEFAULT), H5Aclose);
    check(attr.get(), std::string("attribute ") + name);
    check(H5Awrite(attr.get(), H5T_NATIVE_INT, values.data()), std::string("attribute ") + name);
  }

  // The names as one JSON list: a string attribute any HDF5 reader shows in full.
  void string_list_attribute(hid_t object, const char* name, const std::vector<std::string>& values) const {
    string_attribute(object, name, nlohmann::json(values).dump());
  }

  // A chunked, Fletcher32-checksummed dataset; chunks of one slice along axis 0 (one expert for
  // expert tensors), capped near 4 MiB so large dense tensors are not one chunk.
  hid_t dataset(hid_t group, const std::string& name, const Shape& shape, hid_t file_type, std::size_t element_size) const {
    std::vector<hsize_t> dims, chunk;
    for (int i = 0; i < shape.rank(); ++i) dims.push_back(static_cast<hsize_t>(shape[i]));
    require(!dims.empty(), Status::internal, target_, ": dataset ", name, " has rank 0");
    chunk = dims;
    for (hsize_t& c : chunk) c = std::max<hsize_t>(c, 1);
    chunk[0] = 1;
    const std::size_t slice_bytes = element_size * static_cast<std::size_t>(shape.size() / std::max<index_t>(shape[0], 1));
    const std::size_t target_bytes = std::size_t(4) << 20;
    if (shape.rank() > 1 && slice_bytes > 0) {
      chunk[0] = std::max<hsize_t>(1, std::min<hsize_t>(dims[0], target_bytes / slice_bytes));
    } else if (shape.rank() == 1) {
      chunk[0] = std::max<hsize_t>(1, std::min<hsize_t>(dims[0], target_bytes / element_size));
    }
    H5Object space(H5Screate_simple(static_cast<int>(dims.size()), dims.data(), nullptr), H5Sclose);
    H5Object plist(H5Pcreate(H5P_DATASET_CREATE), H5Pclose);
    check(H5Pset_chunk(plist.get(), static_cast<int>(chunk.size()), chunk.data()), "chunk layout of " + name);
    check(H5Pset_fletcher32(plist.get()), "checksum filter of " + name);
    const hid_t id = H5Dcreate2(group, name.c_str(), file_type, space.get(), H5P_DEFAULT, plist.get(), H5P_DEFAULT);
    check(id, "dataset " + name);
    return id;
  }

  template <class T>
  void tensor(hid_t group, const std::string& name, const Tensor<T>& tensor,
              const model::Parameter<T>* parameter = nullptr) const {
    const hid_t file_type = std::is_same_v<T, float> ? H5T_IEEE_F32LE : H5T_IEEE_F64LE;
    H5Object ds(dataset(group, name, tensor.shape(), file_type, sizeof(T)), H5Dclose);
    const std::vector<T> values = tensor.to_host();
    check(H5Dwrite(ds.get(), native_type<T>(), H5S_ALL, H5S_ALL, H5P_DEFAULT, values.data()), "dataset " + name);
    if (parameter == nullptr) return;
    string_attribute(ds.get(), "kind", model::parameter_kind_name(parameter->kind));
    if (parameter->kind != model::ParameterKind::expert) return;
    number_attribute(ds.get(), "expert_axis", static_cast<std::int64_t>(parameter->expert_axis));
    std::vector<int> experts;
    for (int e = 0; e < parameter->local_experts(); ++e) experts.push_back(parameter->first_expert + e);
    int_list_attribute(ds.get(), "experts", experts);
    if (!parameter->torch.per_expert_names.empty()) {
      string_list_attribute(ds.get(), "torch_names", parameter->torch.per_expert_names);
      number_attribute(ds.get(), "torch_transposed", static_cast<std::int64_t>(parameter->torch.transposed));
    }
  }

  hid_t group(hid_t parent, const char* name) const {
    const hid_t id = H5Gcreate2(parent, name, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    check(id, std::string("group ") + name);
    return id;
  }

 private:
  std::string target_;
};

template <class T>
void write_contents(const std::string& file_path, const std::string& target, model::Layer<T>& layer,
                    const CheckpointExtras<T>& extras) {
  const Writer w(target);
  // v2 object headers (libver 1.10+) carry checksums of the metadata too.
  H5Object fapl(H5Pcreate(H5P_FILE_ACCESS), H5Pclose);
  H5Pset_libver_bounds(fapl.get(), H5F_LIBVER_V110, H5F_LIBVER_LATEST);
  H5Object file(H5Fcreate(file_path.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, fapl.get()), H5Fclose);
  w.check(file.get(), "the file");
  w.number_attribute(file.get(), "kmoe_format", static_cast<std::int64_t>(checkpoint_format_version));
  w.string_attribute(file.get(), "model", layer.kind());
  w.string_attribute(file.get(), "config", layer.config().dump());
  w.string_attribute(file.get(), "dtype", model::dtype_name(model::dtype_of<T>()));
  w.string_attribute(file.get(), "kmoe_version", kmoe_version_string);
  w.string_attribute(file.get(), "created", utc_now());
  w.number_attribute(file.get(), "step", extras.step);
  if (!extras.source.is_null()) w.string_attribute(file.get(), "source", extras.source.dump());

  const model::ParameterList<T> parameters = model::trainable(layer.parameters());
  {
    H5Object params(w.group(file.get(), "params"), H5Gclose);
    for (const model::Parameter<T>& p : parameters) w.tensor(params.get(), p.name, *p.tensor, &p);
  }
  if (extras.optimizer != nullptr) {
    const model::AdamW<T>& opt = *extras.optimizer;
    H5Object group(w.group(file.get(), "optimizer"), H5Gclose);
    w.string_attribute(group.get(), "name", "AdamW");
    w.number_attribute(group.get(), "step", opt.steps());
    w.number_attribute(group.get(), "lr", opt.config().lr);
    w.number_attribute(group.get(), "beta1", opt.config().beta1);
    w.number_attribute(group.get(), "beta2", opt.config().beta2);
    w.number_attribute(group.get(), "eps", opt.config().eps);
    w.number_attribute(group.get(), "weight_decay", opt.config().weight_decay);
    H5Object avg(w.group(group.get(), "exp_avg"), H5Gclose);
    H5Object avg_sq(w.group(group.get(), "exp_avg_sq"), H5Gclose);
    for (const auto& [name, m] : opt.moments()) {
      w.tensor(avg.get(), name, m.exp_avg);
      w.tensor(avg_sq.get(), name, m.exp_avg_sq);
    }
  }
  if (extras.rng != nullptr) {
    H5Object group(w.group(file.get(), "rng"), H5Gclose);
    H5Object ds(w.dataset(group.get(), "state", Shape{2}, H5T_STD_U64LE, 8), H5Dclose);
    const std::uint64_t state[2] = {extras.rng->seed(), extras.rng->position()};
    w.check(H5Dwrite(ds.get(), H5T_NATIVE_UINT64, H5S_ALL, H5S_ALL, H5P_DEFAULT, state), "/rng/state");
  }
  if (!extras.train.is_null()) {
    H5Object group(w.group(file.get(), "train"), H5Gclose);
    w.string_attribute(group.get(), "json", extras.train.dump());
  }
  w.check(H5Fflush(file.get(), H5F_SCOPE_GLOBAL), "the file (flush)");
}

// ---- reading ------------------------------------------------------------------------------

bool has_link(hid_t file, const std::string& path) {
  // Walks the path one component at a time: H5Lexists fails on a missing intermediate group.
  std::size_t pos = 1;
  while (pos <= path.size()) {
    const std::size_t next = path.find('/', pos);
    const std::string prefix = path.substr(0, next == std::string::npos ? path.size() : next);
    if (H5Lexists(file, prefix.c_str(), H5P_DEFAULT) <= 0) return false;
    if (next == std::string::npos) break;
    pos = next + 1;
  }
  return true;
}

std::string read_string(hid_t object, const char* name, const std::string& path) {
  H5Object attr(H5Aopen(object, name, H5P_DEFAULT), H5Aclose);
  require(attr.valid(), Status::corrupt_file, path, ": no attribute '", name, "' (not a kmoe checkpoint?)");
  H5Object type(H5Aget_type(attr.get()), H5Tclose);
  require(H5Tget_class(type.get()) == H5T_STRING && H5Tis_variable_str(type.get()) > 0, Status::corrupt_file, path,
          ": attribute '", name, "' is not a string");
  H5Object memtype(H5Tcopy(H5T_C_S1), H5Tclose);
  H5Tset_size(memtype.get(), H5T_VARIABLE);
  H5Tset_cset(memtype.get(), H5Tget_cset(type.get()));
  char* value = nullptr;
  require(H5Aread(attr.get(), memtype.get(), &value) >= 0 && value != nullptr, Status::corrupt_file, path,
          ": cannot read attribute '", name, "'");
  std::string result(value);
  H5Object space(H5Aget_space(attr.get()), H5Sclose);
  H5Dvlen_reclaim(memtype.get(), space.get(), H5P_DEFAULT, &value);
  return result;
}

bool has_attribute(hid_t object, const char* name) { return H5Aexists(object, name) > 0; }

double read_number(hid_t object, const char* name, const std::string& path) {
  H5Object attr(H5Aopen(object, name, H5P_DEFAULT), H5Aclose);
  require(attr.valid(), Status::corrupt_file, path, ": no attribute '", name, "'");
  double value = 0;
  require(H5Aread(attr.get(), H5T_NATIVE_DOUBLE, &value) >= 0, Status::corrupt_file, path, ": cannot read attribute '",
          name, "'");
  return value;
}

std::vector<int> read_int_list(hid_t object, const char* name, const std::string& path) {
  H5Object attr(H5Aopen(object, name, H5P_DEFAULT), H5Aclose);
  require(attr.valid(), Status::corrupt_file, path, ": no attribute '", name, "'");
  H5Object space(H5Aget_space(attr.get()), H5Sclose);
  const hssize_t n = H5Sget_simple_extent_npoints(space.get());
  require(n >= 0, Status::corrupt_file, path, ": attribute '", name, "' is unreadable");
  std::vector<int> values(static_cast<std::size_t>(n));
  require(H5Aread(attr.get(), H5T_NATIVE_INT, values.data()) >= 0, Status::corrupt_file, path,
          ": cannot read attribute '", name, "'");
  return values;
}

std::vector<std::string> dataset_names(hid_t group) {
  std::vector<std::string> names;
  H5Literate(
      group, H5_INDEX_NAME, H5_ITER_INC, nullptr,
      [](hid_t, const char* name, const H5L_info_t*, void* data) -> herr_t {
        static_cast<std::vector<std::string>*>(data)->push_back(name);
        return 0;
      },
      &names);
  return names;
}

StoredTensor describe(hid_t file, const std::string& path, const std::string& name, const std::string& file_path) {
  H5Object ds(H5Dopen2(file, path.c_str(), H5P_DEFAULT), H5Dclose);
  require(ds.valid(), Status::corrupt_file, file_path, ": '", path, "' is not a readable dataset");
  StoredTensor t;
  t.path = path;
  t.name = name;
  H5Object space(H5Dget_space(ds.get()), H5Sclose);
  const int rank = H5Sget_simple_extent_ndims(space.get());
  require(rank >= 1 && rank <= Shape::max_rank, Status::corrupt_file, file_path, ": dataset ", path, " has rank ", rank);
  std::vector<hsize_t> dims(static_cast<std::size_t>(rank));
  H5Sget_simple_extent_dims(space.get(), dims.data(), nullptr);
  t.shape = Shape(std::vector<index_t>(dims.begin(), dims.end()));
  H5Object type(H5Dget_type(ds.get()), H5Tclose);
  const H5T_class_t cls = H5Tget_class(type.get());
  const std::size_t size = H5Tget_size(type.get());
  t.dtype = cls == H5T_FLOAT ? (size == 4 ? "float32" : size == 8 ? "float64" : "float?")
            : cls == H5T_INTEGER ? (H5Tget_sign(type.get()) == H5T_SGN_NONE ? "uint" : "int") + std::to_string(8 * size)
                                 : "other";
  t.kind = has_attribute(ds.get(), "kind") ? read_string(ds.get(), "kind", file_path) : "";
  if (t.kind == "expert") t.experts = read_int_list(ds.get(), "experts", file_path);
  if (has_attribute(ds.get(), "torch_names")) {
    try {
      t.torch_names = nlohmann::json::parse(read_string(ds.get(), "torch_names", file_path)).get<std::vector<std::string>>();
    } catch (const nlohmann::json::exception&) {
      fail(Status::corrupt_file, file_path, ": attribute torch_names of ", path, " is not a JSON list of names");
    }
    t.torch_transposed = read_number(ds.get(), "torch_transposed", file_path) != 0;
  }
  return t;
}

// Reads a whole float or integer dataset into memory of type V; Fletcher32 verifies every chunk.
template <class V>
std::vector<V> read_dataset(hid_t file, const std::string& path, const std::string& file_path) {
  H5Object ds(H5Dopen2(file, path.c_str(), H5P_DEFAULT), H5Dclose);
  require(ds.valid(), Status::corrupt_file, file_path, ": no dataset ", path);
  H5Object space(H5Dget_space(ds.get()), H5Sclose);
  const hssize_t n = H5Sget_simple_extent_npoints(space.get());
  require(n >= 0, Status::corrupt_file, file_path, ": dataset ", path, " is unreadable");
  std::vector<V> values(static_cast<std::size_t>(n));
  const hid_t memory = std::is_same_v<V, float>    ? H5T_NATIVE_FLOAT
                       : std::is_same_v<V, double> ? H5T_NATIVE_DOUBLE
                                                   : H5T_NATIVE_UINT64;
  require(H5Dread(ds.get(), memory, H5S_ALL, H5S_ALL, H5P_DEFAULT, values.data()) >= 0, Status::corrupt_file, file_path,
          ": dataset ", path, " is corrupt (checksum mismatch or truncated file)");
  return values;
}

}  // namespace

// ---- CheckpointReader ---------------------------------------------------------------------

CheckpointReader::CheckpointReader(const std::string& path) : path_(path) {
  silence_hdf5();
  require(H5Fis_hdf5(path.c_str()) > 0, Status::io_error, path,
          ": cannot open (missing, unreadable, truncated or not an HDF5 file)");
  file_ = H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
  require(file_ >= 0, Status::io_error, path, ": cannot open as HDF5");
  try {
    require(has_attribute(file_, "kmoe_format"), Status::corrupt_file, path,
            ": not a kmoe checkpoint (no root attribute kmoe_format)");
    info_.format = static_cast<int>(read_number(file_, "kmoe_format", path));
    require(info_.format == checkpoint_format_version, Status::corrupt_file, path, ": kmoe_format ", info_.format,
            " is not supported (this kmoe reads format ", checkpoint_format_version, ")");
    info_.model = read_string(file_, "model", path);
    const std::string config = read_string(file_, "config", path);
    try {
      info_.config = nlohmann::json::parse(config);
    } catch (const nlohmann::json::exception&) {
      fail(Status::corrupt_file, path, ": attribute config is not valid JSON");
    }
    info_.dtype = read_string(file_, "dtype", path);
    info_.kmoe_version = read_string(file_, "kmoe_version", path);
    info_.created = read_string(file_, "created", path);
    info_.step = static_cast<std::int64_t>(read_number(file_, "step", path));
    if (has_attribute(file_, "source")) {
      try {
        info_.source = nlohmann::json::parse(read_string(file_, "source", path));
      } catch (const nlohmann::json::exception&) {
        fail(Status::corrupt_file, path, ": attribute source is not valid JSON");
      }
    }
    require(has_link(file_, "/params"), Status::corrupt_file, path, ": no /params group");
    for (const char* group : {"/params", "/optimizer/exp_avg", "/optimizer/exp_avg_sq", "/rng"}) {
      if (!has_link(file_, group)) continue;
      H5Object g(H5Gopen2(file_, group, H5P_DEFAULT), H5Gclose);
      require(g.valid(), Status::corrupt_file, path, ": ", group, " is not a group");
      for (const std::string& name : dataset_names(g.get()))
        tensors_.push_back(describe(file_, std::string(group) + "/" + name, name, path));
    }
  } catch (...) {
    H5Fclose(file_);
    throw;
  }
}

CheckpointReader::~CheckpointReader() {
  if (file_ >= 0) H5Fclose(file_);
}

bool CheckpointReader::has_optimizer() const { return has_link(file_, "/optimizer"); }
bool CheckpointReader::has_rng() const { return has_link(file_, "/rng/state"); }

std::int64_t CheckpointReader::optimizer_step() const {
  H5Object group(H5Gopen2(file_, "/optimizer", H5P_DEFAULT), H5Gclose);
  require(group.valid(), Status::invalid_argument, path_, ": no /optimizer group");
  return static_cast<std::int64_t>(read_number(group.get(), "step", path_));
}

nlohmann::json CheckpointReader::train() const {
  if (!has_link(file_, "/train")) return nullptr;
  H5Object g(H5Gopen2(file_, "/train", H5P_DEFAULT), H5Gclose);
  try {
    return nlohmann::json::parse(read_string(g.get(), "json", path_));
  } catch (const nlohmann::json::exception&) {
    fail(Status::corrupt_file, path_, ": /train's json attribute is not valid JSON");
  }
}

std::vector<double> CheckpointReader::read(const std::string& dataset_path) const {
  return read_dataset<double>(file_, dataset_path, path_);
}

template <class T>
std::vector<T> CheckpointReader::read_as(const std::string& dataset_path) const {
  return read_dataset<T>(file_, dataset_path, path_);
}

template std::vector<float> CheckpointReader::read_as<float>(const std::string&) const;
template std::vector<double> CheckpointReader::read_as<double>(const std::string&) const;
template std::vector<std::uint64_t> CheckpointReader::read_as<std::uint64_t>(const std::string&) const;

// ---- save / load --------------------------------------------------------------------------

template <class T>
void save_checkpoint(const std::string& path, model::Layer<T>& layer, const CheckpointExtras<T>& extras) {
  silence_hdf5();
  write_atomically(path, [&](const std::string& temporary) { write_contents(temporary, path, layer, extras); });
}

template <class T>
void load_checkpoint(const std::string& path, model::Layer<T>& layer, const CheckpointLoadOptions& options,
                     const CheckpointRestore<T>& restore) {
  const CheckpointReader reader(path);
  const CheckpointInfo& info = reader.info();
  require(info.model == layer.kind(), Status::invalid_argument, path, ": the checkpoint holds a '", info.model,
          "' layer, not '", layer.kind(), "'");
  require(info.config == layer.config(), Status::invalid_argument, path, ": the checkpoint's config ",
          info.config.dump(), " differs from the layer's ", layer.config().dump());
  const std::string own_dtype = model::dtype_name(model::dtype_of<T>());
  require(options.convert_dtype || info.dtype == own_dtype, Status::invalid_argument, path, ": the checkpoint is ",
          info.dtype, ", the layer ", own_dtype, " (load with convert_dtype to convert)");

  std::map<std::string, const StoredTensor*> stored;
  for (const StoredTensor& t : reader.tensors())
    if (t.path.rfind("/params/", 0) == 0) stored[t.name] = &t;
  const model::ParameterList<T> parameters = model::trainable(layer.parameters());
  // Everything is read and checked before anything of the layer changes.
  std::vector<std::vector<T>> values;
  for (const model::Parameter<T>& p : parameters) {
    const auto found = stored.find(p.name);
    require(found != stored.end(), Status::invalid_argument, path, ": no parameter '", p.name, "' in the checkpoint");
    const StoredTensor& t = *found->second;
    require(t.shape == p.tensor->shape(), Status::shape_mismatch, path, ": parameter '", p.name, "' has shape ",
            t.shape.str(), ", the layer ", p.tensor->shape().str());
    require(t.dtype == "float32" || t.dtype == "float64", Status::corrupt_file, path, ": parameter '", p.name,
            "' is ", t.dtype);
    require(options.convert_dtype || t.dtype == own_dtype, Status::invalid_argument, path, ": parameter '", p.name,
            "' is ", t.dtype, ", the layer ", own_dtype);
    values.push_back(reader.read_as<T>(t.path));
    stored.erase(found);
  }
  std::string extra;
  for (const auto& item : stored) extra += (extra.empty() ? "" : ", ") + item.first;
  require(extra.empty(), Status::invalid_argument, path, ": datasets that are not parameters of this ", layer.kind(),
          " layer: ", extra);

  std::map<std::string, std::pair<std::vector<T>, std::vector<T>>> moments;
  std::vector<std::uint64_t> rng_state;
  std::int64_t optimizer_step = 0;
  if (restore.optimizer != nullptr) {
    require(reader.has_optimizer(), Status::invalid_argument, path, ": no /optimizer state to restore");
    optimizer_step = reader.optimizer_step();
    for (const model::Parameter<T>& p : restore.optimizer->parameters()) {
      moments[p.name] = {reader.read_as<T>("/optimizer/exp_avg/" + p.name),
                         reader.read_as<T>("/optimizer/exp_avg_sq/" + p.name)};
      require(moments[p.name].first.size() == static_cast<std::size_t>(p.tensor->size()) &&
                  moments[p.name].second.size() == static_cast<std::size_t>(p.tensor->size()),
              Status::shape_mismatch, path, ": optimizer moments of '", p.name, "' have the wrong size");
    }
  }
  if (restore.rng != nullptr) {
    require(reader.has_rng(), Status::invalid_argument, path, ": no /rng state to restore");
    rng_state = reader.read_as<std::uint64_t>("/rng/state");
    require(rng_state.size() == 2, Status::corrupt_file, path, ": /rng/state must hold [seed, position]");
  }

  for (std::size_t i = 0; i < parameters.size(); ++i) parameters[i].tensor->copy_from_host(values[i]);
  if (restore.optimizer != nullptr) {
    restore.optimizer->set_steps(optimizer_step);
    for (auto& [name, m] : restore.optimizer->moments()) {
      m.exp_avg.copy_from_host(moments.at(name).first);
      m.exp_avg_sq.copy_from_host(moments.at(name).second);
    }
  }
  if (restore.rng != nullptr) *restore.rng = Generator::restore(rng_state[0], rng_state[1]);
  if (restore.train != nullptr) *restore.train = reader.train();
  if (restore.step != nullptr) *restore.step = info.step;
}

template <class T>
std::unique_ptr<model::Layer<T>> load_layer(const std::string& path, const CheckpointLoadOptions& options) {
  const CheckpointReader reader(path);
  auto layer = model::build_layer<T>(reader.info().model, reader.info().config, 0);
  load_checkpoint(path, *layer, options);
  return layer;
}

#define KMOE_INSTANTIATE(T)                                                                                   \
  template void save_checkpoint(const std::string&, model::Layer<T>&, const CheckpointExtras<T>&);            \
  template void load_checkpoint(const std::string&, model::Layer<T>&, const CheckpointLoadOptions&,           \
                                const CheckpointRestore<T>&);                                                 \
  template std::unique_ptr<model::Layer<T>> load_layer(const std::string&, const CheckpointLoadOptions&);
KMOE_INSTANTIATE(float)
KMOE_INSTANTIATE(double)
#undef KMOE_INSTANTIATE

}  // namespace kmoe::io
