#include "kmoe/layers/moeut_init.hpp"

#include "kmoe/ops/init.hpp"

#include <cmath>
#include <vector>

namespace kmoe::layers::moeut_init {

template <class T>
void fill_normal(const Tensor<T>& tensor, Generator& generator, double stddev) {
  ops::fill_normal<T>(tensor.flat(), generator.take(static_cast<std::uint64_t>(tensor.size())), T(0),
                      static_cast<T>(stddev));
}

template <class T>
void fill_uniform(const Tensor<T>& tensor, Generator& generator, double bound) {
  ops::fill_uniform<T>(tensor.flat(), generator.take(static_cast<std::uint64_t>(tensor.size())),
                       static_cast<T>(-bound), static_cast<T>(bound));
}

template <class T>
void renorm_rows(Tensor<T>& weight) {
  const index_t rows = weight.dim(0), cols = weight.dim(1);
  if (cols < 2) return;  // the unbiased std of one element is undefined; keep the draw
  const auto values = weight.to_host();
  std::vector<double> w(values.begin(), values.end());
  const auto unbiased_std = [](const double* begin, index_t n) {
    double mean = 0, sum_sq = 0;
    for (index_t i = 0; i < n; ++i) mean += begin[i];
    mean /= static_cast<double>(n);
    for (index_t i = 0; i < n; ++i) sum_sq += (begin[i] - mean) * (begin[i] - mean);
    return std::sqrt(sum_sq / static_cast<double>(n - 1));
  };
  std::vector<double> row_std(rows);
  for (index_t r = 0; r < rows; ++r) {
    double* row = w.data() + r * cols;
    row_std[r] = unbiased_std(row, cols);
    double norm = 0;
    for (index_t c = 0; c < cols; ++c) norm += row[c] * row[c];
    norm = std::sqrt(norm);
    for (index_t c = 0; c < cols; ++c) row[c] /= norm;
  }
  const double global_std = unbiased_std(w.data(), rows * cols);
  std::vector<T> result(w.size());
  for (index_t r = 0; r < rows; ++r)
    for (index_t c = 0; c < cols; ++c)
      result[r * cols + c] = static_cast<T>(w[r * cols + c] * row_std[r] / global_std);
  weight.copy_from_host(result);
}

#define KMOE_INSTANTIATE(T)                                                  \
  template void fill_normal<T>(const Tensor<T>&, Generator&, double);       \
  template void fill_uniform<T>(const Tensor<T>&, Generator&, double);      \
  template void renorm_rows<T>(Tensor<T>&);
KMOE_INSTANTIATE(float)
KMOE_INSTANTIATE(double)
#undef KMOE_INSTANTIATE

}  // namespace kmoe::layers::moeut_init
