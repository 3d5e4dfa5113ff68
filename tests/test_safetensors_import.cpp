// safetensors ↔ layers through the registry: the real library's bf16 files convert to parameters
// equal to the float32 ones rounded to bf16; export then import is exact; bad state_dicts are
// errors naming the tensor and leave the layer unchanged.
#include "kmoe/core/bfloat16.hpp"
#include "kmoe/io/safetensors_import.hpp"
#include "kmoe/model/builder.hpp"
#include "kmoe/model/state_dict.hpp"
#include "test_util.hpp"

#include <cstdlib>
#include <filesystem>

using namespace kmoe;
using namespace kmoe::test;

namespace {

std::string data_file(const std::string& name) {
  const char* root = std::getenv("KMOE_TEST_DATA");
  return std::string(root ? root : "data") + "/safetensors/" + name;
}

std::unique_ptr<model::Layer<float>> layer_from(const io::SafetensorsFile& file) {
  return model::build_layer<float>(file.metadata().at("layer"), file.metadata().at("config"), 0);
}

std::map<std::string, std::vector<double>> values_of(model::Layer<float>& layer) {
  std::map<std::string, std::vector<double>> out;
  for (auto& p : model::trainable(layer.parameters())) out[p.name] = to_double(*p.tensor);
  return out;
}

}  // namespace

TEST(SafetensorsImport, Bf16FilesEqualTheFloat32ParametersRoundedToBf16) {
  int checked = 0;
  for (const auto& item : std::filesystem::directory_iterator(data_file(""))) {
    const std::string name = item.path().filename().string();
    const std::string suffix = ".bf16.safetensors";
    if (name.size() < suffix.size() || name.compare(name.size() - suffix.size(), suffix.size(), suffix) != 0) continue;
    const io::SafetensorsFile bf16(item.path().string());
    const io::SafetensorsFile f32(data_file(name.substr(0, name.size() - suffix.size()) + ".safetensors"));
    auto rounded = layer_from(bf16), exact = layer_from(f32);
    io::load_safetensors(bf16, *rounded);
    io::load_safetensors(f32, *exact);
    const auto a = values_of(*rounded), b = values_of(*exact);
    ASSERT_EQ(a.size(), b.size()) << name;
    for (const auto& [param, values] : b) {
      const auto& got = a.at(param);
      for (std::size_t i = 0; i < values.size(); ++i)
        ASSERT_EQ(got[i], round_to_bfloat16(static_cast<float>(values[i]))) << name << " " << param << "[" << i << "]";
    }
    ++checked;
  }
  EXPECT_GE(checked, 5);  // one bf16 file per layer family
}

TEST(SafetensorsImport, ExportThenImportIsExact) {
  const io::SafetensorsFile file(data_file("st_moe_block_v0014_hier_train.safetensors"));
  auto layer = layer_from(file);
  io::load_safetensors(file, *layer);
  const std::string out = (std::filesystem::temp_directory_path() / "kmoe_export_test.safetensors").string();
  io::save_safetensors(out, *layer);
  const io::SafetensorsFile back(out);
  // The same torch names and values as the real library's file.
  ASSERT_EQ(back.entries().size(), file.entries().size());
  for (const auto& entry : file.entries()) EXPECT_EQ(back.read_double(entry.name), file.read_double(entry.name)) << entry.name;
  EXPECT_EQ(back.metadata().at("layer"), "st_moe_block_v0014");
  std::filesystem::remove(out);
}

TEST(SafetensorsImport, BadStateDictsNameTheTensorAndChangeNothing) {
  const io::SafetensorsFile file(data_file("sigma_moe_sigmoid_relu_train.safetensors"));
  const std::string dir = std::filesystem::temp_directory_path().string();
  const auto write_variant = [&](const std::string& name, auto&& edit) {
    std::vector<io::SafetensorsTensor> tensors;
    for (const auto& entry : file.entries())
      tensors.push_back({entry.name, io::SafetensorsDtype::f32, entry.shape, file.read_double(entry.name)});
    edit(tensors);
    const std::string path = dir + "/kmoe_bad_" + name + ".safetensors";
    io::write_safetensors(path, tensors);
    return path;
  };
  auto layer = layer_from(file);
  const auto before = values_of(*layer);
  const auto expect = [&](const std::string& path, Status status, const std::string& needle) {
    const io::SafetensorsFile bad(path);
    expect_status([&] { io::load_safetensors(bad, *layer); }, status, needle);
    EXPECT_EQ(values_of(*layer), before) << needle;
    std::filesystem::remove(path);
  };
  expect(write_variant("missing", [](auto& t) { t.erase(t.begin()); }), Status::invalid_argument,
         "missing parameters: expert_sel");
  expect(write_variant("extra", [](auto& t) { t.push_back({"router.weight", io::SafetensorsDtype::f32, {2}, {1, 2}}); }),
         Status::invalid_argument, "not parameters of this layer: router.weight");
  expect(write_variant("shape", [](auto& t) { t[1].shape = {t[1].shape[0] * t[1].shape[1], t[1].shape[2]}; }),
         Status::shape_mismatch, "parameter 'keys'");
  expect(write_variant("nan", [](auto& t) { t[2].values[5] = std::nan(""); }), Status::non_finite,
         "parameter 'values' contains NaN");
}
