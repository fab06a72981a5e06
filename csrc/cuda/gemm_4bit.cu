// CUDA kernels of gemm_4bit: out[M, N] = A[M, K] @ W[N, K]^T (+ bias), W in bitsandbytes' packed
// 4-bit format (NF4 / FP4, any blocksize, float32 or nested absmax decoded in registers).
//
// Three kernels and one fallback, chosen by shape in gemm_4bit_cuda (the dispatch, with the
// measurements behind it, is at kTcMaxM):
//  * skinny (M <= 32, fp16/bf16, K % 32 == 0): streams W once. Each warp owns 32 rows of W and
//    a share of K; W is the mma.sync A operand (16 rows of N per m16 tile) decoded straight into
//    registers through a per-lane byte -> pair table, the batch is the n=8 side. Packed W reaches
//    shared memory through a per-thread 4-stage cp.async ring (each thread reads back only what
//    it copied: no barriers in the loop).
//  * tensor-core GEMM (32 < M <= kTcMaxM): 128 x BM tiles, BK = 64, multi-stage cp.async of
//    activations and packed W; W is decoded once per tile into shared memory, ldmatrix feeds
//    mma.sync m16n8k16 with float32 accumulators.
//  * generic (any K, any dtype incl. float32, small M): one warp per output feature, element by
//    element, exact float32 decode.
//  * dequantize + cuBLAS (larger M, or shapes the others do not take): W dequantized to A's
//    dtype exactly as dequantize_4bit does (dequant_rows_kernel), then one at::mm / at::addmm.
// All offsets into W and A are 64-bit.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <torch/library.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <set>
#include <utility>

#include "../gemm_4bit.h"
#include "common.cuh"
#include "gemm_4bit_mma.cuh"

