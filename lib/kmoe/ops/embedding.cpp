#include "kmoe/ops/embedding.hpp"

#include "kmoe/core/error.hpp"
#include "kmoe/ops/gather_scatter.hpp"

#include <limits>
#include <string>

namespace kmoe::ops {

namespace impl {

// Checks that per_token is [ids, table columns]; the gather / scatter underneath checks that every id
// indexes a table row, under the embedding's name.
template <class T>
void check_embedding_arguments(const char* op, const View1<const int>& ids, std::size_t rows, std::size_t dim,
                               const View2<T>& per_token, const char* per_token_name) {
  require(per_token.extent(0) == ids.extent(0) && per_token.extent(1) == dim, Status::shape_mismatch, op, ": ",
          per_token_name, " is [", per_token.extent(0), ", ", per_token.extent(1), "], expected [", ids.extent(0), ", ",
          dim, "] for ", ids.extent(0), " ids and a table of [", rows, ", ", dim, "]");
  require(rows <= static_cast<std::size_t>(std::numeric_limits<int>::max()), Status::invalid_argument, op,
          ": the table has ", rows, " rows, beyond int token ids");
}

}  // namespace impl

template <class T>
void embedding_forward(const View1<const int>& ids, const View2<const T>& table, const View2<T>& y) {
  impl::check_embedding_arguments("embedding_forward", ids, table.extent(0), table.extent(1), y, "y");
  gather_rows<T>(table, ids, y, "embedding_forward: token id");
}

template <class T>
void embedding_backward(const View1<const int>& ids, const View2<const T>& dy, const View2<T>& dtable) {
  impl::check_embedding_arguments("embedding_backward", ids, dtable.extent(0), dtable.extent(1), dy, "dy");
  scatter_add_rows<T>(dy, ids, dtable, "embedding_backward: token id");
}

#define KMOE_INSTANTIATE(T)                                                                            \
  template void embedding_forward<T>(const View1<const int>&, const View2<const T>&, const View2<T>&); \
  template void embedding_backward<T>(const View1<const int>&, const View2<const T>&, const View2<T>&);
KMOE_INSTANTIATE(float)
KMOE_INSTANTIATE(double)
#undef KMOE_INSTANTIATE

}  // namespace kmoe::ops
