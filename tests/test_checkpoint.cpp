// Checkpoints (io/checkpoint.hpp): bitwise round trips of every family in both dtypes, resume of an
// AdamW training loop equal to an uninterrupted run, corrupt / truncated / foreign files, loading
// checks, writes that fail (file size limit as a full disk) and writers killed mid-save.
#include "kmoe/io/checkpoint.hpp"
#include "kmoe/model/builder.hpp"
#include "test_util.hpp"

#include <hdf5.h>

#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <thread>

extern char** environ;

using namespace kmoe;
using namespace kmoe::test;
namespace fs = std::filesystem;

namespace {

struct Case {
  const char* kind;
  const char* config;
  Shape input;  // x, or tokens for moeut_lm
};

const std::vector<Case>& families() {
  static const std::vector<Case> cases = {
      {"sigma_moe", R"({"dmodel": 16, "n_experts": 4, "expert_size": 8, "k": 2, "bias": true, "dropout": 0.1})", {2, 5, 16}},
      {"st_moe", R"({"dim": 16, "num_experts": 4})", {2, 8, 16}},
      {"st_moe_block", R"({"moe": {"dim": 16, "num_experts": 4}, "add_ff_before": true})", {2, 8, 16}},
      {"st_moe_v0014", R"({"dim": 16, "num_experts": 4})", {2, 8, 16}},
      {"hier_moe_v0014", R"({"dim": 16, "num_experts": [2, 2]})", {2, 8, 16}},
      {"st_moe_block_v0014", R"({"moe_kind": "HeirarchicalMoE", "moe": {"dim": 16, "num_experts": [2, 2]}})", {2, 8, 16}},
      {"soft_moe_lite", R"({"d_model": 16, "num_experts": 3, "num_slots": 2})", {2, 6, 16}},
      {"soft_moe_lucidrains", R"({"dim": 16, "num_experts": 3, "num_slots": 2, "use_layernorm": true, "dropout": 0.1})", {2, 6, 16}},
      {"switchhead", R"({"state_size": 16, "n_heads": 2, "n_experts": 3, "moe_k": 2})", {2, 5, 16}},
      {"moeut", R"({"d_model": 16, "n_layers": 2, "n_heads": 2, "ff_n_experts": 4, "att_n_experts": 2, "ff_k": 2,
                    "att_k": 1, "ff_expert_size": 8, "dropout": 0.1})", {2, 5, 16}},
      {"moeut_lm", R"({"n_tokens": 20, "d_model": 16, "n_layers": 2, "n_heads": 2, "ff_n_experts": 4,
                       "att_n_experts": 2, "ff_k": 2, "att_k": 1})", {2, 5}},
  };
  return cases;
}

std::string scratch(const std::string& name) {
  const fs::path dir = fs::temp_directory_path() / ("kmoe_checkpoint_test_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  return (dir / name).string();
}

template <class T>
model::LayerInputs<T> inputs_for(const Case& c, std::uint64_t seed) {
  model::LayerInputs<T> in;
  if (std::string(c.kind) == "moeut_lm") {
    in.tokens = Tensor<int>::from_host("tokens", c.input, random_index(c.input.size(), 20, seed));
  } else {
    in.x = make_tensor<T>(c.input, random_values(c.input.size(), seed));
  }
  return in;
}

template <class T>
std::vector<T> values(const Tensor<T>& t) {
  return t.to_host();
}

template <class T>
std::map<std::string, std::vector<T>> parameter_values(model::Layer<T>& layer) {
  std::map<std::string, std::vector<T>> out;
  for (auto& p : model::trainable(layer.parameters())) out[p.name] = p.tensor->to_host();
  return out;
}

template <class T>
void round_trip(const Case& c) {
  const auto layer = model::build_layer<T>(c.kind, std::string(c.config), 11);
  const std::string path = scratch(std::string(c.kind) + "_" + model::dtype_name(model::dtype_of<T>()) + ".h5");
  io::save_checkpoint(path, *layer);
  // The disk reserved before writing covers the file, and not much more: a nearly full disk that
  // holds the checkpoint is not refused.
  EXPECT_LE(fs::file_size(path), io::checkpoint_size_bound(*layer)) << c.kind;
  EXPECT_LE(io::checkpoint_size_bound(*layer), 2 * fs::file_size(path) + (256u << 10)) << c.kind;
  const auto loaded = io::load_layer<T>(path);
  EXPECT_EQ(loaded->kind(), layer->kind());
  EXPECT_EQ(loaded->config(), layer->config());
  EXPECT_EQ(parameter_values(*loaded), parameter_values(*layer)) << c.kind;
  for (const bool training : {false, true}) {
    Generator a(5), b(5);
    const auto in = inputs_for<T>(c, 3);
    const auto fa = layer->forward(in, training, a);
    const auto fb = loaded->forward(in, training, b);
    EXPECT_EQ(values(fa.out), values(fb.out)) << c.kind << (training ? " train" : " eval");
    EXPECT_EQ(fa.losses, fb.losses) << c.kind;
  }
  fs::remove(path);
}

}  // namespace

