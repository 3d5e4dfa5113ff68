#include "kmoe/io/checkpoint.hpp"

#include "kmoe/core/error.hpp"
#include "kmoe/io/atomic_write.hpp"
#include "kmoe/dist/parameter_blocks.hpp"
#include "kmoe/io/impl/hdf5_handle.hpp"
#include "kmoe/io/impl/hdf5_strings.hpp"
#include "kmoe/model/builder.hpp"

#include <hdf5.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <optional>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif
#if defined(__unix__)
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <unistd.h>
#endif

namespace kmoe::io {

namespace {

constexpr const char* kmoe_version_string = "0.1.0";

using H5Object = impl::Handle;
using impl::silence_hdf5_errors;

template <class T>
hid_t native_type() {
  return std::is_same_v<T, float> ? H5T_NATIVE_FLOAT : H5T_NATIVE_DOUBLE;
}

// ---- chunks -------------------------------------------------------------------------------
// Parameters are written and read chunk by chunk (H5Dwrite_chunk / H5Dread_chunk) with kmoe's
// own Fletcher32, bit-identical to HDF5's filter: the file is the same as one written through
// the filter pipeline (any HDF5 reader verifies it), without the pipeline's per-chunk copies and
// its byte-at-a-time checksum (about 3 GB/s; this one about 9 GB/s with SSE2).

// HDF5's H5_checksum_fletcher32 (H5checksum.c): big-endian 16-bit words in blocks of at most 360,
// sum1 += w and sum2 += sum1 per word, both folded to 17 bits after each block, then once more.
// Per block this computes sum2 += tlen·sum1 + Σ (tlen − i)·w_i and sum1 += Σ w_i, which equals the
// word-by-word sums modulo 2^32, the arithmetic HDF5 does them in, so every result is the same.
std::uint32_t fletcher32(const void* bytes, std::size_t length) {
  const auto* data = static_cast<const unsigned char*>(bytes);
  std::size_t words = length / 2;
  std::uint32_t sum1 = 0, sum2 = 0;
  while (words > 0) {
    const std::uint32_t block = words > 360 ? 360 : static_cast<std::uint32_t>(words);
    words -= block;
    std::uint32_t sum = 0, weighted = 0;
    std::uint32_t i = 0;
#if defined(__SSE2__)
    // Eight lanes of word j in group g (i = 8g + j): v1 += w; v2 += v1 before it, so that
    // Σ (block − i)·w_i = 8·Σ v2 + Σ_j (8 − j + block − 8·groups)·v1[j].
    const std::uint32_t groups = block / 8;
    const __m128i zero = _mm_setzero_si128();
    __m128i v1_lo = zero, v1_hi = zero, v2_lo = zero, v2_hi = zero;
    for (std::uint32_t g = 0; g < groups; ++g) {
      __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(data + 16 * g));
      x = _mm_or_si128(_mm_slli_epi16(x, 8), _mm_srli_epi16(x, 8));
      v2_lo = _mm_add_epi32(v2_lo, v1_lo);
      v2_hi = _mm_add_epi32(v2_hi, v1_hi);
      v1_lo = _mm_add_epi32(v1_lo, _mm_unpacklo_epi16(x, zero));
      v1_hi = _mm_add_epi32(v1_hi, _mm_unpackhi_epi16(x, zero));
    }
    std::uint32_t v1[8], v2[8];
    _mm_storeu_si128(reinterpret_cast<__m128i*>(v1), v1_lo);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(v1 + 4), v1_hi);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(v2), v2_lo);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(v2 + 4), v2_hi);
    const std::uint32_t rest = block - 8 * groups;
    for (std::uint32_t j = 0; j < 8; ++j) {
      sum += v1[j];
      weighted += 8 * v2[j] + (8 - j + rest) * v1[j];
    }
    i = 8 * groups;
#endif
    for (; i < block; ++i) {
      const std::uint32_t word = (std::uint32_t(data[2 * i]) << 8) | data[2 * i + 1];
      sum += word;
      weighted += (block - i) * word;
    }
    data += 2 * block;
    sum2 += block * sum1 + weighted;
    sum1 += sum;
    sum1 = (sum1 & 0xffff) + (sum1 >> 16);
    sum2 = (sum2 & 0xffff) + (sum2 >> 16);
  }
  if (length % 2 != 0) {
    sum1 += std::uint32_t(*data) << 8;
    sum2 += sum1;
    sum1 = (sum1 & 0xffff) + (sum1 >> 16);
    sum2 = (sum2 & 0xffff) + (sum2 >> 16);
  }
  sum1 = (sum1 & 0xffff) + (sum1 >> 16);
  sum2 = (sum2 & 0xffff) + (sum2 >> 16);
  return (sum2 << 16) | sum1;
}

bool host_little_endian() {
  const std::uint16_t one = 1;
  unsigned char first = 0;
  std::memcpy(&first, &one, 1);
  return first == 1;
}

// The filter stores the checksum after the chunk's bytes, little-endian (UINT32ENCODE).
void put_checksum(unsigned char* at, std::uint32_t sum) {
  for (int b = 0; b < 4; ++b) at[b] = static_cast<unsigned char>(sum >> (8 * b));
}

std::uint32_t get_checksum(const unsigned char* at) {
  std::uint32_t sum = 0;
  for (int b = 0; b < 4; ++b) sum |= std::uint32_t(at[b]) << (8 * b);
  return sum;
}

// Is `stored` the checksum of the bytes? As HDF5's filter, the byte-swapped form that HDF5 1.6.2
// and older wrote is accepted too.
bool checksum_matches(std::uint32_t stored, const unsigned char* bytes, std::size_t length) {
  const std::uint32_t sum = fletcher32(bytes, length);
  const std::uint32_t reversed = ((sum & 0x00ff00ffu) << 8) | ((sum >> 8) & 0x00ff00ffu);
  return stored == sum || stored == reversed;
}

// Chunks span whole slices along axis 0: one slice (one expert) each for expert tensors, else as
// many as fit in about 4 MiB, balanced over the chunks, because HDF5 stores an edge chunk whole
// (a [8000, 412] embedding in chunks of 2545 rows filled 79% of its 4 chunks; 2000 rows fill all).
std::vector<hsize_t> chunk_dims(const Shape& shape, std::size_t element_size, bool one_slice_each) {
  std::vector<hsize_t> chunk;
  for (int i = 0; i < shape.rank(); ++i) chunk.push_back(std::max<hsize_t>(static_cast<hsize_t>(shape[i]), 1));
  const hsize_t slices = chunk[0];
  const std::size_t slice_bytes =
      element_size * static_cast<std::size_t>(shape.rank() > 1 ? shape.product(1, shape.rank()) : 1);
  const std::size_t target_bytes = std::size_t(4) << 20;
  if (one_slice_each || slice_bytes == 0) {
    chunk[0] = 1;
  } else {
    const hsize_t fit = std::max<hsize_t>(1, target_bytes / slice_bytes);
    const hsize_t chunks = (slices + fit - 1) / fit;
    chunk[0] = (slices + chunks - 1) / chunks;
  }
  return chunk;
}

