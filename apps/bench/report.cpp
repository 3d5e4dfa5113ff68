#include "report.hpp"

#include "expert_mlp.hpp"

#include "kmoe/core/memory_pool.hpp"
#include "kmoe/ops/gemm.hpp"

#include <KokkosBlas3_gemm.hpp>

#include <algorithm>
#include <cstdio>
#include <random>

namespace kmoe::apps {

namespace {

// Live bytes per allocation (Kokkos reports the size only at allocation) and the running totals.
struct AllocationLedger {
  std::vector<std::pair<const void*, std::uint64_t>> live;
  std::int64_t held = 0;
  std::int64_t start = 0;
  std::int64_t peak = 0;
};
AllocationLedger* ledger = nullptr;

void on_allocate(Kokkos::Profiling::SpaceHandle, const char*, const void* ptr, std::uint64_t size) {
  ledger->live.emplace_back(ptr, size);
  ledger->held += static_cast<std::int64_t>(size);
  ledger->peak = std::max(ledger->peak, ledger->held);
}

void on_deallocate(Kokkos::Profiling::SpaceHandle, const char*, const void* ptr, std::uint64_t) {
  auto& live = ledger->live;
  const auto it = std::find_if(live.rbegin(), live.rend(), [&](const auto& entry) { return entry.first == ptr; });
  if (it == live.rend()) return;  // allocated before the tracker started
  ledger->held -= static_cast<std::int64_t>(it->second);
  live.erase(std::next(it).base());
}

std::string megabytes(const std::optional<std::int64_t>& bytes) {
  if (!bytes) return "-";
  char text[32];
  std::snprintf(text, sizeof text, "%.1f", static_cast<double>(*bytes) / (1024.0 * 1024.0));
  return text;
}

}  // namespace

PeakMemory::PeakMemory() {
  require(ledger == nullptr, Status::invalid_argument, "PeakMemory: only one tracker may be active");
  ledger = new AllocationLedger;
  Kokkos::Tools::Experimental::set_allocate_data_callback(on_allocate);
  Kokkos::Tools::Experimental::set_deallocate_data_callback(on_deallocate);
}

PeakMemory::~PeakMemory() {
  Kokkos::Tools::Experimental::set_allocate_data_callback(nullptr);
  Kokkos::Tools::Experimental::set_deallocate_data_callback(nullptr);
  delete ledger;
  ledger = nullptr;
}

void PeakMemory::reset() {
  release_memory_pool();
  ledger->start = ledger->held;
  ledger->peak = ledger->held;
}

std::int64_t PeakMemory::peak_bytes() const { return ledger->peak - ledger->start; }

void BenchTable::print() const {
  const double base_rate = baseline.flops / baseline.seconds;
  std::size_t width = 4;  // "case"
  width = std::max(width, baseline.name.size());
  for (const BenchRow& row : rows) width = std::max(width, row.name.size());
  const int w = static_cast<int>(width);
  std::printf("### %s\n\n", title.c_str());
  std::printf("| %-*s | %10s | %8s | %9s | %13s |\n", w, "case", "time [ms]", "GFLOP/s", "peak [MB]", "ratio vs base");
  std::printf("|%s|------------|----------|-----------|---------------|\n", std::string(width + 2, '-').c_str());
  const auto print_row = [&](const BenchRow& row) {
    const double rate = row.flops / row.seconds;
    std::printf("| %-*s | %10.2f | %8.1f | %9s | %13.2f |\n", w, row.name.c_str(), row.seconds * 1e3, rate * 1e-9,
                megabytes(row.peak_bytes).c_str(), rate / base_rate);
  };
  print_row(baseline);
  for (const BenchRow& row : rows) print_row(row);
  for (const std::string& note : notes) std::printf("\n%s", note.c_str());
  std::printf("\n\n");
}

bool native_bfloat16_gemm() { return !Kokkos::SpaceAccessibility<HostSpace, MemSpace>::accessible; }

namespace {

// The dense GEMMs of one chain, in the operand type V (float, or bfloat16 on a device).
template <class V>
struct DenseGemm {
  static void run(bool ta, bool tb, const Tensor<V>& a, const Tensor<V>& b, const Tensor<V>& c) {
    if constexpr (std::is_same_v<V, bfloat16>) {
      ops::gemm_bf16(ta, tb, 1.f, a.template view<2>(), b.template view<2>(), 0.f, c.template view<2>());
    } else {
      KokkosBlas::gemm(ta ? "T" : "N", tb ? "T" : "N", 1.f, a.template view<2>(), b.template view<2>(), 0.f,
                       c.template view<2>());
    }
  }
  // Random operands (N(0, 1)): constant or zero data runs faster on tensor cores than real data.
  static Tensor<V> random(const char* label, const Shape& shape, std::uint64_t seed) {
    std::mt19937_64 gen(seed);
    const Tensor<float> t = Tensor<float>::from_host(label, shape, random_vector<float>(shape.size(), gen, 1.0));
    if constexpr (std::is_same_v<V, bfloat16>) return convert_tensor<bfloat16>(t, label);
    else return t;
  }
};

template <class V>
BenchRow gemm_row(const std::string& name, index_t m, index_t k, index_t n, int repeats) {
  using G = DenseGemm<V>;
  const Tensor<V> a = G::random("a", {m, k}, 1), b = G::random("b", {k, n}, 2), c = G::random("c", {m, n}, 3);
  const auto gemm = [&] { G::run(false, false, a, b, c); };
  gemm();
  return {name, median_seconds(repeats, gemm), 2.0 * m * k * n, std::nullopt};
}

// The operand type of a precision's dense baseline: bfloat16 where it runs natively, else float.
template <class Fn>
auto with_operand_type(Precision precision, const Fn& fn) {
  if (precision == Precision::bfloat16 && native_bfloat16_gemm()) return fn(bfloat16{}, "bf16");
  return fn(float{}, precision == Precision::bfloat16 ? "fp32 (no bf16 BLAS)" : "fp32");
}

template <class V>
DenseChainRows chain_rows(index_t m, index_t d, index_t h, int repeats, const std::string& what) {
  using G = DenseGemm<V>;
  const Tensor<V> x = G::random("x", {m, d}, 1), w1 = G::random("w1", {d, h}, 2), w2 = G::random("w2", {h, d}, 3),
                  dy = G::random("dy", {m, d}, 4);
  const Tensor<V> hidden = G::random("h", {m, h}, 5), y = G::random("y", {m, d}, 6), dh = G::random("dh", {m, h}, 7),
                  dx = G::random("dx", {m, d}, 8), dw1 = G::random("dw1", {d, h}, 9), dw2 = G::random("dw2", {h, d}, 10);
  const auto forward = [&] {
    G::run(false, false, x, w1, hidden);
    G::run(false, false, hidden, w2, y);
  };
  const auto forward_backward = [&] {
    forward();
    G::run(false, true, dy, w2, dh);
    G::run(true, false, hidden, dy, dw2);
    G::run(false, true, dh, w1, dx);
    G::run(true, false, x, dh, dw1);
  };
  forward_backward();
  const double flops = 2.0 * m * d * h;
  return {{"dense " + what + " GEMM chain forward", median_seconds(repeats, forward), 2 * flops, std::nullopt},
          {"dense " + what + " GEMM chain forward+backward (baseline)", median_seconds(repeats, forward_backward),
           6 * flops, std::nullopt}};
}

}  // namespace

BenchRow dense_gemm_row(const std::string& name, index_t m, index_t k, index_t n, int repeats, Precision precision) {
  return with_operand_type(precision, [&](auto operand, const char* what) {
    return gemm_row<decltype(operand)>("dense " + std::string(what) + " " + name, m, k, n, repeats);
  });
}

DenseChainRows dense_chain_rows(index_t m, index_t d, index_t h, Precision precision, int repeats) {
  return with_operand_type(precision, [&](auto operand, const char* what) {
    return chain_rows<decltype(operand)>(m, d, h, repeats, what);
  });
}

BenchRow square_gemm_row(index_t n, Precision precision, int repeats) {
  return dense_gemm_row("square GEMM " + std::to_string(n) + "^3 (peak reference)", n, n, n, repeats, precision);
}

}  // namespace kmoe::apps