TEST(Checkpoint, RoundTripsEveryFamilyBitwiseInFloat) {
  for (const Case& c : families()) round_trip<float>(c);
}

TEST(Checkpoint, RoundTripsEveryFamilyBitwiseInDouble) {
  for (const Case& c : families()) round_trip<double>(c);
}

// ParameterInit::zeros (kmoe-inspect --verify, load_layer, kmoe-convert) builds the same registry as
// the drawn build: names, kinds, shapes and buffers; the trainable values are zero except the
// constant initialisations (norm gains, GEGLU mult_bias), which are the drawn build's.
TEST(Checkpoint, ZeroInitBuildHasTheDrawnRegistry) {
  for (const Case& c : families()) {
    const auto drawn = model::build_layer<float>(c.kind, std::string(c.config), 11);
    const auto zeros = model::build_layer<float>(c.kind, std::string(c.config), 11, ParameterInit::zeros);
    const auto a = drawn->parameters(), b = zeros->parameters();
    ASSERT_EQ(a.size(), b.size()) << c.kind;
    std::size_t nonzero_drawn = 0;
    for (std::size_t i = 0; i < a.size(); ++i) {
      EXPECT_EQ(a[i].name, b[i].name) << c.kind;
      EXPECT_EQ(a[i].kind, b[i].kind) << c.kind << " " << a[i].name;
      EXPECT_EQ(a[i].tensor->shape(), b[i].tensor->shape()) << c.kind << " " << a[i].name;
      const auto va = a[i].tensor->to_host(), vb = b[i].tensor->to_host();
      const bool constant = std::all_of(va.begin(), va.end(), [&](float v) { return v == va.front(); });
      if (a[i].kind == model::ParameterKind::buffer || constant) {
        EXPECT_EQ(va, vb) << c.kind << " " << a[i].name;
      } else {
        ++nonzero_drawn;
        EXPECT_TRUE(std::all_of(vb.begin(), vb.end(), [](float v) { return v == 0.0f; })) << c.kind << " " << a[i].name;
      }
    }
    EXPECT_GT(nonzero_drawn, 0u) << c.kind;
  }
}

// AdamW steps on a fixed sequence of batches; the loss is Σ out ⊙ R + 0.01 · aux.
template <class T>
void train_steps(model::Layer<T>& layer, model::AdamW<T>& optimizer, Generator& rng, const Case& c, int from, int to) {
  for (int step = from; step < to; ++step) {
    const auto in = inputs_for<T>(c, 1000 + step);
    layer.zero_grad();
    const auto f = layer.forward(in, true, rng);
    const auto dout = make_tensor<T>(f.out.shape(), random_values(f.out.size(), 2000 + step));
    layer.backward(f, dout, T(0.01));
    optimizer.step();
  }
}

