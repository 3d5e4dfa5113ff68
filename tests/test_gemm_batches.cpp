// impl::uniform_batches: the recorded GEMMs cut into uniform batches, executed here on the host by a
// textbook column-major GEMM, must give what the GEMMs give whole: bitwise where only C's rows are
// cut, within float rounding where the inner dimension is (each piece adds into C).
#include "kmoe/core/bfloat16.hpp"
#include "kmoe/ops/impl/gemm_batches.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <memory>
#include <random>

using namespace kmoe;
using namespace kmoe::ops::impl;

namespace {

double load(GemmType type, const void* base, std::int64_t i) {
  if (type == GemmType::f64) return static_cast<const double*>(base)[i];
  if (type == GemmType::f32) return static_cast<const float*>(base)[i];
  return bfloat16_bits_to_float(static_cast<const std::uint16_t*>(base)[i]);
}

void store(GemmType type, void* base, std::int64_t i, double value) {
  if (type == GemmType::f64) static_cast<double*>(base)[i] = value;
  else if (type == GemmType::f32) static_cast<float*>(base)[i] = static_cast<float>(value);
  else static_cast<std::uint16_t*>(base)[i] = float_to_bfloat16_bits(static_cast<float>(value));
}

// Column-major C = alpha · op(first) · op(second) + beta · C, summed in double, stored in C's type.
void execute(bool tf, bool ts, std::int64_t m, std::int64_t n, std::int64_t k, double alpha, const void* first,
             std::int64_t ldf, const void* second, std::int64_t lds, double beta, void* c, std::int64_t ldc,
             GemmType type, GemmType c_type) {
  for (std::int64_t j = 0; j < n; ++j)
    for (std::int64_t i = 0; i < m; ++i) {
      double sum = 0;
      for (std::int64_t p = 0; p < k; ++p)
        sum += load(type, first, tf ? p + i * ldf : i + p * ldf) * load(type, second, ts ? j + p * lds : p + j * lds);
      const double previous = beta == 0 ? 0 : load(c_type, c, i + j * ldc);
      store(c_type, c, i + j * ldc, alpha * sum + beta * previous);
    }
}

void execute(const RecordedGemm& g) {
  execute(g.transpose_first, g.transpose_second, g.m, g.n, g.k, g.alpha, g.first, g.ld_first, g.second, g.ld_second,
          g.beta, g.c, g.ld_c, g.type, g.c_type);
}

void execute(const GemmBatch& b) {
  for (std::size_t i = 0; i < b.c.size(); ++i)
    execute(b.transpose_first, b.transpose_second, b.m, b.n, b.k, b.alpha, b.first[i], b.ld_first, b.second[i],
            b.ld_second, b.beta, b.c[i], b.ld_c, b.type, b.c_type);
}

// Owns the operands and C of recorded GEMMs, each C twice (whole and batched).
struct Workload {
  std::vector<std::unique_ptr<char[]>> buffers;
  std::vector<RecordedGemm> gemms, batched;
  std::mt19937_64 random{7};
  // The extents that leading dimensions follow where n or k is the leading one: as for row blocks
  // of one matrix, a family's leading dimensions are the same for all of its GEMMs.
  std::int64_t ld_n, ld_k;

  Workload(std::int64_t ld_n_, std::int64_t ld_k_) : ld_n(ld_n_), ld_k(ld_k_) {}

  void* random_buffer(GemmType type, std::int64_t elements) {
    buffers.emplace_back(new char[static_cast<std::size_t>(elements * bytes_of(type))]);
    std::uniform_real_distribution<double> uniform(-1, 1);
    for (std::int64_t i = 0; i < elements; ++i) store(type, buffers.back().get(), i, uniform(random));
    return buffers.back().get();
  }

  // A GEMM with operands stored as op() says, leading dimensions padded by `pad`.
  void add(GemmType type, GemmType c_type, bool tf, bool ts, std::int64_t m, std::int64_t n, std::int64_t k,
           double alpha, double beta, std::int64_t pad = 0) {
    const std::int64_t ldf = (tf ? ld_k : m) + pad, lds = (ts ? ld_n : ld_k) + pad, ldc = m + pad;
    const void* first = random_buffer(type, ldf * (tf ? m : k));
    const void* second = random_buffer(type, lds * (ts ? k : n));
    void* c = random_buffer(c_type, ldc * n);
    buffers.emplace_back(new char[static_cast<std::size_t>(ldc * n * bytes_of(c_type))]);
    std::memcpy(buffers.back().get(), c, static_cast<std::size_t>(ldc * n * bytes_of(c_type)));
    gemms.push_back({tf, ts, m, n, k, alpha, beta, first, second, c, ldf, lds, ldc, type, c_type});
    batched.push_back(gemms.back());
    batched.back().c = buffers.back().get();
  }

  // Runs the GEMMs whole and through uniform_batches; returns the batches.
  std::vector<GemmBatch> run(std::vector<RecordedGemm>& rest) {
    for (const RecordedGemm& g : gemms) execute(g);
    const std::vector<GemmBatch> batches = uniform_batches(batched, rest);
    for (const GemmBatch& b : batches) execute(b);
    for (const RecordedGemm& g : rest) execute(g);
    return batches;
  }