namespace nf4kit {
namespace cuda {
namespace {

struct GemmParams {
  const uint8_t* A;        // [M, K] of T, contiguous, 16-byte aligned
  const uint8_t* packed;   // W: N*K nibbles, element 2i in the high nibble
  AbsmaxSource absmax;     // plain or nested
  const float* bias;       // [N] float32, or null
  void* out;               // [M, N] of T
  int64_t M, N, K;
  int bs_shift;            // log2(blocksize)
  float code[16];          // decode values (FP4's -0.0 as +0.0)
};

// An absmax in two halves, so that its loads can be issued one step before it is needed.
struct RawScale {
  float v = 0.0f;   // plain: the absmax; nested: nested_absmax of its group
  uint32_t q = 0;   // nested: the uint8 code
};
__device__ __forceinline__ RawScale load_scale(const AbsmaxSource& s, int64_t b) {
  RawScale r;
  if (s.absmax_f32 != nullptr) {
    r.v = __ldg(s.absmax_f32 + b);
  } else {
    r.q = __ldg(s.absmax_u8 + b);
    const int64_t k = s.nested_shift >= 0 ? (b >> s.nested_shift) : b / s.nested_blocksize;
    r.v = __ldg(s.nested_absmax + k);
  }
  return r;
}
__device__ __forceinline__ float finish_scale(const AbsmaxSource& s, RawScale r, const float* code8, float off) {
  return s.absmax_f32 != nullptr ? r.v : nested_absmax_value(code8[r.q], r.v, off);
}

// nested_code to shared memory (caller syncs); the offset, read once.
__device__ __forceinline__ float stage_nested(const AbsmaxSource& s, float* code8) {
  if (s.absmax_f32 != nullptr) return 0.0f;
  for (int i = threadIdx.x; i < 256; i += blockDim.x) code8[i] = s.nested_code[i];
  return __ldg(s.offset);
}

__device__ __forceinline__ uint32_t word(const uint4& v, int i) {
  return i == 0 ? v.x : (i == 1 ? v.y : (i == 2 ? v.z : v.w));
}
// The pair-table entry of byte b of w (b is a constant after unrolling) for this lane: entry v of
// lane l sits at byte offset v * 128 + l * 4, so from tab_lane (the shared address of the table
// plus 4 l, see lane_table) the address is one PRMT (or AND / SHF) and one LEA.
__device__ __forceinline__ uint32_t lookup(uint32_t tab_lane, uint32_t w, int b) {
  const uint32_t v = b == 0 ? (w & 0xFFu) : (b == 3 ? (w >> 24) : __byte_perm(w, 0u, 0x4440u | b));
  uint32_t r;
  asm("ld.shared.u32 %0, [%1];\n" : "=r"(r) : "r"(tab_lane + (v << 7)));
  return r;
}
// This lane's view of the table as one opaque register (otherwise the compiler splits the
// window base back out and spends an extra add on every lookup).
__device__ __forceinline__ uint32_t lane_table(const void* table, int lane) {
  uint32_t a = mma::smem_addr(table) + 4u * lane;
  asm volatile("" : "+r"(a));
  return a;
}

template <typename T>
__device__ __forceinline__ void store_out(const GemmParams& p, int64_t m, int64_t n, float v) {
  if (m < p.M && n < p.N) {
    if (p.bias != nullptr) v += p.bias[n];
    reinterpret_cast<typename DType<T>::cuda_t*>(p.out)[m * p.N + n] = DType<T>::from_float(v);
  }
}

// =============================================================================================
// Skinny kernel (M <= 8 * NT <= 32)
// =============================================================================================
// Warp w of a block of RG * KS warps: row group rg = w % RG (32 rows of W: two m16 tiles),
// K share ks = w / RG (128-wide chunks ks, ks + KS, ...). Thread (g = lane / 4, c = lane % 4)
// copies, per chunk, 16 bytes (32 consecutive k) of each of its 4 rows (g, g + 8 of both tiles)
// at k = chunk * 128 + 32 c. mma's k order is free as long as both operands agree: at step j
// (0..7) the thread's k slots {2c, 2c+1 | 2c+8, 2c+9} are its elements {4j, 4j+1 | 4j+2, 4j+3},
// i.e. packed bytes 2j and 2j+1, and the matching activations are 8 contiguous bytes of A.
constexpr int kSkinnyStages = 4;
constexpr int kSkinnyMaxWarps = 8;
constexpr int kSkinnyRows = 32;
constexpr int kSkinnyChunk = 128;

inline size_t skinny_smem_bytes(int threads) {
  return mma::kPairTableBytes + 1024 + size_t(kSkinnyStages) * 4 * threads * 16;
}

template <typename T, int NT>
__global__ void __launch_bounds__(kSkinnyMaxWarps * 32)
    gemm4_skinny_kernel(const GemmParams p, const int RG, const int KS) {
  extern __shared__ __align__(16) uint8_t smem[];
  uint32_t* tab = reinterpret_cast<uint32_t*>(smem);
  float* code8 = reinterpret_cast<float*>(smem + mma::kPairTableBytes);
  uint4* wbuf = reinterpret_cast<uint4*>(smem + mma::kPairTableBytes + 1024);
  const int tid = threadIdx.x, nthr = blockDim.x;
  mma::build_pair_table<T>(tab, p.code);
  const float off = stage_nested(p.absmax, code8);
  __syncthreads();

  const int warp = tid >> 5, lane = tid & 31, g = lane >> 2, c = lane & 3;
  const int rg = warp % RG, ks = warp / RG;
  const int64_t M = p.M, N = p.N, K = p.K;
  const int64_t n0 = (static_cast<int64_t>(blockIdx.x) * RG + rg) * kSkinnyRows;
  int64_t roff[4];  // element offset of row i = n0 + 16 (i / 2) + 8 (i % 2) + g (clamped into W)
#pragma unroll
  for (int i = 0; i < 4; ++i) roff[i] = std::min<int64_t>(n0 + 16 * (i >> 1) + 8 * (i & 1) + g, N - 1) * K;
  const int64_t nchunks = (K + kSkinnyChunk - 1) / kSkinnyChunk;
  const int64_t count = ks < nchunks ? (nchunks - ks + KS - 1) / KS : 0;
  const uint32_t tab_lane = lane_table(smem, lane);
  const int64_t kstep = static_cast<int64_t>(KS) * kSkinnyChunk;
  const int64_t k_first = static_cast<int64_t>(ks) * kSkinnyChunk + 32 * c;  // this thread's k in chunk 0
  // Activation rows of the thread (m = 8 nt + g), as byte pointers at k_first; null past M.
  const uint8_t* arow[NT];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) arow[nt] = nt * 8 + g < M ? p.A + ((nt * 8 + g) * K + k_first) * 2 : nullptr;

  // Copies of the thread's 4 x 16 bytes of chunk after chunk; past K (or past the warp's last
  // chunk) only the (empty) group is committed, so group i is always chunk i.
  int64_t k_issue = k_first;
  int slot_issue = 0;
  auto issue = [&]() {
    if (k_issue < K) {
      uint4* dst = wbuf + slot_issue * 4 * nthr + tid;
#pragma unroll
      for (int r = 0; r < 4; ++r) mma::cp_async16(dst + r * nthr, p.packed + (roff[r] + k_issue) / 2, true);
    }
    mma::cp_async_commit();
    k_issue += kstep;
    slot_issue = (slot_issue + 1) & (kSkinnyStages - 1);
  };
  auto load_raws = [&](int64_t k, RawScale (&rs)[4]) {
    if (k < K) {
#pragma unroll
      for (int r = 0; r < 4; ++r) rs[r] = load_scale(p.absmax, (roff[r] + k) >> p.bs_shift);
    }
  };

#pragma unroll
  for (int s = 0; s < kSkinnyStages - 1; ++s) issue();
  RawScale raw[4];
  load_raws(k_first, raw);

