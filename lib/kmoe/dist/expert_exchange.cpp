#include "kmoe/dist/expert_exchange.hpp"

#include "kmoe/core/error.hpp"

#include <cstring>

namespace kmoe::dist {

namespace impl {
// [tokens] first, first + 1, …: the global positions of a rank's own tokens.
View1<const std::int64_t> consecutive_tokens(index_t tokens, std::int64_t first) {
  View1<std::int64_t> global("exchange::received_tokens", static_cast<std::size_t>(tokens));
  Kokkos::parallel_for(
      "kmoe::exchange::received_tokens", Kokkos::RangePolicy<ExecSpace>(0, tokens),
      KOKKOS_LAMBDA(const index_t t) { global(t) = first + t; });
  return global;
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
  send_tokens_.assign(static_cast<std::size_t>(world), {});
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
      send_tokens_[r].push_back(t);
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
    if (r != rank) rows_sent_ += send_tokens_[r].size();
  }
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
  View1<std::int64_t> global("exchange::received_tokens", total);
  Kokkos::deep_copy(global, Kokkos::View<const std::int64_t*, HostSpace, Kokkos::MemoryUnmanaged>(
                                received_tokens.data(), received_tokens.size()));
  received_tokens_ = global;
}

template <class T>
Tensor<T> ExpertExchange::dispatch(const Tensor<T>& per_token) const {
  const int world = comm_.size();
  require(per_token.empty() ? tokens_ == 0 : per_token.rank() == 2 && per_token.dim(0) == tokens_,
          Status::shape_mismatch, "ExpertExchange::dispatch: rows are ", per_token.shape().str(), ", expected [",
          tokens_, ", width]");
  if (in_place_) return per_token.empty() ? Tensor<T>() : per_token.clone("exchange::dispatched");
  // A rank without tokens learns the width from the others.
  const index_t width = per_token.empty() ? 0 : per_token.dim(1);
  const std::vector<std::int64_t> widths = comm_.all_gather(static_cast<std::int64_t>(width));
  index_t common = 0;
  for (const std::int64_t v : widths) common = std::max<index_t>(common, v);
  const std::vector<T> rows = per_token.empty() ? std::vector<T>() : per_token.to_host();
  const std::size_t row_bytes = static_cast<std::size_t>(common) * sizeof(T);
  std::vector<std::size_t> send_bytes(static_cast<std::size_t>(world));
  std::vector<unsigned char> packed;
  for (int r = 0; r < world; ++r) {
    send_bytes[r] = send_tokens_[r].size() * row_bytes;
    const std::size_t at = packed.size();
    packed.resize(at + send_bytes[r]);
    for (std::size_t i = 0; i < send_tokens_[r].size(); ++i)
      std::memcpy(packed.data() + at + i * row_bytes, rows.data() + send_tokens_[r][i] * common, row_bytes);
  }
  comm_.count_exchange(rows_sent_ * row_bytes,
                       static_cast<std::uint64_t>(world - 1) * static_cast<std::uint64_t>(tokens_) * row_bytes);
  std::vector<std::size_t> recv_bytes;
  const std::vector<unsigned char> got = comm_.all_to_all(packed.data(), send_bytes, recv_bytes);
  const index_t received = received_rows();
  if (received == 0 || common == 0) return Tensor<T>();
  std::vector<T> out(static_cast<std::size_t>(received * common));
  std::memcpy(out.data(), got.data(), out.size() * sizeof(T));
  return Tensor<T>::from_host("exchange::dispatched", {received, common}, out);
}

template <class T>
Tensor<T> ExpertExchange::combine(const Tensor<T>& per_row) const {
  const int world = comm_.size();
  const index_t received = received_rows();
  require(per_row.empty() ? received == 0 : per_row.rank() == 2 && per_row.dim(0) == received,
          Status::shape_mismatch, "ExpertExchange::combine: rows are ", per_row.shape().str(), ", expected [",
          received, ", width]");
  if (in_place_) return per_row.empty() ? Tensor<T>("exchange::combined", {0, 0}) : per_row.clone("exchange::combined");
  const index_t width = per_row.empty() ? 0 : per_row.dim(1);
  const std::vector<std::int64_t> widths = comm_.all_gather(static_cast<std::int64_t>(width));
  index_t common = 0;
  for (const std::int64_t v : widths) common = std::max<index_t>(common, v);
  // The rows go back to their sources as they came: source by source, in the order received.
  std::vector<std::size_t> send_bytes(static_cast<std::size_t>(world));
  std::uint64_t back_to_others = 0;
  for (int r = 0; r < world; ++r) {
    send_bytes[r] = recv_rows_[r] * static_cast<std::size_t>(common) * sizeof(T);
    if (r != comm_.rank()) back_to_others += send_bytes[r];
  }
  comm_.count_exchange(back_to_others, static_cast<std::uint64_t>(world - 1) * static_cast<std::uint64_t>(tokens_) *
                                           static_cast<std::uint64_t>(common) * sizeof(T));
  const std::vector<T> rows = per_row.empty() ? std::vector<T>() : per_row.to_host();
  std::vector<std::size_t> recv_bytes;
  const std::vector<unsigned char> got =
      comm_.all_to_all(reinterpret_cast<const unsigned char*>(rows.data()), send_bytes, recv_bytes);
  if (tokens_ == 0) return Tensor<T>("exchange::combined", {0, common});
  if (common == 0) return Tensor<T>();
  std::vector<T> out(static_cast<std::size_t>(tokens_ * common), T(0));
  std::size_t at = 0;
  for (int r = 0; r < world; ++r) {
    const T* back = reinterpret_cast<const T*>(got.data() + at);
    for (std::size_t i = 0; i < send_tokens_[r].size(); ++i) {
      T* into = out.data() + send_tokens_[r][i] * common;
      for (index_t c = 0; c < common; ++c) into[c] += back[i * static_cast<std::size_t>(common) + c];
    }
    at += recv_bytes[r];
  }
  return Tensor<T>::from_host("exchange::combined", {tokens_, common}, out);
}

template Tensor<float> ExpertExchange::dispatch<float>(const Tensor<float>&) const;
template Tensor<double> ExpertExchange::dispatch<double>(const Tensor<double>&) const;
template Tensor<float> ExpertExchange::combine<float>(const Tensor<float>&) const;
template Tensor<double> ExpertExchange::combine<double>(const Tensor<double>&) const;

}  // namespace kmoe::dist
