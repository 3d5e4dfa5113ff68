#include "kmoe/dist/communicator.hpp"

#include "kmoe/core/config.hpp"

#include <algorithm>
#include <climits>
#include <type_traits>

namespace kmoe::dist {

namespace {

void check_mpi(int rc, const char* what) {
  if (rc == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING] = {};
  int length = 0;
  MPI_Error_string(rc, text, &length);
  fail(Status::mpi_error, "kmoe: ", what, " failed: ", std::string(text, static_cast<std::size_t>(length)));
}

// The largest message of all_to_all (MPI counts are int).
constexpr std::size_t max_round_bytes = static_cast<std::size_t>(INT_MAX) / 2;

}  // namespace

bool mpi_running() {
  int initialised = 0, finalised = 0;
  MPI_Initialized(&initialised);
  MPI_Finalized(&finalised);
  return initialised != 0 && finalised == 0;
}

Communicator::State::~State() {
  if (comm != MPI_COMM_NULL && mpi_running()) MPI_Comm_free(&comm);
}

Communicator::Communicator(MPI_Comm comm) {
  if (comm == MPI_COMM_NULL) return;
  require(mpi_running(), Status::invalid_argument,
          "kmoe: a communicator was given but MPI is not initialised (call MPI_Init first)");
  auto state = std::make_shared<State>();
  check_mpi(MPI_Comm_dup(comm, &state->comm), "MPI_Comm_dup");
  // Errors come back as codes, which check_mpi turns into kmoe::Error, instead of aborting.
  MPI_Comm_set_errhandler(state->comm, MPI_ERRORS_RETURN);
  check_mpi(MPI_Comm_rank(state->comm, &rank_), "MPI_Comm_rank");
  check_mpi(MPI_Comm_size(state->comm, &size_), "MPI_Comm_size");
  state_ = std::move(state);
}

MPI_Comm Communicator::comm() const { return state_ ? state_->comm : MPI_COMM_NULL; }

Communicator Communicator::split(int color) const {
  if (!state_) return *this;
  Communicator part;
  auto state = std::make_shared<State>();
  check_mpi(MPI_Comm_split(state_->comm, color, rank_, &state->comm), "MPI_Comm_split");
  MPI_Comm_set_errhandler(state->comm, MPI_ERRORS_RETURN);
  check_mpi(MPI_Comm_rank(state->comm, &part.rank_), "MPI_Comm_rank");
  check_mpi(MPI_Comm_size(state->comm, &part.size_), "MPI_Comm_size");
  state->round_bytes = state_->round_bytes;
  part.state_ = std::move(state);
  return part;
}

std::vector<std::int64_t> Communicator::all_gather(std::int64_t value) const {
  std::vector<std::int64_t> all(static_cast<std::size_t>(size_), value);
  if (state_) check_mpi(MPI_Allgather(&value, 1, MPI_INT64_T, all.data(), 1, MPI_INT64_T, state_->comm), "MPI_Allgather");
  return all;
}

std::vector<double> Communicator::all_gather(const std::vector<double>& values) const {
  if (!state_) return values;
  const std::size_t n = values.size();
  require(n <= static_cast<std::size_t>(INT_MAX), Status::internal, "Communicator::all_gather: ", n, " values");
  std::vector<double> all(n * static_cast<std::size_t>(size_));
  check_mpi(MPI_Allgather(values.data(), static_cast<int>(n), MPI_DOUBLE, all.data(), static_cast<int>(n), MPI_DOUBLE,
                          state_->comm),
            "MPI_Allgather");
  return all;
}

template <class T>
void Communicator::all_reduce_sum(T* values, std::size_t n) const {
  if (!state_) return;
  const MPI_Datatype type = std::is_same_v<T, float> ? MPI_FLOAT : std::is_same_v<T, double> ? MPI_DOUBLE : MPI_INT64_T;
  // In pieces of at most INT_MAX elements (MPI's counts are int); every rank runs the same pieces.
  const std::size_t piece = static_cast<std::size_t>(INT_MAX);
  for (std::size_t first = 0; first < n; first += piece) {
    const int count = static_cast<int>(std::min(piece, n - first));
    check_mpi(MPI_Allreduce(MPI_IN_PLACE, values + first, count, type, MPI_SUM, state_->comm), "MPI_Allreduce");
  }
}

template void Communicator::all_reduce_sum<float>(float*, std::size_t) const;
template void Communicator::all_reduce_sum<double>(double*, std::size_t) const;
template void Communicator::all_reduce_sum<std::int64_t>(std::int64_t*, std::size_t) const;

std::int64_t Communicator::sum(std::int64_t value) const {
  std::int64_t total = 0;
  for (const std::int64_t v : all_gather(value)) total += v;
  return total;
}

std::string Communicator::broadcast(const std::string& text) const {
  if (!state_) return text;
  std::int64_t length = static_cast<std::int64_t>(text.size());
  check_mpi(MPI_Bcast(&length, 1, MPI_INT64_T, 0, state_->comm), "MPI_Bcast");
  require(length <= INT_MAX, Status::internal, "Communicator::broadcast: ", length, " bytes");
  std::string out = rank_ == 0 ? text : std::string(static_cast<std::size_t>(length), '\0');
  check_mpi(MPI_Bcast(out.data(), static_cast<int>(length), MPI_CHAR, 0, state_->comm), "MPI_Bcast");
  return out;
}

std::int64_t Communicator::exclusive_prefix_sum(std::int64_t value) const {
  const std::vector<std::int64_t> all = all_gather(value);
  std::int64_t before = 0;
  for (int r = 0; r < rank_; ++r) before += all[static_cast<std::size_t>(r)];
  return before;
}

std::vector<unsigned char> Communicator::all_to_all(const unsigned char* send, const std::vector<std::size_t>& send_counts,
                                                    std::vector<std::size_t>& recv_counts) const {
  require(send_counts.size() == static_cast<std::size_t>(size_), Status::internal, "Communicator::all_to_all: ",
          send_counts.size(), " send counts for ", size_, " ranks");
  if (!state_) {
    recv_counts = send_counts;
    return std::vector<unsigned char>(send, send + send_counts[0]);
  }
  std::vector<std::uint64_t> sc(send_counts.begin(), send_counts.end()), rc(sc.size());
  check_mpi(MPI_Alltoall(sc.data(), 1, MPI_UINT64_T, rc.data(), 1, MPI_UINT64_T, state_->comm), "MPI_Alltoall");
  recv_counts.assign(rc.begin(), rc.end());
  std::size_t total = 0;
  for (const std::size_t c : recv_counts) total += c;
  std::vector<unsigned char> recv(total);
  all_to_all(send, send_counts, recv.data(), recv_counts);
  return recv;
}

void Communicator::all_to_all(const void* send, const std::vector<std::size_t>& send_counts, void* recv,
                              const std::vector<std::size_t>& recv_counts) const {
  const auto ranks = static_cast<std::size_t>(size_);
  require(send_counts.size() == ranks && recv_counts.size() == ranks, Status::internal,
          "Communicator::all_to_all: ", send_counts.size(), " send and ", recv_counts.size(), " receive counts for ",
          size_, " ranks");
  const auto* sp = static_cast<const unsigned char*>(send);
  auto* rp = static_cast<unsigned char*>(recv);
  if (!state_) {
    require(send_counts[0] == recv_counts[0], Status::internal, "Communicator::all_to_all: ", send_counts[0],
            " bytes sent to oneself, ", recv_counts[0], " expected");
    if (send_counts[0] > 0 && sp != rp)
      Kokkos::deep_copy(Kokkos::View<unsigned char*, MemSpace, Kokkos::MemoryUnmanaged>(rp, recv_counts[0]),
                        Kokkos::View<const unsigned char*, MemSpace, Kokkos::MemoryUnmanaged>(sp, send_counts[0]));
    return;
  }
  std::vector<std::size_t> send_at(ranks + 1, 0), recv_at(ranks + 1, 0);
  std::uint64_t longest = 0;
  for (std::size_t r = 0; r < ranks; ++r) {
    send_at[r + 1] = send_at[r] + send_counts[r];
    recv_at[r + 1] = recv_at[r] + recv_counts[r];
    longest = std::max<std::uint64_t>({longest, send_counts[r], recv_counts[r]});
    if (static_cast<int>(r) != rank_) state_->bytes_sent += send_counts[r];
  }
  const std::size_t round = std::min(state_->round_bytes, max_round_bytes);
  // Every rank must take the same path: one collective or matching point-to-point messages.
  std::uint64_t local[2] = {longest, std::max(send_at.back(), recv_at.back())}, global[2] = {0, 0};
  check_mpi(MPI_Allreduce(local, global, 2, MPI_UINT64_T, MPI_MAX, state_->comm), "MPI_Allreduce");
  if (global[0] <= round && global[1] <= static_cast<std::uint64_t>(INT_MAX)) {
    std::vector<int> scount(ranks), sdisp(ranks), rcount(ranks), rdisp(ranks);
    for (std::size_t r = 0; r < ranks; ++r) {
      scount[r] = static_cast<int>(send_counts[r]);
      sdisp[r] = static_cast<int>(send_at[r]);
      rcount[r] = static_cast<int>(recv_counts[r]);
      rdisp[r] = static_cast<int>(recv_at[r]);
    }
    check_mpi(MPI_Alltoallv(sp, scount.data(), sdisp.data(), MPI_BYTE, rp, rcount.data(), rdisp.data(), MPI_BYTE,
                            state_->comm),
              "MPI_Alltoallv");
    return;
  }
  // Messages of at most `round` bytes; those of one pair arrive in order (MPI does not overtake
  // messages of one sender, tag and communicator), so pointers carry the 64-bit offsets.
  std::vector<MPI_Request> requests;
  const auto post = [&](bool receive) {
    for (std::size_t r = 0; r < ranks; ++r) {
      const std::size_t count = receive ? recv_counts[r] : send_counts[r];
      for (std::size_t from = 0; from < count; from += round) {
        const int n = static_cast<int>(std::min(round, count - from));
        requests.emplace_back();
        if (receive)
          check_mpi(MPI_Irecv(rp + recv_at[r] + from, n, MPI_BYTE, static_cast<int>(r), 0, state_->comm,
                              &requests.back()),
                    "MPI_Irecv");
        else
          check_mpi(MPI_Isend(sp + send_at[r] + from, n, MPI_BYTE, static_cast<int>(r), 0, state_->comm,
                              &requests.back()),
                    "MPI_Isend");
      }
    }
  };
  post(true);
  post(false);
  check_mpi(MPI_Waitall(static_cast<int>(requests.size()), requests.data(), MPI_STATUSES_IGNORE), "MPI_Waitall");
}

void Communicator::collectively(const std::function<void()>& step) const {
  Status status = Status::ok;
  std::string message;
  try {
    step();
  } catch (const Error& e) {
    status = e.status();
    message = e.what();
  } catch (const std::exception& e) {
    status = Status::internal;
    message = e.what();
  }
  if (!state_) {
    if (status != Status::ok) throw Error(status, message);
    return;
  }
  const std::vector<std::int64_t> statuses = all_gather(static_cast<std::int64_t>(status));
  const auto failed = std::find_if(statuses.begin(), statuses.end(), [](std::int64_t s) { return s != 0; });
  if (failed == statuses.end()) return;
  const int root = static_cast<int>(failed - statuses.begin());
  // The failing rank's message, to every rank.
  std::int64_t length = static_cast<std::int64_t>(message.size());
  check_mpi(MPI_Bcast(&length, 1, MPI_INT64_T, root, state_->comm), "MPI_Bcast");
  std::string text(static_cast<std::size_t>(length), '\0');
  if (rank_ == root) text = message;
  check_mpi(MPI_Bcast(text.data(), static_cast<int>(length), MPI_CHAR, root, state_->comm), "MPI_Bcast");
  // A step of nested collective steps already names its rank once.
  const std::string prefix = "rank " + std::to_string(root) + ": ";
  throw Error(static_cast<Status>(*failed), text.compare(0, prefix.size(), prefix) == 0 ? text : prefix + text);
}

void Communicator::require_same(std::uint64_t value, const std::string& what) const {
  if (!state_) return;
  const std::vector<std::int64_t> all = all_gather(static_cast<std::int64_t>(value));
  std::string differing;
  for (int r = 1; r < size_; ++r)
    if (all[static_cast<std::size_t>(r)] != all[0]) differing += (differing.empty() ? "" : ", ") + std::to_string(r);
  require(differing.empty(), Status::invalid_argument, "kmoe: ", what, " differs between the ranks: rank",
          differing.find(',') == std::string::npos ? " " : "s ", differing, " differ",
          differing.find(',') == std::string::npos ? "s" : "", " from rank 0");
}

void Communicator::set_round_bytes(std::size_t bytes) const {
  require(bytes >= 1 && bytes <= max_round_bytes, Status::invalid_argument, "Communicator::set_round_bytes: ", bytes,
          " is outside [1, ", max_round_bytes, "]");
  if (state_) state_->round_bytes = bytes;
}

void Communicator::count_exchange(std::uint64_t row_bytes, std::uint64_t all_gather_bytes) const {
  if (!state_) return;
  state_->row_bytes_sent += row_bytes;
  state_->all_gather_bytes += all_gather_bytes;
}

void Communicator::count_exchange_time(double seconds) const {
  if (state_) state_->exchange_seconds += seconds;
}

void Communicator::reset_bytes_sent() const {
  if (!state_) return;
  state_->bytes_sent = state_->row_bytes_sent = state_->all_gather_bytes = 0;
  state_->exchange_seconds = 0;
}

RngStream take_global(const Communicator& comm, Generator& rng, std::uint64_t local_count) {
  const auto count = static_cast<std::int64_t>(local_count);
  RngStream stream = rng.take(static_cast<std::uint64_t>(comm.sum(count)));
  stream.offset += static_cast<std::uint64_t>(comm.exclusive_prefix_sum(count));
  return stream;
}

std::uint64_t text_hash(const std::string& text) {
  std::uint64_t h = 1469598103934665603ull;
  for (const unsigned char c : text) {
    h ^= c;
    h *= 1099511628211ull;
  }
  return h;
}

}  // namespace kmoe::dist
