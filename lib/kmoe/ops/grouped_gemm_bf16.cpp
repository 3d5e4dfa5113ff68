#include "kmoe/ops/impl/grouped_gemm_bf16.hpp"

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>

#include "kmoe/core/error.hpp"
#include "kmoe/core/tensor.hpp"

#if defined(KOKKOS_ENABLE_CUDA)
#include <cuda_runtime.h>
#include <mma.h>
#endif

namespace kmoe::ops::impl {

bool use_kmoe_grouped_gemm() {
  static const bool kmoe = [] {
    const char* choice = std::getenv("KMOE_GROUPED_GEMM");
    return choice != nullptr && std::string(choice) == "kmoe";
  }();
  return kmoe;
}

#if defined(KOKKOS_ENABLE_CUDA)

namespace {

constexpr int tile_m = 128, tile_n = 128, tile_k = 32, threads = 256;
constexpr int pad = 8;  // bf16 elements of row padding in shared memory (bank
                        // spread, 16-byte rows)
constexpr int a_ld = tile_k + pad, b_ld = tile_n + pad;
constexpr int loads_per_thread = tile_m * tile_k / threads;  // 16, the same for the B tile

// One problem as the kernel reads it (plain data, copied to the device per
// launch).
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

// Loads one operand's tile slices from global memory. Thread t takes
// loads_per_thread elements, chosen so that a warp reads 32 consecutive
// elements of the operand's contiguous dimension; out of range elements read as
// 0. `contiguous_is_k`: the operand's rows run along k (A not transposed, B
// transposed), so a warp covers 32 k values of one row of the tile's 128 and
// the thread's rows step by 8; otherwise a warp covers 32 of the tile's 128
// rows/columns along the contiguous dimension and the thread's k values step
// by 2.
template <bool contiguous_is_k>
struct TileLoader {
  const __nv_bfloat16* ptr;  // the thread's first element of the current slice
  std::int64_t ld;
  int fixed;                // its position along the tile's 128 (contiguous_is_k: along k)
  std::int64_t outer_left;  // rows (128-direction) left in the matrix from the
                            // thread's first
  std::int64_t k_left;      // k values left from the slice's start

  __device__ void init(const __nv_bfloat16* base, std::int64_t ld_, std::int64_t outer0, std::int64_t outer_size,
                       std::int64_t k_size) {
    const int t = threadIdx.x;
    ld = ld_;
    k_left = k_size;
    if (contiguous_is_k) {  // stored [outer][k]
      fixed = t % tile_k;
      ptr = base + (outer0 + t / tile_k) * ld + fixed;
      outer_left = outer_size - outer0 - t / tile_k;
    } else {  // stored [k][outer]
      fixed = t % tile_m;
      ptr = base + (t / tile_m) * ld + outer0 + fixed;
      outer_left = outer_size - outer0 - fixed;
    }
  }
  __device__ void fetch(__nv_bfloat16 (&values)[loads_per_thread]) const {
    const int t = threadIdx.x;
#pragma unroll
    for (int e = 0; e < loads_per_thread; ++e) {
      bool inside;
      const __nv_bfloat16* q;
      if (contiguous_is_k) {  // row t / 32 + 8e, k t % 32
        inside = 8 * e < outer_left && fixed < k_left;
        q = ptr + 8 * e * ld;
      } else {  // k t / 128 + 2e, row t % 128
        inside = outer_left > 0 && t / tile_m + 2 * e < k_left;
        q = ptr + 2 * e * ld;
      }
      values[e] = inside ? *q : __float2bfloat16(0.f);
    }
  }
  __device__ void advance() {
    ptr += contiguous_is_k ? tile_k : tile_k * ld;
    k_left -= tile_k;
  }
  // The slot of value e in a shared tile stored [outer 128][k] (k_major) or
  // [k][outer 128].
  __device__ static int slot(int e, bool k_major, int ld_tile) {
    const int t = threadIdx.x;
    const int outer = contiguous_is_k ? t / tile_k + 8 * e : t % tile_m;
    const int kk = contiguous_is_k ? t % tile_k : t / tile_m + 2 * e;
    return k_major ? outer * ld_tile + kk : kk * ld_tile + outer;
  }
};

// Every output tile of every problem in one grid; op(A) is A (TA false) or Aᵀ,
// op(B) likewise.
template <bool TA, bool TB>
__global__ void __launch_bounds__(threads, 2) grouped_gemm_kernel(const DeviceProblem* problems, int count) {
  using namespace nvcuda;
  __shared__ __align__(128) __nv_bfloat16 a_tile[tile_m * a_ld];  // [m 128][k 32 + pad]
  __shared__ __align__(128) __nv_bfloat16 b_tile[tile_k * b_ld];  // [k 32][n 128 + pad]
  __shared__ __align__(128) float staging[8][16 * 16];

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

  TileLoader<!TA> a_loader;  // A stored [m][k] has its rows along k
  TileLoader<TB> b_loader;   // B stored [n][k] (transposed) has its rows along k
  a_loader.init(p.a, p.lda, row0, m, k);
  b_loader.init(p.b, p.ldb, col0, n, k);

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int warp_row = (warp / 4) * 64,
            warp_col = (warp % 4) * 32;  // 2 × 4 warps, 64 × 32 each
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[4][2];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);

  __nv_bfloat16 a_next[loads_per_thread], b_next[loads_per_thread];
  const auto store = [&]() {
#pragma unroll
    for (int e = 0; e < loads_per_thread; ++e) {
      a_tile[TileLoader<!TA>::slot(e, true, a_ld)] = a_next[e];
      b_tile[TileLoader<TB>::slot(e, false, b_ld)] = b_next[e];
    }
  };

  const std::int64_t slices = (k + tile_k - 1) / tile_k;
  if (slices > 0) {
    a_loader.fetch(a_next);
    b_loader.fetch(b_next);
    store();
    __syncthreads();
  }
  for (std::int64_t s = 0; s < slices; ++s) {
    if (s + 1 < slices) {  // the next slice in flight while this one multiplies
      a_loader.advance();
      b_loader.advance();
      a_loader.fetch(a_next);
      b_loader.fetch(b_next);
    }
#pragma unroll
    for (int kk = 0; kk < tile_k; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> a_frag[4];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::row_major> b_frag[2];
#pragma unroll
      for (int i = 0; i < 4; ++i) wmma::load_matrix_sync(a_frag[i], a_tile + (warp_row + 16 * i) * a_ld + kk, a_ld);
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(b_frag[j], b_tile + kk * b_ld + warp_col + 16 * j, b_ld);
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a_frag[i], b_frag[j], acc[i][j]);
    }
    __syncthreads();
    if (s + 1 < slices) {
      store();
      __syncthreads();
    }
  }

  // Epilogue, a fragment at a time through the warp's staging block: C = alpha
  // · acc + beta · C.
  float* stage = staging[warp];
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
