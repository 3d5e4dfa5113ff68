#include "kmoe/ops/impl/grouped_gemm_bf16.hpp"

#include <cstdint>
#include <cstring>
#include <mutex>
#include <type_traits>

#include "kmoe/core/error.hpp"
#include "kmoe/core/tensor.hpp"

#if defined(KOKKOS_ENABLE_CUDA)
#include <cuda_runtime.h>
#include <mma.h>
#endif

namespace kmoe::ops::impl {

#if defined(KOKKOS_ENABLE_CUDA)

namespace {

constexpr int tile_m = 128, tile_n = 128, tile_k = 32, threads = 256;
// Shared tiles keep the operand's global layout, so that every copy is a 16-byte vector: an operand
// stored with k contiguous ([outer][k]: A not transposed, B transposed) as [128][32 + pad], one with
// the outer dimension contiguous ([k][outer]) as [32][128 + pad]; the fragments read them row- or
// column-major. The pad spreads rows over the banks and keeps rows 16-byte aligned.
constexpr int pad = 8;
constexpr int kc_ld = tile_k + pad, oc_ld = tile_m + pad;
constexpr int tile_elements = tile_m * kc_ld;  // ≥ tile_k * oc_ld: a stage holds either layout
static_assert(tile_k * oc_ld <= tile_elements, "a stage holds either layout");
constexpr int vectors_per_thread = tile_m * tile_k / 8 / threads;  // 2 vectors of 8 per operand

// One problem as the kernel reads it (plain data, copied to the device per launch).
struct DeviceProblem {
  std::int64_t m, n, k, lda, ldb, ldc;
  const __nv_bfloat16* a;
  const __nv_bfloat16* b;
  __nv_bfloat16* c;
  float alpha, beta;
  std::int32_t transpose_a, transpose_b;
  std::int64_t tile_begin;  // the first block of this problem in the grid
  std::int64_t tiles_n;     // column tiles
};

__device__ inline void cp_async_16(void* shared, const void* global, int source_bytes) {
  // Copies source_bytes (0..16) and zero-fills the rest of the 16: the tile edges need no branch.
  const auto address = static_cast<unsigned>(__cvta_generic_to_shared(shared));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(address), "l"(global), "r"(source_bytes));
}
__device__ inline void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int pending>
__device__ inline void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(pending));
}

// Copies one operand's 128 × 32 slice into a shared tile, 8 elements a copy. With 16-byte aligned
// rows (ld a multiple of 8, an aligned base) the copies are asynchronous (cp.async, zero-filled
// past the matrix); otherwise (ST-MoE's hidden 1365, say) they go through registers.
template <bool k_contiguous>
struct SliceLoader {
  const __nv_bfloat16* base;
  std::int64_t ld, outer0, outer_size, k_size;
  bool vectors;

  __device__ void init(const __nv_bfloat16* base_, std::int64_t ld_, std::int64_t outer0_, std::int64_t outer_size_,
                       std::int64_t k_size_) {
    base = base_;
    ld = ld_;
    outer0 = outer0_;
    outer_size = outer_size_;
    k_size = k_size_;
    vectors = ld % 8 == 0 && reinterpret_cast<std::uintptr_t>(base) % 16 == 0;
  }
  __device__ void load(__nv_bfloat16* tile, std::int64_t k0) const {
#pragma unroll
    for (int e = 0; e < vectors_per_thread; ++e) {
      const int v = threadIdx.x + threads * e;
      // The vector's first element in the tile: [128][32] has 4 vectors a row, [32][128] 16.
      const int outer = k_contiguous ? v / 4 : (v % 16) * 8, kk = k_contiguous ? (v % 4) * 8 : v / 16;
      __nv_bfloat16* to = k_contiguous ? tile + outer * kc_ld + kk : tile + kk * oc_ld + outer;
      const std::int64_t go = outer0 + outer, gk = k0 + kk;
      const std::int64_t along = k_contiguous ? k_size - gk : outer_size - go;  // left in the contiguous direction
      const bool row_inside = k_contiguous ? go < outer_size : gk < k_size;
      const int valid = row_inside ? static_cast<int>(along < 0 ? 0 : along > 8 ? 8 : along) : 0;
      const __nv_bfloat16* from = k_contiguous ? base + go * ld + gk : base + gk * ld + go;
      if (vectors) {
        cp_async_16(to, valid > 0 ? from : base, 2 * valid);
      } else {
        __align__(16) __nv_bfloat16 values[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) values[i] = i < valid ? from[i] : __float2bfloat16(0.f);
        *reinterpret_cast<uint4*>(to) = *reinterpret_cast<const uint4*>(values);
      }
    }
  }
};