  float acc[2][NT][4];
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mt][nt][e] = 0.0f;

  int64_t k = k_first;
  int slot = 0;
  for (int64_t i = 0; i < count; ++i, k += kstep, slot = (slot + 1) & (kSkinnyStages - 1)) {
    issue();
    RawScale nraw[4];
    load_raws(k + kstep, nraw);
    const bool valid = k < K;
    uint32_t s2[4];
#pragma unroll
    for (int r = 0; r < 4; ++r) s2[r] = mma::splat2<T>(valid ? finish_scale(p.absmax, raw[r], code8, off) : 0.0f);
    mma::cp_async_wait<kSkinnyStages - 1>();
    const uint4* src = wbuf + slot * 4 * nthr + tid;
    uint4 wv[4];
#pragma unroll
    for (int r = 0; r < 4; ++r) wv[r] = valid ? src[r * nthr] : make_uint4(0u, 0u, 0u, 0u);
    const int64_t adv = (k - k_first) * 2;

#pragma unroll
    for (int jj = 0; jj < 4; ++jj) {
      uint4 bq[NT];
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        bq[nt] = (valid && arow[nt] != nullptr) ? __ldg(reinterpret_cast<const uint4*>(arow[nt] + adv) + jj)
                                                : make_uint4(0u, 0u, 0u, 0u);
      }
#pragma unroll
      for (int sub = 0; sub < 2; ++sub) {
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
          const uint32_t wlo = word(wv[2 * mt], jj), whi = word(wv[2 * mt + 1], jj);
          uint32_t a[4];
          a[0] = mma::mul2<T>(lookup(tab_lane, wlo, 2 * sub), s2[2 * mt]);
          a[1] = mma::mul2<T>(lookup(tab_lane, whi, 2 * sub), s2[2 * mt + 1]);
          a[2] = mma::mul2<T>(lookup(tab_lane, wlo, 2 * sub + 1), s2[2 * mt]);
          a[3] = mma::mul2<T>(lookup(tab_lane, whi, 2 * sub + 1), s2[2 * mt + 1]);
#pragma unroll
          for (int nt = 0; nt < NT; ++nt)
            mma::mma_16816<T>(acc[mt][nt], a, word(bq[nt], 2 * sub), word(bq[nt], 2 * sub + 1));
        }
      }
    }
#pragma unroll
    for (int r = 0; r < 4; ++r) raw[r] = nraw[r];
  }
  mma::cp_async_wait<0>();

  if (KS > 1) {  // sum the K shares of each row group in shared memory (reusing the table)
    constexpr int E = 2 * NT * 4;
    float* red = reinterpret_cast<float*>(smem);
    __syncthreads();
    if (ks > 0) {
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) red[(warp * E + (mt * NT + nt) * 4 + e) * 32 + lane] = acc[mt][nt][e];
    }
    __syncthreads();
    if (ks == 0) {
      for (int k2 = 1; k2 < KS; ++k2) {
        const int w2 = k2 * RG + rg;
#pragma unroll
        for (int mt = 0; mt < 2; ++mt)
#pragma unroll
          for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[mt][nt][e] += red[(w2 * E + (mt * NT + nt) * 4 + e) * 32 + lane];
      }
    }
  }
  if (ks == 0) {
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) {
      const int64_t na = n0 + 16 * mt + g;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const int64_t ma = nt * 8 + 2 * c;
        store_out<T>(p, ma, na, acc[mt][nt][0]);
        store_out<T>(p, ma + 1, na, acc[mt][nt][1]);
        store_out<T>(p, ma, na + 8, acc[mt][nt][2]);
        store_out<T>(p, ma + 1, na + 8, acc[mt][nt][3]);
      }
    }
  }
}

// =============================================================================================
// Tensor-core GEMM (32 < M <= kTcMaxM)
// =============================================================================================
// Block tile BM (batch) x 128 (W rows) x 64 (k); 8 warps as 2 (M) x 4 (N), warp tile BM/2 x 32.
// Stage s holds the activation tile (BM rows of 128 bytes, 16-byte chunks XOR-swizzled by row)
// and the packed W tile (128 rows of 32 bytes). Thread t copies and later decodes W row t / 2,
// half t % 2 (32 weights, one absmax: every blocksize is a multiple of 32), so the decode needs
// no barrier; the decoded tile (128 rows of 64 T, swizzled like A) is double-buffered. One
// __syncthreads per k-tile: [sync] issue copies of tile kt+S-1, decode tile kt+1, mma tile kt.
template <int BM>
struct TcCfg {
  static constexpr int kBN = 128, kBK = 64, kThreads = 256, kStages = 3;
  static constexpr int kMT = BM / 32;  // m16 tiles per warp
  static constexpr int kNT = 4;        // n8 tiles per warp
  static constexpr int kAStage = BM * kBK * 2;
  static constexpr int kWStage = kBN * kBK / 2;
  static constexpr int kWDec = kBN * kBK * 2;
  static constexpr int kSmem = mma::kPairTableBytes + 1024 + kStages * (kAStage + kWStage) + 2 * kWDec;
};