template <class T>
void resume_equals_uninterrupted(const Case& c) {
  const ops::AdamWConfig adamw{1e-2, 0.9, 0.99, 1e-8, 0.01};
  const int N = 3, M = 3;
  const auto straight = model::build_layer<T>(c.kind, std::string(c.config), 21);
  model::AdamW<T> straight_opt(straight->parameters(), adamw);
  Generator straight_rng(99);
  train_steps(*straight, straight_opt, straight_rng, c, 0, N + M);

  const std::string path = scratch(std::string("resume_") + c.kind + ".h5");
  {
    const auto first = model::build_layer<T>(c.kind, std::string(c.config), 21);
    model::AdamW<T> opt(first->parameters(), adamw);
    Generator rng(99);
    train_steps(*first, opt, rng, c, 0, N);
    io::CheckpointExtras<T> extras;
    extras.optimizer = &opt;
    extras.rng = &rng;
    extras.step = N;
    extras.train = {{"data_position", N}};
    io::save_checkpoint(path, *first, extras);
    EXPECT_LE(fs::file_size(path), io::checkpoint_size_bound(*first, extras)) << c.kind;
    EXPECT_LE(io::checkpoint_size_bound(*first, extras), 2 * fs::file_size(path) + (256u << 10)) << c.kind;
  }
  // A fresh layer, optimiser and generator: only what the checkpoint holds carries over.
  const auto resumed = io::load_layer<T>(path);
  model::AdamW<T> opt(resumed->parameters(), adamw);
  Generator rng(0);
  nlohmann::json train;
  std::int64_t step = 0;
  io::CheckpointRestore<T> restore;
  restore.optimizer = &opt;
  restore.rng = &rng;
  restore.train = &train;
  restore.step = &step;
  io::load_checkpoint(path, *resumed, {}, restore);
  EXPECT_EQ(step, N);
  EXPECT_EQ(train.at("data_position"), N);
  EXPECT_EQ(opt.steps(), N);
  train_steps(*resumed, opt, rng, c, N, N + M);
  EXPECT_EQ(parameter_values(*resumed), parameter_values(*straight)) << c.kind;
  fs::remove(path);
}

TEST(Checkpoint, ResumedSigmaMoETrainingEqualsUninterrupted) { resume_equals_uninterrupted<float>(families()[0]); }

TEST(Checkpoint, ResumedMoEUTTrainingEqualsUninterrupted) {
  resume_equals_uninterrupted<float>(families()[9]);
  resume_equals_uninterrupted<double>(families()[10]);
}

namespace {

std::string saved_sigma_moe(const std::string& name, std::uint64_t seed = 11) {
  const auto layer = model::build_layer<float>("sigma_moe", std::string(families()[0].config), seed);
  const std::string path = scratch(name);
  io::save_checkpoint(path, *layer);
  return path;
}

// The file offset of a dataset's first chunk, to damage its data.
haddr_t first_chunk_offset(const std::string& path, const std::string& dataset);

}  // namespace

TEST(Checkpoint, FlippedByteIsCorruptNamingTheDataset) {
  const std::string path = saved_sigma_moe("flip.h5");
  std::vector<char> bytes;
  {
    std::ifstream in(path, std::ios::binary);
    bytes.assign(std::istreambuf_iterator<char>(in), {});
  }
  const auto offset = static_cast<std::size_t>(first_chunk_offset(path, "/params/keys"));
  ASSERT_LT(offset + 10, bytes.size());
  bytes[offset + 10] ^= 0x01;
  {
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  }
  const auto layer = model::build_layer<float>("sigma_moe", std::string(families()[0].config), 5);
  const auto before = parameter_values(*layer);
  expect_status([&] { io::load_checkpoint(path, *layer); }, Status::corrupt_file, "/params/keys is corrupt");
  EXPECT_EQ(parameter_values(*layer), before);  // nothing of it loaded
}

TEST(Checkpoint, TruncatedFileIsRefused) {
  const std::string path = saved_sigma_moe("truncated.h5");
  const auto size = fs::file_size(path);
  for (const double keep : {0.9, 0.5, 0.1}) {
    const std::string cut = scratch("cut.h5");
    fs::copy_file(path, cut, fs::copy_options::overwrite_existing);
    fs::resize_file(cut, static_cast<std::uintmax_t>(static_cast<double>(size) * keep));
    const auto layer = model::build_layer<float>("sigma_moe", std::string(families()[0].config), 5);
    try {
      io::load_checkpoint(cut, *layer);
      ADD_FAILURE() << "a file cut to " << keep << " of its size loaded";
    } catch (const Error& e) {
      EXPECT_EQ(e.status(), Status::corrupt_file) << e.what();
      EXPECT_NE(std::string(e.what()).find(cut), std::string::npos) << e.what();
    }
  }
}