// Every output tile of every problem in one grid; op(A) is A (TA false) or Aᵀ, op(B) likewise.
// Two shared stages: the next K slice copies while the current one multiplies.
template <bool TA, bool TB>
__global__ void __launch_bounds__(threads, 2) grouped_gemm_kernel(const DeviceProblem* problems, int count) {
  using namespace nvcuda;
  // [stage][operand][tile]; after the main loop, the epilogue's per-warp staging.
  __shared__ __align__(128) __nv_bfloat16 tiles[2][2][tile_elements];

  // The problem of this block: the last whose first tile is at or before it.
  const std::int64_t block = blockIdx.x;
  int lo = 0, hi = count - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (problems[mid].tile_begin <= block)
      lo = mid;
    else
      hi = mid - 1;
  }
  const DeviceProblem& p = problems[lo];
  const std::int64_t local = block - p.tile_begin;
  const std::int64_t row0 = (local / p.tiles_n) * tile_m, col0 = (local % p.tiles_n) * tile_n;
  const std::int64_t m = p.m, n = p.n, k = p.k, ldc = p.ldc;
  const float alpha = p.alpha, beta = p.beta;
  __nv_bfloat16* const c = p.c;

  SliceLoader<!TA> a_loader;  // A stored [m][k] has k contiguous
  SliceLoader<TB> b_loader;   // B stored [n][k] (transposed) has k contiguous
  a_loader.init(p.a, p.lda, row0, m, k);
  b_loader.init(p.b, p.ldb, col0, n, k);

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int warp_row = (warp / 4) * 64, warp_col = (warp % 4) * 32;  // 2 × 4 warps, 64 × 32 each
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[4][2];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);

  using ALayout = std::conditional_t<TA, wmma::col_major, wmma::row_major>;
  using BLayout = std::conditional_t<TB, wmma::col_major, wmma::row_major>;
  const std::int64_t slices = (k + tile_k - 1) / tile_k;
  if (slices > 0) {
    a_loader.load(tiles[0][0], 0);
    b_loader.load(tiles[0][1], 0);
    cp_async_commit();
  }
  for (std::int64_t s = 0; s < slices; ++s) {
    if (s + 1 < slices) {
      a_loader.load(tiles[(s + 1) % 2][0], (s + 1) * tile_k);
      b_loader.load(tiles[(s + 1) % 2][1], (s + 1) * tile_k);
      cp_async_commit();
      cp_async_wait<1>();  // this slice's copies are done, the next one's may still fly
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const __nv_bfloat16* a_tile = tiles[s % 2][0];
    const __nv_bfloat16* b_tile = tiles[s % 2][1];
#pragma unroll
    for (int kk = 0; kk < tile_k; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, ALayout> a_frag[4];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, BLayout> b_frag[2];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int row = warp_row + 16 * i;
        if constexpr (TA)
          wmma::load_matrix_sync(a_frag[i], a_tile + kk * oc_ld + row, oc_ld);
        else
          wmma::load_matrix_sync(a_frag[i], a_tile + row * kc_ld + kk, kc_ld);
      }
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int col = warp_col + 16 * j;
        if constexpr (TB)
          wmma::load_matrix_sync(b_frag[j], b_tile + col * kc_ld + kk, kc_ld);
        else
          wmma::load_matrix_sync(b_frag[j], b_tile + kk * oc_ld + col, oc_ld);
      }
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a_frag[i], b_frag[j], acc[i][j]);
    }
    __syncthreads();  // the stage is read before the iteration after next overwrites it
  }

  // Epilogue, a fragment at a time through the warp's staging block (the stages' memory, free
  // now): C = alpha · acc + beta · C.
  float* stage = reinterpret_cast<float*>(&tiles[0][0][0]) + warp * 256;
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      wmma::store_matrix_sync(stage, acc[i][j], 16, wmma::mem_row_major);
      __syncwarp();
      for (int e = lane; e < 256; e += 32) {
        const std::int64_t row = row0 + warp_row + 16 * i + e / 16, col = col0 + warp_col + 16 * j + e % 16;
        if (row < m && col < n) {
          __nv_bfloat16* out = c + row * ldc + col;
          const float previous = beta != 0.f ? __bfloat162float(*out) : 0.f;
          *out = __float2bfloat16(alpha * stage[e] + beta * previous);
        }
      }
      __syncwarp();
    }
}

void check(cudaError_t error, const char* what) {
  require(error == cudaSuccess, Status::internal, "grouped_gemm_bf16: ", what, ": ", cudaGetErrorString(error));
}

}  // namespace