std::string utc_now() {
  const std::time_t now = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&now, &tm);
  char text[32];
  std::strftime(text, sizeof text, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return text;
}

// Selects the block `slab` of the dataspace (H5Sselect_hyperslab); false when HDF5 refuses it.
bool select_block(hid_t space, const dist::Hyperslab& slab) {
  const std::vector<hsize_t> start(slab.start.begin(), slab.start.end()), stride(slab.stride.begin(), slab.stride.end()),
      count(slab.count.begin(), slab.count.end()), block(slab.block.begin(), slab.block.end());
  return H5Sselect_hyperslab(space, H5S_SELECT_SET, start.data(), stride.data(), count.data(), block.data()) >= 0;
}

// ---- writing ------------------------------------------------------------------------------

// Writes a checkpoint's objects. Over several ranks (a file opened with HDF5's MPI-IO driver)
// every rank makes the same calls, which HDF5 needs for every object and attribute: the metadata
// are written collectively, and each rank writes its block of every tensor in one collective
// H5Dwrite through the Fletcher32 filter (parallel HDF5 filters chunks only in collective writes),
// dense tensors by rank 0. One rank writes whole tensors chunk by chunk (write_chunks).
class Writer {
 public:
  explicit Writer(const std::string& target, const dist::Communicator& comm = {}) : target_(target), comm_(comm) {
    if (!comm.distributed()) return;
    transfer_list_.emplace(H5Pcreate(H5P_DATASET_XFER), H5Pclose);
    transfer_ = transfer_list_->get();
    check(H5Pset_dxpl_mpio(transfer_, H5FD_MPIO_COLLECTIVE), "the collective transfer property");
  }

  void check(herr_t rc, const std::string& what) const {
    require(rc >= 0, Status::io_error, target_, ": writing ", what, " failed (disk full or unwritable?)");
  }
  void check(hid_t id, const std::string& what) const {
    require(id >= 0, Status::io_error, target_, ": writing ", what, " failed (disk full or unwritable?)");
  }