TEST(Checkpoint, LoadingChecksModelConfigDtypeAndParameters) {
  const std::string path = saved_sigma_moe("checks.h5");
  // Another config, another family, another dtype.
  const auto wider = model::build_layer<float>("sigma_moe", std::string(R"({"dmodel": 16, "n_experts": 4, "expert_size": 8, "k": 3, "bias": true, "dropout": 0.1})"), 1);
  expect_status([&] { io::load_checkpoint(path, *wider); }, Status::invalid_argument, "differs from the layer's");
  const auto other = model::build_layer<float>("st_moe", std::string(R"({"dim": 16, "num_experts": 4})"), 1);
  expect_status([&] { io::load_checkpoint(path, *other); }, Status::invalid_argument, "holds a 'sigma_moe' layer");
  const auto in_double = model::build_layer<double>("sigma_moe", std::string(families()[0].config), 1);
  expect_status([&] { io::load_checkpoint(path, *in_double); }, Status::invalid_argument, "load with convert_dtype");
  io::load_checkpoint(path, *in_double, {true});
  const auto original = model::build_layer<float>("sigma_moe", std::string(families()[0].config), 11);
  const auto expected = parameter_values(*original);
  for (const auto& [name, values] : parameter_values(*in_double))
    EXPECT_EQ(std::vector<float>(values.begin(), values.end()), expected.at(name)) << name;

  // A missing and an extra dataset.
  const auto edit = [&](const std::string& name, const std::function<void(hid_t)>& change) {
    const std::string copy = scratch(name);
    fs::copy_file(path, copy, fs::copy_options::overwrite_existing);
    const hid_t file = H5Fopen(copy.c_str(), H5F_ACC_RDWR, H5P_DEFAULT);
    change(file);
    H5Fclose(file);
    return copy;
  };
  const auto layer = model::build_layer<float>("sigma_moe", std::string(families()[0].config), 1);
  const std::string missing = edit("missing.h5", [](hid_t f) { H5Ldelete(f, "/params/values", H5P_DEFAULT); });
  expect_status([&] { io::load_checkpoint(missing, *layer); }, Status::invalid_argument, "no parameter 'values'");
  const std::string extra = edit("extra.h5", [](hid_t f) {
    H5Lcopy(f, "/params/o_bias", f, "/params/router", H5P_DEFAULT, H5P_DEFAULT);
  });
  expect_status([&] { io::load_checkpoint(extra, *layer); }, Status::invalid_argument, "not parameters of this sigma_moe layer: router");
}

TEST(Checkpoint, ForeignAndUnreadableFilesAreRefused) {
  const auto layer = model::build_layer<float>("sigma_moe", std::string(families()[0].config), 1);
  const std::string fixture = std::string(std::getenv("KMOE_TEST_DATA")) + "/golden/sigma_moe/sigma_moe_sigmoid_relu_train.h5";
  expect_status([&] { io::load_checkpoint(fixture, *layer); }, Status::invalid_argument, "not a kmoe checkpoint");
  const std::string text = scratch("text.h5");
  std::ofstream(text) << "not hdf5";
  expect_status([&] { io::load_checkpoint(text, *layer); }, Status::io_error, "not an HDF5 file");
  expect_status([&] { io::load_checkpoint(scratch("absent.h5"), *layer); }, Status::io_error, "cannot open");
}

