#include "kmoe/ops/gemm.hpp"

#include "kmoe/core/error.hpp"
#include "kmoe/core/profile_region.hpp"
#include "kmoe/core/tensor.hpp"
#include "kmoe/ops/impl/gemm_batches.hpp"
#include "kmoe/ops/impl/grouped_gemm_bf16.hpp"

#include <KokkosBlas3_gemm.hpp>
#if defined(KOKKOSKERNELS_ENABLE_TPL_BLAS)
#include <KokkosBlas_Host_tpl.hpp>
#endif

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <string>
#include <vector>

#if defined(KOKKOS_ENABLE_CUDA) && defined(KOKKOSKERNELS_ENABLE_TPL_CUBLAS)
#include <KokkosBlas_tpl_spec.hpp>
#include <cublas_v2.h>
#include <cuda_runtime.h>
// cublas<t>gemmGroupedBatched arrived in cuBLAS 12.5.
#if CUBLAS_VERSION >= 120500
#define KMOE_GROUPED_CUBLAS 1
#endif
#endif

#if defined(KOKKOSKERNELS_ENABLE_TPL_BLAS)
// OpenBLAS's thread control, looked up weakly: null when the BLAS in use is not OpenBLAS.
extern "C" {
void openblas_set_num_threads(int threads) __attribute__((weak));
int openblas_get_num_threads(void) __attribute__((weak));
}
#endif

