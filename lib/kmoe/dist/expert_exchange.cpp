#include "kmoe/dist/expert_exchange.hpp"

#include "kmoe/core/error.hpp"
#include "kmoe/dist/mpi_memory.hpp"

#include <algorithm>
#include <cstring>
#include <string>

namespace kmoe::dist {

namespace impl {
// [tokens] first, first + 1, …: the global positions of a rank's own tokens.
Tensor<std::int64_t> consecutive_tokens(index_t tokens, std::int64_t first) {
  auto storage = Tensor<std::int64_t>::uninitialized("exchange::received_tokens", {tokens});
  const View1<std::int64_t> global = storage.flat();
  Kokkos::parallel_for(
      "kmoe::exchange::received_tokens", Kokkos::RangePolicy<ExecSpace>(0, tokens),
      KOKKOS_LAMBDA(const index_t t) { global(t) = first + t; });
  return storage;
}
}  // namespace impl

ExpertExchange::ExpertExchange(const Communicator& comm, const Placement& placement, const Tensor<int>& expert_index,
                               std::int64_t first_token)
    : comm_(comm) {
  const int world = comm.size(), rank = comm.rank();
  require(placement.world() == world, Status::internal, "ExpertExchange: a placement for ", placement.world(),
          " ranks on a communicator of ", world);
  require(expert_index.empty() || expert_index.rank() == 2, Status::shape_mismatch,
          "ExpertExchange: expert_index is ", expert_index.shape().str(), ", expected [tokens, k]");
  tokens_ = expert_index.empty() ? 0 : expert_index.dim(0);
  k_ = expert_index.empty() ? 0 : static_cast<int>(expert_index.dim(1));
  // Every rank needs k, also one without tokens.
  const std::vector<std::int64_t> ks = comm.all_gather(static_cast<std::int64_t>(k_));
  int k = 0;
  for (const std::int64_t v : ks) k = std::max(k, static_cast<int>(v));
  for (const std::int64_t v : ks)
    require(v == 0 || v == k, Status::invalid_argument, "ExpertExchange: the ranks route with different k (", v,
            " and ", k, ")");
  k_ = k;
  if (world == 1) {
    in_place_ = true;
    received_rows_ = tokens_;
    if (tokens_ > 0 && k_ > 0) received_experts_ = expert_index;
    received_tokens_ = impl::consecutive_tokens(tokens_, first_token);
    return;
  }

  // Per destination: the tokens with a pair it holds, and their records [global token, k experts
  // (global id where the destination holds it, else −1)].
  const std::vector<int> index = expert_index.empty() ? std::vector<int>() : expert_index.to_host();
  std::vector<std::vector<index_t>> send_tokens(static_cast<std::size_t>(world));
  std::vector<std::vector<std::int64_t>> records(static_cast<std::size_t>(world));
  std::vector<char> wanted(static_cast<std::size_t>(world));
  for (index_t t = 0; t < tokens_; ++t) {
    std::fill(wanted.begin(), wanted.end(), 0);
    for (int j = 0; j < k_; ++j) {
      const int e = index[static_cast<std::size_t>(t * k_ + j)];
      if (e < 0) continue;
      require(e < placement.n_experts(), Status::invalid_argument, "ExpertExchange: expert ", e, " of token ", t,
              " is outside [0, ", placement.n_experts(), ")");
      for (int r = placement.owner_begin(e); r < placement.owner_end(e); ++r) wanted[r] = 1;
    }
    for (int r = 0; r < world; ++r) {
      if (!wanted[r]) continue;
      send_tokens[r].push_back(t);
      std::vector<std::int64_t>& rec = records[r];
      rec.push_back(first_token + t);
      const int first = placement.first_expert(r), last = first + placement.local_experts(r);
      for (int j = 0; j < k_; ++j) {
        const int e = index[static_cast<std::size_t>(t * k_ + j)];
        rec.push_back(e >= first && e < last ? e : -1);
      }
    }
  }
  std::vector<std::size_t> send_bytes(static_cast<std::size_t>(world));
  std::vector<unsigned char> packed;
  for (int r = 0; r < world; ++r) {
    send_bytes[r] = records[r].size() * sizeof(std::int64_t);
    const auto* bytes = reinterpret_cast<const unsigned char*>(records[r].data());
    packed.insert(packed.end(), bytes, bytes + send_bytes[r]);
    if (r != rank) rows_sent_ += send_tokens[r].size();
  }
  upload_send_plan(send_tokens);
  std::vector<std::size_t> recv_bytes;
  const std::vector<unsigned char> got = comm.all_to_all(packed.data(), send_bytes, recv_bytes);
  const std::size_t record = static_cast<std::size_t>(k_ + 1);
  recv_rows_.resize(static_cast<std::size_t>(world));
  std::size_t total = 0;
  for (int r = 0; r < world; ++r) {
    recv_rows_[r] = recv_bytes[r] / (record * sizeof(std::int64_t));
    total += recv_rows_[r];
  }
  std::vector<std::int64_t> all(total * record);
  if (!all.empty()) std::memcpy(all.data(), got.data(), all.size() * sizeof(std::int64_t));
  received_rows_ = static_cast<index_t>(total);
  std::vector<std::int64_t> received_tokens(total);
  std::vector<int> experts(total * static_cast<std::size_t>(k_));
  const int first = placement.first_expert(rank);
  for (std::size_t i = 0; i < total; ++i) {
    received_tokens[i] = all[i * record];
    for (int j = 0; j < k_; ++j) {
      const std::int64_t e = all[i * record + 1 + static_cast<std::size_t>(j)];
      experts[i * static_cast<std::size_t>(k_) + j] = e < 0 ? -1 : static_cast<int>(e - first);
    }
  }
  if (total > 0 && k_ > 0)
    received_experts_ = Tensor<int>::from_host("exchange::received_experts", {static_cast<index_t>(total), k_}, experts);
  received_tokens_ =
      Tensor<std::int64_t>::from_host("exchange::received_tokens", {static_cast<index_t>(total)}, received_tokens);
}

void ExpertExchange::upload_send_plan(const std::vector<std::vector<index_t>>& send_tokens) {
  // Destination-major send order; and, per token, its sent copies in rank order (a counting sort
  // of the send order by token, stable, so that the combine sums in rank order).
  std::vector<index_t> order, offsets(static_cast<std::size_t>(tokens_) + 1, 0);
  send_rows_.clear();
  for (const std::vector<index_t>& to_rank : send_tokens) {
    send_rows_.push_back(to_rank.size());
    order.insert(order.end(), to_rank.begin(), to_rank.end());
    for (const index_t t : to_rank) ++offsets[static_cast<std::size_t>(t) + 1];
  }
  for (std::size_t t = 0; t < static_cast<std::size_t>(tokens_); ++t) offsets[t + 1] += offsets[t];
  std::vector<index_t> rows(order.size()), next(offsets.begin(), offsets.end() - 1);
  for (std::size_t i = 0; i < order.size(); ++i)
    rows[static_cast<std::size_t>(next[static_cast<std::size_t>(order[i])]++)] = static_cast<index_t>(i);
  const auto upload = [](const char* label, const std::vector<index_t>& values) {
    return Tensor<index_t>::from_host(label, {static_cast<index_t>(values.size())}, values);
  };
  send_tokens_ = upload("exchange::send_tokens", order);
  combine_offsets_ = upload("exchange::combine_offsets", offsets);
  combine_rows_ = upload("exchange::combine_rows", rows);
}

index_t ExpertExchange::common_width(index_t width) const {
  // A rank without rows learns the width from the others.
  index_t common = 0;
  for (const std::int64_t v : comm_.all_gather(static_cast<std::int64_t>(width))) common = std::max<index_t>(common, v);
  return common;
}

template <class T>
void ExpertExchange::exchange_rows(const T* send, const std::vector<std::size_t>& send_rows, T* recv,
                                   const std::vector<std::size_t>& recv_rows, index_t width) const {
  const std::size_t row_bytes = static_cast<std::size_t>(width) * sizeof(T);
  std::vector<std::size_t> send_bytes(send_rows.size()), recv_bytes(recv_rows.size());
  for (std::size_t r = 0; r < send_rows.size(); ++r) {
    send_bytes[r] = send_rows[r] * row_bytes;
    recv_bytes[r] = recv_rows[r] * row_bytes;
  }
  Kokkos::fence();  // the packing kernel's time is not the transfer's
  const double start = MPI_Wtime();
  all_to_all(comm_, send, send_bytes, recv, recv_bytes);
  Kokkos::fence();
  comm_.count_exchange_time(MPI_Wtime() - start);
}

template <class T>
Tensor<T> ExpertExchange::dispatch(const Tensor<T>& per_token) const {
  const int world = comm_.size();
  require(per_token.empty() ? tokens_ == 0 : per_token.rank() == 2 && per_token.dim(0) == tokens_,
          Status::shape_mismatch, "ExpertExchange::dispatch: rows are ", per_token.shape().str(), ", expected [",
          tokens_, ", width]");
  if (in_place_) return per_token.empty() ? Tensor<T>() : per_token.clone("exchange::dispatched");
  const index_t width = common_width(per_token.empty() ? 0 : per_token.dim(1));
  const index_t sent = send_tokens_.size();
  const index_t received = received_rows();
  const std::uint64_t row_bytes = static_cast<std::uint64_t>(width) * sizeof(T);
  comm_.count_exchange(rows_sent_ * row_bytes,
                       static_cast<std::uint64_t>(world - 1) * static_cast<std::uint64_t>(tokens_) * row_bytes);
  // Each destination's rows, packed in send order.
  const auto packed = Tensor<T>::uninitialized("exchange::packed", {sent, width});
  if (sent > 0 && width > 0) {
    const View2<const T> from = per_token.as_matrix();
    const View2<T> to = packed.as_matrix();
    const View1<const index_t> tokens = send_tokens_.flat();
    Kokkos::parallel_for(
        "kmoe::exchange::pack", md_range<2>({0, 0}, {sent, width}),
        KOKKOS_LAMBDA(const index_t i, const index_t c) { to(i, c) = from(tokens(i), c); });
  }
  const auto out = received > 0 && width > 0 ? Tensor<T>::uninitialized("exchange::dispatched", {received, width})
                                             : Tensor<T>();
  exchange_rows<T>(packed.data(), send_rows_, out.empty() ? nullptr : out.data(), recv_rows_, width);
  return out;
}

template <class T>
Tensor<T> ExpertExchange::combine(const Tensor<T>& per_row) const {
  const int world = comm_.size();
  const index_t received = received_rows();
  require(per_row.empty() ? received == 0 : per_row.rank() == 2 && per_row.dim(0) == received,
          Status::shape_mismatch, "ExpertExchange::combine: rows are ", per_row.shape().str(), ", expected [",
          received, ", width]");
  if (in_place_) return per_row.empty() ? Tensor<T>("exchange::combined", {0, 0}) : per_row.clone("exchange::combined");
  const index_t width = common_width(per_row.empty() ? 0 : per_row.dim(1));
  // The rows go back to their sources as they came: source by source, in the order received.
  std::uint64_t back_to_others = 0;
  for (int r = 0; r < world; ++r)
    if (r != comm_.rank()) back_to_others += recv_rows_[r] * static_cast<std::size_t>(width) * sizeof(T);
  comm_.count_exchange(back_to_others, static_cast<std::uint64_t>(world - 1) * static_cast<std::uint64_t>(tokens_) *
                                           static_cast<std::uint64_t>(width) * sizeof(T));
  const index_t sent = send_tokens_.size();
  const auto back = Tensor<T>::uninitialized("exchange::returned", {sent, width});
  exchange_rows<T>(per_row.empty() ? nullptr : per_row.data(), recv_rows_, back.data(), send_rows_, width);
  if (tokens_ == 0) return Tensor<T>("exchange::combined", {0, width});
  if (width == 0) return Tensor<T>();
  // Each token's copies summed in rank order (zeros for a token sent nowhere): deterministic.
  auto out = Tensor<T>::uninitialized("exchange::combined", {tokens_, width});
  const View2<const T> from = back.as_matrix();
  const View2<T> to = out.as_matrix();
  const View1<const index_t> offsets = combine_offsets_.flat(), rows = combine_rows_.flat();
  Kokkos::parallel_for(
      "kmoe::exchange::combine", md_range<2>({0, 0}, {tokens_, width}),
      KOKKOS_LAMBDA(const index_t t, const index_t c) {
        T sum = 0;
        for (index_t p = offsets(t); p < offsets(t + 1); ++p) sum += from(rows(p), c);
        to(t, c) = sum;
      });
  return out;
}

template Tensor<float> ExpertExchange::dispatch<float>(const Tensor<float>&) const;
template Tensor<double> ExpertExchange::dispatch<double>(const Tensor<double>&) const;
template Tensor<float> ExpertExchange::combine<float>(const Tensor<float>&) const;
template Tensor<double> ExpertExchange::combine<double>(const Tensor<double>&) const;

}  // namespace kmoe::dist
