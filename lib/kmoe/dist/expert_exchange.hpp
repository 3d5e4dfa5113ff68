// The all-to-all at the dispatch plan: the one place where tokens cross ranks, for every family.
//
// Each rank routes its own tokens (expert_index [tokens, k] of global expert ids, −1 for a dropped
// pair). A token goes once to every rank that holds (a shard of) one of its experts — one copy
// per destination rank, not one per selected expert — with its global position and, per slot,
// the expert if the destination holds it. The destination computes its experts on what it
// received as an ordinary local batch: rows [R, width], experts [R, k] in local ids (−1: not
// here, a dropped pair for the local DispatchPlan). Results travel back the same way and are
// summed per token over its destinations in rank order (shards of one expert add their partial
// outputs), so the combine is deterministic. Backward is the transpose: dispatch the output
// gradient, combine the input gradient (and the per-pair gate gradients, which are rows of
// width k).
//
// With one rank everything stays in place on the device: every token is "received" (a token
// whose pairs are all dropped gives zero rows, as a token sent nowhere does), dispatch and combine
// are device copies, and nothing waits for the host. Across ranks the routing records are built
// on the host once per plan; the rows are packed and summed by device kernels and travel in
// device memory or pinned host buffers, as mpi_transport() decides.
#pragma once

#include "kmoe/core/tensor.hpp"
#include "kmoe/dist/communicator.hpp"
#include "kmoe/dist/placement.hpp"

#include <cstdint>
#include <vector>

namespace kmoe::dist {

class ExpertExchange {
 public:
  ExpertExchange() = default;
  // Collective over comm. first_token: the global position of this rank's token 0.
  ExpertExchange(const Communicator& comm, const Placement& placement, const Tensor<int>& expert_index,
                 std::int64_t first_token);

  index_t tokens() const { return tokens_; }
  int k() const { return k_; }
  index_t received_rows() const { return received_rows_; }
  // [R, k] the local expert of each received pair (global id − placement.first_expert(rank)), −1
  // where this rank holds none of it.
  const Tensor<int>& received_experts() const { return received_experts_; }
  // [R] the global position of each received token (its draws are keyed by it).
  View1<const std::int64_t> received_tokens() const { return received_tokens_.flat(); }
  // Rows this rank sends to other ranks per dispatch (its own excluded).
  std::uint64_t rows_sent() const { return rows_sent_; }

  // [tokens, width] → [R, width]: each token's row to each of its destinations.
  template <class T>
  Tensor<T> dispatch(const Tensor<T>& per_token) const;
  // [R, width] → [tokens, width]: each token's rows from its destinations, summed in rank order
  // (zeros for a token sent nowhere).
  template <class T>
  Tensor<T> combine(const Tensor<T>& per_row) const;

 private:
  void upload_send_plan(const std::vector<std::vector<index_t>>& send_tokens);
  // The widest row width of the ranks (a rank without rows has width 0). Collective.
  index_t common_width(index_t width) const;
  // Rows of width to and from every rank (counts in rows, rank order), through mpi_transport().
  template <class T>
  void exchange_rows(const T* send, const std::vector<std::size_t>& send_rows, T* recv,
                     const std::vector<std::size_t>& recv_rows, index_t width) const;

  Communicator comm_;
  index_t tokens_ = 0;
  int k_ = 0;
  std::vector<std::size_t> send_rows_;  // per destination rank: rows sent
  std::vector<std::size_t> recv_rows_;  // per source rank: rows received
  // [rows sent] the local token of each sent row, destination by destination, ascending in each.
  Tensor<index_t> send_tokens_;
  // Per local token, the sent rows that were its copies, in rank order: rows
  // combine_rows_[combine_offsets_[t] .. combine_offsets_[t + 1]) of what comes back.
  Tensor<index_t> combine_offsets_, combine_rows_;
  bool in_place_ = false;  // one rank: nothing crosses ranks
  index_t received_rows_ = 0;
  Tensor<int> received_experts_;
  Tensor<std::int64_t> received_tokens_;  // Tensors: from the memory pool, not a cudaMalloc each
  std::uint64_t rows_sent_ = 0;
};

}  // namespace kmoe::dist