// The failing save runs in a helper process under a file size limit (the disk reservation made
// before any write refuses it, as it refuses a full disk); the helper then saves again without the
// limit and exits normally: the failure left no HDF5 state behind.
TEST(Checkpoint, FailedWriteLeavesTheOldFileAndNoTemporary) {
  const char* writer = std::getenv("KMOE_CHECKPOINT_WRITER");
  ASSERT_NE(writer, nullptr) << "KMOE_CHECKPOINT_WRITER must name the checkpoint_writer helper";
  const std::string path = saved_sigma_moe("full.h5", 11);
  const auto before = fs::file_size(path);
  const std::string command = std::string(writer) + " --limited " + path + " 65536 > " + path + ".log";
  const int status = std::system(command.c_str());
  ASSERT_TRUE(WIFEXITED(status)) << command;
  EXPECT_EQ(WEXITSTATUS(status), 3) << command;
  std::ifstream log(path + ".log");
  const std::string message((std::istreambuf_iterator<char>(log)), {});
  EXPECT_NE(message.find("I/O error: " + path + ": the checkpoint needs up to"), std::string::npos) << message;
  EXPECT_NE(message.find("retry: saved and loaded " + path + ".retry.h5"), std::string::npos) << message;
  fs::remove(path + ".retry.h5");
  EXPECT_EQ(fs::file_size(path), before);
  const auto layer = model::build_layer<float>("sigma_moe", std::string(families()[0].config), 1);
  io::load_checkpoint(path, *layer);
  for (const auto& item : fs::directory_iterator(fs::path(path).parent_path()))
    EXPECT_EQ(item.path().filename().string().find(".full.h5.tmp"), std::string::npos) << item.path();
  // An unwritable folder.
  expect_status([&] { io::save_checkpoint("/no/such/folder/x.h5", *layer); }, Status::io_error, "does not exist");
}

// A writer (tests/checkpoint_writer.cpp) saving checkpoints of growing version in a loop is killed
// at random moments; the target must always load as one complete version.
TEST(Checkpoint, WriterKilledMidSaveLeavesALoadableCheckpoint) {
  const char* writer = std::getenv("KMOE_CHECKPOINT_WRITER");
  ASSERT_NE(writer, nullptr) << "KMOE_CHECKPOINT_WRITER must name the checkpoint_writer helper";
  const std::string path = scratch("killed.h5");
  const std::string config = R"({"dmodel": 64, "n_experts": 16, "expert_size": 64, "k": 2})";
  {
    const auto first = model::build_layer<float>("sigma_moe", config, 1);
    io::CheckpointExtras<float> extras;
    extras.train = {{"seed", 1}};
    io::save_checkpoint(path, *first, extras);
  }
  std::mt19937_64 gen(7);
  for (int round = 0; round < 8; ++round) {
    pid_t pid = 0;
    std::string first_seed = std::to_string(2 + round * 1000);
    char* argv[] = {const_cast<char*>(writer), const_cast<char*>(path.c_str()), const_cast<char*>(first_seed.c_str()),
                    nullptr};
    ASSERT_EQ(posix_spawn(&pid, writer, nullptr, nullptr, argv, environ), 0);
    std::this_thread::sleep_for(std::chrono::milliseconds(100 + random_int(gen, 0, 400)));
    kill(pid, SIGKILL);
    int status = 0;
    waitpid(pid, &status, 0);
    // Whatever was written last is complete and equals the layer of the seed it records.
    const io::CheckpointReader reader(path);
    const std::uint64_t seed = reader.train().at("seed");
    const auto expected = model::build_layer<float>("sigma_moe", config, seed);
    const auto loaded = model::build_layer<float>("sigma_moe", config, 0);
    io::load_checkpoint(path, *loaded);
    EXPECT_EQ(parameter_values(*loaded), parameter_values(*expected)) << "round " << round << ", seed " << seed;
  }
}

namespace {

haddr_t first_chunk_offset(const std::string& path, const std::string& dataset) {
  const hid_t file = H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
  const hid_t ds = H5Dopen2(file, dataset.c_str(), H5P_DEFAULT);
  const hid_t space = H5Dget_space(ds);
  haddr_t offset = 0;
  hsize_t size = 0;
  unsigned mask = 0;
  std::vector<hsize_t> coords(static_cast<std::size_t>(H5Sget_simple_extent_ndims(space)), 0);
  H5Dget_chunk_info(ds, space, 0, coords.data(), &mask, &offset, &size);
  H5Sclose(space);
  H5Dclose(ds);
  H5Fclose(file);
  return offset;
}

}  // namespace