template <typename T, int BM>
__global__ void __launch_bounds__(256) gemm4_tc_kernel(const GemmParams p) {
  using C = TcCfg<BM>;
  constexpr int S = C::kStages;
  extern __shared__ __align__(16) uint8_t smem[];
  uint32_t* tab = reinterpret_cast<uint32_t*>(smem);
  float* code8 = reinterpret_cast<float*>(smem + mma::kPairTableBytes);
  uint8_t* As = smem + mma::kPairTableBytes + 1024;
  uint8_t* Ws = As + S * C::kAStage;
  uint8_t* Wd = Ws + S * C::kWStage;
  mma::build_pair_table<T>(tab, p.code);
  const float off = stage_nested(p.absmax, code8);
  __syncthreads();

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, c = lane & 3;
  const int warp_m = warp >> 2, warp_n = warp & 3;
  const int64_t M = p.M, N = p.N, K = p.K;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * BM, n0 = static_cast<int64_t>(blockIdx.y) * C::kBN;
  const int64_t KT = (K + C::kBK - 1) / C::kBK;
  const int64_t wrow = n0 + (tid >> 1);
  const bool wrow_ok = wrow < N;
  const int64_t wrow_off = std::min<int64_t>(wrow, N - 1) * K;
  const int wh = tid & 1;
  const uint32_t tab_lane = lane_table(smem, lane);

  auto load_stage = [&](int64_t kt) {
    if (kt < KT) {
      const int slot = static_cast<int>(kt % S);
      const int64_t k0 = kt * C::kBK;
#pragma unroll
      for (int i = 0; i < BM / 32; ++i) {
        const int id = tid + i * C::kThreads, row = id >> 3, ch = id & 7;
        const int64_t m = m0 + row, k = k0 + ch * 8;
        const bool ok = m < M && k < K;
        mma::cp_async16(As + slot * C::kAStage + row * 128 + ((ch ^ (row & 7)) << 4), p.A + (ok ? (m * K + k) * 2 : 0),
                        ok);
      }
      const int64_t k = k0 + 32 * wh;
      const bool ok = wrow_ok && k < K;
      mma::cp_async16(Ws + slot * C::kWStage + tid * 16, p.packed + (ok ? (wrow_off + k) / 2 : 0), ok);
    }
    mma::cp_async_commit();
  };
  auto raw_for = [&](int64_t kt, RawScale& r) {
    const int64_t k = kt * C::kBK + 32 * wh;
    if (kt < KT && wrow_ok && k < K) {
      r = load_scale(p.absmax, (wrow_off + k) >> p.bs_shift);
      return true;
    }
    return false;
  };
  auto decode = [&](int64_t kt, RawScale r, bool ok) {
    const uint4 w = *reinterpret_cast<const uint4*>(Ws + static_cast<int>(kt % S) * C::kWStage + tid * 16);
    const uint32_t s2 = mma::splat2<T>(ok ? finish_scale(p.absmax, r, code8, off) : 0.0f);
    const int row = tid >> 1;
    uint8_t* dst = Wd + static_cast<int>(kt & 1) * C::kWDec + row * 128;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint32_t wi = word(w, i);
      uint4 o;
      o.x = mma::mul2<T>(lookup(tab_lane, wi, 0), s2);
      o.y = mma::mul2<T>(lookup(tab_lane, wi, 1), s2);
      o.z = mma::mul2<T>(lookup(tab_lane, wi, 2), s2);
      o.w = mma::mul2<T>(lookup(tab_lane, wi, 3), s2);
      *reinterpret_cast<uint4*>(dst + (((4 * wh + i) ^ (row & 7)) << 4)) = o;
    }
  };

#pragma unroll
  for (int s = 0; s < S - 1; ++s) load_stage(s);
  RawScale rc, rn;
  bool okc = raw_for(0, rc), okn = raw_for(1, rn);
  mma::cp_async_wait<S - 2>();
  decode(0, rc, okc);

  float acc[C::kMT][C::kNT][4];
#pragma unroll
  for (int mt = 0; mt < C::kMT; ++mt)
