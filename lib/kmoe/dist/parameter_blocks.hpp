// Between a layer placed over ranks and its one-rank whole: each rank's registry entry of an
// expert tensor holds a block of the whole tensor (its experts, of each its hidden units:
// model::Parameter's first_expert, total_experts, hidden_begin, hidden_total). These move blocks
// to and from whole tensors; checkpoints, kmoe-parity --distributed and resharding use them.
#pragma once

#include "kmoe/dist/communicator.hpp"
#include "kmoe/dist/placement.hpp"
#include "kmoe/model/parameter.hpp"

#include <nlohmann/json.hpp>

namespace kmoe::dist {

// An expert entry (experts on axis 0) as `rank` holds it under `placement`: its first global
// expert, the layer's expert count and, when the experts are split into shards, its range of the
// placement's hidden units.
template <class T>
model::Parameter<T> placed(model::Parameter<T> p, const Placement& placement, int rank) {
  p.first_expert = placement.first_expert(rank);
  p.total_experts = placement.n_experts();
  if (placement.sharded()) {
    p.hidden_begin = placement.hidden_begin(rank);
    p.hidden_total = placement.hidden();
  }
  return p;
}

// Rank 0 gets every rank's block of `local` (p's tensor, or one shaped like it: a gradient, an
// AdamW moment) assembled into `whole` (the global shape; ignored elsewhere, may be null there).
// A dense entry is the same on every rank: rank 0's is copied. Collective.
template <class T>
void gather_to_rank0(const Communicator& comm, const model::Parameter<T>& p, const Tensor<T>& local, Tensor<T>* whole);

// `into` (p's block) = its block of `whole`; the whole of it for a dense entry.
template <class T>
void take_block(const model::Parameter<T>& p, const Tensor<T>& whole, Tensor<T> into);

// p's block as a hyperslab of the whole tensor: per axis HDF5's start, stride, count and block
// (H5Sselect_hyperslab), whose elements in row-major order are the local tensor's. A dense entry
// is the whole tensor. Empty when the block holds no values of its own: the copy that a shard past
// its expert's first keeps of an entry without a hidden axis. Checkpoints write and read blocks
// through it.
struct Hyperslab {
  std::vector<std::uint64_t> start, stride, count, block;
  bool empty = false;
  bool whole(const Shape& shape) const;  // the whole tensor of that shape
  // Only a range of axis 0 (every other axis whole): [start[0], start[0] + block[0]).
  bool axis0_range(const Shape& shape) const;
};
template <class T>
Hyperslab hyperslab_of(const model::Parameter<T>& p);

// {"world": W, "ranks": [{"experts": [begin, end), "hidden": [begin, end)}, ...]} of the first
// expert entry of every rank (the placement a checkpoint records). Collective.
template <class T>
nlohmann::json placement_json(const Communicator& comm, const model::ParameterList<T>& parameters);

}  // namespace kmoe::dist