namespace kmoe::ops {

namespace impl {

// Set while a SingleThreadedBlas is alive: the BLAS then always takes its single-threaded driver,
// whose blocking is fixed, so no inner-dimension split is needed for reproducibility.
std::atomic<bool> blas_single_threaded{false};

// The BLAS thread count is process-wide: the first holder of a SingleThreadedBlas (on any host
// thread) saves it and sets one thread, the last one restores it, so that holders on several
// host threads never leave the caller's setting changed.
std::mutex& blas_policy_mutex() {
  static std::mutex m;
  return m;
}
int blas_policy_holders = 0;
int blas_saved_threads = 0;

SingleThreadedBlas::SingleThreadedBlas() {
#if defined(KOKKOSKERNELS_ENABLE_TPL_BLAS)
  if (Kokkos::SpaceAccessibility<HostSpace, MemSpace>::accessible && openblas_set_num_threads != nullptr &&
      openblas_get_num_threads != nullptr) {
    const std::lock_guard<std::mutex> lock(blas_policy_mutex());
    if (blas_policy_holders++ == 0) {
      blas_saved_threads = openblas_get_num_threads();
      openblas_set_num_threads(1);
      blas_single_threaded = true;
    }
    previous_threads_ = blas_saved_threads;
  }
#endif
}

SingleThreadedBlas::~SingleThreadedBlas() {
#if defined(KOKKOSKERNELS_ENABLE_TPL_BLAS)
  if (previous_threads_ > 0) {
    const std::lock_guard<std::mutex> lock(blas_policy_mutex());
    if (--blas_policy_holders == 0) {
      openblas_set_num_threads(blas_saved_threads);
      blas_single_threaded = false;
    }
  }
#endif
}

#if defined(KOKKOSKERNELS_ENABLE_TPL_BLAS)
// A host BLAS may block a long inner dimension differently in its single- and multi-threaded
// drivers (OpenBLAS 0.3.21 does from about 400 on), so the rounding would change with the thread
// count. Handing it inner blocks no longer than this keeps every call one block in either driver:
// results are bit-identical for any thread count. cuBLAS gives the same bits at any size.
constexpr index_t host_blas_inner_block = 128;

// Host path: the BLAS that Kokkos Kernels' TPL links, called with leading dimensions so that an
// inner block of a row-major matrix is a pointer offset, not a copy. Row-major C = op(A)·op(B) is
// column-major Cᵀ = op(B)ᵀ·op(A)ᵀ, hence B before A.
template <class T>
void host_blas_gemm(bool transpose_a, bool transpose_b, index_t m, index_t n, index_t k, T alpha,
                    const View2<const T>& a, const View2<const T>& b, T beta, const View2<T>& c) {
  const int lda = static_cast<int>(a.stride(0)), ldb = static_cast<int>(b.stride(0));
  const int ldc = static_cast<int>(c.stride(0));
  const index_t block = blas_single_threaded ? k : host_blas_inner_block;
  for (index_t k0 = 0; k0 < k; k0 += block) {
    const int kb = static_cast<int>(std::min(block, k - k0));
    const T* a_block = a.data() + (transpose_a ? k0 * lda : k0);
    const T* b_block = b.data() + (transpose_b ? k0 : k0 * ldb);
    KokkosBlas::Impl::HostBlas<T>::gemm(transpose_b ? 'T' : 'N', transpose_a ? 'T' : 'N', static_cast<int>(n),
                                        static_cast<int>(m), kb, alpha, b_block, ldb, a_block, lda,
                                        k0 == 0 ? beta : T(1), c.data(), ldc);
  }
}
#endif

#if defined(KOKKOS_ENABLE_CUDA) && defined(KOKKOSKERNELS_ENABLE_TPL_CUBLAS)
// Kokkos Kernels' cuBLAS handle, bound to the stream of kmoe's execution space before every use:
// Kokkos Kernels 3.4 never sets a stream, so its calls and kmoe's kernels were ordered only
// because both happened to use the default stream.
cublasHandle_t bound_cublas_handle() {
  cublasHandle_t handle = KokkosBlas::Impl::CudaBlasSingleton::singleton().handle;
  const cublasStatus_t status = cublasSetStream(handle, ExecSpace().cuda_stream());
  require(status == CUBLAS_STATUS_SUCCESS, Status::invalid_argument, "gemm: cublasSetStream failed with status ",
          static_cast<int>(status));
  return handle;
}

cudaDataType cuda_type_of(GemmType type) {
  return type == GemmType::f64 ? CUDA_R_64F : type == GemmType::f32 ? CUDA_R_32F : CUDA_R_16BF;
}

void require_cublas(cublasStatus_t status, const char* what, std::int64_t count) {
  require(status == CUBLAS_STATUS_SUCCESS, Status::invalid_argument, "gemm: cuBLAS ", what, " of ", count,
          " products failed with status ", static_cast<int>(status));
}
#endif


template <class T>
constexpr GemmType gemm_type_of() {
  if constexpr (std::is_same_v<T, double>) return GemmType::f64;
  else if constexpr (std::is_same_v<T, bfloat16>) return GemmType::bf16;
  else return GemmType::f32;
}

// The GEMMs recorded by the live GroupedGemms (device builds with cuBLAS only).
struct GemmRecording {
  bool active = false;
  std::vector<RecordedGemm> gemms;
};

// Per host thread: a group records the GEMMs of the thread that opened it, never another's.
GemmRecording& recording() {
  thread_local GemmRecording instance;
  return instance;
}

GroupedGemms::GroupedGemms() {
#if defined(KMOE_GROUPED_CUBLAS)
  require(!recording().active, Status::invalid_argument, "GroupedGemms: groups do not nest");
  recording().active = true;
  recording().gemms.clear();
#endif
}

GroupedGemms::~GroupedGemms() {
#if defined(KMOE_GROUPED_CUBLAS)
  recording().active = false;
  recording().gemms.clear();
#endif
}

#if defined(KMOE_GROUPED_CUBLAS)
// How a GroupedGemms issues its GEMMs (KMOE_GROUPED_GEMM, read once): `grouped` (the default) hands
// them whole to cuBLAS's grouped GEMM, one group each, except the shapes that ran faster as uniform
// batches (see GroupedGemms::run); `batched` cuts them all into a few uniform batched cuBLAS calls
// (impl/gemm_batches.hpp); `kmoe` runs the bfloat16 ones through kmoe's own grouped kernel
// (impl/grouped_gemm_bf16.hpp) and batches the rest.
enum class GroupedGemmMode { batched, grouped, kmoe };

GroupedGemmMode grouped_gemm_mode() {
  static const GroupedGemmMode mode = [] {
    const char* choice = std::getenv("KMOE_GROUPED_GEMM");
    const std::string name = choice == nullptr ? "grouped" : choice;
    require(name == "batched" || name == "grouped" || name == "kmoe", Status::invalid_argument,
            "KMOE_GROUPED_GEMM=", name, ": expected batched, grouped or kmoe");
    return name == "batched" ? GroupedGemmMode::batched
           : name == "kmoe"  ? GroupedGemmMode::kmoe
                             : GroupedGemmMode::grouped;
  }();
  return mode;
}

// One cuBLAS batched call per batch, the operand pointer arrays of all of them uploaded at once.
// float and double take cublas<t>gemmBatched; bfloat16 operands cublasGemmBatchedEx (float
// scales, float accumulation, bfloat16 or float C).
void run_batches(const std::vector<GemmBatch>& batches) {
  if (batches.empty()) return;
  std::vector<std::int64_t> words;  // every batch's first and second pointers, then every batch's C pointers
  for (const GemmBatch& b : batches)
    for (const auto* list : {&b.first, &b.second})
      for (const void* p : *list) words.push_back(reinterpret_cast<std::int64_t>(p));
  const std::size_t c_start = words.size();
  for (const GemmBatch& b : batches)
    for (void* p : b.c) words.push_back(reinterpret_cast<std::int64_t>(p));
  // From the caching allocator: a later kernel that reuses the block runs after these calls in
  // stream order.
  const auto device_words = upload_words(words);
  const std::int64_t* operand_words = device_words.data();
  const std::int64_t* c_words = device_words.data() + c_start;
  cublasHandle_t handle = bound_cublas_handle();
  for (const GemmBatch& b : batches) {
    const std::int64_t count = static_cast<std::int64_t>(b.c.size());
    const auto* first = reinterpret_cast<const void* const*>(operand_words);
    const auto* second = reinterpret_cast<const void* const*>(operand_words + count);
    auto* const* c = reinterpret_cast<void* const*>(c_words);
    operand_words += 2 * count;
    c_words += count;
    const cublasOperation_t op_first = b.transpose_first ? CUBLAS_OP_T : CUBLAS_OP_N;
    const cublasOperation_t op_second = b.transpose_second ? CUBLAS_OP_T : CUBLAS_OP_N;
    cublasStatus_t status;
    if (b.type == GemmType::f64) {
      const double alpha = b.alpha, beta = b.beta;
      status = cublasDgemmBatched_64(handle, op_first, op_second, b.m, b.n, b.k, &alpha,
                                     reinterpret_cast<const double* const*>(first), b.ld_first,
                                     reinterpret_cast<const double* const*>(second), b.ld_second, &beta,
                                     reinterpret_cast<double* const*>(c), b.ld_c, count);
    } else if (b.type == GemmType::f32) {
      const float alpha = static_cast<float>(b.alpha), beta = static_cast<float>(b.beta);
      status = cublasSgemmBatched_64(handle, op_first, op_second, b.m, b.n, b.k, &alpha,
                                     reinterpret_cast<const float* const*>(first), b.ld_first,
                                     reinterpret_cast<const float* const*>(second), b.ld_second, &beta,
                                     reinterpret_cast<float* const*>(c), b.ld_c, count);
    } else {
      const float alpha = static_cast<float>(b.alpha), beta = static_cast<float>(b.beta);
      status = cublasGemmBatchedEx_64(handle, op_first, op_second, b.m, b.n, b.k, &alpha, first, CUDA_R_16BF,
                                      b.ld_first, second, CUDA_R_16BF, b.ld_second, &beta, c, cuda_type_of(b.c_type),
                                      b.ld_c, count, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    }
    require_cublas(status, "batched GEMM", count);
  }
}

// Whether cuBLAS's grouped GEMM takes float C with bfloat16 operands (the weight gradients): asked
// once, by the first such call, since cuBLAS versions differ; a refused call launches nothing.
enum class Support { unknown, yes, no };
std::atomic<Support> grouped_float_c{Support::unknown};

// Issues the recorded GEMMs of operand type T and C type C as a single grouped batched cuBLAS call,
// each GEMM its own group of one. bfloat16 operands take cublasGemmGroupedBatchedEx (float scales,
// float accumulation, bfloat16 or float C). Returns false, having launched nothing, when cuBLAS
// refuses bfloat16 operands with float C.
template <class T, class C = T>
bool run_grouped(const std::vector<RecordedGemm>& all) {
  std::vector<const RecordedGemm*> gemms;
  for (const RecordedGemm& g : all)
    if (g.type == gemm_type_of<T>() && g.c_type == gemm_type_of<C>()) gemms.push_back(&g);
  const std::int64_t count = static_cast<std::int64_t>(gemms.size());
  if (count == 0) return true;
  std::vector<cublasOperation_t> op_first, op_second;
  std::vector<std::int64_t> m, n, k, ld_first, ld_second, ld_c, group_size(count, 1), pointers(3 * count);
  using Scale = std::conditional_t<std::is_same_v<T, bfloat16>, float, T>;
  std::vector<Scale> alpha, beta;
  for (std::int64_t i = 0; i < count; ++i) {
    const RecordedGemm& g = *gemms[i];
    op_first.push_back(g.transpose_first ? CUBLAS_OP_T : CUBLAS_OP_N);
    op_second.push_back(g.transpose_second ? CUBLAS_OP_T : CUBLAS_OP_N);
    m.push_back(g.m);
    n.push_back(g.n);
    k.push_back(g.k);
    ld_first.push_back(g.ld_first);
    ld_second.push_back(g.ld_second);
    ld_c.push_back(g.ld_c);
    alpha.push_back(static_cast<Scale>(g.alpha));
    beta.push_back(static_cast<Scale>(g.beta));
    pointers[i] = reinterpret_cast<std::int64_t>(g.first);
    pointers[count + i] = reinterpret_cast<std::int64_t>(g.second);
    pointers[2 * count + i] = reinterpret_cast<std::int64_t>(g.c);
  }
  const auto device_pointers = upload_words(pointers);
  const auto* first = reinterpret_cast<const T* const*>(device_pointers.data());
  const auto* second = reinterpret_cast<const T* const*>(device_pointers.data() + count);
  auto* const* c = reinterpret_cast<C* const*>(device_pointers.data() + 2 * count);
  cublasHandle_t handle = bound_cublas_handle();
  cublasStatus_t status;
  if constexpr (std::is_same_v<T, bfloat16>) {
    status = cublasGemmGroupedBatchedEx_64(
        handle, op_first.data(), op_second.data(), m.data(), n.data(), k.data(), alpha.data(),
        reinterpret_cast<const void* const*>(first), CUDA_R_16BF, ld_first.data(),
        reinterpret_cast<const void* const*>(second), CUDA_R_16BF, ld_second.data(), beta.data(),
        reinterpret_cast<void* const*>(c), std::is_same_v<C, float> ? CUDA_R_32F : CUDA_R_16BF, ld_c.data(), count,
        group_size.data(), CUBLAS_COMPUTE_32F);
    if constexpr (std::is_same_v<C, float>) {
      const bool refused = status == CUBLAS_STATUS_NOT_SUPPORTED || status == CUBLAS_STATUS_INVALID_VALUE;
      grouped_float_c = refused ? Support::no : Support::yes;
      if (refused) return false;
    }
  } else if constexpr (std::is_same_v<T, double>) {
    status = cublasDgemmGroupedBatched_64(handle, op_first.data(), op_second.data(), m.data(), n.data(), k.data(),
                                          alpha.data(), first, ld_first.data(), second, ld_second.data(), beta.data(),
                                          c, ld_c.data(), count, group_size.data());
  } else {
    status = cublasSgemmGroupedBatched_64(handle, op_first.data(), op_second.data(), m.data(), n.data(), k.data(),
                                          alpha.data(), first, ld_first.data(), second, ld_second.data(), beta.data(),
                                          c, ld_c.data(), count, group_size.data());
  }
  require_cublas(status, "grouped GEMM", count);
  return true;
}

// The recorded bfloat16 GEMMs with bfloat16 C through kmoe's own grouped tensor-core kernel
// (impl/grouped_gemm_bf16.hpp), back in row-major terms; the others are left in `rest`.
void run_grouped_kmoe_bf16(const std::vector<RecordedGemm>& all, std::vector<RecordedGemm>& rest) {
  std::vector<GroupedProblem> problems;
  for (const RecordedGemm& g : all) {
    if (g.type != GemmType::bf16 || g.c_type != GemmType::bf16) {
      rest.push_back(g);
      continue;
    }
    problems.push_back({g.transpose_second, g.transpose_first, g.n, g.m, g.k, static_cast<float>(g.alpha),
                        static_cast<float>(g.beta), static_cast<const bfloat16*>(g.second),
                        static_cast<const bfloat16*>(g.first), static_cast<bfloat16*>(g.c), g.ld_second, g.ld_first,
                        g.ld_c});
  }
  grouped_gemm_bf16(problems);
}
#endif

void GroupedGemms::run() {
#if defined(KMOE_GROUPED_CUBLAS)
  const ProfileRegion region("kmoe::expert_gemms");
  GemmRecording& r = recording();
  r.active = false;  // the GEMMs below are launched, not recorded
  const GroupedGemmMode mode = grouped_gemm_mode();
  std::vector<RecordedGemm> whole = std::move(r.gemms), rest;
  r.gemms.clear();
  if (mode == GroupedGemmMode::kmoe) {
    run_grouped_kmoe_bf16(whole, rest);
    whole = std::move(rest);
    rest.clear();
  }
  // In `grouped` mode float C from bfloat16 operands (the weight gradients) goes to the grouped call
  // too where cuBLAS takes it, else to uniform batches (a grouped call into bfloat16 products added
  // into the float C ran the σ-MoE backward 5 ms slower on an H100: apps/bench/gpu-notes.md).
  // Products with a short inner dimension and wide rows (k < m in cuBLAS's terms: σ-MoE's h·W2 and
  // dh·W1ᵀ, K 128 and N 1024) go to uniform batches too in bfloat16: on an H100 the grouped call
  // ran them at 117 TFLOP/s, the batches at 149 (apps/bench/gpu-notes.md); the others ran faster
  // grouped (240 against 160).
  std::vector<RecordedGemm> batchable, grouped_float_c_gemms;
  for (RecordedGemm& g : whole) {
    if (mode != GroupedGemmMode::grouped)
      batchable.push_back(std::move(g));
    else if (g.c_type != g.type)
      (grouped_float_c != Support::no ? grouped_float_c_gemms : batchable).push_back(std::move(g));
    else
      (g.type != GemmType::bf16 || g.k >= g.m ? rest : batchable).push_back(std::move(g));
  }
  if (!run_grouped<bfloat16, float>(grouped_float_c_gemms))
    for (RecordedGemm& g : grouped_float_c_gemms) batchable.push_back(std::move(g));
  run_batches(uniform_batches(batchable, rest));
  run_grouped<float>(rest);
  run_grouped<double>(rest);
  run_grouped<bfloat16>(rest);
  // Float C from bfloat16 operands that no batch took: one call each.
  std::vector<GemmBatch> mixed;
  for (const RecordedGemm& g : rest) {
    if (g.c_type == g.type) continue;
    mixed.push_back(GemmBatch{g.transpose_first, g.transpose_second, g.m, g.n, g.k, g.alpha, g.beta, g.ld_first,
                              g.ld_second, g.ld_c, g.type, g.c_type, {g.first}, {g.second}, {g.c}});
  }
  run_batches(mixed);
#endif
}

// Records the GEMM when a GroupedGemms is live (device builds with cuBLAS); false otherwise.
template <class T, class C = T>
bool record_gemm(bool transpose_a, bool transpose_b, index_t m, index_t n, index_t k, double alpha,
                 const View2<const T>& a, const View2<const T>& b, double beta, const View2<C>& c) {
  if (!recording().active) return false;
  recording().gemms.push_back({transpose_b, transpose_a, n, m, k, static_cast<double>(alpha),
                               static_cast<double>(beta), b.data(), a.data(), c.data(),
                               static_cast<std::int64_t>(b.stride(0)), static_cast<std::int64_t>(a.stride(0)),
                               static_cast<std::int64_t>(c.stride(0)), gemm_type_of<T>(), gemm_type_of<C>()});
  return true;
}

// m, n, k of C = op(A) · op(B), checked against C (Status::shape_mismatch).
template <class A, class B, class C>
void product_extents(const char* op, bool transpose_a, bool transpose_b, const A& a, const B& b, const C& c,
                     index_t& m, index_t& n, index_t& k) {
  m = transpose_a ? a.extent(1) : a.extent(0);
  k = transpose_a ? a.extent(0) : a.extent(1);
  const index_t kb = transpose_b ? b.extent(1) : b.extent(0);
  n = transpose_b ? b.extent(0) : b.extent(1);
  require(k == kb && static_cast<index_t>(c.extent(0)) == m && static_cast<index_t>(c.extent(1)) == n,
          Status::shape_mismatch, op, ": op(A) is ", m, "x", k, ", op(B) is ", kb, "x", n, ", C is ", c.extent(0),
          "x", c.extent(1));
}

// C *= beta (0 overwrites): what a product with an empty inner dimension leaves.
template <class T, class S>
void scale_matrix(S beta, const View2<T>& c) {
  if (beta == S(0)) {
    Kokkos::deep_copy(ExecSpace(), c, convert<T>(S(0)));
  } else if (beta != S(1)) {
    Kokkos::parallel_for(
        "kmoe::gemm_scale", md_range<2>({0, 0}, {c.extent(0), c.extent(1)}),
        KOKKOS_LAMBDA(const index_t i, const index_t j) { c(i, j) = convert<T>(beta * convert<S>(c(i, j))); });
  }
}

}  // namespace impl

template <class T>
void gemm(bool transpose_a, bool transpose_b, T alpha, const View2<const T>& a, const View2<const T>& b, T beta,
          const View2<T>& c) {
  index_t m, n, k;
  impl::product_extents("gemm", transpose_a, transpose_b, a, b, c, m, n, k);
  if (m == 0 || n == 0) return;
  if (k == 0) return impl::scale_matrix<T>(beta, c);  // BLAS leaves C untouched for k = 0 only when beta = 1
#if defined(KOKKOSKERNELS_ENABLE_TPL_BLAS)
  if constexpr (Kokkos::SpaceAccessibility<HostSpace, MemSpace>::accessible) {
    require(m <= INT_MAX && n <= INT_MAX && a.stride(0) <= INT_MAX && b.stride(0) <= INT_MAX &&
                c.stride(0) <= INT_MAX,
            Status::invalid_argument, "gemm: extents beyond the BLAS integer range");
    impl::host_blas_gemm(transpose_a, transpose_b, m, n, k, alpha, a, b, beta, c);
    return;
  }
#endif
  // cuBLAS (or Kokkos Kernels' own kernels where no BLAS TPL is enabled).
  if (impl::record_gemm<T>(transpose_a, transpose_b, m, n, k, alpha, a, b, beta, c)) return;
#if defined(KOKKOS_ENABLE_CUDA) && defined(KOKKOSKERNELS_ENABLE_TPL_CUBLAS)
  impl::bound_cublas_handle();
#endif
  KokkosBlas::gemm(transpose_a ? "T" : "N", transpose_b ? "T" : "N", alpha, a, b, beta, c);
}

template void gemm<float>(bool, bool, float, const View2<const float>&, const View2<const float>&, float,
                          const View2<float>&);
template void gemm<double>(bool, bool, double, const View2<const double>&, const View2<const double>&, double,
                           const View2<double>&);

namespace impl {
// gemm_bf16 into a bfloat16 or a float C.
template <class C>
void gemm_bf16_into(bool transpose_a, bool transpose_b, float alpha, const View2<const bfloat16>& a,
                    const View2<const bfloat16>& b, float beta, const View2<C>& c) {
  index_t m, n, k;
  product_extents("gemm_bf16", transpose_a, transpose_b, a, b, c, m, n, k);
  if (m == 0 || n == 0) return;
  if (k == 0) return scale_matrix<C>(beta, c);
  if constexpr (Kokkos::SpaceAccessibility<HostSpace, MemSpace>::accessible) {
    // Widen, multiply in float, round once. Plain loops: this may run inside a host-parallel
    // for_each_independent_gemm body, each on its own thread's buffers.
    thread_local std::vector<float> wide_a, wide_b, wide_c;
    const auto widen = [](const auto& v, std::vector<float>& out) {
      out.resize(v.extent(0) * v.extent(1));
      for (std::size_t i = 0; i < v.extent(0); ++i)
        for (std::size_t j = 0; j < v.extent(1); ++j) out[i * v.extent(1) + j] = to_float(v(i, j));
      return View2<float>(out.data(), v.extent(0), v.extent(1));
    };
    if constexpr (std::is_same_v<C, float>) {
      gemm<float>(transpose_a, transpose_b, alpha, widen(a, wide_a), widen(b, wide_b), beta, c);
    } else {
      const View2<float> fc = widen(c, wide_c);
      gemm<float>(transpose_a, transpose_b, alpha, widen(a, wide_a), widen(b, wide_b), beta, fc);
      for (std::size_t i = 0; i < c.extent(0); ++i)
        for (std::size_t j = 0; j < c.extent(1); ++j) c(i, j) = to_bfloat16(fc(i, j));
    }
    return;
  }
#if defined(KOKKOS_ENABLE_CUDA) && defined(KOKKOSKERNELS_ENABLE_TPL_CUBLAS)
  if (record_gemm<bfloat16, C>(transpose_a, transpose_b, m, n, k, alpha, a, b, beta, c)) return;
  // Row-major C = op(A)·op(B) is column-major Cᵀ = op(B)ᵀ·op(A)ᵀ, hence B before A.
  const cublasStatus_t status = cublasGemmEx(
      bound_cublas_handle(), transpose_b ? CUBLAS_OP_T : CUBLAS_OP_N, transpose_a ? CUBLAS_OP_T : CUBLAS_OP_N,
      static_cast<int>(n), static_cast<int>(m), static_cast<int>(k), &alpha, b.data(), CUDA_R_16BF,
      static_cast<int>(b.stride(0)), a.data(), CUDA_R_16BF, static_cast<int>(a.stride(0)), &beta, c.data(),
      cuda_type_of(gemm_type_of<C>()), static_cast<int>(c.stride(0)), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
  require_cublas(status, "bf16 GEMM", 1);
#else
  require(false, Status::unsupported, "gemm_bf16: this build has neither a host BLAS nor cuBLAS");
#endif
}
}  // namespace impl

void gemm_bf16(bool transpose_a, bool transpose_b, float alpha, const View2<const bfloat16>& a,
               const View2<const bfloat16>& b, float beta, const View2<bfloat16>& c) {
  impl::gemm_bf16_into<bfloat16>(transpose_a, transpose_b, alpha, a, b, beta, c);
}

void gemm_bf16(bool transpose_a, bool transpose_b, float alpha, const View2<const bfloat16>& a,
               const View2<const bfloat16>& b, float beta, const View2<float>& c) {
  impl::gemm_bf16_into<float>(transpose_a, transpose_b, alpha, a, b, beta, c);
}

}  // namespace kmoe::ops