Tensor<std::int64_t> upload_words(const std::vector<std::int64_t>& words) {
  // A ring of pinned staging buffers; one is reused only after the event of its previous copy
  // (32 uploads back) has passed.
  struct Slot {
    void* host = nullptr;
    std::size_t capacity = 0;
    cudaEvent_t done = nullptr;
  };
  static std::mutex mutex;
  static Slot ring[32];  // live as long as the process (the CUDA runtime may be gone at exit)
  static int next = 0;
  const std::lock_guard<std::mutex> lock(mutex);
  Slot& slot = ring[next];
  next = (next + 1) % 32;
  const std::size_t bytes = words.size() * sizeof(std::int64_t);
  if (slot.done != nullptr) check(cudaEventSynchronize(slot.done), "cudaEventSynchronize");
  if (slot.capacity < bytes) {
    if (slot.host != nullptr) check(cudaFreeHost(slot.host), "cudaFreeHost");
    slot.host = nullptr;
    check(cudaMallocHost(&slot.host, bytes), "cudaMallocHost");
    slot.capacity = bytes;
  }
  if (slot.done == nullptr) check(cudaEventCreateWithFlags(&slot.done, cudaEventDisableTiming), "cudaEventCreate");
  std::memcpy(slot.host, words.data(), bytes);
  // A block of the caching allocator: released into the pool, not cudaFree'd, so no sync; a later
  // kernel that reuses it runs after the launch that read it, in stream order.
  auto device = Tensor<std::int64_t>::uninitialized("kmoe::uploaded_words", {static_cast<index_t>(words.size())});
  const cudaStream_t stream = ExecSpace().cuda_stream();
  check(cudaMemcpyAsync(device.data(), slot.host, bytes, cudaMemcpyHostToDevice, stream), "cudaMemcpyAsync");
  check(cudaEventRecord(slot.done, stream), "cudaEventRecord");
  return device;
}

void grouped_gemm_bf16(const std::vector<GroupedProblem>& problems) {
  // One launch per transposition (its problems consecutive in the table, tiles
  // counted from 0).
  struct Launch {
    bool transpose_a, transpose_b;
    int first = 0, count = 0;
    std::int64_t tiles = 0;
  };
  std::vector<Launch> launches;
  for (const bool ta : {false, true})
    for (const bool tb : {false, true}) launches.push_back({ta, tb});
  std::vector<DeviceProblem> table;
  std::int64_t all_tiles = 0;
  for (Launch& l : launches) {
    l.first = static_cast<int>(table.size());
    for (const GroupedProblem& g : problems) {
      if (g.m == 0 || g.n == 0 || g.transpose_a != l.transpose_a || g.transpose_b != l.transpose_b) continue;
      std::int64_t& tiles = l.tiles;
      DeviceProblem d;
      d.m = g.m;
      d.n = g.n;
      d.k = g.k;
      d.lda = g.lda;
      d.ldb = g.ldb;
      d.ldc = g.ldc;
      d.a = reinterpret_cast<const __nv_bfloat16*>(g.a);
      d.b = reinterpret_cast<const __nv_bfloat16*>(g.b);
      d.c = reinterpret_cast<__nv_bfloat16*>(g.c);
      d.alpha = g.alpha;
      d.beta = g.beta;
      d.transpose_a = g.transpose_a;
      d.transpose_b = g.transpose_b;
      d.tile_begin = tiles;
      d.tiles_n = (g.n + tile_n - 1) / tile_n;
      tiles += ((g.m + tile_m - 1) / tile_m) * d.tiles_n;
      table.push_back(d);
    }
    l.count = static_cast<int>(table.size()) - l.first;
    require(l.tiles < (std::int64_t(1) << 31), Status::invalid_argument, "grouped_gemm_bf16: ", l.tiles,
            " output tiles exceed one grid");
    all_tiles += l.tiles;
  }
  if (all_tiles == 0) return;
  static_assert(sizeof(DeviceProblem) % sizeof(std::int64_t) == 0, "the table is copied as 64-bit words");
  std::vector<std::int64_t> words(table.size() * sizeof(DeviceProblem) / sizeof(std::int64_t));
  std::memcpy(words.data(), table.data(), words.size() * sizeof(std::int64_t));
  const Tensor<std::int64_t> device_table = upload_words(words);
  const cudaStream_t stream = ExecSpace().cuda_stream();
  const auto* device_problems = reinterpret_cast<const DeviceProblem*>(device_table.data());
  for (const Launch& l : launches) {
    if (l.tiles == 0) continue;
    const dim3 grid(static_cast<unsigned>(l.tiles));
    const DeviceProblem* first = device_problems + l.first;
    if (!l.transpose_a && !l.transpose_b)
      grouped_gemm_kernel<false, false><<<grid, threads, 0, stream>>>(first, l.count);
    if (!l.transpose_a && l.transpose_b) grouped_gemm_kernel<false, true><<<grid, threads, 0, stream>>>(first, l.count);
    if (l.transpose_a && !l.transpose_b) grouped_gemm_kernel<true, false><<<grid, threads, 0, stream>>>(first, l.count);
    if (l.transpose_a && l.transpose_b) grouped_gemm_kernel<true, true><<<grid, threads, 0, stream>>>(first, l.count);
    check(cudaGetLastError(), "launch");
  }
}

#endif

}  // namespace kmoe::ops::impl