#pragma unroll
    for (int nt = 0; nt < C::kNT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mt][nt][e] = 0.0f;

  for (int64_t kt = 0; kt < KT; ++kt) {
    __syncthreads();
    load_stage(kt + S - 1);
    if (kt + 1 < KT) {
      rc = rn;
      okc = okn;
      okn = raw_for(kt + 2, rn);
      mma::cp_async_wait<S - 2>();
      decode(kt + 1, rc, okc);
    }
    const uint8_t* a_s = As + static_cast<int>(kt % S) * C::kAStage;
    const uint8_t* b_s = Wd + static_cast<int>(kt & 1) * C::kWDec;
#pragma unroll
    for (int kk = 0; kk < C::kBK / 16; ++kk) {
      uint32_t af[C::kMT][4], bf[2][4];
#pragma unroll
      for (int mt = 0; mt < C::kMT; ++mt) {
        const int row = warp_m * (BM / 2) + mt * 16 + (lane & 15), ch = kk * 2 + (lane >> 4);
        mma::ldmatrix_x4(af[mt], a_s + row * 128 + ((ch ^ (row & 7)) << 4));
      }
#pragma unroll
      for (int np = 0; np < 2; ++np) {
        const int row = warp_n * 32 + np * 16 + (lane & 7) + ((lane >> 4) << 3), ch = kk * 2 + ((lane >> 3) & 1);
        mma::ldmatrix_x4(bf[np], b_s + row * 128 + ((ch ^ (row & 7)) << 4));
      }
#pragma unroll
      for (int mt = 0; mt < C::kMT; ++mt)
#pragma unroll
        for (int nt = 0; nt < C::kNT; ++nt)
          mma::mma_16816<T>(acc[mt][nt], af[mt], bf[nt >> 1][(nt & 1) * 2], bf[nt >> 1][(nt & 1) * 2 + 1]);
    }
  }
  mma::cp_async_wait<0>();

  using cuda_t = typename DType<T>::cuda_t;
  cuda_t* out = reinterpret_cast<cuda_t*>(p.out);
  const bool pairs = (N & 1) == 0;
#pragma unroll
  for (int mt = 0; mt < C::kMT; ++mt) {
#pragma unroll
    for (int nt = 0; nt < C::kNT; ++nt) {
      const int64_t n = n0 + warp_n * 32 + nt * 8 + 2 * c;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t m = m0 + warp_m * (BM / 2) + mt * 16 + g + 8 * h;
        float v0 = acc[mt][nt][2 * h], v1 = acc[mt][nt][2 * h + 1];
        if (m >= M) continue;
        if (pairs && n + 1 < N) {
          if (p.bias != nullptr) {
            v0 += p.bias[n];
            v1 += p.bias[n + 1];
          }
          *reinterpret_cast<uint32_t*>(out + m * N + n) = pack2<T>(v0, v1);
        } else {
          store_out<T>(p, m, n, v0);
          store_out<T>(p, m, n + 1, v1);
        }
      }
    }
  }
}

// =============================================================================================
// Generic kernel: any K (rows may start mid-byte and mid-block), any dtype, M in blocks of 8
// =============================================================================================
// One warp per output feature n and 8 batch rows; lanes stride over k. Each weight is decoded
// exactly (code * absmax in float32), rounded to T as dequantize_4bit would, and accumulated in
// float32.
constexpr int kGenericWarps = 8;
constexpr int kGenericRows = 8;

template <typename T>
__global__ void __launch_bounds__(kGenericWarps * 32) gemm4_generic_kernel(const GemmParams p) {
  __shared__ float code8[256];
  __shared__ float code[16];
  const float off = stage_nested(p.absmax, code8);
  if (threadIdx.x < 16) code[threadIdx.x] = p.code[threadIdx.x];
  __syncthreads();
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kGenericWarps + warp;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kGenericRows;
  if (n >= p.N) return;
  const int64_t K = p.K;
  const int mcount = static_cast<int>(std::min<int64_t>(kGenericRows, p.M - m0));
  using cuda_t = typename DType<T>::cuda_t;
  const cuda_t* A = reinterpret_cast<const cuda_t*>(p.A) + m0 * K;
  float acc[kGenericRows];
#pragma unroll
  for (int i = 0; i < kGenericRows; ++i) acc[i] = 0.0f;
  for (int64_t k = lane; k < K; k += 32) {
    const int64_t e = n * K + k;
    const uint32_t byte = p.packed[e >> 1];
    const uint32_t q = (e & 1) ? (byte & 15u) : (byte >> 4);
    const float s = finish_scale(p.absmax, load_scale(p.absmax, e >> p.bs_shift), code8, off);
    const float w = DType<T>::to_float(DType<T>::from_float(__fmul_rn(code[q], s)));
#pragma unroll
    for (int i = 0; i < kGenericRows; ++i)
      if (i < mcount) acc[i] = fmaf(DType<T>::to_float(A[i * K + k]), w, acc[i]);
  }
#pragma unroll
  for (int i = 0; i < kGenericRows; ++i) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc[i] += __shfl_xor_sync(0xffffffffu, acc[i], o);
  }
