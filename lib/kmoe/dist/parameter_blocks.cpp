#include "kmoe/dist/parameter_blocks.hpp"

#include <algorithm>
#include <cstring>

namespace kmoe::dist {

namespace {

// Which part of the whole tensor a rank's parameter holds: experts (axis 0) [first, first +
// count) and, of each, hidden units (hidden_axis) [hidden_begin, hidden_begin + hidden).
struct Block {
  std::int64_t first = 0, count = 0, hidden_begin = 0, hidden = 0, hidden_total = 0, hidden_blocks = 1;
};

template <class T>
Block block_of(const model::Parameter<T>& p) {
  Block b;
  b.first = p.first_expert;
  b.count = p.local_experts();
  b.hidden_begin = p.hidden_total >= 0 ? p.hidden_begin : 0;
  b.hidden_blocks = p.hidden_blocks;
  b.hidden = p.hidden_axis >= 0 ? p.tensor->dim(p.hidden_axis) / p.hidden_blocks : 0;
  b.hidden_total = p.hidden_total >= 0 ? p.hidden_total : b.hidden;
  return b;
}

// Calls f(local index, whole index) for every element of a block of a [E, ...] whole tensor of
// shape `whole` (rank 2 or 3, experts on axis 0, hidden units on hidden_axis or none; the hidden
// axis of `hidden_blocks` blocks of hidden_total units, the block's range taken from each).
template <class F>
void for_each_in_block(const Shape& whole, int hidden_axis, const Block& b, F&& f) {
  const index_t A = whole[1], B = whole.rank() > 2 ? whole[2] : 1;
  // Whole index along the hidden axis of local index i: block i / hidden, unit i mod hidden.
  const auto hidden_at = [&](index_t i) { return (i / b.hidden) * b.hidden_total + b.hidden_begin + i % b.hidden; };
  const index_t a_count = hidden_axis == 1 ? b.hidden * b.hidden_blocks : A;
  const index_t b_count = hidden_axis == 2 ? b.hidden * b.hidden_blocks : B;
  std::size_t local = 0;
  for (index_t e = 0; e < b.count; ++e)
    for (index_t a = 0; a < a_count; ++a)
      for (index_t c = 0; c < b_count; ++c)
        f(local++, static_cast<std::size_t>(((b.first + e) * A + (hidden_axis == 1 ? hidden_at(a) : a)) * B +
                                            (hidden_axis == 2 ? hidden_at(c) : c)));
}

// Whether a rank's block carries the values of its elements: every block does, except the copies
// that shards past an expert's first keep of an entry without a hidden axis.
bool block_owns_values(int hidden_axis, const Block& b) { return hidden_axis >= 0 || b.hidden_begin == 0; }

}  // namespace

template <class T>
void gather_to_rank0(const Communicator& comm, const model::Parameter<T>& p, const Tensor<T>& local,
                     Tensor<T>* whole) {
  if (!p.partial()) {
    if (comm.rank() == 0) whole->copy_from_host(local.to_host());
    return;
  }
  const Block mine = block_of(p);
  const std::vector<T> values = local.to_host();
  std::vector<unsigned char> message(sizeof(Block) + values.size() * sizeof(T));
  std::memcpy(message.data(), &mine, sizeof(Block));
  if (!values.empty()) std::memcpy(message.data() + sizeof(Block), values.data(), values.size() * sizeof(T));
  std::vector<std::size_t> counts(static_cast<std::size_t>(comm.size()), 0), received;
  counts[0] = message.size();
  const std::vector<unsigned char> all = comm.all_to_all(message.data(), counts, received);
  if (comm.rank() != 0) return;
  const Shape shape = p.global_shape();
  std::vector<T> assembled(static_cast<std::size_t>(shape.size()));
  std::size_t at = 0;
  for (int r = 0; r < comm.size(); ++r) {
    Block b;
    std::memcpy(&b, all.data() + at, sizeof(Block));
    const T* from = reinterpret_cast<const T*>(all.data() + at + sizeof(Block));
    if (block_owns_values(p.hidden_axis, b))
      for_each_in_block(shape, p.hidden_axis, b, [&](std::size_t i, std::size_t w) { assembled[w] = from[i]; });
    at += received[r];
  }
  whole->copy_from_host(assembled);
}

template <class T>
nlohmann::json placement_json(const Communicator& comm, const model::ParameterList<T>& parameters) {
  Block mine;
  for (const model::Parameter<T>& p : parameters)
    if (p.partial()) {
      mine = block_of(p);
      break;
    }
  nlohmann::json ranks = nlohmann::json::array();
  const std::vector<std::int64_t> first = comm.all_gather(mine.first), count = comm.all_gather(mine.count),
                                  hidden_begin = comm.all_gather(mine.hidden_begin),
                                  hidden = comm.all_gather(mine.hidden);
  for (int r = 0; r < comm.size(); ++r)
    ranks.push_back({{"experts", {first[r], first[r] + count[r]}},
                     {"hidden", {hidden_begin[r], hidden_begin[r] + hidden[r]}}});
  return {{"world", comm.size()}, {"ranks", ranks}};
}

bool Hyperslab::whole(const Shape& shape) const {
  return !empty && axis0_range(shape) && start[0] == 0 && block[0] == static_cast<std::uint64_t>(shape[0]);
}

bool Hyperslab::axis0_range(const Shape& shape) const {
  if (empty || static_cast<int>(start.size()) != shape.rank()) return false;
  for (std::size_t i = 0; i < start.size(); ++i)
    if (count[i] != 1 || (i > 0 && (start[i] != 0 || block[i] != static_cast<std::uint64_t>(shape[static_cast<int>(i)]))))
      return false;
  return true;
}

template <class T>
Hyperslab hyperslab_of(const model::Parameter<T>& p) {
  const Shape shape = p.global_shape();
  Hyperslab slab;
  for (int i = 0; i < shape.rank(); ++i) {
    slab.start.push_back(0);
    slab.stride.push_back(1);
    slab.count.push_back(1);
    slab.block.push_back(static_cast<std::uint64_t>(shape[i]));
  }
  if (!p.partial()) return slab;
  const Block b = block_of(p);
  slab.empty = !block_owns_values(p.hidden_axis, b);
  slab.start[0] = static_cast<std::uint64_t>(b.first);
  slab.block[0] = static_cast<std::uint64_t>(b.count);
  if (p.hidden_axis > 0 && p.hidden_total >= 0) {
    const auto h = static_cast<std::size_t>(p.hidden_axis);
    slab.start[h] = static_cast<std::uint64_t>(b.hidden_begin);
    slab.stride[h] = static_cast<std::uint64_t>(std::max<std::int64_t>(b.hidden_total, 1));
    slab.count[h] = static_cast<std::uint64_t>(b.hidden_blocks);
    slab.block[h] = static_cast<std::uint64_t>(b.hidden);
  }
  return slab;
}

template <class T>
void take_block(const model::Parameter<T>& p, const Tensor<T>& whole, Tensor<T> into) {
  if (!p.partial()) return into.copy_from_host(whole.to_host());
  const std::vector<T> all = whole.to_host();
  std::vector<T> mine(static_cast<std::size_t>(into.size()));
  for_each_in_block(p.global_shape(), p.hidden_axis, block_of(p), [&](std::size_t i, std::size_t w) { mine[i] = all[w]; });
  into.copy_from_host(mine);
}

#define KMOE_INSTANTIATE(T)                                                                                     \
  template void gather_to_rank0<T>(const Communicator&, const model::Parameter<T>&, const Tensor<T>&, Tensor<T>*); \
  template void take_block<T>(const model::Parameter<T>&, const Tensor<T>&, Tensor<T>);                          \
  template nlohmann::json placement_json<T>(const Communicator&, const model::ParameterList<T>&);               \
  template Hyperslab hyperslab_of<T>(const model::Parameter<T>&);
KMOE_INSTANTIATE(float)
KMOE_INSTANTIATE(double)
#undef KMOE_INSTANTIATE

}  // namespace kmoe::dist
