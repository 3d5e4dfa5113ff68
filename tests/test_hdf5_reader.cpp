#include "kmoe/io/hdf5_reader.hpp"
#include "test_util.hpp"

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>

using namespace kmoe;
using namespace kmoe::test;
using io::Dtype;
using io::H5Reader;

namespace {

namespace fs = std::filesystem;

// The σ-MoE golden fixture under $KMOE_TEST_DATA (set by ctest); empty, with a test failure, when unset.
std::string fixture_path() {
  const char* root = std::getenv("KMOE_TEST_DATA");
  if (root == nullptr) {
    ADD_FAILURE() << "KMOE_TEST_DATA is not set: run through ctest, or export KMOE_TEST_DATA=<kmoe checkout>/data";
    return "";
  }
  return std::string(root) + "/golden/sigma_moe/sigma_moe_sigmoid_relu_train.h5";
}

// A fresh directory under /tmp, removed with everything in it when the test ends.
class TempDir {
 public:
  TempDir() {
    std::string name = (fs::temp_directory_path() / "kmoe_test_hdf5_XXXXXX").string();
    if (mkdtemp(name.data()) == nullptr) throw std::runtime_error("mkdtemp failed for " + name);
    path_ = name;
  }
  ~TempDir() {
    std::error_code ignored;
    fs::remove_all(path_, ignored);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  std::string file(const std::string& name) const { return (path_ / name).string(); }

 private:
  fs::path path_;
};

// Runs call, which must throw kmoe::Error with the given status and a message containing every one
// of the named strings.
template <class Call>
void expect_error(Call&& call, Status status, const std::vector<std::string>& named) {
  try {
    call();
    ADD_FAILURE() << "no error; expected " << status_name(status);
  } catch (const Error& e) {
    const std::string message = e.what();
    EXPECT_EQ(e.status(), status) << message;
    for (const auto& part : named)
      EXPECT_NE(message.find(part), std::string::npos) << "'" << part << "' in: " << message;
  }
}

}  // namespace

TEST(Hdf5Reader, ReadsFixtureShapesDtypesAndValues) {
  const std::string path = fixture_path();
  ASSERT_FALSE(path.empty());
  const H5Reader reader(path);
  EXPECT_EQ(reader.path(), path);

  EXPECT_EQ(reader.shape_of("/input/x"), (Shape{4, 16, 64}));
  EXPECT_EQ(reader.dtype_of("/input/x"), Dtype::float32);
  const auto x = reader.read<float>("/input/x", Shape{4, 16, 64});
  EXPECT_EQ(x.shape(), (Shape{4, 16, 64}));
  const auto xs = x.to_host();
  EXPECT_EQ(xs.front(), -1.8016715f);  // values as h5dump prints them (9 digits identify a float)
  EXPECT_EQ(xs[1], 0.509421885f);
  EXPECT_EQ(xs.back(), -1.04947424f);
  // the same data converted to double is exactly the float values
  const auto xd = reader.read_converted<double>("/input/x");
  EXPECT_EQ(xd.shape(), x.shape());
  EXPECT_EQ(to_double(xd), to_double(x));

  EXPECT_EQ(reader.dtype_of("/debug/topk_index"), Dtype::int64);
  const auto topk = reader.read_indices("/debug/topk_index", Shape{4, 16, 4});
  const auto ids = topk.to_host();
  EXPECT_EQ(std::vector<int>(ids.begin(), ids.begin() + 4), (std::vector<int>{4, 9, 7, 15}));
  EXPECT_EQ(std::vector<int>(ids.end() - 4, ids.end()), (std::vector<int>{7, 10, 15, 8}));
  const auto topk64 = reader.read<std::int64_t>("/debug/topk_index").to_host();
  EXPECT_EQ(std::vector<int>(topk64.begin(), topk64.end()), ids);

  // a 0-d dataset: rank 0, one element
  const Shape scalar = reader.shape_of("/output/loss");
  EXPECT_EQ(scalar.rank(), 0);
  EXPECT_EQ(scalar.size(), 1);
  const auto loss = reader.read<float>("/output/loss", Shape{});
  EXPECT_EQ(loss.rank(), 0);
  ASSERT_EQ(loss.size(), 1);
  EXPECT_EQ(loss.to_host()[0], -20.0775166f);
}

TEST(Hdf5Reader, ReadsAttributesAndGroupMembers) {
  const std::string path = fixture_path();
  ASSERT_FALSE(path.empty());
  const H5Reader reader(path);
  EXPECT_TRUE(reader.has_attribute("/", "layer"));
  EXPECT_EQ(reader.read_string_attribute("/", "layer"), "sigma_moe");
  EXPECT_EQ(reader.read_string_attribute("/", "mode"), "train");
  const std::string config = reader.read_string_attribute("/", "config");
  EXPECT_EQ(config.front(), '{');
  EXPECT_EQ(config.back(), '}');
  EXPECT_NE(config.find("\"dmodel\": 64"), std::string::npos) << config;
  EXPECT_NE(config.find("\"selection_mode\": \"sigmoid\""), std::string::npos) << config;
  EXPECT_EQ(reader.read_number_attribute("/", "seed"), 1101.0);

  EXPECT_EQ(reader.members("/params"), (std::vector<std::string>{"expert_sel", "keys", "values"}));
  EXPECT_EQ(reader.members("/"), (std::vector<std::string>{"debug", "grad", "input", "output", "params"}));
  EXPECT_EQ(reader.members("/grad/params"), (std::vector<std::string>{"expert_sel", "keys", "values"}));

  EXPECT_TRUE(reader.has("/"));
  EXPECT_TRUE(reader.has("/params"));
  EXPECT_TRUE(reader.has("/params/keys"));
  EXPECT_FALSE(reader.has("/params/nope"));
  EXPECT_FALSE(reader.has("/nope/keys"));  // a missing parent is "not there", not an error
  EXPECT_FALSE(reader.has(""));
  EXPECT_FALSE(reader.has_attribute("/", "nope"));
  EXPECT_FALSE(reader.has_attribute("/nope", "layer"));
}

TEST(Hdf5Reader, MoveKeepsTheFileOpen) {
  const std::string path = fixture_path();
  ASSERT_FALSE(path.empty());
  H5Reader first(path);
  H5Reader second(std::move(first));
  EXPECT_EQ(second.shape_of("/params/keys"), (Shape{16, 64, 32}));
  H5Reader third(path);
  third = std::move(second);
  EXPECT_EQ(third.read_string_attribute("/", "layer"), "sigma_moe");
}

TEST(Hdf5Reader, UnopenableFilesAreIoErrorsNamingTheFile) {
  TempDir dir;
  const std::string missing = dir.file("does_not_exist.h5");
  expect_error([&] { H5Reader r(missing); }, Status::io_error, {missing});

  const std::string text = dir.file("notes.txt");
  std::ofstream(text) << "this is not an HDF5 file\n";
  expect_error([&] { H5Reader r(text); }, Status::io_error, {text});

  // the first half of the fixture's bytes: the superblock is intact, the data is not
  const std::string path = fixture_path();
  ASSERT_FALSE(path.empty());
  const std::string truncated = dir.file("truncated.h5");
  {
    std::ifstream in(path, std::ios::binary);
    std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    ASSERT_GT(bytes.size(), 1000u);
    std::ofstream(truncated, std::ios::binary).write(bytes.data(), static_cast<std::streamsize>(bytes.size() / 2));
  }
  expect_error(
      [&] {
        const H5Reader r(truncated);
        for (const char* dataset : {"/input/x", "/params/keys", "/params/values", "/output/out", "/grad/params/keys"})
          r.read_converted<double>(dataset);
      },
      Status::io_error, {truncated});
}

TEST(Hdf5Reader, WrongShapeIsAShapeMismatchNamingTheDataset) {
  const std::string path = fixture_path();
  ASSERT_FALSE(path.empty());
  const H5Reader reader(path);
  expect_error(
      [&] {
        reader.read<float>("/input/x", Shape{4, 16, 63});
      },
      Status::shape_mismatch, {path, "/input/x", "[4, 16, 64]", "[4, 16, 63]"});
  expect_error(
      [&] {
        reader.read_converted<double>("/input/x", Shape{4, 1024});
      },
      Status::shape_mismatch, {"/input/x", "[4, 1024]"});
  expect_error(
      [&] {
        reader.read_indices("/debug/topk_index", Shape{4, 16});
      },
      Status::shape_mismatch, {"/debug/topk_index"});
  expect_error([&] { reader.read<float>("/output/loss", Shape{1}); }, Status::shape_mismatch, {"/output/loss"});
}

TEST(Hdf5Reader, WrongDtypeIsAnIoErrorNamingTheDataset) {
  const std::string path = fixture_path();
  ASSERT_FALSE(path.empty());
  const H5Reader reader(path);
  expect_error([&] { reader.read<double>("/input/x"); }, Status::io_error, {path, "/input/x", "float32", "float64"});
  expect_error([&] { reader.read<float>("/debug/topk_index"); }, Status::io_error, {"/debug/topk_index", "int64"});
  expect_error([&] { reader.read<std::int64_t>("/input/x"); }, Status::io_error, {"/input/x"});
  expect_error([&] { reader.read_indices("/input/x"); }, Status::io_error, {"/input/x", "float32"});
  expect_error([&] { reader.read_converted<float>("/debug/topk_index"); }, Status::io_error, {"/debug/topk_index"});
  EXPECT_NO_THROW(reader.read_converted<double>("/input/x", Shape{4, 16, 64}));
}

TEST(Hdf5Reader, MissingDatasetsGroupsAndAttributesAreIoErrors) {
  const std::string path = fixture_path();
  ASSERT_FALSE(path.empty());
  const H5Reader reader(path);
  expect_error([&] { reader.read<float>("/input/nope"); }, Status::io_error, {path, "/input/nope"});
  expect_error([&] { reader.read_indices("/nope/ids"); }, Status::io_error, {"/nope/ids"});
  expect_error([&] { reader.shape_of("/params/missing"); }, Status::io_error, {"/params/missing"});
  expect_error([&] { reader.dtype_of("/params/missing"); }, Status::io_error, {"/params/missing"});
  expect_error([&] { reader.read<float>("/params"); }, Status::io_error, {"/params"});  // a group, not a dataset
  expect_error([&] { reader.members("/nope"); }, Status::io_error, {"/nope"});
  expect_error([&] { reader.read_string_attribute("/", "nope"); }, Status::io_error, {path, "nope"});
  expect_error([&] { reader.read_number_attribute("/params", "seed"); }, Status::io_error, {"seed", "/params"});
  expect_error([&] { reader.read_number_attribute("/", "layer"); }, Status::io_error, {"layer"});  // a string
  expect_error([&] { reader.read_string_attribute("/", "seed"); }, Status::io_error, {"seed"});    // a number
}