#pragma unroll
  for (int i = 0; i < kGenericRows; ++i)
    if (lane == i) store_out<T>(p, m0 + i, n, acc[i]);
}

// =============================================================================================
// W (or a range of its rows) dequantized to T for the cuBLAS path, exactly as dequantize_4bit
// does it (code * absmax in float32, one rounding). Flat elements [e0, e0 + n) -> out[0, n).
// With e0 % 32 == 0 every 32-element chunk is one 16-byte load, one absmax and 16-byte stores;
// otherwise (odd K slices) element by element.
// =============================================================================================
template <typename T>
__global__ void __launch_bounds__(256) dequant_rows_kernel(const GemmParams p, int64_t e0, int64_t n, T* out) {
  __shared__ float code8[256];
  __shared__ float code[16];
  const float off = stage_nested(p.absmax, code8);
  if (threadIdx.x < 16) code[threadIdx.x] = p.code[threadIdx.x];
  __syncthreads();
  using cuda_t = typename DType<T>::cuda_t;
  cuda_t* o = reinterpret_cast<cuda_t*>(out);
  const bool vec = (e0 & 31) == 0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  constexpr int U = 4;  // chunks per thread per step: their loads go out together
  const int64_t nchunks = (n + 31) / 32;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; base < nchunks;
       base += U * stride) {
    uint4 w[U];
    float scale[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t s = (base + u * stride) * 32;
      if (vec && s + 32 <= n) {
        w[u] = load16_stream(p.packed + (e0 + s) / 2);
        scale[u] = finish_scale(p.absmax, load_scale(p.absmax, (e0 + s) >> p.bs_shift), code8, off);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t s = (base + u * stride) * 32;
      if (s >= n) continue;
      if (vec && s + 32 <= n) {
        constexpr int kPer = kPerVec<T>;
#pragma unroll
        for (int v = 0; v < 32 / kPer; ++v) {
          float f[kPer];
#pragma unroll
          for (int j = 0; j < kPer; ++j) {
            const int idx = v * kPer + j;  // element of the chunk: byte idx / 2, high nibble first
            const uint32_t byte = (word(w[u], idx / 8) >> (8 * ((idx / 2) & 3))) & 0xFFu;
            f[j] = __fmul_rn(code[(idx & 1) ? (byte & 15u) : (byte >> 4)], scale[u]);
          }
          store16_stream(o + s + v * kPer, pack16<T>(f));
        }
      } else {
        for (int64_t i = s; i < std::min<int64_t>(s + 32, n); ++i) {
          const int64_t ei = e0 + i;
          const uint32_t byte = p.packed[ei >> 1];
          const float sc = finish_scale(p.absmax, load_scale(p.absmax, ei >> p.bs_shift), code8, off);
          o[i] = DType<T>::from_float(__fmul_rn(code[(ei & 1) ? (byte & 15u) : (byte >> 4)], sc));
        }
      }
    }
  }
}

// =============================================================================================
// Host side
// =============================================================================================
enum class Path { Auto, Skinny, TensorCore, Dequant, Generic };

// Development aid (benchmarks/tests force each path): NF4KIT_GEMM_PATH=skinny|tc|dequant|generic.
Path path_override() {
  const char* s = std::getenv("NF4KIT_GEMM_PATH");
  if (s == nullptr || *s == '\0') return Path::Auto;
  if (!std::strcmp(s, "skinny")) return Path::Skinny;
  if (!std::strcmp(s, "tc")) return Path::TensorCore;
  if (!std::strcmp(s, "dequant")) return Path::Dequant;
  if (!std::strcmp(s, "generic")) return Path::Generic;
  return Path::Auto;
}

// Dispatch, from medians measured on an H200 (torch 2.11, 8192 x 28672 and 4096 x 4096 layers,
// fp16 and bf16, benchmarks/results/h200/matmul.md and the --tune sweep in the same run):
//   M <= 32      skinny: 8192x28672 at M=1/8/16/32: 0.074/0.084/0.102/0.171 ms vs cuBLAS fp16
//                ~0.128 ms (1.75x/1.52x/1.27x/0.75x); the tensor-core kernel takes 0.214 ms at 32.
//   33..64       tensor-core kernel: 0.215 ms at M=48-64 vs 0.44 ms for dequantize + cuBLAS, when
//                it has at least half a block per SM (4096x14336: 0.071 ms vs 0.126); with fewer
//                (N = 4096: 32 blocks) dequantize + cuBLAS (M=64 there: tc 0.070 / 0.234 ms, the
//                cuBLAS path 0.049 / 0.131 ms at M=128).
//   > 64         dequantize + cuBLAS: at M=96-128 the two are equal (0.41 vs 0.44 ms), from 256 on
//                dequantize + cuBLAS wins (0.49 vs 0.83 ms at 256, 2.9 vs 10.6 ms at 4096).
// None of the three beats cuBLAS fp16 between M=32 and 4096 yet (0.3x-0.95x): see the results.
constexpr int64_t kTcMaxM = 64;