  void string_attribute(hid_t object, const char* name, const std::string& value) const {
    check(impl::write_string_attribute(object, name, value), std::string("attribute ") + name);
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

  // A chunked, Fletcher32-checksummed dataset, in chunk_dims' chunks.
  hid_t dataset(hid_t group, const std::string& name, const Shape& shape, hid_t file_type, std::size_t element_size,
                bool one_slice_each = false) const {
    std::vector<hsize_t> dims;
    for (int i = 0; i < shape.rank(); ++i) dims.push_back(static_cast<hsize_t>(shape[i]));
    require(!dims.empty(), Status::internal, target_, ": dataset ", name, " has rank 0");
    const std::vector<hsize_t> chunk = chunk_dims(shape, element_size, one_slice_each);
    H5Object space(H5Screate_simple(static_cast<int>(dims.size()), dims.data(), nullptr), H5Sclose);
    H5Object plist(H5Pcreate(H5P_DATASET_CREATE), H5Pclose);
    check(H5Pset_chunk(plist.get(), static_cast<int>(chunk.size()), chunk.data()), "chunk layout of " + name);
    check(H5Pset_fletcher32(plist.get()), "checksum filter of " + name);
    const hid_t id = H5Dcreate2(group, name.c_str(), file_type, space.get(), H5P_DEFAULT, plist.get(), H5P_DEFAULT);
    check(id, "dataset " + name);
    return id;
  }

  // values: p's tensor, or one shaped like it (an AdamW moment); with p's attributes when
  // `describe`. The dataset has p's whole shape over every rank.
  template <class T>
  void tensor(hid_t group, const std::string& name, const Tensor<T>& values, const model::Parameter<T>& p,
              bool describe) const {
    const hid_t file_type = std::is_same_v<T, float> ? H5T_IEEE_F32LE : H5T_IEEE_F64LE;
    const bool one_expert_each = p.kind == model::ParameterKind::expert && p.expert_axis == 0;
    const Shape shape = p.global_shape();
    H5Object ds(dataset(group, name, shape, file_type, sizeof(T), one_expert_each), H5Dclose);
    if (comm_.distributed()) {
      const dist::Hyperslab slab = dist::hyperslab_of(p);
      const bool mine = p.partial() ? !slab.empty : comm_.rank() == 0;
      write_block(ds.get(), name, mine ? values.to_host() : std::vector<T>(), shape, mine ? &slab : nullptr);
    } else {
      write_chunks(ds.get(), name, values, chunk_dims(shape, sizeof(T), one_expert_each));
    }
    if (!describe) return;
    string_attribute(ds.get(), "kind", model::parameter_kind_name(p.kind));
    if (p.kind != model::ParameterKind::expert) return;
    number_attribute(ds.get(), "expert_axis", static_cast<std::int64_t>(p.expert_axis));
    std::vector<int> experts;
    for (index_t e = 0; e < shape[0]; ++e) experts.push_back(static_cast<int>(e));
    int_list_attribute(ds.get(), "experts", experts);
    if (!p.torch.per_expert_names.empty()) {
      string_list_attribute(ds.get(), "torch_names", p.torch.per_expert_names);
      number_attribute(ds.get(), "torch_transposed", static_cast<std::int64_t>(p.torch.transposed));
    }
  }

  // A small dataset's values, written by rank 0 (every rank calls it).
  void values(hid_t ds, hid_t memory_type, const void* data, const std::string& name) const {
    if (!comm_.distributed()) return check(H5Dwrite(ds, memory_type, H5S_ALL, H5S_ALL, H5P_DEFAULT, data), name);
    H5Object file_space(H5Dget_space(ds), H5Sclose);
    H5Object memory(H5Scopy(file_space.get()), H5Sclose);
    if (comm_.rank() != 0) {
      H5Sselect_none(file_space.get());
      H5Sselect_none(memory.get());
    }
    check(H5Dwrite(ds, memory_type, memory.get(), file_space.get(), transfer_, data), name);
  }

  // This rank's block (values, in the hyperslab's order) of a dataset of the whole shape, in the
  // collective write every rank takes part in (slab null: this rank writes nothing).
  template <class T>
  void write_block(hid_t ds, const std::string& name, const std::vector<T>& values, const Shape& shape,
                   const dist::Hyperslab* slab) const {
    if (shape.size() == 0) return;
    H5Object file_space(H5Dget_space(ds), H5Sclose);
    const hsize_t n = std::max<hsize_t>(values.size(), 1);
    H5Object memory(H5Screate_simple(1, &n, nullptr), H5Sclose);
    if (slab != nullptr && !values.empty()) {
      require(select_block(file_space.get(), *slab), Status::io_error, target_, ": writing the block of dataset ", name,
              " failed (disk full or unwritable?)");
      require(H5Sget_select_npoints(file_space.get()) == static_cast<hssize_t>(values.size()), Status::internal,
              target_, ": the block of ", name, " selects ", H5Sget_select_npoints(file_space.get()), " values, not ",
              values.size());
    } else {
      H5Sselect_none(file_space.get());
      H5Sselect_none(memory.get());
    }
    check(H5Dwrite(ds, native_type<T>(), memory.get(), file_space.get(), transfer_, values.data()),
          "dataset " + name);
  }

  // The tensor's values, chunk by chunk with their checksums (the filter's output, bit for bit);
  // through H5Dwrite where the file's byte order is not the host's.
  template <class T>
  void write_chunks(hid_t ds, const std::string& name, const Tensor<T>& tensor, const std::vector<hsize_t>& chunk) const {
    if (tensor.size() == 0) return;
    using Space = typename View1<T>::memory_space;
    std::vector<T> staged;
    const T* values = tensor.data();
    if (!Kokkos::SpaceAccessibility<Kokkos::HostSpace, Space>::accessible) {
      staged = tensor.to_host();
      values = staged.data();
    }
    if (!host_little_endian()) {
      check(H5Dwrite(ds, native_type<T>(), H5S_ALL, H5S_ALL, H5P_DEFAULT, values), "dataset " + name);
      return;
    }
    const Shape& shape = tensor.shape();
    const std::size_t slices = static_cast<std::size_t>(shape[0]);
    const std::size_t slice = static_cast<std::size_t>(tensor.size()) / slices;
    const std::size_t rows = static_cast<std::size_t>(chunk[0]);
    const std::size_t chunk_bytes = rows * slice * sizeof(T);
    std::vector<unsigned char> buffer(chunk_bytes + 4);
    std::vector<hsize_t> offset(chunk.size(), 0);
    for (std::size_t first = 0; first < slices; first += rows) {
      const std::size_t bytes = std::min(rows, slices - first) * slice * sizeof(T);
      std::memcpy(buffer.data(), values + first * slice, bytes);
      std::memset(buffer.data() + bytes, 0, chunk_bytes - bytes);  // an edge chunk's rest: the fill value
      put_checksum(buffer.data() + chunk_bytes, fletcher32(buffer.data(), chunk_bytes));
      offset[0] = first;
      check(H5Dwrite_chunk(ds, H5P_DEFAULT, 0, offset.data(), chunk_bytes + 4, buffer.data()), "dataset " + name);
    }
  }

  hid_t group(hid_t parent, const char* name) const {
    const hid_t id = H5Gcreate2(parent, name, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    check(id, std::string("group ") + name);
    return id;
  }

 private:
  std::string target_;
  dist::Communicator comm_;
  std::optional<H5Object> transfer_list_;
  hid_t transfer_ = H5P_DEFAULT;  // collective over several ranks
};

// Reserves `bytes` of disk for the file being written (fallocate, without changing its size), so
// that HDF5's writes cannot fail for lack of space: HDF5 1.10 cannot close a file whose writes
// failed, and crashes at exit trying again (H5F__close_cb). A full disk, a quota or a file size
// limit fails here, before any data is written, as Status::io_error. Returns the bytes reserved: 0
// on file systems without fallocate, which skip it.
std::uint64_t reserve_disk(std::uint64_t bytes, const std::string& target, const std::string& file_path) {
#if defined(__linux__)
  // A reservation that keeps the size is not checked against RLIMIT_FSIZE: check it here.
  rlimit limit{};
  if (::getrlimit(RLIMIT_FSIZE, &limit) == 0 && limit.rlim_cur != RLIM_INFINITY && bytes > limit.rlim_cur) {
    fail(Status::io_error, target, ": the checkpoint needs up to ", bytes, " bytes, over the file size limit of ",
         static_cast<std::uint64_t>(limit.rlim_cur), " bytes (ulimit -f)");
  }
  const int fd = ::open(file_path.c_str(), O_WRONLY | O_CLOEXEC);
  if (fd < 0) return 0;
  const int rc = ::fallocate(fd, FALLOC_FL_KEEP_SIZE, 0, static_cast<off_t>(bytes));
  const int error = errno;
  ::close(fd);
  if (rc == 0) return bytes;
  if (error == EOPNOTSUPP || error == ENOSYS) return 0;
  fail(Status::io_error, target, ": cannot reserve ", bytes, " bytes of disk for ", file_path, " (disk full?): ",
       std::strerror(error));
#else
  (void)bytes, (void)target, (void)file_path;
  return 0;
#endif
}

// Gives back the reservation past the closed file's end: a truncation that shrinks the file
// frees every block past the new end (punching a hole past the end is a no-op on ext4).
void release_reserve(const std::string& file_path, std::uint64_t reserved) {
#if defined(__linux__)
  const std::uint64_t size = std::filesystem::file_size(file_path);
  if (reserved <= size) return;
  const int fd = ::open(file_path.c_str(), O_WRONLY | O_CLOEXEC);
  if (fd < 0) return;
  if (::ftruncate(fd, static_cast<off_t>(size + 1)) == 0) (void)::ftruncate(fd, static_cast<off_t>(size));
  ::close(fd);
#else
  (void)file_path, (void)reserved;
#endif
}

// The root attributes that must be the same on every rank (rank 0's): the time stamp and the
// caller's JSON.
struct SharedText {
  std::string created, train, source;
};

template <class T>
void write_contents(hid_t file, const Writer& w, model::Layer<T>& layer, const CheckpointExtras<T>& extras,
                    const SharedText& text) {
  w.number_attribute(file, "kmoe_format", static_cast<std::int64_t>(checkpoint_format_version));
  w.string_attribute(file, "model", layer.kind());
  w.string_attribute(file, "config", layer.config().dump());
  w.string_attribute(file, "dtype", model::dtype_name(model::dtype_of<T>()));
  w.string_attribute(file, "kmoe_version", kmoe_version_string);
  w.string_attribute(file, "created", text.created);
  w.number_attribute(file, "step", extras.step);
  if (!extras.source.is_null()) w.string_attribute(file, "source", text.source);

  const model::ParameterList<T> parameters = model::trainable(layer.parameters());
  {
    H5Object params(w.group(file, "params"), H5Gclose);
    for (const model::Parameter<T>& p : parameters) w.tensor(params.get(), p.name, *p.tensor, p, true);
  }
  if (extras.optimizer != nullptr) {
    const model::AdamW<T>& opt = *extras.optimizer;
    H5Object group(w.group(file, "optimizer"), H5Gclose);
    w.string_attribute(group.get(), "name", "AdamW");
    w.number_attribute(group.get(), "step", opt.steps());
    w.number_attribute(group.get(), "lr", opt.config().lr);
    w.number_attribute(group.get(), "beta1", opt.config().beta1);
    w.number_attribute(group.get(), "beta2", opt.config().beta2);
    w.number_attribute(group.get(), "eps", opt.config().eps);
    w.number_attribute(group.get(), "weight_decay", opt.config().weight_decay);
    H5Object avg(w.group(group.get(), "exp_avg"), H5Gclose);
    H5Object avg_sq(w.group(group.get(), "exp_avg_sq"), H5Gclose);
    for (const model::Parameter<T>& p : opt.parameters()) {
      const model::AdamWMoments<T>& m = opt.moments().at(p.name);
      w.tensor(avg.get(), p.name, m.exp_avg, p, false);
      w.tensor(avg_sq.get(), p.name, m.exp_avg_sq, p, false);
    }
  }
  if (extras.rng != nullptr) {
    H5Object group(w.group(file, "rng"), H5Gclose);
    H5Object ds(w.dataset(group.get(), "state", Shape{2}, H5T_STD_U64LE, 8), H5Dclose);
    const std::uint64_t state[2] = {extras.rng->seed(), extras.rng->position()};
    w.values(ds.get(), H5T_NATIVE_UINT64, state, "/rng/state");
  }
  if (!extras.train.is_null()) {
    H5Object group(w.group(file, "train"), H5Gclose);
    w.string_attribute(group.get(), "json", text.train);
  }
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
  return impl::read_string_attribute(object, name, Status::corrupt_file, path);
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

// Do the checksums of chunks [0, n) of `chunk_bytes` bytes each, laid end to end at data, match
// `stored`? Over the host threads when Kokkos runs (checksumming is the one computation of a read).
bool chunks_match(const unsigned char* data, std::size_t chunk_bytes, const std::vector<std::uint32_t>& stored,
                  std::size_t n, std::size_t stride = 0) {
  if (stride == 0) stride = chunk_bytes;
  const auto mismatch = [&](std::size_t c) { return !checksum_matches(stored[c], data + c * stride, chunk_bytes); };
  if (n <= 1 || !Kokkos::is_initialized()) {
    for (std::size_t c = 0; c < n; ++c)
      if (mismatch(c)) return false;
    return true;
  }
  int bad = 0;
  Kokkos::parallel_reduce(
      "kmoe::io::fletcher32", Kokkos::RangePolicy<Kokkos::DefaultHostExecutionSpace>(0, n),
      [&](std::size_t c, int& count) { count += mismatch(c) ? 1 : 0; }, bad);
  return bad == 0;
}

// How a dataset kmoe wrote is chunked: along axis 0 only, Fletcher32 its only filter, little-endian
// float32 or float64, so that chunks can be read raw (H5Dread_chunk) and checked with kmoe's own
// Fletcher32. Anything else (another writer's file, a big-endian host) goes through HDF5's pipeline.
struct RawChunks {
  bool f32 = false;
  std::size_t element = 0;     // bytes per value in the file
  std::size_t slices = 0;      // dims[0]
  std::size_t slice = 0;       // values per slice
  std::size_t rows = 0;        // slices per chunk
  std::size_t chunk_bytes = 0;  // a chunk's values, without the 4-byte checksum
  std::size_t chunks = 0;
  std::vector<hsize_t> offset;  // the chunk origin passed to H5Dread_chunk

  std::size_t values_in(std::size_t c) const { return std::min(rows, slices - c * rows) * slice; }
  // Reads chunk c (values and checksum, chunk_bytes + 4) into `into`. A chunk not stored as
  // expected (unallocated, another size, its filter skipped) is for the pipeline to read; one
  // that HDF5 cannot read is a damaged file.
  enum class Read { ok, not_raw, unreadable };
  Read read(hid_t ds, std::size_t c, unsigned char* into) {
    offset[0] = c * rows;
    hsize_t size = 0;
    if (H5Dget_chunk_storage_size(ds, offset.data(), &size) < 0 || size != chunk_bytes + 4) return Read::not_raw;
    std::uint32_t skipped = 0;
    if (H5Dread_chunk(ds, H5P_DEFAULT, offset.data(), &skipped, into) < 0) return Read::unreadable;
    return skipped == 0 ? Read::ok : Read::not_raw;
  }
};

std::optional<RawChunks> raw_chunks(hid_t ds, hid_t space, std::size_t count) {
  if (!host_little_endian() || count == 0) return std::nullopt;
  H5Object dcpl(H5Dget_create_plist(ds), H5Pclose);
  if (!dcpl.valid() || H5Pget_layout(dcpl.get()) != H5D_CHUNKED || H5Pget_nfilters(dcpl.get()) != 1) return std::nullopt;
  unsigned flags = 0;
  std::size_t n_values = 0;
  if (H5Pget_filter2(dcpl.get(), 0, &flags, &n_values, nullptr, 0, nullptr, nullptr) != H5Z_FILTER_FLETCHER32)
    return std::nullopt;
  const int rank = H5Sget_simple_extent_ndims(space);
  if (rank < 1) return std::nullopt;
  std::vector<hsize_t> dims(static_cast<std::size_t>(rank)), chunk(static_cast<std::size_t>(rank));
  H5Sget_simple_extent_dims(space, dims.data(), nullptr);
  if (H5Pget_chunk(dcpl.get(), rank, chunk.data()) != rank) return std::nullopt;
  for (int i = 1; i < rank; ++i)
    if (chunk[i] != dims[i]) return std::nullopt;
  H5Object type(H5Dget_type(ds), H5Tclose);
  const bool f32 = H5Tequal(type.get(), H5T_IEEE_F32LE) > 0, f64 = H5Tequal(type.get(), H5T_IEEE_F64LE) > 0;
  if (!f32 && !f64) return std::nullopt;
  RawChunks r;
  r.f32 = f32;
  r.element = f32 ? 4 : 8;
  r.slices = static_cast<std::size_t>(dims[0]);
  r.slice = count / r.slices;
  r.rows = static_cast<std::size_t>(chunk[0]);
  r.chunk_bytes = r.rows * r.slice * r.element;
  r.chunks = (r.slices + r.rows - 1) / r.rows;
  r.offset.assign(dims.size(), 0);
  return r;
}

// n values of the file's type (float32 when f32, else float64) at `from` as V.
template <class V>
void convert_values(const unsigned char* from, bool f32, V* into, std::size_t n) {
  if (f32 == std::is_same_v<V, float>) {
    std::memcpy(into, from, n * sizeof(V));
  } else if (f32) {
    const auto* in = reinterpret_cast<const float*>(from);
    for (std::size_t i = 0; i < n; ++i) into[i] = static_cast<V>(in[i]);
  } else {
    const auto* in = reinterpret_cast<const double*>(from);
    for (std::size_t i = 0; i < n; ++i) into[i] = static_cast<V>(in[i]);
  }
}

[[noreturn]] void corrupt_dataset(const std::string& path, const std::string& file_path) {
  fail(Status::corrupt_file, file_path, ": dataset ", path, " is corrupt (checksum mismatch or truncated file)");
}

// Reads slices [first, end) of axis 0 of a dataset through raw chunks (RawChunks), converting to
// V; returns false (nothing trusted) where the dataset is not stored so or the range does not start
// and end on chunk boundaries. Chunks of V's own type are read in place, each chunk's checksum
// landing on the next chunk's first bytes before that chunk overwrites them; their checksums are
// verified in parallel at the end.
template <class V>
bool read_chunks(hid_t ds, hid_t space, V* values, std::size_t first, std::size_t end, const std::string& path,
                 const std::string& file_path) {
  if constexpr (!std::is_floating_point_v<V>) {
    return false;
  } else {
    std::optional<RawChunks> raw = raw_chunks(ds, space, static_cast<std::size_t>(H5Sget_simple_extent_npoints(space)));
    if (!raw || first % raw->rows != 0 || (end % raw->rows != 0 && end != raw->slices)) return false;
    const std::size_t c0 = first / raw->rows, c1 = (end + raw->rows - 1) / raw->rows;
    const bool same_type = raw->f32 == std::is_same_v<V, float>;
    auto* const out = reinterpret_cast<unsigned char*>(values);
    std::vector<unsigned char> buffer;
    std::vector<std::uint32_t> stored(c1 - c0);
    for (std::size_t c = c0; c < c1; ++c) {
      const std::size_t i = c - c0;
      const bool direct = same_type && c + 1 < c1;
      if (!direct && buffer.empty()) buffer.resize(raw->chunk_bytes + 4);
      unsigned char* const target = direct ? out + i * raw->chunk_bytes : buffer.data();
      const RawChunks::Read got = raw->read(ds, c, target);
      if (got == RawChunks::Read::unreadable) corrupt_dataset(path, file_path);
      if (got == RawChunks::Read::not_raw) return false;
      if (direct) {
        stored[i] = get_checksum(target + raw->chunk_bytes);
        continue;
      }
      if (!checksum_matches(get_checksum(buffer.data() + raw->chunk_bytes), buffer.data(), raw->chunk_bytes))
        corrupt_dataset(path, file_path);
      convert_values(buffer.data(), raw->f32, values + i * raw->rows * raw->slice, raw->values_in(c));
    }
    if (same_type && c1 > c0 && !chunks_match(out, raw->chunk_bytes, stored, c1 - c0 - 1))
      corrupt_dataset(path, file_path);
    return true;
  }
}

std::vector<hsize_t> dims_of(hid_t space) {
  std::vector<hsize_t> dims(static_cast<std::size_t>(std::max(H5Sget_simple_extent_ndims(space), 0)));
  H5Sget_simple_extent_dims(space, dims.data(), nullptr);
  return dims;
}

// The open dataset's values into values (type V), all of them or the block `slab` (its count
// values, in its order): read_chunks where the block is a range of whole chunks, else through the
// filter pipeline; Fletcher32 verifies every chunk either way.
template <class V>
void read_values(hid_t ds, hid_t space, V* values, const std::string& path, const std::string& file_path,
                 const dist::Hyperslab* slab = nullptr) {
  const std::vector<hsize_t> dims = dims_of(space);
  const Shape shape(std::vector<index_t>(dims.begin(), dims.end()));
  if (slab != nullptr && slab->whole(shape)) slab = nullptr;
  const std::size_t first = slab != nullptr ? slab->start[0] : 0;
  const std::size_t end = slab != nullptr ? first + slab->block[0] : (dims.empty() ? 0 : dims[0]);
  if ((slab == nullptr || slab->axis0_range(shape)) && read_chunks(ds, space, values, first, end, path, file_path))
    return;
  const hid_t memory_type = std::is_same_v<V, float>    ? H5T_NATIVE_FLOAT
                            : std::is_same_v<V, double> ? H5T_NATIVE_DOUBLE
                                                        : H5T_NATIVE_UINT64;
  hid_t file_space = H5S_ALL, memory_space = H5S_ALL;
  std::optional<H5Object> selection, memory;
  if (slab != nullptr) {
    selection.emplace(H5Scopy(space), H5Sclose);
    require(select_block(selection->get(), *slab) && H5Sselect_valid(selection->get()) > 0,
            Status::shape_mismatch, file_path, ": dataset ", path, " does not hold the block wanted");
    const hsize_t n = static_cast<hsize_t>(H5Sget_select_npoints(selection->get()));
    if (n == 0) return;
    memory.emplace(H5Screate_simple(1, &n, nullptr), H5Sclose);
    file_space = selection->get();
    memory_space = memory->get();
  }
  require(H5Dread(ds, memory_type, memory_space, file_space, H5P_DEFAULT, values) >= 0, Status::corrupt_file,
          file_path, ": dataset ", path, " is corrupt (checksum mismatch or truncated file)");
}

// Calls visit(values, n) for the dataset's values in order, chunk by chunk through one buffer of a
// batch of chunks (the batch's checksums verified before its values are visited), or once with the
// whole dataset where it is not stored as RawChunks.
template <class V>
void visit_dataset(hid_t file, const std::string& path, const std::string& file_path,
                   const std::function<void(const V*, std::size_t)>& visit) {
  H5Object ds(H5Dopen2(file, path.c_str(), H5P_DEFAULT), H5Dclose);
  require(ds.valid(), Status::corrupt_file, file_path, ": no dataset ", path);
  H5Object space(H5Dget_space(ds.get()), H5Sclose);
  const hssize_t n = H5Sget_simple_extent_npoints(space.get());
  require(n >= 0, Status::corrupt_file, file_path, ": dataset ", path, " is unreadable");
  std::optional<RawChunks> raw = raw_chunks(ds.get(), space.get(), static_cast<std::size_t>(n));
  if (raw) {
    // Batches of about 16 MiB of chunks, whose checksums are verified in parallel. The buffer is
    // not zeroed, and small enough for malloc to reuse it from one dataset to the next (glibc
    // maps, and page-faults anew, blocks over its 32 MiB ceiling every time).
    const std::size_t slot = raw->chunk_bytes + 4;
    const std::size_t batch = std::max<std::size_t>(1, (std::size_t(16) << 20) / slot);
    const std::unique_ptr<unsigned char[]> buffer(new unsigned char[std::min(batch, raw->chunks) * slot]);
    std::vector<std::uint32_t> stored(std::min(batch, raw->chunks));
    std::vector<V> converted;
    for (std::size_t first = 0; raw && first < raw->chunks; first += batch) {
      const std::size_t count = std::min(batch, raw->chunks - first);
      for (std::size_t i = 0; i < count; ++i) {
        const RawChunks::Read got = raw->read(ds.get(), first + i, buffer.get() + i * slot);
        if (got == RawChunks::Read::unreadable) corrupt_dataset(path, file_path);
        if (got == RawChunks::Read::not_raw) {
          require(first + i == 0, Status::corrupt_file, file_path, ": dataset ", path,
                  " has a chunk of an unexpected size");
          raw.reset();
          break;
        }
        stored[i] = get_checksum(buffer.get() + i * slot + raw->chunk_bytes);
      }
      if (!raw) break;
      if (!chunks_match(buffer.get(), raw->chunk_bytes, stored, count, slot)) corrupt_dataset(path, file_path);
      for (std::size_t i = 0; i < count; ++i) {
        const unsigned char* bytes = buffer.get() + i * slot;
        const std::size_t values = raw->values_in(first + i);
        if (raw->f32 == std::is_same_v<V, float>) {
          visit(reinterpret_cast<const V*>(bytes), values);
        } else {
          converted.resize(values);
          convert_values(bytes, raw->f32, converted.data(), values);
          visit(converted.data(), values);
        }
      }
    }
    if (raw) return;
  }
  std::vector<V> values(static_cast<std::size_t>(n));
  read_values(ds.get(), space.get(), values.data(), path, file_path);
  visit(values.data(), values.size());
}

// Reads a float or integer dataset into memory of type V, all of it or the block `slab`: into a
// new vector, or into `count` values at `values` (another size is Status::shape_mismatch).
template <class V>
std::vector<V> read_dataset(hid_t file, const std::string& path, const std::string& file_path, V* values = nullptr,
                            std::size_t count = 0, const dist::Hyperslab* slab = nullptr) {
  H5Object ds(H5Dopen2(file, path.c_str(), H5P_DEFAULT), H5Dclose);
  require(ds.valid(), Status::corrupt_file, file_path, ": no dataset ", path);
  H5Object space(H5Dget_space(ds.get()), H5Sclose);
  hssize_t n = H5Sget_simple_extent_npoints(space.get());
  require(n >= 0, Status::corrupt_file, file_path, ": dataset ", path, " is unreadable");
  if (slab != nullptr) {
    n = 1;
    for (std::size_t i = 0; i < slab->count.size(); ++i) n *= static_cast<hssize_t>(slab->count[i] * slab->block[i]);
  }
  std::vector<V> own;
  if (values == nullptr) {
    own.resize(static_cast<std::size_t>(n));
    values = own.data();
    count = own.size();
  }
  require(static_cast<std::size_t>(n) == count, Status::shape_mismatch, file_path, ": dataset ", path, " holds ", n,
          " values, not ", count);
  read_values(ds.get(), space.get(), values, path, file_path, slab);
  return own;
}

// Asks the kernel to read the whole file ahead (POSIX_FADV_WILLNEED), so that a cold file's disk
// reads overlap the chunk reads and checksums; HDF5's default (sec2) driver only.
void prefetch(hid_t file) {
#if defined(POSIX_FADV_WILLNEED)
  H5Object fapl(H5Fget_access_plist(file), H5Pclose);
  if (!fapl.valid() || H5Pget_driver(fapl.get()) != H5FD_SEC2) return;
  void* handle = nullptr;
  if (H5Fget_vfd_handle(file, fapl.get(), &handle) < 0 || handle == nullptr) return;
  ::posix_fadvise(*static_cast<int*>(handle), 0, 0, POSIX_FADV_WILLNEED);
#else
  (void)file;
#endif
}

// Host memory that load_checkpoint reads every parameter into before it changes the layer:
// anonymous pages that no pass zeroes, in transparent huge pages where the kernel grants them
// (madvise). A fresh buffer's 4 KiB page faults cost as much as the read itself (169 MB: about
// 60 ms of faults against 32 ms of reading from the page cache); huge pages bring that to ~0.
template <class T>
class Staging {
 public:
  explicit Staging(std::size_t count) : bytes_(std::max<std::size_t>(count, 1) * sizeof(T)) {
#if defined(__unix__) && defined(MAP_ANONYMOUS)
    void* block = ::mmap(nullptr, bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (block != MAP_FAILED) {
#if defined(MADV_HUGEPAGE)
      ::madvise(block, bytes_, MADV_HUGEPAGE);
#endif
      data_ = static_cast<T*>(block);
      mapped_ = true;
      return;
    }
#endif
    owned_.reset(new T[bytes_ / sizeof(T)]);
    data_ = owned_.get();
  }
  ~Staging() {
#if defined(__unix__) && defined(MAP_ANONYMOUS)
    if (mapped_) ::munmap(data_, bytes_);
#endif
  }
  Staging(const Staging&) = delete;
  Staging& operator=(const Staging&) = delete;
  T* data() const { return data_; }

 private:
  std::size_t bytes_;
  T* data_ = nullptr;
  bool mapped_ = false;
  std::unique_ptr<T[]> owned_;
};

// Does the file start with HDF5's 8-byte signature (at offset 0, where kmoe writes it)?
bool has_hdf5_signature(const std::string& path) {
  char bytes[8] = {};
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (f == nullptr) return false;
  const std::size_t n = std::fread(bytes, 1, sizeof bytes, f);
  std::fclose(f);
  return n == sizeof bytes && std::memcmp(bytes, "\x89HDF\r\n\x1a\n", sizeof bytes) == 0;
}

}  // namespace

// ---- CheckpointReader ---------------------------------------------------------------------

CheckpointReader::CheckpointReader(const std::string& path) : path_(path) {
  silence_hdf5_errors();
  // HDF5 refuses a file cut short as it refuses a foreign one; its signature tells them apart.
  const bool hdf5 = H5Fis_hdf5(path.c_str()) > 0;
  require(hdf5 || !has_hdf5_signature(path), Status::corrupt_file, path,
          ": starts as an HDF5 file but does not open (truncated or damaged)");
  require(hdf5, Status::io_error, path, ": cannot open (missing, unreadable or not an HDF5 file)");
  file_ = H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
  require(file_ >= 0, Status::corrupt_file, path, ": an HDF5 file that does not open (truncated or damaged)");
  try {
    require(has_attribute(file_, "kmoe_format"), Status::invalid_argument, path,
            ": not a kmoe checkpoint (no root attribute kmoe_format)");
    info_.format = static_cast<int>(read_number(file_, "kmoe_format", path));
    require(info_.format == checkpoint_format_version, Status::unsupported, path, ": kmoe_format ", info_.format,
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
    if (has_attribute(file_, "placement")) {
      try {
        info_.placement = nlohmann::json::parse(read_string(file_, "placement", path));
      } catch (const nlohmann::json::exception&) {
        fail(Status::corrupt_file, path, ": attribute placement is not valid JSON");
      }
    }
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

template <class T>
void CheckpointReader::visit(const std::string& dataset_path,
                             const std::function<void(const T* values, std::size_t n)>& visitor) const {
  visit_dataset<T>(file_, dataset_path, path_, visitor);
}

template void CheckpointReader::visit<float>(const std::string&, const std::function<void(const float*, std::size_t)>&) const;
template void CheckpointReader::visit<double>(const std::string&, const std::function<void(const double*, std::size_t)>&) const;

template std::vector<float> CheckpointReader::read_as<float>(const std::string&) const;
template std::vector<double> CheckpointReader::read_as<double>(const std::string&) const;
template std::vector<std::uint64_t> CheckpointReader::read_as<std::uint64_t>(const std::string&) const;

// ---- save / load --------------------------------------------------------------------------

template <class T>
std::uint64_t checkpoint_size_bound(model::Layer<T>& layer, const CheckpointExtras<T>& extras) {
  std::uint64_t bytes = std::uint64_t(64) << 10;
  std::uint64_t datasets = 1;
  // The whole tensor over every rank as chunk_dims stores it: whole chunks (the edge chunk is
  // allocated whole) and per chunk a checksum and an index entry.
  const auto add = [&](const model::Parameter<T>& p) {
    const Shape shape = p.global_shape();
    const std::vector<hsize_t> chunk = chunk_dims(shape, sizeof(T), false);
    const std::uint64_t slices = static_cast<std::uint64_t>(std::max<index_t>(shape.rank() > 0 ? shape[0] : 1, 1));
    const std::uint64_t chunks = (slices + chunk[0] - 1) / chunk[0];
    const std::uint64_t slice_values =
        shape.rank() > 1 ? static_cast<std::uint64_t>(shape.product(1, shape.rank())) : std::uint64_t(1);
    bytes += chunks * chunk[0] * slice_values * sizeof(T) + 64 * slices;
    ++datasets;
  };
  for (const model::Parameter<T>& p : model::trainable(layer.parameters())) add(p);
  if (extras.optimizer != nullptr) {
    for (const model::Parameter<T>& p : extras.optimizer->parameters()) {
      add(p);
      add(p);
    }
  }
  // Object headers, attributes (the config, torch names) and groups: 2 KiB a dataset (HDF5
  // writes about 0.5; expert lists are in the 64 bytes a slice above).
  return bytes + 2048 * datasets + 4 * (layer.config().dump().size() + extras.train.dump().size() +
                                        extras.source.dump().size());
}

namespace {

// Writes the checkpoint of layer, whose experts may be placed over the ranks of its communicator:
// one file, written collectively with parallel HDF5 where there are several.
template <class T>
void save_file(const std::string& path, model::Layer<T>& layer, const CheckpointExtras<T>& extras) {
  silence_hdf5_errors();
  const dist::Communicator& comm = layer.communicator();
  const SharedText text{comm.broadcast(utc_now()), comm.broadcast(extras.train.dump()),
                        comm.broadcast(extras.source.dump())};
  const model::ParameterList<T> parameters = model::trainable(layer.parameters());
  const nlohmann::json placement = comm.distributed() ? dist::placement_json(comm, parameters) : nlohmann::json();
  const std::uint64_t bound = checkpoint_size_bound(layer, extras);
  write_atomically(
      path,
      [&](const std::string& temporary) {
        const H5Object fapl = impl::checksummed_file_access();
        if (comm.distributed()) {
          H5Pset_fapl_mpio(fapl.get(), comm.comm(), MPI_INFO_NULL);
          H5Pset_coll_metadata_write(fapl.get(), true);
        }
        const Writer w(path, comm);
        hid_t file = -1;
        comm.collectively([&] {
          file = H5Fcreate(temporary.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, fapl.get());
          w.check(file, "the file");
        });
        std::uint64_t reserved = 0;
        try {
          comm.collectively([&] {
            if (comm.rank() == 0) reserved = reserve_disk(bound, path, temporary);
          });
          write_contents(file, w, layer, extras, text);
          if (!placement.is_null()) w.string_attribute(file, "placement", placement.dump());
        } catch (...) {
          H5Fclose(file);
          throw;
        }
        w.check(H5Fclose(file), "the file (close)");
        if (comm.rank() == 0) release_reserve(temporary, reserved);
      },
      comm);
}

// This rank's block of a stored tensor of p's whole shape (all of a dense entry's; an expert
// shard's copy of an entry without a hidden axis reads its experts' values too).
template <class T>
dist::Hyperslab block_to_read(const model::Parameter<T>& p) {
  dist::Hyperslab slab = dist::hyperslab_of(p);
  slab.empty = false;
  return slab;
}

// What a load reads before anything of the layer changes: every trainable parameter's block (in
// registry order, end to end), the optimizer's moments and the extras.
template <class T>
struct LoadedCheckpoint {
  std::unique_ptr<Staging<T>> values;
  std::vector<std::size_t> offsets;
  std::map<std::string, std::pair<std::vector<T>, std::vector<T>>> moments;
  std::vector<std::uint64_t> rng_state;
  std::int64_t optimizer_step = 0;
  nlohmann::json train;
  std::int64_t step = 0;
};

// Reads this rank's part of the checkpoint for layer (its experts' hyperslabs, the dense tensors
// whole), with every check of load_checkpoint. Each rank opens the file on its own, read-only.
template <class T>
LoadedCheckpoint<T> read_for_layer(const std::string& path, model::Layer<T>& layer, const CheckpointLoadOptions& options,
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

  std::map<std::string, const StoredTensor*> stored, all;
  for (const StoredTensor& t : reader.tensors()) {
    all[t.path] = &t;
    if (t.path.rfind("/params/", 0) == 0) stored[t.name] = &t;
  }
  const model::ParameterList<T> parameters = model::trainable(layer.parameters());
  // Everything is read into one staging buffer, through a second handle on the file (the
  // reader's is private to it; HDF5 shares the file).
  LoadedCheckpoint<T> loaded;
  std::size_t total = 0;
  for (const model::Parameter<T>& p : parameters) total += static_cast<std::size_t>(p.tensor->size());
  loaded.values = std::make_unique<Staging<T>>(total);
  H5Object file(H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT), H5Fclose);
  require(file.valid(), Status::io_error, path, ": cannot open as HDF5");
  if (!layer.communicator().distributed()) prefetch(file.get());
  std::size_t offset = 0;
  for (const model::Parameter<T>& p : parameters) {
    const auto found = stored.find(p.name);
    require(found != stored.end(), Status::invalid_argument, path, ": no parameter '", p.name, "' in the checkpoint");
    const StoredTensor& t = *found->second;
    require(t.shape == p.global_shape(), Status::shape_mismatch, path, ": parameter '", p.name, "' has shape ",
            t.shape.str(), ", the layer ", p.global_shape().str());
    require(t.dtype == "float32" || t.dtype == "float64", Status::corrupt_file, path, ": parameter '", p.name,
            "' is ", t.dtype);
    require(options.convert_dtype || t.dtype == own_dtype, Status::invalid_argument, path, ": parameter '", p.name,
            "' is ", t.dtype, ", the layer ", own_dtype);
    const auto count = static_cast<std::size_t>(p.tensor->size());
    const dist::Hyperslab slab = block_to_read(p);
    read_dataset<T>(file.get(), t.path, path, loaded.values->data() + offset, count, &slab);
    loaded.offsets.push_back(offset);
    offset += count;
    stored.erase(found);
  }
  std::string extra;
  for (const auto& item : stored) extra += (extra.empty() ? "" : ", ") + item.first;
  require(extra.empty(), Status::invalid_argument, path, ": datasets that are not parameters of this ", layer.kind(),
          " layer: ", extra);

  if (restore.optimizer != nullptr) {
    require(reader.has_optimizer(), Status::invalid_argument, path, ": no /optimizer state to restore");
    loaded.optimizer_step = reader.optimizer_step();
    for (const model::Parameter<T>& p : restore.optimizer->parameters()) {
      const dist::Hyperslab slab = block_to_read(p);
      const auto count = static_cast<std::size_t>(p.tensor->size());
      auto& [avg, avg_sq] = loaded.moments[p.name];
      for (const auto& [moment, into] : {std::pair{"exp_avg", &avg}, std::pair{"exp_avg_sq", &avg_sq}}) {
        const std::string moment_path = std::string("/optimizer/") + moment + "/" + p.name;
        const auto t = all.find(moment_path);
        require(t != all.end(), Status::invalid_argument, path, ": no ", moment_path, " in the checkpoint");
        require(t->second->shape == p.global_shape(), Status::shape_mismatch, path, ": optimizer moment ", moment_path,
                " has shape ", t->second->shape.str(), ", the layer's parameter ", p.global_shape().str());
        into->resize(count);
        read_dataset<T>(file.get(), moment_path, path, into->data(), count, &slab);
      }
    }
  }
  if (restore.rng != nullptr) {
    require(reader.has_rng(), Status::invalid_argument, path, ": no /rng state to restore");
    loaded.rng_state = reader.read_as<std::uint64_t>("/rng/state");
    require(loaded.rng_state.size() == 2, Status::corrupt_file, path, ": /rng/state must hold [seed, position]");
  }
  loaded.train = reader.train();
  loaded.step = info.step;
  return loaded;
}

template <class T>
void apply_loaded(const LoadedCheckpoint<T>& loaded, model::Layer<T>& layer, const CheckpointRestore<T>& restore) {
  using HostValues = Kokkos::View<const T*, Kokkos::LayoutRight, Kokkos::HostSpace, Kokkos::MemoryUnmanaged>;
  const model::ParameterList<T> parameters = model::trainable(layer.parameters());
  for (std::size_t i = 0; i < parameters.size(); ++i) {
    const Tensor<T>& tensor = *parameters[i].tensor;
    if (tensor.size() == 0) continue;
    Kokkos::deep_copy(tensor.flat(), HostValues(loaded.values->data() + loaded.offsets[i],
                                                static_cast<std::size_t>(tensor.size())));
  }
  Kokkos::fence();
  if (restore.optimizer != nullptr) {
    restore.optimizer->set_steps(loaded.optimizer_step);
    for (auto& [name, m] : restore.optimizer->moments()) {
      m.exp_avg.copy_from_host(loaded.moments.at(name).first);
      m.exp_avg_sq.copy_from_host(loaded.moments.at(name).second);
    }
  }
  if (restore.rng != nullptr) *restore.rng = Generator::restore(loaded.rng_state[0], loaded.rng_state[1]);
  if (restore.train != nullptr) *restore.train = loaded.train;
  if (restore.step != nullptr) *restore.step = loaded.step;
}

}  // namespace

template <class T>
void save_checkpoint(const std::string& path, model::Layer<T>& layer, const CheckpointExtras<T>& extras) {
  save_file(path, layer, extras);
}

// Each rank reads its own block (re-sharding is the choice of hyperslab), and nothing of the layer
// changes unless every rank read and checked everything.
template <class T>
void load_checkpoint(const std::string& path, model::Layer<T>& layer, const CheckpointLoadOptions& options,
                     const CheckpointRestore<T>& restore) {
  std::optional<LoadedCheckpoint<T>> loaded;
  layer.communicator().collectively([&] { loaded.emplace(read_for_layer(path, layer, options, restore)); });
  apply_loaded(*loaded, layer, restore);
}

template <class T>
std::unique_ptr<model::Layer<T>> load_layer(const std::string& path, const CheckpointLoadOptions& options) {
  const CheckpointReader reader(path);
  // Zeros: every parameter is about to be loaded, so the draws would be wasted time.
  auto layer = model::build_layer<T>(reader.info().model, reader.info().config, 0, ParameterInit::zeros);
  load_checkpoint(path, *layer, options);
  return layer;
}

#define KMOE_INSTANTIATE(T)                                                                                   \
  template void save_checkpoint(const std::string&, model::Layer<T>&, const CheckpointExtras<T>&);            \
  template std::uint64_t checkpoint_size_bound(model::Layer<T>&, const CheckpointExtras<T>&);                 \
  template void load_checkpoint(const std::string&, model::Layer<T>&, const CheckpointLoadOptions&,           \
                                const CheckpointRestore<T>&);                                                 \
  template std::unique_ptr<model::Layer<T>> load_layer(const std::string&, const CheckpointLoadOptions&);
KMOE_INSTANTIATE(float)
KMOE_INSTANTIATE(double)
#undef KMOE_INSTANTIATE

}  // namespace kmoe::io