  // Largest |whole − batched| over every C, relative to the largest |whole|.
  double difference() const {
    double worst = 0, scale = 0;
    for (std::size_t g = 0; g < gemms.size(); ++g)
      for (std::int64_t i = 0; i < gemms[g].ld_c * gemms[g].n; ++i) {
        const double whole = load(gemms[g].c_type, gemms[g].c, i), cut = load(gemms[g].c_type, batched[g].c, i);
        worst = std::max(worst, std::abs(whole - cut));
        scale = std::max(scale, std::abs(whole));
      }
    return worst / scale;
  }
};

std::size_t products(const std::vector<GemmBatch>& batches) {
  std::size_t count = 0;
  for (const GemmBatch& b : batches) count += b.c.size();
  return count;
}

}  // namespace

TEST(GemmBatches, RowCountsCutIntoPowersOfTwoGiveTheSameBits) {
  // The expert forward (C's rows = the expert's rows vary) and the dx product (op(first) transposed),
  // padded leading dimensions, one expert above the 1024-row piece cap.
  for (const GemmType type : {GemmType::f32, GemmType::f64, GemmType::bf16}) {
    Workload w(1500, 6);
    for (const std::int64_t rows : {1, 3, 17, 40, 1500}) w.add(type, type, false, false, 5, rows, 6, 0.5, 0.0, 2);
    for (const std::int64_t rows : {2, 64, 33}) w.add(type, type, true, false, 4, rows, 3, 1.0, 0.25, 1);
    for (const std::int64_t rows : {5, 300}) w.add(type, type, false, true, 3, rows, 5, 1.0, 0.0);
    std::vector<RecordedGemm> rest;
    const auto batches = w.run(rest);
    EXPECT_TRUE(rest.empty());
    EXPECT_EQ(w.difference(), 0.0);
    // 1500 = 1024 + 256 + 128 + 64 + 16 + 8 + 4 and the others' digits: one batch per piece size
    // and family.
    EXPECT_LE(batches.size(), 10u + 4u + 5u);
    for (const GemmBatch& b : batches) {
      EXPECT_EQ(b.n & (b.n - 1), 0) << "piece of " << b.n << " rows";
      EXPECT_LE(b.n, 1024);
    }
  }
}

TEST(GemmBatches, InnerDimensionCutsAddIntoCInRounds) {
  // dW: C fixed, the inner dimension (the expert's rows) varies, beta ≠ 1 so that a piece summed
  // out of order would show; float C from bfloat16 operands as the bf16 weight gradient has it.
  for (const auto& [type, c_type] : {std::pair{GemmType::f32, GemmType::f32}, std::pair{GemmType::bf16, GemmType::f32},
                                     std::pair{GemmType::f64, GemmType::f64}}) {
    for (const bool tf : {false, true}) {
      Workload w(4, 5000);
      for (const std::int64_t rows : {1, 7, 100, 5000}) w.add(type, c_type, tf, !tf, 3, 4, rows, 1.0, 0.5, 1);
      std::vector<RecordedGemm> rest;
      const auto batches = w.run(rest);
      EXPECT_TRUE(rest.empty());
      EXPECT_LT(w.difference(), c_type == GemmType::f64 ? 1e-13 : 1e-5);
      // Each C is written by at most one product of a batch (no two pieces of one GEMM race).
      for (const GemmBatch& b : batches) {
        std::vector<void*> cs = b.c;
        std::sort(cs.begin(), cs.end());
        EXPECT_EQ(std::adjacent_find(cs.begin(), cs.end()), cs.end());
        EXPECT_EQ(b.k & (b.k - 1), 0);
      }
      // 5000 = 4096 + 512 + 256 + 128 + 8: five rounds.
      EXPECT_EQ(products(batches), 1u + 3u + 3u + 5u);
    }
  }
}

TEST(GemmBatches, SameShapesStayWholeInOneBatch) {
  Workload w(2000, 16);
  for (int head = 0; head < 6; ++head) w.add(GemmType::f32, GemmType::f32, true, false, 8, 2000, 16, 1.0, 0.0);
  std::vector<RecordedGemm> rest;
  const auto batches = w.run(rest);
  ASSERT_EQ(batches.size(), 1u);
  EXPECT_EQ(batches[0].c.size(), 6u);
  EXPECT_EQ(batches[0].n, 2000);
  EXPECT_EQ(w.difference(), 0.0);
}

TEST(GemmBatches, WhatCannotBeBatchedIsLeftWhole) {
  Workload w(5, 20);
  // bfloat16 C with varying inner dimensions: a cut would round C once per piece.
  w.add(GemmType::bf16, GemmType::bf16, false, true, 4, 4, 10, 1.0, 0.0);
  w.add(GemmType::bf16, GemmType::bf16, false, true, 4, 4, 20, 1.0, 0.0);
  // A GEMM alone in its family, and two differing in both n and k.
  w.add(GemmType::f32, GemmType::f32, false, false, 9, 5, 5, 1.0, 0.0);
  w.add(GemmType::f64, GemmType::f64, false, false, 2, 3, 4, 1.0, 0.0);
  w.add(GemmType::f64, GemmType::f64, false, false, 2, 5, 6, 1.0, 0.0);
  std::vector<RecordedGemm> rest;
  const auto batches = w.run(rest);
  EXPECT_TRUE(batches.empty());
  EXPECT_EQ(rest.size(), 5u);
  EXPECT_EQ(w.difference(), 0.0);
}