GemmParams make_params(const Gemm4bitArgs& a, const at::Tensor& out, const at::Tensor& packed) {
  GemmParams p{};
  p.A = static_cast<const uint8_t*>(a.A2.data_ptr());
  p.packed = packed.data_ptr<uint8_t>();
  if (a.nested) {
    p.absmax.absmax_u8 = a.absmax.data_ptr<uint8_t>();
    p.absmax.nested_absmax = a.nested_absmax.data_ptr<float>();
    p.absmax.nested_code = a.nested_code.data_ptr<float>();
    p.absmax.offset = a.offset.data_ptr<float>();
    p.absmax.set_nested_blocksize(a.nested_blocksize);
  } else {
    p.absmax.absmax_f32 = a.absmax.data_ptr<float>();
  }
  p.bias = a.bias.defined() ? a.bias.data_ptr<float>() : nullptr;
  p.out = out.data_ptr();
  p.M = a.M;
  p.N = a.N;
  p.K = a.K;
  p.bs_shift = __builtin_ctzll(static_cast<unsigned long long>(a.blocksize));
  const Code4Tables t = make_code4_tables(a.qt);
  for (int i = 0; i < 16; ++i) p.code[i] = t.decode[i];
  return p;
}

// Rows [r0, r0 + rows) of W dequantized to the output dtype, into out ([rows, K], contiguous).
template <typename T>
void launch_dequant_rows(const GemmParams& p, int64_t r0, int64_t rows, at::Tensor& out, cudaStream_t stream) {
  const int64_t n = rows * p.K;
  if (n == 0) return;
  auto* kernel = &dequant_rows_kernel<T>;
  const int64_t grid = resident_grid(kernel, 256, ceil_div(ceil_div(n, 32), 256));
  kernel<<<static_cast<unsigned>(grid), 256, 0, stream>>>(p, r0 * p.K, n, out.data_ptr<T>());
  NF4KIT_LAUNCH_CHECK();
}

// Raises a kernel's dynamic shared-memory limit, once per kernel and device.
template <typename Kernel>
void allow_smem(Kernel* kernel, int bytes) {
  static std::mutex mu;
  static std::set<std::pair<const void*, int>> done;
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  const std::lock_guard<std::mutex> lock(mu);
  if (done.insert({reinterpret_cast<const void*>(kernel), dev}).second)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
}

struct SkinnyCfg {
  int RG, KS;
};

// Row groups and K shares per block (RG * KS <= 8 warps). Enough warps to keep ~8 per SM
// streaming, K split only as far as needed; NF4KIT_GEMV_CFG="RG,KS" overrides (tuning aid).
SkinnyCfg skinny_config(int64_t N, int64_t K, int sms) {
  if (const char* s = std::getenv("NF4KIT_GEMV_CFG")) {
    int rg = 0, ks = 0;
    if (std::sscanf(s, "%d,%d", &rg, &ks) == 2 && rg >= 1 && ks >= 1 && rg * ks <= kSkinnyMaxWarps) return {rg, ks};
  }
  const int64_t tiles = ceil_div(N, kSkinnyRows), chunks = ceil_div(K, kSkinnyChunk);
  int KS = 1;
  while (KS < kSkinnyMaxWarps && tiles * KS < int64_t{sms} * 8 && chunks >= 4 * KS) KS *= 2;
  int RG = kSkinnyMaxWarps / KS;
  while (RG > 1 && ceil_div(tiles, RG) < int64_t{sms}) RG /= 2;
  return {RG, KS};
}

template <typename T, int NT>
void launch_skinny(const GemmParams& p, cudaStream_t stream) {
  const int sms = sm_count();
  const SkinnyCfg cfg = skinny_config(p.N, p.K, sms);
  const int threads = cfg.RG * cfg.KS * 32;
  const size_t smem = skinny_smem_bytes(threads);
  auto* kernel = &gemm4_skinny_kernel<T, NT>;
  allow_smem(kernel, static_cast<int>(skinny_smem_bytes(kSkinnyMaxWarps * 32)));
  const int64_t blocks = ceil_div(ceil_div(p.N, kSkinnyRows), cfg.RG);
  kernel<<<static_cast<unsigned>(blocks), threads, smem, stream>>>(p, cfg.RG, cfg.KS);
  NF4KIT_LAUNCH_CHECK();
}

