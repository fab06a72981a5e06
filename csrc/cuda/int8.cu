// CUDA kernels of the LLM.int8 ops, bit for bit nf4kit/reference.py:
//  - int8_vectorwise_quant: one CTA per row; absmax over the non-outliers, then
//    q = rint(x * ((1 / absmax) * 127)), outlier columns flagged (and zeroed by the host finish);
//  - int8_linear_matmul / int8_scaled_mm: int8 x int8^T on the tensor cores
//    (mma.sync m16n8k32 s8.s8.s32), cp.async multi-stage shared-memory pipeline, the int32 result
//    stored as is or through the fused dequantizing epilogue (+ bias) in the output dtype;
//    split-K (exact: int32 atomics) when the tiles alone would leave SMs idle;
//  - int8_mm_dequant: the epilogue on its own.
//
// The matmul's shared-memory layout: a stage holds BM rows of A and BN rows of B, 128 bytes of K
// each (8 chunks of 16 bytes; in odd rows the chunk index is XORed with 4, so that a quarter-warp
// reading 16 bytes from two neighbouring rows hits 32 distinct banks). A thread loads 16
// consecutive K bytes of a row with one 16-byte LDS and uses them for two m16n8k32 steps: the
// fragment's K slots (t*4 + j and 16 + t*4 + j for lane t % 4 = t) are mapped onto a permutation
// of the 64 K bytes of a half stage, the same for A and B, which leaves every dot product unchanged.
#include <torch/library.h>

#include "../int8_common.h"
#include "common.cuh"

