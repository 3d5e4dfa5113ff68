// The communicator seam: every message kmoe sends goes through this small interface over an
// MPI_Comm that the caller passes in. kmoe never initialises MPI and never uses MPI_COMM_WORLD on
// its own; it works on a duplicate of the caller's communicator (MPI_Comm_dup), so its messages
// never meet the caller's. A default-constructed Communicator is one rank and needs no MPI at all
// (MPI may be uninitialised): single-rank runs go through the same calls, which then copy.
//
// Collectives give every rank the same bits, and repeated runs at the same world size agree.
//
// Errors: a rank that fails inside a step must not leave the others waiting in the next
// collective. Code that may fail on one rank runs inside collectively(): every rank then learns
// whether some rank failed and throws the same kmoe::Error, naming the first failing rank and its
// message (Status::mpi_error for MPI's own failures).
#pragma once

#include "kmoe/core/error.hpp"
#include "kmoe/core/random.hpp"

#include <mpi.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace kmoe::dist {

class Communicator {
 public:
  // One rank, no MPI.
  Communicator() = default;
  // kmoe's duplicate of comm. MPI must be initialised (else Status::invalid_argument);
  // MPI_COMM_NULL means one rank, as the default constructor.
  explicit Communicator(MPI_Comm comm);

  int rank() const { return rank_; }
  int size() const { return size_; }
  bool distributed() const { return size_ > 1; }
  // The duplicate (MPI_COMM_NULL for one rank without MPI): for parallel HDF5.
  MPI_Comm comm() const;

  // The ranks of the same color, in rank order, as a communicator of their own (MPI_Comm_split);
  // collective. One rank's split is itself.
  Communicator split(int color) const;

  // Every rank's value, in rank order.
  std::vector<std::int64_t> all_gather(std::int64_t value) const;
  // Every rank's values (the same count on every rank, below 2^31), rank r's at [r·n, (r+1)·n).
  std::vector<double> all_gather(const std::vector<double>& values) const;
  // values (n of them; float, double or int64) replaced by their sum over the ranks, the same on
  // every rank (MPI_Allreduce: the MPI standard asks implementations for the same result from
  // the same arguments in the same order, and Open MPI picks its algorithm by size and count).
  template <class T>
  void all_reduce_sum(T* values, std::size_t n) const;
  std::int64_t sum(std::int64_t value) const;
  // Rank 0's text, on every rank (a file name or a time stamp that every rank must use alike).
  std::string broadcast(const std::string& text) const;
  // The exclusive prefix sum of value over the ranks (rank 0: 0).
  std::int64_t exclusive_prefix_sum(std::int64_t value) const;

  // send_counts[r]: bytes for rank r, laid out in rank order at send; returns what each rank sent
  // to this one, in rank order at recv (sized by the counts exchanged first). Counts are 64-bit:
  // exchanges over 2^31 bytes go in rounds. Zero-count pairs are normal.
  std::vector<unsigned char> all_to_all(const unsigned char* send, const std::vector<std::size_t>& send_counts,
                                        std::vector<std::size_t>& recv_counts) const;
  // The same with the receive counts known beforehand (they must match what the ranks send) and
  // the caller's buffers, which may be device memory where mpi_transport() is device_buffers: one
  // MPI_Alltoallv when every count and displacement fits MPI's int and no pair exceeds the round
  // size, else point-to-point messages of at most the round size (no staging copy).
  void all_to_all(const void* send, const std::vector<std::size_t>& send_counts, void* recv,
                  const std::vector<std::size_t>& recv_counts) const;

  // Runs step on this rank, then agrees with every rank on the outcome: when any rank's step
  // threw, every rank throws the first failing rank's status and message (prefixed "rank r: ").
  void collectively(const std::function<void()>& step) const;
  // Every rank must hold the same value (a hash of a config, say): otherwise every rank throws
  // Status::invalid_argument naming `what` and the ranks that differ from rank 0.
  void require_same(std::uint64_t value, const std::string& what) const;

  // The most bytes one message between a pair of ranks carries (default 2^29, at most INT_MAX / 2):
  // larger exchanges go as several point-to-point messages. Small values exercise that path in
  // tests. Every rank must set the same value.
  void set_round_bytes(std::size_t bytes) const;

  // Bytes this rank has sent to other ranks through all_to_all (its own rows to itself excluded).
  std::uint64_t bytes_sent() const { return state_ ? state_->bytes_sent : 0; }
  // Of those, the expert exchanges' token rows (the routing's minimum: each row once per other
  // rank that needs it; the rest is routing metadata), and what a naive all-gather design would
  // have sent for the same exchanges (every rank's rows to every other rank, st-moe-pytorch's
  // way). Counted by dist::ExpertExchange; reset with bytes_sent.
  std::uint64_t row_bytes_sent() const { return state_ ? state_->row_bytes_sent : 0; }
  std::uint64_t all_gather_bytes() const { return state_ ? state_->all_gather_bytes : 0; }
  void count_exchange(std::uint64_t row_bytes, std::uint64_t all_gather_bytes) const;
  // Wall time of the expert exchanges' row transfers (staging copies and MPI, waiting for the
  // other ranks included): the achieved all-to-all rate is their bytes over it. Counted by
  // dist::ExpertExchange; reset with bytes_sent.
  double exchange_seconds() const { return state_ ? state_->exchange_seconds : 0; }
  void count_exchange_time(double seconds) const;
  void reset_bytes_sent() const;

 private:
  struct State {
    MPI_Comm comm = MPI_COMM_NULL;
    std::uint64_t bytes_sent = 0, row_bytes_sent = 0, all_gather_bytes = 0;
    double exchange_seconds = 0;
    std::size_t round_bytes = std::size_t(1) << 29;
    ~State();
  };
  std::shared_ptr<State> state_;  // null: one rank without MPI
  int rank_ = 0;
  int size_ = 1;
};

// Whether MPI is initialised and not yet finalised.
bool mpi_running();

// This rank's draws of a batch-wide stream: the generator advances by every rank's count (the
// same on every rank), and this rank's stream starts after the ranks before it, so that rank r's
// element i draws what element (Σ_{q<r} count_q) + i draws on one rank. Collective.
RngStream take_global(const Communicator& comm, Generator& rng, std::uint64_t local_count);

// An FNV-1a hash of text, for require_same.
std::uint64_t text_hash(const std::string& text);

}  // namespace kmoe::dist