template <typename T, int BM>
void launch_tc(const GemmParams& p, cudaStream_t stream) {
  using C = TcCfg<BM>;
  auto* kernel = &gemm4_tc_kernel<T, BM>;
  allow_smem(kernel, C::kSmem);
  const dim3 grid(static_cast<unsigned>(ceil_div(p.M, BM)), static_cast<unsigned>(ceil_div(p.N, C::kBN)));
  kernel<<<grid, C::kThreads, C::kSmem, stream>>>(p);
  NF4KIT_LAUNCH_CHECK();
}

template <typename T>
void launch_generic(const GemmParams& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div(p.N, kGenericWarps)),
                  static_cast<unsigned>(ceil_div(p.M, kGenericRows)));
  gemm4_generic_kernel<T><<<grid, kGenericWarps * 32, 0, stream>>>(p);
  NF4KIT_LAUNCH_CHECK();
}

at::Tensor gemm_4bit_cuda(const at::Tensor& A, const at::Tensor& packed, const at::Tensor& absmax,
                          const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& nested_code,
                          const std::optional<at::Tensor>& offset, int64_t blocksize, int64_t nested_blocksize,
                          c10::string_view quant_type, int64_t out_features, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK_VALUE(A.is_cuda(), "A must be a CUDA tensor, got one on ", A.device());
  const c10::cuda::CUDAGuard guard(A.device());
  Gemm4bitArgs a = check_gemm_4bit_args(A, packed, absmax, nested_absmax, nested_code, offset, blocksize,
                                        nested_blocksize, quant_type, out_features, bias);
  if (a.K == 0) return gemm_4bit_empty_k(a, A.options());
  at::Tensor out = new_output(a.out_shape, A.options());
  if (a.M == 0) return out;

  const at::ScalarType dtype = A.scalar_type();
  if (!aligned16(a.A2.data_ptr())) a.A2 = a.A2.clone();
  at::Tensor pk = a.packed;
  const bool half = dtype != at::kFloat;
  const bool pow2_nested = !a.nested || (a.nested_blocksize & (a.nested_blocksize - 1)) == 0;
  const bool mma_ok = half && a.K % 32 == 0 && pow2_nested && at::cuda::getCurrentDeviceProperties()->major >= 8;
  if (!aligned16(pk.data_ptr())) pk = pk.clone();  // 16-byte loads of W

  Path path = path_override();
  if (path == Path::Skinny && !(mma_ok && a.M <= 32)) path = Path::Auto;
  if (path == Path::TensorCore && !(mma_ok && ceil_div(a.N, 128) <= 65535)) path = Path::Auto;
  if (path == Path::Generic && ceil_div(a.M, kGenericRows) > 65535) path = Path::Auto;
  if (path == Path::Auto) {
    if (mma_ok && a.M <= 32) path = Path::Skinny;
    else if (mma_ok && a.M <= kTcMaxM && ceil_div(a.N, 128) <= 65535 &&
             ceil_div(a.N, 128) * ceil_div(a.M, 64) * 2 >= sm_count())
      path = Path::TensorCore;
    else if (a.M <= 2 * kGenericRows) path = Path::Generic;
    else path = Path::Dequant;
  }

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const GemmParams p = make_params(a, out, pk);
  if (path == Path::Dequant) {
    at::Tensor W = at::empty({a.N, a.K}, A.options());
    NF4KIT_CUDA_DISPATCH_FLOAT(dtype, "gemm_4bit_dequant", [&] { launch_dequant_rows<scalar_t>(p, 0, a.N, W, stream); });
    at::Tensor out2 = out.view({a.M, a.N});
    if (a.bias.defined()) at::addmm_out(out2, a.bias.to(dtype), a.A2, W.t());
    else at::mm_out(out2, a.A2, W.t());
    return out;
  }
  if (path == Path::Generic) {
    NF4KIT_CUDA_DISPATCH_FLOAT(dtype, "gemm_4bit_generic", [&] { launch_generic<scalar_t>(p, stream); });
    return out;
  }
  auto run = [&](auto tag) {
    using T = decltype(tag);
    if (path == Path::Skinny) {
      if (a.M <= 8) launch_skinny<T, 1>(p, stream);
      else if (a.M <= 16) launch_skinny<T, 2>(p, stream);
      else launch_skinny<T, 4>(p, stream);
    } else if (a.M <= 128) {
      launch_tc<T, 64>(p, stream);
    } else {
      launch_tc<T, 128>(p, stream);
    }
  };
  if (dtype == at::kHalf) run(at::Half{});
  else run(at::BFloat16{});
  return out;
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(nf4kit, CUDA, m) { m.impl("gemm_4bit", &cuda::gemm_4bit_cuda); }

}  // namespace nf4kit