namespace nf4kit {
namespace cuda {
namespace {

// ---------------------------------------------------------------------------------------------
// Row-wise quantization
// ---------------------------------------------------------------------------------------------
constexpr int kQuantThreads = 256;

// NaN-propagating max over the CTA; every thread gets the result.
__device__ float block_max_nan(float v) {
  __shared__ float warp_max[kQuantThreads / 32];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = max_nan(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_max[warp] = v;
  __syncthreads();
  v = warp_max[0];
#pragma unroll
  for (int w = 1; w < kQuantThreads / 32; ++w) v = max_nan(v, warp_max[w]);
  return v;
}

// VEC consecutive elements of x as floats: one 16-byte load when VEC > 1.
template <typename T, int VEC>
__device__ __forceinline__ void load_row_vec(const T* x, float (&v)[VEC]) {
  if constexpr (VEC == 1) {
    v[0] = static_cast<float>(x[0]);
  } else {
    static_assert(VEC * sizeof(T) == 16, "one 16-byte load");
    const uint4 u = __ldg(reinterpret_cast<const uint4*>(x));
    const T* e = reinterpret_cast<const T*>(&u);
#pragma unroll
    for (int j = 0; j < VEC; ++j) v[j] = static_cast<float>(e[j]);
  }
}

template <int VEC>
__device__ __forceinline__ void store_codes(int8_t* q, const int8_t (&c)[VEC]) {
  if constexpr (VEC == 1) {
    q[0] = c[0];
  } else {
    uint32_t w[(VEC + 3) / 4];
#pragma unroll
    for (int i = 0; i < VEC / 4; ++i)
      w[i] = uint32_t(uint8_t(c[4 * i])) | uint32_t(uint8_t(c[4 * i + 1])) << 8 |
             uint32_t(uint8_t(c[4 * i + 2])) << 16 | uint32_t(uint8_t(c[4 * i + 3])) << 24;
    if constexpr (VEC == 8) {
      *reinterpret_cast<uint2*>(q) = make_uint2(w[0], w[1]);
    } else {
      *reinterpret_cast<uint32_t*>(q) = w[0];
    }
  }
}

// One CTA per row of K elements. flags (K bytes, zeroed) gets 1 in every column holding an
// outlier when use_thr; thr is the threshold already rounded to T.
template <typename T, int VEC>
__global__ __launch_bounds__(kQuantThreads) void int8_quant_rows_kernel(const T* __restrict__ A, int8_t* __restrict__ q,
                                                                        float* __restrict__ row_stats,
                                                                        uint8_t* __restrict__ flags, int64_t K,
                                                                        bool use_thr, float thr) {
  const int64_t row = blockIdx.x;
  const T* x = A + row * K;
  int8_t* qr = q + row * K;
  constexpr int64_t kStep = int64_t(kQuantThreads) * VEC;

  float m = 0.0f;
  for (int64_t k = int64_t(threadIdx.x) * VEC; k < K; k += kStep) {
    float v[VEC];
    load_row_vec<T, VEC>(x + k, v);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float a = fabsf(v[j]);
      if (use_thr && a >= thr) {
        flags[k + j] = 1;
      } else {
        m = max_nan(m, a);
      }
    }
  }
  // max.NaN gives the canonical NaN (0x7fffffff); torch's amax (the reference) gives 0x7fc00000.
  const float reduced = block_max_nan(m);
  const float absmax = isnan(reduced) ? __int_as_float(0x7fc00000) : reduced;
  if (threadIdx.x == 0) row_stats[row] = absmax;
  const float scale = __fmul_rn(__fdiv_rn(1.0f, absmax), 127.0f);

  for (int64_t k = int64_t(threadIdx.x) * VEC; k < K; k += kStep) {
    float v[VEC];
    load_row_vec<T, VEC>(x + k, v);
    int8_t c[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float p = __fmul_rn(v[j], scale);
      const bool outlier = use_thr && fabsf(v[j]) >= thr;
      c[j] = (outlier || !isfinite(p)) ? int8_t(0) : static_cast<int8_t>(__float2int_rn(p));
    }
    store_codes<VEC>(qr + k, c);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> int8_vectorwise_quant_cuda(const at::Tensor& A_, double threshold) {
  const c10::cuda::CUDAGuard guard(A_.device());
  int8::RowQuant r = int8::row_quant_setup(A_, threshold);
  TORCH_CHECK_VALUE(r.rows < (int64_t(1) << 31), "A has ", r.rows, " rows; at most 2^31 - 1 are supported");
  if (r.rows > 0) {
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
    auto launch = [&](auto dummy) {
      using scalar_t = decltype(dummy);
      constexpr int kVec = 16 / sizeof(scalar_t);
      const bool vec = r.K % kVec == 0 && aligned16(r.A.data_ptr());
      auto kernel = vec ? int8_quant_rows_kernel<scalar_t, kVec> : int8_quant_rows_kernel<scalar_t, 1>;
      kernel<<<static_cast<unsigned>(r.rows), kQuantThreads, 0, stream>>>(
          r.A.data_ptr<scalar_t>(), r.q.data_ptr<int8_t>(), r.row_stats.data_ptr<float>(),
          r.use_thr ? r.flags.data_ptr<uint8_t>() : nullptr, r.K, r.use_thr, r.thr);
      NF4KIT_LAUNCH_CHECK();
    };
    switch (r.A.scalar_type()) {  // check_quant_args allowed these three only
      case at::kHalf: launch(at::Half()); break;
      case at::kBFloat16: launch(at::BFloat16()); break;
      default: launch(float()); break;
    }
  }
  return r.finish();
}

// ---------------------------------------------------------------------------------------------
// Epilogues of the matmul: called once per output element (m, n) with its int32 sum.
// ---------------------------------------------------------------------------------------------
struct StoreI32 {
  int32_t* out;
  int64_t N;
  __device__ __forceinline__ void operator()(int64_t m, int64_t n, int32_t v) const { out[m * N + n] = v; }
};

// Split-K: partial sums meet in a zeroed int32 buffer (integer addition: exact in any order).
struct AtomicI32 {
  int32_t* out;
  int64_t N;
  __device__ __forceinline__ void operator()(int64_t m, int64_t n, int32_t v) const { atomicAdd(out + m * N + n, v); }
};

enum class OutKind : int { F32 = 0, F16 = 1, BF16 = 2 };

// ((float(v) * (row_stats[m] * col_stats[n])) * C) (+ bias[n]) in the output dtype, every step
// rounded to nearest on its own (no FMA), as reference.int8_mm_dequant.
struct Dequant {
  const float* row_stats;
  const float* col_stats;
  const float* bias;  // float32 [N] or null
  void* out;
  OutKind kind;
  int64_t N;
  __device__ __forceinline__ float value(int64_t m, int64_t n, int32_t v) const {
    float x = __fmul_rn(__int2float_rn(v), __fmul_rn(__ldg(row_stats + m), __ldg(col_stats + n)));
    x = __fmul_rn(x, int8::kMMDequantConst);
    if (bias != nullptr) x = __fadd_rn(x, __ldg(bias + n));
    return x;
  }
  __device__ __forceinline__ void operator()(int64_t m, int64_t n, int32_t v) const {
    const float x = value(m, n, v);
    const int64_t i = m * N + n;
    switch (kind) {
      case OutKind::F16: static_cast<__half*>(out)[i] = __float2half_rn(x); break;
      case OutKind::BF16: static_cast<__nv_bfloat16*>(out)[i] = __float2bfloat16_rn(x); break;
      default: static_cast<float*>(out)[i] = x; break;
    }
  }
};

OutKind out_kind(at::ScalarType t) {
  return t == at::kHalf ? OutKind::F16 : (t == at::kBFloat16 ? OutKind::BF16 : OutKind::F32);
}

// The standalone epilogue over an int32 [M, N] product: x = columns, y = rows (grid-strided).
__global__ void int8_mm_dequant_kernel(const int32_t* __restrict__ A, int64_t M, int64_t N, Dequant dq) {
  const int64_t n = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (n >= N) return;
  for (int64_t m = blockIdx.y; m < M; m += gridDim.y) dq(m, n, A[m * N + n]);
}

void launch_mm_dequant(const int32_t* A, int64_t M, int64_t N, const Dequant& dq, cudaStream_t stream) {
  if (M == 0 || N == 0) return;
  constexpr int kThreads = 256;
  const dim3 grid(static_cast<unsigned>(ceil_div(N, kThreads)), static_cast<unsigned>(std::min<int64_t>(M, 65535)));
  int8_mm_dequant_kernel<<<grid, kThreads, 0, stream>>>(A, M, N, dq);
  NF4KIT_LAUNCH_CHECK();
}

// ---------------------------------------------------------------------------------------------
// The tensor-core matmul
// ---------------------------------------------------------------------------------------------
constexpr int kBK = 128;  // K bytes per pipeline stage

template <int BM_, int BN_, int WM_, int WN_, int STAGES_, int MIN_CTAS_>
struct GemmConfig {
  static constexpr int BM = BM_, BN = BN_, WM = WM_, WN = WN_, STAGES = STAGES_, MIN_CTAS = MIN_CTAS_;
  static constexpr int kThreads = WM * WN * 32;
  static constexpr int kWarpM = BM / WM, kWarpN = BN / WN;
  static constexpr int kMT = kWarpM / 16, kNT = kWarpN / 8;  // m16 / n8 tiles per warp
  static constexpr int kStageBytes = (BM + BN) * kBK;
  static constexpr int kSmem = STAGES * kStageBytes;
  static_assert(kWarpM % 16 == 0 && kWarpN % 8 == 0, "warp tile");
  static_assert((BM * 8) % kThreads == 0 && (BN * 8) % kThreads == 0, "whole 16-byte chunks per thread");
};
// M <= 16 (decode): B streams through, many CTAs of 16 x 64.
using SmallConfig = GemmConfig<16, 64, 1, 4, 6, 1>;
// Everything else: 128 x 128 tiles, warps of 64 x 32.
using LargeConfig = GemmConfig<128, 128, 2, 4, 3, 2>;

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  const int bytes = valid ? 16 : 0;  // 0: the 16 bytes are zero-filled
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ uint4 lds128(const uint8_t* p) { return *reinterpret_cast<const uint4*>(p); }

// Byte offset of 16-byte chunk c (0..7) of row r inside a stage's row block.
__device__ __forceinline__ int swizzled(int r, int c) { return r * kBK + ((c ^ ((r & 1) << 2)) << 4); }

// d += a (16x32, row) * b (32x8, col), s8 inputs, s32 accumulators.
__device__ __forceinline__ void mma_s8(int32_t (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                       uint32_t b0, uint32_t b1) {
  asm(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Copy rows [row0, row0 + ROWS) x K bytes [k0, k0 + 128) of a [nrows, K] int8 matrix into a stage
// (rows past nrows and bytes past K read as 0). K is a multiple of 16.
template <int ROWS, int THREADS>
__device__ __forceinline__ void load_rows(uint8_t* stage, const int8_t* __restrict__ g, int64_t row0, int64_t nrows,
                                          int64_t K, int64_t k0) {
  static_assert((ROWS * 8) % THREADS == 0, "whole chunks per thread");
#pragma unroll
  for (int j = 0; j < ROWS * 8 / THREADS; ++j) {
    const int i = threadIdx.x + j * THREADS;
    const int r = i >> 3, c = i & 7;
    const int64_t gr = row0 + r, gk = k0 + c * 16;
    const bool valid = gr < nrows && gk < K;
    cp_async16(stage + swizzled(r, c), valid ? g + gr * K + gk : g, valid);
  }
}

// C[M, N] = A[M, K] B[N, K]^T, epilogue per element. grid.x = m-tiles * n-tiles (m fastest, so
// neighbouring CTAs share a B tile), grid.y = K splits of k_tiles_per_split stages each.
template <class Cfg, class Epi>
__global__ __launch_bounds__(Cfg::kThreads, Cfg::MIN_CTAS) void int8_gemm_kernel(
    const int8_t* __restrict__ A, const int8_t* __restrict__ B, int64_t M, int64_t N, int64_t K, int m_tiles,
    int k_tiles_per_split, Epi epi) {
  constexpr int BM = Cfg::BM, BN = Cfg::BN, STAGES = Cfg::STAGES;
  extern __shared__ __align__(128) uint8_t smem[];

  const int64_t m0 = int64_t(blockIdx.x % m_tiles) * BM;
  const int64_t n0 = int64_t(blockIdx.x / m_tiles) * BN;
  const int k_tiles = static_cast<int>((K + kBK - 1) / kBK);
  const int kt0 = blockIdx.y * k_tiles_per_split;
  const int nk = max(0, min(k_tiles, kt0 + k_tiles_per_split) - kt0);

  auto stage_a = [&](int s) { return smem + s * Cfg::kStageBytes; };
  auto stage_b = [&](int s) { return smem + s * Cfg::kStageBytes + BM * kBK; };
  auto load_stage = [&](int s, int kt) {
    const int64_t k0 = int64_t(kt) * kBK;
    load_rows<BM, Cfg::kThreads>(stage_a(s), A, m0, M, K, k0);
    load_rows<BN, Cfg::kThreads>(stage_b(s), B, n0, N, K, k0);
  };

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int wm = warp / Cfg::WN, wn = warp % Cfg::WN;
  const int g = lane >> 2, t = lane & 3;
  const int a_row = wm * Cfg::kWarpM + g;  // + mt * 16 (+ 8)
  const int b_row = wn * Cfg::kWarpN + g;  // + nt * 8

  int32_t acc[Cfg::kMT][Cfg::kNT][4];
#pragma unroll
  for (int i = 0; i < Cfg::kMT; ++i)
#pragma unroll
    for (int j = 0; j < Cfg::kNT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0;

#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < nk) load_stage(s, kt0 + s);
    cp_async_commit();
  }

  for (int it = 0; it < nk; ++it) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();  // stage it % STAGES has landed; stage (it - 1) % STAGES is free again
    const int next = it + STAGES - 1;
    if (next < nk) load_stage(next % STAGES, kt0 + next);
    cp_async_commit();

    const uint8_t* sa = stage_a(it % STAGES);
    const uint8_t* sb = stage_b(it % STAGES);
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int chunk = half * 4 + t;
      uint4 b[Cfg::kNT];  // K bytes chunk * 16 .. + 15 of B row g of each n8 tile
#pragma unroll
      for (int nt = 0; nt < Cfg::kNT; ++nt) b[nt] = lds128(sb + swizzled(b_row + nt * 8, chunk));
#pragma unroll
      for (int mt = 0; mt < Cfg::kMT; ++mt) {
        // The same K bytes of rows g and g + 8 of the m16 tile: words .x/.y feed the first
        // k32 step, .z/.w the second.
        const uint4 lo = lds128(sa + swizzled(a_row + mt * 16, chunk));
        const uint4 hi = lds128(sa + swizzled(a_row + mt * 16 + 8, chunk));
#pragma unroll
        for (int nt = 0; nt < Cfg::kNT; ++nt) mma_s8(acc[mt][nt], lo.x, hi.x, lo.y, hi.y, b[nt].x, b[nt].y);
#pragma unroll
        for (int nt = 0; nt < Cfg::kNT; ++nt) mma_s8(acc[mt][nt], lo.z, hi.z, lo.w, hi.w, b[nt].z, b[nt].w);
      }
    }
  }
  cp_async_wait<0>();

  // Accumulator (i = 0..3) of lane (g, t): row g (+ 8 for i >= 2), column t * 2 + (i & 1).
#pragma unroll
  for (int mt = 0; mt < Cfg::kMT; ++mt)
#pragma unroll
    for (int nt = 0; nt < Cfg::kNT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int64_t m = m0 + a_row + mt * 16 + (i >> 1) * 8;
        const int64_t n = n0 + b_row - g + nt * 8 + t * 2 + (i & 1);
        if (m < M && n < N) epi(m, n, acc[mt][nt][i]);
      }
}

// Per device, once: the kernel may use more than 48 KB of shared memory; the CTAs of it that fit
// on one SM (occupancy). Idempotent, so a race between host threads is harmless.
template <class Cfg, class Epi>
int gemm_ctas_per_sm() {
  static int cache[64] = {};
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  if (dev < 64 && cache[dev] > 0) return cache[dev];
  auto kernel = int8_gemm_kernel<Cfg, Epi>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmem));
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, Cfg::kThreads, Cfg::kSmem));
  TORCH_CHECK(per_sm > 0, "int8 matmul kernel does not fit on this GPU (", Cfg::kSmem, " bytes of shared memory)");
  if (dev < 64) cache[dev] = per_sm;
  return per_sm;
}

template <class Cfg, class Epi>
void launch_gemm(const int8_t* A, const int8_t* B, int64_t M, int64_t N, int64_t K, int splits, int k_per_split,
                 const Epi& epi, cudaStream_t stream) {
  auto kernel = int8_gemm_kernel<Cfg, Epi>;
  gemm_ctas_per_sm<Cfg, Epi>();
  const int64_t m_tiles = ceil_div(M, Cfg::BM), tiles = m_tiles * ceil_div(N, Cfg::BN);
  TORCH_CHECK_VALUE(tiles < (int64_t(1) << 31), "int8 matmul too large: ", M, " x ", N, " output");
  kernel<<<dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(splits)), Cfg::kThreads, Cfg::kSmem, stream>>>(
      A, B, M, N, K, static_cast<int>(m_tiles), k_per_split, epi);
  NF4KIT_LAUNCH_CHECK();
}

// out_i32 (when dq is null) or the dequantized output (dq) of A[M, K] B[N, K]^T; K % 16 == 0 and
// both pointers 16-byte aligned.
template <class Cfg>
void gemm_with_config(const int8_t* A, const int8_t* B, int64_t M, int64_t N, int64_t K, int32_t* out_i32,
                      const Dequant* dq, const at::TensorOptions& opts, cudaStream_t stream) {
  const int64_t tiles = ceil_div(M, Cfg::BM) * ceil_div(N, Cfg::BN);
  const int k_tiles = static_cast<int>(ceil_div(K, kBK));
  // Split K when the tiles fill the resident CTA slots badly: the split count with the best
  // filled fraction of the waves it runs in (a little penalty per split for the atomics and
  // the extra passes), keeping >= 4 stages per split.
  const int64_t wave = int64_t(sm_count()) * gemm_ctas_per_sm<Cfg, AtomicI32>();
  int splits = 1;
  double best = 0.0;
  for (int s = 1; s <= 16 && (s == 1 || k_tiles / s >= 4); ++s) {
    const int64_t ctas = tiles * s;
    const double score = double(ctas) / double(ceil_div(ctas, wave) * wave) - 0.03 * (s - 1);
    if (score > best + 1e-9) best = score, splits = s;
  }
  const int k_per_split = static_cast<int>(ceil_div(std::max(k_tiles, 1), splits));
  splits = static_cast<int>(ceil_div(std::max(k_tiles, 1), k_per_split));

  if (splits == 1) {
    if (dq != nullptr) {
      launch_gemm<Cfg>(A, B, M, N, K, 1, k_per_split, *dq, stream);
    } else {
      launch_gemm<Cfg>(A, B, M, N, K, 1, k_per_split, StoreI32{out_i32, N}, stream);
    }
    return;
  }
  at::Tensor workspace;
  int32_t* sums = out_i32;
  if (dq != nullptr) {
    workspace = at::zeros({M, N}, opts.dtype(at::kInt));
    sums = workspace.data_ptr<int32_t>();
  } else {
    C10_CUDA_CHECK(cudaMemsetAsync(out_i32, 0, sizeof(int32_t) * M * N, stream));
  }
  launch_gemm<Cfg>(A, B, M, N, K, splits, k_per_split, AtomicI32{sums, N}, stream);
  if (dq != nullptr) launch_mm_dequant(sums, M, N, *dq, stream);
}

// The operands as the kernel needs them: [rows, K16] with K16 = K rounded up to 16 (zero
// padded: zeros add nothing to a dot product) and 16-byte aligned.
at::Tensor gemm_operand(const at::Tensor& t, int64_t rows, int64_t K) {
  at::Tensor x = t.reshape({rows, K});
  if (K % 16 != 0) return at::constant_pad_nd(x, {0, 16 - K % 16}, 0);
  if (!x.is_contiguous() || !aligned16(x.data_ptr())) return x.clone(at::MemoryFormat::Contiguous);
  return x;
}

void int8_gemm(const at::Tensor& A_, const at::Tensor& B_, int32_t* out_i32, const Dequant* dq) {
  const int64_t K = A_.size(-1), M = int8::rows_of(A_), N = B_.size(0);
  if (M == 0 || N == 0) return;
  const at::Tensor A = gemm_operand(A_.contiguous(), M, K), B = gemm_operand(B_.contiguous(), N, K);
  const int64_t K16 = A.size(1);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const int8_t* a = A.data_ptr<int8_t>();
  const int8_t* b = B.data_ptr<int8_t>();
  if (M <= SmallConfig::BM) {
    gemm_with_config<SmallConfig>(a, b, M, N, K16, out_i32, dq, A.options(), stream);
  } else {
    gemm_with_config<LargeConfig>(a, b, M, N, K16, out_i32, dq, A.options(), stream);
  }
}

at::Tensor int8_linear_matmul_cuda(const at::Tensor& A, const at::Tensor& B) {
  int8::check_matmul_args(A, B);
  const c10::cuda::CUDAGuard guard(A.device());
  at::Tensor out = new_output(int8::out_shape(A, B.size(0)), A.options().dtype(at::kInt));
  int8_gemm(A, B, out.data_ptr<int32_t>(), nullptr);
  return out;
}

Dequant make_dequant(const int8::Epilogue& e, at::Tensor& out) {
  return Dequant{e.row_stats.data_ptr<float>(), e.col_stats.data_ptr<float>(),
                 e.bias.defined() ? e.bias.data_ptr<float>() : nullptr, out.data_ptr(), out_kind(out.scalar_type()), e.N};
}

at::Tensor int8_scaled_mm_cuda(const at::Tensor& A, const at::Tensor& B, const at::Tensor& row_stats,
                               const at::Tensor& col_stats, at::ScalarType dtype,
                               const c10::optional<at::Tensor>& bias) {
  const int8::Epilogue e = int8::check_scaled_mm(A, B, row_stats, col_stats, dtype, bias);
  const c10::cuda::CUDAGuard guard(A.device());
  at::Tensor out = new_output(int8::out_shape(A, e.N), A.options().dtype(dtype));
  const Dequant dq = make_dequant(e, out);
  int8_gemm(A, B, nullptr, &dq);
  return out;
}

at::Tensor int8_mm_dequant_cuda(const at::Tensor& A_, const at::Tensor& row_stats, const at::Tensor& col_stats,
                                at::ScalarType dtype, const c10::optional<at::Tensor>& bias) {
  const int8::Epilogue e = int8::check_mm_dequant(A_, row_stats, col_stats, dtype, bias);
  const c10::cuda::CUDAGuard guard(A_.device());
  const at::Tensor A = A_.contiguous();
  at::Tensor out = new_output(A.sizes(), A.options().dtype(dtype));
  launch_mm_dequant(A.data_ptr<int32_t>(), e.M, e.N, make_dequant(e, out), c10::cuda::getCurrentCUDAStream().stream());
  return out;
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(nf4kit, CUDA, m) {
  m.impl("int8_vectorwise_quant", &cuda::int8_vectorwise_quant_cuda);
  m.impl("int8_linear_matmul", &cuda::int8_linear_matmul_cuda);
  m.impl("int8_mm_dequant", &cuda::int8_mm_dequant_cuda);
  m.impl("int8_scaled_mm", &cuda::int8_scaled_mm_cuda);
}

}  // namespace nf4kit
